//! The two buses behind `outpost_gateway::bus::Bus` pass the same behavioural tests: the
//! embedded bus (files) and NATS JetStream (a real nats-server from the pinned PyPI
//! package). What is checked is read back from where each bus keeps it (the JSON-lines
//! file, the JetStream stream), not from what the bus said it did.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use outpost_e2e::nats::NatsServer;
use outpost_e2e::tempdir;
use outpost_gateway::bus::segments::{self, Retention};
use outpost_gateway::bus::{
    embedded::EmbeddedBus, AgentRef, AuditEvent, Bus, HistoryQuery, Presence, PresenceEvent,
};
use outpost_gateway::nats::bus::NatsBus;
use outpost_gateway::nats::{
    audit_subject, presence_subject, results_stream, results_subject, Nats, NatsSettings,
};
use outpost_protocol::CheckResult;

fn result(seq: u64) -> CheckResult {
    serde_json::from_value(serde_json::json!({
        "seq": seq, "check": "c", "status": "ok", "output": format!("run {seq}"),
        "started_at_ms": 1_700_000_000_000u64 + seq, "duration_ms": 1
    }))
    .unwrap()
}

fn results(seqs: std::ops::RangeInclusive<u64>) -> Vec<CheckResult> {
    seqs.map(result).collect()
}

/// The tenant whose results the embedded bus keeps in its own folder and NATS in
/// `OUTPOST_RESULTS` (the settings' default `--tenant`).
const HOME: &str = "default";

fn agent(n: u8) -> AgentRef {
    AgentRef {
        tenant: "default".into(),
        fingerprint: format!("0f8fad5b-d9cb-469f-a165-70867728950{n}"),
    }
}

#[allow(clippy::large_enum_variant)] // a handful, made once per test
enum Backend {
    Embedded(PathBuf, Retention),
    Nats(NatsSettings),
}

impl Backend {
    /// A bus instance, as a gateway (re)started on this backend opens it.
    async fn open(&self) -> Arc<dyn Bus> {
        match self {
            Backend::Embedded(dir, retention) => {
                Arc::new(EmbeddedBus::open(dir, *retention, HOME).await.unwrap().0)
            }
            Backend::Nats(s) => Arc::new(NatsBus::new(Arc::new(
                Nats::connect(s, "bus contract test").await.unwrap(),
            ))),
        }
    }

    /// The sequence numbers stored for `agent`, in stored order.
    async fn stored(&self, agent: &AgentRef) -> Vec<u64> {
        self.read(
            &results_subject(&agent.tenant, &agent.fingerprint),
            "results",
        )
        .await
        .iter()
        .filter(|v| v["fingerprint"] == agent.fingerprint.as_str())
        .map(|v| v["result"]["seq"].as_u64().unwrap())
        .collect()
    }

    async fn presence(&self, agent: &AgentRef) -> Vec<String> {
        self.read(
            &presence_subject(&agent.tenant, &agent.fingerprint),
            "presence",
        )
        .await
        .iter()
        .filter(|v| v["fingerprint"] == agent.fingerprint.as_str())
        .map(|v| v["presence"].as_str().unwrap().to_string())
        .collect()
    }

    /// Where `tenant`'s results are kept: its folder of the embedded bus, its NATS stream.
    fn results_of(&self, tenant: &str) -> (PathBuf, String) {
        let dir = match self {
            Backend::Embedded(dir, _) if tenant != HOME => dir.join("tenants").join(tenant),
            Backend::Embedded(dir, _) => dir.clone(),
            Backend::Nats(_) => PathBuf::new(),
        };
        let stream = match tenant {
            HOME => outpost_gateway::nats::RESULTS_STREAM.to_string(),
            t => outpost_gateway::nats::results_stream(t),
        };
        (dir, stream)
    }

    async fn read(&self, subject: &str, file: &str) -> Vec<serde_json::Value> {
        let tenant = subject.split('.').nth(1).unwrap_or(HOME);
        let (results_dir, results_stream) = self.results_of(tenant);
        match self {
            Backend::Embedded(_, _) if file == "results" => segments::read_all(&results_dir, file)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect(),
            Backend::Embedded(dir, _) => segments::read_all(dir, file)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect(),
            Backend::Nats(s) => {
                let client = async_nats::connect(s.urls[0].as_str()).await.unwrap();
                let js = async_nats::jetstream::new(client);
                let stream_name = match file {
                    "results" => results_stream.as_str(),
                    "audit" => outpost_gateway::nats::AUDIT_STREAM,
                    _ => outpost_gateway::nats::PRESENCE_STREAM,
                };
                let Ok(mut stream) = js.get_stream(stream_name).await else {
                    return Vec::new();
                };
                let info = stream.info().await.unwrap().state.clone();
                let mut out = Vec::new();
                for seq in info.first_sequence..=info.last_sequence {
                    let Ok(msg) = stream.get_raw_message(seq).await else {
                        continue;
                    };
                    // An agent's results are on a subject per check below its own.
                    let below = msg
                        .subject
                        .as_str()
                        .strip_prefix(subject)
                        .is_some_and(|rest| rest.starts_with('.'));
                    if msg.subject.as_str() == subject || below {
                        out.push((seq, serde_json::from_slice(&msg.payload).unwrap()));
                    }
                }
                // Messages are read one at a time while retention may drop the oldest:
                // what went meanwhile is left out, so the result is the stream as it is
                // at the end of the read (not older messages with a hole after them).
                let first_now = stream.info().await.unwrap().state.first_sequence;
                out.into_iter()
                    .filter(|(seq, _)| *seq >= first_now)
                    .map(|(_, v)| v)
                    .collect()
            }
        }
    }
}

/// The behaviour both buses promise.
async fn contract(backend: &Backend) {
    let (a, b) = (agent(1), agent(2));
    let bus = backend.open().await;
    assert_eq!(bus.last_seq(&a).await.unwrap(), 0);

    let p = bus.publish_results(&a, &results(1..=5)).await.unwrap();
    assert_eq!((p.accepted, p.duplicates), (5, 0));
    // A resend overlapping what is durable: only the new part is stored.
    let p = bus.publish_results(&a, &results(3..=7)).await.unwrap();
    assert_eq!((p.accepted, p.duplicates), (2, 3));
    let p = bus.publish_results(&b, &results(1..=2)).await.unwrap();
    assert_eq!((p.accepted, p.duplicates), (2, 0));
    assert_eq!(bus.last_seq(&a).await.unwrap(), 7);
    assert_eq!(bus.last_seq(&b).await.unwrap(), 2);

    for presence in [Presence::Online, Presence::Lost, Presence::Deregistered] {
        bus.publish_presence(&PresenceEvent {
            agent: a.clone(),
            presence,
            at_ms: 1,
            reason: "contract".into(),
        })
        .await
        .unwrap();
    }
    // Audit events, of a tenant and of none.
    for (tenant, reason) in [("acme", "role"), ("", "api_token")] {
        bus.publish_audit(&AuditEvent {
            tenant: tenant.into(),
            at_ms: 2,
            action: "refused".into(),
            reason: reason.into(),
            subject: "api GET /agents".into(),
            peer: Some("127.0.0.1:1".into()),
            gateway: "gw1".into(),
        })
        .await
        .unwrap();
    }
    drop(bus);

    // Another instance (a restarted gateway, or another gateway of the fleet) knows what
    // is durable without having seen it.
    let bus = backend.open().await;
    assert_eq!(bus.last_seq(&a).await.unwrap(), 7);
    let p = bus.publish_results(&a, &results(6..=9)).await.unwrap();
    assert_eq!((p.accepted, p.duplicates), (2, 2));

    assert_eq!(backend.stored(&a).await, (1..=9).collect::<Vec<_>>());
    assert_eq!(backend.stored(&b).await, vec![1, 2]);
    assert_eq!(
        backend.presence(&a).await,
        ["online", "lost", "deregistered"]
    );
    let audit: Vec<(String, String)> = [
        backend.read(&audit_subject("acme"), "audit").await,
        backend.read(&audit_subject(""), "audit").await,
    ]
    .concat()
    .iter()
    .map(|v| {
        (
            v["tenant"].as_str().unwrap().into(),
            v["reason"].as_str().unwrap().into(),
        )
    })
    .collect();
    // The embedded bus has one file for all (read twice): each event is there.
    assert!(audit.contains(&("acme".into(), "role".into())), "{audit:?}");
    assert!(
        audit.contains(&("".into(), "api_token".into())),
        "{audit:?}"
    );
    assert!(bus.unavailable().is_none());
}

/// Bytes of results the bus holds: its files, or the stream's own count.
async fn bytes_stored(backend: &Backend) -> u64 {
    tenant_bytes_stored(backend, HOME).await
}

/// Bytes of `tenant`'s results the bus holds: its files, or its stream's own count.
async fn tenant_bytes_stored(backend: &Backend, tenant: &str) -> u64 {
    let (dir, stream) = backend.results_of(tenant);
    match backend {
        Backend::Embedded(_, _) => segments::paths(&dir, "results")
            .unwrap()
            .iter()
            .map(|p| std::fs::metadata(p).unwrap().len())
            .sum(),
        Backend::Nats(s) => {
            let client = async_nats::connect(s.urls[0].as_str()).await.unwrap();
            let js = async_nats::jetstream::new(client);
            match js.get_stream(stream).await {
                Ok(mut stream) => stream.info().await.unwrap().state.bytes,
                Err(_) => 0,
            }
        }
    }
}

/// Whether the bus has a place for `tenant`'s results at all: its folder, its stream.
async fn results_kept_for(backend: &Backend, tenant: &str) -> bool {
    let (dir, stream) = backend.results_of(tenant);
    match backend {
        Backend::Embedded(..) => dir.exists(),
        Backend::Nats(s) => {
            let client = async_nats::connect(s.urls[0].as_str()).await.unwrap();
            async_nats::jetstream::new(client)
                .get_stream(stream)
                .await
                .is_ok()
        }
    }
}

fn tenant_agent(tenant: &str) -> AgentRef {
    AgentRef::new(tenant, "0f8fad5b-d9cb-469f-a165-708677289509")
}

/// Publish `n` batches of 50 results for `agent`, every one accepted.
async fn publish_batches(bus: &Arc<dyn Bus>, agent: &AgentRef, n: u64) {
    for batch in 0..n {
        let p = bus
            .publish_results(agent, &results(batch * 50 + 1..=batch * 50 + 50))
            .await
            .unwrap();
        assert_eq!(p.accepted, 50, "{agent:?}");
    }
}

/// The largest one segment can make a tenant exceed its limit by on the embedded bus
/// (NATS keeps to it exactly).
const SEGMENT_SLACK: u64 = 64 * 1024;

/// Each tenant's byte limit (`limits.bus_bytes`): beyond it that tenant's oldest results
/// go, leaving its newest as an unbroken run, and another tenant's never; a limit set on a
/// tenant already over it trims what is kept; a resend of a dropped result is still
/// refused; a deleted tenant's results are gone, the others' stay, and a tenant made again
/// under the name starts empty.
async fn tenant_bytes_contract(backend: &Backend) {
    const LIMIT: u64 = 128 * 1024;
    let bus = backend.open().await;
    let (small, big, home) = (tenant_agent("small"), tenant_agent("big"), agent(6));
    bus.keep_bytes("small", Some(LIMIT)).await.unwrap();
    publish_batches(&bus, &small, 40).await;
    let stored = backend.stored(&small).await;
    assert!(
        stored.len() < 2000,
        "nothing of small was dropped: {} kept",
        stored.len()
    );
    assert!(
        stored.len() > 100,
        "too much of small was dropped: {stored:?}"
    );
    assert_eq!(stored, (stored[0]..=2000).collect::<Vec<_>>());
    publish_batches(&bus, &big, 40).await;
    publish_batches(&bus, &home, 20).await;
    assert_eq!(backend.stored(&big).await, (1..=2000).collect::<Vec<_>>());
    assert_eq!(backend.stored(&home).await, (1..=1000).collect::<Vec<_>>());
    let kept = tenant_bytes_stored(backend, "small").await;
    assert!(
        kept <= LIMIT + SEGMENT_SLACK,
        "{kept} bytes of small kept under {LIMIT}"
    );
    assert_eq!(bus.tenant_bytes("small").await.unwrap(), kept);
    let p = bus.publish_results(&small, &results(1..=1)).await.unwrap();
    assert_eq!((p.accepted, p.duplicates), (0, 1));

    // A limit given to a tenant already over it trims what it keeps, at once.
    let before = tenant_bytes_stored(backend, "big").await;
    assert!(before > 2 * LIMIT, "big keeps only {before} bytes");
    bus.keep_bytes("big", Some(LIMIT)).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while tenant_bytes_stored(backend, "big").await > LIMIT + SEGMENT_SLACK {
        assert!(
            std::time::Instant::now() < deadline,
            "big was not trimmed to {LIMIT}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stored = backend.stored(&big).await;
    assert_eq!(stored, (stored[0]..=2000).collect::<Vec<_>>());
    assert_eq!(backend.stored(&home).await.len(), 1000, "home lost results");

    // Deleting a tenant's results leaves the others'.
    let (_, read_to, _) = read_all(&bus, "small", 0, 500).await;
    bus.drop_tenant("small").await.unwrap();
    assert_eq!(backend.stored(&small).await, Vec::<u64>::new());
    assert_eq!(tenant_bytes_stored(backend, "small").await, 0);
    // A reader of the deleted tenant finds nothing, and does not make its stream again.
    let none = bus
        .read_results("small", read_to, 10, Duration::from_millis(100))
        .await
        .unwrap();
    assert!(none.results.is_empty(), "{none:?}");
    assert!(
        !results_kept_for(backend, "small").await,
        "made again by a reader"
    );
    assert_eq!(backend.stored(&home).await.len(), 1000, "home lost results");
    assert!(!backend.stored(&big).await.is_empty(), "big lost results");
    // Made again, it starts from nothing: its agents' results are new ones.
    assert_eq!(bus.last_seq(&small).await.unwrap(), 0);
    let p = bus.publish_results(&small, &results(1..=3)).await.unwrap();
    assert_eq!((p.accepted, p.duplicates), (3, 0));
    assert_eq!(backend.stored(&small).await, vec![1, 2, 3]);
    // The old reader's position means nothing in the new tenant's results: it is told,
    // and reads them all.
    let (got, _, lost) = read_all(&bus, "small", read_to, 10).await;
    assert!(lost, "a position of the deleted tenant is reported lost");
    assert_eq!(
        got.iter().map(|(_, s)| *s).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    // The home tenant's results are not the bus's to delete.
    assert!(bus.drop_tenant(HOME).await.is_err());
    assert_eq!(backend.stored(&home).await.len(), 1000, "home lost results");
}

/// With a size cap (`--results-max-bytes`), both buses drop the oldest results and keep
/// the newest as an unbroken run, and still refuse a resend of a dropped one.
async fn retention_contract(backend: &Backend, cap: u64) {
    let a = agent(4);
    let bus = backend.open().await;
    for batch in 0..40u64 {
        let p = bus
            .publish_results(&a, &results(batch * 50 + 1..=batch * 50 + 50))
            .await
            .unwrap();
        assert_eq!(p.accepted, 50);
    }
    let stored = backend.stored(&a).await;
    assert!(
        stored.len() < 2000,
        "nothing was dropped: {} stored",
        stored.len()
    );
    assert!(stored.len() > 100, "too much was dropped: {stored:?}");
    assert_eq!(stored, (stored[0]..=2000).collect::<Vec<_>>());
    let bytes = bytes_stored(backend).await;
    assert!(
        bytes <= cap + cap / 2,
        "{bytes} bytes kept under a cap of {cap}"
    );
    let p = bus.publish_results(&a, &results(1..=1)).await.unwrap();
    assert_eq!((p.accepted, p.duplicates), (0, 1));
}

/// With a max age (`--results-max-age-hours`, here seconds), both buses drop results
/// once they are older than it (the embedded bus a sealed segment at a time), keep the
/// newer ones as an unbroken run, and still refuse a resend of a dropped one.
async fn age_contract(backend: &Backend) {
    use std::time::Instant;
    let a = agent(5);
    let bus = backend.open().await;
    let (mut next, deadline) = (1u64, Instant::now() + Duration::from_secs(30));
    let mut sent: Vec<(Instant, u64)> = Vec::new();
    // Ten results every 200 ms until the first ones are gone from where the bus keeps them.
    let (stored, read_at) = loop {
        sent.push((Instant::now(), next));
        let p = bus
            .publish_results(&a, &results(next..=next + 9))
            .await
            .unwrap();
        assert_eq!(p.accepted, 10);
        next += 10;
        let stored = backend.stored(&a).await;
        // What was read is what the bus held at the end of the read.
        let read_at = Instant::now();
        if stored.first().is_some_and(|&first| first > 1) {
            break (stored, read_at);
        }
        assert!(
            Instant::now() < deadline,
            "nothing aged out: {} stored",
            stored.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(stored, (stored[0]..next).collect::<Vec<_>>());
    // Nothing younger than the max age is dropped: everything sent in the last 2 s (of 3)
    // before the read is there.
    let young = sent
        .iter()
        .find(|(at, _)| read_at.duration_since(*at) < AGE - Duration::from_secs(1))
        .map(|&(_, first)| first)
        .unwrap();
    assert!(
        stored[0] <= young,
        "{young} was dropped too young: {stored:?}"
    );
    let p = bus.publish_results(&a, &results(1..=10)).await.unwrap();
    assert_eq!((p.accepted, p.duplicates), (0, 10));
}

/// Read every result of `tenant` from `from` on, `max` at a time, as a consumer does;
/// each read goes on from where the last ended. Returns the (agent, seq) read, the
/// position to go on from, and whether a read said the position was lost.
async fn read_all(
    bus: &Arc<dyn Bus>,
    tenant: &str,
    from: u64,
    max: usize,
) -> (Vec<(String, u64)>, u64, bool) {
    read_all_as(bus, tenant, (from, max), false).await
}

/// [`read_all`], as a reader that follows (`Bus::follow_results`) when `follow`.
async fn read_all_as(
    bus: &Arc<dyn Bus>,
    tenant: &str,
    (from, max): (u64, usize),
    follow: bool,
) -> (Vec<(String, u64)>, u64, bool) {
    let (mut pos, mut got, mut lost) = (from, Vec::new(), false);
    loop {
        // (A follower waits: what is stored may be on its way.)
        let read = if follow {
            bus.follow_results(tenant, pos, max, Duration::from_secs(1))
                .await
        } else {
            bus.read_results(tenant, pos, max, Duration::ZERO).await
        }
        .unwrap();
        assert!(read.results.len() <= max);
        lost |= read.lost;
        let mut last = pos;
        for (at, agent, result) in &read.results {
            // (After a loss reading starts over from the oldest kept.)
            assert!(read.lost || *at > last, "positions grow: {at} after {last}");
            assert_eq!(agent.tenant, tenant);
            last = *at;
            got.push((agent.fingerprint.clone(), result.seq));
        }
        if read.results.is_empty() && read.next == pos {
            return (got, pos, lost);
        }
        pos = read.next;
    }
}

/// Reading a tenant's results back by position: every one once, in the order stored,
/// only the tenant's; from any position exactly what came after it; a reader waiting for
/// more wakes when it is stored; a position retention deleted is said to be lost and
/// reading goes on from the oldest kept.
async fn reader_contract(backend: &Backend, cap_dir_bus: Option<&Backend>) {
    let bus = backend.open().await;
    let (a, b, other) = (
        AgentRef::new("readers", "0f8fad5b-d9cb-469f-a165-70867728950a"),
        AgentRef::new("readers", "0f8fad5b-d9cb-469f-a165-70867728950b"),
        tenant_agent("elsewhere"),
    );
    let mut expected = Vec::new();
    for i in 0..10u64 {
        for agent in [&a, &b] {
            bus.publish_results(agent, &results(i * 20 + 1..=i * 20 + 20))
                .await
                .unwrap();
            expected.extend((i * 20 + 1..=i * 20 + 20).map(|s| (agent.fingerprint.clone(), s)));
        }
        bus.publish_results(&other, &results(i + 1..=i + 1))
            .await
            .unwrap();
    }
    let (got, end, lost) = read_all(&bus, "readers", 0, 37).await;
    assert!(!lost);
    assert_eq!(
        got, expected,
        "every result once, in order, only the tenant's"
    );
    // From the middle: exactly the rest (on NATS through a second instance, as another
    // gateway reads; the embedded bus is one process's, and its positions across restarts
    // are the segments' unit tests').
    let again = match backend {
        Backend::Nats(_) => backend.open().await,
        Backend::Embedded(..) => bus.clone(),
    };
    let first = again
        .read_results("readers", 0, 150, Duration::ZERO)
        .await
        .unwrap();
    let mid = first.results.last().unwrap().0;
    let (rest, _, _) = read_all(&again, "readers", mid, 50).await;
    assert_eq!(rest, expected[150..]);
    // Nothing new: an empty read that stays where it was, after the wait.
    let idle = bus
        .read_results("readers", end, 10, Duration::from_millis(200))
        .await
        .unwrap();
    assert!(
        idle.results.is_empty() && !idle.lost && idle.next == end,
        "{idle:?} from {end}"
    );
    let end = idle.next;
    // A reader waiting is woken by the next result stored.
    let waiting = {
        let bus = bus.clone();
        tokio::spawn(async move {
            bus.read_results("readers", end, 10, Duration::from_secs(20))
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    bus.publish_results(&a, &results(201..=201)).await.unwrap();
    let woken = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("woken before its wait ran out")
        .unwrap();
    assert_eq!(woken.results.len(), 1);
    assert_eq!(woken.results[0].2.seq, 201);

    follow_contract(backend, &bus, &a).await;

    // Retention deletes what a slow reader had not read: it is told, and goes on from the
    // oldest kept.
    if let Some(capped) = cap_dir_bus {
        let bus = capped.open().await;
        let c = agent(8);
        bus.publish_results(&c, &results(1..=50)).await.unwrap();
        let early = bus
            .read_results(HOME, 0, 1, Duration::ZERO)
            .await
            .unwrap()
            .next;
        for batch in 1..40u64 {
            let p = bus
                .publish_results(&c, &results(batch * 50 + 1..=batch * 50 + 50))
                .await
                .unwrap();
            assert_eq!(p.accepted, 50);
        }
        let (got, end, lost) = read_all(&bus, HOME, early, 500).await;
        assert!(lost, "the reader is told what it missed");
        let seqs: Vec<u64> = got.iter().map(|(_, s)| *s).collect();
        assert!(seqs[0] > 2, "{:?}", &seqs[..3]);
        assert_eq!(seqs, (seqs[0]..=2000).collect::<Vec<_>>());

        // A reader that follows, left behind while retention deletes: what it reads is
        // whole from where it goes on, and it is told if that is past what it missed.
        let (_, end, _) = read_all_as(&bus, HOME, (end, 500), true).await;
        for batch in 40..80u64 {
            bus.publish_results(&c, &results(batch * 50 + 1..=batch * 50 + 50))
                .await
                .unwrap();
        }
        let (mut pos, mut last, mut gaps) = (end, 2000, 0);
        loop {
            let read = bus
                .follow_results(HOME, pos, 500, Duration::from_secs(1))
                .await
                .unwrap();
            if read.results.is_empty() && read.next == pos {
                break;
            }
            for (i, (_, _, r)) in read.results.iter().enumerate() {
                if r.seq != last + 1 {
                    // Only the first of a read that says so.
                    assert!(read.lost && i == 0, "{} after {last} unsaid", r.seq);
                    gaps += 1;
                }
                last = r.seq;
            }
            pos = read.next;
        }
        assert_eq!(last, 4000, "read to the end");
        assert!(
            gaps > 0,
            "retention deleted what the follower had not taken"
        );
    }
}

/// A reader that follows (`Bus::follow_results`, the event streams' shared reader) reads
/// what a reader by position reads: at the end, it is woken by what comes and reads all
/// of it once, in order, whatever it takes at a time.
async fn follow_contract(backend: &Backend, bus: &Arc<dyn Bus>, a: &AgentRef) {
    let (_, end, _) = read_all_as(bus, "readers", (0, 1000), true).await;
    let waiting = {
        let bus = bus.clone();
        tokio::spawn(async move {
            bus.follow_results("readers", end, 10, Duration::from_secs(20))
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    bus.publish_results(a, &results(202..=202)).await.unwrap();
    let woken = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("woken before its wait ran out")
        .unwrap();
    assert_eq!(woken.results.len(), 1);
    assert_eq!(woken.results[0].2.seq, 202);
    let mut pos = woken.next;
    for i in 0..5u64 {
        bus.publish_results(a, &results(203 + i * 100..=302 + i * 100))
            .await
            .unwrap();
    }
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while got.len() < 500 && tokio::time::Instant::now() < deadline {
        let read = bus
            .follow_results("readers", pos, 64, Duration::from_secs(1))
            .await
            .unwrap();
        assert!(!read.lost && read.results.len() <= 64, "{read:?}");
        got.extend(read.results.iter().map(|(at, _, r)| (*at, r.seq)));
        pos = read.next;
    }
    // The same, at the same positions, as a reader by position reads.
    let direct = bus
        .read_results("readers", woken.next, 1000, Duration::ZERO)
        .await
        .unwrap();
    let direct: Vec<(u64, u64)> = direct
        .results
        .iter()
        .map(|(at, _, r)| (*at, r.seq))
        .collect();
    assert_eq!(got.len(), 500);
    assert!(got == direct, "followed and read by position differ");
    assert_eq!(got.last().map(|g| g.1), Some(702));

    let Backend::Nats(s) = backend else {
        return;
    };
    // On NATS the follower is a consumer of the tenant's stream (not direct reads).
    let js = async_nats::jetstream::new(async_nats::connect(s.urls[0].as_str()).await.unwrap());
    let name = results_stream("readers");
    let consumers = js
        .get_stream(&name)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .consumer_count;
    assert!(consumers >= 1, "the follower reads through a consumer");
    // The stream deleted and made again: the follower says so (a reset) and reads the
    // new stream, instead of waiting at a place the new one has not reached.
    // (Another gateway's doing: this one's own failures would make it forget the stream.)
    js.delete_stream(&name).await.unwrap();
    let other = backend.open().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while other.publish_results(a, &results(703..=705)).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "publishes again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (mut lost, mut seqs) = (false, Vec::new());
    while seqs.len() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "reads the new stream: {seqs:?}"
        );
        let read = bus
            .follow_results("readers", pos, 64, Duration::from_secs(1))
            .await
            .unwrap();
        lost |= read.lost;
        seqs.extend(read.results.iter().map(|(_, _, r)| r.seq));
        pos = read.next;
    }
    assert!(lost, "the reader is told");
    assert_eq!(seqs, [703, 704, 705]);
}

const AGE: Duration = Duration::from_secs(3);

const KEEP: Retention = Retention {
    max_age: std::time::Duration::from_secs(7 * 86_400),
    max_bytes: 0,
};

/// The event stream's feeds: presence and alert events read by tenant and position, each
/// tenant's only; the ends; a quiet tenant's place moves past others' events without a
/// loss; a deleted tenant's events are gone for a new one of the same name (also once the
/// bus is opened again).
async fn events_contract(backend: &Backend) {
    let bus = backend.open().await;
    let wait = Duration::ZERO;
    let online = |tenant: &str, fp: &str| PresenceEvent {
        agent: AgentRef::new(tenant, fp),
        presence: Presence::Online,
        at_ms: 1,
        reason: String::new(),
    };
    let alert =
        |n: u64| serde_json::json!({"type": "alert", "fingerprint": "f", "check": "c", "n": n});
    for (tenant, fp) in [("acme", "a1"), ("globex", "g1"), ("acme", "a2")] {
        bus.publish_presence(&online(tenant, fp)).await.unwrap();
    }
    bus.publish_alert_events("acme", &[alert(1), alert(2)])
        .await
        .unwrap();
    bus.publish_alert_events("globex", &[alert(3)])
        .await
        .unwrap();
    let fps = |r: &outpost_gateway::bus::PresenceRead| -> Vec<String> {
        r.items
            .iter()
            .map(|(_, e)| e.agent.fingerprint.clone())
            .collect()
    };
    let ns = |r: &outpost_gateway::bus::AlertEventsRead| -> Vec<u64> {
        r.items
            .iter()
            .map(|(_, e)| e["n"].as_u64().unwrap())
            .collect()
    };
    let p = bus.read_presence("acme", 0, 100, wait).await.unwrap();
    assert_eq!(fps(&p), ["a1", "a2"], "acme's presence only");
    assert!(!p.lost);
    let a = bus.read_alert_events("acme", 0, 100, wait).await.unwrap();
    assert_eq!(ns(&a), [1, 2], "acme's alert events only");
    assert!(a.items.iter().all(|(_, e)| e["tenant"] == "acme"));
    let g = bus.read_alert_events("globex", 0, 100, wait).await.unwrap();
    assert_eq!(ns(&g), [3]);

    // From the ends: only what comes later.
    let ends = bus.ends("acme").await.unwrap();
    assert!(
        ends.results > 0 && ends.presence > 0 && ends.alerts > 0,
        "{ends:?}"
    );
    let p = bus
        .read_presence("acme", ends.presence, 100, wait)
        .await
        .unwrap();
    assert!(p.items.is_empty() && !p.lost, "{p:?}");
    bus.publish_alert_events("acme", &[alert(4)]).await.unwrap();
    let a = bus
        .read_alert_events("acme", ends.alerts, 100, wait)
        .await
        .unwrap();
    assert_eq!(ns(&a), [4]);
    // One read waits for what comes.
    let reading = bus.read_presence("acme", ends.presence, 100, Duration::from_secs(10));
    let (p, ()) = tokio::join!(reading, async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        bus.publish_presence(&online("acme", "a3")).await.unwrap();
    });
    assert_eq!(fps(&p.unwrap()), ["a3"]);

    // A quiet tenant's place goes past the others' events, and is no loss.
    let at = bus.read_presence("acme", 0, 100, wait).await.unwrap().next;
    for i in 0..20 {
        bus.publish_presence(&online("globex", &format!("g{i}")))
            .await
            .unwrap();
    }
    let p = bus.read_presence("acme", at, 100, wait).await.unwrap();
    assert!(p.items.is_empty() && !p.lost, "{p:?}");
    assert!(
        p.next > at,
        "the place moved past globex's events: {} {at}",
        p.next
    );

    // Deleted, then made again under the name: nothing of the old one.
    bus.drop_tenant("acme").await.unwrap();
    let p = bus.read_presence("acme", 0, 100, wait).await.unwrap();
    assert!(p.items.is_empty(), "{p:?}");
    let a = bus.read_alert_events("acme", 0, 100, wait).await.unwrap();
    assert!(a.items.is_empty(), "{a:?}");
    bus.publish_presence(&online("acme", "new")).await.unwrap();
    bus.publish_alert_events("acme", &[alert(5)]).await.unwrap();
    let check = |bus: Arc<dyn Bus>| async move {
        let p = bus.read_presence("acme", 0, 100, wait).await.unwrap();
        assert_eq!(fps(&p), ["new"]);
        let a = bus.read_alert_events("acme", 0, 100, wait).await.unwrap();
        assert_eq!(ns(&a), [5]);
        // globex untouched.
        let g = bus.read_alert_events("globex", 0, 100, wait).await.unwrap();
        assert_eq!(ns(&g), [3]);
    };
    check(bus.clone()).await;
    drop(bus);
    check(backend.open().await).await;
}

/// A result of `check` that ran at `started`.
fn run_of(seq: u64, check: &str, started: u64) -> CheckResult {
    serde_json::from_value(serde_json::json!({
        "seq": seq, "check": check, "status": if seq.is_multiple_of(7) { "critical" } else { "ok" },
        "output": format!("{check} run {seq}"), "metrics": [{"name": "v", "value": seq as f64}],
        "started_at_ms": started, "duration_ms": 1
    }))
    .unwrap()
}

/// The history of one check: its results only (another check of the agent, with a dot
/// in its name, and another agent's results interleaved), in a range, the newest `limit`
/// oldest first; the same once the bus is opened again (the embedded bus: across sealed
/// segments, through indexes written at close, and rebuilt when gone or damaged).
async fn history_contract(backend: &Backend) {
    let bus = backend.open().await;
    let (a, b) = (agent(1), agent(2));
    let t0 = 1_750_000_000_000u64;
    // a: "disk" at seqs 1,3,5,..; "a.b" at 2,4,6,..; b: "disk". A run every 10 s.
    let mut seq = 0u64;
    for round in 0..150u64 {
        let mut batch = Vec::new();
        for _ in 0..10 {
            seq += 1;
            let check = if !seq.is_multiple_of(2) {
                "disk"
            } else {
                "a.b"
            };
            batch.push(run_of(seq, check, t0 + seq * 10_000));
        }
        bus.publish_results(&a, &batch).await.unwrap();
        let other = run_of(round + 1, "disk", t0 + seq * 10_000);
        bus.publish_results(&b, &[other]).await.unwrap();
    }
    let all = HistoryQuery {
        from_ms: 0,
        to_ms: u64::MAX / 2,
        limit: 100_000,
    };
    let seqs = |h: &outpost_gateway::bus::History| -> Vec<u64> {
        h.results.iter().map(|r| r.seq).collect()
    };
    let odd: Vec<u64> = (1..=1500).step_by(2).collect();
    let even: Vec<u64> = (2..=1500).step_by(2).collect();
    let ask = |bus: Arc<dyn Bus>| {
        let (a, b, odd, even) = (a.clone(), b.clone(), odd.clone(), even.clone());
        async move {
            let h = bus.read_history(&a, "disk", all).await.unwrap();
            assert_eq!(seqs(&h), odd, "every disk result of a, in order");
            assert!(!h.truncated);
            assert!(h.results.iter().all(|r| r.check == "disk"));
            let h = bus.read_history(&a, "a.b", all).await.unwrap();
            assert_eq!(seqs(&h), even, "the check with a dot, apart from disk");
            let h = bus.read_history(&b, "disk", all).await.unwrap();
            assert_eq!(seqs(&h), (1..=150).collect::<Vec<_>>(), "b's own");
            // A range over the runs' start times, inclusive at both ends.
            let range = HistoryQuery {
                from_ms: t0 + 101 * 10_000,
                to_ms: t0 + 111 * 10_000,
                limit: 100,
            };
            let h = bus.read_history(&a, "disk", range).await.unwrap();
            assert_eq!(seqs(&h), [101, 103, 105, 107, 109, 111]);
            // The newest `limit`, oldest first, and the truncation said.
            let newest = HistoryQuery { limit: 4, ..all };
            let h = bus.read_history(&a, "disk", newest).await.unwrap();
            assert_eq!(seqs(&h), [1493, 1495, 1497, 1499]);
            assert!(h.truncated);
            let h = bus.read_history(&a, "nothing", all).await.unwrap();
            assert!(h.results.is_empty() && !h.truncated);
            let nobody = AgentRef::new(HOME, "no-such-agent");
            assert!(bus
                .read_history(&nobody, "disk", all)
                .await
                .unwrap()
                .results
                .is_empty());
            let other_tenant = AgentRef::new("acme", &a.fingerprint);
            assert!(bus
                .read_history(&other_tenant, "disk", all)
                .await
                .unwrap()
                .results
                .is_empty());
        }
    };
    ask(bus.clone()).await;
    drop(bus);
    ask(backend.open().await).await;
    if let Backend::Nats(s) = backend {
        // A subject per check: what makes one check's read skip every other result.
        let client = async_nats::connect(s.urls[0].as_str()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let stream = js
            .get_stream(outpost_gateway::nats::RESULTS_STREAM)
            .await
            .unwrap();
        let agent_subject = results_subject(HOME, &a.fingerprint);
        let mut info = stream
            .info_with_subjects(format!("{agent_subject}.>"))
            .await
            .unwrap();
        let mut subjects: Vec<(String, usize)> = Vec::new();
        while let Some(s) = futures_util::StreamExt::next(&mut info).await {
            subjects.push(s.unwrap());
        }
        subjects.sort();
        assert_eq!(
            subjects,
            [
                (format!("{agent_subject}.a~b"), 750),
                (format!("{agent_subject}.disk"), 750)
            ]
        );
    }
    if let Backend::Embedded(dir, _) = backend {
        let indexes = || {
            std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|e| e == "idx"))
                .collect::<Vec<_>>()
        };
        let written = indexes();
        assert!(
            written.len() >= 3,
            "an index per sealed segment: {written:?}"
        );
        // Damaged and missing indexes are rebuilt from the segments.
        std::fs::write(&written[0], b"garbage").unwrap();
        std::fs::remove_file(&written[1]).unwrap();
        ask(backend.open().await).await;
        assert!(indexes().len() >= written.len(), "rebuilt");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nats_bus_keeps_the_history_contract() {
    let dir = tempdir();
    let server = NatsServer::start(dir.path(), "n1");
    history_contract(&Backend::Nats(nats_settings(&server.url()))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nats_bus_keeps_the_events_contract() {
    let dir = tempdir();
    let server = NatsServer::start(dir.path(), "n1");
    events_contract(&Backend::Nats(nats_settings(&server.url()))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_bus_keeps_the_contract() {
    let dir = tempdir();
    contract(&Backend::Embedded(dir.path().join("bus"), KEEP)).await;
    let cap = 128 * 1024;
    let capped = Retention {
        max_bytes: cap,
        ..KEEP
    };
    retention_contract(&Backend::Embedded(dir.path().join("capped"), capped), cap).await;
    let aged = Retention {
        max_age: AGE,
        ..KEEP
    };
    age_contract(&Backend::Embedded(dir.path().join("aged"), aged)).await;
    tenant_bytes_contract(&Backend::Embedded(dir.path().join("tenants"), KEEP)).await;
    events_contract(&Backend::Embedded(dir.path().join("events"), KEEP)).await;
    // Segments of 128 KiB: the history spans several.
    let small_segments = Retention {
        max_bytes: 1 << 20,
        ..KEEP
    };
    history_contract(&Backend::Embedded(
        dir.path().join("history"),
        small_segments,
    ))
    .await;
    let capped = Backend::Embedded(dir.path().join("read-capped"), capped);
    reader_contract(
        &Backend::Embedded(dir.path().join("readers"), KEEP),
        Some(&capped),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nats_bus_keeps_the_reader_contract() {
    let dir = tempdir();
    let server = NatsServer::start(dir.path(), "n1");
    let cap = 128 * 1024;
    let capped = Backend::Nats(nats_settings_with(
        &server.url(),
        &["--results-max-bytes", &cap.to_string()],
    ));
    let dir2 = tempdir();
    let server2 = NatsServer::start(dir2.path(), "n2");
    reader_contract(&Backend::Nats(nats_settings(&server2.url())), Some(&capped)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nats_bus_keeps_the_tenant_bytes_contract() {
    let dir = tempdir();
    let server = NatsServer::start(dir.path(), "n1");
    tenant_bytes_contract(&Backend::Nats(nats_settings(&server.url()))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nats_bus_keeps_the_contract_and_dedups_between_gateways() {
    let dir = tempdir();
    let server = NatsServer::start(dir.path(), "n1");
    let settings = nats_settings(&server.url());
    let backend = Backend::Nats(settings);
    contract(&backend).await;

    // Two gateways at once (an agent's old and new connection racing): the second, which
    // has never seen the agent, stores nothing twice; JetStream's Nats-Msg-Id check and
    // the stored watermark both hold.
    let (one, two) = (backend.open().await, backend.open().await);
    let c = agent(3);
    let batch = results(1..=50);
    let (x, y) = tokio::join!(
        one.publish_results(&c, &batch),
        two.publish_results(&c, &batch)
    );
    let (x, y) = (x.unwrap(), y.unwrap());
    assert_eq!(x.accepted + y.accepted, 50, "{x:?} {y:?}");
    assert_eq!(x.duplicates + y.duplicates, 50, "{x:?} {y:?}");
    assert_eq!(backend.stored(&c).await, (1..=50).collect::<Vec<_>>());

    // The server gone: publishing fails with a clear error instead of acking.
    drop(server);
    let err = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        one.publish_results(&c, &results(51..=51)),
    )
    .await
    .expect("a dead NATS fails the publish within the JetStream timeout")
    .unwrap_err();
    assert!(err.to_string().contains("bus unavailable"), "{err}");
    assert!(one.unavailable().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nats_bus_keeps_the_retention_contract() {
    let dir = tempdir();
    let server = NatsServer::start(dir.path(), "n1");
    let cap = 128 * 1024;
    let settings = nats_settings_with(&server.url(), &["--results-max-bytes", &cap.to_string()]);
    retention_contract(&Backend::Nats(settings), cap).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nats_bus_keeps_the_age_contract() {
    let dir = tempdir();
    let server = NatsServer::start(dir.path(), "n1");
    // Seconds instead of the option's hours; JetStream's duplicate window must fit inside.
    let settings = NatsSettings {
        results_max_age: AGE,
        dedup_window: Duration::from_secs(1),
        ..nats_settings(&server.url())
    };
    age_contract(&Backend::Nats(settings)).await;
}

fn nats_settings(url: &str) -> NatsSettings {
    nats_settings_with(url, &[])
}

fn nats_settings_with(url: &str, more: &[&str]) -> NatsSettings {
    outpost_gateway::settings::bus::BusArgs::nats_from_flags(url, more).unwrap()
}

/// A NATS account written before tenants had streams of their own: `OUTPOST_RESULTS`
/// takes `outpost.*.results.*`, with another tenant's results in it. A gateway of this
/// release narrows it to its home tenant, makes the other tenant a stream of its own, and
/// still drops a resend of what the old stream kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_results_stream_from_before_per_tenant_streams_is_narrowed_and_still_dedups() {
    use async_nats::jetstream::stream;
    let dir = tempdir();
    let server = NatsServer::start(dir.path(), "n1");
    let settings = nats_settings(&server.url());
    let client = async_nats::connect(server.url().as_str()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let old = js
        .create_stream(stream::Config {
            name: outpost_gateway::nats::RESULTS_STREAM.into(),
            subjects: vec!["outpost.*.results.*".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let acme = tenant_agent("acme");
    let subject = results_subject(&acme.tenant, &acme.fingerprint);
    for seq in 1..=5u64 {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            outpost_gateway::nats::bus::SEQ_HEADER,
            seq.to_string().as_str(),
        );
        let body = serde_json::json!({"tenant": "acme", "fingerprint": acme.fingerprint, "result": result(seq)});
        js.publish_with_headers(subject.clone(), headers, body.to_string().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    // The home tenant's agent too, on its own subject as that release published.
    let home = agent(7);
    for seq in 1..=3u64 {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            outpost_gateway::nats::bus::SEQ_HEADER,
            seq.to_string().as_str(),
        );
        let body = serde_json::json!({"tenant": HOME, "fingerprint": home.fingerprint, "result": result(seq)});
        js.publish_with_headers(
            results_subject(HOME, &home.fingerprint),
            headers,
            body.to_string().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    drop(old);

    let bus = Backend::Nats(settings.clone()).open().await;
    let mut narrowed = js
        .get_stream(outpost_gateway::nats::RESULTS_STREAM)
        .await
        .unwrap();
    assert_eq!(
        narrowed.info().await.unwrap().config.subjects,
        vec![outpost_gateway::nats::results_filter(HOME)]
    );
    assert_eq!(
        bus.last_seq(&acme).await.unwrap(),
        5,
        "the old stream's mark"
    );
    let p = bus.publish_results(&acme, &results(1..=7)).await.unwrap();
    assert_eq!((p.accepted, p.duplicates), (2, 5));
    let backend = Backend::Nats(settings);
    assert_eq!(
        backend.stored(&acme).await,
        vec![6, 7],
        "in acme's own stream"
    );
    // The home tenant's results stay in OUTPOST_RESULTS: the old ones on the agent's own
    // subject count for its mark and its history, new ones go on the check's subject.
    let p = bus.publish_results(&home, &results(1..=5)).await.unwrap();
    assert_eq!((p.accepted, p.duplicates), (2, 3));
    assert_eq!(backend.stored(&home).await, vec![1, 2, 3, 4, 5]);
    let all = HistoryQuery {
        from_ms: 0,
        to_ms: u64::MAX / 2,
        limit: 100,
    };
    let h = bus.read_history(&home, "c", all).await.unwrap();
    let seqs: Vec<u64> = h.results.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5], "both layouts in one history");
    // Deleting acme's results takes what the old stream kept of it too: made again, it
    // starts from nothing.
    bus.drop_tenant("acme").await.unwrap();
    assert_eq!(bus.last_seq(&acme).await.unwrap(), 0);
    assert_eq!(backend.stored(&home).await, vec![1, 2, 3, 4, 5]);
}
