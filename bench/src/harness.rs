//! Start the real `outpost-gateway` and `outpost-agent` binaries the way the end-to-end
//! harness (`tests/src/lib.rs`) does — port 0, a fresh data directory, the start lines read
//! from stdout — but with the binaries from a given directory (the release build), the
//! default log level (`RUST_LOG` unset: `info`, as in production) and errors instead of
//! panics.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// Variables that would change what the binaries do behind the benchmark's back.
const CLEARED_ENV: &[&str] = &[
    "RUST_LOG",
    "OUTPOST_CONFIG",
    "OUTPOST_GATEWAY_URL",
    "OUTPOST_ENROLL_KEY",
    "OUTPOST_PIN_SHA256",
    "OUTPOST_CA_FILE",
    "OUTPOST_LISTEN",
    "OUTPOST_DATA_DIR",
    "OUTPOST_CHECKS_DIR",
    "OUTPOST_PLUGINS_DIR",
    "OUTPOST_TLS_CERT",
    "OUTPOST_TLS_KEY",
];

/// How long a binary may take to print its start lines.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A child process, stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last `n` lines the process logged.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Wait until the process has logged a line containing `needle`; fail if it exits or
    /// `limit` passes first.
    pub fn wait_for_log(&mut self, needle: &str, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if text.lines().any(|l| l.contains(needle)) {
                return Ok(());
            }
            self.ensure_running()?;
            if Instant::now() >= deadline {
                bail!(
                    "{} did not log {needle:?} within {limit:?}; its log ends with:\n{}",
                    self.name,
                    self.log_tail(20)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the process has exited (and been reaped).
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Log lines at WARN or ERROR level.
    pub fn problems(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .map(str::to_string)
            .collect()
    }

    /// Fail if the process has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => bail!(
                "{} exited ({status}); its log ends with:\n{}",
                self.name,
                self.log_tail(20)
            ),
            Err(e) => Err(e).with_context(|| format!("cannot poll {}", self.name)),
        }
    }

    /// SIGKILL at once (a crash, as far as its peers can tell), and reap it.
    pub fn kill_now(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`; true if it exited
    /// without the SIGKILL.
    pub fn stop(&mut self, grace: Duration) -> bool {
        if let Ok(Some(_)) = self.child.try_wait() {
            return true;
        }
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.stop(Duration::from_secs(5));
    }
}

/// Start `cmd` with stdout and stderr to `log` (for programs whose start lines are not
/// read: wait for them with [`Proc::wait_for_log`]).
pub fn spawn_logged(name: &'static str, mut cmd: Command, log: &Path) -> Result<Proc> {
    let out =
        std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let err = out.try_clone()?;
    let child = cmd
        .stdout(out)
        .stderr(err)
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {name} ({cmd:?})"))?;
    Ok(Proc {
        name,
        child,
        log: log.to_path_buf(),
    })
}

/// Start `cmd` with stderr to `log`; return it with the first stdout line that starts
/// with each of `prefixes` (without the prefix). Stdout is drained to its end afterwards.
fn spawn_reading(
    name: &'static str,
    mut cmd: Command,
    log: &Path,
    prefixes: &[&str],
) -> Result<(Proc, Vec<String>)> {
    let stderr =
        std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    for k in CLEARED_ENV {
        cmd.env_remove(k);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(stderr)
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {name} ({cmd:?})"))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("{name} has no stdout pipe"))?;
    let mut proc = Proc {
        name,
        child,
        log: log.to_path_buf(),
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Drain to the end: a closed pipe would make the process's next write fail.
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut got: Vec<Option<String>> = vec![None; prefixes.len()];
    let deadline = Instant::now() + START_TIMEOUT;
    while got.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                for (i, p) in prefixes.iter().enumerate() {
                    if got[i].is_none() {
                        if let Some(rest) = line.strip_prefix(p) {
                            got[i] = Some(rest.trim().to_string());
                        }
                    }
                }
            }
            Err(_) => {
                proc.ensure_running()?;
                bail!(
                    "{name} did not print {prefixes:?} within {START_TIMEOUT:?}; its log ends with:\n{}",
                    proc.log_tail(20)
                );
            }
        }
    }
    Ok((proc, got.into_iter().flatten().collect()))
}

/// The directory holding the workspace binaries to benchmark.
pub struct Bins {
    pub dir: PathBuf,
}

impl Bins {
    pub fn new(dir: PathBuf) -> Result<Bins> {
        for name in ["outpost-gateway", "outpost-agent"] {
            let p = dir.join(name);
            if !p.is_file() {
                bail!(
                    "{} is missing: run `cargo build --release --workspace` (ci/bench does) or pass --bin-dir",
                    p.display()
                );
            }
        }
        Ok(Bins { dir })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

pub struct Gateway {
    pub proc: Proc,
    pub addr: String,
    pub pin: String,
    pub enroll_key: String,
    pub data_dir: PathBuf,
}

impl Gateway {
    /// Start a gateway on a free loopback port with its data directory `dir/gateway`.
    pub fn start(bins: &Bins, dir: &Path) -> Result<Gateway> {
        Self::start_with(bins, dir, &[])
    }

    /// Where [`Gateway::start`] keeps the data directory of a gateway started under `dir`
    /// (to put files there before it starts).
    pub fn data_dir_in(dir: &Path) -> PathBuf {
        dir.join("gateway")
    }

    /// [`Gateway::start`] with more `serve` options (e.g. `--bus nats://…`).
    pub fn start_with(bins: &Bins, dir: &Path, args: &[String]) -> Result<Gateway> {
        Self::start_at(bins, dir, "127.0.0.1:0", args)
    }

    /// [`Gateway::start_with`] listening on `listen` (a gateway's former address, to start
    /// it again where its agents dial).
    pub fn start_at(bins: &Bins, dir: &Path, listen: &str, args: &[String]) -> Result<Gateway> {
        let data_dir = Self::data_dir_in(dir);
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("cannot create {}", data_dir.display()))?;
        let mut cmd = Command::new(bins.path("outpost-gateway"));
        cmd.args(["serve", "--listen", listen, "--data-dir"])
            .arg(&data_dir)
            .args(args);
        // The bench measures what a gateway can carry, not the per-agent rate policy
        // (which would cap a few simulated agents far below it); a baseline binary that
        // predates the options runs without them.
        if Self::serve_help(bins).contains("--agent-max-results-per-sec") {
            cmd.args([
                "--agent-max-results-per-sec",
                "0",
                "--agent-max-bytes-per-sec",
                "0",
            ]);
        }
        let (proc, lines) = spawn_reading(
            "outpost-gateway",
            cmd,
            &dir.join("gateway.log"),
            &["listening https://", "pin_sha256 ", "enroll_key_file "],
        )?;
        let key_file = PathBuf::from(&lines[2]);
        let enroll_key = std::fs::read_to_string(&key_file)
            .with_context(|| format!("cannot read the enrollment key {}", key_file.display()))?
            .trim()
            .to_string();
        Ok(Gateway {
            proc,
            addr: lines[0].clone(),
            pin: lines[1].clone(),
            enroll_key,
            data_dir,
        })
    }

    pub fn port(&self) -> Result<u16> {
        self.addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| anyhow!("no port in the gateway's address {:?}", self.addr))
    }

    /// The admin API token (`api.token` in the data directory).
    pub fn api_token(&self) -> Result<String> {
        let p = self.data_dir.join("api.token");
        Ok(std::fs::read_to_string(&p)
            .with_context(|| format!("cannot read {}", p.display()))?
            .trim()
            .to_string())
    }

    /// The fleet operator's token (`operator.token` in the data directory, made at the
    /// gateway's first start): it creates tenants.
    pub fn operator_token(&self) -> Result<String> {
        let p = self.data_dir.join("operator.token");
        Ok(std::fs::read_to_string(&p)
            .with_context(|| format!("cannot read {} (a gateway without tenants?)", p.display()))?
            .trim()
            .to_string())
    }

    /// The `serve` options this gateway binary knows (from `serve --help`).
    pub fn serve_help(bins: &Bins) -> String {
        Command::new(bins.path("outpost-gateway"))
            .args(["serve", "--help"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// `outpost-gateway config push DIR --bus URL`: give a fleet on NATS its checks.
    pub fn config_push(bins: &Bins, dir: &Path, nats_url: &str) -> Result<()> {
        let out = Command::new(bins.path("outpost-gateway"))
            .args(["config", "push"])
            .arg(dir)
            .args(["--bus", nats_url])
            .output()
            .context("cannot run outpost-gateway config push")?;
        if !out.status.success() {
            bail!(
                "outpost-gateway config push failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// The embedded bus's directory (`results.jsonl` and its sealed segments).
    pub fn bus_dir(&self) -> PathBuf {
        self.data_dir.join("bus")
    }
}

pub struct Agent {
    pub proc: Proc,
    pub fingerprint: String,
    /// Its `state_dir` (outbox, `seq` file, secret, `checks.d`).
    pub state_dir: PathBuf,
    config: PathBuf,
}

impl Agent {
    /// Start an agent under `dir/agent` connected to `gw`, running `checks` (TOML
    /// `[[check]]` tables) from its own `checks.d`, split over files of at most
    /// `per_file` checks (a check file may be at most 1 MiB).
    pub fn start(
        bins: &Bins,
        dir: &Path,
        gw: &Gateway,
        checks: &[String],
        max_concurrent: Option<usize>,
    ) -> Result<Agent> {
        Self::start_with_settings(bins, dir, gw, checks, max_concurrent, "")
    }

    /// [`Agent::start`] with `settings` (TOML tables, e.g. `[statsd]`) at the end of its
    /// configuration file.
    pub fn start_with_settings(
        bins: &Bins,
        dir: &Path,
        gw: &Gateway,
        checks: &[String],
        max_concurrent: Option<usize>,
        settings: &str,
    ) -> Result<Agent> {
        const PER_FILE: usize = 1000;
        let state_dir = dir.join("agent");
        let checks_dir = state_dir.join("checks.d");
        std::fs::create_dir_all(&checks_dir)
            .with_context(|| format!("cannot create {}", checks_dir.display()))?;
        for (i, chunk) in checks.chunks(PER_FILE).enumerate() {
            let path = checks_dir.join(format!("bench-{i:02}.toml"));
            std::fs::write(&path, chunk.join("\n"))
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        let machine_id = state_dir.join("machine-id");
        std::fs::write(&machine_id, "outpost-bench\n")
            .with_context(|| format!("cannot write {}", machine_id.display()))?;
        let mut config = format!(
            "gateway_url = {:?}\nenroll_key = {:?}\npin_sha256 = {:?}\nhostname = \"bench\"\n\
             state_dir = {:?}\nmachine_id_file = {:?}\nchecks_dir = {:?}\n",
            format!("wss://{}", gw.addr),
            gw.enroll_key,
            gw.pin,
            state_dir.display().to_string(),
            machine_id.display().to_string(),
            checks_dir.display().to_string(),
        );
        if let Some(c) = max_concurrent {
            config.push_str(&format!("max_concurrent_checks = {c}\n"));
        }
        config.push_str(settings);
        let config_path = state_dir.join("agent.toml");
        std::fs::write(&config_path, config)
            .with_context(|| format!("cannot write {}", config_path.display()))?;
        let (proc, fingerprint) = Self::spawn(bins, &config_path, &dir.join("agent.log"))?;
        Ok(Agent {
            proc,
            fingerprint,
            state_dir,
            config: config_path,
        })
    }

    /// Its configuration file.
    pub fn config(&self) -> &Path {
        &self.config
    }

    fn spawn(bins: &Bins, config: &Path, log: &Path) -> Result<(Proc, String)> {
        let mut cmd = Command::new(bins.path("outpost-agent"));
        cmd.args(["run", "--config"]).arg(config);
        let (proc, mut lines) = spawn_reading("outpost-agent", cmd, log, &["fingerprint "])?;
        Ok((proc, lines.remove(0)))
    }

    /// Start the agent again, after [`Proc::stop`], with the same configuration and state,
    /// logging to `log`.
    pub fn restart(&mut self, bins: &Bins, log: &Path) -> Result<()> {
        if !self.proc.exited() {
            bail!("the agent is still running; stop it before restarting it");
        }
        let (proc, fingerprint) = Self::spawn(bins, &self.config, log)?;
        self.proc = proc;
        if fingerprint != self.fingerprint {
            bail!(
                "the agent came back as {fingerprint}, not {}",
                self.fingerprint
            );
        }
        Ok(())
    }
}
