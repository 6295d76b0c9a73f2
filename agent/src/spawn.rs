//! Starting a program in its own process group, and signalling or killing that whole group:
//! what exec checks, daemon checks and collectors share. A program gets no shell, a closed
//! stdin, piped output and a cleared environment.
//!
//! On Windows a Job Object stands in for the process group ([`job_windows`]): the pid
//! names the job, and every "signal" to the group terminates the job.

#[cfg(windows)]
mod job_windows;

use std::process::{ExitStatus, Stdio};

use tokio::process::Command;

#[cfg(unix)]
pub(crate) const SIGTERM: i32 = libc::SIGTERM;
#[cfg(unix)]
pub(crate) const SIGKILL: i32 = libc::SIGKILL;
#[cfg(windows)]
pub(crate) const SIGTERM: i32 = 15;
#[cfg(windows)]
pub(crate) const SIGKILL: i32 = 9;

/// The id that names the process group of a child just spawned by [`command`]: its pid,
/// which leads its group (on Windows: the job it was just put in).
pub(crate) fn adopt(child: &tokio::process::Child) -> u32 {
    #[cfg(windows)]
    return job_windows::adopt(child);
    #[cfg(unix)]
    child.id().unwrap_or(0)
}

/// Whether anything of the group `pgid` still runs (Windows; Unix asks `/proc`, see
/// [`crate::supervise::group_exists`]).
#[cfg(windows)]
pub(crate) fn group_alive(pgid: u32) -> bool {
    job_windows::alive(pgid)
}

/// How a program ended: the signal that killed it, if one did (never on Windows).
pub fn signal_of(status: ExitStatus) -> Option<i32> {
    #[cfg(unix)]
    return std::os::unix::process::ExitStatusExt::signal(&status);
    #[cfg(not(unix))]
    {
        let _ = status;
        None
    }
}

pub(crate) fn kill_group(pgid: u32) {
    signal_group(pgid, SIGKILL);
}

/// Send `sig` to the plugin's process group. Windows has no signals for windowless
/// programs: any `sig` terminates the job.
#[cfg(windows)]
pub(crate) fn signal_group(pgid: u32, _sig: i32) {
    job_windows::kill(pgid);
}

/// Send `sig` to the plugin's process group.
#[cfg(unix)]
pub(crate) fn signal_group(pgid: u32, sig: i32) {
    if pgid == 0 || pgid > i32::MAX as u32 {
        return;
    }
    // SAFETY: kill(2) with a negative pid signals a process group; no memory is involved.
    // The group was created for this plugin (process_group(0)), so it holds nothing else.
    unsafe {
        libc::kill(-(pgid as i32), sig);
    }
}

/// Kills the plugin's process group when dropped, however the run ends: finished,
/// timed out, or abandoned because the agent is stopping.
pub(crate) struct GroupGuard(pub(crate) u32);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        kill_group(self.0);
    }
}

/// Environment variables a plugin may see; everything else (the agent's own settings,
/// its enrollment key among them) is withheld.
#[cfg(unix)]
const PASSED_ENV: &[&str] = &["PATH", "HOME", "TZ", "USER", "LOGNAME", "TMPDIR", "LANG"];
/// The same on Windows, where programs also need the system's location (`SystemRoot`,
/// without which Winsock and PowerShell fail), `PATHEXT` and `COMSPEC` to run scripts, and
/// the standard folders.
#[cfg(windows)]
const PASSED_ENV: &[&str] = &[
    "PATH",
    "PATHEXT",
    "SystemRoot",
    "SystemDrive",
    "windir",
    "COMSPEC",
    "TEMP",
    "TMP",
    "ProgramData",
    "ProgramFiles",
    "ProgramFiles(x86)",
    "ProgramW6432",
    "CommonProgramFiles",
    "ALLUSERSPROFILE",
    "USERPROFILE",
    "USERNAME",
    "COMPUTERNAME",
    "NUMBER_OF_PROCESSORS",
    "PROCESSOR_ARCHITECTURE",
    "PSModulePath",
    "TZ",
];

/// The program a check runs, ready to spawn: its own process group, stdin closed, stdout
/// and stderr piped, a cleared environment, killed if the handle is dropped.
pub fn command(argv: &[String]) -> Result<Command, String> {
    let Some((program, args)) = argv.split_first() else {
        return Err("check has an empty command".into());
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    #[cfg(unix)]
    cmd.process_group(0);
    // A console Ctrl-C meant for the agent does not reach the plugin (a new group), and a
    // plugin started by the service gets no console window.
    #[cfg(windows)]
    cmd.creation_flags(
        windows_sys::Win32::System::Threading::CREATE_NEW_PROCESS_GROUP
            | windows_sys::Win32::System::Threading::CREATE_NO_WINDOW,
    );
    cmd.env_clear()
        .envs(
            PASSED_ENV
                .iter()
                .filter_map(|k| std::env::var_os(k).map(|v| (*k, v))),
        )
        .env("LC_ALL", "C");
    #[cfg(unix)]
    if std::env::var_os("PATH").is_none() {
        cmd.env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
    }
    Ok(cmd)
}
