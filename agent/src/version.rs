//! Which build this is, for the hello frame, the update check and the `--version` line.

/// This build's version: `OUTPOST_VERSION` at build time, else the crate's version.
pub const AGENT_VERSION: &str = match option_env!("OUTPOST_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};
/// The Rust target this build is for; self-update fetches the release built for it.
pub const AGENT_TARGET: &str = env!("OUTPOST_TARGET");
