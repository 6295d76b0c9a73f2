//! The Outpost gateway: accepts agents over TLS websocket (`outpost.v1`), authenticates
//! and enrolls them, hands their results to a bus and acks only what the bus made durable,
//! serves check definitions, the HTTP API and the console.
//!
//! It is a library with a thin binary: [`serve`] takes an already-bound listener and a
//! cancellation token, so tests run it on port 0 and shut it down cleanly.

pub mod api;
pub mod bus;
pub mod checks;
pub mod console;
pub mod credentials;
pub mod hub;
pub mod listener;
pub mod metrics;
pub mod registry;
pub mod releases;
pub mod releases_manifest;
pub mod rollout;
pub mod session;
pub mod settings;
pub mod tls;
pub mod util;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use settings::Settings;

/// Everything a request handler or an agent session needs, shared behind an `Arc`.
pub struct Gateway {
    pub settings: Settings,
    pub credentials: credentials::Credentials,
    pub registry: registry::Registry,
    pub checks: checks::CheckStore,
    pub bus: Arc<dyn bus::Bus>,
    pub hub: hub::Hub,
    pub metrics: metrics::Metrics,
    pub shutdown: CancellationToken,
}

/// What `prepare` found or created in the data directory, printed by the binary.
pub struct Prepared {
    pub gateway: Arc<Gateway>,
    pub tls: tls::TlsIdentity,
}

/// Open (or initialise) the data directory: TLS identity, keys, credentials, bus, checks.
pub async fn prepare(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<Prepared> {
    std::fs::create_dir_all(&settings.data_dir).with_context(|| {
        format!(
            "cannot create data directory {}",
            settings.data_dir.display()
        )
    })?;
    let tls = tls::TlsIdentity::load_or_generate(&settings)?;
    let credentials = credentials::Credentials::open(&settings.data_dir)?;
    let (bus, recovered) = bus::embedded::EmbeddedBus::open(&settings.data_dir.join("bus"))
        .await
        .context("cannot open the embedded bus")?;
    let registry = registry::Registry::open(&settings.data_dir, recovered)?;
    let checks = checks::CheckStore::open(&settings.checks_dir, &settings.plugins_dir)?;
    let gateway = Arc::new(Gateway {
        settings,
        credentials,
        registry,
        checks,
        bus: Arc::new(bus),
        hub: hub::Hub::default(),
        metrics: metrics::Metrics::default(),
        shutdown,
    });
    Ok(Prepared { gateway, tls })
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
    tracker.spawn(checks::watch(gateway.clone()));
    tracker.spawn(registry::flush_periodically(gateway.clone()));
    let app = api::router(gateway.clone());
    listener::accept_loop(
        listener,
        tls.server_config.clone(),
        app,
        gateway.clone(),
        tracker.clone(),
    )
    .await;
    tracker.close();
    // Upgraded websocket sessions run outside the tracker; they watch the same token and
    // leave the hub as they end.
    let drained = async {
        tracker.wait().await;
        while gateway.hub.connected() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    if tokio::time::timeout(grace, drained).await.is_err() {
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
    Ok(())
}
