//! Self-update: when the gateway offers a version (an `update` frame), fetch the signed
//! manifest, check everything, and only then put the new binary in place, try it, and keep
//! it or roll back. Not the installer (that is `installer/install.sh`) and not the
//! gateway's side (`outpost-gateway release`, `gateway/src/rollout.rs`).
//!
//! Order of checks, each refusing with a clear `outpost.update` WARNING result and the
//! running binary untouched: the version parses and is not lower than the highest this
//! agent has run (kept in `STATE/update/highest`); it is not one that was rolled back here
//! before (`STATE/update/bad`); the manifest's signature verifies with the release key
//! (built in, or a root-owned override file); the manifest lists that version for this
//! build's target; the download stays within the signed size and a deadline; its size and
//! sha256 are the signed ones; it is an executable for this machine. Only then is it
//! written (next to the running binary, mode 0755, fsynced) and renamed over it, the old
//! one kept as `<exe>.previous`.
//!
//! Then the agent stops (no `bye`: it is coming back), closes its outbox, and starts the
//! new binary as a child in trial mode ([`TRIAL_ENV`]). The child is healthy once it is
//! welcomed by the gateway and the result it queued at start is acked, and (when it has
//! checks) a later result too; it writes a marker and exits. The parent then `exec`s the new binary (same PID, so systemd and OpenRC
//! keep tracking it). If the child exits without the marker (a crash at start included)
//! or runs past the trial deadline, the parent kills it, renames the previous binary
//! back, records the version as bad, and runs on, reporting "rolled back from X".
//! See `docs/UPDATES.md`.

mod download;
#[cfg(unix)]
mod swap;

use outpost_sys::lock;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use outpost_protocol::update::{self as proto, Version};
use outpost_protocol::{CheckResult, Status};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

pub use download::DownloadError;

use crate::outbox::Outbox;
use crate::version::{AGENT_TARGET, AGENT_VERSION};

/// The check under which the agent reports updates.
pub const UPDATE_CHECK: &str = "outpost.update";
/// Set (to the health marker's path) for a new binary started on trial.
pub const TRIAL_ENV: &str = "OUTPOST_UPDATE_TRIAL";
/// Set for the trial child: the version it replaces.
pub const FROM_ENV: &str = "OUTPOST_UPDATE_FROM";
/// Set for the binary exec'd after a good trial: the version it replaced.
pub const DONE_ENV: &str = "OUTPOST_UPDATE_DONE";
/// Path of a root-owned file holding the release key to use instead of the built-in one.
pub const KEY_ENV: &str = "OUTPOST_UPDATE_KEY";
/// Used instead of the built-in key when present (and owned by root).
pub const DEFAULT_KEY_PATH: &str = "/etc/outpost/update-key.pub";
/// Seconds a new binary has to connect and get a result acked (default 90).
pub const TRIAL_SECS_ENV: &str = "OUTPOST_UPDATE_TRIAL_SECS";
const TRIAL_DEFAULT: Duration = Duration::from_secs(90);
const MANIFEST_DEADLINE: Duration = Duration::from_secs(30);
const BINARY_DEADLINE: Duration = Duration::from_secs(300);

/// The release verification key this agent is built with.
pub const BUILTIN_KEY: &str = include_str!("../../installer/release-key.pub");

/// The path this process was started from, read once: after a swap `/proc/self/exe`
/// no longer names it.
pub fn exe_path() -> Result<PathBuf, String> {
    static EXE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    EXE.get_or_init(|| {
        std::env::current_exe()
            .map_err(|e| format!("cannot tell where this agent's binary is: {e}"))
    })
    .clone()
}

/// How long a new binary has on trial.
pub fn trial_deadline() -> Duration {
    std::env::var(TRIAL_SECS_ENV)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map(|s| Duration::from_secs(s.clamp(5, 3600)))
        .unwrap_or(TRIAL_DEFAULT)
}

/// The release key: the override file if one is configured or present, else the built-in.
pub fn verification_key() -> Result<ed25519_dalek::VerifyingKey, String> {
    let (path, configured) = match std::env::var_os(KEY_ENV) {
        Some(p) => (PathBuf::from(p), true),
        None => (PathBuf::from(DEFAULT_KEY_PATH), false),
    };
    if !configured && !path.exists() {
        return proto::parse_public_key(BUILTIN_KEY)
            .map_err(|e| format!("the built-in release key is broken: {e}"));
    }
    check_key_owner(&path)?;
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read the release key {}: {e}", path.display()))?;
    proto::parse_public_key(&text).map_err(|e| format!("release key {}: {e}", path.display()))
}

#[cfg(unix)]
fn check_key_owner(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)
        .map_err(|e| format!("cannot read the release key {}: {e}", path.display()))?;
    if m.uid() != 0 || m.mode() & 0o022 != 0 {
        return Err(format!(
            "release key override {} must be owned by root and not group- or world-writable (it is uid {}, mode {:o}); refusing it",
            path.display(),
            m.uid(),
            m.mode() & 0o777
        ));
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_key_owner(path: &Path) -> Result<(), String> {
    Err(format!(
        "release key overrides are not supported on this platform; remove {}",
        path.display()
    ))
}

/// What the agent keeps about updates in `STATE/update/`.
pub struct State {
    dir: PathBuf,
}

impl State {
    pub fn new(state_dir: &Path) -> State {
        State {
            dir: state_dir.join("update"),
        }
    }

    fn write(&self, name: &str, text: &str) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        outpost_sys::write_atomic(&self.dir.join(name), text.as_bytes(), 0o600)
    }

    fn read(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(self.dir.join(name)).ok()
    }

    /// The highest version this agent has run.
    pub fn highest(&self) -> Option<Version> {
        Version::parse(self.read("highest")?.trim()).ok()
    }

    /// Raise the highest version seen to `v` (never lowers it).
    pub fn saw(&self, v: &Version) -> std::io::Result<()> {
        if self.highest().is_some_and(|h| h.cmp_numeric(v).is_ge()) {
            return Ok(());
        }
        self.write("highest", &format!("{v}\n"))
    }

    /// Versions rolled back on this host, with why.
    pub fn bad(&self, v: &Version) -> Option<String> {
        self.read("bad")?.lines().find_map(|l| {
            let (ver, why) = l.split_once(' ').unwrap_or((l, ""));
            Version::parse(ver)
                .is_ok_and(|b| b.cmp_numeric(v).is_eq())
                .then(|| why.to_string())
        })
    }

    pub fn add_bad(&self, v: &str, why: &str) -> std::io::Result<()> {
        let mut text = self.read("bad").unwrap_or_default();
        text.push_str(&format!("{v} {}\n", why.replace('\n', " ")));
        self.write("bad", &text)
    }

    /// A result to report on the next start (set across a rollback).
    pub fn set_report(&self, status: Status, output: &str) -> std::io::Result<()> {
        let status = serde_json::to_string(&status).unwrap_or_default();
        self.write("report", &format!("{status}\n{output}"))
    }

    fn take_report(&self) -> Option<(Status, String)> {
        let text = self.read("report")?;
        let _ = std::fs::remove_file(self.dir.join("report"));
        let (status, output) = text.split_once('\n')?;
        Some((serde_json::from_str(status).ok()?, output.to_string()))
    }

    #[cfg(unix)]
    fn marker(&self) -> PathBuf {
        self.dir.join("trial-healthy")
    }
}

/// A verified new binary, renamed into place; the old one is at `previous`.
#[derive(Debug, Clone)]
pub struct Staged {
    pub from: String,
    pub to: String,
    pub exe: PathBuf,
    pub previous: PathBuf,
    pub state_dir: PathBuf,
}

/// The update side of a running agent, shared with the connection.
pub struct Updater {
    tls: Arc<rustls::ClientConfig>,
    host: String,
    state_dir: PathBuf,
    state: State,
    outbox: Arc<dyn Outbox>,
    /// The agent's stop: cancelled to hand over to a new binary.
    stop: CancellationToken,
    gateway: Mutex<Option<SocketAddr>>,
    busy: AtomicBool,
    handing_over: AtomicBool,
    staged: Mutex<Option<Staged>>,
    /// On trial: the marker to write, and the result whose ack proves health.
    trial: Option<(PathBuf, u64)>,
    /// Versions whose refusal was reported by this process already.
    told: Mutex<HashSet<String>>,
}

fn result(status: Status, output: String) -> CheckResult {
    CheckResult {
        started_at_ms: crate::util::now_ms(),
        ..CheckResult::new(UPDATE_CHECK, status, output)
    }
}

impl Updater {
    /// Set up; queue what there is to report (a rollback, a finished update, a trial).
    pub fn new(
        settings: &crate::Settings,
        tls: Arc<rustls::ClientConfig>,
        outbox: Arc<dyn Outbox>,
        stop: CancellationToken,
    ) -> Arc<Updater> {
        let state = State::new(&settings.paths.state_dir);
        let _ = exe_path();
        let mut queue = Vec::new();
        if let Some((status, output)) = state.take_report() {
            queue.push(result(status, output));
        }
        let on_trial = std::env::var_os(TRIAL_ENV).map(PathBuf::from);
        if on_trial.is_some() {
            let from = std::env::var(FROM_ENV).unwrap_or_default();
            queue.push(result(
                Status::Ok,
                format!("running {AGENT_VERSION} on trial (updating from {from})"),
            ));
        } else {
            if let Ok(v) = Version::parse(AGENT_VERSION) {
                if let Err(e) = state.saw(&v) {
                    tracing::error!(error = %e, "cannot record the agent version in the state directory");
                }
            }
            // Once per process: after a rollback of a later update, the agent runs again
            // in the same process with the same environment.
            static DONE_REPORTED: AtomicBool = AtomicBool::new(false);
            if let Some(from) = std::env::var(DONE_ENV)
                .ok()
                .filter(|_| !DONE_REPORTED.swap(true, Ordering::SeqCst))
            {
                queue.push(result(
                    Status::Ok,
                    format!("updated from {from} to {AGENT_VERSION}"),
                ));
            }
        }
        let mut last = 0;
        for r in queue {
            match crate::outbox::blocking(|| outbox.append(r)) {
                Ok(seq) => last = seq,
                Err(e) => tracing::error!(error = %e, "cannot queue an update result"),
            }
        }
        let trial = on_trial.map(|marker| (marker, last));
        if trial.is_some() {
            tracing::info!(version = AGENT_VERSION, "on trial after an update");
        }
        Arc::new(Updater {
            tls,
            host: settings.host.clone(),
            state_dir: settings.paths.state_dir.clone(),
            state,
            outbox,
            stop,
            gateway: Mutex::new(None),
            busy: AtomicBool::new(false),
            handing_over: AtomicBool::new(false),
            staged: Mutex::new(None),
            trial,
            told: Mutex::new(HashSet::new()),
        })
    }

    /// The agent is stopping to hand over to a new binary: no `bye`.
    pub fn handing_over(&self) -> bool {
        self.handing_over.load(Ordering::SeqCst)
    }

    /// The staged update, once the agent stopped for it.
    pub fn take_staged(&self) -> Option<Staged> {
        lock(&self.staged).take()
    }

    /// The address of the gateway this session reached; downloads go there.
    pub fn connected_to(&self, addr: SocketAddr) {
        *lock(&self.gateway) = Some(addr);
    }

    /// The gateway acked up to `seq`. On trial, health is the ack of the first result this
    /// binary queued and, when it has checks (`has_checks`), of a later one: it connected,
    /// was welcomed, and ran its checks and delivered what they produced.
    pub fn on_ack(&self, seq: u64, has_checks: impl FnOnce() -> bool) {
        let Some((marker, first)) = &self.trial else {
            return;
        };
        if seq < *first || self.handing_over() || (seq == *first && has_checks()) {
            return;
        }
        match std::fs::write(marker, AGENT_VERSION) {
            Ok(()) => {
                tracing::info!(
                    version = AGENT_VERSION,
                    "trial passed: connected and results acked; handing back to the updater"
                );
                self.handing_over.store(true, Ordering::SeqCst);
                self.stop.cancel();
            }
            Err(e) => {
                tracing::error!(marker = %marker.display(), error = %e, "cannot write the trial's health marker")
            }
        }
    }

    /// The gateway says this agent should run `version`.
    pub fn offer(self: &Arc<Self>, version: String) {
        if self.trial.is_some() || version == AGENT_VERSION {
            return;
        }
        if self.busy.swap(true, Ordering::SeqCst) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let outcome = me.attempt(&version).await;
            match outcome {
                Ok(None) => {}
                Ok(Some(staged)) => {
                    tracing::info!(from = %staged.from, to = %staged.to, "new binary in place; stopping to try it");
                    *lock(&me.staged) = Some(staged);
                    me.handing_over.store(true, Ordering::SeqCst);
                    me.stop.cancel();
                    return;
                }
                Err(why) => {
                    let first = lock(&me.told).insert(format!("{version} {why}"));
                    tracing::warn!(%version, error = %why, "update refused");
                    if first {
                        let r = result(
                            Status::Warning,
                            format!("update to {version} refused: {why}"),
                        );
                        if let Err(e) = me.outbox.append(r) {
                            tracing::error!(error = %e, "cannot queue the update result");
                        }
                    }
                }
            }
            me.busy.store(false, Ordering::SeqCst);
        });
    }

    async fn get(&self, path: &str, cap: u64, deadline: Duration) -> Result<Vec<u8>, String> {
        let addr = lock(&self.gateway).ok_or("not connected to a gateway")?;
        download::get(self.tls.clone(), addr, &self.host, path, cap, deadline)
            .await
            .map_err(|e| e.to_string())
    }

    /// Every check, in order; `Ok(None)` when there is nothing to do.
    async fn attempt(&self, offered: &str) -> Result<Option<Staged>, String> {
        let want = Version::parse(offered).map_err(|e| format!("the gateway offered {e}"))?;
        let own = Version::parse(AGENT_VERSION).map_err(|_| {
            format!(
                "this build's version {AGENT_VERSION:?} is not numeric, so it cannot be compared"
            )
        })?;
        if want.cmp_numeric(&own).is_eq() {
            return Ok(None);
        }
        let highest = self.state.highest().filter(|h| *h > own).unwrap_or(own);
        if want.cmp_numeric(&highest).is_lt() {
            return Err(format!(
                "{want} is lower than {highest}, the highest version this agent has run; downgrades are refused"
            ));
        }
        if let Some(why) = self.state.bad(&want) {
            return Err(format!(
                "{want} was rolled back on this host before ({why}); publish a newer version"
            ));
        }
        if !cfg!(unix) {
            return Err("self-update is not supported on this platform yet; upgrade with the installer (MSI)".into());
        }
        let key = verification_key()?;
        let manifest = self
            .get(
                proto::MANIFEST_PATH,
                proto::MAX_MANIFEST_BYTES,
                MANIFEST_DEADLINE,
            )
            .await?;
        let sig = self
            .get(
                proto::MANIFEST_SIG_PATH,
                proto::MAX_SIG_BYTES,
                MANIFEST_DEADLINE,
            )
            .await
            .map_err(|e| {
                format!("cannot fetch the manifest signature ({e}); unsigned releases are refused")
            })?;
        let manifest = proto::verify_manifest(&manifest, &sig, &key).map_err(|e| e.to_string())?;
        let release = manifest.find(&want, AGENT_TARGET).ok_or_else(|| {
            let targets: Vec<&str> = manifest
                .releases
                .iter()
                .filter(|r| Version::parse(&r.version).is_ok_and(|v| v.cmp_numeric(&want).is_eq()))
                .map(|r| r.target.as_str())
                .collect();
            format!(
                "the signed manifest has no build of {want} for this agent's target {AGENT_TARGET} (it has: {})",
                if targets.is_empty() { "none".to_string() } else { targets.join(", ") }
            )
        })?;
        let bytes = self
            .get(
                &proto::release_path(&release.version, &release.file),
                release.size,
                BINARY_DEADLINE,
            )
            .await?;
        if bytes.len() as u64 != release.size {
            return Err(format!(
                "the download is truncated: {} bytes, the signed size is {}",
                bytes.len(),
                release.size
            ));
        }
        let sha = hex::encode(Sha256::digest(&bytes));
        if sha != release.sha256 {
            return Err(format!(
                "the download's sha256 is {sha}, the signed manifest says {}",
                release.sha256
            ));
        }
        check_executable(&bytes)?;
        let exe = exe_path()?;
        #[cfg(unix)]
        {
            let previous = swap::stage(&bytes, &exe).map_err(|e| {
                format!(
                    "cannot put the new binary in place next to {}: {e}",
                    exe.display()
                )
            })?;
            Ok(Some(Staged {
                from: AGENT_VERSION.to_string(),
                to: release.version.clone(),
                exe,
                previous,
                state_dir: self.state_dir.clone(),
            }))
        }
        #[cfg(not(unix))]
        {
            let _ = (exe, &self.state_dir);
            Ok(None)
        }
    }
}

/// The ELF machine (or PE header) this build runs, so that a mislabelled file is refused
/// before it is written.
fn check_executable(bytes: &[u8]) -> Result<(), String> {
    let arch = std::env::consts::ARCH;
    if cfg!(windows) {
        return if bytes.starts_with(b"MZ") {
            Ok(())
        } else {
            Err("the file is not a Windows executable: wrong target".into())
        };
    }
    let want: u16 = match arch {
        "x86_64" => 62,
        "aarch64" => 183,
        "x86" => 3,
        "arm" => 40,
        "riscv64" => 243,
        _ => return Ok(()),
    };
    if bytes.len() < 20 || &bytes[..4] != b"\x7fELF" {
        return Err(format!(
            "the file is not an ELF executable, so it cannot run on this {arch} host: wrong target"
        ));
    }
    let machine = if bytes[5] == 2 {
        u16::from_be_bytes([bytes[18], bytes[19]])
    } else {
        u16::from_le_bytes([bytes[18], bytes[19]])
    };
    if machine != want {
        return Err(format!(
            "the file is an executable for ELF machine {machine}, not for this {arch} host (machine {want}): wrong target"
        ));
    }
    Ok(())
}

/// What the binary does after [`crate::run_updating`] returned a staged update.
pub enum AfterRun {
    /// The update did not stick (rolled back): run the agent again.
    RunAgain,
    /// Asked to stop during the trial: exit.
    Exit,
}

/// Try the staged binary, then `exec` it (does not return) or roll back.
#[cfg(unix)]
pub fn after_run(staged: Staged) -> AfterRun {
    swap::finish(staged)
}

#[cfg(not(unix))]
pub fn after_run(_staged: Staged) -> AfterRun {
    AfterRun::RunAgain
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_keeps_the_highest_version_and_bad_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let s = State::new(tmp.path());
        assert!(s.highest().is_none());
        s.saw(&Version::parse("0.2.0").unwrap()).unwrap();
        s.saw(&Version::parse("0.1.9").unwrap()).unwrap();
        assert_eq!(s.highest().unwrap().as_str(), "0.2.0", "lowered");
        let v = Version::parse("0.3.0").unwrap();
        assert!(s.bad(&v).is_none());
        s.add_bad("0.3.0", "it crashed\non start").unwrap();
        assert_eq!(s.bad(&v).as_deref(), Some("it crashed on start"));
        s.set_report(Status::Warning, "rolled back").unwrap();
        assert_eq!(
            s.take_report(),
            Some((Status::Warning, "rolled back".into()))
        );
        assert_eq!(s.take_report(), None, "reported twice");
    }

    #[test]
    fn executables_for_another_machine_are_refused() {
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[5] = 1;
        let own: u16 = if cfg!(target_arch = "aarch64") {
            183
        } else {
            62
        };
        elf[18..20].copy_from_slice(&own.to_le_bytes());
        assert_eq!(check_executable(&elf), Ok(()));
        let other: u16 = if own == 62 { 183 } else { 62 };
        elf[18..20].copy_from_slice(&other.to_le_bytes());
        assert!(check_executable(&elf).unwrap_err().contains("wrong target"));
        assert!(check_executable(b"#!/bin/sh\nexit 1\n")
            .unwrap_err()
            .contains("not an ELF"));
    }

    #[test]
    fn the_built_in_key_parses() {
        proto::parse_public_key(BUILTIN_KEY).unwrap();
    }
}
