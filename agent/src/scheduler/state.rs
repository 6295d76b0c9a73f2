//! The check state cache, `checks-state.json` in the agent's state directory: for each
//! running check, where its soft/hard state stood (the [`Tracker`]), its last result's
//! status, and when that run started and ended. A restarted agent reads it once so a check
//! that was soft 2/3 goes on to 3/3, a hard problem stays hard, and the schedule resumes
//! from the last run instead of from scratch.
//!
//! Each entry carries the hash of the check's definition: it is reused only for the same
//! definition. The file is a cache, never a source of truth: one that cannot be read or
//! parsed is reported and ignored, and every check then starts fresh.
//!
//! Not here: when checks run (the scheduler decides that from what is restored here), the
//! checks' configuration (`config.json`).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost_protocol::{CheckSpec, Status};
use serde::{Deserialize, Serialize};

use super::Tracker;
use crate::util::{now_ms, write_atomic};

/// The file's name in the state directory.
pub const FILE: &str = "checks-state.json";

/// The format written; a file of another version is ignored.
const VERSION: u32 = 1;

/// How often the state is written while it changes: at most one write this often, however
/// many results arrive.
pub const SAVE_EVERY: Duration = Duration::from_secs(2);

/// A file larger than this is not read (about 200 bytes per check are written).
const MAX_FILE_BYTES: u64 = 64 << 20;

#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    saved_at_ms: u64,
    checks: BTreeMap<String, Saved>,
}

/// One check's state as kept in the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    /// [`spec_hash`] of the definition this state was reached with.
    pub spec_hash: String,
    #[serde(default)]
    pub hard: Option<Status>,
    #[serde(default)]
    pub attempt: u32,
    #[serde(default)]
    pub soft: bool,
    #[serde(default)]
    pub last: Option<LastRun>,
}

/// The last result of a check: its status and when its run started and ended (Unix ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastRun {
    pub status: Status,
    pub started_at_ms: u64,
    pub ended_at_ms: u64,
}

/// A check's state in memory: its tracker and its last result.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CheckState {
    pub tracker: Tracker,
    pub last: Option<LastRun>,
}

impl CheckState {
    pub fn save(&self, spec_hash: String) -> Saved {
        Saved {
            spec_hash,
            hard: self.tracker.hard,
            attempt: self.tracker.attempt,
            soft: self.tracker.soft,
            last: self.last,
        }
    }
}

impl Saved {
    /// The state to carry on with for `spec` (whose [`spec_hash`] is `hash`), if this
    /// entry was saved for the same definition. The attempt count is kept within the
    /// check's attempts.
    pub fn restore(&self, spec: &CheckSpec, hash: &str) -> Option<CheckState> {
        if self.spec_hash != hash {
            return None;
        }
        Some(CheckState {
            tracker: Tracker {
                hard: self.hard,
                attempt: self.attempt.min(spec.max_attempts.max(1)),
                soft: self.soft,
            },
            last: self.last,
        })
    }
}

/// The content hash of one check's definition (the protocol's configuration hash of just
/// this check).
pub fn spec_hash(spec: &CheckSpec) -> String {
    outpost_protocol::config_hash(std::slice::from_ref(spec))
}

/// Why a state file was not used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is larger than {MAX_FILE_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("{path} is not a check state file: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path} has format version {found}; this agent writes version {VERSION}")]
    Version { path: PathBuf, found: u32 },
}

/// Read the states saved at `path`; an empty map when there is no file.
pub fn load(path: &Path) -> Result<BTreeMap<String, Saved>, LoadError> {
    let read = |source| LoadError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(read(e)),
    };
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(LoadError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    let f: StateFile = serde_json::from_slice(&bytes).map_err(|source| LoadError::Parse {
        path: path.to_path_buf(),
        source,
    })?;
    if f.version != VERSION {
        return Err(LoadError::Version {
            path: path.to_path_buf(),
            found: f.version,
        });
    }
    Ok(f.checks)
}

/// Replace the file at `path` with `checks`, atomically (readable by the agent only).
pub fn save(path: &Path, checks: BTreeMap<String, Saved>) -> std::io::Result<()> {
    let f = StateFile {
        version: VERSION,
        saved_at_ms: now_ms(),
        checks,
    };
    let bytes = serde_json::to_vec(&f).map_err(std::io::Error::other)?;
    write_atomic(path, &bytes, 0o600)
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_protocol::probe::{Command, Probe};

    fn spec(name: &str) -> CheckSpec {
        let mut s = CheckSpec::new(
            name,
            Probe::Nagios(Command {
                command: vec!["/bin/false".into()],
            }),
            60,
            5,
        );
        s.max_attempts = 3;
        s
    }

    #[test]
    fn states_round_trip_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        assert!(load(&path).unwrap().is_empty(), "no file: nothing restored");
        let a = spec("a");
        let mut t = Tracker::default();
        t.classify(Status::Critical, 3);
        t.classify(Status::Critical, 3);
        let state = CheckState {
            tracker: t,
            last: Some(LastRun {
                status: Status::Critical,
                started_at_ms: 1_000,
                ended_at_ms: 1_250,
            }),
        };
        save(
            &path,
            BTreeMap::from([("a".into(), state.save(spec_hash(&a)))]),
        )
        .unwrap();
        let back = load(&path).unwrap();
        assert_eq!(back.len(), 1);
        let restored = back["a"]
            .restore(&a, &spec_hash(&a))
            .expect("same definition");
        assert_eq!(restored, state);
        // Soft 2/3 before: the next CRITICAL is the third and hard.
        let mut t = restored.tracker;
        assert_eq!(
            t.classify(Status::Critical, 3),
            (outpost_protocol::StateType::Hard, 3)
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_changed_definition_does_not_get_the_old_state() {
        let a = spec("a");
        let saved = CheckState::default().save(spec_hash(&a));
        assert!(saved.restore(&a, &spec_hash(&a)).is_some());
        let mut more = a.clone();
        more.max_attempts = 5;
        assert!(
            saved.restore(&more, &spec_hash(&more)).is_none(),
            "attempts changed"
        );
        let mut other = a.clone();
        other.probe = Probe::Nagios(Command {
            command: vec!["/bin/true".into()],
        });
        assert!(
            saved.restore(&other, &spec_hash(&other)).is_none(),
            "command changed"
        );
    }

    #[test]
    fn an_attempt_count_beyond_the_checks_attempts_is_capped() {
        let a = spec("a");
        let mut saved = CheckState::default().save(spec_hash(&a));
        saved.attempt = u32::MAX;
        saved.soft = true;
        let mut t = saved.restore(&a, &spec_hash(&a)).unwrap().tracker;
        assert_eq!(t.attempt, 3);
        // No overflow on the next result.
        t.classify(Status::Warning, 3);
    }

    #[test]
    fn unreadable_files_are_errors_that_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        for (bytes, says) in [
            (
                &b"{\"version\":1,\"checks\":{\"a\":"[..],
                "not a check state file",
            ),
            (&b"\xff\xfe garbage"[..], "not a check state file"),
            (&b"[]"[..], "not a check state file"),
            (
                &b"{\"version\":99,\"saved_at_ms\":0,\"checks\":{}}"[..],
                "format version 99",
            ),
        ] {
            std::fs::write(&path, bytes).unwrap();
            let e = load(&path).unwrap_err().to_string();
            assert!(e.contains(says) && e.contains(FILE), "{e}");
        }
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        assert!(matches!(load(&path), Err(LoadError::Read { .. })));
    }
}
