//! A restarted agent carries on where it stopped, with the real binaries: a check that was
//! soft 2/3 goes on to a hard 3/3 (not soft 1/3), a check that ran just before the restart
//! waits for its next slot, and one whose slot passed while the agent was down runs at
//! once. The agent's `checks-state.json` is what makes the difference.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use outpost_e2e::*;

const T: Duration = Duration::from_secs(30);
const HOUR_MS: u64 = 3_600_000;

/// Results of `check` whose run started after `t`.
fn results_after(gw: &Gateway, fp: &str, check: &str, t: u64) -> Vec<Value> {
    gw.bus_results(fp, check)
        .into_iter()
        .filter(|r| r["started_at_ms"].as_u64().unwrap() > t)
        .collect()
}

/// Lines of the agent's log saying `check` ran.
fn runs_logged(agent: &Agent, check: &str) -> usize {
    agent
        .proc
        .log()
        .lines()
        .filter(|l| l.contains("check ran") && l.contains(&format!("check={check} ")))
        .count()
}

/// A plugin that is CRITICAL every time and counts its runs in `dir/count`; while
/// `dir/block` exists, its third run and later hang (so the agent can be stopped with the
/// check at soft 2/3 and nothing in flight).
fn flappy(dir: &Path) -> String {
    let path = dir.join("flappy.sh");
    let (count, block) = (dir.join("count"), dir.join("block"));
    std::fs::write(
        &path,
        format!(
            "n=$(cat {c} 2>/dev/null || echo 0)\nn=$((n+1))\necho $n > {c}\n\
             if [ $n -ge 3 ] && [ -e {b} ]; then sleep 60; fi\necho \"CRITICAL: run $n\"\nexit 2\n",
            c = count.display(),
            b = block.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_resumes_its_states_and_schedule() {
    let dir = tempdir();
    let gw = Gateway::start(dir.path(), &[]);
    let script = flappy(dir.path());
    std::fs::write(dir.path().join("block"), "").unwrap();
    gw.write_checks(
        "c.toml",
        &format!(
            r#"
[[check]]
name = "flappy"
command = ["/bin/sh", {script:?}]
interval = "1h"
timeout = "2m"
attempts = 3
retry_interval = 1

[[check]]
name = "recent"
command = ["/bin/echo", "recent"]
interval = "1h"

[[check]]
name = "missed"
command = ["/bin/echo", "missed"]
interval = "1h"
"#
        ),
    );
    let mut agent = Agent::start(dir.path(), "resumer", &gw, "reconnect_max_secs = 1\n");
    let fp = agent.fingerprint.clone();
    // Soft 1/3 and 2/3 delivered, the third run hanging; the others ran once.
    let r = eventually(
        T,
        "flappy at soft 2/3 with its third run hanging",
        || async {
            let r = gw.bus_results(&fp, "flappy");
            let count = std::fs::read_to_string(dir.path().join("count")).unwrap_or_default();
            (r.len() >= 2 && count.trim() == "3").then_some(r)
        },
    )
    .await;
    let states: Vec<(&str, u64)> = r
        .iter()
        .map(|r| {
            (
                r["state_type"].as_str().unwrap(),
                r["attempt"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(states, [("soft", 1), ("soft", 2)], "{r:#?}");
    for check in ["recent", "missed"] {
        eventually(T, &format!("{check} ran"), || async {
            (!gw.bus_results(&fp, check).is_empty()).then_some(())
        })
        .await;
    }

    // A graceful stop: the hanging run is killed (no result) and the states are written.
    agent.proc.signal(libc::SIGTERM);
    assert_eq!(
        agent.proc.wait_exit(T).await,
        Some(0),
        "{}",
        agent.proc.log()
    );
    std::fs::copy(
        &agent.proc.stderr_path,
        dir.path().join("resumer-before.log"),
    )
    .unwrap();
    let state_file = agent.state_dir.join("checks-state.json");
    let mut saved: Value = serde_json::from_slice(&std::fs::read(&state_file).unwrap()).unwrap();
    let f = &saved["checks"]["flappy"];
    assert_eq!(
        (&f["soft"], &f["attempt"]),
        (&Value::from(true), &Value::from(2)),
        "{saved:#}"
    );
    // As if the agent had been down for two hours after "missed" last ran (and "recent"
    // had run just before the restart).
    let long_ago = now_ms() - 2 * HOUR_MS;
    saved["checks"]["missed"]["last"]["started_at_ms"] = long_ago.into();
    saved["checks"]["missed"]["last"]["ended_at_ms"] = long_ago.into();
    std::fs::write(&state_file, serde_json::to_vec(&saved).unwrap()).unwrap();
    drop(agent);

    std::fs::remove_file(dir.path().join("block")).unwrap();
    let restart = now_ms();
    let agent = Agent::start(dir.path(), "resumer", &gw, "reconnect_max_secs = 1\n");
    assert_eq!(agent.fingerprint, fp);

    // The soft retry was due: it runs at once, and it is the third attempt, hard.
    let after = eventually(T, "flappy ran after the restart", || async {
        let r = results_after(&gw, &fp, "flappy", restart);
        (!r.is_empty()).then_some(r)
    })
    .await;
    let first = &after[0];
    assert_eq!(first["status"], "critical", "{first}");
    assert_eq!(
        (first["state_type"].as_str(), first["attempt"].as_u64()),
        (Some("hard"), Some(3)),
        "soft 2/3 before the restart must go on to hard 3/3: {first}"
    );
    let waited = first["started_at_ms"].as_u64().unwrap() - restart;
    assert!(waited < 10_000, "the due retry waited {waited} ms");

    // The missed slot runs at once (spread over the first seconds).
    let missed = eventually(T, "missed ran after the restart", || async {
        results_after(&gw, &fp, "missed", restart)
            .into_iter()
            .next()
    })
    .await;
    let waited = missed["started_at_ms"].as_u64().unwrap() - restart;
    assert!(waited < 15_000, "the missed slot waited {waited} ms");

    // "recent" ran minutes ago on an hourly grid: nothing until its slot. A check that
    // starts fresh would have run within 10 s of the start.
    while now_ms() < restart + 15_000 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(runs_logged(&agent, "recent"), 0, "{}", agent.proc.log());
    assert!(runs_logged(&agent, "missed") >= 1, "the log check works");
    assert!(
        results_after(&gw, &fp, "recent", restart).is_empty(),
        "recent ran again right after the restart"
    );
}
