//! Accepting connections: admission (a slot in the pool of connections not yet
//! authenticated, or closed at once, before TLS), then TLS with a handshake deadline, then
//! HTTP/1.1 with upgrades, handing each request to the router with the peer address and
//! the connection's slot attached. Every write on the connection has a deadline.
//!
//! What this is not: authentication (the session and the API do that) or a limit on
//! agents (`--max-agents`, in the session).

pub mod admission;
pub mod deadline;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use hyper_util::rt::TokioIo;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

pub use admission::{Admission, PreAuth};

use crate::metrics::Metrics;
use crate::settings::Settings;

/// The peer address of the connection a request came in on (a request extension).
#[derive(Clone, Copy)]
pub struct Peer(pub std::net::SocketAddr);

/// A client that has not finished the TLS handshake by then is dropped.
const TLS_HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// A client that has not sent its request headers by then is dropped (also between the
/// requests of a kept-alive connection).
const HEADER_READ_DEADLINE: Duration = Duration::from_secs(10);
/// Most bytes hyper buffers per connection, each way: request headers beyond it are
/// answered 431, and a response body is read from its source only as fast as the client
/// takes it. hyper's default (about 400 KiB) let every client that stopped reading a
/// download hold that much, on top of TLS's 64 KiB.
const HTTP_BUFFER: usize = 64 * 1024;
/// Refusals and accept errors come in floods: one log line per this long at most.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Raise the descriptor limit and size the pool of unauthenticated connections from
/// `settings` (its default from the limit), logging both.
pub fn admission(settings: &Settings) -> Admission {
    let nofile = admission::raise_nofile();
    match nofile {
        Some(n) => tracing::info!(
            soft_before = n.soft_before,
            soft = n.soft,
            hard = n.hard,
            "file descriptor limit (RLIMIT_NOFILE; the soft limit is raised to the hard one)"
        ),
        None => tracing::warn!("cannot read the file descriptor limit (RLIMIT_NOFILE)"),
    }
    let limits = admission::Limits {
        global: settings
            .max_unauthenticated
            .unwrap_or_else(|| admission::default_global(admission::finite(nofile))),
        per_address: settings.max_unauthenticated_per_address,
    };
    tracing::info!(
        max_unauthenticated = limits.global,
        max_unauthenticated_per_address = limits.per_address,
        write_deadline_secs = settings.write_deadline.map_or(0, |d| d.as_secs()),
        "connection limits before authentication (0: none)"
    );
    if let Some(n) = admission::finite(nofile) {
        if limits.global == 0 || limits.global as u64 * 2 > n {
            tracing::warn!(
                max_unauthenticated = limits.global,
                nofile = n,
                "--max-unauthenticated allows more than half the file descriptor limit: clients that never authenticate can exhaust it; raise LimitNOFILE or lower the cap"
            );
        }
    }
    Admission::new(limits)
}

/// Counts events and says when one is worth a log line: the first, then at most one per
/// `every`, each with the number of events since the last line.
struct Throttled {
    every: Duration,
    last: Option<Instant>,
    count: u64,
}

impl Throttled {
    fn new(every: Duration) -> Throttled {
        Throttled {
            every,
            last: None,
            count: 0,
        }
    }

    fn due(&mut self) -> Option<u64> {
        self.count += 1;
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < self.every)
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.count))
    }
}

/// What the accept loop uses.
pub struct Connections {
    pub admission: Admission,
    pub metrics: Arc<Metrics>,
    /// `--write-deadline-secs`; `None`: no deadline.
    pub write_deadline: Option<Duration>,
    pub shutdown: CancellationToken,
}

pub async fn accept_loop(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    app: Router,
    gw: Connections,
    tracker: TaskTracker,
) {
    let acceptor = TlsAcceptor::from(tls);
    let mut refusals = Throttled::new(LOG_EVERY);
    let mut accept_errors = Throttled::new(LOG_EVERY);
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    if let Some(n) = accept_errors.due() {
                        tracing::warn!(error = %e, failures = n, "accept failed (logged at most every 10 s)");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = gw.shutdown.cancelled() => break,
        };
        let slot = match gw.admission.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(refusal) => {
                Metrics::inc(match refusal {
                    admission::Refusal::Full => &gw.metrics.refused_unauthenticated,
                    admission::Refusal::PerAddress => &gw.metrics.refused_per_address,
                });
                if let Some(n) = refusals.due() {
                    let limits = gw.admission.limits();
                    tracing::warn!(
                        %peer,
                        reason = refusal.reason(),
                        refused = n,
                        in_use = gw.admission.in_use(),
                        max_unauthenticated = limits.global,
                        max_unauthenticated_per_address = limits.per_address,
                        "too many connections not yet authenticated: closing new ones at once (`refused` since the last such line; logged at most every 10 s)"
                    );
                }
                // Closed before TLS: a descriptor for a moment, no handshake, no buffers.
                drop(tcp);
                continue;
            }
        };
        let pre_auth = PreAuth::new(slot);
        let _ = tcp.set_nodelay(true);
        let on_expire: deadline::OnExpire = {
            let metrics = gw.metrics.clone();
            Box::new(move || {
                Metrics::inc(&metrics.write_timeouts);
                tracing::debug!(%peer, "the client took no data within the write deadline; closing");
            })
        };
        let tcp = deadline::WriteDeadline::new(tcp, gw.write_deadline, Some(on_expire));
        let acceptor = acceptor.clone();
        let app = app.clone();
        let shutdown = gw.shutdown.clone();
        tracker.spawn(async move {
            let tls = match tokio::time::timeout(TLS_HANDSHAKE_DEADLINE, acceptor.accept(tcp)).await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            // The service holds the slot as long as the connection lives; a websocket
            // upgrade takes a clone along to its session, which gives the slot back once
            // the agent is authenticated.
            let service = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(Peer(peer));
                    req.extensions_mut().insert(pre_auth.clone());
                    app.clone().oneshot(req.map(axum::body::Body::new))
                },
            );
            // HTTP/1.1 only (the ALPN we offer): websockets upgrade from it. Without a timer
            // hyper skips its header timeout, and a client that finishes TLS and then says
            // nothing would hold its connection forever.
            let conn = hyper::server::conn::http1::Builder::new()
                .max_buf_size(HTTP_BUFFER)
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_DEADLINE)
                .serve_connection(TokioIo::new(tls), service)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
                    }
                }
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_logged_once_per_period_with_its_count() {
        let mut t = Throttled::new(Duration::from_millis(200));
        assert_eq!(t.due(), Some(1));
        for _ in 0..99 {
            assert_eq!(t.due(), None);
        }
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(t.due(), Some(100), "the 99 held back and this one");
        assert_eq!(t.due(), None);
    }
}
