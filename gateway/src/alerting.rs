//! Alerting at work (the pieces are in `alerts`, below `checks`; this runs them): for
//! each tenant with alerting configured, an evaluator that reads the
//! tenant's results from the bus in stored order and keeps its [`Alerts`], and a delivery
//! worker per receiver that sends what is due, in order, until the receiver took it.
//!
//! Nothing due is lost: a notification is in the journal ([`AlertStore`]) before anyone
//! tries to send it, and the bus position moves on only after that. A restart reads the bus
//! again from the last snapshot; what that makes due again has the same ids, and what was
//! already queued (or sent) is not queued again.
//!
//! An evaluator that starts with no state at all reads the history the bus keeps without
//! telling anyone (incidents long over are not news), and from the moment it has caught up
//! notifies what is still firing.
//!
//! One gateway evaluates a tenant: the embedded bus's, or in a NATS fleet the holder of
//! the tenant's lease (`nats::alerts`), whose state is in NATS.

mod entities;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_protocol::Status;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch, Mutex};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::alerts::config::{AlertConfig, ReceiverKind, Stale};
use crate::alerts::deliver::Sender;
use crate::alerts::retry::Outcome;
use crate::alerts::silence::{Silence, Silences};
use crate::alerts::store::{AlertStore, FileStore, Loaded, Queued, Record, Snapshot};
use crate::alerts::{Ack, Alerts, Kind, Notification, Policy};
use crate::bus::{AgentRef, Bus, Presence};
use crate::checks::{Catalog, TenantChecks};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::registry::{Identity, Registry};
use crate::tenants::Tenants;

/// Results read from the bus at a time.
const BATCH: usize = 512;
/// How long a read waits for new results (and so how often the clock is looked at).
const TICK: Duration = Duration::from_secs(1);
/// How often the state is snapshotted while it changes (the most a restart reads again).
const SNAPSHOT_EVERY: Duration = Duration::from_secs(5);
/// Journal records after which a snapshot is taken sooner.
const SNAPSHOT_RECORDS: usize = 10_000;
/// The wait before a failed store write or bus read is tried again.
const RETRY: Duration = Duration::from_secs(1);
/// How often Alertmanager receivers are sent the alerts still firing again (well within
/// `deliver::ALERTMANAGER_HOLD`, after which Alertmanager would end them).
const ALERTMANAGER_REFRESH: Duration = Duration::from_secs(60);
/// How often the evaluator looks again at what changes rarely: whether its tenant still
/// exists, the agents' labels, agents forgotten.
const HOUSEKEEPING: Duration = Duration::from_secs(30);
/// How long notifications wait for a receiver that is not (or no longer) configured before
/// they are refused to the fallback: a file broken at start, a receiver renamed by mistake
/// and put back, are not reasons to give up at once.
const MISSING_RECEIVER_GRACE: Duration = Duration::from_secs(600);

/// What every tenant's alerting shares.
#[derive(Clone)]
pub struct Context {
    /// `DATA_DIR/alerts`: a directory per tenant.
    pub dir: PathBuf,
    pub bus: Arc<dyn Bus>,
    pub registry: Arc<Registry>,
    pub checks: Arc<TenantChecks>,
    pub metrics: Arc<Metrics>,
    pub sender: Arc<Sender>,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
    pub health: Arc<Health>,
    pub tenants: Arc<Tenants>,
    /// How often tenants are looked at for alerting newly configured.
    pub poll: Duration,
    /// The tenants whose evaluator is started (here, so that `run` restarted by its
    /// supervisor does not start a second one).
    pub running: Arc<std::sync::Mutex<HashSet<String>>>,
    /// Where the API finds the evaluators.
    pub hub: Arc<Hub>,
    /// In a fleet: the NATS the tenants' state and leases are in.
    pub nats: Option<Arc<crate::nats::Nats>>,
    /// This gateway's id (the lease holder's name).
    pub gateway_id: String,
}

/// Start each tenant's alerting once it has any (receivers or routes in its files, or
/// notifications still queued from before): looked at every `poll`, until shutdown.
pub async fn run(ctx: Context) {
    if let Some(nats) = ctx.nats.clone() {
        return run_fleet(ctx, nats).await;
    }
    // Tenants with queued notifications or state: their configuration is loaded now, so
    // what waits is delivered even before one of their agents connects. A deleted
    // tenant's are removed.
    if let Ok(entries) = std::fs::read_dir(&ctx.dir) {
        for e in entries.filter_map(Result::ok) {
            let Some(t) = e.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if crate::tenant::parse_name(&t).is_err() || !e.path().is_dir() {
                continue;
            }
            if ctx.tenants.tenant(&t).is_some() {
                ctx.checks.of(&t);
            } else {
                remove_state(&ctx.dir.join(&t), &t);
            }
        }
    }
    loop {
        for (tenant, store) in ctx.checks.stores() {
            if outpost_sys::lock(&ctx.running).contains(&tenant) {
                continue;
            }
            let dir = ctx.dir.join(&tenant);
            let config = store.current().alerting.clone();
            if config.receivers.is_empty() && config.routes.is_empty() && !dir.exists() {
                continue;
            }
            outpost_sys::lock(&ctx.running).insert(tenant.clone());
            tracing::info!(%tenant, receivers = config.receivers.len(), routes = config.routes.len(), "alerting started");
            // Named once per tenant for the process's life (a handful of tenants).
            let task: &'static str = Box::leak(format!("alerting of {tenant}").into_boxed_str());
            let (ctx2, config) = (ctx.clone(), store.subscribe());
            crate::health::supervise(
                &ctx.tracker,
                ctx.health.clone(),
                ctx.shutdown.clone(),
                task,
                move || {
                    Engine {
                        tenant: tenant.clone(),
                        ctx: ctx2.clone(),
                        config: config.clone(),
                        store: Arc::new(FileStore::new(&ctx2.dir.join(&tenant))),
                    }
                    .run()
                },
            );
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tokio::time::sleep(ctx.poll) => {}
        }
    }
}

/// [`run`] in a NATS fleet: every gateway contends for the lease of each tenant with
/// alerting configured, and the holder evaluates and notifies for it (`nats::alerts`).
async fn run_fleet(ctx: Context, nats: Arc<crate::nats::Nats>) {
    ctx.hub.forward_over(nats.clone());
    let leases = Arc::new(crate::nats::alerts::Leases {
        nats: nats.clone(),
        gateway: ctx.gateway_id.clone(),
        incarnation: ctx.registry.me.incarnation.clone(),
    });
    loop {
        // Every tenant's configuration is followed here (mirrored from the fleet), so any
        // gateway can take over any tenant, even one with no agent connected to it.
        for t in ctx.tenants.list_tenants() {
            ctx.checks.of(&t.name);
        }
        for (tenant, store) in ctx.checks.stores() {
            if outpost_sys::lock(&ctx.running).contains(&tenant) {
                continue;
            }
            let config = store.current().alerting.clone();
            if config.receivers.is_empty() && config.routes.is_empty() {
                continue;
            }
            outpost_sys::lock(&ctx.running).insert(tenant.clone());
            tracing::info!(%tenant, "alerting configured: contending for the tenant's lease");
            let task: &'static str =
                Box::leak(format!("alerting lease of {tenant}").into_boxed_str());
            let (ctx2, leases2, config) = (ctx.clone(), leases.clone(), store.subscribe());
            crate::health::supervise(
                &ctx.tracker,
                ctx.health.clone(),
                ctx.shutdown.clone(),
                task,
                move || {
                    contend(
                        ctx2.clone(),
                        leases2.clone(),
                        tenant.clone(),
                        config.clone(),
                    )
                },
            );
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tokio::time::sleep(ctx.poll) => {}
        }
    }
}

/// Hold `tenant`'s lease whenever this gateway can, and evaluate while it holds it.
async fn contend(
    ctx: Context,
    leases: Arc<crate::nats::alerts::Leases>,
    tenant: String,
    config: watch::Receiver<Arc<Catalog>>,
) {
    let Some(nats) = ctx.nats.clone() else { return };
    loop {
        while ctx.tenants.tenant(&tenant).is_none() {
            tokio::select! {
                _ = ctx.shutdown.cancelled() => return,
                _ = tokio::time::sleep(HOUSEKEEPING) => {}
            }
        }
        let Some(held) = leases.acquire(&tenant, &ctx.shutdown).await else {
            return;
        };
        let Some(tenant_id) = ctx.tenants.tenant(&tenant).map(|t| t.id) else {
            held.release().await;
            continue;
        };
        ctx.metrics.lease(&tenant, true);
        let store = crate::nats::alerts::NatsAlertStore::new(
            nats.clone(),
            (&tenant, &tenant_id),
            &ctx.gateway_id,
            held.tenure.clone(),
        );
        let api = tokio::spawn(crate::nats::alerts::serve_api(
            nats.clone(),
            tenant.clone(),
            ctx.hub.clone() as Arc<dyn crate::nats::alerts::Local>,
            held.tenure.life.clone(),
        ));
        // This life's evaluator and workers end with the lease.
        let life = Context {
            shutdown: held.tenure.life.clone(),
            ..ctx.clone()
        };
        Engine {
            tenant: tenant.clone(),
            ctx: life,
            config: config.clone(),
            store: Arc::new(store),
        }
        .evaluate()
        .await;
        ctx.metrics.lease(&tenant, false);
        held.release().await;
        let _ = api.await;
        if ctx.shutdown.is_cancelled() {
            return;
        }
        tracing::warn!(%tenant, "this gateway no longer notifies for the tenant; contending for its lease again");
    }
}

/// What the gateway sees of the tenant's agents now: each lost agent's `outpost.agent`
/// alert fires (and resolves when it is back); an agent that said bye or was revoked
/// never fires, and its incidents end (resolved where they were told); a check of an
/// online agent that has sent nothing for [`STALE_INTERVALS`] intervals and its timeout
/// turns UNKNOWN as stale.
fn watch(
    alerts: &mut Alerts,
    config: &AlertConfig,
    (watched, gone, about_entities): (
        &[crate::registry::Watched],
        &HashMap<String, String>,
        &HashSet<&str>,
    ),
    last_result: &mut HashMap<(String, String), Instant>,
    now_ms: u64,
    route: crate::alerts::Route<'_>,
) -> Vec<Notification> {
    let mut due = gateways_gone(alerts, watched, gone, now_ms, route);
    for w in watched {
        let fp = &w.fingerprint;
        let name = if w.hostname.is_empty() {
            fp
        } else {
            &w.hostname
        };
        match w.presence {
            Presence::Lost => {
                // What it said last: DNS broken on its host is why it went, not a host down.
                let dns = alerts
                    .alerts
                    .get(fp)
                    .and_then(|checks| checks.get(DNS_CHECK))
                    .filter(|a| a.status != Status::Ok);
                let why = match dns {
                    Some(dns) => format!(
                        "DNS is broken on {name}, so its agent cannot reach the gateway: {}",
                        dns.output
                    ),
                    None => format!("agent {name} is lost: {}", w.reason),
                };
                due.extend(alerts.observe(
                    fp,
                    AGENT_CHECK,
                    (Status::Critical, &why),
                    now_ms,
                    route,
                ));
            }
            Presence::Online => {
                let back = format!("agent {name} is online");
                due.extend(alerts.observe(fp, AGENT_CHECK, (Status::Ok, &back), now_ms, route));
                // (Checks about entities go stale as the entity's: `entities::watch`.)
                for (check, interval, timeout) in &w.checks {
                    if about_entities.contains(check.as_str()) {
                        continue;
                    }
                    let ttl = match config.stale_after(check) {
                        Some(Stale::Never) => continue,
                        Some(Stale::After(d)) => d,
                        None => Duration::from_secs(interval * STALE_INTERVALS + timeout),
                    };
                    let seen = *last_result
                        .entry((fp.clone(), check.clone()))
                        .or_insert_with(Instant::now);
                    if seen.elapsed() > ttl {
                        let why = format!(
                            "{STALE}no result for {}s (it runs every {interval}s)",
                            seen.elapsed().as_secs()
                        );
                        due.extend(alerts.observe(
                            fp,
                            check,
                            (Status::Unknown, &why),
                            now_ms,
                            route,
                        ));
                    }
                }
                // A stale check the agent was told to stop running: nothing more will come
                // of it, so its incident ends.
                let dropped: Vec<String> = alerts
                    .alerts
                    .get(fp)
                    .map(|checks| {
                        checks
                            .iter()
                            .filter(|(c, a)| {
                                a.incident.is_some()
                                    && a.status == Status::Unknown
                                    && a.output.starts_with(STALE)
                                    && !w.checks.iter().any(|(n, _, _)| n == *c)
                            })
                            .map(|(c, _)| c.clone())
                            .collect()
                    })
                    .unwrap_or_default();
                for check in dropped {
                    let why = format!("{check} is no longer run on {name}");
                    due.extend(alerts.observe(fp, &check, (Status::Ok, &why), now_ms, route));
                }
            }
            Presence::Deregistered | Presence::Revoked => {
                let why = match w.presence {
                    Presence::Revoked => format!("agent {name} was revoked"),
                    _ => format!("agent {name} stopped on purpose (deregistered)"),
                };
                let open: Vec<String> = alerts
                    .alerts
                    .get(fp)
                    .map(|checks| {
                        checks
                            .iter()
                            .filter(|(_, a)| a.incident.is_some())
                            .map(|(c, _)| c.clone())
                            .collect()
                    })
                    .unwrap_or_default();
                for check in open {
                    due.extend(alerts.observe(fp, &check, (Status::Ok, &why), now_ms, route));
                }
            }
        }
    }
    due
}

/// A lost agent whose gateway is gone (not beating): its own alert is held, its gateway's
/// speaks for it.
#[derive(Debug, Clone)]
struct Orphan {
    gateway: String,
    /// Since when its gateway beats again: its agents get [`RETURN_GRACE`] to reconnect
    /// before they are lost on their own account.
    back_since: Option<Instant>,
}

/// How long the agents lost with a gateway have to reconnect once it is back.
const RETURN_GRACE: Duration = Duration::from_secs(60);

/// The lost agents orphaned now (see [`Orphan`]), given those that were (`before`).
fn orphaned(
    watched: &[crate::registry::Watched],
    registry: &Registry,
    before: &HashMap<String, Orphan>,
) -> HashMap<String, Orphan> {
    let mut alive: HashMap<&str, bool> = HashMap::new();
    let mut out = HashMap::new();
    for w in watched {
        // Lost because its gateway stopped (not lost long ago, under a gateway that has
        // since stopped for its own reasons).
        if w.presence != Presence::Lost
            || w.gateway.is_empty()
            || !w.reason.starts_with(crate::registry::ORPHANED)
        {
            continue;
        }
        let up = *alive
            .entry(w.gateway.as_str())
            .or_insert_with(|| registry.gateway_alive(&w.gateway));
        let orphan = match (before.get(&w.fingerprint), up) {
            (_, false) => Some(Orphan {
                gateway: w.gateway.clone(),
                back_since: None,
            }),
            (Some(o), true) => {
                let back = o.back_since.unwrap_or_else(Instant::now);
                (back.elapsed() < RETURN_GRACE).then(|| Orphan {
                    gateway: o.gateway.clone(),
                    back_since: Some(back),
                })
            }
            (None, true) => None,
        };
        if let Some(o) = orphan {
            out.insert(w.fingerprint.clone(), o);
        }
    }
    out
}

/// One alert per gateway that is gone with agents of the tenant lost with it
/// (`gateway:<id>`, check [`GATEWAY_CHECK`]), resolved once none of them is lost any more
/// (back through another gateway, or the gateway back).
fn gateways_gone(
    alerts: &mut Alerts,
    watched: &[crate::registry::Watched],
    gone: &HashMap<String, String>,
    now_ms: u64,
    route: crate::alerts::Route<'_>,
) -> Vec<Notification> {
    let mut lost_with: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for w in watched {
        if let Some(gw) = gone.get(&w.fingerprint) {
            let name = if w.hostname.is_empty() {
                &w.fingerprint
            } else {
                &w.hostname
            };
            lost_with.entry(gw.as_str()).or_default().push(name);
        }
    }
    let mut due = Vec::new();
    for (gw, mut names) in lost_with.iter().map(|(g, n)| (*g, n.clone())) {
        names.sort_unstable();
        let n = names.len();
        let shown = names
            .iter()
            .take(10)
            .copied()
            .collect::<Vec<_>>()
            .join(", ");
        let more = if n > 10 {
            format!(" and {} more", n - 10)
        } else {
            String::new()
        };
        let why = format!("gateway {gw} is gone: {n} agent(s) lost with it ({shown}{more})");
        due.extend(alerts.observe(
            &format!("{GATEWAY_ENTITY}{gw}"),
            GATEWAY_CHECK,
            (Status::Critical, &why),
            now_ms,
            route,
        ));
    }
    let over: Vec<String> = alerts
        .alerts
        .keys()
        .filter_map(|k| k.strip_prefix(GATEWAY_ENTITY))
        .filter(|gw| !lost_with.contains_key(gw))
        .map(str::to_string)
        .collect();
    for gw in over {
        let why = format!("gateway {gw} is back, or its agents reconnected through another");
        due.extend(alerts.observe(
            &format!("{GATEWAY_ENTITY}{gw}"),
            GATEWAY_CHECK,
            (Status::Ok, &why),
            now_ms,
            route,
        ));
    }
    due
}

/// What the evaluator sees of the agents, for the API's view.
struct Seen<'a> {
    presence: &'a HashMap<String, Presence>,
    by_host: &'a HashMap<String, String>,
}

/// Each agent's checks that are parents of a dependency: status, and since when.
type Down = HashMap<String, HashMap<String, (Status, u64)>>;

/// The parent checks (any agent's) in `alerts`, with their status and since when.
fn down_parents(config: &AlertConfig, alerts: &Alerts) -> Down {
    let mut down = Down::new();
    if config.dependencies.is_empty() {
        return down;
    }
    let parents: HashSet<&str> = config
        .dependencies
        .iter()
        .map(|d| d.on_check.as_str())
        .collect();
    for (fp, checks) in &alerts.alerts {
        for check in &parents {
            if let Some(a) = checks.get(*check) {
                down.entry(fp.clone())
                    .or_default()
                    .insert(check.to_string(), (a.status, a.status_since_ms));
            }
        }
    }
    down
}

/// For check `check` of agent `fp` at `now_ms`: the longest `wait` of the dependencies it
/// is a child of (none: it is no child), and the parent that holds it, if one is down (not
/// OK, or its agent lost) or back for less than the dependency's `wait` (its children come
/// back a little after it).
fn dependency_of(
    config: &AlertConfig,
    down: &Down,
    presence: &HashMap<String, Presence>,
    by_host: &HashMap<String, String>,
    (fp, id, check): (&str, &Identity, &str),
    now_ms: u64,
) -> (Option<Duration>, Option<String>) {
    let mut wait: Option<Duration> = None;
    let mut held = None;
    // An agent's own alert depends on nothing: it is what says the agent is gone.
    if check == AGENT_CHECK {
        return (None, None);
    }
    for d in &config.dependencies {
        if !d.has_child(fp, &id.hostname, &id.labels, &id.groups, check) {
            continue;
        }
        wait = Some(wait.map_or(d.wait, |w| w.max(d.wait)));
        let parent = match &d.on_agent {
            None => fp,
            Some(a) => by_host.get(a).map(String::as_str).unwrap_or(a),
        };
        let state = down.get(parent).and_then(|c| c.get(&d.on_check));
        let name = d.on_agent.as_deref().unwrap_or("its own agent");
        let why = match state {
            // A check of a lost agent is held as such already (and its agent's own alert
            // speaks); a parent on the same agent adds nothing.
            _ if parent == fp && presence.get(parent) == Some(&Presence::Lost) => None,
            _ if presence.get(parent) == Some(&Presence::Lost) => Some(format!(
                "depends on {name}/{}, whose agent is lost",
                d.on_check
            )),
            Some((Status::Ok, since))
                if now_ms.saturating_sub(*since) < d.wait.as_millis() as u64 =>
            {
                Some(format!(
                    "depends on {name}/{}, which is just back",
                    d.on_check
                ))
            }
            Some((Status::Ok, _)) | None => None,
            Some((s, _)) => Some(format!(
                "depends on {name}/{}, which is {}",
                d.on_check,
                crate::alerts::deliver::status_name(*s)
            )),
        };
        if held.is_none() {
            held = why;
        }
    }
    (wait, held)
}

/// Remove a deleted tenant's alert state.
fn remove_state(dir: &Path, tenant: &str) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => tracing::info!(%tenant, "the tenant is deleted: its alert state is removed"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::error!(%tenant, dir = %dir.display(), error = %e, "cannot remove a deleted tenant's alert state")
        }
    }
}

/// One tenant's alerting.
struct Engine {
    tenant: String,
    ctx: Context,
    config: watch::Receiver<Arc<Catalog>>,
    store: Arc<dyn AlertStore>,
}

/// The queue of notifications not yet delivered, shared by the evaluator and the
/// receivers' workers. Its lock also orders every write to the store.
struct Queue {
    inner: Mutex<QueueInner>,
    /// Bumped at every change, to wake the workers.
    changed: watch::Sender<u64>,
    /// For each Alertmanager receiver, the alerts it was told of that still fire (see
    /// `Alerts::firing_told`), kept by the evaluator, sent again by the receiver's worker.
    refresh: std::sync::Mutex<HashMap<String, Vec<Queued>>>,
}

struct QueueInner {
    items: BTreeMap<u64, Queued>,
    next_seq: u64,
    /// (receiver, id) queued since the last snapshot: see `store::Loaded`.
    queued_since: HashSet<(String, String)>,
    /// Journal records since the last snapshot.
    records: usize,
    /// See `Snapshot::watchdog_ms`.
    watchdog_ms: u64,
}

impl Queue {
    fn new(loaded: &Loaded) -> Queue {
        Queue {
            inner: Mutex::new(QueueInner {
                items: loaded
                    .snapshot
                    .queue
                    .iter()
                    .map(|q| (q.seq, q.clone()))
                    .collect(),
                next_seq: loaded.snapshot.next_seq,
                queued_since: loaded.queued_since.clone(),
                records: 0,
                watchdog_ms: loaded.snapshot.watchdog_ms,
            }),
            changed: watch::channel(0).0,
            refresh: std::sync::Mutex::default(),
        }
    }

    fn wake(&self) {
        self.changed.send_modify(|n| *n += 1);
    }
}

impl Engine {
    /// Evaluate the tenant until shutdown; while the tenant is deleted, wait for one of
    /// its name to be made again (which starts from nothing).
    async fn run(self) {
        loop {
            self.evaluate().await;
            while self.ctx.tenants.tenant(&self.tenant).is_none() {
                tokio::select! {
                    _ = self.ctx.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(HOUSEKEEPING) => {}
                }
            }
            if self.ctx.shutdown.is_cancelled() {
                return;
            }
        }
    }

    /// One life of the evaluator: until shutdown, or until the tenant is deleted (its state
    /// is removed then).
    async fn evaluate(&self) {
        // The workers of this life end with it, however it ends.
        let stop = self.ctx.shutdown.child_token();
        // The tenant this life is of: one deleted and made again under the name is another.
        let tenant_id = self.ctx.tenants.tenant(&self.tenant).map(|t| t.id);
        let _workers_end = stop.clone().drop_guard();
        let loaded = loop {
            match self.store.load().await {
                Ok(l) => break l.unwrap_or_default(),
                Err(e) => {
                    crate::metrics::Metrics::inc(&self.ctx.metrics.alert_store_errors);
                    tracing::error!(tenant = %self.tenant, error = %format!("{e:#}"), "cannot load the alert state; retrying");
                    tokio::select! {
                        _ = self.ctx.shutdown.cancelled() => return,
                        _ = tokio::time::sleep(RETRY * 5) => {}
                    }
                }
            }
        };
        let queue = Arc::new(Queue::new(&loaded));
        let mut workers = HashMap::new();
        self.start_workers(&queue, &mut workers, &stop).await;
        let Snapshot {
            mut position,
            mut caught_up,
            mut alerts,
            mut silences,
            ..
        } = loaded.snapshot;
        // Asked by the API: registered for this life.
        let (commands_tx, mut commands) = tokio::sync::mpsc::channel(64);
        self.ctx.hub.register(&self.tenant, commands_tx);
        let _unregister = Unregister(&self.ctx.hub, &self.tenant);
        let mut last_snapshot = Instant::now();
        let mut last_refresh = Instant::now() - ALERTMANAGER_REFRESH;
        let mut dirty = false;
        // Agents' hostnames, labels and groups: looked up once per housekeeping period.
        let mut identities: HashMap<String, Identity> = HashMap::new();
        let mut last_housekeeping = Instant::now();
        // Presence, and when each check's last result was read (for staleness; not kept:
        // after a restart every check has its full TTL again).
        let mut presence: HashMap<String, Presence> = HashMap::new();
        // Lost agents whose gateway is gone, with it (see `orphaned`).
        let mut orphans: HashMap<String, Orphan> = HashMap::new();
        let mut gone: HashMap<String, String> = HashMap::new();
        // Agents by hostname, for dependencies that name their parent's agent so.
        let mut by_host: HashMap<String, String> = HashMap::new();
        let mut last_result: HashMap<(String, String), Instant> = HashMap::new();
        // When each check about an entity was first seen in this life (its stale time
        // counts from then at the earliest).
        let mut entity_first_seen: HashMap<(String, String), u64> = HashMap::new();
        // Whether agents' alerts of checks now about entities were ended (once a life).
        let mut migrated = false;
        // The vantage points' states kept count as seen now (as agents' checks get their
        // full stale time after a start).
        let started_ms = crate::util::now_ms();
        for v in alerts
            .vantage
            .values_mut()
            .flat_map(|c| c.values_mut())
            .flat_map(|v| v.values_mut())
        {
            v.seen_ms = started_ms;
        }
        let mut last_watch = Instant::now() - WATCH;
        // What the event stream was last told of the alerts and silences (`None`: nothing
        // yet in this life: all of it is told once caught up, so a new holder's readers
        // hear of what the last one may have changed without telling).
        let mut told: Option<Told> = None;
        let mut last_told = Instant::now() - TELL_EVERY;
        loop {
            if self.ctx.shutdown.is_cancelled() {
                break;
            }
            if last_housekeeping.elapsed() >= HOUSEKEEPING {
                last_housekeeping = Instant::now();
                if self.ctx.tenants.tenant(&self.tenant).map(|t| t.id) != tenant_id {
                    tracing::info!(tenant = %self.tenant, "the tenant is deleted: its alerting stops");
                    stop.cancel();
                    match self.store.remove().await {
                        Ok(()) => {
                            tracing::info!(tenant = %self.tenant, "the tenant is deleted: its alert state is removed")
                        }
                        Err(e) => {
                            tracing::error!(tenant = %self.tenant, error = %format!("{e:#}"), "cannot remove a deleted tenant's alert state")
                        }
                    }
                    return;
                }
                identities.clear();
                identities.extend(entities::identities(&self.config.borrow()));
                // Agents forgotten (or never known here): their incidents end silently.
                let registry = &self.ctx.registry;
                let before = alerts.alerts.len();
                // (An entity's are ended by `entities::watch` when it is no longer declared.)
                alerts.alerts.retain(|fp, _| {
                    fp.starts_with(GATEWAY_ENTITY)
                        || fp.starts_with(ENTITY_PREFIX)
                        || registry
                            .identity(&AgentRef::new(&self.tenant, fp))
                            .is_some()
                });
                if alerts.alerts.len() != before {
                    dirty = true;
                }
            }
            let catalog = self.config.borrow().clone();
            let config = catalog.alerting.clone();
            let placed = self.ctx.checks.of(&self.tenant).placed();
            let wait = if caught_up { TICK } else { Duration::ZERO };
            // The read waits up to a tick; the API is answered meanwhile, without cutting
            // the wait short (the clock's work below must run every tick).
            let read = {
                let reading = self
                    .ctx
                    .bus
                    .read_results(&self.tenant, position, BATCH, wait);
                tokio::pin!(reading);
                loop {
                    tokio::select! {
                        _ = self.ctx.shutdown.cancelled() => break None,
                        Some(command) = commands.recv() => {
                            let seen = Seen { presence: &presence, by_host: &by_host };
                            let Some(change) = self.command(command, &alerts, &silences, &config, &seen) else {
                                continue;
                            };
                            // What was asked is kept before it is answered, and is in force
                            // only once kept.
                            let saved = self
                                .snapshot(
                                    &queue,
                                    position,
                                    caught_up,
                                    change.alerts.as_ref().unwrap_or(&alerts),
                                    change.silences.as_ref().unwrap_or(&silences),
                                )
                                .await;
                            match saved {
                                Ok(()) => {
                                    alerts = change.alerts.unwrap_or(alerts);
                                    silences = change.silences.unwrap_or(silences);
                                    dirty = false;
                                    last_snapshot = Instant::now();
                                    (change.answer)(Ok(()));
                                }
                                Err(e) => {
                                    crate::metrics::Metrics::inc(&self.ctx.metrics.alert_store_errors);
                                    (change.answer)(Err(format!("cannot save the alert state: {e:#}; nothing was changed, retry")));
                                }
                            }
                        }
                        r = &mut reading => break Some(r),
                    }
                }
            };
            let Some(read) = read else { break };
            let mut read = match read {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(tenant = %self.tenant, error = %e, "alerting cannot read the bus; retrying");
                    tokio::select! {
                        _ = self.ctx.shutdown.cancelled() => break,
                        _ = tokio::time::sleep(RETRY) => {}
                    }
                    continue;
                }
            };
            if read.lost {
                crate::metrics::Metrics::inc(&self.ctx.metrics.alert_results_lost);
                tracing::error!(tenant = %self.tenant, position,
                    "results were deleted by retention before alerting read them; alerts may have missed changes");
            }
            // Caught up: nothing more to read (a read that only stepped over other tenants'
            // lines moves `next` on: not the end yet).
            if !caught_up && read.results.is_empty() && read.next == position {
                caught_up = true;
                dirty = true;
                tracing::info!(tenant = %self.tenant, position, "alerting has read the bus's history; notifying from now on");
            }
            // What the registry says of the agents, every WATCH (before any routing, so
            // the first routes after a start know who is lost and who is who).
            let watched = (last_watch.elapsed() >= WATCH).then(|| {
                last_watch = Instant::now();
                self.ctx.registry.watched(&self.tenant)
            });
            if let Some(watched) = &watched {
                for w in watched {
                    let was = presence.insert(w.fingerprint.clone(), w.presence);
                    // Back (or first seen): its checks get their full TTL from now, not
                    // from their last result before it went away.
                    if w.presence == Presence::Online && was != Some(Presence::Online) {
                        let now = Instant::now();
                        for (check, _, _) in &w.checks {
                            last_result.insert((w.fingerprint.clone(), check.clone()), now);
                        }
                    }
                    identities.insert(
                        w.fingerprint.clone(),
                        Identity {
                            hostname: w.hostname.clone(),
                            labels: w.labels.clone(),
                            groups: w.groups.clone(),
                        },
                    );
                }
                // A hostname names the online agent that has it, or the one seen last.
                let mut best: HashMap<&str, &crate::registry::Watched> = HashMap::new();
                for w in watched.iter().filter(|w| !w.hostname.is_empty()) {
                    let better = best.get(w.hostname.as_str()).is_none_or(|b| {
                        (w.presence == Presence::Online, w.last_seen_ms)
                            > (b.presence == Presence::Online, b.last_seen_ms)
                    });
                    if better {
                        best.insert(&w.hostname, w);
                    }
                }
                by_host = best
                    .into_iter()
                    .map(|(h, w)| (h.to_string(), w.fingerprint.clone()))
                    .collect();
                // Checks an agent no longer runs are not watched.
                let running: HashSet<(&str, &str)> = watched
                    .iter()
                    .flat_map(|w| {
                        w.checks
                            .iter()
                            .map(move |(c, _, _)| (w.fingerprint.as_str(), c.as_str()))
                    })
                    .collect();
                last_result.retain(|(fp, c), _| running.contains(&(fp.as_str(), c.as_str())));
                orphans = orphaned(watched, &self.ctx.registry, &orphans);
                gone = orphans
                    .iter()
                    .map(|(fp, o)| (fp.clone(), o.gateway.clone()))
                    .collect();
            }
            // Every agent a route may be asked about: this batch's, and those with an
            // incident (the clock's notifications).
            let entity_keys: Vec<String> = read
                .results
                .iter()
                .filter_map(|(_, _, r)| r.entity.as_deref().map(entities::key))
                .collect();
            let wanted = read
                .results
                .iter()
                .map(|(_, agent, _)| agent.fingerprint.as_str())
                .chain(entity_keys.iter().map(String::as_str))
                .chain(
                    alerts
                        .alerts
                        .iter()
                        .filter(|(_, checks)| checks.values().any(|a| a.incident.is_some()))
                        .map(|(fp, _)| fp.as_str()),
                );
            for fp in wanted {
                if !identities.contains_key(fp) {
                    identities.insert(fp.to_string(), self.identity(fp));
                }
            }
            let now_ms = crate::util::now_ms();
            // The parents of dependencies that are down now (taken before this batch:
            // a child's wait covers a parent failing in the same batch or soon after).
            let down = down_parents(&config, &alerts);
            let gateway_told = !config
                .policy(
                    GATEWAY_CHECK,
                    &BTreeMap::new(),
                    &[],
                    Status::Critical,
                    now_ms,
                )
                .receivers
                .is_empty();
            let route = |fp: &str, check: &str, status: Status| -> Policy {
                if !caught_up {
                    return Policy::hold();
                }
                let id = identities.get(fp).cloned().unwrap_or_default();
                let mut policy = config.policy(check, &id.labels, &id.groups, status, now_ms);
                // A lost agent's checks say nothing: its own alert does, or its gateway's
                // when that is gone.
                // (An agent back says nothing of having been lost: its incident resolves in
                // this same pass, and must not fire first because the clock ticked.) Held
                // for its gateway only when the gateway's alert goes to someone.
                let lost = match check {
                    AGENT_CHECK => {
                        (gateway_told && gone.contains_key(fp))
                            || presence.get(fp) == Some(&Presence::Online)
                    }
                    _ => presence.get(fp) == Some(&Presence::Lost),
                };
                let (wait, held) = dependency_of(
                    &config,
                    &down,
                    &presence,
                    &by_host,
                    (fp, &id, check),
                    now_ms,
                );
                if let Some(wait) = wait {
                    policy.wait = policy.wait.max(wait);
                }
                policy.muted = lost
                    || held.is_some()
                    || !silences
                        .muting(now_ms, fp, &id.hostname, &id.labels, check)
                        .is_empty();
                policy
            };
            // An agent's clock is not the gateway's: no result is taken as later than now
            // (a clock far ahead would move every `for` and repeat of the tenant).
            for (_, _, result) in &mut read.results {
                result.started_at_ms = result.started_at_ms.min(now_ms);
            }
            let mut due: Vec<Notification> = Vec::new();
            let about = read
                .results
                .iter()
                .any(|(_, _, r)| r.entity.is_some())
                .then(|| entities::Declared::of(&catalog));
            for (at, agent, result) in &read.results {
                if let (Some(_), Some(about)) = (&result.entity, &about) {
                    // About an entity: the entity's alert, not the agent's.
                    let hostname = identities
                        .get(&agent.fingerprint)
                        .map_or("", |i| i.hostname.as_str());
                    due.extend(entities::take(
                        &mut alerts,
                        about,
                        (&agent.fingerprint, hostname),
                        result,
                        *at,
                        now_ms,
                        &route,
                    ));
                    continue;
                }
                due.extend(alerts.apply(&agent.fingerprint, result, &route));
                last_result.insert(
                    (agent.fingerprint.clone(), result.check.clone()),
                    Instant::now(),
                );
            }
            dirty |= !read.results.is_empty() || read.next != position;
            let mut by_the_clock = false;
            let mut watchdog_slot = None;
            if caught_up {
                // Working through a backlog (a full batch), the time is that of the
                // results read, not the wall clock's: an old incident shorter than its
                // `for` must not notify because it is read late.
                let now = match read.results.len() {
                    BATCH => read
                        .results
                        .iter()
                        .map(|(_, _, r)| r.started_at_ms)
                        .max()
                        .unwrap_or_default()
                        .min(now_ms),
                    _ => crate::util::now_ms(),
                };
                let mut ticked = alerts.tick(now, &route);
                if let Some(watched) = &watched {
                    let about_entities: HashSet<&str> = catalog
                        .checks
                        .iter()
                        .filter(|d| d.placement.is_some())
                        .map(|d| d.spec.name.as_str())
                        .collect();
                    ticked.extend(watch(
                        &mut alerts,
                        &config,
                        (watched, &gone, &about_entities),
                        &mut last_result,
                        now_ms,
                        &route,
                    ));
                    if !migrated {
                        migrated = true;
                        ticked.extend(entities::migrate(&mut alerts, &catalog, now_ms, &route));
                    }
                    ticked.extend(entities::watch(
                        &mut alerts,
                        (&catalog, &placed, &config),
                        &mut entity_first_seen,
                        (STALE, STALE_INTERVALS),
                        now_ms,
                        &route,
                    ));
                }
                by_the_clock = !ticked.is_empty();
                due.extend(ticked);
                // Silences: which silenced something firing, which ended with what they
                // silenced, which are in force too long.
                let before = silences.clone();
                let forgotten =
                    self.silence_upkeep(&alerts, &mut silences, &identities, &config, now_ms);
                if !forgotten.is_empty() || silences != before {
                    // Kept at once: a silence that ended with what it silenced must not
                    // come back after a crash.
                    by_the_clock = true;
                    dirty = true;
                    due.extend(forgotten);
                }
                if let Some(ping) = self.watchdog(&config, &queue, now_ms).await {
                    watchdog_slot = Some(ping.since_ms);
                    by_the_clock = true;
                    due.push(ping);
                }
            }
            // Alertmanager's lists of what still fires, made again before a change is
            // queued (so no resolve is followed by a stale "still firing").
            let alertmanagers: Vec<&String> = config
                .receivers
                .values()
                .filter(|r| matches!(r.kind, ReceiverKind::Alertmanager { .. }))
                .map(|r| &r.name)
                .collect();
            if !alertmanagers.is_empty()
                && (last_refresh.elapsed() >= ALERTMANAGER_REFRESH
                    || due
                        .iter()
                        .any(|n| n.receivers.iter().any(|r| alertmanagers.contains(&r))))
            {
                let now = crate::util::now_ms();
                let lists: HashMap<String, Vec<Queued>> = alertmanagers
                    .iter()
                    .map(|name| {
                        let firing = alerts.firing_told(name, now);
                        (name.to_string(), self.queued(&firing, &identities))
                    })
                    .collect();
                *outpost_sys::lock(&queue.refresh) = lists;
                last_refresh = Instant::now();
            }
            if !due.is_empty() {
                dirty = true;
                let queued = self.queued(&due, &identities);
                // Durable before the position moves on: retried until the store takes it.
                while let Err(e) = self.enqueue(&queue, queued.clone()).await {
                    crate::metrics::Metrics::inc(&self.ctx.metrics.alert_store_errors);
                    tracing::error!(tenant = %self.tenant, error = %format!("{e:#}"), "cannot queue notifications; retrying");
                    tokio::select! {
                        _ = self.ctx.shutdown.cancelled() => return,
                        _ = tokio::time::sleep(RETRY) => {}
                    }
                }
            }
            if let Some(since) = watchdog_slot {
                queue.inner.lock().await.watchdog_ms = since;
            }
            // New receivers in the queue: from this batch, or a fallback told of a refusal.
            self.start_workers(&queue, &mut workers, &stop).await;
            position = read.next;
            let records = queue.inner.lock().await.records;
            // What the clock made due cannot be made again the same way by reading the
            // bus again: it is kept in the state at once.
            if dirty
                && (by_the_clock
                    || last_snapshot.elapsed() >= SNAPSHOT_EVERY
                    || records >= SNAPSHOT_RECORDS)
            {
                match self
                    .snapshot(&queue, position, caught_up, &alerts, &silences)
                    .await
                {
                    Ok(()) => {
                        dirty = false;
                        last_snapshot = Instant::now();
                    }
                    Err(e) => {
                        crate::metrics::Metrics::inc(&self.ctx.metrics.alert_store_errors);
                        tracing::error!(tenant = %self.tenant, error = %format!("{e:#}"), "cannot save the alert state; will retry");
                    }
                }
            }
            // Looked at no more often than every TELL_EVERY: a busy tenant's evaluator
            // passes many times a second, and the view is made of every alert.
            if caught_up && last_told.elapsed() >= TELL_EVERY {
                last_told = Instant::now();
                let seen = Seen {
                    presence: &presence,
                    by_host: &by_host,
                };
                let view = self.view(&alerts, &silences, &config, &seen, crate::util::now_ms());
                self.tell_changes(&mut told, view, tenant_id.as_deref())
                    .await;
            }
        }
        if dirty {
            if let Err(e) = self
                .snapshot(&queue, position, caught_up, &alerts, &silences)
                .await
            {
                tracing::warn!(tenant = %self.tenant, error = %format!("{e:#}"), "alert state not saved at shutdown; the bus is read again from the last snapshot");
            }
        }
    }

    /// Publish on the bus, for the event stream, what changed in the alerts and silences
    /// since `told` (everything when `None`); `told` moves on only once it is published.
    async fn tell_changes(&self, told: &mut Option<Told>, view: View, tenant_id: Option<&str>) {
        let now = Told::of(&view);
        let changes = now.changes(told.as_ref(), &view);
        if changes.is_empty() {
            *told = Some(now);
            return;
        }
        // Only while this gateway holds the tenant's alerting (in a fleet), and while the
        // tenant is the one this life is of.
        let same = self.ctx.tenants.tenant(&self.tenant).map(|t| t.id);
        if !self.store.writable() || same.as_deref() != tenant_id {
            return;
        }
        // Not long: the evaluator waits for it (and tells again what did not go).
        let publish = self.ctx.bus.publish_alert_events(&self.tenant, &changes);
        match tokio::time::timeout(PUBLISH_WAIT, publish).await {
            Ok(Ok(())) => *told = Some(now),
            Ok(Err(e)) => {
                tracing::warn!(tenant = %self.tenant, error = %e, "cannot publish alert changes for the event stream; will retry")
            }
            Err(_) => {
                tracing::warn!(tenant = %self.tenant, "publishing alert changes for the event stream took too long; will retry")
            }
        }
    }

    /// The watchdog's ping, when one is due: one per `every`, numbered by its slot (so the
    /// same ping made again after a restart has the same id and is not queued twice).
    async fn watchdog(
        &self,
        config: &AlertConfig,
        queue: &Queue,
        now_ms: u64,
    ) -> Option<Notification> {
        let w = config.watchdog.as_ref()?;
        let every = (w.every.as_millis() as u64).max(1);
        let slot = now_ms / every;
        if slot * every <= queue.inner.lock().await.watchdog_ms {
            return None;
        }
        Some(Notification {
            id: format!("watchdog/{slot}"),
            fingerprint: String::new(),
            check: WATCHDOG_CHECK.to_string(),
            kind: Kind::Watchdog,
            status: Status::Ok,
            since_ms: slot * every,
            at_ms: now_ms,
            output: format!(
                "Outpost alerting of tenant {} works: it says so every {}s",
                self.tenant,
                every / 1000
            ),
            receivers: vec![w.receiver.clone()],
        })
    }

    /// Silences' upkeep (see `Silences::upkeep`); returns the "forgotten silence"
    /// notifications due.
    fn silence_upkeep(
        &self,
        alerts: &Alerts,
        silences: &mut Silences,
        identities: &HashMap<String, Identity>,
        config: &AlertConfig,
        now_ms: u64,
    ) -> Vec<Notification> {
        if silences.list.is_empty() {
            return Vec::new();
        }
        let none = Identity::default();
        let firing: Vec<(&str, &Identity, &str)> = alerts
            .alerts
            .iter()
            .flat_map(|(fp, checks)| {
                let id = identities.get(fp).unwrap_or(&none);
                checks
                    .iter()
                    .filter(|(_, a)| a.incident.is_some())
                    .map(move |(check, _)| (fp.as_str(), id, check.as_str()))
            })
            .collect();
        for (fp, id, check) in &firing {
            let muting = silences.muting(now_ms, fp, &id.hostname, &id.labels, check);
            silences.note_silenced(&muting);
        }
        let forgotten = silences.upkeep(
            now_ms,
            Some(config.silence_max_age.as_millis() as u64),
            |s| {
                firing
                    .iter()
                    .any(|(fp, id, check)| s.matchers.matches(fp, &id.hostname, &id.labels, check))
            },
        );
        forgotten
            .into_iter()
            .map(|s| {
                let policy = config.policy(FORGOTTEN_SILENCE, &BTreeMap::new(), &[], Status::Warning, now_ms);
                if policy.receivers.is_empty() {
                    tracing::warn!(tenant = %self.tenant, silence = %s.id,
                        "a silence may be forgotten, and no route takes {FORGOTTEN_SILENCE}");
                }
                Notification {
                    id: format!("silence/{}/forgotten", s.id),
                    fingerprint: String::new(),
                    check: FORGOTTEN_SILENCE.to_string(),
                    kind: Kind::Firing,
                    status: Status::Warning,
                    since_ms: s.starts_ms,
                    at_ms: now_ms,
                    output: format!(
                        "silence {} by {} ({:?}) has been in force since {}: if it is forgotten, expire it; if it is meant to stay, mark it permanent",
                        s.id,
                        s.creator,
                        s.comment,
                        crate::alerts::deliver::rfc3339(s.starts_ms)
                    ),
                    receivers: policy.receivers,
                }
            })
            .collect()
    }

    /// Do what the API asked. A change is made on copies, returned with how to answer once
    /// they are saved (and swapped in).
    fn command(
        &self,
        command: Command,
        alerts: &Alerts,
        silences: &Silences,
        config: &AlertConfig,
        seen: &Seen<'_>,
    ) -> Option<Change> {
        let now_ms = crate::util::now_ms();
        match command {
            Command::List(reply) => {
                if !reply.is_closed() {
                    let _ = reply.send(self.view(alerts, silences, config, seen, now_ms));
                }
                None
            }
            // The caller gave up (timed out): nothing is done behind its back.
            Command::AddSilence(_, reply) | Command::ExpireSilence(_, reply)
                if reply.is_closed() =>
            {
                None
            }
            Command::Ack { reply, .. } if reply.is_closed() => None,
            Command::AddSilence(silence, reply) => {
                if silences.list.len() >= MAX_SILENCES {
                    let _ = reply.send(Err(format!(
                        "the tenant has {MAX_SILENCES} silences: expire some first"
                    )));
                    return None;
                }
                let mut changed = silences.clone();
                changed.add(silence.clone());
                Some(Change {
                    alerts: None,
                    silences: Some(changed),
                    answer: Box::new(move |saved| {
                        let _ = reply.send(saved.map(|()| silence));
                    }),
                })
            }
            Command::ExpireSilence(id, reply) => {
                let mut changed = silences.clone();
                match changed.expire(&id, now_ms) {
                    Some(s) => Some(Change {
                        alerts: None,
                        silences: Some(changed),
                        answer: Box::new(move |saved| {
                            let _ = reply.send(saved.map(|()| s));
                        }),
                    }),
                    None => {
                        let _ = reply.send(Err(format!("no silence {id}")));
                        None
                    }
                }
            }
            Command::Ack {
                fingerprint,
                check,
                ack,
                reply,
            } => {
                let mut changed = alerts.clone();
                match changed.ack(&fingerprint, &check, ack) {
                    Ok(()) => Some(Change {
                        alerts: Some(changed),
                        silences: None,
                        answer: Box::new(move |saved| {
                            let _ = reply.send(saved);
                        }),
                    }),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        None
                    }
                }
            }
        }
    }

    /// Who alert key `fp` is about: an agent (from the registry), or a proxy entity (its
    /// name as the host, its labels); nobody known, an empty identity.
    fn identity(&self, fp: &str) -> Identity {
        if fp.starts_with(ENTITY_PREFIX) {
            return entities::identities(&self.config.borrow())
                .find(|(k, _)| k == fp)
                .map(|(_, id)| id)
                .unwrap_or_default();
        }
        self.ctx
            .registry
            .identity(&AgentRef::new(&self.tenant, fp))
            .unwrap_or_default()
    }

    /// The tenant's alerts that are not OK, and its silences, as the API shows them.
    fn view(
        &self,
        alerts: &Alerts,
        silences: &Silences,
        config: &AlertConfig,
        seen: &Seen<'_>,
        now_ms: u64,
    ) -> View {
        let down = down_parents(config, alerts);
        let mut out = Vec::new();
        for (fp, checks) in &alerts.alerts {
            let id = self.identity(fp);
            for (check, alert) in checks {
                let Some(incident) = &alert.incident else {
                    continue;
                };
                let silenced_by = silences.muting(now_ms, fp, &id.hostname, &id.labels, check);
                let policy = config.policy(check, &id.labels, &id.groups, alert.status, now_ms);
                let acked = incident.acked.clone().filter(|a| a.holds(now_ms));
                let (_, held) = dependency_of(
                    config,
                    &down,
                    seen.presence,
                    seen.by_host,
                    (fp, &id, check),
                    now_ms,
                );
                let lost =
                    check != AGENT_CHECK && seen.presence.get(fp.as_str()) == Some(&Presence::Lost);
                let (state, why) = if lost {
                    (
                        "held",
                        "its agent is lost: its own alert says so".to_string(),
                    )
                } else if let Some(held) = held {
                    ("held", held)
                } else if !silenced_by.is_empty() {
                    (
                        "silenced",
                        format!("silenced by {}", silenced_by.join(", ")),
                    )
                } else if let (Some(a), Some(_)) = (&acked, incident.notified) {
                    (
                        "acknowledged",
                        format!("acknowledged by {}: {}", a.by, a.comment),
                    )
                } else if let Some((_, at)) = incident.notified {
                    (
                        "firing",
                        format!(
                            "told {} at {}",
                            incident.told.iter().cloned().collect::<Vec<_>>().join(", "),
                            crate::alerts::deliver::rfc3339(at)
                        ),
                    )
                } else if policy.receivers.is_empty() {
                    ("pending", "no route takes it: it tells nobody".to_string())
                } else {
                    (
                        "pending",
                        format!(
                            "for {}s: notifies {} at {}",
                            policy.wait.as_secs(),
                            policy.receivers.join(", "),
                            crate::alerts::deliver::rfc3339(
                                incident
                                    .since_ms
                                    .saturating_add(policy.wait.as_millis() as u64)
                            )
                        ),
                    )
                };
                out.push(AlertView {
                    fingerprint: fp.clone(),
                    hostname: id.hostname.clone(),
                    check: check.clone(),
                    status: crate::alerts::deliver::status_name(alert.status).to_string(),
                    state: state.to_string(),
                    why,
                    since: crate::alerts::deliver::rfc3339(incident.since_ms),
                    output: alert.output.clone(),
                    told: incident.told.iter().cloned().collect(),
                    silenced_by,
                    acknowledged: acked,
                });
            }
        }
        View {
            alerts: out,
            silences: silences.list.clone(),
        }
    }

    /// `due` as queue entries, one per receiver (numbered when queued).
    fn queued(&self, due: &[Notification], identities: &HashMap<String, Identity>) -> Vec<Queued> {
        let config = self.config.borrow().alerting.clone();
        let now_ms = crate::util::now_ms();
        let mut out = Vec::new();
        for n in due {
            let id = identities
                .get(&n.fingerprint)
                .cloned()
                .unwrap_or_else(|| self.identity(&n.fingerprint));
            // A gateway's alert is about the gateway: named by its id.
            let hostname = match (
                n.fingerprint.strip_prefix(GATEWAY_ENTITY),
                n.fingerprint.strip_prefix(ENTITY_PREFIX),
            ) {
                (Some(gateway), _) => gateway.to_string(),
                (_, Some(entity)) => entity.to_string(),
                _ => id.hostname.clone(),
            };
            // Firings and resolves go out with their group when their route groups.
            let group = matches!(n.kind, Kind::Firing | Kind::Resolved)
                .then(|| {
                    config.grouping(
                        &crate::alerts::config::GroupOf {
                            fingerprint: &n.fingerprint,
                            check: &n.check,
                            labels: &id.labels,
                            groups: &id.groups,
                            status: n.status,
                        },
                        now_ms,
                    )
                })
                .flatten();
            for r in &n.receivers {
                out.push(Queued {
                    seq: 0,
                    receiver: r.clone(),
                    notification: n.clone(),
                    hostname: hostname.clone(),
                    labels: id.labels.clone(),
                    group: group.as_ref().map(|(key, _)| key.clone()),
                    group_wait_ms: group.as_ref().map_or(0, |(_, w)| w.as_millis() as u64),
                    queued_ms: now_ms,
                });
            }
        }
        out
    }

    /// Journal and queue `items` (those not queued since the snapshot already).
    async fn enqueue(&self, queue: &Queue, items: Vec<Queued>) -> anyhow::Result<()> {
        let mut inner = queue.inner.lock().await;
        let mut next = inner.next_seq;
        let mut records = Vec::new();
        let mut batch = HashSet::new();
        for mut q in items {
            let key = (q.receiver.clone(), q.notification.id.clone());
            if inner.queued_since.contains(&key) || !batch.insert(key) {
                continue;
            }
            q.seq = next;
            next += 1;
            records.push(Record::Queued(Box::new(q)));
        }
        if records.is_empty() {
            return Ok(());
        }
        self.store.append(&records).await?;
        inner.next_seq = next;
        inner.records += records.len();
        for r in records {
            if let Record::Queued(q) = r {
                inner
                    .queued_since
                    .insert((q.receiver.clone(), q.notification.id.clone()));
                self.ctx
                    .metrics
                    .receiver(&self.tenant, &q.receiver, |s| s.queued += 1);
                inner.items.insert(q.seq, *q);
            }
        }
        drop(inner);
        queue.wake();
        Ok(())
    }

    async fn snapshot(
        &self,
        queue: &Queue,
        position: u64,
        caught_up: bool,
        alerts: &Alerts,
        silences: &Silences,
    ) -> anyhow::Result<()> {
        let mut inner = queue.inner.lock().await;
        let snapshot = Snapshot {
            position,
            caught_up,
            alerts: alerts.clone(),
            silences: silences.clone(),
            next_seq: inner.next_seq,
            watchdog_ms: inner.watchdog_ms,
            queue: inner.items.values().cloned().collect(),
        };
        self.store.snapshot(snapshot).await?;
        inner.queued_since.clear();
        inner.records = 0;
        Ok(())
    }

    /// A worker for every receiver (configured, or with something queued) that has none
    /// (or whose worker died: it is started again).
    async fn start_workers(
        &self,
        queue: &Arc<Queue>,
        workers: &mut HashMap<String, tokio::task::JoinHandle<()>>,
        stop: &CancellationToken,
    ) {
        let wanted: Vec<(String, u64)> = {
            let inner = queue.inner.lock().await;
            // Every configured receiver has one (an Alertmanager's sends what still fires
            // again even with nothing queued), and any left in the queue from before.
            let mut names: BTreeMap<String, u64> = self
                .config
                .borrow()
                .alerting
                .receivers
                .keys()
                .map(|r| (r.clone(), 0))
                .collect();
            for q in inner.items.values() {
                *names.entry(q.receiver.clone()).or_default() += 1;
            }
            names.into_iter().collect()
        };
        for (name, queued) in wanted {
            match workers.get(&name) {
                Some(w) if !w.is_finished() => continue,
                Some(_) => {
                    tracing::error!(tenant = %self.tenant, receiver = %name, "a delivery worker died; starting it again")
                }
                None => {}
            }
            self.ctx
                .metrics
                .receiver(&self.tenant, &name, |s| s.queued = queued);
            let worker = Worker {
                tenant: self.tenant.clone(),
                receiver: name.clone(),
                ctx: self.ctx.clone(),
                config: self.config.clone(),
                store: self.store.clone(),
                queue: queue.clone(),
                stop: stop.clone(),
            };
            workers.insert(name, self.ctx.tracker.spawn(worker.run()));
        }
    }
}

/// Delivers one receiver's notifications, oldest first, one at a time: the next waits
/// until this one is delivered or refused, so a receiver sees them in order.
struct Worker {
    tenant: String,
    receiver: String,
    ctx: Context,
    config: watch::Receiver<Arc<Catalog>>,
    store: Arc<dyn AlertStore>,
    queue: Arc<Queue>,
    /// The end of the evaluator's life this worker belongs to.
    stop: CancellationToken,
}

impl Worker {
    async fn run(self) {
        let mut changed = self.queue.changed.subscribe();
        // The worker's own view of the configuration: seen when looked at, so waiting for
        // a change waits for a new one.
        let mut config_rx = self.config.clone();
        let mut attempt = 0u32;
        let mut current: Option<u64> = None;
        // The head item is not tried again before this (backoff, Retry-After).
        let mut not_before = Instant::now();
        let mut last_refresh = Instant::now();
        let mut missing_since: Option<Instant> = None;
        // Notifications of a group the receiver refused: sent alone from then on.
        let mut ungrouped: HashSet<u64> = HashSet::new();
        loop {
            // Seen before looking, so a wake between the look and the wait is not lost.
            changed.borrow_and_update();
            let config: Arc<AlertConfig> = config_rx.borrow_and_update().alerting.clone();
            let receiver = config.receivers.get(&self.receiver);
            let alertmanager =
                receiver.filter(|r| matches!(r.kind, ReceiverKind::Alertmanager { .. }));
            // Alertmanager is sent what still fires on time, whatever waits in the queue
            // (its list is made before a resolve is queued: never a stale "firing").
            if let Some(am) = alertmanager {
                if last_refresh.elapsed() >= ALERTMANAGER_REFRESH {
                    last_refresh = Instant::now();
                    self.refresh(am).await;
                    continue;
                }
            }
            let refresh_in = match alertmanager {
                Some(_) => ALERTMANAGER_REFRESH.saturating_sub(last_refresh.elapsed()),
                None => Duration::MAX,
            };
            let (next, superseded) = {
                let inner = self.queue.inner.lock().await;
                let mut mine = inner.items.values().filter(|q| q.receiver == self.receiver);
                let next = mine.next().cloned();
                // A watchdog's ping is only worth its freshest: one that waited behind a
                // receiver outage is dropped when a newer one waits too.
                let superseded = next.as_ref().is_some_and(|n| {
                    n.notification.kind == Kind::Watchdog
                        && mine.any(|q| q.notification.kind == Kind::Watchdog)
                });
                (next, superseded)
            };
            if let (Some(item), true) = (&next, superseded) {
                tracing::debug!(tenant = %self.tenant, receiver = %self.receiver, id = %item.notification.id, "a newer watchdog ping waits: this one is dropped");
                self.finish(std::slice::from_ref(item), Vec::new()).await;
                continue;
            }
            let Some(item) = next else {
                tokio::select! {
                    _ = self.stop.cancelled() => return,
                    r = changed.changed() => if r.is_err() { return },
                    _ = tokio::time::sleep(refresh_in), if alertmanager.is_some() => {}
                }
                continue;
            };
            if current != Some(item.seq) {
                current = Some(item.seq);
                attempt = 0;
                not_before = Instant::now();
            }
            let wait = not_before.saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                tokio::select! {
                    _ = self.stop.cancelled() => return,
                    _ = tokio::time::sleep(wait.min(refresh_in)) => {}
                }
                continue;
            }
            if receiver.is_none() {
                let since = *missing_since.get_or_insert_with(|| {
                    tracing::warn!(tenant = %self.tenant, receiver = %self.receiver, grace_s = MISSING_RECEIVER_GRACE.as_secs(),
                        "notifications wait for a receiver that is not configured; refused to the fallback after the grace");
                    Instant::now()
                });
                let left = MISSING_RECEIVER_GRACE.saturating_sub(since.elapsed());
                if !left.is_zero() {
                    tokio::select! {
                        _ = self.stop.cancelled() => return,
                        r = config_rx.changed() => if r.is_err() { return },
                        _ = tokio::time::sleep(left) => {}
                    }
                    continue;
                }
            } else {
                missing_since = None;
            }
            // In a fleet: only while this gateway surely still holds the lease (a holder
            // paused past it sends nothing when it runs again).
            if !self.store.writable() {
                tracing::warn!(tenant = %self.tenant, receiver = %self.receiver, "this gateway no longer holds the tenant's alerting lease: its worker stops");
                return;
            }
            // A group waits for its wait from its first notification, then goes out with
            // everything of it queued by then (PagerDuty groups by itself: one by one).
            // (Those before the head are out of the queue.)
            ungrouped.retain(|seq| *seq >= item.seq);
            let grouped = item.group.is_some()
                && !ungrouped.contains(&item.seq)
                && receiver.is_some_and(|r| !matches!(r.kind, ReceiverKind::PagerDuty { .. }));
            if grouped {
                let due = item.queued_ms.saturating_add(item.group_wait_ms);
                let now = crate::util::now_ms();
                if now < due {
                    let wait = Duration::from_millis(due - now).min(refresh_in);
                    tokio::select! {
                        _ = self.stop.cancelled() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    continue;
                }
            }
            let members: Vec<Queued> = if grouped {
                // Never ahead of an earlier notification of the same alert that is not in
                // the group (a firing of another status, an ungrouped one): each alert's
                // changes stay in order.
                let inner = self.queue.inner.lock().await;
                let mut blocked: HashSet<(&str, &str)> = HashSet::new();
                let mut members = Vec::new();
                for q in inner.items.values().filter(|q| q.receiver == self.receiver) {
                    let alert = (
                        q.notification.fingerprint.as_str(),
                        q.notification.check.as_str(),
                    );
                    if q.group == item.group && !blocked.contains(&alert) {
                        members.push(q.clone());
                        if members.len() == MAX_GROUP {
                            break;
                        }
                    } else {
                        blocked.insert(alert);
                    }
                }
                members
            } else {
                vec![item.clone()]
            };
            attempt += 1;
            let outcome = match receiver {
                Some(receiver) if grouped => {
                    tokio::select! {
                        _ = self.stop.cancelled() => return,
                        o = self.ctx.sender.send_group(&self.tenant, receiver, &members, attempt) => o,
                    }
                }
                Some(receiver) => {
                    tokio::select! {
                        _ = self.stop.cancelled() => return,
                        o = self.ctx.sender.send(&self.tenant, receiver, &item, attempt) => o,
                    }
                }
                None => Outcome::Refused {
                    why: format!("receiver {:?} is no longer configured", self.receiver),
                },
            };
            match outcome {
                Outcome::Delivered => {
                    tracing::info!(tenant = %self.tenant, receiver = %self.receiver, id = %item.notification.id, notifications = members.len(), attempt, "notification delivered");
                    self.ctx
                        .metrics
                        .receiver(&self.tenant, &self.receiver, |s| {
                            s.delivered += members.len() as u64
                        });
                    self.finish(&members, Vec::new()).await;
                }
                Outcome::Retry { after, why } => {
                    tracing::warn!(tenant = %self.tenant, receiver = %self.receiver, id = %item.notification.id, attempt,
                        retry_in_s = after.as_secs_f64(), %why, "notification not delivered; will retry");
                    self.ctx
                        .metrics
                        .receiver(&self.tenant, &self.receiver, |s| s.failed_attempts += 1);
                    not_before = Instant::now() + after;
                }
                // A group refused (too big for the receiver, one member it will not take):
                // its members are tried one by one, and only those refused alone are lost.
                Outcome::Refused { why } if members.len() > 1 => {
                    tracing::warn!(tenant = %self.tenant, receiver = %self.receiver, notifications = members.len(), attempt,
                        %why, "a group was refused; its notifications are sent one by one");
                    ungrouped.extend(members.iter().map(|m| m.seq));
                }
                Outcome::Refused { why } => {
                    tracing::error!(tenant = %self.tenant, receiver = %self.receiver, id = %item.notification.id, attempt,
                        %why, "notification refused for good");
                    self.ctx
                        .metrics
                        .receiver(&self.tenant, &self.receiver, |s| {
                            s.refused += members.len() as u64
                        });
                    let told = members
                        .iter()
                        .filter_map(|m| undeliverable(&config, m, &why))
                        .collect();
                    self.finish(&members, told).await;
                }
            }
        }
    }

    /// Send Alertmanager the alerts still firing that it was told of.
    async fn refresh(&self, receiver: &crate::alerts::config::Receiver) {
        let firing = outpost_sys::lock(&self.queue.refresh)
            .get(&self.receiver)
            .cloned()
            .unwrap_or_default();
        if firing.is_empty() {
            return;
        }
        let sent = tokio::select! {
            _ = self.stop.cancelled() => return,
            r = self.ctx.sender.refresh_alertmanager(&self.tenant, receiver, &firing) => r,
        };
        match sent {
            Ok(()) => {
                tracing::debug!(tenant = %self.tenant, receiver = %self.receiver, alerts = firing.len(), "firing alerts sent to Alertmanager again")
            }
            Err(why) => {
                self.ctx
                    .metrics
                    .receiver(&self.tenant, &self.receiver, |s| s.failed_attempts += 1);
                tracing::warn!(tenant = %self.tenant, receiver = %self.receiver, %why,
                    "cannot send Alertmanager the firing alerts again; will retry");
            }
        }
    }

    /// Take `items` out of the queue (durably), queueing `then` in the same write.
    async fn finish(&self, items: &[Queued], then: Vec<Queued>) {
        loop {
            let mut inner = self.queue.inner.lock().await;
            let mut records: Vec<Record> =
                items.iter().map(|i| Record::Done { seq: i.seq }).collect();
            let mut next = inner.next_seq;
            for mut q in then.iter().cloned() {
                q.seq = next;
                next += 1;
                records.push(Record::Queued(Box::new(q)));
            }
            match self.store.append(&records).await {
                Ok(()) => {
                    for i in items {
                        inner.items.remove(&i.seq);
                    }
                    inner.next_seq = next;
                    inner.records += records.len();
                    self.ctx
                        .metrics
                        .receiver(&self.tenant, &self.receiver, |s| {
                            s.queued = s.queued.saturating_sub(items.len() as u64)
                        });
                    let mut new_receivers = false;
                    for r in records.into_iter().skip(items.len()) {
                        if let Record::Queued(q) = r {
                            self.ctx
                                .metrics
                                .receiver(&self.tenant, &q.receiver, |s| s.queued += 1);
                            new_receivers = true;
                            inner.items.insert(q.seq, *q);
                        }
                    }
                    drop(inner);
                    if new_receivers {
                        // The fallback's worker may not exist yet: the evaluator starts
                        // one when it next looks (within a tick).
                        self.queue.wake();
                    }
                    return;
                }
                Err(e) => {
                    drop(inner);
                    crate::metrics::Metrics::inc(&self.ctx.metrics.alert_store_errors);
                    tracing::error!(tenant = %self.tenant, error = %format!("{e:#}"), "cannot record a delivery; retrying");
                    tokio::select! {
                        _ = self.stop.cancelled() => return,
                        _ = tokio::time::sleep(RETRY) => {}
                    }
                }
            }
        }
    }
}

/// The notice to the fallback receiver that `item` was refused for good, if there is a
/// fallback and `item` is not itself such a notice (or for the fallback).
fn undeliverable(config: &AlertConfig, item: &Queued, why: &str) -> Option<Queued> {
    let fallback = config.fallback.as_ref()?;
    if item.notification.kind == Kind::Undeliverable || *fallback == item.receiver {
        return None;
    }
    let n = &item.notification;
    Some(Queued {
        seq: 0,
        receiver: fallback.clone(),
        notification: Notification {
            id: format!("{}/undeliverable/{}", n.id, item.receiver),
            kind: Kind::Undeliverable,
            output: format!(
                "receiver {:?} refused notification {} ({:?} {}): {why}",
                item.receiver,
                n.id,
                n.kind,
                crate::alerts::deliver::status_name(n.status)
            ),
            receivers: vec![fallback.clone()],
            ..n.clone()
        },
        hostname: item.hostname.clone(),
        labels: item.labels.clone(),
        group: None,
        group_wait_ms: 0,
        queued_ms: crate::util::now_ms(),
    })
}

/// The most notifications one group's request carries (the rest go in the next).
const MAX_GROUP: usize = 200;

/// The check name of an agent's own alert: critical while the agent is lost.
pub const AGENT_CHECK: &str = "outpost.agent";

/// The check an agent reports how it found its gateway with (docs/PROTOCOL.md): not OK
/// when DNS is broken on its host.
pub const DNS_CHECK: &str = "outpost.dns";

/// The check name of a gateway's alert (fleet): critical while it is gone with agents
/// lost with it.
pub const GATEWAY_CHECK: &str = "outpost.gateway";

/// What stands for the agent in a gateway's alert: `gateway:<gateway id>`.
pub const GATEWAY_ENTITY: &str = "gateway:";
pub use entities::ENTITY_PREFIX;

/// How often presence and stale checks are looked at.
const WATCH: Duration = Duration::from_secs(2);

/// A check is stale when no result came for this many intervals (plus its timeout).
const STALE_INTERVALS: u64 = 3;

/// How a stale check's output begins.
const STALE: &str = "stale: ";

/// The check name of the "forgotten silence" meta-alert (route it with
/// `checks = ["outpost.*"]`).
pub const FORGOTTEN_SILENCE: &str = "outpost.silence";

/// The check name the watchdog's pings carry.
pub const WATCHDOG_CHECK: &str = "outpost.watchdog";

/// How a change the API asked for is answered, once it is saved (or could not be).
type Answer = Box<dyn FnOnce(Result<(), String>) + Send>;

/// A change the API asked for: the state with it made, in force once saved.
struct Change {
    alerts: Option<Alerts>,
    silences: Option<Silences>,
    answer: Answer,
}

/// The most silences a tenant may have (in force, or ended within a day).
pub const MAX_SILENCES: usize = 1000;

/// What the API asks an evaluator.
pub enum Command {
    List(oneshot::Sender<View>),
    AddSilence(Silence, oneshot::Sender<Result<Silence, String>>),
    ExpireSilence(String, oneshot::Sender<Result<Silence, String>>),
    Ack {
        fingerprint: String,
        check: String,
        ack: Ack,
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// A tenant's alerts and silences, as the API lists them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct View {
    pub alerts: Vec<AlertView>,
    pub silences: Vec<Silence>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AlertView {
    pub fingerprint: String,
    pub hostname: String,
    pub check: String,
    pub status: String,
    /// `firing` (told), `pending` (waiting for its `for`, or no route), `silenced`,
    /// `held` (by a parent that is down, or its agent lost), `acknowledged`.
    pub state: String,
    pub why: String,
    pub since: String,
    pub output: String,
    pub told: Vec<String>,
    pub silenced_by: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acknowledged: Option<Ack>,
}

/// The alerts and silences as the event stream was told of them: what identifies each,
/// and what of it a change is (the API's view without the latest output, which every
/// result changes and the results in the stream carry).
#[derive(Default)]
struct Told {
    alerts: HashMap<(String, String), String>,
    silences: HashMap<String, String>,
}

impl Told {
    fn of(view: &View) -> Told {
        Told {
            alerts: view
                .alerts
                .iter()
                .map(|a| {
                    let mut v = serde_json::to_value(a).unwrap_or_default();
                    v["output"] = serde_json::Value::Null;
                    ((a.fingerprint.clone(), a.check.clone()), v.to_string())
                })
                .collect(),
            silences: view
                .silences
                .iter()
                .map(|s| {
                    let v = serde_json::to_value(s).unwrap_or_default();
                    (s.id.clone(), v.to_string())
                })
                .collect(),
        }
    }

    /// The events that take `before` to `self` (`view` is what `self` was made of): each
    /// alert or silence new or changed, in full; each gone, as `ok` or `gone`.
    fn changes(&self, before: Option<&Told>, view: &View) -> Vec<serde_json::Value> {
        let empty = Told::default();
        // Nothing told yet in this life: the whole set, between `sync` marks (a reader
        // replaces what it holds with it: what a predecessor told and ended since is gone).
        let sync = before.is_none();
        let before = before.unwrap_or(&empty);
        let mut out = Vec::new();
        if sync {
            out.push(serde_json::json!({ "type": "sync", "state": "begin" }));
        }
        for a in &view.alerts {
            let key = (a.fingerprint.clone(), a.check.clone());
            if before.alerts.get(&key) != self.alerts.get(&key) {
                let mut v = serde_json::to_value(a).unwrap_or_default();
                v["type"] = "alert".into();
                out.push(v);
            }
        }
        for (fingerprint, check) in before
            .alerts
            .keys()
            .filter(|k| !self.alerts.contains_key(*k))
        {
            out.push(serde_json::json!({
                "type": "alert",
                "fingerprint": fingerprint,
                "check": check,
                "state": "ok",
            }));
        }
        for sil in &view.silences {
            if before.silences.get(&sil.id) != self.silences.get(&sil.id) {
                let mut v = serde_json::to_value(sil).unwrap_or_default();
                v["type"] = "silence".into();
                out.push(v);
            }
        }
        for id in before
            .silences
            .keys()
            .filter(|k| !self.silences.contains_key(*k))
        {
            out.push(serde_json::json!({ "type": "silence", "id": id, "state": "gone" }));
        }
        if sync {
            out.push(serde_json::json!({ "type": "sync", "state": "end" }));
        }
        out
    }
}

/// How often the evaluator looks for alert and silence changes to tell the event stream,
/// and how long it waits for them to be published.
const TELL_EVERY: Duration = Duration::from_millis(250);
const PUBLISH_WAIT: Duration = Duration::from_secs(2);

/// The running evaluators, for the API. In a NATS fleet a tenant's evaluator may run on
/// another gateway: what is asked is forwarded there.
#[derive(Default)]
pub struct Hub {
    engines: std::sync::Mutex<HashMap<String, mpsc::Sender<Command>>>,
    fleet: std::sync::OnceLock<Arc<crate::nats::Nats>>,
}

/// Why the API could not ask.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error("alerting is not running for this tenant: declare receivers and routes in its check files (docs/ALERTING.md)")]
    NotRunning,
    #[error("no gateway of the fleet runs this tenant's alerting right now: it has no receivers and routes (docs/ALERTING.md), or a gateway is taking it over; retry in a few seconds")]
    NoHolder,
    #[error("alerting is busy or restarting; retry")]
    Busy,
}

impl Hub {
    fn register(&self, tenant: &str, tx: mpsc::Sender<Command>) {
        outpost_sys::lock(&self.engines).insert(tenant.to_string(), tx);
    }

    /// Forward what is asked of a tenant whose evaluator is not here over `nats`.
    pub fn forward_over(&self, nats: Arc<crate::nats::Nats>) {
        let _ = self.fleet.set(nats);
    }

    /// Ask `tenant`'s evaluator, here or (in a fleet) on the gateway holding its lease:
    /// `make` builds the command around the answer's sender.
    pub async fn ask<T>(
        &self,
        tenant: &str,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, AskError> {
        let local = outpost_sys::lock(&self.engines).get(tenant).cloned();
        let (reply, answer) = oneshot::channel();
        let command = make(reply);
        match (local, self.fleet.get()) {
            // A full queue of requests is an evaluator that is stuck (its store failing):
            // the caller hears so at once.
            (Some(tx), _) => tx.try_send(command).map_err(|_| AskError::Busy)?,
            (None, Some(nats)) => {
                let (request, finish) = command.remote();
                match crate::nats::alerts::forward(nats, tenant, &request).await {
                    crate::nats::alerts::Answer::NotRunning => return Err(AskError::NoHolder),
                    crate::nats::alerts::Answer::Busy => return Err(AskError::Busy),
                    a => finish(a).map_err(|_| AskError::Busy)?,
                }
            }
            (None, None) => return Err(AskError::NotRunning),
        }
        tokio::time::timeout(Duration::from_secs(30), answer)
            .await
            .map_err(|_| AskError::Busy)?
            .map_err(|_| AskError::Busy)
    }

    /// Answer a request forwarded from another gateway with the evaluator here.
    pub async fn answer_locally(
        &self,
        tenant: &str,
        request: crate::nats::alerts::Request,
    ) -> crate::nats::alerts::Answer {
        use crate::nats::alerts::{Answer, Request};
        if !self.running(tenant) {
            return Answer::Busy;
        }
        fn to<T: Serialize>(r: Result<Result<T, String>, AskError>) -> Answer {
            match r {
                Ok(Ok(v)) => Answer::Ok(serde_json::to_value(v).unwrap_or_default()),
                Ok(Err(why)) => Answer::Refused(why),
                Err(_) => Answer::Busy,
            }
        }
        match request {
            Request::List => to(self.ask(tenant, Command::List).await.map(Ok)),
            Request::AddSilence { silence } => {
                to(self.ask(tenant, |r| Command::AddSilence(silence, r)).await)
            }
            Request::ExpireSilence { id } => {
                to(self.ask(tenant, |r| Command::ExpireSilence(id, r)).await)
            }
            Request::Ack {
                fingerprint,
                check,
                ack,
            } => to(self
                .ask(tenant, |reply| Command::Ack {
                    fingerprint,
                    check,
                    ack,
                    reply,
                })
                .await),
        }
    }

    /// Whether `tenant` has alerting running here.
    pub fn running(&self, tenant: &str) -> bool {
        outpost_sys::lock(&self.engines).contains_key(tenant)
    }
}

#[async_trait::async_trait]
impl crate::nats::alerts::Local for Hub {
    async fn answer(
        &self,
        tenant: &str,
        request: crate::nats::alerts::Request,
    ) -> crate::nats::alerts::Answer {
        self.answer_locally(tenant, request).await
    }
}

/// Finishes a forwarded command with the holder's answer (`Err`: it did not read).
type Finish = Box<dyn FnOnce(crate::nats::alerts::Answer) -> Result<(), ()> + Send>;

impl Command {
    /// The request to forward, and how to answer this command's caller with its answer.
    fn remote(self) -> (crate::nats::alerts::Request, Finish) {
        use crate::nats::alerts::{Answer, Request};
        fn answer<T: serde::de::DeserializeOwned + Send + 'static>(
            reply: oneshot::Sender<Result<T, String>>,
        ) -> Finish {
            Box::new(move |a| {
                let r = match a {
                    Answer::Ok(v) => Ok(serde_json::from_value(v).map_err(|_| ())?),
                    Answer::Refused(why) => Err(why),
                    _ => return Err(()),
                };
                let _ = reply.send(r);
                Ok(())
            })
        }
        match self {
            Command::List(reply) => (
                Request::List,
                Box::new(move |a| match a {
                    Answer::Ok(v) => {
                        let _ = reply.send(serde_json::from_value(v).map_err(|_| ())?);
                        Ok(())
                    }
                    _ => Err(()),
                }),
            ),
            Command::AddSilence(silence, reply) => (Request::AddSilence { silence }, answer(reply)),
            Command::ExpireSilence(id, reply) => (Request::ExpireSilence { id }, answer(reply)),
            Command::Ack {
                fingerprint,
                check,
                ack,
                reply,
            } => (
                Request::Ack {
                    fingerprint,
                    check,
                    ack,
                },
                answer(reply),
            ),
        }
    }
}

/// Takes an evaluator off the hub when its life ends.
struct Unregister<'a>(&'a Hub, &'a str);

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        outpost_sys::lock(&self.0.engines).remove(self.1);
    }
}

/// `DATA_DIR/alerts`.
pub fn alerts_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("alerts")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::Policy;
    use crate::registry::Watched;

    fn lost(fp: &str, host: &str, gateway: &str) -> Watched {
        Watched {
            fingerprint: fp.into(),
            hostname: host.into(),
            labels: BTreeMap::new(),
            groups: Vec::new(),
            last_seen_ms: 0,
            presence: Presence::Lost,
            reason: "its gateway stopped".into(),
            checks: Vec::new(),
            gateway: gateway.into(),
        }
    }

    #[test]
    fn a_gateway_gone_with_agents_is_one_alert_and_its_agents_are_held() {
        let watched = vec![
            lost("a", "web-1", "gw1"),
            lost("b", "web-2", "gw1"),
            lost("c", "db-1", "gw2"),
        ];
        // gw1 is gone; gw2 is alive (its agent c is lost on its own).
        let gone: HashMap<String, String> = [("a", "gw1"), ("b", "gw1")]
            .into_iter()
            .map(|(f, g)| (f.to_string(), g.to_string()))
            .collect();
        let route = |fp: &str, check: &str, _: Status| Policy {
            muted: check == AGENT_CHECK && gone.contains_key(fp),
            ..Policy::to(&["hook"])
        };
        let mut alerts = Alerts::default();
        let mut last = HashMap::new();
        let due = watch(
            &mut alerts,
            &AlertConfig::default(),
            (&watched, &gone, &HashSet::new()),
            &mut last,
            1_000,
            &route,
        );
        let told: Vec<(&str, &str)> = due
            .iter()
            .map(|n| (n.fingerprint.as_str(), n.check.as_str()))
            .collect();
        assert_eq!(
            told,
            [("gateway:gw1", GATEWAY_CHECK), ("c", AGENT_CHECK)],
            "{due:?}"
        );
        assert!(
            due[0]
                .output
                .contains("gw1 is gone: 2 agent(s) lost with it (web-1, web-2)"),
            "{}",
            due[0].output
        );
        // The same again: nothing new.
        assert!(watch(
            &mut alerts,
            &AlertConfig::default(),
            (&watched, &gone, &HashSet::new()),
            &mut last,
            2_000,
            &route
        )
        .is_empty());
        // Its agents back through another gateway: the gateway's alert resolves (on the
        // gateway's own word, at once).
        let back: Vec<Watched> = watched[2..].to_vec();
        let none = HashMap::new();
        let due = watch(
            &mut alerts,
            &AlertConfig::default(),
            (&back, &none, &HashSet::new()),
            &mut last,
            3_000,
            &route,
        );
        assert_eq!(due.len(), 1, "{due:?}");
        assert_eq!(due[0].fingerprint, "gateway:gw1");
        assert_eq!(due[0].kind, Kind::Resolved);
    }

    #[test]
    fn a_stale_check_no_longer_run_resolves() {
        let mut w = lost("a", "web-1", "gw1");
        w.presence = Presence::Online;
        w.checks = vec![("disk".into(), 1, 1)];
        let route = |_: &str, _: &str, _: Status| Policy::to(&["hook"]);
        let mut alerts = Alerts::default();
        // Its last result long ago: stale.
        let mut last = HashMap::from([(
            ("a".to_string(), "disk".to_string()),
            Instant::now() - Duration::from_secs(10),
        )]);
        let none = HashMap::new();
        let ws = vec![w.clone()];
        let due = watch(
            &mut alerts,
            &AlertConfig::default(),
            (&ws, &none, &HashSet::new()),
            &mut last,
            1_000,
            &route,
        );
        assert_eq!(due.len(), 1, "{due:?}");
        assert!(due[0].output.starts_with(STALE), "{due:?}");
        // The check taken off the agent: the incident ends (its resolve goes out).
        w.checks.clear();
        let ws = vec![w];
        let due = watch(
            &mut alerts,
            &AlertConfig::default(),
            (&ws, &none, &HashSet::new()),
            &mut last,
            2_000,
            &route,
        );
        assert_eq!(due.len(), 1, "{due:?}");
        assert_eq!(
            (due[0].check.as_str(), due[0].kind),
            ("disk", Kind::Resolved)
        );
        assert!(watch(
            &mut alerts,
            &AlertConfig::default(),
            (&ws, &none, &HashSet::new()),
            &mut last,
            3_000,
            &route
        )
        .is_empty());
    }

    #[test]
    fn a_tuning_sets_when_a_check_turns_stale_or_that_it_never_does() {
        let mut w = lost("a", "web-1", "gw1");
        w.presence = Presence::Online;
        w.checks = vec![("disk".into(), 60, 10), ("backup".into(), 1, 1)];
        let route = |_: &str, _: &str, _: Status| Policy::to(&["hook"]);
        let (config, problems) = AlertConfig::assemble([(
            std::path::Path::new("t.toml"),
            &crate::alerts::config::parse_file(
                "[[tuning]]\nchecks = [\"disk\"]\nstale_after = \"1s\"\n[[tuning]]\nchecks = [\"backup\"]\nstale_after = \"never\"\n",
            )
            .unwrap(),
        )]);
        assert!(problems.is_empty(), "{problems:?}");
        // Both silent for 5 s: by their intervals neither is stale yet (disk: 190 s) and
        // backup would be (4 s); tuned, disk is and backup never is.
        let ago = Instant::now() - Duration::from_secs(5);
        let mut last = HashMap::from([
            (("a".to_string(), "disk".to_string()), ago),
            (("a".to_string(), "backup".to_string()), ago),
        ]);
        let none = HashMap::new();
        let due = watch(
            &mut Alerts::default(),
            &config,
            (&[w], &none, &HashSet::new()),
            &mut last,
            1_000,
            &route,
        );
        let checks: Vec<&str> = due.iter().map(|n| n.check.as_str()).collect();
        assert_eq!(checks, ["disk"], "{due:?}");
    }
}
