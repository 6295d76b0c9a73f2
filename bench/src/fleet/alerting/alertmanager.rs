//! Prometheus Alertmanager (Debian's `prometheus-alertmanager`) as the alerting part's
//! baseline: one instance, no cluster, every alert its own group (`group_by: ['...']`)
//! notified at once (`group_wait: 0s`) to a webhook; and the plain HTTP client that feeds
//! it alerts through its v2 API, as Prometheus does.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

use crate::fleet::nats::free_port;
use crate::harness::{spawn_logged, Proc};

/// Where the Alertmanager binary is: `explicit`, else `prometheus-alertmanager` (Debian's
/// name) or `alertmanager` on PATH.
pub fn find(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        if p.is_file() {
            return Ok(p.to_path_buf());
        }
        bail!("Alertmanager {} does not exist", p.display());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in ["prometheus-alertmanager", "alertmanager"] {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    bail!(
        "Alertmanager not found: `apt-get install prometheus-alertmanager` or pass --alertmanager"
    )
}

/// A running Alertmanager.
pub struct Alertmanager {
    pub proc: Proc,
    pub port: u16,
    /// What `--version` says first (e.g. `alertmanager, version 0.25.0 (…)`).
    pub version: String,
}

impl Alertmanager {
    /// Start `bin` under `dir`, notifying every alert on its own, at once, to `webhook`
    /// (no resolves: the part counts firing notifications); returns once it is ready.
    pub fn start(
        rt: &tokio::runtime::Handle,
        bin: &Path,
        dir: &Path,
        webhook: &str,
    ) -> Result<Alertmanager> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let port = free_port()?;
        let config = dir.join("alertmanager.yml");
        std::fs::write(
            &config,
            format!(
                "route:\n  receiver: bench\n  group_by: ['...']\n  group_wait: 0s\n  group_interval: 5m\n  repeat_interval: 4h\n\
                 receivers:\n  - name: bench\n    webhook_configs:\n      - url: {webhook:?}\n        send_resolved: false\n"
            ),
        )?;
        let version = Command::new(bin)
            .arg("--version")
            .output()
            .map(|o| {
                let text = [o.stdout, o.stderr].concat();
                String::from_utf8_lossy(&text)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_string()
            })
            .unwrap_or_default();
        let mut cmd = Command::new(bin);
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--cluster.listen-address=");
        let mut proc = spawn_logged("alertmanager", cmd, &dir.join("alertmanager.log"))?;
        wait_ready(rt, &mut proc, port, "Alertmanager", Duration::from_secs(30))?;
        Ok(Alertmanager {
            proc,
            port,
            version,
        })
    }
}

/// Wait until `proc` (`what`), on 127.0.0.1:`port`, answers 200 to `GET /-/ready` (as
/// Prometheus and Alertmanager do), for at most `limit`.
pub fn wait_ready(
    rt: &tokio::runtime::Handle,
    proc: &mut Proc,
    port: u16,
    what: &str,
    limit: Duration,
) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok((200, _)) = rt.block_on(request(port, "GET", "/-/ready", None)) {
            return Ok(());
        }
        proc.ensure_running()?;
        if Instant::now() >= deadline {
            bail!(
                "{what} was not ready within {} s; its log ends with:\n{}",
                limit.as_secs(),
                proc.log_tail(20)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One plain HTTP/1.1 request to 127.0.0.1:`port`, on a new connection: the status and
/// the body.
pub async fn request(
    port: u16,
    method: &str,
    path: &str,
    json: Option<Vec<u8>>,
) -> Result<(u16, Bytes)> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .with_context(|| format!("cannot connect to 127.0.0.1:{port}"))?;
    let _ = tcp.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .context("HTTP handshake failed")?;
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", format!("127.0.0.1:{port}"));
    if json.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req.body(Full::new(Bytes::from(json.unwrap_or_default())))?;
    let resp = sender
        .send_request(req)
        .await
        .with_context(|| format!("{method} {path} failed"))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| anyhow!("reading the answer to {method} {path}: {e}"))?
        .to_bytes();
    Ok((status, body))
}

/// POST each of `bodies` (a JSON array of alerts each) to `/api/v2/alerts`, one after
/// another on one kept-alive connection, as Prometheus's notifier sends its batches.
pub async fn post_alerts(port: u16, bodies: Vec<Vec<u8>>) -> Result<()> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .with_context(|| format!("cannot connect to Alertmanager at 127.0.0.1:{port}"))?;
    let _ = tcp.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .context("HTTP handshake with Alertmanager failed")?;
    tokio::spawn(conn);
    for body in bodies {
        let req = hyper::Request::builder()
            .method("POST")
            .uri("/api/v2/alerts")
            .header("host", format!("127.0.0.1:{port}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))?;
        sender
            .ready()
            .await
            .context("the connection to Alertmanager closed")?;
        let resp = sender
            .send_request(req)
            .await
            .context("POST /api/v2/alerts failed")?;
        let status = resp.status().as_u16();
        let answer = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| anyhow!("reading Alertmanager's answer: {e}"))?
            .to_bytes();
        if status != 200 {
            bail!(
                "POST /api/v2/alerts answered {status}: {}",
                String::from_utf8_lossy(&answer)
            );
        }
    }
    Ok(())
}
