//! Unix: put a verified binary in place by rename, try it as a child, then `exec` it or
//! rename the previous binary back.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost_protocol::Status;

use super::{AfterRun, Staged, State, DONE_ENV, FROM_ENV, TRIAL_ENV};

fn sibling(exe: &Path, name: impl FnOnce(&str) -> String) -> PathBuf {
    let file = exe
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "outpost-agent".into());
    exe.with_file_name(name(&file))
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path.parent().unwrap_or(Path::new(".")))?.sync_all()
}

/// Write `bytes` beside `exe` (mode 0755, fsynced), keep the running binary as
/// `<exe>.previous` (a hard link, or a copy), then rename the new one over `exe`.
/// Returns the previous binary's path.
pub fn stage(bytes: &[u8], exe: &Path) -> std::io::Result<PathBuf> {
    let new = sibling(exe, |f| format!(".{f}.new"));
    let previous = sibling(exe, |f| format!("{f}.previous"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o755)
        .open(&new)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    let _ = std::fs::remove_file(&previous);
    if std::fs::hard_link(exe, &previous).is_err() {
        std::fs::copy(exe, &previous)?;
    }
    std::fs::rename(&new, exe)?;
    sync_dir(exe)?;
    Ok(previous)
}

/// Put the previous binary back.
fn restore(staged: &Staged) -> std::io::Result<()> {
    std::fs::rename(&staged.previous, &staged.exe)?;
    sync_dir(&staged.exe)
}

enum Trial {
    Healthy,
    Failed(String),
    Stopped,
}

/// Stop the child: SIGTERM, then SIGKILL after a grace period.
async fn stop_child(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(pid as i32, libc::SIGTERM);
        }
    }
    if tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

async fn trial(staged: &Staged, marker: &Path, deadline: Duration) -> Trial {
    let _ = std::fs::remove_file(marker);
    let mut child = match tokio::process::Command::new(&staged.exe)
        .args(std::env::args_os().skip(1))
        .env(TRIAL_ENV, marker)
        .env(FROM_ENV, &staged.from)
        .env_remove(DONE_ENV)
        .kill_on_drop(true)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return Trial::Failed(format!("it cannot be started: {e}")),
    };
    tokio::select! {
        status = child.wait() => match status {
            Ok(s) if s.success() && marker.exists() => Trial::Healthy,
            Ok(s) => Trial::Failed(format!("it exited ({s}) before it connected and had a result acked")),
            Err(e) => Trial::Failed(format!("cannot wait for it: {e}")),
        },
        _ = tokio::time::sleep(deadline) => {
            stop_child(&mut child).await;
            Trial::Failed(format!("it did not connect and have a result acked within {}s", deadline.as_secs()))
        }
        _ = outpost_sys::shutdown_signal() => {
            stop_child(&mut child).await;
            Trial::Stopped
        }
    }
}

/// Try the staged binary; `exec` it when healthy, otherwise roll back.
pub fn finish(staged: Staged) -> AfterRun {
    let state = State::new(&staged.state_dir);
    let marker = state.marker();
    if let Some(dir) = marker.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let deadline = super::trial_deadline();
    tracing::info!(from = %staged.from, to = %staged.to, deadline_secs = deadline.as_secs(), "starting the new binary on trial");
    let outcome = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(trial(&staged, &marker, deadline)),
        Err(e) => Trial::Failed(format!("cannot start a runtime to supervise it: {e}")),
    };
    let _ = std::fs::remove_file(&marker);
    let why = match outcome {
        Trial::Healthy => {
            tracing::info!(to = %staged.to, "trial passed; restarting as the new binary");
            let err = std::process::Command::new(&staged.exe)
                .args(std::env::args_os().skip(1))
                .env(DONE_ENV, &staged.from)
                .env_remove(TRIAL_ENV)
                .env_remove(FROM_ENV)
                .exec();
            format!("it passed its trial but cannot be executed: {err}")
        }
        Trial::Failed(why) => why,
        Trial::Stopped => {
            let _ = restore(&staged);
            let _ = state.set_report(
                Status::Warning,
                &format!(
                    "update from {} to {} interrupted by a stop during its trial; rolled back",
                    staged.from, staged.to
                ),
            );
            tracing::info!("stopped during the trial; the previous binary is back in place");
            return AfterRun::Exit;
        }
    };
    tracing::error!(from = %staged.from, to = %staged.to, reason = %why, "new binary failed its trial; rolling back");
    if let Err(e) = restore(&staged) {
        tracing::error!(error = %e, previous = %staged.previous.display(), "cannot put the previous binary back; restore it by hand");
    }
    if let Err(e) = state.add_bad(&staged.to, &why) {
        tracing::error!(error = %e, "cannot record the bad version");
    }
    if let Err(e) = state.set_report(
        Status::Warning,
        &format!("rolled back from {} to {}: {why}", staged.to, staged.from),
    ) {
        tracing::error!(error = %e, "cannot record the rollback for reporting");
    }
    AfterRun::RunAgain
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_swaps_by_rename_and_restore_puts_it_back() {
        let tmp = tempfile::tempdir().unwrap();
        let exe = tmp.path().join("outpost-agent");
        std::fs::write(&exe, b"old").unwrap();
        let previous = stage(b"new", &exe).unwrap();
        assert_eq!(std::fs::read(&exe).unwrap(), b"new");
        assert_eq!(std::fs::read(&previous).unwrap(), b"old");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&exe).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert!(!tmp.path().join(".outpost-agent.new").exists());
        let staged = Staged {
            from: "1".into(),
            to: "2".into(),
            exe: exe.clone(),
            previous,
            state_dir: tmp.path().into(),
        };
        restore(&staged).unwrap();
        assert_eq!(std::fs::read(&exe).unwrap(), b"old");
    }

    fn script(dir: &Path, body: &str) -> Staged {
        use std::os::unix::fs::PermissionsExt;
        let exe = dir.join("outpost-agent");
        std::fs::write(&exe, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        Staged {
            from: "1".into(),
            to: "2".into(),
            exe,
            previous: dir.join("outpost-agent.previous"),
            state_dir: dir.into(),
        }
    }

    #[tokio::test]
    async fn the_trial_needs_the_marker_and_a_clean_exit_in_time() {
        let tmp = tempfile::tempdir().unwrap();
        let marker = tmp.path().join("marker");
        let t = Duration::from_secs(5);
        let healthy = script(tmp.path(), "echo ok > \"$OUTPOST_UPDATE_TRIAL\"; exit 0");
        assert!(matches!(trial(&healthy, &marker, t).await, Trial::Healthy));
        let crash = script(tmp.path(), "exit 1");
        match trial(&crash, &marker, t).await {
            Trial::Failed(why) => assert!(why.contains("exit status: 1"), "{why}"),
            _ => panic!("a crash passed the trial"),
        }
        let no_marker = script(tmp.path(), "exit 0");
        assert!(matches!(
            trial(&no_marker, &marker, t).await,
            Trial::Failed(_)
        ));
        let hang = script(tmp.path(), "exec sleep 60");
        let started = std::time::Instant::now();
        match trial(&hang, &marker, Duration::from_secs(1)).await {
            Trial::Failed(why) => assert!(why.contains("within 1s"), "{why}"),
            _ => panic!("a hung binary passed the trial"),
        }
        assert!(started.elapsed() < Duration::from_secs(8));
    }
}
