//! `outpost-bench`: how the real agent behaves under load on this machine, measured end to
//! end (agent → gateway → embedded bus) with the release binaries:
//!
//! 1. exec throughput: far more `/bin/true` checks at 1 s than can run, next to the raw
//!    rate of spawning the same program with the same concurrency in the same run;
//! 2. scheduling jitter at 1,000 and 10,000 configured checks: how late each run starts
//!    against its grid slot;
//! 3. the agent's RSS and CPU with 10, 100 and 1,000 checks;
//! 4. the disk outbox: durable appends per second next to a raw `write` + `fdatasync` loop
//!    on the same filesystem, and the time the agent takes to deliver an hour of backlog
//!    (100 checks at 10 s) to the gateway after a restart;
//! 5. the fleet (issue 5, [`fleet`]): simulated agents from this tool's load generator —
//!    idle agents and memory per connection next to nats-server's websocket listener,
//!    acked results per second through a gateway on NATS JetStream next to raw JetStream
//!    publishing, run-now latency across two gateways, one tenant's latency while another
//!    floods at ten times its result rate, and a reconnect storm;
//! 6. alerting ([`fleet`]): from a failing result to a local webhook receiver's 2xx with
//!    10,000 simulated agents, on one gateway and on a NATS fleet, and notifications per
//!    second to one receiver next to Prometheus Alertmanager fed the same alerts.
//!
//! Checks reach the agent through its own `checks.d` (10,000 checks exceed the gateway's
//! 1 MiB config frame; local check files have no such limit). Results are counted on the
//! gateway's bus file by their `started_at_ms`. The report is Markdown on stdout; progress
//! goes to stderr. `ci/bench` builds the release binaries, runs this and writes
//! `docs/BENCHMARKS.md`. This is a measuring tool, not a test: nothing here asserts a time.

mod bus;
mod export;
mod fleet;
mod harness;
mod outbox;
mod placement;
mod raw;
mod sample;
mod statsd;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context, Result};
use clap::{Parser, ValueEnum};

use bus::{Bus, Rec};
use harness::{Agent, Bins, Gateway};
use sample::{sample_for, Series, Usage};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
enum Part {
    Throughput,
    Jitter,
    Resources,
    Outbox,
    /// Idle agents on one gateway, memory per connection (and nats-server's).
    FleetIdle,
    /// Acked results per second through a gateway on NATS, next to raw JetStream.
    FleetResults,
    /// Run-now latency across two gateways.
    FleetRpc,
    /// One tenant's ack and run-now latency while another floods at 10x its result rate.
    FleetTenants,
    /// Reconnect storm: a gateway killed, its agents back on another.
    FleetStorm,
    /// Alerting: result to webhook latency (one gateway, NATS fleet), notifications/s next
    /// to Prometheus Alertmanager.
    FleetAlerting,
    /// History of one check: a day of it among many agents' results, both buses.
    FleetHistory,
    /// Event stream clients under a steady result rate, next to JetStream consumers.
    FleetStream,
    /// Metric export: samples/s by remote-write to Prometheus, next to a raw client.
    Export,
    /// StatsD packets/s into the agent, next to Etsy's StatsD daemon (npm).
    Statsd,
    /// Checks about entities: placing 10,000 on 20 agents, rebalancing when 5 leave, and
    /// a real agent's lateness running placed checks next to its own.
    Placement,
}

#[derive(Parser)]
#[command(
    name = "outpost-bench",
    about = "Benchmark the release agent and gateway: exec throughput, scheduling jitter, RSS and CPU, the disk outbox, a fleet of simulated agents"
)]
struct Cli {
    /// Directory holding outpost-gateway and outpost-agent (default: this executable's).
    #[arg(long, env = "OUTPOST_BENCH_BIN_DIR")]
    bin_dir: Option<PathBuf>,
    /// Where to put the gateways' and agents' files (default: a temporary directory,
    /// removed at the end unless --keep).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Keep the temporary directory (logs, bus files) for a post-mortem.
    #[arg(long)]
    keep: bool,
    /// A much shorter run (a few seconds per part), for smoke-testing; its figures are
    /// not representative.
    #[arg(long)]
    quick: bool,
    /// Run only these parts (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Part>,
    /// The program every exec check runs.
    #[arg(long, default_value = "/bin/true")]
    program: String,
    /// max_concurrent_checks values for the throughput part (default 32,8; quick 32).
    #[arg(long, value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Number of 1 s checks in the throughput part (default: 1.5 times the best raw rate,
    /// at least 3,000, so that there is always more work than can be done; at most 10,000).
    #[arg(long)]
    throughput_checks: Option<usize>,
    /// Seconds of each raw spawning baseline (default 8; quick 2).
    #[arg(long)]
    raw_secs: Option<u64>,
    /// Seconds the agent runs before the throughput window (default 5; quick 2).
    #[arg(long)]
    warmup_secs: Option<u64>,
    /// Seconds of the throughput window (default 20; quick 4).
    #[arg(long)]
    window_secs: Option<u64>,
    /// Seconds of the 1,000-check jitter run at 10 s (default 35; quick 14).
    #[arg(long)]
    jitter_1k_secs: Option<u64>,
    /// Seconds of the 10,000-check jitter run (default 135; quick 14).
    #[arg(long)]
    jitter_10k_secs: Option<u64>,
    /// Interval of the 10,000-check jitter run, in seconds (default 60; quick 10).
    #[arg(long)]
    jitter_10k_interval: Option<u64>,
    /// Seconds each resource run goes before it is measured (default 25: a 10 s check's
    /// first run comes within 10 s and its second, on the grid, within 15 s more; quick 3).
    #[arg(long)]
    resource_warmup_secs: Option<u64>,
    /// Seconds each resource run is measured (default 30; quick 4).
    #[arg(long)]
    resource_secs: Option<u64>,
    /// Before each measurement, wait up to this long for the machine to be quiet (other
    /// work under 20% of a core; default 180; quick 0).
    #[arg(long)]
    quiet_wait_secs: Option<u64>,
    /// Measure a row again (at most this many times) when other work competed with it
    /// (default 2; quick 0).
    #[arg(long)]
    retries: Option<usize>,
    /// Seconds of each durable-append rate in the outbox part (default 5; quick 1).
    #[arg(long)]
    outbox_secs: Option<u64>,
    /// Producer threads of the concurrent outbox rate (default 32).
    #[arg(long, default_value_t = 32)]
    outbox_producers: usize,
    /// Minutes of backlog (100 checks at 10 s) the agent drains in the outbox part
    /// (default 60; quick 6).
    #[arg(long)]
    backlog_minutes: Option<u64>,
    /// Idle agents the fleet-idle part ramps to (default 50,000; quick 2,000), capped by
    /// the file-descriptor limit.
    #[arg(long)]
    fleet_idle_agents: Option<usize>,
    /// The nats-server program for the fleet parts (default: the first on PATH).
    #[arg(long, env = "OUTPOST_NATS_SERVER")]
    nats_server: Option<PathBuf>,
    /// Prometheus Alertmanager for the alerting part's baseline (default:
    /// `prometheus-alertmanager`, Debian's name, or `alertmanager` on PATH).
    #[arg(long, env = "OUTPOST_ALERTMANAGER")]
    alertmanager: Option<PathBuf>,
}

/// The resolved parameters of this run.
struct Plan {
    quick: bool,
    program: String,
    concurrency: Vec<usize>,
    throughput_checks: Option<usize>,
    raw: Duration,
    warmup: Duration,
    window: Duration,
    /// (checks, interval s, run s)
    jitter: Vec<(usize, u64, u64)>,
    resource_sizes: Vec<usize>,
    resource_warmup: Duration,
    resource_window: Duration,
    quiet_wait: Duration,
    retries: usize,
    outbox_secs: Duration,
    outbox_producers: usize,
    backlog_minutes: u64,
    fleet: fleet::FleetPlan,
}

impl Plan {
    fn of(cli: &Cli) -> Plan {
        let q = cli.quick;
        let pick =
            |v: Option<u64>, full: u64, quick: u64| v.unwrap_or(if q { quick } else { full });
        let concurrency = if !cli.concurrency.is_empty() {
            cli.concurrency.clone()
        } else if q {
            vec![32]
        } else {
            vec![32, 8]
        };
        Plan {
            quick: q,
            program: cli.program.clone(),
            concurrency,
            throughput_checks: cli.throughput_checks,
            raw: Duration::from_secs(pick(cli.raw_secs, 8, 2)),
            warmup: Duration::from_secs(pick(cli.warmup_secs, 5, 2)),
            window: Duration::from_secs(pick(cli.window_secs, 20, 4)),
            jitter: vec![
                (1000, 10, pick(cli.jitter_1k_secs, 35, 14)),
                (
                    10_000,
                    pick(cli.jitter_10k_interval, 60, 10),
                    pick(cli.jitter_10k_secs, 135, 14),
                ),
            ],
            resource_sizes: vec![10, 100, 1000],
            resource_warmup: Duration::from_secs(pick(cli.resource_warmup_secs, 25, 3)),
            resource_window: Duration::from_secs(pick(cli.resource_secs, 30, 4)),
            quiet_wait: Duration::from_secs(pick(cli.quiet_wait_secs, 180, 0)),
            retries: cli.retries.unwrap_or(if q { 0 } else { 2 }),
            outbox_secs: Duration::from_secs(pick(cli.outbox_secs, 5, 1).max(1)),
            outbox_producers: cli.outbox_producers.max(1),
            backlog_minutes: pick(cli.backlog_minutes, 60, 6).max(1),
            fleet: fleet::FleetPlan::new(
                q,
                cli.fleet_idle_agents,
                cli.nats_server.clone(),
                cli.alertmanager.clone(),
            ),
        }
    }
}

/// The most local checks an agent runs (`outpost_protocol::MAX_CHECKS`).
const MAX_CHECKS: usize = 10_000;
/// The RSS goal at 100 checks, in bytes (decimal megabytes).
const RSS_GOAL_BYTES: f64 = 15e6;
/// The throughput goal: the agent's rate over the raw rate.
const THROUGHPUT_GOAL: f64 = 0.80;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn progress(msg: impl std::fmt::Display) {
    eprintln!("[outpost-bench] {msg}");
}

fn mb(kib: u64) -> String {
    format!("{:.1} MB", kib as f64 * 1024.0 / 1e6)
}

fn exec_check(name: &str, program: &str, interval_secs: u64) -> String {
    format!("[[check]]\nname = {name:?}\ncommand = [{program:?}]\ninterval = {interval_secs}\n")
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!("outpost-bench: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

/// Run the selected parts; false if any of them failed (the report says which and why).
fn run() -> Result<bool> {
    let cli = Cli::parse();
    let bin_dir = match &cli.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()
            .context("cannot find this executable")?
            .parent()
            .map(Path::to_path_buf)
            .ok_or_else(|| anyhow!("this executable has no directory"))?,
    };
    let bins = Bins::new(bin_dir)?;
    if bins.dir.components().any(|c| c.as_os_str() == "debug") {
        progress(format!(
            "warning: {} looks like a debug build; the figures will not be representative",
            bins.dir.display()
        ));
    }
    let plan = Plan::of(&cli);
    // The fleet parts hold one descriptor per connection, here and in the gateways.
    fleet::raise_nofile();
    let temp = match &cli.work_dir {
        Some(_) => None,
        None => Some(
            tempfile::Builder::new()
                .prefix("outpost-bench-")
                .disable_cleanup(cli.keep)
                .tempdir()
                .context("cannot create a temporary directory")?,
        ),
    };
    let work = match (&cli.work_dir, &temp) {
        (Some(d), _) => d.clone(),
        (None, Some(t)) => t.path().to_path_buf(),
        (None, None) => unreachable!("a temporary directory is made when no --work-dir is given"),
    };
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    progress(format!(
        "binaries from {}, files under {}",
        bins.dir.display(),
        work.display()
    ));

    let parts = if cli.only.is_empty() {
        vec![
            Part::Throughput,
            Part::Jitter,
            Part::Resources,
            Part::Outbox,
            Part::FleetIdle,
            Part::FleetResults,
            Part::FleetRpc,
            Part::FleetTenants,
            Part::FleetStorm,
            Part::FleetAlerting,
            Part::FleetHistory,
            Part::FleetStream,
            Part::Export,
            Part::Statsd,
            Part::Placement,
        ]
    } else {
        let mut p = cli.only.clone();
        p.sort();
        p.dedup();
        p
    };
    let mut report = String::new();
    let mut goals = Vec::new();
    let mut ok = true;
    if cli.quick {
        report.push_str(
            "**Quick run (`--quick`): a smoke test; these figures are not representative.**\n\n",
        );
    }
    for part in parts {
        let (title, outcome) = match part {
            Part::Throughput => ("1. Exec throughput", throughput(&bins, &work, &plan)),
            Part::Jitter => ("2. Scheduling jitter", jitter(&bins, &work, &plan)),
            Part::Resources => ("3. Agent RSS and CPU", resources(&bins, &work, &plan)),
            Part::Outbox => ("4. Outbox", outbox::outbox(&bins, &work, &plan)),
            Part::FleetIdle => (
                "5. Fleet: idle agents and memory per connection",
                fleet::idle(&bins, &work, &plan),
            ),
            Part::FleetResults => (
                "6. Fleet: results per second through NATS JetStream",
                fleet::results(&bins, &work, &plan),
            ),
            Part::FleetRpc => (
                "7. Fleet: run-now latency across two gateways",
                fleet::rpc(&bins, &work, &plan),
            ),
            Part::FleetTenants => (
                "8. Fleet: one tenant over its result rate next to another",
                fleet::tenants(&bins, &work, &plan),
            ),
            Part::FleetStorm => (
                "9. Fleet: reconnect storm",
                fleet::storm(&bins, &work, &plan),
            ),
            Part::FleetAlerting => (
                "10. Fleet: alerting latency and notifications per second",
                fleet::alerting(&bins, &work, &plan),
            ),
            Part::FleetHistory => (
                "11. Fleet: history of one check among 10,000 agents' results",
                fleet::history(&bins, &work, &plan),
            ),
            Part::FleetStream => (
                "12. Fleet: 100 event stream clients at 10,000 results per second",
                fleet::stream(&bins, &work, &plan),
            ),
            Part::Export => (
                "13. Metric export: samples per second by remote-write",
                export::export(&bins, &work, &plan),
            ),
            Part::Statsd => (
                "14. StatsD: packets per second into the agent",
                statsd::statsd(&bins, &work, &plan),
            ),
            Part::Placement => (
                "15. Checks about entities: placement and lateness",
                placement::placement(&bins, &work, &plan),
            ),
        };
        let _ = writeln!(report, "### {title}\n");
        match outcome {
            Ok((text, g)) => {
                report.push_str(&text);
                goals.extend(g);
            }
            Err(e) => {
                ok = false;
                progress(format!("{title} failed: {e:#}"));
                let _ = writeln!(report, "**This part failed:** {e:#}\n");
            }
        }
    }
    if !goals.is_empty() {
        report.push_str("### Goals\n\n");
        for g in &goals {
            let _ = writeln!(report, "- {g}");
        }
        report.push('\n');
    }
    report.push_str(&caveats(&plan));
    print!("{report}");
    if cli.keep || cli.work_dir.is_some() {
        progress(format!("kept {}", work.display()));
    }
    Ok(ok)
}

fn caveats(plan: &Plan) -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!(
        "### How it was measured\n\n\
- Every figure but the outbox's append rates comes from the release binaries running for \
real: a gateway on loopback (embedded bus, fsync before each ack) and one agent connected \
to it over TLS (the append rates drive the agent's `DiskOutbox` from this tool); checks are \
given to the agent in its own `checks.d` (several files of at most 1,000 checks). A result \
counts once it is durable on the gateway's bus (`bus/results.jsonl` and its sealed segments), by its \
`started_at_ms`.\n\
- The gateway, the agent, the programs it runs and this tool share the machine's {cores} \
cores. The raw baselines run with nothing else going on, so the agent/raw ratio also \
charges the agent for the gateway's share of the CPU (see the gateway CPU column).\n\
- Raw baselines spawn `{program}` with the agent's spawn settings (own process group, \
stdin closed, stdout and stderr piped and read to the end, cleared environment, the group \
killed after the exit), `C` at a time: (a) `tokio::process` on a two-worker runtime like \
the agent's, (b) `std::process` from `C` threads, each just before and just after the \
agent's run. The agent/raw ratio uses the better method, as the mean of before and after.\n\
- CPU is utime+stime from `/proc/PID/stat` over the window, in % of one core; the agent's \
own figure excludes its children (the checks), which are shown apart. RSS is `VmRSS` \
sampled once a second; `VmHWM` is the peak since the process started (it includes the \
start-up and the first-run burst). MB = 10^6 bytes.\n\
- \"Other CPU on the machine\" is the machine's busy time (`/proc/stat`) minus what the \
measured processes used: other work competing for the cores (on a shared machine, a build \
or test run). Each row waits (up to {wait} s) for a quiet machine first and is measured \
again (up to {retries} times) when other work exceeded {busy:.0}% of a core meanwhile; a \
row where it still did is flagged.\n\
- Lateness is `(started_at_ms - phase) mod interval` with `phase = splay_ms(fingerprint, \
check, interval)` (the agent's own function); each check's first result is left out (the \
first run is spread over the first 10 s instead of on the grid). `started_at_ms` is taken \
once the run has a concurrency slot, so waiting for a slot counts as lateness.\n\
- The fleet parts (5 to 10) drive the release gateway with this tool's simulated agents (one \
task and one TLS websocket each, from loopback source addresses 127.0.0.2 to 127.0.0.251) and \
start nats-server (and part 10 Prometheus Alertmanager) themselves; their CPU columns are the \
processes' own. They do not wait for a quiet machine, except parts 8 (tenants) and 10 \
(alerting), which compare latencies between rows or with a baseline: they wait, and are \
measured again when other work competed with a row, as above.\n\
- Durations: raw baselines {raw} s each, throughput window {window} s after a {warmup} s \
warm-up, resource runs {rw} s after a {rwarm} s warm-up, outbox rates {ob} s each, a \
{backlog}-minute outbox backlog.\n\n",
        program = plan.program,
        busy = BUSY_MACHINE_PCT,
        wait = plan.quiet_wait.as_secs(),
        retries = plan.retries,
        raw = plan.raw.as_secs(),
        window = plan.window.as_secs(),
        warmup = plan.warmup.as_secs(),
        rw = plan.resource_window.as_secs(),
        rwarm = plan.resource_warmup.as_secs(),
        ob = plan.outbox_secs.as_secs(),
        backlog = plan.backlog_minutes,
    )
}

/// A gateway and an agent running `checks`, started under `dir`.
struct Rig {
    gw: Gateway,
    agent: Agent,
}

impl Rig {
    fn start(
        bins: &Bins,
        dir: &Path,
        checks: impl FnOnce(&Gateway) -> Result<Vec<String>>,
        max_concurrent: Option<usize>,
    ) -> Result<Rig> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let gw = Gateway::start(bins, dir).context("cannot start the gateway")?;
        let checks = checks(&gw)?;
        let agent = Agent::start(bins, dir, &gw, &checks, max_concurrent)
            .context("cannot start the agent")?;
        Ok(Rig { gw, agent })
    }

    fn ensure_running(&mut self) -> Result<()> {
        self.gw.proc.ensure_running()?;
        self.agent.proc.ensure_running()
    }

    /// Wait for every result started before `until_ms` to reach the bus, stop both
    /// processes, and return the bus and the agent's warnings and errors.
    fn finish(mut self, until_ms: u64) -> Result<(Bus, Vec<String>)> {
        self.ensure_running()?;
        let mut bus = Bus::new(self.gw.bus_dir(), &self.agent.fingerprint);
        let caught_up = bus.drain(until_ms, Duration::from_secs(3), Duration::from_secs(90))?;
        if !caught_up {
            progress("warning: the bus did not catch up within 90 s; counting what arrived");
        }
        self.agent.proc.stop(Duration::from_secs(10));
        self.gw.proc.stop(Duration::from_secs(10));
        bus.poll()?;
        if bus.unparsed > 0 {
            progress(format!(
                "warning: {} bus lines were not results",
                bus.unparsed
            ));
        }
        Ok((bus, self.agent.proc.problems()))
    }
}

/// CPU the machine spent during `agent`'s window on anything but the agent, its checks
/// and the `others` measured (the gateway), in % of one core: competing work.
fn other_pct(agent: &Usage, others: &[&Usage]) -> f64 {
    let known =
        agent.cpu_pct + agent.children_cpu_pct + others.iter().map(|u| u.cpu_pct).sum::<f64>();
    (agent.machine_pct - known).max(0.0)
}

/// Above this much competing CPU (% of one core) a row's figures are flagged.
const BUSY_MACHINE_PCT: f64 = 20.0;

/// Flag a row measured while other work competed for the cores; `affected` says which
/// of its figures that can skew.
fn busy_note(notes: &mut String, what: &str, other: f64, affected: &str) {
    if other > BUSY_MACHINE_PCT {
        let _ = writeln!(
            notes,
            "- {what}: other work used {other:.0}% of a core while it was measured; {affected}."
        );
    }
}

fn problems_note(problems: &[String]) -> String {
    if problems.is_empty() {
        return String::new();
    }
    format!(
        " (the agent logged {} warning(s)/error(s); first: `{}`)",
        problems.len(),
        problems[0].chars().take(200).collect::<String>()
    )
}

/// Wait until the machine has been quiet (other work under [`BUSY_MACHINE_PCT`] of a
/// core over 3 s) or `max` has passed. Nothing of this tool runs meanwhile.
fn wait_for_quiet(max: Duration) -> Result<()> {
    if max.is_zero() {
        return Ok(());
    }
    let start = std::time::Instant::now();
    let tck = sample::clock_ticks_per_sec();
    let mut said = false;
    loop {
        let (t0, b0) = (std::time::Instant::now(), sample::machine_busy_ticks()?);
        std::thread::sleep(Duration::from_secs(3));
        let busy =
            (sample::machine_busy_ticks()? - b0) as f64 / tck / t0.elapsed().as_secs_f64() * 100.0;
        if busy < BUSY_MACHINE_PCT {
            return Ok(());
        }
        if start.elapsed() >= max {
            progress(format!(
                "the machine is still busy ({busy:.0}% of a core) after {} s; measuring anyway",
                max.as_secs()
            ));
            return Ok(());
        }
        if !said {
            progress(format!(
                "other work is using {busy:.0}% of a core; waiting up to {} s for it to stop",
                max.as_secs()
            ));
            said = true;
        }
    }
}

/// Measure one row: wait for a quiet machine, run `measure` (given a suffix for its
/// directory), and measure again, up to `plan.retries` times, while other work competed
/// with it (its second value, in % of one core, is over [`BUSY_MACHINE_PCT`]).
fn measured<T>(
    plan: &Plan,
    label: &str,
    mut measure: impl FnMut(&str) -> Result<(T, f64)>,
) -> Result<T> {
    let mut attempt = 0;
    loop {
        wait_for_quiet(plan.quiet_wait)?;
        let suffix = if attempt == 0 {
            String::new()
        } else {
            format!("-again{attempt}")
        };
        let (row, other) = measure(&suffix)?;
        if other <= BUSY_MACHINE_PCT || attempt >= plan.retries {
            return Ok(row);
        }
        attempt += 1;
        progress(format!(
            "{label}: other work used {other:.0}% of a core meanwhile; measuring again ({attempt} of {})",
            plan.retries
        ));
    }
}

/// Raw rates measured before and after an agent run.
struct RawPair {
    tokio: (raw::Rate, raw::Rate),
    threads: (raw::Rate, raw::Rate),
}

impl RawPair {
    fn mean(p: &(raw::Rate, raw::Rate), f: impl Fn(&raw::Rate) -> f64) -> f64 {
        (f(&p.0) + f(&p.1)) / 2.0
    }

    /// The better of the two methods, each the mean of before and after.
    fn best(&self) -> f64 {
        Self::mean(&self.tokio, |r| r.per_sec).max(Self::mean(&self.threads, |r| r.per_sec))
    }

    fn failed(&self) -> u64 {
        self.tokio.0.failed + self.tokio.1.failed + self.threads.0.failed + self.threads.1.failed
    }

    /// The most competing CPU seen during any of the four runs.
    fn other_pct(&self) -> f64 {
        [self.tokio.0, self.tokio.1, self.threads.0, self.threads.1]
            .iter()
            .map(|r| r.other_cpu_pct)
            .fold(0.0, f64::max)
    }
}

fn raw_both(plan: &Plan, c: usize, when: &str) -> Result<(raw::Rate, raw::Rate)> {
    progress(format!(
        "throughput C={c}: raw spawning {when}: tokio::process, then {c} threads, {} s each",
        plan.raw.as_secs()
    ));
    let t = raw::tokio_rate(&plan.program, c, plan.raw)?;
    let s = raw::threads_rate(&plan.program, c, plan.raw)?;
    progress(format!(
        "throughput C={c}: raw {when}: tokio {:.0}/s ({} runs), threads {:.0}/s ({} runs)",
        t.per_sec, t.runs, s.per_sec, s.runs
    ));
    Ok((t, s))
}

/// One throughput measurement at concurrency `c`.
struct ThroughputRow {
    c: usize,
    checks: usize,
    raw: RawPair,
    results: usize,
    secs: f64,
    non_ok: usize,
    mean_ms: f64,
    agent: Usage,
    gateway: Usage,
    /// Competing CPU: the most of the agent's window and the raw runs.
    other: f64,
    problems: Vec<String>,
}

impl ThroughputRow {
    fn rate(&self) -> f64 {
        self.results as f64 / self.secs
    }

    fn ratio(&self) -> f64 {
        self.rate() / self.raw.best().max(1e-9)
    }

    /// Microseconds of `pct` (% of one core over the window) per result.
    fn us_per_result(&self, pct: f64) -> f64 {
        pct / 100.0 * self.secs * 1e6 / self.results.max(1) as f64
    }
}

fn throughput_row(
    bins: &Bins,
    work: &Path,
    plan: &Plan,
    c: usize,
    suffix: &str,
) -> Result<(ThroughputRow, f64)> {
    let before = raw_both(plan, c, "before")?;
    let checks = plan
        .throughput_checks
        .unwrap_or_else(|| {
            let best = before.0.per_sec.max(before.1.per_sec);
            ((((best * 1.5) / 500.0).ceil() as usize) * 500).max(3000)
        })
        .clamp(1, MAX_CHECKS);
    progress(format!(
        "throughput C={c}: agent with {checks} checks at 1 s: {} s warm-up, {} s window",
        plan.warmup.as_secs(),
        plan.window.as_secs()
    ));
    let program = plan.program.clone();
    let mut rig = Rig::start(
        bins,
        &work.join(format!("throughput-c{c}{suffix}")),
        |_| {
            Ok((0..checks)
                .map(|i| exec_check(&format!("tp{i:05}"), &program, 1))
                .collect())
        },
        Some(c),
    )?;
    std::thread::sleep(plan.warmup);
    rig.ensure_running()?;
    let mut a = Series::start(rig.agent.proc.pid())?;
    let mut g = Series::start(rig.gw.proc.pid())?;
    let t0 = now_ms();
    sample_for(plan.window, &mut [&mut a, &mut g])?;
    let t1 = now_ms();
    let (agent, gateway) = (a.usage()?, g.usage()?);
    let (bus, problems) = rig.finish(t1 + 2000)?;
    let after = raw_both(plan, c, "after")?;
    let raw = RawPair {
        tokio: (before.0, after.0),
        threads: (before.1, after.1),
    };
    let window: Vec<&Rec> = bus
        .results
        .iter()
        .filter(|r| r.check.starts_with("tp") && (t0..t1).contains(&r.started_at_ms))
        .collect();
    let mean_ms =
        window.iter().map(|r| r.duration_ms as f64).sum::<f64>() / window.len().max(1) as f64;
    let other = other_pct(&agent, &[&gateway]).max(raw.other_pct());
    let row = ThroughputRow {
        c,
        checks,
        results: window.len(),
        secs: (t1 - t0) as f64 / 1000.0,
        non_ok: window.iter().filter(|r| !r.ok).count(),
        mean_ms,
        raw,
        agent,
        gateway,
        other,
        problems,
    };
    progress(format!(
        "throughput C={c}: agent {:.0}/s = {:.0}% of raw {:.0}/s",
        row.rate(),
        row.ratio() * 100.0,
        row.raw.best()
    ));
    Ok((row, other))
}

/// Part 1: the agent's exec rate next to the raw spawn rate, measured before and after.
fn throughput(bins: &Bins, work: &Path, plan: &Plan) -> Result<(String, Vec<String>)> {
    let mut rows = Vec::new();
    for &c in &plan.concurrency {
        rows.push(measured(plan, &format!("throughput C={c}"), |suffix| {
            throughput_row(bins, work, plan, c, suffix)
        })?);
    }
    let mut out = format!(
        "`{}` checks at interval 1 s, many more than can run, with `max_concurrent_checks = C`; \
results counted on the bus by `started_at_ms` inside a {} s window after a {} s warm-up. \
The raw rates are measured just before and just after the agent runs (before / after); \
\"agent / raw\" compares with the better method, each as the mean of before and after.\n\n\
| C | checks | raw (a) tokio::process, runs/s | raw (b) std::process, C threads, runs/s | agent, end to end | agent / raw | other CPU on the machine: raw before / agent / raw after |\n\
|---|---|---|---|---|---|---|\n",
        plan.program,
        plan.window.as_secs(),
        plan.warmup.as_secs()
    );
    for r in &rows {
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} / {:.0} | {:.0} / {:.0} | **{:.0}/s** ({} results) | **{:.0}%** | {:.0}% / {:.0}% / {:.0}% |",
            r.c,
            r.checks,
            r.raw.tokio.0.per_sec,
            r.raw.tokio.1.per_sec,
            r.raw.threads.0.per_sec,
            r.raw.threads.1.per_sec,
            r.rate(),
            r.results,
            r.ratio() * 100.0,
            r.raw.tokio.0.other_cpu_pct.max(r.raw.threads.0.other_cpu_pct),
            other_pct(&r.agent, &[&r.gateway]),
            r.raw.tokio.1.other_cpu_pct.max(r.raw.threads.1.other_cpu_pct),
        );
    }
    out.push_str(
        "\nWhere the time goes, per run: the agent's own CPU (excluding its children) and its \
children's, against the spawning process and its children in raw (a); the agent's \
`duration_ms` against the time from spawn to exit status and output in raw (a). \
Percentages are of one core over the window.\n\n\
| C | agent CPU / check | raw (a) CPU / spawn | checks' CPU / check (agent) | children CPU / spawn (raw a) | agent run time | raw (a) run time | agent CPU | agent's children CPU | gateway CPU | agent RSS (max) | non-OK |\n\
|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut notes = String::new();
    let mut goals = Vec::new();
    for r in &rows {
        let _ = writeln!(
            out,
            "| {} | {:.0} µs | {:.0} µs | {:.0} µs | {:.0} µs | {:.1} ms | {:.1} ms | {:.0}% | {:.0}% | {:.0}% | {} | {} |",
            r.c,
            r.us_per_result(r.agent.cpu_pct),
            RawPair::mean(&r.raw.tokio, raw::Rate::own_us_per_run),
            r.us_per_result(r.agent.children_cpu_pct),
            RawPair::mean(&r.raw.tokio, raw::Rate::children_us_per_run),
            r.mean_ms,
            RawPair::mean(&r.raw.tokio, |x| x.mean_run_ms),
            r.agent.cpu_pct,
            r.agent.children_cpu_pct,
            r.gateway.cpu_pct,
            mb(r.agent.rss_max_kib),
            r.non_ok,
        );
        busy_note(
            &mut notes,
            &format!("C={}", r.c),
            r.other,
            "its rates are suspect",
        );
        if r.raw.failed() > 0 {
            let _ = writeln!(
                notes,
                "- C={}: {} raw runs did not exit 0.",
                r.c,
                r.raw.failed()
            );
        }
        if !r.problems.is_empty() {
            let _ = writeln!(notes, "- C={}:{}", r.c, problems_note(&r.problems));
        }
        let (rate, best, ratio) = (r.rate(), r.raw.best(), r.ratio());
        goals.push(format!(
            "Exec throughput at C={}: the agent ran {rate:.0} checks/s, {:.0}% of the raw {best:.0}/s — goal ≥ {:.0}%: **{}**{}.",
            r.c,
            ratio * 100.0,
            THROUGHPUT_GOAL * 100.0,
            if ratio >= THROUGHPUT_GOAL { "met" } else { "missed" },
            if ratio >= THROUGHPUT_GOAL {
                String::new()
            } else {
                format!(
                    " by {:.0} points ({:.0}/s short)",
                    (THROUGHPUT_GOAL - ratio) * 100.0,
                    THROUGHPUT_GOAL * best - rate
                )
            }
        ));
    }
    let agent_best = rows.iter().max_by(|a, b| a.rate().total_cmp(&b.rate()));
    let raw_best = rows
        .iter()
        .max_by(|a, b| a.raw.best().total_cmp(&b.raw.best()));
    if let (Some(a), Some(r), true) = (agent_best, raw_best, rows.len() > 1) {
        goals.push(format!(
            "The agent's best rate ({:.0}/s at C={}) is {:.0}% of the best raw rate at any concurrency ({:.0}/s at C={}).",
            a.rate(),
            a.c,
            a.rate() / r.raw.best().max(1e-9) * 100.0,
            r.raw.best(),
            r.c
        ));
    }
    out.push('\n');
    if !notes.is_empty() {
        out.push_str(&notes);
        out.push('\n');
    }
    Ok((out, goals))
}

/// Percentile by nearest rank of sorted `v`.
fn percentile(v: &[u64], p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// One jitter measurement.
struct JitterRow {
    checks: usize,
    interval: u64,
    run_secs: u64,
    /// Lateness of every result but each check's first, sorted, in ms.
    late: Vec<u64>,
    checks_measured: usize,
    checks_ran: usize,
    agent: Usage,
    gateway: Usage,
    other: f64,
    problems: Vec<String>,
}

fn jitter_row(
    bins: &Bins,
    work: &Path,
    plan: &Plan,
    (checks, interval, run_secs): (usize, u64, u64),
    suffix: &str,
) -> Result<(JitterRow, f64)> {
    progress(format!(
        "jitter: {checks} checks at {interval} s for {run_secs} s"
    ));
    let program = plan.program.clone();
    let started = std::time::Instant::now();
    let mut rig = Rig::start(
        bins,
        &work.join(format!("jitter-{checks}{suffix}")),
        |_| {
            Ok((0..checks)
                .map(|i| exec_check(&format!("j{i:05}"), &program, interval))
                .collect())
        },
        None,
    )?;
    let mut a = Series::start(rig.agent.proc.pid())?;
    let mut g = Series::start(rig.gw.proc.pid())?;
    sample_for(
        Duration::from_secs(run_secs).saturating_sub(started.elapsed()),
        &mut [&mut a, &mut g],
    )?;
    rig.ensure_running()?;
    let t_end = now_ms();
    let (agent, gateway) = (a.usage()?, g.usage()?);
    let fingerprint = rig.agent.fingerprint.clone();
    let (bus, problems) = rig.finish(t_end + 1000)?;
    let mut by_check: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for r in bus.results.iter().filter(|r| r.check.starts_with('j')) {
        by_check
            .entry(r.check.as_str())
            .or_default()
            .push(r.started_at_ms);
    }
    let interval_ms = interval * 1000;
    let mut late = Vec::new();
    let mut checks_measured = 0;
    for (name, starts) in &mut by_check {
        starts.sort_unstable();
        let phase = outpost_agent::scheduler::splay_ms(&fingerprint, name, interval_ms);
        let before = late.len();
        late.extend(
            starts
                .iter()
                .skip(1)
                .filter(|s| **s < t_end)
                .map(|s| s.saturating_sub(phase) % interval_ms),
        );
        checks_measured += usize::from(late.len() > before);
    }
    late.sort_unstable();
    progress(format!(
        "jitter: {checks} checks: {} results, p50 {} ms, p99 {} ms, max {} ms",
        late.len(),
        percentile(&late, 50.0),
        percentile(&late, 99.0),
        late.last().copied().unwrap_or(0)
    ));
    let other = other_pct(&agent, &[&gateway]);
    let row = JitterRow {
        checks,
        interval,
        run_secs,
        late,
        checks_measured,
        checks_ran: by_check.len(),
        agent,
        gateway,
        other,
        problems,
    };
    Ok((row, other))
}

/// Part 2: how late runs start against their grid slots.
fn jitter(bins: &Bins, work: &Path, plan: &Plan) -> Result<(String, Vec<String>)> {
    let mut out = format!(
        "`{}` checks, the agent's default `max_concurrent_checks` (32). Lateness of every \
result but each check's first, in ms.\n\n\
| checks | interval | run | results measured | checks measured | p50 | p99 | max | mean | > 1 s late | agent RSS (max) | agent CPU | checks' CPU | gateway CPU | other CPU on the machine |\n\
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        plan.program
    );
    let mut notes = String::new();
    for &spec in &plan.jitter {
        let r = measured(plan, &format!("jitter {} checks", spec.0), |suffix| {
            jitter_row(bins, work, plan, spec, suffix)
        })?;
        let mean = if r.late.is_empty() {
            0.0
        } else {
            r.late.iter().sum::<u64>() as f64 / r.late.len() as f64
        };
        let _ = writeln!(
            out,
            "| {} | {} s | {} s | {} | {} of {} (ran at all: {}) | {} | {} | {} | {mean:.1} | {} | {} | {:.1}% | {:.1}% | {:.1}% | {:.0}% |",
            r.checks,
            r.interval,
            r.run_secs,
            r.late.len(),
            r.checks_measured,
            r.checks,
            r.checks_ran,
            percentile(&r.late, 50.0),
            percentile(&r.late, 99.0),
            r.late.last().copied().unwrap_or(0),
            r.late.iter().filter(|l| **l > 1000).count(),
            mb(r.agent.rss_max_kib),
            r.agent.cpu_pct,
            r.agent.children_cpu_pct,
            r.gateway.cpu_pct,
            r.other,
        );
        busy_note(
            &mut notes,
            &format!("{} checks", r.checks),
            r.other,
            "its lateness figures are suspect",
        );
        if !r.problems.is_empty() {
            let _ = writeln!(
                notes,
                "- {} checks:{}",
                r.checks,
                problems_note(&r.problems)
            );
        }
    }
    out.push('\n');
    if !notes.is_empty() {
        out.push_str(&notes);
        out.push('\n');
    }
    Ok((out, Vec::new()))
}

/// The checks of a resource run: the four built-ins first, then `program` with every
/// 25th check a built-in (cpu, memory, load, disk, tcp to the gateway in turn).
fn mix(n: usize, program: &str, gateway_port: u16) -> (Vec<String>, usize) {
    let builtin = |kind: usize, name: &str| -> String {
        let probe = match kind % 5 {
            0 => "memory = {}".to_string(),
            1 => "load = {}".to_string(),
            2 => "disk = {}".to_string(),
            3 => format!("tcp = {{ host = \"127.0.0.1\", port = {gateway_port} }}"),
            _ => "cpu = {}".to_string(),
        };
        format!("[[check]]\nname = {name:?}\n{probe}\ninterval = 10\n")
    };
    let mut checks = Vec::new();
    let mut builtins = 0;
    for i in 0..n {
        let name = format!("r{i:05}");
        if i < 4 {
            checks.push(builtin(i, &name));
            builtins += 1;
        } else if i % 25 == 0 {
            checks.push(builtin(i / 25, &name));
            builtins += 1;
        } else {
            checks.push(exec_check(&name, program, 10));
        }
    }
    (checks, builtins)
}

/// One resource measurement.
struct ResourceRow {
    builtins: usize,
    agent: Usage,
    rate: f64,
    non_ok: usize,
    other: f64,
    problems: Vec<String>,
}

fn resource_row(
    bins: &Bins,
    work: &Path,
    plan: &Plan,
    n: usize,
    suffix: &str,
) -> Result<(ResourceRow, f64)> {
    progress(format!(
        "resources: {n} checks, {} s + {} s",
        plan.resource_warmup.as_secs(),
        plan.resource_window.as_secs()
    ));
    let mut builtins = 0;
    let mut rig = Rig::start(
        bins,
        &work.join(format!("resources-{n}{suffix}")),
        |gw| {
            let (checks, b) = mix(n, &plan.program, gw.port()?);
            builtins = b;
            Ok(checks)
        },
        None,
    )?;
    std::thread::sleep(plan.resource_warmup);
    rig.ensure_running()?;
    let mut a = Series::start(rig.agent.proc.pid())?;
    let mut g = Series::start(rig.gw.proc.pid())?;
    let t0 = now_ms();
    sample_for(plan.resource_window, &mut [&mut a, &mut g])?;
    let t1 = now_ms();
    let (agent, gateway) = (a.usage()?, g.usage()?);
    let (bus, problems) = rig.finish(t1 + 1000)?;
    let ours = |r: &&Rec| r.check.starts_with('r');
    let in_window = bus
        .results
        .iter()
        .filter(ours)
        .filter(|r| (t0..t1).contains(&r.started_at_ms))
        .count();
    let non_ok = bus.results.iter().filter(ours).filter(|r| !r.ok).count();
    progress(format!(
        "resources: {n} checks: RSS {} (max {}), HWM {}, CPU {:.1}%",
        mb(agent.rss_end_kib),
        mb(agent.rss_max_kib),
        mb(agent.hwm_kib),
        agent.cpu_pct
    ));
    let other = other_pct(&agent, &[&gateway]);
    let row = ResourceRow {
        builtins,
        agent,
        rate: in_window as f64 / ((t1 - t0) as f64 / 1000.0),
        non_ok,
        other,
        problems,
    };
    Ok((row, other))
}

/// Part 3: the agent's memory and CPU at 10, 100 and 1,000 checks.
fn resources(bins: &Bins, work: &Path, plan: &Plan) -> Result<(String, Vec<String>)> {
    let mut out = format!(
        "Checks at interval 10 s: mostly `{}`, plus built-in probes (`memory`, `load`, `disk`, \
`tcp` to the gateway's port, `cpu`): the first four checks and every 25th. Default \
`max_concurrent_checks` (32). Measured for {} s after a {} s warm-up (long enough for \
every check to be on its grid).\n\n\
| checks | of which built-in | agent RSS, end | agent RSS, max in window | agent VmHWM (peak since start) | agent CPU, % of one core | agent CPU per result (fixed costs included) | checks' CPU (children) | results/s | other CPU on the machine |\n\
|---|---|---|---|---|---|---|---|---|---|\n",
        plan.program,
        plan.resource_window.as_secs(),
        plan.resource_warmup.as_secs()
    );
    let mut goals = Vec::new();
    let mut notes = String::new();
    for &n in &plan.resource_sizes {
        let r = measured(plan, &format!("resources {n} checks"), |suffix| {
            resource_row(bins, work, plan, n, suffix)
        })?;
        let a = &r.agent;
        let _ = writeln!(
            out,
            "| {n} | {} | {} | {} | {} | {:.2}% | {:.0} µs | {:.2}% | {:.1} | {:.0}% |",
            r.builtins,
            mb(a.rss_end_kib),
            mb(a.rss_max_kib),
            mb(a.hwm_kib),
            a.cpu_pct,
            a.cpu_pct / 100.0 * 1e6 / r.rate.max(1e-9),
            a.children_cpu_pct,
            r.rate,
            r.other,
        );
        busy_note(
            &mut notes,
            &format!("{n} checks"),
            r.other,
            "its CPU figures may be inflated (RSS is not affected)",
        );
        if r.non_ok > 0 {
            let _ = writeln!(
                notes,
                "- {n} checks: {} results were not OK (a probe over its default thresholds on this machine, or a failure).",
                r.non_ok
            );
        }
        if !r.problems.is_empty() {
            let _ = writeln!(notes, "- {n} checks:{}", problems_note(&r.problems));
        }
        if n == 100 {
            let rss = a.rss_max_kib as f64 * 1024.0;
            let hwm = a.hwm_kib as f64 * 1024.0;
            goals.push(format!(
                "RSS at 100 checks: {} at most while measured (peak since start {}) — goal < 15 MB: **{}**{}.",
                mb(a.rss_max_kib),
                mb(a.hwm_kib),
                if rss < RSS_GOAL_BYTES { "met" } else { "missed" },
                if rss < RSS_GOAL_BYTES {
                    if hwm >= RSS_GOAL_BYTES {
                        " in steady state, though the start-up peak is above it".to_string()
                    } else {
                        String::new()
                    }
                } else {
                    format!(" by {:.1} MB", (rss - RSS_GOAL_BYTES) / 1e6)
                }
            ));
        }
    }
    out.push('\n');
    if !notes.is_empty() {
        out.push_str(&notes);
        out.push('\n');
    }
    Ok((out, goals))
}
