//! Metrics from the host's applications (opt-in, each with a table in the agent's
//! settings): StatsD (`[statsd]`, lines aggregated per interval, see [`aggregate`]) and
//! Graphite plaintext (`[graphite]`, `path value [timestamp]`, the latest value of each
//! path per interval), flushed as results of the check `statsd` or `graphite` through the
//! outbox, so they share its durability: a gateway out of reach loses none of them.
//!
//! The listeners are on `listen` (127.0.0.1 by default: only the host's own programs),
//! UDP and TCP on the same port. At most `max_names` series between two flushes; values
//! for further names are dropped and counted, and the result says so (WARNING). A result
//! carries at most `MAX_METRICS` metrics; more are split over several results of the same
//! flush.

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

/// The checks the aggregates are reported under.
pub const STATSD_CHECK: &str = "statsd";
pub const GRAPHITE_CHECK: &str = "graphite";
/// Longest line taken over TCP (a UDP datagram is at most 64 KiB anyway).
const MAX_TCP_LINE: usize = 64 * 1024;
/// Datagrams read from the socket's buffer at a stop, at most.
const DRAIN_MAX: usize = 100_000;
/// TCP connections served at once.
const MAX_TCP_CONNECTIONS: usize = 64;

/// `[statsd]` (with `percentiles`) or `[graphite]` in the agent's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct StatsdSettings {
    pub listen: SocketAddr,
    pub flush: Duration,
    pub max_names: usize,
    pub percentiles: Vec<f64>,
}

/// What the listeners feed: lines in, an interval's metrics out. The listeners and the
/// flush share it under a lock, so the flush only ends the interval under it
/// ([`Intake::end_interval`], cheap) and makes the metrics after ([`Intake::finish`]):
/// datagrams keep being read while a large interval is sorted and formatted.
pub trait Intake: Send + 'static {
    /// An ended interval, as taken out.
    type Ended: Send + 'static;
    /// Take a datagram, or one line of a TCP stream.
    fn take(&mut self, packet: &str);
    /// End the interval and start the next one.
    fn end_interval(&mut self) -> Self::Ended;
    /// The ended interval's metrics (name, value), and the lines taken, refused and values
    /// dropped during it.
    fn finish(ended: Self::Ended, interval_secs: f64) -> Flushed;
}

pub struct Flushed {
    pub metrics: Vec<(String, f64)>,
    pub lines: u64,
    pub refused: u64,
    pub dropped: u64,
}

impl Intake for Aggregator {
    /// The series, and the lines, refused and dropped counts.
    type Ended = (aggregate::Interval, u64, u64, u64);

    fn take(&mut self, packet: &str) {
        Aggregator::take(self, packet)
    }

    fn end_interval(&mut self) -> Self::Ended {
        let counts = (self.lines, self.refused, self.dropped);
        (self.lines, self.refused, self.dropped) = (0, 0, 0);
        (Aggregator::end_interval(self), counts.0, counts.1, counts.2)
    }

    fn finish((interval, lines, refused, dropped): Self::Ended, interval_secs: f64) -> Flushed {
        let (metrics, not_finite) = interval.metrics(interval_secs);
        Flushed {
            metrics,
            lines,
            refused: refused + not_finite,
            dropped,
        }
    }
}

/// Graphite plaintext from applications: the latest value of each path per interval.
pub struct LatestValues {
    values: std::collections::BTreeMap<String, f64>,
    max_names: usize,
    lines: u64,
    refused: u64,
    dropped: u64,
}

impl LatestValues {
    pub fn new(max_names: usize) -> LatestValues {
        LatestValues {
            values: Default::default(),
            max_names,
            lines: 0,
            refused: 0,
            dropped: 0,
        }
    }
}

impl Intake for LatestValues {
    fn take(&mut self, packet: &str) {
        for line in packet.split('\n').filter(|l| !l.trim().is_empty()) {
            self.lines += 1;
            match crate::collectors::data::parse_graphite(line.trim_end_matches('\r')) {
                Some(g) if g.value.is_finite() => {
                    if !self.values.contains_key(g.path) && self.values.len() >= self.max_names {
                        self.dropped += 1;
                    } else {
                        self.values.insert(g.path.to_string(), g.value);
                    }
                }
                _ => self.refused += 1,
            }
        }
    }

    type Ended = Flushed;

    fn end_interval(&mut self) -> Flushed {
        let f = Flushed {
            metrics: std::mem::take(&mut self.values).into_iter().collect(),
            lines: self.lines,
            refused: self.refused,
            dropped: self.dropped,
        };
        (self.lines, self.refused, self.dropped) = (0, 0, 0);
        f
    }

    fn finish(ended: Flushed, _interval_secs: f64) -> Flushed {
        ended
    }
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
    let agg = Aggregator::new(settings.max_names, &settings.percentiles);
    listen(STATSD_CHECK, agg, &settings, outbox, shutdown).await
}

/// [`start`] for Graphite plaintext (`[graphite]`).
pub async fn start_graphite(
    settings: StatsdSettings,
    outbox: Arc<dyn Outbox>,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let latest = LatestValues::new(settings.max_names);
    listen(GRAPHITE_CHECK, latest, &settings, outbox, shutdown).await
}

async fn listen(
    check: &'static str,
    intake: impl Intake,
    settings: &StatsdSettings,
    outbox: Arc<dyn Outbox>,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let udp = UdpSocket::bind(settings.listen).await?;
    let addr = udp.local_addr()?;
    let tcp = TcpListener::bind(addr).await?;
    let agg = Arc::new(Mutex::new(intake));
    tracing::info!(%addr, check, "listening for the host's metrics (udp and tcp)");
    let datagrams = {
        let (agg, stop) = (agg.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    r = udp.recv_from(&mut buf) => {
                        if let Ok((n, _)) = r {
                            lock(&agg).take(&String::from_utf8_lossy(&buf[..n]));
                        }
                    }
                }
            }
            // Stopping: what already arrived goes into the last interval, not away with
            // the socket (bounded: more than a socket buffer holds, and a flood does not
            // keep the task reading).
            // (Through the std socket: tokio's `try_recv_from` answers "would block"
            // until its reactor has seen the socket readable, which it may not have yet.)
            let Ok(udp) = udp.into_std() else { return };
            for _ in 0..DRAIN_MAX {
                let Ok((n, _)) = udp.recv_from(&mut buf) else {
                    break; // (nothing more waiting: the socket is non-blocking)
                };
                lock(&agg).take(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    {
        let (agg, stop) = (agg.clone(), shutdown.clone());
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_TCP_CONNECTIONS));
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop.cancelled() => return,
                    a = tcp.accept() => a,
                };
                let Ok((stream, _)) = accepted else {
                    // (Out of descriptors, say: not a busy loop.)
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
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
    let flusher = tokio::spawn(flush_loop(
        check,
        settings.flush,
        agg,
        outbox,
        shutdown,
        datagrams,
    ));
    Ok((addr, flusher))
}

async fn flush_loop<I: Intake>(
    check: &'static str,
    every: Duration,
    agg: Arc<Mutex<I>>,
    outbox: Arc<dyn Outbox>,
    shutdown: CancellationToken,
    mut datagrams: tokio::task::JoinHandle<()>,
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let mut last = Instant::now();
    loop {
        let stopping = tokio::select! {
            _ = shutdown.cancelled() => true,
            _ = tick.tick() => false,
        };
        if stopping {
            // The datagrams that arrived before the stop, read first (briefly: a flood
            // does not hold the stop up).
            let _ = tokio::time::timeout(Duration::from_secs(1), &mut datagrams).await;
        }
        let secs = last.elapsed().as_secs_f64();
        last = Instant::now();
        let ended = lock(&agg).end_interval();
        let Flushed {
            metrics,
            lines,
            refused,
            dropped,
        } = I::finish(ended, secs);
        if metrics.is_empty() && lines == 0 {
            if stopping {
                return;
            }
            continue;
        }
        for r in results(check, metrics, lines, refused, dropped) {
            if let Err(e) = outbox.append(r) {
                tracing::error!(error = %e, check, "cannot queue the result of the host's metrics");
            }
        }
        if stopping {
            return;
        }
    }
}

/// One flush as results: at most `MAX_METRICS` metrics each.
fn results(
    check: &'static str,
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
    let from = if check == STATSD_CHECK {
        "StatsD"
    } else {
        "Graphite"
    };
    let output = format!(
        "{} metrics from {from} ({lines} lines, {refused} refused){why}",
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
            ..CheckResult::new(check, status, output.clone())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::MemoryOutbox;

    /// Datagrams that reached the socket before the stop are in the last flush, not lost
    /// with the socket. (On a current-thread runtime the listener reads nothing until the
    /// test yields, so all of them are still in the socket's buffer at the stop.)
    #[tokio::test]
    async fn datagrams_waiting_at_a_stop_go_into_the_last_flush() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Arc::new(MemoryOutbox::open(dir.path(), 100).unwrap());
        let stop = CancellationToken::new();
        let settings = StatsdSettings {
            listen: "127.0.0.1:0".parse().unwrap(),
            flush: Duration::from_secs(3600),
            max_names: 100,
            percentiles: vec![],
        };
        let (addr, flusher) = start(settings, outbox.clone(), stop.clone()).await.unwrap();
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..100 {
            sock.send_to(b"waiting:1|c", addr).unwrap();
        }
        stop.cancel();
        flusher.await.unwrap();
        let flushed = outbox.pending_after(0, 10);
        let count = flushed
            .iter()
            .flat_map(|r| &r.metrics)
            .find(|m| m.name == "waiting")
            .map(|m| m.value);
        assert_eq!(count, Some(100.0), "flushed: {flushed:?}");
    }
}
