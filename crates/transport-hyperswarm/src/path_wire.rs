//! The wire formats of path upgrades (Auto mode): the authenticated UDP probes that prove a
//! direct endpoint of a peer met through a relay, and the candidate list the peers send each
//! other over their QUIC connection. Pure.
//!
//! Both sides of a QUIC connection derive the same [`PathKeys`] from its TLS exporter
//! (`export_keying_material`, label [`EXPORT_LABEL`]): a path id (which connection a probe
//! is for) and a MAC key nobody else has (the relay included: it sees only ciphertext).
//! A probe is `PROBE_MAGIC ‖ kind (1 ping, 2 pong) ‖ sender side (0 client, 1 server) ‖
//! path id (8) ‖ nonce (8, big-endian) ‖ BLAKE2s-MAC-128(key, kind ‖ side ‖ id ‖ nonce)`
//! (56 bytes). The side byte stops a ping from being reflected back to its sender as the
//! peer's. It starts with 0x00 (QUIC fixed bit clear), so the data socket never hands it
//! to quinn.
//!
//! Candidates travel as one QUIC datagram: `CANDIDATES_MAGIC ‖ count ‖ count × (IPv4 (4) ‖
//! port (2, big-endian))`, at most [`MAX_CANDIDATES`] of them; anything else is ignored.
//!
//! A connection made directly shares relay routes instead, also as one QUIC datagram:
//! `ROUTES_MAGIC ‖ flags ‖ ours ‖ yours`, `flags` bit 0: `ours` is there, bit 1: `yours`
//! is, bit 2: the sender wants an answer; each [`RouteId`] is `relay (8) ‖ connection id (8,
//! big-endian)`, zeros when absent (41 bytes; anything else is refused). The magic carries
//! the version: a peer that does not know it ignores the datagram, as it ignores any
//! datagram it cannot read.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use blake2::Blake2sMac;
use blake2::digest::consts::U16;
use blake2::digest::{KeyInit, Mac};

use crate::node::path_state::MAX_CANDIDATES;

/// The first bytes of every path probe (QUIC fixed bit clear).
pub(crate) const PROBE_MAGIC: &[u8] = b"\x00pluresdb-sync/path/v1";

/// The TLS exporter label of [`PathKeys`].
pub(crate) const EXPORT_LABEL: &[u8] = b"pluresdb-sync/v1/path-probe";

/// The first bytes of a candidates datagram.
const CANDIDATES_MAGIC: &[u8] = b"PSC1";

/// The first bytes of a routes datagram (version 1).
const ROUTES_MAGIC: &[u8] = b"PSR1";

/// Length of every routes datagram.
const ROUTES_LEN: usize = ROUTES_MAGIC.len() + 1 + 2 * 16;

const TAG_LEN: usize = 16;

/// Length of every probe.
pub(crate) const PROBE_LEN: usize = PROBE_MAGIC.len() + 1 + 1 + 8 + 8 + TAG_LEN;

/// A probe's kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ProbeKind {
    /// "Are you there?"
    Ping,
    /// "Yes", echoing the ping's nonce.
    Pong,
}

impl ProbeKind {
    fn byte(self) -> u8 {
        match self {
            ProbeKind::Ping => 1,
            ProbeKind::Pong => 2,
        }
    }
}

/// A probe as read from the wire, its tag not yet checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Probe {
    /// Ping or pong.
    pub(crate) kind: ProbeKind,
    /// Whether the sender is the QUIC server.
    pub(crate) from_server: bool,
    /// Which connection it is for.
    pub(crate) id: [u8; 8],
    /// The nonce.
    pub(crate) nonce: u64,
    tag: [u8; TAG_LEN],
}

/// A connection's path id and probe key, derived by both sides from its TLS exporter.
#[derive(Clone)]
pub(crate) struct PathKeys {
    /// Which connection a probe is for (not secret).
    pub(crate) id: [u8; 8],
    key: [u8; 32],
}

impl std::fmt::Debug for PathKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PathKeys")
            .field("id", &hex::encode(self.id))
            .finish_non_exhaustive()
    }
}

impl PathKeys {
    /// The keys from 40 bytes of exported keying material.
    pub(crate) fn from_material(material: &[u8; 40]) -> Self {
        let mut id = [0; 8];
        let mut key = [0; 32];
        id.copy_from_slice(&material[..8]);
        key.copy_from_slice(&material[8..]);
        Self { id, key }
    }

    fn tag(&self, kind: ProbeKind, from_server: bool, nonce: u64) -> [u8; TAG_LEN] {
        let Ok(mut mac) = <Blake2sMac<U16> as KeyInit>::new_from_slice(&self.key) else {
            // A 32-byte key is always accepted by BLAKE2s.
            return [0; TAG_LEN];
        };
        mac.update(&[kind.byte(), u8::from(from_server)]);
        mac.update(&self.id);
        mac.update(&nonce.to_be_bytes());
        mac.finalize().into_bytes().into()
    }

    /// A probe sent by the side `from_server`.
    pub(crate) fn encode(&self, kind: ProbeKind, from_server: bool, nonce: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(PROBE_LEN);
        out.extend_from_slice(PROBE_MAGIC);
        out.push(kind.byte());
        out.push(u8::from(from_server));
        out.extend_from_slice(&self.id);
        out.extend_from_slice(&nonce.to_be_bytes());
        out.extend_from_slice(&self.tag(kind, from_server, nonce));
        out
    }

    /// Whether `probe` carries a valid tag under these keys.
    pub(crate) fn verify(&self, probe: &Probe) -> bool {
        let want = self.tag(probe.kind, probe.from_server, probe.nonce);
        // Constant time, though the tag is single-use per nonce anyway.
        want.iter()
            .zip(probe.tag.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
            && probe.id == self.id
    }
}

/// Whether `bytes` starts like a path probe.
pub(crate) fn is_probe(bytes: &[u8]) -> bool {
    bytes.starts_with(PROBE_MAGIC)
}

/// Reads a probe; `None` for anything malformed.
pub(crate) fn decode_probe(bytes: &[u8]) -> Option<Probe> {
    if bytes.len() != PROBE_LEN || !is_probe(bytes) {
        return None;
    }
    let rest = &bytes[PROBE_MAGIC.len()..];
    let kind = match rest[0] {
        1 => ProbeKind::Ping,
        2 => ProbeKind::Pong,
        _ => return None,
    };
    let from_server = match rest[1] {
        0 => false,
        1 => true,
        _ => return None,
    };
    let id: [u8; 8] = rest[2..10].try_into().ok()?;
    let nonce = u64::from_be_bytes(rest[10..18].try_into().ok()?);
    let tag: [u8; TAG_LEN] = rest[18..].try_into().ok()?;
    Some(Probe {
        kind,
        from_server,
        id,
        nonce,
        tag,
    })
}

/// A candidates datagram listing (at most [`MAX_CANDIDATES`] of) `addrs`' IPv4 addresses.
pub(crate) fn encode_candidates(addrs: &[SocketAddr]) -> Vec<u8> {
    let v4: Vec<SocketAddrV4> = addrs
        .iter()
        .filter_map(|a| match a {
            SocketAddr::V4(v4) => Some(*v4),
            SocketAddr::V6(_) => None,
        })
        .take(MAX_CANDIDATES)
        .collect();
    let mut out = Vec::with_capacity(CANDIDATES_MAGIC.len() + 1 + 6 * v4.len());
    out.extend_from_slice(CANDIDATES_MAGIC);
    out.push(v4.len() as u8);
    for a in v4 {
        out.extend_from_slice(&a.ip().octets());
        out.extend_from_slice(&a.port().to_be_bytes());
    }
    out
}

/// Reads a candidates datagram; `None` for anything malformed or too long.
pub(crate) fn decode_candidates(bytes: &[u8]) -> Option<Vec<SocketAddr>> {
    let rest = bytes.strip_prefix(CANDIDATES_MAGIC)?;
    let (&count, list) = rest.split_first()?;
    let count = usize::from(count);
    if count > MAX_CANDIDATES || list.len() != count * 6 {
        return None;
    }
    Some(
        list.chunks_exact(6)
            .map(|c| {
                let ip = Ipv4Addr::new(c[0], c[1], c[2], c[3]);
                SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be_bytes([c[4], c[5]])))
            })
            .collect(),
    )
}

/// Where a peer is in a relay room: which relay (the first 8 bytes of the BLAKE2s-256 hash
/// of its URL, so both sides can compare without sending the URL) and the peer's relay
/// connection id there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct RouteId {
    /// The relay, hashed.
    pub(crate) relay: [u8; 8],
    /// The relay connection id.
    pub(crate) conn: u64,
}

impl RouteId {
    /// The route of relay connection `conn` on the relay at `url`.
    pub(crate) fn new(url: &str, conn: u64) -> Self {
        use blake2::{Blake2s256, Digest};
        let hash = Blake2s256::digest(url.as_bytes());
        let mut relay = [0; 8];
        relay.copy_from_slice(&hash[..8]);
        Self { relay, conn }
    }

    fn put(id: Option<&RouteId>, out: &mut Vec<u8>) {
        match id {
            Some(id) => {
                out.extend_from_slice(&id.relay);
                out.extend_from_slice(&id.conn.to_be_bytes());
            }
            None => out.extend_from_slice(&[0; 16]),
        }
    }

    fn get(bytes: &[u8]) -> Option<RouteId> {
        let relay: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
        let conn = u64::from_be_bytes(bytes.get(8..16)?.try_into().ok()?);
        Some(RouteId { relay, conn })
    }
}

/// A routes datagram: the sender's own relay route, the one it knows of the receiver, and
/// whether it wants an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Routes {
    /// The sender's route (`None`: it has no relay room joined).
    pub(crate) ours: Option<RouteId>,
    /// The receiver's route as the sender last heard it.
    pub(crate) yours: Option<RouteId>,
    /// The sender wants an answer (it has not heard that its route arrived).
    pub(crate) ask: bool,
}

/// A routes datagram.
pub(crate) fn encode_routes(r: &Routes) -> Vec<u8> {
    let mut out = Vec::with_capacity(ROUTES_LEN);
    out.extend_from_slice(ROUTES_MAGIC);
    let flags =
        u8::from(r.ours.is_some()) | (u8::from(r.yours.is_some()) << 1) | (u8::from(r.ask) << 2);
    out.push(flags);
    RouteId::put(r.ours.as_ref(), &mut out);
    RouteId::put(r.yours.as_ref(), &mut out);
    out
}

/// Reads a routes datagram; `None` for anything malformed.
pub(crate) fn decode_routes(bytes: &[u8]) -> Option<Routes> {
    if bytes.len() != ROUTES_LEN {
        return None;
    }
    let rest = bytes.strip_prefix(ROUTES_MAGIC)?;
    let flags = rest[0];
    if flags & !0b111 != 0 {
        return None;
    }
    // An absent route is all zeros: one encoding per message.
    let field = |bytes: &[u8], present: bool| match present {
        true => RouteId::get(bytes).map(Some),
        false => bytes.iter().all(|b| *b == 0).then_some(None),
    };
    Some(Routes {
        ours: field(&rest[1..17], flags & 1 != 0)?,
        yours: field(&rest[17..33], flags & 2 != 0)?,
        ask: flags & 4 != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(seed: u8) -> PathKeys {
        PathKeys::from_material(&[seed; 40])
    }

    #[test]
    fn probes_round_trip_and_verify_only_under_their_keys() {
        let k = keys(1);
        let bytes = k.encode(ProbeKind::Ping, true, 77);
        assert_eq!(bytes.len(), PROBE_LEN);
        assert!(is_probe(&bytes));
        assert_eq!(crate::socket::classify(&bytes), crate::socket::Kind::Path);
        let p = decode_probe(&bytes).unwrap();
        assert_eq!(
            (p.kind, p.from_server, p.nonce, p.id),
            (ProbeKind::Ping, true, 77, k.id)
        );
        assert!(k.verify(&p));
        assert!(!keys(2).verify(&p), "another connection's key");
        // Any flipped bit after the magic fails: kind, side, id, nonce or tag.
        for i in PROBE_MAGIC.len()..PROBE_LEN {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            assert!(decode_probe(&bad).is_none_or(|p| !k.verify(&p)), "byte {i}");
        }
        assert!(decode_probe(&bytes[..PROBE_LEN - 1]).is_none());
        assert!(decode_probe(b"").is_none());
    }

    #[test]
    fn candidates_round_trip_and_bad_lists_are_refused() {
        let list: Vec<SocketAddr> = vec![
            "10.0.0.1:4000".parse().unwrap(),
            "[::1]:5".parse().unwrap(),
            "203.0.113.9:65535".parse().unwrap(),
        ];
        let bytes = encode_candidates(&list);
        assert_eq!(
            decode_candidates(&bytes).unwrap(),
            vec![list[0], list[2]],
            "IPv6 is left out"
        );
        let many: Vec<SocketAddr> = (0..20)
            .map(|i| SocketAddr::from(([10, 0, 0, i], 1)))
            .collect();
        assert_eq!(
            decode_candidates(&encode_candidates(&many)).unwrap().len(),
            MAX_CANDIDATES
        );
        let mut long = bytes.clone();
        long.push(0);
        assert!(decode_candidates(&long).is_none());
        let mut lying = bytes.clone();
        lying[4] = 200;
        assert!(decode_candidates(&lying).is_none());
        assert!(decode_candidates(b"PSC").is_none());
        assert!(decode_candidates(b"nope").is_none());
    }

    #[test]
    fn routes_round_trip_and_bad_ones_are_refused() {
        let a = RouteId::new("wss://relay.example/relay", 7);
        assert_eq!(a, RouteId::new("wss://relay.example/relay", 7));
        assert_ne!(a.relay, RouteId::new("wss://other.example/relay", 7).relay);
        for r in [
            Routes {
                ours: Some(a),
                yours: None,
                ask: true,
            },
            Routes {
                ours: None,
                yours: Some(a),
                ask: false,
            },
            Routes {
                ours: Some(a),
                yours: Some(RouteId::new("x", u64::MAX)),
                ask: true,
            },
            Routes {
                ours: None,
                yours: None,
                ask: false,
            },
        ] {
            let bytes = encode_routes(&r);
            assert_eq!(bytes.len(), ROUTES_LEN);
            assert_eq!(decode_routes(&bytes), Some(r));
            assert!(decode_candidates(&bytes).is_none(), "not a candidates list");
        }
        let good = encode_routes(&Routes {
            ours: Some(a),
            yours: None,
            ask: false,
        });
        assert!(decode_routes(&good[..ROUTES_LEN - 1]).is_none());
        let mut unknown_flag = good.clone();
        unknown_flag[ROUTES_MAGIC.len()] |= 8;
        assert!(decode_routes(&unknown_flag).is_none());
        let mut absent_but_set = good.clone();
        absent_but_set[ROUTES_LEN - 1] = 1;
        assert!(
            decode_routes(&absent_but_set).is_none(),
            "an absent route is zeros"
        );
        let mut v2 = good.clone();
        v2[3] = b'2';
        assert!(decode_routes(&v2).is_none(), "another version is ignored");
        assert!(decode_routes(&encode_candidates(&[])).is_none());
    }
}
