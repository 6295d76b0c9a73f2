//! Alerting end to end, with the real binaries: a real agent runs a plugin that turns
//! CRITICAL and OK on cue, the gateway evaluates its results from the bus, and a local
//! webhook receiver verifies every notification with an independent Standard Webhooks
//! implementation (the `standardwebhooks` package from PyPI).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use outpost_e2e::flip::{flip_plugin, set_state};
use outpost_e2e::receivers::{
    signed_hook, Alertmanager, SmtpServer, WebhookReceiver, ROUTING_KEY, SECRET,
};
use outpost_e2e::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

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
    // The soft result before it did not notify: the incident is the first hard one's.
    let results = gw.bus_results(&fp, "flip");
    let first = |state_type: &str| {
        results
            .iter()
            .find(|r| r["status"] == "critical" && r["state_type"] == state_type)
            .map(|r| r["seq"].as_u64().unwrap())
            .unwrap_or_else(|| panic!("a {state_type} CRITICAL on the bus: {results:?}"))
    };
    let (soft, hard) = (first("soft"), first("hard"));
    assert!(soft < hard, "attempts = 2 makes the first CRITICAL soft");
    assert!(
        id.ends_with(&format!("/flip/{hard}/0")),
        "{id} is not incident {hard}"
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
    // A crash (kill -9) just after the resolve: the snapshot (every 5 s) is most likely
    // from before it, and the bus is read again from there; the notifications that makes
    // again were queued already and are not sent twice. The state kept goes on (a new
    // incident notifies once, with a new id).
    let addr = gw.addr.clone();
    gw.proc.signal(libc::SIGKILL);
    let resolved = &got[1];
    assert_eq!(resolved["verified"], true);
    assert_eq!(resolved["body"]["type"], "alert.resolved");
    let incident = id.strip_suffix("/0").unwrap();
    assert_eq!(resolved["headers"]["webhook-id"], format!("{incident}/r"));
    let mut gw = gw;
    gw.proc.wait_exit(T).await;
    assert!(!gw.proc.is_running());
    drop(gw);
    let gw = Gateway::start_on(dir.path(), &addr, &[]);
    hard_results(&gw, &fp, "ok", 3).await;
    assert_eq!(
        hook.requests().len(),
        2,
        "one resolve only, and nothing resent after the restart"
    );
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
retry_max = "2s"
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
    eventually(T, "all four waiting", || async {
        (gw.metric("outpost_alert_queue_depth ").await == 4).then_some(())
    })
    .await;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_receiver_gets_each_change_once_and_one_resolve_each() {
    let dir = tempdir();
    let plugin = flip_plugin(dir.path());
    let ports = free_ports(4);
    let mut slack = WebhookReceiver::of_kind("slack", dir.path(), "slack", ports[0], None);
    let mut pagerduty = WebhookReceiver::of_kind("pagerduty", dir.path(), "pd", ports[1], None);
    slack.start().await;
    pagerduty.start().await;
    let (ca, cert, key) = test_pki(&dir.path().join("pki"), "localhost");
    let smtp = SmtpServer::start(dir.path(), ports[2], &cert, &key, "outpost", "s3cret").await;
    let am = Alertmanager::start(dir.path(), ports[3]).await;
    let gw = Gateway::start(dir.path(), &[]);
    std::fs::write(dir.path().join("smtp.password"), "s3cret\n").unwrap();
    gw.write_checks(
        "flip.toml",
        &format!(
            r#"
[[check]]
name = "flip"
command = [{plugin:?}]
interval = 1

[[receiver]]
name = "chat"
slack = {{ url = "{slack}" }}

[[receiver]]
name = "pager"
pagerduty = {{ routing_key = "{ROUTING_KEY}", url = "{pd}" }}

[[receiver]]
name = "mail"
email = {{ from = "Outpost <outpost@example.com>", to = ["ops@example.com", "db@example.com"], smtp = "localhost:{smtp}", tls = "starttls", username = "outpost", password_file = "{password}", ca_file = "{ca}" }}

[[receiver]]
name = "am"
alertmanager = {{ url = "{am}" }}

# The chat channel hears of warnings and of criticals: one resolve all the same.
[[route]]
severity = ["warning"]
receivers = ["chat"]

[[route]]
severity = ["critical"]
receivers = ["chat", "pager", "mail", "am"]
"#,
            slack = slack.url(),
            pd = pagerduty.url(),
            smtp = smtp.port,
            password = dir.path().join("smtp.password").display(),
            ca = ca.display(),
            am = am.url(),
        ),
    );
    let agent = Agent::start(dir.path(), "web-1", &gw, "");
    let fp = agent.fingerprint.clone();
    hard_results(&gw, &fp, "ok", 2).await;

    set_state(dir.path(), 1);
    let chat = taken(&slack, 1).await;
    assert!(chat[0]["body"]["text"]
        .as_str()
        .unwrap()
        .contains("WARNING: flip on web-1"));
    hard_results(&gw, &fp, "warning", 2).await;
    assert!(pagerduty.requests().is_empty() && smtp.messages().is_empty());

    set_state(dir.path(), 2);
    let chat = taken(&slack, 2).await;
    assert!(chat[1]["body"]["text"]
        .as_str()
        .unwrap()
        .contains("CRITICAL: flip on web-1"));
    let events = taken(&pagerduty, 1).await;
    let trigger = &events[0]["body"];
    assert_eq!(trigger["event_action"], "trigger");
    assert_eq!(trigger["routing_key"], ROUTING_KEY);
    assert_eq!(trigger["payload"]["severity"], "critical");
    assert_eq!(trigger["payload"]["source"], "web-1");
    assert_eq!(trigger["payload"]["component"], "flip");
    let dedup_key = trigger["dedup_key"].as_str().unwrap().to_string();
    assert!(dedup_key.starts_with(&format!("{fp}/flip/")), "{dedup_key}");
    let mail = eventually(T, "the email", || async {
        let m = smtp.messages();
        (!m.is_empty()).then_some(m)
    })
    .await;
    assert_eq!(mail[0]["tls"], true, "STARTTLS");
    assert_eq!(mail[0]["auth_user"], "outpost");
    assert_eq!(mail[0]["mail_from"], "outpost@example.com");
    assert_eq!(
        mail[0]["rcpt_tos"],
        serde_json::json!(["ops@example.com", "db@example.com"])
    );
    let data = mail[0]["data"].as_str().unwrap();
    assert!(
        data.contains("Subject: [Outpost] CRITICAL: flip on web-1"),
        "{data}"
    );
    assert!(data.contains("flip is 2"), "{data}");
    let firing = eventually(T, "the alert in Alertmanager", || async {
        let a = am.alerts().await;
        a.into_iter().find(|a| a["labels"]["alertname"] == "flip")
    })
    .await;
    assert_eq!(firing["status"]["state"], "active", "{firing}");
    assert_eq!(firing["labels"]["instance"], "web-1");
    assert_eq!(firing["labels"]["fingerprint"], fp.as_str());
    assert_eq!(firing["labels"]["tenant"], "default");
    assert_eq!(firing["annotations"]["description"], "flip is 2");

    // Still critical: nothing more anywhere.
    hard_results(&gw, &fp, "critical", 3).await;
    assert_eq!(slack.requests().len(), 2);
    assert_eq!(pagerduty.requests().len(), 1);
    assert_eq!(smtp.messages().len(), 1);

    set_state(dir.path(), 0);
    let chat = taken(&slack, 3).await;
    assert!(chat[2]["body"]["text"]
        .as_str()
        .unwrap()
        .contains("RESOLVED: flip on web-1"));
    let events = taken(&pagerduty, 2).await;
    assert_eq!(events[1]["body"]["event_action"], "resolve");
    assert_eq!(events[1]["body"]["dedup_key"], dedup_key.as_str());
    let mail = eventually(T, "the resolve email", || async {
        let m = smtp.messages();
        (m.len() >= 2).then_some(m)
    })
    .await;
    assert!(mail[1]["data"]
        .as_str()
        .unwrap()
        .contains("Subject: [Outpost] RESOLVED: flip on web-1"));
    eventually(T, "the alert resolved in Alertmanager", || async {
        let a = am.alerts().await;
        a.iter()
            .all(|a| a["labels"]["alertname"] != "flip")
            .then_some(())
    })
    .await;
    hard_results(&gw, &fp, "ok", 3).await;
    assert_eq!(
        slack.requests().len(),
        3,
        "one resolve for the channel told twice"
    );
    assert_eq!(pagerduty.requests().len(), 2);
    assert_eq!(smtp.messages().len(), 2);
    for r in slack.requests().iter().chain(&pagerduty.requests()) {
        assert_eq!(r["problems"], serde_json::json!([]), "{r}");
    }
    drop(agent);
}

/// The requests `hook` took about check `check`.
fn about(hook: &WebhookReceiver, check: &str) -> Vec<Value> {
    hook.taken()
        .into_iter()
        .filter(|r| r["body"]["data"]["check"] == check)
        .collect()
}

async fn post(gw: &Gateway, path: &str, token: &str, body: Value) -> (u16, Value) {
    gw.http_json("POST", &format!("/api/v1{path}"), Some(token), Some(&body))
        .await
}

/// The alert of `check` as the API lists it.
async fn alert_state(gw: &Gateway, check: &str) -> Option<Value> {
    let list = gw.api("/alerts").await;
    list["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["check"] == check)
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silences_and_acknowledgements_hold_notifications_back_and_never_a_resolve() {
    let dir = tempdir();
    let plugin = flip_plugin(dir.path());
    let hook = signed_hook(dir.path()).await;
    let gw = Gateway::start(dir.path(), &[]);
    let checks = format!(
        r#"
[alerting]
silence_max_age = "3s"

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
repeat = "2s"

[[route]]
checks = ["outpost.*"]
receivers = ["hook"]
"#,
        url = hook.url()
    );
    gw.write_checks("flip.toml", &checks);
    let agent = Agent::start(dir.path(), "db-1", &gw, "");
    let fp = agent.fingerprint.clone();
    hard_results(&gw, &fp, "ok", 2).await;
    let admin = gw.token.clone();
    let (status, reader) = post(
        &gw,
        "/tokens",
        &admin,
        serde_json::json!({"role": "read", "name": "viewer"}),
    )
    .await;
    assert_eq!(status, 201, "{reader}");
    let reader = reader["api_token"].as_str().unwrap().to_string();

    // Bad silences are refused with the fix; a read token may not silence.
    let maintenance = serde_json::json!({
        "matchers": {"agent": "db-1", "checks": ["fl*"]},
        "ends_at": "1h", "permanent": true,
        "creator": "ann", "comment": "disk swap"
    });
    let (status, body) = post(&gw, "/silences", &reader, maintenance.clone()).await;
    assert_eq!(status, 403, "{body}");
    for (bad, says) in [
        (
            serde_json::json!({"creator": "ann", "comment": "x"}),
            "matchers",
        ),
        (
            serde_json::json!({"matchers": {"checks": ["x"]}, "creator": "", "comment": "x"}),
            "creator",
        ),
        (
            serde_json::json!({"matchers": {"checks": ["x"]}, "creator": "a", "comment": "x", "ends_at": "soon"}),
            "RFC 3339",
        ),
        (
            serde_json::json!({"matchers": {"checks": ["x"]}, "creator": "a", "comment": "x", "end": "1h"}),
            "unknown field",
        ),
    ] {
        let (status, body) = post(&gw, "/silences", &admin, bad).await;
        assert_eq!(status, 400, "{body}");
        assert!(body["error"].as_str().unwrap().contains(says), "{body}");
    }
    let (status, silence) = post(&gw, "/silences", &admin, maintenance).await;
    assert_eq!(status, 201, "{silence}");
    let silence_id = silence["id"].as_str().unwrap().to_string();

    // Kept before it was answered: a crash right after loses nothing.
    let addr = gw.addr.clone();
    gw.proc.signal(libc::SIGKILL);
    let mut gw = gw;
    gw.proc.wait_exit(T).await;
    drop(gw);
    let gw = Gateway::start_on(dir.path(), &addr, &[]);
    let listed = eventually(T, "the silence after a restart", || async {
        let (status, body) = gw.http("GET", "/api/v1/silences", Some(&reader)).await;
        (status == 200 && body["silences"][0]["id"] == silence_id.as_str()).then_some(body)
    })
    .await;
    assert_eq!(listed["silences"][0]["comment"], "disk swap");

    // Silenced: tracked, nobody told.
    set_state(dir.path(), 2);
    hard_results(&gw, &fp, "critical", 3).await;
    assert!(about(&hook, "flip").is_empty(), "silenced");
    let a = alert_state(&gw, "flip").await.expect("the alert is listed");
    assert_eq!(a["state"], "silenced", "{a}");
    assert_eq!(a["silenced_by"], serde_json::json!([silence_id.clone()]));

    // The silence ends while it fires: told then.
    let (status, body) = gw
        .http(
            "DELETE",
            &format!("/api/v1/silences/{silence_id}"),
            Some(&admin),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = gw
        .http("DELETE", "/api/v1/silences/nope", Some(&admin))
        .await;
    assert_eq!(status, 404);
    let firing = eventually(T, "the firing after the silence", || async {
        let f = about(&hook, "flip");
        (!f.is_empty()).then_some(f)
    })
    .await;
    assert_eq!(firing[0]["body"]["type"], "alert.firing");
    // It repeats (every 2 s) until acknowledged.
    eventually(T, "a repeat", || async {
        (about(&hook, "flip").len() >= 2).then_some(())
    })
    .await;
    let (status, body) = post(
        &gw,
        &format!("/alerts/{fp}/flip/ack"),
        &admin,
        serde_json::json!({"by": "ann", "comment": "replacing the disk"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = post(
        &gw,
        &format!("/alerts/{fp}/nope/ack"),
        &admin,
        serde_json::json!({"by": "ann"}),
    )
    .await;
    assert_eq!(status, 404);
    // A repeat queued just before the acknowledgement may still be on its way.
    eventually(T, "the queue empty", || async {
        (gw.metric("outpost_alert_queue_depth ").await == 0).then_some(())
    })
    .await;
    let acked = about(&hook, "flip").len();
    hard_results(&gw, &fp, "critical", 4).await;
    assert_eq!(
        about(&hook, "flip").len(),
        acked,
        "no repeats while acknowledged"
    );
    let a = alert_state(&gw, "flip").await.unwrap();
    assert_eq!(a["state"], "acknowledged", "{a}");

    // Silenced again, it resolves: the resolve is sent all the same, and a silence made to
    // end on resolve ends.
    let (status, s2) = post(
        &gw,
        "/silences",
        &admin,
        serde_json::json!({"matchers": {"checks": ["flip"]}, "expire_on_resolve": true, "permanent": true, "creator": "ann", "comment": "until fixed"}),
    )
    .await;
    assert_eq!(status, 201, "{s2}");
    hard_results(&gw, &fp, "critical", 2).await;
    set_state(dir.path(), 0);
    let resolved = eventually(T, "the resolve under a silence", || async {
        about(&hook, "flip")
            .into_iter()
            .find(|r| r["body"]["type"] == "alert.resolved")
    })
    .await;
    assert!(resolved["headers"]["webhook-id"]
        .as_str()
        .unwrap()
        .ends_with("/r"));
    eventually(T, "the silence expired on resolve", || async {
        let (_, body) = gw.http("GET", "/api/v1/silences", Some(&reader)).await;
        body["silences"]
            .as_array()?
            .iter()
            .find(|s| s["id"] == s2["id"] && !s["ends_ms"].is_null())
            .map(|_| ())
    })
    .await;

    // A silence left in force past silence_max_age (3 s) is reported once; a permanent
    // one never.
    let (status, forgotten) = post(
        &gw,
        "/silences",
        &admin,
        serde_json::json!({"matchers": {"checks": ["never-*"]}, "creator": "bob", "comment": "temporary"}),
    )
    .await;
    assert_eq!(status, 201, "{forgotten}");
    let meta = eventually(T, "the forgotten-silence alert", || async {
        let m = about(&hook, "outpost.silence");
        (!m.is_empty()).then_some(m)
    })
    .await;
    let output = meta[0]["body"]["data"]["output"].as_str().unwrap();
    assert!(
        output.contains(forgotten["id"].as_str().unwrap()) && output.contains("bob"),
        "{output}"
    );
    hard_results(&gw, &fp, "ok", 4).await;
    assert_eq!(
        about(&hook, "outpost.silence").len(),
        1,
        "once, and never for permanent ones"
    );
    drop(agent);
}

/// The requests `hook` took about `check` of agent `fp`.
fn about_agent(hook: &WebhookReceiver, fp: &str, check: &str) -> Vec<Value> {
    about(hook, check)
        .into_iter()
        .filter(|r| r["body"]["data"]["agent"]["fingerprint"] == fp)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_agent_fires_once_a_bye_never_and_a_silent_check_goes_stale() {
    let dir = tempdir();
    let plugin = flip_plugin(dir.path());
    let hook = signed_hook(dir.path()).await;
    let gw = Gateway::start(dir.path(), &["--presence-grace", "2"]);
    gw.write_checks(
        "flip.toml",
        &format!(
            r#"
[[check]]
name = "flip"
command = [{plugin:?}]
interval = 1
timeout = 2

[[receiver]]
name = "hook"
webhook = {{ url = "{url}", secret = "{SECRET}" }}

[[route]]
checks = ["outpost.agent", "flip"]
receivers = ["hook"]
"#,
            url = hook.url()
        ),
    );
    let killed = Agent::start(dir.path(), "killed", &gw, "");
    let bye = Agent::start(dir.path(), "bye", &gw, "");
    let stopped = Agent::start(dir.path(), "stopped", &gw, "");
    let (k, b, s) = (
        killed.fingerprint.clone(),
        bye.fingerprint.clone(),
        stopped.fingerprint.clone(),
    );
    for fp in [&k, &b, &s] {
        hard_results(&gw, fp, "ok", 2).await;
    }

    // Stopped on purpose: deregistered, never an alert.
    bye.proc.signal(libc::SIGTERM);
    eventually(T, "the agent deregistered", || async {
        let a = gw.agent(&b).await?;
        (a["presence"] == "deregistered").then_some(())
    })
    .await;
    // Killed: lost after the grace, then one alert.
    killed.proc.signal(libc::SIGKILL);
    let lost = eventually(T, "the lost agent's alert", || async {
        let a = about_agent(&hook, &k, "outpost.agent");
        (!a.is_empty()).then_some(a)
    })
    .await;
    assert_eq!(lost[0]["body"]["type"], "alert.firing");
    assert_eq!(lost[0]["body"]["data"]["status"], "critical");
    let output = lost[0]["body"]["data"]["output"].as_str().unwrap();
    assert!(
        output.contains("killed") && output.contains("lost"),
        "{output}"
    );

    // A hung agent (stopped, its connection still open): its check goes stale.
    stopped.proc.signal(libc::SIGSTOP);
    let stale = eventually(T, "the stale check", || async {
        let a = about_agent(&hook, &s, "flip");
        (!a.is_empty()).then_some(a)
    })
    .await;
    assert_eq!(stale[0]["body"]["data"]["status"], "unknown");
    let output = stale[0]["body"]["data"]["output"].as_str().unwrap();
    assert!(output.starts_with("stale: no result for"), "{output}");
    stopped.proc.signal(libc::SIGCONT);
    let back = eventually(T, "the stale check resolved", || async {
        let a = about_agent(&hook, &s, "flip");
        (a.len() >= 2).then_some(a)
    })
    .await;
    assert_eq!(back[1]["body"]["type"], "alert.resolved");

    // Back: the lost agent's alert resolves; nothing ever about the one that said bye.
    let killed = Agent::start(dir.path(), "killed", &gw, "");
    assert_eq!(killed.fingerprint, k);
    let resolved = eventually(T, "the agent's alert resolved", || async {
        let a = about_agent(&hook, &k, "outpost.agent");
        (a.len() >= 2).then_some(a)
    })
    .await;
    assert_eq!(resolved[1]["body"]["type"], "alert.resolved");
    hard_results(&gw, &s, "ok", 3).await;
    assert!(
        about_agent(&hook, &b, "outpost.agent").is_empty(),
        "bye never fires"
    );
    assert_eq!(
        about_agent(&hook, &k, "outpost.agent").len(),
        2,
        "one alert, one resolve"
    );
    drop((killed, stopped));
}

/// A plugin whose status is the number in `DIR/<name>`.
fn state_plugin(dir: &Path, name: &str) -> String {
    std::fs::write(dir.join(name), "0\n").unwrap();
    let path = dir.join(format!("check_{name}"));
    let state = dir.join(name).display().to_string();
    std::fs::write(
        &path,
        format!("#!/bin/sh\ns=$(cat {state:?})\necho \"{name} is $s\"\nexit $s\n"),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.display().to_string()
}

fn set(dir: &Path, name: &str, code: u8) {
    let tmp = dir.join(format!("{name}.tmp"));
    std::fs::write(&tmp, format!("{code}\n")).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

fn hard_count(gw: &Gateway, fp: &str, check: &str, status: &str) -> usize {
    gw.bus_results(fp, check)
        .iter()
        .filter(|r| r["status"] == status && r["state_type"] == "hard")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_and_its_200_dependent_checks_failing_in_either_order_notify_once() {
    let dir = tempdir();
    let router_plugin = state_plugin(dir.path(), "router");
    let web_plugin = state_plugin(dir.path(), "web");
    let hook = signed_hook(dir.path()).await;
    let gw = Gateway::start(dir.path(), &[]);
    let mut checks = format!(
        r#"
[[check]]
name = "ping"
command = [{router_plugin:?}]
interval = 1
target = {{ labels = {{ role = "router" }} }}

[[receiver]]
name = "hook"
webhook = {{ url = "{url}", secret = "{SECRET}" }}

[[route]]
receivers = ["hook"]

[[dependency]]
checks = ["http-*"]
labels = {{ role = "web" }}
on = {{ agent = "router-1", check = "ping" }}
wait = "15s"
"#,
        url = hook.url()
    );
    for i in 0..100 {
        checks.push_str(&format!(
            "\n[[check]]\nname = \"http-{i:03}\"\ncommand = [{web_plugin:?}]\ninterval = 2\ntarget = {{ labels = {{ role = \"web\" }} }}\n"
        ));
    }
    gw.write_checks("deps.toml", &checks);
    let router = Agent::start(
        dir.path(),
        "router-1",
        &gw,
        "labels = { role = \"router\" }\n",
    );
    let webs = [
        Agent::start(dir.path(), "web-1", &gw, "labels = { role = \"web\" }\n"),
        Agent::start(dir.path(), "web-2", &gw, "labels = { role = \"web\" }\n"),
    ];
    let r = router.fingerprint.clone();
    eventually(T, "every check reporting", || async {
        let all = webs.iter().all(|w| {
            (0..100).all(|i| hard_count(&gw, &w.fingerprint, &format!("http-{i:03}"), "ok") >= 1)
        });
        (all && hard_count(&gw, &r, "ping", "ok") >= 1).then_some(())
    })
    .await;
    let about_web = |hook: &WebhookReceiver| {
        hook.taken()
            .into_iter()
            .filter(|t| {
                t["body"]["data"]["check"]
                    .as_str()
                    .is_some_and(|c| c.starts_with("http-"))
            })
            .count()
    };

    // The router first, then the 200 checks behind it.
    set(dir.path(), "router", 2);
    eventually(T, "the router's alert", || async {
        (about(&hook, "ping").len() == 1).then_some(())
    })
    .await;
    set(dir.path(), "web", 2);
    let all_critical = |gw: &Gateway| {
        webs.iter().all(|w| {
            (0..100)
                .all(|i| hard_count(gw, &w.fingerprint, &format!("http-{i:03}"), "critical") >= 2)
        })
    };
    eventually(T, "200 checks critical", || async {
        all_critical(&gw).then_some(())
    })
    .await;
    // Past their wait (15 s), held by the router all along.
    let since = hard_count(&gw, &r, "ping", "critical");
    eventually(
        Duration::from_secs(60),
        "20 s of the router down",
        || async { (hard_count(&gw, &r, "ping", "critical") >= since + 20).then_some(()) },
    )
    .await;
    assert_eq!(about_web(&hook), 0, "held by the router");
    let a = alert_state(&gw, "http-042").await.unwrap();
    assert_eq!(a["state"], "held", "{a}");
    assert!(a["why"].as_str().unwrap().contains("router-1/ping"), "{a}");
    // Both back: the router's resolve, nothing about the others.
    set(dir.path(), "web", 0);
    set(dir.path(), "router", 0);
    eventually(T, "the router's resolve", || async {
        (about(&hook, "ping").len() == 2).then_some(())
    })
    .await;
    assert_eq!(about_web(&hook), 0, "the dependent checks said nothing");

    // The 200 checks first (their wait holds them), then the router.
    // Every dependent check OK again (a result after the change, on each agent).
    let ok_before: Vec<Vec<usize>> = webs
        .iter()
        .map(|w| {
            (0..100)
                .map(|i| hard_count(&gw, &w.fingerprint, &format!("http-{i:03}"), "ok"))
                .collect()
        })
        .collect();
    eventually(T, "the checks OK again", || async {
        webs.iter()
            .zip(&ok_before)
            .all(|(w, before)| {
                (0..100).all(|i| {
                    hard_count(&gw, &w.fingerprint, &format!("http-{i:03}"), "ok") > before[i]
                })
            })
            .then_some(())
    })
    .await;
    // The children fail first: each has a new hard CRITICAL before the router fails.
    let crit_before: Vec<usize> = webs
        .iter()
        .map(|w| hard_count(&gw, &w.fingerprint, "http-000", "critical"))
        .collect();
    set(dir.path(), "web", 2);
    eventually(T, "the dependent checks critical first", || async {
        webs.iter()
            .zip(&crit_before)
            .all(|(w, n)| hard_count(&gw, &w.fingerprint, "http-000", "critical") >= n + 2)
            .then_some(())
    })
    .await;
    assert_eq!(about(&hook, "ping").len(), 2, "the router is still OK");
    set(dir.path(), "router", 2);
    eventually(T, "the router's second alert", || async {
        (about(&hook, "ping").len() == 3).then_some(())
    })
    .await;
    // Past the dependent checks' wait: still nothing about them.
    let since = hard_count(&gw, &r, "ping", "critical");
    eventually(
        Duration::from_secs(60),
        "20 s of the router down",
        || async { (hard_count(&gw, &r, "ping", "critical") >= since + 20).then_some(()) },
    )
    .await;
    assert_eq!(about_web(&hook), 0, "one notification: the router's");
    assert_eq!(about(&hook, "ping").len(), 3);
    drop((router, webs));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_toggling_at_every_run_notifies_twice_and_once_when_it_settles() {
    let dir = tempdir();
    // Toggles at every run while DIR/toggle exists; OK otherwise.
    let flag = dir.path().join("toggle");
    let last = dir.path().join("last");
    std::fs::write(&last, "0\n").unwrap();
    let plugin = dir.path().join("check_toggle");
    std::fs::write(
        &plugin,
        format!(
            "#!/bin/sh\nif [ -e {flag:?} ]; then\n  s=$(cat {last:?}); n=$((2 - s)); echo $n > {last:?}\n  echo \"toggle is $n\"; exit $n\nfi\necho ok; exit 0\n",
            flag = flag.display().to_string(),
            last = last.display().to_string()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let hook = signed_hook(dir.path()).await;
    let gw = Gateway::start(dir.path(), &[]);
    gw.write_checks(
        "toggle.toml",
        &format!(
            r#"
[[check]]
name = "toggle"
command = [{plugin:?}]
interval = 1

[[receiver]]
name = "hook"
webhook = {{ url = "{url}", secret = "{SECRET}" }}

[[route]]
receivers = ["hook"]
"#,
            plugin = plugin.display().to_string(),
            url = hook.url()
        ),
    );
    let agent = Agent::start(dir.path(), "app-1", &gw, "");
    let fp = agent.fingerprint.clone();
    let count = |status: &str| hard_count(&gw, &fp, "toggle", status);
    eventually(T, "OK results", || async {
        (count("ok") >= 3).then_some(())
    })
    .await;
    std::fs::write(&flag, "").unwrap();
    // Forty changes of state.
    let (ok0, crit0) = (count("ok"), count("critical"));
    eventually(Duration::from_secs(120), "40 runs toggling", || async {
        (count("ok") >= ok0 + 20 && count("critical") >= crit0 + 20).then_some(())
    })
    .await;
    let said: Vec<String> = hook
        .taken()
        .iter()
        .map(|t| t["body"]["type"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        said,
        ["alert.firing", "alert.flapping"],
        "at most two while it flaps"
    );
    // It settles at OK: one word of it, and the resolve of what was told.
    std::fs::remove_file(&flag).unwrap();
    let settled = eventually(Duration::from_secs(90), "settled", || async {
        let t = hook.taken();
        (t.len() >= 4).then_some(t)
    })
    .await;
    let kinds: Vec<&str> = settled
        .iter()
        .map(|t| t["body"]["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "alert.firing",
            "alert.flapping",
            "alert.settled",
            "alert.resolved"
        ]
    );
    let ok_now = count("ok");
    eventually(T, "more OK results", || async {
        (count("ok") >= ok_now + 3).then_some(())
    })
    .await;
    assert_eq!(hook.taken().len(), 4);
    drop(agent);
}

/// The watchdog's slot in a ping's id (`watchdog/<slot>`).
fn watchdog_slot(request: &Value) -> u64 {
    let id = request["headers"]["webhook-id"].as_str().unwrap_or("");
    id.strip_prefix("watchdog/")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a watchdog ping: {id}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_pings_on_schedule_and_after_an_outage_sends_its_freshest_ping_not_a_backlog()
{
    const EVERY_MS: u64 = 10_000;
    let dir = tempdir();
    let mut hook = signed_hook(dir.path()).await;
    let gw = Gateway::start(dir.path(), &[]);
    gw.write_checks(
        "alerting.toml",
        &format!(
            r#"
[alerting]
watchdog = {{ receiver = "hook", every = "10s" }}

[[receiver]]
name = "hook"
webhook = {{ url = "{url}", secret = "{SECRET}" }}
"#,
            url = hook.url()
        ),
    );
    let got = taken(&hook, 2).await;
    for ping in &got {
        assert_eq!(ping["verified"], true, "{ping}");
        assert_eq!(ping["body"]["type"], "alert.watchdog", "{ping}");
        assert_eq!(ping["body"]["data"]["check"], "outpost.watchdog");
    }
    let (first, second) = (watchdog_slot(&got[0]), watchdog_slot(&got[1]));
    assert_eq!(second, first + 1, "one ping per period");

    // Down for three periods and more: the pings due meanwhile wait, and only the freshest
    // is sent once it is back (a dead man's switch wants to know it works now).
    hook.stop();
    let down_at = now_ms() / EVERY_MS;
    eventually(Duration::from_secs(60), "three periods pass", || async {
        (now_ms() / EVERY_MS >= down_at + 4).then_some(())
    })
    .await;
    let before = hook.requests().len();
    hook.start().await;
    let back_at = now_ms() / EVERY_MS;
    let got = taken(&hook, before + 2).await;
    let after: Vec<u64> = got[before..].iter().map(watchdog_slot).collect();
    assert!(
        after[0] >= back_at.saturating_sub(1) && after[0] > down_at + 2,
        "the first ping after the outage is a fresh one: slot {} (down at {down_at}, back at {back_at}); {after:?}",
        after[0]
    );
    assert!(after[1] > after[0], "{after:?}");
    let all: Vec<u64> = hook.requests().iter().map(watchdog_slot).collect();
    let mut unique = all.clone();
    unique.dedup();
    assert_eq!(unique, all, "no ping twice, none out of order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_of_one_group_go_out_in_one_notification_per_receiver() {
    let dir = tempdir();
    let plugin = flip_plugin(dir.path());
    let hook = signed_hook(dir.path()).await;
    let mut slack = WebhookReceiver::of_kind("slack", dir.path(), "slack", free_ports(1)[0], None);
    slack.start().await;
    let gw = Gateway::start(dir.path(), &[]);
    let mut checks = String::new();
    for c in ["flip-a", "flip-b", "flip-c", "flip-d", "flip-e"] {
        checks.push_str(&format!(
            "[[check]]\nname = \"{c}\"\ncommand = [{plugin:?}]\ninterval = 1\nattempts = 1\n\n"
        ));
    }
    gw.write_checks(
        "flip.toml",
        &format!(
            r#"{checks}
[[receiver]]
name = "hook"
webhook = {{ url = "{url}", secret = "{SECRET}" }}

[[receiver]]
name = "slack"
slack = {{ url = "{slack_url}" }}

[[route]]
checks = ["flip-*"]
receivers = ["hook", "slack"]
group_by = ["agent", "status"]
group_wait = "3s"
"#,
            url = hook.url(),
            slack_url = slack.url()
        ),
    );
    let agent = Agent::start(dir.path(), "web-1", &gw, "");
    let fp = agent.fingerprint.clone();
    eventually(T, "every check reporting", || async {
        let all = ["flip-a", "flip-b", "flip-c", "flip-d", "flip-e"];
        let mut ok = true;
        for c in all {
            ok &= gw.latest(&fp, c).await.is_some();
        }
        ok.then_some(())
    })
    .await;

    // Five turn CRITICAL within a run of each other: one notification with the five.
    set_state(dir.path(), 2);
    let got = taken(&hook, 1).await;
    let group = &got[0];
    assert_eq!(group["verified"], true, "{group}");
    assert_eq!(group["body"]["type"], "alert.group", "{group}");
    let id = group["headers"]["webhook-id"].as_str().unwrap().to_string();
    assert!(id.starts_with("group/"), "{id}");
    assert_eq!(group["body"]["data"]["id"], id.as_str());
    let alerts = group["body"]["data"]["alerts"].as_array().unwrap();
    let mut names: Vec<&str> = alerts
        .iter()
        .map(|a| a["check"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(
        names,
        ["flip-a", "flip-b", "flip-c", "flip-d", "flip-e"],
        "{group}"
    );
    for a in alerts {
        assert_eq!(a["type"], "alert.firing", "{a}");
        assert_eq!(a["status"], "critical");
        assert_eq!(a["agent"]["fingerprint"], fp.as_str());
    }
    let slack_got = eventually(T, "Slack's one message", || async {
        let t = slack.taken();
        (!t.is_empty()).then_some(t)
    })
    .await;
    assert_eq!(
        slack_got[0]["problems"],
        serde_json::json!([]),
        "{}",
        slack_got[0]
    );
    let text = slack_got[0]["body"]["text"].as_str().unwrap_or("");
    assert!(text.starts_with("5 notifications"), "{text}");

    // And back: one group of five resolves.
    set_state(dir.path(), 0);
    let got = taken(&hook, 2).await;
    let resolved = got[1]["body"]["data"]["alerts"].as_array().unwrap();
    assert_eq!(resolved.len(), 5, "{}", got[1]);
    assert!(
        resolved.iter().all(|a| a["type"] == "alert.resolved"),
        "{}",
        got[1]
    );
    let oks = || {
        gw.bus_results(&fp, "flip-a")
            .iter()
            .filter(|r| r["status"] == "ok")
            .count()
    };
    let before = oks();
    eventually(T, "three more OK results", || async {
        (oks() >= before + 3).then_some(())
    })
    .await;
    assert_eq!(hook.requests().len(), 2, "two notifications in all");
    assert_eq!(slack.requests().len(), 2, "two Slack messages in all");
    drop(agent);
}
