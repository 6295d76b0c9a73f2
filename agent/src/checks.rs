//! Running one check: the kinds of check and how their output becomes a result.
//!
//! Today every check is an exec check (a Nagios-style plugin); built-in, JSON and daemon
//! checks join here, one module each.

pub mod exec;
pub mod nagios;

use std::borrow::Cow;

use outpost_protocol::{CheckResult, CheckSpec, Origin, Status};

use crate::plugins::PluginStore;
use crate::util::now_ms;

/// Run `spec` once and describe the outcome. Never fails: a check that cannot run is an
/// UNKNOWN result that says why. The sequence number is assigned by the outbox.
pub async fn run(spec: &CheckSpec, origin: Origin, plugins: &PluginStore) -> CheckResult {
    let spec = match &spec.plugin {
        None => Cow::Borrowed(spec),
        Some(plugin) => match plugins.verified_path(plugin) {
            Ok(path) => {
                let mut s = spec.clone();
                s.command[0] = path.display().to_string();
                Cow::Owned(s)
            }
            Err(e) => {
                return CheckResult {
                    seq: 0,
                    check: spec.name.clone(),
                    status: Status::Unknown,
                    output: e.to_string(),
                    long_output: String::new(),
                    metrics: vec![],
                    started_at_ms: now_ms(),
                    duration_ms: 0,
                    exit_code: None,
                    origin,
                }
            }
        },
    };
    let mut result = exec::run(&spec).await;
    result.origin = origin;
    result
}
