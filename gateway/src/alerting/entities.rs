//! Alerts about proxy entities: a check about an entity (`entity` in a gateway check file)
//! alerts as the entity's, keyed `entity:<name>`, never as the agent's that ran it.
//!
//! - `round_robin`: each result, whichever agent ran it, is the entity's result (its
//!   output says from where). A check moving from one agent to another is one alert that
//!   goes on, not one that ends and another that starts. A result that ran before one
//!   another agent already reported is not taken (an agent cut off sends what it ran
//!   meanwhile when it is back, after the agent that took over has reported).
//! - `all`: the entity's state is the quorum's verdict ([`placement::verdict`]) over the
//!   newest hard result of each vantage point that reached the gateway within two
//!   intervals and its timeout, taken again at each hard result; one vantage point seeing
//!   a problem is not an incident unless the quorum agrees. While fewer vantage points
//!   than the quorum have answered, nothing is decided from results (a start, a vantage
//!   point coming back): [`watch`] turns it UNKNOWN if that lasts. Vantage points no
//!   longer placed are forgotten by [`watch`] once they are that old.
//!
//! How old a vantage point's state is counts by when it reached the gateway (`seen_ms`),
//! not by its agent's clock, so an agent whose clock is off does not go stale; a restart
//! counts the kept states as just seen, as it gives agents' checks their full stale time.
//! - A check about an entity that no agent reports on for [`super::STALE_INTERVALS`]
//!   intervals and its timeout (placed nowhere, its agents out of touch) turns UNKNOWN as
//!   stale, as an agent's check does; for `all`, when fewer than the quorum answer that long.
//! - A check or entity no longer declared: its incident ends (resolved where told) and its
//!   state is dropped.
//!
//! Each result's place on the bus numbers it for the entity's alert (agents number their
//! results each on its own), so a restart that reads results again makes the same
//! notifications with the same ids. The vantage points' states are kept with the alerts
//! (in the snapshot), so a restart does not decide a quorum from one vantage point.

use std::collections::{BTreeMap, HashMap};

use outpost_protocol::checkfile::{CheckDef, PlacementMode};
use outpost_protocol::{CheckResult, StateType, Status};

use crate::alerts::config::{AlertConfig, Stale};
use crate::alerts::{Alerts, Notification, Route, Vantage};
use crate::checks::placement::{self, Placed};
use crate::checks::Catalog;
use crate::registry::Identity;

/// What an entity's alerts are keyed by, in place of an agent's fingerprint.
pub const ENTITY_PREFIX: &str = "entity:";

/// How long after the evaluator first sees a check about an entity it may first be stale,
/// on top of its stale time: agents take a while to come back to a gateway that started.
pub const START_GRACE_MS: u64 = 60_000;

/// Longest list of what the vantage points saw, in an alert's output.
const MAX_SEEN_BYTES: usize = 1024;

/// The alert key of entity `name`.
pub fn key(name: &str) -> String {
    format!("{ENTITY_PREFIX}{name}")
}

/// The check `check` about `entity`, as declared now.
fn declared<'a>(about: &Declared<'a>, entity: &str, check: &str) -> Option<&'a CheckDef> {
    about
        .0
        .get(check)
        .copied()
        .filter(|d| d.spec.entity.as_deref() == Some(entity))
}

/// The catalog's checks about entities by name: made once per batch of results that has
/// any about an entity, so that taking one is a lookup, not a scan of the catalog.
pub struct Declared<'a>(HashMap<&'a str, &'a CheckDef>);

impl<'a> Declared<'a> {
    pub fn of(catalog: &'a Catalog) -> Declared<'a> {
        Declared(
            catalog
                .checks
                .iter()
                .filter(|d| d.placement.is_some() && d.spec.entity.is_some())
                .map(|d| (d.spec.name.as_str(), d))
                .collect(),
        )
    }
}

/// How old a vantage point's result may be and still count.
fn fresh_ms(def: &CheckDef) -> u64 {
    (2 * def.spec.interval_secs + def.spec.timeout_secs) * 1000
}

/// The identities alerts about entities are routed, silenced and described by: the
/// entity's name as the host, its labels.
pub fn identities(catalog: &Catalog) -> impl Iterator<Item = (String, Identity)> + '_ {
    catalog.entities.iter().map(|e| {
        (
            key(&e.name),
            Identity {
                hostname: e.name.clone(),
                labels: e.labels.clone(),
                groups: Vec::new(),
            },
        )
    })
}

/// Take `result` of agent `fingerprint` (named `hostname`), about an entity, read at bus
/// position `position`: what it makes due for the entity's alert.
#[allow(clippy::too_many_arguments)]
pub fn take(
    alerts: &mut Alerts,
    about: &Declared<'_>,
    (fingerprint, hostname): (&str, &str),
    result: &CheckResult,
    position: u64,
    now_ms: u64,
    route: Route<'_>,
) -> Vec<Notification> {
    let Some(entity) = result.entity.as_deref() else {
        return Vec::new();
    };
    let Some(def) = declared(about, entity, &result.check) else {
        return Vec::new(); // no longer declared: `watch` ends what is left of it
    };
    let key = key(entity);
    let mode = def.placement.as_ref().map(|p| p.mode).unwrap_or_default();
    let seen_from = if hostname.is_empty() {
        fingerprint
    } else {
        hostname
    };
    if result.state_type == StateType::Hard {
        alerts
            .vantage
            .entry(key.clone())
            .or_default()
            .entry(result.check.clone())
            .or_default()
            .insert(
                fingerprint.to_string(),
                Vantage {
                    status: result.status,
                    output: result.output.clone(),
                    started_at_ms: result.started_at_ms,
                    seen_ms: now_ms,
                    hostname: seen_from.to_string(),
                },
            );
    }
    let mut taken = result.clone();
    taken.seq = position;
    match mode {
        PlacementMode::RoundRobin => {
            // Ran before a result another agent already sent: delivered late (an agent
            // back from being cut off), not news.
            let overtaken = alerts
                .vantage
                .get(&key)
                .and_then(|c| c.get(&result.check))
                .is_some_and(|v| {
                    v.iter()
                        .any(|(fp, v)| fp != fingerprint && v.started_at_ms > result.started_at_ms)
                });
            if overtaken {
                return Vec::new();
            }
            taken.output = format!("{} (from {seen_from})", result.output);
            alerts.apply(&key, &taken, route)
        }
        PlacementMode::All => {
            // A vantage point still retrying says nothing yet of the entity.
            if result.state_type == StateType::Soft {
                return Vec::new();
            }
            let quorum = def.placement.as_ref().and_then(|p| p.quorum).unwrap_or(1);
            let seen = fresh_vantage(alerts, &key, def, now_ms);
            if seen.len() < quorum.max(1) as usize {
                return Vec::new();
            }
            let (status, output) = judged(quorum, &seen);
            taken.status = status;
            taken.output = output;
            taken.long_output.clear();
            taken.metrics.clear();
            taken.faults.clear();
            alerts.apply(&key, &taken, route)
        }
    }
}

/// The vantage points of `def` whose state reached the gateway lately, with what they
/// saw, worst first. (Not filtered by where the check is placed now: after a restart the
/// placement is empty until the agents are back, and results read again must decide as
/// they did the first time.)
fn fresh_vantage<'a>(
    alerts: &'a Alerts,
    key: &str,
    def: &CheckDef,
    now_ms: u64,
) -> Vec<&'a Vantage> {
    let mut seen: Vec<&Vantage> = alerts
        .vantage
        .get(key)
        .and_then(|checks| checks.get(&def.spec.name))
        .into_iter()
        .flatten()
        .filter(|(_, v)| now_ms.saturating_sub(v.seen_ms) <= fresh_ms(def))
        .map(|(_, v)| v)
        .collect();
    seen.sort_by(|a, b| {
        placement::severity(b.status)
            .cmp(&placement::severity(a.status))
            .then_with(|| a.hostname.cmp(&b.hostname))
    });
    seen
}

/// The quorum's verdict over `seen`, saying which vantage point saw what.
fn judged(quorum: u32, seen: &[&Vantage]) -> (Status, String) {
    let by: Vec<(String, Status)> = seen
        .iter()
        .map(|v| (v.hostname.clone(), v.status))
        .collect();
    let (status, mut output) = placement::verdict(quorum, &by);
    let problems: Vec<String> = seen
        .iter()
        .filter(|v| v.status != Status::Ok)
        .map(|v| {
            format!(
                "{} {}: {}",
                v.hostname,
                v.status.as_str().to_uppercase(),
                v.output
            )
        })
        .collect();
    if !problems.is_empty() {
        output.push_str(" — ");
        output.push_str(&problems.join("; "));
        if output.len() > MAX_SEEN_BYTES {
            let mut cut = MAX_SEEN_BYTES;
            while !output.is_char_boundary(cut) {
                cut -= 1;
            }
            output.truncate(cut);
            output.push('…');
        }
    }
    (status, output)
}

/// What the gateway sees of the entities' checks now: a check no agent reported on for
/// its stale time is UNKNOWN (`first_seen`: when this evaluator first saw each check, so
/// that a start gives every check its full time); a check or entity no longer declared
/// ends. `stale` is the prefix of a stale alert's output.
pub fn watch(
    alerts: &mut Alerts,
    (catalog, placed, config): (&Catalog, &Placed, &AlertConfig),
    first_seen: &mut HashMap<(String, String), u64>,
    (stale, stale_intervals): (&str, u64),
    now_ms: u64,
    route: Route<'_>,
) -> Vec<Notification> {
    let mut due = Vec::new();
    let mut declared_now: HashMap<String, Vec<&str>> = HashMap::new();
    for def in catalog.checks.iter().filter(|d| d.placement.is_some()) {
        let Some(entity) = def.spec.entity.as_deref() else {
            continue;
        };
        let key = key(entity);
        let check = def.spec.name.as_str();
        declared_now.entry(key.clone()).or_default().push(check);
        let since = *first_seen
            .entry((key.clone(), check.to_string()))
            .or_insert(now_ms)
            + START_GRACE_MS;
        let default_ttl_ms =
            (def.spec.interval_secs * stale_intervals + def.spec.timeout_secs) * 1000;
        let ttl_ms = match config.stale_after(check) {
            Some(Stale::Never) => None,
            Some(Stale::After(d)) => Some(d.as_millis() as u64),
            None => Some(default_ttl_ms),
        };
        let runners = placed.runners.get(check).map(Vec::as_slice).unwrap_or(&[]);
        // Vantage points no longer placed and long silent are forgotten.
        let forget_after = ttl_ms.unwrap_or(default_ttl_ms);
        if let Some(v) = alerts.vantage.get_mut(&key).and_then(|c| c.get_mut(check)) {
            v.retain(|fp, v| {
                runners.contains(fp) || now_ms.saturating_sub(v.seen_ms) <= forget_after
            });
        }
        let Some(ttl_ms) = ttl_ms else {
            continue;
        };
        let vantage = alerts.vantage.get(&key).and_then(|c| c.get(check));
        let newest = vantage
            .into_iter()
            .flatten()
            .map(|(_, v)| v.seen_ms)
            .max()
            .unwrap_or(0)
            .max(since);
        let quiet_s = now_ms.saturating_sub(newest) / 1000;
        let mode = def.placement.as_ref().map(|p| p.mode).unwrap_or_default();
        let why = match mode {
            PlacementMode::RoundRobin if now_ms.saturating_sub(newest) > ttl_ms => Some(format!(
                "{stale}no result from any agent for {quiet_s}s (it runs every {}s; {})",
                def.spec.interval_secs,
                placed_on(runners, alerts, &key, check)
            )),
            PlacementMode::RoundRobin => None,
            PlacementMode::All => {
                let quorum = def
                    .placement
                    .as_ref()
                    .and_then(|p| p.quorum)
                    .unwrap_or(1)
                    .max(1);
                // Answered within the stale time, from where it is placed now.
                let answering = vantage
                    .into_iter()
                    .flatten()
                    .filter(|(fp, v)| {
                        runners.contains(fp)
                            && now_ms.saturating_sub(v.seen_ms.max(since)) <= ttl_ms
                    })
                    .count();
                (answering < quorum as usize && now_ms.saturating_sub(since) > ttl_ms).then(|| {
                    format!(
                        "{stale}{answering} of the {quorum} vantage points the quorum needs answered in the last {}s ({})",
                        ttl_ms / 1000,
                        placed_on(runners, alerts, &key, check)
                    )
                })
            }
        };
        if let Some(why) = why {
            due.extend(alerts.observe(&key, check, (Status::Unknown, &why), now_ms, route));
        }
    }
    // No longer declared: its incident ends, and its state goes.
    let gone: Vec<(String, String)> = alerts
        .alerts
        .iter()
        .filter(|(k, _)| k.starts_with(ENTITY_PREFIX))
        .flat_map(|(k, checks)| checks.keys().map(move |c| (k.clone(), c.clone())))
        .filter(|(k, c)| {
            !declared_now
                .get(k)
                .is_some_and(|cs| cs.contains(&c.as_str()))
        })
        .collect();
    for (key, check) in gone {
        let open = alerts
            .alerts
            .get(&key)
            .and_then(|c| c.get(&check))
            .is_some_and(|a| a.incident.is_some());
        if open {
            let why = format!("{check} is no longer checked");
            due.extend(alerts.observe(&key, &check, (Status::Ok, &why), now_ms, route));
        }
        if let Some(checks) = alerts.alerts.get_mut(&key) {
            checks.remove(&check);
            if checks.is_empty() {
                alerts.alerts.remove(&key);
            }
        }
        first_seen.remove(&(key, check));
    }
    alerts.vantage.retain(|key, checks| {
        checks.retain(|c, _| {
            declared_now
                .get(key)
                .is_some_and(|cs| cs.contains(&c.as_str()))
        });
        !checks.is_empty()
    });
    due
}

/// Alerts an agent's key holds for checks that are about entities now (made before the
/// results said which entity they were about, or when the check was an agent's own):
/// their incidents end ("alerted as the entity's"), and they go. Done once per life of the
/// evaluator, so that an agent's own check that happens to have such a name only loses
/// its state once.
pub fn migrate(
    alerts: &mut Alerts,
    catalog: &Catalog,
    now_ms: u64,
    route: Route<'_>,
) -> Vec<Notification> {
    let about: HashMap<&str, &str> = catalog
        .checks
        .iter()
        .filter(|d| d.placement.is_some())
        .filter_map(|d| Some((d.spec.name.as_str(), d.spec.entity.as_deref()?)))
        .collect();
    let stuck: Vec<(String, String, String)> = alerts
        .alerts
        .iter()
        .filter(|(k, _)| !k.starts_with(ENTITY_PREFIX) && !k.starts_with(super::GATEWAY_ENTITY))
        .flat_map(|(k, checks)| {
            checks.keys().filter_map(|c| {
                about
                    .get(c.as_str())
                    .map(|e| (k.clone(), c.clone(), e.to_string()))
            })
        })
        .collect();
    let mut due = Vec::new();
    for (fp, check, entity) in stuck {
        let why = format!("{check} is now alerted as {}", key(&entity));
        due.extend(alerts.observe(&fp, &check, (Status::Ok, &why), now_ms, route));
        if let Some(checks) = alerts.alerts.get_mut(&fp) {
            checks.remove(&check);
        }
    }
    due
}

/// Where a check is placed, in words, for a stale alert.
fn placed_on(runners: &[String], alerts: &Alerts, key: &str, check: &str) -> String {
    if runners.is_empty() {
        return "placed on no agent: none it may run on is connected".into();
    }
    let names: BTreeMap<&str, &str> = alerts
        .vantage
        .get(key)
        .and_then(|c| c.get(check))
        .into_iter()
        .flatten()
        .map(|(fp, v)| (fp.as_str(), v.hostname.as_str()))
        .collect();
    let shown: Vec<&str> = runners
        .iter()
        .map(|fp| names.get(fp.as_str()).copied().unwrap_or(fp.as_str()))
        .collect();
    format!("placed on {}", shown.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::{Kind, Policy};
    use crate::checks::placement::{place, Candidate};
    use Status::{Critical, Ok, Unknown};

    const TEXT: &str = r#"
[[entity]]
name = "router"
address = "10.0.0.1"
labels = { dc = "b" }

[[check]]
name = "ping"
tcp = { host = "10.0.0.1", port = 22 }
interval = 10
timeout = 5
entity = "router"
placement = { mode = "all", quorum = 2 }

[[check]]
name = "snmp"
tcp = { host = "10.0.0.1", port = 161 }
interval = 10
timeout = 5
entity = "router"
"#;

    fn catalog(text: &str) -> Catalog {
        crate::checks::placement::test_catalog(text)
    }

    fn placed(c: &Catalog, agents: &[&str]) -> Placed {
        let online: Vec<Candidate> = agents
            .iter()
            .map(|fp| Candidate {
                fingerprint: fp.to_string(),
                labels: Default::default(),
                groups: Vec::new(),
                stalled: Default::default(),
            })
            .collect();
        place(c, &online)
    }

    /// A hard result of `check` about the router from agent `fp` at second `t`.
    fn result(check: &str, status: Status, output: &str, t: u64) -> CheckResult {
        let mut r = CheckResult::new(check, status, output);
        r.entity = Some("router".into());
        r.started_at_ms = t * 1000;
        r
    }

    struct World {
        catalog: Catalog,
        placed: Placed,
        alerts: Alerts,
        position: u64,
        sent: Vec<Notification>,
    }

    impl World {
        fn new(agents: &[&str]) -> World {
            let catalog = catalog(TEXT);
            let placed = placed(&catalog, agents);
            World {
                catalog,
                placed,
                alerts: Alerts::default(),
                position: 0,
                sent: Vec::new(),
            }
        }

        fn take(&mut self, fp: &str, r: CheckResult) {
            self.position += 1;
            let now = r.started_at_ms + 100;
            let route = |_: &str, _: &str, _: Status| Policy::to(&["hook"]);
            let due = take(
                &mut self.alerts,
                &Declared::of(&self.catalog),
                (fp, &format!("host-{fp}")),
                &r,
                self.position,
                now,
                &route,
            );
            self.sent.extend(due);
        }

        fn status(&self, check: &str) -> Option<Status> {
            self.alerts.status(&key("router"), check)
        }
    }

    #[test]
    fn one_vantage_point_seeing_a_problem_is_no_incident_and_two_are_one() {
        let mut w = World::new(&["a", "b", "c"]);
        // Fewer than the quorum have answered yet: nothing is decided, nothing said.
        w.take("a", result("ping", Critical, "refused", 1));
        assert_eq!(w.status("ping"), None);
        for fp in ["b", "c"] {
            w.take(fp, result("ping", Ok, "open", 1));
        }
        assert_eq!(w.status("ping"), Some(Ok));
        assert!(w.sent.is_empty(), "one of three: {:?}", w.sent);
        // A second vantage point agrees: one incident, saying who saw what.
        w.take("b", result("ping", Critical, "refused", 11));
        assert_eq!(w.status("ping"), Some(Critical));
        assert_eq!(w.sent.len(), 1, "{:?}", w.sent);
        let n = &w.sent[0];
        assert_eq!(
            (n.kind, n.fingerprint.as_str()),
            (Kind::Firing, "entity:router")
        );
        assert!(
            n.output
                .starts_with("2 of 3 vantage points agree (2 CRITICAL, 1 OK; quorum 2)")
                && n.output
                    .contains("host-a CRITICAL: refused; host-b CRITICAL: refused"),
            "{}",
            n.output
        );
        // Still two of three at the next results: nothing more.
        w.take("a", result("ping", Critical, "refused", 12));
        w.take("c", result("ping", Ok, "open", 12));
        assert_eq!(w.sent.len(), 1);
        // Healed: it resolves after two OK verdicts.
        for (fp, t) in [("a", 21), ("b", 21), ("c", 22)] {
            w.take(fp, result("ping", Ok, "open", t));
        }
        assert_eq!(w.status("ping"), Some(Ok));
        assert_eq!(w.sent.last().map(|n| n.kind), Some(Kind::Resolved));
        assert_eq!(w.sent.len(), 2);
    }

    #[test]
    fn a_soft_or_stale_vantage_point_does_not_count() {
        let mut w = World::new(&["a", "b", "c"]);
        for fp in ["a", "b", "c"] {
            w.take(fp, result("ping", Ok, "open", 1));
        }
        // b retrying (soft): not yet a problem it agrees on.
        let mut soft = result("ping", Critical, "refused", 11);
        soft.state_type = StateType::Soft;
        w.take("a", result("ping", Critical, "refused", 11));
        w.take("b", soft);
        assert_eq!(w.status("ping"), Some(Ok));
        // c agrees: two of three.
        w.take("c", result("ping", Critical, "refused", 12));
        assert_eq!(w.status("ping"), Some(Critical), "a and c agree");
        // c's CRITICAL reached the gateway 40 s ago (a vote counts for two intervals and
        // the timeout, 25 s): a alone is no quorum.
        let mut w = World::new(&["a", "b", "c"]);
        w.take("c", result("ping", Critical, "refused", 1));
        w.take("b", result("ping", Ok, "open", 40));
        w.take("a", result("ping", Critical, "refused", 41));
        assert_eq!(w.status("ping"), Some(Ok));
        assert!(w.sent.is_empty(), "{:?}", w.sent);
    }

    #[test]
    fn round_robin_is_one_alert_whichever_agent_runs_it_and_numbered_by_the_bus() {
        let mut w = World::new(&["a", "b", "c"]);
        w.take("a", result("snmp", Critical, "no answer", 1));
        assert_eq!(w.sent.len(), 1);
        assert_eq!(w.sent[0].output, "no answer (from host-a)");
        assert_eq!(
            w.sent[0].id, "entity:router/snmp/1/0",
            "numbered by the bus position"
        );
        // Moved to b, still failing: the same incident, nothing new.
        w.take("b", result("snmp", Critical, "no answer", 11));
        assert_eq!(w.sent.len(), 1);
        // An agent's own low sequence numbers do not hold the entity's results back.
        let mut r = result("snmp", Ok, "fine", 21);
        r.seq = 1;
        w.take("c", r.clone());
        r.started_at_ms += 10_000;
        w.take("c", r);
        assert_eq!(w.sent.last().map(|n| n.kind), Some(Kind::Resolved));
    }

    #[test]
    fn silence_placed_nowhere_or_short_of_a_quorum_turns_stale_and_undeclared_ends() {
        let route = |_: &str, _: &str, _: Status| Policy::to(&["hook"]);
        let mut w = World::new(&["a", "b", "c"]);
        for fp in ["a", "b", "c"] {
            w.take(fp, result("ping", Ok, "open", 1));
        }
        w.take("a", result("snmp", Ok, "fine", 1));
        let config = AlertConfig::default();
        let mut first_seen = HashMap::new();
        let mut watch_at = |w: &mut World, secs: u64| {
            let due = watch(
                &mut w.alerts,
                (&w.catalog, &w.placed, &config),
                &mut first_seen,
                ("stale: ", 3),
                secs * 1000,
                &route,
            );
            w.sent.extend(due);
        };
        watch_at(&mut w, 2);
        // Within the stale time (35 s) and the start's grace (60 s): nothing.
        watch_at(&mut w, 20);
        watch_at(&mut w, 90);
        assert!(w.sent.is_empty(), "fresh: {:?}", w.sent);
        // 3 intervals and the timeout (35 s) without a result: both stale.
        watch_at(&mut w, 100);
        assert_eq!(w.status("ping"), Some(Unknown));
        assert_eq!(w.status("snmp"), Some(Unknown));
        let outputs: Vec<&str> = w.sent.iter().map(|n| n.output.as_str()).collect();
        assert!(
            outputs.iter().any(|o| o.starts_with(
                "stale: no result from any agent for 38s (it runs every 10s; placed on "
            )),
            "{outputs:?}"
        );
        assert!(
            outputs.iter().any(|o| o.starts_with(
                "stale: 0 of the 2 vantage points the quorum needs answered in the last 35s"
            )),
            "{outputs:?}"
        );
        // Placed nowhere: said so.
        w.placed = placed(&w.catalog, &[]);
        watch_at(&mut w, 101);
        let snmp = &w.alerts.alerts["entity:router"]["snmp"];
        assert!(
            snmp.output
                .ends_with("placed on no agent: none it may run on is connected)"),
            "{}",
            snmp.output
        );
        // The checks are no longer declared: their incidents end, their state goes.
        w.catalog = catalog("[[entity]]\nname = \"router\"\naddress = \"x\"\n");
        let before = w.sent.len();
        watch_at(&mut w, 102);
        assert_eq!(
            w.sent[before..]
                .iter()
                .filter(|n| n.kind == Kind::Resolved)
                .count(),
            2
        );
        assert!(w.alerts.alerts.is_empty() && w.alerts.vantage.is_empty());
    }

    #[test]
    fn a_round_robin_result_delivered_after_a_newer_one_from_another_agent_is_not_taken() {
        let mut w = World::new(&["a", "b"]);
        w.take("a", result("snmp", Ok, "fine", 1));
        // b took over and reported; a, back from being cut off, sends what it ran before.
        w.take("b", result("snmp", Ok, "fine", 21));
        w.take("a", result("snmp", Critical, "no answer", 11));
        assert_eq!(w.status("snmp"), Some(Ok));
        assert!(w.sent.is_empty(), "{:?}", w.sent);
        // a's own newer results are taken again.
        w.take("a", result("snmp", Critical, "no answer", 31));
        assert_eq!(w.status("snmp"), Some(Critical));
    }

    #[test]
    fn results_read_again_after_a_restart_make_the_same_notifications() {
        let mut first = World::new(&["a", "b", "c"]);
        for fp in ["a", "b", "c"] {
            first.take(fp, result("ping", Ok, "open", 1));
        }
        let snapshot = first.alerts.clone();
        let position = first.position;
        for fp in ["a", "b"] {
            first.take(fp, result("ping", Critical, "refused", 11));
        }
        assert_eq!(first.sent.len(), 1);
        // A restart an hour later, with nothing placed yet, reads the same results again
        // from the snapshot: the kept states count as seen at the start.
        let mut again = World::new(&[]);
        again.alerts = snapshot;
        again.position = position;
        let restart_ms = 3_600_000;
        for v in again
            .alerts
            .vantage
            .values_mut()
            .flat_map(|c| c.values_mut())
            .flat_map(|v| v.values_mut())
        {
            v.seen_ms = restart_ms;
        }
        for fp in ["a", "b"] {
            let mut r = result("ping", Critical, "refused", 11);
            r.started_at_ms = 11_000;
            again.position += 1;
            let route = |_: &str, _: &str, _: Status| Policy::to(&["hook"]);
            let due = take(
                &mut again.alerts,
                &Declared::of(&again.catalog),
                (fp, &format!("host-{fp}")),
                &r,
                again.position,
                restart_ms + 50,
                &route,
            );
            again.sent.extend(due);
        }
        assert_eq!(
            again.sent.iter().map(|n| &n.id).collect::<Vec<_>>(),
            first.sent.iter().map(|n| &n.id).collect::<Vec<_>>()
        );
    }

    #[test]
    fn an_agents_alert_of_a_check_now_about_an_entity_ends_once() {
        let mut w = World::new(&["a"]);
        let route = |_: &str, _: &str, _: Status| Policy::to(&["hook"]);
        let mut r = CheckResult::new("ping", Critical, "refused");
        r.seq = 7;
        assert_eq!(w.alerts.apply("a", &r, &route).len(), 1);
        let mut own = CheckResult::new("disk", Critical, "full");
        own.seq = 8;
        w.alerts.apply("a", &own, &route);
        let due = migrate(&mut w.alerts, &w.catalog, 1_000, &route);
        assert_eq!(due.len(), 1, "{due:?}");
        assert_eq!(
            (due[0].kind, due[0].check.as_str()),
            (Kind::Resolved, "ping")
        );
        assert!(
            due[0].output.contains("now alerted as entity:router"),
            "{:?}",
            due[0]
        );
        assert_eq!(w.alerts.status("a", "ping"), None);
        assert_eq!(
            w.alerts.status("a", "disk"),
            Some(Critical),
            "its own checks stay"
        );
    }
}
