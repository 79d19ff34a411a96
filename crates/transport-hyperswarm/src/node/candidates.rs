//! Candidates from any discovery source (the DHT today; LAN discovery could hand its own
//! over the same way) turned into dials and identify checks: which are worth a dial now and
//! in which order, a round of dials fed as a source's answers arrive, and `lookup`'s checks
//! that turn candidates into verified peers. Sources only hand over addresses; the address
//! book, the dialer and the handshakes do the rest.

use std::collections::hash_map::RandomState;
use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pluresdb_sync_core::{PeerInfo, TopicHash};
use tokio::sync::OwnedSemaphorePermit;

use super::Node;
use super::book::schedule;
use super::dialer::DialStart;
use crate::wire::Purpose;

/// How long `lookup` waits for its identify checks after the DHT query (and a dial round
/// for its leftovers): enough for a live peer's check to get a slot behind a full set of
/// dead ones (each gives its slot back after the 1.5 s first-answer timeout) and finish its
/// few round trips. Checks still running then continue in the background; their results
/// are listed by the next `lookup` at once.
pub(crate) const LOOKUP_CHECK_BUDGET: Duration = Duration::from_secs(4);

/// Most candidates taken from one round of a source, or one `lookup` (the DHT may return
/// thousands of bogus ones).
pub(crate) const MAX_CANDIDATES: usize = 256;

/// At most one "cannot reach a peer listed on the DHT" warning per this interval (the others
/// go to debug): a DHT full of dead entries would otherwise flood the log with hundreds.
/// `HyperswarmTransport::dial_failures` lists them all.
const UNREACHABLE_WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Lets at most one warning through per [`UNREACHABLE_WARN_INTERVAL`].
#[derive(Debug, Default)]
pub(crate) struct WarnLimit {
    last: Option<Instant>,
}

impl WarnLimit {
    /// Whether a warning may be logged at `now` (and, if so, counts it).
    pub(crate) fn allow(&mut self, now: Instant) -> bool {
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < UNREACHABLE_WARN_INTERVAL)
        {
            return false;
        }
        self.last = Some(now);
        true
    }
}

/// One round of `Connect` dials for a topic, fed by a discovery source as its answers
/// arrive: each batch is dialled at once, in [`schedule`] order, while dial slots are free;
/// [`DialRound::finish`] dials what found no slot, then what `lookup` was checking.
pub(crate) struct DialRound {
    topic: TopicHash,
    order: RandomState,
    seen: HashSet<SocketAddr>,
    leftover: Vec<SocketAddr>,
    being_checked: Vec<SocketAddr>,
}

impl DialRound {
    /// A round for `topic`, with a fresh random dial order.
    pub(crate) fn new(topic: TopicHash) -> Self {
        Self {
            topic,
            order: RandomState::new(),
            seen: HashSet::new(),
            leftover: Vec::new(),
            being_checked: Vec::new(),
        }
    }

    /// Dials the candidates of `batch` not seen in this round yet while slots are free;
    /// returns whether the round takes more (at most [`MAX_CANDIDATES`]).
    pub(crate) fn offer(
        &mut self,
        node: &Arc<Node>,
        batch: impl IntoIterator<Item = SocketAddr>,
    ) -> bool {
        let mut fresh = Vec::new();
        for addr in batch {
            if self.seen.len() >= MAX_CANDIDATES {
                break;
            }
            // The peer there is connected through a relay-made connection that went (or
            // is going) direct to it: a second connection would only be a duplicate, and
            // its packets would be taken for the first one's.
            if node.is_upgraded_endpoint(&addr) {
                continue;
            }
            if self.seen.insert(addr) {
                fresh.push(addr);
            }
        }
        for addr in node.dial_order(self.topic, fresh, &self.order) {
            match node.dialer.try_slot() {
                Some(permit) => {
                    if node.maybe_dial(self.topic, addr, permit) == DialStart::BeingChecked {
                        self.being_checked.push(addr);
                    }
                }
                None => self.leftover.push(addr),
            }
        }
        self.seen.len() < MAX_CANDIDATES
    }

    /// Dials what found no slot, in schedule order again as slots free up, then what
    /// `lookup` was checking once its check is done (a verified address is dialled first,
    /// as verified; a dead one is in backoff and skipped), all until `budget`. The rest
    /// waits for the next round.
    pub(crate) async fn finish(self, node: &Arc<Node>, budget: tokio::time::Instant) {
        let DialRound {
            topic,
            order,
            leftover,
            mut being_checked,
            ..
        } = self;
        being_checked.extend(node.dial_in_turn(topic, leftover, &order, budget).await);
        if !being_checked.is_empty() {
            node.wait_checks(topic, &being_checked, budget).await;
            node.dial_in_turn(topic, being_checked, &order, budget)
                .await;
        }
    }
}

impl Node {
    /// Checks `candidates` for `lookup` and lists the peers verified among them.
    ///
    /// Addresses with a live session or verified within the identify TTL are listed at
    /// once; the others are checked in [`schedule`] order, each as soon as a dial slot is its
    /// turn (waiting in one queue with the `connect` loop, so neither starves). Returns when
    /// its checks are done or after [`LOOKUP_CHECK_BUDGET`], with what is verified by then;
    /// checks still running finish in the background for the next lookup.
    pub(super) async fn verify(
        self: &Arc<Self>,
        topic: TopicHash,
        candidates: Vec<SocketAddr>,
    ) -> Vec<PeerInfo> {
        let budget = tokio::time::Instant::now() + LOOKUP_CHECK_BUDGET.min(self.settings.timeout);
        // `watched`: every candidate whose result this lookup reports; `queue`: the ones it
        // has to check itself.
        let (watched, mut queue) = {
            // Lock order: the dials in flight, then the state.
            let flights = self.dialer.flights();
            let st = self.state();
            let now = Instant::now();
            let mut watched = Vec::new();
            let mut to_check = Vec::new();
            for addr in candidates {
                if st.book.is_own(addr) || self.is_upgraded_endpoint(&addr) {
                    continue;
                }
                let listed = st.sessions.at(&topic, addr).is_some()
                    || st.book.fresh_peer(addr, now).is_some();
                if listed || flights.any(&(topic, addr)) {
                    watched.push(addr);
                } else if let Some(tier) = st.book.tier(addr, now, Purpose::Identify) {
                    watched.push(addr);
                    to_check.push((tier, addr));
                }
            }
            (
                watched,
                VecDeque::from(schedule(to_check, &RandomState::new())),
            )
        };
        // Slots are taken by waiting in the one queue, first come first served with the
        // `connect` loop's waits (polling for free slots would starve while a connect round
        // waits for its leftovers).
        while let Some(addr) = queue.pop_front() {
            let Some(permit) = self.dialer.slot_by(budget).await else {
                break;
            };
            self.start_check(topic, addr, permit);
        }
        self.dialer
            .wait_until(budget, |f| !watched.iter().any(|a| f.any(&(topic, *a))))
            .await;
        let st = self.state();
        let now = Instant::now();
        let mut found: Vec<PeerInfo> = Vec::new();
        for addr in watched {
            if let Some(peer) = st.sessions.at(&topic, addr) {
                push_unique(&mut found, peer, addr, true);
            } else if let Some(peer) = st.book.fresh_peer(addr, now) {
                let connected = st.sessions.is_live(&(topic, peer));
                push_unique(&mut found, peer, addr, connected);
            }
        }
        found
    }

    /// Dials `candidates` in [`schedule`] order, each when a dial slot is its turn, until
    /// `budget`; returns the ones `lookup` was checking.
    async fn dial_in_turn(
        self: &Arc<Self>,
        topic: TopicHash,
        candidates: Vec<SocketAddr>,
        order: &RandomState,
        budget: tokio::time::Instant,
    ) -> Vec<SocketAddr> {
        let mut being_checked = Vec::new();
        for addr in self.dial_order(topic, candidates, order) {
            let Some(permit) = self.dialer.slot_by(budget).await else {
                break;
            };
            if self.maybe_dial(topic, addr, permit) == DialStart::BeingChecked {
                being_checked.push(addr);
            }
        }
        being_checked
    }

    /// Waits until no identify check of `addrs` is in flight, or until `budget`.
    async fn wait_checks(
        &self,
        topic: TopicHash,
        addrs: &[SocketAddr],
        budget: tokio::time::Instant,
    ) {
        self.dialer
            .wait_until(budget, |f| !addrs.iter().any(|a| f.checking(&(topic, *a))))
            .await;
    }

    /// The candidates worth a `Connect` dial, in [`schedule`] order.
    fn dial_order(
        &self,
        topic: TopicHash,
        candidates: Vec<SocketAddr>,
        order: &RandomState,
    ) -> Vec<SocketAddr> {
        let st = self.state();
        let now = Instant::now();
        let ranked = candidates
            .into_iter()
            .filter(|addr| !st.book.is_own(*addr) && st.sessions.at(&topic, *addr).is_none())
            .filter_map(|addr| st.book.tier(addr, now, Purpose::Connect).map(|t| (t, addr)))
            .collect();
        schedule(ranked, order)
    }

    /// Dials `addr` in the background with the dial slot `permit`, unless it is not worth it
    /// (anymore): ourselves, connected, in backoff, being dialled, or full; or unless
    /// `lookup` is checking it (the caller dials it after the check). A slot not used is
    /// freed at once and dial waiters are woken.
    pub(super) fn maybe_dial(
        self: &Arc<Self>,
        topic: TopicHash,
        addr: SocketAddr,
        permit: OwnedSemaphorePermit,
    ) -> DialStart {
        let key = (topic, addr);
        let (verdict, in_flight) = self.dialer.begin(key, Purpose::Connect, permit, |flights| {
            let st = self.state();
            let now = Instant::now();
            if st.book.is_own(addr)
                || st.sessions.at(&topic, addr).is_some()
                || st.book.in_backoff(addr, now)
                || flights.dialing(&key)
                || st.sessions.live() >= self.settings.max_peers
                || !st.topics.is_accepting(&topic)
            {
                DialStart::Skipped
            } else if flights.checking(&key) {
                DialStart::BeingChecked
            } else {
                DialStart::Started
            }
        });
        let Some(in_flight) = in_flight else {
            return verdict;
        };
        let node = self.clone();
        self.spawn(async move {
            let result = node.dial(addr, topic, Purpose::Connect).await;
            {
                let mut st = node.state();
                if let Err(e) = &result
                    && !e.is_local()
                {
                    let failures = st.book.failures(addr) + 1;
                    let warn = failures == 2 && node.unreachable_warnings().allow(Instant::now());
                    if warn {
                        tracing::warn!(%addr, error = %e, "cannot reach a peer listed on the DHT; retrying with backoff");
                    } else {
                        tracing::debug!(%addr, error = %e, failures, "dial failed");
                    }
                }
                st.book.record(addr, Instant::now(), &result);
            }
            drop(in_flight);
        });
        DialStart::Started
    }

    /// Runs an identify check of `addr` in the background with the dial slot `permit`; its
    /// result lands in the address state (listed by this and later lookups). Not when a dial
    /// or check of it is in flight already (its result is as good); the slot is then freed
    /// at once.
    pub(super) fn start_check(
        self: &Arc<Self>,
        topic: TopicHash,
        addr: SocketAddr,
        permit: OwnedSemaphorePermit,
    ) {
        let key = (topic, addr);
        let (_, in_flight) = self
            .dialer
            .begin(key, Purpose::Identify, permit, |flights| {
                if flights.any(&key) {
                    DialStart::Skipped
                } else {
                    DialStart::Started
                }
            });
        let Some(in_flight) = in_flight else {
            return;
        };
        let node = self.clone();
        self.spawn(async move {
            let result = node.dial(addr, topic, Purpose::Identify).await;
            {
                let mut st = node.state();
                if let Err(e) = &result {
                    tracing::debug!(%addr, error = %e, "lookup could not verify a DHT entry");
                }
                st.book.record(addr, Instant::now(), &result);
            }
            drop(in_flight);
        });
    }
}

fn push_unique(found: &mut Vec<PeerInfo>, peer: [u8; 32], addr: SocketAddr, connected: bool) {
    let id = hex::encode(peer);
    if let Some(existing) = found.iter_mut().find(|p| p.id == id) {
        existing.connected |= connected;
        return;
    }
    found.push(PeerInfo {
        id,
        address: Some(addr.to_string()),
        connected,
    });
}

#[cfg(test)]
mod tests {
    use tokio::sync::mpsc;

    use super::*;
    use crate::node::dialer::MAX_CONCURRENT_DIALS;

    #[test]
    fn unreachable_warnings_are_rate_limited() {
        let mut limit = WarnLimit::default();
        let t0 = Instant::now();
        assert!(limit.allow(t0));
        assert!(!limit.allow(t0 + Duration::from_secs(1)));
        assert!(!limit.allow(t0 + UNREACHABLE_WARN_INTERVAL - Duration::from_millis(1)));
        assert!(limit.allow(t0 + UNREACHABLE_WARN_INTERVAL));
    }

    #[test]
    fn a_peer_is_listed_once_connected_if_any_address_is() {
        let mut found = Vec::new();
        let (a, b) = ("10.0.0.1:1".parse().unwrap(), "10.0.0.2:1".parse().unwrap());
        push_unique(&mut found, [1; 32], a, false);
        push_unique(&mut found, [1; 32], b, true);
        push_unique(&mut found, [2; 32], b, false);
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].address.as_deref(), Some("10.0.0.1:1"));
        assert!(found[0].connected && !found[1].connected);
        assert_eq!(found[1].id, hex::encode([2u8; 32]));
    }

    /// Dials and checks in flight hold a slot and a set entry; a check skips an address
    /// being dialled, a dial defers one being checked, and aborting them (shutdown) frees
    /// both.
    #[tokio::test]
    async fn dials_and_checks_share_slots_and_free_them_when_aborted() {
        let loopback = std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 0);
        let t = crate::HyperswarmTransport::builder()
            .bootstrap(Vec::<String>::new())
            .bind_addr(loopback)
            .build()
            .unwrap();
        let node = Node::start(t.settings.clone(), Default::default())
            .await
            .unwrap();
        let topic = [9u8; 32];
        node.register_topic(topic);
        let (tx, _rx) = mpsc::channel(1);
        let discovering = node.spawn(std::future::pending());
        node.state().topics.set_accepting(&topic, tx, discovering);
        // Endpoints where nobody answers.
        let silent: Vec<std::net::UdpSocket> = (0..2)
            .map(|_| std::net::UdpSocket::bind(loopback).unwrap())
            .collect();
        let (dialled, checked) = (
            silent[0].local_addr().unwrap(),
            silent[1].local_addr().unwrap(),
        );
        let slot = || node.dialer.try_slot().unwrap();
        let free = || node.dialer.free_slots();

        assert_eq!(node.maybe_dial(topic, dialled, slot()), DialStart::Started);
        node.start_check(topic, dialled, slot());
        assert_eq!(
            free(),
            MAX_CONCURRENT_DIALS - 1,
            "a check of a dialled address"
        );
        node.start_check(topic, checked, slot());
        assert_eq!(
            node.maybe_dial(topic, checked, slot()),
            DialStart::BeingChecked
        );
        assert_eq!(
            node.maybe_dial(topic, dialled, slot()),
            DialStart::Skipped,
            "dialled twice"
        );
        assert_eq!(free(), MAX_CONCURRENT_DIALS - 2);
        {
            let flights = node.dialer.flights();
            assert!(flights.dialing(&(topic, dialled)));
            assert!(flights.checking(&(topic, checked)));
            assert_eq!(flights.len(), 2);
        }

        node.shutdown();
        let budget = tokio::time::Instant::now() + Duration::from_secs(10);
        node.dialer
            .wait_until(budget, |f| f.len() == 0 && free() == MAX_CONCURRENT_DIALS)
            .await;
        assert_eq!(
            node.dialer.flights().len(),
            0,
            "aborted dials kept their entries"
        );
        assert_eq!(
            free(),
            MAX_CONCURRENT_DIALS,
            "aborted dials kept their slots"
        );
    }
}
