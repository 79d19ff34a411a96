//! The bounded queues of application messages: out to one peer (an [`Outbox`], bounded in
//! messages and bytes; full means the peer is cut), and in from every peer ([`Messages`],
//! bounded in messages and bytes; full means the bridge stops reading from the peers that
//! send more until the application catches up).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pluresdb_sync_core::PeerId;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::report::CutReason;

/// Why an [`Outbox`] did not queue a message.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PushError {
    /// Full (at once, or still after waiting): the peer is not keeping up.
    Full(CutReason),
    /// The link is gone.
    Closed,
}

/// The sending half of one peer's queue of encoded application messages.
#[derive(Debug)]
pub(crate) struct Outbox {
    tx: mpsc::Sender<(Bytes, OwnedSemaphorePermit)>,
    budget: ByteBudget,
}

/// The link's half of an [`Outbox`].
#[derive(Debug)]
pub(crate) struct OutboxReceiver {
    rx: mpsc::Receiver<(Bytes, OwnedSemaphorePermit)>,
}

/// A queue of at most `messages` messages and `max_bytes` bytes (one larger message passes
/// when the queue is empty).
pub(crate) fn outbox(messages: usize, max_bytes: usize) -> (Outbox, OutboxReceiver) {
    let (tx, rx) = mpsc::channel(messages.max(1));
    (
        Outbox {
            tx,
            budget: ByteBudget::new(max_bytes),
        },
        OutboxReceiver { rx },
    )
}

impl Outbox {
    fn full(&self) -> PushError {
        PushError::Full(CutReason::QueueFull {
            queued: self.tx.max_capacity() - self.tx.capacity(),
            bytes: self.budget.used(),
        })
    }

    /// Queues `frame` without waiting.
    pub(crate) fn try_push(&self, frame: Bytes) -> Result<(), PushError> {
        if self.tx.is_closed() {
            return Err(PushError::Closed);
        }
        let Some(permit) = self.budget.try_take(frame.len()) else {
            return Err(self.full());
        };
        match self.tx.try_send((frame, permit)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(refused)) => {
                drop(refused); // gives its bytes back before they are counted
                Err(self.full())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(PushError::Closed),
        }
    }

    /// Queues `frame`, waiting at most `timeout` for room.
    pub(crate) async fn push(&self, frame: Bytes, timeout: Duration) -> Result<(), PushError> {
        let room = async {
            let permit = self.budget.take(frame.len()).await;
            let slot = self.tx.reserve().await;
            (permit, slot)
        };
        match tokio::time::timeout(timeout, room).await {
            Ok((permit, Ok(slot))) => {
                slot.send((frame, permit));
                Ok(())
            }
            Ok((_, Err(_))) => Err(PushError::Closed),
            // The timed-out future (and any bytes it held) is gone here.
            Err(_) if self.tx.is_closed() => Err(PushError::Closed),
            Err(_) => Err(self.full()),
        }
    }
}

impl OutboxReceiver {
    /// The next queued message (its bytes leave the budget); `None` once the outbox is gone.
    /// Cancel safe.
    pub(crate) async fn recv(&mut self) -> Option<Bytes> {
        self.rx.recv().await.map(|(frame, _budget)| frame)
    }
}

/// One message from a peer, holding its share of the byte budget until the application
/// takes it.
#[derive(Debug)]
pub(crate) struct Incoming {
    pub(crate) peer_id: PeerId,
    pub(crate) bytes: Bytes,
    pub(crate) _budget: OwnedSemaphorePermit,
}

/// A byte budget: messages hold their length of it while they wait in a queue.
#[derive(Clone, Debug)]
pub(crate) struct ByteBudget {
    permits: Arc<Semaphore>,
    max: u32,
}

impl ByteBudget {
    /// A budget of `max_bytes` (capped at 4 GiB).
    pub(crate) fn new(max_bytes: usize) -> Self {
        let max = u32::try_from(max_bytes).unwrap_or(u32::MAX).max(1);
        Self {
            permits: Arc::new(Semaphore::new(max as usize)),
            max,
        }
    }

    /// Bytes held now.
    pub(crate) fn used(&self) -> usize {
        self.max as usize - self.permits.available_permits()
    }

    /// Permits a message of `len` bytes takes: its length, or the whole budget for a
    /// message larger than the budget (it then passes alone).
    fn cost(&self, len: usize) -> u32 {
        u32::try_from(len).unwrap_or(u32::MAX).min(self.max)
    }

    /// The budget for `len` bytes if it is free now.
    pub(crate) fn try_take(&self, len: usize) -> Option<OwnedSemaphorePermit> {
        self.permits
            .clone()
            .try_acquire_many_owned(self.cost(len))
            .ok()
    }

    /// Waits for the budget for `len` bytes. Cancel safe.
    pub(crate) async fn take(&self, len: usize) -> OwnedSemaphorePermit {
        match self
            .permits
            .clone()
            .acquire_many_owned(self.cost(len))
            .await
        {
            Ok(permit) => permit,
            // The semaphore is never closed; should it be, waiting forever is the honest
            // answer for "no budget".
            Err(_) => std::future::pending().await,
        }
    }
}

/// The application's receiver of messages from peers: `(peer id, bytes)` in the order each
/// peer sent them, from [`SyncBridge::messages`](crate::SyncBridge::messages).
#[derive(Debug)]
pub struct Messages {
    pub(crate) rx: mpsc::Receiver<Incoming>,
}

impl Messages {
    /// The next message; `None` once the bridge has stopped. Cancel safe.
    pub async fn recv(&mut self) -> Option<(PeerId, Bytes)> {
        let m = self.rx.recv().await?;
        Some((m.peer_id, m.bytes))
    }

    /// The next message if one is waiting.
    pub fn try_recv(&mut self) -> Option<(PeerId, Bytes)> {
        let m = self.rx.try_recv().ok()?;
        Some((m.peer_id, m.bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn outbox_is_bounded_in_messages_and_bytes() {
        let (tx, mut rx) = outbox(2, 10);
        tx.try_push(Bytes::from_static(b"1234")).unwrap();
        tx.try_push(Bytes::from_static(b"1234")).unwrap();
        assert_eq!(
            tx.try_push(Bytes::from_static(b"1")).unwrap_err(),
            PushError::Full(CutReason::QueueFull {
                queued: 2,
                bytes: 8
            })
        );
        assert_eq!(rx.recv().await.unwrap().len(), 4);
        // Room for one message, but 4 + 7 bytes exceed 10.
        assert_eq!(
            tx.try_push(Bytes::from_static(b"1234567")).unwrap_err(),
            PushError::Full(CutReason::QueueFull {
                queued: 1,
                bytes: 4
            })
        );
        tx.try_push(Bytes::from_static(b"123456")).unwrap();
        rx.recv().await.unwrap();
        rx.recv().await.unwrap();
        // Empty: one message larger than the byte bound passes alone.
        tx.try_push(Bytes::from(vec![0; 50])).unwrap();
        assert!(matches!(
            tx.try_push(Bytes::from_static(b"x")),
            Err(PushError::Full(_))
        ));
        assert_eq!(tx.budget.used(), 10);
        drop(rx);
        assert_eq!(
            tx.try_push(Bytes::from_static(b"x")).unwrap_err(),
            PushError::Closed
        );
    }

    #[tokio::test(start_paused = true)]
    async fn push_waits_for_room_then_gives_up() {
        let (tx, mut rx) = outbox(1, 100);
        tx.push(Bytes::from_static(b"a"), Duration::from_secs(1))
            .await
            .unwrap();
        // Full: waits, and gets in once the link takes the first message.
        let (got, pushed) = tokio::join!(
            async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                rx.recv().await
            },
            tx.push(Bytes::from_static(b"b"), Duration::from_secs(1))
        );
        assert_eq!(got.as_deref(), Some(&b"a"[..]));
        pushed.unwrap();
        // Nobody takes it: after the timeout the queue counts as full.
        assert_eq!(
            tx.push(Bytes::from_static(b"c"), Duration::from_secs(1))
                .await
                .unwrap_err(),
            PushError::Full(CutReason::QueueFull {
                queued: 1,
                bytes: 1
            })
        );
        drop(rx);
        assert_eq!(
            tx.push(Bytes::from_static(b"c"), Duration::from_secs(1))
                .await
                .unwrap_err(),
            PushError::Closed
        );
    }

    #[tokio::test]
    async fn incoming_budget_lets_a_large_message_pass_alone() {
        let budget = ByteBudget::new(10);
        let a = budget.try_take(6).unwrap();
        assert!(budget.try_take(6).is_none());
        drop(a);
        let big = budget.try_take(1000).unwrap();
        assert!(budget.try_take(0).is_some(), "empty messages cost nothing");
        assert!(budget.try_take(1).is_none());
        drop(big);
        let _ = budget.take(10).await;
        assert_eq!(ByteBudget::new(usize::MAX).max, u32::MAX);
    }
}
