//! Agent releases for self-update: `outpost-gateway release keygen|publish` make the
//! signing key and the signed manifest, and the gateway serves the manifest, its
//! signature under `/releases/` (the release files are `crate::releases`' routes).
//!
//! The releases directory holds one subdirectory per version (a copy of a `ci/dist`
//! output), `manifest.json` over every version present, `manifest.json.sig` (ed25519,
//! base64) and the rollout policy `rollout.toml` (see [`crate::rollout`]). The gateway
//! never signs anything itself: whoever holds the private key publishes, and the gateway
//! only serves files. It serves nothing outside the releases directory: names are checked
//! character by character and only regular files (no symlinks) are served.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use outpost_protocol::update::{
    key_file_text, parse_signing_key, sign_manifest, target_of_file_name, Manifest, Release,
    Version,
};
use sha2::{Digest, Sha256};

use crate::settings::Settings;

pub const MANIFEST_FILE: &str = "manifest.json";
pub const SIG_FILE: &str = "manifest.json.sig";

/// `/releases/manifest.json` and its signature.
/// These routes, for a router of any state (they keep the settings as their own).
pub fn router<S: Clone + Send + Sync + 'static>(
    settings: Arc<Settings>,
) -> utoipa_axum::router::OpenApiRouter<S> {
    utoipa_axum::router::OpenApiRouter::new()
        .routes(utoipa_axum::routes!(manifest))
        .routes(utoipa_axum::routes!(signature))
        .with_state(settings)
}

/// The signed list of releases self-updating agents trust (UPDATES.md).
#[utoipa::path(get, path = "/releases/manifest.json", tag = "releases", responses(
    (status = 200, description = "The manifest", content_type = "application/octet-stream", body = Vec<u8>),
    (status = 404, description = "No release published", content_type = "text/plain", body = String),
))]
async fn manifest(State(settings): State<Arc<Settings>>) -> Response {
    serve(&settings.releases_dir.join(MANIFEST_FILE), MANIFEST_FILE).await
}

/// The manifest's Ed25519 signature.
#[utoipa::path(get, path = "/releases/manifest.json.sig", tag = "releases", responses(
    (status = 200, description = "The signature", content_type = "application/octet-stream", body = Vec<u8>),
    (status = 404, description = "No release published", content_type = "text/plain", body = String),
))]
async fn signature(State(settings): State<Arc<Settings>>) -> Response {
    serve(&settings.releases_dir.join(SIG_FILE), SIG_FILE).await
}

/// A regular file (never a symlink, directory or device), streamed with its length.
async fn serve(path: &Path, name: &str) -> Response {
    match tokio::fs::symlink_metadata(path).await {
        Ok(m) if m.file_type().is_file() => crate::releases::send_file(path, name).await,
        _ => (StatusCode::NOT_FOUND, format!("no release file {name}\n")).into_response(),
    }
}

/// Make a key pair: `PREFIX.key` (mode 0600, the private seed) and `PREFIX.pub`.
/// Refuses to overwrite either.
pub fn keygen(prefix: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    use rand::RngCore;
    let private = prefix.with_extension("key");
    let public = prefix.with_extension("pub");
    for p in [&private, &public] {
        if p.exists() {
            bail!(
                "{} already exists; remove it or choose another --out",
                p.display()
            );
        }
    }
    let mut seed = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut seed);
    let key = ed25519_dalek::SigningKey::from_bytes(&seed);
    outpost_sys::write_atomic(
        &private,
        key_file_text("outpost release signing key: keep it secret", &seed).as_bytes(),
        0o600,
    )
    .with_context(|| format!("cannot write {}", private.display()))?;
    outpost_sys::write_atomic(
        &public,
        key_file_text(
            "outpost release verification key",
            &key.verifying_key().to_bytes(),
        )
        .as_bytes(),
        0o644,
    )
    .with_context(|| format!("cannot write {}", public.display()))?;
    Ok((private, public))
}

fn read_signing_key(path: &Path) -> anyhow::Result<ed25519_dalek::SigningKey> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path)
            .with_context(|| format!("cannot read signing key {}", path.display()))?;
        if meta.mode() & 0o077 != 0 {
            bail!(
                "signing key {} is readable by others (mode {:o}); run chmod 600 on it",
                path.display(),
                meta.mode() & 0o777
            );
        }
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read signing key {}", path.display()))?;
    parse_signing_key(&text).with_context(|| format!("signing key {}", path.display()))
}

fn sha256_file(path: &Path) -> anyhow::Result<(u64, String)> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let size = std::io::copy(&mut f, &mut hasher)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok((size, hex::encode(hasher.finalize())))
}

/// What `publish` did.
#[derive(Debug)]
pub struct Published {
    pub version: String,
    pub files: Vec<String>,
    pub manifest: Manifest,
}

/// Copy a `ci/dist` output into `releases/<VERSION>/` (checking it against its
/// `SHA256SUMS` when present) and re-sign the manifest over every version present.
pub fn publish(key: &Path, dist: &Path, releases: &Path) -> anyhow::Result<Published> {
    let signing = read_signing_key(key)?;
    let version_text = std::fs::read_to_string(dist.join("VERSION")).with_context(|| {
        format!(
            "{} has no VERSION file (is it a ci/dist output?)",
            dist.display()
        )
    })?;
    let version = Version::parse(version_text.trim())
        .with_context(|| format!("{}", dist.join("VERSION").display()))?;
    let sums = match std::fs::read_to_string(dist.join("SHA256SUMS")) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).context("cannot read SHA256SUMS"),
    };
    let mut binaries = Vec::new();
    for entry in
        std::fs::read_dir(dist).with_context(|| format!("cannot list {}", dist.display()))?
    {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if target_of_file_name(&name).is_some() && entry.file_type()?.is_file() {
            binaries.push(name);
        }
    }
    binaries.sort();
    if binaries.is_empty() {
        bail!(
            "{} holds no outpost-agent-<target> binary; run ci/dist first",
            dist.display()
        );
    }
    if let Some(sums) = &sums {
        for name in &binaries {
            let (_, hash) = sha256_file(&dist.join(name))?;
            let listed = sums.lines().find_map(|l| {
                let (h, f) = l.split_once(char::is_whitespace)?;
                (f.trim().trim_start_matches('*') == name).then(|| h.to_string())
            });
            match listed {
                Some(h) if h == hash => {}
                Some(h) => bail!(
                    "{name}: sha256 is {hash} but SHA256SUMS says {h}; the dist output is damaged"
                ),
                None => bail!("{name} is not listed in SHA256SUMS"),
            }
        }
    }
    let dest = releases.join(version.as_str());
    std::fs::create_dir_all(&dest).with_context(|| format!("cannot create {}", dest.display()))?;
    let mut files = binaries.clone();
    files.push("VERSION".into());
    if sums.is_some() {
        files.push("SHA256SUMS".into());
    }
    for name in &files {
        let bytes = std::fs::read(dist.join(name))
            .with_context(|| format!("cannot read {}", dist.join(name).display()))?;
        let mode = if target_of_file_name(name).is_some() {
            0o755
        } else {
            0o644
        };
        outpost_sys::write_atomic(&dest.join(name), &bytes, mode)
            .with_context(|| format!("cannot write {}", dest.join(name).display()))?;
    }
    let manifest = sign_releases(&signing, releases)?;
    Ok(Published {
        version: version.to_string(),
        files,
        manifest,
    })
}

/// Rebuild `manifest.json` from every `<version>/outpost-agent-<target>` file present and
/// sign it.
pub fn sign_releases(
    signing: &ed25519_dalek::SigningKey,
    releases: &Path,
) -> anyhow::Result<Manifest> {
    let mut list = Vec::new();
    for dir in std::fs::read_dir(releases)
        .with_context(|| format!("cannot list {}", releases.display()))?
    {
        let dir = dir?;
        let version = dir.file_name().to_string_lossy().into_owned();
        if !dir.file_type()?.is_dir() || Version::parse(&version).is_err() {
            continue;
        }
        for f in std::fs::read_dir(dir.path())? {
            let f = f?;
            let file = f.file_name().to_string_lossy().into_owned();
            let Some(target) = target_of_file_name(&file) else {
                continue;
            };
            if !f.file_type()?.is_file() {
                continue;
            }
            let (size, sha256) = sha256_file(&f.path())?;
            list.push(Release {
                version: version.clone(),
                target: target.to_string(),
                file,
                size,
                sha256,
            });
        }
    }
    let manifest = Manifest { releases: list };
    let bytes = manifest.to_bytes();
    // Check what we are about to sign is what agents will accept.
    Manifest::parse(&bytes)
        .context("the releases directory holds a release agents would refuse")?;
    outpost_sys::write_atomic(&releases.join(MANIFEST_FILE), &bytes, 0o644)
        .context("cannot write manifest.json")?;
    outpost_sys::write_atomic(
        &releases.join(SIG_FILE),
        sign_manifest(&bytes, signing).as_bytes(),
        0o644,
    )
    .context("cannot write manifest.json.sig")?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dist(dir: &Path, version: &str, body: &[u8]) -> PathBuf {
        let d = dir.join(format!("dist-{version}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("VERSION"), format!("{version}\n")).unwrap();
        std::fs::write(d.join("outpost-agent-x86_64-unknown-linux-musl"), body).unwrap();
        std::fs::write(d.join("notes.txt"), "not a release").unwrap();
        d
    }

    #[test]
    fn publish_signs_every_version_present() {
        let tmp = tempfile::tempdir().unwrap();
        let (key, public) = keygen(&tmp.path().join("release")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(
            keygen(&tmp.path().join("release")).is_err(),
            "overwrote a key"
        );
        let releases = tmp.path().join("releases");
        publish(&key, &dist(tmp.path(), "0.1.0", b"one"), &releases).unwrap();
        let p = publish(&key, &dist(tmp.path(), "0.2.0", b"two!"), &releases).unwrap();
        assert_eq!(p.version, "0.2.0");
        let bytes = std::fs::read(releases.join(MANIFEST_FILE)).unwrap();
        let sig = std::fs::read(releases.join(SIG_FILE)).unwrap();
        let pk =
            outpost_protocol::update::parse_public_key(&std::fs::read_to_string(public).unwrap())
                .unwrap();
        let m = outpost_protocol::update::verify_manifest(&bytes, &sig, &pk).unwrap();
        let sizes: Vec<(String, u64)> = m
            .releases
            .iter()
            .map(|r| (r.version.clone(), r.size))
            .collect();
        assert_eq!(sizes, vec![("0.1.0".into(), 3), ("0.2.0".into(), 4)]);
        assert_eq!(m.releases[1].sha256, hex::encode(Sha256::digest(b"two!")));
        assert!(!releases.join("0.2.0/notes.txt").exists());
    }

    #[test]
    fn publish_refuses_bad_input() {
        let tmp = tempfile::tempdir().unwrap();
        let (key, _) = keygen(&tmp.path().join("k")).unwrap();
        let releases = tmp.path().join("releases");
        let d = dist(tmp.path(), "0.1.0", b"one");
        std::fs::write(
            d.join("SHA256SUMS"),
            format!(
                "{}  outpost-agent-x86_64-unknown-linux-musl\n",
                "0".repeat(64)
            ),
        )
        .unwrap();
        let e = publish(&key, &d, &releases).unwrap_err();
        assert!(format!("{e:#}").contains("SHA256SUMS says"), "{e:#}");
        let d = dist(tmp.path(), "1.0-beta", b"x");
        assert!(
            format!("{:#}", publish(&key, &d, &releases).unwrap_err()).contains("not one to four")
        );
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = publish(&key, &dist(tmp.path(), "0.3.0", b"x"), &releases).unwrap_err();
        assert!(format!("{e:#}").contains("chmod 600"), "{e:#}");
    }
}
