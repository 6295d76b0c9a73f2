//! Built-in network probes: they need nothing installed on the host.
//!
//! - [`tcp`]: connect (optionally over TLS), optionally send text and expect a reply;
//! - [`http`]: one HTTP(S) request with hyper, status and body checks, no redirects;
//! - [`dns`]: one lookup with hickory-resolver, against the system's resolvers or a
//!   given server, with expected answers;
//! - [`prometheus`]: scrape a text exposition endpoint into metrics;
//! - [`json_socket`]: read one JSON plugin document from a TCP or unix socket.
//!
//! The caller bounds each run in time (the check's timeout); every read here is bounded in
//! size. TLS is always verified, against `ca_file` or the system's roots: there is no way
//! to turn verification off.

pub mod dns;
pub mod http;
pub mod json_socket;
pub mod prometheus;
pub mod tcp;
#[cfg(test)]
mod testutil;

use std::error::Error as StdError;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outpost_protocol::probe::Probe;
use outpost_protocol::{Metric, Status};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::outcome::{above, severity, Outcome};

/// Run one network probe; any other kind is UNKNOWN.
pub async fn run(probe: &Probe) -> Outcome {
    match probe {
        Probe::Tcp(p) => tcp::run(p).await,
        Probe::Http(p) => http::run(p).await,
        Probe::Dns(p) => dns::run(p).await,
        Probe::Prometheus(p) => prometheus::run(p).await,
        Probe::JsonSocket(p) => json_socket::run(p).await,
        other => Outcome::unknown(format!("{} is not a network probe", other.kind())),
    }
}

/// Largest CA file read, in bytes.
const MAX_CA_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// Why a probe could not get an answer: its own definition or this host is at fault
/// (UNKNOWN), or the service did not answer properly (CRITICAL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Bad URL, unreadable CA file, no system roots...: the check cannot do its job.
    Setup(String),
    /// Refused, reset, handshake or verification failed...: the service is not OK.
    Down(String),
}

impl Failure {
    pub(crate) fn into_outcome(self, label: &str) -> Outcome {
        match self {
            Failure::Setup(why) => Outcome::unknown(format!("{label} UNKNOWN - {why}")),
            Failure::Down(why) => Outcome::critical(format!("{label} CRITICAL - {why}")),
        }
    }
}

/// A probe's findings as they come: a summary, problems that raise the status, details.
/// [`Report::finish`] writes the output line as `LABEL STATUS - summary - problems`.
pub(crate) struct Report {
    label: &'static str,
    status: Status,
    summary: Vec<String>,
    problems: Vec<String>,
    notes: Vec<String>,
    metrics: Vec<Metric>,
}

impl Report {
    pub(crate) fn new(label: &'static str) -> Report {
        Report {
            label,
            status: Status::Ok,
            summary: Vec::new(),
            problems: Vec::new(),
            notes: Vec::new(),
            metrics: Vec::new(),
        }
    }

    /// A part of what was found, shown whatever the status.
    pub(crate) fn say(&mut self, part: impl Into<String>) {
        self.summary.push(part.into());
    }

    /// Something wrong: raise the status to at least `status` and say why.
    pub(crate) fn problem(&mut self, status: Status, why: impl Into<String>) {
        if severity(status) > severity(self.status) {
            self.status = status;
        }
        self.problems.push(why.into());
    }

    /// A line of detail.
    pub(crate) fn note(&mut self, line: impl Into<String>) {
        self.notes.push(line.into());
    }

    pub(crate) fn metric(
        &mut self,
        name: &str,
        value: f64,
        unit: Option<&str>,
        warn: Option<String>,
        crit: Option<String>,
    ) {
        self.metrics.push(Metric {
            name: name.into(),
            value,
            unit: unit.map(str::to_string),
            warn,
            crit,
            min: None,
            max: None,
        });
    }

    /// A duration in milliseconds against upper thresholds: metric `name` and, past a
    /// threshold, a problem that says so.
    pub(crate) fn time_ms(
        &mut self,
        name: &str,
        what: &str,
        elapsed: Duration,
        warn_ms: Option<u64>,
        crit_ms: Option<u64>,
    ) {
        let value = millis(elapsed);
        let status = above(value, warn_ms.map(|w| w as f64), crit_ms.map(|c| c as f64));
        let limit = match status {
            Status::Critical => crit_ms,
            Status::Warning => warn_ms,
            _ => None,
        };
        if let Some(limit) = limit {
            self.problem(
                status,
                format!("{what} took {} ms > {limit} ms", value.round()),
            );
        }
        self.metric(
            name,
            value,
            Some("ms"),
            warn_ms.map(|w| w.to_string()),
            crit_ms.map(|c| c.to_string()),
        );
    }

    /// Days left on a certificate against lower thresholds (WARNING or CRITICAL when it
    /// expires within that many days), as metric `cert_days_left`.
    pub(crate) fn cert_days(&mut self, days: f64, warn_days: Option<u32>, crit_days: Option<u32>) {
        let whole = days.floor();
        if let Some(c) = crit_days.filter(|c| days < f64::from(*c)) {
            self.problem(
                Status::Critical,
                format!("certificate expires in {whole} days (critical below {c})"),
            );
        } else if let Some(w) = warn_days.filter(|w| days < f64::from(*w)) {
            self.problem(
                Status::Warning,
                format!("certificate expires in {whole} days (warning below {w})"),
            );
        }
        self.metric(
            "cert_days_left",
            (days * 10.0).floor() / 10.0,
            Some("d"),
            warn_days.map(|w| format!("{w}:")),
            crit_days.map(|c| format!("{c}:")),
        );
    }

    pub(crate) fn finish(self) -> Outcome {
        let mut line = format!(
            "{} {} - {}",
            self.label,
            self.status.as_str().to_uppercase(),
            self.summary.join(", ")
        );
        if !self.problems.is_empty() {
            line.push_str(" - ");
            line.push_str(&self.problems.join("; "));
        }
        let mut o = Outcome::new(self.status, line);
        for n in &self.notes {
            o.note(n);
        }
        o.metrics = self.metrics;
        o
    }
}

/// Milliseconds, to a tenth.
pub(crate) fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

/// `host:port`, with brackets around an IPv6 address.
pub(crate) fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// An error and its causes, one after the other: hyper and rustls keep the useful part
/// (e.g. "connection refused", "UnknownIssuer") in the source.
pub(crate) fn chain(e: &(dyn StdError + 'static)) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        next = cause.source();
    }
    text
}

/// At most `max` bytes of received data as one printable line (control characters
/// escaped), saying how much there was in all when it is cut.
pub(crate) fn snippet(data: &[u8], max: usize) -> String {
    let head = String::from_utf8_lossy(&data[..data.len().min(max)]);
    let mut text: String = head
        .chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect();
    if data.len() > max {
        text.push_str(&format!("... [{} bytes in all]", data.len()));
    }
    text
}

/// Whether `needle` occurs in `haystack`.
pub(crate) fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// Anything a probe talks through: plain TCP, TLS over TCP, a unix socket.
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// How to verify a TLS peer, as every probe with TLS spells it.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TlsOptions<'a> {
    pub ca_file: Option<&'a str>,
    pub server_name: Option<&'a str>,
    pub cert_warn_days: Option<u32>,
    pub cert_crit_days: Option<u32>,
}

/// An open connection to a service.
pub(crate) struct Connected {
    pub stream: Box<dyn Io>,
    /// From before resolving the host to a usable stream (TLS handshake included).
    pub elapsed: Duration,
    /// Days left on the peer's certificate, for TLS; `Err` says why they are not known.
    pub cert_days: Option<Result<f64, String>>,
}

/// Resolve and connect to `host:port`, then do the TLS handshake when `tls` is given
/// (offering the `alpn` protocols).
pub(crate) async fn connect(
    host: &str,
    port: u16,
    tls: Option<(&TlsOptions<'_>, &[&[u8]])>,
) -> Result<Connected, Failure> {
    let started = Instant::now();
    // Settle what the handshake needs before dialling: a bad CA file is the check's fault.
    let tls_setup = match tls {
        Some((opts, alpn)) => {
            let config = client_config(opts.ca_file, alpn).await?;
            let name = opts.server_name.unwrap_or(host);
            let server_name = ServerName::try_from(name.to_string())
                .map_err(|e| Failure::Setup(format!("invalid TLS server name {name:?}: {e}")))?;
            Some((TlsConnector::from(config), server_name))
        }
        None => None,
    };
    let target = host_port(host, port);
    let tcp = TcpStream::connect((host, port))
        .await
        .map_err(|e| Failure::Down(format!("cannot connect to {target}: {}", chain(&e))))?;
    // Small requests: do not wait to fill packets.
    let _ = tcp.set_nodelay(true);
    match tls_setup {
        None => Ok(Connected {
            stream: Box::new(tcp),
            elapsed: started.elapsed(),
            cert_days: None,
        }),
        Some((connector, server_name)) => {
            let stream = connector.connect(server_name, tcp).await.map_err(|e| {
                Failure::Down(format!("TLS handshake with {target} failed: {}", chain(&e)))
            })?;
            let cert_days = match stream.get_ref().1.peer_certificates() {
                Some([leaf, ..]) => cert_days_left(leaf.as_ref()),
                _ => Err("the server sent no certificate".to_string()),
            };
            Ok(Connected {
                stream: Box::new(stream),
                elapsed: started.elapsed(),
                cert_days: Some(cert_days),
            })
        }
    }
}

/// Days until a DER certificate's notAfter, from now (negative once expired).
pub(crate) fn cert_days_left(der: &[u8]) -> Result<f64, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("cannot read the server's certificate: {e}"))?;
    let not_after = cert.validity().not_after.timestamp();
    let now = chrono::Utc::now().timestamp();
    Ok((not_after - now) as f64 / 86_400.0)
}

/// A TLS client configuration trusting `ca_file`, or the system's roots without one;
/// always verifying (ring provider, safe default versions, as [`crate::tls`] does).
pub(crate) async fn client_config(
    ca_file: Option<&str>,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, Failure> {
    let roots = match ca_file {
        Some(path) => Arc::new(ca_roots(path).await?),
        None => system_roots().await?,
    };
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| Failure::Setup(format!("TLS provider unusable: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

async fn ca_roots(path: &str) -> Result<RootCertStore, Failure> {
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| Failure::Setup(format!("cannot read CA file {path}: {e}")))?;
    let mut pem = Vec::new();
    file.take(MAX_CA_FILE_BYTES + 1)
        .read_to_end(&mut pem)
        .await
        .map_err(|e| Failure::Setup(format!("cannot read CA file {path}: {e}")))?;
    if pem.len() as u64 > MAX_CA_FILE_BYTES {
        return Err(Failure::Setup(format!(
            "CA file {path} is larger than {MAX_CA_FILE_BYTES} bytes"
        )));
    }
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| Failure::Setup(format!("CA file {path} is not valid PEM: {e}")))?;
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(Failure::Setup(format!(
            "CA file {path} holds no usable certificate"
        )));
    }
    Ok(roots)
}

/// The system's root certificates, loaded once (off the async workers) and kept.
async fn system_roots() -> Result<Arc<RootCertStore>, Failure> {
    static LOADED: Mutex<Option<Arc<RootCertStore>>> = Mutex::new(None);
    if let Some(roots) = LOADED.lock().ok().and_then(|g| g.clone()) {
        return Ok(roots);
    }
    let found = tokio::task::spawn_blocking(rustls_native_certs::load_native_certs)
        .await
        .map_err(|e| Failure::Setup(format!("loading system root certificates failed: {e}")))?;
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default();
        return Err(Failure::Setup(format!(
            "no system root certificates found{why}; set ca_file"
        )));
    }
    let roots = Arc::new(roots);
    if let Ok(mut slot) = LOADED.lock() {
        *slot = Some(roots.clone());
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snippets_are_one_bounded_line() {
        assert_eq!(snippet(b"hi\r\nthere", 100), "hi\\r\\nthere");
        let s = snippet(&[b'x'; 2000], 10);
        assert!(s.starts_with("xxxxxxxxxx... [2000 bytes in all]"), "{s}");
        assert_eq!(snippet(&[0xff, b'a'], 10), "\u{fffd}a");
    }

    #[test]
    fn report_line_and_thresholds() {
        let mut r = Report::new("TEST");
        r.say("did it");
        r.time_ms(
            "time_ms",
            "answering",
            Duration::from_millis(20),
            Some(10),
            Some(100),
        );
        r.cert_days(5.5, Some(30), Some(3));
        let o = r.finish();
        assert_eq!(o.status, Status::Warning);
        assert_eq!(
            o.output,
            "TEST WARNING - did it - answering took 20 ms > 10 ms; certificate expires in 5 days (warning below 30)"
        );
        assert_eq!(o.metrics[0].warn.as_deref(), Some("10"));
        assert_eq!(o.metrics[1].value, 5.5);
        assert_eq!(o.metrics[1].warn.as_deref(), Some("30:"));

        let mut r = Report::new("TEST");
        r.cert_days(2.0, Some(30), Some(3));
        assert_eq!(r.finish().status, Status::Critical);
    }

    #[test]
    fn byte_search_and_addresses() {
        assert!(contains(b"hello world", b"o w"));
        assert!(!contains(b"hello", b"hello!"));
        assert!(contains(b"", b""));
        assert_eq!(host_port("::1", 80), "[::1]:80");
        assert_eq!(host_port("example.com", 443), "example.com:443");
    }

    #[tokio::test]
    async fn other_kinds_are_unknown() {
        let o = run(&Probe::Cpu(Default::default())).await;
        assert_eq!(o.status, Status::Unknown);
    }

    #[tokio::test]
    async fn bad_ca_files_are_the_checks_fault() {
        let Err(Failure::Setup(why)) = client_config(Some("/nonexistent/ca.pem"), &[]).await else {
            panic!("a missing CA file must be a setup failure");
        };
        assert!(why.contains("cannot read CA file"), "{why}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let Err(Failure::Setup(why)) = client_config(path.to_str(), &[]).await else {
            panic!("a CA file without certificates must be a setup failure");
        };
        assert!(why.contains("no usable certificate"), "{why}");
    }
}
