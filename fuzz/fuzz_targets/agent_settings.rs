//! The agent's settings file (TOML): never a panic.
#![no_main]
use std::collections::BTreeMap;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = outpost_agent::settings::Settings::from_toml(text, &BTreeMap::new());
});
