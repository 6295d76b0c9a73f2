//! Outpost wire types and the rules they carry.
//!
//! This crate is what an agent and a gateway agree on: the frames exchanged over the
//! `outpost.v1` websocket subprotocol, their size bounds, the close codes, and the check
//! specification an agent receives. It has no sockets and no runtime; both sides and the
//! test suite depend on it so the rules live in one place.
//!
//! Frames are JSON text messages tagged by `type`. Unknown fields are ignored so that a
//! newer peer can add fields; an unknown `type` decodes to `Unknown` so the receiver can
//! answer with an `error` frame instead of dropping the connection.

mod check;
pub mod checkfile;
mod collector;
mod fields;
mod frame;
mod limits;
mod names;
pub mod probe;
pub mod schema;
mod schema_rules;
pub mod update;
mod validate;

pub use check::{
    config_hash, config_hash_with_collectors, CheckSpec, Fault, Metric, Origin, PluginRef,
    StateType, Status,
};
pub use collector::{
    CollectdPlugin, CollectorKind, CollectorSpec, MAX_COLLECTORS, MAX_COLLECTOR_NAME,
};
pub use fields::{group_problem, hostname_problem, label_problem, printable};
pub use frame::{
    decode_agent_frame, decode_gateway_frame, encode, Ack, AgentFrame, Bye, CheckResult,
    ConfigFrame, Credential, ErrorFrame, FrameError, GatewayFrame, Hello, PluginFrame,
    PluginRequest, Reconnect, Results, RpcCall, RpcError, RpcErrorCode, RpcReply, RpcRequest,
    Welcome, FEATURE_ENTITY_SLOTS,
};
pub use limits::*;
pub use names::valid_check_name;
pub use update::UpdateOffer;

/// Whether `s` is a fingerprint as agents make them: a lowercase hyphenated UUID.
pub fn valid_fingerprint(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_digit() || (b'a'..=b'f').contains(c),
        })
}

#[cfg(test)]
mod tests;
