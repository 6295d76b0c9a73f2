//! The agent's outbox file as found on disk after anything (a torn write, a bad sector,
//! another program): a real outbox file (three results, one acked) damaged as the input
//! says, then opened. Never a panic: it opens (and then reads and takes an append) or is
//! moved aside with the reason, and a fresh one opens in its place.
#![no_main]
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use outpost_agent::outbox::{DiskOutbox, Outbox, FILE_NAME};
use outpost_protocol::{CheckResult, Status};

#[derive(Arbitrary, Debug)]
struct Damage {
    /// Cut the file to this many bytes (modulo its length).
    truncate: Option<u32>,
    /// Bytes overwritten: (offset modulo the length, value).
    bytes: Vec<(u32, u8)>,
    /// Runs zeroed: (offset modulo the length, length).
    zeroed: Vec<(u32, u16)>,
}

fn result(check: &str) -> CheckResult {
    let mut r = CheckResult::new(check, Status::Ok, "OK - fine | x=1;2;3;0;10");
    r.started_at_ms = 1_764_892_800_000;
    r
}

/// A real outbox file, made once.
fn template() -> &'static [u8] {
    static FILE: OnceLock<Vec<u8>> = OnceLock::new();
    FILE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        {
            let (o, _) = DiskOutbox::open(dir.path(), 1 << 20).expect("a new outbox");
            for c in ["a", "b", "c"] {
                o.append(result(c)).expect("appended");
            }
            o.ack(1);
            o.flush().expect("flushed");
        }
        std::fs::read(dir.path().join(FILE_NAME)).expect("read back")
    })
}

libfuzzer_sys::fuzz_target!(init: {
    // libfuzzer-sys aborts on every panic, also one caught: the outbox catches redb's
    // panics on malformed files on purpose. A panic nobody catches still aborts (through
    // libfuzzer-sys's own catch around each input).
    std::panic::set_hook(Box::new(|_| {}));
}, |damage: Damage| {
    let mut file = template().to_vec();
    let len = file.len() as u32;
    for (at, v) in &damage.bytes {
        file[(at % len) as usize] = *v;
    }
    for (at, n) in &damage.zeroed {
        let at = (at % len) as usize;
        let end = (at + *n as usize).min(file.len());
        file[at..end].fill(0);
    }
    if let Some(t) = damage.truncate {
        file.truncate((t % len) as usize);
    }
    let dir = tempfile::tempdir().expect("a temporary directory");
    std::fs::write(dir.path().join(FILE_NAME), &file).expect("written");
    let (o, _moved) =
        DiskOutbox::open(dir.path(), 1 << 20).expect("a damaged outbox opens or is moved aside");
    let _ = o.pending_after(0, 100);
    let _ = o.append(result("d"));
    let _ = o.flush();
});
