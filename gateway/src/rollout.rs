//! Which agent version each agent should run: the rollout policy `rollout.toml` in the
//! releases directory, read on every agent `hello` (so edits apply to the next session of
//! each agent, and every session ends within `--max-session`).
//!
//! ```toml
//! version = "0.2.0"     # every agent not matched below
//! percent = 25          # ... but only this share of them (default 100)
//! [groups.canary]       # agents in group "canary"
//! version = "0.3.0"
//! percent = 100
//! ```
//!
//! An agent is in a rule's share when `bucket(fingerprint) < percent * 100`, where the
//! bucket is the first 8 bytes of SHA-256 of the fingerprint modulo 10,000: the same agent
//! stays in or out, and raising the percentage only adds agents. Group rules are tried in
//! the order of their names; the first whose group the agent is in and whose share holds
//! it wins, then the default. Nothing matches: the agent is not told anything.

use std::collections::BTreeMap;
use std::path::Path;

use outpost_protocol::update::Version;
use serde::Deserialize;
use sha2::{Digest, Sha256};

pub const ROLLOUT_FILE: &str = "rollout.toml";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    version: Option<String>,
    percent: Option<u32>,
    #[serde(default)]
    groups: BTreeMap<String, RawRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    version: String,
    percent: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub version: String,
    pub percent: u32,
}

/// A checked rollout policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rollout {
    pub default: Option<Rule>,
    pub groups: BTreeMap<String, Rule>,
}

fn rule(what: &str, version: &str, percent: Option<u32>, problems: &mut Vec<String>) -> Rule {
    if let Err(e) = Version::parse(version) {
        problems.push(format!("{what}: {e}"));
    }
    let percent = percent.unwrap_or(100);
    if percent > 100 {
        problems.push(format!("{what}: percent {percent} is above 100"));
    }
    Rule {
        version: version.to_string(),
        percent,
    }
}

impl Rollout {
    /// Parse `rollout.toml`; every problem is reported at once.
    pub fn parse(text: &str) -> Result<Rollout, String> {
        let raw: Raw = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut problems = Vec::new();
        let default = match (&raw.version, raw.percent) {
            (Some(v), p) => Some(rule("version", v, p, &mut problems)),
            (None, Some(_)) => {
                problems.push("percent is set without a version".into());
                None
            }
            (None, None) => None,
        };
        let groups = raw
            .groups
            .iter()
            .map(|(g, r)| {
                (
                    g.clone(),
                    rule(&format!("groups.{g}"), &r.version, r.percent, &mut problems),
                )
            })
            .collect();
        if problems.is_empty() {
            Ok(Rollout { default, groups })
        } else {
            Err(problems.join("; "))
        }
    }

    /// The version `fingerprint` (in `groups`) should run, if any rule selects it.
    pub fn version_for(&self, fingerprint: &str, groups: &[String]) -> Option<&str> {
        let b = bucket(fingerprint);
        let selects = |r: &Rule| b < r.percent * 100;
        self.groups
            .iter()
            .filter(|(g, _)| groups.contains(g))
            .map(|(_, r)| r)
            .chain(self.default.iter())
            .find(|r| selects(r))
            .map(|r| r.version.as_str())
    }
}

/// The agent's place in a rollout, 0..10,000, from its fingerprint alone.
pub fn bucket(fingerprint: &str) -> u32 {
    let d = Sha256::digest(fingerprint.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&d[..8]);
    (u64::from_be_bytes(first) % 10_000) as u32
}

/// Read the policy from the releases directory; `None` when there is none or it is
/// invalid (logged: agents are then told nothing, which is the safe side).
pub async fn load(releases_dir: &Path) -> Option<Rollout> {
    let path = releases_dir.join(ROLLOUT_FILE);
    let text = match tokio::fs::read_to_string(&path).await {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the rollout policy; no agent is offered an update");
            return None;
        }
    };
    match Rollout::parse(&text) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "invalid rollout policy; no agent is offered an update until it is fixed");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fps(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("00000000-0000-4000-8000-{i:012}"))
            .collect()
    }

    #[test]
    fn percentages_select_a_stable_growing_share() {
        let agents = fps(4000);
        let at = |p: u32| {
            let r = Rollout::parse(&format!("version = \"1.0.0\"\npercent = {p}\n")).unwrap();
            agents
                .iter()
                .filter(|a| r.version_for(a, &[]).is_some())
                .cloned()
                .collect::<std::collections::BTreeSet<_>>()
        };
        let (p0, p10, p50, p100) = (at(0), at(10), at(50), at(100));
        assert!(p0.is_empty());
        assert_eq!(p100.len(), agents.len());
        assert!((300..=500).contains(&p10.len()), "10% picked {}", p10.len());
        assert!(
            (1800..=2200).contains(&p50.len()),
            "50% picked {}",
            p50.len()
        );
        assert!(p10.is_subset(&p50), "raising the percentage dropped agents");
        assert_eq!(at(10), p10, "the choice is deterministic");
    }

    #[test]
    fn groups_win_over_the_default() {
        let r = Rollout::parse(
            "version = \"1.0.0\"\n[groups.canary]\nversion = \"2.0.0\"\n[groups.zzz]\nversion = \"3.0.0\"\n",
        )
        .unwrap();
        let fp = &fps(1)[0];
        assert_eq!(r.version_for(fp, &[]), Some("1.0.0"));
        assert_eq!(r.version_for(fp, &["canary".into()]), Some("2.0.0"));
        assert_eq!(
            r.version_for(fp, &["zzz".into(), "canary".into()]),
            Some("2.0.0")
        );
        let r = Rollout::parse("[groups.canary]\nversion = \"2.0.0\"\npercent = 0\n").unwrap();
        assert_eq!(r.version_for(fp, &["canary".into()]), None);
    }

    #[test]
    fn bad_policies_list_every_problem() {
        let e =
            Rollout::parse("version = \"latest\"\npercent = 150\n[groups.a]\nversion = \"1.x\"\n")
                .unwrap_err();
        assert!(
            e.contains("\"latest\"") && e.contains("150") && e.contains("groups.a"),
            "{e}"
        );
        assert!(Rollout::parse("percent = 5\n")
            .unwrap_err()
            .contains("without a version"));
        assert!(
            Rollout::parse("verison = \"1.0\"\n").is_err(),
            "typo accepted"
        );
    }
}
