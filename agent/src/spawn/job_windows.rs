//! Windows has no process groups: each program a check or collector starts is put in a
//! Job Object of its own, with `JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE`, so killing "the
//! group" (on a timeout, when the plugin exits, when the agent stops) terminates the
//! program and every process it started since. The jobs are kept by the program's pid,
//! which stands in for the Unix process-group id in [`super`]'s functions.
//!
//! The program is assigned to its job just after it was spawned (the standard library
//! cannot start it suspended): a child it starts in the first instant of its life, before
//! the assignment, escapes the job. Closing a job kills what is in it, so a job handle
//! the agent loses (the agent itself killed) still takes the plugins with it.

use outpost_sys::lock;
use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

use windows_sys::Win32::Foundation::{CloseHandle, HANDLE};
use windows_sys::Win32::System::JobObjects::{
    AssignProcessToJobObject, CreateJobObjectW, JobObjectBasicAccountingInformation,
    JobObjectExtendedLimitInformation, QueryInformationJobObject, SetInformationJobObject,
    TerminateJobObject, JOBOBJECT_BASIC_ACCOUNTING_INFORMATION,
    JOBOBJECT_EXTENDED_LIMIT_INFORMATION, JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE,
};

/// A job handle; closing it kills whatever is still in the job.
struct Job(HANDLE);

// SAFETY: a job handle may be used and closed from any thread.
unsafe impl Send for Job {}

impl Drop for Job {
    fn drop(&mut self) {
        // SAFETY: the handle came from CreateJobObjectW and is closed only here.
        unsafe {
            CloseHandle(self.0);
        }
    }
}

fn jobs() -> std::sync::MutexGuard<'static, HashMap<u32, Job>> {
    static JOBS: LazyLock<Mutex<HashMap<u32, Job>>> = LazyLock::new(Default::default);
    lock(&JOBS)
}

fn create(process: HANDLE) -> std::io::Result<Job> {
    // SAFETY: null attributes and name make an anonymous job with default security.
    let handle = unsafe { CreateJobObjectW(std::ptr::null(), std::ptr::null()) };
    if handle.is_null() {
        return Err(std::io::Error::last_os_error());
    }
    let job = Job(handle);
    // SAFETY: an all-zero JOBOBJECT_EXTENDED_LIMIT_INFORMATION is a valid "no limits".
    let mut info: JOBOBJECT_EXTENDED_LIMIT_INFORMATION = unsafe { std::mem::zeroed() };
    info.BasicLimitInformation.LimitFlags = JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE;
    // SAFETY: `info` is the structure the class names, with its size.
    let ok = unsafe {
        SetInformationJobObject(
            job.0,
            JobObjectExtendedLimitInformation,
            (&info as *const JOBOBJECT_EXTENDED_LIMIT_INFORMATION).cast(),
            std::mem::size_of::<JOBOBJECT_EXTENDED_LIMIT_INFORMATION>() as u32,
        )
    };
    if ok == 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both handles are valid; the process handle is the child's own.
    if unsafe { AssignProcessToJobObject(job.0, process) } == 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(job)
}

/// Put the just-spawned `child` in a job of its own; returns its pid (0 if it has none).
/// When the job cannot be made the program still runs, and only it (not its children)
/// is killed on a timeout; that is logged.
pub fn adopt(child: &tokio::process::Child) -> u32 {
    let Some(pid) = child.id() else {
        return 0;
    };
    let Some(process) = child.raw_handle() else {
        return pid;
    };
    match create(process as HANDLE) {
        // A job left under the same pid belongs to a process that is gone: dropping it
        // kills whatever it still held.
        Ok(job) => drop(jobs().insert(pid, job)),
        Err(e) => {
            tracing::warn!(pid, error = %e, "cannot put the program in a job object; a timeout will kill only the program, not its children")
        }
    }
    pid
}

/// Terminate everything in the job of `pid` and forget the job.
pub fn kill(pid: u32) {
    let Some(job) = jobs().remove(&pid) else {
        return;
    };
    // SAFETY: the handle is a live job handle owned by `job`.
    unsafe {
        TerminateJobObject(job.0, 1);
    }
}

/// Whether the job of `pid` still holds a running process.
pub fn alive(pid: u32) -> bool {
    let map = jobs();
    let Some(job) = map.get(&pid) else {
        return false;
    };
    // SAFETY: an all-zero accounting structure is valid to be filled in.
    let mut info: JOBOBJECT_BASIC_ACCOUNTING_INFORMATION = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is the structure the class names, with its size.
    let ok = unsafe {
        QueryInformationJobObject(
            job.0,
            JobObjectBasicAccountingInformation,
            (&mut info as *mut JOBOBJECT_BASIC_ACCOUNTING_INFORMATION).cast(),
            std::mem::size_of::<JOBOBJECT_BASIC_ACCOUNTING_INFORMATION>() as u32,
            std::ptr::null_mut(),
        )
    };
    ok != 0 && info.ActiveProcesses > 0
}
