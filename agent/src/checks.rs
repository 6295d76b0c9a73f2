//! Running one check: every kind of check, and how its findings become a result.
//!
//! - program checks: [`exec`] runs a Nagios plugin ([`nagios`] reads its output) or a
//!   JSON plugin ([`json`] reads its document); [`daemon`] keeps a long-running JSON-lines
//!   plugin alive;
//! - built-in probes that need nothing installed: [`system`] (cpu, memory, swap, disk,
//!   load, network, processes) and [`net`] (TCP, HTTP, DNS, Prometheus, JSON sockets).
//!
//! Whatever a check does, it ends as an [`Outcome`] and never as an error: a check that
//! cannot run is an UNKNOWN result that says why.

pub mod daemon;
pub mod exec;
pub mod interpreters;
pub mod json;
pub mod nagios;
pub mod net;
pub mod outcome;
pub mod requests;
pub mod system;

use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_protocol::probe::Probe;
use outpost_protocol::{CheckResult, CheckSpec, Origin};

pub use outcome::Outcome;

use crate::plugins::{PluginError, PluginStore};

use crate::util::now_ms;
/// Longest a check may run, and longest a daemon may stay silent.
pub use outpost_protocol::MAX_TIMEOUT_SECS;

/// What running checks needs from the agent: the plugin store, the interpreter map and
/// the state kept between runs of the system probes.
pub struct Runner {
    pub plugins: Arc<PluginStore>,
    pub interpreters: interpreters::Interpreters,
    pub system: system::SystemProbes,
    pub requests: requests::RequestDaemons,
}

impl Runner {
    pub fn new(plugins: Arc<PluginStore>, interpreters: interpreters::Interpreters) -> Runner {
        Runner {
            plugins,
            interpreters,
            system: system::SystemProbes::new(),
            requests: Default::default(),
        }
    }

    /// The argv a program check runs: a catalog plugin resolved to its verified file, and
    /// an interpreter put in front where the file's extension asks for one.
    pub async fn argv(&self, spec: &CheckSpec) -> Result<Vec<String>, Outcome> {
        let mut argv = spec
            .probe
            .command()
            .map(<[String]>::to_vec)
            .unwrap_or_default();
        if let Some(plugin) = &spec.plugin {
            // Hashing reads the whole file: keep it off the async workers.
            let (store, wanted) = (self.plugins.clone(), plugin.clone());
            let path = tokio::task::spawn_blocking(move || store.verified_path(&wanted))
                .await
                .unwrap_or_else(|e| {
                    Err(PluginError::Io {
                        name: plugin.name.clone(),
                        error: e.to_string(),
                    })
                })
                .map_err(|e| Outcome::unknown(e.to_string()))?;
            match argv.first_mut() {
                Some(program) => *program = path.display().to_string(),
                None => argv.push(path.display().to_string()),
            }
        }
        Ok(self.interpreters.wrap(argv))
    }

    /// Run `spec` once. Daemon checks are not run here: [`daemon::supervise`] keeps them.
    pub async fn run(&self, spec: &CheckSpec, origin: Origin) -> CheckResult {
        let started_at_ms = now_ms();
        let started = Instant::now();
        let timeout = Duration::from_secs(spec.timeout_secs.clamp(1, MAX_TIMEOUT_SECS));
        let outcome = match &spec.probe {
            Probe::Nagios(_) => match self.argv(spec).await {
                Ok(argv) => exec::nagios(&argv, timeout).await,
                Err(o) => o,
            },
            Probe::Json(_) => match self.argv(spec).await {
                Ok(argv) => exec::json(&argv, timeout).await,
                Err(o) => o,
            },
            Probe::Daemon(_) => {
                Outcome::unknown("a daemon check reports on its own; it cannot be run on demand")
            }
            Probe::Request(_) => match self.argv(spec).await {
                Ok(argv) => self.requests.ask(argv, spec, timeout).await,
                Err(o) => o,
            },
            builtin => {
                let work = async {
                    match builtin {
                        Probe::Cpu(_)
                        | Probe::Memory(_)
                        | Probe::Swap(_)
                        | Probe::Disk(_)
                        | Probe::Load(_)
                        | Probe::Network(_)
                        | Probe::Process(_) => self.system.run(builtin).await,
                        _ => net::run(builtin).await,
                    }
                };
                tokio::time::timeout(timeout, work)
                    .await
                    .unwrap_or_else(|_| timed_out(builtin, timeout))
            }
        };
        outcome.into_result(
            spec,
            origin,
            started_at_ms,
            started.elapsed().as_millis() as u64,
        )
    }
}

/// A built-in probe that ran out of time. For a network probe that is the service's
/// failure (it did not answer), CRITICAL as Nagios's network plugins have it; for a
/// system probe it is the agent's, UNKNOWN.
fn timed_out(probe: &Probe, timeout: Duration) -> Outcome {
    let secs = timeout.as_secs();
    match probe {
        Probe::Tcp(_)
        | Probe::Http(_)
        | Probe::Dns(_)
        | Probe::Prometheus(_)
        | Probe::JsonSocket(_) => Outcome::critical(format!(
            "{} check got no answer within {secs}s",
            probe.kind()
        )),
        _ => Outcome::unknown(format!("{} check timed out after {secs}s", probe.kind())),
    }
}

/// A result that says why a check could not run.
pub fn unknown(spec: &CheckSpec, origin: Origin, why: String) -> CheckResult {
    Outcome::unknown(why).into_result(spec, origin, now_ms(), 0)
}
