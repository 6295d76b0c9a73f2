//! Running one check: the kinds of check and how their output becomes a result.
//!
//! Today every check is an exec check (a Nagios-style plugin); built-in, JSON and daemon
//! checks join here, one module each.

pub mod exec;
pub mod nagios;

use std::borrow::Cow;
use std::sync::Arc;

use outpost_protocol::{CheckResult, CheckSpec, Origin, Status};

use crate::plugins::{PluginError, PluginStore};
use crate::util::now_ms;

/// Run `spec` once and describe the outcome. Never fails: a check that cannot run is an
/// UNKNOWN result that says why. The sequence number is assigned by the outbox.
pub async fn run(spec: &CheckSpec, origin: Origin, plugins: &Arc<PluginStore>) -> CheckResult {
    let spec = match &spec.plugin {
        None => Cow::Borrowed(spec),
        Some(plugin) => {
            // Hashing reads the whole file: keep it off the async workers.
            let (store, wanted) = (plugins.clone(), plugin.clone());
            let verified = tokio::task::spawn_blocking(move || store.verified_path(&wanted))
                .await
                .unwrap_or_else(|e| {
                    Err(PluginError::Io {
                        name: plugin.name.clone(),
                        error: e.to_string(),
                    })
                });
            match verified {
                Ok(path) => {
                    let mut s = spec.clone();
                    match s.command.first_mut() {
                        Some(program) => *program = path.display().to_string(),
                        None => s.command.push(path.display().to_string()),
                    }
                    Cow::Owned(s)
                }
                Err(e) => return unknown(spec, origin, e.to_string()),
            }
        }
    };
    let mut result = exec::run(&spec).await;
    result.origin = origin;
    result
}

/// A result that says why a check could not run.
pub fn unknown(spec: &CheckSpec, origin: Origin, why: String) -> CheckResult {
    CheckResult {
        seq: 0,
        check: spec.name.clone(),
        status: Status::Unknown,
        output: why,
        long_output: String::new(),
        metrics: vec![],
        started_at_ms: now_ms(),
        duration_ms: 0,
        exit_code: None,
        origin,
    }
}
