//! Part 14: StatsD. Packets per second into the agent's StatsD listener, with the agent's
//! CPU and RSS, next to the reference StatsD daemon (Etsy's, the `statsd` package from
//! npm, run by node) fed the same packets in the same run, at a few offered rates and as
//! fast as this tool's sender goes.
//!
//! Each window sends a known mix (counters, sampled counters, timers, gauge deltas, sets,
//! DogStatsD-tagged counters), one line a datagram, over UDP on loopback. What each
//! receiver counted is read back from what it flushed (every second): the agent's results
//! of the check `statsd` on the gateway's bus, the daemon's flushes through a small
//! backend of this tool's that writes each flush's counters to a file. Half of the lines
//! are plain counters of 1 (`hits` and `tagged`), so their sum over the window's flushes
//! is how many of those lines the receiver took: the rest were lost (UDP on loopback
//! drops what a receiver's socket buffer cannot hold).

use std::fmt::Write as _;
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use outpost_gateway::bus::segments::{read_lines, Position};
use outpost_protocol::CheckResult;

use crate::fleet::nats::free_port;
use crate::harness::{spawn_logged, Agent, Bins, Gateway, Proc};
use crate::sample::Series;
use crate::{progress, Plan};

/// How long the receivers are given to flush a window's last lines.
const SETTLE: Duration = Duration::from_secs(3);

/// The `i`th line of window `w`; whether it is one of the counted counters.
fn line(w: usize, i: u64) -> (String, bool) {
    let k = i % 50;
    match i % 10 {
        0..=3 => (format!("bench.w{w}.hits.{k}:1|c"), true),
        4 => (format!("bench.w{w}.sampled.{k}:1|c|@0.5"), false),
        5 | 6 => (format!("bench.w{w}.latency.{k}:{}|ms", i % 1000), false),
        7 => (format!("bench.w{w}.level.{k}:+1|g"), false),
        8 => (format!("bench.w{w}.users.{k}:{}|s", i % 5000), false),
        _ => (
            format!("bench.w{w}.tagged:1|c|#env:prod,az:{}", i % 3),
            true,
        ),
    }
}

/// Whether a flushed counter's name is one of window `w`'s counted ones (the agent also
/// flushes `name.rate`, the daemon writes tags into the key).
fn counted(w: usize, name: &str) -> bool {
    let base = name.split(';').next().unwrap_or_default();
    (base.starts_with(&format!("bench.w{w}.hits.")) || base == format!("bench.w{w}.tagged"))
        && !base.ends_with(".rate")
}

struct Sent {
    packets: u64,
    counted: u64,
    took: Duration,
}

/// Send window `w`'s lines to `port` for `secs`, at `rate` a second (0: as fast as the
/// socket takes them), from a thread of its own.
fn send(port: u16, w: usize, rate: u64, secs: Duration) -> Result<Sent> {
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    sock.connect(("127.0.0.1", port))?;
    // The lines, made before the clock starts (a cycle of 10,000).
    let lines: Vec<(Vec<u8>, bool)> = (0..10_000)
        .map(|i| {
            let (l, c) = line(w, i);
            (l.into_bytes(), c)
        })
        .collect();
    let t0 = Instant::now();
    let (mut packets, mut counted) = (0u64, 0u64);
    loop {
        let elapsed = t0.elapsed();
        if elapsed >= secs {
            break;
        }
        let due = if rate == 0 {
            packets + 1000
        } else {
            (elapsed.as_secs_f64() * rate as f64) as u64
        };
        if packets >= due {
            std::thread::sleep(Duration::from_micros(500));
            continue;
        }
        while packets < due {
            let (l, c) = &lines[(packets % lines.len() as u64) as usize];
            sock.send(l)
                .with_context(|| format!("cannot send to 127.0.0.1:{port}"))?;
            packets += 1;
            counted += u64::from(*c);
        }
    }
    Ok(Sent {
        packets,
        counted,
        took: t0.elapsed(),
    })
}

/// A receiver under test.
trait Receiver {
    fn name(&self) -> String;
    fn port(&self) -> u16;
    fn pid(&self) -> u32;
    /// The sum of window `w`'s counted counters over everything flushed so far.
    fn counted(&mut self, w: usize) -> Result<u64>;
}

/// The agent, connected to a gateway on the embedded bus, with `[statsd]` on.
struct AgentReceiver {
    agent: Agent,
    gw: Gateway,
    port: u16,
}

impl Receiver for AgentReceiver {
    fn name(&self) -> String {
        "Outpost agent (`[statsd]`, flush 1 s)".into()
    }
    fn port(&self) -> u16 {
        self.port
    }
    fn pid(&self) -> u32 {
        self.agent.proc.pid()
    }
    fn counted(&mut self, w: usize) -> Result<u64> {
        let bus = self.gw.bus_dir();
        let mut at = Position::START;
        let mut sum = 0.0;
        loop {
            let lines = read_lines(&bus, "results", at, 8 << 20, None)?;
            if lines.lines.is_empty() {
                break;
            }
            for (_, l) in &lines.lines {
                #[derive(serde::Deserialize)]
                struct Line {
                    result: CheckResult,
                }
                let Ok(l) = serde_json::from_slice::<Line>(l) else {
                    continue;
                };
                if l.result.check != "statsd" {
                    continue;
                }
                sum += l
                    .result
                    .metrics
                    .iter()
                    .filter(|m| counted(w, &m.name))
                    .map(|m| m.value)
                    .sum::<f64>();
            }
            at = lines.next;
        }
        Ok(sum as u64)
    }
}

/// Etsy's StatsD daemon under node, flushing every second to this tool's backend.
struct Daemon {
    proc: Proc,
    port: u16,
    flushes: PathBuf,
    version: String,
}

/// The backend: each flush's counters, one JSON line.
const BACKEND: &str = r#"const fs = require('fs');
exports.init = function (startup, config, events) {
  events.on('flush', function (ts, metrics) {
    fs.appendFileSync(config.benchFlushes, JSON.stringify(metrics.counters) + '\n');
  });
  return true;
};
"#;

impl Daemon {
    fn start(stats_js: &Path, dir: &Path) -> Result<Daemon> {
        std::fs::create_dir_all(dir)?;
        let backend = dir.join("bench-backend.js");
        std::fs::write(&backend, BACKEND)?;
        let flushes = dir.join("flushes.jsonl");
        let (port, mgmt) = (free_port()?, free_port()?);
        let config = dir.join("config.js");
        std::fs::write(
            &config,
            format!(
                "{{ port: {port}, address: \"127.0.0.1\", mgmt_port: {mgmt}, mgmt_address: \"127.0.0.1\", \
                 flushInterval: 1000, percentThreshold: [90, 95, 99], \
                 deleteCounters: true, deleteTimers: true, deleteSets: true, deleteGauges: false, backends: [{:?}], benchFlushes: {:?} }}\n",
                backend.display().to_string(),
                flushes.display().to_string()
            ),
        )?;
        let package = stats_js.with_file_name("package.json");
        let version = std::fs::read_to_string(&package)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["version"].as_str().map(str::to_string))
            .unwrap_or_else(|| "?".into());
        let mut cmd = Command::new("node");
        cmd.arg(stats_js).arg(&config);
        let mut proc = spawn_logged("statsd", cmd, &dir.join("statsd.log"))?;
        // Ready once it flushed (an empty flush comes a second after the start).
        let deadline = Instant::now() + Duration::from_secs(30);
        while !flushes.exists() {
            proc.ensure_running()?;
            if Instant::now() > deadline {
                bail!("statsd did not flush within 30 s:\n{}", proc.log_tail(20));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Daemon {
            proc,
            port,
            flushes,
            version,
        })
    }
}

impl Receiver for Daemon {
    fn name(&self) -> String {
        format!(
            "StatsD {} (npm, node {}), flush 1 s",
            self.version,
            node_version()
        )
    }
    fn port(&self) -> u16 {
        self.port
    }
    fn pid(&self) -> u32 {
        self.proc.pid()
    }
    fn counted(&mut self, w: usize) -> Result<u64> {
        let text = std::fs::read_to_string(&self.flushes)?;
        let mut sum = 0.0;
        for l in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(l)
            else {
                continue;
            };
            sum += v
                .iter()
                .filter(|(k, _)| counted(w, k))
                .filter_map(|(_, v)| v.as_f64())
                .sum::<f64>();
        }
        Ok(sum as u64)
    }
}

fn node_version() -> String {
    Command::new("node")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Where Etsy's `stats.js` is: `OUTPOST_BENCH_STATSD`, else where ci/bench installs it.
fn find_daemon() -> Result<PathBuf> {
    let p = std::env::var_os("OUTPOST_BENCH_STATSD")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/bench-tools/node_modules/statsd/stats.js"));
    if p.is_file() {
        Ok(p)
    } else {
        bail!(
            "no StatsD daemon at {} (ci/bench installs it: npm install --prefix target/bench-tools statsd@0.9.0; or set OUTPOST_BENCH_STATSD)",
            p.display()
        )
    }
}

struct Row {
    receiver: String,
    offered: u64,
    sent: Sent,
    taken: u64,
    cpu: f64,
    rss_max_kib: u64,
    other_cpu: f64,
}

/// One window into `r`: send, let it flush, count.
fn window(r: &mut dyn Receiver, w: usize, rate: u64, secs: Duration) -> Result<Row> {
    let before = r.counted(w)?;
    let mut usage = Series::start(r.pid())?;
    let port = r.port();
    let sender = std::thread::spawn(move || send(port, w, rate, secs));
    let mut readings = [&mut usage];
    crate::sample::sample_for(secs, &mut readings)?;
    let sent = sender
        .join()
        .map_err(|_| anyhow::anyhow!("the sender panicked"))??;
    usage.take()?;
    // Every flush of the window counted: wait until the count stops moving.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = r.counted(w)?;
    loop {
        std::thread::sleep(SETTLE);
        let now = r.counted(w)?;
        if now == last && now > before {
            break;
        }
        if Instant::now() > deadline {
            if now == before {
                bail!("{} flushed none of the window's lines in 60 s", r.name());
            }
            bail!(
                "{}'s count of the window still moved after 60 s ({last}, then {now})",
                r.name()
            );
        }
        last = now;
    }
    let u = usage.usage()?;
    let mine = u.cpu_pct;
    Ok(Row {
        receiver: r.name(),
        offered: rate,
        taken: last - before,
        cpu: mine,
        rss_max_kib: u.rss_max_kib,
        other_cpu: (u.machine_pct - mine).max(0.0),
        sent,
    })
}

pub fn statsd(bins: &Bins, work: &Path, plan: &Plan) -> Result<(String, Vec<String>)> {
    let dir = work.join("statsd");
    let stats_js = find_daemon()?;
    let (rates, secs): (Vec<u64>, _) = if plan.quick {
        (vec![20_000], Duration::from_secs(3))
    } else {
        (vec![10_000, 50_000, 100_000, 0], Duration::from_secs(10))
    };
    let gw = Gateway::start(bins, &dir.join("gateway"))?;
    let port = free_port()?;
    let agent = Agent::start_with_settings(
        bins,
        &dir.join("agent"),
        &gw,
        &[],
        None,
        &format!(
            "[statsd]\nlisten = \"127.0.0.1:{port}\"\nflush_secs = 1\nmax_names = 100000\npercentiles = [90, 95, 99]\n"
        ),
    )?;
    let mut agent = AgentReceiver { agent, gw, port };
    let mut daemon = Daemon::start(&stats_js, &dir.join("daemon"))?;
    // Both idle a moment (the agent connects, the daemon has flushed).
    std::thread::sleep(Duration::from_secs(3));
    let mut rows = Vec::new();
    let mut w = 0;
    for &rate in &rates {
        let receivers: [&mut dyn Receiver; 2] = [&mut agent, &mut daemon];
        for r in receivers {
            crate::wait_for_quiet(plan.quiet_wait)?;
            progress(format!(
                "statsd: {} at {}",
                r.name(),
                if rate == 0 {
                    "full speed".to_string()
                } else {
                    format!("{rate}/s")
                }
            ));
            rows.push(window(r, w, rate, secs)?);
            w += 1;
        }
    }
    agent.agent.proc.stop(Duration::from_secs(10));
    agent.gw.proc.stop(Duration::from_secs(10));
    daemon.proc.stop(Duration::from_secs(5));

    let mut out = String::new();
    let _ = writeln!(
        out,
        "Datagrams of one StatsD line each over UDP on loopback, {} s a window, from a \
         thread of this tool at an offered rate or as fast as it sends; a mix of counters \
         (`hits`, 40%), sampled counters (`@0.5`, 10%), timers (20%), gauge deltas (10%), \
         sets (10%) and DogStatsD-tagged counters (10%) over 50 names each. Taken: the \
         `hits` and `tagged` lines the receiver counted (the sum of its flushed counters) \
         of those sent, so the packets it took per second are the sent rate times that \
         share. CPU: the receiver's, % of one core over the window; RSS: its highest \
         VmRSS in the window. The agent's figures include sending each flush (one result \
         a second) to its gateway; the daemon, like the agent, forgets a counter, timer \
         or set not seen in an interval (`deleteCounters`, `deleteTimers`, \
         `deleteSets`). Other CPU: the rest of the machine (this tool's sender, mostly, \
         and for the agent its gateway taking the results).\n",
        secs.as_secs()
    );
    out.push_str(
        "| receiver | offered/s | sent/s | counted lines taken | **packets/s taken** | CPU | RSS | other CPU |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut goals = Vec::new();
    for r in &rows {
        let sent_rate = r.sent.packets as f64 / r.sent.took.as_secs_f64();
        let share = r.taken as f64 / r.sent.counted.max(1) as f64;
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {:.2}% | **{:.0}** | {:.0}% | {} | {:.0}% |",
            r.receiver,
            if r.offered == 0 {
                "as fast as sent".to_string()
            } else {
                r.offered.to_string()
            },
            sent_rate,
            share * 100.0,
            sent_rate * share,
            r.cpu,
            crate::mb(r.rss_max_kib),
            r.other_cpu
        );
        if r.taken > r.sent.counted {
            goals.push(format!(
                "StatsD: {} counted {} lines of {} sent: more than sent.",
                r.receiver, r.taken, r.sent.counted
            ));
        }
    }
    out.push('\n');
    Ok((out, goals))
}
