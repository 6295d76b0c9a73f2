//! Collectors: long-running programs (collectd, fluentd, anything) declared by the
//! gateway, kept alive by the agent, configured from the declaration, their data brought
//! home through the outbox. Not here: the declaration's format and rules
//! (`outpost_protocol::CollectorSpec`) and when declarations arrive (the agent's config
//! handling calls [`Collectors::apply`]).
//!
//! What runs: each declared collector, rendered by [`render`] into an argv, an environment
//! and a configuration file, and kept alive by [`process`]: started in its own process
//! group with a cleared environment plus the declared `env`, its stdout and stderr logged
//! (rate limited), restarted with exponential backoff (1 s doubling to 60 s) when it exits,
//! left stopped after 5 exits within 120 s (a crash loop) until its declaration changes,
//! stopped with SIGTERM and then SIGKILL after 3 s.
//!
//! Files, under the work dir (`STATE_DIR/collectors`, mode 0700), one directory per
//! collector (`NAME/`): its configuration (`collectd.conf`, `fluent.conf` or
//! `collector.conf`, mode 0600, rewritten only when its content changes) and `pid`
//! (`PID START`, the process's start time from `/proc`). A pid file whose process still
//! runs when the agent starts belongs to a collector an earlier agent could not stop
//! (kill -9): it is stopped before anything is started, so there are never two copies.
//!
//! Listeners, one of each per agent on 127.0.0.1 and an ephemeral port ([`listen`]):
//! Graphite plaintext over TCP, where a path starts with `NAME@SECRET.` (collectd's
//! `Prefix`), and HTTP, where fluentd posts JSON arrays of records to
//! `/collector/NAME/TAG` as the user NAME with the password SECRET. SECRET is the
//! collector's own random [`secret::Secret`], rendered into its configuration file: every
//! local user can reach 127.0.0.1, only the collector (and the agent's user) can read the
//! file. Lines and requests without it are refused, idle and slow connections are closed,
//! and idle connections cannot crowd a collector out (see [`listen`]).
//!
//! Checks reported through the outbox:
//! - `collector.NAME`, its health, on every change and every 60 s while it runs: OK
//!   running (pid, uptime; once it has stayed up 2 s); WARNING restarting (how it ended, when it starts again, exits
//!   in the window, its last output); CRITICAL crash loop (with its last lines of output);
//!   CRITICAL config error (the declaration cannot be rendered, the file cannot be
//!   written, the program cannot be started — retried every minute). On Windows every
//!   declared collector is CRITICAL "not supported on Windows agents": collectors run on
//!   Linux only.
//! - `collector.NAME.metrics`, its data ([`data`]): every interval, OK "N metrics from
//!   collectd" with the latest value of each metric received in the interval, split into
//!   several results of at most `MAX_METRICS` metrics when there are more.

pub mod data;
pub mod listen;
pub mod pidfile;
pub mod process;
pub mod render;
pub mod secret;
#[cfg(all(test, unix))]
mod tests;

use outpost_sys::lock;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outpost_protocol::{CollectorSpec, MAX_COLLECTORS};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::outbox::Outbox;
use data::Sinks;
use process::Phase;
use render::Rendered;

/// How often the buffered data is looked at for collectors whose interval has come.
const FLUSH_TICK: Duration = Duration::from_millis(500);
/// Most often the listeners' refusals are summed up in the log.
const REFUSALS_LOGGED_EVERY: Duration = Duration::from_secs(60);

/// One collector the manager runs.
struct Running {
    spec: CollectorSpec,
    rendered: Result<Rendered, String>,
    phase: Arc<Mutex<Phase>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    fn phase(&self) -> Phase {
        *lock(&self.phase)
    }

    async fn stop(self) {
        self.stop.cancel();
        if let Err(e) = self.task.await {
            tracing::error!(collector = %self.spec.name, error = %e, "collector supervisor failed");
        }
    }
}

/// Runs the declared collectors.
pub struct Collectors {
    work_dir: PathBuf,
    hostname: String,
    outbox: Arc<dyn Outbox>,
    sinks: Arc<Sinks>,
    graphite: SocketAddr,
    http: SocketAddr,
    running: tokio::sync::Mutex<BTreeMap<String, Running>>,
    /// The latest declarations handed to [`Collectors::apply_soon`], for the task that
    /// applies them in order.
    queued: tokio::sync::watch::Sender<Option<Vec<CollectorSpec>>>,
    /// Set by `stop_all`: nothing starts afterwards.
    stopped: std::sync::atomic::AtomicBool,
    /// Ends the listeners and the flusher when the manager is dropped.
    background: CancellationToken,
}

impl Drop for Collectors {
    fn drop(&mut self) {
        self.background.cancel();
    }
}

impl Collectors {
    /// Start the manager: `work_dir` (STATE_DIR/collectors) holds the rendered configuration
    /// files and pid files; health and data results go to `outbox`. Collectors left
    /// running by an earlier agent (their pid files say so) are stopped first, and the
    /// listeners are bound.
    pub async fn start(
        work_dir: PathBuf,
        hostname: String,
        outbox: Arc<dyn Outbox>,
    ) -> std::io::Result<Arc<Collectors>> {
        Self::start_with(work_dir, hostname, outbox, listen::Limits::default()).await
    }

    /// [`Collectors::start`] with the listeners' connection limits and timeouts.
    pub async fn start_with(
        work_dir: PathBuf,
        hostname: String,
        outbox: Arc<dyn Outbox>,
        limits: listen::Limits,
    ) -> std::io::Result<Arc<Collectors>> {
        std::fs::create_dir_all(&work_dir)?;
        // The collectors' files hold their secrets: only the agent's user may look inside.
        #[cfg(unix)]
        std::fs::set_permissions(
            &work_dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )?;
        stop_leftovers(&work_dir).await;
        let graphite = TcpListener::bind((render::LISTEN_HOST, 0)).await?;
        let http = TcpListener::bind((render::LISTEN_HOST, 0)).await?;
        let sinks = Arc::new(Sinks::new(&hostname));
        let background = CancellationToken::new();
        let (queued, mut next) = tokio::sync::watch::channel(None);
        let c = Arc::new(Collectors {
            queued,
            stopped: Default::default(),
            graphite: graphite.local_addr()?,
            http: http.local_addr()?,
            work_dir,
            hostname,
            outbox: outbox.clone(),
            sinks: sinks.clone(),
            running: tokio::sync::Mutex::new(BTreeMap::new()),
            background: background.clone(),
        });
        tracing::info!(graphite = %c.graphite, http = %c.http, "collector listeners ready");
        tokio::spawn(listen::graphite(
            graphite,
            sinks.clone(),
            limits,
            background.clone(),
        ));
        tokio::spawn(listen::http(
            http,
            sinks.clone(),
            limits,
            background.clone(),
        ));
        tokio::spawn(flusher(sinks, outbox, background));
        let weak = Arc::downgrade(&c);
        tokio::spawn(async move {
            while next.changed().await.is_ok() {
                let specs = next.borrow_and_update().clone();
                let (Some(specs), Some(me)) = (specs, weak.upgrade()) else {
                    continue;
                };
                me.apply(specs).await;
            }
        });
        Ok(c)
    }

    /// Like [`Collectors::apply`], without waiting: the connection hands over a new
    /// configuration and carries on while old collectors stop. Declarations applied this
    /// way take effect in order; one superseded before its turn is skipped.
    pub fn apply_soon(&self, specs: Vec<CollectorSpec>) {
        self.queued.send_replace(Some(specs));
    }

    /// Where the Graphite listener is.
    pub fn graphite_addr(&self) -> SocketAddr {
        self.graphite
    }

    /// Where the HTTP listener is.
    pub fn http_addr(&self) -> SocketAddr {
        self.http
    }

    /// What the listeners received and could not take.
    pub fn counts(&self) -> data::Counts {
        self.sinks.counts()
    }

    /// The collector's own directory.
    pub fn dir(&self, name: &str) -> PathBuf {
        self.work_dir.join(name)
    }

    fn render(&self, spec: &CollectorSpec) -> Result<Rendered, String> {
        let dir = self.dir(&spec.name);
        let secret = self.sinks.secret(&spec.name);
        let ctx = render::Context {
            hostname: &self.hostname,
            dir: &dir,
            graphite_port: self.graphite.port(),
            http_port: self.http.port(),
            secret: secret.expose(),
        };
        render::render(spec, &ctx).map_err(|e| e.to_string())
    }

    /// Run exactly `specs`: start new collectors, stop removed ones, and restart a changed
    /// one only when its rendered configuration file, command or environment changed (or
    /// when it was in a crash loop or a config error: a new declaration is a new try).
    pub async fn apply(&self, specs: Vec<CollectorSpec>) {
        let mut wanted: BTreeMap<String, CollectorSpec> = BTreeMap::new();
        for spec in specs {
            if wanted.len() >= MAX_COLLECTORS {
                tracing::error!(collector = %spec.name, "more than {MAX_COLLECTORS} collectors declared; ignoring the rest");
                break;
            }
            if wanted.contains_key(&spec.name) {
                tracing::error!(collector = %spec.name, "collector declared twice; the first declaration is used");
                continue;
            }
            wanted.insert(spec.name.clone(), spec);
        }
        let mut running = self.running.lock().await;
        if self.stopped.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let mut to_stop = Vec::new();
        let mut to_start = Vec::new();
        for name in running.keys().cloned().collect::<Vec<_>>() {
            if !wanted.contains_key(&name) {
                self.sinks.remove(&name);
                to_stop.extend(running.remove(&name));
            }
        }
        for (name, spec) in wanted {
            let rendered = self.render(&spec);
            match running.get_mut(&name) {
                Some(r) if r.spec == spec => {}
                Some(r)
                    if r.rendered == rendered
                        && !matches!(r.phase(), Phase::CrashLoop | Phase::ConfigError) =>
                {
                    tracing::info!(collector = %name, "collector declaration changed; its rendering did not, so it keeps running");
                    self.sinks.declare(&spec);
                    r.spec = spec;
                }
                Some(_) => {
                    tracing::info!(collector = %name, "collector declaration changed; restarting it");
                    to_stop.extend(running.remove(&name));
                    to_start.push((spec, rendered));
                }
                None => to_start.push((spec, rendered)),
            }
        }
        // The old generation is gone before a new one starts: never two at once.
        futures_util::future::join_all(to_stop.into_iter().map(Running::stop)).await;
        for (spec, rendered) in to_start {
            self.sinks.declare(&spec);
            let phase = Arc::new(Mutex::new(Phase::Starting));
            let stop = CancellationToken::new();
            let job = process::Job {
                name: spec.name.clone(),
                kind: spec.kind,
                check: spec.health_check(),
                dir: self.dir(&spec.name),
                rendered: rendered.clone(),
            };
            let task = tokio::spawn(process::supervise(
                job,
                self.outbox.clone(),
                phase.clone(),
                stop.clone(),
            ));
            running.insert(
                spec.name.clone(),
                Running {
                    spec,
                    rendered,
                    phase,
                    stop,
                    task,
                },
            );
        }
    }

    /// Stop every collector (TERM, then KILL after the grace period; each one's process
    /// group is gone when this returns) and send the data they had buffered.
    pub async fn stop_all(&self) {
        self.stopped
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let mut running = self.running.lock().await;
        let all = std::mem::take(&mut *running);
        futures_util::future::join_all(all.into_values().map(Running::stop)).await;
        for r in self.sinks.flush_due(Instant::now(), true) {
            if let Err(e) = self.outbox.append(r) {
                tracing::error!(error = %e, "cannot queue a collector's metrics");
            }
        }
        for name in self.sinks.names() {
            self.sinks.remove(&name);
        }
    }

    /// The phase of a running collector, for tests and status.
    pub async fn phase(&self, name: &str) -> Option<Phase> {
        self.running.lock().await.get(name).map(Running::phase)
    }
}

/// Stop every collector an earlier agent left running (see [`pidfile`]).
async fn stop_leftovers(work_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(work_dir) else {
        return;
    };
    let files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path().join(pidfile::FILE))
        .filter(|p| p.is_file())
        .collect();
    futures_util::future::join_all(files.iter().map(|f| {
        let dir = f.parent().unwrap_or(work_dir);
        pidfile::stop_stale(f, dir, None, crate::supervise::STOP_GRACE)
    }))
    .await;
}

/// Every [`FLUSH_TICK`], the data of collectors whose interval has come goes to the outbox;
/// at most every [`REFUSALS_LOGGED_EVERY`], what the listeners refused since is logged.
async fn flusher(sinks: Arc<Sinks>, outbox: Arc<dyn Outbox>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(FLUSH_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut logged = (Instant::now(), data::Counts::default());
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        for r in sinks.flush_due(Instant::now(), false) {
            if let Err(e) = outbox.append(r) {
                tracing::error!(error = %e, "cannot queue a collector's metrics");
            }
        }
        if logged.0.elapsed() >= REFUSALS_LOGGED_EVERY {
            let now = sinks.counts();
            log_refusals(&logged.1, &now);
            logged = (Instant::now(), now);
        }
    }
}

/// A warning when the listeners refused anything between `before` and `now`: someone on
/// this host is sending to them without a collector's secret, or holding connections.
fn log_refusals(before: &data::Counts, now: &data::Counts) {
    let unauthenticated = now.unauthenticated - before.unauthenticated;
    let evicted = now.evicted - before.evicted;
    let timed_out = now.timed_out - before.timed_out;
    let over_capacity = now.over_capacity - before.over_capacity;
    if unauthenticated + evicted + timed_out + over_capacity > 0 {
        tracing::warn!(
            unauthenticated,
            evicted,
            timed_out,
            over_capacity,
            "collector listeners refused lines or requests without a collector's secret, or closed idle or slow connections, in the last minute"
        );
    }
}
