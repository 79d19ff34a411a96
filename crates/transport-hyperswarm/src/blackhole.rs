//! Fault injection for tests and benchmarks (set only through the `testkit` feature's
//! `HyperswarmTransport::blackhole_udp`): UDP addresses the data socket treats as dark.
//! Nothing is sent to them (a send "succeeds" and the packet is lost, as on a blackholed
//! network path) and whatever arrives from them is dropped before quinn or the probe
//! handler sees it, so a direct path can be forced dark without root or iptables. The relay
//! path is untouched. Empty in every normal build: the data socket's cost is one atomic
//! load per packet.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};

/// Most dark addresses at once (a test knob, but bounded all the same).
pub(crate) const MAX_DARK: usize = 64;

/// The dark UDP addresses.
#[derive(Debug, Default)]
pub(crate) struct Blackhole {
    dark: RwLock<HashSet<SocketAddr>>,
    /// Whether any address is dark (the fast path when none is).
    any: AtomicBool,
}

impl Blackhole {
    /// Whether packets to and from `addr` are dropped.
    pub(crate) fn is_dark(&self, addr: &SocketAddr) -> bool {
        self.any.load(Ordering::Relaxed)
            && self
                .dark
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains(addr)
    }

    /// Makes `addr` dark (`true`) or lit again (`false`); `false` when [`MAX_DARK`]
    /// addresses are dark already.
    #[cfg_attr(not(feature = "testkit"), allow(dead_code))]
    pub(crate) fn set(&self, addr: SocketAddr, dark: bool) -> bool {
        let mut set = self.dark.write().unwrap_or_else(|e| e.into_inner());
        let ok = if dark {
            set.len() < MAX_DARK && set.insert(addr) || set.contains(&addr)
        } else {
            set.remove(&addr);
            true
        };
        self.any.store(!set.is_empty(), Ordering::Relaxed);
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dark_addresses_are_bounded_and_can_be_lit_again() {
        let b = Blackhole::default();
        let a: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        assert!(!b.is_dark(&a));
        assert!(b.set(a, true));
        assert!(b.set(a, true), "twice is fine");
        assert!(b.is_dark(&a));
        assert!(!b.is_dark(&"127.0.0.1:4001".parse().unwrap()));
        for port in 1..MAX_DARK as u16 {
            assert!(b.set(SocketAddr::from(([10, 0, 0, 1], port)), true));
        }
        assert!(!b.set("10.0.0.2:1".parse().unwrap(), true), "full");
        assert!(b.set(a, false));
        assert!(!b.is_dark(&a));
        for port in 1..MAX_DARK as u16 {
            b.set(SocketAddr::from(([10, 0, 0, 1], port)), false);
        }
        assert!(!b.any.load(Ordering::Relaxed));
    }
}
