//! Self-update end to end: a real gateway over TLS publishes a release signed with a key
//! made by `outpost-gateway release keygen`, its rollout policy offers it, and a real agent
//! binary (a copy in the test's directory, so the build's own binary is never replaced)
//! updates from version A to B, or refuses a forged release with its binary untouched, or
//! rolls back a binary that crashes.
//!
//! Version B is the agent built with `OUTPOST_VERSION=99.0.0`, found at `$OUTPOST_AGENT_B`
//! or beside the other binaries as `outpost-agent-b` (ci/test builds it; see
//! docs/UPDATES.md).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use outpost_e2e::*;
use outpost_protocol::update::{
    parse_signing_key, release_file_name, sign_manifest, Manifest, Release,
};

const T: Duration = Duration::from_secs(60);
const B: &str = "99.0.0";
const CHECKS: &str = "[[check]]\nname = \"tick\"\ncommand = \"/bin/echo tick\"\ninterval = 1\n";

fn bin_dir() -> PathBuf {
    bin("outpost-agent").parent().unwrap().to_path_buf()
}

/// The version-B agent binary.
fn agent_b() -> PathBuf {
    let path = std::env::var_os("OUTPOST_AGENT_B")
        .map(PathBuf::from)
        .unwrap_or_else(|| bin_dir().join("outpost-agent-b"));
    assert!(
        path.exists(),
        "{} is missing: build version B first (ci/test does): OUTPOST_VERSION={B} cargo build -p outpost-agent && cp target/debug/outpost-agent target/debug/outpost-agent-b && cargo build -p outpost-agent",
        path.display()
    );
    path
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

fn target() -> &'static str {
    outpost_agent::AGENT_TARGET
}

/// A gateway, a release key pair, and an agent binary A copied into the test directory.
struct Setup {
    dir: tempfile::TempDir,
    gw: Gateway,
    releases: PathBuf,
    key: PathBuf,
    public: PathBuf,
    exe: PathBuf,
    a_bytes: Vec<u8>,
    a_version: String,
}

impl Setup {
    fn new(gateway_args: &[&str]) -> Setup {
        let dir = tempdir();
        let gw = Gateway::start(dir.path(), gateway_args);
        gw.write_checks("tick.toml", CHECKS);
        let releases = gw.data_dir.join("releases");
        std::fs::create_dir_all(&releases).unwrap();
        let out = Command::new(bin("outpost-gateway"))
            .args(["release", "keygen", "--out"])
            .arg(dir.path().join("release"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let exe_dir = dir.path().join("opt");
        std::fs::create_dir_all(&exe_dir).unwrap();
        let exe = exe_dir.join("outpost-agent");
        std::fs::copy(bin("outpost-agent"), &exe).unwrap();
        let a_bytes = std::fs::read(&exe).unwrap();
        let a_version =
            String::from_utf8(Command::new(&exe).arg("--version").output().unwrap().stdout)
                .unwrap()
                .trim()
                .trim_start_matches("outpost-agent ")
                .to_string();
        Setup {
            key: dir.path().join("release.key"),
            public: dir.path().join("release.pub"),
            dir,
            gw,
            releases,
            exe,
            a_bytes,
            a_version,
        }
    }

    /// Start the agent from the copied binary, trusting the test's release key (a file
    /// root owns: the tests run as root).
    fn agent(&self) -> Agent {
        let script = format!("shift; exec {:?} \"$@\"", self.exe.display().to_string());
        let key = format!("OUTPOST_UPDATE_KEY={}", self.public.display());
        let toml = format!(
            "gateway_url = {:?}\nenroll_key = {:?}\npin_sha256 = {:?}\nhostname = \"updater\"\nreconnect_max_secs = 1\n",
            self.gw.url(),
            self.gw.enroll_key,
            self.gw.pin
        );
        Agent::start_wrapped(
            self.dir.path(),
            "agent",
            &toml,
            &["env", &key, "/bin/sh", "-c", &script, "sh"],
        )
    }

    fn rollout(&self, version: &str) {
        std::fs::write(
            self.releases.join("rollout.toml"),
            format!("version = {version:?}\npercent = 100\n"),
        )
        .unwrap();
    }

    /// Put `bytes` in `releases/<version>/` as this agent's target's file.
    fn place(&self, version: &str, bytes: &[u8]) -> PathBuf {
        let d = self.releases.join(version);
        std::fs::create_dir_all(&d).unwrap();
        let path = d.join(release_file_name(target()));
        std::fs::write(&path, bytes).unwrap();
        path
    }

    /// Write `manifest.json` listing `releases`, signed with `key` (None: unsigned).
    fn manifest(&self, releases: Vec<Release>, key: Option<&Path>) {
        let bytes = Manifest { releases }.to_bytes();
        std::fs::write(self.releases.join("manifest.json"), &bytes).unwrap();
        if let Some(key) = key {
            let k = parse_signing_key(&std::fs::read_to_string(key).unwrap()).unwrap();
            std::fs::write(
                self.releases.join("manifest.json.sig"),
                sign_manifest(&bytes, &k),
            )
            .unwrap();
        }
    }

    fn entry(&self, version: &str, file: &Path) -> Release {
        Release {
            version: version.into(),
            target: target().into(),
            file: release_file_name(target()),
            size: std::fs::metadata(file).unwrap().len(),
            sha256: sha256(file),
        }
    }

    /// The agent reported `outpost.update` with `status` and output containing `needle`.
    async fn reported(&self, fp: &str, status: &str, needle: &str) -> String {
        let what = format!("an outpost.update {status} result saying {needle:?}");
        eventually(T, &what, || async {
            self.gw
                .bus_results(fp, "outpost.update")
                .iter()
                .find(|r| {
                    r["status"] == status && r["output"].as_str().unwrap_or("").contains(needle)
                })
                .map(|r| r["output"].as_str().unwrap().to_string())
        })
        .await
    }

    /// The running binary is still A, byte for byte, nothing was left beside it, and the
    /// agent still runs A and delivers results.
    async fn untouched(&self, agent: &mut Agent) {
        assert!(
            std::fs::read(&self.exe).unwrap() == self.a_bytes,
            "the agent's binary changed"
        );
        let left: Vec<String> = std::fs::read_dir(self.exe.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            left,
            vec!["outpost-agent".to_string()],
            "files written beside the binary"
        );
        assert!(agent.proc.is_running(), "the agent stopped");
        let fp = agent.fingerprint.clone();
        self.ticks_after(&fp, now_ms(), 2, "results still arriving")
            .await;
        let a = self.gw.agent(&fp).await.unwrap();
        assert_eq!(a["agent_version"], self.a_version.as_str());
    }

    /// Wait for `n` results of the check `tick` that started after `since_ms` on the bus.
    async fn ticks_after(&self, fp: &str, since_ms: u64, n: usize, what: &str) {
        eventually(T, what, || async {
            let got = self
                .gw
                .bus_results(fp, "tick")
                .iter()
                .filter(|r| r["started_at_ms"].as_u64().unwrap() > since_ms)
                .count();
            (got >= n).then_some(())
        })
        .await;
    }
}

fn seqs(all: &[Value]) -> Vec<(u64, String)> {
    let mut v: Vec<(u64, String)> = all
        .iter()
        .map(|r| {
            (
                r["seq"].as_u64().unwrap(),
                r["check"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_from_a_to_b_end_to_end() {
    let b = agent_b();
    // Short sessions, so that the agent hears the new rollout policy within seconds.
    let s = Setup::new(&["--max-session", "4"]);
    let b_version =
        String::from_utf8(Command::new(&b).arg("--version").output().unwrap().stdout).unwrap();
    assert_eq!(
        b_version.trim(),
        format!("outpost-agent {B}"),
        "{} is not version {B}",
        b.display()
    );
    assert!(
        outpost_protocol::update::Version::parse(B).unwrap()
            > outpost_protocol::update::Version::parse(&s.a_version).unwrap(),
        "version B must be above A ({})",
        s.a_version
    );
    let mut agent = s.agent();
    let fp = agent.fingerprint.clone();
    let pid = agent.proc.pid();
    eventually(T, "results from A", || async {
        (s.gw.bus_results(&fp, "tick").len() >= 3).then_some(())
    })
    .await;

    // Publish B with the real tool, from a dist directory like ci/dist makes.
    let dist = s.dir.path().join("dist");
    std::fs::create_dir_all(&dist).unwrap();
    std::fs::copy(&b, dist.join(release_file_name(target()))).unwrap();
    std::fs::write(dist.join("VERSION"), format!("{B}\n")).unwrap();
    let sums = Command::new("sha256sum")
        .arg(release_file_name(target()))
        .current_dir(&dist)
        .output()
        .unwrap();
    std::fs::write(dist.join("SHA256SUMS"), sums.stdout).unwrap();
    let out = Command::new(bin("outpost-gateway"))
        .args(["release", "publish", "--key"])
        .arg(&s.key)
        .arg("--releases-dir")
        .arg(&s.releases)
        .arg(&dist)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    s.rollout(B);

    let got = s
        .reported(&fp, "ok", &format!("updated from {} to {B}", s.a_version))
        .await;
    eprintln!("{got}");
    eventually(T, "the gateway sees version B", || async {
        s.gw.agent(&fp)
            .await
            .filter(|a| a["agent_version"] == B && a["presence"] == "online")
    })
    .await;
    s.ticks_after(&fp, now_ms(), 3, "results from B").await;
    // Same process (exec), now running B from the same path; A kept beside it.
    assert!(agent.proc.is_running());
    assert_eq!(agent.proc.pid(), pid);
    assert_eq!(std::fs::read(&s.exe).unwrap(), std::fs::read(&b).unwrap());
    let previous = s.exe.with_file_name("outpost-agent.previous");
    assert!(
        std::fs::read(&previous).unwrap() == s.a_bytes,
        "A is not kept as .previous"
    );
    let highest = std::fs::read_to_string(agent.state_dir.join("update/highest")).unwrap();
    assert_eq!(highest.trim(), B);

    // Nothing lost or repeated across the two restarts (trial, then exec): numbers are
    // unique, and each jump in them (a new process starts a new block of numbers) is
    // where a new binary began, with the result it queues first.
    let all = seqs(&s.gw.bus_all(&fp));
    let mut unique: Vec<u64> = all.iter().map(|(n, _)| *n).collect();
    unique.dedup();
    assert_eq!(unique.len(), all.len(), "a result arrived twice");
    let jumps: Vec<&(u64, String)> = all
        .windows(2)
        .filter(|w| w[1].0 != w[0].0 + 1)
        .map(|w| &w[1])
        .collect();
    assert!(jumps.len() <= 2, "{jumps:?}");
    for (n, check) in &jumps {
        assert_eq!(
            check, "outpost.update",
            "numbers missing before result {n} ({check}): lost results"
        );
    }
    // Stopping to swap is neither a deregistration nor a loss: each process said it was
    // restarting and would be back, and it was, so the bus has only online events.
    let mine: Vec<Value> =
        s.gw.bus_log("presence")
            .into_iter()
            .filter(|e| e["fingerprint"] == fp.as_str())
            .collect();
    assert!(!mine.is_empty());
    assert!(mine.iter().all(|e| e["presence"] == "online"), "{mine:#?}");
    let trial = s.gw.bus_results(&fp, "outpost.update");
    assert!(
        trial
            .iter()
            .any(|r| r["output"].as_str().unwrap().contains("on trial")),
        "{trial:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_binary_that_crashes_on_start_is_rolled_back() {
    let s = Setup::new(&[]);
    // A real executable for this machine that exits 1 at once, correctly signed.
    let file = s.place(B, &std::fs::read("/bin/false").unwrap());
    s.manifest(vec![s.entry(B, &file)], Some(&s.key));
    s.rollout(B);
    let mut agent = s.agent();
    let fp = agent.fingerprint.clone();
    let got = s
        .reported(
            &fp,
            "warning",
            &format!("rolled back from {B} to {}", s.a_version),
        )
        .await;
    assert!(got.contains("exited"), "{got}");
    // The old binary, back in place, carries on; the bad version is not tried again.
    assert!(
        std::fs::read(&s.exe).unwrap() == s.a_bytes,
        "A is not back in place"
    );
    s.reported(&fp, "warning", "was rolled back on this host before")
        .await;
    s.ticks_after(&fp, now_ms(), 2, "results after the rollback")
        .await;
    assert!(agent.proc.is_running());
    assert_eq!(
        s.gw.agent(&fp).await.unwrap()["agent_version"],
        s.a_version.as_str()
    );
    let bad = std::fs::read_to_string(agent.state_dir.join("update/bad")).unwrap();
    assert!(bad.starts_with(B), "{bad}");
}

/// Start an agent against a release set up by `prepare`, expect a refusal containing
/// `needle`, and check nothing was touched.
async fn refused(prepare: impl FnOnce(&Setup), needle: &str) {
    let s = Setup::new(&[]);
    prepare(&s);
    let mut agent = s.agent();
    let fp = agent.fingerprint.clone();
    let got = s.reported(&fp, "warning", needle).await;
    assert!(got.starts_with("update to "), "{got}");
    eprintln!("{got}");
    s.untouched(&mut agent).await;
}

fn agent_bytes() -> Vec<u8> {
    std::fs::read(bin("outpost-agent")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsigned_manifest_is_refused() {
    refused(
        |s| {
            let f = s.place(B, &agent_bytes());
            s.manifest(vec![s.entry(B, &f)], None);
            s.rollout(B);
        },
        "unsigned releases are refused",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_signed_with_another_key_is_refused() {
    refused(
        |s| {
            let other = s.dir.path().join("other");
            let out = Command::new(bin("outpost-gateway"))
                .args(["release", "keygen", "--out"])
                .arg(&other)
                .output()
                .unwrap();
            assert!(out.status.success());
            let f = s.place(B, &agent_bytes());
            s.manifest(vec![s.entry(B, &f)], Some(&other.with_extension("key")));
            s.rollout(B);
        },
        "does not verify with the release key",
    )
    .await;
}

/// B's manifest entry is signed for the real binary, then `tamper` changes the file served.
async fn refused_when_tampered(tamper: impl FnOnce(&mut Vec<u8>), needle: &str) {
    refused(
        |s| {
            let mut bytes = agent_bytes();
            let f = s.place(B, &bytes);
            let entry = s.entry(B, &f);
            tamper(&mut bytes);
            std::fs::write(&f, &bytes).unwrap();
            s.manifest(vec![entry], Some(&s.key));
            s.rollout(B);
        },
        needle,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_binary_is_refused() {
    refused_when_tampered(
        |bytes| bytes.truncate(bytes.len() - 4096),
        "the download is truncated",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_with_bytes_appended_is_refused() {
    refused_when_tampered(
        |bytes| bytes.extend_from_slice(b"#!/bin/sh\nrm -rf /\n"),
        "the download exceeds",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_changed_after_signing_is_refused() {
    // Same size, one byte different: only the hash can tell.
    refused_when_tampered(
        |bytes| {
            let i = bytes.len() / 2;
            bytes[i] ^= 0xff;
        },
        "the signed manifest says",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_for_another_target_is_refused() {
    // Only an aarch64 build of B is listed.
    refused(
        |s| {
            let d = s.releases.join(B);
            std::fs::create_dir_all(&d).unwrap();
            let f = d.join(release_file_name("aarch64-unknown-linux-musl"));
            std::fs::write(&f, agent_bytes()).unwrap();
            let entry = Release {
                target: "aarch64-unknown-linux-musl".into(),
                file: release_file_name("aarch64-unknown-linux-musl"),
                ..s.entry(B, &f)
            };
            s.manifest(vec![entry], Some(&s.key));
            s.rollout(B);
        },
        "has no build of 99.0.0 for this agent's target",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mislabelled_binary_for_another_machine_is_refused() {
    // Listed (and signed) for this target, but an executable for another machine.
    refused(
        |s| {
            let mut bytes = agent_bytes();
            let other: u16 = if cfg!(target_arch = "aarch64") {
                62
            } else {
                183
            };
            bytes[18..20].copy_from_slice(&other.to_le_bytes());
            let f = s.place(B, &bytes);
            s.manifest(vec![s.entry(B, &f)], Some(&s.key));
            s.rollout(B);
        },
        "wrong target",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_version_is_refused() {
    refused(
        |s| {
            let f = s.place("0.0.9", &agent_bytes());
            s.manifest(vec![s.entry("0.0.9", &f)], Some(&s.key));
            s.rollout("0.0.9");
        },
        "downgrades are refused",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_download_is_cut_at_the_signed_size() {
    refused(
        |s| {
            // The manifest signs B; the gateway serves a file a terabyte long (sparse).
            let bytes = agent_bytes();
            let f = s.place(B, &bytes);
            let entry = s.entry(B, &f);
            let file = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
            file.set_len(1 << 40).unwrap();
            s.manifest(vec![entry], Some(&s.key));
            s.rollout(B);
        },
        "the download exceeds",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_override_not_owned_by_root_is_refused() {
    refused(
        |s| {
            let f = s.place(B, &agent_bytes());
            s.manifest(vec![s.entry(B, &f)], Some(&s.key));
            s.rollout(B);
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&s.public, std::fs::Permissions::from_mode(0o666)).unwrap();
        },
        "must be owned by root and not group- or world-writable",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_serves_the_manifest_and_nothing_outside_the_releases_directory() {
    let s = Setup::new(&[]);
    let f = s.place(B, b"agent");
    s.manifest(vec![s.entry(B, &f)], Some(&s.key));
    let (status, body) = s.gw.http("GET", "/releases/manifest.json", None).await;
    assert_eq!(status, 200);
    assert_eq!(body["releases"][0]["size"], 5);
    let (status, _) = s.gw.http("GET", "/releases/manifest.json.sig", None).await;
    assert_eq!(status, 200);
    let file = release_file_name(target());
    let (status, body) =
        s.gw.http("GET", &format!("/releases/{B}/{file}"), None)
            .await;
    assert_eq!((status, body), (200, Value::String("agent".into())));
    // A symlink inside the directory that leads out of it, and names that try to.
    std::os::unix::fs::symlink("/etc/passwd", s.releases.join(B).join("passwd")).unwrap();
    for path in [
        format!("/releases/{B}/passwd"),
        format!("/releases/{B}/..%2F..%2Fapi.token"),
        "/releases/..%2F..%2F/api.token".to_string(),
        format!("/releases/{B}/.hidden"),
    ] {
        let (status, body) = s.gw.http("GET", &path, None).await;
        assert_eq!(status, 404, "{path}: {body}");
    }
}
