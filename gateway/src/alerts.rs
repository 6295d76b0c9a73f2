//! Alerts: for every (agent, check) of one tenant, whether something is wrong that people
//! must be told, and the notifications each change is due.
//!
//! This is the state machine alone: results go in ([`Alerts::apply`], in the order the bus
//! stored them), time goes in ([`Alerts::tick`]), notifications come out. Reading the bus
//! from a kept position, keeping this state, routing and delivering are layered on it, so
//! every rule here is tested without a clock, a disk or a network.
//!
//! The rules: only a hard state notifies (a soft one is a check still retrying); a hard
//! non-OK opens an incident, which notifies once it has lasted `for` (at once by default);
//! a change of status within it (warning to critical) notifies again; `repeat` re-notifies
//! a firing incident that long after the last notification; a hard OK closes it, and sends
//! a resolve only if something was notified. Every notification has an id made from the
//! incident (the sequence number of the result that opened it) and its place in it, so
//! the same notification made again (after a restart that replays results) has the same
//! id, and a receiver that dedupes drops it.

pub mod config;
pub mod deliver;
pub mod retry;
pub mod silence;
pub mod store;
pub mod webhook;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use outpost_protocol::{CheckResult, StateType, Status};
use serde::{Deserialize, Serialize};

/// When to notify, and whom: what the route of an alert says (see `config`).
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// How long an incident must last before it notifies (`for`).
    pub wait: Duration,
    /// Notify a firing incident again this long after its last notification.
    pub repeat: Option<Duration>,
    /// The receivers to tell. None: the alert is tracked, and notifies nobody (until a
    /// route names someone).
    pub receivers: Vec<String>,
    /// Silenced now: nothing fires (a resolve still goes out).
    pub muted: bool,
    /// The flapping measure's thresholds: it starts at or above the first, ends below
    /// the second (percent; see [`FLAP_START`]).
    pub flap: (f64, f64),
}

impl Policy {
    /// Tell `receivers` at once, never repeating.
    pub fn to(receivers: &[&str]) -> Policy {
        Policy {
            wait: Duration::ZERO,
            repeat: None,
            receivers: receivers.iter().map(|r| r.to_string()).collect(),
            muted: false,
            flap: (FLAP_START, FLAP_END),
        }
    }

    /// Notify nobody yet: what an evaluator that is catching up on history uses, so that
    /// incidents open and close in its state without telling anyone about the past.
    pub fn hold() -> Policy {
        Policy {
            wait: Duration::MAX,
            repeat: None,
            receivers: Vec::new(),
            muted: false,
            flap: (FLAP_START, FLAP_END),
        }
    }
}

/// The policy of an alert: its route, given the agent's fingerprint, the check and the
/// status it is at.
pub type Route<'a> = &'a dyn Fn(&str, &str, Status) -> Policy;

/// One (agent, check)'s state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    /// The newest hard status (soft results do not move it).
    pub status: Status,
    /// The newest result taken (one read again is ignored).
    pub seq: u64,
    /// The open incident, if the status is not OK.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incident: Option<Incident>,
    /// The newest hard result's first line of output.
    pub output: String,
    /// Incidents the gateway opened itself (see [`Alerts::observe`]), to number them.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub observed: u64,
    /// When it turned to its status (for dependencies: a parent just back still holds
    /// its children a while).
    #[serde(default)]
    pub status_since_ms: u64,
    /// The statuses of its last results (soft ones too), oldest first: the flapping
    /// measure's window.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recent: Vec<Status>,
    /// Flapping now: the episode, and who was told it began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flapping: Option<Flapping>,
    /// Flapping episodes so far (to name them).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub flaps: u64,
    /// Hard OK results in a row: a told incident resolves on the second (see
    /// [`RESOLVE_AFTER`]).
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub ok_streak: u32,
}

fn is_zero_u32(n: &u32) -> bool {
    *n == 0
}

/// A flapping episode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flapping {
    pub episode: u64,
    pub since_ms: u64,
    #[serde(default)]
    pub told: BTreeSet<String>,
}

/// The results the flapping measure looks at (as Nagios and Icinga: 21 results, so 20
/// changes of state at most).
pub const FLAP_WINDOW: usize = 21;
/// Flapping begins at this share of state changes (weighted, newest most), in percent…
pub const FLAP_START: f64 = 30.0;
/// …and ends below this one (the gap is the hysteresis: no flapping about flapping).
pub const FLAP_END: f64 = 25.0;
/// A told incident resolves after this many hard OK results in a row: a check that
/// blinks OK once between failures does not resolve and fire again (and a check that
/// flaps is seen as flapping before it has paged twice).
pub const RESOLVE_AFTER: u32 = 2;

/// The weighted share of state changes in `recent` (oldest first), in percent: each change
/// weighs from 0.8 (oldest of 20) to 1.2 (newest), over 20 possible changes.
pub fn flap_percent(recent: &[Status]) -> f64 {
    let changes = FLAP_WINDOW - 1;
    let mut sum = 0.0;
    // j: 0 for the newest change.
    for (j, pair) in recent.windows(2).rev().enumerate().take(changes) {
        if pair[0] != pair[1] {
            sum += 1.2 - 0.4 * j as f64 / (changes - 1) as f64;
        }
    }
    100.0 * sum / changes as f64
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A hard non-OK state, from its first result until a hard OK.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incident {
    /// The sequence number of the result that opened it: with the agent and check, it
    /// names the incident.
    pub opened_by: u64,
    /// Opened by the gateway's own observation (the agent lost, the check stale), not by
    /// a result: `opened_by` counts those, and the name is `o<n>`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub observed: bool,
    /// When it began (that result's start).
    pub since_ms: u64,
    /// Notifications sent for it so far.
    pub sent: u32,
    /// The status last notified and when (`None`: nothing yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notified: Option<(Status, u64)>,
    /// Every receiver told of it: each gets the resolve, once.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub told: BTreeSet<String>,
    /// Acknowledged: no repeats while it holds (a new status still notifies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acked: Option<Ack>,
}

/// Someone is on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Ack {
    pub by: String,
    pub comment: String,
    pub at_ms: u64,
    /// `None`: until the incident resolves.
    pub until_ms: Option<u64>,
}

impl Ack {
    pub fn holds(&self, now_ms: u64) -> bool {
        self.until_ms.is_none_or(|until| now_ms < until)
    }
}

/// What a notification says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The incident is (still) firing at `status`.
    Firing,
    /// The incident ended.
    Resolved,
    /// Told to the fallback receiver: another receiver refused this notification for good
    /// (`output` says which and why).
    Undeliverable,
    /// The check changes state too often: nothing more is said of it until it settles.
    Flapping,
    /// It settled (its status is in the notification; a told incident that ended
    /// meanwhile resolves with its own notification).
    Settled,
    /// `[alerting] watchdog`: alerting works (no agent or check: sent on a schedule).
    Watchdog,
}

/// One notification due.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notification {
    /// The same whenever this notification is made again: `<fingerprint>/<check>/<incident>/<n>`
    /// (`r` for the resolve).
    pub id: String,
    pub fingerprint: String,
    pub check: String,
    pub kind: Kind,
    /// The status it is about (the last firing one for a resolve).
    pub status: Status,
    /// The incident's start.
    pub since_ms: u64,
    /// When the notification was made: the result's start, or the tick's time.
    pub at_ms: u64,
    pub output: String,
    /// Whom to tell.
    pub receivers: Vec<String>,
}

/// A tenant's alerts, by agent fingerprint (or `entity:<name>` for a proxy entity's,
/// `gateway:<id>` for a gateway's) and check name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alerts {
    pub alerts: BTreeMap<String, BTreeMap<String, Alert>>,
    /// For the checks about proxy entities: each vantage point's newest hard state, by
    /// entity key, check and agent fingerprint (what a quorum is decided from).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub vantage: BTreeMap<String, BTreeMap<String, BTreeMap<String, Vantage>>>,
}

/// What one vantage point last saw of a check about an entity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vantage {
    pub status: Status,
    pub output: String,
    pub started_at_ms: u64,
    /// When it reached the gateway (the gateway's clock; a restart sets it to the start):
    /// what its age is counted from.
    #[serde(default)]
    pub seen_ms: u64,
    /// The agent's hostname (its fingerprint when it has none), for what alerts say.
    pub hostname: String,
}

impl Alerts {
    fn entry(&mut self, fingerprint: &str, check: &str) -> &mut Alert {
        self.alerts
            .entry(fingerprint.to_string())
            .or_default()
            .entry(check.to_string())
            .or_insert_with(|| Alert {
                status: Status::Ok,
                seq: 0,
                incident: None,
                output: String::new(),
                observed: 0,
                status_since_ms: 0,
                recent: Vec::new(),
                flapping: None,
                flaps: 0,
                ok_streak: 0,
            })
    }

    /// Take one result of agent `fingerprint`, in stored order; returns what it makes due.
    pub fn apply(
        &mut self,
        fingerprint: &str,
        result: &CheckResult,
        route: Route<'_>,
    ) -> Vec<Notification> {
        let alert = self.entry(fingerprint, &result.check);
        if result.seq <= alert.seq {
            return Vec::new();
        }
        alert.seq = result.seq;
        alert.recent.push(result.status);
        if alert.recent.len() > FLAP_WINDOW {
            alert.recent.remove(0);
        }
        let mut due = flap(
            fingerprint,
            &result.check,
            alert,
            result.started_at_ms,
            route,
        );
        if result.state_type == StateType::Soft {
            return due;
        }
        alert.ok_streak = match result.status {
            Status::Ok => alert.ok_streak.saturating_add(1),
            _ => 0,
        };
        due.extend(change(
            fingerprint,
            &result.check,
            alert,
            (result.status, &result.output),
            result.started_at_ms,
            Some(result.seq),
            route,
        ));
        due
    }

    /// A state the gateway observed itself rather than read in a result: an agent lost or
    /// back (its `outpost.agent` alert), a check that stopped reporting (stale) at
    /// `at_ms`. Nothing happens unless the status changes; the next result of the check
    /// (if it has any) goes on from it as usual.
    pub fn observe(
        &mut self,
        fingerprint: &str,
        check: &str,
        (status, output): (Status, &str),
        at_ms: u64,
        route: Route<'_>,
    ) -> Vec<Notification> {
        let alert = self.entry(fingerprint, check);
        if alert.status == status {
            // What is said of it may have changed (more agents lost with a gateway).
            if alert.output != output {
                alert.output = output.to_string();
            }
            return Vec::new();
        }
        // What the gateway sees itself needs no confirmation.
        alert.ok_streak = if status == Status::Ok {
            RESOLVE_AFTER
        } else {
            0
        };
        change(
            fingerprint,
            check,
            alert,
            (status, output),
            at_ms,
            None,
            route,
        )
    }

    /// The status of (`fingerprint`, `check`), if it has one.
    pub fn status(&self, fingerprint: &str, check: &str) -> Option<Status> {
        self.alerts.get(fingerprint)?.get(check).map(|a| a.status)
    }

    /// The time is `now_ms`: what waiting (`for`) and repeating make due.
    pub fn tick(&mut self, now_ms: u64, route: Route<'_>) -> Vec<Notification> {
        let mut due = Vec::new();
        for (fingerprint, checks) in &mut self.alerts {
            for (check, alert) in checks.iter_mut() {
                let Some(incident) = alert.incident.as_mut() else {
                    continue;
                };
                // Flapping says nothing; an incident waiting to resolve has nothing new.
                if alert.flapping.is_some() || alert.status == Status::Ok {
                    continue;
                }
                let policy = route(fingerprint, check, alert.status);
                let n = due_now(
                    fingerprint,
                    check,
                    alert.status,
                    &alert.output,
                    incident,
                    now_ms,
                    &policy,
                );
                due.extend(n);
            }
        }
        due
    }

    /// A firing notification (as it would be made now, at `now_ms`) for every incident
    /// that told `receiver` and still fires: what a receiver that forgets unrefreshed
    /// alerts (Alertmanager) is sent again.
    pub fn firing_told(&self, receiver: &str, now_ms: u64) -> Vec<Notification> {
        let mut out = Vec::new();
        for (fingerprint, checks) in &self.alerts {
            for (check, alert) in checks {
                let Some(incident) = &alert.incident else {
                    continue;
                };
                if incident.notified.is_none() || !incident.told.contains(receiver) {
                    continue;
                }
                out.push(Notification {
                    id: format!(
                        "{}/{}",
                        incident_name(fingerprint, check, incident),
                        incident.sent.saturating_sub(1)
                    ),
                    fingerprint: fingerprint.clone(),
                    check: check.clone(),
                    kind: Kind::Firing,
                    status: alert.status,
                    since_ms: incident.since_ms,
                    at_ms: now_ms,
                    output: alert.output.clone(),
                    receivers: vec![receiver.to_string()],
                });
            }
        }
        out
    }

    /// Acknowledge the open incident of (`fingerprint`, `check`).
    pub fn ack(&mut self, fingerprint: &str, check: &str, ack: Ack) -> Result<(), String> {
        match self
            .alerts
            .get_mut(fingerprint)
            .and_then(|c| c.get_mut(check))
            .and_then(|a| a.incident.as_mut())
        {
            Some(incident) => {
                incident.acked = Some(ack);
                Ok(())
            }
            None => Err(format!(
                "agent {fingerprint} has no open alert for check {check:?}: nothing to acknowledge"
            )),
        }
    }

    /// Forget an agent (forgotten or revoked): its incidents end without a word.
    pub fn forget(&mut self, fingerprint: &str) {
        self.alerts.remove(fingerprint);
    }
}

/// `alert` of (`fingerprint`, `check`) is now hard at `status` (from the result numbered
/// `seq`, or observed by the gateway when `None`) at `at_ms`: what that makes due.
fn change(
    fingerprint: &str,
    check: &str,
    alert: &mut Alert,
    (status, output): (Status, &str),
    at_ms: u64,
    seq: Option<u64>,
    route: Route<'_>,
) -> Vec<Notification> {
    if alert.status != status {
        alert.status_since_ms = at_ms;
    }
    alert.status = status;
    alert.output = output.to_string();
    let mut due = Vec::new();
    if status == Status::Ok {
        let told = alert
            .incident
            .as_ref()
            .is_some_and(|i| i.notified.is_some());
        // A told incident waits for its confirmation (and for the end of flapping): it
        // stays open, at OK.
        if told && (alert.flapping.is_some() || alert.ok_streak < RESOLVE_AFTER) {
            return due;
        }
        if let Some(incident) = alert.incident.take() {
            if let Some((said, _)) = incident.notified {
                due.push(Notification {
                    id: format!("{}/r", incident_name(fingerprint, check, &incident)),
                    fingerprint: fingerprint.to_string(),
                    check: check.to_string(),
                    kind: Kind::Resolved,
                    status: said,
                    since_ms: incident.since_ms,
                    at_ms,
                    output: output.to_string(),
                    receivers: incident.told.into_iter().collect(),
                });
            }
        }
        return due;
    }
    if alert.incident.is_none() {
        let (opened_by, observed) = match seq {
            Some(seq) => (seq, false),
            None => {
                alert.observed += 1;
                (alert.observed, true)
            }
        };
        alert.incident = Some(Incident {
            opened_by,
            observed,
            since_ms: at_ms,
            sent: 0,
            notified: None,
            told: BTreeSet::new(),
            acked: None,
        });
    }
    let incident = alert.incident.as_mut().expect("opened above");
    if alert.flapping.is_some() {
        return due;
    }
    let policy = route(fingerprint, check, status);
    due.extend(due_now(
        fingerprint,
        check,
        status,
        &alert.output,
        incident,
        at_ms,
        &policy,
    ));
    due
}

/// Update `alert`'s flapping from its recent results: the notification that it began or
/// settled, if it did. When it settles at OK, a told incident held open meanwhile resolves.
fn flap(
    fingerprint: &str,
    check: &str,
    alert: &mut Alert,
    at_ms: u64,
    route: Route<'_>,
) -> Vec<Notification> {
    let percent = flap_percent(&alert.recent);
    let (start, end) = route(fingerprint, check, alert.status).flap;
    let mut due = Vec::new();
    match &alert.flapping {
        None if percent >= start => {
            alert.flaps += 1;
            // Routed as its incident's status, or as a warning.
            let status = match alert.status {
                Status::Ok => Status::Warning,
                s => s,
            };
            let policy = route(fingerprint, check, status);
            let told: BTreeSet<String> = if policy.muted {
                BTreeSet::new()
            } else {
                policy.receivers.iter().cloned().collect()
            };
            if !told.is_empty() {
                due.push(Notification {
                    id: format!("{fingerprint}/{check}/flap{}/start", alert.flaps),
                    fingerprint: fingerprint.to_string(),
                    check: check.to_string(),
                    kind: Kind::Flapping,
                    status,
                    since_ms: at_ms,
                    at_ms,
                    output: format!(
                        "{check} is flapping: it changed state in {percent:.0}% of its last {} results; nothing more is said of it until it settles",
                        alert.recent.len()
                    ),
                    receivers: told.iter().cloned().collect(),
                });
            }
            alert.flapping = Some(Flapping {
                episode: alert.flaps,
                since_ms: at_ms,
                told,
            });
        }
        Some(_) if percent < end => {
            let flapping = alert.flapping.take().expect("matched");
            if !flapping.told.is_empty() {
                due.push(Notification {
                    id: format!("{fingerprint}/{check}/flap{}/end", flapping.episode),
                    fingerprint: fingerprint.to_string(),
                    check: check.to_string(),
                    kind: Kind::Settled,
                    status: alert.status,
                    since_ms: flapping.since_ms,
                    at_ms,
                    output: format!(
                        "{check} has settled at {}: {}",
                        deliver::status_name(alert.status),
                        alert.output
                    ),
                    receivers: flapping.told.into_iter().collect(),
                });
            }
        }
        _ => {}
    }
    due
}

/// `<fingerprint>/<check>/<incident>`: what names an incident (and, with the number of a
/// notification in it or `r`, each notification).
pub fn incident_name(fingerprint: &str, check: &str, incident: &Incident) -> String {
    let o = if incident.observed { "o" } else { "" };
    format!("{fingerprint}/{check}/{o}{}", incident.opened_by)
}

/// Whether `incident` (at `status`) must notify at `now_ms`, and if so the notification,
/// counted in the incident.
fn due_now(
    fingerprint: &str,
    check: &str,
    status: Status,
    output: &str,
    incident: &mut Incident,
    now_ms: u64,
    policy: &Policy,
) -> Option<Notification> {
    let waited = now_ms.saturating_sub(incident.since_ms) >= millis(policy.wait);
    let due = match incident.notified {
        None => waited,
        // A new status within the incident is news.
        Some((said, _)) if said != status => true,
        Some(_) if incident.acked.as_ref().is_some_and(|a| a.holds(now_ms)) => false,
        Some((_, at)) => policy
            .repeat
            .is_some_and(|every| now_ms.saturating_sub(at) >= millis(every)),
    };
    if !due || policy.muted || policy.receivers.is_empty() {
        return None;
    }
    let n = incident.sent;
    incident.sent += 1;
    incident.notified = Some((status, now_ms));
    incident.told.extend(policy.receivers.iter().cloned());
    Some(Notification {
        id: format!("{}/{n}", incident_name(fingerprint, check, incident)),
        fingerprint: fingerprint.to_string(),
        check: check.to_string(),
        kind: Kind::Firing,
        status,
        since_ms: incident.since_ms,
        at_ms: now_ms,
        output: output.to_string(),
        receivers: policy.receivers.clone(),
    })
}

/// `d` in milliseconds, `u64::MAX` for longer than that (as [`Policy::hold`]'s wait).
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "0f8fad5b-d9cb-469f-a165-70867728950e";

    fn result(seq: u64, status: Status, state_type: StateType) -> CheckResult {
        CheckResult {
            seq,
            started_at_ms: seq * 1000,
            state_type,
            ..CheckResult::new("disk", status, format!("run {seq}"))
        }
    }

    fn hard(seq: u64, status: Status) -> CheckResult {
        result(seq, status, StateType::Hard)
    }

    /// Every alert routed by `p`.
    fn r(p: &Policy) -> impl Fn(&str, &str, Status) -> Policy + '_ {
        move |_, _, _| p.clone()
    }

    fn kinds(n: &[Notification]) -> Vec<(Kind, Status, String)> {
        n.iter().map(|n| (n.kind, n.status, n.id.clone())).collect()
    }

    #[test]
    fn a_hard_failure_notifies_once_and_its_ok_resolves_once() {
        let (mut a, p) = (Alerts::default(), Policy::to(&["ops"]));
        assert!(a.apply(FP, &hard(1, Status::Ok), &r(&p)).is_empty());
        // Soft while the check retries: nothing.
        assert!(a
            .apply(FP, &result(2, Status::Critical, StateType::Soft), &r(&p))
            .is_empty());
        let fired = a.apply(FP, &hard(3, Status::Critical), &r(&p));
        assert_eq!(
            kinds(&fired),
            [(Kind::Firing, Status::Critical, format!("{FP}/disk/3/0"))]
        );
        // Still critical: nothing more.
        assert!(a.apply(FP, &hard(4, Status::Critical), &r(&p)).is_empty());
        assert!(
            a.tick(10_000_000, &r(&p)).is_empty(),
            "no repeat configured"
        );
        // A told incident resolves on its second OK in a row.
        assert!(a.apply(FP, &hard(5, Status::Ok), &r(&p)).is_empty());
        let resolved = a.apply(FP, &hard(6, Status::Ok), &r(&p));
        assert_eq!(
            kinds(&resolved),
            [(Kind::Resolved, Status::Critical, format!("{FP}/disk/3/r"))]
        );
        assert!(a.apply(FP, &hard(7, Status::Ok), &r(&p)).is_empty());
    }

    #[test]
    fn a_result_read_twice_changes_nothing() {
        let (mut a, p) = (Alerts::default(), Policy::to(&["ops"]));
        assert_eq!(a.apply(FP, &hard(3, Status::Critical), &r(&p)).len(), 1);
        assert!(a.apply(FP, &hard(3, Status::Critical), &r(&p)).is_empty());
        assert!(
            a.apply(FP, &hard(2, Status::Ok), &r(&p)).is_empty(),
            "older"
        );
        assert_eq!(a.alerts[FP]["disk"].status, Status::Critical);
    }

    #[test]
    fn an_incident_waits_for_its_for_and_one_shorter_never_notifies() {
        let p = Policy {
            wait: Duration::from_secs(60),
            repeat: None,
            receivers: vec!["ops".into()],
            muted: false,
            flap: (FLAP_START, FLAP_END),
        };
        let mut a = Alerts::default();
        // Critical at 10 s, OK at 40 s: shorter than the wait, nobody told, no resolve.
        assert!(a.apply(FP, &hard(10, Status::Critical), &r(&p)).is_empty());
        assert!(a.tick(30_000, &r(&p)).is_empty());
        assert!(a.apply(FP, &hard(40, Status::Ok), &r(&p)).is_empty());
        assert!(a.tick(200_000, &r(&p)).is_empty());
        // Critical at 100 s: due at 160 s, by a result or by the clock.
        assert!(a.apply(FP, &hard(100, Status::Critical), &r(&p)).is_empty());
        assert!(a.tick(159_999, &r(&p)).is_empty());
        let fired = a.tick(160_000, &r(&p));
        assert_eq!(
            kinds(&fired),
            [(Kind::Firing, Status::Critical, format!("{FP}/disk/100/0"))]
        );
        assert!(a.apply(FP, &hard(170, Status::Critical), &r(&p)).is_empty());
        assert!(a.apply(FP, &hard(180, Status::Ok), &r(&p)).is_empty());
        assert_eq!(a.apply(FP, &hard(181, Status::Ok), &r(&p)).len(), 1);
    }

    #[test]
    fn a_new_status_notifies_again_and_repeats_follow_the_last_notification() {
        let p = Policy {
            wait: Duration::ZERO,
            repeat: Some(Duration::from_secs(3600)),
            receivers: vec!["ops".into()],
            muted: false,
            flap: (FLAP_START, FLAP_END),
        };
        let mut a = Alerts::default();
        assert_eq!(a.apply(FP, &hard(1, Status::Warning), &r(&p)).len(), 1);
        let worse = a.apply(FP, &hard(2, Status::Critical), &r(&p));
        assert_eq!(
            kinds(&worse),
            [(Kind::Firing, Status::Critical, format!("{FP}/disk/1/1"))]
        );
        // An hour after the last notification (at 2 s), not after the first.
        assert!(a.tick(3_601_000, &r(&p)).is_empty());
        let again = a.tick(3_602_000, &r(&p));
        assert_eq!(
            kinds(&again),
            [(Kind::Firing, Status::Critical, format!("{FP}/disk/1/2"))]
        );
        assert!(a.tick(3_603_000, &r(&p)).is_empty());
        assert!(a.apply(FP, &hard(4000, Status::Ok), &r(&p)).is_empty());
        let resolved = a.apply(FP, &hard(4001, Status::Ok), &r(&p));
        assert_eq!(
            kinds(&resolved),
            [(Kind::Resolved, Status::Critical, format!("{FP}/disk/1/r"))]
        );
    }

    #[test]
    fn replaying_the_same_results_from_the_same_state_makes_the_same_ids() {
        let p = Policy::to(&["ops"]);
        let results = [
            hard(1, Status::Critical),
            hard(2, Status::Ok),
            hard(3, Status::Ok),
            hard(4, Status::Warning),
        ];
        let run = |a: &mut Alerts| -> Vec<Notification> {
            results
                .iter()
                .flat_map(|x| a.apply(FP, x, &r(&p)))
                .collect()
        };
        let (mut first, mut second) = (Alerts::default(), Alerts::default());
        let once = run(&mut first);
        let saved = serde_json::to_string(&first).unwrap();
        assert_eq!(run(&mut second), once);
        // State read back from its JSON goes on the same way.
        let mut back: Alerts = serde_json::from_str(&saved).unwrap();
        assert_eq!(back, first);
        back.apply(FP, &hard(5, Status::Ok), &r(&p));
        first.apply(FP, &hard(5, Status::Ok), &r(&p));
        let next = back.apply(FP, &hard(6, Status::Ok), &r(&p));
        assert_eq!(next, first.apply(FP, &hard(6, Status::Ok), &r(&p)));
        assert_eq!(next[0].id, format!("{FP}/disk/4/r"));
    }

    #[test]
    fn a_resolve_goes_once_to_everyone_told_whatever_route_told_them() {
        // Warnings tell the channel; criticals tell the channel and the pager.
        let route = |_: &str, _: &str, status: Status| match status {
            Status::Warning => Policy::to(&["chat"]),
            _ => Policy::to(&["chat", "pager"]),
        };
        let mut a = Alerts::default();
        let w = a.apply(FP, &hard(1, Status::Warning), &route);
        assert_eq!(w[0].receivers, ["chat"]);
        let c = a.apply(FP, &hard(2, Status::Critical), &route);
        assert_eq!(c[0].receivers, ["chat", "pager"]);
        // Back to warning, then OK: the resolve is one notification for both.
        assert_eq!(a.apply(FP, &hard(3, Status::Warning), &route).len(), 1);
        assert!(a.apply(FP, &hard(4, Status::Ok), &route).is_empty());
        let r = a.apply(FP, &hard(5, Status::Ok), &route);
        assert_eq!(r.len(), 1);
        assert_eq!(
            (r[0].kind, r[0].receivers.clone()),
            (
                Kind::Resolved,
                vec!["chat".to_string(), "pager".to_string()]
            )
        );
    }

    #[test]
    fn held_incidents_tell_nobody_until_the_real_routes_apply() {
        let mut a = Alerts::default();
        let hold = |_: &str, _: &str, _: Status| Policy::hold();
        // History: an incident that ended and one still open.
        assert!(a.apply(FP, &hard(1, Status::Critical), &hold).is_empty());
        assert!(a.apply(FP, &hard(2, Status::Ok), &hold).is_empty());
        let other = CheckResult {
            check: "load".into(),
            ..hard(3, Status::Warning)
        };
        assert!(a.apply(FP, &other, &hold).is_empty());
        assert!(a.tick(u64::MAX - 1, &hold).is_empty(), "held however late");
        // Caught up: the open one notifies, the closed one never does.
        let p = Policy::to(&["ops"]);
        let due = a.tick(10_000, &r(&p));
        assert_eq!(
            kinds(&due),
            [(Kind::Firing, Status::Warning, format!("{FP}/load/3/0"))]
        );
        // An unrouted alert is tracked and tells nobody; a route added later does.
        let nobody = |_: &str, _: &str, _: Status| Policy::to(&[]);
        assert!(a.apply(FP, &hard(5, Status::Critical), &nobody).is_empty());
        assert_eq!(a.tick(20_000, &r(&p)).len(), 1);
    }

    #[test]
    fn firing_told_lists_what_still_fires_for_that_receiver() {
        let mut a = Alerts::default();
        let p = Policy::to(&["am"]);
        a.apply(FP, &hard(1, Status::Critical), &r(&p));
        let load = CheckResult {
            check: "load".into(),
            ..hard(2, Status::Warning)
        };
        a.apply(FP, &load, &r(&Policy::to(&["chat"])));
        let firing = a.firing_told("am", 99);
        assert_eq!(firing.len(), 1);
        assert_eq!((firing[0].check.as_str(), firing[0].at_ms), ("disk", 99));
        a.apply(FP, &hard(3, Status::Ok), &r(&p));
        a.apply(FP, &hard(4, Status::Ok), &r(&p));
        assert!(a.firing_told("am", 100).is_empty());
    }

    #[test]
    fn a_silenced_alert_notifies_when_the_silence_ends_and_a_resolve_is_never_silenced() {
        let (on, off) = (
            Policy {
                muted: true,
                ..Policy::to(&["ops"])
            },
            Policy::to(&["ops"]),
        );
        let mut a = Alerts::default();
        assert!(a.apply(FP, &hard(1, Status::Critical), &r(&on)).is_empty());
        assert!(a.tick(5_000, &r(&on)).is_empty());
        // The silence ends while it still fires: told then.
        assert_eq!(
            kinds(&a.tick(6_000, &r(&off))),
            [(Kind::Firing, Status::Critical, format!("{FP}/disk/1/0"))]
        );
        // Silenced again, it resolves: the resolve goes out all the same.
        assert!(a.apply(FP, &hard(7, Status::Ok), &r(&on)).is_empty());
        let resolved = a.apply(FP, &hard(8, Status::Ok), &r(&on));
        assert_eq!(
            kinds(&resolved),
            [(Kind::Resolved, Status::Critical, format!("{FP}/disk/1/r"))]
        );
        // One that never notified resolves silently under a silence.
        assert!(a.apply(FP, &hard(9, Status::Warning), &r(&on)).is_empty());
        assert!(a.apply(FP, &hard(10, Status::Ok), &r(&on)).is_empty());
    }

    #[test]
    fn an_acknowledged_alert_does_not_repeat_until_it_resolves_or_the_ack_ends() {
        let p = Policy {
            repeat: Some(Duration::from_secs(60)),
            ..Policy::to(&["ops"])
        };
        let mut a = Alerts::default();
        assert_eq!(a.apply(FP, &hard(1, Status::Warning), &r(&p)).len(), 1);
        let ack = Ack {
            by: "ann".into(),
            comment: "on it".into(),
            at_ms: 2_000,
            until_ms: Some(300_000),
        };
        a.ack(FP, "disk", ack).unwrap();
        assert!(a
            .ack(
                FP,
                "load",
                Ack {
                    by: "x".into(),
                    comment: String::new(),
                    at_ms: 0,
                    until_ms: None
                }
            )
            .is_err());
        assert!(
            a.tick(200_000, &r(&p)).is_empty(),
            "no repeat while acknowledged"
        );
        // A new status is news even so.
        assert_eq!(a.apply(FP, &hard(210, Status::Critical), &r(&p)).len(), 1);
        assert!(a.tick(290_000, &r(&p)).is_empty());
        // The acknowledgement ends: repeats again.
        assert_eq!(a.tick(300_000, &r(&p)).len(), 1);
        // Resolved: the next incident starts unacknowledged.
        a.apply(FP, &hard(400, Status::Ok), &r(&p));
        assert_eq!(a.apply(FP, &hard(401, Status::Ok), &r(&p)).len(), 1);
        a.apply(FP, &hard(402, Status::Warning), &r(&p));
        assert!(a.alerts[FP]["disk"]
            .incident
            .as_ref()
            .unwrap()
            .acked
            .is_none());
    }

    #[test]
    fn the_flapping_measure_weighs_newer_changes_more() {
        use Status::{Critical as C, Ok as O};
        assert_eq!(flap_percent(&[O; 21]), 0.0);
        let toggling: Vec<Status> = (0..21).map(|i| if i % 2 == 0 { O } else { C }).collect();
        assert!((flap_percent(&toggling) - 100.0).abs() < 1e-9);
        // One change, newest (1.2) or oldest (0.8) of twenty.
        let mut newest = vec![O; 20];
        newest.push(C);
        assert!((flap_percent(&newest) - 6.0).abs() < 1e-9);
        let mut oldest = vec![C];
        oldest.extend([O; 20]);
        assert!((flap_percent(&oldest) - 4.0).abs() < 1e-9);
    }

    #[test]
    fn a_check_tuned_to_flap_later_is_told_each_change_until_it_does() {
        // A change every third run: about 33% of changes, flapping by default (30%),
        // not with a start of 50%.
        let run = |p: &Policy| {
            let mut a = Alerts::default();
            let mut said = Vec::new();
            for i in 0..60u64 {
                let status = if (i / 3) % 2 == 0 {
                    Status::Ok
                } else {
                    Status::Critical
                };
                said.extend(a.apply(FP, &hard(i + 1, status), &r(p)));
            }
            said.iter().filter(|n| n.kind == Kind::Flapping).count()
        };
        assert_eq!(run(&Policy::to(&["ops"])), 1);
        let late = Policy {
            flap: (50.0, 40.0),
            ..Policy::to(&["ops"])
        };
        assert_eq!(run(&late), 0);
    }

    #[test]
    fn a_check_toggling_at_every_run_says_two_things_then_one_when_it_settles() {
        let p = Policy::to(&["ops"]);
        let mut a = Alerts::default();
        let mut seq = 0;
        let mut run = |a: &mut Alerts, status| {
            seq += 1;
            a.apply(FP, &hard(seq, status), &r(&p))
        };
        for _ in 0..30 {
            assert!(run(&mut a, Status::Ok).is_empty());
        }
        // Ten minutes of a check every 10 s changing state at every run.
        let mut said = Vec::new();
        for i in 0..60 {
            let status = if i % 2 == 0 {
                Status::Critical
            } else {
                Status::Ok
            };
            said.extend(run(&mut a, status));
        }
        assert_eq!(
            said.iter().map(|n| n.kind).collect::<Vec<_>>(),
            [Kind::Firing, Kind::Flapping],
            "{said:#?}"
        );
        // It settles at OK: one word that it settled, and the resolve of what was told.
        let mut after = Vec::new();
        for _ in 0..30 {
            after.extend(run(&mut a, Status::Ok));
        }
        let kinds: Vec<Kind> = after.iter().map(|n| n.kind).collect();
        assert_eq!(kinds, [Kind::Settled, Kind::Resolved], "{after:#?}");
        assert_eq!(after[0].id, format!("{FP}/disk/flap1/end"));
        assert!(a.alerts[FP]["disk"].incident.is_none());
        // Settling at CRITICAL: the incident goes on, told as usual.
        let mut b = Alerts::default();
        let mut seq = 0;
        let mut said = Vec::new();
        for i in 0..40 {
            seq += 1;
            let status = if i % 2 == 0 {
                Status::Critical
            } else {
                Status::Ok
            };
            said.extend(b.apply(FP, &hard(seq, status), &r(&p)));
        }
        for _ in 0..30 {
            seq += 1;
            said.extend(b.apply(FP, &hard(seq, Status::Critical), &r(&p)));
        }
        let kinds: Vec<Kind> = said.iter().map(|n| n.kind).collect();
        assert_eq!(
            kinds,
            [Kind::Firing, Kind::Flapping, Kind::Settled],
            "{said:#?}"
        );
    }

    #[test]
    fn a_blink_of_ok_between_failures_neither_resolves_nor_fires_again() {
        let p = Policy::to(&["ops"]);
        let mut a = Alerts::default();
        assert_eq!(a.apply(FP, &hard(1, Status::Critical), &r(&p)).len(), 1);
        assert!(a.apply(FP, &hard(2, Status::Ok), &r(&p)).is_empty());
        assert!(
            a.apply(FP, &hard(3, Status::Critical), &r(&p)).is_empty(),
            "same incident"
        );
        assert!(a.tick(10_000, &r(&p)).is_empty());
        // An OK that never told anyone closes at once.
        let mut b = Alerts::default();
        let wait = Policy {
            wait: Duration::from_secs(60),
            ..Policy::to(&["ops"])
        };
        assert!(b
            .apply(FP, &hard(1, Status::Critical), &r(&wait))
            .is_empty());
        assert!(b.apply(FP, &hard(2, Status::Ok), &r(&wait)).is_empty());
        assert!(b.alerts[FP]["disk"].incident.is_none());
    }
}
