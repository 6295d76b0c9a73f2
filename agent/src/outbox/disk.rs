//! The outbox on disk, in a redb file (the design brief says why not sled).
//!
//! One table maps the sequence number to the result as JSON; a second keeps the count of
//! results dropped because the outbox was full and the highest sequence number ever
//! stored. Every append is a durable commit before it returns, so a result survives a
//! `kill -9` the moment `append` returns; an ack deletes everything up to the acked number
//! in one transaction. The outbox is bounded in bytes (the JSON plus 8 bytes of key per
//! result): an append that would go over the bound first deletes the oldest results, in
//! the same transaction, and adds them to the dropped counter.
//!
//! The file is checked in full on open. A file redb refuses (bad checksums, truncated,
//! an unknown format) is renamed to `outbox.redb.corrupt-<unix-ms>` and a fresh outbox is
//! started; [`DiskOutbox::open`] returns why, so the caller can report it as an error
//! result. A row whose JSON does not decode is deleted on open and counted as dropped;
//! nothing read from the file is unwrapped.

use std::ops::Bound;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use outpost_protocol::CheckResult;
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
/// Compact on open when the file is this much bigger than the bound plus slack.
const COMPACT_SLACK: u64 = 4 * 1024 * 1024;

pub struct DiskOutbox {
    db: Database,
    state: Mutex<State>,
    max_bytes: u64,
    path: PathBuf,
    notify: Notify,
}

struct State {
    seq: SeqFile,
    len: usize,
    bytes: u64,
    dropped: u64,
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
        // Never hand out a number at or below one already stored, even if the sequence
        // file was lost or restored from an old backup.
        seq.raise(loaded.last_seq)?;
        Ok((
            DiskOutbox {
                db: loaded.db,
                state: Mutex::new(State {
                    seq,
                    len: loaded.len,
                    bytes: loaded.bytes,
                    dropped: loaded.dropped,
                }),
                max_bytes,
                path,
                notify: Notify::new(),
            },
            moved_aside,
        ))
    }

    /// Bytes held (the JSON of every result plus 8 per result).
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn try_pending_after(&self, after: u64, max: usize) -> Result<Vec<CheckResult>, redb::Error> {
        let txn = self.db.begin_read()?;
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
        let mut st = self.lock();
        let txn = self.db.begin_write()?;
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
        st.len = st.len.saturating_sub(removed);
        st.bytes = st.bytes.saturating_sub(freed);
        Ok(())
    }

    fn try_append(&self, result: &mut CheckResult) -> std::io::Result<u64> {
        let mut st = self.lock();
        let seq = st.seq.allocate()?;
        result.seq = seq;
        let value = serde_json::to_vec(&*result).map_err(io_err)?;
        let size = value.len() as u64 + ROW_OVERHEAD;
        let txn = self.db.begin_write().map_err(io_err)?;
        let (mut dropped, mut freed) = (0u64, 0u64);
        {
            let mut table = txn.open_table(RESULTS).map_err(io_err)?;
            // The oldest go first; a result bigger than the whole bound is kept alone.
            while st.bytes.saturating_sub(freed).saturating_add(size) > self.max_bytes {
                match table.pop_first().map_err(io_err)? {
                    Some((_, v)) => {
                        freed += v.value().len() as u64 + ROW_OVERHEAD;
                        dropped += 1;
                    }
                    None => break,
                }
            }
            table.insert(seq, value.as_slice()).map_err(io_err)?;
            let mut meta = txn.open_table(META).map_err(io_err)?;
            if dropped > 0 {
                meta.insert(DROPPED, st.dropped.saturating_add(dropped))
                    .map_err(io_err)?;
            }
            meta.insert(LAST_SEQ, seq).map_err(io_err)?;
        }
        txn.commit().map_err(io_err)?;
        if dropped > 0 {
            tracing::warn!(
                dropped,
                max_bytes = self.max_bytes,
                "outbox full; dropped the oldest results"
            );
        }
        st.len = (st.len + 1).saturating_sub(dropped as usize);
        st.bytes = st.bytes.saturating_sub(freed).saturating_add(size);
        st.dropped = st.dropped.saturating_add(dropped);
        Ok(seq)
    }
}

impl Outbox for DiskOutbox {
    fn append(&self, mut result: CheckResult) -> std::io::Result<u64> {
        let seq = self.try_append(&mut result)?;
        self.notify.notify_one();
        Ok(seq)
    }

    fn pending_after(&self, after: u64, max: usize) -> Vec<CheckResult> {
        self.try_pending_after(after, max).unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot read the outbox");
            Vec::new()
        })
    }

    fn ack(&self, seq: u64) {
        if let Err(e) = self.try_ack(seq) {
            tracing::error!(error = %e, seq, "cannot delete acked results from the outbox");
        }
    }

    fn len(&self) -> usize {
        self.lock().len
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_protocol::Status;
    use rand::{rngs::StdRng, Rng, SeedableRng};
    use std::collections::BTreeMap;

    fn r(check: &str, output_len: usize) -> CheckResult {
        CheckResult::new(check, Status::Ok, "x".repeat(output_len))
    }

    /// What a result costs once numbered, as the outbox counts it.
    fn size_of(result: &CheckResult, seq: u64) -> u64 {
        let mut numbered = result.clone();
        numbered.seq = seq;
        serde_json::to_vec(&numbered).unwrap().len() as u64 + ROW_OVERHEAD
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
        }

        fn ack(&mut self, seq: u64) {
            let keep = self.rows.split_off(&seq.saturating_add(1));
            for (_, (_, s)) in std::mem::replace(&mut self.rows, keep) {
                self.bytes -= s;
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
                        let seq = o.append(res.clone()).unwrap();
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
                        crashes += 1;
                    }
                    80..=89 => {
                        drop(o);
                        o = open(&dir, max_bytes);
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
            o.append(r(&format!("c{i}"), i * 37 % 500)).unwrap();
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
            assert!(o.append(r("after", 3)).unwrap() > highest, "{what}");
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
        let seqs: Vec<u64> = (0..10).map(|_| o.append(r("c", 200)).unwrap()).collect();
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
        let big = o.append(r("big", 2000)).unwrap();
        assert_eq!((o.len(), o.dropped()), (1, 10));
        assert_eq!(all(&o)[0].seq, big);
        o.ack(big);
        assert_eq!((o.len(), o.bytes(), o.dropped()), (0, 0, 10));
        drop(o);
        let o = open(dir.path(), max);
        assert_eq!((o.len(), o.bytes(), o.dropped()), (0, 0, 10));
        assert!(o.append(r("c", 1)).unwrap() > big);
    }

    #[test]
    fn rows_that_do_not_decode_are_dropped_and_counted_not_unwrapped() {
        let dir = tempfile::tempdir().unwrap();
        let o = open(dir.path(), 1 << 20);
        let a = o.append(r("a", 1)).unwrap();
        let b = o.append(r("b", 1)).unwrap();
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
        assert!(o.append(r("c", 1)).unwrap() > b + 2);
    }

    #[test]
    fn a_held_file_is_an_error_and_is_not_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let o = open(dir.path(), 1 << 20);
        o.append(r("a", 1)).unwrap();
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
            let seq = o.append(r(&format!("c{i}"), 50)).unwrap();
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
        assert!(o.append(r("after", 1)).unwrap() > highest);
    }

    #[test]
    fn append_that_returned_survives_a_leaked_handle() {
        // The in-process variant of a crash: the handle is never dropped; a copy of the
        // directory taken now is what a kill -9 would leave.
        let dir = tempfile::tempdir().unwrap();
        let o = open(&dir.path().join("a"), 1 << 20);
        let seq = o.append(r("kept", 1)).unwrap();
        snapshot(&dir.path().join("a"), &dir.path().join("b"));
        std::mem::forget(o);
        let o = open(&dir.path().join("b"), 1 << 20);
        assert_eq!(all(&o).iter().map(|r| r.seq).collect::<Vec<_>>(), [seq]);
    }

    /// `cargo test --release -p outpost-agent append_rate -- --ignored --nocapture`
    #[test]
    #[ignore = "a measurement, not a test"]
    fn append_rate() {
        let dir = tempfile::tempdir().unwrap();
        let o = open(dir.path(), 64 << 20);
        let n = 2000;
        let started = std::time::Instant::now();
        for i in 0..n {
            o.append(r(&format!("check-{i}"), 120)).unwrap();
        }
        let appended = started.elapsed();
        let started = std::time::Instant::now();
        let mut acked = 0;
        while acked < n {
            let batch = o.pending_after(0, 100);
            acked += batch.len();
            o.ack(batch.last().unwrap().seq);
        }
        eprintln!(
            "{n} durable appends in {appended:?} ({:.0}/s); read and acked in batches of 100 in {:?}",
            n as f64 / appended.as_secs_f64(),
            started.elapsed()
        );
    }
}
