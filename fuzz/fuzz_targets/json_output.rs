//! A JSON plugin's output (also each line of a daemon plugin and a JSON socket's answer):
//! never a panic.
#![no_main]
use outpost_agent::checks::json::interpret;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = interpret(&String::from_utf8_lossy(data));
});
