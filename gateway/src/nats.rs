//! Everything that exists only when gateways run as a fleet on NATS (`--bus nats://…`):
//! the connection, the streams and buckets every gateway shares and their subjects and keys
//! (all namespaced by tenant), run-now between gateways ([`rpc`]) and the fleet's checks and
//! plugins ([`fleet_config`]). The embedded mode never touches this folder.
//!
//! | what | where |
//! |---|---|
//! | results | stream `OUTPOST_RESULTS_<tenant>` (`OUTPOST_RESULTS` for the fleet's home tenant), subject `outpost.<tenant>.results.<fingerprint>.<check>` (the check's dots as `~`), `Nats-Msg-Id` = `<tenant>.<fingerprint>:<seq>` |
//! | presence events | stream `OUTPOST_PRESENCE`, subject `outpost.<tenant>.presence.<fingerprint>` |
//! | alert and silence changes | stream `OUTPOST_ALERT_EVENTS`, subject `outpost.<tenant>.alerts.events` |
//! | fleet registry | KV `outpost_agents`, key `<tenant>.<fingerprint>` |
//! | live gateways | KV `outpost_gateways`, key `<gateway id>` (heartbeat, expires) |
//! | agent credentials | KV `outpost_credentials`, key `<tenant>.<fingerprint>`; tenant keys under `<tenant>._tenant` |
//! | run-now | request/reply on `outpost.<tenant>.rpc.<fingerprint>` |
//! | alerting | stream `OUTPOST_ALERTS`, KV `outpost_alerts`, `outpost.<tenant>.alerts.*` ([`alerts`]) |

pub mod alerts;
pub mod bus;
pub mod fleet_config;
mod follow;
pub mod registry;
pub mod rpc;
pub mod secrets;
pub mod tenants;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, kv, stream};

/// Resolved NATS options.
#[derive(Debug, Clone)]
pub struct NatsSettings {
    pub urls: Vec<String>,
    pub creds: Option<PathBuf>,
    pub user: Option<(String, String)>,
    pub ca: Option<PathBuf>,
    pub client_cert: Option<(PathBuf, PathBuf)>,
    pub replicas: usize,
    pub results_max_age: Duration,
    pub results_max_bytes: i64,
    pub dedup_window: Duration,
    /// Where replies to this connection's requests arrive: per tenant (`_INBOX_<tenant>`),
    /// so a NATS user can be limited to its own tenant's replies. (Tenants are kept apart
    /// by NATS accounts, not by permissions: FLEET.md, *Who may do what on NATS*.)
    pub inbox_prefix: String,
    /// The gateway's home tenant (`--tenant`): its results stay in `OUTPOST_RESULTS`.
    pub home: String,
}

impl NatsSettings {
    /// These settings for a connection of `tenant`'s (its inbox prefix, its home).
    pub fn for_tenant(self, tenant: &str) -> NatsSettings {
        NatsSettings {
            inbox_prefix: inbox_prefix(tenant),
            home: tenant.to_string(),
            ..self
        }
    }

    /// The results stream every tenant's stream is made like: `name` for `subject`s,
    /// holding at most `max_bytes` (JetStream's -1: no cap).
    pub fn results_stream_config(
        &self,
        name: &str,
        tenant: &str,
        max_bytes: i64,
    ) -> stream::Config {
        stream::Config {
            name: name.into(),
            description: Some(format!(
                "Outpost check results and metrics of tenant {tenant}"
            )),
            subjects: vec![results_filter(tenant)],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            num_replicas: self.replicas,
            max_age: self.results_max_age,
            max_bytes,
            duplicate_window: self.dedup_window,
            allow_direct: true,
            ..Default::default()
        }
    }
}

/// The reply subject prefix of `tenant`'s connections.
pub fn inbox_prefix(tenant: &str) -> String {
    format!("_INBOX_{tenant}")
}
/// The home tenant's results stream (every tenant's before tenants had streams of their
/// own); any other tenant's is [`results_stream`].
pub const RESULTS_STREAM: &str = "OUTPOST_RESULTS";

/// The results stream of `tenant` when it is not the one `OUTPOST_RESULTS` holds.
pub fn results_stream(tenant: &str) -> String {
    format!("{RESULTS_STREAM}_{tenant}")
}
pub const PRESENCE_STREAM: &str = "OUTPOST_PRESENCE";
pub const AUDIT_STREAM: &str = "OUTPOST_AUDIT";
/// Changes of the tenants' alerts and silences, for the event stream.
pub const ALERT_EVENTS_STREAM: &str = "OUTPOST_ALERT_EVENTS";
pub const AGENTS_BUCKET: &str = "outpost_agents";
pub const GATEWAYS_BUCKET: &str = "outpost_gateways";
pub const CREDENTIALS_BUCKET: &str = "outpost_credentials";
pub const TENANTS_BUCKET: &str = "outpost_tenants";

/// An agent's results: each check's on a subject of its own below this one
/// ([`check_subject`]); releases before per-check subjects published on this one.
pub fn results_subject(tenant: &str, fingerprint: &str) -> String {
    format!("outpost.{tenant}.results.{fingerprint}")
}

/// The subject of one check's results: the agent's subject and the check's name, whose
/// dots (token separators in NATS) become `~` (no check name has one), so JetStream's
/// per-subject index finds one check's results without reading any other's.
pub fn check_subject(tenant: &str, fingerprint: &str, check: &str) -> String {
    format!(
        "outpost.{tenant}.results.{fingerprint}.{}",
        check.replace('.', "~")
    )
}

/// Every result of `tenant`: what its results stream holds.
pub fn results_filter(tenant: &str) -> String {
    format!("outpost.{tenant}.results.>")
}

/// Changes of `tenant`'s alerts and silences.
pub fn alert_events_subject(tenant: &str) -> String {
    format!("outpost.{tenant}.alerts.events")
}

pub fn presence_subject(tenant: &str, fingerprint: &str) -> String {
    format!("outpost.{tenant}.presence.{fingerprint}")
}

/// Audit events of `tenant` (`_` when the caller named no tenant that exists).
pub fn audit_subject(tenant: &str) -> String {
    let tenant = if tenant.is_empty() { "_" } else { tenant };
    format!("outpost.{tenant}.audit")
}

pub fn rpc_subject(tenant: &str, fingerprint: &str) -> String {
    format!("outpost.{tenant}.rpc.{fingerprint}")
}

/// An ordered consumer of each key of `store` matching `filter`, newest entry first, then
/// every change; with a name (see [`watch_keys`]). `headers_only`: keys and operations,
/// without values.
pub(crate) async fn key_consumer(
    client: &async_nats::Client,
    store: &kv::Store,
    filter: &str,
    headers_only: bool,
) -> anyhow::Result<
    async_nats::jetstream::consumer::Consumer<async_nats::jetstream::consumer::push::OrderedConfig>,
> {
    use async_nats::jetstream::consumer::{push, DeliverPolicy, ReplayPolicy};
    Ok(store
        .stream
        .create_consumer(push::OrderedConfig {
            name: Some(format!("outpost_{}", crate::util::random_token(8))),
            deliver_subject: client.new_inbox(),
            description: Some("outpost keys".into()),
            filter_subject: format!("{}{filter}", store.prefix),
            headers_only,
            replay_policy: ReplayPolicy::Instant,
            deliver_policy: DeliverPolicy::LastPerSubject,
            ..Default::default()
        })
        .await?)
}

/// A watch of the keys of `store` matching `filter` (`acme.>`, `acme.*`): each key's
/// newest entry, then every change, as async-nats' `watch_with_history` gives them, but
/// on a consumer with a name. With a name the filter is part of the request's subject
/// (`$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>`), so NATS permissions can limit a
/// user to watching some keys; without one the filter is only in the request's body,
/// where permissions cannot see it.
pub async fn watch_keys(
    client: &async_nats::Client,
    store: &kv::Store,
    filter: &str,
) -> anyhow::Result<impl futures_util::Stream<Item = anyhow::Result<kv::Entry>> + Unpin> {
    use futures_util::StreamExt;
    let consumer = key_consumer(client, store, filter, false)
        .await
        .with_context(|| format!("cannot watch {} in {}", filter, store.name))?;
    let (bucket, prefix) = (store.name.clone(), store.prefix.clone());
    let messages = consumer.messages().await?;
    Ok(messages.map(move |m| {
        let m = m.map_err(|e| anyhow::anyhow!("watch of {bucket}: {e}"))?;
        let info = m
            .info()
            .map_err(|e| anyhow::anyhow!("watch of {bucket}: {e}"))?;
        let operation = match m
            .headers
            .as_ref()
            .and_then(|h| h.get("KV-Operation"))
            .map(|op| op.as_str())
        {
            Some("DEL") => kv::Operation::Delete,
            Some("PURGE") => kv::Operation::Purge,
            _ => kv::Operation::Put,
        };
        Ok(kv::Entry {
            bucket: bucket.clone(),
            key: m
                .subject
                .as_str()
                .strip_prefix(prefix.as_str())
                .unwrap_or(m.subject.as_str())
                .to_string(),
            value: m.payload.clone(),
            revision: info.stream_sequence,
            delta: info.pending,
            created: info.published,
            operation,
            seen_current: info.pending == 0,
        })
    }))
}

/// The registry and credentials key of an agent.
pub use crate::bus::agent_key;

/// A live NATS connection with everything the gateway uses on it.
pub struct Nats {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub agents: kv::Store,
    pub gateways: kv::Store,
    pub credentials: kv::Store,
    pub tenants: kv::Store,
    /// Alerting's leases and snapshots' places ([`alerts`]).
    pub alerts: kv::Store,
    pub settings: NatsSettings,
}

impl Nats {
    /// Connect and make sure the streams and buckets exist. Later outages are ridden out by
    /// reconnecting; at start, a NATS that does not answer within the JetStream timeout
    /// (10 s) is an error, so a service manager restarts the gateway.
    pub async fn connect(settings: &NatsSettings, name: &str) -> anyhow::Result<Nats> {
        Self::open(settings, name, true).await
    }

    /// Connect for a one-off command: an unreachable NATS is an error at once.
    pub async fn connect_once(settings: &NatsSettings, name: &str) -> anyhow::Result<Nats> {
        Self::open(settings, name, false).await
    }

    async fn open(settings: &NatsSettings, name: &str, retry: bool) -> anyhow::Result<Nats> {
        let mut opts = match &settings.creds {
            Some(path) => async_nats::ConnectOptions::with_credentials_file(path)
                .await
                .with_context(|| format!("cannot read NATS credentials {}", path.display()))?,
            None => async_nats::ConnectOptions::new(),
        };
        if let Some((user, password)) = &settings.user {
            opts = opts.user_and_password(user.clone(), password.clone());
        }
        if let Some(ca) = &settings.ca {
            opts = opts.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let Some((cert, key)) = &settings.client_cert {
            opts = opts.add_client_certificate(cert.clone(), key.clone());
        }
        let mut opts = opts
            .name(name)
            .custom_inbox_prefix(settings.inbox_prefix.clone())
            .connection_timeout(Duration::from_secs(5));
        if retry {
            opts = opts.retry_on_initial_connect();
        }
        let opts = opts.event_callback(|event| async move {
            tracing::info!(%event, "NATS connection event");
        });
        let client = opts
            .connect(settings.urls.clone())
            .await
            .with_context(|| format!("cannot connect to NATS at {}", settings.urls.join(",")))?;
        let js = jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(10))
            .build(client.clone());
        home_results_stream(&js, settings).await?;
        // Event streams: kept as long as results, with no byte cap of their own.
        let events = |name: &str, description: &str, subject: &str| stream::Config {
            name: name.into(),
            description: Some(description.into()),
            subjects: vec![subject.into()],
            storage: stream::StorageType::File,
            // No byte cap (JetStream's -1; the default 0 reads back as -1 and made a
            // spurious "other settings" warning at every start).
            max_bytes: -1,
            num_replicas: settings.replicas,
            max_age: settings.results_max_age,
            // JetStream wants the window within the max age.
            duplicate_window: Duration::from_secs(120).min(settings.results_max_age),
            allow_direct: true,
            ..Default::default()
        };
        let presence = events(
            PRESENCE_STREAM,
            "Outpost agent presence events",
            "outpost.*.presence.*",
        );
        ensure_stream(&js, presence).await?;
        let audit = events(
            AUDIT_STREAM,
            "Outpost audit events: refused access per tenant",
            "outpost.*.audit",
        );
        ensure_stream(&js, audit).await?;
        let alert_events = events(
            ALERT_EVENTS_STREAM,
            "Outpost alert and silence changes per tenant, for the event stream",
            &alert_events_subject("*"),
        );
        ensure_stream(&js, alert_events).await?;
        let bucket = |name: &str, description: &str, history: i64, max_age: Duration| kv::Config {
            bucket: name.into(),
            description: description.into(),
            history,
            max_age,
            storage: stream::StorageType::File,
            num_replicas: settings.replicas,
            ..Default::default()
        };
        let agents = ensure_bucket(
            &js,
            bucket(
                AGENTS_BUCKET,
                "Outpost fleet registry: each agent's presence and the gateway holding it",
                1,
                Duration::ZERO,
            ),
        )
        .await?;
        let gateways = ensure_bucket(
            &js,
            bucket(
                GATEWAYS_BUCKET,
                "Outpost gateways alive (heartbeats)",
                1,
                crate::registry::GATEWAY_TTL * 4,
            ),
        )
        .await?;
        let credentials = ensure_bucket(
            &js,
            bucket(
                CREDENTIALS_BUCKET,
                "Outpost agent secrets (SHA-256) and tenant keys",
                1,
                Duration::ZERO,
            ),
        )
        .await?;
        let tenants = ensure_bucket(
            &js,
            bucket(
                TENANTS_BUCKET,
                "Outpost tenants, their enrollment keys and API tokens (SHA-256)",
                1,
                Duration::ZERO,
            ),
        )
        .await?;
        ensure_stream(&js, alerts::stream_config(settings.replicas)).await?;
        let alerts = ensure_bucket(
            &js,
            bucket(
                alerts::ALERTS_BUCKET,
                "Outpost alerting: each tenant's lease and where its state's snapshot is",
                1,
                Duration::ZERO,
            ),
        )
        .await?;
        Ok(Nats {
            client,
            js,
            agents,
            gateways,
            credentials,
            tenants,
            alerts,
            settings: settings.clone(),
        })
    }

    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }
}

/// Make sure `OUTPOST_RESULTS` holds the home tenant's results, or another tenant's when
/// a gateway of another home made it first (each other tenant has a stream of its own).
/// A stream from before tenants had streams (`outpost.*.results.*`) is narrowed to the home
/// tenant, so each other tenant's stream can be made beside it; what it holds of other
/// tenants stays readable there until its age runs out.
async fn home_results_stream(
    js: &jetstream::Context,
    settings: &NatsSettings,
) -> anyhow::Result<()> {
    let config =
        settings.results_stream_config(RESULTS_STREAM, &settings.home, settings.results_max_bytes);
    let stream = ensure_stream(js, config).await?;
    let mut info = stream.cached_info().config.clone();
    if info.subjects == [results_subject("*", "*")] {
        info.subjects = vec![results_filter(&settings.home)];
        js.update_stream(&info)
            .await
            .context("cannot narrow the results stream OUTPOST_RESULTS to the home tenant")?;
        tracing::info!(tenant = %settings.home, "OUTPOST_RESULTS now holds the home tenant's results; other tenants get streams of their own");
    }
    Ok(())
}

async fn ensure_stream(
    js: &jetstream::Context,
    config: stream::Config,
) -> anyhow::Result<stream::Stream> {
    let name = config.name.clone();
    let limits = |c: &stream::Config| (c.num_replicas, c.max_age, c.max_bytes, c.duplicate_window);
    let wanted = limits(&config);
    // A cluster that is still forming (or has just lost a node) refuses placement for a
    // while; a gateway started beside it waits rather than exiting.
    let deadline = tokio::time::Instant::now() + CLUSTER_FORMING_WAIT;
    let mut s = loop {
        match js.get_or_create_stream(config.clone()).await {
            Ok(s) => break s,
            Err(e) if cluster_forming(&e) && tokio::time::Instant::now() < deadline => {
                tracing::warn!(stream = %name, error = %e, "the NATS cluster cannot place the stream yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot create or open the JetStream stream {name}"));
            }
        }
    };
    let info = s.info().await.context("cannot read stream info")?;
    let have = limits(&info.config);
    if have != wanted {
        tracing::warn!(stream = %name, ?have, ?wanted, "stream exists with other settings (replicas, max age, max bytes, duplicate window); keeping them — change them with the nats CLI");
    }
    Ok(s)
}

/// How long a starting gateway waits for a forming NATS cluster to place its streams.
const CLUSTER_FORMING_WAIT: Duration = Duration::from_secs(60);

/// Errors JetStream answers while its cluster is forming or electing: worth a retry.
fn cluster_forming(e: &jetstream::context::CreateStreamError) -> bool {
    use jetstream::context::CreateStreamErrorKind as K;
    use jetstream::ErrorCode as C;
    match e.kind() {
        K::JetStreamUnavailable | K::TimedOut => true,
        K::JetStream(e) => [
            C::CLUSTER_NO_PEERS,
            C::CLUSTER_NOT_AVAILABLE,
            C::CLUSTER_INCOMPLETE,
            C::CLUSTER_NOT_ACTIVE,
            C::CLUSTER_NOT_LEADER,
        ]
        .contains(&e.error_code()),
        _ => false,
    }
}

/// Write `value` at `key` if the key is still at revision `expected` (`None`: it must not
/// exist, or be deleted): the compare-and-set every shared store is built on. A race lost
/// is [`StoreError::Conflict`].
pub(crate) async fn put_if(
    kv: &kv::Store,
    key: &str,
    value: Vec<u8>,
    expected: Option<crate::secrets::Revision>,
) -> Result<crate::secrets::Revision, crate::secrets::StoreError> {
    use crate::secrets::StoreError;
    use kv::{CreateErrorKind, UpdateErrorKind};
    let unavailable = |e: &dyn std::fmt::Display| StoreError::Unavailable(format!("NATS: {e}"));
    match expected {
        None => kv
            .create(key, value.into())
            .await
            .map_err(|e| match e.kind() {
                CreateErrorKind::AlreadyExists => StoreError::Conflict,
                _ => unavailable(&e),
            }),
        Some(rev) => kv
            .update(key, value.into(), rev)
            .await
            .map_err(|e| match e.kind() {
                UpdateErrorKind::WrongLastRevision => StoreError::Conflict,
                _ => unavailable(&e),
            }),
    }
}

/// Open a KV bucket, creating it if it is missing (another gateway creating it at the same
/// moment is fine).
pub(crate) async fn ensure_bucket(
    js: &jetstream::Context,
    config: kv::Config,
) -> anyhow::Result<kv::Store> {
    let name = config.bucket.clone();
    match js.get_key_value(&name).await {
        Ok(store) => Ok(store),
        Err(_) => match js.create_key_value(config).await {
            Ok(store) => Ok(store),
            // Another gateway created it at the same moment.
            Err(_) => js
                .get_key_value(&name)
                .await
                .with_context(|| format!("cannot create or open the KV bucket {name}")),
        },
    }
}

/// Open an object store, creating it if it is missing, as [`ensure_bucket`] does.
pub(crate) async fn ensure_object_store(
    js: &jetstream::Context,
    config: jetstream::object_store::Config,
) -> anyhow::Result<jetstream::object_store::ObjectStore> {
    let name = config.bucket.clone();
    match js.get_object_store(&name).await {
        Ok(store) => Ok(store),
        Err(_) => match js.create_object_store(config).await {
            Ok(store) => Ok(store),
            Err(_) => js
                .get_object_store(&name)
                .await
                .with_context(|| format!("cannot create or open the object store {name}")),
        },
    }
}
