//! The load generator: many simulated agents in this process, each one task holding one
//! TLS websocket to a gateway and speaking `outpost.v1` as the real agent does — `hello`
//! (with the enrollment key or a secret), `welcome`, a websocket ping every heartbeat,
//! optionally `results` batches one at a time (the next one once the previous is acked,
//! and no sooner than a pace when one is given), and an `rpc_reply` with a result for
//! every `rpc_request`, at once.
//!
//! A [`Script`] decides what a fleet's results say (a status per agent, switched by the
//! benchmark while the fleet runs) and can make every agent send its next batch at once.
//!
//! What it is not: an agent. It runs no checks and keeps nothing on disk; an enrollment's
//! secret lives in the task. Its own footprint is kept small (one task per agent, 4 KiB
//! websocket read buffers, no write buffering) so that it can hold tens of thousands of
//! connections beside the gateway it measures.
//!
//! Connections come from many loopback source addresses (127.0.0.2 up to 127.0.0.251,
//! spread by agent) so that one destination port never runs out of ephemeral ports.

use outpost_sys::lock;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use outpost_protocol::{
    decode_gateway_frame, encode, AgentFrame, CheckResult, Credential, GatewayFrame, Hello,
    Results, RpcReply, PROTOCOL_VERSION, SUBPROTOCOL, WS_PATH,
};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

pub type Ws = WebSocketStream<TlsStream<TcpStream>>;

/// One simulated agent: who it is and how it proves it.
#[derive(Clone)]
pub struct Identity {
    pub fingerprint: String,
    pub credential: Credential,
}

/// What every simulated agent of a fleet does.
#[derive(Clone)]
pub struct Behaviour {
    /// Gateways to dial, in order: an agent starts with the first and, when its connection
    /// is lost, dials the next one (wrapping around), as agents given an address list do.
    pub addrs: Vec<SocketAddr>,
    /// The gateways' certificate pin (hex SHA-256 of the DER), as in the agent's config.
    pub pin: String,
    /// Results per `results` batch; 0 sends none (an idle agent).
    pub batch: usize,
    /// The least time from sending one batch to sending the next (`None`: as soon as the
    /// previous one is acked). The next batch still waits for the previous one's ack; the
    /// first one goes out at a random point of the first pace, to spread the agents.
    pub pace: Option<Duration>,
    /// Dial again after a lost connection or a failed dial, with the agent's backoff: a
    /// random delay up to `redial_jitter`, doubling after each failed dial (at most 30 s).
    pub redial: bool,
    pub redial_jitter: Duration,
    /// Most dials (TCP + TLS + websocket + hello/welcome) in progress at once.
    pub dial_concurrency: usize,
    /// The groups and features the agents say they have in their hello (`entity_slots`:
    /// the gateway may place checks about entities on them).
    pub groups: Vec<String>,
    pub features: Vec<String>,
}

/// What a scripted fleet's agents send, instead of the bench's OK result of check `sim`.
pub trait Batches: Send + Sync {
    /// The results of agent number `agent`'s next batch, numbered from `first_seq`: made
    /// just before the batch is sent (so the time it is made is the time it is sent).
    fn batch(&self, agent: usize, fingerprint: &str, first_seq: u64, n: usize) -> Vec<CheckResult>;
}

/// A fleet's script: what its batches say and, with `kick`, when every agent sends its
/// next batch out of its pace (each change of the value: at once if no batch awaits its
/// ack, else as soon as it is acked).
#[derive(Clone)]
pub struct Script {
    pub batches: Arc<dyn Batches>,
    pub kick: Option<watch::Receiver<u64>>,
}

/// Counters shared by the fleet's tasks and read by the benchmark.
#[derive(Default)]
pub struct Stats {
    /// Every `welcome` received (reconnections count again).
    pub welcomes: AtomicU64,
    /// Agents holding a welcomed session right now.
    pub online: AtomicI64,
    /// Agents that have been welcomed at least once.
    pub ever_online: AtomicU64,
    /// Results acked by the gateway.
    pub acked: AtomicU64,
    pub rpc_answered: AtomicU64,
    /// Dials or sessions that failed (connect, TLS, refusal, lost connection).
    pub failures: AtomicU64,
    /// Sessions lost after their welcome.
    pub lost: AtomicU64,
    /// While set, the time from sending each batch to its ack is kept (see
    /// [`Stats::take_ack_latencies`]).
    pub record_ack_latency: AtomicBool,
    ack_latency_us: Mutex<Vec<u32>>,
    first_error: Mutex<Option<String>>,
    /// Each agent's newest configuration: when it came, and its checks' names.
    configs: Mutex<HashMap<String, (Instant, Vec<String>)>>,
}

impl Stats {
    fn fail(&self, what: String) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let mut e = lock(&self.first_error);
        if e.is_none() {
            *e = Some(what);
        }
    }

    pub fn first_error(&self) -> Option<String> {
        lock(&self.first_error).clone()
    }

    /// Each agent's newest configuration (when it came, its checks' names), by fingerprint.
    pub fn configs(&self) -> HashMap<String, (Instant, Vec<String>)> {
        lock(&self.configs).clone()
    }

    pub fn online(&self) -> u64 {
        self.online.load(Ordering::Relaxed).max(0) as u64
    }

    /// The ack latencies kept so far, in µs (in the order the acks came), and forget them.
    pub fn take_ack_latencies(&self) -> Vec<u32> {
        std::mem::take(&mut *lock(&self.ack_latency_us))
    }

    fn ack_latency(&self, took: Duration) {
        if self.record_ack_latency.load(Ordering::Relaxed) {
            let us = u32::try_from(took.as_micros()).unwrap_or(u32::MAX);
            lock(&self.ack_latency_us).push(us);
        }
    }
}

/// The TLS client configuration of the fleet: the agent's own, trusting `pin`.
fn connector(pin: &str) -> Result<TlsConnector> {
    let config =
        outpost_agent::tls::client_config(&outpost_agent::settings::Trust::Pin(pin.to_string()))?;
    Ok(TlsConnector::from(config))
}

/// Small buffers: tens of thousands of these live in one process.
pub fn small_ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(outpost_protocol::MAX_FRAME_BYTES))
        .max_frame_size(Some(outpost_protocol::MAX_FRAME_BYTES))
}

/// The loopback source address of agent `i`: 127.0.0.2 to 127.0.0.251.
pub fn source_addr(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i % 250) as u8))
}

/// TCP from `src` (port chosen by the kernel) to `dst`, then TLS.
pub async fn tls_connect(
    tls: &TlsConnector,
    src: IpAddr,
    dst: SocketAddr,
) -> Result<TlsStream<TcpStream>> {
    let socket = TcpSocket::new_v4().context("cannot create a socket")?;
    socket
        .bind(SocketAddr::new(src, 0))
        .with_context(|| format!("cannot bind {src}"))?;
    let tcp = socket
        .connect(dst)
        .await
        .with_context(|| format!("cannot connect to {dst}"))?;
    let _ = tcp.set_nodelay(true);
    let name = rustls::pki_types::ServerName::try_from("localhost")
        .map_err(|e| anyhow!("bad server name: {e}"))?;
    tls.connect(name, tcp)
        .await
        .with_context(|| format!("TLS handshake with {dst} failed"))
}

async fn open_ws(tls: &TlsConnector, src: IpAddr, dst: SocketAddr) -> Result<Ws> {
    let stream = tls_connect(tls, src, dst).await?;
    let mut req = format!("wss://{dst}{WS_PATH}").into_client_request()?;
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", SUBPROTOCOL.parse()?);
    let (ws, _) = tokio_tungstenite::client_async_with_config(req, stream, Some(small_ws_config()))
        .await
        .with_context(|| format!("websocket upgrade at {dst} failed"))?;
    Ok(ws)
}

fn hello(id: &Identity, b: &Behaviour) -> String {
    encode(&AgentFrame::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        fingerprint: id.fingerprint.clone(),
        credential: id.credential.clone(),
        agent_version: "loadgen".into(),
        os: "linux".into(),
        arch: std::env::consts::ARCH.into(),
        hostname: format!("sim-{}", &id.fingerprint[..8]),
        labels: Default::default(),
        groups: b.groups.clone(),
        config_hash: None,
        features: b.features.clone(),
    }))
}

/// The result the fleet sends and answers run-now calls with: the bench's realistic
/// result (about 300 bytes of JSON).
pub fn result(check: &str, seq: u64) -> CheckResult {
    let now = crate::now_ms();
    let mut r = crate::outbox::sample_result(check, now, seq);
    r.seq = seq;
    r
}

/// What ended a session.
enum SessionEnd {
    Stopped,
    Lost(String),
}

/// Dial, say hello, and wait for `welcome`; returns the socket, the heartbeat and the
/// highest sequence number the bus holds for the agent.
async fn handshake(
    tls: &TlsConnector,
    src: IpAddr,
    dst: SocketAddr,
    id: &mut Identity,
    b: &Behaviour,
) -> Result<(Ws, Duration, u64)> {
    let mut ws = open_ws(tls, src, dst).await?;
    ws.send(Message::Text(hello(id, b).into())).await?;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(60), ws.next())
            .await
            .map_err(|_| anyhow!("no welcome from {dst} within 60 s"))?;
        let text = match msg {
            None => bail!("{dst} closed the connection before welcome"),
            Some(Err(e)) => bail!("{dst} failed before welcome: {e}"),
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(c))) => bail!("{dst} closed before welcome: {c:?}"),
            Some(Ok(_)) => continue,
        };
        match decode_gateway_frame(text.as_str())? {
            GatewayFrame::Welcome(w) => {
                if let Some(secret) = w.agent_secret {
                    id.credential = Credential::Secret { secret };
                }
                return Ok((ws, Duration::from_secs(w.heartbeat_secs.max(1)), w.last_seq));
            }
            GatewayFrame::Error(e) => bail!("{dst} refused the agent: {}: {}", e.code, e.message),
            GatewayFrame::Reconnect(r) => bail!("{dst} said come back later: {}", r.reason),
            _ => continue,
        }
    }
}

/// Who is speaking, for a script: the agent's number (its place in its fleet plus the
/// fleet's offset) and its fingerprint.
struct Speaker<'a> {
    agent: usize,
    fingerprint: &'a str,
    script: Option<&'a Script>,
}

impl Speaker<'_> {
    fn batch_frame(&self, first_seq: u64, n: usize) -> String {
        let results = match self.script {
            Some(s) => s.batches.batch(self.agent, self.fingerprint, first_seq, n),
            None => (0..n as u64)
                .map(|i| result("sim", first_seq + i))
                .collect(),
        };
        encode(&AgentFrame::Results(Results { results }))
    }
}

/// The next kick of a script (never, without one; a script gone kicks no more).
async fn kicked(kick: &mut Option<watch::Receiver<u64>>) {
    let Some(k) = kick.as_mut() else {
        return std::future::pending().await;
    };
    if k.changed().await.is_err() {
        *kick = None;
        std::future::pending::<()>().await;
    }
}

/// One welcomed session, until it is lost or the fleet stops.
async fn session(
    mut ws: Ws,
    (heartbeat, last_seq): (Duration, u64),
    me: &Speaker<'_>,
    b: &Behaviour,
    stats: &Stats,
    stop: &CancellationToken,
) -> SessionEnd {
    use tokio::time::Instant as TokioInstant;
    let mut kick = me.script.and_then(|s| s.kick.clone());
    if let Some(k) = kick.as_mut() {
        // Only kicks from now on.
        k.borrow_and_update();
    }
    // Kicked while a batch awaited its ack: the next goes out with the ack.
    let mut kicked_in_flight = false;
    let mut ping = tokio::time::interval_at(TokioInstant::now() + heartbeat, heartbeat);
    let mut next_seq = last_seq + 1;
    // The batch awaiting its ack: its last sequence number and when it was sent.
    let mut in_flight: Option<(u64, TokioInstant)> = None;
    // When the next batch goes out, if it waits for its pace.
    let mut due: Option<TokioInstant> = None;
    if b.batch > 0 {
        match b.pace {
            Some(pace) => due = Some(TokioInstant::now() + pace.mul_f64(rand::random::<f64>())),
            None => {
                let frame = me.batch_frame(next_seq, b.batch);
                next_seq += b.batch as u64;
                in_flight = Some((next_seq - 1, TokioInstant::now()));
                if let Err(e) = ws.send(Message::Text(frame.into())).await {
                    return SessionEnd::Lost(format!("send failed: {e}"));
                }
            }
        }
    }
    // Never fires: the pace branch is off while nothing is due.
    let far = || TokioInstant::now() + Duration::from_secs(86_400);
    loop {
        let msg = tokio::select! {
            biased;
            _ = stop.cancelled() => {
                let bye = encode(&AgentFrame::Bye(outpost_protocol::Bye::stopping("load generator done")));
                let _ = tokio::time::timeout(Duration::from_secs(2), ws.send(Message::Text(bye.into()))).await;
                return SessionEnd::Stopped;
            }
            _ = kicked(&mut kick), if b.batch > 0 => {
                if in_flight.is_some() {
                    kicked_in_flight = true;
                    continue;
                }
                due = None;
                let frame = me.batch_frame(next_seq, b.batch);
                next_seq += b.batch as u64;
                in_flight = Some((next_seq - 1, TokioInstant::now()));
                if let Err(e) = ws.send(Message::Text(frame.into())).await {
                    return SessionEnd::Lost(format!("send failed: {e}"));
                }
                continue;
            }
            _ = tokio::time::sleep_until(due.unwrap_or_else(far)), if due.is_some() => {
                due = None;
                let frame = me.batch_frame(next_seq, b.batch);
                next_seq += b.batch as u64;
                in_flight = Some((next_seq - 1, TokioInstant::now()));
                if let Err(e) = ws.send(Message::Text(frame.into())).await {
                    return SessionEnd::Lost(format!("send failed: {e}"));
                }
                continue;
            }
            m = ws.next() => m,
            _ = ping.tick() => {
                if let Err(e) = ws.send(Message::Ping(Vec::new().into())).await {
                    return SessionEnd::Lost(format!("ping failed: {e}"));
                }
                continue;
            }
        };
        let text = match msg {
            None => return SessionEnd::Lost("connection closed".into()),
            Some(Err(e)) => return SessionEnd::Lost(format!("read failed: {e}")),
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(c))) => return SessionEnd::Lost(format!("closed: {c:?}")),
            Some(Ok(_)) => continue,
        };
        let reply = match decode_gateway_frame(text.as_str()) {
            Ok(GatewayFrame::Ack(a)) => match in_flight {
                Some((last, sent_at)) if a.seq >= last => {
                    let now = TokioInstant::now();
                    stats.ack_latency(now.duration_since(sent_at));
                    stats.acked.fetch_add(b.batch as u64, Ordering::Relaxed);
                    in_flight = None;
                    let pace_at = b.pace.map(|p| sent_at + p).filter(|at| *at > now);
                    if let (Some(at), false) = (pace_at, kicked_in_flight) {
                        due = Some(at);
                        continue;
                    }
                    kicked_in_flight = false;
                    due = None;
                    let frame = me.batch_frame(next_seq, b.batch);
                    next_seq += b.batch as u64;
                    in_flight = Some((next_seq - 1, now));
                    frame
                }
                _ => continue,
            },
            Ok(GatewayFrame::RpcRequest(req)) => {
                let outpost_protocol::RpcCall::RunCheck { check } = req.call;
                stats.rpc_answered.fetch_add(1, Ordering::Relaxed);
                encode(&AgentFrame::RpcReply(RpcReply {
                    id: req.id,
                    result: Some(result(&check, 0)),
                    error: None,
                }))
            }
            Ok(GatewayFrame::Reconnect(r)) => {
                return SessionEnd::Lost(format!("told to reconnect: {}", r.reason))
            }
            Ok(GatewayFrame::Config(c)) => {
                let names = c.checks.into_iter().map(|c| c.name).collect();
                lock(&stats.configs).insert(me.fingerprint.to_string(), (Instant::now(), names));
                continue;
            }
            Ok(_) => continue,
            Err(e) => return SessionEnd::Lost(format!("bad frame from the gateway: {e}")),
        };
        if let Err(e) = ws.send(Message::Text(reply.into())).await {
            return SessionEnd::Lost(format!("send failed: {e}"));
        }
    }
}

/// Simulated agent number `i` of its fleet (connecting from [`source_addr`]`(i + offset)`):
/// dial (through the fleet's dial limit), run sessions until `stop`.
#[allow(clippy::too_many_arguments)]
async fn agent(
    i: usize,
    offset: usize,
    mut id: Identity,
    b: Arc<Behaviour>,
    script: Option<Script>,
    tls: TlsConnector,
    dials: Arc<Semaphore>,
    stats: Arc<Stats>,
    stop: CancellationToken,
) {
    let src = source_addr(i + offset);
    let mut addr_index = 0usize;
    let mut welcomed_once = false;
    let mut failed_dials = 0u32;
    loop {
        let dst = b.addrs[addr_index % b.addrs.len()];
        let dialled = {
            let Ok(_permit) = dials.acquire().await else {
                return;
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                r = handshake(&tls, src, dst, &mut id, &b) => r,
            }
        };
        let end = match dialled {
            Ok((ws, heartbeat, last_seq)) => {
                failed_dials = 0;
                stats.welcomes.fetch_add(1, Ordering::Relaxed);
                stats.online.fetch_add(1, Ordering::Relaxed);
                if !welcomed_once {
                    welcomed_once = true;
                    stats.ever_online.fetch_add(1, Ordering::Relaxed);
                }
                let me = Speaker {
                    agent: i + offset,
                    fingerprint: &id.fingerprint,
                    script: script.as_ref(),
                };
                let end = session(ws, (heartbeat, last_seq), &me, &b, &stats, &stop).await;
                stats.online.fetch_sub(1, Ordering::Relaxed);
                end
            }
            Err(e) => {
                failed_dials = failed_dials.saturating_add(1);
                stats.fail(format!("{e:#}"));
                SessionEnd::Lost(String::new())
            }
        };
        match end {
            SessionEnd::Stopped => return,
            SessionEnd::Lost(why) => {
                if !why.is_empty() {
                    stats.lost.fetch_add(1, Ordering::Relaxed);
                }
                if !b.redial || stop.is_cancelled() {
                    if !why.is_empty() {
                        stats.fail(why);
                    }
                    return;
                }
                addr_index += 1;
                let ceiling = b
                    .redial_jitter
                    .saturating_mul(1 << failed_dials.min(6))
                    .min(Duration::from_secs(30));
                let wait = ceiling.mul_f64(rand::random::<f64>());
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// A running fleet of simulated agents.
pub struct Fleet {
    pub stats: Arc<Stats>,
    stop: CancellationToken,
    tasks: tokio::task::JoinSet<()>,
}

impl Fleet {
    /// Start one task per identity on `rt`; agent `i` connects from [`source_addr`]`(i +
    /// offset)`.
    pub fn start(
        rt: &tokio::runtime::Handle,
        ids: Vec<Identity>,
        offset: usize,
        behaviour: Behaviour,
    ) -> Result<Fleet> {
        Self::start_scripted(rt, ids, offset, behaviour, None)
    }

    /// [`Fleet::start`] with a script: the batches of the agent that connects from
    /// [`source_addr`]`(n)` are `script`'s for agent `n` (its place in `ids` plus `offset`,
    /// so that fleets started with distinct offsets number their agents apart).
    pub fn start_scripted(
        rt: &tokio::runtime::Handle,
        ids: Vec<Identity>,
        offset: usize,
        behaviour: Behaviour,
        script: Option<Script>,
    ) -> Result<Fleet> {
        if behaviour.addrs.is_empty() {
            bail!("the fleet has no gateway address to dial");
        }
        let tls = connector(&behaviour.pin)?;
        let dials = Arc::new(Semaphore::new(behaviour.dial_concurrency.max(1)));
        let b = Arc::new(behaviour);
        let stats = Arc::new(Stats::default());
        let stop = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        for (i, id) in ids.into_iter().enumerate() {
            tasks.spawn_on(
                agent(
                    i,
                    offset,
                    id,
                    b.clone(),
                    script.clone(),
                    tls.clone(),
                    dials.clone(),
                    stats.clone(),
                    stop.clone(),
                ),
                rt,
            );
        }
        Ok(Fleet { stats, stop, tasks })
    }

    /// How many agents it has.
    pub fn agents(&self) -> usize {
        self.tasks.len()
    }

    /// Wait until `n` agents are online, or `limit` passes; true if they are.
    pub fn wait_online(&self, n: u64, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.stats.online() >= n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stats.online() >= n
    }

    /// End every agent at once, without a `bye`: their connections drop as a crashed
    /// host's do, and the gateway finds them lost.
    pub fn crash(mut self, rt: &tokio::runtime::Handle) {
        self.tasks.abort_all();
        rt.block_on(async { while self.tasks.join_next().await.is_some() {} });
    }

    /// Say `bye` on every session and wait (up to `grace`) for the tasks to end.
    pub fn stop(mut self, rt: &tokio::runtime::Handle, grace: Duration) {
        self.stop.cancel();
        rt.block_on(async {
            let _ = tokio::time::timeout(grace, async {
                while self.tasks.join_next().await.is_some() {}
            })
            .await;
            self.tasks.abort_all();
        });
    }
}

/// A new lowercase UUID v4, the fingerprint format agents use.
pub fn fingerprint() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A runtime for the fleet and the clients of the fleet parts: two workers, as many as
/// the machine has cores.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the load generator's runtime")
}
