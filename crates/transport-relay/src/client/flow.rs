//! Per-session flow control: one [`Window`] type for both directions, and the credit a reader
//! owes ([`Owed`]). Pure arithmetic; the sizes are in `docs/relay-protocol.md`.

use pluresdb_sync_core::MAX_MESSAGE_BYTES;

use super::wire::{self, NOISE_MAX};
use crate::protocol::MIN_MAX_FRAME_BYTES;

/// The receive window each side grants its peer when a session starts, in credit units
/// (peer-frame bytes plus 64 per frame): 18 MiB, so that one message of the largest size
/// ([`MAX_MESSAGE_BYTES`], 16 MiB, cut into chunks for the smallest relay frame limit, with the
/// per-frame costs) always fits in an empty window: two peers that each send one such message
/// before reading complete both sends (a smaller window deadlocked them). It also bounds what
/// one session can hold queued while the application does not read it (memory stays bounded
/// against a peer that ignores it: sending beyond it ends the session).
/// Measured through a loopback relay (encrypted, 2 cores): 4 MiB cost 8% of the throughput of
/// 64 KiB messages, 8 MiB about 4%, 16 MiB nothing.
///
/// Public because it is the contract of `Connection::send`: how far a sender can get ahead of
/// a peer that does not read before its `send` waits.
pub const FLOW_WINDOW_BYTES: u32 = 18 * 1024 * 1024;

/// Credit units charged per peer frame on top of its bytes, so that a flood of tiny frames
/// (an empty message is a 2- or 18-byte frame) is bounded by the window too: 64 covers a queue
/// slot and the allocation of each queued frame.
pub(crate) const FLOW_FRAME_OVERHEAD: u64 = 64;

/// The receiver returns credit once the application consumed this much (a quarter of the
/// window): few CREDIT frames (one per 4.5 MiB read), and the sender never runs dry while the
/// reader keeps up (it always has at least three quarters of the window). An eighth measured
/// the same.
pub(crate) const FLOW_GRANT_THRESHOLD: u64 = FLOW_WINDOW_BYTES as u64 / 4;

/// The credit the largest data frame can use: a chunk is at most `NOISE_MAX - TAG_LEN - 1`
/// bytes (see [`wire::chunk_data_max`]), so its frame at most `NOISE_MAX + 1`. A sender with
/// less window left than this may be waiting for credit.
pub(crate) const LARGEST_FRAME_COST: u64 = NOISE_MAX as u64 + 1 + FLOW_FRAME_OVERHEAD;

/// The smallest window a peer may announce: two of the largest frames. Smaller could leave a
/// sender unable to send even one frame.
pub(crate) const FLOW_MIN_WINDOW_BYTES: u32 =
    2 * (NOISE_MAX as u32 + 2 + FLOW_FRAME_OVERHEAD as u32);

// The window this side grants must be one a peer accepts.
const _: () = assert!(FLOW_WINDOW_BYTES >= FLOW_MIN_WINDOW_BYTES);

/// The credit one message of `MAX_MESSAGE_BYTES` uses when the relay frame limit is
/// `max_frame` (encrypted, the smaller chunks), plus one ABORT that may precede it.
pub(crate) const fn max_message_cost(max_frame: usize) -> u64 {
    let per = wire::chunk_data_max_const(max_frame, true);
    let chunks = MAX_MESSAGE_BYTES.div_ceil(per) + 1;
    (MAX_MESSAGE_BYTES + chunks * (2 + wire::TAG_LEN)) as u64 + chunks as u64 * FLOW_FRAME_OVERHEAD
}

// One largest message always fits in an empty window, whatever frame limit the relay has.
const _: () = assert!(FLOW_WINDOW_BYTES as u64 >= max_message_cost(MIN_MAX_FRAME_BYTES));

/// The credit a data (or ABORT) peer frame of `frame_len` bytes uses. CLOSE and CREDIT frames
/// use none: a session can always be closed and credit always returned.
pub(crate) fn frame_cost(frame_len: usize) -> u64 {
    frame_len as u64 + FLOW_FRAME_OVERHEAD
}

/// One direction of a session's flow control: the credit the receiving side allowed in total
/// (its initial window plus every CREDIT) and the credit the sending side used.
///
/// Both ends keep one with the same arithmetic: the sender (a connection's `send`) spends
/// before each frame and waits while the next does not fit; the receiver (the session
/// machine) spends on each arriving frame and ends the session when one does not fit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Window {
    limit: u64,
    used: u64,
}

/// A frame that does not fit in its [`Window`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Exceeded {
    /// Credit units granted in total.
    pub(crate) limit: u64,
    /// What using the frame would have made the total.
    pub(crate) needed: u64,
}

impl Window {
    /// A window of `initial` credit units, none used.
    pub(crate) fn new(initial: u32) -> Self {
        Self {
            limit: u64::from(initial),
            used: 0,
        }
    }

    /// Credit units granted in total.
    pub(crate) fn limit(&self) -> u64 {
        self.limit
    }

    /// Credit units still free.
    pub(crate) fn remaining(&self) -> u64 {
        self.limit.saturating_sub(self.used)
    }

    /// Whether a frame of `cost` fits now.
    pub(crate) fn fits(&self, cost: u64) -> bool {
        self.remaining() >= cost
    }

    /// Uses `cost` units, or leaves the window as it was if they do not fit.
    pub(crate) fn spend(&mut self, cost: u64) -> Result<(), Exceeded> {
        if self.fits(cost) {
            self.used += cost;
            Ok(())
        } else {
            Err(Exceeded {
                limit: self.limit,
                needed: self.used.saturating_add(cost),
            })
        }
    }

    /// Grants `n` more units (a CREDIT).
    pub(crate) fn grant(&mut self, n: u64) {
        self.limit = self.limit.saturating_add(n);
    }

    /// Raises the limit to the receiver's total `limit` (the sender's copy learns totals, not
    /// increments). Never lowers it.
    pub(crate) fn raise_to(&mut self, limit: u64) {
        self.limit = self.limit.max(limit);
    }
}

/// Credit a reader consumed and has not returned yet: returned in one CREDIT once it reaches
/// [`FLOW_GRANT_THRESHOLD`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Owed(u64);

impl Owed {
    /// The application consumed a frame of `cost`: the credit to return now, if it is due.
    pub(crate) fn consumed(&mut self, cost: u64) -> Option<u64> {
        self.0 = self.0.saturating_add(cost);
        (self.0 >= FLOW_GRANT_THRESHOLD).then(|| std::mem::take(&mut self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_takes_what_fits_and_refuses_the_rest_unchanged() {
        let mut w = Window::new(100);
        assert!(w.spend(60).is_ok());
        assert_eq!(w.remaining(), 40);
        assert_eq!(
            w.spend(41),
            Err(Exceeded {
                limit: 100,
                needed: 101
            })
        );
        assert_eq!(w.remaining(), 40, "a refused frame uses nothing");
        assert!(w.spend(40).is_ok());
        assert!(!w.fits(1));
        w.grant(10);
        assert_eq!((w.limit(), w.remaining()), (110, 10));
        w.grant(u64::MAX);
        assert_eq!(w.limit(), u64::MAX, "grants saturate");
    }

    #[test]
    fn the_senders_copy_follows_the_receivers_totals() {
        let mut receiver = Window::new(FLOW_WINDOW_BYTES);
        let mut sender = Window::new(FLOW_WINDOW_BYTES);
        let cost = frame_cost(65_000);
        while sender.fits(cost) {
            sender.spend(cost).unwrap();
            receiver.spend(cost).unwrap();
        }
        // The receiver grants what its reader consumed; the sender learns the new total.
        receiver.grant(3 * cost);
        sender.raise_to(receiver.limit());
        sender.raise_to(receiver.limit() - 1); // a stale total never lowers it
        assert_eq!(sender.remaining(), receiver.remaining());
        for _ in 0..3 {
            sender.spend(cost).unwrap();
            receiver.spend(cost).unwrap();
        }
        assert!(!sender.fits(cost) && !receiver.fits(cost));
        assert_eq!(sender, receiver);
    }

    #[test]
    fn credit_is_returned_in_quarters_of_the_window() {
        let mut owed = Owed::default();
        let mut returned = 0;
        let mut frames = 0;
        while returned < u64::from(FLOW_WINDOW_BYTES) {
            frames += 1;
            if let Some(n) = owed.consumed(frame_cost(65_000)) {
                assert!(n >= FLOW_GRANT_THRESHOLD);
                returned += n;
            }
        }
        assert!(frames > 4 * (FLOW_GRANT_THRESHOLD / frame_cost(65_000)));
        assert_eq!(owed.consumed(1), None, "little owed: nothing returned yet");
    }

    #[test]
    fn the_window_holds_the_largest_frames_and_the_grant_leaves_room() {
        let largest = frame_cost(wire::chunk_frame_len(
            wire::chunk_data_max(1 << 20, true),
            true,
        ));
        assert!(largest <= LARGEST_FRAME_COST);
        assert!(u64::from(FLOW_MIN_WINDOW_BYTES) >= 2 * largest);
        assert!(u64::from(FLOW_WINDOW_BYTES) - FLOW_GRANT_THRESHOLD >= largest);
        assert!(u64::from(FLOW_WINDOW_BYTES) >= max_message_cost(MIN_MAX_FRAME_BYTES));
    }
}
