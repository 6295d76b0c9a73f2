//! The gateway's settings, from the command line (and environment): parsed by clap into
//! [`ServeArgs`], then checked into [`Settings`] with every problem listed at once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

pub mod bus;

/// `--max-unauthenticated-per-address` when not given.
pub const DEFAULT_PER_ADDRESS: usize = 64;

/// `outpost-gateway serve` options.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on for agents, the API and the console (TLS).
    #[arg(long, env = "OUTPOST_LISTEN", default_value = "127.0.0.1:8443")]
    pub listen: SocketAddr,
    /// Directory for keys, certificates, the agent registry and the embedded bus.
    #[arg(
        long,
        env = "OUTPOST_DATA_DIR",
        default_value = "/var/lib/outpost-gateway"
    )]
    pub data_dir: PathBuf,
    /// Directory of check definitions (*.toml). Default: DATA_DIR/checks.d. Not with
    /// `--bus nats://…`: a fleet's checks live in NATS (`outpost-gateway config push`).
    #[arg(long, env = "OUTPOST_CHECKS_DIR")]
    pub checks_dir: Option<PathBuf>,
    /// The plugin catalog served to agents. Default: DATA_DIR/plugins. Not with
    /// `--bus nats://…` (see --checks-dir).
    #[arg(long, env = "OUTPOST_PLUGINS_DIR")]
    pub plugins_dir: Option<PathBuf>,
    /// Agent releases served to the installer and to self-updating agents, one
    /// subdirectory per version. Default: DATA_DIR/releases
    #[arg(long, env = "OUTPOST_RELEASES_DIR")]
    pub releases_dir: Option<PathBuf>,
    /// The address agents and the installer use for this gateway (`https://host[:port]`),
    /// written into `/install.sh` as its default gateway. Without it, the request's Host
    /// header is used when it is a plain `hostname[:port]`.
    #[arg(long, env = "OUTPOST_PUBLIC_URL", value_parser = parse_public_url)]
    pub public_url: Option<String>,
    /// PEM certificate chain to serve instead of the generated self-signed one.
    #[arg(long, env = "OUTPOST_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "OUTPOST_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Extra DNS names or IPs for the generated certificate (repeatable).
    #[arg(long = "tls-san")]
    pub tls_san: Vec<String>,
    /// Seconds an agent has to send `hello` after the websocket opens (1-3600); it is closed
    /// with 4408 otherwise.
    #[arg(long, default_value_t = outpost_protocol::HELLO_DEADLINE.as_secs())]
    pub hello_timeout: u64,
    /// Seconds between websocket pings agents should send (told them in `welcome`, 1-3600);
    /// an agent silent for three of them is disconnected.
    #[arg(long, default_value_t = 15)]
    pub heartbeat: u64,
    /// Seconds between rescans of the checks directory (on NATS: of its mirror of the
    /// fleet's checks), 1-3600.
    #[arg(long, default_value_t = 2)]
    pub checks_poll: u64,
    /// Seconds to wait for sessions to end on shutdown (0-3600); agents are asked to come
    /// back after a random delay of up to half of it (at most 30 s).
    #[arg(long, default_value_t = 10)]
    pub grace: u64,
    /// Address (`ip:port`) agents may dial when this gateway's name does not resolve, e.g.
    /// the load balancer's (repeatable). Sent in `welcome`; agents keep it on disk.
    #[arg(long = "fallback-addr")]
    pub fallback_addr: Vec<SocketAddr>,
    /// Longest agent session in seconds (at most 30 days; 0: no limit); agents reconnect at
    /// a random point between half of it and all of it, spreading load across gateways.
    #[arg(long, default_value_t = 3600)]
    pub max_session: u64,
    /// Most agents connected at once (0: no limit); more are told to come back later.
    #[arg(long, default_value_t = 0)]
    pub max_agents: usize,
    /// Seconds an agent refused for overload waits before it dials again (at random
    /// between half of it and all of it), 1-86400.
    #[arg(long, default_value_t = 60)]
    pub overload_retry: u64,
    /// Most connections not yet authenticated (every connection until it closes, or an
    /// agent's until its hello is accepted): more are closed at once, before TLS.
    /// Default: a quarter of the file descriptor limit (after the gateway raises its soft
    /// limit to the hard one), between 64 and 16384. 0: no limit.
    #[arg(long)]
    pub max_unauthenticated: Option<usize>,
    /// Most of those from one address (an IPv6 /64), counted only while at least half of
    /// --max-unauthenticated are in use. 0: no limit.
    #[arg(long, default_value_t = DEFAULT_PER_ADDRESS)]
    pub max_unauthenticated_per_address: usize,
    /// Seconds a write to a client (a response body, a websocket frame) may make no
    /// progress before the connection is closed (at most 86400). 0: no deadline.
    #[arg(long, default_value_t = 30)]
    pub write_deadline_secs: u64,
    /// Events one client of the event stream (`GET /api/v1/events`) may have waiting for
    /// it (1 to 100000).
    #[arg(long, default_value_t = 1024)]
    pub events_buffer: u64,
    /// Seconds a client of the event stream may leave a full buffer waiting before its
    /// stream is ended with an `error` event (it resumes from its last id; 1 to 3600).
    #[arg(long, default_value_t = 10)]
    pub events_stall_secs: u64,
    /// Results per second one agent may hand to the bus; beyond it the gateway holds its
    /// acks, so the rest waits in the agent's disk outbox (nothing is dropped). 0: no limit.
    #[arg(long, default_value_t = 1000)]
    pub agent_max_results_per_sec: u64,
    /// Bytes of results per second one agent may hand to the bus (as the results frames'
    /// size), held the same way. 0: no limit.
    #[arg(long, default_value_t = 2 * 1024 * 1024)]
    pub agent_max_bytes_per_sec: u64,
    /// Seconds a connection that ended without `bye` stays online before the agent is
    /// published as lost, so a quick reconnect (to this or another gateway) is no alarm
    /// (at most 86400).
    #[arg(long, env = "OUTPOST_PRESENCE_GRACE", default_value_t = 30)]
    pub presence_grace: u64,
    /// The home tenant: created at the first start with DATA_DIR/enroll.key as its first
    /// enrollment key and DATA_DIR/api.token as its admin token, and the tenant of agent
    /// secrets from before tenants. Other tenants are created through the operator API.
    #[arg(long, env = "OUTPOST_TENANT", default_value = crate::tenant::DEFAULT_TENANT, value_parser = crate::tenant::parse_name)]
    pub tenant: String,
    /// This gateway's name in the fleet registry. Default: the one saved in DATA_DIR/gateway.id
    /// (generated on first start).
    #[arg(long, env = "OUTPOST_GATEWAY_ID", value_parser = crate::tenant::parse_name)]
    pub gateway_id: Option<String>,
    /// A file holding the fleet operator's token (manages tenants through the API; give
    /// every gateway of a fleet the same). Default: DATA_DIR/operator.token, generated at
    /// the first start.
    #[arg(long, env = "OUTPOST_OPERATOR_TOKEN_FILE")]
    pub operator_token_file: Option<PathBuf>,
    #[command(flatten)]
    pub nats: bus::BusArgs,
}

/// Checked settings with every default resolved.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub checks_dir: PathBuf,
    pub plugins_dir: PathBuf,
    pub releases_dir: PathBuf,
    /// `host[:port]` of `--public-url`.
    pub public_authority: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_sans: Vec<String>,
    pub hello_timeout: Duration,
    pub heartbeat: Duration,
    pub checks_poll: Duration,
    pub grace: Duration,
    pub fallback_addrs: Vec<SocketAddr>,
    pub max_session: Duration,
    pub max_agents: usize,
    pub overload_retry: Duration,
    pub presence_grace: Duration,
    /// `None`: derived from the file descriptor limit at start (see `listener::admission`).
    pub max_unauthenticated: Option<usize>,
    pub max_unauthenticated_per_address: usize,
    /// `None`: writes wait for the peer as long as it takes.
    pub write_deadline: Option<Duration>,
    /// Each event stream client's buffer and patience.
    pub events: crate::events::Limits,
    /// How fast one agent may hand results to the bus (see `rate`).
    pub agent_rate: crate::rate::AgentRate,
    pub tenant: String,
    pub gateway_id: Option<String>,
    pub operator_token_file: Option<PathBuf>,
    /// `None`: the embedded bus.
    pub nats: Option<crate::nats::NatsSettings>,
    /// How much of the results the embedded bus keeps (the NATS stream's are in `nats`).
    pub retention: crate::bus::segments::Retention,
}

/// What is wrong with the gateway's options: every problem at once, each naming its fix.
#[derive(Debug, thiserror::Error)]
#[error("invalid gateway options:\n  - {}", .problems.join("\n  - "))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

/// `--NAME VALUE` must lie in `range`; the problem says which values are allowed.
fn in_range(
    problems: &mut Vec<String>,
    name: &str,
    value: u64,
    range: std::ops::RangeInclusive<u64>,
    unit: &str,
) {
    if !range.contains(&value) {
        problems.push(format!(
            "--{name} {value}: use {}..={} {unit}",
            range.start(),
            range.end()
        ));
    }
}

impl Settings {
    /// Check `a` and resolve its defaults. Every value out of its documented range is a
    /// problem (nothing is clamped behind the operator's back), and all problems are
    /// reported together.
    pub fn from_args(a: ServeArgs) -> Result<Settings, ConfigError> {
        let mut problems = Vec::new();
        let p = &mut problems;
        in_range(p, "hello-timeout", a.hello_timeout, 1..=3600, "seconds");
        in_range(p, "heartbeat", a.heartbeat, 1..=3600, "seconds");
        in_range(p, "checks-poll", a.checks_poll, 1..=3600, "seconds");
        in_range(p, "grace", a.grace, 0..=3600, "seconds");
        in_range(p, "overload-retry", a.overload_retry, 1..=86_400, "seconds");
        in_range(p, "presence-grace", a.presence_grace, 0..=86_400, "seconds");
        in_range(
            p,
            "write-deadline-secs",
            a.write_deadline_secs,
            0..=86_400,
            "seconds (0: no deadline)",
        );
        in_range(p, "events-buffer", a.events_buffer, 1..=100_000, "events");
        in_range(
            p,
            "events-stall-secs",
            a.events_stall_secs,
            1..=3600,
            "seconds",
        );
        in_range(
            p,
            "max-session",
            a.max_session,
            0..=30 * 86_400,
            "seconds (0: no limit)",
        );
        problems.extend(a.nats.problems());
        let clustered = a.nats.settings().is_some();
        if clustered && (a.checks_dir.is_some() || a.plugins_dir.is_some()) {
            problems.push("--checks-dir/--plugins-dir: with --bus nats://… the checks and plugins come from NATS (mirrored under DATA_DIR/fleet); push a directory with `outpost-gateway config push DIR` instead".into());
        }
        if !problems.is_empty() {
            return Err(ConfigError { problems });
        }
        let nats = a.nats.settings().map(|n| n.for_tenant(&a.tenant));
        let retention = a.nats.embedded_retention(&a.data_dir);
        // In a fleet the checks and plugins come from NATS, mirrored here.
        let (fleet_checks, fleet_plugins) = mirror_dirs(&a.data_dir);
        let secs = Duration::from_secs;
        Ok(Settings {
            checks_dir: a.checks_dir.unwrap_or_else(|| {
                if clustered {
                    fleet_checks
                } else {
                    a.data_dir.join("checks.d")
                }
            }),
            plugins_dir: a.plugins_dir.unwrap_or_else(|| {
                if clustered {
                    fleet_plugins
                } else {
                    a.data_dir.join("plugins")
                }
            }),
            releases_dir: a
                .releases_dir
                .unwrap_or_else(|| a.data_dir.join("releases")),
            public_authority: a.public_url,
            listen: a.listen,
            tls_cert: a.tls_cert,
            tls_key: a.tls_key,
            tls_sans: a.tls_san,
            hello_timeout: secs(a.hello_timeout),
            heartbeat: secs(a.heartbeat),
            checks_poll: secs(a.checks_poll),
            grace: secs(a.grace),
            fallback_addrs: a.fallback_addr,
            max_session: secs(a.max_session),
            max_agents: a.max_agents,
            overload_retry: secs(a.overload_retry),
            presence_grace: secs(a.presence_grace),
            max_unauthenticated: a.max_unauthenticated,
            max_unauthenticated_per_address: a.max_unauthenticated_per_address,
            write_deadline: (a.write_deadline_secs > 0).then(|| secs(a.write_deadline_secs)),
            events: crate::events::Limits {
                buffer: a.events_buffer as usize,
                stall: secs(a.events_stall_secs),
            },
            agent_rate: crate::rate::AgentRate {
                results_per_sec: a.agent_max_results_per_sec,
                bytes_per_sec: a.agent_max_bytes_per_sec,
            },
            tenant: a.tenant,
            gateway_id: a.gateway_id,
            operator_token_file: a.operator_token_file,
            nats,
            retention,
            data_dir: a.data_dir,
        })
    }
}

/// Where a gateway mirrors the fleet's configuration.
pub fn mirror_dirs(data_dir: &std::path::Path) -> (PathBuf, PathBuf) {
    let base = data_dir.join("fleet");
    (base.join("checks.d"), base.join("plugins"))
}

/// Whether `s` is a `hostname[:port]`, `ipv4[:port]` or `[ipv6][:port]` and nothing else,
/// so that it can go into a shell script and a URL as it is.
pub fn valid_authority(s: &str) -> bool {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let Some((v6, after)) = rest.split_once(']') else {
            return false;
        };
        if v6.is_empty()
            || !v6
                .bytes()
                .all(|c| c.is_ascii_hexdigit() || c == b':' || c == b'.')
        {
            return false;
        }
        match after {
            "" => return true,
            p => match p.strip_prefix(':') {
                Some(p) => ("x", p),
                None => return false,
            },
        }
    } else {
        match s.split_once(':') {
            Some((h, p)) => (h, p),
            None => (s, "1"),
        }
    };
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && !host.starts_with(['-', '.'])
        && host
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.');
    let port_ok = !port.is_empty()
        && port.len() <= 5
        && port.bytes().all(|c| c.is_ascii_digit())
        && port.parse::<u16>().is_ok_and(|p| p > 0);
    host_ok && port_ok
}

/// `--public-url https://host[:port]` → `host[:port]`.
pub fn parse_public_url(url: &str) -> Result<String, String> {
    let authority = url
        .strip_prefix("https://")
        .ok_or_else(|| format!("--public-url {url:?} must start with https://"))?
        .trim_end_matches('/');
    if !valid_authority(authority) {
        return Err(format!(
            "--public-url {url:?} must be https://HOST[:PORT] with nothing after it (no path, user or query)"
        ));
    }
    Ok(authority.to_string())
}
