//! The envelope that lets events and application messages share one connection per peer.
//!
//! Layout (version 1), written down in `docs/event-codec.md`:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | envelope version, `1` |
//! | 1 | 1 | kind: `1` event, `2` application message |
//! | 2 | rest | kind 1: one event in the core event codec (NodeUpsert or NodeDelete only); kind 2: the application's bytes, as given |
//!
//! The transport delimits messages, so there is no length field. [`decode`] is a pure function
//! over `&[u8]`: it never panics, allocates at most an event id's length, and rejects unknown
//! versions and kinds, malformed events, and peer events (PeerConnected / PeerDisconnected
//! describe this replica's own links; a remote has no business sending them).
//!
//! ```
//! use pluresdb_sync_bridge::envelope::{self, Frame};
//! use pluresdb_sync_core::SyncEvent;
//!
//! let event = SyncEvent::NodeDelete { id: "ab".into() };
//! let bytes = envelope::encode_event(&event).unwrap().unwrap();
//! assert_eq!(&bytes[..], [1, 1, 1, 2, 0, 2, b'a', b'b']);
//! assert_eq!(envelope::decode(&bytes).unwrap(), Frame::Event(event));
//!
//! let bytes = envelope::encode_message(b"hi").unwrap();
//! assert_eq!(&bytes[..], [1, 2, b'h', b'i']);
//! assert_eq!(envelope::decode(&bytes).unwrap(), Frame::Message(b"hi"));
//! ```

use bytes::{BufMut, Bytes, BytesMut};
use pluresdb_sync_core::{CodecError, MAX_MESSAGE_BYTES, SyncEvent, codec};

/// The envelope version this build writes and reads.
pub const ENVELOPE_VERSION: u8 = 1;

/// Bytes before the payload: version and kind.
pub const ENVELOPE_HEADER_BYTES: usize = 2;

/// The largest application message the bridge carries: a transport message
/// ([`MAX_MESSAGE_BYTES`], 16 MiB) minus the envelope header.
pub const MAX_BRIDGE_MESSAGE_BYTES: usize = MAX_MESSAGE_BYTES - ENVELOPE_HEADER_BYTES;

/// The kind byte of an event.
pub const KIND_EVENT: u8 = 1;
/// The kind byte of an application message.
pub const KIND_MESSAGE: u8 = 2;

/// One decoded envelope.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A NodeUpsert or NodeDelete the remote's application published.
    Event(SyncEvent),
    /// An application message (the bytes after the header).
    Message(&'a [u8]),
}

/// Why a peer's bytes are not a valid envelope. The bridge reports it and drops the message;
/// the connection stays up.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// Fewer bytes than the two-byte header.
    #[error("envelope of {len} bytes is shorter than its 2-byte header")]
    Truncated {
        /// The message's length.
        len: usize,
    },
    /// An envelope version this build does not read (a newer peer, or garbage).
    #[error("unsupported envelope version {found} (this build reads version {supported})")]
    UnsupportedVersion {
        /// The version found.
        found: u8,
        /// The version this build reads.
        supported: u8,
    },
    /// A kind byte other than event (1) or message (2).
    #[error("unknown envelope kind {0:#04x} (known: 1 event, 2 message)")]
    UnknownKind(u8),
    /// The event payload does not decode.
    #[error("event in envelope: {0}")]
    Event(#[from] CodecError),
    /// A remote sent a PeerConnected or PeerDisconnected event: only node events cross the
    /// network.
    #[error("peer event {event:?} is not accepted from a remote (only NodeUpsert and NodeDelete)")]
    PeerEvent {
        /// The event it sent.
        event: SyncEvent,
    },
    /// An application message is larger than the bridge carries.
    #[error("message of {len} bytes exceeds the {max}-byte limit of a bridge message")]
    MessageTooLarge {
        /// Its length.
        len: usize,
        /// [`MAX_BRIDGE_MESSAGE_BYTES`].
        max: usize,
    },
}

/// The envelope of a node event; `Ok(None)` for PeerConnected / PeerDisconnected, which are
/// never sent. Fails when the id is longer than the event codec allows.
pub fn encode_event(event: &SyncEvent) -> Result<Option<Bytes>, EnvelopeError> {
    if !matches!(
        event,
        SyncEvent::NodeUpsert { .. } | SyncEvent::NodeDelete { .. }
    ) {
        return Ok(None);
    }
    let body = codec::encode_event(event)?;
    let mut out = BytesMut::with_capacity(ENVELOPE_HEADER_BYTES + body.len());
    out.put_u8(ENVELOPE_VERSION);
    out.put_u8(KIND_EVENT);
    out.put_slice(&body);
    Ok(Some(out.freeze()))
}

/// The envelope of an application message; fails above [`MAX_BRIDGE_MESSAGE_BYTES`].
pub fn encode_message(payload: &[u8]) -> Result<Bytes, EnvelopeError> {
    if payload.len() > MAX_BRIDGE_MESSAGE_BYTES {
        return Err(EnvelopeError::MessageTooLarge {
            len: payload.len(),
            max: MAX_BRIDGE_MESSAGE_BYTES,
        });
    }
    let mut out = BytesMut::with_capacity(ENVELOPE_HEADER_BYTES + payload.len());
    out.put_u8(ENVELOPE_VERSION);
    out.put_u8(KIND_MESSAGE);
    out.put_slice(payload);
    Ok(out.freeze())
}

/// Decodes one envelope, as received from a peer.
pub fn decode(bytes: &[u8]) -> Result<Frame<'_>, EnvelopeError> {
    let Some((&[version, kind], payload)) = bytes.split_first_chunk::<ENVELOPE_HEADER_BYTES>()
    else {
        return Err(EnvelopeError::Truncated { len: bytes.len() });
    };
    if version != ENVELOPE_VERSION {
        return Err(EnvelopeError::UnsupportedVersion {
            found: version,
            supported: ENVELOPE_VERSION,
        });
    }
    match kind {
        KIND_EVENT => match codec::decode_event(payload)? {
            event @ (SyncEvent::NodeUpsert { .. } | SyncEvent::NodeDelete { .. }) => {
                Ok(Frame::Event(event))
            }
            event => Err(EnvelopeError::PeerEvent { event }),
        },
        KIND_MESSAGE => Ok(Frame::Message(payload)),
        other => Err(EnvelopeError::UnknownKind(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_bytes() {
        let up = encode_event(&SyncEvent::NodeUpsert { id: String::new() })
            .unwrap()
            .unwrap();
        assert_eq!(&up[..], [1, 1, 1, 1, 0, 0]);
        assert_eq!(&encode_message(b"").unwrap()[..], [1, 2]);
        assert_eq!(decode(&[1, 2]).unwrap(), Frame::Message(b""));
    }

    #[test]
    fn peer_events_are_never_encoded_nor_accepted() {
        for event in [
            SyncEvent::PeerConnected {
                peer_id: "p".into(),
            },
            SyncEvent::PeerDisconnected {
                peer_id: "p".into(),
            },
        ] {
            assert_eq!(encode_event(&event).unwrap(), None);
            let mut forged = vec![1, KIND_EVENT];
            forged.extend(codec::encode_event(&event).unwrap());
            assert_eq!(
                decode(&forged).unwrap_err(),
                EnvelopeError::PeerEvent { event }
            );
        }
    }

    #[test]
    fn bad_input_is_a_clear_error() {
        assert_eq!(
            decode(&[]).unwrap_err(),
            EnvelopeError::Truncated { len: 0 }
        );
        assert_eq!(
            decode(&[1]).unwrap_err(),
            EnvelopeError::Truncated { len: 1 }
        );
        let err = decode(&[7, 2, 0]).unwrap_err();
        assert_eq!(
            err,
            EnvelopeError::UnsupportedVersion {
                found: 7,
                supported: 1
            }
        );
        assert!(err.to_string().contains("version 7"), "{err}");
        let err = decode(&[1, 9]).unwrap_err();
        assert_eq!(err, EnvelopeError::UnknownKind(9));
        assert!(err.to_string().contains("0x09"), "{err}");
        assert_eq!(
            decode(&[1, 1, 1, 1, 0, 5, b'a']).unwrap_err(),
            EnvelopeError::Event(CodecError::Truncated {
                offset: 4,
                needed: 5,
                available: 1
            })
        );
        assert!(matches!(
            decode(&[1, 1]).unwrap_err(),
            EnvelopeError::Event(CodecError::Truncated { .. })
        ));
        let long = SyncEvent::NodeUpsert {
            id: "x".repeat(codec::MAX_EVENT_ID_BYTES + 1),
        };
        assert!(matches!(
            encode_event(&long).unwrap_err(),
            EnvelopeError::Event(CodecError::TooLong { .. })
        ));
    }

    #[test]
    fn message_size_limit() {
        let max = vec![0u8; MAX_BRIDGE_MESSAGE_BYTES];
        let bytes = encode_message(&max).unwrap();
        assert_eq!(bytes.len(), MAX_MESSAGE_BYTES);
        assert_eq!(decode(&bytes).unwrap(), Frame::Message(&max[..]));
        let over = vec![0u8; MAX_BRIDGE_MESSAGE_BYTES + 1];
        let err = encode_message(&over).unwrap_err();
        assert!(err.to_string().contains("16777215"), "{err}");
    }

    proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn what_decodes_reencodes_to_the_same_bytes(
            kind in 1u8..=2,
            body in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let mut bytes = vec![ENVELOPE_VERSION, kind];
            bytes.extend_from_slice(&body);
            match decode(&bytes) {
                Ok(Frame::Event(event)) => {
                    prop_assert_eq!(&encode_event(&event).unwrap().unwrap()[..], &bytes[..]);
                }
                Ok(Frame::Message(payload)) => {
                    prop_assert_eq!(&encode_message(payload).unwrap()[..], &bytes[..]);
                }
                Err(e) => prop_assert!(kind == KIND_EVENT, "{e}"),
            }
        }

        #[test]
        fn node_events_and_messages_roundtrip(
            id in ".{0,64}",
            delete in any::<bool>(),
            payload in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let event = if delete {
                SyncEvent::NodeDelete { id }
            } else {
                SyncEvent::NodeUpsert { id }
            };
            let bytes = encode_event(&event).unwrap().unwrap();
            prop_assert_eq!(decode(&bytes).unwrap(), Frame::Event(event));
            let bytes = encode_message(&payload).unwrap();
            prop_assert_eq!(decode(&bytes).unwrap(), Frame::Message(&payload[..]));
        }
    }
}
