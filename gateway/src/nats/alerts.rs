//! Alerting in a NATS fleet: one gateway at a time evaluates and notifies for a tenant,
//! under a lease, and keeps the tenant's alert state in NATS, so that whichever gateway
//! takes over goes on exactly where the last one was.
//!
//! | what | where |
//! |---|---|
//! | the lease | KV `outpost_alerts`, key `<tenant>.lease`: the holder's id, renewed every 2 s |
//! | the state's log | stream `OUTPOST_ALERTS`, subject `outpost.<tenant>.alerts.log` |
//! | where its latest snapshot is | KV `outpost_alerts`, key `<tenant>.snapshot` |
//! | the API, forwarded to the holder | request/reply on `outpost.<tenant>.alerts.api` |
//!
//! **The lease.** A gateway takes a tenant's lease when the key is missing or released,
//! or when it has seen the same revision of it, not renewed, for [`LEASE_TTL`] by its own
//! clock (so no two clocks are compared); taking and renewing are compare-and-set on the
//! revision. A holder that cannot renew for [`SELF_FENCE`] stops on its own, before
//! anyone may take over.
//!
//! **The fence.** A lease alone does not stop a holder that was paused (or cut off) past
//! its lease from writing once it resumes. The log does: every append says which message
//! it expects to be the subject's last (`Nats-Expected-Last-Subject-Sequence`), and a
//! gateway taking over first appends a fence record after what it read. The old holder's
//! next append then fails, its evaluator and workers stop, and nothing it would have
//! written is taken. The revision that won the lease is the fencing token, written in
//! the fence.
//!
//! **The log** holds what `alerts::store` journals (notifications queued, deliveries
//! done) and snapshots, each cut in chunks below NATS's payload limit; the snapshot key
//! names a complete snapshot's first and last message, and what precedes it is purged.
//! Loading reads that snapshot and applies every record after it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::header::HeaderMap;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::kv::Operation;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{self, DirectGetErrorKind};
use async_trait::async_trait;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::Nats;
use crate::alerts::store::{replay, AlertStore, Loaded, Record, Snapshot};

pub const ALERTS_STREAM: &str = "OUTPOST_ALERTS";
pub const ALERTS_BUCKET: &str = "outpost_alerts";

/// How often the holder renews its lease.
const LEASE_RENEW: Duration = Duration::from_secs(2);
/// How long the others wait, after the last renewal they saw, before taking a lease over.
pub const LEASE_TTL: Duration = Duration::from_secs(8);
/// A holder that could not renew for this long stops: well before [`LEASE_TTL`], so it has
/// stopped before anyone takes over.
const SELF_FENCE: Duration = Duration::from_secs(5);
/// How often a gateway without the lease looks at it.
const LOOK: Duration = Duration::from_secs(1);
/// The most one log message carries (NATS refuses payloads above 1 MiB by default).
const CHUNK: usize = 256 * 1024;
/// How long a forwarded API request waits for the holder: longer than the holder waits
/// for its evaluator (30 s), so a change the holder gave up on is not made behind the
/// caller's back.
const API_DEADLINE: Duration = Duration::from_secs(40);

/// What a log message is (header [`KIND`]).
const KIND: &str = "Outpost-Alerts";
/// A chunk's place in its snapshot: `<index>/<count>`.
const CHUNK_HEADER: &str = "Outpost-Chunk";

pub fn log_subject(tenant: &str) -> String {
    format!("outpost.{tenant}.alerts.log")
}

pub fn api_subject(tenant: &str) -> String {
    format!("outpost.{tenant}.alerts.api")
}

fn lease_key(tenant: &str) -> String {
    format!("{tenant}.lease")
}

fn snapshot_key(tenant: &str) -> String {
    format!("{tenant}.snapshot")
}

/// The stream of the tenants' alert logs.
pub fn stream_config(replicas: usize) -> stream::Config {
    stream::Config {
        name: ALERTS_STREAM.into(),
        description: Some(
            "Outpost alert state per tenant: notifications queued and delivered, snapshots".into(),
        ),
        subjects: vec![log_subject("*")],
        storage: stream::StorageType::File,
        num_replicas: replicas,
        max_bytes: -1,
        allow_direct: true,
        ..Default::default()
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct LeaseValue {
    gateway: String,
    /// The holding process (`Me::incarnation`): a gateway restarted under the same id is
    /// another holder, which waits out the lease like anyone.
    #[serde(default)]
    incarnation: String,
    /// Given up on purpose (a gateway shutting down): anyone may take it at once.
    #[serde(default)]
    released: bool,
}

/// Where the latest complete snapshot is in the log (`first` 0: none yet).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Pointer {
    first: u64,
    last: u64,
    /// The id of the tenant the state is of (`Tenant::id`): a tenant deleted and made again
    /// under the same name starts from nothing.
    #[serde(default)]
    tenant_id: String,
}

/// A lease held, as its holder's evaluator, workers and store see it.
pub struct Tenure {
    /// The revision that won the lease: the fencing token.
    pub token: u64,
    /// Cancelled when the lease is lost, the store is fenced, or the gateway stops: the
    /// tenant's evaluator and workers run under it.
    pub life: CancellationToken,
    /// When the last renewal that succeeded was sent.
    renewed: std::sync::Mutex<Instant>,
}

impl Tenure {
    pub fn new(token: u64, life: CancellationToken) -> Arc<Tenure> {
        Arc::new(Tenure {
            token,
            life,
            renewed: std::sync::Mutex::new(Instant::now()),
        })
    }

    /// Whether the holder may still act: its life goes on, and its last renewal is recent
    /// enough that nobody can have taken over (checked before every send, so a holder
    /// that was paused past its lease sends nothing once it runs again).
    pub fn valid(&self) -> bool {
        !self.life.is_cancelled() && outpost_sys::lock(&self.renewed).elapsed() < SELF_FENCE
    }
}

/// A lease this gateway holds on a tenant's alerting.
pub struct Held {
    pub tenure: Arc<Tenure>,
    renewer: Option<tokio::task::JoinHandle<()>>,
}

impl Held {
    /// Stop renewing; give the lease up (if it is still this gateway's) so another gateway
    /// takes over at once rather than after [`LEASE_TTL`].
    pub async fn release(mut self) {
        self.tenure.life.cancel();
        if let Some(renewer) = self.renewer.take() {
            let _ = renewer.await;
        }
    }
}

impl Drop for Held {
    /// However the holder's work ends (a panic too), it stops renewing.
    fn drop(&mut self) {
        self.tenure.life.cancel();
    }
}

/// The tenants' leases as one gateway process contends for them.
pub struct Leases {
    pub nats: Arc<Nats>,
    pub gateway: String,
    /// This process (`Me::incarnation`).
    pub incarnation: String,
}

impl Leases {
    /// Wait until this gateway holds `tenant`'s alerting lease; `None` at shutdown.
    pub async fn acquire(&self, tenant: &str, shutdown: &CancellationToken) -> Option<Held> {
        self.acquire_key(lease_key(tenant), tenant, "alerting", shutdown)
            .await
    }

    /// Wait until this gateway holds the lease at `key` (in the alerting bucket) for
    /// `tenant`'s `what` (named in the log); `None` at shutdown.
    pub async fn acquire_key(
        &self,
        key: String,
        tenant: &str,
        what: &'static str,
        shutdown: &CancellationToken,
    ) -> Option<Held> {
        let kv = &self.nats.alerts;
        // The revision last seen, and since when (by this gateway's clock).
        let mut seen: Option<(u64, Instant)> = None;
        loop {
            let taken = match kv.entry(&key).await {
                Ok(entry) => {
                    let current = entry
                        .as_ref()
                        .filter(|e| e.operation == Operation::Put)
                        .map(|e| {
                            let v = serde_json::from_slice::<LeaseValue>(&e.value).ok();
                            (e.revision, v)
                        });
                    let mine = self.value(false);
                    match current {
                        None => match entry {
                            // Deleted or purged: the revision must be named still.
                            Some(e) => kv.update(&key, mine, e.revision).await.ok(),
                            None => kv.create(&key, mine).await.ok(),
                        },
                        Some((revision, value)) => {
                            let free = match &value {
                                // Unreadable: as good as released.
                                None => true,
                                // Released, or this very process's (its renewal failed for
                                // a while, and nobody took it meanwhile).
                                Some(v) => {
                                    v.released
                                        || (v.gateway == self.gateway
                                            && v.incarnation == self.incarnation)
                                }
                            };
                            let expired = match seen {
                                Some((r, since)) if r == revision => since.elapsed() >= LEASE_TTL,
                                _ => {
                                    seen = Some((revision, Instant::now()));
                                    false
                                }
                            };
                            if free || expired {
                                if expired {
                                    let holder = value.map(|v| v.gateway).unwrap_or_default();
                                    tracing::warn!(%tenant, %holder, what, %key, "a lease was not renewed: taking it over");
                                }
                                kv.update(&key, mine, revision).await.ok()
                            } else {
                                None
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(%tenant, error = %e, what, "cannot read a lease; retrying");
                    None
                }
            };
            if let Some(token) = taken {
                tracing::info!(%tenant, token, gateway = %self.gateway, what, %key, "this gateway now holds the tenant's lease");
                let tenure = Tenure::new(token, shutdown.child_token());
                let renewer = tokio::spawn(renew(
                    self.nats.clone(),
                    key,
                    (self.value(false), self.value(true)),
                    tenure.clone(),
                    what,
                ));
                return Some(Held {
                    tenure,
                    renewer: Some(renewer),
                });
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(LOOK) => {}
            }
        }
    }

    fn value(&self, released: bool) -> bytes::Bytes {
        serde_json::to_vec(&LeaseValue {
            gateway: self.gateway.clone(),
            incarnation: self.incarnation.clone(),
            released,
        })
        .unwrap_or_default()
        .into()
    }
}

/// Renew the lease at `key` (won at the tenure's token) until the tenure's life ends, then
/// release it (`values`: held, released); end the life when the lease is lost or cannot be
/// renewed in time.
async fn renew(
    nats: Arc<Nats>,
    key: String,
    (mine, released): (bytes::Bytes, bytes::Bytes),
    tenure: Arc<Tenure>,
    what: &'static str,
) {
    let mut revision = tenure.token;
    let life = &tenure.life;
    loop {
        let renewed = *outpost_sys::lock(&tenure.renewed);
        let left = SELF_FENCE.saturating_sub(renewed.elapsed());
        if left.is_zero() {
            tracing::error!(%key, what, "a lease could not be renewed in time: this gateway stops its work under it");
            life.cancel();
            return;
        }
        tokio::select! {
            _ = life.cancelled() => break,
            _ = tokio::time::sleep(LEASE_RENEW.saturating_sub(renewed.elapsed()).min(left)) => {}
        }
        // Stamped before it is sent: the lease runs from the server's write, never later.
        let sent = Instant::now();
        let update = nats.alerts.update(&key, mine.clone(), revision);
        match tokio::time::timeout(SELF_FENCE.saturating_sub(renewed.elapsed()), update).await {
            Ok(Ok(r)) => {
                revision = r;
                *outpost_sys::lock(&tenure.renewed) = sent;
            }
            Ok(Err(e))
                if e.kind() == async_nats::jetstream::kv::UpdateErrorKind::WrongLastRevision =>
            {
                tracing::warn!(%key, what, "a lease was taken by another gateway: this one stops its work under it");
                life.cancel();
                return;
            }
            Ok(Err(e)) => {
                tracing::warn!(%key, what, error = %e, "cannot renew a lease; retrying");
                tokio::select! {
                    _ = life.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
            }
            Err(_) => {}
        }
    }
    match nats.alerts.update(&key, released, revision).await {
        Ok(_) => tracing::info!(%key, what, "lease released"),
        Err(e) => tracing::debug!(%key, what, error = %e, "lease not released (taken already)"),
    }
}

/// Why a write to the log was refused.
#[derive(Debug, thiserror::Error)]
#[error("another gateway took over this tenant's alerting (a newer fence is on its log), or this one's lease ran out; this gateway stops notifying for it")]
pub struct Fenced;

/// A tenant's [`AlertStore`] in NATS, for the lease holder whose [`Tenure`] it is; a
/// write refused by the fence ends the tenure.
pub struct NatsAlertStore {
    nats: Arc<Nats>,
    tenant: String,
    /// `Tenant::id` of the tenant (see [`Pointer::tenant_id`]).
    tenant_id: String,
    gateway: String,
    tenure: Arc<Tenure>,
    /// The log's last message as this holder knows it: `None` until loaded (and fenced).
    last: tokio::sync::Mutex<Option<u64>>,
    /// The snapshot key's revision as this holder knows it.
    pointer: tokio::sync::Mutex<u64>,
}

/// The header naming the holder (its token) that wrote a log message.
const TOKEN_HEADER: &str = "Outpost-Token";

impl NatsAlertStore {
    /// The store of `gateway`, holding the lease of `tenant` (whose id is `tenant_id`)
    /// under `tenure`.
    pub fn new(
        nats: Arc<Nats>,
        (tenant, tenant_id): (&str, &str),
        gateway: &str,
        tenure: Arc<Tenure>,
    ) -> NatsAlertStore {
        NatsAlertStore {
            nats,
            tenant: tenant.to_string(),
            tenant_id: tenant_id.to_string(),
            gateway: gateway.to_string(),
            tenure,
            last: tokio::sync::Mutex::new(None),
            pointer: tokio::sync::Mutex::new(0),
        }
    }

    async fn stream(&self) -> anyhow::Result<stream::Stream> {
        self.nats
            .js
            .get_stream(ALERTS_STREAM)
            .await
            .context("cannot open the alert log stream")
    }

    /// End this holder's tenure if `e` is a fence.
    fn fenced(&self, e: anyhow::Error) -> anyhow::Error {
        if e.is::<Fenced>() {
            tracing::warn!(tenant = %self.tenant, token = self.tenure.token, "{Fenced}");
            self.tenure.life.cancel();
        }
        e
    }

    /// Append one message after `last`, moving `last` on ([`Fenced`] if another holder
    /// wrote after it, or this one's lease ran out).
    async fn put(
        &self,
        last: &mut u64,
        kind: &str,
        chunk: Option<String>,
        payload: Vec<u8>,
    ) -> anyhow::Result<()> {
        if !self.tenure.valid() {
            return Err(Fenced.into());
        }
        let mut headers = HeaderMap::new();
        headers.insert(KIND, kind);
        headers.insert(TOKEN_HEADER, self.tenure.token.to_string().as_str());
        if let Some(c) = chunk {
            headers.insert(CHUNK_HEADER, c.as_str());
        }
        // Tried again once when the log's last message is this holder's own: a write whose
        // ack was lost (a timeout) but which was stored.
        for _ in 0..2 {
            let msg = PublishMessage::build()
                .payload(payload.clone().into())
                .headers(headers.clone())
                .expected_last_subject_sequence(*last);
            let ack = self
                .nats
                .js
                .send_publish(log_subject(&self.tenant), msg)
                .await
                .context("cannot write the alert log")?
                .await;
            match ack {
                Ok(ack) => {
                    *last = ack.sequence;
                    return Ok(());
                }
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                    match self.last_written().await? {
                        Some((seq, token)) if token == self.tenure.token && seq > *last => {
                            tracing::debug!(tenant = %self.tenant, seq, "the alert log holds a write of ours whose ack was lost");
                            *last = seq;
                        }
                        _ => return Err(Fenced.into()),
                    }
                }
                Err(e) => return Err(e).context("the alert log did not take a write"),
            }
        }
        Err(Fenced.into())
    }

    /// The log's last message: its sequence and the token of the holder that wrote it.
    async fn last_written(&self) -> anyhow::Result<Option<(u64, u64)>> {
        let stream = self.stream().await?;
        match stream
            .get_last_raw_message_by_subject(&log_subject(&self.tenant))
            .await
        {
            Ok(m) => Ok(Some((
                m.sequence,
                m.headers
                    .get(TOKEN_HEADER)
                    .and_then(|v| v.as_str().parse().ok())
                    .unwrap_or(0),
            ))),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(e).context("cannot read the alert log's last message"),
        }
    }

    /// Take the snapshot key over (a compare-and-set of what it holds, or a first empty
    /// pointer): an older holder can no longer move it, nor so purge the log under the
    /// reader. Returns the pointer and its new revision; `None` when it moved meanwhile.
    async fn claim_pointer(&self) -> anyhow::Result<Option<(Pointer, u64)>> {
        let kv = &self.nats.alerts;
        let key = snapshot_key(&self.tenant);
        let entry = kv
            .entry(&key)
            .await
            .context("cannot read the alert snapshot's place")?;
        let empty = Pointer {
            first: 0,
            last: 0,
            tenant_id: self.tenant_id.clone(),
        };
        let current = entry
            .as_ref()
            .filter(|e| e.operation == Operation::Put)
            .map(|e| serde_json::from_slice::<Pointer>(&e.value));
        let pointer = match current {
            Some(Ok(p)) => p,
            Some(Err(e)) => {
                tracing::error!(tenant = %self.tenant, error = %e, "the alert snapshot's place is unreadable; alerts rebuilt from the bus");
                empty.clone()
            }
            None => empty.clone(),
        };
        let value: bytes::Bytes = serde_json::to_vec(&pointer)?.into();
        let written = match &entry {
            Some(e) => kv.update(&key, value, e.revision).await.ok(),
            None => kv.create(&key, value).await.ok(),
        };
        Ok(written.map(|rev| (pointer, rev)))
    }

    /// Read the log from `from` on: `(sequence, kind, chunk, payload)` of each message, and
    /// the last sequence read (`from - 1` when none).
    async fn read(&self, from: u64) -> anyhow::Result<(Vec<LogMessage>, u64)> {
        let stream = self.stream().await?;
        let subject = log_subject(&self.tenant);
        let mut out = Vec::new();
        let mut at = from.max(1);
        let mut last = 0;
        loop {
            let msg = match stream.direct_get_next_for_subject(&subject, Some(at)).await {
                Ok(m) => m,
                Err(e) if e.kind() == DirectGetErrorKind::NotFound => break,
                Err(e) => return Err(e).context("cannot read the alert log"),
            };
            let header = |name: &str| {
                msg.headers
                    .get(name)
                    .map(|v| v.as_str().to_string())
                    .unwrap_or_default()
            };
            out.push(LogMessage {
                seq: msg.sequence,
                kind: header(KIND),
                chunk: header(CHUNK_HEADER),
                payload: msg.payload.to_vec(),
            });
            last = msg.sequence;
            at = msg.sequence + 1;
        }
        Ok((out, last))
    }
}

struct LogMessage {
    seq: u64,
    kind: String,
    chunk: String,
    payload: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct Fence {
    gateway: String,
    token: u64,
}

/// How many times a load is tried again when the log moves while it is read (an old
/// holder's last writes).
const LOAD_RACES: usize = 10;

#[async_trait]
impl AlertStore for NatsAlertStore {
    async fn load(&self) -> anyhow::Result<Option<Loaded>> {
        let mut last_guard = self.last.lock().await;
        for attempt in 1..=LOAD_RACES {
            let Some((pointer, pointer_rev)) = self.claim_pointer().await? else {
                continue;
            };
            if !pointer.tenant_id.is_empty() && pointer.tenant_id != self.tenant_id {
                tracing::warn!(tenant = %self.tenant, "the alert state in NATS is of a deleted tenant of the same name: removed");
                self.remove().await?;
                continue;
            }
            let (messages, last) = self.read(pointer.first.max(1)).await?;
            let mut snapshot: Option<Snapshot> = None;
            let mut bytes = Vec::new();
            let mut chunks = 0usize;
            let mut records = Vec::new();
            let mut written = false;
            for m in &messages {
                match m.kind.as_str() {
                    "chunk"
                        if pointer.first > 0 && (pointer.first..=pointer.last).contains(&m.seq) =>
                    {
                        bytes.extend_from_slice(&m.payload);
                        chunks += 1;
                        // Every chunk, in order (none purged or lost).
                        if m.seq == pointer.last && m.chunk == format!("{chunks}/{chunks}") {
                            match serde_json::from_slice::<Snapshot>(&bytes) {
                                Ok(s) => snapshot = Some(s),
                                Err(e) => {
                                    tracing::error!(tenant = %self.tenant, first = pointer.first, error = %e,
                                    "the alert snapshot is unreadable; alerts rebuilt from the bus")
                                }
                            }
                        }
                        written = true;
                    }
                    "records" => {
                        match serde_json::from_slice::<Vec<Record>>(&m.payload) {
                            Ok(r) => records.extend(r),
                            Err(e) => {
                                tracing::error!(tenant = %self.tenant, seq = m.seq, error = %e,
                                "an alert log message is unreadable; skipped")
                            }
                        }
                        written = true;
                    }
                    _ => {}
                }
            }
            if pointer.first > 0 && snapshot.is_none() && bytes.is_empty() {
                // The snapshot named is not in the log (yet, or any more): a race with an
                // older holder's last writes is over in a moment; past that, the log lost it.
                if attempt < LOAD_RACES {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                tracing::error!(tenant = %self.tenant, first = pointer.first, last = pointer.last,
                    "the alert snapshot named is missing from the log; alerts rebuilt from the bus");
            }
            // The fence: from here on only this holder's writes are taken.
            let fence = serde_json::to_vec(&Fence {
                gateway: self.gateway.clone(),
                token: self.tenure.token,
            })?;
            let mut at = last;
            match self.put(&mut at, "fence", None, fence).await {
                Ok(()) => {
                    *last_guard = Some(at);
                    *self.pointer.lock().await = pointer_rev;
                    if snapshot.is_none() && !written {
                        return Ok(None);
                    }
                    return Ok(Some(replay(snapshot.unwrap_or_default(), records)));
                }
                // The log moved while it was read (an old holder's last writes): again.
                Err(e) if e.is::<Fenced>() && self.tenure.valid() => continue,
                Err(e) => return Err(e),
            }
        }
        anyhow::bail!(
            "the alert log kept moving while it was read (another gateway still writing); retrying"
        )
    }

    async fn append(&self, records: &[Record]) -> anyhow::Result<()> {
        let mut guard = self.last.lock().await;
        let Some(last) = guard.as_mut() else {
            anyhow::bail!("the alert log is written before it was loaded");
        };
        // As few messages as fit, in order.
        let mut batches: Vec<Vec<&Record>> = vec![Vec::new()];
        let mut size = 0;
        for r in records {
            let len = serde_json::to_vec(r)?.len() + 1;
            if size + len > CHUNK && batches.last().is_some_and(|b| !b.is_empty()) {
                batches.push(Vec::new());
                size = 0;
            }
            batches.last_mut().expect("one at least").push(r);
            size += len;
        }
        for batch in batches.iter().filter(|b| !b.is_empty()) {
            self.put(last, "records", None, serde_json::to_vec(batch)?)
                .await
                .map_err(|e| self.fenced(e))?;
        }
        Ok(())
    }

    async fn snapshot(&self, snapshot: Snapshot) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec(&snapshot)?;
        let mut guard = self.last.lock().await;
        let Some(last) = guard.as_mut() else {
            anyhow::bail!("the alert log is written before it was loaded");
        };
        let count = bytes.len().div_ceil(CHUNK).max(1);
        let mut first = 0;
        for (i, chunk) in bytes.chunks(CHUNK).enumerate() {
            self.put(
                last,
                "chunk",
                Some(format!("{}/{count}", i + 1)),
                chunk.to_vec(),
            )
            .await
            .map_err(|e| self.fenced(e))?;
            if i == 0 {
                first = *last;
            }
        }
        let pointer = Pointer {
            first,
            last: *last,
            tenant_id: self.tenant_id.clone(),
        };
        let value: bytes::Bytes = serde_json::to_vec(&pointer)?.into();
        let key = snapshot_key(&self.tenant);
        let mut rev = self.pointer.lock().await;
        match self.nats.alerts.update(&key, value, *rev).await {
            Ok(r) => *rev = r,
            Err(e) => {
                // Stored all the same (an ack lost), not stored, or moved by a holder that
                // took over (which claims it before anything else).
                let now = self.nats.alerts.entry(&key).await.ok().flatten();
                match now {
                    Some(n)
                        if serde_json::from_slice::<Pointer>(&n.value).ok() == Some(pointer) =>
                    {
                        *rev = n.revision
                    }
                    Some(n) if n.revision == *rev => {
                        return Err(e).context("cannot write the alert snapshot's place");
                    }
                    None => return Err(e).context("cannot write the alert snapshot's place"),
                    Some(_) => {
                        tracing::warn!(tenant = %self.tenant, "the alert snapshot's place was moved by another gateway");
                        return Err(self.fenced(Fenced.into()));
                    }
                }
            }
        }
        drop(rev);
        // What the snapshot holds is no longer needed in the log.
        match self.stream().await {
            Ok(stream) => {
                if let Err(e) = stream
                    .purge()
                    .filter(log_subject(&self.tenant))
                    .sequence(first)
                    .await
                {
                    tracing::warn!(tenant = %self.tenant, error = %e, "cannot purge the alert log before its snapshot; it is purged at the next one");
                }
            }
            Err(e) => {
                tracing::warn!(tenant = %self.tenant, error = %format!("{e:#}"), "cannot purge the alert log before its snapshot")
            }
        }
        Ok(())
    }

    fn writable(&self) -> bool {
        self.tenure.valid()
    }

    async fn remove(&self) -> anyhow::Result<()> {
        let stream = self.stream().await?;
        stream
            .purge()
            .filter(log_subject(&self.tenant))
            .await
            .context("cannot purge the alert log")?;
        self.nats
            .alerts
            .purge(snapshot_key(&self.tenant))
            .await
            .context("cannot remove the alert snapshot's place")?;
        *self.pointer.lock().await = 0;
        Ok(())
    }
}

/// A request forwarded to the holder (what the alerting API asks an evaluator).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "ask")]
pub enum Request {
    List,
    AddSilence {
        silence: crate::alerts::silence::Silence,
    },
    ExpireSilence {
        id: String,
    },
    Ack {
        fingerprint: String,
        check: String,
        ack: crate::alerts::Ack,
    },
}

/// The holder's answer: the value asked for, or why not (`busy`: ask again).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    Ok(serde_json::Value),
    Refused(String),
    Busy,
    NotRunning,
}

/// Who answers forwarded requests on the holder: its local evaluator (the alerting hub;
/// a trait so that this layer does not reach up into alerting).
#[async_trait]
pub trait Local: Send + Sync {
    async fn answer(&self, tenant: &str, request: Request) -> Answer;
}

/// Answer forwarded API requests for `tenant` with the local evaluator, until `life`
/// ends.
pub async fn serve_api(
    nats: Arc<Nats>,
    tenant: String,
    local: Arc<dyn Local>,
    life: CancellationToken,
) {
    let subject = api_subject(&tenant);
    let mut sub = match nats.client.subscribe(subject.clone()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(%subject, error = %e, "cannot answer alerting API requests from the other gateways");
            return;
        }
    };
    loop {
        let msg = tokio::select! {
            _ = life.cancelled() => break,
            m = sub.next() => match m { Some(m) => m, None => break },
        };
        let Some(reply) = msg.reply.clone() else {
            continue;
        };
        let (nats, local, tenant) = (nats.clone(), local.clone(), tenant.clone());
        tokio::spawn(async move {
            let answer = match serde_json::from_slice::<Request>(&msg.payload) {
                Ok(req) => local.answer(&tenant, req).await,
                Err(e) => Answer::Refused(format!("malformed alerting request: {e}")),
            };
            let body = serde_json::to_vec(&answer).unwrap_or_default();
            if let Err(e) = nats.client.publish(reply, body.into()).await {
                tracing::debug!(error = %e, "cannot answer a forwarded alerting request");
            }
        });
    }
    let _ = sub.unsubscribe().await;
}

/// Ask the holder of `tenant`'s alerting, wherever it is.
pub async fn forward(nats: &Nats, tenant: &str, req: &Request) -> Answer {
    let body = match serde_json::to_vec(req) {
        Ok(b) => b,
        Err(e) => return Answer::Refused(e.to_string()),
    };
    let request = async_nats::client::Request::new()
        .payload(body.into())
        .timeout(Some(API_DEADLINE));
    match nats.client.send_request(api_subject(tenant), request).await {
        Ok(msg) => serde_json::from_slice(&msg.payload).unwrap_or(Answer::Busy),
        Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => Answer::NotRunning,
        Err(_) => Answer::Busy,
    }
}
