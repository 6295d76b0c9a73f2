//! Checks that applications drop into this host's `checks.d/` (TOML files in the same
//! format as the gateway's, see `outpost_protocol::checkfile`). They run next to the
//! gateway's checks; `target` in a local file is matched against this agent's own labels
//! and groups.
//!
//! The directory is reread every few seconds. A file that cannot be read or parsed, or
//! that defines something a local check cannot be (a catalog `plugin`, a name the gateway
//! already uses or another local file took), never stops the agent: its problem becomes a
//! CRITICAL result of the check `checks.d.<file stem>`, naming the file and the error, and
//! its last good checks keep running. When the file is fixed (or removed) that check
//! turns OK.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use outpost_protocol::checkfile::{parse_file, CheckDef};
use outpost_protocol::{CheckSpec, Origin, Status, MAX_CHECKS};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::checks::Outcome;
use crate::outbox::Outbox;
use crate::scheduler::Scheduler;
use crate::util::now_ms;

/// Largest check file read.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// The name of the check that reports on one local file.
pub fn file_check_name(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let clean: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let room = 64 - FILE_CHECK_PREFIX.len();
    if clean == stem && clean.len() <= room {
        return format!("{FILE_CHECK_PREFIX}{clean}");
    }
    // Changed to fit: a short hash of the real name keeps two files apart
    // ("a b.toml" and "a_b.toml").
    let tag = &hex::encode(Sha256::digest(stem.as_bytes()))[..8];
    let keep: String = clean.chars().take(room - tag.len() - 1).collect();
    format!("{FILE_CHECK_PREFIX}{keep}-{tag}")
}

/// Check names that report on local files start with this; local checks may not.
pub const FILE_CHECK_PREFIX: &str = "checks.d.";

struct FileState {
    digest: [u8; 32],
    /// The checks last parsed without error.
    good: Vec<CheckDef>,
    /// The parse error of the current content, if any.
    error: Option<String>,
}

pub struct LocalChecks {
    dir: PathBuf,
    labels: BTreeMap<String, String>,
    groups: Vec<String>,
    files: BTreeMap<PathBuf, FileState>,
    /// What was last reported per file: (status, output).
    reported: BTreeMap<PathBuf, (Status, String)>,
}

impl LocalChecks {
    pub fn new(dir: &Path, labels: BTreeMap<String, String>, groups: Vec<String>) -> LocalChecks {
        LocalChecks {
            dir: dir.to_path_buf(),
            labels,
            groups,
            files: BTreeMap::new(),
            reported: BTreeMap::new(),
        }
    }

    /// Reread the directory. Returns the checks to run, and one status per file (present
    /// or just removed) whose status changed since the last scan.
    pub fn scan(
        &mut self,
        gateway_names: &[String],
    ) -> (Vec<CheckSpec>, Vec<(PathBuf, Status, String)>) {
        let paths: Vec<PathBuf> = match std::fs::read_dir(&self.dir) {
            Ok(rd) => {
                let mut v: Vec<PathBuf> = rd
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| {
                        p.extension().is_some_and(|x| x == "toml")
                            && !p
                                .file_name()
                                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
                    })
                    .collect();
                v.sort();
                v
            }
            Err(e) => {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(dir = %self.dir.display(), error = %e, "cannot read checks.d; keeping the local checks already loaded");
                    return (self.current(gateway_names).0, Vec::new());
                }
                Vec::new()
            }
        };
        self.files.retain(|p, _| paths.contains(p));
        for path in &paths {
            let text = read_limited(path);
            let digest: [u8; 32] = match &text {
                Ok(t) => Sha256::digest(t.as_bytes()).into(),
                Err(e) => Sha256::digest(e.as_bytes()).into(),
            };
            if self.files.get(path).is_some_and(|f| f.digest == digest) {
                continue;
            }
            let parsed = text.and_then(|t| parse_file(path, &t)).and_then(|defs| {
                let bad: Vec<String> = defs
                    .iter()
                    .filter(|d| d.spec.plugin.is_some())
                    .map(|d| format!("check {:?}: plugin needs the gateway's catalog; use command with a path on this host", d.spec.name))
                    .collect();
                if bad.is_empty() { Ok(defs) } else { Err(bad.join("; ")) }
            });
            let good = self.files.remove(path).map(|f| f.good).unwrap_or_default();
            let state = match parsed {
                Ok(defs) => {
                    tracing::info!(file = %path.display(), checks = defs.len(), "loaded local check file");
                    FileState {
                        digest,
                        good: defs,
                        error: None,
                    }
                }
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, kept_checks = good.len(),
                        "local check file is invalid; keeping its last good version");
                    FileState {
                        digest,
                        good,
                        error: Some(e),
                    }
                }
            };
            self.files.insert(path.clone(), state);
        }
        let (checks, mut status) = self.current(gateway_names);
        let mut changes = Vec::new();
        // Files that disappeared: their problem is gone with them.
        let gone: Vec<PathBuf> = self
            .reported
            .keys()
            .filter(|p| !self.files.contains_key(*p))
            .cloned()
            .collect();
        for p in gone {
            if self
                .reported
                .remove(&p)
                .is_some_and(|(s, _)| s != Status::Ok)
            {
                changes.push((
                    p.clone(),
                    Status::Ok,
                    format!("{} was removed", p.display()),
                ));
            }
        }
        for (path, (s, text)) in std::mem::take(&mut status) {
            if self.reported.get(&path) != Some(&(s, text.clone())) {
                self.reported.insert(path.clone(), (s, text.clone()));
                changes.push((path, s, text));
            }
        }
        (checks, changes)
    }

    /// The checks in force and each file's status, given the gateway's check names.
    fn current(
        &self,
        gateway_names: &[String],
    ) -> (Vec<CheckSpec>, BTreeMap<PathBuf, (Status, String)>) {
        let gateway: BTreeSet<&str> = gateway_names.iter().map(String::as_str).collect();
        let mut taken: BTreeMap<String, PathBuf> = BTreeMap::new();
        let mut checks = Vec::new();
        let mut status = BTreeMap::new();
        for (path, f) in &self.files {
            let mut problems: Vec<String> = f.error.iter().cloned().collect();
            let mut ran = 0;
            for def in &f.good {
                let name = &def.spec.name;
                if !def.target.matches(&self.labels, &self.groups) {
                    continue;
                }
                if name.starts_with(FILE_CHECK_PREFIX) {
                    problems.push(format!("check {name:?}: names starting with {FILE_CHECK_PREFIX:?} are reserved for reports on these files"));
                } else if gateway.contains(name.as_str()) {
                    problems.push(format!(
                        "check {name:?} is also configured by the gateway; the gateway's runs"
                    ));
                } else if let Some(other) = taken.get(name) {
                    problems.push(format!(
                        "check {name:?} is already defined in {}",
                        other.display()
                    ));
                } else if checks.len() >= MAX_CHECKS {
                    problems.push(format!(
                        "check {name:?} is beyond the limit of {MAX_CHECKS} local checks"
                    ));
                } else {
                    taken.insert(name.clone(), path.clone());
                    checks.push(def.spec.clone());
                    ran += 1;
                }
            }
            let s = if problems.is_empty() {
                (
                    Status::Ok,
                    format!("{}: {ran} checks loaded", path.display()),
                )
            } else {
                (
                    Status::Critical,
                    format!("{}: {}", path.display(), problems.join("; ")),
                )
            };
            status.insert(path.clone(), s);
        }
        (checks, status)
    }
}

/// Read a check file: only a regular file (a FIFO would block the scan, a device could
/// be endless), opened without blocking, never more than [`MAX_FILE_BYTES`].
fn read_limited(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read: {e}"))?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    // Windows has no FIFOs in the file system: the is_file checks suffice there.
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NONBLOCK);
    let file = options
        .open(path)
        .map_err(|e| format!("cannot read: {e}"))?;
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        return Err("not a regular file".into());
    }
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(format!(
            "file is larger than the limit of {MAX_FILE_BYTES} bytes"
        ));
    }
    String::from_utf8(bytes).map_err(|_| "file is not UTF-8 text".to_string())
}

/// Reread `checks.d` every `poll` until `shutdown`, applying changes to the scheduler and
/// queueing file status results.
pub async fn watch(
    mut local: LocalChecks,
    scheduler: Scheduler,
    outbox: Arc<dyn Outbox>,
    poll: std::time::Duration,
    shutdown: CancellationToken,
) {
    let mut last: Option<Vec<CheckSpec>> = None;
    loop {
        let gateway = scheduler.gateway_names();
        let scanner = tokio::task::spawn_blocking(move || {
            let out = local.scan(&gateway);
            (local, out)
        });
        let (back, (checks, changes)) = match scanner.await {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(error = %e, "checks.d scan failed; local checks are no longer reread");
                return;
            }
        };
        local = back;
        if last.as_ref() != Some(&checks) {
            scheduler.apply_local(checks.clone());
            last = Some(checks);
        }
        for (path, status, text) in changes {
            let name = file_check_name(&path);
            let spec = CheckSpec::new(
                name,
                outpost_protocol::probe::Probe::Nagios(Default::default()),
                0,
                0,
            );
            let r = Outcome::new(status, text).into_result(&spec, Origin::Schedule, now_ms(), 0);
            if let Err(e) = outbox.append(r) {
                tracing::error!(error = %e, "cannot queue a checks.d status result");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(poll) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn merges_files_reports_problems_and_keeps_last_good() {
        let dir = tempfile::tempdir().unwrap();
        let labels: BTreeMap<String, String> = [("role".to_string(), "db".to_string())].into();
        let mut l = LocalChecks::new(dir.path(), labels, vec![]);
        assert_eq!(l.scan(&[]), (vec![], vec![]), "no directory is no checks");
        let a = write(dir.path(), "app.toml", "[[check]]\nname='app'\ncommand='/bin/true'\ninterval=5\n[[check]]\nname='web-only'\ncommand='/bin/true'\ninterval=5\ntarget={labels={role='web'}}\n");
        let (checks, changes) = l.scan(&[]);
        assert_eq!(
            checks.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            ["app"],
            "target matched against own labels"
        );
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].1, Status::Ok);
        assert_eq!(l.scan(&[]).1, vec![], "unchanged status is not repeated");

        // Broken: the last good checks keep running; the file's check turns CRITICAL.
        write(dir.path(), "app.toml", "[[check]]\nname='app'\ncommand=\n");
        let (checks, changes) = l.scan(&[]);
        assert_eq!(checks.len(), 1);
        assert_eq!(changes[0].1, Status::Critical);
        assert!(
            changes[0].2.contains("app.toml") && changes[0].2.contains("expected"),
            "{}",
            changes[0].2
        );

        // A name clash with the gateway and between files, and a catalog plugin.
        write(
            dir.path(),
            "app.toml",
            "[[check]]\nname='app'\ncommand='/bin/true'\ninterval=5\n",
        );
        write(dir.path(), "b.toml", "[[check]]\nname='app'\ncommand='/bin/false'\ninterval=5\n[[check]]\nname='b1'\ncommand='/bin/true'\ninterval=5\n");
        write(
            dir.path(),
            "c.toml",
            "[[check]]\nname='c'\nplugin='check_x'\ninterval=5\n",
        );
        let (checks, changes) = l.scan(&["b1".to_string()]);
        assert_eq!(
            checks.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            ["app"]
        );
        let by_file: BTreeMap<String, (Status, String)> = changes
            .into_iter()
            .map(|(p, s, t)| (file_check_name(&p), (s, t)))
            .collect();
        assert_eq!(by_file["checks.d.app"].0, Status::Ok);
        assert!(
            by_file["checks.d.b"].1.contains("already defined in")
                && by_file["checks.d.b"]
                    .1
                    .contains("also configured by the gateway"),
            "{:?}",
            by_file["checks.d.b"]
        );
        assert!(
            by_file["checks.d.c"].1.contains("gateway's catalog"),
            "{:?}",
            by_file["checks.d.c"]
        );

        // Removing a broken file clears its problem.
        std::fs::remove_file(dir.path().join("c.toml")).unwrap();
        let (_, changes) = l.scan(&["b1".to_string()]);
        assert_eq!(changes.len(), 1);
        assert_eq!(
            (changes[0].1, file_check_name(&changes[0].0)),
            (Status::Ok, "checks.d.c".to_string())
        );
        assert!(a.exists());
    }

    #[test]
    fn unreadable_and_oversized_files_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = LocalChecks::new(dir.path(), BTreeMap::new(), vec![]);
        std::fs::write(
            dir.path().join("big.toml"),
            vec![b'#'; MAX_FILE_BYTES as usize + 1],
        )
        .unwrap();
        std::fs::write(dir.path().join("bin.toml"), [0xff, 0xfe, 0x00]).unwrap();
        let (_, first) = l.scan(&[]);
        assert!(
            first
                .iter()
                .any(|c| c.1 == Status::Critical && c.2.contains("larger than the limit")),
            "{first:?}"
        );
        assert!(
            first
                .iter()
                .any(|c| c.1 == Status::Critical && c.2.contains("not UTF-8")),
            "{first:?}"
        );
        // A FIFO would block a plain read; a link to a device would never end.
        let fifo = std::ffi::CString::new(dir.path().join("pipe.toml").to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        std::os::unix::fs::symlink("/dev/zero", dir.path().join("zero.toml")).unwrap();
        let (_, changes) = l.scan(&[]);
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert!(
            changes
                .iter()
                .all(|c| c.1 == Status::Critical && c.2.contains("not a regular file")),
            "{changes:?}"
        );
        let a = file_check_name(Path::new("/x/my app!.toml"));
        let b = file_check_name(Path::new("/x/my_app_.toml"));
        assert_eq!(b, "checks.d.my_app_");
        assert!(a.starts_with("checks.d.my_app_-") && a != b, "{a}");
        let long = file_check_name(Path::new(&format!("/x/{}.toml", "y".repeat(100))));
        assert!(
            long.len() <= 64 && outpost_protocol::valid_check_name(&long),
            "{long}"
        );
    }
}
