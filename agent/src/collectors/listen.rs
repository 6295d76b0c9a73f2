//! The agent's two listeners for collectors' data, on 127.0.0.1 only, one of each per
//! agent: Graphite plaintext over TCP (collectd's `write_graphite`) and HTTP (fluentd's
//! `out_http`). Both hand what they receive to [`Sinks`], which checks each collector's
//! secret: every local user can connect to 127.0.0.1, only the collector can read its
//! configuration file.
//!
//! Admission: a connection is *pending* until it proves a collector's secret (a Graphite
//! line with a collector's prefix, an HTTP request with its credentials), then
//! *authenticated*. Anything it sends without the secret closes it, counted. At most
//! [`Limits::max_pending`] connections are pending; a new connection closes the oldest
//! pending one rather than being turned away, so idle connections, however many, cannot
//! lock a collector out: its connection proves itself with its first line or request and
//! leaves the pending ones. At most [`Limits::max_authenticated`] connections are
//! authenticated (only holders of a secret get there).
//!
//! Timeouts: a Graphite connection silent for twice the longest collector interval plus
//! [`Limits::graphite_quiet_margin`] is closed (collectd connects at its first write and
//! then sends at least once an interval; anything shorter would cut a quiet collectd off
//! and lose its next batch), and a line, once begun, must arrive whole within
//! [`Limits::line_timeout`]. An HTTP connection serves one request (fluentd opens one per
//! post): its head must arrive within [`Limits::http_head_timeout`] of connecting, and an
//! authenticated request then has [`Limits::http_request_timeout`] for its body and answer.
//!
//! Other bounds: Graphite lines of at most [`crate::supervise::MAX_LINE`] bytes (longer ones
//! are skipped and counted), HTTP bodies of at most [`MAX_BODY`] bytes (larger ones get 413).

use outpost_sys::lock;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, AUTHORIZATION, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::data::{parse_records, Sinks, Taken};
use crate::supervise::{read_line, Line};

/// Largest HTTP body taken (the rendered fluentd config cuts chunks at 1 MiB).
pub const MAX_BODY: usize = 2 * 1024 * 1024;

/// How many connections the listeners hold, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most connections per listener that have not proved a secret yet; a new one closes
    /// the oldest of them.
    pub max_pending: usize,
    /// Most connections per listener that have proved a secret; more are closed.
    pub max_authenticated: usize,
    /// Added to twice the longest collector interval: how long a Graphite connection may
    /// stay silent.
    pub graphite_quiet_margin: Duration,
    /// How long a Graphite line, once begun, may take to arrive whole.
    pub line_timeout: Duration,
    /// How long an HTTP request's head may take to arrive after connecting.
    pub http_head_timeout: Duration,
    /// How long an authenticated HTTP request then has for its body and the answer.
    pub http_request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_pending: 64,
            max_authenticated: 64,
            graphite_quiet_margin: Duration::from_secs(30),
            line_timeout: Duration::from_secs(10),
            http_head_timeout: Duration::from_secs(10),
            http_request_timeout: Duration::from_secs(60),
        }
    }
}

impl Limits {
    /// How long a Graphite connection may stay silent when the longest interval of the
    /// running collectors is `longest`.
    pub fn graphite_quiet(&self, longest: Duration) -> Duration {
        longest * 2 + self.graphite_quiet_margin
    }
}

/// Which connections one listener holds: the pending ones in the order they came, and how
/// many are authenticated.
struct Gate {
    limits: Limits,
    sinks: Arc<Sinks>,
    state: Mutex<GateState>,
}

#[derive(Default)]
struct GateState {
    next_id: u64,
    pending: VecDeque<(u64, CancellationToken)>,
    authenticated: usize,
}

impl Gate {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        lock(&self.state)
    }

    /// Take a new connection in as pending, closing the oldest pending one when there are
    /// already as many as allowed.
    fn admit(self: &Arc<Self>, stop: &CancellationToken) -> Arc<Ticket> {
        let close = stop.child_token();
        let mut st = self.lock();
        let mut evicted = false;
        if st.pending.len() >= self.limits.max_pending {
            if let Some((_, oldest)) = st.pending.pop_front() {
                oldest.cancel();
                evicted = true;
            }
        }
        let id = st.next_id;
        st.next_id += 1;
        st.pending.push_back((id, close.clone()));
        drop(st);
        if evicted {
            self.sinks.count(|c| c.evicted += 1);
        }
        Arc::new(Ticket {
            gate: self.clone(),
            id,
            close,
            authenticated: AtomicBool::new(false),
        })
    }
}

/// One connection's place at its listener; given back when dropped.
struct Ticket {
    gate: Arc<Gate>,
    id: u64,
    /// Cancelled to close the connection (when it is evicted, or the listener stops).
    close: CancellationToken,
    authenticated: AtomicBool,
}

impl Ticket {
    fn is_authenticated(&self) -> bool {
        self.authenticated.load(Ordering::SeqCst)
    }

    /// The connection proved a secret: it leaves the pending ones. False when it cannot
    /// stay (it was evicted meanwhile, or the most authenticated connections are open);
    /// the caller then closes it.
    fn authenticate(&self) -> bool {
        if self.is_authenticated() {
            return true;
        }
        let mut st = self.gate.lock();
        let Some(i) = st.pending.iter().position(|(id, _)| *id == self.id) else {
            return false;
        };
        if st.authenticated >= self.gate.limits.max_authenticated {
            drop(st);
            self.gate.sinks.count(|c| c.over_capacity += 1);
            return false;
        }
        st.pending.remove(i);
        st.authenticated += 1;
        self.authenticated.store(true, Ordering::SeqCst);
        true
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut st = self.gate.lock();
        if self.is_authenticated() {
            st.authenticated -= 1;
        } else if let Some(i) = st.pending.iter().position(|(id, _)| *id == self.id) {
            st.pending.remove(i);
        }
    }
}

/// Accept connections on `listener` until `stop`, each served by `serve` in a task of its
/// own, admitted by a [`Gate`].
async fn accept_loop<F, Fut>(
    listener: TcpListener,
    what: &'static str,
    gate: Arc<Gate>,
    stop: CancellationToken,
    serve: F,
) where
    F: Fn(TcpStream, Arc<Ticket>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let stream = tokio::select! {
            a = listener.accept() => match a {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(listener = what, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let ticket = gate.admit(&stop);
        let conn = serve(stream, ticket.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = conn => {}
                _ = ticket.close.cancelled() => {}
            }
        });
    }
}

/// Serve Graphite plaintext on `listener` until `stop`.
pub async fn graphite(
    listener: TcpListener,
    sinks: Arc<Sinks>,
    limits: Limits,
    stop: CancellationToken,
) {
    let gate = Arc::new(Gate {
        limits,
        sinks: sinks.clone(),
        state: Default::default(),
    });
    accept_loop(listener, "graphite", gate, stop, move |stream, ticket| {
        serve_graphite(stream, ticket, sinks.clone(), limits)
    })
    .await
}

async fn serve_graphite(stream: TcpStream, ticket: Arc<Ticket>, sinks: Arc<Sinks>, limits: Limits) {
    let timed_out = || sinks.count(|c| c.timed_out += 1);
    let mut r = BufReader::new(stream);
    let mut buf = Vec::new();
    loop {
        let quiet = limits.graphite_quiet(sinks.longest_interval());
        match tokio::time::timeout(quiet, r.fill_buf()).await {
            Err(_) => return timed_out(),
            Ok(Ok(b)) if !b.is_empty() => {}
            Ok(_) => return,
        }
        let line =
            match tokio::time::timeout(limits.line_timeout, read_line(&mut r, &mut buf)).await {
                Err(_) => return timed_out(),
                Ok(Ok(Line::Eof) | Err(_)) => return,
                Ok(Ok(line)) => line,
            };
        let taken = match line {
            Line::Text => sinks.graphite(&String::from_utf8_lossy(&buf)),
            Line::TooLong | Line::Eof => {
                sinks.bad_line();
                Taken::Malformed
            }
        };
        let keep = match taken {
            Taken::Accepted | Taken::NotANumber => ticket.authenticate(),
            // A collector's own junk is dropped; nobody else's connection stays for it.
            Taken::Malformed => ticket.is_authenticated(),
            Taken::Unauthenticated => false,
        };
        if !keep {
            return;
        }
    }
}

/// Serve fluentd's HTTP posts on `listener` until `stop`.
pub async fn http(
    listener: TcpListener,
    sinks: Arc<Sinks>,
    limits: Limits,
    stop: CancellationToken,
) {
    let gate = Arc::new(Gate {
        limits,
        sinks: sinks.clone(),
        state: Default::default(),
    });
    accept_loop(
        listener,
        "collector http",
        gate,
        stop,
        move |stream, ticket| serve_http(stream, ticket, sinks.clone(), limits),
    )
    .await
}

async fn serve_http(stream: TcpStream, ticket: Arc<Ticket>, sinks: Arc<Sinks>, limits: Limits) {
    let service = {
        let (sinks, ticket) = (sinks.clone(), ticket.clone());
        hyper::service::service_fn(move |req| {
            let (sinks, ticket) = (sinks.clone(), ticket.clone());
            async move { Ok::<_, Infallible>(handle(req, &sinks, &ticket).await) }
        })
    };
    // One request per connection: no idle keep-alive connections to hold.
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    let deadline = async {
        tokio::time::sleep(limits.http_head_timeout).await;
        if ticket.is_authenticated() {
            tokio::time::sleep(limits.http_request_timeout).await;
        }
    };
    tokio::select! {
        _ = conn => {}
        _ = deadline => sinks.count(|c| c.timed_out += 1),
    }
}

fn reply(status: StatusCode, text: impl Into<String>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(text.into())));
    *r.status_mut() = status;
    r
}

/// The user and password of an `Authorization: Basic` header.
fn basic_credentials(req: &Request<Incoming>) -> Option<(Vec<u8>, Vec<u8>)> {
    let value = req.headers().get(AUTHORIZATION)?.as_bytes();
    let (scheme, encoded) = value.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"basic ") {
        return None;
    }
    let decoded = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        encoded.trim_ascii(),
    )
    .ok()?;
    let colon = decoded.iter().position(|b| *b == b':')?;
    Some((decoded[..colon].to_vec(), decoded[colon + 1..].to_vec()))
}

/// `POST /collector/NAME[/TAG]` with a JSON array or NDJSON of records, as the user NAME
/// with the collector's secret as the password (HTTP Basic).
async fn handle(req: Request<Incoming>, sinks: &Sinks, ticket: &Ticket) -> Response<Full<Bytes>> {
    let Some(rest) = req.uri().path().strip_prefix("/collector/") else {
        sinks.count(|c| c.unauthenticated += 1);
        return reply(StatusCode::NOT_FOUND, "the path is /collector/NAME/TAG\n");
    };
    let (name, tag) = rest.split_once('/').unwrap_or((rest, ""));
    let (name, tag) = (name.to_string(), percent_decode(tag));
    let proved = basic_credentials(&req).is_some_and(|(user, password)| {
        user == name.as_bytes() && sinks.authorized(&name, &password)
    });
    if !proved {
        sinks.count(|c| c.unauthenticated += 1);
        let mut r = reply(
            StatusCode::UNAUTHORIZED,
            "post as the collector's name with its secret, as its rendered configuration does\n",
        );
        r.headers_mut().insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"outpost collector\""),
        );
        return r;
    }
    if !ticket.authenticate() {
        return reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many collector connections are open\n",
        );
    }
    if req.method() != Method::POST {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "POST records here\n");
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            let too_big = e
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some();
            return if too_big {
                reply(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("at most {MAX_BODY} bytes\n"),
                )
            } else {
                reply(
                    StatusCode::BAD_REQUEST,
                    format!("cannot read the body: {e}\n"),
                )
            };
        }
    };
    let records = match parse_records(&body) {
        Ok((records, _skipped)) => records,
        Err(e) => {
            sinks.bad_line();
            return reply(StatusCode::BAD_REQUEST, format!("{e}\n"));
        }
    };
    if sinks.records(&name, &tag, &records) {
        reply(StatusCode::OK, "")
    } else {
        reply(
            StatusCode::NOT_FOUND,
            format!("no collector {name:?} runs here\n"),
        )
    }
}

/// `%XX` sequences decoded (fluentd puts the tag in the path as it is; anything else may
/// encode it); invalid sequences and non-UTF-8 results are kept as they came.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap_or_else(|_| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_percent_decoded() {
        assert_eq!(percent_decode("app.access"), "app.access");
        assert_eq!(percent_decode("a%2Fb%20c"), "a/b c");
        assert_eq!(percent_decode("bad%zz%4"), "bad%zz%4");
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("%ff"), "%ff");
    }
}
