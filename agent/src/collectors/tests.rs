//! The manager with real processes: tiny shell-script collectors, an in-memory outbox, and
//! the real listeners. Every wait polls with a deadline.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use outpost_protocol::{CheckResult, CollectorKind, CollectorSpec, Status};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::outbox::MemoryOutbox;
use crate::supervise::{group_exists, CRASH_LIMIT};

struct Setup {
    _dir: tempfile::TempDir,
    outbox: Arc<MemoryOutbox>,
    collectors: Arc<Collectors>,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("collectors");
    let outbox = Arc::new(MemoryOutbox::open(&dir.path().join("state"), 100_000).unwrap());
    let collectors = Collectors::start(work.clone(), "test-host".into(), outbox.clone())
        .await
        .unwrap();
    Setup {
        _dir: dir,
        outbox,
        collectors,
    }
}

fn program(name: &str, script: &str) -> CollectorSpec {
    CollectorSpec {
        name: name.into(),
        kind: CollectorKind::Program,
        command: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: BTreeMap::new(),
        plugins: vec![],
        interval_secs: 1,
        config: None,
    }
}

/// The results of `check` so far.
fn of(outbox: &MemoryOutbox, check: &str) -> Vec<CheckResult> {
    outbox
        .pending_after(0, usize::MAX)
        .into_iter()
        .filter(|r| r.check == check)
        .collect()
}

/// Poll until `check`'s results satisfy `done`, or fail after `secs`.
async fn until(
    outbox: &MemoryOutbox,
    check: &str,
    secs: u64,
    done: impl Fn(&[CheckResult]) -> bool,
) -> Vec<CheckResult> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let got = of(outbox, check);
        if done(&got) {
            return got;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("{check}: condition not met within {secs}s; got {got:#?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn running(rs: &[CheckResult]) -> usize {
    rs.iter()
        .filter(|r| r.status == Status::Ok && r.output.contains(" running, pid "))
        .count()
}

/// Poll `f` until it is true, or fail after `secs`.
async fn eventually(secs: u64, what: &str, f: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exiting_collector_restarts_then_is_a_crash_loop_until_its_declaration_changes() {
    let s = setup().await;
    let spec = program(
        "flaky",
        // stdout and stderr are read side by side, so which line comes last varies: the
        // one that names an error is quoted whichever it is.
        "echo 'reading config'; echo 'line 3: error: no such option Foo' >&2; exit 1",
    );
    s.collectors.apply(vec![spec.clone()]).await;
    let t = Instant::now();
    let got = until(&s.outbox, "collector.flaky", 40, |rs| {
        rs.iter().any(|r| r.status == Status::Critical)
    })
    .await;
    // 1 + 2 + 4 + 8 seconds of backoff between the five starts.
    assert!(t.elapsed() >= Duration::from_secs(15), "{:?}", t.elapsed());
    // It never stayed up long enough to be called running: no OK between the warnings.
    assert_eq!(
        got.iter().map(|r| r.status).collect::<Vec<_>>(),
        [
            [Status::Warning; CRASH_LIMIT - 1].as_slice(),
            &[Status::Critical]
        ]
        .concat(),
        "{got:#?}"
    );
    let warnings: Vec<_> = got.iter().filter(|r| r.status == Status::Warning).collect();
    assert!(
        warnings[0]
            .output
            .starts_with("sh exited with code 1; next start in 1 s (1 exits in the last 120 s)"),
        "{}",
        warnings[0].output
    );
    assert!(
        warnings[0]
            .output
            .ends_with("; last output: line 3: error: no such option Foo"),
        "{}",
        warnings[0].output
    );
    assert!(
        warnings[1].output.contains("next start in 2 s (2 exits"),
        "{}",
        warnings[1].output
    );
    assert!(
        warnings[0].long_output.contains("reading config"),
        "{:?}",
        warnings[0]
    );
    let last = got.last().unwrap();
    assert_eq!(last.status, Status::Critical);
    assert!(
        last.output
            .contains("crash loop: ended 5 times within 120 s (last: exited with code 1)"),
        "{}",
        last.output
    );
    assert!(
        last.long_output
            .contains("line 3: error: no such option Foo"),
        "the crash loop quotes its output: {last:?}"
    );
    assert_eq!(s.collectors.phase("flaky").await, Some(Phase::CrashLoop));
    // Not started again...
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(of(&s.outbox, "collector.flaky").len(), got.len());
    // ...until its declaration changes.
    s.collectors
        .apply(vec![program("flaky", "echo fixed; exec sleep 300")])
        .await;
    let after = until(&s.outbox, "collector.flaky", 10, |rs| {
        rs.len() > got.len() && running(&rs[got.len()..]) == 1
    })
    .await;
    assert_eq!(after.last().unwrap().status, Status::Ok);
    s.collectors.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_ends_the_whole_group_before_returning() {
    let s = setup().await;
    let dir = s.collectors.dir("grp");
    // A child of its own in the group, and a shell that ignores SIGTERM (so does the
    // child: an ignored signal stays ignored across fork and exec).
    let script =
        "trap '' TERM; sleep 300 & echo $! > child.pid; echo started; while true; do sleep 1; done";
    s.collectors.apply(vec![program("grp", script)]).await;
    until(&s.outbox, "collector.grp", 10, |rs| running(rs) == 1).await;
    let pid_file = dir.join(pidfile::FILE);
    let (pid, _) = pidfile::read(&pid_file).expect("a pid file while it runs");
    eventually(5, "the script wrote its child's pid", || {
        lines(&dir.join("child.pid")).len() == 1
    })
    .await;
    let child: u32 = lines(&dir.join("child.pid"))[0].parse().unwrap();
    assert!(group_exists(pid));
    assert!(pidfile::start_time(child).is_some());
    let t = Instant::now();
    s.collectors.stop_all().await;
    assert!(
        t.elapsed() >= crate::supervise::STOP_GRACE,
        "SIGTERM was ignored, so only SIGKILL after the grace ended it: {:?}",
        t.elapsed()
    );
    assert!(
        !group_exists(pid),
        "the collector's group outlived stop_all"
    );
    assert_eq!(
        pidfile::start_time(child),
        None,
        "its child outlived stop_all"
    );
    assert!(!pid_file.exists(), "the pid file goes with the collector");
    assert_eq!(s.collectors.phase("grp").await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_left_by_a_killed_agent_is_stopped_before_the_new_one_starts() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("collectors");
    // What an agent killed with -9 leaves: its collector running, and its pid file.
    let spawn_leftover = || {
        use std::os::unix::process::CommandExt;
        std::process::Command::new("/bin/sleep")
            .arg("300")
            .process_group(0)
            .spawn()
            .unwrap()
    };
    let mut old = spawn_leftover();
    std::fs::create_dir_all(work.join("sys")).unwrap();
    pidfile::write(&work.join("sys").join(pidfile::FILE), old.id()).unwrap();
    // A pid file whose pid now belongs to another process (another start time): that
    // process must be left alone.
    let mut bystander = spawn_leftover();
    std::fs::create_dir_all(work.join("gone")).unwrap();
    let start = pidfile::start_time(bystander.id()).unwrap();
    std::fs::write(
        work.join("gone").join(pidfile::FILE),
        format!("{} {}\n", bystander.id(), start + 1),
    )
    .unwrap();

    let outbox = Arc::new(MemoryOutbox::open(&dir.path().join("state"), 1000).unwrap());
    let collectors = Collectors::start(work.clone(), "h".into(), outbox.clone())
        .await
        .unwrap();
    // Stopped by the time start returns: nothing can have started yet.
    let status = old
        .try_wait()
        .unwrap()
        .expect("the leftover collector was stopped");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGTERM));
    assert!(
        bystander.try_wait().unwrap().is_none(),
        "a reused pid was signalled"
    );
    assert!(!work.join("sys").join(pidfile::FILE).exists());

    // The same for a leftover of a collector found when its supervisor starts.
    let mut old = spawn_leftover();
    pidfile::write(&work.join("sys").join(pidfile::FILE), old.id()).unwrap();
    collectors
        .apply(vec![program("sys", "exec sleep 300")])
        .await;
    let got = until(&outbox, "collector.sys", 10, |rs| running(rs) == 1).await;
    assert!(old.try_wait().unwrap().is_some(), "two copies would run");
    let (new_pid, _) = pidfile::read(&work.join("sys").join(pidfile::FILE)).unwrap();
    assert_ne!(new_pid, old.id());
    assert!(got[0].output.contains(&format!("pid {new_pid}")), "{got:?}");
    collectors.stop_all().await;
    bystander.kill().unwrap();
    let _ = bystander.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_declaration_restarts_only_when_its_rendering_changed() {
    let s = setup().await;
    let dir = s.collectors.dir("p");
    let starts = dir.join("starts");
    let spec = CollectorSpec {
        config: Some("version 1\n".into()),
        ..program("p", "echo $$ >> starts; exec sleep 300")
    };
    s.collectors.apply(vec![spec.clone()]).await;
    until(&s.outbox, "collector.p", 10, |rs| running(rs) == 1).await;
    eventually(5, "started once", || lines(&starts).len() == 1).await;
    let conf = dir.join("collector.conf");
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), "version 1\n");
    let inode = || std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&conf).unwrap());
    let first_inode = inode();

    // The same declaration, and one whose interval changed (a program's rendering does not
    // depend on it): nothing restarts.
    s.collectors.apply(vec![spec.clone()]).await;
    let slower = CollectorSpec {
        interval_secs: 30,
        ..spec.clone()
    };
    s.collectors.apply(vec![slower.clone()]).await;
    assert_eq!(s.collectors.phase("p").await, Some(Phase::Running));
    // An environment change restarts it, but the file (unchanged) is not rewritten.
    let with_env = CollectorSpec {
        env: BTreeMap::from([("LEVEL".into(), "debug".into())]),
        ..slower.clone()
    };
    s.collectors.apply(vec![with_env.clone()]).await;
    eventually(10, "restarted for the new environment", || {
        lines(&starts).len() == 2
    })
    .await;
    until(&s.outbox, "collector.p", 10, |rs| running(rs) == 2).await;
    assert_eq!(inode(), first_inode, "an unchanged file is not rewritten");
    // A changed file restarts it, with the new file in place before it starts.
    let v2 = CollectorSpec {
        config: Some("version 2\n".into()),
        command: vec![
            "/bin/sh".into(),
            "-c".into(),
            "cat {{config_file}} >> starts; exec sleep 300".into(),
        ],
        ..with_env.clone()
    };
    s.collectors.apply(vec![v2]).await;
    eventually(10, "restarted for the new file", || {
        lines(&starts).len() == 3
    })
    .await;
    assert_eq!(lines(&starts)[2], "version 2");
    until(&s.outbox, "collector.p", 10, |rs| running(rs) == 3).await;
    // Never two at once: every start but the last was stopped.
    let pids: Vec<u32> = lines(&starts)[..2]
        .iter()
        .map(|l| l.parse().unwrap())
        .collect();
    for pid in pids {
        assert_eq!(
            pidfile::start_time(pid),
            None,
            "an old generation still runs"
        );
    }
    // Removal stops it.
    s.collectors.apply(vec![]).await;
    assert_eq!(s.collectors.phase("p").await, None);
    assert_eq!(lines(&starts).len(), 3);
    assert!(!dir.join(pidfile::FILE).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_errors_are_critical_and_a_fix_is_picked_up() {
    let s = setup().await;
    let missing = CollectorSpec {
        command: vec!["/nonexistent/shipper".into()],
        ..program("ship", "")
    };
    let placeholder = CollectorSpec {
        config: Some("to {{graphite_prefix}}".into()),
        ..program("tmpl", "exec sleep 300")
    };
    s.collectors.apply(vec![missing, placeholder]).await;
    let got = until(&s.outbox, "collector.ship", 10, |rs| !rs.is_empty()).await;
    assert_eq!(got[0].status, Status::Critical);
    assert!(
        got[0]
            .output
            .starts_with("shipper config error: cannot run /nonexistent/shipper: No such file"),
        "{}",
        got[0].output
    );
    let got = until(&s.outbox, "collector.tmpl", 10, |rs| !rs.is_empty()).await;
    assert_eq!(got[0].status, Status::Critical);
    assert!(
        got[0]
            .output
            .contains("unknown placeholder {{graphite_prefix}} in config"),
        "{}",
        got[0].output
    );
    assert_eq!(s.collectors.phase("tmpl").await, Some(Phase::ConfigError));
    let fixed = CollectorSpec {
        config: Some("to {{graphite_host}}:{{graphite_port}}".into()),
        ..program("tmpl", "exec sleep 300")
    };
    s.collectors.apply(vec![fixed]).await;
    until(&s.outbox, "collector.tmpl", 10, |rs| running(rs) == 1).await;
    assert_eq!(
        std::fs::read_to_string(s.collectors.dir("tmpl").join("collector.conf")).unwrap(),
        format!("to 127.0.0.1:{}", s.collectors.graphite_addr().port())
    );
    assert_eq!(s.collectors.phase("ship").await, None, "removed");
    s.collectors.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_environment_is_cleared_but_for_the_declared_env() {
    let s = setup().await;
    std::env::set_var("OUTPOST_ENROLL_KEY", "secret-key");
    let spec = CollectorSpec {
        env: BTreeMap::from([("TARGET".into(), "{{http_url}}".into())]),
        ..program(
            "envy",
            "echo \"key=[$OUTPOST_ENROLL_KEY] target=$TARGET lc=$LC_ALL\" > seen; exec sleep 300",
        )
    };
    s.collectors.apply(vec![spec]).await;
    let seen = s.collectors.dir("envy").join("seen");
    eventually(10, "the script ran", || lines(&seen).len() == 1).await;
    assert_eq!(
        lines(&seen)[0],
        format!(
            "key=[] target=http://127.0.0.1:{}/collector/envy lc=C",
            s.collectors.http_addr().port()
        )
    );
    s.collectors.stop_all().await;
}

async fn post(addr: SocketAddr, path: &str, body: &[u8]) -> String {
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    c.write_all(head.as_bytes()).await.unwrap();
    let _ = c.write_all(body).await;
    let mut out = String::new();
    let _ = c.read_to_string(&mut out).await;
    out.lines().next().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_from_the_listeners_becomes_metrics_results() {
    let s = setup().await;
    let collectd = CollectorSpec {
        name: "sys".into(),
        kind: CollectorKind::Collectd,
        // Not collectd: this test is about the data path, and only needs it to run.
        command: vec!["/bin/sh".into(), "-c".into(), "exec sleep 300".into()],
        plugins: vec![outpost_protocol::CollectdPlugin {
            name: "cpu".into(),
            config: None,
        }],
        ..program("sys", "")
    };
    let fluent = CollectorSpec {
        name: "logs".into(),
        kind: CollectorKind::Fluentd,
        command: vec!["/bin/sh".into(), "-c".into(), "exec sleep 300".into()],
        ..program("logs", "")
    };
    s.collectors.apply(vec![collectd, fluent]).await;
    until(&s.outbox, "collector.sys", 10, |rs| running(rs) == 1).await;
    until(&s.outbox, "collector.logs", 10, |rs| running(rs) == 1).await;
    let conf = std::fs::read_to_string(s.collectors.dir("sys").join("collectd.conf")).unwrap();
    assert!(conf.contains(&format!("Port \"{}\"", s.collectors.graphite_addr().port())));
    let fconf = std::fs::read_to_string(s.collectors.dir("logs").join("fluent.conf")).unwrap();
    assert!(fconf.contains(&format!(
        "127.0.0.1:{}/collector/logs/",
        s.collectors.http_addr().port()
    )));

    let mut g = tokio::net::TcpStream::connect(s.collectors.graphite_addr())
        .await
        .unwrap();
    g.write_all(
        b"sys@test-host.cpu-0.cpu-idle 97.5 1700000000\r\nsys@test-host.memory.memory-used 1024 1700000000\r\nnot a line\nnobody@x 1 1\n",
    )
    .await
    .unwrap();
    assert_eq!(
        post(
            s.collectors.http_addr(),
            "/collector/logs/app.access",
            br#"[{"ms":12,"path":"/"},{"ms":30}]"#
        )
        .await,
        "HTTP/1.1 200 OK"
    );
    assert_eq!(
        post(s.collectors.http_addr(), "/collector/nobody/t", b"[]").await,
        "HTTP/1.1 404 Not Found"
    );
    assert_eq!(
        post(s.collectors.http_addr(), "/collector/logs/t", b"{not json").await,
        "HTTP/1.1 400 Bad Request"
    );
    let big = vec![b' '; listen::MAX_BODY + 1];
    assert_eq!(
        post(s.collectors.http_addr(), "/collector/logs/t", &big).await,
        "HTTP/1.1 413 Payload Too Large"
    );

    let metrics = |rs: &[CheckResult]| -> BTreeMap<String, f64> {
        rs.iter()
            .flat_map(|r| r.metrics.iter().map(|m| (m.name.clone(), m.value)))
            .collect()
    };
    let got = until(&s.outbox, "collector.sys.metrics", 10, |rs| {
        metrics(rs).len() >= 2
    })
    .await;
    assert_eq!(got[0].status, Status::Ok);
    assert_eq!(got[0].output, "2 metrics from collectd");
    assert_eq!(
        metrics(&got),
        BTreeMap::from([
            ("cpu-0.cpu-idle".to_string(), 97.5),
            ("memory.memory-used".to_string(), 1024.0)
        ])
    );
    let got = until(&s.outbox, "collector.logs.metrics", 10, |rs| !rs.is_empty()).await;
    assert_eq!(
        metrics(&got),
        BTreeMap::from([
            ("app.access.ms".to_string(), 30.0),
            ("app.access.records".to_string(), 2.0)
        ])
    );
    eventually(5, "bad input counted", || {
        let r = s.collectors.counts();
        r.malformed >= 2 && r.unknown_collector >= 2
    })
    .await;
    // Data buffered when the collectors stop is still sent.
    let taken = s.collectors.counts().accepted;
    g.write_all(b"sys@test-host.cpu-0.cpu-idle 1 1700000001\n")
        .await
        .unwrap();
    eventually(5, "the line was taken", || {
        s.collectors.counts().accepted > taken
    })
    .await;
    let n = of(&s.outbox, "collector.sys.metrics").len();
    s.collectors.stop_all().await;
    let after = of(&s.outbox, "collector.sys.metrics");
    assert!(
        after
            .iter()
            .any(|r| r.metrics.iter().any(|m| m.value == 1.0)),
        "{after:#?}"
    );
    assert!(after.len() <= n + 1);
}
