//! The raw rate of running a program, without the agent: `concurrency` runs at a time, as
//! fast as they go, with the spawn settings the agent uses for an exec check (its own
//! process group, stdin closed, stdout and stderr piped and read to the end, a cleared
//! environment but for `PATH` and `LC_ALL=C`, the group killed after the exit).

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};

const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Runs per second, how many did not exit 0, and what they cost.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    pub per_sec: f64,
    pub runs: u64,
    pub failed: u64,
    /// CPU seconds of this process (the spawning side) during the run.
    pub own_cpu_secs: f64,
    /// CPU seconds of the programs run (children waited for).
    pub children_cpu_secs: f64,
    /// Mean time from spawn to having the exit status and all output, in ms.
    pub mean_run_ms: f64,
    /// CPU the machine spent on anything but this process and its children, in % of one
    /// core: other work that competed with the run.
    pub other_cpu_pct: f64,
}

impl Rate {
    /// Own CPU per run, in microseconds.
    pub fn own_us_per_run(&self) -> f64 {
        self.own_cpu_secs * 1e6 / self.runs.max(1) as f64
    }

    pub fn children_us_per_run(&self) -> f64 {
        self.children_cpu_secs * 1e6 / self.runs.max(1) as f64
    }
}

/// CPU seconds (user + system) of this process, of its waited-for children, and of the
/// whole machine so far.
pub fn cpu_secs() -> (f64, f64, f64) {
    let of = |who: i32| -> f64 {
        // SAFETY: getrusage fills the struct we pass; an all-zero rusage is a valid value.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: as above; `ru` outlives the call.
        if unsafe { libc::getrusage(who, &mut ru) } != 0 {
            return 0.0;
        }
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        tv(ru.ru_utime) + tv(ru.ru_stime)
    };
    let machine = crate::sample::machine_busy_ticks().unwrap_or(0) as f64
        / crate::sample::clock_ticks_per_sec();
    (of(libc::RUSAGE_SELF), of(libc::RUSAGE_CHILDREN), machine)
}

/// The rate of `runs` runs (of which `failed` failed) that took `busy` in total, since
/// `start` and the CPU reading `cpu0`.
fn rate(start: Instant, cpu0: (f64, f64, f64), runs: u64, failed: u64, busy: Duration) -> Rate {
    let elapsed = start.elapsed().as_secs_f64();
    let cpu1 = cpu_secs();
    let (own, children, machine) = (cpu1.0 - cpu0.0, cpu1.1 - cpu0.1, cpu1.2 - cpu0.2);
    Rate {
        per_sec: runs as f64 / elapsed,
        runs,
        failed,
        own_cpu_secs: own,
        children_cpu_secs: children,
        mean_run_ms: busy.as_secs_f64() * 1e3 / runs.max(1) as f64,
        other_cpu_pct: ((machine - own - children) / elapsed * 100.0).max(0.0),
    }
}

fn kill_group(pid: u32) {
    if pid == 0 || pid > i32::MAX as u32 {
        return;
    }
    // SAFETY: kill(2) on the process group this run created; no memory is involved.
    unsafe {
        libc::kill(-(pid as i32), libc::SIGKILL);
    }
}

/// (a) tokio::process on a two-worker runtime, like the agent's.
pub fn tokio_rate(program: &str, concurrency: usize, run_for: Duration) -> Result<Rate> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start a tokio runtime")?;
    rt.block_on(async {
        let cpu0 = cpu_secs();
        let start = Instant::now();
        let deadline = start + run_for;
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..concurrency.max(1) {
            let program = program.to_string();
            tasks.spawn(async move {
                let (mut runs, mut failed, mut busy) = (0u64, 0u64, Duration::ZERO);
                while Instant::now() < deadline {
                    let t = Instant::now();
                    // Exactly the agent's spawn settings.
                    let child = outpost_agent::spawn::command(std::slice::from_ref(&program))
                        .map_err(anyhow::Error::msg)?
                        .spawn()
                        .with_context(|| format!("cannot run {program}"))?;
                    let pid = child.id().unwrap_or(0);
                    let out = child
                        .wait_with_output()
                        .await
                        .with_context(|| format!("cannot wait for {program}"))?;
                    kill_group(pid);
                    busy += t.elapsed();
                    runs += 1;
                    failed += u64::from(!out.status.success());
                }
                Ok::<_, anyhow::Error>((runs, failed, busy))
            });
        }
        let (mut runs, mut failed, mut busy) = (0, 0, Duration::ZERO);
        while let Some(joined) = tasks.join_next().await {
            let (r, f, b) = joined.map_err(|e| anyhow!("a spawning task failed: {e}"))??;
            runs += r;
            failed += f;
            busy += b;
        }
        Ok(rate(start, cpu0, runs, failed, busy))
    })
}

/// (b) std::process from `concurrency` threads.
pub fn threads_rate(program: &str, concurrency: usize, run_for: Duration) -> Result<Rate> {
    use std::os::unix::process::CommandExt;
    let cpu0 = cpu_secs();
    let start = Instant::now();
    let deadline = start + run_for;
    let stop = Arc::new(AtomicBool::new(false));
    let (runs, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut threads = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (program, stop) = (program.to_string(), stop.clone());
        let (runs, failed) = (runs.clone(), failed.clone());
        threads.push(std::thread::spawn(move || -> Result<Duration> {
            let mut busy = Duration::ZERO;
            while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let child = std::process::Command::new(&program)
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .process_group(0)
                    .env_clear()
                    .env("PATH", PATH)
                    .env("LC_ALL", "C")
                    .spawn();
                let child = match child {
                    Ok(c) => c,
                    Err(e) => {
                        stop.store(true, Ordering::Relaxed);
                        return Err(e).with_context(|| format!("cannot run {program}"));
                    }
                };
                let pid = child.id();
                let out = child
                    .wait_with_output()
                    .with_context(|| format!("cannot wait for {program}"))?;
                kill_group(pid);
                busy += t.elapsed();
                runs.fetch_add(1, Ordering::Relaxed);
                if !out.status.success() {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(busy)
        }));
    }
    let mut busy = Duration::ZERO;
    for t in threads {
        busy += t
            .join()
            .map_err(|_| anyhow!("a spawning thread panicked"))??;
    }
    Ok(rate(
        start,
        cpu0,
        runs.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        busy,
    ))
}
