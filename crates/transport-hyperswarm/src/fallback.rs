//! Relay routes behind real addresses (Auto mode): the mirror image of `direct.rs`, for a
//! connection made directly (quinn addresses the peer at its real address `E`) whose peer
//! is also a member of the topic's relay room, at route `V` (its virtual address). Once the
//! peers have told each other their relay routes over the connection, the data socket can
//! send what quinn addresses to `E` through `V`'s relay route (both ways while the direct
//! path is suspect, through the relay alone once it is silent) and presents relay
//! datagrams from `V` as coming from `E`, so quinn never sees a path change, exactly as a
//! relay-made connection that went direct never does.
//!
//! Receiving from an adopted `V` stays mapped to `E` while the route is adopted, whichever
//! way sending goes: the peer may fall back a moment before or after this side does. While
//! adopted, `V` is not dialled (a relay-made connection there would be a duplicate, and its
//! packets would be taken for this one's).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Which way the packets quinn addresses to a real address go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Via {
    /// Over UDP only (the direct path is fine).
    Direct,
    /// Over UDP and through the relay (the direct path is suspect; QUIC drops duplicates).
    Both,
    /// Through the relay only (the direct path is silent).
    Relay,
}

#[derive(Debug, Default)]
struct Maps {
    /// E → (V, how E's packets go).
    send: HashMap<SocketAddr, (SocketAddr, Via)>,
    /// V → E: relay datagrams from V are E's.
    recv: HashMap<SocketAddr, SocketAddr>,
}

/// The relay routes adopted by real addresses, both ways.
#[derive(Debug, Default)]
pub(crate) struct FallbackTable {
    maps: RwLock<Maps>,
    /// Whether any route is adopted (a fast path for the data socket when none is).
    any: AtomicBool,
}

impl FallbackTable {
    fn read(&self) -> RwLockReadGuard<'_, Maps> {
        self.maps.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Maps> {
        self.maps.write().unwrap_or_else(|e| e.into_inner())
    }

    /// `real`'s connection falls back through the relay route at virtual address `vaddr`
    /// (its packets still go over UDP until [`set_via`](Self::set_via) says otherwise).
    pub(crate) fn adopt(&self, real: SocketAddr, vaddr: SocketAddr) {
        let mut m = self.write();
        m.recv.insert(vaddr, real);
        let via = m.send.get(&real).map_or(Via::Direct, |(_, via)| *via);
        m.send.insert(real, (vaddr, via));
        self.any.store(true, Ordering::Relaxed);
    }

    /// Forgets the route at `vaddr` adopted by `real` (gone, or its connection ended).
    pub(crate) fn release(&self, real: SocketAddr, vaddr: SocketAddr) {
        let mut m = self.write();
        if m.recv.get(&vaddr) == Some(&real) {
            m.recv.remove(&vaddr);
        }
        if m.send.get(&real).is_some_and(|(v, _)| *v == vaddr) {
            // Another connection to the same address may have adopted a route too.
            match m.recv.iter().find(|(_, e)| **e == real).map(|(v, _)| *v) {
                Some(other) => {
                    m.send.insert(real, (other, Via::Direct));
                }
                None => {
                    m.send.remove(&real);
                }
            }
        }
        self.any.store(!m.recv.is_empty(), Ordering::Relaxed);
    }

    /// Sends `real`'s packets this way from now on (no-op without an adopted route).
    pub(crate) fn set_via(&self, real: SocketAddr, via: Via) {
        if let Some(entry) = self.write().send.get_mut(&real) {
            entry.1 = via;
        }
    }

    /// Where `real`'s packets also or only go (`None`: over UDP only, as without a route).
    pub(crate) fn route(&self, real: &SocketAddr) -> Option<(SocketAddr, Via)> {
        if !self.any.load(Ordering::Relaxed) {
            return None;
        }
        self.read()
            .send
            .get(real)
            .copied()
            .filter(|(_, via)| *via != Via::Direct)
    }

    /// The real address relay datagrams from `vaddr` are presented from, if adopted.
    pub(crate) fn real_for(&self, vaddr: &SocketAddr) -> Option<SocketAddr> {
        if !self.any.load(Ordering::Relaxed) {
            return None;
        }
        self.read().recv.get(vaddr).copied()
    }

    /// Whether `real` adopted a route.
    pub(crate) fn has(&self, real: &SocketAddr) -> bool {
        self.any.load(Ordering::Relaxed) && self.read().send.contains_key(real)
    }

    /// How many routes are adopted.
    pub(crate) fn len(&self) -> usize {
        self.read().recv.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_adopted_route_carries_packets_only_when_told_and_always_maps_back() {
        let t = FallbackTable::default();
        let (e, v) = (a("10.0.0.2:4000"), a("240.0.0.7:1"));
        assert_eq!(t.route(&e), None);
        assert_eq!(t.real_for(&v), None);
        t.set_via(e, Via::Relay);
        assert_eq!(
            t.route(&e),
            None,
            "no route adopted: nothing to send through"
        );
        t.adopt(e, v);
        assert_eq!(t.route(&e), None, "adopting does not switch sending");
        assert_eq!(
            t.real_for(&v),
            Some(e),
            "but the peer's relayed packets are E's"
        );
        assert_eq!(t.len(), 1);
        t.set_via(e, Via::Both);
        assert_eq!(t.route(&e), Some((v, Via::Both)));
        t.set_via(e, Via::Relay);
        assert_eq!(t.route(&e), Some((v, Via::Relay)));
        // A new route (the peer reconnected to the relay) starts direct again.
        let v2 = a("240.0.0.8:1");
        t.release(e, v);
        t.adopt(e, v2);
        assert_eq!(t.route(&e), None);
        t.set_via(e, Via::Relay);
        assert_eq!(t.route(&e), Some((v2, Via::Relay)));
        assert_eq!(t.real_for(&v), None);
        t.set_via(e, Via::Direct);
        assert_eq!(t.route(&e), None);
        t.release(e, v2);
        assert_eq!(t.real_for(&v2), None);
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn two_connections_to_one_address_share_it() {
        let t = FallbackTable::default();
        let (e, v1, v2) = (a("10.0.0.2:4000"), a("240.0.0.1:1"), a("240.0.0.2:1"));
        t.adopt(e, v1);
        t.adopt(e, v2);
        assert_eq!((t.real_for(&v1), t.real_for(&v2)), (Some(e), Some(e)));
        t.set_via(e, Via::Relay);
        assert_eq!(t.route(&e), Some((v2, Via::Relay)), "the last adopted");
        t.release(e, v2);
        t.set_via(e, Via::Relay);
        assert_eq!(t.route(&e), Some((v1, Via::Relay)), "the other one is left");
        t.release(e, v1);
        assert_eq!(t.route(&e), None);
    }
}
