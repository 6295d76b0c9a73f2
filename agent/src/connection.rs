//! The link to the gateway: dial out (TCP, TLS, websocket with subprotocol `outpost.v1`),
//! say `hello`, take the `welcome` and any `config`, then send results in batches, delete
//! them from the outbox only when acked, answer run-now calls, ping on the heartbeat,
//! and say `bye` when stopping. Any break ends the session; [`Connection::run`] reconnects
//! with exponential backoff and full jitter. Checks never wait on any of this: they run on
//! their own schedule and their results wait in the outbox.
//!
//! The gateway's name is resolved on every dial; when DNS fails, the last address that
//! worked and the gateway's fallback addresses are tried (see [`crate::gateway_addr`]).
//! A session ends on purpose in two cases: the gateway sends `reconnect` (draining,
//! overloaded), and the agent dials again after the delay it asked for instead of the
//! backoff; or the session reached the gateway's maximum length (jittered), and the agent
//! opens a new session before it lets the old one go, so the gateway sees a replaced
//! connection, not a lost agent.

use outpost_sys::lock;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use outpost_protocol::{
    close, decode_gateway_frame, encode, AgentFrame, Bye, CheckResult, Credential, GatewayFrame,
    Hello, PluginRequest, Results, RpcCall, RpcError, RpcErrorCode, RpcReply, MAX_BATCH_RESULTS,
    MAX_FRAME_BYTES, PROTOCOL_VERSION, SUBPROTOCOL,
};
use rand::Rng;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::gateway_addr::{AddrBook, Via};
use crate::identity::Identity;
use crate::outbox::Outbox;
use crate::scheduler::Scheduler;
use crate::settings::Settings;
use crate::version::AGENT_VERSION;

const DIAL_DEADLINE: Duration = Duration::from_secs(10);
const WELCOME_DEADLINE: Duration = Duration::from_secs(10);
/// A batch not acked by then means the link or the gateway is stuck: reconnect.
const ACK_DEADLINE: Duration = Duration::from_secs(30);
/// A write the gateway has not taken by then means it stopped reading: reconnect.
const WRITE_DEADLINE: Duration = Duration::from_secs(15);
/// Run-now calls running at once; more are answered `busy` at once.
const MAX_RPCS_IN_FLIGHT: usize = 8;
/// A session that lasted this long resets the backoff.
const STABLE_SESSION: Duration = Duration::from_secs(30);
/// A restarting agent asks the gateway to wait for it this much longer than the trial.
const RESTART_SLACK_SECS: u64 = 30;

type Ws = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

pub struct Connection {
    pub settings: Arc<Settings>,
    pub identity: Identity,
    pub tls: Arc<rustls::ClientConfig>,
    pub outbox: Arc<dyn Outbox>,
    pub scheduler: Scheduler,
    /// The collectors the gateway declared for this agent.
    pub collectors: Arc<crate::collectors::Collectors>,
    /// Where the gateway was reached before, for when DNS fails.
    pub addrs: tokio::sync::Mutex<AddrBook>,
    /// The outbox's drop count when last reported, and whether that report was a warning.
    pub drops_reported: std::sync::Mutex<(u64, bool)>,
    /// Self-update: takes `update` offers and acks (see [`crate::update`]).
    pub updater: Arc<crate::update::Updater>,
}

/// Why a session ended.
#[derive(Debug)]
enum End {
    /// We were asked to stop and said bye.
    Stopped,
    /// Something broke; try again after the usual backoff.
    Retry(String),
    /// The gateway refused us; retrying soon will not help, so wait the longest backoff.
    Refused(String),
    /// The gateway asked us to come back after this delay (draining, overloaded).
    Later(Duration, String),
    /// The session reached its maximum length: open the next one, then drop this one.
    Rotate(Box<Ws>),
}

/// Exponential backoff with full jitter: a random delay in [0, min(cap, base * 2^n)].
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff {
            base,
            cap,
            attempt: 0,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(rand::thread_rng().gen_range(0.0..=1.0))
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

impl Connection {
    /// Keep a session with the gateway until `shutdown`.
    pub async fn run(&self, shutdown: CancellationToken) {
        let cap = Duration::from_secs(self.settings.reconnect_max_secs);
        let mut backoff = Backoff::new(Duration::from_millis(500), cap);
        let mut previous: Option<Box<Ws>> = None;
        loop {
            let started = Instant::now();
            let end = self.session(&shutdown, previous.take()).await;
            if started.elapsed() >= STABLE_SESSION {
                backoff.reset();
            }
            let delay = match end {
                End::Stopped => return,
                End::Rotate(ws) => {
                    tracing::info!("session reached its maximum length; opening the next one");
                    previous = Some(ws);
                    continue;
                }
                End::Later(d, why) => {
                    tracing::warn!(reason = %why, retry_in_ms = d.as_millis() as u64, pending = self.outbox.len(), "gateway asked this agent to come back later");
                    d
                }
                End::Retry(why) => {
                    let d = backoff.next_delay();
                    tracing::warn!(error = %why, retry_in_ms = d.as_millis() as u64, pending = self.outbox.len(), "gateway connection ended");
                    d
                }
                End::Refused(why) => {
                    tracing::error!(error = %why, retry_in_secs = cap.as_secs(), "gateway refused this agent; fix the configuration (it will retry)");
                    cap
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// Resolve the gateway (or fall back to cached addresses) and open a session with the
    /// first address that completes TCP, TLS (verifying the gateway's name) and the
    /// websocket handshake; queue an `outpost.dns` result when what DNS did changed.
    async fn dial(&self) -> Result<(Ws, SocketAddr, Via), String> {
        let s = &self.settings;
        let mut book = self.addrs.lock().await;
        let found = book.candidates(DIAL_DEADLINE).await;
        let mut errors = Vec::new();
        let mut connected = None;
        for (addr, via) in &found.addrs {
            match self.dial_addr(*addr).await {
                Ok(ws) => {
                    connected = Some((ws, *addr, *via));
                    break;
                }
                Err(e) => {
                    if found.addrs.len() > 1 {
                        tracing::warn!(address = %addr, via = ?via, error = %e, "cannot open a session at this address; trying the next");
                    }
                    errors.push(format!("{addr}: {e}"));
                }
            }
        }
        let report = book.report(
            found.resolve_error.as_deref(),
            connected.as_ref().map(|(_, a, v)| (*a, *v)),
        );
        drop(book);
        if let Some(r) = report {
            if let Err(e) = self.outbox.append(r) {
                tracing::error!(error = %e, "cannot queue the DNS result");
            }
        }
        if let Some(c) = connected {
            if let Some(err) = &found.resolve_error {
                tracing::warn!(host = %s.host, error = %err, address = %c.1, via = ?c.2, "cannot resolve the gateway; connected through a cached address");
            }
            return Ok(c);
        }
        let tried = errors.join("; ");
        Err(match found.resolve_error {
            Some(err) if found.addrs.is_empty() => format!(
                "cannot resolve {}: {err}; no address that worked before is known",
                s.host
            ),
            Some(err) => format!(
                "cannot resolve {}: {err}; no cached address worked ({tried})",
                s.host
            ),
            None => tried,
        })
    }

    async fn dial_addr(&self, addr: SocketAddr) -> Result<Ws, String> {
        let s = &self.settings;
        let tcp = tokio::time::timeout(DIAL_DEADLINE, TcpStream::connect(addr))
            .await
            .map_err(|_| "connecting timed out".to_string())?
            .map_err(|e| format!("cannot connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(s.host.clone())
            .map_err(|e| format!("gateway host {:?} is not a valid TLS name: {e}", s.host))?;
        let tls = tokio::time::timeout(
            DIAL_DEADLINE,
            TlsConnector::from(self.tls.clone()).connect(name, tcp),
        )
        .await
        .map_err(|_| "TLS handshake timed out".to_string())?
        .map_err(|e| {
            format!(
                "TLS handshake with {} failed (is the gateway's certificate trusted?): {e}",
                s.host
            )
        })?;
        let mut req = format!(
            "{}{}",
            s.gateway_url.trim_end_matches('/'),
            outpost_protocol::WS_PATH
        )
        .into_client_request()
        .map_err(|e| format!("bad gateway URL: {e}"))?;
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            SUBPROTOCOL
                .parse()
                .map_err(|_| "bad subprotocol header".to_string())?,
        );
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_FRAME_BYTES))
            .max_frame_size(Some(MAX_FRAME_BYTES));
        let (ws, resp) = tokio::time::timeout(
            DIAL_DEADLINE,
            tokio_tungstenite::client_async_with_config(req, tls, Some(config)),
        )
        .await
        .map_err(|_| "websocket handshake timed out".to_string())?
        .map_err(|e| format!("websocket handshake failed: {e}"))?;
        let proto = resp
            .headers()
            .get("Sec-WebSocket-Protocol")
            .and_then(|v| v.to_str().ok());
        if proto != Some(SUBPROTOCOL) {
            return Err(format!(
                "gateway did not accept subprotocol {SUBPROTOCOL} (answered {proto:?})"
            ));
        }
        Ok(ws)
    }

    fn hello(&self) -> Result<Hello, End> {
        let credential = match (self.identity.secret(), &self.settings.enroll_key) {
            (Some(secret), _) => Credential::Secret { secret },
            (None, Some(key)) => Credential::EnrollKey {
                key: key.clone(),
                proof: self.identity.enroll_proof.clone(),
            },
            (None, None) => {
                return Err(End::Refused(
                    "this agent has no secret yet and no enroll_key is configured; set enroll_key (or OUTPOST_ENROLL_KEY)".into(),
                ))
            }
        };
        Ok(Hello {
            protocol: PROTOCOL_VERSION,
            fingerprint: self.identity.fingerprint.clone(),
            credential,
            agent_version: AGENT_VERSION.into(),
            os: std::env::consts::OS.into(),
            arch: std::env::consts::ARCH.into(),
            hostname: self.settings.hostname.clone(),
            labels: self.settings.labels.clone(),
            groups: self.settings.groups.clone(),
            config_hash: self.scheduler.hash(),
            features: vec![outpost_protocol::FEATURE_ENTITY_SLOTS.into()],
        })
    }

    /// One session. `previous` is a session that reached its maximum length: it is let go
    /// once this one is welcomed (or failed), by which time the gateway has replaced it.
    async fn session(&self, shutdown: &CancellationToken, previous: Option<Box<Ws>>) -> End {
        let hello = match self.hello() {
            Ok(h) => h,
            Err(e) => return e,
        };
        let ws = tokio::select! {
            r = self.dial() => r,
            _ = shutdown.cancelled() => {
                // Stopping while rotating: the old session is still the agent's; say bye on it.
                if let Some(mut old) = previous.filter(|_| !self.updater.handing_over()) {
                    let bye = AgentFrame::Bye(Bye::stopping("agent stopping"));
                    let _ = send(&mut *old, Message::Text(encode(&bye).into())).await;
                    let _ = tokio::time::timeout(Duration::from_secs(2), SinkExt::close(&mut *old)).await;
                }
                return End::Stopped;
            }
        };
        let (mut ws, addr, via) = match ws {
            Ok(ws) => ws,
            Err(e) => return End::Retry(e),
        };
        if let Err(e) = send(
            &mut ws,
            Message::Text(encode(&AgentFrame::Hello(hello)).into()),
        )
        .await
        {
            return End::Retry(format!("cannot send hello: {e}"));
        }
        let welcome = match tokio::time::timeout(WELCOME_DEADLINE, next_frame(&mut ws)).await {
            Err(_) => return End::Retry("no welcome from the gateway in time".into()),
            Ok(Err(end)) => return end,
            Ok(Ok(GatewayFrame::Welcome(w))) => w,
            Ok(Ok(GatewayFrame::Reconnect(r))) => return come_back_later(&r),
            Ok(Ok(other)) => return End::Retry(format!("expected welcome, got {other:?}")),
        };
        drop(previous);
        if let Some(secret) = &welcome.agent_secret {
            if let Err(e) = self.identity.store_secret(secret) {
                // Without the secret this agent cannot reconnect; say so loudly.
                tracing::error!(error = %e, "cannot store the secret issued at enrollment");
                return End::Refused(format!("cannot store the agent secret: {e}"));
            }
            tracing::info!("enrolled with the gateway; secret stored");
        }
        if welcome.protocol != PROTOCOL_VERSION {
            return End::Refused(format!(
                "gateway speaks protocol {}, this agent speaks {}; upgrade the older side",
                welcome.protocol, PROTOCOL_VERSION
            ));
        }
        // Never number a result at or below what the bus already holds from us (state
        // restored from an old backup, a reinstall that kept the identity): it would be
        // taken for a resend and dropped.
        if let Err(e) = self.outbox.raise_seq_floor(welcome.last_seq) {
            return End::Retry(format!("cannot raise the sequence floor: {e}"));
        }
        tracing::info!(gateway_version = %welcome.gateway_version, %addr, "connected to gateway");
        self.updater.connected_to(addr);
        self.addrs
            .lock()
            .await
            .connected(addr, via, &welcome.fallback_addrs);
        // A new session: whatever the outbox dropped while it was in flight on the last
        // one and was never acked is lost, and counted in this report.
        self.outbox.session_ended(welcome.last_seq);
        self.report_drops();
        let heartbeat = Duration::from_secs(welcome.heartbeat_secs.clamp(1, 300));
        let rotate_at = (welcome.max_session_secs > 0).then(|| {
            let max = Duration::from_secs(welcome.max_session_secs);
            Instant::now() + max.mul_f64(rand::thread_rng().gen_range(0.5..=1.0))
        });
        // Checks about entities run only once this agent runs what the gateway wants it
        // to (now, or when the `config` that follows is applied): a check it had before
        // may be another agent's by now.
        let in_sync = self.scheduler.hash().as_deref() == Some(welcome.config_hash.as_str());
        self.scheduler.set_in_touch(in_sync);
        let end = self.connected(ws, heartbeat, rotate_at, shutdown).await;
        self.scheduler.set_in_touch(false);
        end
    }

    async fn connected(
        &self,
        ws: Ws,
        heartbeat: Duration,
        rotate_at: Option<Instant>,
        shutdown: &CancellationToken,
    ) -> End {
        let (mut sink, mut stream) = ws.split();
        let (reply_tx, mut reply_rx) = mpsc::channel::<RpcReply>(MAX_RPCS_IN_FLIGHT);
        let rpc_slots = Arc::new(tokio::sync::Semaphore::new(MAX_RPCS_IN_FLIGHT));
        let mut ping = tokio::time::interval(heartbeat);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let idle = heartbeat * 3;
        let mut last_heard = Instant::now();
        // The highest sequence number sent and waiting for an ack, and since when.
        let mut in_flight: Option<(u64, Instant)> = None;
        let mut acked = 0u64;
        // Plugins asked for and not yet received; forgotten on every heartbeat, so a failed
        // fetch is retried at that pace.
        let mut requested = std::collections::HashSet::new();
        if let Err(e) = self.request_plugins(&mut sink, &mut requested).await {
            return End::Retry(e);
        }
        loop {
            // Past its maximum length the session sends nothing new; once the last batch
            // is acked it hands over to the next one.
            let rotating = rotate_at.is_some_and(|t| Instant::now() >= t);
            // Run-now calls answer on this session: let them finish, within reason.
            let rpcs_done = (rpc_slots.available_permits() == MAX_RPCS_IN_FLIGHT
                && reply_rx.is_empty())
                || rotate_at.is_some_and(|t| t.elapsed() > ACK_DEADLINE);
            if rotating && in_flight.is_none() && rpcs_done {
                return match sink.reunite(stream) {
                    Ok(ws) => End::Rotate(Box::new(ws)),
                    Err(_) => End::Retry("cannot hand the session over".into()),
                };
            }
            if in_flight.is_none() {
                let batch = self.next_batch(acked);
                if let Some(last) = batch.last().map(|r| r.seq) {
                    let text = encode(&AgentFrame::Results(Results { results: batch }));
                    if let Err(e) = send(&mut sink, Message::Text(text.into())).await {
                        return End::Retry(format!("cannot send results: {e}"));
                    }
                    in_flight = Some((last, Instant::now()));
                }
            }
            let ack_due = in_flight.map(|(_, since)| since + ACK_DEADLINE);
            tokio::select! {
                _ = tokio::time::sleep_until(ack_due.unwrap_or_else(Instant::now).into()), if ack_due.is_some() => {
                    return End::Retry(format!("no ack within {}s", ACK_DEADLINE.as_secs()));
                }
                _ = tokio::time::sleep_until(rotate_at.unwrap_or_else(Instant::now).into()), if rotate_at.is_some() && !rotating => {}
                _ = tokio::time::sleep_until((rotate_at.unwrap_or_else(Instant::now) + ACK_DEADLINE).into()), if rotating && !rpcs_done => {}
                msg = stream.next() => {
                    last_heard = Instant::now();
                    let frame = match msg {
                        None => return End::Retry("gateway closed the connection".into()),
                        Some(Err(e)) => return End::Retry(format!("read error: {e}")),
                        Some(Ok(Message::Text(t))) => match decode_gateway_frame(t.as_str()) {
                            Ok(f) => f,
                            Err(e) => {
                                let _ = send(&mut sink, Message::Close(Some(CloseFrame { code: CloseCode::from(close::MALFORMED), reason: "malformed frame".into() }))).await;
                                return End::Retry(format!("gateway sent a bad frame: {e}"));
                            }
                        },
                        Some(Ok(Message::Close(c))) => return closed_by_gateway(c),
                        Some(Ok(Message::Binary(_))) => {
                            let _ = send(&mut sink, Message::Close(Some(CloseFrame { code: CloseCode::from(close::MALFORMED), reason: "binary frames are not part of outpost.v1".into() }))).await;
                            return End::Retry("gateway sent a binary frame".into());
                        }
                        Some(Ok(_)) => continue,
                    };
                    match frame {
                        GatewayFrame::Ack(a) => {
                            // Never delete more than was sent.
                            let sent = in_flight.map(|(s, _)| s).unwrap_or(acked);
                            if a.seq > sent {
                                tracing::warn!(ack = a.seq, sent, "gateway acked beyond what was sent; ignoring the excess");
                            }
                            let seq = a.seq.min(sent);
                            crate::outbox::blocking(|| self.outbox.ack(seq));
                            acked = acked.max(seq);
                            self.updater.on_ack(acked, || !self.scheduler.gateway_names().is_empty());
                            if in_flight.is_some_and(|(s, _)| a.seq >= s) {
                                in_flight = None;
                            }
                        }
                        GatewayFrame::Config(c) => {
                            let wanted = c.hash.clone();
                            self.scheduler.apply_config(c.hash, c.checks, c.collectors.clone());
                            let in_sync = self.scheduler.hash().as_deref() == Some(wanted.as_str());
                            self.scheduler.set_in_touch(in_sync);
                            self.collectors.apply_soon(c.collectors);
                            if let Err(e) = self.request_plugins(&mut sink, &mut requested).await {
                                return End::Retry(e);
                            }
                        }
                        GatewayFrame::Plugin(p) => {
                            use base64::Engine;
                            requested.remove(&p.sha256);
                            let stored = base64::engine::general_purpose::STANDARD
                                .decode(p.content_b64.as_bytes())
                                .map_err(|e| format!("plugin {} is not valid base64: {e}", p.name))
                                .and_then(|bytes| self.scheduler.install_plugin(&p.sha256, &bytes));
                            if let Err(e) = stored {
                                tracing::error!(plugin = %p.name, error = %e, "plugin from the gateway refused");
                            }
                        }
                        GatewayFrame::RpcRequest(req) => {
                            let Ok(slot) = rpc_slots.clone().try_acquire_owned() else {
                                let busy = RpcReply { id: req.id, result: None, error: Some(RpcError::new(
                                    RpcErrorCode::Busy,
                                    format!("{MAX_RPCS_IN_FLIGHT} run-now calls are already running on this agent"),
                                ))};
                                if let Err(e) = send(&mut sink, Message::Text(encode(&AgentFrame::RpcReply(busy)).into())).await {
                                    return End::Retry(format!("cannot send rpc reply: {e}"));
                                }
                                continue;
                            };
                            let scheduler = self.scheduler.clone();
                            let tx = reply_tx.clone();
                            tokio::spawn(async move {
                                let _slot = slot;
                                let RpcCall::RunCheck { check } = req.call;
                                let reply = match scheduler.run_now(&check).await {
                                    Ok(result) => RpcReply { id: req.id, result: Some(result), error: None },
                                    Err(error) => RpcReply { id: req.id, result: None, error: Some(error) },
                                };
                                let _ = tx.send(reply).await;
                            });
                        }
                        GatewayFrame::Error(e) => tracing::warn!(code = %e.code, message = %e.message, "gateway reported an error"),
                        GatewayFrame::Reconnect(r) => {
                            let _ = send(&mut sink, Message::Close(Some(CloseFrame { code: CloseCode::Normal, reason: "coming back later, as asked".into() }))).await;
                            return come_back_later(&r);
                        }
                        GatewayFrame::Update(offer) => self.updater.offer(offer.version),
                        GatewayFrame::Welcome(_) => tracing::warn!("ignoring a second welcome"),
                        GatewayFrame::Unknown => tracing::warn!("ignoring a frame type this agent does not know (is the gateway newer?)"),
                    }
                }
                Some(reply) = reply_rx.recv() => {
                    if let Err(e) = send(&mut sink, Message::Text(encode(&AgentFrame::RpcReply(reply)).into())).await {
                        return End::Retry(format!("cannot send rpc reply: {e}"));
                    }
                }
                _ = self.outbox.notify().notified(), if in_flight.is_none() => {}
                _ = ping.tick() => {
                    requested.clear();
                    if let Err(e) = self.request_plugins(&mut sink, &mut requested).await {
                        return End::Retry(e);
                    }
                    if last_heard.elapsed() > idle {
                        return End::Retry(format!("nothing heard from the gateway for {}s", idle.as_secs()));
                    }
                    if let Err(e) = send(&mut sink, Message::Ping(Vec::new().into())).await {
                        return End::Retry(format!("cannot send ping: {e}"));
                    }
                }
                _ = shutdown.cancelled() => {
                    let bye = if self.updater.handing_over() {
                        // Coming back as a new binary (or this one, rolled back) before the
                        // trial ends: not a deregistration, and not lost meanwhile.
                        Bye {
                            reason: "agent restarting for an update".into(),
                            back_within_secs: Some(crate::update::trial_deadline().as_secs() + RESTART_SLACK_SECS),
                        }
                    } else {
                        Bye::stopping("agent stopping")
                    };
                    let bye = AgentFrame::Bye(bye);
                    let _ = send(&mut sink, Message::Text(encode(&bye).into())).await;
                    // Give the gateway a moment to close its side so it records the bye.
                    let _ = tokio::time::timeout(Duration::from_secs(2), async {
                        while let Some(Ok(m)) = stream.next().await {
                            if m.is_close() { break; }
                        }
                    }).await;
                    let _ = tokio::time::timeout(Duration::from_secs(2), sink.close()).await;
                    tracing::info!(pending = self.outbox.len(), "said bye to the gateway");
                    return End::Stopped;
                }
            }
        }
    }

    /// Ask the gateway for every plugin the running checks need and do not have.
    async fn request_plugins<S>(
        &self,
        sink: &mut S,
        requested: &mut std::collections::HashSet<String>,
    ) -> Result<(), String>
    where
        S: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
    {
        for plugin in self.scheduler.missing_plugins() {
            if requested.insert(plugin.sha256.clone()) {
                tracing::info!(plugin = %plugin.name, sha256 = %plugin.sha256, "fetching plugin");
                let frame = AgentFrame::PluginRequest(PluginRequest {
                    sha256: plugin.sha256,
                });
                send(sink, Message::Text(encode(&frame).into()))
                    .await
                    .map_err(|e| format!("cannot request plugin: {e}"))?;
            }
        }
        Ok(())
    }

    /// On each new session: a WARNING result of `outpost.outbox` when the outbox dropped
    /// results since the last report, and an OK one on the session after that.
    fn report_drops(&self) {
        let mut reported = lock(&self.drops_reported);
        let (last, warned) = *reported;
        let now = self.outbox.dropped();
        let r = if now > last {
            *reported = (now, true);
            CheckResult::new(
                crate::outbox::OUTBOX_CHECK,
                outpost_protocol::Status::Warning,
                format!(
                    "the outbox was full while the gateway was out of reach: {} of the oldest results were dropped ({now} since the outbox was created); raise outbox_max_mb to keep more",
                    now - last
                ),
            )
        } else if warned {
            *reported = (now, false);
            CheckResult::new(
                crate::outbox::OUTBOX_CHECK,
                outpost_protocol::Status::Ok,
                "no results dropped since the last report",
            )
        } else {
            return;
        };
        drop(reported);
        let r = CheckResult {
            started_at_ms: crate::util::now_ms(),
            ..r
        };
        if let Err(e) = self.outbox.append(r) {
            tracing::error!(error = %e, "cannot queue the outbox report");
        }
    }

    /// The oldest unacked results, as many as fit in one frame.
    fn next_batch(&self, acked: u64) -> Vec<CheckResult> {
        let mut batch =
            crate::outbox::blocking(|| self.outbox.next_to_send(acked, MAX_BATCH_RESULTS));
        let too_big = |b: &[CheckResult]| {
            encode(&AgentFrame::Results(Results {
                results: b.to_vec(),
            }))
            .len()
                > MAX_FRAME_BYTES
        };
        // Results are cut to the protocol's bounds where they are made; one that still
        // breaks a bound would be refused by the gateway and block every result behind
        // it, so it goes without its details instead.
        for r in &mut batch {
            let problems = r.problems();
            if !problems.is_empty() {
                tracing::error!(check = %r.check, seq = r.seq, problems = ?problems, "result breaks the protocol's bounds; sending it without its details");
                *r = without_details(
                    r,
                    "result broke the protocol's bounds; its details were dropped",
                );
            }
        }
        let read = batch.len();
        while batch.len() > 1 && too_big(&batch) {
            batch.truncate(batch.len() / 2);
        }
        if let (true, Some(last)) = (batch.len() < read, batch.last()) {
            self.outbox.not_sent_after(last.seq);
        }
        if too_big(&batch) {
            // Results are bounded field by field so this cannot happen; if it ever did, a
            // result the gateway must refuse would block every result behind it.
            if let Some(r) = batch.first_mut() {
                tracing::error!(check = %r.check, seq = r.seq, "result too large for a frame; sending it without its details");
                *r = without_details(r, "result was too large to send; its details were dropped");
            }
        }
        batch
    }
}

/// `r` as an UNKNOWN result saying `why`, with nothing of what it found.
fn without_details(r: &CheckResult, why: &str) -> CheckResult {
    CheckResult {
        seq: r.seq,
        started_at_ms: r.started_at_ms,
        duration_ms: r.duration_ms,
        origin: r.origin,
        ..CheckResult::new(r.check.clone(), outpost_protocol::Status::Unknown, why)
    }
}

/// Send one message, giving up after [`WRITE_DEADLINE`].
async fn send<S>(sink: &mut S, msg: Message) -> Result<(), String>
where
    S: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    match tokio::time::timeout(WRITE_DEADLINE, sink.send(msg)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "the gateway took no data for {}s",
            WRITE_DEADLINE.as_secs()
        )),
    }
}

async fn next_frame(ws: &mut Ws) -> Result<GatewayFrame, End> {
    let mut error: Option<String> = None;
    loop {
        match ws.next().await {
            None => return Err(End::Retry("gateway closed the connection".into())),
            Some(Err(e)) => return Err(End::Retry(format!("read error: {e}"))),
            Some(Ok(Message::Text(t))) => match decode_gateway_frame(t.as_str()) {
                Ok(GatewayFrame::Error(e)) => error = Some(format!("{}: {}", e.code, e.message)),
                Ok(f) => return Ok(f),
                Err(e) => return Err(End::Retry(format!("gateway sent a bad frame: {e}"))),
            },
            Some(Ok(Message::Close(c))) => {
                return Err(match (closed_by_gateway(c), error) {
                    (End::Refused(_), Some(msg)) => End::Refused(msg),
                    (End::Retry(why), Some(msg)) => End::Retry(format!("{why}: {msg}")),
                    (end, _) => end,
                })
            }
            Some(Ok(_)) => {}
        }
    }
}

/// The delay a `reconnect` frame asks for: at random in its range, at most an hour.
fn come_back_later(r: &outpost_protocol::Reconnect) -> End {
    const LONGEST: u64 = 3_600_000;
    let hi = r.max_delay_ms.min(LONGEST);
    let lo = r.min_delay_ms.min(hi);
    let ms = rand::thread_rng().gen_range(lo..=hi);
    End::Later(Duration::from_millis(ms), r.reason.clone())
}

fn closed_by_gateway(c: Option<CloseFrame>) -> End {
    let Some(c) = c else {
        return End::Retry("gateway closed the connection".into());
    };
    let code = u16::from(c.code);
    let why = format!("gateway closed the connection ({code}: {})", c.reason);
    match code {
        close::UNAUTHORIZED | close::UNSUPPORTED => End::Refused(why),
        close::REVOKED => End::Refused(format!(
            "{why}: this agent was revoked by an administrator; it cannot log in again (to bring this host back, delete agent.finger and agent.secret from its state directory so it enrolls as a new agent)"
        )),
        _ => End::Retry(why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_jittered_and_capped() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let delays: Vec<Duration> = (0..50).map(|_| b.next_delay()).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)));
        assert!(delays[0] <= Duration::from_millis(100));
        let distinct: std::collections::HashSet<u128> =
            delays.iter().map(|d| d.as_micros()).collect();
        assert!(distinct.len() > 40, "delays are jittered");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
