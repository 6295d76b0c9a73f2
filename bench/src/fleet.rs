//! The fleet parts (issue 5): many simulated agents against the real release gateway.
//!
//! - [`idle`]: idle agents held by one gateway and its memory per connection, next to the
//!   same number of idle NATS clients on nats-server's TLS websocket listener;
//! - [`results`]: acked results per second through a gateway on NATS JetStream, next to
//!   raw pipelined JetStream publishing of the same results (and the embedded bus);
//! - [`rpc`]: run-now latency through one gateway to an agent on another;
//! - [`tenants`]: one tenant's ack and run-now latency, alone and while another tenant
//!   floods at ten times its result rate on the same gateway;
//! - [`storm`]: a gateway killed with SIGKILL and the time until all its agents are back
//!   on the other one;
//! - [`alerting`]: from a failing result to a webhook receiver's 2xx on one gateway and
//!   on a NATS fleet, and notifications per second to one receiver next to Prometheus
//!   Alertmanager.
//!
//! The agents are [`loadgen`]'s tasks in this process; the gateways and nats-server are
//! child processes. Parts that need the gateway's NATS bus (`serve --bus nats://…`) say
//! so in their rows when the binary has no such option.

pub mod alerting;
pub mod history;
pub mod https;
mod idle;
pub mod loadgen;
pub mod nats;
mod results;
mod rpc;
mod storm;
mod stream;
mod tenants;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use outpost_protocol::Credential;
use sha2::Digest;

use crate::harness::{Bins, Gateway};
use loadgen::Identity;

pub use alerting::alerting;
pub use history::history;
pub use idle::idle;
pub use results::results;
pub use rpc::rpc;
pub use storm::storm;
pub use stream::stream;
pub use tenants::tenants;

/// The sizes and durations of the fleet parts.
pub struct FleetPlan {
    /// Idle agents to ramp to (capped by the file-descriptor limit, see [`fd_budget`]).
    pub idle_agents: usize,
    /// Seconds the idle agents are held before the final reading.
    pub idle_hold: Duration,
    /// Agents sending results, and results per batch.
    pub results_agents: usize,
    pub results_batch: usize,
    pub results_warmup: Duration,
    pub results_window: Duration,
    /// Agents on the far gateway, sequential calls, and concurrent callers × calls each.
    pub rpc_agents: usize,
    pub rpc_sequential: usize,
    pub rpc_concurrent: (usize, usize),
    /// The tenants part: agents of each tenant; the quiet tenant's batch and the pace of
    /// every agent's batches; the flooding tenant's batch, its result-rate limit and how
    /// many times that limit its agents offer; run-now calls per row; warm-up and
    /// measuring window of each row.
    pub tenants_agents: usize,
    pub tenants_quiet_batch: usize,
    pub tenants_quiet_pace: Duration,
    pub tenants_noisy_batch: usize,
    pub tenants_noisy_limit: u64,
    pub tenants_flood_factor: u64,
    pub tenants_runnow_calls: usize,
    pub tenants_warmup: Duration,
    pub tenants_window: Duration,
    /// Agents in the reconnect storm (embedded bus), and in the NATS storm (they enroll
    /// one by one first, so fewer).
    pub storm_agents: usize,
    pub storm_nats_agents: usize,
    /// Dials in progress at once while ramping up (the storm has its own).
    pub dial_concurrency: usize,
    pub storm_dial_concurrency: usize,
    /// The alerting part: simulated agents each sending a result every `alerting_pace`,
    /// how many of them turn CRITICAL, over what window; agents turning CRITICAL at once
    /// for the notifications per second, and the longest their notifications are waited
    /// for; dials in progress at once while ramping up.
    pub alerting_agents: usize,
    pub alerting_failing: usize,
    pub alerting_pace: Duration,
    pub alerting_spread: Duration,
    pub alerting_burst: usize,
    pub alerting_burst_limit: Duration,
    pub alerting_dial_concurrency: usize,
    /// Simulated agents on the two-gateway fleet whose gateways are all restarted at once.
    pub alerting_restart_agents: usize,
    /// Agents whose day of results the bus holds in the history part.
    pub history_agents: usize,
    /// The stream part: clients, results per second, warm-up and window.
    pub stream_clients: usize,
    pub stream_rate: usize,
    pub stream_warmup: Duration,
    pub stream_window: Duration,
    /// The nats-server binary (found on PATH when not given).
    pub nats_server: Option<PathBuf>,
    /// Prometheus Alertmanager (found on PATH when not given).
    pub alertmanager: Option<PathBuf>,
}

impl FleetPlan {
    pub fn new(
        quick: bool,
        idle_agents: Option<usize>,
        nats_server: Option<PathBuf>,
        alertmanager: Option<PathBuf>,
    ) -> Self {
        let q = |full: usize, quick_v: usize| if quick { quick_v } else { full };
        FleetPlan {
            idle_agents: idle_agents.unwrap_or(q(50_000, 2_000)),
            idle_hold: Duration::from_secs(q(20, 3) as u64),
            results_agents: q(50, 10),
            results_batch: 64,
            results_warmup: Duration::from_secs(q(5, 1) as u64),
            results_window: Duration::from_secs(q(20, 3) as u64),
            rpc_agents: q(100, 10),
            rpc_sequential: q(2_000, 100),
            rpc_concurrent: (8, q(250, 20)),
            tenants_agents: q(20, 10),
            tenants_quiet_batch: 8,
            tenants_quiet_pace: Duration::from_millis(100),
            tenants_noisy_batch: 50,
            tenants_noisy_limit: 1000,
            tenants_flood_factor: 10,
            tenants_runnow_calls: q(500, 100),
            tenants_warmup: Duration::from_secs(q(5, 2) as u64),
            tenants_window: Duration::from_secs(q(20, 4) as u64),
            storm_agents: q(10_000, 500),
            storm_nats_agents: q(2_000, 200),
            dial_concurrency: 64,
            storm_dial_concurrency: 1_000,
            alerting_agents: q(10_000, 200),
            alerting_failing: q(100, 10),
            alerting_pace: Duration::from_secs(q(10, 1) as u64),
            alerting_spread: Duration::from_secs(q(10, 1) as u64),
            alerting_burst: q(1_000, 100),
            alerting_burst_limit: Duration::from_secs(q(120, 30) as u64),
            alerting_dial_concurrency: 256,
            alerting_restart_agents: q(2_000, 200),
            history_agents: q(10_000, 200),
            stream_clients: q(100, 10),
            stream_rate: q(10_000, 1_000),
            stream_warmup: Duration::from_secs(q(5, 2) as u64),
            stream_window: Duration::from_secs(q(20, 4) as u64),
            nats_server: nats_server.filter(|p| !p.as_os_str().is_empty()),
            alertmanager: alertmanager.filter(|p| !p.as_os_str().is_empty()),
        }
    }
}

/// Raise this process's soft RLIMIT_NOFILE to its hard limit (the gateways and
/// nats-server it starts inherit it); returns the limit now in force.
pub fn raise_nofile() -> u64 {
    outpost_gateway::listener::admission::raise_nofile().map_or(1024, |n| n.soft)
}

/// How many connections one process can hold under the file-descriptor limit: the
/// limit less a margin for the process's own files. The gateway (one socket per agent)
/// and this tool (one per simulated agent) are each bound by it.
pub fn fd_budget() -> usize {
    (raise_nofile() as usize).saturating_sub(500)
}

/// Whether this gateway binary has the NATS bus (`serve --bus`).
pub fn gateway_has_nats(bins: &Bins) -> bool {
    Gateway::serve_help(bins).contains("--bus")
}

/// The note for a row that needs the NATS bus when the gateway has none.
pub const NO_NATS_BUS: &str = "not run: this gateway build has no `serve --bus nats://…` (the NATS bus is not in this build yet)";

/// `n` agents with secrets, and the gateway's `agents/credentials.json` that knows them
/// (secrets kept as SHA-256, as `gateway/src/credentials.rs` writes it): enrolling 50,000
/// agents would rewrite that file 50,000 times.
pub fn agents_with_secrets(n: usize) -> (Vec<Identity>, String) {
    let mut ids = Vec::with_capacity(n);
    let mut creds = HashMap::with_capacity(n);
    let now = crate::now_ms();
    for _ in 0..n {
        let fingerprint = loadgen::fingerprint();
        let secret = hex::encode(rand::random::<[u8; 24]>());
        creds.insert(
            fingerprint.clone(),
            serde_json::json!({
                "tenant": "default",
                "secret_sha256": hex::encode(sha2::Sha256::digest(secret.as_bytes())),
                "enrolled_at_ms": now,
                "confirmed": true,
            }),
        );
        ids.push(Identity {
            fingerprint,
            credential: Credential::Secret { secret },
        });
    }
    let json = serde_json::to_string(&creds).unwrap_or_else(|_| "{}".into());
    (ids, json)
}

/// `n` new agents that enroll with `key`.
pub fn agents_enrolling(n: usize, key: &str) -> Vec<Identity> {
    (0..n)
        .map(|_| Identity {
            fingerprint: loadgen::fingerprint(),
            credential: Credential::EnrollKey {
                key: key.to_string(),
                proof: loadgen::fingerprint(),
            },
        })
        .collect()
}

/// Put files into the data directory of the gateway that will start under `dir`: the
/// agents' credentials, and/or the enrollment key and API token (so that several gateways
/// agree on them whatever they share).
pub fn prepare_gateway_dir(
    dir: &Path,
    credentials: Option<&str>,
    keys: Option<(&str, &str)>,
) -> Result<()> {
    let data = Gateway::data_dir_in(dir);
    let agents = data.join("agents");
    std::fs::create_dir_all(&agents)
        .with_context(|| format!("cannot create {}", agents.display()))?;
    if let Some(json) = credentials {
        std::fs::write(agents.join("credentials.json"), json)?;
    }
    if let Some((enroll, api)) = keys {
        std::fs::write(data.join("enroll.key"), format!("{enroll}\n"))?;
        std::fs::write(data.join("api.token"), format!("{api}\n"))?;
    }
    Ok(())
}

/// The gateway's address as a socket address.
pub fn gateway_addr(gw: &Gateway) -> Result<std::net::SocketAddr> {
    gw.addr
        .parse()
        .with_context(|| format!("bad gateway address {:?}", gw.addr))
}

/// The check every agent gets, so that run-now has something to call.
const RPC_CHECK: &str = "[[check]]\nname = \"ping\"\ncommand = [\"/bin/true\"]\ninterval = 3600\n";

/// Write [`RPC_CHECK`] into the checks directory of the gateway that will start under
/// `dir` (embedded bus).
pub fn write_rpc_check(dir: &Path) -> Result<()> {
    let checks = Gateway::data_dir_in(dir).join("checks.d");
    std::fs::create_dir_all(&checks)?;
    std::fs::write(checks.join("bench.toml"), RPC_CHECK)?;
    Ok(())
}

/// Write [`RPC_CHECK`] into the checks of `tenant` (not the home tenant) of the gateway
/// that will start under `dir` (embedded bus): `checks.d/<tenant>/`.
pub fn write_tenant_rpc_check(dir: &Path, tenant: &str) -> Result<()> {
    let checks = Gateway::data_dir_in(dir).join("checks.d").join(tenant);
    std::fs::create_dir_all(&checks)?;
    std::fs::write(checks.join("bench.toml"), RPC_CHECK)?;
    Ok(())
}

/// Push [`RPC_CHECK`] to a fleet on NATS (`config push`), from a directory under `dir`.
pub fn push_rpc_check(bins: &Bins, dir: &Path, nats_url: &str) -> Result<()> {
    let config = dir.join("fleet-config");
    std::fs::create_dir_all(&config)?;
    std::fs::write(config.join("bench.toml"), RPC_CHECK)?;
    Gateway::config_push(bins, &config, nats_url)
}

/// `serve` options that give every gateway of a fleet the same certificate (as behind a
/// load balancer), made once under `dir`: agents pin one certificate for all of them.
pub fn shared_tls_args(dir: &Path) -> Result<Vec<String>> {
    std::fs::create_dir_all(dir)?;
    let (cert, key, _) = nats::self_signed(dir)?;
    Ok(vec![
        "--tls-cert".into(),
        cert.display().to_string(),
        "--tls-key".into(),
        key.display().to_string(),
    ])
}

/// A gateway named `name` on NATS at `nats_url`, under `dir/name`, with the fleet's
/// enrollment key and API token and the shared certificate (`tls`, from [`shared_tls_args`]).
pub fn start_nats_gateway(
    bins: &Bins,
    dir: &Path,
    name: &str,
    nats_url: &str,
    keys: (&str, &str),
    tls: &[String],
) -> Result<Gateway> {
    start_nats_gateway_at(bins, dir, name, "127.0.0.1:0", nats_url, keys, tls)
}

/// [`start_nats_gateway`] listening on `listen`: with a gateway's former address, that
/// gateway started again (same id, same data directory) where its agents dial.
pub fn start_nats_gateway_at(
    bins: &Bins,
    dir: &Path,
    name: &str,
    listen: &str,
    nats_url: &str,
    keys: (&str, &str),
    tls: &[String],
) -> Result<Gateway> {
    let d = dir.join(name);
    prepare_gateway_dir(&d, None, Some(keys))?;
    let mut args = vec![
        "--bus".to_string(),
        nats_url.to_string(),
        "--gateway-id".into(),
        format!("bench-{name}"),
    ];
    args.extend(tls.iter().cloned());
    Gateway::start_at(bins, &d, listen, &args)
}

/// Memory in decimal kilobytes, for per-connection figures.
pub fn kb(bytes: f64) -> String {
    format!("{:.1} KB", bytes / 1e3)
}

/// A random token like the gateway's.
pub fn token() -> String {
    hex::encode(rand::random::<[u8; 24]>())
}
