//! Alerting: how long a failing result takes to become a webhook receiver's 2xx, and how
//! many notifications a second one receiver gets, next to Prometheus Alertmanager.
//!
//! - [`latency`]: many simulated agents sending a result every few seconds, 1% of them
//!   turning CRITICAL (hard) at spread times and then OK again. Each notification's
//!   arrival at this tool's webhook receiver ([`hook`]) is matched to the moment the load
//!   generator sent the result that made it: the first CRITICAL one for the firing, the
//!   second OK in a row (the one that resolves, see docs/ALERTING.md) for the resolve.
//!   On one gateway (embedded bus) and on a NATS fleet of two gateways.
//! - [`burst`]: many agents' check turning CRITICAL at once on one gateway, and the
//!   notifications per second that reach the receiver; then the same alerts posted to
//!   Alertmanager ([`alertmanager`]), set to notify each alert on its own at once, which
//!   delivers to the same receiver.
//!
//! The gateways are the release binaries with their alerting configured in the tenant's
//! check files (`checks.d`, or `config push` in the fleet); nothing here reads their
//! state: only what reaches the receiver counts.

pub mod alertmanager;
mod burst;
mod hook;
mod latency;
mod restart;

use outpost_sys::lock;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use outpost_protocol::{CheckResult, Status};

use super::loadgen::{self, Batches};
use crate::harness::Bins;
use crate::{percentile, progress};
use hook::{Arrival, Hook};

/// The check the simulated agents' results are of (the load generator's).
const CHECK: &str = "sim";
/// The receiver's name in the tenant's alerting.
const RECEIVER: &str = "bench";
/// What a failing result says.
const CRITICAL_OUTPUT: &str = "DISK CRITICAL - free space: / 212 MB (2%);";

/// The tenant's alerting: one webhook receiver at `url` (no secret), and one route taking
/// every non-OK state of [`CHECK`] to it at once (no `for`, no repeat).
fn alerting_toml(url: &str) -> String {
    format!(
        "[[receiver]]\nname = {RECEIVER:?}\ntimeout = \"10s\"\nwebhook = {{ url = {url:?} }}\n\n\
         [[route]]\nchecks = [{CHECK:?}]\nreceivers = [{RECEIVER:?}]\n"
    )
}

/// One result sent by an agent the script watches.
#[derive(Clone, Copy)]
struct Sent {
    agent: usize,
    critical: bool,
    at: Instant,
}

/// The script of the alerting runs: each agent's results are OK or CRITICAL (hard, one
/// attempt) as the benchmark sets them, and the sends of the agents it watches are kept
/// with the moment each was made.
struct Flips {
    critical: Vec<AtomicBool>,
    watched: Vec<bool>,
    sends: Mutex<Vec<Sent>>,
}

impl Flips {
    fn new(n: usize, watched: impl Fn(usize) -> bool) -> Arc<Flips> {
        Arc::new(Flips {
            critical: (0..n).map(|_| AtomicBool::new(false)).collect(),
            watched: (0..n).map(watched).collect(),
            sends: Mutex::new(Vec::new()),
        })
    }

    fn set(&self, agent: usize, critical: bool) {
        self.critical[agent].store(critical, Ordering::Relaxed);
    }

    /// The sends of `agent`, oldest first.
    fn sends_of(&self, agent: usize) -> Vec<Sent> {
        lock(&self.sends)
            .iter()
            .filter(|s| s.agent == agent)
            .copied()
            .collect()
    }

    /// When `agent` sent its first CRITICAL result.
    fn first_critical(&self, agent: usize) -> Option<Instant> {
        self.sends_of(agent)
            .iter()
            .find(|s| s.critical)
            .map(|s| s.at)
    }

    /// When `agent` sent the result that resolves its incident: the second OK in a row
    /// after its last CRITICAL one.
    fn resolving(&self, agent: usize) -> Option<Instant> {
        let sends = self.sends_of(agent);
        let last_critical = sends.iter().rposition(|s| s.critical)?;
        sends.get(last_critical + 2).map(|s| s.at)
    }
}

impl Batches for Flips {
    fn batch(&self, agent: usize, _: &str, first_seq: u64, n: usize) -> Vec<CheckResult> {
        let critical = self
            .critical
            .get(agent)
            .is_some_and(|c| c.load(Ordering::Relaxed));
        if self.watched.get(agent).copied().unwrap_or(false) {
            lock(&self.sends).push(Sent {
                agent,
                critical,
                at: Instant::now(),
            });
        }
        (0..n as u64)
            .map(|i| {
                let mut r = loadgen::result(CHECK, first_seq + i);
                if critical {
                    r.status = Status::Critical;
                    r.output = CRITICAL_OUTPUT.into();
                    r.exit_code = Some(2);
                }
                r
            })
            .collect()
    }
}

/// One notification of the gateway's generic webhook, as the receiver got it.
struct Told {
    at: Instant,
    /// `type`: `alert.firing`, `alert.resolved`, …
    kind: String,
    id: String,
    fingerprint: String,
    check: String,
}

/// `a` as one of the gateway's notifications, if it is one.
fn told_one(a: &Arrival) -> Option<Told> {
    let v = serde_json::from_slice::<serde_json::Value>(&a.body).ok()?;
    let s = |p: &str| {
        v.pointer(p)
            .and_then(|x| x.as_str())
            .unwrap_or_default()
            .to_string()
    };
    Some(Told {
        at: a.at,
        kind: s("/type"),
        id: s("/data/id"),
        fingerprint: s("/data/agent/fingerprint"),
        check: s("/data/check"),
    })
}

/// The gateway's notifications among `arrivals`, and how many did not parse.
fn told(arrivals: &[Arrival]) -> (Vec<Told>, usize) {
    let out: Vec<Told> = arrivals.iter().filter_map(told_one).collect();
    let bad = arrivals.len() - out.len();
    (out, bad)
}

/// A [`Hook::wait_until`] test: enough once every one of `fingerprints` has had a `kind`
/// notification of [`CHECK`].
fn every<'a>(
    kind: &'static str,
    fingerprints: &'a HashMap<String, usize>,
) -> impl FnMut(&Arrival) -> bool + 'a {
    let mut seen = std::collections::HashSet::new();
    move |a| {
        if let Some(t) = told_one(a) {
            if t.kind == kind && t.check == CHECK && fingerprints.contains_key(&t.fingerprint) {
                seen.insert(t.fingerprint);
            }
        }
        seen.len() >= fingerprints.len()
    }
}

/// Notifications of one kind matched to the sends that made them.
#[derive(Default)]
struct Matched {
    /// From the send to the arrival, in µs, sorted.
    latency_us: Vec<u64>,
    /// Expected and never arrived.
    missing: usize,
    /// Arrived more than once for one agent: the extra ones, and how many of those had
    /// an id seen before (a repeat the receiver can drop) rather than a new one.
    duplicates: usize,
    duplicates_same_id: usize,
    /// The agent never sent the result that would make it (its session ended?).
    not_sent: usize,
    /// Arrived before the result it is matched to was sent (a mismatch).
    early: usize,
}

impl Matched {
    /// Match the `kind` notifications of [`CHECK`] in `told` to `expected`: fingerprint →
    /// the moment its making result was sent.
    fn of(told: &[Told], kind: &str, expected: &HashMap<String, Option<Instant>>) -> Matched {
        let mut by_fp: HashMap<&str, Vec<&Told>> = HashMap::new();
        for t in told.iter().filter(|t| t.kind == kind && t.check == CHECK) {
            by_fp.entry(t.fingerprint.as_str()).or_default().push(t);
        }
        let mut m = Matched::default();
        for (fp, sent) in expected {
            let got = by_fp.get(fp.as_str()).map(Vec::as_slice).unwrap_or(&[]);
            let Some(sent) = sent else {
                m.not_sent += 1;
                continue;
            };
            let Some(first) = got.iter().min_by_key(|t| t.at) else {
                m.missing += 1;
                continue;
            };
            m.duplicates += got.len() - 1;
            m.duplicates_same_id += got.iter().filter(|t| t.id == first.id).count() - 1;
            match first.at.checked_duration_since(*sent) {
                Some(d) => m.latency_us.push(d.as_micros() as u64),
                None => m.early += 1,
            }
        }
        m.latency_us.sort_unstable();
        m
    }

    fn arrived(&self) -> usize {
        self.latency_us.len() + self.early
    }

    /// p50 / p99 / max in ms, for a table.
    fn cells(&self) -> [String; 3] {
        if self.latency_us.is_empty() {
            return ["—".into(), "—".into(), "—".into()];
        }
        [
            ms(percentile(&self.latency_us, 50.0)),
            format!("**{}**", ms(percentile(&self.latency_us, 99.0))),
            ms(self.latency_us.last().copied().unwrap_or(0)),
        ]
    }

    /// What went wrong, if anything, for a note.
    fn problems(&self) -> Option<String> {
        let mut p = Vec::new();
        if self.missing > 0 {
            p.push(format!("{} never arrived", self.missing));
        }
        if self.duplicates > 0 {
            p.push(format!(
                "{} arrived more than once ({} of the repeats with the same id)",
                self.duplicates, self.duplicates_same_id
            ));
        }
        if self.not_sent > 0 {
            p.push(format!(
                "{} agents never sent the result that would make it",
                self.not_sent
            ));
        }
        if self.early > 0 {
            p.push(format!(
                "{} arrived before the result matched to it was sent",
                self.early
            ));
        }
        (!p.is_empty()).then(|| p.join("; "))
    }
}

fn ms(us: u64) -> String {
    if us >= 100_000 {
        format!("{:.0} ms", us as f64 / 1000.0)
    } else {
        format!("{:.1} ms", us as f64 / 1000.0)
    }
}

fn secs(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.2} s", d.as_secs_f64()))
        .unwrap_or("—".into())
}

/// Part: alerting latency and notifications per second.
pub fn alerting(bins: &Bins, work: &Path, plan: &crate::Plan) -> Result<(String, Vec<String>)> {
    let fp = &plan.fleet;
    let dir = work.join("fleet-alerting");
    let rt = loadgen::runtime()?;
    let hook = Hook::start()?;
    progress(format!(
        "fleet alerting: webhook receiver on {}",
        hook.url("/")
    ));
    let mut latency_rows = Vec::new();
    let mut notes = String::new();
    let setups: [(&str, latency::Setup); 2] = [
        ("one gateway", latency::Setup::Single),
        ("NATS fleet", latency::Setup::Fleet),
    ];
    for (label, setup) in setups {
        if setup == latency::Setup::Fleet {
            if !super::gateway_has_nats(bins) {
                let _ = writeln!(notes, "- {label}: {}.", super::NO_NATS_BUS);
                continue;
            }
            if let Err(e) = super::nats::find_server(fp.nats_server.as_deref()) {
                let _ = writeln!(notes, "- {label}: not run: {e:#}.");
                continue;
            }
        }
        let row = crate::measured(plan, &format!("fleet alerting, {label}"), |suffix| {
            latency::run(bins, &dir, rt.handle(), fp, &hook, setup, suffix)
        });
        match row {
            Ok(r) => latency_rows.push(r),
            Err(e) => {
                progress(format!("fleet alerting, {label} failed: {e:#}"));
                let _ = writeln!(notes, "- {label}: **failed:** {e:#}");
            }
        }
    }
    let burst = crate::measured(plan, "fleet alerting, burst", |suffix| {
        burst::run(bins, &dir, rt.handle(), fp, &hook, suffix)
    });
    // A correctness run, not a speed one: measured once, however busy the machine.
    let restart = if !super::gateway_has_nats(bins) {
        Err(anyhow::anyhow!(super::NO_NATS_BUS))
    } else {
        super::nats::find_server(fp.nats_server.as_deref())
            .and_then(|_| restart::run(bins, &dir, rt.handle(), fp, &hook))
    };
    drop(hook);
    rt.shutdown_timeout(Duration::from_secs(5));

    let mut out = latency::table(fp, &latency_rows, &mut notes);
    let mut goals = Vec::new();
    for r in &latency_rows {
        goals.push(format!(
            "Alerting, result to a webhook's 2xx ({}, {} agents, {} failing): p50 {}, p99 {} ({} of {} firings arrived{}).",
            r.setup,
            r.agents,
            r.failing,
            r.firing.cells()[0],
            r.firing.cells()[1],
            r.firing.arrived(),
            r.failing,
            if r.firing.duplicates > 0 {
                format!(", {} twice", r.firing.duplicates)
            } else {
                String::new()
            }
        ));
    }
    match burst {
        Ok(b) => {
            out.push_str(&burst::table(fp, &b, &mut notes));
            goals.push(burst::goal(&b));
        }
        Err(e) => {
            progress(format!("fleet alerting, burst failed: {e:#}"));
            let _ = writeln!(notes, "- notifications per second: **failed:** {e:#}");
        }
    }
    match restart {
        Ok(r) => {
            out.push_str(&restart::table(&r, &mut notes));
            goals.push(restart::goal(&r));
        }
        Err(e) => {
            progress(format!("fleet alerting, restart failed: {e:#}"));
            let _ = writeln!(notes, "- every gateway restarted: **not run:** {e:#}");
        }
    }
    if !notes.is_empty() {
        out.push_str(&notes);
        out.push('\n');
    }
    Ok((out, goals))
}
