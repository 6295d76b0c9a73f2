//! Keeping a long-running child program alive: how long to wait before restarting it, when
//! its exits have become a crash loop, reading its output a bounded line at a time, logging
//! that output with a rate limit, and stopping it (TERM, then KILL).
//!
//! Shared by daemon checks ([`crate::checks::daemon`]) and collectors
//! ([`crate::collectors`]). Spawning in a process group and signalling the group live in
//! [`crate::spawn`]; this module does not start anything itself.

use outpost_sys::lock;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Child;

use crate::spawn;

/// Exits within [`CRASH_WINDOW`] that make a crash loop.
pub const CRASH_LIMIT: usize = 5;
pub const CRASH_WINDOW: Duration = Duration::from_secs(120);
/// Longest line read from a child's output.
pub const MAX_LINE: usize = 64 * 1024;
/// How long a stopping child gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(3);
pub const BACKOFF_START: Duration = Duration::from_secs(1);
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A child that stayed up this long is healthy again: its backoff starts over.
pub const STABLE_AFTER: Duration = Duration::from_secs(60);

/// Restart delays and crash-loop detection, kept apart from processes so it can be tested
/// on its own.
#[derive(Debug)]
pub struct Restarts {
    exits: VecDeque<Instant>,
    backoff: Duration,
}

impl Default for Restarts {
    fn default() -> Self {
        Restarts {
            exits: VecDeque::new(),
            backoff: BACKOFF_START,
        }
    }
}

impl Restarts {
    /// Record an exit at `at` after running for `ran`. Returns the delay before the next
    /// start, or `None` for a crash loop.
    pub fn exited(&mut self, at: Instant, ran: Duration) -> Option<Duration> {
        if ran >= STABLE_AFTER {
            self.backoff = BACKOFF_START;
        }
        self.exits.push_back(at);
        while self
            .exits
            .front()
            .is_some_and(|t| at.duration_since(*t) > CRASH_WINDOW)
        {
            self.exits.pop_front();
        }
        if self.exits.len() >= CRASH_LIMIT {
            return None;
        }
        let delay = self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        Some(delay)
    }

    /// Exits counted in the window at the last [`Restarts::exited`].
    pub fn exits_in_window(&self) -> usize {
        self.exits.len()
    }
}

/// How a child ended, in words: "exited with code 3", "was killed by signal 9".
pub fn describe_exit(s: std::process::ExitStatus) -> String {
    match (s.code(), spawn::signal_of(s)) {
        (Some(c), _) => format!("exited with code {c}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        (None, None) => "ended".into(),
    }
}

/// Stop `child` and everything in its process group `pgid`: SIGTERM to the group, up to
/// `grace` for the child to exit, then SIGKILL to the group (whatever is left of it), the
/// child reaped, and up to [`GROUP_GONE_WAIT`] for the rest of the group to be gone.
/// Returns whether the child exited on SIGTERM.
pub async fn terminate(child: &mut Child, pgid: u32, grace: Duration) -> bool {
    spawn::signal_group(pgid, spawn::SIGTERM);
    let obeyed = matches!(tokio::time::timeout(grace, child.wait()).await, Ok(Ok(_)));
    spawn::kill_group(pgid);
    if !obeyed {
        let _ = child.wait().await;
    }
    let deadline = tokio::time::Instant::now() + GROUP_GONE_WAIT;
    while group_exists(pgid) {
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                pgid,
                "processes of a killed group are still alive after {GROUP_GONE_WAIT:?}"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    obeyed
}

/// How long [`terminate`] waits for the killed members of a group to be gone.
pub const GROUP_GONE_WAIT: Duration = Duration::from_secs(1);

/// What `/proc/PID/stat` says of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// `R`, `S`, `Z` (a zombie: dead, waiting to be reaped), …
    pub state: char,
    pub pgrp: u32,
    /// Clock ticks after boot: with the pid, it names one process for good.
    pub start: u64,
}

impl ProcStat {
    pub fn dead(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// Read `/proc/PID/stat`; `None` when there is no such process.
pub fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold anything, ')' included.
    let after = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_ascii_whitespace().collect();
    Some(ProcStat {
        state: fields.first()?.chars().next()?,
        pgrp: fields.get(2)?.parse().ok()?,
        start: fields.get(19)?.parse().ok()?,
    })
}

/// Whether a process is left in the job of `pgid` (see [`crate::spawn`]).
#[cfg(windows)]
pub fn group_exists(pgid: u32) -> bool {
    spawn::group_alive(pgid)
}

/// Whether a live process (not a zombie) is left in the group `pgid`. Zombies are left
/// out: an orphan's new parent may be an init that never reaps them (some containers).
#[cfg(unix)]
pub fn group_exists(pgid: u32) -> bool {
    if pgid == 0 || pgid > i32::MAX as u32 {
        return false;
    }
    // SAFETY: kill(2) with signal 0 only checks; a negative pid names a process group.
    let rc = unsafe { libc::kill(-(pgid as i32), 0) };
    if rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
        return false;
    }
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return rc == 0;
    };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(proc_stat)
        .any(|s| s.pgrp == pgid && !s.dead())
}

pub enum Line {
    Text,
    TooLong,
    Eof,
}

/// Read one line into `buf` (without its newline), never holding more than [`MAX_LINE`]
/// bytes: the rest of an overlong line is skipped.
pub async fn read_line(
    r: &mut (impl tokio::io::AsyncBufRead + Unpin),
    buf: &mut Vec<u8>,
) -> std::io::Result<Line> {
    buf.clear();
    let mut too_long = false;
    loop {
        let chunk = r.fill_buf().await?;
        if chunk.is_empty() {
            return Ok(if too_long {
                Line::TooLong
            } else if buf.is_empty() {
                Line::Eof
            } else {
                Line::Text
            });
        }
        let (part, done) = match chunk.iter().position(|b| *b == b'\n') {
            Some(i) => (&chunk[..i], i + 1),
            None => (chunk, chunk.len()),
        };
        let found_newline = done > part.len();
        if !too_long {
            if buf.len() + part.len() > MAX_LINE {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(part);
            }
        }
        r.consume(done);
        if found_newline {
            return Ok(if too_long { Line::TooLong } else { Line::Text });
        }
    }
}

/// Longest line of a child's output kept for the log and the tail.
pub const MAX_LOGGED_LINE: usize = 512;

/// A child's output on its way to the agent's log: at most `per_minute` lines a minute are
/// logged (the rest counted), and the last `keep` lines are remembered so that a report of
/// its exit can quote them.
pub struct OutputLog {
    per_minute: u32,
    keep: usize,
    state: Mutex<LogState>,
}

struct LogState {
    window: Instant,
    logged: u32,
    dropped: u64,
    tail: VecDeque<String>,
}

/// What [`log_lines`] hands its logger.
pub enum Logged<'a> {
    /// A line to log.
    Line(&'a str),
    /// This many lines of the last window were not logged (rate limit).
    Dropped(u64),
}

impl OutputLog {
    pub fn new(per_minute: u32, keep: usize) -> Arc<OutputLog> {
        Arc::new(OutputLog {
            per_minute,
            keep,
            state: Mutex::new(LogState {
                window: Instant::now(),
                logged: 0,
                dropped: 0,
                tail: VecDeque::new(),
            }),
        })
    }

    /// Remember `line` (seen at `now`). Returns the lines dropped in a window that just
    /// ended, if any, and whether this line is to be logged.
    pub fn admit(&self, line: &str, now: Instant) -> (Option<u64>, bool) {
        let mut s = lock(&self.state);
        let mut report = None;
        if now.duration_since(s.window) >= Duration::from_secs(60) {
            report = (s.dropped > 0).then_some(s.dropped);
            (s.window, s.logged, s.dropped) = (now, 0, 0);
        }
        let log = s.logged < self.per_minute;
        if log {
            s.logged += 1;
        } else {
            s.dropped += 1;
        }
        if self.keep > 0 {
            if s.tail.len() == self.keep {
                s.tail.pop_front();
            }
            s.tail.push_back(line.to_string());
        }
        (report, log)
    }

    /// The last lines seen, oldest first.
    pub fn tail(&self) -> Vec<String> {
        let s = lock(&self.state);
        s.tail.iter().cloned().collect()
    }
}

/// Read `r` to its end a line at a time, handing each line (trimmed, cut to
/// [`MAX_LOGGED_LINE`]) to `emit` as far as `log`'s rate limit allows.
pub async fn log_lines(
    r: Option<impl AsyncRead + Unpin>,
    log: Arc<OutputLog>,
    emit: impl Fn(Logged<'_>),
) {
    let Some(r) = r else { return };
    let mut r = BufReader::new(r);
    let mut buf = Vec::new();
    while let Ok(Line::Text | Line::TooLong) = read_line(&mut r, &mut buf).await {
        let mut line = String::from_utf8_lossy(&buf).trim().to_string();
        if line.is_empty() {
            continue;
        }
        crate::util::truncate_utf8(&mut line, MAX_LOGGED_LINE);
        let (dropped, log_it) = log.admit(&line, Instant::now());
        if let Some(n) = dropped {
            emit(Logged::Dropped(n));
        }
        if log_it {
            emit(Logged::Line(&line));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_resets_when_stable_and_detects_a_crash_loop() {
        let mut r = Restarts::default();
        let t0 = Instant::now();
        let quick = Duration::from_millis(10);
        assert_eq!(r.exited(t0, quick), Some(Duration::from_secs(1)));
        assert_eq!(
            r.exited(t0 + Duration::from_secs(2), quick),
            Some(Duration::from_secs(2))
        );
        assert_eq!(r.exits_in_window(), 2);
        // Stayed up long enough: the backoff starts over; old exits fall out of the window.
        let later = t0 + CRASH_WINDOW + Duration::from_secs(70);
        assert_eq!(r.exited(later, STABLE_AFTER), Some(Duration::from_secs(1)));
        assert_eq!(r.exits_in_window(), 1);
        let mut r = Restarts::default();
        let delays: Vec<_> = (0..CRASH_LIMIT as u64)
            .map(|i| r.exited(t0 + Duration::from_secs(i), quick))
            .collect();
        assert_eq!(
            delays[..CRASH_LIMIT - 1]
                .iter()
                .filter(|d| d.is_some())
                .count(),
            CRASH_LIMIT - 1
        );
        assert_eq!(
            delays[CRASH_LIMIT - 1],
            None,
            "{CRASH_LIMIT} exits in the window is a crash loop"
        );
        let mut r = Restarts::default();
        for i in 0..10u64 {
            assert!(
                r.exited(t0 + Duration::from_secs(i * 60), quick).is_some(),
                "spread-out exits are not a loop"
            );
        }
        assert_eq!(r.backoff, BACKOFF_MAX);
    }

    #[test]
    fn crash_window_edges() {
        // Exactly CRASH_WINDOW apart still counts; a moment more does not.
        let t0 = Instant::now();
        let quick = Duration::from_millis(1);
        let mut r = Restarts::default();
        for i in 0..CRASH_LIMIT as u32 - 1 {
            assert!(r.exited(t0 + CRASH_WINDOW * i / 8, quick).is_some());
        }
        assert_eq!(r.exited(t0 + CRASH_WINDOW, quick), None);
        let mut r = Restarts::default();
        for i in 0..CRASH_LIMIT as u32 - 1 {
            assert!(r.exited(t0 + CRASH_WINDOW * i / 8, quick).is_some());
        }
        assert!(r
            .exited(t0 + CRASH_WINDOW + Duration::from_millis(1), quick)
            .is_some());
        assert_eq!(r.exits_in_window(), CRASH_LIMIT - 1);
    }

    #[tokio::test]
    async fn long_lines_are_bounded() {
        let mut input: &[u8] = &[
            b"{\"a\":1}\n".as_slice(),
            &vec![b'x'; MAX_LINE + 10],
            b"\nlast",
        ]
        .concat();
        let mut r = BufReader::new(&mut input);
        let mut buf = Vec::new();
        assert!(matches!(
            read_line(&mut r, &mut buf).await.unwrap(),
            Line::Text
        ));
        assert_eq!(buf, b"{\"a\":1}");
        assert!(matches!(
            read_line(&mut r, &mut buf).await.unwrap(),
            Line::TooLong
        ));
        assert!(matches!(
            read_line(&mut r, &mut buf).await.unwrap(),
            Line::Text
        ));
        assert_eq!(buf, b"last");
        assert!(matches!(
            read_line(&mut r, &mut buf).await.unwrap(),
            Line::Eof
        ));
    }

    #[test]
    fn output_is_rate_limited_and_its_tail_kept() {
        let log = OutputLog::new(3, 2);
        let t0 = Instant::now();
        let admitted: Vec<_> = (0..5)
            .map(|i| log.admit(&format!("l{i}"), t0 + Duration::from_secs(i)))
            .collect();
        assert_eq!(
            admitted,
            [
                (None, true),
                (None, true),
                (None, true),
                (None, false),
                (None, false)
            ]
        );
        assert_eq!(log.tail(), ["l3", "l4"]);
        // A new minute: the drops are reported once and logging resumes.
        let t1 = t0 + Duration::from_secs(61);
        assert_eq!(log.admit("l5", t1), (Some(2), true));
        assert_eq!(log.admit("l6", t1), (None, true));
        assert_eq!(log.tail(), ["l5", "l6"]);
    }
}
