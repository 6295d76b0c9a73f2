//! One agent connection, from the websocket upgrade to its end.
//!
//! The order is fixed by the protocol: `hello` within the deadline (nothing else accepted
//! before it), authentication, `welcome`, then `config` when the agent's hash differs.
//! After that a reader loop handles results (published to the bus, acked once durable),
//! rpc replies and `bye`, while a writer task drains the bounded outbound queue. A
//! malformed or oversized frame closes only this connection, with a close code from
//! [`outpost_protocol::close`] and a counter.

use outpost_sys::lock;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::{SinkExt, StreamExt};
use outpost_protocol::{
    close, config_hash_with_collectors, decode_agent_frame, encode, valid_fingerprint, Ack,
    AgentFrame, CheckSpec, CollectorSpec, ConfigFrame, ErrorFrame, FrameError, GatewayFrame, Hello,
    PluginFrame, Reconnect, Welcome, MAX_FRAME_BYTES, PROTOCOL_VERSION,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::bus::Bus;
use crate::bus::{AgentRef, Presence};
use crate::checks::CheckStore;
use crate::credentials::Credentials;
use crate::hub::Hub;
use crate::hub::{Outbound, SessionHandle, OUTBOUND_QUEUE};
use crate::listener::PreAuth;
use crate::metrics::Metrics;
use crate::nats::Nats;
use crate::registry::publish_presence;
use crate::registry::{Registry, Upkeep};
use crate::settings::Settings;

/// What agent sessions use, handed by the gateway at start and shared by all of them.
pub struct Services {
    pub settings: Arc<Settings>,
    pub credentials: Arc<Credentials>,
    pub checks: Arc<CheckStore>,
    pub registry: Arc<Registry>,
    pub bus: Arc<dyn Bus>,
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
    /// In a fleet: to answer run-now calls relayed from other gateways.
    pub nats: Option<Arc<Nats>>,
}

impl Services {
    fn upkeep(&self) -> Upkeep {
        Upkeep {
            registry: self.registry.clone(),
            bus: self.bus.clone(),
            hub: self.hub.clone(),
            metrics: self.metrics.clone(),
            presence_grace: self.settings.presence_grace,
            listen: self.settings.listen.to_string(),
            tenant: self.settings.tenant.clone(),
            shutdown: self.shutdown.clone(),
        }
    }

    fn runnow(&self) -> crate::runnow::Local {
        crate::runnow::Local {
            hub: self.hub.clone(),
            agents: self.registry.clone(),
        }
    }
}

pub const GATEWAY_VERSION: &str = env!("CARGO_PKG_VERSION");

/// A bus that has not made a batch durable by then is treated as failed (the agent resends).
const BUS_DEADLINE: std::time::Duration = std::time::Duration::from_secs(20);

/// A write the agent has not taken by then means it stopped reading.
const WRITE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(15);

/// How a connection ended, for presence and logs.
enum End {
    Bye(String),
    /// A `bye` from an agent restarting, back within this many seconds.
    Restarting(String, u64),
    Lost(String),
    Replaced,
    Shutdown,
}

fn close_reason(text: &str) -> String {
    // RFC 6455 caps the close reason at 123 bytes.
    let mut s = text.to_string();
    if s.len() > 120 {
        let mut cut = 120;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

async fn close_now(socket: &mut WebSocket, code: u16, reason: &str) {
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: close_reason(reason).into(),
        })))
        .await;
}

/// Whether a websocket read error was a frame over the size limit.
/// A read error that is the peer's fault, with the close code that says so; other read
/// errors are a lost connection.
fn bad_read(err: &axum::Error) -> Option<(u16, &'static str)> {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = src {
        match e.downcast_ref::<tungstenite::Error>() {
            Some(tungstenite::Error::Capacity(_)) => {
                return Some((close::TOO_BIG, "frame exceeds 1 MiB"))
            }
            Some(tungstenite::Error::Utf8(_)) => {
                return Some((close::MALFORMED, "text frame is not valid UTF-8"))
            }
            Some(_) => return None,
            None => src = e.source(),
        }
    }
    None
}

/// Count a read error that is the peer's fault (see [`bad_read`]).
fn count_bad_read(gw: &Services, code: u16) {
    if code == close::TOO_BIG {
        Metrics::inc(&gw.metrics.frames_too_big);
    } else {
        Metrics::inc(&gw.metrics.frames_malformed);
    }
}

/// Run one agent connection to its end. `pre_auth` is the connection's slot among the
/// unauthenticated ones, given back once the agent is authenticated.
pub async fn run(gw: Arc<Services>, mut socket: WebSocket, peer: SocketAddr, pre_auth: PreAuth) {
    Metrics::inc(&gw.metrics.connections);
    // Pings and pongs before hello are control frames, not part of the exchange: they are
    // answered (by the websocket layer) and skipped, and the hello deadline keeps running.
    let first = async {
        loop {
            match socket.recv().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => return other,
            }
        }
    };
    let first = tokio::time::timeout(gw.settings.hello_timeout, first).await;
    let hello = match first {
        Err(_) => {
            Metrics::inc(&gw.metrics.hello_timeouts);
            tracing::warn!(%peer, "no hello within the deadline; closing");
            close_now(
                &mut socket,
                close::HELLO_TIMEOUT,
                "hello not received in time",
            )
            .await;
            return;
        }
        Ok(None) => return,
        Ok(Some(Err(e))) => {
            if let Some((code, why)) = bad_read(&e) {
                count_bad_read(&gw, code);
                tracing::warn!(%peer, error = why, "bad frame before hello; closing");
                close_now(&mut socket, code, why).await;
            }
            return;
        }
        Ok(Some(Ok(Message::Text(text)))) => match decode_agent_frame(text.as_str()) {
            Ok(AgentFrame::Hello(h)) => h,
            Ok(_) => {
                Metrics::inc(&gw.metrics.frames_out_of_order);
                tracing::warn!(%peer, "frame before hello; closing");
                close_now(&mut socket, close::POLICY, "the first frame must be hello").await;
                return;
            }
            Err(FrameError::Malformed(e)) if hello_revision(text.as_str()).is_some() => {
                if matches!(hello_revision(text.as_str()), Some(Some(n)) if n != u64::from(PROTOCOL_VERSION))
                {
                    // Another revision's hello need not decode as ours: it is refused for
                    // its revision, which the agent waits out instead of retrying.
                    let why = format!(
                        "agent speaks another protocol revision, this gateway speaks {PROTOCOL_VERSION}; upgrade the older side"
                    );
                    tracing::warn!(%peer, error = %why, "refusing agent");
                    send_error(&mut socket, "unsupported_protocol", &why).await;
                    close_now(&mut socket, close::UNSUPPORTED, &why).await;
                    return;
                }
                // A hello with a field missing or of the wrong type is answered like one
                // that breaks a bound: the client is told which field (serde's message,
                // bounded and printable: it may quote what the client sent).
                let why = outpost_protocol::printable(&format!("hello does not decode: {e}"), 200);
                Metrics::inc(&gw.metrics.frames_malformed);
                tracing::warn!(%peer, error = %why, "invalid hello; closing");
                send_error(&mut socket, "invalid_hello", &why).await;
                close_now(&mut socket, close::POLICY, "invalid hello").await;
                return;
            }
            Err(e) => {
                reject_frame(&gw, &mut socket, peer, &e).await;
                return;
            }
        },
        Ok(Some(Ok(Message::Close(_)))) => return,
        Ok(Some(Ok(_))) => {
            Metrics::inc(&gw.metrics.frames_out_of_order);
            close_now(
                &mut socket,
                close::POLICY,
                "the first frame must be a hello text frame",
            )
            .await;
            return;
        }
    };
    if let Err(why) = validate_hello(&hello) {
        Metrics::inc(&gw.metrics.frames_malformed);
        tracing::warn!(%peer, error = %why, "invalid hello; closing");
        send_error(&mut socket, "invalid_hello", &why).await;
        close_now(&mut socket, close::POLICY, &why).await;
        return;
    }
    if hello.protocol != PROTOCOL_VERSION {
        let why = format!(
            "agent speaks protocol {}, this gateway speaks {}; upgrade the older side",
            hello.protocol, PROTOCOL_VERSION
        );
        tracing::warn!(%peer, fingerprint = %hello.fingerprint, error = %why, "refusing agent");
        send_error(&mut socket, "unsupported_protocol", &why).await;
        close_now(&mut socket, close::UNSUPPORTED, &why).await;
        return;
    }
    let max = gw.settings.max_agents;
    if max > 0 && gw.hub.connected() >= max && !gw.hub.has(&hello.fingerprint) {
        Metrics::inc(&gw.metrics.overload_refusals);
        tracing::warn!(%peer, fingerprint = %hello.fingerprint, max_agents = max, "overloaded; telling the agent to come back later");
        let retry = gw.settings.overload_retry;
        let frame = come_back_later(
            &format!("this gateway holds its maximum of {max} agents"),
            retry / 2,
            retry,
        );
        let _ = socket.send(Message::Text(encode(&frame).into())).await;
        close_now(
            &mut socket,
            close::TRY_AGAIN_LATER,
            "overloaded; come back later",
        )
        .await;
        return;
    }
    // Boxed, here and for the other calls made once per session: a future awaited inline
    // makes the session's state machine as large as its largest such call for the whole
    // life of the connection (ci/bench: memory per idle agent).
    let auth = match Box::pin(gw.credentials.check(&hello.fingerprint, &hello.credential)).await {
        Ok(a) => a,
        Err(e) => {
            Metrics::inc(&gw.metrics.auth_failures);
            tracing::warn!(%peer, fingerprint = %hello.fingerprint, hostname = ?hello.hostname, error = %e, "agent refused");
            send_error(&mut socket, "unauthorized", &e.public_message()).await;
            close_now(&mut socket, close::UNAUTHORIZED, "unauthorized").await;
            return;
        }
    };
    pre_auth.release();
    let span =
        tracing::info_span!("agent", fingerprint = %hello.fingerprint, hostname = ?hello.hostname);
    authenticated(gw, socket, peer, hello, auth)
        .instrument(span)
        .await
}

/// A `reconnect` frame: dial again after a random delay in `[min, max]`.
fn come_back_later(
    reason: &str,
    min: std::time::Duration,
    max: std::time::Duration,
) -> GatewayFrame {
    GatewayFrame::Reconnect(Reconnect {
        reason: reason.into(),
        min_delay_ms: min.as_millis() as u64,
        max_delay_ms: max.as_millis() as u64,
    })
}

async fn send_error(socket: &mut WebSocket, code: &str, message: &str) {
    let frame = GatewayFrame::Error(ErrorFrame {
        code: code.into(),
        message: message.into(),
    });
    let _ = socket.send(Message::Text(encode(&frame).into())).await;
}

/// For a JSON object whose `type` is `hello` (whatever else it holds): `Some` with its
/// `protocol` when that is a number. `None` for anything else.
fn hello_revision(text: &str) -> Option<Option<u64>> {
    #[derive(serde::Deserialize)]
    struct Tag<'a> {
        #[serde(rename = "type", borrow)]
        kind: std::borrow::Cow<'a, str>,
        #[serde(default)]
        protocol: Option<serde_json::Value>,
    }
    let tag = serde_json::from_str::<Tag>(text).ok()?;
    (tag.kind == "hello").then(|| tag.protocol.and_then(|p| p.as_u64()))
}

/// Count a frame that failed to decode and pick the close code for it.
fn rejected(gw: &Services, peer: SocketAddr, e: &FrameError) -> u16 {
    tracing::warn!(%peer, error = %e, "rejected frame; closing");
    match e {
        FrameError::TooBig { .. } => {
            Metrics::inc(&gw.metrics.frames_too_big);
            close::TOO_BIG
        }
        FrameError::Malformed(_) => {
            Metrics::inc(&gw.metrics.frames_malformed);
            close::MALFORMED
        }
    }
}

async fn reject_frame(gw: &Services, socket: &mut WebSocket, peer: SocketAddr, e: &FrameError) {
    let code = rejected(gw, peer, e);
    close_now(socket, code, &e.to_string()).await;
}

fn validate_hello(h: &Hello) -> Result<(), String> {
    if !valid_fingerprint(&h.fingerprint) {
        return Err(format!(
            "fingerprint {:?} is not a lowercase UUID",
            h.fingerprint
        ));
    }
    let problems = h.problems();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// Drain `rx` into the socket until a close frame was sent, the queue is empty after
/// `stop`, or the agent stops taking data for [`WRITE_DEADLINE`].
fn spawn_writer(
    mut sink: futures_util::stream::SplitSink<WebSocket, Message>,
    mut rx: mpsc::Receiver<Outbound>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(
        async move {
            loop {
                let out = tokio::select! {
                    biased;
                    out = rx.recv() => match out { Some(o) => o, None => break },
                    _ = stop.cancelled() => break,
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
    )
}

async fn authenticated(
    gw: Arc<Services>,
    socket: WebSocket,
    peer: SocketAddr,
    hello: Hello,
    auth: crate::credentials::Authenticated,
) {
    let fp = hello.fingerprint.clone();
    // A newly enrolled agent stores its secret before it sends anything else, so its
    // next frame (or ping) confirms the enrollment.
    let mut unconfirmed = auth.new_secret.is_some();
    let agent = AgentRef {
        tenant: auth.tenant.clone(),
        fingerprint: fp.clone(),
    };
    let (sink, mut stream) = socket.split();
    let (tx, rx) = mpsc::channel::<Outbound>(OUTBOUND_QUEUE);
    let handle = SessionHandle {
        conn_id: gw.hub.new_conn_id(),
        tx: tx.clone(),
        replaced: CancellationToken::new(),
        pending: Default::default(),
    };
    let writer_stop = CancellationToken::new();
    let writer = spawn_writer(sink, rx, writer_stop.clone());

    gw.hub.register(&fp, handle.clone());
    let holder = gw.registry.me.holder(handle.conn_id);
    let peer_text = peer.to_string();
    let claimed = gw
        .registry
        .connected(&agent.tenant, &hello, &peer_text, handle.conn_id);
    let was_online = match Box::pin(claimed).await {
        Ok(was_online) => was_online,
        Err(e) => {
            Metrics::inc(&gw.metrics.bus_errors);
            tracing::error!(error = %e, "cannot record the agent in the fleet registry; closing so it retries");
            let _ = tx
                .send(Outbound::Close(
                    close::GOING_AWAY,
                    "bus unavailable; retry later".into(),
                ))
                .await;
            drop(tx);
            writer_stop.cancel();
            let _ = tokio::time::timeout(WRITE_DEADLINE, writer).await;
            gw.hub.unregister(&fp, handle.conn_id);
            return;
        }
    };
    // An event is a change: an agent that was online (a reconnect within the grace, a
    // session rotation, a move to this gateway) stays online without one.
    if !was_online {
        Box::pin(publish_presence(
            &*gw.bus,
            &gw.metrics,
            &agent,
            Presence::Online,
            "connected",
        ))
        .await;
    }
    // Run-now calls from any gateway of the fleet reach this session through NATS.
    let _rpc = match &gw.nats {
        Some(nats) => Some(
            Box::pin(crate::nats::rpc::serve_agent(
                nats.clone(),
                &agent,
                gw.runnow(),
            ))
            .await,
        ),
        None => None,
    };
    tracing::info!(%peer, version = ?hello.agent_version, enrolled = auth.new_secret.is_some(), "agent connected");

    let mut catalog_rx = gw.checks.subscribe();
    let config = AgentConfig::of(&gw.checks.current(), &hello);
    let mut sent_hash = config.hash.clone();
    let welcome = GatewayFrame::Welcome(Welcome {
        protocol: PROTOCOL_VERSION,
        gateway_version: GATEWAY_VERSION.into(),
        agent_secret: auth.new_secret,
        config_hash: sent_hash.clone(),
        heartbeat_secs: gw.settings.heartbeat.as_secs(),
        last_seq: Box::pin(gw.bus.last_seq(&agent)).await.unwrap_or(0),
        fallback_addrs: gw
            .settings
            .fallback_addrs
            .iter()
            .map(|a| a.to_string())
            .collect(),
        max_session_secs: gw.settings.max_session.as_secs(),
    });
    let _ = tx.send(Outbound::frame(welcome)).await;
    if hello.config_hash.as_deref() != Some(sent_hash.as_str()) {
        Box::pin(send_config(&gw, &tx, &fp, config)).await;
    } else {
        gw.registry.set_checks(&fp, config.checks);
    }
    if let Some(version) = Box::pin(crate::rollout::load(&gw.settings.releases_dir))
        .await
        .and_then(|r| r.version_for(&fp, &hello.groups).map(str::to_string))
        .filter(|v| *v != hello.agent_version)
    {
        tracing::info!(%peer, from = ?hello.agent_version, to = %version, "offering an agent update");
        let offer = GatewayFrame::Update(outpost_protocol::UpdateOffer { version });
        let _ = tx.send(Outbound::frame(offer)).await;
    }

    // A silent peer for three heartbeats is gone (half-open connections included).
    let idle = gw.settings.heartbeat * 3;
    let mut last_acked = 0u64;
    let mut limiter = crate::rate::Limiter::new(gw.settings.agent_rate, std::time::Instant::now());
    let mut held_until: Option<tokio::time::Instant> = None;
    let end = loop {
        let msg = tokio::select! {
            m = tokio::time::timeout(idle, stream.next()) => m,
            _ = handle.replaced.cancelled() => {
                let _ = tx.send(Outbound::Close(close::REPLACED, "replaced by a newer connection".into())).await;
                break End::Replaced;
            }
            _ = gw.shutdown.cancelled() => {
                // Spread the agents' return (to another gateway behind the load balancer,
                // or this one restarted) over half the grace period.
                let spread = (gw.settings.grace / 2).min(std::time::Duration::from_secs(30));
                let later = come_back_later("gateway draining", std::time::Duration::ZERO, spread);
                let _ = tx.send(Outbound::frame(later)).await;
                let _ = tx.send(Outbound::Close(close::GOING_AWAY, "gateway shutting down; reconnect later".into())).await;
                break End::Shutdown;
            }
            changed = catalog_rx.changed() => {
                if changed.is_ok() {
                    let config = AgentConfig::of(&catalog_rx.borrow_and_update(), &hello);
                    if config.hash != sent_hash {
                        sent_hash = config.hash.clone();
                        Box::pin(send_config(&gw, &tx, &fp, config)).await;
                    }
                }
                continue;
            }
        };
        let msg = match msg {
            Err(_) => break End::Lost(format!("no frame or ping for {}s", idle.as_secs())),
            Ok(None) => break End::Lost("connection closed without bye".into()),
            Ok(Some(Err(e))) => {
                if let Some((code, why)) = bad_read(&e) {
                    count_bad_read(&gw, code);
                    tracing::warn!(%peer, error = why, "bad frame; closing");
                    let _ = tx.send(Outbound::Close(code, why.into())).await;
                    break End::Lost(format!("refused: {why}"));
                }
                break End::Lost(format!("read error: {e}"));
            }
            Ok(Some(Ok(m))) => m,
        };
        gw.registry.seen(&fp);
        if unconfirmed && !matches!(msg, Message::Close(_)) {
            Box::pin(gw.credentials.confirmed(&fp)).await;
            unconfirmed = false;
        }
        let text = match msg {
            Message::Text(t) => t,
            Message::Ping(_) | Message::Pong(_) => continue,
            Message::Close(_) => break End::Lost("closed without bye".into()),
            Message::Binary(_) => {
                break refuse(
                    &tx,
                    &gw.metrics.frames_malformed,
                    close::MALFORMED,
                    "binary frames are not part of outpost.v1",
                )
                .await;
            }
        };
        let frame = match decode_agent_frame(text.as_str()) {
            Ok(f) => f,
            Err(e) => {
                let code = rejected(&gw, peer, &e);
                let _ = tx.send(Outbound::Close(code, e.to_string())).await;
                break End::Lost(format!("sent a bad frame: {e}"));
            }
        };
        match frame {
            AgentFrame::Results(batch) => {
                if let Some(why) = batch.problem() {
                    break refuse(&tx, &gw.metrics.frames_malformed, close::MALFORMED, &why).await;
                }
                // An agent ahead of its rate has its ack held: it sends its next batch
                // only after the ack, so what it makes meanwhile waits on its disk. One
                // that sends again without waiting is read no further until then.
                if let Some(until) = held_until.take() {
                    tokio::select! {
                        _ = tokio::time::sleep_until(until) => {}
                        _ = gw.shutdown.cancelled() => {}
                    }
                }
                // The hold counts from when the batch was read, so publishing time is
                // part of it and the ack still comes within MAX_HOLD of the agent's send.
                let read_at = tokio::time::Instant::now();
                let hold = limiter.hold_for(batch.results.len(), text.len(), read_at.into_std());
                let published = tokio::time::timeout(
                    BUS_DEADLINE,
                    gw.bus.publish_results(&agent, &batch.results),
                )
                .await
                .unwrap_or_else(|_| {
                    Err(crate::bus::BusError::Io(std::io::Error::other(format!(
                        "no answer from the bus within {}s",
                        BUS_DEADLINE.as_secs()
                    ))))
                });
                match published {
                    Ok(p) => {
                        gw.metrics
                            .results_accepted
                            .fetch_add(p.accepted as u64, std::sync::atomic::Ordering::Relaxed);
                        gw.metrics
                            .results_duplicate
                            .fetch_add(p.duplicates as u64, std::sync::atomic::Ordering::Relaxed);
                        gw.registry.record_results(&fp, &batch.results);
                        last_acked = batch.results.last().map(|r| r.seq).unwrap_or(last_acked);
                        let ack = Outbound::frame(GatewayFrame::Ack(Ack { seq: last_acked }));
                        let release = read_at + hold;
                        if release <= tokio::time::Instant::now() {
                            if tx.send(ack).await.is_err() {
                                break End::Lost("writer ended".into());
                            }
                        } else {
                            // Held off the reader, which goes on answering pings and
                            // run-now replies meanwhile. The results are durable already:
                            // if the session ends first, the agent's resend is a duplicate.
                            Metrics::inc(&gw.metrics.acks_held);
                            gw.metrics.ack_hold_ms.fetch_add(
                                hold.as_millis() as u64,
                                std::sync::atomic::Ordering::Relaxed,
                            );
                            held_until = Some(release);
                            let tx = tx.clone();
                            tokio::spawn(async move {
                                tokio::time::sleep_until(release).await;
                                let _ = tx.send(ack).await;
                            });
                        }
                    }
                    Err(e) => {
                        Metrics::inc(&gw.metrics.bus_errors);
                        tracing::error!(error = %e, "bus publish failed; closing so the agent resends later");
                        let _ = tx
                            .send(Outbound::Close(
                                close::GOING_AWAY,
                                "bus unavailable; retry later".into(),
                            ))
                            .await;
                        break End::Lost(format!("bus failure: {e}"));
                    }
                }
            }
            AgentFrame::RpcReply(reply) => {
                let waiter = lock(&handle.pending).remove(&reply.id);
                match waiter {
                    Some(w) => {
                        if let Some(result) = &reply.result {
                            // Its seq may be 0 (the agent could not queue it), not above
                            // the bound.
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
                                break refuse(
                                    &tx,
                                    &gw.metrics.frames_malformed,
                                    close::MALFORMED,
                                    &why,
                                )
                                .await;
                            }
                            gw.registry.record_results(&fp, std::iter::once(result));
                        }
                        let _ = w.send(reply);
                    }
                    None => tracing::debug!(
                        id = reply.id,
                        "rpc reply for a call nobody waits for (timed out?)"
                    ),
                }
            }
            AgentFrame::PluginRequest(req) => {
                let frame = Box::pin(plugin_frame(&gw, &req.sha256)).await;
                if tx.send(Outbound::frame(frame)).await.is_err() {
                    break End::Lost("writer ended".into());
                }
            }
            AgentFrame::Bye(bye) => {
                let _ = tx.send(Outbound::Close(1000, "bye".into())).await;
                // Kept in the registry and in presence events: bounded and printable.
                let reason = outpost_protocol::printable(&bye.reason, MAX_BYE_REASON_BYTES);
                break match bye.back_within_secs {
                    Some(secs) => End::Restarting(reason, secs),
                    None => End::Bye(reason),
                };
            }
            AgentFrame::Hello(_) => {
                break refuse(
                    &tx,
                    &gw.metrics.frames_out_of_order,
                    close::POLICY,
                    "hello may be sent only once",
                )
                .await;
            }
            AgentFrame::Unknown => {
                Metrics::inc(&gw.metrics.frames_unknown);
                let _ = tx
                    .send(Outbound::frame(GatewayFrame::Error(ErrorFrame {
                        code: "unknown_frame".into(),
                        message: "this gateway does not know that frame type; it was ignored"
                            .into(),
                    })))
                    .await;
            }
        }
    };
    drop(tx);
    drop(stream);
    // Whatever was queued (a close frame above all) goes out first; then the writer stops.
    writer_stop.cancel();
    let _ = tokio::time::timeout(WRITE_DEADLINE, writer).await;
    // Fail waiting run-now calls at once instead of letting them time out.
    lock(&handle.pending).clear();
    if !gw.hub.unregister(&fp, handle.conn_id) {
        tracing::info!("connection replaced by a newer one");
        return;
    }
    match end {
        End::Restarting(reason, secs) => {
            // Still online: lost only if no new connection has come by the window's end.
            let window = secs.clamp(1, outpost_protocol::MAX_RESTART_WINDOW_SECS);
            tracing::info!(%reason, window_secs = window, "agent restarting; online while it comes back");
            let lost = format!("did not come back within {window}s of restarting ({reason})");
            lost_unless_back(
                gw,
                agent,
                holder,
                std::time::Duration::from_secs(window),
                lost,
            );
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
                    .disconnected(&fp, Some(&holder), Presence::Deregistered, &reason);
            if Box::pin(ended).await {
                Box::pin(publish_presence(
                    &*gw.bus,
                    &gw.metrics,
                    &agent,
                    Presence::Deregistered,
                    &reason,
                ))
                .await;
            }
        }
        // Told to reconnect elsewhere: the agent stays online under this holder; if it
        // does not come back, the gateway that notices this one gone publishes it lost
        // after the grace (or this one, restarted).
        End::Shutdown => tracing::info!("session ended by the gateway's shutdown"),
        End::Replaced => tracing::info!("connection replaced by a newer one"),
    }
}

/// Publish the agent lost after `after` unless `holder` no longer holds it by then (a new
/// connection has claimed it, here or on another gateway).
fn lost_unless_back(
    gw: Arc<Services>,
    agent: AgentRef,
    holder: String,
    after: std::time::Duration,
    reason: String,
) {
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        if !crate::registry::lose(&gw.upkeep(), &agent, Some(&holder), &reason).await {
            tracing::info!(fingerprint = %agent.fingerprint, "grace over; a newer connection holds the agent, no change");
        }
    });
}

/// Count a frame that breaks the protocol, queue the close frame that says why, and end
/// the session as lost.
async fn refuse(
    tx: &mpsc::Sender<Outbound>,
    counter: &std::sync::atomic::AtomicU64,
    code: u16,
    why: &str,
) -> End {
    Metrics::inc(counter);
    tracing::warn!(code, error = %why, "refused a frame; closing");
    let _ = tx.send(Outbound::Close(code, why.to_string())).await;
    End::Lost(format!("refused: {why}"))
}

/// Longest `bye` reason kept, in bytes.
const MAX_BYE_REASON_BYTES: usize = 256;

/// The catalog plugin with content hash `sha256`, or an error frame saying why not.
async fn plugin_frame(gw: &Services, sha256: &str) -> GatewayFrame {
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
    let Some(entry) = gw.checks.current().plugin_by_hash(sha256).cloned() else {
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

/// What one agent runs: the checks and collectors targeted at it, and their hash.
struct AgentConfig {
    checks: Vec<CheckSpec>,
    collectors: Vec<CollectorSpec>,
    hash: String,
}

impl AgentConfig {
    fn of(catalog: &crate::checks::Catalog, hello: &Hello) -> AgentConfig {
        let checks = catalog.for_agent(&hello.labels, &hello.groups);
        let collectors = catalog.collectors_for_agent(&hello.labels, &hello.groups);
        let hash = config_hash_with_collectors(&checks, &collectors);
        AgentConfig {
            checks,
            collectors,
            hash,
        }
    }
}

async fn send_config(gw: &Services, tx: &mpsc::Sender<Outbound>, fp: &str, config: AgentConfig) {
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
        // The agent would refuse the frame and reconnect forever; keep it on its old config.
        Metrics::inc(&gw.metrics.configs_too_big);
        tracing::error!(checks = count, bytes = size, limit = MAX_FRAME_BYTES,
            "this agent's configuration does not fit in one frame; not sent (target fewer checks at it)");
        let _ = tx
            .send(Outbound::frame(GatewayFrame::Error(ErrorFrame {
                code: "config_too_big".into(),
                message: format!("your configuration of {count} checks is {size} bytes, over the {MAX_FRAME_BYTES}-byte frame limit; keeping the previous one"),
            })))
            .await;
        return;
    }
    gw.registry.set_checks(fp, checks);
    Metrics::inc(&gw.metrics.configs_sent);
    tracing::info!(checks = count, %hash, "sending config");
    let _ = tx.send(Outbound::frame(frame)).await;
}
