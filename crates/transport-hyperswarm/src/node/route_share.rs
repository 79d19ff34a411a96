//! Pure: two peers of a connection made directly telling each other where they are in the
//! topic's relay room (Auto mode), so each can fall back to the relay route of the other
//! when the direct path dies (`path_state.rs`, `fallback.rs`). The messages travel as
//! unreliable QUIC datagrams (`path_wire.rs`'s routes datagram), authenticated and
//! encrypted by QUIC: the relay cannot forge a route.
//!
//! Each message carries the sender's route, the receiver's route as the sender last heard
//! it (an exact acknowledgement) and whether the sender wants an answer (it has not seen
//! its current route echoed yet). A message that asks is answered at once; an unanswered
//! one is sent again after [`RESEND_FIRST`], doubling up to [`RESEND_MAX`] (a peer that
//! does not know the message never answers), and at once whenever the sender's own route
//! changes (its relay socket reconnected, or was lost: `None` tells the peer to stop using
//! the old one).
//!
//! A route told is only a claim: before it is used, [`RouteProof`] pings it *through the
//! relay* with the connection's authenticated probes, and only a pong from that very route
//! proves it (only the peer holding this QUIC connection can make one). So a peer naming
//! another member's route, or a relay URL shared by relay nodes that do not forward to
//! each other, gives no fallback rather than a wrong one.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

use crate::path_wire::{RouteId, Routes};

/// The first resend of an unanswered message.
pub(crate) const RESEND_FIRST: Duration = Duration::from_secs(1);

/// The longest wait between resends.
pub(crate) const RESEND_MAX: Duration = Duration::from_secs(32);

/// Pings per route whose pong is still accepted.
const PROOF_OUTSTANDING: usize = 8;

/// A relay route being proven: pinged through the relay at once, again after
/// [`RESEND_FIRST`] doubling to [`RESEND_MAX`] while unanswered.
#[derive(Debug)]
pub(crate) struct RouteProof {
    target: Option<SocketAddr>,
    proven: bool,
    outstanding: Vec<u64>,
    next_ping: Option<Instant>,
    wait: Duration,
    next_nonce: u64,
}

impl RouteProof {
    /// No route yet; nonces from `first_nonce` on.
    pub(crate) fn new(first_nonce: u64) -> Self {
        Self {
            target: None,
            proven: false,
            outstanding: Vec::new(),
            next_ping: None,
            wait: RESEND_FIRST,
            next_nonce: first_nonce,
        }
    }

    /// The route to prove (its virtual address) is `target` now: a ping to send through
    /// the relay at once when it changed.
    pub(crate) fn set_target(
        &mut self,
        now: Instant,
        target: Option<SocketAddr>,
    ) -> Option<(SocketAddr, u64)> {
        if target == self.target {
            return None;
        }
        self.target = target;
        self.proven = false;
        self.outstanding.clear();
        self.next_ping = None;
        self.wait = RESEND_FIRST;
        target.map(|t| self.ping(now, t))
    }

    fn ping(&mut self, now: Instant, to: SocketAddr) -> (SocketAddr, u64) {
        self.next_nonce = self.next_nonce.wrapping_add(1);
        if self.outstanding.len() == PROOF_OUTSTANDING {
            self.outstanding.remove(0);
        }
        self.outstanding.push(self.next_nonce);
        self.next_ping = Some(now + self.wait);
        (to, self.next_nonce)
    }

    /// An authenticated pong through the relay from `from`: whether it proves the route
    /// (the first time).
    pub(crate) fn on_pong(&mut self, from: SocketAddr, nonce: u64) -> bool {
        if self.proven || self.target != Some(from) || !self.outstanding.contains(&nonce) {
            return false;
        }
        self.proven = true;
        self.outstanding.clear();
        self.next_ping = None;
        true
    }

    /// A ping due now, if the route is still unproven.
    pub(crate) fn tick(&mut self, now: Instant) -> Option<(SocketAddr, u64)> {
        let to = self.target.filter(|_| !self.proven)?;
        if self.next_ping.is_none_or(|t| t > now) {
            return None;
        }
        self.wait = (self.wait * 2).min(RESEND_MAX);
        Some(self.ping(now, to))
    }

    /// When [`tick`](Self::tick) is due.
    pub(crate) fn next_wakeup(&self) -> Option<Instant> {
        self.next_ping
    }

    /// The route being proven or proven.
    pub(crate) fn target(&self) -> Option<SocketAddr> {
        self.target
    }
}

/// One connection's side of the exchange.
#[derive(Debug)]
pub(crate) struct RouteShare {
    ours: Option<RouteId>,
    theirs: Option<RouteId>,
    /// The peer echoed our current route.
    acked: bool,
    next_send: Option<Instant>,
    wait: Duration,
}

impl RouteShare {
    /// The exchange from `now`, our route being `ours`; the first message.
    pub(crate) fn start(now: Instant, ours: Option<RouteId>) -> (Self, Routes) {
        let mut s = Self {
            ours,
            theirs: None,
            acked: false,
            next_send: None,
            wait: RESEND_FIRST,
        };
        let first = s.sent(now);
        (s, first)
    }

    /// The peer's route as it last told it.
    pub(crate) fn theirs(&self) -> Option<RouteId> {
        self.theirs
    }

    /// When [`tick`](Self::tick) is due.
    pub(crate) fn next_wakeup(&self) -> Option<Instant> {
        self.next_send
    }

    fn message(&self) -> Routes {
        Routes {
            ours: self.ours,
            yours: self.theirs,
            ask: !self.acked,
        }
    }

    /// The message to send now, with the resend scheduled if it asks.
    fn sent(&mut self, now: Instant) -> Routes {
        let m = self.message();
        self.next_send = m.ask.then(|| now + self.wait);
        m
    }

    /// Our route is `ours` now: a message if it changed.
    pub(crate) fn set_ours(&mut self, now: Instant, ours: Option<RouteId>) -> Option<Routes> {
        if ours == self.ours {
            return None;
        }
        self.ours = ours;
        self.acked = false;
        self.wait = RESEND_FIRST;
        Some(self.sent(now))
    }

    /// A message from the peer: the answer to send, if it asked, and whether its route
    /// changed.
    pub(crate) fn on_message(&mut self, now: Instant, m: Routes) -> (Option<Routes>, bool) {
        let changed = m.ours != self.theirs;
        self.theirs = m.ours;
        if m.yours == self.ours {
            self.acked = true;
            self.next_send = None;
        }
        let answer = m.ask.then(|| self.sent(now));
        (answer, changed)
    }

    /// A resend, when one is due.
    pub(crate) fn tick(&mut self, now: Instant) -> Option<Routes> {
        if self.acked || self.next_send.is_none_or(|t| t > now) {
            return None;
        }
        self.wait = (self.wait * 2).min(RESEND_MAX);
        Some(self.sent(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(conn: u64) -> RouteId {
        RouteId::new("ws://relay/relay", conn)
    }

    #[test]
    fn both_sides_learn_each_other_and_stop_sending() {
        let t0 = Instant::now();
        let (mut a, first_a) = RouteShare::start(t0, Some(id(1)));
        let (mut b, first_b) = RouteShare::start(t0, Some(id(2)));
        assert!(first_a.ask && first_a.ours == Some(id(1)) && first_a.yours.is_none());
        // Both firsts cross; each answers the other's.
        let (to_b, changed) = a.on_message(t0, first_b);
        assert!(changed);
        let (to_a, _) = b.on_message(t0, first_a);
        let (again_b, _) = b.on_message(t0, to_b.unwrap());
        let (again_a, _) = a.on_message(t0, to_a.unwrap());
        assert_eq!((a.theirs(), b.theirs()), (Some(id(2)), Some(id(1))));
        // Acknowledged both ways: the answers ask for nothing, and nothing is resent.
        assert!(again_a.is_none_or(|m| !m.ask) && again_b.is_none_or(|m| !m.ask));
        assert_eq!((a.next_wakeup(), b.next_wakeup()), (None, None));
        assert_eq!(a.tick(t0 + RESEND_MAX), None);
    }

    #[test]
    fn lost_messages_are_resent_with_backoff_until_answered() {
        let t0 = Instant::now();
        let (mut a, _) = RouteShare::start(t0, Some(id(1)));
        let mut sent = Vec::new();
        let mut t = t0;
        while t < t0 + Duration::from_secs(100) {
            t += Duration::from_millis(100);
            if let Some(m) = a.tick(t) {
                assert!(m.ask);
                sent.push(t - t0);
            }
        }
        // 1, 3, 7, 15, 31, 63, 95 s: doubling to RESEND_MAX.
        assert_eq!(sent.len(), 7, "{sent:?}");
        assert!(
            sent.windows(2)
                .all(|w| w[1] - w[0] <= RESEND_MAX + Duration::from_millis(100))
        );
        // An answer echoing our route stops it; one echoing an old route does not.
        let (_, changed) = a.on_message(
            t,
            Routes {
                ours: Some(id(2)),
                yours: Some(id(9)),
                ask: false,
            },
        );
        assert!(changed);
        assert!(a.next_wakeup().is_some());
        a.on_message(
            t,
            Routes {
                ours: Some(id(2)),
                yours: Some(id(1)),
                ask: false,
            },
        );
        assert_eq!(a.next_wakeup(), None);
    }

    #[test]
    fn a_changed_or_lost_route_is_told_at_once() {
        let t0 = Instant::now();
        let (mut a, _) = RouteShare::start(t0, Some(id(1)));
        a.on_message(
            t0,
            Routes {
                ours: Some(id(2)),
                yours: Some(id(1)),
                ask: false,
            },
        );
        assert_eq!(a.set_ours(t0, Some(id(1))), None, "unchanged");
        let lost = a.set_ours(t0, None).expect("told at once");
        assert_eq!((lost.ours, lost.yours, lost.ask), (None, Some(id(2)), true));
        let new = a.set_ours(t0, Some(id(3))).unwrap();
        assert_eq!(new.ours, Some(id(3)));
        assert_eq!(a.next_wakeup(), Some(t0 + RESEND_FIRST));
        // The peer's route going is a change too.
        let (answer, changed) = a.on_message(
            t0,
            Routes {
                ours: None,
                yours: Some(id(3)),
                ask: true,
            },
        );
        assert!(changed && a.theirs().is_none());
        assert_eq!(answer.map(|m| (m.yours, m.ask)), Some((None, false)));
    }

    #[test]
    fn a_route_is_used_only_once_a_pong_through_it_proves_it() {
        let t0 = Instant::now();
        let (v, other) = (
            "240.0.0.5:1".parse().unwrap(),
            "240.0.0.6:1".parse().unwrap(),
        );
        let mut p = RouteProof::new(100);
        assert_eq!(p.set_target(t0, None), None);
        let (to, nonce) = p.set_target(t0, Some(v)).expect("pinged at once");
        assert_eq!(to, v);
        assert_eq!(p.set_target(t0, Some(v)), None, "unchanged");
        // Nothing but the target's pong to an outstanding ping proves it.
        assert!(!p.on_pong(other, nonce), "another route");
        assert!(!p.on_pong(v, nonce + 9), "a nonce never sent");
        assert!(p.on_pong(v, nonce));
        assert!(!p.on_pong(v, nonce), "proven once");
        assert_eq!((p.tick(t0 + RESEND_MAX), p.next_wakeup()), (None, None));
        // A new target starts over; the old route's pong proves nothing.
        let (to2, n2) = p.set_target(t0, Some(other)).unwrap();
        assert_eq!(to2, other);
        assert!(!p.on_pong(v, n2));
        // Unanswered: pinged again with backoff, and any outstanding ping's pong counts.
        let mut pinged = Vec::new();
        let mut t = t0;
        while t < t0 + Duration::from_secs(40) {
            t += Duration::from_millis(100);
            if let Some((to, n)) = p.tick(t) {
                assert_eq!(to, other);
                pinged.push((t - t0, n));
            }
        }
        assert_eq!(pinged.len(), 5, "1, 3, 7, 15, 31 s: {pinged:?}");
        assert!(
            p.on_pong(other, pinged[2].1),
            "a late pong of an earlier ping"
        );
        assert_eq!(p.set_target(t, None), None);
        assert_eq!(p.next_wakeup(), None);
    }
}
