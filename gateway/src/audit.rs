//! Refused access, counted on `/metrics` per tenant and reason and kept as an audit event
//! on the bus (`bus/audit.jsonl`, or the `OUTPOST_AUDIT` stream on NATS), so a tenant can
//! see who tried what.
//!
//! Events are published off the request's path (a refusal never waits on the bus), and
//! at most [`EVENTS_PER_SEC`] a second per tenant leave one gateway (refusals naming no
//! tenant count as one more): someone hammering it with bad tokens cannot fill the bus, nor
//! crowd out another tenant's events. Beyond that they are still counted, and the number
//! left out is on `/metrics` (`outpost_audit_events_dropped_total`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use outpost_sys::lock;

use crate::bus::{AuditEvent, Bus};
use crate::metrics::Metrics;
use crate::util::now_ms;

/// How often a tenant held to its rate is kept on the bus while it lasts.
pub const HELD_EVENT_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Audit events one gateway publishes per second and tenant at most.
pub const EVENTS_PER_SEC: u64 = 100;

pub struct Audit {
    bus: Arc<dyn Bus>,
    metrics: Arc<Metrics>,
    gateway: String,
    /// Per tenant: the current second and how many events it has published.
    windows: std::sync::Mutex<HashMap<String, (Instant, u64)>>,
    /// Per tenant and reason, for [`Audit::held`]: when its last event was kept.
    last_held: std::sync::Mutex<HashMap<String, Instant>>,
}

impl Audit {
    pub fn new(bus: Arc<dyn Bus>, metrics: Arc<Metrics>, gateway: &str) -> Audit {
        Audit {
            bus,
            metrics,
            gateway: gateway.to_string(),
            windows: Default::default(),
            last_held: Default::default(),
        }
    }

    /// Count a refusal of `tenant` (one that exists, or ""), and keep it on the bus.
    /// `subject` says what was tried; `peer` where from.
    pub fn refused(
        &self,
        tenant: &str,
        reason: &'static str,
        subject: String,
        peer: Option<String>,
    ) {
        self.metrics.refused(tenant, reason);
        if !self.within_budget(tenant) {
            Metrics::inc(&self.metrics.audit_dropped);
            return;
        }
        let event = AuditEvent {
            tenant: tenant.to_string(),
            at_ms: now_ms(),
            action: "refused".into(),
            reason: reason.into(),
            subject,
            peer,
            gateway: self.gateway.clone(),
        };
        let (bus, metrics) = (self.bus.clone(), self.metrics.clone());
        tokio::spawn(async move {
            if let Err(e) = bus.publish_audit(&event).await {
                Metrics::inc(&metrics.bus_errors);
                tracing::warn!(error = %e, "cannot keep an audit event");
            }
        });
    }

    /// A tenant slowed to its limit (an ack held for its result rate): counted every time,
    /// kept on the bus once a minute at most while it lasts. (An event per held ack would
    /// put an fsync of the audit log in front of every other tenant's acks.)
    pub fn held(&self, tenant: &str, reason: &'static str, subject: String, peer: Option<String>) {
        let now = Instant::now();
        let due = {
            let mut last = lock(&self.last_held);
            match last.get(tenant) {
                Some(at) if now.duration_since(*at) < HELD_EVENT_EVERY => false,
                _ => {
                    last.insert(tenant.to_string(), now);
                    true
                }
            }
        };
        if due {
            self.refused(tenant, reason, subject, peer);
        } else {
            self.metrics.refused(tenant, reason);
        }
    }

    /// Whether `tenant` may publish one more event this second. (Its key is a tenant
    /// that exists or "": the map is as large as the tenants.)
    fn within_budget(&self, tenant: &str) -> bool {
        let mut windows = lock(&self.windows);
        let now = Instant::now();
        let window = windows.entry(tenant.to_string()).or_insert((now, 0));
        if now.duration_since(window.0).as_secs() >= 1 {
            *window = (now, 0);
        }
        window.1 += 1;
        window.1 <= EVENTS_PER_SEC
    }
}
