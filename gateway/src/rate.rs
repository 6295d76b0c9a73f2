//! How fast one agent may hand results to the bus. A session takes a batch, publishes it,
//! and then holds the batch's ack for as long as the agent is ahead of its rate: the agent
//! sends its next batch only after an ack, so the results it makes meanwhile wait in its
//! disk outbox. Nothing is dropped and nothing is refused; an agent that floods (a broken
//! plugin, a stolen secret) is slowed to its share instead of filling the bus.
//!
//! Two token buckets, one for results and one for bytes of result JSON, each refilled at
//! its rate per second and holding at most two seconds' worth, so a quiet agent's burst
//! (a run of checks at the same second) goes through at once. A session starts with empty
//! buckets: reconnecting buys an agent no burst.

use outpost_sys::lock;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What one agent may send per second; 0 switches a bound off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentRate {
    pub results_per_sec: u64,
    pub bytes_per_sec: u64,
}

impl AgentRate {
    pub const UNLIMITED: AgentRate = AgentRate {
        results_per_sec: 0,
        bytes_per_sec: 0,
    };
}

/// Seconds of rate a bucket holds: the largest burst an agent sends without waiting.
const BURST_SECS: f64 = 2.0;
/// Longest a single ack is held: well under the agent's 30 s ack deadline, after which it
/// would reconnect. A larger debt is paid over the following batches; so a rate below one
/// full frame per 20 s (12.8 results/s, 52 KB/s) cannot be held exactly.
pub const MAX_HOLD: Duration = Duration::from_secs(20);

#[derive(Debug)]
struct Bucket {
    rate: f64,
    /// Tokens now; negative while the agent is in debt.
    level: f64,
}

impl Bucket {
    fn new(rate: u64) -> Bucket {
        let rate = rate as f64;
        Bucket { rate, level: 0.0 }
    }

    fn refill(&mut self, elapsed: f64) {
        self.level = (self.level + elapsed * self.rate).min(self.rate * BURST_SECS);
    }

    /// Take `n` tokens; how long until the level is back at zero (none when not in debt).
    fn take(&mut self, n: f64) -> Duration {
        self.level -= n;
        if self.level >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.level / self.rate)
        }
    }
}

/// One agent's limiter, for the life of its session.
#[derive(Debug)]
pub struct Limiter {
    results: Option<Bucket>,
    bytes: Option<Bucket>,
    last: Instant,
}

impl Limiter {
    pub fn new(rate: AgentRate, now: Instant) -> Limiter {
        let bucket = |r: u64| (r > 0).then(|| Bucket::new(r));
        Limiter {
            results: bucket(rate.results_per_sec),
            bytes: bucket(rate.bytes_per_sec),
            last: now,
        }
    }

    /// Account for a batch of `results` results and `bytes` bytes taken at `now`; returns
    /// how long to hold its ack (at most [`MAX_HOLD`]).
    pub fn hold_for(&mut self, results: usize, bytes: usize, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        let mut hold = Duration::ZERO;
        for (bucket, n) in [(&mut self.results, results), (&mut self.bytes, bytes)] {
            if let Some(b) = bucket {
                b.refill(elapsed);
                hold = hold.max(b.take(n as f64));
            }
        }
        hold.min(MAX_HOLD)
    }
}

/// Each tenant's result rate on this gateway: one bucket per tenant, shared by all its
/// sessions, so a tenant over its limit has every one of its agents' acks held (its
/// results wait on their disks) while other tenants' buckets are untouched.
#[derive(Default)]
pub struct TenantRates {
    buckets: Mutex<HashMap<String, (Bucket, Instant)>>,
}

impl TenantRates {
    /// Account for `results` results of `tenant`, whose limit here is `per_sec` (`None`:
    /// unlimited), taken at `now`; how long to hold their ack (at most [`MAX_HOLD`]).
    pub fn hold_for(
        &self,
        tenant: &str,
        per_sec: Option<u64>,
        results: usize,
        now: Instant,
    ) -> Duration {
        let mut buckets = lock(&self.buckets);
        let Some(rate) = per_sec.filter(|r| *r > 0) else {
            buckets.remove(tenant);
            return Duration::ZERO;
        };
        let (bucket, last) = buckets
            .entry(tenant.to_string())
            .or_insert_with(|| (Bucket::new(rate), now));
        if bucket.rate != rate as f64 {
            // The limit changed: the new rate, and what was saved up is kept.
            bucket.rate = rate as f64;
        }
        bucket.refill(now.saturating_duration_since(*last).as_secs_f64());
        *last = now;
        let hold = bucket.take(results as f64);
        // Many agents each held MAX_HOLD at most: a debt beyond that much is not paid by
        // anyone, so it is not kept (a flood that stopped is forgotten within MAX_HOLD).
        bucket.level = bucket.level.max(-bucket.rate * MAX_HOLD.as_secs_f64());
        hold.min(MAX_HOLD)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATE: AgentRate = AgentRate {
        results_per_sec: 100,
        bytes_per_sec: 10_000,
    };

    /// An agent that always sends its next batch as soon as it is acked gets its rate,
    /// within a batch, over a long run; a burst of two seconds' worth is not held.
    #[test]
    fn a_flooding_agent_is_held_to_its_rate_and_a_burst_is_not() {
        let start = Instant::now();
        // A new session has no burst to spend: its first batch is held for its share.
        let mut fresh = Limiter::new(RATE, start);
        assert_eq!(fresh.hold_for(200, 100, start), Duration::from_secs(2));
        let mut l = Limiter::new(RATE, start);
        let start = start + Duration::from_secs(2);
        assert_eq!(
            l.hold_for(200, 100, start),
            Duration::ZERO,
            "the burst after 2 quiet s"
        );
        let mut now = start;
        let mut sent = 200u64;
        while now < start + Duration::from_secs(60) {
            now += l.hold_for(50, 100, now);
            sent += 50;
        }
        let rate = sent as f64 / now.duration_since(start).as_secs_f64();
        assert!((95.0..=110.0).contains(&rate), "{rate} results/s");
    }

    #[test]
    fn bytes_limit_on_their_own_and_holds_are_capped() {
        let start = Instant::now();
        let mut l = Limiter::new(RATE, start);
        // 210 KB in one batch of a new session: 21 s of debt, held 20 s at most.
        assert_eq!(l.hold_for(1, 210_000, start), MAX_HOLD);
        // The rest of the debt is held on the next batch.
        let next = start + MAX_HOLD;
        let hold = l.hold_for(1, 0, next);
        assert!(
            hold > Duration::from_millis(900) && hold <= Duration::from_millis(1000),
            "{hold:?}"
        );
    }

    /// Many agents of one tenant together get the tenant's rate; another tenant's agents
    /// are not held at all; a debt is forgotten within MAX_HOLD once the flood stops.
    #[test]
    fn a_tenant_over_its_rate_is_held_as_a_whole_and_no_one_else_is() {
        let rates = TenantRates::default();
        let start = Instant::now();
        // Ten agents of acme, each sending 50 results as soon as its ack comes.
        let mut next = [start; 10];
        let mut sent = 0u64;
        let end = start + Duration::from_secs(120);
        loop {
            let (i, at) = next.iter().enumerate().min_by_key(|(_, t)| **t).unwrap();
            let at = *at;
            if at >= end {
                break;
            }
            next[i] = at + rates.hold_for("acme", Some(100), 50, at);
            sent += 50;
            // globex, unlimited and limited far above what it sends, is never held.
            assert_eq!(rates.hold_for("globex", None, 1000, at), Duration::ZERO);
        }
        let rate = sent as f64 / 120.0;
        // Ten agents held MAX_HOLD at most each can exceed the rate only by their last
        // batches: within a few percent over two minutes.
        assert!((95.0..=115.0).contains(&rate), "{rate} results/s");
        let later = end + MAX_HOLD + Duration::from_secs(3);
        assert_eq!(rates.hold_for("acme", Some(100), 50, later), Duration::ZERO);
    }

    #[test]
    fn a_quiet_agent_is_never_held_and_unlimited_never_is() {
        let start = Instant::now();
        let mut l = Limiter::new(RATE, start);
        let mut u = Limiter::new(AgentRate::UNLIMITED, start);
        for i in 1..1000u64 {
            let now = start + Duration::from_secs(i);
            assert_eq!(l.hold_for(10, 1000, now), Duration::ZERO);
            assert_eq!(u.hold_for(100_000, 1 << 30, now), Duration::ZERO);
        }
    }
}
