//! The peer table: which link carries each peer, and what a new or ended connection means.
//!
//! Pure state (no I/O, no clock), shared by the bridge's tasks behind one mutex. The rules:
//!
//! - A connection from a peer with no link starts a new link: PeerConnected.
//! - A connection from a peer that already has a link goes to that link, which replaces its
//!   connection (a peer that reconnected, or a transport that yielded a second connection):
//!   no second PeerConnected, and the link's queues and event position carry over.
//! - A link that ends removes its peer only if it is still that peer's link (a link that was
//!   already replaced by a newer one for the same peer changes nothing): PeerDisconnected once.
//! - At most `max_peers` links; a connection beyond that is refused.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

/// Tells the links of one bridge apart, also across reconnects of the same peer.
pub(crate) type LinkId = u64;

/// What [`PeerTable::admit`] decided for a connection from a peer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admitted<'a, L> {
    /// The peer had no link; this new one was made for it. Announce the peer.
    New(&'a L),
    /// The peer has this link already: hand it the connection. Announce nothing.
    Existing(&'a L),
    /// The table holds `max_peers` links already: refuse the connection.
    Full,
}

/// Peer id to its link.
#[derive(Debug)]
pub(crate) struct PeerTable<L> {
    peers: HashMap<String, (LinkId, L)>,
    next_id: LinkId,
    max_peers: usize,
}

impl<L> PeerTable<L> {
    /// An empty table admitting at most `max_peers` (at least 1) peers.
    pub(crate) fn new(max_peers: usize) -> Self {
        Self {
            peers: HashMap::new(),
            next_id: 1,
            max_peers: max_peers.max(1),
        }
    }

    /// Decides what a new connection from `peer` means; for a new peer, `make` builds its
    /// link from the link's id.
    pub(crate) fn admit(&mut self, peer: &str, make: impl FnOnce(LinkId) -> L) -> Admitted<'_, L> {
        let full = self.peers.len() >= self.max_peers;
        match self.peers.entry(peer.to_owned()) {
            Entry::Occupied(slot) => Admitted::Existing(&slot.into_mut().1),
            Entry::Vacant(_) if full => Admitted::Full,
            Entry::Vacant(slot) => {
                let id = self.next_id;
                self.next_id += 1;
                Admitted::New(&slot.insert((id, make(id))).1)
            }
        }
    }

    /// Removes `peer` if link `id` is still its link; returns that link (the caller then
    /// announces the departure) or `None` (nothing changed).
    pub(crate) fn remove(&mut self, peer: &str, id: LinkId) -> Option<L> {
        match self.peers.get(peer) {
            Some((current, _)) if *current == id => self.peers.remove(peer).map(|(_, l)| l),
            _ => None,
        }
    }

    /// The link of `peer`, if it has one.
    pub(crate) fn get(&self, peer: &str) -> Option<&L> {
        self.peers.get(peer).map(|(_, l)| l)
    }

    /// Every peer and its link, in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, &L)> {
        self.peers.iter().map(|(p, (_, l))| (p.as_str(), l))
    }

    /// How many peers have a link.
    pub(crate) fn len(&self) -> usize {
        self.peers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A link stand-in that remembers its id.
    fn link(id: LinkId) -> LinkId {
        id
    }

    #[test]
    fn a_new_peer_gets_a_link_and_a_second_connection_reuses_it() {
        let mut t = PeerTable::new(8);
        assert_eq!(t.admit("a", link), Admitted::New(&1));
        // Reconnect (or a duplicate connection): same link, no new announcement.
        assert_eq!(
            t.admit("a", |_| panic!("no new link for a known peer")),
            Admitted::Existing(&1)
        );
        assert_eq!(t.admit("b", link), Admitted::New(&2));
        assert_eq!(t.len(), 2);
        assert_eq!(t.get("a"), Some(&1));
        let mut peers: Vec<&str> = t.iter().map(|(p, _)| p).collect();
        peers.sort_unstable();
        assert_eq!(peers, ["a", "b"]);
    }

    #[test]
    fn only_the_current_link_removes_its_peer() {
        let mut t = PeerTable::new(8);
        assert_eq!(t.admit("a", link), Admitted::New(&1));
        assert_eq!(t.remove("a", 1), Some(1));
        // The peer comes back: a fresh link with a new id.
        assert_eq!(t.admit("a", link), Admitted::New(&2));
        // The first link ending late (after a cut, say) must not remove the second.
        assert_eq!(t.remove("a", 1), None);
        assert_eq!(t.get("a"), Some(&2));
        assert_eq!(t.remove("a", 2), Some(2));
        assert_eq!(t.remove("a", 2), None, "a departure is announced once");
        assert_eq!(t.remove("nobody", 2), None);
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn at_most_max_peers() {
        let mut t = PeerTable::new(2);
        assert!(matches!(t.admit("a", link), Admitted::New(_)));
        assert!(matches!(t.admit("b", link), Admitted::New(_)));
        assert_eq!(t.admit("c", link), Admitted::Full);
        // A known peer reconnecting is not refused when the table is full.
        assert!(matches!(t.admit("a", link), Admitted::Existing(_)));
        assert_eq!(t.remove("b", 2), Some(2));
        assert!(matches!(t.admit("c", link), Admitted::New(_)));
        assert_eq!(PeerTable::<LinkId>::new(0).max_peers, 1);
    }
}
