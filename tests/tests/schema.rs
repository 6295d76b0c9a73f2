//! The committed JSON Schemas (`docs/schema/`) against the frames a real agent and a real
//! gateway send each other. A relay between them terminates the agent's TLS with the
//! gateway's own certificate and key (so the agent's pin still matches), dials the gateway
//! like an agent, forwards every websocket message unchanged and records each text frame.
//! One agent is driven through every frame type of both directions; every recorded frame
//! must be valid against its direction's schema and decode to the protocol types with no
//! field left over. The binaries are not changed or told about the relay.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use outpost_e2e::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::Message;

const T: Duration = Duration::from_secs(30);

/// Which peer sent a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    Agent,
    Gateway,
}

#[derive(Debug, Clone)]
struct Frame {
    from: Peer,
    /// Which connection through the relay, counted from 0.
    conn: usize,
    text: String,
}

type Log = Arc<Mutex<Vec<Frame>>>;

/// A recording websocket relay in front of a gateway, on its own loopback port.
struct Relay {
    addr: SocketAddr,
    log: Log,
}

impl Relay {
    async fn start(gw: &Gateway) -> Relay {
        let tls = gw.data_dir.join("tls");
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(tls.join("cert.pem"))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
        let key = PrivateKeyDer::from_pem_file(tls.join("key.pem")).unwrap();
        let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let upstream = Upstream {
            addr: gw.addr.clone(),
            tls: tokio_rustls::TlsConnector::from(
                outpost_agent::tls::client_config(&outpost_agent::settings::Trust::Pin(
                    gw.pin.clone(),
                ))
                .unwrap(),
            ),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Log::default();
        let recorded = log.clone();
        tokio::spawn(async move {
            for conn in 0.. {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, upstream, log) =
                    (acceptor.clone(), upstream.clone(), recorded.clone());
                tokio::spawn(async move {
                    // A connection that is not a websocket (the agent fetching a release
                    // from "the gateway") fails its handshake here and is dropped.
                    let _ = relay(tcp, acceptor, upstream, conn, log).await;
                });
            }
        });
        Relay { addr, log }
    }

    fn url(&self) -> String {
        format!("wss://{}", self.addr)
    }

    fn frames(&self) -> Vec<Frame> {
        self.log.lock().unwrap().clone()
    }

    /// Whether a frame of `kind` from `from` was recorded.
    fn saw(&self, from: Peer, kind: &str) -> bool {
        self.frames()
            .iter()
            .any(|f| f.from == from && frame_type(&f.text) == kind)
    }

    async fn wait_for(&self, from: Peer, kind: &str) {
        eventually(T, &format!("a {kind} frame from the {from:?}"), || async {
            self.saw(from, kind).then_some(())
        })
        .await;
    }

    /// Wait for a frame from `from` whose text contains `needle`.
    async fn wait_for_text(&self, from: Peer, needle: &str) {
        eventually(
            T,
            &format!("a frame from the {from:?} with {needle:?}"),
            || async {
                self.frames()
                    .iter()
                    .any(|f| f.from == from && f.text.contains(needle))
                    .then_some(())
            },
        )
        .await;
    }
}

#[derive(Clone)]
struct Upstream {
    addr: String,
    tls: tokio_rustls::TlsConnector,
}

/// Accept one agent connection (TLS, then the `outpost.v1` upgrade), dial the gateway the
/// same way, and forward both directions until either ends.
async fn relay(
    tcp: TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    upstream: Upstream,
    conn: usize,
    log: Log,
) -> anyhow::Result<()> {
    let tls = acceptor.accept(tcp).await?;
    let agent = tokio_tungstenite::accept_hdr_async(tls, select_subprotocol).await?;

    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req =
        format!("wss://{}{}", upstream.addr, outpost_protocol::WS_PATH).into_client_request()?;
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        outpost_protocol::SUBPROTOCOL.parse()?,
    );
    let tcp = TcpStream::connect(&upstream.addr).await?;
    let tls = upstream
        .tls
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    let (gateway, _) = tokio_tungstenite::client_async(req, tls).await?;

    let (agent_tx, agent_rx) = agent.split();
    let (gateway_tx, gateway_rx) = gateway.split();
    let up = pump(agent_rx, gateway_tx, Peer::Agent, conn, log.clone());
    let down = pump(gateway_rx, agent_tx, Peer::Gateway, conn, log);
    // When one direction ends the other is of no use: the connection is over.
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
    Ok(())
}

/// Select `outpost.v1` when the agent offers it, as the gateway does. (The error type is
/// tungstenite's, for a refusal this relay never makes.)
#[allow(clippy::result_large_err)]
fn select_subprotocol(req: &Request, mut resp: Response) -> Result<Response, ErrorResponse> {
    let offered = req
        .headers()
        .get("Sec-WebSocket-Protocol")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|p| p.trim() == outpost_protocol::SUBPROTOCOL)
        });
    if offered {
        resp.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            outpost_protocol::SUBPROTOCOL.parse().unwrap(),
        );
    }
    Ok(resp)
}

/// Forward messages from `rx` to `tx`, recording text frames. Pongs are not forwarded:
/// each websocket end of the relay answers the pings it receives itself.
async fn pump<R, W>(mut rx: R, mut tx: W, from: Peer, conn: usize, log: Log)
where
    R: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
    W: futures_util::Sink<Message> + Unpin,
{
    while let Some(Ok(msg)) = rx.next().await {
        match &msg {
            Message::Text(t) => log.lock().unwrap().push(Frame {
                from,
                conn,
                text: t.to_string(),
            }),
            Message::Pong(_) | Message::Frame(_) => continue,
            _ => {}
        }
        let close = msg.is_close();
        if tx.send(msg).await.is_err() || close {
            break;
        }
    }
    let _ = tx.close().await;
}

fn frame_type(text: &str) -> String {
    serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| v["type"].as_str().map(str::to_string))
        .unwrap_or_default()
}

fn schema_value(file: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs/schema")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn schema(file: &str) -> jsonschema::Validator {
    jsonschema::validator_for(&schema_value(file))
        .unwrap_or_else(|e| panic!("{file} is not a valid JSON Schema: {e}"))
}

/// A direction's schema, and for each frame type the schema narrowed to that type's
/// branch: a frame that fails the whole schema fails its `oneOf`, which says nothing about
/// why; its own branch names the field and the rule.
struct Schema {
    whole: jsonschema::Validator,
    by_type: std::collections::BTreeMap<String, jsonschema::Validator>,
}

impl Schema {
    fn load(file: &str) -> Schema {
        let value = schema_value(file);
        let by_type = value["oneOf"]
            .as_array()
            .unwrap()
            .iter()
            .map(|branch| {
                let mut narrowed = value.clone();
                let root = narrowed.as_object_mut().unwrap();
                root.remove("oneOf");
                root.insert("allOf".into(), Value::Array(vec![branch.clone()]));
                let kind = branch["properties"]["type"]["const"].as_str().unwrap();
                (
                    kind.to_string(),
                    jsonschema::validator_for(&narrowed).unwrap(),
                )
            })
            .collect();
        Schema {
            whole: schema(file),
            by_type,
        }
    }

    /// Why `frame` is not valid; empty when it is.
    fn errors(&self, frame: &Value) -> Vec<String> {
        if self.whole.is_valid(frame) {
            return Vec::new();
        }
        let kind = frame["type"].as_str().unwrap_or_default();
        let validator = self.by_type.get(kind).unwrap_or(&self.whole);
        let mut errors: Vec<String> = validator
            .iter_errors(frame)
            .map(|e| {
                format!(
                    "  at {:?}: {}",
                    e.instance_path().to_string(),
                    shorten(&e.to_string())
                )
            })
            .collect();
        if errors.is_empty() {
            errors.push(format!("  no frame type {kind:?} in the schema"));
        }
        errors
    }
}

/// Every problem of every frame: schema errors, and fields the protocol types do not
/// have (the schemas allow unknown fields, as the peers do, so that alone would not catch
/// a binary that sends one).
fn problems(frames: &[Frame]) -> Vec<String> {
    let agent = Schema::load("agent-frame.schema.json");
    let gateway = Schema::load("gateway-frame.schema.json");
    let mut out = Vec::new();
    for f in frames {
        let value: Value = match serde_json::from_str(&f.text) {
            Ok(v) => v,
            Err(e) => {
                out.push(format!("{:?} frame is not JSON ({e}): {}", f.from, f.text));
                continue;
            }
        };
        let (schema, typed) = match f.from {
            Peer::Agent => (
                &agent,
                outpost_protocol::decode_agent_frame(&f.text)
                    .map(|t| serde_json::to_value(t).unwrap()),
            ),
            Peer::Gateway => (
                &gateway,
                outpost_protocol::decode_gateway_frame(&f.text)
                    .map(|t| serde_json::to_value(t).unwrap()),
            ),
        };
        let errors = schema.errors(&value);
        if !errors.is_empty() {
            out.push(format!(
                "{:?} frame (connection {}) is not valid against its schema:\n{}\nframe: {}",
                f.from,
                f.conn,
                errors.join("\n"),
                shorten(&f.text)
            ));
        }
        match typed {
            Ok(typed) if typed == value => {}
            Ok(typed) => out.push(format!(
                "{:?} frame does not round-trip through the protocol types (a field they do not have?):\nsent:    {}\ndecoded: {}",
                f.from,
                shorten(&f.text),
                shorten(&typed.to_string())
            )),
            Err(e) => out.push(format!(
                "{:?} frame does not decode: {e}: {}",
                f.from,
                shorten(&f.text)
            )),
        }
    }
    out
}

fn shorten(text: &str) -> String {
    const MAX: usize = 2000;
    if text.len() <= MAX {
        return text.to_string();
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &text[..end], text.len())
}

/// A script in `dir` that prints `body`'s output; returns its path.
fn script(dir: &std::path::Path, name: &str, body: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.display().to_string()
}

/// Checks that put every part of a check spec, a collector, and every part of a result on
/// the wire: perfdata with units and ranges, long output, soft states, JSON faults, a
/// catalog plugin, a cron schedule, a daemon, built-in probes.
fn checks(dir: &std::path::Path, gw_port: u16) -> String {
    let temp = script(
        dir,
        "check_temp",
        "echo \"TEMP WARNING - 71C|'cpu temp'=71C;70;90;0;120 fan=2200rpm\"\necho 'sensor A fine'\nexit 1",
    );
    let queues = script(
        dir,
        "check_queues",
        r#"echo '{"status":"critical","text":"1 of 2 queues stuck","metrics":{"depth":{"value":120,"unit":"s","warn":30,"crit":60,"min":0}},"faults":[{"name":"queue-b","status":"critical","text":"stuck for 5m"}]}'"#,
    );
    let daemon = script(
        dir,
        "daemon_up",
        r#"while true; do echo '{"status":"ok","text":"up"}'; sleep 1; done"#,
    );
    format!(
        r#"
[[check]]
name = "temp"
command = [{temp:?}]
interval = 1
attempts = 3
retry_interval = "1s"
target = {{ labels = {{ role = "web" }} }}

[[check]]
name = "queues"
kind = "json"
command = [{queues:?}]
interval = 1

[[check]]
name = "hello"
plugin = "check_hello"
args = ["-v"]
interval = 1

[[check]]
name = "slow"
command = ["/bin/sleep", "7"]
interval = "1h"
timeout = "10s"

[[check]]
name = "yearly"
command = "/bin/echo new year"
cron = "0 0 1 1 *"

[[check]]
name = "heartbeat"
kind = "daemon"
command = [{daemon:?}]

[[check]]
name = "mem"
memory = {{ warn = 99, crit = 100 }}
interval = "1h"

[[check]]
name = "root"
disk = {{ path = "/", warn = 99 }}
interval = "1h"

[[check]]
name = "gw"
tcp = {{ host = "127.0.0.1", port = {gw_port}, warn_ms = 500 }}
interval = "1h"

[[check]]
name = "web"
http = {{ url = "https://127.0.0.1:{gw_port}/healthz", expect_status = [200], headers = {{ accept = "text/plain" }} }}
interval = "1h"
timeout = "5s"

[[collector]]
name = "shipper"
kind = "program"
command = ["/bin/sleep", "3600"]
env = {{ LEVEL = "info" }}
config = "host = {{{{hostname}}}}\n"
interval = "10s"
"#
    )
}

/// A configuration for the agent that is over the 1 MiB frame limit: the gateway answers
/// it with an `error` frame (`config_too_big`) instead.
fn too_big() -> String {
    let arg = "x".repeat(1100);
    (0..1000)
        .map(|i| format!("[[check]]\nname = \"big{i}\"\ncommand = [\"/bin/true\", \"{arg}\"]\ninterval = \"1h\"\n\n"))
        .collect()
}

/// POST run-now for `check`; the HTTP status.
async fn run_now(gw: &Gateway, fp: &str, check: &str) -> u16 {
    gw.http(
        "POST",
        &format!("/api/v1/agents/{fp}/checks/{check}/run"),
        Some(&gw.token),
    )
    .await
    .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_frame_both_binaries_send_matches_the_published_schema() {
    let started = Instant::now();
    let dir = tempdir();
    let catalog = dir.path().join("catalog");
    std::fs::create_dir_all(&catalog).unwrap();
    script(
        &catalog,
        "check_hello",
        "echo 'HELLO OK - from the catalog'",
    );
    let catalog_arg = catalog.display().to_string();
    let mut gw = Gateway::start(
        dir.path(),
        &[
            "--plugins-dir",
            &catalog_arg,
            "--fallback-addr",
            "127.0.0.1:9",
        ],
    );
    // Offer every agent a version it is not: an `update` frame after each `welcome`. The
    // agent's download then fails at the relay, which is all right: it reports that.
    let releases = gw.data_dir.join("releases");
    std::fs::create_dir_all(&releases).unwrap();
    std::fs::write(releases.join("rollout.toml"), "version = \"99.0.0\"\n").unwrap();
    gw.write_checks("all.toml", &checks(dir.path(), gw.port()));
    let relay = Relay::start(&gw).await;

    let config = format!(
        "gateway_url = {:?}\nenroll_key = {:?}\npin_sha256 = {:?}\nhostname = \"web-1\"\nlabels = {{ role = \"web\", team = \"ops\" }}\ngroups = [\"eu\"]\nreconnect_max_secs = 1\n",
        relay.url(),
        gw.enroll_key,
        gw.pin
    );
    let mut agent = Agent::start_with_config(dir.path(), "web-1", &config);
    let fp = agent.fingerprint.clone();

    // Run-now on a check that takes 7 s, twice at once: one runs, the other cannot start
    // within the agent's 5 s and is answered `busy` (an `rpc_reply` with an error).
    let both = {
        let (gw, fp) = (&gw, fp.clone());
        async move {
            // A result says the agent runs its configuration (and the gateway knows it).
            eventually(T, "a first result", || gw.latest(&fp, "temp")).await;
            tokio::join!(run_now(gw, &fp, "slow"), run_now(gw, &fp, "slow"))
        }
    };
    let results = async {
        for (check, what) in [
            ("temp", "TEMP WARNING"),
            ("queues", "queues stuck"),
            ("hello", "HELLO OK"),
        ] {
            eventually(T, &format!("a result of {check}"), || async {
                gw.latest(&fp, check)
                    .await
                    .filter(|l| l["output"].as_str().unwrap_or_default().contains(what))
            })
            .await;
        }
        assert_eq!(run_now(&gw, &fp, "temp").await, 200, "run-now of temp");
    };
    let (slow, ()) = tokio::join!(both, results);
    let mut statuses = [slow.0, slow.1];
    statuses.sort();
    assert_eq!(
        statuses[1], 429,
        "one run-now of slow answered busy: {statuses:?}"
    );
    relay.wait_for(Peer::Agent, "rpc_reply").await;
    relay.wait_for(Peer::Gateway, "update").await;

    // A configuration over one frame: the gateway says so with an `error` frame.
    gw.write_checks("big.toml", &too_big());
    relay
        .wait_for_text(Peer::Gateway, r#""code":"config_too_big""#)
        .await;
    std::fs::remove_file(gw.checks_dir.join("big.toml")).unwrap();
    // Back within one frame: the gateway pushes the configuration again.
    let configs = || {
        relay
            .frames()
            .iter()
            .filter(|f| frame_type(&f.text) == "config")
            .count()
    };
    eventually(T, "the configuration pushed again", || async {
        (configs() >= 2).then_some(())
    })
    .await;

    // A clean stop says `bye`; the agent comes back with its secret and its config hash.
    agent.proc.signal(libc::SIGTERM);
    assert_eq!(
        agent.proc.wait_exit(T).await,
        Some(0),
        "{}",
        agent.proc.log()
    );
    relay.wait_for(Peer::Agent, "bye").await;
    let hellos = || {
        relay
            .frames()
            .iter()
            .filter(|f| frame_type(&f.text) == "hello")
            .count()
    };
    let before = hellos();
    let _agent = Agent::start_with_config(dir.path(), "web-1", &config);
    eventually(T, "a second hello", || async {
        (hellos() > before).then_some(())
    })
    .await;
    eventually(T, "the agent online again", || async {
        gw.agent(&fp).await.filter(|a| a["presence"] == "online")
    })
    .await;

    // A gateway that stops tells its agents to come back later.
    gw.proc.signal(libc::SIGTERM);
    relay.wait_for(Peer::Gateway, "reconnect").await;
    assert_eq!(gw.proc.wait_exit(T).await, Some(0), "{}", gw.proc.log());

    let frames = relay.frames();
    let problems = problems(&frames);
    assert!(
        problems.is_empty(),
        "{} of {} frames break the schema:\n\n{}",
        problems.len(),
        frames.len(),
        problems.join("\n\n")
    );
    let mut missing = Vec::new();
    for (from, kinds) in [
        (
            Peer::Agent,
            &["hello", "results", "rpc_reply", "plugin_request", "bye"][..],
        ),
        (
            Peer::Gateway,
            &[
                "welcome",
                "config",
                "ack",
                "rpc_request",
                "plugin",
                "error",
                "reconnect",
                "update",
            ][..],
        ),
    ] {
        for kind in kinds {
            if !relay.saw(from, kind) {
                missing.push(format!("{kind} from the {from:?}"));
            }
        }
    }
    // The optional parts of the frames were on the wire too, not only their types.
    for (from, part) in [
        (Peer::Agent, r#""credential":{"kind":"enroll_key""#),
        (Peer::Agent, r#""credential":{"kind":"secret""#),
        (Peer::Agent, r#""labels":{"role":"web""#),
        (Peer::Agent, r#""state_type":"soft""#),
        (Peer::Agent, r#""faults":[{"#),
        (Peer::Agent, r#""unit":"C","warn":"70""#),
        (Peer::Agent, r#""long_output":"#),
        (Peer::Agent, r#""origin":"run_now""#),
        (Peer::Agent, r#""error":{"code":"busy""#),
        (Peer::Gateway, r#""agent_secret":"#),
        (Peer::Gateway, r#""fallback_addrs":["#),
        (Peer::Gateway, r#""collectors":[{"#),
        (Peer::Gateway, r#""plugin":{"name":"check_hello""#),
        (Peer::Gateway, r#""cron":"#),
        (Peer::Gateway, r#""kind":"daemon""#),
        (Peer::Gateway, r#""kind":"http""#),
    ] {
        if !frames
            .iter()
            .any(|f| f.from == from && f.text.contains(part))
        {
            missing.push(format!("{part} from the {from:?}"));
        }
    }
    assert!(missing.is_empty(), "never seen: {missing:?}");
    let mut counts = std::collections::BTreeMap::new();
    for f in &frames {
        *counts
            .entry(format!("{:?} {}", f.from, frame_type(&f.text)))
            .or_insert(0) += 1;
    }
    eprintln!(
        "{} frames valid in {:?}: {counts:?}",
        frames.len(),
        started.elapsed()
    );
}

/// The schemas refuse what the peers refuse: an unknown frame type, a bound one past its
/// limit, text that hides characters. (A schema that accepted anything would pass the
/// test above.)
#[test]
fn the_schemas_refuse_frames_that_break_the_protocol() {
    let agent = schema("agent-frame.schema.json");
    let gateway = schema("gateway-frame.schema.json");
    let result = serde_json::json!({
        "seq": 1, "check": "disk", "status": "ok", "output": "fine",
        "started_at_ms": 1, "duration_ms": 1,
    });
    let results = |r: Value| serde_json::json!({"type": "results", "results": [r]});
    let hello = serde_json::json!({
        "type": "hello", "protocol": 2, "fingerprint": "0f8fad5b-d9cb-469f-a165-70867728950e",
        "credential": {"kind": "secret", "secret": "s"}, "agent_version": "0.1.0",
        "os": "linux", "arch": "x86_64", "hostname": "web-1",
    });
    assert!(agent.is_valid(&results(result.clone())));
    assert!(agent.is_valid(&hello));
    assert!(gateway.is_valid(&serde_json::json!({"type": "ack", "seq": 9_007_199_254_740_991_u64})));

    let with = |base: &Value, key: &str, v: Value| {
        let mut b = base.clone();
        b[key] = v;
        b
    };
    for (what, frame) in [
        (
            "an unknown type",
            serde_json::json!({"type": "telemetry_v9"}),
        ),
        (
            "an empty batch",
            serde_json::json!({"type": "results", "results": []}),
        ),
        ("seq 0", results(with(&result, "seq", 0.into()))),
        (
            "seq above 2^53-1",
            results(with(&result, "seq", 9_007_199_254_740_992_u64.into())),
        ),
        (
            "output over 4096",
            results(with(&result, "output", "x".repeat(4097).into())),
        ),
        (
            "a check name with a space",
            results(with(&result, "check", "a b".into())),
        ),
        (
            "a check named ..",
            results(with(&result, "check", "..".into())),
        ),
        (
            "a hostname with a newline",
            with(&hello, "hostname", "web\nFAKE".into()),
        ),
        (
            "a hostname with a bidi override",
            with(&hello, "hostname", "a\u{202E}b".into()),
        ),
        (
            "an upper-case fingerprint",
            with(
                &hello,
                "fingerprint",
                "0F8FAD5B-D9CB-469F-A165-70867728950E".into(),
            ),
        ),
        ("65 groups", with(&hello, "groups", vec!["g"; 65].into())),
    ] {
        assert!(!agent.is_valid(&frame), "the agent schema accepts {what}");
    }
    for (what, frame) in [
        (
            "an unknown type",
            serde_json::json!({"type": "telemetry_v9"}),
        ),
        (
            "ack above 2^53-1",
            serde_json::json!({"type": "ack", "seq": 9_007_199_254_740_992_u64}),
        ),
        (
            "an unknown probe kind",
            serde_json::json!({"type": "config", "hash": "h", "checks": [
                {"name": "x", "probe": {"kind": "unsupported"}, "interval_secs": 1, "timeout_secs": 1}
            ]}),
        ),
        (
            "a version with letters",
            serde_json::json!({"type": "update", "version": "1.0-beta"}),
        ),
    ] {
        assert!(
            !gateway.is_valid(&frame),
            "the gateway schema accepts {what}"
        );
    }
}
