//! The kinds of failure the gateway's services report, and the HTTP status each becomes.
//! One table, used by the API and by run-now relayed between gateways (whose answers carry
//! the status, so gateways of different versions understand each other).

/// What went wrong, as a client can act on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request itself is malformed.
    BadRequest,
    /// No credential, or not a valid one.
    Unauthenticated,
    /// A valid credential without the right to do this.
    Forbidden,
    /// The thing named does not exist (for this caller).
    NotFound,
    /// It exists but is not in a state to do this (an agent not connected).
    Conflict,
    /// It can never be done this way (run-now of a daemon check).
    NotRunnable,
    /// Busy now: try again.
    Busy,
    /// Something further on failed or answered nonsense.
    Upstream,
    /// Something further on did not answer in time.
    Timeout,
    /// This gateway cannot serve it now (shutting down, its bus away).
    Unavailable,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 10] = [
        ErrorKind::BadRequest,
        ErrorKind::Unauthenticated,
        ErrorKind::Forbidden,
        ErrorKind::NotFound,
        ErrorKind::Conflict,
        ErrorKind::NotRunnable,
        ErrorKind::Busy,
        ErrorKind::Upstream,
        ErrorKind::Timeout,
        ErrorKind::Unavailable,
    ];

    /// The HTTP status of this kind.
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::BadRequest => 400,
            ErrorKind::Unauthenticated => 401,
            ErrorKind::Forbidden => 403,
            ErrorKind::NotFound => 404,
            ErrorKind::Conflict => 409,
            ErrorKind::NotRunnable => 422,
            ErrorKind::Busy => 429,
            ErrorKind::Upstream => 502,
            ErrorKind::Unavailable => 503,
            ErrorKind::Timeout => 504,
        }
    }

    /// The kind an HTTP status stands for; a status no kind has is an upstream failure.
    pub fn from_status(status: u16) -> ErrorKind {
        ErrorKind::ALL
            .into_iter()
            .find(|k| k.status() == status)
            .unwrap_or(ErrorKind::Upstream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_own_status_and_comes_back_from_it() {
        for k in ErrorKind::ALL {
            assert_eq!(ErrorKind::from_status(k.status()), k, "{k:?}");
            assert!((400..600).contains(&k.status()));
        }
        assert_eq!(ErrorKind::from_status(500), ErrorKind::Upstream);
        assert_eq!(ErrorKind::from_status(200), ErrorKind::Upstream);
    }
}
