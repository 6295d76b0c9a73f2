//! The bus on NATS JetStream, for a fleet of gateways.
//!
//! Each result is one message on `outpost.<tenant>.results.<fingerprint>` in the
//! `OUTPOST_RESULTS` stream, with the same JSON body as a line of the embedded bus
//! (`{"tenant","fingerprint","result"}`) and `Nats-Msg-Id` = `<tenant>.<fingerprint>:<seq>`. A batch
//! is published pipelined (every message sent, then every ack awaited), and
//! `publish_results` returns only when JetStream has acked all of them: only then does the
//! session ack the agent.
//!
//! Duplicates are dropped twice over: JetStream drops a `Nats-Msg-Id` it has seen within
//! its duplicate window (a resend racing between two gateways), and this gateway drops
//! sequence numbers at or below the agent's highest stored one (read from the stream's last
//! message for the agent's subject, then kept in memory), which holds beyond the window.

use outpost_sys::lock;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::HeaderMap;
use async_trait::async_trait;
use outpost_protocol::CheckResult;
use serde::Serialize;

use super::{audit_subject, presence_subject, results_subject, Nats};
use crate::bus::{AgentRef, AuditEvent, Bus, BusError, PresenceEvent, Published};

/// Header with the result's sequence number, so `last_seq` needs no body parsing.
pub const SEQ_HEADER: &str = "Outpost-Seq";

pub struct NatsBus {
    nats: Arc<Nats>,
    /// Highest sequence number known durable per results subject.
    watermarks: Mutex<HashMap<String, u64>>,
}

#[derive(Serialize)]
struct ResultBody<'a> {
    tenant: &'a str,
    fingerprint: &'a str,
    result: &'a CheckResult,
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(format!("{what}: {e}"))
}

impl NatsBus {
    pub fn new(nats: Arc<Nats>) -> NatsBus {
        NatsBus {
            nats,
            watermarks: Mutex::new(HashMap::new()),
        }
    }

    fn cached_mark(&self, subject: &str) -> Option<u64> {
        lock(&self.watermarks).get(subject).copied()
    }

    fn raise_mark(&self, subject: &str, seq: u64) {
        let mut marks = lock(&self.watermarks);
        let mark = marks.entry(subject.to_string()).or_insert(0);
        *mark = (*mark).max(seq);
    }

    /// The highest sequence number stored for `subject`, from the stream.
    async fn stored_mark(&self, subject: &str) -> Result<u64, BusError> {
        match self
            .nats
            .results
            .get_last_raw_message_by_subject(subject)
            .await
        {
            Ok(msg) => Ok(msg
                .headers
                .get(SEQ_HEADER)
                .and_then(|v| v.as_str().parse().ok())
                .unwrap_or(0)),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(0),
            Err(e) => Err(unavailable("cannot read the agent's last result", e)),
        }
    }

    async fn watermark(&self, subject: &str) -> Result<u64, BusError> {
        if let Some(mark) = self.cached_mark(subject) {
            return Ok(mark);
        }
        let mark = self.stored_mark(subject).await?;
        self.raise_mark(subject, mark);
        Ok(mark)
    }
}

#[async_trait]
impl Bus for NatsBus {
    async fn publish_results(
        &self,
        agent: &AgentRef,
        results: &[CheckResult],
    ) -> Result<Published, BusError> {
        let subject = results_subject(&agent.tenant, &agent.fingerprint);
        let mark = self.watermark(&subject).await?;
        let mut published = Published::default();
        let mut acks = Vec::with_capacity(results.len());
        for r in results {
            if r.seq <= mark {
                published.duplicates += 1;
                continue;
            }
            let body = serde_json::to_vec(&ResultBody {
                tenant: &agent.tenant,
                fingerprint: &agent.fingerprint,
                result: r,
            })
            .map_err(|e| unavailable("cannot encode a result", e))?;
            let mut headers = HeaderMap::new();
            headers.insert(SEQ_HEADER, r.seq.to_string().as_str());
            let msg = PublishMessage::build()
                .payload(body.into())
                .headers(headers)
                .message_id(format!("{}:{}", agent.key(), r.seq));
            let ack = self
                .nats
                .js
                .send_publish(subject.clone(), msg)
                .await
                .map_err(|e| unavailable("cannot publish a result", e))?;
            acks.push((r.seq, ack));
        }
        let mut highest = mark;
        for (seq, ack) in acks {
            let ack = ack
                .await
                .map_err(|e| unavailable("JetStream did not ack a result", e))?;
            if ack.duplicate {
                published.duplicates += 1;
            } else {
                published.accepted += 1;
            }
            highest = highest.max(seq);
        }
        self.raise_mark(&subject, highest);
        Ok(published)
    }

    async fn last_seq(&self, agent: &AgentRef) -> Result<u64, BusError> {
        let subject = results_subject(&agent.tenant, &agent.fingerprint);
        // Always from the stream: the agent may have delivered through another gateway.
        let mark = self.stored_mark(&subject).await?;
        self.raise_mark(&subject, mark);
        Ok(mark)
    }

    async fn publish_presence(&self, event: &PresenceEvent) -> Result<(), BusError> {
        let subject = presence_subject(&event.agent.tenant, &event.agent.fingerprint);
        let body = serde_json::to_vec(event).map_err(|e| unavailable("cannot encode", e))?;
        self.nats
            .js
            .publish(subject, body.into())
            .await
            .map_err(|e| unavailable("cannot publish presence", e))?
            .await
            .map_err(|e| unavailable("JetStream did not ack presence", e))?;
        Ok(())
    }

    async fn publish_audit(&self, event: &AuditEvent) -> Result<(), BusError> {
        let subject = audit_subject(&event.tenant);
        let body = serde_json::to_vec(event).map_err(|e| unavailable("cannot encode", e))?;
        self.nats
            .js
            .publish(subject, body.into())
            .await
            .map_err(|e| unavailable("cannot publish an audit event", e))?
            .await
            .map_err(|e| unavailable("JetStream did not ack an audit event", e))?;
        Ok(())
    }

    fn unavailable(&self) -> Option<String> {
        (!self.nats.connected()).then(|| "not connected to NATS".to_string())
    }
}
