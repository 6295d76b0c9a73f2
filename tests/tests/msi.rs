//! The Windows installer: `installer/windows/build-msi` builds the MSI from the dist
//! directory's Windows agent with the real wixl; its tables are read back with
//! `msiinfo export` and its payload with `msiextract`. Then, under Wine, `msiexec /i`
//! installs it into a throwaway prefix: the files land, the registry holds the
//! properties, the service `Outpost` runs and enrolls with a real gateway, `sc stop` makes
//! it say `bye`, and `msiexec /x` removes it all.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use outpost_e2e::wine::{dist_file, run_with_deadline, win_path, Wine};
use outpost_e2e::{eventually, tempdir, Gateway};

const T: Duration = Duration::from_secs(60);
const EXE: &str = "outpost-agent-x86_64-pc-windows-gnu.exe";

fn build_msi_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../installer/windows/build-msi")
}

/// The version the dist directory was built at (its VERSION file).
fn dist_version() -> String {
    std::fs::read_to_string(dist_file("VERSION"))
        .unwrap()
        .trim()
        .to_string()
}

fn build_msi(exe: &Path, version: &str, out: &Path) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(build_msi_script());
    cmd.arg(exe).arg(version).arg(out);
    run_with_deadline(cmd, "build-msi", Duration::from_secs(300))
}

/// One table of the MSI as rows of column → value (`msiinfo export`: names, types,
/// table key, then the rows, tab-separated).
fn table(msi: &Path, name: &str) -> Vec<BTreeMap<String, String>> {
    let out = Command::new("msiinfo")
        .arg("export")
        .arg(msi)
        .arg(name)
        .output()
        .expect("msiinfo (msitools)");
    assert!(
        out.status.success(),
        "msiinfo export {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines();
    let columns: Vec<String> = lines
        .next()
        .unwrap_or_default()
        .split('\t')
        .map(String::from)
        .collect();
    lines
        .skip(2)
        .filter(|l| !l.is_empty())
        .map(|l| {
            columns
                .iter()
                .cloned()
                .zip(
                    l.split('\t')
                        .map(String::from)
                        .chain(std::iter::repeat(String::new())),
                )
                .collect()
        })
        .collect()
}

fn row<'a>(
    rows: &'a [BTreeMap<String, String>],
    col: &str,
    value: &str,
) -> &'a BTreeMap<String, String> {
    rows.iter()
        .find(|r| r.get(col).map(String::as_str) == Some(value))
        .unwrap_or_else(|| panic!("no row with {col} = {value:?} in {rows:#?}"))
}

#[test]
fn the_msi_declares_the_service_the_files_and_the_settings() {
    let exe = dist_file(EXE);
    let version = dist_version();
    let dir = tempdir();
    let out = dir.path().join("out");
    let (code, stdout, stderr) = build_msi(&exe, &version, &out);
    assert_eq!(code, Some(0), "build-msi failed:\n{stderr}");
    let msi = out.join("outpost-agent-x86_64.msi");
    assert_eq!(stdout.trim(), msi.display().to_string());
    assert!(msi.is_file());

    let services = table(&msi, "ServiceInstall");
    assert_eq!(services.len(), 1, "{services:#?}");
    let s = &services[0];
    assert_eq!(s["Name"], "Outpost");
    assert_eq!(s["ServiceType"], "16", "SERVICE_WIN32_OWN_PROCESS");
    assert_eq!(s["StartType"], "2", "SERVICE_AUTO_START");
    assert_eq!(s["ErrorControl"], "1");
    assert_eq!(s["StartName"], "LocalSystem");
    assert_eq!(
        s["Arguments"],
        r#"service --config "[CommonAppDataFolder]Outpost\agent.toml""#
    );
    assert_eq!(s["Component_"], "AgentExe");

    let control = table(&msi, "ServiceControl");
    let c = row(&control, "Name", "Outpost");
    // msidbServiceControlEvent: Start on install (1), Stop on install (2) and uninstall
    // (32), Delete on uninstall (128).
    assert_eq!(c["Event"], (1 + 2 + 32 + 128).to_string());
    assert_eq!(c["Wait"], "1");
    assert_eq!(c["Component_"], "AgentExe");

    let files = table(&msi, "File");
    assert_eq!(files.len(), 1, "{files:#?}");
    let f = row(&files, "FileName", "outpost-agent.exe");
    assert_eq!(f["Component_"], "AgentExe");
    assert_eq!(
        f["FileSize"],
        std::fs::metadata(&exe).unwrap().len().to_string()
    );

    let dirs = table(&msi, "Directory");
    let install = row(&dirs, "Directory", "INSTALLDIR");
    assert_eq!(install["Directory_Parent"], "ProgramFiles64Folder");
    assert_eq!(install["DefaultDir"], "Outpost");
    let data = row(&dirs, "Directory", "DATADIR");
    assert_eq!(data["Directory_Parent"], "CommonAppDataFolder");
    assert_eq!(data["DefaultDir"], "Outpost");
    row(&table(&msi, "CreateFolder"), "Directory_", "DATADIR");

    let components = table(&msi, "Component");
    for c in &components {
        let attrs: u32 = c["Attributes"].parse().unwrap();
        assert_ne!(
            attrs & 256,
            0,
            "component {} is not 64-bit: {c:?}",
            c["Component"]
        );
    }
    assert_eq!(
        row(&components, "Component", "AgentExe")["Directory_"],
        "INSTALLDIR"
    );

    let props = table(&msi, "Property");
    assert_eq!(row(&props, "Property", "ProductVersion")["Value"], version);
    assert_eq!(
        row(&props, "Property", "MsiHiddenProperties")["Value"],
        "ENROLL_KEY"
    );
    assert_eq!(row(&props, "Property", "ALLUSERS")["Value"], "1");
    let conditions = table(&msi, "LaunchCondition");
    let need_url = row(&conditions, "Condition", "Installed OR GATEWAY_URL");
    assert!(
        need_url["Description"].contains("GATEWAY_URL=wss://"),
        "{need_url:?}"
    );

    let registry = table(&msi, "Registry");
    let settings: BTreeMap<&str, &str> = registry
        .iter()
        .map(|r| {
            assert_eq!(r["Root"], "2", "HKLM: {r:?}");
            assert_eq!(r["Key"], r"SOFTWARE\Outpost", "{r:?}");
            (r["Name"].as_str(), r["Value"].as_str())
        })
        .collect();
    assert_eq!(
        settings,
        BTreeMap::from([
            ("CaFile", "[CA_FILE]"),
            ("DataDir", "[DATADIR]"),
            ("EnrollKey", "[ENROLL_KEY]"),
            ("GatewayUrl", "[GATEWAY_URL]"),
            ("PinSha256", "[PIN_SHA256]"),
        ])
    );

    // The payload is the dist binary, byte for byte.
    let extracted = dir.path().join("extracted");
    std::fs::create_dir_all(&extracted).unwrap();
    let mut x = Command::new("msiextract");
    x.arg("-C").arg(&extracted).arg(&msi);
    let (code, _, err) = run_with_deadline(x, "msiextract", Duration::from_secs(120));
    assert_eq!(code, Some(0), "msiextract: {err}");
    let found = walk(&extracted)
        .into_iter()
        .find(|p| p.file_name().is_some_and(|n| n == "outpost-agent.exe"))
        .expect("outpost-agent.exe in the MSI");
    assert!(
        std::fs::read(&found).unwrap() == std::fs::read(&exe).unwrap(),
        "the MSI's outpost-agent.exe differs from {}",
        exe.display()
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn build_msi_refuses_bad_input_with_a_clear_error() {
    let dir = tempdir();
    let out = dir.path().join("out");
    let (code, _, err) = build_msi(&dir.path().join("missing.exe"), "1.2.3", &out);
    assert_eq!(code, Some(66), "{err}");
    assert!(
        err.contains("missing.exe not found") && err.contains("run ci/dist first"),
        "{err}"
    );

    let not_exe = dir.path().join("agent.exe");
    std::fs::write(&not_exe, b"#!/bin/sh\n").unwrap();
    let (code, _, err) = build_msi(&not_exe, "1.2.3", &out);
    assert_eq!(code, Some(65), "{err}");
    assert!(err.contains("not a Windows executable"), "{err}");

    let exe = dir.path().join("real.exe");
    std::fs::write(&exe, b"MZ\x90\x00rest").unwrap();
    let (code, _, err) = build_msi(&exe, "v1.2", &out);
    assert_eq!(code, Some(65), "{err}");
    assert!(err.contains("must be three numbers"), "{err}");

    let mut cmd = Command::new(build_msi_script());
    cmd.arg(&exe);
    let (code, _, err) = run_with_deadline(cmd, "build-msi", Duration::from_secs(30));
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("usage:"), "{err}");
    assert!(
        !out.join("outpost-agent-x86_64.msi").exists(),
        "a refused build left an MSI behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn msiexec_installs_a_service_that_enrolls_stops_with_bye_and_uninstalls_under_wine() {
    let exe = dist_file(EXE);
    let dir = tempdir();
    let (code, _, err) = build_msi(&exe, &dist_version(), &dir.path().join("out"));
    assert_eq!(code, Some(0), "build-msi failed:\n{err}");
    let msi = win_path(&dir.path().join("out/outpost-agent-x86_64.msi"));
    let wine = Wine::new(dir.path());
    let gw = Gateway::start(dir.path(), &[]);
    let run = |args: &[&str], what: &str| {
        run_with_deadline(
            wine.command(args[0], &args[1..]),
            what,
            Duration::from_secs(180),
        )
    };

    // Without a gateway the launch condition refuses, and nothing is installed.
    let (code, _, _) = run(
        &["msiexec", "/i", &msi, "/qn"],
        "msiexec /i without GATEWAY_URL",
    );
    assert_ne!(code, Some(0), "installed without GATEWAY_URL");
    let program = wine
        .drive_c()
        .join("Program Files/Outpost/outpost-agent.exe");
    assert!(!program.exists());

    let url = format!("GATEWAY_URL={}", gw.url());
    let key = format!("ENROLL_KEY={}", gw.enroll_key);
    let pin = format!("PIN_SHA256={}", gw.pin);
    let (code, out, err) = run(
        &["msiexec", "/i", &msi, "/qn", &url, &key, &pin],
        "msiexec /i",
    );
    assert_eq!(code, Some(0), "msiexec /i failed:\n{out}\n{err}");
    assert!(
        std::fs::read(&program).unwrap() == std::fs::read(&exe).unwrap(),
        "C:\\Program Files\\Outpost\\outpost-agent.exe is not the dist binary"
    );
    let data = wine.drive_c().join("ProgramData/Outpost");
    assert!(data.is_dir(), "C:\\ProgramData\\Outpost was not created");
    let (_, reg, _) = run(&["reg", "query", r"HKLM\SOFTWARE\Outpost"], "reg query");
    assert!(reg.contains(&gw.url()) && reg.contains(&gw.pin), "{reg}");

    // The MSI started the service; it reads the registry, enrolls and reports.
    let (_, query, _) = run(&["sc", "query", "Outpost"], "sc query");
    assert!(query.contains("RUNNING"), "{query}");
    let listed = eventually(T, "the service's agent online", || async {
        let agents = gw.api("/agents").await;
        agents
            .as_array()?
            .iter()
            .find(|a| a["presence"] == "online")
            .cloned()
    })
    .await;
    let fp = listed["fingerprint"].as_str().unwrap().to_string();
    assert!(
        data.join("agent.finger").is_file(),
        "identity not under C:\\ProgramData\\Outpost"
    );
    assert!(
        data.join("agent.secret").is_file(),
        "no secret after enrollment"
    );
    assert!(
        data.join("agent.log").is_file(),
        "the service's log is missing"
    );

    // Stop: the control handler cancels the agent, which says bye.
    let (code, out, _) = run(&["sc", "stop", "Outpost"], "sc stop");
    assert_eq!(code, Some(0), "{out}");
    eventually(T, "deregistered after the service stopped", || async {
        gw.agent(&fp)
            .await
            .filter(|a| a["presence"] == "deregistered")
    })
    .await;
    let log = std::fs::read_to_string(data.join("agent.log")).unwrap();
    assert!(log.contains("service stopped"), "{log}");

    let (code, out, err) = run(&["msiexec", "/x", &msi, "/qn"], "msiexec /x");
    assert_eq!(code, Some(0), "msiexec /x failed:\n{out}\n{err}");
    assert!(!program.exists(), "the program survived the uninstall");
    let (_, query, _) = run(&["sc", "query", "Outpost"], "sc query after uninstall");
    assert!(!query.contains("RUNNING"), "{query}");
    let (_, reg, _) = run(
        &["reg", "query", r"HKLM\SOFTWARE\Outpost"],
        "reg query after uninstall",
    );
    assert!(!reg.contains("GatewayUrl"), "{reg}");
    drop(wine);
}
