//! The embedded bus: append-only JSON-lines files under `DATA_DIR/bus/`, written by one
//! task that group-commits (one fsync for everything queued), so "durable" means on disk
//! exactly as it will mean "in a JetStream stream" when clustered.
//!
//! `results.jsonl` holds one line per result: `{"tenant","fingerprint","result":{..}}`.
//! `presence.jsonl` holds presence events. Deduplication is by (fingerprint, seq): agents
//! number results strictly increasingly, so the bus keeps the highest durable sequence per
//! agent and drops anything at or below it. Not here: retention and compaction (the files
//! grow until an operator rotates them), consumers other than the gateway itself.

use std::collections::HashMap;
use std::io::{BufRead, Seek, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use outpost_protocol::CheckResult;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::{AgentRef, Bus, BusError, Presence, PresenceEvent, Published};

/// Jobs waiting for the writer. A full queue makes publishers wait (backpressure reaches
/// the agents as slower acks), it never drops.
const QUEUE: usize = 1024;

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
    pub async fn open(dir: &Path) -> std::io::Result<(EmbeddedBus, Recovered)> {
        std::fs::create_dir_all(dir)?;
        let results_path = dir.join("results.jsonl");
        let presence_path = dir.join("presence.jsonl");
        let (results, watermarks, mut recovered) = recover(&results_path)?;
        recovered.presence = last_presence(&presence_path)?;
        let presence = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&presence_path)?;
        // The files may have just been created: make their directory entries durable.
        std::fs::File::open(dir)?.sync_all()?;
        let watermarks: Watermarks = Arc::new(Mutex::new(watermarks));
        let (tx, rx) = mpsc::channel(QUEUE);
        let marks = watermarks.clone();
        std::thread::Builder::new()
            .name("outpost-bus-writer".into())
            .spawn(move || writer(rx, results, presence, marks))?;
        Ok((EmbeddedBus { tx, watermarks }, recovered))
    }
}

/// Read `results.jsonl`, drop a torn last line (a crash mid-append), and rebuild the
/// per-agent watermarks and the latest result per check.
fn recover(path: &Path) -> std::io::Result<(std::fs::File, HashMap<String, u64>, Recovered)> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)?;
    let mut watermarks: HashMap<String, u64> = HashMap::new();
    let mut rec = Recovered::default();
    let mut good_len: u64 = 0;
    let mut reader = std::io::BufReader::new(&file);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 {
            break;
        }
        if line.last() != Some(&b'\n') {
            rec.torn_bytes_dropped = n as u64;
            break;
        }
        good_len += n as u64;
        match serde_json::from_slice::<ResultLine>(&line) {
            Ok(l) => {
                rec.results_on_disk += 1;
                let w = watermarks.entry(l.fingerprint.clone()).or_default();
                *w = (*w).max(l.result.seq);
                let per_agent = rec.latest.entry(l.fingerprint).or_default();
                match per_agent.get(&l.result.check) {
                    Some(old) if old.seq >= l.result.seq => {}
                    _ => {
                        per_agent.insert(l.result.check.clone(), l.result);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "skipping unreadable bus line")
            }
        }
    }
    drop(reader);
    if rec.torn_bytes_dropped > 0 {
        tracing::warn!(file = %path.display(), bytes = rec.torn_bytes_dropped, "dropping a torn last line left by a crash");
        file.set_len(good_len)?;
        file.seek(std::io::SeekFrom::End(0))?;
        file.sync_all()?;
    }
    Ok((file, watermarks, rec))
}

/// The last event per agent in `presence.jsonl` (unreadable lines skipped).
fn last_presence(path: &Path) -> std::io::Result<HashMap<String, PresenceEvent>> {
    let mut last = HashMap::new();
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(last),
        Err(e) => return Err(e),
    };
    for line in std::io::BufReader::new(file).lines() {
        if let Ok(event) = serde_json::from_str::<PresenceEvent>(&line?) {
            last.insert(event.agent.fingerprint.clone(), event);
        }
    }
    Ok(last)
}

/// Append `buf` to `file` and make it durable; on failure cut the file back to where it
/// was, so a half-written line can never be glued to the next successful write.
fn append_durably(file: &mut std::fs::File, buf: &[u8]) -> std::io::Result<()> {
    if buf.is_empty() {
        return Ok(());
    }
    let start = file.seek(std::io::SeekFrom::End(0))?;
    let written = file.write_all(buf).and_then(|_| file.sync_data());
    if written.is_err() {
        let rolled_back = file.set_len(start).and_then(|_| file.sync_data());
        if let Err(e) = rolled_back {
            tracing::error!(error = %e, "cannot cut a failed bus write back; the next start drops the torn line");
        }
    }
    written
}

/// Watermarks: the highest durable sequence number per fingerprint. Shared so sessions can
/// tell agents where to number from; only the writer changes them, after a durable write.
type Watermarks = Arc<Mutex<HashMap<String, u64>>>;

fn writer(
    mut rx: mpsc::Receiver<Job>,
    mut results: std::fs::File,
    mut presence: std::fs::File,
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
        let mut outcomes = Vec::with_capacity(jobs.len());
        // Watermarks move only once the write is durable; until then track them per group.
        let mut pending: HashMap<String, u64> = HashMap::new();
        {
            let marks = watermarks.lock().unwrap_or_else(|p| p.into_inner());
            for job in &jobs {
                match job {
                    Job::Results {
                        agent,
                        results: batch,
                        ..
                    } => {
                        let mut high = pending
                            .get(&agent.fingerprint)
                            .or(marks.get(&agent.fingerprint))
                            .copied()
                            .unwrap_or(0);
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
                        pending.insert(agent.fingerprint.clone(), high);
                        outcomes.push(Some(p));
                    }
                    Job::Presence { event, .. } => {
                        if serde_json::to_writer(&mut pbuf, event).is_ok() {
                            pbuf.push(b'\n');
                        }
                        outcomes.push(None);
                    }
                }
            }
        }
        // Results and presence succeed or fail on their own: a failed presence write must
        // not make durable results look failed (they would be written twice).
        let rio = append_durably(&mut results, &rbuf);
        let pio = append_durably(&mut presence, &pbuf);
        match &rio {
            Ok(()) => watermarks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(pending),
            Err(e) => {
                tracing::error!(error = %e, "embedded bus could not store results; their agents will resend")
            }
        }
        if let Err(e) = &pio {
            tracing::error!(error = %e, "embedded bus could not store presence events");
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
        Ok(self
            .watermarks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&agent.fingerprint)
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
}

impl Presence {
    pub fn as_str(self) -> &'static str {
        match self {
            Presence::Online => "online",
            Presence::Lost => "lost",
            Presence::Deregistered => "deregistered",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_protocol::Status;

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

    #[tokio::test]
    async fn duplicates_are_dropped_across_reopen_and_torn_tail_is_repaired() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (bus, rec) = EmbeddedBus::open(dir.path()).await.unwrap();
            assert_eq!(rec.results_on_disk, 0);
            let p = bus
                .publish_results(&agent(), &[result(1, "a"), result(2, "b")])
                .await
                .unwrap();
            assert_eq!(
                p,
                Published {
                    accepted: 2,
                    duplicates: 0
                }
            );
            let p = bus
                .publish_results(&agent(), &[result(2, "b"), result(3, "a")])
                .await
                .unwrap();
            assert_eq!(
                p,
                Published {
                    accepted: 1,
                    duplicates: 1
                }
            );
        }
        // A crash mid-append leaves half a line behind.
        let path = dir.path().join("results.jsonl");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(br#"{"tenant":"default","fingerp"#).unwrap();
        drop(f);
        let (bus, rec) = EmbeddedBus::open(dir.path()).await.unwrap();
        assert_eq!(rec.results_on_disk, 3);
        assert!(rec.torn_bytes_dropped > 0);
        assert_eq!(rec.latest["fp"]["a"].seq, 3);
        let p = bus
            .publish_results(&agent(), &[result(3, "a"), result(4, "a")])
            .await
            .unwrap();
        assert_eq!(
            p,
            Published {
                accepted: 1,
                duplicates: 1
            }
        );
        let text = std::fs::read_to_string(&path).unwrap();
        let seqs: Vec<u64> = text
            .lines()
            .map(|l| serde_json::from_str::<ResultLine>(l).unwrap().result.seq)
            .collect();
        assert_eq!(seqs, vec![1, 2, 3, 4]);
    }
}
