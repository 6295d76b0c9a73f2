//! Run-now across the fleet: NATS request/reply on the agent's own subject,
//! `outpost.<tenant>.rpc.<fingerprint>`.
//!
//! The gateway holding the agent subscribes to that subject for as long as the session
//! lives, and answers each request with the HTTP status and body it would have given had
//! the call come to it directly. A gateway that does not hold the agent sends the request;
//! with no subscriber NATS answers "no responders" at once, which becomes the fast
//! "not connected" answer. Subjects carry the tenant, so a request made for one tenant can
//! only reach a session of that tenant.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use outpost_protocol::CheckResult;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{rpc_subject, Nats};
use crate::bus::AgentRef;
use crate::errors::ErrorKind;
use crate::runnow::{self, RunNowError};

/// How long a gateway waits for the holder's answer: above the holder's own deadline
/// (the check's timeout plus 5 s, at most 120 s), so the holder's answer says what happened.
const REMOTE_DEADLINE: Duration = Duration::from_secs(130);

#[derive(Serialize, Deserialize)]
struct RunNow {
    tenant: String,
    check: String,
}

/// The holder's answer: the HTTP status and body its own API would have given (the result,
/// or `{"error"}`), so gateways of different versions understand each other.
#[derive(Serialize, Deserialize)]
struct Answer {
    status: u16,
    body: Value,
}

impl Answer {
    fn of(outcome: Result<CheckResult, RunNowError>) -> Answer {
        match outcome {
            Ok(result) => Answer {
                status: 200,
                body: serde_json::to_value(result).unwrap_or_default(),
            },
            Err(e) => Answer::error(e.kind(), e.to_string()),
        }
    }

    fn error(kind: ErrorKind, message: String) -> Answer {
        Answer {
            status: kind.status(),
            body: json!({ "error": message }),
        }
    }

    /// The holder's result as it sent it: passed on untouched, so fields (or values) a
    /// newer holder and agent know reach the caller instead of failing here.
    fn into_outcome(self, fingerprint: &str) -> Result<Value, RunNowError> {
        if self.status == 200 {
            return Ok(self.body);
        }
        let message = match self.body.get("error").and_then(Value::as_str) {
            Some(m) => m.to_string(),
            None => format!(
                "the gateway holding agent {fingerprint} answered {}",
                self.status
            ),
        };
        Err(RunNowError::Fleet {
            kind: ErrorKind::from_status(self.status),
            message,
        })
    }
}

/// The responder of one session; it unsubscribes when dropped (the session ended).
pub struct Responder(Option<tokio::task::JoinHandle<()>>);

impl Drop for Responder {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// Answer run-now requests for `agent` arriving through NATS by running them on `local`.
pub async fn serve_agent(nats: Arc<Nats>, agent: &AgentRef, local: runnow::Local) -> Responder {
    let subject = rpc_subject(&agent.tenant, &agent.fingerprint);
    let mut sub = match nats.client.subscribe(subject.clone()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(%subject, error = %e, "cannot subscribe for run-now requests; only this gateway can reach the agent");
            return Responder(None);
        }
    };
    let agent = agent.clone();
    Responder(Some(tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let Some(reply) = msg.reply.clone() else {
                continue;
            };
            let (agent, nats, local) = (agent.clone(), nats.clone(), local.clone());
            tokio::spawn(async move {
                let answer = match serde_json::from_slice::<RunNow>(&msg.payload) {
                    // The subject already carries the tenant; a request that names another
                    // one is refused all the same.
                    Ok(req) if req.tenant != agent.tenant => {
                        Answer::of(Err(RunNowError::UnknownAgent(agent.fingerprint.clone())))
                    }
                    Ok(req) => Answer::of(local.run(&agent, &req.check).await),
                    Err(e) => Answer::error(
                        ErrorKind::BadRequest,
                        format!("malformed run-now request: {e}"),
                    ),
                };
                let bytes = serde_json::to_vec(&answer).unwrap_or_default();
                if let Err(e) = nats.client.publish(reply, bytes.into()).await {
                    tracing::warn!(error = %e, "cannot send a run-now answer");
                }
            });
        }
    })))
}

/// Run `check` on agent `fingerprint` of `tenant`, held by another gateway of the fleet.
pub async fn call(
    nats: &Nats,
    tenant: &str,
    fingerprint: &str,
    check: &str,
) -> Result<Value, RunNowError> {
    let request = RunNow {
        tenant: tenant.to_string(),
        check: check.to_string(),
    };
    let payload = serde_json::to_vec(&request).unwrap_or_default();
    let sent = nats
        .client
        .send_request(
            rpc_subject(tenant, fingerprint),
            async_nats::client::Request::new()
                .payload(payload.into())
                .timeout(Some(REMOTE_DEADLINE)),
        )
        .await;
    use async_nats::client::RequestErrorKind;
    let fleet = |kind, message| Err(RunNowError::Fleet { kind, message });
    match sent {
        Ok(msg) => match serde_json::from_slice::<Answer>(&msg.payload) {
            Ok(a) => a.into_outcome(fingerprint),
            Err(e) => fleet(
                ErrorKind::Upstream,
                format!("the gateway holding agent {fingerprint} sent an unreadable answer: {e}"),
            ),
        },
        Err(e) => match e.kind() {
            RequestErrorKind::NoResponders => fleet(
                ErrorKind::Conflict,
                format!("agent {fingerprint} is not connected to any gateway"),
            ),
            RequestErrorKind::TimedOut => fleet(
                ErrorKind::Timeout,
                format!(
                    "no answer from the gateway holding agent {fingerprint} within {}s",
                    REMOTE_DEADLINE.as_secs()
                ),
            ),
            _ => fleet(
                ErrorKind::Upstream,
                format!("cannot reach agent {fingerprint} through NATS: {e}"),
            ),
        },
    }
}
