//! Running one check: the kinds of check and how their output becomes a result.
//!
//! Today every check is an exec check (a Nagios-style plugin); built-in, JSON and daemon
//! checks join here, one module each.

pub mod exec;
pub mod nagios;

use outpost_protocol::{CheckResult, CheckSpec, Origin};

/// Run `spec` once and describe the outcome. Never fails: a check that cannot run is an
/// UNKNOWN result that says why. The sequence number is assigned by the outbox.
pub async fn run(spec: &CheckSpec, origin: Origin) -> CheckResult {
    let mut result = exec::run(spec).await;
    result.origin = origin;
    result
}
