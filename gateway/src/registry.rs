//! The gateway's view of its agents: who they are (from their last `hello`), their
//! presence, which gateway holds each one, the checks they were given, and the newest
//! result per check.
//!
//! With the embedded bus, metadata and presence are saved to `DATA_DIR/agents/registry.json`
//! (atomically, at most every couple of seconds and at shutdown); the newest results are
//! rebuilt from the bus at start. With NATS, the registry is the KV bucket `outpost_agents`
//! shared by every gateway: each gateway writes the agents it holds and watches the bucket,
//! so its in-memory map (and `GET /api/v1/agents`) is the whole fleet, every tenant's agents
//! keyed `<tenant>.<fingerprint>`.
//!
//! Presence is decided by the *holder*: the connection (`gateway/incarnation/conn`) that
//! last claimed the agent. Only the holder's end can change the agent's presence, so an old
//! connection ending late (on this gateway or another) changes nothing. A connection lost
//! without `bye` stays online for the presence grace; a holder whose gateway is gone (no
//! heartbeat, or restarted) is swept to lost after the same grace unless the agent has been
//! claimed again meanwhile.

use outpost_sys::lock;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use outpost_protocol::{CheckResult, CheckSpec, Hello};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::bus::embedded::Recovered;
use crate::bus::{agent_key, AgentRef, Bus, Presence, PresenceEvent};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::util::{now_ms, write_atomic};

/// Checks per agent kept in the registry beyond those the gateway configured: what the
/// agent runs from its own `checks.d` and its self-checks.
pub const MAX_LOCAL_CHECKS: usize = 256;

/// How the reason of an agent lost because its gateway stopped begins (see
/// [`Registry::orphans_due`]).
pub const ORPHANED: &str = "its gateway ";

/// See [`Registry::watched`].
#[derive(Debug, Clone)]
pub struct Watched {
    pub fingerprint: String,
    pub hostname: String,
    pub labels: BTreeMap<String, String>,
    pub groups: Vec<String>,
    pub last_seen_ms: u64,
    pub presence: Presence,
    pub reason: String,
    pub checks: Vec<(String, u64, u64)>,
    /// The gateway that holds (or last held) it.
    pub gateway: String,
}

/// What names and places an agent: see [`Registry::identity`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    pub hostname: String,
    pub labels: BTreeMap<String, String>,
    pub groups: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentRecord {
    pub fingerprint: String,
    pub tenant: String,
    pub hostname: String,
    pub os: String,
    pub arch: String,
    pub agent_version: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub groups: Vec<String>,
    /// What its agent said it can do (`Hello::features`), at its last connection.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
    pub presence: Presence,
    /// Why presence last changed.
    #[serde(default)]
    pub presence_reason: String,
    pub last_seen_ms: u64,
    #[serde(default)]
    pub connected_since_ms: Option<u64>,
    #[serde(default)]
    pub peer: Option<String>,
    /// The gateway that holds (or last held) the agent.
    #[serde(default)]
    pub gateway: String,
    /// The connection that holds the agent while it is online: `gateway/incarnation/conn`.
    #[serde(default)]
    pub holder: Option<String>,
    /// The checks this agent was last given (by this gateway).
    #[serde(default)]
    pub checks: Vec<CheckSpec>,
    /// Checks about entities it was given and did not run in time (busy past their
    /// timeout, out of touch), until when (Unix ms): placed elsewhere meanwhile. Set by
    /// its holder, shared, so every gateway of a fleet places alike.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub stalled: BTreeMap<String, u64>,
    #[serde(skip)]
    pub latest: HashMap<String, CheckResult>,
    /// The KV revision this record was read or written at (NATS only).
    #[serde(skip)]
    pub revision: u64,
}

/// Each check's newest status in `r`.
pub fn states_of(r: &AgentRecord) -> std::collections::BTreeMap<String, outpost_protocol::Status> {
    r.latest
        .iter()
        .map(|(check, result)| (check.clone(), result.status))
        .collect()
}

impl AgentRecord {
    /// Revoked by an administrator: no holder, so no connection's end changes it.
    pub fn revoke(&mut self, reason: &str) {
        end_hold(self, Presence::Revoked, reason, None);
    }

    /// Apply to a record read back from disk or from another gateway the bounds a live
    /// agent is held to: at most [`MAX_LOCAL_CHECKS`] results beyond its configured
    /// checks (configured ones first, then the newest), and labels, groups and hostname
    /// by the hello rules (a record written before those rules may break them). Returns
    /// what it dropped, if anything, for the caller to log (once per agent at start; a
    /// record replicated from another gateway comes back with every update).
    fn keep_within_bounds(&mut self) -> Option<String> {
        let mut dropped = Vec::new();
        let max = self.checks.len() + MAX_LOCAL_CHECKS;
        if self.latest.len() > max {
            let mut names: Vec<(bool, u64, String)> = self
                .latest
                .iter()
                .map(|(n, r)| (self.checks.iter().any(|c| &c.name == n), r.seq, n.clone()))
                .collect();
            names.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)));
            let over = names.len() - max;
            for (_, _, name) in names.into_iter().skip(max) {
                self.latest.remove(&name);
            }
            dropped.push(format!("the results of {over} checks beyond the cap"));
        }
        let labels = self.labels.len();
        self.labels
            .retain(|k, v| outpost_protocol::label_problem(k, v).is_none());
        self.labels = std::mem::take(&mut self.labels)
            .into_iter()
            .take(outpost_protocol::MAX_LABELS)
            .collect();
        let groups = self.groups.len();
        self.groups
            .retain(|g| outpost_protocol::group_problem(g).is_none());
        self.groups.truncate(outpost_protocol::MAX_GROUPS);
        if outpost_protocol::hostname_problem(&self.hostname).is_some() {
            self.hostname =
                outpost_protocol::printable(&self.hostname, outpost_protocol::MAX_HOSTNAME_BYTES);
        }
        if labels != self.labels.len() || groups != self.groups.len() {
            dropped.push("labels or groups out of bounds".into());
        }
        (!dropped.is_empty()).then(|| dropped.join(", "))
    }

    /// Which agent this is.
    pub fn agent(&self) -> AgentRef {
        AgentRef::new(&self.tenant, &self.fingerprint)
    }

    /// An agent known only by its fingerprint and tenant so far.
    fn new(fingerprint: &str, tenant: &str, now: u64) -> AgentRecord {
        AgentRecord {
            fingerprint: fingerprint.to_string(),
            tenant: tenant.to_string(),
            hostname: String::new(),
            os: String::new(),
            arch: String::new(),
            agent_version: String::new(),
            labels: BTreeMap::new(),
            groups: Vec::new(),
            features: Vec::new(),
            presence: Presence::Online,
            presence_reason: String::new(),
            last_seen_ms: now,
            connected_since_ms: None,
            peer: None,
            gateway: String::new(),
            holder: None,
            checks: Vec::new(),
            stalled: BTreeMap::new(),
            latest: HashMap::new(),
            revision: 0,
        }
    }
}

/// This gateway process: its fleet name and a random incarnation, so connections of a
/// restarted gateway are never mistaken for those of the one before.
#[derive(Debug, Clone)]
pub struct Me {
    pub gateway_id: String,
    pub incarnation: String,
}

impl Me {
    pub fn holder(&self, conn_id: u64) -> String {
        format!("{}/{}/{conn_id}", self.gateway_id, self.incarnation)
    }

    /// Whether `holder` is a connection of this very process.
    pub fn holds(&self, holder: &str) -> bool {
        holder
            .strip_prefix(self.gateway_id.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .and_then(|r| r.strip_prefix(self.incarnation.as_str()))
            .is_some_and(|r| r.starts_with('/'))
    }
}

/// A gateway's heartbeat in the `outpost_gateways` bucket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Beat {
    pub incarnation: String,
    pub at_ms: u64,
    #[serde(default)]
    pub listen: String,
}

/// A claim refused because the agent was revoked (its credential checked out just before
/// the revocation landed): the session is closed as revoked, and nothing is recorded.
#[derive(Debug, thiserror::Error)]
#[error("agent {0} was revoked")]
pub struct RevokedAgent(pub String);

/// A gateway's heartbeat older than this means it is gone.
pub const GATEWAY_TTL: Duration = Duration::from_secs(15);

/// The registry every gateway of a fleet shares ([`crate::nats::registry`]: NATS KV).
/// Each record is what other gateways see of an agent (no checks, no results); a
/// write names the holder it expects, so exactly one of two racing gateways decides a
/// presence change.
#[async_trait]
pub trait SharedRecords: Send + Sync {
    /// Write `record`, a claim by `holder`, over the agent's shared record. Returns the
    /// new revision and whether the record it replaced was online (when in doubt: not).
    async fn claim(&self, record: &AgentRecord, holder: &str) -> anyhow::Result<(u64, bool)>;

    /// Write `record` (its hold ended) only while the shared record is still held by
    /// `holder`: the new revision, or `None` when another connection holds it by now (or
    /// the store could not be read or written: then nothing changed either).
    async fn release(&self, record: &AgentRecord, holder: Option<&str>) -> Option<u64>;

    /// Mark the agent's shared record revoked whoever holds it (read, changed and written
    /// back with compare-and-set): the new revision and record, or `None` when there is no
    /// record or it is revoked already. An error when the store failed: nothing changed.
    async fn revoke(
        &self,
        tenant: &str,
        fingerprint: &str,
        reason: &str,
    ) -> anyhow::Result<Option<(u64, AgentRecord)>>;

    /// Remove the agent's shared record if it is (still) revoked; `false` when it is not.
    async fn remove_revoked(&self, tenant: &str, fingerprint: &str) -> anyhow::Result<bool>;
}

/// Where the registry lives beyond this process.
enum Store {
    /// A single gateway's `registry.json`, saved when changed.
    File { path: PathBuf, dirty: AtomicBool },
    /// The fleet's shared registry; this gateway's map follows it.
    Shared(Arc<dyn SharedRecords>),
}

pub struct Registry {
    pub me: Me,
    store: Store,
    agents: Mutex<HashMap<String, AgentRecord>>,
    /// Live gateways by id (NATS), from their heartbeats.
    beats: Mutex<HashMap<String, Beat>>,
    /// When each gateway process (`gateway/incarnation`) last beat, kept for an hour after
    /// it stops: the last time it vouched for the agents it held.
    last_beats: Mutex<HashMap<String, u64>>,
    /// Agents whose holder's gateway is gone, and when this gateway noticed.
    orphans: Mutex<HashMap<String, u64>>,
}

/// What one registry change means for this gateway.
pub enum Applied {
    /// Nothing to do.
    Nothing,
    /// Another connection (on another gateway) now holds an agent this gateway still has
    /// a session for: end that session.
    TakenOver(AgentRef),
    /// An agent this gateway holds was revoked (through another gateway's API): close its
    /// session.
    Revoked(AgentRef),
}

impl Registry {
    /// The file-backed registry of a single gateway (embedded bus).
    pub fn open(data_dir: &Path, recovered: Recovered, me: Me) -> anyhow::Result<Registry> {
        let path = data_dir.join("agents").join("registry.json");
        let agents: HashMap<String, AgentRecord> = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(a) => a,
                Err(e) => {
                    // Metadata only: agents re-send it on their next hello. Keep the bad file.
                    let aside = path.with_extension("json.corrupt");
                    let _ = std::fs::rename(&path, &aside);
                    tracing::error!(file = %path.display(), moved_to = %aside.display(), error = %e,
                        "agent registry is corrupt; starting with an empty one (agents re-register on connect)");
                    HashMap::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        // Keyed by tenant and fingerprint (files from before tenants: by fingerprint).
        let mut agents: HashMap<String, AgentRecord> = agents
            .into_values()
            .map(|r| (agent_key(&r.tenant, &r.fingerprint), r))
            .collect();
        // Agents online when the gateway stopped keep their old holder: they are swept to
        // lost after the grace unless they reconnect first. The presence events are durable
        // before the registry file is saved, so they decide each agent's presence.
        for (key, event) in recovered.presence {
            let rec = agents.entry(key).or_insert_with(|| {
                let agent = &event.agent;
                let mut r = AgentRecord::new(&agent.fingerprint, &agent.tenant, event.at_ms);
                r.presence = event.presence;
                r.gateway = me.gateway_id.clone();
                r
            });
            if rec.presence != event.presence {
                rec.presence = event.presence;
                rec.presence_reason = event.reason;
                if event.presence != Presence::Online {
                    rec.holder = None;
                }
            }
        }
        for (key, latest) in recovered.latest {
            if let Some(rec) = agents.get_mut(&key) {
                rec.latest = latest;
            }
        }
        for rec in agents.values_mut() {
            if let Some(dropped) = rec.keep_within_bounds() {
                tracing::warn!(fingerprint = %rec.fingerprint, %dropped, "recovered agent record out of bounds; dropped");
            }
        }
        Ok(Self::with_store(
            me,
            Store::File {
                path,
                dirty: AtomicBool::new(false),
            },
            agents,
        ))
    }

    /// The fleet's shared registry; following it ([`crate::nats::registry::follow`])
    /// fills this gateway's map.
    pub fn shared(records: Arc<dyn SharedRecords>, me: Me) -> Registry {
        Self::with_store(me, Store::Shared(records), HashMap::new())
    }

    fn with_store(me: Me, store: Store, agents: HashMap<String, AgentRecord>) -> Registry {
        Registry {
            me,
            store,
            agents: Mutex::new(agents),
            beats: Mutex::new(HashMap::new()),
            last_beats: Mutex::new(HashMap::new()),
            orphans: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, AgentRecord>> {
        lock(&self.agents)
    }

    fn mark_dirty(&self) {
        if let Store::File { dirty, .. } = &self.store {
            dirty.store(true, Ordering::Relaxed);
        }
    }

    /// Record an authenticated `hello` on connection `conn_id`: the agent is online and
    /// held here. With NATS the claim is in the shared registry before this returns.
    ///
    /// Returns whether the agent was already online (a reconnect within the presence grace
    /// or a restart window, here or through another gateway, or a session rotation): then
    /// its presence did not change and no event is due. With NATS the answer comes from
    /// the shared record the claim replaced (compare-and-set), so it agrees with a lost
    /// event another gateway may be publishing at the same moment: exactly one of "still
    /// online" and "lost, then online again" happens.
    pub async fn connected(
        &self,
        tenant: &str,
        hello: &Hello,
        peer: &str,
        conn_id: u64,
    ) -> anyhow::Result<bool> {
        let now = now_ms();
        let key = agent_key(tenant, &hello.fingerprint);
        let holder = self.me.holder(conn_id);
        let holder_of_claim = holder.clone();
        let (shared, mut was_online) = {
            let mut agents = self.lock();
            if agents
                .get(&key)
                .is_some_and(|r| r.presence == Presence::Revoked)
            {
                return Err(RevokedAgent(hello.fingerprint.clone()).into());
            }
            let was_online = agents
                .get(&key)
                .is_some_and(|r| r.presence == Presence::Online);
            let rec = agents
                .entry(key.clone())
                .or_insert_with(|| AgentRecord::new(&hello.fingerprint, tenant, now));
            rec.hostname = hello.hostname.clone();
            rec.os = hello.os.clone();
            rec.arch = hello.arch.clone();
            rec.agent_version = hello.agent_version.clone();
            rec.labels = hello.labels.clone();
            rec.groups = hello.groups.clone();
            rec.features = hello.features.clone();
            rec.presence = Presence::Online;
            rec.presence_reason = "connected".into();
            rec.last_seen_ms = now;
            rec.connected_since_ms = Some(now);
            rec.peer = Some(peer.to_string());
            rec.gateway = self.me.gateway_id.clone();
            rec.holder = Some(holder);
            (shared_view(rec), was_online)
        };
        lock(&self.orphans).remove(&key);
        self.mark_dirty();
        if let Store::Shared(records) = &self.store {
            let (revision, before) = records.claim(&shared, &holder_of_claim).await?;
            was_online = before;
            self.note_revision(&key, revision);
        }
        Ok(was_online)
    }

    fn note_revision(&self, key: &str, revision: u64) {
        if let Some(rec) = self.lock().get_mut(key) {
            rec.revision = rec.revision.max(revision);
        }
    }

    /// End `holder`'s hold on the agent with `presence` (`None`: an agent recovered as
    /// online with no holder). Returns false (and changes nothing) when another connection
    /// holds the agent by now: only the caller that gets true publishes the presence event.
    pub async fn disconnected(
        &self,
        agent: &AgentRef,
        holder: Option<&str>,
        presence: Presence,
        reason: &str,
    ) -> bool {
        let key = agent.key();
        let shared = {
            let mut agents = self.lock();
            let Some(rec) = agents.get_mut(&key) else {
                return false;
            };
            if rec.holder.as_deref() != holder {
                return false;
            }
            // Last seen: the last frame, when this gateway held it; when another gateway
            // did, that gateway's last heartbeat (it dropped silent agents).
            let vouched = holder
                .filter(|h| !self.me.holds(h))
                .and_then(|h| self.last_beat_of(h));
            end_hold(rec, presence, reason, vouched);
            shared_view(rec)
        };
        lock(&self.orphans).remove(&key);
        self.mark_dirty();
        let Store::Shared(records) = &self.store else {
            return true;
        };
        // Compare-and-set against the shared registry: a claim by another gateway wins.
        match records.release(&shared, holder).await {
            Some(revision) => {
                self.note_revision(&key, revision);
                true
            }
            None => false,
        }
    }

    /// The session of `holder` ended without a bye: the agent stays online (and held)
    /// for the presence grace, but is no longer connected (`connected_since_ms` none), in
    /// the shared registry too, so every gateway of a fleet knows at once that it runs
    /// nothing that needs a connection (its checks about entities go elsewhere).
    pub async fn session_ended(&self, agent: &AgentRef, holder: &str) {
        let key = agent.key();
        let shared = {
            let mut agents = self.lock();
            let Some(rec) = agents.get_mut(&key) else {
                return;
            };
            if rec.holder.as_deref() != Some(holder) || rec.connected_since_ms.is_none() {
                return;
            }
            rec.connected_since_ms = None;
            shared_view(rec)
        };
        self.mark_dirty();
        if let Store::Shared(records) = &self.store {
            if let Some(revision) = records.release(&shared, Some(holder)).await {
                self.note_revision(&key, revision);
            }
        }
    }

    /// Agent `agent`, held here, did not run `checks` in time: it is passed over until
    /// `until_ms` (see [`AgentRecord::stalled`]), in the shared registry too (one write).
    /// Expired entries go at the same time.
    pub async fn stalled(&self, agent: &AgentRef, checks: &[&str], until_ms: u64) {
        let key = agent.key();
        let now = now_ms();
        let (shared, holder) = {
            let mut agents = self.lock();
            let Some(rec) = agents.get_mut(&key) else {
                return;
            };
            let Some(holder) = rec.holder.clone().filter(|h| self.me.holds(h)) else {
                return;
            };
            rec.stalled.retain(|_, until| *until > now);
            for check in checks {
                rec.stalled.insert(check.to_string(), until_ms);
            }
            (shared_view(rec), holder)
        };
        self.mark_dirty();
        if let Store::Shared(records) = &self.store {
            if let Some(revision) = records.release(&shared, Some(&holder)).await {
                self.note_revision(&key, revision);
            }
        }
    }

    /// When the newest result of `check` that `agent` sent here started (Unix ms).
    pub fn latest_started(&self, agent: &AgentRef, check: &str) -> Option<u64> {
        self.lock()
            .get(&agent.key())?
            .latest
            .get(check)
            .map(|r| r.started_at_ms)
    }

    /// Revoke the agent: presence `revoked` whoever holds it, so no holder's end changes
    /// it afterwards. Returns whether this call revoked it (then its event is due); on
    /// NATS the shared record decides, whatever this gateway has seen of it so far, and a
    /// store that fails is an error with nothing changed (retry).
    pub async fn revoked(&self, agent: &AgentRef, reason: &str) -> anyhow::Result<bool> {
        let key = agent.key();
        let Store::Shared(records) = &self.store else {
            let mut agents = self.lock();
            let Some(rec) = agents.get_mut(&key) else {
                return Ok(false);
            };
            if rec.presence == Presence::Revoked {
                return Ok(false);
            }
            rec.revoke(reason);
            drop(agents);
            lock(&self.orphans).remove(&key);
            self.mark_dirty();
            return Ok(true);
        };
        let revoke = records.revoke(&agent.tenant, &agent.fingerprint, reason);
        let Some((revision, mut shared)) = revoke.await? else {
            return Ok(false);
        };
        shared.revision = revision;
        let mut agents = self.lock();
        match agents.get_mut(&key) {
            Some(rec) if rec.revision >= revision => {}
            Some(rec) => {
                shared.checks = std::mem::take(&mut rec.checks);
                shared.latest = std::mem::take(&mut rec.latest);
                *rec = shared;
            }
            None => {
                agents.insert(key.clone(), shared);
            }
        }
        drop(agents);
        lock(&self.orphans).remove(&key);
        Ok(true)
    }

    /// Forget a revoked agent: it leaves the registry (on NATS, the fleet's). `false` when
    /// it is not revoked (here, or in the shared record): nothing changed.
    pub async fn forget(&self, agent: &AgentRef) -> anyhow::Result<bool> {
        let key = agent.key();
        let Store::Shared(records) = &self.store else {
            let mut agents = self.lock();
            if agents
                .get(&key)
                .is_some_and(|r| r.presence != Presence::Revoked)
            {
                return Ok(false);
            }
            agents.remove(&key);
            drop(agents);
            lock(&self.orphans).remove(&key);
            self.mark_dirty();
            return Ok(true);
        };
        if !records
            .remove_revoked(&agent.tenant, &agent.fingerprint)
            .await?
        {
            return Ok(false);
        }
        self.lock().remove(&key);
        lock(&self.orphans).remove(&key);
        Ok(true)
    }

    /// Drop the record of an agent that has no credential (forgotten while the gateway
    /// ran: its presence events on the bus would otherwise bring it back at start).
    pub fn drop_unenrolled(&self, agent: &AgentRef) {
        if self.lock().remove(&agent.key()).is_some() {
            self.mark_dirty();
        }
    }

    /// Apply a change read from the shared registry.
    pub fn apply(&self, revision: u64, value: Option<&[u8]>, key: &str) -> Applied {
        let Some((tenant, fingerprint)) = key.split_once('.') else {
            return Applied::Nothing;
        };
        let agent = AgentRef::new(tenant, fingerprint);
        let mut agents = self.lock();
        let Some(bytes) = value else {
            if agents.get(key).is_some_and(|r| r.revision < revision) {
                agents.remove(key);
            }
            return Applied::Nothing;
        };
        let mut incoming: AgentRecord = match serde_json::from_slice(bytes) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(%key, error = %e, "unreadable fleet registry entry; ignored");
                return Applied::Nothing;
            }
        };
        incoming.revision = revision;
        // The key decides whose record it is.
        incoming.tenant = agent.tenant.clone();
        incoming.fingerprint = agent.fingerprint.clone();
        if let Some(dropped) = incoming.keep_within_bounds() {
            tracing::debug!(%key, %dropped, "fleet registry entry out of bounds; dropped");
        }
        let taken_over = incoming
            .holder
            .as_deref()
            .is_some_and(|h| !self.me.holds(h));
        match agents.get_mut(key) {
            Some(rec) if rec.revision >= revision => return Applied::Nothing,
            // This process's own write about an older connection of the agent, read back
            // after a newer connection here claimed it (its claim not yet in KV): stale.
            Some(rec) if self.older_of_mine(incoming.holder.as_deref(), rec.holder.as_deref()) => {
                return Applied::Nothing
            }
            Some(rec) => {
                let was_mine = rec.holder.as_deref().is_some_and(|h| self.me.holds(h));
                incoming.checks = std::mem::take(&mut rec.checks);
                incoming.latest = std::mem::take(&mut rec.latest);
                let revoked = incoming.presence == Presence::Revoked;
                *rec = incoming;
                if was_mine && revoked {
                    return Applied::Revoked(agent);
                }
                if was_mine && taken_over {
                    return Applied::TakenOver(agent);
                }
            }
            None => {
                agents.insert(key.to_string(), incoming);
            }
        }
        Applied::Nothing
    }

    /// Whether `incoming` and `local` are both connections of this process and
    /// `incoming` is the older (connection ids grow).
    fn older_of_mine(&self, incoming: Option<&str>, local: Option<&str>) -> bool {
        let conn = |h: Option<&str>| {
            h.filter(|h| self.me.holds(h))
                .and_then(|h| h.rsplit('/').next()?.parse::<u64>().ok())
        };
        matches!((conn(incoming), conn(local)), (Some(i), Some(l)) if i < l)
    }

    /// Record a gateway's heartbeat (or its end, `None`).
    pub fn beat(&self, gateway_id: &str, beat: Option<Beat>) {
        if let Some(b) = &beat {
            let mut last = lock(&self.last_beats);
            let forget_before = b.at_ms.saturating_sub(3_600_000);
            last.retain(|_, at| *at >= forget_before);
            last.insert(format!("{gateway_id}/{}", b.incarnation), b.at_ms);
        }
        let mut beats = lock(&self.beats);
        match beat {
            Some(b) => beats.insert(gateway_id.to_string(), b),
            None => beats.remove(gateway_id),
        };
    }

    /// How many gateways of the fleet are alive (this one included): a tenant's fleet-wide
    /// rate is shared among them.
    pub fn live_gateways(&self) -> usize {
        let now = now_ms();
        let ttl = GATEWAY_TTL.as_millis() as u64;
        let others = lock(&self.beats)
            .iter()
            .filter(|(id, b)| **id != self.me.gateway_id && now.saturating_sub(b.at_ms) < ttl)
            .count();
        others + 1
    }

    /// Whether the gateway `id` is alive: this one, or one whose heartbeat is recent.
    pub fn gateway_alive(&self, id: &str) -> bool {
        id == self.me.gateway_id
            || lock(&self.beats)
                .get(id)
                .is_some_and(|b| now_ms().saturating_sub(b.at_ms) < GATEWAY_TTL.as_millis() as u64)
    }

    /// When the gateway process behind the connection `holder` last beat, if known.
    fn last_beat_of(&self, holder: &str) -> Option<u64> {
        let mut parts = holder.split('/');
        let process = format!("{}/{}", parts.next()?, parts.next()?);
        lock(&self.last_beats).get(&process).copied()
    }

    /// Whether the connection `holder` belongs to a gateway process that is alive.
    fn holder_alive(&self, holder: &str, now: u64) -> bool {
        if self.me.holds(holder) {
            return true;
        }
        let mut parts = holder.split('/');
        let (Some(gw), Some(inc)) = (parts.next(), parts.next()) else {
            return false;
        };
        lock(&self.beats).get(gw).is_some_and(|b| {
            b.incarnation == inc && now.saturating_sub(b.at_ms) < GATEWAY_TTL.as_millis() as u64
        })
    }

    /// Agents online under a holder whose gateway is gone for longer than `grace`: returns
    /// them with their holder, for [`Registry::disconnected`].
    pub fn orphans_due(&self, grace: Duration) -> Vec<(AgentRef, Option<String>, String)> {
        let now = now_ms();
        let mut orphans = lock(&self.orphans);
        let agents = self.lock();
        let mut due = Vec::new();
        orphans.retain(|key, _| {
            agents
                .get(key)
                .is_some_and(|r| r.presence == Presence::Online)
        });
        for (key, rec) in agents.iter() {
            if rec.presence != Presence::Online {
                continue;
            }
            if rec
                .holder
                .as_deref()
                .is_some_and(|h| self.holder_alive(h, now))
            {
                orphans.remove(key);
                continue;
            }
            let since = *orphans.entry(key.clone()).or_insert(now);
            if now.saturating_sub(since) >= grace.as_millis() as u64 {
                let gw = if rec.gateway.is_empty() {
                    "an earlier gateway"
                } else {
                    rec.gateway.as_str()
                };
                due.push((
                    AgentRef {
                        tenant: rec.tenant.clone(),
                        fingerprint: rec.fingerprint.clone(),
                    },
                    rec.holder.clone(),
                    format!(
                        "{ORPHANED}({gw}) stopped and it did not reconnect within {}s",
                        grace.as_secs()
                    ),
                ));
            }
        }
        due
    }

    pub fn seen(&self, agent: &AgentRef) {
        if let Some(rec) = self.lock().get_mut(&agent.key()) {
            rec.last_seen_ms = now_ms();
        }
    }

    pub fn set_checks(&self, agent: &AgentRef, checks: Vec<CheckSpec>) {
        if let Some(rec) = self.lock().get_mut(&agent.key()) {
            rec.checks = checks;
        }
        self.mark_dirty();
    }

    /// Keep the newest result per check (by sequence number): every check the gateway
    /// configured, and up to [`MAX_LOCAL_CHECKS`] more that the agent runs on its own
    /// (its `checks.d`, its self-checks). Beyond that, results stay on the bus but are
    /// not kept here, so an agent cannot grow this map without bound.
    pub fn record_results<'a>(
        &self,
        agent: &AgentRef,
        results: impl IntoIterator<Item = &'a CheckResult>,
    ) {
        if let Some(rec) = self.lock().get_mut(&agent.key()) {
            for r in results {
                let configured = rec.checks.iter().any(|c| c.name == r.check);
                if !configured
                    && !rec.latest.contains_key(&r.check)
                    && rec.latest.len() >= rec.checks.len() + MAX_LOCAL_CHECKS
                {
                    continue;
                }
                match rec.latest.get(&r.check) {
                    Some(old) if old.seq >= r.seq => {}
                    _ => {
                        rec.latest.insert(r.check.clone(), r.clone());
                    }
                }
            }
        }
    }

    pub fn get(&self, agent: &AgentRef) -> Option<AgentRecord> {
        self.lock().get(&agent.key()).cloned()
    }

    /// What alerting watches of each of `tenant`'s agents: presence, and the checks it was
    /// given that run on an interval (name, interval and timeout in seconds).
    pub fn watched(&self, tenant: &str) -> Vec<Watched> {
        self.lock()
            .values()
            .filter(|r| r.tenant == tenant)
            .map(|r| Watched {
                fingerprint: r.fingerprint.clone(),
                hostname: r.hostname.clone(),
                labels: r.labels.clone(),
                groups: r.groups.clone(),
                last_seen_ms: r.last_seen_ms,
                presence: r.presence,
                reason: r.presence_reason.clone(),
                gateway: r.gateway.clone(),
                checks: r
                    .checks
                    .iter()
                    .filter(|c| c.interval_secs > 0)
                    .map(|c| (c.name.clone(), c.interval_secs, c.timeout_secs))
                    .collect(),
            })
            .collect()
    }

    /// An agent's hostname, labels and groups (what alerts are routed and described by),
    /// without copying its checks and results.
    pub fn identity(&self, agent: &AgentRef) -> Option<Identity> {
        self.lock().get(&agent.key()).map(|r| Identity {
            hostname: r.hostname.clone(),
            labels: r.labels.clone(),
            groups: r.groups.clone(),
        })
    }

    /// `tenant`'s agents connected now to a live gateway (this one or another of the
    /// fleet: a session that ended clears `connected_since_ms` at once, though the agent
    /// stays held and online for the presence grace) that run checks about entities on
    /// the entity's slots
    /// ([`outpost_protocol::FEATURE_ENTITY_SLOTS`]: an older agent would not), by
    /// fingerprint: where such checks may be placed. A connection that ended without a
    /// bye still holds its agent for the presence grace: for the agents held here, the
    /// hub says whether their session is still up.
    pub fn held(&self, tenant: &str) -> Vec<Held> {
        let now = now_ms();
        let mut held: Vec<_> = self
            .lock()
            .values()
            .filter(|r| {
                r.tenant == tenant
                    && r.presence == Presence::Online
                    && r.connected_since_ms.is_some()
                    && r.features
                        .iter()
                        .any(|f| f == outpost_protocol::FEATURE_ENTITY_SLOTS)
                    && r.holder
                        .as_deref()
                        .is_some_and(|h| self.holder_alive(h, now))
            })
            .map(|r| {
                let here = r.holder.as_deref().is_some_and(|h| self.me.holds(h));
                let stalled = r
                    .stalled
                    .iter()
                    .filter(|(_, until)| **until > now)
                    .map(|(c, _)| c.clone())
                    .collect();
                Held {
                    fingerprint: r.fingerprint.clone(),
                    labels: r.labels.clone(),
                    groups: r.groups.clone(),
                    here,
                    stalled,
                }
            })
            .collect();
        held.sort_by(|a, b| a.fingerprint.cmp(&b.fingerprint));
        held
    }

    /// The newest result of each of `checks` of each of `tenant`'s agents that has one
    /// here (on NATS: of the agents this gateway holds or held), by check, as
    /// (fingerprint, hostname, result); in one pass over the agents.
    #[allow(clippy::type_complexity)]
    pub fn latest_of(
        &self,
        tenant: &str,
        checks: &std::collections::HashSet<&str>,
    ) -> HashMap<String, Vec<(String, String, CheckResult)>> {
        let mut out: HashMap<String, Vec<(String, String, CheckResult)>> = HashMap::new();
        for r in self.lock().values().filter(|r| r.tenant == tenant) {
            for (check, result) in &r.latest {
                if checks.contains(check.as_str()) {
                    out.entry(check.clone()).or_default().push((
                        r.fingerprint.clone(),
                        r.hostname.clone(),
                        result.clone(),
                    ));
                }
            }
        }
        out
    }

    /// How many agents `tenant` has (revoked ones until they are forgotten).
    pub fn count(&self, tenant: &str) -> u64 {
        self.lock().values().filter(|r| r.tenant == tenant).count() as u64
    }

    /// `tenant`'s agents, without their checks and results, by hostname.
    pub fn list(&self, tenant: &str) -> Vec<AgentRecord> {
        self.list_where(|r| r.tenant == tenant)
    }

    /// The newest status of each check of each of `tenant`'s agents, by fingerprint (what
    /// [`Registry::list`] leaves out of the records it copies).
    pub fn check_states(
        &self,
        tenant: &str,
    ) -> HashMap<String, std::collections::BTreeMap<String, outpost_protocol::Status>> {
        self.lock()
            .values()
            .filter(|r| r.tenant == tenant)
            .map(|r| (r.fingerprint.clone(), states_of(r)))
            .collect()
    }

    /// Every tenant's agents, as [`Registry::list`].
    pub fn list_all(&self) -> Vec<AgentRecord> {
        self.list_where(|_| true)
    }

    fn list_where(&self, keep: impl Fn(&AgentRecord) -> bool) -> Vec<AgentRecord> {
        let mut all: Vec<AgentRecord> = self
            .lock()
            .values()
            .filter(|r| keep(r))
            .map(|r| AgentRecord {
                latest: HashMap::new(),
                checks: Vec::new(),
                ..r.clone()
            })
            .collect();
        all.sort_by(|a, b| {
            (&a.hostname, &a.fingerprint, &a.tenant).cmp(&(&b.hostname, &b.fingerprint, &b.tenant))
        });
        all
    }

    /// Save if anything changed since the last save (the file-backed registry only).
    pub fn flush(&self) -> std::io::Result<()> {
        let Store::File { path, dirty } = &self.store else {
            return Ok(());
        };
        if !dirty.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        let bytes = serde_json::to_vec_pretty(&*self.lock())?;
        let res = write_atomic(path, &bytes, 0o600);
        if res.is_err() {
            dirty.store(true, Ordering::Relaxed);
        }
        res
    }

    /// When the gateway process holding an online agent was last heard of, for remote
    /// agents.
    pub fn holder_beat_ms(&self, rec: &AgentRecord) -> Option<u64> {
        self.last_beat_of(rec.holder.as_deref()?)
    }
}

/// What other gateways see of a record: no checks, no results.
fn shared_view(rec: &AgentRecord) -> AgentRecord {
    AgentRecord {
        checks: Vec::new(),
        latest: HashMap::new(),
        ..rec.clone()
    }
}

fn end_hold(rec: &mut AgentRecord, presence: Presence, reason: &str, vouched: Option<u64>) {
    rec.presence = presence;
    rec.presence_reason = reason.to_string();
    rec.last_seen_ms = rec.last_seen_ms.max(vouched.unwrap_or(0));
    rec.connected_since_ms = None;
    rec.holder = None;
}

/// An agent connected now that checks about entities may be placed on (see
/// [`Registry::held`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub fingerprint: String,
    pub labels: BTreeMap<String, String>,
    pub groups: Vec<String>,
    /// Held by this gateway.
    pub here: bool,
    /// The checks it stalled on, still passed over (see [`AgentRecord::stalled`]).
    pub stalled: BTreeSet<String>,
}

/// What the registry's background work and presence publishing use.
#[derive(Clone)]
pub struct Upkeep {
    pub registry: Arc<Registry>,
    pub bus: Arc<dyn Bus>,
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
    /// `--presence-grace`.
    pub presence_grace: Duration,
    /// This gateway's listen address, shown to the other gateways.
    pub listen: String,
    pub shutdown: CancellationToken,
}

/// Every two seconds until shutdown: save the registry when it changed (embedded), and
/// publish as lost the agents whose gateway is gone for longer than the presence grace.
pub async fn maintain(gw: Upkeep) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = gw.shutdown.cancelled() => return,
        }
        if let Err(e) = gw.registry.flush() {
            tracing::error!(error = %e, "cannot save the agent registry; will retry");
        }
        for (agent, holder, reason) in gw.registry.orphans_due(gw.presence_grace) {
            lose(&gw, &agent, holder.as_deref(), &reason).await;
        }
    }
}

/// Make the agent lost if `holder` still holds it, and publish that; returns false (and
/// changes nothing) when a newer connection holds it by now.
pub async fn lose(gw: &Upkeep, agent: &AgentRef, holder: Option<&str>, reason: &str) -> bool {
    let lost = gw
        .registry
        .disconnected(agent, holder, Presence::Lost, reason)
        .await;
    if lost {
        tracing::info!(fingerprint = %agent.fingerprint, %reason, "agent lost");
        publish_presence(&*gw.bus, &gw.metrics, agent, Presence::Lost, reason).await;
    }
    lost
}

/// Publish a presence change on the bus (logged and counted when the bus refuses it).
pub async fn publish_presence(
    bus: &dyn Bus,
    metrics: &Metrics,
    agent: &AgentRef,
    presence: Presence,
    reason: &str,
) {
    let event = PresenceEvent {
        agent: agent.clone(),
        presence,
        at_ms: now_ms(),
        reason: reason.to_string(),
    };
    if let Err(e) = bus.publish_presence(&event).await {
        Metrics::inc(&metrics.bus_errors);
        tracing::error!(error = %e, "cannot publish presence event");
    }
}

impl crate::runnow::AgentChecks for Registry {
    fn checks_of(&self, agent: &AgentRef) -> Option<Vec<CheckSpec>> {
        self.lock().get(&agent.key()).map(|r| r.checks.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me(incarnation: &str) -> Me {
        Me {
            gateway_id: "gw1".into(),
            incarnation: incarnation.into(),
        }
    }

    /// Audit finding 6: the per-agent cap on kept results was not applied when the
    /// registry was recovered (2,048 names stored, 2,050 listed after a restart), and a
    /// registry written before the hello rules kept megabytes of labels.
    #[tokio::test]
    async fn a_recovered_registry_is_held_to_the_same_bounds_as_live_agents() {
        let dir = tempfile::tempdir().unwrap();
        let fp = "0f8fad5b-d9cb-469f-a165-70867728950e";
        std::fs::create_dir_all(dir.path().join("agents")).unwrap();
        let mut rec = AgentRecord::new(fp, "default", 1);
        rec.hostname = "h\nFORGED".into();
        rec.labels.insert("role".into(), "x".repeat(1 << 20));
        rec.labels.insert("ok".into(), "yes".into());
        rec.groups = vec!["g\u{1b}".into(), "eu".into()];
        let mut file = HashMap::new();
        file.insert(fp.to_string(), rec);
        std::fs::write(
            dir.path().join("agents/registry.json"),
            serde_json::to_vec(&file).unwrap(),
        )
        .unwrap();
        let mut recovered = Recovered::default();
        let latest = recovered
            .latest
            .entry(agent_key("default", fp))
            .or_default();
        for i in 0..(MAX_LOCAL_CHECKS as u64 + 40) {
            let r: CheckResult = serde_json::from_value(serde_json::json!({
                "seq": i + 1, "check": format!("c{i}"), "status": "ok", "output": "",
                "started_at_ms": 0, "duration_ms": 0
            }))
            .unwrap();
            latest.insert(r.check.clone(), r);
        }
        let reg = Registry::open(dir.path(), recovered, me("a")).unwrap();
        let rec = reg.get(&AgentRef::new("default", fp)).unwrap();
        assert_eq!(rec.latest.len(), MAX_LOCAL_CHECKS);
        assert!(
            rec.latest
                .contains_key(&format!("c{}", MAX_LOCAL_CHECKS + 39)),
            "the newest kept"
        );
        assert!(!rec.latest.contains_key("c0"), "the oldest dropped");
        assert_eq!(rec.labels.len(), 1);
        assert_eq!(rec.groups, vec!["eu".to_string()]);
        assert!(!rec.hostname.contains('\n'), "{:?}", rec.hostname);
    }

    #[tokio::test]
    async fn corrupt_registry_is_moved_aside_and_a_restart_sweeps_unreturned_agents_after_the_grace(
    ) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("agents")).unwrap();
        std::fs::write(dir.path().join("agents/registry.json"), b"{torn").unwrap();
        let reg = Registry::open(dir.path(), Recovered::default(), me("a")).unwrap();
        assert!(reg.list_all().is_empty());
        assert!(dir.path().join("agents/registry.json.corrupt").exists());

        let hello: Hello = serde_json::from_value(serde_json::json!({
            "protocol": 1, "fingerprint": "0f8fad5b-d9cb-469f-a165-70867728950e",
            "credential": {"kind": "secret", "secret": "s"}, "agent_version": "1",
            "os": "linux", "arch": "x86_64", "hostname": "h"
        }))
        .unwrap();
        reg.connected("default", &hello, "127.0.0.1:1", 7)
            .await
            .unwrap();
        let older = reg.me.holder(6);
        assert!(
            !reg.disconnected(
                &AgentRef::new("default", &hello.fingerprint),
                Some(&older),
                Presence::Lost,
                "an older connection"
            )
            .await
        );
        assert_eq!(reg.list("default")[0].presence, Presence::Online);
        assert!(
            reg.orphans_due(Duration::ZERO).is_empty(),
            "held by this process"
        );
        reg.flush().unwrap();

        // Restarted: still online (it may be reconnecting), lost once the grace is over.
        let reg = Registry::open(dir.path(), Recovered::default(), me("b")).unwrap();
        assert_eq!(reg.list("default")[0].presence, Presence::Online);
        assert!(reg.orphans_due(Duration::from_secs(60)).is_empty());
        let due = reg.orphans_due(Duration::ZERO);
        assert_eq!(due.len(), 1);
        let (agent, holder, reason) = &due[0];
        assert_eq!(holder.as_deref(), Some(me("a").holder(7).as_str()));
        assert!(
            reason.contains("gw1") && reason.contains("did not reconnect"),
            "{reason}"
        );
        assert!(
            reg.disconnected(agent, holder.as_deref(), Presence::Lost, reason)
                .await
        );
        assert_eq!(reg.list("default")[0].presence, Presence::Lost);
        assert!(reg.orphans_due(Duration::ZERO).is_empty());
    }

    #[test]
    fn holders_are_told_apart_by_gateway_and_incarnation() {
        let m = me("abc");
        assert!(m.holds("gw1/abc/3"));
        assert!(!m.holds("gw1/abcd/3"));
        assert!(!m.holds("gw10/abc/3"));
        assert!(!m.holds("gw1/ab/3"));
    }
}
