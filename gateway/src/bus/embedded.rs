//! The embedded bus: append-only JSON-lines logs under `DATA_DIR/bus/`, written by one
//! task that group-commits (one fsync for everything queued), so "durable" means on disk
//! exactly as it means "in a JetStream stream" when clustered.
//!
//! `results` holds one line per result: `{"tenant","fingerprint","result":{..}}`, one log
//! per tenant: the home tenant's (`--tenant`) in `bus/` itself, where it always was, every
//! other tenant's in `bus/tenants/<tenant>/`, so a tenant's bytes can be bounded by
//! deleting its own oldest segments, never another tenant's (as each tenant's NATS results
//! stream does). `presence` holds presence events, `audit` audit events (refused access).
//! Each is a [`super::segments::Log`]: `results.jsonl` is being written,
//! `results-<n>.jsonl` are sealed, and retention deletes the oldest sealed segments by age
//! and size: a tenant's own limit on its log, and the bus's `max_bytes` over every
//! tenant's logs together (the oldest segment of any tenant goes first).
//! Deduplication is by (tenant, fingerprint, seq): agents number results strictly increasingly, so
//! the bus keeps the highest durable sequence per agent and drops anything at or below it.
//! Not here: consumers other than the gateway itself.

use outpost_sys::lock;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use outpost_protocol::CheckResult;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::history::{self, Indexes};
use super::segments::{self, Log, Retention};
use super::{
    agent_key, AgentRef, AlertEventsRead, AuditEvent, Bus, BusError, Ends, FeedRead, History,
    HistoryQuery, Presence, PresenceEvent, PresenceRead, Published, ResultsRead,
};

/// Jobs waiting for the writer. A full queue makes publishers wait (backpressure reaches
/// the agents as slower acks), it never drops.
const QUEUE: usize = 1024;

/// How often retention runs when nothing is written (it also runs after every write).
const MAINTAIN_EVERY: Duration = Duration::from_secs(60);

#[derive(Serialize, Deserialize)]
struct ResultLine {
    tenant: String,
    fingerprint: String,
    result: CheckResult,
}

enum Job {
    Results {
        agent: AgentRef,
        results: Vec<CheckResult>,
        done: oneshot::Sender<Result<Published, String>>,
    },
    Presence {
        event: PresenceEvent,
        done: oneshot::Sender<Result<(), String>>,
    },
    Audit {
        event: AuditEvent,
        done: oneshot::Sender<Result<(), String>>,
    },
    AlertEvents {
        events: Vec<serde_json::Value>,
        done: oneshot::Sender<Result<(), String>>,
    },
    /// Bound a tenant's results to `max_bytes` (`None`: only the bus's own bound).
    Limit {
        tenant: String,
        max_bytes: Option<u64>,
    },
    /// Delete a tenant's results (the tenant was deleted).
    Drop {
        tenant: String,
        done: oneshot::Sender<Result<(), String>>,
    },
    /// The bytes a tenant's results take.
    Usage {
        tenant: String,
        done: oneshot::Sender<Result<u64, String>>,
    },
    /// Apply retention.
    Maintain,
}

pub struct EmbeddedBus {
    tx: mpsc::Sender<Job>,
    watermarks: Watermarks,
    dir: PathBuf,
    home: String,
    /// Bumped after every write of results, for readers waiting on more.
    written: tokio::sync::watch::Sender<u64>,
    ends: DurableEnds,
    /// The logs all tenants share that the event stream reads.
    presence: Shared,
    alert_events: Shared,
    /// Where each check's lines are in the segments being written (see [`history`]).
    indexes: Indexes,
    /// Held while a history reader indexes a segment that has no index yet.
    indexing: Arc<Mutex<()>>,
}

/// What the readers of a log all tenants share (presence events, alert events) need.
#[derive(Clone)]
struct Shared {
    /// Its durable end, and a bump after every write.
    end: Arc<Mutex<segments::Position>>,
    written: tokio::sync::watch::Sender<u64>,
    /// Per deleted tenant, the position just after its deletion mark.
    floors: Arc<Mutex<HashMap<String, u64>>>,
}

impl Shared {
    fn open(dir: &Path, log: &Log) -> std::io::Result<Shared> {
        Ok(Shared {
            end: Arc::new(Mutex::new(log.durable_end())),
            written: tokio::sync::watch::Sender::new(0),
            floors: Arc::new(Mutex::new(drop_marks(dir, log.name())?)),
        })
    }

    /// After `log` was written.
    fn wrote(&self, log: &Log) {
        *lock(&self.end) = log.durable_end();
        self.written.send_modify(|n| *n += 1);
    }

    /// Where a deleted tenant of this name's lines end (`None`: none was deleted).
    fn floor(&self, tenant: &str) -> Option<u64> {
        lock(&self.floors).get(tenant).copied()
    }

    /// Mark `tenant` deleted in `log`: readers of a tenant of the same name start after.
    fn mark_dropped(&self, log: &mut Log, tenant: &str) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(&DropMark {
            dropped_tenant: tenant.to_string(),
        })?;
        line.push(b'\n');
        log.append(&line)?;
        let end = log
            .durable_end()
            .to_u64()
            .ok_or_else(|| std::io::Error::other("bus position beyond 64 bits"))?;
        lock(&self.floors).insert(tenant.to_string(), end);
        self.wrote(log);
        Ok(())
    }
}

/// The line that ends a deleted tenant's lines in a shared log.
#[derive(Serialize, Deserialize)]
struct DropMark {
    dropped_tenant: String,
}

/// Every deletion mark in the log `name` in `dir`: tenant → the position after it.
fn drop_marks(dir: &Path, name: &str) -> std::io::Result<HashMap<String, u64>> {
    let mut marks = HashMap::new();
    let mut from = segments::Position::START;
    loop {
        let lines = segments::read_lines(dir, name, from, 1 << 20, None)?;
        if lines.lines.is_empty() {
            return Ok(marks);
        }
        for (at, line) in &lines.lines {
            if let (Ok(mark), Some(at)) = (serde_json::from_slice::<DropMark>(line), at.to_u64()) {
                marks.insert(mark.dropped_tenant, at);
            }
        }
        from = lines.next;
    }
}

/// What the bus held when it was opened: the newest result per agent and check, and each
/// agent's last presence, so the gateway's view survives a restart.
#[derive(Default)]
pub struct Recovered {
    pub latest: HashMap<String, HashMap<String, CheckResult>>,
    /// The last presence event per agent: the registry file is saved every few seconds,
    /// the events are durable at once, so they say who was online when the gateway died.
    pub presence: HashMap<String, PresenceEvent>,
    pub results_on_disk: u64,
    pub torn_bytes_dropped: u64,
}

impl EmbeddedBus {
    /// Open the bus in `dir`. `retention` bounds the results (its `max_bytes` all
    /// tenants' together); presence events are kept for the same age. `home` is the
    /// tenant whose results live in `dir` itself.
    pub async fn open(
        dir: &Path,
        retention: Retention,
        home: &str,
    ) -> std::io::Result<(EmbeddedBus, Recovered)> {
        let (results, watermarks, recovered) = ResultLogs::open(dir, retention, home)?;
        let ends = results.ends.clone();
        let presence_retention = Retention {
            max_bytes: 0,
            ..retention
        };
        let mut recovered = recovered;
        let presence = Log::open(dir, "presence", presence_retention)?.log;
        recovered.presence = last_presence(&presence)?;
        let audit = Log::open(dir, "audit", presence_retention)?.log;
        let alert_events = Log::open(dir, "alert-events", presence_retention)?.log;
        let shared = (
            Shared::open(dir, &presence)?,
            Shared::open(dir, &alert_events)?,
        );
        let logs = SharedLogs {
            presence: (presence, shared.0.clone()),
            alert_events: (alert_events, shared.1.clone()),
        };
        let watermarks: Watermarks = Arc::new(Mutex::new(watermarks));
        let (tx, rx) = mpsc::channel(QUEUE);
        let marks = watermarks.clone();
        let written = tokio::sync::watch::Sender::new(0u64);
        let wrote = written.clone();
        let indexes = Indexes::default();
        let writer_indexes = indexes.clone();
        std::thread::Builder::new()
            .name("outpost-bus-writer".into())
            .spawn(move || writer(rx, results, logs, audit, marks, wrote, writer_indexes))?;
        // Retention also when nothing is written; ends with the bus.
        let weak = tx.downgrade();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(MAINTAIN_EVERY);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(tx) = weak.upgrade() else { break };
                if tx.send(Job::Maintain).await.is_err() {
                    break;
                }
            }
        });
        let bus = EmbeddedBus {
            tx,
            watermarks,
            dir: dir.to_path_buf(),
            home: home.to_string(),
            written,
            ends,
            presence: shared.0,
            alert_events: shared.1,
            indexes,
            indexing: Arc::default(),
        };
        let (dir, indexing) = (bus.dir.clone(), bus.indexing.clone());
        std::thread::Builder::new()
            .name("outpost-bus-index".into())
            .spawn(move || index_missing(dir, indexing))?;
        Ok((bus, recovered))
    }
}

/// Every tenant's results log, and the limits on them.
struct ResultLogs {
    dir: PathBuf,
    home: String,
    /// `max_age` for every log; `max_bytes` for all of them together.
    retention: Retention,
    logs: HashMap<String, Log>,
    /// Per-tenant byte limits.
    limits: HashMap<String, u64>,
    /// Each tenant's durable end, shared with readers.
    ends: DurableEnds,
}

/// The end of what is durable in each tenant's results log: readers read no further.
type DurableEnds = Arc<Mutex<HashMap<String, segments::Position>>>;

/// A tenant's own folder of results (any tenant but the home one).
fn tenant_dir(bus: &Path, tenant: &str) -> PathBuf {
    bus.join("tenants").join(tenant)
}

impl ResultLogs {
    /// Open every tenant's log found in `dir` and rebuild the watermarks from them.
    fn open(
        dir: &Path,
        retention: Retention,
        home: &str,
    ) -> std::io::Result<(ResultLogs, HashMap<String, u64>, Recovered)> {
        let mut logs = ResultLogs {
            dir: dir.to_path_buf(),
            home: home.to_string(),
            retention,
            logs: HashMap::new(),
            limits: HashMap::new(),
            ends: DurableEnds::default(),
        };
        let mut watermarks = HashMap::new();
        let mut recovered = Recovered::default();
        let mut tenants = vec![home.to_string()];
        match std::fs::read_dir(dir.join("tenants")) {
            Ok(entries) => {
                for entry in entries {
                    let name = entry?.file_name();
                    match name.to_str() {
                        Some(t) if crate::tenant::parse_name(t).is_ok() && t != home => {
                            tenants.push(t.to_string())
                        }
                        _ => {
                            tracing::warn!(dir = %dir.display(), entry = ?name, "ignoring an entry of bus/tenants that is not a tenant")
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        for tenant in tenants {
            let log_dir = logs.log_dir(&tenant);
            let opened = Log::open(&log_dir, "results", logs.retention_of(&tenant))?;
            if opened.torn_bytes_dropped > 0 {
                tracing::warn!(dir = %log_dir.display(), bytes = opened.torn_bytes_dropped, "dropped a torn last result line left by a crash");
            }
            recovered.torn_bytes_dropped += opened.torn_bytes_dropped;
            recover(&opened.log, &mut watermarks, &mut recovered)?;
            lock(&logs.ends).insert(tenant.clone(), opened.log.durable_end());
            logs.logs.insert(tenant, opened.log);
        }
        Ok((logs, watermarks, recovered))
    }

    fn log_dir(&self, tenant: &str) -> PathBuf {
        if tenant == self.home {
            self.dir.clone()
        } else {
            tenant_dir(&self.dir, tenant)
        }
    }

    /// A tenant's log keeps the bus's age, and at most its own limit or the bus's bound,
    /// whichever is smaller (segments are sized from it, so either can be kept to).
    fn retention_of(&self, tenant: &str) -> Retention {
        let own = self.limits.get(tenant).copied().unwrap_or(0);
        let max_bytes = match (own, self.retention.max_bytes) {
            (0, all) => all,
            (own, 0) => own,
            (own, all) => own.min(all),
        };
        Retention {
            max_bytes,
            ..self.retention
        }
    }

    fn log(&mut self, tenant: &str) -> std::io::Result<&mut Log> {
        if !self.logs.contains_key(tenant) {
            crate::tenant::parse_name(tenant).map_err(std::io::Error::other)?;
            let log = Log::open(&self.log_dir(tenant), "results", self.retention_of(tenant))?;
            // The new folder (and `tenants/` itself, the first time) must survive a crash
            // with the results acked from it.
            if tenant != self.home {
                segments::sync_dir(&self.dir.join("tenants"))?;
                segments::sync_dir(&self.dir)?;
            }
            self.logs.insert(tenant.to_string(), log.log);
        }
        Ok(self.logs.get_mut(tenant).expect("just opened"))
    }

    fn set_limit(&mut self, tenant: &str, max_bytes: Option<u64>) {
        match max_bytes {
            Some(b) if b > 0 => self.limits.insert(tenant.to_string(), b),
            _ => self.limits.remove(tenant),
        };
        let retention = self.retention_of(tenant);
        if let Some(log) = self.logs.get_mut(tenant) {
            log.set_retention(retention);
        }
    }

    fn drop_tenant(&mut self, tenant: &str) -> std::io::Result<()> {
        if tenant == self.home {
            return Err(std::io::Error::other(format!(
                "{tenant} is this gateway's home tenant: its results stay"
            )));
        }
        crate::tenant::parse_name(tenant).map_err(std::io::Error::other)?;
        self.logs.remove(tenant);
        self.limits.remove(tenant);
        lock(&self.ends).remove(tenant);
        match std::fs::remove_dir_all(tenant_dir(&self.dir, tenant)) {
            Ok(()) => segments::sync_dir(&self.dir.join("tenants")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Retention for `tenants`' logs (each by its own limit and age), then the bus's
    /// bound over all of them: while they hold more, the oldest sealed segment of any
    /// tenant goes.
    fn maintain<'a>(&mut self, tenants: impl IntoIterator<Item = &'a String>, now: SystemTime) {
        for tenant in tenants {
            if let Some(log) = self.logs.get_mut(tenant) {
                if let Err(e) = log.maintain(now) {
                    tracing::error!(%tenant, error = %e, "embedded bus retention failed; will retry");
                }
            }
        }
        let cap = self.retention.max_bytes;
        if cap == 0 {
            return;
        }
        let mut total: u64 = self.logs.values().map(Log::bytes).sum();
        let mut touched = Vec::new();
        while total > cap {
            let oldest = self
                .logs
                .iter()
                .filter_map(|(t, l)| l.oldest_sealed().map(|w| (w, t.clone())))
                .min();
            let Some((_, tenant)) = oldest else {
                // Nothing sealed: many tenants' segments being written hold it all. Seal
                // the one started longest ago, so it can go next.
                let writing = self
                    .logs
                    .iter()
                    .filter_map(|(t, l)| l.writing_since().map(|at| (at, t.clone())))
                    .min();
                let Some((_, tenant)) = writing else { break };
                let log = self.logs.get_mut(&tenant).expect("listed");
                if let Err(e) = log.seal(now) {
                    tracing::error!(%tenant, error = %e, "embedded bus retention failed; will retry");
                    break;
                }
                continue;
            };
            let log = self.logs.get_mut(&tenant).expect("listed");
            match log.delete_oldest("max bytes of the bus") {
                Ok(bytes) => total -= bytes,
                Err(e) => {
                    tracing::error!(%tenant, error = %e, "embedded bus retention failed; will retry");
                    break;
                }
            }
            touched.push(tenant);
        }
        touched.sort();
        touched.dedup();
        for tenant in touched {
            if let Some(Err(e)) = self.logs.get(&tenant).map(Log::sync) {
                tracing::error!(%tenant, error = %e, "embedded bus retention failed; will retry");
            }
        }
    }
}

/// Rebuild the per-agent watermarks and the latest result per check from a results log.
fn recover(
    log: &Log,
    watermarks: &mut HashMap<String, u64>,
    rec: &mut Recovered,
) -> std::io::Result<()> {
    log.for_each_sealed_line(|line| match serde_json::from_slice::<ResultLine>(line) {
        Ok(l) => {
            rec.results_on_disk += 1;
            let key = agent_key(&l.tenant, &l.fingerprint);
            let w = watermarks.entry(key.clone()).or_default();
            *w = (*w).max(l.result.seq);
            let per_agent = rec.latest.entry(key).or_default();
            match per_agent.get(&l.result.check) {
                Some(old) if old.seq >= l.result.seq => {}
                _ => {
                    per_agent.insert(l.result.check.clone(), l.result);
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "skipping unreadable bus line"),
    })
}

/// The shared logs the writer appends to, each with what its readers see of it.
struct SharedLogs {
    presence: (Log, Shared),
    alert_events: (Log, Shared),
}

/// The last event per agent in the presence log (unreadable lines skipped).
fn last_presence(log: &Log) -> std::io::Result<HashMap<String, PresenceEvent>> {
    let mut last = HashMap::new();
    log.for_each_sealed_line(|line| {
        if let Ok(event) = serde_json::from_slice::<PresenceEvent>(line) {
            last.insert(event.agent.key(), event);
        }
    })?;
    Ok(last)
}

/// Watermarks: the highest durable sequence number per agent (`<tenant>.<fingerprint>`). Shared so sessions can
/// tell agents where to number from; only the writer changes them, after a durable write.
type Watermarks = Arc<Mutex<HashMap<String, u64>>>;

fn writer(
    mut rx: mpsc::Receiver<Job>,
    mut results: ResultLogs,
    shared: SharedLogs,
    mut audit: Log,
    watermarks: Watermarks,
    written: tokio::sync::watch::Sender<u64>,
    indexes: Indexes,
) {
    let SharedLogs {
        presence: (mut presence, presence_shared),
        alert_events: (mut alert_log, alerts_shared),
    } = shared;
    let mut jobs = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        jobs.push(first);
        while jobs.len() < QUEUE {
            match rx.try_recv() {
                Ok(more) => jobs.push(more),
                Err(_) => break,
            }
        }
        // One buffer and one fsync per tenant's log in this group.
        let mut rbufs: HashMap<String, Vec<u8>> = HashMap::new();
        // Per tenant, each line's history key, offset in its buffer and run start.
        let mut rplaces: HashMap<String, Vec<(String, u64, u64)>> = HashMap::new();
        let mut pbuf = Vec::new();
        let mut abuf = Vec::new();
        let mut ebuf = Vec::new();
        let mut outcomes = Vec::with_capacity(jobs.len());
        // Watermarks move only once the write is durable; until then track them per group.
        let mut pending: HashMap<String, u64> = HashMap::new();
        let mut maintain_all = false;
        {
            let marks = lock(&watermarks);
            for job in &jobs {
                match job {
                    Job::Results {
                        agent,
                        results: batch,
                        ..
                    } => {
                        let key = agent.key();
                        let mut high = pending.get(&key).or(marks.get(&key)).copied().unwrap_or(0);
                        let mut p = Published::default();
                        let rbuf = rbufs.entry(agent.tenant.clone()).or_default();
                        let places = rplaces.entry(agent.tenant.clone()).or_default();
                        for r in batch {
                            if r.seq <= high {
                                p.duplicates += 1;
                                continue;
                            }
                            high = r.seq;
                            p.accepted += 1;
                            let line = ResultLine {
                                tenant: agent.tenant.clone(),
                                fingerprint: agent.fingerprint.clone(),
                                result: r.clone(),
                            };
                            let at = rbuf.len();
                            if serde_json::to_writer(&mut *rbuf, &line).is_ok() {
                                rbuf.push(b'\n');
                                places.push((
                                    history::key(&agent.fingerprint, &r.check),
                                    at as u64,
                                    r.started_at_ms,
                                ));
                            } else {
                                rbuf.truncate(at);
                            }
                        }
                        pending.insert(key, high);
                        outcomes.push(Some(p));
                    }
                    Job::Presence { event, .. } => {
                        if serde_json::to_writer(&mut pbuf, event).is_ok() {
                            pbuf.push(b'\n');
                        }
                        outcomes.push(None);
                    }
                    Job::Audit { event, .. } => {
                        if serde_json::to_writer(&mut abuf, event).is_ok() {
                            abuf.push(b'\n');
                        }
                        outcomes.push(None);
                    }
                    Job::AlertEvents { events, .. } => {
                        for event in events {
                            if serde_json::to_writer(&mut ebuf, event).is_ok() {
                                ebuf.push(b'\n');
                            }
                        }
                        outcomes.push(None);
                    }
                    Job::Limit { .. } | Job::Drop { .. } | Job::Usage { .. } => outcomes.push(None),
                    Job::Maintain => {
                        maintain_all = true;
                        outcomes.push(None)
                    }
                }
            }
        }
        // Each tenant's results, presence and audit succeed or fail on their own: a failed
        // write must not make durable results look failed (they would be written twice).
        let mut rio: HashMap<String, Result<(), String>> = HashMap::new();
        for (tenant, buf) in &rbufs {
            if buf.is_empty() {
                // All duplicates: nothing to write (and no folder to make).
                continue;
            }
            let written = results.log(tenant).and_then(|log| {
                log.append(buf)?;
                Ok(log.durable_end())
            });
            match &written {
                Ok(end) => {
                    // The lines' places, now that they are durable: the buffer ends at
                    // the segment's end.
                    let start = end.offset - buf.len() as u64;
                    let places = rplaces.remove(tenant).unwrap_or_default();
                    history::add(
                        &indexes,
                        &results.log_dir(tenant),
                        tenant,
                        end.segment,
                        places.into_iter().map(|(k, at, t)| (k, start + at, t)),
                    );
                    let prefix = format!("{tenant}.");
                    lock(&watermarks).extend(
                        pending
                            .iter()
                            .filter(|(k, _)| k.starts_with(&prefix))
                            .map(|(k, v)| (k.clone(), *v)),
                    );
                }
                Err(e) => {
                    tracing::error!(%tenant, error = %e, "embedded bus could not store results; their agents will resend")
                }
            }
            rio.insert(
                tenant.clone(),
                written.map(|_| ()).map_err(|e| e.to_string()),
            );
        }
        let pio = presence.append(&pbuf);
        let aio = audit.append(&abuf);
        match &pio {
            Err(e) => tracing::error!(error = %e, "embedded bus could not store presence events"),
            Ok(()) if !pbuf.is_empty() => presence_shared.wrote(&presence),
            Ok(()) => {}
        }
        let eio = alert_log.append(&ebuf);
        match &eio {
            Err(e) => tracing::error!(error = %e, "embedded bus could not store alert events"),
            Ok(()) if !ebuf.is_empty() => alerts_shared.wrote(&alert_log),
            Ok(()) => {}
        }
        if let Err(e) = &aio {
            tracing::error!(error = %e, "embedded bus could not store audit events");
        }
        // This group's limits, after its writes (drops and usage are answered below).
        for job in &jobs {
            if let Job::Limit { tenant, max_bytes } = job {
                results.set_limit(tenant, *max_bytes);
                rbufs.entry(tenant.clone()).or_default();
            }
        }
        // Before the replies, so nothing touches the files once the last publisher has
        // its answer.
        let now = SystemTime::now();
        let all: Vec<String>;
        let tenants: Vec<&String> = if maintain_all {
            all = results.logs.keys().cloned().collect();
            all.iter().collect()
        } else {
            rbufs.keys().collect()
        };
        results.maintain(tenants, now);
        // What readers may read: each written tenant's durable end, after the seals and
        // cuts retention made.
        if rio.values().any(Result::is_ok) {
            let mut ends = lock(&results.ends);
            for tenant in rio.keys() {
                if let Some(log) = results.logs.get(tenant) {
                    ends.insert(tenant.clone(), log.durable_end());
                }
            }
            drop(ends);
            written.send_modify(|n| *n += 1);
        }
        for log in [&mut presence, &mut audit, &mut alert_log] {
            if let Err(e) = log.maintain(now) {
                tracing::error!(error = %e, "embedded bus retention failed; will retry");
            }
        }
        for (job, outcome) in jobs.drain(..).zip(outcomes) {
            match job {
                Job::Results { agent, done, .. } => {
                    let _ = done.send(match rio.get(&agent.tenant) {
                        Some(Err(e)) => Err(e.clone()),
                        _ => Ok(outcome.unwrap_or_default()),
                    });
                }
                Job::Presence { done, .. } => {
                    let _ = done.send(pio.as_ref().map(|_| ()).map_err(|e| e.to_string()));
                }
                Job::Audit { done, .. } => {
                    let _ = done.send(aio.as_ref().map(|_| ()).map_err(|e| e.to_string()));
                }
                Job::AlertEvents { done, .. } => {
                    let _ = done.send(eio.as_ref().map(|_| ()).map_err(|e| e.to_string()));
                }
                Job::Drop { tenant, done } => {
                    let mut dropped = results.drop_tenant(&tenant);
                    if dropped.is_ok() {
                        lock(&indexes).remove(&tenant);
                        let prefix = format!("{tenant}.");
                        lock(&watermarks).retain(|k, _| !k.starts_with(&prefix));
                        // The tenant's presence and alert events stay in the shared logs: a
                        // mark ends them, and readers of a tenant of the same name start
                        // after it.
                        dropped = presence_shared
                            .mark_dropped(&mut presence, &tenant)
                            .and_then(|()| alerts_shared.mark_dropped(&mut alert_log, &tenant));
                    }
                    let _ = done.send(dropped.map_err(|e| e.to_string()));
                }
                Job::Usage { tenant, done } => {
                    let _ = done.send(Ok(results.logs.get(&tenant).map_or(0, Log::bytes)));
                }
                Job::Limit { .. } | Job::Maintain => {}
            }
        }
    }
    // The bus is closed: the segments being written are sealed as they are when it opens
    // next, so their indexes are written now (a crash leaves them to be rebuilt).
    for (tenant, building) in lock(&indexes).iter() {
        history::save(&results.log_dir(tenant), building);
    }
}

impl EmbeddedBus {
    /// Queue a job for the writer and wait for its outcome.
    async fn submit<T>(
        &self,
        job: impl FnOnce(oneshot::Sender<Result<T, String>>) -> Job,
    ) -> Result<T, BusError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(job(done))
            .await
            .map_err(|_| BusError::Closed)?;
        match wait.await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(BusError::Io(std::io::Error::other(e))),
            Err(_) => Err(BusError::Closed),
        }
    }
}

#[async_trait]
impl Bus for EmbeddedBus {
    async fn publish_results(
        &self,
        agent: &AgentRef,
        results: &[CheckResult],
    ) -> Result<Published, BusError> {
        self.submit(|done| Job::Results {
            agent: agent.clone(),
            results: results.to_vec(),
            done,
        })
        .await
    }

    async fn last_seq(&self, agent: &AgentRef) -> Result<u64, BusError> {
        Ok(lock(&self.watermarks)
            .get(&agent.key())
            .copied()
            .unwrap_or(0))
    }

    async fn publish_presence(&self, event: &PresenceEvent) -> Result<(), BusError> {
        self.submit(|done| Job::Presence {
            event: event.clone(),
            done,
        })
        .await
    }

    async fn publish_audit(&self, event: &AuditEvent) -> Result<(), BusError> {
        self.submit(|done| Job::Audit {
            event: event.clone(),
            done,
        })
        .await
    }

    async fn keep_bytes(&self, tenant: &str, max_bytes: Option<u64>) -> Result<(), BusError> {
        let job = Job::Limit {
            tenant: tenant.to_string(),
            max_bytes,
        };
        self.tx.send(job).await.map_err(|_| BusError::Closed)
    }

    async fn drop_tenant(&self, tenant: &str) -> Result<(), BusError> {
        self.submit(|done| Job::Drop {
            tenant: tenant.to_string(),
            done,
        })
        .await
    }

    async fn tenant_bytes(&self, tenant: &str) -> Result<u64, BusError> {
        self.submit(|done| Job::Usage {
            tenant: tenant.to_string(),
            done,
        })
        .await
    }

    async fn read_results(
        &self,
        tenant: &str,
        from: u64,
        max: usize,
        wait: Duration,
    ) -> Result<ResultsRead, BusError> {
        crate::tenant::parse_name(tenant).map_err(BusError::Unavailable)?;
        let dir = if tenant == self.home {
            self.dir.clone()
        } else {
            tenant_dir(&self.dir, tenant)
        };
        let ends = self.ends.clone();
        // A tenant with nothing durable yet: nothing is read (`None` reads uncapped).
        let durable = move || {
            lock(&ends)
                .get(tenant)
                .copied()
                .unwrap_or(segments::Position::START)
        };
        let read = self
            .read_log(
                &dir,
                ("results", &self.written),
                durable,
                (from, max, wait),
                |_, line| {
                    match serde_json::from_slice::<ResultLine>(line) {
                        // The home tenant's log may hold other tenants' results from a release
                        // that kept one log for all: only the tenant's own are read.
                        Ok(l) if l.tenant == tenant => {
                            Some((AgentRef::new(&l.tenant, &l.fingerprint), l.result))
                        }
                        Ok(_) => None,
                        Err(e) => {
                            tracing::warn!(%tenant, error = %e, "skipping an unreadable bus line");
                            None
                        }
                    }
                },
            )
            .await?;
        Ok(ResultsRead::from(read))
    }

    async fn read_presence(
        &self,
        tenant: &str,
        from: u64,
        max: usize,
        wait: Duration,
    ) -> Result<PresenceRead, BusError> {
        crate::tenant::parse_name(tenant).map_err(BusError::Unavailable)?;
        let end = self.presence.end.clone();
        let floor = self.presence.floor(tenant);
        let read = self
            .read_log(
                &self.dir,
                ("presence", &self.presence.written),
                move || *lock(&end),
                (from, max, wait),
                |at, line| match serde_json::from_slice::<PresenceEvent>(line) {
                    // Not those of a deleted tenant of the same name (before its mark).
                    Ok(e) if e.agent.tenant == tenant && floor.is_none_or(|f| at > f) => Some(e),
                    Ok(_) => None,
                    // A deletion mark.
                    Err(_) if serde_json::from_slice::<DropMark>(line).is_ok() => None,
                    Err(e) => {
                        tracing::warn!(%tenant, error = %e, "skipping an unreadable presence line");
                        None
                    }
                },
            )
            .await?;
        Ok(read)
    }

    async fn publish_alert_events(
        &self,
        tenant: &str,
        events: &[serde_json::Value],
    ) -> Result<(), BusError> {
        crate::tenant::parse_name(tenant).map_err(BusError::Unavailable)?;
        let events = events
            .iter()
            .map(|e| {
                let mut e = e.clone();
                e["tenant"] = tenant.into();
                e
            })
            .collect();
        self.submit(|done| Job::AlertEvents { events, done }).await
    }

    async fn read_alert_events(
        &self,
        tenant: &str,
        from: u64,
        max: usize,
        wait: Duration,
    ) -> Result<AlertEventsRead, BusError> {
        crate::tenant::parse_name(tenant).map_err(BusError::Unavailable)?;
        let end = self.alert_events.end.clone();
        let floor = self.alert_events.floor(tenant);
        let read = self
            .read_log(
                &self.dir,
                ("alert-events", &self.alert_events.written),
                move || *lock(&end),
                (from, max, wait),
                |at, line| match serde_json::from_slice::<serde_json::Value>(line) {
                    Ok(e) if e["tenant"] == tenant && floor.is_none_or(|f| at > f) => Some(e),
                    Ok(_) => None,
                    Err(e) => {
                        tracing::warn!(%tenant, error = %e, "skipping an unreadable alert event line");
                        None
                    }
                },
            )
            .await?;
        Ok(read)
    }

    async fn ends(&self, tenant: &str) -> Result<Ends, BusError> {
        crate::tenant::parse_name(tenant).map_err(BusError::Unavailable)?;
        let position = |p: segments::Position| {
            p.to_u64().ok_or_else(|| {
                BusError::Unavailable(format!("bus position {p:?} does not fit in 64 bits"))
            })
        };
        // A tenant with no results yet: the start of the first segment its log will have.
        let first = segments::Position {
            segment: 1,
            offset: 0,
        };
        let results = lock(&self.ends).get(tenant).copied().unwrap_or(first);
        let presence = (*lock(&self.presence.end)).max(first);
        let alerts = (*lock(&self.alert_events.end)).max(first);
        Ok(Ends {
            results: position(results)?,
            presence: position(presence)?,
            alerts: position(alerts)?,
        })
    }

    async fn read_history(
        &self,
        agent: &AgentRef,
        check: &str,
        query: HistoryQuery,
    ) -> Result<History, BusError> {
        crate::tenant::parse_name(&agent.tenant).map_err(BusError::Unavailable)?;
        let dir = if agent.tenant == self.home {
            self.dir.clone()
        } else {
            tenant_dir(&self.dir, &agent.tenant)
        };
        let reader = HistoryReader {
            dir,
            agent: agent.clone(),
            check: check.to_string(),
            indexes: self.indexes.clone(),
            indexing: self.indexing.clone(),
        };
        tokio::task::spawn_blocking(move || reader.read(query))
            .await
            .map_err(|e| BusError::Unavailable(format!("history reader failed: {e}")))?
            .map_err(BusError::Io)
    }
}

/// One history read of the embedded bus (blocking: file reads).
struct HistoryReader {
    dir: PathBuf,
    agent: AgentRef,
    check: String,
    indexes: Indexes,
    indexing: Arc<Mutex<()>>,
}

impl HistoryReader {
    /// Newest segment first, newest line first, until `limit` results are found: a day of
    /// one check costs its own lines and a few reads of each segment's index.
    fn read(&self, query: HistoryQuery) -> std::io::Result<History> {
        let key = history::key(&self.agent.fingerprint, &self.check);
        let listing = segments::list(&self.dir, "results")?;
        let numbers = listing
            .sealed
            .iter()
            .map(|(n, _)| *n)
            .chain(listing.active)
            .collect::<Vec<_>>();
        let mut newest_first = Vec::new();
        let mut truncated = false;
        let mut line = Vec::new();
        'segments: for n in numbers.into_iter().rev() {
            // A segment last written before the range holds nothing of it (a result is
            // written after its run starts; the margin is for agents' clocks running
            // ahead), and every older one neither.
            if let Some(&(_, base)) = listing.sealed.iter().find(|(s, _)| *s == n) {
                if let Some(written) = segments::last_written(&self.dir, "results", n, base)? {
                    let ms = written
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64);
                    if ms.saturating_add(CLOCK_AHEAD_MS) < query.from_ms {
                        break;
                    }
                }
            }
            let Some(places) = self.places(n, &key)? else {
                continue;
            };
            let wanted = places
                .iter()
                .rev()
                .filter(|(_, started)| (query.from_ms..=query.to_ms).contains(started));
            let mut segment = None;
            for &(at, _) in wanted {
                if newest_first.len() >= query.limit {
                    truncated = true;
                    break 'segments;
                }
                if segment.is_none() {
                    match segments::open_segment(&self.dir, "results", n)? {
                        Some(s) => segment = Some(s),
                        // Deleted by retention meanwhile.
                        None => continue 'segments,
                    }
                }
                let seg = segment.as_ref().expect("opened");
                if !seg.line_at(at, &mut line)? {
                    continue;
                }
                match serde_json::from_slice::<ResultLine>(&line) {
                    Ok(l)
                        if l.tenant == self.agent.tenant
                            && l.fingerprint == self.agent.fingerprint
                            && l.result.check == self.check =>
                    {
                        newest_first.push(l.result)
                    }
                    _ => {
                        tracing::warn!(dir = %self.dir.display(), segment = n, at, "a history index points at a line of something else; skipped");
                    }
                }
            }
        }
        newest_first.reverse();
        Ok(History {
            results: newest_first,
            truncated,
        })
    }

    /// `key`'s places in segment `n`: from the writer's index while it is the segment
    /// being written (or just sealed), else from the segment's index file, made now if it
    /// has none or a damaged one. `None`: the segment is gone.
    fn places(&self, n: u64, key: &str) -> std::io::Result<Option<history::Places>> {
        {
            let indexes = lock(&self.indexes);
            if let Some(b) = indexes.get(&self.agent.tenant).filter(|b| b.segment == n) {
                return Ok(Some(b.keys.get(key).cloned().unwrap_or_default()));
            }
        }
        let path = segments::sidecar_path(&self.dir, "results", n);
        match history::lookup(&path, key) {
            Ok(Some(places)) => return Ok(Some(places)),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "rebuilding a history index");
            }
        }
        let _one_at_a_time = lock(&self.indexing);
        // Another reader (or the indexer of segments left without one) may have made it
        // meanwhile.
        if let Ok(Some(places)) = history::lookup(&path, key) {
            return Ok(Some(places));
        }
        match index_segment(&self.dir, n)? {
            Indexed::Gone => Ok(None),
            // Being written, and the writer has not indexed it: nothing of it is durable
            // yet (the writer indexes every line it has made durable).
            Indexed::NotSealed => Ok(Some(Vec::new())),
            Indexed::Keys(keys) => Ok(Some(keys.get(key).cloned().unwrap_or_default())),
        }
    }
}

/// How far ahead of the gateway's an agent's clock may run for a history to still find
/// its results by their run start.
const CLOCK_AHEAD_MS: u64 = 5 * 60 * 1000;

enum Indexed {
    Gone,
    NotSealed,
    Keys(HashMap<String, history::Places>),
}

/// Index sealed segment `n` of the results log in `dir` by reading it, and write the
/// index beside it if the segment is still there (retention may delete it meanwhile: an
/// index of nothing is never left behind). The caller holds the bus's indexing lock.
fn index_segment(dir: &Path, n: u64) -> std::io::Result<Indexed> {
    let Some(segment) = segments::open_segment(dir, "results", n)? else {
        return Ok(Indexed::Gone);
    };
    if !segment.sealed {
        return Ok(Indexed::NotSealed);
    }
    let keys = history::build(&segment)?;
    let listing = segments::list(dir, "results")?;
    if !listing.sealed.iter().any(|(s, _)| *s == n) {
        return Ok(Indexed::Gone);
    }
    let path = segments::sidecar_path(dir, "results", n);
    if let Err(e) = history::write(&path, &keys) {
        tracing::warn!(file = %path.display(), error = %e, "cannot write a history index; it will be rebuilt when needed");
    }
    Ok(Indexed::Keys(keys))
}

/// Index, in the background and newest first, every sealed segment of every tenant's
/// results log in `bus` that has no usable index (left by a crash, or by a release before
/// indexes), so the first histories asked after a start do not pay for it.
fn index_missing(bus: PathBuf, indexing: Arc<Mutex<()>>) {
    let mut dirs = vec![bus.clone()];
    if let Ok(entries) = std::fs::read_dir(bus.join("tenants")) {
        dirs.extend(entries.filter_map(|e| Some(e.ok()?.path())));
    }
    let mut done = 0u64;
    for dir in dirs {
        let Ok(listing) = segments::list(&dir, "results") else {
            continue;
        };
        for &(n, _) in listing.sealed.iter().rev() {
            let path = segments::sidecar_path(&dir, "results", n);
            // Any key: a whole index answers, a missing or damaged one does not.
            if matches!(history::lookup(&path, ""), Ok(Some(_))) {
                continue;
            }
            let _one_at_a_time = lock(&indexing);
            if matches!(history::lookup(&path, ""), Ok(Some(_))) {
                continue;
            }
            match index_segment(&dir, n) {
                Ok(Indexed::Keys(_)) => done += 1,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), segment = n, error = %e, "cannot index a bus segment for histories; it will be tried again when needed")
                }
            }
        }
    }
    if done > 0 {
        tracing::info!(segments = done, "indexed bus segments for check histories");
    }
}

impl EmbeddedBus {
    /// Read the log `name` in `dir` from `from` on: at most `max` items that `parse` makes
    /// of its lines (lines it makes nothing of are stepped over), none past what
    /// `durable` says is on disk. When there are none yet, waits up to `wait` for a write.
    async fn read_log<T: Send + 'static>(
        &self,
        dir: &Path,
        (name, written): (&'static str, &tokio::sync::watch::Sender<u64>),
        durable: impl Fn() -> segments::Position,
        (from, max, wait): (u64, usize, Duration),
        parse: impl Fn(u64, &[u8]) -> Option<T>,
    ) -> Result<FeedRead<T>, BusError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut changed = written.subscribe();
        let mut from = from;
        loop {
            changed.mark_unchanged();
            let durable = Some(durable());
            let (d, max) = (dir.to_path_buf(), max.max(1));
            let lines = tokio::task::spawn_blocking(move || {
                // About a kilobyte a line: enough to fill `max` most of the time.
                segments::read_lines(
                    &d,
                    name,
                    segments::Position::from_u64(from),
                    max.saturating_mul(1024),
                    durable,
                )
            })
            .await
            .map_err(|e| BusError::Unavailable(format!("reading the bus failed: {e}")))??;
            let position = |p: segments::Position| {
                p.to_u64().ok_or_else(|| {
                    BusError::Unavailable(format!("bus position {p:?} does not fit in 64 bits"))
                })
            };
            let mut read = FeedRead {
                items: Vec::new(),
                next: position(lines.next)?,
                lost: lines.lost,
                resumed: lines.resumed.map(position).transpose()?,
            };
            let read_nothing = lines.lines.is_empty();
            for (at, line) in lines.lines {
                if read.items.len() == max {
                    break;
                }
                read.next = position(at)?;
                if let Some(item) = parse(read.next, &line) {
                    read.items.push((read.next, item));
                }
            }
            if !read.items.is_empty() || read.lost {
                return Ok(read);
            }
            // Nothing for the tenant: on from where this read ended, at once if it read
            // lines (other tenants'), else once more is written.
            from = read.next;
            if !read_nothing {
                if tokio::time::Instant::now() >= deadline {
                    return Ok(read);
                }
                continue;
            }
            tokio::select! {
                _ = changed.changed() => {}
                _ = tokio::time::sleep_until(deadline) => return Ok(read),
            }
        }
    }
}

impl Presence {
    pub fn as_str(self) -> &'static str {
        match self {
            Presence::Online => "online",
            Presence::Lost => "lost",
            Presence::Deregistered => "deregistered",
            Presence::Revoked => "revoked",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::segments;
    use outpost_protocol::Status;
    use std::io::Write;

    fn result(seq: u64, check: &str) -> CheckResult {
        CheckResult {
            seq,
            started_at_ms: seq,
            duration_ms: 1,
            exit_code: Some(0),
            ..CheckResult::new(check, Status::Ok, format!("run {seq}"))
        }
    }

    fn agent() -> AgentRef {
        AgentRef {
            tenant: "default".into(),
            fingerprint: "fp".into(),
        }
    }

    const KEEP: Retention = Retention {
        max_age: Duration::from_secs(7 * 86_400),
        max_bytes: 0,
    };

    /// Bytes of every segment of `name` under `dir`, tenant folders included.
    fn results_bytes(dir: &Path) -> u64 {
        let mut dirs = vec![dir.to_path_buf()];
        if let Ok(tenants) = std::fs::read_dir(dir.join("tenants")) {
            dirs.extend(tenants.map(|e| e.unwrap().path()));
        }
        dirs.iter()
            .flat_map(|d| segments::paths(d, "results").unwrap())
            .map(|p| std::fs::metadata(p).unwrap().len())
            .sum()
    }

    #[tokio::test]
    async fn the_size_cap_bounds_every_tenant_together_and_its_oldest_go_first() {
        let dir = tempfile::tempdir().unwrap();
        let cap = Retention {
            max_bytes: 512 * 1024,
            ..KEEP
        };
        let (bus, _) = EmbeddedBus::open(dir.path(), cap, "default").await.unwrap();
        let tenants = ["default", "acme", "globex"].map(|t| AgentRef::new(t, "fp"));
        let mut seq = 0;
        for _ in 0..40 {
            for agent in &tenants {
                let batch: Vec<CheckResult> =
                    (seq + 1..=seq + 50).map(|s| result(s, "a")).collect();
                bus.publish_results(agent, &batch).await.unwrap();
            }
            seq += 50;
        }
        // Three tenants' logs, each under the cap alone, within it together (segments
        // being written included: the oldest of them is sealed to be deleted).
        let bytes = results_bytes(dir.path());
        assert!(bytes <= cap.max_bytes, "{bytes} bytes on disk");
        for agent in &tenants {
            // Each keeps its newest (the oldest segments of any tenant went first).
            let log_dir = match agent.tenant.as_str() {
                "default" => dir.path().to_path_buf(),
                t => dir.path().join("tenants").join(t),
            };
            let stored: Vec<u64> = segments::read_all(&log_dir, "results")
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<ResultLine>(l).unwrap().result.seq)
                .collect();
            assert!(
                stored.len() < 2000,
                "nothing of {} was deleted",
                agent.tenant
            );
            assert_eq!(stored.last(), Some(&2000), "{}", agent.tenant);
            assert_eq!(bus.last_seq(agent).await.unwrap(), 2000);
        }
        // Reopened, every tenant's log is found again.
        drop(bus);
        let (bus, rec) = EmbeddedBus::open(dir.path(), cap, "default").await.unwrap();
        for agent in &tenants {
            assert_eq!(bus.last_seq(agent).await.unwrap(), 2000, "{}", agent.tenant);
        }
        assert!(rec.results_on_disk > 0);
    }

    #[tokio::test]
    async fn the_size_cap_holds_when_many_tenants_segments_being_written_exceed_it() {
        let dir = tempfile::tempdir().unwrap();
        let cap = Retention {
            max_bytes: 512 * 1024,
            ..KEEP
        };
        let (bus, _) = EmbeddedBus::open(dir.path(), cap, "default").await.unwrap();
        // Twelve tenants, each under one segment (64 KiB): nothing is sealed by size.
        let tenants: Vec<AgentRef> = (0..12)
            .map(|i| AgentRef::new(&format!("t{i}"), "fp"))
            .collect();
        for agent in &tenants {
            let batch: Vec<CheckResult> = (1..=200).map(|s| result(s, "a")).collect();
            bus.publish_results(agent, &batch).await.unwrap();
        }
        let bytes = results_bytes(dir.path());
        assert!(bytes <= cap.max_bytes, "{bytes} bytes on disk");
        // The first tenants' (written longest ago) went; the last one's stayed.
        let last = dir.path().join("tenants").join("t11");
        assert_eq!(
            segments::read_all(&last, "results")
                .unwrap()
                .lines()
                .count(),
            200
        );
    }

    #[tokio::test]
    async fn a_size_cap_bounds_the_files_and_keeps_deduplicating() {
        let dir = tempfile::tempdir().unwrap();
        let cap = Retention {
            max_bytes: 512 * 1024,
            ..KEEP
        };
        let (bus, _) = EmbeddedBus::open(dir.path(), cap, "default").await.unwrap();
        let mut seq = 0;
        for _ in 0..100 {
            let batch: Vec<CheckResult> = (0..50)
                .map(|_| {
                    seq += 1;
                    result(seq, "a")
                })
                .collect();
            bus.publish_results(&agent(), &batch).await.unwrap();
        }
        let on_disk = |name| -> u64 {
            segments::paths(dir.path(), name)
                .unwrap()
                .iter()
                .map(|p| std::fs::metadata(p).unwrap().len())
                .sum()
        };
        let stored: Vec<u64> = segments::read_all(dir.path(), "results")
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<ResultLine>(l).unwrap().result.seq)
            .collect();
        assert!(stored.len() < 5000, "nothing was deleted");
        assert!(
            on_disk("results") <= cap.max_bytes + cap.segment_bytes(),
            "{} bytes on disk",
            on_disk("results")
        );
        // The newest are kept, in order, with no hole.
        assert_eq!(*stored.last().unwrap(), 5000);
        assert_eq!(stored, (stored[0]..=5000).collect::<Vec<_>>());
        // A resend of results whose lines are gone is still a duplicate.
        let p = bus
            .publish_results(&agent(), &[result(1, "a"), result(5001, "a")])
            .await
            .unwrap();
        assert_eq!((p.accepted, p.duplicates), (1, 1));
        // After a restart the watermark comes from what is kept.
        drop(bus);
        let (bus, rec) = EmbeddedBus::open(dir.path(), cap, "default").await.unwrap();
        assert_eq!(rec.latest["default.fp"]["a"].seq, 5001);
        assert_eq!(bus.last_seq(&agent()).await.unwrap(), 5001);
    }

    #[tokio::test]
    async fn duplicates_are_dropped_across_reopen_and_torn_tail_is_repaired() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (bus, rec) = EmbeddedBus::open(dir.path(), KEEP, "default")
                .await
                .unwrap();
            assert_eq!(rec.results_on_disk, 0);
            let p = bus
                .publish_results(&agent(), &[result(1, "a"), result(2, "b")])
                .await
                .unwrap();
            assert_eq!((p.accepted, p.duplicates), (2, 0));
            let p = bus
                .publish_results(&agent(), &[result(2, "b"), result(3, "a")])
                .await
                .unwrap();
            assert_eq!((p.accepted, p.duplicates), (1, 1));
        }
        // A crash mid-append leaves half a line behind.
        let path = dir.path().join("results.jsonl");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(br#"{"tenant":"default","fingerp"#).unwrap();
        drop(f);
        let (bus, rec) = EmbeddedBus::open(dir.path(), KEEP, "default")
            .await
            .unwrap();
        assert_eq!(rec.results_on_disk, 3);
        assert!(rec.torn_bytes_dropped > 0);
        assert_eq!(rec.latest["default.fp"]["a"].seq, 3);
        let p = bus
            .publish_results(&agent(), &[result(3, "a"), result(4, "a")])
            .await
            .unwrap();
        assert_eq!((p.accepted, p.duplicates), (1, 1));
        let text = segments::read_all(dir.path(), "results").unwrap();
        let seqs: Vec<u64> = text
            .lines()
            .map(|l| serde_json::from_str::<ResultLine>(l).unwrap().result.seq)
            .collect();
        assert_eq!(seqs, vec![1, 2, 3, 4]);
    }
}
