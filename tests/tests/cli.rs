//! The operator CLI (`outpost`) against a real gateway and agent: contexts, each command's
//! output and exit code, errors that name the fix, and `events --follow` going on across a
//! gateway restart without missing or repeating an event.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use outpost_e2e::*;

const T: Duration = Duration::from_secs(60);

const CHECKS: &str = r#"
[[check]]
name = "tick"
command = ["/bin/echo", "tick done"]
interval = 1

[[receiver]]
name = "nowhere"
webhook = { url = "http://127.0.0.1:9/" }

[[route]]
checks = ["tick"]
receivers = ["nowhere"]
"#;

/// `outpost ARGS` with the contexts file `config`: (exit code, stdout, stderr).
fn outpost(config: &Path, args: &[&str]) -> (i32, String, String) {
    // Bounded: a command that hangs fails the test instead of holding it.
    let out = Command::new("timeout")
        .arg("60")
        .arg(bin("outpost"))
        .args(args)
        .env("OUTPOST_CONFIG", config)
        .env_remove("OUTPOST_CONTEXT")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(config: &Path, args: &[&str]) -> String {
    let (code, out, err) = outpost(config, args);
    assert_eq!(code, 0, "outpost {args:?}: {err}");
    out
}

fn context(config: &Path, name: &str, gw: &Gateway, token: &str) {
    let url = format!("https://{}", gw.addr);
    ok(
        config,
        &[
            "context", "set", name, "--url", &url, "--token", token, "--pin", &gw.pin,
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_command_prints_what_the_api_says_and_exits_with_its_meaning() {
    let dir = tempdir();
    let config = dir.path().join("cli.toml");
    // No context yet: a usage error naming the fix.
    let (code, _, err) = outpost(&config, &["agents", "list"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("outpost context set"), "{err}");

    let gw = Gateway::start(dir.path(), &[]);
    gw.write_checks("checks.toml", CHECKS);
    let agent = Agent::start(dir.path(), "web-1", &gw, "");
    let fp = agent.fingerprint.clone();
    context(&config, "local", &gw, &gw.token);
    // The file holds a token: its owner's only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&config).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let list = ok(&config, &["context", "list"]);
    assert!(list.contains("local") && list.contains(&gw.pin), "{list}");
    assert!(!list.contains(&gw.token), "tokens are not shown: {list}");

    eventually(T, "web-1 online in `agents list`", || async {
        let out = ok(&config, &["agents", "list"]);
        (out.contains("web-1") && out.contains("online")).then_some(out)
    })
    .await;
    let json: serde_json::Value =
        serde_json::from_str(&ok(&config, &["agents", "list", "-o", "json"])).unwrap();
    assert_eq!(json[0]["fingerprint"], fp.as_str());
    let show = ok(&config, &["agents", "show", &fp]);
    assert!(
        show.contains("hostname") && show.contains("web-1"),
        "{show}"
    );
    let (code, _, err) = outpost(&config, &["agents", "show", "nobody"]);
    assert_eq!(code, 4, "{err}");

    eventually(T, "tick in `checks list`", || async {
        let out = ok(&config, &["checks", "list", &fp]);
        out.contains("tick done").then_some(out)
    })
    .await;
    let run = ok(&config, &["run", &fp, "tick"]);
    assert!(run.starts_with("tick ok: tick done"), "{run}");
    let (code, _, err) = outpost(&config, &["run", &fp, "nope"]);
    assert_eq!(code, 4, "{err}");

    // Silences and acks (operate), alerts (read).
    let id = ok(
        &config,
        &[
            "silence",
            "add",
            "--check",
            "ti*",
            "--for",
            "1h",
            "--comment",
            "maintenance",
            "--creator",
            "ops",
        ],
    );
    let id = id.trim().to_string();
    assert!(!id.is_empty());
    let listed = ok(&config, &["silence", "list"]);
    assert!(
        listed.contains(&id) && listed.contains("maintenance"),
        "{listed}"
    );
    ok(&config, &["silence", "expire", &id]);
    let (code, _, err) = outpost(
        &config,
        &["silence", "add", "--comment", "x", "--creator", "y"],
    );
    assert_eq!(
        code, 1,
        "a silence that matches everything is refused: {err}"
    );
    assert!(err.contains("refused"), "{err}");
    // `tick` is OK, so no alert is open: acknowledging it is "not found".
    let alerts: serde_json::Value =
        serde_json::from_str(&ok(&config, &["alerts", "-o", "json"])).unwrap();
    assert!(alerts.is_object() || alerts.is_array(), "{alerts}");
    let (code, _, err) = outpost(
        &config,
        &["ack", &fp, "tick", "--comment", "on it", "--by", "ops"],
    );
    assert_eq!(code, 4, "{err}");
    let (code, _, err) = outpost(&config, &["ack", &fp, "tick", "--comment", "on it"]);
    assert_eq!(code, 2, "--by is required: {err}");
    // The VERSION column is filled.
    let list = ok(&config, &["agents", "list"]);
    let header = list.lines().next().unwrap();
    assert!(header.contains("AGENT_VERSION"), "{list}");
    let version = gw.agent(&fp).await.unwrap()["agent_version"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!version.is_empty() && list.contains(&version), "{list}");

    // Events: from the oldest kept, a bounded number (once that many are kept).
    eventually(T, "6 results on the bus", || async {
        (gw.metric("outpost_results_accepted_total ").await >= 6).then_some(())
    })
    .await;
    // History: what the API answers is the check's results as the bus's own files hold
    // them, in order (read the API first: the bus only grows meanwhile).
    let h = gw
        .api(&format!("/agents/{fp}/checks/tick/history?since=1h"))
        .await;
    let seqs = |v: &serde_json::Value| -> Vec<u64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| r["seq"].as_u64().unwrap())
            .collect()
    };
    let got = seqs(&h["results"]);
    let on_bus: Vec<u64> = gw
        .bus_all(&fp)
        .iter()
        .filter(|r| r["check"] == "tick")
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert!(got.len() >= 6, "{h}");
    assert_eq!(
        &on_bus[..got.len()],
        got.as_slice(),
        "the bus's tick results"
    );
    assert_eq!(h["count"], got.len());
    assert_eq!(h["states"].as_array().unwrap().len(), got.len());
    assert_eq!(h["truncated"], false);
    let newest = gw
        .api(&format!(
            "/agents/{fp}/checks/tick/history?since=1h&limit=2&results=false"
        ))
        .await;
    assert!(newest.get("results").is_none(), "{newest}");
    assert_eq!(newest["truncated"], true);
    for (path, status, says) in [
        (
            format!("/agents/{fp}/checks/tick/history?since=yesterday"),
            400,
            "not a duration",
        ),
        (
            format!("/agents/{fp}/checks/tick/history?limit=0"),
            400,
            "out of range",
        ),
        (
            format!("/agents/{fp}/checks/tick/history?bogus=1"),
            400,
            "bogus",
        ),
        (
            "/agents/nobody/checks/tick/history".to_string(),
            404,
            "nobody",
        ),
    ] {
        let (code, body) = gw
            .http("GET", &format!("/api/v1{path}"), Some(&gw.token))
            .await;
        assert_eq!(code, status, "{path}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains(says),
            "{path}: {body}"
        );
    }
    let (code, table, err) = outpost(&config, &["history", &fp, "tick", "--limit", "3"]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<&str> = table.lines().skip(1).collect();
    assert_eq!(rows.len(), 3, "{table}");
    assert!(
        rows.iter()
            .all(|r| r.contains(" ok ") && r.contains("tick done")),
        "{table}"
    );
    assert!(err.contains("newest 3"), "the truncation is said: {err}");
    let (code, _, err) = outpost(&config, &["history", &fp, "tick", "--since", "soon"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("90m"), "the fix is named: {err}");

    // Check files: diff and push a directory. It holds the gateway's file as it is and
    // a new one: the diff names only the new one; pushed, the agent runs its check.
    let conf = dir.path().join("conf");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(conf.join("checks.toml"), CHECKS).unwrap();
    std::fs::write(
        conf.join("more.toml"),
        "[[check]]\nname = \"added\"\ncommand = [\"/bin/echo\", \"added here\"]\ninterval = 1\n",
    )
    .unwrap();
    let diff = ok(&config, &["config", "diff", conf.to_str().unwrap()]);
    assert!(diff.contains("+ more.toml (new, 4 lines)"), "{diff}");
    assert!(
        !diff.contains("checks.toml"),
        "unchanged files are not in the diff: {diff}"
    );
    assert!(diff.contains("1 change(s) to push"), "{diff}");
    assert!(
        !gw.checks_dir.join("more.toml").exists(),
        "a diff changes nothing"
    );
    let pushed = ok(&config, &["config", "push", conf.to_str().unwrap()]);
    assert!(pushed.contains("1 change(s) made"), "{pushed}");
    eventually(T, "the pushed check run by the agent", || async {
        gw.latest(&fp, "added")
            .await
            .filter(|l| l["output"] == "added here")
    })
    .await;
    let again = ok(&config, &["config", "diff", conf.to_str().unwrap()]);
    assert!(again.trim_end().ends_with("no changes"), "{again}");
    // A file that does not validate: nothing is pushed, the file and the fault named.
    std::fs::write(conf.join("bad.toml"), "[[check]]\nname = \"x\"\n").unwrap();
    let (code, _, err) = outpost(&config, &["config", "push", conf.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("bad.toml") && err.contains("nothing was changed"),
        "{err}"
    );
    assert!(!gw.checks_dir.join("bad.toml").exists());
    std::fs::remove_file(conf.join("bad.toml")).unwrap();
    // A tenant's admin may not make the gateway read its files (a receiver's secret_file
    // would be read on the gateway and sent to the receiver).
    std::fs::write(
        conf.join("leak.toml"),
        "[[receiver]]\nname = \"leak\"\nwebhook = { url = \"http://127.0.0.1:9/\", secret_file = \"/etc/hostname\" }\n",
    )
    .unwrap();
    let (code, _, err) = outpost(&config, &["config", "push", conf.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("leak.toml") && err.contains("names a file on the gateway (secret_file)"),
        "{err}"
    );
    assert!(!gw.checks_dir.join("leak.toml").exists());
    std::fs::remove_file(conf.join("leak.toml")).unwrap();
    // Nothing to push is refused, not taken as "remove every check".
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let (code, _, err) = outpost(&config, &["config", "push", empty.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no check files"), "{err}");
    // Written private (they may hold receivers' secrets).
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(gw.checks_dir.join("more.toml"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // Removing a file from the directory removes it from the gateway.
    std::fs::remove_file(conf.join("more.toml")).unwrap();
    let pushed = ok(&config, &["config", "push", conf.to_str().unwrap()]);
    assert!(pushed.contains("- more.toml (removed)"), "{pushed}");
    assert!(!gw.checks_dir.join("more.toml").exists());

    // Proxy entities: a check about one, placed on the only agent there is.
    gw.write_checks(
        "site.toml",
        &format!(
            "[[entity]]\nname = \"site\"\naddress = \"127.0.0.1\"\n\
             [[check]]\nname = \"reach\"\ntcp = {{ host = \"127.0.0.1\", port = {} }}\ninterval = 2\nentity = \"site\"\n",
            gw.port()
        ),
    );
    eventually(T, "reach ok on web-1 in `entities list`", || async {
        let out = ok(&config, &["entities", "list"]);
        out.lines()
            .any(|l| {
                l.starts_with("site ")
                    && l.contains(" reach ")
                    && l.contains(" round_robin ")
                    && l.contains(" web-1 ")
                    && l.contains(" ok ")
                    && l.contains("last run by web-1")
            })
            .then_some(out)
    })
    .await;
    let ran = ok(&config, &["entities", "run", "site", "reach"]);
    assert!(ran.starts_with(&format!("reach ok from {fp}: ")), "{ran}");
    let (code, _, err) = outpost(&config, &["entities", "run", "site", "nope"]);
    assert_eq!(code, 4, "{err}");

    let events = ok(
        &config,
        &[
            "events", "--from", "0-0-0", "--types", "result", "--limit", "5",
        ],
    );
    assert_eq!(events.lines().count(), 5, "{events}");
    assert!(events.lines().all(|l| l.starts_with("result")), "{events}");
    // Without --follow and without a limit reached, it stops once it has read all there
    // is (presence events of one agent: a few).
    let events = ok(
        &config,
        &["events", "--from", "0-0-0", "--types", "presence"],
    );
    assert!(
        (1..100).contains(&events.lines().count()) && events.contains("web-1"),
        "{events}"
    );

    // A token refused: exit 1, saying how to fix it.
    context(&config, "bad", &gw, "at_nope_nope");
    let (code, _, err) = outpost(&config, &["--context", "bad", "agents", "list"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--token"), "{err}");
    // Nobody there: exit 3.
    let url = "https://127.0.0.1:9";
    ok(
        &config,
        &[
            "context", "set", "gone", "--url", url, "--token", "t", "--pin", &gw.pin,
        ],
    );
    let (code, _, err) = outpost(&config, &["--context", "gone", "agents", "list"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("cannot reach"), "{err}");
    // A wrong pin: exit 3, the TLS failure said.
    ok(
        &config,
        &[
            "context",
            "set",
            "pinned",
            "--url",
            &format!("https://{}", gw.addr),
            "--token",
            "t",
            "--pin",
            &"0".repeat(64),
        ],
    );
    let (code, _, err) = outpost(&config, &["--context", "pinned", "agents", "list"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("pin_sha256"), "the TLS failure is said: {err}");
    // A pin that is not one is refused when the context is set.
    let (code, _, err) = outpost(
        &config,
        &[
            "context", "set", "x", "--url", url, "--token", "t", "--pin", "abc",
        ],
    );
    assert_eq!(code, 2, "{err}");

    // Completions for a shell.
    let bash = ok(&config, &["completions", "bash"]);
    assert!(
        bash.contains("outpost") && bash.contains("silence"),
        "completions"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_follow_goes_on_across_a_gateway_restart_missing_nothing() {
    let dir = tempdir();
    let config = dir.path().join("cli.toml");
    let gw = Gateway::start(dir.path(), &[]);
    gw.write_checks("checks.toml", CHECKS);
    let agent = Agent::start(dir.path(), "web-1", &gw, "");
    context(&config, "local", &gw, &gw.token);
    let out_path = dir.path().join("events.jsonl");
    let mut follower = Command::new(bin("outpost"))
        .args(["events", "--follow", "--types", "result", "-o", "json"])
        .env("OUTPOST_CONFIG", &config)
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let seqs = || -> Vec<u64> {
        std::fs::read_to_string(&out_path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["data"]["fingerprint"] == agent.fingerprint.as_str())
            .map(|v| v["data"]["result"]["seq"].as_u64().unwrap())
            .collect()
    };
    eventually(T, "5 results followed", || async {
        (seqs().len() >= 5).then_some(())
    })
    .await;

    // The gateway killed and started again where it was, while the CLI is held still so
    // that it comes back only once more results are on the bus: it must resume from its
    // last id, not from the moment it reconnects.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(follower.id() as i32, libc::SIGSTOP) };
    let addr = gw.addr.clone();
    drop(gw);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let gw = Gateway::start_on(dir.path(), &addr, &[]);
    eventually(T, "more results on the bus after the restart", || async {
        (gw.metric("outpost_results_accepted_total ").await >= 5).then_some(())
    })
    .await;
    unsafe { libc::kill(follower.id() as i32, libc::SIGCONT) };
    let before = seqs().len();
    eventually(T, "10 more results followed after the restart", || async {
        (seqs().len() >= before + 10).then_some(())
    })
    .await;
    let _ = follower.kill();
    let _ = follower.wait();
    drop(gw);
    let s = seqs();
    let run: Vec<u64> = (s[0]..s[0] + s.len() as u64).collect();
    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    for x in &s {
        *counts.entry(*x).or_default() += 1;
    }
    assert_eq!(s, run, "missed or repeated across the restart: {counts:?}");
}
