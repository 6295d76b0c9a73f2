//! The real collectd (Debian's collectd-core, which ci/setup installs), declared on the
//! gateway and kept alive by the agent: its CPU and memory readings arrive at the gateway
//! as metrics, a kill -9 of it is followed by a restart, a broken configuration becomes a
//! crash-loop result, an agent restarted after a kill -9 does not start a second copy, and
//! a stopped agent leaves no collectd behind. Another local user can neither lock collectd
//! out of the agent's listeners with idle connections nor add values of their own.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use outpost_e2e::*;

const T: Duration = Duration::from_secs(60);
const COLLECTD: &str = "/usr/sbin/collectd";

/// Pids of collectd processes started for the agent whose state is in `state_dir`.
fn collectd_pids(state_dir: &Path) -> Vec<i32> {
    let marker = state_dir.display().to_string();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        // A zombie has an empty command line; it is not running.
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.first().is_some_and(|a| a.ends_with("collectd"))
            && args.iter().any(|a| a.contains(&marker))
        {
            pids.push(pid);
        }
    }
    pids
}

/// Kills whatever collectd the agent under `.0` left behind when the test ends, passed or
/// not: a failed assertion must not leave collectd running on the machine.
struct Sweep(std::path::PathBuf);

impl Drop for Sweep {
    fn drop(&mut self) {
        for pid in collectd_pids(&self.0) {
            // SAFETY: kill(2) on a pid just read from /proc for this test's collectd.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

fn declaration(plugins: &str) -> String {
    format!(
        "[[collector]]\nname = \"collectd\"\nkind = \"collectd\"\nplugins = {plugins}\ninterval = \"1s\"\n"
    )
}

async fn health(gw: &Gateway, fp: &str, status: &str, text: &str) -> Value {
    eventually(
        T,
        &format!("collector.collectd {status} saying {text:?}"),
        || async {
            gw.latest(fp, "collector.collectd").await.filter(|r| {
                r["status"] == status && r["output"].as_str().unwrap_or("").contains(text)
            })
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_runs_collectd_from_the_gateway_and_keeps_it_alive() {
    assert!(
        Path::new(COLLECTD).exists(),
        "{COLLECTD} is missing: run ci/setup (it installs collectd-core)"
    );
    let dir = tempdir();
    let gw = Gateway::start(dir.path(), &[]);
    gw.write_checks("collectd.toml", &declaration(r#"["cpu", "memory"]"#));
    // Declared before the agents, so it runs after they are killed.
    let _sweep = Sweep(dir.path().join("collecting"));
    let mut agent = Agent::start(dir.path(), "collecting", &gw, "reconnect_max_secs = 1\n");
    let fp = agent.fingerprint.clone();
    let state_dir = agent.state_dir.clone();

    // collectd's readings arrive as metrics.
    health(&gw, &fp, "ok", "running").await;
    let metrics = eventually(T, "cpu and memory metrics", || async {
        let names: Vec<String> = gw
            .bus_results(&fp, "collector.collectd.metrics")
            .iter()
            .flat_map(|r| r["metrics"].as_array().cloned().unwrap_or_default())
            .filter_map(|m| m["name"].as_str().map(str::to_string))
            .collect();
        (names.iter().any(|n| n.contains("cpu")) && names.iter().any(|n| n.contains("memory")))
            .then_some(names)
    })
    .await;
    assert!(metrics.iter().any(|n| n.contains("memory")), "{metrics:?}");
    let first = collectd_pids(&state_dir);
    assert_eq!(first.len(), 1, "one collectd: {first:?}");

    // kill -9: restarted.
    unsafe { libc::kill(first[0], libc::SIGKILL) };
    let second = eventually(T, "collectd restarted", || async {
        let now = collectd_pids(&state_dir);
        (now.len() == 1 && now[0] != first[0]).then(|| now[0])
    })
    .await;
    // Reported before the restart, and delivered on its own time.
    eventually(T, "the exit reported", || async {
        gw.bus_results(&fp, "collector.collectd")
            .into_iter()
            .find(|r| r["status"] == "warning")
    })
    .await;

    // The agent killed -9, collectd left running: the next agent does not start a second.
    agent.proc.signal(libc::SIGKILL);
    agent.proc.wait_exit(T).await;
    drop(agent);
    assert_eq!(
        collectd_pids(&state_dir),
        [second],
        "collectd outlives a kill -9"
    );
    let mut agent = Agent::start(dir.path(), "collecting", &gw, "reconnect_max_secs = 1\n");
    let third = eventually(T, "one new collectd after the restart", || async {
        let now = collectd_pids(&state_dir);
        (now.len() == 1 && now[0] != second).then(|| now[0])
    })
    .await;
    let until = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < until {
        assert_eq!(collectd_pids(&state_dir), [third], "never two copies");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A configuration collectd cannot parse: a crash loop, reported.
    gw.write_checks("collectd.toml", &declaration(r#"["cpu", "nosuchplugin"]"#));
    let looped = health(&gw, &fp, "critical", "crash loop").await;
    let text = looped["output"].as_str().unwrap();
    assert!(
        text.contains("nosuchplugin"),
        "collectd's own error is quoted: {text}"
    );

    // Fixed: running again. Then the agent stops and takes collectd with it.
    gw.write_checks("collectd.toml", &declaration(r#"["cpu", "memory"]"#));
    health(&gw, &fp, "ok", "running").await;
    assert_eq!(collectd_pids(&state_dir).len(), 1);
    agent.proc.signal(libc::SIGTERM);
    assert_eq!(agent.proc.wait_exit(T).await, Some(0));
    assert_eq!(
        collectd_pids(&state_dir),
        Vec::<i32>::new(),
        "no collectd left behind"
    );
}

/// The agent's collector listeners (Graphite, HTTP), from its log line
/// `collector listeners ready graphite=ADDR http=ADDR`.
fn listeners(log: &str) -> (SocketAddr, SocketAddr) {
    let line = log
        .lines()
        .find(|l| l.contains("collector listeners ready"))
        .expect("the listeners' log line");
    let field = |name: &str| -> SocketAddr {
        let start = line.find(&format!("{name}=")).expect(name) + name.len() + 1;
        let rest = &line[start..];
        rest[..rest.find(' ').unwrap_or(rest.len())]
            .parse()
            .unwrap()
    };
    (field("graphite"), field("http"))
}

/// Every metric name in the collector's results on the bus.
fn metric_names(gw: &Gateway, fp: &str) -> Vec<String> {
    gw.bus_results(fp, "collector.collectd.metrics")
        .iter()
        .flat_map(|r| r["metrics"].as_array().cloned().unwrap_or_default())
        .filter_map(|m| m["name"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collectd_gets_past_idle_connections_and_a_strangers_lines_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    assert!(
        Path::new(COLLECTD).exists(),
        "{COLLECTD} is missing: run ci/setup (it installs collectd-core)"
    );
    let dir = tempdir();
    let gw = Gateway::start(dir.path(), &[]);
    let _sweep = Sweep(dir.path().join("shared"));
    let mut agent = Agent::start(dir.path(), "shared", &gw, "reconnect_max_secs = 1\n");
    let fp = agent.fingerprint.clone();
    agent
        .proc
        .wait_for_log("collector listeners ready", T)
        .await;
    let (graphite, http) = listeners(&agent.proc.log());

    // Another local user, before collectd starts: 100 idle connections to each listener
    // (64 were enough to lock collectd out).
    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(TcpStream::connect(graphite).await.unwrap());
        idle.push(TcpStream::connect(http).await.unwrap());
    }
    gw.write_checks("collectd.toml", &declaration(r#"["cpu", "memory"]"#));
    health(&gw, &fp, "ok", "running").await;
    eventually(T, "collectd's cpu and memory metrics", || async {
        let names = metric_names(&gw, &fp);
        (names.iter().any(|n| n.contains("cpu")) && names.iter().any(|n| n.contains("memory")))
            .then_some(())
    })
    .await;

    // The secret is in collectd's configuration, which only the agent's user can read, and
    // nowhere in the agent's log.
    let work = agent.state_dir.join("collectors");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&work), 0o700, "{}", work.display());
    let conf_path = work.join("collectd/collectd.conf");
    assert_eq!(mode(&conf_path), 0o600);
    let conf = std::fs::read_to_string(&conf_path).unwrap();
    let prefix = conf
        .lines()
        .find_map(|l| l.trim().strip_prefix("Prefix \"collectd@"))
        .expect("a Prefix line");
    let secret = prefix.trim_end_matches("\"").trim_end_matches('.');
    assert!(
        secret.len() >= 32 && secret.chars().all(|c| c.is_ascii_hexdigit()),
        "{prefix}"
    );
    assert!(!agent.proc.log().contains(secret), "the secret was logged");

    // A stranger's lines, with the collector's name and a guessed secret, are refused.
    let now = now_ms() / 1000;
    let zeros = "0".repeat(secret.len());
    let mut stranger = TcpStream::connect(graphite).await.unwrap();
    stranger
        .write_all(
            format!(
                "collectd@shared.injected.a 666 {now}\ncollectd@{zeros}.shared.injected.b 666 {now}\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let seen = gw.bus_results(&fp, "collector.collectd.metrics").len();
    eventually(T, "three more flushes of collectd's metrics", || async {
        (gw.bus_results(&fp, "collector.collectd.metrics").len() >= seen + 3).then_some(())
    })
    .await;
    let injected: Vec<String> = metric_names(&gw, &fp)
        .into_iter()
        .filter(|n| n.contains("injected"))
        .collect();
    assert!(
        injected.is_empty(),
        "a stranger's values were taken: {injected:?}"
    );
    drop(idle);

    agent.proc.signal(libc::SIGTERM);
    assert_eq!(agent.proc.wait_exit(T).await, Some(0));
}
