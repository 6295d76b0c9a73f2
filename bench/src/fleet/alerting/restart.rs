//! Every gateway of a fleet restarted at once while its agents reconnect: nothing may
//! fire. Two gateways on one nats-server, many simulated agents split between them (each
//! told both addresses, as agents given an address list are, redialling with the agent's
//! backoff), and the tenant's alerting routing `outpost.agent` and `outpost.gateway` to
//! this tool's receiver. Both gateways are killed with SIGKILL and started again with the
//! same ids, addresses and data; the agents come back to whichever answers first.
//!
//! "Nothing fires" needs a window and proof that the evaluator works by its end: a control
//! agent that crashes before the restart (its alert must arrive), and a second one that
//! crashes once the window is over (its alert must arrive too). Everything else that
//! reaches the receiver is a false alarm.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::hook::Hook;
use super::{latency, told_one};
use crate::fleet::https::Client;
use crate::fleet::loadgen::{Behaviour, Fleet, Identity};
use crate::fleet::{nats, FleetPlan};
use crate::harness::{Bins, Gateway};
use crate::progress;

/// The gateways' presence grace: their default (`--presence-grace`), as in production.
const GRACE: Duration = Duration::from_secs(30);
/// How long a dead gateway's heartbeat stays current for the others (gateway/src/nats).
const HEARTBEAT_STALE: Duration = Duration::from_secs(15);
/// The evaluator's look at presence, and a margin.
const LOOK_AND_MARGIN: Duration = Duration::from_secs(2 + 5);
/// The longest a control agent's alert is waited for: the grace, a look, and slack for a
/// busy machine.
const CONTROL_LIMIT: Duration = Duration::from_secs(30 + 60);

/// What the run saw.
pub struct Row {
    pub agents: usize,
    /// From the kill until every agent was welcomed again.
    pub back: Option<Duration>,
    /// From each control agent's crash to its alert (`None`: never came).
    pub control_before: Option<Duration>,
    pub control_after: Option<Duration>,
    /// From the restart to the end of the window nothing may fire in.
    pub window: Duration,
    /// Notifications other than the two control agents' firings.
    pub false_alarms: usize,
    pub first_false: Option<String>,
    pub failures: u64,
}

/// The tenant's alerting: agents' and gateways' presence to the receiver at `url`.
fn presence_toml(url: &str) -> String {
    format!(
        "[[receiver]]\nname = \"bench\"\ntimeout = \"10s\"\nwebhook = {{ url = {url:?} }}\n\n\
         [[route]]\nchecks = [\"outpost.agent\", \"outpost.gateway\"]\nreceivers = [\"bench\"]\n"
    )
}

/// How many agents `gw`'s API lists online whose session began at or after `since_ms`.
fn online_since(rt: &tokio::runtime::Handle, gw: &Gateway, since_ms: u64) -> Result<usize> {
    let addr = crate::fleet::gateway_addr(gw)?;
    let token = gw.api_token()?;
    rt.block_on(async {
        let mut c = Client::connect(addr, &gw.pin, &token).await?;
        let a = c.call("GET", "/api/v1/agents").await?;
        if a.status != 200 {
            bail!("GET /api/v1/agents answered {}", a.status);
        }
        let v: serde_json::Value = serde_json::from_slice(&a.body)?;
        Ok(v.as_array()
            .map(|a| {
                a.iter()
                    .filter(|x| {
                        x["presence"] == "online"
                            && x["connected_since_ms"].as_u64().unwrap_or(0) >= since_ms
                    })
                    .count()
            })
            .unwrap_or(0))
    })
}

/// Poll `ready` every 200 ms until it says yes or `limit` passes; the time it took.
fn poll(limit: Duration, mut ready: impl FnMut() -> Result<bool>) -> Result<Option<Duration>> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if ready()? {
            return Ok(Some(t0.elapsed()));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(None)
}

/// The moment the receiver got an `outpost.agent` firing about `fingerprint`, waiting at
/// most `limit`.
fn alert_of(hook: &Hook, path: &str, fingerprint: &str, limit: Duration) -> bool {
    hook.wait_until(path, limit, |a| {
        told_one(a).is_some_and(|t| {
            t.kind == "alert.firing" && t.check == "outpost.agent" && t.fingerprint == fingerprint
        })
    })
}

/// Run it: `fp.alerting_restart_agents` agents.
pub fn run(
    bins: &Bins,
    dir: &Path,
    rt: &tokio::runtime::Handle,
    fp: &FleetPlan,
    hook: &Hook,
) -> Result<Row> {
    let n = fp
        .alerting_restart_agents
        .min(crate::fleet::fd_budget() / 2)
        .max(2);
    let dir = dir.join("restart");
    let path = "/outpost/restart";
    let bin = nats::find_server(fp.nats_server.as_deref())?;
    let mut server = nats::Server::start(&bin, &dir.join("nats"), false)?;
    let config = dir.join("fleet-config");
    std::fs::create_dir_all(&config)?;
    std::fs::write(config.join("alerting.toml"), presence_toml(&hook.url(path)))?;
    Gateway::config_push(bins, &config, &server.url())?;
    let (enroll, api) = (crate::fleet::token(), crate::fleet::token());
    let tls = crate::fleet::shared_tls_args(&dir.join("tls"))?;
    let names = ["a", "b"];
    let mut gws = Vec::new();
    for name in names {
        gws.push(crate::fleet::start_nats_gateway(
            bins,
            &dir,
            name,
            &server.url(),
            (&enroll, &api),
            &tls,
        )?);
    }
    let addrs: Vec<SocketAddr> = gws
        .iter()
        .map(crate::fleet::gateway_addr)
        .collect::<Result<_>>()?;
    let pin = gws[0].pin.clone();
    let outcome = (|| {
        let ids = crate::fleet::agents_enrolling(n + 2, &enroll);
        let behaviour = |first: usize, redial: bool| Behaviour {
            addrs: vec![addrs[first], addrs[1 - first]],
            pin: pin.clone(),
            batch: 0,
            pace: None,
            redial,
            // The agent's own backoff: 0.5 s doubling, with full jitter.
            redial_jitter: Duration::from_millis(500),
            dial_concurrency: fp.alerting_dial_concurrency,
            groups: Vec::new(),
            features: Vec::new(),
        };
        let half = n / 2;
        let fleets = [
            Fleet::start(rt, ids[..half].to_vec(), 0, behaviour(0, true))?,
            Fleet::start(rt, ids[half..n].to_vec(), half, behaviour(1, true))?,
        ];
        let mut controls: Vec<(Identity, Fleet)> = Vec::new();
        let control = |k: usize| -> Result<(Identity, Fleet)> {
            let id = ids[n + k].clone();
            let f = Fleet::start(rt, vec![id.clone()], n + k, behaviour(k % 2, false))?;
            Ok((id, f))
        };
        controls.push(control(0)?);
        progress(format!(
            "fleet alerting, restart: {n} agents on two gateways, one nats-server"
        ));
        let all = (n + 1) as u64;
        let online = || fleets.iter().map(|f| f.stats.online()).sum::<u64>();
        let ramp = poll(Duration::from_secs(300), || {
            Ok(online() + controls[0].1.stats.online() >= all)
        })?;
        if ramp.is_none() {
            bail!("only {} of {all} agents came online within 300 s", online());
        }
        // One gateway notifies (holds the lease) and has caught up.
        let mut holder = None;
        poll(Duration::from_secs(60), || {
            for (i, gw) in gws.iter().enumerate() {
                if latency::leases_held(rt, gw)? > 0 {
                    holder = Some(i);
                }
            }
            Ok(holder.is_some())
        })?;
        if holder.is_none() {
            bail!("no gateway held the tenant's alerting lease within 60 s");
        }
        // The first control agent crashes: its alert shows the route at work.
        let (id, f) = controls.remove(0);
        let crashed = Instant::now();
        f.crash(rt);
        let control_before =
            alert_of(hook, path, &id.fingerprint, CONTROL_LIMIT).then(|| crashed.elapsed());
        progress(format!(
            "fleet alerting, restart: the first control agent's alert after {}",
            super::secs(control_before)
        ));

        // Every gateway killed and started again where it was.
        let failures0: u64 = fleets
            .iter()
            .map(|f| f.stats.failures.load(std::sync::atomic::Ordering::Relaxed))
            .sum();
        let restarted = Instant::now();
        let restarted_ms = crate::now_ms();
        for gw in &mut gws {
            gw.proc.kill_now();
        }
        for (i, name) in names.iter().enumerate() {
            gws[i] = crate::fleet::start_nats_gateway_at(
                bins,
                &dir,
                name,
                &gws[i].addr.clone(),
                &server.url(),
                (&enroll, &api),
                &tls,
            )?;
        }
        // (A gateway still starting may not answer yet: asked again.)
        let back = poll(Duration::from_secs(300), || {
            Ok(online_since(rt, &gws[0], restarted_ms).is_ok_and(|k| k >= n))
        })?
        .map(|_| restarted.elapsed());
        progress(format!(
            "fleet alerting, restart: {n} agents back online {} after the kill",
            super::secs(back)
        ));
        // The second control agent joins, and crashes once the window is over.
        controls.push(control(1)?);
        if poll(Duration::from_secs(60), || {
            Ok(controls[0].1.stats.online() >= 1)
        })?
        .is_none()
        {
            bail!(
                "the second control agent did not come online within 60 s: {}",
                controls[0].1.stats.first_error().unwrap_or_default()
            );
        }
        let window = HEARTBEAT_STALE + GRACE + LOOK_AND_MARGIN;
        std::thread::sleep(window.saturating_sub(restarted.elapsed()));
        let window = restarted.elapsed();
        let (id2, f) = controls.remove(0);
        let crashed = Instant::now();
        f.crash(rt);
        let control_after =
            alert_of(hook, path, &id2.fingerprint, CONTROL_LIMIT).then(|| crashed.elapsed());
        // A false loss declared late (a gateway slow to start) would come after the
        // window: some more time for it to show.
        std::thread::sleep(LOOK_AND_MARGIN);
        let failures = fleets
            .iter()
            .map(|f| f.stats.failures.load(std::sync::atomic::Ordering::Relaxed))
            .sum::<u64>()
            - failures0;
        for f in fleets {
            f.stop(rt, Duration::from_secs(10));
        }
        let controls = [id.fingerprint.as_str(), id2.fingerprint.as_str()];
        let false_alarms: Vec<String> = hook
            .take(path)
            .iter()
            .filter_map(told_one)
            .filter(|t| {
                !(t.kind == "alert.firing"
                    && t.check == "outpost.agent"
                    && controls.contains(&t.fingerprint.as_str()))
            })
            .map(|t| format!("{} {} of {} ({})", t.kind, t.check, t.fingerprint, t.id))
            .collect();
        Ok(Row {
            agents: n,
            back,
            control_before,
            control_after,
            window,
            false_alarms: false_alarms.len(),
            first_false: false_alarms.first().cloned(),
            failures,
        })
    })();
    for gw in &mut gws {
        gw.proc.stop(Duration::from_secs(10));
    }
    server.proc.stop(Duration::from_secs(5));
    outcome
}

/// The table of the run, and what went wrong in `notes`.
pub fn table(r: &Row, notes: &mut String) -> String {
    let mut out = format!(
        "Every gateway of a fleet restarted at once: two gateways on one nats-server \
(presence grace {grace} s, their default), simulated agents split between them, each told \
both addresses and redialling with the agent's backoff (0.5 s doubling, full jitter); the \
tenant's alerting routes `outpost.agent` and `outpost.gateway` to this tool's receiver. \
Both gateways are killed (SIGKILL) and started again with the same ids, addresses and \
data. Nothing may fire until the window is over (a dead gateway's heartbeat running out, \
15 s, then the grace, then a look and a margin); a control agent crashed before the \
restart and another one after the window show that alerts of lost agents do arrive.\n\n\
| agents | back online after the kill | window | **false alarms** | control alert before | control alert after the window |\n\
|---|---|---|---|---|---|\n",
        grace = GRACE.as_secs(),
    );
    let _ = writeln!(
        out,
        "| {} | {} | {} | **{}** | {} | {} |\n",
        r.agents,
        super::secs(r.back),
        super::secs(Some(r.window)),
        r.false_alarms,
        super::secs(r.control_before),
        super::secs(r.control_after),
    );
    if let Some(f) = &r.first_false {
        let _ = writeln!(
            notes,
            "- restart: {} notifications besides the control agents'; first: `{f}`.",
            r.false_alarms
        );
    }
    if r.back.is_none() {
        let _ = writeln!(notes, "- restart: not every agent came back within 300 s.");
    }
    if r.control_before.is_none() || r.control_after.is_none() {
        let _ = writeln!(
            notes,
            "- restart: a control agent's alert never arrived: the run proves nothing."
        );
    }
    if r.failures > 0 {
        let _ = writeln!(
            notes,
            "- restart: {} dials failed while the gateways were down (expected: the agents \
             retry).",
            r.failures
        );
    }
    out
}

/// The goal line.
pub fn goal(r: &Row) -> String {
    let proven = r.control_before.is_some() && r.control_after.is_some() && r.back.is_some();
    format!(
        "Alerting, every gateway of a fleet restarted while {} agents reconnect: {} false alarms{}.",
        r.agents,
        r.false_alarms,
        if proven {
            ""
        } else {
            " (not proven: a control alert or the agents' return is missing)"
        }
    )
}
