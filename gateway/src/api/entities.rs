//! Proxy entities: `GET /api/v1/entities` (role `read`), the tenant's `[[entity]]`
//! declarations with each check about them: where it is placed now, the newest result of
//! each agent that ran it (its vantage points), and the entity's state by it (the newest
//! result's for `round_robin`; for `all`, what a quorum of vantage points agrees on).

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use outpost_protocol::checkfile::PlacementMode;
use outpost_protocol::Status;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::access::{Operate, Read, Tenant};
use super::openapi::{CheckResultDoc, ErrorBody};
use super::{ApiError, Gw};
use crate::bus::AgentRef;
use crate::checks::placement::{severity, verdict};
use crate::errors::ErrorKind;

pub fn routes() -> OpenApiRouter<Gw> {
    OpenApiRouter::new()
        .routes(routes!(list_entities))
        .routes(routes!(run_entity_check))
}

#[derive(Serialize, ToSchema)]
struct EntityView {
    name: String,
    address: String,
    labels: BTreeMap<String, String>,
    /// The worst state among its checks (`ok` with no check or no result yet).
    #[schema(value_type = String)]
    status: Status,
    checks: Vec<EntityCheck>,
}

#[derive(Serialize, ToSchema)]
struct EntityCheck {
    check: String,
    /// `round_robin` or `all`.
    mode: String,
    /// With `all`: the vantage points that must agree on a problem.
    quorum: Option<u32>,
    /// Agents whose label of this name must be the entity's.
    same_label: Option<String>,
    /// The agents it is placed on now (none while no allowed agent is online).
    placed_on: Vec<String>,
    /// `same_label` found none of the entity's agents online: placed on any allowed one.
    fallen_back: bool,
    /// The entity's state by this check; absent before any result.
    #[schema(value_type = Option<String>)]
    status: Option<Status>,
    /// Why: which vantage points saw what (`all`), or which agent ran it last.
    summary: String,
    /// The newest result of each agent that ran it, newest first.
    vantage_points: Vec<VantagePoint>,
}

#[derive(Serialize, ToSchema)]
struct VantagePoint {
    agent: String,
    hostname: String,
    /// Whether the check is placed on this agent now.
    placed: bool,
    #[schema(value_type = String)]
    status: Status,
    output: String,
    started_at_ms: u64,
}

/// The tenant's proxy entities and the checks about them. On a NATS fleet the vantage
/// points' results are read from the tenant's results stream (every gateway's agents),
/// the newest of each check's subjects. Role: read.
#[utoipa::path(get, path = "/entities", tag = "agents", security(("bearer" = [])), responses(
    (status = 200, description = "The tenant's proxy entities", body = Vec<EntityView>),
    (status = 401, description = "No valid token", body = ErrorBody),
    (status = 403, description = "The token's role is too low, or it is the operator's", body = ErrorBody),
    (status = 503, description = "The fleet's results could not be read (NATS): retry", body = ErrorBody),
))]
async fn list_entities(State(gw): State<Gw>, t: Tenant<Read>) -> Response {
    let store = gw.sessions.checks.of(&t.name);
    let (catalog, placed) = (store.current(), store.placed());
    let about: std::collections::HashSet<&str> = catalog
        .checks
        .iter()
        .filter(|c| c.placement.is_some())
        .map(|c| c.spec.name.as_str())
        .collect();
    let wanted: Vec<String> = about.iter().map(|c| c.to_string()).collect();
    let mut latest = match gw.bus.latest_results(&t.name, &wanted).await {
        // Every gateway's agents' (a fleet): named from the shared registry.
        Ok(Some(read)) => {
            let mut by_check: std::collections::HashMap<String, Vec<_>> = Default::default();
            for (agent, r) in read {
                let hostname = gw
                    .registry
                    .identity(&agent)
                    .map(|i| i.hostname)
                    .unwrap_or_default();
                by_check
                    .entry(r.check.clone())
                    .or_default()
                    .push((agent.fingerprint, hostname, r));
            }
            by_check
        }
        Ok(None) => gw.registry.latest_of(&t.name, &about),
        Err(e) => {
            let why = format!("cannot read the vantage points' results: {e}; retry");
            return ApiError::new(ErrorKind::Unavailable, why).into_response();
        }
    };
    let now = crate::util::now_ms();
    let views = catalog
        .entities
        .iter()
        .map(|e| {
            let checks: Vec<EntityCheck> = catalog
                .checks
                .iter()
                .filter(|c| c.spec.entity.as_deref() == Some(e.name.as_str()))
                .filter_map(|c| {
                    let placement = c.placement.as_ref()?;
                    let placed_on = placed
                        .runners
                        .get(&c.spec.name)
                        .cloned()
                        .unwrap_or_default();
                    let mut vantage: Vec<VantagePoint> = latest
                        .remove(&c.spec.name)
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(agent, hostname, r)| VantagePoint {
                            placed: placed_on.contains(&agent),
                            agent,
                            hostname,
                            status: r.status,
                            output: r.output,
                            started_at_ms: r.started_at_ms,
                        })
                        .collect();
                    vantage.sort_by_key(|v| std::cmp::Reverse(v.started_at_ms));
                    // A result older than two intervals and a timeout says nothing
                    // about now.
                    let fresh_ms = (2 * c.spec.interval_secs + c.spec.timeout_secs) * 1000;
                    let fresh = |v: &VantagePoint| now.saturating_sub(v.started_at_ms) <= fresh_ms;
                    let (status, summary) = if vantage.is_empty() {
                        (None, "no result yet".to_string())
                    } else if placed_on.is_empty() {
                        (
                            Some(Status::Unknown),
                            "placed on no agent: none it may run on is connected".to_string(),
                        )
                    } else {
                        match placement.mode {
                            PlacementMode::RoundRobin => {
                                let v = &vantage[0];
                                if fresh(v) {
                                    (
                                        Some(v.status),
                                        format!("last run by {} ({})", v.hostname, v.agent),
                                    )
                                } else {
                                    (
                                        Some(Status::Unknown),
                                        format!(
                                            "no result for {} s (last by {})",
                                            now.saturating_sub(v.started_at_ms) / 1000,
                                            v.hostname
                                        ),
                                    )
                                }
                            }
                            PlacementMode::All => {
                                // The vantage points it is placed on now, by their newest
                                // (fresh) result.
                                let seen: Vec<(String, Status)> = vantage
                                    .iter()
                                    .filter(|v| v.placed && fresh(v))
                                    .map(|v| (v.agent.clone(), v.status))
                                    .collect();
                                let (s, why) = verdict(placement.quorum.unwrap_or(1), &seen);
                                (Some(s), why)
                            }
                        }
                    };
                    Some(EntityCheck {
                        check: c.spec.name.clone(),
                        mode: match placement.mode {
                            PlacementMode::RoundRobin => "round_robin",
                            PlacementMode::All => "all",
                        }
                        .into(),
                        quorum: placement.quorum,
                        same_label: placement.same_label.clone(),
                        fallen_back: placed.fallen_back.contains(&c.spec.name),
                        placed_on,
                        status,
                        summary,
                        vantage_points: vantage,
                    })
                })
                .collect();
            let status = checks
                .iter()
                .filter_map(|c| c.status)
                .max_by_key(|s| severity(*s))
                .unwrap_or(Status::Ok);
            EntityView {
                name: e.name.clone(),
                address: e.address.clone(),
                labels: e.labels.clone(),
                status,
                checks,
            }
        })
        .collect::<Vec<_>>();
    Json(views).into_response()
}

#[derive(Serialize, ToSchema)]
struct EntityRun {
    entity: String,
    check: String,
    /// One per agent the check is placed on (one for `round_robin`, every vantage point
    /// for `all`).
    runs: Vec<VantageRun>,
}

#[derive(Serialize, ToSchema)]
struct VantageRun {
    agent: String,
    /// The fresh result, when the agent ran it.
    #[schema(value_type = Option<CheckResultDoc>)]
    result: Option<serde_json::Value>,
    /// Why it did not, otherwise.
    error: Option<String>,
}

/// Run a check about an entity now, on the agents it is placed on (one for
/// `round_robin`, each vantage point for `all`, at once): their fresh results. Role:
/// operate.
#[utoipa::path(post, path = "/entities/{name}/checks/{check}/run", tag = "agents", security(("bearer" = [])),
    params(
        ("name" = String, Path, description = "The entity's name"),
        ("check" = String, Path, description = "A check about it"),
    ),
    responses(
        (status = 200, description = "The fresh results, one per agent it is placed on (an agent that failed says why)", body = EntityRun),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "The token's role is too low", body = ErrorBody),
        (status = 404, description = "No such entity, or no such check about it", body = ErrorBody),
        (status = 409, description = "No agent it may run on is connected", body = ErrorBody),
        (status = 429, description = "The agent is busy: retry", body = ErrorBody),
        (status = 502, description = "The agent answered with an error, or disconnected", body = ErrorBody),
        (status = 503, description = "The fleet could not be asked: retry", body = ErrorBody),
        (status = 504, description = "No answer within the check's timeout", body = ErrorBody),
))]
async fn run_entity_check(
    State(gw): State<Gw>,
    t: Tenant<Operate>,
    Path((name, check)): Path<(String, String)>,
) -> Response {
    let store = gw.sessions.checks.of(&t.name);
    let catalog = store.current();
    if catalog.entity(&name).is_none() {
        return ApiError::new(
            ErrorKind::NotFound,
            format!("no entity {name:?} is declared"),
        )
        .into_response();
    }
    if !catalog
        .checks
        .iter()
        .any(|c| c.spec.name == check && c.spec.entity.as_deref() == Some(name.as_str()))
    {
        return ApiError::new(
            ErrorKind::NotFound,
            format!("no check {check:?} is about entity {name:?}"),
        )
        .into_response();
    }
    let runners = store
        .placed()
        .runners
        .get(&check)
        .cloned()
        .unwrap_or_default();
    if runners.is_empty() {
        return ApiError::new(
            ErrorKind::Conflict,
            format!("check {check:?} is placed on no agent: none it may run on is connected"),
        )
        .into_response();
    }
    let calls = runners.iter().map(|fp| {
        let (gw, agent, check) = (gw.clone(), AgentRef::new(&t.name, fp), check.clone());
        async move { super::run_check_now(&gw, &agent, &check).await }
    });
    let outcomes = futures_util::future::join_all(calls).await;
    // One agent (round_robin), or every one failing: its error as the answer's status.
    if outcomes.iter().all(Result::is_err) {
        if let Some(e) = outcomes.into_iter().find_map(Result::err) {
            return ApiError::from(e).into_response();
        }
        return ApiError::new(ErrorKind::Conflict, "no agent ran it").into_response();
    }
    let runs = runners
        .into_iter()
        .zip(outcomes)
        .map(|(agent, outcome)| match outcome {
            Ok(result) => VantageRun {
                agent,
                result: Some(result),
                error: None,
            },
            Err(e) => VantageRun {
                agent,
                result: None,
                error: Some(e.to_string()),
            },
        })
        .collect();
    Json(EntityRun {
        entity: name,
        check,
        runs,
    })
    .into_response()
}
