//! Check definitions: a directory of TOML files, each with one or more `[[check]]` tables,
//! rescanned every few seconds. Agents get the checks whose target matches their labels and
//! groups; a change that alters an agent's set is pushed to it at once.
//!
//! A file that fails to parse is reported (log and `/metrics`) and its last good version
//! stays in force, so a typo saved by an operator never removes checks from a fleet.
//!
//! The plugin catalog (`--plugins-dir`) is scanned at the same time: each regular file
//! whose name is a valid check name becomes a content-addressed plugin. A check that says
//! `plugin = "NAME"` runs that plugin; agents fetch it by hash.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use outpost_protocol::{valid_check_name, CheckSpec, PluginRef, MAX_CHECKS, MAX_PLUGIN_BYTES};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::Gateway;

/// Which agents a check is for. Empty means every agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// Every label listed must be set on the agent with this value.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The agent must be in at least one of these groups (when any are listed).
    #[serde(default)]
    pub groups: Vec<String>,
}

impl Target {
    pub fn matches(&self, labels: &BTreeMap<String, String>, groups: &[String]) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && (self.groups.is_empty() || self.groups.iter().any(|g| groups.contains(g)))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckDef {
    /// For a plugin check, `command[0]` is the plugin's name and `spec.plugin` is filled
    /// in from the catalog when the checks are assembled.
    pub spec: CheckSpec,
    pub target: Target,
    pub file: PathBuf,
}

/// A plugin file in the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginEntry {
    pub plugin: PluginRef,
    pub path: PathBuf,
}

/// The checks in force, in file-name order, and the plugin catalog.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Catalog {
    pub checks: Vec<CheckDef>,
    pub plugins: BTreeMap<String, PluginEntry>,
}

impl Catalog {
    /// The checks an agent with these labels and groups runs, sorted by name.
    pub fn for_agent(
        &self,
        labels: &BTreeMap<String, String>,
        groups: &[String],
    ) -> Vec<CheckSpec> {
        let mut v: Vec<CheckSpec> = self
            .checks
            .iter()
            .filter(|c| c.target.matches(labels, groups))
            .map(|c| c.spec.clone())
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// The catalog plugin with this content hash.
    pub fn plugin_by_hash(&self, sha256: &str) -> Option<&PluginEntry> {
        self.plugins.values().find(|p| p.plugin.sha256 == sha256)
    }
}

/// Hash every regular file in `dir` whose name is usable as a plugin name.
pub fn scan_plugins(dir: &Path) -> BTreeMap<String, PluginEntry> {
    let mut out = BTreeMap::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return out,
        Err(e) => {
            tracing::error!(dir = %dir.display(), error = %e, "cannot read the plugin catalog");
            return out;
        }
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
        else {
            continue;
        };
        // Symlinks are not followed: the catalog serves what is in the directory.
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if !meta.is_file() || !valid_check_name(&name) || name.starts_with('.') {
            continue;
        }
        if meta.len() > MAX_PLUGIN_BYTES {
            tracing::error!(plugin = %name, size = meta.len(), limit = MAX_PLUGIN_BYTES, "plugin too large to serve; skipped");
            continue;
        }
        match std::fs::read(&path) {
            Ok(bytes) => {
                let plugin = PluginRef {
                    name: name.clone(),
                    sha256: hex::encode(Sha256::digest(&bytes)),
                    size: bytes.len() as u64,
                };
                out.insert(name, PluginEntry { plugin, path });
            }
            Err(e) => tracing::error!(plugin = %name, error = %e, "cannot read plugin; skipped"),
        }
    }
    out
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    check: Vec<RawCheck>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    name: String,
    command: Option<RawCommand>,
    /// A plugin from the catalog, instead of `command`.
    plugin: Option<String>,
    /// Arguments for `plugin`.
    args: Option<RawCommand>,
    interval: RawDuration,
    timeout: Option<RawDuration>,
    #[serde(default)]
    target: Target,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawCommand {
    Argv(Vec<String>),
    Line(String),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawDuration {
    Secs(u64),
    Text(String),
}

const DEFAULT_TIMEOUT_SECS: u64 = 10;
const MAX_INTERVAL_SECS: u64 = 7 * 24 * 3600;

fn parse_duration(field: &str, raw: &RawDuration) -> Result<u64, String> {
    let secs = match raw {
        RawDuration::Secs(s) => *s,
        RawDuration::Text(t) => {
            let t = t.trim();
            let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
            let (num, unit) = t.split_at(split);
            let n: u64 = num.parse().map_err(|_| {
                format!("{field} {t:?} is not a duration; write e.g. 30, \"30s\", \"5m\" or \"1h\"")
            })?;
            let mult = match unit.trim() {
                "" | "s" => 1,
                "m" => 60,
                "h" => 3600,
                other => {
                    return Err(format!(
                        "{field} {t:?} has unknown unit {other:?}; use s, m or h"
                    ))
                }
            };
            n.saturating_mul(mult)
        }
    };
    if secs == 0 || secs > MAX_INTERVAL_SECS {
        return Err(format!(
            "{field} must be between 1 second and 7 days, not {secs} seconds"
        ));
    }
    Ok(secs)
}

/// Parse one check file, reporting every problem in it at once.
pub fn parse_file(path: &Path, text: &str) -> Result<Vec<CheckDef>, String> {
    let raw: RawFile = toml::from_str(text).map_err(|e| e.to_string())?;
    let mut errors = Vec::new();
    let mut out = Vec::new();
    for (i, c) in raw.check.into_iter().enumerate() {
        let at = format!("check #{} ({:?})", i + 1, c.name);
        if !valid_check_name(&c.name) {
            errors.push(format!(
                "{at}: name must be 1-64 characters of A-Z a-z 0-9 _ - ."
            ));
        }
        let split = |raw: RawCommand| match raw {
            RawCommand::Argv(v) => Ok(v),
            RawCommand::Line(l) => shell_words::split(&l).map_err(|e| e.to_string()),
        };
        let mut plugin_name = None;
        let command = match (c.command, c.plugin, c.args) {
            (Some(_), Some(_), _) => Err("set either command or plugin, not both".to_string()),
            (Some(_), None, Some(_)) => Err("args go with plugin; put them in command".to_string()),
            (None, None, _) => Err("command (or plugin) is required".to_string()),
            (Some(cmd), None, None) => split(cmd)
                .map_err(|e| format!("command cannot be split into arguments: {e}"))
                .and_then(|v| match v.first() {
                    Some(p) if !p.is_empty() => Ok(v),
                    _ => Err("command is empty".to_string()),
                }),
            (None, Some(plugin), _) if !valid_check_name(&plugin) => {
                Err(format!("plugin {plugin:?} is not a valid plugin name"))
            }
            (None, Some(plugin), args) => args
                .map(split)
                .transpose()
                .map_err(|e| format!("args cannot be split into arguments: {e}"))
                .map(|args| {
                    plugin_name = Some(plugin.clone());
                    std::iter::once(plugin)
                        .chain(args.unwrap_or_default())
                        .collect()
                }),
        };
        let command = match command {
            Ok(v) => v,
            Err(e) => {
                errors.push(format!("{at}: {e}"));
                continue;
            }
        };
        let interval = parse_duration("interval", &c.interval).map_err(|e| format!("{at}: {e}"));
        let timeout = c
            .timeout
            .as_ref()
            .map(|t| parse_duration("timeout", t))
            .unwrap_or(Ok(DEFAULT_TIMEOUT_SECS))
            .map_err(|e| format!("{at}: {e}"));
        match (interval, timeout) {
            (Ok(interval_secs), Ok(timeout_secs)) => out.push(CheckDef {
                spec: CheckSpec {
                    name: c.name,
                    command,
                    interval_secs,
                    timeout_secs,
                    // Resolved against the catalog when the checks are assembled.
                    plugin: plugin_name.map(|name| PluginRef {
                        name,
                        sha256: String::new(),
                        size: 0,
                    }),
                },
                target: c.target,
                file: path.to_path_buf(),
            }),
            (i, t) => errors.extend(i.err().into_iter().chain(t.err())),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors.join("; "))
    }
}

struct FileState {
    digest: [u8; 32],
    good: Vec<CheckDef>,
}

pub struct CheckStore {
    dir: PathBuf,
    pub plugins_dir: PathBuf,
    files: Mutex<HashMap<PathBuf, FileState>>,
    tx: watch::Sender<Arc<Catalog>>,
}

impl CheckStore {
    pub fn open(dir: &Path, plugins_dir: &Path) -> anyhow::Result<CheckStore> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create checks directory {}", dir.display()))?;
        let store = CheckStore {
            dir: dir.to_path_buf(),
            plugins_dir: plugins_dir.to_path_buf(),
            files: Mutex::new(HashMap::new()),
            tx: watch::channel(Arc::new(Catalog::default())).0,
        };
        store.rescan();
        Ok(store)
    }

    pub fn current(&self) -> Arc<Catalog> {
        self.tx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Catalog>> {
        self.tx.subscribe()
    }

    /// Reread the directory; returns the number of files that failed to parse.
    pub fn rescan(&self) -> usize {
        let mut failures = 0;
        let mut paths: Vec<PathBuf> = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
                .collect(),
            Err(e) => {
                tracing::error!(dir = %self.dir.display(), error = %e, "cannot read the checks directory");
                return 1;
            }
        };
        paths.sort();
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        files.retain(|p, _| paths.contains(p));
        for path in &paths {
            let text = match std::fs::read_to_string(path) {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "cannot read check file; keeping its last good version");
                    failures += 1;
                    continue;
                }
            };
            let digest: [u8; 32] = Sha256::digest(text.as_bytes()).into();
            if files.get(path).is_some_and(|f| f.digest == digest) {
                continue;
            }
            match parse_file(path, &text) {
                Ok(good) => {
                    tracing::info!(file = %path.display(), checks = good.len(), "loaded check file");
                    files.insert(path.clone(), FileState { digest, good });
                }
                Err(e) => {
                    failures += 1;
                    let kept = files.get(path).map(|f| f.good.len()).unwrap_or(0);
                    tracing::error!(file = %path.display(), error = %e, kept_checks = kept,
                        "check file is invalid; keeping its last good version");
                    let good = files.remove(path).map(|f| f.good).unwrap_or_default();
                    files.insert(path.clone(), FileState { digest, good });
                }
            }
        }
        let plugins = scan_plugins(&self.plugins_dir);
        let mut seen = std::collections::HashSet::new();
        let mut checks = Vec::new();
        for path in &paths {
            for def in files
                .get(path)
                .map(|f| f.good.as_slice())
                .unwrap_or_default()
            {
                let mut def = def.clone();
                if let Some(wanted) = &mut def.spec.plugin {
                    match plugins.get(&wanted.name) {
                        Some(entry) => *wanted = entry.plugin.clone(),
                        None => {
                            failures += 1;
                            tracing::error!(file = %path.display(), check = %def.spec.name, plugin = %wanted.name,
                                dir = %self.plugins_dir.display(), "check uses a plugin that is not in the catalog; check skipped");
                            continue;
                        }
                    }
                }
                if !seen.insert(def.spec.name.clone()) {
                    tracing::error!(file = %path.display(), check = %def.spec.name,
                        "check name defined twice; the first file (by name) wins");
                    continue;
                }
                if checks.len() >= MAX_CHECKS {
                    tracing::error!(limit = MAX_CHECKS, "too many checks; ignoring the rest");
                    break;
                }
                checks.push(def);
            }
        }
        drop(files);
        let catalog = Catalog { checks, plugins };
        self.tx.send_if_modified(|cur| {
            if **cur == catalog {
                false
            } else {
                *cur = Arc::new(catalog);
                true
            }
        });
        failures
    }
}

/// Rescan the checks directory on the configured period until shutdown.
pub async fn watch(gw: Arc<Gateway>) {
    let mut tick = tokio::time::interval(gw.settings.checks_poll);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = gw.shutdown.cancelled() => return,
        }
        let failures = gw.checks.rescan();
        gw.metrics
            .check_file_errors
            .store(failures as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_argv_and_string_commands_with_durations() {
        let defs = parse_file(
            Path::new("x.toml"),
            r#"
[[check]]
name = "load"
command = ["/usr/lib/nagios/plugins/check_load", "-w", "5,4,3"]
interval = "1m"

[[check]]
name = "echo"
command = "/bin/echo 'hello world' two"
interval = 30
timeout = "5s"
target = { labels = { role = "web" }, groups = ["eu", "us"] }
"#,
        )
        .unwrap();
        assert_eq!(defs[0].spec.interval_secs, 60);
        assert_eq!(defs[0].spec.timeout_secs, DEFAULT_TIMEOUT_SECS);
        assert_eq!(
            defs[1].spec.command,
            vec!["/bin/echo", "hello world", "two"]
        );
        assert_eq!(defs[1].spec.timeout_secs, 5);
        let labels: BTreeMap<String, String> = [("role".into(), "web".into())].into();
        assert!(defs[1].target.matches(&labels, &["us".into()]));
        assert!(!defs[1].target.matches(&labels, &["asia".into()]));
        assert!(!defs[1].target.matches(&BTreeMap::new(), &["eu".into()]));
    }

    #[test]
    fn reports_every_problem_at_once() {
        let err = parse_file(
            Path::new("x.toml"),
            r#"
[[check]]
name = "bad name"
command = []
interval = "1d"

[[check]]
name = "ok"
command = "x"
interval = "0s"
"#,
        )
        .unwrap_err();
        assert!(err.contains("name must be"), "{err}");
        assert!(err.contains("command is empty"), "{err}");
        assert!(
            err.contains("interval \"0s\"") || err.contains("between 1 second"),
            "{err}"
        );
        let err = parse_file(
            Path::new("x.toml"),
            "[[check]]\nname='a'\ncommand='x'\ninterval=1\nshell=true\n",
        )
        .unwrap_err();
        assert!(err.contains("unknown field"), "{err}");
    }

    #[test]
    fn broken_file_keeps_its_last_good_version() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.toml");
        std::fs::write(
            &f,
            "[[check]]\nname='a'\ncommand='/bin/true'\ninterval=10\n",
        )
        .unwrap();
        let store = CheckStore::open(dir.path(), dir.path()).unwrap();
        assert_eq!(store.current().checks.len(), 1);
        std::fs::write(&f, "[[check]]\nname='a'\ncommand=\n").unwrap();
        assert_eq!(store.rescan(), 1);
        assert_eq!(store.current().checks.len(), 1);
        std::fs::write(dir.path().join("b.toml"), "[[check]]\nname='a'\ncommand='x'\ninterval=5\n[[check]]\nname='b'\ncommand='x'\ninterval=5\n").unwrap();
        store.rescan();
        let names: Vec<_> = store
            .current()
            .checks
            .iter()
            .map(|c| c.spec.name.clone())
            .collect();
        assert_eq!(names, vec!["a", "b"], "duplicate name: first file wins");
        assert_eq!(store.current().checks[0].spec.interval_secs, 10);
    }
}
