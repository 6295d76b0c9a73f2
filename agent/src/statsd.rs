//! StatsD on the agent (opt-in: `[statsd]` in its settings): applications on the host send
//! metrics over UDP or TCP (one line per metric, see [`aggregate`]), aggregated per
//! interval and flushed as results of the check `statsd` through the outbox, so they share
//! its durability: a gateway out of reach loses none of them.
//!
//! The listeners are on `listen` (127.0.0.1:8125 by default: only the host's own
//! programs), UDP and TCP on the same port. At most `max_names` series between two
//! flushes; values for further names are dropped and counted, and the result says so
//! (WARNING). A result carries at most `MAX_METRICS` metrics; more are split over several
//! results of the same flush.

pub mod aggregate;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outpost_protocol::{CheckResult, Metric, Status, MAX_METRICS};
use outpost_sys::lock;
use tokio::io::{AsyncBufReadExt, AsyncReadExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;

use crate::checks::outcome::MAX_METRIC_NAME_BYTES;
use crate::outbox::Outbox;
use aggregate::Aggregator;

/// The check the aggregates are reported under.
pub const STATSD_CHECK: &str = "statsd";
/// Longest line taken over TCP (a UDP datagram is at most 64 KiB anyway).
const MAX_TCP_LINE: usize = 64 * 1024;
/// TCP connections served at once.
const MAX_TCP_CONNECTIONS: usize = 64;

/// `[statsd]` in the agent's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct StatsdSettings {
    pub listen: SocketAddr,
    pub flush: Duration,
    pub max_names: usize,
    pub percentiles: Vec<f64>,
}

/// Bind the listeners on `settings.listen` and run until `shutdown`: the flush loop
/// appends each interval's aggregates to `outbox`, and what the last interval gathered
/// when stopping. Returns the address bound (port 0 picks one) and the flush loop, which
/// ends once its last flush is in the outbox.
pub async fn start(
    settings: StatsdSettings,
    outbox: Arc<dyn Outbox>,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let udp = UdpSocket::bind(settings.listen).await?;
    let addr = udp.local_addr()?;
    let tcp = TcpListener::bind(addr).await?;
    let agg = Arc::new(Mutex::new(Aggregator::new(
        settings.max_names,
        &settings.percentiles,
    )));
    tracing::info!(%addr, "statsd listening (udp and tcp)");
    {
        let (agg, stop) = (agg.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = udp.recv_from(&mut buf) => {
                        if let Ok((n, _)) = r {
                            lock(&agg).take(&String::from_utf8_lossy(&buf[..n]));
                        }
                    }
                }
            }
        });
    }
    {
        let (agg, stop) = (agg.clone(), shutdown.clone());
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_TCP_CONNECTIONS));
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop.cancelled() => return,
                    a = tcp.accept() => a,
                };
                let Ok((stream, _)) = accepted else { continue };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    continue; // (dropped: too many at once)
                };
                let (agg, stop) = (agg.clone(), stop.clone());
                tokio::spawn(async move {
                    let _slot = slot;
                    let mut lines = tokio::io::BufReader::new(stream);
                    let mut line = Vec::new();
                    loop {
                        line.clear();
                        let mut limited = (&mut lines).take(MAX_TCP_LINE as u64 + 1);
                        let read = tokio::select! {
                            _ = stop.cancelled() => return,
                            r = limited.read_until(b'\n', &mut line) => r,
                        };
                        match read {
                            Ok(0) | Err(_) => return,
                            Ok(_) if line.len() > MAX_TCP_LINE => return,
                            Ok(_) => lock(&agg).take(&String::from_utf8_lossy(&line)),
                        }
                    }
                });
            }
        });
    }
    let flusher = tokio::spawn(flush_loop(settings.flush, agg, outbox, shutdown));
    Ok((addr, flusher))
}

async fn flush_loop(
    every: Duration,
    agg: Arc<Mutex<Aggregator>>,
    outbox: Arc<dyn Outbox>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let mut last = Instant::now();
    loop {
        let stopping = tokio::select! {
            _ = shutdown.cancelled() => true,
            _ = tick.tick() => false,
        };
        let secs = last.elapsed().as_secs_f64();
        last = Instant::now();
        let (metrics, lines, refused, dropped) = {
            let mut a = lock(&agg);
            let m = a.flush(secs);
            let counts = (a.lines, a.refused, a.dropped);
            (a.lines, a.refused, a.dropped) = (0, 0, 0);
            (m, counts.0, counts.1, counts.2)
        };
        if metrics.is_empty() && lines == 0 {
            if stopping {
                return;
            }
            continue;
        }
        for r in results(metrics, lines, refused, dropped) {
            if let Err(e) = outbox.append(r) {
                tracing::error!(error = %e, "cannot queue the statsd result");
            }
        }
        if stopping {
            return;
        }
    }
}

/// One flush as results: at most `MAX_METRICS` metrics each.
fn results(
    metrics: Vec<(String, f64)>,
    lines: u64,
    refused: u64,
    dropped: u64,
) -> Vec<CheckResult> {
    let (status, why) = if dropped > 0 {
        (
            Status::Warning,
            format!("; {dropped} values dropped: more series than max_names"),
        )
    } else {
        (Status::Ok, String::new())
    };
    let output = format!(
        "{} metrics from StatsD ({lines} lines, {refused} refused){why}",
        metrics.len()
    );
    let now = crate::util::now_ms();
    let metrics: Vec<Metric> = metrics
        .into_iter()
        .map(|(mut name, value)| {
            crate::util::truncate_utf8(&mut name, MAX_METRIC_NAME_BYTES);
            Metric::new(name, value)
        })
        .collect();
    let chunks: Vec<Vec<Metric>> = if metrics.is_empty() {
        vec![Vec::new()]
    } else {
        metrics
            .chunks(MAX_METRICS)
            .map(<[Metric]>::to_vec)
            .collect()
    };
    chunks
        .into_iter()
        .map(|chunk| CheckResult {
            metrics: chunk,
            started_at_ms: now,
            ..CheckResult::new(STATSD_CHECK, status, output.clone())
        })
        .collect()
}
