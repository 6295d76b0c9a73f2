//! Placement at work: every tenant's checks about proxy entities placed on its agents
//! held now ([`crate::checks::placement`]), again whenever the catalog changes or an
//! agent comes or goes, so a lost agent's share is on others within [`EVERY`] of its
//! session's end. Each session is told when its share changes and sends the agent its
//! new configuration.
//!
//! Placement is a function of the catalog and the agents held, so on a NATS fleet every
//! gateway, seeing the same shared registry, places the same way and tells its own agents
//! their share; while two gateways see the registry differently (for the moment a change
//! takes to reach both), a check may be on two agents or none, each new runner fenced (it
//! starts 2 s after the handover). A session that ends is written to the shared registry
//! at once (`Registry::session_ended`), so every gateway moves its checks; an agent whose
//! gateway died is dropped once that gateway's heartbeat runs out. Each run stays in its slot
//! (an entity's check has the entity's phase on every agent, and a new runner waits for
//! the next slot), so a check handed over is not run twice in one slot.
//!
//! A `round_robin` check whose agent, held here, sends no new result of it for twice the
//! longest gap between its runs and twice its timeout, plus the fence and a margin
//! (`allowed_silence_ms`; judged by when results reach this gateway), since the agent had
//! it or since its last result, is *stalled* there: the agent is busy past its
//! concurrency limit, or out of touch with a configuration it cannot take. It is marked so
//! in the registry for [`STALL_HOLD`], shared with the fleet; meanwhile the agent gets no
//! `round_robin` check another agent of its group may run (it would not run those either).
//! Looked at every [`STALL_EVERY`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::bus::AgentRef;
use crate::checks::placement::{self, Candidate};
use crate::checks::{Catalog, TenantChecks};
use crate::hub::Hub;
use crate::registry::Registry;

/// How often placement looks at the agents held.
pub const EVERY: Duration = Duration::from_millis(500);
/// How long an agent that stalled on a check is passed over for it.
pub const STALL_HOLD: Duration = Duration::from_secs(600);
/// How often the runners held here are looked at for stalled checks.
pub const STALL_EVERY: Duration = Duration::from_secs(2);

/// How long after a handover the new runner of a `round_robin` check may first run it:
/// time for the agent that had it to get its new configuration (sent at the same moment
/// by its own session) and stop.
pub const HANDOVER: Duration = Duration::from_secs(2);

/// Place every tenant's checks about entities until `shutdown`.
pub async fn run(
    checks: Arc<TenantChecks>,
    registry: Arc<Registry>,
    hub: Arc<Hub>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // What each tenant was last placed from: nothing to do while it is the same.
    let mut last: HashMap<String, (Arc<Catalog>, Vec<Candidate>)> = HashMap::new();
    // What `look_for_stalls` follows of each (tenant, check)'s `round_robin` runner.
    let mut given: HashMap<(String, String), Given> = HashMap::new();
    let mut last_stall_look = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        for (tenant, store) in checks.stores() {
            let catalog = store.current();
            if !catalog.checks.iter().any(|c| c.placement.is_some()) {
                if !store.placed().runners.is_empty() {
                    store.set_placed(placement::Placed::default());
                }
                continue;
            }
            // (An agent held here whose session ended is not a candidate, though it stays
            // online for the presence grace.)
            let online: Vec<Candidate> = registry
                .held(&tenant)
                .into_iter()
                .filter(|h| !h.here || hub.is_connected(&AgentRef::new(&tenant, &h.fingerprint)))
                .map(|h| Candidate {
                    fingerprint: h.fingerprint,
                    labels: h.labels,
                    groups: h.groups,
                    stalled: h.stalled,
                })
                .collect();
            if last
                .get(&tenant)
                .is_some_and(|(c, o)| Arc::ptr_eq(c, &catalog) && *o == online)
            {
                continue;
            }
            let mut placed = placement::place(&catalog, &online);
            let before = store.placed();
            placed.fence(
                &catalog,
                &before,
                crate::util::now_ms(),
                HANDOVER.as_millis() as u64,
            );
            if *before != placed {
                let moved = placed
                    .runners
                    .iter()
                    .filter(|(check, runners)| before.runners.get(*check) != Some(*runners))
                    .count();
                let unplaced = placed.runners.values().filter(|r| r.is_empty()).count();
                tracing::info!(%tenant, agents = online.len(), checks = placed.runners.len(), moved, unplaced,
                    fallen_back = placed.fallen_back.len(), "checks about entities placed");
                store.set_placed(placed);
            }
            last.insert(tenant, (catalog, online));
        }
        if last_stall_look.elapsed() >= STALL_EVERY {
            last_stall_look = tokio::time::Instant::now();
            for (tenant, store) in checks.stores() {
                look_for_stalls(
                    &tenant,
                    &store.current(),
                    &store.placed(),
                    &registry,
                    &hub,
                    &mut given,
                )
                .await;
            }
        }
    }
}

/// What [`look_for_stalls`] follows of a check's runner held here: who, since when it
/// has the check, the newest result start seen of it, and when one last came (all but the
/// start by this gateway's clock: an agent's clock is not the gateway's).
struct Given {
    runner: String,
    last_start: Option<u64>,
    progress_ms: u64,
}

/// Mark the `round_robin` checks that runners held here do not run: no new result of one
/// reached the gateway for [`allowed_silence_ms`] since the runner had it, or since its
/// last. One registry write per agent ([`STALL_HOLD`]).
async fn look_for_stalls(
    tenant: &str,
    catalog: &Catalog,
    placed: &placement::Placed,
    registry: &Registry,
    hub: &Hub,
    given: &mut HashMap<(String, String), Given>,
) {
    let now = crate::util::now_ms();
    given.retain(|(t, check), g| {
        t != tenant
            || placed
                .runners
                .get(check)
                .is_some_and(|r| r.len() == 1 && r[0] == g.runner)
    });
    let mut stalled: HashMap<&str, Vec<&str>> = HashMap::new();
    for def in &catalog.checks {
        let Some(p) = &def.placement else { continue };
        if p.mode != outpost_protocol::checkfile::PlacementMode::RoundRobin {
            continue;
        }
        let name = &def.spec.name;
        let Some([runner]) = placed.runners.get(name).map(Vec::as_slice) else {
            continue;
        };
        let agent = AgentRef::new(tenant, runner);
        let key = (tenant.to_string(), name.clone());
        if !hub.is_connected(&agent) {
            // Not held here (its own gateway looks), or not now: followed afresh when it is.
            given.remove(&key);
            continue;
        }
        let start = registry.latest_started(&agent, name);
        let g = given.entry(key).or_insert_with(|| Given {
            runner: runner.clone(),
            last_start: start,
            progress_ms: now,
        });
        if start != g.last_start {
            g.last_start = start;
            g.progress_ms = now;
        }
        let silent_ms = now.saturating_sub(g.progress_ms);
        if silent_ms > allowed_silence_ms(&def.spec) {
            tracing::warn!(%tenant, check = %name, agent = %runner, silent_s = silent_ms / 1000,
                "an agent did not run a check about an entity it was given; placing its checks elsewhere");
            stalled
                .entry(runner.as_str())
                .or_default()
                .push(name.as_str());
        }
    }
    for (runner, checks) in stalled {
        registry
            .stalled(
                &AgentRef::new(tenant, runner),
                &checks,
                now + STALL_HOLD.as_millis() as u64,
            )
            .await;
        for c in checks {
            given.remove(&(tenant.to_string(), c.to_string()));
        }
    }
}

/// How long a runner may go without a new result of `spec` before it is taken not to run
/// it: two of its longest gaps between runs (the interval, or a soft retry's), two
/// timeouts (a run that overruns skips slots), the handover's fence and a margin.
fn allowed_silence_ms(spec: &outpost_protocol::CheckSpec) -> u64 {
    let gap = spec
        .interval_secs
        .max(spec.retry_interval_secs.unwrap_or(0));
    (2 * gap + 2 * spec.timeout_secs) * 1000
        + HANDOVER.as_millis() as u64
        + STALL_EVERY.as_millis() as u64
}
