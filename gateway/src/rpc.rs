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

use axum::http::StatusCode;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::bus::AgentRef;
use crate::nats::rpc_subject;
use crate::Gateway;

/// How long a gateway waits for the holder's answer: above the holder's own deadline
/// (the check's timeout plus 5 s, at most 120 s), so the holder's answer says what happened.
const REMOTE_DEADLINE: Duration = Duration::from_secs(130);

#[derive(Serialize, Deserialize)]
struct RunNow {
    tenant: String,
    check: String,
}

#[derive(Serialize, Deserialize)]
struct Answer {
    status: u16,
    body: Value,
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

/// Answer run-now requests for `agent` arriving through NATS (nothing without NATS).
pub async fn serve_agent(gw: &Arc<Gateway>, agent: &AgentRef) -> Responder {
    let Some(nats) = gw.nats.clone() else {
        return Responder(None);
    };
    let subject = rpc_subject(&agent.tenant, &agent.fingerprint);
    let mut sub = match nats.client.subscribe(subject.clone()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(%subject, error = %e, "cannot subscribe for run-now requests; only this gateway can reach the agent");
            return Responder(None);
        }
    };
    let gw = gw.clone();
    let agent = agent.clone();
    Responder(Some(tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let Some(reply) = msg.reply.clone() else {
                continue;
            };
            let (gw, agent, nats) = (gw.clone(), agent.clone(), nats.clone());
            tokio::spawn(async move {
                let answer = match serde_json::from_slice::<RunNow>(&msg.payload) {
                    // The subject already carries the tenant; a request that names another
                    // one is refused all the same.
                    Ok(req) if req.tenant != agent.tenant => Answer {
                        status: StatusCode::NOT_FOUND.as_u16(),
                        body: json!({"error": format!("no agent with fingerprint {} in tenant {}", agent.fingerprint, req.tenant)}),
                    },
                    Ok(req) => {
                        let (status, body) =
                            crate::api::run_now_here(&gw, &agent.fingerprint, &req.check).await;
                        Answer {
                            status: status.as_u16(),
                            body,
                        }
                    }
                    Err(e) => Answer {
                        status: StatusCode::BAD_REQUEST.as_u16(),
                        body: json!({"error": format!("malformed run-now request: {e}")}),
                    },
                };
                let bytes = serde_json::to_vec(&answer).unwrap_or_default();
                if let Err(e) = nats.client.publish(reply, bytes.into()).await {
                    tracing::warn!(error = %e, "cannot send a run-now answer");
                }
            });
        }
    })))
}

/// Run `check` on an agent held by another gateway of the fleet.
pub async fn call(gw: &Gateway, fingerprint: &str, check: &str) -> (StatusCode, Value) {
    let Some(nats) = &gw.nats else {
        return (
            StatusCode::CONFLICT,
            json!({"error": format!("agent {fingerprint} is not connected")}),
        );
    };
    let request = RunNow {
        tenant: gw.settings.tenant.clone(),
        check: check.to_string(),
    };
    let payload = serde_json::to_vec(&request).unwrap_or_default();
    let subject = rpc_subject(&gw.settings.tenant, fingerprint);
    let sent = nats
        .client
        .send_request(
            subject,
            async_nats::client::Request::new()
                .payload(payload.into())
                .timeout(Some(REMOTE_DEADLINE)),
        )
        .await;
    use async_nats::client::RequestErrorKind;
    match sent {
        Ok(msg) => match serde_json::from_slice::<Answer>(&msg.payload) {
            Ok(a) => (
                StatusCode::from_u16(a.status).unwrap_or(StatusCode::BAD_GATEWAY),
                a.body,
            ),
            Err(e) => (
                StatusCode::BAD_GATEWAY,
                json!({"error": format!("the gateway holding agent {fingerprint} sent an unreadable answer: {e}")}),
            ),
        },
        Err(e) => match e.kind() {
            RequestErrorKind::NoResponders => (
                StatusCode::CONFLICT,
                json!({"error": format!("agent {fingerprint} is not connected to any gateway")}),
            ),
            RequestErrorKind::TimedOut => (
                StatusCode::GATEWAY_TIMEOUT,
                json!({"error": format!("no answer from the gateway holding agent {fingerprint} within {}s", REMOTE_DEADLINE.as_secs())}),
            ),
            _ => (
                StatusCode::BAD_GATEWAY,
                json!({"error": format!("cannot reach agent {fingerprint} through NATS: {e}")}),
            ),
        },
    }
}
