//! Built-in system probes that need nothing installed on the host: cpu, memory, swap,
//! disk, load, network and process.
//!
//! Every probe answers with a Nagios-like line (`DISK OK - / 42.1% used (12.3 GiB of
//! 29.2 GiB)`), details in the long output, and perfdata-like metrics whose `warn`/`crit`
//! repeat the thresholds in Nagios range syntax and whose `min`/`max` bound percents to
//! 0..100. A probe that cannot measure says why as UNKNOWN; it never panics.
//!
//! What each probe reports:
//!
//! - **cpu**: percent of time all CPUs together were busy (user, nice, system, irq,
//!   softirq, steal, guest; idle and iowait count as idle) since the previous cpu refresh.
//!   The very first run samples twice, [`MINIMUM_CPU_UPDATE_INTERVAL`] apart. Every cpu
//!   check shares one sample: two cpu checks measure the window since whichever ran last,
//!   and runs closer than that interval to the previous one repeat its value. Metrics:
//!   `cpu_busy` (%, thresholds), `cpu_busiest` (%, the busiest single CPU), `cpus`.
//!   sysinfo does not expose user/system/iowait separately, so there are no per-state
//!   metrics.
//! - **memory**: used percent of RAM, where used = total − available (the kernel's
//!   `MemAvailable`, so page cache that can be dropped counts as free). Host-wide: cgroup
//!   limits are not applied. Metrics: `mem_used_pct` (%, thresholds), `mem_used`,
//!   `mem_total` (B).
//! - **swap**: used percent of swap (used = total − free). A host without swap is OK,
//!   "no swap configured". Metrics: `swap_used_pct` (%, thresholds), `swap_used`,
//!   `swap_total` (B); only `swap_total` = 0 without swap.
//! - **disk**: the filesystem holding `path`, found by `statvfs(2)` on the canonical path;
//!   its mount point is the longest mount point in `/proc/self/mounts` that is a prefix of
//!   the canonical path. Used percent is computed as `df` does: used / (used + available
//!   to unprivileged users), so blocks reserved for root count neither way; the sizes are
//!   the filesystem's. A path that does not exist (or cannot be resolved or measured) is
//!   CRITICAL with the reason. While one measurement of a path hangs (a dead NFS server),
//!   further runs for that path say so as UNKNOWN instead of stacking blocked threads.
//!   Metrics: `disk_used_pct` (%, thresholds), `disk_used`, `disk_avail`, `disk_total` (B)
//!   and, when the filesystem has inodes, `inodes_used_pct` (%), `inodes_used`,
//!   `inodes_total`. Thresholds apply to space only.
//! - **load**: the 1, 5 and 15 minute load averages and the same divided by the number of
//!   online CPUs; thresholds apply to the 1-minute load (not per CPU). Metrics: `load1`
//!   (thresholds), `load5`, `load15`, `load1_per_cpu`, `load5_per_cpu`, `load15_per_cpu`,
//!   `cpus`.
//! - **network**: per interface (all but loopback, or only `interface`) the kernel's rx/tx
//!   byte, packet and error counters as Nagios counters (unit `c`): `<if>_rx_bytes`,
//!   `<if>_tx_bytes`, `<if>_rx_packets`, `<if>_tx_packets`, `<if>_rx_errors`,
//!   `<if>_tx_errors`; from the second run on, the same as rates since the previous sample
//!   of that interface (`<if>_rx_bytes_per_s` in `B/s`, the others in `/s`). A sample
//!   younger than a second is not replaced: a run that close repeats the previous rates. A
//!   counter that went backwards (interface reset) gives no rate for that run. An unknown
//!   `interface` is CRITICAL naming the interfaces present; a named interface whose link
//!   is down is CRITICAL too. Loopback is the interface named `lo` or one whose addresses
//!   are all loopback addresses.
//! - **process**: how many processes (not threads) are named `name` exactly, as the kernel
//!   reports it (`/proc/PID/comm`, at most 15 bytes); zombies are not counted. CRITICAL
//!   below `min`, WARNING above `max`. Metrics: `procs` (warn `max`, crit `min:`),
//!   `procs_rss` (B, resident memory summed) and `procs_cpu` (%, CPU summed, in percent of
//!   one CPU, so up to 100 × CPUs) since the previous process refresh. Listing processes
//!   reads every `/proc/PID/stat` (and `status`): only names and CPU times are refreshed
//!   for all of them, memory only for those matching. The first run samples twice, like
//!   cpu; a process first seen in this run counts 0% CPU.
//!
//! sysinfo reads `/proc` with blocking calls: every probe runs on a blocking thread, and no
//! lock is held across an await. State kept between runs is loaded on first use only: one
//! [`System`] for cpu, memory and swap; one for processes (separate, because refreshing
//! processes also moves the global CPU sample); the network interface list and the last
//! counter samples. Disk and load keep nothing.

mod disk;
mod network;
mod process;

use outpost_sys::lock;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use outpost_protocol::probe::{Probe, Thresholds};
use outpost_protocol::{Metric, Status};
use sysinfo::{MemoryRefreshKind, System, MINIMUM_CPU_UPDATE_INTERVAL};

use super::outcome::{above, Outcome};

/// The system probes and what they keep between runs.
pub struct SystemProbes {
    shared: Arc<Shared>,
}

/// State shared with the blocking threads the probes run on. Everything starts empty.
#[derive(Default)]
struct Shared {
    /// CPU, memory and swap.
    host: Mutex<Option<System>>,
    procs: Mutex<process::State>,
    net: Mutex<network::State>,
    /// Disk paths whose measurement has not returned yet.
    disks_in_flight: Mutex<HashSet<String>>,
}

impl Default for SystemProbes {
    fn default() -> Self {
        SystemProbes::new()
    }
}

impl SystemProbes {
    /// Cheap: nothing is read from the system until a probe first runs.
    pub fn new() -> SystemProbes {
        SystemProbes {
            shared: Arc::new(Shared::default()),
        }
    }

    pub async fn run(&self, probe: &Probe) -> Outcome {
        let shared = self.shared.clone();
        match probe {
            Probe::Cpu(t) => cpu(shared, t.clone()).await,
            Probe::Memory(t) => {
                let t = t.clone();
                blocking("memory", move || memory(&shared, &t)).await
            }
            Probe::Swap(t) => {
                let t = t.clone();
                blocking("swap", move || swap(&shared, &t)).await
            }
            Probe::Load(t) => {
                let t = t.clone();
                blocking("load", move || load(&t)).await
            }
            Probe::Disk(d) => disk::run(shared, d.clone()).await,
            Probe::Network(n) => {
                let n = n.clone();
                blocking("network", move || network::run(&shared, &n)).await
            }
            Probe::Process(p) => process::run(shared, p.clone()).await,
            other => Outcome::unknown(format!("{} is not a system probe", other.kind())),
        }
    }
}

/// Run `f` on a blocking thread; a panic in it is an UNKNOWN result.
async fn blocking<F>(kind: &str, f: F) -> Outcome
where
    F: FnOnce() -> Outcome + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(outcome) => outcome,
        Err(e) => Outcome::unknown(format!("{kind} probe failed: {e}")),
    }
}

/// Take a baseline sample when `sample` says it had to (its first run), then wait the
/// gap sysinfo needs before a second sample gives a rate.
pub(super) async fn baseline<F>(kind: &str, sample: F) -> Result<(), Outcome>
where
    F: FnOnce() -> Result<bool, String> + Send + 'static,
{
    match tokio::task::spawn_blocking(sample).await {
        Ok(Ok(true)) => {
            tokio::time::sleep(MINIMUM_CPU_UPDATE_INTERVAL).await;
            Ok(())
        }
        Ok(Ok(false)) => Ok(()),
        Ok(Err(why)) => Err(Outcome::unknown(why)),
        Err(e) => Err(Outcome::unknown(format!("{kind} probe failed: {e}"))),
    }
}

/// The [`System`] in `slot`, created (empty) on first use. The error says why not.
fn system_in(slot: &mut Option<System>) -> Result<&mut System, String> {
    if slot.is_none() {
        let sys = System::new().map_err(|e| format!("cannot read system information: {e}"))?;
        *slot = Some(sys);
    }
    slot.as_mut()
        .ok_or_else(|| "cannot read system information".to_string())
}

/// `LABEL STATUS - text`.
fn headline(label: &str, status: Status, text: &str) -> String {
    let word = match status {
        Status::Ok => "OK",
        Status::Warning => "WARNING",
        Status::Critical => "CRITICAL",
        Status::Unknown => "UNKNOWN",
    };
    format!("{label} {word} - {text}")
}

/// A metric with no thresholds or bounds yet.
fn metric(name: &str, value: f64, unit: Option<&str>) -> Metric {
    Metric {
        name: name.into(),
        value,
        unit: unit.map(str::to_string),
        warn: None,
        crit: None,
        min: None,
        max: None,
    }
}

/// A percent metric: 0..100, with the probe's thresholds.
fn percent_metric(name: &str, value: f64, warn: Option<f64>, crit: Option<f64>) -> Metric {
    Metric {
        warn: warn.map(threshold),
        crit: crit.map(threshold),
        min: Some(0.0),
        max: Some(100.0),
        ..metric(name, round2(value), Some("%"))
    }
}

/// A byte count, at least 0 and at most `max` when known.
fn bytes_metric(name: &str, value: u64, max: Option<u64>) -> Metric {
    Metric {
        min: Some(0.0),
        max: max.map(|m| m as f64),
        ..metric(name, value as f64, Some("B"))
    }
}

/// An upper threshold as perfdata writes it: `80`, `80.5`.
fn threshold(v: f64) -> String {
    format!("{v}")
}

/// `part` as a percent of `whole`; 0 when `whole` is 0.
fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// `12.3 GiB`.
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// CPU busy percent since the previous cpu refresh. The first run samples twice: the first
/// refresh only sets the baseline.
async fn cpu(shared: Arc<Shared>, t: Thresholds) -> Outcome {
    let first = shared.clone();
    let sampled = baseline("cpu", move || {
        let mut host = lock(&first.host);
        let sys = system_in(&mut host)?;
        let first = sys.cpus().is_empty();
        if first {
            sys.refresh_cpu_usage();
        }
        Ok(first)
    });
    if let Err(o) = sampled.await {
        return o;
    }
    blocking("cpu", move || {
        let mut host = lock(&shared.host);
        let sys = match system_in(&mut host) {
            Ok(sys) => sys,
            Err(why) => return Outcome::unknown(why),
        };
        sys.refresh_cpu_usage();
        let cpus = sys.cpus();
        if cpus.is_empty() {
            return Outcome::unknown("cannot read CPU times");
        }
        let busy = f64::from(sys.global_cpu_usage()).clamp(0.0, 100.0);
        let busiest = cpus
            .iter()
            .map(|c| f64::from(c.usage()))
            .fold(0.0, f64::max)
            .clamp(0.0, 100.0);
        let count = cpus.len();
        let status = above(busy, t.warn, t.crit);
        let mut o = Outcome::new(
            status,
            headline(
                "CPU",
                status,
                &format!("{busy:.1}% busy ({count} CPUs, busiest {busiest:.1}%)"),
            ),
        );
        o.metrics
            .push(percent_metric("cpu_busy", busy, t.warn, t.crit));
        o.metrics
            .push(percent_metric("cpu_busiest", busiest, None, None));
        o.metrics.push(Metric {
            min: Some(0.0),
            ..metric("cpus", count as f64, None)
        });
        o
    })
    .await
}

fn memory(shared: &Shared, t: &Thresholds) -> Outcome {
    let mut host = lock(&shared.host);
    let sys = match system_in(&mut host) {
        Ok(sys) => sys,
        Err(why) => return Outcome::unknown(why),
    };
    sys.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
    let total = sys.total_memory();
    if total == 0 {
        return Outcome::unknown("cannot read the memory size");
    }
    let used = total.saturating_sub(sys.available_memory());
    let pct = percent(used, total);
    let status = above(pct, t.warn, t.crit);
    let mut o = Outcome::new(
        status,
        headline(
            "MEMORY",
            status,
            &format!(
                "{pct:.1}% used ({} of {})",
                human_bytes(used),
                human_bytes(total)
            ),
        ),
    );
    o.note(format!(
        "available {} (free {})",
        human_bytes(sys.available_memory()),
        human_bytes(sys.free_memory())
    ));
    o.metrics
        .push(percent_metric("mem_used_pct", pct, t.warn, t.crit));
    o.metrics.push(bytes_metric("mem_used", used, Some(total)));
    o.metrics.push(bytes_metric("mem_total", total, None));
    o
}

fn swap(shared: &Shared, t: &Thresholds) -> Outcome {
    let mut host = lock(&shared.host);
    let sys = match system_in(&mut host) {
        Ok(sys) => sys,
        Err(why) => return Outcome::unknown(why),
    };
    sys.refresh_memory_specifics(MemoryRefreshKind::nothing().with_swap());
    let total = sys.total_swap();
    if total == 0 {
        let mut o = Outcome::new(
            Status::Ok,
            headline("SWAP", Status::Ok, "no swap configured"),
        );
        o.metrics.push(bytes_metric("swap_total", 0, None));
        return o;
    }
    let used = total.saturating_sub(sys.free_swap());
    let pct = percent(used, total);
    let status = above(pct, t.warn, t.crit);
    let mut o = Outcome::new(
        status,
        headline(
            "SWAP",
            status,
            &format!(
                "{pct:.1}% used ({} of {})",
                human_bytes(used),
                human_bytes(total)
            ),
        ),
    );
    o.metrics
        .push(percent_metric("swap_used_pct", pct, t.warn, t.crit));
    o.metrics.push(bytes_metric("swap_used", used, Some(total)));
    o.metrics.push(bytes_metric("swap_total", total, None));
    o
}

/// CPUs online on the host (load averages are host-wide, whatever this process may use).
fn online_cpus() -> usize {
    #[cfg(not(unix))]
    return std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: sysconf only reads a system value.
    #[cfg(unix)]
    {
        let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
        if n > 0 {
            n as usize
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}

fn load(t: &Thresholds) -> Outcome {
    let avg = match System::load_average() {
        Ok(avg) => avg,
        Err(e) => return Outcome::unknown(format!("cannot read the load average: {e}")),
    };
    let cpus = online_cpus();
    let per_cpu = |v: f64| round2(v / cpus as f64);
    let status = above(avg.one, t.warn, t.crit);
    let mut o = Outcome::new(
        status,
        headline(
            "LOAD",
            status,
            &format!(
                "load average: {:.2}, {:.2}, {:.2} ({cpus} CPUs, {:.2} per CPU)",
                avg.one,
                avg.five,
                avg.fifteen,
                avg.one / cpus as f64
            ),
        ),
    );
    o.metrics.push(Metric {
        warn: t.warn.map(threshold),
        crit: t.crit.map(threshold),
        min: Some(0.0),
        ..metric("load1", avg.one, None)
    });
    for (name, value) in [
        ("load5", avg.five),
        ("load15", avg.fifteen),
        ("load1_per_cpu", per_cpu(avg.one)),
        ("load5_per_cpu", per_cpu(avg.five)),
        ("load15_per_cpu", per_cpu(avg.fifteen)),
        ("cpus", cpus as f64),
    ] {
        o.metrics.push(Metric {
            min: Some(0.0),
            ..metric(name, value, None)
        });
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn find<'a>(o: &'a Outcome, name: &str) -> &'a Metric {
        o.metrics
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("no metric {name} in {:#?}", o))
    }

    /// `Key:   123 kB` from /proc/meminfo, in bytes.
    fn meminfo(key: &str) -> u64 {
        let text = std::fs::read_to_string("/proc/meminfo").unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{key}:")))
            .unwrap_or_else(|| panic!("no {key} in /proc/meminfo"));
        let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kib * 1024
    }

    fn thresholds(warn: Option<f64>, crit: Option<f64>) -> Thresholds {
        Thresholds { warn, crit }
    }

    #[test]
    fn helpers_format_like_nagios() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
        assert_eq!(threshold(80.0), "80");
        assert_eq!(threshold(80.5), "80.5");
        assert_eq!(percent(1, 0), 0.0);
        assert_eq!(percent(1, 4), 25.0);
        assert_eq!(headline("DISK", Status::Critical, "x"), "DISK CRITICAL - x");
    }

    #[tokio::test]
    async fn cpu_twice_is_a_percent() {
        let probes = SystemProbes::new();
        let probe = Probe::Cpu(thresholds(Some(80.0), Some(95.0)));
        for run in 0..2 {
            let o = probes.run(&probe).await;
            assert_ne!(o.status, Status::Unknown, "run {run}: {o:?}");
            assert!(o.output.starts_with("CPU "), "{}", o.output);
            let busy = find(&o, "cpu_busy");
            assert!((0.0..=100.0).contains(&busy.value), "run {run}: {busy:?}");
            assert_eq!(busy.unit.as_deref(), Some("%"));
            assert_eq!(busy.warn.as_deref(), Some("80"));
            assert_eq!(busy.crit.as_deref(), Some("95"));
            assert_eq!((busy.min, busy.max), (Some(0.0), Some(100.0)));
            let busiest = find(&o, "cpu_busiest");
            assert!((0.0..=100.0).contains(&busiest.value), "{busiest:?}");
            assert!(find(&o, "cpus").value >= 1.0);
            if run == 0 {
                // Let the second run measure a window of its own.
                tokio::time::sleep(MINIMUM_CPU_UPDATE_INTERVAL).await;
            }
        }
        // A threshold below any possible value turns it CRITICAL.
        let o = probes.run(&Probe::Cpu(thresholds(None, Some(-1.0)))).await;
        assert_eq!(o.status, Status::Critical, "{o:?}");
        assert!(o.output.starts_with("CPU CRITICAL - "), "{}", o.output);
    }

    #[tokio::test]
    async fn memory_matches_proc_meminfo() {
        let probes = SystemProbes::new();
        let o = probes.run(&Probe::Memory(Thresholds::default())).await;
        assert_eq!(o.status, Status::Ok, "{o:?}");
        assert!(o.output.starts_with("MEMORY OK - "), "{}", o.output);
        let total = find(&o, "mem_total");
        assert_eq!(total.value, meminfo("MemTotal") as f64);
        assert_eq!(total.unit.as_deref(), Some("B"));
        let used = find(&o, "mem_used");
        assert!(used.value > 0.0 && used.value <= total.value, "{used:?}");
        // used = total - available, give or take what moved between the two reads.
        let expected = (meminfo("MemTotal") - meminfo("MemAvailable")) as f64;
        assert!(
            (used.value - expected).abs() < total.value * 0.05,
            "{} vs {expected}",
            used.value
        );
        let pct = find(&o, "mem_used_pct");
        assert!(
            (pct.value - used.value * 100.0 / total.value).abs() < 0.01,
            "{pct:?}"
        );
        assert_eq!((pct.min, pct.max), (Some(0.0), Some(100.0)));

        let o = probes
            .run(&Probe::Memory(thresholds(Some(0.0), None)))
            .await;
        assert_eq!(o.status, Status::Warning, "{o:?}");
        assert_eq!(find(&o, "mem_used_pct").warn.as_deref(), Some("0"));
        let o = probes
            .run(&Probe::Memory(thresholds(Some(0.0), Some(0.0))))
            .await;
        assert_eq!(o.status, Status::Critical, "{o:?}");
    }

    #[tokio::test]
    async fn swap_matches_proc_meminfo() {
        let probes = SystemProbes::new();
        let o = probes
            .run(&Probe::Swap(thresholds(Some(0.0), Some(0.0))))
            .await;
        let total = meminfo("SwapTotal");
        assert_eq!(find(&o, "swap_total").value, total as f64);
        if total == 0 {
            assert_eq!(o.status, Status::Ok, "{o:?}");
            assert_eq!(o.output, "SWAP OK - no swap configured");
            assert_eq!(o.metrics.len(), 1);
        } else {
            let used = find(&o, "swap_used").value;
            let pct = find(&o, "swap_used_pct").value;
            assert!(used <= total as f64);
            assert!((0.0..=100.0).contains(&pct));
            let expected = if pct > 0.0 {
                Status::Critical
            } else {
                Status::Ok
            };
            assert_eq!(o.status, expected, "{o:?}");
        }
    }

    #[tokio::test]
    async fn load_matches_proc_loadavg() {
        let probes = SystemProbes::new();
        let o = probes
            .run(&Probe::Load(thresholds(Some(1000.0), Some(2000.0))))
            .await;
        assert_eq!(o.status, Status::Ok, "{o:?}");
        assert!(
            o.output.starts_with("LOAD OK - load average: "),
            "{}",
            o.output
        );
        let text = std::fs::read_to_string("/proc/loadavg").unwrap();
        let proc_load: Vec<f64> = text
            .split_whitespace()
            .take(3)
            .map(|v| v.parse().unwrap())
            .collect();
        for (name, expected) in ["load1", "load5", "load15"].iter().zip(&proc_load) {
            let m = find(&o, name);
            // The kernel updates these every 5 seconds: allow for one update in between.
            assert!(
                m.value >= 0.0 && (m.value - expected).abs() < 0.5 + expected * 0.2,
                "{name}: {} vs {expected}",
                m.value
            );
        }
        let cpus = find(&o, "cpus").value;
        assert_eq!(cpus, online_cpus() as f64);
        assert!(cpus >= 1.0);
        let per_cpu = find(&o, "load1_per_cpu").value;
        assert!((per_cpu - find(&o, "load1").value / cpus).abs() < 0.01);
        assert_eq!(find(&o, "load1").warn.as_deref(), Some("1000"));

        let o = probes.run(&Probe::Load(thresholds(Some(-1.0), None))).await;
        assert_eq!(o.status, Status::Warning, "{o:?}");
    }

    #[test]
    fn runs_can_move_between_threads() {
        fn send_and_sync<T: Send + Sync>(_: &T) {}
        fn send<T: Send>(_: T) {}
        let probes = SystemProbes::new();
        send_and_sync(&probes);
        send(probes.run(&Probe::Cpu(Thresholds::default())));
    }

    #[tokio::test]
    async fn other_probes_are_not_mine() {
        let probes = SystemProbes::new();
        let o = probes
            .run(&Probe::Nagios(outpost_protocol::probe::Command {
                command: vec!["true".into()],
            }))
            .await;
        assert_eq!(o.status, Status::Unknown);
    }
}
