//! JSON socket probe: connect to `tcp://HOST:PORT` or `unix:/PATH`, write `send` if set
//! (then shut the write side so the peer sees the request end), read the reply to its
//! end (at most 1 MiB) and read it as a JSON plugin document ([`crate::checks::json`]).
//!
//! CRITICAL when the socket cannot be reached or fails; UNKNOWN when the reply is too
//! large or not a valid document.

use std::time::Instant;

use outpost_protocol::probe::JsonSocketProbe;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{chain, Io};
use crate::checks::outcome::Outcome;

/// Largest reply read, in bytes.
pub const MAX_REPLY_BYTES: usize = 1024 * 1024;

#[derive(Debug, PartialEq, Eq)]
enum Address {
    Tcp { host: String, port: u16 },
    Unix(String),
}

fn address(text: &str) -> Result<Address, String> {
    let t = text.trim();
    if let Some(rest) = t.strip_prefix("tcp://") {
        let rest = rest.trim_end_matches('/');
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| format!("address {text:?} has no port (tcp://HOST:PORT)"))?;
        let port = port
            .parse::<u16>()
            .map_err(|_| format!("address {text:?} has an invalid port"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("address {text:?} has no host"));
        }
        return Ok(Address::Tcp {
            host: host.to_string(),
            port,
        });
    }
    if let Some(rest) = t.strip_prefix("unix:") {
        // `unix:/run/app.sock` and `unix:///run/app.sock` alike.
        let path = if rest.starts_with("//") {
            rest.trim_start_matches("//")
        } else {
            rest
        };
        if path.is_empty() {
            return Err(format!("address {text:?} has no path"));
        }
        return Ok(Address::Unix(path.to_string()));
    }
    Err(format!(
        "address {text:?} must be tcp://HOST:PORT or unix:/PATH"
    ))
}

pub async fn run(p: &JsonSocketProbe) -> Outcome {
    let addr = match address(&p.address) {
        Ok(a) => a,
        Err(why) => return Outcome::unknown(format!("JSON socket UNKNOWN - {why}")),
    };
    let started = Instant::now();
    let connected: std::io::Result<Box<dyn Io>> = match &addr {
        Address::Tcp { host, port } => tokio::net::TcpStream::connect((host.as_str(), *port))
            .await
            .map(|s| Box::new(s) as Box<dyn Io>),
        #[cfg(unix)]
        Address::Unix(path) => tokio::net::UnixStream::connect(path)
            .await
            .map(|s| Box::new(s) as Box<dyn Io>),
        #[cfg(not(unix))]
        Address::Unix(path) => Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            format!("unix:{path}: Unix sockets are not supported by the Windows agent; use tcp://HOST:PORT"),
        )),
    };
    let mut stream = match connected {
        Ok(s) => s,
        Err(e) => {
            return Outcome::critical(format!(
                "JSON socket CRITICAL - cannot connect to {}: {}",
                p.address.trim(),
                chain(&e)
            ))
        }
    };
    if let Some(send) = &p.send {
        let sent = async {
            stream.write_all(send.as_bytes()).await?;
            stream.flush().await?;
            stream.shutdown().await
        };
        if let Err(e) = sent.await {
            return Outcome::critical(format!(
                "JSON socket CRITICAL - sending to {} failed: {e}",
                p.address.trim()
            ));
        }
    }
    let mut reply = Vec::new();
    let read = (&mut stream)
        .take(MAX_REPLY_BYTES as u64 + 1)
        .read_to_end(&mut reply)
        .await;
    if let Err(e) = read {
        return Outcome::critical(format!(
            "JSON socket CRITICAL - reading from {} failed after {} bytes: {e}",
            p.address.trim(),
            reply.len()
        ));
    }
    if reply.len() > MAX_REPLY_BYTES {
        return Outcome::unknown(format!(
            "JSON socket UNKNOWN - the reply from {} is larger than {MAX_REPLY_BYTES} bytes",
            p.address.trim()
        ));
    }
    let elapsed = started.elapsed();
    let mut o = crate::checks::json::interpret(&String::from_utf8_lossy(&reply));
    if o.status == outpost_protocol::Status::Unknown && reply.is_empty() {
        o.note("the socket closed without sending anything");
    }
    o.note(format!(
        "read {} bytes from {} in {} ms",
        reply.len(),
        p.address.trim(),
        super::millis(elapsed).round()
    ));
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_protocol::Status;
    use std::time::Duration;
    use tokio::io::{AsyncRead, AsyncWrite};

    const DOC: &str = r#"{"status": "warning", "text": "2 of 3 queues slow",
        "metrics": {"depth": 120},
        "faults": [{"name": "queue-b", "status": "warning", "text": "slow"}]}"#;

    /// Reads the request to its end (when `wait_request`), then writes `reply` and closes.
    async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
        mut s: S,
        wait_request: bool,
        reply: &'static [u8],
    ) -> Vec<u8> {
        let mut request = Vec::new();
        if wait_request {
            let _ = s.read_to_end(&mut request).await;
        }
        let _ = s.write_all(reply).await;
        let _ = s.shutdown().await;
        request
    }

    #[test]
    fn addresses() {
        assert_eq!(
            address("tcp://127.0.0.1:9100").unwrap(),
            Address::Tcp {
                host: "127.0.0.1".into(),
                port: 9100
            }
        );
        assert_eq!(
            address("tcp://[::1]:80/").unwrap(),
            Address::Tcp {
                host: "::1".into(),
                port: 80
            }
        );
        assert_eq!(
            address("unix:/run/a.sock").unwrap(),
            Address::Unix("/run/a.sock".into())
        );
        assert_eq!(
            address("unix:///run/a.sock").unwrap(),
            Address::Unix("/run/a.sock".into())
        );
        assert!(address("tcp://host").is_err());
        assert!(address("tcp://host:99999").is_err());
        assert!(address("http://host:80").is_err());
        assert!(address("unix:").is_err());
    }

    #[tokio::test]
    async fn tcp_with_a_request() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            answer(s, true, DOC.as_bytes()).await
        });
        let p = JsonSocketProbe {
            address: format!("tcp://127.0.0.1:{port}"),
            send: Some("status\n".into()),
        };
        let o = run(&p).await;
        assert_eq!(o.status, Status::Warning, "{o:?}");
        assert_eq!(o.output, "2 of 3 queues slow");
        assert_eq!(o.metrics[0].name, "depth");
        assert_eq!(o.faults.len(), 1);
        assert!(o
            .long_output
            .contains(&format!("bytes from tcp://127.0.0.1:{port} in")));
        // The request arrived whole: the write side was shut down after it.
        let request = tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(request, b"status\n");
    }

    #[tokio::test]
    async fn unix_without_a_request() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                answer(s, false, br#"{"status": 0, "text": "fine"}"#).await;
            }
        });
        let p = JsonSocketProbe {
            address: format!("unix:{}", path.display()),
            send: None,
        };
        let o = run(&p).await;
        assert_eq!(o.status, Status::Ok, "{o:?}");
        assert_eq!(o.output, "fine");
    }

    #[tokio::test]
    async fn garbage_is_unknown_with_the_parse_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("garbage.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                answer(s, true, b"HTTP/1.0 400 Bad Request\r\n\r\n").await;
            }
        });
        let p = JsonSocketProbe {
            address: format!("unix://{}", path.display()),
            send: Some("hello".into()),
        };
        let o = run(&p).await;
        assert_eq!(o.status, Status::Unknown, "{o:?}");
        assert!(o.output.contains("not valid JSON"), "{}", o.output);
        assert!(
            o.long_output.contains("HTTP/1.0 400 Bad Request"),
            "{}",
            o.long_output
        );

        // Over TCP too, and an empty reply says so.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                answer(s, false, b"").await;
            }
        });
        let p = JsonSocketProbe {
            address: format!("tcp://127.0.0.1:{port}"),
            send: None,
        };
        let o = run(&p).await;
        assert_eq!(o.status, Status::Unknown, "{o:?}");
        assert!(
            o.long_output.contains("closed without sending anything"),
            "{}",
            o.long_output
        );
    }

    #[tokio::test]
    async fn unreachable_sockets_are_critical() {
        let dir = tempfile::tempdir().unwrap();
        let p = JsonSocketProbe {
            address: format!("unix:{}", dir.path().join("missing.sock").display()),
            send: None,
        };
        let o = run(&p).await;
        assert_eq!(o.status, Status::Critical, "{o:?}");
        assert!(o.output.contains("cannot connect to unix:"), "{}", o.output);
        assert!(o.output.contains("No such file"), "{}", o.output);

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let p = JsonSocketProbe {
            address: format!("tcp://127.0.0.1:{port}"),
            send: None,
        };
        let o = run(&p).await;
        assert_eq!(o.status, Status::Critical, "{o:?}");
        assert!(o.output.to_lowercase().contains("refused"), "{}", o.output);

        let p = JsonSocketProbe {
            address: "udp://127.0.0.1:1".into(),
            send: None,
        };
        assert_eq!(run(&p).await.status, Status::Unknown);
    }

    #[tokio::test]
    async fn oversized_replies_are_refused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let chunk = vec![b' '; 64 * 1024];
                    // Endless: the probe must stop reading on its own.
                    while s.write_all(&chunk).await.is_ok() {}
                });
            }
        });
        let p = JsonSocketProbe {
            address: format!("tcp://127.0.0.1:{port}"),
            send: None,
        };
        let o = tokio::time::timeout(Duration::from_secs(10), run(&p))
            .await
            .expect("reading must stop at the limit");
        assert_eq!(o.status, Status::Unknown, "{o:?}");
        assert!(
            o.output.contains("larger than 1048576 bytes"),
            "{}",
            o.output
        );
    }
}
