//! The alerting API of a tenant: its alerts (firing, pending, silenced, acknowledged, and
//! why), its silences, acknowledgements. Reading needs the `read` role; silencing and
//! acknowledging need `operate`. Each call is answered by the tenant's evaluator, and a
//! change is saved before it is answered.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::access::{Operate, Read, Tenant};
use super::openapi::ErrorBody;
use super::{ApiError, Gw};
use crate::alerting::{AskError, Command};
use crate::alerts::silence::{Matchers, Silence};
use crate::alerts::Ack;
use crate::errors::ErrorKind;
use crate::util::now_ms;

pub fn routes() -> OpenApiRouter<Gw> {
    OpenApiRouter::new()
        .routes(routes!(list_alerts))
        .routes(routes!(ack))
        .routes(routes!(list_silences, add_silence))
        .routes(routes!(expire_silence))
}

/// `GET /alerts`, for the document.
#[derive(ToSchema)]
#[allow(dead_code)]
struct AlertsAnswer {
    /// Whether the tenant has alerting (receivers and routes).
    alerting: bool,
    /// The alerts that are not OK: state, why, acknowledgement, silences (ALERTING.md).
    alerts: Vec<crate::alerting::AlertView>,
}

/// `GET /silences`, for the document.
#[derive(ToSchema)]
#[allow(dead_code)]
struct SilencesAnswer {
    silences: Vec<Silence>,
}

/// `POST /alerts/{fingerprint}/{check}/ack`, for the document.
#[derive(ToSchema)]
#[allow(dead_code)]
struct Acknowledged {
    fingerprint: String,
    check: String,
    acknowledged: Ack,
}

/// The longest a silence or an acknowledgement may be set for at once (a silence can be
/// open-ended instead; then `silence_max_age` reports it).
const MAX_SPAN_MS: u64 = 366 * 24 * 3600 * 1000;

/// The longest creator, comment or name, in bytes.
const MAX_TEXT: usize = 1000;

/// `e` as the API answers it for `tenant`: 404 when alerting runs nowhere for it, 503
/// (retry) while it is busy or being taken over.
fn ask_error(gw: &Gw, tenant: &str, e: AskError) -> ApiError {
    if !configured(gw, tenant, &e) {
        return ApiError::new(ErrorKind::NotFound, AskError::NotRunning.to_string());
    }
    ApiError::new(ErrorKind::Unavailable, e.to_string())
}

/// Whether `tenant` has alerting, given that asking it failed with `e`: not when it runs
/// nowhere (here, or in a fleet with no holder, because the tenant declares no receivers
/// and routes).
fn configured(gw: &Gw, tenant: &str, e: &AskError) -> bool {
    match e {
        AskError::NotRunning => false,
        AskError::NoHolder => {
            let alerting = gw.sessions.checks.of(tenant).current().alerting.clone();
            !(alerting.receivers.is_empty() && alerting.routes.is_empty())
        }
        AskError::Busy => true,
    }
}

use super::json_body as body;

/// An RFC 3339 time, or a duration from now (`"90m"`), as milliseconds.
fn when(field: &str, value: &str, from_ms: u64) -> Result<u64, ApiError> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(value) {
        return u64::try_from(t.timestamp_millis())
            .map_err(|_| ApiError::new(ErrorKind::BadRequest, format!("{field} is before 1970")));
    }
    outpost_protocol::checkfile::duration_value(field, &toml::Value::String(value.to_string()))
        .map(|secs| from_ms + secs * 1000)
        .map_err(|e| {
            ApiError::new(
                ErrorKind::BadRequest,
                format!("{e} (or give an RFC 3339 time such as 2026-12-24T08:00:00Z)"),
            )
        })
}

/// The tenant's alerts that are not OK. Role: read.
#[utoipa::path(get, path = "/alerts", tag = "alerting", security(("bearer" = [])), responses(
    (status = 200, description = "The alerts", body = AlertsAnswer),
    (status = 401, description = "No valid token", body = ErrorBody), (status = 403, description = "The token's role is too low, or it is the operator's", body = ErrorBody),
    (status = 503, description = "Alerting is busy or being taken over: retry", body = ErrorBody),
))]
async fn list_alerts(State(gw): State<Gw>, t: Tenant<Read>) -> Response {
    match gw.alerting.ask(&t.name, Command::List).await {
        Ok(view) => Json(json!({ "alerting": true, "alerts": view.alerts })).into_response(),
        Err(e) if !configured(&gw, &t.name, &e) => {
            Json(json!({ "alerting": false, "alerts": [], "silences": [] })).into_response()
        }
        Err(e) => ask_error(&gw, &t.name, e).into_response(),
    }
}

/// The tenant's silences. Role: read.
#[utoipa::path(get, path = "/silences", tag = "alerting", security(("bearer" = [])), responses(
    (status = 200, description = "The silences", body = SilencesAnswer),
    (status = 401, description = "No valid token", body = ErrorBody), (status = 403, description = "The token's role is too low, or it is the operator's", body = ErrorBody),
    (status = 503, description = "Alerting is busy or being taken over: retry", body = ErrorBody),
))]
async fn list_silences(State(gw): State<Gw>, t: Tenant<Read>) -> Response {
    match gw.alerting.ask(&t.name, Command::List).await {
        Ok(view) => Json(json!({ "silences": view.silences })).into_response(),
        Err(e) if !configured(&gw, &t.name, &e) => Json(json!({ "silences": [] })).into_response(),
        Err(e) => ask_error(&gw, &t.name, e).into_response(),
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct NewSilence {
    /// At least one of agent, labels, checks.
    #[serde(default, deserialize_with = "super::object")]
    matchers: Matchers,
    /// RFC 3339; default now.
    starts_at: Option<String>,
    /// RFC 3339 or a duration from the start (`"2h"`); none: until expired.
    ends_at: Option<String>,
    #[serde(default)]
    expire_on_resolve: bool,
    #[serde(default)]
    permanent: bool,
    /// Who silences.
    #[schema(max_length = 1000, pattern = "\\S")]
    creator: String,
    /// Why.
    #[schema(max_length = 1000, pattern = "\\S")]
    comment: String,
}

/// Silence alerts matching all of the matchers. Role: operate.
#[utoipa::path(post, path = "/silences", tag = "alerting", security(("bearer" = [])),
    request_body = NewSilence,
    responses(
        (status = 201, description = "Made", body = Silence),
        (status = 400, description = "A bad body: no matchers, a bad time, text too long", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody), (status = 403, description = "The token's role is too low, or it is the operator's", body = ErrorBody),
        (status = 404, description = "The tenant has no alerting", body = ErrorBody),
        (status = 409, description = "Too many silences: expire some first", body = ErrorBody),
        (status = 503, description = "Alerting is busy or being taken over: retry", body = ErrorBody),
))]
async fn add_silence(State(gw): State<Gw>, t: Tenant<Operate>, bytes: Bytes) -> Response {
    let made = async {
        let n: NewSilence = body(&bytes)?;
        let now = now_ms();
        let bad = |m: &str| ApiError::new(ErrorKind::BadRequest, m.to_string());
        if n.creator.trim().is_empty() || n.comment.trim().is_empty() {
            return Err(bad("say who silences (creator) and why (comment)"));
        }
        if n.creator.len() > MAX_TEXT || n.comment.len() > MAX_TEXT {
            return Err(bad("creator and comment: at most 1000 bytes each"));
        }
        if n.matchers
            .agent
            .as_deref()
            .is_some_and(|a| a.trim().is_empty())
        {
            return Err(bad(
                "matchers.agent is empty: give a fingerprint or hostname, or leave it out",
            ));
        }
        if n.matchers.checks.len() > 100 || n.matchers.labels.len() > 100 {
            return Err(bad(
                "at most 100 check patterns and 100 labels in a silence",
            ));
        }
        if n.matchers.is_empty() {
            return Err(bad("a silence needs matchers (agent, labels or checks): this one would silence everything; use checks = [\"*\"] if that is meant"));
        }
        for g in &n.matchers.checks {
            if g.is_empty() {
                return Err(bad("an empty check pattern matches nothing"));
            }
        }
        let starts_ms = match &n.starts_at {
            Some(s) => when("starts_at", s, now)?,
            None => now,
        };
        let ends_ms = match &n.ends_at {
            Some(e) => Some(when("ends_at", e, starts_ms)?),
            None => None,
        };
        if let Some(end) = ends_ms {
            if end <= starts_ms || end <= now {
                return Err(bad("ends_at must be after starts_at and in the future"));
            }
            if end - starts_ms > MAX_SPAN_MS {
                return Err(bad("a silence is set for at most a year at once; leave ends_at out for one until expired"));
            }
        }
        let silence = Silence {
            id: uuid_like(),
            matchers: n.matchers,
            starts_ms,
            ends_ms,
            expire_on_resolve: n.expire_on_resolve,
            permanent: n.permanent,
            creator: n.creator,
            comment: n.comment,
            created_ms: now,
            silenced_any: false,
            reminded: false,
        };
        gw.alerting
            .ask(&t.name, |reply| Command::AddSilence(silence, reply))
            .await
            .map_err(|e| ask_error(&gw, &t.name, e))?
            .map_err(|e| {
                let kind = if e.contains("silences: expire some first") {
                    ErrorKind::Conflict
                } else {
                    ErrorKind::Unavailable
                };
                ApiError::new(kind, e)
            })
    };
    match made.await {
        Ok(s) => (StatusCode::CREATED, Json(s)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// End a silence now. Role: operate.
#[utoipa::path(delete, path = "/silences/{id}", tag = "alerting", security(("bearer" = [])),
    params(("id" = String, Path, description = "The silence's id")),
    responses(
        (status = 200, description = "Expired", body = Silence),
        (status = 401, description = "No valid token", body = ErrorBody), (status = 403, description = "The token's role is too low, or it is the operator's", body = ErrorBody),
        (status = 404, description = "No such silence, or the tenant has no alerting", body = ErrorBody),
        (status = 503, description = "Alerting is busy or being taken over: retry", body = ErrorBody),
))]
async fn expire_silence(
    State(gw): State<Gw>,
    t: Tenant<Operate>,
    Path(id): Path<String>,
) -> Response {
    match gw
        .alerting
        .ask(&t.name, |reply| Command::ExpireSilence(id, reply))
        .await
    {
        Ok(Ok(s)) => Json(s).into_response(),
        Ok(Err(e)) if e.starts_with("no silence") => {
            ApiError::new(ErrorKind::NotFound, e).into_response()
        }
        Ok(Err(e)) => ApiError::new(ErrorKind::Unavailable, e).into_response(),
        Err(e) => ask_error(&gw, &t.name, e).into_response(),
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct NewAck {
    /// Who acknowledges.
    #[schema(max_length = 1000, pattern = "\\S")]
    by: String,
    #[serde(default)]
    #[schema(max_length = 1000)]
    comment: String,
    /// A duration (`"4h"`) or an RFC 3339 time; none: until the alert resolves.
    until: Option<String>,
}

/// Acknowledge an alert: no repeats until it resolves or `until` passes. Role: operate.
#[utoipa::path(post, path = "/alerts/{fingerprint}/{check}/ack", tag = "alerting", security(("bearer" = [])),
    params(
        ("fingerprint" = String, Path, description = "The agent's fingerprint"),
        ("check" = String, Path, description = "The check's name"),
    ),
    request_body = NewAck,
    responses(
        (status = 200, description = "Acknowledged", body = Acknowledged),
        (status = 400, description = "A bad body or time", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody), (status = 403, description = "The token's role is too low, or it is the operator's", body = ErrorBody),
        (status = 404, description = "No alert to acknowledge, or the tenant has no alerting", body = ErrorBody),
        (status = 503, description = "Alerting is busy or being taken over: retry", body = ErrorBody),
))]
async fn ack(
    State(gw): State<Gw>,
    t: Tenant<Operate>,
    Path((fingerprint, check)): Path<(String, String)>,
    bytes: Bytes,
) -> Response {
    let done = async {
        let n: NewAck = body(&bytes)?;
        if n.by.len() > MAX_TEXT || n.comment.len() > MAX_TEXT {
            return Err(ApiError::new(
                ErrorKind::BadRequest,
                "by and comment: at most 1000 bytes each",
            ));
        }
        if n.by.trim().is_empty() {
            return Err(ApiError::new(
                ErrorKind::BadRequest,
                "say who acknowledges (by)",
            ));
        }
        let now = now_ms();
        let until_ms = match &n.until {
            Some(u) => {
                let until = when("until", u, now)?;
                if until <= now || until - now > MAX_SPAN_MS {
                    return Err(ApiError::new(
                        ErrorKind::BadRequest,
                        "until must be in the future, within a year",
                    ));
                }
                Some(until)
            }
            None => None,
        };
        let ack = Ack {
            by: n.by,
            comment: n.comment,
            at_ms: now,
            until_ms,
        };
        let (fp, chk) = (fingerprint.clone(), check.clone());
        gw.alerting
            .ask(&t.name, |reply| Command::Ack {
                fingerprint: fp,
                check: chk,
                ack: ack.clone(),
                reply,
            })
            .await
            .map_err(|e| ask_error(&gw, &t.name, e))?
            .map_err(|e| {
                let kind = if e.contains("nothing to acknowledge") {
                    ErrorKind::NotFound
                } else {
                    ErrorKind::Unavailable
                };
                ApiError::new(kind, e)
            })?;
        Ok(ack)
    };
    match done.await {
        Ok(ack) => Json(json!({ "fingerprint": fingerprint, "check": check, "acknowledged": ack }))
            .into_response(),
        Err(e) => e.into_response(),
    }
}

/// A random id for a silence.
fn uuid_like() -> String {
    crate::util::random_token(12)
}
