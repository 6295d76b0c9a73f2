//! A fleet: several real gateways on a real nats-server (JetStream), behind real haproxy
//! running the documented configuration, with real agents over TLS.
//!
//! Presence is read from the bus itself (a subscriber on the presence subjects, started
//! before anything happens), results from the JetStream stream, and the fleet registry
//! through each gateway's API.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use outpost_e2e::fleet::{agent, gateway, gateway_on, gateways, pki, write_config, Pki, GRACE};
use outpost_e2e::haproxy::Haproxy;
use outpost_e2e::nats::{NatsCluster, NatsServer};
use outpost_e2e::{bin, eventually, now_ms, tempdir, Agent, Gateway};
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

/// A nats-server, its URL, the fleet's certificate, and the `tick` check pushed to it.
fn fleet_base(dir: &Path) -> (NatsServer, String, Pki) {
    let nats = NatsServer::start(dir, "n1");
    let url = nats.url();
    let pki = pki(dir);
    push(&url, &write_config(dir, &[("base.toml", TICK)]), &[]);
    (nats, url, pki)
}

/// One agent on each gateway, dialed directly, so each sits where the test says.
fn one_agent_each(dir: &Path, gws: &[Gateway], pki: &Pki) -> Vec<Agent> {
    gws.iter()
        .enumerate()
        .map(|(i, g)| agent(dir, &format!("a{i}"), &g.addr, pki, &g.enroll_key))
        .collect()
}

/// `outpost-gateway config push DIR`; returns its stdout.
fn push(nats: &str, dir: &Path, extra: &[&str]) -> String {
    outpost_e2e::nats::config_push(nats, dir, extra)
}

const TICK: &str = "[[check]]\nname = \"tick\"\ncommand = \"/bin/echo tick\"\ninterval = 1\n";

/// A client of any of the comma-separated servers.
async fn connect(urls: &str) -> async_nats::Client {
    async_nats::connect(urls.split(',').collect::<Vec<_>>())
        .await
        .unwrap()
}

/// Every presence event published on the bus, from the moment this is created.
#[derive(Clone, Default)]
struct Presence(Arc<Mutex<Vec<Value>>>);

impl Presence {
    async fn follow(nats: &str) -> Presence {
        let p = Presence::default();
        let client = connect(nats).await;
        let mut sub = client.subscribe("outpost.*.presence.*").await.unwrap();
        client.flush().await.unwrap();
        let events = p.0.clone();
        tokio::spawn(async move {
            let _client = client;
            while let Some(msg) = sub.next().await {
                let v: Value = serde_json::from_slice(&msg.payload).unwrap();
                events.lock().unwrap().push(v);
            }
        });
        p
    }

    /// The presence values published for `fp`, in order.
    fn of(&self, fp: &str) -> Vec<String> {
        self.events(fp)
            .iter()
            .map(|e| e["presence"].as_str().unwrap().to_string())
            .collect()
    }

    fn events(&self, fp: &str) -> Vec<Value> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e["fingerprint"] == fp)
            .cloned()
            .collect()
    }

    async fn wait_for(&self, fp: &str, presence: &str) -> Value {
        eventually(T, &format!("{fp} {presence} on the bus"), || async {
            self.events(fp)
                .into_iter()
                .rev()
                .find(|e| e["presence"] == presence)
        })
        .await
    }
}

/// The sequence numbers stored in the results stream, per agent, in stored order (read
/// again while JetStream elects a new leader and does not answer).
async fn stored_results(nats: &str) -> HashMap<String, Vec<u64>> {
    eventually(T, "the results stream answers", || read_results(nats)).await
}

async fn read_results(nats: &str) -> Option<HashMap<String, Vec<u64>>> {
    let mut out: HashMap<String, Vec<u64>> = HashMap::new();
    for v in outpost_e2e::nats::stream_results(nats).await? {
        out.entry(v["fingerprint"].as_str()?.to_string())
            .or_default()
            .push(v["result"]["seq"].as_u64()?);
    }
    Some(out)
}

/// Each agent's stored sequence numbers are exactly `first..=last`, each once: nothing
/// acked was lost (acked results are never resent, so a loss is a gap) and nothing was
/// stored twice.
fn assert_exactly_once(stored: &HashMap<String, Vec<u64>>, fps: &[String]) {
    for fp in fps {
        let seqs = stored
            .get(fp)
            .unwrap_or_else(|| panic!("no results stored for {fp}"));
        let first = seqs[0];
        let want: Vec<u64> = (first..first + seqs.len() as u64).collect();
        assert_eq!(
            seqs, &want,
            "agent {fp}: stored sequence numbers are not exactly once and gap-free"
        );
    }
}

/// The agents the fleet registry shows, seen through `gw`: fingerprint → (presence, gateway).
/// The agent's `last_seen_ms` as `gw` lists it, once `gw` shows it with `presence`.
async fn last_seen_when(gw: &Gateway, fp: &str, presence: &str) -> u64 {
    eventually(T, "the agent's presence in the registry", || async {
        let a = gw.agent(fp).await?;
        (a["presence"] == presence).then(|| a["last_seen_ms"].as_u64().unwrap())
    })
    .await
}

/// An agent that went silent at `silent_at` was last seen shortly before then: not at the
/// moment it was declared lost (a grace or a sweep later).
fn assert_last_seen_before(last_seen: u64, silent_at: u64, who: &str) {
    assert!(
        last_seen <= silent_at + 1_000 && last_seen + 30_000 >= silent_at,
        "{who}: last seen at {last_seen}, silent from {silent_at} ({} ms after)",
        last_seen as i64 - silent_at as i64
    );
}

async fn fleet_view(gw: &Gateway) -> HashMap<String, (String, String)> {
    gw.api("/agents")
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["fingerprint"].as_str().unwrap().to_string(),
                (
                    a["presence"].as_str().unwrap().to_string(),
                    a["gateway"].as_str().unwrap().to_string(),
                ),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_now_through_any_gateway_reaches_agents_on_the_others_and_every_gateway_lists_the_fleet(
) {
    let dir = tempdir();
    let (_nats, url, pki) = fleet_base(dir.path());
    let gws = gateways(dir.path(), 3, &url, &pki);
    let agents = one_agent_each(dir.path(), &gws, &pki);
    for g in &gws {
        eventually(T, "every gateway lists the three agents online", || async {
            let view = fleet_view(g).await;
            agents
                .iter()
                .enumerate()
                .all(|(i, a)| {
                    view.get(&a.fingerprint) == Some(&("online".into(), format!("gw{}", i + 1)))
                })
                .then_some(())
        })
        .await;
    }
    for (i, a) in agents.iter().enumerate() {
        eventually(T, "configured", || gws[i].latest(&a.fingerprint, "tick")).await;
    }
    // Every gateway runs a check on every agent, its own and the others'.
    for g in &gws {
        for a in &agents {
            let (status, body) = run_now(g, &a.fingerprint, "tick").await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["origin"], "run_now", "{body}");
            assert_eq!(body["output"], "tick", "{body}");
        }
    }
    // An unknown check on a remote agent: the holder's answer comes back as is.
    let (status, body) = run_now(&gws[0], &agents[2].fingerprint, "nope").await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("not configured"),
        "{body}"
    );

    // An agent that stopped: a fast, clear answer, not a timeout.
    let mut gone = agents.into_iter().nth(1).unwrap();
    gone.proc.signal(libc::SIGTERM);
    gone.proc.wait_exit(T).await;
    eventually(T, "deregistered everywhere", || async {
        (fleet_view(&gws[2]).await[&gone.fingerprint].0 == "deregistered").then_some(())
    })
    .await;
    let started = Instant::now();
    let (status, body) = run_now(&gws[2], &gone.fingerprint, "tick").await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("not connected to any gateway"),
        "{body}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateway_behind_haproxy_moves_its_agents_without_a_false_lost_or_a_lost_result() {
    let dir = tempdir();
    let (_nats, url, pki) = fleet_base(dir.path());
    let presence = Presence::follow(&url).await;
    let mut gws = gateways(dir.path(), 3, &url, &pki);
    let lb = Haproxy::start(
        dir.path(),
        &gws.iter().map(|g| g.addr.clone()).collect::<Vec<_>>(),
    );
    let key = gws[0].enroll_key.clone();
    let agents: Vec<Agent> = (0..6)
        .map(|i| agent(dir.path(), &format!("a{i}"), lb.addr(), &pki, &key))
        .collect();
    let fps: Vec<String> = agents.iter().map(|a| a.fingerprint.clone()).collect();
    let view = eventually(T, "all six online through the load balancer", || async {
        let view = fleet_view(&gws[0]).await;
        fps.iter()
            .all(|fp| view.get(fp).is_some_and(|(p, _)| p == "online"))
            .then_some(view)
    })
    .await;
    // The gateway holding the most agents is killed.
    let mut count: HashMap<String, usize> = HashMap::new();
    for fp in &fps {
        *count.entry(view[fp].1.clone()).or_default() += 1;
    }
    let (victim_id, held) = count.into_iter().max_by_key(|(_, n)| *n).unwrap();
    let victim = victim_id.trim_start_matches("gw").parse::<usize>().unwrap() - 1;
    assert!(held >= 1);
    // A control agent on the victim that cannot come back (frozen): its `lost`, published
    // by a surviving gateway once the grace is over, shows the sweep has run.
    let control = agent(dir.path(), "control", &gws[victim].addr, &pki, &key);
    presence.wait_for(&control.fingerprint, "online").await;
    for fp in &fps {
        eventually(T, "results flowing", || gws[0].agent(fp)).await;
    }
    let before = stored_results(&url).await;
    control.proc.signal(libc::SIGSTOP);
    let victim_killed_at = now_ms();
    gws[victim].proc.signal(libc::SIGKILL);
    let survivor = (victim + 1) % 3;

    eventually(T, "every agent online on a surviving gateway", || async {
        let view = fleet_view(&gws[survivor]).await;
        fps.iter()
            .all(|fp| {
                view.get(fp)
                    .is_some_and(|(p, g)| p == "online" && *g != victim_id)
            })
            .then_some(())
    })
    .await;
    let lost = presence.wait_for(&control.fingerprint, "lost").await;
    assert!(
        lost["reason"]
            .as_str()
            .unwrap()
            .contains(&format!("its gateway ({victim_id}) stopped")),
        "{lost}"
    );
    // Swept by a survivor: last seen when its dead gateway last vouched for it.
    let seen = last_seen_when(&gws[survivor], &control.fingerprint, "lost").await;
    assert_last_seen_before(seen, victim_killed_at, "the control agent");
    for fp in &fps {
        assert!(
            !presence.of(fp).contains(&"lost".to_string()),
            "false lost for {fp}: {:?}",
            presence.events(fp)
        );
    }
    // Results keep flowing through the survivors.
    eventually(T, "results after the move", || async {
        let now = stored_results(&url).await;
        fps.iter()
            .all(|fp| now.get(fp).map_or(0, Vec::len) >= before.get(fp).map_or(0, Vec::len) + 3)
            .then_some(())
    })
    .await;

    // A SIGTERM drain of a second gateway: its agents move to the last one, still no loss.
    let second = (0..3).find(|&i| i != victim && i != survivor).unwrap();
    let last_id = format!("gw{}", survivor + 1);
    assert_eq!(gws[second].http("GET", "/readyz", None).await.0, 200);
    gws[second].proc.signal(libc::SIGTERM);
    assert_eq!(
        gws[second].proc.wait_exit(T).await,
        Some(0),
        "drained and exited cleanly"
    );
    eventually(T, "every agent online on the last gateway", || async {
        let view = fleet_view(&gws[survivor]).await;
        fps.iter()
            .all(|fp| view.get(fp) == Some(&("online".to_string(), last_id.clone())))
            .then_some(())
    })
    .await;
    eventually(T, "haproxy marked both DOWN", || async {
        let st = lb.server_status();
        (st.values().filter(|s| s.starts_with("DOWN")).count() == 2).then_some(())
    })
    .await;
    let before = stored_results(&url).await;
    eventually(T, "results after the drain", || async {
        let now = stored_results(&url).await;
        fps.iter()
            .all(|fp| now.get(fp).map_or(0, Vec::len) >= before.get(fp).map_or(0, Vec::len) + 3)
            .then_some(())
    })
    .await;
    // Stopped with bye, so each delivers what it has.
    for mut a in agents {
        a.proc.signal(libc::SIGTERM);
        a.proc.wait_exit(T).await;
    }
    for fp in &fps {
        presence.wait_for(fp, "deregistered").await;
        assert!(
            !presence.of(fp).contains(&"lost".to_string()),
            "false lost for {fp}: {:?}",
            presence.events(fp)
        );
    }
    assert_exactly_once(&stored_results(&url).await, &fps);
}

/// A TCP relay between an agent and a gateway that can stop passing bytes without closing
/// anything, the way a network that drops every packet looks to both ends.
mod netcut {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    pub struct Relay {
        pub addr: String,
        upstream: Arc<Mutex<String>>,
        links: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
        cut_new: Arc<AtomicBool>,
    }

    impl Relay {
        pub async fn start(upstream: &str) -> Relay {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let relay = Relay {
                addr: listener.local_addr().unwrap().to_string(),
                upstream: Arc::new(Mutex::new(upstream.to_string())),
                links: Default::default(),
                cut_new: Default::default(),
            };
            let (upstream, links, cut_new) = (
                relay.upstream.clone(),
                relay.links.clone(),
                relay.cut_new.clone(),
            );
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let cut = Arc::new(AtomicBool::new(cut_new.load(Ordering::SeqCst)));
                    links.lock().unwrap().push(cut.clone());
                    let to = upstream.lock().unwrap().clone();
                    tokio::spawn(async move {
                        if cut.load(Ordering::SeqCst) {
                            // Nothing gets through: hold the connection, answer nothing.
                            std::future::pending::<()>().await;
                        }
                        let Ok(server) = TcpStream::connect(&to).await else {
                            return;
                        };
                        let (cr, cw) = client.into_split();
                        let (sr, sw) = server.into_split();
                        tokio::spawn(pump(cr, sw, cut.clone()));
                        pump(sr, cw, cut).await;
                    });
                }
            });
            relay
        }

        /// Drop every byte of the connections open now, and of new ones if `new_too`.
        pub fn cut(&self, new_too: bool) {
            for link in self.links.lock().unwrap().iter() {
                link.store(true, Ordering::SeqCst);
            }
            self.cut_new.store(new_too, Ordering::SeqCst);
        }

        /// Pass new connections again, to `upstream`.
        pub fn heal(&self, upstream: &str) {
            *self.upstream.lock().unwrap() = upstream.to_string();
            self.cut_new.store(false, Ordering::SeqCst);
        }
    }

    async fn pump(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        cut: Arc<AtomicBool>,
    ) {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if cut.load(Ordering::SeqCst) {
                continue;
            }
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
        if cut.load(Ordering::SeqCst) {
            // A close does not cross a dead network either.
            std::future::pending::<()>().await;
        }
        let _ = to.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_for_bye_kill_9_network_loss_and_an_old_connection_outliving_its_successor() {
    let dir = tempdir();
    let (_nats, url, pki) = fleet_base(dir.path());
    let presence = Presence::follow(&url).await;
    // Heartbeat 1 s: a silent connection is dropped after 3 s.
    let gw1 = gateway(dir.path(), "gw1", &url, &pki, &["--heartbeat", "1"]);
    let gw2 = gateway(dir.path(), "gw2", &url, &pki, &["--heartbeat", "1"]);
    let key = gw1.enroll_key.clone();

    // bye: deregistered at once.
    let mut byer = agent(dir.path(), "byer", &gw1.addr, &pki, &key);
    presence.wait_for(&byer.fingerprint, "online").await;
    byer.proc.signal(libc::SIGTERM);
    let bye = presence.wait_for(&byer.fingerprint, "deregistered").await;
    assert!(bye["reason"].as_str().unwrap().starts_with("bye"), "{bye}");
    assert_eq!(presence.of(&byer.fingerprint), ["online", "deregistered"]);
    byer.proc.wait_exit(T).await;

    // kill -9: online through the grace, then lost.
    let killed = agent(dir.path(), "killed", &gw1.addr, &pki, &key);
    presence.wait_for(&killed.fingerprint, "online").await;
    let killed_at = now_ms();
    killed.proc.signal(libc::SIGKILL);
    let lost = presence.wait_for(&killed.fingerprint, "lost").await;
    assert!(
        lost["at_ms"].as_u64().unwrap() >= killed_at + GRACE * 1000,
        "lost before the grace was over: {lost} (killed at {killed_at})"
    );
    assert!(
        lost["reason"]
            .as_str()
            .unwrap()
            .contains(&format!("not back within {GRACE}s")),
        "{lost}"
    );
    assert_eq!(presence.of(&killed.fingerprint), ["online", "lost"]);
    // Its last frame, on the gateway that held it and in the registry every gateway reads.
    for gw in [&gw1, &gw2] {
        let seen = last_seen_when(gw, &killed.fingerprint, "lost").await;
        assert_last_seen_before(seen, killed_at, "the killed agent");
    }

    // Network loss, and an old connection outliving the new one: `dark` loses its
    // network for good; `moved` loses its path to gw1 but reconnects through a new path to
    // gw2 while its old connection on gw1 is still open and silent.
    let dark_path = netcut::Relay::start(&gw1.addr).await;
    let moved_path = netcut::Relay::start(&gw1.addr).await;
    let dark = agent(dir.path(), "dark", &dark_path.addr, &pki, &key);
    let moved = agent(dir.path(), "moved", &moved_path.addr, &pki, &key);
    for a in [&dark, &moved] {
        presence.wait_for(&a.fingerprint, "online").await;
        eventually(T, "results", || gw1.latest(&a.fingerprint, "tick")).await;
    }
    let cut_at = now_ms();
    dark_path.cut(true);
    moved_path.cut(false);
    moved_path.heal(&gw2.addr);
    eventually(T, "moved online on gw2", || async {
        (fleet_view(&gw1).await[&moved.fingerprint] == ("online".into(), "gw2".into()))
            .then_some(())
    })
    .await;
    let lost = presence.wait_for(&dark.fingerprint, "lost").await;
    assert!(
        lost["at_ms"].as_u64().unwrap() >= cut_at + GRACE * 1000,
        "{lost}"
    );
    // The moved agent's old connection on gw1 ends one way or another: closed when gw1 sees
    // gw2's claim, or silent until its grace is over. Either way it must not make the agent
    // lost.
    let old_end = eventually(T, "the old connection on gw1 has ended", || async {
        gw1.proc
            .log()
            .lines()
            .find(|l| {
                l.contains(&moved.fingerprint)
                    && (l.contains("ending its old session here")
                        || l.contains("a newer connection holds the agent")
                        || l.contains("agent lost"))
            })
            .map(str::to_string)
    })
    .await;
    assert!(!old_end.contains("agent lost"), "{old_end}");
    assert_eq!(
        fleet_view(&gw2).await[&moved.fingerprint],
        ("online".into(), "gw2".into())
    );
    // The dark agent's network comes back: it reconnects by itself, and is online again
    // (an event: it was lost).
    dark_path.heal(&gw1.addr);
    eventually(T, "dark back online", || async {
        (presence.of(&dark.fingerprint).last().map(String::as_str) == Some("online")).then_some(())
    })
    .await;
    assert_eq!(presence.of(&dark.fingerprint), ["online", "lost", "online"]);
    // The move was no event: the agent never stopped being online. (Checked once a later
    // event is on the stream, so an event the move caused would be there by now.)
    assert_eq!(
        presence.of(&moved.fingerprint),
        ["online"],
        "{:?}",
        presence.events(&moved.fingerprint)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_node_killed_mid_stream_loses_no_acked_result() {
    let dir = tempdir();
    let mut cluster = NatsCluster::start(dir.path(), 3);
    let urls = cluster.urls();
    let pki = pki(dir.path());
    let checks: String = (0..5)
        .map(|i| format!("[[check]]\nname = \"c{i}\"\ncommand = \"/bin/echo {i}\"\ninterval = 1\n"))
        .collect();
    push(
        &urls,
        &write_config(dir.path(), &[("base.toml", &checks)]),
        &[],
    );
    let gw = gateway(dir.path(), "gw1", &urls, &pki, &[]);
    let mut a = agent(dir.path(), "a", &gw.addr, &pki, &gw.enroll_key);
    let fps = vec![a.fingerprint.clone()];
    eventually(T, "results stored", || async {
        (stored_results(&urls).await.get(&fps[0]).map_or(0, Vec::len) >= 20).then_some(())
    })
    .await;
    // Kill the node that leads the results stream, mid-stream.
    let leader = {
        let client = connect(&urls).await;
        let js = async_nats::jetstream::new(client);
        let mut s = js
            .get_stream(outpost_gateway::nats::RESULTS_STREAM)
            .await
            .unwrap();
        let info = s.info().await.unwrap();
        assert_eq!(
            info.config.num_replicas, 3,
            "three servers given: three replicas by default"
        );
        info.cluster
            .as_ref()
            .and_then(|c| c.leader.clone())
            .expect("a stream leader")
    };
    let idx = (0..3)
        .find(|&i| cluster.node(i).name() == leader)
        .expect("leader is a node");
    let count_at_kill = stored_results(&urls).await[&fps[0]].len();
    cluster.kill(idx);
    eventually(T, "results keep being stored", || async {
        (stored_results(&urls).await.get(&fps[0]).map_or(0, Vec::len) >= count_at_kill + 25)
            .then_some(())
    })
    .await;
    cluster.restart(idx);
    a.proc.signal(libc::SIGTERM);
    a.proc.wait_exit(T).await;
    assert_exactly_once(&stored_results(&urls).await, &fps);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_push_reaches_agents_on_every_gateway_within_seconds_and_removes_what_is_gone() {
    let dir = tempdir();
    let nats = NatsServer::start(dir.path(), "n1");
    let url = nats.url();
    let pki = pki(dir.path());
    let gws = gateways(dir.path(), 2, &url, &pki);
    let agents = one_agent_each(dir.path(), &gws, &pki);
    for (g, a) in gws.iter().zip(&agents) {
        eventually(T, "online", || g.agent(&a.fingerprint)).await;
    }
    let plugin_check = "[[check]]\nname = \"plug\"\nplugin = \"say_hi\"\ninterval = 1\n";
    let cfg = write_config(
        dir.path(),
        &[
            ("base.toml", TICK),
            ("more.toml", plugin_check),
            ("plugins/say_hi", "#!/bin/sh\necho 'OK hi from the fleet'\n"),
        ],
    );
    // A dry run shows the diff and changes nothing.
    let dry = push(&url, &cfg, &["--dry-run"]);
    assert!(
        dry.contains("+ base.toml (new") && dry.contains("+ plugins/say_hi"),
        "{dry}"
    );
    assert!(dry.contains("dry run: 3 change(s) not pushed"), "{dry}");
    let again = push(&url, &cfg, &["--dry-run"]);
    assert!(
        again.contains("dry run: 3 change(s)"),
        "nothing was pushed by the dry run: {again}"
    );
    let out = push(&url, &cfg, &[]);
    assert!(out.contains("pushed 3 change(s)"), "{out}");
    for (g, a) in gws.iter().zip(&agents) {
        let r = eventually(T, "the plugin's result", || {
            g.latest(&a.fingerprint, "plug")
        })
        .await;
        assert_eq!(r["output"], "OK hi from the fleet", "{r}");
        eventually(T, "tick", || g.latest(&a.fingerprint, "tick")).await;
    }
    // The directory loses a file: the push removes it, and the agents stop running it.
    std::fs::remove_file(cfg.join("more.toml")).unwrap();
    let out = push(&url, &cfg, &[]);
    assert!(out.contains("- more.toml (removed)"), "{out}");
    assert_eq!(
        push(&url, &cfg, &[]).trim_end(),
        format!("no changes: tenant default already holds {}", cfg.display())
    );
    for (g, a) in gws.iter().zip(&agents) {
        eventually(T, "plug no longer configured", || async {
            let checks = g.api(&format!("/agents/{}/checks", a.fingerprint)).await;
            let plug = checks
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["check"] == "plug")
                .cloned();
            plug.is_none_or(|c| c["configured"] == false).then_some(())
        })
        .await;
    }
    // A broken directory is refused whole, naming the problem, and the fleet keeps its
    // configuration.
    std::fs::write(cfg.join("bad.toml"), "[[check]]\nname = \"x\"\ncommand =\n").unwrap();
    let out = std::process::Command::new(bin("outpost-gateway"))
        .args(["config", "push"])
        .arg(&cfg)
        .args(["--bus", &url])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is not pushed") && err.contains("bad.toml:"),
        "{err}"
    );
    std::fs::remove_file(cfg.join("bad.toml")).unwrap();
    assert!(push(&url, &cfg, &["--dry-run"]).starts_with("no changes"));

    // The same through the API of either gateway (what `outpost config push` calls): the
    // fleet's check files, read and replaced, every gateway's agents get them; plugins
    // stay as they are.
    let (status, have) = gws[1]
        .http("GET", "/api/v1/config/checks", Some(&gws[1].token))
        .await;
    assert_eq!(status, 200, "{have}");
    assert_eq!(have["checks"]["base.toml"], TICK, "{have}");
    let api_check = "[[check]]\nname = \"viaapi\"\nplugin = \"say_hi\"\ninterval = 1\n";
    let body = serde_json::json!({"checks": {"base.toml": TICK, "api.toml": api_check}});
    let (status, pushed) = gws[1]
        .http_json(
            "PUT",
            "/api/v1/config/checks",
            Some(&gws[1].token),
            Some(&body),
        )
        .await;
    assert_eq!(status, 200, "{pushed}");
    assert_eq!(pushed["applied"], true, "{pushed}");
    assert!(
        pushed["diff"].as_str().unwrap().contains("+ api.toml"),
        "{pushed}"
    );
    for (g, a) in gws.iter().zip(&agents) {
        let r = eventually(T, "the API-pushed check's result", || {
            g.latest(&a.fingerprint, "viaapi")
        })
        .await;
        assert_eq!(r["output"], "OK hi from the fleet", "{r}");
    }
    assert!(
        push(&url, &cfg, &["--dry-run"]).contains("- api.toml (removed)"),
        "the API's push is in NATS"
    );
}

/// `POST …/checks/CHECK/run` on `gw` with its token: the status and body.
async fn run_now(gw: &Gateway, fp: &str, check: &str) -> (u16, Value) {
    let path = format!("/api/v1/agents/{fp}/checks/{check}/run");
    gw.http("POST", &path, Some(&gw.token)).await
}

/// A run-now request for `tick` put on the bus by hand, on `tenant`'s subject for `fp`.
async fn run_now_on_bus(
    client: &async_nats::Client,
    tenant: &str,
    fp: &str,
) -> Result<async_nats::Message, async_nats::client::RequestError> {
    let body = serde_json::json!({"tenant": tenant, "check": "tick"});
    client
        .request(
            outpost_gateway::nats::rpc_subject(tenant, fp),
            serde_json::to_vec(&body).unwrap().into(),
        )
        .await
}

/// Two tenants on one nats-server, each in its own NATS account as FLEET.md says: each
/// tenant's gateway and `config push` work in their account, neither sees or reaches the
/// other's agents, and with one tenant's NATS credentials nothing of the other's can be
/// read or written, not even by the reply-subject injection that defeats subject
/// permissions within one account (a request whose reply subject is the other tenant's
/// key makes the server itself write the answer there). The tenant's enrollment key and
/// API token are kept hashed in NATS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_sharing_one_nats_never_see_or_reach_each_others_agents() {
    let dir = tempdir();
    let nats = NatsServer::start_with(
        dir.path(),
        "n1",
        "accounts {\n  ACME: { jetstream: enabled, users: [ { user: \"acme\", password: \"acme-pw\" } ] }\n  GLOBEX: { jetstream: enabled, users: [ { user: \"globex\", password: \"globex-pw\" } ] }\n}\n",
    );
    let url = nats.url();
    fn as_user(tenant: &str) -> Vec<String> {
        [
            "--tenant",
            tenant,
            "--nats-user",
            tenant,
            "--nats-password",
            &format!("{tenant}-pw"),
        ]
        .map(String::from)
        .to_vec()
    }
    fn args(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    let (acme_args, globex_args) = (as_user("acme"), as_user("globex"));
    let pki = pki(dir.path());
    for a in [&acme_args, &globex_args] {
        push(
            &url,
            &write_config(dir.path(), &[("base.toml", TICK)]),
            &args(a),
        );
    }
    let acme = gateway(dir.path(), "acme1", &url, &pki, &args(&acme_args));
    let globex = gateway(dir.path(), "globex1", &url, &pki, &args(&globex_args));
    assert_ne!(
        acme.enroll_key, globex.enroll_key,
        "each tenant has its own keys"
    );
    assert_ne!(acme.token, globex.token);
    let a = agent(dir.path(), "a", &acme.addr, &pki, &acme.enroll_key);
    let g = agent(dir.path(), "g", &globex.addr, &pki, &globex.enroll_key);
    eventually(T, "both report", || async {
        Some((
            acme.latest(&a.fingerprint, "tick").await?,
            globex.latest(&g.fingerprint, "tick").await?,
        ))
    })
    .await;
    // Each tenant's API lists only its own agent, and run-now works within the tenant.
    assert_eq!(
        fleet_view(&acme).await.keys().collect::<Vec<_>>(),
        [&a.fingerprint]
    );
    assert_eq!(
        fleet_view(&globex).await.keys().collect::<Vec<_>>(),
        [&g.fingerprint]
    );
    let (status, body) = run_now(&acme, &a.fingerprint, "tick").await;
    assert_eq!(status, 200, "{body}");
    // acme asks for globex's agent: unknown to acme, and nothing reaches it.
    let (status, body) = run_now(&acme, &g.fingerprint, "tick").await;
    assert_eq!(status, 404, "{body}");
    // A globex agent cannot log in to acme's gateway with globex's key.
    let wrong = agent(dir.path(), "wrong", &acme.addr, &pki, &globex.enroll_key);
    wrong.proc.wait_for_log("enrollment key refused", T).await;

    let connect = |user: &'static str| {
        let url = url.clone();
        async move {
            async_nats::ConnectOptions::with_user_and_password(user.into(), format!("{user}-pw"))
                .connect(url.as_str())
                .await
                .unwrap()
        }
    };
    let (acme_client, globex_client) = (connect("acme").await, connect("globex").await);
    // Even a request put on the bus by hand, with acme's credentials, on globex's subject
    // for globex's agent, finds no responder: acme's account has no such subscriber.
    let err = run_now_on_bus(&acme_client, "globex", &g.fingerprint)
        .await
        .unwrap_err();
    assert_eq!(
        err.kind(),
        async_nats::client::RequestErrorKind::NoResponders,
        "{err}"
    );
    // The right credentials do reach it.
    let msg = run_now_on_bus(&globex_client, "globex", &g.fingerprint)
        .await
        .unwrap();
    let answer: Value = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(answer["status"], 200, "{answer}");

    let kv = |client: &async_nats::Client, bucket: &'static str| {
        let js = async_nats::jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(5))
            .build(client.clone());
        async move { js.get_key_value(bucket).await.unwrap() }
    };
    use outpost_gateway::nats::fleet_config::CONFIG_BUCKET;
    use outpost_gateway::nats::TENANTS_BUCKET;
    // The tenants' keys are in NATS only as hashes.
    for (client, tenant, gw) in [
        (&acme_client, "acme", &acme),
        (&globex_client, "globex", &globex),
    ] {
        let record = kv(client, TENANTS_BUCKET)
            .await
            .get(format!("key.legacy-{tenant}"))
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&record);
        assert!(
            !text.contains(&gw.enroll_key) && !text.contains(&gw.token),
            "{text}"
        );
        assert!(text.contains(&sha256_hex(&gw.enroll_key)), "{text}");
    }

    // With acme's credentials, globex's data is out of reach: acme's buckets are acme's.
    let acme_tenants = kv(&acme_client, TENANTS_BUCKET).await;
    assert!(acme_tenants
        .get("key.legacy-globex")
        .await
        .unwrap()
        .is_none());
    let acme_config = kv(&acme_client, CONFIG_BUCKET).await;
    // The write a tenant's user may do, to its own config, and the injections that
    // defeat subject permissions: a direct get of acme's own file and a results publish,
    // each with globex's key as the reply subject (the server writes the answer there).
    acme_config
        .put(
            "acme.checks.evil.toml",
            "[[check]]\nname = \"evil\"\ncommand = \"/bin/true\"\n".into(),
        )
        .await
        .unwrap();
    for (subject, reply) in [
        (
            "$JS.API.DIRECT.GET.KV_outpost_config.$KV.outpost_config.acme.checks.evil.toml",
            "$KV.outpost_config.globex.checks.a.toml",
        ),
        (
            "outpost.acme.results.x",
            "$KV.outpost_config.globex.checks.c.toml",
        ),
    ] {
        acme_client
            .publish_with_reply(subject, reply, "".into())
            .await
            .unwrap();
    }
    acme_config
        .put("globex.checks.b.toml", "x".into())
        .await
        .unwrap();
    acme_client.flush().await.unwrap();
    // Where acme's injections went: into acme's own bucket (its account's), as a marker
    // that they ran, and never into globex's.
    eventually(T, "the injections answered in acme's account", || async {
        let mut found = 0;
        for key in [
            "globex.checks.a.toml",
            "globex.checks.b.toml",
            "globex.checks.c.toml",
        ] {
            if !acme_config.get(key).await.ok()??.is_empty() {
                found += 1;
            }
        }
        (found == 3).then_some(())
    })
    .await;
    let globex_config = kv(&globex_client, CONFIG_BUCKET).await;
    for key in [
        "globex.checks.a.toml",
        "globex.checks.b.toml",
        "globex.checks.c.toml",
    ] {
        assert!(
            globex_config.get(key).await.unwrap().is_none(),
            "acme wrote {key} into globex's config"
        );
    }
    // And globex's gateway runs only globex's check.
    let checks = globex
        .api(&format!("/agents/{}/checks", g.fingerprint))
        .await;
    let names: Vec<&str> = checks
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["configured"] == true)
        .map(|c| c["check"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["tick"], "{checks}");
}

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_down_makes_the_gateway_unready_and_results_wait_on_the_agent_until_it_is_back() {
    let dir = tempdir();
    let mut nats = NatsServer::start(dir.path(), "n1");
    let url = nats.url();
    let pki = pki(dir.path());
    push(&url, &write_config(dir.path(), &[("base.toml", TICK)]), &[]);
    let gw = gateway(dir.path(), "gw1", &url, &pki, &[]);
    let mut a = agent(dir.path(), "a", &gw.addr, &pki, &gw.enroll_key);
    let fps = vec![a.fingerprint.clone()];
    assert_eq!(
        gw.http("GET", "/readyz", None).await,
        (200, Value::String("ready\n".into()))
    );
    eventually(T, "results stored", || async {
        (stored_results(&url).await.get(&fps[0]).map_or(0, Vec::len) >= 3).then_some(())
    })
    .await;

    nats.kill();
    let (status, body) = eventually(T, "unready", || async {
        let r = gw.http("GET", "/readyz", None).await;
        (r.0 == 503).then_some(r)
    })
    .await;
    assert_eq!(status, 503);
    assert!(
        body.as_str().unwrap().contains("not connected to NATS"),
        "{body}"
    );
    // The agent keeps running its checks; nothing it has is acked meanwhile.
    a.proc.wait_for_log("bus unavailable", T).await;

    nats.restart();
    eventually(T, "ready again", || async {
        (gw.http("GET", "/readyz", None).await.0 == 200).then_some(())
    })
    .await;
    let before = stored_results(&url).await[&fps[0]].len();
    eventually(T, "the backlog and new results stored", || async {
        (stored_results(&url).await.get(&fps[0]).map_or(0, Vec::len) >= before + 5).then_some(())
    })
    .await;
    a.proc.signal(libc::SIGTERM);
    a.proc.wait_exit(T).await;
    assert_exactly_once(&stored_results(&url).await, &fps);
}

/// A gateway killed and restarted (same id, same address) keeps the agents that come back
/// online without an event, and makes lost, after the grace, the one that does not.
async fn restart_keeps_returning_agents(nats: Option<&str>, dir: &Path) {
    let pki = pki(dir);
    let start = |listen: &str| gateway_on(dir, "gw1", listen, nats, &pki, &[]);
    let mut gw = start("127.0.0.1:0");
    let addr = gw.addr.clone();
    match nats {
        Some(url) => {
            push(url, &write_config(dir, &[("base.toml", TICK)]), &[]);
        }
        None => gw.write_checks("base.toml", TICK),
    }
    let presence = match nats {
        Some(url) => Some(Presence::follow(url).await),
        None => None,
    };
    let events = |gw: &Gateway, fp: &str| -> Vec<Value> {
        match &presence {
            Some(p) => p.events(fp),
            None => gw
                .bus_log("presence")
                .into_iter()
                .filter(|e| e["fingerprint"] == fp)
                .collect(),
        }
    };
    let back = agent(dir, "back", &addr, &pki, &gw.enroll_key);
    let frozen = agent(dir, "frozen", &addr, &pki, &gw.enroll_key);
    for a in [&back, &frozen] {
        eventually(T, "results", || gw.latest(&a.fingerprint, "tick")).await;
    }
    frozen.proc.signal(libc::SIGSTOP);
    let killed_at = now_ms();
    gw.proc.signal(libc::SIGKILL);
    gw.proc.wait_exit(T).await;
    gw = start(&addr);
    let seq = eventually(T, "back reports through the restarted gateway", || async {
        let l = gw.latest(&back.fingerprint, "tick").await?;
        (gw.agent(&back.fingerprint).await?["connected"] == true).then_some(l)
    })
    .await["seq"]
        .as_u64()
        .unwrap();
    let lost = eventually(T, "frozen lost after the grace", || async {
        events(&gw, &frozen.fingerprint)
            .into_iter()
            .find(|e| e["presence"] == "lost")
    })
    .await;
    assert!(
        lost["reason"]
            .as_str()
            .unwrap()
            .contains("its gateway (gw1) stopped and it did not reconnect"),
        "{lost}"
    );
    let seen = last_seen_when(&gw, &frozen.fingerprint, "lost").await;
    assert_last_seen_before(seen, killed_at, "the frozen agent");
    let back_events: Vec<Value> = events(&gw, &back.fingerprint);
    let kinds: Vec<&str> = back_events
        .iter()
        .map(|e| e["presence"].as_str().unwrap())
        .collect();
    // Back within the grace: it never stopped being online, so its return is no event.
    assert_eq!(kinds, ["online"], "{back_events:?}");
    assert_eq!(
        gw.agent(&back.fingerprint).await.unwrap()["presence"],
        "online"
    );
    eventually(T, "newer results", || async {
        gw.latest(&back.fingerprint, "tick")
            .await
            .filter(|l| l["seq"].as_u64().unwrap() > seq)
    })
    .await;
    frozen.proc.signal(libc::SIGCONT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_gateway_on_nats_keeps_returning_agents_online_and_sweeps_the_rest() {
    let dir = tempdir();
    let nats = NatsServer::start(dir.path(), "n1");
    restart_keeps_returning_agents(Some(&nats.url()), dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_gateway_on_its_embedded_bus_keeps_returning_agents_online_and_sweeps_the_rest()
{
    let dir = tempdir();
    restart_keeps_returning_agents(None, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_moving_from_its_embedded_bus_to_nats_keeps_its_enrolled_agents() {
    let dir = tempdir();
    let pki = pki(dir.path());
    let gw = gateway_on(dir.path(), "gw1", "127.0.0.1:0", None, &pki, &[]);
    let addr = gw.addr.clone();
    gw.write_checks("base.toml", TICK);
    let mut a = agent(dir.path(), "a", &addr, &pki, &gw.enroll_key);
    eventually(T, "enrolled and reporting", || {
        gw.latest(&a.fingerprint, "tick")
    })
    .await;
    a.proc.signal(libc::SIGTERM);
    a.proc.wait_exit(T).await;
    drop(gw);

    let nats = NatsServer::start(dir.path(), "n1");
    let url = nats.url();
    push(&url, &write_config(dir.path(), &[("base.toml", TICK)]), &[]);
    let gw = gateway_on(dir.path(), "gw1", &addr, Some(&url), &pki, &[]);
    // The same agent, same state, no enrollment key in its configuration any more: it can
    // only log in with the secret it was given.
    let on = |gw: &Gateway| {
        Agent::start_with_config(
            dir.path(),
            "a",
            &format!(
                "gateway_url = \"wss://localhost:{}\"\nca_file = {:?}\nhostname = \"a\"\nreconnect_max_secs = 2\n",
                gw.port(),
                pki.ca.display().to_string()
            ),
        )
    };
    let mut a = on(&gw);
    eventually(T, "back on NATS with its secret", || {
        gw.latest(&a.fingerprint, "tick")
    })
    .await;
    a.proc.signal(libc::SIGTERM);
    a.proc.wait_exit(T).await;
    // And through a second gateway of the fleet, which never saw it.
    let gw2 = gateway(dir.path(), "gw2", &url, &pki, &[]);
    assert_eq!(gw2.enroll_key, gw.enroll_key, "one key for the fleet");
    let a = on(&gw2);
    eventually(T, "logged in through gw2", || {
        gw2.latest(&a.fingerprint, "tick")
    })
    .await;
}

/// Revocation in a fleet of two: an agent connected to gateway 2 is revoked through
/// gateway 1's API. Gateway 2 closes its connection with 4403 (it reads the revocation
/// from the shared registry; the time it took is printed, the promise is a second), the
/// agent cannot log in again on either gateway, and exactly one presence event says
/// `revoked`, with no `lost` after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_revoked_through_one_gateway_is_closed_on_the_other_and_cannot_return() {
    let dir = tempdir();
    let (_nats, url, pki) = fleet_base(dir.path());
    let gws = gateways(dir.path(), 2, &url, &pki);
    let presence = Presence::follow(&url).await;
    let agent = agent(dir.path(), "a", &gws[1].addr, &pki, &gws[1].enroll_key);
    let fp = agent.fingerprint.clone();
    presence.wait_for(&fp, "online").await;
    eventually(T, "gateway 1 lists the agent on gateway 2", || async {
        let view = fleet_view(&gws[0]).await;
        (view.get(&fp) == Some(&("online".into(), "gw2".into()))).then_some(())
    })
    .await;

    let asked = Instant::now();
    let path = format!("/api/v1/agents/{fp}/revoke");
    let (status, body) = gws[0].http("POST", &path, Some(&gws[0].token)).await;
    assert_eq!(status, 200, "{body}");
    agent
        .proc
        .wait_for_log("was revoked by an administrator", T)
        .await;
    println!(
        "revoked through gateway 1; the agent on gateway 2 was told within {:?}",
        asked.elapsed()
    );
    assert!(
        gws[1]
            .proc
            .log()
            .contains("agent revoked through another gateway"),
        "gateway 2 closed it on the registry's change"
    );
    // Back again (its backoff is 2 s here): refused.
    eventually(T, "a refused reconnect", || async {
        (agent
            .proc
            .log()
            .matches("was revoked by an administrator")
            .count()
            >= 2)
            .then_some(())
    })
    .await;
    // Its secret is refused by the gateway that revoked it too.
    let secret = std::fs::read_to_string(agent.state_dir.join("agent.secret")).unwrap();
    let mut ws = outpost_e2e::raw_ws(&gws[0]).await;
    let hello = outpost_e2e::raw_hello(
        &fp,
        outpost_protocol::Credential::Secret {
            secret: secret.trim().into(),
        },
        "raw",
    );
    futures_util::SinkExt::send(
        &mut ws,
        tokio_tungstenite::tungstenite::Message::Text(outpost_protocol::encode(&hello).into()),
    )
    .await
    .unwrap();
    let refused: Value = serde_json::from_str(&outpost_e2e::next_text(&mut ws).await).unwrap();
    assert_eq!(refused["code"], "revoked", "{refused}");
    assert_eq!(
        outpost_e2e::close_code(&mut ws, T).await,
        Some(outpost_protocol::close::REVOKED)
    );
    for g in &gws {
        let shown = g.agent(&fp).await.unwrap();
        assert_eq!(shown["presence"], "revoked", "{shown}");
    }
    // Long enough for a lost event to have come (the presence grace is 5 s).
    tokio::time::sleep(Duration::from_secs(GRACE + 2)).await;
    assert_eq!(presence.of(&fp), ["online", "revoked"]);
}
