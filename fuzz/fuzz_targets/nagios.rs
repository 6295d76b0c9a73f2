//! A Nagios plugin's output and its perfdata: never a panic, and every metric read is a
//! finite number with a name.
#![no_main]
use outpost_agent::checks::nagios::{parse_output, parse_perfdata};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = parse_output(&text);
    let (metrics, _problems) = parse_perfdata(&text);
    for m in metrics {
        assert!(m.value.is_finite(), "{m:?}");
        assert!(!m.name.is_empty(), "{m:?}");
    }
});
