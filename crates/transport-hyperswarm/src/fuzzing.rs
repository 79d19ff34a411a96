//! Entry points for the `cargo fuzz` targets in `fuzz/` (feature `fuzzing`; not a public API).
//! Each feeds arbitrary bytes to the decoders remote peers reach and checks what they accept.

use quinn::udp::RecvMeta;
use std::io::IoSliceMut;

use crate::socket::{Kind, PROBE, classify, filter_batch};
use crate::{krpc, wire};

/// Datagrams as the data socket sees them: the classifier, the batch filter (one received
/// entry cut into segments of a stride taken from the first byte) and the KRPC reply decoder.
/// Panics when an invariant breaks.
pub fn datagram(data: &[u8]) {
    let kind = classify(data);
    match kind {
        Kind::Probe => assert!(data.starts_with(PROBE)),
        Kind::Quic => assert!(data.first().is_some_and(|b| b & 0x40 != 0)),
        Kind::Krpc | Kind::Garbage => {}
    }
    if let Ok(reply) = krpc::decode_reply(data) {
        // A well-formed reply is what the socket diverts to the KRPC handler.
        assert_eq!(
            kind,
            Kind::Krpc,
            "a decodable reply is not classified as KRPC"
        );
        assert!(reply.txid.len() < data.len());
    }

    let stride = usize::from(data.first().copied().unwrap_or(1)).max(1);
    let mut buf = data.to_vec();
    let segments = data.len().div_ceil(stride);
    let mut meta = [RecvMeta {
        len: data.len(),
        stride,
        ..RecvMeta::default()
    }];
    let mut diverted = 0;
    let kept = {
        let mut bufs = [IoSliceMut::new(&mut buf)];
        filter_batch(&mut bufs, &mut meta, 1, |_, kind, bytes| {
            assert_ne!(kind, Kind::Quic);
            assert_eq!(classify(bytes), kind);
            diverted += 1;
        })
    };
    let kept_len = if kept == 1 { meta[0].len } else { 0 };
    let expected: Vec<u8> = data
        .chunks(stride)
        .filter(|s| classify(s) == Kind::Quic)
        .flatten()
        .copied()
        .collect();
    assert_eq!(&buf[..kept_len], &expected[..], "kept bytes differ");
    let kept_segments = data
        .chunks(stride)
        .filter(|s| classify(s) == Kind::Quic)
        .count();
    assert_eq!(diverted + kept_segments, segments);
}

/// The stream decoders of a connection's handshake and framing: whatever they accept must
/// re-encode to the same bytes and respect the limits. Panics when an invariant breaks.
pub fn stream(data: &[u8]) {
    if let Ok(purpose) = wire::decode_purpose(data) {
        assert_eq!(&[purpose.to_byte()][..], data);
    }
    if let [a, b, ..] = *data
        && let Ok(len) = wire::decode_handshake_len([a, b])
    {
        assert!((1..=wire::MAX_HANDSHAKE_MESSAGE).contains(&len));
        assert_eq!(wire::encode_handshake_len(len), [a, b]);
    }
    if let [a, b, c, d, ..] = *data
        && let Ok(len) = wire::decode_frame_len([a, b, c, d])
    {
        assert!(len <= pluresdb_sync_core::MAX_MESSAGE_BYTES);
        assert_eq!(wire::encode_frame_len(len), [a, b, c, d]);
    }
    if let Some(&byte) = data.first()
        && let Ok(verdict) = wire::decode_verdict(byte)
    {
        assert_eq!(verdict.to_byte(), byte);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_inputs() {
        datagram(b"d1:t4:abcd1:y1:re");
        datagram(PROBE);
        datagram(&[]);
        stream(&[wire::Purpose::Connect.to_byte()]);
        stream(&[]);
    }

    proptest! {
        #[test]
        fn invariants_hold(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            datagram(&bytes);
            stream(&bytes);
        }
    }
}
