//! Request daemons (`kind = "request"`): a long-running program that reads one JSON request
//! per line on stdin and answers each with one JSON document per line on stdout. One such
//! process serves every check whose command is the same (a poller that keeps its SNMP or
//! database sessions warm for many targets); each run of a check is one request.
//!
//! The agent writes, one line per run:
//!
//! ```json
//! {"id": 17, "check": "ifaces", "entity": "core-router", "timeout_ms": 4500, "request": {"oid": "1.3.6.1.2.1.2.2"}}
//! ```
//!
//! and the daemon answers, in any order, with the JSON plugin document (see [`super::json`])
//! and the request's `id`:
//!
//! ```json
//! {"id": 17, "status": "ok", "text": "24 interfaces up", "metrics": {"up": 24}}
//! ```
//!
//! - `timeout_ms` is nine tenths of the check's timeout: an answer given at the last moment
//!   the daemon was allowed still arrives in time. A request not answered within the
//!   check's timeout is UNKNOWN ("did not answer"), and its answer, if it comes later, is
//!   dropped.
//! - A daemon that printed nothing at all for [`HUNG_AFTER`] past the timeout of a request
//!   written to it has stopped answering: its process group is killed, every request still
//!   waiting is UNKNOWN, and it is started again for the next request, with the backoff
//!   and crash-loop limit of daemon checks ([`crate::supervise::Restarts`]). Until it has
//!   printed its first line it has [`STARTUP_GRACE`] to start.
//! - An answer with a waiting `id` that is not a check result is that request's UNKNOWN,
//!   with the reason. A line that names no waiting request (not JSON, no `id`, or one the
//!   agent did not send) cannot be charged to a request: it is logged, and a request that
//!   then times out quotes the last such line printed after it was sent.
//! - A daemon that exits, or closes its stdin, fails the requests waiting on it (UNKNOWN,
//!   with its exit code and last stderr line) and is started again with backoff. After a
//!   crash loop its requests are CRITICAL ("crash loop") for [`CRASH_HOLD`], then it is
//!   tried afresh.
//! - The process starts with its first request and stops (SIGTERM, then SIGKILL) when no
//!   request came for three intervals of the check that asked last (at least
//!   [`MIN_IDLE`], at most [`MAX_IDLE`]), when no configured check uses it any more, or
//!   when the agent stops.
//!
//! Requests do not wait on each other: several may be in flight, each bounded by its own
//! timeout. Reading and writing are tasks of their own, so that a daemon that stops reading
//! its stdin does not stop the agent from reading its answers, and a line is never cut by
//! a request arriving while it is read.

use outpost_sys::lock;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outpost_protocol::CheckSpec;
use serde_json::{json, Value};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant as TokioInstant;
use tokio_util::sync::CancellationToken;

use super::json as plugin_json;
use super::outcome::Outcome;
use crate::spawn::{self, GroupGuard};
use crate::supervise::{self, read_line, Line, Logged, OutputLog, Restarts, MAX_LINE, STOP_GRACE};

/// Shortest idle time before an unused daemon is stopped…
pub const MIN_IDLE: Duration = Duration::from_secs(300);
/// …and the longest.
pub const MAX_IDLE: Duration = Duration::from_secs(24 * 3600);
/// How long a daemon in a crash loop is left alone before it is tried again.
pub const CRASH_HOLD: Duration = Duration::from_secs(300);
/// Requests waiting to be written to one daemon; more are refused at once.
pub const MAX_WAITING: usize = 1024;
/// Silence past a request's timeout after which the daemon is taken to hang.
pub const HUNG_AFTER: Duration = Duration::from_secs(2);
/// How long a new daemon may take to print its first line before it can be taken to hang.
pub const STARTUP_GRACE: Duration = Duration::from_secs(10);
/// How long a daemon that stopped answering gets between SIGTERM and SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(1);
const STDERR_LINES_PER_MINUTE: u32 = 20;
/// Lines that answer nothing, logged per minute per daemon.
const STRAY_LINES_PER_MINUTE: u32 = 10;

type Daemons = Arc<Mutex<HashMap<Vec<String>, Handle>>>;

/// The request daemons of one agent, by command.
#[derive(Default)]
pub struct RequestDaemons {
    daemons: Daemons,
    stop: CancellationToken,
}

struct Handle {
    tx: mpsc::Sender<Ask>,
    task: tokio::task::JoinHandle<()>,
    /// The checks that sent it requests.
    users: HashSet<String>,
}

/// One run of a check, on its way to a daemon.
struct Ask {
    check: String,
    entity: Option<String>,
    request: serde_json::Map<String, Value>,
    timeout: Duration,
    /// The check's interval (an hour for a cron check), for the idle limit.
    interval: Duration,
    reply: oneshot::Sender<Outcome>,
}

impl RequestDaemons {
    /// Send `spec`'s request to the daemon `argv` (started if it is not running) and wait
    /// for its answer, at most `timeout`.
    pub async fn ask(&self, argv: Vec<String>, spec: &CheckSpec, timeout: Duration) -> Outcome {
        let outpost_protocol::probe::Probe::Request(probe) = &spec.probe else {
            return Outcome::unknown("not a request check");
        };
        if self.stop.is_cancelled() {
            return Outcome::unknown("the agent is stopping");
        }
        let (reply, answer) = oneshot::channel();
        let mut ask = Ask {
            check: spec.name.clone(),
            entity: spec.entity.clone(),
            request: probe.request.clone(),
            timeout,
            interval: Duration::from_secs(match spec.interval_secs {
                0 => 3600,
                s => s,
            }),
            reply,
        };
        {
            // Under the lock a daemon's task takes to retire (see `retire`): a request is
            // either queued to a task that will take it, or finds the task gone.
            let mut daemons = lock(&self.daemons);
            for attempt in 0..2 {
                let live = daemons.get(&argv).is_some_and(|h| !h.tx.is_closed());
                if !live {
                    daemons.insert(argv.clone(), self.start(argv.clone()));
                }
                let h = daemons.get_mut(&argv).expect("inserted above");
                if !h.users.contains(&spec.name) {
                    h.users.insert(spec.name.clone());
                }
                match h.tx.try_send(ask) {
                    Ok(()) => break,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        return Outcome::unknown(format!(
                        "the request daemon has {MAX_WAITING} requests waiting already; not sent"
                    ))
                    }
                    // Its task ended just now (stopped, or failed to start): a new one.
                    Err(mpsc::error::TrySendError::Closed(a)) if attempt == 0 => ask = a,
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        return Outcome::unknown("the request daemon could not be started")
                    }
                }
            }
        }
        // The daemon's task answers every request it took, at its timeout at the latest
        // (or as it stops, which takes a few seconds); this bound only guards against a
        // bug there.
        match tokio::time::timeout(timeout + Duration::from_secs(15), answer).await {
            Ok(Ok(o)) => o,
            Ok(Err(_)) => Outcome::unknown("the request daemon stopped before answering"),
            Err(_) => Outcome::unknown(format!(
                "the request daemon did not answer within {}",
                secs(timeout)
            )),
        }
    }

    fn start(&self, argv: Vec<String>) -> Handle {
        let (tx, rx) = mpsc::channel(MAX_WAITING);
        let task = tokio::spawn(serve(
            argv,
            rx,
            self.daemons.clone(),
            self.stop.child_token(),
        ));
        Handle {
            tx,
            task,
            users: HashSet::new(),
        }
    }

    /// Stop the daemons that none of the request checks configured now (`checks`, by
    /// name) has used. A daemon a check used before its command changed stops when idle.
    pub fn retain(&self, checks: &HashSet<&str>) {
        // Dropping a daemon's sender ends its task: the requests it still waits on are
        // answered UNKNOWN ("stopped"; their checks are gone), and the process is stopped.
        lock(&self.daemons).retain(|_, h| h.users.iter().any(|u| checks.contains(u.as_str())));
    }

    /// Stop every daemon (SIGTERM, then SIGKILL after [`STOP_GRACE`]) and wait for them.
    pub async fn stop_all(&self) {
        self.stop.cancel();
        let tasks: Vec<_> = lock(&self.daemons).drain().map(|(_, h)| h.task).collect();
        for t in tasks {
            let _ = t.await;
        }
    }

    /// How many daemons are running or waiting for a request.
    pub fn len(&self) -> usize {
        lock(&self.daemons)
            .values()
            .filter(|h| !h.tx.is_closed())
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A daemon's task, idle, stops taking requests unless one is queued already: under the
/// lock `ask` sends with, so no request is queued to a task that is going away. Returns
/// whether it retired.
fn retire(daemons: &Daemons, argv: &[String], rx: &mut mpsc::Receiver<Ask>) -> bool {
    let mut daemons = lock(daemons);
    if !rx.is_empty() {
        return false;
    }
    rx.close();
    if daemons.get(argv).is_some_and(|h| h.tx.is_closed()) {
        daemons.remove(argv);
    }
    true
}

/// How one run of the process ended.
enum Ended {
    /// Exited or stopped answering: restart for the next request.
    Failed(String),
    /// Idle, stopped, or no one can send to it any more.
    Done,
}

/// The idle limit after a request of a check run every `interval`.
fn idle_after(interval: Duration) -> Duration {
    (interval * 3).clamp(MIN_IDLE, MAX_IDLE)
}

/// Keep the daemon `argv`: start it for the first request, restart it when it fails,
/// stop it when idle or stopped.
async fn serve(
    argv: Vec<String>,
    mut rx: mpsc::Receiver<Ask>,
    daemons: Daemons,
    stop: CancellationToken,
) {
    let mut restarts = Restarts::default();
    let mut idle = MIN_IDLE;
    let mut refuse: Option<(TokioInstant, Outcome)> = None;
    let mut idle_since = TokioInstant::now();
    loop {
        // Wait for a request before starting (again); answer at once while held off.
        let first = tokio::select! {
            ask = rx.recv() => match ask {
                Some(a) => a,
                None => return,
            },
            _ = tokio::time::sleep_until(idle_since + idle) => {
                if retire(&daemons, &argv, &mut rx) {
                    return;
                }
                continue;
            }
            _ = stop.cancelled() => return,
        };
        idle = idle_after(first.interval);
        idle_since = TokioInstant::now();
        if let Some((until, why)) = refuse.take() {
            if TokioInstant::now() < until {
                let _ = first.reply.send(why.clone());
                refuse = Some((until, why));
                continue;
            }
            // Held off long enough (a crash loop's hold): try afresh.
            if matches!(why.status, outpost_protocol::Status::Critical) {
                restarts = Restarts::default();
            }
        }
        let started = Instant::now();
        let how = match run(&argv, first, &mut rx, (&daemons, &stop), &mut idle).await {
            Ended::Done => return,
            Ended::Failed(how) => how,
        };
        idle_since = TokioInstant::now();
        let name = argv.first().map(String::as_str).unwrap_or("");
        match restarts.exited(Instant::now(), started.elapsed()) {
            Some(delay) => {
                tracing::warn!(daemon = name, reason = %how, retry_in_s = delay.as_secs(), "request daemon ended; restarting for the next request");
                refuse = Some((
                    TokioInstant::now() + delay,
                    Outcome::unknown(format!(
                        "request daemon {how}; restarting in {}s",
                        delay.as_secs()
                    )),
                ));
            }
            None => {
                let why = format!(
                    "request daemon crash loop: ended {} times within {}s (last: {how}); not started again for {}s",
                    supervise::CRASH_LIMIT,
                    supervise::CRASH_WINDOW.as_secs(),
                    CRASH_HOLD.as_secs()
                );
                tracing::error!(daemon = name, "{why}");
                refuse = Some((TokioInstant::now() + CRASH_HOLD, Outcome::critical(why)));
            }
        }
    }
}

/// A request written to the daemon, waiting for its answer.
struct Waiting {
    reply: oneshot::Sender<Outcome>,
    deadline: TokioInstant,
    sent: TokioInstant,
    timeout: Duration,
}

/// The requests of one run of the process: written, and waiting for answers.
struct Requests {
    wtx: mpsc::Sender<Vec<u8>>,
    next_id: u64,
    waiting: BTreeMap<u64, Waiting>,
    /// When the daemon is taken to hang unless it prints something first: set by a
    /// request written while it was silent, cleared by any line.
    hang_at: Option<TokioInstant>,
    /// Until its first line, a new daemon is not taken to hang before this.
    starting_until: Option<TokioInstant>,
}

impl Requests {
    fn send(&mut self, ask: Ask) {
        self.next_id += 1;
        let mut line = json!({
            "id": self.next_id,
            "check": ask.check,
            "timeout_ms": (ask.timeout.as_millis() * 9 / 10) as u64,
            "request": ask.request,
        });
        if let Some(e) = ask.entity {
            line["entity"] = Value::String(e);
        }
        let mut bytes = line.to_string().into_bytes();
        bytes.push(b'\n');
        if self.wtx.try_send(bytes).is_err() {
            let _ = ask.reply.send(Outcome::unknown(
                "the request daemon is not reading its requests; not sent",
            ));
            return;
        }
        let now = TokioInstant::now();
        let mut hang_at = now + ask.timeout + HUNG_AFTER;
        if let Some(t) = self.starting_until {
            hang_at = hang_at.max(t);
        }
        self.hang_at = Some(self.hang_at.map_or(hang_at, |h| h.min(hang_at)));
        self.waiting.insert(
            self.next_id,
            Waiting {
                reply: ask.reply,
                deadline: now + ask.timeout,
                sent: now,
                timeout: ask.timeout,
            },
        );
    }

    /// Answer every waiting request with `why`.
    fn fail_all(&mut self, why: &str) {
        for (_, w) in std::mem::take(&mut self.waiting) {
            let _ = w.reply.send(Outcome::unknown(why));
        }
    }
}

/// A line of the daemon's output, read whole by its reader task.
enum Read {
    Text(String),
    TooLong,
    Closed(Option<String>),
}

/// Run the process once, starting with `first`. Returns how it ended.
async fn run(
    argv: &[String],
    first: Ask,
    rx: &mut mpsc::Receiver<Ask>,
    (daemons, stop): (&Daemons, &CancellationToken),
    idle: &mut Duration,
) -> Ended {
    let started = spawn::command(argv).and_then(|mut cmd| {
        cmd.stdin(std::process::Stdio::piped());
        cmd.spawn()
            .map_err(|e| format!("cannot run {}: {e}", argv[0]))
    });
    let mut child = match started {
        Ok(c) => c,
        Err(e) => {
            let _ = first.reply.send(Outcome::unknown(e.clone()));
            return Ended::Failed(e);
        }
    };
    let pgid = spawn::adopt(&child);
    let guard = GroupGuard(pgid);
    let name = argv[0].clone();
    tracing::info!(daemon = %name, pid = pgid, "request daemon started");
    let err_log = OutputLog::new(STDERR_LINES_PER_MINUTE, 1);
    let stderr = {
        let name = name.clone();
        tokio::spawn(supervise::log_lines(
            child.stderr.take(),
            err_log.clone(),
            move |l| match l {
                Logged::Line(line) => {
                    tracing::warn!(daemon = %name, stderr = %line, "request daemon")
                }
                Logged::Dropped(dropped) => {
                    tracing::warn!(daemon = %name, dropped, "request daemon stderr lines not logged (rate limit)")
                }
            },
        ))
    };
    let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        let _ = first
            .reply
            .send(Outcome::unknown("the request daemon has no pipes"));
        return Ended::Failed("has no pipes".into());
    };
    // Writing and reading are tasks of their own: a daemon that stops reading must not
    // stop the agent from reading its answers, and a line half read is never dropped
    // because something else happened meanwhile.
    let (wtx, mut wrx) = mpsc::channel::<Vec<u8>>(MAX_WAITING);
    let mut writer = Some(tokio::spawn(async move {
        while let Some(line) = wrx.recv().await {
            stdin.write_all(&line).await?;
            stdin.flush().await?;
        }
        Ok::<_, std::io::Error>(())
    }));
    let (ltx, mut lines) = mpsc::channel::<Read>(64);
    let reader = tokio::spawn(async move {
        let mut out = BufReader::new(stdout);
        let mut buf = Vec::new();
        loop {
            let read = match read_line(&mut out, &mut buf).await {
                Ok(Line::Text) => Read::Text(String::from_utf8_lossy(&buf).into_owned()),
                Ok(Line::TooLong) => Read::TooLong,
                Ok(Line::Eof) => Read::Closed(None),
                Err(e) => Read::Closed(Some(format!("output could not be read: {e}"))),
            };
            let closed = matches!(read, Read::Closed(_));
            if ltx.send(read).await.is_err() || closed {
                return;
            }
        }
    });
    let stray_log = OutputLog::new(STRAY_LINES_PER_MINUTE, 0);
    let mut reqs = Requests {
        wtx,
        next_id: 0,
        waiting: BTreeMap::new(),
        hang_at: None,
        starting_until: Some(TokioInstant::now() + STARTUP_GRACE),
    };
    let mut last_ask = TokioInstant::now();
    // The last line that answered nothing, and when it came.
    let mut stray: Option<(TokioInstant, String)> = None;
    *idle = idle_after(first.interval);
    reqs.send(first);
    let ended = loop {
        let next_deadline = reqs.waiting.values().map(|w| w.deadline).min();
        let idle_at = reqs.waiting.is_empty().then(|| last_ask + *idle);
        tokio::select! {
            // Output first: what the daemon already said counts before any deadline.
            biased;
            read = lines.recv() => match read {
                Some(Read::Text(text)) => {
                    reqs.hang_at = None;
                    reqs.starting_until = None;
                    if text.trim().is_empty() {
                        continue;
                    }
                    let doc = serde_json::from_str::<Value>(text.trim()).ok();
                    let id = doc.as_ref().and_then(|d| d.get("id")).and_then(answer_id);
                    match (id.and_then(|id| reqs.waiting.remove(&id)), doc) {
                        (Some(w), Some(doc)) => {
                            let _ = w.reply.send(plugin_json::document(&doc, &text));
                        }
                        _ => {
                            let mut head = text.trim().to_string();
                            crate::util::truncate_utf8(&mut head, 200);
                            let why = match id {
                                Some(id) if id <= reqs.next_id => format!("an answer to request {id}, which is no longer waiting (timed out)"),
                                Some(id) => format!("an answer to request {id}, which was never sent"),
                                None => "a line that is not a JSON answer with an id".to_string(),
                            };
                            if stray_log.admit(&head, Instant::now()).1 {
                                tracing::warn!(daemon = %name, line = %head, "request daemon printed {why}");
                            }
                            stray = Some((TokioInstant::now(), format!("{why}: {head}")));
                        }
                    }
                }
                Some(Read::TooLong) => {
                    reqs.hang_at = None;
                    reqs.starting_until = None;
                    stray = Some((TokioInstant::now(), format!("a line longer than {MAX_LINE} bytes")));
                }
                Some(Read::Closed(why)) => break Ended::Failed(why.unwrap_or_default()),
                None => break Ended::Failed(String::new()),
            },
            ask = rx.recv() => match ask {
                Some(a) => {
                    last_ask = TokioInstant::now();
                    *idle = idle_after(a.interval);
                    reqs.send(a);
                }
                None => break Ended::Done,
            },
            _ = sleep_until(next_deadline) => {
                let now = TokioInstant::now();
                let due: Vec<u64> = reqs.waiting.iter().filter(|(_, w)| w.deadline <= now).map(|(id, _)| *id).collect();
                for id in due {
                    let w = reqs.waiting.remove(&id).expect("due request is waiting");
                    let mut o = Outcome::unknown(format!("the request daemon did not answer within {}", secs(w.timeout)));
                    if let Some((_, s)) = stray.as_ref().filter(|(at, _)| *at >= w.sent) {
                        o.note(format!("it printed {s}"));
                    }
                    let _ = w.reply.send(o);
                }
            }
            _ = sleep_until(reqs.hang_at) => {
                break Ended::Failed(format!(
                    "stopped answering (nothing printed for {} after a request was due); killed",
                    secs(HUNG_AFTER)
                ));
            }
            _ = sleep_until(idle_at) => {
                if retire(daemons, argv, rx) {
                    break Ended::Done;
                }
            }
            _ = stop.cancelled() => break Ended::Done,
            w = async { match writer.as_mut() {
                Some(w) => w.await,
                None => std::future::pending().await,
            } } => {
                writer = None;
                // Its stdin is gone: it exited (its output closing tells how) or closed
                // it; either way no request can reach it any more.
                if let Ok(Err(e)) = w {
                    tracing::debug!(daemon = %name, "request daemon's stdin closed: {e}");
                }
                break Ended::Failed(String::new());
            }
        }
    };
    if let Some(w) = writer.take() {
        w.abort();
    }
    let status = match &ended {
        // Its stdin or stdout closed: it is exiting, or is killed if it does not.
        Ended::Failed(how) if how.is_empty() => {
            match tokio::time::timeout(STOP_GRACE, child.wait()).await {
                Ok(Ok(s)) => supervise::describe_exit(s),
                Ok(Err(e)) => format!("could not be waited for: {e}"),
                Err(_) => {
                    supervise::terminate(&mut child, pgid, KILL_GRACE).await;
                    "closed its stdin or stdout but kept running; killed".into()
                }
            }
        }
        Ended::Failed(_) => {
            supervise::terminate(&mut child, pgid, KILL_GRACE).await;
            String::new()
        }
        Ended::Done => {
            if !supervise::terminate(&mut child, pgid, STOP_GRACE).await {
                tracing::warn!(daemon = %name, "request daemon ignored SIGTERM; killed it");
            }
            String::new()
        }
    };
    drop(guard);
    reader.abort();
    let _ = tokio::time::timeout(Duration::from_millis(500), stderr).await;
    let how = match ended {
        Ended::Done => {
            reqs.fail_all("the request daemon was stopped");
            tracing::info!(daemon = %name, "request daemon stopped");
            return Ended::Done;
        }
        Ended::Failed(how) if how.is_empty() => status,
        Ended::Failed(how) => how,
    };
    let mut how = how;
    if let Some(err) = err_log.tail().pop() {
        how.push_str(&format!(" (stderr: {err})"));
    }
    reqs.fail_all(&format!("the request daemon {how} before answering"));
    Ended::Failed(how)
}

/// A request's id as the daemon echoes it: the number, or the number as a string.
fn answer_id(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// `d` for people: "5s", "0.8s".
fn secs(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

async fn sleep_until(t: Option<TokioInstant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_protocol::probe::{Probe, RequestProbe};
    use outpost_protocol::Status;

    /// A request daemon for the tests: answers `ok` at once (with its pid, the request's
    /// check, entity and timeout), `slow` from a thread after `secs`, `bad` with a
    /// document that is not a result, `stray` with a line that answers nothing (and no
    /// answer), `hang` by blocking everything, `exit` by exiting with code 3.
    const DAEMON: &str = r#"
import json, os, sys, threading, time
def say(doc):
    sys.stdout.write(json.dumps(doc) + "\n"); sys.stdout.flush()
for line in sys.stdin:
    req = json.loads(line)
    r = req["request"]; mode = r.get("mode", "ok"); rid = req["id"]
    text = "pid %d %s %s %d" % (os.getpid(), req["check"], req.get("entity"), req["timeout_ms"])
    if mode == "ok":
        say({"id": rid, "status": "ok", "text": text, "metrics": {"n": 1}})
    elif mode == "slow":
        def later(rid=rid, secs=r["secs"]):
            time.sleep(secs); say({"id": str(rid), "status": "warning", "text": "late"})
        threading.Thread(target=later, daemon=True).start()
    elif mode == "bad":
        say({"id": rid, "text": "no status"})
    elif mode == "stray":
        sys.stdout.write("debug: thinking\n"); sys.stdout.flush()
    elif mode == "hang":
        time.sleep(3600)
    elif mode == "exit":
        sys.stderr.write("giving up\n"); sys.stderr.flush(); sys.exit(3)
"#;

    struct Fixture {
        _dir: tempfile::TempDir,
        argv: Vec<String>,
        pool: RequestDaemons,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("daemon.py");
        std::fs::write(&path, DAEMON).unwrap();
        Fixture {
            argv: vec!["python3".into(), "-u".into(), path.display().to_string()],
            _dir: dir,
            pool: RequestDaemons::default(),
        }
    }

    fn spec(name: &str, request: Value) -> CheckSpec {
        let mut s = CheckSpec::new(
            name,
            Probe::Request(RequestProbe {
                command: vec!["unused".into()],
                request: request.as_object().cloned().unwrap_or_default(),
            }),
            10,
            1,
        );
        s.entity = Some("router".into());
        s
    }

    impl Fixture {
        async fn ask(&self, name: &str, request: Value, timeout_ms: u64) -> Outcome {
            self.pool
                .ask(
                    self.argv.clone(),
                    &spec(name, request),
                    Duration::from_millis(timeout_ms),
                )
                .await
        }
    }

    fn pid(o: &Outcome) -> u32 {
        assert_eq!(o.status, Status::Ok, "{o:?}");
        o.output.split(' ').nth(1).unwrap().parse().unwrap()
    }

    #[tokio::test]
    async fn one_process_answers_every_check_and_requests_carry_check_entity_and_timeout() {
        let f = fixture();
        let a = f.ask("ifaces", json!({}), 2_000).await;
        assert_eq!(
            a.output
                .split_once(' ')
                .unwrap()
                .1
                .split_once(' ')
                .unwrap()
                .1,
            "ifaces router 1800", // nine tenths of the timeout
            "{a:?}"
        );
        assert_eq!(a.metrics[0].name, "n");
        let b = f.ask("cpu", json!({}), 2_000).await;
        assert_eq!(pid(&a), pid(&b), "one process for both checks");
        assert_eq!(f.pool.len(), 1);
        f.pool.stop_all().await;
        assert!(!supervise::group_exists(pid(&a)), "stopped with the agent");
    }

    #[tokio::test]
    async fn a_late_answer_is_unknown_and_dropped_while_the_others_are_answered() {
        let f = fixture();
        let first = pid(&f.ask("a", json!({}), 2_000).await);
        let (slow, quick) = tokio::join!(
            f.ask("slow", json!({"mode": "slow", "secs": 2.5}), 1_000),
            async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                f.ask("quick", json!({}), 2_000).await
            }
        );
        assert_eq!(slow.status, Status::Unknown, "{slow:?}");
        assert_eq!(slow.output, "the request daemon did not answer within 1s");
        assert_eq!(pid(&quick), first, "the slow request did not restart it");
        // The late answer arrives and is dropped; the daemon carries on.
        tokio::time::sleep(Duration::from_millis(2_000)).await;
        assert_eq!(pid(&f.ask("a", json!({}), 2_000).await), first);
        f.pool.stop_all().await;
    }

    #[tokio::test]
    async fn garbled_answers_are_unknown_and_stray_lines_are_quoted() {
        let f = fixture();
        let first = pid(&f.ask("a", json!({}), 2_000).await);
        let bad = f.ask("bad", json!({"mode": "bad"}), 2_000).await;
        assert_eq!(bad.status, Status::Unknown);
        assert!(bad.output.contains("not a check result"), "{bad:?}");
        let stray = f.ask("stray", json!({"mode": "stray"}), 1_500).await;
        assert_eq!(stray.status, Status::Unknown);
        assert!(
            stray
                .long_output
                .contains("a line that is not a JSON answer with an id: debug: thinking"),
            "{stray:?}"
        );
        assert_eq!(
            stray.output,
            "the request daemon did not answer within 1.5s"
        );
        assert_eq!(
            pid(&f.ask("a", json!({}), 2_000).await),
            first,
            "not restarted"
        );
        f.pool.stop_all().await;
    }

    #[tokio::test]
    async fn a_daemon_that_stops_answering_is_killed_and_started_again() {
        let f = fixture();
        let first = pid(&f.ask("a", json!({}), 2_000).await);
        let (hung, other) = tokio::join!(f.ask("hang", json!({"mode": "hang"}), 800), async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            f.ask("b", json!({}), 5_000).await
        });
        assert_eq!(hung.status, Status::Unknown);
        assert_eq!(hung.output, "the request daemon did not answer within 0.8s");
        // Silent for HUNG_AFTER past that: killed, and the request behind it in the same
        // process is failed with it, not left waiting.
        assert_eq!(other.status, Status::Unknown, "{other:?}");
        assert_eq!(
            other.output,
            "the request daemon stopped answering (nothing printed for 2s after a request was due); killed before answering"
        );
        assert!(
            !supervise::group_exists(first),
            "the hung daemon's group is gone"
        );
        // Restarted with a backoff of a second: refused meanwhile, then a new process.
        let during = f.ask("a", json!({}), 2_000).await;
        assert!(during.output.contains("restarting in 1s"), "{during:?}");
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        let second = pid(&f.ask("a", json!({}), 2_000).await);
        assert_ne!(first, second);
        f.pool.stop_all().await;
    }

    #[tokio::test]
    async fn an_exit_fails_its_requests_with_the_reason_and_unused_daemons_stop() {
        let f = fixture();
        let first = pid(&f.ask("a", json!({}), 2_000).await);
        let gone = f.ask("exit", json!({"mode": "exit"}), 2_000).await;
        assert_eq!(gone.status, Status::Unknown);
        assert!(
            gone.output.contains("exited with code 3") && gone.output.contains("giving up"),
            "{gone:?}"
        );
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        let second = pid(&f.ask("a", json!({}), 2_000).await);
        assert_ne!(first, second);
        // Nothing configured uses it any more: it stops.
        f.pool.retain(&HashSet::from(["other"]));
        let deadline = Instant::now() + Duration::from_secs(10);
        while supervise::group_exists(second) {
            assert!(Instant::now() < deadline, "an unused daemon kept running");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(f.pool.len(), 0);
        // A request now starts it again.
        assert_ne!(pid(&f.ask("a", json!({}), 2_000).await), second);
        f.pool.stop_all().await;
    }
}
