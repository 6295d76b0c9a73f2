//! Durable results per second: a raw `write` + `fdatasync` loop on a plain file, then the
//! agent's [`DiskOutbox`] with one producer and with many, then the raw loop again, all in
//! one directory (so on one filesystem) and in one run. No acks meanwhile: nothing is
//! deleted, as when the gateway is out of reach.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use outpost_agent::outbox::{DiskOutbox, Outbox};
use outpost_protocol::CheckResult;

use super::sample_result;
use crate::{now_ms, progress, raw};

/// How many results one writer made durable, and what it cost.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    pub results: u64,
    pub secs: f64,
    /// Threads that appended.
    pub producers: usize,
    /// Durable transactions (redb commits; one per record in the raw loop).
    pub commits: u64,
    /// Results the outbox dropped for its bound (should stay 0).
    pub dropped: u64,
    /// CPU of this process (every thread, the outbox's writer included), in seconds.
    pub cpu_secs: f64,
    /// CPU the machine spent on anything but this process, in % of one core.
    pub other_cpu_pct: f64,
}

impl Run {
    pub fn per_sec(&self) -> f64 {
        self.results as f64 / self.secs.max(1e-9)
    }

    pub fn per_commit(&self) -> f64 {
        self.results as f64 / self.commits.max(1) as f64
    }

    /// How long each producer waited for one result to be durable, in ms.
    pub fn mean_wait_ms(&self) -> f64 {
        self.secs * 1e3 * self.producers as f64 / self.results.max(1) as f64
    }

    pub fn cpu_us_per_result(&self) -> f64 {
        self.cpu_secs * 1e6 / self.results.max(1) as f64
    }
}

/// Everything measured, in the order it ran: raw, one producer, many, raw again.
pub struct Rates {
    /// The size of one record, in bytes (the JSON of a result, plus a newline in the raw
    /// loop).
    pub record_bytes: usize,
    pub raw_before: Run,
    pub one: Run,
    pub many: Run,
    pub raw_after: Run,
}

impl Rates {
    /// The raw loop's rate, as the mean of before and after.
    pub fn raw(&self) -> f64 {
        (self.raw_before.per_sec() + self.raw_after.per_sec()) / 2.0
    }

    /// The most competing CPU seen during any of the runs.
    pub fn other_pct(&self) -> f64 {
        [self.raw_before, self.one, self.many, self.raw_after]
            .iter()
            .map(|r| r.other_cpu_pct)
            .fold(0.0, f64::max)
    }
}

/// Measure every rate for `secs` each under `dir`, the outbox bounded at `max_bytes`;
/// returns them and the most competing CPU seen (for [`crate::measured`]).
pub fn measure(
    dir: &Path,
    secs: Duration,
    producers: usize,
    max_bytes: u64,
) -> Result<(Rates, f64)> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // Numbered as by an agent that has been running for a while.
    let result = CheckResult {
        seq: 1_000_000,
        ..sample_result("rate-00", now_ms(), 0)
    };
    let mut record = serde_json::to_vec(&result).context("cannot serialize a result")?;
    record.push(b'\n');
    let say = |what: &str, r: &Run| {
        progress(format!(
            "outbox: {what}: {:.0} results/s ({} in {:.1} s, {:.1} per commit)",
            r.per_sec(),
            r.results,
            r.secs,
            r.per_commit()
        ))
    };
    progress(format!(
        "outbox: raw write+fdatasync loop, then the outbox with 1 and {producers} producers, then raw again, {} s each",
        secs.as_secs_f64()
    ));
    let raw_before = raw_loop(&dir.join("raw-before.log"), &record, secs)?;
    say("raw before", &raw_before);
    let one = outbox_loop(&dir.join("one"), 1, secs, max_bytes)?;
    say("outbox, 1 producer", &one);
    let many = outbox_loop(&dir.join("many"), producers, secs, max_bytes)?;
    say(&format!("outbox, {producers} producers"), &many);
    let raw_after = raw_loop(&dir.join("raw-after.log"), &record, secs)?;
    say("raw after", &raw_after);
    let rates = Rates {
        record_bytes: record.len() - 1,
        raw_before,
        one,
        many,
        raw_after,
    };
    let other = rates.other_pct();
    Ok((rates, other))
}

/// CPU seconds of this process and busy seconds of the machine, taken at the start of a
/// run; [`Meter::finish`] turns them into a [`Run`].
struct Meter {
    start: Instant,
    own: f64,
    machine: f64,
}

impl Meter {
    fn start() -> Meter {
        let (own, _, machine) = raw::cpu_secs();
        Meter {
            start: Instant::now(),
            own,
            machine,
        }
    }

    fn finish(self, results: u64, producers: usize, commits: u64, dropped: u64) -> Run {
        let secs = self.start.elapsed().as_secs_f64();
        let (own, _, machine) = raw::cpu_secs();
        let cpu_secs = own - self.own;
        Run {
            results,
            secs,
            producers,
            commits,
            dropped,
            cpu_secs,
            other_cpu_pct: ((machine - self.machine - cpu_secs) / secs * 100.0).max(0.0),
        }
    }
}

/// One thread appending `record` to a new plain file with `write(2)` and `fdatasync(2)`
/// after each, for `secs`.
fn raw_loop(path: &Path, record: &[u8], secs: Duration) -> Result<Run> {
    let file = std::fs::OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    let fd = file.as_raw_fd();
    let meter = Meter::start();
    let mut n = 0u64;
    while meter.start.elapsed() < secs {
        // SAFETY: `fd` stays open as long as `file`; the buffer is valid for its length.
        let written = unsafe { libc::write(fd, record.as_ptr().cast(), record.len()) };
        if written != record.len() as isize {
            bail!(
                "write to {} wrote {written} of {} bytes: {}",
                path.display(),
                record.len(),
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: as above.
        if unsafe { libc::fdatasync(fd) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("fdatasync of {} failed", path.display()));
        }
        n += 1;
    }
    let run = meter.finish(n, 1, n, 0);
    // The file's length says how many records made it: a cross-check of the count.
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if len != n * record.len() as u64 {
        bail!(
            "{} holds {len} bytes after {n} records of {} bytes",
            path.display(),
            record.len()
        );
    }
    Ok(run)
}

/// `producers` threads, each appending a result and waiting for it to be durable
/// (`append` + `flush`) in a loop, for `secs`, into a fresh outbox in `dir`.
fn outbox_loop(dir: &Path, producers: usize, secs: Duration, max_bytes: u64) -> Result<Run> {
    let (outbox, moved) = DiskOutbox::open(dir, max_bytes)
        .with_context(|| format!("cannot open an outbox in {}", dir.display()))?;
    if let Some(why) = moved {
        bail!("a fresh outbox was moved aside: {why}");
    }
    let meter = Meter::start();
    let counts: Vec<Result<u64>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..producers)
            .map(|t| {
                let (outbox, start) = (&outbox, meter.start);
                s.spawn(move || -> Result<u64> {
                    let check = format!("rate-{t:02}");
                    let mut n = 0u64;
                    while start.elapsed() < secs {
                        outbox
                            .append(sample_result(&check, now_ms(), n))
                            .context("append failed")?;
                        outbox.flush().context("flush failed")?;
                        n += 1;
                    }
                    Ok(n)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|_| bail!("a producer panicked")))
            .collect()
    });
    let mut results = 0;
    for c in counts {
        results += c?;
    }
    let run = meter.finish(results, producers, outbox.commits(), outbox.dropped());
    if outbox.len() as u64 + run.dropped != results {
        bail!(
            "the outbox holds {} results and dropped {} after {results} appends",
            outbox.len(),
            run.dropped
        );
    }
    Ok(run)
}
