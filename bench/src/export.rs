//! Part 13: metric export. Samples per second the gateway exports to a real Prometheus by
//! remote-write, from a backlog on its bus, next to a raw client posting the same samples
//! (the gateway's own mapping and encoding, the same batch size, one request at a time, as
//! the exporter sends them) to the same Prometheus in the same run, before and after.
//!
//! The bus is filled from this process through the gateway's bus code (results of
//! simulated agents, one `load` check each, with three perfdata metrics and their
//! thresholds: 14 samples a result), then the release gateway starts on it with an
//! `[[export]]` sink `from = "start"`: the whole backlog is what it exports. Every row's
//! samples are then counted back with PromQL, so a figure is of samples Prometheus holds.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use outpost_gateway::bus::{AgentRef, Bus};
use outpost_gateway::export::{config::DEFAULT_BATCH, mapping, sinks};
use outpost_protocol::CheckResult;

use crate::fleet::alerting::alertmanager::{request, wait_ready};
use crate::fleet::history::load_result;
use crate::fleet::https::Client;
use crate::fleet::loadgen;
use crate::fleet::nats::free_port;
use crate::harness::{spawn_logged, Bins, Gateway, Proc};
use crate::sample::Series;
use crate::{progress, Plan};

/// The series families a result gives (gateway/src/export/mapping.rs).
const FAMILIES: [&str; 7] = [
    "outpost_check_status",
    "outpost_check_duration_seconds",
    "outpost_check_metric",
    "outpost_check_metric_warn",
    "outpost_check_metric_crit",
    "outpost_check_metric_min",
    "outpost_check_metric_max",
];

/// Results the exporter reads from the bus at a time (`READ_MAX` in
/// gateway/src/exporting.rs): it sends what is left of a read before the next.
const READ: usize = 1000;

/// Each simulated agent's check runs this often.
const EVERY_MS: u64 = 10_000;
/// The tenant the gateway exports; the raw rows label theirs apart.
const TENANT: &str = "default";

/// A Prometheus with its remote-write receiver on.
struct Prometheus {
    proc: Proc,
    port: u16,
    version: String,
}

impl Prometheus {
    fn start(rt: &tokio::runtime::Runtime, dir: &Path) -> Result<Prometheus> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let config = dir.join("prometheus.yml");
        std::fs::write(&config, "global:\n  scrape_interval: 1m\n")?;
        let port = free_port()?;
        let version = Command::new("prometheus")
            .arg("--version")
            .output()
            .map(|o| {
                let text = [o.stdout, o.stderr].concat();
                let text = String::from_utf8_lossy(&text);
                text.lines().next().unwrap_or_default().trim().to_string()
            })
            .context("cannot run prometheus (apt-get install prometheus)")?;
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--web.enable-remote-write-receiver")
            .arg("--log.level=warn");
        let mut proc = spawn_logged("prometheus", cmd, &dir.join("prometheus.log"))?;
        wait_ready(
            rt.handle(),
            &mut proc,
            port,
            "Prometheus",
            Duration::from_secs(60),
        )?;
        Ok(Prometheus {
            proc,
            port,
            version,
        })
    }

    fn write_url(&self) -> String {
        format!("http://127.0.0.1:{}/api/v1/write", self.port)
    }

    /// The number of samples of `tenant` Prometheus holds (every series, the last hour
    /// and a half).
    fn count(&self, rt: &tokio::runtime::Runtime, tenant: &str, span: &Span) -> Result<u64> {
        let mut n = 0;
        // One family at a time: `count_over_time` drops the name, so families with the
        // same labels would collide in one vector.
        for family in FAMILIES {
            n += self.count_of(rt, &format!("{family}{{tenant=\"{tenant}\"}}"), span)?;
        }
        Ok(n)
    }

    fn count_of(&self, rt: &tokio::runtime::Runtime, selector: &str, span: &Span) -> Result<u64> {
        let query = format!("sum(count_over_time({selector}[{}m]))", span.minutes + 2);
        let path = format!(
            "/api/v1/query?query={}&time={:.3}",
            encode(&query),
            span.end_ms as f64 / 1000.0 + 1.0
        );
        let (status, body) = rt.block_on(request(self.port, "GET", &path, None))?;
        if status != 200 {
            bail!("Prometheus answered {status} to {query}");
        }
        let v: serde_json::Value = serde_json::from_slice(&body)?;
        let Some(first) = v["data"]["result"].as_array().and_then(|a| a.first()) else {
            return Ok(0);
        };
        first["value"][1]
            .as_str()
            .and_then(|s| s.parse::<f64>().ok())
            .map(|n| n as u64)
            .ok_or_else(|| anyhow!("no count in Prometheus's answer: {v}"))
    }
}

/// The backlog's time span: `minutes` ending at `end_ms`.
struct Span {
    minutes: u64,
    end_ms: u64,
}

/// `s` percent-encoded for a URL's query.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The backlog: `agents` agents' results over `minutes` ending `end`, in the order they
/// reach the bus (time steps in order, so each series' samples are in order).
fn backlog(agents: usize, minutes: u64, end: u64) -> Vec<(String, Vec<CheckResult>)> {
    let steps = minutes * 60_000 / EVERY_MS;
    let start = end - steps * EVERY_MS;
    (0..agents)
        .map(|i| {
            let results = (0..steps)
                .map(|k| {
                    load_result(
                        k + 1,
                        "load",
                        start + k * EVERY_MS + (i as u64 * 7919) % EVERY_MS,
                    )
                })
                .collect();
            (loadgen::fingerprint(), results)
        })
        .collect()
}

/// Publish the backlog on the embedded bus in `data_dir/bus`, a time step (a result of
/// every agent) at a time.
async fn fill(bus_dir: &Path, backlog: &[(String, Vec<CheckResult>)]) -> Result<()> {
    let retention = outpost_gateway::bus::segments::Retention {
        max_age: Duration::from_secs(30 * 24 * 3600),
        max_bytes: 0,
    };
    let (bus, _) = outpost_gateway::bus::embedded::EmbeddedBus::open(bus_dir, retention, TENANT)
        .await
        .context("cannot open the embedded bus")?;
    let bus: Arc<dyn Bus> = Arc::new(bus);
    let agents = backlog.len();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (fp, batch)) in batches(backlog).enumerate() {
        let (bus, agent, batch) = (bus.clone(), AgentRef::new(TENANT, fp), batch.to_vec());
        tasks.spawn(async move {
            let published = bus.publish_results(&agent, &batch).await?;
            if published.accepted != batch.len() {
                bail!(
                    "the bus took {} of {} results",
                    published.accepted,
                    batch.len()
                );
            }
            Ok(())
        });
        // An agent's next batch only once its previous one is on the bus (the bus takes
        // an agent's results in sequence order, dropping any behind one it has): all of
        // a minute's batches before the next minute's.
        if (i + 1) % agents == 0 {
            while let Some(r) = tasks.join_next().await {
                r??;
            }
        }
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(())
}

/// Results an agent sends at once (a minute of its check, as after a short outage).
const PER_BATCH: usize = 6;

/// The backlog in the order it goes onto the bus, one agent's batch at a time: a minute of
/// every agent, then the next minute (each series' samples stay in order). The raw client
/// posts in this order too, so that both send Prometheus the same series in each request.
fn batches(
    backlog: &[(String, Vec<CheckResult>)],
) -> impl Iterator<Item = (&str, &[CheckResult])> + '_ {
    let steps = backlog.first().map_or(0, |(_, r)| r.len());
    (0..steps).step_by(PER_BATCH).flat_map(move |from| {
        backlog
            .iter()
            .map(move |(fp, r)| (fp.as_str(), &r[from..(from + PER_BATCH).min(steps)]))
    })
}

struct Row {
    what: String,
    samples: u64,
    /// Counted by the raw client; the gateway's are not counted.
    requests: Option<u64>,
    took: Duration,
    /// The sender's CPU (the gateway, or this tool's), % of one core.
    sender_cpu: f64,
    prom_cpu: f64,
    /// Samples of the row Prometheus holds afterwards.
    held: u64,
}

/// The raw client: the same results through the gateway's mapping and encoding, labelled
/// `tenant`, in the exporter's requests (whole results, at most `batch` samples, cut at
/// each read of [`READ`] results) on one kept-alive connection, each request
/// after the previous one's answer.
fn raw(
    rt: &tokio::runtime::Runtime,
    prom: &Prometheus,
    backlog: &[(String, Vec<CheckResult>)],
    span: &Span,
    tenant: &str,
) -> Result<Row> {
    let mut me = Series::start(std::process::id())?;
    let mut prom_cpu = Series::start(prom.proc.pid())?;
    let t0 = Instant::now();
    let (samples, requests) = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", prom.port)).await?;
        let _ = tcp.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .context("HTTP handshake with Prometheus failed")?;
        tokio::spawn(conn);
        let (mut samples, mut requests) = (0u64, 0u64);
        let results: Vec<(&str, &CheckResult)> = batches(backlog)
            .flat_map(|(fp, batch)| batch.iter().map(move |r| (fp, r)))
            .collect();
        for read in results.chunks(READ) {
            // As the exporter makes its requests: whole results, at most `batch` samples
            // a request, and what is left at the end of each read of `READ` results.
            let mut bodies = Vec::new();
            let mut pending: Vec<mapping::Sample> = Vec::with_capacity(DEFAULT_BATCH * 2);
            for (fp, result) in read {
                let more = mapping::samples(tenant, fp, None, result);
                if !pending.is_empty() && pending.len() + more.len() > DEFAULT_BATCH {
                    bodies.push((pending.len(), sinks::remote_write_body(&pending)));
                    pending.clear();
                }
                pending.extend(more);
            }
            if !pending.is_empty() {
                bodies.push((pending.len(), sinks::remote_write_body(&pending)));
            }
            for (n, body) in bodies {
                let req = hyper::Request::builder()
                    .method("POST")
                    .uri("/api/v1/write")
                    .header("host", format!("127.0.0.1:{}", prom.port))
                    .header("content-type", "application/x-protobuf")
                    .header("content-encoding", "snappy")
                    .header("x-prometheus-remote-write-version", "0.1.0")
                    .body(Full::new(Bytes::from(body)))?;
                sender
                    .ready()
                    .await
                    .context("Prometheus closed the connection")?;
                let resp = sender.send_request(req).await?;
                let status = resp.status().as_u16();
                let answer = resp.into_body().collect().await?.to_bytes();
                if !(200..300).contains(&status) {
                    bail!(
                        "Prometheus answered {status}: {}",
                        String::from_utf8_lossy(&answer)
                    );
                }
                samples += n as u64;
                requests += 1;
            }
        }
        Ok::<_, anyhow::Error>((samples, requests))
    })?;
    let took = t0.elapsed();
    me.take()?;
    prom_cpu.take()?;
    Ok(Row {
        what: format!("raw client (this tool), `tenant=\"{tenant}\"`"),
        samples,
        requests: Some(requests),
        took,
        sender_cpu: me.usage()?.cpu_pct,
        prom_cpu: prom_cpu.usage()?.cpu_pct,
        held: prom.count(rt, tenant, span)?,
    })
}

/// The sum of a counter of the export over the gateway's `/metrics`.
async fn export_counter(c: &mut Client, name: &str) -> Result<u64> {
    let a = c.call("GET", "/metrics").await?;
    if a.status != 200 {
        bail!("GET /metrics answered {}", a.status);
    }
    let text = String::from_utf8_lossy(&a.body);
    Ok(text
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64)
}

/// The gateway started on the filled bus with a remote-write sink: from its start to the
/// last sample taken.
fn exported(
    bins: &Bins,
    dir: &Path,
    rt: &tokio::runtime::Runtime,
    prom: &Prometheus,
    want: u64,
    span: &Span,
) -> Result<Row> {
    let checks = Gateway::data_dir_in(dir).join("checks.d");
    std::fs::create_dir_all(&checks)?;
    std::fs::write(
        checks.join("export.toml"),
        format!(
            "[[export]]\nname = \"prom\"\nremote_write = {{ url = {:?} }}\nfrom = \"start\"\nbatch = {DEFAULT_BATCH}\n",
            prom.write_url()
        ),
    )?;
    let mut prom_cpu = Series::start(prom.proc.pid())?;
    let t0 = Instant::now();
    let mut gw = Gateway::start_with(bins, dir, &["--results-max-bytes".into(), "0".into()])?;
    let mut gw_cpu = Series::start(gw.proc.pid())?;
    let token = gw.api_token()?;
    let addr = crate::fleet::gateway_addr(&gw)?;
    let outcome = rt.block_on(async {
        let mut c = Client::connect(addr, &gw.pin, &token).await?;
        let deadline = Instant::now() + Duration::from_secs(1800);
        let mut first = None;
        loop {
            let sent = export_counter(&mut c, "outpost_export_samples_sent_total").await?;
            if sent > 0 && first.is_none() {
                first = Some(t0.elapsed());
            }
            if sent >= want {
                return Ok::<_, anyhow::Error>(first);
            }
            let refused = export_counter(&mut c, "outpost_export_samples_refused_total").await?;
            if refused > 0 {
                bail!("Prometheus refused {refused} samples (see its log)");
            }
            if Instant::now() > deadline {
                bail!("the export took {sent} of {want} samples in 30 minutes");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let took = t0.elapsed();
    gw_cpu.take()?;
    prom_cpu.take()?;
    let requests = rt.block_on(async {
        let mut c = Client::connect(addr, &gw.pin, &token).await?;
        export_counter(&mut c, "outpost_export_failed_requests_total").await
    });
    gw.proc.stop(Duration::from_secs(10));
    let first = outcome?.unwrap_or(took);
    let failed = requests?;
    Ok(Row {
        what: format!(
            "gateway: backlog on its bus → `[[export]]` remote-write (from its start; the first samples were taken {:.2} s after it: {:.0} samples/s from them){}",
            first.as_secs_f64(),
            want as f64 / (took - first).as_secs_f64().max(1e-3),
            if failed > 0 {
                format!(" ({failed} requests failed and were retried)")
            } else {
                String::new()
            }
        ),
        samples: want,
        requests: None,
        took,
        sender_cpu: gw_cpu.usage()?.cpu_pct,
        prom_cpu: prom_cpu.usage()?.cpu_pct,
        held: prom.count(rt, TENANT, span)?,
    })
}

pub fn export(bins: &Bins, work: &Path, plan: &Plan) -> Result<(String, Vec<String>)> {
    let dir = work.join("export");
    let rt = loadgen::runtime()?;
    let (agents, minutes) = if plan.quick { (100, 10) } else { (1000, 40) };
    let span = Span {
        minutes,
        end_ms: crate::now_ms(),
    };
    let backlog = backlog(agents, minutes, span.end_ms);
    let results: u64 = backlog.iter().map(|(_, r)| r.len() as u64).sum();
    let per_result = mapping::samples(TENANT, "x", None, &backlog[0].1[0]).len() as u64;
    let want = results * per_result;
    progress(format!(
        "export: {results} results ({want} samples) onto the bus"
    ));
    super::fleet::prepare_gateway_dir(&dir, None, None)?;
    rt.block_on(fill(&Gateway::data_dir_in(&dir).join("bus"), &backlog))?;
    let prom = Prometheus::start(&rt, &dir.join("prometheus"))?;
    crate::wait_for_quiet(plan.quiet_wait)?;
    progress("export: the raw client, before");
    let before = raw(&rt, &prom, &backlog, &span, "raw-before")?;
    progress("export: the gateway");
    let gateway = exported(bins, &dir, &rt, &prom, want, &span)?;
    progress("export: the raw client, after");
    let after = raw(&rt, &prom, &backlog, &span, "raw-after")?;
    let rate = |r: &Row| r.samples as f64 / r.took.as_secs_f64();
    let raw_mean = (rate(&before) + rate(&after)) / 2.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "A backlog of {results} results ({agents} simulated agents, one `load` check every \
         10 s for {minutes} minutes, three perfdata metrics with thresholds: {per_result} \
         samples each, {want} in all) on the gateway's embedded bus, exported to {} by \
         remote-write (`[[export]]`, `from = \"start\"`, `batch = {DEFAULT_BATCH}`) from \
         the gateway's start to the last sample taken (its `/metrics`); next to this tool \
         posting the same samples (the gateway's mapping and protobuf + snappy encoding, \
         the gateway's requests: whole results, at most {DEFAULT_BATCH} samples, cut at each read of {READ} results; one request at a time on a kept-alive connection, \
         labelled with another tenant so that they are new series) to the same Prometheus, \
         before and after. Held: the row's samples Prometheus counts afterwards \
         (`sum(count_over_time(FAMILY{{tenant=…}}[…]))` over the backlog's span, for each family). CPU: % of one core over the row.\n",
        prom.version
    );
    out.push_str(
        "| sender | samples | requests | took | **samples/s** | held by Prometheus | sender's CPU | Prometheus's CPU |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in [&before, &gateway, &after] {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.2} s | **{:.0}** | {} | {:.0}% | {:.0}% |",
            r.what,
            r.samples,
            r.requests.map_or("–".to_string(), |n| n.to_string()),
            r.took.as_secs_f64(),
            rate(r),
            r.held,
            r.sender_cpu,
            r.prom_cpu
        );
    }
    out.push('\n');
    let mut goals = vec![format!(
        "Export by remote-write: {:.0} samples/s from the bus, {:.0}% of a raw client's {:.0}/s posting the same samples to the same Prometheus (mean of before and after).",
        rate(&gateway),
        rate(&gateway) / raw_mean * 100.0,
        raw_mean
    )];
    for r in [&before, &gateway, &after] {
        if r.held != r.samples {
            goals.push(format!(
                "Export: {} sent {} samples but Prometheus holds {}.",
                r.what, r.samples, r.held
            ));
        }
    }
    Ok((out, goals))
}
