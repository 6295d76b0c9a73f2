//! The event stream (`GET /api/v1/events`) against a real gateway and real agents on the
//! embedded bus: a client follows results and presence, is cut off, comes back with its
//! last id and misses nothing and gets nothing twice (every agent numbers its results one
//! by one, so the sequence numbers received must run on without a gap or a repeat); a
//! position the bus no longer has yields `reset`; filters; heartbeats; bad requests.
//! (Tenant isolation of the stream is in the isolation matrix, tests/tests/tenants.rs,
//! on both buses.)

use std::collections::BTreeMap;
use std::time::Duration;

use outpost_e2e::fleet::{agent, gateways, pki, write_config};
use outpost_e2e::nats::{config_push, NatsServer};
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
        let (x, y) = (
            positions(pair[0].id.as_deref().unwrap()),
            positions(pair[1].id.as_deref().unwrap()),
        );
        assert!(
            y.0 >= x.0 && y.1 >= x.1 && y.2 >= x.2,
            "ids went back: {x:?} then {y:?}"
        );
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
    let gone = format!("{}-0-0", 4000u64 << 32);
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
        Some("0-0-0"),
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
        Some("0-0-0"),
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
        ("/api/v1/events?types=results", None, "unknown event type"),
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

/// What JetStream's `stream` holds on `filter` from sequence `from` up to (not including)
/// `to`, read with a consumer of the test's own: each message's body.
async fn on_the_bus(nats: &str, stream: &str, filter: &str, from: u64, to: u64) -> Vec<Value> {
    use async_nats::jetstream::consumer::{pull, DeliverPolicy};
    use futures_util::StreamExt;
    let js = async_nats::jetstream::new(async_nats::connect(nats).await.unwrap());
    let stream = js.get_stream(stream).await.unwrap();
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: filter.to_string(),
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: from.max(1),
            },
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut out = Vec::new();
    if to <= from.max(1) {
        return out;
    }
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(10), messages.next()).await
    {
        let seq = m.info().unwrap().stream_sequence;
        if seq >= to {
            break;
        }
        out.push(serde_json::from_slice(&m.payload).unwrap());
        if seq + 1 == to {
            break;
        }
    }
    out
}

/// The (results, presence, alerts) positions of an event id.
fn positions(id: &str) -> (u64, u64, u64) {
    let p: Vec<u64> = id.split('-').map(|n| n.parse().unwrap()).collect();
    (p[0], p[1], p[2])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_fleet_a_client_cut_off_from_one_gateway_resumes_on_another_exactly_as_the_bus_holds_it(
) {
    let dir = tempdir();
    let nats = NatsServer::start(dir.path(), "n1");
    let url = nats.url();
    // The failing check fires an alert (its receiver is nowhere: it stays pending, and
    // the holder of the tenant's alerting publishes its changes).
    let alerting = format!(
        "{CHECKS}\n[[receiver]]\nname = \"nowhere\"\nwebhook = {{ url = \"http://127.0.0.1:9/\" }}\n\n\
         [[route]]\nchecks = [\"tock\"]\nreceivers = [\"nowhere\"]\n"
    );
    config_push(
        &url,
        &write_config(dir.path(), &[("checks.toml", &alerting)]),
        &[],
    );
    let pki = pki(dir.path());
    let gws = gateways(dir.path(), 2, &url, &pki);
    let (key, token) = (gws[0].enroll_key.clone(), gws[0].token.clone());
    let _a1 = agent(dir.path(), "web-1", &gws[0].addr, &pki, &key);

    // Followed through gateway 1, from now on.
    let first = Follower::start(&gws[0], "/api/v1/events", &token, None).await;
    assert_eq!(first.status, 200);
    // An agent of gateway 2 comes online meanwhile.
    let a2 = agent(dir.path(), "web-2", &gws[1].addr, &pki, &key);
    eventually(T, "web-2 online, as an event through gateway 1", || async {
        first
            .events()
            .iter()
            .find(|e| e.kind == "presence" && e.data["fingerprint"] == a2.fingerprint.as_str())
            .cloned()
    })
    .await;
    results_at_least(&first, 10).await;
    let before = first.cut();
    let last = before.iter().rev().find_map(|e| e.id.clone()).unwrap();

    // Cut off; results go on; back through gateway 2.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let second = Follower::start(&gws[1], "/api/v1/events", &token, Some(&last)).await;
    assert_eq!(second.status, 200);
    results_at_least(&second, 20).await;
    eventually(T, "an alert event", || async {
        let seen = |e: &Event| e.kind == "alert";
        (before.iter().any(seen) || second.events().iter().any(seen)).then_some(())
    })
    .await;
    let after = second.cut();
    assert_eq!(after[0].id.as_deref(), Some(last.as_str()));

    // Both halves together are what the bus holds between the first id and the last, in
    // its order: no event missed, none twice.
    let start = positions(before[0].id.as_deref().unwrap());
    let end = positions(&after.iter().rev().find_map(|e| e.id.clone()).unwrap());
    let all: Vec<&Event> = before.iter().chain(after.iter()).collect();
    let got: Vec<(String, u64)> = all
        .iter()
        .filter(|e| e.kind == "result")
        .map(|e| {
            (
                e.data["fingerprint"].as_str().unwrap().to_string(),
                e.data["result"]["seq"].as_u64().unwrap(),
            )
        })
        .collect();
    let held: Vec<(String, u64)> = on_the_bus(
        &url,
        "OUTPOST_RESULTS",
        "outpost.default.results.>",
        start.0,
        end.0,
    )
    .await
    .iter()
    .map(|v| {
        (
            v["fingerprint"].as_str().unwrap().to_string(),
            v["result"]["seq"].as_u64().unwrap(),
        )
    })
    .collect();
    assert!(got.len() >= 30, "{} results", got.len());
    assert_eq!(
        got, held,
        "the results streamed are the bus's, in its order"
    );
    let got: Vec<(String, String)> = all
        .iter()
        .filter(|e| e.kind == "presence")
        .map(|e| {
            (
                e.data["fingerprint"].to_string(),
                e.data["presence"].to_string(),
            )
        })
        .collect();
    let held: Vec<(String, String)> = on_the_bus(
        &url,
        "OUTPOST_PRESENCE",
        "outpost.default.presence.*",
        start.1,
        end.1,
    )
    .await
    .iter()
    .map(|v| (v["fingerprint"].to_string(), v["presence"].to_string()))
    .collect();
    assert!(!got.is_empty());
    assert_eq!(got, held, "the presence events streamed are the bus's");
    let got: Vec<(String, String, String)> = all
        .iter()
        .filter(|e| ["alert", "silence", "sync"].contains(&e.kind.as_str()))
        .map(|e| {
            (
                e.data["fingerprint"].to_string(),
                e.data["check"].to_string(),
                e.data["state"].to_string(),
            )
        })
        .collect();
    let held: Vec<(String, String, String)> = on_the_bus(
        &url,
        "OUTPOST_ALERT_EVENTS",
        "outpost.default.alerts.events",
        start.2,
        end.2,
    )
    .await
    .iter()
    .map(|v| {
        (
            v["fingerprint"].to_string(),
            v["check"].to_string(),
            v["state"].to_string(),
        )
    })
    .collect();
    assert!(!got.is_empty());
    assert_eq!(got, held, "the alert changes streamed are the bus's");
}

/// A TLS connection to `gw` whose receive buffer is small (4 KiB), so a client that does
/// not read makes the gateway wait after a few events, not after megabytes.
async fn small_window(gw: &Gateway) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let config =
        outpost_agent::tls::client_config(&outpost_agent::settings::Trust::Pin(gw.pin.clone()))
            .unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(gw.addr.parse().unwrap()).await.unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_too_slow_is_ended_with_a_reason_while_others_and_the_agents_go_on() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempdir();
    let gw = Gateway::start(
        dir.path(),
        &["--events-buffer", "8", "--events-stall-secs", "2"],
    );
    // Results of 3 KB each, so that megabytes of them (enough to fill every buffer between
    // the gateway and a client that stops reading) pile up in seconds.
    let checks: String = (0..20)
        .map(|i| {
            format!(
                "[[check]]\nname = \"c{i:02}\"\ncommand = [\"/usr/bin/printf\", \"%03000d\", \"0\"]\ninterval = 1\n\n"
            )
        })
        .collect();
    gw.write_checks("checks.toml", &checks);
    let _agents: Vec<Agent> = (0..3)
        .map(|i| Agent::start(dir.path(), &format!("web-{i}"), &gw, ""))
        .collect();
    // History enough to fill a small window and the buffer many times over.
    eventually(T, "2000 results on the bus", || async {
        (gw.metric("outpost_results_accepted_total ").await >= 2000).then_some(())
    })
    .await;

    // A client that asks for everything kept and then reads nothing for a while.
    let mut slow = small_window(&gw).await;
    let request = format!(
        "GET /api/v1/events?types=result HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {}\r\nlast-event-id: 0-0-0\r\n\r\n",
        gw.token
    );
    slow.write_all(request.as_bytes()).await.unwrap();
    // A client that keeps up, from now on.
    let normal = Follower::start(&gw, "/api/v1/events?types=result", &gw.token, None).await;
    let accepted = gw.metric("outpost_results_accepted_total ").await;
    eventually(T, "the slow client ended as too slow", || async {
        (gw.metric("outpost_event_streams_too_slow_total ").await == 1).then_some(())
    })
    .await;
    // Meanwhile the other client and the agents went on.
    let seen = normal.events().len();
    eventually(
        T,
        "more results for the normal client, and on the bus",
        || async {
            (normal.events().len() > seen + 20
                && gw.metric("outpost_results_accepted_total ").await > accepted + 20)
                .then_some(())
        },
    )
    .await;
    assert!(!normal.ended(), "the normal client's stream goes on");

    // The slow client reads at last: what was waiting, then the reason, then the end.
    let mut text = String::new();
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = std::time::Instant::now() + T;
    while !text.contains("\r\n0\r\n\r\n") && std::time::Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(10), slow.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => text.push_str(&String::from_utf8_lossy(&buf[..n])),
        }
    }
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "{}",
        &text[..text.len().min(300)]
    );
    let error = text.find("event: error").unwrap_or_else(|| {
        panic!(
            "no error event; the end: {}",
            &text[text.len().saturating_sub(500)..]
        )
    });
    assert!(text[error..].contains("too slow"), "{}", &text[error..]);
    assert!(
        text.ends_with("\r\n0\r\n\r\n"),
        "the stream ends after the reason: {}",
        &text[text.len().saturating_sub(300)..]
    );
    assert!(text[..error].contains("event: result"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ends_when_its_token_is_revoked_and_filters_pick_agents_and_feeds() {
    let dir = tempdir();
    let gw = Gateway::start(dir.path(), &[]);
    gw.write_checks("checks.toml", CHECKS);
    let a1 = Agent::start(dir.path(), "web-1", &gw, "");
    let a2 = Agent::start(dir.path(), "web-2", &gw, "");

    // One agent's events only, from the oldest kept.
    let path = format!("/api/v1/events?agent={}", a2.fingerprint);
    let f = Follower::start(&gw, &path, &gw.token, Some("0-0-0")).await;
    results_at_least(&f, 5).await;
    let events = f.cut();
    assert!(events
        .iter()
        .filter(|e| e.kind == "result" || e.kind == "presence")
        .all(|e| e.data["fingerprint"] == a2.fingerprint.as_str()));
    assert!(events.iter().any(|e| e.kind == "presence"), "{events:?}");
    // Presence only: web-1 stopping is told, and no result is.
    let f = Follower::start(&gw, "/api/v1/events?types=presence", &gw.token, None).await;
    eventually(T, "hello", || async {
        f.events().first().filter(|e| e.kind == "hello").cloned()
    })
    .await;
    let fp1 = a1.fingerprint.clone();
    let mut a1 = a1;
    a1.proc.signal(libc::SIGTERM);
    a1.proc.wait_exit(T).await;
    eventually(T, "web-1 deregistered, as an event", || async {
        f.events()
            .iter()
            .find(|e| e.data["fingerprint"] == fp1.as_str() && e.data["presence"] == "deregistered")
            .cloned()
    })
    .await;
    assert!(f.cut().iter().all(|e| e.kind != "result"));

    // A read token's stream ends once the token is revoked.
    let (status, made) = gw
        .http_json(
            "POST",
            "/api/v1/tokens",
            Some(&gw.token),
            Some(&serde_json::json!({"role": "read", "name": "dashboard"})),
        )
        .await;
    assert_eq!(status, 201, "{made}");
    let token = made["api_token"].as_str().unwrap();
    let f = Follower::start(&gw, "/api/v1/events", token, None).await;
    assert_eq!(f.status, 200);
    results_at_least(&f, 2).await;
    let (status, body) = gw
        .http(
            "POST",
            &format!("/api/v1/tokens/{}/revoke", made["id"].as_str().unwrap()),
            Some(&gw.token),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    eventually(T, "the stream ended, saying why", || async {
        f.ended().then(|| f.events().last().cloned()).flatten()
    })
    .await;
    let last = f.events().last().cloned().unwrap();
    assert_eq!(last.kind, "error", "{last:?}");
    assert!(
        last.data["error"]
            .as_str()
            .unwrap()
            .contains("no longer allowed"),
        "{last:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_and_silences_change_on_the_stream_as_the_api_shows_them() {
    use outpost_e2e::flip::{flip_plugin, set_state};
    use outpost_e2e::receivers::{signed_hook, SECRET};
    let dir = tempdir();
    let plugin = flip_plugin(dir.path());
    let hook = signed_hook(dir.path()).await;
    let gw = Gateway::start(dir.path(), &[]);
    gw.write_checks(
        "flip.toml",
        &format!(
            r#"
[[check]]
name = "flip"
command = [{plugin:?}]
interval = 1

[[receiver]]
name = "hook"
webhook = {{ url = "{url}", secret = "{SECRET}" }}

[[route]]
checks = ["flip"]
receivers = ["hook"]
"#,
            url = hook.url()
        ),
    );
    let agent = Agent::start(dir.path(), "web-1", &gw, "");
    let fp = agent.fingerprint.clone();
    let f = Follower::start(&gw, "/api/v1/events?types=alert,silence", &gw.token, None).await;
    assert_eq!(f.status, 200);
    let alert_in = |state: &'static str| {
        let f = &f;
        let fp = fp.clone();
        move || {
            let fp = fp.clone();
            async move {
                f.events()
                    .iter()
                    .find(|e| {
                        e.kind == "alert"
                            && e.data["fingerprint"] == fp.as_str()
                            && e.data["check"] == "flip"
                            && e.data["state"] == state
                    })
                    .cloned()
            }
        }
    };

    // CRITICAL: the alert fires and is told, as the API lists it.
    set_state(dir.path(), 2);
    let firing = eventually(T, "the alert firing, on the stream", alert_in("firing")).await;
    assert_eq!(firing.data["status"], "critical", "{:?}", firing.data);
    let listed = gw.api("/alerts").await;
    assert!(
        listed
            .to_string()
            .contains(firing.data["why"].as_str().unwrap()),
        "the stream's alert is the API's: {listed}"
    );

    // A silence made through the API is on the stream, and silences the alert.
    let (status, silence) = gw
        .http_json(
            "POST",
            "/api/v1/silences",
            Some(&gw.token),
            Some(&serde_json::json!({
                "matchers": {"checks": ["flip"]},
                "ends_at": "1h",
                "creator": "ops",
                "comment": "maintenance",
            })),
        )
        .await;
    assert_eq!(status, 201, "{silence}");
    let id = silence["id"].as_str().unwrap().to_string();
    eventually(T, "the silence, on the stream", || async {
        f.events()
            .iter()
            .find(|e| e.kind == "silence" && e.data["id"] == id.as_str())
            .cloned()
    })
    .await;
    eventually(T, "the alert silenced, on the stream", alert_in("silenced")).await;
    // Nothing but alerts and silences on this stream.
    assert!(f
        .events()
        .iter()
        .all(|e| ["hello", "alert", "silence", "sync"].contains(&e.kind.as_str())));
    let last = f.cut().iter().rev().find_map(|e| e.id.clone()).unwrap();

    // The gateway restarted: its evaluator's new life tells the whole set between `sync`
    // marks, and the client resumed with its last id reads it.
    let addr = gw.addr.clone();
    drop(gw);
    let gw = Gateway::start_on(dir.path(), &addr, &[]);
    let f = Follower::start(
        &gw,
        "/api/v1/events?types=alert,silence",
        &gw.token,
        Some(&last),
    )
    .await;
    let synced = eventually(T, "a whole set between sync marks", || async {
        let events = f.events();
        let begin = events
            .iter()
            .position(|e| e.kind == "sync" && e.data["state"] == "begin")?;
        let end = events
            .iter()
            .position(|e| e.kind == "sync" && e.data["state"] == "end")?;
        (end > begin).then(|| events[begin + 1..end].to_vec())
    })
    .await;
    assert!(
        synced.iter().any(|e| e.kind == "alert"
            && e.data["check"] == "flip"
            && e.data["state"] == "silenced"),
        "{synced:?}"
    );
    assert!(
        synced
            .iter()
            .any(|e| e.kind == "silence" && e.data["id"] == id.as_str()),
        "{synced:?}"
    );

    // OK again: the alert is gone from the API and `ok` on the stream.
    set_state(dir.path(), 0);
    eventually(T, "the alert ok, on the stream", || async {
        f.events()
            .iter()
            .find(|e| e.kind == "alert" && e.data["check"] == "flip" && e.data["state"] == "ok")
            .cloned()
    })
    .await;
}
