//! From results to samples: the one mapping every sink writes (docs/METRICS.md).
//!
//! Each result gives, at its run's start (`started_at_ms`):
//!
//! | series | value |
//! |--------|-------|
//! | `outpost_check_status` | 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN |
//! | `outpost_check_duration_seconds` | how long the run took |
//! | `outpost_check_metric` (label `metric`, `unit`) | each metric of its perfdata, or of a collector, as printed |
//! | `outpost_check_metric_warn`, `_crit` | the metric's thresholds, when each is a plain number (a range is not a sample) |
//! | `outpost_check_metric_min`, `_max` | the metric's bounds, when given |
//!
//! And each presence change of an agent: `outpost_agent_online` 1 (connected) or 0 (lost,
//! said bye, revoked), at the change's time.
//!
//! Labels: `tenant`, `agent` (the fingerprint), `hostname`, `check`, then the agent's own
//! labels (a label of the agent named like one of these is left out: these win). A
//! metric named in Graphite's tagged form, `name;tag=value;…` (StatsD's tags), is the
//! metric `name` with each tag a label.

use std::collections::BTreeMap;

use outpost_protocol::{CheckResult, Status};

use crate::registry::Identity;

/// One sample of one series.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The series' family name (`outpost_check_status`, ...).
    pub name: &'static str,
    /// Sorted by name.
    pub labels: Vec<(String, String)>,
    pub value: f64,
    /// Milliseconds since the Unix epoch.
    pub ts_ms: i64,
}

/// The labels every series of one result has, in this order first.
pub const OWN_LABELS: [&str; 6] = ["tenant", "agent", "hostname", "check", "metric", "unit"];

pub fn status_value(s: Status) -> f64 {
    match s {
        Status::Ok => 0.0,
        Status::Warning => 1.0,
        Status::Critical => 2.0,
        Status::Unknown => 3.0,
    }
}

/// A Nagios threshold that is one plain number (`10`, `-3.5`), not a range.
fn plain_threshold(t: &Option<String>) -> Option<f64> {
    t.as_deref()?
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite())
}

/// The sample of a presence change: `outpost_agent_online` 1 when the agent connected,
/// 0 when it was lost, said bye or was revoked.
pub fn presence(tenant: &str, event: &crate::bus::PresenceEvent, who: Option<&Identity>) -> Sample {
    let mut labels: BTreeMap<String, String> = BTreeMap::new();
    if let Some(id) = who {
        for (k, v) in &id.labels {
            if !OWN_LABELS.contains(&k.as_str()) {
                labels.insert(k.clone(), v.clone());
            }
        }
        labels.insert("hostname".into(), id.hostname.clone());
    }
    labels.insert("tenant".into(), tenant.into());
    labels.insert("agent".into(), event.agent.fingerprint.clone());
    Sample {
        name: "outpost_agent_online",
        labels: labels.into_iter().filter(|(_, v)| !v.is_empty()).collect(),
        value: f64::from(u8::from(event.presence == crate::bus::Presence::Online)),
        ts_ms: i64::try_from(event.at_ms).unwrap_or(i64::MAX),
    }
}

/// Every sample of one result of `fingerprint` (in `tenant`), whose agent is `who`.
pub fn samples(
    tenant: &str,
    fingerprint: &str,
    who: Option<&Identity>,
    result: &CheckResult,
) -> Vec<Sample> {
    let mut base: BTreeMap<String, String> = BTreeMap::new();
    if let Some(id) = who {
        for (k, v) in &id.labels {
            if !OWN_LABELS.contains(&k.as_str()) {
                base.insert(k.clone(), v.clone());
            }
        }
    }
    base.insert("tenant".into(), tenant.into());
    base.insert("agent".into(), fingerprint.into());
    base.insert(
        "hostname".into(),
        who.map(|i| i.hostname.clone()).unwrap_or_default(),
    );
    base.insert("check".into(), result.check.clone());
    let ts_ms = i64::try_from(result.started_at_ms).unwrap_or(i64::MAX);
    let sample = |name: &'static str, labels: &BTreeMap<String, String>, value: f64| Sample {
        name,
        labels: labels
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        value,
        ts_ms,
    };
    let mut out = vec![
        sample("outpost_check_status", &base, status_value(result.status)),
        sample(
            "outpost_check_duration_seconds",
            &base,
            result.duration_ms as f64 / 1000.0,
        ),
    ];
    for m in &result.metrics {
        if !m.value.is_finite() {
            continue;
        }
        let mut labels = base.clone();
        // A Graphite-tagged name (`name;tag=value;…`, as the agent's StatsD gives
        // DogStatsD's tags): the name is the metric, each tag a label (ours win).
        let mut parts = m.name.split(';');
        let name = parts.next().unwrap_or_default();
        for tag in parts {
            if let Some((k, v)) = tag.split_once('=') {
                if !k.is_empty() && !OWN_LABELS.contains(&k) {
                    labels.insert(k.to_string(), v.to_string());
                }
            }
        }
        labels.insert("metric".into(), name.to_string());
        labels.insert("unit".into(), m.unit.clone().unwrap_or_default());
        out.push(sample("outpost_check_metric", &labels, m.value));
        for (name, v) in [
            ("outpost_check_metric_warn", plain_threshold(&m.warn)),
            ("outpost_check_metric_crit", plain_threshold(&m.crit)),
            ("outpost_check_metric_min", m.min.filter(|v| v.is_finite())),
            ("outpost_check_metric_max", m.max.filter(|v| v.is_finite())),
        ] {
            if let Some(v) = v {
                out.push(sample(name, &labels, v));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_protocol::Metric;

    #[test]
    fn a_tagged_metric_name_gives_the_name_and_a_label_per_tag() {
        let mut r = CheckResult::new("statsd", Status::Ok, "");
        r.metrics = vec![Metric::new("app.hits;az=b;check=x;env=prod", 5.0)];
        let s = samples("t1", "fp1", None, &r);
        let labels: BTreeMap<_, _> = s[2].labels.iter().cloned().collect();
        assert_eq!(labels["metric"], "app.hits");
        assert_eq!(
            (labels["az"].as_str(), labels["env"].as_str()),
            ("b", "prod")
        );
        assert_eq!(labels["check"], "statsd", "a tag never overrides ours");
    }

    #[test]
    fn a_result_gives_its_state_duration_and_each_metric_with_thresholds() {
        let mut r = CheckResult::new("disk", Status::Warning, "DISK WARNING");
        r.started_at_ms = 1_700_000_000_123;
        r.duration_ms = 250;
        r.metrics = vec![
            Metric {
                unit: Some("MB".into()),
                warn: Some("80".into()),
                crit: Some("@10:20".into()),
                min: Some(0.0),
                max: Some(100.0),
                ..Metric::new("/", 45.5)
            },
            Metric::new("nan", f64::NAN),
        ];
        let who = Identity {
            hostname: "web1".into(),
            labels: [
                ("dc".to_string(), "a".to_string()),
                ("check".to_string(), "x".to_string()),
            ]
            .into(),
            groups: vec![],
        };
        let s = samples("t1", "fp1", Some(&who), &r);
        let names: Vec<&str> = s.iter().map(|s| s.name).collect();
        assert_eq!(
            names,
            [
                "outpost_check_status",
                "outpost_check_duration_seconds",
                "outpost_check_metric",
                "outpost_check_metric_warn",
                "outpost_check_metric_min",
                "outpost_check_metric_max"
            ],
            "no crit (a range), nothing of a NaN"
        );
        assert_eq!(
            (s[0].value, s[1].value, s[2].value, s[3].value),
            (1.0, 0.25, 45.5, 80.0)
        );
        assert!(s.iter().all(|x| x.ts_ms == 1_700_000_000_123));
        let labels: BTreeMap<_, _> = s[2].labels.iter().cloned().collect();
        assert_eq!(
            labels["check"], "disk",
            "the agent's own `check` label loses"
        );
        assert_eq!(labels["dc"], "a");
        assert_eq!(labels["metric"], "/");
        assert_eq!(labels["unit"], "MB");
        assert_eq!(
            (
                labels["tenant"].as_str(),
                labels["agent"].as_str(),
                labels["hostname"].as_str()
            ),
            ("t1", "fp1", "web1")
        );
        let status: BTreeMap<_, _> = s[0].labels.iter().cloned().collect();
        assert!(!status.contains_key("metric") && !status.contains_key("unit"));
        let sorted = s[2].labels.windows(2).all(|w| w[0].0 < w[1].0);
        assert!(sorted, "labels sorted by name");
    }
}
