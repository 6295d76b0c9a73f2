//! The process probe: how many processes have a name, and their memory and CPU.

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::Instant;

use outpost_protocol::probe::ProcessProbe;
use outpost_protocol::{Metric, Status};
use sysinfo::{
    Pid, ProcessRefreshKind, ProcessStatus, ProcessesToUpdate, System, MINIMUM_CPU_UPDATE_INTERVAL,
};

use super::Shared;
use super::{blocking, bytes_metric, headline, human_bytes, lock, metric, system_in, Outcome};

/// The kernel keeps this many bytes of a process name.
const COMM_LEN: usize = 15;

/// Most matching processes listed one per line in the long output.
const LISTED: usize = 20;

/// What the process probe keeps between runs: its own [`System`], because refreshing
/// processes' CPU also moves the global CPU sample the cpu probe depends on.
#[derive(Default)]
pub(super) struct State {
    sys: Option<System>,
    /// When every process was last listed.
    listed_at: Option<Instant>,
}

/// Names and CPU times of every process (not threads): what finding a name needs, and
/// CPU usage comes with the times read anyway. Memory is read for the matches only.
fn list_kind() -> ProcessRefreshKind {
    ProcessRefreshKind::nothing().without_tasks().with_cpu()
}

/// List every process unless that was done less than [`MINIMUM_CPU_UPDATE_INTERVAL`] ago
/// (CPU usage over a shorter window is noise; the list is fresh enough).
fn list(state: &mut State) -> Result<(), String> {
    let fresh = state
        .listed_at
        .is_some_and(|t| t.elapsed() < MINIMUM_CPU_UPDATE_INTERVAL);
    if !fresh {
        let sys = system_in(&mut state.sys)?;
        sys.refresh_processes_specifics(ProcessesToUpdate::All, true, list_kind());
        state.listed_at = Some(Instant::now());
    }
    Ok(())
}

pub(super) async fn run(shared: Arc<Shared>, probe: ProcessProbe) -> Outcome {
    // The first listing only sets the CPU baseline.
    let first = shared.clone();
    let sampled = super::baseline("process", move || {
        let mut state = lock(&first.procs);
        let first = state.listed_at.is_none();
        if first {
            list(&mut state)?;
        }
        Ok(first)
    });
    if let Err(o) = sampled.await {
        return o;
    }
    blocking("process", move || {
        let mut state = lock(&shared.procs);
        if let Err(why) = list(&mut state) {
            return Outcome::unknown(why);
        }
        let sys = match system_in(&mut state.sys) {
            Ok(sys) => sys,
            Err(why) => return Outcome::unknown(why),
        };
        report(sys, &probe)
    })
    .await
}

struct Match {
    pid: Pid,
    rss: u64,
    cpu: f64,
}

fn report(sys: &mut System, probe: &ProcessProbe) -> Outcome {
    let name = OsStr::new(&probe.name);
    let mut zombies = 0usize;
    let mut pids = Vec::new();
    for p in sys.processes_by_exact_name(name) {
        if matches!(p.status(), ProcessStatus::Zombie | ProcessStatus::Dead) {
            zombies += 1;
        } else {
            pids.push(p.pid());
        }
    }
    // Memory for the matches only; one that exits meanwhile is dropped from the list.
    sys.refresh_processes_specifics(
        ProcessesToUpdate::Some(&pids),
        true,
        ProcessRefreshKind::nothing().without_tasks().with_memory(),
    );
    let mut matches: Vec<Match> = pids
        .iter()
        .filter_map(|pid| sys.process(*pid))
        .map(|p| Match {
            pid: p.pid(),
            rss: p.memory(),
            cpu: f64::from(p.cpu_usage()),
        })
        .collect();
    matches.sort_by_key(|m| m.pid);

    let count = matches.len();
    let rss: u64 = matches.iter().map(|m| m.rss).sum();
    let cpu: f64 = matches.iter().map(|m| m.cpu).sum();
    let min = u64::from(probe.min);
    let status = if (count as u64) < min {
        Status::Critical
    } else if probe.max.is_some_and(|max| count as u64 > u64::from(max)) {
        Status::Warning
    } else {
        Status::Ok
    };
    let noun = if count == 1 { "process" } else { "processes" };
    let mut text = format!("{count} {noun} named {}", probe.name);
    if status == Status::Critical {
        text.push_str(&format!(" (at least {min} expected)"));
    } else if status == Status::Warning {
        text.push_str(&format!(
            " (at most {} expected)",
            probe.max.unwrap_or_default()
        ));
    }
    if count > 0 {
        text.push_str(&format!(", RSS {}, CPU {cpu:.1}%", human_bytes(rss)));
    }
    let mut o = Outcome::new(status, headline("PROCS", status, &text));
    if count == 0 && probe.name.len() > COMM_LEN {
        o.note(format!(
            "the kernel keeps only the first {COMM_LEN} bytes of a process name: \
             a name longer than that never matches"
        ));
    }
    if zombies > 0 {
        o.note(format!("{zombies} zombie process(es) not counted"));
    }
    for m in matches.iter().take(LISTED) {
        o.note(format!(
            "pid {}: RSS {}, CPU {:.1}%",
            m.pid,
            human_bytes(m.rss),
            m.cpu
        ));
    }
    if count > LISTED {
        o.note(format!("[{} more]", count - LISTED));
    }
    o.metrics.push(Metric {
        warn: probe.max.map(|max| max.to_string()),
        crit: (probe.min > 0).then(|| format!("{}:", probe.min)),
        min: Some(0.0),
        ..metric("procs", count as f64, None)
    });
    o.metrics.push(bytes_metric("procs_rss", rss, None));
    o.metrics.push(Metric {
        min: Some(0.0),
        ..metric("procs_cpu", (cpu * 100.0).round() / 100.0, Some("%"))
    });
    o
}

#[cfg(test)]
mod tests {
    use super::super::tests::find;
    use super::super::SystemProbes;
    use super::*;
    use outpost_protocol::probe::Probe;

    fn procs(name: &str, min: u32, max: Option<u32>) -> Probe {
        Probe::Process(ProcessProbe {
            name: name.into(),
            min,
            max,
        })
    }

    /// This test process's name, as the kernel reports it.
    fn my_name() -> String {
        std::fs::read_to_string("/proc/self/comm")
            .unwrap()
            .trim_end_matches('\n')
            .to_string()
    }

    /// Resident memory of this process, from /proc/self/statm.
    fn my_rss() -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        // SAFETY: sysconf only reads a system value.
        pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64
    }

    #[tokio::test]
    async fn finds_this_test_process_by_name() {
        let probes = SystemProbes::new();
        let name = my_name();
        let o = probes.run(&procs(&name, 1, None)).await;
        assert_eq!(o.status, Status::Ok, "{o:?}");
        assert!(o.output.starts_with("PROCS OK - "), "{}", o.output);
        assert!(o.output.contains(&format!("named {name}")), "{}", o.output);
        let count = find(&o, "procs");
        assert!(count.value >= 1.0, "{count:?}");
        assert_eq!(count.crit.as_deref(), Some("1:"));
        assert_eq!(count.warn, None);
        let mine = format!("pid {}:", std::process::id());
        assert!(o.long_output.contains(&mine), "{}", o.long_output);
        let rss = find(&o, "procs_rss");
        assert_eq!(rss.unit.as_deref(), Some("B"));
        // At least this process's own resident memory, read around the same time.
        assert!(
            rss.value >= my_rss() as f64 / 2.0,
            "{rss:?} vs {}",
            my_rss()
        );
        let cpu = find(&o, "procs_cpu");
        assert!(cpu.value >= 0.0, "{cpu:?}");

        // Burn some CPU, then the next run sees it.
        let started = Instant::now();
        let mut x = 0u64;
        while started.elapsed() < MINIMUM_CPU_UPDATE_INTERVAL * 2 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let o = probes.run(&procs(&name, 1, Some(0))).await;
        assert_eq!(o.status, Status::Warning, "{o:?}");
        assert!(o.output.contains("(at most 0 expected)"), "{}", o.output);
        assert_eq!(find(&o, "procs").warn.as_deref(), Some("0"));
        let cpu = find(&o, "procs_cpu").value;
        assert!(cpu > 10.0, "busy loop not seen: {cpu}%");
    }

    #[tokio::test]
    async fn a_name_nobody_has_is_critical() {
        let o = SystemProbes::new()
            .run(&procs("no-such-proc-x", 1, None))
            .await;
        assert_eq!(o.status, Status::Critical, "{o:?}");
        assert_eq!(
            o.output,
            "PROCS CRITICAL - 0 processes named no-such-proc-x (at least 1 expected)"
        );
        assert_eq!(find(&o, "procs").value, 0.0);
        assert_eq!(find(&o, "procs_rss").value, 0.0);

        // Allowed to be absent: OK.
        let o = SystemProbes::new()
            .run(&procs("no-such-proc-x", 0, None))
            .await;
        assert_eq!(o.status, Status::Ok, "{o:?}");
        assert_eq!(find(&o, "procs").crit, None);

        let o = SystemProbes::new()
            .run(&procs("a-name-longer-than-15-bytes", 1, None))
            .await;
        assert_eq!(o.status, Status::Critical, "{o:?}");
        assert!(
            o.long_output.contains("first 15 bytes"),
            "{}",
            o.long_output
        );
    }

    #[tokio::test]
    async fn prefixes_do_not_match() {
        let name = my_name();
        let prefix = &name[..name.len() - 1];
        let o = SystemProbes::new().run(&procs(prefix, 0, None)).await;
        assert!(
            !o.long_output
                .contains(&format!("pid {}:", std::process::id())),
            "{}",
            o.long_output
        );
    }
}
