//! Results per second end to end: simulated agents sending batches to a gateway whose bus
//! is NATS JetStream, counted as acked results, next to raw pipelined JetStream publishing
//! of the same results to the same server; the embedded bus for reference.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{bail, Result};

use super::loadgen::{self, Behaviour, Fleet};
use super::{nats, FleetPlan};
use crate::harness::{Bins, Gateway};
use crate::progress;
use crate::sample::{sample_for, Series};

struct Row {
    path: String,
    rate: Option<f64>,
    acked: u64,
    gateway_cpu: Option<f64>,
    nats_cpu: Option<f64>,
    own_cpu: f64,
    note: String,
}

/// Acked results per second through a gateway started with `args`.
#[allow(clippy::too_many_arguments)]
fn through_gateway(
    bins: &Bins,
    dir: &Path,
    rt: &tokio::runtime::Handle,
    path: &str,
    args: &[String],
    fp: &FleetPlan,
    nats_pid: Option<u32>,
) -> Result<Row> {
    progress(format!(
        "fleet results: {} agents × {} results per batch through {path}",
        fp.results_agents, fp.results_batch
    ));
    let mut gw = Gateway::start_with(bins, dir, args)?;
    let ids = super::agents_enrolling(fp.results_agents, &gw.enroll_key);
    let fleet = Fleet::start(
        rt,
        ids,
        0,
        Behaviour {
            addrs: vec![super::gateway_addr(&gw)?],
            pin: gw.pin.clone(),
            batch: fp.results_batch,
            pace: None,
            redial: false,
            redial_jitter: Duration::ZERO,
            dial_concurrency: fp.dial_concurrency,
            groups: Vec::new(),
            features: Vec::new(),
        },
    )?;
    let all = fp.results_agents as u64;
    if !fleet.wait_online(all, Duration::from_secs(60)) {
        let why = fleet.stats.first_error().unwrap_or_default();
        let online = fleet.stats.online();
        fleet.stop(rt, Duration::from_secs(5));
        bail!("only {online} of {all} agents came online within 60 s: {why}");
    }
    std::thread::sleep(fp.results_warmup);
    gw.proc.ensure_running()?;
    let mut g = Series::start(gw.proc.pid())?;
    let mut me = Series::start(std::process::id())?;
    let mut n = match nats_pid {
        Some(p) => Some(Series::start(p)?),
        None => None,
    };
    let a0 = fleet.stats.acked.load(Ordering::Relaxed);
    let t0 = std::time::Instant::now();
    {
        let mut all: Vec<&mut Series> = vec![&mut g, &mut me];
        if let Some(n) = n.as_mut() {
            all.push(n);
        }
        sample_for(fp.results_window, &mut all)?;
    }
    let acked = fleet.stats.acked.load(Ordering::Relaxed) - a0;
    let secs = t0.elapsed().as_secs_f64();
    let failures = fleet.stats.failures.load(Ordering::Relaxed);
    let first = fleet.stats.first_error();
    gw.proc.ensure_running()?;
    fleet.stop(rt, Duration::from_secs(10));
    gw.proc.stop(Duration::from_secs(10));
    let mut note = String::new();
    if failures > 0 {
        note = format!(
            "{failures} sessions failed; first: `{}`",
            first.unwrap_or_default()
        );
    }
    Ok(Row {
        path: path.to_string(),
        rate: Some(acked as f64 / secs),
        acked,
        gateway_cpu: Some(g.usage()?.cpu_pct),
        nats_cpu: n.map(|n| n.usage().map(|u| u.cpu_pct)).transpose()?,
        own_cpu: me.usage()?.cpu_pct,
        note,
    })
}

fn failed_row(path: &str, why: String) -> Row {
    Row {
        path: path.to_string(),
        rate: None,
        acked: 0,
        gateway_cpu: None,
        nats_cpu: None,
        own_cpu: 0.0,
        note: why,
    }
}

/// Part: acked results per second.
pub fn results(bins: &Bins, work: &Path, plan: &crate::Plan) -> Result<(String, Vec<String>)> {
    let fp = &plan.fleet;
    let dir = work.join("fleet-results");
    let rt = loadgen::runtime()?;
    let mut rows = Vec::new();
    let server = nats::find_server(fp.nats_server.as_deref())
        .and_then(|b| nats::Server::start(&b, &dir.join("nats"), false));
    let raw_path = "raw JetStream publishing (async-nats, no gateway)";
    let gw_nats_path = "agents → gateway → NATS JetStream (`--bus nats://…`)";
    let mut raw_rate = None;
    match &server {
        Ok(s) => {
            progress(format!(
                "fleet results: raw JetStream baseline, {} publishers × {}",
                fp.results_agents, fp.results_batch
            ));
            let mut n = Series::start(s.proc.pid())?;
            let mut me = Series::start(std::process::id())?;
            match nats::raw_publish(
                rt.handle(),
                &s.url(),
                fp.results_agents,
                fp.results_batch,
                fp.results_warmup,
                fp.results_window,
            ) {
                Ok(r) => {
                    n.take()?;
                    me.take()?;
                    raw_rate = Some(r.per_sec());
                    rows.push(Row {
                        path: raw_path.into(),
                        rate: Some(r.per_sec()),
                        acked: r.acked,
                        gateway_cpu: None,
                        nats_cpu: Some(n.usage()?.cpu_pct),
                        own_cpu: me.usage()?.cpu_pct,
                        note: String::new(),
                    });
                }
                Err(e) => rows.push(failed_row(raw_path, format!("failed: {e:#}"))),
            }
            if super::gateway_has_nats(bins) {
                let args = vec![
                    "--bus".to_string(),
                    s.url(),
                    "--gateway-id".into(),
                    "bench-a".into(),
                ];
                match through_gateway(
                    bins,
                    &dir.join("gateway-nats"),
                    rt.handle(),
                    gw_nats_path,
                    &args,
                    fp,
                    Some(s.proc.pid()),
                ) {
                    Ok(r) => rows.push(r),
                    Err(e) => rows.push(failed_row(gw_nats_path, format!("failed: {e:#}"))),
                }
            } else {
                rows.push(failed_row(gw_nats_path, super::NO_NATS_BUS.into()));
            }
        }
        Err(e) => {
            rows.push(failed_row(
                raw_path,
                format!("not run: no nats-server: {e:#}"),
            ));
            rows.push(failed_row(
                gw_nats_path,
                format!("not run: no nats-server: {e:#}"),
            ));
        }
    }
    let emb_path = "agents → gateway → embedded bus (fsync per batch), for reference";
    match through_gateway(
        bins,
        &dir.join("gateway-embedded"),
        rt.handle(),
        emb_path,
        &[],
        fp,
        None,
    ) {
        Ok(r) => rows.push(r),
        Err(e) => rows.push(failed_row(emb_path, format!("failed: {e:#}"))),
    }
    if let Ok(mut s) = server {
        s.proc.stop(Duration::from_secs(5));
    }
    rt.shutdown_timeout(Duration::from_secs(5));

    let mut out = format!(
        "{} simulated agents, each sending batches of {} results (the bench's ~300-byte JSON \
result) and the next batch once the previous one is acked, as the agent does; counted as \
acked results over {} s after a {} s warm-up. The raw baseline publishes the same JSON \
bodies with `Nats-Msg-Id` `<fingerprint>:<seq>` to a file-backed stream on the same \
nats-server from {} concurrent publishers, each publishing {} messages without waiting and \
then awaiting their acks. CPU is % of one core over the window (the raw row: over warm-up \
and window).\n\n\
| path | acked results/s | of raw JetStream | results in window | gateway CPU | nats-server CPU | this tool's CPU | note |\n\
|---|---|---|---|---|---|---|---|\n",
        fp.results_agents,
        fp.results_batch,
        fp.results_window.as_secs(),
        fp.results_warmup.as_secs(),
        fp.results_agents,
        fp.results_batch,
    );
    let pct = |v: Option<f64>| v.map(|v| format!("{v:.0}%")).unwrap_or("—".into());
    for r in &rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {:.0}% | {} |",
            r.path,
            r.rate.map(|v| format!("**{v:.0}**")).unwrap_or("—".into()),
            match (r.rate, raw_rate) {
                (Some(v), Some(raw)) => format!("{:.0}%", v / raw.max(1e-9) * 100.0),
                _ => "—".into(),
            },
            r.acked,
            pct(r.gateway_cpu),
            pct(r.nats_cpu),
            r.own_cpu,
            r.note
        );
    }
    out.push('\n');
    let mut goals = Vec::new();
    let gw = rows
        .iter()
        .find(|r| r.path == gw_nats_path)
        .and_then(|r| r.rate);
    match (gw, raw_rate) {
        (Some(g), Some(raw)) => {
            let ratio = g / raw.max(1e-9);
            goals.push(format!(
                "Results through a gateway on NATS: {g:.0}/s, {:.0}% of raw JetStream publishing ({raw:.0}/s) — goal ≥ 50%: **{}**.",
                ratio * 100.0,
                if ratio >= 0.5 { "met" } else { "missed" }
            ));
        }
        _ => goals
            .push("Results through a gateway on NATS: not measured (see the part's rows).".into()),
    }
    Ok((out, goals))
}
