//! The memory budget for queued frames. Every byte queued to a connection's writer is charged
//! twice: to that connection's cap (`max_queued_bytes_per_connection`) and to one budget for
//! the whole server (`max_queued_bytes`), and given back when the writer takes it. A sender
//! whose receiver is at its cap waits for it (backpressure), at most until that receiver has
//! been full for the slow-consumer timeout; when the server's budget is short, the largest
//! queues are closed (4010) until the frame fits. So never-reading receivers pin at most the
//! budget, however many IPs they come from.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Semaphore, TryAcquireError, mpsc};
use tokio::time::Instant;

use super::metrics::{DropReason, Metrics};
use super::outbox::Batch;
use super::rooms::{Kill, kill};
use crate::protocol::{ConnId, close_code};

/// How long a sender waits for the bytes of the queues the budget closed before it closes
/// more (the writers give them back as soon as they see the close).
const EVICTION_WAIT: Duration = Duration::from_millis(20);

/// Why a frame could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refused {
    /// The receiver is gone.
    Closed,
    /// The receiver's queue stayed full (it was closed with 4009).
    SlowConsumer,
    /// The server's budget stayed short (the receiver was closed with 4010).
    OverBudget,
}

/// The server's budget and the queues charged to it.
#[derive(Debug)]
pub(super) struct Budget {
    global: Arc<Semaphore>,
    total: usize,
    per_connection: usize,
    slow_consumer_timeout: Duration,
    /// Open queues, to find the largest when the budget is short; `true` for those already
    /// closed for it, whose bytes are on their way back.
    queues: Mutex<HashMap<ConnId, (Arc<Queue>, bool)>>,
    metrics: Arc<Metrics>,
}

/// One connection's queue as the budget sees it: its free bytes under its cap, its kill
/// switch, and since when it has been full.
#[derive(Debug)]
pub(super) struct Queue {
    id: ConnId,
    free: Semaphore,
    global: Arc<Semaphore>,
    kill: Kill,
    /// When a sender first found it full since the writer last took something.
    full_since: Mutex<Option<Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Queue {
    /// Bytes queued now.
    fn queued(&self, cap: usize) -> usize {
        cap.saturating_sub(self.free.available_permits())
    }

    /// Notes that a sender found the queue full; when it has been full since.
    pub(super) fn full(&self, now: Instant) -> Instant {
        *lock(&self.full_since).get_or_insert(now)
    }

    /// Gives back the charge of `cost` bytes that were not queued after all.
    pub(super) fn refund(&self, cost: u32) {
        self.free.add_permits(cost as usize);
        self.global.add_permits(cost as usize);
    }

    /// The writer took `cost` bytes: they are free again, and the queue is not stuck.
    fn release(&self, cost: u32) {
        self.free.add_permits(cost as usize);
        self.global.add_permits(cost as usize);
        *lock(&self.full_since) = None;
    }
}

impl Budget {
    pub(super) fn new(
        total: usize,
        per_connection: usize,
        slow_consumer_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            global: Arc::new(Semaphore::new(total)),
            total,
            per_connection,
            slow_consumer_timeout,
            queues: Mutex::default(),
            metrics,
        }
    }

    /// The cap of each connection's queue, in bytes.
    pub(super) fn per_connection(&self) -> usize {
        self.per_connection
    }

    /// Bytes queued in all connections.
    pub(super) fn queued(&self) -> usize {
        self.total.saturating_sub(self.global.available_permits())
    }

    /// The queue of a new connection `id`, which `kill` closes.
    pub(super) fn open(&self, id: ConnId, kill: Kill) -> Arc<Queue> {
        let q = Arc::new(Queue {
            id,
            free: Semaphore::new(self.per_connection),
            global: self.global.clone(),
            kill,
            full_since: Mutex::new(None),
        });
        lock(&self.queues).insert(id, (q.clone(), false));
        q
    }

    /// A queue of `cap` bytes charged to the budget like a connection's, but never closed
    /// by it (it is not a candidate when the budget is short): for a queue that drains by
    /// itself and is only ever charged without waiting (the NATS datagram outbox). Its
    /// taker gives bytes back with [`Queue::refund`].
    pub(super) fn open_unlisted(&self, cap: usize) -> Arc<Queue> {
        Arc::new(Queue {
            id: 0,
            free: Semaphore::new(cap),
            global: self.global.clone(),
            kill: Arc::new(tokio::sync::watch::channel(None).0),
            full_since: Mutex::new(None),
        })
    }

    /// Charges `cost` bytes queued to `to` without waiting: whether they fit.
    pub(super) fn try_charge(&self, to: &Queue, cost: u32) -> bool {
        let Ok(mine) = to.free.try_acquire_many(cost) else {
            return false;
        };
        let Ok(all) = self.global.try_acquire_many(cost) else {
            return false;
        };
        mine.forget();
        all.forget();
        true
    }

    /// Charges `cost` bytes queued to `to`, waiting at most until `deadline` and until `to`
    /// has been full for the slow-consumer timeout. When the server's budget is short, the
    /// largest queues are closed first.
    pub(super) async fn charge(
        &self,
        to: &Queue,
        cost: u32,
        deadline: Instant,
    ) -> Result<(), Refused> {
        match to.free.try_acquire_many(cost) {
            Ok(p) => p.forget(),
            Err(TryAcquireError::Closed) => return Err(Refused::Closed),
            Err(TryAcquireError::NoPermits) => {
                let until = deadline.min(to.full(Instant::now()) + self.slow_consumer_timeout);
                match tokio::time::timeout_at(until, to.free.acquire_many(cost)).await {
                    Ok(Ok(p)) => p.forget(),
                    Ok(Err(_)) => return Err(Refused::Closed),
                    Err(_) => return Err(Refused::SlowConsumer),
                }
            }
        }
        match self.charge_global(to, cost, deadline).await {
            Ok(()) => Ok(()),
            Err(e) => {
                to.free.add_permits(cost as usize);
                Err(e)
            }
        }
    }

    async fn charge_global(&self, to: &Queue, cost: u32, deadline: Instant) -> Result<(), Refused> {
        loop {
            if let Ok(p) = self.global.try_acquire_many(cost) {
                p.forget();
                return Ok(());
            }
            if self.evict(cost as usize, to.id) {
                return Err(Refused::Closed);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Refused::OverBudget);
            }
            let until = deadline.min(now + EVICTION_WAIT);
            if let Ok(Ok(p)) = tokio::time::timeout_at(until, self.global.acquire_many(cost)).await
            {
                p.forget();
                return Ok(());
            }
        }
    }

    /// Closes the largest queues (4010) until the ones closed for the budget hold at least
    /// `need` bytes (their writers are giving them back); whether `to` was among them.
    fn evict(&self, need: usize, to: ConnId) -> bool {
        let cap = self.per_connection;
        let mut queues = lock(&self.queues);
        let mut coming: usize = queues
            .values()
            .filter(|(_, closed)| *closed)
            .map(|(q, _)| q.queued(cap))
            .sum();
        let mut hit = false;
        while coming < need {
            let Some((&id, (q, closed))) = queues
                .iter_mut()
                .filter(|(_, (q, closed))| !*closed && q.queued(cap) > 0)
                .max_by_key(|(_, (q, _))| q.queued(cap))
            else {
                break;
            };
            let bytes = q.queued(cap);
            *closed = true;
            self.metrics.dropped(DropReason::MemoryBudget);
            kill(
                &q.kill,
                close_code::OVER_BUDGET,
                format!(
                    "the relay's {}-byte budget for queued frames is used up and this connection's queue ({bytes} bytes) was the largest",
                    self.total
                ),
            );
            coming += bytes;
            hit |= id == to;
        }
        hit
    }

    /// Connection `id` is gone.
    pub(super) fn close(&self, id: ConnId) {
        lock(&self.queues).remove(&id);
    }
}

/// A connection's writer side of its queue: taking a batch gives its bytes back to the
/// budget; what is left when it is dropped is given back too.
#[derive(Debug)]
pub(super) struct Inbox {
    rx: mpsc::Receiver<Batch>,
    queue: Arc<Queue>,
}

impl Inbox {
    pub(super) fn new(rx: mpsc::Receiver<Batch>, queue: Arc<Queue>) -> Self {
        Self { rx, queue }
    }

    fn took(&self, b: Batch) -> Batch {
        self.queue.release(b.cost());
        b
    }

    /// The next batch; `None` once every sender is gone.
    pub(super) async fn recv(&mut self) -> Option<Batch> {
        let b = self.rx.recv().await?;
        Some(self.took(b))
    }

    /// The next batch if one is queued.
    pub(super) fn try_recv(&mut self) -> Option<Batch> {
        let b = self.rx.try_recv().ok()?;
        Some(self.took(b))
    }

    /// Drops everything queued, giving its bytes back, and refuses more (the connection is
    /// closed; senders waiting for room stop waiting).
    pub(super) fn discard(&mut self) {
        self.rx.close();
        self.queue.free.close();
        while let Ok(b) = self.rx.try_recv() {
            self.queue.refund(b.cost());
        }
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.discard();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::watch;

    type Killed = watch::Receiver<Option<(u16, String)>>;

    fn queue(
        b: &Budget,
        id: ConnId,
        frames: usize,
    ) -> (Arc<Queue>, mpsc::Sender<Batch>, Inbox, Killed) {
        let (k, killed) = watch::channel(None);
        let q = b.open(id, Arc::new(k));
        let (tx, rx) = mpsc::channel(frames);
        (q.clone(), tx, Inbox::new(rx, q), killed)
    }

    fn batch(n: usize) -> Batch {
        Batch::one(&vec![0; n - 4])
    }

    #[tokio::test]
    async fn bytes_are_charged_until_the_writer_takes_them() {
        let b = Budget::new(1000, 400, Duration::from_millis(50), Arc::default());
        let (q, tx, mut inbox, _) = queue(&b, 1, 16);
        let far = Instant::now() + Duration::from_secs(10);
        for _ in 0..4 {
            b.charge(&q, 100, far).await.unwrap();
            tx.try_send(batch(100)).unwrap();
        }
        assert_eq!((b.queued(), q.queued(400)), (400, 400));
        assert!(!b.try_charge(&q, 1), "at its cap");
        // Full: the sender waits, and the receiver is closed after the slow-consumer timeout.
        let t = Instant::now();
        assert_eq!(b.charge(&q, 100, far).await, Err(Refused::SlowConsumer));
        assert!(t.elapsed() >= Duration::from_millis(50));
        inbox.recv().await.unwrap();
        assert_eq!((b.queued(), q.queued(400)), (300, 300));
        // What is left when the writer goes is given back, and senders stop waiting.
        drop(inbox);
        assert_eq!(b.queued(), 0);
        assert_eq!(b.charge(&q, 100, far).await, Err(Refused::Closed));
    }

    #[tokio::test]
    async fn a_receiver_full_for_the_timeout_stalls_senders_once_not_per_sender() {
        let b = Budget::new(1000, 100, Duration::from_millis(100), Arc::default());
        let (q, _tx, _inbox, _) = queue(&b, 1, 16);
        let far = Instant::now() + Duration::from_secs(10);
        b.charge(&q, 100, far).await.unwrap();
        let t = Instant::now();
        assert_eq!(b.charge(&q, 10, far).await, Err(Refused::SlowConsumer));
        // It has been full since the first wait: the next sender is refused at once.
        let again = Instant::now();
        assert_eq!(b.charge(&q, 10, far).await, Err(Refused::SlowConsumer));
        assert!(
            again.elapsed() < Duration::from_millis(50) && t.elapsed() < Duration::from_secs(1)
        );
        // A deadline of the sender's own ends the wait sooner.
        q.release(0);
        let soon = Instant::now() + Duration::from_millis(10);
        assert_eq!(b.charge(&q, 10, soon).await, Err(Refused::SlowConsumer));
    }

    #[tokio::test]
    async fn a_short_budget_closes_the_largest_queues_first() {
        let metrics = Arc::new(Metrics::default());
        let b = Budget::new(1000, 600, Duration::from_secs(5), metrics.clone());
        let far = Instant::now() + Duration::from_secs(10);
        let (big, big_tx, big_inbox, big_killed) = queue(&b, 1, 16);
        let (small, small_tx, _small_inbox, small_killed) = queue(&b, 2, 16);
        let (fresh, _fresh_tx, _fresh_inbox, fresh_killed) = queue(&b, 3, 16);
        for (q, tx, n) in [(&big, &big_tx, 6), (&small, &small_tx, 3)] {
            for _ in 0..n {
                b.charge(q, 100, far).await.unwrap();
                tx.try_send(batch(100)).unwrap();
            }
        }
        assert_eq!(b.queued(), 900);
        // 200 more do not fit: the largest queue is closed and its writer gives its bytes back.
        let writer = tokio::spawn(async move {
            let mut big_killed = big_killed;
            let mut inbox = big_inbox;
            big_killed.changed().await.unwrap();
            inbox.discard();
            big_killed
        });
        b.charge(&fresh, 200, far).await.unwrap();
        let big_killed = writer.await.unwrap();
        assert_eq!(
            big_killed.borrow().as_ref().map(|(c, _)| *c),
            Some(close_code::OVER_BUDGET)
        );
        assert!(small_killed.borrow().is_none() && fresh_killed.borrow().is_none());
        assert_eq!(b.queued(), 500);
        assert!(
            metrics
                .render(0, 0, None)
                .contains("reason=\"memory_budget\"} 1\n")
        );
        // Next time the next largest goes (the closed one is no longer a candidate).
        assert!(!b.evict(1, 9));
        assert_eq!(
            small_killed.borrow().as_ref().map(|(c, _)| *c),
            Some(close_code::OVER_BUDGET)
        );
    }
}
