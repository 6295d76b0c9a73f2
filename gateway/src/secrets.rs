//! Where enrolled agents' secrets are kept: one record per (tenant, fingerprint), holding
//! only the secret's SHA-256, changed only by compare-and-set. The embedded gateway keeps
//! them in a file ([`FileSecrets`]); a fleet keeps them in NATS KV
//! ([`crate::nats::secrets::NatsSecrets`]), so an agent enrolled through one gateway logs in
//! through any. Both pass one contract test (`tests/tests/store_contract.rs`). What may be
//! stored when (enrollment, login, confirmation) is decided once, in
//! [`crate::credentials`].

use outpost_sys::lock;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::util::write_atomic;

/// An enrolled agent's credential as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentCredential {
    pub tenant: String,
    pub secret_sha256: String,
    pub enrolled_at_ms: u64,
    /// Whether the agent has shown it kept its secret (it spoke again after `welcome`, or
    /// logged in with it). Until then the enrollment key may enroll the fingerprint again,
    /// so a connection lost between `hello` and the agent storing its secret cannot lock
    /// the agent out.
    #[serde(default = "yes")]
    pub confirmed: bool,
    /// sha256 of the `proof` the enrolling agent sent; while unconfirmed, only the same
    /// proof may enroll the fingerprint again. `None` for agents that predate proofs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enroll_proof_sha256: Option<String>,
    /// When an administrator revoked the agent. The record stays (with no secret) so that
    /// the fingerprint cannot enroll again; forgetting the agent removes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at_ms: Option<u64>,
    /// The [`crate::tenants::Tenant::id`] of the tenant it enrolled in (`None` before
    /// tenants, and in a home tenant adopted from then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    /// The enrollment key it enrolled with (`None` before tenants).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enroll_key_id: Option<String>,
    /// The labels that key gave it.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
}

fn yes() -> bool {
    true
}

/// A record's version: a write names the version it replaces, and fails if another write
/// came first.
pub type Revision = u64;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The record is not at the revision the write named: another write came first.
    #[error("the record changed meanwhile")]
    Conflict,
    #[error("{0}")]
    Unavailable(String),
}

#[async_trait]
pub trait SecretStore: Send + Sync {
    /// The agent's credential and its revision, if it has one in `tenant`.
    async fn get(
        &self,
        tenant: &str,
        fingerprint: &str,
    ) -> Result<Option<(AgentCredential, Revision)>, StoreError>;

    /// Store `credential` for the agent if its record is still at `expected` (`None`:
    /// there is none). Durable when this returns; the new revision.
    async fn put(
        &self,
        tenant: &str,
        fingerprint: &str,
        credential: &AgentCredential,
        expected: Option<Revision>,
    ) -> Result<Revision, StoreError>;

    /// Remove the agent's record, whatever it holds (the agent is forgotten). Durable
    /// when this returns; removing what is not there is no error.
    async fn delete(&self, tenant: &str, fingerprint: &str) -> Result<(), StoreError>;
}

/// Agent secrets in `DATA_DIR/agents/credentials.json`, rewritten atomically on each
/// change. The gateway's own tenant (`--tenant`, `default` when not given) keeps the
/// single-tenant layout, keyed by fingerprint, so a data directory reads the same to the
/// releases before and after tenants; any other tenant's agents are keyed
/// `<tenant>.<fingerprint>`.
pub struct FileSecrets {
    path: PathBuf,
    home: String,
    records: Mutex<Records>,
}

#[derive(Default)]
struct Records {
    by_key: HashMap<(String, String), (AgentCredential, Revision)>,
    /// The last revision handed out; revisions are never reused, even after a record is
    /// replaced, so a stale writer cannot match a newer record.
    last: Revision,
}

/// In memory every record is keyed by both.
fn key(tenant: &str, fingerprint: &str) -> (String, String) {
    (tenant.to_string(), fingerprint.to_string())
}

impl FileSecrets {
    /// The store in `data_dir`. A corrupt file is an error that names it: nothing starts
    /// on a guess about who is enrolled.
    pub fn open(data_dir: &Path, home_tenant: &str) -> anyhow::Result<FileSecrets> {
        let path = data_dir.join("agents").join("credentials.json");
        let stored: HashMap<String, AgentCredential> = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
                format!(
                    "agent credentials file {} is corrupt; restore it from a backup",
                    path.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let mut records = Records::default();
        for (k, credential) in stored {
            // `<tenant>.<fingerprint>`, or a fingerprint alone: the gateway's own tenant,
            // as the single-tenant releases read it (whatever tenant the record names).
            let (tenant, fp) = match k.split_once('.') {
                Some((tenant, fp)) => (tenant.to_string(), fp.to_string()),
                None => (home_tenant.to_string(), k),
            };
            records.last += 1;
            records
                .by_key
                .insert((tenant, fp), (credential, records.last));
        }
        Ok(FileSecrets {
            path,
            home: home_tenant.to_string(),
            records: Mutex::new(records),
        })
    }

    /// Every agent's credential with its tenant and fingerprint (a gateway moving to NATS
    /// brings them along).
    pub fn all(&self) -> Vec<(String, String, AgentCredential)> {
        lock(&self.records)
            .by_key
            .iter()
            .map(|((tenant, fp), (c, _))| (tenant.clone(), fp.clone(), c.clone()))
            .collect()
    }

    fn save(&self, records: &Records) -> std::io::Result<()> {
        let stored: HashMap<String, &AgentCredential> = records
            .by_key
            .iter()
            .map(|((tenant, fp), (c, _))| {
                let k = if *tenant == self.home {
                    fp.clone()
                } else {
                    format!("{tenant}.{fp}")
                };
                (k, c)
            })
            .collect();
        let bytes = serde_json::to_vec_pretty(&stored)?;
        write_atomic(&self.path, &bytes, 0o600)
    }
}

#[async_trait]
impl SecretStore for FileSecrets {
    async fn get(
        &self,
        tenant: &str,
        fingerprint: &str,
    ) -> Result<Option<(AgentCredential, Revision)>, StoreError> {
        Ok(lock(&self.records)
            .by_key
            .get(&key(tenant, fingerprint))
            .cloned())
    }

    async fn put(
        &self,
        tenant: &str,
        fingerprint: &str,
        credential: &AgentCredential,
        expected: Option<Revision>,
    ) -> Result<Revision, StoreError> {
        let k = key(tenant, fingerprint);
        let mut records = lock(&self.records);
        if records.by_key.get(&k).map(|(_, rev)| *rev) != expected {
            return Err(StoreError::Conflict);
        }
        let revision = records.last + 1;
        let previous = records
            .by_key
            .insert(k.clone(), (credential.clone(), revision));
        if let Err(e) = self.save(&records) {
            match previous {
                Some(p) => records.by_key.insert(k, p),
                None => records.by_key.remove(&k),
            };
            return Err(StoreError::Unavailable(format!(
                "cannot write {}: {e}",
                self.path.display()
            )));
        }
        records.last = revision;
        Ok(revision)
    }

    async fn delete(&self, tenant: &str, fingerprint: &str) -> Result<(), StoreError> {
        let k = key(tenant, fingerprint);
        let mut records = lock(&self.records);
        let Some(previous) = records.by_key.remove(&k) else {
            return Ok(());
        };
        if let Err(e) = self.save(&records) {
            records.by_key.insert(k, previous);
            return Err(StoreError::Unavailable(format!(
                "cannot write {}: {e}",
                self.path.display()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "0f8fad5b-d9cb-469f-a165-70867728950e";

    fn credential(tenant: &str) -> AgentCredential {
        AgentCredential {
            tenant: tenant.into(),
            secret_sha256: "ab".into(),
            enrolled_at_ms: 1,
            confirmed: true,
            enroll_proof_sha256: None,
            revoked_at_ms: None,
            tenant_id: None,
            enroll_key_id: None,
            labels: Default::default(),
        }
    }

    /// A file from before tenants were keys: keyed by fingerprint, read as the gateway's
    /// own tenant, as the single-tenant releases did (whatever `tenant` a record names:
    /// an agent enrolled before `--tenant` was given keeps logging in).
    #[tokio::test]
    async fn the_single_tenant_layout_is_read_as_the_gateways_tenant() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("agents")).unwrap();
        let legacy = serde_json::json!({ FP: credential("default") });
        std::fs::write(
            dir.path().join("agents/credentials.json"),
            serde_json::to_vec(&legacy).unwrap(),
        )
        .unwrap();
        let store = FileSecrets::open(dir.path(), "blue").unwrap();
        assert_eq!(
            store.get("blue", FP).await.unwrap().map(|(c, _)| c),
            Some(credential("default"))
        );
        assert!(store.get("default", FP).await.unwrap().is_none());
    }

    /// A write the disk refuses changes nothing, in memory or on disk, and says why.
    #[tokio::test]
    async fn a_failed_write_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileSecrets::open(dir.path(), "default").unwrap();
        // `agents` is a file: the credentials file cannot be written under it.
        std::fs::write(dir.path().join("agents"), b"not a directory").unwrap();
        let err = store
            .put("default", FP, &credential("default"), None)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::Unavailable(e) if e.contains("credentials.json")),
            "{err}"
        );
        assert!(store.get("default", FP).await.unwrap().is_none());
    }
}
