//! Proxy entities: `GET /api/v1/entities` (role `read`), the tenant's `[[entity]]`
//! declarations with each check about them: where it is placed now, the newest result of
//! each agent that ran it (its vantage points), and the entity's state by it (the newest
//! result's for `round_robin`; for `all`, what a quorum of vantage points agrees on).

use std::collections::BTreeMap;

use axum::extract::State;
use axum::Json;
use outpost_protocol::checkfile::PlacementMode;
use outpost_protocol::Status;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::access::{Read, Tenant};
use super::openapi::ErrorBody;
use super::Gw;
use crate::checks::placement::{severity, verdict};

pub fn routes() -> OpenApiRouter<Gw> {
    OpenApiRouter::new().routes(routes!(list_entities))
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
/// points are the agents this gateway holds or held. Role: read.
#[utoipa::path(get, path = "/entities", tag = "agents", security(("bearer" = [])), responses(
    (status = 200, description = "The tenant's proxy entities", body = Vec<EntityView>),
    (status = 401, description = "No valid token", body = ErrorBody),
    (status = 403, description = "The token's role is too low, or it is the operator's", body = ErrorBody),
))]
async fn list_entities(State(gw): State<Gw>, t: Tenant<Read>) -> Json<Vec<EntityView>> {
    let store = gw.sessions.checks.of(&t.name);
    let (catalog, placed) = (store.current(), store.placed());
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
                    let mut vantage: Vec<VantagePoint> = gw
                        .registry
                        .latest_of(&t.name, &c.spec.name)
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
                    let (status, summary) = match placement.mode {
                        PlacementMode::RoundRobin => match vantage.first() {
                            Some(v) => (
                                Some(v.status),
                                format!("last run by {} ({})", v.hostname, v.agent),
                            ),
                            None => (None, "no result yet".to_string()),
                        },
                        PlacementMode::All => {
                            // The vantage points it is placed on now, by their newest result.
                            let seen: Vec<(String, Status)> = vantage
                                .iter()
                                .filter(|v| v.placed)
                                .map(|v| (v.agent.clone(), v.status))
                                .collect();
                            if seen.is_empty() {
                                (None, "no result yet".to_string())
                            } else {
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
        .collect();
    Json(views)
}
