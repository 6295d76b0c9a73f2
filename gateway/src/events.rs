//! The tenant's event stream (`GET /api/v1/events`, see [`crate::api::events`]): results
//! and presence changes as the bus holds them, read from the bus itself, so every gateway
//! of a fleet streams the same events in the same places.
//!
//! An event's id is a [`Cursor`]: where the stream stands in each of the bus's feeds (the
//! tenant's results, its presence events) just after the event. A client that comes back
//! with it (`Last-Event-ID`), on any gateway, reads on from exactly there: nothing missed,
//! nothing twice. Events are never buffered beyond a bounded channel per client: a client
//! reads at its own pace from the bus, so a slow one slows nobody else, and one that
//! stops reading is ended with a reason (see [`follow`]).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, BusError, Ends, Presence};
use crate::registry::Registry;

/// Results or presence events read from the bus at a time.
const BATCH: usize = 256;
/// How long one read waits for something new when the stream is idle.
const IDLE_WAIT: Duration = Duration::from_secs(5);

/// Where a stream stands: the position to read on from in each feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cursor {
    pub results: u64,
    pub presence: u64,
}

impl Cursor {
    /// The event id that names this place: `<results>-<presence>`.
    pub fn id(&self) -> String {
        format!("{}-{}", self.results, self.presence)
    }

    /// An event id read back.
    pub fn parse(id: &str) -> Result<Cursor, String> {
        let bad = || {
            format!(
                "Last-Event-ID {id:?} is not an id this stream gave (two numbers joined by '-'); \
                 reconnect without it to start from now"
            )
        };
        let (r, p) = id.trim().split_once('-').ok_or_else(bad)?;
        Ok(Cursor {
            results: r.parse().map_err(|_| bad())?,
            presence: p.parse().map_err(|_| bad())?,
        })
    }

    pub fn from_ends(e: Ends) -> Cursor {
        Cursor {
            results: e.results,
            presence: e.presence,
        }
    }
}

/// Which events a client wants.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub results: bool,
    pub presence: bool,
    /// Only these agents (fingerprints); empty: all.
    pub agents: BTreeSet<String>,
    /// Only results of checks matching this glob (`*` and `?`).
    pub check: Option<String>,
    /// Only agents with every one of these labels.
    pub labels: Vec<(String, String)>,
    /// Only results that are not OK (presence events: only `lost`).
    pub problems: bool,
}

/// Each client's buffer (events waiting for it, at most) and patience (how long a full
/// buffer may wait before the client is ended as too slow).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub buffer: usize,
    pub stall: Duration,
}

/// One thing a client is sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// An event: its id, type and JSON data.
    Event {
        id: String,
        kind: &'static str,
        data: String,
    },
    /// The stream ended for a reason the client must hear (an `error` event).
    End { reason: String },
}

/// What a client's stream runs with.
pub struct Follow {
    pub bus: Arc<dyn Bus>,
    pub registry: Arc<Registry>,
    pub tenant: String,
    pub from: Cursor,
    pub filter: Filter,
    pub limits: Limits,
    pub stop: CancellationToken,
    /// Counted while the stream runs, and when it ends a client as too slow.
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// Start reading the bus for one client: its events come on the receiver, in bus order
/// within each feed, until the client goes away (the receiver is dropped), the gateway
/// stops, or the client falls behind by a full buffer for `stall` (then the last item is
/// [`Item::End`] with the reason, and the task ends: the client resumes from its last id).
pub fn follow(f: Follow) -> mpsc::Receiver<Item> {
    let (tx, rx) = mpsc::channel(f.limits.buffer.max(1));
    tokio::spawn(async move {
        let stop = f.stop.clone();
        let metrics = f.metrics.clone();
        metrics
            .event_streams
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = run(f, tx) => {}
        }
        metrics
            .event_streams
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    });
    rx
}

/// Why a stream's task stopped sending.
enum Ended {
    /// The client is gone.
    Gone,
    /// Said to the client (or it is gone).
    Told,
}

/// Give the client `item`, waiting for room up to the stall limit.
async fn send(f: &Follow, tx: &mpsc::Sender<Item>, item: Item) -> Result<(), Ended> {
    match tx.send_timeout(item, f.limits.stall).await {
        Ok(()) => Ok(()),
        Err(mpsc::error::SendTimeoutError::Closed(_)) => Err(Ended::Gone),
        Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
            // Full: the reason takes the place of the next event once the client reads
            // again (it makes room by then).
            let reason = format!(
                "too slow: {} events waited for this client more than {} s; reconnect with \
                 Last-Event-ID to resume where it stopped",
                f.limits.buffer,
                f.limits.stall.as_secs()
            );
            crate::metrics::Metrics::inc(&f.metrics.event_streams_too_slow);
            tracing::info!(tenant = %f.tenant, "an event stream client was too slow: ended");
            let end = Item::End { reason };
            // Room is made by the client's next read; the task waits for it no longer
            // than the connection's own write deadline would.
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tx.send_timeout(end, Duration::from_secs(60)).await;
            });
            Err(Ended::Told)
        }
    }
}

async fn run(f: Follow, tx: mpsc::Sender<Item>) {
    let mut at = f.from;
    loop {
        let wait = Duration::ZERO;
        let (results, presence) = tokio::join!(
            read_results(&f, at.results, wait),
            read_presence(&f, at.presence, wait),
        );
        let (results, presence) = match (results, presence) {
            (Ok(r), Ok(p)) if r.is_empty() && p.is_empty() => {
                // Idle: wait on both feeds for whichever has something first.
                tokio::select! {
                    r = read_results(&f, at.results, IDLE_WAIT) => (r, Ok(Batch::at(at.presence))),
                    p = read_presence(&f, at.presence, IDLE_WAIT) => (Ok(Batch::at(at.results)), p),
                }
            }
            other => other,
        };
        let mut failed = None;
        for (batch, feed) in [(presence, Feed::Presence), (results, Feed::Results)] {
            let batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    failed = Some(e);
                    continue;
                }
            };
            if let Some((jumped_to, reason)) = batch.lost {
                feed.set(&mut at, jumped_to);
                let item = Item::Event {
                    id: at.id(),
                    kind: "reset",
                    data: json!({ "feed": feed.name(), "reason": reason }).to_string(),
                };
                if send(&f, &tx, item).await.is_err() {
                    return;
                }
            }
            for (next, kind, data) in batch.events {
                feed.set(&mut at, next);
                if let Some(data) = data {
                    let item = Item::Event {
                        id: at.id(),
                        kind,
                        data,
                    };
                    if send(&f, &tx, item).await.is_err() {
                        return;
                    }
                }
            }
            feed.set(&mut at, batch.next);
        }
        if let Some(e) = failed {
            tracing::warn!(tenant = %f.tenant, error = %e, "an event stream cannot read the bus; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        if tx.is_closed() {
            return;
        }
    }
}

#[derive(Clone, Copy)]
enum Feed {
    Results,
    Presence,
}

impl Feed {
    fn name(self) -> &'static str {
        match self {
            Feed::Results => "results",
            Feed::Presence => "presence",
        }
    }

    fn set(self, at: &mut Cursor, position: u64) {
        match self {
            Feed::Results => at.results = position,
            Feed::Presence => at.presence = position,
        }
    }
}

/// One read of a feed: each event's position after it, type and data (`None`: filtered
/// out, its position still passed), where to read on, and a jump over what retention
/// deleted (the position jumped to, and why).
#[derive(Default)]
struct Batch {
    events: Vec<(u64, &'static str, Option<String>)>,
    next: u64,
    lost: Option<(u64, String)>,
}

impl Batch {
    /// Nothing read: the feed stays at `position`.
    fn at(position: u64) -> Batch {
        Batch {
            next: position,
            ..Batch::default()
        }
    }

    fn is_empty(&self) -> bool {
        self.events.is_empty() && self.lost.is_none()
    }
}

/// Whether the agent passes the filter's agent and label conditions (and its hostname).
fn agent_passes(f: &Follow, fingerprint: &str) -> Option<String> {
    let filter = &f.filter;
    if !filter.agents.is_empty() && !filter.agents.contains(fingerprint) {
        return None;
    }
    let identity = f
        .registry
        .identity(&crate::bus::AgentRef::new(&f.tenant, fingerprint));
    let hostname = identity
        .as_ref()
        .map(|i| i.hostname.clone())
        .unwrap_or_default();
    let labelled = filter.labels.iter().all(|(k, v)| {
        identity
            .as_ref()
            .is_some_and(|i| i.labels.get(k).is_some_and(|x| x == v))
    });
    labelled.then_some(hostname)
}

fn lost_reason(feed: &str, from: u64, to: u64) -> String {
    format!(
        "the {feed} from position {from} on are no longer kept (retention deleted them); the \
         stream goes on from the oldest kept, at {to}: reload what you show"
    )
}

async fn read_results(f: &Follow, from: u64, wait: Duration) -> Result<Batch, BusError> {
    if !f.filter.results {
        return Ok(Batch::at(from));
    }
    let read = f.bus.read_results(&f.tenant, from, BATCH, wait).await?;
    let mut batch = Batch {
        next: read.next,
        ..Batch::default()
    };
    if read.lost {
        // Where the read went on from: just before its first result, or where it ended.
        let to = read.results.first().map_or(read.next, |_| 0);
        batch.lost = Some((to, lost_reason("results", from, to)));
    }
    for (next, agent, result) in read.results {
        let data = (|| {
            if let Some(glob) = &f.filter.check {
                if !crate::alerts::config::glob(glob, &result.check) {
                    return None;
                }
            }
            if f.filter.problems && result.status == outpost_protocol::Status::Ok {
                return None;
            }
            let hostname = agent_passes(f, &agent.fingerprint)?;
            Some(
                json!({
                    "fingerprint": agent.fingerprint,
                    "hostname": hostname,
                    "result": result,
                })
                .to_string(),
            )
        })();
        batch.events.push((next, "result", data));
    }
    Ok(batch)
}

async fn read_presence(f: &Follow, from: u64, wait: Duration) -> Result<Batch, BusError> {
    if !f.filter.presence {
        return Ok(Batch::at(from));
    }
    let read = f.bus.read_presence(&f.tenant, from, BATCH, wait).await?;
    let mut batch = Batch {
        next: read.next,
        ..Batch::default()
    };
    if read.lost {
        let to = read.events.first().map_or(read.next, |_| 0);
        batch.lost = Some((to, lost_reason("presence events", from, to)));
    }
    for (next, event) in read.events {
        let data = (|| {
            if f.filter.check.is_some() {
                return None;
            }
            if f.filter.problems && event.presence != Presence::Lost {
                return None;
            }
            let hostname = agent_passes(f, &event.agent.fingerprint)?;
            Some(
                json!({
                    "fingerprint": event.agent.fingerprint,
                    "hostname": hostname,
                    "presence": event.presence,
                    "at_ms": event.at_ms,
                    "reason": event.reason,
                })
                .to_string(),
            )
        })();
        batch.events.push((next, "presence", data));
    }
    Ok(batch)
}
