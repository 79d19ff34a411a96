//! What one connection queues to another's writer: a batch of relay frames in one buffer.
//!
//! A reader handles frames in bursts (everything already buffered or readable). The DELIVERs
//! one burst produces for one receiver are written into one buffer and queued as one item, so
//! the receiver's writer wakes once and writes them with one flush instead of once per frame.
//! That hop was the relay's cost per small frame.
//!
//! Layout: each frame is preceded by its length as a little-endian `u32`. Only this module
//! builds and reads batches, so a batch is well formed by construction.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::protocol::{ConnId, DELIVER_OVERHEAD, RoomId, deliver_header};

/// A batch is cut when the next frame would take it over this many bytes (a frame larger
/// than this travels alone). Matches the writer's WebSocket write buffer, so one batch is
/// about one socket write; the send queue's memory bound stays (queue length × largest frame).
pub(super) const BATCH_BYTES: usize = 16 * 1024;

const LEN_BYTES: usize = 4;

/// One or more relay frames for one connection's writer.
#[derive(Clone, Debug)]
pub(super) struct Batch(Bytes);

impl Batch {
    /// A batch of one frame.
    pub(super) fn one(frame: &[u8]) -> Self {
        let mut buf = BytesMut::with_capacity(LEN_BYTES + frame.len());
        put_len(&mut buf, frame.len());
        buf.put_slice(frame);
        Self(buf.freeze())
    }

    /// A batch of one frame whose bytes are `head` then `body` (one copy of the payload).
    pub(super) fn two(head: &[u8], body: &[u8]) -> Self {
        let len = head.len() + body.len();
        let mut buf = BytesMut::with_capacity(LEN_BYTES + len);
        put_len(&mut buf, len);
        buf.put_slice(head);
        buf.put_slice(body);
        Self(buf.freeze())
    }

    /// The bytes it holds, as the memory budget counts them.
    pub(super) fn cost(&self) -> u32 {
        u32::try_from(self.0.len()).unwrap_or(u32::MAX)
    }

    /// The frames, in order, without copying.
    pub(super) fn frames(self) -> impl Iterator<Item = Bytes> {
        let mut rest = self.0;
        std::iter::from_fn(move || {
            if rest.len() < LEN_BYTES {
                return None;
            }
            let len = rest.get_u32_le() as usize;
            // Cannot be short (this module wrote the length); stop rather than panic.
            (rest.len() >= len).then(|| rest.split_to(len))
        })
    }
}

/// DELIVERs for one receiver, gathered during one burst.
#[derive(Debug, Default)]
pub(super) struct BatchBuilder {
    buf: BytesMut,
    frames: usize,
}

impl BatchBuilder {
    /// Whether a DELIVER carrying `payload_len` bytes fits without cutting the batch.
    pub(super) fn fits(&self, payload_len: usize) -> bool {
        self.frames == 0
            || self.buf.len() + LEN_BYTES + DELIVER_OVERHEAD + payload_len <= BATCH_BYTES
    }

    /// Appends a DELIVER frame (the same bytes as `protocol::encode_deliver`).
    pub(super) fn push_deliver(
        &mut self,
        room: &RoomId,
        from: ConnId,
        broadcast: bool,
        payload: &[u8],
    ) {
        let len = DELIVER_OVERHEAD + payload.len();
        // Grown as needed (amortised): a queued batch holds about what it carries, not a
        // 16 KiB block for one small frame.
        self.buf.reserve(LEN_BYTES + len);
        put_len(&mut self.buf, len);
        self.buf.put_slice(&deliver_header(room, from, broadcast));
        self.buf.put_slice(payload);
        self.frames += 1;
    }

    /// Frames gathered so far.
    pub(super) fn frames(&self) -> usize {
        self.frames
    }

    /// Bytes of the frames gathered so far (without the length prefixes).
    pub(super) fn frame_bytes(&self) -> usize {
        self.buf.len() - self.frames * LEN_BYTES
    }

    /// The batch so far; the builder starts over empty (with no buffer). A buffer that grew
    /// well past what it holds is copied to one of its size, so that what a queued batch
    /// pins is what the memory budget charges for it.
    pub(super) fn take(&mut self) -> Batch {
        self.frames = 0;
        let buf = std::mem::take(&mut self.buf);
        if buf.capacity() - buf.len() > buf.len() / 4 {
            return Batch(Bytes::copy_from_slice(&buf));
        }
        Batch(buf.freeze())
    }
}

fn put_len(buf: &mut BytesMut, len: usize) {
    // Frames are bounded by the relay's max frame size, far below 4 GiB.
    buf.put_u32_le(u32::try_from(len).unwrap_or(u32::MAX));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol;

    #[test]
    fn a_batch_yields_its_frames_in_order() {
        let room = [3u8; 32];
        let mut b = BatchBuilder::default();
        let payloads: Vec<Vec<u8>> = (0..50u8).map(|i| vec![i; usize::from(i) * 7]).collect();
        for (i, p) in payloads.iter().enumerate() {
            assert!(b.fits(p.len()));
            b.push_deliver(&room, i as u64, i % 2 == 0, p);
        }
        assert_eq!(b.frames(), 50);
        let expected: Vec<Vec<u8>> = payloads
            .iter()
            .enumerate()
            .map(|(i, p)| protocol::encode_deliver(&room, i as u64, i % 2 == 0, p))
            .collect();
        assert_eq!(
            b.frame_bytes(),
            expected.iter().map(Vec::len).sum::<usize>()
        );
        let got: Vec<Vec<u8>> = b.take().frames().map(|f| f.to_vec()).collect();
        assert_eq!(got, expected);
        assert_eq!(b.frames(), 0);
        assert_eq!(b.take().frames().count(), 0);
    }

    #[test]
    fn batches_are_cut_at_the_size_limit_but_a_big_frame_fits_an_empty_one() {
        let room = [0u8; 32];
        let mut b = BatchBuilder::default();
        assert!(b.fits(BATCH_BYTES * 4), "an empty batch takes any frame");
        b.push_deliver(&room, 1, false, &[0; 1000]);
        assert!(!b.fits(BATCH_BYTES));
        let mut n = 1;
        while b.fits(1000) {
            b.push_deliver(&room, 1, false, &[0; 1000]);
            n += 1;
        }
        assert!(b.buf.len() <= BATCH_BYTES);
        assert_eq!(b.take().frames().count(), n);
    }

    #[test]
    fn one_frame_batches_round_trip() {
        let frame = b"\x21some frame".to_vec();
        let got: Vec<Bytes> = Batch::one(&frame).frames().collect();
        assert_eq!(got, vec![Bytes::from(frame)]);
        assert_eq!(Batch::one(&[]).frames().count(), 1);
    }
}
