//! The gateway's public API over HTTPS, as the CLI uses it: each failure sorted into what
//! the user can do about it, which is also the exit code.

use std::time::Duration;

use anyhow::Context as _;
use outpost_agent::settings::Trust;
use serde_json::Value;

use crate::config::Context;

/// Why a command failed, and the exit code it ends with.
#[derive(Debug)]
pub enum Failure {
    /// The API refused the request (4xx but 404): a bad argument, a role too low, a
    /// token refused. Exit 1.
    Refused(String),
    /// A usage or configuration problem found before asking. Exit 2.
    Usage(String),
    /// The gateway could not be reached, or failed (5xx). Exit 3.
    Unreachable(String),
    /// What was named does not exist. Exit 4.
    NotFound(String),
}

impl Failure {
    pub fn code(&self) -> u8 {
        match self {
            Failure::Refused(_) => 1,
            Failure::Usage(_) => 2,
            Failure::Unreachable(_) => 3,
            Failure::NotFound(_) => 4,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Failure::Refused(m)
            | Failure::Usage(m)
            | Failure::Unreachable(m)
            | Failure::NotFound(m) => m,
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Failure {
        Failure::Usage(format!("{e:#}"))
    }
}

pub struct Api {
    base: String,
    token: String,
    http: reqwest::Client,
    /// The context's name, for messages.
    context: String,
}

impl Api {
    pub fn new(name: &str, ctx: &Context) -> Result<Api, Failure> {
        let trust = match (&ctx.pin, &ctx.ca) {
            (Some(_), Some(_)) => {
                return Err(Failure::Usage(format!(
                    "context {name:?} has both a pin and a CA file: keep one (`outpost context set {name} …`)"
                )))
            }
            (Some(pin), None) => Trust::Pin(pin.trim().to_lowercase()),
            (None, Some(ca)) => Trust::CaFile(ca.clone()),
            (None, None) => Trust::SystemRoots,
        };
        let tls = outpost_agent::tls::client_config(&trust)
            .with_context(|| format!("context {name:?}: cannot set up TLS"))?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls((*tls).clone())
            .connect_timeout(Duration::from_secs(10))
            .build()
            .context("cannot make an HTTP client")?;
        let base = ctx.url.trim_end_matches('/').to_string();
        if !base.starts_with("https://") {
            return Err(Failure::Usage(format!(
                "context {name:?}: url {base:?} must start with https:// (the gateway serves only TLS)"
            )));
        }
        Ok(Api {
            base,
            token: ctx.token.clone(),
            http,
            context: name.to_string(),
        })
    }

    /// `method path` under `/api/v1` with an optional JSON body; the JSON answer.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, Failure> {
        let resp = self.send(method, path, body, &[], None).await?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| self.unreachable(&format!("reading the answer failed: {e}")))?;
        let value: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        if status.is_success() {
            return Ok(value);
        }
        Err(self.failure(status.as_u16(), &value))
    }

    /// A request whose answer is read by the caller (the event stream).
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, String)],
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response, Failure> {
        let url = format!("{}/api/v1{path}", self.base);
        let method = reqwest::Method::from_bytes(method.as_bytes())
            .map_err(|_| Failure::Usage(format!("bad method {method}")))?;
        let mut req = self.http.request(method, &url).bearer_auth(&self.token);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        if let Some(t) = timeout {
            req = req.timeout(t);
        }
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        req.send().await.map_err(|e| {
            if e.is_builder() {
                return Failure::Usage(format!(
                    "cannot make the request to {url}: {}; check the context's url and token",
                    chain(&e)
                ));
            }
            self.unreachable(&format!("cannot reach {url}: {}", chain(&e)))
        })
    }

    fn unreachable(&self, what: &str) -> Failure {
        Failure::Unreachable(format!(
            "{what}; is the gateway up, and the context {:?}'s url right? (`outpost context list`)",
            self.context
        ))
    }

    /// A failure for an answer other than 2xx, with the gateway's own words.
    pub fn failure(&self, status: u16, body: &Value) -> Failure {
        let said = body["error"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| body.to_string());
        match status {
            401 => Failure::Refused(format!(
                "the gateway refused the token of context {:?}: {said}; set a valid one with `outpost context set {} --token TOKEN`",
                self.context, self.context
            )),
            403 => Failure::Refused(format!(
                "the token of context {:?} may not do this: {said}; use a token with a higher role",
                self.context
            )),
            404 => Failure::NotFound(said),
            429 => Failure::Unreachable(format!("busy (429): {said}; retry in a moment")),
            s if s >= 500 => Failure::Unreachable(format!("the gateway failed ({s}): {said}; retry")),
            s => Failure::Refused(format!("the gateway refused it ({s}): {said}")),
        }
    }
}

/// An error and every error under it, as one line (reqwest's own text says only "error
/// sending request"; the cause, refused connection or certificate, is below it).
fn chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut at = e.source();
    while let Some(cause) = at {
        let text = cause.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        at = cause.source();
    }
    parts.join(": ")
}
