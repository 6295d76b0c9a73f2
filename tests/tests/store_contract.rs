//! The stores the embedded gateway and a NATS fleet share in behaviour pass the same
//! contract: agent secrets in a file (`FileSecrets`) and in NATS KV (`NatsSecrets`, on a
//! real nats-server from the pinned PyPI package). What is checked is read back through a
//! store opened afresh (a gateway restarted, or another gateway of the fleet), not from
//! what the writing store said it did.

use std::path::PathBuf;
use std::sync::Arc;

use outpost_e2e::nats::NatsServer;
use outpost_e2e::tempdir;
use outpost_gateway::nats::secrets::NatsSecrets;
use outpost_gateway::nats::{Nats, NatsSettings};
use outpost_gateway::secrets::{AgentCredential, FileSecrets, SecretStore, StoreError};

const FP: &str = "0f8fad5b-d9cb-469f-a165-70867728950e";
const OTHER_FP: &str = "1f8fad5b-d9cb-469f-a165-70867728950e";

fn credential(tenant: &str, secret_sha256: &str) -> AgentCredential {
    AgentCredential {
        tenant: tenant.into(),
        secret_sha256: secret_sha256.into(),
        enrolled_at_ms: 1_700_000_000_000,
        confirmed: false,
        enroll_proof_sha256: Some("proof".into()),
    }
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
