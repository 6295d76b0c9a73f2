//! Harness for the end-to-end suite: start the real `outpost-gateway` and `outpost-agent`
//! binaries in a temporary directory per test, on port 0, and talk to them over real TLS.
//!
//! The binaries are the ones `cargo build --workspace` left beside this test executable;
//! `ci/test` builds them once for every test.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use tokio::net::TcpStream;

pub use serde_json::Value;

pub mod chaos;
mod dns;
pub use dns::serve_dns;

/// Path of a workspace binary built next to the running test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(|d| {
            if d.ends_with("deps") {
                d.parent()
            } else {
                Some(d)
            }
        })
        .expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace` before the end-to-end tests (ci/test does)",
        path.display()
    );
    path
}

/// Where `ci/dist` put the cross-built artifacts: `OUTPOST_DIST_DIR`, else `<workspace>/dist`.
pub fn dist_dir() -> PathBuf {
    match std::env::var_os("OUTPOST_DIST_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist"),
    }
}

/// Path of one artifact `ci/dist` builds (e.g. `outpost-agent-aarch64-unknown-linux-musl`).
pub fn dist_artifact(name: &str) -> PathBuf {
    let path = dist_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `ci/dist` (or `ci/dist --profile dev`) before this test; ci/test does",
        path.display()
    );
    path
}

/// Wall-clock milliseconds since the Unix epoch, as results carry them.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Poll `f` every 100 ms until it returns `Some`, or panic with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A child process killed when dropped.
pub struct Proc {
    pub child: Child,
    pub stderr_path: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child by pid.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Everything the process logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Wait until the process has logged `needle`, or panic after `timeout` with the log.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log().contains(needle) {
            if Instant::now() > deadline {
                panic!(
                    "no {needle:?} in the log within {timeout:?}:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Wait for the process to exit, up to `timeout`; returns its exit code.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start `cmd` with stderr to `log` and return it with the stdout lines that `want`
/// accepts, read until it has seen `lines` of them.
/// A copy of `cmd`: program, arguments and environment.
fn clone_command(cmd: &Command) -> Command {
    let mut copy = Command::new(cmd.get_program());
    copy.args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => copy.env(k, v),
            None => copy.env_remove(k),
        };
    }
    if let Some(d) = cmd.get_current_dir() {
        copy.current_dir(d);
    }
    copy
}

fn spawn_reading(
    cmd: Command,
    log: &Path,
    lines: usize,
    want: impl Fn(&str) -> bool,
) -> (Proc, Vec<String>) {
    try_spawn_reading(cmd, log, lines, want)
        .unwrap_or_else(|log| panic!("process did not print its start lines; log:\n{log}"))
}

/// [`spawn_reading`], giving the log instead of panicking when the process does not print
/// its start lines (exited, or silent for 20 s).
fn try_spawn_reading(
    mut cmd: Command,
    log: &Path,
    lines: usize,
    want: impl Fn(&str) -> bool,
) -> Result<(Proc, Vec<String>), String> {
    let stderr = std::fs::File::create(log).expect("log file");
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(stderr)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Drain to the end even after the caller stopped listening: a closed pipe would
        // make the process's next write fail.
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let proc = Proc {
        child,
        stderr_path: log.to_path_buf(),
    };
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < lines {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if want(&l) => got.push(l),
            Ok(_) => {}
            Err(_) => return Err(proc.log()),
        }
    }
    Ok((proc, got))
}

pub struct Gateway {
    pub proc: Proc,
    pub addr: String,
    pub pin: String,
    /// `sha256//BASE64` of the certificate's public key, for `curl --pinnedpubkey`.
    pub curl_pin: String,
    pub data_dir: PathBuf,
    pub checks_dir: PathBuf,
    pub token: String,
    pub enroll_key: String,
}

impl Gateway {
    /// Start a gateway with its data directory under `dir`.
    pub fn start(dir: &Path, extra_args: &[&str]) -> Gateway {
        Self::start_on(dir, "127.0.0.1:0", extra_args)
    }

    pub fn start_on(dir: &Path, listen: &str, extra_args: &[&str]) -> Gateway {
        Self::start_wrapped(dir, listen, &[], extra_args)
    }

    /// Like [`Gateway::start_on`], with the gateway's command line run by `wrapper` (e.g.
    /// a shell that lowers its file descriptor limit first and then `exec`s it, so the pid
    /// is the gateway's; the gateway's argv follows the wrapper's arguments).
    pub fn start_wrapped(
        dir: &Path,
        listen: &str,
        wrapper: &[&str],
        extra_args: &[&str],
    ) -> Gateway {
        let data_dir = dir.join("gateway");
        let checks_dir = data_dir.join("checks.d");
        std::fs::create_dir_all(&checks_dir).unwrap();
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(bin("outpost-gateway"));
                cmd
            }
            None => Command::new(bin("outpost-gateway")),
        };
        cmd.args([
            "serve",
            "--listen",
            listen,
            "--checks-poll",
            "1",
            "--data-dir",
        ])
        .arg(&data_dir)
        .args(extra_args)
        .env("RUST_LOG", "info,outpost_gateway=debug");
        let start = |cmd| {
            try_spawn_reading(cmd, &dir.join("gateway.log"), 3, |l| {
                l.starts_with("listening ")
                    || l.starts_with("pin_sha256 ")
                    || l.starts_with("curl_pin ")
            })
        };
        // A gateway restarted on its old port: until then the port was free, and any
        // connection of this machine may have been given it as its source port. Wait for
        // it to be released.
        let mut tries = 0;
        let (proc, lines) = loop {
            match start(clone_command(&cmd)) {
                Ok(started) => break started,
                Err(log) if log.contains("Address already in use") && tries < 50 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(log) => panic!("the gateway did not start; log:\n{log}"),
            }
        };
        let addr = lines[0]
            .trim_start_matches("listening https://")
            .to_string();
        let pin = lines[1].trim_start_matches("pin_sha256 ").to_string();
        let curl_pin = lines[2].trim_start_matches("curl_pin ").to_string();
        // A gateway that joined a tenant another gateway created has no clear copy of the
        // tenant's key and token unless it was given one: empty then.
        let read = |f: &str| {
            std::fs::read_to_string(data_dir.join(f))
                .map(|s| s.trim().to_string())
                .unwrap_or_default()
        };
        Gateway {
            proc,
            addr,
            pin,
            curl_pin,
            token: read("api.token"),
            enroll_key: read("enroll.key"),
            data_dir,
            checks_dir,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.rsplit(':').next().unwrap().parse().unwrap()
    }

    pub fn url(&self) -> String {
        format!("wss://{}", self.addr)
    }

    /// Write a check file into the gateway's checks directory.
    pub fn write_checks(&self, file: &str, toml: &str) {
        let tmp = self.checks_dir.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, toml).unwrap();
        std::fs::rename(&tmp, self.checks_dir.join(file)).unwrap();
    }

    /// A TLS connection to the gateway that trusts it by pin, like an agent would.
    pub async fn tls(&self) -> tokio_rustls::client::TlsStream<TcpStream> {
        let config = outpost_agent::tls::client_config(&outpost_agent::settings::Trust::Pin(
            self.pin.clone(),
        ))
        .unwrap();
        let tcp = TcpStream::connect(&self.addr).await.unwrap();
        tokio_rustls::TlsConnector::from(config)
            .connect(
                rustls::pki_types::ServerName::try_from("localhost").unwrap(),
                tcp,
            )
            .await
            .unwrap()
    }

    /// An HTTPS request; returns the status and the body parsed as JSON (or as a string).
    pub async fn http(&self, method: &str, path: &str, token: Option<&str>) -> (u16, Value) {
        self.http_json(method, path, token, None).await
    }

    /// [`Gateway::http`] with a JSON request body.
    pub async fn http_json(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let io = hyper_util::rt::TokioIo::new(self.tls().await);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost");
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let payload = match body {
            Some(b) => {
                req = req.header("content-type", "application/json");
                Bytes::from(serde_json::to_vec(b).unwrap())
            }
            None => Bytes::new(),
        };
        let resp = sender
            .send_request(req.body(Full::new(payload)).unwrap())
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let value = serde_json::from_slice(&body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into()));
        (status, value)
    }

    /// `GET` an API path with the admin token, expecting 200.
    pub async fn api(&self, path: &str) -> Value {
        let (status, body) = self
            .http("GET", &format!("/api/v1{path}"), Some(&self.token))
            .await;
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    pub async fn agent(&self, fingerprint: &str) -> Option<Value> {
        let (status, body) = self
            .http(
                "GET",
                &format!("/api/v1/agents/{fingerprint}"),
                Some(&self.token),
            )
            .await;
        (status == 200).then_some(body)
    }

    /// The newest result of `check` on the agent, if any.
    pub async fn latest(&self, fingerprint: &str, check: &str) -> Option<Value> {
        let (status, checks) = self
            .http(
                "GET",
                &format!("/api/v1/agents/{fingerprint}/checks"),
                Some(&self.token),
            )
            .await;
        if status == 404 {
            return None;
        }
        assert_eq!(status, 200, "{checks}");
        checks
            .as_array()?
            .iter()
            .find(|c| c["check"] == check)
            .and_then(|c| c.get("latest").cloned())
            .filter(|l| !l.is_null())
    }

    /// Every line of one of the embedded bus's logs (`results`, `presence`, `audit`),
    /// across all its segments, oldest first; for `results` the home tenant's log, then
    /// every other tenant's (`bus/tenants/<tenant>/`). A line still being written is left
    /// out.
    pub fn bus_log(&self, name: &str) -> Vec<Value> {
        let bus = self.data_dir.join("bus");
        let mut dirs = vec![bus.clone()];
        if name == "results" {
            if let Ok(tenants) = std::fs::read_dir(bus.join("tenants")) {
                let mut more: Vec<PathBuf> = tenants.filter_map(|e| Some(e.ok()?.path())).collect();
                more.sort();
                dirs.extend(more);
            }
        }
        dirs.iter()
            .flat_map(|d| {
                outpost_gateway::bus::segments::read_all(d, name)
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Every result of the agent on the bus, in the order the bus stored them.
    pub fn bus_all(&self, fingerprint: &str) -> Vec<Value> {
        self.bus_log("results")
            .into_iter()
            .filter(|l| l["fingerprint"] == fingerprint)
            .map(|l| l["result"].clone())
            .collect()
    }

    /// Every result of `check` from the agent `fingerprint` that the embedded bus holds,
    /// in the order they were made durable.
    pub fn bus_results(&self, fingerprint: &str, check: &str) -> Vec<Value> {
        self.bus_all(fingerprint)
            .into_iter()
            .filter(|r| r["check"] == check)
            .collect()
    }

    pub async fn metric(&self, line_prefix: &str) -> u64 {
        let (_, body) = self.http("GET", "/metrics", None).await;
        let text = body.as_str().unwrap_or_default().to_string();
        text.lines()
            .find(|l| l.starts_with(line_prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("metric {line_prefix} not found in:\n{text}"))
    }
}

pub struct Agent {
    pub proc: Proc,
    pub fingerprint: String,
    pub state_dir: PathBuf,
    pub config_path: PathBuf,
}

impl Agent {
    /// Start an agent under `dir/name` whose configuration is `toml`.
    pub fn start_with_config(dir: &Path, name: &str, toml: &str) -> Agent {
        Self::start_wrapped(dir, name, toml, &[])
    }

    /// Like [`Agent::start_with_config`], with the agent's command line run by `wrapper`
    /// (e.g. `unshare` and a shell that changes its view of the system first; the agent's
    /// argv follows the wrapper's arguments).
    pub fn start_wrapped(dir: &Path, name: &str, toml: &str, wrapper: &[&str]) -> Agent {
        let agent = bin("outpost-agent");
        let mut argv: Vec<&std::ffi::OsStr> = wrapper.iter().map(|a| a.as_ref()).collect();
        argv.push(agent.as_os_str());
        Self::start_program(dir, name, toml, &argv)
    }

    /// Like [`Agent::start_with_config`], with `argv` as the command that runs the agent:
    /// the agent binary (any build of it, e.g. a cross-built one), optionally behind an
    /// emulator or wrapper. `run --config PATH` is appended.
    pub fn start_program(dir: &Path, name: &str, toml: &str, argv: &[&std::ffi::OsStr]) -> Agent {
        let state_dir = dir.join(name);
        std::fs::create_dir_all(&state_dir).unwrap();
        std::fs::write(state_dir.join("machine-id"), format!("machine-{name}\n")).unwrap();
        let config_path = state_dir.join("agent.toml");
        let toml = format!(
            "state_dir = {:?}\nmachine_id_file = {:?}\n{toml}",
            state_dir.display().to_string(),
            state_dir.join("machine-id").display().to_string()
        );
        std::fs::write(&config_path, toml).unwrap();
        let (program, args) = argv.split_first().expect("a program to run the agent");
        let mut cmd = Command::new(program);
        cmd.args(args);
        cmd.args(["run", "--config"])
            .arg(&config_path)
            .env("RUST_LOG", "info,outpost_agent=debug")
            .env_remove("OUTPOST_GATEWAY_URL")
            .env_remove("OUTPOST_ENROLL_KEY")
            .env_remove("OUTPOST_PIN_SHA256");
        let (proc, lines) = spawn_reading(cmd, &dir.join(format!("{name}.log")), 1, |l| {
            l.starts_with("fingerprint ")
        });
        Agent {
            proc,
            fingerprint: lines[0].trim_start_matches("fingerprint ").to_string(),
            state_dir,
            config_path,
        }
    }

    /// Start an agent that enrolls with `gw`, trusting it by pin.
    pub fn start(dir: &Path, name: &str, gw: &Gateway, extra: &str) -> Agent {
        let toml = format!(
            "gateway_url = {:?}\nenroll_key = {:?}\npin_sha256 = {:?}\nhostname = {name:?}\n{extra}",
            gw.url(),
            gw.enroll_key,
            gw.pin
        );
        Self::start_with_config(dir, name, &toml)
    }
}

/// The numbers `field=N` on the complete log lines containing `message`, in order (the
/// last line may still be being written).
pub fn logged(log: &str, message: &str, field: &str) -> Vec<u64> {
    let key = format!("{field}=");
    log.split_inclusive('\n')
        .filter(|l| l.ends_with('\n') && l.contains(message))
        .filter_map(|l| {
            let at = l.find(&key)? + key.len();
            let digits = l[at..].split(|c: char| !c.is_ascii_digit()).next()?;
            digits.parse().ok()
        })
        .collect()
}

/// A random lowercase UUID (v4 layout) without another dependency.
pub fn uuid_v4() -> String {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .unwrap();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A `hello` as a test client sends it, with `credential` and `hostname`.
pub fn raw_hello(
    fp: &str,
    credential: outpost_protocol::Credential,
    hostname: &str,
) -> outpost_protocol::AgentFrame {
    outpost_protocol::AgentFrame::Hello(outpost_protocol::Hello {
        protocol: outpost_protocol::PROTOCOL_VERSION,
        fingerprint: fp.to_string(),
        credential,
        agent_version: "test".into(),
        os: "linux".into(),
        arch: "x86_64".into(),
        hostname: hostname.into(),
        labels: Default::default(),
        groups: vec![],
        config_hash: None,
        features: vec![],
    })
}

/// The next text frame from a raw websocket (panics after 30 s or when it ends).
pub async fn next_text<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        match tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("a frame in time")
        {
            Some(Ok(Message::Text(t))) => return t.to_string(),
            Some(Ok(_)) => continue,
            other => panic!("connection ended: {other:?}"),
        }
    }
}

/// The next text frame from a raw websocket, parsed as JSON.
pub async fn next_json<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> Value
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let text = next_text(ws).await;
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// Open a raw `outpost.v1` websocket to the gateway, for tests that misbehave on purpose.
pub async fn raw_ws(
    gw: &Gateway,
) -> tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("wss://{}/ws", gw.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        outpost_protocol::SUBPROTOCOL.parse().unwrap(),
    );
    // The client's own limit is far above the gateway's so the gateway's limit is tested.
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20));
    let (ws, _) = tokio_tungstenite::client_async_with_config(req, gw.tls().await, Some(config))
        .await
        .unwrap();
    ws
}

/// Read from a raw websocket until the gateway closes it; returns the close code.
pub async fn close_code<S>(
    ws: &mut tokio_tungstenite::WebSocketStream<S>,
    timeout: Duration,
) -> Option<u16>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    tokio::time::timeout(timeout, async {
        while let Some(m) = ws.next().await {
            match m {
                Ok(Message::Close(Some(c))) => return Some(u16::from(c.code)),
                Ok(Message::Close(None)) => return None,
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
}

pub fn tempdir() -> tempfile::TempDir {
    // OUTPOST_E2E_KEEP=1 keeps every test's directory (logs, data) for a post-mortem.
    tempfile::Builder::new()
        .prefix("outpost-e2e-")
        .disable_cleanup(std::env::var_os("OUTPOST_E2E_KEEP").is_some())
        .tempdir()
        .unwrap()
}
pub mod debian;
pub mod fleet;
pub mod flip;
pub mod haproxy;
pub mod nats;
pub mod receivers;
pub mod sse;
pub mod tsdb;
pub mod webdriver;
pub mod wine;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (ci/setup installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A test CA, and a server certificate it issued for `dns_name`, made with openssl in `dir`
/// (created): returns the paths of the CA certificate, the certificate and its key.
pub fn test_pki(dir: &Path, dns_name: &str) -> (PathBuf, PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let p256 = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let ca = [
        &["req", "-x509"],
        &p256[..],
        &["-keyout", "ca.key", "-out", "ca.pem"],
    ]
    .concat();
    openssl(
        dir,
        &[&ca[..], &["-days", "2", "-subj", "/CN=Outpost Test CA"]].concat(),
    );
    let csr = [
        &["req"],
        &p256[..],
        &["-keyout", "gw.key", "-out", "gw.csr"],
    ]
    .concat();
    let subject = format!("/CN={dns_name}");
    openssl(dir, &[&csr[..], &["-subj", &subject]].concat());
    std::fs::write(
        dir.join("ext.cnf"),
        format!("subjectAltName=DNS:{dns_name}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"),
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "gw.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "gw.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
    (dir.join("ca.pem"), dir.join("gw.pem"), dir.join("gw.key"))
}

/// `n` distinct loopback TCP ports that were free a moment ago, for servers that cannot
/// bind port 0 themselves (or must keep their ports across restarts). Another process
/// may still take one before the server binds it: callers retry with new ports when the
/// server reports "address already in use".
pub fn free_ports(n: usize) -> Vec<u16> {
    // All bound at once, so the kernel hands out distinct ports.
    let listeners: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// Start `cmd` with its stdout and stderr appended to `log` (created if missing), so a
/// restarted server keeps one log across its lives; stdin is closed.
pub fn spawn_logged(mut cmd: Command, log: &Path) -> Proc {
    let open = || {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("open {}: {e}", log.display()))
    };
    let child = cmd
        .stdin(Stdio::null())
        .stdout(open())
        .stderr(open())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {:?}: {e}", cmd.get_program()));
    Proc {
        child,
        stderr_path: log.to_path_buf(),
    }
}
