//! An authenticated agent's session: claimed in the registry, greeted with `welcome` (and
//! `config`, and an update offer), then one handler per frame the agent sends until the
//! connection ends, and presence settled by how it ended.
//!
//! Every handler returns [`Flow`]: `Continue` to read on, `Break` with how the session
//! ends. A handler that refuses a frame has queued the close frame that says why.

use outpost_sys::lock;
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use outpost_protocol::{
    close, config_hash_with_collectors, decode_agent_frame, encode, Ack, AgentFrame, Bye,
    CheckSpec, CollectorSpec, ConfigFrame, ErrorFrame, GatewayFrame, Hello, PluginFrame, Results,
    RpcReply, Welcome, MAX_FRAME_BYTES, PROTOCOL_VERSION,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{
    bad_read, close_reason, come_back_later, count_bad_read, rejected, Services, GATEWAY_VERSION,
};
use crate::bus::{AgentRef, BusError, Presence};
use crate::checks::CheckStore;
use crate::credentials::Authenticated;
use crate::hub::{Outbound, SessionHandle, OUTBOUND_QUEUE};
use crate::metrics::Metrics;
use crate::rate::Limiter;
use crate::registry::{publish_presence, RevokedAgent};

/// A bus that has not made a batch durable by then is treated as failed (the agent resends).
const BUS_DEADLINE: Duration = Duration::from_secs(20);

/// A write the agent has not taken by then means it stopped reading.
const WRITE_DEADLINE: Duration = Duration::from_secs(15);

/// Longest `bye` reason kept, in bytes.
const MAX_BYE_REASON_BYTES: usize = 256;

/// How a connection ended, for presence and logs.
enum End {
    Bye(String),
    /// A `bye` from an agent restarting, back within this many seconds.
    Restarting(String, u64),
    Lost(String),
    Replaced,
    Shutdown,
    /// The registry could not record the agent: nothing about it changed.
    Unclaimed,
}

/// What a frame handler decides: read on, or end the session this way.
type Flow = ControlFlow<End>;

/// Run an authenticated agent's session to its end.
pub(super) async fn run(
    gw: Arc<Services>,
    socket: WebSocket,
    peer: SocketAddr,
    mut hello: Hello,
    auth: Authenticated,
) {
    // The labels its enrollment key gave it win over its own.
    hello.labels.extend(auth.labels);
    let (sink, stream) = socket.split();
    let (tx, rx) = mpsc::channel::<Outbound>(OUTBOUND_QUEUE);
    let handle = SessionHandle {
        conn_id: gw.hub.new_conn_id(),
        tx: tx.clone(),
        replaced: CancellationToken::new(),
        pending: Default::default(),
    };
    let writer = Writer::spawn(sink, rx);
    let agent = AgentRef {
        tenant: auth.tenant.clone(),
        fingerprint: hello.fingerprint.clone(),
    };
    gw.hub.register(&agent, handle.clone());
    let holder = gw.registry.me.holder(handle.conn_id);
    let mut session = Session {
        // A newly enrolled agent stores its secret before it sends anything else, so its
        // next frame (or ping) confirms the enrollment.
        unconfirmed: auth.new_secret.is_some(),
        checks: gw.checks.of(&agent.tenant),
        limiter: Limiter::new(gw.settings.agent_rate, std::time::Instant::now()),
        gw,
        agent,
        hello,
        peer,
        tx,
        handle,
        sent_hash: String::new(),
        placed_share: Vec::new(),
        last_acked: 0,
        held_until: None,
    };
    let end = match Box::pin(session.claim()).await {
        ControlFlow::Continue(()) => {
            // Run-now calls from any gateway of the fleet reach this session through NATS,
            // for as long as it reads.
            let _relay = Box::pin(session.serve_relayed_calls()).await;
            // Subscribed before the configuration is computed, so a change made meanwhile
            // is not missed.
            let catalog = session.checks.subscribe();
            let placed = session.checks.subscribe_placed();
            Box::pin(session.greet(auth.new_secret)).await;
            session.read(stream, catalog, placed).await
        }
        ControlFlow::Break(end) => end,
    };
    let Session {
        gw, agent, handle, ..
    } = session;
    // Whatever was queued (a close frame above all) goes out first; then the writer stops.
    writer.finish().await;
    // Fail waiting run-now calls at once instead of letting them time out.
    lock(&handle.pending).clear();
    if !gw.hub.unregister(&agent, handle.conn_id) {
        tracing::info!("connection replaced by a newer one");
        return;
    }
    settle(gw, agent, holder, end).await;
}

/// One authenticated connection's state, read and changed by the frame handlers.
struct Session {
    gw: Arc<Services>,
    agent: AgentRef,
    hello: Hello,
    peer: SocketAddr,
    /// The outbound queue the writer drains.
    tx: mpsc::Sender<Outbound>,
    handle: SessionHandle,
    /// The hash of the configuration last sent (or found already running).
    sent_hash: String,
    /// The checks about entities placed on the agent when its configuration was last
    /// made, with their fences: a new placement that leaves them alone changes nothing
    /// here (most sessions of a tenant, whenever one agent comes or goes).
    placed_share: Vec<(String, Option<u64>)>,
    last_acked: u64,
    /// The agent's result rate, enforced by holding acks back.
    limiter: Limiter,
    /// When the held ack goes out: the next batch is not read before then.
    held_until: Option<Instant>,
    /// Enrolled in this session, and the agent has not yet shown it kept its secret.
    unconfirmed: bool,
    /// Its tenant's checks and plugins.
    checks: Arc<CheckStore>,
}

impl Session {
    fn fp(&self) -> &str {
        &self.agent.fingerprint
    }

    async fn send(&self, frame: GatewayFrame) -> Flow {
        match self.tx.send(Outbound::frame(frame)).await {
            Ok(()) => Flow::Continue(()),
            Err(_) => Flow::Break(End::Lost("writer ended".into())),
        }
    }

    /// Queue a close frame; the session ends as `end`.
    async fn close(&self, code: u16, reason: &str, end: End) -> End {
        let _ = self.tx.send(Outbound::Close(code, reason.into())).await;
        end
    }

    /// Count a frame that breaks the protocol, queue the close frame that says why, and
    /// end the session as lost.
    async fn refuse(&self, counter: &std::sync::atomic::AtomicU64, code: u16, why: &str) -> Flow {
        Metrics::inc(counter);
        tracing::warn!(code, error = %why, "refused a frame; closing");
        let end = End::Lost(format!("refused: {why}"));
        Flow::Break(self.close(code, why, end).await)
    }

    /// Record the agent as online, held by this connection; publish the change.
    async fn claim(&mut self) -> Flow {
        let gw = self.gw.clone();
        let peer = self.peer.to_string();
        let claimed =
            gw.registry
                .connected(&self.agent.tenant, &self.hello, &peer, self.handle.conn_id);
        let was_online = match Box::pin(claimed).await {
            Ok(was_online) => was_online,
            // Revoked between its credential check and now.
            Err(e) if e.is::<RevokedAgent>() => {
                tracing::warn!("agent revoked while it logged in; closing");
                let reason = "revoked by an administrator";
                let end = self.close(close::REVOKED, reason, End::Unclaimed).await;
                return Flow::Break(end);
            }
            Err(e) => {
                Metrics::inc(&gw.metrics.bus_errors);
                tracing::error!(error = %e, "cannot record the agent in the fleet registry; closing so it retries");
                let reason = "bus unavailable; retry later";
                let end = self.close(close::GOING_AWAY, reason, End::Unclaimed).await;
                return Flow::Break(end);
            }
        };
        // An event is a change: an agent that was online (a reconnect within the grace, a
        // session rotation, a move to this gateway) stays online without one.
        if !was_online {
            let online = publish_presence(
                &*gw.bus,
                &gw.metrics,
                &self.agent,
                Presence::Online,
                "connected",
            );
            Box::pin(online).await;
        }
        Flow::Continue(())
    }

    /// On NATS: answer run-now calls relayed from other gateways while the value lives.
    async fn serve_relayed_calls(&self) -> Option<crate::nats::rpc::Responder> {
        let nats = self.gw.nats.clone()?;
        Some(crate::nats::rpc::serve_agent(nats, &self.agent, self.gw.runnow()).await)
    }

    /// `welcome`, then `config` when the agent runs another, then an update offer when
    /// the rollout wants another version on it.
    async fn greet(&mut self, new_secret: Option<String>) {
        let gw = self.gw.clone();
        tracing::info!(peer = %self.peer, version = ?self.hello.agent_version, enrolled = new_secret.is_some(), "agent connected");
        let placed = self.checks.placed();
        self.placed_share = share_of(&placed, self.fp());
        let config = AgentConfig::of(
            &self.checks.current(),
            &placed,
            &self.hello,
            &self.agent.fingerprint,
        );
        self.sent_hash = config.hash.clone();
        let welcome = GatewayFrame::Welcome(Welcome {
            protocol: PROTOCOL_VERSION,
            gateway_version: GATEWAY_VERSION.into(),
            agent_secret: new_secret,
            config_hash: self.sent_hash.clone(),
            heartbeat_secs: gw.settings.heartbeat.as_secs(),
            last_seq: Box::pin(gw.bus.last_seq(&self.agent)).await.unwrap_or(0),
            fallback_addrs: gw
                .settings
                .fallback_addrs
                .iter()
                .map(|a| a.to_string())
                .collect(),
            max_session_secs: gw.settings.max_session.as_secs(),
        });
        let _ = self.send(welcome).await;
        if self.hello.config_hash.as_deref() != Some(self.sent_hash.as_str()) {
            Box::pin(self.send_config(config)).await;
        } else {
            gw.registry.set_checks(&self.agent, config.checks);
        }
        let rollout = Box::pin(crate::rollout::load(&gw.settings.releases_dir)).await;
        if let Some(version) = rollout
            .and_then(|r| {
                r.version_for(self.fp(), &self.hello.groups)
                    .map(str::to_string)
            })
            .filter(|v| *v != self.hello.agent_version)
        {
            tracing::info!(peer = %self.peer, from = ?self.hello.agent_version, to = %version, "offering an agent update");
            let offer = GatewayFrame::Update(outpost_protocol::UpdateOffer { version });
            let _ = self.send(offer).await;
        }
    }

    /// Read frames and hand each to its handler until the session ends.
    async fn read(
        &mut self,
        mut stream: SplitStream<WebSocket>,
        mut catalog_rx: tokio::sync::watch::Receiver<Arc<crate::checks::Catalog>>,
        mut placed_rx: tokio::sync::watch::Receiver<Arc<crate::checks::placement::Placed>>,
    ) -> End {
        let gw = self.gw.clone();
        // A silent peer for three heartbeats is gone (half-open connections included).
        let idle = gw.settings.heartbeat * 3;
        loop {
            let msg = tokio::select! {
                m = tokio::time::timeout(idle, stream.next()) => m,
                _ = self.handle.replaced.cancelled() => {
                    let reason = "replaced by a newer connection";
                    return self.close(close::REPLACED, reason, End::Replaced).await;
                }
                _ = gw.shutdown.cancelled() => return self.drain().await,
                // (A catalog or a placement changed: either may change what the agent runs.)
                changed = catalog_rx.changed() => {
                    if changed.is_ok() {
                        catalog_rx.borrow_and_update();
                        Box::pin(self.reconfigure()).await;
                    }
                    continue;
                }
                changed = placed_rx.changed() => {
                    if changed.is_ok() {
                        let share = share_of(&placed_rx.borrow_and_update(), self.fp());
                        if share != self.placed_share {
                            Box::pin(self.reconfigure()).await;
                        }
                    }
                    continue;
                }
            };
            let flow = match msg {
                Err(_) => Flow::Break(End::Lost(format!(
                    "no frame or ping for {}s",
                    idle.as_secs()
                ))),
                Ok(None) => Flow::Break(End::Lost("connection closed without bye".into())),
                Ok(Some(Err(e))) => self.on_read_error(&e).await,
                Ok(Some(Ok(m))) => Box::pin(self.on_message(m)).await,
            };
            if let ControlFlow::Break(end) = flow {
                return end;
            }
        }
    }

    /// Send the agent its configuration again if what it should run changed.
    async fn reconfigure(&mut self) {
        let placed = self.checks.placed();
        self.placed_share = share_of(&placed, self.fp());
        let config = AgentConfig::of(
            &self.checks.current(),
            &placed,
            &self.hello,
            &self.agent.fingerprint,
        );
        if config.hash != self.sent_hash {
            self.sent_hash = config.hash.clone();
            Box::pin(self.send_config(config)).await;
        }
    }

    /// The gateway is stopping: the agent is told to come back later, elsewhere or here.
    async fn drain(&self) -> End {
        // Spread the agents' return (to another gateway behind the load balancer, or this
        // one restarted) over half the grace period.
        let spread = (self.gw.settings.grace / 2).min(Duration::from_secs(30));
        let later = come_back_later("gateway draining", Duration::ZERO, spread);
        let _ = self.send(later).await;
        let reason = "gateway shutting down; reconnect later";
        self.close(close::GOING_AWAY, reason, End::Shutdown).await
    }

    async fn on_read_error(&self, e: &axum::Error) -> Flow {
        match bad_read(e) {
            Some((code, why)) => {
                count_bad_read(&self.gw, code);
                tracing::warn!(peer = %self.peer, error = why, "bad frame; closing");
                let end = End::Lost(format!("refused: {why}"));
                Flow::Break(self.close(code, why, end).await)
            }
            None => Flow::Break(End::Lost(format!("read error: {e}"))),
        }
    }

    async fn on_message(&mut self, msg: Message) -> Flow {
        self.gw.registry.seen(&self.agent);
        // A tenant disabled meanwhile (through any gateway): its agents are closed at their
        // next frame (a ping at the latest) and refused until it is enabled again.
        if let Err(refusal) = self.gw.credentials.tenants.enabled(&self.agent.tenant) {
            let why = refusal.to_string();
            tracing::warn!(error = %why, "closing the session of a disabled tenant");
            let end = End::Lost(why.clone());
            return Flow::Break(self.close(close::UNAUTHORIZED, &why, end).await);
        }
        if self.unconfirmed && !matches!(msg, Message::Close(_)) {
            Box::pin(self.gw.credentials.confirmed(&self.agent.tenant, self.fp())).await;
            self.unconfirmed = false;
        }
        match msg {
            Message::Text(text) => self.on_text(text).await,
            Message::Ping(_) | Message::Pong(_) => Flow::Continue(()),
            Message::Close(_) => Flow::Break(End::Lost("closed without bye".into())),
            Message::Binary(_) => {
                let why = "binary frames are not part of outpost.v1";
                let malformed = &self.gw.metrics.frames_malformed;
                self.refuse(malformed, close::MALFORMED, why).await
            }
        }
    }

    async fn on_text(&mut self, text: Utf8Bytes) -> Flow {
        let frame = match decode_agent_frame(text.as_str()) {
            Ok(f) => f,
            Err(e) => {
                let code = rejected(&self.gw, self.peer, &e);
                let end = End::Lost(format!("sent a bad frame: {e}"));
                return Flow::Break(self.close(code, &e.to_string(), end).await);
            }
        };
        match frame {
            AgentFrame::Results(batch) => self.on_results(batch, text.len()).await,
            AgentFrame::RpcReply(reply) => self.on_rpc_reply(reply).await,
            AgentFrame::PluginRequest(req) => {
                let frame = Box::pin(plugin_frame(&self.checks, &req.sha256)).await;
                self.send(frame).await
            }
            AgentFrame::Bye(bye) => self.on_bye(bye).await,
            AgentFrame::Hello(_) => {
                let out_of_order = &self.gw.metrics.frames_out_of_order;
                let why = "hello may be sent only once";
                self.refuse(out_of_order, close::POLICY, why).await
            }
            AgentFrame::Unknown => {
                Metrics::inc(&self.gw.metrics.frames_unknown);
                let _ = self
                    .send(GatewayFrame::Error(ErrorFrame {
                        code: "unknown_frame".into(),
                        message: "this gateway does not know that frame type; it was ignored"
                            .into(),
                    }))
                    .await;
                Flow::Continue(())
            }
        }
    }

    /// Publish a batch to the bus and ack it once durable (held back when the agent is
    /// over its rate).
    async fn on_results(&mut self, batch: Results, bytes: usize) -> Flow {
        let gw = self.gw.clone();
        if let Some(why) = batch.problem() {
            return self
                .refuse(&gw.metrics.frames_malformed, close::MALFORMED, &why)
                .await;
        }
        // An agent ahead of its rate has its ack held: it sends its next batch only after
        // the ack, so what it makes meanwhile waits on its disk. One that sends again
        // without waiting is read no further until then.
        if let Some(until) = self.held_until.take() {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => {}
                _ = gw.shutdown.cancelled() => {}
            }
        }
        // The hold counts from when the batch was read, so publishing time is part of it
        // and the ack still comes within MAX_HOLD of the agent's send.
        let read_at = Instant::now();
        let hold = self
            .limiter
            .hold_for(batch.results.len(), bytes, read_at.into_std());
        // The tenant's limit, this gateway's share of it.
        let tenant = &self.agent.tenant;
        let share = gw
            .credentials
            .tenants
            .limits(tenant)
            .results_per_sec
            .map(|r| r.div_ceil(gw.registry.live_gateways() as u64));
        let tenant_hold =
            gw.tenant_rates
                .hold_for(tenant, share, batch.results.len(), read_at.into_std());
        if tenant_hold > hold {
            let subject = format!("agent {} results", self.agent.fingerprint);
            let peer = Some(self.peer.to_string());
            gw.audit.held(tenant, "results_rate", subject, peer);
        }
        let hold = hold.max(tenant_hold);
        let published = tokio::time::timeout(
            BUS_DEADLINE,
            gw.bus.publish_results(&self.agent, &batch.results),
        )
        .await
        .unwrap_or_else(|_| {
            Err(BusError::Io(std::io::Error::other(format!(
                "no answer from the bus within {}s",
                BUS_DEADLINE.as_secs()
            ))))
        });
        let p = match published {
            Ok(p) => p,
            Err(e) => {
                Metrics::inc(&gw.metrics.bus_errors);
                tracing::error!(error = %e, "bus publish failed; closing so the agent resends later");
                let end = End::Lost(format!("bus failure: {e}"));
                let reason = "bus unavailable; retry later";
                return Flow::Break(self.close(close::GOING_AWAY, reason, end).await);
            }
        };
        let relaxed = std::sync::atomic::Ordering::Relaxed;
        gw.metrics
            .results_accepted
            .fetch_add(p.accepted as u64, relaxed);
        gw.metrics
            .results_duplicate
            .fetch_add(p.duplicates as u64, relaxed);
        gw.registry.record_results(&self.agent, &batch.results);
        self.last_acked = batch.results.last().map_or(self.last_acked, |r| r.seq);
        let ack = Outbound::frame(GatewayFrame::Ack(Ack {
            seq: self.last_acked,
        }));
        let release = read_at + hold;
        if release <= Instant::now() {
            return match self.tx.send(ack).await {
                Ok(()) => Flow::Continue(()),
                Err(_) => Flow::Break(End::Lost("writer ended".into())),
            };
        }
        // Held off the reader, which goes on answering pings and run-now replies
        // meanwhile. The results are durable already: if the session ends first, the
        // agent's resend is a duplicate.
        Metrics::inc(&gw.metrics.acks_held);
        gw.metrics
            .ack_hold_ms
            .fetch_add(hold.as_millis() as u64, relaxed);
        self.held_until = Some(release);
        let tx = self.tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(release).await;
            let _ = tx.send(ack).await;
        });
        Flow::Continue(())
    }

    /// Hand a run-now reply to the call waiting for it, once its result passes the bounds.
    async fn on_rpc_reply(&mut self, reply: RpcReply) -> Flow {
        let Some(waiter) = lock(&self.handle.pending).remove(&reply.id) else {
            tracing::debug!(
                id = reply.id,
                "rpc reply for a call nobody waits for (timed out?)"
            );
            return Flow::Continue(());
        };
        if let Some(result) = &reply.result {
            // Its seq may be 0 (the agent could not queue it), not above the bound.
            let mut problems = result.content_problems();
            if result.seq > outpost_protocol::MAX_SEQ {
                problems.push(format!(
                    "seq {} is above {}",
                    result.seq,
                    outpost_protocol::MAX_SEQ
                ));
            }
            if !problems.is_empty() {
                let why = format!(
                    "run-now result of {:?}: {}",
                    result.check,
                    problems.join("; ")
                );
                let malformed = &self.gw.metrics.frames_malformed;
                return self.refuse(malformed, close::MALFORMED, &why).await;
            }
            self.gw
                .registry
                .record_results(&self.agent, std::iter::once(result));
        }
        let _ = waiter.send(reply);
        Flow::Continue(())
    }

    async fn on_bye(&self, bye: Bye) -> Flow {
        // Kept in the registry and in presence events: bounded and printable.
        let reason = outpost_protocol::printable(&bye.reason, MAX_BYE_REASON_BYTES);
        let end = match bye.back_within_secs {
            Some(secs) => End::Restarting(reason, secs),
            None => End::Bye(reason),
        };
        Flow::Break(self.close(1000, "bye", end).await)
    }

    /// Send `config` unless it cannot fit in one frame (then the agent keeps its old one
    /// and is told why).
    async fn send_config(&self, config: AgentConfig) {
        let AgentConfig {
            checks,
            collectors,
            hash,
        } = config;
        let count = checks.len();
        let frame = GatewayFrame::Config(ConfigFrame {
            hash: hash.clone(),
            checks: checks.clone(),
            collectors,
        });
        let size = encode(&frame).len();
        if size > MAX_FRAME_BYTES {
            // The agent would refuse the frame and reconnect forever; keep it on its old
            // config.
            Metrics::inc(&self.gw.metrics.configs_too_big);
            tracing::error!(checks = count, bytes = size, limit = MAX_FRAME_BYTES,
                "this agent's configuration does not fit in one frame; not sent (target fewer checks at it)");
            let _ = self
                .send(GatewayFrame::Error(ErrorFrame {
                    code: "config_too_big".into(),
                    message: format!("your configuration of {count} checks is {size} bytes, over the {MAX_FRAME_BYTES}-byte frame limit; keeping the previous one"),
                }))
                .await;
            return;
        }
        self.gw.registry.set_checks(&self.agent, checks);
        Metrics::inc(&self.gw.metrics.configs_sent);
        tracing::info!(checks = count, %hash, "sending config");
        let _ = self.send(frame).await;
    }
}

/// Presence after the session ended, by how it ended.
async fn settle(gw: Arc<Services>, agent: AgentRef, holder: String, end: End) {
    if matches!(end, End::Restarting(..) | End::Lost(_)) {
        Box::pin(gw.registry.session_ended(&agent, &holder)).await;
    }
    match end {
        End::Restarting(reason, secs) => {
            // Still online: lost only if no new connection has come by the window's end.
            let window = secs.clamp(1, outpost_protocol::MAX_RESTART_WINDOW_SECS);
            tracing::info!(%reason, window_secs = window, "agent restarting; online while it comes back");
            let lost = format!("did not come back within {window}s of restarting ({reason})");
            lost_unless_back(gw, agent, holder, Duration::from_secs(window), lost);
        }
        End::Lost(reason) => {
            // Still online for the grace: a quick reconnect, here or through another
            // gateway, is no alarm.
            let grace = gw.settings.presence_grace;
            tracing::info!(%reason, grace_secs = grace.as_secs(), "connection lost without bye");
            let lost = format!("{reason}; not back within {}s", grace.as_secs());
            lost_unless_back(gw, agent, holder, grace, lost);
        }
        End::Bye(r) => {
            let reason = format!("bye: {r}");
            tracing::info!(%reason, "agent deregistered");
            let ended =
                gw.registry
                    .disconnected(&agent, Some(&holder), Presence::Deregistered, &reason);
            if Box::pin(ended).await {
                let event = publish_presence(
                    &*gw.bus,
                    &gw.metrics,
                    &agent,
                    Presence::Deregistered,
                    &reason,
                );
                Box::pin(event).await;
            }
        }
        // Told to reconnect elsewhere: the agent stays online under this holder; if it
        // does not come back, the gateway that notices this one gone publishes it lost
        // after the grace (or this one, restarted).
        End::Shutdown => tracing::info!("session ended by the gateway's shutdown"),
        End::Replaced => tracing::info!("connection replaced by a newer one"),
        End::Unclaimed => {}
    }
}

/// Publish the agent lost after `after` unless `holder` no longer holds it by then (a new
/// connection has claimed it, here or on another gateway).
fn lost_unless_back(
    gw: Arc<Services>,
    agent: AgentRef,
    holder: String,
    after: Duration,
    reason: String,
) {
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        if !crate::registry::lose(&gw.upkeep(), &agent, Some(&holder), &reason).await {
            tracing::info!(fingerprint = %agent.fingerprint, "grace over; a newer connection holds the agent, no change");
        }
    });
}

/// The task that drains the outbound queue into the socket.
struct Writer {
    task: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
}

impl Writer {
    /// Drain `rx` into the socket until a close frame was sent, the queue is empty after
    /// [`Writer::finish`], or the agent stops taking data for [`WRITE_DEADLINE`].
    fn spawn(mut sink: SplitSink<WebSocket, Message>, mut rx: mpsc::Receiver<Outbound>) -> Writer {
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let task = tokio::spawn(
            async move {
                loop {
                    let out = tokio::select! {
                        biased;
                        out = rx.recv() => match out { Some(o) => o, None => break },
                        _ = stopped.cancelled() => break,
                    };
                    let (msg, last) = match out {
                        Outbound::Frame(f) => (Message::Text(encode(&f).into()), false),
                        Outbound::Close(code, reason) => (
                            Message::Close(Some(CloseFrame {
                                code,
                                reason: close_reason(&reason).into(),
                            })),
                            true,
                        ),
                    };
                    match tokio::time::timeout(WRITE_DEADLINE, sink.send(msg)).await {
                        Ok(Ok(())) if !last => {}
                        Ok(Ok(())) | Ok(Err(_)) => break,
                        Err(_) => {
                            tracing::warn!(
                                "agent took no data for {}s; dropping the connection",
                                WRITE_DEADLINE.as_secs()
                            );
                            break;
                        }
                    }
                }
                let _ = tokio::time::timeout(WRITE_DEADLINE, sink.close()).await;
            }
            .in_current_span(),
        );
        Writer { task, stop }
    }

    /// Let what is queued go out (within [`WRITE_DEADLINE`]), then stop.
    async fn finish(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(WRITE_DEADLINE, self.task).await;
    }
}

/// The catalog plugin with content hash `sha256`, or an error frame saying why not.
async fn plugin_frame(checks: &CheckStore, sha256: &str) -> GatewayFrame {
    use base64::Engine;
    use sha2::Digest;
    let refuse = |code: &str, message: String| {
        tracing::warn!(?sha256, %message, "plugin request refused");
        GatewayFrame::Error(ErrorFrame {
            code: code.into(),
            message,
        })
    };
    if sha256.len() != 64
        || !sha256
            .bytes()
            .all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
    {
        return refuse(
            "unknown_plugin",
            "a plugin's sha256 is 64 lowercase hex digits".into(),
        );
    }
    let Some(entry) = checks.current().plugin_by_hash(sha256).cloned() else {
        return refuse(
            "unknown_plugin",
            format!("no plugin with sha256 {sha256} in the catalog"),
        );
    };
    match tokio::fs::read(&entry.path).await {
        Ok(bytes) if hex::encode(sha2::Sha256::digest(&bytes)) == sha256 => {
            GatewayFrame::Plugin(PluginFrame {
                name: entry.plugin.name,
                sha256: sha256.to_string(),
                content_b64: base64::engine::general_purpose::STANDARD.encode(bytes),
            })
        }
        Ok(_) => refuse(
            "plugin_changed",
            format!(
                "plugin {} changed on the gateway since it was catalogued; a new config follows",
                entry.plugin.name
            ),
        ),
        Err(e) => refuse(
            "plugin_unreadable",
            format!("cannot read plugin {}: {e}", entry.plugin.name),
        ),
    }
}

/// The checks about entities placed on `fingerprint`, with their fences.
fn share_of(
    placed: &crate::checks::placement::Placed,
    fingerprint: &str,
) -> Vec<(String, Option<u64>)> {
    placed
        .of(fingerprint)
        .iter()
        .map(|name| (name.clone(), placed.not_before.get(name).copied()))
        .collect()
}

/// What one agent runs: the checks and collectors targeted at it, and their hash.
struct AgentConfig {
    checks: Vec<CheckSpec>,
    collectors: Vec<CollectorSpec>,
    hash: String,
}

impl AgentConfig {
    /// What the catalog targets at the agent, and the checks about entities placed on it.
    fn of(
        catalog: &crate::checks::Catalog,
        placed: &crate::checks::placement::Placed,
        hello: &Hello,
        fingerprint: &str,
    ) -> AgentConfig {
        let mut checks = catalog.for_agent(&hello.labels, &hello.groups);
        let mine = placed.specs_of(catalog, fingerprint);
        if !mine.is_empty() {
            checks.extend(mine);
            checks.sort_by(|a, b| a.name.cmp(&b.name));
        }
        let collectors = catalog.collectors_for_agent(&hello.labels, &hello.groups);
        let hash = config_hash_with_collectors(&checks, &collectors);
        AgentConfig {
            checks,
            collectors,
            hash,
        }
    }
}
