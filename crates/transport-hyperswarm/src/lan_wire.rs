//! The LAN discovery packet format (`docs/lan-discovery.md`): a pure encoder and decoder and
//! the tags that name a topic without revealing it. Nothing here touches a socket.
//!
//! ```text
//! offset  size  field
//! 0       4     magic "PSLD"
//! 4       1     version (1)
//! 5       1     kind: 1 announce, 2 query
//! 6       16    nonce, fresh and random for every packet
//! announce:
//! 22      2     port: the sender's data socket (u16 BE, not 0)
//! 24      2     ttl: seconds the entry stays valid (u16 BE, not 0)
//! 26      1     n: number of tags (1..=64)
//! 27      16·n  tags
//! query:
//! 22      1     n: number of tags (1..=64)
//! 23      16·n  tags
//! ```
//!
//! A tag is `BLAKE2s-MAC-128(key = derive_from_topic(topic, LanTag), label ‖ nonce ‖ source
//! IPv4 ‖ (announce: port ‖ ttl))`: one per topic, bound to the packet's nonce and to the
//! address it is sent from, so it changes with every packet and a copy sent from elsewhere
//! does not verify.

use std::net::Ipv4Addr;

use blake2::Blake2sMac;
use blake2::digest::consts::U16;
use blake2::digest::{KeyInit, Mac};

/// The first bytes of every packet.
pub(crate) const MAGIC: [u8; 4] = *b"PSLD";

/// The version this code speaks; packets of other versions are ignored.
pub(crate) const VERSION: u8 = 1;

/// Length of the nonce.
pub(crate) const NONCE_LEN: usize = 16;

/// Length of a tag: 128 bits, so a forged tag is accepted with probability 2^-128.
pub(crate) const LAN_TAG_LEN: usize = 16;

/// Most tags in one packet; a node with more topics sends several packets.
pub(crate) const MAX_TAGS: usize = 64;

const HEADER_LEN: usize = 4 + 1 + 1 + NONCE_LEN;
const ANNOUNCE_FIXED: usize = HEADER_LEN + 2 + 2 + 1;
const QUERY_FIXED: usize = HEADER_LEN + 1;

/// The longest packet: an announce with [`MAX_TAGS`] tags (1051 bytes, well under any LAN
/// MTU, so never fragmented).
pub(crate) const MAX_PACKET_BYTES: usize = ANNOUNCE_FIXED + MAX_TAGS * LAN_TAG_LEN;

const KIND_ANNOUNCE: u8 = 1;
const KIND_QUERY: u8 = 2;

const ANNOUNCE_LABEL: &[u8] = b"pluresdb-sync/lan/v1/announce";
const QUERY_LABEL: &[u8] = b"pluresdb-sync/lan/v1/query";

/// A packet's nonce.
pub(crate) type Nonce = [u8; NONCE_LEN];

/// A topic's tag in one packet.
pub(crate) type LanTag = [u8; LAN_TAG_LEN];

/// A decoded packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Packet {
    /// "Peers of these topics can dial me at my source address and `port`".
    Announce {
        nonce: Nonce,
        port: u16,
        ttl_secs: u16,
        tags: Vec<LanTag>,
    },
    /// "Whoever is on these topics, announce yourselves".
    Query { nonce: Nonce, tags: Vec<LanTag> },
}

impl Packet {
    /// The packet's nonce.
    pub(crate) fn nonce(&self) -> &Nonce {
        match self {
            Packet::Announce { nonce, .. } | Packet::Query { nonce, .. } => nonce,
        }
    }
}

/// Why a datagram is not a LAN discovery packet.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum LanWireError {
    #[error("lan packet of {0} bytes is shorter than its header")]
    TooShort(usize),
    #[error("lan packet of {0} bytes exceeds the {MAX_PACKET_BYTES}-byte limit")]
    TooLong(usize),
    #[error("not a lan discovery packet (magic {0:02x?})")]
    BadMagic([u8; 4]),
    #[error("lan packet version {0}, expected {VERSION}")]
    UnknownVersion(u8),
    #[error("unknown lan packet kind {0:#04x}")]
    UnknownKind(u8),
    #[error("lan announce with port 0")]
    PortZero,
    #[error("lan announce with a ttl of 0 s")]
    TtlZero,
    #[error("lan packet with {0} tags, expected 1 to {MAX_TAGS}")]
    TagCount(usize),
    #[error("lan packet of {got} bytes, its {tags} tags make {expected}")]
    Length {
        got: usize,
        expected: usize,
        tags: usize,
    },
}

/// Decodes one datagram. Pure; never allocates more than [`MAX_TAGS`] tags.
pub(crate) fn decode(bytes: &[u8]) -> Result<Packet, LanWireError> {
    if bytes.len() > MAX_PACKET_BYTES {
        return Err(LanWireError::TooLong(bytes.len()));
    }
    if bytes.len() < QUERY_FIXED {
        return Err(LanWireError::TooShort(bytes.len()));
    }
    let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
    if magic != MAGIC {
        return Err(LanWireError::BadMagic(magic));
    }
    if bytes[4] != VERSION {
        return Err(LanWireError::UnknownVersion(bytes[4]));
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&bytes[6..HEADER_LEN]);
    match bytes[5] {
        KIND_ANNOUNCE => {
            if bytes.len() < ANNOUNCE_FIXED {
                return Err(LanWireError::TooShort(bytes.len()));
            }
            let port = u16::from_be_bytes([bytes[22], bytes[23]]);
            let ttl_secs = u16::from_be_bytes([bytes[24], bytes[25]]);
            if port == 0 {
                return Err(LanWireError::PortZero);
            }
            if ttl_secs == 0 {
                return Err(LanWireError::TtlZero);
            }
            let tags = decode_tags(bytes, ANNOUNCE_FIXED - 1)?;
            Ok(Packet::Announce {
                nonce,
                port,
                ttl_secs,
                tags,
            })
        }
        KIND_QUERY => {
            let tags = decode_tags(bytes, QUERY_FIXED - 1)?;
            Ok(Packet::Query { nonce, tags })
        }
        other => Err(LanWireError::UnknownKind(other)),
    }
}

/// The tags after the count byte at `count_at`; the packet must end right after them.
fn decode_tags(bytes: &[u8], count_at: usize) -> Result<Vec<LanTag>, LanWireError> {
    let n = usize::from(bytes[count_at]);
    if n == 0 || n > MAX_TAGS {
        return Err(LanWireError::TagCount(n));
    }
    let expected = count_at + 1 + n * LAN_TAG_LEN;
    if bytes.len() != expected {
        return Err(LanWireError::Length {
            got: bytes.len(),
            expected,
            tags: n,
        });
    }
    Ok(bytes[count_at + 1..]
        .chunks_exact(LAN_TAG_LEN)
        .map(|c| {
            let mut tag = [0u8; LAN_TAG_LEN];
            tag.copy_from_slice(c);
            tag
        })
        .collect())
}

/// Encodes a packet. `tags` must hold 1 to [`MAX_TAGS`] tags (more are cut off; callers
/// split their topics into packets of at most that many).
pub(crate) fn encode(packet: &Packet) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAX_PACKET_BYTES);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    let tags = match packet {
        Packet::Announce {
            nonce,
            port,
            ttl_secs,
            tags,
        } => {
            out.push(KIND_ANNOUNCE);
            out.extend_from_slice(nonce);
            out.extend_from_slice(&port.to_be_bytes());
            out.extend_from_slice(&ttl_secs.to_be_bytes());
            tags
        }
        Packet::Query { nonce, tags } => {
            out.push(KIND_QUERY);
            out.extend_from_slice(nonce);
            tags
        }
    };
    let tags = &tags[..tags.len().min(MAX_TAGS)];
    // At most MAX_TAGS (64), so it fits the count byte.
    out.push(tags.len() as u8);
    for tag in tags {
        out.extend_from_slice(tag);
    }
    out
}

fn mac(key: &[u8; 32], parts: &[&[u8]]) -> LanTag {
    // A 32-byte key is always valid for BLAKE2s; the fallback is unreachable.
    let Ok(mut mac) = <Blake2sMac<U16> as KeyInit>::new_from_slice(key) else {
        return [0u8; LAN_TAG_LEN];
    };
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// A topic's tag in an announce sent from `ip` (`key` = the topic's `LanTag` derivation).
pub(crate) fn announce_tag(
    key: &[u8; 32],
    nonce: &Nonce,
    ip: Ipv4Addr,
    port: u16,
    ttl_secs: u16,
) -> LanTag {
    mac(
        key,
        &[
            ANNOUNCE_LABEL,
            nonce,
            &ip.octets(),
            &port.to_be_bytes(),
            &ttl_secs.to_be_bytes(),
        ],
    )
}

/// A topic's tag in a query sent from `ip`.
pub(crate) fn query_tag(key: &[u8; 32], nonce: &Nonce, ip: Ipv4Addr) -> LanTag {
    mac(key, &[QUERY_LABEL, nonce, &ip.octets()])
}

/// Whether `tags` holds `tag` (compared in constant time per tag).
pub(crate) fn holds(tags: &[LanTag], tag: &LanTag) -> bool {
    tags.iter()
        .fold(false, |found, t| found | constant_eq(t, tag))
}

fn constant_eq(a: &LanTag, b: &LanTag) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn announce(n: usize) -> Packet {
        Packet::Announce {
            nonce: [7; NONCE_LEN],
            port: 4242,
            ttl_secs: 90,
            tags: (0..n).map(|i| [i as u8; LAN_TAG_LEN]).collect(),
        }
    }

    #[test]
    fn layout_is_as_documented() {
        let bytes = encode(&announce(2));
        assert_eq!(&bytes[..6], b"PSLD\x01\x01");
        assert_eq!(&bytes[6..22], &[7; 16]);
        assert_eq!(&bytes[22..27], &[0x10, 0x92, 0, 90, 2]);
        assert_eq!(bytes.len(), 27 + 32);
        let q = encode(&Packet::Query {
            nonce: [1; NONCE_LEN],
            tags: vec![[9; LAN_TAG_LEN]],
        });
        assert_eq!(&q[..6], b"PSLD\x01\x02");
        assert_eq!(q[22], 1);
        assert_eq!(q.len(), 23 + 16);
        assert_eq!(encode(&announce(MAX_TAGS)).len(), MAX_PACKET_BYTES);
        assert_eq!(MAX_PACKET_BYTES, 1051);
    }

    #[test]
    fn bad_packets_get_their_error() {
        let good = encode(&announce(1));
        assert_eq!(decode(&good), Ok(announce(1)));
        assert_eq!(decode(&good[..10]), Err(LanWireError::TooShort(10)));
        assert_eq!(decode(&good[..24]), Err(LanWireError::TooShort(24)));
        let mut long = encode(&announce(MAX_TAGS));
        long.push(0);
        assert_eq!(decode(&long), Err(LanWireError::TooLong(1052)));
        let mut b = good.clone();
        b[0] = b'X';
        assert!(matches!(decode(&b), Err(LanWireError::BadMagic(_))));
        let mut b = good.clone();
        b[4] = 2;
        assert_eq!(decode(&b), Err(LanWireError::UnknownVersion(2)));
        let mut b = good.clone();
        b[5] = 3;
        assert_eq!(decode(&b), Err(LanWireError::UnknownKind(3)));
        let mut b = good.clone();
        b[22..24].copy_from_slice(&[0, 0]);
        assert_eq!(decode(&b), Err(LanWireError::PortZero));
        let mut b = good.clone();
        b[24..26].copy_from_slice(&[0, 0]);
        assert_eq!(decode(&b), Err(LanWireError::TtlZero));
        let mut b = good.clone();
        b[26] = 0;
        assert_eq!(decode(&b), Err(LanWireError::TagCount(0)));
        let mut b = good.clone();
        b[26] = 65;
        assert_eq!(decode(&b), Err(LanWireError::TagCount(65)));
        let mut b = good.clone();
        b[26] = 2;
        assert_eq!(
            decode(&b),
            Err(LanWireError::Length {
                got: 43,
                expected: 59,
                tags: 2
            })
        );
        let mut b = good;
        b.push(0);
        assert!(matches!(decode(&b), Err(LanWireError::Length { .. })));
        let text = LanWireError::TooLong(2000).to_string();
        assert_eq!(text, "lan packet of 2000 bytes exceeds the 1051-byte limit");
    }

    #[test]
    fn tags_bind_every_field() {
        let key = [3u8; 32];
        let ip = Ipv4Addr::new(10, 0, 0, 1);
        let t = announce_tag(&key, &[1; 16], ip, 80, 90);
        assert_eq!(t, announce_tag(&key, &[1; 16], ip, 80, 90));
        for other in [
            announce_tag(&[4; 32], &[1; 16], ip, 80, 90),
            announce_tag(&key, &[2; 16], ip, 80, 90),
            announce_tag(&key, &[1; 16], Ipv4Addr::new(10, 0, 0, 2), 80, 90),
            announce_tag(&key, &[1; 16], ip, 81, 90),
            announce_tag(&key, &[1; 16], ip, 80, 91),
            query_tag(&key, &[1; 16], ip),
        ] {
            assert_ne!(t, other);
        }
        assert!(holds(&[[0; 16], t], &t));
        assert!(!holds(&[[0; 16]], &t));
        assert!(!holds(&[], &t));
    }

    proptest! {
        #[test]
        fn roundtrip(
            nonce in any::<[u8; 16]>(),
            port in 1u16..,
            ttl in 1u16..,
            tags in proptest::collection::vec(any::<[u8; 16]>(), 1..=MAX_TAGS),
            query in any::<bool>(),
        ) {
            let p = if query {
                Packet::Query { nonce, tags }
            } else {
                Packet::Announce { nonce, port, ttl_secs: ttl, tags }
            };
            let bytes = encode(&p);
            prop_assert!(bytes.len() <= MAX_PACKET_BYTES);
            prop_assert_eq!(decode(&bytes), Ok(p));
        }

        #[test]
        fn decoder_never_panics_and_accepts_only_canonical_bytes(
            bytes in proptest::collection::vec(any::<u8>(), 0..1200),
        ) {
            if let Ok(p) = decode(&bytes) {
                prop_assert_eq!(encode(&p), bytes);
            }
        }

        #[test]
        fn decoder_survives_mutated_packets(
            n in 1usize..=MAX_TAGS,
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
            cut in any::<usize>(),
        ) {
            let mut bytes = encode(&announce(n));
            for (at, v) in flips {
                let i = at % bytes.len();
                bytes[i] = v;
            }
            bytes.truncate(cut % (bytes.len() + 1));
            if let Ok(p) = decode(&bytes) {
                prop_assert_eq!(encode(&p), bytes);
            }
        }
    }
}
