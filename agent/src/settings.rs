//! The agent's configuration: a TOML file (`outpost-agent run --config FILE`), with the
//! environment overriding it (`OUTPOST_GATEWAY_URL`, `OUTPOST_ENROLL_KEY`,
//! `OUTPOST_PIN_SHA256`, `OUTPOST_CA_FILE`). Parsed into a raw struct that refuses unknown
//! keys, then validated into [`Settings`], reporting every problem at once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use outpost_protocol::{
    group_problem, hostname_problem, label_problem, MAX_GROUPS, MAX_HOSTNAME_BYTES, MAX_LABELS,
};
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    gateway_url: Option<String>,
    enroll_key: Option<String>,
    ca_file: Option<PathBuf>,
    pin_sha256: Option<String>,
    state_dir: Option<PathBuf>,
    fingerprint_file: Option<PathBuf>,
    secret_file: Option<PathBuf>,
    plugins_dir: Option<PathBuf>,
    machine_id_file: Option<PathBuf>,
    hostname: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    groups: Vec<String>,
    max_concurrent_checks: Option<usize>,
    outbox_max_mb: Option<u64>,
    reconnect_max_secs: Option<u64>,
    checks_dir: Option<PathBuf>,
    checks_poll_secs: Option<u64>,
    #[serde(default)]
    interpreters: BTreeMap<String, Vec<String>>,
    /// `[statsd]`: StatsD listeners for the host's applications (off without it).
    statsd: Option<RawStatsd>,
    /// `[graphite]`: Graphite plaintext listeners likewise.
    graphite: Option<RawGraphite>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGraphite {
    listen: Option<String>,
    flush_secs: Option<u64>,
    max_names: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStatsd {
    listen: Option<String>,
    flush_secs: Option<u64>,
    max_names: Option<usize>,
    percentiles: Option<Vec<f64>>,
}

/// Where things are when the configuration does not say: on Linux `/etc/outpost` and
/// `/opt/outpost/state`; on Windows everything under `%ProgramData%\Outpost`
/// (`C:\ProgramData\Outpost`), the binary itself in `C:\Program Files\Outpost`.
pub mod defaults {
    use std::path::PathBuf;

    /// The data directory the MSI made (`DataDir` under [`super::INSTALLER_KEY`]), else
    /// `%ProgramData%\Outpost`, else `C:\ProgramData\Outpost`. The registry comes first
    /// because a service's environment need not name the folder the installer used
    /// (under Wine its `%ProgramData%` is `C:\users\Public`).
    #[cfg(windows)]
    fn program_data() -> PathBuf {
        if let Some(dir) = crate::util::registry_string(super::INSTALLER_KEY, "DataDir") {
            return PathBuf::from(dir);
        }
        std::env::var_os("ProgramData")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(r"C:\ProgramData"))
            .join("Outpost")
    }

    /// The configuration file `run` and `service` read without `--config`.
    pub fn config_file() -> PathBuf {
        #[cfg(windows)]
        return program_data().join("agent.toml");
        #[cfg(not(windows))]
        PathBuf::from("/etc/outpost/agent.toml")
    }

    /// Identity files and `checks.d`.
    pub fn etc_dir() -> PathBuf {
        #[cfg(windows)]
        return program_data();
        #[cfg(not(windows))]
        PathBuf::from("/etc/outpost")
    }

    /// The outbox, check state, plugins.
    pub fn state_dir() -> PathBuf {
        #[cfg(windows)]
        return program_data().join("state");
        #[cfg(not(windows))]
        PathBuf::from("/opt/outpost/state")
    }

    /// The file holding the machine id; empty on Windows, where the id is the registry's
    /// `HKLM\SOFTWARE\Microsoft\Cryptography\MachineGuid`.
    pub fn machine_id_file() -> PathBuf {
        #[cfg(windows)]
        return PathBuf::new();
        #[cfg(not(windows))]
        PathBuf::from("/etc/machine-id")
    }
}

/// How the agent decides to trust the gateway's certificate. There is deliberately no
/// way to skip verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// The operating system's root certificates.
    SystemRoots,
    /// A PEM file of CA certificates.
    CaFile(PathBuf),
    /// The hex SHA-256 of the gateway's certificate (DER), for self-signed setups.
    Pin(String),
}

#[derive(Debug, Clone)]
pub struct Paths {
    pub state_dir: PathBuf,
    pub fingerprint_file: PathBuf,
    pub secret_file: PathBuf,
    pub plugins_dir: PathBuf,
    pub machine_id_file: PathBuf,
    /// Check files that applications on this host drop in (`checks.d`).
    pub checks_dir: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub gateway_url: String,
    pub host: String,
    pub port: u16,
    pub enroll_key: Option<String>,
    pub trust: Trust,
    pub paths: Paths,
    pub hostname: String,
    pub labels: BTreeMap<String, String>,
    pub groups: Vec<String>,
    pub max_concurrent_checks: usize,
    /// Most bytes the outbox file holds; the oldest results go first beyond it.
    pub outbox_max_bytes: u64,
    pub reconnect_max_secs: u64,
    /// How often `checks.d` is reread.
    pub checks_poll: std::time::Duration,
    /// Plugin file extension → interpreter argv, on top of the platform's defaults.
    pub interpreters: BTreeMap<String, Vec<String>>,
    /// StatsD listeners, when `[statsd]` is given.
    pub statsd: Option<crate::statsd::StatsdSettings>,
    /// Graphite plaintext listeners, when `[graphite]` is given.
    pub graphite: Option<crate::statsd::StatsdSettings>,
}

/// Every problem found in a configuration, one per line.
#[derive(Debug, thiserror::Error)]
#[error("invalid agent configuration{}:\n  - {}", .file.as_ref().map(|f| format!(" in {}", f.display())).unwrap_or_default(), .problems.join("\n  - "))]
pub struct ConfigError {
    pub file: Option<PathBuf>,
    pub problems: Vec<String>,
}

/// Split `wss://host[:port][/path]` into host and port; ws:// and other schemes refused.
pub fn parse_gateway_url(url: &str) -> Result<(String, u16), String> {
    let Some(rest) = url.strip_prefix("wss://") else {
        return Err(format!(
            "gateway URL {url:?} must use wss:// (TLS is required; ws:// is refused)"
        ));
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("gateway URL {url:?} has an unterminated [IPv6] host"))?;
        (h.to_string(), after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err(format!("gateway URL {url:?} has no host"));
    }
    let port = match port {
        None => 443,
        Some(p) => p
            .parse()
            .map_err(|_| format!("gateway URL {url:?} has an invalid port {p:?}"))?,
    };
    Ok((host, port))
}

/// Where the Windows installer (the MSI) leaves its settings: `HKLM\SOFTWARE\Outpost`.
pub const INSTALLER_KEY: &str = r"SOFTWARE\Outpost";

/// The installer's settings, named like the environment variables they stand for: on
/// Windows the MSI's properties from [`INSTALLER_KEY`] (`GatewayUrl`, `EnrollKey`,
/// `CaFile`, `PinSha256`); nothing elsewhere (install.sh writes `agent.toml` instead).
pub fn installer_settings() -> BTreeMap<String, String> {
    #[cfg(windows)]
    {
        [
            ("OUTPOST_GATEWAY_URL", "GatewayUrl"),
            ("OUTPOST_ENROLL_KEY", "EnrollKey"),
            ("OUTPOST_CA_FILE", "CaFile"),
            ("OUTPOST_PIN_SHA256", "PinSha256"),
        ]
        .into_iter()
        .filter_map(|(var, name)| {
            crate::util::registry_string(INSTALLER_KEY, name).map(|v| (var.to_string(), v))
        })
        .collect()
    }
    #[cfg(not(windows))]
    BTreeMap::new()
}

impl Settings {
    /// Read `path` and apply the environment, on top of what the installer set (see
    /// [`installer_settings`]). The file may be missing when the installer set something.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        let installer = installer_settings();
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !installer.is_empty() => {
                String::new()
            }
            Err(e) => {
                return Err(ConfigError {
                    file: Some(path.to_path_buf()),
                    problems: vec![format!("cannot read the file: {e}")],
                })
            }
        };
        let env: BTreeMap<String, String> = std::env::vars()
            .filter(|(k, _)| k.starts_with("OUTPOST_"))
            .collect();
        Self::from_sources(&text, &installer, &env).map_err(|mut e| {
            e.file = Some(path.to_path_buf());
            e
        })
    }

    pub fn from_toml(text: &str, env: &BTreeMap<String, String>) -> Result<Settings, ConfigError> {
        Self::from_sources(text, &BTreeMap::new(), env)
    }

    /// Parse `text`, fill what it leaves unset from `installer`, then let `env` override.
    /// The installer's trust (CA file or pin) applies only when the file names neither.
    pub fn from_sources(
        text: &str,
        installer: &BTreeMap<String, String>,
        env: &BTreeMap<String, String>,
    ) -> Result<Settings, ConfigError> {
        let mut raw: Raw = toml::from_str(text).map_err(|e| ConfigError {
            file: None,
            problems: vec![e.to_string()],
        })?;
        let given = |k: &str| installer.get(k).filter(|v| !v.trim().is_empty()).cloned();
        raw.gateway_url = raw.gateway_url.or_else(|| given("OUTPOST_GATEWAY_URL"));
        raw.enroll_key = raw.enroll_key.or_else(|| given("OUTPOST_ENROLL_KEY"));
        if raw.ca_file.is_none() && raw.pin_sha256.is_none() {
            raw.ca_file = given("OUTPOST_CA_FILE").map(PathBuf::from);
            raw.pin_sha256 = given("OUTPOST_PIN_SHA256");
        }
        if let Some(v) = env.get("OUTPOST_GATEWAY_URL") {
            raw.gateway_url = Some(v.clone());
        }
        if let Some(v) = env.get("OUTPOST_ENROLL_KEY") {
            raw.enroll_key = Some(v.clone());
        }
        if let Some(v) = env.get("OUTPOST_PIN_SHA256") {
            raw.pin_sha256 = Some(v.clone());
        }
        if let Some(v) = env.get("OUTPOST_CA_FILE") {
            raw.ca_file = Some(v.into());
        }
        let mut problems = Vec::new();
        let (gateway_url, host, port) = match raw.gateway_url {
            None => {
                problems.push("gateway_url is required (e.g. gateway_url = \"wss://gateway.example.com:8443\")".into());
                (String::new(), String::new(), 0)
            }
            Some(u) => match parse_gateway_url(&u) {
                Ok((h, p)) => (u, h, p),
                Err(e) => {
                    problems.push(e);
                    (u, String::new(), 0)
                }
            },
        };
        let trust = match (raw.ca_file, raw.pin_sha256) {
            (Some(_), Some(_)) => {
                problems.push("set either ca_file or pin_sha256, not both".into());
                Trust::SystemRoots
            }
            (Some(ca), None) => Trust::CaFile(ca),
            (None, Some(pin)) => {
                let pin = pin.trim().to_ascii_lowercase().replace(':', "");
                if pin.len() != 64 || !pin.bytes().all(|c| c.is_ascii_hexdigit()) {
                    problems.push(format!(
                        "pin_sha256 must be 64 hex digits (the gateway prints it at start and keeps it in tls/cert.sha256), got {pin:?}"
                    ));
                }
                Trust::Pin(pin)
            }
            (None, None) => Trust::SystemRoots,
        };
        let enroll_key = raw
            .enroll_key
            .filter(|k| !k.trim().is_empty())
            .map(|k| k.trim().to_string());
        let mut intake = |table: &str,
                          listen: Option<String>,
                          default_port: u16,
                          flush_secs: Option<u64>,
                          max_names: Option<usize>,
                          percentiles: Vec<f64>| {
            let given = listen.unwrap_or_else(|| format!("127.0.0.1:{default_port}"));
            let listen = given.parse::<std::net::SocketAddr>().unwrap_or_else(|e| {
                problems.push(format!(
                    "[{table}] listen {given:?}: {e} (an IP address and a port)"
                ));
                std::net::SocketAddr::from(([127, 0, 0, 1], default_port))
            });
            let flush_secs = flush_secs.unwrap_or(10);
            if !(1..=3600).contains(&flush_secs) {
                problems.push(format!("[{table}] flush_secs: 1 to 3600"));
            }
            let max_names = max_names.unwrap_or(10_000);
            if !(1..=100_000).contains(&max_names) {
                problems.push(format!("[{table}] max_names: 1 to 100000"));
            }
            if percentiles.len() > 10 || percentiles.iter().any(|p| !(*p > 0.0 && *p <= 100.0)) {
                problems.push(format!(
                    "[{table}] percentiles: at most 10, each above 0 and at most 100"
                ));
            }
            crate::statsd::StatsdSettings {
                listen,
                flush: std::time::Duration::from_secs(flush_secs),
                max_names,
                percentiles,
            }
        };
        let statsd = raw.statsd.map(|r| {
            let percentiles = r.percentiles.unwrap_or_else(|| vec![90.0, 95.0, 99.0]);
            intake(
                "statsd",
                r.listen,
                8125,
                r.flush_secs,
                r.max_names,
                percentiles,
            )
        });
        let graphite = raw.graphite.map(|r| {
            intake(
                "graphite",
                r.listen,
                2003,
                r.flush_secs,
                r.max_names,
                Vec::new(),
            )
        });
        if let (Some(s), Some(g)) = (&statsd, &graphite) {
            if s.listen.port() == g.listen.port() {
                problems.push(format!(
                    "[statsd] and [graphite] both listen on port {}: give them different ports",
                    s.listen.port()
                ));
            }
        }
        // The gateway refuses a hello that breaks these rules: say so here, at start.
        problems.extend(raw.labels.iter().filter_map(|(k, v)| label_problem(k, v)));
        problems.extend(raw.groups.iter().filter_map(|g| group_problem(g)));
        if raw.labels.len() > MAX_LABELS || raw.groups.len() > MAX_GROUPS {
            problems.push(format!(
                "at most {MAX_LABELS} labels and {MAX_GROUPS} groups"
            ));
        }
        if let Some(problem) = raw.hostname.as_deref().and_then(hostname_problem) {
            problems.push(problem);
        }
        for (ext, argv) in &raw.interpreters {
            if ext.trim_start_matches('.').is_empty() || argv.first().is_some_and(|p| p.is_empty())
            {
                problems.push(format!(
                    "interpreters.{ext}: give an extension and the program to run it (an empty list removes a default)"
                ));
            }
        }
        let max_concurrent_checks = raw.max_concurrent_checks.unwrap_or(32);
        if max_concurrent_checks == 0 {
            problems.push("max_concurrent_checks must be at least 1".into());
        }
        let (state_dir, etc_dir) = match raw.state_dir {
            Some(d) => (d.clone(), d),
            None => (defaults::state_dir(), defaults::etc_dir()),
        };
        if !problems.is_empty() {
            return Err(ConfigError {
                file: None,
                problems,
            });
        }
        Ok(Settings {
            gateway_url,
            host,
            port,
            enroll_key,
            trust,
            paths: Paths {
                fingerprint_file: raw
                    .fingerprint_file
                    .unwrap_or_else(|| etc_dir.join("agent.finger")),
                secret_file: raw
                    .secret_file
                    .unwrap_or_else(|| etc_dir.join("agent.secret")),
                plugins_dir: raw.plugins_dir.unwrap_or_else(|| state_dir.join("plugins")),
                machine_id_file: raw
                    .machine_id_file
                    .unwrap_or_else(defaults::machine_id_file),
                checks_dir: raw.checks_dir.unwrap_or_else(|| etc_dir.join("checks.d")),
                state_dir,
            },
            hostname: raw
                .hostname
                .unwrap_or_else(|| usable_hostname(&crate::util::hostname())),
            labels: raw.labels,
            groups: raw.groups,
            max_concurrent_checks,
            outbox_max_bytes: raw.outbox_max_mb.unwrap_or(100).clamp(1, 1 << 20) * 1_000_000,
            reconnect_max_secs: raw.reconnect_max_secs.unwrap_or(60).max(1),
            checks_poll: std::time::Duration::from_secs(
                raw.checks_poll_secs.unwrap_or(5).clamp(1, 3600),
            ),
            interpreters: raw.interpreters,
            statsd,
            graphite,
        })
    }
}

/// The machine's own name made acceptable to the gateway: control characters dropped,
/// cut to the longest hostname allowed, and `unknown` when nothing is left.
fn usable_hostname(raw: &str) -> String {
    let clean: String = raw.chars().filter(|c| !c.is_control()).collect();
    let mut name = outpost_protocol::printable(&clean, MAX_HOSTNAME_BYTES);
    if name.is_empty() {
        name = "unknown".into();
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_must_be_wss() {
        assert_eq!(
            parse_gateway_url("wss://gw.example:8443/x").unwrap(),
            ("gw.example".into(), 8443)
        );
        assert_eq!(
            parse_gateway_url("wss://gw.example").unwrap(),
            ("gw.example".into(), 443)
        );
        assert_eq!(
            parse_gateway_url("wss://[::1]:9").unwrap(),
            ("::1".into(), 9)
        );
        let e = parse_gateway_url("ws://gw.example").unwrap_err();
        assert!(e.contains("must use wss://"), "{e}");
        assert!(parse_gateway_url("wss://:1").is_err());
        assert!(parse_gateway_url("wss://h:notaport").is_err());
    }

    #[test]
    fn every_problem_is_reported_and_env_overrides_the_file() {
        let err = Settings::from_toml(
            "gateway_url = \"ws://x\"\npin_sha256 = \"abc\"\nmax_concurrent_checks = 0\n",
            &BTreeMap::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("must use wss://"), "{err}");
        assert!(err.contains("64 hex digits"), "{err}");
        assert!(err.contains("max_concurrent_checks"), "{err}");
        let pin = "ab".repeat(32);
        let env: BTreeMap<String, String> = [
            (
                "OUTPOST_GATEWAY_URL".to_string(),
                "wss://127.0.0.1:1".to_string(),
            ),
            ("OUTPOST_PIN_SHA256".to_string(), pin.clone()),
        ]
        .into();
        let s = Settings::from_toml("gateway_url = \"ws://x\"\nstate_dir = \"/tmp/s\"\n", &env)
            .unwrap();
        assert_eq!(s.port, 1);
        assert_eq!(s.trust, Trust::Pin(pin));
        assert_eq!(s.paths.secret_file, PathBuf::from("/tmp/s/agent.secret"));
    }

    #[test]
    fn installer_settings_fill_only_what_the_file_leaves_unset() {
        let pin = "cd".repeat(32);
        let installer: BTreeMap<String, String> = [
            ("OUTPOST_GATEWAY_URL", "wss://from-msi:8443"),
            ("OUTPOST_ENROLL_KEY", "msi-key"),
            ("OUTPOST_PIN_SHA256", pin.as_str()),
            ("OUTPOST_CA_FILE", ""),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let none = BTreeMap::new();
        let s = Settings::from_sources("", &installer, &none).unwrap();
        assert_eq!((s.host.as_str(), s.port), ("from-msi", 8443));
        assert_eq!(s.enroll_key.as_deref(), Some("msi-key"));
        assert_eq!(s.trust, Trust::Pin(pin.clone()));

        let file = "gateway_url = \"wss://from-file:1\"\nca_file = \"ca.pem\"\n";
        let s = Settings::from_sources(file, &installer, &none).unwrap();
        assert_eq!(s.host, "from-file");
        assert_eq!(
            s.trust,
            Trust::CaFile("ca.pem".into()),
            "no pin added to the file's CA"
        );
        assert_eq!(s.enroll_key.as_deref(), Some("msi-key"));

        let env: BTreeMap<String, String> = [(
            "OUTPOST_GATEWAY_URL".to_string(),
            "wss://from-env:2".to_string(),
        )]
        .into();
        let s = Settings::from_sources(file, &installer, &env).unwrap();
        assert_eq!(s.host, "from-env");

        let bad: BTreeMap<String, String> =
            [("OUTPOST_GATEWAY_URL".to_string(), "http://x".to_string())].into();
        let err = Settings::from_sources("", &bad, &none)
            .unwrap_err()
            .to_string();
        assert!(err.contains("must use wss://"), "{err}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = Settings::from_toml(
            "gateway_url = \"wss://x\"\ninsecure_skip_verify = true\n",
            &BTreeMap::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("unknown field"), "{err}");
    }
}
