//! Counters for everything accepted, rejected, dropped or retried, exported at `/metrics`
//! in the Prometheus text format.

use outpost_sys::lock;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// The `reason` labels of `outpost_connections_refused_total`.
pub const REFUSED_UNAUTHENTICATED_LIMIT: &str = "unauthenticated_limit";
pub const REFUSED_PER_ADDRESS_LIMIT: &str = "per_address_limit";

#[derive(Default)]
pub struct Metrics {
    pub connections: AtomicU64,
    pub auth_failures: AtomicU64,
    pub hello_timeouts: AtomicU64,
    pub frames_malformed: AtomicU64,
    pub frames_too_big: AtomicU64,
    pub frames_out_of_order: AtomicU64,
    pub frames_unknown: AtomicU64,
    pub results_accepted: AtomicU64,
    pub results_duplicate: AtomicU64,
    pub bus_errors: AtomicU64,
    pub rpc_calls: AtomicU64,
    pub rpc_failures: AtomicU64,
    pub configs_sent: AtomicU64,
    pub configs_too_big: AtomicU64,
    pub check_file_errors: AtomicU64,
    pub overload_refusals: AtomicU64,
    /// Acks held because an agent was ahead of its rate, and for how long in all.
    pub acks_held: AtomicU64,
    pub ack_hold_ms: AtomicU64,
    /// Connections closed before TLS because `--max-unauthenticated` were open.
    pub refused_unauthenticated: AtomicU64,
    /// Connections closed before TLS because their address held its share of the pool.
    pub refused_per_address: AtomicU64,
    /// Connections closed because the client took no data within the write deadline.
    pub write_timeouts: AtomicU64,
    /// Audit events not published (over `audit::EVENTS_PER_SEC`).
    pub audit_dropped: AtomicU64,
    /// Event stream clients being served (their readers of the bus).
    pub event_streams: AtomicU64,
    /// Event stream clients ended because they left a full buffer waiting too long.
    pub event_streams_too_slow: AtomicU64,
    /// Refused access per (tenant, reason): see [`Metrics::refused`].
    refusals: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// Results the alert evaluators never read: retention deleted them first.
    pub alert_results_lost: AtomicU64,
    /// Failures to keep alert state or queued notifications (retried).
    pub alert_store_errors: AtomicU64,
    /// Notification delivery per (tenant, receiver): see [`Metrics::receiver`].
    receivers: Mutex<BTreeMap<(String, String), ReceiverStats>>,
    /// In a fleet: the tenants whose alerting lease this gateway holds (true) or held.
    leases: Mutex<BTreeMap<String, bool>>,
    /// Metric export per (tenant, sink): see [`Metrics::export`].
    exports: Mutex<BTreeMap<(String, String), ExportStats>>,
}

/// One metric export sink's figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportStats {
    /// Samples the sink took.
    pub samples_sent: u64,
    /// Samples the sink refused for good (another 4xx than 429), skipped.
    pub samples_refused: u64,
    /// Requests that failed and are retried (no answer, 429, 5xx).
    pub failed_attempts: u64,
    /// How far behind the sink is: the age of the oldest result read and not yet sent,
    /// in ms (0 when caught up).
    pub lag_ms: u64,
    /// Times retention deleted results before the sink got them.
    pub lost_gaps: u64,
}

/// One receiver's deliveries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReceiverStats {
    pub delivered: u64,
    /// Attempts that failed and will be retried.
    pub failed_attempts: u64,
    /// Notifications refused for good (each told to the fallback receiver, if any).
    pub refused: u64,
    /// Notifications waiting for it now.
    pub queued: u64,
}

/// Values read when `/metrics` is rendered rather than counted.
pub struct Gauges {
    pub agents_connected: usize,
    /// Connections holding a slot of the pool of unauthenticated connections.
    pub unauthenticated: usize,
    /// `--max-unauthenticated` in force (0: no limit).
    pub unauthenticated_limit: usize,
}

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Count a refused access of `tenant` (a tenant that exists, or "" when none is
    /// known: a name taken from a refused credential would let anyone grow this map).
    /// Reasons: `agent_credential`, `api_token`, `role`, `operator_only`, `agent_limit`,
    /// `revoked`, `results_rate` (an ack held for the tenant's rate).
    pub fn refused(&self, tenant: &str, reason: &'static str) {
        *lock(&self.refusals)
            .entry((tenant.to_string(), reason))
            .or_default() += 1;
    }

    /// Update the delivery figures of `tenant`'s `receiver`.
    pub fn receiver(&self, tenant: &str, receiver: &str, f: impl FnOnce(&mut ReceiverStats)) {
        let mut all = lock(&self.receivers);
        f(all
            .entry((tenant.to_string(), receiver.to_string()))
            .or_default());
    }

    /// Whether this gateway holds `tenant`'s alerting lease now.
    pub fn lease(&self, tenant: &str, held: bool) {
        lock(&self.leases).insert(tenant.to_string(), held);
    }

    /// Update the figures of `tenant`'s metric export `sink`.
    pub fn export(&self, tenant: &str, sink: &str, f: impl FnOnce(&mut ExportStats)) {
        let mut all = lock(&self.exports);
        f(all
            .entry((tenant.to_string(), sink.to_string()))
            .or_default());
    }

    /// Forget a removed sink's figures (its lag would stand still otherwise).
    pub fn export_forget(&self, tenant: &str, sink: &str) {
        lock(&self.exports).remove(&(tenant.to_string(), sink.to_string()));
    }

    /// The figures of `tenant`'s metric export `sink` so far.
    pub fn export_stats(&self, tenant: &str, sink: &str) -> ExportStats {
        lock(&self.exports)
            .get(&(tenant.to_string(), sink.to_string()))
            .copied()
            .unwrap_or_default()
    }

    /// The delivery figures of `tenant`'s `receiver` so far.
    pub fn receiver_stats(&self, tenant: &str, receiver: &str) -> ReceiverStats {
        lock(&self.receivers)
            .get(&(tenant.to_string(), receiver.to_string()))
            .copied()
            .unwrap_or_default()
    }

    /// The Prometheus text. `per_tenant`: refusals by tenant (for the operator; tenants'
    /// names are not for anyone who can reach the gateway), else by reason only.
    pub fn render(&self, gauges: Gauges, per_tenant: bool) -> String {
        let mut out = String::new();
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut line = |name: &str, kind: &str, help: &str, labels: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{labels} {v}"
            );
        };
        line(
            "outpost_agents_connected",
            "gauge",
            "Agents with a live session on this gateway.",
            "",
            gauges.agents_connected as u64,
        );
        line(
            "outpost_connections_unauthenticated",
            "gauge",
            "Connections not yet authenticated (each holds a slot of --max-unauthenticated).",
            "",
            gauges.unauthenticated as u64,
        );
        line(
            "outpost_connections_unauthenticated_limit",
            "gauge",
            "The --max-unauthenticated in force (0: no limit).",
            "",
            gauges.unauthenticated_limit as u64,
        );
        line(
            "outpost_connections_total",
            "counter",
            "Websocket connections opened.",
            "",
            g(&self.connections),
        );
        line(
            "outpost_overload_refusals_total",
            "counter",
            "Agents told to come back later because --max-agents were connected.",
            "",
            g(&self.overload_refusals),
        );
        line(
            "outpost_acks_held_total",
            "counter",
            "Result acks held back because an agent sent faster than --agent-max-results-per-sec or --agent-max-bytes-per-sec.",
            "",
            g(&self.acks_held),
        );
        line(
            "outpost_ack_hold_seconds_total",
            "counter",
            "Seconds result acks were held back in all.",
            "",
            g(&self.ack_hold_ms) / 1000,
        );
        line(
            "outpost_auth_failures_total",
            "counter",
            "Hellos whose credential was refused.",
            "",
            g(&self.auth_failures),
        );
        line(
            "outpost_hello_timeouts_total",
            "counter",
            "Connections closed for not sending hello in time.",
            "",
            g(&self.hello_timeouts),
        );
        let mut refused = String::new();
        for (reason, c) in [
            (REFUSED_UNAUTHENTICATED_LIMIT, &self.refused_unauthenticated),
            (REFUSED_PER_ADDRESS_LIMIT, &self.refused_per_address),
        ] {
            let _ = writeln!(
                refused,
                "outpost_connections_refused_total{{reason=\"{reason}\"}} {}",
                g(c)
            );
        }
        let _ = write!(out, "# HELP outpost_connections_refused_total Connections closed before TLS by the limits on unauthenticated connections, by reason.\n# TYPE outpost_connections_refused_total counter\n{refused}");
        let mut rejected = String::new();
        for (reason, c) in [
            ("malformed", &self.frames_malformed),
            ("too_big", &self.frames_too_big),
            ("out_of_order", &self.frames_out_of_order),
            ("unknown_type", &self.frames_unknown),
        ] {
            let _ = writeln!(
                rejected,
                "outpost_frames_rejected_total{{reason=\"{reason}\"}} {}",
                g(c)
            );
        }
        let _ = write!(out, "# HELP outpost_frames_rejected_total Frames refused, by reason.\n# TYPE outpost_frames_rejected_total counter\n{rejected}");
        let _ = writeln!(
            out,
            "# HELP outpost_event_streams Event stream clients being served.\n# TYPE outpost_event_streams gauge\noutpost_event_streams {}",
            g(&self.event_streams)
        );
        let mut line = |name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        line(
            "outpost_write_timeouts_total",
            "Connections closed because the client took no data within --write-deadline-secs.",
            g(&self.write_timeouts),
        );
        line(
            "outpost_event_streams_too_slow_total",
            "Event stream clients ended because they left a full buffer waiting longer than --events-stall-secs.",
            g(&self.event_streams_too_slow),
        );
        line(
            "outpost_results_accepted_total",
            "Results made durable on the bus.",
            g(&self.results_accepted),
        );
        line(
            "outpost_results_duplicate_total",
            "Results dropped as already durable (resends).",
            g(&self.results_duplicate),
        );
        line(
            "outpost_bus_errors_total",
            "Bus publishes that failed (batch not acked; the agent resends).",
            g(&self.bus_errors),
        );
        line(
            "outpost_rpc_calls_total",
            "Run-now calls sent to agents.",
            g(&self.rpc_calls),
        );
        line(
            "outpost_rpc_failures_total",
            "Run-now calls that failed or timed out.",
            g(&self.rpc_failures),
        );
        line(
            "outpost_configs_too_big_total",
            "Configs not sent because they exceed the frame limit.",
            g(&self.configs_too_big),
        );
        line(
            "outpost_configs_sent_total",
            "Config frames sent to agents.",
            g(&self.configs_sent),
        );
        line(
            "outpost_check_file_errors",
            "Check files that failed to parse at the last scan.",
            g(&self.check_file_errors),
        );
        line(
            "outpost_audit_events_dropped_total",
            "Refusals counted but not kept on the bus: over 100 audit events a second for one tenant.",
            g(&self.audit_dropped),
        );
        line(
            "outpost_alert_results_lost_total",
            "Results the alert evaluators never read: retention deleted them first.",
            g(&self.alert_results_lost),
        );
        line(
            "outpost_alert_store_errors_total",
            "Failures to keep alert state or queued notifications (retried until they succeed).",
            g(&self.alert_store_errors),
        );
        self.render_receivers(&mut out, per_tenant);
        self.render_exports(&mut out, per_tenant);
        let leases = lock(&self.leases).clone();
        if !leases.is_empty() {
            let name = "outpost_alerting_lease_held";
            let _ = writeln!(out, "# HELP {name} In a NATS fleet: 1 while this gateway holds the tenant's alerting lease (it evaluates and notifies for it).\n# TYPE {name} gauge");
            if per_tenant {
                for (tenant, held) in &leases {
                    let _ = writeln!(out, "{name}{{tenant=\"{tenant}\"}} {}", u8::from(*held));
                }
            } else {
                let _ = writeln!(out, "{name} {}", leases.values().filter(|h| **h).count());
            }
        }
        let mut refusals = lock(&self.refusals).clone();
        if !per_tenant {
            let mut by_reason: BTreeMap<(String, &'static str), u64> = BTreeMap::new();
            for ((_, reason), n) in refusals {
                *by_reason.entry((String::new(), reason)).or_default() += n;
            }
            refusals = by_reason;
        }
        if !refusals.is_empty() {
            let name = "outpost_access_refused_total";
            let _ = writeln!(out, "# HELP {name} Refused access by tenant (empty: not known) and reason (agent_credential, api_token, role, operator_only, agent_limit, revoked, results_rate: an ack held for the tenant's rate).\n# TYPE {name} counter");
            for ((tenant, reason), n) in refusals.iter() {
                let _ = match per_tenant {
                    true => writeln!(out, "{name}{{tenant=\"{tenant}\",reason=\"{reason}\"}} {n}"),
                    false => writeln!(out, "{name}{{reason=\"{reason}\"}} {n}"),
                };
            }
        }
        out
    }

    /// Export per sink: by tenant and sink for the operator; summed (the lag: the
    /// largest) otherwise.
    fn render_exports(&self, out: &mut String, per_tenant: bool) {
        let all = lock(&self.exports).clone();
        type Series = (
            &'static str,
            &'static str,
            &'static str,
            fn(&ExportStats) -> u64,
        );
        let series: [Series; 5] = [
            (
                "outpost_export_samples_sent_total",
                "counter",
                "Samples a metric export sink took.",
                |s| s.samples_sent,
            ),
            (
                "outpost_export_samples_refused_total",
                "counter",
                "Samples a sink refused for good (4xx other than 429), skipped.",
                |s| s.samples_refused,
            ),
            (
                "outpost_export_failed_requests_total",
                "counter",
                "Export requests that failed and are retried (no answer, 429, 5xx).",
                |s| s.failed_attempts,
            ),
            (
                "outpost_export_gaps_total",
                "counter",
                "Times the bus's retention deleted results before a sink got them.",
                |s| s.lost_gaps,
            ),
            (
                "outpost_export_lag_seconds",
                "gauge",
                "Age of the oldest result read and not yet taken by the sink (0: caught up).",
                |s| s.lag_ms / 1000,
            ),
        ];
        for (name, kind, help, value) in series {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            if per_tenant {
                for ((tenant, sink), stats) in &all {
                    let _ = writeln!(
                        out,
                        "{name}{{tenant=\"{tenant}\",sink=\"{sink}\"}} {}",
                        value(stats)
                    );
                }
            } else if kind == "gauge" {
                let max = all.values().map(value).max().unwrap_or(0);
                let _ = writeln!(out, "{name} {max}");
            } else {
                let sum: u64 = all.values().map(value).sum();
                let _ = writeln!(out, "{name} {sum}");
            }
        }
    }

    /// Delivery per receiver: by tenant and receiver for the operator; summed otherwise
    /// (receivers' names are the tenants' own).
    fn render_receivers(&self, out: &mut String, per_tenant: bool) {
        let all = lock(&self.receivers).clone();
        type Series = (
            &'static str,
            &'static str,
            &'static str,
            fn(&ReceiverStats) -> u64,
        );
        let series: [Series; 4] = [
            ("outpost_alert_notifications_delivered_total", "counter", "Notifications a receiver took (2xx).", |s| s.delivered),
            ("outpost_alert_delivery_failures_total", "counter", "Delivery attempts that failed and are retried (no answer, 408, 429, 5xx).", |s| s.failed_attempts),
            ("outpost_alert_notifications_refused_total", "counter", "Notifications a receiver refused for good (other 4xx); each is told to the fallback receiver.", |s| s.refused),
            ("outpost_alert_queue_depth", "gauge", "Notifications waiting for a receiver.", |s| s.queued),
        ];
        for (name, kind, help, value) in series {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            if per_tenant {
                for ((tenant, receiver), stats) in &all {
                    let _ = writeln!(
                        out,
                        "{name}{{tenant=\"{tenant}\",receiver=\"{receiver}\"}} {}",
                        value(stats)
                    );
                }
            } else {
                let sum: u64 = all.values().map(value).sum();
                let _ = writeln!(out, "{name} {sum}");
            }
        }
    }
}
