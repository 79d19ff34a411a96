//! The rate limit on REJECT (no session): at most one per peer per interval, remembered for a
//! bounded number of peers.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::protocol::ConnId;

/// At most one REJECT (no session) per peer per this interval: one is enough to end the peer's
/// session, and a peer still sending frames for a session we ended does not get one each.
pub(crate) const REJECT_NO_SESSION_INTERVAL: Duration = Duration::from_secs(1);

/// When a REJECT (no session) last went to each peer, for at most `max` peers.
pub(crate) struct RejectLimit {
    max: usize,
    sent: HashMap<ConnId, Instant>,
}

impl RejectLimit {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            max,
            sent: HashMap::new(),
        }
    }

    /// Whether a REJECT to `to` is due now, noting it: always when `force` (a session just
    /// ended here), else when none went to `to` within the interval. When the map is full,
    /// entries older than the interval go, and a peer that still does not fit is not rejected
    /// now (unless forced; it is then just not noted).
    pub(crate) fn due(&mut self, to: ConnId, force: bool, now: Instant) -> bool {
        let quiet = |at: &Instant| now.duration_since(*at) >= REJECT_NO_SESSION_INTERVAL;
        if !force && !self.sent.get(&to).is_none_or(quiet) {
            return false;
        }
        if self.sent.len() >= self.max && !self.sent.contains_key(&to) {
            self.sent.retain(|_, at| !quiet(at));
        }
        let noted = self.sent.len() < self.max || self.sent.contains_key(&to);
        if noted {
            self.sent.insert(to, now);
        }
        noted || force
    }

    /// `peer` left: forget it.
    pub(crate) fn forget(&mut self, peer: ConnId) {
        self.sent.remove(&peer);
    }

    /// The socket is gone: forget everyone.
    pub(crate) fn clear(&mut self) {
        self.sent.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_reject_per_peer_per_interval_within_a_bounded_map() {
        let t0 = Instant::now();
        let mut l = RejectLimit::new(2);
        assert!(l.due(1, false, t0));
        assert!(!l.due(1, false, t0 + REJECT_NO_SESSION_INTERVAL / 2));
        assert!(l.due(1, true, t0), "forced: a session just ended");
        assert!(l.due(2, false, t0));
        // Full of recent entries: a third peer is not rejected (nor noted) unless forced.
        assert!(!l.due(3, false, t0));
        assert!(l.due(3, true, t0));
        assert_eq!(l.sent.len(), 2);
        // Once the old entries expire, they make room.
        let later = t0 + REJECT_NO_SESSION_INTERVAL;
        assert!(l.due(3, false, later));
        assert!(l.sent.len() <= 2);
        l.forget(3);
        assert!(l.due(3, false, later));
    }
}
