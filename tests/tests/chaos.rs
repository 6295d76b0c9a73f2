//! Faults the product must live through, with the real binaries, audited at the end:
//! every result the agent made is on the bus exactly once.
//!
//! - The gateway's disk full under its bus (a small tmpfs the test mounts as its data
//!   directory): the agent keeps running its checks and keeps their results; the gateway
//!   says so, stores nothing and acks nothing it could not store; when space returns,
//!   every result arrives, once.
//! - The gateway's log unwritable (stderr on `/dev/full`): it goes on storing results.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use outpost_e2e::{eventually, now_ms, tempdir, Agent, Gateway};

/// A tmpfs of `mib` MiB mounted at `at`, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, mib: u64) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .status()
            .expect("mount runs");
        assert!(
            status.success(),
            "mount a tmpfs at {} (the tests run as root)",
            at.display()
        );
        Tmpfs(at.to_path_buf())
    }

    /// Fill it with a file until the disk is full; returns the file.
    fn fill(&self) -> PathBuf {
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 16 * 1024];
        while f.write_all(&chunk).is_ok() {}
        // (Whatever fits of a last partial chunk was written too: nothing is left.)
        let _ = f.sync_all();
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The agent's results on the bus: seq → how many times.
fn audit(gw: &Gateway, fingerprint: &str) -> BTreeMap<u64, usize> {
    let mut seen = BTreeMap::new();
    for r in gw.bus_all(fingerprint) {
        *seen.entry(r["seq"].as_u64().unwrap()).or_insert(0) += 1;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateways_disk_full_under_its_bus_loses_nothing_and_doubles_nothing() {
    let dir = tempdir();
    // (Its data directory: the log is written beside it, so the test can read it.)
    let disk = Tmpfs::mount(&dir.path().join("gateway"), 8);
    let gw = Gateway::start(dir.path(), &[]);
    std::fs::write(
        gw.checks_dir.join("tick.toml"),
        // (Outputs of 3 KiB: each result takes a page of the tmpfs of its own, so the
        // slack of a page already given to the bus's file cannot hide a full disk.)
        format!(
            "[[check]]\nname = \"tick\"\ncommand = [\"/bin/echo\", \"OK - {}\"]\ninterval = \"1s\"\n",
            "x".repeat(3000)
        ),
    )
    .unwrap();
    // (Its reconnects back off to 5 s at most: the gateway turns it away while it cannot
    // store, and recovery is then bounded by that.)
    let agent = Agent::start(dir.path(), "a1", &gw, "reconnect_max_secs = 5\n");
    let fp = agent.fingerprint.clone();
    eventually(Duration::from_secs(30), "results on the bus", || async {
        (gw.bus_results(&fp, "tick").len() >= 3).then_some(())
    })
    .await;

    // The disk full: nothing more can be stored.
    let filler = disk.fill();
    let full_from = now_ms();
    let stored_when_full = audit(&gw, &fp).len();
    // The agent goes on running its checks (results keep their run time), and the
    // gateway stores nothing: what the bus holds stays as it was (a line being written
    // as the disk filled may still land).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let during = audit(&gw, &fp).len();
    assert!(
        during <= stored_when_full + 2,
        "nothing stored while the disk is full: {stored_when_full} then {during}"
    );
    let log = std::fs::read_to_string(dir.path().join("gateway.log")).unwrap();
    assert!(
        log.contains("embedded bus could not store results"),
        "the gateway says it cannot store"
    );
    let full_to = now_ms();

    // Space again: every result arrives, each once, with no gap in the agent's numbers.
    std::fs::remove_file(&filler).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let seen = loop {
        let seen = audit(&gw, &fp);
        let ran_while_full = gw
            .bus_results(&fp, "tick")
            .iter()
            .filter(|r| {
                let at = r["started_at_ms"].as_u64().unwrap();
                (full_from + 1000..full_to).contains(&at)
            })
            .count();
        if ran_while_full >= 3 {
            break seen;
        }
        if tokio::time::Instant::now() > deadline {
            // The log's warnings and errors, and its last lines.
            let tail = |p: PathBuf| {
                let t = std::fs::read_to_string(p).unwrap_or_default();
                let lines: Vec<&str> = t.lines().collect();
                let mut shown: Vec<&str> = lines
                    .iter()
                    .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("panicked"))
                    .take(30)
                    .copied()
                    .collect();
                shown.push("…");
                shown.extend(lines.iter().rev().take(15).rev());
                shown.join("\n")
            };
            panic!(
                "the results held back did not arrive ({} stored, {ran_while_full} run while full)\n\
                 gateway:\n{}\nagent:\n{}",
                seen.len(),
                tail(dir.path().join("gateway.log")),
                tail(dir.path().join("a1.log"))
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let highest = *seen.keys().last().unwrap();
    let doubled: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "results stored twice: {doubled:?}");
    let missing: Vec<u64> = (1..=highest).filter(|s| !seen.contains_key(s)).collect();
    assert!(
        missing.is_empty(),
        "results lost: {missing:?} of 1..={highest}"
    );
    drop(agent);
    drop(gw);
}

/// A log line that cannot be written must not take the thread that logged it down (the
/// logging library's own report of the failure is an `eprintln!`, which panics): with its
/// stderr on `/dev/full`, a gateway still welcomes an agent and stores its results.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_cannot_write_its_log_still_stores_results() {
    let dir = tempdir();
    let gw = Gateway::start_wrapped(
        dir.path(),
        "127.0.0.1:0",
        &["sh", "-c", "exec \"$0\" \"$@\" 2>/dev/full"],
        &[],
    );
    std::fs::write(
        gw.checks_dir.join("tick.toml"),
        "[[check]]\nname = \"tick\"\ncommand = [\"/bin/echo\", \"OK - tick\"]\ninterval = \"1s\"\n",
    )
    .unwrap();
    let agent = Agent::start(dir.path(), "a1", &gw, "");
    let fp = agent.fingerprint.clone();
    eventually(Duration::from_secs(30), "results stored", || async {
        (gw.bus_results(&fp, "tick").len() >= 5).then_some(())
    })
    .await;
}
