//! Local servers and certificates for the network probes' tests (127.0.0.1 only).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use chrono::Datelike;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// A self-signed certificate for `localhost` and `127.0.0.1`, and its key.
pub struct TestCert {
    pub pem: String,
    pub der: CertificateDer<'static>,
    pub key: Vec<u8>,
}

/// Valid until midnight (UTC) `days` from today: between `days - 1` and `days` days left.
/// Each has its own subject, so one is never mistaken for another's issuer.
pub fn cert(days: u64) -> TestCert {
    static SERIAL: AtomicU64 = AtomicU64::new(1);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("outpost test {}", SERIAL.fetch_add(1, Ordering::Relaxed)),
    );
    let end = chrono::Utc::now().date_naive() + chrono::Days::new(days);
    params.not_after = rcgen::date_time_ymd(end.year(), end.month() as u8, end.day() as u8);
    let cert = params.self_signed(&key).unwrap();
    TestCert {
        pem: cert.pem(),
        der: cert.der().clone(),
        key: key.serialize_der(),
    }
}

/// The certificate as a PEM file to give as `ca_file`.
pub fn ca_file(cert: &TestCert) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &cert.pem).unwrap();
    file
}

pub fn acceptor(cert: &TestCert) -> TlsAcceptor {
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der.clone()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key.clone())),
    )
    .unwrap();
    TlsAcceptor::from(Arc::new(config))
}

/// A TLS server that echoes the first chunk it reads, then closes.
pub async fn tls_echo_server(cert: &TestCert) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = acceptor(cert);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = [0u8; 4096];
                if let Ok(n) = tls.read(&mut buf).await {
                    let _ = tls.write_all(&buf[..n]).await;
                }
                let _ = tls.shutdown().await;
            });
        }
    });
    port
}

/// What the test HTTP server answers.
pub struct HttpReply {
    pub status: u16,
    pub reason: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl HttpReply {
    pub fn new(status: u16, reason: &'static str, body: impl Into<Vec<u8>>) -> HttpReply {
        HttpReply {
            status,
            reason,
            headers: Vec::new(),
            body: body.into(),
        }
    }
}

pub type Handler = Arc<dyn Fn(&str) -> HttpReply + Send + Sync>;

/// A one-request-per-connection HTTP/1.1 server, over TLS when `tls` is given. The
/// handler gets the request head (request line and headers); the heads are kept.
pub async fn http_server(
    tls: Option<&TestCert>,
    handler: Handler,
) -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let acceptor = tls.map(acceptor);
    let seen = heads.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, handler, seen) = (acceptor.clone(), handler.clone(), seen.clone());
            tokio::spawn(async move {
                match acceptor {
                    Some(a) => {
                        if let Ok(s) = a.accept(tcp).await {
                            serve_one(s, handler, seen).await;
                        }
                    }
                    None => serve_one(tcp, handler, seen).await,
                }
            });
        }
    });
    (port, heads)
}

async fn serve_one<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    handler: Handler,
    seen: Arc<Mutex<Vec<String>>>,
) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 64 * 1024 {
            return;
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let reply = handler(&head);
    seen.lock().unwrap().push(head);
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        reply.status,
        reply.reason,
        reply.body.len()
    );
    for (name, value) in &reply.headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    if s.write_all(out.as_bytes()).await.is_err() {
        return;
    }
    if s.write_all(&reply.body).await.is_err() {
        return;
    }
    let _ = s.shutdown().await;
}
