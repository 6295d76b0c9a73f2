//! The fleet harness itself, with real processes: a JetStream server, a three-node
//! JetStream cluster losing a node to SIGKILL, and the documented haproxy configuration
//! in front of two real gateways, one of which dies; and a gateway restarted on a port
//! that something else holds for a moment.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use outpost_e2e::haproxy::{self, Haproxy};
use outpost_e2e::nats::{NatsCluster, NatsServer};
use outpost_e2e::{eventually, tempdir, test_pki, Gateway};

fn headers_with_id(id: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", id);
    headers
}

#[tokio::test]
async fn nats_server_stores_a_message_published_twice_with_one_id_once() {
    let dir = tempdir();
    let mut server = NatsServer::start(dir.path(), "nats");
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client);
    js.create_stream(stream::Config {
        name: "RESULTS".into(),
        subjects: vec!["results.>".into()],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .unwrap();

    let mut acks = Vec::new();
    for _ in 0..2 {
        let ack = js
            .publish_with_headers("results.a", headers_with_id("result-1"), "up".into())
            .await
            .unwrap()
            .await
            .unwrap();
        acks.push((ack.sequence, ack.duplicate));
    }
    assert_eq!(
        acks,
        [(1, false), (1, true)],
        "the second publish is a duplicate"
    );
    let mut results = js.get_stream("RESULTS").await.unwrap();
    assert_eq!(results.info().await.unwrap().state.messages, 1);

    // A restart keeps the ports and the store: the same URL finds the same message.
    let pid = server.pid();
    server.restart();
    assert_ne!(server.pid(), pid);
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client);
    let message = js
        .get_stream("RESULTS")
        .await
        .unwrap()
        .get_raw_message(1)
        .await
        .unwrap();
    assert_eq!(&message.payload[..], b"up");
    assert!(server.log().contains("Server is ready"));
}

/// Publish `id` until JetStream acks it; the same `Nats-Msg-Id` on every try, so a try
/// whose ack was lost is not stored twice. Returns the sequence.
async fn publish_acked(js: &jetstream::Context, id: &str) -> u64 {
    eventually(
        Duration::from_secs(30),
        &format!("an ack for {id}"),
        || async {
            let ack = js
                .publish_with_headers("results.r3", headers_with_id(id), id.to_string().into())
                .await
                .ok()?
                .await
                .ok()?;
            Some(ack.sequence)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_cluster_keeps_acked_messages_when_the_stream_leader_is_killed() {
    let dir = tempdir();
    let mut cluster = NatsCluster::start(dir.path(), 3);
    assert_eq!(cluster.urls().split(',').count(), 3);
    let client = async_nats::ConnectOptions::new()
        .connect(cluster.url_list())
        .await
        .unwrap();
    let js = jetstream::new(client);
    // A cluster whose peers are all current may still refuse placement for a moment on a
    // busy machine ("no suitable peers for placement"): retry that, as the gateway does.
    let js_ref = &js;
    eventually(
        Duration::from_secs(60),
        "the R3 stream placed on the cluster",
        || async move {
            let created = js_ref
                .create_stream(stream::Config {
                    name: "R3".into(),
                    subjects: vec!["results.r3".into()],
                    num_replicas: 3,
                    ..Default::default()
                })
                .await;
            match created {
                Ok(_) => Some(()),
                Err(e) if e.to_string().contains("no suitable peers") => None,
                Err(e) => panic!("cannot create the R3 stream: {e}"),
            }
        },
    )
    .await;

    let mut acked = Vec::new();
    for i in 0..20 {
        let id = format!("before-{i}");
        acked.push((publish_acked(&js, &id).await, id));
    }

    let mut r3 = js.get_stream("R3").await.unwrap();
    let info = r3.info().await.unwrap();
    let cluster_info = info.cluster.clone().expect("a clustered stream");
    assert_eq!(
        cluster_info.replicas.len(),
        2,
        "two followers: {cluster_info:?}"
    );
    let leader = cluster_info.leader.expect("a stream leader");
    let victim = cluster
        .index_of(&leader)
        .expect("the leader is one of ours");
    cluster.kill(victim);

    // Publishing goes on once a new leader is elected among the other two.
    for i in 0..20 {
        let id = format!("after-{i}");
        acked.push((publish_acked(&js, &id).await, id));
    }
    let new_leader = eventually(Duration::from_secs(30), "a new stream leader", || async {
        let info = js.get_stream("R3").await.ok()?.info().await.ok()?.clone();
        info.cluster?.leader.filter(|l| *l != leader)
    })
    .await;
    assert_ne!(new_leader, leader);

    // Every acked message is in the stream, once, at the sequence its ack named.
    let stored = stored_messages(&js, "R3").await;
    let want: BTreeMap<u64, String> = acked.iter().cloned().collect();
    assert_eq!(stored, want, "the stream holds exactly the acked messages");

    // The killed node comes back on its ports and store, and catches up.
    cluster.restart(victim);
    let node = cluster.node(victim);
    eventually(
        Duration::from_secs(30),
        "the restarted node to catch up",
        || async {
            let state = node.stream_state("R3")?;
            (state["messages"] == 40 && state["last_seq"] == 40).then_some(())
        },
    )
    .await;
}

/// Every message of `stream`, sequence to payload, read from its leader.
async fn stored_messages(js: &jetstream::Context, stream: &str) -> BTreeMap<u64, String> {
    let mut s = js.get_stream(stream).await.unwrap();
    let state = s.info().await.unwrap().state.clone();
    let mut out = BTreeMap::new();
    for seq in state.first_sequence..=state.last_sequence {
        let m = s.get_raw_message(seq).await.unwrap();
        out.insert(seq, String::from_utf8(m.payload.to_vec()).unwrap());
    }
    out
}

#[test]
fn documented_haproxy_config_is_valid() {
    let out = Command::new(haproxy::haproxy_bin())
        .arg("-c")
        .arg("-f")
        .arg(haproxy::documented_config())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "haproxy -c: {text}");
    // Valid, and without warnings: they mean a setting does not do what it says.
    assert!(!text.contains("WARNING"), "haproxy -c: {text}");
}

#[tokio::test]
async fn haproxy_takes_a_killed_gateway_out_and_serves_through_the_other() {
    let dir = tempdir();
    let (_ca, cert, key) = test_pki(&dir.path().join("pki"), "localhost");
    let tls = [
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
    let mut gateways = vec![
        Gateway::start(&dir.path().join("gw1"), &tls),
        Gateway::start(&dir.path().join("gw2"), &tls),
    ];
    assert_eq!(
        gateways[0].pin, gateways[1].pin,
        "one certificate for the fleet"
    );
    let backends: Vec<String> = gateways.iter().map(|g| g.addr.clone()).collect();
    let lb = Haproxy::start(dir.path(), &backends);
    for i in 0..2 {
        lb.wait_status(&lb.server_name(i), "UP", Duration::from_secs(20))
            .await;
    }
    let pin = gateways[0].pin.clone();

    let (status, body) = lb.https_get(&pin, "/healthz", None).await.unwrap();
    assert_eq!((status, body.trim()), (200, "ok"));
    let both: Vec<&Gateway> = gateways.iter().collect();
    let answered = lb.answering_gateway(&both).await.unwrap();

    // SIGKILL: no drain, no goodbye. The health check finds out.
    gateways[answered].proc.signal(libc::SIGKILL);
    let down = lb.server_name(answered);
    lb.wait_status(&down, "DOWN", Duration::from_secs(20)).await;
    let other = 1 - answered;
    assert_eq!(lb.server_status()[&lb.server_name(other)], "UP");

    let both: Vec<&Gateway> = gateways.iter().collect();
    for _ in 0..5 {
        assert_eq!(lb.answering_gateway(&both).await, Ok(other));
        let (status, _) = lb.https_get(&pin, "/healthz", None).await.unwrap();
        assert_eq!(status, 200);
    }
    assert!(
        lb.log()
            .contains(&format!("Server {}/{down} is DOWN", haproxy::BACKEND)),
        "haproxy logs the server going down:\n{}",
        lb.log()
    );
    gateways.clear();
}

#[tokio::test]
async fn a_gateway_restarted_on_a_port_held_for_a_moment_starts_once_it_is_free() {
    let dir = tempdir();
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = holder.local_addr().unwrap().to_string();
    let released = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(1));
        drop(holder);
    });
    let gw = Gateway::start_on(dir.path(), &listen, &[]);
    released.join().unwrap();
    assert_eq!(gw.addr, listen);
    assert_eq!(gw.http("GET", "/healthz", None).await.0, 200);
}
