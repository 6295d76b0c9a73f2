//! Exec checks: run a plugin directly from its argv (never through a shell) in its own
//! process group, with stdin closed, output capped, and a deadline after which the whole
//! group is killed. When the plugin exits, anything it left running in its group is killed
//! too, so a plugin's stray children cannot hold its output pipe open or pile up. Starting
//! the program and killing its group is [`crate::spawn`]'s; this module reads what the
//! program printed and makes a check outcome of it.

use outpost_sys::lock;
use std::process::ExitStatus;
use std::time::Duration;

use outpost_protocol::Status;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::outcome::Outcome;
use crate::checks::nagios;
use crate::spawn::{adopt, command, kill_group, signal_of, GroupGuard};

/// Most bytes of a plugin's stdout (and, separately, stderr) kept. The rest is read and
/// discarded so the plugin never blocks on a full pipe, and the result says so.
pub const OUTPUT_CAP: usize = 64 * 1024;

/// How long the output readers may run on after the plugin's group was killed: only
/// something that escaped the group (setsid) can still hold the pipes open.
const DRAIN_GRACE: Duration = Duration::from_millis(300);

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
                let mut kept = lock(&into);
                let room = cap.saturating_sub(kept.0.len());
                kept.0.extend_from_slice(&buf[..n.min(room)]);
                kept.1 |= n > room;
            }
        }
    }
}

fn take(c: &Captured) -> (Vec<u8>, bool) {
    std::mem::take(&mut *lock(c))
}

/// What a program did in one run.
pub struct Ran {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: ExitStatus,
    /// Output beyond [`OUTPUT_CAP`] was discarded.
    pub truncated: bool,
    /// The same for stderr.
    pub stderr_truncated: bool,
    /// Something that left the group kept the output open after the program exited.
    pub escaped: bool,
}

impl Ran {
    /// The notes every kind of program check adds about how its output was read.
    fn notes(&self, o: &mut Outcome) {
        if self.escaped {
            o.remark("[a child that left the plugin's process group kept its output open; output after the plugin exited is lost]");
        }
        if self.truncated {
            o.remark(format!("[output truncated at {OUTPUT_CAP} bytes]"));
        }
        if self.stderr_truncated {
            o.remark(format!("[stderr truncated at {OUTPUT_CAP} bytes]"));
        }
    }

    /// The first line of stderr: a plugin that failed before printing anything usually
    /// said why there.
    fn stderr_line(&self) -> String {
        String::from_utf8_lossy(&self.stderr)
            .trim()
            .lines()
            .next()
            .unwrap_or_default()
            .to_string()
    }
}

/// Run `argv` to its end (or until `timeout`, when its whole group is killed) and keep
/// what it printed. A program that cannot run or times out is UNKNOWN with the reason.
pub async fn capture(argv: &[String], timeout: Duration) -> Result<Ran, Outcome> {
    let mut cmd = command(argv).map_err(Outcome::unknown)?;
    let program = &argv[0];
    let mut child = cmd
        .spawn()
        .map_err(|e| Outcome::unknown(format!("cannot run {program}: {e}")))?;
    let pgid = adopt(&child);
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
    let timeout = timeout.clamp(Duration::from_secs(1), Duration::from_secs(24 * 3600));
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
            return Err(Outcome::unknown(format!(
                "check timed out after {}s and was killed",
                timeout.as_secs()
            )));
        }
    };
    // The group was killed as soon as the plugin exited; signalling it again later could
    // reach an unrelated group that reused the number.
    std::mem::forget(guard);
    let status = status.map_err(|e| Outcome::unknown(format!("cannot wait for {program}: {e}")))?;
    let ((stdout, out_cut), (stderr, err_cut)) = (take(&out_buf), take(&err_buf));
    Ok(Ran {
        stdout,
        stderr,
        status,
        truncated: out_cut,
        stderr_truncated: err_cut,
        escaped: !drained,
    })
}

/// Run a Nagios plugin: the exit code is the status, the output is read for its first
/// line, long output and perfdata.
pub async fn nagios(argv: &[String], timeout: Duration) -> Outcome {
    let ran = match capture(argv, timeout).await {
        Ok(r) => r,
        Err(o) => return o,
    };
    let parsed = nagios::parse_output(&String::from_utf8_lossy(&ran.stdout));
    let mut output = parsed.output;
    if output.is_empty() {
        output = ran.stderr_line();
    }
    let (status, exit_code) = match ran.status.code() {
        Some(code) => match Status::from_exit_code(code) {
            Some(s) => (s, Some(code)),
            None => {
                output = format!("plugin exited with code {code} (not 0-3): {output}");
                (Status::Unknown, Some(code))
            }
        },
        None => {
            let sig = signal_of(ran.status).unwrap_or(0);
            output = format!("plugin was killed by signal {sig}: {output}");
            (Status::Unknown, None)
        }
    };
    let mut o = Outcome::new(status, output);
    o.long_output = parsed.long_output;
    o.metrics = parsed.metrics;
    o.exit_code = exit_code;
    ran.notes(&mut o);
    if !parsed.bad_perfdata.is_empty() {
        o.remark(format!(
            "[unparsable perfdata ignored: {}]",
            parsed.bad_perfdata.join(" ")
        ));
    }
    o
}

/// Run a JSON plugin: its one JSON document is the result; the exit code only matters
/// when the document is missing (then it says how the program ended).
pub async fn json(argv: &[String], timeout: Duration) -> Outcome {
    let ran = match capture(argv, timeout).await {
        Ok(r) => r,
        Err(o) => return o,
    };
    let text = String::from_utf8_lossy(&ran.stdout);
    let mut o = if ran.truncated {
        Outcome::unknown(format!(
            "plugin printed more than {OUTPUT_CAP} bytes; a JSON document cannot be cut"
        ))
    } else if text.trim().is_empty() {
        let how = match ran.status.code() {
            Some(c) => format!("exited with code {c}"),
            None => format!(
                "was killed by signal {}",
                signal_of(ran.status).unwrap_or(0)
            ),
        };
        let mut o = Outcome::unknown(format!("plugin printed nothing and {how}"));
        let err = ran.stderr_line();
        if !err.is_empty() {
            o.note(format!("stderr: {err}"));
        }
        o
    } else {
        super::json::interpret(&text)
    };
    o.exit_code = ran.status.code();
    if ran.escaped {
        o.remark("[a child that left the plugin's process group kept its output open; output after the plugin exited is lost]");
    }
    o
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    use outpost_protocol::MAX_LONG_OUTPUT_BYTES;
    use std::time::Instant;

    fn spec(cmd: &[&str], timeout: u64) -> (Vec<String>, Duration) {
        (
            cmd.iter().map(|s| s.to_string()).collect(),
            Duration::from_secs(timeout),
        )
    }

    async fn run(s: &(Vec<String>, Duration)) -> Outcome {
        let mut o = nagios(&s.0, s.1).await;
        // As the result will carry it.
        o.long_output = o
            .clone()
            .into_result(
                &outpost_protocol::CheckSpec::new(
                    "t",
                    outpost_protocol::probe::Probe::Cpu(Default::default()),
                    1,
                    1,
                ),
                outpost_protocol::Origin::Schedule,
                0,
                0,
            )
            .long_output;
        o
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
