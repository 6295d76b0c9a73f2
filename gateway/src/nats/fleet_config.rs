//! Check definitions and plugins for a fleet of gateways, kept in NATS: check files in
//! the KV bucket `outpost_config` (key `<tenant>.checks.<file name>`, the TOML text) and
//! plugins in the object store `outpost_plugins_<tenant>` (object name = plugin name,
//! `sha256` in its metadata).
//!
//! `outpost-gateway config push DIR` makes NATS hold exactly what DIR holds (`*.toml`
//! check files at its top, plugins in `DIR/plugins/`): it validates everything first,
//! prints a readable diff, and with `--dry-run` stops there. Each gateway mirrors NATS into
//! `DATA_DIR/fleet/{checks.d,plugins}`, which its check store rescans every
//! `--checks-poll` seconds, so connected agents get a change within seconds.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use async_nats::jetstream::{kv, object_store};
use futures_util::StreamExt;
use outpost_protocol::checkfile::parse_file_with_collectors;
use outpost_protocol::{valid_check_name, MAX_PLUGIN_BYTES};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use crate::health::Health;
use crate::nats::Nats;
use crate::util::write_atomic;
use tokio_util::sync::CancellationToken;

pub const CONFIG_BUCKET: &str = "outpost_config";

pub fn plugins_bucket(tenant: &str) -> String {
    format!("outpost_plugins_{tenant}")
}

fn checks_prefix(tenant: &str) -> String {
    format!("{tenant}.checks.")
}

/// A configuration: check files (name → TOML text) and plugins (name → sha256 and bytes).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Snapshot {
    pub checks: BTreeMap<String, String>,
    pub plugins: BTreeMap<String, Plugin>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Plugin {
    pub sha256: String,
    pub size: u64,
    /// Empty when only the digest is known (read from NATS without the content).
    pub bytes: Vec<u8>,
}

/// Whether `name` may be a check file: `<letters, digits, '-', '_'>.toml`, so it is one
/// plain path component (no `/`, no `..`, no leading dot).
fn valid_file_name(name: &str) -> bool {
    name.strip_suffix(".toml").is_some_and(|stem| {
        !stem.is_empty()
            && stem.len() <= 128
            && stem
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-'))
    })
}

/// The one gate for every name read from NATS, by `sync_once`, `mirror` and `push` alike:
/// a check file's KV key must be `<tenant>.checks.<valid file name>`, a plugin's object
/// name a valid plugin name. Both rules allow exactly one plain path component, so a name
/// from NATS can never reach outside the mirror directories. `Err` says why, for the log.
fn check_file_of_key<'k>(key: &'k str, prefix: &str) -> Option<Result<&'k str, String>> {
    let name = key.strip_prefix(prefix)?;
    Some(if valid_file_name(name) {
        Ok(name)
    } else {
        Err(format!(
            "check file name {name:?} refused: names are letters, digits, '-' and '_' before .toml"
        ))
    })
}

fn plugin_of_object(name: &str) -> Result<&str, String> {
    if valid_check_name(name) {
        Ok(name)
    } else {
        Err(format!(
            "plugin name {name:?} refused: names are 1-64 letters, digits, '-', '_' or '.'"
        ))
    }
}

/// A plugin as fetched: its bytes, or why it is refused (which no retry changes).
enum Fetched {
    Bytes(Vec<u8>),
    Refused(String),
}

/// Fetch one plugin's bytes, refusing it before allocating when NATS says it is larger
/// than a plugin may be, reading no more than the limit whatever NATS says, and checking
/// the content against the `sha256` in its metadata. `Err` is a failure to talk to NATS,
/// worth another try; a refusal is not.
async fn fetch_plugin(
    store: &object_store::ObjectStore,
    name: &str,
    size: usize,
    sha256: &str,
) -> anyhow::Result<Fetched> {
    let refused = |why: String| Ok(Fetched::Refused(why));
    if size as u64 > MAX_PLUGIN_BYTES {
        return refused(format!(
            "plugin {name:?} is {size} bytes, over the {MAX_PLUGIN_BYTES}-byte plugin limit"
        ));
    }
    let object = store
        .get(name)
        .await
        .with_context(|| format!("cannot fetch plugin {name:?}"))?;
    let mut bytes = Vec::with_capacity(size);
    object
        .take(MAX_PLUGIN_BYTES + 1)
        .read_to_end(&mut bytes)
        .await
        .with_context(|| format!("cannot read plugin {name:?}"))?;
    if bytes.len() as u64 > MAX_PLUGIN_BYTES {
        return refused(format!(
            "plugin {name:?} is over the {MAX_PLUGIN_BYTES}-byte plugin limit"
        ));
    }
    let got = hex::encode(Sha256::digest(&bytes));
    if got != sha256 {
        return refused(format!(
            "plugin {name:?} has sha256 {got}, but its metadata says {sha256:?}"
        ));
    }
    Ok(Fetched::Bytes(bytes))
}

/// Read and validate a config directory. Every problem is listed in the error, and
/// nothing is pushed when there is one.
pub fn read_dir(dir: &Path) -> anyhow::Result<Snapshot> {
    let mut snap = Snapshot::default();
    let mut problems = Vec::new();
    let mut alerting_files = Vec::new();
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !path.is_file() || !name.ends_with(".toml") {
            continue;
        }
        if !valid_file_name(&name) {
            problems.push(format!(
                "{name}: check file names are letters, digits, '-' and '_' before .toml"
            ));
            continue;
        }
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                problems.push(format!("{name}: {e}"));
                continue;
            }
        };
        let alerting = match parse_file_with_collectors(&path, &text)
            .and_then(|_| crate::alerts::config::parse_file(&text))
        {
            Ok(a) => a,
            Err(e) => {
                problems.push(format!("{name}: {e}"));
                continue;
            }
        };
        alerting_files.push((path.clone(), alerting));
        snap.checks.insert(name, text);
    }
    // What only the files together can show: routes naming receivers no file declares.
    alerting_files.sort_by(|a, b| a.0.cmp(&b.0));
    let (_, across) = crate::alerts::config::AlertConfig::assemble(
        alerting_files.iter().map(|(p, a)| (p.as_path(), a)),
    );
    problems.extend(across);
    let plugins_dir = dir.join("plugins");
    if plugins_dir.is_dir() {
        for entry in std::fs::read_dir(&plugins_dir)
            .with_context(|| format!("cannot read {}", plugins_dir.display()))?
        {
            let path = entry?.path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let meta = std::fs::symlink_metadata(&path)?;
            if !meta.is_file() || name.starts_with('.') {
                continue;
            }
            if !valid_check_name(&name) {
                problems.push(format!(
                    "plugins/{name}: plugin names are 1-64 letters, digits, '-', '_' or '.'"
                ));
                continue;
            }
            if meta.len() > MAX_PLUGIN_BYTES {
                problems.push(format!(
                    "plugins/{name}: {} bytes, over the {MAX_PLUGIN_BYTES}-byte plugin limit",
                    meta.len()
                ));
                continue;
            }
            let bytes =
                std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            snap.plugins.insert(
                name,
                Plugin {
                    sha256: hex::encode(Sha256::digest(&bytes)),
                    size: bytes.len() as u64,
                    bytes,
                },
            );
        }
    }
    if !problems.is_empty() {
        bail!(
            "{} is not pushed; fix these first:\n  {}",
            dir.display(),
            problems.join("\n  ")
        );
    }
    Ok(snap)
}

/// What is wrong with these check files (name → TOML text), each problem naming its
/// file: bad names, files that do not parse, and what only the files together show
/// (routes naming receivers no file declares). Empty: they may be stored.
pub fn check_problems(checks: &BTreeMap<String, String>) -> Vec<String> {
    let mut problems = Vec::new();
    let mut alerting_files = Vec::new();
    let mut export_files = Vec::new();
    for (name, text) in checks {
        if !valid_file_name(name) {
            problems.push(format!(
                "{name}: check file names are letters, digits, '-' and '_' before .toml"
            ));
            continue;
        }
        let path = PathBuf::from(name);
        match parse_file_with_collectors(&path, text)
            .and_then(|_| crate::alerts::config::parse_file(text))
            .and_then(|a| Ok((a, crate::export::config::parse_file(text)?)))
        {
            Ok((a, e)) => {
                alerting_files.push((path.clone(), a));
                export_files.push((path, e));
            }
            Err(e) => problems.push(format!("{name}: {e}")),
        }
    }
    let (_, across) = crate::alerts::config::AlertConfig::assemble(
        alerting_files.iter().map(|(p, a)| (p.as_path(), a)),
    );
    problems.extend(across);
    let (_, across) = crate::export::config::assemble(
        export_files
            .iter()
            .map(|(p, e)| (p.as_path(), e.as_slice())),
    );
    problems.extend(across);
    problems
}

/// The check files NATS holds for `tenant`.
pub async fn fleet_checks(nats: &Nats, tenant: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let (config, plugins) = open(nats, tenant).await?;
    Ok(read_fleet(&nats.client, &config, &plugins, tenant)
        .await?
        .0
        .checks)
}

/// Make NATS hold exactly `checks` as `tenant`'s check files (its plugins as they are;
/// nothing changes with `dry_run`). The caller has found no [`check_problems`].
pub async fn push_checks(
    nats: &Nats,
    tenant: &str,
    checks: &BTreeMap<String, String>,
    dry_run: bool,
) -> anyhow::Result<Pushed> {
    let (config, plugins) = open(nats, tenant).await?;
    let (current, refused) = read_fleet(&nats.client, &config, &plugins, tenant).await?;
    let wanted = Snapshot {
        checks: checks.clone(),
        plugins: current.plugins.clone(),
    };
    let mut diff = diff(&current, &wanted);
    for key in &refused.keys {
        let _ = writeln!(diff, "- key {key:?} (not a valid check file name; removed)");
    }
    let changes = diff.lines().filter(|l| !l.starts_with("    ")).count();
    if dry_run || changes == 0 {
        return Ok(Pushed { diff, changes });
    }
    let prefix = checks_prefix(tenant);
    for (name, text) in &wanted.checks {
        if current.checks.get(name) != Some(text) {
            config
                .put(format!("{prefix}{name}"), text.clone().into_bytes().into())
                .await
                .with_context(|| format!("cannot store {name}"))?;
        }
    }
    for name in absent(&current.checks, &wanted.checks).chain(&refused.keys) {
        let key = if refused.keys.contains(name) {
            name.clone()
        } else {
            format!("{prefix}{name}")
        };
        config
            .delete(&key)
            .await
            .with_context(|| format!("cannot remove {key}"))?;
    }
    Ok(Pushed { diff, changes })
}

/// The keys of `store` that start with `prefix` (which ends with `.`), deleted ones left
/// out: one tenant's, never the whole bucket with every tenant's keys in it. Within 30 s
/// (a key deleted while it is listed could otherwise leave the listing waiting).
async fn keys_under(
    client: &async_nats::Client,
    store: &kv::Store,
    prefix: &str,
) -> anyhow::Result<Vec<String>> {
    let consumer = crate::nats::key_consumer(client, store, &format!("{prefix}>"), true).await?;
    let mut keys = Vec::new();
    if consumer.cached_info().num_pending == 0 {
        return Ok(keys);
    }
    let mut messages = consumer.messages().await?;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let message = match tokio::time::timeout_at(deadline, messages.next()).await {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(_) => anyhow::bail!(
                "listing {prefix}* in {} did not finish within 30 s",
                store.name
            ),
        };
        let message = message?;
        let info = message.info().map_err(|e| anyhow::anyhow!("{e}"))?;
        let pending = info.pending;
        let deleted = message
            .headers
            .as_ref()
            .and_then(|h| h.get("KV-Operation"))
            .is_some_and(|op| matches!(op.as_str(), "DEL" | "PURGE"));
        if let Some(key) = message.subject.as_str().strip_prefix(store.prefix.as_str()) {
            if !deleted {
                keys.push(key.to_string());
            }
        }
        if pending == 0 {
            break;
        }
    }
    Ok(keys)
}

/// Open (creating if needed) the config bucket and the tenant's plugin store.
pub async fn open(
    nats: &Nats,
    tenant: &str,
) -> anyhow::Result<(kv::Store, object_store::ObjectStore)> {
    let js = &nats.js;
    let config = crate::nats::ensure_bucket(
        js,
        kv::Config {
            bucket: CONFIG_BUCKET.into(),
            description: "Outpost check files per tenant".into(),
            history: 10,
            storage: async_nats::jetstream::stream::StorageType::File,
            num_replicas: nats.settings.replicas,
            ..Default::default()
        },
    )
    .await?;
    let plugins = crate::nats::ensure_object_store(
        js,
        object_store::Config {
            bucket: plugins_bucket(tenant),
            description: Some(format!("Outpost plugins of tenant {tenant}")),
            storage: async_nats::jetstream::stream::StorageType::File,
            num_replicas: nats.settings.replicas,
            ..Default::default()
        },
    )
    .await?;
    Ok((config, plugins))
}

/// What NATS holds for the tenant now (plugins by digest only), and the keys and objects
/// whose names were refused (logged, never written anywhere; `push` removes them).
pub async fn read_fleet(
    client: &async_nats::Client,
    config: &kv::Store,
    plugins: &object_store::ObjectStore,
    tenant: &str,
) -> anyhow::Result<(Snapshot, Refused)> {
    let mut snap = Snapshot::default();
    let mut refused = Refused::default();
    let prefix = checks_prefix(tenant);
    for key in keys_under(client, config, &prefix)
        .await
        .context("cannot list the config bucket")?
    {
        let name = match check_file_of_key(&key, &prefix) {
            None => continue,
            Some(Ok(name)) => name,
            Some(Err(why)) => {
                tracing::warn!(%why, "ignoring a check file in NATS");
                refused.keys.push(key.clone());
                continue;
            }
        };
        if let Some(value) = config.get(&key).await.context("cannot read a check file")? {
            snap.checks.insert(
                name.to_string(),
                String::from_utf8_lossy(&value).into_owned(),
            );
        }
    }
    let mut list = plugins
        .list()
        .await
        .context("cannot list the plugin store")?;
    while let Some(info) = list.next().await {
        let info = info.context("cannot list the plugin store")?;
        if info.deleted {
            continue;
        }
        if let Err(why) = plugin_of_object(&info.name) {
            tracing::warn!(%why, "ignoring a plugin in NATS");
            refused.objects.push(info.name.clone());
            continue;
        }
        snap.plugins.insert(
            info.name.clone(),
            Plugin {
                sha256: info.metadata.get("sha256").cloned().unwrap_or_default(),
                size: info.size as u64,
                bytes: Vec::new(),
            },
        );
    }
    Ok((snap, refused))
}

/// KV keys and object names in NATS that no gateway will mirror (see [`read_fleet`]).
#[derive(Debug, Default)]
pub struct Refused {
    pub keys: Vec<String>,
    pub objects: Vec<String>,
}

/// A readable diff from `old` to `new`; empty when they hold the same.
pub fn diff(old: &Snapshot, new: &Snapshot) -> String {
    let mut out = String::new();
    let names: std::collections::BTreeSet<&String> =
        old.checks.keys().chain(new.checks.keys()).collect();
    for name in names {
        match (old.checks.get(name), new.checks.get(name)) {
            (None, Some(text)) => {
                let _ = writeln!(out, "+ {name} (new, {} lines)", text.lines().count());
                for line in text.lines() {
                    let _ = writeln!(out, "    + {line}");
                }
            }
            (Some(_), None) => {
                let _ = writeln!(out, "- {name} (removed)");
            }
            (Some(a), Some(b)) if a != b => {
                let _ = writeln!(out, "~ {name}");
                let d = similar::TextDiff::from_lines(a.as_str(), b.as_str());
                for change in d.iter_all_changes() {
                    let sign = match change.tag() {
                        similar::ChangeTag::Delete => '-',
                        similar::ChangeTag::Insert => '+',
                        similar::ChangeTag::Equal => continue,
                    };
                    let _ = writeln!(out, "    {sign} {}", change.value().trim_end_matches('\n'));
                }
            }
            _ => {}
        }
    }
    let names: std::collections::BTreeSet<&String> =
        old.plugins.keys().chain(new.plugins.keys()).collect();
    for name in names {
        match (old.plugins.get(name), new.plugins.get(name)) {
            (None, Some(p)) => {
                let _ = writeln!(
                    out,
                    "+ plugins/{name} ({} bytes, sha256 {})",
                    p.size,
                    short(&p.sha256)
                );
            }
            (Some(_), None) => {
                let _ = writeln!(out, "- plugins/{name} (removed)");
            }
            // A size that differs with the same digest is a damaged object: pushed again.
            (Some(a), Some(b)) if a.sha256 != b.sha256 || a.size != b.size => {
                let _ = writeln!(
                    out,
                    "~ plugins/{name} (sha256 {} -> {}, {} -> {} bytes)",
                    short(&a.sha256),
                    short(&b.sha256),
                    a.size,
                    b.size
                );
            }
            _ => {}
        }
    }
    out
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}

/// What `push` did.
pub struct Pushed {
    pub diff: String,
    pub changes: usize,
}

/// Make NATS hold exactly `dir` for `tenant` (nothing changes with `dry_run`).
pub async fn push(nats: &Nats, tenant: &str, dir: &Path, dry_run: bool) -> anyhow::Result<Pushed> {
    let wanted = read_dir(dir)?;
    let (config, plugins) = open(nats, tenant).await?;
    let (current, refused) = read_fleet(&nats.client, &config, &plugins, tenant).await?;
    let mut diff = diff(&current, &wanted);
    // Names no gateway mirrors are not ours to keep: a push removes them.
    for key in &refused.keys {
        let _ = writeln!(diff, "- key {key:?} (not a valid check file name; removed)");
    }
    for name in &refused.objects {
        let _ = writeln!(
            diff,
            "- plugin object {name:?} (not a valid plugin name; removed)"
        );
    }
    let changes = diff.lines().filter(|l| !l.starts_with("    ")).count();
    if dry_run || changes == 0 {
        return Ok(Pushed { diff, changes });
    }
    // Plugins first, so a check that names a new plugin never finds it missing.
    for (name, p) in &wanted.plugins {
        if current
            .plugins
            .get(name)
            .is_some_and(|c| c.sha256 == p.sha256 && c.size == p.size)
        {
            continue;
        }
        let meta = object_store::ObjectMetadata {
            name: name.clone(),
            metadata: [("sha256".to_string(), p.sha256.clone())].into(),
            ..Default::default()
        };
        plugins
            .put(meta, &mut p.bytes.as_slice())
            .await
            .with_context(|| format!("cannot store plugin {name}"))?;
    }
    let prefix = checks_prefix(tenant);
    for (name, text) in &wanted.checks {
        if current.checks.get(name) != Some(text) {
            config
                .put(format!("{prefix}{name}"), text.clone().into_bytes().into())
                .await
                .with_context(|| format!("cannot store {name}"))?;
        }
    }
    for name in absent(&current.checks, &wanted.checks) {
        config
            .delete(format!("{prefix}{name}"))
            .await
            .with_context(|| format!("cannot remove {name}"))?;
    }
    for key in &refused.keys {
        config
            .delete(key)
            .await
            .with_context(|| format!("cannot remove key {key:?}"))?;
    }
    for name in absent(&current.plugins, &wanted.plugins).chain(&refused.objects) {
        plugins
            .delete(name)
            .await
            .with_context(|| format!("cannot remove plugin {name}"))?;
    }
    Ok(Pushed { diff, changes })
}

/// The names in `have` that `want` does not hold.
fn absent<'a, V, W>(
    have: &'a BTreeMap<String, V>,
    want: &'a BTreeMap<String, W>,
) -> impl Iterator<Item = &'a String> {
    have.keys().filter(|n| !want.contains_key(*n))
}

/// Write what NATS holds for the tenant into the mirror directories (and remove what it
/// does not hold), before the check store first reads them.
pub async fn sync_once(
    nats: &Nats,
    tenant: &str,
    checks_dir: &Path,
    plugins_dir: &Path,
) -> anyhow::Result<()> {
    let (config, plugins) = open(nats, tenant).await?;
    let (fleet, _) = read_fleet(&nats.client, &config, &plugins, tenant).await?;
    prune(checks_dir, |n| fleet.checks.contains_key(n))?;
    prune(plugins_dir, |n| fleet.plugins.contains_key(n))?;
    for (name, text) in &fleet.checks {
        write_atomic(&checks_dir.join(name), text.as_bytes(), 0o644)?;
    }
    for (name, p) in &fleet.plugins {
        // A plugin that is too large or does not match its digest is left out (and
        // logged); the check store then reports the checks that name it.
        match fetch_plugin(&plugins, name, p.size as usize, &p.sha256).await? {
            Fetched::Bytes(bytes) => write_atomic(&plugins_dir.join(name), &bytes, 0o755)?,
            Fetched::Refused(why) => tracing::error!(%why, "plugin not mirrored"),
        }
    }
    tracing::info!(
        check_files = fleet.checks.len(),
        plugins = fleet.plugins.len(),
        "fleet configuration loaded from NATS"
    );
    Ok(())
}

/// The mirror's name in [`crate::health::Health`].
pub const MIRROR_TASK: &str = "fleet config mirror";

/// The tenant's check files and plugins in NATS, mirrored into the local directories the
/// check store reads.
#[derive(Clone)]
pub struct Mirror {
    /// Its name in [`Health`]: [`MIRROR_TASK`] for the home tenant, one per tenant.
    pub task: &'static str,
    pub nats: Arc<Nats>,
    pub tenant: String,
    pub checks_dir: PathBuf,
    pub plugins_dir: PathBuf,
    pub health: Arc<Health>,
    pub shutdown: CancellationToken,
}

impl Mirror {
    /// Mirror until shutdown. Files not in NATS are removed at the start.
    pub async fn run(self) {
        let Mirror {
            task,
            nats,
            tenant,
            checks_dir,
            plugins_dir,
            health,
            shutdown,
        } = self;
        mirror(
            task,
            nats,
            tenant,
            checks_dir,
            plugins_dir,
            health,
            shutdown,
        )
        .await
    }
}

async fn mirror(
    task: &'static str,
    nats: Arc<Nats>,
    tenant: String,
    checks_dir: PathBuf,
    plugins_dir: PathBuf,
    health: Arc<Health>,
    shutdown: CancellationToken,
) {
    loop {
        let run = async {
            let (config, plugins) = open(&nats, &tenant).await?;
            let (fleet, _) = read_fleet(&nats.client, &config, &plugins, &tenant).await?;
            prune(&checks_dir, |n| fleet.checks.contains_key(n))?;
            prune(&plugins_dir, |n| fleet.plugins.contains_key(n))?;
            let prefix = checks_prefix(&tenant);
            let mut checks = crate::nats::watch_keys(&nats.client, &config, &format!("{prefix}>"))
                .await
                .context("cannot watch the config bucket")?;
            let mut objects = plugins
                .watch_with_history()
                .await
                .context("cannot watch the plugin store")?;
            health.ok(task);
            loop {
                tokio::select! {
                    e = checks.next() => {
                        let e = e.context("config watch ended")?.context("config watch")?;
                        let name = match check_file_of_key(&e.key, &prefix) {
                            None => continue,
                            Some(Ok(name)) => name,
                            Some(Err(why)) => {
                                tracing::warn!(%why, "ignoring a check file in NATS");
                                continue;
                            }
                        };
                        let path = checks_dir.join(name);
                        match e.operation {
                            kv::Operation::Put => write_atomic(&path, &e.value, 0o644)?,
                            _ => remove(&path)?,
                        }
                        tracing::info!(file = name, op = ?e.operation, "fleet check file changed");
                    }
                    info = objects.next() => {
                        let info = info.context("plugin watch ended")?.context("plugin watch")?;
                        if let Err(why) = plugin_of_object(&info.name) {
                            tracing::warn!(%why, "ignoring a plugin in NATS");
                            continue;
                        }
                        let path = plugins_dir.join(&info.name);
                        if info.deleted {
                            remove(&path)?;
                        } else {
                            let sha = info.metadata.get("sha256").map(String::as_str).unwrap_or_default();
                            // A NATS error ends this run (`?`): the next one fetches
                            // everything again. A refusal is final for this version.
                            match fetch_plugin(&plugins, &info.name, info.size, sha).await? {
                                Fetched::Bytes(bytes) => write_atomic(&path, &bytes, 0o755)?,
                                Fetched::Refused(why) => {
                                    // The old version, if any, must not stay as if current.
                                    remove(&path)?;
                                    tracing::error!(%why, "plugin not mirrored");
                                    continue;
                                }
                            }
                        }
                        tracing::info!(plugin = %info.name, deleted = info.deleted, "fleet plugin changed");
                    }
                    _ = shutdown.cancelled() => return Ok::<(), anyhow::Error>(()),
                }
            }
        };
        match run.await {
            Ok(()) => return,
            Err(e) => {
                let why = format!("{e:#}");
                health.failing(task, why.clone());
                tracing::error!(error = %why, "mirroring the fleet configuration failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
        }
    }
}

fn remove(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn prune(dir: &Path, keep: impl Fn(&str) -> bool) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if path.is_file() && !keep(&name) {
            remove(&path)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_with_a_bad_file_is_refused_with_every_problem_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("good.toml"),
            "[[check]]\nname='a'\ncommand='/bin/true'\ninterval=10\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("bad.toml"),
            "[[check]]\nname='b'\ncommand=\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("sp ace.toml"), "").unwrap();
        std::fs::create_dir(dir.path().join("plugins")).unwrap();
        std::fs::write(dir.path().join("plugins/ok_plugin"), "#!/bin/sh\n").unwrap();
        let err = format!("{:#}", read_dir(dir.path()).unwrap_err());
        assert!(err.contains("is not pushed"), "{err}");
        assert!(err.contains("bad.toml:"), "{err}");
        assert!(err.contains("sp ace.toml:"), "{err}");
        assert!(!err.contains("good.toml"), "{err}");
        std::fs::remove_file(dir.path().join("bad.toml")).unwrap();
        std::fs::remove_file(dir.path().join("sp ace.toml")).unwrap();
        let snap = read_dir(dir.path()).unwrap();
        assert_eq!(snap.checks.len(), 1);
        assert_eq!(snap.plugins["ok_plugin"].size, 10);
    }

    #[test]
    fn the_diff_shows_added_changed_and_removed_files_and_plugins() {
        let plugin = |sha: &str| Plugin {
            sha256: sha.into(),
            size: 3,
            bytes: Vec::new(),
        };
        let old = Snapshot {
            checks: [
                ("a.toml".into(), "x = 1\ny = 2\n".into()),
                ("gone.toml".into(), "z\n".into()),
            ]
            .into(),
            plugins: [("p".into(), plugin("aaaa")), ("q".into(), plugin("bbbb"))].into(),
        };
        let new = Snapshot {
            checks: [
                ("a.toml".into(), "x = 1\ny = 3\n".into()),
                ("new.toml".into(), "n\n".into()),
            ]
            .into(),
            plugins: [("p".into(), plugin("cccc")), ("q".into(), plugin("bbbb"))].into(),
        };
        let d = diff(&old, &new);
        assert_eq!(
            d,
            "~ a.toml\n    - y = 2\n    + y = 3\n- gone.toml (removed)\n+ new.toml (new, 1 lines)\n    + n\n~ plugins/p (sha256 aaaa -> cccc, 3 -> 3 bytes)\n"
        );
        assert_eq!(diff(&new, &new), "");
    }
}
