//! The collectors' data on its way to the outbox: parsing what the listeners receive
//! (Graphite plaintext lines, fluentd's JSON records), keeping the latest value of each
//! metric per collector, and turning them into results of `collector.NAME.metrics` once
//! an interval.
//!
//! Attribution: a Graphite path starts with `NAME@` (collectd's `Prefix`), fluentd posts to
//! `/collector/NAME/TAG`. Data for a name that is not a running collector is counted and
//! dropped. Each collector keeps at most [`MAX_SERIES`] metric names between two flushes;
//! values for further names are dropped and counted in the next result.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use outpost_protocol::{CheckResult, CollectorKind, CollectorSpec, Metric, Status, MAX_METRICS};

use crate::checks::outcome::MAX_METRIC_NAME_BYTES;
use crate::util::{now_ms, truncate_utf8};

/// Most distinct metric names a collector holds between two flushes.
pub const MAX_SERIES: usize = 8 * MAX_METRICS;

/// One Graphite plaintext line: `path value [timestamp]`.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphiteLine<'a> {
    pub path: &'a str,
    pub value: f64,
}

/// Why a Graphite line was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadLine {
    /// Not `path value [timestamp]`.
    Malformed,
    /// A value that is not a number (collectd sends `nan` for a rate it cannot compute yet).
    NotANumber,
}

/// Parse one line (without its newline; a trailing `\r` is allowed).
pub fn parse_graphite(line: &str) -> Result<GraphiteLine<'_>, BadLine> {
    let mut parts = line.split_ascii_whitespace();
    let (Some(path), Some(value)) = (parts.next(), parts.next()) else {
        return Err(BadLine::Malformed);
    };
    if let Some(ts) = parts.next() {
        if ts.parse::<f64>().is_err() {
            return Err(BadLine::Malformed);
        }
    }
    if parts.next().is_some() {
        return Err(BadLine::Malformed);
    }
    let value: f64 = value.parse().map_err(|_| BadLine::Malformed)?;
    if !value.is_finite() {
        return Err(BadLine::NotANumber);
    }
    Ok(GraphiteLine { path, value })
}

/// A host name as collectd's `write_graphite` writes it into a path: dots, white space
/// and control characters become `_` (its `EscapeCharacter`).
pub fn graphite_escape(host: &str) -> String {
    host.chars()
        .map(|c| {
            if c == '.' || c.is_whitespace() || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// Fluentd's body: a JSON array of records or one record per line (NDJSON). Returns the
/// records that are JSON objects and how many entries were not.
pub fn parse_records(
    body: &[u8],
) -> Result<(Vec<serde_json::Map<String, serde_json::Value>>, u64), String> {
    use serde_json::Value;
    let text = std::str::from_utf8(body).map_err(|_| "the body is not UTF-8".to_string())?;
    let values: Vec<Value> = if text.trim_start().starts_with('[') {
        serde_json::from_str(text).map_err(|e| format!("the body is not a JSON array: {e}"))?
    } else {
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("a line of the body is not JSON: {e}"))?
    };
    let mut records = Vec::with_capacity(values.len());
    let mut skipped = 0;
    for v in values {
        match v {
            Value::Object(m) => records.push(m),
            _ => skipped += 1,
        }
    }
    Ok((records, skipped))
}

/// What the agent keeps of one collector's data until its next flush.
#[derive(Debug)]
struct Sink {
    kind: CollectorKind,
    check: String,
    interval: Duration,
    next_flush: Instant,
    /// The agent's host name as collectd writes it, dropped from collectd's paths.
    host: String,
    values: BTreeMap<String, f64>,
    received: u64,
    /// Values for names beyond [`MAX_SERIES`].
    over_limit: u64,
}

impl Sink {
    fn put(&mut self, name: String, value: f64) {
        let len = self.values.len();
        match self.values.get_mut(&name) {
            Some(v) => *v = value,
            None if len < MAX_SERIES => {
                self.values.insert(name, value);
            }
            None => self.over_limit += 1,
        }
        self.received += 1;
    }

    /// The metric name for a collectd path (after `NAME@`): the host part goes when it is
    /// this agent's (`web-1.cpu-0.cpu-idle` becomes `cpu-0.cpu-idle`).
    fn metric_name(&self, rest: &str) -> String {
        let mut name = match (self.kind, rest.split_once('.')) {
            (CollectorKind::Collectd, Some((host, tail))) if host == self.host => tail,
            _ => rest,
        }
        .to_string();
        truncate_utf8(&mut name, MAX_METRIC_NAME_BYTES);
        name
    }
}

/// Counters of the data the listeners received, for status and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Values taken for a collector.
    pub accepted: u64,
    /// Lines or bodies that could not be read.
    pub malformed: u64,
    /// Values that were not numbers (collectd's `nan`).
    pub not_a_number: u64,
    pub unknown_collector: u64,
}

/// Every running collector's buffered data.
pub struct Sinks {
    host: String,
    inner: Mutex<(HashMap<String, Sink>, Counts)>,
}

impl Sinks {
    pub fn new(hostname: &str) -> Sinks {
        Sinks {
            host: graphite_escape(hostname),
            inner: Mutex::new((HashMap::new(), Counts::default())),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (HashMap<String, Sink>, Counts)> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Take data for `spec` (or update its interval); its buffered values are kept.
    pub fn declare(&self, spec: &CollectorSpec) {
        let interval = Duration::from_secs(spec.interval_secs.max(1));
        let mut g = self.lock();
        let sink = g.0.entry(spec.name.clone()).or_insert_with(|| Sink {
            kind: spec.kind,
            check: spec.metrics_check(),
            interval,
            next_flush: Instant::now() + interval,
            host: self.host.clone(),
            values: BTreeMap::new(),
            received: 0,
            over_limit: 0,
        });
        sink.kind = spec.kind;
        if sink.interval != interval {
            sink.interval = interval;
            sink.next_flush = Instant::now() + interval;
        }
    }

    /// Stop taking data for `name`; what it had buffered is dropped.
    pub fn remove(&self, name: &str) {
        self.lock().0.remove(name);
    }

    /// Every collector taking data.
    pub fn names(&self) -> Vec<String> {
        self.lock().0.keys().cloned().collect()
    }

    /// Count a line or body that could not be read at all.
    pub fn bad_line(&self) {
        self.lock().1.malformed += 1;
    }

    pub fn counts(&self) -> Counts {
        self.lock().1
    }

    /// Take one Graphite line.
    pub fn graphite(&self, line: &str) {
        let mut g = self.lock();
        let (sinks, counts) = &mut *g;
        let parsed = match parse_graphite(line) {
            Ok(p) => p,
            Err(BadLine::Malformed) => return counts.malformed += 1,
            Err(BadLine::NotANumber) => return counts.not_a_number += 1,
        };
        let Some((name, rest)) = parsed.path.split_once('@') else {
            return counts.unknown_collector += 1;
        };
        match sinks.get_mut(name) {
            Some(sink) if !rest.is_empty() => {
                let metric = sink.metric_name(rest);
                sink.put(metric, parsed.value);
                counts.accepted += 1;
            }
            Some(_) => counts.malformed += 1,
            None => counts.unknown_collector += 1,
        }
    }

    /// Take fluentd's records for `tag` (empty when the URL had none): each numeric field
    /// becomes `TAG.FIELD`, and `TAG.records` counts the records since the last flush.
    /// Returns false when `name` is not a running collector.
    pub fn records(
        &self,
        name: &str,
        tag: &str,
        records: &[serde_json::Map<String, serde_json::Value>],
    ) -> bool {
        let mut g = self.lock();
        let (sinks, counts) = &mut *g;
        let Some(sink) = sinks.get_mut(name) else {
            counts.unknown_collector += 1;
            return false;
        };
        let prefix = if tag.is_empty() {
            String::new()
        } else {
            format!("{tag}.")
        };
        for r in records {
            for (field, v) in r {
                if let Some(n) = v.as_f64().filter(|n| n.is_finite()) {
                    let mut metric = format!("{prefix}{field}");
                    truncate_utf8(&mut metric, MAX_METRIC_NAME_BYTES);
                    sink.put(metric, n);
                }
            }
        }
        counts.accepted += records.len() as u64;
        let mut count = format!("{prefix}records");
        truncate_utf8(&mut count, MAX_METRIC_NAME_BYTES);
        let before = sink.values.get(&count).copied().unwrap_or(0.0);
        sink.put(count, before + records.len() as f64);
        true
    }

    /// The results of every collector whose interval has come (all of them when `all`),
    /// emptying their buffers.
    pub fn flush_due(&self, now: Instant, all: bool) -> Vec<CheckResult> {
        let mut g = self.lock();
        let mut out = Vec::new();
        for sink in g.0.values_mut() {
            if !all && now < sink.next_flush {
                continue;
            }
            sink.next_flush = now + sink.interval;
            out.extend(flush(sink));
        }
        out
    }
}

/// A word for where the data came from, in the results' output.
fn source(kind: CollectorKind) -> &'static str {
    match kind {
        CollectorKind::Collectd => "collectd",
        CollectorKind::Fluentd => "fluentd",
        CollectorKind::Program => "the program",
    }
}

/// The sink's values as results of at most [`MAX_METRICS`] metrics each; none when it
/// received nothing.
fn flush(sink: &mut Sink) -> Vec<CheckResult> {
    let values = std::mem::take(&mut sink.values);
    let (received, over) = (sink.received, sink.over_limit);
    (sink.received, sink.over_limit) = (0, 0);
    if values.is_empty() && over == 0 {
        return Vec::new();
    }
    let total = values.len();
    let metrics: Vec<Metric> = values
        .into_iter()
        .map(|(name, value)| Metric::new(name, value))
        .collect();
    let parts = metrics.len().div_ceil(MAX_METRICS).max(1);
    let mut chunks: Vec<Vec<Metric>> = metrics.chunks(MAX_METRICS).map(<[_]>::to_vec).collect();
    chunks.resize_with(parts, Vec::new);
    let started = now_ms();
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, metrics)| {
            let mut output = format!("{total} metrics from {}", source(sink.kind));
            if parts > 1 {
                output.push_str(&format!(" (part {} of {parts})", i + 1));
            }
            let mut r = CheckResult::new(sink.check.clone(), Status::Ok, output);
            r.started_at_ms = started;
            r.metrics = metrics;
            r.long_output = format!("{received} values received in the interval");
            if over > 0 {
                r.long_output.push_str(&format!(
                    "\n[{over} values for names beyond the first {MAX_SERIES} dropped]"
                ));
            }
            r
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, kind: CollectorKind) -> CollectorSpec {
        CollectorSpec {
            name: name.into(),
            kind,
            command: vec!["/bin/true".into()],
            env: Default::default(),
            plugins: vec![],
            interval_secs: 1,
            config: None,
        }
    }

    #[test]
    fn graphite_lines_parse_and_bad_ones_are_said_apart() {
        assert_eq!(
            parse_graphite("sys@h.cpu-0.cpu-idle 98.5 1700000000\r"),
            Ok(GraphiteLine {
                path: "sys@h.cpu-0.cpu-idle",
                value: 98.5
            })
        );
        assert_eq!(parse_graphite("a 1").unwrap().value, 1.0);
        assert_eq!(parse_graphite("a -2e3 17.5").unwrap().value, -2000.0);
        assert_eq!(parse_graphite("a nan 1700000000"), Err(BadLine::NotANumber));
        assert_eq!(parse_graphite("a inf 1"), Err(BadLine::NotANumber));
        for bad in ["", "a", "a b 1", "a 1 x", "a 1 2 3", "   "] {
            assert_eq!(parse_graphite(bad), Err(BadLine::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn graphite_data_goes_to_its_collector_by_prefix() {
        let sinks = Sinks::new("web-1.example.com");
        sinks.declare(&spec("sys", CollectorKind::Collectd));
        sinks.declare(&spec("sys.b", CollectorKind::Collectd));
        sinks.declare(&spec("prog", CollectorKind::Program));
        for line in [
            "sys@web-1_example_com.cpu-0.cpu-idle 98 1700000000",
            "sys@web-1_example_com.cpu-0.cpu-idle 97 1700000001",
            "sys@other_host.snmp.if_octets-rx 5 1700000001",
            "sys.b@web-1_example_com.memory.memory-used 1024 1700000000",
            "prog@queue.depth 3",
            "nobody@x.y 1 1",
            "noprefix 1 1",
            "sys@web-1_example_com.load.load.shortterm nan 1",
            "garbage",
        ] {
            sinks.graphite(line);
        }
        assert_eq!(
            sinks.counts(),
            Counts {
                accepted: 5,
                malformed: 1,
                not_a_number: 1,
                unknown_collector: 2
            }
        );
        let mut got: Vec<_> = sinks
            .flush_due(Instant::now(), true)
            .into_iter()
            .map(|r| {
                let m: Vec<_> = r
                    .metrics
                    .iter()
                    .map(|m| (m.name.clone(), m.value))
                    .collect();
                (r.check, r.output, m)
            })
            .collect();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            got,
            [
                (
                    "collector.prog.metrics".to_string(),
                    "1 metrics from the program".to_string(),
                    vec![("queue.depth".to_string(), 3.0)]
                ),
                (
                    "collector.sys.b.metrics".into(),
                    "1 metrics from collectd".into(),
                    vec![("memory.memory-used".into(), 1024.0)]
                ),
                (
                    "collector.sys.metrics".into(),
                    "2 metrics from collectd".into(),
                    vec![
                        ("cpu-0.cpu-idle".into(), 97.0),
                        ("other_host.snmp.if_octets-rx".into(), 5.0)
                    ]
                ),
            ]
        );
        assert!(
            sinks.flush_due(Instant::now(), true).is_empty(),
            "a flush empties the buffers; nothing new, no result"
        );
        sinks.remove("sys");
        sinks.graphite("sys@web-1_example_com.cpu-0.cpu-idle 1 1");
        assert_eq!(sinks.counts().unknown_collector, 3);
    }

    #[test]
    fn flush_splits_at_max_metrics_and_bounds_the_names() {
        let sinks = Sinks::new("h");
        sinks.declare(&spec("p", CollectorKind::Program));
        let n = MAX_METRICS * 2 + 5;
        for i in 0..n {
            sinks.graphite(&format!("p@m{i:04} {i} 1"));
        }
        let rs = sinks.flush_due(Instant::now(), true);
        assert_eq!(
            rs.iter().map(|r| r.metrics.len()).collect::<Vec<_>>(),
            [MAX_METRICS, MAX_METRICS, 5]
        );
        assert_eq!(
            rs[0].output,
            format!("{n} metrics from the program (part 1 of 3)")
        );
        assert_eq!(
            rs[2].output,
            format!("{n} metrics from the program (part 3 of 3)")
        );
        let names: std::collections::BTreeSet<_> = rs
            .iter()
            .flat_map(|r| r.metrics.iter().map(|m| m.name.clone()))
            .collect();
        assert_eq!(names.len(), n, "every metric once");
        // Beyond MAX_SERIES names, new names are dropped and counted; known ones update.
        for i in 0..MAX_SERIES + 10 {
            sinks.graphite(&format!("p@m{i:05} 1 1"));
        }
        sinks.graphite("p@m00000 2 1");
        let rs = sinks.flush_due(Instant::now(), true);
        assert_eq!(rs.len(), MAX_SERIES / MAX_METRICS);
        assert!(rs.iter().all(|r| r.metrics.len() <= MAX_METRICS));
        assert_eq!(rs[0].metrics[0].value, 2.0);
        assert!(
            rs[0].long_output.contains("[10 values for names beyond"),
            "{}",
            rs[0].long_output
        );
        let long = format!("p@{} 1 1", "x".repeat(500));
        sinks.graphite(&long);
        let rs = sinks.flush_due(Instant::now(), true);
        assert_eq!(rs[0].metrics[0].name.len(), MAX_METRIC_NAME_BYTES);
    }

    #[test]
    fn flushes_come_when_the_interval_has_passed() {
        let sinks = Sinks::new("h");
        let mut s = spec("p", CollectorKind::Program);
        s.interval_secs = 10;
        sinks.declare(&s);
        sinks.graphite("p@a 1");
        let t = Instant::now();
        assert!(sinks.flush_due(t, false).is_empty());
        assert_eq!(sinks.flush_due(t + Duration::from_secs(11), false).len(), 1);
        sinks.graphite("p@a 2");
        assert!(sinks
            .flush_due(t + Duration::from_secs(12), false)
            .is_empty());
        assert_eq!(sinks.flush_due(t + Duration::from_secs(22), false).len(), 1);
    }

    #[test]
    fn fluentd_bodies_parse_as_arrays_or_lines() {
        let (r, skipped) = parse_records(br#"[{"a":1,"msg":"x"},{"a":2},3]"#).unwrap();
        assert_eq!((r.len(), skipped), (2, 1));
        let (r, skipped) = parse_records(b"{\"a\":1}\n\n{\"b\":2.5}\n").unwrap();
        assert_eq!((r.len(), skipped), (2, 0));
        assert_eq!(r[1]["b"], 2.5);
        assert!(parse_records(b"[{\"a\":1}").is_err());
        assert!(parse_records(b"{\"a\":1}\nnot json").is_err());
        assert!(parse_records(b"\xff\xfe").is_err());
        assert_eq!(parse_records(b"").unwrap().0.len(), 0);
    }

    #[test]
    fn fluentd_records_become_tag_field_metrics_and_a_count() {
        let sinks = Sinks::new("h");
        sinks.declare(&spec("logs", CollectorKind::Fluentd));
        let (a, _) =
            parse_records(br#"[{"latency":12.5,"code":200,"path":"/"},{"latency":7,"ok":true}]"#)
                .unwrap();
        assert!(sinks.records("logs", "app.access", &a));
        let (b, _) = parse_records(br#"[{"latency":3}]"#).unwrap();
        assert!(sinks.records("logs", "app.access", &b));
        assert!(sinks.records("logs", "", &b));
        assert!(!sinks.records("nobody", "t", &b));
        let rs = sinks.flush_due(Instant::now(), true);
        let m: BTreeMap<_, _> = rs[0]
            .metrics
            .iter()
            .map(|m| (m.name.as_str(), m.value))
            .collect();
        assert_eq!(
            m,
            BTreeMap::from([
                ("app.access.code", 200.0),
                ("app.access.latency", 3.0),
                ("app.access.records", 3.0),
                ("latency", 3.0),
                ("records", 1.0),
            ])
        );
        assert_eq!(rs[0].output, "5 metrics from fluentd");
    }
}
