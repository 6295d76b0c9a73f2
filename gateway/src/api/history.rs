//! The history of one check: `GET /api/v1/agents/{fingerprint}/checks/{check}/history`
//! (role `read`), its results over a time range from the bus, oldest first, with each
//! metric as a series, for the console's charts and `outpost history`.
//!
//! The range is `since` (a duration back from now: `90m`, `24h`, `7d`; 24 hours when
//! nothing is given) or `from`/`to` (Unix milliseconds, `to` defaulting to now), over the
//! time each run started. `limit` (1 to 100,000, default 10,000) keeps the newest
//! results of the range; `truncated` says older ones were left out. `results=false`
//! answers the series and the states only (what a chart needs, a fraction of the bytes).
//! How the bus finds one check's results cheaply: [`crate::bus::Bus::read_history`].

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use outpost_protocol::{CheckResult, Status};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::access::{Read, Tenant};
use super::openapi::ErrorBody;
use super::{ApiError, Gw};
use crate::bus::{AgentRef, HistoryQuery};
use crate::errors::ErrorKind;
use crate::util::now_ms;

pub fn routes() -> OpenApiRouter<Gw> {
    OpenApiRouter::new().routes(routes!(history))
}

/// The range when none is given.
const DEFAULT_SPAN_MS: u64 = 24 * 3600 * 1000;
pub const DEFAULT_LIMIT: usize = 10_000;
pub const MAX_LIMIT: usize = 100_000;

#[derive(Deserialize, Default, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct Params {
    /// A duration back from now (`90m`, `24h`, `7d`); not with `from`/`to`.
    since: Option<String>,
    /// Unix ms (default: a day before `to`).
    #[param(maximum = 253402300799999_u64)]
    from: Option<u64>,
    /// Unix ms (default: now).
    #[param(maximum = 253402300799999_u64)]
    to: Option<u64>,
    /// The newest this many results of the range.
    #[param(minimum = 1, maximum = 100000)]
    limit: Option<usize>,
    /// `false`: the series and states only.
    results: Option<bool>,
}

/// One metric over the range: `[started_at_ms, value]` per result that reported it.
#[derive(Serialize, Deserialize, Debug, PartialEq, ToSchema)]
pub struct Series {
    pub metric: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// `[started_at_ms, value]` per result that reported the metric.
    #[schema(value_type = Vec<Vec<f64>>)]
    pub points: Vec<(u64, f64)>,
}

#[derive(Serialize, ToSchema)]
struct Answer {
    fingerprint: String,
    check: String,
    from_ms: u64,
    to_ms: u64,
    limit: usize,
    /// Older results of the range were left out for the limit.
    truncated: bool,
    count: usize,
    /// `[started_at_ms, status]` per result.
    #[schema(value_type = Vec<Vec<serde_json::Value>>)]
    states: Vec<(u64, Status)>,
    series: Vec<Series>,
    /// The results, in the order the agent made them (left out with `results=false`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<super::openapi::CheckResultDoc>>)]
    results: Option<Vec<CheckResult>>,
}

fn bad(message: String) -> ApiError {
    ApiError::new(ErrorKind::BadRequest, message)
}

/// The range and limit `p` asks for, at `now`.
fn query(p: &Params, now: u64) -> Result<HistoryQuery, ApiError> {
    // `since=` with nothing: as if not given.
    let since = p.since.as_deref().map(str::trim).filter(|s| !s.is_empty());
    let (from_ms, to_ms) =
        match (since, p.from, p.to) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => return Err(bad(
                "give either `since` (a duration back from now) or `from`/`to` (Unix ms), not both"
                    .into(),
            )),
            (Some(since), None, None) => {
                let span = humantime::parse_duration(since).map_err(|e| {
                    bad(format!(
                        "`since` {since:?} is not a duration ({e}): e.g. 90m, 24h, 7d"
                    ))
                })?;
                let span = u64::try_from(span.as_millis()).unwrap_or(u64::MAX);
                (now.saturating_sub(span), now)
            }
            (None, from, to) => {
                let to = to.unwrap_or(now);
                (from.unwrap_or(to.saturating_sub(DEFAULT_SPAN_MS)), to)
            }
        };
    // 9999-12-31T23:59:59.999Z: times beyond are no one's run start.
    const LAST_MS: u64 = 253_402_300_799_999;
    if from_ms > LAST_MS || to_ms > LAST_MS {
        return Err(bad(format!(
            "`from` and `to` are Unix milliseconds up to {LAST_MS} (the year 9999)"
        )));
    }
    if from_ms > to_ms {
        return Err(bad(format!(
            "`from` ({from_ms}) is after `to` ({to_ms}): the range is empty"
        )));
    }
    let limit = match p.limit {
        None => DEFAULT_LIMIT,
        Some(l @ 1..=MAX_LIMIT) => l,
        Some(l) => return Err(bad(format!("limit {l} is out of range: 1 to {MAX_LIMIT}"))),
    };
    Ok(HistoryQuery {
        from_ms,
        to_ms,
        limit,
    })
}

/// Each metric's points, in the order of `results`, metrics by name.
pub fn series(results: &[CheckResult]) -> Vec<Series> {
    let mut by_name: BTreeMap<&str, Series> = BTreeMap::new();
    for r in results {
        for m in &r.metrics {
            let s = by_name.entry(&m.name).or_insert_with(|| Series {
                metric: m.name.clone(),
                unit: None,
                points: Vec::new(),
            });
            if m.unit.is_some() {
                s.unit.clone_from(&m.unit);
            }
            if m.value.is_finite() {
                s.points.push((r.started_at_ms, m.value));
            }
        }
    }
    by_name.into_values().collect()
}

/// A check's results over a time range, oldest first, and each metric as a series.
/// Role: read.
#[utoipa::path(get, path = "/agents/{fingerprint}/checks/{check}/history", tag = "agents", security(("bearer" = [])),
    params(
        ("fingerprint" = String, Path, description = "The agent's fingerprint"),
        ("check" = String, Path, description = "The check's name"),
        Params,
    ),
    responses(
        (status = 200, description = "The history", body = Answer),
        (status = 400, description = "A bad range, limit or check name", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody), (status = 403, description = "The token's role is too low, or it is the operator's", body = ErrorBody),
        (status = 404, description = "No such agent in the tenant", body = ErrorBody),
        (status = 503, description = "The bus cannot be read: retry", body = ErrorBody),
))]
async fn history(
    State(gw): State<Gw>,
    t: Tenant<Read>,
    Path((fp, check)): Path<(String, String)>,
    params: Result<Query<Params>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(p) = match params {
        Ok(p) => p,
        Err(e) => return bad(format!("bad query: {}", e.body_text())).into_response(),
    };
    let q = match query(&p, now_ms()) {
        Ok(q) => q,
        Err(e) => return e.into_response(),
    };
    if !outpost_protocol::valid_check_name(&check) {
        return bad(format!(
            "{check:?} is not a check name: 1 to 64 of A-Z a-z 0-9 _ . -"
        ))
        .into_response();
    }
    let agent = AgentRef::new(&t.name, &fp);
    if gw.registry.get(&agent).is_none() {
        return super::unknown_agent(&fp);
    }
    let found = match gw.bus.read_history(&agent, &check, q).await {
        Ok(h) => h,
        Err(e) => {
            return ApiError::new(
                ErrorKind::Unavailable,
                format!("cannot read the history from the bus: {e}; retry"),
            )
            .into_response()
        }
    };
    Json(Answer {
        fingerprint: fp,
        check,
        from_ms: q.from_ms,
        to_ms: q.to_ms,
        limit: q.limit,
        truncated: found.truncated,
        count: found.results.len(),
        states: found
            .results
            .iter()
            .map(|r| (r.started_at_ms, r.status))
            .collect(),
        series: series(&found.results),
        results: p.results.unwrap_or(true).then_some(found.results),
    })
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_read_from_since_or_from_and_to_and_bad_ones_say_why() {
        let now = 1_000_000_000_000;
        let q = query(&Params::default(), now).unwrap();
        assert_eq!(
            (q.from_ms, q.to_ms, q.limit),
            (now - DEFAULT_SPAN_MS, now, DEFAULT_LIMIT)
        );
        let p = Params {
            since: Some("90m".into()),
            limit: Some(5),
            ..Params::default()
        };
        let q = query(&p, now).unwrap();
        assert_eq!((q.from_ms, q.to_ms, q.limit), (now - 90 * 60_000, now, 5));
        let p = Params {
            from: Some(10),
            to: Some(20),
            ..Params::default()
        };
        let q = query(&p, now).unwrap();
        assert_eq!((q.from_ms, q.to_ms), (10, 20));
        for (p, says) in [
            (
                Params {
                    since: Some("1h".into()),
                    from: Some(1),
                    ..Params::default()
                },
                "not both",
            ),
            (
                Params {
                    since: Some("yesterday".into()),
                    ..Params::default()
                },
                "not a duration",
            ),
            (
                Params {
                    from: Some(30),
                    to: Some(20),
                    ..Params::default()
                },
                "after `to`",
            ),
            (
                Params {
                    from: Some(300_000_000_000_000),
                    to: Some(300_000_000_000_001),
                    ..Params::default()
                },
                "the year 9999",
            ),
            (
                Params {
                    limit: Some(0),
                    ..Params::default()
                },
                "out of range",
            ),
            (
                Params {
                    limit: Some(MAX_LIMIT + 1),
                    ..Params::default()
                },
                "out of range",
            ),
        ] {
            let e = query(&p, now).expect_err(says);
            assert!(e.message.contains(says), "{}", e.message);
        }
    }
}
