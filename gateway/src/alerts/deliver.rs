//! Sending one queued notification to its receiver, in the receiver's own wire format, and
//! judging the answer ([`super::retry::judge`]): the queue decides what happens next.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde_json::json;

use super::config::{Receiver, ReceiverKind};
use super::retry::{judge, Answer, Outcome};
use super::store::Queued;
use super::{webhook, Kind};
use outpost_protocol::Status;

/// The HTTP client every receiver shares.
pub struct Sender {
    client: reqwest::Client,
}

impl Sender {
    /// A client that trusts the system's roots (receivers are public services), does not
    /// follow redirects (a receiver that moved says so with an error, once) and speaks
    /// HTTP/1.1.
    pub fn new() -> anyhow::Result<Sender> {
        let mut roots = rustls::RootCertStore::empty();
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::warn!(error = %e, "a system CA certificate could not be loaded");
        }
        let (added, _) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            tracing::warn!("no system CA certificates: https receivers will fail to verify");
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .context("TLS setup")?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("outpost-gateway/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .context("cannot make the receivers' HTTP client")?;
        Ok(Sender { client })
    }

    /// One attempt (number `attempt`, from 1) to deliver `q` of `tenant` to `receiver`.
    pub async fn send(
        &self,
        tenant: &str,
        receiver: &Receiver,
        q: &Queued,
        attempt: u32,
    ) -> Outcome {
        let request = match &receiver.kind {
            ReceiverKind::Webhook { url, secret } => {
                let body = webhook_body(tenant, q);
                let mut req = self
                    .client
                    .post(url)
                    .header("content-type", "application/json");
                if let Some(secret) = secret {
                    let now = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_secs();
                    for (name, value) in webhook::headers(secret, &q.notification.id, now, &body) {
                        req = req.header(name, value);
                    }
                } else {
                    req = req.header("webhook-id", &q.notification.id);
                }
                req.body(body)
            }
        };
        let answer = request.timeout(receiver.timeout).send().await;
        match answer {
            Ok(resp) => {
                let code = resp.status().as_u16();
                let retry_after = resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                judge(
                    Answer::Status {
                        code,
                        retry_after: retry_after.as_deref(),
                    },
                    attempt,
                    SystemTime::now(),
                )
            }
            Err(e) => {
                // The error's chain names the cause (refused, timed out, certificate).
                let mut why = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    why = format!("{why}: {s}");
                    source = s.source();
                }
                judge(Answer::Failed(&why), attempt, SystemTime::now())
            }
        }
    }
}

/// A status as receivers read it.
pub fn status_name(s: Status) -> &'static str {
    match s {
        Status::Ok => "ok",
        Status::Warning => "warning",
        Status::Critical => "critical",
        Status::Unknown => "unknown",
    }
}

/// Milliseconds since the epoch as RFC 3339 (UTC, milliseconds).
pub fn rfc3339(ms: u64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms as i64)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The generic webhook's body: a Standard Webhooks payload (`type`, `timestamp`, `data`).
pub fn webhook_body(tenant: &str, q: &Queued) -> Vec<u8> {
    let n = &q.notification;
    let kind = match n.kind {
        Kind::Firing => "alert.firing",
        Kind::Resolved => "alert.resolved",
        Kind::Undeliverable => "alert.undeliverable",
    };
    let body = json!({
        "type": kind,
        "timestamp": rfc3339(n.at_ms),
        "data": {
            "id": n.id,
            "tenant": tenant,
            "agent": {
                "fingerprint": n.fingerprint,
                "hostname": q.hostname,
                "labels": q.labels,
            },
            "check": n.check,
            "status": status_name(n.status),
            "since": rfc3339(n.since_ms),
            "output": n.output,
        }
    });
    serde_json::to_vec(&body).expect("a JSON value serializes")
}
