//! Sending one queued notification to its receiver, in the receiver's own wire format, and
//! judging the answer ([`super::retry::judge`]): the queue decides what happens next.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde_json::json;

use std::collections::BTreeMap;

use super::config::{Email, Receiver, ReceiverKind, SmtpTls};
use super::retry::{judge, Answer, Outcome};
use super::store::Queued;
use super::{webhook, Kind};
use outpost_protocol::Status;

/// The HTTP client of everything the gateway sends out (notifications, metric exports):
/// it trusts the system's roots (receivers are public services), does not follow
/// redirects (a receiver that moved says so with an error, once) and speaks HTTP/1.1.
pub fn http_client() -> anyhow::Result<reqwest::Client> {
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
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("outpost-gateway/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(10))
        .build()
        .context("cannot make the receivers' HTTP client")
}

/// The HTTP client every receiver shares.
pub struct Sender {
    client: reqwest::Client,
}

impl Sender {
    /// A sender with [`http_client`].
    pub fn new() -> anyhow::Result<Sender> {
        Ok(Sender {
            client: http_client()?,
        })
    }

    /// One attempt (number `attempt`, from 1) to deliver `q` of `tenant` to `receiver`.
    pub async fn send(
        &self,
        tenant: &str,
        receiver: &Receiver,
        q: &Queued,
        attempt: u32,
    ) -> Outcome {
        let post = |url: &str, body: Vec<u8>| {
            self.client
                .post(url)
                .header("content-type", "application/json")
                .body(body)
        };
        let cap = receiver.retry_max;
        // A secret kept in a file that cannot be read (or is wrong) is the gateway's
        // problem, not the receiver's: tried again until it is fixed.
        let unreadable = |why: String| judge(Answer::Failed(&why), attempt, SystemTime::now(), cap);
        let request = match &receiver.kind {
            ReceiverKind::Webhook { url, secret } => {
                let body = webhook_body(tenant, q);
                match self.webhook(url, secret.as_ref(), &q.notification.id, body) {
                    Ok(req) => req,
                    Err(why) => return unreadable(why),
                }
            }
            ReceiverKind::Slack { url } => post(url, slack_body(tenant, q)),
            ReceiverKind::PagerDuty { url, routing_key } => {
                let key = match routing_key.read().and_then(|k| {
                    super::config::routing_key(&k)?;
                    Ok(k)
                }) {
                    Ok(k) => k,
                    Err(e) => return unreadable(format!("pagerduty routing_key: {e}")),
                };
                post(url, pagerduty_body(tenant, q, &key))
            }
            ReceiverKind::Alertmanager { url } => post(
                &format!("{url}/api/v2/alerts"),
                alertmanager_body(tenant, &[q], crate::util::now_ms()),
            ),
            ReceiverKind::Email(email) => {
                let message = match email_message(email, tenant, q) {
                    Ok(m) => m,
                    Err(why) => return Outcome::Refused { why },
                };
                return send_email(email, receiver, message, &q.notification.id, attempt).await;
            }
        };
        self.attempt(request, receiver, attempt).await
    }

    /// A generic webhook's request for notification (or group) `id`: signed per Standard
    /// Webhooks with `secret` when there is one (`Err`: the secret cannot be read).
    fn webhook(
        &self,
        url: &str,
        secret: Option<&super::config::Secretive>,
        id: &str,
        body: Vec<u8>,
    ) -> Result<reqwest::RequestBuilder, String> {
        let mut req = self
            .client
            .post(url)
            .header("content-type", "application/json");
        match secret {
            Some(secret) => {
                let secret = secret
                    .read()
                    .and_then(|s| s.parse::<webhook::Secret>())
                    .map_err(|e| format!("webhook secret: {e}"))?;
                for (name, value) in webhook::headers(&secret, id, unix_now(), &body) {
                    req = req.header(name, value);
                }
            }
            None => req = req.header("webhook-id", id),
        }
        Ok(req.body(body))
    }

    /// Send `request` to `receiver` and judge the answer.
    async fn attempt(
        &self,
        request: reqwest::RequestBuilder,
        receiver: &Receiver,
        attempt: u32,
    ) -> Outcome {
        let cap = receiver.retry_max;
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
                    cap,
                )
            }
            Err(e) => judge(
                Answer::Failed(&chain(&e.without_url())),
                attempt,
                SystemTime::now(),
                cap,
            ),
        }
    }
}

impl Sender {
    /// One attempt to deliver a group's notifications (`members`, oldest first) to
    /// `receiver` in one request. Its id ([`group_id`]) is made from the members' ids: the
    /// same on a retry unless more joined meanwhile. A PagerDuty receiver is never sent a
    /// group (it groups by itself): the caller sends those one by one.
    pub async fn send_group(
        &self,
        tenant: &str,
        receiver: &Receiver,
        members: &[Queued],
        attempt: u32,
    ) -> Outcome {
        let post = |url: &str, body: Vec<u8>| {
            self.client
                .post(url)
                .header("content-type", "application/json")
                .body(body)
        };
        let cap = receiver.retry_max;
        let unreadable = |why: String| judge(Answer::Failed(&why), attempt, SystemTime::now(), cap);
        let id = group_id(members);
        let request = match &receiver.kind {
            ReceiverKind::Webhook { url, secret } => {
                let body = group_webhook_body(tenant, &id, members);
                match self.webhook(url, secret.as_ref(), &id, body) {
                    Ok(req) => req,
                    Err(why) => return unreadable(why),
                }
            }
            ReceiverKind::Slack { url } => post(url, group_slack_body(tenant, members)),
            ReceiverKind::Alertmanager { url } => {
                let all: Vec<&Queued> = members.iter().collect();
                post(
                    &format!("{url}/api/v2/alerts"),
                    alertmanager_body(tenant, &all, crate::util::now_ms()),
                )
            }
            ReceiverKind::Email(email) => {
                let message = match group_email_message(email, tenant, &id, members) {
                    Ok(m) => m,
                    Err(why) => return Outcome::Refused { why },
                };
                return send_email(email, receiver, message, &id, attempt).await;
            }
            ReceiverKind::PagerDuty { .. } => match members {
                [one] => return self.send(tenant, receiver, one, attempt).await,
                _ => {
                    return Outcome::Refused {
                        why: "a PagerDuty receiver is not sent groups".into(),
                    }
                }
            },
        };
        self.attempt(request, receiver, attempt).await
    }

    /// Send Alertmanager `receiver` every alert still firing that it was told of (it
    /// forgets a firing alert not sent again within [`ALERTMANAGER_HOLD`]).
    pub async fn refresh_alertmanager(
        &self,
        tenant: &str,
        receiver: &Receiver,
        firing: &[Queued],
    ) -> Result<(), String> {
        let ReceiverKind::Alertmanager { url } = &receiver.kind else {
            return Ok(());
        };
        let all: Vec<&Queued> = firing.iter().collect();
        let body = alertmanager_body(tenant, &all, crate::util::now_ms());
        let resp = self
            .client
            .post(format!("{url}/api/v2/alerts"))
            .header("content-type", "application/json")
            .body(body)
            .timeout(receiver.timeout)
            .send()
            .await
            .map_err(|e| chain(&e.without_url()))?;
        match resp.status().as_u16() {
            200..=299 => Ok(()),
            code => Err(format!("answered {code}")),
        }
    }
}

/// An error with its causes (refused, timed out, certificate …).
fn chain(e: &dyn std::error::Error) -> String {
    let mut why = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        why = format!("{why}: {s}");
        source = s.source();
    }
    why
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// How long an alert sent to Alertmanager stays firing there unless sent again (the
/// evaluator sends firing alerts again well within it, as Prometheus does).
pub const ALERTMANAGER_HOLD: Duration = Duration::from_secs(10 * 60);

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

/// What a notification is about, in a line: `CRITICAL: disk on db-1`.
fn headline(q: &Queued) -> String {
    let n = &q.notification;
    let on = source(q);
    match n.kind {
        Kind::Firing => format!(
            "{}: {} on {on}",
            status_name(n.status).to_uppercase(),
            n.check
        ),
        Kind::Resolved => format!(
            "RESOLVED: {} on {on} (was {})",
            n.check,
            status_name(n.status)
        ),
        Kind::Undeliverable => format!("UNDELIVERABLE: a notification about {} on {on}", n.check),
        Kind::Flapping => format!("FLAPPING: {} on {on}", n.check),
        Kind::Settled => format!("SETTLED: {} on {on} ({})", n.check, status_name(n.status)),
        Kind::Watchdog => "WATCHDOG: Outpost alerting works".to_string(),
    }
}

/// What a notification is about: the agent's hostname, its fingerprint, or (for the
/// gateway's own alerts, such as a forgotten silence) `outpost`.
fn source(q: &Queued) -> &str {
    if !q.hostname.is_empty() {
        &q.hostname
    } else if !q.notification.fingerprint.is_empty() {
        &q.notification.fingerprint
    } else {
        "outpost"
    }
}

/// The incident a notification belongs to (`<fingerprint>/<check>/<incident>`): what
/// PagerDuty dedupes on, so a firing and its resolve are one incident there. A notice of
/// a refusal is its own.
pub fn incident_key(n: &super::Notification) -> &str {
    match n.kind {
        Kind::Firing | Kind::Resolved | Kind::Flapping | Kind::Settled => {
            n.id.rsplit_once('/').map_or(&n.id, |(k, _)| k)
        }
        Kind::Undeliverable | Kind::Watchdog => &n.id,
    }
}

/// `s` cut to at most `max` bytes, on a character boundary, marked when cut.
fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max.saturating_sub(3);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// `s` escaped for Slack, cut (never inside an entity) so it takes at most `max` bytes.
fn slack_escape_cut(s: &str, max: usize) -> String {
    let mut out = String::new();
    for (i, c) in s.char_indices() {
        let piece = match c {
            '&' => "&amp;",
            '<' => "&lt;",
            '>' => "&gt;",
            _ => &s[i..i + c.len_utf8()],
        };
        if out.len() + piece.len() > max.saturating_sub(3) {
            out.push_str("...");
            return out;
        }
        out.push_str(piece);
    }
    out
}

/// The most a Slack text object holds.
const SLACK_TEXT_MAX: usize = 3000;

/// A Slack incoming webhook message: `text` (the notification's line, shown in
/// notifications and where blocks are not) and `blocks` (a section with the output, a
/// context line with the tenant, agent, since and id).
pub fn slack_body(tenant: &str, q: &Queued) -> Vec<u8> {
    let n = &q.notification;
    let headline = headline(q);
    let emoji = match (n.kind, n.status) {
        (Kind::Resolved, _) => ":large_green_circle:",
        (Kind::Undeliverable | Kind::Flapping, _) => ":warning:",
        (Kind::Settled, _) => ":large_blue_circle:",
        (Kind::Watchdog, _) => ":heartbeat:",
        (_, Status::Critical) => ":red_circle:",
        (_, Status::Warning) => ":large_yellow_circle:",
        _ => ":white_circle:",
    };
    // The headline and the output share the section's 3000 characters.
    let headline = slack_escape_cut(&headline, 1000);
    let frame = format!("{emoji} *{headline}*\n``````");
    let output = slack_escape_cut(&n.output, SLACK_TEXT_MAX - frame.len());
    let section = format!("{emoji} *{headline}*\n```{output}```");
    let context = slack_escape_cut(
        &format!(
            "tenant {tenant} · agent {} · since {} · id {}",
            source(q),
            rfc3339(n.since_ms),
            n.id
        ),
        SLACK_TEXT_MAX,
    );
    let body = json!({
        "text": format!("{emoji} {headline}"),
        "blocks": [
            { "type": "section", "text": { "type": "mrkdwn", "text": section } },
            { "type": "context", "elements": [ { "type": "mrkdwn", "text": context } ] },
        ],
    });
    serde_json::to_vec(&body).expect("a JSON value serializes")
}

/// A PagerDuty Events API v2 event: `trigger` for a firing notification (again with the
/// same `dedup_key` for a change or a repeat: PagerDuty keeps one incident), `resolve` for
/// its resolve.
pub fn pagerduty_body(tenant: &str, q: &Queued, routing_key: &str) -> Vec<u8> {
    let n = &q.notification;
    let dedup_key = incident_key(n);
    let body = if matches!(n.kind, Kind::Resolved | Kind::Settled) {
        json!({
            "routing_key": routing_key,
            "event_action": "resolve",
            "dedup_key": dedup_key,
        })
    } else {
        let severity = match (n.kind, n.status) {
            (Kind::Undeliverable, _) => "error",
            (Kind::Flapping, _) => "warning",
            (_, Status::Critical) => "critical",
            (_, Status::Warning) => "warning",
            _ => "error",
        };
        let source = source(q).to_string();
        json!({
            "routing_key": routing_key,
            "event_action": "trigger",
            "dedup_key": dedup_key,
            "payload": {
                "summary": cut(&format!("{}: {}", headline(q), n.output), 1024),
                "source": source,
                "severity": severity,
                "timestamp": rfc3339(n.at_ms),
                "component": n.check,
                "group": tenant,
                "class": "outpost check",
                "custom_details": {
                    "output": n.output,
                    "fingerprint": n.fingerprint,
                    "labels": q.labels,
                    "since": rfc3339(n.since_ms),
                    "notification": n.id,
                },
            },
            "client": "Outpost",
        })
    };
    serde_json::to_vec(&body).expect("a JSON value serializes")
}

/// A label name as Prometheus allows it (`[a-zA-Z_][a-zA-Z0-9_]*`).
pub(crate) fn label_name(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

/// The labels an alert has in Alertmanager: the agent's own labels, then Outpost's
/// (which win): `alertname` (the check), `tenant`, `fingerprint`, `instance` (the
/// hostname) and `severity`. The same for every notification of one (agent, check), so
/// Alertmanager sees one alert.
pub fn alertmanager_labels(tenant: &str, q: &Queued) -> BTreeMap<String, String> {
    let n = &q.notification;
    let mut labels: BTreeMap<String, String> = q
        .labels
        .iter()
        .map(|(k, v)| (label_name(k), v.clone()))
        .collect();
    labels.insert("alertname".into(), n.check.clone());
    labels.insert("tenant".into(), tenant.to_string());
    labels.insert("fingerprint".into(), n.fingerprint.clone());
    if !q.hostname.is_empty() {
        labels.insert("instance".into(), q.hostname.clone());
    }
    if matches!(n.kind, Kind::Flapping | Kind::Settled) {
        labels.insert("alertname".into(), "OutpostFlapping".into());
        labels.insert("check".into(), n.check.clone());
        labels.insert("severity".into(), "warning".into());
    }
    if n.kind == Kind::Watchdog {
        // Alertmanager's convention for a dead man's switch: an alert always firing.
        labels.insert("alertname".into(), "Watchdog".into());
        labels.insert("severity".into(), "none".into());
        labels.remove("fingerprint");
    }
    if n.kind == Kind::Undeliverable {
        labels.insert("alertname".into(), "OutpostUndeliverable".into());
        labels.insert("check".into(), n.check.clone());
        labels.insert("severity".into(), "warning".into());
    }
    labels
}

/// Alerts for Alertmanager's `POST /api/v2/alerts`, at `now_ms`: each firing one until
/// [`ALERTMANAGER_HOLD`] from now, a resolved one ending at the resolve's time.
pub fn alertmanager_body(tenant: &str, alerts: &[&Queued], now_ms: u64) -> Vec<u8> {
    let list: Vec<serde_json::Value> = alerts
        .iter()
        .map(|q| {
            let n = &q.notification;
            let ends = match n.kind {
                Kind::Resolved | Kind::Settled => n.at_ms.min(now_ms),
                _ => now_ms + ALERTMANAGER_HOLD.as_millis() as u64,
            };
            json!({
                "labels": alertmanager_labels(tenant, q),
                "annotations": {
                    "summary": headline(q),
                    "description": n.output,
                    "status": status_name(n.status),
                    "outpost_id": n.id,
                },
                "startsAt": rfc3339(n.since_ms),
                "endsAt": rfc3339(ends),
            })
        })
        .collect();
    serde_json::to_vec(&list).expect("a JSON value serializes")
}

/// Send `q` as an email. An SMTP answer of 4xx (transient) or no answer is tried again;
/// 5xx (permanent) is a refusal.
async fn send_email(
    email: &Email,
    receiver: &Receiver,
    message: lettre::Message,
    id: &str,
    attempt: u32,
) -> Outcome {
    let (timeout, cap) = (receiver.timeout, receiver.retry_max);
    let retry = |why: &str| judge(Answer::Failed(why), attempt, SystemTime::now(), cap);
    use lettre::transport::smtp::authentication::Credentials;
    use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
    use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};

    let (host, ca_file) = (email.host.clone(), email.ca_file.clone());
    let tls = move || -> Result<TlsParameters, String> {
        let mut b = TlsParameters::builder(host);
        if let Some(file) = &ca_file {
            let pem = std::fs::read(file)
                .map_err(|e| format!("ca_file: cannot read {}: {e}", file.display()))?;
            let cert = Certificate::from_pem(&pem)
                .map_err(|e| format!("ca_file {}: {e}", file.display()))?;
            b = b.add_root_certificate(cert);
        }
        b.build_rustls()
            .map_err(|e| format!("TLS setup: {}", chain(&e)))
    };
    let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&email.host)
        .port(email.port)
        .timeout(Some(timeout));
    builder = match email.tls {
        SmtpTls::None => builder,
        // Reading the system's and the CA files is blocking work: off the runtime.
        SmtpTls::StartTls | SmtpTls::Implicit => match tokio::task::spawn_blocking(tls)
            .await
            .unwrap_or_else(|e| Err(format!("TLS setup failed: {e}")))
        {
            Ok(p) if email.tls == SmtpTls::Implicit => builder.tls(Tls::Wrapper(p)),
            Ok(p) => builder.tls(Tls::Required(p)),
            Err(why) => return retry(&why),
        },
    };
    if let Some((user, password)) = &email.auth {
        let password = match password.read() {
            Ok(p) => p,
            Err(e) => return retry(&format!("email password: {e}")),
        };
        builder = builder.credentials(Credentials::new(user.clone(), password));
    }
    let transport = builder.build();
    let sent = tokio::time::timeout(timeout * 3, transport.send(message)).await;
    match sent {
        Ok(Ok(_)) => Outcome::Delivered,
        Ok(Err(e)) if e.is_permanent() => Outcome::Refused {
            why: format!("the SMTP server refused {id}: {}", chain(&e)),
        },
        Ok(Err(e)) => retry(&chain(&e)),
        Err(_) => retry("the SMTP exchange did not finish in time"),
    }
}

/// The email for `q`: the headline as its subject, the details as plain text; its
/// Message-ID is made from the notification's id, the same on every retry.
pub fn email_message(email: &Email, tenant: &str, q: &Queued) -> Result<lettre::Message, String> {
    let n = &q.notification;
    let mut b = lettre::Message::builder()
        .from(email.from.parse().map_err(|e| format!("from: {e}"))?)
        .subject(format!("[Outpost] {}", headline(q)))
        .message_id(Some(format!("<{}@outpost>", message_id_part(&n.id))));
    for to in &email.to {
        b = b.to(to.parse().map_err(|e| format!("to {to}: {e}"))?);
    }
    let labels: Vec<String> = q.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let body = format!(
        "{}\n\n{}\n\ntenant:      {tenant}\nagent:       {} ({})\nlabels:      {}\ncheck:       {}\nstatus:      {}\nsince:       {}\nnotified:    {}\nid:          {}\n",
        headline(q),
        n.output,
        q.hostname,
        n.fingerprint,
        labels.join(", "),
        n.check,
        status_name(n.status),
        rfc3339(n.since_ms),
        rfc3339(n.at_ms),
        n.id,
    );
    b.header(lettre::message::header::ContentType::TEXT_PLAIN)
        .body(body)
        .map_err(|e| format!("cannot make the email: {e}"))
}

/// A group's id: `group/` and a digest of its members' ids.
pub fn group_id(members: &[Queued]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for q in members {
        h.update(q.notification.id.as_bytes());
        h.update(b"\n");
    }
    format!("group/{}", &hex::encode(h.finalize())[..32])
}

/// The email for a group: `N alerts` and the first one's headline as its subject, each
/// member's details in the body.
pub fn group_email_message(
    email: &Email,
    tenant: &str,
    id: &str,
    members: &[Queued],
) -> Result<lettre::Message, String> {
    let first = members.first().ok_or("an empty group")?;
    let mut b = lettre::Message::builder()
        .from(email.from.parse().map_err(|e| format!("from: {e}"))?)
        .subject(format!(
            "[Outpost] {} notification{}: {}{}",
            members.len(),
            if members.len() == 1 { "" } else { "s" },
            headline(first),
            if members.len() > 1 { " …" } else { "" }
        ))
        .message_id(Some(format!("<{}@outpost>", message_id_part(id))));
    for to in &email.to {
        b = b.to(to.parse().map_err(|e| format!("to {to}: {e}"))?);
    }
    let mut body = format!(
        "{} notifications for tenant {tenant} ({id}):\n",
        members.len()
    );
    for q in members {
        let n = &q.notification;
        body.push_str(&format!(
            "\n{}\n  {}\n  agent {} ({}) · since {} · id {}\n",
            headline(q),
            n.output,
            q.hostname,
            n.fingerprint,
            rfc3339(n.since_ms),
            n.id
        ));
    }
    b.header(lettre::message::header::ContentType::TEXT_PLAIN)
        .body(body)
        .map_err(|e| format!("cannot make the email: {e}"))
}

/// `id` with anything a Message-ID may not hold made a `-`.
fn message_id_part(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_./+=".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// The generic webhook's body: a Standard Webhooks payload (`type`, `timestamp`, `data`).
pub fn webhook_body(tenant: &str, q: &Queued) -> Vec<u8> {
    let body = json!({
        "type": webhook_type(q),
        "timestamp": rfc3339(q.notification.at_ms),
        "data": webhook_data(tenant, q),
    });
    serde_json::to_vec(&body).expect("a JSON value serializes")
}

/// A group's webhook body: `alert.group`, its `data.alerts` each as one notification's
/// `data` with its `type`.
pub fn group_webhook_body(tenant: &str, id: &str, members: &[Queued]) -> Vec<u8> {
    let at = members
        .iter()
        .map(|q| q.notification.at_ms)
        .max()
        .unwrap_or_default();
    let alerts: Vec<serde_json::Value> = members
        .iter()
        .map(|q| {
            let mut data = webhook_data(tenant, q);
            data["type"] = json!(webhook_type(q));
            data
        })
        .collect();
    let body = json!({
        "type": "alert.group",
        "timestamp": rfc3339(at),
        "data": {
            "id": id,
            "tenant": tenant,
            "group": members.first().and_then(|q| q.group.clone()),
            "alerts": alerts,
        }
    });
    serde_json::to_vec(&body).expect("a JSON value serializes")
}

/// A group's Slack message: a section per notification, as many as Slack takes in one
/// message (45 blocks, and about 12,000 characters in all: longer messages are refused
/// as `msg_blocks_too_long`), the rest counted.
pub fn group_slack_body(tenant: &str, members: &[Queued]) -> Vec<u8> {
    const SHOWN: usize = 45;
    const TOTAL: usize = 11_000;
    let text = format!("{} notifications for tenant {tenant}", members.len());
    let mut blocks = vec![
        json!({ "type": "header", "text": { "type": "plain_text", "text": cut(&text, 150) } }),
    ];
    let mut total = 0;
    let mut shown = 0;
    for q in members.iter().take(SHOWN) {
        let line = format!(
            "*{}*\n{}",
            slack_escape_cut(&headline(q), 500),
            slack_escape_cut(&q.notification.output, 1000)
        );
        total += line.chars().count();
        if total > TOTAL {
            break;
        }
        blocks.push(json!({ "type": "section", "text": { "type": "mrkdwn", "text": line } }));
        shown += 1;
    }
    if members.len() > shown {
        let more = format!("and {} more", members.len() - shown);
        blocks
            .push(json!({ "type": "context", "elements": [ { "type": "mrkdwn", "text": more } ] }));
    }
    serde_json::to_vec(&json!({ "text": slack_escape_cut(&text, 500), "blocks": blocks }))
        .expect("a JSON value serializes")
}

fn webhook_type(q: &Queued) -> &'static str {
    match q.notification.kind {
        Kind::Firing => "alert.firing",
        Kind::Resolved => "alert.resolved",
        Kind::Undeliverable => "alert.undeliverable",
        Kind::Flapping => "alert.flapping",
        Kind::Settled => "alert.settled",
        Kind::Watchdog => "alert.watchdog",
    }
}

/// What a webhook's `data` says of one notification.
fn webhook_data(tenant: &str, q: &Queued) -> serde_json::Value {
    let n = &q.notification;
    json!({
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
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::{Kind, Notification};

    fn queued(output: &str, hostname: &str) -> Queued {
        Queued {
            seq: 0,
            receiver: "r".into(),
            notification: Notification {
                id: "fp/disk/1/0".into(),
                fingerprint: String::new(),
                check: "disk".into(),
                kind: Kind::Firing,
                status: Status::Critical,
                since_ms: 0,
                at_ms: 0,
                output: output.into(),
                receivers: vec!["r".into()],
            },
            hostname: hostname.into(),
            labels: BTreeMap::new(),
            group: None,
            group_wait_ms: 0,
            queued_ms: 0,
        }
    }

    #[test]
    fn slack_text_is_escaped_and_within_its_limits_whatever_the_output() {
        let long = "a<b>&c ".repeat(2000) + "é";
        let body: serde_json::Value =
            serde_json::from_slice(&slack_body("t", &queued(&long, &"h&".repeat(300)))).unwrap();
        let section = body["blocks"][0]["text"]["text"].as_str().unwrap();
        assert!(section.len() <= SLACK_TEXT_MAX, "{}", section.len());
        assert!(!section.contains('<') && !section.contains('>'));
        // Never an entity cut in two.
        let amp = regex_free_bare_amp(section);
        assert!(amp.is_none(), "a bare & at {amp:?}");
        assert!(body["text"].as_str().unwrap().len() <= 1100);
    }

    /// The position of an `&` that does not start `&amp;`, `&lt;` or `&gt;`.
    fn regex_free_bare_amp(s: &str) -> Option<usize> {
        s.match_indices('&').map(|(i, _)| i).find(|&i| {
            !["&amp;", "&lt;", "&gt;"]
                .iter()
                .any(|e| s[i..].starts_with(e))
        })
    }

    #[test]
    fn the_gateways_own_alerts_have_a_source() {
        let q = queued("silence x", "");
        let pd: serde_json::Value = serde_json::from_slice(&pagerduty_body("t", &q, "k")).unwrap();
        assert_eq!(pd["payload"]["source"], "outpost");
        assert_eq!(headline(&q), "CRITICAL: disk on outpost");
    }
}

#[cfg(test)]
mod group_tests {
    use super::*;
    use crate::alerts::Notification;

    #[test]
    fn a_big_group_fits_one_slack_message_and_counts_what_it_leaves_out() {
        let members: Vec<Queued> = (0..200)
            .map(|i| Queued {
                seq: i,
                receiver: "slack".into(),
                notification: Notification {
                    id: format!("fp/disk{i}/1/0"),
                    fingerprint: "fp".into(),
                    check: format!("disk{i}"),
                    kind: Kind::Firing,
                    status: Status::Critical,
                    since_ms: 0,
                    at_ms: 0,
                    output: "<&>".repeat(1000),
                    receivers: vec!["slack".into()],
                },
                hostname: "db-1".into(),
                labels: BTreeMap::new(),
                group: Some("route 1: check".into()),
                group_wait_ms: 0,
                queued_ms: 0,
            })
            .collect();
        let body: serde_json::Value =
            serde_json::from_slice(&group_slack_body("acme & co", &members)).unwrap();
        let blocks = body["blocks"].as_array().unwrap();
        assert!(blocks.len() <= 50, "{} blocks", blocks.len());
        let header = blocks[0]["text"]["text"].as_str().unwrap();
        assert_eq!(
            header, "200 notifications for tenant acme & co",
            "plain text, unescaped"
        );
        let total: usize = blocks
            .iter()
            .filter_map(|b| b["text"]["text"].as_str())
            .map(|t| t.chars().count())
            .sum();
        assert!(total <= 12_000, "{total} characters");
        let shown = blocks.iter().filter(|b| b["type"] == "section").count();
        let last = blocks.last().unwrap()["elements"][0]["text"]
            .as_str()
            .unwrap();
        assert_eq!(last, format!("and {} more", 200 - shown));
        assert!(shown >= 5, "{shown} shown");
    }
}
