//! Admission of connections before authentication: a bounded pool of slots, one per
//! accepted TCP connection, held until the connection closes or, for an agent websocket,
//! until its hello is authenticated.
//!
//! Without it, clients that never authenticate (or that ask for a release file and never
//! read it) can hold every file descriptor of the process: then the API, enrollments and
//! even the checks rescan fail with "Too many open files". The pool is global
//! (`--max-unauthenticated`), and once half of it is in use one address may hold at most
//! `--max-unauthenticated-per-address` of it. Below half nothing is counted per address:
//! agents behind a TCP load balancer all come from the balancer's address, and their
//! reconnect storm after a restart must not be throttled when nothing is under pressure.
//!
//! What this is not: a limit on authenticated agents (that is `--max-agents`), nor a rate
//! limit. A refused connection is closed by the listener before TLS.

use outpost_sys::lock;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// The default global cap is the descriptor limit divided by this: a stalled download
/// holds two descriptors (its socket and the file), and the rest stays for agents, the
/// bus, NATS and the data directory.
const SHARE_OF_NOFILE: u64 = 4;
/// Bounds of the default global cap.
pub const DEFAULT_MIN: usize = 64;
pub const DEFAULT_MAX: usize = 16_384;
/// The two caps; 0 means no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections not yet authenticated, from all addresses together.
    pub global: usize,
    /// Of those, from one address, counted once half of `global` is in use.
    pub per_address: usize,
}

/// Why a connection was refused (the `reason` label of
/// `outpost_connections_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Every slot of the global pool is taken.
    Full,
    /// The pool is at least half full and this address holds its share.
    PerAddress,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Full => crate::metrics::REFUSED_UNAUTHENTICATED_LIMIT,
            Refusal::PerAddress => crate::metrics::REFUSED_PER_ADDRESS_LIMIT,
        }
    }
}

/// The pool of slots. Cloning shares it.
#[derive(Clone)]
pub struct Admission {
    inner: Arc<Inner>,
}

struct Inner {
    limits: Limits,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    in_use: usize,
    /// Slots held per address (see [`address_key`]); addresses holding none are removed.
    by_address: HashMap<IpAddr, usize>,
}

/// The address a slot is counted under: an IPv4 address (also when it arrives mapped into
/// IPv6), or the /64 an IPv6 address is in, since one host usually holds a whole /64.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

impl Admission {
    pub fn new(limits: Limits) -> Admission {
        Admission {
            inner: Arc::new(Inner {
                limits,
                state: Mutex::default(),
            }),
        }
    }

    pub fn limits(&self) -> Limits {
        self.inner.limits
    }

    /// Slots held now.
    pub fn in_use(&self) -> usize {
        lock(&self.inner.state).in_use
    }

    /// A slot for a connection from `ip`, or why there is none.
    pub fn admit(&self, ip: IpAddr) -> Result<Slot, Refusal> {
        let Limits {
            global,
            per_address,
        } = self.inner.limits;
        let key = address_key(ip);
        let mut state = lock(&self.inner.state);
        if global > 0 {
            if state.in_use >= global {
                return Err(Refusal::Full);
            }
            let pressure = state.in_use * 2 >= global;
            let held = state.by_address.get(&key).copied().unwrap_or(0);
            if pressure && per_address > 0 && held >= per_address {
                return Err(Refusal::PerAddress);
            }
        }
        state.in_use += 1;
        *state.by_address.entry(key).or_default() += 1;
        Ok(Slot {
            inner: self.inner.clone(),
            key,
        })
    }
}

/// One connection's place in the pool, given back when dropped.
pub struct Slot {
    inner: Arc<Inner>,
    key: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut state = lock(&self.inner.state);
        state.in_use = state.in_use.saturating_sub(1);
        if let Some(n) = state.by_address.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                state.by_address.remove(&self.key);
            }
        }
    }
}

/// A connection's slot, shared between the HTTP connection (which holds it until it ends)
/// and, through a request extension, the agent session that [`release`](Self::release)s
/// it once the agent is authenticated. The slot goes back when it is released or when the
/// last holder is dropped, whichever comes first.
#[derive(Clone)]
pub struct PreAuth(Arc<Mutex<Option<Slot>>>);

impl PreAuth {
    pub fn new(slot: Slot) -> PreAuth {
        PreAuth(Arc::new(Mutex::new(Some(slot))))
    }

    /// Give the slot back now: the connection is authenticated and no longer counts.
    pub fn release(self) {
        let slot = lock(&self.0).take();
        drop(slot);
    }
}

/// The default global cap for a soft descriptor limit of `nofile` (`None`: unknown or
/// unlimited): a quarter of it, between [`DEFAULT_MIN`] and [`DEFAULT_MAX`].
pub fn default_global(nofile: Option<u64>) -> usize {
    match nofile {
        Some(n) => (n / SHARE_OF_NOFILE).clamp(DEFAULT_MIN as u64, DEFAULT_MAX as u64) as usize,
        None => DEFAULT_MAX,
    }
}

/// The process's descriptor limit before and after raising it.
#[derive(Debug, Clone, Copy)]
pub struct Nofile {
    pub soft_before: u64,
    pub soft: u64,
    pub hard: u64,
}

/// Raise the soft RLIMIT_NOFILE to the hard limit (the soft one is often 1024 while the
/// hard one allows far more): `None` where there is no such limit or it cannot be read.
#[cfg(unix)]
#[allow(clippy::unnecessary_cast)] // rlim_t is u64 on Linux, not on every unix
pub fn raise_nofile() -> Option<Nofile> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and fill a plain struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        let soft_before = lim.rlim_cur as u64;
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim = want;
            }
        }
        Some(Nofile {
            soft_before,
            soft: lim.rlim_cur as u64,
            hard: lim.rlim_max as u64,
        })
    }
}

#[cfg(not(unix))]
pub fn raise_nofile() -> Option<Nofile> {
    None
}

/// `RLIM_INFINITY` (and anything near it) is no limit to divide.
pub fn finite(nofile: Option<Nofile>) -> Option<u64> {
    nofile.map(|n| n.soft).filter(|&n| n < (1 << 40))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn pool(global: usize, per_address: usize) -> Admission {
        Admission::new(Limits {
            global,
            per_address,
        })
    }

    #[test]
    fn the_global_cap_refuses_when_full_and_a_dropped_slot_frees_a_place() {
        let a = pool(4, 0);
        let mut slots: Vec<Slot> = (1..=4)
            .map(|i| a.admit(ip(&format!("10.0.0.{i}"))).unwrap())
            .collect();
        assert_eq!(a.in_use(), 4);
        assert_eq!(a.admit(ip("10.0.0.9")).err(), Some(Refusal::Full));
        slots.pop();
        assert_eq!(a.in_use(), 3);
        assert!(a.admit(ip("10.0.0.9")).is_ok());
        // That slot was dropped at once: three held again.
        assert_eq!(a.in_use(), 3);
    }

    #[test]
    fn one_address_is_not_limited_until_half_the_pool_is_in_use() {
        // A reconnect storm through a load balancer: one address, no other load.
        let a = pool(10, 2);
        let lb = ip("192.0.2.1");
        let held: Vec<Slot> = (0..5).map(|_| a.admit(lb).unwrap()).collect();
        // Half in use: now the address holds more than its share and is refused...
        assert_eq!(a.admit(lb).err(), Some(Refusal::PerAddress));
        // ...while others still get in, up to the global cap.
        let others: Vec<Slot> = (1..=5)
            .map(|i| a.admit(ip(&format!("198.51.100.{i}"))).unwrap())
            .collect();
        assert_eq!(a.admit(ip("203.0.113.1")).err(), Some(Refusal::Full));
        // Back under half: the address is unlimited again.
        drop(others);
        drop(held);
        assert_eq!(a.in_use(), 0);
        let again: Vec<Slot> = (0..5).map(|_| a.admit(lb).unwrap()).collect();
        assert_eq!(again.len(), 5);
    }

    #[test]
    fn under_pressure_an_address_below_its_share_is_admitted() {
        let a = pool(10, 2);
        let _busy: Vec<Slot> = (0..5).map(|_| a.admit(ip("192.0.2.1")).unwrap()).collect();
        let x = ip("198.51.100.7");
        let first = a.admit(x).unwrap();
        let _second = a.admit(x).unwrap();
        assert_eq!(a.admit(x).err(), Some(Refusal::PerAddress));
        drop(first);
        assert!(
            a.admit(x).is_ok(),
            "a slot given back counts for its address"
        );
    }

    #[test]
    fn zero_means_no_limit() {
        let a = pool(0, 0);
        let slots: Vec<Slot> = (0..10_000)
            .map(|_| a.admit(ip("10.0.0.1")).unwrap())
            .collect();
        assert_eq!(a.in_use(), slots.len());
        // A global cap without a per-address one.
        let a = pool(4, 0);
        let slots: Vec<Slot> = (0..4).map(|_| a.admit(ip("10.0.0.1")).unwrap()).collect();
        assert_eq!(a.admit(ip("10.0.0.1")).err(), Some(Refusal::Full));
        drop(slots);
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(
            address_key(ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd")),
            ip("2001:db8:1:2::")
        );
        assert_eq!(address_key(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
        let a = pool(4, 1);
        let _x = a.admit(ip("2001:db8::1")).unwrap();
        let _y = a.admit(ip("2001:db9::1")).unwrap();
        assert_eq!(
            a.admit(ip("2001:db8::2")).err(),
            Some(Refusal::PerAddress),
            "same /64"
        );
        assert!(a.admit(ip("2001:db8:0:1::2")).is_ok(), "another /64");
    }

    #[test]
    fn a_released_pre_auth_slot_is_given_back_once() {
        let a = pool(4, 0);
        let pre = PreAuth::new(a.admit(ip("10.0.0.1")).unwrap());
        let session = pre.clone();
        assert_eq!(a.in_use(), 1);
        // The agent authenticated: the session gives the slot back while the connection
        // (holding `pre`) goes on.
        session.release();
        assert_eq!(a.in_use(), 0);
        drop(pre);
        assert_eq!(a.in_use(), 0);
        // Not released: given back when the last holder goes.
        let pre = PreAuth::new(a.admit(ip("10.0.0.1")).unwrap());
        let session = pre.clone();
        drop(pre);
        assert_eq!(a.in_use(), 1);
        drop(session);
        assert_eq!(a.in_use(), 0);
    }

    #[test]
    fn the_default_cap_is_a_quarter_of_the_descriptor_limit_within_bounds() {
        assert_eq!(default_global(Some(1024)), 256);
        assert_eq!(default_global(Some(512)), 128);
        assert_eq!(default_global(Some(100)), DEFAULT_MIN);
        assert_eq!(default_global(Some(1 << 20)), DEFAULT_MAX);
        assert_eq!(default_global(None), DEFAULT_MAX);
        let unlimited = Nofile {
            soft_before: u64::MAX,
            soft: u64::MAX,
            hard: u64::MAX,
        };
        assert_eq!(default_global(finite(Some(unlimited))), DEFAULT_MAX);
    }
}
