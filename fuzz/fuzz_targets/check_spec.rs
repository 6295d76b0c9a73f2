//! A check spec as JSON (the config frame's, the API's): decoded, its probe validated,
//! its cron parsed, its result bounds checked; never a panic.
#![no_main]
use outpost_protocol::{checkfile, CheckResult, CheckSpec};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(spec) = serde_json::from_slice::<CheckSpec>(data) {
        let _ = spec.probe.validate();
        if let Some(cron) = &spec.cron {
            let _ = checkfile::parse_cron(cron);
        }
    }
    if let Ok(result) = serde_json::from_slice::<CheckResult>(data) {
        let _ = result.problems();
    }
});
