//! Direct endpoints behind virtual addresses (Auto mode, iroh's magicsock idea): once a
//! connection made through a relay has proven a direct endpoint `E` of its peer, the data
//! socket sends the packets quinn addresses to the connection's virtual address `V` over
//! UDP to `E`, and presents the packets that arrive from `E` as coming from `V`. quinn never
//! sees the switch: the connection keeps its address, and its loss recovery and congestion
//! control carry it across. Sending is switched per `V` (direct or relay); receiving from a
//! learned `E` stays mapped for the connection's life, so packets still in flight on the
//! old path are not mistaken for another peer's.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Most learned endpoints per virtual address: a hostile peer cannot grow the table.
pub(crate) const MAX_LEARNED: usize = 8;

#[derive(Debug, Default)]
struct Maps {
    /// V → E: where V's packets go instead of the relay.
    send: HashMap<SocketAddr, SocketAddr>,
    /// E → V: packets from E are V's.
    recv: HashMap<SocketAddr, SocketAddr>,
    /// The Vs whose packets also go through the relay (their direct path is suspect).
    doubled: std::collections::HashSet<SocketAddr>,
}

/// The direct endpoints of virtual addresses, both ways.
#[derive(Debug, Default)]
pub(crate) struct DirectTable {
    maps: RwLock<Maps>,
    /// Whether any endpoint is learned (a fast path for the data socket when none is).
    any: AtomicBool,
}

impl DirectTable {
    fn read(&self) -> RwLockReadGuard<'_, Maps> {
        self.maps.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Maps> {
        self.maps.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Where `vaddr`'s packets go over UDP (`None`: through the relay).
    pub(crate) fn send_to(&self, vaddr: &SocketAddr) -> Option<SocketAddr> {
        self.route(vaddr).map(|(to, _)| to)
    }

    /// Where `vaddr`'s packets go over UDP, and whether they also go through the relay.
    pub(crate) fn route(&self, vaddr: &SocketAddr) -> Option<(SocketAddr, bool)> {
        if !self.any.load(Ordering::Relaxed) {
            return None;
        }
        let m = self.read();
        let to = *m.send.get(vaddr)?;
        Some((to, m.doubled.contains(vaddr)))
    }

    /// Sends `vaddr`'s packets through the relay too (`true`) or not (`false`).
    pub(crate) fn set_doubled(&self, vaddr: SocketAddr, doubled: bool) {
        let mut m = self.write();
        if doubled {
            m.doubled.insert(vaddr);
        } else {
            m.doubled.remove(&vaddr);
        }
    }

    /// The virtual address packets from `from` belong to, if `from` was learned.
    pub(crate) fn virtual_for(&self, from: &SocketAddr) -> Option<SocketAddr> {
        if !self.any.load(Ordering::Relaxed) {
            return None;
        }
        self.read().recv.get(from).copied()
    }

    /// Packets from `from` belong to `vaddr` from now on; `false` when `vaddr` has
    /// [`MAX_LEARNED`] endpoints already.
    pub(crate) fn learn(&self, from: SocketAddr, vaddr: SocketAddr) -> bool {
        let mut m = self.write();
        if m.recv.get(&from) == Some(&vaddr) {
            return true;
        }
        if m.recv.values().filter(|v| **v == vaddr).count() >= MAX_LEARNED {
            return false;
        }
        m.recv.insert(from, vaddr);
        self.any.store(true, Ordering::Relaxed);
        true
    }

    /// Sends `vaddr`'s packets to `to` over UDP (`Some`) or through the relay (`None`).
    pub(crate) fn set_send(&self, vaddr: SocketAddr, to: Option<SocketAddr>) {
        let mut m = self.write();
        match to {
            Some(to) => {
                m.send.insert(vaddr, to);
                self.any.store(true, Ordering::Relaxed);
            }
            None => {
                m.send.remove(&vaddr);
            }
        }
        m.doubled.remove(&vaddr);
    }

    /// Whether `vaddr`'s packets go direct now.
    pub(crate) fn is_direct(&self, vaddr: &SocketAddr) -> bool {
        self.send_to(vaddr).is_some()
    }

    /// Forgets everything about `vaddr` (its connection ended).
    pub(crate) fn forget(&self, vaddr: &SocketAddr) {
        let mut m = self.write();
        m.send.remove(vaddr);
        m.doubled.remove(vaddr);
        m.recv.retain(|_, v| v != vaddr);
        let empty = m.send.is_empty() && m.recv.is_empty();
        self.any.store(!empty, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn sending_switches_while_receiving_stays_mapped() {
        let t = DirectTable::default();
        let (v, e) = (a("240.0.0.1:1"), a("10.0.0.2:4000"));
        assert_eq!(t.send_to(&v), None);
        assert!(t.learn(e, v));
        assert_eq!(t.virtual_for(&e), Some(v));
        assert_eq!(t.send_to(&v), None, "learning does not switch sending");
        t.set_send(v, Some(e));
        assert_eq!(t.send_to(&v), Some(e));
        assert!(t.is_direct(&v));
        t.set_doubled(v, true);
        assert_eq!(t.route(&v), Some((e, true)));
        t.set_doubled(v, false);
        assert_eq!(t.route(&v), Some((e, false)));
        t.set_doubled(v, true);
        t.set_send(v, None);
        assert_eq!(t.send_to(&v), None);
        t.set_send(v, Some(e));
        assert_eq!(t.route(&v), Some((e, false)), "a new switch is not doubled");
        t.set_send(v, None);
        assert_eq!(
            t.virtual_for(&e),
            Some(v),
            "late direct packets are still V's"
        );
        t.forget(&v);
        assert_eq!(t.virtual_for(&e), None);
    }

    #[test]
    fn learned_endpoints_are_bounded_per_virtual_address() {
        let t = DirectTable::default();
        let v = a("240.0.0.1:1");
        for port in 1..=MAX_LEARNED as u16 {
            assert!(t.learn(SocketAddr::from(([10, 0, 0, 2], port)), v));
        }
        assert!(!t.learn(a("10.0.0.3:1"), v));
        assert!(
            t.learn(a("10.0.0.3:1"), a("240.0.0.2:1")),
            "another V has room"
        );
    }
}
