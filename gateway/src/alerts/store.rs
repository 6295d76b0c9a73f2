//! Where a tenant's alerting keeps what it must not lose: its alert state and bus position
//! (a snapshot, written every few seconds), and every notification from the moment it is
//! due until its receiver took it (a journal, appended durably before the first try).
//!
//! The two together make a restart exact. The snapshot holds the position read up to, the
//! alerts as they were there, and the queue then; the journal holds what came after:
//! notifications queued and deliveries done. Loading applies the journal to the snapshot;
//! the evaluator then reads the bus again from the snapshot's position, and the
//! notifications it makes again have the same ids as those the journal already has, so
//! they are not queued twice (nor resent if they were delivered before the restart).

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use async_trait::async_trait;
use outpost_sys::lock;
use serde::{Deserialize, Serialize};

use super::{Alerts, Notification};

/// One notification for one receiver, waiting to be delivered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Queued {
    /// Its place in the tenant's queue: each receiver is delivered in this order.
    pub seq: u64,
    pub receiver: String,
    pub notification: Notification,
    /// The agent's hostname and labels when it was queued (a retry sends the same body).
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The group it is sent with, when its route groups (`RouteDef::group_by`), and how
    /// long after it was queued (`queued_ms`) the group goes out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default)]
    pub group_wait_ms: u64,
    #[serde(default)]
    pub queued_ms: u64,
}

/// One journal line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Record {
    Queued(Box<Queued>),
    /// Delivered, or refused for good: out of the queue.
    Done {
        seq: u64,
    },
}

/// What the snapshot holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The bus position read up to.
    pub position: u64,
    /// Whether the evaluator has read the history that was on the bus when it first
    /// started (until then it notifies nobody; see `alerting`).
    pub caught_up: bool,
    pub alerts: Alerts,
    #[serde(default)]
    pub silences: super::silence::Silences,
    /// The next queue sequence number.
    pub next_seq: u64,
    /// The watchdog's last ping queued: the start of its period, in ms (a time, so that
    /// a change of `every` compares right).
    #[serde(default)]
    pub watchdog_ms: u64,
    pub queue: Vec<Queued>,
}

/// A snapshot with its journal applied.
#[derive(Debug, Default)]
pub struct Loaded {
    pub snapshot: Snapshot,
    /// (receiver, notification id) of everything queued since the snapshot: made again by
    /// reading the bus from its position, they are not queued again.
    pub queued_since: HashSet<(String, String)>,
}

#[async_trait]
pub trait AlertStore: Send + Sync {
    /// What was kept (`None`: nothing ever was).
    async fn load(&self) -> anyhow::Result<Option<Loaded>>;
    /// Append `records`; returns once they are durable.
    async fn append(&self, records: &[Record]) -> anyhow::Result<()>;
    /// Replace the snapshot (and start a new journal after it).
    async fn snapshot(&self, snapshot: Snapshot) -> anyhow::Result<()>;
    /// Remove everything kept (a deleted tenant's: a tenant made later under the same name
    /// starts from nothing).
    async fn remove(&self) -> anyhow::Result<()>;
    /// Whether this store's owner may still act on what it keeps (in a fleet: it still
    /// holds the tenant's lease); asked before every send.
    fn writable(&self) -> bool {
        true
    }
}

/// Apply journal `records` to `snapshot`.
pub fn replay(mut snapshot: Snapshot, records: impl IntoIterator<Item = Record>) -> Loaded {
    let mut queue: BTreeMap<u64, Queued> = snapshot.queue.drain(..).map(|q| (q.seq, q)).collect();
    let mut queued_since = HashSet::new();
    for record in records {
        match record {
            Record::Queued(q) => {
                queued_since.insert((q.receiver.clone(), q.notification.id.clone()));
                // A journal left from before the snapshot (a crash between the snapshot
                // and the journal's truncation) holds what the snapshot has already.
                if q.seq >= snapshot.next_seq {
                    snapshot.next_seq = q.seq + 1;
                    queue.insert(q.seq, *q);
                }
            }
            Record::Done { seq } => {
                queue.remove(&seq);
            }
        }
    }
    snapshot.queue = queue.into_values().collect();
    Loaded {
        snapshot,
        queued_since,
    }
}

/// The embedded gateway's store: `state.json` and `journal.jsonl` in a directory of the
/// tenant's (`DATA_DIR/alerts/<tenant>/`).
pub struct FileStore {
    dir: PathBuf,
    journal: Arc<Mutex<Option<std::fs::File>>>,
}

const STATE: &str = "state.json";
const JOURNAL: &str = "journal.jsonl";

impl FileStore {
    pub fn new(dir: &Path) -> FileStore {
        FileStore {
            dir: dir.to_path_buf(),
            journal: Arc::default(),
        }
    }

    /// Run `f` on a blocking thread (every write here is fsynced).
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Path, &Mutex<Option<std::fs::File>>) -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let (dir, journal) = (self.dir.clone(), self.journal.clone());
        tokio::task::spawn_blocking(move || f(&dir, &journal))
            .await
            .context("alert store task failed")?
    }
}

fn open_journal(dir: &Path) -> anyhow::Result<std::fs::File> {
    let path = dir.join(JOURNAL);
    let existed = path.exists();
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    if !existed {
        // The new file's name must survive a power cut as its lines do.
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("cannot sync {}", dir.display()))?;
    }
    Ok(f)
}

#[async_trait]
impl AlertStore for FileStore {
    async fn load(&self) -> anyhow::Result<Option<Loaded>> {
        self.blocking(|dir, journal| {
            // A handle from an earlier life may name a file deleted since (a tenant
            // deleted and made again): opened afresh.
            *lock(journal) = None;
            let state = dir.join(STATE);
            let snapshot = match std::fs::read(&state) {
                Ok(bytes) => match serde_json::from_slice::<Snapshot>(&bytes) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        // Kept for whoever looks into it; the alerts start over from the
                        // bus's history (notifications still in the journal are kept).
                        let aside = dir.join(format!("{STATE}.corrupt-{}", crate::util::now_ms()));
                        tracing::error!(file = %state.display(), error = %e, moved_to = %aside.display(),
                            "alert state is unreadable; set aside, alerts rebuilt from the bus");
                        std::fs::rename(&state, &aside)
                            .with_context(|| format!("cannot move {} aside", state.display()))?;
                        None
                    }
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(e).with_context(|| format!("cannot read {}", state.display())),
            };
            let journal = dir.join(JOURNAL);
            let mut records = Vec::new();
            let mut good_len = 0u64;
            match std::fs::File::open(&journal) {
                Ok(f) => {
                    let mut reader = std::io::BufReader::new(f);
                    let mut line = Vec::new();
                    let mut n = 0;
                    loop {
                        line.clear();
                        let got = reader
                            .read_until(b'\n', &mut line)
                            .with_context(|| format!("cannot read {}", journal.display()))?;
                        if got == 0 || line.last() != Some(&b'\n') {
                            // The end, or a line torn by a crash while it was written
                            // (never acknowledged as durable): cut below.
                            break;
                        }
                        n += 1;
                        good_len += got as u64;
                        match serde_json::from_slice::<Record>(&line) {
                            Ok(r) => records.push(r),
                            Err(e) => tracing::error!(file = %journal.display(), line = n, error = %e,
                                "alert journal line is unreadable; skipped"),
                        }
                    }
                    let f = std::fs::OpenOptions::new().write(true).open(&journal)?;
                    if f.metadata()?.len() > good_len {
                        tracing::warn!(file = %journal.display(), "alert journal ends with a torn line; cut");
                        f.set_len(good_len)?;
                        f.sync_all()?;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot read {}", journal.display()))
                }
            }
            if snapshot.is_none() && records.is_empty() {
                return Ok(None);
            }
            Ok(Some(replay(snapshot.unwrap_or_default(), records)))
        })
        .await
    }

    async fn append(&self, records: &[Record]) -> anyhow::Result<()> {
        let mut buf = Vec::new();
        for r in records {
            serde_json::to_writer(&mut buf, r)?;
            buf.push(b'\n');
        }
        self.blocking(move |dir, journal| {
            let mut journal = lock(journal);
            if journal.is_none() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
                *journal = Some(open_journal(dir)?);
            }
            let f = journal.as_mut().expect("opened above");
            let before = f.metadata()?.len();
            let written = f.write_all(&buf).and_then(|()| f.sync_data());
            if let Err(e) = written {
                // Nothing half-written may stay: the next line would be glued to it, and
                // a line that is not durable was not taken. Cut back; reopen next time.
                let cut = f.set_len(before).and_then(|()| f.sync_data());
                *journal = None;
                if let Err(c) = cut {
                    tracing::error!(file = %dir.join(JOURNAL).display(), error = %c,
                        "cannot cut a failed write off the alert journal");
                }
                return Err(e)
                    .with_context(|| format!("cannot write {}", dir.join(JOURNAL).display()));
            }
            Ok(())
        })
        .await
    }

    async fn snapshot(&self, snapshot: Snapshot) -> anyhow::Result<()> {
        self.blocking(move |dir, journal| {
            let bytes = serde_json::to_vec(&snapshot)?;
            let mut journal = lock(journal);
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            crate::util::write_atomic(&dir.join(STATE), &bytes, 0o600)
                .with_context(|| format!("cannot write {}", dir.join(STATE).display()))?;
            // The snapshot holds all the journal did: start it again.
            let f = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(dir.join(JOURNAL))?;
            f.sync_all()?;
            *journal = Some(open_journal(dir)?);
            Ok(())
        })
        .await
    }

    async fn remove(&self) -> anyhow::Result<()> {
        self.blocking(|dir, journal| {
            *lock(journal) = None;
            match std::fs::remove_dir_all(dir) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e).with_context(|| format!("cannot remove {}", dir.display())),
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::{Kind, Notification};
    use outpost_protocol::Status;

    fn queued(seq: u64, receiver: &str, id: &str) -> Queued {
        Queued {
            seq,
            receiver: receiver.into(),
            notification: Notification {
                id: id.into(),
                fingerprint: "fp".into(),
                check: "disk".into(),
                kind: Kind::Firing,
                status: Status::Critical,
                since_ms: 1,
                at_ms: 2,
                output: "full".into(),
                receivers: vec![receiver.into()],
            },
            hostname: "h".into(),
            labels: BTreeMap::new(),
            group: None,
            group_wait_ms: 0,
            queued_ms: 0,
        }
    }

    #[tokio::test]
    async fn the_journal_and_the_snapshot_give_back_the_queue_across_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        assert!(store.load().await.unwrap().is_none(), "nothing kept yet");
        store
            .append(&[
                Record::Queued(Box::new(queued(0, "a", "n/0"))),
                Record::Queued(Box::new(queued(1, "b", "n/0"))),
            ])
            .await
            .unwrap();
        store.append(&[Record::Done { seq: 0 }]).await.unwrap();
        let loaded = FileStore::new(dir.path()).load().await.unwrap().unwrap();
        assert_eq!(loaded.snapshot.queue, [queued(1, "b", "n/0")]);
        assert_eq!(loaded.snapshot.next_seq, 2);
        assert!(loaded.queued_since.contains(&("a".into(), "n/0".into())));

        // A snapshot takes the queue in; the journal starts again after it.
        let snap = Snapshot {
            position: 42,
            caught_up: true,
            next_seq: 2,
            queue: loaded.snapshot.queue.clone(),
            ..Snapshot::default()
        };
        store.snapshot(snap).await.unwrap();
        store
            .append(&[
                Record::Queued(Box::new(queued(2, "a", "n/1"))),
                Record::Done { seq: 1 },
            ])
            .await
            .unwrap();
        let loaded = FileStore::new(dir.path()).load().await.unwrap().unwrap();
        assert_eq!(loaded.snapshot.position, 42);
        assert_eq!(loaded.snapshot.queue, [queued(2, "a", "n/1")]);
        assert_eq!(loaded.snapshot.next_seq, 3);
        assert_eq!(
            loaded.queued_since,
            HashSet::from([("a".to_string(), "n/1".to_string())]),
            "only what came after the snapshot"
        );
    }

    #[tokio::test]
    async fn a_torn_last_line_is_cut_and_a_corrupt_state_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        store
            .append(&[Record::Queued(Box::new(queued(0, "a", "n/0")))])
            .await
            .unwrap();
        let journal = dir.path().join(JOURNAL);
        let good = std::fs::metadata(&journal).unwrap().len();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&journal)
            .unwrap()
            .write_all(b"{\"queued\":{\"se")
            .unwrap();
        std::fs::write(dir.path().join(STATE), b"{not json").unwrap();
        let loaded = FileStore::new(dir.path()).load().await.unwrap().unwrap();
        assert_eq!(
            loaded.snapshot.queue,
            [queued(0, "a", "n/0")],
            "the notification is kept"
        );
        assert!(!loaded.snapshot.caught_up, "alerts rebuilt from the bus");
        assert_eq!(std::fs::metadata(&journal).unwrap().len(), good);
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("state.json.corrupt-")
            })
            .collect();
        assert_eq!(aside.len(), 1);
        // Appending goes on after the cut, not after the torn bytes.
        let store = FileStore::new(dir.path());
        store.append(&[Record::Done { seq: 0 }]).await.unwrap();
        let loaded = FileStore::new(dir.path()).load().await.unwrap().unwrap();
        assert!(loaded.snapshot.queue.is_empty());
    }

    #[test]
    fn a_journal_older_than_the_snapshot_adds_nothing() {
        // A crash after the snapshot was written and before the journal was cut.
        let snap = Snapshot {
            next_seq: 2,
            queue: vec![queued(1, "a", "n/1")],
            ..Snapshot::default()
        };
        let loaded = replay(
            snap,
            [
                Record::Queued(Box::new(queued(0, "a", "n/0"))),
                Record::Done { seq: 0 },
                Record::Queued(Box::new(queued(1, "a", "n/1"))),
            ],
        );
        assert_eq!(loaded.snapshot.queue, [queued(1, "a", "n/1")]);
        assert_eq!(loaded.snapshot.next_seq, 2);
    }
}
