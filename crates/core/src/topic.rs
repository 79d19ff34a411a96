//! Topics: the 32-byte names peers meet on, and the values derived from them.
//!
//! A topic is the BLAKE2b-256 hash of a database id. The topic itself never leaves the
//! process: everything a transport publishes (a DHT info-hash, a relay room id, a pre-shared
//! key) is derived from it with [`derive_from_topic`] under a distinct [`Domain`], so knowing
//! one derived value tells nothing about the topic or about the other derived values.

use blake2::digest::consts::U32;
use blake2::{Blake2b, Digest};

/// A topic: the BLAKE2b-256 hash of a database id (see [`derive_topic`]).
pub type TopicHash = [u8; 32];

type Blake2b256 = Blake2b<U32>;

/// Derives the topic of a database id: BLAKE2b with a 32-byte digest (not truncated
/// BLAKE2b-512) of the id's UTF-8 bytes, nothing added.
///
/// ```
/// use pluresdb_sync_core::derive_topic;
///
/// let topic = derive_topic("test");
/// assert_eq!(
///     hex::encode(topic),
///     "928b20366943e2afd11ebc0eae2e53a93bf177a4fcf35bcc64d503704e65e202"
/// );
/// assert_eq!(derive_topic("test"), topic);
/// ```
pub fn derive_topic(db_id: &str) -> TopicHash {
    Blake2b256::digest(db_id.as_bytes()).into()
}

/// What a value derived from a topic is used for. Each domain gives an unrelated value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Domain {
    /// The room id a relay client joins (the relay sees this, never the topic).
    RelayRoom,
    /// The key the DHT announcement is stored under (first 20 bytes are the info-hash).
    DhtInfoHash,
    /// The Noise pre-shared key that proves knowledge of the topic during a handshake.
    NoisePsk,
    /// The key of the tags in LAN discovery packets (a MAC over a fresh nonce, the sender's
    /// address and port): only who knows the topic can tell which topic a packet is for.
    LanTag,
}

impl Domain {
    /// The label hashed in front of the topic. Changing one breaks interoperability.
    pub const fn label(self) -> &'static str {
        match self {
            Domain::RelayRoom => "pluresdb-sync/v1/relay-room",
            Domain::DhtInfoHash => "pluresdb-sync/v1/dht-info-hash",
            Domain::NoisePsk => "pluresdb-sync/v1/noise-psk",
            Domain::LanTag => "pluresdb-sync/v1/lan-tag",
        }
    }
}

/// Derives a 32-byte value from a topic for one [`Domain`].
///
/// The hash input is `len(label) as u8 || label || topic`, so no two domains can collide and
/// the output reveals nothing about the topic.
///
/// ```
/// use pluresdb_sync_core::{derive_topic, topic::{derive_from_topic, Domain}};
///
/// let topic = derive_topic("my-app-database");
/// let room = derive_from_topic(&topic, Domain::RelayRoom);
/// assert_ne!(room, topic);
/// assert_ne!(room, derive_from_topic(&topic, Domain::NoisePsk));
/// ```
pub fn derive_from_topic(topic: &TopicHash, domain: Domain) -> [u8; 32] {
    let label = domain.label().as_bytes();
    let mut hasher = Blake2b256::new();
    // Labels are short constants; the length prefix makes the encoding unambiguous.
    hasher.update([label.len() as u8]);
    hasher.update(label);
    hasher.update(topic);
    hasher.finalize().into()
}

/// Parses a topic written as 64 hex digits (as `pluresdb-sync topic` prints it).
pub fn parse_topic_hex(text: &str) -> Result<TopicHash, crate::Error> {
    let trimmed = text.trim();
    let mut topic = [0u8; 32];
    hex::decode_to_slice(trimmed, &mut topic).map_err(|e| crate::Error::InvalidTopic {
        text: trimmed.chars().take(80).collect(),
        reason: e.to_string(),
    })?;
    Ok(topic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_vectors() {
        let cases = [
            (
                "test",
                "928b20366943e2afd11ebc0eae2e53a93bf177a4fcf35bcc64d503704e65e202",
            ),
            (
                "my-app-database",
                "9b7834b794d97cd464a616bf639d0f36788de21c2849d5a8652637769f6e47cc",
            ),
            (
                "",
                "0e5751c026e543b2e8ab2eb06099daa1d1e5df47778f7787faab45cdf12fe3a8",
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(
                hex::encode(derive_topic(input)),
                expected,
                "input {input:?}"
            );
        }
    }

    #[test]
    fn not_truncated_blake2b_512() {
        let long = blake2::Blake2b512::digest(b"test");
        assert_ne!(&long[..32], &derive_topic("test")[..]);
    }

    #[test]
    fn domains_are_separated() {
        let topic = derive_topic("x");
        let all = [
            Domain::RelayRoom,
            Domain::DhtInfoHash,
            Domain::NoisePsk,
            Domain::LanTag,
        ]
        .map(|d| derive_from_topic(&topic, d));
        for (i, a) in all.iter().enumerate() {
            assert_ne!(a, &topic);
            for b in &all[i + 1..] {
                assert_ne!(a, b);
            }
        }
        // Deterministic, and different topics give different values.
        assert_eq!(all[0], derive_from_topic(&topic, Domain::RelayRoom));
        assert_ne!(
            all[0],
            derive_from_topic(&derive_topic("y"), Domain::RelayRoom)
        );
    }

    /// Pins the derived values of one topic (computed independently with Python's
    /// `hashlib.blake2b(bytes([len(label)]) + label + topic, digest_size=32)`): the label
    /// length is one byte, then the label's bytes, then the 32 topic bytes.
    #[test]
    fn derived_values_are_pinned() {
        let topic = derive_topic("my-app-database");
        let cases = [
            (
                Domain::RelayRoom,
                "4549f872179e53b4f795354fe88107df37185b72fc1b18d22564020bc49c7552",
            ),
            (
                Domain::DhtInfoHash,
                "ca2a1d09f97fc728c04e49d376b201813e345accc1bf1c7a542311913ceef1dd",
            ),
            (
                Domain::NoisePsk,
                "9acc103562390b535c7efa8d181eb0178c3a1a33f0cbea1b72014fe9ae7764f0",
            ),
            (
                Domain::LanTag,
                "457fce9f13b6bcd34ec8d4e74b0776af185609fe41858a9679abe919715cfd2e",
            ),
        ];
        for (domain, expected) in cases {
            assert_eq!(
                hex::encode(derive_from_topic(&topic, domain)),
                expected,
                "{domain:?}"
            );
        }
    }

    /// The id is hashed as its UTF-8 bytes, with no normalisation or terminator.
    #[test]
    fn ids_are_hashed_as_utf8_bytes() {
        assert_eq!(
            hex::encode(derive_topic("caf\u{e9}")),
            "be072a4adc859cf9e2329c7092acbc6bbd9d0f65d0317f00549917d8285522b9"
        );
        assert_eq!(
            derive_topic("caf\u{e9}"),
            <[u8; 32]>::from(Blake2b256::digest([0x63, 0x61, 0x66, 0xc3, 0xa9]))
        );
    }

    #[test]
    fn parse_hex_roundtrip_and_errors() {
        let topic = derive_topic("abc");
        assert_eq!(parse_topic_hex(&hex::encode(topic)).unwrap(), topic);
        let err = parse_topic_hex("abcd").unwrap_err().to_string();
        assert!(err.contains("abcd"), "{err}");
        assert!(parse_topic_hex(&"zz".repeat(32)).is_err());
    }
}
