//! The socket task's own frames towards the relay (handshakes, CLOSE, CREDIT, REJECT, JOIN,
//! PING/PONG): queued without ever waiting, in order, within a budget. Connections queue their
//! data frames on the same bounded channel themselves (and wait for room there).

use std::collections::VecDeque;

use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

/// Frames towards the relay socket, shared by every connection of the transport.
pub(crate) const OUTBOUND_QUEUE_FRAMES: usize = 256;
/// Most frames of the socket task's own waiting for room in the shared queue. Past it the
/// socket task stops reading the relay (every frame it reads may need an answer), so a relay
/// that stops reading us cannot make us buffer without bound; its timers keep running, so such
/// a relay is given up after the idle timeout. Each frame is small (at most a few hundred
/// bytes), so this holds well under a megabyte.
pub(crate) const MAX_PENDING_FRAMES: usize = 1024;

/// The socket task's side of the outbound queue.
pub(crate) struct Outbound {
    tx: mpsc::Sender<Message>,
    pending: VecDeque<Message>,
}

impl Outbound {
    /// No socket yet: frames are dropped.
    pub(crate) fn dead() -> Self {
        Self {
            tx: mpsc::channel(1).0,
            pending: VecDeque::new(),
        }
    }

    /// Frames now go to `tx` (a new socket); those for the old one are dropped.
    pub(crate) fn replace(&mut self, tx: mpsc::Sender<Message>) {
        self.tx = tx;
        self.pending.clear();
    }

    /// The shared queue, for connections.
    pub(crate) fn sender(&self) -> mpsc::Sender<Message> {
        self.tx.clone()
    }

    /// Queues `m` after every frame queued before it.
    pub(crate) fn push(&mut self, m: Message) {
        self.pending.push_back(m);
        self.flush();
    }

    /// Moves what fits into the shared queue now.
    fn flush(&mut self) {
        while let Some(m) = self.pending.pop_front() {
            match self.tx.try_send(m) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(m)) => {
                    self.pending.push_front(m);
                    return;
                }
                // The writer is gone with its socket: nothing to send to.
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.pending.clear();
                    return;
                }
            }
        }
    }

    /// Whether frames wait for room in the shared queue; then [`Outbound::room`] is worth
    /// awaiting.
    pub(crate) fn waiting(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Whether the socket task may read more from the relay (its own frames are within budget).
    pub(crate) fn may_read(&self) -> bool {
        self.pending.len() < MAX_PENDING_FRAMES
    }

    /// A slot in the shared queue (a sender clone is moved in, so the wait borrows nothing).
    pub(crate) fn room(
        &self,
    ) -> impl Future<Output = Result<mpsc::OwnedPermit<Message>, mpsc::error::SendError<()>>> + use<>
    {
        self.tx.clone().reserve_owned()
    }

    /// Sends the oldest waiting frame through `permit`, then what else fits.
    pub(crate) fn send_reserved(&mut self, permit: mpsc::OwnedPermit<Message>) {
        if let Some(m) = self.pending.pop_front() {
            permit.send(m);
        }
        self.flush();
    }

    /// Waits until every waiting frame is in the shared queue (for a clean disconnect).
    pub(crate) async fn drain(&mut self) {
        while let Some(m) = self.pending.pop_front() {
            if self.tx.send(m).await.is_err() {
                self.pending.clear();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: u8) -> Message {
        Message::Binary(vec![n].into())
    }

    #[tokio::test]
    async fn frames_wait_in_order_and_reading_stops_past_the_budget() {
        let (tx, mut rx) = mpsc::channel(2);
        let mut out = Outbound::dead();
        out.replace(tx);
        for n in 0..5 {
            out.push(frame(n));
        }
        assert!(out.waiting() && out.may_read());
        for _ in 0..MAX_PENDING_FRAMES {
            out.push(frame(9));
        }
        assert!(!out.may_read(), "past the budget the relay is not read");
        assert_eq!(rx.recv().await, Some(frame(0)));
        let permit = out.room().await.unwrap();
        out.send_reserved(permit);
        assert_eq!(rx.recv().await, Some(frame(1)));
        assert_eq!(rx.recv().await, Some(frame(2)));
        // A lost socket drops what waited.
        drop(rx);
        out.push(frame(7));
        assert!(!out.waiting());
    }
}
