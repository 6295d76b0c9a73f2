//! One HTTPS GET from the gateway, with a byte cap and a deadline: the manifest, its
//! signature and a release file come this way, over the same TLS trust as the session.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Why a download failed.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("cannot reach the gateway: {0}")]
    Connect(String),
    #[error("GET {path}: the gateway answered {status}")]
    Status { path: String, status: u16 },
    #[error("GET {path}: the download exceeds {cap} bytes, the most allowed; gave up")]
    TooBig { path: String, cap: u64 },
    #[error("GET {path}: not complete within {}s; gave up", .deadline.as_secs())]
    Deadline { path: String, deadline: Duration },
    #[error("GET {path}: {error}")]
    Http { path: String, error: String },
}

/// GET `path` from the gateway at `addr` (TLS name `host`), at most `cap` bytes, all of it
/// within `deadline`.
pub async fn get(
    tls: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    host: &str,
    path: &str,
    cap: u64,
    deadline: Duration,
) -> Result<Vec<u8>, DownloadError> {
    let work = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| DownloadError::Connect(format!("{addr}: {e}")))?;
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| DownloadError::Connect(format!("{host:?} is not a TLS name: {e}")))?;
        let io = TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| DownloadError::Connect(format!("TLS with {host} failed: {e}")))?;
        fetch(io, host, path, cap).await
    };
    tokio::time::timeout(deadline, work)
        .await
        .map_err(|_| DownloadError::Deadline {
            path: path.to_string(),
            deadline,
        })?
}

/// The HTTP/1.1 exchange over an open stream (no deadline: the caller sets one).
pub async fn fetch<S>(io: S, host: &str, path: &str, cap: u64) -> Result<Vec<u8>, DownloadError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let http = |e: &dyn std::fmt::Display| DownloadError::Http {
        path: path.to_string(),
        error: e.to_string(),
    };
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
            .await
            .map_err(|e| http(&e))?;
    // Aborted when this function returns, so an endless body stops being read.
    let conn = AbortOnDrop(tokio::spawn(conn));
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, host)
        .header(
            hyper::header::USER_AGENT,
            format!("outpost-agent/{}", crate::version::AGENT_VERSION),
        )
        .body(Empty::<Bytes>::new())
        .map_err(|e| http(&e))?;
    let resp = sender.send_request(req).await.map_err(|e| http(&e))?;
    let status = resp.status().as_u16();
    if status != 200 {
        return Err(DownloadError::Status {
            path: path.to_string(),
            status,
        });
    }
    let too_big = || DownloadError::TooBig {
        path: path.to_string(),
        cap,
    };
    let announced = resp
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > cap) {
        return Err(too_big());
    }
    let mut body = resp.into_body();
    let mut out = Vec::with_capacity(announced.unwrap_or(0).min(cap) as usize);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| http(&e))?;
        if let Ok(data) = frame.into_data() {
            if out.len() as u64 + data.len() as u64 > cap {
                return Err(too_big());
            }
            out.extend_from_slice(&data);
        }
    }
    drop(conn);
    Ok(out)
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server on the other end of a pipe: reads the request head, then runs `respond`.
    fn serve<F, Fut>(respond: F) -> tokio::io::DuplexStream
    where
        F: FnOnce(tokio::io::DuplexStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match server.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            respond(server).await;
        });
        client
    }

    #[tokio::test]
    async fn reads_a_body_within_the_cap() {
        let io = serve(|mut s| async move {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")
                .await;
        });
        assert_eq!(fetch(io, "gw", "/x", 5).await.unwrap(), b"hello");
    }

    #[tokio::test]
    async fn an_endless_body_stops_at_the_cap() {
        // Chunked, no length announced: the cap is found while reading.
        let io = serve(|mut s| async move {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                .await;
            let chunk = format!("400\r\n{}\r\n", "z".repeat(0x400));
            while s.write_all(chunk.as_bytes()).await.is_ok() {}
        });
        let e = tokio::time::timeout(Duration::from_secs(10), fetch(io, "gw", "/x", 100_000))
            .await
            .expect("the cap ends the download")
            .unwrap_err();
        assert!(
            matches!(e, DownloadError::TooBig { cap: 100_000, .. }),
            "{e}"
        );
    }

    #[tokio::test]
    async fn an_announced_oversize_is_refused_before_reading() {
        let io = serve(|mut s| async move {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 999999999999\r\n\r\n")
                .await;
            std::future::pending::<()>().await;
        });
        let e = fetch(io, "gw", "/x", 1000).await.unwrap_err();
        assert!(matches!(e, DownloadError::TooBig { .. }), "{e}");
    }

    #[tokio::test]
    async fn a_stalled_gateway_hits_the_deadline() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            // Accept and say nothing, holding the connection open.
            let (s, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(s);
        });
        let tls = crate::tls::client_config(&crate::settings::Trust::Pin("00".repeat(32))).unwrap();
        let started = std::time::Instant::now();
        let e = get(tls, addr, "localhost", "/x", 10, Duration::from_millis(500))
            .await
            .unwrap_err();
        assert!(matches!(e, DownloadError::Deadline { .. }), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn an_error_status_is_reported() {
        let io = serve(|mut s| async move {
            let _ = s
                .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                .await;
        });
        let e = fetch(io, "gw", "/releases/9.9.9/x", 10).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "GET /releases/9.9.9/x: the gateway answered 404"
        );
    }
}
