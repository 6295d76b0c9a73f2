//! Faults for the chaos tests (tests/tests/chaos.rs): a network namespace joined to this
//! one by a veth pair (impaired with nftables, cut and healed), small tmpfs disks to
//! fill, a clock an agent reads through libfaketime, a ledger the checks write outside
//! the system under test, and the memory and file descriptors of a process.
//!
//! Everything here changes the machine (namespaces, qdiscs, mounts): the tests run as
//! root, and each object undoes itself when dropped.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Run `argv`, panicking with its stderr if it fails.
pub fn run(argv: &[&str]) {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    assert!(
        out.status.success(),
        "{argv:?}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// A network namespace with one veth link to this one: `host_ip` on this side,
/// `ns_ip` inside (a /30 of their own). Deleted, with its link, when dropped.
pub struct Netns {
    pub name: String,
    host_if: String,
    ns_if: String,
    pub host_ip: String,
    pub ns_ip: String,
}

impl Netns {
    /// `tag` (a few characters) names the namespace and its link; `subnet` (0..4) picks
    /// its 10.203.x.0/30 among this process's (each test process has its own four, by
    /// pid, so two runs at once do not share addresses).
    pub fn create(tag: &str, subnet: u8) -> Netns {
        let subnet = (std::process::id() % 60) as u8 * 4 + subnet % 4;
        sweep_stale();
        let name = format!("outpost-{tag}-{}", std::process::id());
        // (Interface names are at most 15 bytes.)
        let host_if = format!("oc{tag}h{}", std::process::id() % 100_000);
        let ns_if = format!("oc{tag}n{}", std::process::id() % 100_000);
        let (host_ip, ns_ip) = (format!("10.203.{subnet}.1"), format!("10.203.{subnet}.2"));
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(&["ip", "netns", "add", &name]);
        let ns = Netns {
            name,
            host_if,
            ns_if,
            host_ip,
            ns_ip,
        };
        run(&[
            "ip",
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns.ns_if,
            "netns",
            &ns.name,
        ]);
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{}/30", ns.host_ip),
            "dev",
            &ns.host_if,
        ]);
        run(&["ip", "link", "set", &ns.host_if, "up"]);
        ns.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{}/30", ns.ns_ip),
            "dev",
            &ns.ns_if,
        ]);
        ns.exec(&["ip", "link", "set", &ns.ns_if, "up"]);
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Run `argv` inside the namespace.
    pub fn exec(&self, argv: &[&str]) {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(argv);
        run(&full);
    }

    /// The prefix that runs a command inside the namespace (it `exec`s it: same pid).
    pub fn wrapper(&self) -> Vec<String> {
        ["ip", "netns", "exec", &self.name]
            .map(String::from)
            .to_vec()
    }

    /// Impair the link both ways: lose `loss` and duplicate `dup` per mille of the
    /// packets, at random, and delay a quarter of them behind a slow queue, which
    /// reorders them too (replacing any impairment before). This kernel has no `netem`
    /// (`CONFIG_NET_SCH_NETEM` is not set), so: loss and duplication are nftables rules
    /// on each end's egress (`numgen random`, then `drop` or `dup to` the same device);
    /// delay and reordering are an HTB qdisc whose classifier is a classic-BPF program
    /// sending a random quarter of the packets (`ld rand`) to a class limited to
    /// 256 kbit/s, so they wait behind each other (hundreds of ms under load) while the
    /// rest pass them.
    pub fn impair(&self, loss: u32, dup: u32) {
        self.rules(&format!(
            "numgen random mod 1000 < {loss} drop\nnumgen random mod 1000 < {dup} dup to \"{{dev}}\""
        ));
        for (dev, inside) in [(&self.host_if, false), (&self.ns_if, true)] {
            // `tc` with `args` (words; `DEV` the device; `_` a space within one word).
            let tc = |args: &str| {
                let mut argv: Vec<String> = Vec::new();
                if inside {
                    argv.extend(["ip", "netns", "exec", &self.name].map(String::from));
                }
                argv.push("tc".into());
                argv.extend(args.split_whitespace().map(|a| {
                    if a == "DEV" {
                        dev.clone()
                    } else {
                        a.replace('_', " ")
                    }
                }));
                run(&argv.iter().map(String::as_str).collect::<Vec<_>>());
            };
            tc("qdisc replace dev DEV root handle 1: htb default 10");
            tc("class replace dev DEV parent 1: classid 1:10 htb rate 10gbit");
            tc("class replace dev DEV parent 1: classid 1:20 htb rate 256kbit ceil 256kbit");
            tc("qdisc replace dev DEV parent 1:20 handle 20: pfifo limit 100");
            // ld rand; jge #(3/4 of 2^32) → class 1:20 (0x10020), else 1:10 (0x10010).
            tc(
                "filter replace dev DEV parent 1: protocol all prio 1 handle 1 bpf bytecode \
                4,32_0_0_4294963256,53_0_1_3221225472,6_0_0_65568,6_0_0_65552",
            );
        }
    }

    /// Every packet lost, both ways: a cut beyond the host (no carrier lost, no reset).
    pub fn blackhole(&self) {
        self.rules("drop");
    }

    /// `rules` (with `{dev}` for each end's device) in a table of their own on both ends'
    /// egress, replacing the ones before.
    fn rules(&self, rules: &str) {
        self.clear();
        for (dev, inside) in [(&self.host_if, false), (&self.ns_if, true)] {
            let script = format!(
                "table netdev chaos_{} {{\n chain out {{\n  type filter hook egress device \"{dev}\" priority 0;\n  {}\n }}\n}}\n",
                self.host_if,
                rules.replace("{dev}", dev)
            );
            nft_script(inside.then_some(self.name.as_str()), &script);
        }
    }

    /// Take every impairment away.
    pub fn clear(&self) {
        let _ = Command::new("tc")
            .args(["qdisc", "del", "dev", &self.host_if, "root"])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "exec", &self.name, "tc", "qdisc", "del", "dev"])
            .args([&self.ns_if, "root"])
            .output();
        let _ = Command::new("nft")
            .args([
                "delete",
                "table",
                "netdev",
                &format!("chaos_{}", self.host_if),
            ])
            .output();
        let _ = Command::new("ip")
            .args([
                "netns", "exec", &self.name, "nft", "delete", "table", "netdev",
            ])
            .arg(format!("chaos_{}", self.host_if))
            .output();
    }

    /// Route everything through the link (a default route via this side), so the
    /// namespace reaches any address of this one, not only the link's.
    pub fn route_default(&self) {
        self.exec(&["ip", "route", "replace", "default", "via", &self.host_ip]);
    }

    /// Connections from inside the namespace to TCP port `port` refused at once (a
    /// reset), as if whatever listens there were down from here only; `None`: allowed
    /// again.
    pub fn refuse_port(&self, port: Option<u16>) {
        let _ = Command::new("ip")
            .args([
                "netns", "exec", &self.name, "nft", "delete", "table", "inet",
            ])
            .arg("refuse")
            .output();
        if let Some(port) = port {
            nft_script(
                Some(&self.name),
                &format!(
                    "table inet refuse {{\n chain out {{\n  type filter hook output priority 0;\n  tcp dport {port} reject with tcp reset\n }}\n}}\n"
                ),
            );
        }
    }

    /// The link down (`false`) or up again (`true`).
    pub fn link(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        run(&["ip", "link", "set", &self.host_if, state]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.clear();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
    }
}

/// Namespaces (and their links) left by a test process that no longer runs (killed
/// before its drops ran): named `outpost-<tag>-<pid>`.
fn sweep_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(pid) = name
            .strip_prefix("outpost-")
            .and_then(|rest| rest.rsplit('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

/// A tmpfs of `mib` MiB mounted at `at`, unmounted when dropped.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(at: &Path, mib: u64) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let size = format!("size={mib}m,mode=0700");
        run(&[
            "mount",
            "-t",
            "tmpfs",
            "-o",
            &size,
            "tmpfs",
            &at.display().to_string(),
        ]);
        Tmpfs(at.to_path_buf())
    }

    /// Fill it with a file until the disk is full; returns the file.
    pub fn fill(&self) -> PathBuf {
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 16 * 1024];
        while f.write_all(&chunk).is_ok() {}
        // Whatever fits of a last partial chunk, to the last byte.
        while f.write_all(&[0]).is_ok() {}
        let _ = f.sync_all();
        path
    }

    /// Space again.
    pub fn free(&self) {
        let _ = std::fs::remove_file(self.0.join("filler"));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A process cut off from some TCP ports on loopback, both ways (a NATS node from its
/// peers' routes, while its clients still reach it): the process is moved into a cgroup
/// of its own and nftables drops what its sockets send to those ports or from `own`,
/// and whatever anyone sends to `own`. Healed when dropped.
pub struct Partition {
    cgroup: PathBuf,
    table: String,
}

impl Partition {
    pub fn isolate(pid: i32, own: u16, peers: &[u16]) -> Partition {
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
        let root = mounts
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
            })
            .expect("a cgroup2 hierarchy is mounted");
        let name = format!("outpost-chaos-{}-{pid}", std::process::id());
        let cgroup = root.join(&name);
        std::fs::create_dir_all(&cgroup).unwrap();
        std::fs::write(cgroup.join("cgroup.procs"), pid.to_string()).unwrap();
        // nft names a cgroup by its path under /sys/fs/cgroup; level 1 is a child of the
        // hierarchy's root, wherever that is mounted.
        let path = cgroup
            .strip_prefix("/sys/fs/cgroup")
            .expect("cgroup2 under /sys/fs/cgroup")
            .display()
            .to_string();
        let table = format!("chaos_part_{}_{pid}", std::process::id());
        let peers: Vec<String> = peers.iter().map(u16::to_string).collect();
        let script = format!(
            "table inet {table} {{\n chain out {{\n  type filter hook output priority 0;\n  \
             socket cgroupv2 level 1 \"{path}\" tcp dport {{ {peers} }} drop\n  \
             socket cgroupv2 level 1 \"{path}\" tcp sport {own} drop\n  \
             tcp dport {own} drop\n }}\n}}\n",
            peers = peers.join(", ")
        );
        nft_script(None, &script);
        Partition { cgroup, table }
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.table])
            .output();
        // Back to the root cgroup, if it still runs, so the cgroup can go.
        if let Ok(pids) = std::fs::read_to_string(self.cgroup.join("cgroup.procs")) {
            let root = self.cgroup.parent().unwrap().join("cgroup.procs");
            for pid in pids.lines() {
                let _ = std::fs::write(&root, pid);
            }
        }
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

/// Load an nftables script, in network namespace `netns` or this one.
fn nft_script(netns: Option<&str>, script: &str) {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "nft", "-f", "-"]);
            c
        }
        None => {
            let mut c = Command::new("nft");
            c.args(["-f", "-"]);
            c
        }
    };
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("nft (ci/setup installs nftables)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "nft -f:\n{script}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// libfaketime (Debian's `faketime`), which the clock-jump fault preloads into an agent.
pub const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// The wall clock of the processes started under [`FakeClock::wrapper`]: this machine's,
/// moved by an offset the test changes while they run (reread at every clock read). The
/// monotonic clock is left alone, as an NTP step leaves it.
pub struct FakeClock {
    file: PathBuf,
}

impl FakeClock {
    pub fn new(dir: &Path) -> FakeClock {
        let clock = FakeClock {
            file: dir.join("faketime"),
        };
        clock.set(0);
        clock
    }

    /// Move the clock to `offset_secs` from the real one (a jump, either way).
    pub fn set(&self, offset_secs: i64) {
        let tmp = self.file.with_extension("tmp");
        std::fs::write(&tmp, format!("{offset_secs:+}\n")).unwrap();
        std::fs::rename(&tmp, &self.file).unwrap();
    }

    /// `env` with the variables that make libfaketime follow this clock (it `exec`s the
    /// command: same pid).
    pub fn wrapper(&self) -> Vec<String> {
        vec![
            "env".into(),
            format!("LD_PRELOAD={LIBFAKETIME}"),
            format!("FAKETIME_TIMESTAMP_FILE={}", self.file.display()),
            "FAKETIME_NO_CACHE=1".into(),
            "FAKETIME_DONT_FAKE_MONOTONIC=1".into(),
        ]
    }
}

/// The resident memory (KiB) and open file descriptors of process `pid`, if it runs.
pub fn usage(pid: i32) -> Option<(u64, usize)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    Some((rss, fds))
}

/// Seconds since boot, from `/proc/uptime`: a clock no fault here moves, which the
/// ledger's plugin reads too.
pub fn uptime() -> f64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .expect("/proc/uptime")
}

/// A check plugin that writes a line to the ledger for every run before it reports:
/// `<run id> <agent> <check> <uptime at the end>`, and prints `OK - run <run id>`
/// (and 16 KiB of long output while a file `big` is beside the ledger).
pub fn ledger_plugin(dir: &Path, ledger: &Path) -> PathBuf {
    let path = dir.join("ledger-plugin");
    let big = ledger.with_file_name("big");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\n\
             id=$(cat /proc/sys/kernel/random/uuid)\n\
             # (One short line, appended: atomic among concurrent runs.)\n\
             echo \"$id $1 $2 $(cut -d' ' -f1 /proc/uptime)\" >> {ledger:?}\n\
             echo \"OK - run $id\"\n\
             # (While the file `big` is beside the ledger: 16 KiB more, as long output.)\n\
             if [ -e {big:?} ]; then head -c 12000 /dev/zero | base64; fi\n"
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// One run the ledger recorded.
#[derive(Debug, Clone)]
pub struct Run {
    pub id: String,
    pub agent: String,
    pub check: String,
    /// [`uptime`] when the plugin was about to report.
    pub at: f64,
}

/// Every complete line of the ledger.
pub fn read_ledger(ledger: &Path) -> Vec<Run> {
    let text = std::fs::read_to_string(ledger).unwrap_or_default();
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some(Run {
                id: f.next()?.to_string(),
                agent: f.next()?.to_string(),
                check: f.next()?.to_string(),
                at: f.next()?.parse().ok()?,
            })
        })
        .collect()
}

/// A small deterministic random source (SplitMix64), so a failing schedule repeats from
/// its seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}
