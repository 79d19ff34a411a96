//! The envelope that lets events and application messages share one connection per peer.
//!
//! Layout (version 1), written down in `docs/event-codec.md`:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | envelope version, `1` |
//! | 1 | 1 | kind: `1` event, `2` application message |
//! | 2 | rest | kind 1: one or more events in the core event codec, back to back (NodeUpsert or NodeDelete only); kind 2: the application's bytes, as given |
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
//! assert_eq!(envelope::decode(&bytes).unwrap(), Frame::Events(vec![event.clone()]));
//!
//! // Events waiting together travel together.
//! let mut batch = envelope::EventBatch::new();
//! batch.push(&event).unwrap();
//! batch.push(&SyncEvent::NodeUpsert { id: "c".into() }).unwrap();
//! let bytes = batch.finish();
//! assert_eq!(&bytes[..], [1, 1, 1, 2, 0, 2, b'a', b'b', 1, 1, 0, 1, b'c']);
//! assert_eq!(envelope::decode(&bytes).unwrap().events().len(), 2);
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
    /// NodeUpsert / NodeDelete events the remote's application published, in order (at
    /// least one).
    Events(Vec<SyncEvent>),
    /// An application message (the bytes after the header).
    Message(&'a [u8]),
}

impl Frame<'_> {
    /// The events of an event frame (none for a message).
    pub fn events(&self) -> &[SyncEvent] {
        match self {
            Frame::Events(events) => events,
            Frame::Message(_) => &[],
        }
    }
}

/// Builds one event envelope from several events (which then cross as one transport
/// message).
#[derive(Debug)]
pub struct EventBatch {
    buf: BytesMut,
    events: usize,
}

impl Default for EventBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl EventBatch {
    /// An empty batch.
    pub fn new() -> Self {
        let mut buf = BytesMut::with_capacity(256);
        buf.put_u8(ENVELOPE_VERSION);
        buf.put_u8(KIND_EVENT);
        Self { buf, events: 0 }
    }

    /// Adds a node event; `Ok(false)` for PeerConnected / PeerDisconnected (never sent).
    /// Fails when its id is longer than the event codec allows (the batch is unchanged).
    pub fn push(&mut self, event: &SyncEvent) -> Result<bool, EnvelopeError> {
        if !matches!(
            event,
            SyncEvent::NodeUpsert { .. } | SyncEvent::NodeDelete { .. }
        ) {
            return Ok(false);
        }
        self.buf.put_slice(&codec::encode_event(event)?);
        self.events += 1;
        Ok(true)
    }

    /// Events in the batch.
    pub fn len(&self) -> usize {
        self.events
    }

    /// Whether the batch has no event.
    pub fn is_empty(&self) -> bool {
        self.events == 0
    }

    /// The envelope's size so far, in bytes.
    pub fn bytes(&self) -> usize {
        self.buf.len()
    }

    /// The envelope (only meaningful when the batch is not empty).
    pub fn finish(self) -> Bytes {
        self.buf.freeze()
    }
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

/// The envelope of one node event; `Ok(None)` for PeerConnected / PeerDisconnected, which
/// are never sent. Fails when the id is longer than the event codec allows.
pub fn encode_event(event: &SyncEvent) -> Result<Option<Bytes>, EnvelopeError> {
    let mut batch = EventBatch::new();
    Ok(batch.push(event)?.then(|| batch.finish()))
}

/// The envelope of several node events (PeerConnected / PeerDisconnected are left out);
/// `Ok(None)` when none is left.
pub fn encode_events<'a>(
    events: impl IntoIterator<Item = &'a SyncEvent>,
) -> Result<Option<Bytes>, EnvelopeError> {
    let mut batch = EventBatch::new();
    for event in events {
        batch.push(event)?;
    }
    Ok((!batch.is_empty()).then(|| batch.finish()))
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
        KIND_EVENT => decode_events(payload).map(Frame::Events),
        KIND_MESSAGE => Ok(Frame::Message(payload)),
        other => Err(EnvelopeError::UnknownKind(other)),
    }
}

/// The events of an event payload: one or more, back to back, each delimited by the length
/// in its own header.
fn decode_events(mut rest: &[u8]) -> Result<Vec<SyncEvent>, EnvelopeError> {
    /// The event codec's header: version, tag, a 2-byte id length.
    const EVENT_HEADER: usize = 4;
    let mut events = Vec::new();
    while events.is_empty() || !rest.is_empty() {
        let len = match rest {
            [_, _, hi, lo, ..] => EVENT_HEADER + usize::from(u16::from_be_bytes([*hi, *lo])),
            // Too short for a header: the codec says so.
            _ => rest.len(),
        };
        let (one, tail) = rest.split_at(len.min(rest.len()));
        match codec::decode_event(one)? {
            event @ (SyncEvent::NodeUpsert { .. } | SyncEvent::NodeDelete { .. }) => {
                events.push(event);
            }
            event => return Err(EnvelopeError::PeerEvent { event }),
        }
        rest = tail;
    }
    Ok(events)
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
        let two = [1, 1, 1, 1, 0, 0, 1, 2, 0, 1, b'x'];
        assert_eq!(
            decode(&two).unwrap(),
            Frame::Events(vec![
                SyncEvent::NodeUpsert { id: String::new() },
                SyncEvent::NodeDelete { id: "x".into() }
            ])
        );
        assert_eq!(decode(&[1, 2]).unwrap().events(), &[]);
        assert_eq!(&encode_message(b"").unwrap()[..], [1, 2]);
        assert_eq!(decode(&[1, 2]).unwrap(), Frame::Message(b""));
    }

    #[test]
    fn batches_skip_peer_events_and_keep_order() {
        let events = [
            SyncEvent::NodeUpsert { id: "1".into() },
            SyncEvent::PeerConnected {
                peer_id: "p".into(),
            },
            SyncEvent::NodeDelete { id: "2".into() },
        ];
        let bytes = encode_events(&events).unwrap().unwrap();
        assert_eq!(
            decode(&bytes).unwrap(),
            Frame::Events(vec![events[0].clone(), events[2].clone()])
        );
        assert_eq!(encode_events(&events[1..2]).unwrap(), None);
        let mut batch = EventBatch::default();
        assert!(batch.is_empty());
        let long = SyncEvent::NodeUpsert {
            id: "x".repeat(codec::MAX_EVENT_ID_BYTES + 1),
        };
        assert!(batch.push(&long).is_err());
        assert_eq!(
            (batch.len(), batch.bytes()),
            (0, 2),
            "a refused event leaves no trace"
        );
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
        // A good event, then the start of another.
        assert!(matches!(
            decode(&[1, 1, 1, 1, 0, 0, 1, 1]).unwrap_err(),
            EnvelopeError::Event(CodecError::Truncated { .. })
        ));
        // A good event, then a peer event.
        let mut forged = vec![1, 1, 1, 1, 0, 0];
        forged.extend(
            codec::encode_event(&SyncEvent::PeerDisconnected {
                peer_id: "p".into(),
            })
            .unwrap(),
        );
        assert!(matches!(
            decode(&forged).unwrap_err(),
            EnvelopeError::PeerEvent { .. }
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
                Ok(Frame::Events(events)) => {
                    prop_assert_eq!(&encode_events(&events).unwrap().unwrap()[..], &bytes[..]);
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
            prop_assert_eq!(decode(&bytes).unwrap(), Frame::Events(vec![event.clone()]));
            let batch = [event.clone(), SyncEvent::NodeUpsert { id: "z".into() }, event];
            let bytes = encode_events(&batch).unwrap().unwrap();
            prop_assert_eq!(decode(&bytes).unwrap(), Frame::Events(batch.to_vec()));
            let bytes = encode_message(&payload).unwrap();
            prop_assert_eq!(decode(&bytes).unwrap(), Frame::Message(&payload[..]));
        }
    }
}
