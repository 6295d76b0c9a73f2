//! The API's OpenAPI document against a real gateway: it is valid OpenAPI 3.1
//! (openapi-spec-validator, PyPI), it names every route the gateway serves with its
//! answers and roles, and Schemathesis (PyPI) fuzzing every operation with a bounded,
//! seeded number of examples finds no failure: no 5xx, no undocumented status or content
//! type, no answer that breaks its schema, no schema-violating request accepted.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use outpost_e2e::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);

const CHECKS: &str = r#"
[[check]]
name = "tick"
command = ["/bin/echo", "tick done | load=0.5;1;2"]
interval = 1

[[receiver]]
name = "nowhere"
webhook = { url = "http://127.0.0.1:9/" }

[[route]]
checks = ["tick"]
receivers = ["nowhere"]
"#;

/// Every (method, path) the gateway serves.
const ROUTES: &[(&str, &str)] = &[
    ("get", "/"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/ws"),
    ("get", "/install.sh"),
    ("get", "/releases/manifest.json"),
    ("get", "/releases/manifest.json.sig"),
    ("get", "/releases/{version}/{file}"),
    ("get", "/api/v1/openapi.json"),
    ("get", "/api/v1/agents"),
    ("get", "/api/v1/agents/{fingerprint}"),
    ("delete", "/api/v1/agents/{fingerprint}"),
    ("post", "/api/v1/agents/{fingerprint}/revoke"),
    ("get", "/api/v1/agents/{fingerprint}/checks"),
    ("post", "/api/v1/agents/{fingerprint}/checks/{check}/run"),
    ("get", "/api/v1/agents/{fingerprint}/checks/{check}/history"),
    ("get", "/api/v1/entities"),
    ("post", "/api/v1/entities/{name}/checks/{check}/run"),
    ("get", "/api/v1/events"),
    ("get", "/api/v1/alerts"),
    ("post", "/api/v1/alerts/{fingerprint}/{check}/ack"),
    ("get", "/api/v1/silences"),
    ("post", "/api/v1/silences"),
    ("delete", "/api/v1/silences/{id}"),
    ("get", "/api/v1/whoami"),
    ("get", "/api/v1/config/checks"),
    ("put", "/api/v1/config/checks"),
    ("get", "/api/v1/keys"),
    ("post", "/api/v1/keys"),
    ("post", "/api/v1/keys/{id}/revoke"),
    ("get", "/api/v1/tokens"),
    ("post", "/api/v1/tokens"),
    ("post", "/api/v1/tokens/{id}/revoke"),
    ("get", "/api/v1/tenants"),
    ("post", "/api/v1/tenants"),
    ("get", "/api/v1/tenants/{name}"),
    ("patch", "/api/v1/tenants/{name}"),
    ("delete", "/api/v1/tenants/{name}"),
    ("post", "/api/v1/tenants/{name}/tokens"),
];

/// Schemathesis's CLI from the pinned PyPI package (ci/setup installs it), with the
/// fixtures' configuration: (exit code, its report).
fn schemathesis(url: &str, token: &str, env: &[(&str, &str)], more: &[&str]) -> (i32, String) {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/schemathesis.toml");
    let mut cmd = Command::new("python3");
    cmd.args([
        "-c",
        "import sys; from schemathesis.cli import schemathesis; sys.argv[0] = 'st'; schemathesis()",
        "--config-file",
    ])
    .arg(&config)
    .args(["run", &format!("{url}/api/v1/openapi.json"), "--no-color"])
    .args(["-H", &format!("Authorization: Bearer {token}")])
    .args(more)
    .args(
        std::env::var("OUTPOST_ST_MAX_EXAMPLES")
            .map(|n| vec!["--max-examples".to_string(), n])
            .unwrap_or_default(),
    )
    .envs(env.iter().copied());
    let out = cmd
        .output()
        .expect("python3 with schemathesis (ci/setup installs it)");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_is_valid_complete_and_schemathesis_finds_no_failure() {
    let dir = tempdir();
    let gw = Gateway::start(dir.path(), &[]);
    gw.write_checks("checks.toml", CHECKS);
    let agent = Agent::start(dir.path(), "web-1", &gw, "");
    // Revoked and forgotten by the fuzzing (its own fingerprint), so web-1 stays.
    let victim = Agent::start(dir.path(), "victim", &gw, "");
    eventually(T, "a tick result of web-1", || async {
        gw.latest(&agent.fingerprint, "tick").await
    })
    .await;
    eventually(T, "the victim online", || async {
        gw.agent(&victim.fingerprint)
            .await
            .filter(|a| a["presence"] == "online")
    })
    .await;
    // A token the fuzzing may revoke, so the one it runs with stays.
    let (status, made) = gw
        .http_json(
            "POST",
            "/api/v1/tokens",
            Some(&gw.token),
            Some(&json!({"role": "read", "name": "to be revoked"})),
        )
        .await;
    assert_eq!(status, 201, "{made}");
    let victim_token = made["id"].as_str().unwrap().to_string();

    // The document: served without a token, OpenAPI 3.1, every route, roles and errors.
    let (status, doc) = gw.http("GET", "/api/v1/openapi.json", None).await;
    assert_eq!(status, 200, "{doc}");
    assert_eq!(doc["openapi"], "3.1.0");
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, doc.to_string()).unwrap();
    let valid = Command::new("python3")
        .args(["-m", "openapi_spec_validator"])
        .arg(&file)
        .output()
        .expect("python3 with openapi-spec-validator (ci/setup installs it)");
    assert!(
        valid.status.success(),
        "the document is not valid OpenAPI: {}{}",
        String::from_utf8_lossy(&valid.stdout),
        String::from_utf8_lossy(&valid.stderr)
    );
    let mut documented: Vec<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .filter(|m| !m.starts_with("parameters"))
                .map(move |m| (m.clone(), path.clone()))
        })
        .collect();
    documented.sort();
    let mut served: Vec<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    served.sort();
    assert_eq!(documented, served, "every route served, and no other");
    for (method, path) in &documented {
        let op = &doc["paths"][path][method];
        let statuses = op["responses"].as_object().unwrap();
        if path.starts_with("/api/v1/") && path != "/api/v1/openapi.json" {
            assert_eq!(
                op["security"],
                json!([{"bearer": []}]),
                "{method} {path} names its token"
            );
            assert!(
                statuses.contains_key("401"),
                "{method} {path} documents 401"
            );
        }
        assert!(
            statuses.keys().any(|s| s.starts_with('2') || s == "101"),
            "{method} {path} documents its success"
        );
    }
    // The protocol's own schemas, resolvable from where they are used.
    let result = &doc["components"]["schemas"]["CheckResult"];
    assert!(result["properties"]["seq"].is_object(), "{result}");
    let run = &doc["paths"]["/api/v1/agents/{fingerprint}/checks/{check}/run"]["post"];
    assert_eq!(
        run["responses"]["200"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/CheckResult"
    );

    // Schemathesis, with the tenant's admin token (the operator's routes apart).
    let env = [
        ("OUTPOST_ST_AGENT", agent.fingerprint.as_str()),
        ("OUTPOST_ST_VICTIM_AGENT", victim.fingerprint.as_str()),
        ("OUTPOST_ST_VICTIM_TOKEN", victim_token.as_str()),
    ];
    let (code, report) = schemathesis(
        &format!("https://{}", gw.addr),
        &gw.token,
        &env,
        &["--exclude-path-regex", "^/api/v1/tenants"],
    );
    assert_eq!(code, 0, "Schemathesis found failures:\n{report}");
    assert!(
        !report.contains("Authentication failed"),
        "every operation was reached with a valid token:\n{report}"
    );
    // And with the operator's, the tenants' routes.
    let operator = std::fs::read_to_string(gw.data_dir.join("operator.token")).unwrap();
    let (code, report) = schemathesis(
        &format!("https://{}", gw.addr),
        operator.trim(),
        &env,
        &["--include-path-regex", "^/api/v1/tenants"],
    );
    assert_eq!(code, 0, "Schemathesis found failures:\n{report}");
    assert!(
        !report.contains("Authentication failed"),
        "every operation was reached with a valid token:\n{report}"
    );
    // The gateway still serves, and web-1 was left alone.
    let a: Value = gw.agent(&agent.fingerprint).await.unwrap();
    assert_eq!(a["presence"], "online", "{a}");
}
