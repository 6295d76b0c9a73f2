//! HTTP probe: one request over HTTP/1.1 (hyper's client connection on a TCP or verified
//! TLS stream), redirects reported and never followed, the body read up to 1 MiB.
//!
//! OK when the status is expected (any 2xx or 3xx unless `expect_status` lists them) and
//! the body holds `body_contains`; CRITICAL otherwise. Metrics: `time_ms` (connecting to
//! the end of the body, against `warn_ms`/`crit_ms`), `status`, `size` (body bytes read)
//! and, over TLS, `cert_days_left`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::header::{HeaderName, HeaderValue, ACCEPT, HOST, LOCATION, USER_AGENT};
use hyper::{Method, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use outpost_protocol::probe::HttpProbe;
use outpost_protocol::Status;

use super::{chain, connect, contains, host_port, millis, snippet, Failure, Report, TlsOptions};
use crate::checks::outcome::Outcome;

/// Most body bytes read.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Sent with every request.
pub const USER_AGENT_VALUE: &str = concat!("outpost-agent/", env!("CARGO_PKG_VERSION"));

/// How much of a body is shown when it is not what was expected.
const SHOWN_BODY_BYTES: usize = 512;

/// One request to make.
pub(crate) struct Request<'a> {
    pub url: &'a str,
    pub method: &'a str,
    pub headers: &'a BTreeMap<String, String>,
    /// `Accept`, unless `headers` sets one.
    pub accept: Option<&'a str>,
    pub tls: TlsOptions<'a>,
    pub body_limit: usize,
}

/// What came back.
pub(crate) struct Response {
    pub status: StatusCode,
    pub location: Option<String>,
    pub body: Vec<u8>,
    /// The body was longer than the limit: `body` is its beginning.
    pub cut: bool,
    /// From before connecting to the end of the body.
    pub elapsed: Duration,
    pub cert_days: Option<Result<f64, String>>,
}

/// The parts of a URL a request needs.
#[derive(Debug, PartialEq)]
struct Target {
    https: bool,
    /// To connect to: without brackets around an IPv6 address.
    host: String,
    port: u16,
    /// The `Host` header: as written in the URL, port included when it is given.
    authority: String,
    /// Origin form: path and query.
    path: String,
}

fn target(url: &str) -> Result<Target, String> {
    let uri: Uri = url
        .trim()
        .parse()
        .map_err(|e| format!("invalid URL {url:?}: {e}"))?;
    let https = match uri.scheme_str() {
        Some(s) if s.eq_ignore_ascii_case("http") => false,
        Some(s) if s.eq_ignore_ascii_case("https") => true,
        _ => return Err(format!("URL {url:?} must start with http:// or https://")),
    };
    let authority = uri
        .authority()
        .ok_or_else(|| format!("URL {url:?} has no host"))?;
    if authority.as_str().contains('@') {
        return Err(format!(
            "URL {url:?} holds credentials, which are not sent from there; set an Authorization header instead"
        ));
    }
    let host = authority.host();
    if host.is_empty() {
        return Err(format!("URL {url:?} has no host"));
    }
    let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
    Ok(Target {
        https,
        host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        port,
        authority: authority.as_str().to_string(),
        path: uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "/".into()),
    })
}

/// Aborts the connection's task when the request is done (or given up on).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Make one request and read the body up to `req.body_limit`.
pub(crate) async fn fetch(req: &Request<'_>) -> Result<Response, Failure> {
    let started = Instant::now();
    let t = target(req.url).map_err(Failure::Setup)?;
    let method = Method::from_bytes(req.method.trim().to_ascii_uppercase().as_bytes())
        .map_err(|_| Failure::Setup(format!("invalid HTTP method {:?}", req.method)))?;
    let mut request = hyper::Request::new(Empty::<Bytes>::new());
    *request.method_mut() = method;
    *request.uri_mut() = t
        .path
        .parse()
        .map_err(|e| Failure::Setup(format!("invalid path in URL {:?}: {e}", req.url)))?;
    let headers = request.headers_mut();
    let host = HeaderValue::from_str(&t.authority)
        .map_err(|e| Failure::Setup(format!("invalid host in URL {:?}: {e}", req.url)))?;
    headers.insert(HOST, host);
    headers.insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
    if let Some(accept) = req.accept {
        let accept = HeaderValue::from_str(accept)
            .map_err(|e| Failure::Setup(format!("invalid Accept header: {e}")))?;
        headers.insert(ACCEPT, accept);
    }
    for (name, value) in req.headers {
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|e| Failure::Setup(format!("invalid header name {name:?}: {e}")))?;
        let value = HeaderValue::from_str(value)
            .map_err(|e| Failure::Setup(format!("invalid value for header {name}: {e}")))?;
        headers.insert(name, value);
    }

    let alpn: &[&[u8]] = &[b"http/1.1"];
    let conn = connect(&t.host, t.port, t.https.then_some((&req.tls, alpn))).await?;
    let place = host_port(&t.host, t.port);
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(conn.stream))
            .await
            .map_err(|e| {
                Failure::Down(format!("HTTP handshake with {place} failed: {}", chain(&e)))
            })?;
    let _driver = AbortOnDrop(tokio::spawn(async move {
        let _ = connection.await;
    }));
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| Failure::Down(format!("request to {place} failed: {}", chain(&e))))?;
    let (parts, mut body) = response.into_parts();
    let mut data = Vec::new();
    let mut cut = false;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            Failure::Down(format!(
                "reading the body from {place} failed after {} bytes: {}",
                data.len(),
                chain(&e)
            ))
        })?;
        if let Ok(chunk) = frame.into_data() {
            let room = req.body_limit - data.len();
            if chunk.len() > room {
                data.extend_from_slice(&chunk[..room]);
                cut = true;
                break;
            }
            data.extend_from_slice(&chunk);
        }
    }
    Ok(Response {
        status: parts.status,
        location: parts
            .headers
            .get(LOCATION)
            .map(|l| String::from_utf8_lossy(l.as_bytes()).into_owned()),
        body: data,
        cut,
        elapsed: started.elapsed(),
        cert_days: conn.cert_days,
    })
}

/// `200 OK`, or just the code for one without a standard reason.
pub(crate) fn status_text(status: StatusCode) -> String {
    match status.canonical_reason() {
        Some(reason) => format!("{} {reason}", status.as_u16()),
        None => status.as_u16().to_string(),
    }
}

pub async fn run(p: &HttpProbe) -> Outcome {
    let req = Request {
        url: &p.url,
        method: &p.method,
        headers: &p.headers,
        accept: None,
        tls: TlsOptions {
            ca_file: p.ca_file.as_deref(),
            server_name: p.server_name.as_deref(),
            cert_warn_days: p.cert_warn_days,
            cert_crit_days: p.cert_crit_days,
        },
        body_limit: MAX_BODY_BYTES,
    };
    let resp = match fetch(&req).await {
        Ok(r) => r,
        Err(f) => return f.into_outcome("HTTP"),
    };
    let mut r = Report::new("HTTP");
    let code = resp.status.as_u16();
    r.say(format!(
        "{} in {} ms",
        status_text(resp.status),
        millis(resp.elapsed).round()
    ));
    r.say(if resp.cut {
        format!(
            "{} bytes (body cut at {} KiB)",
            resp.body.len(),
            MAX_BODY_BYTES / 1024
        )
    } else {
        format!("{} bytes", resp.body.len())
    });
    if resp.cut {
        r.note(format!(
            "the body is longer than {MAX_BODY_BYTES} bytes; only its beginning was read"
        ));
    }
    if let Some(location) = &resp.location {
        r.note(format!("Location: {location} (redirects are not followed)"));
    }

    let status_ok = if p.expect_status.is_empty() {
        (200..400).contains(&code)
    } else {
        p.expect_status.contains(&code)
    };
    if !status_ok {
        let wanted = match p.expect_status.as_slice() {
            [] => "2xx or 3xx".to_string(),
            [one] => one.to_string(),
            many => {
                let list: Vec<String> = many.iter().map(u16::to_string).collect();
                format!("one of {}", list.join(", "))
            }
        };
        r.problem(Status::Critical, format!("expected status {wanted}"));
        if !resp.body.is_empty() {
            r.note(format!("body: {}", snippet(&resp.body, SHOWN_BODY_BYTES)));
        }
    }
    if let Some(wanted) = &p.body_contains {
        if !contains(&resp.body, wanted.as_bytes()) {
            let where_ = if resp.cut {
                format!(" in its first {} KiB", MAX_BODY_BYTES / 1024)
            } else {
                String::new()
            };
            r.problem(
                Status::Critical,
                format!("body does not contain {wanted:?}{where_}"),
            );
            if status_ok {
                r.note(format!("body: {}", snippet(&resp.body, SHOWN_BODY_BYTES)));
            }
        }
    }
    r.time_ms("time_ms", "the request", resp.elapsed, p.warn_ms, p.crit_ms);
    r.metric("status", f64::from(code), None, None, None);
    r.metric("size", resp.body.len() as f64, Some("B"), None, None);
    match resp.cert_days {
        Some(Ok(days)) => r.cert_days(days, p.cert_warn_days, p.cert_crit_days),
        Some(Err(why)) => r.note(why),
        None => {}
    }
    r.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::net::testutil::{self, HttpReply};
    use std::sync::Arc;

    fn probe(url: String) -> HttpProbe {
        HttpProbe {
            url,
            method: "GET".into(),
            headers: BTreeMap::new(),
            expect_status: Vec::new(),
            body_contains: None,
            warn_ms: None,
            crit_ms: None,
            ca_file: None,
            server_name: None,
            cert_warn_days: None,
            cert_crit_days: None,
        }
    }

    fn metric(o: &Outcome, name: &str) -> f64 {
        o.metrics
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("no metric {name} in {:?}", o.metrics))
            .value
    }

    /// Answers by path: `/ok` 200, `/missing` 404, `/broken` 500, `/moved` 301, `/big`
    /// 2 MiB.
    fn site() -> testutil::Handler {
        Arc::new(|head: &str| {
            let path = head.split(' ').nth(1).unwrap_or("");
            match path {
                "/ok" | "/ok?x=1" => HttpReply::new(200, "OK", "all systems nominal\n"),
                "/broken" => HttpReply::new(500, "Internal Server Error", "database is down"),
                "/moved" => {
                    let mut r = HttpReply::new(301, "Moved Permanently", "");
                    r.headers.push(("Location", "/ok".into()));
                    r
                }
                "/big" => HttpReply::new(200, "OK", vec![b'b'; 2 * MAX_BODY_BYTES]),
                _ => HttpReply::new(404, "Not Found", "no such page"),
            }
        })
    }

    #[test]
    fn urls() {
        let t = target("http://127.0.0.1:8080/health?full=1").unwrap();
        assert_eq!(
            t,
            Target {
                https: false,
                host: "127.0.0.1".into(),
                port: 8080,
                authority: "127.0.0.1:8080".into(),
                path: "/health?full=1".into(),
            }
        );
        let t = target("HTTPS://[::1]").unwrap();
        assert_eq!(
            (t.https, t.host.as_str(), t.port, t.path.as_str()),
            (true, "::1", 443, "/")
        );
        assert_eq!(t.authority, "[::1]");
        assert!(target("ftp://example.com/")
            .unwrap_err()
            .contains("http://"));
        assert!(target("example.com/x").is_err());
        assert!(target("http://user:pw@example.com/")
            .unwrap_err()
            .contains("credentials"));
    }

    #[tokio::test]
    async fn ok_with_body_match_and_request_headers() {
        let (port, heads) = testutil::http_server(None, site()).await;
        let mut p = probe(format!("http://127.0.0.1:{port}/ok?x=1"));
        p.body_contains = Some("nominal".into());
        p.headers.insert("X-Probe".into(), "yes".into());
        let o = run(&p).await;
        assert_eq!(o.status, Status::Ok, "{o:?}");
        assert!(o.output.starts_with("HTTP OK - 200 OK in "), "{}", o.output);
        assert!(o.output.ends_with(" ms, 20 bytes"), "{}", o.output);
        assert_eq!(metric(&o, "status"), 200.0);
        assert_eq!(metric(&o, "size"), 20.0);
        assert!(metric(&o, "time_ms") >= 0.0);
        let head = heads.lock().unwrap()[0].to_lowercase();
        assert!(head.starts_with("get /ok?x=1 http/1.1\r\n"), "{head}");
        assert!(
            head.contains(&format!("host: 127.0.0.1:{port}\r\n")),
            "{head}"
        );
        assert!(
            head.contains(&format!(
                "user-agent: outpost-agent/{}\r\n",
                env!("CARGO_PKG_VERSION")
            )),
            "{head}"
        );
        assert!(head.contains("x-probe: yes\r\n"), "{head}");
    }

    #[tokio::test]
    async fn body_mismatch_is_critical() {
        let (port, _) = testutil::http_server(None, site()).await;
        let mut p = probe(format!("http://127.0.0.1:{port}/ok"));
        p.body_contains = Some("everything is fine".into());
        let o = run(&p).await;
        assert_eq!(o.status, Status::Critical, "{o:?}");
        assert!(
            o.output
                .ends_with("20 bytes - body does not contain \"everything is fine\""),
            "{}",
            o.output
        );
        assert_eq!(o.long_output, "body: all systems nominal\\n");
    }

    #[tokio::test]
    async fn statuses() {
        let (port, _) = testutil::http_server(None, site()).await;
        let o = run(&probe(format!("http://127.0.0.1:{port}/broken"))).await;
        assert_eq!(o.status, Status::Critical, "{o:?}");
        assert!(
            o.output
                .starts_with("HTTP CRITICAL - 500 Internal Server Error in "),
            "{}",
            o.output
        );
        assert!(
            o.output.ends_with("expected status 2xx or 3xx"),
            "{}",
            o.output
        );
        assert!(
            o.long_output.contains("database is down"),
            "{}",
            o.long_output
        );

        let mut p = probe(format!("http://127.0.0.1:{port}/nothing-here"));
        assert_eq!(run(&p).await.status, Status::Critical);
        p.expect_status = vec![404];
        let o = run(&p).await;
        assert_eq!(o.status, Status::Ok, "{o:?}");
        assert!(
            o.output.starts_with("HTTP OK - 404 Not Found"),
            "{}",
            o.output
        );

        p.expect_status = vec![200, 204];
        let o = run(&p).await;
        assert!(
            o.output.ends_with("expected status one of 200, 204"),
            "{}",
            o.output
        );

        // Redirects are reported, not followed.
        let o = run(&probe(format!("http://127.0.0.1:{port}/moved"))).await;
        assert_eq!(o.status, Status::Ok, "{o:?}");
        assert!(
            o.output.starts_with("HTTP OK - 301 Moved Permanently"),
            "{}",
            o.output
        );
        assert!(o.long_output.contains("Location: /ok"), "{}", o.long_output);
    }

    #[tokio::test]
    async fn methods_are_sent_as_given() {
        let (port, heads) = testutil::http_server(None, site()).await;
        let mut p = probe(format!("http://127.0.0.1:{port}/ok"));
        p.method = "head".into();
        // Content-Length says 20 but a HEAD answer has no body.
        let o = run(&p).await;
        assert_eq!(o.status, Status::Ok, "{o:?}");
        assert!(heads.lock().unwrap()[0].starts_with("HEAD /ok HTTP/1.1"));
        p.method = "NOT A METHOD".into();
        assert_eq!(run(&p).await.status, Status::Unknown);
    }

    #[tokio::test]
    async fn oversized_body_is_cut_and_said() {
        let (port, _) = testutil::http_server(None, site()).await;
        let mut p = probe(format!("http://127.0.0.1:{port}/big"));
        p.body_contains = Some("never there".into());
        let o = run(&p).await;
        assert_eq!(o.status, Status::Critical, "{o:?}");
        assert!(
            o.output
                .contains("1048576 bytes (body cut at 1024 KiB) - body does not contain \"never there\" in its first 1024 KiB"),
            "{}",
            o.output
        );
        assert_eq!(metric(&o, "size"), MAX_BODY_BYTES as f64);
        assert!(
            o.long_output.contains("only its beginning was read"),
            "{}",
            o.long_output
        );
    }

    #[tokio::test]
    async fn unreachable_and_bad_definitions() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let o = run(&probe(format!("http://127.0.0.1:{port}/"))).await;
        assert_eq!(o.status, Status::Critical, "{o:?}");
        assert!(
            o.output.starts_with("HTTP CRITICAL - cannot connect to"),
            "{}",
            o.output
        );

        let o = run(&probe("gopher://127.0.0.1/".into())).await;
        assert_eq!(o.status, Status::Unknown, "{o:?}");
        let mut p = probe(format!("http://127.0.0.1:{port}/"));
        p.headers.insert("bad header".into(), "x".into());
        let o = run(&p).await;
        assert_eq!(o.status, Status::Unknown, "{o:?}");
        assert!(o.output.contains("invalid header name"), "{}", o.output);
    }

    #[tokio::test]
    async fn a_server_that_is_not_http_is_critical() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            while let Ok((mut s, _)) = listener.accept().await {
                let _ = s.write_all(b"SSH-2.0-OpenSSH_9.6\r\n").await;
            }
        });
        let o = tokio::time::timeout(
            Duration::from_secs(10),
            run(&probe(format!("http://127.0.0.1:{port}/"))),
        )
        .await
        .expect("a garbled answer must fail, not hang");
        assert_eq!(o.status, Status::Critical, "{o:?}");
        assert!(o.output.contains("request to 127.0.0.1:"), "{}", o.output);
    }

    #[tokio::test]
    async fn https_verified_with_expiry_thresholds() {
        let cert = testutil::cert(20);
        let (port, heads) = testutil::http_server(Some(&cert), site()).await;
        let ca = testutil::ca_file(&cert);
        let mut p = probe(format!("https://localhost:{port}/ok"));
        p.ca_file = Some(ca.path().display().to_string());
        p.body_contains = Some("nominal".into());
        let o = run(&p).await;
        assert_eq!(o.status, Status::Ok, "{o:?}");
        let days = metric(&o, "cert_days_left");
        assert!((19.0..=20.0).contains(&days), "{days}");
        assert!(heads.lock().unwrap()[0]
            .to_lowercase()
            .contains(&format!("host: localhost:{port}\r\n")));

        p.cert_warn_days = Some(30);
        let o = run(&p).await;
        assert_eq!(o.status, Status::Warning, "{o:?}");
        assert!(
            o.output
                .ends_with("certificate expires in 19 days (warning below 30)"),
            "{}",
            o.output
        );
        p.cert_crit_days = Some(21);
        assert_eq!(run(&p).await.status, Status::Critical);
        p.cert_warn_days = Some(10);
        p.cert_crit_days = Some(5);
        assert_eq!(run(&p).await.status, Status::Ok);

        // Not trusted without the CA file (the system roots do not hold it).
        let stranger = testutil::ca_file(&testutil::cert(20));
        p.ca_file = Some(stranger.path().display().to_string());
        let o = run(&p).await;
        assert_eq!(o.status, Status::Critical, "{o:?}");
        assert!(o.output.contains("UnknownIssuer"), "{}", o.output);
    }
}
