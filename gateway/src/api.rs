//! The HTTP side of the gateway: the agents' websocket endpoint, the JSON API (bearer
//! token), `/healthz`, `/metrics` and the console page.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use outpost_protocol::{CheckResult, CheckSpec, RpcCall, MAX_FRAME_BYTES, SUBPROTOCOL, WS_PATH};
use serde::Serialize;
use serde_json::json;

use crate::hub::RpcFailure;
use crate::listener::PreAuth;
use crate::metrics::Metrics;
use crate::registry::AgentRecord;
use crate::util::now_ms;
use crate::Gateway;

/// The websocket read buffer of each agent connection (see [`upgrade`]).
const WS_READ_BUFFER: usize = 1024;

/// The peer address of the connection a request came in on.
#[derive(Clone, Copy)]
pub struct Peer(pub SocketAddr);

pub fn router(gw: Arc<Gateway>) -> Router {
    let api = Router::new()
        .route("/agents", get(list_agents))
        .route("/agents/{fingerprint}", get(get_agent))
        .route("/agents/{fingerprint}/checks", get(agent_checks))
        .route("/agents/{fingerprint}/checks/{check}/run", post(run_now))
        .layer(middleware::from_fn_with_state(gw.clone(), require_token));
    Router::new()
        .route("/", get(crate::console::page))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route(WS_PATH, get(upgrade))
        .nest("/api/v1", api)
        .merge(crate::releases::routes())
        .merge(crate::releases_manifest::router())
        .layer(middleware::map_response(crate::console::security_headers))
        .with_state(gw)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

async fn require_token(State(gw): State<Arc<Gateway>>, req: Request, next: Next) -> Response {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match token {
        Some(t) if gw.credentials.api_token_ok(t.trim()) => next.run(req).await,
        Some(_) => error(StatusCode::UNAUTHORIZED, "API token refused"),
        None => error(
            StatusCode::UNAUTHORIZED,
            "missing API token: send 'Authorization: Bearer TOKEN' (the token is in api.token in the gateway's data directory)",
        ),
    }
}

/// For load balancers: 200 while this gateway takes agents, 503 (with the reason) while it
/// drains for shutdown or cannot reach its bus, so new connections go elsewhere.
async fn readyz(State(gw): State<Arc<Gateway>>) -> Response {
    let why = if gw.shutdown.is_cancelled() {
        Some("draining: shutting down".to_string())
    } else {
        gw.bus.unavailable()
    };
    match why {
        None => (StatusCode::OK, "ready\n").into_response(),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
    }
}

async fn metrics(State(gw): State<Arc<Gateway>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        gw.metrics.render(crate::metrics::Gauges {
            agents_connected: gw.hub.connected(),
            unauthenticated: gw.admission.in_use(),
            unauthenticated_limit: gw.admission.limits().global,
        }) + &gw.health.render(),
    )
}

async fn upgrade(
    State(gw): State<Arc<Gateway>>,
    Extension(Peer(peer)): Extension<Peer>,
    Extension(pre_auth): Extension<PreAuth>,
    ws: WebSocketUpgrade,
) -> Response {
    // tungstenite's read buffer defaults to 128 KiB per connection, allocated up front and
    // zero-filled up to its capacity on every read, so all of it is resident: ci/bench
    // measured 153 KB of gateway RSS per idle agent with it, 26 KB with 4 KiB and 23 KB
    // with 1 KiB (results/s through the gateway the same with either). 1 KiB holds a ping,
    // an ack or an rpc reply; a larger frame grows the buffer while it is read. (The write
    // buffer is not preallocated and every frame is flushed as it is sent, so its size
    // setting changes nothing here.)
    let ws = ws
        .protocols([SUBPROTOCOL])
        .max_message_size(MAX_FRAME_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .read_buffer_size(WS_READ_BUFFER);
    if ws.selected_protocol().is_none() {
        return error(
            StatusCode::BAD_REQUEST,
            format!("websocket subprotocol {SUBPROTOCOL} is required"),
        );
    }
    if gw.shutdown.is_cancelled() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "gateway is shutting down");
    }
    // The session holds the connection's slot among the unauthenticated ones until the
    // agent's hello is accepted.
    ws.on_upgrade(move |socket| crate::session::run(gw, socket, peer, pre_auth))
}

#[derive(Serialize)]
struct AgentView {
    fingerprint: String,
    hostname: String,
    os: String,
    arch: String,
    agent_version: String,
    labels: std::collections::BTreeMap<String, String>,
    groups: Vec<String>,
    /// `online`, `lost` or `deregistered`.
    presence: &'static str,
    presence_reason: String,
    /// Whether a gateway holds a live connection of the agent.
    connected: bool,
    /// The gateway that holds (or last held) it.
    gateway: String,
    last_seen_ms: u64,
    connected_since_ms: Option<u64>,
}

fn view(gw: &Gateway, r: &AgentRecord) -> AgentView {
    AgentView {
        fingerprint: r.fingerprint.clone(),
        hostname: r.hostname.clone(),
        os: r.os.clone(),
        arch: r.arch.clone(),
        agent_version: r.agent_version.clone(),
        labels: r.labels.clone(),
        groups: r.groups.clone(),
        presence: r.presence.as_str(),
        presence_reason: r.presence_reason.clone(),
        connected: gw.hub.is_connected(&r.fingerprint)
            || (r.presence == crate::bus::Presence::Online
                && r.holder.is_some()
                && !gw
                    .registry
                    .me
                    .holds(r.holder.as_deref().unwrap_or_default())),
        gateway: r.gateway.clone(),
        last_seen_ms: last_seen(gw, r),
        connected_since_ms: r.connected_since_ms,
    }
}

/// When the agent was last heard of: its last frame on this gateway; for an agent another
/// gateway holds, that gateway's last heartbeat (it drops silent agents within three
/// heartbeat intervals).
fn last_seen(gw: &Gateway, r: &AgentRecord) -> u64 {
    let remote = r.presence == crate::bus::Presence::Online
        && r.holder
            .as_deref()
            .is_some_and(|h| !gw.registry.me.holds(h));
    match gw.registry.holder_beat_ms(r) {
        Some(beat) if remote => r.last_seen_ms.max(beat),
        _ => r.last_seen_ms,
    }
}

async fn list_agents(State(gw): State<Arc<Gateway>>) -> Json<Vec<AgentView>> {
    Json(gw.registry.list().iter().map(|r| view(&gw, r)).collect())
}

fn unknown_agent(fp: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("no agent with fingerprint {fp} has enrolled here"),
    )
}

async fn get_agent(State(gw): State<Arc<Gateway>>, Path(fp): Path<String>) -> Response {
    match gw.registry.get(&fp) {
        Some(r) => Json(view(&gw, &r)).into_response(),
        None => unknown_agent(&fp),
    }
}

#[derive(Serialize)]
struct CheckView {
    check: String,
    /// Whether the check is in the agent's current configuration.
    configured: bool,
    spec: Option<CheckSpec>,
    latest: Option<CheckResult>,
    age_secs: Option<u64>,
}

async fn agent_checks(State(gw): State<Arc<Gateway>>, Path(fp): Path<String>) -> Response {
    let Some(rec) = gw.registry.get(&fp) else {
        return unknown_agent(&fp);
    };
    let now = now_ms();
    let mut out: Vec<CheckView> = rec
        .checks
        .iter()
        .map(|spec| {
            let latest = rec.latest.get(&spec.name).cloned();
            CheckView {
                check: spec.name.clone(),
                configured: true,
                age_secs: latest
                    .as_ref()
                    .map(|l| now.saturating_sub(l.started_at_ms) / 1000),
                spec: Some(spec.clone()),
                latest,
            }
        })
        .collect();
    for (name, result) in &rec.latest {
        if !rec.checks.iter().any(|c| &c.name == name) {
            out.push(CheckView {
                check: name.clone(),
                configured: false,
                spec: None,
                age_secs: Some(now.saturating_sub(result.started_at_ms) / 1000),
                latest: Some(result.clone()),
            });
        }
    }
    out.sort_by(|a, b| a.check.cmp(&b.check));
    Json(out).into_response()
}

async fn run_now(
    State(gw): State<Arc<Gateway>>,
    Path((fp, check)): Path<(String, String)>,
) -> Response {
    Metrics::inc(&gw.metrics.rpc_calls);
    let (status, body) = if gw.hub.has(&fp) || gw.nats.is_none() {
        run_now_here(&gw, &fp, &check).await
    } else if gw.registry.get(&fp).is_none() {
        (StatusCode::NOT_FOUND, unknown_agent_body(&fp))
    } else {
        crate::rpc::call(&gw, &fp, &check).await
    };
    if status != StatusCode::OK {
        Metrics::inc(&gw.metrics.rpc_failures);
    }
    (status, Json(body)).into_response()
}

fn unknown_agent_body(fp: &str) -> serde_json::Value {
    json!({ "error": format!("no agent with fingerprint {fp} has enrolled here") })
}

/// Run `check` on an agent connected to this gateway: the status and JSON body of the
/// answer (the result, or `{"error"}`), the same for a call from the API here and one
/// relayed from another gateway.
pub async fn run_now_here(gw: &Gateway, fp: &str, check: &str) -> (StatusCode, serde_json::Value) {
    let fail = |status, message: String| (status, json!({ "error": message }));
    let Some(rec) = gw.registry.get(fp) else {
        return (StatusCode::NOT_FOUND, unknown_agent_body(fp));
    };
    let Some(spec) = rec.checks.iter().find(|c| c.name == check) else {
        if !gw.hub.has(fp) {
            return fail(StatusCode::CONFLICT, format!("agent {fp} is not connected"));
        }
        return fail(
            StatusCode::NOT_FOUND,
            format!("check {check:?} is not configured on agent {fp}"),
        );
    };
    if matches!(spec.probe, outpost_protocol::probe::Probe::Daemon(_)) {
        // Known here: no need to ask the agent (nor to depend on how it would answer).
        return fail(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "check {check:?} is a daemon: it reports on its own and cannot be run on demand"
            ),
        );
    }
    let deadline = Duration::from_secs(spec.timeout_secs.saturating_add(5).min(120));
    let reply = gw
        .hub
        .rpc(
            fp,
            RpcCall::RunCheck {
                check: check.to_string(),
            },
            deadline,
        )
        .await;
    let reply = match reply {
        Ok(r) => r,
        Err(e) => {
            let status = match e {
                RpcFailure::NotConnected(_) => StatusCode::CONFLICT,
                RpcFailure::Busy(_) => StatusCode::TOO_MANY_REQUESTS,
                RpcFailure::Timeout(..) => StatusCode::GATEWAY_TIMEOUT,
                RpcFailure::Disconnected(_) => StatusCode::BAD_GATEWAY,
            };
            return fail(status, e.to_string());
        }
    };
    match (reply.result, reply.error) {
        (Some(result), _) => (
            StatusCode::OK,
            serde_json::to_value(result).unwrap_or_default(),
        ),
        (None, Some(e)) => {
            let status = match e.code.as_str() {
                "unknown_check" => StatusCode::NOT_FOUND,
                "busy" => StatusCode::TOO_MANY_REQUESTS,
                "not_runnable" => StatusCode::UNPROCESSABLE_ENTITY,
                _ => StatusCode::BAD_GATEWAY,
            };
            fail(status, format!("agent answered {}: {}", e.code, e.message))
        }
        (None, None) => fail(StatusCode::BAD_GATEWAY, "agent sent an empty reply".into()),
    }
}
