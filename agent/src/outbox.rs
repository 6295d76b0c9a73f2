//! Where results wait until the gateway acks them.
//!
//! [`Outbox`] is the seam: [`MemoryOutbox`] (bounded in results; the oldest go first when
//! full, counted) keeps results across reconnects but not across restarts; [`DiskOutbox`]
//! (a redb file, bounded in bytes, appends committed in groups by a writer thread) keeps
//! them across restarts and crashes; the agent runs it. Sequence numbers come
//! from [`SeqFile`], which does survive restarts, because the bus drops anything at or
//! below the highest sequence it has seen from an agent.

use outpost_sys::lock;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use outpost_protocol::CheckResult;
use tokio::sync::Notify;

use crate::util::write_atomic;

mod disk;
pub use disk::{DiskOutbox, FILE_NAME};

/// The check under which the agent reports a problem with its own outbox.
pub const OUTBOX_CHECK: &str = "outpost.outbox";

/// Run `f`, which may wait for the disk, without stalling the other tasks of a
/// multi-threaded runtime (they move to another worker meanwhile).
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

pub trait Outbox: Send + Sync {
    /// Number `result`, keep it, and return its sequence number. Never waits for the
    /// disk: see [`Outbox::flush`].
    fn append(&self, result: CheckResult) -> std::io::Result<u64>;
    /// Up to `max` results with `seq > after`, oldest first; only results that would
    /// survive a crash.
    fn pending_after(&self, after: u64, max: usize) -> Vec<CheckResult>;
    /// Forget every result with `seq <= seq`: the gateway made them durable.
    fn ack(&self, seq: u64);
    /// Results waiting for an ack.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Results dropped because the outbox was full.
    fn dropped(&self) -> u64;
    /// The next results to send on the session: [`Outbox::pending_after`], and from now
    /// on until [`Outbox::session_ended`] they count as in flight. A result the bound
    /// drops while it is in flight is counted as dropped only if its ack never comes (it
    /// usually reaches the gateway anyway), so the drop count is what was really lost.
    fn next_to_send(&self, after: u64, max: usize) -> Vec<CheckResult> {
        self.pending_after(after, max)
    }
    /// A new session starts (the last one ended): what was dropped in flight, not acked
    /// and not among what the bus holds (`welcome.last_seq`) is lost, and counted.
    fn session_ended(&self, _bus_holds_through: u64) {}
    /// Of what [`Outbox::next_to_send`] gave, only results up to `last_sent` are sent
    /// (the rest did not fit one frame): the others are no longer in flight.
    fn not_sent_after(&self, _last_sent: u64) {}
    /// Woken after every append.
    fn notify(&self) -> &Notify;
    /// Make every sequence number handed out from now on greater than `floor`.
    fn raise_seq_floor(&self, floor: u64) -> std::io::Result<()>;
    /// Wait until every result appended so far would survive a crash; an error says why
    /// not (they are still kept, in memory, and retried).
    fn flush(&self) -> std::io::Result<()>;
}

/// Sequence numbers that only go up, across restarts: the file holds a ceiling reserved
/// ahead of use, so a crash skips numbers but never repeats one.
pub struct SeqFile {
    path: PathBuf,
    next: u64,
    ceiling: u64,
}

const SEQ_BLOCK: u64 = 4096;

impl SeqFile {
    pub fn open(path: &Path) -> std::io::Result<SeqFile> {
        let ceiling = match std::fs::read_to_string(path) {
            Ok(s) => s.trim().parse::<u64>().map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{} does not hold a sequence number; delete it only if the gateway has never seen this agent", path.display()),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        Ok(SeqFile {
            path: path.to_path_buf(),
            next: ceiling.saturating_add(1),
            ceiling,
        })
    }

    /// Make the next number greater than `floor`.
    pub fn raise(&mut self, floor: u64) -> std::io::Result<()> {
        if self.next <= floor {
            self.next = floor.saturating_add(1);
            self.reserve()?;
        }
        Ok(())
    }

    /// Keep `next` under the ceiling on disk. The ceiling is moved up half a block before
    /// it is reached, so a write the disk refuses (full) is retried at every number while
    /// the rest of the block goes on being handed out: only a disk that refuses for half
    /// a block of results stops the numbering.
    fn reserve(&mut self) -> std::io::Result<()> {
        if self.next.saturating_add(SEQ_BLOCK / 2) > self.ceiling {
            if self.next >= u64::MAX - SEQ_BLOCK {
                return Err(std::io::Error::other(
                    "result sequence numbers are exhausted; the agent needs a new identity",
                ));
            }
            let ceiling = self.next + SEQ_BLOCK;
            match write_atomic(&self.path, format!("{ceiling}\n").as_bytes(), 0o600) {
                Ok(()) => self.ceiling = ceiling,
                Err(e) if self.next > self.ceiling => return Err(e),
                Err(e) => tracing::debug!(error = %e, "cannot move the sequence ceiling up yet"),
            }
        }
        Ok(())
    }

    pub fn allocate(&mut self) -> std::io::Result<u64> {
        self.reserve()?;
        let n = self.next;
        self.next += 1;
        Ok(n)
    }
}

pub struct MemoryOutbox {
    inner: Mutex<Inner>,
    max: usize,
    notify: Notify,
}

struct Inner {
    seq: SeqFile,
    queue: VecDeque<CheckResult>,
    dropped: u64,
}

impl MemoryOutbox {
    pub fn open(state_dir: &Path, max: usize) -> std::io::Result<MemoryOutbox> {
        std::fs::create_dir_all(state_dir)?;
        Ok(MemoryOutbox {
            inner: Mutex::new(Inner {
                seq: SeqFile::open(&state_dir.join("seq"))?,
                queue: VecDeque::new(),
                dropped: 0,
            }),
            max: max.max(1),
            notify: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        lock(&self.inner)
    }
}

impl Outbox for MemoryOutbox {
    fn append(&self, mut result: CheckResult) -> std::io::Result<u64> {
        let seq = {
            let mut inner = self.lock();
            result.seq = inner.seq.allocate()?;
            if inner.queue.len() >= self.max {
                inner.queue.pop_front();
                inner.dropped += 1;
            }
            inner.queue.push_back(result);
            inner.queue.back().map(|r| r.seq).unwrap_or(0)
        };
        self.notify.notify_one();
        Ok(seq)
    }

    fn pending_after(&self, after: u64, max: usize) -> Vec<CheckResult> {
        let inner = self.lock();
        let start = inner.queue.partition_point(|r| r.seq <= after);
        inner.queue.iter().skip(start).take(max).cloned().collect()
    }

    fn ack(&self, seq: u64) {
        let mut inner = self.lock();
        while inner.queue.front().is_some_and(|r| r.seq <= seq) {
            inner.queue.pop_front();
        }
    }

    fn len(&self) -> usize {
        self.lock().queue.len()
    }

    fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    fn notify(&self) -> &Notify {
        &self.notify
    }

    fn raise_seq_floor(&self, floor: u64) -> std::io::Result<()> {
        self.lock().seq.raise(floor)
    }

    /// Nothing in memory survives a crash; there is nothing to wait for.
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_protocol::Status;

    fn r(check: &str) -> CheckResult {
        CheckResult::new(check, Status::Ok, "")
    }

    /// A disk that refuses to write the sequence file (full) does not stop the numbering
    /// at once: the ceiling was moved up half a block before it was reached.
    #[test]
    fn numbering_goes_on_for_half_a_block_when_the_sequence_file_cannot_be_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seq");
        let mut seq = SeqFile::open(&path).unwrap();
        let mut last = 0;
        for _ in 0..SEQ_BLOCK / 2 + 100 {
            last = seq.allocate().unwrap();
        }
        // From now on every write of the file fails (its place is a non-empty directory).
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir_all(path.join("x")).unwrap();
        // (The first ceiling was 1 + a block; at number 2 + half a block it moved up by
        // a block from there.)
        let ceiling = SEQ_BLOCK / 2 + 2 + SEQ_BLOCK;
        while last < ceiling {
            let n = seq
                .allocate()
                .unwrap_or_else(|e| panic!("number {}: {e}", last + 1));
            assert_eq!(n, last + 1);
            last = n;
        }
        assert!(seq.allocate().is_err(), "no number past what is reserved");
    }

    #[test]
    fn sequence_numbers_increase_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let a = MemoryOutbox::open(dir.path(), 10).unwrap();
        let s1 = a.append(r("x")).unwrap();
        let s2 = a.append(r("x")).unwrap();
        assert!(s2 > s1);
        drop(a);
        let b = MemoryOutbox::open(dir.path(), 10).unwrap();
        assert!(b.append(r("x")).unwrap() > s2);
    }

    #[test]
    fn bounded_drops_oldest_and_acks_are_cumulative() {
        let dir = tempfile::tempdir().unwrap();
        let o = MemoryOutbox::open(dir.path(), 3).unwrap();
        let seqs: Vec<u64> = (0..5).map(|_| o.append(r("x")).unwrap()).collect();
        assert_eq!(o.len(), 3);
        assert_eq!(o.dropped(), 2);
        let pending: Vec<u64> = o.pending_after(0, 10).iter().map(|r| r.seq).collect();
        assert_eq!(pending, seqs[2..]);
        assert_eq!(o.pending_after(seqs[3], 10).len(), 1);
        o.ack(seqs[3]);
        assert_eq!(o.len(), 1);
        assert_eq!(o.pending_after(0, 10)[0].seq, seqs[4]);
    }

    #[test]
    fn the_floor_from_the_gateway_lifts_numbering_and_persists() {
        let dir = tempfile::tempdir().unwrap();
        let o = MemoryOutbox::open(dir.path(), 10).unwrap();
        assert_eq!(o.append(r("x")).unwrap(), 1);
        o.raise_seq_floor(50_000).unwrap();
        assert_eq!(o.append(r("x")).unwrap(), 50_001);
        o.raise_seq_floor(10).unwrap();
        assert_eq!(
            o.append(r("x")).unwrap(),
            50_002,
            "a lower floor changes nothing"
        );
        drop(o);
        let o = MemoryOutbox::open(dir.path(), 10).unwrap();
        assert!(o.append(r("x")).unwrap() > 50_002);
        std::fs::write(dir.path().join("seq"), format!("{}\n", u64::MAX - 1)).unwrap();
        let o = MemoryOutbox::open(dir.path(), 10).unwrap();
        assert!(o
            .append(r("x"))
            .unwrap_err()
            .to_string()
            .contains("exhausted"));
    }

    #[test]
    fn corrupt_seq_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("seq"), "garbage").unwrap();
        let err = MemoryOutbox::open(dir.path(), 3).err().unwrap();
        assert!(err.to_string().contains("does not hold a sequence number"));
    }
}
