//! The address book: what this node knows about each endpoint a discovery source handed it
//! (the DHT today; any other source feeds the same book): who answered there, how often it
//! failed and when to try it again, which addresses are this node itself, and in which order
//! candidates are dialled. Pure: every method takes `now`.

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::error::DialError;
use crate::wire::Purpose;
use crate::{DialFailure, HyperswarmError};

/// Backoff after failed dials to one address, by number of consecutive failures: stale DHT
/// entries are common, so an address that does not answer is retried ever more rarely.
pub(crate) const DIAL_BACKOFF: [Duration; 4] = [
    Duration::from_secs(1),
    Duration::from_secs(5),
    Duration::from_secs(30),
    Duration::from_secs(120),
];

/// Most addresses whose dial state is remembered; beyond, the oldest knowledge is dropped.
pub(crate) const MAX_TRACKED_ADDRS: usize = 4096;

/// How long a verified address → peer mapping is trusted by `lookup` without re-checking.
pub(crate) const IDENTIFY_TTL: Duration = Duration::from_secs(30);

/// What a dial or identify check achieved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// A connection was established and yielded.
    Connected([u8; 32]),
    /// The peer's key was verified (identify, or a duplicate connection that was dropped).
    Known([u8; 32]),
    /// The address is this node itself.
    Myself,
}

/// How urgently a candidate is dialled; candidates in backoff are not dialled at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Tier {
    /// A peer was verified at this address and it has not failed since.
    Verified,
    /// Never tried.
    New,
    /// Failed before; its backoff has passed.
    Retry,
}

/// Orders candidates for dialling: by tier, then in an order random to everyone else (a
/// keyed hash of the address), so that whoever fills the DHT with dead entries cannot
/// predict which are tried first and park the dial slots in front of the live peers.
pub(crate) fn schedule(
    mut candidates: Vec<(Tier, SocketAddr)>,
    order: &impl BuildHasher,
) -> Vec<SocketAddr> {
    candidates.sort_by_cached_key(|(tier, addr)| (*tier, order.hash_one(addr)));
    candidates.into_iter().map(|(_, addr)| addr).collect()
}

#[derive(Debug, Default)]
struct Entry {
    /// The peer verified at this address, and when.
    peer: Option<([u8; 32], Instant)>,
    failures: u32,
    next_try: Option<Instant>,
    last_failure: Option<Instant>,
    last_error: Option<HyperswarmError>,
}

/// Everything known about candidate addresses.
#[derive(Debug)]
pub(crate) struct AddressBook {
    entries: HashMap<SocketAddr, Entry>,
    /// Addresses found to be this node: its own key answered there, or DHT nodes saw the
    /// data socket there.
    own: HashSet<SocketAddr>,
    /// The data socket's local address.
    local: SocketAddr,
    /// The port announced instead of the local one (a manual port forward).
    announce_port: Option<u16>,
}

impl AddressBook {
    /// An empty book for a node whose data socket is at `local`.
    pub(crate) fn new(local: SocketAddr, announce_port: Option<u16>) -> Self {
        Self {
            entries: HashMap::new(),
            own: HashSet::new(),
            local,
            announce_port,
        }
    }

    /// Whether `addr` is this node: found to be (see [`AddressBook::add_own`]), or its own
    /// port (local or announced) on its own IP or loopback.
    pub(crate) fn is_own(&self, addr: SocketAddr) -> bool {
        if self.own.contains(&addr) {
            return true;
        }
        let ours = addr.port() == self.local.port() || self.announce_port == Some(addr.port());
        ours && (addr.ip() == self.local.ip() || addr.ip().is_loopback())
    }

    /// Remembers that `addr` is this node (e.g. its learned public address).
    pub(crate) fn add_own(&mut self, addr: SocketAddr) {
        self.own.insert(addr);
    }

    /// Whether `addr` failed lately and its backoff has not passed.
    pub(crate) fn in_backoff(&self, addr: SocketAddr, now: Instant) -> bool {
        self.entries
            .get(&addr)
            .and_then(|a| a.next_try)
            .is_some_and(|t| t > now)
    }

    /// The candidate's tier, or `None` when it is not to be dialled now: in backoff, or (for
    /// `lookup`, which may be polled often) failed within [`IDENTIFY_TTL`], since the dialer
    /// retries such addresses on its own backoff.
    pub(crate) fn tier(&self, addr: SocketAddr, now: Instant, purpose: Purpose) -> Option<Tier> {
        let Some(a) = self.entries.get(&addr) else {
            return Some(Tier::New);
        };
        if a.next_try.is_some_and(|t| t > now) {
            return None;
        }
        let failed_lately = a
            .last_failure
            .is_some_and(|t| now.duration_since(t) < IDENTIFY_TTL);
        if purpose == Purpose::Identify && failed_lately {
            return None;
        }
        Some(if a.peer.is_some() {
            Tier::Verified
        } else if a.failures == 0 {
            Tier::New
        } else {
            Tier::Retry
        })
    }

    /// Whether a peer was verified at `addr` (and it has not failed since).
    pub(crate) fn is_verified(&self, addr: SocketAddr) -> bool {
        self.entries.get(&addr).is_some_and(|a| a.peer.is_some())
    }

    /// The peer verified at `addr` within [`IDENTIFY_TTL`].
    pub(crate) fn fresh_peer(&self, addr: SocketAddr, now: Instant) -> Option<[u8; 32]> {
        let (peer, at) = self.entries.get(&addr)?.peer?;
        (now.duration_since(at) < IDENTIFY_TTL).then_some(peer)
    }

    /// Every address with a verified peer, and that peer.
    pub(crate) fn verified_peers(&self) -> Vec<(SocketAddr, [u8; 32])> {
        let mut out: Vec<(SocketAddr, [u8; 32])> = self
            .entries
            .iter()
            .filter_map(|(addr, a)| Some((*addr, a.peer?.0)))
            .collect();
        out.sort();
        out
    }

    /// Consecutive failures of `addr`.
    pub(crate) fn failures(&self, addr: SocketAddr) -> u32 {
        self.entries.get(&addr).map_or(0, |a| a.failures)
    }

    /// Stores what a dial or identify check of `addr` learned. Only failures of the remote
    /// or the network count against the address; a connection this node declined itself
    /// ([`DialError::is_local`]) leaves its state as it was.
    pub(crate) fn record(
        &mut self,
        addr: SocketAddr,
        now: Instant,
        result: &Result<Outcome, DialError>,
    ) {
        match result {
            Ok(Outcome::Connected(peer) | Outcome::Known(peer)) => {
                self.verified(addr, now, *peer);
            }
            Ok(Outcome::Myself) => self.add_own(addr),
            Err(DialError::Failed(error)) => self.failed(addr, now, error.clone()),
            // Our own refusal: not the address failing.
            Err(DialError::Declined { .. }) => {}
        }
    }

    /// The addresses that failed lately, with their last error, by address.
    pub(crate) fn dial_failures(&self) -> Vec<DialFailure> {
        let mut out: Vec<DialFailure> = self
            .entries
            .iter()
            .filter(|(addr, a)| a.failures > 0 && !self.own.contains(*addr))
            .filter_map(|(addr, a)| {
                Some(DialFailure {
                    addr: *addr,
                    failures: a.failures,
                    error: a.last_error.clone()?,
                })
            })
            .collect();
        out.sort_by_key(|f| f.addr);
        out
    }

    fn entry_mut(&mut self, addr: SocketAddr, now: Instant) -> &mut Entry {
        if self.entries.len() >= MAX_TRACKED_ADDRS && !self.entries.contains_key(&addr) {
            self.entries
                .retain(|_, a| a.next_try.is_some_and(|t| t > now));
            if self.entries.len() >= MAX_TRACKED_ADDRS {
                self.entries.clear();
            }
        }
        self.entries.entry(addr).or_default()
    }

    fn failed(&mut self, addr: SocketAddr, now: Instant, error: HyperswarmError) {
        let a = self.entry_mut(addr, now);
        a.last_error = Some(error);
        a.failures = a.failures.saturating_add(1);
        let tier = (a.failures as usize - 1).min(DIAL_BACKOFF.len() - 1);
        a.next_try = Some(now + DIAL_BACKOFF[tier]);
        a.last_failure = Some(now);
        a.peer = None;
    }

    fn verified(&mut self, addr: SocketAddr, now: Instant, peer: [u8; 32]) {
        let a = self.entry_mut(addr, now);
        a.failures = 0;
        a.next_try = None;
        a.last_failure = None;
        a.last_error = None;
        a.peer = Some((peer, now));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::hash_map::RandomState;

    use super::*;
    use crate::HandshakeFailure;
    use crate::error::Declined;

    fn no_answer(addr: SocketAddr) -> DialError {
        DialError::handshake(
            addr,
            HandshakeFailure::NoAnswer {
                after: Duration::from_millis(1500),
            },
        )
    }

    fn book() -> AddressBook {
        AddressBook::new("10.9.9.9:4000".parse().unwrap(), None)
    }

    const PEER: Result<Outcome, DialError> = Ok(Outcome::Known([1; 32]));

    #[test]
    fn dial_backoff_climbs_the_tiers_and_resets() {
        let mut b = book();
        let addr: SocketAddr = "10.0.0.1:1".parse().unwrap();
        let mut now = Instant::now();
        let mut waits = Vec::new();
        for _ in 0..6 {
            b.record(addr, now, &Err(no_answer(addr)));
            let next = b.entries[&addr].next_try.unwrap();
            waits.push((next - now).as_secs());
            assert!(b.in_backoff(addr, next - Duration::from_millis(1)));
            assert!(!b.in_backoff(addr, next));
            now = next;
        }
        assert_eq!(waits, [1, 5, 30, 120, 120, 120]);
        assert_eq!(b.failures(addr), 6);
        assert!(b.in_backoff(addr, now - Duration::from_secs(1)));
        b.record(addr, now, &PEER);
        assert!(!b.in_backoff(addr, now));
        assert_eq!(b.failures(addr), 0);
    }

    #[test]
    fn schedule_orders_by_tier_then_unpredictably() {
        let addr = |i: u32| SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 1));
        let tiers = [Tier::Retry, Tier::New, Tier::Verified];
        let candidates: Vec<(Tier, SocketAddr)> =
            (0..300).map(|i| (tiers[i as usize % 3], addr(i))).collect();
        let tier_of: HashMap<SocketAddr, Tier> = candidates.iter().map(|(t, a)| (*a, *t)).collect();
        let first = schedule(candidates.clone(), &RandomState::new());
        assert_eq!(first.len(), candidates.len());
        let got: HashSet<SocketAddr> = first.iter().copied().collect();
        assert_eq!(got.len(), candidates.len());
        let ranks: Vec<Tier> = first.iter().map(|a| tier_of[a]).collect();
        assert!(ranks.is_sorted(), "tiers out of order: {ranks:?}");
        assert_eq!(ranks[0], Tier::Verified);
        assert_eq!(ranks[299], Tier::Retry);
        // Within a tier, neither the input order nor the previous schedule's order.
        let second = schedule(candidates.clone(), &RandomState::new());
        assert_ne!(first, second);
        let verified_in_input: Vec<SocketAddr> = candidates
            .iter()
            .filter(|(t, _)| *t == Tier::Verified)
            .map(|(_, a)| *a)
            .collect();
        assert_ne!(first[..100], verified_in_input[..]);
    }

    #[test]
    fn tiers_follow_the_address_history() {
        let mut b = book();
        let now = Instant::now();
        let (new, live, dead): (SocketAddr, SocketAddr, SocketAddr) = (
            "10.0.0.1:1".parse().unwrap(),
            "10.0.0.2:1".parse().unwrap(),
            "10.0.0.3:1".parse().unwrap(),
        );
        b.record(live, now, &PEER);
        b.record(dead, now, &Err(no_answer(dead)));
        for purpose in [Purpose::Identify, Purpose::Connect] {
            assert_eq!(b.tier(new, now, purpose), Some(Tier::New));
            assert_eq!(b.tier(live, now, purpose), Some(Tier::Verified));
            assert_eq!(b.tier(dead, now, purpose), None, "in backoff");
        }
        assert!(b.is_verified(live) && !b.is_verified(dead) && !b.is_verified(new));
        // After its backoff the dialer retries a dead address (last); `lookup` waits for
        // the identify TTL since its last failure.
        let later = now + DIAL_BACKOFF[0] + Duration::from_millis(1);
        assert_eq!(b.tier(dead, later, Purpose::Connect), Some(Tier::Retry));
        assert_eq!(b.tier(dead, later, Purpose::Identify), None);
        let much_later = now + IDENTIFY_TTL + Duration::from_millis(1);
        assert_eq!(
            b.tier(dead, much_later, Purpose::Identify),
            Some(Tier::Retry)
        );
        assert_eq!(b.fresh_peer(live, now), Some([1; 32]));
        assert_eq!(b.fresh_peer(live, much_later), None);
        assert_eq!(b.fresh_peer(dead, now), None);
    }

    #[test]
    fn only_remote_and_network_failures_count_against_an_address() {
        let mut b = book();
        let addr: SocketAddr = "10.0.0.1:1".parse().unwrap();
        let now = Instant::now();
        b.record(addr, now, &PEER);
        // Declined here: max_peers reached, queue full, topic not joined.
        for reason in [
            Declined::MaxPeers { max: 1 },
            Declined::QueueFull,
            Declined::TopicNotJoined,
        ] {
            b.record(addr, now, &Err(DialError::declined(addr, reason)));
        }
        assert!(!b.in_backoff(addr, now));
        assert_eq!(b.failures(addr), 0);
        assert_eq!(b.fresh_peer(addr, now), Some([1; 32]), "still verified");
        assert_eq!(b.tier(addr, now, Purpose::Connect), Some(Tier::Verified));
        assert!(b.dial_failures().is_empty());
        // The remote refusing, or not answering, does count.
        let busy = DialError::handshake(addr, HandshakeFailure::Busy);
        b.record(addr, now, &Err(busy.clone()));
        assert_eq!(b.failures(addr), 1);
        assert!(b.in_backoff(addr, now));
        assert_eq!(b.fresh_peer(addr, now), None);
        let other: SocketAddr = "10.0.0.2:1".parse().unwrap();
        b.record(other, now, &Err(no_answer(other)));
        let DialError::Failed(no_answer_error) = no_answer(other) else {
            unreachable!()
        };
        let DialError::Failed(busy_error) = busy else {
            unreachable!()
        };
        let listed: Vec<(SocketAddr, u32, HyperswarmError)> = b
            .dial_failures()
            .into_iter()
            .map(|f| (f.addr, f.failures, f.error))
            .collect();
        assert_eq!(listed, [(addr, 1, busy_error), (other, 1, no_answer_error)]);
    }

    #[test]
    fn own_addresses_are_recognised_and_never_listed_as_failures() {
        let mut b = AddressBook::new("10.9.9.9:4000".parse().unwrap(), Some(5000));
        let own = |s: &str| b.is_own(s.parse().unwrap());
        assert!(own("10.9.9.9:4000") && own("127.0.0.1:4000") && own("127.0.0.1:5000"));
        assert!(own("10.9.9.9:5000"));
        assert!(!own("10.9.9.8:4000") && !own("10.9.9.9:4001"));
        let public: SocketAddr = "203.0.113.7:6000".parse().unwrap();
        assert!(!b.is_own(public));
        b.add_own(public);
        assert!(b.is_own(public));
        let me: SocketAddr = "10.0.0.5:1".parse().unwrap();
        let now = Instant::now();
        b.record(me, now, &Err(no_answer(me)));
        b.record(me, now, &Ok(Outcome::Myself));
        assert!(b.is_own(me));
        assert!(b.dial_failures().is_empty());
    }

    #[test]
    fn remembered_addresses_are_bounded() {
        let mut b = book();
        let now = Instant::now();
        for i in 0..(MAX_TRACKED_ADDRS as u32 * 2) {
            let addr = SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 1));
            b.record(addr, now, &Ok(Outcome::Known([0; 32])));
            assert!(b.entries.len() <= MAX_TRACKED_ADDRS);
        }
    }
}
