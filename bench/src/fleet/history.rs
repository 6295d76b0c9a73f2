//! The history of one check: a day of a 10-second check asked of the API while the bus
//! holds a day of results of many agents, on the embedded bus and on NATS JetStream, time
//! to first byte and to the end; next to it, in the same run and on the same data, the
//! read a bus without a per-check index would have to make (every result of the tenant
//! read and the check's kept).
//!
//! The bus is filled from this process through the gateway's own bus code (what a gateway
//! writes, minus the agents' round trips, which the other parts measure), then the release
//! gateway is started on it and the agent whose history is asked connects, so the API
//! knows it.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use outpost_gateway::bus::{AgentRef, Bus};
use outpost_protocol::CheckResult;

use super::https::Client;
use super::loadgen::{self, Behaviour, Fleet};
use super::nats;
use crate::harness::{Bins, Gateway};
use crate::progress;

/// The check asked for runs every 10 s; every other agent's every 5 minutes, and the
/// asked agent has a second check every 5 minutes too.
const ASKED_EVERY_MS: u64 = 10_000;
const OTHERS_EVERY_MS: u64 = 300_000;
const DAY_MS: u64 = 24 * 3600 * 1000;
const HOUR_MS: u64 = 3600 * 1000;
/// Each history is asked this many times; the median is reported.
const RUNS: usize = 5;

struct Row {
    bus: &'static str,
    how: String,
    results: usize,
    bytes: usize,
    first_byte: Option<Duration>,
    total: Duration,
}

/// A result as the agent's load check makes it: three metrics, each with a warning and a
/// critical threshold and a minimum (14 samples when exported).
pub fn load_result(seq: u64, check: &str, started: u64) -> CheckResult {
    let l = (seq % 100) as f64 / 50.0;
    let v = serde_json::json!({
        "seq": seq, "check": check, "status": "ok",
        "output": format!("OK - load average: {l:.2}, {:.2}, {:.2}", l * 0.9, l * 0.8),
        "metrics": [
            {"name": "load1", "value": l, "warn": "4", "crit": "8", "min": 0.0},
            {"name": "load5", "value": l * 0.9, "warn": "3", "crit": "6", "min": 0.0},
            {"name": "load15", "value": l * 0.8, "warn": "2", "crit": "4", "min": 0.0}
        ],
        "started_at_ms": started, "duration_ms": 12, "exit_code": 0
    });
    serde_json::from_value(v).expect("a valid result")
}

/// A day (ending at `end`) of `others` agents' results and the asked agent's, published
/// an hour at a time in the order agents would deliver them; returns how many.
async fn fill(bus: Arc<dyn Bus>, asked: &AgentRef, others: usize, end: u64) -> Result<u64> {
    let start = end - DAY_MS;
    let other_refs: Vec<AgentRef> = (0..others)
        .map(|_| AgentRef::new("default", &loadgen::fingerprint()))
        .collect();
    let mut total = 0u64;
    let mut asked_seq = 0u64;
    for hour in 0..24u64 {
        let from = start + hour * HOUR_MS;
        let mut tasks = tokio::task::JoinSet::new();
        for (i, agent) in other_refs.iter().enumerate() {
            let batch: Vec<CheckResult> = (0..HOUR_MS / OTHERS_EVERY_MS)
                .map(|k| {
                    let seq = hour * (HOUR_MS / OTHERS_EVERY_MS) + k + 1;
                    // Spread over the 5 minutes, by agent.
                    let at = from + k * OTHERS_EVERY_MS + (i as u64 * 7919) % OTHERS_EVERY_MS;
                    load_result(seq, "load", at)
                })
                .collect();
            let (bus, agent) = (bus.clone(), agent.clone());
            tasks.spawn(async move { bus.publish_results(&agent, &batch).await });
            // Bounded in flight.
            while tasks.len() >= 512 {
                tasks.join_next().await.expect("tasks")??;
            }
        }
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        total += others as u64 * (HOUR_MS / OTHERS_EVERY_MS);
        let mut batch = Vec::new();
        for k in 0..HOUR_MS / ASKED_EVERY_MS {
            let at = from + k * ASKED_EVERY_MS;
            asked_seq += 1;
            batch.push(load_result(asked_seq, "load", at));
            if (k * ASKED_EVERY_MS).is_multiple_of(OTHERS_EVERY_MS) {
                asked_seq += 1;
                batch.push(load_result(asked_seq, "disk", at + 1));
            }
        }
        total += batch.len() as u64;
        for chunk in batch.chunks(500) {
            bus.publish_results(asked, chunk).await?;
        }
        progress(format!("fleet history: hour {} of 24 on the bus", hour + 1));
    }
    Ok(total)
}

/// The check's results as a bus without an index must find them: every result of the
/// tenant on the embedded bus, read in order, the asked check's kept.
fn scan_embedded(bus_dir: &Path, asked: &str) -> Result<(usize, Duration)> {
    use outpost_gateway::bus::segments::{read_lines, Position};
    #[derive(serde::Deserialize)]
    struct Line<'a> {
        #[serde(borrow)]
        fingerprint: &'a str,
        result: CheckResult,
    }
    let t0 = Instant::now();
    let mut at = Position::START;
    let mut found = 0;
    loop {
        let lines = read_lines(bus_dir, "results", at, 8 << 20, None)?;
        if lines.lines.is_empty() {
            break;
        }
        for (_, line) in &lines.lines {
            if let Ok(l) = serde_json::from_slice::<Line>(line) {
                if l.fingerprint == asked && l.result.check == "load" {
                    found += 1;
                }
            }
        }
        at = lines.next;
    }
    Ok((found, t0.elapsed()))
}

/// The same on NATS: one ordered consumer over the tenant's whole results stream.
async fn scan_nats(url: &str, asked: &str) -> Result<(usize, Duration)> {
    use async_nats::jetstream::consumer::{pull, DeliverPolicy};
    use futures_util::StreamExt as _;
    let client = async_nats::connect(url).await?;
    let js = async_nats::jetstream::new(client);
    let t0 = Instant::now();
    let stream = js.get_stream(outpost_gateway::nats::RESULTS_STREAM).await?;
    let last = stream.cached_info().state.last_sequence;
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: outpost_gateway::nats::results_filter("default"),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut found = 0;
    while let Some(msg) = messages.next().await {
        let msg = msg?;
        let v: serde_json::Value = serde_json::from_slice(&msg.payload)?;
        if v["fingerprint"] == asked && v["result"]["check"] == "load" {
            found += 1;
        }
        if msg.info().map_err(|e| anyhow!("{e}"))?.stream_sequence >= last {
            break;
        }
    }
    Ok((found, t0.elapsed()))
}

/// Ask the history of the asked check through the gateway's API, [`RUNS`] times each
/// with and without the results themselves; the medians.
fn ask_api(
    rt: &tokio::runtime::Runtime,
    gw: &Gateway,
    token: &str,
    asked: &str,
    bus: &'static str,
    want: usize,
) -> Result<Vec<Row>> {
    let addr = super::gateway_addr(gw)?;
    let mut rows = Vec::new();
    for (how, results) in [
        ("API, results and series", true),
        ("API, series only (`results=false`)", false),
    ] {
        let mut samples = Vec::new();
        for _ in 0..RUNS {
            let a = rt.block_on(async {
                let mut c = Client::connect(addr, &gw.pin, token).await?;
                c.call(
                    "GET",
                    &format!(
                        "/api/v1/agents/{asked}/checks/load/history?since=25h&limit=100000&results={results}"
                    ),
                )
                .await
            })?;
            if a.status != 200 {
                bail!(
                    "history answered {}: {}",
                    a.status,
                    String::from_utf8_lossy(&a.body)
                );
            }
            let v: serde_json::Value = serde_json::from_slice(&a.body)?;
            let count = v["count"].as_u64().unwrap_or(0) as usize;
            if count != want {
                bail!("history answered {count} results, not the {want} the bus holds");
            }
            samples.push((a.first_byte, a.took, a.body.len()));
        }
        samples.sort_by_key(|s| s.1);
        let (first, total, bytes) = samples[samples.len() / 2];
        rows.push(Row {
            bus,
            how: how.into(),
            results: want,
            bytes,
            first_byte: Some(first),
            total,
        });
    }
    Ok(rows)
}

/// The asked agent online on `gw` (idle), so the API knows it; stopped by the caller.
fn connect_asked(
    rt: &tokio::runtime::Runtime,
    gw: &Gateway,
    id: loadgen::Identity,
) -> Result<Fleet> {
    let fleet = Fleet::start(
        rt.handle(),
        vec![id],
        0,
        Behaviour {
            addrs: vec![super::gateway_addr(gw)?],
            pin: gw.pin.clone(),
            batch: 0,
            pace: None,
            redial: false,
            redial_jitter: Duration::ZERO,
            dial_concurrency: 1,
            groups: Vec::new(),
            features: Vec::new(),
        },
    )?;
    if !fleet.wait_online(1, Duration::from_secs(60)) {
        bail!(
            "the asked agent did not come online: {}",
            fleet.stats.first_error().unwrap_or_default()
        );
    }
    Ok(fleet)
}

fn embedded_rows(
    bins: &Bins,
    dir: &Path,
    rt: &tokio::runtime::Runtime,
    others: usize,
) -> Result<Vec<Row>> {
    let (ids, creds) = super::agents_with_secrets(1);
    let asked = ids[0].fingerprint.clone();
    super::prepare_gateway_dir(dir, Some(&creds), None)?;
    let bus_dir = Gateway::data_dir_in(dir).join("bus");
    let retention = outpost_gateway::bus::segments::Retention {
        max_age: Duration::from_secs(30 * 24 * 3600),
        max_bytes: 0,
    };
    let end = crate::now_ms();
    let total = rt.block_on(async {
        let (bus, _) =
            outpost_gateway::bus::embedded::EmbeddedBus::open(&bus_dir, retention, "default")
                .await
                .context("cannot open the embedded bus")?;
        let bus: Arc<dyn Bus> = Arc::new(bus);
        fill(bus, &AgentRef::new("default", &asked), others, end).await
    })?;
    // The writer saves the last segment's index as it closes: wait for it.
    let listing = outpost_gateway::bus::segments::list(&bus_dir, "results")?;
    if let Some(n) = listing.active {
        let idx = outpost_gateway::bus::segments::sidecar_path(&bus_dir, "results", n);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !idx.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let bytes: u64 = std::fs::read_dir(&bus_dir)?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    progress(format!(
        "fleet history: embedded bus holds {total} results, {:.2} GB",
        bytes as f64 / 1e9
    ));
    let want = (DAY_MS / ASKED_EVERY_MS) as usize;
    let (found, took) = scan_embedded(&bus_dir, &asked)?;
    if found != want {
        bail!("the scan found {found} results, not {want}");
    }
    let mut rows = vec![Row {
        bus: "embedded",
        how: format!(
            "baseline: every result of the tenant read ({total}, {:.2} GB)",
            bytes as f64 / 1e9
        ),
        results: found,
        bytes: 0,
        first_byte: None,
        total: took,
    }];
    let mut gw = Gateway::start_with(bins, dir, &["--results-max-bytes".into(), "0".into()])?;
    let token = gw.api_token()?;
    let fleet = connect_asked(rt, &gw, ids[0].clone())?;
    let asked_rows = ask_api(rt, &gw, &token, &asked, "embedded", want);
    fleet.stop(rt.handle(), Duration::from_secs(5));
    gw.proc.stop(Duration::from_secs(10));
    rows.extend(asked_rows?);
    Ok(rows)
}

fn nats_rows(
    bins: &Bins,
    dir: &Path,
    rt: &tokio::runtime::Runtime,
    others: usize,
    server: &nats::Server,
) -> Result<Vec<Row>> {
    let settings = outpost_gateway::settings::bus::BusArgs::nats_from_flags(&server.url(), &[])
        .map_err(|e| anyhow!(e))?;
    let (ids, creds) = super::agents_with_secrets(1);
    let asked = ids[0].fingerprint.clone();
    let end = crate::now_ms();
    let total = rt.block_on(async {
        let nats = outpost_gateway::nats::Nats::connect(&settings, "bench history").await?;
        let bus: Arc<dyn Bus> = Arc::new(outpost_gateway::nats::bus::NatsBus::new(Arc::new(nats)));
        fill(bus, &AgentRef::new("default", &asked), others, end).await
    })?;
    progress(format!("fleet history: JetStream holds {total} results"));
    let want = (DAY_MS / ASKED_EVERY_MS) as usize;
    let (found, took) = rt.block_on(scan_nats(&server.url(), &asked))?;
    if found != want {
        bail!("the scan found {found} results, not {want}");
    }
    let mut rows = vec![Row {
        bus: "NATS",
        how: format!("baseline: every result of the tenant's stream read ({total})"),
        results: found,
        bytes: 0,
        first_byte: None,
        total: took,
    }];
    // The asked agent's secret, imported from credentials.json at the gateway's first
    // start on NATS.
    super::prepare_gateway_dir(&dir.join("a"), Some(&creds), None)?;
    let keys = (super::token(), super::token());
    let mut gw = super::start_nats_gateway(bins, dir, "a", &server.url(), (&keys.0, &keys.1), &[])?;
    let fleet = connect_asked(rt, &gw, ids[0].clone())?;
    let asked_rows = ask_api(rt, &gw, &keys.1, &asked, "NATS", want);
    fleet.stop(rt.handle(), Duration::from_secs(5));
    gw.proc.stop(Duration::from_secs(10));
    rows.extend(asked_rows?);
    Ok(rows)
}

/// Part: the history of one check among many agents' results.
pub fn history(bins: &Bins, work: &Path, plan: &crate::Plan) -> Result<(String, Vec<String>)> {
    let fp = &plan.fleet;
    let others = fp.history_agents;
    let dir = work.join("fleet-history");
    let rt = loadgen::runtime()?;
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    match embedded_rows(bins, &dir.join("embedded"), &rt, others) {
        Ok(r) => rows.extend(r),
        Err(e) => notes.push(format!("embedded bus: failed: {e:#}")),
    }
    match nats::find_server(fp.nats_server.as_deref())
        .and_then(|b| nats::Server::start(&b, &dir.join("nats"), false))
    {
        Ok(server) => match nats_rows(bins, &dir.join("gateway-nats"), &rt, others, &server) {
            Ok(r) => rows.extend(r),
            Err(e) => notes.push(format!("NATS: failed: {e:#}")),
        },
        Err(e) => notes.push(format!("NATS: not run: no nats-server: {e:#}")),
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "A day of one check run every 10 s ({} results) asked of the API \
         (`GET …/checks/load/history?since=25h&limit=100000`, median of {RUNS}, a new HTTPS \
         connection each), while the bus holds a day of {others} other agents' results (one \
         check every 5 minutes each) and the asked agent's second check. The baseline is the \
         read a bus without a per-check index must make for it, timed on the same data in \
         the same run: every result of the tenant, in order, the check's kept.\n",
        DAY_MS / ASKED_EVERY_MS
    );
    out.push_str("| bus | read | results | bytes | first byte | to the end |\n");
    out.push_str("|-----|------|--------:|------:|-----------:|-----------:|\n");
    for r in &rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {:.1} ms |",
            r.bus,
            r.how,
            r.results,
            if r.bytes > 0 {
                format!("{:.2} MB", r.bytes as f64 / 1e6)
            } else {
                "–".into()
            },
            r.first_byte
                .map(|d| format!("{:.1} ms", d.as_secs_f64() * 1e3))
                .unwrap_or_else(|| "–".into()),
            r.total.as_secs_f64() * 1e3
        );
    }
    out.push('\n');
    for n in &notes {
        let _ = writeln!(out, "- {n}");
    }
    if !notes.is_empty() {
        out.push('\n');
    }
    Ok((out, Vec::new()))
}
