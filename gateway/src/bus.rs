//! The bus results and presence events are handed to. One trait, so the embedded bus
//! (the default, for a single gateway) and NATS JetStream (for a fleet, [`nats`]) are
//! interchangeable; a session acks an agent's batch only after `publish_results` returns.

pub mod embedded;
pub mod history;
pub mod segments;

use async_trait::async_trait;
use outpost_protocol::CheckResult;
use serde::{Deserialize, Serialize};

/// Which agent a message is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AgentRef {
    pub tenant: String,
    pub fingerprint: String,
}

impl AgentRef {
    pub fn new(tenant: &str, fingerprint: &str) -> AgentRef {
        AgentRef {
            tenant: tenant.to_string(),
            fingerprint: fingerprint.to_string(),
        }
    }

    /// `<tenant>.<fingerprint>`: the agent's key in every map and store that holds many
    /// tenants' agents (a fingerprint has no dot, so no two agents share one).
    pub fn key(&self) -> String {
        agent_key(&self.tenant, &self.fingerprint)
    }
}

/// See [`AgentRef::key`].
pub fn agent_key(tenant: &str, fingerprint: &str) -> String {
    format!("{tenant}.{fingerprint}")
}

/// What a publish did with the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Published {
    /// Results newly made durable.
    pub accepted: usize,
    /// Results already durable from an earlier send (same fingerprint and sequence), dropped.
    pub duplicates: usize,
}

/// An agent's presence as the rest of the platform sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Presence {
    /// Authenticated and connected.
    Online,
    /// The connection ended without `bye`.
    Lost,
    /// The agent said `bye`: stopped on purpose.
    Deregistered,
    /// An administrator revoked the agent: it cannot log in again.
    Revoked,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceEvent {
    #[serde(flatten)]
    pub agent: AgentRef,
    pub presence: Presence,
    pub at_ms: u64,
    /// Free text: why the state changed (close reason, bye reason).
    pub reason: String,
}

/// A refused access, kept on the bus for the tenant's audit: who tried what and why it was
/// refused. `tenant` is empty when the caller named no tenant that exists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    pub tenant: String,
    pub at_ms: u64,
    /// `refused`.
    pub action: String,
    /// Why (the `reason` label of `outpost_access_refused_total`).
    pub reason: String,
    /// What was tried: `api GET /api/v1/agents`, `agent <fingerprint>`.
    pub subject: String,
    /// The address it came from, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// The gateway that refused it.
    pub gateway: String,
}

/// Results read from the bus (see [`Bus::read_results`]).
#[derive(Debug, Default)]
pub struct ResultsRead {
    /// Each result, with its agent and the position just after it (to read on from, or
    /// to name it, as an event id does).
    pub results: Vec<(u64, AgentRef, CheckResult)>,
    /// Where to read on from.
    pub next: u64,
    /// The position asked for is no longer kept (retention deleted what was there):
    /// reading went on from the oldest result kept.
    pub lost: bool,
    /// With `lost`: the position reading went on from (a real one, never 0, so a reader
    /// that resumes there later still learns of what retention deletes meanwhile).
    pub resumed: Option<u64>,
}

/// What one read of a feed of the bus found (see [`Bus::read_presence`],
/// [`Bus::read_alert_events`]): each item with the position just after it, where to read
/// on from, and whether (and where from) reading jumped over what retention deleted, as
/// [`ResultsRead`] says of results.
#[derive(Debug)]
pub struct FeedRead<T> {
    pub items: Vec<(u64, T)>,
    pub next: u64,
    pub lost: bool,
    pub resumed: Option<u64>,
}

impl<T> FeedRead<T> {
    /// Nothing read: still at `from`.
    pub fn at(from: u64) -> FeedRead<T> {
        FeedRead {
            items: Vec::new(),
            next: from,
            lost: false,
            resumed: None,
        }
    }

    /// The same read, each item made into another.
    pub fn map<U>(self, mut f: impl FnMut(T) -> U) -> FeedRead<U> {
        FeedRead {
            items: self.items.into_iter().map(|(at, t)| (at, f(t))).collect(),
            next: self.next,
            lost: self.lost,
            resumed: self.resumed,
        }
    }
}

impl From<FeedRead<(AgentRef, CheckResult)>> for ResultsRead {
    fn from(read: FeedRead<(AgentRef, CheckResult)>) -> Self {
        ResultsRead {
            results: read
                .items
                .into_iter()
                .map(|(at, (agent, result))| (at, agent, result))
                .collect(),
            next: read.next,
            lost: read.lost,
            resumed: read.resumed,
        }
    }
}

impl From<ResultsRead> for FeedRead<(AgentRef, CheckResult)> {
    fn from(r: ResultsRead) -> Self {
        FeedRead {
            items: r
                .results
                .into_iter()
                .map(|(at, agent, result)| (at, (agent, result)))
                .collect(),
            next: r.next,
            lost: r.lost,
            resumed: r.resumed,
        }
    }
}

pub type PresenceRead = FeedRead<PresenceEvent>;

/// Alert and silence changes read from the bus: each a JSON object with `tenant` and
/// `type` (`alert`, `silence` or `sync`).
pub type AlertEventsRead = FeedRead<serde_json::Value>;

/// Where a tenant's results and presence events end now: reading from these positions
/// gets only what is published from now on. Real positions (never 0, which reads from
/// the oldest kept without telling of losses), also for a tenant with nothing yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ends {
    pub results: u64,
    pub presence: u64,
    pub alerts: u64,
}

/// Which results of one check a history read wants: those whose run started in
/// `from_ms..=to_ms` (Unix ms), the newest `limit` of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryQuery {
    pub from_ms: u64,
    pub to_ms: u64,
    pub limit: usize,
}

/// What a history read found: results in the order they were made durable (the agent's
/// order), and whether older ones in the range were left out for the limit.
#[derive(Debug, Default)]
pub struct History {
    pub results: Vec<CheckResult>,
    pub truncated: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus storage failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("bus is shutting down")]
    Closed,
    #[error("bus unavailable: {0}")]
    Unavailable(String),
}

#[async_trait]
pub trait Bus: Send + Sync {
    /// Make `results` durable, in order, dropping any whose sequence number the bus has
    /// already made durable for this agent. Returns only once they are durable.
    async fn publish_results(
        &self,
        agent: &AgentRef,
        results: &[CheckResult],
    ) -> Result<Published, BusError>;

    /// The highest sequence number made durable for this agent (0 if none).
    async fn last_seq(&self, agent: &AgentRef) -> Result<u64, BusError>;

    /// Publish a presence change.
    async fn publish_presence(&self, event: &PresenceEvent) -> Result<(), BusError>;

    /// Keep an audit event.
    async fn publish_audit(&self, event: &AuditEvent) -> Result<(), BusError>;

    /// Keep at most `max_bytes` of `tenant`'s results (`None`: no limit of the tenant's
    /// own, only the bus's): beyond it the tenant's oldest results go, never another
    /// tenant's. Applied to what is already kept, and remembered for later writes.
    async fn keep_bytes(&self, tenant: &str, max_bytes: Option<u64>) -> Result<(), BusError>;

    /// Delete every result of `tenant` (a deleted tenant: a tenant made later under the
    /// same name must find nothing of it).
    async fn drop_tenant(&self, tenant: &str) -> Result<(), BusError>;

    /// The bytes `tenant`'s results take on the bus now.
    async fn tenant_bytes(&self, tenant: &str) -> Result<u64, BusError>;

    /// `tenant`'s results from position `from` on (0: the oldest kept; otherwise a
    /// position this returned), at most `max`, in the order they were made durable. When
    /// there are none yet, waits up to `wait` for one. A position is the embedded bus's
    /// segment and offset or the JetStream stream sequence: opaque, growing, and the same
    /// on every gateway of a fleet, so a consumer resumes exactly where it was.
    async fn read_results(
        &self,
        tenant: &str,
        from: u64,
        max: usize,
        wait: std::time::Duration,
    ) -> Result<ResultsRead, BusError>;

    /// [`Bus::read_results`] for a reader that reads on, read after read, from where its
    /// last read ended (one per tenant and gateway: the event streams' shared reader): a
    /// bus may keep what makes that cheap between reads (NATS: an ordered consumer that
    /// JetStream pushes results through, instead of a request per result). Such a reader
    /// waits: with no `wait`, results stored may come only in a later read (on their way).
    async fn follow_results(
        &self,
        tenant: &str,
        from: u64,
        max: usize,
        wait: std::time::Duration,
    ) -> Result<ResultsRead, BusError> {
        self.read_results(tenant, from, max, wait).await
    }

    /// The reader that followed `tenant`'s results stopped: what kept its place goes.
    fn stop_following(&self, _tenant: &str) {}

    /// `tenant`'s presence events from position `from` on, as [`Bus::read_results`] reads
    /// results (positions of their own: the presence log's, or the presence stream's).
    async fn read_presence(
        &self,
        tenant: &str,
        from: u64,
        max: usize,
        wait: std::time::Duration,
    ) -> Result<PresenceRead, BusError>;

    /// Keep changes of `tenant`'s alerts and silences (made by whoever evaluates its
    /// alerting), for the event stream; each a JSON object.
    async fn publish_alert_events(
        &self,
        tenant: &str,
        events: &[serde_json::Value],
    ) -> Result<(), BusError>;

    /// `tenant`'s alert and silence changes from position `from` on, as
    /// [`Bus::read_results`] reads results.
    async fn read_alert_events(
        &self,
        tenant: &str,
        from: u64,
        max: usize,
        wait: std::time::Duration,
    ) -> Result<AlertEventsRead, BusError>;

    /// Where `tenant`'s results and presence events end now.
    async fn ends(&self, tenant: &str) -> Result<Ends, BusError>;

    /// The results of `agent`'s check `check` that `query` asks for, read through an
    /// index of where each check's results are (the embedded bus's per-segment index, the
    /// JetStream subject per check), not by reading every agent's.
    async fn read_history(
        &self,
        agent: &AgentRef,
        check: &str,
        query: HistoryQuery,
    ) -> Result<History, BusError>;

    /// The newest result of each of `checks` of each of `tenant`'s agents, when this bus
    /// is where every gateway's agents' results are (`None`: the registry of this gateway
    /// has them all, as with the embedded bus). For the entities' vantage points.
    async fn latest_results(
        &self,
        _tenant: &str,
        _checks: &[String],
    ) -> Result<Option<Vec<(AgentRef, CheckResult)>>, BusError> {
        Ok(None)
    }

    /// How often a reader that must see new items soon should look again, when the bus's
    /// own waits look only now and then (`None`: a wait here is woken by the write itself,
    /// as the embedded bus's are). The event streams' shared readers use it.
    fn poll_every(&self) -> Option<std::time::Duration> {
        None
    }

    /// Why the bus cannot take results right now, if it cannot (for `/readyz`).
    fn unavailable(&self) -> Option<String> {
        None
    }
}
