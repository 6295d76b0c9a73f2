//! The outbox on disk, in a redb file (the design brief says why not sled).
//!
//! One table maps the sequence number to the result as JSON; a second keeps the count of
//! results dropped because the outbox was full and the highest sequence number ever
//! stored.
//!
//! Appends never wait for the disk. [`Outbox::append`] numbers the result and stages it in
//! memory; one writer thread commits everything staged in one durable transaction, at most
//! every 10 ms unless someone waits in `flush`, so a burst of a thousand results costs one
//! fsync, not a thousand, and a slow or failing disk never holds up a check. Only committed results are handed to the connection
//! ([`Outbox::pending_after`]), so nothing reaches the gateway that a crash could take back.
//! [`Outbox::flush`] waits until everything appended so far is committed. A commit that
//! fails is retried with backoff; meanwhile the staged results stay in memory, under the
//! same bound.
//!
//! The outbox is bounded in bytes (the JSON plus 8 bytes of key per result): a commit that
//! would go over the bound first deletes the oldest results, in the same transaction, and
//! adds them to the dropped counter. An ack deletes everything up to the acked number in
//! one transaction that does not wait for the disk: if a crash undoes it, those results
//! are sent again and the bus drops them as duplicates.
//!
//! The file is checked in full on open. A file redb refuses (bad checksums, truncated,
//! an unknown format) is renamed to `outbox.redb.corrupt-<unix-ms>` and a fresh outbox is
//! started; [`DiskOutbox::open`] returns why, so the caller can report it as an error
//! result. A row whose JSON does not decode is deleted on open and counted as dropped;
//! nothing read from the file is unwrapped.

use outpost_sys::lock;
use std::collections::VecDeque;
use std::ops::Bound;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use outpost_protocol::{CheckResult, Status};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::Notify;

use super::{Outbox, SeqFile};

/// The outbox file, inside the state directory.
pub const FILE_NAME: &str = "outbox.redb";

const RESULTS: TableDefinition<u64, &[u8]> = TableDefinition::new("results");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const DROPPED: &str = "dropped";
const LAST_SEQ: &str = "last_seq";
/// Bytes a row costs besides its JSON: the key.
const ROW_OVERHEAD: u64 = 8;
/// redb's page cache; the outbox is read front to back, so a small one is enough.
const CACHE_BYTES: usize = 8 * 1024 * 1024;
/// What a commit says while the file is closed between an error and its reopening.
const NOT_OPEN: &str = "the outbox file is closed after an error and not yet reopened";
/// Compact on open when the file is this much bigger than the bound plus slack.
const COMPACT_SLACK: u64 = 4 * 1024 * 1024;

pub struct DiskOutbox {
    shared: Arc<Shared>,
    writer: Option<std::thread::JoinHandle<()>>,
}

struct Shared {
    /// The open file. redb refuses every use of a database after an I/O error (a full
    /// disk), so the writer closes and reopens it after a failed commit: `None` between
    /// the two, or while it cannot be reopened yet.
    db: RwLock<Option<Database>>,
    state: Mutex<State>,
    /// Wakes the writer (something staged, or closing) and flushers (a commit ended).
    changed: Condvar,
    /// Held through every write transaction, so that the writer's and an ack's byte
    /// counts see each other.
    write_lock: Mutex<()>,
    max_bytes: u64,
    path: PathBuf,
    notify: Notify,
    /// Unit tests make commits fail with this.
    #[cfg(test)]
    fail_commits: std::sync::atomic::AtomicBool,
}

struct State {
    seq: SeqFile,
    /// Numbered but not yet committed, oldest first.
    staged: VecDeque<Staged>,
    staged_bytes: u64,
    /// The batch the writer is committing: results and bytes.
    writing_len: usize,
    writing_bytes: u64,
    /// Committed rows and their bytes.
    len: usize,
    bytes: u64,
    dropped: u64,
    /// The last number handed out, and the number up to which everything is committed
    /// (or was dropped).
    issued: u64,
    settled: u64,
    /// Why the last commit failed; cleared by the next one that succeeds.
    failure: Option<String>,
    commits: u64,
    closing: bool,
    /// Someone waits in `flush`: commit now rather than after the gap.
    flush_wanted: bool,
    /// Results up to this are in flight on the current session (0: none).
    sending_through: u64,
    /// The highest ack seen.
    acked: u64,
    /// Rows the bound dropped while they were in flight: counted as dropped only if the
    /// session ends without their ack.
    dropped_in_flight: std::collections::BTreeSet<u64>,
}

struct Staged {
    seq: u64,
    json: Vec<u8>,
}

impl Staged {
    fn size(&self) -> u64 {
        self.json.len() as u64 + ROW_OVERHEAD
    }
}

/// Why a file could not be opened: either it is unreadable as an outbox (move it aside)
/// or something else is wrong (another agent holds it, permissions) and it must be left
/// alone.
enum LoadError {
    Corrupt(String),
    Other(std::io::Error),
}

impl From<redb::Error> for LoadError {
    fn from(e: redb::Error) -> LoadError {
        use redb::Error as E;
        match e {
            E::Io(io)
                if !matches!(
                    io.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::InvalidData
                ) =>
            {
                LoadError::Other(io)
            }
            E::DatabaseAlreadyOpen
            | E::LockProtocolMismatch
            | E::LockPoisoned(_)
            | E::WouldBlock
            | E::TransactionInProgress
            | E::DatabaseClosed
            | E::PreviousIo => LoadError::Other(std::io::Error::other(format!(
                "the outbox cannot be opened: {e}"
            ))),
            other => LoadError::Corrupt(other.to_string()),
        }
    }
}

macro_rules! redb_from {
    ($($t:ty),*) => {$(
        impl From<$t> for LoadError {
            fn from(e: $t) -> LoadError {
                LoadError::from(redb::Error::from(e))
            }
        }
    )*};
}
redb_from!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

struct Loaded {
    db: Database,
    len: usize,
    bytes: u64,
    dropped: u64,
    last_seq: u64,
}

fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(format!("outbox: {e}"))
}

/// Decode one row; the key must match the sequence number inside.
fn decode(key: u64, value: &[u8]) -> Result<CheckResult, String> {
    let r: CheckResult = serde_json::from_slice(value).map_err(|e| e.to_string())?;
    if r.seq != key {
        return Err(format!("row {key} holds result number {}", r.seq));
    }
    Ok(r)
}

fn open_db(path: &Path) -> Result<Database, LoadError> {
    // The integrity check verifies every page's checksum, so a file altered behind redb's
    // back fails here rather than panicking later. redb's debug builds still panic on some
    // malformed files, hence the catch.
    let opened = catch_unwind(AssertUnwindSafe(|| {
        Database::builder()
            .set_cache_size(CACHE_BYTES)
            .set_check_integrity_on_open(true)
            .create(path)
    }));
    match opened {
        Ok(r) => Ok(r?),
        Err(_) => Err(LoadError::Corrupt("redb panicked reading the file".into())),
    }
}

/// Open (or create) the file, drop rows that do not decode, and count what is there.
fn load(path: &Path, max_bytes: u64) -> Result<Loaded, LoadError> {
    let mut db = open_db(path)?;
    let scanned = catch_unwind(AssertUnwindSafe(|| scan(&db)));
    let (len, bytes, dropped, last_seq) = match scanned {
        Ok(r) => r?,
        Err(_) => {
            return Err(LoadError::Corrupt(
                "redb panicked reading the results".into(),
            ))
        }
    };
    let file_len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    if file_len > max_bytes.saturating_mul(2).saturating_add(COMPACT_SLACK) {
        match db.compact() {
            Ok(_) => tracing::info!(
                before = file_len,
                after = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
                "compacted the outbox file"
            ),
            Err(e) => tracing::warn!(error = %e, "could not compact the outbox file"),
        }
    }
    Ok(Loaded {
        db,
        len,
        bytes,
        dropped,
        last_seq,
    })
}

fn scan(db: &Database) -> Result<(usize, u64, u64, u64), LoadError> {
    let txn = db.begin_write()?;
    let (len, bytes, dropped, last_seq) = {
        let mut table = txn.open_table(RESULTS)?;
        let mut meta = txn.open_table(META)?;
        let (mut len, mut bytes, mut last_seq) = (0usize, 0u64, 0u64);
        let mut bad = Vec::new();
        for row in table.iter()? {
            let (k, v) = row?;
            let (key, value) = (k.value(), v.value());
            last_seq = last_seq.max(key);
            match decode(key, value) {
                Ok(_) => {
                    len += 1;
                    bytes += value.len() as u64 + ROW_OVERHEAD;
                }
                Err(why) => {
                    tracing::error!(seq = key, error = %why, "outbox row does not decode; dropping it");
                    bad.push(key);
                }
            }
        }
        for key in &bad {
            table.remove(key)?;
        }
        let mut dropped = meta.get(DROPPED)?.map(|g| g.value()).unwrap_or(0);
        dropped = dropped.saturating_add(bad.len() as u64);
        last_seq = last_seq.max(meta.get(LAST_SEQ)?.map(|g| g.value()).unwrap_or(0));
        if !bad.is_empty() {
            meta.insert(DROPPED, dropped)?;
        }
        (len, bytes, dropped, last_seq)
    };
    // Also creates both tables in a fresh file.
    txn.commit()?;
    Ok((len, bytes, dropped, last_seq))
}

fn unix_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// The shortest time between two commits when nobody waits in `flush`: results finishing
/// within it share one commit (and so one fsync).
const COMMIT_GAP: Duration = Duration::from_millis(10);
/// Staged results that make the writer commit at once, gap or not.
const GROUP_MAX: usize = 1024;

/// The writer's wait after a failed commit doubles from this, up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(1);

impl DiskOutbox {
    /// Open the outbox in `state_dir`, keeping at most `max_bytes` of results.
    ///
    /// When the existing file cannot be read it is moved aside, a fresh outbox is started,
    /// and the second value says what happened and where the old file went: the caller
    /// should report it as an error result. An error is returned only when the outbox
    /// cannot be used at all (another process holds it, the directory is not writable, the
    /// sequence file is damaged), and then nothing has been moved.
    pub fn open(state_dir: &Path, max_bytes: u64) -> std::io::Result<(DiskOutbox, Option<String>)> {
        std::fs::create_dir_all(state_dir)?;
        let max_bytes = max_bytes.max(1);
        let mut seq = SeqFile::open(&state_dir.join("seq"))?;
        let path = state_dir.join(FILE_NAME);
        let mut moved_aside = None;
        let loaded = match load(&path, max_bytes) {
            Ok(l) => l,
            Err(LoadError::Other(e)) => return Err(e),
            Err(LoadError::Corrupt(why)) => {
                let mut aside = state_dir.join(format!("{FILE_NAME}.corrupt-{}", unix_ms()));
                let mut n = 1;
                while aside.exists() {
                    aside = state_dir.join(format!("{FILE_NAME}.corrupt-{}-{n}", unix_ms()));
                    n += 1;
                }
                std::fs::rename(&path, &aside)?;
                let reason = format!(
                    "the outbox file {} could not be read ({why}); it was moved to {} and a fresh outbox started, so results not yet acked by the gateway may be lost",
                    path.display(),
                    aside.display()
                );
                tracing::error!("{reason}");
                moved_aside = Some(reason);
                match load(&path, max_bytes) {
                    Ok(l) => l,
                    Err(LoadError::Other(e)) => return Err(e),
                    Err(LoadError::Corrupt(why)) => {
                        return Err(io_err(format!("a fresh outbox file is unusable: {why}")))
                    }
                }
            }
        };
        // Check output is the host's business: the agent's user only (redb creates the
        // file with the process's umask).
        make_private(&path)?;
        // Never hand out a number at or below one already stored, even if the sequence
        // file was lost or restored from an old backup.
        seq.raise(loaded.last_seq)?;
        let shared = Arc::new(Shared {
            db: RwLock::new(Some(loaded.db)),
            state: Mutex::new(State {
                seq,
                staged: VecDeque::new(),
                staged_bytes: 0,
                writing_len: 0,
                writing_bytes: 0,
                len: loaded.len,
                bytes: loaded.bytes,
                dropped: loaded.dropped,
                issued: loaded.last_seq,
                settled: loaded.last_seq,
                failure: None,
                commits: 0,
                closing: false,
                flush_wanted: false,
                sending_through: 0,
                acked: 0,
                dropped_in_flight: Default::default(),
            }),
            changed: Condvar::new(),
            write_lock: Mutex::new(()),
            max_bytes,
            path,
            notify: Notify::new(),
            #[cfg(test)]
            fail_commits: Default::default(),
        });
        let writer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("outbox-writer".into())
                .spawn(move || shared.write_loop())?
        };
        Ok((
            DiskOutbox {
                shared,
                writer: Some(writer),
            },
            moved_aside,
        ))
    }

    /// Bytes held (the JSON of every result plus 8 per result), staged ones included.
    pub fn bytes(&self) -> u64 {
        let st = self.shared.lock();
        st.bytes + st.writing_bytes + st.staged_bytes
    }

    pub fn max_bytes(&self) -> u64 {
        self.shared.max_bytes
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Transactions committed since open: appends per commit is the grouping achieved.
    pub fn commits(&self) -> u64 {
        self.shared.lock().commits
    }
}

impl Drop for DiskOutbox {
    /// Commit what is staged (one attempt) and stop the writer.
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.changed.notify_all();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn append(&self, mut result: CheckResult) -> std::io::Result<u64> {
        let mut st = self.lock();
        if st.closing {
            return Err(io_err("the outbox is closing"));
        }
        let seq = st.seq.allocate()?;
        result.seq = seq;
        let json = serde_json::to_vec(&result).map_err(io_err)?;
        let item = Staged { seq, json };
        self.bound_staged(&mut st, item.size());
        st.staged_bytes += item.size();
        st.staged.push_back(item);
        st.issued = seq;
        // The writer needs waking only when it may be idle (nothing was staged) or when a
        // group is full; otherwise it is already counting down to its next commit.
        let wake = st.staged.len() == 1 || st.staged.len() >= GROUP_MAX;
        // While the disk refuses commits the result is sent from memory: wake the sender.
        let failing = st.failure.is_some();
        drop(st);
        if wake {
            self.changed.notify_all();
        }
        if failing {
            self.notify.notify_one();
        }
        Ok(seq)
    }

    /// A result of [`crate::outbox::OUTBOX_CHECK`] about the outbox itself, queued like any other.
    fn report(&self, status: Status, output: String) {
        let r = CheckResult {
            started_at_ms: crate::util::now_ms(),
            ..CheckResult::new(crate::outbox::OUTBOX_CHECK, status, output)
        };
        if let Err(e) = self.append(r) {
            tracing::error!(error = %e, "cannot queue the outbox's report on itself");
        }
    }

    fn db(&self) -> RwLockReadGuard<'_, Option<Database>> {
        self.db.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Close the file and open it again: after an I/O error redb answers every call
    /// with "Previous I/O error occurred" until then. Commits that failed left nothing
    /// behind; an ack's delete that the file lost comes back as rows the gateway already
    /// has (sent again, dropped by the bus as duplicates, deleted by the next ack). No
    /// integrity check and no recount (both read the whole file, holding up acks at
    /// every retry): the counts stand. A file that cannot be opened stays closed and is
    /// retried; nothing is sent from it meanwhile, and the next start of the agent deals
    /// with it as with any file (moved aside if it is unreadable).
    fn reopen(&self) -> Result<(), String> {
        let _w = lock(&self.write_lock);
        let mut db = self.db.write().unwrap_or_else(|p| p.into_inner());
        // The old handle first: redb allows one open database per file.
        *db = None;
        let opened = catch_unwind(AssertUnwindSafe(|| {
            Database::builder()
                .set_cache_size(CACHE_BYTES)
                .create(&self.path)
        }))
        .map_err(|_| "redb panicked opening the file".to_string())?;
        *db = Some(opened.map_err(|e| e.to_string())?);
        tracing::debug!("reopened the outbox file after an error");
        Ok(())
    }

    fn write_loop(&self) {
        let mut retry = RETRY_MIN;
        let mut last_commit = Instant::now() - COMMIT_GAP;
        loop {
            let batch: Vec<Staged> = {
                let mut st = self.lock();
                loop {
                    while st.staged.is_empty() && !st.closing {
                        st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
                    }
                    if st.staged.is_empty() {
                        return;
                    }
                    // A commit costs about one fsync of CPU on a virtual disk: gather what
                    // arrives within COMMIT_GAP of the last one, unless someone waits.
                    let since = last_commit.elapsed();
                    if st.closing
                        || st.flush_wanted
                        || st.staged.len() >= GROUP_MAX
                        || since >= COMMIT_GAP
                    {
                        break;
                    }
                    st = self
                        .changed
                        .wait_timeout(st, COMMIT_GAP - since)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                st.flush_wanted = false;
                last_commit = Instant::now();
                st.writing_bytes = std::mem::take(&mut st.staged_bytes);
                st.writing_len = st.staged.len();
                st.staged.drain(..).collect()
            };
            let failing = self.lock().failure.is_some();
            let error = match self.commit(&batch) {
                Ok(()) => {
                    if let Some(last) = batch.last() {
                        tracing::debug!(
                            through = last.seq,
                            results = batch.len(),
                            "outbox committed"
                        );
                    }
                    retry = RETRY_MIN;
                    self.notify.notify_one();
                    self.changed.notify_all();
                    if failing {
                        tracing::info!("the outbox writes to its file again");
                        self.report(
                            Status::Ok,
                            format!("the outbox writes to {} again", self.path.display()),
                        );
                    }
                    continue;
                }
                Err(e) => e,
            };
            let mut st = self.lock();
            (st.writing_len, st.writing_bytes) = (0, 0);
            // (Less what the gateway acked meanwhile: sent from memory, it has them.)
            let acked = st.acked;
            for item in batch.into_iter().rev().filter(|i| i.seq > acked) {
                st.staged_bytes += item.size();
                st.staged.push_front(item);
            }
            if st.staged.is_empty() && st.settled < st.issued {
                st.settled = st.issued;
            }
            self.bound_staged(&mut st, 0);
            if st.failure.as_deref() != Some(error.as_str()) {
                tracing::error!(error = %error, staged = st.staged.len(), "cannot commit results to the outbox; keeping them in memory and retrying");
            }
            let first = st.failure.is_none();
            let report = format!(
                "cannot write the outbox {} ({error}): results are kept in memory (up to outbox_max_mb) and sent to the gateway meanwhile, but an agent restarted now loses those not yet acked",
                self.path.display()
            );
            st.failure = Some(error);
            self.changed.notify_all();
            if first && !st.closing {
                drop(st);
                // What waits in memory may be sent now (`next_to_send`).
                self.notify.notify_one();
                self.report(Status::Critical, report);
                st = self.lock();
            }
            if st.closing {
                tracing::error!(
                    lost = st.staged.len(),
                    "stopping with results the outbox could not commit"
                );
                return;
            }
            drop(
                self.changed
                    .wait_timeout(st, retry)
                    .unwrap_or_else(|p| p.into_inner()),
            );
            if let Err(e) = self.reopen() {
                tracing::debug!(error = %e, "cannot reopen the outbox file yet");
            }
            retry = (retry * 2).min(RETRY_MAX);
        }
    }

    /// Drop the oldest staged results until `incoming` more bytes fit, keeping at least
    /// one: the bound holds even while the disk refuses every commit.
    fn bound_staged(&self, st: &mut State, incoming: u64) {
        while st.staged_bytes + incoming > self.max_bytes
            && st.staged.len() > usize::from(incoming == 0)
        {
            let Some(old) = st.staged.pop_front() else {
                break;
            };
            st.staged_bytes -= old.size();
            // Already acked (sent from memory while the disk refused): not a loss. Sent
            // and not yet acked: lost only if the ack never comes, as for rows the bound
            // drops in flight.
            if old.seq <= st.acked {
                continue;
            } else if old.seq <= st.sending_through {
                st.dropped_in_flight.insert(old.seq);
            } else {
                st.dropped += 1;
            }
        }
    }

    /// One durable transaction: the longest run of the newest results (committed rows,
    /// then `batch`) that fits the bound, and at least the newest result.
    fn commit(&self, batch: &[Staged]) -> Result<(), String> {
        let _w = lock(&self.write_lock);
        let (held, dropped_before, sending_through) = {
            let st = self.lock();
            (st.bytes, st.dropped, st.sending_through)
        };
        let Some(last) = batch.last() else {
            return Ok(());
        };
        #[cfg(test)]
        if self.fail_commits.load(std::sync::atomic::Ordering::SeqCst) {
            return Err("commits fail in this test".into());
        }
        let mut incoming: u64 = batch.iter().map(Staged::size).sum();
        let db = self.db();
        let db = db.as_ref().ok_or(NOT_OPEN)?;
        let txn = db.begin_write().map_err(|e| e.to_string())?;
        let (mut popped, mut freed, mut skipped) = (0usize, 0u64, 0usize);
        let mut popped_in_flight = Vec::new();
        {
            let mut table = txn.open_table(RESULTS).map_err(|e| e.to_string())?;
            while held - freed + incoming > self.max_bytes {
                match table.pop_first().map_err(|e| e.to_string())? {
                    Some((k, v)) => {
                        freed += v.value().len() as u64 + ROW_OVERHEAD;
                        popped += 1;
                        if k.value() <= sending_through {
                            popped_in_flight.push(k.value());
                        }
                    }
                    None => break,
                }
            }
            while incoming > self.max_bytes && skipped + 1 < batch.len() {
                incoming -= batch[skipped].size();
                skipped += 1;
            }
            for item in &batch[skipped..] {
                table
                    .insert(item.seq, item.json.as_slice())
                    .map_err(|e| e.to_string())?;
            }
            let mut meta = txn.open_table(META).map_err(|e| e.to_string())?;
            let lost = (popped - popped_in_flight.len() + skipped) as u64;
            // The count as it is now (`session_ended` may have added to it since the
            // snapshot), plus this commit's.
            let dropped_now = self.lock().dropped.max(dropped_before);
            meta.insert(DROPPED, dropped_now.saturating_add(lost))
                .map_err(|e| e.to_string())?;
            meta.insert(LAST_SEQ, last.seq).map_err(|e| e.to_string())?;
        }
        txn.commit().map_err(|e| e.to_string())?;
        let lost = (popped - popped_in_flight.len() + skipped) as u64;
        if lost > 0 {
            tracing::warn!(
                dropped = lost,
                max_bytes = self.max_bytes,
                "outbox full; dropped the oldest results"
            );
        }
        let mut st = self.lock();
        let acked = st.acked;
        st.dropped_in_flight
            .extend(popped_in_flight.into_iter().filter(|k| *k > acked));
        st.len = st.len - popped + (batch.len() - skipped);
        st.bytes = held - freed + incoming;
        st.dropped = st.dropped.saturating_add(lost);
        st.settled = last.seq;
        (st.writing_len, st.writing_bytes) = (0, 0);
        st.commits += 1;
        st.failure = None;
        Ok(())
    }

    fn try_pending_after(&self, after: u64, max: usize) -> Result<Vec<CheckResult>, redb::Error> {
        let db = self.db();
        let txn = db.as_ref().ok_or(redb::Error::PreviousIo)?.begin_read()?;
        let table = match txn.open_table(RESULTS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for row in table.range::<u64>((Bound::Excluded(after), Bound::Unbounded))? {
            if out.len() >= max {
                break;
            }
            let (k, v) = row?;
            match decode(k.value(), v.value()) {
                Ok(r) => out.push(r),
                Err(why) => {
                    tracing::error!(seq = k.value(), error = %why, "outbox row does not decode; skipping it")
                }
            }
        }
        Ok(out)
    }

    fn try_ack(&self, seq: u64) -> Result<(), redb::Error> {
        let _w = lock(&self.write_lock);
        {
            // Rows dropped while in flight that this ack covers reached the gateway
            // (recorded first: the ack holds even if deleting the rows fails).
            let mut st = self.lock();
            st.acked = st.acked.max(seq);
            st.dropped_in_flight.retain(|k| *k > seq);
            // Results sent from memory while the disk refused: the gateway has them, so
            // they need no place on disk any more.
            while let Some(item) = st.staged.front().filter(|i| i.seq <= seq) {
                st.staged_bytes -= item.size();
                st.staged.pop_front();
            }
            if st.staged.is_empty() && st.writing_len == 0 && st.settled < st.issued {
                st.settled = st.issued;
                self.changed.notify_all();
            }
        }
        let db = self.db();
        let mut txn = db.as_ref().ok_or(redb::Error::PreviousIo)?.begin_write()?;
        // An ack need not wait for the disk: if a crash undoes it, the results are sent
        // again and the bus drops them as duplicates. The next append's commit makes it
        // durable anyway.
        txn.set_durability(redb::Durability::None)?;
        let (mut removed, mut freed) = (0usize, 0u64);
        {
            let mut table = txn.open_table(RESULTS)?;
            table.retain_in::<u64, _>(..=seq, |_, v| {
                removed += 1;
                freed += v.len() as u64 + ROW_OVERHEAD;
                false
            })?;
        }
        if removed == 0 {
            txn.abort()?;
            return Ok(());
        }
        txn.commit()?;
        let mut st = self.lock();
        st.len = st.len.saturating_sub(removed);
        st.bytes = st.bytes.saturating_sub(freed);
        Ok(())
    }
}

impl Outbox for DiskOutbox {
    fn append(&self, result: CheckResult) -> std::io::Result<u64> {
        self.shared.append(result)
    }

    fn pending_after(&self, after: u64, max: usize) -> Vec<CheckResult> {
        self.shared
            .try_pending_after(after, max)
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, "cannot read the outbox");
                Vec::new()
            })
    }

    fn ack(&self, seq: u64) {
        if let Err(e) = self.shared.try_ack(seq) {
            tracing::error!(error = %e, seq, "cannot delete acked results from the outbox");
        }
    }

    fn len(&self) -> usize {
        let st = self.shared.lock();
        st.len + st.writing_len + st.staged.len()
    }

    fn dropped(&self) -> u64 {
        self.shared.lock().dropped
    }

    fn next_to_send(&self, after: u64, max: usize) -> Vec<CheckResult> {
        // Under the write lock, so no commit is between its choice of what to drop and
        // its count: a row read here is either gone already or counted as in flight.
        let shared = &self.shared;
        let _w = lock(&shared.write_lock);
        let (mut batch, read_all) = match shared.try_pending_after(after, max) {
            Ok(b) => {
                let all = b.len() < max;
                (b, all)
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read the outbox");
                (Vec::new(), false)
            }
        };
        let mut st = shared.lock();
        // While the disk refuses commits, what waits in memory goes too, after every
        // committed row (all read, and no batch between them being written: the bus keeps
        // only numbers above the highest it holds, so none may be skipped; a file that
        // cannot be read now sends nothing).
        if st.failure.is_some() && st.writing_len == 0 && read_all {
            let from = batch.last().map_or(after, |r| r.seq.max(after));
            for item in st.staged.iter().filter(|i| i.seq > from) {
                if batch.len() >= max {
                    break;
                }
                match decode(item.seq, &item.json) {
                    Ok(r) => batch.push(r),
                    Err(why) => {
                        // (Never skip one: what follows would be acked past it.)
                        tracing::error!(seq = item.seq, error = %why, "a staged result does not decode");
                        break;
                    }
                }
            }
        }
        if let Some(last) = batch.last() {
            st.sending_through = st.sending_through.max(last.seq);
        }
        drop(st);
        batch
    }

    fn session_ended(&self, bus_holds_through: u64) {
        // Under the write lock, as `commit` counts: a commit in progress finishes first.
        let _w = lock(&self.shared.write_lock);
        let mut st = self.shared.lock();
        let mut lost_seqs = std::mem::take(&mut st.dropped_in_flight);
        // What the bus holds reached it, acked or not.
        lost_seqs.retain(|k| *k > bus_holds_through);
        if !lost_seqs.is_empty() {
            tracing::warn!(
                first = lost_seqs.first(),
                last = lost_seqs.last(),
                count = lost_seqs.len(),
                "results the full outbox dropped while they were in flight never reached the gateway"
            );
        }
        st.dropped = st.dropped.saturating_add(lost_seqs.len() as u64);
        st.sending_through = 0;
    }

    fn not_sent_after(&self, last_sent: u64) {
        let _w = lock(&self.shared.write_lock);
        let mut st = self.shared.lock();
        if st.sending_through > last_sent {
            st.sending_through = last_sent;
            // Dropped after they were read but before they could be sent: lost.
            let unsent = st.dropped_in_flight.split_off(&(last_sent + 1));
            st.dropped = st.dropped.saturating_add(unsent.len() as u64);
        }
    }

    fn notify(&self) -> &Notify {
        &self.shared.notify
    }

    fn raise_seq_floor(&self, floor: u64) -> std::io::Result<()> {
        self.shared.lock().seq.raise(floor)
    }

    fn flush(&self) -> std::io::Result<()> {
        let shared = &self.shared;
        let mut st = shared.lock();
        let target = st.issued;
        while st.settled < target {
            if let Some(why) = &st.failure {
                return Err(io_err(format!("results are not yet on disk: {why}")));
            }
            if !st.flush_wanted {
                st.flush_wanted = true;
                shared.changed.notify_all();
            }
            st = shared.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        Ok(())
    }
}

/// Mode 0600 where modes apply.
fn make_private(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        match std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_protocol::Status;
    use rand::{rngs::StdRng, Rng, SeedableRng};
    use std::collections::BTreeMap;
    use std::sync::atomic::Ordering;

    fn r(check: &str, output_len: usize) -> CheckResult {
        CheckResult::new(check, Status::Ok, "x".repeat(output_len))
    }

    /// What a result costs once numbered, as the outbox counts it.
    fn size_of(result: &CheckResult, seq: u64) -> u64 {
        let mut numbered = result.clone();
        numbered.seq = seq;
        serde_json::to_vec(&numbered).unwrap().len() as u64 + ROW_OVERHEAD
    }

    /// Append and wait until it is on disk.
    fn put(o: &DiskOutbox, result: CheckResult) -> u64 {
        let seq = o.append(result).unwrap();
        o.flush().unwrap();
        seq
    }

    fn open(dir: &Path, max_bytes: u64) -> DiskOutbox {
        let (o, moved) = DiskOutbox::open(dir, max_bytes).unwrap();
        assert_eq!(moved, None);
        o
    }

    fn all(o: &DiskOutbox) -> Vec<CheckResult> {
        o.pending_after(0, usize::MAX)
    }

    /// Copy the state directory as a `kill -9` would leave it: every committed write is in
    /// the file (the page cache survives the process), the handle never closes.
    fn snapshot(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for name in [FILE_NAME, "seq"] {
            let src = from.join(name);
            if src.exists() {
                std::fs::copy(&src, to.join(name)).unwrap();
            }
        }
    }

    /// The model: what the outbox should hold, in a map.
    #[derive(Default)]
    struct Model {
        rows: BTreeMap<u64, (String, u64)>,
        bytes: u64,
        dropped: u64,
        /// Rows acked since the last durable commit: acks do not wait for the disk, so a
        /// crash may bring them back (to be sent again and dropped by the bus).
        undo: BTreeMap<u64, (String, u64)>,
    }

    impl Model {
        fn append(&mut self, seq: u64, check: String, size: u64, max_bytes: u64) {
            while self.bytes + size > max_bytes {
                let Some((_, (_, s))) = self.rows.pop_first() else {
                    break;
                };
                self.bytes -= s;
                self.dropped += 1;
            }
            self.rows.insert(seq, (check, size));
            self.bytes += size;
            self.undo.clear();
        }

        fn ack(&mut self, seq: u64) {
            let keep = self.rows.split_off(&seq.saturating_add(1));
            for (k, (c, s)) in std::mem::replace(&mut self.rows, keep) {
                self.bytes -= s;
                self.undo.insert(k, (c, s));
            }
        }

        /// After a reopen: the outbox holds either the rows, or the rows and those acked
        /// since the last durable commit; nothing else.
        fn settle(&mut self, o: &DiskOutbox) {
            let got: Vec<u64> = all(o).iter().map(|r| r.seq).collect();
            let mut with_undo = self.rows.clone();
            with_undo.extend(std::mem::take(&mut self.undo));
            if got == with_undo.keys().copied().collect::<Vec<_>>() && got.len() > self.rows.len() {
                self.bytes = with_undo.values().map(|(_, s)| s).sum();
                self.rows = with_undo;
            }
        }

        fn check(&self, o: &DiskOutbox, after: u64, max: usize) {
            let got: Vec<(u64, String)> = o
                .pending_after(after, max)
                .into_iter()
                .map(|r| (r.seq, r.check))
                .collect();
            let want: Vec<(u64, String)> = self
                .rows
                .range((Bound::Excluded(after), Bound::Unbounded))
                .take(max)
                .map(|(k, (c, _))| (*k, c.clone()))
                .collect();
            assert_eq!(got, want, "pending_after({after}, {max})");
            assert_eq!(o.len(), self.rows.len(), "len");
            assert_eq!(o.bytes(), self.bytes, "bytes");
            assert_eq!(o.dropped(), self.dropped, "dropped");
            assert!(o.bytes() <= o.max_bytes() || o.len() == 1);
        }
    }

    #[test]
    fn outbox_matches_a_model_through_appends_acks_crashes_and_reopens() {
        let started = std::time::Instant::now();
        let root = tempfile::tempdir().unwrap();
        let mut rng = StdRng::seed_from_u64(0x0b0c_5eed);
        let (mut appends, mut crashes, mut reopens, mut drops) = (0, 0, 0, 0u64);
        for case in 0..120 {
            let max_bytes = rng.gen_range(400..4000);
            let mut dir = root.path().join(format!("case{case}"));
            let mut o = open(&dir, max_bytes);
            let mut model = Model::default();
            let mut last_seq = 0u64;
            let mut generation = 0;
            for _ in 0..rng.gen_range(5..40) {
                match rng.gen_range(0..100) {
                    0..=54 => {
                        let check = format!("c{}", rng.gen_range(0..1000));
                        let res = r(&check, rng.gen_range(0..300));
                        let seq = put(&o, res.clone());
                        assert!(seq > last_seq, "{seq} after {last_seq}");
                        last_seq = seq;
                        model.append(seq, check, size_of(&res, seq), max_bytes);
                        appends += 1;
                    }
                    55..=69 => {
                        let lo = model.rows.keys().next().copied().unwrap_or(last_seq);
                        let seq = rng.gen_range(lo.saturating_sub(2)..=last_seq + 2);
                        o.ack(seq);
                        model.ack(seq);
                    }
                    70..=79 => {
                        // kill -9: no close, no flush; carry on from what is on disk.
                        generation += 1;
                        let next = root.path().join(format!("case{case}-crash{generation}"));
                        snapshot(&dir, &next);
                        drop(o);
                        dir = next;
                        o = open(&dir, max_bytes);
                        model.settle(&o);
                        crashes += 1;
                    }
                    80..=89 => {
                        drop(o);
                        o = open(&dir, max_bytes);
                        model.settle(&o);
                        reopens += 1;
                    }
                    90..=93 => {
                        let floor = last_seq + rng.gen_range(0..10_000);
                        o.raise_seq_floor(floor).unwrap();
                        last_seq = floor;
                    }
                    _ => {}
                }
                let after = match rng.gen_range(0..3) {
                    0 => 0,
                    _ => rng.gen_range(0..=last_seq + 1),
                };
                model.check(&o, after, rng.gen_range(1..20));
            }
            model.check(&o, 0, usize::MAX);
            drops += model.dropped;
        }
        assert!(appends > 1000 && crashes > 100 && reopens > 100 && drops > 50);
        eprintln!(
            "{appends} appends, {crashes} crashes, {reopens} reopens, {drops} dropped in {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn truncated_or_bit_flipped_files_give_a_prefix_or_are_moved_aside() {
        let root = tempfile::tempdir().unwrap();
        let orig = root.path().join("orig");
        let o = open(&orig, 1 << 20);
        for i in 0..40 {
            put(&o, r(&format!("c{i}"), i * 37 % 500));
        }
        let originals = all(&o);
        let highest = originals.last().unwrap().seq;
        drop(o);
        let file = std::fs::read(orig.join(FILE_NAME)).unwrap();
        let seq_file = std::fs::read(orig.join("seq")).unwrap();
        let n = file.len();

        let mut rng = StdRng::seed_from_u64(0xbad_f11e);
        let mut damaged: Vec<(String, Vec<u8>)> = Vec::new();
        for len in [
            1,
            100,
            511,
            4096,
            n / 4,
            n / 2,
            n * 3 / 4,
            n - 4096,
            n - 1,
            rng.gen_range(1..n),
            rng.gen_range(1..n),
        ] {
            damaged.push((format!("truncated to {len}"), file[..len].to_vec()));
        }
        for trial in 0..60 {
            let mut f = file.clone();
            let flips = rng.gen_range(1..=4);
            // A third of the trials aim at the header and the first pages.
            let span = if trial % 3 == 0 { n.min(8192) } else { n };
            let mut at = Vec::new();
            for _ in 0..flips {
                let bit = rng.gen_range(0..span * 8);
                f[bit / 8] ^= 1 << (bit % 8);
                at.push(bit);
            }
            damaged.push((format!("bits {at:?} flipped"), f));
        }

        let (mut prefixes, mut whole, mut aside) = (0, 0, 0);
        for (i, (what, bytes)) in damaged.into_iter().enumerate() {
            let dir = root.path().join(format!("t{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(FILE_NAME), &bytes).unwrap();
            std::fs::write(dir.join("seq"), &seq_file).unwrap();
            let (o, moved) = DiskOutbox::open(&dir, 1 << 20)
                .unwrap_or_else(|e| panic!("{what}: open failed instead of moving aside: {e}"));
            let got = all(&o);
            assert_eq!(got.len(), o.len(), "{what}");
            match moved {
                Some(reason) => {
                    aside += 1;
                    assert!(reason.contains("moved to"), "{what}: {reason}");
                    assert!(got.is_empty(), "{what}: a fresh outbox holds nothing");
                    let kept: Vec<_> = std::fs::read_dir(&dir)
                        .unwrap()
                        .filter_map(|e| e.ok())
                        .filter(|e| e.file_name().to_string_lossy().contains(".corrupt-"))
                        .collect();
                    assert_eq!(kept.len(), 1, "{what}: the old file is kept aside");
                    assert_eq!(std::fs::read(kept[0].path()).unwrap(), bytes, "{what}");
                }
                None => {
                    assert_eq!(got[..], originals[..got.len()], "{what}: not a prefix");
                    if got.len() == originals.len() {
                        whole += 1;
                    } else {
                        prefixes += 1;
                    }
                }
            }
            // Whatever happened, numbering carries on above everything handed out.
            assert!(put(&o, r("after", 3)) > highest, "{what}");
            drop(o);
            let (again, moved) = DiskOutbox::open(&dir, 1 << 20).unwrap();
            assert_eq!(moved, None, "{what}: the fresh file reopens cleanly");
            assert_eq!(all(&again).len(), got.len() + 1, "{what}");
        }
        eprintln!("{whole} whole, {prefixes} shorter prefixes, {aside} moved aside");
        assert!(aside >= 5, "truncation must be detected");
    }

    #[test]
    fn bounded_in_bytes_drops_oldest_and_the_count_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let one = size_of(&r("c", 200), 1);
        let max = one * 3 + one / 2;
        let o = open(dir.path(), max);
        let seqs: Vec<u64> = (0..10).map(|_| put(&o, r("c", 200))).collect();
        assert_eq!(o.len(), 3);
        assert_eq!(o.dropped(), 7);
        assert!(o.bytes() <= max);
        let pending: Vec<u64> = all(&o).iter().map(|r| r.seq).collect();
        assert_eq!(pending, seqs[7..]);
        drop(o);

        let o = open(dir.path(), max);
        assert_eq!((o.len(), o.dropped()), (3, 7));
        assert!(o.bytes() <= max && o.bytes() >= 3 * one - 3);
        // One result bigger than the whole bound is kept, alone.
        let big = put(&o, r("big", 2000));
        assert_eq!((o.len(), o.dropped()), (1, 10));
        assert_eq!(all(&o)[0].seq, big);
        o.ack(big);
        assert_eq!((o.len(), o.bytes(), o.dropped()), (0, 0, 10));
        drop(o);
        let o = open(dir.path(), max);
        assert_eq!((o.len(), o.bytes(), o.dropped()), (0, 0, 10));
        assert!(put(&o, r("c", 1)) > big);
    }

    #[test]
    fn rows_that_do_not_decode_are_dropped_and_counted_not_unwrapped() {
        let dir = tempfile::tempdir().unwrap();
        let o = open(dir.path(), 1 << 20);
        let a = put(&o, r("a", 1));
        let b = put(&o, r("b", 1));
        drop(o);
        {
            // Damage written by redb itself, so the checksums hold: only our decoding can
            // catch it.
            let db = Database::create(dir.path().join(FILE_NAME)).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut t = txn.open_table(RESULTS).unwrap();
                t.insert(b + 1, &b"{not json"[..]).unwrap();
                let moved = serde_json::to_vec(&r("moved", 1)).unwrap(); // seq 0 != key
                t.insert(b + 2, moved.as_slice()).unwrap();
            }
            txn.commit().unwrap();
        }
        let o = open(dir.path(), 1 << 20);
        assert_eq!(o.len(), 2);
        assert_eq!(o.dropped(), 2);
        let seqs: Vec<u64> = all(&o).iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [a, b]);
        assert!(put(&o, r("c", 1)) > b + 2);
    }

    #[test]
    fn a_held_file_is_an_error_and_is_not_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let o = open(dir.path(), 1 << 20);
        put(&o, r("a", 1));
        assert!(DiskOutbox::open(dir.path(), 1 << 20).is_err());
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!names.iter().any(|n| n.contains("corrupt")), "{names:?}");
        assert_eq!(o.len(), 1);
    }

    const CHILD_DIR: &str = "OUTPOST_OUTBOX_TEST_CHILD_DIR";

    /// Run by `an_append_that_returned_survives_kill_9` in a child process, which it kills.
    #[test]
    #[ignore = "a helper run by an_append_that_returned_survives_kill_9"]
    fn child_appends_until_killed() {
        let Some(dir) = std::env::var_os(CHILD_DIR) else {
            return;
        };
        use std::io::Write;
        let o = open(Path::new(&dir), 1 << 24);
        let mut out = std::io::stdout().lock();
        for i in 0.. {
            let seq = put(&o, r(&format!("c{i}"), 50));
            writeln!(out, "appended {seq}").unwrap();
            out.flush().unwrap();
        }
    }

    #[test]
    fn an_append_that_returned_survives_kill_9() {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "outbox::disk::tests::child_appends_until_killed",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DIR, dir.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let mut acknowledged = Vec::new();
        while acknowledged.len() < 200 {
            let line = lines.next().expect("the child stopped early").unwrap();
            if let Some(seq) = line.strip_prefix("appended ") {
                acknowledged.push(seq.parse::<u64>().unwrap());
            }
        }
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();
        // Lines printed between our last read and the kill are also durable; read them too.
        for line in lines.map_while(Result::ok) {
            if let Some(seq) = line.strip_prefix("appended ") {
                acknowledged.push(seq.parse::<u64>().unwrap());
            }
        }
        let o = open(dir.path(), 1 << 24);
        let stored: std::collections::BTreeSet<u64> = all(&o).iter().map(|r| r.seq).collect();
        for seq in &acknowledged {
            assert!(
                stored.contains(seq),
                "result {seq} was appended but is gone"
            );
        }
        let highest = *stored.iter().next_back().unwrap();
        assert!(put(&o, r("after", 1)) > highest);
    }

    #[test]
    fn append_that_returned_survives_a_leaked_handle() {
        // The in-process variant of a crash: the handle is never dropped; a copy of the
        // directory taken now is what a kill -9 would leave.
        let dir = tempfile::tempdir().unwrap();
        let o = open(&dir.path().join("a"), 1 << 20);
        let seq = put(&o, r("kept", 1));
        snapshot(&dir.path().join("a"), &dir.path().join("b"));
        std::mem::forget(o);
        let o = open(&dir.path().join("b"), 1 << 20);
        assert_eq!(all(&o).iter().map(|r| r.seq).collect::<Vec<_>>(), [seq]);
    }

    #[test]
    fn concurrent_appends_share_commits_and_keep_their_order() {
        let dir = tempfile::tempdir().unwrap();
        let o = Arc::new(open(dir.path(), 64 << 20));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let o = o.clone();
                std::thread::spawn(move || {
                    (0..500)
                        .map(|i| o.append(r(&format!("t{t}-{i}"), 40)).unwrap())
                        .collect::<Vec<u64>>()
                })
            })
            .collect();
        let mut handed_out: Vec<u64> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        o.flush().unwrap();
        handed_out.sort_unstable();
        let stored: Vec<u64> = all(&o).iter().map(|r| r.seq).collect();
        assert_eq!(stored, handed_out, "every append stored once, in order");
        assert_eq!(o.len(), 4000);
        let commits = o.commits();
        assert!(commits < 4000, "{commits} commits for 4000 appends");
        eprintln!("4000 appends from 8 threads in {commits} commits");
    }

    #[test]
    fn dropping_the_outbox_commits_what_is_staged() {
        let dir = tempfile::tempdir().unwrap();
        let o = open(dir.path(), 1 << 20);
        let seqs: Vec<u64> = (0..50).map(|_| o.append(r("c", 10)).unwrap()).collect();
        drop(o);
        let o = open(dir.path(), 1 << 20);
        assert_eq!(all(&o).iter().map(|r| r.seq).collect::<Vec<_>>(), seqs);
    }

    /// Poll `f` for up to 10 s.
    fn within(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(std::time::Instant::now() < deadline, "never: {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn is_report(r: &CheckResult, status: Status) -> bool {
        r.check == crate::outbox::OUTBOX_CHECK && r.status == status
    }

    #[test]
    fn failing_commits_keep_results_in_memory_under_the_bound_and_retry() {
        let dir = tempfile::tempdir().unwrap();
        let one = size_of(&r("c", 100), 1);
        let o = open(dir.path(), one * 10);
        let before = put(&o, r("c", 100));
        o.shared.fail_commits.store(true, Ordering::SeqCst);
        let staged: Vec<u64> = (0..4).map(|_| o.append(r("c", 100)).unwrap()).collect();
        let err = o.flush().unwrap_err().to_string();
        assert!(err.contains("not yet on disk"), "{err}");
        // The outbox says so with a result of its own, kept like the others.
        within("the outbox's report is queued", || o.len() == 6);
        assert_eq!(
            all(&o).iter().map(|r| r.seq).collect::<Vec<_>>(),
            [before],
            "only committed results are read as kept"
        );
        // Far more than the bound while the disk refuses: the oldest staged go first.
        let last: Vec<u64> = (0..30).map(|_| o.append(r("c", 100)).unwrap()).collect();
        // The writer may hold a batch it is retrying; the bound applies when it is back.
        within("the bound drops the oldest", || o.dropped() >= 20);
        assert!(o.bytes() <= one * 21, "{} bytes held", o.bytes());
        o.shared.fail_commits.store(false, Ordering::SeqCst);
        // The writer retries on its own; flush waits for it.
        within("the writer retried", || o.flush().is_ok());
        let stored = all(&o);
        let checks: Vec<u64> = stored
            .iter()
            .filter(|r| r.check == "c")
            .map(|r| r.seq)
            .collect();
        assert_eq!(checks.last(), last.last());
        assert!(checks.len() <= 10 && checks.len() >= 7, "{checks:?}");
        assert!(!checks.contains(&staged[0]));
        // And says when it writes again (its failure report was older than the bound).
        assert!(
            stored.iter().any(|r| is_report(r, Status::Ok)),
            "{stored:?}"
        );
        let dropped = o.dropped();
        // 35 results and two reports: each kept or counted.
        assert_eq!(dropped as usize + stored.len(), 37);
        drop(o);
        let o = open(dir.path(), one * 10);
        assert_eq!(o.dropped(), dropped, "the count survives a reopen");
    }

    /// While the disk refuses, what waits in memory is sent after the committed rows, in
    /// order with nothing skipped; an ack takes it out of memory; one the bound drops
    /// while in flight counts as lost only if its ack never comes.
    #[test]
    fn results_the_disk_refuses_are_sent_from_memory_and_their_ack_frees_them() {
        let dir = tempfile::tempdir().unwrap();
        let one = size_of(&r("c", 100), 1);
        let o = open(dir.path(), one * 8);
        let committed = put(&o, r("c", 100));
        // Before any failure, nothing staged is sent (a commit is moments away).
        o.shared.fail_commits.store(true, Ordering::SeqCst);
        let staged: Vec<u64> = (0..3).map(|_| o.append(r("c", 100)).unwrap()).collect();
        within("the report is queued", || o.len() == 5);
        // (Not while the writer holds them for a retry: polled.)
        let want: Vec<u64> = (committed..committed + 5).collect();
        let seqs = |b: &[CheckResult]| b.iter().map(|r| r.seq).collect::<Vec<_>>();
        let mut sent = Vec::new();
        within("everything is sent", || {
            sent = o.next_to_send(0, 100);
            seqs(&sent) == want
        });
        let checks: Vec<u64> = sent
            .iter()
            .filter(|r| r.check == "c")
            .map(|r| r.seq)
            .collect();
        assert_eq!(checks, [&[committed][..], &staged].concat());
        assert_eq!(
            sent.iter()
                .filter(|r| is_report(r, Status::Critical))
                .count(),
            1,
            "{sent:?}"
        );
        let output = &sent.iter().find(|r| r.check != "c").unwrap().output;
        assert!(output.contains("commits fail in this test"), "{output}");
        // Only what follows `after` is sent, and at most `max`.
        within("the two after the first staged one", || {
            seqs(&o.next_to_send(staged[0], 2)) == [staged[1], staged[2]]
        });
        // The gateway acks two staged results: they leave memory.
        o.ack(staged[1]);
        assert_eq!(o.len(), 2, "the third staged result and the report remain");
        // The rest is pushed out of memory by the bound while in flight, then the session
        // ends: the result whose ack came is not lost; the one whose ack never came is.
        let newer: Vec<u64> = (0..8).map(|_| o.append(r("c", 100)).unwrap()).collect();
        within("the bound drops the in-flight ones", || {
            let st = o.shared.lock();
            !st.staged.iter().any(|i| i.seq <= staged[2] + 1)
        });
        let report = staged[2] + 1;
        assert_eq!(
            o.shared.lock().dropped_in_flight,
            [staged[2], report].into(),
            "in flight: not counted yet"
        );
        // (Newer ones the bound dropped, never sent: counted at once.)
        let before = o.dropped();
        o.ack(staged[2]);
        o.session_ended(staged[2]);
        assert_eq!(
            o.dropped(),
            before + 1,
            "the report, sent and never acked, is lost"
        );
        // The disk is back: the newest results are written down, nothing acked is.
        o.shared.fail_commits.store(false, Ordering::SeqCst);
        within("the writer retried", || o.flush().is_ok());
        let kept: Vec<u64> = all(&o)
            .iter()
            .filter(|r| r.check == "c")
            .map(|r| r.seq)
            .collect();
        assert_eq!(kept.last(), newer.last());
        assert!(kept.iter().all(|s| *s > staged[2]), "{kept:?}");
    }
}
