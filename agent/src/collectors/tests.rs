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
    setup_with(listen::Limits::default()).await
}

async fn setup_with(limits: listen::Limits) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("collectors");
    let outbox = Arc::new(MemoryOutbox::open(&dir.path().join("state"), 100_000).unwrap());
    let collectors =
        Collectors::start_with(work.clone(), "test-host".into(), outbox.clone(), limits)
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
        config: Some("to {{graphite_path}}".into()),
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
            .contains("unknown placeholder {{graphite_path}} in config"),
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
            "key=[] target=http://envy:{}@127.0.0.1:{}/collector/envy lc=C",
            s.collectors.sinks.secret("envy").expose(),
            s.collectors.http_addr().port()
        )
    );
    s.collectors.stop_all().await;
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
    // The files hold the secrets: only the agent's user can read them.
    let mode = |p: &Path| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions())
            & 0o777
    };
    assert_eq!(mode(&s.collectors.work_dir), 0o700);
    let conf_path = s.collectors.dir("sys").join("collectd.conf");
    assert_eq!(mode(&conf_path), 0o600);
    let conf = std::fs::read_to_string(&conf_path).unwrap();
    let prefix = shim::prefix(&s.collectors, "sys");
    assert!(conf.contains(&format!("Port \"{}\"", s.collectors.graphite_addr().port())));
    assert!(conf.contains(&format!("Prefix \"{prefix}\"")), "{conf}");
    let fconf_path = s.collectors.dir("logs").join("fluent.conf");
    assert_eq!(mode(&fconf_path), 0o600);
    let fconf = std::fs::read_to_string(&fconf_path).unwrap();
    assert!(fconf.contains(&format!(
        "127.0.0.1:{}/collector/logs/",
        s.collectors.http_addr().port()
    )));
    assert!(fconf.contains(&format!(
        "password {}\n",
        s.collectors.sinks.secret("logs").expose()
    )));

    let mut g = tokio::net::TcpStream::connect(s.collectors.graphite_addr())
        .await
        .unwrap();
    g.write_all(
        format!("{prefix}test-host.cpu-0.cpu-idle 97.5 1700000000\r\n{prefix}test-host.memory.memory-used 1024 1700000000\r\nnot a line\n").as_bytes(),
    )
    .await
    .unwrap();
    let auth = shim::basic(&s.collectors, "logs");
    let http = s.collectors.http_addr();
    let post = |path: &'static str, body: Vec<u8>| {
        let auth = auth.clone();
        async move { post_with(http, path, &auth, &body).await }
    };
    assert_eq!(
        post(
            "/collector/logs/app.access",
            br#"[{"ms":12,"path":"/"},{"ms":30}]"#.to_vec()
        )
        .await,
        "HTTP/1.1 200 OK"
    );
    assert_eq!(
        post("/collector/nobody/t", b"[]".to_vec()).await,
        "HTTP/1.1 401 Unauthorized"
    );
    assert_eq!(
        post("/collector/logs/t", b"{not json".to_vec()).await,
        "HTTP/1.1 400 Bad Request"
    );
    let big = vec![b' '; listen::MAX_BODY + 1];
    assert_eq!(
        post("/collector/logs/t", big).await,
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
        r.malformed >= 2 && r.unauthenticated >= 1
    })
    .await;
    // Data buffered when the collectors stop is still sent.
    let taken = s.collectors.counts().accepted;
    g.write_all(format!("{prefix}test-host.cpu-0.cpu-idle 1 1700000001\n").as_bytes())
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

// ---- The listeners as a local attacker sees them ------------------------------------

/// A collectd-kind collector that only sleeps: these tests write its data themselves.
fn collectd_stub(name: &str) -> CollectorSpec {
    CollectorSpec {
        name: name.into(),
        kind: CollectorKind::Collectd,
        command: vec!["/bin/sh".into(), "-c".into(), "exec sleep 300".into()],
        plugins: vec![outpost_protocol::CollectdPlugin {
            name: "cpu".into(),
            config: None,
        }],
        ..program(name, "")
    }
}

/// A fluentd-kind collector that only sleeps.
fn fluentd_stub(name: &str) -> CollectorSpec {
    CollectorSpec {
        kind: CollectorKind::Fluentd,
        plugins: vec![],
        ..collectd_stub(name)
    }
}

/// `POST path` with `headers` (each `Name: value\r\n`); the status line of the answer, or
/// "" when the connection was closed without one.
async fn post_with(addr: SocketAddr, path: &str, headers: &str, body: &[u8]) -> String {
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = c.write_all(head.as_bytes()).await;
    let _ = c.write_all(body).await;
    let mut out = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), c.read_to_string(&mut out)).await;
    out.lines().next().unwrap_or_default().to_string()
}

/// Whether the agent closes `c` within `within` (a read gives end of file or an error).
async fn closed(c: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut b = [0u8; 256];
    tokio::time::timeout(within, async {
        loop {
            match c.read(&mut b).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await
    .is_ok()
}

/// Every metric of `check` reported so far, the latest value of each.
fn metrics_of(outbox: &MemoryOutbox, check: &str) -> BTreeMap<String, f64> {
    of(outbox, check)
        .iter()
        .flat_map(|r| r.metrics.iter().map(|m| (m.name.clone(), m.value)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graphite_lines_without_the_collectors_secret_are_refused_and_their_connection_closed() {
    let s = setup().await;
    s.collectors.apply(vec![collectd_stub("sys")]).await;
    until(&s.outbox, "collector.sys", 10, |rs| running(rs) == 1).await;
    let addr = s.collectors.graphite_addr();
    // A local user knows the collector's name (it is in ps) but not its secret.
    let mut attackers = Vec::new();
    for line in [
        "sys@test-host.injected-a 666 1700000000\n".to_string(),
        "sys@0123456789abcdef0123456789abcdef.test-host.injected-b 666 1700000000\n".into(),
        format!(
            "{}injected-c 666 1700000000\n",
            shim::prefix(&s.collectors, "sys").replace(|c: char| c.is_ascii_hexdigit(), "0")
        ),
        "nobody@x.y 1 1\ngarbage\n".into(),
    ] {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(line.as_bytes()).await.unwrap();
        attackers.push(c);
    }
    // The collector itself, with the prefix rendered into its configuration.
    let prefix = shim::prefix(&s.collectors, "sys");
    let mut real = tokio::net::TcpStream::connect(addr).await.unwrap();
    real.write_all(format!("{prefix}test-host.cpu-0.cpu-idle 97.5 1700000000\n").as_bytes())
        .await
        .unwrap();
    let got = until(&s.outbox, "collector.sys.metrics", 10, |rs| !rs.is_empty()).await;
    // Give the attackers' lines every chance to arrive too.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let taken = metrics_of(&s.outbox, "collector.sys.metrics");
    assert_eq!(
        taken,
        BTreeMap::from([("cpu-0.cpu-idle".to_string(), 97.5)]),
        "only the collector's own line is taken: {got:#?}"
    );
    for (i, c) in attackers.iter_mut().enumerate() {
        assert!(
            closed(c, Duration::from_secs(5)).await,
            "connection {i} sent a line without the secret and was left open"
        );
    }
    assert!(
        shim::refused(&s.collectors) >= 4,
        "refused lines are counted: {:?}",
        s.collectors.counts()
    );
    // The collector's own connection stays open and keeps working.
    real.write_all(format!("{prefix}test-host.cpu-0.cpu-idle 1 1700000001\n").as_bytes())
        .await
        .unwrap();
    until(&s.outbox, "collector.sys.metrics", 10, |rs| {
        rs.iter().any(|r| r.metrics.iter().any(|m| m.value == 1.0))
    })
    .await;
    s.collectors.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_posts_without_the_collectors_secret_are_refused() {
    let s = setup().await;
    s.collectors.apply(vec![fluentd_stub("logs")]).await;
    until(&s.outbox, "collector.logs", 10, |rs| running(rs) == 1).await;
    let addr = s.collectors.http_addr();
    let body = br#"[{"injected":666}]"#;
    let wrong = format!(
        "Authorization: Basic {}\r\n",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            "logs:0123456789abcdef0123456789abcdef"
        )
    );
    for (headers, what) in [("", "no credentials"), (wrong.as_str(), "a wrong secret")] {
        assert_eq!(
            post_with(addr, "/collector/logs/app", headers, body).await,
            "HTTP/1.1 401 Unauthorized",
            "a post with {what}"
        );
    }
    assert_eq!(
        post_with(
            addr,
            "/collector/nobody/app",
            &shim::basic(&s.collectors, "logs"),
            body
        )
        .await,
        "HTTP/1.1 401 Unauthorized",
        "one collector's secret does not open another's path"
    );
    assert_eq!(
        post_with(
            addr,
            "/collector/logs/app",
            &shim::basic(&s.collectors, "logs"),
            br#"[{"ms":12}]"#
        )
        .await,
        "HTTP/1.1 200 OK"
    );
    until(&s.outbox, "collector.logs.metrics", 10, |rs| !rs.is_empty()).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        metrics_of(&s.outbox, "collector.logs.metrics"),
        BTreeMap::from([
            ("app.ms".to_string(), 12.0),
            ("app.records".to_string(), 1.0)
        ])
    );
    assert!(
        shim::refused(&s.collectors) >= 3,
        "{:?}",
        s.collectors.counts()
    );
    s.collectors.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_do_not_lock_the_collectors_out() {
    let s = setup().await;
    s.collectors
        .apply(vec![collectd_stub("sys"), fluentd_stub("logs")])
        .await;
    until(&s.outbox, "collector.sys", 10, |rs| running(rs) == 1).await;
    until(&s.outbox, "collector.logs", 10, |rs| running(rs) == 1).await;
    let (g_addr, h_addr) = (s.collectors.graphite_addr(), s.collectors.http_addr());
    // A local user opens 100 connections to each listener and sends nothing.
    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(tokio::net::TcpStream::connect(g_addr).await.unwrap());
        idle.push(tokio::net::TcpStream::connect(h_addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The collectors still get through.
    let prefix = shim::prefix(&s.collectors, "sys");
    let mut g = tokio::net::TcpStream::connect(g_addr).await.unwrap();
    g.write_all(format!("{prefix}test-host.load 0.5 1700000000\n").as_bytes())
        .await
        .unwrap();
    assert_eq!(
        post_with(
            h_addr,
            "/collector/logs/app",
            &shim::basic(&s.collectors, "logs"),
            br#"[{"ms":3}]"#
        )
        .await,
        "HTTP/1.1 200 OK",
        "fluentd's post got through 200 idle connections"
    );
    let got = until(&s.outbox, "collector.sys.metrics", 10, |rs| !rs.is_empty()).await;
    assert_eq!(got[0].metrics[0].name, "load");
    assert!(
        s.collectors.counts().evicted >= 2 * (100 + 1 - 64),
        "the oldest idle connections made room: {:?}",
        s.collectors.counts()
    );
    until(&s.outbox, "collector.logs.metrics", 10, |rs| !rs.is_empty()).await;
    // More idle connections later do not push out a collector that has spoken.
    for _ in 0..100 {
        idle.push(tokio::net::TcpStream::connect(g_addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    g.write_all(format!("{prefix}test-host.load 0.75 1700000001\n").as_bytes())
        .await
        .unwrap();
    until(&s.outbox, "collector.sys.metrics", 10, |rs| {
        rs.iter().any(|r| r.metrics.iter().any(|m| m.value == 0.75))
    })
    .await;
    s.collectors.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_slow_and_idle_connections_are_closed() {
    let s = shim::fast_setup().await;
    s.collectors
        .apply(vec![collectd_stub("sys"), fluentd_stub("logs")])
        .await;
    until(&s.outbox, "collector.sys", 10, |rs| running(rs) == 1).await;
    until(&s.outbox, "collector.logs", 10, |rs| running(rs) == 1).await;
    let (g_addr, h_addr) = (s.collectors.graphite_addr(), s.collectors.http_addr());
    let connect = |a| tokio::net::TcpStream::connect(a);
    let prefix = shim::prefix(&s.collectors, "sys");
    // Graphite: silent from the start; a line begun and never finished; a collector's
    // connection that goes quiet.
    let mut silent = connect(g_addr).await.unwrap();
    let mut slow = connect(g_addr).await.unwrap();
    slow.write_all(prefix.as_bytes()).await.unwrap();
    let mut quiet = connect(g_addr).await.unwrap();
    quiet
        .write_all(format!("{prefix}test-host.load 1 1700000000\n").as_bytes())
        .await
        .unwrap();
    // HTTP: silent; authenticated headers, then a body that never comes.
    let mut h_silent = connect(h_addr).await.unwrap();
    let mut h_slow = connect(h_addr).await.unwrap();
    h_slow
        .write_all(
            format!(
                "POST /collector/logs/t HTTP/1.1\r\nHost: x\r\n{}Content-Length: 100\r\n\r\n[",
                shim::basic(&s.collectors, "logs")
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let t = Instant::now();
    // Read timeout 1 s; HTTP: 1 s for the request to arrive, then 2 s for the request;
    // Graphite: silent for 2 intervals (1 s) + 1 s.
    assert!(
        closed(&mut slow, Duration::from_secs(3)).await,
        "a line begun and never finished"
    );
    assert!(
        closed(&mut h_silent, Duration::from_secs(3)).await,
        "a silent HTTP connection"
    );
    assert!(
        closed(&mut silent, Duration::from_secs(6)).await,
        "a silent Graphite connection"
    );
    assert!(
        closed(&mut quiet, Duration::from_secs(6)).await,
        "a quiet Graphite connection"
    );
    assert!(
        closed(&mut h_slow, Duration::from_secs(6)).await,
        "a body that never comes"
    );
    assert!(t.elapsed() >= Duration::from_secs(1), "{:?}", t.elapsed());
    // (Counted as each listener gives a connection up, which the peer may see closed a
    // moment before: polled.)
    let deadline = Instant::now() + Duration::from_secs(5);
    while shim::timed_out(&s.collectors) < 5 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        shim::timed_out(&s.collectors) >= 5,
        "{:?}",
        s.collectors.counts()
    );
    // The line the quiet connection sent was taken.
    until(&s.outbox, "collector.sys.metrics", 10, |rs| !rs.is_empty()).await;
    s.collectors.stop_all().await;
}

/// What these tests need of the secret and the counters, in one place.
mod shim {
    use super::*;

    /// What a collector's Graphite paths start with.
    pub fn prefix(c: &Collectors, name: &str) -> String {
        render::graphite_prefix(name, c.sinks.secret(name).expose())
    }

    /// The `Authorization` header line of a collector's posts.
    pub fn basic(c: &Collectors, name: &str) -> String {
        let pair = format!("{name}:{}", c.sinks.secret(name).expose());
        format!(
            "Authorization: Basic {}\r\n",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, pair)
        )
    }

    /// Lines and requests refused for lack of the secret.
    pub fn refused(c: &Collectors) -> u64 {
        c.counts().unauthenticated
    }

    /// Connections closed for silence or slowness.
    pub fn timed_out(c: &Collectors) -> u64 {
        c.counts().timed_out
    }

    /// A manager whose listeners give up quickly: read timeout 1 s, HTTP requests 1 s to
    /// arrive and 2 s to finish, Graphite silence of 2 intervals + 1 s.
    pub async fn fast_setup() -> Setup {
        let limits = listen::Limits {
            graphite_quiet_margin: Duration::from_secs(1),
            line_timeout: Duration::from_secs(1),
            http_head_timeout: Duration::from_secs(1),
            http_request_timeout: Duration::from_secs(2),
            ..listen::Limits::default()
        };
        setup_with(limits).await
    }
}
