//! Check definitions, per tenant ([`TenantChecks`]): a directory of TOML files, each with one or more `[[check]]` tables
//! (the format is `outpost_protocol::checkfile`, shared with the agent's `checks.d`),
//! rescanned every few seconds. Agents get the checks whose target matches their labels and
//! groups; a change that alters an agent's set is pushed to it at once.
//!
//! A file that fails to parse is reported (log and `/metrics`) and its last good version
//! stays in force, so a typo saved by an operator never removes checks from a fleet.
//!
//! The plugin catalog (`--plugins-dir`) is scanned at the same time: each regular file
//! whose name is a valid check name becomes a content-addressed plugin. A check that says
//! `plugin = "NAME"` runs that plugin; agents fetch it by hash.

pub mod placement;

use outpost_sys::lock;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
pub use outpost_protocol::checkfile::{
    parse_entities, parse_file_with_collectors, CheckDef, CollectorDef, EntityDef, Target,
    MAX_ENTITIES,
};
use outpost_protocol::{
    valid_check_name, CheckSpec, CollectorSpec, PluginRef, MAX_CHECKS, MAX_COLLECTORS,
    MAX_PLUGIN_BYTES,
};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::alerts::config::{self as alerting, AlertConfig, FileAlerting};
use crate::metrics::Metrics;

/// A plugin file in the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginEntry {
    pub plugin: PluginRef,
    pub path: PathBuf,
}

/// The checks in force, in file-name order, and the plugin catalog.
#[derive(Debug, Default, PartialEq)]
pub struct Catalog {
    pub checks: Vec<CheckDef>,
    pub collectors: Vec<CollectorDef>,
    pub plugins: BTreeMap<String, PluginEntry>,
    /// The tenant's alerting (its files' `[alerting]`, `[[receiver]]`, `[[route]]`).
    pub alerting: Arc<AlertConfig>,
    /// The tenant's metric exports (its files' `[[export]]`).
    pub export: Arc<crate::export::config::ExportConfig>,
    /// The tenant's proxy entities (its files' `[[entity]]`), in file-name order.
    pub entities: Vec<EntityDef>,
}

impl Catalog {
    /// The checks an agent with these labels and groups runs, sorted by name; checks
    /// about entities are not among them (they are placed: [`placement`]).
    pub fn for_agent(
        &self,
        labels: &BTreeMap<String, String>,
        groups: &[String],
    ) -> Vec<CheckSpec> {
        let mut v: Vec<CheckSpec> = self
            .checks
            .iter()
            .filter(|c| c.placement.is_none() && c.target.matches(labels, groups))
            .map(|c| c.spec.clone())
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// The entity named `name`.
    pub fn entity(&self, name: &str) -> Option<&EntityDef> {
        self.entities.iter().find(|e| e.name == name)
    }

    /// The collectors an agent with these labels and groups runs, sorted by name.
    pub fn collectors_for_agent(
        &self,
        labels: &BTreeMap<String, String>,
        groups: &[String],
    ) -> Vec<CollectorSpec> {
        let mut v = targeted(
            &self.collectors,
            labels,
            groups,
            |c| (&c.target, &c.spec),
            |s| &s.name,
        );
        v.truncate(MAX_COLLECTORS);
        v
    }

    /// The catalog plugin with this content hash.
    pub fn plugin_by_hash(&self, sha256: &str) -> Option<&PluginEntry> {
        self.plugins.values().find(|p| p.plugin.sha256 == sha256)
    }
}

/// The specs of `defs` whose target matches the agent's labels and groups, sorted by name.
fn targeted<D, S: Clone>(
    defs: &[D],
    labels: &BTreeMap<String, String>,
    groups: &[String],
    parts: impl Fn(&D) -> (&Target, &S),
    name: impl Fn(&S) -> &String,
) -> Vec<S> {
    let mut v: Vec<S> = defs
        .iter()
        .map(&parts)
        .filter(|(target, _)| target.matches(labels, groups))
        .map(|(_, spec)| spec.clone())
        .collect();
    v.sort_by(|a, b| name(a).cmp(name(b)));
    v
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

struct FileState {
    digest: [u8; 32],
    good: Vec<CheckDef>,
    collectors: Vec<CollectorDef>,
    alerting: FileAlerting,
    export: Vec<crate::export::config::Sink>,
    entities: Vec<EntityDef>,
}

pub struct CheckStore {
    dir: PathBuf,
    pub plugins_dir: PathBuf,
    files: Mutex<HashMap<PathBuf, FileState>>,
    tx: watch::Sender<Arc<Catalog>>,
    /// Where the checks about entities run now (set by `crate::placing`).
    placed: watch::Sender<Arc<placement::Placed>>,
    /// The alerting problems found across files at the last scan.
    alerting_problems: Mutex<Vec<String>>,
    /// The export problems found across files at the last scan.
    export_problems: Mutex<Vec<String>>,
}

impl CheckStore {
    pub fn open(dir: &Path, plugins_dir: &Path) -> anyhow::Result<CheckStore> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create checks directory {}", dir.display()))?;
        let store = CheckStore::empty(dir, plugins_dir);
        store.rescan();
        Ok(store)
    }

    /// A store over `dir` that has not read it yet.
    fn empty(dir: &Path, plugins_dir: &Path) -> CheckStore {
        CheckStore {
            dir: dir.to_path_buf(),
            plugins_dir: plugins_dir.to_path_buf(),
            files: Mutex::new(HashMap::new()),
            tx: watch::channel(Arc::new(Catalog::default())).0,
            placed: watch::channel(Arc::new(placement::Placed::default())).0,
            alerting_problems: Mutex::default(),
            export_problems: Mutex::default(),
        }
    }

    pub fn current(&self) -> Arc<Catalog> {
        self.tx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Catalog>> {
        self.tx.subscribe()
    }

    /// Where the checks about entities run now.
    pub fn placed(&self) -> Arc<placement::Placed> {
        self.placed.borrow().clone()
    }

    pub fn subscribe_placed(&self) -> watch::Receiver<Arc<placement::Placed>> {
        self.placed.subscribe()
    }

    /// Place the checks about entities anew (sessions whose share changed are told).
    pub fn set_placed(&self, placed: placement::Placed) {
        self.placed.send_if_modified(|cur| {
            if **cur == placed {
                false
            } else {
                *cur = Arc::new(placed);
                true
            }
        });
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
        let mut files = lock(&self.files);
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
            // Checks and alerting each keep their last good version on their own: a
            // mistake in a receiver never takes a file's checks away, nor the reverse.
            let old = files.remove(path);
            let (good, collectors) = match parse_file_with_collectors(path, &text) {
                Ok(parsed) => {
                    tracing::info!(file = %path.display(), checks = parsed.0.len(), collectors = parsed.1.len(), "loaded check file");
                    parsed
                }
                Err(e) => {
                    failures += 1;
                    let kept = old.as_ref().map(|f| f.good.len()).unwrap_or(0);
                    tracing::error!(file = %path.display(), error = %e, kept_checks = kept,
                        "check file is invalid; keeping its last good version");
                    old.as_ref()
                        .map(|f| (f.good.clone(), f.collectors.clone()))
                        .unwrap_or_default()
                }
            };
            let export = match crate::export::config::parse_file(&text) {
                Ok(sinks) => sinks,
                Err(e) => {
                    if toml::from_str::<toml::Table>(&text).is_ok() {
                        failures += 1;
                        tracing::error!(file = %path.display(), error = %e,
                            "metric exports in check file are invalid; keeping their last good version");
                    }
                    old.as_ref().map(|f| f.export.clone()).unwrap_or_default()
                }
            };
            let entities = match parse_entities(path, &text) {
                Ok(e) => e,
                Err(e) => {
                    if toml::from_str::<toml::Table>(&text).is_ok() {
                        failures += 1;
                        tracing::error!(file = %path.display(), error = %e,
                            "entities in check file are invalid; keeping their last good version");
                    }
                    old.as_ref().map(|f| f.entities.clone()).unwrap_or_default()
                }
            };
            let alerting = match alerting::parse_file(&text) {
                Ok(a) => {
                    if !a.receivers.is_empty() || !a.routes.is_empty() || a.fallback.is_some() {
                        tracing::info!(file = %path.display(), receivers = a.receivers.len(), routes = a.routes.len(), "loaded alerting");
                    }
                    a
                }
                Err(e) => {
                    // Not TOML at all: counted and logged once, above.
                    if toml::from_str::<toml::Table>(&text).is_ok() {
                        failures += 1;
                        tracing::error!(file = %path.display(), error = %e,
                            "alerting in check file is invalid; keeping its last good version");
                    }
                    old.map(|f| f.alerting).unwrap_or_default()
                }
            };
            files.insert(
                path.clone(),
                FileState {
                    digest,
                    good,
                    collectors,
                    alerting,
                    export,
                    entities,
                },
            );
        }
        let mut entities: Vec<EntityDef> = Vec::new();
        for def in paths
            .iter()
            .filter_map(|p| files.get(p))
            .flat_map(|f| f.entities.iter())
        {
            if entities.iter().any(|e| e.name == def.name) {
                failures += 1;
                tracing::error!(file = %def.file.display(), entity = %def.name,
                    "entity defined twice; the first file (by name) wins");
                continue;
            }
            if entities.len() >= MAX_ENTITIES {
                tracing::error!(limit = MAX_ENTITIES, "too many entities; ignoring the rest");
                break;
            }
            entities.push(def.clone());
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
                if let Some(entity) = &def.spec.entity {
                    if !entities.iter().any(|e| &e.name == entity) {
                        failures += 1;
                        tracing::error!(file = %path.display(), check = %def.spec.name, %entity,
                            "check is about an entity no file declares ([[entity]]); check skipped");
                        continue;
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
        let mut collectors: Vec<CollectorDef> = Vec::new();
        for def in paths
            .iter()
            .filter_map(|p| files.get(p))
            .flat_map(|f| f.collectors.iter())
        {
            if collectors.iter().any(|c| c.spec.name == def.spec.name) {
                tracing::error!(file = %def.file.display(), collector = %def.spec.name,
                    "collector name defined twice; the first file (by name) wins");
                continue;
            }
            collectors.push(def.clone());
        }
        let (alerting, problems) = AlertConfig::assemble(
            paths
                .iter()
                .filter_map(|p| files.get(p).map(|f| (p.as_path(), &f.alerting))),
        );
        // Logged when they change, not at every rescan.
        let mut last = lock(&self.alerting_problems);
        if *last != problems {
            for problem in &problems {
                tracing::error!(dir = %self.dir.display(), %problem, "alerting configuration problem");
            }
            *last = problems.clone();
        }
        drop(last);
        failures += problems.len();
        let (export, export_problems) = crate::export::config::assemble(
            paths
                .iter()
                .filter_map(|p| files.get(p).map(|f| (p.as_path(), f.export.as_slice()))),
        );
        let mut last = lock(&self.export_problems);
        if *last != export_problems {
            for problem in &export_problems {
                tracing::error!(dir = %self.dir.display(), %problem, "metric export configuration problem");
            }
            *last = export_problems.clone();
        }
        drop(last);
        failures += export_problems.len();
        drop(files);
        let catalog = Catalog {
            checks,
            collectors,
            plugins,
            alerting: Arc::new(alerting),
            export: Arc::new(export),
            entities,
        };
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

/// Called once for each tenant's store when it is first made, with the tenant and its
/// checks and plugins directories (a fleet starts mirroring that tenant's configuration
/// from NATS into them).
pub type OnNewTenant = Box<dyn Fn(&str, &Path, &Path) + Send + Sync>;

/// Every tenant's checks and plugins. The home tenant's are the checks and plugins
/// directories themselves (the single-tenant layout, read as before); any other tenant's
/// are the folder named after it in the checks directory, laid out as `config push` reads
/// a directory: `checks.d/acme/*.toml` and `checks.d/acme/plugins/` (never in the plugins
/// directory, where a tenant could share a name with a plugin). A tenant's store is made
/// when its first agent connects, and rescanned with the others.
pub struct TenantChecks {
    home: String,
    checks_dir: PathBuf,
    plugins_dir: PathBuf,
    stores: Mutex<HashMap<String, Arc<CheckStore>>>,
    on_new: Mutex<Option<OnNewTenant>>,
}

impl TenantChecks {
    /// The home tenant's store is opened now: a checks directory that cannot be made is an
    /// error at start.
    pub fn open(home: &str, checks_dir: &Path, plugins_dir: &Path) -> anyhow::Result<TenantChecks> {
        let store = Arc::new(CheckStore::open(checks_dir, plugins_dir)?);
        Ok(TenantChecks {
            home: home.to_string(),
            checks_dir: checks_dir.to_path_buf(),
            plugins_dir: plugins_dir.to_path_buf(),
            stores: Mutex::new(HashMap::from([(home.to_string(), store)])),
            on_new: Mutex::new(None),
        })
    }

    /// Set what happens when a tenant's store is first made.
    pub fn on_new_tenant(&self, hook: OnNewTenant) {
        *lock(&self.on_new) = Some(hook);
    }

    /// The checks and plugins directories of `tenant`.
    pub fn dirs_of(&self, tenant: &str) -> (PathBuf, PathBuf) {
        if tenant == self.home {
            (self.checks_dir.clone(), self.plugins_dir.clone())
        } else {
            let dir = self.checks_dir.join(tenant);
            (dir.clone(), dir.join("plugins"))
        }
    }

    /// `tenant`'s checks (made on first use; a directory that cannot be made is logged
    /// and read as empty until it can).
    pub fn of(&self, tenant: &str) -> Arc<CheckStore> {
        let mut stores = lock(&self.stores);
        if let Some(store) = stores.get(tenant) {
            return store.clone();
        }
        let (checks, plugins) = self.dirs_of(tenant);
        let store = CheckStore::open(&checks, &plugins).unwrap_or_else(|e| {
            tracing::error!(%tenant, error = %e, "cannot open the tenant's checks; it has none until this is fixed");
            CheckStore::empty(&checks, &plugins)
        });
        let store = Arc::new(store);
        stores.insert(tenant.to_string(), store.clone());
        drop(stores);
        if let Some(hook) = lock(&self.on_new).as_ref() {
            hook(tenant, &checks, &plugins);
        }
        store
    }

    /// Every tenant whose store has been made, with it.
    pub fn stores(&self) -> Vec<(String, Arc<CheckStore>)> {
        lock(&self.stores)
            .iter()
            .map(|(t, s)| (t.clone(), s.clone()))
            .collect()
    }

    /// Rescan every tenant's directory; the number of files that failed to parse.
    pub fn rescan(&self) -> usize {
        let stores: Vec<Arc<CheckStore>> = lock(&self.stores).values().cloned().collect();
        stores.iter().map(|s| s.rescan()).sum()
    }
}

/// Rescan the checks directories on the configured period until shutdown.
pub async fn watch(
    store: Arc<TenantChecks>,
    metrics: Arc<Metrics>,
    poll: std::time::Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(poll);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let failures = store.rescan();
        metrics
            .check_file_errors
            .store(failures as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn a_broken_receiver_keeps_the_files_checks_and_its_last_good_alerting() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.toml");
        let check = "[[check]]\nname='a'\ncommand='/bin/true'\ninterval=10\n";
        std::fs::write(
            &f,
            format!("{check}[[receiver]]\nname='hook'\nwebhook={{url='http://h/'}}\n[[route]]\nreceivers=['hook']\n"),
        )
        .unwrap();
        let store = CheckStore::open(dir.path(), dir.path()).unwrap();
        assert_eq!(store.current().alerting.routes.len(), 1);
        // A typo in the receiver: the checks change as written, the alerting is kept.
        std::fs::write(
            &f,
            format!("{check}[[check]]\nname='b'\ncommand='/bin/true'\ninterval=10\n[[receiver]]\nname='hook'\nwebhok={{url='http://h/'}}\n"),
        )
        .unwrap();
        assert_eq!(store.rescan(), 1);
        let now = store.current();
        assert_eq!(now.checks.len(), 2, "the checks are not held back");
        assert_eq!(now.alerting.receivers.len(), 1, "last good alerting kept");
        assert_eq!(now.alerting.routes.len(), 1);
        // And a broken check leaves new alerting in force.
        std::fs::write(
            &f,
            "[[check]]\nname='a'\ncommand='/bin/true'\ninterval=0\n[[receiver]]\nname='hook2'\nwebhook={url='http://h/'}\n",
        )
        .unwrap();
        store.rescan();
        let now = store.current();
        assert_eq!(now.checks.len(), 2);
        assert!(now.alerting.receivers.contains_key("hook2"));
    }
}
