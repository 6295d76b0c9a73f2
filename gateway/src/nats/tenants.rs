//! Tenants, enrollment keys and API tokens in the fleet's `outpost_tenants` bucket (keys
//! `tenant.<name>`, `key.<id>`, `token.<id>`, see [`crate::tenants::Record::key`]): every
//! gateway reads and writes the same records, compare-and-set on the KV revision, and
//! follows the bucket into its in-memory copy ([`follow`]).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv::Operation;
use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::Nats;
use crate::secrets::{Revision, StoreError};
use crate::tenants::{Record, TenantStore, Tenants};

pub struct NatsTenants {
    nats: Arc<Nats>,
}

impl NatsTenants {
    pub fn new(nats: Arc<Nats>) -> NatsTenants {
        NatsTenants { nats }
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("NATS: {e}"))
}

/// A stored value, or a clear error naming the key and how to clear it.
fn decode(key: &str, value: &[u8]) -> Result<Record, StoreError> {
    serde_json::from_slice(value).map_err(|e| {
        StoreError::Unavailable(format!(
            "the record {key} in NATS is corrupt ({e}); restore it, or delete it with `nats kv del {} {key}`",
            super::TENANTS_BUCKET
        ))
    })
}

#[async_trait]
impl TenantStore for NatsTenants {
    async fn get(&self, key: &str) -> Result<Option<(Record, Revision)>, StoreError> {
        let entry = self.nats.tenants.entry(key).await.map_err(unavailable)?;
        match entry.filter(|e| e.operation == Operation::Put) {
            Some(e) => Ok(Some((decode(key, &e.value)?, e.revision))),
            None => Ok(None),
        }
    }

    async fn put(
        &self,
        record: &Record,
        expected: Option<Revision>,
    ) -> Result<Revision, StoreError> {
        let key = record.key();
        let value = serde_json::to_vec(record).map_err(unavailable)?;
        super::put_if(&self.nats.tenants, &key, value, expected).await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.nats.tenants.delete(key).await.map_err(unavailable)
    }

    async fn list(&self) -> Result<Vec<(Record, Revision)>, StoreError> {
        use futures_util::StreamExt;
        let mut watch = super::watch_keys(&self.nats.client, &self.nats.tenants, ">")
            .await
            .map_err(unavailable)?;
        let mut out = Vec::new();
        // Each key's newest entry, then live changes: stop once caught up.
        let empty = self
            .nats
            .tenants
            .status()
            .await
            .map_err(unavailable)?
            .values()
            == 0;
        if empty {
            return Ok(out);
        }
        while let Some(entry) = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .map_err(|_| unavailable("reading the tenants timed out"))?
        {
            let entry = entry.map_err(unavailable)?;
            if entry.operation == Operation::Put {
                out.push((decode(&entry.key, &entry.value)?, entry.revision));
            }
            if entry.delta == 0 {
                break;
            }
        }
        Ok(out)
    }
}

/// Follow the bucket into `tenants`' in-memory copy until `shutdown`: a key or token
/// revoked through another gateway is refused here as soon as the change arrives. After a
/// broken watch everything is read again (so a record removed meanwhile goes too).
pub async fn follow(tenants: Arc<Tenants>, nats: Arc<Nats>, shutdown: CancellationToken) {
    use futures_util::StreamExt;
    loop {
        let mut watch = match super::watch_keys(&nats.client, &nats.tenants, ">").await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the tenants; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = shutdown.cancelled() => return,
                }
            }
        };
        if let Err(e) = tenants.reload().await {
            tracing::warn!(error = %e, "cannot read the tenants again; retrying");
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                _ = shutdown.cancelled() => return,
            }
        }
        loop {
            let entry = tokio::select! {
                e = watch.next() => e,
                _ = shutdown.cancelled() => return,
            };
            match entry {
                Some(Ok(e)) => {
                    let record = match e.operation {
                        Operation::Put => match decode(&e.key, &e.value) {
                            Ok(r) => Some((r, e.revision)),
                            Err(err) => {
                                tracing::error!(key = %e.key, error = %err, "ignoring a corrupt tenant record");
                                continue;
                            }
                        },
                        _ => None,
                    };
                    tenants.apply(&e.key, record);
                }
                Some(Err(e)) => tracing::warn!(error = %e, "tenants watch error"),
                None => break,
            }
        }
        tracing::warn!("tenants watch ended; restarting it");
    }
}
