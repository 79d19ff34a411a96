//! How many refused handshakes are logged one by one: the first few per interval are
//! recorded (a WARN line and `recent_errors`), the rest, and the openings the rate limit
//! dropped, only counted and reported once per interval in one summary line. So 20,000
//! bogus HS1s give a handful of lines, not 20,000, and the errors that matter (a real
//! mismatch with a real peer) still show.

use std::time::{Duration, Instant};

use crate::RelayError;

/// The interval of the summary.
pub(crate) const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Refusals recorded one by one per interval.
pub(crate) const REFUSALS_LOGGED_PER_INTERVAL: u32 = 4;

/// What was not logged one by one during an interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Quieted {
    /// Refused handshakes (and REJECTs received) past the per-interval quota.
    pub(crate) refused: u64,
    /// Handshake openings the rate limit dropped.
    pub(crate) limited: u64,
    /// The interval's length.
    pub(crate) over: Duration,
}

/// The counts of the current interval.
pub(crate) struct RefusalLog {
    since: Option<Instant>,
    logged: u32,
    refused: u64,
    limited: u64,
}

impl RefusalLog {
    pub(crate) fn new() -> Self {
        Self {
            since: None,
            logged: 0,
            refused: 0,
            limited: 0,
        }
    }

    fn start(&mut self, now: Instant) {
        self.since.get_or_insert(now);
    }

    /// A handshake was refused with `e`: `Some(e)` to record it, `None` when only counted.
    pub(crate) fn refused(&mut self, e: RelayError, now: Instant) -> Option<RelayError> {
        self.start(now);
        if self.logged < REFUSALS_LOGGED_PER_INTERVAL {
            self.logged += 1;
            return Some(e);
        }
        self.refused += 1;
        None
    }

    /// The rate limit dropped an opening.
    pub(crate) fn limited(&mut self, now: Instant) {
        self.start(now);
        self.limited += 1;
    }

    /// At the end of an interval: what was not logged one by one, if anything; a new
    /// interval starts with the next refusal.
    pub(crate) fn on_timeout(&mut self, now: Instant) -> Option<Quieted> {
        let since = self.since?;
        let over = now.saturating_duration_since(since);
        if over < REFUSAL_LOG_INTERVAL {
            return None;
        }
        let q = Quieted {
            refused: std::mem::take(&mut self.refused),
            limited: std::mem::take(&mut self.limited),
            over,
        };
        self.since = None;
        self.logged = 0;
        (q.refused > 0 || q.limited > 0).then_some(q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::SessionError;

    fn e() -> RelayError {
        RelayError::session(1, SessionError::HandshakeTimeout { ms: 1 })
    }

    #[test]
    fn a_few_per_interval_then_one_summary() {
        let t0 = Instant::now();
        let mut log = RefusalLog::new();
        assert_eq!(log.on_timeout(t0), None, "nothing happened");
        let recorded = (0..20_000)
            .filter(|_| log.refused(e(), t0).is_some())
            .count();
        assert_eq!(recorded, REFUSALS_LOGGED_PER_INTERVAL as usize);
        for _ in 0..7 {
            log.limited(t0);
        }
        assert_eq!(log.on_timeout(t0 + REFUSAL_LOG_INTERVAL / 2), None);
        let end = t0 + REFUSAL_LOG_INTERVAL;
        assert_eq!(
            log.on_timeout(end),
            Some(Quieted {
                refused: 20_000 - u64::from(REFUSALS_LOGGED_PER_INTERVAL),
                limited: 7,
                over: REFUSAL_LOG_INTERVAL
            })
        );
        assert_eq!(log.on_timeout(end + REFUSAL_LOG_INTERVAL), None);
        // A new interval: the quota is back.
        assert!(log.refused(e(), end).is_some());
        assert_eq!(
            log.on_timeout(end + REFUSAL_LOG_INTERVAL),
            None,
            "everything was logged one by one: no summary"
        );
    }
}
