//! Run-now latency: `POST /api/v1/agents/{fp}/checks/{check}/run` over HTTPS with the
//! bearer token, answered at once by a simulated agent — through one gateway (embedded
//! bus, for reference) and across two gateways on one NATS (the call to gateway A, the
//! agent on gateway B).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::https::Client;
use super::loadgen::{self, Behaviour, Fleet, Identity};
use super::nats;
use crate::harness::{Bins, Gateway};
use crate::{percentile, progress};

/// Latencies of one way of calling, in µs.
struct Calls {
    path: String,
    concurrency: usize,
    latencies: Vec<u64>,
    wall: Duration,
    non_ok: u64,
    first_bad: Option<String>,
}

fn run_path(fp: &str) -> String {
    format!("/api/v1/agents/{fp}/checks/ping/run")
}

/// `sequential` calls one after another on one connection, then `conc.0` connections
/// making `conc.1` calls each at once, round-robin over `fps`.
#[allow(clippy::too_many_arguments)]
fn measure(
    rt: &tokio::runtime::Handle,
    label: &str,
    addr: SocketAddr,
    pin: &str,
    token: &str,
    fps: &[String],
    sequential: usize,
    conc: (usize, usize),
) -> Result<Vec<Calls>> {
    rt.block_on(async {
        let mut client = Client::connect(addr, pin, token).await?;
        // Until every agent answers (a fleet learns an agent's checks through NATS within
        // a few seconds of its connection), then warm-up, not counted: the first calls
        // pay for lazy set-up on every side.
        let ready_by = Instant::now() + Duration::from_secs(30);
        for fp in fps {
            loop {
                let a = client.call("POST", &run_path(fp)).await?;
                if a.status == 200 {
                    break;
                }
                if Instant::now() >= ready_by {
                    bail!(
                        "run-now for agent {fp} still answered {} after 30 s: {}",
                        a.status,
                        String::from_utf8_lossy(&a.body)
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        for fp in fps.iter().take(10) {
            client.call("POST", &run_path(fp)).await?;
        }
        let mut seq = Calls {
            path: label.to_string(),
            concurrency: 1,
            latencies: Vec::with_capacity(sequential),
            wall: Duration::ZERO,
            non_ok: 0,
            first_bad: None,
        };
        let t0 = Instant::now();
        for i in 0..sequential {
            let a = client.call("POST", &run_path(&fps[i % fps.len()])).await?;
            seq.latencies.push(a.took.as_micros() as u64);
            if a.status != 200 {
                seq.non_ok += 1;
                seq.first_bad.get_or_insert_with(|| {
                    format!("{}: {}", a.status, String::from_utf8_lossy(&a.body))
                });
            }
        }
        seq.wall = t0.elapsed();
        let (n, each) = conc;
        let mut tasks = tokio::task::JoinSet::new();
        let t0 = Instant::now();
        for c in 0..n {
            let mut client = Client::connect(addr, pin, token).await?;
            let fps: Vec<String> = fps.to_vec();
            tasks.spawn(async move {
                let mut got = Vec::with_capacity(each);
                for i in 0..each {
                    let a = client
                        .call("POST", &run_path(&fps[(c * each + i) % fps.len()]))
                        .await?;
                    got.push((a.took.as_micros() as u64, a.status, a.body));
                }
                anyhow::Ok(got)
            });
        }
        let mut par = Calls {
            path: label.to_string(),
            concurrency: n,
            latencies: Vec::with_capacity(n * each),
            wall: Duration::ZERO,
            non_ok: 0,
            first_bad: None,
        };
        while let Some(r) = tasks.join_next().await {
            for (us, status, body) in r?? {
                par.latencies.push(us);
                if status != 200 {
                    par.non_ok += 1;
                    par.first_bad.get_or_insert_with(|| {
                        format!("{status}: {}", String::from_utf8_lossy(&body))
                    });
                }
            }
        }
        par.wall = t0.elapsed();
        Ok(vec![seq, par])
    })
}

fn fleet_on(
    rt: &tokio::runtime::Handle,
    gw: &Gateway,
    ids: Vec<Identity>,
    dial_concurrency: usize,
) -> Result<Fleet> {
    let n = ids.len() as u64;
    let fleet = Fleet::start(
        rt,
        ids,
        0,
        Behaviour {
            addrs: vec![super::gateway_addr(gw)?],
            pin: gw.pin.clone(),
            batch: 0,
            pace: None,
            redial: false,
            redial_jitter: Duration::ZERO,
            dial_concurrency,
            groups: Vec::new(),
            features: Vec::new(),
        },
    )?;
    if !fleet.wait_online(n, Duration::from_secs(60)) {
        let why = fleet.stats.first_error().unwrap_or_default();
        let online = fleet.stats.online();
        fleet.stop(rt, Duration::from_secs(5));
        bail!("only {online} of {n} agents came online within 60 s: {why}");
    }
    Ok(fleet)
}

fn one_gateway(
    bins: &Bins,
    dir: &Path,
    rt: &tokio::runtime::Handle,
    plan: &super::FleetPlan,
) -> Result<Vec<Calls>> {
    progress("fleet rpc: one gateway, embedded bus");
    super::write_rpc_check(dir)?;
    let mut gw = Gateway::start(bins, dir)?;
    let ids = super::agents_enrolling(plan.rpc_agents, &gw.enroll_key);
    let fps: Vec<String> = ids.iter().map(|i| i.fingerprint.clone()).collect();
    let fleet = fleet_on(rt, &gw, ids, plan.dial_concurrency)?;
    let calls = measure(
        rt,
        "one gateway (embedded bus): API and agent on the same gateway",
        super::gateway_addr(&gw)?,
        &gw.pin,
        &gw.api_token()?,
        &fps,
        plan.rpc_sequential,
        plan.rpc_concurrent,
    );
    gw.proc.ensure_running()?;
    fleet.stop(rt, Duration::from_secs(5));
    gw.proc.stop(Duration::from_secs(10));
    calls
}

fn two_gateways(
    bins: &Bins,
    dir: &Path,
    rt: &tokio::runtime::Handle,
    plan: &super::FleetPlan,
) -> Result<Vec<Calls>> {
    progress("fleet rpc: two gateways on one NATS");
    let bin = nats::find_server(plan.nats_server.as_deref())?;
    let mut server = nats::Server::start(&bin, &dir.join("nats"), false)?;
    let (enroll, api) = (super::token(), super::token());
    let tls = super::shared_tls_args(&dir.join("tls"))?;
    super::push_rpc_check(bins, dir, &server.url())?;
    let url = server.url();
    let start = |name: &str| -> Result<Gateway> {
        super::start_nats_gateway(bins, dir, name, &url, (&enroll, &api), &tls)
    };
    let mut a = start("a")?;
    let mut b = start("b")?;
    let ids = super::agents_enrolling(plan.rpc_agents, &enroll);
    let fps: Vec<String> = ids.iter().map(|i| i.fingerprint.clone()).collect();
    let fleet = fleet_on(rt, &b, ids, plan.dial_concurrency)?;
    let calls = measure(
        rt,
        "two gateways on NATS: API on gateway A, agent on gateway B",
        super::gateway_addr(&a)?,
        &a.pin,
        &api,
        &fps,
        plan.rpc_sequential,
        plan.rpc_concurrent,
    );
    a.proc.ensure_running()?;
    b.proc.ensure_running()?;
    fleet.stop(rt, Duration::from_secs(5));
    a.proc.stop(Duration::from_secs(10));
    b.proc.stop(Duration::from_secs(10));
    server.proc.stop(Duration::from_secs(5));
    calls
}

/// Part: run-now latency.
pub fn rpc(bins: &Bins, work: &Path, plan: &crate::Plan) -> Result<(String, Vec<String>)> {
    let fp = &plan.fleet;
    let dir = work.join("fleet-rpc");
    let rt = loadgen::runtime()?;
    let mut rows = Vec::new();
    let mut notes = String::new();
    let across = "two gateways on NATS: API on gateway A, agent on gateway B";
    if super::gateway_has_nats(bins) {
        match two_gateways(bins, &dir.join("two"), rt.handle(), fp) {
            Ok(c) => rows.extend(c),
            Err(e) => {
                let _ = writeln!(notes, "- {across}: **failed:** {e:#}");
            }
        }
    } else {
        let _ = writeln!(notes, "- {across}: {}.", super::NO_NATS_BUS);
    }
    match one_gateway(bins, &dir.join("one"), rt.handle(), fp) {
        Ok(c) => rows.extend(c),
        Err(e) => {
            let _ = writeln!(notes, "- one gateway: **failed:** {e:#}");
        }
    }
    rt.shutdown_timeout(Duration::from_secs(5));

    let mut out = format!(
        "{} simulated agents answer every `rpc_request` at once with a result; each call is \
`POST /api/v1/agents/{{fp}}/checks/ping/run` over HTTPS (kept-alive connection, bearer \
token), round-robin over the agents, timed from sending the request to the whole answer. \
First {} calls one after another on one connection, then {} connections making {} calls \
each at once (before them, one call per agent until each answers, and 10 calls of \
warm-up, not counted). The fleet's checks are pushed with `outpost-gateway config push`.\n\n\
| path | calls | at once | p50 | p99 | max | mean | calls/s | not 200 |\n\
|---|---|---|---|---|---|---|---|---|\n",
        fp.rpc_agents, fp.rpc_sequential, fp.rpc_concurrent.0, fp.rpc_concurrent.1
    );
    let ms = |us: u64| format!("{:.2} ms", us as f64 / 1000.0);
    let mut goals = Vec::new();
    for c in &mut rows {
        c.latencies.sort_unstable();
        let mean = c.latencies.iter().sum::<u64>() / c.latencies.len().max(1) as u64;
        let (p50, p99) = (
            percentile(&c.latencies, 50.0),
            percentile(&c.latencies, 99.0),
        );
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | **{}** | {} | {} | {:.0} | {} |",
            c.path,
            c.latencies.len(),
            c.concurrency,
            ms(p50),
            ms(p99),
            ms(c.latencies.last().copied().unwrap_or(0)),
            ms(mean),
            c.latencies.len() as f64 / c.wall.as_secs_f64().max(1e-9),
            c.non_ok,
        );
        if let Some(bad) = &c.first_bad {
            let _ = writeln!(
                notes,
                "- {} (at once: {}): first answer that was not 200: `{}`",
                c.path,
                c.concurrency,
                bad.chars().take(200).collect::<String>()
            );
        }
        if c.path == across && c.concurrency == 1 {
            goals.push(format!(
                "Run-now across two gateways: p50 {}, p99 {} one call at a time — goal p99 < 10 ms: **{}**.",
                ms(p50),
                ms(p99),
                if p99 < 10_000 { "met" } else { "missed" }
            ));
        }
    }
    if !rows.iter().any(|c| c.path == across) {
        goals.push("Run-now across two gateways: not measured (see the part's notes).".into());
    }
    out.push('\n');
    if !notes.is_empty() {
        out.push_str(&notes);
        out.push('\n');
    }
    Ok((out, goals))
}
