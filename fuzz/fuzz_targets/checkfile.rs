//! A check file (TOML) of the gateway's or an agent's `checks.d`, and its alerting
//! tables: never a panic.
#![no_main]
use std::path::Path;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = outpost_protocol::checkfile::parse_file_with_collectors(Path::new("fuzz.toml"), text);
    let _ = outpost_gateway::alerts::config::parse_file(text);
});
