//! The check file format: TOML with one or more `[[check]]` tables. The gateway reads a
//! directory of them (its checks for the fleet) and the agent reads `checks.d/` on its
//! host (checks that applications drop in); both parse with this module so a file means
//! the same thing in either place.
//!
//! ```toml
//! [[check]]
//! name = "load"
//! command = ["/usr/lib/nagios/plugins/check_load", "-w", "5,4,3", "-c", "10,8,6"]
//! interval = "1m"
//!
//! [[check]]
//! name = "web"
//! http = { url = "https://example.com/health", body_contains = "ok", cert_warn_days = 14 }
//! interval = "30s"
//! attempts = 3
//! retry_interval = "10s"
//! target = { labels = { role = "web" }, groups = ["eu"] }
//! ```
//!
//! Gateway files may also declare collectors, and alerting (`[alerting]`, `[[receiver]]`,
//! `[[route]]`: the gateway reads those, see docs/ALERTING.md); agents' own `checks.d` may
//! declare neither:
//!
//! ```toml
//! [[collector]]
//! name = "collectd"
//! kind = "collectd"
//! plugins = ["cpu", "memory", { name = "df", config = 'MountPoint "/"' }]
//! interval = "10s"
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::check::{CheckSpec, PluginRef};
use crate::collector::{CollectdPlugin, CollectorKind, CollectorSpec};
use crate::limits::{MAX_ATTEMPTS, MAX_INTERVAL_SECS, MAX_TIMEOUT_SECS};
use crate::names::valid_check_name;
use crate::probe::*;

/// Which agents a check is for. Empty means every agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// Every label listed must be set on the agent with this value.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The agent must be in at least one of these groups (when any are listed).
    #[serde(default)]
    pub groups: Vec<String>,
}

impl Target {
    pub fn matches(&self, labels: &BTreeMap<String, String>, groups: &[String]) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && (self.groups.is_empty() || self.groups.iter().any(|g| groups.contains(g)))
    }
}

/// One check as a file defines it.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckDef {
    /// For a plugin check, the command's program is the plugin's name and `spec.plugin`
    /// names it with an empty hash; the gateway fills the hash in from its catalog.
    /// `spec.entity` is set for a check about a proxy entity.
    pub spec: CheckSpec,
    /// Which agents run it; for a check about an entity, which agents may (its placement
    /// picks among them).
    pub target: Target,
    /// Set (with `spec.entity`) for a check about a proxy entity.
    pub placement: Option<Placement>,
    pub file: PathBuf,
}

/// A thing no agent runs on that checks are about (`[[entity]]`, gateway check files
/// only): a router, a website, a partner's API.
#[derive(Debug, Clone, PartialEq)]
pub struct EntityDef {
    pub name: String,
    /// Where it is (a host name, an address or a URL), for people and for `same_label`'s
    /// neighbours; checks name their own targets.
    pub address: String,
    pub labels: BTreeMap<String, String>,
    pub file: PathBuf,
}

/// How a check about an entity is placed on the agents its `target` allows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    #[serde(default)]
    pub mode: PlacementMode,
    /// With `all`: the entity's state is non-OK only when at least this many vantage
    /// points agree.
    #[serde(default)]
    pub quorum: Option<u32>,
    /// Only agents whose label of this name has the entity's value (`"dc"`: from the
    /// entity's own data center); any allowed agent when none of those is online.
    #[serde(default)]
    pub same_label: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlacementMode {
    /// One agent runs it each interval; the checks spread evenly over the agents.
    #[default]
    RoundRobin,
    /// Every allowed agent runs it, each a vantage point.
    All,
}

/// Most entities a tenant declares.
pub const MAX_ENTITIES: usize = 10_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    check: Vec<RawCheck>,
    #[serde(default)]
    collector: Vec<RawCollector>,
    /// Alerting (`[alerting]`, `[[receiver]]`, `[[route]]`): the gateway reads these
    /// tables itself; they are only let through here.
    #[serde(default)]
    alerting: Option<toml::Table>,
    #[serde(default)]
    receiver: Vec<toml::Table>,
    #[serde(default)]
    route: Vec<toml::Table>,
    #[serde(default)]
    dependency: Vec<toml::Table>,
    #[serde(default)]
    tuning: Vec<toml::Table>,
    /// Metric exports (`[[export]]`): the gateway's, like alerting.
    #[serde(default)]
    export: Vec<toml::Table>,
    /// Proxy entities (`[[entity]]`): the gateway's.
    #[serde(default)]
    entity: Vec<RawEntity>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntity {
    name: String,
    #[serde(default)]
    address: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// Whether a file declares alerting tables (gateway check files only).
fn has_alerting(text: &str) -> bool {
    toml::from_str::<RawFile>(text).is_ok_and(|f| {
        f.alerting.is_some()
            || !f.receiver.is_empty()
            || !f.route.is_empty()
            || !f.dependency.is_empty()
            || !f.tuning.is_empty()
            || !f.export.is_empty()
    })
}

/// Whether a file declares entities, or checks about them (gateway check files only).
fn has_entities(text: &str) -> bool {
    toml::from_str::<RawFile>(text).is_ok_and(|f| {
        !f.entity.is_empty()
            || f.check
                .iter()
                .any(|c| c.entity.is_some() || c.placement.is_some())
    })
}

/// The entities one of the gateway's check files declares, every problem at once.
pub fn parse_entities(path: &Path, text: &str) -> Result<Vec<EntityDef>, String> {
    let raw: RawFile = toml::from_str(text).map_err(|e| e.to_string())?;
    let mut errors = Vec::new();
    let mut out = Vec::new();
    for (i, e) in raw.entity.into_iter().enumerate() {
        let at = format!("entity #{} ({:?})", i + 1, e.name);
        if !valid_check_name(&e.name) {
            errors.push(format!(
                "{at}: name must be 1-64 characters of A-Z a-z 0-9 _ - ."
            ));
            continue;
        }
        if e.address.len() > 1024 {
            errors.push(format!("{at}: address is over 1024 bytes"));
            continue;
        }
        out.push(EntityDef {
            name: e.name,
            address: e.address,
            labels: e.labels,
            file: path.to_path_buf(),
        });
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors.join("; "))
    }
}

/// One collector as a file defines it.
#[derive(Debug, Clone, PartialEq)]
pub struct CollectorDef {
    pub spec: CollectorSpec,
    pub target: Target,
    pub file: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCollector {
    name: String,
    kind: CollectorKind,
    command: Option<RawCommand>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    plugins: Vec<RawPlugin>,
    interval: Option<RawDuration>,
    config: Option<String>,
    #[serde(default)]
    target: Target,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawPlugin {
    Name(String),
    Block(CollectdPlugin),
}

/// Interval of a collector that does not give one.
pub const DEFAULT_COLLECTOR_INTERVAL_SECS: u64 = 10;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    name: String,
    command: Option<RawCommand>,
    /// A plugin from the catalog, instead of `command`.
    plugin: Option<String>,
    /// Arguments for `plugin`.
    args: Option<RawCommand>,
    /// How a command's output is read: nagios (the default), json, daemon or request.
    kind: Option<String>,
    /// With `kind = "request"`: what each run asks the daemon.
    request: Option<toml::Table>,
    cpu: Option<Thresholds>,
    memory: Option<Thresholds>,
    swap: Option<Thresholds>,
    disk: Option<DiskProbe>,
    load: Option<Thresholds>,
    network: Option<NetworkProbe>,
    process: Option<ProcessProbe>,
    tcp: Option<TcpProbe>,
    http: Option<HttpProbe>,
    dns: Option<DnsProbe>,
    prometheus: Option<PrometheusProbe>,
    json_socket: Option<JsonSocketProbe>,
    interval: Option<RawDuration>,
    cron: Option<String>,
    timeout: Option<RawDuration>,
    attempts: Option<u32>,
    retry_interval: Option<RawDuration>,
    #[serde(default)]
    target: Target,
    /// The proxy entity the check is about (gateway check files only).
    entity: Option<String>,
    placement: Option<Placement>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawCommand {
    Argv(Vec<String>),
    Line(String),
}

impl RawCommand {
    /// An argv as given, or a line split like a shell would (never run by one).
    fn into_argv(self) -> Result<Vec<String>, String> {
        match self {
            RawCommand::Argv(v) => Ok(v),
            RawCommand::Line(l) => shell_words::split(&l).map_err(|e| e.to_string()),
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawDuration {
    Secs(u64),
    Text(String),
}

/// Timeout when a check file does not give one.
pub const DEFAULT_TIMEOUT_SECS: u64 = 10;

/// A duration as check files write it (`30`, `"30s"`, `"5m"`, `"1h"`), 1 s to 7 days, in
/// seconds; the gateway's alerting tables use the same form.
pub fn duration_value(field: &str, value: &toml::Value) -> Result<u64, String> {
    let raw = match value {
        toml::Value::Integer(n) if *n >= 0 => RawDuration::Secs(*n as u64),
        toml::Value::String(s) => RawDuration::Text(s.clone()),
        other => {
            return Err(format!(
                "{field} {other} is not a duration; write e.g. 30, \"30s\", \"5m\" or \"1h\""
            ))
        }
    };
    parse_duration(field, &raw)
}

fn parse_duration(field: &str, raw: &RawDuration) -> Result<u64, String> {
    let secs = match raw {
        RawDuration::Secs(s) => *s,
        RawDuration::Text(t) => {
            let t = t.trim();
            let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
            let (num, unit) = t.split_at(split);
            let n: u64 = num.parse().map_err(|_| {
                format!("{field} {t:?} is not a duration; write e.g. 30, \"30s\", \"5m\" or \"1h\"")
            })?;
            let mult = match unit.trim() {
                "" | "s" => 1,
                "m" => 60,
                "h" => 3600,
                other => {
                    return Err(format!(
                        "{field} {t:?} has unknown unit {other:?}; use s, m or h"
                    ))
                }
            };
            n.saturating_mul(mult)
        }
    };
    if secs == 0 || secs > MAX_INTERVAL_SECS {
        return Err(format!(
            "{field} must be between 1 second and 7 days, not {secs} seconds"
        ));
    }
    Ok(secs)
}

/// Parse a cron expression as checks use it: 5 fields (minute first) or 6 (seconds first).
pub fn parse_cron(expr: &str) -> Result<croner::Cron, String> {
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .build()
        .parse(expr)
        .map_err(|e| format!("cron {expr:?} is not a valid cron expression: {e}"))
}

impl RawCheck {
    /// The probe this table describes: a command (or catalog plugin) read as `kind`, or
    /// exactly one built-in.
    fn probe(&mut self) -> Result<(Probe, Option<String>), String> {
        if self.request.is_some() && self.kind.as_deref() != Some("request") {
            return Err("request goes with kind = \"request\" and a command or plugin".into());
        }
        let mut builtins: Vec<Probe> = Vec::new();
        macro_rules! take {
            ($($field:ident => $variant:ident),*) => {
                $(if let Some(p) = self.$field.take() { builtins.push(Probe::$variant(p)); })*
            };
        }
        take!(cpu => Cpu, memory => Memory, swap => Swap, disk => Disk, load => Load,
              network => Network, process => Process, tcp => Tcp, http => Http, dns => Dns,
              prometheus => Prometheus, json_socket => JsonSocket);
        let has_command = self.command.is_some() || self.plugin.is_some();
        if builtins.len() > 1 || (has_command && !builtins.is_empty()) {
            return Err("set one of command, plugin or a built-in probe, not several".into());
        }
        if let Some(p) = builtins.pop() {
            if self.kind.is_some() || self.args.is_some() {
                return Err(format!(
                    "kind and args go with command or plugin, not with a built-in {} probe",
                    p.kind()
                ));
            }
            return Ok((p, None));
        }
        let split = RawCommand::into_argv;
        let mut plugin_name = None;
        let command = match (self.command.take(), self.plugin.take(), self.args.take()) {
            (Some(_), Some(_), _) => Err("set either command or plugin, not both".to_string()),
            (Some(_), None, Some(_)) => Err("args go with plugin; put them in command".to_string()),
            (None, None, _) => Err(format!(
                "command, plugin or a built-in probe ({}) is required",
                Probe::KINDS[4..].join(", ")
            )),
            (Some(cmd), None, None) => split(cmd)
                .map_err(|e| format!("command cannot be split into arguments: {e}"))
                .and_then(|v| match v.first() {
                    Some(p) if !p.is_empty() => Ok(v),
                    _ => Err("command is empty".to_string()),
                }),
            (None, Some(plugin), _) if !valid_check_name(&plugin) => {
                Err(format!("plugin {plugin:?} is not a valid plugin name"))
            }
            (None, Some(plugin), args) => args
                .map(split)
                .transpose()
                .map_err(|e| format!("args cannot be split into arguments: {e}"))
                .map(|args| {
                    plugin_name = Some(plugin.clone());
                    std::iter::once(plugin)
                        .chain(args.unwrap_or_default())
                        .collect()
                }),
        }?;
        let command = Command { command };
        let probe = match self.kind.as_deref().unwrap_or("nagios") {
            "nagios" => Probe::Nagios(command),
            "json" => Probe::Json(command),
            "daemon" => Probe::Daemon(command),
            "request" => Probe::Request(RequestProbe {
                command: command.command,
                request: match self.request.take().map(serde_json::to_value) {
                    None => Default::default(),
                    Some(Ok(serde_json::Value::Object(m))) => m,
                    Some(Ok(other)) => return Err(format!("request must be a table, not {other}")),
                    Some(Err(e)) => return Err(format!("request cannot be sent as JSON: {e}")),
                },
            }),
            other => {
                return Err(format!(
                    "kind {other:?} is not one of nagios, json, daemon, request (built-in probes are tables: http = {{ url = \"...\" }})"
                ))
            }
        };
        Ok((probe, plugin_name))
    }
}

/// Parse one check file of an agent's `checks.d`, reporting every problem in it at once.
/// Collectors are declared on the gateway only.
pub fn parse_file(path: &Path, text: &str) -> Result<Vec<CheckDef>, String> {
    let (checks, collectors) = parse_file_with_collectors(path, text)?;
    if !collectors.is_empty() {
        return Err(
            "collectors are declared in the gateway's check files, not in an agent's checks.d"
                .into(),
        );
    }
    if has_alerting(text) {
        return Err(
            "alerting ([alerting], [[receiver]], [[route]], [[dependency]], [[tuning]]) and metric exports ([[export]]) are declared in the gateway's check files, not in an agent's checks.d"
                .into(),
        );
    }
    if has_entities(text) {
        return Err(
            "proxy entities ([[entity]]) and checks about them (entity, placement) are declared in the gateway's check files, not in an agent's checks.d"
                .into(),
        );
    }
    Ok(checks)
}

/// Parse one of the gateway's check files: checks and collectors, every problem at once.
pub fn parse_file_with_collectors(
    path: &Path,
    text: &str,
) -> Result<(Vec<CheckDef>, Vec<CollectorDef>), String> {
    let raw: RawFile = toml::from_str(text).map_err(|e| e.to_string())?;
    let mut errors = Vec::new();
    let mut collectors = Vec::new();
    for (i, c) in raw.collector.into_iter().enumerate() {
        let at = format!("collector #{} ({:?})", i + 1, c.name);
        let interval_secs = match c.interval.as_ref().map(|d| parse_duration("interval", d)) {
            None => DEFAULT_COLLECTOR_INTERVAL_SECS,
            Some(Ok(secs)) => secs,
            Some(Err(e)) => {
                errors.push(format!("{at}: {e}"));
                continue;
            }
        };
        let command = match c.command.map(RawCommand::into_argv).transpose() {
            Ok(cmd) => cmd.unwrap_or_default(),
            Err(e) => {
                errors.push(format!("{at}: {e}"));
                continue;
            }
        };
        let spec = CollectorSpec {
            name: c.name,
            kind: c.kind,
            command,
            env: c.env,
            plugins: c
                .plugins
                .into_iter()
                .map(|p| match p {
                    RawPlugin::Name(name) => CollectdPlugin { name, config: None },
                    RawPlugin::Block(b) => b,
                })
                .collect(),
            interval_secs,
            config: c.config,
        };
        match spec.validate() {
            Ok(()) => collectors.push(CollectorDef {
                spec,
                target: c.target,
                file: path.to_path_buf(),
            }),
            Err(e) => errors.push(format!("{at}: {e}")),
        }
    }
    let mut out = Vec::new();
    for (i, mut c) in raw.check.into_iter().enumerate() {
        let at = format!("check #{} ({:?})", i + 1, c.name);
        let mut problems = Vec::new();
        if !valid_check_name(&c.name) {
            problems.push("name must be 1-64 characters of A-Z a-z 0-9 _ - .".to_string());
        }
        let probe = c
            .probe()
            .and_then(|(p, plugin)| p.validate().map(|()| (p, plugin)))
            .map_err(|e| problems.push(e))
            .ok();
        let daemon = matches!(probe, Some((Probe::Daemon(_), _)));
        let interval_secs = match (&c.interval, &c.cron) {
            (Some(_), Some(_)) => {
                problems.push("set either interval or cron, not both".into());
                0
            }
            (Some(i), None) => parse_duration("interval", i)
                .map_err(|e| problems.push(e))
                .unwrap_or(0),
            (None, Some(expr)) => {
                if let Err(e) = parse_cron(expr) {
                    problems.push(e);
                }
                0
            }
            (None, None) if daemon => 0,
            (None, None) => {
                problems.push("interval (or cron) is required".into());
                0
            }
        };
        let timeout_secs = c
            .timeout
            .as_ref()
            .map(|t| parse_duration("timeout", t))
            .unwrap_or(Ok(if daemon { 0 } else { DEFAULT_TIMEOUT_SECS }))
            .and_then(|t| {
                if t > MAX_TIMEOUT_SECS {
                    Err(format!("timeout must be at most 24 hours, not {t} seconds"))
                } else {
                    Ok(t)
                }
            })
            .map_err(|e| problems.push(e))
            .unwrap_or(0);
        let max_attempts = c.attempts.unwrap_or(1);
        if !(1..=MAX_ATTEMPTS).contains(&max_attempts) {
            problems.push(format!(
                "attempts must be between 1 and {MAX_ATTEMPTS}, not {max_attempts}"
            ));
        }
        match (&c.entity, &c.placement) {
            (None, Some(_)) => problems.push("placement goes with entity: the check must be about a proxy entity".into()),
            (Some(e), _) if !valid_check_name(e) => {
                problems.push(format!("entity {e:?} is not a valid entity name"))
            }
            (Some(_), _) if daemon => {
                problems.push("a daemon check cannot be about an entity: it runs on its agent".into())
            }
            (Some(_), _) if c.cron.is_some() => problems.push(
                "a check about an entity runs on an interval, not a cron schedule (its slots are the entity's)".into(),
            ),
            _ => {}
        }
        if let Some(p) = &c.placement {
            match (p.mode, p.quorum) {
                (PlacementMode::RoundRobin, Some(_)) => {
                    problems.push("quorum goes with placement mode \"all\"".into())
                }
                (_, Some(0)) => problems.push("quorum must be at least 1".into()),
                _ => {}
            }
            if p.same_label.as_deref() == Some("") {
                problems.push("same_label names a label".into());
            }
        }
        let placement = c
            .entity
            .as_ref()
            .map(|_| c.placement.clone().unwrap_or_default());
        let retry_interval_secs = c
            .retry_interval
            .as_ref()
            .map(|r| parse_duration("retry_interval", r))
            .transpose()
            .map_err(|e| problems.push(e))
            .unwrap_or(None);
        match probe {
            Some((probe, plugin_name)) if problems.is_empty() => out.push(CheckDef {
                spec: CheckSpec {
                    name: c.name,
                    probe,
                    interval_secs,
                    cron: c.cron,
                    timeout_secs,
                    max_attempts,
                    retry_interval_secs,
                    // The gateway fills the hash in from its catalog.
                    plugin: plugin_name.map(|name| PluginRef {
                        name,
                        sha256: String::new(),
                        size: 0,
                    }),
                    entity: c.entity,
                    not_before_ms: None,
                },
                target: c.target,
                placement,
                file: path.to_path_buf(),
            }),
            _ => errors.extend(problems.into_iter().map(|p| format!("{at}: {p}"))),
        }
    }
    if errors.is_empty() {
        Ok((out, collectors))
    } else {
        Err(errors.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entities_and_checks_about_them_are_the_gateways() {
        let text = "[[entity]]\nname = \"site\"\naddress = \"www.example.com\"\nlabels = { dc = \"b\" }\n\
                    [[check]]\nname = \"web\"\nhttp = { url = \"https://www.example.com/\" }\ninterval = 30\nentity = \"site\"\n\
                    [[check]]\nname = \"ping\"\ntcp = { host = \"www.example.com\", port = 443 }\ninterval = 30\nentity = \"site\"\n\
                    placement = { mode = \"all\", quorum = 2, same_label = \"dc\" }\n";
        let (checks, _) = parse_file_with_collectors(Path::new("x.toml"), text).unwrap();
        assert_eq!(checks[0].spec.entity.as_deref(), Some("site"));
        assert_eq!(
            checks[0].placement,
            Some(Placement::default()),
            "round_robin unless said"
        );
        assert_eq!(
            checks[1].placement,
            Some(Placement {
                mode: PlacementMode::All,
                quorum: Some(2),
                same_label: Some("dc".into()),
            })
        );
        let entities = parse_entities(Path::new("x.toml"), text).unwrap();
        assert_eq!(
            (entities[0].name.as_str(), entities[0].address.as_str()),
            ("site", "www.example.com")
        );
        assert_eq!(entities[0].labels["dc"], "b");
        // An agent's checks.d takes neither.
        let e = parse_file(Path::new("x.toml"), text).unwrap_err();
        assert!(e.contains("proxy entities"), "{e}");
        let e = parse_file(
            Path::new("x.toml"),
            "[[check]]\nname = \"web\"\ncommand = \"/bin/true\"\ninterval = 30\nentity = \"site\"\n",
        )
        .unwrap_err();
        assert!(e.contains("proxy entities"), "{e}");
    }

    #[test]
    fn a_placement_that_makes_no_sense_is_refused_with_why() {
        let check = |extra: &str| {
            parse_file_with_collectors(
                Path::new("x.toml"),
                &format!("[[check]]\nname = \"c\"\ncommand = \"/bin/true\"\n{extra}\n"),
            )
            .unwrap_err()
        };
        for (extra, why) in [
            (
                "interval = 30\nplacement = { mode = \"all\" }",
                "placement goes with entity",
            ),
            (
                "interval = 30\nentity = \"e\"\nplacement = { quorum = 2 }",
                "quorum goes with",
            ),
            (
                "interval = 30\nentity = \"e\"\nplacement = { mode = \"all\", quorum = 0 }",
                "at least 1",
            ),
            ("cron = \"* * * * *\"\nentity = \"e\"", "not a cron"),
            (
                "interval = 30\nentity = \"e\"\nplacement = { mode = \"some\" }",
                "unknown variant",
            ),
            (
                "interval = 30\nentity = \"bad name\"",
                "not a valid entity name",
            ),
        ] {
            let e = check(extra);
            assert!(e.contains(why), "{extra}: {e}");
        }
        let e = parse_entities(Path::new("x.toml"), "[[entity]]\nname = \"a b\"\n").unwrap_err();
        assert!(e.contains("name must be"), "{e}");
    }

    #[test]
    fn parses_argv_and_string_commands_with_durations() {
        let defs = parse_file(
            Path::new("x.toml"),
            r#"
[[check]]
name = "load"
command = ["/usr/lib/nagios/plugins/check_load", "-w", "5,4,3"]
interval = "1m"

[[check]]
name = "echo"
command = "/bin/echo 'hello world' two"
interval = 30
timeout = "5s"
target = { labels = { role = "web" }, groups = ["eu", "us"] }
"#,
        )
        .unwrap();
        assert_eq!(defs[0].spec.interval_secs, 60);
        assert_eq!(defs[0].spec.timeout_secs, DEFAULT_TIMEOUT_SECS);
        assert_eq!(
            defs[1].spec.probe.command().unwrap(),
            ["/bin/echo", "hello world", "two"]
        );
        assert_eq!(defs[1].spec.timeout_secs, 5);
        let labels: BTreeMap<String, String> = [("role".into(), "web".into())].into();
        assert!(defs[1].target.matches(&labels, &["us".into()]));
        assert!(!defs[1].target.matches(&labels, &["asia".into()]));
        assert!(!defs[1].target.matches(&BTreeMap::new(), &["eu".into()]));
    }

    #[test]
    fn a_request_check_carries_its_request_and_nothing_else_takes_one() {
        let defs = parse_file_with_collectors(
            Path::new("x.toml"),
            r#"
[[check]]
name = "ifaces"
plugin = "snmp-poller"
kind = "request"
request = { oid = "1.3.6.1.2.1.2.2", walk = true, hosts = ["a", "b"], tuning = { retries = 2 } }
interval = "30s"
timeout = "5s"
"#,
        )
        .unwrap()
        .0;
        let Probe::Request(r) = &defs[0].spec.probe else {
            panic!("{:?}", defs[0].spec.probe)
        };
        assert_eq!(r.command, ["snmp-poller"]);
        assert_eq!(
            serde_json::Value::Object(r.request.clone()),
            serde_json::json!({"oid": "1.3.6.1.2.1.2.2", "walk": true, "hosts": ["a", "b"], "tuning": {"retries": 2}})
        );
        assert_eq!(
            (defs[0].spec.interval_secs, defs[0].spec.timeout_secs),
            (30, 5)
        );
        let wire = serde_json::to_string(&defs[0].spec.probe).unwrap();
        assert!(
            wire.starts_with(r#"{"kind":"request","command":["snmp-poller"],"request":{"#),
            "{wire}"
        );
        let big = "x".repeat(MAX_REQUEST_BYTES);
        for (text, why) in [
            (
                "command = 'x'\nrequest = { a = 1 }\ninterval = 5".to_string(),
                "request goes with kind = \"request\"",
            ),
            (
                "http = { url = 'http://x/' }\nkind = 'request'\nrequest = { a = 1 }\ninterval = 5"
                    .to_string(),
                "kind and args go with command",
            ),
            (
                format!(
                    "command = 'x'\nkind = 'request'\nrequest = {{ a = '{big}' }}\ninterval = 5"
                ),
                "at most 16384",
            ),
            (
                "command = 'x'\nkind = 'request'\n".to_string(),
                "interval (or cron) is required",
            ),
        ] {
            let err = parse_file(
                Path::new("x.toml"),
                &format!("[[check]]\nname = 'r'\n{text}"),
            )
            .unwrap_err();
            assert!(err.contains(why), "{text}: {err}");
        }
    }

    #[test]
    fn parses_kinds_builtins_cron_and_attempts() {
        let defs = parse_file(
            Path::new("x.toml"),
            r#"
[[check]]
name = "queue"
command = "/opt/app/queue-health --json"
kind = "json"
cron = "*/5 * * * *"
attempts = 3
retry_interval = "20s"

[[check]]
name = "tail"
command = ["/opt/app/watch"]
kind = "daemon"

[[check]]
name = "web"
http = { url = "https://example.com/", expect_status = [200], warn_ms = 500, cert_warn_days = 14 }
interval = "30s"

[[check]]
name = "root"
disk = { warn = 80.0, crit = 90.0 }
interval = 60
"#,
        )
        .unwrap();
        assert!(matches!(defs[0].spec.probe, Probe::Json(_)));
        assert_eq!(defs[0].spec.cron.as_deref(), Some("*/5 * * * *"));
        assert_eq!(defs[0].spec.interval_secs, 0);
        assert_eq!(defs[0].spec.max_attempts, 3);
        assert_eq!(defs[0].spec.retry_interval_secs, Some(20));
        assert!(matches!(defs[1].spec.probe, Probe::Daemon(_)));
        assert_eq!(
            (defs[1].spec.interval_secs, defs[1].spec.timeout_secs),
            (0, 0)
        );
        let Probe::Http(h) = &defs[2].spec.probe else {
            panic!("{:?}", defs[2].spec.probe)
        };
        assert_eq!(h.method, "GET");
        assert_eq!(h.expect_status, vec![200]);
        assert_eq!((h.warn_ms, h.cert_warn_days), (Some(500), Some(14)));
        let Probe::Disk(d) = &defs[3].spec.probe else {
            panic!("{:?}", defs[3].spec.probe)
        };
        assert_eq!((d.path.as_str(), d.crit), ("/", Some(90.0)));
        // What the gateway sends is what the agent reads back.
        let wire = serde_json::to_string(&defs[2].spec).unwrap();
        assert!(
            wire.contains(r#""probe":{"kind":"http","url":"https://example.com/""#),
            "{wire}"
        );
        assert_eq!(
            serde_json::from_str::<CheckSpec>(&wire).unwrap(),
            defs[2].spec
        );
    }

    #[test]
    fn reports_every_problem_at_once() {
        let err = parse_file(
            Path::new("x.toml"),
            r#"
[[check]]
name = "bad name"
command = []
interval = "1d"

[[check]]
name = "ok"
command = "x"
interval = "0s"

[[check]]
name = "two"
command = "x"
tcp = { host = "localhost", port = 22 }
interval = 5

[[check]]
name = "when"
command = "x"
cron = "61 * * * *"

[[check]]
name = "web"
http = { url = "ftp://x/" }
interval = 5

[[check]]
name = "sock"
json_socket = { address = "localhost:80" }
interval = 5

[[check]]
name = "ns"
dns = { name = "example.com", record_type = "AXFR" }
interval = 5
"#,
        )
        .unwrap_err();
        for want in [
            "name must be",
            "command is empty",
            "unknown unit",
            "between 1 second",
            "not several",
            "not a valid cron expression",
            "must start with http:// or https://",
            "must be tcp://HOST:PORT or unix:/PATH",
            "record_type \"AXFR\" is not one of",
        ] {
            assert!(err.contains(want), "missing {want:?} in {err}");
        }
        let err = parse_file(
            Path::new("x.toml"),
            "[[check]]\nname='a'\ncommand='x'\ninterval=1\nshell=true\n",
        )
        .unwrap_err();
        assert!(err.contains("unknown field"), "{err}");
        let err = parse_file(
            Path::new("x.toml"),
            "[[check]]\nname='a'\nhttp={url='http://x/', body_contain='ok'}\ninterval=1\n",
        )
        .unwrap_err();
        assert!(err.contains("unknown field `body_contain`"), "{err}");
        let err = parse_file(
            Path::new("x.toml"),
            "[[check]]\nname='a'\ncommand='x'\nkind='perl'\ninterval=1\nattempts=0\n",
        )
        .unwrap_err();
        assert!(
            err.contains("kind \"perl\"") && err.contains("attempts must be"),
            "{err}"
        );
    }

    #[test]
    fn alerting_tables_pass_on_the_gateway_and_are_refused_in_checks_d() {
        let text = "[[check]]\nname = \"a\"\ncommand = \"/bin/true\"\ninterval = 5\n[alerting]\nfallback = \"x\"\n[[receiver]]\nname = \"x\"\n[[route]]\nreceivers = [\"x\"]\n";
        let (checks, _) = parse_file_with_collectors(Path::new("a.toml"), text).unwrap();
        assert_eq!(checks.len(), 1);
        let err = parse_file(Path::new("a.toml"), text).unwrap_err();
        assert!(
            err.contains("alerting") && err.contains("checks.d"),
            "{err}"
        );
        assert!(
            parse_file(Path::new("a.toml"), "[[rout]]\n").is_err(),
            "other tables still refused"
        );
    }

    #[test]
    fn collectors_parse_on_the_gateway_and_are_refused_in_checks_d() {
        let text = r#"
[[collector]]
name = "collectd"
kind = "collectd"
plugins = ["cpu", "memory", { name = "df", config = 'MountPoint "/"' }]
interval = "5s"
target = { groups = ["db"] }

[[collector]]
name = "shipper"
kind = "program"
command = "/usr/local/bin/shipper --config {{config_file}}"
env = { LEVEL = "debug" }
config = "send to {{graphite_host}}:{{graphite_port}}"
"#;
        let (checks, collectors) = parse_file_with_collectors(Path::new("c.toml"), text).unwrap();
        assert!(checks.is_empty());
        assert_eq!(collectors.len(), 2);
        let c = &collectors[0].spec;
        assert_eq!((c.kind, c.interval_secs), (CollectorKind::Collectd, 5));
        assert_eq!(c.plugins[2].config.as_deref(), Some("MountPoint \"/\""));
        assert_eq!(collectors[0].target.groups, ["db"]);
        let p = &collectors[1].spec;
        assert_eq!(p.interval_secs, DEFAULT_COLLECTOR_INTERVAL_SECS);
        assert_eq!(p.command[2], "{{config_file}}");
        let err = parse_file(Path::new("c.toml"), text).unwrap_err();
        assert!(err.contains("gateway"), "{err}");
        let bad = parse_file_with_collectors(
            Path::new("c.toml"),
            "[[collector]]\nname = \"x\"\nkind = \"collectd\"\ninterval = \"2h\"\n",
        )
        .unwrap_err();
        assert!(
            bad.contains("collector #1") && bad.contains("plugin") && bad.contains("interval"),
            "{bad}"
        );
    }
}
