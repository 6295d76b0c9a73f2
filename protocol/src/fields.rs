//! Rules for what an agent says about itself in `hello`: its hostname, labels, groups and
//! version strings. They bound every string and count (a gateway keeps these per agent,
//! in its registry and in every `GET /agents`) and keep out control characters, so an
//! agent-supplied string can never forge a log line or a terminal escape. The agent
//! checks its own settings with the same functions before it dials.

use crate::Hello;

/// Most labels, and most groups, one agent may have.
pub const MAX_LABELS: usize = 64;
pub const MAX_GROUPS: usize = 64;
/// Longest label key or group name, in bytes.
pub const MAX_LABEL_KEY_BYTES: usize = 64;
/// Longest label value, in bytes.
pub const MAX_LABEL_VALUE_BYTES: usize = 256;
/// Longest hostname, in bytes (DNS allows 253).
pub const MAX_HOSTNAME_BYTES: usize = 253;
/// Longest `os`, `arch` and `agent_version`, in bytes.
pub const MAX_PLATFORM_BYTES: usize = 64;
/// Longest credential (enrollment key or secret), in bytes.
pub const MAX_CREDENTIAL_BYTES: usize = 256;

/// Why `name` cannot be a hostname, if it cannot: 1-253 bytes, no control characters
/// (any other Unicode is kept, as hosts are named in many scripts).
pub fn hostname_problem(name: &str) -> Option<String> {
    text_problem("hostname", name, 1, MAX_HOSTNAME_BYTES)
}

/// Why `key = value` cannot be a label: the key 1-64 bytes of letters, digits, `_`, `-`,
/// `.` and `/`; the value at most 256 bytes without control characters.
pub fn label_problem(key: &str, value: &str) -> Option<String> {
    if !name_ok(key) {
        return Some(format!(
            "label key {key:?}: keys are 1-{MAX_LABEL_KEY_BYTES} letters, digits, '_', '-', '.' or '/'"
        ));
    }
    text_problem(&format!("label {key:?}"), value, 0, MAX_LABEL_VALUE_BYTES)
}

/// Why `group` cannot be a group name: 1-64 letters, digits, `_`, `-`, `.` or `/`.
pub fn group_problem(group: &str) -> Option<String> {
    (!name_ok(group)).then(|| {
        format!(
            "group {group:?}: names are 1-{MAX_LABEL_KEY_BYTES} letters, digits, '_', '-', '.' or '/'"
        )
    })
}

fn name_ok(s: &str) -> bool {
    (1..=MAX_LABEL_KEY_BYTES).contains(&s.len())
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.' | b'/'))
}

fn text_problem(what: &str, s: &str, min: usize, max: usize) -> Option<String> {
    if s.len() < min || s.len() > max {
        return Some(format!("{what} must be {min}-{max} bytes, not {}", s.len()));
    }
    s.chars()
        .any(char::is_control)
        .then(|| format!("{what} {s:?} contains control characters"))
}

/// `s` cut to at most `max` bytes (at a character boundary) with control characters
/// escaped as `\u{..}`, for free text an agent sends that is kept and shown (a `bye`
/// reason) rather than refused.
pub fn printable(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max));
    for c in s.chars() {
        let piece = if c.is_control() {
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
        for bad in [
            "web\nFAKE LOG LINE",
            "a\u{1b}[31mred",
            "x\u{7f}",
            "",
            &"h".repeat(254),
        ] {
            assert!(hostname_problem(bad).is_some(), "{bad:?}");
        }
        assert_eq!(label_problem("role", "web"), None);
        assert_eq!(label_problem("team/owner", ""), None);
        assert!(label_problem("role", &"x".repeat(257)).is_some());
        assert!(label_problem("role", "a\nb").is_some());
        assert!(label_problem("ro le", "web").is_some());
        assert!(label_problem("", "web").is_some());
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
