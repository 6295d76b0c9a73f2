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

/// `outpost-gateway config push DIR --bus URL`; returns its stdout.
fn push(nats: &str, dir: &Path) -> String {
    let out = std::process::Command::new(bin("outpost-gateway"))
        .args(["config", "push"])
        .arg(dir)
        .args(["--bus", nats])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "config push failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
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
