//! Names every part of the protocol shares.

/// Whether `name` is usable as a check name: 1 to 64 of `[A-Za-z0-9_.-]`, so it is safe in
/// URLs, file names and bus subjects.
pub fn valid_check_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'))
        && name != "."
        && name != ".."
}
