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

/// Audit events one gateway publishes per second and tenant at most.
pub const EVENTS_PER_SEC: u64 = 100;

pub struct Audit {
    bus: Arc<dyn Bus>,
    metrics: Arc<Metrics>,
    gateway: String,
    /// Per tenant: the current second and how many events it has published.
    windows: std::sync::Mutex<HashMap<String, (Instant, u64)>>,
}

impl Audit {
    pub fn new(bus: Arc<dyn Bus>, metrics: Arc<Metrics>, gateway: &str) -> Audit {
        Audit {
            bus,
            metrics,
            gateway: gateway.to_string(),
            windows: Default::default(),
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
