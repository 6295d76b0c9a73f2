//! Faults the product must live through, with the real binaries, audited at the end:
//! every result the agent made is on the bus exactly once.
//!
//! - The gateway's disk full under its bus (a small tmpfs the test mounts as its data
//!   directory): the agent keeps running its checks and keeps their results; the gateway
//!   says so, stores nothing and acks nothing it could not store; when space returns,
//!   every result arrives, once.
//! - The gateway's log unwritable (stderr on `/dev/full`): it goes on storing results.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use outpost_e2e::chaos::Tmpfs;
use outpost_e2e::{eventually, now_ms, tempdir, Agent, Gateway};

/// The agent's results on the bus: seq → how many times.
fn audit(gw: &Gateway, fingerprint: &str) -> BTreeMap<u64, usize> {
    let mut seen = BTreeMap::new();
    for r in gw.bus_all(fingerprint) {
        *seen.entry(r["seq"].as_u64().unwrap()).or_insert(0) += 1;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateways_disk_full_under_its_bus_loses_nothing_and_doubles_nothing() {
    let dir = tempdir();
    // (Its data directory: the log is written beside it, so the test can read it.)
    let disk = Tmpfs::mount(&dir.path().join("gateway"), 8);
    let gw = Gateway::start(dir.path(), &[]);
    std::fs::write(
        gw.checks_dir.join("tick.toml"),
        // (Outputs of 3 KiB: each result takes a page of the tmpfs of its own, so the
        // slack of a page already given to the bus's file cannot hide a full disk.)
        format!(
            "[[check]]\nname = \"tick\"\ncommand = [\"/bin/echo\", \"OK - {}\"]\ninterval = \"1s\"\n",
            "x".repeat(3000)
        ),
    )
    .unwrap();
    // (Its reconnects back off to 5 s at most: the gateway turns it away while it cannot
    // store, and recovery is then bounded by that.)
    let agent = Agent::start(dir.path(), "a1", &gw, "reconnect_max_secs = 5\n");
    let fp = agent.fingerprint.clone();
    eventually(Duration::from_secs(30), "results on the bus", || async {
        (gw.bus_results(&fp, "tick").len() >= 3).then_some(())
    })
    .await;

    // The disk full: nothing more can be stored.
    let filler = disk.fill();
    let full_from = now_ms();
    let stored_when_full = audit(&gw, &fp).len();
    // The agent goes on running its checks (results keep their run time), and the
    // gateway stores nothing: what the bus holds stays as it was (a line being written
    // as the disk filled may still land).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let during = audit(&gw, &fp).len();
    assert!(
        during <= stored_when_full + 2,
        "nothing stored while the disk is full: {stored_when_full} then {during}"
    );
    let log = std::fs::read_to_string(dir.path().join("gateway.log")).unwrap();
    assert!(
        log.contains("embedded bus could not store results"),
        "the gateway says it cannot store"
    );
    let full_to = now_ms();

    // Space again: every result arrives, each once, with no gap in the agent's numbers.
    std::fs::remove_file(&filler).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let seen = loop {
        let seen = audit(&gw, &fp);
        let ran_while_full = gw
            .bus_results(&fp, "tick")
            .iter()
            .filter(|r| {
                let at = r["started_at_ms"].as_u64().unwrap();
                (full_from + 1000..full_to).contains(&at)
            })
            .count();
        if ran_while_full >= 3 {
            break seen;
        }
        if tokio::time::Instant::now() > deadline {
            // The log's warnings and errors, and its last lines.
            let tail = |p: PathBuf| {
                let t = std::fs::read_to_string(p).unwrap_or_default();
                let lines: Vec<&str> = t.lines().collect();
                let mut shown: Vec<&str> = lines
                    .iter()
                    .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("panicked"))
                    .take(30)
                    .copied()
                    .collect();
                shown.push("…");
                shown.extend(lines.iter().rev().take(15).rev());
                shown.join("\n")
            };
            panic!(
                "the results held back did not arrive ({} stored, {ran_while_full} run while full)\n\
                 gateway:\n{}\nagent:\n{}",
                seen.len(),
                tail(dir.path().join("gateway.log")),
                tail(dir.path().join("a1.log"))
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let highest = *seen.keys().last().unwrap();
    let doubled: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "results stored twice: {doubled:?}");
    let missing: Vec<u64> = (1..=highest).filter(|s| !seen.contains_key(s)).collect();
    assert!(
        missing.is_empty(),
        "results lost: {missing:?} of 1..={highest}"
    );
    drop(agent);
    drop(gw);
}

/// A log line that cannot be written must not take the thread that logged it down (the
/// logging library's own report of the failure is an `eprintln!`, which panics): with its
/// stderr on `/dev/full`, a gateway still welcomes an agent and stores its results.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_cannot_write_its_log_still_stores_results() {
    let dir = tempdir();
    let gw = Gateway::start_wrapped(
        dir.path(),
        "127.0.0.1:0",
        &["sh", "-c", "exec \"$0\" \"$@\" 2>/dev/full"],
        &[],
    );
    std::fs::write(
        gw.checks_dir.join("tick.toml"),
        "[[check]]\nname = \"tick\"\ncommand = [\"/bin/echo\", \"OK - tick\"]\ninterval = \"1s\"\n",
    )
    .unwrap();
    let agent = Agent::start(dir.path(), "a1", &gw, "");
    let fp = agent.fingerprint.clone();
    eventually(Duration::from_secs(30), "results stored", || async {
        (gw.bus_results(&fp, "tick").len() >= 5).then_some(())
    })
    .await;
}

/// How long the combined runs inject faults: `OUTPOST_CHAOS_SECS` (the soak command sets
/// it), 100 s by default.
fn chaos_secs() -> u64 {
    std::env::var("OUTPOST_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100)
}

/// The schedule's seed: `OUTPOST_CHAOS_SEED` to repeat a run, else a new one (printed).
fn chaos_seed() -> u64 {
    let seed = std::env::var("OUTPOST_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| now_ms() ^ u64::from(std::process::id()) << 32);
    println!("chaos seed {seed} (OUTPOST_CHAOS_SEED={seed} repeats this schedule)");
    seed
}

/// Move `dir/name.log` aside before a process is started again under the same name (the
/// harness starts each process with a fresh log).
fn keep_log(dir: &std::path::Path, name: &str, life: usize) {
    let _ = std::fs::rename(
        dir.join(format!("{name}.log")),
        dir.join(format!("{name}.log.{life}")),
    );
}

/// Peak and latest resident memory (KiB) and file descriptors of one process across its
/// lives, and its steady level (taken once the run had warmed up, before any fault).
#[derive(Default, Debug)]
struct Usage {
    steady: Option<(u64, usize)>,
    peak: (u64, usize),
    last: (u64, usize),
}

impl Usage {
    fn sample(&mut self, pid: i32) {
        if let Some((rss, fds)) = outpost_e2e::chaos::usage(pid) {
            self.peak = (self.peak.0.max(rss), self.peak.1.max(fds));
            self.last = (rss, fds);
        }
    }

    /// Back to its steady level: file descriptors within a few of it (sessions being
    /// replaced), memory within half again or 32 MiB of it, whichever is more (allocator
    /// caches); a leak of either grows past that over a run.
    fn check(&self, who: &str) {
        let (rss, fds) = self.steady.expect("a steady level was taken");
        let (last_rss, last_fds) = self.last;
        assert!(
            last_fds <= fds + 6,
            "{who}: {last_fds} file descriptors at the end, {fds} when steady"
        );
        let allowed = (rss * 3 / 2).max(rss + 32 * 1024);
        assert!(
            last_rss <= allowed,
            "{who}: {last_rss} KiB resident at the end, {rss} KiB when steady"
        );
    }
}

/// The agents' side of a deployment, many faults at once, then an audit of every run.
///
/// A gateway (embedded bus) and two agents in a network namespace of their own, joined by
/// a veth link; each agent runs two checks a second whose plugin writes every run to a
/// ledger outside the system. For `OUTPOST_CHAOS_SECS`, rounds of one to four faults at
/// once, drawn from a seeded schedule: the link impaired (packets lost, duplicated,
/// delayed and reordered at random, with nftables and an HTB qdisc: this kernel has no
/// netem), cut (link down) or black-holed (every packet lost); the
/// first agent's disk full under its outbox; the second agent's wall clock jumped hours
/// forward or back (libfaketime; its monotonic clock untouched, as under an NTP step);
/// an agent or the gateway stopped (SIGSTOP, then SIGCONT) or killed (SIGKILL, then
/// started again). Then every fault is healed and the audit must find each run in the
/// ledger on the bus exactly once; the only runs allowed missing are those whose agent
/// was killed with SIGKILL before it could write them down (in the 2 s before the
/// kill or while it was dead), and those are counted. Memory and file descriptors of
/// every process must be back to their steady level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn combined_faults_on_the_agents_side_lose_nothing_and_double_nothing() {
    use outpost_e2e::chaos::{ledger_plugin, read_ledger, uptime, FakeClock, Netns, Rng};

    let secs = chaos_secs();
    let mut rng = Rng::new(chaos_seed());
    let tmp = tempdir();
    let dir = tmp.path();
    let ns = Netns::create("a", 1);
    let ledger = dir.join("ledger");
    let plugin = ledger_plugin(dir, &ledger);
    let listen = format!("{}:0", ns.host_ip);
    let mut gw = Gateway::start_on(dir, &listen, &[]);
    let listen = gw.addr.clone();
    let clock = FakeClock::new(dir);
    const NAMES: [&str; 2] = ["a1", "a2"];
    const CHECKS: [&str; 2] = ["l1", "l2"];
    // The first agent's state directory (its outbox) on a disk of its own.
    let disk = Tmpfs::mount(&dir.join("a1"), 16);
    let agent_toml = |gw: &Gateway, name: &str| {
        let checks = dir.join(format!("{name}-checks.d"));
        std::fs::create_dir_all(&checks).unwrap();
        let mut file = String::new();
        for c in CHECKS {
            file += &format!(
                "[[check]]\nname = {c:?}\ncommand = [{:?}, {name:?}, {c:?}]\ninterval = \"1s\"\n",
                plugin.display().to_string()
            );
        }
        std::fs::write(checks.join("ledger.toml"), file).unwrap();
        format!(
            "gateway_url = {:?}\nenroll_key = {:?}\npin_sha256 = {:?}\nhostname = {name:?}\n\
             reconnect_max_secs = 2\nchecks_dir = {:?}\n",
            gw.url(),
            gw.enroll_key,
            gw.pin,
            checks.display().to_string()
        )
    };
    let start_agent = |gw: &Gateway, i: usize| {
        let mut wrapper = ns.wrapper();
        if i == 1 {
            wrapper.extend(clock.wrapper());
        }
        let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
        Agent::start_wrapped(dir, NAMES[i], &agent_toml(gw, NAMES[i]), &wrapper)
    };
    let mut agents: Vec<Agent> = (0..2).map(|i| start_agent(&gw, i)).collect();
    let fps: Vec<String> = agents.iter().map(|a| a.fingerprint.clone()).collect();
    let mut lives = [1usize; 3];

    // The ledger's runs on the bus: run id → how many times; and every result's seq per
    // agent, to find any stored twice.
    let on_bus = |gw: &Gateway| {
        let mut runs: BTreeMap<String, usize> = BTreeMap::new();
        let mut doubled_seqs = Vec::new();
        for fp in &fps {
            let mut seqs = BTreeMap::new();
            for r in gw.bus_all(fp) {
                *seqs.entry(r["seq"].as_u64().unwrap()).or_insert(0usize) += 1;
                if let Some(id) = r["output"]
                    .as_str()
                    .and_then(|o| o.strip_prefix("OK - run "))
                {
                    *runs.entry(id.to_string()).or_insert(0) += 1;
                }
            }
            doubled_seqs.extend(seqs.into_iter().filter(|(_, n)| *n > 1));
        }
        (runs, doubled_seqs)
    };

    // Warm up, then take the steady level of every process.
    eventually(
        Duration::from_secs(60),
        "every agent's runs on the bus",
        || async {
            let (runs, _) = on_bus(&gw);
            let ledger = read_ledger(&ledger);
            NAMES
                .iter()
                .all(|n| {
                    ledger
                        .iter()
                        .filter(|r| &r.agent == n && runs.contains_key(&r.id))
                        .count()
                        >= 10
                })
                .then_some(())
        },
    )
    .await;
    let mut usage: [Usage; 3] = Default::default();
    let pids = |gw: &Gateway, agents: &[Agent]| {
        [gw.proc.pid(), agents[0].proc.pid(), agents[1].proc.pid()]
    };
    for _ in 0..5 {
        for (u, pid) in usage.iter_mut().zip(pids(&gw, &agents)) {
            u.sample(pid);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    for u in &mut usage {
        u.steady = Some(u.last);
    }

    // The faults, round by round.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Fault {
        Impair,
        LinkDown,
        Blackhole,
        DiskFull,
        ClockJump(i64),
        StopAgent(usize),
        KillAgent(usize),
        StopGateway,
        KillGateway,
    }
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    // (agent, uptime at its kill, uptime once started again)
    let mut kills: Vec<(&str, f64, f64)> = Vec::new();
    let end = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut rounds = 0u64;
    let mut disk_freed: Option<std::time::Instant> = None;
    while tokio::time::Instant::now() < end {
        let mut round = Vec::new();
        // The first rounds each have one kind of fault for certain (whatever the seed,
        // every kind is injected), the rest are drawn.
        let this = rounds;
        let sure = |kind: u64| this == kind;
        rounds += 1;
        match if sure(0) {
            0
        } else if sure(1) {
            1
        } else if sure(2) {
            2
        } else {
            rng.range(0, 5)
        } {
            0 => round.push(Fault::Impair),
            1 => round.push(Fault::LinkDown),
            2 => round.push(Fault::Blackhole),
            _ => {}
        }
        let disk_full = sure(3) || rng.range(0, 2) == 0;
        if disk_full {
            round.push(Fault::DiskFull);
        }
        if sure(4) || rng.range(0, 2) == 0 {
            let hours = rng.range(1, 6) as i64 * 3600;
            round.push(Fault::ClockJump(if rng.range(0, 1) == 0 {
                hours
            } else {
                -hours
            }));
        }
        match if sure(5) {
            0
        } else if sure(6) {
            1
        } else {
            rng.range(0, 4)
        } {
            0 => round.push(Fault::StopAgent(rng.range(0, 1) as usize)),
            // (Not the agent whose disk is full, nor was in the last seconds: what it
            // holds in memory then dies with it, the documented cost of a full disk.)
            1 => round.push(Fault::KillAgent(
                if disk_full || disk_freed.is_some_and(|t| t.elapsed() < Duration::from_secs(8)) {
                    1
                } else {
                    rng.range(0, 1) as usize
                },
            )),
            _ => {}
        }
        match if sure(7) {
            0
        } else if sure(8) {
            1
        } else {
            rng.range(0, 5)
        } {
            0 => round.push(Fault::StopGateway),
            1 => round.push(Fault::KillGateway),
            _ => {}
        }
        if round.is_empty() {
            round.push(Fault::Impair);
        }
        // The round that fills the first agent's disk for certain fills it alone: its
        // agent must go on delivering meanwhile (from memory), and say why.
        if sure(3) {
            round = vec![Fault::DiskFull];
        }
        let round_began = uptime();
        for f in &round {
            let kind = format!("{f:?}");
            let kind = kind.split('(').next().unwrap();
            *counts.entry(kind.to_string()).or_insert(0) += 1;
            match *f {
                Fault::Impair => ns.impair(150, 50),
                Fault::LinkDown => ns.link(false),
                Fault::Blackhole => ns.blackhole(),
                Fault::DiskFull => {
                    disk.fill();
                    // Results bigger than the outbox file's free pages can hold.
                    std::fs::write(dir.join("big"), "").unwrap();
                }
                Fault::ClockJump(by) => clock.set(by),
                Fault::StopAgent(i) => agents[i].proc.signal(libc::SIGSTOP),
                Fault::KillAgent(i) => {
                    agents[i].proc.signal(libc::SIGKILL);
                    kills.push((NAMES[i], uptime(), f64::MAX));
                }
                Fault::StopGateway => gw.proc.signal(libc::SIGSTOP),
                Fault::KillGateway => gw.proc.signal(libc::SIGKILL),
            }
        }
        let hold = rng.range(3, 8);
        for _ in 0..hold {
            for (u, pid) in usage.iter_mut().zip(pids(&gw, &agents)) {
                u.sample(pid);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        if sure(3) {
            eventually(
                Duration::from_secs(20),
                "the agent whose disk is full delivers runs made since, and says why if it \
                 could not write",
                || async {
                    let (runs, _) = on_bus(&gw);
                    let since = read_ledger(&ledger)
                        .into_iter()
                        .filter(|r| r.agent == "a1" && r.at > round_began + 1.0)
                        .filter(|r| runs.contains_key(&r.id))
                        .count();
                    // (Its outbox file may still have free pages: then it writes on, and
                    // has nothing to say.)
                    let failed = agents[0]
                        .proc
                        .log()
                        .contains("cannot commit results to the outbox");
                    let said = gw.bus_all(&fps[0]).iter().any(|r| {
                        r["check"] == outpost_agent::OUTBOX_CHECK
                            && r["status"] == "critical"
                            && r["output"]
                                .as_str()
                                .is_some_and(|o| o.contains("No space left on device"))
                    });
                    (since >= 2 && (said || !failed)).then_some(())
                },
            )
            .await;
        }
        for f in &round {
            match *f {
                Fault::Impair | Fault::Blackhole => ns.clear(),
                Fault::LinkDown => ns.link(true),
                Fault::DiskFull => {
                    disk.free();
                    let _ = std::fs::remove_file(dir.join("big"));
                    disk_freed = Some(std::time::Instant::now());
                }
                Fault::ClockJump(_) => clock.set(0),
                Fault::StopAgent(i) => agents[i].proc.signal(libc::SIGCONT),
                Fault::KillAgent(i) => {
                    let _ = agents[i].proc.wait_exit(Duration::from_secs(5)).await;
                    keep_log(dir, NAMES[i], lives[i + 1]);
                    lives[i + 1] += 1;
                    agents[i] = start_agent(&gw, i);
                    kills.last_mut().unwrap().2 = uptime();
                }
                Fault::StopGateway => gw.proc.signal(libc::SIGCONT),
                Fault::KillGateway => {
                    let _ = gw.proc.wait_exit(Duration::from_secs(5)).await;
                    keep_log(dir, "gateway", lives[0]);
                    lives[0] += 1;
                    gw = Gateway::start_on(dir, &listen, &[]);
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(rng.range(2, 4))).await;
    }
    println!("faults injected, by kind: {counts:?}");

    // Healed: every run up to now must arrive (or be one a kill took).
    let faults_ended = uptime();
    let excused = |run: &outpost_e2e::chaos::Run| {
        kills
            .iter()
            .any(|(agent, at, back)| *agent == run.agent && run.at >= at - 2.0 && run.at <= *back)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let (runs, ledger_runs) = loop {
        let ledger_runs: Vec<_> = read_ledger(&ledger)
            .into_iter()
            .filter(|r| r.at <= faults_ended)
            .collect();
        let (runs, _) = on_bus(&gw);
        let waiting = ledger_runs
            .iter()
            .filter(|r| !runs.contains_key(&r.id) && !excused(r))
            .count();
        if waiting == 0 {
            break (runs, ledger_runs);
        }
        if tokio::time::Instant::now() > deadline {
            let missing: Vec<_> = ledger_runs
                .iter()
                .filter(|r| !runs.contains_key(&r.id) && !excused(r))
                .take(20)
                .collect();
            panic!(
                "{waiting} runs never reached the bus (kills at {kills:?}), e.g. {missing:#?}\n\
                 (logs in {}: kept with OUTPOST_E2E_KEEP=1)",
                dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let lost_to_kills = ledger_runs
        .iter()
        .filter(|r| !runs.contains_key(&r.id))
        .count();
    let doubled: Vec<_> = runs.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "runs stored twice: {doubled:?}");
    let known: std::collections::BTreeSet<String> =
        read_ledger(&ledger).into_iter().map(|r| r.id).collect();
    let phantoms: Vec<_> = runs.keys().filter(|id| !known.contains(*id)).collect();
    assert!(
        phantoms.is_empty(),
        "results of runs the ledger never saw: {phantoms:?}"
    );
    // The first agent said its outbox failed, and that it writes again.
    let reports = || {
        gw.bus_all(&fps[0])
            .iter()
            .filter(|r| r["check"] == outpost_agent::OUTBOX_CHECK)
            .map(|r| r["status"].as_str().unwrap_or_default().to_string())
            .collect::<Vec<String>>()
    };
    // (When its disk refused a commit at all: its file may have had room throughout.)
    let failed = (1..=lives[1])
        .map(|life| {
            let name = if life == lives[1] {
                "a1.log".to_string()
            } else {
                format!("a1.log.{life}")
            };
            std::fs::read_to_string(dir.join(name)).unwrap_or_default()
        })
        .any(|log| log.contains("cannot commit results to the outbox"));
    let said = eventually(
        Duration::from_secs(30),
        "the outbox's failure and then its recovery reported",
        || async {
            let r = reports();
            let told = r.iter().any(|s| s == "critical") && r.last().is_some_and(|s| s == "ok");
            (told || (!failed && r.is_empty())).then_some(r)
        },
    )
    .await;
    println!("the first agent's outbox reports: {said:?}");
    let (_, doubled_seqs) = on_bus(&gw);
    assert!(
        doubled_seqs.is_empty(),
        "sequence numbers stored twice: {doubled_seqs:?}"
    );
    println!(
        "audited {} runs: lost 0, duplicated 0, in flight at {} SIGKILLs of an agent {lost_to_kills}",
        ledger_runs.len(),
        kills.len()
    );

    // Back to steady.
    tokio::time::sleep(Duration::from_secs(10)).await;
    for (u, pid) in usage.iter_mut().zip(pids(&gw, &agents)) {
        u.sample(pid);
    }
    for (u, who) in usage.iter().zip(["gateway", "a1", "a2"]) {
        println!(
            "{who}: steady {:?}, peak {:?}, end {:?} (KiB resident, file descriptors)",
            u.steady.unwrap(),
            u.peak,
            u.last
        );
        u.check(who);
    }
}

/// The bus's side of a fleet, many faults at once, then an audit of every run.
///
/// A JetStream cluster of three nats-servers, two gateways on it and an agent on each
/// gateway, each agent running two checks a second whose plugin writes every run to a
/// ledger. For `OUTPOST_CHAOS_SECS`, rounds of faults at once from a seeded schedule: a
/// NATS node killed (SIGKILL, then started again on its store), stopped (SIGSTOP, then
/// SIGCONT) or partitioned from the other nodes while its clients still reach it; a
/// gateway killed or stopped; an agent killed or stopped. One NATS node at a time (three
/// replicas keep a quorum through one). Then every fault is healed and the audit must
/// find each run on the bus exactly once (runs a killed agent had not written down
/// excepted, and counted), and memory and descriptors back to steady.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn combined_faults_on_a_nats_fleet_lose_nothing_and_double_nothing() {
    use outpost_e2e::chaos::{ledger_plugin, read_ledger, uptime, Partition, Rng};
    use outpost_e2e::fleet;
    use outpost_e2e::nats::NatsCluster;

    let secs = chaos_secs();
    let mut rng = Rng::new(chaos_seed());
    let tmp = tempdir();
    let dir = tmp.path();
    let mut cluster = NatsCluster::start(dir, 3);
    let urls = cluster.urls();
    let pki = fleet::pki(dir);
    let ledger = dir.join("ledger");
    let plugin = ledger_plugin(dir, &ledger);
    let ports = outpost_e2e::free_ports(2);
    const GWS: [&str; 2] = ["gw1", "gw2"];
    const NAMES: [&str; 2] = ["a1", "a2"];
    const CHECKS: [&str; 2] = ["l1", "l2"];
    let start_gw = |i: usize| {
        let listen = format!("127.0.0.1:{}", ports[i]);
        fleet::gateway_on(dir, GWS[i], &listen, Some(&urls), &pki, &[])
    };
    let mut gws: Vec<Gateway> = vec![start_gw(0), start_gw(1)];
    let enroll_key = gws[0].enroll_key.clone();
    let start_agent = |i: usize| {
        let name = NAMES[i];
        let checks = dir.join(format!("{name}-checks.d"));
        std::fs::create_dir_all(&checks).unwrap();
        let mut file = String::new();
        for c in CHECKS {
            file += &format!(
                "[[check]]\nname = {c:?}\ncommand = [{:?}, {name:?}, {c:?}]\ninterval = \"1s\"\n",
                plugin.display().to_string()
            );
        }
        std::fs::write(checks.join("ledger.toml"), file).unwrap();
        Agent::start_with_config(
            dir,
            name,
            &format!(
                "gateway_url = \"wss://localhost:{}\"\nenroll_key = {enroll_key:?}\nca_file = {:?}\n\
                 hostname = {name:?}\nreconnect_max_secs = 2\nchecks_dir = {:?}\n",
                ports[i],
                pki.ca.display().to_string(),
                checks.display().to_string()
            ),
        )
    };
    let mut agents: Vec<Agent> = (0..2).map(start_agent).collect();
    let fps: Vec<String> = agents.iter().map(|a| a.fingerprint.clone()).collect();
    let mut lives = [1usize; 4];

    // Run id → times on the bus, and sequence numbers stored twice.
    let on_bus = |all: &[outpost_e2e::Value]| {
        let mut runs: BTreeMap<String, usize> = BTreeMap::new();
        let mut seqs: BTreeMap<(String, u64), usize> = BTreeMap::new();
        for l in all {
            let fp = l["fingerprint"].as_str().unwrap_or_default().to_string();
            if !fps.contains(&fp) {
                continue;
            }
            let r = &l["result"];
            *seqs.entry((fp, r["seq"].as_u64().unwrap())).or_insert(0) += 1;
            if let Some(id) = r["output"]
                .as_str()
                .and_then(|o| o.strip_prefix("OK - run "))
            {
                *runs.entry(id.to_string()).or_insert(0) += 1;
            }
        }
        let doubled: Vec<_> = seqs.into_iter().filter(|(_, n)| *n > 1).collect();
        (runs, doubled)
    };
    eventually(
        Duration::from_secs(90),
        "every agent's runs on the bus",
        || async {
            let all = outpost_e2e::nats::stream_results(&urls).await?;
            let (runs, _) = on_bus(&all);
            let ledger = read_ledger(&ledger);
            NAMES
                .iter()
                .all(|n| {
                    ledger
                        .iter()
                        .filter(|r| &r.agent == n && runs.contains_key(&r.id))
                        .count()
                        >= 10
                })
                .then_some(())
        },
    )
    .await;
    let who = ["gw1", "gw2", "a1", "a2", "nats-0", "nats-1", "nats-2"];
    let mut usage: [Usage; 7] = Default::default();
    let pids = |gws: &[Gateway], agents: &[Agent], cluster: &NatsCluster| {
        [
            gws[0].proc.pid(),
            gws[1].proc.pid(),
            agents[0].proc.pid(),
            agents[1].proc.pid(),
            cluster.node(0).pid(),
            cluster.node(1).pid(),
            cluster.node(2).pid(),
        ]
    };
    for _ in 0..5 {
        for (u, pid) in usage.iter_mut().zip(pids(&gws, &agents, &cluster)) {
            u.sample(pid);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    for u in &mut usage {
        u.steady = Some(u.last);
    }

    #[derive(Debug, Clone, Copy)]
    enum Fault {
        KillNats(usize),
        StopNats(usize),
        PartitionNats(usize),
        KillGateway(usize),
        StopGateway(usize),
        KillAgent(usize),
        StopAgent(usize),
    }
    let signal = |pid: i32, sig: i32| {
        // SAFETY: signalling a child process of this test by pid.
        unsafe { libc::kill(pid, sig) };
    };
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut kills: Vec<(&str, f64, f64)> = Vec::new();
    let end = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut rounds = 0u64;
    while tokio::time::Instant::now() < end {
        let this = rounds;
        rounds += 1;
        let node = rng.range(0, 2) as usize;
        let gw = rng.range(0, 1) as usize;
        let agent = rng.range(0, 1) as usize;
        // The first rounds inject each kind for certain, the rest are drawn.
        let mut round = match this {
            0 => vec![Fault::KillNats(node)],
            1 => vec![Fault::StopNats(node)],
            2 => vec![Fault::PartitionNats(node)],
            3 => vec![Fault::KillGateway(gw)],
            4 => vec![Fault::StopGateway(gw)],
            5 => vec![Fault::KillAgent(agent)],
            6 => vec![Fault::StopAgent(agent)],
            _ => Vec::new(),
        };
        if this > 6 {
            match rng.range(0, 3) {
                0 => round.push(Fault::KillNats(node)),
                1 => round.push(Fault::StopNats(node)),
                2 => round.push(Fault::PartitionNats(node)),
                _ => {}
            }
            match rng.range(0, 3) {
                0 => round.push(Fault::KillGateway(gw)),
                1 => round.push(Fault::StopGateway(gw)),
                _ => {}
            }
            match rng.range(0, 4) {
                0 => round.push(Fault::KillAgent(agent)),
                1 => round.push(Fault::StopAgent(agent)),
                _ => {}
            }
            if round.is_empty() {
                round.push(Fault::StopNats(node));
            }
        }
        let mut partition = None;
        for f in &round {
            let kind = format!("{f:?}");
            *counts
                .entry(kind.split('(').next().unwrap().to_string())
                .or_insert(0) += 1;
            match *f {
                Fault::KillNats(n) => cluster.kill(n),
                Fault::StopNats(n) => signal(cluster.node(n).pid(), libc::SIGSTOP),
                Fault::PartitionNats(n) => {
                    let peers: Vec<u16> = (0..3)
                        .filter(|&m| m != n)
                        .map(|m| cluster.node(m).cluster_port())
                        .collect();
                    partition = Some(Partition::isolate(
                        cluster.node(n).pid(),
                        cluster.node(n).cluster_port(),
                        &peers,
                    ));
                }
                Fault::KillGateway(g) => gws[g].proc.signal(libc::SIGKILL),
                Fault::StopGateway(g) => gws[g].proc.signal(libc::SIGSTOP),
                Fault::KillAgent(a) => {
                    agents[a].proc.signal(libc::SIGKILL);
                    kills.push((NAMES[a], uptime(), f64::MAX));
                }
                Fault::StopAgent(a) => agents[a].proc.signal(libc::SIGSTOP),
            }
        }
        for _ in 0..rng.range(4, 10) {
            for (u, pid) in usage.iter_mut().zip(pids(&gws, &agents, &cluster)) {
                u.sample(pid);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        drop(partition);
        for f in &round {
            match *f {
                Fault::KillNats(n) => cluster.restart(n),
                Fault::StopNats(n) => signal(cluster.node(n).pid(), libc::SIGCONT),
                Fault::PartitionNats(_) => {}
                Fault::KillGateway(g) => {
                    let _ = gws[g].proc.wait_exit(Duration::from_secs(5)).await;
                    keep_log(&dir.join(GWS[g]), "gateway", lives[g]);
                    lives[g] += 1;
                    gws[g] = start_gw(g);
                }
                Fault::StopGateway(g) => gws[g].proc.signal(libc::SIGCONT),
                Fault::KillAgent(a) => {
                    let _ = agents[a].proc.wait_exit(Duration::from_secs(5)).await;
                    keep_log(dir, NAMES[a], lives[a + 2]);
                    lives[a + 2] += 1;
                    agents[a] = start_agent(a);
                    kills.last_mut().unwrap().2 = uptime();
                }
                Fault::StopAgent(a) => agents[a].proc.signal(libc::SIGCONT),
            }
        }
        tokio::time::sleep(Duration::from_secs(rng.range(3, 5))).await;
    }
    println!("faults injected, by kind: {counts:?}");

    let faults_ended = uptime();
    let excused = |run: &outpost_e2e::chaos::Run| {
        kills
            .iter()
            .any(|(agent, at, back)| *agent == run.agent && run.at >= at - 2.0 && run.at <= *back)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    let (all, ledger_runs) = loop {
        let ledger_runs: Vec<_> = read_ledger(&ledger)
            .into_iter()
            .filter(|r| r.at <= faults_ended)
            .collect();
        let all = outpost_e2e::nats::stream_results(&urls)
            .await
            .unwrap_or_default();
        let (runs, _) = on_bus(&all);
        let missing: Vec<_> = ledger_runs
            .iter()
            .filter(|r| !runs.contains_key(&r.id) && !excused(r))
            .collect();
        if missing.is_empty() {
            break (all, ledger_runs);
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "{} runs never reached the bus (kills at {kills:?}), e.g. {:#?}\n\
                 (logs in {}: kept with OUTPOST_E2E_KEEP=1)",
                missing.len(),
                &missing[..missing.len().min(10)],
                dir.display()
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let (runs, doubled_seqs) = on_bus(&all);
    let lost_to_kills = ledger_runs
        .iter()
        .filter(|r| !runs.contains_key(&r.id))
        .count();
    let doubled: Vec<_> = runs.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "runs stored twice: {doubled:?}");
    assert!(
        doubled_seqs.is_empty(),
        "sequence numbers stored twice: {doubled_seqs:?}"
    );
    let known: std::collections::BTreeSet<String> =
        read_ledger(&ledger).into_iter().map(|r| r.id).collect();
    let phantoms: Vec<_> = runs.keys().filter(|id| !known.contains(*id)).collect();
    assert!(
        phantoms.is_empty(),
        "results of runs the ledger never saw: {phantoms:?}"
    );
    println!(
        "audited {} runs: lost 0, duplicated 0, in flight at {} SIGKILLs of an agent {lost_to_kills}",
        ledger_runs.len(),
        kills.len()
    );

    tokio::time::sleep(Duration::from_secs(10)).await;
    for (u, pid) in usage.iter_mut().zip(pids(&gws, &agents, &cluster)) {
        u.sample(pid);
    }
    for (u, who) in usage.iter().zip(who) {
        println!(
            "{who}: steady {:?}, peak {:?}, end {:?} (KiB resident, file descriptors)",
            u.steady.unwrap(),
            u.peak,
            u.last
        );
        u.check(who);
    }
}
