//! The event stream (`GET /api/v1/events`) against a real gateway and real agents on the
//! embedded bus: a client follows results and presence, is cut off, comes back with its
//! last id and misses nothing and gets nothing twice (every agent numbers its results one
//! by one, so the sequence numbers received must run on without a gap or a repeat); a
//! position the bus no longer has yields `reset`; filters; heartbeats; bad requests.
//! (Tenant isolation of the stream is in the isolation matrix, tests/tests/tenants.rs,
//! on both buses.)

use std::collections::BTreeMap;
use std::time::Duration;

use outpost_e2e::sse::{Event, Follower};
use outpost_e2e::*;

const T: Duration = Duration::from_secs(60);

const CHECKS: &str = r#"
[[check]]
name = "tick"
command = ["/bin/true"]
interval = 1

[[check]]
name = "tock"
command = ["/bin/false"]
interval = 1
"#;

/// Results received, by agent: their sequence numbers in the order received.
fn seqs(events: &[Event]) -> BTreeMap<String, Vec<u64>> {
    let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for e in events.iter().filter(|e| e.kind == "result") {
        out.entry(e.data["fingerprint"].as_str().unwrap().to_string())
            .or_default()
            .push(e.data["result"]["seq"].as_u64().unwrap());
    }
    out
}

async fn results_at_least(f: &Follower, n: usize) {
    let what = format!("{n} result events");
    eventually(T, &what, || async {
        (f.events().iter().filter(|e| e.kind == "result").count() >= n).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cut_off_resumes_with_its_last_id_missing_nothing_and_repeating_nothing() {
    let dir = tempdir();
    let gw = Gateway::start(dir.path(), &[]);
    gw.write_checks("checks.toml", CHECKS);
    let a1 = Agent::start(dir.path(), "web-1", &gw, "");

    // From now on: the first event is `hello`, naming where the stream starts.
    let first = Follower::start(&gw, "/api/v1/events", &gw.token, None).await;
    assert_eq!(first.status, 200);
    eventually(T, "hello", || async {
        first
            .events()
            .first()
            .filter(|e| e.kind == "hello")
            .cloned()
    })
    .await;
    // A second agent comes online while the stream is followed: a presence event.
    let a2 = Agent::start(dir.path(), "web-2", &gw, "");
    eventually(T, "web-2 online, as an event", || async {
        first
            .events()
            .iter()
            .find(|e| {
                e.kind == "presence"
                    && e.data["fingerprint"] == a2.fingerprint.as_str()
                    && e.data["presence"] == "online"
            })
            .cloned()
    })
    .await;
    results_at_least(&first, 10).await;
    let before = first.cut();
    let last = before.iter().rev().find_map(|e| e.id.clone()).unwrap();

    // Results go on while nobody follows.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let second = Follower::start(&gw, "/api/v1/events", &gw.token, Some(&last)).await;
    assert_eq!(second.status, 200);
    results_at_least(&second, 20).await;
    let after = second.cut();
    assert_eq!(after[0].kind, "hello");
    assert_eq!(
        after[0].id.as_deref(),
        Some(last.as_str()),
        "resumed where it was"
    );

    // Per agent, the sequence numbers of both halves together run on one by one.
    let mut all = before.clone();
    all.extend(after.iter().cloned());
    let by_agent = seqs(&all);
    assert_eq!(by_agent.len(), 2, "both agents' results: {by_agent:?}");
    for (fp, s) in &by_agent {
        let run: Vec<u64> = (s[0]..s[0] + s.len() as u64).collect();
        assert_eq!(
            s, &run,
            "agent {fp}: results missed or repeated across the reconnection"
        );
    }
    // The second half began where the first ended (not at the time of reconnection).
    let (b, a) = (seqs(&before), seqs(&after));
    let fp1 = a1.fingerprint.as_str();
    assert_eq!(
        a[fp1][0],
        b[fp1].last().unwrap() + 1,
        "the stream resumed after the last event seen"
    );
    // Every event has an id, and ids only grow in each feed.
    for pair in all.windows(2) {
        let parts = |e: &Event| -> (u64, u64) {
            let id = e.id.as_deref().unwrap();
            let (r, p) = id.split_once('-').unwrap();
            (r.parse().unwrap(), p.parse().unwrap())
        };
        let (x, y) = (parts(&pair[0]), parts(&pair[1]));
        assert!(y.0 >= x.0 && y.1 >= x.1, "ids went back: {x:?} then {y:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_no_longer_kept_is_a_reset_and_filters_and_heartbeats_hold() {
    let dir = tempdir();
    let gw = Gateway::start(dir.path(), &[]);
    gw.write_checks("checks.toml", CHECKS);
    let agent = Agent::start(dir.path(), "web-1", &gw, "");
    let fp = agent.fingerprint.clone();

    // A position beyond the bus (a bus since deleted and made again): reset, then events
    // from the oldest kept.
    let gone = format!("{}-0", 4000u64 << 32);
    let f = Follower::start(&gw, "/api/v1/events?types=result", &gw.token, Some(&gone)).await;
    assert_eq!(f.status, 200);
    results_at_least(&f, 1).await;
    let events = f.cut();
    assert_eq!(events[0].kind, "hello");
    assert_eq!(events[1].kind, "reset", "{events:?}");
    assert_eq!(events[1].data["feed"], "results");
    assert!(
        events[1].data["reason"]
            .as_str()
            .unwrap()
            .contains("no longer kept"),
        "{:?}",
        events[1].data
    );
    assert!(events[2..].iter().all(|e| e.kind == "result"));

    // Filters: the failing check only, non-OK only.
    let f = Follower::start(
        &gw,
        "/api/v1/events?types=result&check=to*&problems=true",
        &gw.token,
        Some("0-0"),
    )
    .await;
    results_at_least(&f, 3).await;
    let events = f.cut();
    for e in events.iter().filter(|e| e.kind == "result") {
        assert_eq!(e.data["result"]["check"], "tock", "{:?}", e.data);
        assert_ne!(e.data["result"]["status"], "ok");
        assert_eq!(e.data["fingerprint"], fp.as_str());
        assert_eq!(e.data["hostname"], "web-1");
    }
    // An agent filter naming nobody: no results at all, and heartbeats keep it alive.
    let f = Follower::start(
        &gw,
        "/api/v1/events?agent=nobody&heartbeat=1",
        &gw.token,
        Some("0-0"),
    )
    .await;
    eventually(T, "two heartbeat comments", || async {
        (f.comments() >= 2).then_some(())
    })
    .await;
    let events = f.cut();
    assert!(
        events.iter().all(|e| e.kind == "hello"),
        "nothing but hello: {events:?}"
    );

    // Bad requests say what to fix.
    for (path, last, want) in [
        ("/api/v1/events?types=alerts", None, "unknown event type"),
        ("/api/v1/events?heartbeat=0", None, "out of range"),
        ("/api/v1/events?label=role", None, "key=value"),
        ("/api/v1/events?colour=red", None, "bad query"),
        ("/api/v1/events", Some("yesterday"), "Last-Event-ID"),
    ] {
        let f = Follower::start(&gw, path, &gw.token, last).await;
        assert_eq!(f.status, 400, "{path}");
        eventually(T, "the error body", || async {
            f.events()
                .iter()
                .find(|e| e.data.to_string().contains(want))
                .cloned()
        })
        .await;
    }
    // No token, no stream.
    let f = Follower::start(&gw, "/api/v1/events", "wrong", None).await;
    assert_eq!(f.status, 401);
}
