//! An installation made by the release before tenants (fixtures made by its binaries, see
//! `tests/fixtures/upgrade/make.sh`) starts under the current binaries as it was: its
//! agent logs in with the secret it has (no new enrollment), keeps reporting, and is its
//! home tenant's; its `api.token` is that tenant's admin token and its `enroll.key` still
//! enrolls. On the embedded bus and on NATS.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use outpost_e2e::nats::NatsServer;
use outpost_e2e::{eventually, now_ms, tempdir, Agent, Gateway};

const T: Duration = Duration::from_secs(30);

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/upgrade")
        .join(name)
}

fn unpack(name: &str, into: &Path) {
    std::fs::create_dir_all(into).unwrap();
    let ok = Command::new("tar")
        .arg("-xzf")
        .arg(fixture(name))
        .arg("-C")
        .arg(into)
        .status()
        .unwrap();
    assert!(ok.success());
}

/// Move the fixture's gateway data directory to where [`Gateway::start`] puts it.
fn place_gateway(unpacked: &Path, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::rename(unpacked.join("gateway"), dir.join("gateway")).unwrap();
}

/// Start the fixture's agent, unchanged but for the gateway's new port, where the harness
/// keeps an agent named `name` (whose machine id the fixture was made with).
fn old_agent(unpacked: &Path, dir: &Path, name: &str, gw: &Gateway) -> Agent {
    std::fs::rename(unpacked.join("agent"), dir.join(name)).unwrap();
    let config = std::fs::read_to_string(dir.join(name).join("agent.toml")).unwrap();
    let config: String = config
        .lines()
        .filter(|l| !l.starts_with("state_dir") && !l.starts_with("machine_id_file"))
        .map(|l| l.replace("PORT", &gw.port().to_string()) + "\n")
        .collect();
    Agent::start_with_config(dir, name, &config)
}

async fn logs_in_unchanged(gw: &Gateway, agent: &Agent, fingerprint: &str) {
    assert_eq!(
        agent.fingerprint, fingerprint,
        "the agent kept its identity"
    );
    let since = now_ms();
    eventually(T, "the old agent reports again", || async {
        let r = gw.latest(fingerprint, "tick").await?;
        (r["started_at_ms"].as_u64()? > since).then_some(())
    })
    .await;
    let a = gw.agent(fingerprint).await.unwrap();
    assert_eq!(a["presence"], "online", "{a}");
    assert!(
        !gw.proc.log().contains("enrolled=true"),
        "the old agent was enrolled again:\n{}",
        gw.proc.log()
    );
    let secret = std::fs::read_to_string(agent.state_dir.join("agent.secret")).unwrap();
    assert!(!secret.contains('.'), "its secret is the one it had");
    // The old token is the home tenant's admin token.
    let (s, me) = gw.http("GET", "/api/v1/whoami", Some(&gw.token)).await;
    assert_eq!(s, 200, "{me}");
    assert_eq!(
        (me["tenant"].as_str(), me["role"].as_str()),
        (Some("default"), Some("admin"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_of_the_release_before_tenants_starts_with_its_agents_unchanged() {
    let dir = tempdir();
    let unpacked = dir.path().join("fixture");
    unpack("embedded.tar.gz", &unpacked);
    let fp = std::fs::read_to_string(unpacked.join("fingerprint")).unwrap();
    place_gateway(&unpacked, &dir.path().join("new"));
    let gw = Gateway::start(&dir.path().join("new"), &[]);
    // Known before it reconnects: the registry was kept.
    let before = gw
        .agent(fp.trim())
        .await
        .expect("the registry kept the agent");
    assert_eq!(before["hostname"], "old-host");
    let agent = old_agent(&unpacked, dir.path(), "upgrade-embedded", &gw);
    logs_in_unchanged(&gw, &agent, fp.trim()).await;
    // The old enrollment key still enrolls, into the home tenant.
    let fresh = Agent::start(dir.path(), "fresh", &gw, "");
    eventually(T, "a new agent enrolls with the old key", || async {
        gw.agent(&fresh.fingerprint).await.map(|_| ())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_fleet_of_the_release_before_tenants_starts_with_its_agents_unchanged() {
    let dir = tempdir();
    let unpacked = dir.path().join("fixture");
    unpack("nats.tar.gz", &unpacked);
    let fp = std::fs::read_to_string(unpacked.join("fingerprint")).unwrap();
    let nats = NatsServer::start_on_store(dir.path(), "n1", &unpacked.join("store"));
    place_gateway(&unpacked, &dir.path().join("new"));
    let gw = Gateway::start(
        &dir.path().join("new"),
        &["--bus", &nats.url(), "--gateway-id", "gw-old"],
    );
    let agent = old_agent(&unpacked, dir.path(), "upgrade-nats", &gw);
    logs_in_unchanged(&gw, &agent, fp.trim()).await;
    // A second, new gateway of the fleet takes the old agent's secret and key too.
    let gw2 = Gateway::start(&dir.path().join("second"), &["--bus", &nats.url()]);
    let (s, me) = gw2.http("GET", "/api/v1/whoami", Some(&gw.token)).await;
    assert_eq!((s, me["tenant"].as_str()), (200, Some("default")), "{me}");
    let (s, a) = gw2
        .http(
            "GET",
            &format!("/api/v1/agents/{}", fp.trim()),
            Some(&gw.token),
        )
        .await;
    assert_eq!((s, a["presence"].as_str()), (200, Some("online")), "{a}");
}
