//! Unit tests of the scheduler: the grid, soft/hard states, reconfiguration, and
//! carrying on after a restart.

use super::*;
use crate::outbox::MemoryOutbox;

fn plugins(dir: &tempfile::TempDir) -> Arc<Runner> {
    Arc::new(Runner::new(
        Arc::new(crate::plugins::PluginStore::new(
            &dir.path().join("plugins"),
        )),
        Default::default(),
    ))
}

#[test]
fn slots_are_on_a_grid_strictly_in_the_future() {
    assert_eq!(next_slot(1000, 300, 1000), 1300);
    assert_eq!(next_slot(1300, 300, 1000), 2300);
    assert_eq!(next_slot(100, 300, 1000), 300);
    assert_eq!(next_slot(1299, 300, 1000), 1300);
}

#[test]
fn first_run_is_soon_then_on_the_grid_with_a_gap() {
    let (phase, interval) = (37_000, 60_000);
    let first = next_run(1_000_000, None, phase, interval);
    assert!((1_000_000..1_000_000 + FIRST_RUN_SPREAD_MS).contains(&first));
    // The grid slot right after the first run is too close: the one after it is used.
    let second = next_run(first + 100, Some(first), phase, interval);
    assert!(second - first >= interval / 2, "{first} {second}");
    assert_eq!((second - phase) % interval, 0, "on the grid");
    let third = next_run(second + 5, Some(second), phase, interval);
    assert_eq!(third - second, interval);
    // Short intervals start within one interval.
    assert!(next_run(5_000, None, 700, 1_000) < 6_000);
}

#[test]
fn splay_is_deterministic_and_spread() {
    let a = splay_ms("agent-a", "disk", 60_000);
    assert_eq!(a, splay_ms("agent-a", "disk", 60_000));
    let phases: std::collections::HashSet<u64> = (0..100)
        .map(|i| splay_ms(&format!("agent-{i}"), "disk", 60_000) / 1000)
        .collect();
    assert!(
        phases.len() > 40,
        "100 agents landed on only {} distinct seconds",
        phases.len()
    );
}

#[test]
fn states_turn_hard_after_max_attempts_and_recover_at_once() {
    use Status::*;
    let mut t = Tracker::default();
    let seq: Vec<_> = [
        Ok, Critical, Warning, Critical, Critical, Warning, Ok, Critical, Ok,
    ]
    .into_iter()
    .map(|s| t.classify(s, 3))
    .collect();
    use StateType::{Hard as H, Soft as S};
    assert_eq!(
        seq,
        [
            (H, 1),
            (S, 1),
            (S, 2),
            (H, 3),
            (H, 3),
            (H, 3),
            (H, 1),
            (S, 1),
            (H, 1)
        ]
    );
    let mut t = Tracker::default();
    assert_eq!(t.classify(Critical, 1), (H, 1), "one attempt: hard at once");
}

#[test]
fn cron_fires_at_wall_clock_times() {
    let cron = outpost_protocol::checkfile::parse_cron("*/15 * * * * *").unwrap();
    let now = 1_700_000_007_500; // 7.5 s past a minute boundary (UTC and most zones)
    let next = next_cron(&cron, now);
    assert_eq!(next % 15_000, 0, "on a 15 s boundary: {next}");
    assert!(next > now && next - now <= 15_000);
    assert_eq!(next_cron(&cron, next), next + 15_000, "strictly after");
    let minutely = outpost_protocol::checkfile::parse_cron("* * * * *").unwrap();
    assert_eq!(next_cron(&minutely, now) % 60_000, 0);
}

fn spec(name: &str, cmd: &str) -> CheckSpec {
    CheckSpec::new(
        name,
        Probe::Nagios(outpost_protocol::probe::Command {
            command: vec![cmd.into()],
        }),
        1,
        5,
    )
}

#[tokio::test]
async fn only_changed_checks_are_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let outbox: Arc<dyn Outbox> = Arc::new(MemoryOutbox::open(dir.path(), 100).unwrap());
    let s = Scheduler::new("fp".into(), outbox.clone(), plugins(&dir), 4, dir.path());
    s.apply(
        "h1".into(),
        vec![spec("a", "/bin/true"), spec("b", "/bin/true")],
    );
    let (ga, gb) = (s.generation("a"), s.generation("b"));
    let d = s.apply(
        "h2".into(),
        vec![
            spec("a", "/bin/true"),
            spec("b", "/bin/false"),
            spec("c", "/bin/true"),
        ],
    );
    assert_eq!(d.changed, vec!["b"]);
    assert_eq!(s.generation("a"), ga, "unchanged check kept its task");
    assert_ne!(s.generation("b"), gb, "changed check was restarted");
    assert!(s.generation("c").is_some());
    let collectd = outpost_protocol::CollectorSpec {
        name: "collectd".into(),
        kind: outpost_protocol::CollectorKind::Collectd,
        command: vec![],
        env: Default::default(),
        plugins: vec![outpost_protocol::CollectdPlugin {
            name: "cpu".into(),
            config: None,
        }],
        interval_secs: 10,
        config: None,
    };
    s.apply_config(
        "h3".into(),
        vec![spec("c", "/bin/true")],
        vec![collectd.clone()],
    );
    assert_eq!(s.generation("a"), None);
    // Results arrive within a couple of intervals.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while outbox.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!outbox.is_empty());
    // The configuration was cached for the next start.
    let s2 = Scheduler::new("fp".into(), outbox, plugins(&dir), 4, dir.path());
    assert_eq!(
        s2.load_cached(),
        [collectd],
        "collectors cached with the checks"
    );
    assert_eq!(s2.hash().as_deref(), Some("h3"));
    assert!(s2.spec("c").is_some());
    s.stop_all(Duration::from_secs(1)).await;
    s2.stop_all(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn removing_a_check_mid_run_kills_it_and_keeps_no_result() {
    let dir = tempfile::tempdir().unwrap();
    let outbox: Arc<dyn Outbox> = Arc::new(MemoryOutbox::open(dir.path(), 100).unwrap());
    let s = Scheduler::new("fp".into(), outbox.clone(), plugins(&dir), 4, dir.path());
    let marker = dir.path().join("started");
    let script = format!("touch {}; sleep 30", marker.display());
    let mut slow = spec("slow", "/bin/sh");
    slow.probe = Probe::Nagios(outpost_protocol::probe::Command {
        command: vec!["/bin/sh".into(), "-c".into(), script.clone()],
    });
    slow.timeout_secs = 60;
    s.apply("h1".into(), vec![slow]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !marker.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the check never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.apply("h2".into(), vec![]);
    let gone = tokio::time::Instant::now() + Duration::from_secs(5);
    while count_cmdline(&script) > 0 {
        assert!(
            tokio::time::Instant::now() < gone,
            "the removed check's plugin still runs"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(outbox.is_empty(), "a removed check left a result");
    s.stop_all(Duration::from_secs(1)).await;
}

/// Processes whose last argument is `arg`.
fn count_cmdline(arg: &str) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .filter(|c| c.split(|b| *b == 0).any(|a| a == arg.as_bytes()))
        .count()
}

#[tokio::test]
async fn invalid_gateway_checks_are_reported_and_daemons_refuse_run_now() {
    let dir = tempfile::tempdir().unwrap();
    let outbox: Arc<dyn Outbox> = Arc::new(MemoryOutbox::open(dir.path(), 100).unwrap());
    let s = Scheduler::new("fp".into(), outbox.clone(), plugins(&dir), 4, dir.path());
    let mut forever = spec("forever", "/bin/true");
    forever.timeout_secs = u64::MAX;
    let mut newer = spec("newer", "/bin/true");
    newer.probe = Probe::Unsupported;
    let mut d = spec("d", "/bin/cat");
    d.probe = Probe::Daemon(outpost_protocol::probe::Command {
        command: vec!["/bin/sh".into(), "-c".into(), "sleep 30".into()],
    });
    d.interval_secs = 0;
    s.apply("h".into(), vec![forever, newer, d]);
    assert!(s.spec("forever").is_none() && s.spec("newer").is_none());
    let reported = outbox.pending_after(0, 10);
    let text: Vec<(&str, &str)> = reported
        .iter()
        .map(|r| (r.check.as_str(), r.output.as_str()))
        .collect();
    assert_eq!(text.len(), 2, "{text:?}");
    assert!(
        text[0].0 == "forever" && text[0].1.contains("timeout"),
        "{text:?}"
    );
    assert!(
        text[1].0 == "newer" && text[1].1.contains("upgrade"),
        "{text:?}"
    );
    assert!(reported.iter().all(|r| r.status == Status::Unknown));
    let err = s.run_now("d").await.unwrap_err();
    assert_eq!(err.code, "not_runnable");
    s.stop_all(Duration::from_secs(5)).await;
}

#[test]
fn after_a_restart_a_missed_slot_runs_at_once_and_a_recent_run_waits() {
    let hour = 3_600_000;
    let grid = Timing::Grid {
        phase_ms: 37_000,
        interval_ms: hour,
        slots_only: false,
        not_before_ms: 0,
    };
    let now = 1_700_000_000_000;
    let seed = 4_321;
    // Ran a minute ago: the next slot, exactly as if the agent had kept running.
    let recent = now - 60_000;
    let t = grid.resume(now, recent, None, seed);
    assert_eq!(t, next_run(now, Some(recent), 37_000, hour));
    assert!(t >= recent + hour / 2, "not soon after the restart");
    // Last ran two hours ago: a slot was missed while the agent was down.
    let t = grid.resume(now, now - 2 * hour, None, seed);
    assert_eq!(t, now + seed % FIRST_RUN_SPREAD_MS, "at once, spread");
    // Soft with a retry due while down: at once, spread within the retry interval.
    let t = grid.resume(now, now - 5_000, Some(1_000), seed);
    assert_eq!(t, now + seed % 1_000);
    // Soft with a retry not yet due: when it is due.
    assert_eq!(
        grid.resume(now, now - 1_000, Some(60_000), seed),
        now + 59_000
    );
    // A last run "in the future" (the clock was set back) counts as just now.
    let t = grid.resume(now, now + 10 * hour, None, seed);
    assert!(
        t >= now + hour / 2 && t <= now + hour + hour / 2,
        "{}",
        t - now
    );
    // Checks due at once do not all start at the same instant.
    let starts: std::collections::HashSet<u64> = (0..100)
        .map(|i| {
            let seed = splay_ms("fp", &format!("c{i}"), FIRST_RUN_SPREAD_MS);
            grid.resume(now, now - 2 * hour, None, seed)
        })
        .collect();
    assert!(starts.len() > 90, "{}", starts.len());
    assert!(starts
        .iter()
        .all(|t| (now..now + FIRST_RUN_SPREAD_MS).contains(t)));
    // Cron: a missed time is not made up; a due soft retry is.
    let cron = Timing::Cron(Box::new(
        outpost_protocol::checkfile::parse_cron("0 3 * * *").unwrap(),
    ));
    let c = match &cron {
        Timing::Cron(c) => next_cron(c, now),
        _ => unreachable!(),
    };
    assert_eq!(cron.resume(now, now - 48 * hour, None, seed), c);
    assert_eq!(
        cron.resume(now, now - 48 * hour, Some(30_000), seed),
        now + seed % FIRST_RUN_SPREAD_MS
    );
}

/// A check whose task never runs it during a test: results are recorded by hand.
fn idle(name: &str, attempts: u32) -> CheckSpec {
    let mut s = spec(name, "/bin/false");
    s.cron = Some("0 0 1 1 *".into());
    s.interval_secs = 0;
    s.max_attempts = attempts;
    s
}

fn result(name: &str, status: Status, attempts: u32) -> CheckResult {
    CheckResult {
        started_at_ms: now_ms(),
        max_attempts: attempts,
        ..CheckResult::new(name, status, "x")
    }
}

fn scheduler(dir: &tempfile::TempDir) -> Scheduler {
    let outbox: Arc<dyn Outbox> = Arc::new(MemoryOutbox::open(dir.path(), 1000).unwrap());
    Scheduler::new("fp".into(), outbox, plugins(dir), 4, dir.path())
}

fn saved_names(dir: &tempfile::TempDir) -> Vec<String> {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join(state::FILE)).unwrap()).unwrap();
    v["checks"].as_object().unwrap().keys().cloned().collect()
}

#[tokio::test]
async fn a_restarted_scheduler_carries_on_from_the_cached_states() {
    use StateType::{Hard as H, Soft as S};
    let dir = tempfile::tempdir().unwrap();
    let s = scheduler(&dir);
    s.load_cached();
    let checks = vec![idle("soft", 3), idle("hard", 3), idle("gone", 1)];
    s.apply("h1".into(), checks.clone());
    for _ in 0..2 {
        s.inner.record(result("soft", Status::Critical, 3));
    }
    for _ in 0..3 {
        s.inner.record(result("hard", Status::Critical, 3));
    }
    s.inner.record(result("gone", Status::Ok, 1));
    s.apply("h2".into(), checks[..2].to_vec());
    s.stop_all(Duration::from_secs(1)).await;
    assert_eq!(saved_names(&dir), ["hard", "soft"], "removed check pruned");
    // A second stop does not empty the file.
    s.stop_all(Duration::from_secs(1)).await;
    assert_eq!(saved_names(&dir), ["hard", "soft"]);

    let s2 = scheduler(&dir);
    s2.load_cached();
    let r = s2.inner.record(result("soft", Status::Critical, 3));
    assert_eq!((r.state_type, r.attempt), (H, 3), "soft 2/3 went on to 3/3");
    let r = s2.inner.record(result("hard", Status::Critical, 3));
    assert_eq!((r.state_type, r.attempt), (H, 3), "hard stayed hard");
    let r = s2.inner.record(result("hard", Status::Ok, 3));
    assert_eq!((r.state_type, r.attempt), (H, 1));
    s2.stop_all(Duration::from_secs(1)).await;

    // Without the cache, the same results start over: what the above proves is the
    // cache's doing.
    let fresh = tempfile::tempdir().unwrap();
    let s3 = scheduler(&fresh);
    s3.apply("h2".into(), checks[..2].to_vec());
    let r = s3.inner.record(result("soft", Status::Critical, 3));
    assert_eq!((r.state_type, r.attempt), (S, 1));
    s3.stop_all(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_check_changed_while_the_agent_was_down_starts_fresh() {
    use StateType::{Hard as H, Soft as S};
    let dir = tempfile::tempdir().unwrap();
    let s = scheduler(&dir);
    s.apply("h1".into(), vec![idle("same", 3), idle("changed", 3)]);
    for name in ["same", "changed"] {
        for _ in 0..2 {
            s.inner.record(result(name, Status::Warning, 3));
        }
    }
    s.stop_all(Duration::from_secs(1)).await;
    // The gateway's configuration changed meanwhile; it arrives after the restart.
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let s2 = scheduler(&dir);
    s2.load_cached();
    let mut changed = idle("changed", 3);
    changed.timeout_secs = 9;
    s2.apply("h2".into(), vec![idle("same", 3), changed]);
    let r = s2.inner.record(result("same", Status::Warning, 3));
    assert_eq!((r.state_type, r.attempt), (H, 3));
    let r = s2.inner.record(result("changed", Status::Warning, 3));
    assert_eq!((r.state_type, r.attempt), (S, 1));
    s2.stop_all(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_corrupt_state_file_is_ignored_and_replaced() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(state::FILE), b"{\"version\":1,\"chec").unwrap();
    let s = scheduler(&dir);
    s.load_cached();
    s.apply("h1".into(), vec![idle("a", 3)]);
    let r = s.inner.record(result("a", Status::Critical, 3));
    assert_eq!((r.state_type, r.attempt), (StateType::Soft, 1));
    // Written again within a few seconds, without waiting for the stop.
    let deadline = tokio::time::Instant::now() + state::SAVE_EVERY * 3;
    while std::fs::read(dir.path().join(state::FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_none()
    {
        assert!(tokio::time::Instant::now() < deadline, "never rewritten");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(saved_names(&dir), ["a"]);
    s.stop_all(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn cached_states_of_checks_no_longer_configured_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let s = scheduler(&dir);
    s.apply("h1".into(), vec![idle("kept", 3), idle("dropped", 3)]);
    s.apply_local(vec![idle("local", 3)]);
    for name in ["kept", "dropped", "local"] {
        s.inner.record(result(name, Status::Critical, 3));
    }
    s.stop_all(Duration::from_secs(1)).await;
    assert_eq!(saved_names(&dir), ["dropped", "kept", "local"]);
    // The gateway's cached configuration is rewritten without "dropped".
    let cached = Cached {
        hash: "h2".into(),
        checks: vec![idle("kept", 3)],
        collectors: Vec::new(),
    };
    std::fs::write(
        dir.path().join("config.json"),
        serde_json::to_vec(&cached).unwrap(),
    )
    .unwrap();
    let s2 = scheduler(&dir);
    s2.load_cached();
    // Not yet claimed: kept until the host's checks have been read once.
    let snapshot = s2.inner.snapshot(None);
    assert!(snapshot.contains_key("local") && snapshot.contains_key("dropped"));
    s2.apply_local(vec![idle("local", 3)]);
    let r = s2.inner.record(result("local", Status::Critical, 3));
    assert_eq!(r.attempt, 2, "the local check's state was restored");
    s2.stop_all(Duration::from_secs(1)).await;
    assert_eq!(saved_names(&dir), ["kept", "local"]);
}

#[tokio::test]
async fn run_now_unknown_check_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let outbox: Arc<dyn Outbox> = Arc::new(MemoryOutbox::open(dir.path(), 100).unwrap());
    let s = Scheduler::new("fp".into(), outbox, plugins(&dir), 4, dir.path());
    assert_eq!(s.run_now("nope").await.unwrap_err().code, "unknown_check");
}

#[test]
fn a_check_about_an_entity_has_the_entitys_slots_on_every_agent() {
    let mut s = spec("web", "/bin/true");
    s.interval_secs = 60;
    s.entity = Some("site".into());
    let (a, b) = (
        Timing::of("agent-a", &s).unwrap(),
        Timing::of("agent-b", &s).unwrap(),
    );
    let now = 1_700_000_000_123;
    // Its first run is its next slot on the entity's grid (not soon after the start, as
    // another agent may just have used the current one), the same on every agent.
    let slot = next_slot(now, splay_ms("entity:site", "web", 60_000), 60_000);
    assert_eq!(a.next(now, None), slot);
    assert_eq!(b.next(now, None), slot);
    assert_eq!(a.next(slot + 1, Some(slot)), slot + 60_000);
    // Handed over with a fence: the first slot at or after it.
    s.not_before_ms = Some(slot + 60_000);
    let fenced = Timing::of("agent-c", &s).unwrap();
    assert_eq!(fenced.next(now, None), slot + 60_000);
    s.not_before_ms = Some(slot + 60_001);
    let fenced = Timing::of("agent-c", &s).unwrap();
    assert_eq!(fenced.next(now, None), slot + 120_000);
}
