//! Real time-series databases for the metric export tests: Prometheus (Debian's
//! `prometheus`, with its remote-write receiver on) and VictoriaMetrics (Debian's
//! `victoria-metrics`, which takes InfluxDB line protocol), each on a loopback port with
//! its storage under the test's directory, and their query API (PromQL over HTTP).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{free_ports, spawn_logged, Proc};

/// A plain HTTP/1.0 request on a loopback port: the status and the body, or `None` when
/// nothing answers.
pub fn http(port: u16, method: &str, path: &str, body: &[u8]) -> Option<(u16, String)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .ok()?;
    stream.write_all(body).ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// `s` percent-encoded for a URL's query.
pub fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One series a query found: its labels and its samples, (ms, value) in time order.
pub type Series = (Value, Vec<(i64, f64)>);

/// A server with a Prometheus query API (`/api/v1/query`).
pub trait PromQl {
    fn port(&self) -> u16;

    /// The `data.result` of the PromQL `query` evaluated at `at` (Unix seconds), or
    /// `None` if the server does not answer (or refuses).
    fn query(&self, query: &str, at: f64) -> Option<Vec<Value>> {
        let path = format!("/api/v1/query?query={}&time={at:.3}", encode(query));
        let (status, body) = http(self.port(), "GET", &path, b"")?;
        if status != 200 {
            return None;
        }
        let v: Value = serde_json::from_str(&body).ok()?;
        v["data"]["result"].as_array().cloned()
    }

    /// Every sample of each series `selector` matches over the `window_secs` before `at`:
    /// (labels, [(ms, value)]).
    fn samples(&self, selector: &str, window_secs: u64, at: f64) -> Option<Vec<Series>> {
        let result = self.query(&format!("{selector}[{window_secs}s]"), at)?;
        Some(
            result
                .into_iter()
                .map(|series| {
                    let values = series["values"]
                        .as_array()
                        .map(|vs| {
                            vs.iter()
                                .filter_map(|p| {
                                    let ts = p[0].as_f64()?;
                                    let v = p[1].as_str()?.parse::<f64>().ok()?;
                                    Some(((ts * 1000.0).round() as i64, v))
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    (series["metric"].clone(), values)
                })
                .collect(),
        )
    }
}

fn wait_ready(proc: &mut Proc, port: u16, path: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some((200, _)) = http(port, "GET", path, b"") {
            return;
        }
        if !proc.is_running() || Instant::now() > deadline {
            panic!("{what} did not become ready; log:\n{}", proc.log());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A Prometheus server with its remote-write receiver on; killed when dropped.
pub struct Prometheus {
    pub proc: Proc,
    port: u16,
    home: PathBuf,
}

impl Prometheus {
    /// Start one under `dir/prometheus` (storage kept there across restarts).
    pub fn start(dir: &Path) -> Prometheus {
        let home = dir.join("prometheus");
        std::fs::create_dir_all(&home).unwrap();
        std::fs::write(
            home.join("prometheus.yml"),
            "global:\n  scrape_interval: 1m\n",
        )
        .unwrap();
        let port = free_ports(1)[0];
        let mut p = Prometheus {
            proc: Self::spawn(&home, port),
            port,
            home,
        };
        wait_ready(&mut p.proc, port, "/-/ready", "prometheus");
        p
    }

    fn spawn(home: &Path, port: u16) -> Proc {
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!(
            "--config.file={}",
            home.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            home.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--web.enable-remote-write-receiver")
        .arg("--log.level=warn");
        spawn_logged(cmd, &home.join("prometheus.log"))
    }

    /// Stop it (SIGTERM, as a service stops; SIGKILL after 30 s) and wait for it to exit.
    pub fn stop(&mut self) {
        self.proc.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.proc.is_running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.proc.child.kill();
        let _ = self.proc.child.wait();
    }

    /// Start it again on its port and storage.
    pub fn restart(&mut self) {
        self.stop();
        self.proc = Self::spawn(&self.home, self.port);
        wait_ready(&mut self.proc, self.port, "/-/ready", "prometheus");
    }

    /// The remote-write receiver's URL.
    pub fn write_url(&self) -> String {
        format!("http://127.0.0.1:{}/api/v1/write", self.port)
    }
}

impl PromQl for Prometheus {
    fn port(&self) -> u16 {
        self.port
    }
}

/// A VictoriaMetrics single-node server (InfluxDB line protocol on `/write`, PromQL on
/// `/api/v1/query`); killed when dropped.
pub struct VictoriaMetrics {
    pub proc: Proc,
    port: u16,
}

impl VictoriaMetrics {
    pub fn start(dir: &Path) -> VictoriaMetrics {
        let home = dir.join("victoria-metrics");
        std::fs::create_dir_all(&home).unwrap();
        let port = free_ports(1)[0];
        let mut cmd = Command::new("victoria-metrics");
        cmd.arg(format!("-storageDataPath={}", home.join("data").display()))
            .arg(format!("-httpListenAddr=127.0.0.1:{port}"))
            .arg("-retentionPeriod=100y")
            // Fresh samples are answered at once (not 30 s later), and never from cache.
            .arg("-search.latencyOffset=0s")
            .arg("-search.disableCache")
            .arg("-loggerLevel=ERROR");
        let mut vm = VictoriaMetrics {
            proc: spawn_logged(cmd, &home.join("victoria-metrics.log")),
            port,
        };
        wait_ready(&mut vm.proc, port, "/health", "victoria-metrics");
        vm
    }

    /// The base URL an InfluxDB 1.x client writes to (`/write` is appended).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl PromQl for VictoriaMetrics {
    fn port(&self) -> u16 {
        self.port
    }
}
