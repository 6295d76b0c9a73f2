//! The bus on NATS JetStream, for a fleet of gateways.
//!
//! Each result is one message on `outpost.<tenant>.results.<fingerprint>.<check>` (see
//! [`super::check_subject`]: a subject per check, so a check's history reads only its own
//! messages) in the tenant's
//! results stream (`OUTPOST_RESULTS_<tenant>`, or `OUTPOST_RESULTS` for the tenant it was
//! narrowed to: see [`super::RESULTS_STREAM`]), made by the first gateway that needs it and
//! bounded to the tenant's byte limit (JetStream drops the tenant's oldest results beyond
//! it, never another tenant's), with the same JSON body as a line of the embedded bus
//! (`{"tenant","fingerprint","result"}`) and `Nats-Msg-Id` = `<tenant>.<fingerprint>:<seq>`. A batch
//! is published pipelined (every message sent, then every ack awaited), and
//! `publish_results` returns only when JetStream has acked all of them: only then does the
//! session ack the agent.
//!
//! Duplicates are dropped twice over: JetStream drops a `Nats-Msg-Id` it has seen within
//! its duplicate window (a resend racing between two gateways), and this gateway drops
//! sequence numbers at or below the agent's highest stored one (read from the stream's last
//! message for the agent's subject, then kept in memory), which holds beyond the window.

use outpost_sys::lock;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::DirectGetErrorKind;
use async_nats::jetstream::stream::{self, LastRawMessageErrorKind};
use async_nats::HeaderMap;
use async_trait::async_trait;
use outpost_protocol::CheckResult;
use serde::Serialize;

use super::follow::Follower;
use super::{
    alert_events_subject, audit_subject, check_subject, presence_subject, results_filter,
    results_stream, results_subject, Nats, ALERT_EVENTS_STREAM, PRESENCE_STREAM, RESULTS_STREAM,
};
use crate::bus::{
    AgentRef, AlertEventsRead, AuditEvent, Bus, BusError, Ends, FeedRead, History, HistoryQuery,
    PresenceEvent, PresenceRead, Published, ResultsRead,
};

/// How far before a history's start its read begins, in the stream's time: an agent's
/// clock ahead of the NATS servers' still has its results found.
const HISTORY_SKEW_MS: u64 = 5 * 60 * 1000;

/// Messages per fetch of a history read.
const HISTORY_BATCH: usize = 1000;

/// The longest a history read may take before it fails (503, retry).
const HISTORY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// A follower of a tenant's results nobody read for this long is dropped (with its
/// consumer), should its reader not have said it stopped.
const FOLLOWER_IDLE: std::time::Duration = std::time::Duration::from_secs(30);

/// Header with the result's sequence number, so `last_seq` needs no body parsing.
pub const SEQ_HEADER: &str = "Outpost-Seq";

pub struct NatsBus {
    nats: Arc<Nats>,
    /// Highest sequence number known durable per results subject.
    watermarks: Mutex<HashMap<String, u64>>,
    /// Each tenant's results stream, once this gateway has opened it.
    streams: Mutex<HashMap<String, stream::Stream>>,
    /// Tenants' byte limits, as [`Bus::keep_bytes`] gave them.
    limits: Mutex<HashMap<String, u64>>,
    /// The streams all tenants share, once opened.
    shared: Mutex<HashMap<&'static str, stream::Stream>>,
    /// Each tenant's follower of its results (see [`Bus::follow_results`]).
    followers: Mutex<HashMap<String, Follower>>,
}

/// Where [`NatsBus::read_polled`] reads.
#[derive(Clone, Copy)]
enum Source {
    /// The tenant's results stream.
    Results,
    /// A stream all tenants share (each on subjects of its own).
    Shared(&'static str),
}

/// A result as read back from a stream (the body [`ResultBody`] writes).
#[derive(serde::Deserialize)]
struct ResultLine {
    tenant: String,
    fingerprint: String,
    result: CheckResult,
}

#[derive(Serialize)]
struct ResultBody<'a> {
    tenant: &'a str,
    fingerprint: &'a str,
    result: &'a CheckResult,
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(format!("{what}: {e}"))
}

impl NatsBus {
    pub fn new(nats: Arc<Nats>) -> NatsBus {
        NatsBus {
            nats,
            watermarks: Mutex::new(HashMap::new()),
            streams: Mutex::new(HashMap::new()),
            limits: Mutex::new(HashMap::new()),
            shared: Mutex::new(HashMap::new()),
            followers: Mutex::new(HashMap::new()),
        }
    }

    /// The stream's `max_bytes` for a tenant limit: the smaller of it and
    /// `--results-max-bytes` (JetStream's -1: no cap).
    fn max_bytes(&self, limit: Option<u64>) -> i64 {
        let all = self.nats.settings.results_max_bytes;
        match limit {
            None => all,
            Some(own) => {
                let own = i64::try_from(own).unwrap_or(i64::MAX);
                if all > 0 {
                    own.min(all)
                } else {
                    own
                }
            }
        }
    }

    /// `OUTPOST_RESULTS`: the home tenant's stream, and every tenant's before tenants had
    /// streams of their own.
    async fn legacy_stream(&self) -> Result<stream::Stream, BusError> {
        self.nats
            .js
            .get_stream(RESULTS_STREAM)
            .await
            .map_err(|e| unavailable("cannot open the results stream OUTPOST_RESULTS", e))
    }

    /// Whether `s` is the stream that holds `tenant`'s subjects and no other's (with a
    /// subject per check, or per agent as releases before them made it).
    fn holds(s: &stream::Stream, tenant: &str) -> bool {
        let subjects = &s.cached_info().config.subjects;
        subjects == &[results_filter(tenant)] || subjects == &[results_subject(tenant, "*")]
    }

    /// `s` taking a subject per check: a stream made by a release before them (one
    /// subject per agent) is widened, keeping what it holds.
    async fn per_check(&self, s: stream::Stream, tenant: &str) -> Result<stream::Stream, BusError> {
        if s.cached_info().config.subjects != [results_subject(tenant, "*")] {
            return Ok(s);
        }
        let mut config = s.cached_info().config.clone();
        config.subjects = vec![results_filter(tenant)];
        self.nats.js.update_stream(&config).await.map_err(|e| {
            unavailable(
                &format!("cannot give {} a subject per check", config.name),
                e,
            )
        })?;
        tracing::info!(stream = %config.name, "results stream now takes a subject per check");
        self.nats
            .js
            .get_stream(&config.name)
            .await
            .map_err(|e| unavailable("cannot open the results stream", e))
    }

    /// `tenant`'s results stream if it exists (none is made).
    async fn existing_stream(&self, tenant: &str) -> Result<Option<stream::Stream>, BusError> {
        if let Some(s) = lock(&self.streams).get(tenant) {
            return Ok(Some(s.clone()));
        }
        let legacy = self.legacy_stream().await?;
        if Self::holds(&legacy, tenant) {
            return Ok(Some(self.per_check(legacy, tenant).await?));
        }
        match self.nats.js.get_stream(results_stream(tenant)).await {
            Ok(s) => {
                let s = self.per_check(s, tenant).await?;
                lock(&self.streams).insert(tenant.to_string(), s.clone());
                Ok(Some(s))
            }
            Err(e) if is_missing(&e) => Ok(None),
            Err(e) => Err(unavailable("cannot open the tenant's results stream", e)),
        }
    }

    /// `tenant`'s results stream: `OUTPOST_RESULTS` when it holds the tenant's subjects,
    /// else the tenant's own, made now (bounded to the tenant's limit) if no gateway has.
    async fn stream(&self, tenant: &str) -> Result<stream::Stream, BusError> {
        if let Some(s) = lock(&self.streams).get(tenant) {
            return Ok(s.clone());
        }
        let js = &self.nats.js;
        let home = self.legacy_stream().await?;
        let limit = lock(&self.limits).get(tenant).copied();
        let s = if Self::holds(&home, tenant) {
            home
        } else {
            let name = results_stream(tenant);
            let config =
                self.nats
                    .settings
                    .results_stream_config(&name, tenant, self.max_bytes(limit));
            js.get_or_create_stream(config)
                .await
                .map_err(|e| unavailable(&format!("cannot open the results stream {name}"), e))?
        };
        let mut s = self.per_check(s, tenant).await?;
        if limit.is_some() {
            self.apply_max_bytes(&mut s, self.max_bytes(limit)).await?;
        }
        lock(&self.streams).insert(tenant.to_string(), s.clone());
        Ok(s)
    }

    /// Make `s` keep at most `max_bytes` (JetStream drops its oldest messages beyond it).
    async fn apply_max_bytes(
        &self,
        s: &mut stream::Stream,
        max_bytes: i64,
    ) -> Result<(), BusError> {
        let info = s
            .info()
            .await
            .map_err(|e| unavailable("cannot read the results stream", e))?;
        if info.config.max_bytes == max_bytes {
            return Ok(());
        }
        let mut config = info.config.clone();
        config.max_bytes = max_bytes;
        self.nats.js.update_stream(&config).await.map_err(|e| {
            unavailable(
                &format!("cannot bound the results stream {}", config.name),
                e,
            )
        })?;
        tracing::info!(stream = %config.name, max_bytes, "results stream bounded");
        Ok(())
    }

    /// Forget `tenant`'s stream and what was read from it after a failure: it may have
    /// been deleted (the tenant was, perhaps made again), so the next write opens or makes
    /// it again and reads its agents' marks from it again.
    fn forget_stream(&self, tenant: &str) {
        lock(&self.streams).remove(tenant);
        lock(&self.followers).remove(tenant);
        let prefix = results_subject(tenant, "");
        lock(&self.watermarks).retain(|subject, _| !subject.starts_with(&prefix));
    }

    fn cached_mark(&self, subject: &str) -> Option<u64> {
        lock(&self.watermarks).get(subject).copied()
    }

    fn raise_mark(&self, subject: &str, seq: u64) {
        let mut marks = lock(&self.watermarks);
        let mark = marks.entry(subject.to_string()).or_insert(0);
        *mark = (*mark).max(seq);
    }

    /// The highest sequence number stored for the agent whose subject is `subject`, from
    /// `tenant`'s stream.
    async fn stored_mark(&self, tenant: &str, subject: &str) -> Result<u64, BusError> {
        let stream = self.stream(tenant).await?;
        match last_seq_of_agent(&stream, subject).await? {
            Some(seq) => Ok(seq),
            None if stream.cached_info().config.name == RESULTS_STREAM => Ok(0),
            // Nothing in the tenant's own stream: a release before tenants had streams of
            // their own kept every tenant's results in OUTPOST_RESULTS.
            None => Ok(last_seq_of_agent(&self.legacy_stream().await?, subject)
                .await?
                .unwrap_or(0)),
        }
    }

    async fn watermark(&self, tenant: &str, subject: &str) -> Result<u64, BusError> {
        if let Some(mark) = self.cached_mark(subject) {
            return Ok(mark);
        }
        let mark = self.stored_mark(tenant, subject).await?;
        self.raise_mark(subject, mark);
        Ok(mark)
    }
}

#[async_trait]
impl Bus for NatsBus {
    async fn publish_results(
        &self,
        agent: &AgentRef,
        results: &[CheckResult],
    ) -> Result<Published, BusError> {
        let subject = results_subject(&agent.tenant, &agent.fingerprint);
        let mark = self.watermark(&agent.tenant, &subject).await?;
        let published = self.publish(agent, &subject, mark, results).await;
        if published.is_err() {
            self.forget_stream(&agent.tenant);
        }
        published
    }

    async fn last_seq(&self, agent: &AgentRef) -> Result<u64, BusError> {
        let subject = results_subject(&agent.tenant, &agent.fingerprint);
        // Always from the stream: the agent may have delivered through another gateway,
        // and the stream is the truth (a tenant deleted and made again starts at 0).
        let mark = self.stored_mark(&agent.tenant, &subject).await?;
        lock(&self.watermarks).insert(subject, mark);
        Ok(mark)
    }

    async fn publish_presence(&self, event: &PresenceEvent) -> Result<(), BusError> {
        let subject = presence_subject(&event.agent.tenant, &event.agent.fingerprint);
        let body = serde_json::to_vec(event).map_err(|e| unavailable("cannot encode", e))?;
        self.nats
            .js
            .publish(subject, body.into())
            .await
            .map_err(|e| unavailable("cannot publish presence", e))?
            .await
            .map_err(|e| unavailable("JetStream did not ack presence", e))?;
        Ok(())
    }

    async fn publish_audit(&self, event: &AuditEvent) -> Result<(), BusError> {
        let subject = audit_subject(&event.tenant);
        let body = serde_json::to_vec(event).map_err(|e| unavailable("cannot encode", e))?;
        self.nats
            .js
            .publish(subject, body.into())
            .await
            .map_err(|e| unavailable("cannot publish an audit event", e))?
            .await
            .map_err(|e| unavailable("JetStream did not ack an audit event", e))?;
        Ok(())
    }

    async fn keep_bytes(&self, tenant: &str, max_bytes: Option<u64>) -> Result<(), BusError> {
        let max_bytes = max_bytes.filter(|b| *b > 0);
        let set = |limit: Option<u64>| {
            let mut limits = lock(&self.limits);
            match limit {
                Some(b) => limits.insert(tenant.to_string(), b),
                None => limits.remove(tenant),
            }
        };
        let before = set(max_bytes);
        if before == max_bytes {
            return Ok(());
        }
        let applied = async {
            let mut s = self.stream(tenant).await?;
            self.apply_max_bytes(&mut s, self.max_bytes(max_bytes))
                .await
        };
        if let Err(e) = applied.await {
            // Not applied: the next call (the caller retries) must try again.
            set(before);
            self.forget_stream(tenant);
            return Err(e);
        }
        Ok(())
    }

    async fn drop_tenant(&self, tenant: &str) -> Result<(), BusError> {
        lock(&self.limits).remove(tenant);
        lock(&self.streams).remove(tenant);
        lock(&self.followers).remove(tenant);
        let prefix = results_subject(tenant, "");
        lock(&self.watermarks).retain(|subject, _| !subject.starts_with(&prefix));
        let js = &self.nats.js;
        let home = js
            .get_stream(RESULTS_STREAM)
            .await
            .map_err(|e| unavailable("cannot open the results stream OUTPOST_RESULTS", e))?;
        if Self::holds(&home, tenant) {
            return Err(unavailable(
                "cannot delete the tenant's results",
                "OUTPOST_RESULTS holds them (the fleet's home tenant)",
            ));
        }
        // Its presence events too, from the stream all tenants share: a tenant made later
        // under the same name finds none of them.
        for (name, subject) in [
            (PRESENCE_STREAM, presence_subject(tenant, "*")),
            (ALERT_EVENTS_STREAM, alert_events_subject(tenant)),
        ] {
            self.shared_stream(name)
                .await?
                .purge()
                .filter(subject)
                .await
                .map_err(|e| {
                    unavailable(&format!("cannot purge the tenant's events in {name}"), e)
                })?;
        }
        // What OUTPOST_RESULTS kept of the tenant from before tenants had streams.
        home.purge()
            .filter(results_filter(tenant))
            .await
            .map_err(|e| unavailable("cannot purge the tenant's results", e))?;
        match js.delete_stream(results_stream(tenant)).await {
            Ok(_) => Ok(()),
            Err(e) if is_missing(&e) => Ok(()),
            Err(e) => Err(unavailable("cannot delete the tenant's results stream", e)),
        }
    }

    async fn tenant_bytes(&self, tenant: &str) -> Result<u64, BusError> {
        let Some(mut s) = self.existing_stream(tenant).await? else {
            return Ok(0);
        };
        match s.info().await {
            Ok(info) => Ok(info.state.bytes),
            Err(e) => {
                self.forget_stream(tenant);
                Err(unavailable("cannot read the results stream", e))
            }
        }
    }

    async fn read_results(
        &self,
        tenant: &str,
        from: u64,
        max: usize,
        wait: std::time::Duration,
    ) -> Result<ResultsRead, BusError> {
        crate::tenant::parse_name(tenant).map_err(BusError::Unavailable)?;
        let filter = results_filter(tenant);
        let parse = |seq: u64, payload: &[u8]| parse_result(tenant, seq, payload);
        let read = self
            .read_polled((tenant, Source::Results), &filter, (from, max, wait), parse)
            .await?;
        Ok(ResultsRead::from(read))
    }

    async fn follow_results(
        &self,
        tenant: &str,
        from: u64,
        max: usize,
        wait: std::time::Duration,
    ) -> Result<ResultsRead, BusError> {
        crate::tenant::parse_name(tenant).map_err(BusError::Unavailable)?;
        let parse = |seq: u64, payload: &[u8]| parse_result(tenant, seq, payload);
        // Its follower, if it is where this read starts (taken out while it reads: one
        // reader per tenant uses it).
        let follower = {
            let mut followers = lock(&self.followers);
            followers.retain(|_, f| f.used.elapsed() < FOLLOWER_IDLE);
            followers.remove(tenant).filter(|f| f.next == from)
        };
        if let Some(mut f) = follower {
            match f.read(max.max(1), wait, parse).await {
                Ok(read) => {
                    lock(&self.followers).insert(tenant.to_string(), f);
                    return Ok(ResultsRead::from(read));
                }
                Err(e) => {
                    tracing::warn!(%tenant, error = %e, "reading the results directly again");
                }
            }
        }
        // A position still in the stream (a direct read of one tells, and tells what was
        // lost if it is not): follow from it. Not from after what a direct read of many
        // got: on a busy tenant, a reader by requests never reaches the end.
        let probe = self
            .read_results(tenant, from, 1, std::time::Duration::ZERO)
            .await?;
        if probe.lost || probe.results.is_empty() && probe.next != from {
            return Ok(probe);
        }
        let Some(stream) = self.existing_stream(tenant).await? else {
            return self.read_results(tenant, from, max, wait).await;
        };
        let mut f = match Follower::start(&stream, &results_filter(tenant), from).await {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(%tenant, error = %e, "cannot follow the results stream; reading it directly");
                return self.read_results(tenant, from, max, wait).await;
            }
        };
        let read = f.read(max.max(1), wait, parse).await;
        if read.is_ok() {
            lock(&self.followers).insert(tenant.to_string(), f);
        }
        read.map(ResultsRead::from)
    }

    fn stop_following(&self, tenant: &str) {
        lock(&self.followers).remove(tenant);
    }

    async fn read_presence(
        &self,
        tenant: &str,
        from: u64,
        max: usize,
        wait: std::time::Duration,
    ) -> Result<PresenceRead, BusError> {
        crate::tenant::parse_name(tenant).map_err(BusError::Unavailable)?;
        let filter = presence_subject(tenant, "*");
        let parse = |seq: u64, payload: &[u8]| match serde_json::from_slice::<PresenceEvent>(
            payload,
        ) {
            Ok(e) if e.agent.tenant == tenant => Some(e),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(%tenant, seq, error = %e, "skipping an unreadable presence event");
                None
            }
        };
        let read = self
            .read_polled(
                (tenant, Source::Shared(PRESENCE_STREAM)),
                &filter,
                (from, max, wait),
                parse,
            )
            .await?;
        Ok(read)
    }

    async fn publish_alert_events(
        &self,
        tenant: &str,
        events: &[serde_json::Value],
    ) -> Result<(), BusError> {
        crate::tenant::parse_name(tenant).map_err(BusError::Unavailable)?;
        let subject = alert_events_subject(tenant);
        let mut acks = Vec::with_capacity(events.len());
        for e in events {
            let mut e = e.clone();
            e["tenant"] = tenant.into();
            let body = serde_json::to_vec(&e).map_err(|e| unavailable("cannot encode", e))?;
            acks.push(
                self.nats
                    .js
                    .publish(subject.clone(), body.into())
                    .await
                    .map_err(|e| unavailable("cannot publish an alert event", e))?,
            );
        }
        for ack in acks {
            ack.await
                .map_err(|e| unavailable("JetStream did not ack an alert event", e))?;
        }
        Ok(())
    }

    async fn read_alert_events(
        &self,
        tenant: &str,
        from: u64,
        max: usize,
        wait: std::time::Duration,
    ) -> Result<AlertEventsRead, BusError> {
        crate::tenant::parse_name(tenant).map_err(BusError::Unavailable)?;
        let filter = alert_events_subject(tenant);
        let parse =
            |seq: u64, payload: &[u8]| match serde_json::from_slice::<serde_json::Value>(payload) {
                Ok(e) if e["tenant"] == tenant => Some(e),
                Ok(_) => None,
                Err(e) => {
                    tracing::warn!(%tenant, seq, error = %e, "skipping an unreadable alert event");
                    None
                }
            };
        let read = self
            .read_polled(
                (tenant, Source::Shared(ALERT_EVENTS_STREAM)),
                &filter,
                (from, max, wait),
                parse,
            )
            .await?;
        Ok(read)
    }

    async fn ends(&self, tenant: &str) -> Result<Ends, BusError> {
        crate::tenant::parse_name(tenant).map_err(BusError::Unavailable)?;
        // A tenant with no results stream yet: the first sequence its stream will have.
        let results = match self.existing_stream(tenant).await? {
            Some(mut s) => match s.info().await {
                Ok(info) => info.state.last_sequence + 1,
                Err(e) => {
                    self.forget_stream(tenant);
                    return Err(unavailable("cannot read the results stream", e));
                }
            },
            None => 1,
        };
        let presence = self.shared_end(PRESENCE_STREAM).await?;
        let alerts = self.shared_end(ALERT_EVENTS_STREAM).await?;
        Ok(Ends {
            results,
            presence,
            alerts,
        })
    }

    async fn read_history(
        &self,
        agent: &AgentRef,
        check: &str,
        query: HistoryQuery,
    ) -> Result<History, BusError> {
        crate::tenant::parse_name(&agent.tenant).map_err(BusError::Unavailable)?;
        let Some(stream) = self.existing_stream(&agent.tenant).await? else {
            return Ok(History::default());
        };
        let read = read_check(&stream, agent, check, query).await;
        if read.is_err() {
            self.forget_stream(&agent.tenant);
        }
        read
    }

    async fn latest_results(
        &self,
        tenant: &str,
        checks: &[String],
    ) -> Result<Option<Vec<(AgentRef, CheckResult)>>, BusError> {
        crate::tenant::parse_name(tenant).map_err(BusError::Unavailable)?;
        let Some(stream) = self.existing_stream(tenant).await? else {
            return Ok(Some(Vec::new()));
        };
        // One bound for the whole read, however many consumers it takes.
        let read = tokio::time::timeout(HISTORY_TIMEOUT, latest_in(&stream, tenant, checks))
            .await
            .unwrap_or_else(|_| {
                Err(BusError::Unavailable(format!(
                    "the newest results were not read within {} s",
                    HISTORY_TIMEOUT.as_secs()
                )))
            });
        if read.is_err() {
            self.forget_stream(tenant);
        }
        read.map(Some)
    }

    fn unavailable(&self) -> Option<String> {
        (!self.nats.connected()).then(|| "not connected to NATS".to_string())
    }

    /// A read's wait looks at JetStream every 100 ms (cheap enough for every reader); the
    /// event streams' one shared reader per tenant and feed looks every 10 ms instead.
    fn poll_every(&self) -> Option<std::time::Duration> {
        Some(std::time::Duration::from_millis(10))
    }
}

/// A result of `tenant` as its stream keeps it (`None`, logged: unreadable, or another
/// tenant's).
fn parse_result(tenant: &str, seq: u64, payload: &[u8]) -> Option<(AgentRef, CheckResult)> {
    match serde_json::from_slice::<ResultLine>(payload) {
        Ok(l) if l.tenant == tenant => Some((AgentRef::new(&l.tenant, &l.fingerprint), l.result)),
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(%tenant, seq, error = %e, "skipping an unreadable result");
            None
        }
    }
}

/// The history `query` asks of `agent`'s `check` in its tenant's `stream`: an ephemeral
/// consumer on the check's own subject (JetStream's per-subject index skips every other
/// result), from the stream time of the query's start (less [`HISTORY_SKEW_MS`]) to the
/// end of the subject, the newest `limit` in range kept. To the end, not to the query's
/// end: results an agent kept through an outage arrive late, stamped with when they ran,
/// and a range over the outage must find them. Also the agent's own subject, where
/// releases before per-check subjects put every check's results.
async fn read_check(
    stream: &stream::Stream,
    agent: &AgentRef,
    check: &str,
    query: HistoryQuery,
) -> Result<History, BusError> {
    use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
    let start_ms = query.from_ms.saturating_sub(HISTORY_SKEW_MS);
    let start_time =
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(start_ms) * 1_000_000)
            .map_err(|e| BusError::Unavailable(format!("history start out of range: {e}")))?;
    // The agent's own subject only when a release before per-check subjects left
    // results there: a consumer on two subjects makes JetStream look at every message of
    // the stream, one on a single subject only at the check's (12 times faster with a
    // day of 10,000 agents' results; BENCHMARKS.md).
    let legacy = results_subject(&agent.tenant, &agent.fingerprint);
    let own = check_subject(&agent.tenant, &agent.fingerprint, check);
    let (filter_subject, filter_subjects) = match last_seq_in(stream, &legacy).await? {
        Some(_) => (String::new(), vec![own, legacy]),
        None => (own, Vec::new()),
    };
    let config = pull::Config {
        filter_subject,
        filter_subjects,
        deliver_policy: DeliverPolicy::ByStartTime { start_time },
        ack_policy: AckPolicy::None,
        inactive_threshold: std::time::Duration::from_secs(30),
        memory_storage: true,
        num_replicas: 1,
        ..Default::default()
    };
    let mut newest = std::collections::VecDeque::new();
    let mut truncated = false;
    read_consumer(
        stream,
        config,
        "the check's history",
        |msg| match serde_json::from_slice::<ResultLine>(&msg.payload) {
            Ok(l)
                if l.tenant == agent.tenant
                    && l.fingerprint == agent.fingerprint
                    && l.result.check == check
                    && (query.from_ms..=query.to_ms).contains(&l.result.started_at_ms) =>
            {
                newest.push_back(l.result);
                if newest.len() > query.limit {
                    newest.pop_front();
                    truncated = true;
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(subject = %msg.subject, error = %e, "skipping an unreadable result");
            }
        },
    )
    .await?;
    Ok(History {
        results: newest.into(),
        truncated,
    })
}

/// Read every message an ephemeral consumer made with `config` on `stream` has for it, to
/// the end it had when made, handing each to `each` (`what` names the read in errors);
/// at most [`HISTORY_TIMEOUT`]. The consumer is deleted after.
async fn read_consumer(
    stream: &stream::Stream,
    config: async_nats::jetstream::consumer::pull::Config,
    what: &str,
    mut each: impl FnMut(&async_nats::jetstream::Message),
) -> Result<(), BusError> {
    use futures_util::StreamExt as _;
    let consumer = stream
        .create_consumer(config)
        .await
        .map_err(|e| unavailable(&format!("cannot read {what}"), e))?;
    let name = consumer.cached_info().name.clone();
    let mut pending = consumer.cached_info().num_pending;
    let read = async {
        'fetch: while pending > 0 {
            let mut batch = consumer
                .fetch()
                .max_messages(HISTORY_BATCH)
                .expires(std::time::Duration::from_secs(5))
                .messages()
                .await
                .map_err(|e| unavailable(&format!("cannot read {what}"), e))?;
            let mut got = 0;
            while let Some(msg) = batch.next().await {
                let msg = msg.map_err(|e| unavailable(&format!("cannot read {what}"), e))?;
                got += 1;
                let info = msg
                    .info()
                    .map_err(|e| unavailable(&format!("unreadable message of {what}"), e))?;
                pending = info.pending;
                each(&msg);
                if pending == 0 {
                    break 'fetch;
                }
            }
            if got == 0 {
                // Pending, yet nothing came: not the whole of it, and not said so.
                return Err(BusError::Unavailable(format!(
                    "{what} stopped with {pending} messages still to read"
                )));
            }
        }
        Ok::<_, BusError>(())
    };
    let outcome = match tokio::time::timeout(HISTORY_TIMEOUT, read).await {
        Ok(o) => o,
        Err(_) => Err(BusError::Unavailable(format!(
            "{what} was not read within {} s",
            HISTORY_TIMEOUT.as_secs()
        ))),
    };
    // Gone by itself after a while of no use; now is better.
    let _ = stream.delete_consumer(&name).await;
    outcome
}

/// Checks whose newest results one consumer reads (its filter subjects).
const LATEST_CHECKS_PER_READ: usize = 128;

/// The newest result of each of `checks` of each of `tenant`'s agents in `stream`: a
/// consumer delivering the last message of each check's subjects (one per agent that
/// ran it: `outpost.<tenant>.results.*.<check>`), on [`LATEST_CHECKS_PER_READ`] checks
/// at a time. (Such a consumer goes on with what is published while it is read: of an
/// agent's check only the newest it delivered is kept.)
async fn latest_in(
    stream: &stream::Stream,
    tenant: &str,
    checks: &[String],
) -> Result<Vec<(AgentRef, CheckResult)>, BusError> {
    use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
    let mut newest: HashMap<(String, String), (AgentRef, CheckResult)> = HashMap::new();
    for chunk in checks.chunks(LATEST_CHECKS_PER_READ) {
        let config = pull::Config {
            filter_subjects: chunk
                .iter()
                .map(|c| check_subject(tenant, "*", c))
                .collect(),
            deliver_policy: DeliverPolicy::LastPerSubject,
            ack_policy: AckPolicy::None,
            inactive_threshold: std::time::Duration::from_secs(30),
            memory_storage: true,
            num_replicas: 1,
            ..Default::default()
        };
        read_consumer(stream, config, "the newest results", |msg| {
            match serde_json::from_slice::<ResultLine>(&msg.payload) {
                Ok(l) if l.tenant == tenant && chunk.contains(&l.result.check) => {
                    let key = (l.fingerprint.clone(), l.result.check.clone());
                    let newer = newest
                        .get(&key)
                        .is_none_or(|(_, r)| r.started_at_ms <= l.result.started_at_ms);
                    if newer {
                        newest.insert(key, (AgentRef::new(&l.tenant, &l.fingerprint), l.result));
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(subject = %msg.subject, error = %e, "skipping an unreadable result");
                }
            }
        })
        .await?;
    }
    Ok(newest.into_values().collect())
}

/// The `Outpost-Seq` of the agent's last result in `stream` (`None`: there is none):
/// the last on any of its checks' subjects, or on its own subject where a release before
/// per-check subjects put it. An agent's results are published in its order, so the last
/// is the highest.
async fn last_seq_of_agent(
    stream: &stream::Stream,
    agent_subject: &str,
) -> Result<Option<u64>, BusError> {
    let per_check = last_seq_in(stream, &format!("{agent_subject}.>")).await?;
    if per_check.is_some() {
        return Ok(per_check);
    }
    last_seq_in(stream, agent_subject).await
}

/// The `Outpost-Seq` of the last message on `subject` in `stream` (`None`: there is none).
async fn last_seq_in(stream: &stream::Stream, subject: &str) -> Result<Option<u64>, BusError> {
    match stream.get_last_raw_message_by_subject(subject).await {
        Ok(msg) => Ok(Some(
            msg.headers
                .get(SEQ_HEADER)
                .and_then(|v| v.as_str().parse().ok())
                .unwrap_or(0),
        )),
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(unavailable("cannot read the agent's last result", e)),
    }
}

/// JetStream's "stream not found".
fn is_missing(e: &async_nats::jetstream::context::DeleteStreamError) -> bool {
    matches!(e.kind(), GetStreamErrorKind::JetStream(e) if e.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND)
}

impl NatsBus {
    /// Read the messages on `filter` in `stream` from sequence `from` (0: the first kept),
    /// at most `max` items that `parse` makes of them (each with the sequence after it). A
    /// gap in the sequence is a loss only when retention took it (it is before the
    /// stream's first sequence, or the position is beyond the stream's last: a stream
    /// deleted and made again); a gap found after some items ends the read there, so
    /// `lost` always speaks of where a read starts. With `to_end`, when nothing more is on
    /// the filter `next` moves to the stream's end, past other subjects' messages (the
    /// presence stream, which all tenants share): a quiet reader's place keeps up, and
    /// retention deleting what others wrote is no loss of its own. (Results are read
    /// without: a reader that stepped over nothing is at the end, which the alert
    /// evaluator waits for before it notifies.)
    async fn read_subject<T>(
        stream: &mut stream::Stream,
        filter: &str,
        (from, max, to_end): (u64, usize, bool),
        parse: impl Fn(u64, &[u8]) -> Option<T>,
    ) -> Result<FeedRead<T>, BusError> {
        let name = stream.cached_info().config.name.clone();
        let failed =
            |e: &dyn std::fmt::Display| unavailable(&format!("cannot read the stream {name}"), e);
        let mut read = FeedRead::at(from);
        // The stream's state, looked at once (only when a gap or the end needs it).
        let mut state: Option<stream::State> = None;
        while read.items.len() < max {
            let at = read.next.max(1);
            let got = match stream.direct_get_next_for_subject(filter, Some(at)).await {
                Ok(msg) => Some(msg),
                Err(e) if e.kind() == DirectGetErrorKind::NotFound => None,
                Err(e) => return Err(failed(&e)),
            };
            let msg = match got {
                Some(msg) => msg,
                None => {
                    let first_read = read.items.is_empty() && from > 0 && !read.lost;
                    if !to_end && !first_read {
                        break;
                    }
                    let s = match state.clone() {
                        Some(s) => s,
                        None => {
                            let s = stream.info().await.map_err(|e| failed(&e))?.state.clone();
                            state = Some(s.clone());
                            s
                        }
                    };
                    if first_read {
                        if from > s.last_sequence + 1 {
                            // Beyond the stream: made again since. Start over.
                            read.lost = true;
                            read.next = 0;
                            read.resumed = Some(s.first_sequence.max(1));
                            continue;
                        }
                        if from < s.first_sequence {
                            // Retention emptied the stream past the position.
                            read.lost = true;
                            read.resumed = Some(s.first_sequence);
                            read.next = read.next.max(s.first_sequence);
                        }
                    }
                    if !to_end {
                        break;
                    }
                    // Before moving past other subjects' messages to the end the state saw,
                    // ask the leader (whose state that is) whether anything of ours is
                    // before it: a direct get may be answered by a replica that lags.
                    let asked = stream
                        .raw_message_builder()
                        .sequence(at)
                        .next_by_subject(filter.to_string())
                        .send()
                        .await;
                    match asked {
                        // Ours, not yet on the replica that answered: read from the leader.
                        Ok(msg) if msg.sequence <= s.last_sequence => msg,
                        Ok(_) => {
                            read.next = read.next.max(s.last_sequence + 1);
                            break;
                        }
                        Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => {
                            // Nothing more on the filter up to the end the state saw.
                            read.next = read.next.max(s.last_sequence + 1);
                            break;
                        }
                        Err(e) => return Err(failed(&e)),
                    }
                }
            };
            if msg.sequence > at && from > 0 && read.items.is_empty() && !read.lost {
                // A gap before the first message read: other subjects' messages, or
                // retention's doing if `at` is before the stream's first sequence now.
                let s = match state.clone() {
                    Some(s) => s,
                    None => {
                        let s = stream.info().await.map_err(|e| failed(&e))?.state.clone();
                        state = Some(s.clone());
                        s
                    }
                };
                if at < s.first_sequence {
                    read.lost = true;
                    read.resumed = Some(msg.sequence);
                }
            }
            read.next = msg.sequence + 1;
            if let Some(item) = parse(msg.sequence, &msg.payload) {
                read.items.push((read.next, item));
            }
        }
        Ok(read)
    }

    /// [`NatsBus::read_subject`] on `tenant`'s results stream or the presence stream,
    /// looked at again every 100 ms until it finds something, says something was lost, or
    /// `wait` passes.
    async fn read_polled<T>(
        &self,
        (tenant, source): (&str, Source),
        filter: &str,
        (from, max, wait): (u64, usize, std::time::Duration),
        parse: impl Fn(u64, &[u8]) -> Option<T>,
    ) -> Result<FeedRead<T>, BusError> {
        /// How often a reader with nothing to read looks again.
        const POLL: std::time::Duration = std::time::Duration::from_millis(100);
        let deadline = tokio::time::Instant::now() + wait;
        let mut from = from;
        loop {
            let stream = match source {
                Source::Shared(name) => Some(self.shared_stream(name).await?),
                // Never made (or deleted with its tenant): nothing to read, and reading
                // does not make it again.
                Source::Results => self.existing_stream(tenant).await?,
            };
            let shared = matches!(source, Source::Shared(_));
            let read = match stream {
                Some(mut stream) => {
                    let read =
                        Self::read_subject(&mut stream, filter, (from, max.max(1), shared), &parse)
                            .await;
                    if read.is_err() {
                        match source {
                            Source::Shared(name) => {
                                lock(&self.shared).remove(name);
                            }
                            Source::Results => self.forget_stream(tenant),
                        }
                    }
                    read?
                }
                None => FeedRead::at(from),
            };
            if !read.items.is_empty() || read.lost || tokio::time::Instant::now() >= deadline {
                return Ok(read);
            }
            from = read.next;
            tokio::time::sleep(POLL.min(deadline - tokio::time::Instant::now())).await;
        }
    }

    /// A stream all tenants share (opened once): presence or alert events.
    async fn shared_stream(&self, name: &'static str) -> Result<stream::Stream, BusError> {
        if let Some(s) = lock(&self.shared).get(name).cloned() {
            return Ok(s);
        }
        let s = self
            .nats
            .js
            .get_stream(name)
            .await
            .map_err(|e| unavailable(&format!("cannot open the stream {name}"), e))?;
        lock(&self.shared).insert(name, s.clone());
        Ok(s)
    }

    /// The next sequence `name` (a shared stream) will give.
    async fn shared_end(&self, name: &'static str) -> Result<u64, BusError> {
        let mut stream = self.shared_stream(name).await?;
        match stream.info().await {
            Ok(info) => Ok(info.state.last_sequence + 1),
            Err(e) => {
                lock(&self.shared).remove(name);
                Err(unavailable(&format!("cannot read the stream {name}"), e))
            }
        }
    }

    /// Publish `results` above `mark` on `subject`; see [`Bus::publish_results`].
    async fn publish(
        &self,
        agent: &AgentRef,
        subject: &str,
        mark: u64,
        results: &[CheckResult],
    ) -> Result<Published, BusError> {
        let mut published = Published::default();
        let mut acks = Vec::with_capacity(results.len());
        for r in results {
            if r.seq <= mark {
                published.duplicates += 1;
                continue;
            }
            let body = serde_json::to_vec(&ResultBody {
                tenant: &agent.tenant,
                fingerprint: &agent.fingerprint,
                result: r,
            })
            .map_err(|e| unavailable("cannot encode a result", e))?;
            let mut headers = HeaderMap::new();
            headers.insert(SEQ_HEADER, r.seq.to_string().as_str());
            let msg = PublishMessage::build()
                .payload(body.into())
                .headers(headers)
                .message_id(format!("{}:{}", agent.key(), r.seq));
            let ack = self
                .nats
                .js
                .send_publish(
                    check_subject(&agent.tenant, &agent.fingerprint, &r.check),
                    msg,
                )
                .await
                .map_err(|e| unavailable("cannot publish a result", e))?;
            acks.push((r.seq, ack));
        }
        let mut highest = mark;
        for (seq, ack) in acks {
            let ack = ack
                .await
                .map_err(|e| unavailable("JetStream did not ack a result", e))?;
            if ack.duplicate {
                published.duplicates += 1;
            } else {
                published.accepted += 1;
            }
            highest = highest.max(seq);
        }
        self.raise_mark(subject, highest);
        Ok(published)
    }
}
