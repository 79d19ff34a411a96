//! The rate limit on handshake openings (HS1, the version probe, HELLO) per remote relay
//! connection: a token bucket each, in a bounded table. A room member replaying one valid
//! HS1 thousands of times gets a handful of answers (each costs this side four scalar
//! multiplications and a reply), not thousands; the relay assigns connection ids, so a
//! member cannot pose as another. Openings over the limit are dropped unanswered.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::protocol::ConnId;

/// Openings a remote may send at once: an honest attempt is two frames (HS1 and the version
/// probe) or one (HELLO), so this lets a peer start over a few times in a row.
pub(crate) const HANDSHAKE_BURST: u32 = 8;
/// One more opening per this interval, up to the burst: a peer may start one attempt a
/// second for as long as it likes, which no honest peer needs (an attempt lasts up to the
/// handshake timeout).
pub(crate) const HANDSHAKE_REFILL: Duration = Duration::from_millis(500);
/// Remotes tracked at once. Past it, idle remotes (whose bucket is full again) are
/// forgotten, at most once per refill interval; the rest of the newcomers share one bucket.
/// A relay's rooms hold at most a few hundred members each.
pub(crate) const MAX_TRACKED_REMOTES: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: u32,
    /// When `tokens` was last brought up to date.
    at: Instant,
}

impl Bucket {
    fn full(now: Instant) -> Self {
        Self {
            tokens: HANDSHAKE_BURST,
            at: now,
        }
    }

    /// Adds the tokens earned since `at` (whole intervals only, so nothing is lost to
    /// rounding).
    fn refill(&mut self, now: Instant) {
        let earned =
            now.saturating_duration_since(self.at).as_nanos() / HANDSHAKE_REFILL.as_nanos();
        if earned == 0 {
            return;
        }
        let earned = u32::try_from(earned).unwrap_or(u32::MAX);
        self.tokens = self.tokens.saturating_add(earned).min(HANDSHAKE_BURST);
        self.at = if self.tokens == HANDSHAKE_BURST {
            now
        } else {
            self.at + HANDSHAKE_REFILL * earned
        };
    }

    fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }

    fn is_full(mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens == HANDSHAKE_BURST
    }
}

/// A token bucket per remote connection id, for at most `max` remotes.
pub(crate) struct HandshakeLimit {
    max: usize,
    buckets: HashMap<ConnId, Bucket>,
    /// Shared by remotes that found the table full.
    overflow: Option<Bucket>,
    last_sweep: Option<Instant>,
}

impl HandshakeLimit {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            max,
            buckets: HashMap::new(),
            overflow: None,
            last_sweep: None,
        }
    }

    /// Whether an opening from `from` may be handled now (and counts it).
    pub(crate) fn allow(&mut self, from: ConnId, now: Instant) -> bool {
        if let Some(b) = self.buckets.get_mut(&from) {
            return b.take(now);
        }
        if self.buckets.len() >= self.max && self.sweep_due(now) {
            self.last_sweep = Some(now);
            self.buckets.retain(|_, b| !b.is_full(now));
        }
        if self.buckets.len() < self.max {
            let mut b = Bucket::full(now);
            let ok = b.take(now);
            self.buckets.insert(from, b);
            return ok;
        }
        self.overflow
            .get_or_insert_with(|| Bucket::full(now))
            .take(now)
    }

    fn sweep_due(&self, now: Instant) -> bool {
        self.last_sweep
            .is_none_or(|at| now.saturating_duration_since(at) >= HANDSHAKE_REFILL)
    }

    /// The socket is gone (connection ids start over): forget everyone.
    pub(crate) fn clear(&mut self) {
        self.buckets.clear();
        self.overflow = None;
        self.last_sweep = None;
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How many of `n` openings from `from` at `now` are allowed.
    fn allowed(l: &mut HandshakeLimit, from: ConnId, n: u32, now: Instant) -> u32 {
        (0..n).map(|_| u32::from(l.allow(from, now))).sum()
    }

    #[test]
    fn a_burst_then_one_per_interval_per_remote() {
        let t0 = Instant::now();
        let mut l = HandshakeLimit::new(16);
        assert_eq!(allowed(&mut l, 1, 20_000, t0), HANDSHAKE_BURST);
        assert_eq!(
            allowed(&mut l, 2, 3, t0),
            3,
            "another remote has its own bucket"
        );
        assert_eq!(allowed(&mut l, 1, 5, t0 + HANDSHAKE_REFILL / 2), 0);
        assert_eq!(allowed(&mut l, 1, 5, t0 + HANDSHAKE_REFILL), 1);
        // Ten more seconds of flooding earn one opening per interval, not more.
        let mut got = 0;
        for ms in (0..10_000).step_by(10) {
            got += allowed(
                &mut l,
                1,
                10,
                t0 + HANDSHAKE_REFILL + Duration::from_millis(ms),
            );
        }
        assert_eq!(got, 19);
        // Quiet for long enough, the whole burst is back, never more.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(allowed(&mut l, 1, 100, later), HANDSHAKE_BURST);
    }

    #[test]
    fn the_table_is_bounded_and_idle_remotes_make_room() {
        let t0 = Instant::now();
        let mut l = HandshakeLimit::new(4);
        for r in 0..4 {
            assert!(l.allow(r, t0));
        }
        // Full of busy remotes: newcomers share one bucket.
        assert_eq!(
            (10..100).map(|r| u32::from(l.allow(r, t0))).sum::<u32>(),
            HANDSHAKE_BURST
        );
        assert_eq!(l.tracked(), 4);
        // Once the first four are idle (full again), a sweep forgets them.
        let idle = t0 + HANDSHAKE_REFILL * HANDSHAKE_BURST;
        assert!(l.allow(200, idle));
        assert_eq!(l.tracked(), 1);
        assert_eq!(allowed(&mut l, 200, 100, idle), HANDSHAKE_BURST - 1);
        l.clear();
        assert_eq!(l.tracked(), 0);
        assert_eq!(allowed(&mut l, 200, 100, idle), HANDSHAKE_BURST);
    }

    #[test]
    fn sweeps_happen_at_most_once_per_interval() {
        let t0 = Instant::now();
        let mut l = HandshakeLimit::new(2);
        assert!(l.allow(1, t0) && l.allow(2, t0));
        assert!(
            l.allow(3, t0),
            "swept (nothing to forget), then the overflow bucket"
        );
        assert_eq!(l.last_sweep, Some(t0));
        let idle = t0 + HANDSHAKE_REFILL * HANDSHAKE_BURST;
        // A sweep at `idle` forgets 1 and 2; 4 and 5 take their places.
        assert!(l.allow(4, idle) && l.allow(5, idle));
        assert_eq!(l.tracked(), 2);
        assert!(l.allow(6, idle), "overflow");
        assert_eq!(
            l.last_sweep,
            Some(idle),
            "no second sweep within the interval"
        );
    }
}
