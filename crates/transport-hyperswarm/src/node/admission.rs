//! Admission of incoming connection attempts: who may start a handshake now, decided from
//! the first QUIC Initial before any crypto. Pure: every call takes `now`.
//!
//! An attempt is *validated* when quinn saw it carry a Retry token: the sender proved it
//! receives packets at its address, so the address is not spoofed. The rules:
//!
//! - At most [`MAX_HALF_OPEN`] handshakes in progress; [`KNOWN_RESERVE`] of them only for
//!   known peers (a validated address where this node verified a peer before, or that
//!   completed a handshake here lately), so a flood of strangers cannot stop known peers'
//!   redials.
//! - Unvalidated attempts take at most [`MAX_UNVALIDATED`] of those, at a per-IP rate; beyond
//!   that (load, or one IP trying too often) they get a QUIC Retry, which costs this node no
//!   state: silent or spoofed Initials cannot hold the slots, and a real peer pays one round
//!   trip. Spoofing someone's address only makes that address retry, never refused.
//! - Validated strangers: at most [`MAX_HALF_OPEN_PER_IP`] in progress per IP, at a per-IP rate;
//!   known peers at a per-address rate. Beyond: refused (a QUIC `CONNECTION_REFUSED`, cheap).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use super::limiter::{Limiter, Rate};

/// Most incoming handshakes in progress at once (QUIC and Noise, up to the handshake
/// timeout each).
pub(crate) const MAX_HALF_OPEN: usize = 64;

/// Of [`MAX_HALF_OPEN`], the slots only known peers may use.
pub(crate) const KNOWN_RESERVE: usize = 16;

/// Most handshakes in progress from unvalidated addresses; beyond, a QUIC Retry.
pub(crate) const MAX_UNVALIDATED: usize = 16;

/// Most handshakes in progress from one IP (validated, not a known peer): a host or a NAT.
pub(crate) const MAX_HALF_OPEN_PER_IP: usize = 8;

/// Rate of unvalidated attempts per IP admitted without a Retry.
pub(crate) const UNVALIDATED_RATE: Rate = Rate {
    burst: 32,
    per_second: 16,
};

/// Rate of validated attempts per IP from strangers: a few peers behind one NAT, each
/// dialling a few topics, stay well within it.
pub(crate) const STRANGER_RATE: Rate = Rate {
    burst: 32,
    per_second: 8,
};

/// Rate of attempts per known peer address (validated).
pub(crate) const KNOWN_RATE: Rate = Rate {
    burst: 16,
    per_second: 4,
};

/// Most keys each rate table holds.
pub(crate) const MAX_RATE_KEYS: usize = 4096;

/// How long an address that completed a handshake here counts as a known peer.
pub(crate) const KNOWN_TTL: Duration = Duration::from_secs(600);

/// Most addresses remembered as known peers from completed handshakes.
pub(crate) const MAX_KNOWN: usize = 1024;

/// The key of an IP for per-IP bounds: the address, or its /64 for IPv6 (one host's share).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct IpKey(IpAddr);

impl IpKey {
    pub(crate) fn of(addr: SocketAddr) -> Self {
        match addr.ip() {
            IpAddr::V4(v4) => IpKey(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpKey(IpAddr::V4(v4)),
                None => {
                    let bits = u128::from(v6) & !((1u128 << 64) - 1);
                    IpKey(IpAddr::V6(Ipv6Addr::from(bits)))
                }
            },
        }
    }
}

/// An incoming connection attempt as the first Initial shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Attempt {
    /// Its source address.
    pub(crate) addr: SocketAddr,
    /// Whether it carried a valid Retry token (the address is not spoofed).
    pub(crate) validated: bool,
    /// Whether this node verified a peer at this address before (the address book).
    pub(crate) verified: bool,
}

/// Why an attempt was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The handshakes in progress fill the share this attempt may use.
    Busy,
    /// Its IP has [`MAX_HALF_OPEN_PER_IP`] handshakes in progress.
    PerIp,
    /// Its IP (or known address) tries too often.
    RateLimited,
}

/// What to do with an attempt.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Start the handshake; give the ticket back with [`Admission::finish`].
    Accept(Ticket),
    /// Answer with a QUIC Retry (the client must prove its address).
    Retry,
    /// Refuse it.
    Refuse(Refusal),
}

/// One admitted handshake's claim on the bounds.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "give the ticket back with Admission::finish"]
pub(crate) struct Ticket {
    ip: IpKey,
    class: Class,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    Unvalidated,
    Stranger,
    Known,
}

/// The admission state: handshakes in progress and the rate tables.
#[derive(Debug)]
pub(crate) struct Admission {
    half_open: usize,
    unvalidated: usize,
    /// Validated strangers' handshakes in progress per IP (no entry at zero).
    per_ip: HashMap<IpKey, usize>,
    unvalidated_rate: Limiter<IpKey>,
    stranger_rate: Limiter<IpKey>,
    known_rate: Limiter<SocketAddr>,
    /// Addresses that completed a handshake here, and when.
    known: HashMap<SocketAddr, Instant>,
}

impl Default for Admission {
    fn default() -> Self {
        Self {
            half_open: 0,
            unvalidated: 0,
            per_ip: HashMap::new(),
            unvalidated_rate: Limiter::new(UNVALIDATED_RATE, MAX_RATE_KEYS),
            stranger_rate: Limiter::new(STRANGER_RATE, MAX_RATE_KEYS),
            known_rate: Limiter::new(KNOWN_RATE, MAX_RATE_KEYS),
            known: HashMap::new(),
        }
    }
}

impl Admission {
    /// Decides about `a`.
    pub(crate) fn offer(&mut self, now: Instant, a: Attempt) -> Verdict {
        let ip = IpKey::of(a.addr);
        let stranger_room = self.half_open < MAX_HALF_OPEN - KNOWN_RESERVE;
        if !a.validated {
            if self.unvalidated >= MAX_UNVALIDATED
                || !stranger_room
                || !self.unvalidated_rate.try_take(now, ip)
            {
                return Verdict::Retry;
            }
            return self.admit(ip, Class::Unvalidated);
        }
        if a.verified || self.is_known(now, a.addr) {
            if self.half_open >= MAX_HALF_OPEN {
                return Verdict::Refuse(Refusal::Busy);
            }
            if !self.known_rate.try_take(now, a.addr) {
                return Verdict::Refuse(Refusal::RateLimited);
            }
            return self.admit(ip, Class::Known);
        }
        if !stranger_room {
            return Verdict::Refuse(Refusal::Busy);
        }
        if self.per_ip.get(&ip).copied().unwrap_or(0) >= MAX_HALF_OPEN_PER_IP {
            return Verdict::Refuse(Refusal::PerIp);
        }
        if !self.stranger_rate.try_take(now, ip) {
            return Verdict::Refuse(Refusal::RateLimited);
        }
        self.admit(ip, Class::Stranger)
    }

    fn admit(&mut self, ip: IpKey, class: Class) -> Verdict {
        self.half_open += 1;
        match class {
            Class::Unvalidated => self.unvalidated += 1,
            Class::Stranger => *self.per_ip.entry(ip).or_insert(0) += 1,
            Class::Known => {}
        }
        Verdict::Accept(Ticket { ip, class })
    }

    /// The handshake of `ticket` ended (however it ended).
    pub(crate) fn finish(&mut self, ticket: Ticket) {
        self.half_open = self.half_open.saturating_sub(1);
        match ticket.class {
            Class::Unvalidated => self.unvalidated = self.unvalidated.saturating_sub(1),
            Class::Stranger => {
                if let Some(n) = self.per_ip.get_mut(&ticket.ip) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        self.per_ip.remove(&ticket.ip);
                    }
                }
            }
            Class::Known => {}
        }
    }

    /// A peer at `addr` completed a handshake: it counts as known for [`KNOWN_TTL`].
    pub(crate) fn completed(&mut self, now: Instant, addr: SocketAddr) {
        if self.known.len() >= MAX_KNOWN && !self.known.contains_key(&addr) {
            self.known
                .retain(|_, at| now.saturating_duration_since(*at) < KNOWN_TTL);
            if self.known.len() >= MAX_KNOWN
                && let Some(oldest) = self
                    .known
                    .iter()
                    .min_by_key(|(_, at)| **at)
                    .map(|(a, _)| *a)
            {
                self.known.remove(&oldest);
            }
        }
        self.known.insert(addr, now);
    }

    fn is_known(&self, now: Instant, addr: SocketAddr) -> bool {
        self.known
            .get(&addr)
            .is_some_and(|at| now.saturating_duration_since(*at) < KNOWN_TTL)
    }

    /// Handshakes in progress.
    #[cfg(test)]
    pub(crate) fn half_open(&self) -> usize {
        self.half_open
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ip: [u8; 4], port: u16) -> SocketAddr {
        SocketAddr::from((ip, port))
    }

    fn attempt(addr: SocketAddr, validated: bool) -> Attempt {
        Attempt {
            addr,
            validated,
            verified: false,
        }
    }

    fn accepted(v: Verdict) -> Ticket {
        match v {
            Verdict::Accept(t) => t,
            other => panic!("expected Accept, got {other:?}"),
        }
    }

    /// Silent Initials from many ports: a bounded number is admitted, the rest get a Retry
    /// (no state), and a real peer that answers the Retry still gets in.
    #[test]
    fn a_silent_flood_is_retried_and_a_validated_peer_gets_in() {
        let now = Instant::now();
        let mut adm = Admission::default();
        let mut held = Vec::new();
        let mut retried = 0;
        for port in 1..=1000u16 {
            match adm.offer(now, attempt(at([127, 0, 0, 1], port), false)) {
                Verdict::Accept(t) => held.push(t),
                Verdict::Retry => retried += 1,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(held.len(), MAX_UNVALIDATED);
        assert_eq!(retried, 1000 - MAX_UNVALIDATED);
        // A real peer on the same IP answers the Retry: validated, admitted.
        let real = adm.offer(now, attempt(at([127, 0, 0, 1], 5000), true));
        let real = accepted(real);
        assert_eq!(adm.half_open(), MAX_UNVALIDATED + 1);
        for t in held {
            adm.finish(t);
        }
        adm.finish(real);
        assert_eq!(adm.half_open(), 0);
    }

    /// Validated strangers: per-IP and total bounds; known peers keep their reserve.
    #[test]
    fn strangers_are_bounded_per_ip_and_known_peers_keep_their_reserve() {
        let now = Instant::now();
        let mut adm = Admission::default();
        let mut held = Vec::new();
        // One IP: MAX_HALF_OPEN_PER_IP, then refused.
        for port in 0..MAX_HALF_OPEN_PER_IP as u16 {
            held.push(accepted(
                adm.offer(now, attempt(at([10, 0, 0, 1], port), true)),
            ));
        }
        assert_eq!(
            adm.offer(now, attempt(at([10, 0, 0, 1], 999), true)),
            Verdict::Refuse(Refusal::PerIp)
        );
        // Many IPs fill the strangers' share.
        let mut ip = 2u8;
        while adm.half_open() < MAX_HALF_OPEN - KNOWN_RESERVE {
            for port in 0..MAX_HALF_OPEN_PER_IP as u16 {
                if adm.half_open() < MAX_HALF_OPEN - KNOWN_RESERVE {
                    held.push(accepted(
                        adm.offer(now, attempt(at([10, 0, 0, ip], port), true)),
                    ));
                }
            }
            ip += 1;
        }
        assert_eq!(
            adm.offer(now, attempt(at([10, 0, 1, 1], 1), true)),
            Verdict::Refuse(Refusal::Busy)
        );
        assert_eq!(
            adm.offer(now, attempt(at([10, 0, 1, 1], 1), false)),
            Verdict::Retry,
            "unvalidated: retried, not refused"
        );
        // A verified peer (address book) and one that completed a handshake lately still
        // get in, up to the total.
        let verified = Attempt {
            addr: at([10, 0, 0, 1], 4000),
            validated: true,
            verified: true,
        };
        held.push(accepted(adm.offer(now, verified)));
        adm.completed(now, at([192, 168, 1, 1], 7));
        held.push(accepted(
            adm.offer(now, attempt(at([192, 168, 1, 1], 7), true)),
        ));
        // ...but not unvalidated (spoofable) and not after the TTL.
        assert_eq!(
            adm.offer(
                now,
                Attempt {
                    validated: false,
                    ..verified
                }
            ),
            Verdict::Retry
        );
        let stale = now + KNOWN_TTL;
        assert_eq!(
            adm.offer(stale, attempt(at([192, 168, 1, 1], 7), true)),
            Verdict::Refuse(Refusal::Busy)
        );
        while adm.half_open() < MAX_HALF_OPEN {
            held.push(accepted(adm.offer(now, verified)));
        }
        assert_eq!(adm.offer(now, verified), Verdict::Refuse(Refusal::Busy));
        for t in held {
            adm.finish(t);
        }
        assert_eq!(adm.half_open(), 0);
        assert!(adm.per_ip.is_empty(), "per-IP counts return to zero");
    }

    /// Thousands of attempts from one IP: the rate, not thousands of handshakes.
    #[test]
    fn one_ip_gets_its_rate() {
        let t0 = Instant::now();
        let mut adm = Admission::default();
        let mut admitted = 0;
        // 5,000 validated attempts over 5 s, each handshake ending at once.
        for i in 0..5000u64 {
            let now = t0 + Duration::from_millis(i);
            if let Verdict::Accept(t) = adm.offer(now, attempt(at([10, 0, 0, 9], i as u16), true)) {
                admitted += 1;
                adm.finish(t);
            }
        }
        let most = STRANGER_RATE.burst as usize + 5 * STRANGER_RATE.per_second as usize;
        assert!(
            admitted <= most && admitted >= most - 1,
            "{admitted} admitted"
        );
        // Another IP is unaffected.
        let other = adm.offer(t0, attempt(at([10, 0, 0, 10], 1), true));
        adm.finish(accepted(other));
        // A known address has its own rate.
        let known = at([10, 0, 0, 9], 1);
        adm.completed(t0, known);
        let n = (0..100)
            .filter(|_| match adm.offer(t0, attempt(known, true)) {
                Verdict::Accept(t) => {
                    adm.finish(t);
                    true
                }
                _ => false,
            })
            .count();
        assert_eq!(n, KNOWN_RATE.burst as usize);
    }

    #[test]
    fn ipv6_is_bounded_per_64() {
        let a: SocketAddr = "[2001:db8::1]:1".parse().unwrap();
        let b: SocketAddr = "[2001:db8::ffff:2]:2".parse().unwrap();
        let c: SocketAddr = "[2001:db8:0:1::1]:1".parse().unwrap();
        assert_eq!(IpKey::of(a), IpKey::of(b));
        assert_ne!(IpKey::of(a), IpKey::of(c));
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:1".parse().unwrap();
        assert_eq!(IpKey::of(mapped), IpKey::of(at([10, 0, 0, 1], 9)));
    }

    #[test]
    fn the_known_table_is_bounded() {
        let now = Instant::now();
        let mut adm = Admission::default();
        for i in 0..(MAX_KNOWN as u32 * 3) {
            let [_, b, c, d] = i.to_be_bytes();
            adm.completed(
                now + Duration::from_millis(u64::from(i)),
                at([10, b, c, d], 1),
            );
        }
        assert_eq!(adm.known.len(), MAX_KNOWN);
    }
}
