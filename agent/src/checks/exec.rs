//! Exec checks: run a plugin directly from its argv (never through a shell) in its own
//! process group, with stdin closed, output capped, and a deadline after which the whole
//! group is killed. When the plugin exits, anything it left running in its group is killed
//! too, so a plugin's stray children cannot hold its output pipe open or pile up.

use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use outpost_protocol::{
    CheckResult, CheckSpec, Origin, Status, MAX_LONG_OUTPUT_BYTES, MAX_METRICS, MAX_OUTPUT_BYTES,
};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

use crate::checks::nagios;
use crate::util::{now_ms, truncate_utf8};

/// Most bytes of a plugin's stdout (and, separately, stderr) kept. The rest is read and
/// discarded so the plugin never blocks on a full pipe, and the result says so.
pub const OUTPUT_CAP: usize = 64 * 1024;

fn kill_group(pgid: u32) {
    if pgid == 0 || pgid > i32::MAX as u32 {
        return;
    }
    // SAFETY: kill(2) with a negative pid signals a process group; no memory is involved.
    // The group was created for this plugin (process_group(0)), so it holds nothing else.
    unsafe {
        libc::kill(-(pgid as i32), libc::SIGKILL);
    }
}

/// Kills the plugin's process group when dropped, however the run ends: finished,
/// timed out, or abandoned because the agent is stopping.
struct GroupGuard(u32);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        kill_group(self.0);
    }
}

/// How long the output readers may run on after the plugin's group was killed: only
/// something that escaped the group (setsid) can still hold the pipes open.
const DRAIN_GRACE: Duration = Duration::from_millis(300);

/// Environment variables a plugin may see; everything else (the agent's own settings,
/// its enrollment key among them) is withheld.
const PASSED_ENV: &[&str] = &["PATH", "HOME", "TZ", "USER", "LOGNAME", "TMPDIR", "LANG"];

/// Wait for a reader to reach the end of its pipe, briefly; returns whether it did.
async fn join_reader(mut handle: tokio::task::JoinHandle<()>) -> bool {
    match tokio::time::timeout(DRAIN_GRACE, &mut handle).await {
        Ok(_) => true,
        Err(_) => {
            handle.abort();
            false
        }
    }
}

/// What a reader has kept of one output stream so far, and whether it dropped any.
type Captured = std::sync::Arc<std::sync::Mutex<(Vec<u8>, bool)>>;

/// Read `r` to its end into `into`, keeping at most `cap` bytes and discarding the rest
/// (so the plugin never blocks on a full pipe).
async fn read_capped(r: Option<impl AsyncRead + Unpin>, cap: usize, into: Captured) {
    let Some(mut r) = r else {
        return;
    };
    let mut buf = [0u8; 8192];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let mut kept = into.lock().unwrap_or_else(|p| p.into_inner());
                let room = cap.saturating_sub(kept.0.len());
                kept.0.extend_from_slice(&buf[..n.min(room)]);
                kept.1 |= n > room;
            }
        }
    }
}

fn take(c: &Captured) -> (Vec<u8>, bool) {
    std::mem::take(&mut *c.lock().unwrap_or_else(|p| p.into_inner()))
}

fn unknown(spec: &CheckSpec, started_at_ms: u64, started: Instant, output: String) -> CheckResult {
    CheckResult {
        seq: 0,
        check: spec.name.clone(),
        status: Status::Unknown,
        output,
        long_output: String::new(),
        metrics: vec![],
        started_at_ms,
        duration_ms: started.elapsed().as_millis() as u64,
        exit_code: None,
        origin: Origin::Schedule,
    }
}

pub async fn run(spec: &CheckSpec) -> CheckResult {
    let started_at_ms = now_ms();
    let started = Instant::now();
    let Some((program, args)) = spec.command.split_first() else {
        return unknown(
            spec,
            started_at_ms,
            started,
            "check has an empty command".into(),
        );
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .env_clear()
        .envs(
            PASSED_ENV
                .iter()
                .filter_map(|k| std::env::var_os(k).map(|v| (*k, v))),
        )
        .env("LC_ALL", "C");
    if std::env::var_os("PATH").is_none() {
        cmd.env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return unknown(
                spec,
                started_at_ms,
                started,
                format!("cannot run {program}: {e}"),
            );
        }
    };
    let pgid = child.id().unwrap_or(0);
    let guard = GroupGuard(pgid);
    let (out_buf, err_buf) = (Captured::default(), Captured::default());
    let out = tokio::spawn(read_capped(
        child.stdout.take(),
        OUTPUT_CAP,
        out_buf.clone(),
    ));
    let err = tokio::spawn(read_capped(
        child.stderr.take(),
        OUTPUT_CAP,
        err_buf.clone(),
    ));
    let (out_abort, err_abort) = (out.abort_handle(), err.abort_handle());
    let timeout = Duration::from_secs(spec.timeout_secs.clamp(1, 24 * 3600));
    let work = async {
        let status = child.wait().await;
        // The plugin is done: anything it left behind in its group goes with it.
        kill_group(pgid);
        let drained = join_reader(out).await & join_reader(err).await;
        (status, drained)
    };
    let (status, drained) = match tokio::time::timeout(timeout, work).await {
        Ok(x) => x,
        Err(_) => {
            drop(guard);
            out_abort.abort();
            err_abort.abort();
            return unknown(
                spec,
                started_at_ms,
                started,
                format!(
                    "check timed out after {}s and was killed",
                    timeout.as_secs()
                ),
            );
        }
    };
    // The group was killed as soon as the plugin exited; signalling it again later could
    // reach an unrelated group that reused the number.
    std::mem::forget(guard);
    let ((stdout, truncated), (stderr, _)) = (take(&out_buf), take(&err_buf));
    let duration_ms = started.elapsed().as_millis() as u64;
    let status = match status {
        Ok(s) => s,
        Err(e) => {
            return unknown(
                spec,
                started_at_ms,
                started,
                format!("cannot wait for {program}: {e}"),
            )
        }
    };
    let text = String::from_utf8_lossy(&stdout);
    let mut parsed = nagios::parse_output(&text);
    let err_text = String::from_utf8_lossy(&stderr).trim().to_string();
    if parsed.output.is_empty() && !err_text.is_empty() {
        // A plugin that failed before printing anything usually said why on stderr.
        parsed.output = err_text.lines().next().unwrap_or_default().to_string();
    }
    let (status_val, exit_code) = match status.code() {
        Some(code) => match Status::from_exit_code(code) {
            Some(s) => (s, Some(code)),
            None => {
                parsed.output = format!(
                    "plugin exited with code {code} (not 0-3): {}",
                    parsed.output
                );
                (Status::Unknown, Some(code))
            }
        },
        None => {
            let sig = status.signal().unwrap_or(0);
            parsed.output = format!("plugin was killed by signal {sig}: {}", parsed.output);
            (Status::Unknown, None)
        }
    };
    let mut notes = Vec::new();
    if !drained {
        notes.push("[a child that left the plugin's process group kept its output open; output after the plugin exited is lost]".to_string());
    }
    if truncated {
        notes.push(format!("[output truncated at {OUTPUT_CAP} bytes]"));
    }
    if !parsed.bad_perfdata.is_empty() {
        notes.push(format!(
            "[unparsable perfdata ignored: {}]",
            parsed.bad_perfdata.join(" ")
        ));
    }
    if parsed.metrics.len() > MAX_METRICS {
        notes.push(format!(
            "[{} metrics beyond {MAX_METRICS} dropped]",
            parsed.metrics.len() - MAX_METRICS
        ));
        parsed.metrics.truncate(MAX_METRICS);
    }
    let mut long_output = parsed.long_output;
    for n in notes {
        if !long_output.is_empty() {
            long_output.push('\n');
        }
        long_output.push_str(&n);
    }
    let mut output = parsed.output;
    truncate_utf8(&mut output, MAX_OUTPUT_BYTES);
    if truncate_utf8(&mut long_output, MAX_LONG_OUTPUT_BYTES - 32) {
        long_output.push_str("\n[long output truncated]");
    }
    CheckResult {
        seq: 0,
        check: spec.name.clone(),
        status: status_val,
        output,
        long_output,
        metrics: parsed.metrics,
        started_at_ms,
        duration_ms,
        exit_code,
        origin: Origin::Schedule,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(cmd: &[&str], timeout: u64) -> CheckSpec {
        CheckSpec {
            name: "t".into(),
            command: cmd.iter().map(|s| s.to_string()).collect(),
            interval_secs: 60,
            timeout_secs: timeout,
            plugin: None,
        }
    }

    #[tokio::test]
    async fn exit_codes_map_to_status() {
        for (code, status) in [
            (0, Status::Ok),
            (1, Status::Warning),
            (2, Status::Critical),
            (3, Status::Unknown),
        ] {
            let r = run(&spec(
                &["/bin/sh", "-c", &format!("echo out {code}; exit {code}")],
                5,
            ))
            .await;
            assert_eq!(r.status, status);
            assert_eq!(r.output, format!("out {code}"));
            assert_eq!(r.exit_code, Some(code));
        }
        let r = run(&spec(&["/bin/sh", "-c", "echo hi; exit 7"], 5)).await;
        assert_eq!(r.status, Status::Unknown);
        assert!(r.output.contains("code 7"), "{}", r.output);
    }

    #[tokio::test]
    async fn arguments_are_not_interpreted_by_a_shell() {
        let r = run(&spec(&["/bin/echo", "$HOME; rm -rf /", "|", "x=1"], 5)).await;
        assert_eq!(r.output, "$HOME; rm -rf /");
        assert_eq!(
            r.metrics.len(),
            1,
            "text after | is perfdata: {:?}",
            r.metrics
        );
    }

    #[tokio::test]
    async fn missing_program_is_unknown_with_reason() {
        let r = run(&spec(&["/nonexistent/check_x"], 5)).await;
        assert_eq!(r.status, Status::Unknown);
        assert!(
            r.output.contains("cannot run /nonexistent/check_x"),
            "{}",
            r.output
        );
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("child-alive");
        // The child outlives the plugin's shell unless its group is killed.
        let script = format!("(sleep 3; touch {}) & sleep 30", marker.display());
        let t = Instant::now();
        let r = run(&spec(&["/bin/sh", "-c", &script], 1)).await;
        assert!(t.elapsed() < Duration::from_secs(5));
        assert_eq!(r.status, Status::Unknown);
        assert!(r.output.contains("timed out after 1s"), "{}", r.output);
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(!marker.exists(), "a child of the timed-out plugin survived");
    }

    #[tokio::test]
    async fn flood_is_capped_and_said_so() {
        let r = run(&spec(
            &[
                "/bin/sh",
                "-c",
                "echo FIRST; head -c 2000000 /dev/zero | tr '\\0' x",
            ],
            10,
        ))
        .await;
        assert_eq!(r.output, "FIRST");
        assert!(r.long_output.contains("truncated"), "{}", r.long_output);
        assert!(r.long_output.len() <= MAX_LONG_OUTPUT_BYTES);
    }

    #[tokio::test]
    async fn a_child_that_escapes_the_group_cannot_hold_the_result() {
        let t = Instant::now();
        let r = run(&spec(
            &[
                "/bin/sh",
                "-c",
                "setsid sleep 5 & sleep 0.5; echo 'ESCAPE OK'",
            ],
            10,
        ))
        .await;
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        assert_eq!(r.status, Status::Ok);
        assert_eq!(r.output, "ESCAPE OK");
        assert!(
            r.long_output.contains("left the plugin's process group"),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn plugins_do_not_see_the_agents_environment() {
        std::env::set_var("OUTPOST_ENROLL_KEY", "secret-key");
        let r = run(&spec(
            &[
                "/bin/sh",
                "-c",
                "echo \"key=[$OUTPOST_ENROLL_KEY] lc=$LC_ALL\"",
            ],
            5,
        ))
        .await;
        assert_eq!(r.output, "key=[] lc=C");
    }

    #[tokio::test]
    async fn stderr_explains_a_silent_failure() {
        let r = run(&spec(
            &["/bin/sh", "-c", "echo 'no such host' >&2; exit 2"],
            5,
        ))
        .await;
        assert_eq!(r.status, Status::Critical);
        assert_eq!(r.output, "no such host");
    }
}
