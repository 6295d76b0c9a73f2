//! Resident memory and CPU time of a process, from `/proc/PID/status` and `/proc/PID/stat`.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};

/// One reading of a process.
#[derive(Debug, Clone, Copy)]
pub struct Reading {
    pub at: Instant,
    /// VmRSS and VmHWM (peak RSS) in KiB.
    pub rss_kib: u64,
    pub hwm_kib: u64,
    /// utime + stime of the process itself (all its threads), in clock ticks.
    pub own_ticks: u64,
    /// cutime + cstime: children it waited for (the checks it ran), in clock ticks.
    pub child_ticks: u64,
    /// CPU time the whole machine (all cores) spent busy so far, in clock ticks.
    pub machine_busy_ticks: u64,
}

pub fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Busy clock ticks of the whole machine, summed over its cores, from `/proc/stat`:
/// everything but idle and iowait.
pub fn machine_busy_ticks() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat").context("cannot read /proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or_else(|| anyhow!("no cpu line in /proc/stat"))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Ok(total.saturating_sub(idle))
}

pub fn read(pid: u32) -> Result<Reading> {
    let at = Instant::now();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    let kib = |key: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("no {key} in /proc/{pid}/status"))
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may hold spaces: count from after it.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("unexpected /proc/{pid}/stat: {stat}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); utime, stime, cutime, cstime are fields 14 to 17.
    let field = |n: usize| -> Result<u64> {
        fields
            .get(n - 3)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("no field {n} in /proc/{pid}/stat: {stat}"))
    };
    Ok(Reading {
        at,
        rss_kib: kib("VmRSS:")?,
        hwm_kib: kib("VmHWM:")?,
        own_ticks: field(14)? + field(15)?,
        child_ticks: field(16)? + field(17)?,
        machine_busy_ticks: machine_busy_ticks()?,
    })
}

/// What a process did between two readings.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    /// CPU of the process itself, in % of one core.
    pub cpu_pct: f64,
    /// CPU of the children it waited for, in % of one core.
    pub children_cpu_pct: f64,
    /// The whole machine's busy CPU, in % of one core (up to 100 times the cores).
    pub machine_pct: f64,
    pub rss_end_kib: u64,
    /// Highest VmRSS among the readings of the window.
    pub rss_max_kib: u64,
    /// VmHWM at the end: the peak since the process started.
    pub hwm_kib: u64,
}

/// Readings of one process taken through a measuring window.
pub struct Series {
    pid: u32,
    pub readings: Vec<Reading>,
}

impl Series {
    pub fn start(pid: u32) -> Result<Series> {
        Ok(Series {
            pid,
            readings: vec![read(pid)?],
        })
    }

    pub fn take(&mut self) -> Result<()> {
        self.readings.push(read(self.pid)?);
        Ok(())
    }

    pub fn usage(&self) -> Result<Usage> {
        let (Some(first), Some(last)) = (self.readings.first(), self.readings.last()) else {
            return Err(anyhow!("no readings of process {}", self.pid));
        };
        let secs = last.at.duration_since(first.at).as_secs_f64().max(1e-3);
        let tck = clock_ticks_per_sec();
        let pct = |ticks: u64| ticks as f64 / tck / secs * 100.0;
        Ok(Usage {
            cpu_pct: pct(last.own_ticks.saturating_sub(first.own_ticks)),
            children_cpu_pct: pct(last.child_ticks.saturating_sub(first.child_ticks)),
            machine_pct: pct(last
                .machine_busy_ticks
                .saturating_sub(first.machine_busy_ticks)),
            rss_end_kib: last.rss_kib,
            rss_max_kib: self.readings.iter().map(|r| r.rss_kib).max().unwrap_or(0),
            hwm_kib: last.hwm_kib,
        })
    }
}

/// Sleep for `total`, reading every series once a second (and at the end).
pub fn sample_for(total: Duration, series: &mut [&mut Series]) -> Result<()> {
    let end = Instant::now() + total;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        std::thread::sleep(left.min(Duration::from_secs(1)));
        for s in series.iter_mut() {
            s.take()?;
        }
    }
    Ok(())
}
