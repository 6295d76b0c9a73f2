//! A tenant's alerting configuration: `[alerting]`, `[[receiver]]` and `[[route]]` tables
//! in its check files (any file; they travel with the checks, `config push` included).
//!
//! ```toml
//! [alerting]
//! fallback = "ops-mail"          # told when a notification is refused for good
//! watchdog = { receiver = "deadman", every = "1m" }   # "alerting works", on a schedule
//!
//! [[receiver]]
//! name = "ops-hook"
//! timeout = "10s"
//! webhook = { url = "https://hooks.example.com/outpost", secret = "whsec_…" }
//!
//! [[route]]                      # the first route that matches an alert decides
//! checks = ["disk*", "load"]     # globs (`*`, `?`); none: every check
//! labels = { role = "db" }       # every one must be on the agent
//! groups = ["eu"]                # the agent is in one of them
//! severity = ["critical"]        # warning, critical, unknown; none: any
//! receivers = ["ops-hook"]
//! for = "5m"                     # firing this long before anyone is told
//! repeat = "4h"                  # told again while it fires
//! group_by = ["check"]           # one notification for the alerts of a group…
//! group_wait = "10s"             # …queued within this of the first
//! ```
//!
//! Each file is parsed on its own (every problem in it listed, and a file with one keeps
//! its last good version, as for checks); then the files are put together, which finds
//! what only the whole can: a route naming a receiver no file declares, a name declared
//! twice.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost_protocol::checkfile::{duration_value, Target};
use outpost_protocol::Status;
use serde::Deserialize;

use super::webhook::Secret;
use super::Policy;

/// How long a receiver is given to answer when its table does not say.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a receiver may be given.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(120);

/// A tenant's alerting, put together from all its files.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertConfig {
    pub receivers: BTreeMap<String, Receiver>,
    pub routes: Vec<RouteDef>,
    /// The receiver told when a notification is refused for good.
    pub fallback: Option<String>,
    /// A silence in force this long (and not permanent) is reported as maybe forgotten.
    pub silence_max_age: Duration,
    pub dependencies: Vec<Dependency>,
    /// A dead man's switch: told that alerting works, every so often.
    pub watchdog: Option<Watchdog>,
    /// How checks are judged, where the defaults do not fit (`[[tuning]]`, in file order).
    pub tunings: Vec<Tuning>,
}

/// `[[tuning]]`: how the checks its globs match are judged. For each setting, the first
/// tuning (by file name, then order in the file) that matches a check and sets it wins.
#[derive(Debug, Clone, PartialEq)]
pub struct Tuning {
    pub checks: Vec<String>,
    /// When a check of an online agent that sends nothing turns stale (UNKNOWN).
    pub stale_after: Option<Stale>,
    /// The flapping measure's start and end thresholds (percent).
    pub flapping: Option<(f64, f64)>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Stale {
    After(Duration),
    Never,
}

/// `[alerting] watchdog`: `receiver` is told every `every` that alerting works, so that a
/// dead man's switch there (Healthchecks, Dead Man's Snitch, Alertmanager's Watchdog
/// routing) notices when it stops.
#[derive(Debug, Clone, PartialEq)]
pub struct Watchdog {
    pub receiver: String,
    pub every: Duration,
}

/// `every` when the watchdog does not give one, and the least it may be.
pub const DEFAULT_WATCHDOG_EVERY: Duration = Duration::from_secs(60);
pub const MIN_WATCHDOG_EVERY: Duration = Duration::from_secs(10);

/// Checks that depend on another: while the parent is down (not OK, or its agent lost),
/// the children's alerts are held, and a failing child waits `wait` for its parent to be
/// judged before it notifies, so which of them fails first does not matter.
#[derive(Debug, Clone, PartialEq)]
pub struct Dependency {
    /// The children: check globs (none: every check)…
    pub checks: Vec<String>,
    /// …of the agents with these labels and groups…
    pub target: Target,
    /// …or of this agent (fingerprint or hostname).
    pub agent: Option<String>,
    /// The parent: a check of this agent (none: the child's own agent).
    pub on_agent: Option<String>,
    pub on_check: String,
    pub wait: Duration,
}

/// A dependency's `wait` when it does not give one.
pub const DEFAULT_DEPENDENCY_WAIT: Duration = Duration::from_secs(30);

impl Dependency {
    /// Whether check `check` of the agent (`fingerprint`, `hostname`, labels, groups) is a
    /// child of this dependency.
    pub fn has_child(
        &self,
        fingerprint: &str,
        hostname: &str,
        labels: &BTreeMap<String, String>,
        groups: &[String],
        check: &str,
    ) -> bool {
        self.agent
            .as_deref()
            .is_none_or(|a| a == fingerprint || a == hostname)
            && self.target.matches(labels, groups)
            && (self.checks.is_empty() || self.checks.iter().any(|g| glob(g, check)))
            // A check is never its own parent.
            && !(self.on_check == check
                && self
                    .on_agent
                    .as_deref()
                    .is_none_or(|a| a == fingerprint || a == hostname))
    }
}

/// Dependencies that form a cycle (a check that would, through others, depend on
/// itself): the first one found, named by its place.
fn dependency_cycle(deps: &[(String, usize, Dependency)]) -> Option<String> {
    // Edge i -> j: i's parent is one of j's children, as far as the files show. Agents'
    // labels and groups are not known here: a dependency that selects its children by them
    // is taken not to hold another's parent (per-site dependencies must not be refused as
    // a cycle); one naming its agent, or taking every agent, is compared.
    let may_be_child = |parent: &Dependency, of: &Dependency| {
        (of.checks.is_empty() || of.checks.iter().any(|g| glob(g, &parent.on_check)))
            && match (&of.agent, &parent.on_agent) {
                (Some(a), Some(b)) => a == b,
                (Some(_), None) => false,
                (None, _) => of.target.labels.is_empty() && of.target.groups.is_empty(),
            }
    };
    let n = deps.len();
    // 0: not seen, 1: on the path, 2: done.
    let mut mark = vec![0u8; n];
    fn visit(
        i: usize,
        deps: &[(String, usize, Dependency)],
        mark: &mut [u8],
        path: &mut Vec<usize>,
        edge: &dyn Fn(&Dependency, &Dependency) -> bool,
    ) -> Option<Vec<usize>> {
        mark[i] = 1;
        path.push(i);
        for j in 0..deps.len() {
            // A parent is never a child of its own dependency (see `has_child`).
            if j == i || !edge(&deps[i].2, &deps[j].2) {
                continue;
            }
            if mark[j] == 1 {
                let from = path.iter().position(|&k| k == j).unwrap_or(0);
                return Some(path[from..].to_vec());
            }
            if mark[j] == 0 {
                if let Some(c) = visit(j, deps, mark, path, edge) {
                    return Some(c);
                }
            }
        }
        path.pop();
        mark[i] = 2;
        None
    }
    for i in 0..n {
        if mark[i] == 0 {
            let mut path = Vec::new();
            if let Some(cycle) = visit(i, deps, &mut mark, &mut path, &may_be_child) {
                let names: Vec<String> = cycle
                    .iter()
                    .map(|&k| {
                        let (file, at, d) = &deps[k];
                        format!(
                            "{file} dependency #{} (on {}/{})",
                            at + 1,
                            d.on_agent.as_deref().unwrap_or("its own agent"),
                            d.on_check
                        )
                    })
                    .collect();
                return Some(names.join(" -> "));
            }
        }
    }
    None
}

/// `silence_max_age` when `[alerting]` does not give one.
pub const DEFAULT_SILENCE_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

impl Default for AlertConfig {
    fn default() -> AlertConfig {
        AlertConfig {
            receivers: BTreeMap::new(),
            routes: Vec::new(),
            fallback: None,
            silence_max_age: DEFAULT_SILENCE_MAX_AGE,
            dependencies: Vec::new(),
            watchdog: None,
            tunings: Vec::new(),
        }
    }
}

/// Where notifications go.
#[derive(Debug, Clone, PartialEq)]
pub struct Receiver {
    pub name: String,
    pub timeout: Duration,
    /// The longest our backoff between two attempts grows to (a `Retry-After` may ask for
    /// more).
    pub retry_max: Duration,
    pub kind: ReceiverKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ReceiverKind {
    /// A generic webhook, signed per Standard Webhooks when it has a secret.
    Webhook {
        url: String,
        secret: Option<Secretive>,
    },
    /// A Slack incoming webhook.
    Slack { url: String },
    /// PagerDuty Events API v2.
    PagerDuty { url: String, routing_key: Secretive },
    /// Prometheus Alertmanager's v2 API (`url` is its base: `/api/v2/alerts` is added).
    Alertmanager { url: String },
    /// Email over SMTP.
    Email(Email),
}

/// Where PagerDuty's Events API v2 takes events.
pub const PAGERDUTY_URL: &str = "https://events.pagerduty.com/v2/enqueue";

/// An email receiver.
#[derive(Debug, Clone, PartialEq)]
pub struct Email {
    pub from: String,
    pub to: Vec<String>,
    /// The server and its port.
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    /// User name and password, when the server wants them.
    pub auth: Option<(String, Secretive)>,
    /// A file of PEM certificates trusted besides the system's (a private CA), read at
    /// each use.
    pub ca_file: Option<PathBuf>,
}

/// A secret given in the check file, or the absolute path of a file on the gateway that
/// holds it: read at each use, so a rotated secret is used from the next notification on,
/// and a file that cannot be read delays notifications (retried) rather than losing them.
#[derive(Clone, PartialEq)]
pub enum Secretive {
    Inline(String),
    File(PathBuf),
}

impl std::fmt::Debug for Secretive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Secretive::Inline(_) => f.write_str("Inline(…)"),
            Secretive::File(p) => write!(f, "File({})", p.display()),
        }
    }
}

impl Secretive {
    /// The secret (a file's content without surrounding white space).
    pub fn read(&self) -> Result<String, String> {
        match self {
            Secretive::Inline(s) => Ok(s.clone()),
            Secretive::File(p) => std::fs::read_to_string(p)
                .map(|s| s.trim().to_string())
                .map_err(|e| format!("cannot read {}: {e}", p.display())),
        }
    }
}

/// A PagerDuty routing key: the 32-character Integration Key of an Events API v2
/// integration.
pub fn routing_key(key: &str) -> Result<&str, String> {
    if key.len() == 32 && key.bytes().all(|c| c.is_ascii_alphanumeric()) {
        Ok(key)
    } else {
        Err(format!(
            "the pagerduty routing_key is {} characters: it is the 32-character Integration Key of an Events API v2 integration",
            key.len()
        ))
    }
}

/// How an SMTP connection is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpTls {
    /// Plain, then `STARTTLS` (required: a server that does not offer it is an error).
    StartTls,
    /// TLS from the first byte (port 465).
    Implicit,
    /// None at all: only for a relay on the same host or network.
    None,
}

impl PartialEq for Secret {
    fn eq(&self, other: &Secret) -> bool {
        self.key() == other.key()
    }
}

/// Which alerts go where.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteDef {
    /// Check name globs; empty: every check.
    pub checks: Vec<String>,
    /// The agents it is about (labels and groups, as a check's target).
    pub target: Target,
    /// Statuses it takes; empty: any that is not OK.
    pub severity: Vec<Status>,
    pub receivers: Vec<String>,
    pub wait: Duration,
    pub repeat: Option<Duration>,
    /// When the route is in force (outside it, the next routes are tried).
    pub active: Option<Window>,
    /// What puts its alerts in one notification: `check`, `agent`, `status`, or
    /// `label:<name>`; empty: one notification per alert.
    pub group_by: Vec<String>,
    /// How long the first notification of a group waits for others.
    pub group_wait: Duration,
}

/// `group_wait` when a route groups and does not say, and the most it may be.
pub const DEFAULT_GROUP_WAIT: Duration = Duration::from_secs(10);
pub const MAX_GROUP_WAIT: Duration = Duration::from_secs(300);

/// What an alert is grouped by: see [`RouteDef::group_by`].
pub struct GroupOf<'a> {
    pub fingerprint: &'a str,
    pub check: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub groups: &'a [String],
    pub status: Status,
}

impl RouteDef {
    fn matches(
        &self,
        check: &str,
        labels: &BTreeMap<String, String>,
        groups: &[String],
        status: Status,
        now_ms: u64,
    ) -> bool {
        (self.checks.is_empty() || self.checks.iter().any(|g| glob(g, check)))
            && self.target.matches(labels, groups)
            && (self.severity.is_empty() || self.severity.contains(&status))
            && self.active.as_ref().is_none_or(|w| w.contains(now_ms))
    }
}

/// Days of the week and a time of day in a time zone: `from` until `to` (an end before the
/// start runs past midnight, into the next day; the days name the day it starts).
#[derive(Debug, Clone)]
pub struct Window {
    /// Monday first.
    pub days: [bool; 7],
    /// Minutes after midnight.
    pub from: u16,
    pub to: u16,
    pub timezone: String,
    tz: jiff::tz::TimeZone,
}

impl PartialEq for Window {
    fn eq(&self, other: &Window) -> bool {
        (self.days, self.from, self.to, &self.timezone)
            == (other.days, other.from, other.to, &other.timezone)
    }
}

impl Window {
    /// Whether `now_ms` falls in the window.
    pub fn contains(&self, now_ms: u64) -> bool {
        let Ok(ts) = jiff::Timestamp::from_millisecond(now_ms as i64) else {
            return false;
        };
        let local = self.tz.to_datetime(ts);
        let day = local.weekday().to_monday_zero_offset() as usize;
        let minute = local.hour() as u16 * 60 + local.minute() as u16;
        if self.from < self.to {
            self.days[day] && (self.from..self.to).contains(&minute)
        } else {
            // Overnight: this day's evening, or the night after the day before.
            (self.days[day] && minute >= self.from)
                || (self.days[(day + 6) % 7] && minute < self.to)
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWindow {
    #[serde(default)]
    days: Vec<String>,
    from: String,
    to: String,
    timezone: Option<String>,
}

fn window(raw: RawWindow, problems: &mut Vec<String>) -> Option<Window> {
    const NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
    let before = problems.len();
    let mut days = [raw.days.is_empty(); 7];
    for d in &raw.days {
        match NAMES.iter().position(|n| d.eq_ignore_ascii_case(n)) {
            Some(i) => days[i] = true,
            None => problems.push(format!(
                "active days {d:?}: use mon, tue, wed, thu, fri, sat, sun"
            )),
        }
    }
    let mut minutes = |field: &str, v: &str| -> u16 {
        let parsed = v.split_once(':').and_then(|(h, m)| {
            let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
            (h <= 24 && m < 60 && h * 60 + m <= 24 * 60).then_some(h * 60 + m)
        });
        parsed.unwrap_or_else(|| {
            problems.push(format!(
                "active {field} {v:?}: write a time as HH:MM (00:00 to 24:00)"
            ));
            0
        })
    };
    let (from, to) = (minutes("from", &raw.from), minutes("to", &raw.to));
    if from == to && problems.len() == before {
        problems.push("active from and to are the same time: the window would be empty".into());
    }
    let timezone = raw.timezone.unwrap_or_else(|| "UTC".to_string());
    let tz = match jiff::tz::TimeZone::get(&timezone) {
        Ok(tz) => tz,
        Err(e) => {
            problems.push(format!(
                "active timezone {timezone:?}: {e} (use a tz database name such as Europe/Berlin)"
            ));
            jiff::tz::TimeZone::UTC
        }
    };
    (problems.len() == before).then_some(Window {
        days,
        from,
        to,
        timezone,
        tz,
    })
}

impl AlertConfig {
    /// The policy of an alert of `check` at `status`, on an agent with these labels and
    /// groups, at `now_ms`: its first matching route's (in force then), or nobody told.
    pub fn policy(
        &self,
        check: &str,
        labels: &BTreeMap<String, String>,
        groups: &[String],
        status: Status,
        now_ms: u64,
    ) -> Policy {
        match self
            .routes
            .iter()
            .find(|r| r.matches(check, labels, groups, status, now_ms))
        {
            Some(r) => Policy {
                wait: r.wait,
                repeat: r.repeat,
                receivers: r.receivers.clone(),
                muted: false,
                flap: self.flapping(check),
            },
            None => Policy {
                wait: Duration::ZERO,
                repeat: None,
                receivers: Vec::new(),
                muted: false,
                flap: self.flapping(check),
            },
        }
    }

    /// `check`'s flapping thresholds (start, end; percent).
    pub fn flapping(&self, check: &str) -> (f64, f64) {
        self.tunings
            .iter()
            .filter(|t| t.checks.is_empty() || t.checks.iter().any(|g| glob(g, check)))
            .find_map(|t| t.flapping)
            .unwrap_or((super::FLAP_START, super::FLAP_END))
    }

    /// When `check` turns stale, if a tuning says (else: its intervals).
    pub fn stale_after(&self, check: &str) -> Option<Stale> {
        self.tunings
            .iter()
            .filter(|t| t.checks.is_empty() || t.checks.iter().any(|g| glob(g, check)))
            .find_map(|t| t.stale_after)
    }

    /// The group an alert's notifications join (its key) and how long a group waits, when
    /// the route that takes it groups.
    pub fn grouping(&self, a: &GroupOf<'_>, now_ms: u64) -> Option<(String, Duration)> {
        let (i, r) = self
            .routes
            .iter()
            .enumerate()
            .find(|(_, r)| r.matches(a.check, a.labels, a.groups, a.status, now_ms))?;
        if r.group_by.is_empty() {
            return None;
        }
        let parts: Vec<String> = r
            .group_by
            .iter()
            .map(|by| match by.as_str() {
                "check" => format!("check={}", a.check),
                "agent" => format!("agent={}", a.fingerprint),
                "status" => format!("status={}", super::deliver::status_name(a.status)),
                label => {
                    let name = label.strip_prefix("label:").unwrap_or(label);
                    format!(
                        "{name}={}",
                        a.labels.get(name).map(String::as_str).unwrap_or("")
                    )
                }
            })
            .collect();
        Some((
            format!("route {}: {}", i + 1, parts.join(", ")),
            r.group_wait,
        ))
    }

    /// Whether anything is routed anywhere (a tenant without routes needs no evaluator).
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Put the files' tables together, in file-name order. Returns the configuration and
    /// the problems found across files (each one's part is left out, the rest kept).
    pub fn assemble<'a>(
        files: impl IntoIterator<Item = (&'a Path, &'a FileAlerting)>,
    ) -> (AlertConfig, Vec<String>) {
        let mut config = AlertConfig::default();
        let mut problems = Vec::new();
        let mut fallback_from: Option<String> = None;
        let mut routes = Vec::new();
        let mut deps: Vec<(String, usize, Dependency)> = Vec::new();
        for (path, file) in files {
            let name = path.display();
            if file.has_settings {
                match &fallback_from {
                    Some(first) => problems.push(format!(
                        "{name}: [alerting] is also in {first}; the first file (by name) wins"
                    )),
                    None => {
                        fallback_from = Some(name.to_string());
                        config.fallback = file.fallback.clone();
                        config.watchdog = file.watchdog.clone();
                        if let Some(age) = file.silence_max_age {
                            config.silence_max_age = age;
                        }
                    }
                }
            }
            for r in &file.receivers {
                if config.receivers.contains_key(&r.name) {
                    problems.push(format!(
                        "{name}: receiver {:?} is declared twice; the first file (by name) wins",
                        r.name
                    ));
                } else {
                    config.receivers.insert(r.name.clone(), r.clone());
                }
            }
            routes.extend(
                file.routes
                    .iter()
                    .enumerate()
                    .map(|(i, r)| (name.to_string(), i, r)),
            );
            config.tunings.extend(file.tunings.iter().cloned());
            deps.extend(
                file.dependencies
                    .iter()
                    .enumerate()
                    .map(|(i, d)| (name.to_string(), i, d.clone())),
            );
        }
        // A cycle across files: every dependency is left out (which to drop is not ours to
        // guess), and it is reported.
        match dependency_cycle(&deps) {
            Some(cycle) => problems.push(format!(
                "dependencies form a cycle (a tree is needed): {cycle}; no dependency is in force until it is fixed"
            )),
            None => config.dependencies = deps.into_iter().map(|(_, _, d)| d).collect(),
        }
        for (file, i, route) in routes {
            let unknown: Vec<&String> = route
                .receivers
                .iter()
                .filter(|r| !config.receivers.contains_key(*r))
                .collect();
            if unknown.is_empty() {
                config.routes.push(route.clone());
            } else {
                problems.push(format!(
                    "{file}: route #{} names receivers no file declares: {unknown:?}; the route is left out",
                    i + 1
                ));
            }
        }
        if let Some(f) = &config.fallback {
            if !config.receivers.contains_key(f) {
                problems.push(format!(
                    "[alerting] fallback {f:?} is not a declared receiver; refusals will only be counted and logged"
                ));
                config.fallback = None;
            }
        }
        if let Some(w) = &config.watchdog {
            match config.receivers.get(&w.receiver).map(|r| &r.kind) {
                None => {
                    problems.push(format!(
                        "[alerting] watchdog receiver {:?} is not a declared receiver; no watchdog until it is",
                        w.receiver
                    ));
                    config.watchdog = None;
                }
                Some(ReceiverKind::PagerDuty { .. }) => {
                    problems.push(format!(
                        "[alerting] watchdog receiver {:?} is PagerDuty, where every ping would open an incident: give it a webhook (a dead man's switch service), email or Alertmanager receiver",
                        w.receiver
                    ));
                    config.watchdog = None;
                }
                Some(_) => {}
            }
        }
        (config, problems)
    }
}

/// The alerting tables of one file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FileAlerting {
    /// Whether the file has an `[alerting]` table (one file may).
    pub has_settings: bool,
    pub fallback: Option<String>,
    pub silence_max_age: Option<Duration>,
    pub watchdog: Option<Watchdog>,
    pub receivers: Vec<Receiver>,
    pub routes: Vec<RouteDef>,
    pub dependencies: Vec<Dependency>,
    pub tunings: Vec<Tuning>,
}

#[derive(Deserialize)]
struct RawFile {
    #[serde(default)]
    alerting: Option<RawAlerting>,
    #[serde(default)]
    receiver: Vec<toml::Table>,
    #[serde(default)]
    route: Vec<toml::Table>,
    #[serde(default)]
    dependency: Vec<toml::Table>,
    #[serde(default)]
    tuning: Vec<toml::Table>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTuning {
    #[serde(default)]
    checks: Vec<String>,
    stale_after: Option<toml::Value>,
    flapping: Option<RawFlapping>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFlapping {
    start: f64,
    end: f64,
}

fn tuning(table: toml::Table) -> Result<Tuning, Vec<String>> {
    let raw: RawTuning = toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| vec![e.message().to_string()])?;
    let mut problems = Vec::new();
    if raw.checks.iter().any(String::is_empty) {
        problems.push(
            "an empty check pattern matches nothing; leave checks out for every check".into(),
        );
    }
    let stale_after = match &raw.stale_after {
        None => None,
        Some(toml::Value::String(s)) if s == "never" => Some(Stale::Never),
        Some(v) => match duration_value("stale_after", v) {
            Ok(0) => {
                problems.push("stale_after: at least 1s (or \"never\")".into());
                None
            }
            Ok(secs) => Some(Stale::After(Duration::from_secs(secs))),
            Err(e) => {
                problems.push(format!("{e} (or \"never\")"));
                None
            }
        },
    };
    let flapping = raw.flapping.and_then(|f| {
        let ok = f.end > 0.0 && f.end < f.start && f.start <= 100.0;
        if !ok {
            problems.push(format!(
                "flapping: 0 < end < start <= 100 (percent of state changes over the last {} results), not start {} end {}",
                super::FLAP_WINDOW, f.start, f.end
            ));
        }
        ok.then_some((f.start, f.end))
    });
    if raw.stale_after.is_none() && flapping.is_none() && problems.is_empty() {
        problems.push("say what it tunes: stale_after, flapping".into());
    }
    if problems.is_empty() {
        Ok(Tuning {
            checks: raw.checks,
            stale_after,
            flapping,
        })
    } else {
        Err(problems)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDependency {
    #[serde(default)]
    checks: Vec<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    groups: Vec<String>,
    agent: Option<String>,
    on: RawParent,
    wait: Option<toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawParent {
    agent: Option<String>,
    check: String,
}

fn dependency(table: toml::Table) -> Result<Dependency, Vec<String>> {
    let raw: RawDependency = toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| vec![e.message().to_string()])?;
    let mut problems = Vec::new();
    if raw.on.check.is_empty() {
        problems.push("on.check names no check".to_string());
    }
    if raw.checks.iter().any(String::is_empty) {
        problems.push("an empty check pattern matches nothing".into());
    }
    if raw.agent.as_deref() == Some("") || raw.on.agent.as_deref() == Some("") {
        problems.push(
            "an empty agent names no agent: give a fingerprint or hostname, or leave it out".into(),
        );
    }
    let wait = match &raw.wait {
        None => DEFAULT_DEPENDENCY_WAIT,
        Some(v) => match duration_value("wait", v) {
            Ok(secs) => Duration::from_secs(secs),
            Err(e) => {
                problems.push(e);
                DEFAULT_DEPENDENCY_WAIT
            }
        },
    };
    if problems.is_empty() {
        Ok(Dependency {
            checks: raw.checks,
            target: Target {
                labels: raw.labels,
                groups: raw.groups,
            },
            agent: raw.agent,
            on_agent: raw.on.agent,
            on_check: raw.on.check,
            wait,
        })
    } else {
        Err(problems)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAlerting {
    fallback: Option<String>,
    silence_max_age: Option<toml::Value>,
    watchdog: Option<RawWatchdog>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWatchdog {
    receiver: String,
    every: Option<toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReceiver {
    name: String,
    timeout: Option<toml::Value>,
    retry_max: Option<toml::Value>,
    webhook: Option<RawWebhook>,
    slack: Option<RawSlack>,
    pagerduty: Option<RawPagerDuty>,
    alertmanager: Option<RawAlertmanager>,
    email: Option<RawEmail>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSlack {
    url: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPagerDuty {
    routing_key: Option<String>,
    routing_key_file: Option<String>,
    url: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAlertmanager {
    url: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEmail {
    from: String,
    to: Vec<String>,
    /// `host` or `host:port`.
    smtp: String,
    tls: Option<String>,
    username: Option<String>,
    password: Option<String>,
    password_file: Option<String>,
    ca_file: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    url: String,
    secret: Option<String>,
    secret_file: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    #[serde(default)]
    checks: Vec<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    severity: Vec<String>,
    #[serde(default)]
    receivers: Vec<String>,
    #[serde(rename = "for")]
    wait: Option<toml::Value>,
    repeat: Option<toml::Value>,
    active: Option<RawWindow>,
    #[serde(default)]
    group_by: Vec<String>,
    group_wait: Option<toml::Value>,
}

/// The alerting tables of one check file, with every problem in them listed.
pub fn parse_file(text: &str) -> Result<FileAlerting, String> {
    let raw: RawFile = toml::from_str(text).map_err(|e| crate::util::toml_error(text, &e))?;
    let mut problems = Vec::new();
    let mut out = FileAlerting::default();
    if let Some(a) = raw.alerting {
        out.has_settings = true;
        out.fallback = a.fallback;
        if let Some(v) = &a.silence_max_age {
            match duration_value("silence_max_age", v) {
                Ok(secs) => out.silence_max_age = Some(Duration::from_secs(secs)),
                Err(e) => problems.push(format!("[alerting] {e}")),
            }
        }
        if let Some(w) = a.watchdog {
            let every = match &w.every {
                None => Ok(DEFAULT_WATCHDOG_EVERY),
                Some(v) => duration_value("watchdog.every", v).map(Duration::from_secs),
            };
            match every {
                Ok(every) if every >= MIN_WATCHDOG_EVERY => {
                    out.watchdog = Some(Watchdog {
                        receiver: w.receiver,
                        every,
                    })
                }
                Ok(_) => problems.push(format!(
                    "[alerting] watchdog.every: at least {}s",
                    MIN_WATCHDOG_EVERY.as_secs()
                )),
                Err(e) => problems.push(format!("[alerting] {e}")),
            }
        }
    }
    for (i, table) in raw.receiver.into_iter().enumerate() {
        let at = format!(
            "receiver #{} ({:?})",
            i + 1,
            table.get("name").and_then(|n| n.as_str()).unwrap_or("")
        );
        match receiver(table) {
            Ok(r) => out.receivers.push(r),
            Err(p) => problems.extend(p.into_iter().map(|p| format!("{at}: {p}"))),
        }
    }
    for (i, table) in raw.route.into_iter().enumerate() {
        match route(table) {
            Ok(r) => out.routes.push(r),
            Err(p) => problems.extend(p.into_iter().map(|p| format!("route #{}: {p}", i + 1))),
        }
    }
    for (i, table) in raw.tuning.into_iter().enumerate() {
        match tuning(table) {
            Ok(t) => out.tunings.push(t),
            Err(p) => problems.extend(p.into_iter().map(|p| format!("tuning #{}: {p}", i + 1))),
        }
    }
    for (i, table) in raw.dependency.into_iter().enumerate() {
        match dependency(table) {
            Ok(d) => out.dependencies.push(d),
            Err(p) => problems.extend(p.into_iter().map(|p| format!("dependency #{}: {p}", i + 1))),
        }
    }
    // Within the file, a cycle is this file's problem (across files, `assemble` finds it).
    let mine: Vec<(String, usize, Dependency)> = out
        .dependencies
        .iter()
        .enumerate()
        .map(|(i, d)| ("this file".to_string(), i, d.clone()))
        .collect();
    if let Some(cycle) = dependency_cycle(&mine) {
        problems.push(format!(
            "dependencies form a cycle (a tree is needed): {cycle}"
        ));
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems.join("; "))
    }
}

fn receiver(table: toml::Table) -> Result<Receiver, Vec<String>> {
    let raw: RawReceiver = toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| vec![e.message().to_string()])?;
    let mut problems = Vec::new();
    if let Err(e) = crate::tenant::parse_name(&raw.name) {
        problems.push(format!("name {e}"));
    }
    let mut bounded = |field: &str, v: &Option<toml::Value>, default: Duration, max: Duration| {
        let Some(v) = v else { return default };
        match duration_value(field, v).map(Duration::from_secs) {
            Ok(d) if d <= max => d,
            Ok(d) => {
                problems.push(format!(
                    "{field} {}s is over the {}s limit",
                    d.as_secs(),
                    max.as_secs()
                ));
                default
            }
            Err(e) => {
                problems.push(e);
                default
            }
        }
    };
    let timeout = bounded("timeout", &raw.timeout, DEFAULT_TIMEOUT, MAX_TIMEOUT);
    let retry_max = bounded(
        "retry_max",
        &raw.retry_max,
        super::retry::MAX_BACKOFF,
        super::retry::MAX_WAIT,
    );
    let kinds = [
        raw.webhook.is_some(),
        raw.slack.is_some(),
        raw.pagerduty.is_some(),
        raw.alertmanager.is_some(),
        raw.email.is_some(),
    ];
    if kinds.iter().filter(|k| **k).count() > 1 {
        problems.push("a receiver is one kind: give only one of webhook, slack, pagerduty, alertmanager, email".into());
    }
    let kind = if let Some(w) = raw.webhook {
        if let Err(e) = http_url(&w.url) {
            problems.push(format!("webhook url {e}"));
        }
        let secret = secret_of("webhook secret", w.secret, w.secret_file, &mut problems);
        if let Some(Secretive::Inline(s)) = &secret {
            if let Err(e) = s.parse::<Secret>() {
                problems.push(format!("webhook secret: {e}"));
            }
        }
        Some(ReceiverKind::Webhook { url: w.url, secret })
    } else if let Some(s) = raw.slack {
        if let Err(e) = http_url(&s.url) {
            problems.push(format!("slack url {e}"));
        }
        Some(ReceiverKind::Slack { url: s.url })
    } else if let Some(p) = raw.pagerduty {
        let url = p.url.unwrap_or_else(|| PAGERDUTY_URL.to_string());
        if let Err(e) = http_url(&url) {
            problems.push(format!("pagerduty url {e}"));
        }
        match secret_of(
            "pagerduty routing_key",
            p.routing_key,
            p.routing_key_file,
            &mut problems,
        ) {
            Some(key) => {
                if let Secretive::Inline(k) = &key {
                    if let Err(e) = routing_key(k) {
                        problems.push(e);
                    }
                }
                Some(ReceiverKind::PagerDuty {
                    url,
                    routing_key: key,
                })
            }
            None => {
                problems.push("pagerduty needs routing_key (or routing_key_file)".into());
                None
            }
        }
    } else if let Some(a) = raw.alertmanager {
        if let Err(e) = http_url(&a.url) {
            problems.push(format!("alertmanager url {e}"));
        }
        Some(ReceiverKind::Alertmanager {
            url: a.url.trim_end_matches('/').to_string(),
        })
    } else if let Some(e) = raw.email {
        email(e, &mut problems).map(ReceiverKind::Email)
    } else {
        problems.push(
            "say what kind of receiver it is: webhook, slack, pagerduty, alertmanager or email (e.g. webhook = { url = \"https://…\" })".into(),
        );
        None
    };
    match kind {
        Some(kind) if problems.is_empty() => Ok(Receiver {
            name: raw.name,
            timeout,
            retry_max,
            kind,
        }),
        _ => Err(problems),
    }
}

fn route(table: toml::Table) -> Result<RouteDef, Vec<String>> {
    let raw: RawRoute = toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| vec![e.message().to_string()])?;
    let mut problems = Vec::new();
    if raw.receivers.is_empty() {
        problems.push("name its receivers: receivers = [\"…\"]".to_string());
    }
    let mut severity = Vec::new();
    for s in &raw.severity {
        match s.as_str() {
            "warning" => severity.push(Status::Warning),
            "critical" => severity.push(Status::Critical),
            "unknown" => severity.push(Status::Unknown),
            other => problems.push(format!(
                "severity {other:?}: use warning, critical or unknown"
            )),
        }
    }
    for g in &raw.checks {
        if g.is_empty() {
            problems.push(
                "an empty check pattern matches nothing; leave checks out for every check".into(),
            );
        }
    }
    let mut duration = |field: &str, v: &Option<toml::Value>| -> Option<Duration> {
        v.as_ref().and_then(|v| {
            duration_value(field, v)
                .map(Duration::from_secs)
                .map_err(|e| problems.push(e))
                .ok()
        })
    };
    let wait = duration("for", &raw.wait).unwrap_or(Duration::ZERO);
    let repeat = duration("repeat", &raw.repeat);
    let group_wait = duration("group_wait", &raw.group_wait);
    let active = raw.active.and_then(|w| window(w, &mut problems));
    for by in &raw.group_by {
        let label = by.strip_prefix("label:");
        if !matches!(by.as_str(), "check" | "agent" | "status") && label.is_none_or(str::is_empty) {
            problems.push(format!(
                "group_by {by:?}: use check, agent, status or label:<name>"
            ));
        }
    }
    if group_wait.is_some_and(|w| w > MAX_GROUP_WAIT) {
        problems.push(format!(
            "group_wait: at most {}s (the receiver's later notifications wait behind a group)",
            MAX_GROUP_WAIT.as_secs()
        ));
    }
    if group_wait.is_some() && raw.group_by.is_empty() {
        problems.push("group_wait without group_by: say what groups alerts".to_string());
    }
    if problems.is_empty() {
        Ok(RouteDef {
            checks: raw.checks,
            target: Target {
                labels: raw.labels,
                groups: raw.groups,
            },
            severity,
            receivers: {
                let mut seen = std::collections::BTreeSet::new();
                raw.receivers
                    .into_iter()
                    .filter(|r| seen.insert(r.clone()))
                    .collect()
            },
            wait,
            repeat,
            active,
            group_by: raw.group_by,
            group_wait: group_wait.unwrap_or(DEFAULT_GROUP_WAIT),
        })
    } else {
        Err(problems)
    }
}

/// A secret given inline or as the absolute path of a file (read at use), never both.
fn secret_of(
    what: &str,
    inline: Option<String>,
    file: Option<String>,
    problems: &mut Vec<String>,
) -> Option<Secretive> {
    match (inline, file) {
        (Some(_), Some(_)) => {
            problems.push(format!("give the {what} or its _file, not both"));
            None
        }
        (Some(s), None) => Some(Secretive::Inline(s)),
        (None, Some(f)) => match absolute(what, &f) {
            Ok(p) => Some(Secretive::File(p)),
            Err(e) => {
                problems.push(e);
                None
            }
        },
        (None, None) => None,
    }
}

/// A file path that means the same on every gateway of a fleet, whatever its directory.
fn absolute(what: &str, path: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(path);
    if p.is_absolute() {
        Ok(p)
    } else {
        Err(format!(
            "{what} file {path:?}: give an absolute path (it is read on the gateway)"
        ))
    }
}

fn email(raw: RawEmail, problems: &mut Vec<String>) -> Option<Email> {
    let before = problems.len();
    for addr in std::iter::once(&raw.from).chain(&raw.to) {
        if let Err(e) = addr.parse::<lettre::message::Mailbox>() {
            problems.push(format!("email address {addr:?}: {e}"));
        }
    }
    if raw.to.is_empty() {
        problems.push("email needs at least one address in to".into());
    }
    let tls = match raw.tls.as_deref() {
        None | Some("starttls") => SmtpTls::StartTls,
        Some("implicit") => SmtpTls::Implicit,
        Some("none") => SmtpTls::None,
        Some(other) => {
            problems.push(format!(
                "email tls {other:?}: use starttls, implicit or none"
            ));
            SmtpTls::StartTls
        }
    };
    let default_port = match tls {
        SmtpTls::Implicit => 465,
        SmtpTls::StartTls => 587,
        SmtpTls::None => 25,
    };
    let (host, port) = match raw.smtp.rsplit_once(':') {
        Some((h, p)) => match p.parse::<u16>() {
            Ok(p) if p > 0 => (h.to_string(), p),
            _ => {
                problems.push(format!(
                    "email smtp {:?}: the port is not a number",
                    raw.smtp
                ));
                (h.to_string(), default_port)
            }
        },
        None => (raw.smtp.clone(), default_port),
    };
    if host.is_empty() {
        problems.push("email smtp names no host".into());
    }
    let password = secret_of("email password", raw.password, raw.password_file, problems);
    let auth = match (raw.username, password) {
        (Some(u), Some(p)) => Some((u, p)),
        (None, None) => None,
        _ => {
            problems.push("email username and password go together".into());
            None
        }
    };
    if auth.is_some() && tls == SmtpTls::None {
        problems.push(
            "email with a password needs tls (starttls or implicit): it would be sent in the clear"
                .into(),
        );
    }
    let ca_file = raw.ca_file.and_then(|f| {
        absolute("email ca_file", &f)
            .map_err(|e| problems.push(e))
            .ok()
    });
    (problems.len() == before).then_some(Email {
        from: raw.from,
        to: raw.to,
        host,
        port,
        tls,
        auth,
        ca_file,
    })
}

/// `url` is an absolute http or https URL.
fn http_url(url: &str) -> Result<(), String> {
    match reqwest::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(()),
        Ok(_) => Err(format!("{url:?} is not an http:// or https:// URL")),
        Err(e) => Err(format!("{url:?}: {e}")),
    }
}

/// Whether `name` matches `pattern`, where `*` is any run of characters and `?` any one.
/// (Check names are short: the plain backtracking match is enough, and no crate is needed
/// for two wildcards.)
pub fn glob(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni) = (0, 0);
    // Where the last `*` was, and the name position it is matched up to.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ni));
                pi += 1;
            }
            Some(c) if *c == '?' || *c == n[ni] => {
                pi += 1;
                ni += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    pi = sp + 1;
                    ni = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn assemble(files: &[(&str, &str)]) -> (AlertConfig, Vec<String>) {
        let parsed: Vec<(std::path::PathBuf, FileAlerting)> = files
            .iter()
            .map(|(n, t)| (n.into(), parse_file(t).unwrap()))
            .collect();
        AlertConfig::assemble(parsed.iter().map(|(p, f)| (p.as_path(), f)))
    }

    #[test]
    fn globs_match_as_documented() {
        for (p, n, want) in [
            ("disk", "disk", true),
            ("disk", "disks", false),
            ("disk*", "disk_root", true),
            ("*", "", true),
            ("*_root", "disk_root", true),
            ("d?sk", "disk", true),
            ("d?sk", "dsk", false),
            ("*a*b", "xaxxb", true),
            ("*a*b", "xaxxbc", false),
            ("a*a", "a", false),
        ] {
            assert_eq!(glob(p, n), want, "{p} ~ {n}");
        }
    }

    #[test]
    fn the_first_matching_route_decides_and_unrouted_alerts_tell_nobody() {
        let (config, problems) = assemble(&[(
            "a.toml",
            &format!(
                r#"
[alerting]
fallback = "hook"

[[receiver]]
name = "hook"
webhook = {{ url = "http://127.0.0.1:9/x", secret = "{SECRET}" }}

[[receiver]]
name = "pager"
timeout = "3s"
webhook = {{ url = "https://pager.example/in" }}

[[route]]
checks = ["disk*"]
labels = {{ role = "db" }}
severity = ["critical"]
receivers = ["hook", "pager"]
for = "5m"

[[route]]
checks = ["disk*"]
receivers = ["hook"]
repeat = "1h"
"#
            ),
        )]);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(config.fallback.as_deref(), Some("hook"));
        assert_eq!(config.receivers["pager"].timeout, Duration::from_secs(3));
        let db = BTreeMap::from([("role".to_string(), "db".to_string())]);
        let p = config.policy("disk_root", &db, &[], Status::Critical, 0);
        assert_eq!(p.receivers, ["hook", "pager"]);
        assert_eq!(p.wait, Duration::from_secs(300));
        let p = config.policy("disk_root", &db, &[], Status::Warning, 0);
        assert_eq!(
            (p.receivers, p.repeat),
            (vec!["hook".to_string()], Some(Duration::from_secs(3600)))
        );
        let p = config.policy("disk_root", &BTreeMap::new(), &[], Status::Critical, 0);
        assert_eq!(p.receivers, ["hook"]);
        assert!(config
            .policy("load", &db, &[], Status::Critical, 0)
            .receivers
            .is_empty());
    }

    #[test]
    fn every_problem_of_a_file_is_listed() {
        let err = parse_file(
            r#"
[[receiver]]
name = "no kind"

[[receiver]]
name = "x"
timeout = "5h"
webhook = { url = "ftp://x", secret = "nope" }

[[route]]
severity = ["major"]
for = "soon"
checks = [""]
"#,
        )
        .unwrap_err();
        for want in [
            "receiver #1",
            "what kind of receiver",
            "name \"no kind\"",
            "receiver #2 (\"x\"): timeout",
            "ftp://x",
            "whsec_",
            "route #1: name its receivers",
            "severity \"major\"",
            "for \"soon\"",
            "empty check pattern",
        ] {
            assert!(err.contains(want), "{want:?} not in {err}");
        }
        assert!(parse_file("[[receiver]]\nname = \"a\"\nwebhok = {}\n")
            .unwrap_err()
            .contains("webhok"));
    }

    #[test]
    fn a_watchdog_needs_a_receiver_that_is_not_pagerduty_and_a_period_of_10s_at_least() {
        let hook = "[[receiver]]\nname = \"hook\"\nwebhook = { url = \"http://a/\" }\n";
        let (config, problems) = assemble(&[(
            "a.toml",
            &format!("[alerting]\nwatchdog = {{ receiver = \"hook\" }}\n{hook}"),
        )]);
        assert!(problems.is_empty(), "{problems:?}");
        let w = config.watchdog.expect("a watchdog");
        assert_eq!(
            (w.receiver.as_str(), w.every),
            ("hook", DEFAULT_WATCHDOG_EVERY)
        );
        let (config, problems) = assemble(&[(
            "a.toml",
            "[alerting]\nwatchdog = { receiver = \"nobody\", every = \"5m\" }\n",
        )]);
        assert!(config.watchdog.is_none());
        assert!(
            problems
                .join("\n")
                .contains("watchdog receiver \"nobody\" is not a declared receiver"),
            "{problems:?}"
        );
        let (config, problems) = assemble(&[(
            "a.toml",
            "[alerting]\nwatchdog = { receiver = \"pd\" }\n[[receiver]]\nname = \"pd\"\npagerduty = { routing_key = \"0123456789abcdef0123456789abcdef\" }\n",
        )]);
        assert!(config.watchdog.is_none());
        assert!(problems.join("\n").contains("is PagerDuty"), "{problems:?}");
        let err = parse_file(&format!(
            "[alerting]\nwatchdog = {{ receiver = \"hook\", every = \"5s\" }}\n{hook}"
        ))
        .unwrap_err();
        assert!(err.contains("watchdog.every: at least 10s"), "{err}");
        let err = parse_file("[alerting]\nwatchdog = { receivr = \"hook\" }\n").unwrap_err();
        assert!(err.contains("receivr"), "{err}");
    }

    #[test]
    fn a_route_groups_by_check_agent_status_or_label_and_says_what_is_wrong() {
        let hook = "[[receiver]]\nname = \"hook\"\nwebhook = { url = \"http://a/\" }\n";
        let (config, problems) = assemble(&[(
            "a.toml",
            &format!("{hook}[[route]]\nreceivers = [\"hook\"]\ngroup_by = [\"check\", \"label:role\"]\n[[route]]\nreceivers = [\"hook\"]\n"),
        )]);
        assert!(problems.is_empty(), "{problems:?}");
        let labels: BTreeMap<String, String> = [("role".to_string(), "db".to_string())].into();
        let of = |check| GroupOf {
            fingerprint: "fp",
            check,
            labels: &labels,
            groups: &[],
            status: Status::Critical,
        };
        let (key, wait) = config.grouping(&of("disk"), 0).expect("grouped");
        assert_eq!(key, "route 1: check=disk, role=db");
        assert_eq!(wait, DEFAULT_GROUP_WAIT);
        assert_ne!(config.grouping(&of("load"), 0).unwrap().0, key, "by check");
        let err = parse_file(&format!(
            "{hook}[[route]]\nreceivers = [\"hook\"]\ngroup_by = [\"host\", \"label:\"]\n[[route]]\nreceivers = [\"hook\"]\ngroup_wait = \"5s\"\n"
        ))
        .unwrap_err();
        assert!(err.contains("group_by \"host\""), "{err}");
        assert!(err.contains("group_by \"label:\""), "{err}");
        assert!(err.contains("group_wait without group_by"), "{err}");
    }

    #[test]
    fn tunings_set_staleness_and_flapping_per_check_first_match_per_setting() {
        let (config, problems) = assemble(&[(
            "a.toml",
            "[[tuning]]\nchecks = [\"backup*\"]\nstale_after = \"26h\"\n[[tuning]]\nchecks = [\"backup-db\"]\nstale_after = \"never\"\nflapping = { start = 60, end = 50 }\n[[tuning]]\nflapping = { start = 40, end = 35 }\n",
        )]);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            config.stale_after("backup-db"),
            Some(Stale::After(Duration::from_secs(26 * 3600))),
            "the first that sets it"
        );
        assert_eq!(config.flapping("backup-db"), (60.0, 50.0));
        assert_eq!(config.flapping("disk"), (40.0, 35.0));
        assert_eq!(config.stale_after("disk"), None);
        let policy = config.policy("backup-db", &BTreeMap::new(), &[], Status::Critical, 0);
        assert_eq!(policy.flap, (60.0, 50.0));
        let err = parse_file("[[tuning]]\nchecks = [\"x\"]\n[[tuning]]\nstale_after = \"soon\"\n[[tuning]]\nflapping = { start = 20, end = 30 }\n[[tuning]]\nstale = \"1h\"\n").unwrap_err();
        for want in [
            "tuning #1: say what it tunes",
            "tuning #2: stale_after",
            "tuning #3: flapping: 0 < end < start",
            "tuning #4",
        ] {
            assert!(err.contains(want), "{want:?} not in {err}");
        }
    }

    #[test]
    fn across_files_unknown_receivers_and_doubles_are_found() {
        let (config, problems) = assemble(&[
            (
                "a.toml",
                "[[receiver]]\nname = \"hook\"\nwebhook = { url = \"http://a/\" }\n",
            ),
            (
                "b.toml",
                "[alerting]\nfallback = \"gone\"\n[[receiver]]\nname = \"hook\"\nwebhook = { url = \"http://b/\" }\n[[route]]\nreceivers = [\"hook\", \"nobody\"]\n[[route]]\nreceivers = [\"hook\"]\n",
            ),
        ]);
        let all = problems.join("\n");
        assert!(
            all.contains("b.toml: receiver \"hook\" is declared twice"),
            "{all}"
        );
        assert!(
            all.contains("b.toml: route #1 names receivers no file declares: [\"nobody\"]"),
            "{all}"
        );
        assert!(all.contains("fallback \"gone\""), "{all}");
        assert_eq!(problems.len(), 3, "{all}");
        assert_eq!(config.routes.len(), 1);
        assert_eq!(config.fallback, None);
        let ReceiverKind::Webhook { url, .. } = &config.receivers["hook"].kind else {
            panic!("a webhook");
        };
        assert_eq!(url, "http://a/");
    }

    #[test]
    fn every_kind_of_receiver_parses_and_secrets_in_files_are_read_at_use() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("pd.key");
        std::fs::write(&key_file, "  R0UT1NGKEY0123456789abcdefABCDEF\n").unwrap();
        let text = format!(
            r#"
[[receiver]]
name = "chat"
slack = {{ url = "https://hooks.slack.com/services/T/B/X" }}

[[receiver]]
name = "pager"
retry_max = "30s"
pagerduty = {{ routing_key_file = "{key}" }}

[[receiver]]
name = "am"
alertmanager = {{ url = "http://am:9093/" }}

[[receiver]]
name = "mail"
email = {{ from = "outpost@example.com", to = ["ops@example.com"], smtp = "smtp.example.com", username = "u", password = "p" }}

[[route]]
receivers = ["chat", "pager", "chat"]
"#,
            key = key_file.display()
        );
        let f = parse_file(&text).unwrap();
        let by_name: BTreeMap<_, _> = f.receivers.iter().map(|r| (r.name.as_str(), r)).collect();
        let ReceiverKind::PagerDuty {
            url,
            routing_key: key,
        } = &by_name["pager"].kind
        else {
            panic!("pagerduty");
        };
        assert_eq!(url, PAGERDUTY_URL);
        assert_eq!(key.read().unwrap(), "R0UT1NGKEY0123456789abcdefABCDEF");
        assert_eq!(by_name["pager"].retry_max, Duration::from_secs(30));
        assert_eq!(by_name["chat"].retry_max, super::super::retry::MAX_BACKOFF);
        let ReceiverKind::Alertmanager { url } = &by_name["am"].kind else {
            panic!("alertmanager");
        };
        assert_eq!(url, "http://am:9093", "the API path is added to it");
        let ReceiverKind::Email(mail) = &by_name["mail"].kind else {
            panic!("email");
        };
        assert_eq!(
            (mail.host.as_str(), mail.port, mail.tls),
            ("smtp.example.com", 587, SmtpTls::StartTls)
        );
        assert_eq!(
            f.routes[0].receivers,
            ["chat", "pager"],
            "named twice, told once"
        );
        // A rotated key is read at the next use.
        std::fs::write(&key_file, "ROTATED0123456789abcdefABCDEF012\n").unwrap();
        assert_eq!(key.read().unwrap(), "ROTATED0123456789abcdefABCDEF012");
        assert!(format!("{key:?}").contains("pd.key"));
        assert!(!format!("{:?}", Secretive::Inline("hush".into())).contains("hush"));
    }

    #[test]
    fn receiver_mistakes_are_named() {
        let err = parse_file(
            r#"
[[receiver]]
name = "two"
slack = { url = "https://a/" }
webhook = { url = "https://b/" }

[[receiver]]
name = "pd"
pagerduty = { routing_key = "short" }

[[receiver]]
name = "file"
webhook = { url = "https://b/", secret_file = "relative/secret" }

[[receiver]]
name = "mail"
email = { from = "not an address", to = [], smtp = "host:port", tls = "none", username = "u", password = "p" }
"#,
        )
        .unwrap_err();
        for want in [
            "only one of webhook, slack",
            "32-character Integration Key",
            "give an absolute path",
            "email address \"not an address\"",
            "at least one address in to",
            "the port is not a number",
            "sent in the clear",
        ] {
            assert!(err.contains(want), "{want:?} not in {err}");
        }
    }

    #[test]
    fn a_time_window_holds_a_route_to_its_days_and_hours_in_its_time_zone() {
        let f = parse_file(
            r#"
[[route]]
severity = ["warning"]
receivers = ["mail"]
active = { days = ["mon", "tue", "wed", "thu", "fri"], from = "09:00", to = "18:00", timezone = "Europe/Berlin" }

[[route]]
checks = ["backup"]
receivers = ["night"]
active = { days = ["fri"], from = "22:00", to = "06:00" }
"#,
        )
        .unwrap();
        let ms = |s: &str| s.parse::<jiff::Timestamp>().unwrap().as_millisecond() as u64;
        let office = f.routes[0].active.as_ref().unwrap();
        // Thursday 2026-12-03: 09:00 in Berlin is 08:00 UTC.
        assert!(!office.contains(ms("2026-12-03T07:59:00Z")));
        assert!(office.contains(ms("2026-12-03T08:00:00Z")));
        assert!(office.contains(ms("2026-12-03T16:59:00Z")));
        assert!(!office.contains(ms("2026-12-03T17:00:00Z")));
        assert!(!office.contains(ms("2026-12-05T10:00:00Z")), "Saturday");
        // Summer time: 09:00 in Berlin is 07:00 UTC.
        assert!(office.contains(ms("2026-07-02T07:00:00Z")));
        let night = f.routes[1].active.as_ref().unwrap();
        assert!(night.contains(ms("2026-12-04T23:00:00Z")), "Friday night");
        assert!(
            night.contains(ms("2026-12-05T05:59:00Z")),
            "into Saturday morning"
        );
        assert!(!night.contains(ms("2026-12-05T06:00:00Z")));
        assert!(
            !night.contains(ms("2026-12-05T23:00:00Z")),
            "Saturday night is not Friday's"
        );
        // Outside the window the next route (or nobody) takes the alert.
        let config = AlertConfig {
            routes: f.routes.clone(),
            ..AlertConfig::default()
        };
        let none = BTreeMap::new();
        let at = |t| {
            config
                .policy("disk", &none, &[], Status::Warning, ms(t))
                .receivers
        };
        assert_eq!(at("2026-12-03T10:00:00Z"), ["mail"]);
        assert!(at("2026-12-03T20:00:00Z").is_empty());

        let err = parse_file(
            "[[route]]\nreceivers = [\"x\"]\nactive = { days = [\"someday\"], from = \"25:00\", to = \"9\", timezone = \"Mars/Olympus\" }\n",
        )
        .unwrap_err();
        for want in ["someday", "from \"25:00\"", "to \"9\"", "Mars/Olympus"] {
            assert!(err.contains(want), "{want:?} not in {err}");
        }
    }

    #[test]
    fn dependencies_parse_and_a_cycle_is_refused_with_its_path() {
        let f = parse_file(
            r#"
[[dependency]]
checks = ["http-*"]
labels = { site = "dc1" }
on = { agent = "router-1", check = "ping" }
wait = "20s"

[[dependency]]
checks = ["disk*"]
on = { check = "nfs" }
"#,
        )
        .unwrap();
        let (web, disk) = (&f.dependencies[0], &f.dependencies[1]);
        assert_eq!(web.wait, Duration::from_secs(20));
        assert_eq!(disk.wait, DEFAULT_DEPENDENCY_WAIT);
        let dc1 = BTreeMap::from([("site".to_string(), "dc1".to_string())]);
        assert!(web.has_child("fp", "web-1", &dc1, &[], "http-shop"));
        assert!(!web.has_child("fp", "web-1", &BTreeMap::new(), &[], "http-shop"));
        assert!(!web.has_child("fp", "web-1", &dc1, &[], "ping"));
        assert!(disk.has_child("fp", "db-1", &dc1, &[], "disk_root"));

        // ping depends on dns, dns on ping: refused, naming the path.
        let err = parse_file(
            r#"
[[dependency]]
checks = ["ping"]
on = { agent = "core", check = "dns" }

[[dependency]]
checks = ["dns"]
on = { agent = "core", check = "ping" }
"#,
        )
        .unwrap_err();
        assert!(
            err.contains("cycle") && err.contains("dependency #1") && err.contains("dependency #2"),
            "{err}"
        );
        // A check that would depend on itself through a glob is no cycle: it is never its
        // own child.
        let f = parse_file("[[dependency]]\ncheck = 1\n");
        assert!(f.unwrap_err().contains("check"));
        let own = parse_file("[[dependency]]\non = { check = \"ping\" }\n").unwrap();
        assert!(!own.dependencies[0].has_child("fp", "h", &BTreeMap::new(), &[], "ping"));
        assert!(own.dependencies[0].has_child("fp", "h", &BTreeMap::new(), &[], "http"));

        // Across files: nothing of the cycle is in force.
        let (config, problems) = assemble(&[
            (
                "a.toml",
                "[[dependency]]\nchecks = [\"a\"]\non = { agent = \"x\", check = \"b\" }\n",
            ),
            (
                "b.toml",
                "[[dependency]]\nchecks = [\"b\"]\non = { agent = \"x\", check = \"a\" }\n",
            ),
        ]);
        assert!(problems.iter().any(|p| p.contains("cycle")), "{problems:?}");
        assert!(config.dependencies.is_empty());
    }

    #[test]
    fn dependencies_per_site_are_no_cycle() {
        let f = parse_file(
            r#"
[[dependency]]
checks = ["*"]
labels = { site = "dc1" }
on = { agent = "router-1", check = "ping" }

[[dependency]]
checks = ["*"]
labels = { site = "dc2" }
on = { agent = "router-2", check = "ping" }
"#,
        );
        assert!(f.is_ok(), "{f:?}");
    }
}
