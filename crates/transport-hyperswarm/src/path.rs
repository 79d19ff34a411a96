//! Virtual addresses: each relay route the node uses gets a stable address that quinn sees as
//! that peer's address, so the data socket can tell relayed packets from direct ones by
//! destination alone, and a later change of the route behind an address is invisible to
//! quinn. Addresses come from `240.0.0.0/8` (IPv4 "reserved for future use", never routed
//! and never assigned): the data socket, quinn's endpoint and the DHT are IPv4, and quinn
//! refuses remote addresses of the other family, so IPv6 ULA addresses (as iroh uses on its
//! IPv6 sockets) would mean translating every direct packet's address. A virtual address is
//! never sent to on the wire: the data socket routes it to the relay or drops it.

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::relay_path::RelayRoute;

/// The first octet of every virtual address.
const VIRTUAL_OCTET: u8 = 240;

/// The port of every virtual address (meaningless; quinn needs one).
const VIRTUAL_PORT: u16 = 1;

/// Most routes with an address at once: beyond, datagrams from new routes are dropped and
/// their members not dialled, so a hostile relay cannot grow the table without bound.
pub(crate) const MAX_ROUTES: usize = 4096;

/// How many of the last relay sockets gone are remembered, so that their late datagrams
/// (read from the link's queue after the socket's loss was handled) give their routes no
/// address again. A socket's datagrams arrive before the next few sockets are up.
const GONE_LINKS: usize = 16;

/// Whether `addr` is a virtual address (never a real one).
pub(crate) fn is_virtual(addr: &SocketAddr) -> bool {
    matches!(addr, SocketAddr::V4(v4) if v4.ip().octets()[0] == VIRTUAL_OCTET)
}

#[derive(Debug, Default)]
struct Routes {
    by_addr: HashMap<SocketAddr, RelayRoute>,
    by_route: HashMap<RelayRoute, SocketAddr>,
    /// The next address number to try (24 bits).
    next: u32,
    /// The last relay sockets gone (at most [`GONE_LINKS`]).
    gone: VecDeque<u64>,
}

/// Relay routes and their virtual addresses, both ways.
#[derive(Debug, Default)]
pub(crate) struct RouteTable {
    routes: RwLock<Routes>,
}

impl RouteTable {
    fn read(&self) -> RwLockReadGuard<'_, Routes> {
        self.routes.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Routes> {
        self.routes.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The route behind virtual address `addr`.
    pub(crate) fn route(&self, addr: &SocketAddr) -> Option<RelayRoute> {
        self.read().by_addr.get(addr).copied()
    }

    /// The address of `route`, given one now if it has none (`None`: the table is full, or
    /// the route's relay socket is gone: a datagram that was still queued from it must not
    /// bring back a route [`remove_link`](Self::remove_link) forgot, which nothing would
    /// ever remove again).
    pub(crate) fn addr_for(&self, route: &RelayRoute) -> Option<SocketAddr> {
        if let Some(addr) = self.read().by_route.get(route) {
            return Some(*addr);
        }
        let mut r = self.write();
        if let Some(addr) = r.by_route.get(route) {
            return Some(*addr);
        }
        if r.by_route.len() >= MAX_ROUTES || r.gone.contains(&route.link) {
            return None;
        }
        // Numbers go round 2^24 before one is reused, and never while it is in use.
        let addr = loop {
            r.next = (r.next + 1) & 0x00ff_ffff;
            let [_, a, b, c] = r.next.to_be_bytes();
            let addr = SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::new(VIRTUAL_OCTET, a, b, c),
                VIRTUAL_PORT,
            ));
            if !r.by_addr.contains_key(&addr) {
                break addr;
            }
        };
        r.by_addr.insert(addr, *route);
        r.by_route.insert(*route, addr);
        Some(addr)
    }

    /// Forgets `route`; its address, if it had one.
    pub(crate) fn remove(&self, route: &RelayRoute) -> Option<SocketAddr> {
        let mut r = self.write();
        let addr = r.by_route.remove(route)?;
        r.by_addr.remove(&addr);
        Some(addr)
    }

    /// Forgets every route through relay socket `link`, which is gone (no route through it
    /// gets an address again); their addresses.
    pub(crate) fn remove_link(&self, link: u64) -> Vec<SocketAddr> {
        let mut r = self.write();
        if !r.gone.contains(&link) {
            if r.gone.len() >= GONE_LINKS {
                r.gone.pop_front();
            }
            r.gone.push_back(link);
        }
        let gone: Vec<RelayRoute> = r
            .by_route
            .keys()
            .filter(|k| k.link == link)
            .copied()
            .collect();
        gone.iter()
            .filter_map(|route| {
                let addr = r.by_route.remove(route)?;
                r.by_addr.remove(&addr);
                Some(addr)
            })
            .collect()
    }

    /// How many routes have an address (tests).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.read().by_route.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(link: u64, conn: u64) -> RelayRoute {
        RelayRoute {
            link,
            room: [3; 32],
            conn,
        }
    }

    #[test]
    fn each_route_keeps_one_virtual_address_until_it_goes() {
        let t = RouteTable::default();
        let a = t.addr_for(&route(1, 10)).unwrap();
        let b = t.addr_for(&route(1, 11)).unwrap();
        assert_ne!(a, b);
        assert_eq!(t.addr_for(&route(1, 10)), Some(a), "stable");
        assert!(is_virtual(&a) && is_virtual(&b));
        assert_eq!(t.route(&a), Some(route(1, 10)));
        // The same connection id on another socket is another route.
        let c = t.addr_for(&route(2, 10)).unwrap();
        assert_ne!(a, c);
        assert_eq!(t.remove(&route(1, 10)), Some(a));
        assert_eq!(t.route(&a), None);
        assert_eq!(t.remove(&route(1, 10)), None);
        // A new route never gets an address that was just used.
        assert_ne!(t.addr_for(&route(1, 10)), Some(a));
        let mut gone = t.remove_link(1);
        gone.sort();
        assert_eq!(gone.len(), 2);
        assert_eq!(t.route(&c), Some(route(2, 10)));
        assert_eq!(t.len(), 1);
    }

    /// Seen after a relay restart: a datagram still queued from the lost socket, read after
    /// its loss was handled, gave its route an address again, and that route was never
    /// removed (its socket's removal had passed): one leaked entry per peer and reconnect,
    /// until the table was full and no new member got an address.
    #[test]
    fn a_route_through_a_socket_gone_gets_no_address_again() {
        let t = RouteTable::default();
        let old = t.addr_for(&route(1, 10)).unwrap();
        assert_eq!(t.remove_link(1), vec![old]);
        assert_eq!(t.addr_for(&route(1, 10)), None, "a late datagram");
        assert_eq!(t.addr_for(&route(1, 11)), None);
        assert_eq!(t.len(), 0);
        // The new socket's routes (the same connection ids, a restarted relay hands them
        // out again) get new addresses.
        let new = t.addr_for(&route(2, 10)).unwrap();
        assert_ne!(new, old);
        // Only the last sockets gone are remembered.
        for link in 2..2 + GONE_LINKS as u64 {
            t.remove_link(link);
        }
        assert_eq!(t.addr_for(&route(2, 10)), None);
        assert!(t.addr_for(&route(1, 10)).is_some(), "forgotten long ago");
        assert!(t.addr_for(&route(2 + GONE_LINKS as u64, 1)).is_some());
    }

    #[test]
    fn real_addresses_are_not_virtual() {
        for real in [
            "127.0.0.1:1",
            "10.0.0.1:5",
            "239.255.255.255:1",
            "[fd00::1]:1",
        ] {
            assert!(!is_virtual(&real.parse().unwrap()), "{real}");
        }
        assert!(is_virtual(&"240.0.0.1:1".parse().unwrap()));
    }

    #[test]
    fn the_table_is_bounded() {
        let t = RouteTable::default();
        for conn in 0..MAX_ROUTES as u64 {
            assert!(t.addr_for(&route(1, conn)).is_some());
        }
        assert_eq!(t.addr_for(&route(1, u64::MAX)), None);
        assert!(
            t.addr_for(&route(1, 0)).is_some(),
            "known routes still resolve"
        );
        t.remove(&route(1, 0));
        assert!(t.addr_for(&route(1, u64::MAX)).is_some());
    }
}
