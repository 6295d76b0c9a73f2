//! The collectors' data on its way to the outbox: parsing what the listeners receive
//! (Graphite plaintext lines, fluentd's JSON records), keeping the latest value of each
//! metric per collector, and turning them into results of `collector.NAME.metrics` once
//! an interval.
//!
//! Attribution and authentication: a Graphite path starts with `NAME@SECRET.` (collectd's
//! `Prefix`), where SECRET is the collector's [`Secret`]; fluentd posts to
//! `/collector/NAME/TAG` as the HTTP user NAME with the secret as its password (checked by
//! [`Sinks::authorized`]). Anything without the secret of a running collector is refused
//! and counted, never taken. Each collector keeps at most [`MAX_SERIES`] metric names
//! between two flushes; values for further names are dropped and counted in the next
//! result.

use outpost_sys::lock;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use outpost_protocol::{CheckResult, CollectorKind, CollectorSpec, Metric, Status, MAX_METRICS};

use super::secret::Secret;
use crate::checks::outcome::MAX_METRIC_NAME_BYTES;
use crate::util::{now_ms, truncate_utf8};

/// Most distinct metric names a collector holds between two flushes.
pub const MAX_SERIES: usize = 8 * MAX_METRICS;

/// One Graphite plaintext line: `path value [timestamp]`. The value may be `nan` or
/// infinite (collectd sends `nan` for a rate it cannot compute yet).
#[derive(Debug, Clone, PartialEq)]
pub struct GraphiteLine<'a> {
    pub path: &'a str,
    pub value: f64,
}

/// Parse one line (without its newline; a trailing `\r` is allowed); `None` when it is not
/// `path value [timestamp]`.
pub fn parse_graphite(line: &str) -> Option<GraphiteLine<'_>> {
    let mut parts = line.split_ascii_whitespace();
    let (path, value) = (parts.next()?, parts.next()?);
    if let Some(ts) = parts.next() {
        ts.parse::<f64>().ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    let value: f64 = value.parse().ok()?;
    Some(GraphiteLine { path, value })
}

/// What became of one Graphite line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// A value for a collector.
    Accepted,
    /// From a collector (the secret was right), but not a number: dropped.
    NotANumber,
    /// Not `path value [timestamp]`, or nothing after a collector's prefix: dropped.
    Malformed,
    /// Without the secret of a running collector: refused.
    Unauthenticated,
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

/// Counters of what the listeners received and could not take, and of the connections
/// they closed, for status, tests and the agent's log.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Values taken for a collector.
    pub accepted: u64,
    /// Lines or bodies that could not be read.
    pub malformed: u64,
    /// Values that were not numbers (collectd's `nan`).
    pub not_a_number: u64,
    /// Lines and requests without the secret of a running collector.
    pub unauthenticated: u64,
    /// Connections that had not yet proved a secret, closed to make room for a new one.
    pub evicted: u64,
    /// Connections closed because they stayed silent, or sent a line or request too slowly.
    pub timed_out: u64,
    /// Connections that proved a secret while the most such connections were open.
    pub over_capacity: u64,
}

/// Every running collector's buffered data and secret.
pub struct Sinks {
    host: String,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    sinks: HashMap<String, Sink>,
    /// Made by [`Sinks::secret`] (at rendering, before the collector is declared).
    secrets: HashMap<String, Secret>,
    counts: Counts,
}

impl Sinks {
    pub fn new(hostname: &str) -> Sinks {
        Sinks {
            host: graphite_escape(hostname),
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    /// The secret of the collector `name`, made the first time it is asked for and kept
    /// until [`Sinks::remove`].
    pub fn secret(&self, name: &str) -> Secret {
        self.lock()
            .secrets
            .entry(name.to_string())
            .or_insert_with(Secret::generate)
            .clone()
    }

    /// Whether `password` is the secret of `name`, a running collector.
    pub fn authorized(&self, name: &str, password: &[u8]) -> bool {
        let g = self.lock();
        g.sinks.contains_key(name) && g.secrets.get(name).is_some_and(|s| s.matches(password))
    }

    /// The longest interval of the running collectors (none: zero).
    pub fn longest_interval(&self) -> Duration {
        let g = self.lock();
        g.sinks
            .values()
            .map(|s| s.interval)
            .max()
            .unwrap_or_default()
    }

    /// Take data for `spec` (or update its interval); its buffered values are kept.
    pub fn declare(&self, spec: &CollectorSpec) {
        let interval = Duration::from_secs(spec.interval_secs.max(1));
        let mut g = self.lock();
        let g = &mut *g;
        g.secrets
            .entry(spec.name.clone())
            .or_insert_with(Secret::generate);
        let sink = g.sinks.entry(spec.name.clone()).or_insert_with(|| Sink {
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

    /// Stop taking data for `name`; what it had buffered is dropped, and so is its secret.
    pub fn remove(&self, name: &str) {
        let mut g = self.lock();
        g.sinks.remove(name);
        g.secrets.remove(name);
    }

    /// Every collector taking data.
    pub fn names(&self) -> Vec<String> {
        self.lock().sinks.keys().cloned().collect()
    }

    /// Count a line or body that could not be read at all.
    pub fn bad_line(&self) {
        self.count(|c| c.malformed += 1);
    }

    /// Change the counters.
    pub fn count(&self, change: impl FnOnce(&mut Counts)) {
        change(&mut self.lock().counts);
    }

    pub fn counts(&self) -> Counts {
        self.lock().counts
    }

    /// Take one Graphite line: its path must start with `NAME@SECRET.` of a running
    /// collector.
    pub fn graphite(&self, line: &str) -> Taken {
        let mut g = self.lock();
        let Inner {
            sinks,
            secrets,
            counts,
        } = &mut *g;
        let Some(parsed) = parse_graphite(line) else {
            counts.malformed += 1;
            return Taken::Malformed;
        };
        let proved = parsed.path.split_once('@').and_then(|(name, rest)| {
            let secret = secrets.get(name)?;
            let tail = rest.as_bytes();
            // The secret and the dot are ASCII: once they matched, what follows starts on a
            // character boundary.
            (secret.matches(tail.get(..Secret::LEN)?) && tail.get(Secret::LEN) == Some(&b'.'))
                .then(|| (name, &rest[Secret::LEN + 1..]))
        });
        let sink = proved.and_then(|(name, rest)| Some((sinks.get_mut(name)?, rest)));
        let Some((sink, rest)) = sink else {
            counts.unauthenticated += 1;
            return Taken::Unauthenticated;
        };
        if !parsed.value.is_finite() {
            counts.not_a_number += 1;
            return Taken::NotANumber;
        }
        if rest.is_empty() {
            counts.malformed += 1;
            return Taken::Malformed;
        }
        let metric = sink.metric_name(rest);
        sink.put(metric, parsed.value);
        counts.accepted += 1;
        Taken::Accepted
    }

    /// Take fluentd's records for `tag` (empty when the URL had none): each numeric field
    /// becomes `TAG.FIELD`, and `TAG.records` counts the records since the last flush.
    /// The caller has checked the sender with [`Sinks::authorized`]. Returns false when
    /// `name` is not (or no longer) a running collector.
    pub fn records(
        &self,
        name: &str,
        tag: &str,
        records: &[serde_json::Map<String, serde_json::Value>],
    ) -> bool {
        let mut g = self.lock();
        let Inner { sinks, counts, .. } = &mut *g;
        let Some(sink) = sinks.get_mut(name) else {
            counts.unauthenticated += 1;
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
        for sink in g.sinks.values_mut() {
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

    /// What `name`'s Graphite paths start with.
    fn prefix(sinks: &Sinks, name: &str) -> String {
        format!("{name}@{}.", sinks.secret(name).expose())
    }

    #[test]
    fn graphite_lines_parse_and_bad_ones_are_said_apart() {
        assert_eq!(
            parse_graphite("sys@h.cpu-0.cpu-idle 98.5 1700000000\r"),
            Some(GraphiteLine {
                path: "sys@h.cpu-0.cpu-idle",
                value: 98.5
            })
        );
        assert_eq!(parse_graphite("a 1").unwrap().value, 1.0);
        assert_eq!(parse_graphite("a -2e3 17.5").unwrap().value, -2000.0);
        assert!(parse_graphite("a nan 1700000000").unwrap().value.is_nan());
        assert_eq!(parse_graphite("a inf 1").unwrap().value, f64::INFINITY);
        for bad in ["", "a", "a b 1", "a 1 x", "a 1 2 3", "   "] {
            assert_eq!(parse_graphite(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn graphite_data_goes_to_its_collector_by_prefix_and_secret() {
        let sinks = Sinks::new("web-1.example.com");
        sinks.declare(&spec("sys", CollectorKind::Collectd));
        sinks.declare(&spec("sys.b", CollectorKind::Collectd));
        sinks.declare(&spec("prog", CollectorKind::Program));
        let (sys, sys_b, prog) = (
            prefix(&sinks, "sys"),
            prefix(&sinks, "sys.b"),
            prefix(&sinks, "prog"),
        );
        assert_ne!(sys, sys_b, "one secret per collector");
        let zeros = "0".repeat(Secret::LEN);
        for (line, taken) in [
            (
                format!("{sys}web-1_example_com.cpu-0.cpu-idle 98 1700000000"),
                Taken::Accepted,
            ),
            (
                format!("{sys}web-1_example_com.cpu-0.cpu-idle 97 1700000001"),
                Taken::Accepted,
            ),
            (
                format!("{sys}other_host.snmp.if_octets-rx 5 1700000001"),
                Taken::Accepted,
            ),
            (
                format!("{sys_b}web-1_example_com.memory.memory-used 1024 1700000000"),
                Taken::Accepted,
            ),
            (format!("{prog}queue.depth 3"), Taken::Accepted),
            (
                format!("{sys}web-1_example_com.load.load.shortterm nan 1"),
                Taken::NotANumber,
            ),
            (format!("{sys} 1 1"), Taken::Malformed),
            ("garbage".into(), Taken::Malformed),
            // Without the secret: the name alone, a wrong secret, another collector's
            // secret, a secret cut short or run on, no dot after it, no collector.
            (
                "sys@web-1_example_com.cpu-0.cpu-idle 1 1".into(),
                Taken::Unauthenticated,
            ),
            (
                format!("sys@{zeros}.web-1_example_com.x 1 1"),
                Taken::Unauthenticated,
            ),
            (format!("sys{}x 1 1", &prog[4..]), Taken::Unauthenticated),
            (
                format!("{}.x 1 1", &sys[..sys.len() - 2]),
                Taken::Unauthenticated,
            ),
            (
                format!("{}0.x 1 1", &sys[..sys.len() - 1]),
                Taken::Unauthenticated,
            ),
            (
                format!("{}x 1 1", &sys[..sys.len() - 1]),
                Taken::Unauthenticated,
            ),
            ("nobody@x.y 1 1".into(), Taken::Unauthenticated),
            ("noprefix 1 1".into(), Taken::Unauthenticated),
            (
                format!("{sys}x nan 1").replace("sys@", "nobody@"),
                Taken::Unauthenticated,
            ),
        ] {
            assert_eq!(sinks.graphite(&line), taken, "{line}");
        }
        assert_eq!(
            sinks.counts(),
            Counts {
                accepted: 5,
                malformed: 2,
                not_a_number: 1,
                unauthenticated: 9,
                ..Counts::default()
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
        assert!(sinks.authorized("sys", sinks.secret("sys").expose().as_bytes()));
        assert!(!sinks.authorized("sys", sinks.secret("prog").expose().as_bytes()));
        sinks.remove("sys");
        assert_eq!(
            sinks.graphite(&format!("{sys}web-1_example_com.cpu-0.cpu-idle 1 1")),
            Taken::Unauthenticated,
            "a removed collector's secret opens nothing"
        );
        assert!(!sinks.authorized("sys", &sys.as_bytes()[4..4 + Secret::LEN]));
        assert_ne!(prefix(&sinks, "sys"), sys, "declared again, a new secret");
    }

    #[test]
    fn flush_splits_at_max_metrics_and_bounds_the_names() {
        let sinks = Sinks::new("h");
        sinks.declare(&spec("p", CollectorKind::Program));
        let p = prefix(&sinks, "p");
        let n = MAX_METRICS * 2 + 5;
        for i in 0..n {
            sinks.graphite(&format!("{p}m{i:04} {i} 1"));
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
            sinks.graphite(&format!("{p}m{i:05} 1 1"));
        }
        sinks.graphite(&format!("{p}m00000 2 1"));
        let rs = sinks.flush_due(Instant::now(), true);
        assert_eq!(rs.len(), MAX_SERIES / MAX_METRICS);
        assert!(rs.iter().all(|r| r.metrics.len() <= MAX_METRICS));
        assert_eq!(rs[0].metrics[0].value, 2.0);
        assert!(
            rs[0].long_output.contains("[10 values for names beyond"),
            "{}",
            rs[0].long_output
        );
        let long = format!("{p}{} 1 1", "x".repeat(500));
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
        let p = prefix(&sinks, "p");
        sinks.graphite(&format!("{p}a 1"));
        let t = Instant::now();
        assert!(sinks.flush_due(t, false).is_empty());
        assert_eq!(sinks.flush_due(t + Duration::from_secs(11), false).len(), 1);
        sinks.graphite(&format!("{p}a 2"));
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
