//! The tenant's event stream (`GET /api/v1/events`, see [`crate::api::events`]): results
//! and presence changes as the bus holds them, read from the bus itself, so every gateway
//! of a fleet streams the same events in the same places.
//!
//! An event's id is a [`Cursor`]: where the stream stands in each of the bus's feeds (the
//! tenant's results, its presence events, its alert and silence changes) just after the
//! event. A client that comes back
//! with it (`Last-Event-ID`), on any gateway, reads on from exactly there: nothing missed,
//! nothing twice. Events are never buffered beyond a bounded channel per client: a client
//! reads at its own pace, so a slow one slows nobody else, and one that stops reading is
//! ended with a reason (see [`follow`]). Clients that have caught up read from one shared
//! window per tenant and feed ([`tails`]); only a client that is behind reads the bus.

pub mod tails;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::bus::{AgentRef, Bus, BusError, Ends, FeedRead, Presence};
use crate::registry::Registry;
use tails::{AllTails, ReadFn, Shared};

/// Results or presence events read from the bus at a time.
const BATCH: usize = 256;
/// How long one read waits for something new when the stream is idle.
const IDLE_WAIT: Duration = Duration::from_secs(5);

/// Where a stream stands: the position to read on from in each feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cursor {
    pub results: u64,
    pub presence: u64,
    pub alerts: u64,
}

impl Cursor {
    /// The event id that names this place: `<results>-<presence>-<alerts>`.
    pub fn id(&self) -> String {
        format!("{}-{}-{}", self.results, self.presence, self.alerts)
    }

    /// An event id read back.
    pub fn parse(id: &str) -> Result<Cursor, String> {
        let bad = || {
            format!(
                "Last-Event-ID {id:?} is not an id this stream gave (three numbers joined by \
                 '-'); reconnect without it to start from now"
            )
        };
        let parts: Vec<u64> = id
            .trim()
            .split('-')
            .map(|n| n.parse().map_err(|_| bad()))
            .collect::<Result<_, _>>()?;
        match parts[..] {
            [results, presence, alerts] => Ok(Cursor {
                results,
                presence,
                alerts,
            }),
            _ => Err(bad()),
        }
    }

    pub fn from_ends(e: Ends) -> Cursor {
        Cursor {
            results: e.results,
            presence: e.presence,
            alerts: e.alerts,
        }
    }
}

/// Which events a client wants.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub results: bool,
    pub presence: bool,
    pub alerts: bool,
    pub silences: bool,
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
    /// Whether the client may still read the tenant's events (its token not revoked, its
    /// tenant not disabled, deleted or made again): asked every [`RECHECK`]; the reason
    /// ends the stream when not.
    pub allowed: Box<dyn Fn() -> Result<(), String> + Send + Sync>,
    /// The gateway's shared windows of the feeds, and the key of this tenant's.
    pub tails: Arc<AllTails>,
    pub window: String,
}

/// A result as every stream of the tenant sends it: what streams filter on, and its data
/// (with the agent's host name) made once.
pub struct ResultItem {
    fingerprint: String,
    check: String,
    status: outpost_protocol::Status,
    data: String,
}

/// A presence change, likewise.
pub struct PresenceItem {
    fingerprint: String,
    presence: Presence,
    data: String,
}

impl tails::Weigh for ResultItem {
    fn weight(&self) -> usize {
        self.data.len() + self.fingerprint.len() + self.check.len() + 64
    }
}

impl tails::Weigh for PresenceItem {
    fn weight(&self) -> usize {
        self.data.len() + self.fingerprint.len() + 64
    }
}

/// Alert and silence changes are few and small: counted at a fixed size.
impl tails::Weigh for serde_json::Value {
    fn weight(&self) -> usize {
        1024
    }
}

fn hostname(registry: &Registry, agent: &AgentRef) -> String {
    registry
        .identity(agent)
        .map(|i| i.hostname)
        .unwrap_or_default()
}

fn result_item(
    registry: &Registry,
    agent: AgentRef,
    result: outpost_protocol::CheckResult,
) -> ResultItem {
    let data = json!({
        "fingerprint": agent.fingerprint,
        "hostname": hostname(registry, &agent),
        "result": result,
    })
    .to_string();
    ResultItem {
        fingerprint: agent.fingerprint,
        check: result.check,
        status: result.status,
        data,
    }
}

fn presence_item(registry: &Registry, event: crate::bus::PresenceEvent) -> PresenceItem {
    let data = json!({
        "fingerprint": event.agent.fingerprint,
        "hostname": hostname(registry, &event.agent),
        "presence": event.presence,
        "at_ms": event.at_ms,
        "reason": event.reason,
    })
    .to_string();
    PresenceItem {
        fingerprint: event.agent.fingerprint,
        presence: event.presence,
        data,
    }
}

/// How a read of each feed is made into the items streams send: from the bus, `max` at
/// most, waiting up to `wait`; `follow` for the one reader that reads on and on (the
/// shared window's: [`Bus::follow_results`]).
async fn results_of(
    bus: &dyn Bus,
    registry: &Registry,
    tenant: &str,
    (from, max, wait): (u64, usize, Duration),
    follow: bool,
) -> Result<FeedRead<Shared<ResultItem>>, BusError> {
    let got = if follow {
        bus.follow_results(tenant, from, max, wait).await?
    } else {
        bus.read_results(tenant, from, max, wait).await?
    };
    Ok(FeedRead::from(got).map(|(agent, result)| Arc::new(result_item(registry, agent, result))))
}

async fn presence_of(
    bus: &dyn Bus,
    registry: &Registry,
    tenant: &str,
    (from, max, wait): (u64, usize, Duration),
) -> Result<FeedRead<Shared<PresenceItem>>, BusError> {
    let got = bus.read_presence(tenant, from, max, wait).await?;
    Ok(got.map(|e| Arc::new(presence_item(registry, e))))
}

async fn alerts_of(
    bus: &dyn Bus,
    tenant: &str,
    (from, max, wait): (u64, usize, Duration),
) -> Result<FeedRead<Shared<serde_json::Value>>, BusError> {
    Ok(bus
        .read_alert_events(tenant, from, max, wait)
        .await?
        .map(Arc::new))
}

/// How the shared windows read each feed.
struct Readers {
    results: ReadFn<ResultItem>,
    presence: ReadFn<PresenceItem>,
    alerts: ReadFn<serde_json::Value>,
}

/// What a window's reader waits (see [`ReadFn`]).
fn window_wait(wait: bool) -> Duration {
    if wait {
        tails::READ_WAIT
    } else {
        Duration::ZERO
    }
}

impl Readers {
    fn new(registry: &Arc<Registry>) -> Readers {
        let r = registry.clone();
        // (Always waiting: a bus's follower is woken by what comes, and one that polls
        // polls at its reader's pace.)
        let results: ReadFn<ResultItem> = Arc::new(move |bus: Arc<dyn Bus>, tenant, from, _| {
            let registry = r.clone();
            Box::pin(async move {
                let how = (from, tails::READ, tails::READ_WAIT);
                results_of(&*bus, &registry, &tenant, how, true).await
            })
        });
        let r = registry.clone();
        let presence: ReadFn<PresenceItem> =
            Arc::new(move |bus: Arc<dyn Bus>, tenant, from, wait| {
                let registry = r.clone();
                Box::pin(async move {
                    let how = (from, tails::READ, window_wait(wait));
                    presence_of(&*bus, &registry, &tenant, how).await
                })
            });
        let alerts: ReadFn<serde_json::Value> =
            Arc::new(move |bus: Arc<dyn Bus>, tenant, from, wait| {
                Box::pin(async move {
                    alerts_of(&*bus, &tenant, (from, tails::READ, window_wait(wait))).await
                })
            });
        Readers {
            results,
            presence,
            alerts,
        }
    }
}

/// `f`'s read of one feed: from the shared window when `from` is in it, else from the bus
/// (`direct`, waiting up to `wait`, which also says what retention deleted).
async fn shared_read<T: tails::Weigh + Send + Sync + 'static>(
    f: &Follow,
    tails: &tails::Tails<T>,
    read: &ReadFn<T>,
    (from, wait): (u64, Duration),
    end: impl Fn(Ends) -> u64,
    direct: impl std::future::Future<Output = Result<FeedRead<Shared<T>>, BusError>>,
) -> Result<FeedRead<Shared<T>>, BusError> {
    let end_now = async { Ok(end(f.bus.ends(&f.tenant).await?)) };
    match tails
        .read(
            &f.bus,
            read,
            (&f.tenant, &f.window),
            (from, BATCH, wait),
            end_now,
        )
        .await?
    {
        Some(got) => Ok(got),
        None => direct.await,
    }
}

/// How often a stream asks again whether its client may read on.
const RECHECK: Duration = Duration::from_secs(5);

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
    let readers = Readers::new(&f.registry);
    let f = &f;
    let readers = &readers;
    let mut at = f.from;
    let mut checked = tokio::time::Instant::now();
    loop {
        if checked.elapsed() >= RECHECK {
            checked = tokio::time::Instant::now();
            if let Err(reason) = (f.allowed)() {
                tracing::info!(tenant = %f.tenant, %reason, "an event stream's client may no longer read: ended");
                // Said if there is room (a full buffer is not this client's fault to count).
                let _ = tx.try_send(Item::End { reason });
                return;
            }
        }
        let wait = Duration::ZERO;
        let (results, presence, alerts) = tokio::join!(
            read_results(f, readers, at.results, wait),
            read_presence(f, readers, at.presence, wait),
            read_alerts(f, readers, at.alerts, wait),
        );
        let idle = [&results, &presence, &alerts]
            .iter()
            .all(|b| b.as_ref().is_ok_and(Batch::is_empty));
        let (results, presence, alerts) = if idle {
            // Idle: wait on every feed for whichever has something first. (A feed the
            // client did not ask for is not waited on: its read would be ready at once
            // and the wait would spin.)
            let (r, p, a) = (
                Batch::at(at.results),
                Batch::at(at.presence),
                Batch::at(at.alerts),
            );
            tokio::select! {
                r = read_results(f, readers, at.results, IDLE_WAIT), if f.filter.results => (r, Ok(p), Ok(a)),
                p = read_presence(f, readers, at.presence, IDLE_WAIT), if f.filter.presence => (Ok(r), p, Ok(a)),
                a = read_alerts(f, readers, at.alerts, IDLE_WAIT), if f.filter.alerts || f.filter.silences => (Ok(r), Ok(p), a),
            }
        } else {
            (results, presence, alerts)
        };
        let mut failed = None;
        for (batch, feed) in [
            (presence, Feed::Presence),
            (alerts, Feed::Alerts),
            (results, Feed::Results),
        ] {
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
                if send(f, &tx, item).await.is_err() {
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
                    if send(f, &tx, item).await.is_err() {
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
    Alerts,
}

impl Feed {
    fn name(self) -> &'static str {
        match self {
            Feed::Results => "results",
            Feed::Presence => "presence",
            Feed::Alerts => "alerts",
        }
    }

    fn set(self, at: &mut Cursor, position: u64) {
        match self {
            Feed::Results => at.results = position,
            Feed::Presence => at.presence = position,
            Feed::Alerts => at.alerts = position,
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
/// Whether the agent passes the filter's agent and label conditions (the registry is
/// asked only when there are labels to match: this runs for every event of every stream).
fn agent_passes(f: &Follow, fingerprint: &str) -> Option<()> {
    let filter = &f.filter;
    if !filter.agents.is_empty() && !filter.agents.contains(fingerprint) {
        return None;
    }
    if filter.labels.is_empty() {
        return Some(());
    }
    let identity = f
        .registry
        .identity(&AgentRef::new(&f.tenant, fingerprint))?;
    filter
        .labels
        .iter()
        .all(|(k, v)| identity.labels.get(k).is_some_and(|x| x == v))
        .then_some(())
}

fn lost_reason(feed: &str, from: u64, to: u64) -> String {
    format!(
        "the {feed} from position {from} on are no longer kept (retention deleted them); the \
         stream goes on from the oldest kept, at {to}: reload what you show"
    )
}

async fn read_results(
    f: &Follow,
    readers: &Readers,
    from: u64,
    wait: Duration,
) -> Result<Batch, BusError> {
    if !f.filter.results {
        return Ok(Batch::at(from));
    }
    let direct = results_of(&*f.bus, &f.registry, &f.tenant, (from, BATCH, wait), false);
    let read = shared_read(
        f,
        &f.tails.results,
        &readers.results,
        (from, wait),
        |e| e.results,
        direct,
    )
    .await?;
    let mut batch = Batch {
        next: read.next,
        ..Batch::default()
    };
    if read.lost {
        let to = read.resumed.unwrap_or(read.next);
        batch.lost = Some((to, lost_reason("results", from, to)));
    }
    for (next, item) in read.items {
        let data = (|| {
            if let Some(glob) = &f.filter.check {
                if !crate::alerts::config::glob(glob, &item.check) {
                    return None;
                }
            }
            if f.filter.problems && item.status == outpost_protocol::Status::Ok {
                return None;
            }
            agent_passes(f, &item.fingerprint)?;
            Some(item.data.clone())
        })();
        batch.events.push((next, "result", data));
    }
    Ok(batch)
}

async fn read_presence(
    f: &Follow,
    readers: &Readers,
    from: u64,
    wait: Duration,
) -> Result<Batch, BusError> {
    if !f.filter.presence {
        return Ok(Batch::at(from));
    }
    let direct = presence_of(&*f.bus, &f.registry, &f.tenant, (from, BATCH, wait));
    let read = shared_read(
        f,
        &f.tails.presence,
        &readers.presence,
        (from, wait),
        |e| e.presence,
        direct,
    )
    .await?;
    let mut batch = Batch {
        next: read.next,
        ..Batch::default()
    };
    if read.lost {
        let to = read.resumed.unwrap_or(read.next);
        batch.lost = Some((to, lost_reason("presence events", from, to)));
    }
    for (next, item) in read.items {
        let data = (|| {
            if f.filter.check.is_some() {
                return None;
            }
            if f.filter.problems && item.presence != Presence::Lost {
                return None;
            }
            agent_passes(f, &item.fingerprint)?;
            Some(item.data.clone())
        })();
        batch.events.push((next, "presence", data));
    }
    Ok(batch)
}

async fn read_alerts(
    f: &Follow,
    readers: &Readers,
    from: u64,
    wait: Duration,
) -> Result<Batch, BusError> {
    if !f.filter.alerts && !f.filter.silences {
        return Ok(Batch::at(from));
    }
    let direct = alerts_of(&*f.bus, &f.tenant, (from, BATCH, wait));
    let read = shared_read(
        f,
        &f.tails.alerts,
        &readers.alerts,
        (from, wait),
        |e| e.alerts,
        direct,
    )
    .await?;
    let mut batch = Batch {
        next: read.next,
        ..Batch::default()
    };
    if read.lost {
        let to = read.resumed.unwrap_or(read.next);
        batch.lost = Some((to, lost_reason("alert changes", from, to)));
    }
    for (next, shared) in read.items {
        let mut event = (*shared).clone();
        let kind = match event["type"].as_str() {
            Some("alert") => "alert",
            Some("silence") => "silence",
            Some("sync") => "sync",
            _ => {
                batch.events.push((next, "alert", None));
                continue;
            }
        };
        let data = (|| {
            let filter = &f.filter;
            if kind == "sync" {
                // A mark around the whole set, for every reader of either.
            } else if kind == "alert" {
                if !filter.alerts {
                    return None;
                }
                if let Some(glob) = &filter.check {
                    if !crate::alerts::config::glob(glob, event["check"].as_str()?) {
                        return None;
                    }
                }
                let fingerprint = event["fingerprint"].as_str()?.to_string();
                // An agent's alerts only (not a gateway's) pass an agent or label filter.
                if !filter.agents.is_empty() || !filter.labels.is_empty() {
                    agent_passes(f, &fingerprint)?;
                }
            } else if !filter.silences
                || !filter.agents.is_empty()
                || !filter.labels.is_empty()
                || filter.check.is_some()
            {
                // A silence is about matchers, not one agent or check.
                return None;
            }
            let obj = event.as_object_mut()?;
            obj.remove("tenant");
            obj.remove("type");
            Some(event.to_string())
        })();
        batch.events.push((next, kind, data));
    }
    Ok(batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_names_its_place_and_reads_back_as_it() {
        let c = Cursor {
            results: 1 << 40,
            presence: 7,
            alerts: 3,
        };
        assert_eq!(c.id(), "1099511627776-7-3");
        assert_eq!(Cursor::parse(&c.id()), Ok(c));
        assert_eq!(Cursor::parse(" 0-0-0 "), Ok(Cursor::default()));
        for bad in [
            "",
            "12",
            "1-2",
            "a-1-2",
            "1--2",
            "-1-2",
            "1-2-3-4",
            "18446744073709551616-0-0",
        ] {
            let e = Cursor::parse(bad).unwrap_err();
            assert!(e.contains("Last-Event-ID"), "{bad}: {e}");
        }
    }
}
