//! What collectors send the agent, through the agent's intake: Graphite plaintext lines
//! (`S` in a line's path stands for the running collector's secret, so lines get past
//! the check of the sender) and fluentd's HTTP bodies. Never a panic, and whatever came
//! in, the results the collector flushes are ones the gateway accepts (no bound broken,
//! every metric a finite number).
#![no_main]
use std::path::Path;
use std::time::Instant;

use outpost_agent::collectors::data::{parse_records, Sinks};

const FILE: &str = r#"
[[collector]]
name = "c"
kind = "program"
command = "/bin/true"
interval = "10s"
"#;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let sinks = Sinks::new("web-1");
    let (_, collectors) =
        outpost_protocol::checkfile::parse_file_with_collectors(Path::new("c.toml"), FILE)
            .expect("the collector parses");
    let secret = sinks.secret("c");
    sinks.declare(&collectors[0].spec);
    let text = String::from_utf8_lossy(data);
    for line in text.lines() {
        let line = line.replacen("c@S.", &format!("c@{}.", secret.expose()), 1);
        let _ = sinks.graphite(&line);
    }
    if let Ok((records, _)) = parse_records(data) {
        sinks.records("c", "app", &records);
    }
    for result in sinks.flush_due(Instant::now(), true) {
        // (Its `seq` is the outbox's to give.)
        let problems = result.content_problems();
        assert!(problems.is_empty(), "{problems:?}: {result:?}");
        for m in &result.metrics {
            assert!(m.value.is_finite(), "{m:?}");
        }
    }
});
