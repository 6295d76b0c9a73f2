//! Idle agents held by one gateway, and its memory per connection, next to the same
//! number of idle NATS clients held by nats-server's TLS websocket listener.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::loadgen::{self, Behaviour, Fleet};
use super::{kb, nats, FleetPlan};
use crate::harness::{Bins, Gateway};
use crate::sample::{self, sample_for, Series, Usage};
use crate::{mb, progress};

/// A reading taken while ramping up.
struct Checkpoint {
    connections: u64,
    server_rss_kib: u64,
    own_rss_kib: u64,
    at: Duration,
}

/// One server's ramp and hold.
struct Ramp {
    server: &'static str,
    wanted: usize,
    before_kib: u64,
    own_before_kib: u64,
    checkpoints: Vec<Checkpoint>,
    /// After the hold.
    after_kib: u64,
    own_after_kib: u64,
    reached: u64,
    ramp: Duration,
    ramp_cpu_pct: f64,
    hold: Usage,
    failures: u64,
    first_error: Option<String>,
}

impl Ramp {
    fn per_connection(&self) -> f64 {
        (self.after_kib.saturating_sub(self.before_kib)) as f64 * 1024.0
            / self.reached.max(1) as f64
    }

    fn own_per_connection(&self) -> f64 {
        (self.own_after_kib.saturating_sub(self.own_before_kib)) as f64 * 1024.0
            / self.reached.max(1) as f64
    }
}

/// How a ramp reads its clients: connections open now, failures, the first error.
type Probe = Box<dyn Fn() -> (u64, u64, Option<String>)>;

/// Start the clients with `start`, ramp to `n` connections, reading `pid`'s RSS at each
/// quarter; stop early if nothing new connects for 60 s. Then hold for `hold`.
fn ramp(
    server: &'static str,
    pid: u32,
    n: usize,
    hold: Duration,
    start: &mut dyn FnMut() -> Result<Probe>,
) -> Result<Ramp> {
    let me = std::process::id();
    std::thread::sleep(Duration::from_secs(2));
    let before = sample::read(pid)?;
    let own_before = sample::read(me)?;
    let t0 = Instant::now();
    let probe = start()?;
    let online = || probe().0;
    let mut checkpoints = Vec::new();
    let marks: Vec<u64> = (1..=4).map(|q| (n * q / 4) as u64).collect();
    let (mut last, mut last_change) = (0u64, Instant::now());
    for &mark in &marks {
        loop {
            let now = online();
            if now != last {
                last = now;
                last_change = Instant::now();
            }
            if now >= mark || last_change.elapsed() > Duration::from_secs(60) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let reached = online();
        checkpoints.push(Checkpoint {
            connections: reached,
            server_rss_kib: sample::read(pid)?.rss_kib,
            own_rss_kib: sample::read(me)?.rss_kib,
            at: t0.elapsed(),
        });
        if reached < mark {
            break;
        }
    }
    let ramp_time = t0.elapsed();
    let after_ramp = sample::read(pid)?;
    let tck = sample::clock_ticks_per_sec();
    let ramp_cpu_pct =
        (after_ramp.own_ticks - before.own_ticks) as f64 / tck / ramp_time.as_secs_f64().max(1e-3)
            * 100.0;
    let mut series = Series::start(pid)?;
    sample_for(hold, &mut [&mut series])?;
    let hold_usage = series.usage()?;
    let (_, fails, first_error) = probe();
    Ok(Ramp {
        server,
        wanted: n,
        before_kib: before.rss_kib,
        own_before_kib: own_before.rss_kib,
        checkpoints,
        after_kib: hold_usage.rss_end_kib,
        own_after_kib: sample::read(me)?.rss_kib,
        reached: online(),
        ramp: ramp_time,
        ramp_cpu_pct,
        hold: hold_usage,
        failures: fails,
        first_error,
    })
}

fn gateway_ramp(
    bins: &Bins,
    dir: &Path,
    rt: &tokio::runtime::Handle,
    n: usize,
    fp: &FleetPlan,
) -> Result<Ramp> {
    progress(format!(
        "fleet idle: {n} agents with secrets on one gateway"
    ));
    let (ids, creds) = super::agents_with_secrets(n);
    super::prepare_gateway_dir(dir, Some(&creds), None)?;
    drop(creds);
    let mut gw = Gateway::start(bins, dir)?;
    let behaviour = Behaviour {
        addrs: vec![super::gateway_addr(&gw)?],
        pin: gw.pin.clone(),
        batch: 0,
        pace: None,
        redial: false,
        redial_jitter: Duration::ZERO,
        dial_concurrency: fp.dial_concurrency,
        groups: Vec::new(),
        features: Vec::new(),
    };
    let mut fleet: Option<Fleet> = None;
    let mut ids = Some(ids);
    let r = ramp(
        "outpost-gateway",
        gw.proc.pid(),
        n,
        fp.idle_hold,
        &mut || {
            let f = Fleet::start(rt, ids.take().unwrap_or_default(), 0, behaviour.clone())?;
            let stats = f.stats.clone();
            fleet = Some(f);
            Ok(Box::new(move || {
                (
                    stats.online(),
                    stats.failures.load(Ordering::Relaxed),
                    stats.first_error(),
                )
            }))
        },
    );
    gw.proc.ensure_running()?;
    gw.proc.kill_now();
    if let Some(f) = fleet {
        f.stop(rt, Duration::from_secs(10));
    }
    r
}

fn nats_ramp(
    bin: &Path,
    dir: &Path,
    rt: &tokio::runtime::Handle,
    n: usize,
    fp: &FleetPlan,
) -> Result<Ramp> {
    progress(format!(
        "fleet idle: {n} NATS clients on nats-server's TLS websocket"
    ));
    let mut server = nats::Server::start(bin, dir, true)?;
    let Some((ws_port, pin)) = server.ws.clone() else {
        bail!("nats-server started without its websocket listener");
    };
    let dst = std::net::SocketAddr::from(([127, 0, 0, 1], ws_port));
    let ids: Vec<loadgen::Identity> = super::agents_enrolling(n, "");
    let mut fleet = None;
    let r = ramp(
        "nats-server",
        server.proc.pid(),
        n,
        fp.idle_hold,
        &mut || {
            let f = nats::WsFleet::start(rt, dst, &pin, &ids, fp.dial_concurrency)?;
            let stats = f.stats.clone();
            fleet = Some(f);
            Ok(Box::new(move || {
                (
                    stats.connected.load(Ordering::Relaxed),
                    stats.failures.load(Ordering::Relaxed),
                    stats.first_error(),
                )
            }))
        },
    );
    server.proc.ensure_running()?;
    server.proc.kill_now();
    if let Some(f) = fleet {
        f.stop(rt);
    }
    r
}

/// Part: idle agents and memory per connection.
pub fn idle(bins: &Bins, work: &Path, plan: &crate::Plan) -> Result<(String, Vec<String>)> {
    let fp = &plan.fleet;
    let budget = super::fd_budget();
    let n = fp.idle_agents.min(budget);
    let rt = loadgen::runtime()?;
    let dir = work.join("fleet-idle");
    let mut rows = Vec::new();
    let mut failed = String::new();
    match gateway_ramp(bins, &dir.join("gateway"), rt.handle(), n, fp) {
        Ok(r) => rows.push(r),
        Err(e) => {
            let _ = writeln!(failed, "- outpost-gateway: **failed:** {e:#}");
        }
    }
    let nats_bin = nats::find_server(fp.nats_server.as_deref());
    match nats_bin.and_then(|b| nats_ramp(&b, &dir.join("nats"), rt.handle(), n, fp)) {
        Ok(r) => rows.push(r),
        Err(e) => {
            let _ = writeln!(failed, "- nats-server: **failed:** {e:#}");
        }
    }
    rt.shutdown_timeout(Duration::from_secs(5));

    let mut out = format!(
        "Idle agents, each one TLS websocket from this tool's load generator (many loopback \
source addresses, at most {} dials in progress at once), held by one release gateway \
(embedded bus; the agents log in with secrets pre-written to its `credentials.json`), \
then the same number of idle NATS clients on nats-server's TLS websocket listener (each \
sends `CONNECT`, subscribes to its run-now subject and answers pings). RSS is read before \
the first connection and after a {} s hold with every connection open; per connection = \
the difference / connections.\n\n",
        fp.dial_concurrency,
        fp.idle_hold.as_secs()
    );
    if n < fp.idle_agents {
        let _ = writeln!(
            out,
            "**Capped at {n} connections, not {}:** the file-descriptor hard limit here is {} \
(`ulimit -Hn`; no CAP_SYS_RESOURCE to raise it), and each server holds one descriptor per \
connection (as does this tool). Memory per connection is the figure that carries over; \
{} × it is the estimate for {} agents.\n",
            fp.idle_agents,
            budget + 500,
            fp.idle_agents,
            fp.idle_agents
        );
    }
    out.push_str(
        "| server | connections | RSS before | RSS after | **per connection** | ramp-up | connections/s | server CPU while ramping | server CPU idle (pings) | this tool per connection (client side) | failed dials |\n\
|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in &rows {
        let _ = writeln!(
            out,
            "| {} | {} of {} | {} | {} | **{}** | {:.1} s | {:.0} | {:.0}% | {:.1}% | {} | {} |",
            r.server,
            r.reached,
            r.wanted,
            mb(r.before_kib),
            mb(r.after_kib),
            kb(r.per_connection()),
            r.ramp.as_secs_f64(),
            r.reached as f64 / r.ramp.as_secs_f64().max(1e-3),
            r.ramp_cpu_pct,
            r.hold.cpu_pct,
            // The second ramp reuses memory this tool freed after the first: only the
            // first shows the client side's cost.
            if std::ptr::eq(r, &rows[0]) {
                kb(r.own_per_connection())
            } else {
                "—".into()
            },
            r.failures,
        );
    }
    out.push_str("\nRSS while ramping up (the slope between readings is the cost of one more connection):\n\n| server | connections | after | server RSS | this tool's RSS |\n|---|---|---|---|---|\n");
    for r in &rows {
        for c in &r.checkpoints {
            let _ = writeln!(
                out,
                "| {} | {} | {:.1} s | {} | {} |",
                r.server,
                c.connections,
                c.at.as_secs_f64(),
                mb(c.server_rss_kib),
                mb(c.own_rss_kib)
            );
        }
    }
    out.push('\n');
    for r in &rows {
        if let Some(e) = &r.first_error {
            let _ = writeln!(
                out,
                "- {}: {} dials or sessions failed; first: `{}`",
                r.server,
                r.failures,
                e.chars().take(200).collect::<String>()
            );
        }
    }
    out.push_str(&failed);
    out.push('\n');
    let mut goals = Vec::new();
    if let Some(g) = rows.iter().find(|r| r.server == "outpost-gateway") {
        let per = g.per_connection();
        goals.push(format!(
            "Idle agents: one gateway held {} connections at {} each (goal: 50,000 agents under 20 KB each: **{}**{}){}.",
            g.reached,
            kb(per),
            if per < 20e3 { "met per connection" } else { "missed" },
            if per < 20e3 {
                String::new()
            } else {
                format!(" by {}", kb(per - 20e3))
            },
            match rows.iter().find(|r| r.server == "nats-server") {
                Some(n) => format!("; nats-server's websocket listener: {} each", kb(n.per_connection())),
                None => String::new(),
            }
        ));
    }
    Ok((out, goals))
}
