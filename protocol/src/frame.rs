//! The frames of `outpost.v1`, one enum per direction.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::check::{CheckSpec, Fault, Metric, Origin, StateType, Status};
use crate::limits::MAX_FRAME_BYTES;
use crate::schema_rules as js;

/// Frames an agent sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentFrame {
    Hello(Hello),
    Results(Results),
    RpcReply(RpcReply),
    PluginRequest(PluginRequest),
    Bye(Bye),
    /// A `type` this side does not know; answered with an `error` frame. Not in the
    /// schema: no peer sends it, and it would make the schema accept any `type`.
    #[serde(other)]
    #[schemars(skip)]
    Unknown,
}

/// Frames a gateway sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GatewayFrame {
    Welcome(Welcome),
    Config(ConfigFrame),
    Ack(Ack),
    RpcRequest(RpcRequest),
    Plugin(PluginFrame),
    Error(ErrorFrame),
    Reconnect(Reconnect),
    /// Run this agent version (self-update; see `docs/UPDATES.md`).
    Update(crate::update::UpdateOffer),
    /// A `type` this side does not know; logged and ignored. Not in the schema.
    #[serde(other)]
    #[schemars(skip)]
    Unknown,
}

/// How an agent proves who it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Credential {
    /// First connection: the tenant's enrollment key, traded for a per-agent secret.
    /// `proof` is a random value the agent made with its fingerprint and keeps to itself
    /// (mode 0600): while an enrollment is unconfirmed, only a hello with the same proof
    /// may enroll that fingerprint again, so knowing a fingerprint and the tenant's key is
    /// not enough to take over an agent that is just enrolling. Agents that predate it
    /// send none.
    EnrollKey {
        #[schemars(length(max = crate::limits::MAX_CREDENTIAL_BYTES))]
        key: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        #[schemars(length(max = crate::limits::MAX_CREDENTIAL_BYTES))]
        proof: String,
    },
    /// Every later connection: the secret the gateway issued at enrollment.
    Secret {
        #[schemars(length(max = crate::limits::MAX_CREDENTIAL_BYTES))]
        secret: String,
    },
}

/// The first frame on every connection, and the only one accepted before authentication.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Hello {
    pub protocol: u32,
    #[schemars(pattern(js::FINGERPRINT))]
    pub fingerprint: String,
    pub credential: Credential,
    #[schemars(length(max = crate::limits::MAX_PLATFORM_BYTES), pattern(js::VISIBLE_TEXT))]
    pub agent_version: String,
    #[schemars(length(max = crate::limits::MAX_PLATFORM_BYTES), pattern(js::VISIBLE_TEXT))]
    pub os: String,
    #[schemars(length(max = crate::limits::MAX_PLATFORM_BYTES), pattern(js::VISIBLE_TEXT))]
    pub arch: String,
    #[schemars(length(max = crate::limits::MAX_HOSTNAME_BYTES), pattern(js::VISIBLE_TEXT))]
    pub hostname: String,
    #[serde(default)]
    #[schemars(transform = js::labels)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    #[schemars(
        length(max = crate::limits::MAX_GROUPS),
        inner(length(min = 1, max = crate::limits::MAX_LABEL_KEY_BYTES), pattern(js::VISIBLE_TEXT))
    )]
    pub groups: Vec<String>,
    /// Hash of the configuration the agent is running, if any.
    #[serde(default)]
    #[schemars(pattern(js::CONFIG_HASH))]
    pub config_hash: Option<String>,
    /// What this agent can do beyond the protocol revision (`entity_slots`: it runs
    /// checks about entities on the entity's slots; [`crate::FEATURE_ENTITY_SLOTS`]).
    /// Unknown ones are ignored.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 16),
        inner(length(min = 1, max = 64), pattern(js::VISIBLE_TEXT))
    )]
    pub features: Vec<String>,
}

/// The agent runs checks about entities (`CheckSpec::entity`) on the entity's slots, not
/// before its `not_before_ms`, and only while in touch with the gateway: the gateway places
/// such checks only on agents that say so.
pub const FEATURE_ENTITY_SLOTS: &str = "entity_slots";

/// The gateway's answer to an accepted `hello`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Welcome {
    pub protocol: u32,
    pub gateway_version: String,
    /// Set only when this connection enrolled the agent: store it (mode 0600) and use it
    /// as the credential from now on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_secret: Option<String>,
    /// Hash of the configuration this agent should run. A `config` frame follows when it
    /// differs from the one in `hello`.
    pub config_hash: String,
    /// Seconds between websocket pings the gateway expects.
    pub heartbeat_secs: u64,
    /// The highest sequence number the bus holds from this agent (0 if none): the agent
    /// numbers new results above it.
    #[serde(default)]
    #[schemars(range(max = js::MAX_SAFE_INTEGER))]
    pub last_seq: u64,
    /// Addresses (`ip:port`) to dial when the gateway's name does not resolve: the agent
    /// keeps them on disk and tries them after the last address that worked. TLS still
    /// verifies the gateway's name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallback_addrs: Vec<String>,
    /// The longest a session should last (0: no limit). The agent reconnects at a random
    /// point between half of it and all of it, so that load spreads across gateways.
    #[serde(default)]
    pub max_session_secs: u64,
}

/// The complete set of checks the agent should run; replaces what it had.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ConfigFrame {
    pub hash: String,
    #[schemars(length(max = crate::limits::MAX_CHECKS))]
    pub checks: Vec<CheckSpec>,
    /// Collectors the agent keeps running (see `CollectorSpec`); absent means none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = crate::collector::MAX_COLLECTORS))]
    pub collectors: Vec<crate::CollectorSpec>,
}

/// The outcome of one check run, numbered by the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CheckResult {
    /// Per-agent sequence number, strictly increasing.
    #[schemars(range(min = 1, max = js::MAX_SAFE_INTEGER))]
    pub seq: u64,
    #[schemars(pattern(js::CHECK_NAME), extend("not" = js::not_dots()))]
    pub check: String,
    pub status: Status,
    /// The first line of output.
    #[schemars(length(max = crate::limits::MAX_OUTPUT_BYTES))]
    pub output: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = crate::limits::MAX_LONG_OUTPUT_BYTES))]
    pub long_output: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = crate::limits::MAX_METRICS))]
    pub metrics: Vec<Metric>,
    /// Unix time in milliseconds when the run started.
    pub started_at_ms: u64,
    pub duration_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub origin: Origin,
    /// Soft while a non-OK status has not yet repeated `max_attempts` times.
    #[serde(default)]
    pub state_type: StateType,
    /// Which consecutive non-OK result this is (1 for OK results).
    #[serde(default = "one")]
    #[schemars(range(min = 1))]
    pub attempt: u32,
    #[serde(default = "one")]
    #[schemars(range(min = 1))]
    pub max_attempts: u32,
    /// Parts that failed on their own, as a JSON plugin reported them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = js::FAULTS_PER_RESULT))]
    pub faults: Vec<Fault>,
    /// The proxy entity the result is about, when the check is one the gateway placed on
    /// this agent (the check spec's `entity`); absent for a result about the agent's own
    /// host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(js::CHECK_NAME), extend("not" = js::not_dots()))]
    pub entity: Option<String>,
}

fn one() -> u32 {
    1
}

impl CheckResult {
    /// A hard result of `check` with nothing but a status and a line of output; the rest
    /// is filled in by whoever produces it.
    pub fn new(check: impl Into<String>, status: Status, output: impl Into<String>) -> Self {
        CheckResult {
            seq: 0,
            check: check.into(),
            status,
            output: output.into(),
            long_output: String::new(),
            metrics: Vec::new(),
            started_at_ms: 0,
            duration_ms: 0,
            exit_code: None,
            origin: Origin::Schedule,
            state_type: StateType::Hard,
            attempt: 1,
            max_attempts: 1,
            faults: Vec::new(),
            entity: None,
        }
    }
}

/// A batch of results in increasing `seq` order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Results {
    #[schemars(length(min = 1, max = crate::limits::MAX_BATCH_RESULTS))]
    pub results: Vec<CheckResult>,
}

/// Cumulative acknowledgement: every result with `seq <= self.seq` is durable on the bus
/// and may be deleted by the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Ack {
    #[schemars(range(min = 1, max = js::MAX_SAFE_INTEGER))]
    pub seq: u64,
}

/// A call from the gateway (on behalf of the API) to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RpcRequest {
    pub id: u64,
    #[serde(flatten)]
    pub call: RpcCall,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum RpcCall {
    /// Run the named check now, out of schedule, and reply with its result.
    RunCheck {
        #[schemars(pattern(js::CHECK_NAME), extend("not" = js::not_dots()))]
        check: String,
    },
}

/// The agent's answer to an `rpc_request` with the same `id`: a result or an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RpcReply {
    pub id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<CheckResult>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<RpcError>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RpcError {
    /// Machine-readable: `unknown_check`, `not_runnable`, `busy` or `stopping`. A string,
    /// not a closed set: a gateway treats a code it does not know as the agent failing.
    pub code: String,
    pub message: String,
}

/// Why an agent did not run a check on demand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RpcErrorCode {
    /// The check is not in the agent's configuration.
    UnknownCheck,
    /// The check cannot be run on demand (a daemon reports on its own).
    NotRunnable,
    /// It is already running, or every run slot is taken: try again.
    Busy,
    /// The agent is shutting down.
    Stopping,
}

impl RpcErrorCode {
    pub const ALL: [RpcErrorCode; 4] = [
        RpcErrorCode::UnknownCheck,
        RpcErrorCode::NotRunnable,
        RpcErrorCode::Busy,
        RpcErrorCode::Stopping,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RpcErrorCode::UnknownCheck => "unknown_check",
            RpcErrorCode::NotRunnable => "not_runnable",
            RpcErrorCode::Busy => "busy",
            RpcErrorCode::Stopping => "stopping",
        }
    }
}

impl RpcError {
    pub fn new(code: RpcErrorCode, message: impl Into<String>) -> RpcError {
        RpcError {
            code: code.as_str().to_string(),
            message: message.into(),
        }
    }

    /// The code, when it is one this version knows.
    pub fn kind(&self) -> Option<RpcErrorCode> {
        RpcErrorCode::ALL
            .into_iter()
            .find(|c| c.as_str() == self.code)
    }
}

/// Ask for a catalog plugin's content by its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PluginRequest {
    #[schemars(pattern(js::SHA256_HEX))]
    pub sha256: String,
}

/// A catalog plugin's content, base64-encoded. The agent checks the hash before writing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PluginFrame {
    #[schemars(pattern(js::CHECK_NAME), extend("not" = js::not_dots()))]
    pub name: String,
    #[schemars(pattern(js::SHA256_HEX))]
    pub sha256: String,
    #[schemars(length(max = js::MAX_PLUGIN_B64))]
    pub content_b64: String,
}

/// A graceful goodbye: the agent is stopping on purpose (deregistered, not lost).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Bye {
    pub reason: String,
    /// Set when the agent is restarting and will be back (into an updated binary): the
    /// gateway keeps it online for this many seconds (capped at
    /// [`MAX_RESTART_WINDOW_SECS`](crate::limits::MAX_RESTART_WINDOW_SECS)) and reports
    /// it lost only if it has not reconnected by then. Absent: the agent deregisters.
    /// A gateway that predates the field ignores it and records a deregistration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub back_within_secs: Option<u64>,
}

impl Bye {
    /// The agent is stopping for good.
    pub fn stopping(reason: impl Into<String>) -> Bye {
        Bye {
            reason: reason.into(),
            back_within_secs: None,
        }
    }
}

/// Come back later: the gateway is draining or overloaded. The agent closes the
/// connection and dials again after a random delay in `[min_delay_ms, max_delay_ms]`,
/// instead of its usual backoff. Sent instead of `welcome` or at any time after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Reconnect {
    pub reason: String,
    pub min_delay_ms: u64,
    pub max_delay_ms: u64,
}

/// A problem the gateway reports without closing the connection, or just before it does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorFrame {
    pub code: String,
    pub message: String,
}

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {size} bytes exceeds the limit of {limit} bytes")]
    TooBig { size: usize, limit: usize },
    #[error("malformed frame: {0}")]
    Malformed(#[from] serde_json::Error),
}

fn check_size(text: &str) -> Result<(), FrameError> {
    if text.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooBig {
            size: text.len(),
            limit: MAX_FRAME_BYTES,
        });
    }
    Ok(())
}

/// Decode a frame received from an agent, enforcing the size bound.
pub fn decode_agent_frame(text: &str) -> Result<AgentFrame, FrameError> {
    check_size(text)?;
    Ok(serde_json::from_str(text)?)
}

/// Decode a frame received from a gateway, enforcing the size bound.
pub fn decode_gateway_frame(text: &str) -> Result<GatewayFrame, FrameError> {
    check_size(text)?;
    Ok(serde_json::from_str(text)?)
}

/// Encode a frame as JSON text.
pub fn encode<T: Serialize>(frame: &T) -> String {
    // Frames hold strings, numbers, maps with string keys and finite floats from our own
    // parsers; serde_json cannot fail on them. A non-finite float would become `null`.
    serde_json::to_string(frame)
        .unwrap_or_else(|e| format!(r#"{{"type":"error","code":"encode","message":"{}"}}"#, e))
}
