//! Clients that ask for a release file and never read it, from one address, against a
//! gateway with a low file descriptor limit: the API and enrollment keep answering from
//! another address, the flood is refused before TLS, and the stalled downloads are closed
//! at the write deadline.
//!
//! Linux only: it reads the gateway's descriptors from /proc and dials from 127.0.0.2.
#![cfg(target_os = "linux")]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use outpost_e2e::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::Message;

/// The gateway's descriptor limit, soft and hard (so it cannot raise it).
const NOFILE: u64 = 512;
/// Dialers from the attacking address: each holds a stalled download, or dials again.
const ATTACKERS: usize = 300;
/// `--write-deadline-secs` for this test (30 by default).
const WRITE_DEADLINE_SECS: u64 = 3;
const ATTACKER_IP: &str = "127.0.0.2";
/// Larger than every buffer between the gateway and a client that never reads.
const RELEASE_BYTES: usize = 16 << 20;
/// What the API and an enrollment must answer within while the attack goes on.
const ANSWER: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Tally {
    dials: AtomicU64,
    /// Closed before the TLS handshake finished (the gateway refused the connection, or
    /// could not take it at all).
    refused: AtomicU64,
    /// Asked for the file and now never read.
    stalled: AtomicU64,
}

/// Raise this process's soft descriptor limit to its hard one: it holds every attacker's
/// socket.
fn raise_own_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and fill a plain struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// The process's resident memory in KiB.
fn rss_kib(pid: i32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// One stalled download from [`ATTACKER_IP`]: TLS, the request, and a receive buffer of
/// a few KiB that nobody reads.
async fn stall(addr: SocketAddr, tls: &TlsConnector) -> std::io::Result<TlsStream<TcpStream>> {
    let socket = TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    socket.bind(format!("{ATTACKER_IP}:0").parse().unwrap())?;
    let tcp = socket.connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut s = tls.connect(name, tcp).await?;
    s.write_all(b"GET /releases/9.9.9/big.bin HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await?;
    s.flush().await?;
    Ok(s)
}

/// Dial until `stop`, keeping every connection that got in (never read, never closed) in
/// `held`, and dialing again at once; after a refusal, again after a short pause.
async fn attacker(
    addr: SocketAddr,
    tls: TlsConnector,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    held: Arc<Mutex<Vec<TlsStream<TcpStream>>>>,
) {
    while !stop.load(Ordering::Relaxed) {
        tally.dials.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(Duration::from_secs(10), stall(addr, &tls)).await {
            Ok(Ok(s)) => {
                tally.stalled.fetch_add(1, Ordering::Relaxed);
                held.lock().unwrap().push(s);
            }
            _ => {
                tally.refused.fetch_add(1, Ordering::Relaxed);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Enroll a new agent with the tenant's key: the websocket after `welcome`, and how long
/// it took.
async fn enroll(
    gw: &Gateway,
) -> (
    tokio_tungstenite::WebSocketStream<TlsStream<TcpStream>>,
    Duration,
) {
    use futures_util::StreamExt;
    let start = Instant::now();
    let mut ws = raw_ws(gw).await;
    let hello = outpost_protocol::AgentFrame::Hello(outpost_protocol::Hello {
        protocol: outpost_protocol::PROTOCOL_VERSION,
        fingerprint: uuid_v4(),
        credential: outpost_protocol::Credential::EnrollKey {
            key: gw.enroll_key.clone(),
            proof: String::new(),
        },
        agent_version: "test".into(),
        os: "linux".into(),
        arch: "x86_64".into(),
        hostname: "slowread".into(),
        labels: Default::default(),
        groups: vec![],
        config_hash: None,
        features: vec![],
    });
    ws.send(Message::Text(outpost_protocol::encode(&hello).into()))
        .await
        .unwrap();
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                let frame: Value = serde_json::from_str(t.as_str()).unwrap();
                assert_eq!(frame["type"], "welcome", "{frame}");
                return (ws, start.elapsed());
            }
            Some(Ok(_)) => continue,
            other => panic!("enrollment ended without welcome: {other:?}"),
        }
    }
}

fn write_release(dir: &Path) -> std::path::PathBuf {
    let releases = dir.join("releases");
    std::fs::create_dir_all(releases.join("9.9.9")).unwrap();
    std::fs::write(releases.join("9.9.9/big.bin"), vec![0x5a; RELEASE_BYTES]).unwrap();
    releases
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_downloads_from_one_address_leave_the_api_and_enrollment_answering() {
    raise_own_nofile();
    let dir = tempdir();
    let releases = write_release(dir.path());
    let limit = format!("ulimit -n {NOFILE} && exec \"$0\" \"$@\"");
    let deadline = WRITE_DEADLINE_SECS.to_string();
    let gw = Gateway::start_wrapped(
        dir.path(),
        "127.0.0.1:0",
        &["sh", "-c", &limit],
        &[
            "--releases-dir",
            releases.to_str().unwrap(),
            "--write-deadline-secs",
            &deadline,
        ],
    );
    let pid = gw.proc.pid();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let nofile_line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert!(
        nofile_line
            .split_whitespace()
            .filter(|w| *w == "512")
            .count()
            == 2,
        "the gateway runs with {NOFILE} descriptors: {nofile_line}"
    );
    // The default cap follows the limit: a quarter of it.
    gw.proc
        .wait_for_log("max_unauthenticated=128", Duration::from_secs(5))
        .await;
    let baseline = open_fds(pid);
    let rss0 = rss_kib(pid);

    let config =
        outpost_agent::tls::client_config(&outpost_agent::settings::Trust::Pin(gw.pin.clone()))
            .unwrap();
    let tls = TlsConnector::from(config);
    let addr: SocketAddr = gw.addr.parse().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let held = Arc::new(Mutex::new(Vec::new()));
    let attackers: Vec<_> = (0..ATTACKERS)
        .map(|_| {
            tokio::spawn(attacker(
                addr,
                tls.clone(),
                stop.clone(),
                tally.clone(),
                held.clone(),
            ))
        })
        .collect();
    let peak = Arc::new(AtomicUsize::new(0));
    let peak_rss = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (peak, peak_rss, stop) = (peak.clone(), peak_rss.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(open_fds(pid), Ordering::Relaxed);
                peak_rss.fetch_max(rss_kib(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    eventually(Duration::from_secs(30), "every attacker dialed", || async {
        (tally.dials.load(Ordering::Relaxed) >= ATTACKERS as u64).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // While the attack goes on, over more than one write deadline: the API answers and
    // agents enroll, from another address.
    let mut agents = Vec::new();
    for round in 0..3 {
        let start = Instant::now();
        let (status, body) = tokio::time::timeout(
            ANSWER,
            gw.http("GET", "/api/v1/agents", Some(&gw.token)),
        )
        .await
        .unwrap_or_else(|_| {
            panic!(
                "round {round}: the API did not answer within {ANSWER:?} (gateway fds {}, log:\n{})",
                open_fds(pid),
                gw.proc.log()
            )
        });
        let api = start.elapsed();
        assert_eq!(status, 200, "{body}");
        assert_eq!(body.as_array().unwrap().len(), round);
        let (ws, took) = tokio::time::timeout(ANSWER, enroll(&gw))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "round {round}: no welcome within {ANSWER:?} (gateway fds {})",
                    open_fds(pid)
                )
            });
        agents.push(ws);
        eprintln!(
            "round {round}: API {api:?}, enrollment {took:?}; gateway fds {}, attackers stalled {} refused {}",
            open_fds(pid),
            tally.stalled.load(Ordering::Relaxed),
            tally.refused.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let refused = gw
        .metric("outpost_connections_refused_total{reason=\"per_address_limit\"}")
        .await;
    let cut = gw.metric("outpost_write_timeouts_total").await;
    assert!(refused > 0, "the flood from one address was refused");
    assert!(cut > 0, "stalled downloads were cut at the write deadline");

    // The attackers stop dialing but keep every connection open and unread: the gateway
    // closes its side of each at the write deadline and is back to its own descriptors
    // and the three agents.
    stop.store(true, Ordering::Relaxed);
    for a in attackers {
        a.await.unwrap();
    }
    sampler.await.unwrap();
    let held_now = held.lock().unwrap().len();
    let start = Instant::now();
    let fds = eventually(
        Duration::from_secs(WRITE_DEADLINE_SECS * 4),
        "the gateway closed the stalled downloads",
        || async {
            // Its own descriptors, the three agents, and the connection asking.
            let fds = open_fds(pid);
            let unauthenticated = gw.metric("outpost_connections_unauthenticated ").await;
            (fds <= baseline + agents.len() + 1 && unauthenticated <= 1).then_some(fds)
        },
    )
    .await;
    eprintln!(
        "attack: {} dials, {} stalled, {} refused at the client; gateway: baseline {baseline} fds and {rss0} KiB, peak {} fds and {} KiB, back to {fds} within {:?} of the attack's end with {held_now} stalled connections still open at the client; metrics: refused per address {refused}, write timeouts {cut}",
        tally.dials.load(Ordering::Relaxed),
        tally.stalled.load(Ordering::Relaxed),
        tally.refused.load(Ordering::Relaxed),
        peak.load(Ordering::Relaxed),
        peak_rss.load(Ordering::Relaxed),
        start.elapsed(),
    );
    // The enrolled agents gave their slots back (counted above) and, idle, were not cut
    // by the write deadline.
    assert_eq!(gw.metric("outpost_agents_connected").await, 3);
    drop(held);
    drop(agents);
}
