//! Run-now: run one check on one agent at once and return the fresh result. This module
//! runs it on an agent connected here and names every way that can fail; when another
//! gateway of the fleet holds the agent, [`crate::nats::rpc`] relays the call to it and
//! brings back the same answer.

use std::sync::Arc;
use std::time::Duration;

use outpost_protocol::probe::Probe;
use outpost_protocol::{CheckResult, CheckSpec, RpcCall, RpcError, RpcErrorCode};

use crate::bus::AgentRef;
use crate::errors::ErrorKind;
use crate::hub::{Hub, RpcFailure};

/// The longest run-now waits for an agent: the check's timeout plus 5 s, capped.
const MAX_WAIT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum RunNowError {
    #[error("no agent with fingerprint {0} has enrolled here")]
    UnknownAgent(String),
    #[error("check {check:?} is not configured on agent {fingerprint}")]
    UnknownCheck { fingerprint: String, check: String },
    #[error("check {0:?} is a daemon: it reports on its own and cannot be run on demand")]
    Daemon(String),
    /// The session could not carry the call (not connected, queue full, no answer).
    #[error(transparent)]
    Session(#[from] RpcFailure),
    /// The agent refused to run it.
    #[error("agent answered {}: {}", .0.code, .0.message)]
    Agent(RpcError),
    #[error("agent sent an empty reply")]
    EmptyReply,
    /// Relayed: the gateway holding the agent answered this, or could not be reached.
    #[error("{message}")]
    Fleet { kind: ErrorKind, message: String },
}

impl RunNowError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            RunNowError::UnknownAgent(_) | RunNowError::UnknownCheck { .. } => ErrorKind::NotFound,
            RunNowError::Daemon(_) => ErrorKind::NotRunnable,
            RunNowError::Session(f) => match f {
                RpcFailure::NotConnected(_) => ErrorKind::Conflict,
                RpcFailure::Busy(_) => ErrorKind::Busy,
                RpcFailure::Timeout(..) => ErrorKind::Timeout,
                RpcFailure::Disconnected(_) => ErrorKind::Upstream,
            },
            RunNowError::Agent(e) => match e.kind() {
                Some(RpcErrorCode::UnknownCheck) => ErrorKind::NotFound,
                Some(RpcErrorCode::Busy) => ErrorKind::Busy,
                Some(RpcErrorCode::NotRunnable) => ErrorKind::NotRunnable,
                Some(RpcErrorCode::Stopping) | None => ErrorKind::Upstream,
            },
            RunNowError::EmptyReply => ErrorKind::Upstream,
            RunNowError::Fleet { kind, .. } => *kind,
        }
    }
}

/// Where run-now learns which checks an agent has. The registry answers it; run-now
/// needs nothing else of it, so it sits below the registry and the NATS modules that
/// relay calls.
pub trait AgentChecks: Send + Sync {
    /// The checks configured on the agent, or `None` when it never enrolled.
    fn checks_of(&self, agent: &AgentRef) -> Option<Vec<CheckSpec>>;
}

/// Runs checks on the agents connected to this gateway.
#[derive(Clone)]
pub struct Local {
    pub hub: Arc<Hub>,
    pub agents: Arc<dyn AgentChecks>,
}

impl Local {
    /// Run `check` on `agent`, connected here. The same answer for a call from this
    /// gateway's API and one relayed from another gateway.
    pub async fn run(&self, agent: &AgentRef, check: &str) -> Result<CheckResult, RunNowError> {
        let fp = &agent.fingerprint;
        let checks = self
            .agents
            .checks_of(agent)
            .ok_or_else(|| RunNowError::UnknownAgent(fp.to_string()))?;
        let Some(spec) = checks.iter().find(|c| c.name == check) else {
            if !self.hub.has(agent) {
                return Err(RpcFailure::NotConnected(fp.to_string()).into());
            }
            return Err(RunNowError::UnknownCheck {
                fingerprint: fp.to_string(),
                check: check.to_string(),
            });
        };
        if matches!(spec.probe, Probe::Daemon(_)) {
            // Known here: no need to ask the agent (nor to depend on how it would answer).
            return Err(RunNowError::Daemon(check.to_string()));
        }
        let deadline = Duration::from_secs(spec.timeout_secs.saturating_add(5)).min(MAX_WAIT);
        let call = RpcCall::RunCheck {
            check: check.to_string(),
        };
        let reply = self.hub.rpc(agent, call, deadline).await?;
        match (reply.result, reply.error) {
            (Some(result), _) => Ok(result),
            (None, Some(e)) => Err(RunNowError::Agent(e)),
            (None, None) => Err(RunNowError::EmptyReply),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_has_the_kind_its_documented_status_needs() {
        let agent = |code: &str| {
            RunNowError::Agent(RpcError {
                code: code.into(),
                message: String::new(),
            })
        };
        let cases = [
            (RunNowError::UnknownAgent("f".into()), 404),
            (RunNowError::Daemon("d".into()), 422),
            (RpcFailure::NotConnected("f".into()).into(), 409),
            (RpcFailure::Busy("f".into()).into(), 429),
            (RpcFailure::Timeout("f".into(), Duration::ZERO).into(), 504),
            (RpcFailure::Disconnected("f".into()).into(), 502),
            (agent("unknown_check"), 404),
            (agent("busy"), 429),
            (agent("not_runnable"), 422),
            (agent("stopping"), 502),
            (agent("a_code_from_a_newer_agent"), 502),
            (RunNowError::EmptyReply, 502),
        ];
        for (e, status) in cases {
            assert_eq!(e.kind().status(), status, "{e}");
        }
    }
}
