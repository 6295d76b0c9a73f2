//! A fleet of real gateways on NATS, as the fleet tests build it: one certificate every
//! gateway serves, gateways that share the tenant's keys the way an operator copies them,
//! agents that trust the fleet's CA, and the check directory `config push` sends.
//!
//! Process control only: what a fleet must do is in the tests (tests/tests/fleet.rs,
//! tests/tests/alerting_fleet.rs).

use std::path::{Path, PathBuf};

use crate::{test_pki, Agent, Gateway};

/// The presence grace the fleet's gateways run with (`--presence-grace`), in seconds.
pub const GRACE: u64 = 5;

/// The shared certificate every gateway of a fleet serves.
pub struct Pki {
    pub ca: PathBuf,
    pub cert: String,
    pub key: String,
}

/// A CA and a certificate for `localhost` under `dir/pki`.
pub fn pki(dir: &Path) -> Pki {
    let (ca, cert, key) = test_pki(&dir.join("pki"), "localhost");
    Pki {
        ca,
        cert: cert.display().to_string(),
        key: key.display().to_string(),
    }
}

/// A gateway `id` on port 0, on the NATS at `nats`.
pub fn gateway(dir: &Path, id: &str, nats: &str, pki: &Pki, extra: &[&str]) -> Gateway {
    gateway_on(dir, id, "127.0.0.1:0", Some(nats), pki, extra)
}

/// A gateway listening on `listen`, on NATS or (`None`) its embedded bus, with its data
/// under `dir/id` (so the same `id` and `listen` restart the same gateway).
pub fn gateway_on(
    dir: &Path,
    id: &str,
    listen: &str,
    nats: Option<&str>,
    pki: &Pki,
    extra: &[&str],
) -> Gateway {
    let grace = GRACE.to_string();
    let mut args = vec![
        "--gateway-id",
        id,
        "--tls-cert",
        &pki.cert,
        "--tls-key",
        &pki.key,
        "--presence-grace",
        &grace,
        "--grace",
        "6",
    ];
    if let Some(url) = nats {
        args.extend_from_slice(&["--bus", url]);
    }
    args.extend_from_slice(extra);
    // The tenant's enrollment key and API token exist in clear only where they were made
    // (NATS keeps them hashed): as an operator would, give every further gateway of the
    // tenant the first one's copy.
    let tenant = extra
        .iter()
        .position(|a| *a == "--tenant")
        .and_then(|i| extra.get(i + 1))
        .copied()
        .unwrap_or("default");
    let keys = dir.join("tenant-keys").join(tenant);
    let data_dir = dir.join(id).join("gateway");
    const KEY_FILES: [&str; 2] = ["enroll.key", "api.token"];
    if nats.is_some() && keys.exists() {
        std::fs::create_dir_all(&data_dir).unwrap();
        for f in KEY_FILES {
            std::fs::copy(keys.join(f), data_dir.join(f)).unwrap();
        }
    }
    let gw = Gateway::start_on(&dir.join(id), listen, &args);
    if nats.is_some() && !keys.exists() {
        std::fs::create_dir_all(&keys).unwrap();
        for f in KEY_FILES {
            std::fs::copy(data_dir.join(f), keys.join(f)).unwrap();
        }
    }
    gw
}

/// Gateways `gw1`..`gwN` on `nats`.
pub fn gateways(dir: &Path, n: usize, nats: &str, pki: &Pki) -> Vec<Gateway> {
    (1..=n)
        .map(|i| gateway(dir, &format!("gw{i}"), nats, pki, &[]))
        .collect()
}

/// A fresh directory `dir/fleet-config` holding `files` (name, text), for
/// `config push`; those under `plugins/` are made executable.
pub fn write_config(dir: &Path, files: &[(&str, &str)]) -> PathBuf {
    let cfg = dir.join("fleet-config");
    let _ = std::fs::remove_dir_all(&cfg);
    std::fs::create_dir_all(cfg.join("plugins")).unwrap();
    for (name, text) in files {
        let path = cfg.join(name);
        std::fs::write(&path, text).unwrap();
        if name.starts_with("plugins/") {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
    cfg
}

/// An agent that trusts the fleet's CA and dials `addr` (a gateway or the load balancer).
pub fn agent(dir: &Path, name: &str, addr: &str, pki: &Pki, key: &str) -> Agent {
    let port = addr.rsplit(':').next().unwrap();
    Agent::start_with_config(
        dir,
        name,
        &format!(
            "gateway_url = \"wss://localhost:{port}\"\nenroll_key = {key:?}\nca_file = {:?}\nhostname = {name:?}\nreconnect_max_secs = 2\n",
            pki.ca.display().to_string()
        ),
    )
}
