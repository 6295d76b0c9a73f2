//! DNS broken on the agent's host: the agent still reaches its gateway through the last
//! address that worked, or through the fallback addresses the gateway sent, verifies the
//! gateway's name over TLS whichever address it dials, and reports `outpost.dns` so the
//! problem shows as "DNS is broken", not as an agent that went away.
//!
//! The agent runs in a mount namespace of its own (`unshare -m`, so the test runs as root)
//! where `/etc/resolv.conf` is replaced: first by one that points at a DNS server this test
//! runs on 127.0.0.77:53, then by one that points at nothing.

use std::path::Path;
use std::time::Duration;

use outpost_e2e::*;

const T: Duration = Duration::from_secs(40);
const NAME: &str = "gateway.outpost.test";

/// Run the agent with `resolv` bind-mounted over /etc/resolv.conf, seen by it alone.
fn wrapper(resolv: &Path) -> Vec<String> {
    [
        "unshare",
        "-m",
        "sh",
        "-c",
        "mount --bind \"$0\" /etc/resolv.conf && exec \"$@\"",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([resolv.display().to_string()])
    .collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn dns_result(gw: &Gateway, fp: &str, wanted: &str) -> Value {
    eventually(T, &format!("outpost.dns saying {wanted:?}"), || async {
        gw.latest(fp, "outpost.dns")
            .await
            .filter(|r| r["output"].as_str().unwrap_or("").contains(wanted))
    })
    .await
}

/// A gateway reached by [`NAME`], which a DNS server this test runs on `dns` resolves, and
/// resolv.conf files for the agent: `good` (that server) and `broken` (none answers).
struct Resolving {
    dir: std::path::PathBuf,
    gw: Gateway,
    listen: String,
    toml: String,
    good: std::path::PathBuf,
    broken: std::path::PathBuf,
}

impl Resolving {
    async fn start(dir: &Path, dns: &str, gateway_args: &[&str]) -> Resolving {
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "this test needs root: it serves DNS on port 53 and bind-mounts resolv.conf in a mount namespace"
        );
        serve_dns(&format!("{dns}:53"), &[(NAME, [127, 0, 0, 1])])
            .await
            .unwrap_or_else(|e| panic!("serve DNS on {dns}:53: {e}"));
        let good = dir.join("resolv.good");
        std::fs::write(
            &good,
            format!("nameserver {dns}\noptions timeout:1 attempts:1\n"),
        )
        .unwrap();
        // Nothing answers there.
        let broken = dir.join("resolv.broken");
        std::fs::write(
            &broken,
            "nameserver 127.0.0.78\noptions timeout:1 attempts:1\n",
        )
        .unwrap();
        let (ca, cert, key) = test_pki(&dir.join("pki"), NAME);
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut args = vec![
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--fallback-addr",
            &listen,
        ];
        args.extend_from_slice(gateway_args);
        let gw = Gateway::start_on(&dir.join("real"), &listen, &args);
        let toml = format!(
            "gateway_url = \"wss://{NAME}:{port}\"\nenroll_key = {:?}\nca_file = {:?}\nhostname = \"resolver\"\nreconnect_max_secs = 1\n",
            gw.enroll_key,
            ca.display().to_string()
        );
        Resolving {
            dir: dir.to_path_buf(),
            gw,
            listen,
            toml,
            good,
            broken,
        }
    }

    /// The agent, with `resolv` as its resolv.conf.
    fn agent(&self, resolv: &Path) -> Agent {
        let w = wrapper(resolv);
        let w: Vec<&str> = w.iter().map(String::as_str).collect();
        Agent::start_wrapped(&self.dir, "resolver", &self.toml, &w)
    }

    /// The agent with DNS working, until it has cached the gateway's address; stopped.
    async fn cache_the_address(&self) -> (String, std::path::PathBuf) {
        let mut agent = self.agent(&self.good);
        let fp = agent.fingerprint.clone();
        let ok = dns_result(&self.gw, &fp, "resolves").await;
        assert_eq!(ok["status"], "ok", "{ok}");
        let cache = agent.state_dir.join("gateway-addrs.json");
        eventually(T, "the address cached", || async {
            std::fs::read_to_string(&cache)
                .ok()
                .filter(|c| c.contains(&self.listen))
        })
        .await;
        agent.proc.signal(libc::SIGTERM);
        assert_eq!(agent.proc.wait_exit(T).await, Some(0));
        (fp, cache)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_dns_broken_the_agent_connects_through_cached_addresses_and_says_so() {
    let dir = tempdir();
    let r = Resolving::start(dir.path(), "127.0.0.77", &[]).await;
    let (gw, listen, broken) = (&r.gw, r.listen.as_str(), &r.broken);
    gw.write_checks(
        "c.toml",
        "[[check]]\nname = \"tick\"\ncommand = \"/bin/echo tick\"\ninterval = 1\n",
    );
    let start = |resolv: &Path| r.agent(resolv);

    // DNS works: the agent connects by name, says so, and remembers the address.
    let (fp, cache) = r.cache_the_address().await;

    // DNS broken: the last address that worked.
    let mut agent = start(broken);
    let r = dns_result(gw, &fp, "the last address that worked").await;
    assert_eq!(r["status"], "critical", "{r}");
    let text = r["output"].as_str().unwrap();
    assert!(
        text.contains("DNS is broken") && text.contains(NAME) && text.contains(listen),
        "{text}"
    );
    let restarted = r["started_at_ms"].as_u64().unwrap();
    eventually(T, "checks reported through the cached address", || async {
        gw.latest(&fp, "tick")
            .await
            .filter(|t| t["started_at_ms"].as_u64().unwrap() > restarted)
    })
    .await;
    agent.proc.signal(libc::SIGTERM);
    assert_eq!(agent.proc.wait_exit(T).await, Some(0));
    drop(agent);

    // The last good address now answers with another server's certificate: TLS refuses
    // it by name, and the gateway's fallback address is used instead.
    let impostor = Gateway::start(&dir.path().join("impostor"), &[]);
    let cached = std::fs::read_to_string(&cache).unwrap();
    std::fs::write(&cache, cached.replacen(listen, &impostor.addr, 1)).unwrap();
    assert!(std::fs::read_to_string(&cache)
        .unwrap()
        .contains(&impostor.addr));
    let agent = start(broken);
    let r = dns_result(gw, &fp, "a fallback address the gateway sent").await;
    assert_eq!(r["status"], "critical", "{r}");
    assert!(r["output"].as_str().unwrap().contains(listen), "{r}");
    let log = agent.proc.log();
    assert!(
        log.contains(&impostor.addr) && log.contains("TLS handshake"),
        "the impostor was tried and refused:\n{log}"
    );
    assert_eq!(
        impostor.api("/agents").await.as_array().map(Vec::len),
        Some(0),
        "nothing enrolled with the impostor"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_lost_while_its_dns_is_broken_is_reported_as_dns_broken_not_as_down() {
    use outpost_e2e::receivers::signed_hook;
    let dir = tempdir();
    // Another DNS address than the other test's: they run side by side.
    let r = Resolving::start(dir.path(), "127.0.0.79", &["--presence-grace", "2"]).await;
    let hook = signed_hook(dir.path()).await;
    r.gw.write_checks(
        "alerting.toml",
        &format!(
            r#"
[[receiver]]
name = "hook"
webhook = {{ url = "{url}", secret = "{secret}" }}

[[route]]
checks = ["outpost.agent"]
receivers = ["hook"]
"#,
            url = hook.url(),
            secret = outpost_e2e::receivers::SECRET
        ),
    );
    // Stopped with bye: nothing fires (the first notification below is the lost one).
    let (fp, _) = r.cache_the_address().await;
    let agent = r.agent(&r.broken);
    let broken = dns_result(&r.gw, &fp, "DNS is broken").await;
    assert_eq!(broken["status"], "critical", "{broken}");
    // Then gone without a word (as when no address answers any more): its lost alert
    // says what the gateway last heard from it, that DNS is broken there.
    agent.proc.signal(libc::SIGKILL);
    let got = eventually(T, "the agent's alert", || async {
        let t = hook.taken();
        (!t.is_empty()).then_some(t)
    })
    .await;
    let data = &got[0]["body"]["data"];
    assert_eq!(data["check"], "outpost.agent", "{data}");
    assert_eq!(data["status"], "critical", "{data}");
    let output = data["output"].as_str().unwrap_or("");
    assert!(
        output.starts_with("DNS is broken on resolver") && output.contains(NAME),
        "reported as DNS broken: {output}"
    );
    assert!(!output.contains("is lost"), "{output}");
}
