//! The agent runs the real Nagios plugins from Debian's `monitoring-plugins` packages, and
//! what it reports is what the plugin said: each plugin is run directly by the test and as
//! a check of a real agent enrolled with a real gateway, and the two are compared: status
//! from the exit code, the first line of text, the long output, and every perfdata metric.
//!
//! The expected side is parsed here by a small reference parser written from the plugin
//! guidelines, not by the agent's own parser, so a parsing mistake in the agent shows up
//! as a difference instead of agreeing with itself.
//!
//! Nothing leaves the machine: TCP, HTTP, SSH and DNS are served by the test on loopback.
//! Needs Debian's monitoring-plugins-basic, monitoring-plugins-standard and bind9-dnsutils
//! (ci/setup installs them).

use std::path::Path;
use std::time::Duration;

use outpost_e2e::*;

/// The one name the test DNS server knows.
const LOCALHOST: &[(&str, [u8; 4])] = &[("localhost", [127, 0, 0, 1])];
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const PLUGINS: &str = "/usr/lib/nagios/plugins";
const T: Duration = Duration::from_secs(20);

/// How a plugin's run is compared with the agent's.
#[derive(Clone, Copy, PartialEq)]
enum Compare {
    /// The plugin prints the same thing every time: text and metric values are equal.
    Exact,
    /// Numbers move between runs (load, free space, timings, counts): the text must be
    /// equal with every number masked, and each metric must have the same name, unit,
    /// thresholds, min and max, with a finite value. The status must still be equal, so
    /// the thresholds are set far from the measured values.
    Masked,
}

struct Case {
    name: String,
    argv: Vec<String>,
    compare: Compare,
    /// The exit code the plugin must give when run directly, where it is known: proves the
    /// comparison is about the path the case means (a server answering, a name resolving)
    /// rather than two identical failures.
    expect_exit: Option<i32>,
}

/// A check running the Debian plugin `args[0]` with the rest as its arguments.
fn case(name: &str, compare: Compare, expect_exit: Option<i32>, args: &[&str]) -> Case {
    let plugin = args[0];
    let mut argv = vec![format!("{PLUGINS}/{plugin}")];
    argv.extend(args[1..].iter().map(|s| s.to_string()));
    Case {
        name: name.to_string(),
        argv,
        compare,
        expect_exit,
    }
}

/// `case` for a command line whose arguments hold no spaces.
fn words(name: &str, compare: Compare, expect_exit: Option<i32>, line: &str) -> Case {
    let args: Vec<&str> = line.split_whitespace().collect();
    case(name, compare, expect_exit, &args)
}

// ---------------------------------------------------------------------------------------
// The reference parser for the expected side, written from the Nagios plugin guidelines:
//
//   TEXT OUTPUT | OPTIONAL PERFDATA
//   LONG TEXT LINE 1
//   LONG TEXT LINE N | PERFDATA LINE 2
//   PERFDATA LINE 3
//
// Perfdata is `'label'=value[UOM];[warn];[crit];[min];[max]`, space-separated, labels in
// single quotes when they hold spaces or `=` (a quote inside is doubled), `U` for a value
// that could not be determined (no metric).

#[derive(Debug, PartialEq)]
struct ExpectedMetric {
    name: String,
    value: f64,
    unit: Option<String>,
    warn: Option<String>,
    crit: Option<String>,
    min: Option<f64>,
    max: Option<f64>,
}

#[derive(Debug)]
struct Expected {
    status: &'static str,
    exit_code: i32,
    output: String,
    long_output: String,
    metrics: Vec<ExpectedMetric>,
}

fn status_of(code: i32) -> &'static str {
    match code {
        0 => "ok",
        1 => "warning",
        2 => "critical",
        3 => "unknown",
        other => panic!("a Debian plugin exited with {other}, outside the Nagios 0-3"),
    }
}

fn reference(exit_code: i32, stdout: &str, stderr: &str) -> Expected {
    let mut lines = stdout
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l));
    let first = lines.next().unwrap_or_default();
    let (text, first_perf) = first.split_once('|').unwrap_or((first, ""));
    let mut output = text.trim().to_string();
    let mut perf = vec![first_perf.to_string()];
    let mut long = Vec::new();
    let mut perf_started = false;
    for line in lines {
        if perf_started {
            perf.push(line.to_string());
            continue;
        }
        match line.split_once('|') {
            Some((text, p)) => {
                if !text.trim().is_empty() {
                    long.push(text.trim_end().to_string());
                }
                perf.push(p.to_string());
                perf_started = true;
            }
            None => long.push(line.trim_end().to_string()),
        }
    }
    // The agent documents that a plugin that printed nothing on stdout is reported with
    // the first thing it said on stderr.
    if output.is_empty() {
        if let Some(l) = stderr.lines().map(str::trim).find(|l| !l.is_empty()) {
            output = l.to_string();
        }
    }
    let metrics = perf
        .iter()
        .flat_map(|p| perf_tokens(p))
        .filter_map(|item| {
            reference_metric(&item)
                .unwrap_or_else(|| panic!("the reference parser cannot read perfdata {item:?}"))
        })
        .collect();
    Expected {
        status: status_of(exit_code),
        exit_code,
        output,
        long_output: long.join("\n").trim_end().to_string(),
        metrics,
    }
}

/// Split perfdata on whitespace outside single quotes.
fn perf_tokens(perf: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut in_quotes = false;
    for c in perf.chars() {
        if c == '\'' {
            in_quotes = !in_quotes;
        }
        if c.is_whitespace() && !in_quotes {
            out.push(String::new());
        } else {
            out.last_mut().unwrap().push(c);
        }
    }
    out.retain(|t| !t.is_empty());
    out
}

/// One perfdata item; `Some(None)` for an undetermined value, `None` if it is malformed.
fn reference_metric(item: &str) -> Option<Option<ExpectedMetric>> {
    // The separator is the first `=` outside quotes (a doubled quote toggles twice).
    let mut in_quotes = false;
    let eq = item.char_indices().find_map(|(i, c)| {
        if c == '\'' {
            in_quotes = !in_quotes;
        }
        (c == '=' && !in_quotes).then_some(i)
    })?;
    let (raw_label, rest) = (&item[..eq], &item[eq + 1..]);
    let name = match raw_label
        .strip_prefix('\'')
        .and_then(|l| l.strip_suffix('\''))
    {
        Some(inner) => inner.replace("''", "'"),
        None => raw_label.to_string(),
    };
    let fields: Vec<&str> = rest.split(';').collect();
    let value_uom = fields[0];
    if value_uom == "U" {
        return Some(None);
    }
    // The value is the longest numeric-looking prefix that is a number; the rest is the unit.
    let numeric = value_uom
        .find(|c: char| !(c.is_ascii_digit() || "+-.eE".contains(c)))
        .unwrap_or(value_uom.len());
    let (value, unit) = (1..=numeric).rev().find_map(|n| {
        value_uom[..n]
            .parse::<f64>()
            .ok()
            .map(|v| (v, &value_uom[n..]))
    })?;
    let field = |i: usize| {
        fields
            .get(i)
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    // min and max are plain numbers when present.
    let number = |i: usize| -> Option<Option<f64>> {
        match field(i) {
            None => Some(None),
            Some(s) => s.parse::<f64>().ok().map(Some),
        }
    };
    let (min, max) = (number(3)?, number(4)?);
    Some(Some(ExpectedMetric {
        name,
        value,
        unit: (!unit.is_empty()).then(|| unit.to_string()),
        warn: field(1),
        crit: field(2),
        min,
        max,
    }))
}

/// Replace every number (digits, with a decimal point between digits) by `N`.
fn mask(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    let mut in_number = false;
    while let Some(c) = chars.next() {
        let digit_follows = chars.peek().is_some_and(char::is_ascii_digit);
        if c.is_ascii_digit() {
            if !in_number {
                out.push('N');
            }
            in_number = true;
        } else if !(in_number && c == '.' && digit_follows) {
            in_number = false;
            out.push(c);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Running a plugin directly, in the environment the agent gives its plugins.

struct Direct {
    exit_code: i32,
    stdout: String,
    stderr: String,
}

async fn run_direct(argv: &[String]) -> Direct {
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        // What the agent passes to a plugin (agent/src/checks/exec.rs): a few variables
        // and LC_ALL=C, so numbers are printed the same way on both sides.
        .env_clear()
        .envs(
            ["PATH", "HOME", "TZ", "USER", "LOGNAME", "TMPDIR", "LANG"]
                .iter()
                .filter_map(|k| std::env::var_os(k).map(|v| (*k, v))),
        )
        .env("LC_ALL", "C");
    if std::env::var_os("PATH").is_none() {
        cmd.env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
    }
    let out = tokio::time::timeout(T, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{argv:?} did not finish within {T:?}"))
        .unwrap_or_else(|e| panic!("cannot run {argv:?}: {e}"));
    Direct {
        exit_code: out
            .status
            .code()
            .unwrap_or_else(|| panic!("{argv:?} was killed: {:?}", out.status)),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Every difference between the agent's result and what the plugin printed directly.
fn differences(case: &Case, want: &Expected, got: &Value) -> Vec<String> {
    let mut diffs = Vec::new();
    let mut same = |what: &str, want: Value, got: &Value| {
        if &want != got {
            diffs.push(format!("{what}: direct {want}, agent {got}"));
        }
    };
    same("status", want.status.into(), &got["status"]);
    same("exit_code", want.exit_code.into(), &got["exit_code"]);
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let (out, long) = (text(&got["output"]), text(&got["long_output"]));
    match case.compare {
        Compare::Exact => {
            same("output", want.output.as_str().into(), &got["output"]);
            same(
                "long_output",
                want.long_output.as_str().into(),
                &long.into(),
            );
        }
        Compare::Masked => {
            let (w, g) = (mask(&want.output), mask(&out));
            if w != g {
                diffs.push(format!(
                    "output (numbers masked): direct {w:?}, agent {g:?}"
                ));
            }
            let (w, g) = (mask(&want.long_output), mask(&long));
            if w != g {
                diffs.push(format!(
                    "long_output (numbers masked): direct {w:?}, agent {g:?}"
                ));
            }
        }
    }
    let empty = Vec::new();
    let metrics = got["metrics"].as_array().unwrap_or(&empty);
    let names = |m: &[Value]| -> Vec<String> { m.iter().map(|m| text(&m["name"])).collect() };
    let want_names: Vec<String> = want.metrics.iter().map(|m| m.name.clone()).collect();
    if want_names != names(metrics) {
        diffs.push(format!(
            "metric names: direct {want_names:?}, agent {:?}",
            names(metrics)
        ));
        return diffs;
    }
    for (w, g) in want.metrics.iter().zip(metrics) {
        let opt_str = |v: &Option<String>| v.as_deref().map_or(Value::Null, Value::from);
        let opt_num = |v: Option<f64>| v.map_or(Value::Null, Value::from);
        let field = |k: &str| g.get(k).cloned().unwrap_or(Value::Null);
        for (what, want_v, got_v) in [
            ("unit", opt_str(&w.unit), field("unit")),
            ("warn", opt_str(&w.warn), field("warn")),
            ("crit", opt_str(&w.crit), field("crit")),
        ] {
            if want_v != got_v {
                diffs.push(format!(
                    "metric {:?} {what}: direct {want_v}, agent {got_v}",
                    w.name
                ));
            }
        }
        for (what, want_v, got_v) in [("min", w.min, field("min")), ("max", w.max, field("max"))] {
            if !same_number(want_v, &got_v) {
                diffs.push(format!(
                    "metric {:?} {what}: direct {}, agent {got_v}",
                    w.name,
                    opt_num(want_v)
                ));
            }
        }
        let value_ok = match case.compare {
            Compare::Exact => same_number(Some(w.value), &g["value"]),
            Compare::Masked => g["value"].as_f64().is_some_and(f64::is_finite),
        };
        if !value_ok {
            diffs.push(format!(
                "metric {:?} value: direct {}, agent {}",
                w.name, w.value, g["value"]
            ));
        }
    }
    diffs
}

fn same_number(want: Option<f64>, got: &Value) -> bool {
    match (want, got.as_f64()) {
        (None, None) => got.is_null(),
        (Some(w), Some(g)) => (w - g).abs() <= 1e-9 * w.abs().max(1.0),
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------
// Servers on loopback for the network plugins.

/// A TCP server that, per connection, reads the request first (up to a blank line) when
/// `request_first`, writes `reply`, closes its sending side and drains the rest.
async fn serve_tcp(reply: &'static [u8], request_first: bool) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), async {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while request_first && !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    sock.write_all(reply).await?;
                    sock.shutdown().await?;
                    // Read until the client closes, so closing never resets the connection.
                    while sock.read(&mut chunk).await? > 0 {}
                    Ok::<_, std::io::Error>(())
                })
                .await;
            });
        }
    });
    port
}

fn checks_toml(cases: &[Case]) -> String {
    let mut toml = String::new();
    for c in cases {
        // A JSON array of strings is a valid TOML array.
        toml.push_str(&format!(
            "[[check]]\nname = {:?}\ncommand = {}\ninterval = 2\ntimeout = 15\n\n",
            c.name,
            serde_json::to_string(&c.argv).unwrap()
        ));
    }
    toml
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_reports_what_real_nagios_plugins_print() {
    assert!(
        Path::new(PLUGINS).is_dir(),
        "{PLUGINS} is missing: run ci/setup \
         (it installs monitoring-plugins-basic and monitoring-plugins-standard)"
    );
    // check_dns and check_dig run these; without them both sides would agree on a failure.
    for tool in ["/usr/bin/nslookup", "/usr/bin/dig"] {
        assert!(
            Path::new(tool).exists(),
            "{tool} is missing: run ci/setup (it installs bind9-dnsutils)"
        );
    }
    let dir = tempdir();

    let tcp = serve_tcp(b"OUTPOST READY\r\n", false).await;
    let http = serve_tcp(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 11\r\nConnection: close\r\n\r\noutpost-ok\n",
        true,
    )
    .await;
    let ssh = serve_tcp(b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n", false).await;
    // A port with nothing listening: bound, then released.
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dig_server = serve_dns("127.0.0.1:0", LOCALHOST).await.unwrap();
    // check_dns asks nslookup, which has no port option: its server must be on port 53.
    // The test binds a loopback address of its own there; where it may not (not root, no
    // CAP_NET_BIND_SERVICE), nothing answers and both sides must report the same failure.
    let dns_ip = "127.53.0.1";
    let dns_up = match serve_dns(&format!("{dns_ip}:53"), LOCALHOST).await {
        Ok(_) => true,
        Err(e) => {
            eprintln!("cannot serve DNS on {dns_ip}:53 ({e}): check_dns sees no server");
            false
        }
    };
    let aged = dir.path().join("aged-file");
    std::fs::write(&aged, "twelve bytes").unwrap();
    let (tcp, http, ssh, closed, dig_port) = (
        tcp.to_string(),
        http.to_string(),
        ssh.to_string(),
        closed.to_string(),
        dig_server.port().to_string(),
    );
    let tmp = dir.path().display().to_string();
    let aged = aged.display().to_string();
    let gw_dir = dir.path().join("gateway").display().to_string();

    use Compare::*;
    let ip = "127.0.0.1";
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    // A table, one check per line.
    #[rustfmt::skip]
    let cases = vec![
        case("dummy_ok", Exact, Some(0), &["check_dummy", "0", "all good"]),
        case("dummy_warning", Exact, Some(1), &["check_dummy", "1", "disk 81% | used=81%;80;90;0;100"]),
        // Long output, perfdata on the first line and after it, a quoted label with a
        // space and one with a doubled quote, ranges, and an undetermined value.
        case("dummy_critical", Exact, Some(2), &[
            "check_dummy",
            "2",
            "db down | 'free space'=12.5GB;@10:20;~:5;0;2048 'it''s'=3\n\
             replica 1 lost\nreplica 2 lost | lag=5.5s;;;0\nqueue=U;10;20",
        ]),
        case("dummy_unknown", Exact, Some(3), &["check_dummy", "3"]),
        // Not a Nagios state: the plugin itself says so and exits 3.
        case("dummy_bad_state", Exact, Some(3), &["check_dummy", "4", "x"]),
        words("load", Masked, Some(0), "check_load -w 50,40,30 -c 60,50,40"),
        words("load_scaled", Masked, Some(0), "check_load -r -w 50,40,30 -c 60,50,40"),
        // Absolute thresholds (MiB): a percentage turns WARNING on a nearly full build disk.
        words("disk", Masked, Some(0), &format!("check_disk -w 2 -c 1 -p {tmp}")),
        words("procs", Masked, Some(0), "check_procs -w 5000 -c 10000"),
        // Exactly one process has the gateway's data directory in its arguments (check_procs
        // leaves itself out), so even the count is the same on both sides.
        words("procs_gateway", Exact, Some(0), &format!("check_procs -a {gw_dir} -c 1:1")),
        words("users", Exact, Some(0), "check_users -w 1000 -c 2000"),
        // Exact on a machine without swap, but where there is swap its use moves.
        words("swap", Masked, None, "check_swap -w 10% -c 5%"),
        words("file_age", Masked, Some(0), &format!("check_file_age -f {aged} -w 3600 -c 7200")),
        words("tcp", Masked, Some(0), &format!("check_tcp -H {ip} -p {tcp} -e OUTPOST -w 5 -c 9")),
        words("tcp_refused", Exact, Some(2), &format!("check_tcp -H {ip} -p {closed}")),
        words("http", Masked, Some(0), &format!("check_http -H {ip} -p {http} -u /health -s outpost-ok -w 5 -c 9")),
        words("http_string_missing", Masked, Some(2), &format!("check_http -H {ip} -p {http} -u /health -s not-there")),
        words("ssh", Masked, Some(0), &format!("check_ssh -H {ip} -p {ssh}")),
        words("dns", Masked, dns_up.then_some(0), &format!("check_dns -H localhost -s {dns_ip} -a {ip} -w 5 -c 9 -t 5")),
        words("dns_nxdomain", Exact, Some(2), &format!("check_dns -H nope.example -s {dns_ip} -t 5")),
        words("dig", Masked, Some(0), &format!("check_dig -H {ip} -p {dig_port} -l localhost -a {ip} -w 5 -c 9 -t 5")),
        words("ping", Masked, Some(0), &format!("check_ping -H {ip} -w 1000,50% -c 2000,90% -p 2 -t 10")),
        // check_icmp opens a raw socket: Debian does not make it setuid, so it may fail
        // for anyone but root (the same way on both sides).
        words("icmp", Masked, root.then_some(0), &format!("check_icmp -H {ip} -w 1000,50% -c 2000,90%")),
    ];

    for c in &cases {
        assert!(
            Path::new(&c.argv[0]).exists(),
            "{} is missing: run ci/setup (it installs monitoring-plugins-basic and \
             monitoring-plugins-standard)",
            c.argv[0]
        );
    }

    let gw = Gateway::start(dir.path(), &[]);
    gw.write_checks("nagios.toml", &checks_toml(&cases));
    let agent = Agent::start(dir.path(), "nagios-host", &gw, "");

    let mut failures = Vec::new();
    for c in &cases {
        let got = eventually(T, &format!("the agent's result for {}", c.name), || {
            gw.latest(&agent.fingerprint, &c.name)
        })
        .await;
        // Run directly right after fetching the agent's result (at most one 2 s interval
        // old), so moving numbers have moved little.
        let direct = run_direct(&c.argv).await;
        let want = reference(direct.exit_code, &direct.stdout, &direct.stderr);
        let mut diffs = Vec::new();
        if let Some(code) = c.expect_exit {
            if direct.exit_code != code {
                diffs.push(format!(
                    "the plugin itself exited {} where the case expects {code}",
                    direct.exit_code
                ));
            }
        }
        diffs.extend(differences(c, &want, &got));
        if !diffs.is_empty() {
            failures.push(format!(
                "== {} ({:?})\n  - {}\n  direct exit {}, stdout:\n{}\n  stderr:\n{}\n  agent's result:\n{}",
                c.name,
                c.argv,
                diffs.join("\n  - "),
                direct.exit_code,
                direct.stdout,
                direct.stderr,
                serde_json::to_string_pretty(&got).unwrap()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} plugins differ between a direct run and the agent:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
