//! Local alert receivers the tests run and read (tests/fixtures/alerting): a webhook
//! receiver that verifies every request with the `standardwebhooks` package, stand-ins for
//! Slack and PagerDuty that check every documented field, a real SMTP server (aiosmtpd)
//! and a real Prometheus Alertmanager (Debian's).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::{spawn_logged, Proc};

/// A Standard Webhooks secret (`whsec_` + base64 of 32 bytes).
pub const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
/// A PagerDuty integration key (32 characters).
pub const ROUTING_KEY: &str = "R0UT1NGKEY0123456789abcdefABCDEF";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/alerting")
        .join(name)
}

/// An HTTP receiver on a loopback port (`webhook`, `slack` or `pagerduty`), answering as
/// its answers file says.
pub struct WebhookReceiver {
    pub kind: &'static str,
    pub port: u16,
    pub secret: Option<String>,
    /// One JSON line per request received.
    pub out: PathBuf,
    /// What to answer the next requests: one line each (`503`, `429 2`, `400`), then
    /// what the receiver it stands for would.
    pub answers: PathBuf,
    /// How long it waits before answering each request, in seconds (see [`Self::slow`]).
    delay: PathBuf,
    log: PathBuf,
    proc: Option<Proc>,
}

impl WebhookReceiver {
    /// A generic webhook receiver named `name` under `dir`, on `port`, not started yet.
    pub fn new(dir: &Path, name: &str, port: u16, secret: Option<&str>) -> WebhookReceiver {
        Self::of_kind("webhook", dir, name, port, secret)
    }

    /// A receiver of `kind` (`webhook`, `slack`, `pagerduty`), not started yet.
    pub fn of_kind(
        kind: &'static str,
        dir: &Path,
        name: &str,
        port: u16,
        secret: Option<&str>,
    ) -> WebhookReceiver {
        WebhookReceiver {
            kind,
            port,
            secret: secret.map(str::to_string),
            out: dir.join(format!("{name}.jsonl")),
            answers: dir.join(format!("{name}.answers")),
            delay: dir.join(format!("{name}.delay")),
            log: dir.join(format!("{name}.log")),
            proc: None,
        }
    }

    pub fn url(&self) -> String {
        match self.kind {
            "pagerduty" => format!("http://127.0.0.1:{}/v2/enqueue", self.port),
            "slack" => format!("http://127.0.0.1:{}/services/T000/B000/XXXX", self.port),
            _ => format!("http://127.0.0.1:{}/hook", self.port),
        }
    }

    /// Start it; returns once it listens.
    pub async fn start(&mut self) {
        let mut cmd = Command::new("python3");
        cmd.arg(fixture("receiver.py"))
            .arg(self.kind)
            .arg(self.port.to_string())
            .arg(self.secret.as_deref().unwrap_or("-"))
            .arg(&self.out)
            .arg(&self.answers)
            .arg(&self.delay);
        let proc = spawn_logged(cmd, &self.log);
        proc.wait_for_log(&format!("listening {}", self.port), Duration::from_secs(20))
            .await;
        self.proc = Some(proc);
    }

    /// Stop it (connections are refused until it starts again).
    pub fn stop(&mut self) {
        self.proc = None;
    }

    /// Answer the next requests with these (`"503"`, `"429 2"`, ...), then normally.
    pub fn answer(&self, answers: &[&str]) {
        let text: String = answers.iter().map(|a| format!("{a}\n")).collect();
        std::fs::write(&self.answers, text).unwrap();
    }

    /// Wait `each` before answering every request from now on (a receiver slow to answer,
    /// so that a sender dying mid-delivery is likely to die with a request in flight);
    /// `Duration::ZERO` answers at once again. The request is recorded before the wait.
    pub fn slow(&self, each: Duration) {
        std::fs::write(&self.delay, format!("{}\n", each.as_secs_f64())).unwrap();
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<Value> {
        read_lines(&self.out)
    }

    /// The requests it answered with 2xx.
    pub fn taken(&self) -> Vec<Value> {
        self.requests()
            .into_iter()
            .filter(|r| {
                r["answered"]
                    .as_u64()
                    .is_some_and(|c| (200..300).contains(&c))
            })
            .collect()
    }
}

/// A webhook receiver named `hook` under `dir`, verifying signatures with [`SECRET`],
/// listening.
pub async fn signed_hook(dir: &Path) -> WebhookReceiver {
    let mut hook = WebhookReceiver::new(dir, "hook", crate::free_ports(1)[0], Some(SECRET));
    hook.start().await;
    hook
}

fn read_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).expect("the receiver writes JSON lines"))
        .collect()
}

/// aiosmtpd requiring STARTTLS (with `cert`/`key`) and AUTH as `user`/`password`.
pub struct SmtpServer {
    pub port: u16,
    pub mailbox: PathBuf,
    _proc: Proc,
}

impl SmtpServer {
    pub async fn start(
        dir: &Path,
        port: u16,
        cert: &Path,
        key: &Path,
        user: &str,
        password: &str,
    ) -> SmtpServer {
        let mailbox = dir.join("mailbox.jsonl");
        let mut cmd = Command::new("python3");
        cmd.arg(fixture("smtp_server.py"))
            .arg(port.to_string())
            .arg(cert)
            .arg(key)
            .arg(&mailbox)
            .args([user, password]);
        let proc = spawn_logged(cmd, &dir.join("smtp.log"));
        proc.wait_for_log(&format!("listening {port}"), Duration::from_secs(20))
            .await;
        SmtpServer {
            port,
            mailbox,
            _proc: proc,
        }
    }

    /// Every message accepted so far.
    pub fn messages(&self) -> Vec<Value> {
        read_lines(&self.mailbox)
    }
}

/// Prometheus Alertmanager (Debian's `prometheus-alertmanager`), alone (no cluster), routing
/// everything to a receiver that sends nowhere: the test reads its API.
pub struct Alertmanager {
    pub port: u16,
    _proc: Proc,
}

impl Alertmanager {
    pub async fn start(dir: &Path, port: u16) -> Alertmanager {
        let dir = dir.join("alertmanager");
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("alertmanager.yml");
        std::fs::write(
            &config,
            "route:\n  receiver: nowhere\n  group_wait: 0s\nreceivers:\n  - name: nowhere\n",
        )
        .unwrap();
        let mut cmd = Command::new("prometheus-alertmanager");
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--cluster.listen-address=");
        let proc = spawn_logged(cmd, &dir.join("alertmanager.log"));
        let am = Alertmanager { port, _proc: proc };
        crate::eventually(Duration::from_secs(30), "Alertmanager ready", || async {
            am.get("/-/ready").await.map(|_| ())
        })
        .await;
        am
    }

    /// `GET path` of its API, as JSON (or text), when it answers 200.
    pub async fn get(&self, path: &str) -> Option<Value> {
        let out = tokio::process::Command::new("curl")
            .args(["-sf", &format!("http://127.0.0.1:{}{path}", self.port)])
            .output()
            .await
            .ok()?;
        if !out.status.success() {
            return None;
        }
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        Some(serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// Every alert it holds (`GET /api/v2/alerts`: active, silenced and inhibited ones).
    pub async fn alerts(&self) -> Vec<Value> {
        self.get("/api/v2/alerts")
            .await
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}
