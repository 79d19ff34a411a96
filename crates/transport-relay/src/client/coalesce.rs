//! Coalescing datagram frames: the datagram link's writer joins consecutive DATAGRAM frames
//! to the same member of the same room into one frame, up to the relay's frame limit, when
//! the result is still a batch the receiver can split (datagrams of one segment size, only
//! the last shorter). quinn hands the socket at most 10 packets per transmit (~14 KB), so
//! without this each relay frame carried ~14 KB; joined, a frame carries up to 64 KiB and
//! the WebSocket layers, the relay and the receiver handle a quarter of the frames.

use std::time::Duration;

use futures_util::SinkExt;
use futures_util::stream::SplitSink;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use super::dial::WsStream;
use crate::protocol::{DATAGRAM_OVERHEAD, kind};

/// The segment size a DATAGRAM frame's payload is cut at, when all its datagrams are full
/// size (so another datagram of that size, or shorter, may follow): the declared segment,
/// or the length of a single datagram. `None`: not a DATAGRAM frame, empty, or its last
/// datagram is short.
fn full_stride(frame: &[u8]) -> Option<usize> {
    if frame.first() != Some(&kind::DATAGRAM) || frame.len() <= DATAGRAM_OVERHEAD {
        return None;
    }
    let payload = frame.len() - DATAGRAM_OVERHEAD;
    let declared = usize::from(u16::from_be_bytes([frame[41], frame[42]]));
    let stride = if declared == 0 { payload } else { declared };
    (stride > 0 && stride <= usize::from(u16::MAX) && payload.is_multiple_of(stride))
        .then_some(stride)
}

/// Appends `next`'s datagrams to the DATAGRAM frame `acc` when both go to the same member of
/// the same room, every datagram in `acc` has the size `next` is cut at (`next` holds
/// datagrams of that size, or is a single datagram no longer), and the result fits
/// `max_frame`; `acc` then declares that segment size. `false`: nothing changed.
pub(crate) fn merge(acc: &mut Vec<u8>, next: &[u8], max_frame: usize) -> bool {
    let Some(stride) = full_stride(acc) else {
        return false;
    };
    if next.first() != Some(&kind::DATAGRAM)
        || next.len() <= DATAGRAM_OVERHEAD
        || next[1..41] != acc[1..41]
        || acc.len() + (next.len() - DATAGRAM_OVERHEAD) > max_frame
    {
        return false;
    }
    let payload = next.len() - DATAGRAM_OVERHEAD;
    let declared = usize::from(u16::from_be_bytes([next[41], next[42]]));
    let fits = if declared == 0 {
        payload <= stride
    } else {
        declared == stride
    };
    if !fits {
        return false;
    }
    // `full_stride` checked it fits a u16.
    let segment = u16::try_from(stride).unwrap_or(0).to_be_bytes();
    acc[41..43].copy_from_slice(&segment);
    acc.extend_from_slice(&next[DATAGRAM_OVERHEAD..]);
    true
}

/// The datagram link's writer: writes the socket task's frames in order, joining
/// consecutive DATAGRAM frames already queued (see [`merge`]) into frames of at most
/// `max_frame` bytes, and flushes when the queue is empty. Ends with a close (sent, or the
/// channel closed).
pub(crate) async fn writer(
    mut sink: SplitSink<WsStream, Message>,
    mut rx: mpsc::Receiver<Message>,
    max_frame: usize,
) {
    let mut held: Option<Message> = None;
    loop {
        let first = match held.take() {
            Some(m) => m,
            None => match rx.recv().await {
                Some(m) => m,
                None => break,
            },
        };
        let mut m = first;
        let mut closing = false;
        loop {
            // Join what is already queued behind a datagram frame.
            if let Message::Binary(b) = &m
                && full_stride(b).is_some()
            {
                let mut acc: Option<Vec<u8>> = None;
                while let Ok(next) = rx.try_recv() {
                    let joined = match &next {
                        Message::Binary(n) => {
                            let acc = acc.get_or_insert_with(|| {
                                let mut v = Vec::with_capacity(max_frame);
                                v.extend_from_slice(b);
                                v
                            });
                            merge(acc, n, max_frame)
                        }
                        _ => false,
                    };
                    if !joined {
                        held = Some(next);
                        break;
                    }
                }
                if let Some(acc) = acc {
                    m = Message::Binary(acc.into());
                }
            }
            closing = closing || matches!(m, Message::Close(_));
            if sink.feed(m).await.is_err() {
                return;
            }
            if closing {
                break;
            }
            match held.take().map(Ok).unwrap_or_else(|| rx.try_recv()) {
                Ok(next) => m = next,
                Err(_) => break,
            }
        }
        if sink.flush().await.is_err() || closing {
            let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
            return;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::datagram::datagrams_of;
    use crate::protocol::encode_datagram;
    use proptest::prelude::*;

    fn frame(to: u64, segment: u16, payload: &[u8]) -> Vec<u8> {
        encode_datagram(&[5; 32], to, segment, payload)
    }

    fn segment_of(f: &[u8]) -> u16 {
        u16::from_be_bytes([f[41], f[42]])
    }

    #[test]
    fn full_batches_to_one_member_are_joined() {
        let mut acc = frame(9, 4, &[1; 8]);
        assert!(merge(&mut acc, &frame(9, 4, &[2; 7]), 1000));
        assert_eq!(segment_of(&acc), 4);
        assert_eq!(
            &acc[DATAGRAM_OVERHEAD..],
            &[1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2]
        );
        // The last datagram is short now: nothing more joins.
        assert!(!merge(&mut acc, &frame(9, 4, &[3; 4]), 1000));
        // Single datagrams of one size become a batch of that size.
        let mut acc = frame(9, 0, &[1; 5]);
        assert!(merge(&mut acc, &frame(9, 0, &[2; 5]), 1000));
        assert!(merge(&mut acc, &frame(9, 5, &[3; 10]), 1000));
        assert!(merge(&mut acc, &frame(9, 0, &[4; 2]), 1000));
        assert_eq!(segment_of(&acc), 5);
        assert_eq!(acc.len(), DATAGRAM_OVERHEAD + 22);
    }

    #[test]
    fn other_members_sizes_and_kinds_are_not_joined() {
        let mut acc = frame(9, 4, &[1; 8]);
        let before = acc.clone();
        assert!(
            !merge(&mut acc, &frame(8, 4, &[2; 8]), 1000),
            "another member"
        );
        let mut other_room = encode_datagram(&[6; 32], 9, 4, &[2; 8]);
        assert!(!merge(&mut acc, &other_room, 1000), "another room");
        other_room[0] = kind::SEND;
        assert!(!merge(&mut acc, &other_room, 1000), "not a datagram");
        assert!(
            !merge(&mut acc, &frame(9, 3, &[2; 6]), 1000),
            "another segment size"
        );
        assert!(
            !merge(&mut acc, &frame(9, 0, &[2; 5]), 1000),
            "a longer datagram"
        );
        assert!(
            !merge(&mut acc, &frame(9, 0, &[]), 1000),
            "an empty datagram"
        );
        assert!(
            !merge(&mut acc, &frame(9, 4, &[2; 8]), DATAGRAM_OVERHEAD + 15),
            "too large"
        );
        assert_eq!(acc, before, "unchanged");
        let mut short = frame(9, 4, &[1; 7]);
        assert!(
            !merge(&mut short, &frame(9, 4, &[2; 4]), 1000),
            "short last datagram"
        );
        assert!(
            merge(&mut acc, &frame(9, 4, &[2; 8]), DATAGRAM_OVERHEAD + 16),
            "just fits"
        );
    }

    proptest! {
        /// Whatever frames are queued, joining keeps every frame within the limit, and the
        /// receiver splits out exactly the datagrams sent, to each member in order.
        #[test]
        fn joined_frames_carry_the_same_datagrams_in_order(
            frames in proptest::collection::vec((0u64..2, 0u16..6, 0usize..20, 0usize..6), 1..30),
            max_frame in DATAGRAM_OVERHEAD + 1..DATAGRAM_OVERHEAD + 60,
        ) {
            let mut sent: Vec<(u64, Vec<u8>)> = Vec::new();
            let mut queued: Vec<Vec<u8>> = Vec::new();
            for (i, (to, segment, len, last)) in frames.into_iter().enumerate() {
                let seg = usize::from(segment);
                let mut payload = Vec::new();
                let len = len.checked_div(seg).map_or(len, |n| n * seg + last.min(seg));
                for j in 0..len {
                    payload.push((i * 31 + j) as u8);
                }
                if payload.is_empty() || DATAGRAM_OVERHEAD + payload.len() > max_frame {
                    continue;
                }
                let f = frame(to, segment, &payload);
                for d in datagrams_of(segment, &payload) {
                    sent.push((to, d.to_vec()));
                }
                queued.push(f);
            }
            let mut out: Vec<Vec<u8>> = Vec::new();
            for f in queued {
                let joined = out.last_mut().is_some_and(|acc| merge(acc, &f, max_frame));
                if !joined {
                    out.push(f);
                }
            }
            let mut got = Vec::new();
            for f in &out {
                prop_assert!(f.len() <= max_frame);
                let to = u64::from_be_bytes(f[33..41].try_into().unwrap());
                for d in datagrams_of(segment_of(f), &f[DATAGRAM_OVERHEAD..]) {
                    got.push((to, d.to_vec()));
                }
            }
            prop_assert_eq!(got, sent);
        }
    }
}
