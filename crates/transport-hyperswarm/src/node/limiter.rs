//! A rate limiter: a token bucket per key (a remote IP or address) in a table of bounded
//! size, so that no remote can start handshakes faster than a set rate and the table cannot
//! grow without bound however many keys a flood uses. Pure: every call takes `now`.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// A bucket's rate: `burst` attempts at once, then `per_second`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Rate {
    /// Attempts allowed at once (the bucket's size).
    pub(crate) burst: u32,
    /// Attempts allowed per second after that (the refill rate).
    pub(crate) per_second: u32,
}

impl Rate {
    fn full(self) -> u64 {
        u64::from(self.burst) * TOKEN
    }

    /// The level of `b` at `now`: refilled at the rate since its last update, up to full.
    fn refilled(self, b: Bucket, now: Instant) -> u64 {
        let ms = now.saturating_duration_since(b.updated).as_millis();
        let gained = u64::try_from(ms)
            .unwrap_or(u64::MAX)
            .saturating_mul(u64::from(self.per_second));
        b.level.saturating_add(gained).min(self.full())
    }
}

/// One token, in the bucket's unit (thousandths: integer arithmetic, exact and deterministic).
const TOKEN: u64 = 1000;

/// How often a full table is scanned for buckets that refilled (they carry no information
/// and are dropped); between scans a full table evicts one bucket per new key.
const PRUNE_EVERY: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, Debug)]
struct Bucket {
    /// Thousandths of a token.
    level: u64,
    updated: Instant,
}

/// Token buckets per key, at most `max_keys` of them.
#[derive(Debug)]
pub(crate) struct Limiter<K> {
    rate: Rate,
    max_keys: usize,
    buckets: HashMap<K, Bucket>,
    last_prune: Option<Instant>,
}

impl<K: Hash + Eq + Copy> Limiter<K> {
    pub(crate) fn new(rate: Rate, max_keys: usize) -> Self {
        Self {
            rate,
            max_keys: max_keys.max(1),
            buckets: HashMap::new(),
            last_prune: None,
        }
    }

    fn full(&self) -> u64 {
        self.rate.full()
    }

    /// Whether `key` may make one more attempt now; if so, the attempt is counted.
    pub(crate) fn try_take(&mut self, now: Instant, key: K) -> bool {
        let level = match self.buckets.get(&key) {
            Some(&b) => self.rate.refilled(b, now),
            None => {
                self.make_room(now);
                self.full()
            }
        };
        let allowed = level >= TOKEN;
        let level = if allowed { level - TOKEN } else { level };
        self.buckets.insert(
            key,
            Bucket {
                level,
                updated: now,
            },
        );
        allowed
    }

    /// Makes room for one more key: drops the buckets that refilled (a new bucket starts
    /// full, so forgetting them changes nothing), at most every [`PRUNE_EVERY`]; when none
    /// did, evicts one (an arbitrary one: the table's hash order is random per process).
    fn make_room(&mut self, now: Instant) {
        if self.buckets.len() < self.max_keys {
            return;
        }
        let due = self
            .last_prune
            .is_none_or(|t| now.saturating_duration_since(t) >= PRUNE_EVERY);
        if due {
            self.last_prune = Some(now);
            let (rate, full) = (self.rate, self.full());
            self.buckets.retain(|_, b| rate.refilled(*b, now) < full);
        }
        if self.buckets.len() >= self.max_keys
            && let Some(&victim) = self.buckets.keys().next()
        {
            self.buckets.remove(&victim);
        }
    }

    /// How many keys the table holds.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATE: Rate = Rate {
        burst: 3,
        per_second: 2,
    };

    #[test]
    fn a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut l = Limiter::new(RATE, 16);
        assert!((0..3).all(|_| l.try_take(t0, 1u8)), "the burst");
        assert!(!l.try_take(t0, 1), "then nothing");
        assert!(l.try_take(t0, 2), "another key has its own bucket");
        // 2 per second: one token every 500 ms.
        assert!(!l.try_take(t0 + Duration::from_millis(499), 1));
        assert!(l.try_take(t0 + Duration::from_millis(500), 1));
        assert!(!l.try_take(t0 + Duration::from_millis(500), 1));
        // Denied attempts do not drain it further; a long pause refills only to the burst.
        let later = t0 + Duration::from_secs(60);
        assert!((0..3).all(|_| l.try_take(later, 1)));
        assert!(!l.try_take(later, 1));
    }

    #[test]
    fn thousands_of_attempts_get_the_rate_only() {
        let t0 = Instant::now();
        let mut l = Limiter::new(RATE, 16);
        // 10,000 attempts over 10 s from one key: the burst plus 2 per second.
        let allowed = (0..10_000u64)
            .filter(|i| l.try_take(t0 + Duration::from_millis(*i), 7u8))
            .count();
        assert_eq!(allowed, 3 + 20 - 1, "burst + rate x 9.999 s");
    }

    #[test]
    fn the_table_is_bounded_and_forgets_refilled_buckets_first() {
        let t0 = Instant::now();
        let mut l = Limiter::new(RATE, 8);
        // Eight drained keys fill the table.
        for k in 0..8u32 {
            while l.try_take(t0, k) {}
        }
        assert_eq!(l.len(), 8);
        // Thousands of new keys: the table stays at its bound.
        for k in 100..5000u32 {
            l.try_take(t0, k);
            assert!(l.len() <= 8);
        }
        // Once every bucket refilled, a new key prunes them all instead of evicting one.
        let later = t0 + Duration::from_secs(10);
        assert!(l.try_take(later, 1_000_000));
        assert_eq!(l.len(), 1);
        // A drained key not evicted keeps its state: still drained.
        let mut l = Limiter::new(RATE, 8);
        while l.try_take(t0, 1u32) {}
        for k in 2..8u32 {
            l.try_take(t0, k);
        }
        assert!(!l.try_take(t0, 1), "the table had room: key 1 was kept");
    }
}
