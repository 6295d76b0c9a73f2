//! Host facilities shared by the agent and the gateway: writing state files atomically,
//! the wall clock in the unit the protocol uses, logging setup, and waiting for a
//! shutdown signal.
//! Not here: anything about the protocol (see `outpost-protocol`) or either side's logic.

use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// Unix time in milliseconds (0 if the clock is before 1970).
/// Lock `m`, taking the data as it is when a thread panicked while holding it: every
/// critical section in Outpost leaves its data consistent at each step (a panic there is a
/// bug to fix, not a reason to stop every other thread).
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Write `bytes` to `path` atomically: a temp file in the same directory, created with
/// `mode` before any data is written, fsynced, renamed over `path`, then the directory
/// fsynced. Readers see the old content or the new, never a mix; a crash leaves at most a
/// stray temp file.
///
/// On Windows a private `mode` (nothing for group or others, e.g. 0600) gives the file a
/// protected ACL before any data is written: full control for SYSTEM, Administrators and
/// the file's owner, nothing inherited (so not the Users' read access that
/// `C:\ProgramData` hands down); any other mode leaves the ACL inherited. A directory
/// cannot be opened to be fsynced there, so only the file is.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("state"),
        std::process::id()
    ));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut f = options.open(&tmp)?;
    #[cfg(windows)]
    if mode & 0o077 == 0 {
        if let Err(e) = restrict_to_owner_and_admins(&tmp) {
            drop(f);
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    }
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    #[cfg(unix)]
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// Replace the ACL of `path` with a protected one: full control for SYSTEM (SY),
/// Administrators (BA) and the owner (OW), nothing inherited.
#[cfg(windows)]
fn restrict_to_owner_and_admins(path: &Path) -> std::io::Result<()> {
    use std::os::windows::ffi::OsStrExt;
    use windows_sys::Win32::Foundation::LocalFree;
    use windows_sys::Win32::Security::Authorization::{
        ConvertStringSecurityDescriptorToSecurityDescriptorW, SDDL_REVISION_1,
    };
    use windows_sys::Win32::Security::{
        SetFileSecurityW, DACL_SECURITY_INFORMATION, PROTECTED_DACL_SECURITY_INFORMATION,
        PSECURITY_DESCRIPTOR,
    };
    let sddl: Vec<u16> = "D:P(A;;FA;;;SY)(A;;FA;;;BA)(A;;FA;;;OW)"
        .encode_utf16()
        .chain(Some(0))
        .collect();
    let file: Vec<u16> = path.as_os_str().encode_wide().chain(Some(0)).collect();
    let mut sd: PSECURITY_DESCRIPTOR = std::ptr::null_mut();
    // SAFETY: `sddl` is NUL-terminated; `sd` receives a LocalAlloc'd descriptor.
    let ok = unsafe {
        ConvertStringSecurityDescriptorToSecurityDescriptorW(
            sddl.as_ptr(),
            SDDL_REVISION_1,
            &mut sd,
            std::ptr::null_mut(),
        )
    };
    if ok == 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `file` is NUL-terminated and `sd` a valid descriptor, freed right after.
    let ok = unsafe {
        SetFileSecurityW(
            file.as_ptr(),
            DACL_SECURITY_INFORMATION | PROTECTED_DACL_SECURITY_INFORMATION,
            sd,
        )
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: `sd` came from LocalAlloc inside the conversion above.
    unsafe {
        LocalFree(sd.cast());
    }
    if ok == 0 {
        return Err(err);
    }
    Ok(())
}

/// Log to stderr at the level `RUST_LOG` sets (default `info`), in colour only on a terminal.
///
/// A log line that cannot be written (stderr on a full disk, a closed pipe) is dropped:
/// the subscriber's own report of it would be an `eprintln!`, which panics when stderr
/// fails, in whatever thread logged (found by `tests/tests/chaos.rs`: the gateway's bus
/// writer died that way with its disk full, and the gateway stored nothing again).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .log_internal_errors(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Log to `file` (a service has no console) at the level `RUST_LOG` sets (default
/// `info`), without colour.
pub fn init_logging_to(file: std::fs::File) {
    tracing_subscriber::fmt()
        .log_internal_errors(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::sync::Mutex::new(file))
        .with_ansi(false)
        .init();
}

/// Resolve on SIGTERM or SIGINT (Ctrl-C); on Windows on Ctrl-C, Ctrl-Break, the console
/// closing or the system shutting down (a service is stopped by its control handler
/// instead, see the agent's `service` module).
#[cfg(windows)]
pub async fn shutdown_signal() {
    use tokio::signal::windows;
    match (
        windows::ctrl_c(),
        windows::ctrl_break(),
        windows::ctrl_close(),
        windows::ctrl_shutdown(),
    ) {
        (Ok(mut c), Ok(mut b), Ok(mut close), Ok(mut shut)) => {
            tokio::select! {
                _ = c.recv() => {}
                _ = b.recv() => {}
                _ = close.recv() => {}
                _ = shut.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Resolve on SIGTERM or SIGINT (Ctrl-C).
#[cfg(unix)]
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn atomic_write_replaces_content_with_the_given_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.json");
        write_atomic(&path, b"one", 0o600).unwrap();
        write_atomic(&path, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("sub")).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temp file left behind");
    }
}
