//! Local alert receivers the tests run and read: a webhook receiver that verifies every
//! request with the `standardwebhooks` package (tests/fixtures/alerting/webhook_receiver.py).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::{spawn_logged, Proc};

/// A webhook receiver on a loopback port, answering as its answers file says.
pub struct WebhookReceiver {
    pub port: u16,
    pub secret: Option<String>,
    /// One JSON line per request received.
    pub out: PathBuf,
    /// What to answer the next requests: one line each (`503`, `429 2`, `400`), then 200.
    pub answers: PathBuf,
    log: PathBuf,
    proc: Option<Proc>,
}

/// A Standard Webhooks secret (`whsec_` + base64 of 32 bytes).
pub const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";

impl WebhookReceiver {
    /// A receiver named `name` under `dir`, on `port`, not started yet.
    pub fn new(dir: &Path, name: &str, port: u16, secret: Option<&str>) -> WebhookReceiver {
        WebhookReceiver {
            port,
            secret: secret.map(str::to_string),
            out: dir.join(format!("{name}.jsonl")),
            answers: dir.join(format!("{name}.answers")),
            log: dir.join(format!("{name}.log")),
            proc: None,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    /// Start it; returns once it listens.
    pub async fn start(&mut self) {
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/alerting/webhook_receiver.py");
        let mut cmd = Command::new("python3");
        cmd.arg(script)
            .arg(self.port.to_string())
            .arg(self.secret.as_deref().unwrap_or("-"))
            .arg(&self.out)
            .arg(&self.answers);
        let proc = spawn_logged(cmd, &self.log);
        proc.wait_for_log(&format!("listening {}", self.port), Duration::from_secs(20))
            .await;
        self.proc = Some(proc);
    }

    /// Stop it (connections are refused until it starts again).
    pub fn stop(&mut self) {
        self.proc = None;
    }

    /// Answer the next requests with these (`"503"`, `"429 2"`, ...), then 200.
    pub fn answer(&self, answers: &[&str]) {
        let text: String = answers.iter().map(|a| format!("{a}\n")).collect();
        std::fs::write(&self.answers, text).unwrap();
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_str(l).expect("the receiver writes JSON lines"))
            .collect()
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
