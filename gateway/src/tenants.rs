//! The tenants one gateway fleet serves, their enrollment keys and their API tokens: the
//! records ([`Record`]), where they are kept ([`TenantStore`]: a file in the data
//! directory, or the fleet's `outpost_tenants` bucket in NATS, both held to one contract
//! test in `tests/tests/store_contract.rs`), and the rules for using them, once, in
//! [`Tenants`]: which tenant an enrollment key or API token belongs to, whether it may
//! still be used, what a role allows.
//!
//! Every check is made against an in-memory copy, so an API call or an enrollment costs a
//! hash and a map lookup, not a round trip. The copy follows the store: on the embedded
//! bus this gateway is the only writer; in a fleet every gateway follows the bucket
//! (`crate::nats::tenants::follow`), so a token revoked through one gateway is refused by
//! the others as soon as they read the change (milliseconds).
//!
//! Keys and tokens are shown once, when created, and kept only as SHA-256: whoever reads
//! the store (a backup, the NATS account) cannot use them. Their form is
//! `<kind>.<id>.<secret>` (`ek` for an enrollment key, `at` for an API token): the id
//! finds the record, the secret's hash is compared in constant time.

use outpost_sys::lock;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use anyhow::Context;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::secrets::{Revision, StoreError};
use crate::util::{constant_time_eq, now_ms, random_token, write_atomic};

/// What an API token may do. Each role includes the ones before it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Agents, their checks and results.
    Read,
    /// Read, and run-now (later: silences and acks).
    Operate,
    /// Operate, and the tenant's checks, enrollment keys, tokens and agents.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Operate => "operate",
            Role::Admin => "admin",
        }
    }
}

/// A tenant's limits; `None` is unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Enrolled agents (revoked ones count until they are forgotten).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agents: Option<u64>,
    /// Results accepted per second, over all its agents: the fleet's, shared by its live
    /// gateways (each takes its share); beyond it their acks are held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub results_per_sec: Option<u64>,
    /// Bytes of its results the bus keeps (each embedded bus; the fleet's NATS stream of
    /// the tenant): beyond it the tenant's oldest results are deleted, never another
    /// tenant's, and new ones are always taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bus_bytes: Option<u64>,
}

/// The smallest `bus_bytes`: one segment of the embedded bus.
pub const MIN_BUS_BYTES: u64 = 64 * 1024;

impl Limits {
    /// What is wrong with these limits, naming the fix.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.bus_bytes.is_some_and(|b| b < MIN_BUS_BYTES) {
            problems.push(format!(
                "limits.bus_bytes: at least {MIN_BUS_BYTES} (64 KiB)"
            ));
        }
        if self.bus_bytes.is_some_and(|b| b > i64::MAX as u64) {
            problems.push(format!("limits.bus_bytes: at most {}", i64::MAX));
        }
        problems
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tenant {
    pub name: String,
    /// Made at creation: an agent's credential names the tenant it enrolled in by this id,
    /// so a tenant deleted and made again under the same name does not let the old one's
    /// agents in. Empty for a home tenant adopted from before tenants.
    #[serde(default)]
    pub id: String,
    /// A gateway's home tenant (`--tenant`): it cannot be deleted (the gateway would make
    /// it again at its next start, with its old key and token).
    #[serde(default)]
    pub home: bool,
    pub enabled: bool,
    #[serde(default)]
    pub limits: Limits,
    pub created_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollKey {
    pub id: String,
    pub tenant: String,
    pub sha256: String,
    /// What it is for (`"datacenter 2 web servers"`).
    #[serde(default)]
    pub name: String,
    pub created_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_enrollments: Option<u64>,
    /// Agents enrolled with it so far.
    #[serde(default)]
    pub enrollments: u64,
    /// Given to every agent that enrolls with it (they win over the agent's own).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiToken {
    pub id: String,
    pub tenant: String,
    pub sha256: String,
    pub role: Role,
    #[serde(default)]
    pub name: String,
    pub created_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at_ms: Option<u64>,
}

/// One stored record. Its key in the store is [`Record::key`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    Tenant(Tenant),
    EnrollKey(EnrollKey),
    ApiToken(ApiToken),
}

/// The store key of a tenant (`tenant.<name>`), enrollment key (`key.<id>`) or API token
/// (`token.<id>`).
pub fn tenant_key(name: &str) -> String {
    format!("tenant.{name}")
}
pub fn enroll_key_key(id: &str) -> String {
    format!("key.{id}")
}
pub fn token_key(id: &str) -> String {
    format!("token.{id}")
}

impl Record {
    pub fn key(&self) -> String {
        match self {
            Record::Tenant(t) => tenant_key(&t.name),
            Record::EnrollKey(k) => enroll_key_key(&k.id),
            Record::ApiToken(t) => token_key(&t.id),
        }
    }
}

/// Where tenant records are kept. Every write names the revision it replaces (`None`: the
/// record must not exist), so two gateways changing one record at once cannot both win.
#[async_trait]
pub trait TenantStore: Send + Sync {
    async fn get(&self, key: &str) -> Result<Option<(Record, Revision)>, StoreError>;
    /// Durable when this returns; the new revision.
    async fn put(
        &self,
        record: &Record,
        expected: Option<Revision>,
    ) -> Result<Revision, StoreError>;
    /// Removing what is not there is no error.
    async fn delete(&self, key: &str) -> Result<(), StoreError>;
    /// Every record, with its revision.
    async fn list(&self) -> Result<Vec<(Record, Revision)>, StoreError>;
}

/// Tenant records in `DATA_DIR/tenants.json`, rewritten atomically on each change (mode
/// 0600: it holds hashes only, but names every tenant).
pub struct FileTenants {
    path: PathBuf,
    records: Mutex<FileRecords>,
}

#[derive(Default)]
struct FileRecords {
    by_key: BTreeMap<String, (Record, Revision)>,
    last: Revision,
}

impl FileTenants {
    /// The store in `data_dir`. A corrupt file is an error naming it.
    pub fn open(data_dir: &Path) -> anyhow::Result<FileTenants> {
        let path = data_dir.join("tenants.json");
        let stored: Vec<Record> = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
                format!(
                    "tenants file {} is corrupt; restore it from a backup",
                    path.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let mut records = FileRecords::default();
        for record in stored {
            records.last += 1;
            records.by_key.insert(record.key(), (record, records.last));
        }
        Ok(FileTenants {
            path,
            records: Mutex::new(records),
        })
    }

    /// Apply `change` to the records and write them; on a failed write nothing changes.
    fn write(
        &self,
        records: &mut FileRecords,
        key: &str,
        new: Option<(Record, Revision)>,
    ) -> Result<(), StoreError> {
        let previous = match new {
            Some(entry) => records.by_key.insert(key.to_string(), entry),
            None => records.by_key.remove(key),
        };
        let stored: Vec<&Record> = records.by_key.values().map(|(r, _)| r).collect();
        let saved = serde_json::to_vec_pretty(&stored)
            .map_err(std::io::Error::other)
            .and_then(|bytes| write_atomic(&self.path, &bytes, 0o600));
        if let Err(e) = saved {
            match previous {
                Some(p) => records.by_key.insert(key.to_string(), p),
                None => records.by_key.remove(key),
            };
            return Err(StoreError::Unavailable(format!(
                "cannot write {}: {e}",
                self.path.display()
            )));
        }
        Ok(())
    }
}

#[async_trait]
impl TenantStore for FileTenants {
    async fn get(&self, key: &str) -> Result<Option<(Record, Revision)>, StoreError> {
        Ok(lock(&self.records).by_key.get(key).cloned())
    }

    async fn put(
        &self,
        record: &Record,
        expected: Option<Revision>,
    ) -> Result<Revision, StoreError> {
        let key = record.key();
        let mut records = lock(&self.records);
        if records.by_key.get(&key).map(|(_, rev)| *rev) != expected {
            return Err(StoreError::Conflict);
        }
        let revision = records.last + 1;
        self.write(&mut records, &key, Some((record.clone(), revision)))?;
        records.last = revision;
        Ok(revision)
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let mut records = lock(&self.records);
        if !records.by_key.contains_key(key) {
            return Ok(());
        }
        self.write(&mut records, key, None)
    }

    async fn list(&self) -> Result<Vec<(Record, Revision)>, StoreError> {
        Ok(lock(&self.records).by_key.values().cloned().collect())
    }
}

pub fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// Who is calling the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The fleet operator: manages tenants, sees no tenant's agents.
    Operator,
    Tenant {
        tenant: String,
        role: Role,
    },
}

/// Why a key or token was refused. The message goes to the caller; none names another
/// tenant or says whether an id exists.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("enrollment key refused: it is not a valid enrollment key of this fleet")]
    BadEnrollKey,
    #[error("enrollment key {0} was revoked: ask the tenant's administrator for a current key")]
    EnrollKeyRevoked(String),
    #[error("enrollment key {0} has expired: ask the tenant's administrator for a current key")]
    EnrollKeyExpired(String),
    #[error("enrollment key {0} has enrolled its maximum number of agents: ask the tenant's administrator for another key")]
    EnrollKeyUsedUp(String),
    #[error(
        "tenant {0} is disabled: its agents and tokens are refused until an operator enables it"
    )]
    TenantDisabled(String),
    #[error("API token refused")]
    BadToken,
}

/// What a valid enrollment key grants the agent that presents it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub tenant: String,
    /// The tenant's [`Tenant::id`].
    pub tenant_id: String,
    /// Whether the key has a maximum number of enrollments.
    pub limited: bool,
    pub key_id: String,
    pub labels: BTreeMap<String, String>,
}

#[derive(Default)]
struct Snapshot {
    tenants: HashMap<String, (Tenant, Revision)>,
    keys: HashMap<String, (EnrollKey, Revision)>,
    tokens: HashMap<String, (ApiToken, Revision)>,
}

impl Snapshot {
    fn apply(&mut self, key: &str, record: Option<(Record, Revision)>) {
        match record {
            Some((Record::Tenant(t), rev)) => {
                self.tenants.insert(t.name.clone(), (t, rev));
            }
            Some((Record::EnrollKey(k), rev)) => {
                self.keys.insert(k.id.clone(), (k, rev));
            }
            Some((Record::ApiToken(t), rev)) => {
                self.tokens.insert(t.id.clone(), (t, rev));
            }
            None => match key.split_once('.') {
                Some(("tenant", name)) => drop(self.tenants.remove(name)),
                Some(("key", id)) => drop(self.keys.remove(id)),
                Some(("token", id)) => drop(self.tokens.remove(id)),
                _ => {}
            },
        }
    }
}

/// A key or token as given to its holder: `<kind>.<id>.<secret>`.
fn split_secret<'a>(kind: &str, given: &'a str) -> Option<(&'a str, &'a str)> {
    let rest = given.strip_prefix(kind)?.strip_prefix('.')?;
    rest.split_once('.')
}

/// The id of a key or token made from a data directory's `enroll.key` or `api.token` (the
/// releases before tenants): the tenant's first key and its admin token.
pub fn legacy_id(tenant: &str) -> String {
    format!("legacy-{tenant}")
}

/// How long a gateway starting waits for its tenant store to answer.
const OPEN_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

/// The tenants, keys and tokens, and the rules for using them.
pub struct Tenants {
    store: Arc<dyn TenantStore>,
    snapshot: RwLock<Snapshot>,
    operator_sha256: String,
    /// This gateway's home tenant: its key and token from before tenants win over another
    /// tenant's with the same hash.
    home: String,
    /// Bumped whenever a tenant record changes here or from another gateway.
    changed: tokio::sync::watch::Sender<u64>,
}

impl Tenants {
    /// The directory over `store`, read into memory. `operator_token` is the fleet
    /// operator's credential (see [`Caller::Operator`]).
    pub async fn open(
        store: Arc<dyn TenantStore>,
        operator_token: &str,
        home: &str,
    ) -> anyhow::Result<Tenants> {
        let tenants = Tenants {
            store,
            snapshot: RwLock::default(),
            operator_sha256: sha256_hex(operator_token),
            home: home.to_string(),
            changed: tokio::sync::watch::Sender::new(0),
        };
        // A store that cannot answer yet (a NATS cluster electing its leaders while this
        // gateway starts) is asked again for a while rather than failing the start.
        let deadline = std::time::Instant::now() + OPEN_PATIENCE;
        let mut wait = std::time::Duration::from_millis(250);
        loop {
            match tenants.reload().await {
                Ok(()) => return Ok(tenants),
                Err(e) if std::time::Instant::now() + wait < deadline => {
                    tracing::warn!(error = %format!("{e:#}"), "cannot read the tenants yet; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(std::time::Duration::from_secs(4));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Read every record again (after a follow restarts, or to catch up).
    pub async fn reload(&self) -> anyhow::Result<()> {
        let all = self
            .store
            .list()
            .await
            .map_err(|e| anyhow::anyhow!("cannot read the tenants: {e}"))?;
        let mut fresh = Snapshot::default();
        for (record, rev) in all {
            fresh.apply(&record.key(), Some((record, rev)));
        }
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        self.changed.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Wakes whenever a tenant (not a key or token) is made, changed or deleted.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// A change another gateway made (`None`: the record was deleted).
    pub fn apply(&self, key: &str, record: Option<(Record, Revision)>) {
        let mut snapshot = self.snapshot.write().unwrap_or_else(|e| e.into_inner());
        // A stale change (an older revision than the one held) is ignored.
        if let Some((_, rev)) = &record {
            let held = match key.split_once('.') {
                Some(("tenant", n)) => snapshot.tenants.get(n).map(|(_, r)| *r),
                Some(("key", id)) => snapshot.keys.get(id).map(|(_, r)| *r),
                Some(("token", id)) => snapshot.tokens.get(id).map(|(_, r)| *r),
                _ => None,
            };
            if held.is_some_and(|h| h > *rev) {
                return;
            }
        }
        snapshot.apply(key, record);
        drop(snapshot);
        if key.starts_with("tenant.") {
            self.changed.send_modify(|n| *n += 1);
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Snapshot> {
        self.snapshot.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn store(&self) -> &Arc<dyn TenantStore> {
        &self.store
    }

    /// Whether `name` is a tenant that may be used now.
    pub fn enabled(&self, name: &str) -> Result<(), Refusal> {
        match self.read().tenants.get(name) {
            Some((t, _)) if t.enabled => Ok(()),
            Some(_) => Err(Refusal::TenantDisabled(name.to_string())),
            None => Err(Refusal::TenantDisabled(name.to_string())),
        }
    }

    /// `name`'s limits (none for a tenant that does not exist).
    pub fn limits(&self, name: &str) -> Limits {
        self.read()
            .tenants
            .get(name)
            .map(|(t, _)| t.limits.clone())
            .unwrap_or_default()
    }

    pub fn tenant(&self, name: &str) -> Option<Tenant> {
        self.read().tenants.get(name).map(|(t, _)| t.clone())
    }

    pub fn list_tenants(&self) -> Vec<Tenant> {
        let mut all: Vec<Tenant> = self
            .read()
            .tenants
            .values()
            .map(|(t, _)| t.clone())
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    pub fn list_keys(&self, tenant: &str) -> Vec<EnrollKey> {
        let mut all: Vec<EnrollKey> = self
            .read()
            .keys
            .values()
            .filter(|(k, _)| k.tenant == tenant)
            .map(|(k, _)| k.clone())
            .collect();
        all.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        all
    }

    pub fn list_tokens(&self, tenant: &str) -> Vec<ApiToken> {
        let mut all: Vec<ApiToken> = self
            .read()
            .tokens
            .values()
            .filter(|(t, _)| t.tenant == tenant)
            .map(|(t, _)| t.clone())
            .collect();
        all.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        all
    }

    /// Whether `token` is the fleet operator's.
    pub fn is_operator(&self, token: &str) -> bool {
        constant_time_eq(
            sha256_hex(token).as_bytes(),
            self.operator_sha256.as_bytes(),
        )
    }

    /// Who `token` is: the operator, a tenant's token with its role, or nobody.
    pub fn authenticate(&self, token: &str) -> Result<Caller, Refusal> {
        let hash = sha256_hex(token);
        if constant_time_eq(hash.as_bytes(), self.operator_sha256.as_bytes()) {
            return Ok(Caller::Operator);
        }
        let snapshot = self.read();
        let found = match split_secret("at", token) {
            Some((id, _)) => snapshot.tokens.get(id).map(|(t, _)| t),
            // A token from before tenants (`api.token`).
            None => self.legacy(
                snapshot.tokens.values().map(|(t, _)| (&t.id, &t.sha256, t)),
                &hash,
            ),
        };
        let Some(found) = found else {
            return Err(Refusal::BadToken);
        };
        if !constant_time_eq(hash.as_bytes(), found.sha256.as_bytes())
            || found.revoked_at_ms.is_some()
        {
            return Err(Refusal::BadToken);
        }
        match snapshot.tenants.get(&found.tenant) {
            Some((t, _)) if t.enabled => Ok(Caller::Tenant {
                tenant: found.tenant.clone(),
                role: found.role,
            }),
            _ => Err(Refusal::TenantDisabled(found.tenant.clone())),
        }
    }

    /// The key or token from before tenants whose hash is `hash`: the home tenant's if it
    /// is one of them, else the only one; none when several tenants hold it (data
    /// directories copied between gateways of different homes), which is logged.
    fn legacy<'a, T>(
        &self,
        records: impl Iterator<Item = (&'a String, &'a String, &'a T)>,
        hash: &str,
    ) -> Option<&'a T> {
        let home = legacy_id(&self.home);
        let matching: Vec<(&String, &T)> = records
            .filter(|(id, sha, _)| {
                id.starts_with("legacy-") && constant_time_eq(sha.as_bytes(), hash.as_bytes())
            })
            .map(|(id, _, r)| (id, r))
            .collect();
        if let Some((_, r)) = matching.iter().find(|(id, _)| **id == home) {
            return Some(r);
        }
        match matching.as_slice() {
            [(_, r)] => Some(r),
            [] => None,
            several => {
                let ids: Vec<&String> = several.iter().map(|(id, _)| *id).collect();
                tracing::error!(?ids, "a key or token from before tenants is the same in several tenants; refused: give each gateway its own enroll.key and api.token, or use keys and tokens made through the API");
                None
            }
        }
    }

    /// Which tenant the enrollment key `key` enrolls into, if it may enroll one more agent
    /// now. Counting the enrollment is [`Tenants::count_enrollment`], once it happened.
    pub fn enrollment(&self, key: &str) -> Result<Grant, Refusal> {
        let hash = sha256_hex(key);
        let snapshot = self.read();
        let found = match split_secret("ek", key) {
            Some((id, _)) => snapshot.keys.get(id).map(|(k, _)| k),
            None => self.legacy(
                snapshot.keys.values().map(|(k, _)| (&k.id, &k.sha256, k)),
                &hash,
            ),
        };
        let Some(found) = found else {
            return Err(Refusal::BadEnrollKey);
        };
        if !constant_time_eq(hash.as_bytes(), found.sha256.as_bytes()) {
            return Err(Refusal::BadEnrollKey);
        }
        if found.revoked_at_ms.is_some() {
            return Err(Refusal::EnrollKeyRevoked(found.id.clone()));
        }
        if found.expires_at_ms.is_some_and(|at| at <= now_ms()) {
            return Err(Refusal::EnrollKeyExpired(found.id.clone()));
        }
        if found
            .max_enrollments
            .is_some_and(|max| found.enrollments >= max)
        {
            return Err(Refusal::EnrollKeyUsedUp(found.id.clone()));
        }
        match snapshot.tenants.get(&found.tenant) {
            Some((t, _)) if t.enabled => Ok(Grant {
                tenant: found.tenant.clone(),
                tenant_id: t.id.clone(),
                limited: found.max_enrollments.is_some(),
                key_id: found.id.clone(),
                labels: found.labels.clone(),
            }),
            _ => Err(Refusal::TenantDisabled(found.tenant.clone())),
        }
    }

    /// Count one enrollment made with key `id` (compare-and-set, so two gateways
    /// enrolling at once both count). A key at its maximum refuses: the caller then
    /// refuses the enrollment.
    pub async fn count_enrollment(&self, id: &str) -> Result<(), EnrollCount> {
        for _ in 0..10 {
            let Some((Record::EnrollKey(mut key), rev)) = self
                .store
                .get(&enroll_key_key(id))
                .await
                .map_err(EnrollCount::Store)?
            else {
                return Err(EnrollCount::Refused(Refusal::BadEnrollKey));
            };
            if key.revoked_at_ms.is_some() {
                return Err(EnrollCount::Refused(Refusal::EnrollKeyRevoked(key.id)));
            }
            if key
                .max_enrollments
                .is_some_and(|max| key.enrollments >= max)
            {
                return Err(EnrollCount::Refused(Refusal::EnrollKeyUsedUp(key.id)));
            }
            key.enrollments += 1;
            let record = Record::EnrollKey(key);
            match self.store.put(&record, Some(rev)).await {
                Ok(rev) => {
                    self.apply(&record.key(), Some((record, rev)));
                    return Ok(());
                }
                Err(StoreError::Conflict) => backoff().await,
                Err(e) => return Err(EnrollCount::Store(e)),
            }
        }
        Err(EnrollCount::Store(StoreError::Conflict))
    }

    /// Store `record` as new (`None`) or over revision `expected`, and hold it.
    async fn put(&self, record: Record, expected: Option<Revision>) -> Result<(), StoreError> {
        let rev = self.store.put(&record, expected).await?;
        self.apply(&record.key(), Some((record, rev)));
        Ok(())
    }

    /// Create tenant `name` (enabled) with `limits`.
    pub async fn create_tenant(&self, name: &str, limits: Limits) -> Result<Tenant, AdminError> {
        let tenant = Tenant {
            name: name.to_string(),
            id: random_token(8),
            home: false,
            enabled: true,
            limits,
            created_at_ms: now_ms(),
        };
        match self.put(Record::Tenant(tenant.clone()), None).await {
            Ok(()) => Ok(tenant),
            Err(StoreError::Conflict) => Err(AdminError::Exists(format!("tenant {name}"))),
            Err(e) => Err(AdminError::Store(e)),
        }
    }

    /// Change a tenant's `enabled` and `limits` (those given).
    pub async fn update_tenant(
        &self,
        name: &str,
        enabled: Option<bool>,
        limits: Option<Limits>,
    ) -> Result<Tenant, AdminError> {
        let missing = || AdminError::NotFound(format!("tenant {name}"));
        let record = self
            .modify(&tenant_key(name), missing, |record| match record {
                Record::Tenant(t) => {
                    if let Some(e) = enabled {
                        t.enabled = e;
                    }
                    if let Some(l) = &limits {
                        t.limits = l.clone();
                    }
                    true
                }
                _ => false,
            })
            .await?;
        match record {
            Record::Tenant(t) => Ok(t),
            _ => Err(missing()),
        }
    }

    /// Delete a disabled tenant with its keys and tokens. Its agents' credentials and
    /// records are the caller's to remove.
    pub async fn delete_tenant(&self, name: &str) -> Result<(), AdminError> {
        match self.tenant(name) {
            None => return Err(AdminError::NotFound(format!("tenant {name}"))),
            Some(t) if t.home => {
                return Err(AdminError::Conflict(format!(
                    "tenant {name} is a gateway's home tenant (--tenant): it holds the agents, key and token from before tenants, and that gateway would make it again at its next start"
                )))
            }
            Some(t) if t.enabled => {
                return Err(AdminError::Conflict(format!(
                    "tenant {name} is enabled: disable it first (PATCH with {{\"enabled\": false}}), then delete it"
                )))
            }
            Some(_) => {}
        }
        let owned: Vec<String> = {
            let s = self.read();
            s.keys
                .values()
                .filter(|(k, _)| k.tenant == name)
                .map(|(k, _)| enroll_key_key(&k.id))
                .chain(
                    s.tokens
                        .values()
                        .filter(|(t, _)| t.tenant == name)
                        .map(|(t, _)| token_key(&t.id)),
                )
                .collect()
        };
        for key in owned.iter().chain(std::iter::once(&tenant_key(name))) {
            self.store.delete(key).await.map_err(AdminError::Store)?;
            self.apply(key, None);
        }
        Ok(())
    }

    /// A new enrollment key of `tenant`: the record, and the key in clear (shown once).
    pub async fn create_key(
        &self,
        tenant: &str,
        new: NewKey,
    ) -> Result<(EnrollKey, String), AdminError> {
        self.known(tenant)?;
        let (id, secret) = (random_token(8), random_token(24));
        let clear = format!("ek.{id}.{secret}");
        let key = EnrollKey {
            id,
            tenant: tenant.to_string(),
            sha256: sha256_hex(&clear),
            name: new.name,
            created_at_ms: now_ms(),
            expires_at_ms: new.expires_at_ms,
            max_enrollments: new.max_enrollments,
            enrollments: 0,
            labels: new.labels,
            revoked_at_ms: None,
        };
        self.put(Record::EnrollKey(key.clone()), None)
            .await
            .map_err(AdminError::Store)?;
        Ok((key, clear))
    }

    /// A new API token of `tenant` with `role`: the record, and the token in clear (shown
    /// once).
    pub async fn create_token(
        &self,
        tenant: &str,
        role: Role,
        name: &str,
    ) -> Result<(ApiToken, String), AdminError> {
        self.known(tenant)?;
        let (id, secret) = (random_token(8), random_token(24));
        let clear = format!("at.{id}.{secret}");
        let token = ApiToken {
            id,
            tenant: tenant.to_string(),
            sha256: sha256_hex(&clear),
            role,
            name: name.to_string(),
            created_at_ms: now_ms(),
            revoked_at_ms: None,
        };
        self.put(Record::ApiToken(token.clone()), None)
            .await
            .map_err(AdminError::Store)?;
        Ok((token, clear))
    }

    /// Revoke `tenant`'s enrollment key `id`: it enrolls no one from now; agents enrolled
    /// with it keep working. Revoking it again changes nothing.
    pub async fn revoke_key(&self, tenant: &str, id: &str) -> Result<EnrollKey, AdminError> {
        let missing = || AdminError::NotFound(format!("enrollment key {id}"));
        let record = self
            .modify(&enroll_key_key(id), missing, |record| match record {
                Record::EnrollKey(k) if k.tenant == tenant => {
                    k.revoked_at_ms.get_or_insert_with(now_ms);
                    true
                }
                _ => false,
            })
            .await?;
        match record {
            Record::EnrollKey(k) => Ok(k),
            _ => Err(missing()),
        }
    }

    /// Revoke `tenant`'s API token `id`: refused from now, on every gateway as soon as it
    /// reads the change.
    pub async fn revoke_token(&self, tenant: &str, id: &str) -> Result<ApiToken, AdminError> {
        let missing = || AdminError::NotFound(format!("API token {id}"));
        let record = self
            .modify(&token_key(id), missing, |record| match record {
                Record::ApiToken(t) if t.tenant == tenant => {
                    t.revoked_at_ms.get_or_insert_with(now_ms);
                    true
                }
                _ => false,
            })
            .await?;
        match record {
            Record::ApiToken(t) => Ok(t),
            _ => Err(missing()),
        }
    }

    fn known(&self, tenant: &str) -> Result<(), AdminError> {
        match self.read().tenants.contains_key(tenant) {
            true => Ok(()),
            false => Err(AdminError::NotFound(format!("tenant {tenant}"))),
        }
    }

    /// Change the record at `key` with `change` (which refuses a record that is not the
    /// caller's with `missing`'s error, as it does a missing one), compare-and-set,
    /// retried on a conflict.
    async fn modify(
        &self,
        key: &str,
        missing: impl Fn() -> AdminError,
        change: impl Fn(&mut Record) -> bool,
    ) -> Result<Record, AdminError> {
        for _ in 0..10 {
            let Some((mut record, rev)) = self.store.get(key).await.map_err(AdminError::Store)?
            else {
                return Err(missing());
            };
            let before = record.clone();
            if !change(&mut record) {
                return Err(missing());
            }
            if record == before {
                return Ok(record);
            }
            match self.store.put(&record, Some(rev)).await {
                Ok(rev) => {
                    self.apply(key, Some((record.clone(), rev)));
                    return Ok(record);
                }
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(AdminError::Store(e)),
            }
        }
        Err(AdminError::Store(StoreError::Conflict))
    }
}

/// What is wrong with a new key's settings, if anything.
pub fn key_problems(new: &NewKey) -> Option<String> {
    let mut problems = Vec::new();
    if new.name.len() > 200 {
        problems.push("name: at most 200 bytes".to_string());
    }
    if new.max_enrollments == Some(0) {
        problems.push("max_enrollments: at least 1 (leave it out for no maximum)".into());
    }
    if new.expires_at_ms.is_some_and(|at| at <= now_ms()) {
        problems.push("expires_at_ms: a time in the future, in milliseconds since 1970".into());
    }
    if new.labels.len() > outpost_protocol::MAX_LABELS {
        problems.push(format!("labels: at most {}", outpost_protocol::MAX_LABELS));
    }
    for (k, v) in &new.labels {
        if let Some(p) = outpost_protocol::label_problem(k, v) {
            problems.push(p);
        }
    }
    (!problems.is_empty()).then(|| problems.join("; "))
}

/// A short random pause before retrying a compare-and-set that lost a race, so racers
/// spread out.
async fn backoff() {
    use rand::Rng;
    let ms = rand::thread_rng().gen_range(1..20);
    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
}

/// What a new enrollment key is given.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub expires_at_ms: Option<u64>,
    #[serde(default)]
    pub max_enrollments: Option<u64>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0} already exists")]
    Exists(String),
    #[error("{0} does not exist")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("cannot store the change: {0}; nothing was changed, retry")]
    Store(StoreError),
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollCount {
    #[error("{0}")]
    Refused(Refusal),
    #[error("cannot count the enrollment: {0}")]
    Store(StoreError),
}
