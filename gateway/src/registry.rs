//! The gateway's view of its agents: who they are (from their last `hello`), their
//! presence, the checks they were given, and the newest result per check.
//!
//! Metadata and presence are saved to `DATA_DIR/agents/registry.json` (atomically, at most
//! every couple of seconds and at shutdown); the newest results are rebuilt from the bus
//! at start. When clustered this becomes a KV bucket shared by all gateways.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use outpost_protocol::{CheckResult, CheckSpec, Hello};
use serde::{Deserialize, Serialize};

use crate::bus::embedded::Recovered;
use crate::bus::Presence;
use crate::util::{now_ms, write_atomic};
use crate::Gateway;

/// Checks per agent kept in the registry beyond those the gateway configured: what the
/// agent runs from its own `checks.d` and its self-checks.
pub const MAX_LOCAL_CHECKS: usize = 256;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentRecord {
    pub fingerprint: String,
    pub tenant: String,
    pub hostname: String,
    pub os: String,
    pub arch: String,
    pub agent_version: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub groups: Vec<String>,
    pub presence: Presence,
    /// Why presence last changed.
    #[serde(default)]
    pub presence_reason: String,
    pub last_seen_ms: u64,
    #[serde(default)]
    pub connected_since_ms: Option<u64>,
    #[serde(default)]
    pub peer: Option<String>,
    /// The checks this agent was last given.
    #[serde(default)]
    pub checks: Vec<CheckSpec>,
    #[serde(skip)]
    pub latest: HashMap<String, CheckResult>,
    /// The live connection this record describes, so a replaced connection ending late
    /// cannot overwrite a newer one's presence.
    #[serde(skip)]
    pub conn_id: Option<u64>,
}

pub struct Registry {
    path: PathBuf,
    agents: Mutex<HashMap<String, AgentRecord>>,
    dirty: AtomicBool,
}

impl Registry {
    pub fn open(data_dir: &Path, recovered: Recovered) -> anyhow::Result<Registry> {
        let path = data_dir.join("agents").join("registry.json");
        let mut agents: HashMap<String, AgentRecord> = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(a) => a,
                Err(e) => {
                    // Metadata only: agents re-send it on their next hello. Keep the bad file.
                    let aside = path.with_extension("json.corrupt");
                    let _ = std::fs::rename(&path, &aside);
                    tracing::error!(file = %path.display(), moved_to = %aside.display(), error = %e,
                        "agent registry is corrupt; starting with an empty one (agents re-register on connect)");
                    HashMap::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        for rec in agents.values_mut() {
            if rec.presence == Presence::Online {
                rec.presence = Presence::Lost;
                rec.presence_reason = "gateway restarted".into();
                rec.connected_since_ms = None;
            }
        }
        for (fp, latest) in recovered.latest {
            if let Some(rec) = agents.get_mut(&fp) {
                rec.latest = latest;
            }
        }
        Ok(Registry {
            path,
            agents: Mutex::new(agents),
            dirty: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, AgentRecord>> {
        self.agents.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Record an authenticated `hello`: the agent is online.
    pub fn connected(&self, tenant: &str, hello: &Hello, peer: &str, conn_id: u64) {
        let now = now_ms();
        let mut agents = self.lock();
        let rec = agents
            .entry(hello.fingerprint.clone())
            .or_insert_with(|| AgentRecord {
                fingerprint: hello.fingerprint.clone(),
                tenant: tenant.to_string(),
                hostname: String::new(),
                os: String::new(),
                arch: String::new(),
                agent_version: String::new(),
                labels: BTreeMap::new(),
                groups: Vec::new(),
                presence: Presence::Online,
                presence_reason: String::new(),
                last_seen_ms: now,
                connected_since_ms: None,
                peer: None,
                checks: Vec::new(),
                latest: HashMap::new(),
                conn_id: None,
            });
        rec.hostname = hello.hostname.clone();
        rec.os = hello.os.clone();
        rec.arch = hello.arch.clone();
        rec.agent_version = hello.agent_version.clone();
        rec.labels = hello.labels.clone();
        rec.groups = hello.groups.clone();
        rec.presence = Presence::Online;
        rec.presence_reason = "connected".into();
        rec.last_seen_ms = now;
        rec.connected_since_ms = Some(now);
        rec.peer = Some(peer.to_string());
        rec.conn_id = Some(conn_id);
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// Record the end of connection `conn_id`; returns false (and changes nothing) when a
    /// newer connection of the agent has taken over meanwhile.
    pub fn disconnected(
        &self,
        fingerprint: &str,
        conn_id: u64,
        presence: Presence,
        reason: &str,
    ) -> bool {
        let mut agents = self.lock();
        let Some(rec) = agents.get_mut(fingerprint) else {
            return false;
        };
        if rec.conn_id != Some(conn_id) {
            return false;
        }
        rec.presence = presence;
        rec.presence_reason = reason.to_string();
        rec.last_seen_ms = now_ms();
        rec.connected_since_ms = None;
        rec.conn_id = None;
        self.dirty.store(true, Ordering::Relaxed);
        true
    }

    pub fn seen(&self, fingerprint: &str) {
        if let Some(rec) = self.lock().get_mut(fingerprint) {
            rec.last_seen_ms = now_ms();
        }
    }

    pub fn set_checks(&self, fingerprint: &str, checks: Vec<CheckSpec>) {
        if let Some(rec) = self.lock().get_mut(fingerprint) {
            rec.checks = checks;
        }
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// Keep the newest result per check (by sequence number): every check the gateway
    /// configured, and up to [`MAX_LOCAL_CHECKS`] more that the agent runs on its own
    /// (its `checks.d`, its self-checks). Beyond that, results stay on the bus but are
    /// not kept here, so an agent cannot grow this map without bound.
    pub fn record_results<'a>(
        &self,
        fingerprint: &str,
        results: impl IntoIterator<Item = &'a CheckResult>,
    ) {
        if let Some(rec) = self.lock().get_mut(fingerprint) {
            for r in results {
                let configured = rec.checks.iter().any(|c| c.name == r.check);
                if !configured
                    && !rec.latest.contains_key(&r.check)
                    && rec.latest.len() >= rec.checks.len() + MAX_LOCAL_CHECKS
                {
                    continue;
                }
                match rec.latest.get(&r.check) {
                    Some(old) if old.seq >= r.seq => {}
                    _ => {
                        rec.latest.insert(r.check.clone(), r.clone());
                    }
                }
            }
        }
    }

    pub fn get(&self, fingerprint: &str) -> Option<AgentRecord> {
        self.lock().get(fingerprint).cloned()
    }

    pub fn list(&self) -> Vec<AgentRecord> {
        let mut all: Vec<AgentRecord> = self
            .lock()
            .values()
            .map(|r| AgentRecord {
                latest: HashMap::new(),
                checks: Vec::new(),
                ..r.clone()
            })
            .collect();
        all.sort_by(|a, b| {
            a.hostname
                .cmp(&b.hostname)
                .then(a.fingerprint.cmp(&b.fingerprint))
        });
        all
    }

    /// Save if anything changed since the last save.
    pub fn flush(&self) -> std::io::Result<()> {
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        let bytes = serde_json::to_vec_pretty(&*self.lock())?;
        let res = write_atomic(&self.path, &bytes, 0o600);
        if res.is_err() {
            self.dirty.store(true, Ordering::Relaxed);
        }
        res
    }
}

/// Save the registry every two seconds when it changed, until shutdown.
pub async fn flush_periodically(gw: Arc<Gateway>) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = gw.shutdown.cancelled() => return,
        }
        if let Err(e) = gw.registry.flush() {
            tracing::error!(error = %e, "cannot save the agent registry; will retry");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupt_registry_is_moved_aside_and_online_agents_become_lost_on_restart() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("agents")).unwrap();
        std::fs::write(dir.path().join("agents/registry.json"), b"{torn").unwrap();
        let reg = Registry::open(dir.path(), Recovered::default()).unwrap();
        assert!(reg.list().is_empty());
        assert!(dir.path().join("agents/registry.json.corrupt").exists());

        let hello: Hello = serde_json::from_value(serde_json::json!({
            "protocol": 1, "fingerprint": "0f8fad5b-d9cb-469f-a165-70867728950e",
            "credential": {"kind": "secret", "secret": "s"}, "agent_version": "1",
            "os": "linux", "arch": "x86_64", "hostname": "h"
        }))
        .unwrap();
        reg.connected("default", &hello, "127.0.0.1:1", 7);
        assert!(!reg.disconnected(&hello.fingerprint, 6, Presence::Lost, "an older connection"));
        assert_eq!(reg.list()[0].presence, Presence::Online);
        reg.flush().unwrap();
        let reg = Registry::open(dir.path(), Recovered::default()).unwrap();
        let rec = &reg.list()[0];
        assert_eq!(rec.presence, Presence::Lost);
        assert_eq!(rec.presence_reason, "gateway restarted");
    }
}
