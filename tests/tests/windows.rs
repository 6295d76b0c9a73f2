//! The Windows agent, cross-compiled (`outpost-agent-x86_64-pc-windows-gnu.exe` from the
//! dist directory), run under Wine in a throwaway prefix against the real Linux gateway
//! over real TLS: it enrolls, runs a batch-file plugin (started through cmd.exe), a
//! plugin through the extension-to-interpreter map (`.chk` mapped in the configuration to
//! a runner), a plugin that hangs (killed at its timeout with the child it started: the
//! Job Object), a collector (CRITICAL: not supported on Windows), and the built-in disk
//! check on `C:\` (GetDiskFreeSpaceExW), delivers their results, and on
//! Ctrl-C (Wine turns SIGINT into a console CTRL_C_EVENT) says `bye` and exits 0.
//!
//! What this does not prove: the Windows service (Wine has no real Service Control
//! Manager session here; see msi.rs for Wine's), Job Objects on a real kernel, the
//! default map's PowerShell, Python and cscript entries.

use std::time::Duration;

use outpost_e2e::wine::{dist_file, run_with_deadline, win_path, Wine};
use outpost_e2e::{bin, eventually, tempdir, Gateway};

const T: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_windows_agent_enrolls_runs_plugins_and_says_bye_under_wine() {
    let exe = dist_file("outpost-agent-x86_64-pc-windows-gnu.exe");
    let dir = tempdir();
    let wine = Wine::new(dir.path());
    let gw = Gateway::start(dir.path(), &[]);

    // `service` from a console is refused with the reason (no Service Control Manager
    // started it), not a hang.
    let (code, _, err) = run_with_deadline(
        wine.command(&exe, &["service", "--config", r"C:\nowhere.toml"]),
        "outpost-agent service from a console",
        Duration::from_secs(60),
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("cannot connect to the Service Control Manager") && err.contains("1063"),
        "{err}"
    );

    let plugins = dir.path().join("win-plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let bat = plugins.join("check_hello.bat");
    std::fs::write(
        &bat,
        "@echo off\r\necho HELLO from %~nx0 with %1^|greeting=1\r\nexit /b 1\r\n",
    )
    .unwrap();
    // `.chk` is mapped in the agent's configuration to a runner that gets the plugin's
    // path after its own arguments: the interpreter map at work. (The default `.vbs` →
    // cscript entry cannot be shown here: Wine's cscript prints nothing without a
    // console, and its WScript.StdOut is a stub.)
    let runner = plugins.join("runner.bat");
    std::fs::write(
        &runner,
        "@echo off\r\necho MAPPED %1 ran %~nx2\r\nexit /b 0\r\n",
    )
    .unwrap();
    // Times out: its Job Object is terminated, and with it the child it started, which
    // would otherwise write the marker some seconds later.
    let marker = dir.path().join("escaped-child-ran.txt");
    let hang = plugins.join("check_hang.bat");
    std::fs::write(
        &hang,
        format!(
            "@echo off\r\nstart /b cmd /c \"ping -n 5 127.0.0.1 >nul & echo late> {}\"\r\nping -n 60 127.0.0.1 >nul\r\n",
            win_path(&marker)
        ),
    )
    .unwrap();
    let mapped = plugins.join("check_mapped.chk");
    std::fs::write(&mapped, "not run directly\r\n").unwrap();
    gw.write_checks(
        "windows.toml",
        &format!(
            r#"
[[check]]
name = "bat"
command = [{bat:?}, "arg1"]
interval = 1

[[check]]
name = "mapped"
command = [{mapped:?}]
interval = 1

[[check]]
name = "hang"
command = [{hang:?}]
interval = 1
timeout = 2

[[collector]]
name = "shipper"
kind = "program"
command = ["C:\\windows\\system32\\cmd.exe"]

[[check]]
name = "c-drive"
disk = {{ path = 'C:\' }}
interval = 1
"#,
            bat = win_path(&bat),
            mapped = win_path(&mapped),
            hang = win_path(&hang),
        ),
    );

    let state = dir.path().join("agent");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("machine-id"), "machine-wine\n").unwrap();
    let config = state.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "gateway_url = {:?}\nenroll_key = {:?}\npin_sha256 = {:?}\nhostname = \"wine-agent\"\nstate_dir = {:?}\nmachine_id_file = {:?}\n\n[interpreters]\nchk = [{:?}, \"--from-map\"]\n",
            gw.url(),
            gw.enroll_key,
            gw.pin,
            win_path(&state),
            win_path(&state.join("machine-id")),
            win_path(&runner),
        ),
    )
    .unwrap();
    let (mut agent, line) = wine.spawn(
        &exe,
        &["run", "--config", &win_path(&config)],
        &dir.path().join("agent.log"),
        "fingerprint ",
    );
    let fp = line.trim_start_matches("fingerprint ").trim().to_string();
    assert!(
        state.join("agent.finger").is_file(),
        "the fingerprint file is not where the Windows path put it"
    );

    let rec = eventually(T, "the Windows agent online", || async {
        gw.agent(&fp).await.filter(|a| a["presence"] == "online")
    })
    .await;
    assert_eq!(rec["hostname"], "wine-agent", "{rec}");
    assert!(
        state.join("agent.secret").is_file(),
        "enrollment left no secret"
    );

    let bat_result = eventually(T, "the batch plugin's result", || async {
        gw.latest(&fp, "bat").await
    })
    .await;
    assert_eq!(
        bat_result["status"],
        "warning",
        "{bat_result}\n{}",
        agent.log()
    );
    assert_eq!(
        bat_result["output"], "HELLO from check_hello.bat with arg1",
        "{bat_result}"
    );
    assert_eq!(bat_result["metrics"][0]["name"], "greeting", "{bat_result}");

    let mapped_result = eventually(T, "the mapped plugin's result", || async {
        gw.latest(&fp, "mapped").await
    })
    .await;
    assert_eq!(mapped_result["status"], "ok", "{mapped_result}");
    assert_eq!(
        mapped_result["output"], "MAPPED --from-map ran check_mapped.chk",
        "{mapped_result}"
    );

    let disk = eventually(T, "the disk check's result", || async {
        gw.latest(&fp, "c-drive").await
    })
    .await;
    assert!(
        disk["output"].as_str().unwrap_or_default().contains(r"C:\"),
        "{disk}"
    );
    let total = disk["metrics"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == "disk_total"))
        .and_then(|m| m["value"].as_f64())
        .unwrap_or(0.0);
    assert!(total > 0.0, "no disk size measured: {disk}");

    let hung = eventually(T, "the hanging plugin's timeout", || async {
        gw.latest(&fp, "hang").await
    })
    .await;
    assert_eq!(hung["status"], "unknown", "{hung}");
    assert_eq!(
        hung["output"], "check timed out after 2s and was killed",
        "{hung}"
    );

    // Collectors are Linux-only: a declared one is CRITICAL and says why.
    let collector = eventually(T, "the collector's health result", || async {
        gw.latest(&fp, "collector.shipper").await
    })
    .await;
    assert_eq!(collector["status"], "critical", "{collector}");
    assert!(
        collector["output"]
            .as_str()
            .unwrap_or_default()
            .contains("not supported on Windows"),
        "{collector}"
    );

    // Ctrl-C: Wine delivers SIGINT as CTRL_C_EVENT; the agent says bye and exits 0.
    agent.signal(libc::SIGINT);
    assert_eq!(
        agent.wait_exit(Duration::from_secs(30)).await,
        Some(0),
        "{}",
        agent.log()
    );
    eventually(T, "deregistered after bye", || async {
        gw.agent(&fp)
            .await
            .filter(|a| a["presence"] == "deregistered")
    })
    .await;
    // The hanging plugin's child would have written the marker 4 s after it started;
    // every run was killed after 2 s, job and all.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        !marker.exists(),
        "a child of a timed-out plugin survived its Job Object"
    );
    drop(wine);
}

#[test]
fn the_service_command_is_refused_off_windows_with_the_way_to_run_it() {
    let out = std::process::Command::new(bin("outpost-agent"))
        .args(["service", "--config", "/etc/outpost/agent.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`service` is for Windows")
            && err.contains("outpost-agent run --config /etc/outpost/agent.toml"),
        "{err}"
    );
}
