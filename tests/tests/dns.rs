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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_dns_broken_the_agent_connects_through_cached_addresses_and_says_so() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root: it serves DNS on port 53 and bind-mounts resolv.conf in a mount namespace"
    );
    let dir = tempdir();
    serve_dns("127.0.0.77:53", &[(NAME, [127, 0, 0, 1])])
        .await
        .expect("serve DNS on 127.0.0.77:53");
    let good = dir.path().join("resolv.good");
    std::fs::write(
        &good,
        "nameserver 127.0.0.77\noptions timeout:1 attempts:1\n",
    )
    .unwrap();
    let broken = dir.path().join("resolv.broken");
    std::fs::write(
        &broken,
        "nameserver 127.0.0.78\noptions timeout:1 attempts:1\n",
    )
    .unwrap();

    let (ca, cert, key) = test_pki(&dir.path().join("pki"), NAME);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let gw = Gateway::start_on(
        &dir.path().join("real"),
        &listen,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--fallback-addr",
            &listen,
        ],
    );
    gw.write_checks(
        "c.toml",
        "[[check]]\nname = \"tick\"\ncommand = \"/bin/echo tick\"\ninterval = 1\n",
    );
    let toml = format!(
        "gateway_url = \"wss://{NAME}:{port}\"\nenroll_key = {:?}\nca_file = {:?}\nhostname = \"resolver\"\nreconnect_max_secs = 1\n",
        gw.enroll_key,
        ca.display().to_string()
    );
    let start = |resolv: &Path| {
        let w = wrapper(resolv);
        let w: Vec<&str> = w.iter().map(String::as_str).collect();
        Agent::start_wrapped(dir.path(), "resolver", &toml, &w)
    };

    // DNS works: the agent connects by name, says so, and remembers the address.
    let mut agent = start(&good);
    let fp = agent.fingerprint.clone();
    let ok = dns_result(&gw, &fp, "resolves").await;
    assert_eq!(ok["status"], "ok", "{ok}");
    let cache = agent.state_dir.join("gateway-addrs.json");
    eventually(T, "the address cached", || async {
        std::fs::read_to_string(&cache)
            .ok()
            .filter(|c| c.contains(&listen))
    })
    .await;
    agent.proc.signal(libc::SIGTERM);
    assert_eq!(agent.proc.wait_exit(T).await, Some(0));
    drop(agent);

    // DNS broken: the last address that worked.
    let mut agent = start(&broken);
    let r = dns_result(&gw, &fp, "the last address that worked").await;
    assert_eq!(r["status"], "critical", "{r}");
    let text = r["output"].as_str().unwrap();
    assert!(
        text.contains("DNS is broken") && text.contains(NAME) && text.contains(&listen),
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
    std::fs::write(&cache, cached.replacen(&listen, &impostor.addr, 1)).unwrap();
    assert!(std::fs::read_to_string(&cache)
        .unwrap()
        .contains(&impostor.addr));
    let agent = start(&broken);
    let r = dns_result(&gw, &fp, "a fallback address the gateway sent").await;
    assert_eq!(r["status"], "critical", "{r}");
    assert!(r["output"].as_str().unwrap().contains(&listen), "{r}");
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
