//! Entry points for the `cargo fuzz` targets in `fuzz/` (feature `fuzzing`; not a public API).
//! Each feeds arbitrary bytes to the decoders remote peers reach and checks what they accept.

use quinn::udp::RecvMeta;
use std::io::IoSliceMut;

use crate::socket::{Kind, PROBE, classify, filter_batch};
use crate::{krpc, lan_wire, path_wire, wire};

/// Datagrams as the data socket sees them: the classifier, the batch filter (one received
/// entry cut into segments of a stride taken from the first byte) and the KRPC reply decoder.
/// Panics when an invariant breaks.
pub fn datagram(data: &[u8]) {
    let kind = classify(data);
    match kind {
        Kind::Probe => assert!(data.starts_with(PROBE)),
        Kind::Quic => assert!(data.first().is_some_and(|b| b & 0x40 != 0)),
        Kind::Path => {
            assert!(path_wire::is_probe(data));
            // A path probe never decodes unless whole, and no key verifies a random tag
            // (checked against a fixed key: any other is as good).
            if let Some(p) = path_wire::decode_probe(data) {
                assert_eq!(data.len(), path_wire::PROBE_LEN);
                let _ = path_wire::PathKeys::from_material(&[7; 40]).verify(&p);
            }
        }
        Kind::Krpc | Kind::Garbage => {}
    }
    let _ = path_wire::decode_candidates(data);
    if let Some(r) = path_wire::decode_routes(data) {
        // What decodes encodes back to the same bytes.
        assert_eq!(path_wire::encode_routes(&r), data);
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

/// A LAN discovery datagram: the decoder (what it accepts re-encodes to the same bytes,
/// within the limits), then the state machine of a node on one topic taking it, and the
/// input cut into several datagrams from several sources. Panics when an invariant breaks.
pub fn lan_packet(data: &[u8]) {
    use std::net::{Ipv4Addr, SocketAddrV4};
    use std::time::{Duration, Instant};

    use crate::node::lan_machine::{LanMachine, MAX_LAN_CANDIDATES};

    if let Ok(packet) = lan_wire::decode(data) {
        assert!(data.len() <= lan_wire::MAX_PACKET_BYTES);
        assert_eq!(
            lan_wire::encode(&packet),
            data,
            "accepted bytes do not re-encode"
        );
    }
    let mut n = 0u128;
    let mut m = LanMachine::new(
        4000,
        Duration::from_secs(30),
        Box::new(move || {
            n += 1;
            n.to_be_bytes()
        }),
    );
    let now = Instant::now();
    let topic = [7u8; 32];
    m.advertise(now, topic);
    m.seek(now, topic);
    m.set_interfaces(now, vec![Ipv4Addr::new(10, 0, 0, 1)]);
    let _ = m.poll_transmit(now);
    let from = SocketAddrV4::new(
        Ipv4Addr::new(10, 0, 0, data.first().copied().unwrap_or(2)),
        9,
    );
    for (i, chunk) in std::iter::once(data)
        .chain(data.split(|b| *b == 0))
        .enumerate()
    {
        let at = now + Duration::from_millis(i as u64);
        let found = m.on_datagram(at, from, chunk);
        // Nothing without a tag made with the topic's key.
        assert!(found.is_empty(), "a candidate from fuzzed bytes");
        let _ = m.poll_transmit(at);
    }
    let stats = m.stats();
    assert!(stats.candidates <= MAX_LAN_CANDIDATES);
    assert_eq!(stats.matched, 0);
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
        lan_packet(&[]);
        lan_packet(b"PSLD\x01\x01");
    }

    proptest! {
        #[test]
        fn invariants_hold(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            datagram(&bytes);
            stream(&bytes);
            lan_packet(&bytes);
        }
    }
}
