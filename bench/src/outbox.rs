//! Part 4: the agent's disk outbox (issue 4). How many results per second it makes durable,
//! next to a raw `write` + `fdatasync` loop on the same filesystem in the same run
//! ([`rates`]), and how long the real agent takes to deliver an hour of backlog to the real
//! gateway after a restart ([`drain`]). It reports; it sets no goal.

mod drain;
mod rates;

use std::ffi::CString;
use std::fmt::Write as _;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use outpost_protocol::{CheckResult, Metric, Status};

use crate::harness::Bins;
use crate::{busy_note, measured, problems_note, Plan};

/// The backlog of the issue: 100 checks at 10 s.
const BACKLOG_CHECKS: usize = 100;
const BACKLOG_INTERVAL_MS: u64 = 10_000;

/// A result of realistic size (about 300 bytes of JSON): a disk check's line of output and
/// one metric with thresholds; `run` varies the figures a little, as real runs do.
pub fn sample_result(check: &str, started_at_ms: u64, run: u64) -> CheckResult {
    let total = 65_930u64;
    let used = 25_000 + run.wrapping_mul(7919) % 1000;
    let free = total - used;
    CheckResult {
        metrics: vec![Metric {
            name: "/".into(),
            value: used as f64,
            unit: Some("MB".into()),
            warn: Some("52744".into()),
            crit: Some("59337".into()),
            min: Some(0.0),
            max: Some(total as f64),
        }],
        started_at_ms,
        duration_ms: 12 + run % 7,
        exit_code: Some(0),
        ..CheckResult::new(
            check,
            Status::Ok,
            format!(
                "DISK OK - free space: / {free} MB ({}% inode=91%);",
                free * 100 / total
            ),
        )
    }
}

/// The filesystem a path is on, from `statfs(2)` and `/proc/self/mounts`.
struct Filesystem {
    /// `statfs`'s `f_type`.
    magic: u64,
    /// From the mount table: type, device, mount point, options.
    mount: Option<(String, String, PathBuf, String)>,
}

impl Filesystem {
    fn of(path: &Path) -> Result<Filesystem> {
        let path = path
            .canonicalize()
            .with_context(|| format!("cannot resolve {}", path.display()))?;
        let c = CString::new(path.as_os_str().as_bytes())
            .with_context(|| format!("{} holds a NUL byte", path.display()))?;
        // SAFETY: statfs fills the struct we pass; all zeroes is a valid value of it.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is a NUL-terminated path and `st` outlives the call.
        if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("statfs of {} failed", path.display()));
        }
        let table = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        // The longest mount point above the path; of equal ones the last mounted.
        let mut mount: Option<(String, String, PathBuf, String)> = None;
        for line in table.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let [device, point, kind, options, ..] = f[..] else {
                continue;
            };
            let point = PathBuf::from(unescape(point));
            let longer = mount
                .as_ref()
                .is_none_or(|m| point.as_os_str().len() >= m.2.as_os_str().len());
            if path.starts_with(&point) && longer {
                mount = Some((
                    kind.to_string(),
                    unescape(device),
                    point,
                    options.to_string(),
                ));
            }
        }
        Ok(Filesystem {
            magic: st.f_type as u64,
            mount,
        })
    }

    /// tmpfs and ramfs keep everything in memory: an fsync there costs nothing.
    fn in_memory(&self) -> bool {
        matches!(self.magic, 0x0102_1994 | 0x8584_58f6)
    }

    fn describe(&self) -> String {
        match &self.mount {
            Some((kind, device, point, options)) => format!(
                "**{kind}** (`{device}` on `{}`, options `{options}`; statfs type {:#x})",
                point.display(),
                self.magic
            ),
            None => format!("statfs type {:#x} (not in /proc/self/mounts)", self.magic),
        }
    }
}

/// Undo the octal escapes of `/proc/self/mounts` (`\040` for a space, …).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push(d.iter().fold(0u8, |n, c| n.wrapping_mul(8) + (c - b'0')));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `n` with thousands separators: 36,000.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A rate, rounded, with thousands separators.
fn per_sec(x: f64) -> String {
    grouped(x.max(0.0).round() as u64)
}

/// Part 4: durable appends per second next to raw fsync, and the drain of a backlog.
pub fn outbox(bins: &Bins, work: &Path, plan: &Plan) -> Result<(String, Vec<String>)> {
    let fs = Filesystem::of(work)?;
    let max_bytes = drain::default_max_bytes()?;
    let secs = plan.outbox_secs;
    let producers = plan.outbox_producers;
    let r = measured(plan, "outbox rates", |suffix| {
        rates::measure(
            &work.join(format!("outbox-rates{suffix}")),
            secs,
            producers,
            max_bytes,
        )
    })?;
    let rounds = plan.backlog_minutes * 60_000 / BACKLOG_INTERVAL_MS;
    let d = measured(plan, "outbox drain", |suffix| {
        drain::measure(
            bins,
            &work.join(format!("outbox-drain{suffix}")),
            BACKLOG_CHECKS,
            rounds,
            BACKLOG_INTERVAL_MS,
        )
    })?;

    let mut out = String::new();
    if plan.quick {
        let _ = writeln!(
            out,
            "**Quick run:** each rate for {:.0} s (not 5) and a {}-minute backlog ({} results, not an hour's 36,000).\n",
            secs.as_secs_f64(),
            plan.backlog_minutes,
            grouped(d.results)
        );
    }
    let _ = write!(
        out,
        "Durable results per second, every file on the work directory's filesystem: {}. Each \
writer appends the same realistic result ({} bytes of JSON: a disk check's line of output \
and one metric with thresholds) and waits until it is durable, for {:.0} s, in this order: \
raw, outbox with 1 producer, outbox with {producers}, raw again. The outbox is the agent's \
`DiskOutbox` with its default bound, fresh for each row; nothing is acked meanwhile (as \
while the gateway is out of reach). No numeric goal: the raw loop is what one durable write \
costs on this disk; the outbox rows show what it adds to that with one producer (a redb \
commit per result) and what it saves with many (one commit for everything staged \
meanwhile).\n\n\
| writer | durable results/s | % of the raw loop | results per commit | wait per result | CPU per result (this process) | other CPU on the machine |\n\
|---|---|---|---|---|---|---|\n",
        fs.describe(),
        r.record_bytes,
        secs.as_secs_f64(),
    );
    let raw = r.raw();
    let _ = writeln!(
        out,
        "| raw: `write` + `fdatasync` per record, 1 thread, plain file (before / after) | {} / {} | 100% (their mean, {}/s) | 1 | {:.2} / {:.2} ms | {:.0} / {:.0} µs | {:.0}% / {:.0}% |",
        per_sec(r.raw_before.per_sec()),
        per_sec(r.raw_after.per_sec()),
        per_sec(raw),
        r.raw_before.mean_wait_ms(),
        r.raw_after.mean_wait_ms(),
        r.raw_before.cpu_us_per_result(),
        r.raw_after.cpu_us_per_result(),
        r.raw_before.other_cpu_pct,
        r.raw_after.other_cpu_pct,
    );
    for (what, run) in [
        (
            "`DiskOutbox`, 1 producer: `append` + `flush` per result".to_string(),
            &r.one,
        ),
        (
            format!(
                "`DiskOutbox`, {producers} producer threads, each `append` + `flush` in a loop"
            ),
            &r.many,
        ),
    ] {
        let _ = writeln!(
            out,
            "| {what} | **{}** | **{:.0}%** | {:.1} ({} commits) | {:.2} ms | {:.0} µs | {:.0}% |",
            per_sec(run.per_sec()),
            run.per_sec() / raw.max(1e-9) * 100.0,
            run.per_commit(),
            grouped(run.commits),
            run.mean_wait_ms(),
            run.cpu_us_per_result(),
            run.other_cpu_pct,
        );
    }
    out.push_str(
        "\n\"Wait per result\" is how long a producer waited from `append` to the end of \
`flush` (elapsed time × producers / results); CPU per result counts every thread of this \
process, the outbox's writer included.\n\n",
    );

    let hour = 3_600_000 / BACKLOG_INTERVAL_MS * BACKLOG_CHECKS as u64;
    let hours_held = d.max_bytes as f64 / (d.bytes_per_result * hour as f64);
    let _ = write!(
        out,
        "Draining a backlog through the real binaries: a release gateway and an agent that runs \
no checks. The agent enrolled and was stopped (SIGTERM); this tool filled its outbox \
(`outbox.redb` in its state directory, through `DiskOutbox`, which numbers above the \
agent's `seq` file) with {checks} checks at {iv} s for {min} minutes, oldest first, the \
result above; then the agent was started again and timed until the gateway's bus \
(`bus/results.jsonl` and its sealed segments, fsynced before each ack) held every one of them. The agent sends \
batches of up to 256 results and waits for each ack. The bus file is read every 10 ms.\n\n\
| | |\n|---|---|\n\
| backlog | {n} results: {checks} checks × {rounds} runs ({min} min at {iv} s) |\n\
| **agent restart → all {n} durable on the gateway** | **{:.2} s: {} results/s** |\n\
| first result on the bus after the restart | {:.2} s (from then on {} results/s) |\n\
| CPU meanwhile | agent {:.2} s (since its start), gateway {:.2} s, this tool reading the bus {:.2} s; other work on the machine {:.0}% of a core |\n\
| filling the outbox ({n} appends, one flush) | {:.2} s, {} commits |\n\
| outbox bytes per result (JSON + 8-byte key: what the bound counts) | {:.0} |\n\
| `outbox.redb` once filled | {:.1} MB |\n\
| *computed, not measured:* hours of backlog the default bound (`outbox_max_mb` = {:.0}: {} bytes) holds for {checks} checks at {iv} s | *{hours_held:.1} h* (= {} / ({:.0} bytes × {} results per hour)) |\n\n",
        d.last_secs,
        per_sec(d.per_sec()),
        d.first_secs,
        per_sec(d.flowing_per_sec()),
        d.agent_cpu_secs,
        d.gateway_cpu_secs,
        d.own_cpu_secs,
        d.other_cpu_pct,
        d.prefill_secs,
        d.prefill_commits,
        d.bytes_per_result,
        d.file_bytes as f64 / 1e6,
        d.max_bytes as f64 / 1e6,
        grouped(d.max_bytes),
        grouped(d.max_bytes),
        d.bytes_per_result,
        grouped(hour),
        checks = BACKLOG_CHECKS,
        iv = BACKLOG_INTERVAL_MS / 1000,
        min = plan.backlog_minutes,
        n = grouped(d.results),
    );

    let mut notes = String::new();
    if fs.in_memory() {
        let _ = writeln!(
            notes,
            "- The work directory is in memory (tmpfs or ramfs): an fsync costs nothing there, so these rates say nothing about a disk. Pass `--work-dir` on a disk."
        );
    }
    busy_note(
        &mut notes,
        "Outbox rates",
        r.other_pct(),
        "CPU-bound rows may be low (other work can also compete for the disk, which this does not see)",
    );
    busy_note(
        &mut notes,
        "Backlog drain",
        d.other_cpu_pct,
        "its time may be inflated",
    );
    for (what, run) in [("1 producer", &r.one), ("many producers", &r.many)] {
        if run.dropped > 0 {
            let _ = writeln!(
                notes,
                "- Outbox, {what}: the bound dropped {} results; the rate includes deleting them.",
                run.dropped
            );
        }
    }
    if !d.stopped_cleanly {
        let _ = writeln!(
            notes,
            "- The agent did not stop within 10 s of SIGTERM before the refill and was killed."
        );
    }
    if d.duplicates > 0 {
        let _ = writeln!(
            notes,
            "- The bus holds {} backlog results more than once (resent after a missing ack).",
            d.duplicates
        );
    }
    if !d.problems.is_empty() {
        let _ = writeln!(notes, "- Backlog drain:{}", problems_note(&d.problems));
    }
    if !notes.is_empty() {
        out.push_str(&notes);
        out.push('\n');
    }
    Ok((out, Vec::new()))
}
