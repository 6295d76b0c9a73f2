//! Who may connect: agents that present an enrollment key of a tenant (see
//! [`crate::tenants`]), and enrolled agents with their secret, kept only as a SHA-256 hash
//! in a [`SecretStore`] (`DATA_DIR/agents/credentials.json`, or NATS KV in a fleet). The
//! rules for enrollment, login, confirmation and revocation are here, once, for both
//! stores.
//!
//! A secret is `<tenant>.<random>`: the gateway knows the agent's tenant from it before it
//! looks anything up. A secret from before tenants (no tenant part) is the gateway's home
//! tenant's (`--tenant`, `default` when not given), as it was then.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use serde::Deserialize;

use crate::nats::Nats;
use crate::secrets::{AgentCredential, FileSecrets, SecretStore, StoreError};
use crate::tenants::{
    legacy_id, sha256_hex, ApiToken, EnrollCount, EnrollKey, Limits, Record, Refusal, Role, Tenant,
    Tenants,
};
use crate::util::{constant_time_eq, now_ms, random_token, write_atomic};

pub struct Credentials {
    /// Enrolled agents' secrets: in the data directory, or with NATS in the shared
    /// `outpost_credentials` bucket, so an agent enrolled through one gateway logs in
    /// through any.
    secrets: Arc<dyn SecretStore>,
    pub tenants: Arc<Tenants>,
    /// The tenant of a secret without a tenant part.
    home: String,
    /// How many agents `tenant` has enrolled (its limit is checked against it).
    agents: Box<dyn Fn(&str) -> u64 + Send + Sync>,
}

/// Why an agent's credential was refused. The message is sent to the agent and logged.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("{0}")]
    Refused(Refusal),
    #[error("tenant {0} has enrolled its maximum of {1} agents: an administrator can forget decommissioned agents, or an operator can raise the limit")]
    TooManyAgents(String, u64),
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

    /// The tenant's limit refused it (counted apart from wrong credentials).
    pub fn over_limit(&self) -> bool {
        matches!(self, AuthError::TooManyAgents(..))
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

fn new_credential(grant: &crate::tenants::Grant, secret: &str, proof: &str) -> AgentCredential {
    AgentCredential {
        tenant: grant.tenant.clone(),
        secret_sha256: sha256_hex(secret),
        enrolled_at_ms: now_ms(),
        confirmed: false,
        enroll_proof_sha256: (!proof.is_empty()).then(|| sha256_hex(proof)),
        revoked_at_ms: None,
        tenant_id: (!grant.tenant_id.is_empty()).then(|| grant.tenant_id.clone()),
        enroll_key_id: Some(grant.key_id.clone()),
        labels: grant.labels.clone(),
    }
}

/// A successful authentication.
pub struct Authenticated {
    pub tenant: String,
    /// Set when this call enrolled the agent.
    pub new_secret: Option<String>,
    /// Labels its enrollment key gave it: they win over the agent's own.
    pub labels: BTreeMap<String, String>,
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

/// The operator's token: the file given (it must exist), or `DATA_DIR/operator.token`,
/// made at the first start.
pub fn operator_token(data_dir: &Path, given: Option<&Path>) -> anyhow::Result<String> {
    match given {
        Some(path) => {
            let token = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the operator token {}", path.display()))?;
            let token = token.trim();
            anyhow::ensure!(
                token.len() >= 16,
                "the operator token in {} is shorter than 16 characters: use a long random one (e.g. `openssl rand -hex 24`)",
                path.display()
            );
            Ok(token.to_string())
        }
        None => read_or_create_token(&data_dir.join("operator.token")),
    }
}

/// The tenant keys as gateways before this release kept them in NATS
/// (`<tenant>._tenant` in `outpost_credentials`): hashed, or in clear in the oldest ones.
#[derive(Deserialize)]
struct LegacyTenantKeys {
    #[serde(default)]
    enroll_key_sha256: Option<String>,
    #[serde(default)]
    api_token_sha256: Option<String>,
    #[serde(default)]
    enroll_key: Option<String>,
    #[serde(default)]
    api_token: Option<String>,
}

impl LegacyTenantKeys {
    fn hashes(&self) -> Option<(String, String)> {
        let key = self
            .enroll_key_sha256
            .clone()
            .or_else(|| self.enroll_key.as_deref().map(sha256_hex))?;
        let token = self
            .api_token_sha256
            .clone()
            .or_else(|| self.api_token.as_deref().map(sha256_hex))?;
        Some((key, token))
    }
}

/// Make sure the home tenant exists with the data directory's `enroll.key` and
/// `api.token` (made at the first start) as its first enrollment key and admin token: an
/// installation from before tenants keeps working unchanged, and a new one starts with a
/// key and a token to use. In a fleet the first gateway's are the tenant's (or those the
/// previous release kept in NATS); a gateway whose files differ moves them aside, as
/// before.
pub async fn adopt_home(
    tenants: &Tenants,
    data_dir: &Path,
    home: &str,
    nats: Option<&Nats>,
) -> anyhow::Result<()> {
    use crate::tenants::{enroll_key_key, token_key};
    let store = tenants.store();
    let fail = |e: StoreError| anyhow::anyhow!("cannot store the home tenant {home}: {e}");
    // Made once (whoever comes first); marked as a home so it is never deleted.
    let key = crate::tenants::tenant_key(home);
    loop {
        match store.get(&key).await.map_err(fail)? {
            Some((Record::Tenant(t), _)) if t.home => break,
            Some((Record::Tenant(t), rev)) => {
                let marked = Record::Tenant(Tenant { home: true, ..t });
                match store.put(&marked, Some(rev)).await {
                    Ok(_) => break,
                    Err(StoreError::Conflict) => continue,
                    Err(e) => return Err(fail(e)),
                }
            }
            Some(_) => anyhow::bail!("the record {key} is not a tenant"),
            None => {
                let tenant = Record::Tenant(Tenant {
                    name: home.to_string(),
                    id: String::new(),
                    home: true,
                    enabled: true,
                    limits: Limits::default(),
                    created_at_ms: now_ms(),
                });
                match store.put(&tenant, None).await {
                    Ok(_) => break,
                    Err(StoreError::Conflict) => continue,
                    Err(e) => return Err(fail(e)),
                }
            }
        }
    }
    let key_file = data_dir.join("enroll.key");
    let token_file = data_dir.join("api.token");
    let id = legacy_id(home);
    // Each hash from, first found: the record stored (another gateway's, or this one's at
    // an earlier start), the pair the release before tenants kept in NATS, this data
    // directory's file (made now if missing).
    let legacy = match nats {
        Some(nats) => match nats.credentials.entry(format!("{home}._tenant")).await {
            Ok(Some(e)) => serde_json::from_slice::<LegacyTenantKeys>(&e.value)
                .ok()
                .and_then(|k| k.hashes()),
            Ok(None) => None,
            Err(e) => anyhow::bail!("cannot read the tenant's keys from NATS: {e}"),
        },
        None => None,
    };
    let stored_hash = |key: String| async move {
        match store.get(&key).await.map_err(fail)? {
            Some((Record::EnrollKey(k), _)) => Ok::<_, anyhow::Error>(Some(k.sha256)),
            Some((Record::ApiToken(t), _)) => Ok(Some(t.sha256)),
            _ => Ok(None),
        }
    };
    let key_hash = match stored_hash(enroll_key_key(&id)).await? {
        Some(h) => h,
        None => match &legacy {
            Some((k, _)) => k.clone(),
            None => sha256_hex(&read_or_create_token(&key_file)?),
        },
    };
    let token_hash = match stored_hash(token_key(&id)).await? {
        Some(h) => h,
        None => match &legacy {
            Some((_, t)) => t.clone(),
            None => sha256_hex(&read_or_create_token(&token_file)?),
        },
    };
    let now = now_ms();
    let records = [
        Record::EnrollKey(EnrollKey {
            id: id.clone(),
            tenant: home.to_string(),
            sha256: key_hash,
            name: "enroll.key of the installation".into(),
            created_at_ms: now,
            expires_at_ms: None,
            max_enrollments: None,
            enrollments: 0,
            labels: BTreeMap::new(),
            revoked_at_ms: None,
        }),
        Record::ApiToken(ApiToken {
            id: id.clone(),
            tenant: home.to_string(),
            sha256: token_hash,
            role: Role::Admin,
            name: "api.token of the installation".into(),
            created_at_ms: now,
            revoked_at_ms: None,
        }),
    ];
    for record in records {
        match store.put(&record, None).await {
            Ok(_) | Err(StoreError::Conflict) => {}
            Err(e) => return Err(fail(e)),
        }
    }
    // What the store holds now (this gateway's, or another's that came first) is the
    // tenant's; this directory's files, if they differ, are moved aside (their clear text
    // is only where they were made).
    let key_hash = stored_hash(enroll_key_key(&id)).await?.unwrap_or_default();
    let token_hash = stored_hash(token_key(&id)).await?.unwrap_or_default();
    let mut aside = false;
    for (file, hash) in [(&key_file, &key_hash), (&token_file, &token_hash)] {
        let mine = match std::fs::read_to_string(file) {
            Ok(s) => s.trim().to_string(),
            Err(_) => continue,
        };
        if !constant_time_eq(sha256_hex(&mine).as_bytes(), hash.as_bytes()) {
            let to = file.with_extension(format!(
                "{}.not-the-tenants",
                file.extension()
                    .and_then(|e| e.to_str())
                    .unwrap_or_default()
            ));
            if let Err(e) = std::fs::rename(file, &to) {
                tracing::warn!(file = %file.display(), error = %e, "cannot move aside a key that is not the tenant's");
            }
            aside = true;
        }
    }
    if aside {
        tracing::warn!(
            tenant = %home,
            "this gateway's enroll.key or api.token is not the tenant's and was moved aside (*.not-the-tenants); the tenant's are kept only as hashes: copy them from the data directory of the gateway that created them (or from your secret store), or create new ones through the API"
        );
    }
    tenants.reload().await
}

/// The tenant a secret belongs to: its `<tenant>.` part, or `home` for a secret from
/// before tenants.
fn tenant_of<'a>(secret: &'a str, home: &'a str) -> &'a str {
    match secret.split_once('.') {
        Some((tenant, _)) => tenant,
        None => home,
    }
}

impl Credentials {
    /// The credentials in `data_dir`, on files, with `home` as the tenant of secrets from
    /// before tenants (for tests and single-gateway use).
    pub async fn open(data_dir: &Path, home: &str) -> anyhow::Result<Credentials> {
        let store = Arc::new(crate::tenants::FileTenants::open(data_dir)?);
        let tenants = Tenants::open(store, &operator_token(data_dir, None)?, home).await?;
        adopt_home(&tenants, data_dir, home, None).await?;
        let secrets = FileSecrets::open(data_dir, home)?;
        Ok(Credentials::new(
            Arc::new(secrets),
            Arc::new(tenants),
            home,
            Box::new(|_| 0),
        ))
    }

    pub fn new(
        secrets: Arc<dyn SecretStore>,
        tenants: Arc<Tenants>,
        home: &str,
        agents: Box<dyn Fn(&str) -> u64 + Send + Sync>,
    ) -> Credentials {
        Credentials {
            secrets,
            tenants,
            home: home.to_string(),
            agents,
        }
    }

    /// Set how the number of a tenant's agents is counted (the registry knows).
    pub fn count_agents_with(&mut self, agents: Box<dyn Fn(&str) -> u64 + Send + Sync>) {
        self.agents = agents;
    }

    /// The home tenant: secrets from before tenants are its.
    pub fn home(&self) -> &str {
        &self.home
    }

    /// The tenant `credential` says it is of, before it is checked: its secret's, or the
    /// home tenant for an enrollment key (whose agent is new in any case).
    pub fn tenant_named_by<'a>(&'a self, credential: &'a outpost_protocol::Credential) -> &'a str {
        match credential {
            outpost_protocol::Credential::Secret { secret } => tenant_of(secret, &self.home),
            outpost_protocol::Credential::EnrollKey { .. } => &self.home,
        }
    }

    /// A gateway moving from its embedded bus to NATS brings its enrolled agents along,
    /// once: each local secret not yet in the bucket is added (never overwriting one
    /// there). Once only, so an agent forgotten in the fleet later is not brought back by
    /// a restart of a gateway that still has the old file.
    pub async fn import_local(&self, data_dir: &Path) -> anyhow::Result<()> {
        let marker = data_dir.join("agents").join("credentials.imported");
        if marker.exists() {
            return Ok(());
        }
        let local = FileSecrets::open(data_dir, &self.home)?;
        let mut imported = 0;
        for (tenant, fp, cred) in local.all() {
            let cred = AgentCredential {
                tenant: tenant.clone(),
                ..cred
            };
            if self.secrets.put(&tenant, &fp, &cred, None).await.is_ok() {
                imported += 1;
            }
        }
        if imported > 0 {
            tracing::info!(
                agents = imported,
                "added this gateway's enrolled agents to the fleet's credentials"
            );
        }
        let note = format!("agent secrets imported into NATS at {} ms; delete this file to import agents/credentials.json again\n", now_ms());
        write_atomic(&marker, note.as_bytes(), 0o600)
            .with_context(|| format!("cannot write {}", marker.display()))
    }

    /// Check an agent's credential, enrolling it when it presents an enrollment key (into
    /// the key's tenant). A new secret is stored (on disk, or in NATS) before this returns,
    /// so a crash cannot lose it; two enrollments of one fingerprint at once cannot both
    /// succeed.
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
        match credential {
            Credential::Secret { secret } => {
                let tenant = tenant_of(secret, &self.home);
                // Not a tenant at all: the same answer as a wrong secret.
                if crate::tenant::parse_name(tenant).is_err() {
                    return Err(AuthError::BadSecret(fingerprint.to_string()));
                }
                let known = self
                    .secrets
                    .get(tenant, fingerprint)
                    .await
                    .map_err(storage)?;
                let Some((known, revision)) = known else {
                    return Err(AuthError::UnknownAgent(fingerprint.to_string()));
                };
                // Its secret is gone: the agent is told why it will never log in again.
                if known.revoked_at_ms.is_some() {
                    return Err(AuthError::Revoked(fingerprint.to_string()));
                }
                if !constant_time_eq(
                    sha256_hex(secret).as_bytes(),
                    known.secret_sha256.as_bytes(),
                ) {
                    return Err(AuthError::BadSecret(fingerprint.to_string()));
                }
                self.tenants.enabled(tenant).map_err(AuthError::Refused)?;
                // Enrolled in a tenant of this name that was deleted since: not this one.
                let current = self
                    .tenants
                    .tenant(tenant)
                    .map(|t| t.id)
                    .unwrap_or_default();
                if known.tenant_id.as_ref().is_some_and(|id| *id != current) {
                    return Err(AuthError::UnknownAgent(fingerprint.to_string()));
                }
                let labels = known.labels.clone();
                if !known.confirmed {
                    self.confirm(tenant, fingerprint, known, revision).await;
                }
                Ok(Authenticated {
                    tenant: tenant.to_string(),
                    new_secret: None,
                    labels,
                })
            }
            Credential::EnrollKey { key, proof } => {
                let grant = self.tenants.enrollment(key).map_err(AuthError::Refused)?;
                let tenant = grant.tenant.as_str();
                let known = self
                    .secrets
                    .get(tenant, fingerprint)
                    .await
                    .map_err(storage)?;
                // Only to a holder of the key: the fingerprint is taken, for good.
                if known
                    .as_ref()
                    .is_some_and(|(c, _)| c.revoked_at_ms.is_some())
                {
                    return Err(AuthError::Revoked(fingerprint.to_string()));
                }
                may_enroll(fingerprint, known.as_ref().map(|(c, _)| c), proof)?;
                let new_agent = known.is_none();
                if new_agent {
                    let limit = self.tenants.tenant(tenant).and_then(|t| t.limits.agents);
                    if let Some(max) = limit.filter(|max| (self.agents)(tenant) >= *max) {
                        return Err(AuthError::TooManyAgents(tenant.to_string(), max));
                    }
                }
                // A key with a maximum is counted before the credential is stored: a
                // failure between the two over-counts by one, never lets a used-up key
                // enroll one more. Other keys are counted after, and a count that fails
                // fails nothing (it is for information).
                if new_agent && grant.limited {
                    match self.tenants.count_enrollment(&grant.key_id).await {
                        Ok(()) => {}
                        Err(EnrollCount::Refused(r)) => return Err(AuthError::Refused(r)),
                        Err(EnrollCount::Store(e)) => {
                            return Err(AuthError::Storage(format!(
                                "cannot count the enrollment on its key: {e}; retry"
                            )))
                        }
                    }
                }
                let secret = format!("{tenant}.{}", random_token(32));
                let credential = new_credential(&grant, &secret, proof);
                let expected = known.map(|(_, revision)| revision);
                self.secrets
                    .put(tenant, fingerprint, &credential, expected)
                    .await
                    .map_err(storage)?;
                if new_agent && !grant.limited {
                    if let Err(e) = self.tenants.count_enrollment(&grant.key_id).await {
                        tracing::debug!(key = %grant.key_id, error = %e, "enrollment not counted on its key");
                    }
                }
                Ok(Authenticated {
                    tenant: tenant.to_string(),
                    new_secret: Some(secret),
                    labels: grant.labels,
                })
            }
        }
    }

    /// The agent has shown it holds its secret: the enrollment key can no longer enroll
    /// its fingerprint again.
    pub async fn confirmed(&self, tenant: &str, fingerprint: &str) {
        match self.secrets.get(tenant, fingerprint).await {
            Ok(Some((known, revision))) if !known.confirmed => {
                self.confirm(tenant, fingerprint, known, revision).await
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
    pub async fn revoke(&self, tenant: &str, fingerprint: &str) -> Result<Option<u64>, StoreError> {
        // Compare-and-set, so a confirmation landing meanwhile cannot undo it.
        for _ in 0..5 {
            let Some((known, revision)) = self.secrets.get(tenant, fingerprint).await? else {
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
                .put(tenant, fingerprint, &revoked, Some(revision));
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
    pub async fn forget(&self, tenant: &str, fingerprint: &str) -> Result<(), StoreError> {
        self.secrets.delete(tenant, fingerprint).await
    }

    /// Whether the agent has a credential here (`None`: never enrolled, or forgotten),
    /// and whether it is revoked.
    pub async fn revoked(
        &self,
        tenant: &str,
        fingerprint: &str,
    ) -> Result<Option<bool>, StoreError> {
        let known = self.secrets.get(tenant, fingerprint).await?;
        Ok(known.map(|(c, _)| c.revoked_at_ms.is_some()))
    }

    async fn confirm(
        &self,
        tenant: &str,
        fingerprint: &str,
        known: AgentCredential,
        revision: u64,
    ) {
        let confirmed = AgentCredential {
            confirmed: true,
            ..known
        };
        let put = self
            .secrets
            .put(tenant, fingerprint, &confirmed, Some(revision));
        if let Err(e) = put.await {
            // Harmless: the agent stays re-enrollable (with its proof) until the next try.
            tracing::warn!(%fingerprint, error = %e, "cannot record that the agent confirmed its secret");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenants::NewKey;
    use outpost_protocol::Credential;

    const FP: &str = "0f8fad5b-d9cb-469f-a165-70867728950e";

    fn enroll(key: &str, proof: &str) -> Credential {
        Credential::EnrollKey {
            key: key.into(),
            proof: proof.into(),
        }
    }

    fn secret(s: &str) -> Credential {
        Credential::Secret { secret: s.into() }
    }

    async fn open(dir: &Path) -> (Credentials, String) {
        let creds = Credentials::open(dir, "default").await.unwrap();
        let key = std::fs::read_to_string(dir.join("enroll.key")).unwrap();
        (creds, key.trim().to_string())
    }

    #[tokio::test]
    async fn enroll_then_secret_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (creds, key) = open(dir.path()).await;
        let auth = creds.check(FP, &enroll(&key, "mine")).await.unwrap();
        let lost = auth.new_secret.expect("enrollment issues a secret");
        assert!(lost.starts_with("default."), "{lost}");
        // The agent never got (or never stored) that secret: enrolling again is allowed
        // until it confirms, and replaces the secret.
        let again = creds.check(FP, &enroll(&key, "mine")).await.unwrap();
        let s = again.new_secret.unwrap();
        assert_ne!(s, lost);
        assert_eq!(
            creds.check(FP, &secret(&lost)).await.err(),
            Some(AuthError::BadSecret(FP.into()))
        );
        creds.confirmed("default", FP).await;
        assert_eq!(
            creds.check(FP, &enroll(&key, "mine")).await.err(),
            Some(AuthError::AlreadyEnrolled(FP.into()))
        );
        drop(creds);
        let (creds, _) = open(dir.path()).await;
        assert!(creds.check(FP, &secret(&s)).await.is_ok());
        assert_eq!(
            creds.check(FP, &secret("default.nope")).await.err(),
            Some(AuthError::BadSecret(FP.into()))
        );
        let stored = std::fs::read_to_string(dir.path().join("agents/credentials.json")).unwrap();
        assert!(!stored.contains(&s), "secrets are stored hashed");
    }

    /// Audit finding 7: someone who knows a fingerprint (agent.finger was 0644) and the
    /// tenant's key could enroll it again before the agent confirmed, taking its identity.
    /// Only the proof the first enrollment carried may enroll it again.
    #[tokio::test]
    async fn an_unconfirmed_enrollment_is_taken_over_only_with_its_proof() {
        let dir = tempfile::tempdir().unwrap();
        let (creds, key) = open(dir.path()).await;
        let first = creds.check(FP, &enroll(&key, "victim")).await.unwrap();
        for thief in ["", "guess"] {
            assert_eq!(
                creds.check(FP, &enroll(&key, thief)).await.err(),
                Some(AuthError::OtherProof(FP.into()))
            );
        }
        let s = first.new_secret.unwrap();
        assert!(creds.check(FP, &secret(&s)).await.is_ok());
        // An agent that predates proofs keeps the old rule (it can enroll again).
        let old = "1f8fad5b-d9cb-469f-a165-70867728950e";
        creds.check(old, &enroll(&key, "")).await.unwrap();
        creds.check(old, &enroll(&key, "")).await.unwrap();
    }

    #[tokio::test]
    async fn wrong_key_and_unknown_agent_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (creds, _) = open(dir.path()).await;
        for key in ["guess", "ek.nope.nope", "ek..", ""] {
            assert_eq!(
                creds.check(FP, &enroll(key, "")).await.err(),
                Some(AuthError::Refused(Refusal::BadEnrollKey)),
                "{key}"
            );
        }
        assert_eq!(
            creds.check(FP, &secret("s")).await.err(),
            Some(AuthError::UnknownAgent(FP.into()))
        );
        // Not a tenant name: read as a wrong secret, not looked up.
        assert_eq!(
            creds.check(FP, &secret("a b.c")).await.err(),
            Some(AuthError::BadSecret(FP.into()))
        );
    }

    /// A secret from before tenants (no tenant part) is the home tenant's.
    #[tokio::test]
    async fn a_secret_from_before_tenants_logs_in_as_the_home_tenant() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("agents")).unwrap();
        let old = AgentCredential {
            tenant: "default".into(),
            secret_sha256: sha256_hex("0123abcd"),
            enrolled_at_ms: 1,
            confirmed: true,
            enroll_proof_sha256: None,
            revoked_at_ms: None,
            tenant_id: None,
            enroll_key_id: None,
            labels: BTreeMap::new(),
        };
        let file = serde_json::json!({ FP: old });
        std::fs::write(
            dir.path().join("agents/credentials.json"),
            serde_json::to_vec(&file).unwrap(),
        )
        .unwrap();
        let creds = Credentials::open(dir.path(), "blue").await.unwrap();
        let auth = creds.check(FP, &secret("0123abcd")).await.unwrap();
        assert_eq!(auth.tenant, "blue");
    }

    /// A key of another tenant enrolls into that tenant, with its labels; the same
    /// fingerprint in two tenants is two agents; a revoked, expired or used-up key
    /// refuses new agents, while agents it enrolled keep logging in; a disabled tenant's
    /// agents are refused; a tenant at its agent limit enrolls no more.
    #[tokio::test]
    async fn keys_enroll_into_their_tenant_and_their_rules_hold() {
        let dir = tempfile::tempdir().unwrap();
        let (mut creds, home_key) = open(dir.path()).await;
        let tenants = creds.tenants.clone();
        tenants
            .create_tenant("acme", Limits::default())
            .await
            .unwrap();
        let (k, acme_key) = tenants
            .create_key(
                "acme",
                NewKey {
                    max_enrollments: Some(2),
                    labels: [("site".to_string(), "lyon".to_string())].into(),
                    ..NewKey::default()
                },
            )
            .await
            .unwrap();
        let a = creds.check(FP, &enroll(&acme_key, "p")).await.unwrap();
        assert_eq!(a.tenant, "acme");
        assert_eq!(a.labels.get("site").map(String::as_str), Some("lyon"));
        let acme_secret = a.new_secret.unwrap();
        assert!(acme_secret.starts_with("acme."));
        // The same fingerprint in the home tenant: another agent.
        let d = creds.check(FP, &enroll(&home_key, "q")).await.unwrap();
        assert_eq!(d.tenant, "default");
        let home_secret = d.new_secret.unwrap();
        assert_eq!(
            creds.check(FP, &secret(&acme_secret)).await.unwrap().tenant,
            "acme"
        );
        assert_eq!(
            creds.check(FP, &secret(&home_secret)).await.unwrap().tenant,
            "default"
        );
        // A secret cannot be moved to another tenant by rewriting its prefix.
        let forged = acme_secret.replacen("acme.", "default.", 1);
        assert_eq!(
            creds.check(FP, &secret(&forged)).await.err(),
            Some(AuthError::BadSecret(FP.into()))
        );

        // Used up after two new agents.
        let fp2 = "2f8fad5b-d9cb-469f-a165-70867728950e";
        let fp3 = "3f8fad5b-d9cb-469f-a165-70867728950e";
        creds.check(fp2, &enroll(&acme_key, "p")).await.unwrap();
        assert_eq!(
            creds.check(fp3, &enroll(&acme_key, "p")).await.err(),
            Some(AuthError::Refused(Refusal::EnrollKeyUsedUp(k.id.clone())))
        );
        // Revoked: refuses new agents; the ones it enrolled still log in.
        let (k2, key2) = tenants.create_key("acme", NewKey::default()).await.unwrap();
        tenants.revoke_key("acme", &k2.id).await.unwrap();
        assert_eq!(
            creds.check(fp3, &enroll(&key2, "p")).await.err(),
            Some(AuthError::Refused(Refusal::EnrollKeyRevoked(k2.id.clone())))
        );
        // Another tenant cannot revoke it (it does not exist for them).
        let (k3, key3) = tenants.create_key("acme", NewKey::default()).await.unwrap();
        assert!(tenants.revoke_key("default", &k3.id).await.is_err());
        tenants.revoke_key("acme", &k.id).await.unwrap();
        assert!(creds.check(FP, &secret(&acme_secret)).await.is_ok());

        // At its agent limit: refused before anything is stored.
        tenants
            .update_tenant(
                "acme",
                None,
                Some(Limits {
                    agents: Some(2),
                    ..Limits::default()
                }),
            )
            .await
            .unwrap();
        creds.count_agents_with(Box::new(|t| if t == "acme" { 2 } else { 0 }));
        assert_eq!(
            creds.check(fp3, &enroll(&key3, "p")).await.err(),
            Some(AuthError::TooManyAgents("acme".into(), 2))
        );
        // Disabled: its agents and keys are refused.
        tenants
            .update_tenant("acme", Some(false), None)
            .await
            .unwrap();
        assert_eq!(
            creds.check(FP, &secret(&acme_secret)).await.err(),
            Some(AuthError::Refused(Refusal::TenantDisabled("acme".into())))
        );
        assert_eq!(
            creds.check(fp3, &enroll(&key3, "p")).await.err(),
            Some(AuthError::Refused(Refusal::TenantDisabled("acme".into())))
        );
        assert!(creds.check(FP, &secret(&home_secret)).await.is_ok());

        // Deleted and made again under the same name: the old tenant's agents are not the
        // new one's, even with their credential still stored.
        tenants.delete_tenant("acme").await.unwrap();
        tenants
            .create_tenant("acme", Limits::default())
            .await
            .unwrap();
        assert_eq!(
            creds.check(FP, &secret(&acme_secret)).await.err(),
            Some(AuthError::UnknownAgent(FP.into()))
        );
        // A gateway's home tenant is never deleted.
        tenants
            .update_tenant("default", Some(false), None)
            .await
            .unwrap();
        assert!(matches!(
            tenants.delete_tenant("default").await,
            Err(crate::tenants::AdminError::Conflict(_))
        ));
    }

    #[tokio::test]
    async fn corrupt_credentials_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("agents")).unwrap();
        std::fs::write(dir.path().join("agents/credentials.json"), b"{garbage").unwrap();
        let err = Credentials::open(dir.path(), "default")
            .await
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("corrupt"), "{err:#}");
    }
}
