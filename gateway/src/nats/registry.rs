//! The fleet's shared agent registry in the `outpost_agents` bucket (key
//! `<tenant>.<fingerprint>`), and the gateways' heartbeats in `outpost_gateways`: every
//! gateway writes the agents it holds with compare-and-set, follows the bucket into its
//! own [`Registry`], and beats so the others can tell when it is gone.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv::Operation;
use async_trait::async_trait;

use super::{agent_key, Nats};
use crate::bus::Presence;
use crate::registry::{
    AgentRecord, Applied, Beat, RevokedAgent, SharedRecords, Upkeep, GATEWAY_TTL,
};
use crate::util::now_ms;

/// [`SharedRecords`] in NATS KV.
pub struct NatsRecords {
    nats: Arc<Nats>,
}

impl NatsRecords {
    pub fn new(nats: Arc<Nats>) -> NatsRecords {
        NatsRecords { nats }
    }
}

#[async_trait]
impl SharedRecords for NatsRecords {
    async fn claim(&self, record: &AgentRecord, holder: &str) -> anyhow::Result<(u64, bool)> {
        use anyhow::Context;
        let key = agent_key(&record.tenant, &record.fingerprint);
        let value: bytes::Bytes = serde_json::to_vec(record)?.into();
        claim(&self.nats, &key, holder, value)
            .await
            .with_context(|| format!("cannot write {key} to the fleet registry"))
    }

    async fn release(&self, record: &AgentRecord, holder: Option<&str>) -> Option<u64> {
        let nats = &self.nats;
        let key = agent_key(&record.tenant, &record.fingerprint);
        let value: bytes::Bytes = serde_json::to_vec(record).ok()?.into();
        for _ in 0..5 {
            let entry = match nats.agents.entry(&key).await {
                Ok(e) => e,
                Err(e) => {
                    tracing::error!(%key, error = %e, "cannot read the fleet registry");
                    return None;
                }
            };
            // A record that is gone (the agent forgotten) is not brought back by a late end.
            let entry = entry.filter(|e| e.operation == Operation::Put)?;
            let revision = entry.revision;
            let current = serde_json::from_slice::<AgentRecord>(&entry.value).ok();
            if current
                .as_ref()
                .is_some_and(|c| c.holder.as_deref() != holder)
            {
                return None;
            }
            let written = if revision == 0 {
                nats.agents
                    .create(&key, value.clone())
                    .await
                    .map_err(|e| e.to_string())
            } else {
                nats.agents
                    .update(&key, value.clone(), revision)
                    .await
                    .map_err(|e| e.to_string())
            };
            match written {
                Ok(rev) => return Some(rev),
                Err(e) => {
                    tracing::debug!(%key, error = %e, "fleet registry changed meanwhile; rereading")
                }
            }
        }
        None
    }

    async fn revoke(
        &self,
        tenant: &str,
        fingerprint: &str,
        reason: &str,
    ) -> anyhow::Result<Option<(u64, AgentRecord)>> {
        let kv = &self.nats.agents;
        let key = agent_key(tenant, fingerprint);
        for _ in 0..5 {
            let Some(entry) = kv.entry(&key).await? else {
                return Ok(None);
            };
            if entry.operation != Operation::Put {
                return Ok(None);
            }
            let mut record: AgentRecord = serde_json::from_slice(&entry.value)
                .map_err(|e| anyhow::anyhow!("the fleet registry's {key} does not read: {e}"))?;
            if record.presence == Presence::Revoked {
                return Ok(None);
            }
            record.revoke(reason);
            let value: bytes::Bytes = serde_json::to_vec(&record)?.into();
            match kv.update(&key, value, entry.revision).await {
                Ok(revision) => return Ok(Some((revision, record))),
                Err(e) => {
                    tracing::debug!(%key, error = %e, "fleet registry changed meanwhile; rereading")
                }
            }
        }
        anyhow::bail!("the fleet registry's {key} kept changing; retry")
    }

    async fn remove_revoked(&self, tenant: &str, fingerprint: &str) -> anyhow::Result<bool> {
        let kv = &self.nats.agents;
        let key = agent_key(tenant, fingerprint);
        let Some(entry) = kv.entry(&key).await? else {
            return Ok(true);
        };
        if entry.operation != Operation::Put {
            return Ok(true);
        }
        let revoked = serde_json::from_slice::<AgentRecord>(&entry.value)
            .is_ok_and(|r| r.presence == Presence::Revoked);
        if !revoked {
            return Ok(false);
        }
        // Only the record read: a change meanwhile fails the delete (and the caller
        // retries).
        kv.delete_expect_revision(&key, Some(entry.revision))
            .await?;
        Ok(true)
    }
}

/// Write `value` (a claim by this gateway, as `holder`) over the shared record at `key`
/// with a compare-and-set, so the presence it replaced is known exactly. Returns the new
/// revision and whether the replaced record was online. After a few lost races (other
/// gateways writing the same agent at once) the claim is written unconditionally: the
/// newest connection holds the agent whatever happened meanwhile. When in doubt the answer
/// is "was not online": an extra online event is harmless, a missing one leaves the agent
/// looking lost to whoever follows the events.
async fn claim(
    nats: &Nats,
    key: &str,
    holder: &str,
    value: bytes::Bytes,
) -> anyhow::Result<(u64, bool)> {
    // What the first read found: a write that landed although its answer was lost shows
    // this claim on the next read, which says nothing about what it replaced.
    let mut first_seen: Option<bool> = None;
    for _ in 0..5 {
        let entry = nats.agents.entry(key).await?;
        let current = match &entry {
            Some(e) if e.operation == Operation::Put => {
                serde_json::from_slice::<AgentRecord>(&e.value).ok()
            }
            _ => None,
        };
        let revision = entry.as_ref().map_or(0, |e| e.revision);
        let mine = current
            .as_ref()
            .is_some_and(|r| r.holder.as_deref() == Some(holder));
        let online = current
            .as_ref()
            .is_some_and(|r| r.presence == Presence::Online);
        if mine {
            return Ok((revision, first_seen.unwrap_or(false)));
        }
        if let Some(revoked) = current.filter(|r| r.presence == Presence::Revoked) {
            return Err(RevokedAgent(revoked.fingerprint).into());
        }
        let was_online = *first_seen.get_or_insert(online) && online;
        let written = if revision == 0 {
            nats.agents
                .create(key, value.clone())
                .await
                .map_err(anyhow::Error::from)
        } else {
            nats.agents
                .update(key, value.clone(), revision)
                .await
                .map_err(anyhow::Error::from)
        };
        match written {
            Ok(rev) => return Ok((rev, was_online)),
            Err(e) => {
                tracing::debug!(%key, error = %e, "fleet registry changed meanwhile; rereading")
            }
        }
    }
    let revision = nats.agents.put(key, value).await?;
    Ok((revision, false))
}

/// Heartbeat this gateway into the `outpost_gateways` bucket every few seconds, and follow
/// the other gateways' heartbeats; on shutdown, once its agents have left, remove ours so
/// the others sweep what did not come back at once.
pub async fn heartbeat(gw: Upkeep, nats: Arc<Nats>) {
    use futures_util::StreamExt;
    let me = gw.registry.me.clone();
    let put = |at_ms| {
        let beat = Beat {
            incarnation: me.incarnation.clone(),
            at_ms,
            listen: gw.listen.clone(),
        };
        let nats = nats.clone();
        let id = me.gateway_id.clone();
        async move {
            let value = serde_json::to_vec(&beat).unwrap_or_default();
            if let Err(e) = nats.gateways.put(&id, value.into()).await {
                tracing::warn!(error = %e, "cannot write this gateway's heartbeat");
            }
        }
    };
    let watch_all = || super::watch_keys(&nats.client, &nats.gateways, ">");
    let mut watch = loop {
        match watch_all().await {
            Ok(w) => break w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the gateways bucket; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = gw.shutdown.cancelled() => return,
                }
            }
        }
    };
    let mut tick = tokio::time::interval(GATEWAY_TTL / 3);
    loop {
        tokio::select! {
            // Beat on while draining: the agents still here are not orphans yet.
            _ = tick.tick() => put(now_ms()).await,
            _ = tokio::time::sleep(Duration::from_millis(100)), if gw.shutdown.is_cancelled() => {
                if gw.hub.connected() == 0 {
                    break;
                }
            }
            entry = watch.next() => match entry {
                Some(Ok(e)) => {
                    let beat = match e.operation {
                        Operation::Put => serde_json::from_slice(&e.value).ok(),
                        _ => None,
                    };
                    gw.registry.beat(&e.key, beat);
                }
                Some(Err(e)) => tracing::warn!(error = %e, "gateways watch error"),
                None => {
                    tracing::warn!("gateways watch ended; restarting it");
                    if let Ok(w) = watch_all().await {
                        watch = w;
                    }
                }
            },
        }
    }
    if let Err(e) = nats.gateways.delete(&me.gateway_id).await {
        tracing::warn!(error = %e, "cannot remove this gateway's heartbeat");
    }
}

/// Follow the shared registry (every tenant's agents) into the in-memory map, and end local
/// sessions of agents that another gateway has taken over.
pub async fn follow(gw: Upkeep, nats: Arc<Nats>) {
    use futures_util::StreamExt;
    let filter = "*.*";
    loop {
        let mut watch = match super::watch_keys(&nats.client, &nats.agents, filter).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the fleet registry; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = gw.shutdown.cancelled() => return,
                }
            }
        };
        loop {
            let entry = tokio::select! {
                e = watch.next() => e,
                _ = gw.shutdown.cancelled() => return,
            };
            match entry {
                Some(Ok(e)) => {
                    let value = match e.operation {
                        Operation::Put => Some(&e.value[..]),
                        _ => None,
                    };
                    match gw.registry.apply(e.revision, value, &e.key) {
                        Applied::TakenOver(agent) => {
                            tracing::info!(tenant = %agent.tenant, fingerprint = %agent.fingerprint, "agent reconnected through another gateway; ending its old session here");
                            gw.hub.take_over(&agent);
                        }
                        Applied::Revoked(agent) => {
                            tracing::info!(tenant = %agent.tenant, fingerprint = %agent.fingerprint, "agent revoked through another gateway; closing its session here");
                            gw.hub.revoke(&agent);
                        }
                        Applied::Nothing => {}
                    }
                }
                Some(Err(e)) => tracing::warn!(error = %e, "fleet registry watch error"),
                None => break,
            }
        }
        tracing::warn!("fleet registry watch ended; restarting it");
    }
}
