//! How long the real agent takes to deliver a backlog to the real gateway after a restart:
//! enroll an agent that runs no checks, stop it, fill its outbox with the backlog through
//! [`DiskOutbox`] (as if it had been cut off from its gateway), start it again and time
//! until the gateway's bus holds every result.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use outpost_agent::outbox::{DiskOutbox, Outbox};
use outpost_agent::Settings;

use super::sample_result;
use crate::bus::Bus;
use crate::harness::{Agent, Bins, Gateway};
use crate::{now_ms, progress, raw, sample};

/// Backlog check names start with this (`backlog-000` …).
const PREFIX: &str = "backlog-";
/// Give up when nothing new reaches the bus for this long, or after [`LIMIT`] in all.
const STALL: Duration = Duration::from_secs(60);
const LIMIT: Duration = Duration::from_secs(900);
/// How often the bus file is read: the drain's times are this coarse (the report says
/// 10 ms).
const POLL: Duration = Duration::from_millis(10);

/// What a drain run saw.
pub struct Drain {
    pub results: u64,
    /// The agent's outbox bound (`outbox_max_mb`, its default here), in bytes.
    pub max_bytes: u64,
    /// Appending the whole backlog and one flush, from opening the outbox to closing it.
    pub prefill_secs: f64,
    pub prefill_commits: u64,
    /// What the bound counts per result (JSON plus an 8-byte key), from `DiskOutbox::bytes`.
    pub bytes_per_result: f64,
    /// The size of `outbox.redb` once filled.
    pub file_bytes: u64,
    /// Whether the agent stopped on SIGTERM before the refill (else it was killed).
    pub stopped_cleanly: bool,
    /// From starting the agent again to the first and to the last backlog result on the bus.
    pub first_secs: f64,
    pub last_secs: f64,
    /// Bus lines of backlog results beyond one per result (resends).
    pub duplicates: usize,
    /// CPU seconds of the agent (since it started) and the gateway (since the agent
    /// started) until the last result.
    pub agent_cpu_secs: f64,
    pub gateway_cpu_secs: f64,
    /// CPU seconds of this tool meanwhile: reading and parsing the bus file.
    pub own_cpu_secs: f64,
    pub other_cpu_pct: f64,
    /// The restarted agent's warnings and errors.
    pub problems: Vec<String>,
}

impl Drain {
    pub fn per_sec(&self) -> f64 {
        self.results as f64 / self.last_secs.max(1e-9)
    }

    /// The rate once results flow: from the first to the last on the bus.
    pub fn flowing_per_sec(&self) -> f64 {
        self.results as f64 / (self.last_secs - self.first_secs).max(1e-9)
    }
}

/// The outbox bound the agent uses when `outbox_max_mb` is not set, from its own settings
/// parser (the configuration needs nothing but a gateway).
pub fn default_max_bytes() -> Result<u64> {
    Settings::from_toml("gateway_url = \"wss://127.0.0.1:1\"\n", &BTreeMap::new())
        .map(|s| s.outbox_max_bytes)
        .map_err(|e| anyhow!("cannot read the agent's default settings: {e}"))
}

/// Deliver `rounds` runs of `checks` checks at `interval_ms`, under `dir`; returns the
/// drain and the competing CPU seen during it.
pub fn measure(
    bins: &Bins,
    dir: &Path,
    checks: usize,
    rounds: u64,
    interval_ms: u64,
) -> Result<(Drain, f64)> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let results = checks as u64 * rounds;
    let mut gw = Gateway::start(bins, dir).context("cannot start the gateway")?;
    let mut agent = Agent::start(bins, dir, &gw, &[], None).context("cannot start the agent")?;
    agent
        .proc
        .wait_for_log("connected to gateway", Duration::from_secs(60))
        .context("the agent did not enroll")?;
    let stopped_cleanly = agent.proc.stop(Duration::from_secs(10));
    let config = agent.config().to_path_buf();
    let text = std::fs::read_to_string(&config)
        .with_context(|| format!("cannot read {}", config.display()))?;
    let max_bytes = Settings::from_toml(&text, &BTreeMap::new())
        .map_err(|e| anyhow!("cannot read {}: {e}", config.display()))?
        .outbox_max_bytes;

    progress(format!(
        "outbox: filling the stopped agent's outbox with {results} results ({checks} checks × {rounds} runs)"
    ));
    let filled = Instant::now();
    let (outbox, moved) = DiskOutbox::open(&agent.state_dir, max_bytes)
        .context("cannot open the stopped agent's outbox")?;
    if let Some(why) = moved {
        bail!("the agent's outbox was moved aside: {why}");
    }
    if !outbox.is_empty() {
        bail!(
            "the agent's outbox already holds {} results; it should run no checks",
            outbox.len()
        );
    }
    let names: Vec<String> = (0..checks).map(|c| format!("{PREFIX}{c:03}")).collect();
    let first_ms = now_ms().saturating_sub(rounds * interval_ms);
    // Spread each round's checks over the interval, as the agent's splay does.
    let step = interval_ms / checks.max(1) as u64;
    for round in 0..rounds {
        for (c, name) in names.iter().enumerate() {
            let at = first_ms + round * interval_ms + c as u64 * step;
            outbox
                .append(sample_result(name, at, round))
                .context("cannot fill the outbox")?;
        }
    }
    outbox.flush().context("cannot fill the outbox")?;
    let (held, bytes, dropped, prefill_commits) = (
        outbox.len() as u64,
        outbox.bytes(),
        outbox.dropped(),
        outbox.commits(),
    );
    let file = outbox.path().to_path_buf();
    drop(outbox);
    let prefill_secs = filled.elapsed().as_secs_f64();
    if held != results || dropped > 0 {
        bail!(
            "the outbox holds {held} of {results} results and dropped {dropped}: the backlog does not fit its bound of {max_bytes} bytes"
        );
    }
    let file_bytes = std::fs::metadata(&file)
        .with_context(|| format!("cannot read {}", file.display()))?
        .len();
    progress(format!(
        "outbox: filled in {prefill_secs:.1} s ({prefill_commits} commits, {:.0} bytes per result); restarting the agent",
        bytes as f64 / results as f64
    ));

    let mut bus = Bus::new(gw.bus_dir(), &agent.fingerprint);
    bus.poll()?;
    let g0 = sample::read(gw.proc.pid())?;
    let (own0, _, _) = raw::cpu_secs();
    let started = Instant::now();
    agent.restart(bins, &dir.join("agent-restarted.log"))?;
    let mut seen: HashSet<(String, u64)> = HashSet::new();
    let (mut lines, mut first, mut last_growth) = (0usize, None, Instant::now());
    let mut checked = bus.results.len();
    loop {
        if bus.poll()? > 0 {
            last_growth = Instant::now();
            for r in &bus.results[checked..] {
                if r.check.starts_with(PREFIX) {
                    lines += 1;
                    seen.insert((r.check.clone(), r.started_at_ms));
                    first.get_or_insert_with(|| started.elapsed());
                }
            }
            checked = bus.results.len();
        }
        if seen.len() as u64 >= results {
            break;
        }
        agent.proc.ensure_running()?;
        gw.proc.ensure_running()?;
        if last_growth.elapsed() >= STALL || started.elapsed() >= LIMIT {
            bail!(
                "the bus holds {} of {results} backlog results after {:.0} s (nothing new for {:.0} s); the agent's log ends with:\n{}",
                seen.len(),
                started.elapsed().as_secs_f64(),
                last_growth.elapsed().as_secs_f64(),
                agent.proc.log_tail(10)
            );
        }
        std::thread::sleep(POLL);
    }
    let last_secs = started.elapsed().as_secs_f64();
    let (a1, g1) = (
        sample::read(agent.proc.pid())?,
        sample::read(gw.proc.pid())?,
    );
    let (own1, _, _) = raw::cpu_secs();
    let tck = sample::clock_ticks_per_sec();
    let agent_cpu_secs = a1.own_ticks as f64 / tck;
    let gateway_cpu_secs = g1.own_ticks.saturating_sub(g0.own_ticks) as f64 / tck;
    let machine = g1.machine_busy_ticks.saturating_sub(g0.machine_busy_ticks) as f64 / tck;
    let own_cpu_secs = own1 - own0;
    let other =
        ((machine - agent_cpu_secs - gateway_cpu_secs - own_cpu_secs) / last_secs * 100.0).max(0.0);
    let problems = agent.proc.problems();
    let drain = Drain {
        results,
        max_bytes,
        prefill_secs,
        prefill_commits,
        bytes_per_result: bytes as f64 / results as f64,
        file_bytes,
        stopped_cleanly,
        first_secs: first.unwrap_or_default().as_secs_f64(),
        last_secs,
        duplicates: lines - seen.len(),
        agent_cpu_secs,
        gateway_cpu_secs,
        own_cpu_secs,
        other_cpu_pct: other,
        problems,
    };
    progress(format!(
        "outbox: {results} results on the bus {last_secs:.1} s after the restart ({:.0}/s; first after {:.2} s)",
        drain.per_sec(),
        drain.first_secs
    ));
    Ok((drain, other))
}
