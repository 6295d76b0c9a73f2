//! TCP probe: connect to `host:port` (optionally over verified TLS), optionally send a
//! text and read the reply until `expect` shows up, the peer closes or 64 KiB came.
//!
//! Metrics: `time_ms` (everything, against `warn_ms`/`crit_ms`), `connect_ms` (resolving,
//! connecting and the TLS handshake), `answer_ms` (from sending to the reply) and, over
//! TLS, `cert_days_left`.

use std::time::{Duration, Instant};

use outpost_protocol::probe::TcpProbe;
use outpost_protocol::Status;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::{connect, contains, host_port, millis, snippet, Report, TlsOptions};
use crate::checks::outcome::Outcome;

/// Most reply bytes read.
pub const MAX_REPLY_BYTES: usize = 64 * 1024;

/// How much of an unexpected reply is shown.
const SHOWN_REPLY_BYTES: usize = 512;

pub async fn run(p: &TcpProbe) -> Outcome {
    let started = Instant::now();
    let tls = TlsOptions {
        ca_file: p.ca_file.as_deref(),
        server_name: p.server_name.as_deref(),
        cert_warn_days: p.cert_warn_days,
        cert_crit_days: p.cert_crit_days,
    };
    let no_alpn: &[&[u8]] = &[];
    let conn = match connect(&p.host, p.port, p.tls.then_some((&tls, no_alpn))).await {
        Ok(c) => c,
        Err(f) => return f.into_outcome("TCP"),
    };
    let target = host_port(&p.host, p.port);
    let mut r = Report::new("TCP");
    r.say(format!(
        "{} {target} in {} ms",
        if p.tls {
            "TLS connection to"
        } else {
            "connected to"
        },
        millis(conn.elapsed).round()
    ));
    r.metric("connect_ms", millis(conn.elapsed), Some("ms"), None, None);
    match conn.cert_days {
        Some(Ok(days)) => r.cert_days(days, tls.cert_warn_days, tls.cert_crit_days),
        Some(Err(why)) => r.note(why),
        None => {}
    }
    let mut stream = conn.stream;
    if p.send.is_some() || p.expect.is_some() {
        exchange(&mut r, &mut stream, p).await;
    }
    r.time_ms(
        "time_ms",
        "connecting and answering",
        started.elapsed(),
        p.warn_ms,
        p.crit_ms,
    );
    // Close politely (FIN, and close_notify over TLS); there is nothing to wait for.
    let _ = tokio::time::timeout(Duration::from_millis(500), stream.shutdown()).await;
    r.finish()
}

/// Send `p.send` if set, then read the reply and hold it against `p.expect`.
async fn exchange(r: &mut Report, stream: &mut Box<dyn super::Io>, p: &TcpProbe) {
    let asked = Instant::now();
    if let Some(send) = &p.send {
        let sent = async {
            stream.write_all(send.as_bytes()).await?;
            stream.flush().await
        };
        if let Err(e) = sent.await {
            r.problem(Status::Critical, format!("sending failed: {e}"));
            return;
        }
    }
    let expect = p.expect.as_deref().map(str::as_bytes);
    let reply = read_reply(stream, expect, MAX_REPLY_BYTES).await;
    let answer = asked.elapsed();
    r.metric("answer_ms", millis(answer), Some("ms"), None, None);
    match &p.expect {
        Some(_) if reply.found => {
            r.say(format!("expected reply in {} ms", millis(answer).round()));
        }
        Some(wanted) => {
            let why = if let Some(e) = &reply.error {
                format!("reading failed: {e}")
            } else if reply.data.is_empty() {
                "nothing received".to_string()
            } else if reply.full {
                format!("not in the first {MAX_REPLY_BYTES} bytes")
            } else {
                "connection closed".to_string()
            };
            r.problem(
                Status::Critical,
                format!("reply does not contain {wanted:?} ({why})"),
            );
            r.note(format!(
                "received {} bytes: {}",
                reply.data.len(),
                snippet(&reply.data, SHOWN_REPLY_BYTES)
            ));
        }
        None => {
            if let Some(e) = &reply.error {
                r.problem(Status::Critical, format!("reading the reply failed: {e}"));
            }
            r.say(format!(
                "{} bytes in reply after {} ms",
                reply.data.len(),
                millis(answer).round()
            ));
            if !reply.data.is_empty() {
                r.note(format!(
                    "received: {}",
                    snippet(&reply.data, SHOWN_REPLY_BYTES)
                ));
            }
        }
    }
}

/// What came back.
#[derive(Debug, Default)]
pub(crate) struct Reply {
    pub data: Vec<u8>,
    /// `expect` was found.
    pub found: bool,
    /// Stopped at the size limit.
    pub full: bool,
    /// Reading failed (after `data`).
    pub error: Option<String>,
}

/// Read until `expect` is among the bytes read, the peer closes, `limit` bytes came or
/// reading fails. Without `expect`, the first chunk that arrives is the reply.
pub(crate) async fn read_reply<S: AsyncRead + Unpin + ?Sized>(
    stream: &mut S,
    expect: Option<&[u8]>,
    limit: usize,
) -> Reply {
    let mut reply = Reply::default();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if let Some(wanted) = expect {
            if contains(&reply.data, wanted) {
                reply.found = true;
                break;
            }
        }
        let room = limit.saturating_sub(reply.data.len()).min(buf.len());
        if room == 0 {
            reply.full = true;
            break;
        }
        match stream.read(&mut buf[..room]).await {
            Ok(0) => break,
            Ok(n) => {
                reply.data.extend_from_slice(&buf[..n]);
                if expect.is_none() {
                    break;
                }
            }
            // A TLS peer that closes without close_notify: the end all the same.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => {
                reply.error = Some(e.to_string());
                break;
            }
        }
    }
    reply
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::net::testutil;
    use tokio::io::AsyncBufReadExt;
    use tokio::net::TcpListener;

    fn probe(port: u16) -> TcpProbe {
        TcpProbe {
            host: "127.0.0.1".into(),
            port,
            tls: false,
            send: None,
            expect: None,
            warn_ms: None,
            crit_ms: None,
            ca_file: None,
            server_name: None,
            cert_warn_days: None,
            cert_crit_days: None,
        }
    }

    /// A line server: answers each line with what `answer` makes of it, then closes.
    async fn line_server(answer: fn(&str) -> String) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut stream = tokio::io::BufReader::new(stream);
                    let mut line = String::new();
                    if stream.read_line(&mut line).await.is_ok() {
                        let _ = stream.get_mut().write_all(answer(&line).as_bytes()).await;
                    }
                });
            }
        });
        port
    }

    fn metric(o: &Outcome, name: &str) -> f64 {
        o.metrics
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("no metric {name} in {:?}", o.metrics))
            .value
    }

    #[tokio::test]
    async fn connects() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let o = run(&probe(port)).await;
        assert_eq!(o.status, Status::Ok, "{o:?}");
        assert!(
            o.output
                .starts_with(&format!("TCP OK - connected to 127.0.0.1:{port} in ")),
            "{}",
            o.output
        );
        assert!(metric(&o, "time_ms") >= metric(&o, "connect_ms"));
        drop(listener);
    }

    #[tokio::test]
    async fn refused_is_critical_with_the_reason() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let o = run(&probe(port)).await;
        assert_eq!(o.status, Status::Critical, "{o:?}");
        assert!(
            o.output.starts_with(&format!(
                "TCP CRITICAL - cannot connect to 127.0.0.1:{port}"
            )),
            "{}",
            o.output
        );
        assert!(o.output.to_lowercase().contains("refused"), "{}", o.output);
    }

    #[tokio::test]
    async fn expected_reply() {
        let port = line_server(|line| {
            if line == "PING\r\n" {
                "+PONG\r\n".into()
            } else {
                format!("-ERR unknown command {:?}\r\n", line.trim())
            }
        })
        .await;
        let mut p = probe(port);
        p.send = Some("PING\r\n".into());
        p.expect = Some("+PONG".into());
        let o = run(&p).await;
        assert_eq!(o.status, Status::Ok, "{o:?}");
        assert!(o.output.contains("expected reply in"), "{}", o.output);
        assert!(metric(&o, "answer_ms") >= 0.0);

        p.send = Some("HELLO\r\n".into());
        let o = run(&p).await;
        assert_eq!(o.status, Status::Critical, "{o:?}");
        assert!(
            o.output
                .ends_with("reply does not contain \"+PONG\" (connection closed)"),
            "{}",
            o.output
        );
        assert!(
            o.long_output
                .contains("received 30 bytes: -ERR unknown command \"HELLO\"\\r\\n"),
            "{}",
            o.long_output
        );
    }

    #[tokio::test]
    async fn send_without_expect_reports_the_reply() {
        let port = line_server(|_| "hello\n".into()).await;
        let mut p = probe(port);
        p.send = Some("hi\n".into());
        let o = run(&p).await;
        assert_eq!(o.status, Status::Ok, "{o:?}");
        assert!(o.output.contains("6 bytes in reply"), "{}", o.output);
        assert_eq!(o.long_output, "received: hello\\n");
    }

    #[tokio::test]
    async fn replies_are_read_up_to_the_limit() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            if let Ok((mut s, _)) = listener.accept().await {
                let chunk = vec![b'z'; 64 * 1024];
                // Far more than the limit, never the expected text, never closing.
                for _ in 0..8 {
                    if s.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
                std::future::pending::<()>().await;
            }
        });
        let mut p = probe(port);
        p.expect = Some("READY".into());
        let o = tokio::time::timeout(Duration::from_secs(10), run(&p))
            .await
            .expect("the read must stop at the limit, not wait for more");
        assert_eq!(o.status, Status::Critical, "{o:?}");
        assert!(
            o.output.contains("not in the first 65536 bytes"),
            "{}",
            o.output
        );
        assert!(
            o.long_output.contains("[65536 bytes in all]"),
            "{}",
            o.long_output
        );
    }

    #[tokio::test]
    async fn slow_answers_cross_thresholds() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(150)).await;
                    let _ = s.write_all(b"READY\n").await;
                });
            }
        });
        let mut p = probe(port);
        p.expect = Some("READY".into());
        p.warn_ms = Some(50);
        let o = run(&p).await;
        assert_eq!(o.status, Status::Warning, "{o:?}");
        assert!(
            o.output.contains("connecting and answering took"),
            "{}",
            o.output
        );
        p.crit_ms = Some(100);
        assert_eq!(run(&p).await.status, Status::Critical);
        p.warn_ms = Some(60_000);
        p.crit_ms = None;
        assert_eq!(run(&p).await.status, Status::Ok);
    }

    #[tokio::test]
    async fn tls_verified_against_ca_file_with_days_left() {
        let cert = testutil::cert(30);
        let port = testutil::tls_echo_server(&cert).await;
        let ca = testutil::ca_file(&cert);
        let mut p = probe(port);
        p.tls = true;
        p.ca_file = Some(ca.path().display().to_string());
        p.send = Some("hello over tls\n".into());
        p.expect = Some("hello over tls".into());
        let o = run(&p).await;
        assert_eq!(o.status, Status::Ok, "{o:?}");
        assert!(
            o.output
                .starts_with("TCP OK - TLS connection to 127.0.0.1:"),
            "{}",
            o.output
        );
        let days = metric(&o, "cert_days_left");
        assert!((29.0..=30.0).contains(&days), "{days}");

        // Verified for another name the certificate holds.
        p.server_name = Some("localhost".into());
        assert_eq!(run(&p).await.status, Status::Ok);
        // ...and not for one it does not.
        p.server_name = Some("elsewhere.test".into());
        let o = run(&p).await;
        assert_eq!(o.status, Status::Critical, "{o:?}");
        assert!(
            o.output
                .contains("certificate not valid for name \"elsewhere.test\""),
            "{}",
            o.output
        );
        p.server_name = None;

        p.cert_warn_days = Some(60);
        let o = run(&p).await;
        assert_eq!(o.status, Status::Warning, "{o:?}");
        assert!(
            o.output
                .ends_with("certificate expires in 29 days (warning below 60)"),
            "{}",
            o.output
        );
        p.cert_crit_days = Some(45);
        assert_eq!(run(&p).await.status, Status::Critical);
    }

    #[tokio::test]
    async fn tls_with_the_wrong_ca_is_critical() {
        let served = testutil::cert(30);
        let other = testutil::cert(30);
        let port = testutil::tls_echo_server(&served).await;
        let ca = testutil::ca_file(&other);
        let mut p = probe(port);
        p.tls = true;
        p.ca_file = Some(ca.path().display().to_string());
        let o = run(&p).await;
        assert_eq!(o.status, Status::Critical, "{o:?}");
        assert!(
            o.output.contains("TLS handshake with 127.0.0.1:"),
            "{}",
            o.output
        );
        assert!(
            o.output.contains("invalid peer certificate") && o.output.contains("UnknownIssuer"),
            "{}",
            o.output
        );
    }

    #[tokio::test]
    async fn tls_to_a_plain_server_fails() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let _ = s.write_all(b"220 plain text here\r\n").await;
            }
        });
        let cert = testutil::cert(30);
        let ca = testutil::ca_file(&cert);
        let mut p = probe(port);
        p.tls = true;
        p.ca_file = Some(ca.path().display().to_string());
        let o = tokio::time::timeout(Duration::from_secs(10), run(&p))
            .await
            .expect("a garbled handshake must fail, not hang");
        assert_eq!(o.status, Status::Critical, "{o:?}");
        assert!(o.output.contains("TLS handshake with"), "{}", o.output);
    }
}
