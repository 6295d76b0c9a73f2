//! Part 15: checks about proxy entities. The gateway's placement of 10,000 checks on 20
//! agents (the function a gateway runs whenever the catalog or the agents connected
//! change): how long it takes, how evenly it shares, and how much it moves when 5 agents
//! leave at once; the same on a real gateway with 20 simulated agents (the load
//! generator's, saying `entity_slots`), timed until every agent holds its share in the
//! configuration it was sent; and the scheduling lateness of a real agent running checks
//! placed on it (on the entity's slots) next to the same number run as its own checks, in
//! the same run.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use outpost_gateway::checks::placement::{place, Candidate, Placed};
use outpost_gateway::checks::{parse_entities, parse_file_with_collectors, Catalog};

use crate::bus::Bus;
use crate::fleet::loadgen::{self, Behaviour, Fleet};
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
            stalled: Default::default(),
        })
        .collect()
}

/// Each check's agent once the configurations the agents of `fleets` hold now share
/// `checks` checks among them, each exactly once (every agent has one, none is
/// left over); with when the last of those configurations came. `None` until then.
fn covered(fleets: &[&Fleet], checks: usize) -> Option<(Instant, BTreeMap<String, String>)> {
    let mut owner = BTreeMap::new();
    let mut last = None::<Instant>;
    let mut agents = 0;
    for f in fleets {
        let configs = f.stats.configs();
        if configs.len() < f.agents() {
            return None;
        }
        for (fp, (at, names)) in configs {
            // Each agent holds a share (checks ≫ agents): one that has none yet was
            // sent a configuration before the last placement.
            if names.is_empty() {
                return None;
            }
            agents += 1;
            last = Some(last.map_or(at, |l| l.max(at)));
            for n in names {
                if owner.insert(n, fp.clone()).is_some() {
                    return None; // on two agents: not every share has arrived yet
                }
            }
        }
    }
    (agents > 0 && owner.len() == checks).then(|| (last.unwrap_or_else(Instant::now), owner))
}

/// Wait (at most a minute) for [`covered`].
fn wait_covered(fleets: &[&Fleet], checks: usize) -> Result<(Instant, BTreeMap<String, String>)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(c) = covered(fleets, checks) {
            return Ok(c);
        }
        if Instant::now() > deadline {
            bail!("the agents' configurations did not share the {checks} checks within 60 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Placement on a real gateway: `checks` checks about `entities` entities, `n_agents`
/// simulated agents of the group connect at once; then `leaving` of them drop their
/// connections at once.
fn on_a_gateway(
    bins: &Bins,
    work: &Path,
    plan: &Plan,
    (checks, entities): (usize, usize),
    (n_agents, leaving): (usize, usize),
) -> Result<String> {
    let dir = work.join("placement-gateway");
    let checks_dir = Gateway::data_dir_in(&dir).join("checks.d");
    std::fs::create_dir_all(&checks_dir)?;
    std::fs::write(
        checks_dir.join("placed.toml"),
        catalog_text(checks, entities, true),
    )?;
    let gw = Gateway::start(bins, &dir)?;
    crate::wait_for_quiet(plan.quiet_wait)?;
    progress(format!(
        "placement: {checks} checks, {n_agents} simulated agents on a gateway"
    ));
    let rt = loadgen::runtime()?;
    let behaviour = Behaviour {
        addrs: vec![crate::fleet::gateway_addr(&gw)?],
        pin: gw.pin.clone(),
        batch: 0,
        pace: None,
        redial: false,
        redial_jitter: Duration::ZERO,
        dial_concurrency: n_agents,
        groups: vec!["pollers".into()],
        features: vec![outpost_protocol::FEATURE_ENTITY_SLOTS.into()],
    };
    let stay_ids = crate::fleet::agents_enrolling(n_agents - leaving, &gw.enroll_key);
    let leave_ids = crate::fleet::agents_enrolling(leaving, &gw.enroll_key);
    let stay = Fleet::start(rt.handle(), stay_ids, 0, behaviour.clone())?;
    let leavers = Fleet::start(rt.handle(), leave_ids, n_agents - leaving, behaviour)?;
    let limit = Duration::from_secs(60);
    if !stay.wait_online((n_agents - leaving) as u64, limit)
        || !leavers.wait_online(leaving as u64, limit)
    {
        bail!(
            "the simulated agents did not come online: {}",
            stay.stats
                .first_error()
                .or(leavers.stats.first_error())
                .unwrap_or_default()
        );
    }
    let online_at = Instant::now();
    let (placed_at, before) = wait_covered(&[&stay, &leavers], checks)?;
    let place_ms = placed_at.saturating_duration_since(online_at).as_secs_f64() * 1e3;
    let per_agent = |owner: &BTreeMap<String, String>| {
        let mut n: BTreeMap<&str, usize> = BTreeMap::new();
        for fp in owner.values() {
            *n.entry(fp).or_default() += 1;
        }
        let v: Vec<usize> = n.into_values().collect();
        (
            v.iter().min().copied().unwrap_or(0),
            v.iter().max().copied().unwrap_or(0),
        )
    };
    let (lo, hi) = per_agent(&before);
    let leaver_fps: std::collections::HashSet<String> =
        leavers.stats.configs().into_keys().collect();
    let left_at = Instant::now();
    leavers.crash(rt.handle());
    let (rebalanced_at, after) = wait_covered(&[&stay], checks)?;
    let rebalance_ms = rebalanced_at
        .saturating_duration_since(left_at)
        .as_secs_f64()
        * 1e3;
    let theirs = before
        .values()
        .filter(|fp| leaver_fps.contains(*fp))
        .count();
    let moved = before
        .iter()
        .filter(|(c, fp)| after.get(*c) != Some(*fp))
        .count();
    let (lo2, hi2) = per_agent(&after);
    stay.stop(rt.handle(), Duration::from_secs(5));
    drop(gw);
    let mut out = format!(
        "The same on a real gateway (release binary, embedded bus): {n_agents} simulated agents \
         (the load generator's, saying `entity_slots` in their hello) connect at once; the time \
         from the last one's welcome until every agent holds its share in the configuration it \
         was sent (each check on exactly one agent); then {leaving} of them drop their \
         connections at once, and the time until the others hold the new shares (both include \
         the wait for the gateway's next placement pass, every 500 ms):\n\n"
    );
    out.push_str("| step | time | checks per agent | checks moved |\n|---|---:|---|---:|\n");
    let _ = writeln!(
        out,
        "| {n_agents} agents connect | {place_ms:.0} ms | {lo}–{hi} | – |"
    );
    let _ = writeln!(
        out,
        "| {leaving} agents' connections drop at once | {rebalance_ms:.0} ms | {lo2}–{hi2} | {moved} (the leavers had {theirs}) |"
    );
    out.push('\n');
    Ok(out)
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
    out.push_str(&on_a_gateway(
        bins,
        work,
        plan,
        (checks, entities),
        (n_agents, leaving),
    )?);

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
