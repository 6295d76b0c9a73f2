//! Silences: matchers on agent, labels and check name that keep alerts from notifying for a
//! while. A silenced alert is still tracked: when the silence ends and it still fires, it
//! notifies then; one that was notified before and resolves during the silence still sends
//! its resolve (the pager's incident would stay open otherwise). A silence can end at a
//! time, when the alerts it silenced have resolved (`expire_on_resolve`), or by hand; one
//! left in force longer than the tenant's `silence_max_age` notifies once that it may have
//! been forgotten, unless it is marked permanent.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::config::glob;

/// How long an ended silence is still listed.
pub const KEEP_ENDED_MS: u64 = 24 * 3600 * 1000;

/// What a silence applies to: every part given must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Matchers {
    /// An agent's fingerprint or hostname.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// Labels the agent must have, with these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Check name globs (`*`, `?`); none: every check.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<String>,
}

impl Matchers {
    pub fn matches(
        &self,
        fingerprint: &str,
        hostname: &str,
        labels: &BTreeMap<String, String>,
        check: &str,
    ) -> bool {
        self.agent
            .as_deref()
            .is_none_or(|a| a == fingerprint || a == hostname)
            && self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && (self.checks.is_empty() || self.checks.iter().any(|g| glob(g, check)))
    }

    /// Whether it matches something narrower than everything.
    pub fn is_empty(&self) -> bool {
        self.agent.is_none() && self.labels.is_empty() && self.checks.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Silence {
    pub id: String,
    pub matchers: Matchers,
    pub starts_ms: u64,
    /// `None`: until expired by hand (or, with `expire_on_resolve`, by the alerts).
    pub ends_ms: Option<u64>,
    pub expire_on_resolve: bool,
    /// Never reported as forgotten.
    pub permanent: bool,
    pub creator: String,
    pub comment: String,
    pub created_ms: u64,
    /// It has silenced a firing alert (so `expire_on_resolve` can end it).
    #[serde(default)]
    pub silenced_any: bool,
    /// The "forgotten silence" notification was made.
    #[serde(default)]
    pub reminded: bool,
}

impl Silence {
    pub fn active(&self, now_ms: u64) -> bool {
        self.starts_ms <= now_ms && self.ends_ms.is_none_or(|end| now_ms < end)
    }
}

/// A tenant's silences.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Silences {
    pub list: Vec<Silence>,
}

impl Silences {
    /// The ids of the silences in force at `now_ms` that match this alert.
    pub fn muting(
        &self,
        now_ms: u64,
        fingerprint: &str,
        hostname: &str,
        labels: &BTreeMap<String, String>,
        check: &str,
    ) -> Vec<String> {
        self.list
            .iter()
            .filter(|s| {
                s.active(now_ms) && s.matchers.matches(fingerprint, hostname, labels, check)
            })
            .map(|s| s.id.clone())
            .collect()
    }

    pub fn add(&mut self, silence: Silence) {
        self.list.push(silence);
    }

    /// End silence `id` at `now_ms`; returns it, or `None` when there is no such silence.
    pub fn expire(&mut self, id: &str, now_ms: u64) -> Option<Silence> {
        let s = self.list.iter_mut().find(|s| s.id == id)?;
        if s.active(now_ms) || s.starts_ms > now_ms {
            s.ends_ms = Some(now_ms);
        }
        Some(s.clone())
    }

    /// Mark the silences that silenced a firing alert now.
    pub fn note_silenced(&mut self, ids: &[String]) {
        for s in self.list.iter_mut().filter(|s| ids.contains(&s.id)) {
            s.silenced_any = true;
        }
    }

    /// Housekeeping at `now_ms`: end the `expire_on_resolve` silences that silenced
    /// something and match nothing firing any more (`firing` says whether a silence still
    /// matches a firing alert), forget those ended long ago, and return the silences in
    /// force longer than `max_age` that are to be reported as forgotten (once each).
    pub fn upkeep(
        &mut self,
        now_ms: u64,
        max_age_ms: Option<u64>,
        firing: impl Fn(&Silence) -> bool,
    ) -> Vec<Silence> {
        for s in &mut self.list {
            if s.expire_on_resolve && s.silenced_any && s.active(now_ms) && !firing(s) {
                s.ends_ms = Some(now_ms);
            }
        }
        self.list.retain(|s| {
            s.ends_ms
                .is_none_or(|end| now_ms < end.saturating_add(KEEP_ENDED_MS))
        });
        let mut forgotten = Vec::new();
        if let Some(max_age) = max_age_ms {
            for s in &mut self.list {
                if !s.permanent
                    && !s.reminded
                    && s.active(now_ms)
                    && now_ms.saturating_sub(s.starts_ms) >= max_age
                {
                    s.reminded = true;
                    forgotten.push(s.clone());
                }
            }
        }
        forgotten
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn silence(id: &str, matchers: Matchers, ends_ms: Option<u64>) -> Silence {
        Silence {
            id: id.into(),
            matchers,
            starts_ms: 100,
            ends_ms,
            expire_on_resolve: false,
            permanent: false,
            creator: "ann".into(),
            comment: "maintenance".into(),
            created_ms: 100,
            silenced_any: false,
            reminded: false,
        }
    }

    #[test]
    fn matchers_take_agent_labels_and_check_globs_together() {
        let db = BTreeMap::from([("role".to_string(), "db".to_string())]);
        let m = Matchers {
            agent: Some("db-1".into()),
            labels: db.clone(),
            checks: vec!["disk*".into()],
        };
        assert!(m.matches("fp", "db-1", &db, "disk_root"));
        assert!(m.matches("db-1", "other", &db, "disk"), "or by fingerprint");
        assert!(!m.matches("fp", "db-2", &db, "disk"));
        assert!(!m.matches("fp", "db-1", &BTreeMap::new(), "disk"));
        assert!(!m.matches("fp", "db-1", &db, "load"));
        assert!(Matchers::default().matches("fp", "h", &BTreeMap::new(), "x"));
    }

    #[test]
    fn a_silence_mutes_only_between_its_start_and_end() {
        let mut s = Silences::default();
        s.add(silence("a", Matchers::default(), Some(200)));
        let none = BTreeMap::new();
        assert!(s.muting(99, "fp", "h", &none, "x").is_empty());
        assert_eq!(s.muting(100, "fp", "h", &none, "x"), ["a"]);
        assert!(s.muting(200, "fp", "h", &none, "x").is_empty());
        assert!(s.expire("nope", 150).is_none());
        s.add(silence("b", Matchers::default(), None));
        assert_eq!(s.expire("b", 150).unwrap().ends_ms, Some(150));
        assert_eq!(s.muting(160, "fp", "h", &none, "x"), ["a"], "b expired");
    }

    #[test]
    fn expire_on_resolve_ends_it_once_what_it_silenced_has_resolved() {
        let mut s = Silences::default();
        let mut one = silence("a", Matchers::default(), None);
        one.expire_on_resolve = true;
        s.add(one);
        // Nothing silenced yet: it waits for something to silence.
        s.upkeep(150, None, |_| false);
        assert!(s.list[0].active(151));
        s.note_silenced(&["a".into()]);
        s.upkeep(160, None, |_| true);
        assert!(s.list[0].active(161), "still firing");
        s.upkeep(170, None, |_| false);
        assert_eq!(s.list[0].ends_ms, Some(170));
        // Listed for a day after its end, then forgotten.
        s.upkeep(170 + KEEP_ENDED_MS - 1, None, |_| false);
        assert_eq!(s.list.len(), 1);
        s.upkeep(170 + KEEP_ENDED_MS, None, |_| false);
        assert!(s.list.is_empty());
    }

    #[test]
    fn a_silence_in_force_too_long_is_reported_once_unless_permanent() {
        let mut s = Silences::default();
        s.add(silence("old", Matchers::default(), None));
        let mut kept = silence("kept", Matchers::default(), None);
        kept.permanent = true;
        s.add(kept);
        assert!(s.upkeep(1_000, Some(1_000), |_| true).is_empty());
        let forgotten = s.upkeep(1_100, Some(1_000), |_| true);
        assert_eq!(forgotten.len(), 1);
        assert_eq!(forgotten[0].id, "old");
        assert!(s.upkeep(5_000, Some(1_000), |_| true).is_empty(), "once");
    }
}
