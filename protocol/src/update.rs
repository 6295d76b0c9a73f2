//! Self-update: the signed release manifest, agent versions, and the `update` frame.
//!
//! The gateway publishes `manifest.json` (every release it holds: version, target, file,
//! size, sha256) and `manifest.json.sig` (base64 of an ed25519 signature over the exact
//! bytes of `manifest.json`). Agents verify the signature with a key built into them
//! before they believe anything in the manifest. This module holds the formats and the
//! checks both sides share; it does no I/O (see `docs/UPDATES.md`).

use std::cmp::Ordering;
use std::fmt;

use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

/// Where the gateway serves the manifest and its signature.
pub const MANIFEST_PATH: &str = "/releases/manifest.json";
pub const MANIFEST_SIG_PATH: &str = "/releases/manifest.json.sig";
/// Largest manifest an agent reads, in bytes (thousands of releases).
pub const MAX_MANIFEST_BYTES: u64 = 1024 * 1024;
/// Largest signature file an agent reads, in bytes.
pub const MAX_SIG_BYTES: u64 = 1024;
/// Largest agent binary a manifest may list, in bytes.
pub const MAX_RELEASE_BYTES: u64 = 256 * 1024 * 1024;

/// The path of a release file under the gateway's `/releases/`.
pub fn release_path(version: &str, file: &str) -> String {
    format!("/releases/{version}/{file}")
}

/// The agent binary's file name for a target triple, as `ci/dist` names it.
pub fn release_file_name(target: &str) -> String {
    if target.contains("windows") {
        format!("outpost-agent-{target}.exe")
    } else {
        format!("outpost-agent-{target}")
    }
}

/// The target triple an agent binary's file name is for (`None` if it is not one).
pub fn target_of_file_name(file: &str) -> Option<&str> {
    let t = file.strip_prefix("outpost-agent-")?;
    let t = t.strip_suffix(".exe").unwrap_or(t);
    valid_target(t).then_some(t)
}

/// A target triple as rustc spells them: lowercase letters, digits, `_` and `-`.
pub fn valid_target(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 64
        && t.contains('-')
        && t.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-')
}

/// A file name a release may hold: no path separators, no leading dot.
pub fn valid_file_name(f: &str) -> bool {
    !f.is_empty()
        && f.len() <= 128
        && !f.starts_with('.')
        && f.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'.' || c == b'_' || c == b'-')
}

/// An agent version: one to four dot-separated decimal numbers (`0.1.0`, `2.3`).
/// Ordered numerically, missing parts counting as 0, so `1.10.0 > 1.9.0` and `1.2 == 1.2.0`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Version {
    parts: Vec<u32>,
    text: String,
}

impl Version {
    pub fn parse(s: &str) -> Result<Version, UpdateError> {
        let bad = || UpdateError::BadVersion(s.to_string());
        if s.is_empty() || s.len() > 32 {
            return Err(bad());
        }
        let parts = s
            .split('.')
            .map(|p| {
                if p.is_empty() || p.len() > 9 || !p.bytes().all(|c| c.is_ascii_digit()) {
                    Err(bad())
                } else {
                    p.parse::<u32>().map_err(|_| bad())
                }
            })
            .collect::<Result<Vec<u32>, _>>()?;
        if parts.len() > 4 {
            return Err(bad());
        }
        Ok(Version {
            parts,
            text: s.to_string(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    fn part(&self, i: usize) -> u32 {
        self.parts.get(i).copied().unwrap_or(0)
    }

    /// Numeric comparison (`Ord` is this with the text as a tie-break, to stay total
    /// and consistent with `Eq`).
    pub fn cmp_numeric(&self, other: &Version) -> Ordering {
        (0..4)
            .map(|i| self.part(i).cmp(&other.part(i)))
            .find(|o| *o != Ordering::Equal)
            .unwrap_or(Ordering::Equal)
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        self.cmp_numeric(other)
            .then_with(|| self.text.cmp(&other.text))
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Every release the gateway holds. Signed as a whole: see [`verify_manifest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub releases: Vec<Release>,
}

/// One agent binary: a version built for a target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    pub version: String,
    /// The Rust target triple it was built for, e.g. `x86_64-unknown-linux-musl`.
    pub target: String,
    /// Its file name under `/releases/<version>/`.
    pub file: String,
    pub size: u64,
    /// Lowercase hex SHA-256 of the file.
    pub sha256: String,
}

impl Release {
    fn validate(&self) -> Result<(), String> {
        Version::parse(&self.version).map_err(|e| e.to_string())?;
        if !valid_target(&self.target) {
            return Err(format!("target {:?} is not a target triple", self.target));
        }
        if !valid_file_name(&self.file) {
            return Err(format!("file name {:?} is not allowed", self.file));
        }
        if self.size == 0 || self.size > MAX_RELEASE_BYTES {
            return Err(format!(
                "size {} is outside 1..={MAX_RELEASE_BYTES}",
                self.size
            ));
        }
        if self.sha256.len() != 64
            || !self
                .sha256
                .bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        {
            return Err(format!(
                "sha256 {:?} is not 64 lowercase hex digits",
                self.sha256
            ));
        }
        Ok(())
    }
}

impl Manifest {
    /// Parse and check every entry.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, UpdateError> {
        let m: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| UpdateError::BadManifest(format!("not a manifest: {e}")))?;
        for r in &m.releases {
            r.validate().map_err(|e| {
                UpdateError::BadManifest(format!("release {:?} for {:?}: {e}", r.version, r.target))
            })?;
        }
        Ok(m)
    }

    /// The release of `version` built for `target`.
    pub fn find(&self, version: &Version, target: &str) -> Option<&Release> {
        self.releases.iter().find(|r| {
            r.target == target
                && Version::parse(&r.version).is_ok_and(|v| v.cmp_numeric(version).is_eq())
        })
    }

    /// The canonical bytes that get signed (pretty JSON, sorted by version then target).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut m = self.clone();
        m.releases.sort_by(|a, b| {
            let va = Version::parse(&a.version).ok();
            let vb = Version::parse(&b.version).ok();
            va.cmp(&vb).then_with(|| a.target.cmp(&b.target))
        });
        let mut out = serde_json::to_vec_pretty(&m).unwrap_or_default();
        out.push(b'\n');
        out
    }
}

/// What can be wrong with a manifest, its signature, a key or a version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpdateError {
    #[error("version {0:?} is not one to four dot-separated numbers (e.g. 1.2.0)")]
    BadVersion(String),
    #[error("the key is not valid: {0}")]
    BadKey(String),
    #[error("the manifest signature is not base64 of 64 bytes")]
    BadSignatureEncoding,
    #[error("the manifest signature does not verify with the release key (unsigned, tampered with, or signed with another key)")]
    SignatureMismatch,
    #[error("invalid manifest: {0}")]
    BadManifest(String),
}

fn decode_key_text(text: &str) -> Result<[u8; 32], UpdateError> {
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .ok_or_else(|| UpdateError::BadKey("the file holds no key line".into()))?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(line)
        .map_err(|e| UpdateError::BadKey(format!("not base64: {e}")))?;
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| UpdateError::BadKey(format!("{} bytes, expected 32", bytes.len())))
}

/// Read a public key file: `#` comment lines, then one line of base64 (32 bytes).
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, UpdateError> {
    let bytes = decode_key_text(text)?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| UpdateError::BadKey(e.to_string()))
}

/// Read a private key file (same format; the 32-byte ed25519 seed).
pub fn parse_signing_key(text: &str) -> Result<SigningKey, UpdateError> {
    Ok(SigningKey::from_bytes(&decode_key_text(text)?))
}

/// The text of a key file for `bytes` (public or private), with a comment line.
pub fn key_file_text(comment: &str, bytes: &[u8; 32]) -> String {
    format!(
        "# {comment}\n{}\n",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// The signature file's text for `manifest` (base64, one line).
pub fn sign_manifest(manifest: &[u8], key: &SigningKey) -> String {
    let sig = key.sign(manifest);
    format!(
        "{}\n",
        base64::engine::general_purpose::STANDARD.encode(sig.to_bytes())
    )
}

/// Check the signature over the exact manifest bytes, then parse the manifest. Nothing in
/// the manifest is looked at before the signature verifies.
pub fn verify_manifest(
    manifest: &[u8],
    sig_text: &[u8],
    key: &VerifyingKey,
) -> Result<Manifest, UpdateError> {
    let sig_text = std::str::from_utf8(sig_text).map_err(|_| UpdateError::BadSignatureEncoding)?;
    let sig = base64::engine::general_purpose::STANDARD
        .decode(sig_text.trim())
        .map_err(|_| UpdateError::BadSignatureEncoding)?;
    let sig =
        <[u8; 64]>::try_from(sig.as_slice()).map_err(|_| UpdateError::BadSignatureEncoding)?;
    key.verify_strict(manifest, &Signature::from_bytes(&sig))
        .map_err(|_| UpdateError::SignatureMismatch)?;
    Manifest::parse(manifest)
}

/// Gateway → agent, after `welcome`: run this version. The agent decides whether it can
/// and may (see `docs/UPDATES.md`); agents that predate it ignore the frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct UpdateOffer {
    #[schemars(length(max = 32), pattern(crate::schema_rules::VERSION))]
    pub version: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn release(version: &str) -> Release {
        Release {
            version: version.into(),
            target: "x86_64-unknown-linux-musl".into(),
            file: "outpost-agent-x86_64-unknown-linux-musl".into(),
            size: 10,
            sha256: "ab".repeat(32),
        }
    }

    #[test]
    fn versions_compare_numerically() {
        let v = |s| Version::parse(s).unwrap();
        assert!(v("1.10.0") > v("1.9.0"));
        assert!(v("0.1.1") > v("0.1.0"));
        assert!(v("2") > v("1.99.99"));
        assert!(v("1.2").cmp_numeric(&v("1.2.0")).is_eq());
        for bad in [
            "",
            "1.",
            ".1",
            "1..2",
            "v1.0",
            "1.0-rc1",
            "1.2.3.4.5",
            "+1",
            "1 .2",
            "99999999999",
        ] {
            assert!(Version::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn signed_manifest_verifies_and_parses() {
        let m = Manifest {
            releases: vec![release("0.2.0"), release("0.1.0")],
        };
        let bytes = m.to_bytes();
        let sig = sign_manifest(&bytes, &key(1));
        let got = verify_manifest(&bytes, sig.as_bytes(), &key(1).verifying_key()).unwrap();
        assert_eq!(got.releases[0].version, "0.1.0", "sorted by version");
        let v = Version::parse("0.2").unwrap();
        assert_eq!(
            got.find(&v, "x86_64-unknown-linux-musl")
                .map(|r| r.version.as_str()),
            Some("0.2.0")
        );
        assert!(got.find(&v, "aarch64-unknown-linux-musl").is_none());
    }

    #[test]
    fn forged_manifests_are_refused() {
        let bytes = Manifest {
            releases: vec![release("0.2.0")],
        }
        .to_bytes();
        let sig = sign_manifest(&bytes, &key(1));
        let pk = key(1).verifying_key();
        assert_eq!(
            verify_manifest(&bytes, sig.as_bytes(), &key(2).verifying_key()),
            Err(UpdateError::SignatureMismatch),
            "wrong key"
        );
        let mut tampered = bytes.clone();
        let i = tampered.iter().position(|c| *c == b'2').unwrap();
        tampered[i] = b'3';
        assert_eq!(
            verify_manifest(&tampered, sig.as_bytes(), &pk),
            Err(UpdateError::SignatureMismatch),
            "tampered"
        );
        assert_eq!(
            verify_manifest(&bytes, b"", &pk),
            Err(UpdateError::BadSignatureEncoding),
            "unsigned"
        );
        assert_eq!(
            verify_manifest(&bytes, b"AAAA", &pk),
            Err(UpdateError::BadSignatureEncoding)
        );
    }

    #[test]
    fn signed_but_invalid_entries_are_refused() {
        let k = key(3);
        for (what, r) in [
            (
                "path in file",
                Release {
                    file: "../../bin/sh".into(),
                    ..release("1.0.0")
                },
            ),
            (
                "bad version",
                Release {
                    version: "1.0-beta".into(),
                    ..release("1.0.0")
                },
            ),
            (
                "bad hash",
                Release {
                    sha256: "AB".repeat(32),
                    ..release("1.0.0")
                },
            ),
            (
                "zero size",
                Release {
                    size: 0,
                    ..release("1.0.0")
                },
            ),
            (
                "huge",
                Release {
                    size: MAX_RELEASE_BYTES + 1,
                    ..release("1.0.0")
                },
            ),
            (
                "bad target",
                Release {
                    target: "linux".into(),
                    ..release("1.0.0")
                },
            ),
        ] {
            let bytes = serde_json::to_vec(&Manifest { releases: vec![r] }).unwrap();
            let sig = sign_manifest(&bytes, &k);
            assert!(
                matches!(
                    verify_manifest(&bytes, sig.as_bytes(), &k.verifying_key()),
                    Err(UpdateError::BadManifest(_))
                ),
                "{what} accepted"
            );
        }
    }

    #[test]
    fn key_files_round_trip_and_bad_ones_are_refused() {
        let k = key(9);
        let text = key_file_text("outpost release key", &k.verifying_key().to_bytes());
        assert_eq!(parse_public_key(&text).unwrap(), k.verifying_key());
        let text = key_file_text("private", &k.to_bytes());
        assert_eq!(parse_signing_key(&text).unwrap().to_bytes(), k.to_bytes());
        assert!(matches!(
            parse_public_key("# only a comment\n"),
            Err(UpdateError::BadKey(_))
        ));
        assert!(matches!(
            parse_public_key("AAAA\n"),
            Err(UpdateError::BadKey(_))
        ));
        assert!(matches!(
            parse_public_key("not base64!\n"),
            Err(UpdateError::BadKey(_))
        ));
    }

    #[test]
    fn file_names_and_targets() {
        assert_eq!(
            target_of_file_name("outpost-agent-x86_64-pc-windows-gnu.exe"),
            Some("x86_64-pc-windows-gnu")
        );
        assert_eq!(
            release_file_name("x86_64-pc-windows-gnu"),
            "outpost-agent-x86_64-pc-windows-gnu.exe"
        );
        assert_eq!(target_of_file_name("SHA256SUMS"), None);
        assert!(!valid_file_name(".hidden"));
        assert!(!valid_file_name("a/b"));
    }
}
