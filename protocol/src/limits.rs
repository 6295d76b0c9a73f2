//! Bounds and constants every peer enforces.

use std::time::Duration;

/// The websocket subprotocol both sides must negotiate.
pub const SUBPROTOCOL: &str = "outpost.v1";
/// The protocol revision carried in `hello` and `welcome`.
pub const PROTOCOL_VERSION: u32 = 2;
/// The HTTP path agents upgrade on.
pub const WS_PATH: &str = "/ws";
/// Largest frame either side accepts, in bytes. Far below tungstenite's 64 MiB default:
/// nothing in the protocol needs more, and a peer cannot make us buffer more.
pub const MAX_FRAME_BYTES: usize = 1024 * 1024;
/// Most results in one `results` frame.
pub const MAX_BATCH_RESULTS: usize = 256;
/// Most checks in one agent's configuration.
pub const MAX_CHECKS: usize = 10_000;
/// Longest `output` line kept in a result, in bytes.
pub const MAX_OUTPUT_BYTES: usize = 4096;
/// Longest `long_output` kept in a result, in bytes.
pub const MAX_LONG_OUTPUT_BYTES: usize = 16 * 1024;
/// Most metrics in one result.
pub const MAX_METRICS: usize = 256;
/// Longest metric name, in bytes.
pub const MAX_METRIC_NAME_BYTES: usize = 128;
/// Longest metric `unit`, `warn` or `crit`, in bytes.
pub const MAX_METRIC_FIELD_BYTES: usize = 32;
/// Most faults in one result.
pub const MAX_FAULTS: usize = 64;
/// Longest fault name, in bytes.
pub const MAX_FAULT_NAME_BYTES: usize = 128;
/// Longest fault output, in bytes.
pub const MAX_FAULT_OUTPUT_BYTES: usize = 512;
/// Highest sequence number: the largest integer JSON carries exactly (2^53 - 1), so that
/// every JSON reader, not only those with 64-bit integers, sees the same number. A result
/// above it is refused: it would raise the agent's numbering for good.
pub const MAX_SEQ: u64 = (1 << 53) - 1;
/// Largest plugin the catalog serves, in bytes: base64 of it fits in one frame.
pub const MAX_PLUGIN_BYTES: u64 = 512 * 1024;
/// How long a gateway waits for `hello` after the websocket opens.
pub const HELLO_DEADLINE: Duration = Duration::from_secs(10);
/// Longest a gateway keeps a restarting agent (`bye` with `back_within_secs`) online
/// while waiting for it to come back.
pub const MAX_RESTART_WINDOW_SECS: u64 = 600;

// What an agent says about itself in `hello` (the rules are in `fields`).

/// Most labels, and most groups, one agent may have.
pub const MAX_LABELS: usize = 64;
pub const MAX_GROUPS: usize = 64;
/// Longest label key or group name, in bytes.
pub const MAX_LABEL_KEY_BYTES: usize = 64;
/// Longest label value, in bytes.
pub const MAX_LABEL_VALUE_BYTES: usize = 256;
/// Longest hostname, in bytes (DNS allows 253).
pub const MAX_HOSTNAME_BYTES: usize = 253;
/// Longest `os`, `arch` and `agent_version`, in bytes.
pub const MAX_PLATFORM_BYTES: usize = 64;
/// Longest credential (enrollment key or secret), in bytes.
pub const MAX_CREDENTIAL_BYTES: usize = 256;

// Check rules (the check file parser and the schema both hold checks to them).

/// Longest interval or retry interval.
pub const MAX_INTERVAL_SECS: u64 = 7 * 24 * 3600;
/// Longest timeout (and longest silence of a daemon).
pub const MAX_TIMEOUT_SECS: u64 = 24 * 3600;
/// Most attempts before a state turns hard.
pub const MAX_ATTEMPTS: u32 = 100;

/// Websocket close codes the gateway uses, with the reason text it sends.
pub mod close {
    /// A frame that is not valid JSON for this protocol (RFC 6455: invalid payload data).
    pub const MALFORMED: u16 = 1007;
    /// A frame that breaks the protocol's order, e.g. anything but `hello` first.
    pub const POLICY: u16 = 1008;
    /// A frame larger than [`crate::MAX_FRAME_BYTES`] (RFC 6455: message too big).
    pub const TOO_BIG: u16 = 1009;
    /// The gateway is shutting down; reconnect (to another gateway) later.
    pub const GOING_AWAY: u16 = 1001;
    /// The gateway is overloaded; a `reconnect` frame said when to come back (RFC 6455:
    /// try again later).
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// The credential in `hello` was refused.
    pub const UNAUTHORIZED: u16 = 4401;
    /// An administrator revoked this agent: its secret no longer logs in, and its
    /// fingerprint cannot enroll again.
    pub const REVOKED: u16 = 4403;
    /// `hello` did not arrive within [`crate::HELLO_DEADLINE`].
    pub const HELLO_TIMEOUT: u16 = 4408;
    /// A newer connection for the same fingerprint replaced this one.
    pub const REPLACED: u16 = 4409;
    /// The agent's protocol revision is not supported by this gateway.
    pub const UNSUPPORTED: u16 = 4426;
}
