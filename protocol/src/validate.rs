//! The bounds of a result, checked in one place: the gateway refuses a result that breaks
//! any of them (close 1007), and the agent cuts what it sends to fit them
//! (`Outcome::into_result`), so a result it makes is never refused.

use crate::frame::{CheckResult, Results};
use crate::limits::*;
use crate::names::valid_check_name;

impl CheckResult {
    /// Every documented bound this result breaks, each said in a few words; empty when it
    /// keeps them all.
    pub fn problems(&self) -> Vec<String> {
        let mut out = self.content_problems();
        if !(1..=MAX_SEQ).contains(&self.seq) {
            out.push(format!("seq {} is outside 1..={MAX_SEQ}", self.seq));
        }
        out
    }

    /// [`CheckResult::problems`] but for `seq`: the bounds of a result in a run-now reply,
    /// whose `seq` only says where the same result is queued (0 when the agent could not
    /// queue it).
    pub fn content_problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut over = |what: &str, len: usize, max: usize, unit: &str| {
            if len > max {
                out.push(format!("{what} has {len} {unit}, at most {max}"));
            }
        };
        over("output", self.output.len(), MAX_OUTPUT_BYTES, "bytes");
        over(
            "long_output",
            self.long_output.len(),
            MAX_LONG_OUTPUT_BYTES,
            "bytes",
        );
        over("metrics", self.metrics.len(), MAX_METRICS, "entries");
        over("faults", self.faults.len(), MAX_FAULTS, "entries");
        for m in &self.metrics {
            over(
                "a metric name",
                m.name.len(),
                MAX_METRIC_NAME_BYTES,
                "bytes",
            );
            for (what, field) in [("unit", &m.unit), ("warn", &m.warn), ("crit", &m.crit)] {
                let len = field.as_ref().map_or(0, String::len);
                over(
                    &format!("a metric's {what}"),
                    len,
                    MAX_METRIC_FIELD_BYTES,
                    "bytes",
                );
            }
        }
        for f in &self.faults {
            over("a fault name", f.name.len(), MAX_FAULT_NAME_BYTES, "bytes");
            over(
                "a fault output",
                f.output.len(),
                MAX_FAULT_OUTPUT_BYTES,
                "bytes",
            );
        }
        if !valid_check_name(&self.check) {
            out.push(format!(
                "check name {:?} is not 1 to 64 of A-Z a-z 0-9 _ . -",
                self.check
            ));
        }
        if let Some(e) = self.entity.as_deref().filter(|e| !valid_check_name(e)) {
            out.push(format!(
                "entity name {e:?} is not 1 to 64 of A-Z a-z 0-9 _ . -"
            ));
        }
        if self.attempt == 0 || self.max_attempts == 0 {
            out.push("attempt and max_attempts start at 1".into());
        }
        out
    }
}

impl Results {
    /// What is wrong with this batch (its size, its order, or its first bad result), or
    /// `None` when the gateway may take it.
    pub fn problem(&self) -> Option<String> {
        if self.results.is_empty() || self.results.len() > MAX_BATCH_RESULTS {
            return Some(format!(
                "a results batch holds 1 to {MAX_BATCH_RESULTS} results, not {}",
                self.results.len()
            ));
        }
        let mut prev = 0;
        for r in &self.results {
            if r.seq <= prev {
                return Some(format!(
                    "sequence numbers must increase within a batch ({} after {prev})",
                    r.seq
                ));
            }
            prev = r.seq;
            let problems = r.problems();
            if !problems.is_empty() {
                return Some(format!(
                    "result seq {} of {:?}: {}",
                    r.seq,
                    r.check,
                    problems.join("; ")
                ));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::{Fault, Metric, Status};

    fn result() -> CheckResult {
        CheckResult {
            seq: 1,
            ..CheckResult::new("disk", Status::Ok, "fine")
        }
    }

    #[test]
    fn a_result_at_every_bound_passes_and_one_past_any_is_named() {
        let mut r = result();
        r.output = "x".repeat(MAX_OUTPUT_BYTES);
        r.long_output = "x".repeat(MAX_LONG_OUTPUT_BYTES);
        r.metrics = vec![
            Metric {
                unit: Some("u".repeat(MAX_METRIC_FIELD_BYTES)),
                ..Metric::new("m".repeat(MAX_METRIC_NAME_BYTES), 1.0)
            };
            MAX_METRICS
        ];
        r.faults = vec![
            Fault {
                name: "f".repeat(MAX_FAULT_NAME_BYTES),
                status: Status::Critical,
                output: "o".repeat(MAX_FAULT_OUTPUT_BYTES),
            };
            MAX_FAULTS
        ];
        r.seq = MAX_SEQ;
        assert_eq!(r.problems(), Vec::<String>::new());

        type Break = fn(&mut CheckResult);
        let past: [(&str, Break); 10] = [
            ("output", |r| r.output.push('x')),
            ("long_output", |r| r.long_output.push('x')),
            ("metrics", |r| r.metrics.push(Metric::new("m", 1.0))),
            ("faults", |r| r.faults.push(r.faults[0].clone())),
            ("a metric name", |r| r.metrics[0].name.push('m')),
            ("a metric's unit", |r| {
                r.metrics[0].unit.as_mut().unwrap().push('u')
            }),
            ("a fault output", |r| r.faults[0].output.push('o')),
            ("seq", |r| r.seq = MAX_SEQ + 1),
            ("check name", |r| r.check = "a/b".into()),
            ("entity name", |r| r.entity = Some("..".into())),
        ];
        for (what, break_it) in past {
            let mut bad = r.clone();
            break_it(&mut bad);
            let problems = bad.problems();
            assert_eq!(problems.len(), 1, "{what}: {problems:?}");
            assert!(problems[0].starts_with(what), "{what}: {problems:?}");
        }
    }

    #[test]
    fn a_batch_names_its_first_bad_result() {
        let mut second = result();
        second.seq = 2;
        second.faults = vec![
            Fault {
                name: "f".into(),
                status: Status::Critical,
                output: String::new(),
            };
            70
        ];
        let batch = Results {
            results: vec![result(), second],
        };
        let why = batch.problem().unwrap();
        assert!(
            why.contains("seq 2") && why.contains("faults has 70"),
            "{why}"
        );
        let empty = Results { results: vec![] };
        assert!(empty.problem().unwrap().contains("1 to 256"));
        let backwards = Results {
            results: vec![result(), result()],
        };
        assert!(backwards.problem().unwrap().contains("must increase"));
    }
}
