//! Where checks about proxy entities run (docs/CHECKS.md, "Checks about what has no
//! agent"): a pure function of the tenant's catalog and its agents online, so that any
//! gateway that sees the same agents places the same way.
//!
//! For each check about an entity, the allowed agents are those online that its `target`
//! matches; with `same_label = "dc"`, those whose `dc` label is the entity's, or every
//! allowed agent when none of those is online (the check is then marked as fallen back).
//! `all` gives the check to every one of them. `round_robin` gives it to one: the checks
//! with the same allowed agents are shared so that no agent has more than its share
//! (`ceil(checks / agents)`), each going to the first agent with room in an order of its
//! own (a rendezvous hash of the check and the agent), so an agent's leaving moves little
//! more than its own checks, and an agent's joining takes a share from the others.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use outpost_protocol::checkfile::PlacementMode;
use outpost_protocol::{CheckSpec, Status};
use sha2::{Digest, Sha256};

use super::Catalog;

/// An agent online that placed checks may run on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub fingerprint: String,
    pub labels: BTreeMap<String, String>,
    pub groups: Vec<String>,
    /// `round_robin` checks it was given and did not run (busy past their time, out of
    /// touch): while there are any, it gets no `round_robin` check another agent may run
    /// (it would not run those either).
    pub stalled: BTreeSet<String>,
}

/// Where every check about an entity runs.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Placed {
    /// Each placed check's runners, sorted (none while no allowed agent is online).
    pub runners: BTreeMap<String, Vec<String>>,
    /// The names of the placed checks each agent runs, sorted.
    pub by_agent: HashMap<String, Vec<String>>,
    /// Checks with `same_label` placed on other agents, none of the entity's being online.
    pub fallen_back: BTreeSet<String>,
    /// `round_robin` checks handed to their runner lately: not run there before this Unix
    /// ms ([`Placed::fence`]), so that the agent that had it has stopped by then.
    pub not_before: BTreeMap<String, u64>,
}

impl Placed {
    /// The names of the placed checks `fingerprint` runs.
    pub fn of(&self, fingerprint: &str) -> &[String] {
        self.by_agent
            .get(fingerprint)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// The specs of the checks `fingerprint` runs, from `catalog` (so a check changed or
    /// no longer placed since this placement is sent as it is now, or not at all), each
    /// with its handover fence.
    pub fn specs_of(&self, catalog: &Catalog, fingerprint: &str) -> Vec<CheckSpec> {
        self.of(fingerprint)
            .iter()
            .filter_map(|name| {
                let def = catalog
                    .checks
                    .iter()
                    .find(|d| d.spec.name == *name && d.placement.is_some())?;
                let mut spec = def.spec.clone();
                spec.not_before_ms = self.not_before.get(name).copied();
                Some(spec)
            })
            .collect()
    }

    /// Fence the `round_robin` checks of `catalog` whose runner changed since `before`:
    /// the new runner starts at the first slot at or after `now_ms + margin_ms`. A fence
    /// stays as long as its runner does (the agent's configuration does not change
    /// again).
    pub fn fence(&mut self, catalog: &Catalog, before: &Placed, now_ms: u64, margin_ms: u64) {
        for def in &catalog.checks {
            let Some(p) = &def.placement else { continue };
            if p.mode != PlacementMode::RoundRobin {
                continue;
            }
            let name = &def.spec.name;
            let Some(now) = self.runners.get(name).filter(|r| !r.is_empty()) else {
                continue;
            };
            match before.runners.get(name) {
                Some(was) if was == now => {
                    if let Some(at) = before.not_before.get(name) {
                        self.not_before.insert(name.clone(), *at);
                    }
                }
                _ => {
                    self.not_before.insert(name.clone(), now_ms + margin_ms);
                }
            }
        }
    }
}

/// Place the catalog's checks about entities on the agents `online`.
pub fn place(catalog: &Catalog, online: &[Candidate]) -> Placed {
    let entities: HashMap<&str, _> = catalog
        .entities
        .iter()
        .map(|e| (e.name.as_str(), e))
        .collect();
    let mut placed = Placed::default();
    // Passed over for round_robin checks others may run: agents that stall.
    let stalled: BTreeSet<&str> = online
        .iter()
        .filter(|a| !a.stalled.is_empty())
        .map(|a| a.fingerprint.as_str())
        .collect();
    // Round-robin checks by the agents they may go to.
    let mut shared: BTreeMap<Vec<&str>, Vec<&CheckSpec>> = BTreeMap::new();
    for def in &catalog.checks {
        let (Some(placement), Some(entity)) = (&def.placement, &def.spec.entity) else {
            continue;
        };
        let Some(entity) = entities.get(entity.as_str()) else {
            continue; // (the catalog keeps no check about an undeclared entity)
        };
        let allowed: Vec<&Candidate> = online
            .iter()
            .filter(|a| def.target.matches(&a.labels, &a.groups))
            .collect();
        let eligible: Vec<&str> = match &placement.same_label {
            Some(label) => {
                let near: Vec<&str> = allowed
                    .iter()
                    .filter(|a| {
                        entity
                            .labels
                            .get(label)
                            .is_some_and(|v| a.labels.get(label) == Some(v))
                    })
                    .map(|a| a.fingerprint.as_str())
                    .collect();
                if near.is_empty() && !allowed.is_empty() {
                    placed.fallen_back.insert(def.spec.name.clone());
                    allowed.iter().map(|a| a.fingerprint.as_str()).collect()
                } else {
                    near
                }
            }
            None => allowed.iter().map(|a| a.fingerprint.as_str()).collect(),
        };
        let mut eligible = eligible;
        eligible.sort_unstable();
        eligible.dedup();
        if placement.mode == PlacementMode::RoundRobin && !stalled.is_empty() {
            // Not on an agent that stalls, unless no other may run it.
            let others: Vec<&str> = eligible
                .iter()
                .copied()
                .filter(|fp| !stalled.contains(fp))
                .collect();
            if !others.is_empty() {
                eligible = others;
            }
        }
        match placement.mode {
            PlacementMode::All => {
                placed.runners.insert(
                    def.spec.name.clone(),
                    eligible.iter().map(|s| s.to_string()).collect(),
                );
            }
            PlacementMode::RoundRobin => {
                if eligible.is_empty() {
                    placed.runners.insert(def.spec.name.clone(), Vec::new());
                } else {
                    shared.entry(eligible).or_default().push(&def.spec);
                }
            }
        }
    }
    for (agents, mut checks) in shared {
        checks.sort_by(|a, b| a.name.cmp(&b.name));
        let share = checks.len().div_ceil(agents.len());
        let mut load: HashMap<&str, usize> = HashMap::new();
        for spec in checks {
            let mut order: Vec<(u64, &str)> = agents
                .iter()
                .map(|fp| (weight(&spec.name, fp), *fp))
                .collect();
            order.sort_unstable_by(|a, b| b.cmp(a));
            let runner = order
                .iter()
                .map(|(_, fp)| *fp)
                .find(|fp| load.get(fp).copied().unwrap_or(0) < share)
                .expect("the shares add up to at least the checks");
            *load.entry(runner).or_default() += 1;
            placed
                .runners
                .insert(spec.name.clone(), vec![runner.to_string()]);
        }
    }
    for (check, runners) in &placed.runners {
        for fp in runners {
            placed
                .by_agent
                .entry(fp.clone())
                .or_default()
                .push(check.clone());
        }
    }
    // (`runners` is iterated in name order, so each agent's list is sorted.)
    placed
}

/// How bad a state is, for agreeing on one: OK, UNKNOWN, WARNING, CRITICAL.
pub fn severity(s: Status) -> u8 {
    match s {
        Status::Ok => 0,
        Status::Unknown => 1,
        Status::Warning => 2,
        Status::Critical => 3,
    }
}

/// The entity's state by a check that `quorum` vantage points must agree on, from the
/// newest result of each (agent, status): the worst state at least `quorum` of them see
/// (a vantage point seeing CRITICAL agrees the state is at least WARNING), OK when fewer
/// agree on anything worse, UNKNOWN when fewer than `quorum` have answered at all; and
/// which saw what.
pub fn verdict(quorum: u32, seen: &[(String, Status)]) -> (Status, String) {
    let quorum = quorum.max(1) as usize;
    let mut by: BTreeMap<u8, Vec<&str>> = BTreeMap::new();
    for (agent, status) in seen {
        by.entry(severity(*status)).or_default().push(agent);
    }
    let said = |s: Status| {
        let n = by.get(&severity(s)).map_or(0, Vec::len);
        (n > 0).then(|| format!("{n} {}", s.as_str().to_uppercase()))
    };
    let tally: Vec<String> = [
        Status::Critical,
        Status::Warning,
        Status::Unknown,
        Status::Ok,
    ]
    .into_iter()
    .filter_map(said)
    .collect();
    let tally = tally.join(", ");
    if seen.len() < quorum {
        return (
            Status::Unknown,
            format!(
                "{} of the {quorum} vantage points the quorum needs have answered ({tally})",
                seen.len()
            ),
        );
    }
    for s in [Status::Critical, Status::Warning, Status::Unknown] {
        let agreeing = seen
            .iter()
            .filter(|(_, x)| severity(*x) >= severity(s))
            .count();
        if agreeing >= quorum {
            return (
                s,
                format!(
                    "{agreeing} of {} vantage points agree ({tally}; quorum {quorum})",
                    seen.len()
                ),
            );
        }
    }
    let note = if seen.iter().any(|(_, s)| *s != Status::Ok) {
        format!("; fewer than {quorum} agree on a problem")
    } else {
        String::new()
    };
    (
        Status::Ok,
        format!("{} vantage points: {tally}{note}", seen.len()),
    )
}

/// The rendezvous weight of `agent` for `check`: each check orders the agents its own way.
fn weight(check: &str, agent: &str) -> u64 {
    let d = Sha256::digest(format!("{check}\n{agent}").as_bytes());
    u64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
}

/// A catalog of the checks and entities of one check file's `text` (for tests).
#[cfg(test)]
pub(crate) fn test_catalog(text: &str) -> Catalog {
    use outpost_protocol::checkfile::{parse_entities, parse_file_with_collectors};
    let path = std::path::Path::new("x.toml");
    Catalog {
        checks: parse_file_with_collectors(path, text).unwrap().0,
        entities: parse_entities(path, text).unwrap(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_protocol::checkfile::CheckDef;

    fn catalog(text: &str) -> Catalog {
        test_catalog(text)
    }

    fn agent(fp: &str, labels: &[(&str, &str)], groups: &[&str]) -> Candidate {
        Candidate {
            stalled: Default::default(),
            fingerprint: fp.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    fn thirty_checks() -> String {
        let mut t = String::from("[[entity]]\nname = \"site\"\naddress = \"127.0.0.1\"\n");
        for i in 0..30 {
            t.push_str(&format!(
                "[[check]]\nname = \"c{i}\"\ntcp = {{ host = \"127.0.0.1\", port = {} }}\ninterval = 10\nentity = \"site\"\ntarget = {{ groups = [\"pollers\"] }}\n",
                1000 + i
            ));
        }
        t
    }

    fn loads(p: &Placed) -> BTreeMap<String, usize> {
        p.by_agent
            .iter()
            .map(|(fp, checks)| (fp.clone(), checks.len()))
            .collect()
    }

    #[test]
    fn an_agent_that_stalls_gets_no_round_robin_check_another_may_run() {
        let c = catalog(&thirty_checks());
        let mut pollers: Vec<Candidate> = ["a", "b", "c"]
            .iter()
            .map(|fp| agent(fp, &[], &["pollers"]))
            .collect();
        pollers[1].stalled.insert("c7".into());
        let p = place(&c, &pollers);
        assert!(p.of("b").is_empty(), "{:?}", p.of("b"));
        assert_eq!(loads(&p).into_values().collect::<Vec<_>>(), [15, 15]);
        // The only agent there is runs them, stalled or not.
        let p = place(&c, &pollers[1..2]);
        assert_eq!(p.of("b").len(), 30);
    }

    #[test]
    fn round_robin_gives_each_check_to_one_agent_evenly_and_moves_little_when_one_leaves() {
        let c = catalog(&thirty_checks());
        let pollers: Vec<Candidate> = ["a", "b", "c"]
            .iter()
            .map(|fp| agent(fp, &[], &["pollers"]))
            .collect();
        let mut others = pollers.clone();
        others.push(agent("not-a-poller", &[], &["web"]));
        let p = place(&c, &others);
        assert!(p.runners.values().all(|r| r.len() == 1));
        assert_eq!(
            loads(&p).into_values().collect::<Vec<_>>(),
            [10, 10, 10],
            "three agents, ten each; none for the agent outside the group"
        );
        let specs = p.specs_of(&c, "a");
        assert_eq!(specs.len(), 10);
        assert!(specs.iter().all(|s| s.entity.as_deref() == Some("site")));
        // Handed over: the checks "a" had are fenced on their new runners; the others
        // keep theirs, unfenced.
        let mut p2 = place(&c, &pollers[1..]);
        p2.fence(&c, &p, 1_000, 2_000);
        for (check, runners) in &p.runners {
            let fenced = p2.not_before.get(check);
            if runners[0] == "a" {
                assert_eq!(fenced, Some(&3_000), "{check}");
            } else if p2.runners[check] == *runners {
                assert_eq!(fenced, None, "{check}");
            }
        }
        let mut p3 = place(&c, &pollers[1..]);
        p3.fence(&c, &p2, 9_000, 2_000);
        assert_eq!(
            p3.not_before, p2.not_before,
            "a fence stays with its runner"
        );
        // "a" leaves: its ten go to the others, and theirs stay.
        let p2 = place(&c, &pollers[1..]);
        assert_eq!(loads(&p2).into_values().collect::<Vec<_>>(), [15, 15]);
        let kept = p
            .runners
            .iter()
            .filter(|(check, r)| r[0] != "a" && p2.runners[*check] == **r)
            .count();
        assert!(kept >= 15, "only {kept} of the 20 checks of b and c stayed");
        // The same inputs place the same way (any gateway of a fleet agrees).
        assert_eq!(place(&c, &pollers), place(&c, &pollers));
        // Nobody online in the group: placed nowhere, never on an agent not allowed.
        let none = place(&c, &[agent("w", &[], &["web"])]);
        assert!(none.by_agent.is_empty() && none.runners.values().all(Vec::is_empty));
    }

    #[test]
    fn all_gives_the_check_to_every_allowed_agent_and_same_label_keeps_to_the_entitys() {
        let c = catalog(
            "[[entity]]\nname = \"router\"\nlabels = { dc = \"b\" }\n\
             [[check]]\nname = \"ping\"\ntcp = { host = \"10.0.0.1\", port = 22 }\ninterval = 10\nentity = \"router\"\n\
             placement = { mode = \"all\", quorum = 2 }\n\
             [[check]]\nname = \"snmp\"\ntcp = { host = \"10.0.0.1\", port = 161 }\ninterval = 10\nentity = \"router\"\n\
             placement = { same_label = \"dc\" }\n",
        );
        let a1 = agent("a1", &[("dc", "a")], &[]);
        let b1 = agent("b1", &[("dc", "b")], &[]);
        let b2 = agent("b2", &[("dc", "b")], &[]);
        let p = place(&c, &[a1.clone(), b1.clone(), b2.clone()]);
        assert_eq!(p.runners["ping"], ["a1", "b1", "b2"]);
        assert!(["b1", "b2"].contains(&p.runners["snmp"][0].as_str()));
        assert!(p.fallen_back.is_empty());
        // No dc=b agent online: any allowed agent, marked as fallen back.
        let p = place(&c, std::slice::from_ref(&a1));
        assert_eq!(p.runners["snmp"], ["a1"]);
        assert!(p.fallen_back.contains("snmp"));
    }

    #[test]
    fn a_quorum_decides_the_entitys_state() {
        let seen = |v: &[Status]| -> Vec<(String, Status)> {
            v.iter()
                .enumerate()
                .map(|(i, s)| (format!("a{i}"), *s))
                .collect()
        };
        use Status::*;
        let (s, why) = verdict(2, &seen(&[Critical, Ok, Ok]));
        assert_eq!(s, Ok, "one of three is not a quorum of two");
        assert!(
            why.contains("1 CRITICAL, 2 OK") && why.contains("fewer than 2"),
            "{why}"
        );
        let (s, why) = verdict(2, &seen(&[Critical, Critical, Ok]));
        assert_eq!(s, Critical);
        assert!(why.contains("2 of 3"), "{why}");
        // A CRITICAL and a WARNING agree it is at least WARNING.
        assert_eq!(verdict(2, &seen(&[Critical, Warning, Ok])).0, Warning);
        assert_eq!(verdict(1, &seen(&[Ok, Warning])).0, Warning);
        assert_eq!(verdict(3, &seen(&[Critical, Critical])).0, Unknown);
        assert_eq!(verdict(2, &seen(&[Ok, Ok, Ok])).0, Ok);
    }

    #[test]
    fn checks_without_an_entity_are_not_placed() {
        let c = catalog("[[check]]\nname = \"local\"\ncommand = \"/bin/true\"\ninterval = 10\n");
        let p = place(&c, &[agent("a", &[], &[])]);
        assert!(p.runners.is_empty() && p.by_agent.is_empty());
        let _: &[CheckDef] = &c.checks;
    }
}
