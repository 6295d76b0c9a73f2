//! Who this agent is: a fingerprint (a UUID made on first start and stored with the
//! machine id it was made on) and the secret the gateway issued at enrollment.
//!
//! A changed machine id means this disk was cloned onto another machine: a new fingerprint
//! is made and the old secret, which belongs to the old fingerprint, is discarded.

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::settings::Paths;
use crate::util::write_atomic;

#[derive(Debug, Serialize, Deserialize)]
struct FingerprintFile {
    fingerprint: String,
    machine_id: String,
    /// Sent with the enrollment key (see `Credential::EnrollKey`): only this agent can
    /// enroll its fingerprint again before it has confirmed its secret. Absent in files
    /// written before proofs; one is added then.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    enroll_proof: String,
}

impl FingerprintFile {
    /// Write it readable by the agent's user only: it holds the enrollment proof.
    fn save(&self, path: &Path) -> anyhow::Result<()> {
        write_atomic(path, &serde_json::to_vec_pretty(self)?, 0o600)
            .with_context(|| format!("cannot write {}", path.display()))
    }
}

fn new_proof() -> String {
    uuid::Uuid::new_v4().simple().to_string() + &uuid::Uuid::new_v4().simple().to_string()
}

#[derive(Debug, Clone)]
pub struct Identity {
    pub fingerprint: String,
    /// The proof sent with the enrollment key.
    pub enroll_proof: String,
    paths: Paths,
}

/// Whether only the owner may read `path` (always true where modes do not apply).
fn owner_only(path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 == 0)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        true
    }
}

fn read_machine_id(path: &Path) -> String {
    #[cfg(windows)]
    if path.as_os_str().is_empty() {
        return windows_machine_guid().unwrap_or_default();
    }
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// `HKLM\SOFTWARE\Microsoft\Cryptography\MachineGuid`, made when Windows is installed
/// (and anew by sysprep when an image is generalised).
#[cfg(windows)]
fn windows_machine_guid() -> Option<String> {
    crate::util::registry_string(r"SOFTWARE\Microsoft\Cryptography", "MachineGuid")
}

impl Identity {
    pub fn load_or_create(paths: &Paths) -> anyhow::Result<Identity> {
        let machine_id = read_machine_id(&paths.machine_id_file);
        let existing = match std::fs::read(&paths.fingerprint_file) {
            Ok(bytes) => match serde_json::from_slice::<FingerprintFile>(&bytes) {
                Ok(f) if outpost_protocol::valid_fingerprint(&f.fingerprint) => Some(f),
                _ => {
                    tracing::error!(file = %paths.fingerprint_file.display(),
                        "fingerprint file is unreadable; making a new identity (the agent will enroll again)");
                    None
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot read {}", paths.fingerprint_file.display()))
            }
        };
        let mut f = match existing {
            Some(f) if f.machine_id == machine_id => f,
            // No machine id to compare (file missing or unreadable, e.g. early in boot):
            // keep the identity rather than throw it away on a guess.
            Some(f) if machine_id.is_empty() => {
                tracing::warn!(file = %paths.machine_id_file.display(),
                    "cannot read the machine id; keeping the stored fingerprint");
                f
            }
            other => {
                if let Some(old) = other {
                    tracing::warn!(old = %old.fingerprint, "machine id changed (cloned image?); making a new fingerprint");
                }
                // The old secret goes first: a crash in between must not leave a new
                // fingerprint paired with the old fingerprint's secret.
                match std::fs::remove_file(&paths.secret_file) {
                    Ok(()) => tracing::info!("discarded the secret of the previous fingerprint"),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(e).with_context(|| {
                            format!("cannot remove stale {}", paths.secret_file.display())
                        })
                    }
                }
                let fresh = FingerprintFile {
                    fingerprint: uuid::Uuid::new_v4().to_string(),
                    machine_id,
                    enroll_proof: new_proof(),
                };
                fresh.save(&paths.fingerprint_file)?;
                fresh
            }
        };
        if f.enroll_proof.is_empty() || !owner_only(&paths.fingerprint_file) {
            // A file from before proofs (or left readable by others): give it a proof
            // and make it private. The proof matters only until the agent has a secret.
            let had_proof = !f.enroll_proof.is_empty();
            if !had_proof {
                f.enroll_proof = new_proof();
            }
            if let Err(e) = f.save(&paths.fingerprint_file) {
                // Not fatal: the agent ran with this file before. A proof that is not on
                // disk would not survive a restart, so without one saved the agent
                // enrolls as agents before proofs did.
                tracing::warn!(error = %format!("{e:#}"), "cannot rewrite the fingerprint file with an enrollment proof and mode 0600; going on without");
                if !had_proof {
                    f.enroll_proof.clear();
                }
            }
        }
        Ok(Identity {
            fingerprint: f.fingerprint,
            enroll_proof: f.enroll_proof,
            paths: paths.clone(),
        })
    }

    /// The secret from enrollment, if this agent has enrolled.
    pub fn secret(&self) -> Option<String> {
        std::fs::read_to_string(&self.paths.secret_file)
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    }

    /// Keep the secret the gateway issued, readable by the agent's user only.
    pub fn store_secret(&self, secret: &str) -> std::io::Result<()> {
        write_atomic(
            &self.paths.secret_file,
            format!("{secret}\n").as_bytes(),
            0o600,
        )
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn paths(dir: &Path) -> Paths {
        Paths {
            state_dir: dir.to_path_buf(),
            fingerprint_file: dir.join("agent.finger"),
            secret_file: dir.join("agent.secret"),
            plugins_dir: dir.join("plugins"),
            machine_id_file: dir.join("machine-id"),
            checks_dir: dir.join("checks.d"),
        }
    }

    #[test]
    fn fingerprint_is_stable_until_the_machine_id_changes() {
        let dir = tempfile::tempdir().unwrap();
        let p = paths(dir.path());
        std::fs::write(&p.machine_id_file, "machine-a\n").unwrap();
        let a = Identity::load_or_create(&p).unwrap();
        assert!(outpost_protocol::valid_fingerprint(&a.fingerprint));
        a.store_secret("s3cret").unwrap();
        let mode = std::fs::metadata(&p.secret_file)
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let again = Identity::load_or_create(&p).unwrap();
        assert_eq!(again.fingerprint, a.fingerprint);
        assert_eq!(again.secret().as_deref(), Some("s3cret"));

        // An unreadable machine id is not a clone.
        std::fs::remove_file(&p.machine_id_file).unwrap();
        assert_eq!(
            Identity::load_or_create(&p).unwrap().fingerprint,
            a.fingerprint
        );
        assert_eq!(again.secret().as_deref(), Some("s3cret"));

        std::fs::write(&p.machine_id_file, "machine-b\n").unwrap();
        let cloned = Identity::load_or_create(&p).unwrap();
        assert_ne!(cloned.fingerprint, a.fingerprint);
        assert_eq!(
            cloned.secret(),
            None,
            "the old fingerprint's secret is discarded"
        );
    }

    /// The fingerprint file holds the enrollment proof: private, and a file from before
    /// proofs gets one (and its mode fixed) while keeping its fingerprint.
    #[test]
    fn the_fingerprint_file_is_private_and_carries_a_stable_proof() {
        let dir = tempfile::tempdir().unwrap();
        let p = paths(dir.path());
        std::fs::write(&p.machine_id_file, "machine-a\n").unwrap();
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        let a = Identity::load_or_create(&p).unwrap();
        assert_eq!(mode(&p.fingerprint_file), 0o600);
        assert!(a.enroll_proof.len() >= 32);
        assert_eq!(
            Identity::load_or_create(&p).unwrap().enroll_proof,
            a.enroll_proof
        );

        let old = format!(
            "{{\"fingerprint\":\"{}\",\"machine_id\":\"machine-a\"}}",
            a.fingerprint
        );
        std::fs::write(&p.fingerprint_file, old).unwrap();
        std::fs::set_permissions(&p.fingerprint_file, std::fs::Permissions::from_mode(0o644))
            .unwrap();
        let upgraded = Identity::load_or_create(&p).unwrap();
        assert_eq!(upgraded.fingerprint, a.fingerprint);
        assert!(!upgraded.enroll_proof.is_empty());
        assert_eq!(mode(&p.fingerprint_file), 0o600);
        assert_eq!(
            Identity::load_or_create(&p).unwrap().enroll_proof,
            upgraded.enroll_proof
        );
    }

    #[test]
    fn corrupt_fingerprint_file_yields_a_new_identity() {
        let dir = tempfile::tempdir().unwrap();
        let p = paths(dir.path());
        std::fs::write(&p.fingerprint_file, "{nonsense").unwrap();
        let id = Identity::load_or_create(&p).unwrap();
        assert!(outpost_protocol::valid_fingerprint(&id.fingerprint));
    }
}
