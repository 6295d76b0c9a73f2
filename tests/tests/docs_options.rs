//! The option tables of the docs against the binaries' own `--help`, so a documented option
//! cannot be missing, stale, or given the wrong default.
//!
//! Every option table says which commands it documents, on a line above it:
//!
//! ```text
//! <!-- options: outpost-gateway serve, outpost-gateway config push -->
//! ```
//!
//! The commands are found by walking `--help` of both binaries (`Commands:` sections), so
//! a new subcommand or option fails here until it is documented. A row documents the
//! option named by the first word of its first backticked span (`` `--listen ADDR` ``).
//! What is compared: that every long option `--help` prints has a row for its command;
//! that the row names its short form and its environment variable (clap `env`) and nothing
//! else; that the default column contains clap's `[default: X]` as a whole value ("30" is
//! in "30 (seconds)" but not in "300"); that a default `--help` does not print is at least
//! explained in its help text (`Default: …`); that every row names an option its commands
//! have; and that command lines in the docs' code blocks use only real options.
//! Options hidden from `--help` (clap `hide`) are not looked at. Only the wording of
//! meanings is left to review.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const BINARIES: [&str; 2] = ["outpost-gateway", "outpost-agent"];

/// Where every option table must carry a marker; markers elsewhere in docs/ are checked too.
const OPTION_DOCS: [&str; 2] = ["docs/OPERATIONS.md", "docs/FLEET.md"];

/// One long option as `--help` prints it.
#[derive(Debug)]
struct HelpOption {
    short: Option<char>,
    takes_value: bool,
    /// The help text, continuation lines joined, with clap's `[env: …]` and `[default: …]`.
    help: String,
}

impl HelpOption {
    /// What clap appends in brackets: `[default: 30]`, `[env: OUTPOST_LISTEN=]`.
    fn bracket(&self, tag: &str) -> Option<&str> {
        let open = format!("[{tag}: ");
        let start = self.help.rfind(&open)? + open.len();
        let end = start + self.help[start..].find(']')?;
        Some(&self.help[start..end])
    }

    fn default(&self) -> Option<&str> {
        self.bracket("default")
    }

    fn env(&self) -> Option<&str> {
        self.bracket("env")
            .map(|e| e.split('=').next().unwrap_or(e))
    }
}

/// A command with options of its own (`outpost-gateway serve`), by long name (`--listen`).
struct HelpCommand {
    name: String,
    options: BTreeMap<String, HelpOption>,
}

/// Every command of both binaries, read once from `--help`.
fn commands() -> &'static [HelpCommand] {
    static COMMANDS: OnceLock<Vec<HelpCommand>> = OnceLock::new();
    COMMANDS.get_or_init(|| {
        let mut all = Vec::new();
        for binary in BINARIES {
            walk(vec![binary.to_string()], &mut all);
        }
        all
    })
}

fn command(name: &str) -> Option<&'static HelpCommand> {
    commands().iter().find(|c| c.name == name)
}

fn walk(words: Vec<String>, out: &mut Vec<HelpCommand>) {
    let text = help(&words);
    let sections = sections(&text);
    let options = parse_options(sections.get("Options").map_or(&[][..], Vec::as_slice));
    if !options.is_empty() {
        out.push(HelpCommand {
            name: words.join(" "),
            options,
        });
    }
    // Subcommands are listed two spaces in; wrapped descriptions are further in.
    let subcommands = sections.get("Commands").into_iter().flatten();
    for line in subcommands {
        let Some(sub) = line.strip_prefix("  ").filter(|l| !l.starts_with(' ')) else {
            continue;
        };
        let sub = sub.split_whitespace().next().unwrap_or_default();
        if sub != "help" {
            let mut deeper = words.clone();
            deeper.push(sub.to_string());
            walk(deeper, out);
        }
    }
}

fn help(words: &[String]) -> String {
    let line = words.join(" ");
    // No OUTPOST_* from the caller's environment: clap would print its value in `[env: …]`.
    let out = Command::new(outpost_e2e::bin(&words[0]))
        .args(&words[1..])
        .arg("--help")
        .env_clear()
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{line} --help`: {e}"));
    assert!(
        out.status.success(),
        "`{line} --help` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap_or_else(|e| panic!("`{line} --help` is not UTF-8: {e}"))
}

/// The lines under each `Header:` of a help text ("Options", "Commands", "Arguments").
fn sections(text: &str) -> BTreeMap<&str, Vec<&str>> {
    let mut sections: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    let mut current = None;
    for line in text.lines() {
        if line.starts_with(' ') || line.is_empty() {
            if let Some(header) = current {
                sections.entry(header).or_default().push(line);
            }
        } else {
            // A header, or the about and usage lines, which belong to no section.
            current = line.strip_suffix(':');
        }
    }
    sections
}

/// Options start two spaces in (`  -c, --config <CONFIG>`) or six (`      --listen`); help
/// text on the lines after them, or wrapped, is indented further.
fn parse_options(lines: &[&str]) -> BTreeMap<String, HelpOption> {
    let mut options = BTreeMap::new();
    let mut current: Option<(String, HelpOption)> = None;
    for line in lines {
        let indent = line.len() - line.trim_start().len();
        let text = line.trim();
        if text.starts_with('-') && (indent == 2 || indent == 6) {
            options.extend(current.take());
            let (spec, help) = text.split_once("  ").unwrap_or((text, ""));
            let mut short = None;
            let mut long = None;
            for name in spec.split([',', ' ']).filter(|w| w.starts_with('-')) {
                match name.strip_prefix("--") {
                    Some(l) => long = Some(format!("--{l}")),
                    None => short = name.chars().nth(1),
                }
            }
            let name = long.unwrap_or_else(|| spec.to_string());
            let option = HelpOption {
                short,
                takes_value: spec.contains('<'),
                help: help.trim().to_string(),
            };
            current = Some((name, option));
        } else if let Some((_, option)) = current.as_mut().filter(|_| !text.is_empty()) {
            if !option.help.is_empty() {
                option.help.push(' ');
            }
            option.help.push_str(text);
        }
    }
    options.extend(current);
    options.remove("--help");
    options.remove("--version");
    options
}

/// A row of a marked option table.
struct Row {
    /// `docs/FLEET.md:30`
    place: String,
    /// The commands its table's marker names.
    commands: Vec<String>,
    /// The option cell and the default cell.
    option: String,
    default: String,
}

impl Row {
    /// The first word of the first backticked span of the option cell.
    fn name(&self) -> Option<&str> {
        let span = self.option.split('`').nth(1)?;
        span.split_whitespace()
            .next()
            .filter(|w| w.starts_with("--"))
    }
}

/// A command line from a code block, with its continuation lines.
struct Usage {
    place: String,
    text: String,
}

#[derive(Default)]
struct Docs {
    rows: Vec<Row>,
    usages: Vec<Usage>,
    /// Tables that cannot be checked: unmarked, or missing a column.
    problems: Vec<String>,
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_path_buf()
}

/// README.md and docs/*.md, as paths relative to the workspace.
fn doc_files() -> Vec<String> {
    let mut files = vec!["README.md".to_string()];
    let dir = workspace().join("docs");
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let name = entry.expect("docs/ entry").file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".md") {
            files.push(format!("docs/{name}"));
        }
    }
    files.sort();
    files
}

fn docs() -> &'static Docs {
    static DOCS: OnceLock<Docs> = OnceLock::new();
    DOCS.get_or_init(|| {
        let mut docs = Docs::default();
        for file in doc_files() {
            let path = workspace().join(&file);
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            read_doc(&file, &text, &mut docs);
        }
        docs
    })
}

/// `<!-- options: outpost-gateway serve, outpost-gateway config push -->`
fn marker(line: &str) -> Option<Vec<String>> {
    let inner = line
        .trim()
        .strip_prefix("<!--")?
        .strip_suffix("-->")?
        .trim()
        .strip_prefix("options:")?;
    Some(inner.split(',').map(|c| c.trim().to_string()).collect())
}

/// Cells of a table line, split at `|` but not at `\|`.
fn cells(line: &str) -> Vec<String> {
    let line = line.trim();
    let line = line.strip_prefix('|').unwrap_or(line);
    let line = match line.strip_suffix('|') {
        Some(inner) if !inner.ends_with('\\') => inner,
        _ => line,
    };
    let mut cells = vec![String::new()];
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                cells.last_mut().unwrap().push('|');
                chars.next();
            }
            '|' => cells.push(String::new()),
            c => cells.last_mut().unwrap().push(c),
        }
    }
    cells.into_iter().map(|c| c.trim().to_string()).collect()
}

fn read_doc(file: &str, text: &str, docs: &mut Docs) {
    let lines: Vec<&str> = text.lines().collect();
    let must_mark = OPTION_DOCS.contains(&file);
    let mut marked: Option<(usize, Vec<String>)> = None;
    let mut in_code = false;
    let mut usage: Option<Usage> = None;
    let mut i = 0;
    while i < lines.len() {
        let (line, place) = (lines[i], format!("{file}:{}", i + 1));
        i += 1;
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            docs.usages.extend(usage.take());
            continue;
        }
        if in_code {
            let first = line.split_whitespace().next().unwrap_or_default();
            let program = first.rsplit('/').next().unwrap_or(first);
            if BINARIES.contains(&program) {
                docs.usages.extend(usage.take());
                usage = Some(Usage {
                    place,
                    text: line.to_string(),
                });
            } else if let Some(u) = usage.as_mut().filter(|_| line.starts_with(' ')) {
                u.text.push(' ');
                u.text.push_str(line);
            } else {
                docs.usages.extend(usage.take());
            }
            continue;
        }
        if let Some(commands) = marker(line) {
            if let Some((at, _)) = marked.replace((i, commands)) {
                docs.problems.push(format!(
                    "{file}:{at}: this options marker has no table below it (another marker follows at line {i})"
                ));
            }
            continue;
        }
        if !line.starts_with('|') {
            continue;
        }
        // A table: its header, the separator, then rows up to the first other line.
        let header = cells(line);
        let mut body = Vec::new();
        i += 1;
        while i < lines.len() && lines[i].starts_with('|') {
            body.push((i + 1, cells(lines[i])));
            i += 1;
        }
        let column = |name: &str| header.iter().position(|h| h == name);
        let Some((_, commands)) = marked.take() else {
            if must_mark && header.first().is_some_and(|h| h == "option") {
                docs.problems.push(format!(
                    "{place}: an option table without a `<!-- options: BINARY SUBCOMMAND[, …] -->` line above it naming the commands it documents"
                ));
            }
            continue;
        };
        let (Some(option), Some(default)) = (column("option"), column("default")) else {
            docs.problems.push(format!(
                "{place}: a table under an options marker needs an `option` and a `default` column; its header is {header:?}"
            ));
            continue;
        };
        for (n, row) in body {
            let place = format!("{file}:{n}");
            match (row.get(option), row.get(default)) {
                (Some(o), Some(d)) => docs.rows.push(Row {
                    place,
                    commands: commands.clone(),
                    option: o.clone(),
                    default: d.clone(),
                }),
                _ => docs.problems.push(format!(
                    "{place}: the row has {} cells, fewer than the header's {}",
                    row.len(),
                    header.len()
                )),
            }
        }
    }
    if let Some((at, _)) = marked {
        docs.problems.push(format!(
            "{file}:{at}: this options marker has no table below it"
        ));
    }
    docs.usages.extend(usage);
}

/// Whether `value` is in `cell` as a whole value: `30` in "30 (seconds)", "`30`" or "30: none",
/// but not in "300", "1.30" or "/var/lib/30/x".
fn mentions(cell: &str, value: &str) -> bool {
    let word = |c: char| c.is_alphanumeric() || "_-/.:".contains(c);
    cell.match_indices(value).any(|(i, _)| {
        let before = cell[..i].chars().next_back();
        let mut after = cell[i + value.len()..].chars();
        let end_ok = match after.next() {
            None => true,
            Some(c) if !word(c) => true,
            // Punctuation closing a sentence or a clause, not part of a longer value.
            Some('.' | ':') => after.next().is_none_or(char::is_whitespace),
            Some(_) => false,
        };
        !before.is_some_and(word) && end_ok
    })
}

/// `OUTPOST_…` names in a cell.
fn env_names(cell: &str) -> Vec<&str> {
    cell.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("OUTPOST_"))
        .collect()
}

/// The problems of one row that documents `name` of `cmd`.
fn check_row(cmd: &str, name: &str, opt: &HelpOption, row: &Row, problems: &mut Vec<String>) {
    let place = &row.place;
    if let Some(short) = opt.short {
        if !row.option.contains(&format!("`-{short}")) {
            problems.push(format!(
                "{place}: `{cmd}` has `-{short}` for {name}; name it in the option cell (`-{short} …`)"
            ));
        }
    }
    let documented = env_names(&row.option);
    if let Some(env) = opt.env().filter(|e| !documented.contains(e)) {
        problems.push(format!(
            "{place}: `{cmd}` takes {name} also from {env}; name it in the option cell (`{env}`)"
        ));
    }
    for env in documented.iter().filter(|e| Some(**e) != opt.env()) {
        problems.push(format!(
            "{place}: the row names {env}, but `{cmd} --help` gives {} for {name}",
            opt.env().unwrap_or("no environment variable")
        ));
    }
    let cell = row.default.trim();
    match opt.default() {
        Some(default) if !mentions(cell, default) => problems.push(format!(
            "{place}: `{cmd} --help` says {name} [default: {default}]; the default column says {cell:?}"
        )),
        Some(_) => {}
        None if cell.is_empty() => problems.push(format!(
            "{place}: {name} has an empty default column (write `none`, `required` or what applies)"
        )),
        None => {
            let explained = opt.help.contains("Default:");
            let plain = ["none", "required", "off"]
                .iter()
                .any(|w| cell.to_lowercase().starts_with(w));
            if opt.takes_value && !plain && !explained {
                problems.push(format!(
                    "{place}: the default column gives {name} {cell:?}, but `{cmd} --help` shows no default: \
                     add `Default: …` to its help text (or a clap `default_value`)"
                ));
            }
            if explained && cell.eq_ignore_ascii_case("none") {
                problems.push(format!(
                    "{place}: the default column says none, but `{cmd} --help` explains a default for {name}: {:?}",
                    opt.help
                ));
            }
        }
    }
}

fn fail_on(problems: Vec<String>, what: &str) {
    assert!(
        problems.is_empty(),
        "{} {what}:\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
}

#[test]
fn every_option_in_help_has_a_row_with_its_default() {
    let docs = docs();
    let mut problems = Vec::new();
    for cmd in commands() {
        for (name, opt) in &cmd.options {
            let rows: Vec<&Row> = docs
                .rows
                .iter()
                .filter(|r| r.commands.contains(&cmd.name) && r.name() == Some(name))
                .collect();
            if rows.is_empty() {
                let default = opt
                    .default()
                    .map_or("no default in --help".to_string(), |d| {
                        format!("default {d}")
                    });
                problems.push(format!(
                    "`{} {name}` ({}) is in no option table: add a row to a table marked \
                     `<!-- options: …{}… -->` in {}",
                    cmd.name,
                    default,
                    cmd.name,
                    OPTION_DOCS.join(" or ")
                ));
            }
            for row in rows {
                check_row(&cmd.name, name, opt, row, &mut problems);
            }
        }
    }
    fail_on(
        problems,
        "option(s) of the binaries missing or wrong in the docs",
    );
}

#[test]
fn every_option_table_is_marked_and_lists_only_real_options() {
    let docs = docs();
    let mut problems = docs.problems.clone();
    let known: Vec<&str> = commands().iter().map(|c| c.name.as_str()).collect();
    for row in &docs.rows {
        let Some(name) = row.name() else {
            problems.push(format!(
                "{}: the option cell {:?} does not start with the option's long name in backticks (`--name …`)",
                row.place, row.option
            ));
            continue;
        };
        for cmd in &row.commands {
            match command(cmd) {
                None => problems.push(format!(
                    "{}: the table's marker names `{cmd}`, which is no command with options (known: {})",
                    row.place,
                    known.join(", ")
                )),
                Some(c) if !c.options.contains_key(name) => problems.push(format!(
                    "{}: {name} is documented for `{cmd}`, whose --help has no such option",
                    row.place
                )),
                Some(_) => {}
            }
        }
    }
    fail_on(problems, "problem(s) in the option tables of the docs");
}

#[test]
fn command_lines_in_the_docs_use_only_real_options() {
    let usages = &docs().usages;
    assert!(
        usages.len() >= 4,
        "found only {} command lines in the docs' code blocks: is the parser broken?",
        usages.len()
    );
    let mut problems = Vec::new();
    for usage in usages {
        let words: Vec<&str> = usage.text.split_whitespace().collect();
        let program = words[0].rsplit('/').next().unwrap_or(words[0]);
        // The longest command the line starts with: `outpost-gateway config push`.
        let cmd = commands()
            .iter()
            .filter(|c| {
                let mut parts = c.name.split(' ');
                parts.next() == Some(program) && parts.zip(&words[1..]).all(|(a, b)| a == *b)
            })
            .max_by_key(|c| c.name.len());
        let used = words
            .iter()
            .map(|w| w.trim_start_matches(['[', '(', '|']))
            .filter(|w| w.starts_with("--") && w.len() > 2)
            .map(|w| {
                let end = w[2..]
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                    .map_or(w.len(), |e| e + 2);
                &w[..end]
            })
            .filter(|w| *w != "--help" && *w != "--version");
        for option in used {
            match cmd {
                Some(c) if c.options.contains_key(option) => {}
                Some(c) => problems.push(format!(
                    "{}: `{}` has no option {option}",
                    usage.place, c.name
                )),
                None => problems.push(format!(
                    "{}: {option} follows `{program}` but no subcommand of it",
                    usage.place
                )),
            }
        }
    }
    fail_on(problems, "command line(s) in the docs with unknown options");
}

#[test]
fn table_cells_keep_escaped_pipes_and_empty_cells() {
    assert_eq!(cells(r"| `a` | x \| y | |"), ["`a`", "x | y", ""]);
}

#[test]
fn mentions_takes_only_whole_values() {
    assert!(mentions("30 (seconds)", "30"));
    assert!(mentions("`30`", "30"));
    assert!(mentions("0: no limit", "0"));
    assert!(mentions("168 (7 days).", "168"));
    assert!(mentions(
        "`/etc/outpost/agent.toml`; on Windows …",
        "/etc/outpost/agent.toml"
    ));
    assert!(!mentions("300", "30"));
    assert!(!mentions("10", "0"));
    assert!(!mentions("1.30", "30"));
    assert!(!mentions(
        "`/var/lib/outpost-gateway/releases`",
        "/var/lib/outpost-gateway"
    ));
    assert!(!mentions("127.0.0.1:84430", "127.0.0.1:8443"));
}

#[test]
fn help_parsing_reads_clap_layouts() {
    let text = "About\n\nUsage: x run [OPTIONS]\n\nOptions:\n  -c, --config <CONFIG>  The file [env: OUTPOST_CONFIG=] [default: /etc/x.toml]\n      --dry-run\n          Show it\n          and stop [default: no]\n  -h, --help             Print help\n";
    let options = parse_options(&sections(text)["Options"]);
    let names: Vec<&str> = options.keys().map(String::as_str).collect();
    assert_eq!(names, ["--config", "--dry-run"]);
    let config = &options["--config"];
    assert_eq!(
        (
            config.short,
            config.takes_value,
            config.env(),
            config.default()
        ),
        (Some('c'), true, Some("OUTPOST_CONFIG"), Some("/etc/x.toml"))
    );
    let dry = &options["--dry-run"];
    assert_eq!((dry.takes_value, dry.default()), (false, Some("no")));
    assert_eq!(dry.help, "Show it and stop [default: no]");
}
