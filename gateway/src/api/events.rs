//! `GET /api/v1/events`: the tenant's event stream as Server-Sent Events (the `read`
//! role). See [`crate::events`] for what it carries and how a client resumes.
//!
//! Query: `types` (`result,presence,alert,silence`; default all), `agent` (fingerprints, comma
//! separated), `check` (a glob), `label` (`key=value`, comma separated: all must match),
//! `problems` (`true`: non-OK results and lost agents only), `heartbeat` (seconds between
//! keep-alive comments, 1 to 300; default 15), and `last_event_id` for clients that
//! cannot set the `Last-Event-ID` header.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use futures_util::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::access::{Read, Tenant};
use super::openapi::ErrorBody;
use super::{ApiError, Gw};
use crate::errors::ErrorKind;
use crate::events::{self, Cursor, Filter, Follow, Item};
use crate::listener::PreAuth;

pub fn routes() -> OpenApiRouter<Gw> {
    OpenApiRouter::new().routes(routes!(stream))
}

const HEARTBEAT: Duration = Duration::from_secs(15);

#[derive(Deserialize, Default, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct Params {
    /// `result,presence,alert,silence` (comma separated; default all).
    types: Option<String>,
    /// Only these agents' events (fingerprints, comma separated).
    agent: Option<String>,
    /// Only checks matching this glob.
    check: Option<String>,
    /// Only agents with these labels (`key=value`, comma separated; all must match).
    label: Option<String>,
    /// Only non-OK results and lost agents.
    problems: Option<bool>,
    /// Seconds between keep-alive comments.
    #[param(minimum = 1, maximum = 300)]
    heartbeat: Option<u64>,
    /// Where to resume, for clients that cannot send `Last-Event-ID`.
    last_event_id: Option<String>,
}

fn bad(message: String) -> ApiError {
    ApiError::new(ErrorKind::BadRequest, message)
}

fn list(s: &Option<String>) -> impl Iterator<Item = &str> {
    s.as_deref()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
}

/// The filter the query asks for.
fn filter(p: &Params) -> Result<Filter, ApiError> {
    let mut f = Filter {
        agents: list(&p.agent).map(str::to_string).collect(),
        check: p.check.clone().filter(|c| !c.is_empty()),
        problems: p.problems.unwrap_or(false),
        ..Filter::default()
    };
    if p.types.is_none() {
        (f.results, f.presence, f.alerts, f.silences) = (true, true, true, true);
    }
    for t in list(&p.types) {
        match t {
            "result" => f.results = true,
            "presence" => f.presence = true,
            "alert" => f.alerts = true,
            "silence" => f.silences = true,
            other => {
                return Err(bad(format!(
                    "unknown event type {other:?} in `types`: use result, presence, alert, silence"
                )))
            }
        }
    }
    if !(f.results || f.presence || f.alerts || f.silences) {
        return Err(bad(
            "`types` names no event type: use result, presence, alert, silence".into(),
        ));
    }
    for l in list(&p.label) {
        let (k, v) = l.split_once('=').ok_or_else(|| {
            bad(format!(
                "label filter {l:?} is not key=value (e.g. label=role=db)"
            ))
        })?;
        f.labels.push((k.to_string(), v.to_string()));
    }
    Ok(f)
}

/// The tenant's events as Server-Sent Events: results, presence, alerts and silences,
/// each with its position on the bus as its id. Role: read.
#[utoipa::path(get, path = "/events", tag = "events", security(("bearer" = [])),
    description = "Resume with `Last-Event-ID` on any gateway of the fleet: no gap, no repeat; a position no longer kept yields a `reset` event. See OPERATIONS.md, Event stream.",
    params(Params, ("Last-Event-ID" = Option<String>, Header, description = "The id of the last event received")),
    responses(
        (status = 200, description = "The stream (`text/event-stream`), until the client leaves, the token is revoked, or the client reads too slowly", content_type = "text/event-stream", body = String),
        (status = 400, description = "A bad filter, heartbeat or event id", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody), (status = 403, description = "The token's role is too low, or it is the operator's", body = ErrorBody),
        (status = 503, description = "The bus cannot be read: retry", body = ErrorBody),
))]
async fn stream(
    State(gw): State<Gw>,
    t: Tenant<Read>,
    pre_auth: Option<Extension<PreAuth>>,
    headers: HeaderMap,
    params: Result<Query<Params>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(p) = match params {
        Ok(p) => p,
        Err(e) => return bad(format!("bad query: {}", e.body_text())).into_response(),
    };
    let filter = match filter(&p) {
        Ok(f) => f,
        Err(e) => return e.into_response(),
    };
    let heartbeat = match p.heartbeat {
        None => HEARTBEAT,
        Some(s @ 1..=300) => Duration::from_secs(s),
        Some(s) => {
            return bad(format!("heartbeat {s} is out of range: 1 to 300 seconds")).into_response()
        }
    };
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or(p.last_event_id.clone())
        .filter(|s| !s.trim().is_empty());
    let from = match last {
        // An id of a release before alert events (`<results>-<presence>`): on from there,
        // and from now on for alerts.
        Some(id) if id.trim().split('-').count() == 2 => match gw.bus.ends(&t.name).await {
            Ok(e) => match Cursor::parse(&format!("{}-{}", id.trim(), e.alerts)) {
                Ok(c) => c,
                Err(e) => return bad(e).into_response(),
            },
            Err(e) => {
                return ApiError::new(
                    ErrorKind::Unavailable,
                    format!("cannot read the bus to start the stream: {e}; retry"),
                )
                .into_response()
            }
        },
        Some(id) => match Cursor::parse(&id) {
            Ok(c) => c,
            Err(e) => return bad(e).into_response(),
        },
        // From now on.
        None => match gw.bus.ends(&t.name).await {
            Ok(e) => Cursor::from_ends(e),
            Err(e) => {
                return ApiError::new(
                    ErrorKind::Unavailable,
                    format!("cannot read the bus to start the stream: {e}; retry"),
                )
                .into_response()
            }
        },
    };
    // Asked again while the stream runs: a token revoked, or a tenant disabled, deleted
    // or made again under its name, ends it.
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .trim()
        .to_string();
    let tenant_id = gw.credentials.tenants.tenant(&t.name).map(|x| x.id);
    // A tenant deleted and made again under its name is another tenant: its streams
    // share no window with the old one's.
    let window = format!("{}#{}", t.name, tenant_id.as_deref().unwrap_or("-"));
    let (credentials, name) = (gw.credentials.clone(), t.name.clone());
    let allowed = move || -> Result<(), String> {
        let tenants = &credentials.tenants;
        match tenants.authenticate(&token) {
            Ok(crate::tenants::Caller::Tenant { tenant, .. })
                if tenant == name && tenants.tenant(&name).map(|x| x.id) == tenant_id =>
            {
                Ok(())
            }
            Ok(_) => Err("the stream's tenant was deleted".to_string()),
            Err(refusal) => Err(format!("no longer allowed: {refusal}")),
        }
    };
    // The connection is authenticated: it no longer holds a place among those that are not.
    if let Some(Extension(pre_auth)) = pre_auth {
        pre_auth.release();
    }
    let rx = events::follow(Follow {
        bus: gw.bus.clone(),
        registry: gw.registry.clone(),
        tenant: t.name.clone(),
        from,
        filter,
        limits: gw.events,
        stop: gw.shutdown.clone(),
        metrics: gw.metrics.clone(),
        allowed: Box::new(allowed),
        tails: gw.event_tails.clone(),
        window,
    });
    Sse::new(sse(from, rx))
        .keep_alive(KeepAlive::new().interval(heartbeat))
        .into_response()
}

/// The SSE events: `hello` first (its id the place the stream starts from, so a client
/// cut off before any event can resume), then the stream's; an `error` event last when
/// the gateway ended the stream for a reason.
fn sse(
    from: Cursor,
    rx: tokio::sync::mpsc::Receiver<Item>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let hello = Event::default()
        .id(from.id())
        .event("hello")
        .data(json!({ "from": from.id() }).to_string());
    let rest = futures_util::stream::unfold(Some(rx), |rx| async move {
        let mut rx = rx?;
        match rx.recv().await? {
            Item::Event { id, kind, data } => {
                Some((Ok(Event::default().id(id).event(kind).data(data)), Some(rx)))
            }
            Item::End { reason } => Some((
                Ok(Event::default()
                    .event("error")
                    .data(json!({ "error": reason }).to_string())),
                None,
            )),
        }
    });
    futures_util::stream::once(async move { Ok(hello) }).chain(rest)
}
