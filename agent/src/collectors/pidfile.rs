//! Pid files of running collectors, so that an agent restarted after a kill -9 does not
//! start a second copy: `DIR/pid` holds `PID START`, where START is the process's start
//! time (field 22 of `/proc/PID/stat`, in clock ticks since boot). A pid that the kernel
//! has since given to another process has another start time, so it is never signalled.

use std::path::Path;
use std::time::Duration;

use crate::checks::exec;
use crate::supervise::proc_stat;

/// The pid file's name in a collector's directory.
pub const FILE: &str = "pid";

/// The start time of `pid`, if it is running (a zombie is not).
pub fn start_time(pid: u32) -> Option<u64> {
    proc_stat(pid).filter(|s| !s.dead()).map(|s| s.start)
}

/// Record `pid` (just spawned) in `path`.
pub fn write(path: &Path, pid: u32) -> std::io::Result<()> {
    let start = start_time(pid).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("process {pid} is already gone"),
        )
    })?;
    crate::util::write_atomic(path, format!("{pid} {start}\n").as_bytes(), 0o600)
}

/// The pid and start time recorded in `path`.
pub fn read(path: &Path) -> Option<(u32, u64)> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut parts = text.split_ascii_whitespace();
    let pid: u32 = parts.next()?.parse().ok()?;
    let start = parts.next()?.parse().ok()?;
    (pid > 1 && pid <= i32::MAX as u32).then_some((pid, start))
}

/// Whether the process recorded as (`pid`, `start`) still runs.
fn alive(pid: u32, start: u64) -> bool {
    start_time(pid) == Some(start)
}

/// Wait up to `within` for the process to be gone; returns whether it is.
async fn gone_within(pid: u32, start: u64, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while alive(pid, start) {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

fn signal(pid: u32, sig: i32) {
    // Its whole group when it leads one (collectors are started as group leaders), else
    // only the process.
    match proc_stat(pid) {
        Some(s) if s.pgrp == pid => exec::signal_group(pid, sig),
        Some(_) => {
            // SAFETY: kill(2) on a positive pid whose start time was just checked.
            unsafe {
                libc::kill(pid as i32, sig);
            }
        }
        None => {}
    }
}

/// If `path` records a process that still runs (a collector of an agent that was killed
/// before it could stop it), stop it: SIGTERM to its group, SIGKILL after `grace`. The
/// file is removed. Returns the pid that was stopped.
pub async fn stop_stale(path: &Path, grace: Duration) -> Option<u32> {
    let recorded = read(path);
    let _ = std::fs::remove_file(path);
    let (pid, start) = recorded?;
    if !alive(pid, start) {
        return None;
    }
    tracing::warn!(pid, file = %path.display(), "a collector left running by an earlier agent is being stopped");
    signal(pid, libc::SIGTERM);
    if !gone_within(pid, start, grace).await {
        signal(pid, libc::SIGKILL);
        if !gone_within(pid, start, Duration::from_secs(2)).await {
            tracing::error!(pid, "a collector left by an earlier agent survived SIGKILL");
        }
    }
    Some(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(FILE);
        let me = std::process::id();
        write(&p, me).unwrap();
        let (pid, start) = read(&p).unwrap();
        assert_eq!(pid, me);
        assert!(alive(pid, start));
        assert!(
            !alive(pid, start + 1),
            "another start time is another process"
        );
        for bad in ["", "x 1", "12", "1 5", "-3 4", "99999999999 1"] {
            std::fs::write(&p, bad).unwrap();
            assert_eq!(read(&p), None, "{bad:?}");
        }
    }
}
