//! Who may connect: the tenant's enrollment key (`DATA_DIR/enroll.key`), the admin API
//! token (`DATA_DIR/api.token`), and one secret per enrolled agent, kept only as a SHA-256
//! hash in a [`SecretStore`] (`DATA_DIR/agents/credentials.json`, or NATS KV in a fleet).
//! The rules for enrollment, login and confirmation are here, once, for both stores.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::nats::secrets::NatsSecrets;
use crate::nats::Nats;
use crate::secrets::{AgentCredential, FileSecrets, SecretStore, StoreError};
use crate::tenant::DEFAULT_TENANT;
use crate::util::{constant_time_eq, now_ms, random_token, write_atomic};

pub struct Credentials {
    /// The enrollment key and API token in this data directory (`enroll.key`,
    /// `api.token`); empty when they are not the tenant's (a gateway that joined a tenant
    /// another gateway created: see [`Credentials::open_for`]).
    pub enroll_key: String,
    pub api_token: String,
    /// What is checked: the tenant's key and token, as SHA-256.
    enroll_key_sha256: String,
    api_token_sha256: String,
    /// The tenant this gateway's agents and token belong to.
    pub tenant: String,
    /// Enrolled agents' secrets: in the data directory, or with NATS in the shared
    /// `outpost_credentials` bucket, so an agent enrolled through one gateway logs in
    /// through any.
    secrets: Arc<dyn SecretStore>,
}

/// A tenant's enrollment key and API token as the fleet keeps them in NATS: hashed, so
/// that whoever can read the bucket (an operator, a backup, a NATS account that should not)
/// cannot enroll agents or call the API with them.
#[derive(Serialize, Deserialize)]
struct TenantKeys {
    enroll_key_sha256: String,
    api_token_sha256: String,
    /// The gateway whose data directory holds them in clear (it created them).
    #[serde(default)]
    created_by: String,
}

/// The record as gateways wrote it before it was hashed; read once, then rewritten hashed.
#[derive(Deserialize)]
struct PlainTenantKeys {
    enroll_key: String,
    api_token: String,
}

/// Why an agent's credential was refused. The message is sent to the agent and logged.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("enrollment key refused: it does not match this gateway's key (see enroll.key in the gateway's data directory)")]
    BadEnrollKey,
    #[error("fingerprint {0} is already enrolled; connect with the secret it was given, or remove it from the gateway to enroll again")]
    AlreadyEnrolled(String),
    #[error("fingerprint {0} is being enrolled by an agent with another enrollment proof; if this is the agent that enrolled it, it lost its fingerprint file: remove agent.finger to enroll as a new agent")]
    OtherProof(String),
    #[error("fingerprint {0} is not enrolled here; configure enroll_key to enroll it")]
    UnknownAgent(String),
    #[error("secret refused for fingerprint {0}")]
    BadSecret(String),
    #[error("fingerprint {0} was revoked by an administrator: it cannot log in or enroll again; to bring the host back, delete the agent's agent.finger and agent.secret and enroll it as a new agent")]
    Revoked(String),
    #[error("fingerprint {0} was enrolled by another connection at the same moment; retry")]
    Concurrent(String),
    #[error("cannot read or store the agent's credential: {0}")]
    Storage(String),
}

impl AuthError {
    /// What the agent is told. A caller without a valid secret or key learns nothing
    /// about which fingerprints are enrolled: an unknown fingerprint and a wrong secret
    /// read the same (the gateway's log has the difference).
    pub fn public_message(&self) -> String {
        match self {
            AuthError::UnknownAgent(fp) | AuthError::BadSecret(fp) => format!(
                "secret refused for fingerprint {fp}: unknown here, or not its secret (an agent that lost its secret needs enroll_key to enroll again under a new fingerprint)"
            ),
            other => other.to_string(),
        }
    }
}

/// Whether an enrollment with `proof` may (re-)enroll a fingerprint whose stored
/// credential is `previous`: the one rule both stores apply. A confirmed agent is never
/// enrolled again; an unconfirmed one only by the caller that holds its proof.
fn may_enroll(
    fingerprint: &str,
    previous: Option<&AgentCredential>,
    proof: &str,
) -> Result<(), AuthError> {
    let Some(previous) = previous else {
        return Ok(());
    };
    if previous.confirmed {
        return Err(AuthError::AlreadyEnrolled(fingerprint.to_string()));
    }
    match &previous.enroll_proof_sha256 {
        Some(h) if !constant_time_eq(sha256_hex(proof).as_bytes(), h.as_bytes()) => {
            Err(AuthError::OtherProof(fingerprint.to_string()))
        }
        _ => Ok(()),
    }
}

fn new_credential(tenant: &str, secret: &str, proof: &str) -> AgentCredential {
    AgentCredential {
        tenant: tenant.to_string(),
        secret_sha256: sha256_hex(secret),
        enrolled_at_ms: now_ms(),
        confirmed: false,
        enroll_proof_sha256: (!proof.is_empty()).then(|| sha256_hex(proof)),
        revoked_at_ms: None,
    }
}

/// The tenant's keys as the bucket holds them. A record from before they were hashed is
/// rewritten hashed (compare-and-set); its clear text, the tenant's, is written to this
/// data directory as before, and a copy here that differs is replaced.
async fn tenant_keys(
    nats: &Nats,
    key: &str,
    data_dir: &Path,
    creds: &mut Credentials,
) -> anyhow::Result<TenantKeys> {
    let entry = nats
        .credentials
        .entry(key)
        .await
        .context("cannot read the tenant's keys from NATS")?
        .context("the tenant's keys vanished from NATS")?;
    if let Ok(keys) = serde_json::from_slice::<TenantKeys>(&entry.value) {
        return Ok(keys);
    }
    let plain: PlainTenantKeys =
        serde_json::from_slice(&entry.value).context("the tenant's keys in NATS are corrupt")?;
    let hashed = TenantKeys {
        enroll_key_sha256: sha256_hex(&plain.enroll_key),
        api_token_sha256: sha256_hex(&plain.api_token),
        created_by: String::new(),
    };
    if plain.enroll_key != creds.enroll_key || plain.api_token != creds.api_token {
        tracing::info!(tenant = %creds.tenant, "using the fleet's enrollment key and API token (saved to this data directory)");
        write_atomic(
            &data_dir.join("enroll.key"),
            format!("{}\n", plain.enroll_key).as_bytes(),
            0o600,
        )?;
        write_atomic(
            &data_dir.join("api.token"),
            format!("{}\n", plain.api_token).as_bytes(),
            0o600,
        )?;
        creds.enroll_key = plain.enroll_key;
        creds.api_token = plain.api_token;
        creds.enroll_key_sha256 = hashed.enroll_key_sha256.clone();
        creds.api_token_sha256 = hashed.api_token_sha256.clone();
    }
    match nats
        .credentials
        .update(key, serde_json::to_vec(&hashed)?.into(), entry.revision)
        .await
    {
        Ok(_) => tracing::info!(tenant = %creds.tenant, "the tenant's keys in NATS are now hashed"),
        // Another gateway rewrote it first: the same hashes.
        Err(e) => tracing::debug!(error = %e, "the tenant's keys were rewritten meanwhile"),
    }
    Ok(hashed)
}

/// A successful authentication.
pub struct Authenticated {
    pub tenant: String,
    /// Set when this call enrolled the agent.
    pub new_secret: Option<String>,
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

fn read_or_create_token(path: &Path) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        Ok(_) => anyhow::bail!(
            "{} is empty; delete it to have a new one generated",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token = random_token(24);
            write_atomic(path, format!("{token}\n").as_bytes(), 0o600)
                .with_context(|| format!("cannot write {}", path.display()))?;
            Ok(token)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

impl Credentials {
    /// The credentials in `data_dir`, for the default tenant, with agent secrets in the
    /// data directory.
    pub fn open(data_dir: &Path) -> anyhow::Result<Credentials> {
        let secrets = FileSecrets::open(data_dir, DEFAULT_TENANT)?;
        Credentials::with_secrets(data_dir, DEFAULT_TENANT, Arc::new(secrets))
    }

    fn with_secrets(
        data_dir: &Path,
        tenant: &str,
        secrets: Arc<dyn SecretStore>,
    ) -> anyhow::Result<Credentials> {
        let enroll_key = read_or_create_token(&data_dir.join("enroll.key"))?;
        let api_token = read_or_create_token(&data_dir.join("api.token"))?;
        Ok(Credentials {
            enroll_key_sha256: sha256_hex(&enroll_key),
            api_token_sha256: sha256_hex(&api_token),
            enroll_key,
            api_token,
            tenant: tenant.to_string(),
            secrets,
        })
    }

    /// The gateway's credentials for `tenant`. With NATS, the tenant's enrollment key and
    /// API token are the fleet's: the first gateway of the tenant stores its own, hashed,
    /// in the bucket (`<tenant>._tenant`), and every other gateway checks against those
    /// hashes. A gateway whose own files are not the tenant's moves them aside (their
    /// clear text is only where they were made: copy `enroll.key` and `api.token` from
    /// there, or from your secret store). Agent secrets live in the bucket.
    pub async fn open_for(
        data_dir: &Path,
        tenant: &str,
        gateway_id: &str,
        nats: Option<Arc<Nats>>,
    ) -> anyhow::Result<Credentials> {
        let local = FileSecrets::open(data_dir, tenant)?;
        let Some(nats) = nats else {
            return Credentials::with_secrets(data_dir, tenant, Arc::new(local));
        };
        let shared = NatsSecrets::new(nats.clone());
        let mut creds = Credentials::with_secrets(data_dir, tenant, Arc::new(shared))?;
        let key = format!("{tenant}._tenant");
        let mine = TenantKeys {
            enroll_key_sha256: creds.enroll_key_sha256.clone(),
            api_token_sha256: creds.api_token_sha256.clone(),
            created_by: gateway_id.to_string(),
        };
        let fleet = match nats
            .credentials
            .create(&key, serde_json::to_vec(&mine)?.into())
            .await
        {
            Ok(_) => {
                tracing::info!(%tenant, "this gateway's enrollment key and API token are now the tenant's (kept hashed in NATS)");
                mine
            }
            Err(_) => tenant_keys(&nats, &key, data_dir, &mut creds).await?,
        };
        if fleet.enroll_key_sha256 != creds.enroll_key_sha256
            || fleet.api_token_sha256 != creds.api_token_sha256
        {
            for file in ["enroll.key", "api.token"] {
                let path = data_dir.join(file);
                let aside = data_dir.join(format!("{file}.not-the-tenants"));
                if let Err(e) = std::fs::rename(&path, &aside) {
                    tracing::warn!(file = %path.display(), error = %e, "cannot move aside a key that is not the tenant's");
                }
            }
            tracing::warn!(
                %tenant,
                created_by = %fleet.created_by,
                "this gateway's enroll.key and api.token are not the tenant's and were moved aside (*.not-the-tenants); the tenant's are kept only as hashes in NATS: to have them here, copy them from the data directory of the gateway that created them (or from your secret store)"
            );
            creds.enroll_key.clear();
            creds.api_token.clear();
        }
        creds.enroll_key_sha256 = fleet.enroll_key_sha256;
        creds.api_token_sha256 = fleet.api_token_sha256;
        // A gateway moving from its embedded bus to NATS brings its enrolled agents along,
        // once: each local secret of the tenant not yet in the bucket is added (never
        // overwriting one there). Once only, so an agent forgotten in the fleet later is
        // not brought back by a restart of a gateway that still has the old file.
        let marker = data_dir.join("agents").join("credentials.imported");
        if !marker.exists() {
            let mut imported = 0;
            for (_, fp, cred) in local.all().into_iter().filter(|(t, _, _)| t == tenant) {
                let cred = AgentCredential {
                    tenant: tenant.to_string(),
                    ..cred
                };
                if creds.secrets.put(tenant, &fp, &cred, None).await.is_ok() {
                    imported += 1;
                }
            }
            if imported > 0 {
                tracing::info!(%tenant, agents = imported, "added this gateway's enrolled agents to the fleet's credentials");
            }
            let note = format!("agent secrets of tenant {tenant} imported into NATS at {} ms; delete this file to import agents/credentials.json again\n", now_ms());
            write_atomic(&marker, note.as_bytes(), 0o600)
                .with_context(|| format!("cannot write {}", marker.display()))?;
        }
        Ok(creds)
    }

    /// Check an agent's credential, enrolling it when it presents the enrollment key. A
    /// new secret is stored (on disk, or in NATS) before this returns, so a crash cannot
    /// lose it; two enrollments of one fingerprint at once cannot both succeed.
    pub async fn check(
        &self,
        fingerprint: &str,
        credential: &outpost_protocol::Credential,
    ) -> Result<Authenticated, AuthError> {
        use outpost_protocol::Credential;
        let storage = |e: StoreError| match e {
            StoreError::Conflict => AuthError::Concurrent(fingerprint.to_string()),
            StoreError::Unavailable(e) => AuthError::Storage(e),
        };
        let known = self
            .secrets
            .get(&self.tenant, fingerprint)
            .await
            .map_err(storage)?;
        let revoked = known
            .as_ref()
            .is_some_and(|(c, _)| c.revoked_at_ms.is_some());
        match credential {
            Credential::Secret { secret } => {
                // Its secret is gone: the agent is told why it will never log in again.
                if revoked {
                    return Err(AuthError::Revoked(fingerprint.to_string()));
                }
                let Some((known, revision)) = known else {
                    return Err(AuthError::UnknownAgent(fingerprint.to_string()));
                };
                if !constant_time_eq(
                    sha256_hex(secret).as_bytes(),
                    known.secret_sha256.as_bytes(),
                ) {
                    return Err(AuthError::BadSecret(fingerprint.to_string()));
                }
                if !known.confirmed {
                    self.confirm(fingerprint, known, revision).await;
                }
                Ok(Authenticated {
                    tenant: self.tenant.clone(),
                    new_secret: None,
                })
            }
            Credential::EnrollKey { key, proof } => {
                if !self.enroll_key_ok(key) {
                    return Err(AuthError::BadEnrollKey);
                }
                // Only to a holder of the key: the fingerprint is taken, for good.
                if revoked {
                    return Err(AuthError::Revoked(fingerprint.to_string()));
                }
                may_enroll(fingerprint, known.as_ref().map(|(c, _)| c), proof)?;
                let secret = random_token(32);
                let credential = new_credential(&self.tenant, &secret, proof);
                let expected = known.map(|(_, revision)| revision);
                self.secrets
                    .put(&self.tenant, fingerprint, &credential, expected)
                    .await
                    .map_err(storage)?;
                Ok(Authenticated {
                    tenant: self.tenant.clone(),
                    new_secret: Some(secret),
                })
            }
        }
    }

    /// The agent has shown it holds its secret: the enrollment key can no longer enroll
    /// its fingerprint again.
    pub async fn confirmed(&self, fingerprint: &str) {
        match self.secrets.get(&self.tenant, fingerprint).await {
            Ok(Some((known, revision))) if !known.confirmed => {
                self.confirm(fingerprint, known, revision).await
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(%fingerprint, error = %e, "cannot record that the agent confirmed its secret")
            }
        }
    }

    /// Revoke the agent: its secret is deleted and its fingerprint can never log in or
    /// enroll again (until it is forgotten). `None` when it never enrolled here; otherwise
    /// when it was revoked (by this call or an earlier one).
    pub async fn revoke(&self, fingerprint: &str) -> Result<Option<u64>, StoreError> {
        // Compare-and-set, so a confirmation landing meanwhile cannot undo it.
        for _ in 0..5 {
            let Some((known, revision)) = self.secrets.get(&self.tenant, fingerprint).await? else {
                return Ok(None);
            };
            if let Some(at) = known.revoked_at_ms {
                return Ok(Some(at));
            }
            let at = now_ms();
            let revoked = AgentCredential {
                secret_sha256: String::new(),
                enroll_proof_sha256: None,
                revoked_at_ms: Some(at),
                ..known
            };
            let put = self
                .secrets
                .put(&self.tenant, fingerprint, &revoked, Some(revision));
            match put.await {
                Ok(_) => return Ok(Some(at)),
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Conflict)
    }

    /// Forget the agent (decommissioned, or revoked and done with): its record goes, and
    /// its fingerprint may enroll again with an enrollment key.
    pub async fn forget(&self, fingerprint: &str) -> Result<(), StoreError> {
        self.secrets.delete(&self.tenant, fingerprint).await
    }

    /// Whether the agent has a credential here (`None`: never enrolled, or forgotten),
    /// and whether it is revoked.
    pub async fn revoked(&self, fingerprint: &str) -> Result<Option<bool>, StoreError> {
        let known = self.secrets.get(&self.tenant, fingerprint).await?;
        Ok(known.map(|(c, _)| c.revoked_at_ms.is_some()))
    }

    async fn confirm(&self, fingerprint: &str, known: AgentCredential, revision: u64) {
        let confirmed = AgentCredential {
            confirmed: true,
            ..known
        };
        let put = self
            .secrets
            .put(&self.tenant, fingerprint, &confirmed, Some(revision));
        if let Err(e) = put.await {
            // Harmless: the agent stays re-enrollable (with its proof) until the next try.
            tracing::warn!(%fingerprint, error = %e, "cannot record that the agent confirmed its secret");
        }
    }

    /// Whether `token` is the admin API token.
    pub fn api_token_ok(&self, token: &str) -> bool {
        constant_time_eq(
            sha256_hex(token).as_bytes(),
            self.api_token_sha256.as_bytes(),
        )
    }

    /// Whether `key` is the tenant's enrollment key.
    fn enroll_key_ok(&self, key: &str) -> bool {
        constant_time_eq(
            sha256_hex(key).as_bytes(),
            self.enroll_key_sha256.as_bytes(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_protocol::Credential;

    const FP: &str = "0f8fad5b-d9cb-469f-a165-70867728950e";

    fn enroll(key: &str, proof: &str) -> Credential {
        Credential::EnrollKey {
            key: key.into(),
            proof: proof.into(),
        }
    }

    #[tokio::test]
    async fn enroll_then_secret_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let creds = Credentials::open(dir.path()).unwrap();
        let key = creds.enroll_key.clone();
        let auth = creds.check(FP, &enroll(&key, "mine")).await.unwrap();
        let lost = auth.new_secret.expect("enrollment issues a secret");
        // The agent never got (or never stored) that secret: enrolling again is allowed
        // until it confirms, and replaces the secret.
        let again = creds.check(FP, &enroll(&key, "mine")).await.unwrap();
        let secret = again.new_secret.unwrap();
        assert_ne!(secret, lost);
        assert_eq!(
            creds
                .check(FP, &Credential::Secret { secret: lost })
                .await
                .err(),
            Some(AuthError::BadSecret(FP.into()))
        );
        creds.confirmed(FP).await;
        assert_eq!(
            creds.check(FP, &enroll(&key, "mine")).await.err(),
            Some(AuthError::AlreadyEnrolled(FP.into()))
        );
        drop(creds);
        let creds = Credentials::open(dir.path()).unwrap();
        assert!(creds
            .check(
                FP,
                &Credential::Secret {
                    secret: secret.clone()
                }
            )
            .await
            .is_ok());
        assert_eq!(
            creds
                .check(
                    FP,
                    &Credential::Secret {
                        secret: "nope".into()
                    }
                )
                .await
                .err(),
            Some(AuthError::BadSecret(FP.into()))
        );
        let stored = std::fs::read_to_string(dir.path().join("agents/credentials.json")).unwrap();
        assert!(!stored.contains(&secret), "secrets are stored hashed");
    }

    /// Audit finding 7: someone who knows a fingerprint (agent.finger was 0644) and the
    /// tenant's key could enroll it again before the agent confirmed, taking its identity.
    /// Only the proof the first enrollment carried may enroll it again.
    #[tokio::test]
    async fn an_unconfirmed_enrollment_is_taken_over_only_with_its_proof() {
        let dir = tempfile::tempdir().unwrap();
        let creds = Credentials::open(dir.path()).unwrap();
        let key = creds.enroll_key.clone();
        let first = creds.check(FP, &enroll(&key, "victim")).await.unwrap();
        for thief in ["", "guess"] {
            assert_eq!(
                creds.check(FP, &enroll(&key, thief)).await.err(),
                Some(AuthError::OtherProof(FP.into()))
            );
        }
        let secret = first.new_secret.unwrap();
        assert!(creds
            .check(FP, &Credential::Secret { secret })
            .await
            .is_ok());
        // An agent that predates proofs keeps the old rule (it can enroll again).
        let old = "1f8fad5b-d9cb-469f-a165-70867728950e";
        creds.check(old, &enroll(&key, "")).await.unwrap();
        creds.check(old, &enroll(&key, "")).await.unwrap();
    }

    #[tokio::test]
    async fn wrong_key_and_unknown_agent_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let creds = Credentials::open(dir.path()).unwrap();
        assert_eq!(
            creds.check(FP, &enroll("guess", "")).await.err(),
            Some(AuthError::BadEnrollKey)
        );
        assert_eq!(
            creds
                .check(FP, &Credential::Secret { secret: "s".into() })
                .await
                .err(),
            Some(AuthError::UnknownAgent(FP.into()))
        );
    }

    #[test]
    fn corrupt_credentials_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("agents")).unwrap();
        std::fs::write(dir.path().join("agents/credentials.json"), b"{garbage").unwrap();
        let err = Credentials::open(dir.path()).err().unwrap();
        assert!(format!("{err:#}").contains("corrupt"), "{err:#}");
    }
}
