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
                .filter(|(fp, _, _, here)| !here || hub.is_connected(&AgentRef::new(&tenant, fp)))
                .map(|(fingerprint, labels, groups, _)| Candidate {
                    fingerprint,
                    labels,
                    groups,
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
    }
}
