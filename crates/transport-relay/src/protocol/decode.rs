//! Decoding one relay frame: a pure function over bytes that never panics and allocates at
//! most its input's length.

use super::{
    ClientFrame, ConnId, DATAGRAM_OVERHEAD, Frame, FrameError, MAX_ERROR_MESSAGE_BYTES, RelayFrame,
    RoomId, kind,
};

/// A DATAGRAM_FROM frame viewed in place (the receiving client's hot path): agrees with
/// [`decode`] on every input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DatagramFrom<'a> {
    /// The room.
    pub room: RoomId,
    /// The sender.
    pub from: ConnId,
    /// The segment size (0: one datagram).
    pub segment: u16,
    /// The datagrams, borrowed from the input.
    pub payload: &'a [u8],
}

/// Views a DATAGRAM_FROM frame in place; `None` for any other or malformed input.
pub fn decode_datagram_from(bytes: &[u8]) -> Option<DatagramFrom<'_>> {
    if bytes.first() != Some(&kind::DATAGRAM_FROM) || bytes.len() < DATAGRAM_OVERHEAD {
        return None;
    }
    Some(DatagramFrom {
        room: bytes[1..33].try_into().ok()?,
        from: u64::from_be_bytes(bytes[33..41].try_into().ok()?),
        segment: u16::from_be_bytes(bytes[41..43].try_into().ok()?),
        payload: &bytes[DATAGRAM_OVERHEAD..],
    })
}

struct Reader<'a> {
    kind: u8,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        match end {
            Some(end) => {
                let s = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(FrameError::Truncated {
                kind: self.kind,
                needed: self.pos.saturating_add(n),
                got: self.bytes.len(),
            }),
        }
    }
    fn room(&mut self) -> Result<RoomId, FrameError> {
        let mut r = [0u8; 32];
        r.copy_from_slice(self.take(32)?);
        Ok(r)
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(b))
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_be_bytes(b))
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        let mut b = [0u8; 2];
        b.copy_from_slice(self.take(2)?);
        Ok(u16::from_be_bytes(b))
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
    fn rest(&mut self) -> &'a [u8] {
        let s = &self.bytes[self.pos..];
        self.pos = self.bytes.len();
        s
    }
    fn finish(&self) -> Result<(), FrameError> {
        if self.pos == self.bytes.len() {
            Ok(())
        } else {
            Err(FrameError::Trailing {
                kind: self.kind,
                extra: self.bytes.len() - self.pos,
            })
        }
    }
}

/// Decodes one frame. Pure: never panics, allocates at most the input's length.
pub fn decode(bytes: &[u8]) -> Result<Frame, FrameError> {
    let (&kind, body) = bytes.split_first().ok_or(FrameError::Empty)?;
    let mut r = Reader {
        kind,
        bytes: body,
        pos: 0,
    };
    let frame = match kind {
        kind::JOIN => Frame::Client(ClientFrame::Join { room: r.room()? }),
        kind::LEAVE => Frame::Client(ClientFrame::Leave { room: r.room()? }),
        kind::SEND => Frame::Client(ClientFrame::Send {
            room: r.room()?,
            to: r.u64()?,
            payload: r.rest().to_vec(),
        }),
        kind::BROADCAST => Frame::Client(ClientFrame::Broadcast {
            room: r.room()?,
            payload: r.rest().to_vec(),
        }),
        kind::DATAGRAM => Frame::Client(ClientFrame::Datagram {
            room: r.room()?,
            to: r.u64()?,
            segment: r.u16()?,
            payload: r.rest().to_vec(),
        }),
        kind::DATAGRAM_FROM => Frame::Relay(RelayFrame::Datagram {
            room: r.room()?,
            from: r.u64()?,
            segment: r.u16()?,
            payload: r.rest().to_vec(),
        }),
        kind::PING => Frame::Ping(r.u64()?),
        kind::PONG => Frame::Pong(r.u64()?),
        kind::WELCOME => Frame::Relay(RelayFrame::Welcome {
            conn: r.u64()?,
            max_frame: r.u32()?,
            max_rooms: r.u32()?,
            max_peers: r.u32()?,
        }),
        kind::JOINED => {
            let room = r.room()?;
            let count = r.u32()?;
            let ids = r.rest();
            if !ids.len().is_multiple_of(8) || (ids.len() / 8) as u64 != u64::from(count) {
                return Err(FrameError::BadCount {
                    count,
                    got: ids.len(),
                });
            }
            let peers = ids
                .chunks_exact(8)
                .map(|c| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(c);
                    u64::from_be_bytes(b)
                })
                .collect();
            Frame::Relay(RelayFrame::Joined { room, peers })
        }
        kind::PEER_JOINED => Frame::Relay(RelayFrame::PeerJoined {
            room: r.room()?,
            peer: r.u64()?,
        }),
        kind::PEER_LEFT => Frame::Relay(RelayFrame::PeerLeft {
            room: r.room()?,
            peer: r.u64()?,
        }),
        kind::DELIVER => {
            let room = r.room()?;
            let from = r.u64()?;
            let flags = r.u8()?;
            if flags & !1 != 0 {
                return Err(FrameError::BadFlags { kind, flags });
            }
            Frame::Relay(RelayFrame::Deliver {
                room,
                from,
                broadcast: flags & 1 == 1,
                payload: r.rest().to_vec(),
            })
        }
        kind::ERROR => {
            let code = r.u16()?;
            let about = r.u8()?;
            let room = r.room()?;
            let text = r.rest();
            if text.len() > MAX_ERROR_MESSAGE_BYTES {
                return Err(FrameError::BadMessage(format!(
                    "{} bytes exceeds {MAX_ERROR_MESSAGE_BYTES}",
                    text.len()
                )));
            }
            let message = std::str::from_utf8(text)
                .map_err(|e| FrameError::BadMessage(e.to_string()))?
                .to_owned();
            Frame::Relay(RelayFrame::Error {
                code,
                about,
                room,
                message,
            })
        }
        other => return Err(FrameError::UnknownType(other)),
    };
    r.finish()?;
    Ok(frame)
}
