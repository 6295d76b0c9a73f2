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

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_protocol::probe::Probe;
use outpost_protocol::{CheckResult, CheckSpec, Origin, RpcError, StateType, Status};
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
    cache_path: PathBuf,
    state: Mutex<State>,
    /// Soft/hard tracking per check name; survives config changes of the check.
    states: Mutex<BTreeMap<String, Tracker>>,
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
    stop: CancellationToken,
    generation: u64,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Serialize, Deserialize)]
struct Cached {
    hash: String,
    checks: Vec<CheckSpec>,
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

impl Scheduler {
    pub fn new(
        fingerprint: String,
        outbox: Arc<dyn Outbox>,
        runner: Arc<Runner>,
        max_concurrent: usize,
        cache_path: PathBuf,
    ) -> Scheduler {
        Scheduler {
            inner: Arc::new(Inner {
                fingerprint,
                outbox,
                runner,
                limit: Arc::new(Semaphore::new(max_concurrent.max(1))),
                run_locks: Mutex::new(BTreeMap::new()),
                cache_path,
                state: Mutex::new(State::default()),
                states: Mutex::new(BTreeMap::new()),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
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

    /// Start from the configuration cached by the last run, if any, so checks run at once
    /// after a restart even before the gateway is reachable.
    pub fn load_cached(&self) {
        let Ok(bytes) = std::fs::read(&self.inner.cache_path) else {
            return;
        };
        match serde_json::from_slice::<Cached>(&bytes) {
            Ok(c) => {
                tracing::info!(
                    checks = c.checks.len(),
                    "running the cached configuration until the gateway answers"
                );
                self.apply_inner(c.hash, c.checks, false);
            }
            Err(e) => {
                tracing::warn!(file = %self.inner.cache_path.display(), error = %e, "ignoring unreadable cached configuration")
            }
        }
    }

    /// Run the gateway's `checks` from now on (with the host's own); returns what changed.
    pub fn apply(&self, hash: String, checks: Vec<CheckSpec>) -> config_diff::Diff {
        self.apply_inner(hash, checks, true)
    }

    fn apply_inner(
        &self,
        hash: String,
        checks: Vec<CheckSpec>,
        persist: bool,
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
        if persist {
            let cached = Cached { hash, checks };
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
        self.reconcile(&mut state)
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
        for name in d.removed.iter().chain(&d.changed) {
            if let Some(r) = state.running.remove(name) {
                r.stop.cancel();
            }
        }
        for name in &d.removed {
            self.inner
                .states
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(name);
            // A run still finishing holds its own reference to the lock.
            self.inner
                .run_locks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(name);
        }
        for name in d.added.iter().chain(&d.changed) {
            let spec = new[name].clone();
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
                _ => tokio::spawn(check_loop(self.inner.clone(), spec.clone(), stop.clone())),
            };
            state.running.insert(
                name.clone(),
                Running {
                    spec,
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
        let unknown = || RpcError {
            code: "unknown_check".into(),
            message: format!("check {name:?} is not configured on this agent"),
        };
        let spec = self.spec(name).ok_or_else(unknown)?;
        if matches!(spec.probe, Probe::Daemon(_)) {
            return Err(RpcError {
                code: "not_runnable".into(),
                message: format!(
                    "check {name:?} is a daemon: it reports on its own and cannot be run on demand"
                ),
            });
        }
        // Wait briefly for a scheduled run of the same check and for a free slot; the
        // caller is waiting on the other side of the connection.
        let busy = |what: &str| RpcError {
            code: "busy".into(),
            message: format!(
                "check {name:?} could not start within {}s: {what}",
                RUN_NOW_WAIT.as_secs()
            ),
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
            Ok(Err(_)) => {
                return Err(RpcError {
                    code: "stopping".into(),
                    message: "agent is stopping".into(),
                })
            }
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
    /// SIGKILL) and for cancelled runs to kill their process groups.
    pub async fn stop_all(&self, grace: Duration) {
        let tasks: Vec<_> = {
            let mut state = self.lock();
            std::mem::take(&mut state.running)
                .into_values()
                .map(|r| {
                    r.stop.cancel();
                    r.task
                })
                .collect()
        };
        self.inner.limit.close();
        let all = futures_util::future::join_all(tasks);
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!("some checks did not stop within {}s", grace.as_secs());
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

use outpost_protocol::checkfile::{MAX_INTERVAL_SECS, MAX_TIMEOUT_SECS};

impl Inner {
    /// Classify a result as soft or hard, queue it, and return it with its sequence
    /// number.
    fn record(&self, mut result: CheckResult) -> CheckResult {
        let (state_type, attempt) = self
            .states
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(result.check.clone())
            .or_default()
            .classify(result.status, result.max_attempts);
        result.state_type = state_type;
        result.attempt = attempt;
        match self.outbox.append(result.clone()) {
            Ok(seq) => result.seq = seq,
            Err(e) => tracing::error!(check = %result.check, error = %e, "cannot queue result"),
        }
        result
    }

    fn is_soft(&self, name: &str) -> bool {
        self.states
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .is_some_and(|t| t.soft)
    }

    fn run_lock(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.run_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.to_string())
            .or_default()
            .clone()
    }
}

/// When a check's task wakes next.
enum Timing {
    Grid { phase_ms: u64, interval_ms: u64 },
    Cron(Box<croner::Cron>),
}

impl Timing {
    fn of(fingerprint: &str, spec: &CheckSpec) -> Result<Timing, String> {
        if let Some(expr) = &spec.cron {
            return outpost_protocol::checkfile::parse_cron(expr)
                .map(|c| Timing::Cron(Box::new(c)));
        }
        let interval_ms = spec.interval_secs.clamp(1, MAX_INTERVAL_SECS) * 1000;
        Ok(Timing::Grid {
            phase_ms: splay_ms(fingerprint, &spec.name, interval_ms),
            interval_ms,
        })
    }

    /// Unix milliseconds of the next run after `now`.
    fn next(&self, now: u64, last_start: Option<u64>) -> u64 {
        match self {
            Timing::Grid {
                phase_ms,
                interval_ms,
            } => next_run(now, last_start, *phase_ms, *interval_ms),
            Timing::Cron(cron) => next_cron(cron, now),
        }
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

async fn check_loop(inner: Arc<Inner>, spec: CheckSpec, stop: CancellationToken) {
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
    let mut last_start: Option<u64> = None;
    loop {
        // Soft after this loop's run or a run-now's: retry sooner than the next slot.
        let soft = inner.is_soft(&spec.name);
        let now = now_ms();
        let due = match (soft, retry_ms, last_start) {
            // A soft problem is confirmed (or cleared) sooner than the next slot.
            (true, Some(retry), Some(prev)) => prev.saturating_add(retry).max(now),
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
        tracing::debug!(check = %spec.name, status = result.status.as_str(), ms = result.duration_ms, "check ran");
        inner.record(result);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::MemoryOutbox;

    fn plugins(dir: &tempfile::TempDir) -> Arc<Runner> {
        Arc::new(Runner::new(
            Arc::new(crate::plugins::PluginStore::new(
                &dir.path().join("plugins"),
            )),
            Default::default(),
        ))
    }

    #[test]
    fn slots_are_on_a_grid_strictly_in_the_future() {
        assert_eq!(next_slot(1000, 300, 1000), 1300);
        assert_eq!(next_slot(1300, 300, 1000), 2300);
        assert_eq!(next_slot(100, 300, 1000), 300);
        assert_eq!(next_slot(1299, 300, 1000), 1300);
    }

    #[test]
    fn first_run_is_soon_then_on_the_grid_with_a_gap() {
        let (phase, interval) = (37_000, 60_000);
        let first = next_run(1_000_000, None, phase, interval);
        assert!((1_000_000..1_000_000 + FIRST_RUN_SPREAD_MS).contains(&first));
        // The grid slot right after the first run is too close: the one after it is used.
        let second = next_run(first + 100, Some(first), phase, interval);
        assert!(second - first >= interval / 2, "{first} {second}");
        assert_eq!((second - phase) % interval, 0, "on the grid");
        let third = next_run(second + 5, Some(second), phase, interval);
        assert_eq!(third - second, interval);
        // Short intervals start within one interval.
        assert!(next_run(5_000, None, 700, 1_000) < 6_000);
    }

    #[test]
    fn splay_is_deterministic_and_spread() {
        let a = splay_ms("agent-a", "disk", 60_000);
        assert_eq!(a, splay_ms("agent-a", "disk", 60_000));
        let phases: std::collections::HashSet<u64> = (0..100)
            .map(|i| splay_ms(&format!("agent-{i}"), "disk", 60_000) / 1000)
            .collect();
        assert!(
            phases.len() > 40,
            "100 agents landed on only {} distinct seconds",
            phases.len()
        );
    }

    #[test]
    fn states_turn_hard_after_max_attempts_and_recover_at_once() {
        use Status::*;
        let mut t = Tracker::default();
        let seq: Vec<_> = [
            Ok, Critical, Warning, Critical, Critical, Warning, Ok, Critical, Ok,
        ]
        .into_iter()
        .map(|s| t.classify(s, 3))
        .collect();
        use StateType::{Hard as H, Soft as S};
        assert_eq!(
            seq,
            [
                (H, 1),
                (S, 1),
                (S, 2),
                (H, 3),
                (H, 3),
                (H, 3),
                (H, 1),
                (S, 1),
                (H, 1)
            ]
        );
        let mut t = Tracker::default();
        assert_eq!(t.classify(Critical, 1), (H, 1), "one attempt: hard at once");
    }

    #[test]
    fn cron_fires_at_wall_clock_times() {
        let cron = outpost_protocol::checkfile::parse_cron("*/15 * * * * *").unwrap();
        let now = 1_700_000_007_500; // 7.5 s past a minute boundary (UTC and most zones)
        let next = next_cron(&cron, now);
        assert_eq!(next % 15_000, 0, "on a 15 s boundary: {next}");
        assert!(next > now && next - now <= 15_000);
        assert_eq!(next_cron(&cron, next), next + 15_000, "strictly after");
        let minutely = outpost_protocol::checkfile::parse_cron("* * * * *").unwrap();
        assert_eq!(next_cron(&minutely, now) % 60_000, 0);
    }

    fn spec(name: &str, cmd: &str) -> CheckSpec {
        CheckSpec::new(
            name,
            Probe::Nagios(outpost_protocol::probe::Command {
                command: vec![cmd.into()],
            }),
            1,
            5,
        )
    }

    #[tokio::test]
    async fn only_changed_checks_are_restarted() {
        let dir = tempfile::tempdir().unwrap();
        let outbox: Arc<dyn Outbox> = Arc::new(MemoryOutbox::open(dir.path(), 100).unwrap());
        let s = Scheduler::new(
            "fp".into(),
            outbox.clone(),
            plugins(&dir),
            4,
            dir.path().join("config.json"),
        );
        s.apply(
            "h1".into(),
            vec![spec("a", "/bin/true"), spec("b", "/bin/true")],
        );
        let (ga, gb) = (s.generation("a"), s.generation("b"));
        let d = s.apply(
            "h2".into(),
            vec![
                spec("a", "/bin/true"),
                spec("b", "/bin/false"),
                spec("c", "/bin/true"),
            ],
        );
        assert_eq!(d.changed, vec!["b"]);
        assert_eq!(s.generation("a"), ga, "unchanged check kept its task");
        assert_ne!(s.generation("b"), gb, "changed check was restarted");
        assert!(s.generation("c").is_some());
        s.apply("h3".into(), vec![spec("c", "/bin/true")]);
        assert_eq!(s.generation("a"), None);
        // Results arrive within a couple of intervals.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while outbox.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(!outbox.is_empty());
        // The configuration was cached for the next start.
        let s2 = Scheduler::new(
            "fp".into(),
            outbox,
            plugins(&dir),
            4,
            dir.path().join("config.json"),
        );
        s2.load_cached();
        assert_eq!(s2.hash().as_deref(), Some("h3"));
        assert!(s2.spec("c").is_some());
        s.stop_all(Duration::from_secs(1)).await;
        s2.stop_all(Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn removing_a_check_mid_run_kills_it_and_keeps_no_result() {
        let dir = tempfile::tempdir().unwrap();
        let outbox: Arc<dyn Outbox> = Arc::new(MemoryOutbox::open(dir.path(), 100).unwrap());
        let s = Scheduler::new(
            "fp".into(),
            outbox.clone(),
            plugins(&dir),
            4,
            dir.path().join("c.json"),
        );
        let marker = dir.path().join("started");
        let script = format!("touch {}; sleep 30", marker.display());
        let mut slow = spec("slow", "/bin/sh");
        slow.probe = Probe::Nagios(outpost_protocol::probe::Command {
            command: vec!["/bin/sh".into(), "-c".into(), script.clone()],
        });
        slow.timeout_secs = 60;
        s.apply("h1".into(), vec![slow]);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !marker.exists() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the check never started"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        s.apply("h2".into(), vec![]);
        let gone = tokio::time::Instant::now() + Duration::from_secs(5);
        while count_cmdline(&script) > 0 {
            assert!(
                tokio::time::Instant::now() < gone,
                "the removed check's plugin still runs"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(outbox.is_empty(), "a removed check left a result");
        s.stop_all(Duration::from_secs(1)).await;
    }

    /// Processes whose last argument is `arg`.
    fn count_cmdline(arg: &str) -> usize {
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
            .filter(|c| c.split(|b| *b == 0).any(|a| a == arg.as_bytes()))
            .count()
    }

    #[tokio::test]
    async fn invalid_gateway_checks_are_reported_and_daemons_refuse_run_now() {
        let dir = tempfile::tempdir().unwrap();
        let outbox: Arc<dyn Outbox> = Arc::new(MemoryOutbox::open(dir.path(), 100).unwrap());
        let s = Scheduler::new(
            "fp".into(),
            outbox.clone(),
            plugins(&dir),
            4,
            dir.path().join("c.json"),
        );
        let mut forever = spec("forever", "/bin/true");
        forever.timeout_secs = u64::MAX;
        let mut newer = spec("newer", "/bin/true");
        newer.probe = Probe::Unsupported;
        let mut d = spec("d", "/bin/cat");
        d.probe = Probe::Daemon(outpost_protocol::probe::Command {
            command: vec!["/bin/sh".into(), "-c".into(), "sleep 30".into()],
        });
        d.interval_secs = 0;
        s.apply("h".into(), vec![forever, newer, d]);
        assert!(s.spec("forever").is_none() && s.spec("newer").is_none());
        let reported = outbox.pending_after(0, 10);
        let text: Vec<(&str, &str)> = reported
            .iter()
            .map(|r| (r.check.as_str(), r.output.as_str()))
            .collect();
        assert_eq!(text.len(), 2, "{text:?}");
        assert!(
            text[0].0 == "forever" && text[0].1.contains("timeout"),
            "{text:?}"
        );
        assert!(
            text[1].0 == "newer" && text[1].1.contains("upgrade"),
            "{text:?}"
        );
        assert!(reported.iter().all(|r| r.status == Status::Unknown));
        let err = s.run_now("d").await.unwrap_err();
        assert_eq!(err.code, "not_runnable");
        s.stop_all(Duration::from_secs(5)).await;
    }

    #[tokio::test]
    async fn run_now_unknown_check_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let outbox: Arc<dyn Outbox> = Arc::new(MemoryOutbox::open(dir.path(), 100).unwrap());
        let s = Scheduler::new(
            "fp".into(),
            outbox,
            plugins(&dir),
            4,
            dir.path().join("config.json"),
        );
        assert_eq!(s.run_now("nope").await.unwrap_err().code, "unknown_check");
    }
}
