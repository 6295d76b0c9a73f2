//! The whole path with the real binaries over real TLS on loopback: enrollment, checks
//! defined on the gateway, results through the API, config changes without restart,
//! run-now, refusals, bad frames, and a clean bye.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use futures_util::SinkExt;
use outpost_e2e::*;
use tokio_tungstenite::tungstenite::Message;

const T: Duration = Duration::from_secs(20);

/// A plugin script that prints Nagios output with perfdata and exits with `code`.
fn plugin(dir: &std::path::Path, name: &str, body: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_enrolls_runs_gateway_checks_and_answers_run_now() {
    let dir = tempdir();
    let gw = Gateway::start(dir.path(), &[]);
    let p = plugin(
        dir.path(),
        "check_temp",
        "echo \"TEMP WARNING - 71C|'cpu temp'=71C;70;90;0;120 fan=2200rpm\"\necho 'sensor A fine'\nexit 1",
    );
    gw.write_checks(
        "temp.toml",
        &format!("[[check]]\nname = \"temp\"\ncommand = [{p:?}]\ninterval = 1\ntimeout = 5\n"),
    );
    let agent = Agent::start(dir.path(), "web-1", &gw, "labels = { role = \"web\" }\n");

    // The agent enrolled: its secret is stored, private to it.
    let secret = agent.state_dir.join("agent.secret");
    eventually(T, "secret stored", || async {
        secret.exists().then_some(())
    })
    .await;
    assert_eq!(
        std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let listed = gw.api("/agents").await;
    let me = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["fingerprint"] == agent.fingerprint.as_str())
        .expect("agent listed");
    assert_eq!(me["hostname"], "web-1");
    assert_eq!(me["presence"], "online");
    assert_eq!(me["labels"]["role"], "web");

    let latest = eventually(T, "scheduled result for temp", || {
        gw.latest(&agent.fingerprint, "temp")
    })
    .await;
    assert_eq!(latest["status"], "warning");
    assert_eq!(latest["exit_code"], 1);
    assert_eq!(latest["output"], "TEMP WARNING - 71C");
    assert_eq!(latest["long_output"], "sensor A fine");
    assert_eq!(latest["origin"], "schedule");
    let m = &latest["metrics"];
    assert_eq!(m[0]["name"], "cpu temp");
    assert_eq!(m[0]["value"], 71.0);
    assert_eq!(m[0]["unit"], "C");
    assert_eq!(m[0]["warn"], "70");
    assert_eq!(m[0]["crit"], "90");
    assert_eq!(m[0]["max"], 120.0);
    assert_eq!(m[1]["name"], "fan");
    assert_eq!(m[1]["unit"], "rpm");

    // Run now: a fresh result, newer than anything scheduled so far.
    let before = gw.latest(&agent.fingerprint, "temp").await.unwrap();
    let (status, fresh) = gw
        .http(
            "POST",
            &format!("/api/v1/agents/{}/checks/temp/run", agent.fingerprint),
            Some(&gw.token),
        )
        .await;
    assert_eq!(status, 200, "{fresh}");
    assert_eq!(fresh["origin"], "run_now");
    assert_eq!(fresh["status"], "warning");
    assert!(fresh["seq"].as_u64().unwrap() > before["seq"].as_u64().unwrap());
    assert!(fresh["started_at_ms"].as_u64().unwrap() >= before["started_at_ms"].as_u64().unwrap());

    // The embedded bus holds the results durably, each sequence number once.
    let seqs: Vec<u64> = gw
        .bus_log("results")
        .iter()
        .map(|l| l["result"]["seq"].as_u64().unwrap())
        .collect();
    let mut dedup = seqs.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(
        seqs.len(),
        dedup.len(),
        "no sequence number twice on the bus"
    );
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order: {seqs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_check_files_changes_what_the_agent_runs_without_restart() {
    let dir = tempdir();
    let gw = Gateway::start(dir.path(), &[]);
    gw.write_checks(
        "a.toml",
        "[[check]]\nname = \"steady\"\ncommand = \"/bin/echo steady\"\ninterval = 1\n\n[[check]]\nname = \"moving\"\ncommand = \"/bin/echo version-1\"\ninterval = 1\n",
    );
    // Checks targeted elsewhere must not reach this agent.
    gw.write_checks(
        "db.toml",
        "[[check]]\nname = \"db_only\"\ncommand = \"/bin/true\"\ninterval = 1\ntarget = { labels = { role = \"db\" } }\n",
    );
    let mut agent = Agent::start(dir.path(), "app-1", &gw, "labels = { role = \"web\" }\n");
    let fp = agent.fingerprint.clone();
    let first = eventually(T, "version-1 result", || async {
        gw.latest(&fp, "moving")
            .await
            .filter(|l| l["output"] == "version-1")
    })
    .await;
    let checks = gw.api(&format!("/agents/{fp}/checks")).await;
    let names: Vec<&str> = checks
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["check"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        vec!["moving", "steady"],
        "db_only is targeted at role=db"
    );

    gw.write_checks(
        "a.toml",
        "[[check]]\nname = \"steady\"\ncommand = \"/bin/echo steady\"\ninterval = 1\n\n[[check]]\nname = \"moving\"\ncommand = \"/bin/echo version-2\"\ninterval = 1\n\n[[check]]\nname = \"added\"\ncommand = [\"/bin/echo\", \"new check\"]\ninterval = 1\n",
    );
    eventually(T, "version-2 result", || async {
        gw.latest(&fp, "moving")
            .await
            .filter(|l| l["output"] == "version-2")
    })
    .await;
    eventually(T, "added check result", || gw.latest(&fp, "added")).await;
    assert!(agent.proc.is_running(), "no restart needed");
    // Only the changed and added checks were rescheduled, and the agent said what changed.
    let log = agent.proc.log();
    assert!(
        log.contains("~ moving: probe:") && log.contains("version-2"),
        "{log}"
    );
    assert!(
        log.contains("+ added: /bin/echo new check (every 1s)"),
        "{log}"
    );
    assert!(!log.contains("~ steady"), "{log}");
    // A broken edit keeps the last good version running.
    gw.write_checks("a.toml", "[[check]]\nname = \"moving\"\ncommand = \n");
    gw.proc.wait_for_log("check file is invalid", T).await;
    let after = gw.latest(&fp, "steady").await.unwrap()["seq"]
        .as_u64()
        .unwrap();
    eventually(T, "steady keeps running", || async {
        gw.latest(&fp, "steady")
            .await
            .filter(|l| l["seq"].as_u64().unwrap() > after)
    })
    .await;
    assert!(first["seq"].as_u64().unwrap() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_enrollment_key_is_refused_and_logged() {
    let dir = tempdir();
    let gw = Gateway::start(dir.path(), &[]);
    let toml = format!(
        "gateway_url = {:?}\nenroll_key = \"not-the-key\"\npin_sha256 = {:?}\n",
        gw.url(),
        gw.pin
    );
    let agent = Agent::start_with_config(dir.path(), "intruder", &toml);
    agent.proc.wait_for_log("enrollment key refused", T).await;
    assert!(gw.proc.log().contains("agent refused"), "{}", gw.proc.log());
    assert!(gw.metric("outpost_auth_failures_total").await >= 1);
    assert_eq!(gw.api("/agents").await.as_array().unwrap().len(), 0);
    assert!(!agent.state_dir.join("agent.secret").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_refuses_a_gateway_it_does_not_trust() {
    let dir = tempdir();
    let gw = Gateway::start(dir.path(), &[]);
    let wrong_pin = "0".repeat(64);
    let toml = format!(
        "gateway_url = {:?}\nenroll_key = {:?}\npin_sha256 = {wrong_pin:?}\n",
        gw.url(),
        gw.enroll_key
    );
    let agent = Agent::start_with_config(dir.path(), "wary", &toml);
    agent
        .proc
        .wait_for_log("does not match pin_sha256", T)
        .await;
    // A CA file that did not sign the gateway's certificate is refused too.
    let other = tempdir();
    let other_gw = Gateway::start(other.path(), &[]);
    let toml = format!(
        "gateway_url = \"wss://localhost:{}\"\nenroll_key = {:?}\nca_file = {:?}\n",
        gw.port(),
        gw.enroll_key,
        other_gw.data_dir.join("tls/cert.pem").display().to_string()
    );
    let agent2 = Agent::start_with_config(dir.path(), "wary2", &toml);
    eventually(T, "agent logs the untrusted certificate", || async {
        let log = agent2.proc.log();
        (log.contains("TLS handshake") && log.contains("failed")).then_some(())
    })
    .await;
    assert_eq!(
        gw.api("/agents").await.as_array().unwrap().len(),
        0,
        "nobody enrolled"
    );

    // The right CA file works, with the host name checked.
    let toml = format!(
        "gateway_url = \"wss://localhost:{}\"\nenroll_key = {:?}\nca_file = {:?}\n",
        gw.port(),
        gw.enroll_key,
        gw.data_dir.join("tls/cert.pem").display().to_string()
    );
    let trusting = Agent::start_with_config(dir.path(), "trusting", &toml);
    eventually(T, "agent with the right CA connects", || async {
        gw.agent(&trusting.fingerprint)
            .await
            .filter(|a| a["presence"] == "online")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_ws_urls_and_bad_configs_are_refused_at_start() {
    let dir = tempdir();
    let config = dir.path().join("agent.toml");
    for (toml, says) in [
        (
            "gateway_url = \"ws://127.0.0.1:1\"\nskip_verify = true\n",
            "unknown field `skip_verify`",
        ),
        ("gateway_url = \"ws://127.0.0.1:1\"\n", "must use wss://"),
    ] {
        std::fs::write(&config, toml).unwrap();
        let out = std::process::Command::new(bin("outpost-agent"))
            .args(["run", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(78), "EX_CONFIG for {toml:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{err}");
    }
}

#[test]
fn gateway_options_out_of_range_are_all_named_and_exit_78() {
    let dir = tempdir();
    let run = |args: &[&str]| {
        std::process::Command::new(bin("outpost-gateway"))
            .arg("serve")
            .arg("--data-dir")
            .arg(dir.path().join("gw"))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .output()
            .unwrap()
    };
    // Three problems at once: each is named with its allowed range, none is clamped.
    let out = run(&[
        "--heartbeat",
        "0",
        "--hello-timeout",
        "99999",
        "--bus",
        "nats://127.0.0.1:1",
        "--dedup-window-secs",
        "0",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "EX_CONFIG: {err}");
    for says in [
        "--heartbeat 0: use 1..=3600 seconds",
        "--hello-timeout 99999: use 1..=3600 seconds",
        "--dedup-window-secs 0: use 1..=86400 seconds",
    ] {
        assert!(err.contains(says), "{says:?} not in {err}");
    }
    // A certificate file that is not one: a configuration error too.
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    let out = run(&[
        "--tls-cert",
        junk.to_str().unwrap(),
        "--tls-key",
        junk.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("--tls-cert/--tls-key"), "{err}");
    // An option that does not exist: a usage error.
    let out = run(&["--no-such-option"]);
    assert_eq!(out.status.code(), Some(64), "EX_USAGE");
    // Its help is no error.
    let out = run(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_close_only_their_connection() {
    let dir = tempdir();
    // A 1 s heartbeat: the good agent's pings and pongs must keep it connected throughout.
    let gw = Gateway::start(dir.path(), &["--hello-timeout", "1", "--heartbeat", "1"]);
    gw.write_checks(
        "c.toml",
        "[[check]]\nname = \"tick\"\ncommand = \"/bin/echo tick\"\ninterval = 1\n",
    );
    let agent = Agent::start(dir.path(), "good", &gw, "");
    let fp = agent.fingerprint.clone();
    let seq0 = eventually(T, "good agent reports", || gw.latest(&fp, "tick")).await["seq"]
        .as_u64()
        .unwrap();

    // Garbage instead of JSON.
    let mut ws = raw_ws(&gw).await;
    ws.send(Message::Text("\u{1}garbage{".into()))
        .await
        .unwrap();
    assert_eq!(
        close_code(&mut ws, T).await,
        Some(outpost_protocol::close::MALFORMED)
    );

    // A text frame that is not UTF-8, before hello.
    let mut ws = raw_ws(&gw).await;
    ws.send(not_utf8()).await.unwrap();
    assert_eq!(
        close_code(&mut ws, T).await,
        Some(outpost_protocol::close::MALFORMED)
    );

    // An authenticated connection that then sends garbage, a text frame that is not
    // UTF-8, results past a documented bound (70 faults of at most 64; a seq of 2^63,
    // which would raise the agent's numbering for good), then one over the size limit.
    let result = |seq: u64, faults: usize| {
        let fault = r#"{"name":"f","status":"critical"}"#;
        let faults = vec![fault; faults].join(",");
        format!(
            r#"{{"type":"results","results":[{{"seq":{seq},"check":"c","status":"critical","output":"","started_at_ms":1,"duration_ms":0,"faults":[{faults}]}}]}}"#
        )
    };
    let text = |t: String| Message::Text(t.into());
    for (bad, code) in [
        (
            text("{\"type\":\"results\",\"results\":\"nope\"}".to_string()),
            outpost_protocol::close::MALFORMED,
        ),
        (not_utf8(), outpost_protocol::close::MALFORMED),
        (text(result(1, 70)), outpost_protocol::close::MALFORMED),
        (text(result(1 << 63, 0)), outpost_protocol::close::MALFORMED),
        (
            text(format!(
                "{{\"type\":\"bye\",\"reason\":\"{}\"}}",
                "y".repeat(2 << 20)
            )),
            outpost_protocol::close::TOO_BIG,
        ),
    ] {
        let key = gw.enroll_key.clone();
        let credential = outpost_protocol::Credential::EnrollKey {
            key,
            proof: String::new(),
        };
        let fp = uuid_v4();
        let (mut ws, _) = raw_session(&gw, &fp, credential).await;
        let _ = ws.send(bad).await;
        assert_eq!(close_code(&mut ws, T).await, Some(code));
        // Nothing of a refused batch reaches the bus.
        assert_eq!(gw.bus_all(&fp), Vec::<Value>::new());
    }
    // The same result within the bounds (64 faults) is taken.
    let key = gw.enroll_key.clone();
    let credential = outpost_protocol::Credential::EnrollKey {
        key,
        proof: String::new(),
    };
    let (mut ws, _) = raw_session(&gw, &uuid_v4(), credential).await;
    ws.send(text(result(1, 64))).await.unwrap();
    loop {
        let frame = next_json(&mut ws).await;
        if frame["type"] == "ack" {
            assert_eq!(frame["seq"], 1, "{frame}");
            break;
        }
    }

    // A frame over the 1 MiB limit before hello.
    let mut ws = raw_ws(&gw).await;
    let big = format!(
        "{{\"type\":\"bye\",\"reason\":\"{}\"}}",
        "x".repeat(2 << 20)
    );
    let _ = ws.send(Message::Text(big.into())).await;
    assert_eq!(
        close_code(&mut ws, T).await,
        Some(outpost_protocol::close::TOO_BIG)
    );

    // Anything but hello first.
    let mut ws = raw_ws(&gw).await;
    ws.send(Message::Text(r#"{"type":"results","results":[]}"#.into()))
        .await
        .unwrap();
    assert_eq!(
        close_code(&mut ws, T).await,
        Some(outpost_protocol::close::POLICY)
    );

    // A hello with a field missing is answered like an invalid one: the client is told
    // which field, then closed with 1008.
    let mut ws = raw_ws(&gw).await;
    ws.send(Message::Text(r#"{"type":"hello","protocol":2}"#.into()))
        .await
        .unwrap();
    let error = next_json(&mut ws).await;
    assert_eq!(error["code"], "invalid_hello", "{error}");
    assert!(
        error["message"].as_str().unwrap().contains("missing field"),
        "{error}"
    );
    assert_eq!(
        close_code(&mut ws, T).await,
        Some(outpost_protocol::close::POLICY)
    );

    // A ping before hello is answered and ignored; the hello after it is welcome.
    let mut ws = raw_ws(&gw).await;
    ws.send(Message::Ping(b"early".to_vec().into()))
        .await
        .unwrap();
    let key = gw.enroll_key.clone();
    let hello = raw_hello(
        &uuid_v4(),
        outpost_protocol::Credential::EnrollKey {
            key,
            proof: String::new(),
        },
        "pinger",
    );
    ws.send(Message::Text(outpost_protocol::encode(&hello).into()))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "welcome");

    // Binary frames are not part of the protocol.
    let mut ws = raw_ws(&gw).await;
    ws.send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    assert_eq!(
        close_code(&mut ws, T).await,
        Some(outpost_protocol::close::POLICY)
    );

    // Silence: hello must come within the deadline (1 s here).
    let mut ws = raw_ws(&gw).await;
    assert_eq!(
        close_code(&mut ws, Duration::from_secs(5)).await,
        Some(outpost_protocol::close::HELLO_TIMEOUT)
    );

    // A plain request on the websocket path is refused at the HTTP level.
    let (status, body) = gw.http("GET", "/ws", None).await;
    assert!(status >= 400, "{status} {body}");

    // Every refusal that is the sender's malformed frame is counted as one: garbage
    // twice, not-UTF-8 twice, the two results past their bounds, the hello missing a
    // field.
    assert_eq!(
        gw.metric("outpost_frames_rejected_total{reason=\"malformed\"}")
            .await,
        7
    );
    assert!(
        gw.metric("outpost_frames_rejected_total{reason=\"too_big\"}")
            .await
            >= 1
    );
    assert!(
        gw.metric("outpost_frames_rejected_total{reason=\"out_of_order\"}")
            .await
            >= 2
    );
    assert!(gw.metric("outpost_hello_timeouts_total").await >= 1);

    // The well-behaved agent never noticed.
    eventually(T, "good agent keeps reporting", || async {
        gw.latest(&fp, "tick")
            .await
            .filter(|l| l["seq"].as_u64().unwrap() > seq0 + 2)
    })
    .await;
    assert_eq!(gw.agent(&fp).await.unwrap()["presence"], "online");
    let (status, _) = gw
        .http(
            "POST",
            &format!("/api/v1/agents/{fp}/checks/tick/run"),
            Some(&gw.token),
        )
        .await;
    assert_eq!(status, 200);
    assert!(
        !agent.proc.log().contains("gateway connection ended"),
        "{}",
        agent.proc.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_requires_a_token_and_answers_fast_for_absent_agents() {
    let dir = tempdir();
    let gw = Gateway::start(dir.path(), &[]);
    assert_eq!(gw.http("GET", "/healthz", None).await.0, 200);
    assert_eq!(gw.http("GET", "/api/v1/agents", None).await.0, 401);
    assert_eq!(gw.http("GET", "/api/v1/agents", Some("wrong")).await.0, 401);
    let (status, body) = gw.http("GET", "/", None).await;
    assert_eq!(status, 200);
    assert!(body.as_str().unwrap().contains("Outpost console"));

    gw.write_checks(
        "c.toml",
        "[[check]]\nname = \"tick\"\ncommand = \"/bin/echo tick\"\ninterval = 1\n",
    );
    let mut agent = Agent::start(dir.path(), "leaver", &gw, "");
    let fp = agent.fingerprint.clone();
    eventually(T, "result", || gw.latest(&fp, "tick")).await;

    let run = |check: &'static str, fp: String| {
        let gw = &gw;
        async move {
            let started = std::time::Instant::now();
            let (status, body) = gw
                .http(
                    "POST",
                    &format!("/api/v1/agents/{fp}/checks/{check}/run"),
                    Some(&gw.token),
                )
                .await;
            (status, body, started.elapsed())
        }
    };
    let (status, body, _) = run("nope", fp.clone()).await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("not configured"),
        "{body}"
    );
    let (status, _, _) = run("tick", "00000000-0000-4000-8000-000000000000".into()).await;
    assert_eq!(status, 404);

    // SIGTERM: the agent says bye, exits cleanly, and shows as deregistered.
    agent.proc.signal(libc::SIGTERM);
    assert_eq!(agent.proc.wait_exit(Duration::from_secs(10)).await, Some(0));
    let rec = eventually(T, "deregistered", || async {
        gw.agent(&fp)
            .await
            .filter(|a| a["presence"] == "deregistered")
    })
    .await;
    assert_eq!(rec["connected"], false);
    let (status, body, took) = run("tick", fp.clone()).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("not connected"),
        "{body}"
    );
    assert!(
        took < Duration::from_secs(2),
        "absent agent answered in {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_and_results_survive_a_gateway_restart() {
    let dir = tempdir();
    let mut gw = Gateway::start(dir.path(), &[]);
    gw.write_checks(
        "c.toml",
        "[[check]]\nname = \"tick\"\ncommand = \"/bin/echo tick\"\ninterval = 1\n",
    );
    let agent = Agent::start(dir.path(), "stayer", &gw, "reconnect_max_secs = 1\n");
    let fp = agent.fingerprint.clone();
    let before = eventually(T, "result", || gw.latest(&fp, "tick")).await["seq"]
        .as_u64()
        .unwrap();
    let listen = gw.addr.clone();
    gw.proc.signal(libc::SIGTERM);
    assert_eq!(gw.proc.wait_exit(Duration::from_secs(15)).await, Some(0));
    drop(gw);
    let gw = Gateway::start_on(dir.path(), &listen, &[]);
    // Same pin, same enrollment: the agent comes back with its secret.
    eventually(T, "agent back online", || async {
        gw.agent(&fp).await.filter(|a| a["presence"] == "online")
    })
    .await;
    let latest = gw
        .latest(&fp, "tick")
        .await
        .expect("latest result recovered from the bus");
    assert!(latest["seq"].as_u64().unwrap() >= before);
    eventually(T, "new results after restart", || async {
        gw.latest(&fp, "tick")
            .await
            .filter(|l| l["seq"].as_u64().unwrap() > before + 1)
    })
    .await;
    assert_eq!(
        agent
            .proc
            .log()
            .matches("enrolled with the gateway")
            .count(),
        1,
        "reconnected with its secret, no second enrollment"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_plugins_are_fetched_by_hash_verified_and_updated() {
    let dir = tempdir();
    let catalog = dir.path().join("catalog");
    std::fs::create_dir_all(&catalog).unwrap();
    // The real catalog's check_mem, plus a plugin this test rewrites.
    let repo_plugins = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins");
    std::fs::copy(repo_plugins.join("check_mem"), catalog.join("check_mem")).unwrap();
    plugin(&catalog, "check_version", "echo 'VERSION OK - v1'");
    let catalog_arg = catalog.display().to_string();
    let gw = Gateway::start(dir.path(), &["--plugins-dir", &catalog_arg]);
    gw.write_checks(
        "p.toml",
        "[[check]]\nname = \"mem\"\nplugin = \"check_mem\"\nargs = [\"-w\", \"99\", \"-c\", \"100\"]\ninterval = 1\n\n[[check]]\nname = \"version\"\nplugin = \"check_version\"\ninterval = 1\n\n[[check]]\nname = \"ghost\"\nplugin = \"check_missing\"\ninterval = 1\n",
    );
    let agent = Agent::start(dir.path(), "plugged", &gw, "");
    let fp = agent.fingerprint.clone();
    let mem = eventually(T, "check_mem result", || async {
        gw.latest(&fp, "mem")
            .await
            .filter(|l| l["output"].as_str().unwrap_or("").starts_with("MEM "))
    })
    .await;
    assert_eq!(mem["status"], "ok", "{mem}");
    assert!(mem["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["name"] == "used" && m["unit"] == "%"));
    // Installed byte for byte, executable, under the agent's plugin directory.
    let installed = agent.state_dir.join("plugins/check_mem");
    assert_eq!(
        std::fs::read(&installed).unwrap(),
        std::fs::read(catalog.join("check_mem")).unwrap()
    );
    assert_eq!(
        std::fs::metadata(&installed).unwrap().permissions().mode() & 0o777,
        0o755
    );
    // A check naming a plugin that is not in the catalog is refused on the gateway.
    assert!(
        gw.proc.log().contains("not in the catalog"),
        "{}",
        gw.proc.log()
    );
    assert!(gw.latest(&fp, "ghost").await.is_none());

    // A new version in the catalog reaches the agent without a restart.
    eventually(T, "v1 result", || async {
        gw.latest(&fp, "version")
            .await
            .filter(|l| l["output"] == "VERSION OK - v1")
    })
    .await;
    plugin(&catalog, "check_version", "echo 'VERSION OK - v2'");
    eventually(T, "v2 result", || async {
        gw.latest(&fp, "version")
            .await
            .filter(|l| l["output"] == "VERSION OK - v2")
    })
    .await;

    // A plugin changed behind the agent's back is refused, never run.
    std::fs::write(&installed, "#!/bin/sh\necho 'MEM OK - tampered'\n").unwrap();
    let refused = eventually(T, "tampered plugin refused", || async {
        gw.latest(&fp, "mem")
            .await
            .filter(|l| l["status"] == "unknown")
    })
    .await;
    assert!(
        refused["output"]
            .as_str()
            .unwrap()
            .contains("does not match sha256"),
        "{refused}"
    );
}

/// Run openssl, panicking with its output when it fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_serves_a_given_certificate_that_agents_verify_by_ca_and_name() {
    let dir = tempdir();
    let (ca, cert, key) = test_pki(&dir.path().join("pki"), "localhost");
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let gw = Gateway::start(dir.path(), &["--tls-cert", &cert, "--tls-key", &key]);
    assert!(
        !gw.data_dir.join("tls/cert.pem").exists(),
        "no self-signed certificate made"
    );
    gw.write_checks(
        "c.toml",
        "[[check]]\nname = \"tick\"\ncommand = \"/bin/echo tick\"\ninterval = 1\n",
    );
    let ca = ca.display().to_string();
    let good = Agent::start_with_config(
        dir.path(),
        "by-ca",
        &format!(
            "gateway_url = \"wss://localhost:{}\"\nenroll_key = {:?}\nca_file = {ca:?}\n",
            gw.port(),
            gw.enroll_key
        ),
    );
    eventually(T, "CA-trusting agent reports", || {
        gw.latest(&good.fingerprint, "tick")
    })
    .await;
    // The same CA, but a name the certificate does not carry: refused.
    let wrong_name = Agent::start_with_config(
        dir.path(),
        "by-ip",
        &format!(
            "gateway_url = \"wss://127.0.0.1:{}\"\nenroll_key = {:?}\nca_file = {ca:?}\n",
            gw.port(),
            gw.enroll_key
        ),
    );
    eventually(T, "name mismatch refused", || async {
        let log = wrong_name.proc.log();
        (log.contains("TLS handshake") && log.contains("certificate not valid for name"))
            .then_some(())
    })
    .await;
    assert!(gw.agent(&wrong_name.fingerprint).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_agent_is_noticed_and_comes_back_on_its_own() {
    let dir = tempdir();
    let gw = Gateway::start(dir.path(), &["--heartbeat", "1", "--presence-grace", "1"]);
    gw.write_checks(
        "c.toml",
        "[[check]]\nname = \"tick\"\ncommand = \"/bin/echo tick\"\ninterval = 1\n",
    );
    let agent = Agent::start(dir.path(), "sleeper", &gw, "reconnect_max_secs = 1\n");
    let fp = agent.fingerprint.clone();
    let seq = eventually(T, "first result", || gw.latest(&fp, "tick")).await["seq"]
        .as_u64()
        .unwrap();
    // Frozen, the agent neither pings nor answers: a half-open connection from the
    // gateway's side. Three heartbeats of silence mark it lost.
    agent.proc.signal(libc::SIGSTOP);
    let lost = eventually(T, "lost", || async {
        gw.agent(&fp).await.filter(|a| a["presence"] == "lost")
    })
    .await;
    assert!(
        lost["presence_reason"]
            .as_str()
            .unwrap()
            .contains("no frame or ping"),
        "{lost}"
    );
    agent.proc.signal(libc::SIGCONT);
    eventually(T, "back online", || async {
        gw.agent(&fp).await.filter(|a| a["presence"] == "online")
    })
    .await;
    eventually(T, "results flow again", || async {
        gw.latest(&fp, "tick")
            .await
            .filter(|l| l["seq"].as_u64().unwrap() > seq)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_sequence_file_was_lost_is_not_taken_for_a_resend() {
    let dir = tempdir();
    let gw = Gateway::start(dir.path(), &[]);
    gw.write_checks(
        "c.toml",
        "[[check]]\nname = \"tick\"\ncommand = \"/bin/echo tick\"\ninterval = 1\n",
    );
    let mut agent = Agent::start(dir.path(), "restored", &gw, "");
    let fp = agent.fingerprint.clone();
    let before = eventually(T, "results", || async {
        gw.latest(&fp, "tick")
            .await
            .filter(|l| l["seq"].as_u64().unwrap() >= 3)
    })
    .await["seq"]
        .as_u64()
        .unwrap();
    agent.proc.signal(libc::SIGTERM);
    assert_eq!(agent.proc.wait_exit(Duration::from_secs(10)).await, Some(0));
    // A restore from an old backup, or a reinstall that kept the identity: numbering
    // would start again from 1, below what the bus already holds.
    std::fs::remove_file(agent.state_dir.join("seq")).unwrap();
    let config = std::fs::read_to_string(&agent.config_path).unwrap();
    drop(agent);
    let agent = Agent::start_with_config(dir.path(), "restored", &config_body(&config));
    assert_eq!(agent.fingerprint, fp, "same identity");
    let after = eventually(T, "new results accepted", || async {
        gw.latest(&fp, "tick")
            .await
            .filter(|l| l["seq"].as_u64().unwrap() > before)
    })
    .await;
    assert!(after["seq"].as_u64().unwrap() > before);
    assert_eq!(gw.metric("outpost_results_duplicate_total").await, 0);
}

/// The agent-specific part of a config written by `Agent::start` (the harness adds the
/// paths again).
fn config_body(config: &str) -> String {
    config
        .lines()
        .filter(|l| !l.starts_with("state_dir") && !l.starts_with("machine_id_file"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_sends_its_request_is_dropped() {
    use tokio::io::AsyncReadExt;
    let dir = tempdir();
    let gw = Gateway::start(dir.path(), &[]);
    let mut tls = gw.tls().await;
    let started = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "connection still open after 30 s");
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "closed too early: {:?}",
        started.elapsed()
    );
}

/// A text frame whose payload is not UTF-8 (which a `Message::Text` cannot hold).
fn not_utf8() -> Message {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    Message::Frame(Frame::message(
        vec![b'{', 0xff, 0xfe, b'}'],
        OpCode::Data(Data::Text),
        true,
    ))
}

/// Run-now of a daemon check is refused by the gateway, which knows the check is a
/// daemon: the agent is not asked, so an agent that knows only the documented reply codes
/// (or does not answer at all) cannot turn it into a 504.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_now_of_a_daemon_is_refused_at_the_gateway_without_asking_the_agent() {
    let dir = tempdir();
    let gw = Gateway::start(dir.path(), &[]);
    gw.write_checks(
        "d.toml",
        "[[check]]\nname = \"watcher\"\ncommand = [\"/bin/sleep\", \"1000\"]\nkind = \"daemon\"\n",
    );
    let fp = uuid_v4();
    let key = gw.enroll_key.clone();
    let credential = outpost_protocol::Credential::EnrollKey {
        key,
        proof: String::new(),
    };
    // A client that reads its config and then answers nothing. The check file was
    // written after the gateway started: the first config may come before the gateway's
    // next scan of checks.d (every second here), a new one once it has the check.
    let (mut ws, _) = raw_session(&gw, &fp, credential).await;
    let config = loop {
        let config = next_json(&mut ws).await;
        assert_eq!(config["type"], "config", "{config}");
        if config["checks"].as_array().is_some_and(|c| !c.is_empty()) {
            break config;
        }
    };
    assert_eq!(config["checks"][0]["probe"]["kind"], "daemon", "{config}");

    let asked = std::time::Instant::now();
    let (status, body) = gw
        .http(
            "POST",
            &format!("/api/v1/agents/{fp}/checks/watcher/run"),
            Some(&gw.token),
        )
        .await;
    assert_eq!(status, 422, "{body} after {:?}", asked.elapsed());
    assert!(body["error"].as_str().unwrap().contains("daemon"), "{body}");
    // Nothing reached the agent: the next frame it gets is no rpc_request.
    let next = tokio::time::timeout(Duration::from_secs(2), next_text(&mut ws)).await;
    if let Ok(frame) = next {
        assert!(
            !frame.contains("rpc_request"),
            "the agent was asked: {frame}"
        );
    }
}

/// Open a raw session as agent `fp` with `credential`; returns it with the welcome frame.
async fn raw_session(
    gw: &Gateway,
    fp: &str,
    credential: outpost_protocol::Credential,
) -> (
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    Value,
) {
    let mut ws = raw_ws(gw).await;
    let hello = raw_hello(fp, credential, "raw");
    ws.send(Message::Text(outpost_protocol::encode(&hello).into()))
        .await
        .unwrap();
    let welcome: Value = serde_json::from_str(&next_text(&mut ws).await).unwrap();
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    (ws, welcome)
}

/// A `bye` that says the agent is restarting keeps it online for the window it names: a
/// new connection within the window publishes no loss, and the agent is lost only when
/// a window ends without one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarting_agent_stays_online_for_its_window_and_is_lost_after_it() {
    let dir = tempdir();
    let gw = Gateway::start(dir.path(), &[]);
    let fp = uuid_v4();
    let events = || -> Vec<String> {
        gw.bus_log("presence")
            .iter()
            .filter(|v| v["fingerprint"] == fp.as_str())
            .map(|v| v["presence"].as_str().unwrap().to_string())
            .collect()
    };
    let bye = r#"{"type":"bye","reason":"restarting for a test","back_within_secs":3}"#;

    let key = gw.enroll_key.clone();
    let (mut ws, welcome) = raw_session(
        &gw,
        &fp,
        outpost_protocol::Credential::EnrollKey {
            key,
            proof: String::new(),
        },
    )
    .await;
    let secret = welcome["agent_secret"].as_str().unwrap().to_string();
    ws.send(Message::Text(bye.into())).await.unwrap();
    assert_eq!(close_code(&mut ws, T).await, Some(1000));
    let a = eventually(T, "disconnected", || async {
        gw.agent(&fp).await.filter(|a| a["connected"] == false)
    })
    .await;
    assert_eq!(
        a["presence"], "online",
        "a restarting agent is not lost: {a}"
    );

    // Back within the window; the window then ends while it is connected: no loss.
    let credential = || outpost_protocol::Credential::Secret {
        secret: secret.clone(),
    };
    let (mut back, _) = raw_session(&gw, &fp, credential()).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    // No loss while connected, and no event for the return either: the agent never
    // stopped being online.
    assert_eq!(events(), ["online"], "an event while it stayed online");
    assert_eq!(gw.agent(&fp).await.unwrap()["presence"], "online");

    // Restarting again, and this time it does not come back.
    back.send(Message::Text(bye.into())).await.unwrap();
    assert_eq!(close_code(&mut back, T).await, Some(1000));
    let lost = eventually(T, "lost after the window", || async {
        gw.agent(&fp).await.filter(|a| a["presence"] == "lost")
    })
    .await;
    let reason = lost["presence_reason"].as_str().unwrap();
    assert!(
        reason.starts_with("did not come back within 3s of restarting"),
        "{lost}"
    );
    // The API shows the loss first; the event follows once the bus has it on disk.
    let published = eventually(T, "the lost event on the bus", || async {
        let e = events();
        (e.len() >= 2).then_some(e)
    })
    .await;
    assert_eq!(published, ["online", "lost"]);
}

/// Every connection is the shutdown's to wait for, and none makes it wait longer than it
/// must: a websocket that has not sent hello yet is closed at once with 1001 (going away)
/// instead of holding the gateway until its hello deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_gateway_does_not_wait_for_a_hello() {
    let dir = tempdir();
    let mut gw = Gateway::start(dir.path(), &["--hello-timeout", "300", "--grace", "300"]);
    let mut silent = raw_ws(&gw).await;
    gw.proc.signal(libc::SIGTERM);
    assert_eq!(
        close_code(&mut silent, Duration::from_secs(60)).await,
        Some(outpost_protocol::close::GOING_AWAY),
        "a connection waiting for hello is told the gateway is going away"
    );
    assert_eq!(
        gw.proc.wait_exit(Duration::from_secs(60)).await,
        Some(0),
        "the gateway exits once that connection is closed, not after its hello deadline (300 s)"
    );
    assert!(
        !gw.proc.log().contains("work still running"),
        "{}",
        gw.proc.log()
    );
}

/// A data directory has one gateway: a second one started on it by mistake is refused
/// (75, EX_TEMPFAIL: a supervisor retries, as for an old process still draining on the
/// same volume) with an error that names the running one, before it touches any file (the
/// agent secrets, the registry and the embedded bus each assume one writer); the running
/// gateway goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_gateway_on_the_same_data_directory_is_refused() {
    let dir = tempdir();
    let gw = Gateway::start(dir.path(), &[]);
    let mut second = std::process::Command::new(bin("outpost-gateway"));
    second
        .arg("serve")
        .arg("--data-dir")
        .arg(&gw.data_dir)
        .args(["--listen", "127.0.0.1:0"]);
    // Killed when dropped: without the lock it would start and serve.
    let mut second = spawn_logged(second, &dir.path().join("second.log"));
    let exited = eventually(
        Duration::from_secs(30),
        "the second gateway to exit",
        || {
            let status = second.child.try_wait().unwrap();
            async move { status }
        },
    )
    .await;
    let err = second.log();
    assert_eq!(exited.code(), Some(75), "EX_TEMPFAIL: {err}");
    let names = format!("process {} (an outpost-gateway) is using it", gw.proc.pid());
    assert!(err.contains(&names), "{names:?} not in {err}");
    assert_eq!(gw.http("GET", "/healthz", None).await.0, 200);
}

/// Revoking an agent: its connection is closed with 4403, its secret never logs in again,
/// its fingerprint cannot enroll again, and one presence event says `revoked`. Forgetting
/// it afterwards removes it for good (a restart does not bring it back from the bus's
/// presence events), and the fingerprint may enroll anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_agent_is_closed_refused_and_can_be_forgotten() {
    let dir = tempdir();
    let gw = Gateway::start(dir.path(), &[]);
    let agent = Agent::start(dir.path(), "a", &gw, "");
    let fp = agent.fingerprint.clone();
    eventually(T, "agent online", || async {
        let a = gw.agent(&fp).await?;
        (a["presence"] == "online").then_some(())
    })
    .await;
    // The agent stores its secret once welcomed, a moment after the gateway lists it.
    let secret = eventually(T, "the agent's secret stored", || async {
        std::fs::read_to_string(agent.state_dir.join("agent.secret")).ok()
    })
    .await;
    let token = Some(gw.token.as_str());

    let (status, body) = gw
        .http("POST", &format!("/api/v1/agents/{fp}/revoke"), token)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["presence"], "revoked", "{body}");
    agent
        .proc
        .wait_for_log("was revoked by an administrator", T)
        .await;
    let shown = gw.agent(&fp).await.unwrap();
    assert_eq!(
        (shown["presence"].as_str(), shown["connected"].as_bool()),
        (Some("revoked"), Some(false)),
        "{shown}"
    );
    // Again: the same answer, nothing new.
    let (status, again) = gw
        .http("POST", &format!("/api/v1/agents/{fp}/revoke"), token)
        .await;
    assert_eq!(
        (status, &again["revoked_at_ms"]),
        (200, &body["revoked_at_ms"])
    );

    // Its secret, and its fingerprint with the enrollment key, are refused with 4403.
    for credential in [
        outpost_protocol::Credential::Secret {
            secret: secret.trim().to_string(),
        },
        outpost_protocol::Credential::EnrollKey {
            key: gw.enroll_key.clone(),
            proof: "p".into(),
        },
    ] {
        let mut ws = raw_ws(&gw).await;
        let hello = raw_hello(&fp, credential, "raw");
        ws.send(Message::Text(outpost_protocol::encode(&hello).into()))
            .await
            .unwrap();
        let refused: Value = serde_json::from_str(&next_text(&mut ws).await).unwrap();
        assert_eq!(refused["code"], "revoked", "{refused}");
        assert_eq!(
            close_code(&mut ws, T).await,
            Some(outpost_protocol::close::REVOKED)
        );
    }
    drop(agent);
    let presence: Vec<String> = gw
        .bus_log("presence")
        .iter()
        .filter(|e| e["fingerprint"] == fp.as_str())
        .map(|e| e["presence"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        presence,
        ["online", "revoked"],
        "one event, and no 'lost' after it"
    );

    // Forgotten: gone from the API, also after a restart (whose presence events on the
    // bus still name it), and the fingerprint may enroll anew.
    let path = format!("/api/v1/agents/{fp}");
    assert_eq!(gw.http("DELETE", &path, token).await.0, 204);
    assert_eq!(gw.http("GET", &path, token).await.0, 404);
    assert_eq!(gw.http("DELETE", &path, token).await.0, 404);
    let listen = gw.addr.clone();
    drop(gw);
    let gw = Gateway::start_on(dir.path(), &listen, &[]);
    let token = Some(gw.token.as_str());
    assert_eq!(gw.http("GET", &path, token).await.0, 404);
    let enroll = outpost_protocol::Credential::EnrollKey {
        key: gw.enroll_key.clone(),
        proof: "p".into(),
    };
    let (_ws, welcome) = raw_session(&gw, &fp, enroll).await;
    assert!(welcome["agent_secret"].is_string(), "{welcome}");
    // An agent is revoked before it is forgotten.
    let (status, body) = gw.http("DELETE", &path, token).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("revoke it first"),
        "{body}"
    );
    let unknown = "00000000-0000-4000-8000-000000000000";
    let revoke_unknown = format!("/api/v1/agents/{unknown}/revoke");
    assert_eq!(gw.http("POST", &revoke_unknown, token).await.0, 404);
}
