//! The few bytes of BitTorrent KRPC (BEP 5), BEP 42 and BEP 43 needed to learn the data
//! socket's public address: a read-only `ping` query, and the `t` and `ip` keys of a reply.
//! Pure functions.

use std::net::{Ipv4Addr, SocketAddrV4};

/// Deepest nesting the reply parser follows; KRPC replies nest two levels.
const MAX_DEPTH: usize = 8;

/// Encodes a KRPC `ping` query with a 4-byte transaction id (the `mainline` crate drops other
/// lengths) and a node id, marked read-only (`ro: 1`, BEP 43): the data socket is no DHT node,
/// and a node that took it for one would add it to its routing table and list it to others,
/// whose queries to it would then wait out their timeouts. Keys in bencode's sorted order.
pub(crate) fn encode_ping(txid: [u8; 4], node_id: [u8; 20]) -> Vec<u8> {
    let mut out = Vec::with_capacity(66);
    out.extend_from_slice(b"d1:ad2:id20:");
    out.extend_from_slice(&node_id);
    out.extend_from_slice(b"e1:q4:ping2:roi1e1:t4:");
    out.extend_from_slice(&txid);
    out.extend_from_slice(b"1:y1:qe");
    out
}

/// What a KRPC reply tells us.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Reply {
    /// The transaction id.
    pub(crate) txid: Vec<u8>,
    /// The BEP 42 `ip` key: our address as the replying node saw it.
    pub(crate) seen_as: Option<SocketAddrV4>,
}

/// Why bytes are not a KRPC reply.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum KrpcError {
    #[error("not a bencoded dictionary at offset {0}")]
    Malformed(usize),
    #[error("nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("not a reply (no y=r)")]
    NotAReply,
    #[error("no transaction id")]
    NoTxid,
}

/// Decodes the top level of a KRPC message, keeping `t`, `y` and `ip`.
pub(crate) fn decode_reply(bytes: &[u8]) -> Result<Reply, KrpcError> {
    if bytes.first() != Some(&b'd') {
        return Err(KrpcError::Malformed(0));
    }
    let mut pos = 1;
    let (mut txid, mut kind, mut ip) = (None, None, None);
    loop {
        match bytes.get(pos) {
            Some(b'e') => {
                pos += 1;
                break;
            }
            Some(_) => {}
            None => return Err(KrpcError::Malformed(pos)),
        }
        let (key, after_key) = byte_string(bytes, pos)?;
        let value_end = skip_value(bytes, after_key, 0)?;
        let value = &bytes[after_key..value_end];
        match key {
            b"t" => txid = Some(byte_string(value, 0)?.0.to_vec()),
            b"y" => kind = Some(byte_string(value, 0)?.0.to_vec()),
            b"ip" => {
                let raw = byte_string(value, 0)?.0;
                if let [a, b, c, d, p1, p2] = *raw {
                    ip = Some(SocketAddrV4::new(
                        Ipv4Addr::new(a, b, c, d),
                        u16::from_be_bytes([p1, p2]),
                    ));
                }
            }
            _ => {}
        }
        pos = value_end;
    }
    if pos != bytes.len() {
        return Err(KrpcError::Malformed(pos));
    }
    if kind.as_deref() != Some(b"r") {
        return Err(KrpcError::NotAReply);
    }
    Ok(Reply {
        txid: txid.ok_or(KrpcError::NoTxid)?,
        seen_as: ip,
    })
}

/// Reads a `<len>:<bytes>` string at `pos`; returns it and the offset after it.
fn byte_string(bytes: &[u8], pos: usize) -> Result<(&[u8], usize), KrpcError> {
    let colon = bytes
        .get(pos..)
        .and_then(|rest| rest.iter().take(8).position(|&b| b == b':'))
        .ok_or(KrpcError::Malformed(pos))?;
    let digits = &bytes[pos..pos + colon];
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(KrpcError::Malformed(pos));
    }
    let len: usize = std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(KrpcError::Malformed(pos))?;
    let start = pos + colon + 1;
    let end = start.checked_add(len).ok_or(KrpcError::Malformed(pos))?;
    let s = bytes.get(start..end).ok_or(KrpcError::Malformed(pos))?;
    Ok((s, end))
}

/// Skips one bencoded value at `pos`; returns the offset after it.
fn skip_value(bytes: &[u8], pos: usize, depth: usize) -> Result<usize, KrpcError> {
    if depth > MAX_DEPTH {
        return Err(KrpcError::TooDeep);
    }
    match bytes.get(pos) {
        Some(b'i') => {
            let end = bytes[pos..]
                .iter()
                .position(|&b| b == b'e')
                .ok_or(KrpcError::Malformed(pos))?;
            Ok(pos + end + 1)
        }
        Some(b'l' | b'd') => {
            let is_dict = bytes[pos] == b'd';
            let mut p = pos + 1;
            loop {
                match bytes.get(p) {
                    Some(b'e') => return Ok(p + 1),
                    Some(_) => {
                        if is_dict {
                            p = byte_string(bytes, p)?.1;
                        }
                        p = skip_value(bytes, p, depth + 1)?;
                    }
                    None => return Err(KrpcError::Malformed(p)),
                }
            }
        }
        Some(b'0'..=b'9') => Ok(byte_string(bytes, pos)?.1),
        _ => Err(KrpcError::Malformed(pos)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn decodes_a_mainline_ping_reply() {
        let mut reply = b"d2:ip6:".to_vec();
        reply.extend_from_slice(&[127, 0, 0, 1, 0x1a, 0xe1]);
        reply.extend_from_slice(b"1:rd2:id20:");
        reply.extend_from_slice(&[7u8; 20]);
        reply.extend_from_slice(b"e1:t4:abcd1:v4:RS\x00\x011:y1:re");
        let r = decode_reply(&reply).unwrap();
        assert_eq!(r.txid, b"abcd");
        assert_eq!(r.seen_as, Some("127.0.0.1:6881".parse().unwrap()));
    }

    #[test]
    fn the_ping_is_a_sorted_read_only_query() {
        let ping = encode_ping(*b"wxyz", [b'i'; 20]);
        assert_eq!(
            ping,
            b"d1:ad2:id20:iiiiiiiiiiiiiiiiiiiie1:q4:ping2:roi1e1:t4:wxyz1:y1:qe".to_vec()
        );
        assert_eq!(
            skip_value(&ping, 0, 0),
            Ok(ping.len()),
            "one well-formed value"
        );
    }

    #[test]
    fn rejects_queries_and_junk() {
        let ping = encode_ping(*b"wxyz", [1; 20]);
        assert_eq!(decode_reply(&ping), Err(KrpcError::NotAReply));
        assert!(decode_reply(b"").is_err());
        assert!(decode_reply(b"d").is_err());
        assert!(decode_reply(b"d1:y1:re").is_err());
        assert!(decode_reply(b"d1:t4:abcd1:y1:ree").is_err());
        assert!(decode_reply(&[b'l'; 100]).is_err());
        let deep = format!("d1:a{}{}e", "l".repeat(20), "e".repeat(20));
        assert_eq!(decode_reply(deep.as_bytes()), Err(KrpcError::TooDeep));
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_reply(&bytes);
        }

        #[test]
        fn never_panics_on_almost_bencode(s in "[dlie0-9:a-z]{0,80}") {
            let _ = decode_reply(s.as_bytes());
        }

        #[test]
        fn reply_roundtrip(txid in any::<[u8; 4]>(), ip in any::<[u8; 4]>(), port in any::<u16>()) {
            let mut reply = b"d2:ip6:".to_vec();
            reply.extend_from_slice(&ip);
            reply.extend_from_slice(&port.to_be_bytes());
            reply.extend_from_slice(b"1:rd2:id20:aaaaaaaaaaaaaaaaaaaae1:t4:");
            reply.extend_from_slice(&txid);
            reply.extend_from_slice(b"1:y1:re");
            let r = decode_reply(&reply).unwrap();
            prop_assert_eq!(r.txid, txid.to_vec());
            prop_assert_eq!(r.seen_as, Some(SocketAddrV4::new(ip.into(), port)));
        }
    }
}
