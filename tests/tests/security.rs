//! What an attacker can try against the gateway, each finding of the security audit as a
//! test against the real binaries (docs/SECURITY.md lists which promise each one keeps):
//! names from NATS that reach outside the gateway's mirror directories, a forged plugin
//! size in the object store.

use std::path::Path;
use std::time::Duration;

use futures_util::StreamExt;
use outpost_e2e::nats::NatsServer;
use outpost_e2e::{bin, eventually, tempdir, Gateway};

const T: Duration = Duration::from_secs(30);

fn push(nats: &str, dir: &Path) -> String {
    outpost_e2e::nats::config_push(nats, dir, &[])
}

/// The hex SHA-256 of `bytes`, by coreutils' sha256sum.
fn sha256_hex(bytes: &[u8]) -> String {
    use std::io::Write as _;
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)[..64].to_string()
}

fn check_file(name: &str) -> String {
    format!("[[check]]\nname = \"{name}\"\ncommand = \"/bin/echo {name}\"\ninterval = 5\n")
}

/// Audit finding 2 (KV key `default.checks./tmp/x.toml` and object `../../../x` written
/// outside `fleet/` at start-up) and 9 (an object whose size says 2^63 panicked the mirror,
/// which stopped silently while `/readyz` said ready).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_and_sizes_from_nats_never_write_outside_the_mirror_or_stop_it() {
    let dir = tempdir();
    let nats = NatsServer::start(dir.path(), "n1");
    let url = nats.url();
    let cfg = dir.path().join("cfg");
    std::fs::create_dir_all(cfg.join("plugins")).unwrap();
    std::fs::write(cfg.join("base.toml"), check_file("base")).unwrap();
    std::fs::write(cfg.join("plugins/big"), "#!/bin/sh\necho OK\n").unwrap();
    push(&url, &cfg);

    // What someone with write access to the buckets (but not to the gateway's host) does.
    let client = async_nats::connect(&url).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    let kv = js.get_key_value("outpost_config").await.unwrap();
    let outside = dir.path().join("escaped.toml");
    kv.put(
        format!("default.checks.{}", outside.display()),
        check_file("evil").into(),
    )
    .await
    .unwrap();
    let store = js
        .get_object_store("outpost_plugins_default")
        .await
        .unwrap();
    store
        .put("../../../x", &mut b"#!/bin/sh\necho pwned\n".as_slice())
        .await
        .unwrap();
    // The plugin `big` as it is, but with a size no plugin can have.
    {
        let stream = js.get_stream("OBJ_outpost_plugins_default").await.unwrap();
        // The meta subject names the object in URL-safe base64: "big" is "Ymln".
        let subject = "$O.outpost_plugins_default.M.Ymln".to_string();
        let raw = stream
            .get_last_raw_message_by_subject(&subject)
            .await
            .unwrap();
        let mut meta: serde_json::Value = serde_json::from_slice(&raw.payload).unwrap();
        meta["size"] = serde_json::json!(9_223_372_036_854_775_808u64);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Rollup", "sub");
        js.publish_with_headers(subject.clone(), headers, meta.to_string().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    let gw = Gateway::start(dir.path(), &["--bus", &url]);
    let fleet = gw.data_dir.join("fleet");
    // The running mirror replays the store in order: once a plugin put after the forged
    // ones is mirrored, it has been through them too (not only the start-up copy).
    let sentinel = b"#!/bin/sh\necho OK sentinel\n";
    let meta = async_nats::jetstream::object_store::ObjectMetadata {
        name: "sentinel".into(),
        metadata: [("sha256".to_string(), sha256_hex(sentinel))].into(),
        ..Default::default()
    };
    store.put(meta, &mut sentinel.as_slice()).await.unwrap();
    eventually(T, "the sentinel plugin mirrored", || async {
        fleet.join("plugins/sentinel").exists().then_some(())
    })
    .await;
    // Nothing was written outside DATA_DIR/fleet, and the forged plugin was not mirrored.
    assert!(!outside.exists(), "{} was written", outside.display());
    for escaped in [
        dir.path().join("x"),
        gw.data_dir.join("x"),
        gw.data_dir.parent().unwrap().join("x"),
    ] {
        assert!(!escaped.exists(), "{} was written", escaped.display());
    }
    assert!(!fleet.join("plugins/big").exists());
    // Started, ready, and mirroring: a check pushed now arrives in the mirror.
    let (status, body) = gw.http("GET", "/readyz", None).await;
    assert_eq!(status, 200, "{body}");
    std::fs::write(cfg.join("later.toml"), check_file("later")).unwrap();
    let out = push(&url, &cfg);
    eventually(T, "later.toml mirrored", || async {
        fleet.join("checks.d/later.toml").exists().then_some(())
    })
    .await;
    // The push also removes the names no gateway will mirror.
    assert!(
        out.contains("not a valid check file name; removed"),
        "{out}"
    );
    assert!(
        out.contains("\"../../../x\" (not a valid plugin name; removed)"),
        "{out}"
    );
    // The damaged object (a size its digest does not have) is pushed again, and mirrored.
    assert!(out.contains("~ plugins/big"), "{out}");
    eventually(T, "the repaired plugin mirrored", || async {
        fleet.join("plugins/big").exists().then_some(())
    })
    .await;
    let (status, body) = gw.http("GET", "/readyz", None).await;
    assert_eq!(status, 200, "{body}");

    let log = gw.proc.log();
    assert!(log.contains("ignoring a check file in NATS"), "{log}");
    assert!(log.contains("over the 524288-byte plugin limit"), "{log}");
    assert!(!log.contains("panicked"), "{log}");

    // The refused key and object are gone from NATS.
    let mut keys = kv.keys().await.unwrap();
    while let Some(key) = keys.next().await {
        let key = key.unwrap();
        assert!(!key.contains('/'), "{key} is still in the bucket");
    }
    let x = store.info("../../../x").await;
    assert!(x.as_ref().map_or(true, |i| i.deleted), "{x:?}");
}

fn hello(fp: &str, key: &str, hostname: &str) -> outpost_protocol::AgentFrame {
    outpost_e2e::raw_hello(
        fp,
        outpost_protocol::Credential::EnrollKey {
            key: key.into(),
            proof: String::new(),
        },
        hostname,
    )
}

/// Audit findings 8 (a hostname with `\n` and ESC forged a gateway log line before
/// authentication) and 6's unbounded labels: control characters and oversized fields in
/// hello are refused with a policy close, and what an agent sends is logged escaped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_supplied_strings_can_neither_forge_log_lines_nor_grow_without_bound() {
    use futures_util::SinkExt;
    use outpost_e2e::{close_code, raw_ws};
    use tokio_tungstenite::tungstenite::Message;

    let dir = tempdir();
    let gw = Gateway::start(dir.path(), &[]);
    const FORGED: &str = "FORGED outpost_gateway: agent connected";
    let send = |frame: outpost_protocol::AgentFrame| {
        Message::Text(outpost_protocol::encode(&frame).into())
    };

    // Before authentication, with a wrong key and with the right one.
    for key in ["wrong", gw.enroll_key.as_str()] {
        let mut ws = raw_ws(&gw).await;
        let fp = outpost_e2e::uuid_v4();
        ws.send(send(hello(&fp, key, &format!("web\n{FORGED}\u{1b}[2J"))))
            .await
            .unwrap();
        assert_eq!(
            close_code(&mut ws, T).await,
            Some(outpost_protocol::close::POLICY)
        );
    }
    // A megabyte of labels, which the registry would keep and every GET /agents return.
    let mut ws = raw_ws(&gw).await;
    let fp = outpost_e2e::uuid_v4();
    let mut big = hello(&fp, &gw.enroll_key, "web");
    if let outpost_protocol::AgentFrame::Hello(h) = &mut big {
        h.labels.insert("role".into(), "x".repeat(900_000));
    }
    ws.send(send(big)).await.unwrap();
    assert_eq!(
        close_code(&mut ws, T).await,
        Some(outpost_protocol::close::POLICY)
    );
    assert!(gw.agent(&fp).await.is_none());

    // After authentication: a bye whose reason tries the same is kept printable.
    let mut ws = raw_ws(&gw).await;
    let fp = outpost_e2e::uuid_v4();
    ws.send(send(hello(&fp, &gw.enroll_key, "web")))
        .await
        .unwrap();
    eventually(T, "online", || gw.agent(&fp)).await;
    let bye = format!(
        "{{\"type\":\"bye\",\"reason\":\"done\\n{FORGED}\\u001b[2J{}\"}}",
        "r".repeat(10_000)
    );
    ws.send(Message::Text(bye.into())).await.unwrap();
    let _ = close_code(&mut ws, T).await;
    let reason = eventually(T, "deregistered", || async {
        let a = gw.agent(&fp).await?;
        (a["presence"] == "deregistered").then(|| a["reason"].as_str().unwrap_or("").to_string())
    })
    .await;
    assert!(reason.len() <= 300, "{} bytes kept", reason.len());
    assert!(
        !reason.contains('\n') && !reason.contains('\u{1b}'),
        "{reason:?}"
    );

    let log = gw.proc.log();
    for line in log.lines() {
        assert!(!line.starts_with(FORGED), "forged log line: {line:?}");
    }
    assert!(
        !log.contains('\u{1b}'),
        "an escape sequence reached the log"
    );
    assert!(log.contains("invalid hello"), "{log}");
}

/// Audit finding 7: a second hello with the enrollment key for a fingerprint that is
/// enrolling (before the agent's next frame) took its identity. Now only the proof the
/// first hello carried can enroll it again; and whether a fingerprint is enrolled is not
/// told to a caller without its secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrolling_agent_cannot_be_taken_over_with_the_key_and_its_fingerprint() {
    use futures_util::SinkExt;
    use outpost_e2e::{close_code, raw_ws};
    use outpost_protocol::Credential;
    use tokio_tungstenite::tungstenite::Message;

    let dir = tempdir();
    let gw = Gateway::start(dir.path(), &[]);
    let key = gw.enroll_key.clone();
    let send = |frame: outpost_protocol::AgentFrame| {
        Message::Text(outpost_protocol::encode(&frame).into())
    };
    let enroll = |proof: &str| Credential::EnrollKey {
        key: key.clone(),
        proof: proof.into(),
    };

    // The victim enrolls and has not said anything since.
    let fp = outpost_e2e::uuid_v4();
    let mut victim = raw_ws(&gw).await;
    victim
        .send(send(outpost_e2e::raw_hello(
            &fp,
            enroll("victim-proof"),
            "victim",
        )))
        .await
        .unwrap();
    let welcome = outpost_e2e::next_json(&mut victim).await;
    let secret = welcome["agent_secret"]
        .as_str()
        .expect("enrolled")
        .to_string();

    // The thief knows the fingerprint and the tenant's key, not the proof.
    for proof in ["", "guessed"] {
        let mut thief = raw_ws(&gw).await;
        thief
            .send(send(outpost_e2e::raw_hello(&fp, enroll(proof), "thief")))
            .await
            .unwrap();
        let answer = outpost_e2e::next_json(&mut thief).await;
        assert_eq!(answer["code"], "unauthorized", "{answer}");
        assert_eq!(
            close_code(&mut thief, T).await,
            Some(outpost_protocol::close::UNAUTHORIZED)
        );
    }
    // The victim's session and secret are untouched.
    victim.send(Message::Ping(vec![1].into())).await.unwrap();
    drop(victim);
    let mut again = raw_ws(&gw).await;
    again
        .send(send(outpost_e2e::raw_hello(
            &fp,
            Credential::Secret { secret },
            "victim",
        )))
        .await
        .unwrap();
    let welcome = outpost_e2e::next_json(&mut again).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");

    // An unknown fingerprint and a wrong secret for a known one read the same.
    let refused = |fp: String| {
        let gw = &gw;
        async move {
            let mut ws = raw_ws(gw).await;
            let secret = Credential::Secret {
                secret: "wrong".into(),
            };
            ws.send(send(outpost_e2e::raw_hello(&fp, secret, "x")))
                .await
                .unwrap();
            let answer = outpost_e2e::next_json(&mut ws).await;
            answer["message"].as_str().unwrap().replace(&fp, "FP")
        }
    };
    assert_eq!(
        refused(fp.clone()).await,
        refused(outpost_e2e::uuid_v4()).await
    );
}

/// The mode bits of `path`.
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Audit finding 10: the API token printed at every start (journald, container logs);
/// the bus files 0644 in a 0755 directory and the agent's outbox.redb 0644; the console
/// without Content-Security-Policy, X-Frame-Options or nosniff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_is_printed_private_files_stay_private_and_the_console_is_locked_down() {
    let dir = tempdir();
    // What a start prints, read whole.
    let data = dir.path().join("printed");
    let out = std::process::Command::new("timeout")
        .args(["-s", "INT", "3"])
        .arg(bin("outpost-gateway"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(printed.contains("api_token_file "), "{printed}");
    for secret in ["api.token", "enroll.key"] {
        let value = std::fs::read_to_string(data.join(secret)).unwrap();
        assert!(
            !printed.contains(value.trim()),
            "{secret} was printed:\n{printed}"
        );
        assert_eq!(mode(&data.join(secret)), 0o600, "{secret}");
    }
    assert_eq!(mode(&data), 0o700);

    let gw = Gateway::start(dir.path(), &[]);
    gw.write_checks(
        "c.toml",
        "[[check]]\nname = \"c\"\ncommand = \"/bin/echo ok\"\ninterval = 1\n",
    );
    let agent = outpost_e2e::Agent::start(dir.path(), "a", &gw, "");
    eventually(T, "a result", || gw.latest(&agent.fingerprint, "c")).await;
    let bus = gw.data_dir.join("bus");
    assert_eq!(mode(&bus), 0o700);
    for f in std::fs::read_dir(&bus).unwrap() {
        let path = f.unwrap().path();
        if path.is_file() {
            assert_eq!(mode(&path), 0o600, "{}", path.display());
        }
    }
    for f in ["outbox.redb", "seq", "agent.finger", "agent.secret"] {
        let path = agent.state_dir.join(f);
        assert_eq!(mode(&path), 0o600, "{}", path.display());
    }

    // The console's headers, as a browser receives them.
    let out = std::process::Command::new("curl")
        .args(["-sk", "-D", "-", "-o", "/dev/null", "--max-time", "10"])
        .arg(format!("https://{}/", gw.addr))
        .output()
        .unwrap();
    let headers = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    for want in [
        "content-security-policy: default-src 'none'; script-src 'sha256-",
        "frame-ancestors 'none'",
        "x-frame-options: deny",
        "x-content-type-options: nosniff",
        "referrer-policy: no-referrer",
    ] {
        assert!(headers.contains(want), "no {want:?} in:\n{headers}");
    }
    assert!(!headers.contains("unsafe-inline"), "{headers}");
}

/// Audit finding 6: one agent wrote 20 MB/s to the bus. Now an agent ahead of its rate
/// has its acks held: what it makes meanwhile waits in its disk outbox, and nothing is
/// lost, as a restart with the limit lifted shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_agent_is_slowed_by_held_acks_and_loses_nothing() {
    const RATE: u64 = 15;
    let dir = tempdir();
    let slow = ["--agent-max-results-per-sec", "15", "--grace", "1"];
    let mut gw = Gateway::start(dir.path(), &slow);
    let checks: String = (0..100)
        .map(|i| {
            format!("[[check]]\nname = \"f{i}\"\ncommand = \"/bin/echo flood\"\ninterval = 1\n")
        })
        .collect();
    gw.write_checks("flood.toml", &checks);
    // The clock starts before the agent can connect: the limiter counts from its session.
    let start = std::time::Instant::now();
    let agent = outpost_e2e::Agent::start(dir.path(), "a", &gw, "");
    let fp = agent.fingerprint.clone();
    eventually(T, "a first result", || async {
        (!gw.bus_all(&fp).is_empty()).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    let stored = gw.bus_all(&fp).len() as u64;
    let elapsed = start.elapsed().as_secs_f64().ceil() as u64;
    // The agent makes 100 a second (2,000 in these 20 s unchecked). What the bus may
    // take is the rate (a session starts with no burst to spend), and the batch sent
    // before the last held ack (at most a frame: 256 results).
    let bound = RATE * elapsed + 256;
    eprintln!("flood: {stored} results stored in {elapsed} s (bound {bound})");
    assert!(
        stored <= bound,
        "{stored} results stored in {elapsed} s (bound {bound})"
    );
    assert!(gw.metric("outpost_acks_held_total").await > 0);

    // The limit lifted: everything the agent made arrives, once each, in order.
    let listen = gw.addr.clone();
    gw.proc.signal(libc::SIGKILL);
    gw.proc.wait_exit(Duration::from_secs(10)).await;
    drop(gw);
    let gw = Gateway::start_on(dir.path(), &listen, &["--agent-max-results-per-sec", "0"]);
    // Fewer checks from now on, so the backlog drains.
    gw.write_checks("flood.toml", "");
    let seqs = eventually(Duration::from_secs(90), "the backlog delivered", || async {
        let made = outpost_e2e::logged(&agent.proc.log(), "check ran", "seq");
        let last = *made.iter().max()?;
        let seqs: Vec<u64> = gw
            .bus_all(&fp)
            .iter()
            .filter_map(|r| r["seq"].as_u64())
            .collect();
        // Everything the agent queued so far is on the bus.
        (seqs.last() == Some(&last)).then_some(seqs)
    })
    .await;
    let want: Vec<u64> = (seqs[0]..seqs[0] + seqs.len() as u64).collect();
    assert_eq!(seqs, want, "a result was lost or stored twice");
    assert!(
        seqs.len() as u64 > stored + 100,
        "the backlog was {} results",
        seqs.len()
    );
    drop(agent);
}
