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
    // Every field either has (one the new spec no longer sets, such as a cron taken
    // away, is a change too: found by the model test below).
    let fields: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let shown = |v: Option<&serde_json::Value>| v.cloned().unwrap_or_default();
    fields
        .into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| format!("{k}: {} -> {}", shown(a.get(k)), shown(b.get(k))))
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

    /// One field of a spec set to a value it did not have; returns the field's JSON name.
    fn change_one(spec: &mut CheckSpec, rng: &mut impl rand::Rng) -> &'static str {
        use outpost_protocol::probe::{Command, Probe};
        match rng.gen_range(0..7) {
            0 => {
                spec.interval_secs += rng.gen_range(1..100);
                "interval_secs"
            }
            1 => {
                spec.timeout_secs += rng.gen_range(1..100);
                "timeout_secs"
            }
            2 => {
                spec.max_attempts += rng.gen_range(1..5);
                "max_attempts"
            }
            3 => {
                spec.cron = match spec.cron {
                    Some(_) => None,
                    None => Some(format!("{} 3 * * *", rng.gen_range(0..60))),
                };
                "cron"
            }
            4 => {
                spec.retry_interval_secs = Some(spec.retry_interval_secs.unwrap_or(0) + 1);
                "retry_interval_secs"
            }
            5 => {
                let argv = spec
                    .probe
                    .command()
                    .map(<[String]>::to_vec)
                    .unwrap_or_default();
                let mut argv = argv;
                argv.push(format!("-w{}", rng.gen_range(0..1000)));
                spec.probe = match spec.probe {
                    Probe::Json(_) => Probe::Json(Command { command: argv }),
                    _ => Probe::Nagios(Command { command: argv }),
                };
                "probe"
            }
            _ => {
                let argv = spec
                    .probe
                    .command()
                    .map(<[String]>::to_vec)
                    .unwrap_or_default();
                spec.probe = match spec.probe {
                    Probe::Json(_) => Probe::Daemon(Command { command: argv }),
                    _ => Probe::Json(Command { command: argv }),
                };
                "probe"
            }
        }
    }

    /// Random running and new configurations, made by choices whose outcome is known (a
    /// check kept, dropped, added, one field changed, or sent again through JSON): the
    /// diff gives exactly the checks each choice says, and the account names each change
    /// and the field that changed, and nothing unchanged.
    #[test]
    fn a_random_old_and_new_config_give_exactly_the_changed_checks() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(0xd1ff);
        let mut counts = [0usize; 4];
        for _ in 0..500 {
            let (mut old, mut new) = (BTreeMap::new(), BTreeMap::new());
            let mut want = Diff::default();
            for i in 0..rng.gen_range(0..30) {
                let (name, mut s) = spec(&format!("c{i}"), rng.gen_range(1..600));
                s.timeout_secs = rng.gen_range(1..60);
                if rng.gen_bool(0.3) {
                    s.cron = Some("*/5 * * * *".into());
                }
                match rng.gen_range(0..5) {
                    0 => {
                        old.insert(name.clone(), s);
                        want.removed.push(name);
                    }
                    1 => {
                        new.insert(name.clone(), s);
                        want.added.push(name);
                    }
                    2 => {
                        let mut changed = s.clone();
                        let field = change_one(&mut changed, &mut rng);
                        old.insert(name.clone(), s);
                        new.insert(name.clone(), changed);
                        want.changed.push(format!("{name} {field}"));
                    }
                    3 => {
                        // Sent again (through JSON, as a config frame carries it): the
                        // same check.
                        let back: CheckSpec =
                            serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
                        old.insert(name.clone(), s);
                        new.insert(name.clone(), back);
                        want.unchanged.push(name);
                    }
                    _ => {
                        old.insert(name.clone(), s.clone());
                        new.insert(name.clone(), s);
                        want.unchanged.push(name);
                    }
                }
            }
            let d = diff(&old, &new);
            let sorted = |mut v: Vec<String>| {
                v.sort();
                v
            };
            let changed_names: Vec<String> = want
                .changed
                .iter()
                .map(|c| c.split(' ').next().unwrap().to_string())
                .collect();
            assert_eq!(sorted(d.added.clone()), sorted(want.added.clone()));
            assert_eq!(sorted(d.removed.clone()), sorted(want.removed.clone()));
            assert_eq!(sorted(d.changed.clone()), sorted(changed_names));
            assert_eq!(sorted(d.unchanged.clone()), sorted(want.unchanged.clone()));
            assert_eq!(
                d.is_empty(),
                want.added.is_empty() && want.removed.is_empty() && want.changed.is_empty()
            );
            let text = render(&d, &old, &new);
            for n in &want.added {
                assert!(text.contains(&format!("+ {n}: ")), "{text}");
            }
            for n in &want.removed {
                assert!(text.lines().any(|l| l == format!("- {n}")), "{text}");
            }
            for c in &want.changed {
                let (n, field) = c.split_once(' ').unwrap();
                let line = text
                    .lines()
                    .find(|l| l.starts_with(&format!("~ {n}: ")))
                    .unwrap_or_else(|| panic!("{n} changed: {text}"));
                assert!(line.contains(&format!("{field}: ")), "{field} in {line}");
            }
            for n in &want.unchanged {
                assert!(
                    !text.contains(&format!(" {n}:")) && !text.contains(&format!("- {n}\n")),
                    "{text}"
                );
            }
            counts[0] += want.added.len();
            counts[1] += want.removed.len();
            counts[2] += want.changed.len();
            counts[3] += want.unchanged.len();
        }
        assert!(counts.iter().all(|n| *n > 500), "{counts:?}");
    }
}
