//! The stores the embedded gateway and a NATS fleet share in behaviour pass the same
//! contract: agent secrets in a file (`FileSecrets`) and in NATS KV (`NatsSecrets`), and
//! the agent registry's presence rules on its file and on the fleet's KV bucket
//! (`NatsRecords`), on a real nats-server from the pinned PyPI package. What is checked is
//! read back through a store opened afresh (a gateway restarted, or another gateway of the
//! fleet), not from what the writing store said it did.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_e2e::nats::NatsServer;
use outpost_e2e::{eventually, tempdir};
use outpost_gateway::bus::embedded::Recovered;
use outpost_gateway::bus::{AgentRef, Presence};
use outpost_gateway::nats::registry::NatsRecords;
use outpost_gateway::nats::secrets::NatsSecrets;
use outpost_gateway::nats::tenants::NatsTenants;
use outpost_gateway::nats::{Nats, NatsSettings};
use outpost_gateway::registry::{Me, Registry, RevokedAgent};
use outpost_gateway::secrets::{AgentCredential, FileSecrets, SecretStore, StoreError};
use outpost_gateway::tenants::{
    ApiToken, FileTenants, Limits, NewKey, Record, Role, Tenant, TenantStore, Tenants,
};

const FP: &str = "0f8fad5b-d9cb-469f-a165-70867728950e";
const OTHER_FP: &str = "1f8fad5b-d9cb-469f-a165-70867728950e";

fn credential(tenant: &str, secret_sha256: &str) -> AgentCredential {
    AgentCredential {
        tenant: tenant.into(),
        secret_sha256: secret_sha256.into(),
        enrolled_at_ms: 1_700_000_000_000,
        confirmed: false,
        enroll_proof_sha256: Some("proof".into()),
        revoked_at_ms: None,
        tenant_id: None,
        enroll_key_id: None,
        labels: Default::default(),
    }
}

/// An agent of the default tenant.
fn a(fp: &str) -> AgentRef {
    AgentRef::new("default", fp)
}

enum Backend {
    File(PathBuf),
    Nats(Box<NatsSettings>),
}

impl Backend {
    /// A store as a gateway (re)started on this backend opens it.
    async fn open(&self) -> Arc<dyn SecretStore> {
        match self {
            Backend::File(dir) => Arc::new(FileSecrets::open(dir, "default").unwrap()),
            Backend::Nats(s) => Arc::new(NatsSecrets::new(Arc::new(
                Nats::connect(s, "store contract test").await.unwrap(),
            ))),
        }
    }

    /// Two writers that may race: two gateways of a fleet on NATS; on the embedded bus the
    /// one gateway that owns the data directory (two connections of one agent at once).
    async fn racers(&self, store: &Arc<dyn SecretStore>) -> [Arc<dyn SecretStore>; 2] {
        match self {
            Backend::File(_) => [store.clone(), store.clone()],
            Backend::Nats(_) => [self.open().await, self.open().await],
        }
    }
}

/// What a store opened afresh reads for the agent (revisions are the writing store's to
/// compare; only the record itself must survive).
async fn reread(backend: &Backend, tenant: &str, fp: &str) -> Option<AgentCredential> {
    let store = backend.open().await;
    store.get(tenant, fp).await.unwrap().map(|(c, _)| c)
}

async fn contract(backend: &Backend) {
    let store = backend.open().await;
    assert!(store.get("default", FP).await.unwrap().is_none());

    // Created only where there is nothing.
    let first = credential("default", "aaaa");
    let r1 = store.put("default", FP, &first, None).await.unwrap();
    assert!(matches!(
        store
            .put("default", FP, &credential("default", "bbbb"), None)
            .await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(
        store.get("default", FP).await.unwrap(),
        Some((first.clone(), r1))
    );
    assert_eq!(reread(backend, "default", FP).await, Some(first.clone()));

    // Replaced only at the revision read; a stale writer loses.
    let confirmed = AgentCredential {
        confirmed: true,
        ..first.clone()
    };
    let r2 = store
        .put("default", FP, &confirmed, Some(r1))
        .await
        .unwrap();
    assert_ne!(r1, r2);
    assert!(matches!(
        store
            .put("default", FP, &credential("default", "cccc"), Some(r1))
            .await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(
        reread(backend, "default", FP).await,
        Some(confirmed.clone())
    );

    // Tenants never meet: the same fingerprint in another tenant is another record.
    assert!(store.get("acme", FP).await.unwrap().is_none());
    let theirs = credential("acme", "dddd");
    store.put("acme", FP, &theirs, None).await.unwrap();
    assert_eq!(reread(backend, "acme", FP).await, Some(theirs));
    assert_eq!(reread(backend, "default", FP).await, Some(confirmed));

    // Racing writers at one revision (two gateways enrolling one fingerprint at once):
    // exactly one wins, and the record is the winner's.
    let [a, b] = backend.racers(&store).await;
    let (cx, cy) = (credential("default", "x"), credential("default", "y"));
    let (x, y) = tokio::join!(
        a.put("default", OTHER_FP, &cx, None),
        b.put("default", OTHER_FP, &cy, None)
    );
    let winner = match (&x, &y) {
        (Ok(_), Err(StoreError::Conflict)) => "x",
        (Err(StoreError::Conflict), Ok(_)) => "y",
        other => panic!("exactly one of two racing creates must win: {other:?}"),
    };
    let stored = reread(backend, "default", OTHER_FP).await.unwrap();
    assert_eq!(stored.secret_sha256, winner);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_secret_store_keeps_the_contract() {
    let dir = tempdir();
    contract(&Backend::File(dir.path().to_path_buf())).await;
    // The gateway's own tenant keeps the single-tenant layout (keyed by fingerprint), so
    // the release before tenants reads the same file; other tenants are prefixed.
    let text = std::fs::read_to_string(dir.path().join("agents/credentials.json")).unwrap();
    let file: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text).unwrap();
    let mut keys: Vec<&str> = file.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, [FP, OTHER_FP, &format!("acme.{FP}")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nats_secret_store_keeps_the_contract() {
    let dir = tempdir();
    let server = NatsServer::start(dir.path(), "n1");
    let backend = Backend::Nats(Box::new(nats_settings(&server.url())));
    contract(&backend).await;

    // The server gone: reads and writes fail with a clear error, never "not enrolled".
    let store = backend.open().await;
    drop(server);
    let read = tokio::time::timeout(std::time::Duration::from_secs(30), store.get("default", FP))
        .await
        .expect("a dead NATS fails the read within the JetStream timeout");
    assert!(
        matches!(&read, Err(StoreError::Unavailable(e)) if e.contains("NATS")),
        "{read:?}"
    );
}

/// A tenant record store (`FileTenants`, `NatsTenants`): create only where nothing is,
/// compare-and-set on the revision, delete, list; what is read back comes from a store
/// opened afresh.
async fn tenants_contract(
    open: &(dyn Fn() -> futures_util::future::BoxFuture<'static, Arc<dyn TenantStore>> + Sync),
) {
    let store = open().await;
    assert!(store.list().await.unwrap().is_empty());
    let acme = Record::Tenant(Tenant {
        name: "acme".into(),
        id: "t-1".into(),
        home: false,
        enabled: true,
        limits: Limits::default(),
        created_at_ms: 1,
    });
    let r1 = store.put(&acme, None).await.unwrap();
    assert!(matches!(
        store.put(&acme, None).await,
        Err(StoreError::Conflict)
    ));
    let disabled = match acme.clone() {
        Record::Tenant(t) => Record::Tenant(Tenant {
            enabled: false,
            ..t
        }),
        _ => unreachable!(),
    };
    assert!(matches!(
        store.put(&disabled, Some(r1 + 1000)).await,
        Err(StoreError::Conflict)
    ));
    let r2 = store.put(&disabled, Some(r1)).await.unwrap();
    assert!(
        matches!(store.put(&acme, Some(r1)).await, Err(StoreError::Conflict)),
        "a stale writer loses"
    );
    let token = Record::ApiToken(ApiToken {
        id: "t1".into(),
        tenant: "acme".into(),
        sha256: "ab".into(),
        role: Role::Read,
        name: String::new(),
        created_at_ms: 2,
        revoked_at_ms: None,
    });
    store.put(&token, None).await.unwrap();
    let again = open().await;
    assert_eq!(
        again.get("tenant.acme").await.unwrap().map(|(r, _)| r),
        Some(disabled.clone())
    );
    let mut listed: Vec<Record> = again
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|(r, _)| r)
        .collect();
    listed.sort_by_key(|r| r.key());
    assert_eq!(listed, [disabled, token.clone()]);
    again.delete("token.t1").await.unwrap();
    again.delete("token.t1").await.unwrap();
    assert!(open().await.get("token.t1").await.unwrap().is_none());
    // Deleted, it may be created again (a token id is never reused, a tenant name may be).
    again.put(&token, None).await.unwrap();
    let _ = r2;

    // The enrollment count is compare-and-set: two gateways enrolling with a key limited
    // to 5 agents, 8 attempts each at once, enroll exactly 5.
    let (one, two) = (
        Arc::new(
            Tenants::open(open().await, "operator-token-0123456789", "default")
                .await
                .unwrap(),
        ),
        Arc::new(
            Tenants::open(open().await, "operator-token-0123456789", "default")
                .await
                .unwrap(),
        ),
    );
    one.create_tenant("globex", Limits::default())
        .await
        .unwrap();
    let (key, _) = one
        .create_key(
            "globex",
            NewKey {
                max_enrollments: Some(5),
                ..NewKey::default()
            },
        )
        .await
        .unwrap();
    let mut tries = Vec::new();
    for i in 0..16 {
        let t = if i % 2 == 0 { one.clone() } else { two.clone() };
        let id = key.id.clone();
        tries.push(tokio::spawn(async move {
            t.count_enrollment(&id).await.is_ok()
        }));
    }
    let mut counted = 0;
    for t in tries {
        counted += t.await.unwrap() as usize;
    }
    assert_eq!(counted, 5);
    match open().await.get(&format!("key.{}", key.id)).await.unwrap() {
        Some((Record::EnrollKey(k), _)) => assert_eq!(k.enrollments, 5),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_tenant_store_keeps_the_contract() {
    let dir = tempdir();
    let path = dir.path().to_path_buf();
    let store: Arc<dyn TenantStore> = Arc::new(FileTenants::open(&path).unwrap());
    // One gateway per data directory: every opener shares the process's store.
    tenants_contract(&move || {
        let store = store.clone();
        Box::pin(async move { store })
    })
    .await;
    // What a restart reads: the file.
    let reopened = FileTenants::open(&path).unwrap();
    assert!(reopened.get("tenant.acme").await.unwrap().is_some());
    // A corrupt file is an error that names it, never an empty tenant list.
    std::fs::write(path.join("tenants.json"), b"[{torn").unwrap();
    let err = FileTenants::open(&path).err().unwrap();
    assert!(format!("{err:#}").contains("tenants.json"), "{err:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nats_tenant_store_keeps_the_contract() {
    let dir = tempdir();
    let server = NatsServer::start(dir.path(), "n1");
    let settings = nats_settings(&server.url());
    let nats = Arc::new(Nats::connect(&settings, "contract").await.unwrap());
    tenants_contract(&move || {
        let settings = settings.clone();
        Box::pin(async move {
            let nats = Nats::connect(&settings, "contract").await.unwrap();
            Arc::new(NatsTenants::new(Arc::new(nats))) as Arc<dyn TenantStore>
        })
    })
    .await;
    // A record that does not decode is an error naming it, not a missing record.
    nats.tenants
        .put("tenant.broken", "{torn".into())
        .await
        .unwrap();
    let store = NatsTenants::new(nats.clone());
    let read = store.get("tenant.broken").await;
    assert!(
        matches!(&read, Err(StoreError::Unavailable(e)) if e.contains("tenant.broken")),
        "{read:?}"
    );
}

fn nats_settings(url: &str) -> NatsSettings {
    use clap::Parser;
    #[derive(Parser)]
    struct Args {
        #[command(flatten)]
        nats: outpost_gateway::settings::bus::BusArgs,
    }
    Args::parse_from(["test", "--bus", url])
        .nats
        .settings()
        .unwrap()
}

fn hello(fp: &str) -> outpost_protocol::Hello {
    match outpost_e2e::raw_hello(
        fp,
        outpost_protocol::Credential::Secret { secret: "s".into() },
        "host-1",
    ) {
        outpost_protocol::AgentFrame::Hello(h) => h,
        _ => unreachable!(),
    }
}

fn me(gateway: &str, incarnation: &str) -> Me {
    Me {
        gateway_id: gateway.into(),
        incarnation: incarnation.into(),
    }
}

/// The presence rules every registry keeps, on one gateway: a claim says whether the
/// agent was online before it (so exactly the changes become events), and only the
/// connection holding the agent can end its hold.
async fn registry_contract(reg: &Registry) {
    let (c1, c2, c3) = (reg.me.holder(1), reg.me.holder(2), reg.me.holder(3));
    let presence = || reg.get(&a(FP)).map(|r| (r.presence, r.holder));

    assert!(
        !reg.connected("default", &hello(FP), "peer", 1)
            .await
            .unwrap(),
        "a new agent was not online"
    );
    assert_eq!(presence(), Some((Presence::Online, Some(c1.clone()))));
    // A newer connection (a session rotation, a reconnect within the grace) takes over
    // without a presence change.
    assert!(
        reg.connected("default", &hello(FP), "peer", 2)
            .await
            .unwrap(),
        "it was online"
    );
    // The old connection ending late changes nothing.
    assert!(
        !reg.disconnected(&a(FP), Some(&c1), Presence::Lost, "late")
            .await
    );
    assert_eq!(presence(), Some((Presence::Online, Some(c2.clone()))));
    // Its holder's end does.
    assert!(
        reg.disconnected(&a(FP), Some(&c2), Presence::Deregistered, "bye")
            .await
    );
    assert_eq!(presence(), Some((Presence::Deregistered, None)));
    assert!(
        !reg.disconnected(&a(FP), Some(&c2), Presence::Lost, "twice")
            .await,
        "ended once"
    );
    assert!(
        !reg.connected("default", &hello(FP), "peer", 3)
            .await
            .unwrap(),
        "it had left"
    );
    assert_eq!(presence(), Some((Presence::Online, Some(c3.clone()))));
    // Tenants apart: the same fingerprint in another tenant is another agent, with its own
    // presence and holder.
    assert!(
        !reg.connected("acme", &hello(FP), "peer", 4).await.unwrap(),
        "new in acme"
    );
    assert!(
        reg.disconnected(
            &AgentRef::new("acme", FP),
            Some(&reg.me.holder(4)),
            Presence::Lost,
            "x"
        )
        .await
    );
    assert_eq!(presence(), Some((Presence::Online, Some(c3))));
    assert_eq!(
        reg.list("acme")
            .iter()
            .map(|r| r.presence)
            .collect::<Vec<_>>(),
        [Presence::Lost]
    );
}

/// Revocation: presence `revoked` whoever holds the agent, once, and its holder's end
/// changes nothing afterwards; forgetting removes it.
async fn revocation_contract(reg: &Registry) {
    const REVOKED_FP: &str = "2f8fad5b-d9cb-469f-a165-70867728950e";
    let holder = reg.me.holder(7);
    reg.connected("default", &hello(REVOKED_FP), "peer", 7)
        .await
        .unwrap();
    assert!(reg.revoked(&a(REVOKED_FP), "revoked").await.unwrap());
    assert!(
        !reg.revoked(&a(REVOKED_FP), "again").await.unwrap(),
        "revoked once"
    );
    assert!(
        !reg.disconnected(&a(REVOKED_FP), Some(&holder), Presence::Lost, "after")
            .await
    );
    let rec = reg.get(&a(REVOKED_FP)).unwrap();
    assert_eq!((rec.presence, rec.holder), (Presence::Revoked, None));
    // A login whose credential checked out just before the revocation cannot claim it.
    let late = reg
        .connected("default", &hello(REVOKED_FP), "peer", 8)
        .await;
    assert!(
        late.as_ref().is_err_and(|e| e.is::<RevokedAgent>()),
        "{late:?}"
    );
    assert!(reg.forget(&a(REVOKED_FP)).await.unwrap());
    assert!(reg.get(&a(REVOKED_FP)).is_none());
    // Only a revoked agent is forgotten.
    let kept = "4f8fad5b-d9cb-469f-a165-70867728950e";
    reg.connected("default", &hello(kept), "peer", 12)
        .await
        .unwrap();
    assert!(!reg.forget(&a(kept)).await.unwrap());
    assert!(reg.get(&a(kept)).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_registry_keeps_the_contract() {
    let dir = tempdir();
    let recovered = || Recovered {
        latest: Default::default(),
        presence: Default::default(),
        results_on_disk: 0,
        torn_bytes_dropped: 0,
    };
    let reg = Registry::open(dir.path(), recovered(), me("gw1", "a")).unwrap();
    registry_contract(&reg).await;
    revocation_contract(&reg).await;
    reg.flush().unwrap();
    // Restarted: the agent is still online under the old process's connection (it is
    // swept to lost after the grace unless it comes back), and only that holder ends it.
    let again = Registry::open(dir.path(), recovered(), me("gw1", "b")).unwrap();
    let old = me("gw1", "a").holder(3);
    let rec = again.get(&a(FP)).unwrap();
    assert_eq!(
        (rec.presence, rec.holder.as_deref()),
        (Presence::Online, Some(old.as_str()))
    );
    assert!(
        !again
            .disconnected(&a(FP), Some(&again.me.holder(3)), Presence::Lost, "x")
            .await
    );
    assert!(
        again
            .disconnected(&a(FP), Some(&old), Presence::Lost, "gone")
            .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nats_registry_keeps_the_contract_between_gateways() {
    let dir = tempdir();
    let server = NatsServer::start(dir.path(), "n1");
    let settings = nats_settings(&server.url());
    let open = |gateway: &'static str| {
        let settings = settings.clone();
        async move {
            let nats = Nats::connect(&settings, gateway).await.unwrap();
            let records = Arc::new(NatsRecords::new(Arc::new(nats)));
            Registry::shared(records, me(gateway, "a"))
        }
    };
    let one = open("gw1").await;
    registry_contract(&one).await;
    revocation_contract(&one).await;
    // Another gateway claims the agent: it learns from the shared record that the agent
    // was online (no second online event), and the first gateway's connection, which
    // still holds it in that gateway's own map, can no longer end it.
    let two = open("gw2").await;
    assert!(
        two.connected("default", &hello(FP), "peer", 1)
            .await
            .unwrap(),
        "online through gw1"
    );
    assert!(
        !one.disconnected(&a(FP), Some(&one.me.holder(3)), Presence::Lost, "late")
            .await
    );
    assert!(
        two.disconnected(&a(FP), Some(&two.me.holder(1)), Presence::Lost, "lost")
            .await
    );
    // Revoked through a gateway that has not seen the agent yet (it reads and writes the
    // shared record): a login racing it on the gateway that holds the agent cannot claim
    // it again.
    const RACED: &str = "3f8fad5b-d9cb-469f-a165-70867728950e";
    one.connected("default", &hello(RACED), "peer", 11)
        .await
        .unwrap();
    assert!(two.get(&a(RACED)).is_none());
    assert!(two.revoked(&a(RACED), "revoked").await.unwrap());
    assert_eq!(
        two.get(&a(RACED)).map(|r| r.presence),
        Some(Presence::Revoked)
    );
    let late = one.connected("default", &hello(RACED), "peer", 12).await;
    assert!(
        late.as_ref().is_err_and(|e| e.is::<RevokedAgent>()),
        "{late:?}"
    );
    // Tenants apart: the same fingerprint in another tenant is another record.
    assert!(!one
        .connected("acme", &hello(OTHER_FP), "peer", 9)
        .await
        .unwrap());
    assert!(
        !two.connected("default", &hello(OTHER_FP), "peer", 9)
            .await
            .unwrap(),
        "not online in default"
    );
}

// --- Alert state: `alerts::store` on files and in NATS --------------------------------

use outpost_gateway::alerts::store::{AlertStore, FileStore, Queued, Record as AlertRecord};
use outpost_gateway::alerts::{Kind, Notification};
use outpost_gateway::nats::alerts::{Leases, NatsAlertStore, Tenure, LEASE_TTL};
use tokio_util::sync::CancellationToken;

fn queued(seq: u64, id: &str, output_len: usize) -> Queued {
    Queued {
        seq,
        receiver: "hook".into(),
        notification: Notification {
            id: id.into(),
            fingerprint: FP.into(),
            check: "disk".into(),
            kind: Kind::Firing,
            status: outpost_protocol::Status::Critical,
            since_ms: 1,
            at_ms: 2,
            output: "x".repeat(output_len),
            receivers: vec!["hook".into()],
        },
        hostname: "web-1".into(),
        labels: Default::default(),
        group: None,
        group_wait_ms: 0,
        queued_ms: 0,
    }
}

fn seqs(loaded: &outpost_gateway::alerts::store::Loaded) -> Vec<u64> {
    loaded.snapshot.queue.iter().map(|q| q.seq).collect()
}

/// What every alert store does, each step read back through a store opened afresh (the
/// gateway restarted, or another gateway taking over): `open` opens one.
async fn alert_store_contract<F, Fut>(open: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Arc<dyn AlertStore>>,
{
    let store = open().await;
    assert!(store.load().await.unwrap().is_none(), "nothing kept yet");

    // The journal alone: queued, then one done.
    let records: Vec<AlertRecord> = (0..3)
        .map(|i| AlertRecord::Queued(Box::new(queued(i, &format!("n{i}"), 10))))
        .chain([AlertRecord::Done { seq: 0 }])
        .collect();
    store.append(&records).await.unwrap();
    let loaded = open().await.load().await.unwrap().expect("kept");
    assert_eq!(seqs(&loaded), [1, 2]);
    assert_eq!(loaded.snapshot.next_seq, 3);
    assert_eq!(loaded.queued_since.len(), 3, "all three were queued since");

    // A snapshot far above NATS's 1 MiB payload limit (3,000 notifications of 500 bytes),
    // then more journal after it.
    let store = open().await;
    let mut loaded = store.load().await.unwrap().expect("kept");
    loaded.snapshot.position = 4242;
    loaded.snapshot.queue = (1..3001)
        .map(|i| queued(i, &format!("n{i}"), 500))
        .collect();
    loaded.snapshot.next_seq = 3001;
    store.snapshot(loaded.snapshot.clone()).await.unwrap();
    store
        .append(&[
            AlertRecord::Done { seq: 1 },
            AlertRecord::Queued(Box::new(queued(3001, "n3001", 10))),
        ])
        .await
        .unwrap();
    let again = open().await.load().await.unwrap().expect("kept");
    assert_eq!(again.snapshot.position, 4242);
    assert_eq!(again.snapshot.queue.len(), 3000);
    assert_eq!(again.snapshot.queue[0].seq, 2, "the done one is out");
    assert_eq!(
        again.snapshot.queue.last().unwrap().notification.id,
        "n3001"
    );
    assert_eq!(
        again.snapshot.queue[10].notification.output.len(),
        500,
        "bodies whole"
    );
    assert_eq!(
        again.queued_since.len(),
        1,
        "only what came after the snapshot"
    );

    // Removed (a deleted tenant): a store opened afresh finds nothing.
    let store = open().await;
    store.load().await.unwrap();
    store.remove().await.unwrap();
    assert!(open().await.load().await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_alert_store_keeps_the_contract() {
    let dir = tempdir();
    let path = dir.path().join("alerts").join("default");
    alert_store_contract(|| {
        let path = path.clone();
        async move { Arc::new(FileStore::new(&path)) as Arc<dyn AlertStore> }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nats_alert_store_keeps_the_contract_and_fences_an_old_holder() {
    let dir = tempdir();
    let server = NatsServer::start(dir.path(), "n1");
    let nats = Arc::new(
        Nats::connect(&nats_settings(&server.url()), "contract")
            .await
            .unwrap(),
    );
    let token = std::sync::atomic::AtomicU64::new(1);
    let open_of = |gateway: &str, tenant_id: &str| {
        let t = token.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let life = CancellationToken::new();
        let tenure = Tenure::new(t, life.clone());
        let store = NatsAlertStore::new(nats.clone(), ("default", tenant_id), gateway, tenure);
        (Arc::new(store) as Arc<dyn AlertStore>, life)
    };
    let open = |gateway: &str| open_of(gateway, "t1");
    alert_store_contract(|| {
        let (store, _) = open("gw");
        async move { store }
    })
    .await;

    // Two holders: the one that loaded last fenced the other, whose writes are all refused
    // from then on (and whose life ends), whatever it tries.
    let (old, old_life) = open("old");
    old.load().await.unwrap();
    old.append(&[AlertRecord::Queued(Box::new(queued(0, "before", 10)))])
        .await
        .unwrap();
    let (new, new_life) = open("new");
    let taken = new.load().await.unwrap().expect("the old holder's record");
    assert_eq!(seqs(&taken), [0]);
    let refused = old
        .append(&[AlertRecord::Queued(Box::new(queued(1, "late", 10)))])
        .await
        .unwrap_err();
    assert!(
        format!("{refused:#}").contains("another gateway took over"),
        "{refused:#}"
    );
    assert!(old_life.is_cancelled(), "a fenced holder stops");
    let mut snapshot = taken.snapshot.clone();
    snapshot.position = 99;
    assert!(old.snapshot(snapshot).await.is_err(), "nor snapshots");
    new.append(&[AlertRecord::Done { seq: 0 }]).await.unwrap();
    assert!(!new_life.is_cancelled());
    let (reader, _) = open("reader");
    let last = reader.load().await.unwrap().expect("kept");
    assert!(last.snapshot.queue.is_empty(), "{:?}", last.snapshot.queue);
    assert!(
        !last.queued_since.iter().any(|(_, id)| id == "late"),
        "the fenced write is not in the log"
    );
    assert_ne!(last.snapshot.position, 99, "nor its snapshot");

    // An old holder's snapshot racing a takeover: the new holder claims the snapshot's
    // place before it reads, so the old one can neither move it nor purge the log under it.
    let (old, old_life) = open("old");
    let mut state = old.load().await.unwrap().expect("kept").snapshot;
    state.position = 7;
    old.snapshot(state.clone()).await.unwrap();
    // The place as the old holder last wrote it: what its next snapshot would update.
    let seen = nats
        .alerts
        .entry("default.snapshot")
        .await
        .unwrap()
        .unwrap();
    let (new, _) = open("new");
    let taken = new.load().await.unwrap().expect("kept");
    assert_eq!(taken.snapshot.position, 7);
    assert!(
        nats.alerts
            .update("default.snapshot", seen.value.clone(), seen.revision)
            .await
            .is_err(),
        "an update from before the takeover is refused"
    );
    state.position = 8;
    assert!(old.snapshot(state).await.is_err());
    assert!(old_life.is_cancelled());
    let (reader, _) = open("reader");
    assert_eq!(
        reader
            .load()
            .await
            .unwrap()
            .expect("kept")
            .snapshot
            .position,
        7
    );

    // The log lost the snapshot its place names (purged by hand): the state is rebuilt
    // (after a moment's retries), not an error forever.
    let (store, _) = open("gw");
    store.load().await.unwrap();
    let stream = nats
        .js
        .get_stream(outpost_gateway::nats::alerts::ALERTS_STREAM)
        .await
        .unwrap();
    stream
        .purge()
        .filter("outpost.default.alerts.log")
        .await
        .unwrap();
    let (store, _) = open("gw");
    let rebuilt = store.load().await.unwrap();
    assert!(
        rebuilt.is_none(),
        "{:?}",
        rebuilt.map(|l| l.snapshot.position)
    );

    // A tenant deleted and made again under the same name (another id) starts from nothing.
    let (store, _) = open_of("gw", "t1");
    store.load().await.unwrap();
    let state = outpost_gateway::alerts::store::Snapshot {
        position: 5,
        ..Default::default()
    };
    store.snapshot(state).await.unwrap();
    let (store, _) = open_of("gw", "t2");
    assert!(
        store.load().await.unwrap().is_none(),
        "the old tenant's state"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alerting_lease_is_held_while_renewed_moves_at_once_when_released_and_after_its_ttl_when_abandoned(
) {
    let dir = tempdir();
    let server = NatsServer::start(dir.path(), "n1");
    let settings = nats_settings(&server.url());
    let leases = |gateway: &str, incarnation: &str| {
        let settings = settings.clone();
        let (gateway, incarnation) = (gateway.to_string(), incarnation.to_string());
        async move {
            Arc::new(Leases {
                nats: Arc::new(Nats::connect(&settings, &gateway).await.unwrap()),
                gateway,
                incarnation,
            })
        }
    };
    let shutdown = CancellationToken::new();
    let (a, b) = (leases("gw-a", "1").await, leases("gw-b", "1").await);
    // A process of the same gateway id (a second replica, a restart racing the old one)
    // is another holder like any.
    let a2 = leases("gw-a", "2").await;
    let held_a = a.acquire("default", &shutdown).await.unwrap();
    let waiting = {
        let (b, shutdown) = (b.clone(), shutdown.clone());
        tokio::spawn(async move { b.acquire("default", &shutdown).await })
    };
    let twin = {
        let (a2, shutdown) = (a2.clone(), shutdown.clone());
        tokio::spawn(async move { a2.acquire("default", &shutdown).await })
    };
    // Renewed: nobody takes it, well past the TTL.
    tokio::time::sleep(LEASE_TTL + Duration::from_secs(3)).await;
    assert!(!waiting.is_finished(), "a renewed lease is not taken over");
    assert!(!twin.is_finished(), "nor by a twin of the same gateway id");
    twin.abort();
    assert!(held_a.tenure.valid());
    // Released (a gateway stopping): taken at once.
    let released = Instant::now();
    held_a.release().await;
    let held_b = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("taken within seconds of the release")
        .unwrap()
        .unwrap();
    assert!(released.elapsed() < LEASE_TTL);
    assert!(held_b.tenure.token > 0);

    // Abandoned: a holder that never renews again (as a gateway killed with -9). Written
    // here as such a holder would have left it: gw-b's renewal now finds it changed and
    // stops, and gw-c takes it over only after the TTL.
    let c = leases("gw-c", "1").await;
    c.nats
        .alerts
        .put("default.lease", r#"{"gateway":"ghost"}"#.into())
        .await
        .unwrap();
    let abandoned = Instant::now();
    eventually(
        Duration::from_secs(10),
        "gw-b sees it lost the lease",
        || async { (!held_b.tenure.valid()).then_some(()) },
    )
    .await;
    let held_c = tokio::time::timeout(Duration::from_secs(30), c.acquire("default", &shutdown))
        .await
        .expect("taken over after the TTL")
        .unwrap();
    assert!(
        abandoned.elapsed() >= LEASE_TTL,
        "taken after {:?}, before the TTL",
        abandoned.elapsed()
    );
    assert!(
        held_c.tenure.token > held_b.tenure.token,
        "fencing tokens grow"
    );
    held_c.release().await;
}
