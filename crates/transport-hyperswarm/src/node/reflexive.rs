//! Public-address learning: KRPC pings sent from the data socket to a few DHT nodes, whose
//! replies say where they saw the socket (BEP 42 `ip`); the majority is the public (reflexive)
//! address, which is announced. The pings are read-only (BEP 43 `ro: 1`) and carry one node
//! id for the node's lifetime, so DHT nodes do not take the data socket for a DHT node (and
//! list it to others, whose queries to it would wait out their timeouts). The tally of
//! replies is pure (`now` in, verdict out); the pings and the replies diverted from the data
//! socket are its thin driver.

use std::collections::HashMap;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use super::Node;
use crate::krpc;
use crate::socket::DataSocket;

/// DHT nodes asked for the data socket's public address each time (a majority decides).
pub(crate) const REFLEXIVE_PINGS: usize = 4;

/// How long to wait for their replies.
const REFLEXIVE_TIMEOUT: Duration = Duration::from_secs(1);

/// After the first reply, how much longer the others may take.
const REFLEXIVE_GRACE: Duration = Duration::from_millis(200);

/// The replies to one round of pings, and when to stop waiting for more.
#[derive(Debug)]
pub(crate) struct Tally {
    expected: usize,
    answered: usize,
    seen: Vec<SocketAddrV4>,
    deadline: Instant,
    agreed: bool,
}

/// What a round of pings learned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Learned {
    /// The address most replies named.
    pub(crate) public: SocketAddrV4,
    /// Whether every reply named it. Different answers mean the NAT maps each destination
    /// differently ("symmetric"), where punching will likely fail.
    pub(crate) unanimous: bool,
}

impl Tally {
    /// A round of `expected` pings sent at `now`.
    pub(crate) fn new(now: Instant, expected: usize) -> Self {
        Self {
            expected,
            answered: 0,
            seen: Vec::new(),
            deadline: now + REFLEXIVE_TIMEOUT,
            agreed: false,
        }
    }

    /// Until when to wait for more replies.
    pub(crate) fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Whether waiting longer is pointless: every node answered, or two agree (a majority
    /// of the usual four can wait).
    pub(crate) fn is_done(&self) -> bool {
        self.agreed || self.answered >= self.expected
    }

    /// A reply arrived at `now`, naming `seen_as` (`None`: it named nothing).
    pub(crate) fn on_reply(&mut self, now: Instant, seen_as: Option<SocketAddrV4>) {
        self.answered += 1;
        let Some(addr) = seen_as else {
            return;
        };
        self.seen.push(addr);
        self.agreed |= self.votes(addr) >= 2;
        // The first answer came: give the others only a moment more.
        self.deadline = self.deadline.min(now + REFLEXIVE_GRACE);
    }

    fn votes(&self, addr: SocketAddrV4) -> usize {
        self.seen.iter().filter(|a| **a == addr).count()
    }

    /// The most reported address (the first of a tie), if any reply named one.
    pub(crate) fn verdict(&self) -> Option<Learned> {
        let mut best: Option<(SocketAddrV4, usize)> = None;
        for a in &self.seen {
            let votes = self.votes(*a);
            if best.is_none_or(|(_, v)| votes > v) {
                best = Some((*a, votes));
            }
        }
        let (public, _) = best?;
        Some(Learned {
            public,
            unanimous: self.seen.iter().all(|a| *a == public),
        })
    }

    /// What the replies named, in order.
    pub(crate) fn seen(&self) -> &[SocketAddrV4] {
        &self.seen
    }
}

/// A ping in flight: the node pinged and where to report its reply.
type PendingPing = (SocketAddr, mpsc::Sender<Option<SocketAddrV4>>);

/// The node's pings in flight (by transaction id) and the address they taught it.
#[derive(Debug)]
pub(crate) struct Reflexive {
    /// The node id every ping carries (BEP 5 wants one per sender, not one per message).
    node_id: [u8; 20],
    pings: Mutex<HashMap<[u8; 4], PendingPing>>,
    /// The learned public address; its watchers (the path upgrades, which send their
    /// candidates again when it changes) hear of every change.
    public: watch::Sender<Option<SocketAddrV4>>,
}

impl Default for Reflexive {
    fn default() -> Self {
        Self {
            node_id: *mainline::Id::random().as_bytes(),
            pings: Mutex::default(),
            public: watch::Sender::new(None),
        }
    }
}

impl Reflexive {
    /// The learned public address.
    pub(crate) fn public(&self) -> Option<SocketAddrV4> {
        *self.public.borrow()
    }

    /// Hears of every change of [`Reflexive::public`].
    pub(crate) fn watch_public(&self) -> watch::Receiver<Option<SocketAddrV4>> {
        self.public.subscribe()
    }

    /// Remembers `public`; whether it changed (watchers are told only then).
    fn set_public(&self, public: SocketAddrV4) -> bool {
        self.public.send_if_modified(|p| {
            let changed = *p != Some(public);
            *p = Some(public);
            changed
        })
    }

    fn pings(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 4], PendingPing>> {
        self.pings.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A datagram the data socket diverted from quinn. Only a KRPC reply from the node we
    /// pinged, with that ping's transaction id, counts (a forged one from elsewhere does not).
    pub(crate) fn on_datagram(&self, from: SocketAddr, bytes: &[u8]) {
        let Ok(reply) = krpc::decode_reply(bytes) else {
            return;
        };
        let Ok(txid) = <[u8; 4]>::try_from(reply.txid.as_slice()) else {
            return;
        };
        let mut pings = self.pings();
        if pings.get(&txid).is_some_and(|(to, _)| *to == from)
            && let Some((_, tx)) = pings.remove(&txid)
        {
            let _ = tx.try_send(reply.seen_as);
        }
    }

    /// Pings `nodes` from the data socket and tallies their replies; remembers the verdict.
    /// Returns whether any node answered, and the verdict.
    pub(crate) async fn learn(
        &self,
        data: &DataSocket,
        nodes: &[SocketAddrV4],
    ) -> (bool, Option<Learned>) {
        let (tx, mut rx) = mpsc::channel(REFLEXIVE_PINGS.max(nodes.len()));
        let mut txids = Vec::new();
        for node in nodes {
            let random = mainline::Id::random();
            let bytes = random.as_bytes();
            let txid = [bytes[0], bytes[1], bytes[2], bytes[3]];
            self.pings()
                .insert(txid, (SocketAddr::V4(*node), tx.clone()));
            data.send_raw(
                SocketAddr::V4(*node),
                &krpc::encode_ping(txid, self.node_id),
            );
            txids.push(txid);
        }
        drop(tx);
        let mut tally = Tally::new(Instant::now(), txids.len());
        while !tally.is_done() {
            let deadline = tokio::time::Instant::from_std(tally.deadline());
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(seen_as)) => tally.on_reply(Instant::now(), seen_as),
                Ok(None) | Err(_) => break,
            }
        }
        {
            let mut pings = self.pings();
            for txid in &txids {
                pings.remove(txid);
            }
        }
        let answered = tally.answered > 0;
        let Some(learned) = tally.verdict() else {
            return (answered, None);
        };
        if !learned.unanimous {
            tracing::warn!(
                seen = ?tally.seen(),
                "DHT nodes see this socket at different addresses: endpoint-dependent NAT \
                 mapping, direct connections will likely fail"
            );
        }
        self.set_public(learned.public);
        (answered, Some(learned))
    }
}

impl Node {
    /// Hands the datagrams the data socket kept from quinn to the reflexive-address learner,
    /// and path probes to their connections.
    pub(super) async fn handle_diverted(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<(SocketAddr, Vec<u8>)>,
    ) {
        while let Some((from, bytes)) = rx.recv().await {
            if crate::path_wire::is_probe(&bytes) {
                self.on_path_probe(from, &bytes);
                continue;
            }
            self.reflexive.on_datagram(from, &bytes);
        }
    }

    /// Learns the data socket's public address from up to [`REFLEXIVE_PINGS`] DHT nodes of
    /// the routing table (or, right after start while it is empty, the bootstrap nodes).
    /// Returns whether any DHT node answered, and the address (neither without a DHT).
    pub(super) async fn learn_public_addr(&self) -> (bool, Option<SocketAddrV4>) {
        let Some(dht) = self.dht.as_ref() else {
            return (false, None);
        };
        let table = dht.to_bootstrap().await;
        let bootstrap = self
            .bootstrap
            .iter()
            .flat_map(|n| n.resolved.iter().copied());
        let candidates = table.iter().filter_map(|s| s.parse().ok()).chain(bootstrap);
        let mut nodes: Vec<SocketAddrV4> = Vec::new();
        for node in candidates {
            if !nodes.contains(&node) && nodes.len() < REFLEXIVE_PINGS {
                nodes.push(node);
            }
        }
        let (answered, learned) = self.reflexive.learn(&self.data, &nodes).await;
        let Some(learned) = learned else {
            return (answered, None);
        };
        self.state().book.add_own(SocketAddr::V4(learned.public));
        (true, Some(learned.public))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchers_hear_of_a_new_public_address_only_when_it_changes() {
        let r = Reflexive::default();
        let mut w = r.watch_public();
        assert!(!w.has_changed().unwrap());
        assert!(r.set_public(addr("203.0.113.1:7")));
        assert!(w.has_changed().unwrap());
        assert_eq!(*w.borrow_and_update(), Some(addr("203.0.113.1:7")));
        assert!(!r.set_public(addr("203.0.113.1:7")), "the same again");
        assert!(!w.has_changed().unwrap());
        assert!(r.set_public(addr("203.0.113.9:7")), "renumbered");
        assert!(w.has_changed().unwrap());
        assert_eq!(r.public(), Some(addr("203.0.113.9:7")));
    }

    fn addr(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    #[test]
    fn two_agreeing_replies_settle_it_early() {
        let t0 = Instant::now();
        let mut t = Tally::new(t0, 4);
        assert_eq!(t.deadline(), t0 + REFLEXIVE_TIMEOUT);
        assert!(!t.is_done());
        t.on_reply(t0 + Duration::from_millis(10), Some(addr("203.0.113.1:7")));
        // The first answer leaves the others only the grace period.
        assert_eq!(
            t.deadline(),
            t0 + Duration::from_millis(10) + REFLEXIVE_GRACE
        );
        assert!(!t.is_done());
        t.on_reply(t0 + Duration::from_millis(20), Some(addr("203.0.113.1:7")));
        assert!(t.is_done(), "two agree: no need to wait for the other two");
        assert_eq!(
            t.verdict(),
            Some(Learned {
                public: addr("203.0.113.1:7"),
                unanimous: true
            })
        );
    }

    #[test]
    fn the_majority_wins_and_disagreement_is_reported() {
        let t0 = Instant::now();
        let mut t = Tally::new(t0, 4);
        for (ms, a) in [(5, "198.51.100.1:1"), (6, "198.51.100.2:2")] {
            t.on_reply(t0 + Duration::from_millis(ms), Some(addr(a)));
        }
        assert!(!t.is_done());
        t.on_reply(t0 + Duration::from_millis(7), Some(addr("198.51.100.2:2")));
        assert!(t.is_done());
        assert_eq!(
            t.verdict(),
            Some(Learned {
                public: addr("198.51.100.2:2"),
                unanimous: false
            })
        );
        // A tie (every node answered, each differently) goes to the first answer.
        let mut t = Tally::new(t0, 2);
        t.on_reply(t0, Some(addr("198.51.100.1:1")));
        t.on_reply(t0, Some(addr("198.51.100.2:2")));
        assert!(t.is_done());
        assert_eq!(t.verdict().map(|l| l.public), Some(addr("198.51.100.1:1")));
        assert_eq!(t.verdict().map(|l| l.unanimous), Some(false));
    }

    #[test]
    fn replies_naming_nothing_count_as_answers_only() {
        let t0 = Instant::now();
        let mut t = Tally::new(t0, 2);
        t.on_reply(t0 + Duration::from_millis(300), None);
        assert_eq!(t.deadline(), t0 + REFLEXIVE_TIMEOUT, "no address: no grace");
        assert!(!t.is_done());
        t.on_reply(t0 + Duration::from_millis(400), None);
        assert!(t.is_done());
        assert_eq!(t.verdict(), None);
        // No node to ask: nothing to wait for.
        let t = Tally::new(t0, 0);
        assert!(t.is_done());
        assert_eq!(t.verdict(), None);
    }

    #[test]
    fn only_the_pinged_node_can_answer() {
        let r = Reflexive::default();
        let node: SocketAddr = "10.0.0.1:6881".parse().unwrap();
        let (tx, mut rx) = mpsc::channel(4);
        r.pings().insert(*b"abcd", (node, tx));
        let reply = b"d2:ip6:\x01\x02\x03\x04\x05\x061:t4:abcd1:y1:re";
        // A forged reply from elsewhere, and junk, are ignored.
        r.on_datagram("10.0.0.2:6881".parse().unwrap(), reply);
        r.on_datagram(node, b"d1:t4:abcd1:y1:qe");
        r.on_datagram(node, b"garbage");
        assert!(rx.try_recv().is_err());
        r.on_datagram(node, reply);
        assert_eq!(rx.try_recv().unwrap(), Some(addr("1.2.3.4:1286")));
        // Answered once: a replay finds no ping.
        r.on_datagram(node, reply);
        assert!(rx.try_recv().is_err());
        assert!(r.pings().is_empty());
    }
}
