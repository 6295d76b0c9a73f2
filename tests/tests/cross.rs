//! The static Linux builds `ci/dist` ships, run for real against a local gateway over TLS:
//! the x86_64 musl binary natively, the aarch64 one under qemu-user (Debian's
//! qemu-aarch64). Each must enroll, say which machine it runs on, and deliver results of a
//! built-in check and of a Nagios plugin (a host program the emulated agent starts).

use std::ffi::OsStr;
use std::process::Command;
use std::time::Duration;

use outpost_e2e::*;

/// qemu-user runs a debug build several times slower than native.
const T: Duration = Duration::from_secs(90);

const CHECKS: &str = r#"
[[check]]
name = "load"
load = { warn = 1000, crit = 2000 }
interval = 2

[[check]]
name = "say"
command = ["/bin/echo", "OK - from the static build|x=1"]
interval = 2
"#;

async fn enrolls_and_delivers(artifact: &str, emulator: Option<&str>, want_arch: &str) {
    let binary = dist_artifact(artifact);
    let dir = tempdir();
    let gw = Gateway::start(dir.path(), &[]);
    gw.write_checks("cross.toml", CHECKS);
    let toml = format!(
        "gateway_url = {:?}\nenroll_key = {:?}\npin_sha256 = {:?}\nhostname = \"cross\"\n",
        gw.url(),
        gw.enroll_key,
        gw.pin
    );
    let mut argv: Vec<&OsStr> = emulator.iter().map(OsStr::new).collect();
    argv.push(binary.as_os_str());
    let agent = Agent::start_program(dir.path(), "cross", &toml, &argv);
    let fp = agent.fingerprint.clone();

    let record = eventually(T, "the agent online", || async {
        gw.agent(&fp).await.filter(|a| a["presence"] == "online")
    })
    .await;
    assert_eq!(record["arch"], want_arch, "{record}");
    assert_eq!(record["os"], "linux", "{record}");

    let say = eventually(T, "a plugin result", || async {
        gw.latest(&fp, "say").await
    })
    .await;
    assert_eq!(say["status"], "ok", "{say}");
    assert_eq!(say["output"], "OK - from the static build", "{say}");
    let load = eventually(T, "a built-in check's result", || async {
        gw.latest(&fp, "load").await
    })
    .await;
    assert_eq!(load["status"], "ok", "{load}");
    assert!(
        load["metrics"].as_array().is_some_and(|m| !m.is_empty()),
        "the load probe reports metrics: {load}"
    );
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x86_64_musl_build_is_static_and_delivers() {
    let binary = dist_artifact("outpost-agent-x86_64-unknown-linux-musl");
    // No interpreter and no shared libraries: it runs on any distribution.
    let out = Command::new("readelf")
        .args(["--program-headers", "--dynamic"])
        .arg(&binary)
        .output()
        .expect("readelf (binutils)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("INTERP"),
        "has a program interpreter:\n{text}"
    );
    assert!(
        !text.contains("(NEEDED)"),
        "needs shared libraries:\n{text}"
    );
    enrolls_and_delivers("outpost-agent-x86_64-unknown-linux-musl", None, "x86_64").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aarch64_build_runs_under_qemu_and_delivers() {
    enrolls_and_delivers(
        "outpost-agent-aarch64-unknown-linux-musl",
        Some("qemu-aarch64"),
        "aarch64",
    )
    .await;
}
