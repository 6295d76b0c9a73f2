//! The Linux installer and the agent release artifacts, served over the gateway's own
//! HTTPS: `GET /install.sh` (installer/install.sh, with this gateway's address and the
//! pins of its certificate filled in) and `GET /releases/<version>/<file>` from the
//! releases directory, one subdirectory per version, `latest` naming the highest version
//! by semver.
//!
//! Only plain names inside the releases directory are served: no `..`, no hidden files,
//! nothing a symlink leads to outside the directory. Files are streamed, never loaded
//! whole. Not here: the signed self-update manifest (`/releases/manifest.json`, one path
//! segment, so it cannot collide with these two-segment routes).

use std::cmp::Ordering;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::io::AsyncReadExt;

use crate::settings::Settings;
use crate::tls::Pins;

/// The installer's source; the gateway fills in its own address when serving it.
pub const INSTALL_SH: &str = include_str!("../../installer/install.sh");

/// The line of install.sh that carries the default gateway (empty in the source).
const GATEWAY_MARKER: &str = "served_gateway=''";
/// The lines that carry this gateway's certificate pin and public-key pin (empty in the
/// source): with them the script turns the `--pin` a user gives into the key that
/// `curl --pinnedpubkey` checks.
const PIN_MARKER: &str = "\nserved_pin=''\n";
const PUBKEY_PIN_MARKER: &str = "\nserved_pubkey_pin=''\n";

/// Bytes read from disk per chunk of a streamed file.
const CHUNK: usize = 64 * 1024;

/// These routes, for a router of any state (they keep the settings as their own).
pub fn routes<S: Clone + Send + Sync + 'static>(
    settings: Arc<Settings>,
) -> utoipa_axum::router::OpenApiRouter<S> {
    utoipa_axum::router::OpenApiRouter::new()
        .routes(utoipa_axum::routes!(install_sh))
        .routes(utoipa_axum::routes!(artifact))
        .with_state(settings)
}

fn not_found(message: String) -> Response {
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{message}\n"),
    )
        .into_response()
}

/// Whether `pins` can go into the script as they are: 64 lowercase hex digits, and
/// `sha256//` with 44 base64 characters.
fn valid_pins(pins: &Pins) -> bool {
    let hex_ok = pins.pin_sha256.len() == 64
        && pins
            .pin_sha256
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c));
    let key_ok = pins.curl_pin.strip_prefix("sha256//").is_some_and(|b| {
        b.len() == 44
            && b.bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'='))
    });
    hex_ok && key_ok
}

/// The script with `authority` as its default gateway (empty: none, the user must pass
/// `--gateway`) and `pins`, those of this gateway's certificate (none: the user must give
/// both pins to trust it by pin).
pub fn render_install_sh(authority: Option<&str>, pins: Option<&Pins>) -> String {
    let mut script = match authority {
        Some(a) if crate::settings::valid_authority(a) => {
            INSTALL_SH.replacen(GATEWAY_MARKER, &format!("served_gateway='{a}'"), 1)
        }
        _ => INSTALL_SH.to_string(),
    };
    if let Some(p) = pins.filter(|p| valid_pins(p)) {
        script = script
            .replacen(PIN_MARKER, &format!("\nserved_pin='{}'\n", p.pin_sha256), 1)
            .replacen(
                PUBKEY_PIN_MARKER,
                &format!("\nserved_pubkey_pin='{}'\n", p.curl_pin),
                1,
            );
    }
    script
}

/// The pins of the certificate file this gateway serves, read now (the certificate is
/// read once at start: replacing its file takes a restart, which is when both agree again).
async fn served_pins(settings: &Settings) -> Option<Pins> {
    let path = crate::tls::cert_path(settings);
    let pem = match tokio::fs::read(&path).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "install.sh served without the certificate's pins");
            return None;
        }
    };
    match crate::tls::pins_of_pem(&pem, &path) {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "install.sh served without the certificate's pins");
            None
        }
    }
}

/// The agent's install script, with this gateway's address and certificate pins filled
/// in (INSTALL.md).
#[utoipa::path(get, path = "/install.sh", tag = "releases", responses(
    (status = 200, description = "The script", content_type = "text/plain", body = String),
))]
async fn install_sh(State(settings): State<Arc<Settings>>, headers: HeaderMap) -> Response {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| crate::settings::valid_authority(h));
    let authority = settings.public_authority.as_deref().or(host);
    if authority.is_none() {
        tracing::debug!("install.sh served without a default gateway: no --public-url and no usable Host header");
    }
    let pins = served_pins(&settings).await;
    (
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        render_install_sh(authority, pins.as_ref()),
    )
        .into_response()
}

/// A name that may be served: one plain path component, not hidden.
fn plain_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s.starts_with('.')
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-' | b'+'))
}

/// A semantic version `MAJOR.MINOR.PATCH[-PRE][+BUILD]`, ordered by semver's rules.
#[derive(Debug, PartialEq, Eq)]
pub struct Version {
    core: [u64; 3],
    pre: Vec<String>,
}

impl Version {
    pub fn parse(s: &str) -> Option<Version> {
        let s = s.split_once('+').map_or(s, |(v, _)| v);
        let (core, pre) = match s.split_once('-') {
            Some((c, p)) => (c, Some(p)),
            None => (s, None),
        };
        let mut parts = core.split('.');
        let mut num = || -> Option<u64> {
            let p = parts.next()?;
            if p.is_empty() || !p.bytes().all(|c| c.is_ascii_digit()) {
                return None;
            }
            p.parse().ok()
        };
        let core = [num()?, num()?, num()?];
        if parts.next().is_some() {
            return None;
        }
        let pre = match pre {
            None => Vec::new(),
            Some(p) => {
                let ids: Vec<String> = p.split('.').map(str::to_string).collect();
                if ids.iter().any(|i| i.is_empty()) {
                    return None;
                }
                ids
            }
        };
        Some(Version { core, pre })
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        self.core
            .cmp(&other.core)
            .then_with(|| match (self.pre.is_empty(), other.pre.is_empty()) {
                (true, true) => Ordering::Equal,
                (true, false) => Ordering::Greater,
                (false, true) => Ordering::Less,
                (false, false) => {
                    for (a, b) in self.pre.iter().zip(&other.pre) {
                        let o = match (a.parse::<u64>(), b.parse::<u64>()) {
                            (Ok(x), Ok(y)) => x.cmp(&y),
                            (Ok(_), Err(_)) => Ordering::Less,
                            (Err(_), Ok(_)) => Ordering::Greater,
                            (Err(_), Err(_)) => a.cmp(b),
                        };
                        if o != Ordering::Equal {
                            return o;
                        }
                    }
                    self.pre.len().cmp(&other.pre.len())
                }
            })
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The name of the highest version directory in `dir` (hidden and non-semver names, and
/// symlinks that lead outside `dir`, are ignored).
pub fn latest(dir: &Path) -> Option<String> {
    let root = dir.canonicalize().ok()?;
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| {
            e.path()
                .canonicalize()
                .is_ok_and(|p| p.starts_with(&root) && p.is_dir())
        })
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| plain_name(n))
        .filter_map(|n| Version::parse(&n).map(|v| (v, n)))
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, n)| n)
}

/// The file to serve for `/releases/<version>/<file>`, or why there is none. The answer
/// is always a regular file whose real path is inside `releases_dir`.
pub fn resolve(releases_dir: &Path, version: &str, file: &str) -> Result<PathBuf, String> {
    if !plain_name(version) || !plain_name(file) {
        return Err(format!(
            "no such release file {version}/{file}: names are plain, not hidden, without '/' or '..'"
        ));
    }
    let version = if version == "latest" {
        latest(releases_dir).ok_or_else(|| {
            format!(
                "no releases are published on this gateway (its releases directory {} has no VERSION/ subdirectory)",
                releases_dir.display()
            )
        })?
    } else {
        version.to_string()
    };
    let missing = || format!("no file {file} in release {version} on this gateway");
    let root = releases_dir.canonicalize().map_err(|_| missing())?;
    let real = releases_dir
        .join(&version)
        .join(file)
        .canonicalize()
        .map_err(|_| missing())?;
    if !real.starts_with(&root) || !real.is_file() {
        return Err(missing());
    }
    Ok(real)
}

/// A file of an agent release (`latest`: the highest version).
#[utoipa::path(get, path = "/releases/{version}/{file}", tag = "releases",
    params(
        ("version" = String, Path, description = "A version, or `latest`"),
        ("file" = String, Path, description = "A file of that release"),
    ),
    responses(
        (status = 200, description = "The file", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 404, description = "No such release or file", content_type = "text/plain", body = String),
))]
async fn artifact(
    State(settings): State<Arc<Settings>>,
    UrlPath((version, file)): UrlPath<(String, String)>,
) -> Response {
    match resolve(&settings.releases_dir, &version, &file) {
        Ok(path) => send_file(&path, &format!("{version}/{file}")).await,
        Err(e) => not_found(e),
    }
}

/// Stream the file at `path` with its length (`name` is what a 404 calls it). The caller
/// has checked that `path` is a regular file inside the releases directory.
pub(crate) async fn send_file(path: &Path, name: &str) -> Response {
    let opened = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot open a release file");
            return not_found(format!("release file {name} cannot be read"));
        }
    };
    let len = match opened.metadata().await {
        Ok(m) => m.len(),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot stat a release file");
            return not_found(format!("release file {name} cannot be read"));
        }
    };
    // Never more than Content-Length, even if the file grows while it is sent.
    let reader = opened.take(len);
    let body = futures_util::stream::unfold(reader, |mut r| async move {
        let mut buf = vec![0u8; CHUNK];
        match r.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(Bytes::from(buf)), r))
            }
            Err(e) => Some((Err(e), r)),
        }
    });
    (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities() {
        for ok in [
            "gw.example.com",
            "gw.example.com:8443",
            "127.0.0.1:9",
            "[::1]:8443",
            "[::1]",
            "localhost",
        ] {
            assert!(crate::settings::valid_authority(ok), "{ok}");
        }
        for bad in [
            "",
            "gw.example.com:",
            "gw.example.com:0",
            "gw.example.com:99999",
            "gw'$(reboot)",
            "a b",
            "user@gw",
            "gw/x",
            "-gw",
            "[::1]x",
            "[zz]:1",
            "gw:1:2",
        ] {
            assert!(!crate::settings::valid_authority(bad), "{bad}");
        }
        assert_eq!(
            crate::settings::parse_public_url("https://gw.example.com:8443/").unwrap(),
            "gw.example.com:8443"
        );
        assert!(crate::settings::parse_public_url("http://gw")
            .unwrap_err()
            .contains("https://"));
        assert!(crate::settings::parse_public_url("https://gw/path")
            .unwrap_err()
            .contains("nothing after it"));
    }

    fn pins() -> Pins {
        Pins {
            pin_sha256: "ab".repeat(32),
            curl_pin: format!("sha256//{}=", "A".repeat(43)),
        }
    }

    #[test]
    fn the_script_gets_the_gateway_and_its_pins_once() {
        for marker in [GATEWAY_MARKER, PIN_MARKER, PUBKEY_PIN_MARKER] {
            assert_eq!(INSTALL_SH.matches(marker).count(), 1, "{marker}");
        }
        let s = render_install_sh(Some("gw.example:8443"), Some(&pins()));
        assert!(s.contains("\nserved_gateway='gw.example:8443'\n"));
        assert!(s.contains(&format!("\nserved_pin='{}'\n", "ab".repeat(32))));
        assert!(s.contains(&format!(
            "\nserved_pubkey_pin='sha256//{}='\n",
            "A".repeat(43)
        )));
        for marker in [GATEWAY_MARKER, PIN_MARKER, PUBKEY_PIN_MARKER] {
            assert!(!s.contains(marker), "{marker}");
        }
        assert_eq!(render_install_sh(Some("x'; rm -rf /"), None), INSTALL_SH);
        let bad = Pins {
            curl_pin: "sha256//x'; rm -rf /".into(),
            ..pins()
        };
        assert_eq!(render_install_sh(None, Some(&bad)), INSTALL_SH);
    }

    #[test]
    fn the_script_carries_the_release_key_agents_are_built_with() {
        let key = include_str!("../../installer/release-key.pub")
            .lines()
            .find(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .unwrap()
            .trim();
        outpost_protocol::update::parse_public_key(key).unwrap();
        assert_eq!(
            INSTALL_SH
                .matches(&format!("\nrelease_key='{key}'\n"))
                .count(),
            1,
            "install.sh must carry installer/release-key.pub as release_key"
        );
    }

    #[test]
    fn versions_order_by_semver() {
        let v = |s| Version::parse(s).unwrap();
        assert!(v("0.10.0") > v("0.9.9"));
        assert!(v("1.0.0") > v("1.0.0-rc.1"));
        assert!(v("1.0.0-rc.10") > v("1.0.0-rc.9"));
        assert!(v("1.0.0-beta") > v("1.0.0-alpha.1"));
        assert!(v("1.0.0-alpha.1") > v("1.0.0-alpha"));
        assert_eq!(v("1.2.3+build.5"), v("1.2.3"));
        for bad in ["1.2", "1.2.3.4", "v1.2.3", "1..3", "1.2.3-", "latest"] {
            assert!(Version::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn only_plain_files_inside_the_directory_are_served() {
        let dir = tempfile::tempdir().unwrap();
        let rel = dir.path().join("releases");
        for v in ["0.9.0", "0.10.0", "0.10.0-rc.1", "junk", ".0.99.0"] {
            std::fs::create_dir_all(rel.join(v)).unwrap();
            std::fs::write(rel.join(v).join("VERSION"), v).unwrap();
        }
        std::fs::write(rel.join("0.10.0/.hidden"), "x").unwrap();
        std::fs::write(dir.path().join("secret"), "x").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), rel.join("0.10.0/out")).unwrap();
        std::os::unix::fs::symlink(rel.join("0.9.0/VERSION"), rel.join("0.10.0/in")).unwrap();
        std::os::unix::fs::symlink(dir.path(), rel.join("9.9.9")).unwrap();

        // 9.9.9 is a symlink to a directory outside, so it is no release.
        assert_eq!(latest(&rel).as_deref(), Some("0.10.0"));
        assert!(resolve(&rel, "9.9.9", "secret").is_err());
        assert_eq!(
            resolve(&rel, "latest", "VERSION").unwrap(),
            rel.canonicalize().unwrap().join("0.10.0/VERSION")
        );
        assert!(resolve(&rel, "0.10.0", "in").is_ok());
        for (v, f) in [
            ("0.10.0", ".hidden"),
            ("0.10.0", "out"),
            ("0.10.0", "nope"),
            ("..", "secret"),
            ("0.10.0", ".."),
            ("1.0.0", "VERSION"),
            (".0.99.0", "VERSION"),
            ("0.10.0", "/etc/passwd"),
        ] {
            let e = resolve(&rel, v, f).unwrap_err();
            assert!(e.contains("no "), "{v}/{f}: {e}");
        }
        assert!(resolve(&dir.path().join("none"), "latest", "VERSION")
            .unwrap_err()
            .contains("no releases are published"));
    }
}
