//! What one run of any kind of check found, before it becomes a [`CheckResult`].

// The bounds are the protocol's (`outpost_protocol::limits`), which the gateway enforces:
// a result cut to them is never refused.
use outpost_protocol::{
    CheckResult, CheckSpec, Fault, Metric, Origin, StateType, Status, MAX_LONG_OUTPUT_BYTES,
    MAX_METRICS, MAX_OUTPUT_BYTES,
};
pub use outpost_protocol::{
    MAX_FAULTS, MAX_FAULT_NAME_BYTES, MAX_FAULT_OUTPUT_BYTES, MAX_METRIC_FIELD_BYTES,
    MAX_METRIC_NAME_BYTES,
};

use crate::util::truncate_utf8;

/// A check's findings: every kind of check produces one, and [`Outcome::into_result`]
/// applies the protocol's size limits in one place.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub status: Status,
    /// One line saying what was found.
    pub output: String,
    /// Details, one per line.
    pub long_output: String,
    pub metrics: Vec<Metric>,
    pub faults: Vec<Fault>,
    /// The plugin's exit code, for checks that run a program.
    pub exit_code: Option<i32>,
    /// The agent's remarks on how the findings were read (output cut, perfdata ignored):
    /// they end the long output and survive when it has to be cut.
    pub remarks: Vec<String>,
}

impl Outcome {
    pub fn new(status: Status, output: impl Into<String>) -> Outcome {
        Outcome {
            status,
            output: output.into(),
            long_output: String::new(),
            metrics: Vec::new(),
            faults: Vec::new(),
            exit_code: None,
            remarks: Vec::new(),
        }
    }

    /// A check that could not do its job says why, as UNKNOWN.
    pub fn unknown(why: impl Into<String>) -> Outcome {
        Outcome::new(Status::Unknown, why)
    }

    pub fn critical(why: impl Into<String>) -> Outcome {
        Outcome::new(Status::Critical, why)
    }

    pub fn with_metric(mut self, name: &str, value: f64, unit: Option<&str>) -> Outcome {
        self.metrics.push(Metric {
            name: name.into(),
            value,
            unit: unit.map(str::to_string),
            warn: None,
            crit: None,
            min: None,
            max: None,
        });
        self
    }

    /// Raise the status to at least `status` (WARNING < CRITICAL; UNKNOWN ranks between
    /// WARNING and CRITICAL, as Nagios orders them for "worst of").
    pub fn escalate(&mut self, status: Status) {
        if severity(status) > severity(self.status) {
            self.status = status;
        }
    }

    /// Add a remark of the agent's about how the findings were read; unlike details,
    /// remarks are never cut off by the long output's size limit.
    pub fn remark(&mut self, line: impl Into<String>) {
        self.remarks.push(line.into());
    }

    /// Add a line of detail.
    pub fn note(&mut self, line: impl AsRef<str>) {
        if !self.long_output.is_empty() {
            self.long_output.push('\n');
        }
        self.long_output.push_str(line.as_ref());
    }

    /// The result for `spec`, cut to the protocol's limits (and saying so). Sequence
    /// number and state type are filled in later, by the outbox and the state tracker.
    pub fn into_result(
        mut self,
        spec: &CheckSpec,
        origin: Origin,
        started_at_ms: u64,
        duration_ms: u64,
    ) -> CheckResult {
        if self.metrics.len() > MAX_METRICS {
            let dropped = self.metrics.len() - MAX_METRICS;
            self.metrics.truncate(MAX_METRICS);
            self.remark(format!("[{dropped} metrics beyond {MAX_METRICS} dropped]"));
        }
        if self.faults.len() > MAX_FAULTS {
            let dropped = self.faults.len() - MAX_FAULTS;
            self.faults.truncate(MAX_FAULTS);
            self.remark(format!("[{dropped} faults beyond {MAX_FAULTS} dropped]"));
        }
        for f in &mut self.faults {
            truncate_utf8(&mut f.name, MAX_FAULT_NAME_BYTES);
            truncate_utf8(&mut f.output, MAX_FAULT_OUTPUT_BYTES);
        }
        // Every string a plugin can fill is bounded, so one result always fits in a frame
        // (even with JSON escaping at its worst): see `result_fits_a_frame_at_worst`.
        for m in &mut self.metrics {
            truncate_utf8(&mut m.name, MAX_METRIC_NAME_BYTES);
            for s in [&mut m.unit, &mut m.warn, &mut m.crit]
                .into_iter()
                .flatten()
            {
                truncate_utf8(s, MAX_METRIC_FIELD_BYTES);
            }
        }
        if let Some(first) = self.output.lines().next() {
            if first.len() != self.output.len() {
                // Only the first line is the output; the rest is detail.
                let rest = self.output[first.len()..].trim().to_string();
                self.output.truncate(first.len());
                self.long_output = format!("{rest}\n{}", self.long_output)
                    .trim_end()
                    .to_string();
            }
        }
        truncate_utf8(&mut self.output, MAX_OUTPUT_BYTES);
        let mut remarks = self.remarks.join("\n");
        truncate_utf8(&mut remarks, MAX_LONG_OUTPUT_BYTES / 4);
        let budget = MAX_LONG_OUTPUT_BYTES - remarks.len() - 32;
        if truncate_utf8(&mut self.long_output, budget) {
            self.long_output.push_str("\n[long output truncated]");
        }
        if !remarks.is_empty() {
            if !self.long_output.is_empty() {
                self.long_output.push('\n');
            }
            self.long_output.push_str(&remarks);
        }
        CheckResult {
            seq: 0,
            check: spec.name.clone(),
            status: self.status,
            output: self.output,
            long_output: self.long_output,
            metrics: self.metrics,
            started_at_ms,
            duration_ms,
            exit_code: self.exit_code,
            origin,
            state_type: StateType::Hard,
            attempt: 1,
            max_attempts: spec.max_attempts.max(1),
            faults: self.faults,
            entity: spec.entity.clone(),
        }
    }
}

/// Rank for "worst of": OK < WARNING < UNKNOWN < CRITICAL.
pub fn severity(s: Status) -> u8 {
    match s {
        Status::Ok => 0,
        Status::Warning => 1,
        Status::Unknown => 2,
        Status::Critical => 3,
    }
}

/// The status a value earns against upper thresholds.
pub fn above(value: f64, warn: Option<f64>, crit: Option<f64>) -> Status {
    if crit.is_some_and(|c| value > c) {
        Status::Critical
    } else if warn.is_some_and(|w| value > w) {
        Status::Warning
    } else {
        Status::Ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_applied_and_said() {
        let spec = CheckSpec::new(
            "x",
            outpost_protocol::probe::Probe::Cpu(Default::default()),
            60,
            10,
        );
        let mut o = Outcome::new(Status::Ok, "first\nsecond");
        o.metrics = (0..MAX_METRICS + 3)
            .map(|i| Metric::new(format!("m{i}"), i as f64))
            .collect();
        o.output.push_str(&"y".repeat(MAX_OUTPUT_BYTES));
        o.note("z".repeat(MAX_LONG_OUTPUT_BYTES * 2));
        o.remark("[output truncated at 65536 bytes]");
        let r = o.into_result(&spec, Origin::Schedule, 1, 2);
        assert_eq!(r.output, "first");
        assert!(r.long_output.starts_with("second"), "{}", r.long_output);
        assert!(r.long_output.len() <= MAX_LONG_OUTPUT_BYTES);
        assert!(r.long_output.contains("[long output truncated]"));
        // The agent's remarks survive the cut.
        assert!(
            r.long_output
                .ends_with("[output truncated at 65536 bytes]\n[3 metrics beyond 256 dropped]"),
            "{}",
            &r.long_output[r.long_output.len() - 200..]
        );
        assert_eq!(r.metrics.len(), MAX_METRICS);
    }

    #[test]
    fn result_fits_a_frame_at_worst() {
        use outpost_protocol::{encode, AgentFrame, Fault, Results, MAX_FRAME_BYTES};
        let spec = CheckSpec::new(
            "x",
            outpost_protocol::probe::Probe::Cpu(Default::default()),
            60,
            10,
        );
        // Control characters take six bytes each once JSON-escaped.
        let nul = |n: usize| "\u{1}".repeat(n);
        let mut o = Outcome::new(Status::Ok, nul(1 << 20));
        o.long_output = nul(1 << 20);
        o.remark(nul(1 << 20));
        o.metrics = (0..MAX_METRICS * 2)
            .map(|_| Metric {
                name: nul(1 << 16),
                value: f64::MAX,
                unit: Some(nul(1 << 16)),
                warn: Some(nul(1 << 16)),
                crit: Some(nul(1 << 16)),
                min: Some(f64::MIN),
                max: Some(f64::MAX),
            })
            .collect();
        o.faults = (0..MAX_FAULTS * 2)
            .map(|_| Fault {
                name: nul(1 << 16),
                status: Status::Critical,
                output: nul(1 << 16),
            })
            .collect();
        let r = o.into_result(&spec, Origin::Schedule, u64::MAX, u64::MAX);
        let frame = encode(&AgentFrame::Results(Results { results: vec![r] }));
        assert!(frame.len() < MAX_FRAME_BYTES, "{} bytes", frame.len());
    }

    #[test]
    fn worst_of_and_thresholds() {
        let mut o = Outcome::new(Status::Warning, "");
        o.escalate(Status::Ok);
        assert_eq!(o.status, Status::Warning);
        o.escalate(Status::Critical);
        assert_eq!(o.status, Status::Critical);
        assert_eq!(above(5.0, Some(80.0), Some(90.0)), Status::Ok);
        assert_eq!(above(85.0, Some(80.0), Some(90.0)), Status::Warning);
        assert_eq!(above(95.0, Some(80.0), Some(90.0)), Status::Critical);
        assert_eq!(above(95.0, None, None), Status::Ok);
    }
}
