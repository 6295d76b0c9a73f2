//! The per-collector secret that lets the agent's listeners tell a collector's data from
//! anyone else's on the host: the listeners are on 127.0.0.1, which every local user can
//! reach. Not here: where it is rendered ([`super::render`]) and checked ([`super::data`],
//! [`super::listen`]).
//!
//! Made when a collector is first declared in this agent's life and dropped when it is
//! removed, so re-declaring a collector unchanged renders the same file and does not
//! restart it. It is never persisted: an agent that starts again starts every collector
//! again, with a new secret in a new file. It lives in the collector's configuration file
//! (mode 0600, in the 0700 collectors directory) and in the agent's memory, and is never
//! logged: its `Debug` says `Secret(..)`.

use std::fmt;

/// 128 random bits as 32 lowercase hex digits: nothing in it is escaped by collectd's
/// `write_graphite`, a URL's user info or fluentd's configuration.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Its length in characters.
    pub const LEN: usize = 32;

    /// A new secret from the operating system's random source.
    pub fn generate() -> Secret {
        use rand::RngCore;
        let mut bytes = [0u8; Self::LEN / 2];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Secret(hex::encode(bytes))
    }

    /// The secret itself, to render into a configuration file (and nowhere else).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `given` is this secret, in a time that does not depend on where the two
    /// first differ (only on their length, which is public).
    pub fn matches(&self, given: &[u8]) -> bool {
        let mine = self.0.as_bytes();
        if mine.len() != given.len() {
            return false;
        }
        let diff = mine
            .iter()
            .zip(given)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(diff) == 0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_random_hex_compared_whole_and_never_printed() {
        let a = Secret::generate();
        let b = Secret::generate();
        assert_ne!(a, b);
        assert_eq!(a.expose().len(), Secret::LEN);
        assert!(a.expose().bytes().all(|c| c.is_ascii_hexdigit()));
        assert!(a.matches(a.expose().as_bytes()));
        assert!(!a.matches(b.expose().as_bytes()));
        assert!(!a.matches(&a.expose().as_bytes()[..Secret::LEN - 1]));
        assert!(!a.matches(format!("{}0", a.expose()).as_bytes()));
        assert!(!a.matches(b""));
        assert_eq!(format!("{a:?}"), "Secret(..)");
    }
}
