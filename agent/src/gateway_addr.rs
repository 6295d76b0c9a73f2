//! Finding the gateway when DNS does not: resolve its name with the system's configuration,
//! and when that fails, dial the last address that worked and then the fallback addresses
//! the gateway sent, both kept on disk (`gateway-addrs.json` in the state directory).
//! TLS verifies the gateway's name whichever address is dialled, so a cached address can
//! never lead the agent to another server.
//!
//! How the address was found is reported as the result of [`DNS_CHECK`], so a host whose
//! resolver broke shows up as "DNS is broken" rather than as an agent that went away.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use outpost_protocol::{CheckResult, Status};
use serde::{Deserialize, Serialize};

use crate::util::{now_ms, write_atomic};

/// The check under which the agent reports how it found its gateway.
pub const DNS_CHECK: &str = "outpost.dns";
/// Name of the cache file in the state directory.
pub const FILE_NAME: &str = "gateway-addrs.json";
/// Most fallback addresses kept from a `welcome`.
const MAX_FALLBACKS: usize = 16;

/// How an address to dial was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// The gateway is configured by address: no DNS involved.
    Literal,
    /// The system resolver answered.
    Resolved,
    /// The last address a session was established with.
    LastGood,
    /// An address the gateway sent in `welcome`.
    Fallback,
}

impl Via {
    fn describe(self) -> &'static str {
        match self {
            Via::Literal => "the configured address",
            Via::Resolved => "the resolved address",
            Via::LastGood => "the last address that worked",
            Via::Fallback => "a fallback address the gateway sent",
        }
    }
}

/// What is on disk: keyed by the gateway's host name, so changing `gateway_url` starts over.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Stored {
    host: String,
    #[serde(default)]
    last_good: Option<SocketAddr>,
    #[serde(default)]
    fallbacks: Vec<SocketAddr>,
}

/// The addresses to try for one gateway host, and the file they are kept in.
pub struct AddrBook {
    path: PathBuf,
    host: String,
    port: u16,
    stored: Stored,
    /// The key of the last `outpost.dns` result queued, so only changes are reported.
    reported: Option<String>,
}

/// The addresses one dial attempt should try, in order.
pub struct Candidates {
    pub addrs: Vec<(SocketAddr, Via)>,
    /// Why the name did not resolve, when it did not.
    pub resolve_error: Option<String>,
}

impl AddrBook {
    /// Load the cache for `host`; a missing, unreadable or foreign file starts empty.
    pub fn load(state_dir: &Path, host: &str, port: u16) -> AddrBook {
        let path = state_dir.join(FILE_NAME);
        let stored = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<Stored>(&bytes) {
                Ok(s) if s.host == host => s,
                Ok(_) => Stored::default(),
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "ignoring an unreadable gateway address cache");
                    Stored::default()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Stored::default(),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot read the gateway address cache");
                Stored::default()
            }
        };
        AddrBook {
            path,
            host: host.to_string(),
            port,
            stored: Stored {
                host: host.to_string(),
                ..stored
            },
            reported: None,
        }
    }

    /// Resolve the gateway's name; when that fails, the cached addresses.
    pub async fn candidates(&self, deadline: std::time::Duration) -> Candidates {
        if let Ok(ip) = self.host.trim_matches(['[', ']']).parse::<IpAddr>() {
            return Candidates {
                addrs: vec![(SocketAddr::new(ip, self.port), Via::Literal)],
                resolve_error: None,
            };
        }
        let looked_up = tokio::time::timeout(
            deadline,
            tokio::net::lookup_host((self.host.as_str(), self.port)),
        )
        .await;
        let error = match looked_up {
            Ok(Ok(found)) => {
                let mut addrs: Vec<(SocketAddr, Via)> = Vec::new();
                for a in found {
                    if !addrs.iter().any(|(b, _)| *b == a) {
                        addrs.push((a, Via::Resolved));
                    }
                }
                if !addrs.is_empty() {
                    return Candidates {
                        addrs,
                        resolve_error: None,
                    };
                }
                "no addresses".to_string()
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {}s", deadline.as_secs()),
        };
        Candidates {
            addrs: self.cached(),
            resolve_error: Some(error),
        }
    }

    /// The last address that worked, then the gateway's fallbacks, without repeats.
    fn cached(&self) -> Vec<(SocketAddr, Via)> {
        let mut out: Vec<(SocketAddr, Via)> = Vec::new();
        let all = self
            .stored
            .last_good
            .map(|a| (a, Via::LastGood))
            .into_iter()
            .chain(self.stored.fallbacks.iter().map(|a| (*a, Via::Fallback)));
        for (a, via) in all {
            if !out.iter().any(|(b, _)| *b == a) {
                out.push((a, via));
            }
        }
        out
    }

    /// A session was established through `addr`, and the gateway sent `fallbacks`.
    pub fn connected(&mut self, addr: SocketAddr, via: Via, fallbacks: &[String]) {
        let mut next = self.stored.clone();
        if via != Via::Literal {
            next.last_good = Some(addr);
        }
        let mut parsed = Vec::new();
        for f in fallbacks.iter().take(MAX_FALLBACKS) {
            match f.parse::<SocketAddr>() {
                Ok(a) => parsed.push(a),
                Err(_) => {
                    tracing::warn!(address = %f, "ignoring a fallback address that is not ip:port")
                }
            }
        }
        next.fallbacks = parsed;
        if next != self.stored {
            self.stored = next;
            let bytes = serde_json::to_vec_pretty(&self.stored).unwrap_or_default();
            if let Err(e) = write_atomic(&self.path, &bytes, 0o644) {
                tracing::warn!(file = %self.path.display(), error = %e, "cannot save the gateway address cache");
            }
        }
    }

    /// The `outpost.dns` result for a dial attempt, when it says something new: the first
    /// one after start, and then each change between "resolves", "broken but connected
    /// through ...", and "broken and unreachable". `None` for a gateway given by address.
    pub fn report(
        &mut self,
        resolve_error: Option<&str>,
        connected: Option<(SocketAddr, Via)>,
    ) -> Option<CheckResult> {
        if connected.is_some_and(|(_, via)| via == Via::Literal) {
            return None;
        }
        let host = &self.host;
        let (key, status, text) = match (resolve_error, connected) {
            (None, Some((addr, _))) => (
                "ok".to_string(),
                Status::Ok,
                format!("{host} resolves; connected to {addr}"),
            ),
            (None, None) => return None,
            (Some(err), Some((addr, via))) => (
                format!("broken via {via:?}"),
                Status::Critical,
                format!(
                    "DNS is broken on this host: cannot resolve {host} ({err}); connected through {}, {addr}",
                    via.describe()
                ),
            ),
            (Some(err), None) => (
                "broken".to_string(),
                Status::Critical,
                format!(
                    "DNS is broken on this host: cannot resolve {host} ({err}), and {}",
                    match self.cached().len() {
                        0 => "no address that worked before is known".to_string(),
                        n => format!("none of the {n} cached addresses answered"),
                    }
                ),
            ),
        };
        if self.reported.as_deref() == Some(key.as_str()) {
            return None;
        }
        self.reported = Some(key);
        Some(CheckResult {
            started_at_ms: now_ms(),
            ..CheckResult::new(DNS_CHECK, status, text)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn a_literal_address_needs_no_dns_and_is_not_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut book = AddrBook::load(dir.path(), "127.0.0.1", 8443);
        let c = book.candidates(std::time::Duration::from_secs(1)).await;
        assert_eq!(c.addrs, [(addr("127.0.0.1:8443"), Via::Literal)]);
        assert!(c.resolve_error.is_none());
        assert!(book
            .report(None, Some((addr("127.0.0.1:8443"), Via::Literal)))
            .is_none());
        let v6 = AddrBook::load(dir.path(), "[::1]", 9);
        let c = v6.candidates(std::time::Duration::from_secs(1)).await;
        assert_eq!(c.addrs, [(addr("[::1]:9"), Via::Literal)]);
    }

    #[tokio::test]
    async fn a_name_that_does_not_resolve_falls_back_to_the_cache_in_order() {
        let dir = tempfile::tempdir().unwrap();
        // `.invalid` never resolves (RFC 6761).
        let host = "gateway.outpost.invalid";
        let mut book = AddrBook::load(dir.path(), host, 8443);
        let c = book.candidates(std::time::Duration::from_secs(5)).await;
        assert!(c.addrs.is_empty());
        assert!(c.resolve_error.is_some());
        book.connected(
            addr("10.0.0.1:8443"),
            Via::Resolved,
            &["10.0.0.2:443".into(), "10.0.0.1:8443".into(), "junk".into()],
        );
        // Reloaded from disk, as after a restart.
        let book = AddrBook::load(dir.path(), host, 8443);
        let c = book.candidates(std::time::Duration::from_secs(5)).await;
        assert_eq!(
            c.addrs,
            [
                (addr("10.0.0.1:8443"), Via::LastGood),
                (addr("10.0.0.2:443"), Via::Fallback)
            ]
        );
        // Another gateway name does not inherit the cache.
        let other = AddrBook::load(dir.path(), "other.outpost.invalid", 8443);
        assert!(other.cached().is_empty());
    }

    #[test]
    fn a_corrupt_cache_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), "{not json").unwrap();
        let book = AddrBook::load(dir.path(), "gw.example", 1);
        assert!(book.cached().is_empty());
    }

    #[test]
    fn dns_results_are_reported_once_per_change() {
        let dir = tempfile::tempdir().unwrap();
        let mut book = AddrBook::load(dir.path(), "gw.example", 1);
        let a = addr("10.0.0.1:1");
        let ok = book.report(None, Some((a, Via::Resolved))).unwrap();
        assert_eq!(ok.status, Status::Ok);
        assert_eq!(ok.check, DNS_CHECK);
        assert!(book.report(None, Some((a, Via::Resolved))).is_none());
        let broken = book
            .report(Some("lookup failed"), Some((a, Via::LastGood)))
            .unwrap();
        assert_eq!(broken.status, Status::Critical);
        assert!(
            broken.output.contains("DNS is broken")
                && broken.output.contains("lookup failed")
                && broken
                    .output
                    .contains("the last address that worked, 10.0.0.1:1"),
            "{}",
            broken.output
        );
        assert!(book
            .report(Some("lookup failed"), Some((a, Via::LastGood)))
            .is_none());
        let down = book.report(Some("lookup failed"), None).unwrap();
        assert!(
            down.output.contains("no address that worked before"),
            "{}",
            down.output
        );
        assert_eq!(
            book.report(None, Some((a, Via::Resolved))).unwrap().status,
            Status::Ok
        );
    }
}
