//! The embedded bus's segment files as found on disk (torn, corrupted, anything): the
//! bytes as the active segment, then as a sealed one beside an active one; the log opens
//! or says why, and reading it never panics.
#![no_main]
use outpost_gateway::bus::segments::{read_lines, Log, Position, Retention};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let retention = Retention {
        max_age: std::time::Duration::from_secs(3600),
        max_bytes: 0,
    };
    for layout in 0..2 {
        let d = dir.path().join(layout.to_string());
        std::fs::create_dir_all(&d).expect("a directory");
        match layout {
            0 => std::fs::write(d.join("results.jsonl"), data),
            _ => std::fs::write(d.join("results-000001.jsonl"), data)
                .and_then(|()| std::fs::write(d.join("results.jsonl"), b"{}\n")),
        }
        .expect("written");
        let Ok(opened) = Log::open(&d, "results", retention) else {
            continue;
        };
        let durable = opened.log.durable_end();
        let mut from = Position::START;
        for _ in 0..1000 {
            let Ok(lines) = read_lines(&d, "results", from, 4096, Some(durable)) else {
                break;
            };
            if lines.next == from {
                break;
            }
            from = lines.next;
        }
        let _ = opened.log.for_each_sealed_line(|_| {});
    }
});
