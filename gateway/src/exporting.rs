//! Metric export at work: each tenant's results, read from the bus, sent to the time-series
//! databases its check files name (`[[export]]`, see [`crate::export::config`]), each sink with a cursor
//! of its own kept on disk, so a sink that is down for an hour gets the whole backlog
//! when it returns, in order, and a gateway restarted goes on where it was.
//!
//! In a NATS fleet each sink is exported by one gateway at a time, under a lease of its
//! own (`nats::alerts::Leases`, key `<tenant>.export.<sink>.lease`), with its cursor in
//! NATS (key `<tenant>.export.<sink>.cursor`, written compare-and-set on the revision the
//! holder last wrote, so a holder that lost the lease cannot move it): when the holder
//! dies, another gateway takes the lease and goes on from the cursor.
//!
//! A sink's loop: read results from its cursor, map them to samples ([`mapping`]), send
//! them in requests of at most `batch` samples ([`sinks`]), and move the cursor past the
//! results a request carried once the sink took it (or refused it for good: counted and
//! skipped). A sample is sent at least once; one sent twice (a crash between a request
//! and the cursor's save) is the same series, timestamp and value, which both Prometheus
//! and InfluxDB store once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bus::{AgentRef, Bus};
use crate::checks::{Catalog, TenantChecks};
use crate::export::config::Sink;
use crate::export::mapping;
use crate::export::sinks::{self, Failure};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::registry::{Identity, Registry};
use crate::tenants::Tenants;

/// Results read from the bus at a time.
const READ_MAX: usize = 1000;
/// How long a read waits for new results when caught up.
const WAIT: Duration = Duration::from_secs(1);
/// A failed request is tried again after this, doubling up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// Agents' hostnames and labels are looked up again after this.
const IDENTITIES: Duration = Duration::from_secs(30);

/// What every tenant's exports share.
#[derive(Clone)]
pub struct Context {
    /// `DATA_DIR/export`: a directory per tenant, a cursor file per sink.
    pub dir: PathBuf,
    pub bus: Arc<dyn Bus>,
    pub registry: Arc<Registry>,
    pub checks: Arc<TenantChecks>,
    pub metrics: Arc<Metrics>,
    pub client: reqwest::Client,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
    pub health: Arc<Health>,
    pub tenants: Arc<Tenants>,
    /// How often tenants are looked at for exports newly configured.
    pub poll: Duration,
    /// The tenants whose exports are started.
    pub running: Arc<std::sync::Mutex<HashSet<String>>>,
    /// In a fleet: the leases sinks are exported under, and the NATS their cursors are in.
    pub fleet: Option<Arc<crate::nats::alerts::Leases>>,
}

pub fn export_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("export")
}

/// Start each tenant's exports once it has any: looked at every `poll`, until shutdown.
pub async fn run(ctx: Context) {
    loop {
        if ctx.fleet.is_some() {
            // Every tenant's configuration is followed (mirrored from the fleet), so any
            // gateway can take any sink over, even one of a tenant with no agent here.
            for t in ctx.tenants.list_tenants() {
                ctx.checks.of(&t.name);
            }
        }
        for (tenant, store) in ctx.checks.stores() {
            if outpost_sys::lock(&ctx.running).contains(&tenant)
                || store.current().export.sinks.is_empty()
            {
                continue;
            }
            outpost_sys::lock(&ctx.running).insert(tenant.clone());
            tracing::info!(%tenant, "metric export started");
            let task: &'static str =
                Box::leak(format!("metric export of {tenant}").into_boxed_str());
            let (ctx2, config) = (ctx.clone(), store.subscribe());
            crate::health::supervise(
                &ctx.tracker,
                ctx.health.clone(),
                ctx.shutdown.clone(),
                task,
                move || tenant_exports(ctx2.clone(), tenant.clone(), config.clone()),
            );
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tokio::time::sleep(ctx.poll) => {}
        }
    }
}

/// Keep one task per sink of `tenant` running as its configuration says: a sink added
/// starts, one removed or changed stops (a changed one starts again, from its cursor).
async fn tenant_exports(ctx: Context, tenant: String, mut config: watch::Receiver<Arc<Catalog>>) {
    let mut running: BTreeMap<String, (Sink, CancellationToken, tokio::task::JoinHandle<()>)> =
        BTreeMap::new();
    loop {
        let wanted = if ctx.tenants.tenant(&tenant).is_some() {
            config.borrow_and_update().export.sinks.clone()
        } else {
            BTreeMap::new()
        };
        let mut stopped = Vec::new();
        running.retain(|name, (sink, stop, task)| {
            if task.is_finished() {
                // Ended by itself: a panic (logged by the runtime). Started again below.
                tracing::error!(%tenant, sink = %name, "metric export ended unexpectedly; starting it again from its cursor");
                return false;
            }
            let keep = wanted.get(name) == Some(sink);
            if !keep {
                tracing::info!(%tenant, sink = %name, "metric export stopped (its [[export]] changed or went)");
                stop.cancel();
                stopped.push((name.clone(), std::mem::replace(task, tokio::spawn(async {}))));
            }
            keep
        });
        // A sink's old task ends before a new one starts from the same cursor (its
        // request in flight is dropped at once: it stops at every wait).
        for (name, task) in stopped {
            let _ = task.await;
            if !wanted.contains_key(&name) {
                ctx.metrics.export_forget(&tenant, &name);
            }
        }
        for (name, sink) in wanted {
            if running.contains_key(&name) {
                continue;
            }
            let stop = ctx.shutdown.child_token();
            let task = match ctx.fleet.clone() {
                None => {
                    let exporter = Exporter {
                        ctx: ctx.clone(),
                        tenant: tenant.clone(),
                        cursor: Cursor::File(ctx.dir.join(&tenant).join(format!("{name}.json"))),
                        sink: sink.clone(),
                        stop: stop.clone(),
                        tenure: None,
                    };
                    ctx.tracker.spawn(exporter.run())
                }
                Some(leases) => ctx.tracker.spawn(contend(
                    ctx.clone(),
                    leases,
                    tenant.clone(),
                    sink.clone(),
                    stop.clone(),
                )),
            };
            running.insert(name, (sink, stop, task));
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            r = config.changed() => if r.is_err() { return },
            // (A tenant deleted is noticed here.)
            _ = tokio::time::sleep(ctx.poll) => {}
        }
    }
}

/// In a fleet: export `tenant`'s `sink` whenever this gateway holds its lease, until
/// `stop`.
async fn contend(
    ctx: Context,
    leases: Arc<crate::nats::alerts::Leases>,
    tenant: String,
    sink: Sink,
    stop: CancellationToken,
) {
    let key = |what: &str| format!("{tenant}.export.{}.{what}", sink.name);
    loop {
        let Some(held) = leases
            .acquire_key(key("lease"), &tenant, "metric export", &stop)
            .await
        else {
            return;
        };
        let exporter = Exporter {
            ctx: ctx.clone(),
            tenant: tenant.clone(),
            cursor: Cursor::Kv {
                nats: leases.nats.clone(),
                key: key("cursor"),
                revision: std::sync::Mutex::new(None),
            },
            sink: sink.clone(),
            stop: held.tenure.life.clone(),
            tenure: Some(held.tenure.clone()),
        };
        exporter.run().await;
        held.release().await;
        // (Its figures are the next holder's to keep: a lag left here would stand still.)
        ctx.metrics.export_forget(&tenant, &sink.name);
        if stop.is_cancelled() {
            return;
        }
        // (Lost the lease, or fenced: contend again after a breath.)
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(RETRY_MIN) => {}
        }
    }
}

/// Where a sink has exported up to: the bus position after the last result it sent.
enum Cursor {
    /// A file of this gateway's (its embedded bus).
    File(PathBuf),
    /// A key in the fleet's alerting bucket, with the revision this holder last read or
    /// wrote there.
    Kv {
        nats: Arc<crate::nats::Nats>,
        key: String,
        revision: std::sync::Mutex<Option<u64>>,
    },
}

/// Where a sink is on the bus: its results and its presence changes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct Place {
    /// After the last result sent.
    #[serde(rename = "position")]
    results: u64,
    /// After the last presence change sent (`None` in a cursor from before presence was
    /// exported: it starts at the bus's end).
    #[serde(default)]
    presence: Option<u64>,
}

/// Why a cursor was not saved.
enum SaveError {
    /// Another gateway wrote it since: this one no longer exports the sink.
    Fenced,
    Other(String),
}

impl Cursor {
    async fn load(&self) -> anyhow::Result<Option<Place>> {
        match self {
            Cursor::File(path) => match std::fs::read(path) {
                Ok(bytes) => Ok(Some(serde_json::from_slice::<Place>(&bytes)?)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e.into()),
            },
            Cursor::Kv {
                nats,
                key,
                revision,
            } => {
                let entry = nats
                    .alerts
                    .entry(key)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot read the cursor {key}: {e}"))?;
                let Some(entry) = entry else {
                    return Ok(None);
                };
                *outpost_sys::lock(revision) = Some(entry.revision);
                if entry.operation != async_nats::jetstream::kv::Operation::Put {
                    return Ok(None);
                }
                Ok(Some(serde_json::from_slice::<Place>(&entry.value)?))
            }
        }
    }

    async fn save(&self, place: &Place) -> Result<(), SaveError> {
        let bytes = serde_json::to_vec(place).expect("a cursor serializes");
        match self {
            Cursor::File(path) => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| SaveError::Other(e.to_string()))?;
                }
                outpost_sys::write_atomic(path, &bytes, 0o600)
                    .map_err(|e| SaveError::Other(e.to_string()))
            }
            Cursor::Kv {
                nats,
                key,
                revision,
            } => {
                let last = *outpost_sys::lock(revision);
                let written = match last {
                    Some(r) => nats.alerts.update(key, bytes.into(), r).await.map_err(|e| {
                        if e.kind() == async_nats::jetstream::kv::UpdateErrorKind::WrongLastRevision
                        {
                            SaveError::Fenced
                        } else {
                            SaveError::Other(e.to_string())
                        }
                    }),
                    None => nats.alerts.create(key, bytes.into()).await.map_err(|e| {
                        if e.kind() == async_nats::jetstream::kv::CreateErrorKind::AlreadyExists {
                            SaveError::Fenced
                        } else {
                            SaveError::Other(e.to_string())
                        }
                    }),
                }?;
                *outpost_sys::lock(revision) = Some(written);
                Ok(())
            }
        }
    }
}

struct Exporter {
    ctx: Context,
    tenant: String,
    cursor: Cursor,
    sink: Sink,
    stop: CancellationToken,
    /// In a fleet: the lease it exports under (checked before every request).
    tenure: Option<Arc<crate::nats::alerts::Tenure>>,
}

impl Exporter {
    fn stats(&self, f: impl FnOnce(&mut crate::metrics::ExportStats)) {
        self.ctx.metrics.export(&self.tenant, &self.sink.name, f);
    }

    async fn run(self) {
        let name = &self.sink.name;
        let tenant = &self.tenant;
        let mut place = loop {
            match self.start_place().await {
                Ok(p) => break p,
                Err(e) => {
                    tracing::error!(%tenant, sink = %name, error = %format!("{e:#}"), "metric export cannot find where to start; retrying");
                    tokio::select! {
                        _ = self.stop.cancelled() => return,
                        _ = tokio::time::sleep(RETRY_MAX) => {}
                    }
                }
            }
        };
        tracing::info!(%tenant, sink = %name, ?place, "metric export running");
        let mut identities: HashMap<String, Identity> = HashMap::new();
        let mut identities_at = Instant::now();
        loop {
            if !self.presence(&mut place, &identities).await {
                return;
            }
            let position = place.results;
            let read = tokio::select! {
                _ = self.stop.cancelled() => return,
                r = self.ctx.bus.read_results(tenant, position, READ_MAX, WAIT) => r,
            };
            let read = match read {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(%tenant, sink = %name, error = %e, "metric export cannot read the bus; retrying");
                    tokio::select! {
                        _ = self.stop.cancelled() => return,
                        _ = tokio::time::sleep(RETRY_MIN) => {}
                    }
                    continue;
                }
            };
            if read.lost {
                tracing::error!(%tenant, sink = %name, position,
                    "results were deleted by the bus's retention before this sink got them: its series have a gap");
                self.stats(|s| s.lost_gaps += 1);
            }
            if read.results.is_empty() {
                self.stats(|s| s.lag_ms = 0);
                if read.next != position {
                    place.results = read.next;
                    if !self.save(&place).await {
                        return;
                    }
                }
                continue;
            }
            if identities_at.elapsed() > IDENTITIES {
                identities.clear();
                identities_at = Instant::now();
            }
            let oldest = read.results[0].2.started_at_ms;
            self.stats(|s| s.lag_ms = outpost_sys::now_ms().saturating_sub(oldest));
            // Requests of at most `batch` samples, each ending at a result's end, so the
            // cursor can move past exactly what a sink took. (A result with more samples
            // than `batch` goes alone.)
            let mut samples = Vec::new();
            let mut through = position;
            for (i, (after, agent, result)) in read.results.iter().enumerate() {
                // (An agent not known yet is looked up again at its next result: its
                // labels are not cached as missing.)
                if !identities.contains_key(&agent.fingerprint) {
                    if let Some(id) = self
                        .ctx
                        .registry
                        .identity(&AgentRef::new(tenant, &agent.fingerprint))
                    {
                        identities.insert(agent.fingerprint.clone(), id);
                    }
                }
                let who = identities.get(&agent.fingerprint);
                let more = mapping::samples(tenant, &agent.fingerprint, who, result);
                if !samples.is_empty() && samples.len() + more.len() > self.sink.batch {
                    if !self.deliver(&samples, oldest).await {
                        return;
                    }
                    place.results = through;
                    if !self.save(&place).await {
                        return;
                    }
                    samples.clear();
                }
                samples.extend(more);
                through = *after;
                if i + 1 == read.results.len() {
                    if !self.deliver(&samples, oldest).await {
                        return;
                    }
                    place.results = read.next.max(through);
                    if !self.save(&place).await {
                        return;
                    }
                }
            }
        }
    }

    /// Send the presence changes since `place.presence` (a read that does not wait),
    /// moving it on; false when stopped (or fenced) first.
    async fn presence(&self, place: &mut Place, identities: &HashMap<String, Identity>) -> bool {
        let Some(from) = place.presence else {
            return true;
        };
        let read = match self
            .ctx
            .bus
            .read_presence(&self.tenant, from, READ_MAX, Duration::ZERO)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(tenant = %self.tenant, sink = %self.sink.name, error = %e, "metric export cannot read presence now");
                return true;
            }
        };
        if read.lost {
            self.stats(|s| s.lost_gaps += 1);
        }
        if let Some((_, first)) = read.items.first() {
            let samples: Vec<mapping::Sample> = read
                .items
                .iter()
                .map(|(_, e)| {
                    // (From the registry when not cached: an agent lost may send nothing
                    // more, but its 0 must be the same series as its 1.)
                    let who = identities.get(&e.agent.fingerprint).cloned().or_else(|| {
                        self.ctx
                            .registry
                            .identity(&AgentRef::new(&self.tenant, &e.agent.fingerprint))
                    });
                    mapping::presence(&self.tenant, e, who.as_ref())
                })
                .collect();
            for chunk in samples.chunks(self.sink.batch) {
                if !self.deliver(chunk, first.at_ms).await {
                    return false;
                }
            }
        }
        if read.next != from {
            place.presence = Some(read.next);
            return self.save(place).await;
        }
        true
    }

    /// A cursor kept, else the bus's ends (or its start, with `from = "start"`).
    async fn start_place(&self) -> anyhow::Result<Place> {
        let mut place = match self.cursor.load().await? {
            Some(p) => p,
            None if self.sink.from_start => Place {
                results: 0,
                presence: Some(0),
            },
            None => {
                let ends = self.ctx.bus.ends(&self.tenant).await?;
                Place {
                    results: ends.results,
                    presence: Some(ends.presence),
                }
            }
        };
        if place.presence.is_none() {
            place.presence = Some(self.ctx.bus.ends(&self.tenant).await?.presence);
        }
        // Written at once (compare-and-set in a fleet): a stale read, or an old holder
        // still saving, shows here, before anything is sent.
        match self.cursor.save(&place).await {
            Ok(()) => Ok(place),
            Err(SaveError::Fenced) => anyhow::bail!("another gateway moved this sink's cursor"),
            Err(SaveError::Other(e)) => anyhow::bail!("cannot write the cursor: {e}"),
        }
    }

    /// Keep the cursor at `place`; false when another gateway has taken the sink over
    /// (this one stops).
    async fn save(&self, place: &Place) -> bool {
        match self.cursor.save(place).await {
            Ok(()) => true,
            Err(SaveError::Fenced) => {
                tracing::warn!(tenant = %self.tenant, sink = %self.sink.name,
                    "another gateway moved this sink's cursor: it exports the sink now; this one stops");
                self.stop.cancel();
                false
            }
            Err(SaveError::Other(e)) => {
                tracing::error!(tenant = %self.tenant, sink = %self.sink.name, error = %e,
                    "cannot save the metric export's cursor; a restart would send some samples again");
                true
            }
        }
    }

    /// Send until the sink takes the samples, splitting what it refuses until what is
    /// refused is single samples (Prometheus refuses a whole request for one sample out
    /// of order or out of bounds), which are counted and skipped; false when stopped
    /// first. `oldest`: when the oldest result not yet taken ran (for the lag).
    async fn deliver(&self, samples: &[mapping::Sample], oldest: u64) -> bool {
        // Parts still to send, the next one last.
        let mut parts = vec![samples];
        let mut wait = RETRY_MIN;
        let mut told = None;
        while let Some(part) = parts.pop() {
            if part.is_empty() {
                continue;
            }
            // A holder paused past its lease sends nothing when it runs again.
            if self.tenure.as_ref().is_some_and(|t| !t.valid()) {
                self.stop.cancel();
                return false;
            }
            let sent = tokio::select! {
                _ = self.stop.cancelled() => return false,
                r = sinks::send(&self.ctx.client, &self.sink, part) => r,
            };
            match sent {
                Ok(()) => {
                    self.stats(|s| s.samples_sent += part.len() as u64);
                    if told.take().is_some() {
                        tracing::info!(tenant = %self.tenant, sink = %self.sink.name, "metric export: the sink takes samples again");
                    }
                    wait = RETRY_MIN;
                    continue;
                }
                Err(Failure::Refused(why)) if part.len() > 1 => {
                    tracing::debug!(tenant = %self.tenant, sink = %self.sink.name, samples = part.len(), %why,
                        "the sink refused a request; sending it in halves");
                    let (a, b) = part.split_at(part.len() / 2);
                    parts.push(b);
                    parts.push(a);
                    continue;
                }
                Err(Failure::Refused(why)) => {
                    self.stats(|s| s.samples_refused += 1);
                    let s = &part[0];
                    tracing::error!(tenant = %self.tenant, sink = %self.sink.name, series = s.name,
                        labels = ?s.labels, ts_ms = s.ts_ms, %why,
                        "the sink refused a sample for good; it is skipped");
                    continue;
                }
                Err(Failure::Retry(why)) => {
                    self.stats(|s| {
                        s.failed_attempts += 1;
                        s.lag_ms = outpost_sys::now_ms().saturating_sub(oldest);
                    });
                    if told.as_ref() != Some(&why) {
                        tracing::warn!(tenant = %self.tenant, sink = %self.sink.name, %why,
                            "the sink did not take samples; retrying with backoff");
                        told = Some(why);
                    }
                    parts.push(part);
                }
            }
            tokio::select! {
                _ = self.stop.cancelled() => return false,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(RETRY_MAX);
        }
        true
    }
}
