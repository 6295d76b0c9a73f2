//! The Outpost agent: identifies itself by a fingerprint, dials out to its gateway over
//! TLS websocket, pulls its checks, runs them on its own schedule, and keeps every result
//! in its outbox until the gateway acks it.
//!
//! A library with a thin binary: [`run`] takes checked [`Settings`] and a cancellation
//! token; cancelling it sends `bye` and stops.

pub mod checks;
pub mod collectors;
pub mod config_diff;
pub mod connection;
pub mod gateway_addr;
pub mod identity;
pub mod local_checks;
pub mod outbox;
pub mod plugins;
pub mod scheduler;
#[cfg(windows)]
#[path = "service_windows.rs"]
pub mod service;
pub mod settings;
pub mod spawn;
pub mod statsd;
pub mod supervise;
pub mod tls;
pub mod update;
pub mod util;
pub mod version;

use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

pub use settings::Settings;

pub use outbox::OUTBOX_CHECK;
pub use version::{AGENT_TARGET, AGENT_VERSION};

/// The agent's async runtime, however it was started (console or Windows service): two
/// worker threads are plenty, since checks run as processes or on their own tasks.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

/// Run the agent until `shutdown` is cancelled.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    if let Some(staged) = run_updating(settings, shutdown).await? {
        tracing::warn!(to = %staged.to, "an update was staged but this caller cannot restart the agent; it runs at the next start");
    }
    Ok(())
}

/// Run the agent until `shutdown` is cancelled or it stops to try a new binary, which it
/// returns: the caller (without a runtime running) passes it to [`update::after_run`].
pub async fn run_updating(
    settings: Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<Option<update::Staged>> {
    // Cancelled on shutdown, or by the updater to hand over to a new binary.
    let shutdown = shutdown.child_token();
    let identity = identity::Identity::load_or_create(&settings.paths)
        .context("cannot establish the agent's identity")?;
    {
        // For scripts and tests; a closed stdout must not stop the agent.
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "fingerprint {}", identity.fingerprint).and_then(|_| out.flush());
    }
    tracing::info!(fingerprint = %identity.fingerprint, "agent starting");
    let tls = tls::client_config(&settings.trust).context("cannot set up TLS")?;
    let (disk, moved_aside) =
        outbox::DiskOutbox::open(&settings.paths.state_dir, settings.outbox_max_bytes)
            .context("cannot open the outbox")?;
    let outbox: Arc<dyn outbox::Outbox> = Arc::new(disk);
    // First, so that a new binary's first result says which version it is and why.
    let updater = update::Updater::new(&settings, tls.clone(), outbox.clone(), shutdown.clone());
    if let Some(why) = moved_aside {
        // Said once, as a result that reaches the gateway like any other.
        tracing::error!(reason = %why, "outbox file was corrupt; started a fresh one");
        let r = outpost_protocol::CheckResult {
            started_at_ms: util::now_ms(),
            ..outpost_protocol::CheckResult::new(
                OUTBOX_CHECK,
                outpost_protocol::Status::Critical,
                why,
            )
        };
        if let Err(e) = outbox.append(r) {
            tracing::error!(error = %e, "cannot queue the outbox error result");
        }
    }
    let plugins = Arc::new(plugins::PluginStore::new(&settings.paths.plugins_dir));
    let runner = Arc::new(checks::Runner::new(
        plugins,
        checks::interpreters::Interpreters::for_platform(&settings.interpreters),
    ));
    let scheduler = scheduler::Scheduler::new(
        identity.fingerprint.clone(),
        outbox.clone(),
        runner,
        settings.max_concurrent_checks,
        &settings.paths.state_dir,
    );
    let cached_collectors = scheduler.load_cached();
    let collectors = collectors::Collectors::start(
        settings.paths.state_dir.join("collectors"),
        settings.hostname.clone(),
        outbox.clone(),
    )
    .await
    .context("cannot start the collectors' listeners")?;
    collectors.apply(cached_collectors).await;
    // The host's applications' metrics (StatsD, Graphite), when asked for.
    let mut intakes = Vec::new();
    // A port that cannot be had (another daemon on it) is said as a CRITICAL result of
    // the check; the agent goes on with everything else.
    let refused = |check: &str, listen: std::net::SocketAddr, e: std::io::Error| {
        tracing::error!(check, %listen, error = %e, "cannot listen for the host's metrics");
        let r = outpost_protocol::CheckResult {
            started_at_ms: util::now_ms(),
            ..outpost_protocol::CheckResult::new(
                check,
                outpost_protocol::Status::Critical,
                format!("cannot listen on {listen}: {e}"),
            )
        };
        if let Err(e) = outbox.append(r) {
            tracing::error!(error = %e, "cannot queue the listener's error");
        }
    };
    if let Some(s) = settings.statsd.clone() {
        let listen = s.listen;
        match statsd::start(s, outbox.clone(), shutdown.clone()).await {
            Ok((_, flusher)) => intakes.push(flusher),
            Err(e) => refused(statsd::STATSD_CHECK, listen, e),
        }
    }
    if let Some(s) = settings.graphite.clone() {
        let listen = s.listen;
        match statsd::start_graphite(s, outbox.clone(), shutdown.clone()).await {
            Ok((_, flusher)) => intakes.push(flusher),
            Err(e) => refused(statsd::GRAPHITE_CHECK, listen, e),
        }
    }
    let local = local_checks::LocalChecks::new(
        &settings.paths.checks_dir,
        settings.labels.clone(),
        settings.groups.clone(),
    );
    let watcher = tokio::spawn(local_checks::watch(
        local,
        scheduler.clone(),
        outbox.clone(),
        settings.checks_poll,
        shutdown.clone(),
    ));
    let conn = connection::Connection {
        updater: updater.clone(),
        identity,
        tls,
        outbox: outbox.clone(),
        scheduler: scheduler.clone(),
        collectors: collectors.clone(),
        addrs: tokio::sync::Mutex::new(gateway_addr::AddrBook::load(
            &settings.paths.state_dir,
            &settings.host,
            settings.port,
        )),
        settings: Arc::new(settings),
        drops_reported: std::sync::Mutex::new((outbox.dropped(), false)),
    };
    conn.run(shutdown.clone()).await;
    watcher.abort();
    let stopping_checks =
        scheduler.stop_all(checks::daemon::STOP_GRACE + std::time::Duration::from_secs(1));
    tokio::join!(stopping_checks, collectors.stop_all());
    // The last interval's StatsD and Graphite metrics, into the outbox before it is
    // flushed.
    for flusher in intakes {
        let _ = flusher.await;
    }
    if let Err(e) = outbox::blocking(|| outbox.flush()) {
        tracing::error!(error = %e, pending = outbox.len(), "stopping before every result reached the disk");
    }
    Ok(updater.take_staged())
}
