//! One collector's life: write its configuration file, stop a copy an earlier agent left
//! running, start it in its own process group with a cleared environment, log its output,
//! restart it with backoff when it exits, give up on a crash loop, stop it on request —
//! and report each of these as a result of its health check `collector.NAME`.

use outpost_sys::lock;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outpost_protocol::{
    CheckResult, CollectorKind, Status, MAX_LONG_OUTPUT_BYTES, MAX_OUTPUT_BYTES,
};
use tokio_util::sync::CancellationToken;

use super::pidfile;
use super::render::Rendered;
use crate::outbox::Outbox;
use crate::spawn::{self, GroupGuard};
use crate::supervise::{self, Logged, OutputLog, Restarts, CRASH_WINDOW, STOP_GRACE};
use crate::util::{now_ms, truncate_utf8};

/// Longest time between two health results of a running collector.
pub const HEARTBEAT: Duration = Duration::from_secs(60);
/// How long a started collector must stay up before it is reported running: one that
/// exits at once (a bad configuration) goes from WARNING to WARNING to a crash loop
/// without an OK flapping in between.
pub const SETTLE: Duration = Duration::from_secs(2);
/// How often a collector that cannot be started at all (program missing) is tried again.
pub const RETRY_UNSTARTABLE: Duration = Duration::from_secs(60);
/// Lines of a collector's output logged per minute (stdout and stderr together).
pub const OUTPUT_LINES_PER_MINUTE: u32 = 30;
/// Lines of its output quoted when it exits.
pub const TAIL_LINES: usize = 10;

/// Where a collector is in its life, as its latest health result said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Starting,
    Running,
    Restarting,
    CrashLoop,
    ConfigError,
    Stopped,
}

/// What the supervisor needs to know about its collector.
pub struct Job {
    pub name: String,
    pub kind: CollectorKind,
    /// Its health check, `collector.NAME`.
    pub check: String,
    /// Its own directory: configuration file, pid file, working directory.
    pub dir: PathBuf,
    /// What to run, or why it cannot be rendered.
    pub rendered: Result<Rendered, String>,
}

impl Job {
    /// A word for the program in health results: "collectd", "fluentd", or the program's
    /// file name.
    fn label(&self) -> String {
        match self.kind {
            CollectorKind::Collectd => "collectd".into(),
            CollectorKind::Fluentd => "fluentd".into(),
            CollectorKind::Program => self
                .rendered
                .as_ref()
                .ok()
                .and_then(|r| r.argv.first())
                .and_then(|p| Path::new(p).file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| self.name.clone()),
        }
    }
}

/// Sends health results and remembers the phase they announced.
struct Health {
    outbox: Arc<dyn Outbox>,
    check: String,
    name: String,
    phase: Arc<Mutex<Phase>>,
}

impl Health {
    fn report(&self, phase: Phase, status: Status, output: String, details: &[String]) {
        *lock(&self.phase) = phase;
        let mut r = CheckResult::new(self.check.clone(), status, output);
        r.started_at_ms = now_ms();
        truncate_utf8(&mut r.output, MAX_OUTPUT_BYTES);
        r.long_output = details.join("\n");
        truncate_utf8(&mut r.long_output, MAX_LONG_OUTPUT_BYTES);
        if let Err(e) = self.outbox.append(r) {
            tracing::error!(collector = %self.name, error = %e, "cannot queue the collector's health result");
        }
    }

    fn set(&self, phase: Phase) {
        *lock(&self.phase) = phase;
    }
}

/// "42 s", "3 min 5 s", "2 h 10 min", "4 d 3 h".
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        3600..86400 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86400, s % 86400 / 3600),
    }
}

/// Write the configuration file when its content differs from what is on disk.
fn write_config(rendered: &Rendered) -> std::io::Result<()> {
    let Some((path, text)) = &rendered.file else {
        return Ok(());
    };
    if std::fs::read(path).ok().as_deref() == Some(text.as_bytes()) {
        return Ok(());
    }
    crate::util::write_atomic(path, text.as_bytes(), 0o600)
}

/// How one run of the collector ended.
enum Ended {
    Stopped,
    /// It could not be started: the reason.
    CannotStart(String),
    /// It exited: how, and the last lines it printed.
    Exited(String, Vec<String>),
}

/// Keep `job` running until `stop`; its health results go to `outbox`, its phase to
/// `phase`. Returns once it is stopped and its process group is gone.
pub async fn supervise(
    job: Job,
    outbox: Arc<dyn Outbox>,
    phase: Arc<Mutex<Phase>>,
    stop: CancellationToken,
) {
    let h = Health {
        outbox,
        check: job.check.clone(),
        name: job.name.clone(),
        phase,
    };
    let label = job.label();
    if cfg!(windows) {
        // Said, never a silent no-op: the gateway shows the collector as CRITICAL.
        tracing::error!(collector = %job.name, "collectors are not supported on Windows");
        h.report(
            Phase::ConfigError,
            Status::Critical,
            format!("{label} cannot run: collectors are not supported on Windows agents (only on Linux)"),
            &[],
        );
        stop.cancelled().await;
        return h.set(Phase::Stopped);
    }
    let config_error = |why: String| {
        tracing::error!(collector = %job.name, reason = %why, "collector configuration error");
        h.report(
            Phase::ConfigError,
            Status::Critical,
            format!("{label} config error: {why}"),
            &[],
        );
    };
    let rendered = match &job.rendered {
        Ok(r) => r,
        Err(why) => {
            config_error(why.clone());
            stop.cancelled().await;
            return h.set(Phase::Stopped);
        }
    };
    let prepared = std::fs::create_dir_all(&job.dir)
        .map_err(|e| format!("cannot create {}: {e}", job.dir.display()))
        .and_then(|_| {
            write_config(rendered).map_err(|e| {
                let file = rendered.file.as_ref().map(|f| f.0.display().to_string());
                format!("cannot write {}: {e}", file.unwrap_or_default())
            })
        });
    if let Err(why) = prepared {
        config_error(why);
        stop.cancelled().await;
        return h.set(Phase::Stopped);
    }
    let pid_file = job.dir.join(pidfile::FILE);
    let program = rendered.argv.first().map(String::as_str);
    pidfile::stop_stale(&pid_file, &job.dir, program, STOP_GRACE).await;
    let mut restarts = Restarts::default();
    loop {
        let started = Instant::now();
        let (how, tail) = match run_once(&job, rendered, &label, &pid_file, &h, &stop).await {
            Ended::Stopped => return h.set(Phase::Stopped),
            Ended::CannotStart(why) => {
                config_error(format!(
                    "{why}; trying again every {} s",
                    RETRY_UNSTARTABLE.as_secs()
                ));
                tokio::select! {
                    _ = tokio::time::sleep(RETRY_UNSTARTABLE) => continue,
                    _ = stop.cancelled() => return h.set(Phase::Stopped),
                }
            }
            Ended::Exited(how, tail) => (how, tail),
        };
        let last = notable(&tail)
            .map(|l| format!("; last output: {l}"))
            .unwrap_or_default();
        match restarts.exited(Instant::now(), started.elapsed()) {
            Some(delay) => {
                let n = restarts.exits_in_window();
                tracing::warn!(collector = %job.name, reason = %how, retry_in_s = delay.as_secs(), exits = n, "collector ended; restarting");
                h.report(
                    Phase::Restarting,
                    Status::Warning,
                    format!(
                        "{label} {how}; next start in {} s ({n} exits in the last {} s){last}",
                        delay.as_secs(),
                        CRASH_WINDOW.as_secs()
                    ),
                    &tail,
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => return h.set(Phase::Stopped),
                }
            }
            None => {
                let n = restarts.exits_in_window();
                let why = format!(
                    "{label} crash loop: ended {n} times within {} s (last: {how}); not restarting until its declaration changes or the agent restarts{last}",
                    CRASH_WINDOW.as_secs()
                );
                tracing::error!(collector = %job.name, "{why}");
                h.report(Phase::CrashLoop, Status::Critical, why, &tail);
                stop.cancelled().await;
                return h.set(Phase::Stopped);
            }
        }
    }
}

/// Run the collector once, until it exits or `stop`.
async fn run_once(
    job: &Job,
    rendered: &Rendered,
    label: &str,
    pid_file: &Path,
    h: &Health,
    stop: &CancellationToken,
) -> Ended {
    let mut cmd = match spawn::command(&rendered.argv) {
        Ok(c) => c,
        Err(e) => return Ended::CannotStart(e),
    };
    cmd.envs(&rendered.env).current_dir(&job.dir);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Ended::CannotStart(format!("cannot run {}: {e}", rendered.argv[0]));
        }
    };
    let pid = spawn::adopt(&child);
    let guard = GroupGuard(pid);
    if let Err(e) = pidfile::write(pid_file, pid) {
        tracing::warn!(collector = %job.name, pid, error = %e, "cannot write the collector's pid file");
    }
    tracing::info!(collector = %job.name, pid, argv = ?rendered.argv, "collector started");
    let log = OutputLog::new(OUTPUT_LINES_PER_MINUTE, TAIL_LINES);
    let readers = [
        tokio::spawn(supervise::log_lines(
            child.stdout.take(),
            log.clone(),
            logger(job.name.clone(), "stdout"),
        )),
        tokio::spawn(supervise::log_lines(
            child.stderr.take(),
            log.clone(),
            logger(job.name.clone(), "stderr"),
        )),
    ];
    let up = Instant::now();
    let running = |h: &Health| {
        h.report(
            Phase::Running,
            Status::Ok,
            format!("{label} running, pid {pid}, up for {}", human(up.elapsed())),
            &[],
        )
    };
    h.set(Phase::Starting);
    let mut beat = tokio::time::Instant::now() + SETTLE;
    let status = loop {
        tokio::select! {
            s = child.wait() => break s,
            _ = tokio::time::sleep_until(beat) => {
                beat = tokio::time::Instant::now() + HEARTBEAT;
                running(h);
            }
            _ = stop.cancelled() => {
                if !supervise::terminate(&mut child, pid, STOP_GRACE).await {
                    tracing::warn!(collector = %job.name, pid, "collector ignored SIGTERM; killed it");
                }
                drop(guard);
                let _ = std::fs::remove_file(pid_file);
                for r in readers {
                    r.abort();
                }
                tracing::info!(collector = %job.name, pid, "collector stopped");
                return Ended::Stopped;
            }
        }
    };
    // Whatever it left in its group goes with it, before the number can be reused.
    drop(guard);
    let _ = std::fs::remove_file(pid_file);
    for r in readers {
        let _ = tokio::time::timeout(Duration::from_millis(300), r).await;
    }
    let how = match status {
        Ok(s) => supervise::describe_exit(s),
        Err(e) => format!("could not be waited for: {e}"),
    };
    Ended::Exited(how, log.tail())
}

/// What best says why a collector ended: the last lines of `tail` that speak of an error
/// (stdout and stderr interleave, so the very last line may be any), else the last line.
fn notable(tail: &[String]) -> Option<String> {
    // The last three lines that mention an error, oldest first: collectd names the problem
    // in one line and says that it gave up in the next.
    let errors: Vec<&str> = tail
        .iter()
        .filter(|l| l.to_ascii_lowercase().contains("error"))
        .map(String::as_str)
        .collect();
    match &errors[errors.len().saturating_sub(3)..] {
        [] => tail.last().cloned(),
        some => Some(some.join(" | ")),
    }
}

/// Logs one output stream of a collector: collectd's `[error]`/`[warning]` lines and all
/// of stderr at WARN, the rest at INFO.
fn logger(name: String, stream: &'static str) -> impl Fn(Logged<'_>) {
    move |l| match l {
        Logged::Line(line) => {
            let loud =
                stream == "stderr" || line.starts_with("[error]") || line.starts_with("[warning]");
            if loud {
                tracing::warn!(collector = %name, stream, line, "collector output");
            } else {
                tracing::info!(collector = %name, stream, line, "collector output");
            }
        }
        Logged::Dropped(dropped) => {
            tracing::warn!(collector = %name, dropped, "collector output lines not logged (rate limit)")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_notable_line_speaks_of_an_error() {
        let tail: Vec<String> = ["[info] a", "[error] b", "Error: c", "[info] d"]
            .map(String::from)
            .into();
        assert_eq!(notable(&tail).unwrap(), "[error] b | Error: c");
        assert_eq!(notable(&tail[..2]).unwrap(), "[error] b");
        assert_eq!(notable(&tail[..1]).unwrap(), "[info] a");
        assert_eq!(notable(&[]), None);
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human(Duration::from_secs(0)), "0 s");
        assert_eq!(human(Duration::from_secs(59)), "59 s");
        assert_eq!(human(Duration::from_secs(185)), "3 min 5 s");
        assert_eq!(human(Duration::from_secs(7800)), "2 h 10 min");
        assert_eq!(human(Duration::from_secs(3 * 86400 + 7200)), "3 d 2 h");
    }
}
