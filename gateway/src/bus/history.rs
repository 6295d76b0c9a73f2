//! Where one check's results are in the embedded bus's results log, so the history of a
//! check reads its own lines only, not every agent's.
//!
//! Each sealed segment `results-<n>.jsonl` has an index beside it, `results-<n>.idx`:
//! for every (agent, check) in the segment, the position of each of its lines and the
//! time its run started. The writer keeps the index of the segment being written in
//! memory ([`Building`]) and writes it out when it moves on to the next segment, so
//! keeping the index costs no reading of the log. A segment without a usable index (a
//! crash before it was written, a release before indexes, a damaged file) is indexed by
//! reading it once, when a history first needs it. The index is only ever a hint: every
//! line read through it is checked to be the agent's and the check's.
//!
//! The file, all integers little endian:
//! `OPHIST02`, key count (u32), a directory of (FNV-1a hash of the key (u64), offset of
//! its entry (u64)) sorted by hash, the entries (key length (u16), key, place count
//! (u32), places as (position (u64), run start in ms (u64)), FNV-1a of the entry's bytes
//! before it (u64)), and `OPHISTOK` last. A lookup reads the header, binary-searches the
//! directory and reads one entry: a few small reads per segment, whatever the segment
//! holds. A file cut short, or an entry whose bytes do not match their checksum, is
//! refused and the segment indexed again; a damaged hash in the directory can only make
//! one key's lines of that segment missing from a history (checking the whole directory
//! would mean reading it all on every lookup).
//! (Hand-written: the format is twenty lines, and no crate offers an on-disk map that is
//! written once, read by key with positional reads, and checked for truncation.)

use std::collections::HashMap;
use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::segments::Segment;

const MAGIC: &[u8; 8] = b"OPHIST02";
const TRAILER: &[u8; 8] = b"OPHISTOK";
const HEADER: u64 = 12;
const DIR_ENTRY: u64 = 16;
const PLACE: u64 = 16;

/// Where one key's lines are in one segment: each line's position (as the segment was
/// written) and when its run started (Unix ms), in the order written.
pub type Places = Vec<(u64, u64)>;

/// The index key of an agent's check.
pub fn key(fingerprint: &str, check: &str) -> String {
    format!("{fingerprint}/{check}")
}

/// The index of a tenant's segment being written.
#[derive(Debug, Default)]
pub struct Building {
    pub segment: u64,
    pub keys: HashMap<String, Places>,
}

/// Each tenant's [`Building`], written by the bus writer, read by history readers.
pub type Indexes = Arc<Mutex<HashMap<String, Building>>>;

fn fnv1a_bytes(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn fnv1a(key: &str) -> u64 {
    fnv1a_bytes(key.as_bytes())
}

/// Write the index `keys` of a segment to `path` (atomically: readers see all or none).
pub fn write(path: &Path, keys: &HashMap<String, Places>) -> std::io::Result<()> {
    let mut sorted: Vec<(u64, &String, &Places)> =
        keys.iter().map(|(k, p)| (fnv1a(k), k, p)).collect();
    sorted.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    let count = u32::try_from(sorted.len()).map_err(std::io::Error::other)?;
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&count.to_le_bytes());
    let mut at = HEADER + DIR_ENTRY * u64::from(count);
    for (hash, key, places) in &sorted {
        out.extend_from_slice(&hash.to_le_bytes());
        out.extend_from_slice(&at.to_le_bytes());
        at += 2 + key.len() as u64 + 4 + PLACE * places.len() as u64 + 8;
    }
    for (_, key, places) in &sorted {
        let entry_start = out.len();
        let len = u16::try_from(key.len()).map_err(std::io::Error::other)?;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(key.as_bytes());
        let n = u32::try_from(places.len()).map_err(std::io::Error::other)?;
        out.extend_from_slice(&n.to_le_bytes());
        for (offset, started) in places.iter() {
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(&started.to_le_bytes());
        }
        let sum = fnv1a_bytes(&out[entry_start..]);
        out.extend_from_slice(&sum.to_le_bytes());
    }
    out.write_all(TRAILER)?;
    crate::util::write_atomic(path, &out, 0o600)
}

fn damaged(path: &Path, what: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("history index {} is damaged: {what}", path.display()),
    )
}

fn read_u64(file: &File, at: u64) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    file.read_exact_at(&mut b, at)?;
    Ok(u64::from_le_bytes(b))
}

/// `key`'s places in the index at `path`: `Ok(None)` when there is no index there,
/// `Ok(Some(empty))` when the segment holds nothing of the key, an error when the file is
/// not a whole index.
pub fn lookup(path: &Path, key: &str) -> std::io::Result<Option<Places>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    if len < HEADER + TRAILER.len() as u64 {
        return Err(damaged(path, "too short"));
    }
    let mut header = [0u8; HEADER as usize];
    file.read_exact_at(&mut header, 0)?;
    let mut trailer = [0u8; 8];
    file.read_exact_at(&mut trailer, len - 8)?;
    if &header[..8] != MAGIC || &trailer != TRAILER {
        return Err(damaged(path, "not an index, or cut short"));
    }
    let count = u64::from(u32::from_le_bytes(header[8..].try_into().expect("4 bytes")));
    let end = len - 8;
    if HEADER + count * DIR_ENTRY > end {
        return Err(damaged(path, "directory beyond the end"));
    }
    let hash = fnv1a(key);
    // The first directory entry whose hash is not below `hash`.
    let (mut lo, mut hi) = (0u64, count);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if read_u64(&file, HEADER + mid * DIR_ENTRY)? < hash {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    let mut i = lo;
    while i < count && read_u64(&file, HEADER + i * DIR_ENTRY)? == hash {
        let at = read_u64(&file, HEADER + i * DIR_ENTRY + 8)?;
        i += 1;
        if at.checked_add(6).is_none_or(|e| e > end) {
            return Err(damaged(path, "entry beyond the end"));
        }
        let mut len = [0u8; 2];
        file.read_exact_at(&mut len, at)?;
        let key_len = u64::from(u16::from_le_bytes(len));
        if at + 2 + key_len + 4 > end {
            return Err(damaged(path, "entry beyond the end"));
        }
        let mut found = vec![0u8; key_len as usize];
        file.read_exact_at(&mut found, at + 2)?;
        if found != key.as_bytes() {
            continue;
        }
        let mut n = [0u8; 4];
        file.read_exact_at(&mut n, at + 2 + key_len)?;
        let n = u64::from(u32::from_le_bytes(n));
        let from = at + 2 + key_len + 4;
        if from + n * PLACE + 8 > end {
            return Err(damaged(path, "places beyond the end"));
        }
        // The whole entry, to check it against its sum.
        let mut raw = vec![0u8; (from - at + n * PLACE + 8) as usize];
        file.read_exact_at(&mut raw, at)?;
        let (body, sum) = raw.split_at(raw.len() - 8);
        if fnv1a_bytes(body) != u64::from_le_bytes(sum.try_into().expect("8 bytes")) {
            return Err(damaged(path, "an entry does not match its checksum"));
        }
        let places = body[(from - at) as usize..]
            .chunks_exact(PLACE as usize)
            .map(|c| {
                (
                    u64::from_le_bytes(c[..8].try_into().expect("8 bytes")),
                    u64::from_le_bytes(c[8..].try_into().expect("8 bytes")),
                )
            })
            .collect();
        return Ok(Some(places));
    }
    Ok(Some(Places::new()))
}

/// What indexing needs of a result line.
#[derive(serde::Deserialize)]
struct Head<'a> {
    #[serde(borrow)]
    fingerprint: std::borrow::Cow<'a, str>,
    result: ResultHead<'a>,
}

#[derive(serde::Deserialize)]
struct ResultHead<'a> {
    #[serde(borrow)]
    check: std::borrow::Cow<'a, str>,
    started_at_ms: u64,
}

/// Index a segment by reading every line of it (unreadable lines are left out).
pub fn build(segment: &Segment) -> std::io::Result<HashMap<String, Places>> {
    let mut keys: HashMap<String, Places> = HashMap::new();
    segment.for_each_line(|at, line| {
        if let Ok(h) = serde_json::from_slice::<Head>(line) {
            keys.entry(key(&h.fingerprint, &h.result.check))
                .or_default()
                .push((at, h.result.started_at_ms));
        }
    })?;
    Ok(keys)
}

/// Lines just made durable in `tenant`'s segment `segment`: added to its [`Building`].
/// When the writer has moved on to a new segment, the previous one's index is written
/// out first (to `dir`, the tenant's log folder), under the lock, so a reader finds the
/// index in memory or on disk, never in neither.
pub fn add(
    indexes: &Indexes,
    dir: &Path,
    tenant: &str,
    segment: u64,
    lines: impl IntoIterator<Item = (String, u64, u64)>,
) {
    let mut all = outpost_sys::lock(indexes);
    let building = all.entry(tenant.to_string()).or_insert_with(|| Building {
        segment,
        keys: HashMap::new(),
    });
    if building.segment != segment {
        save(dir, building);
        building.segment = segment;
        building.keys.clear();
    }
    for (key, at, started) in lines {
        building.keys.entry(key).or_default().push((at, started));
    }
}

/// Write `building` out as its segment's index (a failure is logged: the segment is
/// indexed again by reading it when a history needs it).
pub fn save(dir: &Path, building: &Building) {
    if building.keys.is_empty() {
        return;
    }
    // Not for a segment retention has deleted meanwhile.
    match super::segments::list(dir, "results") {
        Ok(l) if l.sealed.iter().any(|(n, _)| *n == building.segment) => {}
        Ok(l) if l.active == Some(building.segment) => {}
        _ => return,
    }
    let path = super::segments::sidecar_path(dir, "results", building.segment);
    if let Err(e) = write(&path, &building.keys) {
        tracing::warn!(file = %path.display(), error = %e, "cannot write a history index; it will be rebuilt when needed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> HashMap<String, Places> {
        let mut keys = HashMap::new();
        for a in 0..50u64 {
            for c in ["disk", "load", "a.b"] {
                let places = (0..a % 7)
                    .map(|i| (a * 1000 + i, 1_700_000_000_000 + i))
                    .collect();
                keys.insert(key(&format!("fp{a:03}"), c), places);
            }
        }
        keys
    }

    #[test]
    fn every_key_is_found_with_its_places_and_others_are_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("results-000001.idx");
        let keys = sample();
        write(&path, &keys).unwrap();
        for (k, places) in &keys {
            assert_eq!(lookup(&path, k).unwrap().as_ref(), Some(places), "{k}");
        }
        assert_eq!(lookup(&path, "fp999/disk").unwrap(), Some(Vec::new()));
        assert_eq!(lookup(&dir.path().join("none.idx"), "x").unwrap(), None);
    }

    #[test]
    fn a_damaged_index_is_refused_not_misread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("results-000001.idx");
        write(&path, &sample()).unwrap();
        let whole = std::fs::read(&path).unwrap();
        // Cut short anywhere: refused.
        for cut in [0, 5, 12, whole.len() / 2, whole.len() - 1] {
            std::fs::write(&path, &whole[..cut]).unwrap();
            let err = lookup(&path, &key("fp010", "disk")).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "cut at {cut}");
        }
        // A directory pointing past the end: refused, whatever the key.
        let mut bad = whole.clone();
        let count = u64::from(u32::from_le_bytes(whole[8..12].try_into().unwrap()));
        for i in 0..count {
            let at = (HEADER + i * DIR_ENTRY + 8) as usize;
            bad[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        }
        std::fs::write(&path, &bad).unwrap();
        assert!(lookup(&path, &key("fp010", "disk")).is_err());
        // A place flipped inside an entry: refused by its sum.
        let k = key("fp010", "disk");
        let mut flipped = whole.clone();
        let at = whole
            .windows(k.len())
            .position(|w| w == k.as_bytes())
            .expect("the key is in the file");
        flipped[at + k.len() + 4 + 3] ^= 0x40;
        std::fs::write(&path, &flipped).unwrap();
        let err = lookup(&path, &k).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
    }
}
