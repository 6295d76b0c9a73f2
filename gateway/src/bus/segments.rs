//! An append-only log of JSON lines, kept as numbered segments in one directory so that
//! retention can drop the oldest whole, as a JetStream stream does with `max_age` and
//! `max_bytes`.
//!
//! `NAME.jsonl` is the segment being written; `NAME-<n>.jsonl` are sealed ones, oldest with
//! the smallest `n`. Sealing is a rename. Opening the log seals what the last run left
//! in `NAME.jsonl` (after cutting a torn last line), so every run starts a fresh segment
//! and a segment's age is known from when it was opened.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// How much a log keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Sealed segments whose last line is older than this are deleted.
    pub max_age: Duration,
    /// Total bytes kept; the oldest sealed segments go first beyond it (0: no cap). The
    /// segment being written is never deleted, so the log can exceed this by one segment.
    pub max_bytes: u64,
}

impl Retention {
    /// A segment is sealed at this size: an eighth of the cap, between 64 KiB and 64 MiB.
    pub fn segment_bytes(&self) -> u64 {
        const MIB: u64 = 1 << 20;
        match self.max_bytes {
            0 => 64 * MIB,
            cap => (cap / 8).clamp(64 * 1024, 64 * MIB),
        }
    }

    /// A non-empty segment is sealed at this age, so old lines become deletable: an eighth
    /// of `max_age`, at most an hour.
    pub fn segment_age(&self) -> Duration {
        (self.max_age / 8).clamp(Duration::from_secs(1), Duration::from_secs(3600))
    }
}

struct Sealed {
    n: u64,
    /// Bytes cut off its front by a lowered limit (`cut_oldest_lines`): positions in it
    /// stay those of the segment as written.
    base: u64,
    len: u64,
    /// When its last line was written.
    written: SystemTime,
}

pub struct Log {
    dir: PathBuf,
    name: &'static str,
    retention: Retention,
    active: File,
    active_len: u64,
    active_opened: Instant,
    /// The number the segment being written gets when it is sealed: numbers only grow,
    /// also across restarts with every segment deleted (`NAME.next` keeps the floor).
    active_n: u64,
    /// A seal renamed the segment but could not yet make the new one (see `finish_seal`).
    unfinished_seal: bool,
    /// Oldest first.
    sealed: VecDeque<Sealed>,
}

/// What opening a log found.
pub struct Opened {
    pub log: Log,
    /// Bytes of a torn last line (a crash mid-append) that were cut off.
    pub torn_bytes_dropped: u64,
}

fn active_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.jsonl"))
}

fn sealed_path(dir: &Path, name: &str, n: u64, base: u64) -> PathBuf {
    match base {
        0 => dir.join(format!("{name}-{n:06}.jsonl")),
        base => dir.join(format!("{name}-{n:06}@{base}.jsonl")),
    }
}

/// The number of the segment being written, kept beside it (written before anything is
/// appended to a new segment): readers learn from it which segment `NAME.jsonl` is, and
/// numbering goes on from it after a restart with every segment deleted, so a position is
/// never reused.
fn next_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.next"))
}

fn write_next(dir: &Path, name: &str, n: u64) -> std::io::Result<()> {
    crate::util::write_atomic(&next_path(dir, name), format!("{n}\n").as_bytes(), 0o600)
}

/// The end of the last segment retention deleted (`<segment> <offset>`).
fn gone_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.gone"))
}

fn read_gone(dir: &Path, name: &str) -> std::io::Result<Option<Position>> {
    match std::fs::read_to_string(gone_path(dir, name)) {
        Ok(text) => {
            let mut parts = text.split_whitespace().map(|p| p.parse::<u64>().ok());
            Ok(match (parts.next().flatten(), parts.next().flatten()) {
                (Some(segment), Some(offset)) => Some(Position { segment, offset }),
                _ => None,
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn read_next(dir: &Path, name: &str) -> std::io::Result<Option<u64>> {
    match std::fs::read_to_string(next_path(dir, name)) {
        Ok(text) => Ok(text.trim().parse::<u64>().ok()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// A place in a log: a segment's number and a byte offset in it, as the segment was
/// written (bytes a lowered limit cut off its front still count). Positions only grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position {
    pub segment: u64,
    pub offset: u64,
}

impl Position {
    /// Before everything the log holds.
    pub const START: Position = Position {
        segment: 0,
        offset: 0,
    };

    /// As one number: the segment in the high 32 bits, the offset in the low 32 (a
    /// segment holds at most a few hundred MiB, far below 4 GiB). `None` when it does not
    /// fit.
    pub fn to_u64(self) -> Option<u64> {
        (self.segment <= u32::MAX as u64 && self.offset <= u32::MAX as u64)
            .then_some((self.segment << 32) | self.offset)
    }

    pub fn from_u64(v: u64) -> Position {
        Position {
            segment: v >> 32,
            offset: v & u32::MAX as u64,
        }
    }
}

/// What [`read_lines`] found.
#[derive(Debug, Default)]
pub struct Lines {
    /// Whole lines (without their newline), each with the position just after it.
    pub lines: Vec<(Position, Vec<u8>)>,
    /// Where to read on from.
    pub next: Position,
    /// The position asked for is no longer kept (retention deleted it): reading went on
    /// from the oldest line kept.
    pub lost: bool,
    /// With `lost`: the position reading went on from.
    pub resumed: Option<Position>,
}

/// Whole lines of the log `name` in `dir` from `from` on, about `max_bytes` of them at
/// most (at least one line when there is one), and none past `durable` (the writer's
/// [`Log::durable_end`]: bytes written but not yet on disk are not handed out). Safe while
/// the log is written, sealed, cut and deleted from: a segment is found by its number
/// whatever it is called by then. `lost` is only ever said of `from` itself: a gap found
/// after some lines ends the read there, and the next read, from the gap, says it.
pub fn read_lines(
    dir: &Path,
    name: &str,
    from: Position,
    max_bytes: usize,
    durable: Option<Position>,
) -> std::io::Result<Lines> {
    let mut out = Lines {
        next: from,
        ..Lines::default()
    };
    let mut budget = max_bytes.max(1);
    // Each round reads one segment; a seal between listing and reading makes a round
    // read nothing and the next find the segment under its sealed name.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        // The number first, then the list: a segment sealed in between is then listed
        // (a list older than the number could miss the segment just sealed).
        let Some(active_n) = read_next(dir, name)? else {
            return Ok(out);
        };
        let sealed = match list_sealed(dir, name) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        // The oldest kept line (of a segment listed twice mid-cut, the cut one).
        let oldest = match sealed.first() {
            Some(first) => {
                let f = sealed.iter().rfind(|f| f.n == first.n).expect("listed");
                Position {
                    segment: f.n,
                    offset: f.base,
                }
            }
            None => Position {
                segment: active_n,
                offset: 0,
            },
        };
        let pos = out.next;
        if pos == Position::START {
            out.next = oldest;
            continue;
        }
        if let Some(f) = sealed.iter().rev().find(|f| f.n == pos.segment) {
            if pos.offset < f.base {
                // Its oldest lines were cut.
                if !out.lines.is_empty() {
                    return Ok(out);
                }
                out.lost = from != Position::START;
                out.next.offset = f.base;
                out.resumed = out.lost.then_some(out.next);
            }
            let file = match File::open(&f.path) {
                Ok(file) => file,
                // Cut or deleted meanwhile: look again.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let at_end = read_segment_lines(file, f.base, u64::MAX, true, &mut out, &mut budget)?;
            if !at_end {
                return Ok(out);
            }
            // A sealed segment read to its end: on to the next.
            out.next = Position {
                segment: f.n + 1,
                offset: 0,
            };
            continue;
        }
        if pos.segment > active_n {
            if sealed.last().is_some_and(|f| f.n + 1 >= pos.segment) {
                // The segment after the newest sealed one, whose number is not written
                // yet (a seal in progress, or one whose new segment could not be made):
                // nothing to read there yet.
                return Ok(out);
            }
            // Beyond the log: a position of a log since deleted and made again (its
            // numbers start over). What it pointed at is gone.
            if !out.lines.is_empty() {
                return Ok(out);
            }
            out.lost = true;
            out.next = oldest;
            out.resumed = Some(oldest);
            continue;
        }
        if pos.segment == active_n {
            let file = match File::open(active_path(dir, name)) {
                Ok(file) => file,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
                Err(e) => return Err(e),
            };
            // Was the file opened segment `active_n`? A seal may have renamed it and made
            // a new one since: after reading, it was if the number is unchanged (nothing is
            // appended to a new segment before its number is written) or if the sealed
            // segment is the very file read. Otherwise what was read is dropped.
            let inode = std::os::unix::fs::MetadataExt::ino(&file.metadata()?);
            let (lines_before, next_before, budget_before) = (out.lines.len(), out.next, budget);
            // Nothing known durable of this segment (a new log, a seal not yet followed
            // by a write): nothing of it is read.
            let limit = match durable {
                Some(d) if d.segment == active_n => d.offset,
                Some(_) => 0,
                None => u64::MAX,
            };
            read_segment_lines(file, 0, limit, false, &mut out, &mut budget)?;
            let same = read_next(dir, name)? == Some(active_n)
                || std::fs::metadata(sealed_path(dir, name, active_n, 0))
                    .is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == inode);
            if !same {
                out.lines.truncate(lines_before);
                out.next = next_before;
                budget = budget_before;
                continue;
            }
            return Ok(out);
        }
        // Deleted by retention (segments are never sealed empty): on from the oldest
        // kept. Nothing was missed if the position was the end of the segment deleted
        // last, or the start of the oldest kept.
        if !out.lines.is_empty() {
            return Ok(out);
        }
        let at_an_end = read_gone(dir, name)?.is_some_and(|end| {
            end == pos
                && oldest
                    == Position {
                        segment: end.segment + 1,
                        offset: 0,
                    }
        });
        out.lost = from != Position::START && !at_an_end;
        out.next = oldest;
        out.resumed = out.lost.then_some(oldest);
    }
    Err(std::io::Error::other(
        "the log kept changing while it was read",
    ))
}

/// Read whole lines of one segment from `out.next.offset` (a file whose first `base` bytes
/// were cut off), up to offset `limit`, within `budget`; returns whether the segment's end
/// was reached. In a sealed segment a last line without its newline (a write whose roll
/// back failed) is its end; in the one being written it is a line still being written.
fn read_segment_lines(
    file: File,
    base: u64,
    limit: u64,
    sealed: bool,
    out: &mut Lines,
    budget: &mut usize,
) -> std::io::Result<bool> {
    if out.next.offset >= limit {
        return Ok(false);
    }
    let mut reader = std::io::BufReader::new(file);
    reader.seek(SeekFrom::Start(out.next.offset - base))?;
    let mut reader = reader.take(limit.saturating_sub(out.next.offset));
    let mut line = Vec::new();
    loop {
        if *budget == 0 {
            return Ok(false);
        }
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 || line.last() != Some(&b'\n') {
            // The end, or a line not whole: read next time, whole.
            return Ok(sealed || (n == 0 && limit == u64::MAX));
        }
        out.next.offset += n as u64;
        line.pop();
        *budget = budget.saturating_sub(n);
        out.lines.push((out.next, std::mem::take(&mut line)));
    }
}

/// A sealed segment's file: its number, the bytes cut off its front, its path.
struct SealedFile {
    n: u64,
    base: u64,
    path: PathBuf,
}

/// The sealed segments of `name` in `dir`, oldest first, by number (a segment whose cut a
/// crash interrupted may be listed twice, with two bases: the larger is the one kept).
fn list_sealed(dir: &Path, name: &str) -> std::io::Result<Vec<SealedFile>> {
    let prefix = format!("{name}-");
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let file_name = entry.file_name();
        let parsed = file_name
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .and_then(|f| f.strip_suffix(".jsonl"))
            .and_then(|f| match f.split_once('@') {
                Some((n, base)) => Some((n.parse::<u64>().ok()?, base.parse::<u64>().ok()?)),
                None => Some((f.parse::<u64>().ok()?, 0)),
            });
        if let Some((n, base)) = parsed {
            found.push(SealedFile {
                n,
                base,
                path: entry.path(),
            });
        }
    }
    found.sort_by_key(|f| (f.n, f.base));
    Ok(found)
}

/// A file kept beside sealed segment `n` (an index of it: see `bus::history`): deleted
/// with the segment.
pub fn sidecar_path(dir: &Path, name: &str, n: u64) -> PathBuf {
    dir.join(format!("{name}-{n:06}.idx"))
}

/// The segments of a log as they are now, by number: each sealed one with the bytes cut
/// off its front, oldest first, and the one being written (`None`: no log here).
#[derive(Debug, Default)]
pub struct Listing {
    pub sealed: Vec<(u64, u64)>,
    pub active: Option<u64>,
}

/// What [`Listing`] says of the log `name` in `dir` (nothing for a log never made).
pub fn list(dir: &Path, name: &str) -> std::io::Result<Listing> {
    // The number first, then the list, as `read_lines` does.
    let active = read_next(dir, name)?;
    let sealed = match list_sealed(dir, name) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Listing::default()),
        Err(e) => return Err(e),
    };
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(sealed.len());
    for f in sealed {
        // A segment listed twice mid-cut: the cut one (listed last) is kept.
        if out.last().is_some_and(|(n, _)| *n == f.n) {
            out.pop();
        }
        out.push((f.n, f.base));
    }
    Ok(Listing {
        sealed: out,
        active,
    })
}

/// When sealed segment `n` (with `base` bytes cut) was last written (`None`: it is gone).
pub fn last_written(
    dir: &Path,
    name: &str,
    n: u64,
    base: u64,
) -> std::io::Result<Option<SystemTime>> {
    match std::fs::metadata(sealed_path(dir, name, n, base)) {
        Ok(m) => Ok(Some(m.modified()?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// One segment opened for reading lines at positions.
pub struct Segment {
    file: File,
    /// Bytes cut off its front: positions below are gone.
    pub base: u64,
    /// Sealed: every line in it is whole and final.
    pub sealed: bool,
}

/// Open segment `n` of the log `name` in `dir`, whatever it is called by now (`None`: it
/// was deleted). The file opened is segment `n` for sure: one seal may rename the
/// segment being written and make a new one under its name at any time.
pub fn open_segment(dir: &Path, name: &str, n: u64) -> std::io::Result<Option<Segment>> {
    for _ in 0..100 {
        let listing = list(dir, name)?;
        if let Some(&(_, base)) = listing.sealed.iter().find(|(s, _)| *s == n) {
            match File::open(sealed_path(dir, name, n, base)) {
                Ok(file) => {
                    return Ok(Some(Segment {
                        file,
                        base,
                        sealed: true,
                    }))
                }
                // Cut or deleted meanwhile: look again.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
        }
        if listing.active != Some(n) {
            return Ok(None);
        }
        let file = match File::open(active_path(dir, name)) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        // Is the file opened segment `n`? A seal renames it first, then makes the new
        // file, then writes the new number: once the sealed `n` exists, the file is `n`
        // only if it is that very file (a new, empty one may be there already while the
        // number still says `n`); before, the name was `n`'s when it was opened.
        let inode = std::os::unix::fs::MetadataExt::ino(&file.metadata()?);
        let same = match std::fs::metadata(sealed_path(dir, name, n, 0)) {
            Ok(m) => std::os::unix::fs::MetadataExt::ino(&m) == inode,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Not sealed under its plain name; cut already (then listed next round)
                // or still being written.
                !list(dir, name)?.sealed.iter().any(|(s, _)| *s == n)
            }
            Err(e) => return Err(e),
        };
        if same {
            return Ok(Some(Segment {
                file,
                base: 0,
                sealed: false,
            }));
        }
    }
    Err(std::io::Error::other(
        "the log kept changing while it was read",
    ))
}

impl Segment {
    /// The whole line that starts at `offset` (a position as the segment was written),
    /// without its newline, into `line`; false when there is none there (cut off, or past
    /// the end, or not whole yet).
    pub fn line_at(&self, offset: u64, line: &mut Vec<u8>) -> std::io::Result<bool> {
        use std::os::unix::fs::FileExt as _;
        line.clear();
        let Some(mut at) = offset.checked_sub(self.base) else {
            return Ok(false);
        };
        let mut chunk = [0u8; 1024];
        loop {
            let n = self.file.read_at(&mut chunk, at)?;
            if n == 0 {
                return Ok(false);
            }
            if let Some(i) = chunk[..n].iter().position(|b| *b == b'\n') {
                line.extend_from_slice(&chunk[..i]);
                return Ok(true);
            }
            line.extend_from_slice(&chunk[..n]);
            at += n as u64;
        }
    }

    /// Every whole line from the start, each with the position it starts at.
    pub fn for_each_line(&self, mut f: impl FnMut(u64, &[u8])) -> std::io::Result<()> {
        let mut reader = std::io::BufReader::new(&self.file);
        reader.seek(SeekFrom::Start(0))?;
        let mut at = self.base;
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = reader.read_until(b'\n', &mut line)?;
            if n == 0 || line.last() != Some(&b'\n') {
                return Ok(());
            }
            f(at, &line[..n - 1]);
            at += n as u64;
        }
    }
}

/// Every segment of the log `name` in `dir`, oldest first, the one being written last.
/// For readers of the files (tests, tools); a missing log gives an empty list.
pub fn paths(dir: &Path, name: &str) -> std::io::Result<Vec<PathBuf>> {
    let mut paths = match list_sealed(dir, name) {
        Ok(sealed) => sealed.into_iter().map(|f| f.path).collect::<Vec<_>>(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let active = active_path(dir, name);
    if active.exists() {
        paths.push(active);
    }
    Ok(paths)
}

/// The whole log `name` in `dir` as text, oldest line first, as it was at one moment
/// while the bus may be writing: read again when a segment was sealed or deleted
/// meanwhile (a seal between listing and reading would otherwise skip the new segment).
pub fn read_all(dir: &Path, name: &str) -> std::io::Result<String> {
    let mut listed = paths(dir, name)?;
    loop {
        let mut text = String::new();
        for path in &listed {
            match File::open(path) {
                Ok(mut f) => f.read_to_string(&mut text)?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
        }
        let now = paths(dir, name)?;
        if now == listed {
            return Ok(text);
        }
        listed = now;
    }
}

/// Cut `path` back to its last complete line; returns how many bytes were cut.
fn cut_torn_tail(path: &Path) -> std::io::Result<u64> {
    let mut file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    // Walk back from the end in blocks to the last newline.
    let mut end = len;
    let mut block = vec![0u8; 64 * 1024];
    let good = loop {
        if end == 0 {
            break 0;
        }
        let start = end.saturating_sub(block.len() as u64);
        let buf = &mut block[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(buf)?;
        if let Some(i) = buf.iter().rposition(|b| *b == b'\n') {
            break start + i as u64 + 1;
        }
        end = start;
    };
    if good < len {
        file.set_len(good)?;
        file.sync_all()?;
    }
    Ok(len - good)
}

/// Make `dir`'s entries (files made, renamed or deleted in it) durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The bus holds every agent's results: the gateway's user only. An existing directory
/// (from before this rule) is made private too, which covers the files already in it.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

impl Log {
    /// Open (or create) the log `name` in `dir`: cut a torn last line, seal what the last
    /// run wrote, and start a new segment.
    pub fn open(dir: &Path, name: &'static str, retention: Retention) -> std::io::Result<Opened> {
        private_dir(dir)?;
        // A cut a crash interrupted (see `cut_oldest_lines`): the segment itself is whole.
        let cut_prefix = format!("{name}-");
        for entry in std::fs::read_dir(dir)? {
            let file_name = entry?.file_name();
            let f = file_name.to_string_lossy();
            if f.starts_with(&cut_prefix) && f.ends_with(".jsonl.cut") {
                std::fs::remove_file(dir.join(&*f))?;
            }
        }
        let active = active_path(dir, name);
        let torn_bytes_dropped = cut_torn_tail(&active)?;
        let mut sealed: VecDeque<Sealed> = VecDeque::new();
        for f in list_sealed(dir, name)? {
            if sealed.back().is_some_and(|s| s.n == f.n) {
                // The same segment before a cut that a crash interrupted: the cut one
                // (larger base, listed last) is whole.
                let old = sealed.pop_back().expect("checked");
                std::fs::remove_file(sealed_path(dir, name, old.n, old.base))?;
            }
            let meta = std::fs::metadata(&f.path)?;
            sealed.push_back(Sealed {
                n: f.n,
                base: f.base,
                len: meta.len(),
                written: meta.modified()?,
            });
        }
        let floor = match std::fs::read_to_string(next_path(dir, name)) {
            Ok(text) => text.trim().parse::<u64>().unwrap_or(1),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 1,
            Err(e) => return Err(e),
        };
        let mut active_n = sealed.back().map_or(1, |s| s.n + 1).max(floor);
        if let Ok(meta) = std::fs::metadata(&active) {
            if meta.len() > 0 {
                let n = active_n;
                std::fs::rename(&active, sealed_path(dir, name, n, 0))?;
                sealed.push_back(Sealed {
                    n,
                    base: 0,
                    len: meta.len(),
                    written: meta.modified()?,
                });
                active_n += 1;
            }
        }
        // Indexes of segments no longer kept (a crash between deleting the two, or a
        // reader that indexed a segment as retention deleted it).
        let kept: Vec<u64> = sealed.iter().map(|s| s.n).collect();
        let idx_prefix = format!("{name}-");
        for entry in std::fs::read_dir(dir)? {
            let file_name = entry?.file_name();
            let f = file_name.to_string_lossy();
            let n = f
                .strip_prefix(&idx_prefix)
                .and_then(|f| f.strip_suffix(".idx"))
                .and_then(|n| n.parse::<u64>().ok());
            if n.is_some_and(|n| !kept.contains(&n)) {
                std::fs::remove_file(dir.join(&*f))?;
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .mode(0o600)
            .open(&active)?;
        let active_len = file.metadata()?.len();
        // The new file and any rename must survive a crash.
        sync_dir(dir)?;
        write_next(dir, name, active_n)?;
        Ok(Opened {
            log: Log {
                dir: dir.to_path_buf(),
                name,
                retention,
                active: file,
                active_len,
                active_opened: Instant::now(),
                active_n,
                unfinished_seal: false,
                sealed,
            },
            torn_bytes_dropped,
        })
    }

    /// Call `f` with every line of the sealed segments, oldest first (after `open` that is
    /// the whole log). A segment that cannot be read is an error.
    pub fn for_each_sealed_line(&self, mut f: impl FnMut(&[u8])) -> std::io::Result<()> {
        let mut line = Vec::new();
        for s in &self.sealed {
            let path = sealed_path(&self.dir, self.name, s.n, s.base);
            let mut reader = std::io::BufReader::new(File::open(&path)?);
            loop {
                line.clear();
                if reader.read_until(b'\n', &mut line)? == 0 {
                    break;
                }
                f(line.strip_suffix(b"\n").unwrap_or(&line));
            }
        }
        Ok(())
    }

    /// Append `buf` (whole lines) and make it durable; on failure cut the segment back to
    /// where it was, so a half-written line can never be glued to the next write.
    pub fn append(&mut self, buf: &[u8]) -> std::io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        self.finish_seal()?;
        let start = self.active.seek(SeekFrom::End(0))?;
        let written = self
            .active
            .write_all(buf)
            .and_then(|_| self.active.sync_data());
        match &written {
            Ok(()) => self.active_len = start + buf.len() as u64,
            Err(_) => {
                let rolled_back = self
                    .active
                    .set_len(start)
                    .and_then(|_| self.active.sync_data());
                if let Err(e) = rolled_back {
                    tracing::error!(log = self.name, error = %e, "cannot cut a failed bus write back; the next start drops the torn line");
                }
            }
        }
        written
    }

    /// Seal the segment being written once it is big or old enough, then delete the
    /// sealed segments that retention no longer keeps. Returns the bytes deleted.
    pub fn maintain(&mut self, now: SystemTime) -> std::io::Result<u64> {
        self.finish_seal()?;
        let r = self.retention;
        if self.active_len > 0
            && (self.active_len >= r.segment_bytes()
                || self.active_opened.elapsed() >= r.segment_age())
        {
            self.seal(now)?;
        }
        let mut total = self.bytes();
        let mut deleted = 0;
        while let Some(oldest) = self.sealed.front() {
            let too_old = now
                .duration_since(oldest.written)
                .is_ok_and(|age| age > r.max_age);
            let too_big = r.max_bytes > 0 && total > r.max_bytes;
            if !(too_old || too_big) {
                break;
            }
            // A segment written under a larger bound (the limit was lowered since: it is
            // over twice today's segment size), whose deletion would leave less than the
            // bound: cut its oldest lines instead of losing its newest with them. (In
            // steady state segments are about one size, and a whole one goes.)
            let without = total - oldest.len;
            if !too_old && oldest.len > 2 * r.segment_bytes() && without < r.max_bytes {
                deleted += self.cut_oldest_lines(total - r.max_bytes)?;
                break;
            }
            let bytes = self.delete_oldest(if too_old { "max age" } else { "max bytes" })?;
            total -= bytes;
            deleted += bytes;
        }
        if deleted > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(deleted)
    }

    /// When the oldest sealed segment's last line was written (`None`: nothing sealed, so
    /// nothing retention could delete).
    pub fn oldest_sealed(&self) -> Option<SystemTime> {
        self.sealed.front().map(|s| s.written)
    }

    /// Delete the oldest sealed segment (for `reason`, logged); returns its bytes (0 when
    /// nothing is sealed). The caller syncs the directory.
    pub fn delete_oldest(&mut self, reason: &str) -> std::io::Result<u64> {
        let Some(oldest) = self.sealed.front() else {
            return Ok(0);
        };
        // Where it ended, first: a reader whose position is that end missed nothing.
        let end = Position {
            segment: oldest.n,
            offset: oldest.base + oldest.len,
        };
        crate::util::write_atomic(
            &gone_path(&self.dir, self.name),
            format!("{} {}\n", end.segment, end.offset).as_bytes(),
            0o600,
        )?;
        let path = sealed_path(&self.dir, self.name, oldest.n, oldest.base);
        // Its index first: a crash between leaves a segment without one (rebuilt when
        // needed), never an index of nothing.
        for path in [sidecar_path(&self.dir, self.name, oldest.n), path.clone()] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        tracing::info!(file = %path.display(), bytes = oldest.len, reason, "bus retention deleted a segment");
        let bytes = oldest.len;
        self.sealed.pop_front();
        Ok(bytes)
    }

    /// Cut at least `bytes` of whole lines off the front of the oldest sealed segment (a
    /// copy of the rest renamed over it, its time kept); returns the bytes cut.
    fn cut_oldest_lines(&mut self, bytes: u64) -> std::io::Result<u64> {
        let Some(oldest) = self.sealed.front_mut() else {
            return Ok(0);
        };
        let path = sealed_path(&self.dir, self.name, oldest.n, oldest.base);
        let mut reader = std::io::BufReader::new(File::open(&path)?);
        // From the byte before: a cut that falls at a line's start keeps that line.
        let from = match bytes {
            0 => 0,
            b => {
                reader.seek(SeekFrom::Start(b - 1))?;
                let mut rest_of_line = Vec::new();
                b - 1 + reader.read_until(b'\n', &mut rest_of_line)? as u64
            }
        };
        if from == 0 {
            return Ok(0);
        }
        let tmp = path.with_extension("jsonl.cut");
        let mut out = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)?;
        let kept = std::io::copy(&mut reader, &mut out)?;
        out.set_modified(oldest.written)?;
        out.sync_all()?;
        // Under a new name that says how much was cut, so positions in it stay valid;
        // then the old one goes (a crash between leaves both: `open` keeps the cut one).
        let base = oldest.base + from;
        let cut_path = sealed_path(&self.dir, self.name, oldest.n, base);
        std::fs::rename(&tmp, &cut_path)?;
        std::fs::remove_file(&path)?;
        tracing::info!(file = %cut_path.display(), bytes = from, "bus retention cut the oldest lines of a segment (max bytes)");
        let cut = oldest.len - kept;
        oldest.len = kept;
        oldest.base = base;
        Ok(cut)
    }

    /// Make the directory's deletions durable (after [`Log::delete_oldest`]).
    pub fn sync(&self) -> std::io::Result<()> {
        sync_dir(&self.dir)
    }

    /// Keep what `retention` says from now on (applied at the next [`Log::maintain`]).
    pub fn set_retention(&mut self, retention: Retention) {
        self.retention = retention;
    }

    pub fn retention(&self) -> Retention {
        self.retention
    }

    /// When the segment being written was started, if anything is in it.
    pub fn writing_since(&self) -> Option<Instant> {
        (self.active_len > 0).then_some(self.active_opened)
    }

    /// Seal the segment being written (so retention may delete it). An empty one is not
    /// sealed: an empty sealed segment deleted after the one before it would make a reader
    /// at that one's end believe it missed something (found by the model test below).
    pub fn seal(&mut self, now: SystemTime) -> std::io::Result<()> {
        self.finish_seal()?;
        if self.active_len == 0 {
            return Ok(());
        }
        let n = self.active_n;
        let active = active_path(&self.dir, self.name);
        std::fs::rename(&active, sealed_path(&self.dir, self.name, n, 0))?;
        // Sealed from here, whatever fails next: nothing more is written to it, and
        // nothing is appended until the new segment and its number are in place.
        self.sealed.push_back(Sealed {
            n,
            base: 0,
            len: self.active_len,
            written: now,
        });
        self.active_n += 1;
        self.active_len = 0;
        self.active_opened = Instant::now();
        self.unfinished_seal = true;
        self.finish_seal()
    }

    /// After a seal: the new segment's file, made durable, and its number written, before
    /// anything is appended (readers tell by the number which segment the file is).
    fn finish_seal(&mut self) -> std::io::Result<()> {
        if !self.unfinished_seal {
            return Ok(());
        }
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .mode(0o600)
            .open(active_path(&self.dir, self.name))?;
        sync_dir(&self.dir)?;
        write_next(&self.dir, self.name, self.active_n)?;
        self.active = file;
        self.unfinished_seal = false;
        Ok(())
    }

    /// The end of what is durable: the segment being written and its length.
    pub fn durable_end(&self) -> Position {
        Position {
            segment: self.active_n,
            offset: self.active_len,
        }
    }

    /// The log's name (its files' stem).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Bytes on disk: every segment.
    pub fn bytes(&self) -> u64 {
        self.active_len + self.sealed.iter().map(|s| s.len).sum::<u64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::io::Write;
    use std::sync::atomic::Ordering;

    const DAY: Duration = Duration::from_secs(86_400);
    const A_DAY: Retention = Retention {
        max_age: DAY,
        max_bytes: 0,
    };

    fn lines(n: usize, tag: &str) -> Vec<u8> {
        (0..n)
            .flat_map(|i| format!("{{\"tag\":\"{tag}\",\"i\":{i}}}\n").into_bytes())
            .collect()
    }

    fn all_lines(dir: &Path) -> Vec<String> {
        read_all(dir, "t")
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Every line from `from` on, read `budget` bytes at a time as a consumer would,
    /// each read going on from where the last one ended.
    fn read_on(dir: &Path, from: Position, budget: usize) -> (Vec<String>, Position, bool) {
        let (mut pos, mut all, mut lost) = (from, Vec::new(), false);
        loop {
            let got = read_lines(dir, "t", pos, budget, None).unwrap();
            lost |= got.lost;
            if got.lines.is_empty() {
                return (all, got.next, lost);
            }
            for (at, line) in got.lines {
                // (After a loss reading starts over from the oldest kept.)
                assert!(
                    got.lost || at > pos,
                    "positions only grow: {at:?} after {pos:?}"
                );
                pos = at;
                all.push(String::from_utf8(line).unwrap());
            }
            // The end of a sealed segment moves on to the next one's start.
            assert!(got.next >= pos);
            pos = got.next;
        }
    }

    #[test]
    fn positions_resume_exactly_across_segments_seals_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let small = Retention {
            max_bytes: 512 * 1024,
            ..A_DAY
        };
        let mut log = Log::open(dir.path(), "t", small).unwrap().log;
        let mut written = Vec::new();
        for round in 0..30 {
            let buf = lines(500, &format!("r{round}"));
            written.extend(
                String::from_utf8(buf.clone())
                    .unwrap()
                    .lines()
                    .map(str::to_string),
            );
            log.append(&buf).unwrap();
            log.maintain(SystemTime::now()).unwrap();
        }
        assert!(log.sealed.len() > 2, "the test wants several segments");
        // Nothing deleted yet: everything, in order, read in small steps.
        let (all, end, lost) = read_on(dir.path(), Position::START, 3000);
        assert!(!lost);
        assert_eq!(all, written);
        // From a position in the middle: exactly the rest.
        let mid = read_lines(dir.path(), "t", Position::START, 400_000, None).unwrap();
        let (at, _) = *mid.lines.last().unwrap();
        let (rest, _, _) = read_on(dir.path(), at, 5000);
        assert_eq!(rest, written[mid.lines.len()..]);
        // Nothing new: nothing read, the position stays.
        let idle = read_lines(dir.path(), "t", end, 5000, None).unwrap();
        assert!(idle.lines.is_empty() && idle.next == end && !idle.lost);
        // A restart seals the segment being written; reading on from `end` finds what
        // comes after, and nothing twice.
        drop(log);
        let mut log = Log::open(dir.path(), "t", small).unwrap().log;
        log.append(&lines(3, "after")).unwrap();
        let (after, _, lost) = read_on(dir.path(), end, 5000);
        assert!(!lost);
        assert_eq!(after.len(), 3);
        assert!(after.iter().all(|l| l.contains("after")), "{after:?}");
    }

    #[test]
    fn a_position_retention_deleted_says_lost_and_goes_on_from_the_oldest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path(), "t", A_DAY).unwrap().log;
        log.append(&lines(100, "old")).unwrap();
        let first = read_lines(dir.path(), "t", Position::START, 10, None).unwrap();
        let (early, _) = first.lines[0];
        drop(log);
        let mut log = Log::open(dir.path(), "t", A_DAY).unwrap().log;
        log.append(&lines(10, "new")).unwrap();
        // A day later the old segment goes.
        log.maintain(SystemTime::now() + DAY + Duration::from_secs(60))
            .unwrap();
        let (rest, _, lost) = read_on(dir.path(), early, 5000);
        assert!(lost, "the reader is told");
        assert_eq!(rest.len(), 10);
        assert!(rest.iter().all(|l| l.contains("new")), "{rest:?}");
        // Every segment gone and the log reopened with nothing: positions do not start
        // over, so an old one is never taken for a new place.
        drop(log);
        let mut log = Log::open(dir.path(), "t", A_DAY).unwrap().log;
        log.maintain(SystemTime::now() + DAY * 3).unwrap();
        drop(log);
        let mut log = Log::open(dir.path(), "t", A_DAY).unwrap().log;
        log.append(&lines(1, "newest")).unwrap();
        let newest = read_lines(dir.path(), "t", Position::START, 5000, None).unwrap();
        assert!(
            newest.lines[0].0 > early,
            "{:?} not after {early:?}",
            newest.lines[0].0
        );
    }

    #[test]
    fn nothing_past_the_durable_end_is_read_and_an_end_deleted_is_not_a_loss() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path(), "t", A_DAY).unwrap().log;
        log.append(&lines(10, "a")).unwrap();
        let all = read_lines(dir.path(), "t", Position::START, 5000, None).unwrap();
        let fifth = all.lines[4].0;
        // Bytes on the file but not (yet) durable are not handed out.
        let capped = read_lines(dir.path(), "t", Position::START, 5000, Some(fifth)).unwrap();
        assert_eq!(capped.lines.len(), 5);
        assert_eq!(capped.next, fifth);
        assert_eq!(log.durable_end(), all.lines[9].0);
        // A reader that read everything of segment 1 and stopped at its very end...
        let end = all.lines[9].0;
        drop(log);
        let mut log = Log::open(dir.path(), "t", A_DAY).unwrap().log;
        log.append(&lines(3, "b")).unwrap();
        log.maintain(SystemTime::now() + DAY + Duration::from_secs(60))
            .unwrap();
        // ...missed nothing when segment 1 goes; one in the middle of it did.
        let (rest, _, lost) = read_on(dir.path(), end, 5000);
        assert!(!lost, "the end of a deleted segment is no loss");
        assert_eq!(rest.len(), 3);
        let (_, _, lost) = read_on(dir.path(), fifth, 5000);
        assert!(lost);
    }

    #[test]
    fn the_end_of_a_deleted_segment_is_a_loss_when_the_next_was_cut() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path(), "t", A_DAY).unwrap().log;
        log.append(&lines(10, "first")).unwrap();
        log.seal(SystemTime::now()).unwrap();
        let all = read_lines(dir.path(), "t", Position::START, usize::MAX, None).unwrap();
        let end_of_first = all.lines[9].0;
        log.append(&lines(20_000, "second")).unwrap();
        log.seal(SystemTime::now()).unwrap();
        // One pass deletes the first segment and cuts the second's oldest lines.
        log.set_retention(Retention {
            max_bytes: 100 * 1024,
            ..A_DAY
        });
        log.maintain(SystemTime::now()).unwrap();
        let (rest, _, lost) = read_on(dir.path(), end_of_first, 50_000);
        assert!(lost, "the second segment's cut lines were missed");
        assert_eq!(rest.last().unwrap(), r#"{"tag":"second","i":19999}"#);
    }

    #[test]
    fn a_position_beyond_the_log_is_lost_and_reading_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path(), "t", A_DAY).unwrap().log;
        log.append(&lines(4, "new")).unwrap();
        // A position of a log deleted and made again (numbers start over).
        let stale = Position {
            segment: 57,
            offset: 120,
        };
        let (got, _, lost) = read_on(dir.path(), stale, 5000);
        assert!(lost);
        assert_eq!(got.len(), 4);
        assert_eq!(Position::from_u64(stale.to_u64().unwrap()), stale);
        assert!(Position {
            segment: 1 << 33,
            offset: 0
        }
        .to_u64()
        .is_none());
    }

    #[test]
    fn a_cut_keeps_positions_after_it_and_says_lost_for_those_in_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path(), "t", A_DAY).unwrap().log;
        log.append(&lines(20_000, "x")).unwrap();
        let all = read_lines(dir.path(), "t", Position::START, usize::MAX, None).unwrap();
        let early = all.lines[10].0;
        let late = all.lines[19_000].0;
        log.set_retention(Retention {
            max_bytes: 100 * 1024,
            ..A_DAY
        });
        log.maintain(SystemTime::now()).unwrap();
        let (rest, _, lost) = read_on(dir.path(), late, 5000);
        assert!(!lost);
        assert_eq!(rest.len(), 999);
        assert_eq!(rest[0], r#"{"tag":"x","i":19001}"#);
        let (kept, _, lost) = read_on(dir.path(), early, 50_000);
        assert!(lost);
        assert_eq!(kept.last().unwrap(), r#"{"tag":"x","i":19999}"#);
        // The cut segment, reopened, reads the same.
        drop(log);
        let _log = Log::open(dir.path(), "t", A_DAY).unwrap().log;
        let (again, _, lost) = read_on(dir.path(), late, 5000);
        assert!(!lost);
        assert_eq!(again, rest);
    }

    #[test]
    fn a_reader_racing_the_writer_sees_every_line_once_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let mut log = Log::open(dir.path(), "t", A_DAY).unwrap().log;
        let writer = std::thread::spawn(move || {
            for round in 0..300 {
                log.append(&lines(7, &format!("w{round}"))).unwrap();
                if round % 3 == 0 {
                    log.seal(SystemTime::now()).unwrap();
                }
            }
            log
        });
        let (mut pos, mut seen) = (Position::START, Vec::new());
        let deadline = Instant::now() + Duration::from_secs(30);
        while seen.len() < 2100 {
            assert!(Instant::now() < deadline, "{} of 2100 read", seen.len());
            let got = read_lines(&path, "t", pos, 700, None).unwrap();
            assert!(!got.lost);
            seen.extend(
                got.lines
                    .into_iter()
                    .map(|(_, l)| String::from_utf8(l).unwrap()),
            );
            pos = got.next;
        }
        let log = writer.join().unwrap();
        assert!(
            log.sealed.len() >= 99,
            "{} segments sealed",
            log.sealed.len()
        );
        let expected: Vec<String> = (0..300)
            .flat_map(|r| {
                String::from_utf8(lines(7, &format!("w{r}")))
                    .unwrap()
                    .lines()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(seen, expected);
    }

    #[test]
    fn a_reader_never_misses_a_segment_sealed_while_it_reads() {
        // In memory where there is a tmpfs: an fsync costs nothing there, so segments are
        // sealed and refilled while a read is under way, not only between reads.
        let dir = tempfile::tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .unwrap();
        let retention = Retention {
            max_age: 7 * DAY,
            max_bytes: 512 * 1024,
        };
        let mut log = Log::open(dir.path(), "t", retention).unwrap().log;
        let path = dir.path().to_path_buf();
        // The writer goes on until the reader has read often enough (or a minute has
        // passed): on a busy machine a fixed number of lines can be written before the
        // reader gets the processor at all.
        let reads = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let writer = std::thread::spawn({
            let reads = reads.clone();
            move || {
                let deadline = Instant::now() + Duration::from_secs(60);
                let mut i = 0u64;
                // One 100-byte line per append, so seals (every 64 KiB) land at many
                // points of the reads.
                while i < 20_000 || (reads.load(Ordering::SeqCst) < 20 && Instant::now() < deadline)
                {
                    log.append(format!("{i:099}\n").as_bytes()).unwrap();
                    log.maintain(SystemTime::now()).unwrap();
                    i += 1;
                }
                i
            }
        });
        while !writer.is_finished() {
            let text = read_all(&path, "t").unwrap();
            // The line being appended can be read half-written: the complete ones count.
            let numbers: Vec<u64> = text
                .split_inclusive('\n')
                .filter_map(|l| l.strip_suffix('\n'))
                .map(|l| {
                    l.parse()
                        .unwrap_or_else(|e| panic!("a read gave a broken line {l:?}: {e}"))
                })
                .collect();
            let gap = numbers.windows(2).find(|w| w[1] != w[0] + 1);
            assert_eq!(
                gap,
                None,
                "a read of {} lines ({:?}..={:?}) skipped lines",
                numbers.len(),
                numbers.first(),
                numbers.last()
            );
            reads.fetch_add(1, Ordering::SeqCst);
        }
        let written = writer.join().unwrap();
        let reads = reads.load(Ordering::SeqCst);
        assert!(
            reads >= 20,
            "only {reads} reads overlapped the {written} appends"
        );
    }

    #[test]
    fn a_size_cap_drops_the_oldest_segments_and_keeps_the_newest_lines() {
        let dir = tempfile::tempdir().unwrap();
        let retention = Retention {
            max_age: 7 * DAY,
            max_bytes: 1 << 20,
        };
        assert_eq!(retention.segment_bytes(), 128 * 1024);
        let mut log = Log::open(dir.path(), "t", retention).unwrap().log;
        let mut written = 0u64;
        for round in 0..100 {
            let buf = lines(2000, &format!("r{round}"));
            written += buf.len() as u64;
            log.append(&buf).unwrap();
            log.maintain(SystemTime::now()).unwrap();
            // Never more than the cap plus the segment being written.
            assert!(
                log.bytes() <= retention.max_bytes + retention.segment_bytes(),
                "{} bytes kept",
                log.bytes()
            );
        }
        assert!(
            written > 4 * retention.max_bytes,
            "the test wrote too little"
        );
        let on_disk: u64 = paths(dir.path(), "t")
            .unwrap()
            .iter()
            .map(|p| std::fs::metadata(p).unwrap().len())
            .sum();
        assert_eq!(on_disk, log.bytes());
        let kept = all_lines(dir.path());
        assert_eq!(kept.last().unwrap(), r#"{"tag":"r99","i":1999}"#);
        assert!(
            !kept.iter().any(|l| l.contains("\"r0\"")),
            "the oldest stayed"
        );
        // What is kept is a contiguous tail, oldest first.
        let first: serde_json::Value = serde_json::from_str(&kept[0]).unwrap();
        let first_round: usize = first["tag"].as_str().unwrap()[1..].parse().unwrap();
        let expected: Vec<String> = (first_round..100)
            .flat_map(|r| {
                String::from_utf8(lines(2000, &format!("r{r}")))
                    .unwrap()
                    .lines()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .skip_while(|l| l != &kept[0])
            .collect();
        assert_eq!(kept, expected);
    }

    #[test]
    fn a_lowered_cap_cuts_the_oldest_lines_of_a_big_segment_and_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path(), "t", A_DAY).unwrap().log;
        // One segment far bigger than the cap that comes later.
        log.append(&lines(20_000, "x")).unwrap();
        let before = log.bytes();
        let cap = Retention {
            max_bytes: 100 * 1024,
            ..A_DAY
        };
        assert!(before > 4 * cap.max_bytes);
        log.set_retention(cap);
        log.maintain(SystemTime::now()).unwrap();
        let kept = all_lines(dir.path());
        assert!(log.bytes() <= cap.max_bytes, "{} bytes kept", log.bytes());
        assert!(
            log.bytes() > cap.max_bytes - 100,
            "more than a line under the cap was cut: {} kept",
            log.bytes()
        );
        // Whole lines, the newest, in order.
        assert_eq!(kept.last().unwrap(), r#"{"tag":"x","i":19999}"#);
        let first: serde_json::Value = serde_json::from_str(&kept[0]).unwrap();
        let first = first["i"].as_u64().unwrap() as usize;
        assert_eq!(kept.len(), 20_000 - first);
        // What the log counts is what is on disk, and survives a reopen.
        let on_disk: u64 = paths(dir.path(), "t")
            .unwrap()
            .iter()
            .map(|p| std::fs::metadata(p).unwrap().len())
            .sum();
        assert_eq!(on_disk, log.bytes());
        drop(log);
        let log = Log::open(dir.path(), "t", cap).unwrap().log;
        assert_eq!(log.bytes(), on_disk);
        assert_eq!(all_lines(dir.path()), kept);
    }

    #[test]
    fn segments_older_than_the_max_age_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let retention = A_DAY;
        let mut log = Log::open(dir.path(), "t", retention).unwrap().log;
        log.append(&lines(10, "old")).unwrap();
        // Sealed at open by the next run.
        drop(log);
        let mut log = Log::open(dir.path(), "t", retention).unwrap().log;
        log.append(&lines(10, "new")).unwrap();
        assert_eq!(log.maintain(SystemTime::now()).unwrap(), 0);
        assert_eq!(all_lines(dir.path()).len(), 20);
        // A day and a bit later the old segment goes; the one being written stays.
        let later = SystemTime::now() + DAY + Duration::from_secs(60);
        assert!(log.maintain(later).unwrap() > 0);
        let kept = all_lines(dir.path());
        assert_eq!(kept.len(), 10);
        assert!(kept.iter().all(|l| l.contains("\"new\"")), "{kept:?}");
    }

    #[test]
    fn reopening_cuts_a_torn_line_and_seals_the_last_run() {
        let dir = tempfile::tempdir().unwrap();
        let retention = A_DAY;
        let mut log = Log::open(dir.path(), "t", retention).unwrap().log;
        log.append(&lines(3, "a")).unwrap();
        drop(log);
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join("t.jsonl"))
            .unwrap();
        f.write_all(br#"{"tag":"to"#).unwrap();
        drop(f);
        let opened = Log::open(dir.path(), "t", retention).unwrap();
        assert_eq!(opened.torn_bytes_dropped, 10);
        let mut seen = Vec::new();
        opened
            .log
            .for_each_sealed_line(|l| seen.push(String::from_utf8(l.to_vec()).unwrap()))
            .unwrap();
        assert_eq!(seen, all_lines(dir.path()));
        assert_eq!(seen.len(), 3);
        assert_eq!(
            paths(dir.path(), "t").unwrap(),
            [
                dir.path().join("t-000001.jsonl"),
                dir.path().join("t.jsonl")
            ]
        );
        // An empty run seals nothing.
        drop(opened);
        Log::open(dir.path(), "t", retention).unwrap();
        assert_eq!(paths(dir.path(), "t").unwrap().len(), 2);
    }

    /// The log as a model sees it: sealed segments (oldest first, each its lines) and the
    /// segment being written.
    #[derive(Default)]
    struct Model {
        sealed: VecDeque<Vec<u64>>,
        active: Vec<u64>,
    }

    impl Model {
        /// A seal, or a start (which seals what the last run was writing): the segment
        /// being written is sealed, if anything is in it.
        fn reopened(&mut self) {
            if !self.active.is_empty() {
                self.sealed.push_back(std::mem::take(&mut self.active));
            }
        }

        fn kept(&self) -> Vec<u64> {
            self.sealed
                .iter()
                .flatten()
                .chain(&self.active)
                .copied()
                .collect()
        }
    }

    fn line_of(id: u64) -> String {
        format!(
            "{{\"id\":{id},\"pad\":\"{}\"}}",
            "x".repeat((id % 37) as usize)
        )
    }

    fn id_of(line: &str) -> u64 {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        v["id"].as_u64().unwrap()
    }

    /// Random appends, seals, deletions by retention (one segment, or every one by age),
    /// torn tails left by a crash mid-append, and reopens, against a model: the log always
    /// holds exactly the model's lines in order; a position kept from earlier reads on with
    /// exactly what followed it, or is told it was lost when retention took what followed.
    #[test]
    fn the_log_matches_a_model_through_appends_seals_retention_torn_tails_and_reopens() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(0x5e9_3e17);
        let root = tempfile::tempdir().unwrap();
        let (mut ops, mut torn, mut deletions) = (0u64, 0u64, 0u64);
        for case in 0..40 {
            let dir = root.path().join(format!("case{case}"));
            let mut log = Log::open(&dir, "t", A_DAY).unwrap().log;
            let mut model = Model::default();
            let mut next_id = 0u64;
            // Positions seen by readers: (position, the id of the line just before it).
            let mut seen: Vec<(Position, u64)> = Vec::new();
            for _ in 0..rng.gen_range(10..60) {
                ops += 1;
                match rng.gen_range(0..100) {
                    0..=44 => {
                        let n = rng.gen_range(1..6);
                        let ids: Vec<u64> = (next_id..next_id + n).collect();
                        next_id += n;
                        let buf: String = ids.iter().map(|i| line_of(*i) + "\n").collect();
                        log.append(buf.as_bytes()).unwrap();
                        model.active.extend(ids);
                    }
                    45..=59 => {
                        log.seal(SystemTime::now()).unwrap();
                        model.reopened();
                    }
                    60..=69 => {
                        let bytes = log.delete_oldest("test").unwrap();
                        sync_dir(&dir).unwrap();
                        if let Some(gone) = model.sealed.pop_front() {
                            let len: usize = gone.iter().map(|i| line_of(*i).len() + 1).sum();
                            assert_eq!(bytes, len as u64, "the oldest segment's bytes");
                            deletions += 1;
                        }
                    }
                    70..=73 => {
                        // Two days on: every sealed segment is past its age.
                        let later = SystemTime::now() + 2 * DAY;
                        log.maintain(later).unwrap();
                        deletions += model.sealed.len() as u64;
                        model.sealed.clear();
                    }
                    74..=86 => {
                        // A crash mid-append: part of a line on disk, no newline.
                        drop(log);
                        let part = line_of(next_id);
                        let cut = rng.gen_range(1..part.len());
                        let mut f = OpenOptions::new()
                            .append(true)
                            .open(active_path(&dir, "t"))
                            .unwrap();
                        f.write_all(&part.as_bytes()[..cut]).unwrap();
                        drop(f);
                        let opened = Log::open(&dir, "t", A_DAY).unwrap();
                        assert_eq!(
                            opened.torn_bytes_dropped, cut as u64,
                            "the torn line is cut off"
                        );
                        log = opened.log;
                        model.reopened();
                        torn += 1;
                    }
                    _ => {
                        drop(log);
                        log = Log::open(&dir, "t", A_DAY).unwrap().log;
                        model.reopened();
                    }
                }
                // Everything, from the start, a random amount at a time.
                let budget = rng.gen_range(1..400);
                let mut pos = Position::START;
                let mut got = Vec::new();
                loop {
                    let read = read_lines(&dir, "t", pos, budget, None).unwrap();
                    for (at, line) in &read.lines {
                        let id = id_of(std::str::from_utf8(line).unwrap());
                        got.push(id);
                        if rng.gen_range(0..8) == 0 {
                            seen.push((*at, id));
                        }
                    }
                    if read.lines.is_empty() && read.next == pos {
                        break;
                    }
                    pos = read.next;
                }
                assert_eq!(
                    got,
                    model.kept(),
                    "case {case}: the log holds the model's lines"
                );
                // From a position seen earlier: what followed it, or a loss said.
                if let Some(&(from, before)) = seen.get(rng.gen_range(0..seen.len().max(1))) {
                    let (lines, _, lost) = read_on(&dir, from, budget);
                    let lines: Vec<u64> = lines.iter().map(|l| id_of(l)).collect();
                    let kept = model.kept();
                    let after: Vec<u64> = kept.iter().copied().filter(|i| *i > before).collect();
                    // Retention deletes the oldest lines: lost exactly when some of those
                    // that followed it are gone (ids are given in order, from 0).
                    let first = kept.first().copied().unwrap_or(next_id);
                    if first <= before + 1 {
                        assert!(
                            !lost,
                            "case {case}: from {from:?} (after {before}) nothing was lost"
                        );
                        assert_eq!(lines, after, "case {case}: what followed {before}");
                    } else {
                        assert!(
                            lost,
                            "case {case}: from {from:?} (after {before}) a loss is said"
                        );
                        assert_eq!(lines, kept, "case {case}: on from the oldest kept");
                    }
                }
            }
        }
        assert!(
            ops > 1000 && torn > 100 && deletions > 100,
            "{ops} {torn} {deletions}"
        );
    }
}
