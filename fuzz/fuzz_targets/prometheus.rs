//! The Prometheus text exposition format as the probe reads it: never a panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = outpost_agent::checks::net::prometheus::parse(&String::from_utf8_lossy(data));
});
