//! The Linux installer (installer/install.sh) as users run it: fetched from the real
//! gateway over TLS with `curl --cacert` and piped into `sh`, installing into a temporary
//! root (OUTPOST_ROOT) with fake init tools on PATH that record their calls; the gateway's
//! /install.sh and /releases routes; what the script trusts (pins, the signed release
//! manifest) against an attacker's server and tampered releases; who the agent runs as
//! (the `outpost` user, or root only when asked) and who owns what; and end to end in a
//! debootstrap'd Debian chroot with the static musl agent from the dist directory, where
//! the agent, its plugins and a self-update are shown to run as `outpost`.
//!
//! Releases here are signed with a test key (the real one is not in the repository), which
//! every run of the script is given with `OUTPOST_RELEASE_KEY`.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use outpost_e2e::*;
use outpost_protocol::update::{key_file_text, parse_signing_key};

const T: Duration = Duration::from_secs(30);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

fn script_source() -> PathBuf {
    workspace().join("installer/install.sh")
}

fn write_exec(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// The owner and group of `path` (not following a symbolic link).
fn owner(path: &Path) -> (u32, u32) {
    let m = std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (m.uid(), m.gid())
}

/// Every path under `root` (relative), with its kind, mode and owner: what a run left
/// behind.
fn tree(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            let meta = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let kind = if meta.is_dir() { "dir" } else { "file" };
            out.insert(
                rel,
                format!(
                    "{kind} {:o} {}:{}",
                    meta.permissions().mode() & 0o7777,
                    meta.uid(),
                    meta.gid()
                ),
            );
            if meta.is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// The uid and gid of the `outpost` account in the fake roots (any number will do: the
/// installer takes them from the root's own /etc/passwd).
const OUTPOST_ID: u32 = 991;

/// A host's root as the installer finds it: the standard directories and accounts, with
/// the `outpost` account already made (in a directory tree, the installer uses the
/// account the tree has and never adds one: see the test of errors), nothing else of ours.
fn empty_root(dir: &Path, name: &str) -> PathBuf {
    let root = dir.join(name);
    for d in ["etc/systemd/system", "etc/init.d", "opt", "var/log"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(
        root.join("etc/passwd"),
        format!(
            "root:x:0:0:root:/root:/bin/sh\n\
             outpost:x:{OUTPOST_ID}:{OUTPOST_ID}:Outpost monitoring agent:/opt/outpost/state:/usr/sbin/nologin\n"
        ),
    )
    .unwrap();
    std::fs::write(
        root.join("etc/group"),
        format!("root:x:0:\noutpost:x:{OUTPOST_ID}:\n"),
    )
    .unwrap();
    root
}

/// What the installer leaves on a host, with modes and owners, when the agent runs as
/// `uid:gid` (the outpost account's, or 0:0 with --run-as root): root owns what only
/// root may change (the configuration, checks.d, the log directory), the agent's user
/// owns what the agent writes (its binary's directory for self-updates, state, plugins)
/// and, under a sticky /etc/outpost it may add files to but not replace root's in, its
/// identity.
fn assert_layout(root: &Path, uid: u32, gid: u32, what: &str) {
    let agent = (uid, gid);
    let etc_mode = if uid == 0 { 0o755 } else { 0o1770 };
    let want: &[(&str, u32, (u32, u32))] = &[
        ("opt/outpost", 0o755, (0, 0)),
        ("opt/outpost/bin", 0o755, agent),
        ("opt/outpost/bin/outpost-agent", 0o755, agent),
        ("opt/outpost/state", 0o700, agent),
        ("opt/outpost/plugins", 0o755, agent),
        ("etc/outpost", etc_mode, (0, gid)),
        ("etc/outpost/agent.toml", 0o640, (0, gid)),
        ("etc/outpost/checks.d", 0o755, (0, 0)),
        ("etc/outpost/run-as", 0o644, (0, 0)),
        ("var/log/outpost", 0o755, (0, 0)),
        ("var/log/outpost/agent.log", 0o640, agent),
    ];
    for (path, m, o) in want {
        let p = root.join(path);
        assert_eq!(
            (mode(&p), owner(&p)),
            (*m, *o),
            "{what}: mode and owner of {path}"
        );
    }
    let user = if uid == 0 { "root" } else { "outpost" };
    assert_eq!(
        read(&root.join("etc/outpost/run-as")),
        format!("{user}\n"),
        "{what}"
    );
}

fn sha256sum(path: &Path) -> String {
    let out = Command::new("timeout")
        .args(["60", "sha256sum"])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

/// The seed of the key these tests sign releases with, and of an attacker's.
const TEST_SEED: [u8; 32] = [7; 32];
const ATTACKER_SEED: [u8; 32] = [66; 32];

/// (Re)write `releases`' manifest.json over every release present, signed with the key of
/// `seed`, as `outpost-gateway release publish` does.
fn sign(releases: &Path, seed: [u8; 32]) {
    let key = parse_signing_key(&key_file_text("test release key", &seed)).unwrap();
    outpost_gateway::releases_manifest::sign_releases(&key, releases).unwrap();
}

/// The public key file of `seed`'s key (what `release keygen` writes as PREFIX.pub).
fn public_key_text(seed: [u8; 32]) -> String {
    let key = parse_signing_key(&key_file_text("test release key", &seed)).unwrap();
    key_file_text("test release key", &key.verifying_key().to_bytes())
}

/// Publish `files` as release `version` in `releases` (with VERSION and SHA256SUMS), and
/// sign the manifest with the test key.
fn publish(releases: &Path, version: &str, files: &[(&str, &[u8])]) {
    let dir = releases.join(version);
    std::fs::create_dir_all(&dir).unwrap();
    let mut sums = String::new();
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
        sums += &format!("{}  {name}\n", sha256sum(&dir.join(name)));
    }
    std::fs::write(dir.join("SHA256SUMS"), sums).unwrap();
    std::fs::write(dir.join("VERSION"), format!("{version}\n")).unwrap();
    sign(releases, TEST_SEED);
}

const X86: &str = "outpost-agent-x86_64-unknown-linux-musl";
const ARM: &str = "outpost-agent-aarch64-unknown-linux-musl";

/// Stand-in agent binaries: the fake-root tests never run them, they tell them apart.
fn fake_agent(version: &str, arch: &str) -> Vec<u8> {
    format!("#!/bin/sh\necho 'outpost-agent {version} {arch}'\n").into_bytes()
}

fn publish_fake(releases: &Path, version: &str) {
    publish(
        releases,
        version,
        &[
            (X86, &fake_agent(version, "x86_64")),
            (ARM, &fake_agent(version, "aarch64")),
        ],
    );
}

struct Setup {
    dir: tempfile::TempDir,
    gw: Gateway,
    ca: PathBuf,
    releases: PathBuf,
    /// Fake systemctl, rc-service, rc-update, service, update-rc.d: they append their
    /// command line to `calls`.
    fakes: PathBuf,
    calls: PathBuf,
}

/// A gateway with a CA-issued certificate for `localhost` and release 1.0.0 published.
fn setup(extra: &[&str]) -> Setup {
    let dir = tempdir();
    let (ca, cert, key) = test_pki(&dir.path().join("pki"), "localhost");
    let releases = dir.path().join("releases");
    std::fs::create_dir_all(&releases).unwrap();
    publish_fake(&releases, "1.0.0");
    let (cert, key, rel) = (
        cert.display().to_string(),
        key.display().to_string(),
        releases.display().to_string(),
    );
    let mut args = vec![
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--releases-dir",
        &rel,
    ];
    args.extend_from_slice(extra);
    let gw = Gateway::start(dir.path(), &args);
    let fakes = dir.path().join("fakes");
    std::fs::create_dir_all(&fakes).unwrap();
    let calls = dir.path().join("calls.log");
    for tool in [
        "systemctl",
        "rc-service",
        "rc-update",
        "service",
        "update-rc.d",
    ] {
        write_exec(
            &fakes.join(tool),
            &format!("#!/bin/sh\necho \"{tool} $*\" >>\"$OUTPOST_TEST_CALLS\"\n"),
        );
    }
    Setup {
        dir,
        gw,
        ca,
        releases,
        fakes,
        calls,
    }
}

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ok={}\n--- stdout\n{}--- stderr\n{}",
            self.ok, self.stdout, self.stderr
        )
    }
}

impl Setup {
    fn base(&self) -> String {
        format!("https://localhost:{}", self.gw.port())
    }

    /// `curl --cacert CA https://localhost:PORT/install.sh`: the script as served.
    fn fetch_script(&self) -> Vec<u8> {
        let out = Command::new("timeout")
            .args(["30", "curl", "-fsS", "--cacert"])
            .arg(&self.ca)
            .arg(format!("{}/install.sh", self.base()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "curl install.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// `curl ... | sh -s -- ARGS` into `root`, the fake init tools first on PATH.
    fn install(&self, root: &Path, args: &[&str], env: &[(&str, &str)]) -> Run {
        let script = self.fetch_script();
        let path = format!(
            "{}:{}",
            self.fakes.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        run_sh(&script, args, root, &path, &self.calls, env)
    }

    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(&self.calls)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn clear_calls(&self) {
        let _ = std::fs::remove_file(&self.calls);
    }
}

fn run_sh(
    script: &[u8],
    args: &[&str],
    root: &Path,
    path: &str,
    calls: &Path,
    env: &[(&str, &str)],
) -> Run {
    let mut cmd = Command::new("timeout");
    cmd.args(["120", "/bin/sh", "-s", "--"])
        .args(args)
        .env("OUTPOST_ROOT", root)
        .env("PATH", path)
        .env("OUTPOST_TEST_CALLS", calls)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, _) in std::env::vars() {
        if k.starts_with("OUTPOST_") && k != "OUTPOST_E2E_KEEP" {
            cmd.env_remove(k);
        }
    }
    // The key the test releases are signed with, beside the root.
    let key = root.with_extension("release-key.pub");
    std::fs::write(&key, public_key_text(TEST_SEED)).unwrap();
    cmd.env("OUTPOST_ROOT", root)
        .env("OUTPOST_TEST_CALLS", calls)
        .env("OUTPOST_RELEASE_KEY", &key)
        .envs(env.iter().copied());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(script).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn the_script_and_the_init_scripts_pass_shellcheck() {
    for f in [
        "installer/install.sh",
        "installer/outpost-agent.sysv",
        "installer/outpost-agent.openrc",
    ] {
        let out = Command::new("shellcheck")
            .args(["-s", "sh"])
            .arg(workspace().join(f))
            .output()
            .expect("shellcheck (ci/setup installs it)");
        assert!(
            out.status.success(),
            "shellcheck {f}:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// `systemd-analyze ARGS UNIT` in a root holding `unit` (as the installed unit file), its
/// ExecStart and the system's own units (its dependencies); returns whether it succeeded
/// and everything it said.
fn systemd_analyze(unit: &str, args: &[&str]) -> (bool, String) {
    let dir = tempdir();
    let root = dir.path();
    std::fs::create_dir_all(root.join("opt/outpost/bin")).unwrap();
    write_exec(&root.join("opt/outpost/bin/outpost-agent"), "#!/bin/sh\n");
    std::fs::create_dir_all(root.join("etc/systemd/system")).unwrap();
    let path = root.join("etc/systemd/system/outpost-agent.service");
    std::fs::write(&path, unit).unwrap();
    std::fs::create_dir_all(root.join("usr/lib/systemd")).unwrap();
    let copied = Command::new("timeout")
        .args(["60", "cp"])
        .args(["-r", "/usr/lib/systemd/system"])
        .arg(root.join("usr/lib/systemd/"))
        .status()
        .unwrap();
    assert!(copied.success(), "cannot copy /usr/lib/systemd/system");
    let out = Command::new("timeout")
        .args(["60", "systemd-analyze"])
        .args(args)
        .arg(format!("--root={}", root.display()))
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian package systemd)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

/// systemd-analyze verify: unknown keys only warn, so any output fails too.
fn assert_systemd_accepts(unit: &str) {
    let (ok, said) = systemd_analyze(unit, &["verify", "--man=no"]);
    assert!(ok && said.trim().is_empty(), "{said}");
}

#[test]
fn systemd_accepts_the_unit() {
    let unit = read(&workspace().join("installer/outpost-agent.service"));
    assert_systemd_accepts(&unit);
    // The sandbox as systemd scores it: an exposure of at most 4.0 of 10 ("OK"; the unit
    // that ran the agent as root, with nothing of this, scored 9.6, "UNSAFE").
    let (ok, said) = systemd_analyze(&unit, &["security", "--offline=yes", "--threshold=40"]);
    assert!(ok, "exposure above 4.0:\n{said}");
    let exposure = said
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_default()
        .to_string();
    eprintln!("{exposure}");
    // The agent and its plugins: the outpost user, CAP_NET_RAW alone, nothing gained.
    for line in [
        "User=outpost",
        "Group=outpost",
        "AmbientCapabilities=CAP_NET_RAW",
        "CapabilityBoundingSet=CAP_NET_RAW",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/etc/outpost /opt/outpost",
        "ProtectHome=read-only",
        "PrivateTmp=yes",
    ] {
        assert!(unit.lines().any(|l| l == line), "no {line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installs_under_each_init_system_with_the_right_files_and_service_calls() {
    let s = setup(&[]);
    let ca = s.ca.display().to_string();
    let port = s.gw.port();
    for init in ["systemd", "openrc", "sysv", "none"] {
        s.clear_calls();
        let root = empty_root(s.dir.path(), &format!("root-{init}"));
        let before = tree(&root);
        let run = if init == "none" {
            // The same with environment variables only.
            let gateway = format!("https://localhost:{port}/");
            s.install(
                &root,
                &[],
                &[
                    ("OUTPOST_INIT", init),
                    ("OUTPOST_KEY", &s.gw.enroll_key),
                    ("OUTPOST_CA", &ca),
                    ("OUTPOST_GATEWAY", &gateway),
                ],
            )
        } else {
            s.install(
                &root,
                &["--key", &s.gw.enroll_key, "--ca", &ca],
                &[("OUTPOST_INIT", init)],
            )
        };
        assert!(run.ok, "{init}: {run}");

        let bin = root.join("opt/outpost/bin/outpost-agent");
        assert_eq!(std::fs::read(&bin).unwrap(), fake_agent("1.0.0", "x86_64"));
        // The agent runs as outpost; agent.toml, which holds the enrollment key, is
        // readable by root and the outpost group only.
        assert_layout(&root, OUTPOST_ID, OUTPOST_ID, init);
        let config = root.join("etc/outpost/agent.toml");
        assert_eq!(
            read(&config),
            format!(
                "# Outpost agent configuration, written by install.sh (docs/INSTALL.md).\n\
                 # Running install.sh again changes only the keys its options give new values.\n\
                 gateway_url = \"wss://localhost:{port}\"\n\
                 enroll_key = \"{}\"\n\
                 ca_file = \"/etc/outpost/ca.pem\"\n\
                 state_dir = \"/opt/outpost/state\"\n\
                 fingerprint_file = \"/etc/outpost/agent.finger\"\n\
                 secret_file = \"/etc/outpost/agent.secret\"\n\
                 checks_dir = \"/etc/outpost/checks.d\"\n\
                 plugins_dir = \"/opt/outpost/plugins\"\n",
                s.gw.enroll_key
            )
        );
        // The agent itself accepts what the installer wrote.
        let settings =
            outpost_agent::Settings::from_toml(&read(&config), &BTreeMap::new()).unwrap();
        assert_eq!(
            settings.trust,
            outpost_agent::settings::Trust::CaFile("/etc/outpost/ca.pem".into())
        );
        assert_eq!(read(&root.join("etc/outpost/ca.pem")), read(&s.ca));
        let ca_copy = root.join("etc/outpost/ca.pem");
        assert_eq!((mode(&ca_copy), owner(&ca_copy)), (0o644, (0, 0)));
        assert!(
            run.stdout.contains("runs as the outpost user"),
            "{init}: {run}"
        );

        let unit = root.join("etc/systemd/system/outpost-agent.service");
        let initd = root.join("etc/init.d/outpost-agent");
        let calls = s.calls();
        match init {
            "systemd" => {
                assert_eq!(
                    read(&unit),
                    read(&workspace().join("installer/outpost-agent.service"))
                );
                assert!(read(&unit).contains("\nUser=outpost\nGroup=outpost\n"));
                assert_eq!(mode(&unit), 0o644);
                assert!(!initd.exists());
                assert_eq!(
                    calls,
                    [
                        "systemctl daemon-reload",
                        "systemctl enable outpost-agent.service",
                        "systemctl restart outpost-agent.service"
                    ]
                );
            }
            "openrc" => {
                assert_eq!(
                    read(&initd),
                    read(&workspace().join("installer/outpost-agent.openrc"))
                );
                assert!(read(&initd).contains("\ncommand_user=\"outpost:outpost\"\n"));
                assert_eq!(mode(&initd), 0o755);
                assert!(!unit.exists());
                assert_eq!(
                    calls,
                    [
                        "rc-update add outpost-agent default",
                        "rc-service outpost-agent restart"
                    ]
                );
            }
            "sysv" => {
                assert_eq!(
                    read(&initd),
                    read(&workspace().join("installer/outpost-agent.sysv"))
                );
                assert!(read(&initd).contains("\nRUN_AS=outpost\n"));
                assert_eq!(mode(&initd), 0o755);
                assert_eq!(
                    calls,
                    [
                        "update-rc.d outpost-agent defaults",
                        "service outpost-agent restart"
                    ]
                );
            }
            _ => {
                assert!(!unit.exists() && !initd.exists());
                assert!(calls.is_empty(), "{calls:?}");
                // As the outpost user (this host has util-linux's setpriv, which runs the
                // agent in its own process).
                assert!(
                    run.stdout.contains(
                        "setpriv --reuid=outpost --regid=outpost --init-groups /opt/outpost/bin/outpost-agent run --config /etc/outpost/agent.toml"
                    ) && run.stdout.contains("Start the agent yourself"),
                    "{run}"
                );
            }
        }

        // --uninstall takes away everything this run made (the agent never ran).
        s.clear_calls();
        let run = s.install(&root, &["--uninstall"], &[("OUTPOST_INIT", init)]);
        assert!(run.ok, "{init} uninstall: {run}");
        assert_eq!(tree(&root), before, "{init}: left behind after --uninstall");
        let calls = s.calls();
        let expected: &[&str] = match init {
            "systemd" => &[
                "systemctl disable --now outpost-agent.service",
                "systemctl daemon-reload",
            ],
            "openrc" => &[
                "rc-service outpost-agent stop",
                "rc-update del outpost-agent default",
            ],
            "sysv" => &[
                "service outpost-agent stop",
                "update-rc.d -f outpost-agent remove",
            ],
            _ => &[],
        };
        assert_eq!(calls, expected, "{init}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_again_upgrades_in_place_and_keeps_identity_and_edits() {
    let s = setup(&[]);
    let root = empty_root(s.dir.path(), "root");
    let ca = s.ca.display().to_string();
    let sd = [("OUTPOST_INIT", "systemd")];
    let run = s.install(&root, &["--key", &s.gw.enroll_key, "--ca", &ca], &sd);
    assert!(run.ok, "{run}");

    // What the agent and the admin made since.
    let etc = root.join("etc/outpost");
    std::fs::write(etc.join("agent.finger"), "fingerprint-1").unwrap();
    std::fs::write(etc.join("agent.secret"), "secret-1").unwrap();
    std::fs::write(root.join("opt/outpost/state/outbox.redb"), "pending").unwrap();
    std::fs::write(etc.join("checks.d/app.toml"), "# an app's check").unwrap();
    let config = etc.join("agent.toml");
    let edited = format!("{}\n[labels]\nrole = \"web\"\n", read(&config));
    std::fs::write(&config, &edited).unwrap();
    let kept = |root: &Path| {
        assert_eq!(
            read(&root.join("etc/outpost/agent.finger")),
            "fingerprint-1"
        );
        assert_eq!(read(&root.join("etc/outpost/agent.secret")), "secret-1");
        assert_eq!(read(&root.join("opt/outpost/state/outbox.redb")), "pending");
        assert_eq!(
            read(&root.join("etc/outpost/checks.d/app.toml")),
            "# an app's check"
        );
    };

    // A new release; the same one-liner without options upgrades: the CA to trust comes
    // from agent.toml, the configuration is left alone.
    publish_fake(&s.releases, "1.10.0");
    publish_fake(&s.releases, "1.9.0");
    s.clear_calls();
    let run = s.install(&root, &[], &sd);
    assert!(run.ok, "{run}");
    assert!(
        run.stdout.contains("upgraded outpost-agent to 1.10.0"),
        "{run}"
    );
    let bin = root.join("opt/outpost/bin/outpost-agent");
    assert_eq!(std::fs::read(&bin).unwrap(), fake_agent("1.10.0", "x86_64"));
    assert_layout(&root, OUTPOST_ID, OUTPOST_ID, "upgrade");
    assert_eq!(read(&config), edited);
    kept(&root);
    // The identity is the agent's (the test wrote it as root).
    for f in ["agent.finger", "agent.secret"] {
        assert_eq!(owner(&etc.join(f)), (OUTPOST_ID, OUTPOST_ID), "{f}");
    }
    let units: Vec<_> = tree(&root)
        .into_keys()
        .filter(|p| p.contains("outpost-agent.service") || p.contains("init.d/outpost"))
        .collect();
    assert_eq!(units, ["etc/systemd/system/outpost-agent.service"]);
    assert!(s
        .calls()
        .contains(&"systemctl restart outpost-agent.service".to_string()));

    // The first install's options again: their values are already there, nothing changes.
    let run = s.install(&root, &["--key", &s.gw.enroll_key, "--ca", &ca], &sd);
    assert!(run.ok, "{run}");
    assert!(
        run.stdout.contains("kept /etc/outpost/agent.toml as it is"),
        "{run}"
    );
    assert_eq!(read(&config), edited);
    assert!(!etc.join("agent.toml.old").exists());

    // New values change their keys only; the edit stays; the old file is kept beside it.
    // The pin as `openssl x509 -fingerprint -sha256` shows it: upper case, with colons.
    let colons: Vec<String> =
        s.gw.pin
            .as_bytes()
            .chunks(2)
            .map(|c| String::from_utf8_lossy(c).to_uppercase())
            .collect();
    let run = s.install(
        &root,
        &[
            "--key",
            "new-key",
            "--version",
            "1.9.0",
            "--pin",
            &colons.join(":"),
        ],
        &sd,
    );
    assert!(run.ok, "{run}");
    assert_eq!(std::fs::read(&bin).unwrap(), fake_agent("1.9.0", "x86_64"));
    let now = read(&config);
    assert!(now.contains("enroll_key = \"new-key\"\n"), "{now}");
    assert!(
        now.contains(&format!("pin_sha256 = \"{}\"\n", s.gw.pin)),
        "{now}"
    );
    assert!(!now.contains("ca_file"), "{now}");
    assert!(!now.contains(&s.gw.enroll_key), "{now}");
    assert!(now.contains("[labels]\nrole = \"web\"\n"), "{now}");
    assert_eq!(now.matches("enroll_key").count(), 1, "{now}");
    assert_layout(&root, OUTPOST_ID, OUTPOST_ID, "new values");
    assert_eq!(read(&etc.join("agent.toml.old")), edited);
    let old = etc.join("agent.toml.old");
    assert_eq!((mode(&old), owner(&old)), (0o640, (0, OUTPOST_ID)));
    outpost_agent::Settings::from_toml(&now, &BTreeMap::new()).unwrap();
    kept(&root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uninstall_keeps_identity_and_state_and_purge_removes_them() {
    let s = setup(&[]);
    let root = empty_root(s.dir.path(), "root");
    let before = tree(&root);
    let ca = s.ca.display().to_string();
    let rc = [("OUTPOST_INIT", "openrc")];
    let run = s.install(&root, &["--key", &s.gw.enroll_key, "--ca", &ca], &rc);
    assert!(run.ok, "{run}");
    let etc = root.join("etc/outpost");
    std::fs::write(etc.join("agent.finger"), "f").unwrap();
    std::fs::write(etc.join("agent.secret"), "s").unwrap();
    std::fs::write(root.join("opt/outpost/state/outbox.redb"), "o").unwrap();
    std::fs::write(root.join("opt/outpost/plugins/check_x"), "p").unwrap();
    std::fs::write(root.join("var/log/outpost/agent.log"), "l").unwrap();

    let run = s.install(&root, &["--uninstall"], &rc);
    assert!(run.ok, "{run}");
    assert!(run.stdout.contains("--purge"), "{run}");
    let left: Vec<String> = tree(&root)
        .into_keys()
        .filter(|p| !before.contains_key(p))
        .collect();
    assert_eq!(
        left,
        [
            "etc/outpost",
            "etc/outpost/agent.finger",
            "etc/outpost/agent.secret",
            "opt/outpost",
            "opt/outpost/state",
            "opt/outpost/state/outbox.redb",
        ]
    );

    // Installing again comes back as the same agent.
    let run = s.install(&root, &["--key", &s.gw.enroll_key, "--ca", &ca], &rc);
    assert!(run.ok, "{run}");
    assert_eq!(read(&etc.join("agent.finger")), "f");

    let run = s.install(&root, &["--uninstall", "--purge"], &rc);
    assert!(run.ok, "{run}");
    assert_eq!(tree(&root), before);
}

/// `shipped` (a service file in installer/) as install.sh --run-as root writes it: the
/// lines from `from` to `to` (or to the paragraph's end) replaced by one comment.
fn as_root(shipped: &str, from: &str, to: Option<&str>) -> String {
    let start = shipped.find(from).expect(from);
    let end = match to {
        Some(to) => start + shipped[start..].find(to).expect(to) + to.len() + 1,
        None => start + shipped[start..].find("\n\n").unwrap() + 1,
    };
    format!(
        "{}# install.sh --run-as root: the agent and every plugin it runs are root (docs/INSTALL.md).\n{}",
        &shipped[..start],
        &shipped[end..]
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_is_an_explicit_choice_and_an_install_that_ran_as_root_moves_to_outpost() {
    let s = setup(&[]);
    let ca = s.ca.display().to_string();
    let key = s.gw.enroll_key.clone();
    let sd = [("OUTPOST_INIT", "systemd")];
    let root = empty_root(s.dir.path(), "root");
    let unit = root.join("etc/systemd/system/outpost-agent.service");
    let shipped = read(&workspace().join("installer/outpost-agent.service"));
    let root_unit = as_root(&shipped, "# Least privilege", None);

    // Chosen explicitly: everything is root's, the unit has neither the user nor the
    // sandbox (which would leave root nothing), and the script says what that means.
    let run = s.install(
        &root,
        &["--key", &key, "--ca", &ca, "--run-as", "root"],
        &sd,
    );
    assert!(run.ok, "{run}");
    assert!(
        run.stderr
            .contains("--run-as root: the agent and every plugin it runs are root on this host"),
        "{run}"
    );
    assert_layout(&root, 0, 0, "--run-as root");
    assert_eq!(read(&unit), root_unit);
    assert!(!root_unit.contains("User=") && !root_unit.contains("NoNewPrivileges"));
    assert_systemd_accepts(&root_unit);

    // The choice is kept by the next run without the option.
    let run = s.install(&root, &[], &sd);
    assert!(run.ok, "{run}");
    assert!(run.stdout.contains("it runs as the root user"), "{run}");
    assert_layout(&root, 0, 0, "--run-as root kept");
    assert_eq!(read(&unit), root_unit);

    // An install from before the outpost user (no record of a choice, everything root's),
    // with what its agent made as root since; and a link in its state to a file of root's.
    std::fs::remove_file(root.join("etc/outpost/run-as")).unwrap();
    let made = [
        "etc/outpost/agent.finger",
        "etc/outpost/agent.secret",
        "opt/outpost/state/outbox.redb",
        "opt/outpost/state/update/highest",
        "opt/outpost/plugins/check_x",
        "opt/outpost/bin/outpost-agent.previous",
    ];
    for f in made {
        let p = root.join(f);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, f).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let link = root.join("opt/outpost/state/link");
    std::os::unix::fs::symlink(root.join("etc/passwd"), &link).unwrap();
    s.clear_calls();
    let run = s.install(&root, &[], &sd);
    assert!(run.ok, "{run}");
    assert!(
        run.stdout.contains(
            "outpost-agent ran as uid 0 until now; from now on it and its plugins run as the outpost user"
        ),
        "{run}"
    );
    // Stopped before its files changed hands, then started as outpost.
    assert_eq!(
        s.calls(),
        [
            "systemctl stop outpost-agent.service",
            "systemctl daemon-reload",
            "systemctl enable outpost-agent.service",
            "systemctl restart outpost-agent.service"
        ]
    );
    assert_layout(&root, OUTPOST_ID, OUTPOST_ID, "moved to outpost");
    assert_eq!(read(&unit), shipped);
    for f in made {
        let p = root.join(f);
        assert_eq!(owner(&p), (OUTPOST_ID, OUTPOST_ID), "{f}");
        assert_eq!(read(&p), f);
    }
    assert_eq!(owner(&link), (OUTPOST_ID, OUTPOST_ID));
    assert_eq!(
        owner(&root.join("etc/passwd")),
        (0, 0),
        "a link was followed"
    );
    assert_eq!(
        owner(&root.join("opt/outpost/state/update")),
        (OUTPOST_ID, OUTPOST_ID)
    );

    // And back to root, explicitly. What the outpost user could write and root would act
    // on goes: the cached checks and collectors, the binary a rollback would put back.
    let state = root.join("opt/outpost/state");
    std::fs::write(state.join("config.json"), "{}").unwrap();
    std::fs::create_dir_all(state.join("collectors/c")).unwrap();
    let run = s.install(&root, &["--run-as", "root"], &sd);
    assert!(run.ok, "{run}");
    assert_layout(&root, 0, 0, "back to root");
    assert_eq!(owner(&state.join("outbox.redb")), (0, 0));
    assert_eq!(
        read(&state.join("outbox.redb")),
        "opt/outpost/state/outbox.redb"
    );
    for gone in [
        "opt/outpost/state/config.json",
        "opt/outpost/state/collectors",
        "opt/outpost/bin/outpost-agent.previous",
    ] {
        assert!(!root.join(gone).exists(), "{gone} kept");
    }
    assert_eq!(read(&unit), root_unit);

    // OpenRC and SysV scripts: as root, only the user differs.
    for (init, file, want) in [
        (
            "openrc",
            "installer/outpost-agent.openrc",
            as_root(
                &read(&workspace().join("installer/outpost-agent.openrc")),
                "# The agent and every plugin it runs are this user",
                Some("command_user=\"outpost:outpost\""),
            ),
        ),
        (
            "sysv",
            "installer/outpost-agent.sysv",
            read(&workspace().join("installer/outpost-agent.sysv"))
                .replace("\nRUN_AS=outpost\n", "\nRUN_AS=root\n"),
        ),
    ] {
        let r = empty_root(s.dir.path(), &format!("root-{init}"));
        let run = s.install(
            &r,
            &["--key", &key, "--ca", &ca, "--run-as", "root"],
            &[("OUTPOST_INIT", init)],
        );
        assert!(run.ok, "{init}: {run}");
        let script = read(&r.join("etc/init.d/outpost-agent"));
        assert_eq!(script, want, "{file} as root");
        assert!(!script.contains("outpost:outpost") && !script.contains("RUN_AS=outpost"));
    }
}

/// A name root writes in /etc/outpost (where the agent's user may create files), planted
/// there as a symbolic link, is refused rather than followed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_planted_in_etc_outpost_is_not_followed() {
    let s = setup(&[]);
    let ca = s.ca.display().to_string();
    let root = empty_root(s.dir.path(), "root");
    let run = s.install(
        &root,
        &["--key", &s.gw.enroll_key, "--ca", &ca],
        &[("OUTPOST_INIT", "none")],
    );
    assert!(run.ok, "{run}");
    let victim = s.dir.path().join("shadow");
    std::fs::write(&victim, "root's secret\n").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
    let planted = root.join("etc/outpost/agent.toml.old");
    std::os::unix::fs::symlink(&victim, &planted).unwrap();
    let before = tree(&root);
    // A new key would write agent.toml.old.
    let run = s.install(
        &root,
        &["--key", "new-key", "--ca", &ca],
        &[("OUTPOST_INIT", "none")],
    );
    assert!(!run.ok, "{run}");
    assert!(
        run.stderr.contains(
            "agent.toml.old is a symbolic link, which this script does not follow as root"
        ),
        "{run}"
    );
    assert_eq!(read(&victim), "root's secret\n");
    assert_eq!((mode(&victim), owner(&victim)), (0o600, (0, 0)));
    assert_eq!(tree(&root), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_the_signed_manifest_does_not_list_installs_nothing() {
    let s = setup(&[]);
    let ca = s.ca.display().to_string();
    let key = s.gw.enroll_key.clone();
    // 2.0.0 as published and signed; then, on the gateway, its binary replaced and its
    // SHA256SUMS rewritten to match, as whoever can write the gateway's files could.
    publish_fake(&s.releases, "2.0.0");
    let dir = s.releases.join("2.0.0");
    let signed_sums = read(&dir.join("SHA256SUMS"));
    // Of the same size (a larger one is not even downloaded whole: see below).
    std::fs::write(dir.join(X86), fake_agent("6.6.6", "x86_64")).unwrap();
    let tampered_sums = format!("{}  {X86}\n", sha256sum(&dir.join(X86)));
    std::fs::write(dir.join("SHA256SUMS"), &tampered_sums).unwrap();
    let root = empty_root(s.dir.path(), "root");
    let before = tree(&root);
    let run = s.install(
        &root,
        &["--key", &key, "--ca", &ca],
        &[("OUTPOST_INIT", "systemd")],
    );
    assert!(!run.ok, "{run}");
    assert!(
        run.stderr.contains(&format!(
            "{X86} of release 2.0.0 is not the one the signed release manifest lists"
        )),
        "{run}"
    );
    assert!(run.stderr.contains("nothing was installed"), "{run}");
    assert_eq!(tree(&root), before);
    assert!(s.calls().is_empty());

    // Its size is signed too: a shorter binary is refused the same way, a longer one as
    // soon as its length is announced.
    std::fs::write(dir.join(X86), b"#!").unwrap();
    let run = s.install(&root, &["--key", &key, "--ca", &ca], &[]);
    assert!(
        !run.ok
            && run
                .stderr
                .contains("is not the one the signed release manifest lists"),
        "{run}"
    );
    let signed_len = fake_agent("2.0.0", "x86_64").len();
    std::fs::write(dir.join(X86), fake_agent("2.0.0-tampered", "x86_64")).unwrap();
    let run = s.install(&root, &["--key", &key, "--ca", &ca], &[]);
    assert!(
        !run.ok
            && run.stderr.contains(&format!(
                "releases/2.0.0/{X86} is larger than the {signed_len} bytes it may have"
            )),
        "{run}"
    );
    assert_eq!(tree(&root), before);

    // --no-verify-release: SHA256SUMS, the gateway's own word, is all that is checked, so a
    // binary that does not match it is refused, and so is one it does not list.
    std::fs::write(dir.join(X86), fake_agent("2.0.0-tampered", "x86_64")).unwrap();
    std::fs::write(dir.join("SHA256SUMS"), &signed_sums).unwrap();
    let run = s.install(
        &root,
        &["--key", &key, "--ca", &ca, "--no-verify-release"],
        &[],
    );
    assert!(!run.ok, "{run}");
    assert!(
        run.stderr.contains(&format!("checksum mismatch for {X86}")),
        "{run}"
    );
    assert!(
        run.stderr
            .contains("--no-verify-release: the release's signature is not checked"),
        "{run}"
    );
    std::fs::write(dir.join("SHA256SUMS"), "").unwrap();
    let run = s.install(
        &root,
        &["--key", &key, "--ca", &ca, "--no-verify-release"],
        &[],
    );
    assert!(!run.ok && run.stderr.contains("has no entry for"), "{run}");
    assert_eq!(tree(&root), before);
    assert!(s.calls().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_whose_signature_does_not_verify_installs_nothing() {
    let s = setup(&[]);
    let ca = s.ca.display().to_string();
    let key = s.gw.enroll_key.clone();
    // 2.0.0's binary replaced, and the manifest edited to list it: the signature is the
    // one made over the manifest before.
    publish_fake(&s.releases, "2.0.0");
    let evil = fake_agent("2.0.0-tampered", "x86_64");
    let bin = s.releases.join("2.0.0").join(X86);
    std::fs::write(&bin, &evil).unwrap();
    let manifest_path = s.releases.join("manifest.json");
    let mut manifest: Value = serde_json::from_str(&read(&manifest_path)).unwrap();
    for r in manifest["releases"].as_array_mut().unwrap() {
        if r["version"] == "2.0.0" && r["file"] == X86 {
            r["sha256"] = sha256sum(&bin).into();
            r["size"] = evil.len().into();
        }
    }
    std::fs::write(
        &manifest_path,
        serde_json::to_vec_pretty(&manifest).unwrap(),
    )
    .unwrap();
    let sig_path = s.releases.join("manifest.json.sig");

    let root = empty_root(s.dir.path(), "root");
    let before = tree(&root);
    let bad_key = s.dir.path().join("bad.pub");
    std::fs::write(&bad_key, "# not a key\nnot base64!\n").unwrap();
    let not_verified = "the release manifest's signature does not verify with the key in";
    let check = |args: &[&str], env: &[(&str, &str)], message: &str| {
        let mut all = vec!["--key", &key, "--ca", &ca];
        all.extend_from_slice(args);
        let run = s.install(&root, &all, env);
        assert!(!run.ok, "{args:?} {env:?}: {run}");
        assert!(
            run.stderr.contains(message),
            "{args:?} {env:?}: want {message:?}\n{run}"
        );
        assert_eq!(tree(&root), before, "{args:?} {env:?}");
    };
    check(&[], &[], not_verified);
    // The script's own key, not the test key the releases are signed with.
    check(
        &[],
        &[("OUTPOST_RELEASE_KEY", "")],
        "does not verify with the Outpost release key",
    );
    check(
        &["--release-key", bad_key.to_str().unwrap()],
        &[],
        "holds no ed25519 public key",
    );

    // The tampered manifest signed with another key (the attacker's).
    sign(&s.releases, ATTACKER_SEED);
    check(&[], &[], not_verified);
    // No signature, or not one.
    for (sig, message) in [
        (
            "not base64!\n",
            "releases/manifest.json.sig is not a signature",
        ),
        ("AAAA\n", "is not base64 of a 64-byte signature"),
    ] {
        std::fs::write(&sig_path, sig).unwrap();
        check(&[], &[], message);
    }
    std::fs::remove_file(&sig_path).unwrap();
    check(&[], &[], "the gateway has no releases/manifest.json.sig");
    assert!(s.calls().is_empty());

    // Signed with the test key again: installs, with the script saying what it checked.
    sign(&s.releases, TEST_SEED);
    let run = s.install(&root, &["--key", &key, "--ca", &ca], &[]);
    assert!(run.ok, "{run}");
    assert!(
        run.stdout.contains(&format!(
            "verified {X86} 2.0.0 against the signed release manifest"
        )),
        "{run}"
    );
    assert_eq!(
        std::fs::read(root.join("opt/outpost/bin/outpost-agent")).unwrap(),
        evil
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_openssl_3_only_an_explicit_no_verify_release_installs() {
    let s = setup(&[]);
    let ca = s.ca.display().to_string();
    let key = s.gw.enroll_key.clone();
    let root = empty_root(s.dir.path(), "root");
    let before = tree(&root);
    let no_openssl = path_without(&s.dir.path().join("no-openssl"), &["openssl"]);
    let old_openssl = s.dir.path().join("old-openssl");
    std::fs::create_dir_all(&old_openssl).unwrap();
    // An OpenSSL before 3.0 has no `pkeyutl -rawin`, so it cannot verify ed25519.
    write_exec(
        &old_openssl.join("openssl"),
        "#!/bin/sh\ncase $1 in version) echo 'OpenSSL 1.1.1w  11 Sep 2023' ;; base64) exec /usr/bin/openssl \"$@\" ;; *) echo \"openssl: unknown option\" >&2; exit 1 ;; esac\n",
    );
    let fakes = s.fakes.display().to_string();
    let args = ["--key", &key, "--ca", &ca];
    for (path, message) in [
        (
            format!("{fakes}:{no_openssl}"),
            "openssl (OpenSSL 3.0 or newer) is not installed",
        ),
        (
            format!("{fakes}:{}:{no_openssl}", old_openssl.display()),
            "this openssl (OpenSSL 1.1.1w  11 Sep 2023) cannot verify ed25519 signatures",
        ),
    ] {
        let run = run_sh(&s.fetch_script(), &args, &root, &path, &s.calls, &[]);
        assert!(!run.ok, "{run}");
        assert!(run.stderr.contains(message), "want {message:?}\n{run}");
        assert!(run.stderr.contains("--no-verify-release"), "{run}");
        assert_eq!(tree(&root), before);
    }
    let path = format!("{fakes}:{no_openssl}");

    // Chosen explicitly, the install goes ahead on SHA256SUMS, and says so.
    let run = run_sh(
        &s.fetch_script(),
        &["--key", &key, "--ca", &ca, "--no-verify-release"],
        &root,
        &path,
        &s.calls,
        &[],
    );
    assert!(run.ok, "{run}");
    assert!(run.stderr.contains("warning: --no-verify-release"), "{run}");
    assert_eq!(
        std::fs::read(root.join("opt/outpost/bin/outpost-agent")).unwrap(),
        fake_agent("1.0.0", "x86_64")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_architecture_picks_the_binary_and_others_are_refused() {
    let s = setup(&[]);
    let ca = s.ca.display().to_string();
    let uname = |dir: &str, machine: &str| {
        let d = s.dir.path().join(dir);
        std::fs::create_dir_all(&d).unwrap();
        write_exec(
            &d.join("uname"),
            &format!("#!/bin/sh\ncase \"$1\" in -m) echo {machine} ;; *) echo Linux ;; esac\n"),
        );
        format!(
            "{}:{}:{}",
            d.display(),
            s.fakes.display(),
            std::env::var("PATH").unwrap()
        )
    };
    let key = s.gw.enroll_key.clone();
    let args = ["--key", &key, "--ca", &ca];

    let root = empty_root(s.dir.path(), "arm");
    let path = uname("arm-bin", "aarch64");
    let run = run_sh(&s.fetch_script(), &args, &root, &path, &s.calls, &[]);
    assert!(run.ok, "{run}");
    assert_eq!(
        std::fs::read(root.join("opt/outpost/bin/outpost-agent")).unwrap(),
        fake_agent("1.0.0", "aarch64")
    );

    let root = empty_root(s.dir.path(), "mips");
    let before = tree(&root);
    let path = uname("mips-bin", "mips");
    let run = run_sh(&s.fetch_script(), &args, &root, &path, &s.calls, &[]);
    assert!(!run.ok, "{run}");
    assert!(
        run.stderr.contains("unsupported architecture \"mips\""),
        "{run}"
    );
    assert_eq!(tree(&root), before);
}

/// A PATH (one directory, made at `dir`) with every tool of this system but `missing`.
fn path_without(dir: &Path, missing: &[&str]) -> String {
    std::fs::create_dir_all(dir).unwrap();
    for d in ["/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"] {
        for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
            let name = e.file_name();
            let skip = missing.iter().any(|m| name == *m);
            if !skip && !dir.join(&name).exists() {
                std::os::unix::fs::symlink(e.path(), dir.join(&name)).unwrap();
            }
        }
    }
    dir.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wget_does_when_there_is_no_curl() {
    let s = setup(&[]);
    let ca = s.ca.display().to_string();
    let root = empty_root(s.dir.path(), "root");
    let before = tree(&root);
    let p = path_without(&s.dir.path().join("no-curl"), &["curl"]);
    let key = s.gw.enroll_key.clone();

    let run = run_sh(
        &s.fetch_script(),
        &["--key", &key, "--pin", &s.gw.pin],
        &root,
        &p,
        &s.calls,
        &[],
    );
    assert!(!run.ok && run.stderr.contains("--pin needs curl"), "{run}");
    let run = run_sh(
        &s.fetch_script(),
        &["--key", &key],
        &root,
        &p,
        &s.calls,
        &[],
    );
    assert!(
        !run.ok
            && run
                .stderr
                .contains("cannot verify the gateway's certificate"),
        "{run}"
    );
    let run = run_sh(
        &s.fetch_script(),
        &["--key", &key, "--ca", &ca, "--version", "3.0.0"],
        &root,
        &p,
        &s.calls,
        &[],
    );
    assert!(
        !run.ok
            && run.stderr.contains(
                "the signed release manifest has no 3.0.0 for x86_64-unknown-linux-musl (it lists: 1.0.0)"
            ),
        "{run}"
    );
    assert_eq!(tree(&root), before);

    let run = run_sh(
        &s.fetch_script(),
        &["--key", &key, "--ca", &ca],
        &root,
        &p,
        &s.calls,
        &[],
    );
    assert!(run.ok, "{run}");
    assert_eq!(
        std::fs::read(root.join("opt/outpost/bin/outpost-agent")).unwrap(),
        fake_agent("1.0.0", "x86_64")
    );
}

/// Audit finding 10: `--key` is visible to every local user in `ps` while the script
/// runs. `--key-file` keeps it out of the command line; a missing or empty file is a
/// clear error and installs nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_can_come_from_a_file_and_a_bad_file_installs_nothing() {
    let s = setup(&[]);
    let ca = s.ca.display().to_string();
    let path = std::env::var("PATH").unwrap();
    let key_file = s.dir.path().join("enroll.key");
    std::fs::write(&key_file, format!("  {}\n", s.gw.enroll_key)).unwrap();
    let kf = key_file.display().to_string();

    let root = empty_root(s.dir.path(), "bad");
    let before = tree(&root);
    let missing = s.dir.path().join("nope").display().to_string();
    let empty = s.dir.path().join("empty.key");
    std::fs::write(&empty, "\n").unwrap();
    let empty = empty.display().to_string();
    for (file, says) in [
        (missing.as_str(), "cannot read the key file"),
        (empty.as_str(), "is empty"),
    ] {
        let run = run_sh(
            &s.fetch_script(),
            &["--key-file", file, "--ca", &ca, "--init", "none"],
            &root,
            &path,
            &s.calls,
            &[],
        );
        assert!(!run.ok && run.stderr.contains(says), "{run}");
        assert_eq!(tree(&root), before, "{file} changed the root");
    }

    let root = empty_root(s.dir.path(), "good");
    let run = run_sh(
        &s.fetch_script(),
        &["--key-file", &kf, "--ca", &ca, "--init", "none"],
        &root,
        &path,
        &s.calls,
        &[],
    );
    assert!(run.ok, "{run}");
    let config = read(&root.join("etc/outpost/agent.toml"));
    assert!(
        config.contains(&format!("enroll_key = \"{}\"\n", s.gw.enroll_key)),
        "{config}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_errors_and_nothing_installed() {
    let s = setup(&[]);
    let ca = s.ca.display().to_string();
    let key = s.gw.enroll_key.clone();
    let root = empty_root(s.dir.path(), "root");
    let before = tree(&root);
    let path = std::env::var("PATH").unwrap();

    // Not root (a fake id says uid 1000).
    let fake_id = s.dir.path().join("id-bin");
    std::fs::create_dir_all(&fake_id).unwrap();
    write_exec(&fake_id.join("id"), "#!/bin/sh\necho 1000\n");
    let p = format!("{}:{path}", fake_id.display());
    let run = run_sh(
        &s.fetch_script(),
        &["--key", &key],
        &root,
        &p,
        &s.calls,
        &[],
    );
    assert!(!run.ok && run.stderr.contains("run this as root"), "{run}");

    // Neither curl nor wget.
    let p = path_without(&s.dir.path().join("no-downloader"), &["curl", "wget"]);
    let run = run_sh(
        &s.fetch_script(),
        &["--key", &key, "--ca", &ca],
        &root,
        &p,
        &s.calls,
        &[],
    );
    assert!(
        !run.ok && run.stderr.contains("neither curl nor wget is installed"),
        "{run}"
    );

    // A release whose SHA256SUMS is far too large to be one (read only with
    // --no-verify-release).
    publish_fake(&s.releases, "0.0.1");
    std::fs::write(s.releases.join("0.0.1/SHA256SUMS"), "0".repeat(70_000)).unwrap();
    let other_key = format!("sha256//{}=", "B".repeat(43));

    // Each with the script as served, into the same untouched root.
    let cases: &[(&[&str], &str)] = &[
        (
            &["--key", &key, "--ca", &ca, "--gateway", "127.0.0.1:1"],
            "cannot reach the gateway at https://127.0.0.1:1/",
        ),
        (&["--ca", &ca], "the first install needs an enrollment key"),
        (
            &["--key", &key, "--pin", "abc"],
            "--pin must be 64 hex digits",
        ),
        (
            &["--key", &key, "--pin", "sha256//abc="],
            "is not a public-key pin",
        ),
        (
            &["--key", &key, "--pin", &"ab".repeat(32), "--pin", &"cd".repeat(32)],
            "two different certificate pins given",
        ),
        (
            &["--key", &key, "--pin", &s.gw.curl_pin, "--pin", &other_key],
            "two different public-key pins given",
        ),
        (
            &["--key", &key, "--ca", &ca, "--pin", &"ab".repeat(32)],
            "either --ca or --pin",
        ),
        (
            &["--key", "k\"ey", "--ca", &ca],
            "enrollment key may hold only",
        ),
        (
            &["--key", &key, "--ca", &ca, "--version", "9.9.9"],
            "the signed release manifest has no 9.9.9 for x86_64-unknown-linux-musl (it lists: 0.0.1 1.0.0)",
        ),
        (
            &["--key", &key, "--ca", &ca, "--version", "1.0-rc1"],
            "\"1.0-rc1\" is not a version (one to four dot-separated numbers",
        ),
        (&["--key", &key], "cannot verify the gateway's certificate"),
        (
            &["--key", &key, "--ca", &ca, "--version", "0.0.1", "--no-verify-release"],
            "releases/0.0.1/SHA256SUMS is larger than the 65536 bytes it may have",
        ),
        (&["--bogus"], "unknown option \"--bogus\""),
        (&["--purge"], "--purge goes with --uninstall"),
        (
            &["--key", &key, "--ca", &ca, "--init", "upstart"],
            "--init must be systemd, openrc, sysv or none",
        ),
        (
            &["--key", &key, "--ca", &ca, "--run-as", "nobody"],
            "--run-as must be outpost or root, got \"nobody\"",
        ),
    ];
    for (args, message) in cases {
        let run = s.install(&root, args, &[]);
        assert!(!run.ok, "{args:?}: {run}");
        assert!(
            run.stderr.contains(message),
            "{args:?}: want {message:?}\n{run}"
        );
    }
    assert_eq!(tree(&root), before);
    assert!(s.calls().is_empty());

    // A directory tree without the outpost account: the script adds none to a tree (its
    // tools would add it to this host), it says how to make one.
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    let before = tree(&root);
    let run = s.install(&root, &["--key", &key, "--ca", &ca], &[]);
    assert!(!run.ok, "{run}");
    assert!(
        run.stderr.contains(&format!(
            "there is no outpost user in {}/etc/passwd",
            root.display()
        )) && run.stderr.contains("or pass --run-as root"),
        "{run}"
    );
    assert_eq!(tree(&root), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pin_is_the_agents_pin_and_a_wrong_one_installs_nothing() {
    // The gateway's own self-signed certificate, trusted by its pin only.
    let dir = tempdir();
    let releases = dir.path().join("releases");
    publish_fake(&releases, "1.0.0");
    let rel = releases.display().to_string();
    let gw = Gateway::start(dir.path(), &["--releases-dir", &rel]);
    let s = Setup {
        ca: gw.data_dir.join("tls/cert.pem"),
        fakes: dir.path().to_path_buf(),
        calls: dir.path().join("calls.log"),
        releases,
        gw,
        dir,
    };
    // The one-liner's first hop: curl fetches the script by the public-key pin the
    // gateway prints (`curl_pin`), and refuses another.
    let fetch = |pin: &str| {
        Command::new("timeout")
            .args(["30", "curl", "-fsS", "-k", "--pinnedpubkey", pin])
            .arg(format!("{}/install.sh", s.base()))
            .output()
            .unwrap()
    };
    let got = fetch(&s.gw.curl_pin);
    assert!(
        got.status.success(),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
    assert!(got.stdout.starts_with(b"#!/bin/sh"));
    let other = format!("sha256//{}", "A".repeat(43) + "=");
    let refused = fetch(&other);
    assert!(
        !refused.status.success(),
        "a wrong public-key pin was accepted"
    );
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("pinned"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    // The script as served knows this gateway's two pins: either one given is enough,
    // and the downloads are pinned to its key. Wrong pins install nothing.
    let root = empty_root(s.dir.path(), "root");
    let before = tree(&root);
    let key = s.gw.enroll_key.clone();
    let wrong = "0".repeat(64);
    let wrong_key = format!("sha256//{}=", "A".repeat(43));
    let (pin, curl_pin) = (s.gw.pin.clone(), s.gw.curl_pin.clone());
    let cases: &[(&[&str], &str)] = &[
        (
            &["--pin", &wrong],
            "is not the pin of the gateway that served this script",
        ),
        (
            &["--pin", &wrong_key],
            "the agent pins the gateway's certificate, not its key: pass its pin_sha256 as well",
        ),
        (
            &["--pin", &wrong, "--pin", &wrong_key],
            &format!("is not the pinned gateway: its public key does not match {wrong_key}"),
        ),
        (
            &["--pin", &pin, "--pin", &wrong_key],
            "the two pins given are not of one certificate",
        ),
        (
            &["--pin", &wrong, "--pin", &curl_pin],
            "the two pins given are not of one certificate",
        ),
    ];
    for (args, message) in cases {
        let mut all = vec!["--key", &key];
        all.extend_from_slice(args);
        let run = s.install(&root, &all, &[]);
        assert!(!run.ok, "{args:?}: {run}");
        assert!(
            run.stderr.contains(message),
            "{args:?}: want {message:?}\n{run}"
        );
        assert_eq!(tree(&root), before, "{args:?}");
    }

    let pinned = |root: &Path| {
        let config = read(&root.join("etc/outpost/agent.toml"));
        let settings = outpost_agent::Settings::from_toml(&config, &BTreeMap::new()).unwrap();
        assert_eq!(
            settings.trust,
            outpost_agent::settings::Trust::Pin(s.gw.pin.clone())
        );
    };
    let upper = s.gw.pin.to_uppercase();
    let run = s.install(&root, &["--key", &key, "--pin", &upper], &[]);
    assert!(run.ok, "{run}");
    pinned(&root);
    // An upgrade takes the pin from agent.toml.
    let run = s.install(&root, &[], &[]);
    assert!(run.ok, "{run}");
    assert!(
        run.stdout.contains("kept /etc/outpost/agent.toml as it is"),
        "{run}"
    );
    // The public-key pin alone (curl_pin, as in the one-liner) gives agent.toml the same.
    let root = empty_root(s.dir.path(), "root-curl-pin");
    let run = s.install(&root, &["--key", &key, "--pin", &curl_pin], &[]);
    assert!(run.ok, "{run}");
    pinned(&root);

    // The script from a file (not served, so without the pins): it needs both.
    let script = read(&script_source());
    let gateway = format!("localhost:{}", s.gw.port());
    let path = format!("{}:{}", s.fakes.display(), std::env::var("PATH").unwrap());
    let root = empty_root(s.dir.path(), "root-file");
    let before = tree(&root);
    let run = run_sh(
        script.as_bytes(),
        &["--key", &key, "--gateway", &gateway, "--pin", &pin],
        &root,
        &path,
        &s.calls,
        &[],
    );
    assert!(
        !run.ok && run.stderr.contains("pass that gateway's curl_pin as well"),
        "{run}"
    );
    assert_eq!(tree(&root), before);
    let run = run_sh(
        script.as_bytes(),
        &["--key", &key, "--gateway", &gateway],
        &root,
        &path,
        &s.calls,
        &[("OUTPOST_PIN", &format!("{pin} {curl_pin}"))],
    );
    assert!(run.ok, "{run}");
    pinned(&root);
}

/// An attacker's self-signed certificate for `localhost` whose Netscape Comment extension
/// holds `comment` (the real gateway's cert.pem), as the security audit made it; made with
/// openssl in `dir`, returns (certificate, key).
fn cert_with_comment(dir: &Path, comment: &[u8]) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    // The extension's value in DER: an IA5String with a two-byte length.
    assert!((256..65536).contains(&comment.len()), "{}", comment.len());
    let len = u16::try_from(comment.len()).unwrap().to_be_bytes();
    let der: String = [&[0x16, 0x82, len[0], len[1]][..], comment]
        .concat()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    std::fs::write(
        dir.join("evil.cnf"),
        format!(
            "[req]\ndistinguished_name = dn\n[dn]\n[v3]\nsubjectAltName = DNS:localhost\nnsComment = DER:{der}\n"
        ),
    )
    .unwrap();
    let out = Command::new("timeout")
        .args(["60", "openssl", "req", "-x509", "-newkey", "ec"])
        .args([
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
        ])
        .args(["-subj", "/CN=localhost", "-extensions", "v3", "-config"])
        .arg(dir.join("evil.cnf"))
        .arg("-keyout")
        .arg(dir.join("evil.key"))
        .arg("-out")
        .arg(dir.join("evil.pem"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl req: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (dir.join("evil.pem"), dir.join("evil.key"))
}

/// The audit's attack on `--pin`: someone in the network path answers the connections the
/// script makes with a certificate of their own that carries the gateway's real cert.pem in
/// a Netscape Comment extension (curl prints extensions raw, before the certificate's own
/// PEM block), and serves their own "agent". The script must refuse the connection, and
/// install nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pin_is_not_fooled_by_the_real_certificate_inside_an_attackers() {
    // The real gateway: self-signed, trusted by its pin.
    let dir = tempdir();
    let releases = dir.path().join("releases");
    publish_fake(&releases, "1.0.0");
    let rel = releases.display().to_string();
    let gw = Gateway::start(dir.path(), &["--releases-dir", &rel]);
    let real_pem = std::fs::read(gw.data_dir.join("tls/cert.pem")).unwrap();

    // The attacker's server: a gateway of their own, with that certificate and their
    // binary published (with matching SHA256SUMS, and a manifest signed with their key).
    let evil_dir = dir.path().join("attacker");
    // A line break first, so that curl prints the block on lines of its own.
    let comment = [&b"\n"[..], &real_pem].concat();
    let (cert, key) = cert_with_comment(&evil_dir.join("pki"), &comment);
    let evil_releases = evil_dir.join("releases");
    publish(
        &evil_releases,
        "6.6.6",
        &[
            (X86, b"#!/bin/sh\necho pwned\n"),
            (ARM, b"#!/bin/sh\necho pwned\n"),
        ],
    );
    sign(&evil_releases, ATTACKER_SEED);
    let (cert_s, key_s, evil_rel) = (
        cert.display().to_string(),
        key.display().to_string(),
        evil_releases.display().to_string(),
    );
    let evil = Gateway::start(
        &evil_dir,
        &[
            "--tls-cert",
            &cert_s,
            "--tls-key",
            &key_s,
            "--releases-dir",
            &evil_rel,
        ],
    );
    assert_ne!(evil.pin, gw.pin);
    assert_ne!(evil.curl_pin, gw.curl_pin);

    // The premise: what curl reports of the attacker's certificate shows the real
    // certificate's PEM block first.
    let out = Command::new("timeout")
        .args([
            "30",
            "curl",
            "-gsS",
            "-k",
            "-o",
            "/dev/null",
            "-w",
            "%{certs}",
        ])
        .arg(format!(
            "https://localhost:{}/releases/latest/VERSION",
            evil.port()
        ))
        .output()
        .unwrap();
    let certs = String::from_utf8_lossy(&out.stdout);
    let real = String::from_utf8_lossy(&real_pem);
    let first = certs
        .find("-----BEGIN CERTIFICATE-----")
        .expect("curl reports the certificate");
    assert!(
        certs[first..].starts_with(real.trim_end()) && certs[..first].ends_with('\n'),
        "curl does not show the real certificate first, on lines of its own:\n{certs}"
    );

    // The script as the real gateway serves it, to a user whose traffic to the gateway
    // the attacker answers: in the script, the gateway's address is the attacker's.
    let s = Setup {
        ca: gw.data_dir.join("tls/cert.pem"),
        fakes: dir.path().to_path_buf(),
        calls: dir.path().join("calls.log"),
        releases,
        gw,
        dir,
    };
    let out = Command::new("timeout")
        .args(["30", "curl", "-fsS", "--cacert"])
        .arg(&s.ca)
        .args(["-H", &format!("Host: localhost:{}", evil.port())])
        .arg(format!("{}/install.sh", s.base()))
        .output()
        .unwrap();
    assert!(out.status.success());
    let script = out.stdout;
    assert!(String::from_utf8_lossy(&script)
        .contains(&format!("served_gateway='localhost:{}'", evil.port())));

    // The pin refuses the attacker's server in the handshake, whichever form of the pin is
    // given, and even when the release's signature is not checked.
    let root = empty_root(s.dir.path(), "root");
    let before = tree(&root);
    let path = std::env::var("PATH").unwrap();
    let key = s.gw.enroll_key.clone();
    for args in [
        vec!["--key", &key, "--pin", &s.gw.pin],
        vec!["--key", &key, "--pin", &s.gw.curl_pin],
        vec!["--key", &key, "--pin", &s.gw.pin, "--no-verify-release"],
    ] {
        let run = run_sh(&script, &args, &root, &path, &s.calls, &[]);
        assert!(
            !run.ok,
            "the attacker's agent was installed: {args:?}: {run}"
        );
        assert_eq!(tree(&root), before, "{args:?}: {run}");
        // The first download is refused: the manifest, or without it, VERSION.
        let first = if args.contains(&"--no-verify-release") {
            "releases/latest/VERSION"
        } else {
            "releases/manifest.json"
        };
        assert!(
            run.stderr.contains(&format!(
                "https://localhost:{}/{first} is not the pinned gateway: its public key does not match {}",
                evil.port(),
                s.gw.curl_pin
            )),
            "{args:?}: {run}"
        );
    }
}

/// `curl` with extra arguments against the gateway; returns (status, headers, body).
fn curl(s: &Setup, args: &[&str], path: &str) -> (u16, String, Vec<u8>) {
    let headers = s.dir.path().join("headers.txt");
    let out = Command::new("timeout")
        .args(["30", "curl", "-sS", "--path-as-is", "--cacert"])
        .arg(&s.ca)
        .arg("-D")
        .arg(&headers)
        .args(args)
        .arg(format!("{}{path}", s.base()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "curl {path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let h = read(&headers);
    let status = h.split(' ').nth(1).unwrap().parse().unwrap();
    (status, h.to_ascii_lowercase(), out.stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_serves_the_script_and_releases_and_nothing_else() {
    let s = setup(&[]);
    // A 5 MB artifact comes whole, with its length announced.
    let big: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
    publish(&s.releases, "1.2.0", &[(X86, &big)]);
    publish_fake(&s.releases, "1.2.0-rc.1");
    publish_fake(&s.releases, "1.10.0-rc.1");
    std::fs::write(s.releases.join("1.2.0/.hidden"), "x").unwrap();
    std::fs::write(s.dir.path().join("secret.txt"), "secret").unwrap();
    std::os::unix::fs::symlink(
        s.dir.path().join("secret.txt"),
        s.releases.join("1.2.0/escape"),
    )
    .unwrap();

    let (status, headers, body) = curl(&s, &[], &format!("/releases/1.2.0/{X86}"));
    assert_eq!(status, 200);
    assert!(headers.contains("content-length: 5000000\r\n"), "{headers}");
    assert!(body == big, "body differs from the file");
    let (status, _, body) = curl(&s, &[], "/releases/latest/VERSION");
    assert_eq!((status, body.as_slice()), (200, &b"1.10.0-rc.1\n"[..]));
    let (status, _, body) = curl(&s, &["-I"], &format!("/releases/latest/{X86}"));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));

    for bad in [
        "/releases/1.2.0/.hidden",
        "/releases/1.2.0/escape",
        "/releases/1.2.0/nope",
        "/releases/9.0.0/VERSION",
        "/releases/%2e%2e/secret.txt",
        "/releases/1.2.0/..%2f..%2fsecret.txt",
        "/releases/../secret.txt",
        "/releases/1.2.0/%2Fetc%2Fpasswd",
    ] {
        let (status, _, body) = curl(&s, &[], bad);
        assert_eq!(status, 404, "{bad}: {}", String::from_utf8_lossy(&body));
        assert!(
            !String::from_utf8_lossy(&body).contains("secret\n"),
            "{bad}"
        );
    }
    let (_, _, body) = curl(&s, &[], "/releases/1.2.0/nope");
    assert_eq!(
        String::from_utf8_lossy(&body),
        "no file nope in release 1.2.0 on this gateway\n"
    );

    // The script names the gateway it came from, when the Host header is a plain name, and
    // the two pins of its certificate; nothing else differs from the source.
    let (status, _, body) = curl(&s, &[], "/install.sh");
    assert_eq!(status, 200);
    let script = String::from_utf8(body).unwrap();
    let pins = [
        (format!("served_pin='{}'\n", s.gw.pin), "served_pin=''\n"),
        (
            format!("served_pubkey_pin='{}'\n", s.gw.curl_pin),
            "served_pubkey_pin=''\n",
        ),
    ];
    let unserve = |mut script: String| {
        for (served, source) in &pins {
            assert!(script.contains(served.as_str()), "{served}");
            script = script.replace(served.as_str(), source);
        }
        script
    };
    let gateway = format!("served_gateway='localhost:{}'\n", s.gw.port());
    assert!(script.contains(&gateway));
    assert_eq!(
        unserve(script).replace(&gateway, "served_gateway=''\n"),
        read(&script_source())
    );
    let (_, _, body) = curl(&s, &["-H", "Host: x';reboot;'"], "/install.sh");
    assert_eq!(
        unserve(String::from_utf8(body).unwrap()),
        read(&script_source())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_url_is_the_scripts_default_gateway() {
    let s = setup(&["--public-url", "https://gw.example.com:9443/"]);
    let script = String::from_utf8(s.fetch_script()).unwrap();
    assert!(script.contains("served_gateway='gw.example.com:9443'\n"));
    // A URL that is not https://HOST[:PORT] is refused at start, saying why.
    let dir = tempdir();
    let out = Command::new("timeout")
        .arg("30")
        .arg(bin("outpost-gateway"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--public-url",
            "http://gw.example.com",
            "--data-dir",
        ])
        .arg(dir.path().join("gw"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("must start with https://"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ------------------------------------------------------------- Debian chroot, end to end

impl Drop for Chroot {
    fn drop(&mut self) {
        // Before the tree is removed (lazily: a process of the test may still be there).
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.root.join("proc"))
            .status();
    }
}

/// A gateway on 127.0.0.1 with a CA-issued certificate for `localhost`, the dist
/// directory published as its release, a check that runs everywhere and says which user
/// ran it, and a Debian chroot that trusts the CA (at /root/gateway-ca.pem) and resolves
/// localhost.
struct Chroot {
    dir: tempfile::TempDir,
    gw: Gateway,
    root: PathBuf,
    agent_bin: PathBuf,
    releases: PathBuf,
    version: String,
}

impl Chroot {
    fn new(gateway_args: &[&str]) -> Chroot {
        let dist = dist_dir();
        let agent_bin = dist.join(X86);
        assert!(
            agent_bin.exists() && dist.join("VERSION").exists(),
            "{} is missing: run ci/dist first (or set OUTPOST_DIST_DIR)",
            agent_bin.display()
        );
        let version = read(&dist.join("VERSION")).trim().to_string();

        let dir = tempdir();
        let (ca, cert, key) = test_pki(&dir.path().join("pki"), "localhost");
        // The release as the gateway's operator publishes it: a copy of the dist directory.
        let releases = dir.path().join("releases");
        std::fs::create_dir_all(releases.join(&version)).unwrap();
        for e in std::fs::read_dir(&dist).unwrap().flatten() {
            if e.path().is_file() {
                std::fs::copy(e.path(), releases.join(&version).join(e.file_name())).unwrap();
            }
        }
        let (cert, key, rel) = (
            cert.display().to_string(),
            key.display().to_string(),
            releases.display().to_string(),
        );
        let mut args = vec![
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--releases-dir",
            &rel,
        ];
        args.extend_from_slice(gateway_args);
        let gw = Gateway::start(dir.path(), &args);
        gw.write_checks(
            "c.toml",
            "[[check]]\nname = \"from-chroot\"\ncommand = [\"/bin/sh\", \"-c\", \"echo OK - debian $(cat /etc/debian_version) as $(id -un)\"]\ninterval = 1\n",
        );
        // Signed with the test key, which the chroot gets beside the CA.
        sign(&releases, TEST_SEED);
        let root = dir.path().join("debian");
        outpost_e2e::debian::unpack_chroot(&root);
        // The chroot shares the network namespace; the gateway's name is localhost.
        std::fs::write(root.join("etc/hosts"), "127.0.0.1 localhost\n").unwrap();
        std::fs::copy(&ca, root.join("root/gateway-ca.pem")).unwrap();
        std::fs::write(
            root.join("root/release-key.pub"),
            public_key_text(TEST_SEED),
        )
        .unwrap();
        // /proc, as on a host: start-stop-daemon finds processes there, and the agent its
        // own binary (/proc/self/exe) when it updates itself. Unmounted on drop.
        let mounted = Command::new("timeout")
            .args(["60", "mount", "-t", "proc", "proc"])
            .arg(root.join("proc"))
            .status()
            .unwrap();
        assert!(mounted.success(), "cannot mount /proc in the chroot");
        Chroot {
            dir,
            gw,
            root,
            agent_bin,
            releases,
            version,
        }
    }

    /// The uid and gid of `user` in the chroot.
    fn account(&self, user: &str) -> (u32, u32) {
        read(&self.root.join("etc/passwd"))
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.len() > 3 && f[0] == user)
                    .then(|| (f[2].parse().unwrap(), f[3].parse().unwrap()))
            })
            .unwrap_or_else(|| panic!("no {user} in the chroot's /etc/passwd"))
    }

    /// Run `line` with /bin/sh inside the chroot; returns (success, stdout, stderr).
    fn sh(&self, line: &str) -> (bool, String, String) {
        let out = Command::new("timeout")
            .arg("300")
            .arg("chroot")
            .arg(&self.root)
            .args(["/bin/sh", "-c", line])
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into(),
            String::from_utf8_lossy(&out.stderr).into(),
        )
    }

    /// The one-liner, trusting the gateway by the CA, with `args` after `sh -s --` (and
    /// the test release key: Debian's openssl, 3.0, checks the release's signature).
    fn curl_pipe_sh(&self, args: &str) -> (bool, String, String) {
        self.sh(&format!(
            "curl -fsSL --cacert /root/gateway-ca.pem https://localhost:{}/install.sh | sh -s -- {args} --release-key /root/release-key.pub",
            self.gw.port()
        ))
    }
}

/// The real, effective, saved and file-system uids and gids of process `pid`, and its
/// effective capabilities (hex), from /proc.
fn credentials(pid: i32) -> (Vec<u32>, Vec<u32>, String) {
    let status = read(Path::new(&format!("/proc/{pid}/status")));
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
            .trim()
            .to_string()
    };
    let ids = |name: &str| -> Vec<u32> {
        field(name)
            .split_whitespace()
            .map(|n| n.parse().unwrap())
            .collect()
    };
    (ids("Uid:"), ids("Gid:"), field("CapEff:"))
}

/// Kills a process group (the agent started in the chroot, and any trial child of a
/// self-update it has), should the test end early.
struct ProcessGroup(i32);

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: signalling a process group this test started.
        unsafe {
            libc::kill(-self.0, libc::SIGKILL);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_pipe_sh_in_a_debian_chroot_installs_an_agent_that_reports() {
    // Short sessions, so that the agent hears of the release offered below within seconds.
    let c = Chroot::new(&["--max-session", "4"]);
    let (gw, chroot, agent_bin, dir) = (&c.gw, &c.root, &c.agent_bin, &c.dir);
    let (ok, said, err) = c.curl_pipe_sh(&format!(
        "--key {} --ca /root/gateway-ca.pem",
        gw.enroll_key
    ));
    assert!(ok, "install in the chroot:\n{said}\n{err}");
    assert!(said.contains("Start the agent yourself"), "{said}");
    assert!(
        said.contains(&format!("verified {X86}"))
            && said.contains("against the signed release manifest"),
        "{said}"
    );
    // The command to run, as the script printed it: util-linux's setpriv makes the agent
    // the outpost user in the same process.
    let command = "setpriv --reuid=outpost --regid=outpost --init-groups /opt/outpost/bin/outpost-agent run --config /etc/outpost/agent.toml";
    assert!(said.contains(command), "{said}");
    // Debian's useradd made the agent's user: a system account that cannot log in.
    let (uid, gid) = c.account("outpost");
    assert!(uid > 0 && uid < 1000, "outpost has uid {uid}");
    assert!(
        said.contains(&format!("created the system user outpost (uid {uid})")),
        "{said}"
    );
    let passwd = read(&chroot.join("etc/passwd"));
    assert!(
        passwd.contains(&format!(
            "outpost:x:{uid}:{gid}:Outpost monitoring agent:/opt/outpost/state:/usr/sbin/nologin\n"
        )),
        "{passwd}"
    );
    assert_eq!(
        std::fs::read(chroot.join("opt/outpost/bin/outpost-agent")).unwrap(),
        std::fs::read(agent_bin).unwrap(),
        "the installed agent is the dist build"
    );

    // Start the agent as the script said, in a process group of its own.
    let log = dir.path().join("chroot-agent.log");
    let stdout_path = dir.path().join("chroot-agent.out");
    let mut argv = vec![chroot.display().to_string()];
    argv.extend(command.split(' ').map(str::to_string));
    let child = Command::new("chroot")
        .args(&argv)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_path).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .process_group(0)
        .spawn()
        .unwrap();
    let agent = Proc {
        child,
        stderr_path: log,
    };
    let _group = ProcessGroup(agent.pid());
    let fingerprint = eventually(T, "the agent prints its fingerprint", || async {
        std::fs::read_to_string(&stdout_path)
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("fingerprint ").map(str::to_string))
    })
    .await;
    let result = eventually(
        Duration::from_secs(60),
        "a result from the chroot agent",
        || gw.latest(&fingerprint, "from-chroot"),
    )
    .await;
    assert_eq!(result["status"], "ok", "{result}\n{}", agent.log());
    // The plugin ran as outpost.
    let output = result["output"].as_str().unwrap_or("").to_string();
    assert!(
        output.starts_with("OK - debian 12") && output.ends_with(" as outpost"),
        "{result}"
    );
    // So does the agent: every uid and gid is outpost's, and it holds no capability.
    let (uids, gids, caps) = credentials(agent.pid());
    eprintln!("agent: uids {uids:?}, gids {gids:?}, CapEff {caps}; its plugin said {output:?}");
    assert_eq!(uids, [uid; 4], "the agent's uids");
    assert_eq!(gids, [gid; 4], "the agent's gids");
    assert_eq!(caps, "0000000000000000", "the agent's capabilities");
    // Its identity is its own, in root's sticky /etc/outpost.
    let secret = chroot.join("etc/outpost/agent.secret");
    assert_eq!((mode(&secret), owner(&secret)), (0o600, (uid, gid)));
    let finger = chroot.join("etc/outpost/agent.finger");
    assert_eq!((mode(&finger), owner(&finger)), (0o600, (uid, gid)));
    assert_layout(chroot, uid, gid, "debian");

    // A self-update, run by that user: the release is offered, and the agent downloads
    // and verifies it, writes it beside its binary, keeps the old one, tries the new one
    // as a child and execs it. ci/dist builds one version, so version 99.0.0 here is the
    // same build published under a higher number: every step of the update runs, only
    // the code it ends up running is the same (tests/tests/update.rs updates to a build
    // that is really another version, as root).
    let next = c.releases.join("99.0.0");
    std::fs::create_dir_all(&next).unwrap();
    std::fs::copy(agent_bin, next.join(X86)).unwrap();
    sign(&c.releases, TEST_SEED);
    // The key the releases are signed with, installed by root where the agent looks.
    let update_key = chroot.join("etc/outpost/update-key.pub");
    std::fs::write(&update_key, public_key_text(TEST_SEED)).unwrap();
    std::fs::set_permissions(&update_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let rollout = c.releases.join("rollout.toml");
    std::fs::write(&rollout, "version = \"99.0.0\"\npercent = 100\n").unwrap();
    let v = &c.version;
    // The first `outpost.update` result that says `needle`, or one that is not OK (a
    // refusal or a rollback, which fails the test at once with its reason).
    let fp = &fingerprint;
    let update_result = |needle: String| async move {
        let all = gw.bus_results(fp, "outpost.update");
        let found = all.iter().find(|r| r["status"] != "ok").or_else(|| {
            all.iter()
                .find(|r| r["output"].as_str().unwrap_or("").contains(&needle))
        });
        found.map(|r| r.to_string())
    };
    let trial = eventually(Duration::from_secs(60), "the new binary on trial", || {
        update_result(format!("running {v} on trial (updating from {v})"))
    })
    .await;
    assert!(trial.contains("on trial"), "{trial}\n{}", agent.log());
    // Offered once: the binary that took over reports the same version, and would be
    // offered 99.0.0 again.
    std::fs::remove_file(&rollout).unwrap();
    let updated = format!("updated from {v} to {v}");
    let done = eventually(Duration::from_secs(120), "the update done", || {
        update_result(updated.clone())
    })
    .await;
    assert!(done.contains(&updated), "{done}\n{}", agent.log());
    eprintln!("{trial}\n{done}");
    // The same process (exec), still outpost; what the update wrote is outpost's.
    assert_eq!(credentials(agent.pid()).0, [uid; 4]);
    let bin = chroot.join("opt/outpost/bin");
    for f in ["outpost-agent", "outpost-agent.previous"] {
        assert_eq!(owner(&bin.join(f)), (uid, gid), "{f}");
        assert_eq!(
            std::fs::read(bin.join(f)).unwrap(),
            std::fs::read(agent_bin).unwrap(),
            "{f}"
        );
    }
    let highest = chroot.join("opt/outpost/state/update/highest");
    assert_eq!(owner(&highest), (uid, gid));
    eventually(T, "results after the update", || async {
        let latest = gw.latest(&fingerprint, "from-chroot").await?;
        (latest["output"].as_str()?.ends_with(" as outpost")
            && latest["started_at_ms"].as_u64()? > now_ms() - 5_000)
            .then_some(())
    })
    .await;
}

/// Kills what the chroot's SysV script started, should the test end early.
struct PidFile(PathBuf);

impl Drop for PidFile {
    fn drop(&mut self) {
        if let Some(pid) = std::fs::read_to_string(&self.0)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            // SAFETY: signalling a process by pid.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sysv_script_runs_the_agent_in_a_debian_chroot_and_stops_it_with_a_bye() {
    let c = Chroot::new(&[]);
    let pidfile = PidFile(c.root.join("run/outpost-agent.pid"));
    let (ok, said, err) = c.curl_pipe_sh(&format!(
        "--key {} --ca /root/gateway-ca.pem --init sysv",
        c.gw.enroll_key
    ));
    assert!(ok, "install:\n{said}\n{err}");
    assert!(
        said.contains("started the outpost-agent service (SysV init)"),
        "{said}"
    );
    // Debian's real update-rc.d linked it into the runlevels.
    let linked = |root: &Path| {
        std::fs::read_dir(root.join("etc/rc2.d"))
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().contains("outpost-agent"))
    };
    assert!(linked(&c.root), "no /etc/rc2.d link");

    let log = c.root.join("var/log/outpost/agent.log");
    let fingerprint = eventually(T, "the service's agent logs its fingerprint", || async {
        std::fs::read_to_string(&log)
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("fingerprint ").map(str::to_string))
    })
    .await;
    let result = eventually(Duration::from_secs(60), "a result from the service", || {
        c.gw.latest(&fingerprint, "from-chroot")
    })
    .await;
    let (ok, status, _) = c.sh("/etc/init.d/outpost-agent status");
    assert!(ok && status.contains("is running"), "{status}");
    // Debian's start-stop-daemon made the agent the outpost user (the pid file is the
    // agent's own pid), and its plugin ran as outpost.
    let pid: i32 = read(&pidfile.0).trim().parse().unwrap();
    let (uids, gids, caps) = credentials(pid);
    let output = result["output"].as_str().unwrap_or("").to_string();
    eprintln!("agent: uids {uids:?}, gids {gids:?}, CapEff {caps}; its plugin said {output:?}");
    assert!(
        uids[0] != 0 && output.ends_with(" as outpost"),
        "the agent runs as uid {uids:?} (capabilities {caps}); its plugin said {output:?}"
    );
    let (uid, gid) = c.account("outpost");
    assert_eq!(uids, [uid; 4], "the agent's uids");
    assert_eq!(gids, [gid; 4], "the agent's gids");
    assert_eq!(caps, "0000000000000000", "the agent's capabilities");
    assert_layout(&c.root, uid, gid, "debian, sysv");

    // Uninstall stops it through the script: SIGTERM, and the agent says bye.
    let (ok, said, err) = c.curl_pipe_sh("--uninstall --init sysv");
    assert!(ok, "uninstall:\n{said}\n{err}");
    let agent = eventually(T, "the agent deregistered", || async {
        c.gw.agent(&fingerprint)
            .await
            .filter(|a| a["presence"] == "deregistered")
    })
    .await;
    assert_eq!(agent["connected"], false);
    assert!(!pidfile.0.exists());
    assert!(!linked(&c.root), "rc2.d link left behind");
    assert!(!c.root.join("etc/init.d/outpost-agent").exists());
    assert!(!c.root.join("opt/outpost/bin/outpost-agent").exists());
    assert!(
        c.root.join("etc/outpost/agent.secret").exists(),
        "identity kept"
    );
}
