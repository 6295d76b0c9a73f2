//! A minimal Debian bookworm tree (minbase, curl, ca-certificates) for the tests that run
//! the installer and the agent in a chroot: built with debootstrap once, cached as a
//! tarball outside the clone, and unpacked fresh for each test.
//!
//! Building takes minutes, so it happens once per machine whatever the number of tests,
//! test threads or test processes that want it:
//! - within a process, a `OnceLock` makes every other caller wait for the first one's
//!   build (and share its failure instead of starting another);
//! - across processes, an exclusive `flock` on `CACHE/debian-bookworm.lock` does the same.
//!
//! The cache is trusted only when complete: debootstrap writes into a fresh temporary
//! directory, tar into a temporary file that is fsynced before it is renamed to its final
//! name, and leftovers of an interrupted build (directories, partial tarballs, mounts
//! debootstrap made) are cleared under the lock before the next build starts.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const TARBALL: &str = "debian-bookworm-minbase.tar";
const LOCK: &str = "debian-bookworm.lock";
/// Prefix of everything a build in progress makes in the cache directory.
const PARTIAL: &str = "bookworm.partial.";
/// What builds before this module left while in progress (a per-pid directory and tar).
const PARTIAL_BEFORE: [&str; 2] = ["bookworm.build.", "debian-bookworm-minbase.tar."];

/// The cache directory: `OUTPOST_TEST_CACHE`, else `/var/cache/outpost-tests`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("OUTPOST_TEST_CACHE")
        .unwrap_or_else(|| "/var/cache/outpost-tests".into())
        .into()
}

/// Unpacks the cached tree into `into` (created), building the cache first if needed.
pub fn unpack_chroot(into: &Path) {
    let tarball = match cached_tarball() {
        Ok(t) => t,
        Err(e) => panic!("no Debian chroot: {e}"),
    };
    std::fs::create_dir_all(into).unwrap();
    let status = Command::new("timeout")
        .args(["600", "tar"])
        .arg("-C")
        .arg(into)
        .arg("-xf")
        .arg(&tarball)
        .status()
        .unwrap();
    assert!(status.success(), "cannot unpack {}", tarball.display());
}

/// The path of the complete tarball, built at most once per process (a failure is
/// remembered, so a second test reports it instead of spending minutes on another try).
fn cached_tarball() -> Result<PathBuf, String> {
    static ONCE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    ONCE.get_or_init(|| {
        let cache = cache_dir();
        std::fs::create_dir_all(&cache).map_err(|e| format!("{}: {e}", cache.display()))?;
        let lock = File::create(cache.join(LOCK)).map_err(|e| format!("lock file: {e}"))?;
        lock.lock().map_err(|e| format!("locking {LOCK}: {e}"))?;
        let tarball = cache.join(TARBALL);
        if !tarball.exists() {
            clear_partial(&cache)?;
            let started = std::time::Instant::now();
            build(&cache, &tarball)?;
            eprintln!(
                "debian chroot: built {} in {:.0} s",
                tarball.display(),
                started.elapsed().as_secs_f64()
            );
        }
        Ok(tarball)
        // The lock is released when `lock` is dropped here.
    })
    .clone()
}

fn build(cache: &Path, tarball: &Path) -> Result<(), String> {
    let pid = std::process::id();
    let root = cache.join(format!("{PARTIAL}{pid}.root"));
    let tmp = cache.join(format!("{PARTIAL}{pid}.tar"));
    let result = (|| {
        let status = Command::new("timeout")
            .args([
                "1800",
                "debootstrap",
                "--variant=minbase",
                "--include=curl,ca-certificates",
                "bookworm",
            ])
            .arg(&root)
            .arg("http://deb.debian.org/debian")
            .status()
            .map_err(|e| format!("debootstrap (ci/setup installs it): {e}"))?;
        if !status.success() {
            return Err(format!(
                "debootstrap into {} failed: {status}",
                root.display()
            ));
        }
        let status = Command::new("timeout")
            .args(["600", "tar"])
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&tmp)
            .arg(".")
            .status()
            .map_err(|e| format!("tar: {e}"))?;
        if !status.success() {
            return Err(format!("tar of {} failed: {status}", root.display()));
        }
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| format!("fsync {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, tarball).map_err(|e| format!("rename: {e}"))?;
        File::open(cache)
            .and_then(|d| d.sync_all())
            .map_err(|e| format!("fsync {}: {e}", cache.display()))
    })();
    // Success or not, nothing partial stays behind for a later run to find.
    let cleared = clear_partial(cache);
    result.and(cleared)
}

/// Removes what an earlier build left (the caller holds the lock, so none is running):
/// first unmounting anything debootstrap mounted inside it, so that removing the tree
/// never reaches into a mounted /proc or /sys.
fn clear_partial(cache: &Path) -> Result<(), String> {
    let entries = std::fs::read_dir(cache).map_err(|e| format!("{}: {e}", cache.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !std::iter::once(PARTIAL)
            .chain(PARTIAL_BEFORE)
            .any(|p| name.starts_with(p))
        {
            continue;
        }
        let path = entry.path();
        for mount in mounts_under(&path) {
            let _ = Command::new("umount").arg("-l").arg(&mount).status();
        }
        if !mounts_under(&path).is_empty() {
            return Err(format!(
                "{} still has mounts below it; unmount them and remove it",
                path.display()
            ));
        }
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.map_err(|e| format!("removing {}: {e}", path.display()))?;
    }
    Ok(())
}

/// Mount points at or below `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut found: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What an interrupted build leaves (of this module's and of the code before it) is
    /// removed; the complete tarball and anything else in the cache stay.
    #[test]
    fn leftovers_of_an_interrupted_build_are_cleared_and_the_cache_kept() {
        let cache = tempfile::tempdir().unwrap();
        let c = cache.path();
        for d in ["bookworm.partial.7.root/var/lib", "bookworm.build.9/usr"] {
            std::fs::create_dir_all(c.join(d)).unwrap();
        }
        for f in [
            "bookworm.partial.7.tar",
            "debian-bookworm-minbase.tar.9",
            TARBALL,
            LOCK,
            "other",
        ] {
            std::fs::write(c.join(f), "x").unwrap();
        }
        clear_partial(c).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(c)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, [TARBALL, LOCK, "other"]);
    }
}
