//! The HTTP side of the gateway: the agents' websocket endpoint, the JSON API (bearer
//! token, see [`access`]; tenants, keys and tokens in [`admin`]), `/healthz`, `/metrics`
//! and the console page.

pub mod access;
pub mod admin;
pub mod alerts;
pub mod config;
pub mod entities;
pub mod events;
pub mod history;
pub mod openapi;

use std::sync::Arc;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Response};

use self::access::{Admin, Operate, Read, Tenant};
use axum::{Extension, Json, Router};
use outpost_protocol::{CheckResult, CheckSpec, MAX_FRAME_BYTES, SUBPROTOCOL};
use serde::Serialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::bus::{AgentRef, Bus, Presence};
use crate::credentials::Credentials;
use crate::errors::ErrorKind;
use crate::health::Health;
use crate::hub::Hub;
use crate::listener::{Admission, Peer, PreAuth};
use crate::metrics::Metrics;
use crate::nats::Nats;
use crate::registry::{publish_presence, AgentRecord, Registry};
use crate::runnow::{self, RunNowError};
use crate::session;
use crate::settings::Settings;
use crate::util::now_ms;

/// The websocket read buffer of each agent connection (see [`upgrade`]).
const WS_READ_BUFFER: usize = 1024;

/// What the API uses, handed by the gateway at start.
pub struct Services {
    /// For the agents' websocket endpoint.
    pub sessions: Arc<session::Services>,
    pub registry: Arc<Registry>,
    pub hub: Arc<Hub>,
    pub credentials: Arc<Credentials>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub admission: Admission,
    pub bus: Arc<dyn Bus>,
    pub runnow: runnow::Local,
    /// Refused access: counted, and kept on the bus.
    pub audit: Arc<crate::audit::Audit>,
    /// In a fleet: run-now of agents other gateways hold.
    pub nats: Option<Arc<Nats>>,
    pub shutdown: CancellationToken,
    /// Agent sessions are tracked with the connections, so shutdown waits for them.
    pub tracker: TaskTracker,
    /// The tenants' alert evaluators.
    pub alerting: Arc<crate::alerting::Hub>,
    /// The event stream's buffer and patience per client.
    pub events: crate::events::Limits,
    /// The shared windows of the tenants' feeds the event streams read.
    pub event_tails: Arc<crate::events::tails::AllTails>,
}

pub(crate) type Gw = Arc<Services>;

/// An API failure: its kind gives the status (one table, [`ErrorKind::status`]), its
/// message is the JSON body's `error`.
#[derive(Debug)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ApiError {
        ApiError {
            kind,
            message: message.into(),
        }
    }
}

impl From<RunNowError> for ApiError {
    fn from(e: RunNowError) -> ApiError {
        ApiError::new(e.kind(), e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.kind.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(json!({ "error": self.message }))).into_response()
    }
}

/// Every route, each registered with its `#[utoipa::path]` (see [`openapi`]).
pub fn router(gw: Services, settings: &Arc<Settings>) -> Router {
    let gw = Arc::new(gw);
    let api = OpenApiRouter::new()
        .routes(routes!(list_agents))
        .routes(routes!(get_agent, forget_agent))
        .routes(routes!(revoke_agent))
        .routes(routes!(agent_checks))
        .routes(routes!(run_now))
        .merge(admin::routes())
        .merge(alerts::routes())
        .merge(events::routes())
        .merge(history::routes())
        .merge(entities::routes())
        .merge(config::routes())
        .layer(middleware::from_fn_with_state(
            gw.clone(),
            access::authenticate,
        ));
    let (router, doc) =
        OpenApiRouter::with_openapi(<openapi::ApiDoc as utoipa::OpenApi>::openapi())
            .routes(routes!(crate::console::page))
            .routes(routes!(healthz))
            .routes(routes!(readyz))
            .routes(routes!(metrics))
            .routes(routes!(upgrade))
            .routes(routes!(openapi::document))
            .nest("/api/v1", api)
            .merge(crate::releases::routes(settings.clone()))
            .merge(crate::releases_manifest::router(settings.clone()))
            .split_for_parts();
    openapi::keep(&doc);
    router
        .layer(middleware::map_response(crate::console::security_headers))
        .with_state(gw)
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "gateway",
    responses((status = 200, description = "`ok`", content_type = "text/plain", body = String)))]
async fn healthz() -> &'static str {
    "ok\n"
}

use openapi::ErrorBody;

/// A JSON request body (none: `{}`), or a 400 that says what is wrong with it. An object
/// only: serde would also read a struct from an array of its fields in order.
pub(crate) fn json_body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let bad = |e: &dyn std::fmt::Display| {
        ApiError::new(ErrorKind::BadRequest, format!("request body: {e}"))
    };
    let bytes = if bytes.is_empty() { b"{}" } else { bytes };
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| bad(&e))?;
    if !value.is_object() {
        return Err(bad(&"a JSON object is expected"));
    }
    serde_json::from_value(value).map_err(|e| bad(&e))
}

/// For a struct field of a request body: an object only (see [`json_body`]).
pub(crate) fn object<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    use serde::de::Error as _;
    let value = <serde_json::Value as serde::Deserialize>::deserialize(d)?;
    if !value.is_object() {
        return Err(D::Error::custom("a JSON object is expected"));
    }
    serde_json::from_value(value).map_err(D::Error::custom)
}

/// [`object`] for an optional field (`null`: none).
pub(crate) fn object_or_null<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    use serde::de::Error as _;
    let value = <serde_json::Value as serde::Deserialize>::deserialize(d)?;
    match value {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::Object(_) => serde_json::from_value(value)
            .map(Some)
            .map_err(D::Error::custom),
        _ => Err(D::Error::custom("a JSON object is expected")),
    }
}

fn error(kind: ErrorKind, message: impl Into<String>) -> Response {
    ApiError::new(kind, message).into_response()
}

/// For load balancers: 200 while this gateway takes agents, 503 (with the reason) while it
/// drains for shutdown or cannot reach its bus, so new connections go elsewhere.
#[utoipa::path(get, path = "/readyz", tag = "gateway", responses(
    (status = 200, description = "`ready`: taking agents", content_type = "text/plain", body = String),
    (status = 503, description = "`not ready: WHY` (draining, or the bus unreachable)", content_type = "text/plain", body = String),
))]
async fn readyz(State(gw): State<Gw>) -> Response {
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

/// Prometheus metrics (series per tenant with the operator's token only).
#[utoipa::path(get, path = "/metrics", tag = "gateway", responses(
    (status = 200, description = "Prometheus text exposition format", content_type = "text/plain", body = String),
))]
async fn metrics(State(gw): State<Gw>, headers: axum::http::HeaderMap) -> impl IntoResponse {
    // Series per tenant only for the operator (tenants' names are the operator's).
    let operator = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| gw.credentials.tenants.is_operator(t.trim()));
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        gw.metrics.render(
            crate::metrics::Gauges {
                agents_connected: gw.hub.connected(),
                unauthenticated: gw.admission.in_use(),
                unauthenticated_limit: gw.admission.limits().global,
            },
            operator,
        ) + &gw.health.render(),
    )
}

/// The agents' endpoint: a TLS websocket with the `outpost.v1` subprotocol
/// (PROTOCOL.md).
#[utoipa::path(get, path = "/ws", tag = "gateway", responses(
    (status = 101, description = "Switching to the websocket"),
    (status = 400, description = "Not a websocket upgrade (text), or without the `outpost.v1` subprotocol (JSON)", content(
        (ErrorBody = "application/json"),
        (String = "text/plain"),
    )),
    (status = 405, description = "Not a GET"),
    (status = 503, description = "The gateway is shutting down", body = ErrorBody),
))]
async fn upgrade(
    State(gw): State<Gw>,
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
            ErrorKind::BadRequest,
            format!("websocket subprotocol {SUBPROTOCOL} is required"),
        );
    }
    if gw.shutdown.is_cancelled() {
        return error(ErrorKind::Unavailable, "gateway is shutting down");
    }
    // The session holds the connection's slot among the unauthenticated ones until the
    // agent's hello is accepted.
    // Counted by the shutdown machinery from now, not from when the upgrade completes
    // (axum runs the callback on a task of its own), so a shutdown meanwhile waits for it.
    let (services, tracked) = (gw.sessions.clone(), gw.tracker.token());
    ws.on_upgrade(move |socket| async move {
        session::run(services, socket, peer, pre_auth).await;
        drop(tracked);
    })
}

#[derive(Serialize, ToSchema)]
struct AgentView {
    fingerprint: String,
    hostname: String,
    os: String,
    arch: String,
    agent_version: String,
    labels: std::collections::BTreeMap<String, String>,
    groups: Vec<String>,
    /// `online`, `lost`, `deregistered` or `revoked`.
    #[schema(value_type = String)]
    presence: &'static str,
    presence_reason: String,
    /// Whether a gateway holds a live connection of the agent.
    connected: bool,
    /// The gateway that holds (or last held) it.
    gateway: String,
    last_seen_ms: u64,
    connected_since_ms: Option<u64>,
    /// Each check's newest status (`ok`, `warning`, `critical`, `unknown`), for overviews
    /// that count check states without asking for every agent's checks.
    #[schema(value_type = std::collections::BTreeMap<String, String>)]
    check_states: std::collections::BTreeMap<String, outpost_protocol::Status>,
}

/// `r` as the API shows it, with its checks' states (`r.latest` when `states` is `None`:
/// records from [`Registry::list`] come without it).
fn view(
    gw: &Services,
    r: &AgentRecord,
    states: Option<std::collections::BTreeMap<String, outpost_protocol::Status>>,
) -> AgentView {
    let agent = AgentRef::new(&r.tenant, &r.fingerprint);
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
        connected: gw.hub.is_connected(&agent)
            || (r.presence == crate::bus::Presence::Online
                && r.connected_since_ms.is_some()
                && r.holder.is_some()
                && !gw
                    .registry
                    .me
                    .holds(r.holder.as_deref().unwrap_or_default())),
        gateway: r.gateway.clone(),
        last_seen_ms: last_seen(gw, r),
        connected_since_ms: r.connected_since_ms,
        check_states: states.unwrap_or_else(|| crate::registry::states_of(r)),
    }
}

/// When the agent was last heard of: its last frame on this gateway; for an agent another
/// gateway holds, that gateway's last heartbeat (it drops silent agents within three
/// heartbeat intervals).
fn last_seen(gw: &Services, r: &AgentRecord) -> u64 {
    let remote = r.presence == crate::bus::Presence::Online
        && r.holder
            .as_deref()
            .is_some_and(|h| !gw.registry.me.holds(h));
    match gw.registry.holder_beat_ms(r) {
        Some(beat) if remote => r.last_seen_ms.max(beat),
        _ => r.last_seen_ms,
    }
}

/// Every agent of the token's tenant (on NATS: of the whole fleet). Role: read.
#[utoipa::path(get, path = "/agents", tag = "agents", security(("bearer" = [])), responses(
    (status = 200, description = "The tenant's agents", body = Vec<AgentView>),
    (status = 401, description = "No valid token", body = ErrorBody),
    (status = 403, description = "The token's role is too low, or it is the operator's", body = ErrorBody),
))]
async fn list_agents(State(gw): State<Gw>, t: Tenant<Read>) -> Json<Vec<AgentView>> {
    let agents = gw.registry.list(&t.name);
    let mut states = gw.registry.check_states(&t.name);
    Json(
        agents
            .iter()
            .map(|r| {
                view(
                    &gw,
                    r,
                    Some(states.remove(&r.fingerprint).unwrap_or_default()),
                )
            })
            .collect(),
    )
}

pub(crate) fn unknown_agent(fp: &str) -> Response {
    ApiError::from(RunNowError::UnknownAgent(fp.to_string())).into_response()
}

/// One agent. Role: read.
#[utoipa::path(get, path = "/agents/{fingerprint}", tag = "agents", security(("bearer" = [])),
    params(("fingerprint" = String, Path, description = "The agent's fingerprint")),
    responses(
        (status = 200, description = "The agent", body = AgentView),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "The token's role is too low", body = ErrorBody),
        (status = 404, description = "No such agent in the tenant", body = ErrorBody),
))]
async fn get_agent(State(gw): State<Gw>, t: Tenant<Read>, Path(fp): Path<String>) -> Response {
    match gw.registry.get(&AgentRef::new(&t.name, &fp)) {
        Some(r) => Json(view(&gw, &r, None)).into_response(),
        None => unknown_agent(&fp),
    }
}

#[derive(Serialize, ToSchema)]
struct Revoked {
    fingerprint: String,
    /// `revoked`.
    #[schema(value_type = String)]
    presence: &'static str,
    revoked_at_ms: u64,
}

/// Revoke an agent: its secret is deleted, its connection (on whichever gateway of the
/// fleet) is closed with 4403, it can never log in or enroll again, and its presence
/// becomes `revoked`. Revoking it again answers the same.
#[utoipa::path(post, path = "/agents/{fingerprint}/revoke", tag = "agents", security(("bearer" = [])),
    description = "Revoke an agent: its secret is deleted, its connection on any gateway closed with 4403, and it can never log in or enroll again. Revoking it again answers the same. Role: admin.",
    params(("fingerprint" = String, Path, description = "The agent's fingerprint")),
    responses(
        (status = 200, description = "Revoked (now or before)", body = Revoked),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "The token's role is too low", body = ErrorBody),
        (status = 404, description = "No such agent in the tenant", body = ErrorBody),
        (status = 503, description = "A store could not be written: retry (revoking is idempotent)", body = ErrorBody),
))]
async fn revoke_agent(State(gw): State<Gw>, t: Tenant<Admin>, Path(fp): Path<String>) -> Response {
    match revoke(&gw, &AgentRef::new(&t.name, &fp)).await {
        Ok(revoked_at_ms) => Json(Revoked {
            fingerprint: fp,
            presence: Presence::Revoked.as_str(),
            revoked_at_ms,
        })
        .into_response(),
        Err(e) => e.into_response(),
    }
}

/// See [`revoke_agent`]: when the agent was revoked (now, or before).
pub(crate) async fn revoke(gw: &Services, agent: &AgentRef) -> Result<u64, ApiError> {
    let fp = &agent.fingerprint;
    let revoked_at_ms = match gw.credentials.revoke(&agent.tenant, fp).await {
        Ok(Some(at)) => at,
        Ok(None) => return Err(RunNowError::UnknownAgent(fp.clone()).into()),
        Err(e) => {
            let why = format!("cannot revoke agent {fp}: {e}; nothing was changed, retry");
            return Err(ApiError::new(ErrorKind::Unavailable, why));
        }
    };
    let reason = "revoked by an administrator";
    let revoked = match gw.registry.revoked(agent, reason).await {
        Ok(r) => r,
        Err(e) => {
            let why = format!("agent {fp}'s credential is revoked (it cannot log in), but its presence could not be recorded: {e:#}; retry to finish");
            return Err(ApiError::new(ErrorKind::Unavailable, why));
        }
    };
    if revoked {
        tracing::warn!(tenant = %agent.tenant, fingerprint = %fp, "agent revoked");
        publish_presence(&*gw.bus, &gw.metrics, agent, Presence::Revoked, reason).await;
    }
    // Here at once; on another gateway of the fleet, when it reads the registry's change.
    gw.hub.revoke(agent);
    Ok(revoked_at_ms)
}

/// Forget a revoked agent (decommissioned, or compromised and done with): its credential
/// and registry record go, and its fingerprint may enroll again. An agent is revoked
/// first, so no connection of it can come back meanwhile.
#[utoipa::path(delete, path = "/agents/{fingerprint}", tag = "agents", security(("bearer" = [])),
    description = "Forget a revoked agent: its credential and record go for good and its fingerprint may enroll again. Role: admin.",
    params(("fingerprint" = String, Path, description = "The agent's fingerprint")),
    responses(
        (status = 204, description = "Forgotten"),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "The token's role is too low", body = ErrorBody),
        (status = 404, description = "No such agent in the tenant", body = ErrorBody),
        (status = 409, description = "The agent is not revoked: revoke it first", body = ErrorBody),
        (status = 503, description = "A store could not be written: retry", body = ErrorBody),
))]
async fn forget_agent(State(gw): State<Gw>, t: Tenant<Admin>, Path(fp): Path<String>) -> Response {
    match forget(&gw, &AgentRef::new(&t.name, &fp)).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
    }
}

/// See [`forget_agent`].
pub(crate) async fn forget(gw: &Services, agent: &AgentRef) -> Result<(), ApiError> {
    let fp = &agent.fingerprint;
    let revoke_first = || {
        let why = format!("agent {fp} is not revoked: revoke it first (POST /api/v1/agents/{fp}/revoke), then forget it");
        ApiError::new(ErrorKind::Conflict, why)
    };
    match gw.credentials.revoked(&agent.tenant, fp).await {
        Err(e) => {
            let why = format!("cannot forget agent {fp}: {e}");
            return Err(ApiError::new(ErrorKind::Unavailable, why));
        }
        Ok(None) if gw.registry.get(agent).is_none() => {
            return Err(RunNowError::UnknownAgent(fp.clone()).into())
        }
        Ok(Some(false)) => return Err(revoke_first()),
        Ok(_) => {}
    }
    // The registry first: should the credential's removal fail, the agent stays revoked
    // (it cannot log in) and a retry finishes.
    match gw.registry.forget(agent).await {
        Ok(true) => {}
        Ok(false) => return Err(revoke_first()),
        Err(e) => {
            let why = format!("cannot forget agent {fp}: {e:#}; nothing was changed, retry");
            return Err(ApiError::new(ErrorKind::Unavailable, why));
        }
    }
    if let Err(e) = gw.credentials.forget(&agent.tenant, fp).await {
        let why = format!("agent {fp} left the registry, but its revoked credential could not be removed: {e}; retry to finish");
        return Err(ApiError::new(ErrorKind::Unavailable, why));
    }
    tracing::info!(tenant = %agent.tenant, fingerprint = %fp, "agent forgotten");
    Ok(())
}

#[derive(Serialize, ToSchema)]
struct CheckView {
    check: String,
    /// Whether the check is in the agent's current configuration.
    configured: bool,
    #[schema(value_type = Option<openapi::CheckSpecDoc>)]
    spec: Option<CheckSpec>,
    #[schema(value_type = Option<openapi::CheckResultDoc>)]
    latest: Option<CheckResult>,
    age_secs: Option<u64>,
}

/// Each check of the agent with its spec, newest result and its age. Role: read.
#[utoipa::path(get, path = "/agents/{fingerprint}/checks", tag = "agents", security(("bearer" = [])),
    params(("fingerprint" = String, Path, description = "The agent's fingerprint")),
    responses(
        (status = 200, description = "The agent's checks, by name", body = Vec<CheckView>),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "The token's role is too low", body = ErrorBody),
        (status = 404, description = "No such agent in the tenant", body = ErrorBody),
))]
async fn agent_checks(State(gw): State<Gw>, t: Tenant<Read>, Path(fp): Path<String>) -> Response {
    let Some(rec) = gw.registry.get(&AgentRef::new(&t.name, &fp)) else {
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

#[utoipa::path(post, path = "/agents/{fingerprint}/checks/{check}/run", tag = "agents", security(("bearer" = [])),
    description = "Run the check now and answer its result (on NATS, through whichever gateway holds the agent). Role: operate.",
    params(
        ("fingerprint" = String, Path, description = "The agent's fingerprint"),
        ("check" = String, Path, description = "The check's name"),
    ),
    responses(
        (status = 200, description = "The fresh result", body = openapi::CheckResultDoc),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "The token's role is too low", body = ErrorBody),
        (status = 404, description = "No such agent or check", body = ErrorBody),
        (status = 409, description = "The agent is not connected", body = ErrorBody),
        (status = 422, description = "The check is a daemon: it reports on its own", body = ErrorBody),
        (status = 429, description = "The agent is busy: retry", body = ErrorBody),
        (status = 502, description = "The agent answered with an error, or disconnected", body = ErrorBody),
        (status = 503, description = "The fleet could not be asked: retry", body = ErrorBody),
        (status = 504, description = "No answer within the check's timeout", body = ErrorBody),
))]
async fn run_now(
    State(gw): State<Gw>,
    t: Tenant<Operate>,
    Path((fp, check)): Path<(String, String)>,
) -> Response {
    match run_check_now(&gw, &AgentRef::new(&t.name, &fp), &check).await {
        Ok(answer) => Json(answer).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// Run `check` on `agent` now, wherever in the fleet it is connected: the fresh result.
pub(crate) async fn run_check_now(
    gw: &Services,
    agent: &AgentRef,
    check: &str,
) -> Result<serde_json::Value, RunNowError> {
    Metrics::inc(&gw.metrics.rpc_calls);
    let fp = &agent.fingerprint;
    let outcome = match &gw.nats {
        Some(nats) if !gw.hub.has(agent) => match gw.registry.get(agent) {
            None => Err(RunNowError::UnknownAgent(fp.clone())),
            Some(_) => crate::nats::rpc::call(nats, &agent.tenant, fp, check).await,
        },
        _ => gw
            .runnow
            .run(agent, check)
            .await
            .map(|r| serde_json::to_value(r).unwrap_or_default()),
    };
    if outcome.is_err() {
        Metrics::inc(&gw.metrics.rpc_failures);
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        a: Option<u64>,
        b: Option<u64>,
    }

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        #[serde(default, deserialize_with = "object")]
        inner: Option<Inner>,
        #[serde(default, deserialize_with = "object_or_null")]
        maybe: Option<Inner>,
    }

    #[test]
    fn request_bodies_are_objects_all_the_way_down() {
        let ok = |b: &str| json_body::<Outer>(b.as_bytes()).map(|_| ());
        assert!(ok("").is_ok(), "no body: {{}}");
        assert!(ok(r#"{"inner": {"a": 1}, "maybe": null}"#).is_ok());
        for bad in [
            "[null, null]",
            r#"{"inner": [1, 2]}"#,
            r#"{"maybe": [1]}"#,
            "3",
            "{",
        ] {
            let e = ok(bad).expect_err(bad);
            assert!(matches!(e.kind, ErrorKind::BadRequest), "{bad}");
            assert!(e.message.starts_with("request body: "), "{}", e.message);
        }
    }
}
