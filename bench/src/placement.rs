//! Part 15: checks about proxy entities. The gateway's placement of 10,000 checks on 20
//! agents (the function a gateway runs whenever the catalog or the agents connected
//! change): how long it takes, how evenly it shares, and how much it moves when 5 agents
//! leave at once; and the scheduling lateness of a real agent running checks placed on it
//! (on the entity's slots) next to the same number run as its own checks, in the same run.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use outpost_gateway::checks::placement::{place, Candidate, Placed};
use outpost_gateway::checks::{parse_entities, parse_file_with_collectors, Catalog};

use crate::bus::Bus;
use crate::harness::{Agent, Bins, Gateway};
use crate::{percentile, progress, Plan};

const INTERVAL_S: u64 = 10;

/// `checks` TCP checks about `entities` entities for the group `pollers` (or ordinary
/// checks for the group `locals` when `about` is false).
fn catalog_text(checks: usize, entities: usize, about: bool) -> String {
    let mut t = String::new();
    if about {
        for e in 0..entities {
            let _ = writeln!(t, "[[entity]]\nname = \"e{e}\"\naddress = \"127.0.0.1\"");
        }
    }
    for i in 0..checks {
        let _ = writeln!(
            t,
            "[[check]]\nname = \"c{i}\"\ncommand = [\"/bin/true\"]\ninterval = {INTERVAL_S}\n{}",
            if about {
                format!(
                    "entity = \"e{}\"\ntarget = {{ groups = [\"pollers\"] }}",
                    i % entities
                )
            } else {
                "target = { groups = [\"locals\"] }".to_string()
            }
        );
    }
    t
}

fn agents(n: usize) -> Vec<Candidate> {
    (0..n)
        .map(|i| Candidate {
            fingerprint: format!("00000000-0000-4000-8000-{i:012}"),
            labels: Default::default(),
            groups: vec!["pollers".into()],
        })
        .collect()
}

/// The median time of `runs` placements.
fn timed(catalog: &Catalog, online: &[Candidate], runs: usize) -> (Placed, Duration) {
    let mut times = Vec::new();
    let mut placed = Placed::default();
    for _ in 0..runs {
        let t0 = Instant::now();
        placed = place(catalog, online);
        times.push(t0.elapsed());
    }
    times.sort();
    (placed, times[times.len() / 2])
}

/// Lateness (ms after its slot) of each run but each check's first, from the bus.
fn lateness(
    gw: &Gateway,
    agent: &Agent,
    since_ms: u64,
    phase: impl Fn(&str) -> u64,
) -> Result<Vec<u64>> {
    let mut bus = Bus::new(gw.bus_dir(), &agent.fingerprint);
    bus.poll()?;
    let mut firsts = std::collections::HashSet::new();
    let mut late = Vec::new();
    let interval = INTERVAL_S * 1000;
    let mut runs: Vec<_> = bus
        .results
        .iter()
        .filter(|r| r.started_at_ms >= since_ms)
        .collect();
    runs.sort_by_key(|r| r.started_at_ms);
    for r in runs {
        if firsts.insert(r.check.clone()) {
            continue;
        }
        let p = phase(&r.check);
        late.push((r.started_at_ms + interval - p % interval) % interval);
    }
    Ok(late)
}

pub fn placement(bins: &Bins, work: &Path, plan: &Plan) -> Result<(String, Vec<String>)> {
    let (checks, entities, n_agents, leaving) = if plan.quick {
        (1_000, 10, 20, 5)
    } else {
        (10_000, 100, 20, 5)
    };
    let text = catalog_text(checks, entities, true);
    let (defs, _) =
        parse_file_with_collectors(Path::new("bench.toml"), &text).map_err(anyhow::Error::msg)?;
    let catalog = Catalog {
        checks: defs,
        entities: parse_entities(Path::new("bench.toml"), &text).map_err(anyhow::Error::msg)?,
        ..Default::default()
    };
    let all = agents(n_agents);
    let (before, t_place) = timed(&catalog, &all, 5);
    let shares: Vec<usize> = all
        .iter()
        .map(|a| before.of(&a.fingerprint).len())
        .collect();
    let (after, t_rebalance) = timed(&catalog, &all[leaving..], 5);
    let gone: std::collections::HashSet<&str> = all[..leaving]
        .iter()
        .map(|a| a.fingerprint.as_str())
        .collect();
    let theirs = before
        .runners
        .values()
        .filter(|r| gone.contains(r[0].as_str()))
        .count();
    let moved = before
        .runners
        .iter()
        .filter(|(c, r)| after.runners.get(*c) != Some(*r))
        .count();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Placement (`gateway/src/checks/placement.rs`, what a gateway runs when a tenant's \
         checks or agents change) of {checks} `round_robin` checks about {entities} entities \
         on {n_agents} agents of a group, median of 5, on one core of this machine:\n"
    );
    out.push_str("| step | time | checks per agent | checks moved |\n|---|---:|---|---:|\n");
    let _ = writeln!(
        out,
        "| place on {n_agents} agents | {:.1} ms | {}–{} | – |",
        t_place.as_secs_f64() * 1e3,
        shares.iter().min().unwrap_or(&0),
        shares.iter().max().unwrap_or(&0)
    );
    let after_shares: Vec<usize> = all[leaving..]
        .iter()
        .map(|a| after.of(&a.fingerprint).len())
        .collect();
    let _ = writeln!(
        out,
        "| {leaving} agents leave at once: place on {} | {:.1} ms | {}–{} | {moved} (the leavers had {theirs}) |",
        n_agents - leaving,
        t_rebalance.as_secs_f64() * 1e3,
        after_shares.iter().min().unwrap_or(&0),
        after_shares.iter().max().unwrap_or(&0)
    );
    out.push('\n');

    // Lateness: a real agent running checks placed on it, then one running as many of its
    // own, on the same gateway (the release binaries).
    let n = if plan.quick { 200 } else { 1_000 };
    let secs = if plan.quick { 25 } else { 45 };
    let dir = work.join("placement");
    let checks_dir = Gateway::data_dir_in(&dir).join("checks.d");
    std::fs::create_dir_all(&checks_dir)?;
    std::fs::write(checks_dir.join("placed.toml"), catalog_text(n, 10, true))?;
    let gw = Gateway::start(bins, &dir)?;
    let mut rows = Vec::new();
    for (what, groups) in [
        ("placed on the agent (about entities)", "pollers"),
        ("the agent's own", "locals"),
    ] {
        if groups == "locals" {
            std::fs::write(checks_dir.join("placed.toml"), catalog_text(n, 10, false))?;
        }
        crate::wait_for_quiet(plan.quiet_wait)?;
        progress(format!("placement: {n} checks {what}, {secs} s"));
        let mut agent = Agent::start_with_settings(
            bins,
            &dir.join(groups),
            &gw,
            &[],
            None,
            &format!("groups = [\"{groups}\"]\n"),
        )?;
        let since = crate::now_ms();
        std::thread::sleep(Duration::from_secs(secs));
        let fp = agent.fingerprint.clone();
        let late = if groups == "pollers" {
            lateness(&gw, &agent, since, |check| {
                let entity = format!("entity:e{}", check[1..].parse::<usize>().unwrap_or(0) % 10);
                outpost_agent::scheduler::splay_ms(&entity, check, INTERVAL_S * 1000)
            })?
        } else {
            lateness(&gw, &agent, since, |check| {
                outpost_agent::scheduler::splay_ms(&fp, check, INTERVAL_S * 1000)
            })?
        };
        agent.proc.stop(Duration::from_secs(10));
        if late.is_empty() {
            bail!("no runs of the checks {what} on the bus");
        }
        let mut late = late;
        late.sort_unstable();
        rows.push((
            what,
            late.len(),
            percentile(&late, 50.0),
            percentile(&late, 99.0),
            *late.last().unwrap_or(&0),
        ));
    }
    let _ = writeln!(
        out,
        "Lateness of {n} checks every {INTERVAL_S} s on one real agent ({secs} s each, each check's first run left out), \
         placed on it by the gateway (their slots are their entity's), next to the same number of its own:\n"
    );
    out.push_str("| checks | runs | p50 | **p99** | max |\n|---|---:|---:|---:|---:|\n");
    for (what, runs, p50, p99, max) in &rows {
        let _ = writeln!(
            out,
            "| {what} | {runs} | {p50} ms | **{p99} ms** | {max} ms |"
        );
    }
    out.push('\n');
    Ok((out, Vec::new()))
}
