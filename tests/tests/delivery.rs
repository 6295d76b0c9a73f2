//! Every result reaches the bus exactly once whatever happens to the link or the gateway:
//! a kill -9 of the gateway mid-stream, an outage that outlasts the outbox, a gateway that
//! drains, refuses for overload, or freezes, and sessions that rotate. Checks keep running
//! through all of it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use outpost_e2e::*;

const T: Duration = Duration::from_secs(40);

fn seq(r: &Value) -> u64 {
    r["seq"].as_u64().unwrap()
}

fn started(r: &Value) -> u64 {
    r["started_at_ms"].as_u64().unwrap()
}

/// `n` checks named `c0..`, each running `command` every second.
fn checks(n: usize, command: &str) -> String {
    (0..n)
        .map(|i| format!("[[check]]\nname = \"c{i}\"\ncommand = {command:?}\ninterval = 1\n\n"))
        .collect()
}

/// Sequence numbers on the bus: no number twice, and each check's results in the order it
/// ran them. Returns the numbers, sorted.
fn exactly_once_in_order(all: &[Value]) -> Vec<u64> {
    let mut seen = BTreeSet::new();
    for r in all {
        assert!(seen.insert(seq(r)), "seq {} on the bus twice", seq(r));
    }
    let mut per_check: BTreeMap<&str, Vec<&Value>> = BTreeMap::new();
    for r in all {
        per_check
            .entry(r["check"].as_str().unwrap())
            .or_default()
            .push(r);
    }
    for (check, mut rs) in per_check {
        rs.sort_by_key(|r| seq(r));
        assert!(
            rs.windows(2).all(|w| started(w[0]) <= started(w[1])),
            "{check}: results out of order"
        );
    }
    seen.into_iter().collect()
}

/// The gaps in sorted sequence numbers, as (first missing, how many).
fn gaps(seqs: &[u64]) -> Vec<(u64, u64)> {
    seqs.windows(2)
        .filter(|w| w[1] != w[0] + 1)
        .map(|w| (w[0] + 1, w[1] - w[0] - 1))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_gateway_mid_stream_loses_and_duplicates_nothing() {
    let dir = tempdir();
    let mut gw = Gateway::start(dir.path(), &["--heartbeat", "1"]);
    gw.write_checks("c.toml", &checks(40, "/bin/echo streaming"));
    let agent = Agent::start(dir.path(), "streamer", &gw, "reconnect_max_secs = 1\n");
    let fp = agent.fingerprint.clone();
    eventually(T, "a stream of results", || async {
        (gw.bus_all(&fp).len() >= 120).then_some(())
    })
    .await;

    // Mid-stream: 40 results a second, batches in flight.
    let listen = gw.addr.clone();
    gw.proc.signal(libc::SIGKILL);
    gw.proc.wait_exit(Duration::from_secs(10)).await;
    let killed = now_ms();
    drop(gw);
    let ran = agent.proc.log().matches("check ran").count();
    eventually(
        T,
        "checks keep running while the gateway is gone",
        || async { (agent.proc.log().matches("check ran").count() >= ran + 80).then_some(()) },
    )
    .await;
    let gw = Gateway::start_on(dir.path(), &listen, &["--heartbeat", "1"]);
    let restarted = now_ms();
    let all = eventually(T, "the outage's results and new ones", || async {
        let all = gw.bus_all(&fp);
        let during = all
            .iter()
            .filter(|r| (killed..restarted).contains(&started(r)))
            .count();
        let after = all.iter().filter(|r| started(r) > restarted + 1000).count();
        (during >= 80 && after >= 40).then_some(all)
    })
    .await;
    let seqs = exactly_once_in_order(&all);
    assert_eq!(gaps(&seqs), [], "a result went missing");
    assert!(
        agent.proc.log().contains("gateway connection ended"),
        "the agent saw the break"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_agent_mid_send_loses_and_duplicates_nothing() {
    let dir = tempdir();
    let gw = Gateway::start(dir.path(), &[]);
    gw.write_checks("c.toml", &checks(40, "/bin/echo sending"));
    let mut agent = Agent::start(dir.path(), "sender", &gw, "reconnect_max_secs = 1\n");
    let fp = agent.fingerprint.clone();
    eventually(T, "a stream of results", || async {
        (gw.bus_all(&fp).len() >= 120).then_some(())
    })
    .await;
    agent.proc.signal(libc::SIGKILL);
    agent.proc.wait_exit(Duration::from_secs(10)).await;
    let state_dir = agent.state_dir.clone();
    drop(agent);
    // What the agent had on disk, not yet acked, when it died.
    let unacked: Vec<u64> = {
        let (o, moved) = outpost_agent::outbox::DiskOutbox::open(&state_dir, 100_000_000).unwrap();
        assert_eq!(moved, None, "a kill -9 leaves a readable outbox");
        use outpost_agent::outbox::Outbox;
        o.pending_after(0, usize::MAX)
            .iter()
            .map(|r| r.seq)
            .collect()
    };
    eprintln!("{} results on disk unacked at the kill", unacked.len());

    let agent = Agent::start(dir.path(), "sender", &gw, "reconnect_max_secs = 1\n");
    assert_eq!(agent.fingerprint, fp);
    let restarted = now_ms();
    let all = eventually(T, "results after the restart", || async {
        let all = gw.bus_all(&fp);
        (all.iter().filter(|r| started(r) > restarted).count() >= 80).then_some(all)
    })
    .await;
    let seqs = exactly_once_in_order(&all);
    for s in &unacked {
        assert!(
            seqs.binary_search(s).is_ok(),
            "result {s} was on disk and never arrived"
        );
    }
    // The only numbers missing are where the restarted agent began a new block: results
    // that never reached the disk before the kill, and numbers never handed out.
    let g = gaps(&seqs);
    assert!(g.len() <= 1, "{g:?}");
    if let Some((first, _)) = g.first() {
        assert!(unacked.iter().all(|s| s < first), "{g:?} {unacked:?}");
        let after = all.iter().find(|r| seq(r) > *first).unwrap();
        assert!(
            started(after) >= restarted - 1000,
            "the gap is at the restart"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_the_outbox_drops_the_oldest_and_says_how_many() {
    let dir = tempdir();
    let mut gw = Gateway::start(dir.path(), &[]);
    // About 3 KB a result, 30 a second: the 1 MB outbox fills in about 11 s.
    gw.write_checks("c.toml", &checks(30, "/usr/bin/printf %03000d 7"));
    let agent = Agent::start(
        dir.path(),
        "overflow",
        &gw,
        "reconnect_max_secs = 1\noutbox_max_mb = 1\n",
    );
    let fp = agent.fingerprint.clone();
    eventually(T, "results flowing", || async {
        (gw.bus_all(&fp).len() >= 30).then_some(())
    })
    .await;

    // A gateway that stops on SIGTERM tells its agents to come back later.
    let listen = gw.addr.clone();
    gw.proc.signal(libc::SIGTERM);
    assert_eq!(gw.proc.wait_exit(Duration::from_secs(20)).await, Some(0));
    drop(gw);
    agent
        .proc
        .wait_for_log("asked this agent to come back later", T)
        .await;
    agent
        .proc
        .wait_for_log(
            "outbox full; dropped the oldest results",
            Duration::from_secs(60),
        )
        .await;
    // Sessions rotate every few seconds, so the agent reports again: results it had to drop
    // after its first report was queued (the outbox stays full until the first acks free
    // room, and the report itself takes room) are counted in the next one, and a session
    // with nothing new dropped reports OK.
    let gw = Gateway::start_on(dir.path(), &listen, &["--max-session", "3"]);
    let is_report = |r: &Value| r["check"] == "outpost.outbox";
    let all = eventually(
        Duration::from_secs(60),
        "an OK report after the drops",
        || async {
            let all = gw.bus_all(&fp);
            all.iter()
                .any(|r| is_report(r) && r["status"] == "ok")
                .then_some(all)
        },
    )
    .await;
    let ok_seq = all
        .iter()
        .filter(|r| is_report(r) && r["status"] == "ok")
        .map(seq)
        .min()
        .unwrap();
    let reports: Vec<&Value> = all
        .iter()
        .filter(|r| is_report(r) && r["status"] == "warning" && seq(r) < ok_seq)
        .collect();
    assert!(!reports.is_empty(), "no drop report before the OK one");
    let dropped: u64 = reports
        .iter()
        .map(|r| {
            let text = r["output"].as_str().unwrap();
            text.split(": ")
                .nth(1)
                .and_then(|t| t.split(' ').next())
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no count in {text:?}"))
        })
        .sum();
    assert!(dropped > 0, "{reports:?}");

    // Everything queued was delivered except the oldest `dropped`, which form one gap.
    let seqs = exactly_once_in_order(&all);
    assert_eq!(
        gaps(&seqs).iter().map(|g| g.1).sum::<u64>(),
        dropped,
        "the count is exact (gaps {:?}, reports: {:?})",
        gaps(&seqs),
        reports
            .iter()
            .map(|r| (seq(r), r["output"].as_str().unwrap_or_default()))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        gaps(&seqs).len(),
        1,
        "only the oldest went: {:?}",
        gaps(&seqs)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_rotate_without_the_agent_ever_looking_lost() {
    let dir = tempdir();
    let gw = Gateway::start(dir.path(), &["--max-session", "2"]);
    gw.write_checks("c.toml", &checks(5, "/bin/echo rotating"));
    let agent = Agent::start(dir.path(), "rotor", &gw, "");
    let fp = agent.fingerprint.clone();
    eventually(T, "online", || async {
        gw.agent(&fp).await.filter(|a| a["presence"] == "online")
    })
    .await;
    // Sessions last 1 to 2 s: four new ones come in about 6 to 9 s, more on a busy machine.
    let connections = gw.metric("outpost_connections_total").await;
    let until = std::time::Instant::now() + T;
    let mut rotations = 0;
    while rotations < 4 {
        let a = gw.agent(&fp).await.unwrap();
        assert_eq!(a["presence"], "online", "{a}");
        assert!(
            std::time::Instant::now() < until,
            "{rotations} new sessions in {T:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        rotations = gw.metric("outpost_connections_total").await - connections;
    }
    let seqs = exactly_once_in_order(&gw.bus_all(&fp));
    assert_eq!(gaps(&seqs), []);
    // Nor on the bus, where a lost moment between two polls would still show.
    let mine: Vec<Value> = gw
        .bus_log("presence")
        .into_iter()
        .filter(|e| e["fingerprint"] == fp.as_str())
        .collect();
    // One event: it came online once and stayed so through every rotation.
    assert_eq!(mine.len(), 1, "{mine:#?}");
    assert_eq!(mine[0]["presence"], "online", "{mine:#?}");
    assert!(agent.proc.log().contains("opening the next one"));
    assert!(!agent.proc.log().contains("gateway connection ended"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overloaded_gateway_sends_agents_away_for_as_long_as_it_asks() {
    let dir = tempdir();
    let gw = Gateway::start(dir.path(), &["--max-agents", "1", "--overload-retry", "4"]);
    let mut first = Agent::start(dir.path(), "first", &gw, "");
    eventually(T, "first online", || gw.agent(&first.fingerprint)).await;
    let second = Agent::start(dir.path(), "second", &gw, "reconnect_max_secs = 1\n");
    second
        .proc
        .wait_for_log("asked this agent to come back later", T)
        .await;
    let refused = gw.metric("outpost_overload_refusals_total").await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    // Retrying at its own 1 s backoff it would have come 6 or more times; asked to wait
    // 2-4 s it comes at most 3 times.
    let again = gw.metric("outpost_overload_refusals_total").await - refused;
    assert!(again <= 3, "{again} refusals in 6 s");
    first.proc.signal(libc::SIGTERM);
    first.proc.wait_exit(T).await;
    eventually(T, "second online once there is room", || async {
        gw.agent(&second.fingerprint)
            .await
            .filter(|a| a["presence"] == "online")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_gateway_is_noticed_and_nothing_is_lost() {
    let dir = tempdir();
    let gw = Gateway::start(dir.path(), &["--heartbeat", "1"]);
    gw.write_checks("c.toml", &checks(5, "/bin/echo frozen"));
    let agent = Agent::start(dir.path(), "patient", &gw, "reconnect_max_secs = 1\n");
    let fp = agent.fingerprint.clone();
    eventually(T, "results", || async {
        (gw.bus_all(&fp).len() >= 10).then_some(())
    })
    .await;
    // A half-open link: the gateway's process is there, its socket open, nothing answers.
    gw.proc.signal(libc::SIGSTOP);
    let stopped = std::time::Instant::now();
    agent
        .proc
        .wait_for_log("nothing heard from the gateway", Duration::from_secs(15))
        .await;
    let noticed = stopped.elapsed();
    // Three 1 s heartbeats, checked on the heartbeat: at most about 5 s.
    assert!(
        noticed < Duration::from_secs(8),
        "noticed after {noticed:?}"
    );
    gw.proc.signal(libc::SIGCONT);
    let resumed = now_ms();
    let all = eventually(T, "results after the freeze", || async {
        let all = gw.bus_all(&fp);
        (all.iter().filter(|r| started(r) > resumed + 1000).count() >= 5).then_some(all)
    })
    .await;
    let seqs = exactly_once_in_order(&all);
    assert_eq!(gaps(&seqs), []);
}

/// `--results-max-bytes` bounds the embedded bus's files: the oldest results go, what is
/// kept is the newest as an unbroken run, and across a restart the gateway still knows
/// where each agent is and stores nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_size_cap_keeps_the_bus_files_bounded_and_the_newest_results() {
    let dir = tempdir();
    let cap: u64 = 128 * 1024;
    let args = ["--results-max-bytes", "131072"];
    let mut gw = Gateway::start(dir.path(), &args);
    gw.write_checks("c.toml", &checks(150, "/bin/echo filling the bus"));
    let agent = Agent::start(dir.path(), "filler", &gw, "reconnect_max_secs = 1\n");
    let fp = agent.fingerprint.clone();
    let on_disk = |gw: &Gateway| -> u64 {
        outpost_gateway::bus::segments::paths(&gw.data_dir.join("bus"), "results")
            .unwrap()
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    };
    // Three caps' worth and more (a stored line is well over 250 bytes).
    let newest = |gw: &Gateway| gw.bus_all(&fp).last().map_or(0, seq);
    eventually(T, "results beyond three times the cap", || async {
        (newest(&gw) >= 1600).then_some(())
    })
    .await;
    let kept = exactly_once_in_order(&gw.bus_all(&fp));
    assert!(kept[0] > 1, "nothing was deleted: {} bytes", on_disk(&gw));
    assert_eq!(gaps(&kept), [], "what is kept is not one unbroken run");
    assert!(
        on_disk(&gw) <= cap + cap / 2,
        "{} bytes on disk with a cap of {cap}",
        on_disk(&gw)
    );

    let listen = gw.addr.clone();
    gw.proc.signal(libc::SIGKILL);
    gw.proc.wait_exit(Duration::from_secs(10)).await;
    drop(gw);
    let gw = Gateway::start_on(dir.path(), &listen, &args);
    let restarted_at = newest(&gw);
    eventually(T, "results after the restart", || async {
        (newest(&gw) >= restarted_at + 600).then_some(())
    })
    .await;
    let kept = exactly_once_in_order(&gw.bus_all(&fp));
    assert!(kept[0] > 1);
    assert_eq!(gaps(&kept), [], "a result went missing or the run broke");
    assert!(on_disk(&gw) <= cap + cap / 2, "{} bytes", on_disk(&gw));
    // The console's view was rebuilt from what was kept.
    assert!(gw.latest(&fp, "c0").await.is_some());
}
