//! A real haproxy (Debian's, installed by `ci/setup`) in front of real gateways, running
//! the documented `deploy/haproxy/haproxy.cfg`: the harness replaces only the bind
//! address, the example `server` lines and, while the gateway has no `/readyz`, the
//! health-check path; and it adds a stats socket so tests can read haproxy's view of each
//! gateway (`UP`, `DOWN`). It is not a client of the agents' protocol: tests send HTTPS
//! through it with [`Haproxy::https_get`].

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use tokio::net::TcpStream;

use crate::{eventually, free_ports, spawn_logged, Gateway, Proc};

/// The documented configuration operators copy, which the tests run.
pub fn documented_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/haproxy/haproxy.cfg")
}

/// The backend of the documented configuration, as `show stat` names it.
pub const BACKEND: &str = "gateways";

/// The health-check path of the documented configuration.
pub const DOCUMENTED_HEALTH_PATH: &str = "/readyz";

/// `OUTPOST_HAPROXY` if set, else `haproxy` on `PATH` or in `/usr/sbin` (Debian's).
pub fn haproxy_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("OUTPOST_HAPROXY") {
        return PathBuf::from(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join("haproxy"))
        .find(|p| p.is_file())
        .expect("haproxy not found: run ci/setup (it installs Debian's haproxy)")
}

/// The documented configuration `documented` with its `bind` line listening on `bind`,
/// one `server gwN ADDR ...` line per backend (named gw1, gw2, ... in order, with the
/// options of the example lines), the health check on `health_path`, and a stats socket
/// at `stats_socket` (for the tests only). Panics when the file no longer has what it
/// replaces, so a change to the documented file cannot silently go untested.
pub fn render(
    documented: &str,
    bind: &str,
    backends: &[String],
    health_path: &str,
    stats_socket: &Path,
) -> String {
    assert!(!backends.is_empty(), "haproxy needs at least one backend");
    let mut out = Vec::new();
    let (mut binds, mut servers, mut checks, mut globals) = (0, 0, 0, 0);
    for line in documented.lines() {
        let indent = &line[..line.len() - line.trim_start().len()];
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["global"] => {
                globals += 1;
                out.push(line.to_string());
                out.push(
                    "    # Added by tests/src/haproxy.rs: the tests read server states here."
                        .into(),
                );
                out.push(format!(
                    "    stats socket {} mode 600 level admin",
                    stats_socket.display()
                ));
            }
            ["bind", _, options @ ..] => {
                binds += 1;
                let line = format!("{indent}bind {bind} {}", options.join(" "));
                out.push(line.trim_end().to_string());
            }
            ["server", name, _addr, options @ ..] if name.starts_with("gw") => {
                // The example lines become the real ones, in place of the first.
                servers += 1;
                if servers == 1 {
                    for (i, addr) in backends.iter().enumerate() {
                        let n = i + 1;
                        let line = format!("{indent}server gw{n} {addr} {}", options.join(" "));
                        out.push(line.trim_end().to_string());
                    }
                }
            }
            ["http-check", "send", ..]
                if line.contains(&format!(" uri {DOCUMENTED_HEALTH_PATH}")) =>
            {
                checks += 1;
                out.push(line.replace(
                    &format!(" uri {DOCUMENTED_HEALTH_PATH}"),
                    &format!(" uri {health_path}"),
                ));
            }
            _ => out.push(line.to_string()),
        }
    }
    let file = documented_config();
    assert_eq!(
        globals,
        1,
        "{}: expected one `global` section",
        file.display()
    );
    assert_eq!(
        binds,
        1,
        "{}: expected one `bind` line to replace",
        file.display()
    );
    assert!(
        servers >= 1,
        "{}: no example `server gwN ADDR` lines to replace",
        file.display()
    );
    assert_eq!(
        checks,
        1,
        "{}: expected one `http-check send ... uri {DOCUMENTED_HEALTH_PATH}` line",
        file.display()
    );
    out.join("\n") + "\n"
}

/// A running `haproxy -db` (foreground) with the rendered documented configuration,
/// killed when dropped. Its files are under `dir/haproxy/`: `haproxy.cfg`, `haproxy.log`
/// (connection log and alerts) and `stats.sock`.
pub struct Haproxy {
    pub proc: Proc,
    addr: String,
    config: PathBuf,
    stats_socket: PathBuf,
    backends: Vec<String>,
}

impl Haproxy {
    /// haproxy on a free loopback port in front of `backends` (`127.0.0.1:PORT` each, in
    /// the order of `gw1`, `gw2`, ...), checking them on the documented `/readyz`.
    pub fn start(dir: &Path, backends: &[String]) -> Haproxy {
        Self::start_with_health_path(dir, backends, DOCUMENTED_HEALTH_PATH)
    }

    /// Like [`Haproxy::start`], with the health check on `health_path` instead (for
    /// gateways that do not serve `/readyz`).
    pub fn start_with_health_path(dir: &Path, backends: &[String], health_path: &str) -> Haproxy {
        let home = dir.join("haproxy");
        std::fs::create_dir_all(&home).unwrap();
        let documented = std::fs::read_to_string(documented_config()).unwrap();
        let config = home.join("haproxy.cfg");
        let stats_socket = home.join("stats.sock");
        let log = home.join("haproxy.log");
        for _ in 0..5 {
            let addr = format!("127.0.0.1:{}", free_ports(1)[0]);
            let text = render(&documented, &addr, backends, health_path, &stats_socket);
            std::fs::write(&config, text).unwrap();
            let log_start = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
            let mut cmd = Command::new(haproxy_bin());
            cmd.arg("-db").arg("-f").arg(&config);
            let mut haproxy = Haproxy {
                proc: spawn_logged(cmd, &log),
                addr,
                config: config.clone(),
                stats_socket: stats_socket.clone(),
                backends: backends.to_vec(),
            };
            // haproxy binds all its listeners (the frontend and the stats socket) before
            // it serves any, and exits when one fails: once the stats socket answers, the
            // frontend listens.
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if !haproxy.proc.is_running() {
                    let text = std::fs::read(&log).unwrap_or_default();
                    let ours = String::from_utf8_lossy(&text[log_start as usize..]).to_string();
                    if ours.contains("Address already in use") {
                        break; // another process took the port: try a new one
                    }
                    panic!("haproxy exited while starting; its log:\n{ours}");
                }
                if haproxy.command("show info").is_ok() {
                    return haproxy;
                }
                if Instant::now() > deadline {
                    panic!(
                        "haproxy did not open its stats socket in time; log:\n{}",
                        haproxy.log()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("haproxy: its port was taken by others five times in a row");
    }

    /// `127.0.0.1:PORT`, where agents and clients connect.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The rendered configuration haproxy runs.
    pub fn config(&self) -> &Path {
        &self.config
    }

    /// What haproxy logged: a line per closed connection (which gateway served it), and
    /// alerts and warnings, such as a server going DOWN.
    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// The name haproxy gives backend `i` (0-based) of those passed to `start`: `gw{i+1}`.
    pub fn server_name(&self, i: usize) -> String {
        assert!(
            i < self.backends.len(),
            "haproxy has {} backends",
            self.backends.len()
        );
        format!("gw{}", i + 1)
    }

    /// A command on the stats socket (`show stat`, `show info`, ...), and its answer.
    pub fn command(&self, command: &str) -> std::io::Result<String> {
        let mut sock = UnixStream::connect(&self.stats_socket)?;
        sock.set_read_timeout(Some(Duration::from_secs(5)))?;
        sock.write_all(format!("{command}\n").as_bytes())?;
        let mut answer = String::new();
        sock.read_to_string(&mut answer)?;
        Ok(answer)
    }

    /// `show stat` for the gateways: server name to its row, column name to value (the
    /// columns haproxy documents: `status`, `check_status`, `scur`, `stot`, ...).
    pub fn stat(&self) -> BTreeMap<String, BTreeMap<String, String>> {
        let csv = self.command("show stat").expect("haproxy stats socket");
        let mut lines = csv.lines();
        let header: Vec<&str> = lines
            .next()
            .and_then(|h| h.strip_prefix("# "))
            .expect("show stat header")
            .split(',')
            .collect();
        lines
            .map(|l| {
                header
                    .iter()
                    .map(|h| h.to_string())
                    .zip(l.split(',').map(String::from))
            })
            .map(|row| row.collect::<BTreeMap<String, String>>())
            .filter(|row| {
                row.get("pxname").map(String::as_str) == Some(BACKEND)
                    && row.get("svname").is_some_and(|s| s != "BACKEND")
            })
            .map(|row| (row["svname"].clone(), row))
            .collect()
    }

    /// haproxy's view of each gateway: server name to its `status` ("UP", "DOWN",
    /// "UP 1/2" while going down, "DOWN 1/2" while coming up, "no check").
    pub fn server_status(&self) -> BTreeMap<String, String> {
        self.stat()
            .into_iter()
            .map(|(name, row)| (name, row.get("status").cloned().unwrap_or_default()))
            .collect()
    }

    /// Poll until haproxy reports `server` with exactly `status` ("UP", "DOWN"). "UP"
    /// also needs a passed health check (`check_status` L7OK): haproxy shows a server
    /// UP before its first check.
    pub async fn wait_status(&self, server: &str, status: &str, timeout: Duration) {
        let what = format!("haproxy to see {server} {status}");
        eventually(timeout, &what, || async {
            let stat = self.stat();
            let row = stat.get(server)?;
            let checked = status != "UP" || row.get("check_status")? == "L7OK";
            (row.get("status")? == status && checked).then_some(())
        })
        .await
    }

    /// An HTTPS `GET path` through haproxy, trusting the gateways' certificate by `pin`:
    /// the status and body, or what failed (connection, TLS, HTTP) so tests can poll.
    pub async fn https_get(
        &self,
        pin: &str,
        path: &str,
        token: Option<&str>,
    ) -> Result<(u16, String), String> {
        let mut conn = self.connect(pin).await?;
        request(&mut conn, path, token).await
    }

    /// Which of `gateways` answers a connection through haproxy: on one connection (one
    /// gateway), an API request with each gateway's admin token in turn; only the gateway
    /// that issued a token accepts it. Returns the index into `gateways`.
    pub async fn answering_gateway(&self, gateways: &[&Gateway]) -> Result<usize, String> {
        let pin = &gateways.first().ok_or("no gateways")?.pin;
        let mut conn = self.connect(pin).await?;
        for (i, gw) in gateways.iter().enumerate() {
            let (status, body) = request(&mut conn, "/api/v1/agents", Some(&gw.token)).await?;
            match status {
                200 => return Ok(i),
                401 => continue,
                _ => return Err(format!("GET /api/v1/agents: {status} {body}")),
            }
        }
        Err("no gateway accepted its own token: haproxy reached another server".into())
    }

    async fn connect(
        &self,
        pin: &str,
    ) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, String> {
        let trust = outpost_agent::settings::Trust::Pin(pin.to_string());
        let config = outpost_agent::tls::client_config(&trust).map_err(|e| e.to_string())?;
        let tcp = TcpStream::connect(&self.addr)
            .await
            .map_err(|e| format!("connect {}: {e}", self.addr))?;
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS through {}: {e}", self.addr))?;
        let io = hyper_util::rt::TokioIo::new(tls);
        let (sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        Ok(sender)
    }
}

async fn request(
    conn: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    path: &str,
    token: Option<&str>,
) -> Result<(u16, String), String> {
    let mut req = hyper::Request::get(path).header("host", "localhost");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = conn
        .send_request(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .map_err(|e| format!("GET {path}: {e}"))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("GET {path}: body: {e}"))?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into()))
}
