//! From a failing result to the webhook receiver's 2xx: many simulated agents, each
//! sending one result every `pace`, and 1% of them turning CRITICAL at times spread over
//! a window, then OK again; on one gateway (embedded bus), or on two gateways sharing a
//! nats-server (agents split between them; the holder of the tenant's alerting lease
//! notifies for all of them).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::hook::Hook;
use super::{alerting_toml, every, told, Flips, Matched};
use crate::fleet::https::Client;
use crate::fleet::loadgen::{Behaviour, Fleet, Identity, Script};
use crate::fleet::{nats, FleetPlan};
use crate::harness::{Bins, Gateway};
use crate::progress;
use crate::sample::Series;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Setup {
    /// One gateway, embedded bus.
    Single,
    /// Two gateways on one nats-server.
    Fleet,
}

/// What one setup measured.
pub struct Row {
    pub setup: String,
    pub agents: usize,
    pub gateways: usize,
    pub failing: usize,
    /// From the first dial until every agent was welcomed.
    pub ramp: Duration,
    pub firing: Matched,
    pub resolved: Matched,
    /// Notifications for anything but the failing agents' check (none expected).
    pub unexpected: usize,
    pub first_unexpected: Option<String>,
    pub unparsed: usize,
    /// In the fleet: which gateway held the tenant's alerting lease.
    pub holder: Option<String>,
    /// The gateways' CPU, summed, nats-server's, this tool's and other work's, in % of one
    /// core, from the first flip to the last resolve.
    pub gateway_cpu: f64,
    pub nats_cpu: Option<f64>,
    pub own_cpu: f64,
    pub other: f64,
    pub failures: u64,
    pub first_error: Option<String>,
}

/// The gateways of a setup and what they stand on.
struct Rig {
    gws: Vec<Gateway>,
    nats: Option<nats::Server>,
    ids: Vec<Identity>,
    holder: Option<String>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        for gw in &mut self.gws {
            gw.proc.stop(Duration::from_secs(10));
        }
        if let Some(s) = self.nats.as_mut() {
            s.proc.stop(Duration::from_secs(5));
        }
    }
}

/// The line a gateway logs once its alerting of a tenant has read the bus's history and
/// notifies from then on.
const CAUGHT_UP: &str = "alerting has read the bus's history";

/// One gateway on the embedded bus, with the agents' credentials and the alerting in its
/// `checks.d`, notifying once it has caught up.
fn single_rig(bins: &Bins, dir: &Path, n: usize, url: &str) -> Result<Rig> {
    let (ids, creds) = crate::fleet::agents_with_secrets(n);
    crate::fleet::prepare_gateway_dir(dir, Some(&creds), None)?;
    let checks = Gateway::data_dir_in(dir).join("checks.d");
    std::fs::create_dir_all(&checks)?;
    std::fs::write(checks.join("alerting.toml"), alerting_toml(url))?;
    let mut gw = Gateway::start(bins, dir)?;
    gw.proc.wait_for_log(CAUGHT_UP, Duration::from_secs(30))?;
    Ok(Rig {
        gws: vec![gw],
        nats: None,
        ids,
        holder: None,
    })
}

/// What `gw`'s `/metrics` says of this gateway's alerting leases: how many it holds.
pub(super) fn leases_held(rt: &tokio::runtime::Handle, gw: &Gateway) -> Result<u64> {
    let addr = crate::fleet::gateway_addr(gw)?;
    let token = gw.api_token()?;
    let text = rt.block_on(async {
        let mut c = Client::connect(addr, &gw.pin, &token).await?;
        let a = c.call("GET", "/metrics").await?;
        if a.status != 200 {
            bail!("GET /metrics answered {}", a.status);
        }
        Ok(String::from_utf8_lossy(&a.body).into_owned())
    })?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("outpost_alerting_lease_held "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64))
}

/// Two gateways on a new nats-server, the alerting pushed to the fleet; once one of them
/// holds the tenant's lease and has caught up. The agents enroll with the fleet's key
/// when they first connect.
fn fleet_rig(
    bins: &Bins,
    dir: &Path,
    rt: &tokio::runtime::Handle,
    fp: &FleetPlan,
    n: usize,
    url: &str,
) -> Result<Rig> {
    let bin = nats::find_server(fp.nats_server.as_deref())?;
    let server = nats::Server::start(&bin, &dir.join("nats"), false)?;
    let config = dir.join("fleet-config");
    std::fs::create_dir_all(&config)?;
    std::fs::write(config.join("alerting.toml"), alerting_toml(url))?;
    Gateway::config_push(bins, &config, &server.url())?;
    let (enroll, api) = (crate::fleet::token(), crate::fleet::token());
    let tls = crate::fleet::shared_tls_args(&dir.join("tls"))?;
    let mut rig = Rig {
        gws: Vec::new(),
        ids: crate::fleet::agents_enrolling(n, &enroll),
        holder: None,
        nats: None,
    };
    let url_nats = server.url();
    rig.nats = Some(server);
    for name in ["a", "b"] {
        rig.gws.push(crate::fleet::start_nats_gateway(
            bins,
            dir,
            name,
            &url_nats,
            (&enroll, &api),
            &tls,
        )?);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let holder = loop {
        let mut holders = Vec::new();
        for (i, gw) in rig.gws.iter_mut().enumerate() {
            gw.proc.ensure_running()?;
            if leases_held(rt, gw)? > 0 {
                holders.push(i);
            }
        }
        if let [one] = holders[..] {
            break one;
        }
        if Instant::now() >= deadline {
            bail!(
                "no single gateway held the tenant's alerting lease within 60 s ({holders:?} did)"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    rig.gws[holder]
        .proc
        .wait_for_log(CAUGHT_UP, Duration::from_secs(30))?;
    rig.holder = Some(["A", "B"][holder].to_string());
    Ok(rig)
}

/// Set `agents` to `critical`, one after another, spread evenly over `window`.
fn spread(flips: &Flips, agents: &[usize], critical: bool, window: Duration) {
    let t0 = Instant::now();
    let step = window / agents.len().max(1) as u32;
    for (k, &a) in agents.iter().enumerate() {
        let at = t0 + step * k as u32;
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        flips.set(a, critical);
    }
}

/// Measure one setup; its second value is the CPU other work used meanwhile.
#[allow(clippy::too_many_arguments)]
pub fn run(
    bins: &Bins,
    dir: &Path,
    rt: &tokio::runtime::Handle,
    fp: &FleetPlan,
    hook: &Hook,
    setup: Setup,
    suffix: &str,
) -> Result<(Row, f64)> {
    let n = fp.alerting_agents.min(crate::fleet::fd_budget());
    let k = fp.alerting_failing.clamp(1, n);
    let (name, label) = match setup {
        Setup::Single => ("single", "one gateway, embedded bus"),
        Setup::Fleet => ("fleet", "NATS fleet: two gateways, one nats-server"),
    };
    let path = format!("/outpost/{name}{suffix}");
    let dir = dir.join(format!("{name}{suffix}"));
    progress(format!(
        "fleet alerting ({label}): {n} agents, a result every {} s each, {k} turning CRITICAL",
        fp.alerting_pace.as_secs_f64()
    ));
    let mut rig = match setup {
        Setup::Single => single_rig(bins, &dir, n, &hook.url(&path))?,
        Setup::Fleet => fleet_rig(bins, &dir, rt, fp, n, &hook.url(&path))?,
    };
    // The failing agents, spread over the fleet (and so over the gateways, which take the
    // agents in halves).
    let failing: Vec<usize> = (0..k).map(|j| j * n / k).collect();
    let flips = Flips::new(n, |i| failing.binary_search(&i).is_ok());
    let fingerprints: HashMap<String, usize> = failing
        .iter()
        .map(|&i| (rig.ids[i].fingerprint.clone(), i))
        .collect();
    let per_gw = n.div_ceil(rig.gws.len());
    let script = Script {
        batches: flips.clone(),
        kick: None,
    };
    let t_dial = Instant::now();
    let mut fleets = Vec::new();
    let ids = std::mem::take(&mut rig.ids);
    for (g, chunk) in ids.chunks(per_gw).enumerate() {
        let gw = &rig.gws[g];
        fleets.push(Fleet::start_scripted(
            rt,
            chunk.to_vec(),
            g * per_gw,
            Behaviour {
                addrs: vec![crate::fleet::gateway_addr(gw)?],
                pin: gw.pin.clone(),
                batch: 1,
                pace: Some(fp.alerting_pace),
                redial: false,
                redial_jitter: Duration::ZERO,
                dial_concurrency: fp.alerting_dial_concurrency,
                groups: Vec::new(),
                features: Vec::new(),
            },
            Some(script.clone()),
        )?);
    }
    let sizes: Vec<usize> = ids.chunks(per_gw).map(<[Identity]>::len).collect();
    let outcome = measure(
        &mut rig,
        (&fleets, &sizes),
        &flips,
        (&failing, &fingerprints),
        fp,
        hook,
        &path,
        t_dial,
    );
    for f in fleets {
        f.stop(rt, Duration::from_secs(10));
    }
    let (mut row, other) = outcome?;
    row.setup = label.to_string();
    Ok((row, other))
}

/// The measurement proper, with the fleets started.
#[allow(clippy::too_many_arguments)]
fn measure(
    rig: &mut Rig,
    (fleets, sizes): (&[Fleet], &[usize]),
    flips: &Arc<Flips>,
    (failing, fingerprints): (&[usize], &HashMap<String, usize>),
    fp: &FleetPlan,
    hook: &Hook,
    path: &str,
    t_dial: Instant,
) -> Result<(Row, f64)> {
    let n = flips.critical.len();
    let k = failing.len();
    for (f, &size) in fleets.iter().zip(sizes) {
        // The limit covers enrolling them all, in the fleet.
        if !f.wait_online(size as u64, Duration::from_secs(300)) {
            let why = f.stats.first_error().unwrap_or_default();
            bail!(
                "only {} of {size} agents came online within 300 s: {why}",
                f.stats.online()
            );
        }
    }
    let ramp = t_dial.elapsed();
    progress(format!(
        "fleet alerting: {n} agents online after {:.1} s; warming up",
        ramp.as_secs_f64()
    ));
    // Every agent has sent a result or two, and the gateways are past the ramp's work.
    std::thread::sleep(fp.alerting_pace * 2);
    for gw in &mut rig.gws {
        gw.proc.ensure_running()?;
    }
    let failures0: u64 = fleets
        .iter()
        .map(|f| f.stats.failures.load(Ordering::Relaxed))
        .sum();
    let mut gws: Vec<Series> = rig
        .gws
        .iter()
        .map(|g| Series::start(g.proc.pid()))
        .collect::<Result<_>>()?;
    let mut ns = match &rig.nats {
        Some(s) => Some(Series::start(s.proc.pid())?),
        None => None,
    };
    let mut me = Series::start(std::process::id())?;
    // Firing: each failing agent's next result after its flip is CRITICAL.
    progress(format!(
        "fleet alerting: {k} agents turn CRITICAL over {} s",
        fp.alerting_spread.as_secs_f64()
    ));
    spread(flips, failing, true, fp.alerting_spread);
    let limit = fp.alerting_pace + Duration::from_secs(30);
    if !hook.wait_until(path, limit, every("alert.firing", fingerprints)) {
        progress("fleet alerting: not every firing arrived in time; resolving anyway");
    }
    // Resolve: the second OK result in a row resolves.
    progress(format!(
        "fleet alerting: the {k} agents turn OK over {} s",
        fp.alerting_spread.as_secs_f64()
    ));
    spread(flips, failing, false, fp.alerting_spread);
    let limit = fp.alerting_pace * 2 + Duration::from_secs(30);
    if !hook.wait_until(path, limit, every("alert.resolved", fingerprints)) {
        progress("fleet alerting: not every resolve arrived in time");
    }
    // Time for a repeat to show.
    std::thread::sleep(Duration::from_secs(2));
    for s in gws.iter_mut().chain(ns.iter_mut()).chain([&mut me]) {
        s.take()?;
    }
    for gw in &mut rig.gws {
        gw.proc.ensure_running().context("a gateway died")?;
    }
    let failures = fleets
        .iter()
        .map(|f| f.stats.failures.load(Ordering::Relaxed))
        .sum::<u64>()
        - failures0;
    let first_error = fleets.iter().find_map(|f| f.stats.first_error());

    let arrivals = hook.take(path);
    let (told, unparsed) = told(&arrivals);
    let expected = |at: &dyn Fn(usize) -> Option<Instant>| -> HashMap<String, Option<Instant>> {
        fingerprints
            .iter()
            .map(|(fpr, &i)| (fpr.clone(), at(i)))
            .collect()
    };
    let firing = Matched::of(
        &told,
        "alert.firing",
        &expected(&|i| flips.first_critical(i)),
    );
    let resolved = Matched::of(&told, "alert.resolved", &expected(&|i| flips.resolving(i)));
    let unexpected: Vec<&super::Told> = told
        .iter()
        .filter(|t| {
            !(t.check == super::CHECK
                && fingerprints.contains_key(&t.fingerprint)
                && (t.kind == "alert.firing" || t.kind == "alert.resolved"))
        })
        .collect();
    let gateway_usage: Vec<_> = gws.iter().map(Series::usage).collect::<Result<_>>()?;
    let gateway_cpu = gateway_usage.iter().map(|u| u.cpu_pct).sum::<f64>();
    let nats_cpu = ns.map(|s| s.usage().map(|u| u.cpu_pct)).transpose()?;
    let mu = me.usage()?;
    let other = (mu.machine_pct - gateway_cpu - nats_cpu.unwrap_or(0.0) - mu.cpu_pct).max(0.0);
    let row = Row {
        setup: String::new(),
        agents: n,
        gateways: rig.gws.len(),
        failing: k,
        ramp,
        unexpected: unexpected.len(),
        first_unexpected: unexpected
            .first()
            .map(|t| format!("{} {} of {} ({})", t.kind, t.check, t.fingerprint, t.id)),
        unparsed,
        holder: rig.holder.clone(),
        gateway_cpu,
        nats_cpu,
        own_cpu: mu.cpu_pct,
        other,
        failures,
        first_error,
        firing,
        resolved,
    };
    progress(format!(
        "fleet alerting: firing {} of {k}, p50 {} p99 {}; resolved {} of {k}, p50 {} p99 {}",
        row.firing.arrived(),
        row.firing.cells()[0],
        row.firing.cells()[1],
        row.resolved.arrived(),
        row.resolved.cells()[0],
        row.resolved.cells()[1],
    ));
    Ok((row, other))
}

/// The latency table, and notes on what went wrong in `notes`.
pub fn table(fp: &FleetPlan, rows: &[Row], notes: &mut String) -> String {
    let mut out = format!(
        "Simulated agents each sending one result of check `{check}` every {pace} s (one \
batch of one result at a time, the next no sooner than {pace} s after the previous one, \
acked); {pct} of them (spread over the agents, so over both gateways of the fleet) turn \
CRITICAL (hard: `attempts` 1) one after another over {spread} s, and once their firings \
arrived, OK again over {spread} s. The tenant's alerting: one generic webhook receiver \
without a secret, this tool's (plain HTTP on loopback, answering 200 at once), and one \
route for `{check}` with no `for`. Latency: from the moment the load generator made the \
result (just before sending it) to the moment the receiver read the request's head; for \
the firing, the agent's first CRITICAL result; for the resolve, its second OK in a row \
(a told incident resolves on the second). In the fleet the agents are split between \
gateways A and B, and the holder of the tenant's alerting lease notifies for all of \
them. CPU is % of one core from the first flip to the last resolve.\n\n\
| setup | agents (results/s) | failing | firings arrived | **firing p50** | **firing p99** | firing max | resolves arrived | resolve p50 | resolve p99 | resolve max | repeats | other notifications | gateways' CPU | nats-server CPU | this tool's CPU | other CPU on the machine |\n\
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        check = super::CHECK,
        pace = fp.alerting_pace.as_secs_f64(),
        pct = if fp.alerting_agents > 0 {
            format!(
                "{:.0}%",
                fp.alerting_failing as f64 / fp.alerting_agents as f64 * 100.0
            )
        } else {
            "none".into()
        },
        spread = fp.alerting_spread.as_secs_f64(),
    );
    for r in rows {
        let [fp50, fp99, fmax] = r.firing.cells();
        let [rp50, rp99, rmax] = r.resolved.cells();
        let setup = match &r.holder {
            Some(h) => format!("{} (lease held by {h})", r.setup),
            None => r.setup.clone(),
        };
        let _ = writeln!(
            out,
            "| {setup} | {} ({:.0}) | {} | {} of {} | {fp50} | {fp99} | {fmax} | {} of {} | {rp50} | {rp99} | {rmax} | {} | {} | {:.0}% | {} | {:.0}% | {:.0}% |",
            r.agents,
            r.agents as f64 / fp.alerting_pace.as_secs_f64().max(1e-9),
            r.failing,
            r.firing.arrived(),
            r.failing,
            r.resolved.arrived(),
            r.failing,
            r.firing.duplicates + r.resolved.duplicates,
            r.unexpected,
            r.gateway_cpu,
            r.nats_cpu.map_or("—".into(), |c| format!("{c:.0}%")),
            r.own_cpu,
            r.other,
        );
        if let Some(p) = r.firing.problems() {
            let _ = writeln!(notes, "- {}: firings: {p}.", r.setup);
        }
        if let Some(p) = r.resolved.problems() {
            let _ = writeln!(notes, "- {}: resolves: {p}.", r.setup);
        }
        if let Some(u) = &r.first_unexpected {
            let _ = writeln!(
                notes,
                "- {}: {} notifications for something else; first: `{u}`.",
                r.setup, r.unexpected
            );
        }
        if r.unparsed > 0 {
            let _ = writeln!(
                notes,
                "- {}: {} requests were not JSON.",
                r.setup, r.unparsed
            );
        }
        if r.failures > 0 {
            let _ = writeln!(
                notes,
                "- {}: {} simulated agents' sessions failed while measured; first: `{}`.",
                r.setup,
                r.failures,
                r.first_error.clone().unwrap_or_default()
            );
        }
        crate::busy_note(notes, &r.setup, r.other, "its latencies may be inflated");
        let _ = writeln!(
            notes,
            "- {}: {} agents were online {:.1} s after the first dial ({} gateway(s)).",
            r.setup,
            r.agents,
            r.ramp.as_secs_f64(),
            r.gateways
        );
    }
    out.push('\n');
    out
}
