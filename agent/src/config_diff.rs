//! Comparing two configurations check by check, so only what changed is rescheduled, and
//! telling the operator what changed in words and as a unified diff.

use std::collections::BTreeMap;
use std::fmt::Write;

use outpost_protocol::CheckSpec;
use similar::TextDiff;

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    pub unchanged: Vec<String>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

pub fn diff(old: &BTreeMap<String, CheckSpec>, new: &BTreeMap<String, CheckSpec>) -> Diff {
    let mut d = Diff::default();
    for (name, spec) in new {
        match old.get(name) {
            None => d.added.push(name.clone()),
            Some(o) if o == spec => d.unchanged.push(name.clone()),
            Some(_) => d.changed.push(name.clone()),
        }
    }
    d.removed = old
        .keys()
        .filter(|k| !new.contains_key(*k))
        .cloned()
        .collect();
    d
}

/// The fields that differ between two versions of a check, as `field: old -> new`.
fn field_changes(old: &CheckSpec, new: &CheckSpec) -> Vec<String> {
    let (serde_json::Value::Object(a), serde_json::Value::Object(b)) = (
        serde_json::to_value(old).unwrap_or_default(),
        serde_json::to_value(new).unwrap_or_default(),
    ) else {
        return vec![];
    };
    b.iter()
        .filter(|(k, v)| a.get(*k) != Some(*v))
        .map(|(k, v)| format!("{k}: {} -> {v}", a.get(k).cloned().unwrap_or_default()))
        .collect()
}

/// One line saying what a check runs and when.
fn describe(c: &CheckSpec) -> String {
    let what = match c.probe.command() {
        Some(argv) if c.probe.kind() == "nagios" => argv.join(" "),
        Some(argv) => format!("{} {}", c.probe.kind(), argv.join(" ")),
        None => serde_json::to_string(&c.probe).unwrap_or_else(|_| c.probe.kind().into()),
    };
    match &c.cron {
        Some(cron) => format!("{what} (cron {cron})"),
        None if c.interval_secs == 0 => what,
        None => format!("{what} (every {}s)", c.interval_secs),
    }
}

/// A readable account of `d`: one line per added, removed or changed check, then a unified
/// diff of the changed checks' JSON.
pub fn render(
    d: &Diff,
    old: &BTreeMap<String, CheckSpec>,
    new: &BTreeMap<String, CheckSpec>,
) -> String {
    let mut out = String::new();
    for n in &d.added {
        let _ = writeln!(out, "+ {n}: {}", describe(&new[n]));
    }
    for n in &d.removed {
        let _ = writeln!(out, "- {n}");
    }
    for n in &d.changed {
        let _ = writeln!(out, "~ {n}: {}", field_changes(&old[n], &new[n]).join(", "));
        let a = serde_json::to_string_pretty(&old[n]).unwrap_or_default();
        let b = serde_json::to_string_pretty(&new[n]).unwrap_or_default();
        let udiff = TextDiff::from_lines(&a, &b)
            .unified_diff()
            .header(&format!("{n} (running)"), &format!("{n} (new)"))
            .to_string();
        out.push_str(&udiff);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, interval: u64) -> (String, CheckSpec) {
        (
            name.into(),
            CheckSpec::new(
                name,
                outpost_protocol::probe::Probe::Nagios(outpost_protocol::probe::Command {
                    command: vec!["/bin/true".into()],
                }),
                interval,
                5,
            ),
        )
    }

    #[test]
    fn classifies_and_renders_changes() {
        let old: BTreeMap<_, _> = [spec("a", 10), spec("b", 10), spec("c", 10)].into();
        let new: BTreeMap<_, _> = [spec("a", 10), spec("b", 30), spec("d", 10)].into();
        let d = diff(&old, &new);
        assert_eq!(d.added, vec!["d"]);
        assert_eq!(d.removed, vec!["c"]);
        assert_eq!(d.changed, vec!["b"]);
        assert_eq!(d.unchanged, vec!["a"]);
        let text = render(&d, &old, &new);
        assert!(text.contains("+ d: /bin/true (every 10s)"), "{text}");
        assert!(text.contains("- c"), "{text}");
        assert!(text.contains("~ b: interval_secs: 10 -> 30"), "{text}");
        assert!(
            text.contains("-  \"interval_secs\": 10,")
                && text.contains("+  \"interval_secs\": 30,"),
            "{text}"
        );
    }
}
