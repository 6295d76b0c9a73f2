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
/// How long a forwarded API request waits for the holder.
const API_DEADLINE: Duration = Duration::from_secs(30);

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
    /// Given up on purpose (a gateway shutting down): anyone may take it at once.
    #[serde(default)]
    released: bool,
}

/// Where the latest complete snapshot is in the log.
#[derive(Debug, Serialize, Deserialize)]
struct Pointer {
    first: u64,
    last: u64,
}

/// A lease this gateway holds on a tenant's alerting.
pub struct Held {
    /// The revision that won it: the fencing token.
    pub token: u64,
    /// Cancelled when the lease is lost (or the gateway stops): the tenant's evaluator and
    /// workers run under it.
    pub life: CancellationToken,
    renewer: tokio::task::JoinHandle<()>,
}

impl Held {
    /// Stop renewing; give the lease up (if it is still this gateway's) so another gateway
    /// takes over at once rather than after [`LEASE_TTL`].
    pub async fn release(self) {
        self.life.cancel();
        let _ = self.renewer.await;
    }
}

/// The tenants' leases as one gateway contends for them.
pub struct Leases {
    pub nats: Arc<Nats>,
    pub gateway: String,
}

impl Leases {
    /// Wait until this gateway holds `tenant`'s lease; `None` at shutdown.
    pub async fn acquire(&self, tenant: &str, shutdown: &CancellationToken) -> Option<Held> {
        let key = lease_key(tenant);
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
                                // This gateway's own from before a restart: its holder is
                                // this process's past, which is gone.
                                Some(v) => v.released || v.gateway == self.gateway,
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
                                    tracing::warn!(%tenant, %holder, "the alerting lease was not renewed: taking it over");
                                }
                                kv.update(&key, mine, revision).await.ok()
                            } else {
                                None
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(%tenant, error = %e, "cannot read the alerting lease; retrying");
                    None
                }
            };
            if let Some(token) = taken {
                tracing::info!(%tenant, token, gateway = %self.gateway, "this gateway now evaluates and notifies for the tenant");
                let life = shutdown.child_token();
                let renewer = tokio::spawn(renew(
                    self.nats.clone(),
                    key,
                    self.value(false),
                    self.value(true),
                    token,
                    life.clone(),
                ));
                return Some(Held {
                    token,
                    life,
                    renewer,
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
            released,
        })
        .unwrap_or_default()
        .into()
    }
}

/// Renew the lease at `key` (won at `revision`) until `life` ends, then release it; end
/// `life` when the lease is lost or cannot be renewed in time.
async fn renew(
    nats: Arc<Nats>,
    key: String,
    mine: bytes::Bytes,
    released: bytes::Bytes,
    mut revision: u64,
    life: CancellationToken,
) {
    let mut renewed = Instant::now();
    loop {
        tokio::select! {
            _ = life.cancelled() => break,
            _ = tokio::time::sleep(LEASE_RENEW) => {}
        }
        let left = SELF_FENCE.saturating_sub(renewed.elapsed());
        let update = nats.alerts.update(&key, mine.clone(), revision);
        match tokio::time::timeout(left, update).await {
            Ok(Ok(r)) => {
                revision = r;
                renewed = Instant::now();
            }
            Ok(Err(e))
                if e.kind() == async_nats::jetstream::kv::UpdateErrorKind::WrongLastRevision =>
            {
                tracing::warn!(%key, "the alerting lease was taken by another gateway: this one stops notifying");
                life.cancel();
                return;
            }
            Ok(Err(e)) if renewed.elapsed() < SELF_FENCE => {
                tracing::warn!(%key, error = %e, "cannot renew the alerting lease; retrying");
            }
            _ => {
                tracing::error!(%key, "the alerting lease could not be renewed in time: this gateway stops notifying");
                life.cancel();
                return;
            }
        }
    }
    match nats.alerts.update(&key, released, revision).await {
        Ok(_) => tracing::info!(%key, "alerting lease released"),
        Err(e) => tracing::debug!(%key, error = %e, "alerting lease not released (taken already)"),
    }
}

/// Why a write to the log was refused.
#[derive(Debug, thiserror::Error)]
#[error("another gateway took over this tenant's alerting (a newer fence is on its log); this gateway stops notifying for it")]
pub struct Fenced;

/// A tenant's [`AlertStore`] in NATS, for the lease holder whose `token` it is; a write
/// refused by the fence ends `life`.
pub struct NatsAlertStore {
    nats: Arc<Nats>,
    tenant: String,
    gateway: String,
    token: u64,
    life: CancellationToken,
    /// The log's last message as this holder knows it: `None` until loaded (and fenced).
    last: tokio::sync::Mutex<Option<u64>>,
    /// The snapshot key's revision as this holder knows it (0: none).
    pointer: tokio::sync::Mutex<u64>,
}

impl NatsAlertStore {
    /// The store of `gateway`, holding `tenant`'s lease with `token` (see [`Held`]) for as
    /// long as `life` lasts.
    pub fn new(
        nats: Arc<Nats>,
        tenant: &str,
        gateway: &str,
        token: u64,
        life: CancellationToken,
    ) -> NatsAlertStore {
        NatsAlertStore {
            nats,
            tenant: tenant.to_string(),
            gateway: gateway.to_string(),
            token,
            life,
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

    /// End this holder's life if `e` is a fence.
    fn fenced(&self, e: anyhow::Error) -> anyhow::Error {
        if e.is::<Fenced>() {
            tracing::warn!(tenant = %self.tenant, token = self.token, "{Fenced}");
            self.life.cancel();
        }
        e
    }

    /// Append one message after `last`, moving `last` on ([`Fenced`] if another is).
    async fn put(
        &self,
        last: &mut u64,
        kind: &str,
        chunk: Option<String>,
        payload: Vec<u8>,
    ) -> anyhow::Result<()> {
        let mut headers = HeaderMap::new();
        headers.insert(KIND, kind);
        if let Some(c) = chunk {
            headers.insert(CHUNK_HEADER, c.as_str());
        }
        let msg = PublishMessage::build()
            .payload(payload.into())
            .headers(headers)
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
                Ok(())
            }
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Err(Fenced.into()),
            Err(e) => Err(e).context("the alert log did not take a write"),
        }
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
        for _ in 0..LOAD_RACES {
            let (pointer, pointer_rev) = match self
                .nats
                .alerts
                .entry(snapshot_key(&self.tenant))
                .await
                .context("cannot read the alert snapshot's place")?
            {
                Some(e) if e.operation == Operation::Put => {
                    (serde_json::from_slice::<Pointer>(&e.value).ok(), e.revision)
                }
                Some(e) => (None, e.revision),
                None => (None, 0),
            };
            let (messages, last) = self.read(pointer.as_ref().map_or(1, |p| p.first)).await?;
            let mut snapshot: Option<Snapshot> = None;
            let mut bytes = Vec::new();
            let mut chunks = 0usize;
            let mut records = Vec::new();
            let mut written = false;
            for m in &messages {
                match (m.kind.as_str(), &pointer) {
                    ("chunk", Some(p)) if (p.first..=p.last).contains(&m.seq) => {
                        bytes.extend_from_slice(&m.payload);
                        chunks += 1;
                        if m.seq == p.last {
                            // Every chunk, in order (none purged or lost).
                            let whole = m.chunk == format!("{chunks}/{chunks}");
                            match serde_json::from_slice::<Snapshot>(&bytes) {
                                Ok(_) if !whole => {
                                    tracing::error!(tenant = %self.tenant, first = p.first, chunk = %m.chunk, read = chunks,
                                    "the alert snapshot is incomplete; alerts rebuilt from the bus")
                                }
                                Ok(s) => snapshot = Some(s),
                                Err(e) => {
                                    tracing::error!(tenant = %self.tenant, first = p.first, error = %e,
                                    "the alert snapshot is unreadable; alerts rebuilt from the bus")
                                }
                            }
                        }
                        written = true;
                    }
                    ("records", _) => {
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
            // The fence: from here on only this holder's writes are taken.
            let fence = serde_json::to_vec(&Fence {
                gateway: self.gateway.clone(),
                token: self.token,
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
                Err(e) if e.is::<Fenced>() => continue,
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
        let pointer: bytes::Bytes = serde_json::to_vec(&Pointer { first, last: *last })?.into();
        let key = snapshot_key(&self.tenant);
        let mut rev = self.pointer.lock().await;
        let written = match *rev {
            0 => self
                .nats
                .alerts
                .create(&key, pointer)
                .await
                .map_err(anyhow::Error::from),
            r => self
                .nats
                .alerts
                .update(&key, pointer, r)
                .await
                .map_err(anyhow::Error::from),
        };
        match written {
            Ok(r) => *rev = r,
            Err(e) => {
                // Only another holder moves it: this one is fenced.
                tracing::warn!(tenant = %self.tenant, error = %format!("{e:#}"), "the alert snapshot's place was moved by another gateway");
                return Err(self.fenced(Fenced.into()));
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

/// A request forwarded to the holder (see [`crate::alerting::Command`]).
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

/// Answer forwarded API requests for `tenant` with the local evaluator (`hub`), until
/// `life` ends.
pub async fn serve_api(
    nats: Arc<Nats>,
    tenant: String,
    hub: Arc<crate::alerting::Hub>,
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
        let (nats, hub, tenant) = (nats.clone(), hub.clone(), tenant.clone());
        tokio::spawn(async move {
            let answer = match serde_json::from_slice::<Request>(&msg.payload) {
                Ok(req) => hub.answer_locally(&tenant, req).await,
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
    let asked = tokio::time::timeout(
        API_DEADLINE,
        nats.client.request(api_subject(tenant), body.into()),
    )
    .await;
    match asked {
        Ok(Ok(msg)) => serde_json::from_slice(&msg.payload).unwrap_or(Answer::Busy),
        Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => Answer::NotRunning,
        _ => Answer::Busy,
    }
}
