//! Alerting in a NATS fleet, end to end, with the real binaries: three gateways on a real
//! nats-server behind haproxy (the documented configuration), four real agents dialing
//! haproxy and running 200 checks of a plugin the test turns CRITICAL and then OK, and one
//! webhook receiver, slow to answer, that verifies every notification with an independent
//! Standard Webhooks implementation (the `standardwebhooks` package from PyPI).
//!
//! One gateway at a time notifies for the tenant: its `/metrics` says it holds the
//! tenant's alerting lease. It is killed with kill -9 while it delivers the 200 firings,
//! and the gateway that took over is killed the same way while it delivers the 200
//! resolves; each time another live gateway takes the lease, and the killed one comes back
//! (same id, address and data). Every change arrives: each (agent, check) gets exactly one
//! firing id and one resolve id of the same incident, the firing first. A notification
//! arrives twice only with the same `webhook-id`, at most once per kill (the one in flight
//! when its sender died); the count is printed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use outpost_e2e::fleet::{agent, gateway_on, gateways, pki, write_config, Pki};
use outpost_e2e::flip::{flip_plugin, set_state};
use outpost_e2e::haproxy::Haproxy;
use outpost_e2e::nats::{config_push, NatsServer};
use outpost_e2e::receivers::{signed_hook, WebhookReceiver, SECRET};
use outpost_e2e::{eventually, tempdir, Agent, Gateway};
use serde_json::Value;

const T: Duration = Duration::from_secs(60);
/// How long a killed holder's lease may take to move: at most ~8 s without renewal, plus
/// the time the next holder takes to load the tenant's alert state, plus polling.
const TAKEOVER: Duration = Duration::from_secs(20);
const AGENTS: usize = 4;
/// Checks per agent: `flip-00`..`flip-49`, so 200 alerts in all.
const CHECKS: usize = 50;
/// Notifications taken before the holder is killed: some, far from all.
const BEFORE_KILL: usize = 20;
/// The receiver answers each request this long after taking it, so that 200 take 10 s and
/// more and a kill lands with a request in flight.
const SLOW: Duration = Duration::from_millis(50);
/// The `/metrics` line of the default tenant's alerting lease (series by tenant are read
/// with the operator's token).
const LEASE: &str = "outpost_alerting_lease_held{tenant=\"default\"} ";

/// The tenant's checks and its alerting: every check the same plugin, every result hard,
/// every `flip-*` alert to the signed webhook.
fn flip_checks(plugin: &str, hook: &WebhookReceiver) -> String {
    let mut text = format!(
        r#"
[[receiver]]
name = "hook"
timeout = "5s"
webhook = {{ url = "{url}", secret = "{SECRET}" }}

[[route]]
checks = ["flip-*"]
receivers = ["hook"]
"#,
        url = hook.url()
    );
    for i in 0..CHECKS {
        text.push_str(&format!(
            "\n[[check]]\nname = \"flip-{i:02}\"\ncommand = [{plugin:?}]\ninterval = 1\nattempts = 1\n"
        ));
    }
    text
}

/// Three gateways on one NATS, which the test kills and starts again by index.
struct Fleet {
    dir: PathBuf,
    url: String,
    pki: Pki,
    gws: Vec<Gateway>,
}

impl Fleet {
    /// What `gws[i]`'s `/metrics` says of the default tenant's alerting lease: held or
    /// not, or `None` while it has no such line.
    async fn holds_lease(&self, i: usize) -> Option<bool> {
        let gw = &self.gws[i];
        let operator = std::fs::read_to_string(gw.data_dir.join("operator.token")).unwrap();
        let (status, body) = gw.http("GET", "/metrics", Some(operator.trim())).await;
        assert_eq!(status, 200, "gw{} /metrics: {body}", i + 1);
        let line = body.as_str()?.lines().find(|l| l.starts_with(LEASE))?;
        match line[LEASE.len()..].trim() {
            "1" => Some(true),
            "0" => Some(false),
            other => panic!("gw{}: {LEASE}{other} is neither 0 nor 1", i + 1),
        }
    }

    /// The gateway that holds the lease, once exactly one of the live gateways (all but
    /// `dead`, which cannot answer) says it does.
    async fn holder(&self, dead: Option<usize>) -> Option<usize> {
        let mut holders = Vec::new();
        for i in (0..self.gws.len()).filter(|i| Some(*i) != dead) {
            if self.holds_lease(i).await == Some(true) {
                holders.push(i);
            }
        }
        (holders.len() == 1).then(|| holders[0])
    }

    async fn wait_holder(&self, what: &str) -> usize {
        eventually(T, what, || self.holder(None)).await
    }

    /// Kill `gws[victim]` with SIGKILL; wait until another gateway holds the lease (the
    /// time it took is printed), then start the victim again with the same id, address
    /// and data directory, and wait until haproxy sends to it again.
    async fn kill_and_restart(&mut self, victim: usize, lb: &Haproxy) {
        let addr = self.gws[victim].addr.clone();
        let killed_at = Instant::now();
        self.gws[victim].proc.signal(libc::SIGKILL);
        self.gws[victim].proc.wait_exit(T).await;
        let what = format!("another gateway takes the lease of gw{}", victim + 1);
        let next = eventually(TAKEOVER, &what, || self.holder(Some(victim))).await;
        eprintln!(
            "gw{} killed; gw{} holds the lease {:?} later",
            victim + 1,
            next + 1,
            killed_at.elapsed()
        );
        let id = format!("gw{}", victim + 1);
        self.gws[victim] = gateway_on(&self.dir, &id, &addr, Some(&self.url), &self.pki, &[]);
        lb.wait_status(&lb.server_name(victim), "UP", T).await;
    }

    /// Once `hook` has taken some of the `n` notifications whose ids end with `suffix`,
    /// kill the holder and start it again ([`Fleet::kill_and_restart`]); then wait until
    /// all `n` are taken.
    async fn kill_the_holder_mid_delivery(
        &mut self,
        lb: &Haproxy,
        hook: &WebhookReceiver,
        suffix: &str,
        n: usize,
    ) {
        wait_distinct(hook, suffix, BEFORE_KILL, T).await;
        let holder = self.wait_holder("the holder, mid-delivery").await;
        let taken = distinct(hook, suffix);
        assert!(
            taken < n,
            "the kill lands mid-delivery: {taken} of {n} notifications ending {suffix} taken"
        );
        self.kill_and_restart(holder, lb).await;
        eprintln!(
            "gw{} was killed with {taken} of {n} notifications ending {suffix} taken",
            holder + 1
        );
        wait_distinct(hook, suffix, n, Duration::from_secs(90)).await;
    }
}

/// What the bus carried of one (agent, check).
#[derive(Default)]
struct Seen {
    /// The newest result's sequence number and status.
    seq: u64,
    status: String,
    /// Results seen.
    count: u64,
}

/// The results of every (agent, check), as the gateways publish them on the bus, from the
/// moment this is created.
#[derive(Clone, Default)]
struct Results(Arc<Mutex<HashMap<(String, String), Seen>>>);

impl Results {
    async fn follow(nats: &str) -> Results {
        let results = Results::default();
        let client = async_nats::connect(nats).await.unwrap();
        let subject = outpost_gateway::nats::results_subject("*", "*");
        let mut sub = client.subscribe(subject).await.unwrap();
        client.flush().await.unwrap();
        let seen = results.0.clone();
        tokio::spawn(async move {
            let _client = client;
            while let Some(msg) = sub.next().await {
                let v: Value = serde_json::from_slice(&msg.payload).unwrap();
                let (fp, r) = (v["fingerprint"].as_str().unwrap(), &v["result"]);
                let key = (fp.to_string(), r["check"].as_str().unwrap().to_string());
                let seq = r["seq"].as_u64().unwrap();
                let mut seen = seen.lock().unwrap();
                let entry = seen.entry(key).or_default();
                entry.count += 1;
                if seq >= entry.seq {
                    entry.seq = seq;
                    entry.status = r["status"].as_str().unwrap().to_string();
                }
            }
        });
        results
    }

    /// Once every one of `pairs` last reported `status`.
    fn all(&self, pairs: &[(String, String)], status: &str) -> Option<()> {
        let seen = self.0.lock().unwrap();
        pairs
            .iter()
            .all(|p| seen.get(p).is_some_and(|s| s.status == status))
            .then_some(())
    }

    /// How many results each of `pairs` has sent so far.
    fn counts(&self, pairs: &[(String, String)]) -> Vec<u64> {
        let seen = self.0.lock().unwrap();
        pairs
            .iter()
            .map(|p| seen.get(p).map_or(0, |s| s.count))
            .collect()
    }
}

/// The `webhook-id` of a request the receiver took.
fn id_of(request: &Value) -> &str {
    request["headers"]["webhook-id"].as_str().unwrap_or("")
}

/// The distinct ids the receiver took that end with `suffix` (`/0` firing, `/r` resolve).
fn distinct(hook: &WebhookReceiver, suffix: &str) -> usize {
    let requests = hook.requests();
    let ids: BTreeSet<&str> = requests
        .iter()
        .map(id_of)
        .filter(|id| id.ends_with(suffix))
        .collect();
    ids.len()
}

/// Once the receiver holds `n` distinct ids ending with `suffix`.
async fn wait_distinct(hook: &WebhookReceiver, suffix: &str, n: usize, within: Duration) {
    let what = format!("{n} distinct notifications ending {suffix}");
    eventually(within, &what, || async {
        (distinct(hook, suffix) >= n).then_some(())
    })
    .await
}

/// Every request verified and answered 200; for each of `pairs`, exactly one firing id
/// (`<fp>/<check>/<incident>/0`) and one resolve id (`…/<incident>/r`) of the same
/// incident, every firing request before the first resolve, and no id about anything
/// else. Returns the repeats: requests beyond the first with each id.
fn tally(requests: &[Value], pairs: &[(String, String)]) -> usize {
    // (fp, check) → id → positions in the order the receiver took them.
    let mut by_pair: BTreeMap<(String, String), BTreeMap<String, Vec<usize>>> = BTreeMap::new();
    for (at, r) in requests.iter().enumerate() {
        assert_eq!(r["verified"], true, "signature: {r}");
        assert_eq!(r["answered"], 200, "{r}");
        let id = id_of(r);
        let data = &r["body"]["data"];
        let (fp, check) = (
            data["agent"]["fingerprint"].as_str().unwrap_or(""),
            data["check"].as_str().unwrap_or(""),
        );
        assert_eq!(data["id"], id, "{r}");
        assert!(id.starts_with(&format!("{fp}/{check}/")), "{r}");
        let kind = match id.rsplit('/').next() {
            Some("0") => "alert.firing",
            Some("r") => "alert.resolved",
            _ => panic!("neither a first firing nor a resolve: {r}"),
        };
        assert_eq!(r["body"]["type"], kind, "{r}");
        by_pair
            .entry((fp.to_string(), check.to_string()))
            .or_default()
            .entry(id.to_string())
            .or_default()
            .push(at);
    }
    let expected: BTreeSet<&(String, String)> = pairs.iter().collect();
    let told: BTreeSet<&(String, String)> = by_pair.keys().collect();
    assert_eq!(told, expected, "notified about exactly the 200 alerts");
    for ((fp, check), ids) in &by_pair {
        let firing: Vec<&String> = ids.keys().filter(|id| id.ends_with("/0")).collect();
        let resolve: Vec<&String> = ids.keys().filter(|id| id.ends_with("/r")).collect();
        assert!(
            firing.len() == 1 && resolve.len() == 1,
            "{fp}/{check}: one firing and one resolve id, not {ids:?}"
        );
        let incident = firing[0].strip_suffix("/0").unwrap();
        assert_eq!(
            resolve[0].as_str(),
            format!("{incident}/r"),
            "{fp}/{check}: the resolve is of the incident that fired"
        );
        let last_firing = ids[firing[0]].iter().max().unwrap();
        let first_resolve = ids[resolve[0]].iter().min().unwrap();
        assert!(
            last_firing < first_resolve,
            "{fp}/{check}: a firing after its resolve: {ids:?}"
        );
    }
    let distinct: usize = by_pair.values().map(BTreeMap::len).sum();
    requests.len() - distinct
}

/// What `gw` lists at `/api/v1/alerts` (answered by the holder, whichever gateway is
/// asked), once it answers: the `flip-*` alerts by state.
async fn listed(gw: &Gateway) -> Option<BTreeMap<String, usize>> {
    let (status, body) = gw.http("GET", "/api/v1/alerts", Some(&gw.token)).await;
    if status != 200 {
        return None;
    }
    let mut by_state = BTreeMap::new();
    for a in body["alerts"].as_array()? {
        if a["check"].as_str().is_some_and(|c| c.starts_with("flip-")) {
            *by_state
                .entry(a["state"].as_str()?.to_string())
                .or_default() += 1;
        }
    }
    Some(by_state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_notifying_gateway_killed_twice_mid_delivery_loses_no_change_and_repeats_at_most_one_each(
) {
    let dir = tempdir();
    let nats = NatsServer::start(dir.path(), "n1");
    let url = nats.url();
    let plugin = flip_plugin(dir.path());
    let hook = signed_hook(dir.path()).await;
    config_push(
        &url,
        &write_config(dir.path(), &[("flip.toml", &flip_checks(&plugin, &hook))]),
        &[],
    );
    let results = Results::follow(&url).await;
    let pki = pki(dir.path());
    let mut fleet = Fleet {
        dir: dir.path().to_path_buf(),
        gws: gateways(dir.path(), 3, &url, &pki),
        url,
        pki,
    };
    let lb = Haproxy::start(
        dir.path(),
        &fleet.gws.iter().map(|g| g.addr.clone()).collect::<Vec<_>>(),
    );
    let key = fleet.gws[0].enroll_key.clone();
    let agents: Vec<Agent> = (0..AGENTS)
        .map(|i| agent(dir.path(), &format!("a{i}"), lb.addr(), &fleet.pki, &key))
        .collect();
    let pairs: Vec<(String, String)> = agents
        .iter()
        .flat_map(|a| (0..CHECKS).map(|c| (a.fingerprint.clone(), format!("flip-{c:02}"))))
        .collect();

    // All OK, reporting, and one gateway notifying for the tenant.
    eventually(T, "200 checks reporting OK", || async {
        results.all(&pairs, "ok")
    })
    .await;
    fleet
        .wait_holder("exactly one gateway holds the lease")
        .await;
    assert!(
        hook.requests().is_empty(),
        "nothing to tell while all is OK"
    );

    // 200 firings; the holder is killed once some are taken.
    hook.slow(SLOW);
    set_state(dir.path(), 2);
    fleet
        .kill_the_holder_mid_delivery(&lb, &hook, "/0", pairs.len())
        .await;
    // Any gateway lists the alerts, as the holder keeps them: all told.
    for (i, gw) in fleet.gws.iter().enumerate() {
        let what = format!("gw{} lists 200 firing alerts", i + 1);
        let want = BTreeMap::from([("firing".to_string(), pairs.len())]);
        eventually(T, &what, || async {
            (listed(gw).await? == want).then_some(())
        })
        .await;
    }

    // 200 resolves; whoever holds the lease now is killed once some are taken.
    set_state(dir.path(), 0);
    fleet
        .kill_the_holder_mid_delivery(&lb, &hook, "/r", pairs.len())
        .await;

    // Settled: nothing waiting, nothing new after more results, and still one holder.
    let last = fleet
        .wait_holder("exactly one gateway holds the lease")
        .await;
    let queue_empty = || async {
        (fleet.gws[last].metric("outpost_alert_queue_depth ").await == 0).then_some(())
    };
    eventually(T, "the holder's queue empty", queue_empty).await;
    let before = results.counts(&pairs);
    eventually(T, "three more results of every check", || async {
        let now = results.counts(&pairs);
        now.iter()
            .zip(&before)
            .all(|(n, b)| *n >= b + 3)
            .then_some(())
    })
    .await;
    eventually(T, "the holder's queue empty", queue_empty).await;
    for (i, gw) in fleet.gws.iter().enumerate() {
        let what = format!("gw{} lists no alert", i + 1);
        eventually(T, &what, || async {
            listed(gw).await?.is_empty().then_some(())
        })
        .await;
    }

    // The others say 0, or nothing: a gateway that never held the lease has no line.
    assert_eq!(
        fleet.holder(None).await,
        Some(last),
        "exactly one gateway holds the lease, still the same"
    );

    let requests = hook.requests();
    let repeats = tally(&requests, &pairs);
    eprintln!(
        "repeats: {repeats} of {} requests for {} changes, over 2 kills",
        requests.len(),
        2 * pairs.len()
    );
    assert!(
        repeats <= 2,
        "at most one repeat per kill (the notification in flight), not {repeats}"
    );
    drop(agents);
}
