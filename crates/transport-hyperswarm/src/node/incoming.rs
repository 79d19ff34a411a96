//! The record of incoming handshakes: a count of each way they end ([`IncomingStats`]) and
//! the log policy for refusals. A remote sending thousands of bad handshakes must not make
//! the node write thousands of lines: the first refusal of each kind in an interval gets one
//! debug line with its address and error, the others are only counted, and one summary line
//! at the end of the interval says how many of each there were. Pure: every call takes `now`.

use std::fmt;
use std::time::{Duration, Instant};

use crate::IncomingStats;

/// How often refusals are summarised in the log (at most one summary line per interval).
pub(crate) const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);

/// What happened to an incoming attempt (one attempt may see several: attempt, message 2
/// sent, completed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Event {
    /// A first Initial arrived.
    Attempt,
    /// Answered with a QUIC Retry.
    Retried,
    /// Refused: too many handshakes in progress (in total or from its IP).
    Busy,
    /// Refused: its IP or address tries too often.
    RateLimited,
    /// The QUIC handshake refused another protocol version.
    Version,
    /// The QUIC handshake failed otherwise or timed out.
    QuicFailed,
    /// The named info-hash is no joined topic.
    UnknownInfoHash,
    /// Noise message 1 did not decrypt under the topic's key, or was malformed.
    Message1,
    /// Noise message 2 sent (two Diffie-Hellman operations).
    Message2Sent,
    /// Declined after message 1: no connections taken on the topic.
    Declined,
    /// Failed after message 1.
    FailedLate,
    /// Completed.
    Completed,
}

/// The refusals, in summary order.
const REFUSALS: [Event; 9] = [
    Event::Message1,
    Event::UnknownInfoHash,
    Event::RateLimited,
    Event::Busy,
    Event::Version,
    Event::Retried,
    Event::QuicFailed,
    Event::Declined,
    Event::FailedLate,
];

impl Event {
    fn refusal_index(self) -> Option<usize> {
        REFUSALS.iter().position(|e| *e == self)
    }

    /// Whether this refusal points at an attack or a misconfiguration (a WARN summary),
    /// rather than the ordinary failures of a lossy network or load (a DEBUG one).
    fn alarming(self) -> bool {
        matches!(
            self,
            Event::Message1
                | Event::UnknownInfoHash
                | Event::RateLimited
                | Event::Busy
                | Event::Version
        )
    }

    /// How a count of these reads in the summary.
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Event::Message1 => "refused at noise message 1 (not the topic's key)",
            Event::UnknownInfoHash => "named an info-hash of no joined topic",
            Event::RateLimited => "rate limited",
            Event::Busy => "refused: too many handshakes in progress",
            Event::Version => "spoke another protocol version",
            Event::Retried => "answered with a quic retry",
            Event::QuicFailed => "failed or timed out in the quic handshake",
            Event::Declined => "declined (topic only announced here)",
            Event::FailedLate => "failed after noise message 1",
            Event::Attempt | Event::Message2Sent | Event::Completed => "",
        }
    }
}

/// One interval's refusals, for its summary line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Summary {
    /// Each refusal kind seen, with its count.
    pub(crate) counts: Vec<(Event, u64)>,
    /// How long the interval was.
    pub(crate) over: Duration,
}

impl Summary {
    /// Whether the summary goes out at WARN (else DEBUG).
    pub(crate) fn alarming(&self) -> bool {
        self.counts.iter().any(|(e, _)| e.alarming())
    }

    /// All refusals in the interval.
    pub(crate) fn total(&self) -> u64 {
        self.counts.iter().map(|(_, n)| n).sum()
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} incoming handshakes refused or failed in the last {} s:",
            self.total(),
            self.over.as_secs()
        )?;
        for (i, (event, n)) in self.counts.iter().enumerate() {
            let sep = if i == 0 { " " } else { ", " };
            write!(f, "{sep}{n} {}", event.describe())?;
        }
        Ok(())
    }
}

/// The counts since start and the refusals of the current interval.
#[derive(Debug, Default)]
pub(crate) struct Record {
    totals: IncomingStats,
    pending: [u64; REFUSALS.len()],
    interval_start: Option<Instant>,
}

impl Record {
    /// Counts `event`. Returns whether it is the first refusal of its kind in this interval
    /// (the caller logs that one at debug, with its address and error).
    pub(crate) fn record(&mut self, now: Instant, event: Event) -> bool {
        let t = &mut self.totals;
        let total = match event {
            Event::Attempt => &mut t.attempts,
            Event::Retried => &mut t.retried,
            Event::Busy => &mut t.refused_busy,
            Event::RateLimited => &mut t.rate_limited,
            Event::Version => &mut t.version,
            Event::QuicFailed => &mut t.quic_failed,
            Event::UnknownInfoHash => &mut t.unknown_info_hash,
            Event::Message1 => &mut t.refused_at_message1,
            Event::Message2Sent => &mut t.message2_sent,
            Event::Declined => &mut t.declined,
            Event::FailedLate => &mut t.failed_late,
            Event::Completed => &mut t.completed,
        };
        *total = total.saturating_add(1);
        let Some(i) = event.refusal_index() else {
            return false;
        };
        self.interval_start.get_or_insert(now);
        self.pending[i] = self.pending[i].saturating_add(1);
        self.pending[i] == 1
    }

    /// When the current interval's summary is due; `None` when nothing was refused since
    /// the last summary.
    pub(crate) fn due(&self) -> Option<Instant> {
        self.interval_start.map(|t| t + SUMMARY_INTERVAL)
    }

    /// The interval's summary once it is due; a new interval starts with the next refusal.
    pub(crate) fn summary(&mut self, now: Instant) -> Option<Summary> {
        let start = self.interval_start?;
        if now < start + SUMMARY_INTERVAL {
            return None;
        }
        let counts = REFUSALS
            .iter()
            .zip(self.pending)
            .filter(|(_, n)| *n > 0)
            .map(|(e, n)| (*e, n))
            .collect();
        self.pending = [0; REFUSALS.len()];
        self.interval_start = None;
        Some(Summary {
            counts,
            over: now.saturating_duration_since(start),
        })
    }

    /// The counts since start.
    pub(crate) fn stats(&self) -> IncomingStats {
        self.totals
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Thousands of refusals in an interval: one detail line per kind, one summary.
    #[test]
    fn thousands_of_refusals_give_one_line_per_kind_and_one_summary() {
        let t0 = Instant::now();
        let mut r = Record::default();
        let mut detail_lines = 0;
        for i in 0..10_000u64 {
            let now = t0 + Duration::from_micros(i * 100);
            detail_lines += usize::from(r.record(now, Event::Attempt));
            let event = if i % 10 == 0 {
                Event::RateLimited
            } else {
                Event::Message1
            };
            detail_lines += usize::from(r.record(now, event));
            assert_eq!(r.summary(now), None, "not due within the interval");
        }
        assert_eq!(detail_lines, 2);
        assert_eq!(r.due(), Some(t0 + SUMMARY_INTERVAL));
        let s = r.summary(t0 + SUMMARY_INTERVAL).unwrap();
        assert_eq!(
            s.counts,
            vec![(Event::Message1, 9000), (Event::RateLimited, 1000)]
        );
        assert!(s.alarming());
        assert_eq!(
            s.to_string(),
            "10000 incoming handshakes refused or failed in the last 10 s: 9000 refused at noise \
             message 1 (not the topic's key), 1000 rate limited"
        );
        // Quiet afterwards: nothing due, nothing to say.
        assert_eq!(r.due(), None);
        assert_eq!(r.summary(t0 + SUMMARY_INTERVAL * 5), None);
        let stats = r.stats();
        assert_eq!(
            (
                stats.attempts,
                stats.refused_at_message1,
                stats.rate_limited
            ),
            (10_000, 9000, 1000)
        );
        // A new interval logs its first refusal again.
        let later = t0 + SUMMARY_INTERVAL * 6;
        assert!(r.record(later, Event::Message1));
        assert!(!r.record(later, Event::Message1));
        assert_eq!(r.due(), Some(later + SUMMARY_INTERVAL));
    }

    #[test]
    fn ordinary_failures_are_not_alarming_and_counts_are_not_refusals() {
        let t0 = Instant::now();
        let mut r = Record::default();
        assert!(!r.record(t0, Event::Completed));
        assert!(!r.record(t0, Event::Message2Sent));
        assert_eq!(r.due(), None, "successes start no interval");
        assert!(r.record(t0, Event::Retried));
        assert!(r.record(t0, Event::QuicFailed));
        let s = r.summary(t0 + SUMMARY_INTERVAL).unwrap();
        assert!(!s.alarming());
        assert_eq!(s.total(), 2);
        let stats = r.stats();
        assert_eq!(
            (stats.completed, stats.message2_sent, stats.retried),
            (1, 1, 1)
        );
    }
}
