//! The bus options of `serve` and `config push`: which bus (embedded or NATS), how to
//! reach NATS, and how much of the results either keeps.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::nats::{inbox_prefix, NatsSettings};

/// The longest `--results-max-age-hours`: ten years.
const MAX_RESULTS_AGE_HOURS: u64 = 10 * 366 * 24;

/// `serve` options for the bus: embedded, or NATS JetStream (and how much it keeps).
#[derive(Debug, Clone, Args)]
pub struct BusArgs {
    /// `embedded` (one gateway, files under DATA_DIR/bus) or `nats://HOST:PORT[,HOST:PORT…]`
    /// (a fleet of gateways sharing NATS JetStream). `tls://` URLs require TLS.
    #[arg(long, env = "OUTPOST_BUS", default_value = "embedded", value_parser = parse_bus)]
    pub bus: BusChoice,
    /// NATS credentials file (JWT and nkey seed, as `nsc` writes it).
    #[arg(long, env = "OUTPOST_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// NATS user (with --nats-password).
    #[arg(long, env = "OUTPOST_NATS_USER", requires = "nats_password")]
    pub nats_user: Option<String>,
    /// NATS password.
    #[arg(long, env = "OUTPOST_NATS_PASSWORD", requires = "nats_user")]
    pub nats_password: Option<String>,
    /// CA certificate (PEM) to verify the NATS servers with; implies TLS.
    #[arg(long, env = "OUTPOST_NATS_CA")]
    pub nats_ca: Option<PathBuf>,
    /// Client certificate (PEM) for NATS servers that require one.
    #[arg(long, env = "OUTPOST_NATS_CERT", requires = "nats_key")]
    pub nats_cert: Option<PathBuf>,
    /// Key for --nats-cert.
    #[arg(long, env = "OUTPOST_NATS_KEY", requires = "nats_cert")]
    pub nats_key: Option<PathBuf>,
    /// Copies JetStream keeps of each stream and bucket (1-5). Default: 3 when three or
    /// more servers are given, else 1. Three survive the loss of one server.
    #[arg(long, env = "OUTPOST_NATS_REPLICAS", value_parser = clap::value_parser!(u8).range(1..=5))]
    pub nats_replicas: Option<u8>,
    /// Hours results are kept (1-87840), in the NATS results stream or the embedded bus
    /// files (their consumers must read them by then). Presence events on the embedded bus too.
    #[arg(long, default_value_t = 168)]
    pub results_max_age_hours: u64,
    /// Bytes of results kept, in the NATS stream or the embedded bus files; the oldest go
    /// first beyond it (0: no limit). Default: on the embedded bus a quarter of the data
    /// directory's filesystem (at least 256 MiB, at most 64 GiB); on NATS none of our own
    /// (the server's `max_file_store` bounds JetStream, which then refuses writes, so
    /// results wait on the agents instead of being dropped).
    #[arg(long)]
    pub results_max_bytes: Option<u64>,
    /// Seconds JetStream remembers a `Nats-Msg-Id` to drop a resent result (1-86400).
    #[arg(long, default_value_t = 600)]
    pub dedup_window_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusChoice {
    Embedded,
    Nats(Vec<String>),
}

fn parse_bus(s: &str) -> Result<BusChoice, String> {
    if s == "embedded" {
        return Ok(BusChoice::Embedded);
    }
    let urls: Vec<String> = s
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_string)
        .collect();
    if urls.is_empty()
        || !urls.iter().all(|u| {
            ["nats://", "tls://"]
                .iter()
                .any(|p| u.strip_prefix(p).is_some_and(|rest| !rest.is_empty()))
        })
    {
        return Err(format!(
            "{s:?}: expected `embedded` or nats://HOST:PORT[,nats://HOST:PORT…] (tls:// for TLS)"
        ));
    }
    Ok(BusChoice::Nats(urls))
}

impl BusArgs {
    /// How much of the results the bus keeps, as given (no byte cap when none was).
    pub fn retention(&self) -> crate::bus::segments::Retention {
        crate::bus::segments::Retention {
            max_age: Duration::from_secs(self.results_max_age_hours.max(1).saturating_mul(3600)),
            max_bytes: self.results_max_bytes.unwrap_or(0),
        }
    }

    /// [`Self::retention`] for the embedded bus under `data_dir`: without
    /// `--results-max-bytes`, a quarter of that filesystem's size, so one agent sending
    /// as fast as it is allowed cannot fill the gateway's disk.
    pub fn embedded_retention(
        &self,
        data_dir: &std::path::Path,
    ) -> crate::bus::segments::Retention {
        let mut r = self.retention();
        if self.results_max_bytes.is_none() {
            r.max_bytes = default_embedded_max_bytes(filesystem_bytes(data_dir));
        }
        r
    }

    /// What is wrong with these options, each problem naming its fix: values out of range,
    /// and what JetStream would refuse when the stream is made.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !(1..=86_400).contains(&self.dedup_window_secs) {
            problems.push(format!(
                "--dedup-window-secs {}: use 1..=86400 seconds",
                self.dedup_window_secs
            ));
        }
        if !(1..=MAX_RESULTS_AGE_HOURS).contains(&self.results_max_age_hours) {
            problems.push(format!(
                "--results-max-age-hours {}: use 1..={MAX_RESULTS_AGE_HOURS} hours",
                self.results_max_age_hours
            ));
        }
        if self.results_max_bytes.is_some_and(|b| b > i64::MAX as u64) {
            problems.push(format!(
                "--results-max-bytes: at most {} (0: no limit)",
                i64::MAX
            ));
        }
        let (window, max_age) = (self.dedup_window(), self.retention().max_age);
        if matches!(self.bus, BusChoice::Nats(_)) && problems.is_empty() && window > max_age {
            problems.push(format!(
                "--dedup-window-secs {} is longer than --results-max-age-hours {} ({} s): \
                 JetStream cannot remember a result's id longer than it keeps the result",
                window.as_secs(),
                max_age.as_secs() / 3600,
                max_age.as_secs()
            ));
        }
        problems
    }

    fn dedup_window(&self) -> Duration {
        Duration::from_secs(self.dedup_window_secs)
    }

    /// The NATS settings a gateway started with `--bus URL` and the flags `more` would
    /// use (for tools and tests that talk to the bus as a gateway does).
    pub fn nats_from_flags(url: &str, more: &[&str]) -> Result<NatsSettings, String> {
        use clap::Parser;
        #[derive(Parser)]
        struct Flags {
            #[command(flatten)]
            bus: BusArgs,
        }
        Flags::try_parse_from(["outpost-gateway", "--bus", url].iter().chain(more))
            .map_err(|e| e.to_string())?
            .bus
            .settings()
            .ok_or_else(|| format!("{url} is not a NATS URL"))
    }

    pub fn settings(&self) -> Option<NatsSettings> {
        let BusChoice::Nats(urls) = &self.bus else {
            return None;
        };
        let replicas = match self.nats_replicas {
            Some(r) => r as usize,
            None if urls.len() >= 3 => 3,
            None => 1,
        };
        Some(NatsSettings {
            urls: urls.clone(),
            creds: self.nats_creds.clone(),
            user: self.nats_user.clone().zip(self.nats_password.clone()),
            ca: self.nats_ca.clone(),
            client_cert: self.nats_cert.clone().zip(self.nats_key.clone()),
            replicas,
            results_max_age: self.retention().max_age,
            results_max_bytes: match self.retention().max_bytes {
                0 => -1,
                cap => i64::try_from(cap).unwrap_or(i64::MAX),
            },
            dedup_window: self.dedup_window(),
            inbox_prefix: inbox_prefix(crate::tenant::DEFAULT_TENANT),
            home: crate::tenant::DEFAULT_TENANT.to_string(),
        })
    }
}

/// A quarter of a filesystem of `fs_bytes` (unknown: 0), between 256 MiB and 64 GiB.
fn default_embedded_max_bytes(fs_bytes: u64) -> u64 {
    (fs_bytes / 4).clamp(256 << 20, 64 << 30)
}

/// The size of the filesystem that holds `path` (or its nearest existing ancestor); 0 when
/// it cannot be told.
fn filesystem_bytes(path: &std::path::Path) -> u64 {
    use std::os::unix::ffi::OsStrExt as _;
    let existing = path.ancestors().find(|p| p.exists()).unwrap_or(path);
    let Ok(c) = std::ffi::CString::new(existing.as_os_str().as_bytes()) else {
        return 0;
    };
    // SAFETY: `c` is a valid NUL-terminated path; `st` is written by statvfs on success.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return 0;
    }
    (st.f_blocks as u64).saturating_mul(st.f_frsize as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without `--results-max-bytes` the embedded bus is bounded by its disk's size; an
    /// explicit value (0 included: no cap) is kept as given.
    #[test]
    fn the_embedded_bus_has_a_finite_default_and_an_explicit_cap_wins() {
        assert_eq!(default_embedded_max_bytes(0), 256 << 20);
        assert_eq!(default_embedded_max_bytes(40 << 30), 10 << 30);
        assert_eq!(default_embedded_max_bytes(1 << 50), 64 << 30);
        let dir = tempfile::tempdir().unwrap();
        let fs = filesystem_bytes(&dir.path().join("not/yet/made"));
        assert!(fs > 0, "the filesystem of a temporary directory has a size");
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            nats: BusArgs,
        }
        let parse = |args: &[&str]| {
            <Cli as clap::Parser>::try_parse_from(std::iter::once("x").chain(args.iter().copied()))
                .unwrap()
                .nats
        };
        let auto = parse(&[]).embedded_retention(dir.path());
        assert_eq!(auto.max_bytes, default_embedded_max_bytes(fs));
        assert_eq!(
            parse(&["--results-max-bytes", "0"])
                .embedded_retention(dir.path())
                .max_bytes,
            0
        );
        assert_eq!(
            parse(&["--results-max-bytes", "4096"])
                .embedded_retention(dir.path())
                .max_bytes,
            4096
        );
        assert_eq!(
            parse(&[]).retention().max_bytes,
            0,
            "NATS: the server bounds it"
        );
    }

    #[test]
    fn a_dedup_window_longer_than_the_max_age_is_refused() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            nats: BusArgs,
        }
        let args = |more: &[&str]| {
            use clap::Parser;
            Cli::parse_from(["gw"].iter().chain(more)).nats
        };
        let nats = ["--bus", "nats://a:4222", "--results-max-age-hours", "1"];
        let err = args(&[&nats[..], &["--dedup-window-secs", "3601"]].concat())
            .problems()
            .join("\n");
        assert!(
            err.contains("--dedup-window-secs 3601 is longer than --results-max-age-hours 1"),
            "{err}"
        );
        let ok = args(&[&nats[..], &["--dedup-window-secs", "3600"]].concat()).problems();
        assert_eq!(ok, Vec::<String>::new());
        // The embedded bus has no duplicate window to compare.
        let ok = args(&[
            "--results-max-age-hours",
            "1",
            "--dedup-window-secs",
            "7200",
        ])
        .problems();
        assert_eq!(ok, Vec::<String>::new());
    }

    #[test]
    fn bus_urls_are_checked() {
        assert_eq!(parse_bus("embedded").unwrap(), BusChoice::Embedded);
        assert_eq!(
            parse_bus("nats://a:4222, tls://b:4222").unwrap(),
            BusChoice::Nats(vec!["nats://a:4222".into(), "tls://b:4222".into()])
        );
        for bad in [
            "",
            "nats://",
            "http://a:4222",
            "a:4222",
            "nats://a,http://b",
        ] {
            let err = parse_bus(bad).unwrap_err();
            assert!(err.contains("expected `embedded`"), "{bad}: {err}");
        }
    }
}
