//! Rules for what an agent says about itself in `hello`: its hostname, labels, groups and
//! version strings. They bound every string and count (a gateway keeps these per agent,
//! in its registry and in every `GET /agents`) and keep out control characters, so an
//! agent-supplied string can never forge a log line or a terminal escape. The agent
//! checks its own settings with the same functions before it dials.

use crate::limits::*;
use crate::Hello;

// What is refused is only what can harm: length, and characters that forge or hide text
// (controls, bidirectional overrides, zero-width and line separators). Any other text an
// agent was configured with before these rules stays valid, so no agent in service is
// locked out by an upgrade of its gateway.

/// Why `name` cannot be a hostname, if it cannot: at most 253 bytes of visible text (any
/// script; an empty one is what an agent sends when its host has no name).
pub fn hostname_problem(name: &str) -> Option<String> {
    text_problem("hostname", name, 0, MAX_HOSTNAME_BYTES)
}

/// Why `key = value` cannot be a label: the key 1-64 bytes, the value at most 256, both
/// visible text.
pub fn label_problem(key: &str, value: &str) -> Option<String> {
    text_problem("a label key", key, 1, MAX_LABEL_KEY_BYTES)
        .or_else(|| text_problem(&format!("label {key:?}"), value, 0, MAX_LABEL_VALUE_BYTES))
}

/// Why `group` cannot be a group name: 1-64 bytes of visible text.
pub fn group_problem(group: &str) -> Option<String> {
    text_problem("a group", group, 1, MAX_LABEL_KEY_BYTES)
}

/// Characters that forge or hide text: controls (`\n`, ESC, DEL, C1), bidirectional
/// embeddings, overrides and isolates, zero-width characters, line and paragraph
/// separators, and the byte-order mark.
pub fn hidden(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}' | '\u{2060}'..='\u{206F}' | '\u{FEFF}'
        )
}

fn text_problem(what: &str, s: &str, min: usize, max: usize) -> Option<String> {
    if s.len() < min || s.len() > max {
        return Some(format!("{what} must be {min}-{max} bytes, not {}", s.len()));
    }
    s.chars()
        .any(hidden)
        .then(|| format!("{what} {s:?} contains control, bidirectional or zero-width characters"))
}

/// `s` cut to at most `max` bytes (at a character boundary) with control characters
/// escaped as `\u{..}`, for free text an agent sends that is kept and shown (a `bye`
/// reason) rather than refused.
pub fn printable(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max));
    for c in s.chars() {
        let piece = if hidden(c) {
            c.escape_unicode().to_string()
        } else {
            c.to_string()
        };
        if out.len() + piece.len() > max {
            break;
        }
        out.push_str(&piece);
    }
    out
}

impl Hello {
    /// Every problem with what the agent states about itself (the fingerprint and the
    /// protocol revision are checked separately, with their own answers).
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        problems.extend(hostname_problem(&self.hostname));
        for (field, value) in [
            ("os", &self.os),
            ("arch", &self.arch),
            ("agent_version", &self.agent_version),
        ] {
            problems.extend(text_problem(field, value, 0, MAX_PLATFORM_BYTES));
        }
        let credential = match &self.credential {
            crate::Credential::EnrollKey { key, proof } => {
                if proof.len() > MAX_CREDENTIAL_BYTES {
                    problems.push(format!(
                        "the enrollment proof is longer than {MAX_CREDENTIAL_BYTES} bytes"
                    ));
                }
                key
            }
            crate::Credential::Secret { secret } => secret,
        };
        if credential.len() > MAX_CREDENTIAL_BYTES {
            problems.push(format!(
                "the credential is longer than {MAX_CREDENTIAL_BYTES} bytes"
            ));
        }
        if self.config_hash.as_ref().is_some_and(|h| {
            h.len() > 128 || !h.bytes().all(|c| c.is_ascii_alphanumeric() || c == b':')
        }) {
            problems.push("config_hash must be at most 128 letters and digits".into());
        }
        if self.labels.len() > MAX_LABELS || self.groups.len() > MAX_GROUPS {
            problems.push(format!(
                "at most {MAX_LABELS} labels and {MAX_GROUPS} groups, not {} and {}",
                self.labels.len(),
                self.groups.len()
            ));
        }
        // One bad label or group is enough to say; a thousand would make a huge message.
        problems.extend(self.labels.iter().find_map(|(k, v)| label_problem(k, v)));
        problems.extend(self.groups.iter().find_map(|g| group_problem(g)));
        if self.features.len() > 16 {
            problems.push(format!("at most 16 features, not {}", self.features.len()));
        }
        problems.extend(
            self.features
                .iter()
                .find_map(|f| text_problem("feature", f, 1, 64)),
        );
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_and_oversized_fields_are_refused() {
        assert_eq!(hostname_problem("web-1.example.com"), None);
        assert_eq!(hostname_problem("Rechner-Müller"), None);
        assert_eq!(hostname_problem(""), None, "a host without a name");
        for bad in [
            "web\nFAKE LOG LINE",
            "a\u{1b}[31mred",
            "x\u{7f}",
            "admin\u{202E}txt.exe",
            "we\u{200B}b",
            &"h".repeat(254),
        ] {
            assert!(hostname_problem(bad).is_some(), "{bad:?}");
        }
        assert_eq!(label_problem("role", "web"), None);
        assert_eq!(label_problem("team/owner", ""), None);
        // Labels and groups agents were configured with before these rules stay valid.
        assert_eq!(label_problem("team name", "ops"), None);
        assert_eq!(group_problem("EU West"), None);
        assert_eq!(group_problem("Zürich"), None);
        assert!(label_problem("role", &"x".repeat(257)).is_some());
        assert!(label_problem("role", "a\nb").is_some());
        assert!(label_problem("", "web").is_some());
        assert!(label_problem(&"k".repeat(65), "web").is_some());
        assert_eq!(group_problem("eu-west.1"), None);
        assert!(group_problem(&"g".repeat(65)).is_some());
        assert!(group_problem("g\u{1b}").is_some());
    }

    #[test]
    fn printable_escapes_controls_and_cuts_at_a_character_boundary() {
        assert_eq!(printable("stop\nFAKE", 64), "stop\\u{a}FAKE");
        assert_eq!(printable("ééé", 5), "éé");
        assert_eq!(printable("plain", 64), "plain");
    }
}
