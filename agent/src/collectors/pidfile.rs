//! Pid files of running collectors, so that an agent restarted after a kill -9 does not
//! start a second copy: `DIR/pid` holds `PID START`, where START is the process's start
//! time (field 22 of `/proc/PID/stat`, in clock ticks since boot). A pid that the kernel
//! has since given to another process has another start time, so it is never signalled.

use std::path::Path;
use std::time::Duration;

use crate::spawn;
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

#[cfg(windows)]
fn signal(pid: u32, sig: i32) {
    // No /proc, so no start time: nothing is ever found alive to be signalled (and
    // collectors do not run on Windows, see `process::supervise`).
    let _ = (pid, sig);
}

#[cfg(unix)]
fn signal(pid: u32, sig: i32) {
    // Its whole group when it leads one (collectors are started as group leaders), else
    // only the process.
    match proc_stat(pid) {
        Some(s) if s.pgrp == pid => spawn::signal_group(pid, sig),
        Some(_) => {
            // SAFETY: kill(2) on a positive pid whose start time was just checked.
            unsafe {
                libc::kill(pid as i32, sig);
            }
        }
        None => {}
    }
}

/// Running processes of `program` whose working directory is `dir`: collectors are
/// started there, so these are collectors an earlier agent started, including one it was
/// killed before it could record in its pid file.
fn strays(dir: &Path, program: &str) -> Vec<(u32, u64)> {
    let Ok(dir) = dir.canonicalize() else {
        return Vec::new();
    };
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.filter_map(Result::ok) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me || std::fs::read_link(entry.path().join("cwd")).ok().as_deref() != Some(&dir) {
            continue;
        }
        let argv0 = std::fs::read(entry.path().join("cmdline"))
            .ok()
            .and_then(|c| c.split(|b| *b == 0).next().map(|a| a.to_vec()));
        if argv0.as_deref() != Some(program.as_bytes()) {
            continue;
        }
        if let Some(start) = start_time(pid) {
            found.push((pid, start));
        }
    }
    found
}

/// Stop what an earlier agent (killed before it could stop its collectors) left running
/// for the collector in `dir`: the process recorded in its pid file `path`, and, when the
/// collector's `program` is known, any process of it working in `dir`. SIGTERM to each one's group, SIGKILL after `grace`. The
/// pid file is removed. Returns the pids that were stopped.
pub async fn stop_stale(
    path: &Path,
    dir: &Path,
    program: Option<&str>,
    grace: Duration,
) -> Vec<u32> {
    let mut victims: Vec<(u32, u64)> = read(path)
        .into_iter()
        .filter(|(pid, start)| alive(*pid, *start))
        .collect();
    let _ = std::fs::remove_file(path);
    for stray in program.map(|p| strays(dir, p)).unwrap_or_default() {
        if !victims.contains(&stray) {
            victims.push(stray);
        }
    }
    for &(pid, _) in &victims {
        tracing::warn!(pid, dir = %dir.display(), "a collector left running by an earlier agent is being stopped");
        signal(pid, spawn::SIGTERM);
    }
    for &(pid, start) in &victims {
        if !gone_within(pid, start, grace).await {
            signal(pid, spawn::SIGKILL);
            if !gone_within(pid, start, Duration::from_secs(2)).await {
                tracing::error!(pid, "a collector left by an earlier agent survived SIGKILL");
            }
        }
    }
    victims.into_iter().map(|(pid, _)| pid).collect()
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

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

    #[tokio::test]
    async fn a_collector_missing_from_its_pid_file_is_found_by_program_and_directory() {
        // An agent killed between spawning a collector and writing its pid file.
        let dir = tempfile::tempdir().unwrap();
        let spawn = |program: &str| {
            std::process::Command::new(program)
                .arg("30")
                .current_dir(dir.path())
                .spawn()
                .unwrap()
        };
        let mut stray = spawn("/bin/sleep");
        let mut other = spawn("/usr/bin/sleep");
        // Until it has exec'd, a child still shows the test's command line.
        let exec_done = |pid: u32| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .unwrap_or_default()
                .ends_with(b"sleep\x0030\x00")
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !(exec_done(stray.id()) && exec_done(other.id())) {
            assert!(
                std::time::Instant::now() < deadline,
                "the children never ran sleep"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let stopped = stop_stale(
            &dir.path().join(FILE),
            dir.path(),
            Some("/bin/sleep"),
            Duration::from_secs(2),
        )
        .await;
        assert_eq!(stopped, [stray.id()]);
        assert!(stray.wait().unwrap().signal().is_some());
        assert!(
            other.try_wait().unwrap().is_none(),
            "another program in the directory is left alone"
        );
        other.kill().unwrap();
        other.wait().unwrap();
    }
}
