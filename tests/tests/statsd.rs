//! StatsD on the agent, fed by the `statsd` client from PyPI (the one applications use):
//! a known mix of counters with sample rates, gauges with deltas, timers, sets and a
//! DogStatsD-tagged line, over UDP and TCP; the agent stopped (its last interval flushed
//! into the outbox) and started again: the result on the bus holds exactly the expected
//! aggregates. A flood of distinct names stays within `max_names`, the rest counted.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use outpost_e2e::{eventually, free_ports, tempdir, Agent, Gateway, Value};

/// Run the statsd client on `port` with `script` (Python; `c` is a UDP client, `t` a TCP
/// one, both with prefix `app`, `raw(line)` sends a line as is; sampling always sends).
fn send(port: u16, script: &str) {
    let program = format!(
        "import random, socket, statsd\n\
         random.random = lambda: 0.0  # a sample rate below 1 always sends (with its @rate)\n\
         c = statsd.StatsClient('127.0.0.1', {port}, prefix='app')\n\
         t = statsd.TCPStatsClient('127.0.0.1', {port}, prefix='app')\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         def raw(line): s.sendto(line.encode(), ('127.0.0.1', {port}))\n\
         {script}\n\
         t.close()\n"
    );
    let out = Command::new("python3")
        .args(["-c", &program])
        .output()
        .expect("python3 (ci/setup installs the statsd package)");
    assert!(
        out.status.success(),
        "the statsd client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The metrics of every `statsd` result the agent stored, by name.
fn statsd_metrics(gw: &Gateway, fp: &str) -> (BTreeMap<String, f64>, Vec<Value>) {
    metrics_of(gw, fp, "statsd")
}

/// The metrics of every result of `check` the agent stored, by name.
fn metrics_of(gw: &Gateway, fp: &str, check: &str) -> (BTreeMap<String, f64>, Vec<Value>) {
    let results = gw.bus_results(fp, check);
    let mut m = BTreeMap::new();
    for r in &results {
        for x in r["metrics"].as_array().into_iter().flatten() {
            m.insert(
                x["name"].as_str().unwrap().to_string(),
                x["value"].as_f64().unwrap(),
            );
        }
    }
    (m, results)
}

/// A port free now whose next one is free too (StatsD on it, Graphite on the next).
fn two_ports() -> u16 {
    loop {
        let p = free_ports(1)[0];
        let free = |q: u16| {
            std::net::TcpListener::bind(("127.0.0.1", q)).is_ok()
                && std::net::UdpSocket::bind(("127.0.0.1", q)).is_ok()
        };
        if p < u16::MAX && free(p) && free(p + 1) {
            return p;
        }
    }
}

fn agent_toml(gw: &Gateway, name: &str, port: u16, max_names: usize) -> String {
    format!(
        "gateway_url = {:?}\nenroll_key = {:?}\npin_sha256 = {:?}\nhostname = {name:?}\n\
         [statsd]\nlisten = \"127.0.0.1:{port}\"\nflush_secs = 3600\nmax_names = {max_names}\npercentiles = [90, 99.9]\n\
         [graphite]\nlisten = \"127.0.0.1:{}\"\nflush_secs = 3600\nmax_names = {max_names}\n",
        gw.url(),
        gw.enroll_key,
        gw.pin,
        port + 1
    )
}

/// Stop the agent (SIGTERM: its last interval goes into the outbox) and start it again
/// with the same settings, so the result reaches the gateway.
async fn stop_and_start(agent: &mut Agent, dir: &std::path::Path, name: &str, toml: &str) {
    agent.proc.signal(libc::SIGTERM);
    assert!(
        agent
            .proc
            .wait_exit(Duration::from_secs(30))
            .await
            .is_some(),
        "the agent stopped"
    );
    let _ = std::fs::rename(
        dir.join(format!("{name}.log")),
        dir.join(format!("{name}.log.1")),
    );
    *agent = Agent::start_with_config(dir, name, toml);
}

/// Agent `a1` of `gw` with StatsD on `port` and Graphite on `port + 1` (`max_names`
/// each): its configuration, and the agent once both listeners are bound (each logs it).
async fn listening(
    dir: &std::path::Path,
    gw: &Gateway,
    port: u16,
    max_names: usize,
) -> (String, Agent) {
    let toml = agent_toml(gw, "a1", port, max_names);
    let agent = Agent::start_with_config(dir, "a1", &toml);
    eventually(
        Duration::from_secs(30),
        "statsd and graphite listening",
        || async {
            let log = agent.proc.log();
            (log.matches("listening for the host's metrics").count() == 2).then_some(())
        },
    )
    .await;
    (toml, agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_mix_from_the_statsd_client_gives_the_exact_aggregates() {
    let dir = tempdir();
    let gw = Gateway::start(dir.path(), &[]);
    let port = two_ports();
    let (toml, mut agent) = listening(dir.path(), &gw, port, 1000).await;
    let fp = agent.fingerprint.clone();
    send(
        port,
        "c.incr('hits')\n\
         c.incr('hits', 2, rate=0.5)\n\
         c.gauge('level', 10)\n\
         c.gauge('level', 5, delta=True)\n\
         c.gauge('level', -3, delta=True)\n\
         for v in (10, 20, 30, 40): c.timing('lat', v)\n\
         c.timing('lat', 50, rate=0.5)\n\
         c.set('users', 'alice')\n\
         c.set('users', 'bob')\n\
         c.set('users', 'alice')\n\
         t.incr('tcp_hits', 3)\n\
         t.timing('tcp_lat', 7)\n\
         raw('app.tagged:4|c|#env:prod,az:b')\n\
         raw('app.tagged:1|c|#az:b,env:prod')\n\
         raw('not a statsd line')",
    );
    // (Datagrams on loopback arrive in a moment; TCP before `close` returned.)
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_and_start(&mut agent, dir.path(), "a1", &toml).await;
    let (m, results) = eventually(
        Duration::from_secs(30),
        "the statsd result stored",
        || async {
            let (m, r) = statsd_metrics(&gw, &fp);
            m.contains_key("app.hits").then_some((m, r))
        },
    )
    .await;
    assert_eq!(m["app.hits"], 5.0, "1, and 2 sent at a rate of 0.5");
    assert_eq!(m["app.level"], 12.0, "10, +5, -3");
    assert_eq!(m["app.lat.count"], 6.0, "four at rate 1, one at 0.5");
    assert_eq!((m["app.lat.min"], m["app.lat.max"]), (10.0, 50.0));
    assert_eq!((m["app.lat.sum"], m["app.lat.mean"]), (150.0, 30.0));
    assert_eq!(m["app.lat.median"], 30.0);
    assert_eq!((m["app.lat.p90"], m["app.lat.p99_9"]), (50.0, 50.0));
    assert_eq!(m["app.users.count"], 2.0);
    assert_eq!(m["app.tcp_hits"], 3.0, "over TCP");
    assert_eq!(m["app.tcp_lat.count"], 1.0);
    assert_eq!(
        m["app.tagged;az=b;env=prod"], 5.0,
        "tags in either order are one series"
    );
    let output = results[0]["output"].as_str().unwrap();
    assert!(output.contains("1 refused"), "{output}");
    assert_eq!(results[0]["status"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_names_stays_within_max_names_and_says_how_many_were_dropped() {
    let dir = tempdir();
    let gw = Gateway::start(dir.path(), &[]);
    let port = two_ports();
    let (toml, mut agent) = listening(dir.path(), &gw, port, 100).await;
    let fp = agent.fingerprint.clone();
    // 5,000 names over TCP (nothing lost on the way).
    send(port, "for i in range(5000): t.incr('n%d' % i)");
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_and_start(&mut agent, dir.path(), "a1", &toml).await;
    let (m, results) = eventually(
        Duration::from_secs(30),
        "the statsd result stored",
        || async {
            let (m, r) = statsd_metrics(&gw, &fp);
            (!r.is_empty()).then_some((m, r))
        },
    )
    .await;
    let counters = m.keys().filter(|k| !k.ends_with(".rate")).count();
    assert_eq!(counters, 100, "max_names series kept");
    let output = results[0]["output"].as_str().unwrap();
    assert!(output.contains("4900 values dropped"), "{output}");
    assert_eq!(results[0]["status"], "warning");
}

/// Graphite plaintext from an application, over TCP and UDP: the latest value of each
/// path in the interval; a line that is not `path value [timestamp]` refused, counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graphite_lines_from_an_application_give_the_latest_value_of_each_path() {
    let dir = tempdir();
    let gw = Gateway::start(dir.path(), &[]);
    let port = two_ports();
    let (toml, mut agent) = listening(dir.path(), &gw, port, 1000).await;
    let fp = agent.fingerprint.clone();
    let graphite = port + 1;
    send(
        port,
        &format!(
            "g = socket.create_connection(('127.0.0.1', {graphite}))\n\
             g.sendall(b'app.cpu 12.5 1700000000\\napp.cpu 13.5\\napp.mem 100\\nnot a graphite line\\n')\n\
             g.close()\n\
             s.sendto(b'app.udp 7', ('127.0.0.1', {graphite}))"
        ),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_and_start(&mut agent, dir.path(), "a1", &toml).await;
    let (m, results) = eventually(
        Duration::from_secs(30),
        "the graphite result stored",
        || async {
            let (m, r) = metrics_of(&gw, &fp, "graphite");
            (!r.is_empty()).then_some((m, r))
        },
    )
    .await;
    assert_eq!(m.len(), 3, "{m:?}");
    assert_eq!(
        (m["app.cpu"], m["app.mem"], m["app.udp"]),
        (13.5, 100.0, 7.0)
    );
    let output = results[0]["output"].as_str().unwrap();
    assert_eq!(output, "3 metrics from Graphite (5 lines, 1 refused)");
}
