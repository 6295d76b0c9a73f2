//! A local webhook receiver for the alerting part: plain HTTP/1.1 on a loopback port,
//! keep-alive, answering every `POST` with 200 at once and keeping what came (the path,
//! the body, and the moment its head was read) for the benchmark to match afterwards.
//!
//! It runs on a runtime of its own (one worker thread), so that the simulated agents'
//! traffic on the load generator's runtime does not delay the moment an arrival is
//! stamped. It does not verify signatures (the benchmark's gateways send none) and
//! never answers anything but 200: it measures senders, not their retries.

use outpost_sys::lock;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

/// One request received.
#[derive(Clone)]
pub struct Arrival {
    /// When its head had been read.
    pub at: Instant,
    pub path: String,
    pub body: Bytes,
}

/// The running receiver.
pub struct Hook {
    pub addr: SocketAddr,
    arrivals: Arc<Mutex<Vec<Arrival>>>,
    stop: CancellationToken,
    rt: Option<tokio::runtime::Runtime>,
}

impl Hook {
    /// Listen on a free loopback port.
    pub fn start() -> Result<Hook> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("bench-hook")
            .enable_all()
            .build()
            .context("cannot start the webhook receiver's runtime")?;
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .context("cannot bind the webhook receiver")?;
        let addr = listener.local_addr()?;
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        rt.spawn(serve(listener, arrivals.clone(), stop.clone()));
        Ok(Hook {
            addr,
            arrivals,
            stop,
            rt: Some(rt),
        })
    }

    /// The URL of `path` (which starts with `/`) on this receiver.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Take the requests that came to `path` (oldest first); others are kept.
    pub fn take(&self, path: &str) -> Vec<Arrival> {
        let mut all = lock(&self.arrivals);
        let (mine, rest) = std::mem::take(&mut *all)
            .into_iter()
            .partition(|a| a.path == path);
        *all = rest;
        mine
    }

    /// Show `enough` each request that comes to `path` (from the first, once each) until
    /// it says they are enough, or `limit` passes; returns whether they were. The
    /// requests are looked at outside the lock, so the receiver is never held up.
    pub fn wait_until(
        &self,
        path: &str,
        limit: Duration,
        mut enough: impl FnMut(&Arrival) -> bool,
    ) -> bool {
        let deadline = Instant::now() + limit;
        let mut next = 0;
        loop {
            let new: Vec<Arrival> = {
                let all = lock(&self.arrivals);
                let new = all[next.min(all.len())..]
                    .iter()
                    .filter(|a| a.path == path)
                    .cloned()
                    .collect();
                next = all.len();
                new
            };
            for a in &new {
                if enough(a) {
                    return true;
                }
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Hook {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

async fn serve(
    listener: tokio::net::TcpListener,
    arrivals: Arc<Mutex<Vec<Arrival>>>,
    stop: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(_) => {
                    // Out of descriptors, most likely: try again shortly.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let arrivals = arrivals.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let at = Instant::now();
                let arrivals = arrivals.clone();
                async move {
                    let path = req.uri().path().to_string();
                    let body = req
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    lock(&arrivals).push(Arrival { at, path, body });
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::new())))
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = conn => {}
            }
        });
    }
}
