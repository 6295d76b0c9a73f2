//! What one attempt to deliver a notification means for the next: delivered, try again
//! (when), or refused for good. Every receiver's answer goes through [`judge`], so the
//! rules are the same for all: 2xx is delivered; 408, 429, 5xx and a failure to connect
//! or to get an answer in time are tried again with exponential backoff, or after the
//! receiver's `Retry-After` when it gives one (capped, so a receiver cannot park a
//! notification for days); any other answer is a permanent refusal, counted and itself
//! notified on the fallback receiver as undeliverable.

use std::time::{Duration, SystemTime};

/// The first retry's wait; each next doubles it.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest wait between two attempts, backoff or `Retry-After`.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);
/// The longest backoff of our own (a `Retry-After` may ask for more, up to [`MAX_WAIT`]).
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// What an attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    /// Try again after this long.
    Retry {
        after: Duration,
        why: String,
    },
    /// Do not try again.
    Refused {
        why: String,
    },
}

/// What the receiver answered: a status and its `Retry-After` header, or no answer.
pub enum Answer<'a> {
    Status {
        code: u16,
        retry_after: Option<&'a str>,
    },
    /// No answer: could not connect, TLS failed, timed out.
    Failed(&'a str),
}

/// Judge attempt number `attempt` (1 for the first) that got `answer` at `now`; our own
/// backoff goes no higher than `cap` (the receiver's `retry_max`; a `Retry-After` may ask
/// for longer). Never less than [`FIRST_BACKOFF`] (a `Retry-After` of 0 or a date past is
/// not a reason to hammer a receiver).
pub fn judge(answer: Answer<'_>, attempt: u32, now: SystemTime, cap: Duration) -> Outcome {
    let backoff = |attempt| backoff(attempt).min(cap).max(FIRST_BACKOFF);
    match answer {
        Answer::Status { code, .. } if (200..300).contains(&code) => Outcome::Delivered,
        Answer::Status { code, retry_after } if code == 408 || code == 429 || code >= 500 => {
            let asked = retry_after.and_then(|v| retry_after_wait(v, now));
            Outcome::Retry {
                after: asked
                    .unwrap_or_else(|| backoff(attempt))
                    .clamp(FIRST_BACKOFF, MAX_WAIT),
                why: match asked {
                    Some(d) => format!("answered {code}, Retry-After {}s", d.as_secs()),
                    None => format!("answered {code}"),
                },
            }
        }
        Answer::Status { code, .. } => Outcome::Refused {
            why: format!("answered {code}: refused, not retried"),
        },
        Answer::Failed(why) => Outcome::Retry {
            after: backoff(attempt),
            why: why.to_string(),
        },
    }
}

/// The wait after attempt `attempt` failed: 1 s, 2 s, 4 s … up to [`MAX_BACKOFF`].
pub fn backoff(attempt: u32) -> Duration {
    let doublings = attempt.saturating_sub(1).min(20);
    FIRST_BACKOFF
        .saturating_mul(1 << doublings)
        .min(MAX_BACKOFF)
}

/// A `Retry-After` value (seconds, or an HTTP date) as a wait from `now`; `None` when it
/// does not read.
pub fn retry_after_wait(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16, retry_after: Option<&str>) -> Answer<'_> {
        Answer::Status { code, retry_after }
    }

    #[test]
    fn each_answer_is_judged_as_documented() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_806_400);
        assert_eq!(
            judge(status(200, None), 1, now, MAX_BACKOFF),
            Outcome::Delivered
        );
        assert_eq!(
            judge(status(204, None), 3, now, MAX_BACKOFF),
            Outcome::Delivered
        );
        for code in [400, 401, 403, 404, 410, 413, 422] {
            assert!(
                matches!(
                    judge(status(code, None), 1, now, MAX_BACKOFF),
                    Outcome::Refused { .. }
                ),
                "{code}"
            );
        }
        for code in [408, 429, 500, 502, 503, 504] {
            assert!(
                matches!(
                    judge(status(code, None), 1, now, MAX_BACKOFF),
                    Outcome::Retry { .. }
                ),
                "{code}"
            );
        }
        assert!(matches!(
            judge(Answer::Failed("connection refused"), 1, now, MAX_BACKOFF),
            Outcome::Retry { .. }
        ));
    }

    #[test]
    fn retry_after_is_honoured_in_seconds_or_as_a_date_and_capped() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_806_400);
        let after = |v: &str| match judge(status(429, Some(v)), 1, now, MAX_BACKOFF) {
            Outcome::Retry { after, .. } => after,
            other => panic!("{other:?}"),
        };
        assert_eq!(after("7"), Duration::from_secs(7));
        // 1_764_806_400 is Thu, 04 Dec 2025 00:00:00 GMT.
        assert_eq!(
            after("Thu, 04 Dec 2025 00:00:30 GMT"),
            Duration::from_secs(30)
        );
        // Now or in the past: not at once, after the first backoff.
        assert_eq!(after("Wed, 03 Dec 2025 23:00:00 GMT"), FIRST_BACKOFF);
        assert_eq!(after("0"), FIRST_BACKOFF);
        assert_eq!(after("86400"), MAX_WAIT);
        // Unreadable: our own backoff.
        assert_eq!(after("soon"), backoff(1));
    }

    #[test]
    fn a_receivers_cap_bounds_our_backoff_and_not_its_retry_after() {
        let now = SystemTime::UNIX_EPOCH;
        let cap = Duration::from_secs(2);
        let wait = |answer, attempt| match judge(answer, attempt, now, cap) {
            Outcome::Retry { after, .. } => after,
            other => panic!("{other:?}"),
        };
        assert_eq!(wait(status(503, None), 1), Duration::from_secs(1));
        assert_eq!(wait(status(503, None), 9), cap);
        assert_eq!(wait(Answer::Failed("refused"), 9), cap);
        assert_eq!(wait(status(429, Some("30")), 9), Duration::from_secs(30));
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(16));
        assert_eq!(backoff(30), MAX_BACKOFF);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }
}
