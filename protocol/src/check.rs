//! What an agent is told to run and what a run produces.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::probe::Probe;
use crate::schema_rules as js;

/// A check's state, with Nagios semantics (exit codes 0..=3).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warning,
    Critical,
    Unknown,
}

impl Status {
    /// The status a Nagios plugin's exit code means; `None` for codes outside 0..=3.
    pub fn from_exit_code(code: i32) -> Option<Status> {
        match code {
            0 => Some(Status::Ok),
            1 => Some(Status::Warning),
            2 => Some(Status::Critical),
            3 => Some(Status::Unknown),
            _ => None,
        }
    }

    /// The Nagios exit code for this status.
    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warning => "warning",
            Status::Critical => "critical",
            Status::Unknown => "unknown",
        }
    }
}

/// One measured value, from Nagios perfdata or a built-in check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Metric {
    #[schemars(length(max = crate::limits::MAX_METRIC_NAME_BYTES))]
    pub name: String,
    pub value: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = crate::limits::MAX_METRIC_FIELD_BYTES))]
    pub unit: Option<String>,
    /// Warning range, as written by the plugin (e.g. `10`, `@10:20`, `~:5`): a string,
    /// never a number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = crate::limits::MAX_METRIC_FIELD_BYTES))]
    pub warn: Option<String>,
    /// Critical range, as written by the plugin: a string, never a number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = crate::limits::MAX_METRIC_FIELD_BYTES))]
    pub crit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
}

impl Metric {
    /// A bare reading: a name and a value, no unit, thresholds or bounds.
    pub fn new(name: impl Into<String>, value: f64) -> Metric {
        Metric {
            name: name.into(),
            value,
            unit: None,
            warn: None,
            crit: None,
            min: None,
            max: None,
        }
    }
}

/// Why a check ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// Its schedule came due.
    #[default]
    Schedule,
    /// Someone asked for it through the API ("run now").
    RunNow,
}

/// A check as an agent receives it: already targeted and validated by the gateway (or
/// read from the agent's own `checks.d`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CheckSpec {
    #[schemars(pattern(js::CHECK_NAME), extend("not" = js::not_dots()))]
    pub name: String,
    /// What runs.
    pub probe: Probe,
    /// Seconds between runs, on the agent's splayed grid. 0 when the check has a `cron`
    /// schedule or is a daemon (which runs continuously).
    #[schemars(range(max = crate::limits::MAX_INTERVAL_SECS))]
    pub interval_secs: u64,
    /// A cron expression (5 fields, minute first, or 6 with seconds first) in the agent's
    /// local time; replaces the interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// Seconds before the whole process group is killed and the result is UNKNOWN. For a
    /// daemon: the longest silence before an UNKNOWN result says it stopped reporting.
    #[schemars(range(max = crate::limits::MAX_TIMEOUT_SECS))]
    pub timeout_secs: u64,
    /// Consecutive non-OK results before the state turns hard. 1 (the default) makes every
    /// state hard at once.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    #[schemars(range(min = 1, max = crate::limits::MAX_ATTEMPTS))]
    pub max_attempts: u32,
    /// Seconds between runs while a non-OK state is soft; the interval when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = crate::limits::MAX_INTERVAL_SECS))]
    pub retry_interval_secs: Option<u64>,
    /// Set when the command's program names a plugin from the gateway's catalog: the
    /// agent fetches it by hash, and runs it only while the file on disk still has this
    /// hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin: Option<PluginRef>,
    /// Set when the check is about a proxy entity and the gateway placed it on this agent
    /// (`entity` in a gateway check file, docs/CHECKS.md): its slots are the entity's, the
    /// same on whichever agent runs it (the phase comes from the entity and the check, not
    /// the agent), and its first run waits for the next slot, so a check handed from one
    /// agent to another is never run twice in one slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(js::CHECK_NAME), extend("not" = js::not_dots()))]
    pub entity: Option<String>,
    /// With `entity`: the first run is at the first slot at or after this Unix time in
    /// milliseconds. The gateway sets it when it hands the check from one agent to
    /// another, a little after the handover, so the agent that had it has stopped by then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = js::MAX_SAFE_INTEGER))]
    pub not_before_ms: Option<u64>,
}

fn one() -> u32 {
    1
}

fn is_one(n: &u32) -> bool {
    *n == 1
}

impl CheckSpec {
    /// An interval check of `probe` with the defaults: hard states at once, no plugin.
    pub fn new(
        name: impl Into<String>,
        probe: Probe,
        interval_secs: u64,
        timeout_secs: u64,
    ) -> Self {
        CheckSpec {
            name: name.into(),
            probe,
            interval_secs,
            cron: None,
            timeout_secs,
            max_attempts: 1,
            retry_interval_secs: None,
            plugin: None,
            entity: None,
            not_before_ms: None,
        }
    }
}

/// Whether a state has been confirmed (hard) or may still be a passing glitch (soft).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum StateType {
    #[default]
    Hard,
    Soft,
}

/// One part of a check that failed on its own (a disk of several, a queue of many), as a
/// JSON plugin reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Fault {
    #[schemars(length(max = crate::limits::MAX_FAULT_NAME_BYTES))]
    pub name: String,
    pub status: Status,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = crate::limits::MAX_FAULT_OUTPUT_BYTES))]
    pub output: String,
}

/// A plugin in the gateway's catalog, addressed by content.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub struct PluginRef {
    /// File name in the agent's plugin directory; a valid check name (no `/`, no `..`).
    #[schemars(pattern(js::CHECK_NAME), extend("not" = js::not_dots()))]
    pub name: String,
    /// Hex SHA-256 of the file's content.
    #[schemars(pattern(js::SHA256_HEX))]
    pub sha256: String,
    #[schemars(range(max = crate::limits::MAX_PLUGIN_BYTES))]
    pub size: u64,
}

/// The hash of a configuration with collectors: the checks' hash when there are none (so
/// agents that predate collectors see the same hashes), otherwise over both.
pub fn config_hash_with_collectors(
    checks: &[CheckSpec],
    collectors: &[crate::CollectorSpec],
) -> String {
    if collectors.is_empty() {
        return config_hash(checks);
    }
    let mut sorted: Vec<&crate::CollectorSpec> = collectors.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let json = serde_json::to_vec(&sorted).unwrap_or_default();
    let mut h = Sha256::new();
    h.update(config_hash(checks).as_bytes());
    h.update(b"\ncollectors\n");
    h.update(&json);
    hex::encode(h.finalize())
}

/// The content hash of a configuration: SHA-256 over the canonical JSON of the checks sorted
/// by name. Agents send the hash they run; gateways send a config only when it differs.
pub fn config_hash(checks: &[CheckSpec]) -> String {
    let mut sorted: Vec<&CheckSpec> = checks.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    // Serializing plain structs of strings and integers cannot fail.
    let json = serde_json::to_vec(&sorted).unwrap_or_default();
    hex::encode(Sha256::digest(&json))
}
