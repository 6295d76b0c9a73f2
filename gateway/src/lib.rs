//! The Outpost gateway: accepts agents over TLS websocket (`outpost.v1`), authenticates
//! and enrolls them, hands their results to a bus and acks only what the bus made durable,
//! serves check definitions, the HTTP API and the console.
//!
//! It is a library with a thin binary: [`serve`] takes an already-bound listener and a
//! cancellation token, so tests run it on port 0 and shut it down cleanly.

pub mod alerting;
pub mod alerts;
pub mod api;
pub mod audit;
pub mod bus;
pub mod checks;
pub mod console;
pub mod credentials;
pub mod errors;
pub mod events;
pub mod export;
pub mod exporting;
pub mod health;
pub mod hub;
pub mod listener;
pub mod metrics;
pub mod nats;
pub mod placing;
pub mod rate;
pub mod registry;
pub mod releases;
pub mod releases_manifest;
pub mod rollout;
pub mod runnow;
pub mod secrets;
pub mod session;
pub mod settings;
pub mod tenant;
pub mod tenants;
pub mod tls;
pub mod util;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use settings::Settings;

/// The gateway's parts, made once by [`prepare`] and wired together by [`serve`]. Only this
/// file sees them all: every layer is handed the parts it uses.
pub struct Gateway {
    pub settings: Arc<Settings>,
    pub credentials: Arc<credentials::Credentials>,
    pub registry: Arc<registry::Registry>,
    pub checks: Arc<checks::TenantChecks>,
    /// The tenants' alert evaluators, for the API.
    pub alerting: Arc<alerting::Hub>,
    pub bus: Arc<dyn bus::Bus>,
    pub hub: Arc<hub::Hub>,
    pub metrics: Arc<metrics::Metrics>,
    /// Each tenant's result rate here (shared by every session of the tenant).
    pub tenant_rates: Arc<rate::TenantRates>,
    /// Refused access: counted, and kept on the bus.
    pub audit: Arc<audit::Audit>,
    /// The pool of connections not yet authenticated (the listener takes from it).
    pub admission: listener::Admission,
    pub shutdown: CancellationToken,
    /// Which background tasks are failing now (`/readyz` reports them).
    pub health: Arc<health::Health>,
    /// The NATS connection when the gateway runs in a fleet (`--bus nats://…`).
    pub nats: Option<Arc<nats::Nats>>,
    /// Held for the process's life: no second gateway opens this data directory.
    _data_dir_lock: std::fs::File,
}

impl Gateway {
    /// What the registry's upkeep and presence publishing use.
    fn upkeep(&self) -> registry::Upkeep {
        registry::Upkeep {
            registry: self.registry.clone(),
            bus: self.bus.clone(),
            hub: self.hub.clone(),
            metrics: self.metrics.clone(),
            presence_grace: self.settings.presence_grace,
            listen: self.settings.listen.to_string(),
            shutdown: self.shutdown.clone(),
        }
    }

    /// What agent sessions use.
    fn sessions(&self) -> session::Services {
        session::Services {
            settings: self.settings.clone(),
            credentials: self.credentials.clone(),
            checks: self.checks.clone(),
            registry: self.registry.clone(),
            bus: self.bus.clone(),
            hub: self.hub.clone(),
            metrics: self.metrics.clone(),
            shutdown: self.shutdown.clone(),
            nats: self.nats.clone(),
            tenant_rates: self.tenant_rates.clone(),
            audit: self.audit.clone(),
        }
    }

    fn runnow(&self) -> runnow::Local {
        runnow::Local {
            hub: self.hub.clone(),
            agents: self.registry.clone(),
        }
    }

    /// What the HTTP API uses.
    fn api(&self, tracker: TaskTracker) -> api::Services {
        api::Services {
            sessions: Arc::new(self.sessions()),
            registry: self.registry.clone(),
            hub: self.hub.clone(),
            credentials: self.credentials.clone(),
            metrics: self.metrics.clone(),
            health: self.health.clone(),
            admission: self.admission.clone(),
            bus: self.bus.clone(),
            runnow: self.runnow(),
            audit: self.audit.clone(),
            nats: self.nats.clone(),
            shutdown: self.shutdown.clone(),
            tracker,
            alerting: self.alerting.clone(),
            events: self.settings.events,
            event_tails: Arc::default(),
        }
    }
}

/// What `prepare` found or created in the data directory, printed by the binary.
pub struct Prepared {
    pub gateway: Arc<Gateway>,
    pub tls: tls::TlsIdentity,
}

/// Open (or initialise) the data directory: TLS identity, keys, credentials, bus, checks.
pub async fn prepare(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<Prepared> {
    // Made for the gateway's user only; an existing one is left as its operator set it
    // (its secrets and the bus are private in any case).
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(&settings.data_dir)
        .with_context(|| {
            format!(
                "cannot create data directory {}",
                settings.data_dir.display()
            )
        })?;
    let data_dir_lock = lock_data_dir(&settings.data_dir)?;
    let tls = tls::TlsIdentity::load_or_generate(&settings).map_err(|e| {
        if settings.tls_cert.is_some() {
            // The operator's files: retrying will not help.
            settings::ConfigError {
                problems: vec![format!("--tls-cert/--tls-key: {e:#}")],
            }
            .into()
        } else {
            e
        }
    })?;
    let me = registry::Me {
        gateway_id: gateway_id(&settings)?,
        incarnation: util::random_token(6),
    };
    let nats = match &settings.nats {
        Some(n) => Some(Arc::new(
            nats::Nats::connect(n, &format!("outpost-gateway {}", me.gateway_id)).await?,
        )),
        None => None,
    };
    let operator =
        credentials::operator_token(&settings.data_dir, settings.operator_token_file.as_deref())
            .map_err(|e| match settings.operator_token_file {
                // The operator's file: retrying will not help.
                Some(_) => settings::ConfigError {
                    problems: vec![format!("--operator-token-file: {e:#}")],
                }
                .into(),
                None => e,
            })?;
    let (tenant_store, secrets): (Arc<dyn tenants::TenantStore>, Arc<dyn secrets::SecretStore>) =
        match &nats {
            Some(n) => (
                Arc::new(nats::tenants::NatsTenants::new(n.clone())),
                Arc::new(nats::secrets::NatsSecrets::new(n.clone())),
            ),
            None => (
                Arc::new(tenants::FileTenants::open(&settings.data_dir)?),
                Arc::new(secrets::FileSecrets::open(
                    &settings.data_dir,
                    &settings.tenant,
                )?),
            ),
        };
    let tenants =
        Arc::new(tenants::Tenants::open(tenant_store, &operator, &settings.tenant).await?);
    credentials::adopt_home(
        &tenants,
        &settings.data_dir,
        &settings.tenant,
        nats.as_deref(),
    )
    .await?;
    let mut credentials =
        credentials::Credentials::new(secrets, tenants, &settings.tenant, Box::new(|_| 0));
    if nats.is_some() {
        credentials.import_local(&settings.data_dir).await?;
    }
    let (bus, registry): (Arc<dyn bus::Bus>, _) = match &nats {
        Some(n) => (
            Arc::new(nats::bus::NatsBus::new(n.clone())),
            registry::Registry::shared(Arc::new(nats::registry::NatsRecords::new(n.clone())), me),
        ),
        None => {
            let (bus, recovered) = bus::embedded::EmbeddedBus::open(
                &settings.data_dir.join("bus"),
                settings.retention,
                &settings.tenant,
            )
            .await
            .context("cannot open the embedded bus")?;
            let registry = registry::Registry::open(&settings.data_dir, recovered, me)?;
            for rec in registry.list_all() {
                if let Ok(None) = credentials.revoked(&rec.tenant, &rec.fingerprint).await {
                    registry.drop_unenrolled(&rec.agent());
                }
            }
            (Arc::new(bus), registry)
        }
    };
    let registry = Arc::new(registry);
    let counted = registry.clone();
    credentials.count_agents_with(Box::new(move |tenant| counted.count(tenant)));
    if let Some(n) = &nats {
        nats::fleet_config::sync_once(
            n,
            &settings.tenant,
            &settings.checks_dir,
            &settings.plugins_dir,
        )
        .await
        .context("cannot load the fleet's checks and plugins from NATS")?;
    }
    let checks = checks::TenantChecks::open(
        &settings.tenant,
        &settings.checks_dir,
        &settings.plugins_dir,
    )?;
    let admission = listener::admission(&settings);
    let metrics: Arc<metrics::Metrics> = Arc::default();
    let audit = Arc::new(audit::Audit::new(
        bus.clone(),
        metrics.clone(),
        &registry.me.gateway_id,
    ));
    let gateway = Arc::new(Gateway {
        settings: Arc::new(settings),
        credentials: Arc::new(credentials),
        registry,
        checks: Arc::new(checks),
        alerting: Arc::default(),
        bus,
        hub: Arc::default(),
        metrics,
        tenant_rates: Arc::default(),
        audit,
        admission,
        shutdown,
        health: Arc::default(),
        nats,
        _data_dir_lock: data_dir_lock,
    });
    Ok(Prepared { gateway, tls })
}

/// Another gateway holds the data directory: a start that may succeed later (an old
/// process still draining on the same volume), so not a configuration error.
#[derive(Debug, thiserror::Error)]
#[error("--data-dir {dir}: {holder} (an outpost-gateway) is using it; each gateway needs its own data directory")]
pub struct DataDirInUse {
    pub dir: String,
    pub holder: String,
}

/// Take the data directory for this process (an exclusive lock on `DATA_DIR/gateway.lock`,
/// released when the process ends however it ends). Its files (agent secrets, registry,
/// embedded bus) each have one writer; a second gateway started on the same directory by
/// mistake is refused, naming the one that holds it, instead of corrupting them.
fn lock_data_dir(data_dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    use std::io::{Read, Seek, Write};
    let path = data_dir.join("gateway.lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => "another process".to_string(),
                pid => format!("process {pid}"),
            };
            return Err(DataDirInUse {
                dir: data_dir.display().to_string(),
                holder,
            }
            .into());
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
    let pid = std::process::id().to_string();
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| file.write_all(pid.as_bytes()))
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(file)
}

/// `--gateway-id`, or the id saved in `DATA_DIR/gateway.id` (made on first start).
fn gateway_id(settings: &Settings) -> anyhow::Result<String> {
    if let Some(id) = &settings.gateway_id {
        return Ok(id.clone());
    }
    let path = settings.data_dir.join("gateway.id");
    match std::fs::read_to_string(&path) {
        Ok(s) => {
            tenant::parse_name(s.trim()).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = format!("gw-{}", util::random_token(4));
            util::write_atomic(&path, format!("{id}\n").as_bytes(), 0o644)
                .with_context(|| format!("cannot write {}", path.display()))?;
            Ok(id)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Give the bus every tenant's byte limit, at start and whenever a tenant changes (here
/// or, on NATS, on another gateway). A limit the bus could not apply is tried again a
/// little later.
async fn keep_tenant_limits(
    tenants: Arc<tenants::Tenants>,
    bus: Arc<dyn bus::Bus>,
    shutdown: CancellationToken,
) {
    const RETRY: Duration = Duration::from_secs(10);
    let mut changes = tenants.watch();
    loop {
        changes.mark_unchanged();
        let mut failed = false;
        for t in tenants.list_tenants() {
            if let Err(e) = bus.keep_bytes(&t.name, t.limits.bus_bytes).await {
                tracing::warn!(tenant = %t.name, error = %e, "cannot bound the tenant's bytes on the bus yet; will retry");
                failed = true;
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = changes.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(RETRY), if failed => {}
        }
    }
}

/// Run `task` for the gateway's life under [`health::supervise`].
fn background<F, Fut>(tracker: &TaskTracker, gw: &Gateway, name: &'static str, task: F)
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    health::supervise(tracker, gw.health.clone(), gw.shutdown.clone(), name, task);
}

/// Run the gateway on `listener` until `gateway.shutdown` is cancelled, then stop
/// accepting, close agent sessions with "going away", and wait up to `grace` for them.
pub async fn serve(
    prepared: Prepared,
    listener: TcpListener,
    grace: Duration,
) -> anyhow::Result<()> {
    let Prepared { gateway, tls } = prepared;
    let tracker = TaskTracker::new();
    let gw = &gateway;
    let (store, metrics, poll, stop) = (
        gw.checks.clone(),
        gw.metrics.clone(),
        gw.settings.checks_poll,
        gw.shutdown.clone(),
    );
    background(&tracker, gw, "checks watch", move || {
        checks::watch(store.clone(), metrics.clone(), poll, stop.clone())
    });
    let (tenants, bus, stop) = (
        gw.credentials.tenants.clone(),
        gw.bus.clone(),
        gw.shutdown.clone(),
    );
    background(&tracker, gw, "tenant limits on the bus", move || {
        keep_tenant_limits(tenants.clone(), bus.clone(), stop.clone())
    });
    let upkeep = gw.upkeep();
    background(&tracker, gw, "registry", move || {
        registry::maintain(upkeep.clone())
    });
    if let Some(n) = &gw.nats {
        let (up, n1) = (gw.upkeep(), n.clone());
        background(&tracker, gw, "gateway heartbeat", move || {
            nats::registry::heartbeat(up.clone(), n1.clone())
        });
        let (tenants, n3, stop) = (
            gw.credentials.tenants.clone(),
            n.clone(),
            gw.shutdown.clone(),
        );
        background(&tracker, gw, "tenants follow", move || {
            nats::tenants::follow(tenants.clone(), n3.clone(), stop.clone())
        });
        let (up, n2) = (gw.upkeep(), n.clone());
        background(&tracker, gw, "registry follow", move || {
            nats::registry::follow(up.clone(), n2.clone())
        });
        let mirror = nats::fleet_config::Mirror {
            task: nats::fleet_config::MIRROR_TASK,
            nats: n.clone(),
            tenant: gw.settings.tenant.clone(),
            checks_dir: gw.settings.checks_dir.clone(),
            plugins_dir: gw.settings.plugins_dir.clone(),
            health: gw.health.clone(),
            shutdown: gw.shutdown.clone(),
        };
        background(&tracker, gw, nats::fleet_config::MIRROR_TASK, move || {
            mirror.clone().run()
        });
        // Every other tenant's configuration is mirrored from when its first agent
        // connects here.
        let (n4, health, stop, tasks) = (
            n.clone(),
            gw.health.clone(),
            gw.shutdown.clone(),
            tracker.clone(),
        );
        gw.checks
            .on_new_tenant(Box::new(move |tenant, checks_dir, plugins_dir| {
                // Named once per tenant for the process's life (a handful of tenants).
                let task: &'static str =
                    Box::leak(format!("fleet config mirror of {tenant}").into_boxed_str());
                let mirror = nats::fleet_config::Mirror {
                    task,
                    nats: n4.clone(),
                    tenant: tenant.to_string(),
                    checks_dir: checks_dir.to_path_buf(),
                    plugins_dir: plugins_dir.to_path_buf(),
                    health: health.clone(),
                    shutdown: stop.clone(),
                };
                health::supervise(&tasks, health.clone(), stop.clone(), task, move || {
                    mirror.clone().run()
                });
            }));
    }
    {
        match alerts::deliver::Sender::new() {
            Ok(sender) => {
                let ctx = alerting::Context {
                    dir: alerting::alerts_dir(&gw.settings.data_dir),
                    bus: gw.bus.clone(),
                    registry: gw.registry.clone(),
                    checks: gw.checks.clone(),
                    metrics: gw.metrics.clone(),
                    sender: Arc::new(sender),
                    shutdown: gw.shutdown.clone(),
                    tracker: tracker.clone(),
                    health: gw.health.clone(),
                    tenants: gw.credentials.tenants.clone(),
                    poll: gw.settings.checks_poll,
                    running: Arc::default(),
                    hub: gw.alerting.clone(),
                    nats: gw.nats.clone(),
                    gateway_id: gw.registry.me.gateway_id.clone(),
                };
                background(&tracker, gw, "alerting", move || alerting::run(ctx.clone()));
            }
            Err(e) => tracing::error!(error = %format!("{e:#}"), "alerting cannot start"),
        }
    }
    {
        match alerts::deliver::http_client() {
            Ok(client) => {
                let ctx = exporting::Context {
                    dir: exporting::export_dir(&gw.settings.data_dir),
                    bus: gw.bus.clone(),
                    registry: gw.registry.clone(),
                    checks: gw.checks.clone(),
                    metrics: gw.metrics.clone(),
                    client,
                    shutdown: gw.shutdown.clone(),
                    tracker: tracker.clone(),
                    health: gw.health.clone(),
                    tenants: gw.credentials.tenants.clone(),
                    poll: gw.settings.checks_poll,
                    fleet: gw.nats.clone().map(|nats| {
                        Arc::new(nats::alerts::Leases {
                            nats,
                            gateway: gw.registry.me.gateway_id.clone(),
                            incarnation: gw.registry.me.incarnation.clone(),
                        })
                    }),
                    running: Arc::default(),
                };
                background(&tracker, gw, "metric export", move || {
                    exporting::run(ctx.clone())
                });
            }
            Err(e) => tracing::error!(error = %format!("{e:#}"), "metric export cannot start"),
        }
    }
    {
        let (checks, registry, hub, stop) = (
            gw.checks.clone(),
            gw.registry.clone(),
            gw.hub.clone(),
            gw.shutdown.clone(),
        );
        background(&tracker, gw, "placement", move || {
            placing::run(checks.clone(), registry.clone(), hub.clone(), stop.clone())
        });
    }
    let app = api::router(gw.api(tracker.clone()), &gw.settings);
    let conns = listener::Connections {
        admission: gw.admission.clone(),
        metrics: gw.metrics.clone(),
        write_deadline: gw.settings.write_deadline,
        shutdown: gw.shutdown.clone(),
    };
    listener::accept_loop(
        listener,
        tls.server_config.clone(),
        app,
        conns,
        tracker.clone(),
    )
    .await;
    tracker.close();
    // Every connection and agent session is a task of the tracker: waiting for it is
    // waiting for them.
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            tasks = tracker.len(),
            sessions = gateway.hub.connected(),
            "grace period over; exiting with work still running"
        );
    }
    gateway
        .registry
        .flush()
        .context("cannot save the agent registry")?;
    if let Some(n) = &gateway.nats {
        // Whatever is still buffered (the last presence events, the heartbeat's removal).
        if let Err(e) = tokio::time::timeout(Duration::from_secs(5), n.client.flush()).await {
            tracing::warn!(error = %e, "NATS did not take the last messages in time");
        }
    }
    Ok(())
}
