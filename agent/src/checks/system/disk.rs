//! The disk probe: space and inodes of the filesystem holding a path, as `df` reports them.
//!
//! sysinfo's [`sysinfo::Disks`] is not used here: it reports only total and available
//! space (so blocks reserved for root would count as used), no inodes, leaves tmpfs and
//! network filesystems out of its list (a path on one would be measured as its parent
//! filesystem) and stats every mount point on each refresh (one hung mount would block
//! every disk check). `statvfs(2)` on the path itself has none of these problems.

#[cfg(unix)]
use std::ffi::{CString, OsStr};
#[cfg(unix)]
use std::io;
#[cfg(unix)]
use std::os::unix::ffi::OsStrExt;
#[cfg(unix)]
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use outpost_protocol::probe::DiskProbe;
use outpost_protocol::Status;

use super::{
    above, blocking, bytes_metric, headline, human_bytes, lock, metric, percent, percent_metric,
    Outcome, Shared,
};

/// What `statvfs` says about the filesystem holding a path.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Usage {
    /// The canonical path measured.
    pub path: PathBuf,
    pub mount_point: PathBuf,
    /// Device and type, from the mount table when it lists the mount point.
    pub device: Option<String>,
    pub fs_type: Option<String>,
    pub read_only: bool,
    /// Bytes.
    pub total: u64,
    /// Bytes in use: total minus free (free includes the blocks reserved for root).
    pub used: u64,
    /// Bytes available to unprivileged users.
    pub avail: u64,
    /// `None` when the filesystem has no fixed inode table (btrfs, some network ones).
    pub inodes: Option<Inodes>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Inodes {
    pub total: u64,
    pub used: u64,
}

impl Usage {
    /// Used percent as `df` computes it: used / (used + available to unprivileged users).
    pub fn used_pct(&self) -> f64 {
        percent(self.used, self.used.saturating_add(self.avail))
    }
}

/// Runs one measurement at a time per path: while one hangs (a dead NFS server), the next
/// runs say so instead of piling blocked threads up.
pub(super) async fn run(shared: Arc<Shared>, probe: DiskProbe) -> Outcome {
    if !lock(&shared.disks_in_flight).insert(probe.path.clone()) {
        return Outcome::unknown(format!(
            "the previous measurement of {} has not returned yet (hung filesystem?)",
            probe.path
        ));
    }
    let guard = InFlight {
        shared,
        path: probe.path.clone(),
    };
    blocking("disk", move || {
        let _guard = guard;
        report(&probe)
    })
    .await
}

/// Takes its path off the in-flight set when the measurement ends (or is dropped unrun).
struct InFlight {
    shared: Arc<Shared>,
    path: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        lock(&self.shared.disks_in_flight).remove(&self.path);
    }
}

fn report(probe: &DiskProbe) -> Outcome {
    let u = match measure(Path::new(&probe.path)) {
        Ok(u) => u,
        Err(why) => return Outcome::critical(headline("DISK", Status::Critical, &why)),
    };
    if u.total == 0 {
        // proc, sysfs and the like: nothing to measure, and 0% used would be a lie.
        return Outcome::unknown(headline(
            "DISK",
            Status::Unknown,
            &format!(
                "{} ({}) has no size to measure",
                u.mount_point.display(),
                u.fs_type.as_deref().unwrap_or("unknown filesystem")
            ),
        ));
    }
    let pct = u.used_pct();
    let status = above(pct, probe.warn, probe.crit);
    let mut o = Outcome::new(
        status,
        headline(
            "DISK",
            status,
            &format!(
                "{} {pct:.1}% used ({} of {}, {} available)",
                u.mount_point.display(),
                human_bytes(u.used),
                human_bytes(u.total),
                human_bytes(u.avail)
            ),
        ),
    );
    let mut on = format!("{} is on ", u.path.display());
    match (&u.device, &u.fs_type) {
        (Some(device), Some(fs_type)) => on.push_str(&format!("{device} ({fs_type}) ")),
        (Some(device), None) => on.push_str(&format!("{device} ")),
        _ => on.push_str("the filesystem "),
    }
    on.push_str(&format!("mounted on {}", u.mount_point.display()));
    if u.read_only {
        on.push_str(", read-only");
    }
    o.note(on);
    let reserved = u.total.saturating_sub(u.used).saturating_sub(u.avail);
    if reserved > 0 {
        o.note(format!(
            "{} reserved for root (counted neither as used nor as available)",
            human_bytes(reserved)
        ));
    }
    o.metrics
        .push(percent_metric("disk_used_pct", pct, probe.warn, probe.crit));
    o.metrics
        .push(bytes_metric("disk_used", u.used, Some(u.total)));
    o.metrics
        .push(bytes_metric("disk_avail", u.avail, Some(u.total)));
    o.metrics.push(bytes_metric("disk_total", u.total, None));
    if let Some(inodes) = u.inodes {
        let ipct = percent(inodes.used, inodes.total);
        o.note(format!(
            "inodes {ipct:.1}% used ({} of {})",
            inodes.used, inodes.total
        ));
        o.metrics
            .push(percent_metric("inodes_used_pct", ipct, None, None));
        o.metrics.push(outpost_protocol::Metric {
            min: Some(0.0),
            max: Some(inodes.total as f64),
            ..metric("inodes_used", inodes.used as f64, None)
        });
        o.metrics.push(outpost_protocol::Metric {
            min: Some(0.0),
            ..metric("inodes_total", inodes.total as f64, None)
        });
    }
    o
}

/// Measure the volume holding `path` (GetDiskFreeSpaceExW on the path itself, the
/// volume's mount point from GetVolumePathNameW). Windows has no inodes and no blocks
/// reserved for an administrator; quotas show as the difference between free and
/// available.
#[cfg(windows)]
pub(super) fn measure(path: &Path) -> Result<Usage, String> {
    use std::os::windows::ffi::{OsStrExt, OsStringExt};
    use windows_sys::Win32::Storage::FileSystem::{GetDiskFreeSpaceExW, GetVolumePathNameW};
    let shown = path.display();
    let canonical = std::fs::canonicalize(path).map_err(|e| format!("{shown}: {e}"))?;
    // `\\?\C:\x` → `C:\x` for display; UNC and device paths stay as they are.
    let canonical = match canonical.to_str().and_then(|p| p.strip_prefix(r"\\?\")) {
        Some(p) if p.as_bytes().get(1) == Some(&b':') => PathBuf::from(p),
        _ => canonical,
    };
    // The call wants a directory.
    let dir = if canonical.is_dir() {
        canonical.clone()
    } else {
        canonical.parent().unwrap_or(&canonical).to_path_buf()
    };
    let wide: Vec<u16> = dir
        .as_os_str()
        .encode_wide()
        .chain(std::iter::once(0))
        .collect();
    let (mut avail, mut total, mut free) = (0u64, 0u64, 0u64);
    // SAFETY: `wide` is NUL-terminated; the three outputs are valid u64 places.
    let ok = unsafe { GetDiskFreeSpaceExW(wide.as_ptr(), &mut avail, &mut total, &mut free) };
    if ok == 0 {
        return Err(format!(
            "{shown}: cannot measure: {}",
            std::io::Error::last_os_error()
        ));
    }
    let mut volume = [0u16; 1024];
    // SAFETY: the buffer is valid for the length given.
    let ok = unsafe { GetVolumePathNameW(wide.as_ptr(), volume.as_mut_ptr(), volume.len() as u32) };
    let mount_point = if ok != 0 {
        let end = volume.iter().position(|c| *c == 0).unwrap_or(volume.len());
        PathBuf::from(std::ffi::OsString::from_wide(&volume[..end]))
    } else {
        canonical
            .ancestors()
            .last()
            .unwrap_or(&canonical)
            .to_path_buf()
    };
    Ok(Usage {
        path: canonical,
        mount_point,
        device: None,
        fs_type: None,
        read_only: false,
        total,
        used: total.saturating_sub(free),
        avail,
        inodes: None,
    })
}

/// Measure the filesystem holding `path`. The error is the reason, naming the path.
#[cfg(unix)]
pub(super) fn measure(path: &Path) -> Result<Usage, String> {
    let shown = path.display();
    let canonical = std::fs::canonicalize(path).map_err(|e| format!("{shown}: {e}"))?;
    let st = statvfs(&canonical).map_err(|e| format!("{shown}: cannot measure: {e}"))?;
    let dev = std::fs::metadata(&canonical)
        .map_err(|e| format!("{shown}: {e}"))?
        .dev();

    let frsize = if st.f_frsize != 0 {
        wide(st.f_frsize)
    } else {
        wide(st.f_bsize)
    };
    let total = wide(st.f_blocks).saturating_mul(frsize);
    let free = wide(st.f_bfree).saturating_mul(frsize);
    let avail = wide(st.f_bavail).saturating_mul(frsize);
    let files = wide(st.f_files);
    let inodes = (files > 0).then(|| Inodes {
        total: files,
        used: files.saturating_sub(wide(st.f_ffree)),
    });

    // The mount table names device and type; when it is unreadable or its longest prefix
    // is not this filesystem after all, the mount point is found by walking up instead.
    let entry = std::fs::read("/proc/self/mounts")
        .ok()
        .and_then(|table| mount_entry(&table, &canonical))
        .filter(|m| std::fs::metadata(&m.mount_point).is_ok_and(|md| md.dev() == dev));
    let (mount_point, device, fs_type) = match entry {
        Some(m) => (m.mount_point, Some(m.device), Some(m.fs_type)),
        None => (mount_point_by_device(&canonical, dev), None, None),
    };
    Ok(Usage {
        path: canonical,
        mount_point,
        device,
        fs_type,
        read_only: wide(st.f_flag) & wide(libc::ST_RDONLY) != 0,
        total,
        used: total.saturating_sub(free),
        avail,
        inodes,
    })
}

#[cfg(unix)]
/// A `statvfs` field as u64, whatever its width on this platform.
fn wide(v: impl Into<u64>) -> u64 {
    v.into()
}

#[cfg(unix)]
fn statvfs(path: &Path) -> io::Result<libc::statvfs> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    loop {
        let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
        // SAFETY: `c_path` is NUL-terminated and `st` is a valid place for the result.
        let rc = unsafe { libc::statvfs(c_path.as_ptr(), st.as_mut_ptr()) };
        if rc == 0 {
            // SAFETY: statvfs succeeded, so it filled `st` in.
            return Ok(unsafe { st.assume_init() });
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(unix)]
#[derive(Debug, Clone, PartialEq)]
struct MountEntry {
    device: String,
    mount_point: PathBuf,
    fs_type: String,
}

#[cfg(unix)]
/// The entry of a `/proc/self/mounts` table whose mount point is the longest prefix of
/// `path`; of equal ones the last, which is mounted over the others.
fn mount_entry(table: &[u8], path: &Path) -> Option<MountEntry> {
    let mut best: Option<(usize, MountEntry)> = None;
    for line in table.split(|b| *b == b'\n') {
        let mut fields = line
            .split(|b| *b == b' ' || *b == b'\t')
            .filter(|f| !f.is_empty());
        let (Some(device), Some(mount_point), Some(fs_type)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let mount_point = PathBuf::from(OsStr::from_bytes(&unescape(mount_point)));
        if !path.starts_with(&mount_point) {
            continue;
        }
        let depth = mount_point.components().count();
        if best.as_ref().is_none_or(|(d, _)| depth >= *d) {
            best = Some((
                depth,
                MountEntry {
                    device: String::from_utf8_lossy(&unescape(device)).into_owned(),
                    mount_point,
                    fs_type: String::from_utf8_lossy(fs_type).into_owned(),
                },
            ));
        }
    }
    best.map(|(_, entry)| entry)
}

#[cfg(unix)]
/// Undo the mount table's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal = field.get(i + 1..i + 4).filter(|d| {
            field[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)) && d[0] <= b'3'
        });
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(field[i]);
                i += 1;
            }
        }
    }
    out
}

#[cfg(unix)]
/// The topmost ancestor of `path` still on device `dev`.
fn mount_point_by_device(path: &Path, dev: u64) -> PathBuf {
    let mut top = path;
    while let Some(parent) = top.parent() {
        match std::fs::metadata(parent) {
            Ok(md) if md.dev() == dev => top = parent,
            _ => break,
        }
    }
    top.to_path_buf()
}

#[cfg(all(test, unix))]
mod tests {
    use super::super::tests::find;
    use super::super::SystemProbes;
    use super::*;
    use outpost_protocol::probe::Probe;

    fn disk(path: &str, warn: Option<f64>, crit: Option<f64>) -> Probe {
        Probe::Disk(DiskProbe {
            path: path.into(),
            warn,
            crit,
        })
    }

    /// `statvfs` read independently of the code under test, as `df` would.
    fn df(path: &Path) -> (u64, u64, u64) {
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
        let frsize = wide(st.f_frsize);
        let total = wide(st.f_blocks) * frsize;
        let used = total - wide(st.f_bfree) * frsize;
        (total, used, wide(st.f_bavail) * frsize)
    }

    #[tokio::test]
    async fn tempdir_is_measured_like_df() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_str().unwrap().to_string();
        let o = SystemProbes::new().run(&disk(&path, None, None)).await;
        assert_eq!(o.status, Status::Ok, "{o:?}");

        let (total, used, avail) = df(dir.path());
        let tolerance = (total as f64 * 0.01).max(64.0 * 1024.0 * 1024.0);
        assert_eq!(find(&o, "disk_total").value, total as f64);
        let got_used = find(&o, "disk_used").value;
        assert!(
            (got_used - used as f64).abs() < tolerance,
            "{got_used} vs {used}"
        );
        let got_avail = find(&o, "disk_avail").value;
        assert!(
            (got_avail - avail as f64).abs() < tolerance,
            "{got_avail} vs {avail}"
        );
        let pct = find(&o, "disk_used_pct");
        let df_pct = used as f64 * 100.0 / (used + avail) as f64;
        assert!(
            (pct.value - df_pct).abs() < 1.0,
            "{} vs {df_pct}",
            pct.value
        );
        assert_eq!((pct.min, pct.max), (Some(0.0), Some(100.0)));
        assert_eq!(pct.unit.as_deref(), Some("%"));

        // The mount point reported is the root of the same filesystem.
        let u = measure(dir.path()).unwrap();
        let dev = std::fs::metadata(dir.path()).unwrap().dev();
        assert_eq!(std::fs::metadata(&u.mount_point).unwrap().dev(), dev);
        assert!(u.path.starts_with(&u.mount_point), "{u:?}");
        if let Some(parent) = u.mount_point.parent() {
            assert_ne!(
                std::fs::metadata(parent).unwrap().dev(),
                dev,
                "{} is not where the filesystem starts",
                u.mount_point.display()
            );
        }
        assert!(
            o.output
                .starts_with(&format!("DISK OK - {} ", u.mount_point.display())),
            "{}",
            o.output
        );
        assert!(o.output.contains("% used ("), "{}", o.output);
    }

    #[tokio::test]
    async fn thresholds_turn_it_warning_and_critical() {
        let probes = SystemProbes::new();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_str().unwrap();
        // Anything but an empty filesystem uses more than 0%.
        let o = probes.run(&disk(path, Some(0.0), None)).await;
        assert_eq!(o.status, Status::Warning, "{o:?}");
        assert!(o.output.starts_with("DISK WARNING - "), "{}", o.output);
        let o = probes.run(&disk(path, Some(0.0), Some(0.0))).await;
        assert_eq!(o.status, Status::Critical, "{o:?}");
        let m = find(&o, "disk_used_pct");
        assert_eq!(
            (m.warn.as_deref(), m.crit.as_deref()),
            (Some("0"), Some("0"))
        );
        let o = probes.run(&disk(path, Some(100.0), Some(100.0))).await;
        assert_eq!(o.status, Status::Ok, "{o:?}");
    }

    #[tokio::test]
    async fn missing_path_is_critical_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("not-here");
        let missing = missing.to_str().unwrap();
        let o = SystemProbes::new().run(&disk(missing, None, None)).await;
        assert_eq!(o.status, Status::Critical, "{o:?}");
        assert!(o.output.starts_with("DISK CRITICAL - "), "{}", o.output);
        assert!(o.output.contains(missing), "{}", o.output);
        assert!(o.output.contains("No such file"), "{}", o.output);
        assert!(o.metrics.is_empty());
    }

    #[tokio::test]
    async fn root_has_inodes_or_says_nothing_about_them() {
        let o = SystemProbes::new().run(&disk("/", None, None)).await;
        assert_ne!(o.status, Status::Unknown, "{o:?}");
        let c = CString::new("/").unwrap();
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
        if st.f_files > 0 {
            let files = wide(st.f_files);
            assert_eq!(find(&o, "inodes_total").value, files as f64);
            let used = find(&o, "inodes_used").value;
            let expected = (files - wide(st.f_ffree)) as f64;
            assert!((used - expected).abs() < 10_000.0, "{used} vs {expected}");
            assert!((0.0..=100.0).contains(&find(&o, "inodes_used_pct").value));
        } else {
            assert!(o.metrics.iter().all(|m| !m.name.starts_with("inodes")));
        }
    }

    #[tokio::test]
    async fn a_filesystem_without_size_is_unknown() {
        let o = SystemProbes::new()
            .run(&disk("/proc/self", None, None))
            .await;
        assert_eq!(o.status, Status::Unknown, "{o:?}");
        assert_eq!(
            o.output,
            "DISK UNKNOWN - /proc (proc) has no size to measure"
        );
    }

    #[test]
    fn mount_table_longest_prefix_wins() {
        let table = b"/dev/vda / ext4 rw 0 0\n\
            tmpfs /tmp tmpfs rw 0 0\n\
            /dev/vdb /tmp/my\\040data xfs rw 0 0\n\
            /dev/vdc /tmpfoo ext4 rw 0 0\n\
            /dev/vdd /tmp xfs rw 0 0\n";
        let e = mount_entry(table, Path::new("/tmp/x")).unwrap();
        // Mounted over the tmpfs: the later entry wins.
        assert_eq!((e.device.as_str(), e.fs_type.as_str()), ("/dev/vdd", "xfs"));
        let e = mount_entry(table, Path::new("/tmp/my data/y")).unwrap();
        assert_eq!(e.mount_point, Path::new("/tmp/my data"));
        // Prefixes are whole components.
        let e = mount_entry(table, Path::new("/tmpfoobar")).unwrap();
        assert_eq!(e.mount_point, Path::new("/"));
        assert_eq!(mount_entry(b"", Path::new("/x")), None);
        assert_eq!(unescape(b"a\\134b\\011c\\9xy\\"), b"a\\b\tc\\9xy\\");
    }

    #[test]
    fn walking_up_finds_the_filesystem_root() {
        let dir = tempfile::tempdir().unwrap();
        let dev = std::fs::metadata(dir.path()).unwrap().dev();
        let top = mount_point_by_device(&std::fs::canonicalize(dir.path()).unwrap(), dev);
        assert_eq!(std::fs::metadata(&top).unwrap().dev(), dev);
        if let Some(parent) = top.parent() {
            assert_ne!(std::fs::metadata(parent).unwrap().dev(), dev);
        }
    }

    #[tokio::test]
    async fn a_hanging_path_is_not_measured_twice() {
        let probes = SystemProbes::new();
        lock(&probes.shared.disks_in_flight).insert("/".into());
        let o = probes.run(&disk("/", None, None)).await;
        assert_eq!(o.status, Status::Unknown, "{o:?}");
        assert!(o.output.contains("has not returned yet"), "{}", o.output);
        lock(&probes.shared.disks_in_flight).remove("/");
        let o = probes.run(&disk("/", None, None)).await;
        assert_ne!(o.status, Status::Unknown, "{o:?}");
        // The measurement took itself off the set when it finished.
        assert!(lock(&probes.shared.disks_in_flight).is_empty());
    }
}
