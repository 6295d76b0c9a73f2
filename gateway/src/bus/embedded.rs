//! The embedded bus: append-only JSON-lines logs under `DATA_DIR/bus/`, written by one
//! task that group-commits (one fsync for everything queued), so "durable" means on disk
//! exactly as it means "in a JetStream stream" when clustered.
//!
//! `results` holds one line per result: `{"tenant","fingerprint","result":{..}}`.
//! `presence` holds presence events, `audit` audit events (refused access). Each is a [`super::segments::Log`]: `results.jsonl` is being
//! written, `results-<n>.jsonl` are sealed, and retention deletes the oldest sealed
//! segments by age and size, as the NATS results stream does with the same settings.
//! Deduplication is by (tenant, fingerprint, seq): agents number results strictly increasingly, so
//! the bus keeps the highest durable sequence per agent and drops anything at or below it.
//! Not here: consumers other than the gateway itself.

use outpost_sys::lock;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use outpost_protocol::CheckResult;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::segments::{Log, Retention};
use super::{agent_key, AgentRef, AuditEvent, Bus, BusError, Presence, PresenceEvent, Published};

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
    /// Apply retention.
    Maintain,
}

pub struct EmbeddedBus {
    tx: mpsc::Sender<Job>,
    watermarks: Watermarks,
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
    /// Open the bus in `dir`. `retention` bounds the results; presence events are kept
    /// for the same age.
    pub async fn open(
        dir: &Path,
        retention: Retention,
    ) -> std::io::Result<(EmbeddedBus, Recovered)> {
        let opened = Log::open(dir, "results", retention)?;
        let (watermarks, mut recovered) = recover(&opened.log)?;
        recovered.torn_bytes_dropped = opened.torn_bytes_dropped;
        if opened.torn_bytes_dropped > 0 {
            tracing::warn!(dir = %dir.display(), bytes = opened.torn_bytes_dropped, "dropped a torn last result line left by a crash");
        }
        let presence_retention = Retention {
            max_bytes: 0,
            ..retention
        };
        let presence = Log::open(dir, "presence", presence_retention)?.log;
        recovered.presence = last_presence(&presence)?;
        let audit = Log::open(dir, "audit", presence_retention)?.log;
        let watermarks: Watermarks = Arc::new(Mutex::new(watermarks));
        let (tx, rx) = mpsc::channel(QUEUE);
        let marks = watermarks.clone();
        let results = opened.log;
        std::thread::Builder::new()
            .name("outpost-bus-writer".into())
            .spawn(move || writer(rx, results, presence, audit, marks))?;
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
        Ok((EmbeddedBus { tx, watermarks }, recovered))
    }
}

/// Rebuild the per-agent watermarks and the latest result per check from the results log.
fn recover(log: &Log) -> std::io::Result<(HashMap<String, u64>, Recovered)> {
    let mut watermarks: HashMap<String, u64> = HashMap::new();
    let mut rec = Recovered::default();
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
    })?;
    Ok((watermarks, rec))
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
    mut results: Log,
    mut presence: Log,
    mut audit: Log,
    watermarks: Watermarks,
) {
    let mut jobs = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        jobs.push(first);
        while jobs.len() < QUEUE {
            match rx.try_recv() {
                Ok(more) => jobs.push(more),
                Err(_) => break,
            }
        }
        let mut rbuf = Vec::new();
        let mut pbuf = Vec::new();
        let mut abuf = Vec::new();
        let mut outcomes = Vec::with_capacity(jobs.len());
        // Watermarks move only once the write is durable; until then track them per group.
        let mut pending: HashMap<String, u64> = HashMap::new();
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
                            if serde_json::to_writer(&mut rbuf, &line).is_ok() {
                                rbuf.push(b'\n');
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
                    Job::Maintain => outcomes.push(None),
                }
            }
        }
        // Results and presence succeed or fail on their own: a failed presence write must
        // not make durable results look failed (they would be written twice).
        let rio = results.append(&rbuf);
        let pio = presence.append(&pbuf);
        let aio = audit.append(&abuf);
        match &rio {
            Ok(()) => lock(&watermarks).extend(pending),
            Err(e) => {
                tracing::error!(error = %e, "embedded bus could not store results; their agents will resend")
            }
        }
        if let Err(e) = &pio {
            tracing::error!(error = %e, "embedded bus could not store presence events");
        }
        if let Err(e) = &aio {
            tracing::error!(error = %e, "embedded bus could not store audit events");
        }
        // Before the replies, so nothing touches the files once the last publisher has
        // its answer.
        let now = SystemTime::now();
        for log in [&mut results, &mut presence, &mut audit] {
            if let Err(e) = log.maintain(now) {
                tracing::error!(error = %e, "embedded bus retention failed; will retry");
            }
        }
        for (job, outcome) in jobs.drain(..).zip(outcomes) {
            match job {
                Job::Results { done, .. } => {
                    let _ = done.send(match &rio {
                        Ok(()) => Ok(outcome.unwrap_or_default()),
                        Err(e) => Err(e.to_string()),
                    });
                }
                Job::Presence { done, .. } => {
                    let _ = done.send(pio.as_ref().map(|_| ()).map_err(|e| e.to_string()));
                }
                Job::Audit { done, .. } => {
                    let _ = done.send(aio.as_ref().map(|_| ()).map_err(|e| e.to_string()));
                }
                Job::Maintain => {}
            }
        }
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

    #[tokio::test]
    async fn a_size_cap_bounds_the_files_and_keeps_deduplicating() {
        let dir = tempfile::tempdir().unwrap();
        let cap = Retention {
            max_bytes: 512 * 1024,
            ..KEEP
        };
        let (bus, _) = EmbeddedBus::open(dir.path(), cap).await.unwrap();
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
        let (bus, rec) = EmbeddedBus::open(dir.path(), cap).await.unwrap();
        assert_eq!(rec.latest["default.fp"]["a"].seq, 5001);
        assert_eq!(bus.last_seq(&agent()).await.unwrap(), 5001);
    }

    #[tokio::test]
    async fn duplicates_are_dropped_across_reopen_and_torn_tail_is_repaired() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (bus, rec) = EmbeddedBus::open(dir.path(), KEEP).await.unwrap();
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
        let (bus, rec) = EmbeddedBus::open(dir.path(), KEEP).await.unwrap();
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
