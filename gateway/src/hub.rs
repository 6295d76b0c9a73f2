//! The live agent sessions on this gateway, by tenant and fingerprint, and run-now calls
//! through them.

use outpost_sys::lock;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_protocol::{close, GatewayFrame, RpcCall, RpcReply, RpcRequest};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::bus::AgentRef;

/// What a session's writer task sends. Bounded: see [`OUTBOUND_QUEUE`].
#[derive(Debug)]
pub enum Outbound {
    /// Boxed: the queue allocates its slots up front, and a slot the size of the largest
    /// frame would cost every idle agent kilobytes.
    Frame(Box<GatewayFrame>),
    Close(u16, String),
}

impl Outbound {
    pub fn frame(frame: GatewayFrame) -> Outbound {
        Outbound::Frame(Box::new(frame))
    }
}

/// Frames queued for one agent. When full, run-now calls fail fast with `Busy` rather
/// than wait; the session's own acks wait (they are the backpressure on the agent).
pub const OUTBOUND_QUEUE: usize = 64;

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<RpcReply>>>>;

#[derive(Clone)]
pub struct SessionHandle {
    pub conn_id: u64,
    pub tx: mpsc::Sender<Outbound>,
    /// Cancelled when a newer connection for the same fingerprint replaces this one.
    pub replaced: CancellationToken,
    pub pending: Pending,
}

#[derive(Default)]
pub struct Hub {
    sessions: Mutex<HashMap<AgentRef, SessionHandle>>,
    next_conn: AtomicU64,
    next_rpc: AtomicU64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RpcFailure {
    #[error("agent {0} is not connected")]
    NotConnected(String),
    #[error("agent {0} has too many frames queued; try again")]
    Busy(String),
    #[error("agent {0} did not answer within {1:?}")]
    Timeout(String, Duration),
    #[error("agent {0} disconnected before answering")]
    Disconnected(String),
}

impl Hub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<AgentRef, SessionHandle>> {
        lock(&self.sessions)
    }

    pub fn new_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Make `handle` the agent's session, replacing (and cancelling) an older one.
    pub fn register(&self, agent: &AgentRef, handle: SessionHandle) {
        if let Some(old) = self.lock().insert(agent.clone(), handle) {
            old.replaced.cancel();
        }
    }

    /// Remove the agent's session if it is still `conn_id`. Returns whether it was: a
    /// replaced session must not mark the agent offline.
    pub fn unregister(&self, agent: &AgentRef, conn_id: u64) -> bool {
        let mut sessions = self.lock();
        if sessions.get(agent).is_some_and(|h| h.conn_id == conn_id) {
            sessions.remove(agent);
            true
        } else {
            false
        }
    }

    /// End the agent's session here: it has connected through another gateway.
    pub fn take_over(&self, agent: &AgentRef) {
        if let Some(h) = self.lock().get(agent) {
            h.replaced.cancel();
        }
    }

    /// Close the agent's session here with [`close::REVOKED`] (its queue full: as
    /// replaced, and its next hello is refused as revoked). Returns whether it had one.
    pub fn revoke(&self, agent: &AgentRef) -> bool {
        let Some(h) = self.lock().get(agent).cloned() else {
            return false;
        };
        let closing = Outbound::Close(close::REVOKED, "revoked by an administrator".into());
        if h.tx.try_send(closing).is_err() {
            h.replaced.cancel();
        }
        true
    }

    pub fn is_connected(&self, agent: &AgentRef) -> bool {
        self.lock().contains_key(agent)
    }

    pub fn connected(&self) -> usize {
        self.lock().len()
    }

    /// Whether the agent has a live session here.
    pub fn has(&self, agent: &AgentRef) -> bool {
        self.lock().contains_key(agent)
    }

    /// Send `call` to the agent and wait up to `deadline` for its reply.
    pub async fn rpc(
        &self,
        agent: &AgentRef,
        call: RpcCall,
        deadline: Duration,
    ) -> Result<RpcReply, RpcFailure> {
        let handle = self
            .lock()
            .get(agent)
            .cloned()
            .ok_or_else(|| RpcFailure::NotConnected(agent.fingerprint.clone()))?;
        let id = self.next_rpc.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = oneshot::channel();
        lock(&handle.pending).insert(id, tx);
        let frame = Outbound::frame(GatewayFrame::RpcRequest(RpcRequest { id, call }));
        let forget = || {
            lock(&handle.pending).remove(&id);
        };
        match handle.tx.try_send(frame) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                forget();
                return Err(RpcFailure::Busy(agent.fingerprint.clone()));
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                forget();
                return Err(RpcFailure::Disconnected(agent.fingerprint.clone()));
            }
        }
        match tokio::time::timeout(deadline, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(RpcFailure::Disconnected(agent.fingerprint.clone())),
            Err(_) => {
                forget();
                Err(RpcFailure::Timeout(agent.fingerprint.clone(), deadline))
            }
        }
    }
}
