//! What a check runs: a program (Nagios, JSON or daemon plugin) or one of the built-in
//! probes that need nothing installed on the host.
//!
//! On the wire a probe is an object tagged by `kind`, e.g.
//! `{"kind":"http","url":"https://example.com/health","expect_status":[200]}`.
//! Every built-in parameter has a default that makes sense on its own, so the smallest
//! useful definition is just the kind and its address.
//!
//! The latency and TLS fields are written out in each probe that has them rather than
//! shared through `#[serde(flatten)]`: serde cannot refuse unknown keys of a flattened
//! struct, and a misspelt key in a check file must be an error, not silently ignored.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What a check runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Probe {
    /// A Nagios plugin: exit code 0..=3, first line, perfdata, long output.
    Nagios(Command),
    /// A program that prints one JSON document: status, text, metrics and faults.
    Json(Command),
    /// A long-running program that prints one JSON document per line; kept running and
    /// restarted with backoff when it exits.
    Daemon(Command),
    /// A long-running program the agent sends one JSON request per line on stdin and that
    /// answers each with one JSON document on stdout (a "remote daemon": one process
    /// polls many targets, keeping its sessions warm); run on the check's schedule like
    /// any check, each run one request with the check's timeout.
    Request(RequestProbe),
    /// CPU busy percent since the previous run.
    Cpu(Thresholds),
    /// Memory used percent.
    Memory(Thresholds),
    /// Swap used percent.
    Swap(Thresholds),
    /// Space used percent on the filesystem holding `path`.
    Disk(DiskProbe),
    /// Load averages; thresholds apply to the 1-minute load.
    Load(Thresholds),
    /// Traffic and error counters per network interface.
    Network(NetworkProbe),
    /// Processes matching a name: how many, their memory and CPU.
    Process(ProcessProbe),
    /// TCP connect, optionally over TLS, optionally sending a line and expecting a reply.
    Tcp(TcpProbe),
    /// An HTTP(S) request: status, body match, latency, certificate days left.
    Http(HttpProbe),
    /// DNS resolution, optionally against a given server, with expected answers.
    Dns(DnsProbe),
    /// A Prometheus text endpoint scraped into metrics.
    Prometheus(PrometheusProbe),
    /// A TCP or unix socket that answers with one JSON document (same format as a JSON
    /// plugin), for applications in containers.
    JsonSocket(JsonSocketProbe),
    /// A kind this side does not know (sent by a newer peer): never run, reported. Not in
    /// the schema: no peer sends it, and it would make the schema accept any `kind`.
    #[serde(other)]
    #[schemars(skip)]
    Unsupported,
}

impl Probe {
    /// The program and arguments, for the kinds that run one.
    pub fn command(&self) -> Option<&[String]> {
        match self {
            Probe::Nagios(c) | Probe::Json(c) | Probe::Daemon(c) => Some(&c.command),
            Probe::Request(r) => Some(&r.command),
            _ => None,
        }
    }

    pub fn command_mut(&mut self) -> Option<&mut Vec<String>> {
        match self {
            Probe::Nagios(c) | Probe::Json(c) | Probe::Daemon(c) => Some(&mut c.command),
            Probe::Request(r) => Some(&mut r.command),
            _ => None,
        }
    }

    /// The `kind` tag, for logs and diffs.
    pub fn kind(&self) -> &'static str {
        match self {
            Probe::Nagios(_) => "nagios",
            Probe::Json(_) => "json",
            Probe::Daemon(_) => "daemon",
            Probe::Request(_) => "request",
            Probe::Cpu(_) => "cpu",
            Probe::Memory(_) => "memory",
            Probe::Swap(_) => "swap",
            Probe::Disk(_) => "disk",
            Probe::Load(_) => "load",
            Probe::Network(_) => "network",
            Probe::Process(_) => "process",
            Probe::Tcp(_) => "tcp",
            Probe::Http(_) => "http",
            Probe::Dns(_) => "dns",
            Probe::Prometheus(_) => "prometheus",
            Probe::JsonSocket(_) => "json_socket",
            Probe::Unsupported => "unsupported",
        }
    }

    /// What can be known wrong about a probe before it runs: a URL that is not HTTP(S), a
    /// missing host or port, an unknown record type, thresholds that are not numbers.
    pub fn validate(&self) -> Result<(), String> {
        let finite = |name: &str, v: Option<f64>| match v {
            Some(x) if !x.is_finite() => Err(format!("{name} must be a number")),
            _ => Ok(()),
        };
        let url = |u: &str| {
            let rest = u
                .strip_prefix("http://")
                .or_else(|| u.strip_prefix("https://"))
                .ok_or_else(|| format!("url {u:?} must start with http:// or https://"))?;
            if rest.is_empty() || rest.starts_with('/') {
                return Err(format!("url {u:?} has no host"));
            }
            Ok(())
        };
        match self {
            Probe::Unsupported => {
                return Err("this agent does not know the probe kind; upgrade it".into())
            }
            Probe::Nagios(c) | Probe::Json(c) | Probe::Daemon(c) => {
                if c.command.first().is_none_or(|p| p.is_empty()) {
                    return Err("command is empty".into());
                }
            }
            Probe::Request(r) => {
                if r.command.first().is_none_or(|p| p.is_empty()) {
                    return Err("command is empty".into());
                }
                let size = serde_json::to_vec(&r.request).map_or(usize::MAX, |v| v.len());
                if size > MAX_REQUEST_BYTES {
                    return Err(format!(
                        "request is {size} bytes as JSON; at most {MAX_REQUEST_BYTES}"
                    ));
                }
            }
            Probe::Cpu(t) | Probe::Memory(t) | Probe::Swap(t) | Probe::Load(t) => {
                finite("warn", t.warn)?;
                finite("crit", t.crit)?;
            }
            Probe::Disk(d) => {
                finite("warn", d.warn)?;
                finite("crit", d.crit)?;
                if d.path.is_empty() {
                    return Err("disk path is empty".into());
                }
            }
            Probe::Network(_) => {}
            Probe::Process(p) => {
                if p.name.is_empty() {
                    return Err("process name is empty".into());
                }
                if p.max.is_some_and(|m| m < p.min) {
                    return Err(format!("process max {:?} is below min {}", p.max, p.min));
                }
            }
            Probe::Tcp(t) => {
                if t.host.is_empty() || t.port == 0 {
                    return Err("tcp needs a host and a port (1-65535)".into());
                }
            }
            Probe::Http(h) => {
                url(&h.url)?;
                if h.method.is_empty() || !h.method.bytes().all(|b| b.is_ascii_uppercase()) {
                    return Err(format!("method {:?} is not an HTTP method", h.method));
                }
                if let Some(bad) = h.expect_status.iter().find(|s| !(100..=599).contains(*s)) {
                    return Err(format!("expect_status {bad} is not an HTTP status"));
                }
            }
            Probe::Dns(d) => {
                if d.name.is_empty() {
                    return Err("dns name is empty".into());
                }
                const TYPES: &[&str] = &["A", "AAAA", "CNAME", "MX", "NS", "PTR", "SRV", "TXT"];
                if !TYPES.contains(&d.record_type.to_ascii_uppercase().as_str()) {
                    return Err(format!(
                        "record_type {:?} is not one of {}",
                        d.record_type,
                        TYPES.join(", ")
                    ));
                }
            }
            Probe::Prometheus(p) => url(&p.url)?,
            Probe::JsonSocket(j) => {
                let ok = j
                    .address
                    .strip_prefix("tcp://")
                    .map(|a| {
                        a.rsplit_once(':').is_some_and(|(h, p)| {
                            !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0)
                        })
                    })
                    .or_else(|| j.address.strip_prefix("unix:").map(|p| !p.is_empty()))
                    .unwrap_or(false);
                if !ok {
                    return Err(format!(
                        "address {:?} must be tcp://HOST:PORT or unix:/PATH",
                        j.address
                    ));
                }
            }
        }
        Ok(())
    }

    /// Every kind name, for error messages.
    pub const KINDS: &'static [&'static str] = &[
        "nagios",
        "json",
        "daemon",
        "request",
        "cpu",
        "memory",
        "swap",
        "disk",
        "load",
        "network",
        "process",
        "tcp",
        "http",
        "dns",
        "prometheus",
        "json_socket",
    ];
}

/// A program and its arguments, run directly: never through a shell.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Command {
    #[schemars(length(min = 1))]
    pub command: Vec<String>,
}

/// A request daemon and what each run asks it (see [`Probe::Request`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestProbe {
    /// The daemon: every check with the same command (after the plugin is resolved) talks
    /// to the same process.
    #[schemars(length(min = 1))]
    pub command: Vec<String>,
    /// Sent as the request line's `request`, as written in the check file.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub request: serde_json::Map<String, serde_json::Value>,
}

/// Largest `request` of a request check, as JSON.
pub const MAX_REQUEST_BYTES: usize = 16 * 1024;

/// Upper thresholds: a value above `warn` is WARNING, above `crit` CRITICAL.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warn: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crit: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskProbe {
    /// Any path on the filesystem to measure.
    #[serde(default = "root_path")]
    pub path: String,
    /// WARNING above this percent of space used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warn: Option<f64>,
    /// CRITICAL above this percent of space used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crit: Option<f64>,
}

fn root_path() -> String {
    "/".into()
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkProbe {
    /// Only this interface (CRITICAL when it does not exist); all but loopback when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProcessProbe {
    /// Process name as the kernel reports it (e.g. `sshd`), matched exactly.
    pub name: String,
    /// Fewest matching processes that are OK (CRITICAL below).
    #[serde(default = "one")]
    pub min: u32,
    /// Most matching processes that are OK (WARNING above).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u32>,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TcpProbe {
    #[schemars(length(min = 1))]
    pub host: String,
    #[schemars(range(min = 1))]
    pub port: u16,
    /// Connect with TLS (verified against `ca_file` or the system's roots).
    #[serde(default)]
    pub tls: bool,
    /// Written after connecting (escapes are not interpreted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send: Option<String>,
    /// The reply must contain this text (CRITICAL otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect: Option<String>,
    /// WARNING when answering takes longer, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warn_ms: Option<u64>,
    /// CRITICAL when answering takes longer, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crit_ms: Option<u64>,
    /// PEM file of CA certificates to trust instead of the system's roots. There is no
    /// way to skip verification: a self-signed service is checked against its own
    /// certificate given here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// Name to verify the certificate for, when it differs from the host dialled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// WARNING when the certificate expires within this many days.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_warn_days: Option<u32>,
    /// CRITICAL when the certificate expires within this many days.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_crit_days: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpProbe {
    /// `http://` or `https://` URL.
    #[schemars(pattern(crate::schema_rules::HTTP_URL))]
    pub url: String,
    #[serde(default = "get")]
    pub method: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Statuses that are OK; any 2xx or 3xx when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(range(min = 100, max = 599)))]
    pub expect_status: Vec<u16>,
    /// The body must contain this text (CRITICAL otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_contains: Option<String>,
    /// WARNING when answering takes longer, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warn_ms: Option<u64>,
    /// CRITICAL when answering takes longer, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crit_ms: Option<u64>,
    /// PEM file of CA certificates to trust instead of the system's roots. There is no
    /// way to skip verification: a self-signed service is checked against its own
    /// certificate given here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// Name to verify the certificate for, when it differs from the host dialled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// WARNING when the certificate expires within this many days.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_warn_days: Option<u32>,
    /// CRITICAL when the certificate expires within this many days.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_crit_days: Option<u32>,
}

fn get() -> String {
    "GET".into()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DnsProbe {
    /// The name to resolve.
    pub name: String,
    /// A, AAAA, CNAME, MX, NS, PTR, SRV or TXT.
    #[serde(default = "record_a")]
    pub record_type: String,
    /// `IP` or `IP:PORT` of the server to ask; the system's resolver configuration
    /// when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// Every one of these must be among the answers (CRITICAL otherwise).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expect: Vec<String>,
    /// WARNING when answering takes longer, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warn_ms: Option<u64>,
    /// CRITICAL when answering takes longer, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crit_ms: Option<u64>,
}

fn record_a() -> String {
    "A".into()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PrometheusProbe {
    /// `http://` or `https://` URL of the text exposition endpoint.
    #[schemars(pattern(crate::schema_rules::HTTP_URL))]
    pub url: String,
    /// Keep only samples whose metric name starts with one of these; all when empty.
    /// At most [`crate::MAX_METRICS`] samples are kept either way, and the result says
    /// when some were left out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<String>,
    /// PEM file of CA certificates to trust instead of the system's roots. There is no
    /// way to skip verification: a self-signed service is checked against its own
    /// certificate given here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// Name to verify the certificate for, when it differs from the host dialled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// WARNING when the certificate expires within this many days.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_warn_days: Option<u32>,
    /// CRITICAL when the certificate expires within this many days.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_crit_days: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JsonSocketProbe {
    /// `tcp://HOST:PORT` or `unix:/PATH`.
    pub address: String,
    /// Written after connecting, e.g. a request line; the reply is read to its end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send: Option<String>,
}
