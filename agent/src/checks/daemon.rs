//! Daemon plugins: a long-running program that prints one JSON document per line (the
//! JSON plugin format, see [`super::json`]); every line is a result.
//!
//! The agent keeps it running: when it exits, that is reported (UNKNOWN, with its exit
//! code and last stderr line) and it is restarted after an exponential backoff (1 s,
//! doubling to 60 s; back to 1 s once it has stayed up for a minute). After
//! [`CRASH_LIMIT`] exits within [`CRASH_WINDOW`] it is a crash loop: a CRITICAL result
//! says so, the error is logged, and the daemon is not started again until its
//! configuration changes or the agent restarts.
//!
//! When `timeout_secs` is set it is the longest the daemon may stay silent: each time it
//! passes without a line, an UNKNOWN result says so (the daemon is left running). Lines
//! longer than [`MAX_LINE`] are dropped with an UNKNOWN result; stderr goes to the agent's
//! log, at most [`STDERR_LINES_PER_MINUTE`] lines a minute. On stop the daemon's process
//! group gets SIGTERM, then SIGKILL after [`STOP_GRACE`].
//!
//! A daemon yields at most one result per [`MIN_GAP`]: lines printed faster are coalesced
//! (the latest is reported, with a remark counting the others), so a chatty daemon cannot
//! flood the outbox. Daemons do not take a slot of the global concurrency limit: they
//! would hold it forever.

use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_protocol::{CheckResult, CheckSpec, Origin};
use tokio::io::BufReader;
use tokio_util::sync::CancellationToken;

use super::json;
use super::outcome::Outcome;
use super::Runner;
use crate::spawn::{self, GroupGuard};
use crate::supervise::{self, read_line, Line, Logged, OutputLog, Restarts};
pub use crate::supervise::{CRASH_LIMIT, CRASH_WINDOW, MAX_LINE, STOP_GRACE};
use crate::util::now_ms;

pub const STDERR_LINES_PER_MINUTE: u32 = 20;
/// Shortest time between two results of one daemon; faster lines are coalesced.
pub const MIN_GAP: Duration = Duration::from_secs(1);

fn result(spec: &CheckSpec, o: Outcome) -> CheckResult {
    o.into_result(spec, Origin::Schedule, now_ms(), 0)
}

/// Keep `spec`'s daemon running until `stop`, handing each result to `emit`.
pub async fn supervise(
    runner: Arc<Runner>,
    spec: CheckSpec,
    stop: CancellationToken,
    emit: impl Fn(CheckResult) + Send + 'static,
) {
    let mut restarts = Restarts::default();
    loop {
        let started = Instant::now();
        let ended = match runner.argv(&spec).await {
            Ok(argv) => run_once(&spec, &argv, &stop, &emit).await,
            Err(o) => Some(o.output),
        };
        let Some(how) = ended else {
            return; // stopped
        };
        match restarts.exited(Instant::now(), started.elapsed()) {
            Some(delay) => {
                tracing::warn!(check = %spec.name, reason = %how, retry_in_s = delay.as_secs(), "daemon check ended; restarting");
                emit(result(
                    &spec,
                    Outcome::unknown(format!("daemon {how}; restarting in {}s", delay.as_secs())),
                ));
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => return,
                }
            }
            None => {
                let why = format!(
                    "daemon crash loop: ended {CRASH_LIMIT} times within {}s (last: {how}); not restarting until its configuration changes or the agent restarts",
                    CRASH_WINDOW.as_secs()
                );
                tracing::error!(check = %spec.name, "{why}");
                emit(result(&spec, Outcome::critical(why)));
                stop.cancelled().await;
                return;
            }
        }
    }
}

/// Run the daemon once. Returns how it ended, or `None` when stopped.
async fn run_once(
    spec: &CheckSpec,
    argv: &[String],
    stop: &CancellationToken,
    emit: &impl Fn(CheckResult),
) -> Option<String> {
    let mut cmd = match spawn::command(argv) {
        Ok(c) => c,
        Err(e) => return Some(e),
    };
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Some(format!("cannot run {}: {e}", argv[0])),
    };
    let pgid = spawn::adopt(&child);
    let guard = GroupGuard(pgid);
    tracing::info!(check = %spec.name, pid = pgid, "daemon check started");
    let err_log = OutputLog::new(STDERR_LINES_PER_MINUTE, 1);
    let check = spec.name.clone();
    let stderr = tokio::spawn(supervise::log_lines(
        child.stderr.take(),
        err_log.clone(),
        move |l| match l {
            Logged::Line(line) => tracing::warn!(check = %check, stderr = %line, "daemon check"),
            Logged::Dropped(dropped) => {
                tracing::warn!(check = %check, dropped, "daemon stderr lines not logged (rate limit)")
            }
        },
    ));
    let Some(stdout) = child.stdout.take() else {
        return Some("has no output pipe".into());
    };
    let mut lines = BufReader::new(stdout);
    let mut buf = Vec::new();
    let silence = (spec.timeout_secs > 0)
        .then(|| Duration::from_secs(spec.timeout_secs.min(super::MAX_TIMEOUT_SECS)));
    let mut last_line = tokio::time::Instant::now();
    // At most one result per MIN_GAP: a daemon printing faster has its lines coalesced
    // (the latest kept, the others counted), so it cannot flood the outbox.
    let mut last_emit: Option<tokio::time::Instant> = None;
    let mut pending: Option<(Outcome, u64)> = None;
    let ended = loop {
        let quiet_until = silence.and_then(|s| last_line.checked_add(s));
        let flush_at = pending.as_ref().and(last_emit).map(|t| t + MIN_GAP);
        tokio::select! {
            read = read_line(&mut lines, &mut buf) => match read {
                Ok(Line::Eof) => break None,
                Ok(Line::Text) => {
                    last_line = tokio::time::Instant::now();
                    let text = String::from_utf8_lossy(&buf);
                    if text.trim().is_empty() {
                        continue;
                    }
                    let o = json::interpret(&text);
                    // Lines waiting to be reported are replaced by this newer one.
                    let skipped = pending.take().map(|(_, n)| n + 1).unwrap_or(0);
                    if last_emit.is_some_and(|t| t.elapsed() < MIN_GAP) {
                        pending = Some((o, skipped));
                    } else {
                        last_emit = Some(tokio::time::Instant::now());
                        emit(result(spec, coalesced(o, skipped)));
                    }
                }
                Ok(Line::TooLong) => {
                    last_line = tokio::time::Instant::now();
                    emit(result(spec, Outcome::unknown(format!("daemon printed a line longer than {MAX_LINE} bytes; dropped"))));
                }
                Err(e) => break Some(format!("output could not be read: {e}")),
            },
            _ = async { match flush_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            } } => {
                if let Some((o, skipped)) = pending.take() {
                    last_emit = Some(tokio::time::Instant::now());
                    emit(result(spec, coalesced(o, skipped)));
                }
            }
            _ = async { match quiet_until {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            } } => {
                last_line = tokio::time::Instant::now();
                emit(result(spec, Outcome::unknown(format!(
                    "daemon printed nothing for {}s", spec.timeout_secs))));
            }
            _ = stop.cancelled() => {
                if !supervise::terminate(&mut child, pgid, STOP_GRACE).await {
                    tracing::warn!(check = %spec.name, "daemon ignored SIGTERM; killed it");
                }
                drop(guard);
                stderr.abort();
                return None;
            }
        }
    };
    if let Some((o, skipped)) = pending.take() {
        emit(result(spec, coalesced(o, skipped)));
    }
    // Its output closed: it is exiting (or closed stdout on purpose; it goes either way).
    let status = match tokio::time::timeout(STOP_GRACE, child.wait()).await {
        Ok(Ok(s)) => supervise::describe_exit(s),
        Ok(Err(e)) => format!("could not be waited for: {e}"),
        Err(_) => "closed its output but kept running; killed".into(),
    };
    drop(guard);
    let _ = tokio::time::timeout(Duration::from_millis(300), stderr).await;
    let mut how = ended.unwrap_or(status);
    if let Some(err) = err_log.tail().pop() {
        how.push_str(&format!(" (stderr: {err})"));
    }
    Some(how)
}

/// `o`, saying how many earlier lines it stands for.
fn coalesced(mut o: Outcome, skipped: u64) -> Outcome {
    if skipped > 0 {
        o.remark(format!(
            "[{skipped} earlier lines within {}s not reported]",
            MIN_GAP.as_secs()
        ));
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_protocol::Status;

    fn daemon(script: &str, timeout_secs: u64) -> CheckSpec {
        CheckSpec::new(
            "d",
            outpost_protocol::probe::Probe::Daemon(outpost_protocol::probe::Command {
                command: vec!["/bin/sh".into(), "-c".into(), script.into()],
            }),
            0,
            timeout_secs,
        )
    }

    async fn collect(spec: CheckSpec, until: impl Fn(&[CheckResult]) -> bool) -> Vec<CheckResult> {
        let dir = tempfile::tempdir().unwrap();
        let runner = Arc::new(Runner::new(
            Arc::new(crate::plugins::PluginStore::new(dir.path())),
            Default::default(),
        ));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let task = tokio::spawn(supervise(runner, spec, stop.clone(), move |r| {
            let _ = tx.send(r);
        }));
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !until(&got) {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(r)) => got.push(r),
                _ => panic!("condition not met; got {got:#?}"),
            }
        }
        stop.cancel();
        tokio::time::timeout(STOP_GRACE + Duration::from_secs(2), task)
            .await
            .expect("supervisor stops")
            .unwrap();
        got
    }

    #[tokio::test]
    async fn each_line_is_a_result_and_an_exit_is_reported_and_restarted() {
        let spec = daemon(
            r#"echo '{"status":"ok","text":"tick","metrics":{"n":1}}'; echo 'oops' >&2; echo 'not json'; exit 3"#,
            0,
        );
        let got = collect(spec, |g| {
            g.iter().filter(|r| r.output == "tick").count() >= 2
        })
        .await;
        assert_eq!(got[0].status, Status::Ok);
        assert_eq!(got[0].metrics[0].name, "n");
        assert_eq!(got[1].status, Status::Unknown);
        assert!(got[1].output.contains("not valid JSON"), "{:?}", got[1]);
        assert!(
            got[2].output.contains("exited with code 3")
                && got[2].output.contains("stderr: oops")
                && got[2].output.contains("restarting in 1s"),
            "{:?}",
            got[2]
        );
    }

    #[tokio::test]
    async fn a_chatty_daemon_is_coalesced_to_one_result_a_second() {
        let spec = daemon(
            r#"i=0; while true; do i=$((i+1)); echo "{\"status\":0,\"text\":\"n $i\"}"; done"#,
            0,
        );
        let t = Instant::now();
        let got = collect(spec, |g| g.len() >= 3).await;
        assert!(
            t.elapsed() >= Duration::from_millis(1_900),
            "{:?}",
            t.elapsed()
        );
        assert!(
            got[1]
                .long_output
                .contains("earlier lines within 1s not reported"),
            "{:?}",
            got[1]
        );
        let n = |r: &CheckResult| r.output.trim_start_matches("n ").parse::<u64>().unwrap();
        assert!(
            n(&got[2]) > n(&got[1]) + 1,
            "the latest line is reported: {got:#?}"
        );
    }

    #[tokio::test]
    async fn a_crash_loop_gives_up_loudly() {
        let spec = daemon("exit 1", 0);
        let t = Instant::now();
        let got = collect(spec, |g| g.iter().any(|r| r.output.contains("crash loop"))).await;
        let last = got.last().unwrap();
        assert_eq!(last.status, Status::Critical);
        assert!(last.output.contains("ended 5 times"), "{}", last.output);
        assert_eq!(got.len(), CRASH_LIMIT, "{got:#?}");
        // 1 + 2 + 4 + 8 seconds of backoff between the five starts.
        assert!(t.elapsed() >= Duration::from_secs(15), "{:?}", t.elapsed());
    }

    #[tokio::test]
    async fn silence_is_reported_and_stop_terminates_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("child");
        // A child in the daemon's group that would outlive a plain kill of the shell.
        let script = format!(
            "(sleep 4; touch {}) & echo '{{\"status\":0,\"text\":\"up\"}}'; sleep 60",
            marker.display()
        );
        let got = collect(daemon(&script, 1), |g| {
            g.iter()
                .any(|r| r.output.contains("printed nothing for 1s"))
        })
        .await;
        assert_eq!(got[0].output, "up");
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!marker.exists(), "the daemon's group outlived the stop");
    }
}
