//! Collectors: long-running programs such as collectd or fluentd that the agent starts,
//! keeps alive, configures from the gateway's declaration, and takes data from.
//!
//! A declaration names the program and what to render into its configuration file; the
//! agent renders the file, supervises the process, listens on localhost for the data the
//! collector sends, and reports two checks: `collector.NAME` (its health) and
//! `collector.NAME.metrics` (the data, as metrics).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::names::valid_check_name;

/// Longest collector name: `collector.NAME.metrics` must stay a valid check name.
pub const MAX_COLLECTOR_NAME: usize = 46;
/// Most collectors in one agent's configuration.
pub const MAX_COLLECTORS: usize = 16;

/// Which built-in definition renders the collector's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CollectorKind {
    /// collectd: `collectd.conf` with the listed plugins and `write_graphite` pointing at
    /// the agent; run as `collectd -f -C FILE`.
    Collectd,
    /// fluentd: `fluent.conf` with the given sources and an `http` output to the agent;
    /// run as `fluentd -c FILE`.
    Fluentd,
    /// Any other program: its `config` text is rendered with placeholders and it is run
    /// with `command`.
    Program,
}

/// A collectd plugin to load, with the lines of its `<Plugin>` block (if any).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CollectdPlugin {
    #[schemars(pattern(crate::schema_rules::COLLECTD_PLUGIN))]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
}

/// One collector, as the gateway sends it in `config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CollectorSpec {
    #[schemars(pattern(crate::schema_rules::COLLECTOR_NAME), extend("not" = crate::schema_rules::not_dots()))]
    pub name: String,
    pub kind: CollectorKind,
    /// The program and its arguments. Empty for collectd and fluentd means the default
    /// (`/usr/sbin/collectd`, `fluentd`); `-C FILE` / `-c FILE` (and `-f` for collectd) are
    /// added by the agent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Environment for the program, on top of the cleared environment plugins get.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// collectd: the plugins to load (besides `write_graphite`, which the agent adds).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plugins: Vec<CollectdPlugin>,
    /// Seconds between readings (collectd's `Interval`) and between metric results.
    #[schemars(range(min = 1, max = 3600))]
    pub interval_secs: u64,
    /// fluentd: the `<source>` sections; program: the whole configuration file. Both may
    /// use `{{graphite_host}}`, `{{graphite_port}}`, `{{graphite_prefix}}`, `{{http_url}}`,
    /// `{{secret}}`, `{{hostname}}`, `{{config_file}}` and `{{work_dir}}` (the agent's
    /// rendering; the three that hold the collector's secret are refused in `command`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
}

impl CollectorSpec {
    /// Check the declaration; every problem at once.
    pub fn validate(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        if self.name.len() > MAX_COLLECTOR_NAME || !valid_check_name(&self.name) {
            problems.push(format!(
                "collector name {:?} must be 1-{MAX_COLLECTOR_NAME} characters of A-Z a-z 0-9 _ - .",
                self.name
            ));
        }
        if !(1..=3600).contains(&self.interval_secs) {
            problems.push(format!(
                "interval must be 1 s to 1 h, not {} s",
                self.interval_secs
            ));
        }
        match self.kind {
            CollectorKind::Program => {
                if self.command.is_empty() {
                    problems.push("a program collector needs a command".into());
                }
            }
            CollectorKind::Collectd => {
                if self.plugins.is_empty() {
                    problems.push("a collectd collector needs at least one plugin".into());
                }
                for p in &self.plugins {
                    let ok = !p.name.is_empty()
                        && p.name.len() <= 64
                        && p.name
                            .bytes()
                            .all(|c| c.is_ascii_alphanumeric() || c == b'_');
                    if !ok {
                        problems.push(format!("collectd plugin name {:?} is not valid", p.name));
                    }
                    if p.name == "write_graphite" {
                        problems
                            .push("write_graphite is added by the agent; do not list it".into());
                    }
                }
            }
            CollectorKind::Fluentd => {}
        }
        if self.command.iter().any(|a| a.contains('\0'))
            || self.env.iter().any(|(k, v)| {
                k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0')
            })
        {
            problems.push("command and environment may not contain NUL or empty names".into());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    /// The check that reports the collector's health.
    pub fn health_check(&self) -> String {
        format!("collector.{}", self.name)
    }

    /// The check whose results carry the collector's data.
    pub fn metrics_check(&self) -> String {
        format!("collector.{}.metrics", self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collectd() -> CollectorSpec {
        CollectorSpec {
            name: "collectd".into(),
            kind: CollectorKind::Collectd,
            command: vec![],
            env: BTreeMap::new(),
            plugins: vec![CollectdPlugin {
                name: "cpu".into(),
                config: None,
            }],
            interval_secs: 10,
            config: None,
        }
    }

    #[test]
    fn a_good_declaration_passes_and_names_its_checks() {
        let c = collectd();
        c.validate().unwrap();
        assert_eq!(c.health_check(), "collector.collectd");
        assert!(valid_check_name(&c.metrics_check()));
        let long = CollectorSpec {
            name: "x".repeat(MAX_COLLECTOR_NAME),
            ..collectd()
        };
        long.validate().unwrap();
        assert!(valid_check_name(&long.metrics_check()));
    }

    #[test]
    fn every_problem_is_reported() {
        let c = CollectorSpec {
            name: "bad name".into(),
            interval_secs: 0,
            plugins: vec![
                CollectdPlugin {
                    name: "write_graphite".into(),
                    config: None,
                },
                CollectdPlugin {
                    name: "cpu;rm".into(),
                    config: None,
                },
            ],
            env: BTreeMap::from([("A=B".to_string(), "1".to_string())]),
            ..collectd()
        };
        let e = c.validate().unwrap_err();
        for want in [
            "collector name",
            "interval",
            "write_graphite",
            "cpu;rm",
            "NUL",
        ] {
            assert!(e.contains(want), "{want} missing from {e}");
        }
        let p = CollectorSpec {
            kind: CollectorKind::Program,
            ..collectd()
        };
        assert!(p.validate().unwrap_err().contains("needs a command"));
    }
}
