//! The schedule: one task per check, firing on a fixed grid with a deterministic per-agent
//! phase (the splay) so a fleet does not fire in step, or at the wall-clock times of a
//! cron expression, behind a global concurrency limit. Daemon checks get a supervisor
//! task instead (see `checks::daemon`); they hold no slot of the limit.
//!
//! The checks run are the gateway's merged with the host's own `checks.d` (a local check
//! whose name the gateway also uses is not run; the gateway's wins). A new configuration
//! from either side is compared with the running one; only added, removed and changed
//! checks are started or stopped. A run that overruns its interval skips the slots it
//! missed rather than piling up.
//!
//! Soft and hard states: a non-OK result is soft until it has repeated `max_attempts`
//! times in a row, and while soft the check reruns every `retry_interval_secs` instead of
//! waiting for its next slot. Results go to the outbox and nowhere else, so the schedule
//! keeps running whatever happens to the connection.
//!
//! Restarts: each check's soft/hard state and the time of its last run are cached in
//! `checks-state.json` (see [`state`]), written at most every [`state::SAVE_EVERY`] while
//! results come in and once more when the checks are stopped. A check that starts again
//! with the same definition carries on where it was: soft 2/3 goes on to a hard 3/3, a
//! hard problem stays hard. Its first run after the restart is decided by [`resume_at`]:
//! - a soft retry that fell due while the agent was down, or an interval check whose grid
//!   slot passed meanwhile, runs at once (spread over a few seconds by the splay, like a
//!   new check), while one that ran recently waits for its next slot as if the agent had
//!   not stopped;
//! - a cron check waits for its next cron time: cron is for wall-clock times, and a time
//!   missed while the agent was down is not made up (only a due soft retry runs at once);
//! - a daemon check has no schedule: it starts at once as always, with its state restored.
//!
//! A check whose definition changed, or that has no cached state, starts fresh (first run
//! within [`FIRST_RUN_SPREAD_MS`]). Cached states are matched to checks when they start
//! from the cached configuration or from the first read of `checks.d`; whatever is left
//! unmatched then is dropped, and the file keeps only the checks that run.

mod state;

use outpost_sys::lock;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_protocol::probe::Probe;
use outpost_protocol::{
    CheckResult, CheckSpec, CollectorSpec, Origin, RpcError, RpcErrorCode, StateType, Status,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::checks::{self, Runner};
use crate::config_diff;
use crate::outbox::Outbox;
use crate::util::{now_ms, write_atomic};

#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

struct Inner {
    fingerprint: String,
    outbox: Arc<dyn Outbox>,
    runner: Arc<Runner>,
    limit: Arc<Semaphore>,
    /// One lock per check name, shared by every generation of the check and by run-now,
    /// so two runs of the same check never overlap.
    run_locks: Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// `config.json`: the gateway's configuration as last received.
    cache_path: PathBuf,
    /// `checks-state.json`: the checks' states, for the next start.
    state_path: PathBuf,
    state: Mutex<State>,
    /// Soft/hard tracking and last result per check name; survives config changes of the
    /// check.
    states: Mutex<BTreeMap<String, state::CheckState>>,
    /// States read from the cache at start that no check has claimed yet.
    restored: Mutex<BTreeMap<String, state::Saved>>,
    /// Whether `states` or the running set changed since the state file was written.
    dirty: AtomicBool,
    /// Whether the last write of the state file failed (said once, not every time).
    save_failing: AtomicBool,
    /// Whether the host's checks have been read once (the cached states still unclaimed
    /// then are for checks that no longer exist).
    local_applied: AtomicBool,
    /// Set by `stop_all`: the state file is not written again.
    stopped: AtomicBool,
    /// Whether a session with the gateway is up. Checks about entities run only then: an
    /// agent out of touch may have lost them to another agent by now.
    in_touch: AtomicBool,
    /// One write of the state file at a time (they share a temp file name).
    save_lock: Mutex<()>,
    /// The task writing the state file while it changes.
    saver: Mutex<Option<(CancellationToken, tokio::task::JoinHandle<()>)>>,
}

#[derive(Default)]
struct State {
    /// Hash of the gateway's configuration being run, for `hello`.
    hash: Option<String>,
    /// The gateway's checks, as last received.
    gateway: Vec<CheckSpec>,
    /// The host's own checks (`checks.d`), as last read.
    local: Vec<CheckSpec>,
    running: BTreeMap<String, Running>,
    next_generation: u64,
}

/// Where a check's state stands between runs: the last hard status and how many non-OK
/// results in a row it has seen.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tracker {
    hard: Option<Status>,
    attempt: u32,
    /// Whether the last result was soft: the check is then rerun on its retry interval.
    soft: bool,
}

impl Tracker {
    /// Classify a new result: soft while a non-OK status has not yet repeated
    /// `max_attempts` times; OK is always hard (a recovery resets the count); a hard
    /// problem state that changes severity stays hard.
    pub fn classify(&mut self, status: Status, max_attempts: u32) -> (StateType, u32) {
        let (state, attempt) = self.next(status, max_attempts);
        self.soft = state == StateType::Soft;
        (state, attempt)
    }

    fn next(&mut self, status: Status, max_attempts: u32) -> (StateType, u32) {
        let max = max_attempts.max(1);
        if status == Status::Ok {
            *self = Tracker {
                hard: Some(Status::Ok),
                attempt: 0,
                soft: false,
            };
            return (StateType::Hard, 1);
        }
        if self.hard.is_some_and(|h| h != Status::Ok) {
            self.hard = Some(status);
            self.attempt = max;
            return (StateType::Hard, max);
        }
        self.attempt = (self.attempt + 1).min(max);
        if self.attempt >= max {
            self.hard = Some(status);
            (StateType::Hard, self.attempt)
        } else {
            (StateType::Soft, self.attempt)
        }
    }
}

struct Running {
    spec: CheckSpec,
    /// [`state::spec_hash`] of `spec`, for the state file.
    spec_hash: String,
    stop: CancellationToken,
    generation: u64,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Serialize, Deserialize)]
struct Cached {
    hash: String,
    checks: Vec<CheckSpec>,
    /// Kept here, in the same file as the checks and their hash, so the hash the agent
    /// says it runs always covers the collectors it runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    collectors: Vec<CollectorSpec>,
}

/// The check's phase within its interval, in milliseconds: the same for the same agent
/// and check every time, different across agents.
pub fn splay_ms(fingerprint: &str, check: &str, interval_ms: u64) -> u64 {
    let d = Sha256::digest(format!("{fingerprint}/{check}").as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_be_bytes(b) % interval_ms.max(1)
}

/// The first slot strictly after `now` on the grid `phase + k * interval`.
pub fn next_slot(now_ms: u64, phase_ms: u64, interval_ms: u64) -> u64 {
    let interval = interval_ms.max(1);
    if now_ms < phase_ms {
        return phase_ms;
    }
    let k = (now_ms - phase_ms) / interval + 1;
    phase_ms.saturating_add(k.saturating_mul(interval))
}

/// A new or changed check first runs within this long (spread by the splay), instead of
/// waiting up to a whole interval for its slot.
pub const FIRST_RUN_SPREAD_MS: u64 = 10_000;

/// When a check runs next: soon after it starts (spread by its phase), then on its grid
/// but never sooner than half an interval after the previous start.
pub fn next_run(now_ms: u64, last_start_ms: Option<u64>, phase_ms: u64, interval_ms: u64) -> u64 {
    match last_start_ms {
        None => now_ms + phase_ms % interval_ms.clamp(1, FIRST_RUN_SPREAD_MS),
        Some(prev) => next_slot(
            now_ms.max(prev.saturating_add(interval_ms / 2)),
            phase_ms,
            interval_ms,
        ),
    }
}

/// When a check first runs after the agent restarted, given when its last run made the
/// next one due (`due_after_prev`: its soft retry, or its next grid slot). Due while the
/// agent was down: at once, `spread_ms` after `now`. Not yet due: then, as if the agent had
/// never stopped.
pub fn resume_at(now_ms: u64, due_after_prev: u64, spread_ms: u64) -> u64 {
    if due_after_prev <= now_ms {
        now_ms + spread_ms
    } else {
        due_after_prev
    }
}

impl Scheduler {
    /// Say whether a session with the gateway is up (checks about entities run only
    /// then).
    pub fn set_in_touch(&self, up: bool) {
        self.inner.in_touch.store(up, Ordering::Relaxed);
    }

    pub fn new(
        fingerprint: String,
        outbox: Arc<dyn Outbox>,
        runner: Arc<Runner>,
        max_concurrent: usize,
        state_dir: &std::path::Path,
    ) -> Scheduler {
        Scheduler {
            inner: Arc::new(Inner {
                fingerprint,
                outbox,
                runner,
                limit: Arc::new(Semaphore::new(max_concurrent.max(1))),
                run_locks: Mutex::new(BTreeMap::new()),
                cache_path: state_dir.join("config.json"),
                state_path: state_dir.join(state::FILE),
                state: Mutex::new(State::default()),
                states: Mutex::new(BTreeMap::new()),
                restored: Mutex::new(BTreeMap::new()),
                dirty: AtomicBool::new(false),
                save_failing: AtomicBool::new(false),
                local_applied: AtomicBool::new(false),
                stopped: AtomicBool::new(false),
                in_touch: AtomicBool::new(false),
                save_lock: Mutex::new(()),
                saver: Mutex::new(None),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.inner.state)
    }

    /// Hash of the configuration being run, for `hello`.
    pub fn hash(&self) -> Option<String> {
        self.lock().hash.clone()
    }

    pub fn spec(&self, name: &str) -> Option<CheckSpec> {
        self.lock().running.get(name).map(|r| r.spec.clone())
    }

    /// Generation of a check's task: changes exactly when the check is (re)started.
    pub fn generation(&self, name: &str) -> Option<u64> {
        self.lock().running.get(name).map(|r| r.generation)
    }

    /// Start from the configuration and the check states cached by the last run, if any,
    /// so checks run at once after a restart even before the gateway is reachable, and
    /// carry on from their last states; from now on, keep the states cached.
    /// Load the cached check states and configuration, and start running the cached
    /// checks; returns the cached collectors, for the caller to start.
    pub fn load_cached(&self) -> Vec<CollectorSpec> {
        let mut collectors = Vec::new();
        match state::load(&self.inner.state_path) {
            Ok(saved) => {
                if !saved.is_empty() {
                    tracing::info!(checks = saved.len(), "read the check states cached by the last run; each is reused if its check is unchanged");
                }
                *lock(&self.inner.restored) = saved;
            }
            Err(e) => {
                tracing::warn!(error = %e, "ignoring the cached check states: every check starts fresh (the file is rewritten as checks run)");
            }
        }
        if let Ok(bytes) = std::fs::read(&self.inner.cache_path) {
            match serde_json::from_slice::<Cached>(&bytes) {
                Ok(c) => {
                    tracing::info!(
                        checks = c.checks.len(),
                        "running the cached configuration until the gateway answers"
                    );
                    self.apply_inner(c.hash, c.checks, None);
                    collectors = c.collectors;
                }
                Err(e) => {
                    tracing::warn!(file = %self.inner.cache_path.display(), error = %e, "ignoring unreadable cached configuration")
                }
            }
        }
        self.start_saving();
        collectors
    }

    /// Write the state file every [`state::SAVE_EVERY`] while it changes, until `stop_all`.
    fn start_saving(&self) {
        let mut saver = lock(&self.inner.saver);
        if saver.is_some() || self.inner.stopped.load(Ordering::SeqCst) {
            return;
        }
        let stop = CancellationToken::new();
        // Weak: a scheduler dropped without `stop_all` (in tests) does not keep it alive.
        let (weak, until) = (Arc::downgrade(&self.inner), stop.clone());
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(state::SAVE_EVERY) => {}
                    _ = until.cancelled() => return,
                }
                let Some(inner) = weak.upgrade() else { return };
                if inner.dirty.swap(false, Ordering::SeqCst) {
                    let snapshot = inner.snapshot(None);
                    inner.save(snapshot).await;
                }
            }
        });
        *saver = Some((stop, task));
    }

    /// Run the gateway's `checks` from now on (with the host's own); returns what changed.
    pub fn apply(&self, hash: String, checks: Vec<CheckSpec>) -> config_diff::Diff {
        self.apply_inner(hash, checks, Some(Vec::new()))
    }

    /// Run the gateway's configuration: its checks from now on, and cache them with its
    /// collectors (which the caller runs).
    pub fn apply_config(
        &self,
        hash: String,
        checks: Vec<CheckSpec>,
        collectors: Vec<CollectorSpec>,
    ) -> config_diff::Diff {
        self.apply_inner(hash, checks, Some(collectors))
    }

    /// `persist`: the collectors to cache with the checks, or `None` not to write the cache.
    fn apply_inner(
        &self,
        hash: String,
        checks: Vec<CheckSpec>,
        persist: Option<Vec<CollectorSpec>>,
    ) -> config_diff::Diff {
        let mut valid = Vec::with_capacity(checks.len());
        for c in &checks {
            match validate(c) {
                Ok(()) => valid.push(c.clone()),
                Err(why) => {
                    tracing::error!(check = %c.name, error = %why, "ignoring an invalid check from the gateway");
                    if outpost_protocol::valid_check_name(&c.name) {
                        self.inner.record(checks::unknown(
                            c,
                            Origin::Schedule,
                            format!("check not run: {why}"),
                        ));
                    }
                }
            }
        }
        let mut state = self.lock();
        state.gateway = valid;
        state.hash = Some(hash.clone());
        let d = self.reconcile(&mut state);
        drop(state);
        if let Some(collectors) = persist {
            let cached = Cached {
                hash,
                checks,
                collectors,
            };
            if let Err(e) = serde_json::to_vec(&cached)
                .map_err(std::io::Error::other)
                .and_then(|b| write_atomic(&self.inner.cache_path, &b, 0o600))
            {
                tracing::warn!(file = %self.inner.cache_path.display(), error = %e, "cannot cache the configuration");
            }
        }
        d
    }

    /// Run the host's own checks (from `checks.d`) from now on, next to the gateway's.
    /// Returns what changed. Checks are validated by the caller.
    pub fn apply_local(&self, checks: Vec<CheckSpec>) -> config_diff::Diff {
        let mut state = self.lock();
        state.local = checks;
        let d = self.reconcile(&mut state);
        drop(state);
        if !self.inner.local_applied.swap(true, Ordering::SeqCst) {
            // The cached configuration and the host's checks have both started: cached
            // states no check claimed are for checks that are gone.
            let unclaimed = std::mem::take(&mut *lock(&self.inner.restored));
            if !unclaimed.is_empty() {
                tracing::info!(checks = ?unclaimed.keys().collect::<Vec<_>>(), "dropping the cached states of checks no longer configured");
                self.inner.dirty.store(true, Ordering::SeqCst);
            }
        }
        d
    }

    /// Names of the checks the gateway configured.
    pub fn gateway_names(&self) -> Vec<String> {
        self.lock().gateway.iter().map(|c| c.name.clone()).collect()
    }

    /// Start and stop tasks so that the running set is the gateway's checks plus the
    /// local ones whose names the gateway does not use.
    fn reconcile(&self, state: &mut State) -> config_diff::Diff {
        let mut new: BTreeMap<String, CheckSpec> = BTreeMap::new();
        for c in &state.gateway {
            new.insert(c.name.clone(), c.clone());
        }
        for c in &state.local {
            if new.contains_key(&c.name) {
                tracing::warn!(check = %c.name, "a local check has the name of a gateway check; the gateway's runs");
                continue;
            }
            new.insert(c.name.clone(), c.clone());
        }
        let old: BTreeMap<String, CheckSpec> = state
            .running
            .iter()
            .map(|(k, r)| (k.clone(), r.spec.clone()))
            .collect();
        let d = config_diff::diff(&old, &new);
        if !d.is_empty() {
            tracing::info!(
                added = d.added.len(),
                removed = d.removed.len(),
                changed = d.changed.len(),
                unchanged = d.unchanged.len(),
                "configuration changed:\n{}",
                config_diff::render(&d, &old, &new)
            );
        }
        if !d.is_empty() {
            self.inner.dirty.store(true, Ordering::SeqCst);
        }
        for name in d.removed.iter().chain(&d.changed) {
            if let Some(r) = state.running.remove(name) {
                r.stop.cancel();
            }
        }
        for name in &d.removed {
            lock(&self.inner.states).remove(name);
            // A run still finishing holds its own reference to the lock.
            lock(&self.inner.run_locks).remove(name);
        }
        let requests: std::collections::HashSet<&str> = new
            .values()
            .filter(|c| matches!(c.probe, Probe::Request(_)))
            .map(|c| c.name.as_str())
            .collect();
        self.inner.runner.requests.retain(&requests);
        for name in d.added.iter().chain(&d.changed) {
            let spec = new[name].clone();
            let spec_hash = state::spec_hash(&spec);
            let resume_from = self.inner.claim_restored(&spec, &spec_hash);
            state.next_generation += 1;
            let generation = state.next_generation;
            let stop = CancellationToken::new();
            let task = match spec.probe {
                Probe::Daemon(_) => {
                    let inner = self.inner.clone();
                    let lock = self.inner.run_lock(name);
                    let (runner, spec, stop) =
                        (self.inner.runner.clone(), spec.clone(), stop.clone());
                    tokio::spawn(async move {
                        // The previous generation of this daemon stops (SIGTERM and its
                        // grace) before the new one starts: never two at once.
                        let _only_one = tokio::select! {
                            l = lock.lock_owned() => l,
                            _ = stop.cancelled() => return,
                        };
                        checks::daemon::supervise(runner, spec, stop, move |r| {
                            inner.record(r);
                        })
                        .await
                    })
                }
                _ => tokio::spawn(check_loop(
                    self.inner.clone(),
                    spec.clone(),
                    stop.clone(),
                    resume_from,
                )),
            };
            state.running.insert(
                name.clone(),
                Running {
                    spec,
                    spec_hash,
                    stop,
                    generation,
                    task,
                },
            );
        }
        d
    }

    /// Run a check now, out of schedule; its result goes to the outbox like any other and
    /// is returned.
    pub async fn run_now(&self, name: &str) -> Result<CheckResult, RpcError> {
        let unknown = || {
            RpcError::new(
                RpcErrorCode::UnknownCheck,
                format!("check {name:?} is not configured on this agent"),
            )
        };
        let spec = self.spec(name).ok_or_else(unknown)?;
        if matches!(spec.probe, Probe::Daemon(_)) {
            return Err(RpcError::new(
                RpcErrorCode::NotRunnable,
                format!(
                    "check {name:?} is a daemon: it reports on its own and cannot be run on demand"
                ),
            ));
        }
        // Wait briefly for a scheduled run of the same check and for a free slot; the
        // caller is waiting on the other side of the connection.
        let busy = |what: &str| {
            RpcError::new(
                RpcErrorCode::Busy,
                format!(
                    "check {name:?} could not start within {}s: {what}",
                    RUN_NOW_WAIT.as_secs()
                ),
            )
        };
        let lock = self.inner.run_lock(name);
        let _running = tokio::time::timeout(RUN_NOW_WAIT, lock.lock_owned())
            .await
            .map_err(|_| busy("it is already running"))?;
        let _permit = match tokio::time::timeout(
            RUN_NOW_WAIT,
            self.inner.limit.clone().acquire_owned(),
        )
        .await
        {
            Err(_) => return Err(busy("the concurrency limit is reached")),
            Ok(Err(_)) => return Err(RpcError::new(RpcErrorCode::Stopping, "agent is stopping")),
            Ok(Ok(p)) => p,
        };
        // The definition may have changed (or gone) while waiting.
        let spec = self.spec(name).ok_or_else(unknown)?;
        let result = self.inner.runner.run(&spec, Origin::RunNow).await;
        Ok(self.inner.record(result))
    }

    /// The catalog plugins the running checks need that are not on disk with the right
    /// hash, each once.
    pub fn missing_plugins(&self) -> Vec<outpost_protocol::PluginRef> {
        let mut wanted: Vec<outpost_protocol::PluginRef> = self
            .lock()
            .running
            .values()
            .filter_map(|r| r.spec.plugin.clone())
            .collect();
        wanted.sort_by(|a, b| a.sha256.cmp(&b.sha256));
        wanted.dedup_by(|a, b| a.sha256 == b.sha256);
        wanted.retain(|p| self.inner.runner.plugins.verified_path(p).is_err());
        wanted
    }

    /// Store a plugin the gateway sent, if a running check wants exactly this content.
    pub fn install_plugin(&self, sha256: &str, content: &[u8]) -> Result<(), String> {
        let wanted = self
            .lock()
            .running
            .values()
            .filter_map(|r| r.spec.plugin.clone())
            .find(|p| p.sha256 == sha256);
        let Some(plugin) = wanted else {
            return Err(format!(
                "no configured check wants plugin sha256 {sha256}; ignored"
            ));
        };
        self.inner
            .runner
            .plugins
            .install(&plugin, content)
            .map(|path| tracing::info!(plugin = %plugin.name, path = %path.display(), "plugin installed"))
            .map_err(|e| e.to_string())
    }

    /// Stop every check; waits up to `grace` for daemons to stop theirs (SIGTERM, then
    /// SIGKILL) and for cancelled runs to kill their process groups, then writes the
    /// checks' states for the next start.
    pub async fn stop_all(&self, grace: Duration) {
        let first = !self.inner.stopped.swap(true, Ordering::SeqCst);
        let mut hashes = BTreeMap::new();
        let tasks: Vec<_> = {
            let mut state = self.lock();
            std::mem::take(&mut state.running)
                .into_iter()
                .map(|(name, r)| {
                    r.stop.cancel();
                    hashes.insert(name, r.spec_hash);
                    r.task
                })
                .collect()
        };
        self.inner.limit.close();
        let saver = lock(&self.inner.saver).take();
        if let Some((stop, task)) = saver {
            stop.cancel();
            let _ = task.await;
        }
        let all = futures_util::future::join_all(tasks);
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!("some checks did not stop within {}s", grace.as_secs());
        }
        if tokio::time::timeout(grace, self.inner.runner.requests.stop_all())
            .await
            .is_err()
        {
            tracing::warn!(
                "some request daemons did not stop within {}s",
                grace.as_secs()
            );
        }
        // A second call has nothing running left to save and must not empty the file.
        if first {
            let snapshot = self.inner.snapshot(Some(hashes));
            self.inner.clone().save(snapshot).await;
        }
    }
}

/// How long run-now waits for the check's previous run or a free slot before answering busy.
const RUN_NOW_WAIT: Duration = Duration::from_secs(5);

/// What the agent insists on in a check, whatever the gateway sent.
fn validate(c: &CheckSpec) -> Result<(), String> {
    if !outpost_protocol::valid_check_name(&c.name) {
        return Err("invalid name".into());
    }
    c.probe.validate()?;
    let daemon = matches!(c.probe, Probe::Daemon(_));
    if c.timeout_secs > MAX_TIMEOUT_SECS || (c.timeout_secs == 0 && !daemon) {
        return Err(format!(
            "timeout {}s is outside 1s to 24 hours",
            c.timeout_secs
        ));
    }
    if let Some(cron) = &c.cron {
        outpost_protocol::checkfile::parse_cron(cron)?;
    } else if !matches!(c.probe, Probe::Daemon(_))
        && !(1..=MAX_INTERVAL_SECS).contains(&c.interval_secs)
    {
        return Err(format!(
            "interval {}s is outside 1s to 7 days",
            c.interval_secs
        ));
    }
    if c.retry_interval_secs
        .is_some_and(|r| !(1..=MAX_INTERVAL_SECS).contains(&r))
    {
        return Err("retry interval is outside 1s to 7 days".into());
    }
    Ok(())
}

use outpost_protocol::{MAX_INTERVAL_SECS, MAX_TIMEOUT_SECS};

impl Inner {
    /// Classify a result as soft or hard, queue it, and return it with its sequence
    /// number.
    fn record(&self, mut result: CheckResult) -> CheckResult {
        let (state_type, attempt) = {
            let mut states = lock(&self.states);
            let s = states.entry(result.check.clone()).or_default();
            s.last = Some(state::LastRun {
                status: result.status,
                started_at_ms: result.started_at_ms,
                ended_at_ms: result.started_at_ms.saturating_add(result.duration_ms),
            });
            s.tracker.classify(result.status, result.max_attempts)
        };
        self.dirty.store(true, Ordering::SeqCst);
        result.state_type = state_type;
        result.attempt = attempt;
        match self.outbox.append(result.clone()) {
            Ok(seq) => result.seq = seq,
            Err(e) => tracing::error!(check = %result.check, error = %e, "cannot queue result"),
        }
        result
    }

    fn is_soft(&self, name: &str) -> bool {
        lock(&self.states).get(name).is_some_and(|s| s.tracker.soft)
    }

    /// Take the cached state of a check that is starting, if it was saved for this very
    /// definition: its tracker is restored and the start of its last run is returned.
    fn claim_restored(&self, spec: &CheckSpec, spec_hash: &str) -> Option<u64> {
        let saved = lock(&self.restored).remove(&spec.name)?;
        let Some(restored) = saved.restore(spec, spec_hash) else {
            tracing::info!(check = %spec.name, "the check changed since its state was cached; it starts fresh");
            return None;
        };
        tracing::debug!(check = %spec.name, hard = ?restored.tracker.hard, attempt = restored.tracker.attempt, soft = restored.tracker.soft, "check state restored");
        lock(&self.states).insert(spec.name.clone(), restored);
        restored.last.map(|l| l.started_at_ms)
    }

    /// What the state file should hold now: every running check's state (those of `hashes`
    /// when given, the running set's otherwise), and cached states not yet claimed.
    fn snapshot(&self, hashes: Option<BTreeMap<String, String>>) -> BTreeMap<String, state::Saved> {
        let hashes = hashes.unwrap_or_else(|| {
            lock(&self.state)
                .running
                .iter()
                .map(|(name, r)| (name.clone(), r.spec_hash.clone()))
                .collect()
        });
        let mut out = lock(&self.restored).clone();
        let states = lock(&self.states);
        for (name, hash) in hashes {
            if let Some(s) = states.get(&name) {
                out.insert(name, s.save(hash));
            }
        }
        out
    }

    /// Write `snapshot` to the state file, off the runtime's threads.
    async fn save(self: Arc<Self>, snapshot: BTreeMap<String, state::Saved>) {
        let inner = self.clone();
        let written = tokio::task::spawn_blocking(move || {
            let _one = lock(&inner.save_lock);
            state::save(&inner.state_path, snapshot)
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        match written {
            Ok(()) => {
                if self.save_failing.swap(false, Ordering::SeqCst) {
                    tracing::info!(file = %self.state_path.display(), "check states are cached again");
                }
            }
            Err(e) => {
                // Tried again at the next save.
                self.dirty.store(true, Ordering::SeqCst);
                if !self.save_failing.swap(true, Ordering::SeqCst) {
                    tracing::warn!(file = %self.state_path.display(), error = %e, "cannot cache the check states; a restart would start every check fresh");
                }
            }
        }
    }

    fn run_lock(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.run_locks)
            .entry(name.to_string())
            .or_default()
            .clone()
    }
}

/// When a check's task wakes next.
enum Timing {
    Grid {
        phase_ms: u64,
        interval_ms: u64,
        /// A check about an entity (placed on this agent by the gateway): its first run
        /// waits for its slot, which another agent may have just used, and for
        /// `not_before_ms` (the gateway's handover fence; 0 for none).
        slots_only: bool,
        not_before_ms: u64,
    },
    Cron(Box<croner::Cron>),
}

impl Timing {
    fn of(fingerprint: &str, spec: &CheckSpec) -> Result<Timing, String> {
        if let Some(expr) = &spec.cron {
            return outpost_protocol::checkfile::parse_cron(expr)
                .map(|c| Timing::Cron(Box::new(c)));
        }
        let interval_ms = spec.interval_secs.clamp(1, MAX_INTERVAL_SECS) * 1000;
        // A check about an entity has the entity's phase, the same on every agent.
        let key = match &spec.entity {
            Some(entity) => format!("entity:{entity}"),
            None => fingerprint.to_string(),
        };
        Ok(Timing::Grid {
            phase_ms: splay_ms(&key, &spec.name, interval_ms),
            interval_ms,
            slots_only: spec.entity.is_some(),
            not_before_ms: spec.not_before_ms.unwrap_or(0),
        })
    }

    /// Unix milliseconds of the next run after `now`.
    fn next(&self, now: u64, last_start: Option<u64>) -> u64 {
        match self {
            Timing::Grid {
                phase_ms,
                interval_ms,
                slots_only: true,
                not_before_ms,
            } if last_start.is_none() => next_slot(
                now.max(not_before_ms.saturating_sub(1)),
                *phase_ms,
                *interval_ms,
            ),
            Timing::Grid {
                phase_ms,
                interval_ms,
                ..
            } => next_run(now, last_start, *phase_ms, *interval_ms),
            Timing::Cron(cron) => next_cron(cron, now),
        }
    }

    /// The first run after a restart of a check whose last run started at `prev`; it is
    /// soft with retries every `soft_retry_ms` when that is given. `seed` spreads the
    /// checks that run at once over up to [`FIRST_RUN_SPREAD_MS`]. See the module doc.
    fn resume(&self, now: u64, prev: u64, soft_retry_ms: Option<u64>, seed: u64) -> u64 {
        // A clock set back since: the last run counts as just now.
        let prev = prev.min(now);
        let (due, period) = match (soft_retry_ms, self) {
            (Some(retry), _) => (prev.saturating_add(retry), retry),
            (
                None,
                Timing::Grid {
                    phase_ms,
                    interval_ms,
                    ..
                },
            ) => (
                next_run(prev, Some(prev), *phase_ms, *interval_ms),
                *interval_ms,
            ),
            // Cron times missed while the agent was down are not made up.
            (None, Timing::Cron(cron)) => return next_cron(cron, now),
        };
        resume_at(now, due, seed % period.clamp(1, FIRST_RUN_SPREAD_MS))
    }
}

/// The first time strictly after `now_ms` that `cron` matches, in local time; a day
/// from now if it never does (e.g. the 30th of February).
pub fn next_cron(cron: &croner::Cron, now_ms: u64) -> u64 {
    use chrono::TimeZone;
    let fallback = now_ms + 24 * 3600 * 1000;
    // Cron has whole seconds: searching from a fraction would keep the fraction.
    let whole = (now_ms / 1000 * 1000) as i64;
    let Some(now) = chrono::Local.timestamp_millis_opt(whole).single() else {
        return fallback;
    };
    cron.find_next_occurrence(&now, false)
        .ok()
        .and_then(|t| u64::try_from(t.timestamp_millis()).ok())
        .filter(|t| *t > now_ms)
        .unwrap_or(fallback)
}

/// Sleep until the wall clock reads `target_ms`, in steps of at most a minute so a clock
/// change or a suspended machine does not push a run far off; false when stopped.
async fn sleep_until(target_ms: u64, stop: &CancellationToken) -> bool {
    loop {
        let now = now_ms();
        if now >= target_ms {
            return true;
        }
        let step = Duration::from_millis((target_ms - now).min(60_000));
        tokio::select! {
            _ = tokio::time::sleep(step) => {}
            _ = stop.cancelled() => return false,
        }
    }
}

/// Run `spec` on its schedule until `stop`. `resume_from`: the start of its last run
/// before the agent restarted, when its state was restored.
async fn check_loop(
    inner: Arc<Inner>,
    spec: CheckSpec,
    stop: CancellationToken,
    mut resume_from: Option<u64>,
) {
    let timing = match Timing::of(&inner.fingerprint, &spec) {
        Ok(t) => t,
        Err(why) => {
            // Validated before; only a changed cron library could get here.
            inner.record(checks::unknown(&spec, Origin::Schedule, why));
            return;
        }
    };
    let lock = inner.run_lock(&spec.name);
    let retry_ms = spec
        .retry_interval_secs
        .map(|r| r.clamp(1, MAX_INTERVAL_SECS) * 1000);
    let seed = splay_ms(&inner.fingerprint, &spec.name, FIRST_RUN_SPREAD_MS);
    let mut last_start: Option<u64> = None;
    if spec.entity.is_some() {
        // A slot missed while the agent was down may have been run by another agent
        // since: a placed check resumes on its next slot, never at once.
        resume_from = None;
    }
    loop {
        // Soft after this loop's run or a run-now's: retry sooner than the next slot.
        let soft = inner.is_soft(&spec.name);
        let now = now_ms();
        let due = match (resume_from.take(), soft, retry_ms, last_start) {
            (Some(prev), ..) => timing.resume(now, prev, retry_ms.filter(|_| soft), seed),
            // A soft problem is confirmed (or cleared) sooner than the next slot.
            (None, true, Some(retry), Some(prev)) => prev.saturating_add(retry).max(now),
            _ => timing.next(now, last_start),
        };
        if !sleep_until(due, &stop).await {
            return;
        }
        // A previous generation's run (before a config change) or a run-now finishes first.
        let running = tokio::select! {
            l = lock.clone().lock_owned() => l,
            _ = stop.cancelled() => return,
        };
        let permit = tokio::select! {
            p = inner.limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = stop.cancelled() => return,
        };
        last_start = Some(now_ms());
        if spec.entity.is_some() && !inner.in_touch.load(Ordering::Relaxed) {
            // Out of touch with the gateway: the slot is left to whichever agent has the
            // check now (it moves to another once this one's session is gone).
            tracing::debug!(check = %spec.name, "not run: about an entity, and out of touch with the gateway");
            continue;
        }
        // A check removed or changed mid-run is abandoned: dropping the run kills its
        // process group, and a result of the old definition is not kept.
        // Boxed: the run's future is as large as the largest probe's state, and an idle
        // task per check should not carry it between runs.
        let result = tokio::select! {
            r = Box::pin(inner.runner.run(&spec, Origin::Schedule)) => r,
            _ = stop.cancelled() => return,
        };
        drop(permit);
        drop(running);
        // Logged once queued, with the sequence number it was given (the outbox logs the
        // commit that makes it durable).
        let result = inner.record(result);
        tracing::debug!(check = %spec.name, status = result.status.as_str(), ms = result.duration_ms, seq = result.seq, "check ran");
    }
}

#[cfg(test)]
mod tests;
