//! Reconnect storm: N agents on gateway A (told A then B, as agents given an address
//! list are), gateway A killed with SIGKILL, and the time until all N are welcomed by B.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::https::Client;
use super::loadgen::{self, Behaviour, Fleet, Identity};
use super::nats;
use crate::harness::{Bins, Gateway};
use crate::progress;
use crate::sample::Series;

/// The longest a storm is waited for.
const STORM_LIMIT: Duration = Duration::from_secs(300);

struct Storm {
    setup: String,
    agents: usize,
    /// Time from the kill until this share of the agents was welcomed again.
    first: Option<Duration>,
    half: Option<Duration>,
    p99: Option<Duration>,
    all: Option<Duration>,
    back: u64,
    /// Time from the kill until B's API listed every agent online.
    api_all_online: Option<Duration>,
    b_cpu_pct: f64,
    b_rss_kib: u64,
    failures: u64,
    first_error: Option<String>,
}

/// Count `presence == "online"` in B's agent list.
fn online_on(rt: &tokio::runtime::Handle, gw: &Gateway, token: &str) -> Result<usize> {
    let addr = super::gateway_addr(gw)?;
    rt.block_on(async {
        let mut c = Client::connect(addr, &gw.pin, token).await?;
        let a = c.call("GET", "/api/v1/agents").await?;
        if a.status != 200 {
            bail!("GET /api/v1/agents answered {}", a.status);
        }
        let v: serde_json::Value = serde_json::from_slice(&a.body)?;
        Ok(v.as_array()
            .map(|a| a.iter().filter(|x| x["presence"] == "online").count())
            .unwrap_or(0))
    })
}

/// Run one storm: `ids` start on `a`, `a` is killed, they go to `b`.
fn storm_between(
    setup: &str,
    rt: &tokio::runtime::Handle,
    mut a: Gateway,
    mut b: Gateway,
    token: &str,
    ids: Vec<Identity>,
    plan: &super::FleetPlan,
) -> Result<Storm> {
    let n = ids.len();
    progress(format!("fleet storm ({setup}): {n} agents onto gateway A"));
    let fleet = Fleet::start(
        rt,
        ids,
        0,
        Behaviour {
            addrs: vec![super::gateway_addr(&a)?, super::gateway_addr(&b)?],
            pin: a.pin.clone(),
            batch: 0,
            pace: None,
            redial: true,
            // The agent's first backoff step: a random delay up to 500 ms.
            redial_jitter: Duration::from_millis(500),
            dial_concurrency: plan.storm_dial_concurrency,
            groups: Vec::new(),
            features: Vec::new(),
        },
    )?;
    if !fleet.wait_online(n as u64, Duration::from_secs(300)) {
        let why = fleet.stats.first_error().unwrap_or_default();
        let online = fleet.stats.online();
        fleet.stop(rt, Duration::from_secs(5));
        bail!("only {online} of {n} agents came online on A within 300 s: {why}");
    }
    std::thread::sleep(Duration::from_secs(2));
    a.proc.ensure_running()?;
    b.proc.ensure_running()?;
    let failures_before = fleet.stats.failures.load(Ordering::Relaxed);
    let welcomes_before = fleet.stats.welcomes.load(Ordering::Relaxed);
    progress(format!("fleet storm ({setup}): kill -9 gateway A"));
    let mut b_usage = Series::start(b.proc.pid())?;
    let t0 = Instant::now();
    a.proc.kill_now();
    let marks = [
        1u64,
        n.div_ceil(2) as u64,
        (n as u64 * 99).div_ceil(100),
        n as u64,
    ];
    let mut at: [Option<Duration>; 4] = [None; 4];
    let mut back = 0;
    while t0.elapsed() < STORM_LIMIT {
        back = fleet.stats.welcomes.load(Ordering::Relaxed) - welcomes_before;
        for (i, m) in marks.iter().enumerate() {
            if at[i].is_none() && back >= *m {
                at[i] = Some(t0.elapsed());
            }
        }
        if at[3].is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    b_usage.take()?;
    let mut api_all_online = None;
    while t0.elapsed() < STORM_LIMIT + Duration::from_secs(30) {
        match online_on(rt, &b, token) {
            Ok(k) if k >= n => {
                api_all_online = Some(t0.elapsed());
                break;
            }
            Ok(_) => {}
            Err(e) => {
                progress(format!("fleet storm: cannot read B's agents: {e:#}"));
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let storm = Storm {
        setup: setup.to_string(),
        agents: n,
        first: at[0],
        half: at[1],
        p99: at[2],
        all: at[3],
        back,
        api_all_online,
        b_cpu_pct: b_usage.usage()?.cpu_pct,
        b_rss_kib: b_usage.usage()?.rss_end_kib,
        failures: fleet.stats.failures.load(Ordering::Relaxed) - failures_before,
        first_error: fleet.stats.first_error(),
    };
    b.proc.ensure_running()?;
    b.proc.kill_now();
    fleet.stop(rt, Duration::from_secs(5));
    Ok(storm)
}

fn embedded(
    bins: &Bins,
    dir: &Path,
    rt: &tokio::runtime::Handle,
    plan: &super::FleetPlan,
) -> Result<Storm> {
    let n = plan.storm_agents.min(super::fd_budget());
    let (ids, creds) = super::agents_with_secrets(n);
    let (enroll, api) = (super::token(), super::token());
    let tls = super::shared_tls_args(&dir.join("tls"))?;
    let mut gws = Vec::new();
    for name in ["a", "b"] {
        let d = dir.join(name);
        super::prepare_gateway_dir(&d, Some(&creds), Some((&enroll, &api)))?;
        gws.push(Gateway::start_with(bins, &d, &tls)?);
    }
    let b = gws.pop().expect("two gateways");
    let a = gws.pop().expect("two gateways");
    storm_between(
        "two gateways, embedded buses, the same credentials on both",
        rt,
        a,
        b,
        &api,
        ids,
        plan,
    )
}

fn over_nats(
    bins: &Bins,
    dir: &Path,
    rt: &tokio::runtime::Handle,
    plan: &super::FleetPlan,
) -> Result<Storm> {
    let bin = nats::find_server(plan.nats_server.as_deref())?;
    let mut server = nats::Server::start(&bin, &dir.join("nats"), false)?;
    let (enroll, api) = (super::token(), super::token());
    let tls = super::shared_tls_args(&dir.join("tls"))?;
    let url = server.url();
    let a = super::start_nats_gateway(bins, dir, "a", &url, (&enroll, &api), &tls)?;
    let b = super::start_nats_gateway(bins, dir, "b", &url, (&enroll, &api), &tls)?;
    let n = plan.storm_nats_agents.min(super::fd_budget());
    let ids = super::agents_enrolling(n, &enroll);
    let r = storm_between(
        "two gateways on one NATS (agents enrolled through A, secrets shared in KV)",
        rt,
        a,
        b,
        &api,
        ids,
        plan,
    );
    server.proc.stop(Duration::from_secs(5));
    r
}

/// Part: reconnect storm.
pub fn storm(bins: &Bins, work: &Path, plan: &crate::Plan) -> Result<(String, Vec<String>)> {
    let fp = &plan.fleet;
    let dir = work.join("fleet-storm");
    let rt = loadgen::runtime()?;
    let mut rows = Vec::new();
    let mut notes = String::new();
    match embedded(bins, &dir.join("embedded"), rt.handle(), fp) {
        Ok(s) => rows.push(s),
        Err(e) => {
            let _ = writeln!(notes, "- embedded buses: **failed:** {e:#}");
        }
    }
    if super::gateway_has_nats(bins) {
        match over_nats(bins, &dir.join("nats"), rt.handle(), fp) {
            Ok(s) => rows.push(s),
            Err(e) => {
                let _ = writeln!(notes, "- NATS: **failed:** {e:#}");
            }
        }
    } else {
        let _ = writeln!(notes, "- two gateways on one NATS: {}.", super::NO_NATS_BUS);
    }
    rt.shutdown_timeout(Duration::from_secs(5));
    let mut out = format!(
        "Agents connected to gateway A with the address list A, B; A is killed with SIGKILL \
and each agent dials B after a random delay of up to 500 ms (the agent's first backoff \
step, doubling after each failed dial), at most {} dials in progress at once in this tool. Both gateways serve the same certificate (as behind a load balancer). Times are from the \
kill until that many agents were welcomed by B (this tool's count of `welcome` frames), and until \
B's `GET /api/v1/agents` listed all of them online.\n\n\
| setup | agents | first back | half back | 99% back | **all back** | B's API lists all online | B's CPU meanwhile | B's RSS after | failed dials meanwhile |\n\
|---|---|---|---|---|---|---|---|---|---|\n",
        fp.storm_dial_concurrency
    );
    let s = |d: Option<Duration>| {
        d.map(|d| format!("{:.2} s", d.as_secs_f64()))
            .unwrap_or("—".into())
    };
    let mut goals = Vec::new();
    for r in &rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | **{}** | {} | {:.0}% | {} | {} |",
            r.setup,
            r.agents,
            s(r.first),
            s(r.half),
            s(r.p99),
            match r.all {
                Some(d) => s(Some(d)),
                None => format!("not within {} s ({} back)", STORM_LIMIT.as_secs(), r.back),
            },
            s(r.api_all_online),
            r.b_cpu_pct,
            crate::mb(r.b_rss_kib),
            r.failures,
        );
        if r.failures > 0 {
            if let Some(e) = &r.first_error {
                let _ = writeln!(
                    notes,
                    "- {}: first failure: `{}`",
                    r.setup,
                    e.chars().take(200).collect::<String>()
                );
            }
        }
        goals.push(format!(
            "Reconnect storm ({}): {} agents back on B {} after A was killed.",
            r.setup,
            r.agents,
            match r.all {
                Some(d) => format!("{:.1} s", d.as_secs_f64()),
                None => "not all".into(),
            }
        ));
    }
    out.push('\n');
    if !notes.is_empty() {
        out.push_str(&notes);
        out.push('\n');
    }
    Ok((out, goals))
}
