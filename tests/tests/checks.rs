//! The check engine end to end, with the real binaries over real TLS: every kind of check
//! reaches the gateway, local `checks.d` files merge with the gateway's, soft states turn
//! hard, and badly behaved plugins never disturb the rest of the schedule.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use outpost_e2e::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(30);

fn script(dir: &Path, name: &str, body: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.display().to_string()
}

/// Wait until the bus holds at least `n` results of `check`, and return them all.
async fn at_least(gw: &Gateway, fp: &str, check: &str, n: usize, within: Duration) -> Vec<Value> {
    eventually(within, &format!("{n} results of {check}"), || async {
        let r = gw.bus_results(fp, check);
        (r.len() >= n).then_some(r)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_daemon_cron_and_local_checks_reach_the_gateway() {
    let dir = tempdir();
    let gw = Gateway::start(dir.path(), &[]);
    let json = script(
        dir.path(),
        "check_queues",
        r#"echo '{"status":"warning","text":"1 of 2 queues slow","metrics":{"depth":{"value":120,"unit":"msgs","warn":100}},"faults":[{"name":"queue-b","status":"critical","text":"stuck"}]}'"#,
    );
    let garbage = script(dir.path(), "check_garbage", "echo 'this is not json'");
    let daemon = script(
        dir.path(),
        "watch_things",
        r#"i=0; while true; do i=$((i+1)); echo "{\"status\":\"ok\",\"text\":\"tick $i\",\"metrics\":{\"i\":$i}}"; sleep 0.5; done"#,
    );
    gw.write_checks(
        "kinds.toml",
        &format!(
            r#"
[[check]]
name = "queues"
command = [{json:?}]
kind = "json"
interval = 1

[[check]]
name = "garbage"
command = [{garbage:?}]
kind = "json"
interval = 1

[[check]]
name = "watcher"
command = [{daemon:?}]
kind = "daemon"

[[check]]
name = "even-seconds"
command = ["/bin/echo", "on the second"]
cron = "*/2 * * * * *"
"#
        ),
    );
    let agent = Agent::start(dir.path(), "host-1", &gw, "labels = { role = \"db\" }\n");
    let checks_d = agent.state_dir.join("checks.d");
    std::fs::create_dir_all(&checks_d).unwrap();
    std::fs::write(
        checks_d.join("myapp.toml"),
        "[[check]]\nname = \"myapp-health\"\ncommand = [\"/bin/echo\", \"myapp fine|conns=3\"]\ninterval = 1\n\n[[check]]\nname = \"web-only\"\ncommand = \"/bin/true\"\ninterval = 1\ntarget = { labels = { role = \"web\" } }\n",
    )
    .unwrap();
    std::fs::write(checks_d.join("broken.toml"), "[[check]\nname = \n").unwrap();
    let fp = agent.fingerprint.clone();

    // JSON plugin: status never better than its worst fault, metrics and faults kept.
    let q = eventually(T, "queues result", || gw.latest(&fp, "queues")).await;
    assert_eq!(q["status"], "critical", "{q}");
    assert_eq!(q["output"], "1 of 2 queues slow");
    assert_eq!(q["metrics"][0]["name"], "depth");
    assert_eq!(q["metrics"][0]["unit"], "msgs");
    assert_eq!(q["faults"][0]["name"], "queue-b");
    assert!(
        q["long_output"]
            .as_str()
            .unwrap()
            .contains("CRITICAL: queue-b - stuck"),
        "{q}"
    );

    let g = eventually(T, "garbage result", || gw.latest(&fp, "garbage")).await;
    assert_eq!(g["status"], "unknown");
    assert!(
        g["output"].as_str().unwrap().contains("not valid JSON"),
        "{g}"
    );

    // Daemon: one result per line, from one long-running process.
    let ticks = at_least(&gw, &fp, "watcher", 4, T).await;
    let n: Vec<f64> = ticks
        .iter()
        .map(|r| r["metrics"][0]["value"].as_f64().unwrap())
        .collect();
    // One process counting up (lines faster than one a second are coalesced).
    assert!(
        n.windows(2).all(|w| w[1] > w[0]),
        "same process, counting up: {n:?}"
    );
    // A daemon reports on its own: run-now is refused, clearly.
    let (status, body) = gw
        .http(
            "POST",
            &format!("/api/v1/agents/{fp}/checks/watcher/run"),
            Some(&gw.token),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(body.to_string().contains("daemon"), "{body}");

    // Cron: at the wall clock's even seconds (no splay), every two seconds.
    let cron = at_least(&gw, &fp, "even-seconds", 3, T).await;
    let starts: Vec<u64> = cron
        .iter()
        .map(|r| r["started_at_ms"].as_u64().unwrap())
        .collect();
    for s in &starts {
        assert_eq!(
            s / 1000 % 2,
            0,
            "cron run started in an odd second: {starts:?}"
        );
    }
    assert!(
        starts.windows(2).all(|w| (w[1] - w[0]) >= 1_500),
        "{starts:?}"
    );

    // Local checks: merged with the gateway's, targeted by the agent's own labels.
    let local = eventually(T, "local check result", || gw.latest(&fp, "myapp-health")).await;
    assert_eq!(local["output"], "myapp fine");
    assert_eq!(local["metrics"][0]["name"], "conns");
    assert!(
        gw.latest(&fp, "web-only").await.is_none(),
        "targeted at role=web only"
    );
    let broken = eventually(T, "broken file reported", || {
        gw.latest(&fp, "checks.d.broken")
    })
    .await;
    assert_eq!(broken["status"], "critical");
    let text = broken["output"].as_str().unwrap();
    assert!(
        text.contains("broken.toml") && text.contains("TOML"),
        "{text}"
    );
    assert!(agent.proc.log().contains("local check file is invalid"));

    // Fixing the file clears the problem and its check runs.
    std::fs::write(
        checks_d.join("broken.toml"),
        "[[check]]\nname = \"fixed\"\ncommand = \"/bin/echo fixed\"\ninterval = 1\n",
    )
    .unwrap();
    eventually(T, "broken file fixed", || async {
        let r = gw.latest(&fp, "checks.d.broken").await?;
        (r["status"] == "ok").then_some(())
    })
    .await;
    eventually(T, "fixed check ran", || gw.latest(&fp, "fixed")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_states_retry_quickly_then_turn_hard() {
    let dir = tempdir();
    let gw = Gateway::start(dir.path(), &[]);
    gw.write_checks(
        "flaky.toml",
        r#"
[[check]]
name = "down"
command = ["/bin/sh", "-c", "echo 'service down'; exit 2"]
interval = "1h"
attempts = 3
retry_interval = 1
"#,
    );
    let agent = Agent::start(dir.path(), "host-2", &gw, "");
    let r = at_least(&gw, &agent.fingerprint, "down", 3, T).await;
    let states: Vec<(String, u64)> = r
        .iter()
        .map(|r| {
            (
                r["state_type"].as_str().unwrap().to_string(),
                r["attempt"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        states[..3],
        [("soft".into(), 1), ("soft".into(), 2), ("hard".into(), 3)],
        "{r:#?}"
    );
    assert!(r
        .iter()
        .all(|r| r["max_attempts"] == 3 && r["status"] == "critical"));
    // Retries come after the retry interval, not the hour-long interval.
    let starts: Vec<u64> = r
        .iter()
        .map(|r| r["started_at_ms"].as_u64().unwrap())
        .collect();
    for w in starts[..3].windows(2) {
        assert!((900..5_000).contains(&(w[1] - w[0])), "{starts:?}");
    }
    // Once hard, the check is back on its interval: no fourth run any time soon.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(gw.bus_results(&agent.fingerprint, "down").len(), 3);
}

/// Processes whose command line is exactly `argv`.
fn count_processes(argv: &[&str]) -> usize {
    let want = argv.join("\0") + "\0";
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .filter(|c| c == want.as_bytes())
        .count()
}

/// Run a well-behaved check every second next to `bad` (check tables misbehaving on
/// purpose) and assert that the good one kept its 1 s rhythm while `bad` did its worst
/// (`bad_ran` results of `bad_check` first), and that the connection never faltered.
/// Returns the gateway, the agent and its fingerprint for further assertions.
async fn schedule_survives(
    dir: &Path,
    bad: &str,
    bad_check: &str,
    bad_ran: usize,
) -> (Gateway, Agent, String) {
    let gw = Gateway::start(dir, &["--heartbeat", "2"]);
    gw.write_checks(
        "bad.toml",
        &format!("[[check]]\nname = \"good\"\ncommand = [\"/bin/echo\", \"fine\"]\ninterval = 1\n\n{bad}"),
    );
    let agent = Agent::start(dir, "host-bad", &gw, "");
    let fp = agent.fingerprint.clone();
    at_least(&gw, &fp, bad_check, bad_ran, T).await;
    let good = at_least(&gw, &fp, "good", 8, T).await;
    let starts: Vec<u64> = good
        .iter()
        .map(|r| r["started_at_ms"].as_u64().unwrap())
        .collect();
    let gaps: Vec<u64> = starts.windows(2).map(|w| w[1] - w[0]).collect();
    // The first run is placed by the splay; from then on it is a 1 s grid: a run late by
    // D makes gaps of 1 s + D and 1 s - D, and a missed slot a gap of 2 s. (With
    // max_concurrent_checks = 1 next to the hanging plugin this fails: gaps of 2.3 s.)
    for g in &gaps[1..] {
        assert!(
            (200..=1_800).contains(g),
            "the good check lost its rhythm next to {bad_check}: gaps {gaps:?}"
        );
    }
    let me = gw.agent(&fp).await.unwrap();
    assert_eq!(me["presence"], "online");
    let log = agent.proc.log();
    assert!(!log.contains("gateway connection ended"), "{log}");
    assert_eq!(log.matches("connected to gateway").count(), 1, "{log}");
    (gw, agent, fp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_plugin_never_delays_the_rest() {
    let dir = tempdir();
    let bad = "[[check]]\nname = \"hangs\"\ncommand = [\"/bin/sh\", \"-c\", \"sleep 600\"]\ninterval = 1\ntimeout = 2\n";
    let (gw, _agent, fp) = schedule_survives(dir.path(), bad, "hangs", 3).await;
    let hang = gw.latest(&fp, "hangs").await.unwrap();
    assert_eq!(hang["status"], "unknown");
    assert!(
        hang["output"]
            .as_str()
            .unwrap()
            .contains("timed out after 2s"),
        "{hang}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_plugin_never_delays_the_rest() {
    let dir = tempdir();
    let bad = "[[check]]\nname = \"floods\"\ncommand = [\"/bin/sh\", \"-c\", \"echo FLOOD; head -c 5000000 /dev/zero; exit 1\"]\ninterval = 1\ntimeout = 5\n";
    let (gw, _agent, fp) = schedule_survives(dir.path(), bad, "floods", 3).await;
    let flood = gw.latest(&fp, "floods").await.unwrap();
    assert_eq!(flood["output"], "FLOOD");
    assert_eq!(flood["status"], "warning");
    let long = flood["long_output"].as_str().unwrap();
    assert!(
        long.ends_with("[output truncated at 65536 bytes]"),
        "{}",
        &long[long.len().saturating_sub(300)..]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forking_plugin_never_delays_the_rest_nor_leaves_children() {
    let dir = tempdir();
    let forker = script(
        dir.path(),
        "check_forker",
        "for i in 1 2 3 4 5 6 7 8; do sleep 313 & done; echo 'forked 8 children'",
    );
    let bad = format!("[[check]]\nname = \"forks\"\ncommand = [{forker:?}]\ninterval = 1\n");
    let (gw, _agent, fp) = schedule_survives(dir.path(), &bad, "forks", 3).await;
    let forks = gw.latest(&fp, "forks").await.unwrap();
    assert_eq!(forks["status"], "ok");
    // The check still runs every second, so a run can be caught with its children alive
    // for an instant; leaked children sleep 313 s, so with a leak the count never gets to 0.
    eventually(
        T,
        "no child of the forking plugin left between runs",
        || async { (count_processes(&["sleep", "313"]) == 0).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_exiting_at_once_in_a_loop_never_delay_the_rest() {
    let dir = tempdir();
    let bad = "[[check]]\nname = \"exits-at-once\"\ncommand = [\"/bin/false\"]\ninterval = 1\n\n[[check]]\nname = \"crash-loop\"\ncommand = [\"/bin/sh\", \"-c\", \"exit 1\"]\nkind = \"daemon\"\n";
    // The daemon's five starts take 1 + 2 + 4 + 8 s of backoff.
    let (gw, _agent, fp) = schedule_survives(dir.path(), bad, "crash-loop", 5).await;
    let loop_ = gw.latest(&fp, "crash-loop").await.unwrap();
    assert_eq!(loop_["status"], "critical");
    assert!(
        loop_["output"].as_str().unwrap().contains("crash loop"),
        "{loop_}"
    );
    let false_ = gw.latest(&fp, "exits-at-once").await.unwrap();
    assert_eq!(false_["status"], "warning");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn built_in_probes_need_nothing_installed() {
    let dir = tempdir();
    let gw = Gateway::start(dir.path(), &[]);
    let port = gw.port();
    let cert = gw.data_dir.join("tls/cert.pem");
    // An application in a container answering JSON on a unix socket.
    let sock = dir.path().join("app.sock");
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s
                .write_all(br#"{"status":"ok","text":"app healthy","metrics":{"queue":3}}"#)
                .await;
        }
    });
    gw.write_checks(
        "builtin.toml",
        &format!(
            r#"
[[check]]
name = "mem"
memory = {{ warn = 99.9, crit = 100 }}
interval = 1

[[check]]
name = "root-disk"
disk = {{ path = "/" }}
interval = 1

[[check]]
name = "loadavg"
load = {{}}
interval = 1

[[check]]
name = "gateway-port"
tcp = {{ host = "127.0.0.1", port = {port} }}
interval = 1

[[check]]
name = "closed-port"
tcp = {{ host = "127.0.0.1", port = 1 }}
interval = 1

[[check]]
name = "gateway-health"
http = {{ url = "https://127.0.0.1:{port}/healthz", ca_file = {cert:?}, cert_warn_days = 1000000 }}
interval = 1

[[check]]
name = "gateway-metrics"
prometheus = {{ url = "https://localhost:{port}/metrics", ca_file = {cert:?}, metrics = ["outpost_"] }}
interval = 1

[[check]]
name = "app-socket"
json_socket = {{ address = "unix:{sock}" }}
interval = 1
"#,
            cert = cert.display().to_string(),
            sock = sock.display(),
        ),
    );
    let agent = Agent::start(dir.path(), "host-4", &gw, "");
    let fp = agent.fingerprint.clone();
    let get = |check: &'static str| {
        let (gw, fp) = (&gw, fp.clone());
        async move { eventually(T, check, || gw.latest(&fp, check)).await }
    };
    let metric = |r: &Value, name: &str| -> f64 {
        r["metrics"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("no metric {name} in {r}"))["value"]
            .as_f64()
            .unwrap()
    };

    let mem = get("mem").await;
    assert_eq!(mem["status"], "ok", "{mem}");
    assert!(mem["metrics"].as_array().unwrap().len() >= 2, "{mem}");

    let disk = get("root-disk").await;
    assert_eq!(disk["status"], "ok", "{disk}");
    assert!(!disk["metrics"].as_array().unwrap().is_empty(), "{disk}");

    let load = get("loadavg").await;
    assert_eq!(load["status"], "ok", "{load}");

    let tcp = get("gateway-port").await;
    assert_eq!(tcp["status"], "ok", "{tcp}");
    let closed = get("closed-port").await;
    assert_eq!(closed["status"], "critical", "{closed}");

    // The gateway's self-signed certificate runs to the year 4096: fewer than a million days.
    let http = get("gateway-health").await;
    assert_eq!(http["status"], "warning", "{http}");
    assert_eq!(metric(&http, "status"), 200.0);
    assert!(metric(&http, "cert_days_left") > 0.0, "{http}");

    let prom = get("gateway-metrics").await;
    assert_eq!(prom["status"], "ok", "{prom}");
    let names: Vec<&str> = prom["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    // Only the wanted samples, and the certificate's days left of the HTTPS scrape.
    assert!(
        names
            .iter()
            .all(|n| n.starts_with("outpost_") || *n == "cert_days_left"),
        "{names:?}"
    );
    assert!(
        names
            .iter()
            .any(|n| n.starts_with("outpost_agents_connected")),
        "{names:?}"
    );

    let app = get("app-socket").await;
    assert_eq!(app["output"], "app healthy", "{app}");
    assert_eq!(metric(&app, "queue"), 3.0);
}
