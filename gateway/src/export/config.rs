//! A tenant's metric exports: `[[export]]` tables in its check files, one per sink.
//!
//! ```toml
//! [[export]]
//! name = "prom"                                   # names the sink and its cursor
//! remote_write = { url = "http://prometheus:9090/api/v1/write" }
//! headers = { "X-Scope-OrgID" = "ops" }           # optional, every request
//! batch = 2000                                    # samples per request, at most
//! timeout = "10s"                                 # one request
//! from = "now"                                    # a new sink starts at the bus's end;
//!                                                 # "start": from the oldest result kept
//!
//! [[export]]
//! name = "influx"
//! influx = { url = "http://influxdb:8086", database = "outpost" }        # 1.x: /write
//! # influx = { url = "...", org = "ops", bucket = "outpost", token_file = "/etc/outpost/influx.token" }  # 2.x
//! ```
//!
//! Each credential is given itself (`bearer_token`, `password`, `token`) or as the
//! absolute path of a file on the gateway (`…_file`, read at every request); check files
//! pushed by a tenant through the API may not name files (the gateway would send the
//! file to the tenant's URL).
//!
//! A file whose exports are invalid keeps its last good ones (like alerting); a name
//! declared twice is taken from the first file, by name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Headers a sink's `headers` may not set: the wire format's and the credentials'.
const OWN_HEADERS: [&str; 7] = [
    "content-type",
    "content-encoding",
    "content-length",
    "host",
    "authorization",
    "x-prometheus-remote-write-version",
    "user-agent",
];

/// Samples per request when the table does not say, and the most it may say.
pub const DEFAULT_BATCH: usize = 2000;
pub const MAX_BATCH: usize = 50_000;
/// One request's timeout when the table does not say, and the longest.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
pub const MAX_TIMEOUT: Duration = Duration::from_secs(120);

/// The sinks of one tenant, by name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExportConfig {
    pub sinks: BTreeMap<String, Sink>,
}

/// One sink: where samples go and how.
#[derive(Debug, Clone, PartialEq)]
pub struct Sink {
    pub name: String,
    pub kind: SinkKind,
    pub headers: BTreeMap<String, String>,
    pub batch: usize,
    pub timeout: Duration,
    pub from_start: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SinkKind {
    /// Prometheus remote-write 1.0 (protobuf, snappy), with a bearer token if given.
    RemoteWrite {
        url: String,
        bearer_token: Option<Secret>,
    },
    /// InfluxDB line protocol: 1.x `/write?db=` or 2.x `/api/v2/write?org=&bucket=`.
    Influx(Influx),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Influx {
    V1 {
        url: String,
        database: String,
        /// For an InfluxDB with authentication on (sent as HTTP Basic).
        username: Option<String>,
        password: Option<Secret>,
    },
    V2 {
        url: String,
        org: String,
        bucket: String,
        token: Secret,
    },
}

/// A credential: given in the check file, or the absolute path of a file on the gateway
/// that holds it (read at every use, so it can be rotated in place).
#[derive(Clone, PartialEq)]
pub enum Secret {
    Inline(String),
    File(PathBuf),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Secret::Inline(_) => f.write_str("Inline(…)"),
            Secret::File(p) => write!(f, "File({})", p.display()),
        }
    }
}

impl Secret {
    /// The credential, trimmed; why not when its file cannot be read.
    pub fn read(&self) -> Result<String, String> {
        match self {
            Secret::Inline(s) => Ok(s.clone()),
            Secret::File(p) => std::fs::read_to_string(p)
                .map(|s| s.trim().to_string())
                .map_err(|e| format!("cannot read {}: {e}", p.display())),
        }
    }
}

/// The secret given inline or by file (an absolute path), never both.
fn secret(
    what: &str,
    inline: Option<String>,
    file: Option<PathBuf>,
) -> Result<Option<Secret>, String> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(format!("give {what} or {what}_file, not both")),
        (Some(s), None) => Ok(Some(Secret::Inline(s))),
        (None, Some(f)) if f.is_absolute() => Ok(Some(Secret::File(f))),
        (None, Some(f)) => Err(format!(
            "{what}_file {:?}: give an absolute path (it is read on the gateway)",
            f.display()
        )),
        (None, None) => Ok(None),
    }
}

#[derive(Deserialize, Default)]
struct RawFile {
    #[serde(default)]
    export: Vec<RawExport>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExport {
    name: String,
    remote_write: Option<RawRemoteWrite>,
    influx: Option<RawInflux>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    batch: Option<usize>,
    timeout: Option<toml::Value>,
    from: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRemoteWrite {
    url: String,
    bearer_token: Option<String>,
    bearer_token_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInflux {
    url: String,
    database: Option<String>,
    username: Option<String>,
    password: Option<String>,
    password_file: Option<PathBuf>,
    org: Option<String>,
    bucket: Option<String>,
    token: Option<String>,
    token_file: Option<PathBuf>,
}

/// The `[[export]]` tables of one file, or what is wrong with them (all of it).
pub fn parse_file(text: &str) -> Result<Vec<Sink>, String> {
    let raw: RawFile = toml::from_str(text).map_err(|e| crate::util::toml_error(text, &e))?;
    let mut sinks = Vec::new();
    let mut problems = Vec::new();
    for r in raw.export {
        match sink(r) {
            Ok(s) => sinks.push(s),
            Err(e) => problems.push(e),
        }
    }
    if problems.is_empty() {
        Ok(sinks)
    } else {
        Err(problems.join("; "))
    }
}

fn sink(r: RawExport) -> Result<Sink, String> {
    let name = r.name;
    let at = |what: String| format!("[[export]] {name:?}: {what}");
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!(
            "[[export]] name {name:?}: 1 to 64 letters, digits, '-' or '_'"
        ));
    }
    let kind = match (r.remote_write, r.influx) {
        (Some(rw), None) => {
            http_url(&rw.url).map_err(at)?;
            SinkKind::RemoteWrite {
                url: rw.url,
                bearer_token: secret("bearer_token", rw.bearer_token, rw.bearer_token_file)
                    .map_err(at)?,
            }
        }
        (None, Some(i)) => {
            http_url(&i.url).map_err(at)?;
            if i.url.contains(['?', '#']) {
                return Err(at(format!(
                    "url {:?}: the server's base URL, without a query (/write or /api/v2/write is added)",
                    i.url
                )));
            }
            let url = i.url.trim_end_matches('/').to_string();
            let password = secret("password", i.password, i.password_file).map_err(at)?;
            let token = secret("token", i.token, i.token_file).map_err(at)?;
            match (i.database, i.org, i.bucket, token) {
                (Some(database), None, None, None) => SinkKind::Influx(Influx::V1 {
                    url,
                    database,
                    username: i.username,
                    password,
                }),
                (None, Some(org), Some(bucket), Some(token))
                    if i.username.is_none() && password.is_none() =>
                {
                    SinkKind::Influx(Influx::V2 {
                        url,
                        org,
                        bucket,
                        token,
                    })
                }
                _ => return Err(at(
                    "influx takes `database` (1.x, with optional `username` and `password` or `password_file`) or `org`, `bucket` and `token` or `token_file` (2.x)".into(),
                )),
            }
        }
        _ => {
            return Err(at(
                "give exactly one of `remote_write = { url = … }` or `influx = { … }`".into(),
            ))
        }
    };
    let batch = r.batch.unwrap_or(DEFAULT_BATCH);
    if !(1..=MAX_BATCH).contains(&batch) {
        return Err(at(format!("batch: 1 to {MAX_BATCH} samples")));
    }
    let timeout = match &r.timeout {
        None => DEFAULT_TIMEOUT,
        Some(v) => {
            let secs = outpost_protocol::checkfile::duration_value("timeout", v).map_err(at)?;
            Duration::from_secs(secs)
        }
    };
    if timeout.is_zero() || timeout > MAX_TIMEOUT {
        return Err(at(format!("timeout: 1 s to {} s", MAX_TIMEOUT.as_secs())));
    }
    let from_start = match r.from.as_deref() {
        None | Some("now") => false,
        Some("start") => true,
        Some(other) => return Err(at(format!("from {other:?}: \"now\" or \"start\""))),
    };
    for (k, v) in &r.headers {
        let ok = reqwest::header::HeaderName::from_bytes(k.as_bytes()).is_ok()
            && reqwest::header::HeaderValue::from_str(v).is_ok();
        if !ok {
            return Err(at(format!("header {k:?} is not a valid HTTP header")));
        }
        if OWN_HEADERS.contains(&k.to_ascii_lowercase().as_str()) {
            return Err(at(format!(
                "header {k:?} is the export's own (credentials: bearer_token, username and password, token)"
            )));
        }
    }
    Ok(Sink {
        name,
        kind,
        headers: r.headers,
        batch,
        timeout,
        from_start,
    })
}

fn http_url(url: &str) -> Result<(), String> {
    match reqwest::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(()),
        Ok(_) => Err(format!("url {url:?}: an http or https URL")),
        Err(e) => Err(format!("url {url:?}: {e}")),
    }
}

/// Every file's sinks, first file (by name) first: a name declared again is refused.
pub fn assemble<'a>(
    files: impl IntoIterator<Item = (&'a Path, &'a [Sink])>,
) -> (ExportConfig, Vec<String>) {
    let mut config = ExportConfig::default();
    let mut problems = Vec::new();
    for (path, sinks) in files {
        for s in sinks {
            if config.sinks.contains_key(&s.name) {
                problems.push(format!(
                    "{}: [[export]] {:?} is declared twice; the first file (by name) wins",
                    path.display(),
                    s.name
                ));
                continue;
            }
            config.sinks.insert(s.name.clone(), s.clone());
        }
    }
    (config, problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_sink_kind_parses_and_mistakes_are_named() {
        let sinks = parse_file(
            "[[export]]\nname = 'prom'\nremote_write = { url = 'http://p:9090/api/v1/write' }\nbatch = 10\ntimeout = '5s'\nfrom = 'start'\nheaders = { X-Scope-OrgID = 'ops' }\n\
             [[export]]\nname = 'i1'\ninflux = { url = 'http://i:8086/', database = 'outpost' }\n\
             [[export]]\nname = 'i2'\ninflux = { url = 'https://i:8086', org = 'o', bucket = 'b', token_file = '/t' }\n",
        )
        .unwrap();
        assert_eq!(sinks.len(), 3);
        assert_eq!(
            sinks[0].kind,
            SinkKind::RemoteWrite {
                url: "http://p:9090/api/v1/write".into(),
                bearer_token: None,
            }
        );
        assert_eq!(
            (sinks[0].batch, sinks[0].timeout, sinks[0].from_start),
            (10, Duration::from_secs(5), true)
        );
        assert_eq!(sinks[0].headers["X-Scope-OrgID"], "ops");
        assert!(
            matches!(&sinks[1].kind, SinkKind::Influx(Influx::V1 { url, database, .. }) if url == "http://i:8086" && database == "outpost")
        );
        assert!(
            matches!(&sinks[2].kind, SinkKind::Influx(Influx::V2 { bucket, token: Secret::File(_), .. }) if bucket == "b")
        );
        assert_eq!(
            (sinks[1].batch, sinks[1].timeout, sinks[1].from_start),
            (DEFAULT_BATCH, DEFAULT_TIMEOUT, false)
        );

        for (text, says) in [
            ("name = 'x'\n", "exactly one of"),
            ("name = 'x'\nremote_write = { url = 'ftp://h/' }\n", "http or https"),
            ("name = 'x y'\nremote_write = { url = 'http://h/' }\n", "letters, digits"),
            ("name = 'x'\nremote_write = { url = 'http://h/' }\nbatch = 0\n", "batch"),
            ("name = 'x'\nremote_write = { url = 'http://h/' }\ntimeout = '1h'\n", "timeout"),
            ("name = 'x'\nremote_write = { url = 'http://h/' }\nfrom = 'yesterday'\n", "from"),
            ("name = 'x'\ninflux = { url = 'http://h/', database = 'd', org = 'o' }\n", "influx takes"),
            ("name = 'x'\nremote_write = { url = 'http://h/' }\nheaders = { 'a b' = 'c' }\n", "header"),
            ("name = 'x'\nremote_write = { url = 'http://h/' }\nretries = 3\n", "unknown field"),
            ("name = 'x'\nremote_write = { url = 'http://h/' }\nheaders = { Authorization = 'x' }\n", "own"),
            ("name = 'x'\ninflux = { url = 'http://h/?db=x', database = 'd' }\n", "without a query"),
            ("name = 'x'\nremote_write = { url = 'http://h/', bearer_token_file = 'rel/t' }\n", "absolute"),
            ("name = 'x'\nremote_write = { url = 'http://h/', bearer_token = 't', bearer_token_file = '/t' }\n", "not both"),
        ] {
            let err = parse_file(&format!("[[export]]\n{text}")).unwrap_err();
            assert!(err.contains(says), "{text}: {err}");
        }
    }

    #[test]
    fn an_error_never_repeats_the_line_that_holds_a_secret() {
        let err = parse_file(
            "[[export]]\nname = 'p'\nremote_write = { url = 'http://h/', bearer_token = 's3cret', bearer_tokn_file = '/x' }\n",
        )
        .unwrap_err();
        assert!(!err.contains("s3cret"), "{err}");
        assert!(
            err.contains("line 3") && err.contains("bearer_tokn_file"),
            "{err}"
        );
    }

    #[test]
    fn a_name_declared_twice_is_taken_from_the_first_file() {
        let a =
            parse_file("[[export]]\nname = 'p'\nremote_write = { url = 'http://a/' }\n").unwrap();
        let b =
            parse_file("[[export]]\nname = 'p'\nremote_write = { url = 'http://b/' }\n").unwrap();
        let (config, problems) = assemble([
            (Path::new("a.toml"), a.as_slice()),
            (Path::new("b.toml"), b.as_slice()),
        ]);
        assert_eq!(
            config.sinks["p"].kind,
            SinkKind::RemoteWrite {
                url: "http://a/".into(),
                bearer_token: None,
            }
        );
        assert_eq!(problems.len(), 1, "{problems:?}");
    }
}
