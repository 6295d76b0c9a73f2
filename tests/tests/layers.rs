//! The crates' modules form layers: no module depends, directly or through others, on a
//! module that depends on it. A cycle means a capability has no home of its own (run-now
//! was split between `api` and `rpc`, each calling the other) or a module reaches up to a
//! whole-program object (every module that took `crate::Gateway` depended on `lib.rs`,
//! which depends on all of them).
//!
//! The graph is read from the sources: a module is a top-level `src/NAME.rs` with its
//! `src/NAME/` folder, `lib.rs` is the root, and an edge is any `crate::NAME` path (or
//! `crate::{…}` group) outside comments and `#[cfg(test)]` code. Items the root re-exports
//! (`pub use NAME::Item`) count as edges to `NAME`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const CRATES: &[&str] = &[
    "protocol", "sys", "agent", "gateway", "cli", "bench", "tests",
];
const ROOT: &str = "crate root (lib.rs)";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The source without comments, string literals and `#[cfg(test)]` items (a test module
/// may use whatever it tests).
fn code_of(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if text[i..].starts_with("//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if text[i..].starts_with("/*") {
            i = text[i..].find("*/").map_or(b.len(), |e| i + e + 2);
        } else if let Some(hashes) = raw_string_at(&text[i..]) {
            let close = format!("\"{}", "#".repeat(hashes));
            let body = i + 2 + hashes;
            i = text[body..]
                .find(&close)
                .map_or(b.len(), |e| body + e + close.len());
            out.push_str("\"\"");
        } else if b[i] == b'\'' {
            // A char literal ('x', '\n', '\'', '{') is skipped; a lifetime is kept.
            let rest = &text[i + 1..];
            let len = if rest.starts_with('\\') {
                rest[2..].find('\'').map(|e| e + 3)
            } else {
                let c = rest.chars().next().map_or(0, char::len_utf8);
                rest[c..].starts_with('\'').then_some(c + 1)
            };
            match len {
                Some(n) => i += 1 + n,
                None => {
                    out.push('\'');
                    i += 1;
                }
            }
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if text[i..].starts_with("#[cfg(test)]") {
            // Skip the attribute and the item it guards: up to the end of its first
            // `{…}` block, or its `;`.
            let mut depth = 0usize;
            i += "#[cfg(test)]".len();
            while i < b.len() {
                match b[i] {
                    b'{' => depth += 1,
                    b'}' => {
                        depth = depth.saturating_sub(1);
                        if depth == 0 {
                            i += 1;
                            break;
                        }
                    }
                    b';' if depth == 0 => {
                        i += 1;
                        break;
                    }
                    _ => {}
                }
                i += 1;
            }
        } else {
            let ch = text[i..].chars().next().unwrap();
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

/// The number of `#` of a raw string literal starting at `s` (`r"…"`, `r#"…"#`).
fn raw_string_at(s: &str) -> Option<usize> {
    let rest = s.strip_prefix("br").or_else(|| s.strip_prefix('r'))?;
    let hashes = rest.len() - rest.trim_start_matches('#').len();
    rest[hashes..]
        .starts_with('"')
        .then_some(hashes + usize::from(s.starts_with("br")))
}

fn ident_at(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The first path segments after each `crate::` in `code`.
fn crate_refs(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        let before = code[..at].chars().last();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue; // `outpost_crate::` or similar
        }
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level names of the group: `{a, b::{c, d}, e::f}` → a, b, e.
            let mut depth = 0;
            let mut start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => start = true,
                    c if start && (c.is_ascii_alphanumeric() || c == '_') => {
                        out.push(ident_at(&group[i..]).to_string());
                        start = false;
                    }
                    _ => {}
                }
            }
        } else {
            out.push(ident_at(rest).to_string());
        }
    }
    out
}

/// The names of the items `code` declares at its top level (`pub struct Name`, `fn name`…).
fn declarations(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in code.lines() {
        // Top-level items start at column 0.
        let l = line
            .strip_prefix("pub(crate) ")
            .or_else(|| line.strip_prefix("pub "))
            .unwrap_or(line);
        let l = l.strip_prefix("async ").unwrap_or(l);
        for kw in [
            "struct ", "enum ", "fn ", "const ", "static ", "type ", "trait ", "mod ",
        ] {
            if let Some(rest) = l.strip_prefix(kw) {
                out.push(ident_at(rest).to_string());
            }
        }
    }
    out
}

/// `code` without its `pub use …;` lines.
fn without_reexports(code: &str) -> String {
    code.lines()
        .filter(|l| !l.trim_start().starts_with("pub use "))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Whether `code` (the root's) has a path starting with module `m` (`m::…`).
fn uses_module(code: &str, m: &str) -> bool {
    code.match_indices(&format!("{m}::")).any(|(at, _)| {
        !code[..at]
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    })
}

/// Module → modules it uses, for the crate whose sources are in `src`.
fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let module_of = |file: &Path| -> Option<String> {
        let rel = file.strip_prefix(src).unwrap();
        let first = rel.components().next()?.as_os_str().to_str()?.to_string();
        match first.as_str() {
            "bin" | "main.rs" => None,
            "lib.rs" => Some(ROOT.to_string()),
            f => Some(f.trim_end_matches(".rs").to_string()),
        }
    };
    let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(f)).collect();
    // Where each item is declared, so `crate::Item` (re-exported by the root, often with
    // a glob) is an edge to the module that declares it, not to the root.
    let mut declared: BTreeMap<String, String> = BTreeMap::new();
    for file in &files {
        let Some(module) = module_of(file) else {
            continue;
        };
        let code = code_of(&std::fs::read_to_string(file).unwrap());
        for item in declarations(&code) {
            // The root's own items win; otherwise the first module found.
            if module == ROOT || !declared.contains_key(&item) {
                declared.insert(item, module.clone());
            }
        }
    }
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let Some(from) = module_of(file) else {
            continue;
        };
        let code = code_of(&std::fs::read_to_string(file).unwrap());
        let edges = g.entry(from.clone()).or_default();
        let mut names = crate_refs(&code);
        if from == ROOT {
            // The root names its modules without `crate::`; its `pub use` lines only
            // re-export (a facade), they are not a use.
            names.extend(
                modules
                    .iter()
                    .filter(|m| uses_module(&without_reexports(&code), m))
                    .cloned(),
            );
        }
        for name in names {
            let to = if modules.contains(&name) {
                name
            } else {
                declared
                    .get(&name)
                    .cloned()
                    .unwrap_or_else(|| ROOT.to_string())
            };
            if to != from {
                edges.insert(to);
            }
        }
    }
    g
}

/// One cycle of `g`, as the path around it, if there is any.
fn find_cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        g: &BTreeMap<String, BTreeSet<String>>,
        node: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in g.get(node).into_iter().flatten() {
            if let Some(c) = visit(g, next, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    g.keys()
        .find_map(|n| visit(g, n, &mut Vec::new(), &mut done))
}

#[test]
fn no_module_depends_on_itself_through_others() {
    let mut problems = Vec::new();
    for krate in CRATES {
        let src = workspace().join(krate).join("src");
        assert!(src.is_dir(), "{} is missing", src.display());
        let g = graph(&src);
        // Cycles one at a time: report one, cut its last edge, look again.
        let mut g = g;
        while let Some(cycle) = find_cycle(&g) {
            problems.push(format!("{krate}: {}", cycle.join(" → ")));
            let (a, b) = (&cycle[cycle.len() - 2], &cycle[cycle.len() - 1]);
            g.get_mut(a).unwrap().remove(b);
        }
    }
    assert!(
        problems.is_empty(),
        "import cycles between modules (move the shared piece down a layer, or hand the \
         module what it uses instead of a whole-program object):\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn the_reader_finds_edges_and_cycles() {
    let code = code_of(
        r##"use crate::{a, b::{c, d}, e::f};
// crate::commented
let s = "crate::quoted";
fn x() { crate::g::h(); }
#[cfg(test)]
mod tests { use crate::t; }
let c = '{'; let q = '"'; let r = r#"crate::raw"#; fn y<'a>(_: &'a str) {}
"##,
    );
    assert_eq!(crate_refs(&code), ["a", "b", "e", "g"]);
    assert!(uses_module(
        "let x = registry::Registry::new();",
        "registry"
    ));
    assert!(!uses_module(
        "let x = other_registry::Registry::new();",
        "registry"
    ));
    assert!(!uses_module(
        "let x = crate::registry::Registry::new();",
        "registry"
    ));
    let g: BTreeMap<String, BTreeSet<String>> = [
        ("api", vec!["rpc", "hub"]),
        ("rpc", vec!["api"]),
        ("hub", vec![]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(find_cycle(&g).unwrap(), ["api", "rpc", "api"]);
    let mut acyclic = g.clone();
    acyclic.get_mut("rpc").unwrap().clear();
    assert_eq!(find_cycle(&acyclic), None);
}
