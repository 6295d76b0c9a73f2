//! Alerting end to end, with the real binaries: a real agent runs a plugin that turns
//! CRITICAL and OK on cue, the gateway evaluates its results from the bus, and a local
//! webhook receiver verifies every notification with an independent Standard Webhooks
//! implementation (the `standardwebhooks` package from PyPI).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use outpost_e2e::receivers::{WebhookReceiver, SECRET};
use outpost_e2e::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

/// A plugin whose exit code (and so status) is the number in `DIR/state`.
fn flip_plugin(dir: &Path) -> String {
    let state = dir.join("state");
    std::fs::write(&state, "0\n").unwrap();
    let path = dir.join("check_flip");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\ns=$(cat {state:?})\necho \"flip is $s\"\nexit $s\n",
            state = state.display().to_string()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.display().to_string()
}

fn set_state(dir: &Path, code: u8) {
    let tmp = dir.join("state.tmp");
    std::fs::write(&tmp, format!("{code}\n")).unwrap();
    std::fs::rename(&tmp, dir.join("state")).unwrap();
}

/// Wait until the bus holds `n` more hard results of `check` with `status` than `after`.
async fn hard_results(gw: &Gateway, fp: &str, status: &str, n: usize) {
    let before = count_hard(gw, fp, status);
    eventually(T, &format!("{n} more hard {status} results"), || async {
        (count_hard(gw, fp, status) >= before + n).then_some(())
    })
    .await
}

fn count_hard(gw: &Gateway, fp: &str, status: &str) -> usize {
    gw.bus_results(fp, "flip")
        .iter()
        .filter(|r| r["status"] == status && r["state_type"] == "hard")
        .count()
}

fn ids(requests: &[Value]) -> Vec<String> {
    requests
        .iter()
        .map(|r| {
            r["headers"]["webhook-id"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect()
}

/// Wait until `receiver` has taken `n` notifications; returns them.
async fn taken(receiver: &WebhookReceiver, n: usize) -> Vec<Value> {
    eventually(T, &format!("{n} notifications taken"), || async {
        let t = receiver.taken();
        (t.len() >= n).then_some(t)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_critical_notifies_once_signed_and_its_ok_resolves_once_across_a_restart() {
    let dir = tempdir();
    let plugin = flip_plugin(dir.path());
    let mut hook = WebhookReceiver::new(dir.path(), "hook", free_ports(1)[0], Some(SECRET));
    hook.start().await;
    let gw = Gateway::start(dir.path(), &[]);
    gw.write_checks(
        "flip.toml",
        &format!(
            r#"
[[check]]
name = "flip"
command = [{plugin:?}]
interval = 1
attempts = 2
retry_interval = 1

[[receiver]]
name = "hook"
timeout = "5s"
webhook = {{ url = "{url}", secret = "{SECRET}" }}

[[route]]
checks = ["fl*"]
receivers = ["hook"]
"#,
            url = hook.url()
        ),
    );
    let agent = Agent::start(dir.path(), "web-1", &gw, "");
    let fp = agent.fingerprint.clone();
    hard_results(&gw, &fp, "ok", 2).await;

    set_state(dir.path(), 2);
    let got = taken(&hook, 1).await;
    let firing = &got[0];
    assert_eq!(firing["verified"], true, "signature: {firing}");
    let body = &firing["body"];
    assert_eq!(body["type"], "alert.firing", "{body}");
    assert_eq!(body["data"]["check"], "flip");
    assert_eq!(body["data"]["status"], "critical");
    assert_eq!(body["data"]["output"], "flip is 2");
    assert_eq!(body["data"]["agent"]["fingerprint"], fp.as_str());
    assert_eq!(body["data"]["agent"]["hostname"], "web-1");
    assert_eq!(body["data"]["tenant"], "default");
    let id = firing["headers"]["webhook-id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(body["data"]["id"], id.as_str());
    assert!(
        id.starts_with(&format!("{fp}/flip/")) && id.ends_with("/0"),
        "{id}"
    );
    // The soft result before it did not notify: the firing came with the hard one.
    let results = gw.bus_results(&fp, "flip");
    assert!(
        results
            .iter()
            .any(|r| r["status"] == "critical" && r["state_type"] == "soft"),
        "attempts = 2 makes the first CRITICAL soft"
    );

    // Still critical: nothing more.
    hard_results(&gw, &fp, "critical", 3).await;
    assert_eq!(
        ids(&hook.requests()),
        std::slice::from_ref(&id),
        "one firing only"
    );

    set_state(dir.path(), 0);
    let got = taken(&hook, 2).await;
    let resolved = &got[1];
    assert_eq!(resolved["verified"], true);
    assert_eq!(resolved["body"]["type"], "alert.resolved");
    let incident = id.strip_suffix("/0").unwrap();
    assert_eq!(resolved["headers"]["webhook-id"], format!("{incident}/r"));
    hard_results(&gw, &fp, "ok", 3).await;
    assert_eq!(hook.requests().len(), 2, "one resolve only");

    // A crash (kill -9) loses what came after the last snapshot: the bus is read again
    // from there, and nothing is sent twice; the state kept goes on (a new incident
    // notifies once, with a new id).
    let addr = gw.addr.clone();
    gw.proc.signal(libc::SIGKILL);
    let mut gw = gw;
    gw.proc.wait_exit(T).await;
    assert!(!gw.proc.is_running());
    drop(gw);
    let gw = Gateway::start_on(dir.path(), &addr, &[]);
    hard_results(&gw, &fp, "ok", 3).await;
    assert_eq!(hook.requests().len(), 2, "nothing resent after the restart");
    set_state(dir.path(), 2);
    let got = taken(&hook, 3).await;
    let again = got[2]["headers"]["webhook-id"].as_str().unwrap();
    assert!(
        again.ends_with("/0") && again != id,
        "{again} (first was {id})"
    );
    hard_results(&gw, &fp, "critical", 2).await;
    assert_eq!(hook.requests().len(), 3);
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_down_then_failing_gets_everything_once_in_order_and_a_refusal_goes_to_the_fallback(
) {
    let dir = tempdir();
    let plugin = flip_plugin(dir.path());
    let ports = free_ports(2);
    let mut flaky = WebhookReceiver::new(dir.path(), "flaky", ports[0], Some(SECRET));
    let mut fallback = WebhookReceiver::new(dir.path(), "fallback", ports[1], None);
    fallback.start().await;
    let gw = Gateway::start(dir.path(), &[]);
    gw.write_checks(
        "flip.toml",
        &format!(
            r#"
[alerting]
fallback = "fallback"

[[check]]
name = "flip"
command = [{plugin:?}]
interval = 1

[[receiver]]
name = "flaky"
timeout = "5s"
webhook = {{ url = "{flaky}", secret = "{SECRET}" }}

[[receiver]]
name = "fallback"
webhook = {{ url = "{fallback}" }}

[[route]]
checks = ["flip"]
receivers = ["flaky"]
"#,
            flaky = flaky.url(),
            fallback = fallback.url(),
        ),
    );
    let agent = Agent::start(dir.path(), "db-1", &gw, "");
    let fp = agent.fingerprint.clone();
    hard_results(&gw, &fp, "ok", 2).await;

    // Two incidents while the receiver is down (connections refused): four notifications.
    for (code, status) in [(2, "critical"), (0, "ok"), (2, "critical"), (0, "ok")] {
        set_state(dir.path(), code);
        hard_results(&gw, &fp, status, 2).await;
    }
    eventually(T, "failed attempts counted", || async {
        (gw.metric("outpost_alert_delivery_failures_total ").await >= 2).then_some(())
    })
    .await;
    assert_eq!(
        gw.metric("outpost_alert_queue_depth ").await,
        4,
        "all four wait"
    );

    // Back, but failing first: two 503s, then a 429 asking for 3 s.
    flaky.answer(&["503", "503", "429 3"]);
    flaky.start().await;
    let got = taken(&flaky, 4).await;
    let delivered = ids(&got);
    let first = delivered[0].strip_suffix("/0").unwrap().to_string();
    let second = delivered[2].strip_suffix("/0").unwrap().to_string();
    assert_eq!(
        delivered,
        [
            format!("{first}/0"),
            format!("{first}/r"),
            format!("{second}/0"),
            format!("{second}/r")
        ],
        "in order"
    );
    assert_ne!(first, second);
    assert!(got.iter().all(|r| r["verified"] == true), "{got:?}");
    let all = flaky.requests();
    assert_eq!(
        all.iter()
            .map(|r| r["answered"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [503, 503, 429, 200, 200, 200, 200],
        "each taken once, retries of the first only"
    );
    assert!(
        ids(&all[..4]).iter().all(|i| *i == delivered[0]),
        "a retry carries the same webhook-id: {:?}",
        ids(&all)
    );
    let waited = all[3]["at"].as_f64().unwrap() - all[2]["at"].as_f64().unwrap();
    assert!(
        waited >= 2.9,
        "Retry-After 3 honoured: retried after {waited:.2}s"
    );
    eventually(T, "queue empty", || async {
        (gw.metric("outpost_alert_queue_depth ").await == 0).then_some(())
    })
    .await;

    // A 400 is final: not retried, counted, and the fallback is told.
    flaky.answer(&["400"]);
    set_state(dir.path(), 2);
    let told = taken(&fallback, 1).await;
    let notice = &told[0]["body"];
    assert_eq!(notice["type"], "alert.undeliverable", "{notice}");
    let output = notice["data"]["output"].as_str().unwrap();
    assert!(
        output.contains("\"flaky\"") && output.contains("400"),
        "{output}"
    );
    assert_eq!(
        gw.metric("outpost_alert_notifications_refused_total ")
            .await,
        1
    );
    let refused = flaky.requests().last().unwrap()["headers"]["webhook-id"]
        .as_str()
        .unwrap()
        .to_string();
    // The queue goes on: the resolve of that incident is delivered.
    set_state(dir.path(), 0);
    let got = taken(&flaky, 5).await;
    let resolve = got[4]["headers"]["webhook-id"].as_str().unwrap();
    assert_eq!(
        resolve,
        format!("{}/r", refused.strip_suffix("/0").unwrap())
    );
    assert_eq!(
        ids(&flaky.requests())
            .iter()
            .filter(|i| **i == refused)
            .count(),
        1,
        "a refusal is not retried"
    );
    drop(agent);
}
