//! Notifications per second to one webhook receiver: many agents' check turning CRITICAL
//! at once on one gateway (embedded bus), and the same alerts posted to Prometheus
//! Alertmanager, which notifies each on its own at once to the same receiver.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use outpost_gateway::alerts::deliver::rfc3339;
use serde_json::json;

use super::alertmanager::{self, Alertmanager};
use super::hook::{Arrival, Hook};
use super::{alerting_toml, every, told, Flips, Matched, CHECK, CRITICAL_OUTPUT};
use crate::fleet::loadgen::{Behaviour, Fleet, Identity, Script};
use crate::fleet::FleetPlan;
use crate::harness::{Bins, Gateway};
use crate::progress;
use crate::sample::Series;

/// Alerts per `POST /api/v2/alerts`: Prometheus's notifier sends at most 64 at a time.
/// Alertmanager is also fed every alert in one post, so that how fast this tool posts
/// does not bound what it delivers.
const AM_BATCH: usize = 64;

/// One sender's burst.
pub struct Row {
    pub sender: String,
    pub alerts: usize,
    /// Requests the receiver took, and their bodies' mean size in bytes.
    pub requests: usize,
    pub body_bytes: usize,
    /// Distinct alerts among them.
    pub arrived: usize,
    /// Alerts that came again.
    pub repeats: usize,
    /// Alertmanager: alerts per post, and the time to post it every alert.
    pub per_post: Option<usize>,
    pub fed: Option<Duration>,
    /// From the flip (Outpost) or the first post (Alertmanager) to the first and the last
    /// alert's arrival.
    pub first: Option<Duration>,
    pub last: Option<Duration>,
    /// Outpost: each alert from its agent's CRITICAL result to its arrival, µs, sorted.
    pub latency_us: Vec<u64>,
    /// The sender's CPU (the gateway, or Alertmanager), this tool's, and other work's,
    /// in % of one core, from the flip to the last arrival and a second more.
    pub cpu: f64,
    pub own_cpu: f64,
    pub other: f64,
    pub note: String,
}

impl Row {
    /// Alerts per second from the first arrival to the last.
    fn delivery_rate(&self) -> Option<f64> {
        let (f, l) = (self.first?, self.last?);
        let span = l.saturating_sub(f).as_secs_f64();
        (self.arrived > 1 && span > 0.0).then(|| (self.arrived - 1) as f64 / span)
    }

    /// Alerts per second from the flip (or the first post) to the last arrival.
    fn overall_rate(&self) -> Option<f64> {
        let l = self.last?.as_secs_f64();
        (l > 0.0).then(|| self.arrived as f64 / l)
    }
}

/// Both senders, measured one after the other in the same run.
pub struct Burst {
    pub outpost: Row,
    /// Fed [`AM_BATCH`] alerts per post, then all in one; `Err`: why it was not measured.
    pub alertmanager: std::result::Result<Vec<Row>, String>,
}

/// Measure both; the second value is the most CPU other work used meanwhile.
pub fn run(
    bins: &Bins,
    dir: &Path,
    rt: &tokio::runtime::Handle,
    fp: &FleetPlan,
    hook: &Hook,
    suffix: &str,
) -> Result<(Burst, f64)> {
    let dir = dir.join(format!("burst{suffix}"));
    let n = fp.alerting_burst.min(crate::fleet::fd_budget());
    let (ids, creds) = crate::fleet::agents_with_secrets(n);
    let fingerprints: Vec<String> = ids.iter().map(|i| i.fingerprint.clone()).collect();
    let outpost = outpost_burst(bins, &dir, rt, fp, hook, (ids, &creds), suffix)?;
    let alertmanager = match alertmanager::find(fp.alertmanager.as_deref()) {
        Ok(bin) => [AM_BATCH, n.max(1)]
            .into_iter()
            .map(|batch| am_burst(&bin, &dir, rt, fp, hook, &fingerprints, batch, suffix))
            .collect::<Result<Vec<Row>>>()
            .map_err(|e| format!("failed: {e:#}")),
        Err(e) => Err(format!("not run: {e:#}")),
    };
    let other = alertmanager
        .iter()
        .flatten()
        .map(|r| r.other)
        .fold(outpost.other, f64::max);
    Ok((
        Burst {
            outpost,
            alertmanager,
        },
        other,
    ))
}

/// One gateway, `n` agents (already known to it) sending a result every pace; all turn
/// CRITICAL at once (each sends its next result at once) and the firings are counted.
fn outpost_burst(
    bins: &Bins,
    dir: &Path,
    rt: &tokio::runtime::Handle,
    fp: &FleetPlan,
    hook: &Hook,
    (ids, creds): (Vec<Identity>, &str),
    suffix: &str,
) -> Result<Row> {
    let n = ids.len();
    let path = format!("/burst/outpost{suffix}");
    let gw_dir = dir.join("gateway");
    crate::fleet::prepare_gateway_dir(&gw_dir, Some(creds), None)?;
    let checks = Gateway::data_dir_in(&gw_dir).join("checks.d");
    std::fs::create_dir_all(&checks)?;
    std::fs::write(
        checks.join("alerting.toml"),
        alerting_toml(&hook.url(&path)),
    )?;
    let mut gw = Gateway::start(bins, &gw_dir)?;
    gw.proc.wait_for_log(
        "alerting has read the bus's history",
        Duration::from_secs(30),
    )?;
    progress(format!(
        "fleet alerting, burst: {n} agents on one gateway, all turning CRITICAL at once"
    ));
    let flips = Flips::new(n, |_| true);
    let fingerprints: HashMap<String, usize> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.fingerprint.clone(), i))
        .collect();
    let (kick, kicked) = tokio::sync::watch::channel(0u64);
    let fleet = Fleet::start_scripted(
        rt,
        ids,
        0,
        Behaviour {
            addrs: vec![crate::fleet::gateway_addr(&gw)?],
            pin: gw.pin.clone(),
            batch: 1,
            pace: Some(fp.alerting_pace),
            redial: false,
            redial_jitter: Duration::ZERO,
            dial_concurrency: fp.alerting_dial_concurrency,
            groups: Vec::new(),
            features: Vec::new(),
        },
        Some(Script {
            batches: flips.clone(),
            kick: Some(kicked),
        }),
    )?;
    let measured = (|| -> Result<Row> {
        if !fleet.wait_online(n as u64, Duration::from_secs(120)) {
            anyhow::bail!(
                "only {} of {n} agents came online within 120 s: {}",
                fleet.stats.online(),
                fleet.stats.first_error().unwrap_or_default()
            );
        }
        std::thread::sleep(fp.alerting_pace * 2);
        gw.proc.ensure_running()?;
        let mut g = Series::start(gw.proc.pid())?;
        let mut me = Series::start(std::process::id())?;
        for i in 0..n {
            flips.set(i, true);
        }
        let t0 = Instant::now();
        kick.send_modify(|k| *k += 1);
        let complete = hook.wait_until(
            &path,
            fp.alerting_burst_limit,
            every("alert.firing", &fingerprints),
        );
        std::thread::sleep(Duration::from_secs(1));
        g.take()?;
        me.take()?;
        gw.proc.ensure_running().context("the gateway died")?;
        let arrivals = hook.take(&path);
        let (told, unparsed) = told(&arrivals);
        let expected = fingerprints
            .iter()
            .map(|(f, &i)| (f.clone(), flips.first_critical(i)))
            .collect();
        let matched = Matched::of(&told, "alert.firing", &expected);
        let ours: Vec<&super::Told> = told
            .iter()
            .filter(|t| t.kind == "alert.firing" && fingerprints.contains_key(&t.fingerprint))
            .collect();
        let since = |f: fn(Instant, Instant) -> Instant| {
            ours.iter()
                .map(|t| t.at)
                .reduce(f)
                .map(|at| at.saturating_duration_since(t0))
        };
        let (gu, mu) = (g.usage()?, me.usage()?);
        let mut note = Vec::new();
        if !complete {
            note.push(format!(
                "not all within {} s",
                fp.alerting_burst_limit.as_secs()
            ));
        }
        if let Some(p) = matched.problems() {
            note.push(p);
        }
        if told.len() > ours.len() {
            note.push(format!("{} other notifications", told.len() - ours.len()));
        }
        if unparsed > 0 {
            note.push(format!("{unparsed} requests not JSON"));
        }
        Ok(Row {
            sender: "Outpost: agents → gateway (embedded bus) → webhook".into(),
            alerts: n,
            requests: arrivals.len(),
            body_bytes: mean_body(&arrivals),
            arrived: matched.arrived(),
            repeats: matched.duplicates,
            per_post: None,
            fed: None,
            first: since(std::cmp::min),
            last: since(std::cmp::max),
            latency_us: matched.latency_us,
            cpu: gu.cpu_pct,
            own_cpu: mu.cpu_pct,
            other: (mu.machine_pct - gu.cpu_pct - mu.cpu_pct).max(0.0),
            note: note.join("; "),
        })
    })();
    fleet.stop(rt, Duration::from_secs(10));
    gw.proc.stop(Duration::from_secs(10));
    let row = measured?;
    progress(format!(
        "fleet alerting, burst: Outpost delivered {} of {n}, last {} after the flip",
        row.arrived,
        super::secs(row.last)
    ));
    Ok(row)
}

fn mean_body(arrivals: &[Arrival]) -> usize {
    arrivals.iter().map(|a| a.body.len()).sum::<usize>() / arrivals.len().max(1)
}

/// The firing alerts of `fingerprints` (each agent's check [`CHECK`]) as the gateway's
/// Alertmanager receiver posts them (docs/ALERTING.md): labels `alertname` (the check),
/// `tenant`, `fingerprint`, `instance` (the hostname); annotations `summary`,
/// `description` (the output), `status` and `outpost_id`; `endsAt` 10 minutes ahead.
fn am_body(fingerprints: &[String], now_ms: u64) -> Vec<u8> {
    let alerts: Vec<serde_json::Value> = fingerprints
        .iter()
        .map(|f| {
            // The load generator's hostname for the agent.
            let host = format!("sim-{}", &f[..8.min(f.len())]);
            json!({
                "labels": {
                    "alertname": CHECK,
                    "tenant": "default",
                    "fingerprint": f,
                    "instance": host,
                },
                "annotations": {
                    "summary": format!("CRITICAL: {CHECK} on {host}"),
                    "description": CRITICAL_OUTPUT,
                    "status": "critical",
                    "outpost_id": format!("{f}/{CHECK}/1/0"),
                },
                "startsAt": rfc3339(now_ms),
                "endsAt": rfc3339(now_ms + 600_000),
            })
        })
        .collect();
    serde_json::to_vec(&alerts).unwrap_or_default()
}

/// The `fingerprint` labels of the alerts in one of Alertmanager's webhook
/// notifications, one per alert.
fn am_alerts(a: &Arrival) -> Vec<String> {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&a.body) else {
        return Vec::new();
    };
    v["alerts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|alert| {
            alert["labels"]["fingerprint"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

/// The same alerts, made as the gateway's Alertmanager receiver makes them, posted to a
/// new Alertmanager `batch` at a time; its notifications to the receiver are counted.
#[allow(clippy::too_many_arguments)]
fn am_burst(
    bin: &Path,
    dir: &Path,
    rt: &tokio::runtime::Handle,
    fp: &FleetPlan,
    hook: &Hook,
    fingerprints: &[String],
    batch: usize,
    suffix: &str,
) -> Result<Row> {
    let n = fingerprints.len();
    let path = format!("/burst/alertmanager-{batch}{suffix}");
    let mut am = Alertmanager::start(
        rt,
        bin,
        &dir.join(format!("alertmanager-{batch}")),
        &hook.url(&path),
    )?;
    progress(format!(
        "fleet alerting, burst: the same {n} alerts to {}, {batch} per post",
        am.version
    ));
    let now = crate::now_ms();
    let bodies: Vec<Vec<u8>> = fingerprints
        .chunks(batch.max(1))
        .map(|c| am_body(c, now))
        .collect();
    let wanted: HashSet<&str> = fingerprints.iter().map(String::as_str).collect();
    let mut a = Series::start(am.proc.pid())?;
    let mut me = Series::start(std::process::id())?;
    let t0 = Instant::now();
    rt.block_on(alertmanager::post_alerts(am.port, bodies))?;
    let fed = t0.elapsed();
    let mut seen = HashSet::new();
    let done = |a: &Arrival| {
        seen.extend(
            am_alerts(a)
                .into_iter()
                .filter(|f| wanted.contains(f.as_str())),
        );
        seen.len() >= wanted.len()
    };
    let complete = hook.wait_until(&path, fp.alerting_burst_limit, done);
    std::thread::sleep(Duration::from_secs(1));
    a.take()?;
    me.take()?;
    am.proc.ensure_running()?;
    let arrivals = hook.take(&path);
    let alerts: Vec<(Instant, String)> = arrivals
        .iter()
        .flat_map(|a| am_alerts(a).into_iter().map(|f| (a.at, f)))
        .filter(|(_, f)| wanted.contains(f.as_str()))
        .collect();
    let distinct: HashSet<&str> = alerts.iter().map(|(_, f)| f.as_str()).collect();
    let since = |f: fn(Instant, Instant) -> Instant| {
        alerts
            .iter()
            .map(|(at, _)| *at)
            .reduce(f)
            .map(|at| at.saturating_duration_since(t0))
    };
    let (au, mu) = (a.usage()?, me.usage()?);
    am.proc.stop(Duration::from_secs(5));
    let mut note = Vec::new();
    if !complete {
        note.push(format!(
            "{} of {n} within {} s",
            distinct.len(),
            fp.alerting_burst_limit.as_secs()
        ));
    }
    let row = Row {
        sender: format!(
            "{}: POST /api/v2/alerts ({}) → webhook",
            am.version
                .split(" (")
                .next()
                .unwrap_or("Alertmanager")
                .replace("alertmanager, version", "Alertmanager"),
            if batch >= n {
                format!("all {n} in one post")
            } else {
                format!("{batch} per post, as Prometheus")
            }
        ),
        alerts: n,
        requests: arrivals.len(),
        body_bytes: mean_body(&arrivals),
        arrived: distinct.len(),
        repeats: alerts.len() - distinct.len(),
        per_post: Some(batch.min(n)),
        fed: Some(fed),
        first: since(std::cmp::min),
        last: since(std::cmp::max),
        latency_us: Vec::new(),
        cpu: au.cpu_pct,
        own_cpu: mu.cpu_pct,
        other: (mu.machine_pct - au.cpu_pct - mu.cpu_pct).max(0.0),
        note: note.join("; "),
    };
    progress(format!(
        "fleet alerting, burst: Alertmanager delivered {} of {n}, last {} after the first post",
        row.arrived,
        super::secs(row.last)
    ));
    Ok(row)
}

/// The table of both senders.
pub fn table(fp: &FleetPlan, b: &Burst, notes: &mut String) -> String {
    let mut out = format!(
        "Notifications per second to one webhook receiver (this tool's, as above). \
Outpost: {n} simulated agents on one gateway (embedded bus), each sending a result every \
{pace} s; at once every one of them turns CRITICAL and sends its next result at once; \
times are from that moment. Alertmanager: the same {n} alerts (the labels and \
annotations the gateway's Alertmanager receiver would send for them) posted to \
`/api/v2/alerts` of a new Alertmanager, twice: {batch} at a time on one connection, as \
Prometheus does, and all in one post (so that how fast this tool posts does not bound \
what Alertmanager delivers); its route has `group_by: ['...']` (each alert its own \
group, so its own notification), `group_wait: 0s`, and a `webhook_configs` to the same \
receiver; times are from the first post. The rate is alerts from the first arrival to the last (the sender's delivery), \
and from the start to the last. CPU is % of one core over the burst and a second \
after.\n\n\
| sender | alerts | arrived | requests (mean body) | repeats | alerts posted in | first arrival | last arrival | **notifications/s, first to last** | alerts/s, start to last | each alert: p50 / p99 from its result | sender's CPU | this tool's CPU | other CPU on the machine | note |\n\
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        n = b.outpost.alerts,
        pace = fp.alerting_pace.as_secs_f64(),
        batch = AM_BATCH,
    );
    let rate = |v: Option<f64>| v.map_or("—".into(), |v| format!("{v:.0}"));
    let mut row = |r: &Row| {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} ({} B) | {} | {} | {} | {} | **{}** | {} | {} | {:.0}% | {:.0}% | {:.0}% | {} |",
            r.sender,
            r.alerts,
            r.arrived,
            r.requests,
            r.body_bytes,
            r.repeats,
            super::secs(r.fed),
            super::secs(r.first),
            super::secs(r.last),
            rate(r.delivery_rate()),
            rate(r.overall_rate()),
            if r.latency_us.is_empty() {
                "—".to_string()
            } else {
                format!(
                    "{} / {}",
                    super::ms(crate::percentile(&r.latency_us, 50.0)),
                    super::ms(crate::percentile(&r.latency_us, 99.0))
                )
            },
            r.cpu,
            r.own_cpu,
            r.other,
            r.note,
        );
    };
    row(&b.outpost);
    match &b.alertmanager {
        Ok(rows) => rows.iter().for_each(&mut row),
        Err(e) => {
            let _ = writeln!(notes, "- Alertmanager: {e}");
        }
    }
    for r in std::iter::once(&b.outpost).chain(b.alertmanager.iter().flatten()) {
        crate::busy_note(notes, &r.sender, r.other, "its rate may be understated");
    }
    out.push('\n');
    out
}

/// The goal line: both rates.
pub fn goal(b: &Burst) -> String {
    let rate = |r: &Row| {
        r.delivery_rate()
            .map_or("not measured".into(), |v| format!("{v:.0}/s"))
    };
    match &b.alertmanager {
        Ok(am) => format!(
            "Alerting, notifications per second to one webhook receiver ({} alerts at once): Outpost {}, Alertmanager {} (first arrival to last).",
            b.outpost.alerts,
            rate(&b.outpost),
            am.iter()
                .map(|r| format!(
                    "{} fed {} per post",
                    rate(r),
                    r.per_post.unwrap_or_default()
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Err(e) => format!(
            "Alerting, notifications per second to one webhook receiver ({} alerts at once): Outpost {}; Alertmanager {e}.",
            b.outpost.alerts,
            rate(&b.outpost)
        ),
    }
}
