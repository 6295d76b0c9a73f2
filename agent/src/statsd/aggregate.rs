//! StatsD lines in, aggregates out: the parser and the per-interval aggregation, pure (the
//! listeners and the flush to the outbox are in [`super`]).
//!
//! A line is `name:value|type[|@rate][|#tag:value,tag]` (DogStatsD's tags), several per
//! packet separated by newlines; `name:v1:v2|type` carries several values. Types:
//!
//! | type | aggregate at each flush |
//! |------|-------------------------|
//! | `c` counter | `name` the sum of value / rate over the interval (a count), `name.rate` per second |
//! | `g` gauge | `name` the last value; `+N` / `-N` add to it; kept across flushes like StatsD's |
//! | `ms` timer, `h` histogram, `d` distribution | `name.count` (each value counted 1 / rate), `name.min`, `.max`, `.mean`, `.sum`, `.median` and `name.pNN` for each configured percentile |
//! | `s` set | `name.count`, the distinct values seen in the interval |
//!
//! Tags become part of the name in Graphite's tagged form, `name;tag=value;…` (sorted,
//! a tag without a value as `tag=`), so two tag sets are two series. At most `max_names`
//! series between two flushes: values for further names are dropped and counted.

use std::collections::{BTreeMap, HashSet};

/// One parsed line (one value of it).
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    /// The series: the name, then `;tag=value` for each tag, sorted.
    pub key: String,
    pub value: Value,
    /// The sample rate (`@0.1`: one in ten sent), 1 when absent.
    pub rate: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Counter(f64),
    /// `delta`: `+N` or `-N`, added to the gauge.
    Gauge {
        value: f64,
        delta: bool,
    },
    /// Timers, histograms and distributions alike.
    Timer(f64),
    Set(String),
}

/// Why a line was not taken.
pub type Refusal = String;

/// Longest series key (name and tags) taken: the flushed names add a suffix (`.median`,
/// `.p99_9`, …) and must stay within what a result carries, so none is ever cut.
pub const MAX_KEY_BYTES: usize = 100;

/// Characters a name may not hold besides those that delimit a line.
fn valid_name(name: &str) -> bool {
    !name.is_empty() && !name.contains([';', ' ', '\t'])
}

/// Parse one line; each of its values is one [`Line`].
pub fn parse(line: &str) -> Result<Vec<Line>, Refusal> {
    let line = line.trim_end_matches('\r');
    let (name, rest) = line
        .split_once(':')
        .ok_or_else(|| format!("no ':' in {line:?}"))?;
    if !valid_name(name) {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut fields = rest.split('|');
    let values = fields.next().unwrap_or_default();
    let kind = fields
        .next()
        .ok_or_else(|| format!("no type in {line:?}"))?;
    let mut rate = 1.0;
    let mut tags: Vec<String> = Vec::new();
    for f in fields {
        if let Some(r) = f.strip_prefix('@') {
            rate = r
                .parse::<f64>()
                .ok()
                .filter(|r| *r >= 1e-6 && *r <= 1.0)
                .ok_or_else(|| format!("bad sample rate {f:?}"))?;
        } else if let Some(t) = f.strip_prefix('#') {
            for tag in t.split(',').filter(|t| !t.is_empty()) {
                let (k, v) = tag.split_once(':').unwrap_or((tag, ""));
                if k.is_empty() || k.contains(['=', ';']) || v.contains(';') {
                    return Err(format!("bad tag {tag:?}"));
                }
                tags.push(format!("{k}={v}"));
            }
        }
        // (Other fields, such as DogStatsD's `c:` container id or `T` timestamp, are
        // ignored.)
    }
    tags.sort();
    tags.dedup();
    let mut key = name.to_string();
    for t in &tags {
        key.push(';');
        key.push_str(t);
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(format!("name and tags over {MAX_KEY_BYTES} bytes"));
    }
    let mut out = Vec::new();
    for v in values.split(':') {
        let number = || {
            v.parse::<f64>()
                .ok()
                .filter(|x| x.is_finite())
                .ok_or_else(|| format!("bad value {v:?} in {line:?}"))
        };
        let value = match kind {
            "c" => Value::Counter(number()?),
            "g" => Value::Gauge {
                value: number()?,
                delta: v.starts_with(['+', '-']),
            },
            "ms" | "h" | "d" => Value::Timer(number()?),
            "s" => Value::Set(v.to_string()),
            other => return Err(format!("unknown type {other:?} in {line:?}")),
        };
        out.push(Line {
            key: key.clone(),
            value,
            rate,
        });
    }
    Ok(out)
}

/// What one series holds between two flushes.
#[derive(Debug, Clone)]
enum Agg {
    Counter(f64),
    Gauge(f64),
    /// Values (bounded) and the count they stand for (each value counts 1 / rate).
    Timer {
        values: Vec<f64>,
        count: f64,
    },
    /// Members by hash (their text is not kept).
    Set(HashSet<u64>),
}

/// Most values all timers and sets together keep between two flushes (a timer's count
/// goes on past it; its other aggregates are of the values kept): about 8 MB.
pub const MAX_VALUES: usize = 1_000_000;
/// Intervals a gauge is kept without an update before it is forgotten (its name freed).
pub const GAUGE_INTERVALS: u32 = 10;

/// The interval's aggregates.
#[derive(Debug)]
pub struct Aggregator {
    series: BTreeMap<String, Agg>,
    max_names: usize,
    percentiles: Vec<f64>,
    /// Timer values and set members held now (bounded by [`MAX_VALUES`]).
    values: usize,
    /// Gauges' intervals without an update.
    idle: BTreeMap<String, u32>,
    /// Lines refused and values dropped (over `max_names` or [`MAX_VALUES`]) since the
    /// last flush; [`Aggregator::flush`] adds the aggregates that were not finite (the
    /// listeners, which end an interval and make its metrics apart, count those from
    /// [`Interval::metrics`]).
    pub refused: u64,
    pub dropped: u64,
    pub lines: u64,
}

impl Aggregator {
    pub fn new(max_names: usize, percentiles: &[f64]) -> Aggregator {
        Aggregator {
            series: BTreeMap::new(),
            max_names,
            percentiles: percentiles.to_vec(),
            values: 0,
            idle: BTreeMap::new(),
            refused: 0,
            dropped: 0,
            lines: 0,
        }
    }

    /// Take every line of a packet (or of a TCP stream's line).
    pub fn take(&mut self, packet: &str) {
        for line in packet.split('\n').filter(|l| !l.trim().is_empty()) {
            self.lines += 1;
            match parse(line) {
                Ok(values) => values.into_iter().for_each(|l| self.add(l)),
                Err(why) => {
                    self.refused += 1;
                    tracing::debug!(%why, "statsd line refused");
                }
            }
        }
    }

    fn add(&mut self, line: Line) {
        let known = self.series.contains_key(&line.key);
        if !known && self.series.len() >= self.max_names {
            self.dropped += 1;
            return;
        }
        if matches!(line.value, Value::Gauge { .. }) {
            self.idle.insert(line.key.clone(), 0);
        }
        let entry = self.series.entry(line.key);
        match line.value {
            Value::Counter(v) => {
                if let Agg::Counter(sum) = entry.or_insert(Agg::Counter(0.0)) {
                    *sum += v / line.rate;
                }
            }
            Value::Gauge { value, delta } => {
                let g = entry.or_insert(Agg::Gauge(0.0));
                if let Agg::Gauge(g) = g {
                    *g = if delta { *g + value } else { value };
                }
            }
            Value::Timer(v) => {
                let t = entry.or_insert(Agg::Timer {
                    values: Vec::new(),
                    count: 0.0,
                });
                if let Agg::Timer { values, count } = t {
                    if self.values < MAX_VALUES {
                        values.push(v);
                        self.values += 1;
                    } else {
                        self.dropped += 1;
                    }
                    *count += 1.0 / line.rate;
                }
            }
            Value::Set(member) => {
                let s = entry.or_insert_with(|| Agg::Set(HashSet::new()));
                if let Agg::Set(s) = s {
                    use std::hash::{Hash, Hasher};
                    let mut h = std::hash::DefaultHasher::new();
                    member.hash(&mut h);
                    let hash = h.finish();
                    if !s.contains(&hash) {
                        if self.values < MAX_VALUES {
                            s.insert(hash);
                            self.values += 1;
                        } else {
                            self.dropped += 1;
                        }
                    }
                }
            }
        }
    }

    /// The interval's metrics as (name, value), and reset for the next one: counters,
    /// timers and sets start again; gauges keep their value (as StatsD's do).
    pub fn flush(&mut self, interval_secs: f64) -> Vec<(String, f64)> {
        let (out, not_finite) = self.end_interval().metrics(interval_secs);
        self.refused += not_finite;
        out
    }

    /// End the interval: its series are taken out and the aggregator starts the next one,
    /// keeping the gauges. Cheap (no sorting, no formatting: the gauges are copied), so a
    /// listener sharing the aggregator under a lock is not held up by a flush; the
    /// interval's metrics are made from what this returns ([`Interval::metrics`]).
    pub fn end_interval(&mut self) -> Interval {
        let series = std::mem::take(&mut self.series);
        // Gauges are kept for the next interval, unless unchanged for long (or no longer
        // a number): then forgotten, their name freed.
        self.idle.retain(|key, idle| {
            *idle += 1;
            match series.get(key) {
                Some(Agg::Gauge(v)) if *idle < GAUGE_INTERVALS && v.is_finite() => {
                    self.series.insert(key.clone(), Agg::Gauge(*v));
                    true
                }
                _ => false,
            }
        });
        self.values = 0;
        Interval {
            series,
            percentiles: self.percentiles.clone(),
        }
    }
}

/// One interval's series, taken out of the [`Aggregator`] by [`Aggregator::end_interval`].
#[derive(Debug)]
pub struct Interval {
    series: BTreeMap<String, Agg>,
    percentiles: Vec<f64>,
}

impl Interval {
    /// The interval's metrics as (name, value), and how many aggregates were left out as
    /// not finite (an overflow to infinity: JSON has no infinity).
    pub fn metrics(self, interval_secs: f64) -> (Vec<(String, f64)>, u64) {
        let mut out = Vec::new();
        for (key, agg) in self.series {
            // `name;tags` → `name.suffix;tags`
            let named = |suffix: &str| match key.split_once(';') {
                Some((n, tags)) => format!("{n}.{suffix};{tags}"),
                None => format!("{key}.{suffix}"),
            };
            match agg {
                Agg::Counter(sum) => {
                    out.push((named("rate"), sum / interval_secs.max(f64::MIN_POSITIVE)));
                    out.push((key, sum));
                }
                Agg::Gauge(v) => out.push((key, v)),
                Agg::Timer { mut values, count } => {
                    values.sort_by(f64::total_cmp);
                    let n = values.len();
                    let sum: f64 = values.iter().sum();
                    out.push((named("count"), count));
                    if n > 0 {
                        out.push((named("min"), values[0]));
                        out.push((named("max"), values[n - 1]));
                        out.push((named("mean"), sum / n as f64));
                        out.push((named("sum"), sum));
                        out.push((named("median"), percentile(&values, 50.0)));
                        for p in &self.percentiles {
                            out.push((
                                named(&format!("p{}", fmt_pct(*p))),
                                percentile(&values, *p),
                            ));
                        }
                    }
                }
                Agg::Set(members) => out.push((named("count"), members.len() as f64)),
            }
        }
        let before = out.len();
        out.retain(|(_, v)| v.is_finite());
        let not_finite = (before - out.len()) as u64;
        (out, not_finite)
    }
}

/// The `p`th percentile of sorted `values` (nearest rank, as StatsD's `upper_NN` does).
fn percentile(values: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * values.len() as f64).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}

/// `99.9` → `99_9`, `90` → `90`: a percentile as a name part.
fn fmt_pct(p: f64) -> String {
    format!("{p}").replace('.', "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flushed(a: &mut Aggregator) -> BTreeMap<String, f64> {
        a.flush(10.0).into_iter().collect()
    }

    #[test]
    fn each_type_parses_with_rates_deltas_and_tags() {
        assert_eq!(
            parse("req:3|c|@0.5|#env:prod,az").unwrap(),
            [Line {
                key: "req;az=;env=prod".into(),
                value: Value::Counter(3.0),
                rate: 0.5
            }]
        );
        assert_eq!(
            parse("temp:-2|g").unwrap()[0].value,
            Value::Gauge {
                value: -2.0,
                delta: true
            }
        );
        assert_eq!(parse("t:1:2:3|ms").unwrap().len(), 3);
        assert_eq!(
            parse("u:alice|s").unwrap()[0].value,
            Value::Set("alice".into())
        );
        for (bad, says) in [
            ("nocolon", "no ':'"),
            ("x:1", "no type"),
            ("x:1|q", "unknown type"),
            ("x:abc|c", "bad value"),
            ("x:1|c|@0", "sample rate"),
            ("x:1|c|@2", "sample rate"),
            ("x:nan|g", "bad value"),
            (":1|c", "bad metric name"),
            ("a;b:1|c", "bad metric name"),
            ("x:1|c|#a=b", "bad tag"),
        ] {
            let err = parse(bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn an_interval_gives_the_exact_aggregates() {
        let mut a = Aggregator::new(100, &[90.0, 99.9]);
        a.take("hits:1|c\nhits:2|c|@0.5\nhits:1|c|#env:prod\n");
        a.take("level:10|g\nlevel:+5|g\nlevel:-3|g\n");
        a.take("lat:10|ms\nlat:20|ms\nlat:30|ms|@0.5\nlat:40|h\n");
        a.take("users:alice|s\nusers:bob|s\nusers:alice|s\n");
        a.take("garbage\nalso:bad|zz\n");
        let m = flushed(&mut a);
        assert_eq!(m["hits"], 5.0, "1 + 2/0.5");
        assert_eq!(m["hits.rate"], 0.5);
        assert_eq!(m["hits;env=prod"], 1.0);
        assert_eq!(m["level"], 12.0);
        assert_eq!(m["lat.count"], 5.0, "three at rate 1, one at 0.5");
        assert_eq!(
            (m["lat.min"], m["lat.max"], m["lat.sum"]),
            (10.0, 40.0, 100.0)
        );
        assert_eq!(m["lat.mean"], 25.0);
        assert_eq!(m["lat.median"], 20.0);
        assert_eq!(m["lat.p90"], 40.0);
        assert_eq!(m["lat.p99_9"], 40.0);
        assert_eq!(m["users.count"], 2.0);
        assert_eq!((a.refused, a.lines), (2, 15));
        // Next interval: gauges stay, the rest start again.
        a.take("hits:1|c\n");
        let m = flushed(&mut a);
        assert_eq!(m["level"], 12.0);
        assert_eq!(m["hits"], 1.0);
        assert!(!m.contains_key("lat.count"));
    }

    #[test]
    fn overflow_and_long_names_are_refused_not_cut_and_gauges_expire() {
        let mut a = Aggregator::new(100, &[]);
        a.take("big:1e308|c\nbig:1e308|c\n");
        a.take(&format!("{}:1|c", "n".repeat(MAX_KEY_BYTES + 1)));
        a.take("x:1|c|@1e-320\n");
        let m = flushed(&mut a);
        assert!(
            !m.contains_key("big") && !m.contains_key("big.rate"),
            "{m:?}"
        );
        assert_eq!(
            a.refused, 4,
            "two sums at infinity, a long name, a tiny rate"
        );
        a.take("g:1|g");
        for i in 0..GAUGE_INTERVALS {
            let m = flushed(&mut a);
            assert!(m.contains_key("g"), "kept while updated recently: {i}");
        }
        assert!(
            !flushed(&mut a).contains_key("g"),
            "forgotten after {GAUGE_INTERVALS} idle intervals"
        );
    }

    #[test]
    fn timers_and_sets_share_one_budget_of_values() {
        let mut a = Aggregator::new(10, &[]);
        let line = format!("t:1{}|ms", ":1".repeat(1000));
        for _ in 0..(MAX_VALUES / 1001 + 10) {
            a.take(&line);
        }
        assert!(a.values <= MAX_VALUES);
        assert!(a.dropped > 0);
        let m = flushed(&mut a);
        assert_eq!(
            m["t.count"],
            ((MAX_VALUES / 1001 + 10) * 1001) as f64,
            "the count goes on"
        );
    }

    #[test]
    fn a_flood_of_names_stays_within_the_cap_and_is_counted() {
        let mut a = Aggregator::new(50, &[]);
        for i in 0..1000 {
            a.take(&format!("n{i}:1|c"));
        }
        a.take("n0:1|c");
        assert_eq!(a.dropped, 950);
        let m = flushed(&mut a);
        assert_eq!(m.len(), 100, "50 counters, each with its rate");
        assert_eq!(m["n0"], 2.0, "a known name still counts");
    }
}
