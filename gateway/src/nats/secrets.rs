//! Agent secrets in the fleet's `outpost_credentials` bucket, key `<tenant>.<fingerprint>`:
//! every gateway of the fleet reads and writes the same records, and a KV revision is the
//! record's [`Revision`], so two gateways enrolling one fingerprint at once cannot both
//! succeed.

use std::sync::Arc;

use async_nats::jetstream::kv::Operation;
use async_trait::async_trait;

use super::{agent_key, Nats};
use crate::secrets::{AgentCredential, Revision, SecretStore, StoreError};

pub struct NatsSecrets {
    nats: Arc<Nats>,
}

impl NatsSecrets {
    pub fn new(nats: Arc<Nats>) -> NatsSecrets {
        NatsSecrets { nats }
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("NATS: {e}"))
}

#[async_trait]
impl SecretStore for NatsSecrets {
    async fn get(
        &self,
        tenant: &str,
        fingerprint: &str,
    ) -> Result<Option<(AgentCredential, Revision)>, StoreError> {
        let key = agent_key(tenant, fingerprint);
        let entry = self
            .nats
            .credentials
            .entry(&key)
            .await
            .map_err(unavailable)?;
        let Some(entry) = entry.filter(|e| e.operation == Operation::Put) else {
            return Ok(None);
        };
        // A record that does not decode is refused like a missing one would be, but said:
        // it is not silently taken for "not enrolled" by a write that would replace it.
        let credential = serde_json::from_slice(&entry.value).map_err(|e| {
            StoreError::Unavailable(format!(
                "the credential of {key} in NATS is corrupt ({e}); delete it with `nats kv del outpost_credentials {key}` to enroll the agent again"
            ))
        })?;
        Ok(Some((credential, entry.revision)))
    }

    async fn put(
        &self,
        tenant: &str,
        fingerprint: &str,
        credential: &AgentCredential,
        expected: Option<Revision>,
    ) -> Result<Revision, StoreError> {
        let key = agent_key(tenant, fingerprint);
        let value = serde_json::to_vec(credential).map_err(unavailable)?;
        super::put_if(&self.nats.credentials, &key, value, expected).await
    }

    async fn delete(&self, tenant: &str, fingerprint: &str) -> Result<(), StoreError> {
        let key = agent_key(tenant, fingerprint);
        self.nats
            .credentials
            .delete(&key)
            .await
            .map_err(unavailable)
    }
}
