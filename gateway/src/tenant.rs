//! Tenants: the customers one gateway fleet serves. Every agent, token, check and
//! message belongs to exactly one, and its name is the first part of every subject and key
//! it has on the bus.

/// The tenant of an installation that never named one (`--tenant` not given).
pub const DEFAULT_TENANT: &str = "default";

/// A tenant name or gateway id: it becomes a NATS subject token and a KV key.
pub fn parse_name(s: &str) -> Result<String, String> {
    if (1..=64).contains(&s.len())
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
    {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?}: use 1-64 letters, digits, '-' or '_' (it becomes a NATS subject token)"
        ))
    }
}
