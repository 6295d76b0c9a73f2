//! The event stream under load: clients following `GET /api/v1/events` of a gateway on
//! NATS while results reach the bus at a steady rate, next to the same number of clients
//! reading the same results straight from JetStream (an ordered consumer each), in the
//! same run. Each result carries the time it was published (in its output); a client
//! takes the time it got it: the latency from the bus to the client. The gateway's CPU
//! (and nats-server's) over the window, per client.
//!
//! Results are published from this process through the gateway's own NATS bus code (what
//! a gateway writes for its agents), so the rate is the one asked for whatever the agents'
//! side costs; the other parts measure that side.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use outpost_gateway::bus::{AgentRef, Bus};
use outpost_protocol::CheckResult;

use super::loadgen;
use super::nats;
use crate::harness::Bins;
use crate::progress;
use crate::sample::{sample_for, Series};

/// Agents the published results come from.
const AGENTS: usize = 100;

/// Microseconds since the Unix epoch.
fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// What the clients saw: latencies in µs (while recording), events received.
#[derive(Default)]
struct Seen {
    recording: AtomicBool,
    received: AtomicU64,
    latencies: Mutex<Vec<u32>>,
    errors: Mutex<Option<String>>,
}

impl Seen {
    /// A result's output (`t=<µs>`) found in `text`: its latency, if recording.
    fn got(&self, text: &[u8]) {
        let Some(at) = find(text, b"\"output\":\"t=") else {
            return;
        };
        let digits: Vec<u8> = text[at + 12..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .copied()
            .collect();
        let Some(sent) = std::str::from_utf8(&digits)
            .ok()
            .and_then(|d| d.parse::<u64>().ok())
        else {
            return;
        };
        if self.recording.load(Ordering::Relaxed) {
            self.received.fetch_add(1, Ordering::Relaxed);
            let us = now_us().saturating_sub(sent);
            outpost_sys::lock(&self.latencies).push(u32::try_from(us).unwrap_or(u32::MAX));
        }
    }

    fn fail(&self, why: String) {
        let mut e = outpost_sys::lock(&self.errors);
        if e.is_none() {
            *e = Some(why);
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Publish `rate` results per second onto the bus from [`AGENTS`] agents, until `stop`.
async fn publish(bus: Arc<dyn Bus>, rate: usize, stop: Arc<AtomicBool>) -> Result<u64> {
    let agents: Vec<AgentRef> = (0..AGENTS)
        .map(|_| AgentRef::new("default", &loadgen::fingerprint()))
        .collect();
    // Every 10 ms, each agent a batch: rate / 100 per tick over all agents.
    let per_tick = (rate / 100).max(1);
    let mut seqs = vec![0u64; AGENTS];
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent = 0u64;
    let mut next_agent = 0usize;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let mut tasks = tokio::task::JoinSet::new();
        let mut left = per_tick;
        while left > 0 {
            let i = next_agent % AGENTS;
            next_agent += 1;
            let n = left.min(per_tick.div_ceil(AGENTS).max(1));
            left -= n;
            let batch: Vec<CheckResult> = (0..n)
                .map(|_| {
                    seqs[i] += 1;
                    let v = serde_json::json!({
                        "seq": seqs[i], "check": "load", "status": "ok",
                        "output": format!("t={}", now_us()),
                        "metrics": [{"name": "load1", "value": 0.5}],
                        "started_at_ms": crate::now_ms(), "duration_ms": 3
                    });
                    serde_json::from_value(v).expect("a valid result")
                })
                .collect();
            let (bus, agent) = (bus.clone(), agents[i].clone());
            tasks.spawn(async move { bus.publish_results(&agent, &batch).await });
        }
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        sent += per_tick as u64;
    }
    Ok(sent)
}

/// One client of the gateway's stream: read SSE blocks, note each result's latency.
async fn sse_client(addr: std::net::SocketAddr, pin: String, token: String, seen: Arc<Seen>) {
    let run = async {
        let config = outpost_agent::tls::client_config(&outpost_agent::settings::Trust::Pin(pin))?;
        let tls = tokio_rustls::TlsConnector::from(config);
        let ip = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
        let stream = loadgen::tls_connect(&tls, ip, addr).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .uri("/api/v1/events?types=result")
            .header("host", "localhost")
            .header("authorization", format!("Bearer {token}"))
            .header("accept", "text/event-stream")
            .body(Full::new(Bytes::new()))?;
        let resp = sender.send_request(req).await?;
        if resp.status() != 200 {
            bail!("the stream answered {}", resp.status());
        }
        let mut body = resp.into_body();
        let mut buf: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            buf.extend_from_slice(data);
            while let Some(end) = find(&buf, b"\n\n") {
                seen.got(&buf[..end]);
                buf.drain(..end + 2);
            }
        }
        Ok::<_, anyhow::Error>(())
    };
    if let Err(e) = run.await {
        seen.fail(format!("{e:#}"));
    }
}

/// One client reading straight from JetStream: an ordered consumer on the results.
async fn nats_client(url: String, seen: Arc<Seen>) {
    use async_nats::jetstream::consumer::{pull, DeliverPolicy};
    use futures_util::StreamExt as _;
    let run = async {
        let client = async_nats::connect(&url).await?;
        let js = async_nats::jetstream::new(client);
        let stream = js.get_stream(outpost_gateway::nats::RESULTS_STREAM).await?;
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: outpost_gateway::nats::results_filter("default"),
                deliver_policy: DeliverPolicy::New,
                ..Default::default()
            })
            .await?;
        let mut messages = consumer.messages().await?;
        while let Some(msg) = messages.next().await {
            let msg = msg?;
            seen.got(&msg.payload);
        }
        Ok::<_, anyhow::Error>(())
    };
    if let Err(e) = run.await {
        seen.fail(format!("{e:#}"));
    }
}

struct Row {
    path: String,
    clients: usize,
    rate: usize,
    per_client: f64,
    p50_ms: f64,
    p99_ms: f64,
    server_cpu: f64,
    note: String,
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1e3
}

/// Run `clients` (already started, reporting into `seen`) for the window while results
/// are published; `server` is the process whose CPU counts (the gateway, or nats-server).
fn measure(
    path: &str,
    (clients, rate): (usize, usize),
    seen: &Arc<Seen>,
    server: u32,
    warmup: Duration,
    window: Duration,
) -> Result<Row> {
    std::thread::sleep(warmup);
    let mut cpu = Series::start(server)?;
    seen.recording.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    sample_for(window, &mut [&mut cpu])?;
    seen.recording.store(false, Ordering::Relaxed);
    let secs = t0.elapsed().as_secs_f64();
    let received = seen.received.load(Ordering::Relaxed);
    let mut lat = std::mem::take(&mut *outpost_sys::lock(&seen.latencies));
    lat.sort_unstable();
    let per_client = received as f64 / secs / clients as f64;
    let mut note = String::new();
    if let Some(e) = outpost_sys::lock(&seen.errors).clone() {
        note = format!("a client failed: {e}");
    } else if per_client < rate as f64 * 0.95 {
        note = format!(
            "the clients got {:.0}% of the results published",
            per_client / rate as f64 * 100.0
        );
    }
    Ok(Row {
        path: path.into(),
        clients,
        rate,
        per_client,
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        server_cpu: cpu.usage()?.cpu_pct,
        note,
    })
}

/// Part: stream clients under a steady result rate, next to JetStream consumers.
pub fn stream(bins: &Bins, work: &Path, plan: &crate::Plan) -> Result<(String, Vec<String>)> {
    let fp = &plan.fleet;
    let (clients, rate) = (fp.stream_clients, fp.stream_rate);
    let dir = work.join("fleet-stream");
    let rt = loadgen::runtime()?;
    let server = nats::find_server(fp.nats_server.as_deref())
        .and_then(|b| nats::Server::start(&b, &dir.join("nats"), false))
        .context("no nats-server")?;
    let keys = (super::token(), super::token());
    let mut gw =
        super::start_nats_gateway(bins, &dir, "a", &server.url(), (&keys.0, &keys.1), &[])?;
    let addr = super::gateway_addr(&gw)?;
    let settings = outpost_gateway::settings::bus::BusArgs::nats_from_flags(&server.url(), &[])
        .map_err(|e| anyhow!(e))?;
    let bus: Arc<dyn Bus> = rt.block_on(async {
        let nats = outpost_gateway::nats::Nats::connect(&settings, "bench stream").await?;
        Ok::<_, anyhow::Error>(Arc::new(outpost_gateway::nats::bus::NatsBus::new(
            Arc::new(nats),
        )))
    })?;
    // A tenth of the rate asked for, then the rate: on a small machine the second may be
    // more than the clients, the gateway and nats-server together can carry; the first
    // shows both paths when they keep up (and is first, so no backlog of the other
    // weighs on it).
    let mut rows = Vec::new();
    let mut published = 0;
    for rate in [(rate / 10).max(1), rate] {
        let stop = Arc::new(AtomicBool::new(false));
        let publisher = rt.spawn(publish(bus.clone(), rate, stop.clone()));
        progress(format!(
            "fleet stream: {clients} clients of the gateway's event stream, {rate} results/s"
        ));
        let seen = Arc::new(Seen::default());
        let tasks: Vec<_> = (0..clients)
            .map(|_| {
                rt.spawn(sse_client(
                    addr,
                    gw.pin.clone(),
                    keys.1.clone(),
                    seen.clone(),
                ))
            })
            .collect();
        let row = measure(
            "clients → gateway (`GET /api/v1/events`, TLS) → NATS",
            (clients, rate),
            &seen,
            gw.proc.pid(),
            fp.stream_warmup,
            fp.stream_window,
        );
        for t in &tasks {
            t.abort();
        }
        rows.push(row?);
        progress(format!(
            "fleet stream: {clients} JetStream ordered consumers, {rate} results/s"
        ));
        let seen = Arc::new(Seen::default());
        let tasks: Vec<_> = (0..clients)
            .map(|_| rt.spawn(nats_client(server.url(), seen.clone())))
            .collect();
        let row = measure(
            "clients → NATS directly (an ordered consumer each, no TLS)",
            (clients, rate),
            &seen,
            server.proc.pid(),
            fp.stream_warmup,
            fp.stream_window,
        );
        for t in &tasks {
            t.abort();
        }
        rows.push(row?);
        stop.store(true, Ordering::Relaxed);
        published += rt.block_on(publisher)??;
    }
    gw.proc.ensure_running()?;
    gw.proc.stop(Duration::from_secs(10));

    let mut out = String::new();
    let _ = writeln!(
        out,
        "{clients} clients following one tenant's results while a tenth of {rate} results/s, \
         then {rate}, reach NATS ({AGENTS} agents, published through the gateway's bus code; \
         {published} in all), {} s window after {} s each. Latency: from just before a result \
         is published to the client having it. CPU: the server's (the gateway, or \
         nats-server), % of one core. Clients, servers and publisher share the machine.\n",
        fp.stream_window.as_secs(),
        fp.stream_warmup.as_secs()
    );
    out.push_str("| path | clients | results/s published | results/s per client | p50 | p99 | server CPU | CPU per client | note |\n");
    out.push_str("|------|--------:|--------------------:|---------------------:|----:|----:|-----------:|---------------:|------|\n");
    for r in &rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.0} | {:.1} ms | {:.1} ms | {:.0}% | {:.2}% | {} |",
            r.path,
            r.clients,
            r.rate,
            r.per_client,
            r.p50_ms,
            r.p99_ms,
            r.server_cpu,
            r.server_cpu / r.clients as f64,
            r.note
        );
    }
    out.push('\n');
    Ok((out, Vec::new()))
}
