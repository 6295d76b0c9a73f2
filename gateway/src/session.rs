//! One agent connection, from the websocket upgrade to its end.
//!
//! The order is fixed by the protocol: `hello` within the deadline (nothing else accepted
//! before it), checked and authenticated here; then [`live`] runs the session: `welcome`,
//! `config` when the agent's hash differs, and a reader that hands each frame to its
//! handler (results published to the bus and acked once durable, rpc replies, plugin
//! requests, `bye`) while a writer task drains the bounded outbound queue. A malformed or
//! oversized frame closes only this connection, with a close code from
//! [`outpost_protocol::close`] and a counter.

mod live;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use outpost_protocol::{
    close, decode_agent_frame, encode, valid_fingerprint, AgentFrame, ErrorFrame, FrameError,
    GatewayFrame, Hello, Reconnect, PROTOCOL_VERSION,
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::bus::{AgentRef, Bus};
use crate::checks::TenantChecks;
use crate::credentials::{AuthError, Credentials};
use crate::hub::Hub;
use crate::listener::PreAuth;
use crate::metrics::Metrics;
use crate::nats::Nats;
use crate::registry::{Registry, Upkeep};
use crate::settings::Settings;

/// What agent sessions use, handed by the gateway at start and shared by all of them.
pub struct Services {
    pub settings: Arc<Settings>,
    pub credentials: Arc<Credentials>,
    pub checks: Arc<TenantChecks>,
    pub registry: Arc<Registry>,
    pub bus: Arc<dyn Bus>,
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
    /// In a fleet: to answer run-now calls relayed from other gateways.
    pub nats: Option<Arc<Nats>>,
    /// Each tenant's result rate on this gateway.
    pub tenant_rates: Arc<crate::rate::TenantRates>,
    pub audit: Arc<crate::audit::Audit>,
}

impl Services {
    fn upkeep(&self) -> Upkeep {
        Upkeep {
            registry: self.registry.clone(),
            bus: self.bus.clone(),
            hub: self.hub.clone(),
            metrics: self.metrics.clone(),
            presence_grace: self.settings.presence_grace,
            listen: self.settings.listen.to_string(),
            shutdown: self.shutdown.clone(),
        }
    }

    fn runnow(&self) -> crate::runnow::Local {
        crate::runnow::Local {
            hub: self.hub.clone(),
            agents: self.registry.clone(),
        }
    }
}

pub const GATEWAY_VERSION: &str = env!("CARGO_PKG_VERSION");

fn close_reason(text: &str) -> String {
    // RFC 6455 caps the close reason at 123 bytes.
    let mut s = text.to_string();
    if s.len() > 120 {
        let mut cut = 120;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

async fn close_now(socket: &mut WebSocket, code: u16, reason: &str) {
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: close_reason(reason).into(),
        })))
        .await;
}

/// Whether a websocket read error was a frame over the size limit.
/// A read error that is the peer's fault, with the close code that says so; other read
/// errors are a lost connection.
fn bad_read(err: &axum::Error) -> Option<(u16, &'static str)> {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = src {
        match e.downcast_ref::<tungstenite::Error>() {
            Some(tungstenite::Error::Capacity(_)) => {
                return Some((close::TOO_BIG, "frame exceeds 1 MiB"))
            }
            Some(tungstenite::Error::Utf8(_)) => {
                return Some((close::MALFORMED, "text frame is not valid UTF-8"))
            }
            Some(_) => return None,
            None => src = e.source(),
        }
    }
    None
}

/// Count a read error that is the peer's fault (see [`bad_read`]).
fn count_bad_read(gw: &Services, code: u16) {
    if code == close::TOO_BIG {
        Metrics::inc(&gw.metrics.frames_too_big);
    } else {
        Metrics::inc(&gw.metrics.frames_malformed);
    }
}

/// Run one agent connection to its end. `pre_auth` is the connection's slot among the
/// unauthenticated ones, given back once the agent is authenticated.
pub async fn run(gw: Arc<Services>, mut socket: WebSocket, peer: SocketAddr, pre_auth: PreAuth) {
    Metrics::inc(&gw.metrics.connections);
    // Pings and pongs before hello are control frames, not part of the exchange: they are
    // answered (by the websocket layer) and skipped, and the hello deadline keeps running.
    let first = async {
        loop {
            match socket.recv().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => return other,
            }
        }
    };
    let first = tokio::select! {
        first = tokio::time::timeout(gw.settings.hello_timeout, first) => first,
        // A gateway stopping does not wait for a hello that may never come.
        _ = gw.shutdown.cancelled() => {
            close_now(&mut socket, close::GOING_AWAY, "gateway shutting down; reconnect later").await;
            return;
        }
    };
    let hello = match first {
        Err(_) => {
            Metrics::inc(&gw.metrics.hello_timeouts);
            tracing::warn!(%peer, "no hello within the deadline; closing");
            close_now(
                &mut socket,
                close::HELLO_TIMEOUT,
                "hello not received in time",
            )
            .await;
            return;
        }
        Ok(None) => return,
        Ok(Some(Err(e))) => {
            if let Some((code, why)) = bad_read(&e) {
                count_bad_read(&gw, code);
                tracing::warn!(%peer, error = why, "bad frame before hello; closing");
                close_now(&mut socket, code, why).await;
            }
            return;
        }
        Ok(Some(Ok(Message::Text(text)))) => match decode_agent_frame(text.as_str()) {
            Ok(AgentFrame::Hello(h)) => h,
            Ok(_) => {
                Metrics::inc(&gw.metrics.frames_out_of_order);
                tracing::warn!(%peer, "frame before hello; closing");
                close_now(&mut socket, close::POLICY, "the first frame must be hello").await;
                return;
            }
            Err(FrameError::Malformed(e)) if hello_revision(text.as_str()).is_some() => {
                if matches!(hello_revision(text.as_str()), Some(Some(n)) if n != u64::from(PROTOCOL_VERSION))
                {
                    // Another revision's hello need not decode as ours: it is refused for
                    // its revision, which the agent waits out instead of retrying.
                    let why = format!(
                        "agent speaks another protocol revision, this gateway speaks {PROTOCOL_VERSION}; upgrade the older side"
                    );
                    tracing::warn!(%peer, error = %why, "refusing agent");
                    send_error(&mut socket, "unsupported_protocol", &why).await;
                    close_now(&mut socket, close::UNSUPPORTED, &why).await;
                    return;
                }
                // A hello with a field missing or of the wrong type is answered like one
                // that breaks a bound: the client is told which field (serde's message,
                // bounded and printable: it may quote what the client sent).
                let why = outpost_protocol::printable(&format!("hello does not decode: {e}"), 200);
                Metrics::inc(&gw.metrics.frames_malformed);
                tracing::warn!(%peer, error = %why, "invalid hello; closing");
                send_error(&mut socket, "invalid_hello", &why).await;
                close_now(&mut socket, close::POLICY, "invalid hello").await;
                return;
            }
            Err(e) => {
                reject_frame(&gw, &mut socket, peer, &e).await;
                return;
            }
        },
        Ok(Some(Ok(Message::Close(_)))) => return,
        Ok(Some(Ok(_))) => {
            Metrics::inc(&gw.metrics.frames_out_of_order);
            close_now(
                &mut socket,
                close::POLICY,
                "the first frame must be a hello text frame",
            )
            .await;
            return;
        }
    };
    if let Err(why) = validate_hello(&hello) {
        Metrics::inc(&gw.metrics.frames_malformed);
        tracing::warn!(%peer, error = %why, "invalid hello; closing");
        send_error(&mut socket, "invalid_hello", &why).await;
        close_now(&mut socket, close::POLICY, &why).await;
        return;
    }
    if hello.protocol != PROTOCOL_VERSION {
        let why = format!(
            "agent speaks protocol {}, this gateway speaks {}; upgrade the older side",
            hello.protocol, PROTOCOL_VERSION
        );
        tracing::warn!(%peer, fingerprint = %hello.fingerprint, error = %why, "refusing agent");
        send_error(&mut socket, "unsupported_protocol", &why).await;
        close_now(&mut socket, close::UNSUPPORTED, &why).await;
        return;
    }
    let max = gw.settings.max_agents;
    // An agent replacing its own connection is let through (its tenant as its secret
    // names it; checked below).
    let replacing = || {
        let tenant = gw.credentials.tenant_named_by(&hello.credential);
        gw.hub.has(&AgentRef::new(tenant, &hello.fingerprint))
    };
    if max > 0 && gw.hub.connected() >= max && !replacing() {
        Metrics::inc(&gw.metrics.overload_refusals);
        tracing::warn!(%peer, fingerprint = %hello.fingerprint, max_agents = max, "overloaded; telling the agent to come back later");
        let retry = gw.settings.overload_retry;
        let frame = come_back_later(
            &format!("this gateway holds its maximum of {max} agents"),
            retry / 2,
            retry,
        );
        let _ = socket.send(Message::Text(encode(&frame).into())).await;
        close_now(
            &mut socket,
            close::TRY_AGAIN_LATER,
            "overloaded; come back later",
        )
        .await;
        return;
    }
    // Boxed, here and for the other calls made once per session: a future awaited inline
    // makes the session's state machine as large as its largest such call for the whole
    // life of the connection (ci/bench: memory per idle agent).
    let auth = match Box::pin(gw.credentials.check(&hello.fingerprint, &hello.credential)).await {
        Ok(a) => a,
        Err(e) => {
            Metrics::inc(&gw.metrics.auth_failures);
            // Labelled with the tenant only when it exists (see `Metrics::refused`).
            let named = gw.credentials.tenant_named_by(&hello.credential);
            let tenant = match gw.credentials.tenants.tenant(named) {
                Some(_) => named,
                None => "",
            };
            let reason = match &e {
                AuthError::Revoked(_) => "revoked",
                e if e.over_limit() => "agent_limit",
                _ => "agent_credential",
            };
            let subject = format!("agent {}", hello.fingerprint);
            gw.audit
                .refused(tenant, reason, subject, Some(peer.to_string()));
            tracing::warn!(%peer, fingerprint = %hello.fingerprint, hostname = ?hello.hostname, error = %e, "agent refused");
            let (code, why) = match e {
                AuthError::Revoked(_) => ("revoked", close::REVOKED),
                _ => ("unauthorized", close::UNAUTHORIZED),
            };
            send_error(&mut socket, code, &e.public_message()).await;
            close_now(&mut socket, why, code).await;
            return;
        }
    };
    pre_auth.release();
    let span =
        tracing::info_span!("agent", fingerprint = %hello.fingerprint, hostname = ?hello.hostname);
    live::run(gw, socket, peer, hello, auth)
        .instrument(span)
        .await
}

/// A `reconnect` frame: dial again after a random delay in `[min, max]`.
fn come_back_later(
    reason: &str,
    min: std::time::Duration,
    max: std::time::Duration,
) -> GatewayFrame {
    GatewayFrame::Reconnect(Reconnect {
        reason: reason.into(),
        min_delay_ms: min.as_millis() as u64,
        max_delay_ms: max.as_millis() as u64,
    })
}

async fn send_error(socket: &mut WebSocket, code: &str, message: &str) {
    let frame = GatewayFrame::Error(ErrorFrame {
        code: code.into(),
        message: message.into(),
    });
    let _ = socket.send(Message::Text(encode(&frame).into())).await;
}

/// For a JSON object whose `type` is `hello` (whatever else it holds): `Some` with its
/// `protocol` when that is a number. `None` for anything else.
fn hello_revision(text: &str) -> Option<Option<u64>> {
    #[derive(serde::Deserialize)]
    struct Tag<'a> {
        #[serde(rename = "type", borrow)]
        kind: std::borrow::Cow<'a, str>,
        #[serde(default)]
        protocol: Option<serde_json::Value>,
    }
    let tag = serde_json::from_str::<Tag>(text).ok()?;
    (tag.kind == "hello").then(|| tag.protocol.and_then(|p| p.as_u64()))
}

/// Count a frame that failed to decode and pick the close code for it.
fn rejected(gw: &Services, peer: SocketAddr, e: &FrameError) -> u16 {
    tracing::warn!(%peer, error = %e, "rejected frame; closing");
    match e {
        FrameError::TooBig { .. } => {
            Metrics::inc(&gw.metrics.frames_too_big);
            close::TOO_BIG
        }
        FrameError::Malformed(_) => {
            Metrics::inc(&gw.metrics.frames_malformed);
            close::MALFORMED
        }
    }
}

async fn reject_frame(gw: &Services, socket: &mut WebSocket, peer: SocketAddr, e: &FrameError) {
    let code = rejected(gw, peer, e);
    close_now(socket, code, &e.to_string()).await;
}

fn validate_hello(h: &Hello) -> Result<(), String> {
    if !valid_fingerprint(&h.fingerprint) {
        return Err(format!(
            "fingerprint {:?} is not a lowercase UUID",
            h.fingerprint
        ));
    }
    let problems = h.problems();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}
