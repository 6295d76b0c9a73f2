//! JSON plugin output (CIMAA style), shared by JSON plugins, daemon plugins (one document
//! per line) and JSON sockets:
//!
//! ```json
//! {"status": "warning", "text": "2 of 3 queues slow",
//!  "metrics": {"depth": 120, "age_s": {"value": 31, "unit": "s", "warn": "30", "crit": "60"}},
//!  "faults": [{"name": "queue-b", "status": "critical", "text": "stuck for 5m"}]}
//! ```
//!
//! - `status`: `ok`, `warning`, `critical`, `unknown` (any case) or 0-3. When absent, the
//!   worst fault's status; with neither, the document is refused.
//! - `text` (or `output`): one line; `long_text` (or `long_output`): details.
//! - `metrics`: an object of name → number, or name → `{value, unit, warn, crit, min,
//!   max}`; or a list of such objects with a `name`.
//! - `faults` (or `sub_faults`): parts that failed on their own; the result's status is
//!   never better than its worst fault.
//!
//! Anything else in the document is ignored. A document that is not JSON, or not this
//! shape, is UNKNOWN with the reason.

use outpost_protocol::{Fault, Metric, Status};
use serde_json::{Map, Value};

use super::outcome::Outcome;

/// Read one document.
pub fn interpret(text: &str) -> Outcome {
    let doc: Value = match serde_json::from_str(text.trim()) {
        Ok(v) => v,
        Err(e) => {
            let mut o = Outcome::unknown(format!("plugin output is not valid JSON: {e}"));
            let mut head = text.trim().to_string();
            crate::util::truncate_utf8(&mut head, 512);
            o.note(format!("output was: {head}"));
            return o;
        }
    };
    document(&doc, text)
}

/// Read one document already parsed from `text` (quoted when it is refused).
pub fn document(doc: &Value, text: &str) -> Outcome {
    match from_value(doc) {
        Ok(o) => o,
        Err(why) => {
            let mut o = Outcome::unknown(format!("plugin output is not a check result: {why}"));
            let mut head = text.trim().to_string();
            crate::util::truncate_utf8(&mut head, 512);
            o.note(format!("output was: {head}"));
            o
        }
    }
}

fn from_value(doc: &Value) -> Result<Outcome, String> {
    let obj = doc
        .as_object()
        .ok_or_else(|| format!("expected a JSON object, got {}", type_name(doc)))?;
    let faults = match field(obj, &["faults", "sub_faults"]) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, f)| fault(f).map_err(|e| format!("faults[{i}]: {e}")))
            .collect::<Result<Vec<_>, _>>()?,
        Some(other) => return Err(format!("faults must be a list, got {}", type_name(other))),
    };
    let worst_fault = faults
        .iter()
        .map(|f| f.status)
        .max_by_key(|s| super::outcome::severity(*s));
    let status = match field(obj, &["status"]) {
        Some(v) => status(v)?,
        None => worst_fault.ok_or("no status (and no faults to take one from)")?,
    };
    let text = match field(obj, &["text", "output"]) {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => return Err(format!("text must be a string, got {}", type_name(other))),
    };
    let mut o = Outcome::new(status, text);
    if let Some(Value::String(long)) = field(obj, &["long_text", "long_output"]) {
        o.long_output = long.trim_end().to_string();
    }
    o.metrics = match field(obj, &["metrics"]) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(name, v)| metric(name, v))
            .collect::<Result<Vec<_>, _>>()?,
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let name = v
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| format!("metrics[{i}] has no name"))?;
                metric(name, v)
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(other) => {
            return Err(format!(
                "metrics must be an object or a list, got {}",
                type_name(other)
            ))
        }
    };
    if let Some(w) = worst_fault {
        o.escalate(w);
    }
    for f in &faults {
        o.note(format!(
            "{}: {}{}",
            f.status.as_str().to_uppercase(),
            f.name,
            if f.output.is_empty() {
                String::new()
            } else {
                format!(" - {}", f.output)
            }
        ));
    }
    o.faults = faults;
    Ok(o)
}

fn field<'a>(obj: &'a Map<String, Value>, names: &[&str]) -> Option<&'a Value> {
    names.iter().find_map(|n| obj.get(*n))
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn status(v: &Value) -> Result<Status, String> {
    let s = match v {
        Value::Number(n) => n
            .as_i64()
            .and_then(|c| i32::try_from(c).ok())
            .and_then(Status::from_exit_code),
        Value::String(s) => match s.to_ascii_lowercase().as_str() {
            "ok" => Some(Status::Ok),
            "warning" | "warn" => Some(Status::Warning),
            "critical" | "crit" => Some(Status::Critical),
            "unknown" => Some(Status::Unknown),
            _ => None,
        },
        _ => None,
    };
    s.ok_or_else(|| format!("status {v} is not ok, warning, critical, unknown or 0-3"))
}

fn fault(v: &Value) -> Result<Fault, String> {
    let name = v
        .get("name")
        .and_then(Value::as_str)
        .ok_or("no name")?
        .to_string();
    let status = status(v.get("status").ok_or("no status")?)?;
    let output = v
        .get("text")
        .or_else(|| v.get("output"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    Ok(Fault {
        name,
        status,
        output,
    })
}

fn number(v: &Value) -> Option<f64> {
    v.as_f64().filter(|f| f.is_finite())
}

fn threshold(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn metric(name: &str, v: &Value) -> Result<Metric, String> {
    if name.is_empty() || name.len() > 200 {
        return Err("a metric name must be 1-200 bytes".into());
    }
    let bad = || format!("metric {name:?} needs a finite number");
    let (value, spec) = match v {
        Value::Object(m) => (m.get("value").and_then(number).ok_or_else(bad)?, Some(m)),
        other => (number(other).ok_or_else(bad)?, None),
    };
    let get = |k: &str| spec.and_then(|m| m.get(k));
    Ok(Metric {
        name: name.to_string(),
        value,
        unit: get("unit").and_then(Value::as_str).map(str::to_string),
        warn: threshold(get("warn")),
        crit: threshold(get("crit")),
        min: get("min").and_then(number),
        max: get("max").and_then(number),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_full_document() {
        let o = interpret(
            r#"{"status":"warning","text":"2 of 3 queues slow","long_text":"see runbook",
                "metrics":{"depth":120,"age_s":{"value":31.5,"unit":"s","warn":30,"crit":"60","min":0}},
                "faults":[{"name":"queue-b","status":"critical","text":"stuck for 5m"}],
                "extra":"ignored"}"#,
        );
        assert_eq!(
            o.status,
            Status::Critical,
            "never better than the worst fault"
        );
        assert_eq!(o.output, "2 of 3 queues slow");
        assert!(
            o.long_output
                .starts_with("see runbook\nCRITICAL: queue-b - stuck for 5m"),
            "{}",
            o.long_output
        );
        let age = o.metrics.iter().find(|m| m.name == "age_s").unwrap();
        assert_eq!((age.value, age.unit.as_deref()), (31.5, Some("s")));
        assert_eq!(
            (age.warn.as_deref(), age.crit.as_deref(), age.min),
            (Some("30"), Some("60"), Some(0.0))
        );
        assert_eq!(o.faults.len(), 1);
    }

    #[test]
    fn numeric_status_list_metrics_and_status_from_faults() {
        let o = interpret(r#"{"status":2,"output":"down","metrics":[{"name":"rtt","value":3}]}"#);
        assert_eq!(
            (o.status, o.output.as_str(), o.metrics[0].value),
            (Status::Critical, "down", 3.0)
        );
        let o =
            interpret(r#"{"faults":[{"name":"a","status":"ok"},{"name":"b","status":"WARNING"}]}"#);
        assert_eq!(o.status, Status::Warning);
    }

    #[test]
    fn bad_documents_are_unknown_with_the_reason() {
        for (doc, why) in [
            ("not json", "not valid JSON"),
            ("", "not valid JSON"),
            ("[1,2]", "expected a JSON object, got a list"),
            (r#"{"text":"x"}"#, "no status"),
            (r#"{"status":"fine"}"#, "is not ok, warning"),
            (r#"{"status":7}"#, "is not ok, warning"),
            (
                r#"{"status":0,"metrics":{"x":"high"}}"#,
                "needs a finite number",
            ),
            (r#"{"status":0,"metrics":[{"value":1}]}"#, "has no name"),
            (
                r#"{"status":0,"faults":[{"name":"a"}]}"#,
                "faults[0]: no status",
            ),
            (r#"{"status":0,"faults":{}}"#, "faults must be a list"),
        ] {
            let o = interpret(doc);
            assert_eq!(o.status, Status::Unknown, "{doc}");
            assert!(o.output.contains(why), "{doc}: {}", o.output);
        }
    }
}
