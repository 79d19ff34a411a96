//! A versioned binary encoding of [`SyncEvent`], used to carry events between peers.
//!
//! Layout (version 1), all integers big-endian; written down in `docs/event-codec.md`:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | version, `1` |
//! | 1 | 1 | tag: `1` NodeUpsert, `2` NodeDelete, `3` PeerConnected, `4` PeerDisconnected |
//! | 2 | 2 | `n`, length of the id in bytes, at most [`MAX_EVENT_ID_BYTES`] |
//! | 4 | n | the id, UTF-8 |
//!
//! The decoder is a pure function over `&[u8]`: it never panics and never allocates more than
//! the input's length; it rejects unknown versions and tags, oversized or non-UTF-8 ids and
//! trailing bytes.
//!
//! ```
//! use pluresdb_sync_core::{codec, SyncEvent};
//!
//! let event = SyncEvent::NodeUpsert { id: "users/42".into() };
//! let bytes = codec::encode_event(&event).unwrap();
//! assert_eq!(codec::decode_event(&bytes).unwrap(), event);
//! assert!(codec::decode_event(&bytes[..3]).is_err());
//! ```

use crate::{CodecError, SyncEvent};

/// The codec version this build writes and reads.
pub const EVENT_CODEC_VERSION: u8 = 1;

/// The longest id an encoded event may carry: 4 KiB, far above any real node or peer id,
/// small enough that a hostile peer cannot make a receiver hold large strings per event.
pub const MAX_EVENT_ID_BYTES: usize = 4096;

const HEADER_LEN: usize = 4;

const TAG_NODE_UPSERT: u8 = 1;
const TAG_NODE_DELETE: u8 = 2;
const TAG_PEER_CONNECTED: u8 = 3;
const TAG_PEER_DISCONNECTED: u8 = 4;

fn parts(event: &SyncEvent) -> (u8, &str) {
    match event {
        SyncEvent::NodeUpsert { id } => (TAG_NODE_UPSERT, id),
        SyncEvent::NodeDelete { id } => (TAG_NODE_DELETE, id),
        SyncEvent::PeerConnected { peer_id } => (TAG_PEER_CONNECTED, peer_id),
        SyncEvent::PeerDisconnected { peer_id } => (TAG_PEER_DISCONNECTED, peer_id),
    }
}

/// Encodes an event; fails when its id is longer than [`MAX_EVENT_ID_BYTES`].
pub fn encode_event(event: &SyncEvent) -> Result<Vec<u8>, CodecError> {
    let (tag, id) = parts(event);
    let id = id.as_bytes();
    if id.len() > MAX_EVENT_ID_BYTES {
        return Err(CodecError::TooLong {
            field: "event id",
            len: id.len(),
            max: MAX_EVENT_ID_BYTES,
        });
    }
    let mut out = Vec::with_capacity(HEADER_LEN + id.len());
    out.push(EVENT_CODEC_VERSION);
    out.push(tag);
    // Fits: MAX_EVENT_ID_BYTES < u16::MAX.
    out.extend_from_slice(&(id.len() as u16).to_be_bytes());
    out.extend_from_slice(id);
    Ok(out)
}

/// Decodes exactly one event from `bytes`.
pub fn decode_event(bytes: &[u8]) -> Result<SyncEvent, CodecError> {
    let Some(header) = bytes.first_chunk::<HEADER_LEN>() else {
        return Err(CodecError::Truncated {
            offset: 0,
            needed: HEADER_LEN,
            available: bytes.len(),
        });
    };
    let [version, tag, len_hi, len_lo] = *header;
    if version != EVENT_CODEC_VERSION {
        return Err(CodecError::UnsupportedVersion {
            found: version,
            supported: EVENT_CODEC_VERSION,
        });
    }
    if !(TAG_NODE_UPSERT..=TAG_PEER_DISCONNECTED).contains(&tag) {
        return Err(CodecError::UnknownTag(tag));
    }
    let len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
    if len > MAX_EVENT_ID_BYTES {
        return Err(CodecError::TooLong {
            field: "event id",
            len,
            max: MAX_EVENT_ID_BYTES,
        });
    }
    let rest = &bytes[HEADER_LEN..];
    if rest.len() < len {
        return Err(CodecError::Truncated {
            offset: HEADER_LEN,
            needed: len,
            available: rest.len(),
        });
    }
    if rest.len() > len {
        return Err(CodecError::TrailingBytes(rest.len() - len));
    }
    let id = std::str::from_utf8(rest)
        .map_err(|e| CodecError::InvalidUtf8 {
            field: "event id",
            offset: e.valid_up_to(),
        })?
        .to_owned();
    Ok(match tag {
        TAG_NODE_UPSERT => SyncEvent::NodeUpsert { id },
        TAG_NODE_DELETE => SyncEvent::NodeDelete { id },
        TAG_PEER_CONNECTED => SyncEvent::PeerConnected { peer_id: id },
        _ => SyncEvent::PeerDisconnected { peer_id: id },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn all_kinds(id: &str) -> [SyncEvent; 4] {
        [
            SyncEvent::NodeUpsert { id: id.into() },
            SyncEvent::NodeDelete { id: id.into() },
            SyncEvent::PeerConnected { peer_id: id.into() },
            SyncEvent::PeerDisconnected { peer_id: id.into() },
        ]
    }

    #[test]
    fn known_bytes() {
        let bytes = encode_event(&SyncEvent::NodeDelete { id: "ab".into() }).unwrap();
        assert_eq!(bytes, [1, 2, 0, 2, b'a', b'b']);
        let empty = encode_event(&SyncEvent::PeerConnected {
            peer_id: String::new(),
        })
        .unwrap();
        assert_eq!(empty, [1, 3, 0, 0]);
        assert_eq!(
            decode_event(&empty).unwrap(),
            SyncEvent::PeerConnected {
                peer_id: String::new()
            }
        );
    }

    #[test]
    fn roundtrip_every_kind_at_the_limit() {
        let id = "é".repeat(MAX_EVENT_ID_BYTES / 2);
        for event in all_kinds(&id) {
            let bytes = encode_event(&event).unwrap();
            assert_eq!(bytes.len(), HEADER_LEN + MAX_EVENT_ID_BYTES);
            assert_eq!(decode_event(&bytes).unwrap(), event);
        }
    }

    #[test]
    fn rejects_bad_input_with_clear_errors() {
        let good = encode_event(&SyncEvent::NodeUpsert { id: "abc".into() }).unwrap();

        let mut v2 = good.clone();
        v2[0] = 2;
        let err = decode_event(&v2).unwrap_err();
        assert_eq!(
            err,
            CodecError::UnsupportedVersion {
                found: 2,
                supported: 1
            }
        );
        assert!(err.to_string().contains("version 2"), "{err}");

        let mut tag = good.clone();
        tag[1] = 9;
        assert_eq!(decode_event(&tag).unwrap_err(), CodecError::UnknownTag(9));
        tag[1] = 0;
        assert_eq!(decode_event(&tag).unwrap_err(), CodecError::UnknownTag(0));

        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(
            decode_event(&trailing).unwrap_err(),
            CodecError::TrailingBytes(1)
        );

        assert!(matches!(
            decode_event(&good[..5]).unwrap_err(),
            CodecError::Truncated {
                offset: 4,
                needed: 3,
                available: 1
            }
        ));
        assert!(matches!(
            decode_event(&[]).unwrap_err(),
            CodecError::Truncated { .. }
        ));

        let huge = [1, 1, 0xff, 0xff];
        let err = decode_event(&huge).unwrap_err();
        assert!(err.to_string().contains("65535"), "{err}");

        let bad_utf8 = [1, 1, 0, 2, b'a', 0xff];
        assert_eq!(
            decode_event(&bad_utf8).unwrap_err(),
            CodecError::InvalidUtf8 {
                field: "event id",
                offset: 1
            }
        );

        let too_long = SyncEvent::NodeUpsert {
            id: "x".repeat(MAX_EVENT_ID_BYTES + 1),
        };
        let err = encode_event(&too_long).unwrap_err();
        assert!(err.to_string().contains("4097"), "{err}");
    }

    proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_event(&bytes);
        }

        #[test]
        fn roundtrip(id in ".{0,64}", kind in 0usize..4) {
            let event = all_kinds(&id)[kind].clone();
            let bytes = encode_event(&event).unwrap();
            prop_assert_eq!(decode_event(&bytes).unwrap(), event);
        }

        #[test]
        fn valid_headers_with_random_bodies(
            tag in 1u8..=4,
            body in proptest::collection::vec(any::<u8>(), 0..32),
        ) {
            let mut bytes = vec![1, tag];
            bytes.extend_from_slice(&(body.len() as u16).to_be_bytes());
            bytes.extend_from_slice(&body);
            match decode_event(&bytes) {
                Ok(event) => prop_assert_eq!(encode_event(&event).unwrap(), bytes),
                Err(e) => {
                    let is_utf8_error = matches!(e, CodecError::InvalidUtf8 { .. });
                    prop_assert!(is_utf8_error);
                }
            }
        }
    }
}
