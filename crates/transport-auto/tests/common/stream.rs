//! A stream of numbered messages over one connection, checked on arrival (each exactly
//! once, in order, never the end of the connection), with the longest gap in delivery; and
//! waiting for path events.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use pluresdb_sync_core::Connection;
use pluresdb_sync_transport_hyperswarm::relay_path::{PathInfo, PeerPath};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use super::T;

/// Messages in a stream.
pub(crate) const MESSAGES: u32 = 10_000;
/// Bytes per message (its number first, big-endian).
pub(crate) const SIZE: usize = 200;

/// A stream under way: how many messages arrived so far, and its two halves.
pub(crate) struct Stream {
    pub(crate) received: Arc<AtomicU32>,
    reader: JoinHandle<(Box<dyn Connection>, Duration)>,
    writer: JoinHandle<Box<dyn Connection>>,
}

impl Stream {
    /// Sends [`MESSAGES`] numbered messages from `tx` to `rx`, one per millisecond.
    pub(crate) fn start(tx: Box<dyn Connection>, rx: Box<dyn Connection>) -> Self {
        Self::start_n(tx, rx, MESSAGES)
    }

    /// Sends `messages` numbered messages from `tx` to `rx`, one per millisecond.
    pub(crate) fn start_n(
        mut tx: Box<dyn Connection>,
        mut rx: Box<dyn Connection>,
        messages: u32,
    ) -> Self {
        let received = Arc::new(AtomicU32::new(0));
        let count = received.clone();
        let reader = tokio::spawn(async move {
            let mut longest_gap = Duration::ZERO;
            let mut last = Instant::now();
            for want in 0..messages {
                let msg = tokio::time::timeout(T, rx.receive())
                    .await
                    .expect("a message in time")
                    .unwrap()
                    .expect("the connection ended early");
                let n = u32::from_be_bytes(msg[..4].try_into().unwrap());
                assert_eq!(n, want, "every message once and in order");
                assert_eq!(msg.len(), SIZE);
                let now = Instant::now();
                longest_gap = longest_gap.max(now - last);
                last = now;
                count.store(n + 1, Ordering::Relaxed);
            }
            (rx, longest_gap)
        });
        let writer = tokio::spawn(async move {
            let mut msg = vec![0u8; SIZE];
            for n in 0..messages {
                msg[..4].copy_from_slice(&n.to_be_bytes());
                tx.send(&msg).await.unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            tx
        });
        Self {
            received,
            reader,
            writer,
        }
    }

    /// How many messages arrived so far.
    pub(crate) fn count(&self) -> u32 {
        self.received.load(Ordering::Relaxed)
    }

    /// Waits until `n` messages arrived.
    pub(crate) async fn reached(&self, n: u32) {
        tokio::time::timeout(T, async {
            while self.count() < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{n} messages did not arrive in time ({})", self.count()));
    }

    /// Waits for every message; the two connections (sender, receiver) and the longest
    /// gap between deliveries.
    pub(crate) async fn finish(self) -> (Box<dyn Connection>, Box<dyn Connection>, Duration) {
        let (rx, gap) = tokio::time::timeout(Duration::from_secs(60), self.reader)
            .await
            .expect("the stream did not end in time")
            .unwrap();
        let tx = self.writer.await.unwrap();
        (tx, rx, gap)
    }
}

/// Waits for a path event of `peer` matching `want`; when it came.
pub(crate) async fn wait_path(
    events: &mut broadcast::Receiver<PathInfo>,
    peer: &str,
    want: impl Fn(&PeerPath) -> bool,
) -> Instant {
    tokio::time::timeout(T, async {
        loop {
            let e = events.recv().await.expect("path events ended");
            if e.peer_id == peer && want(&e.path) {
                return Instant::now();
            }
        }
    })
    .await
    .expect("no such path event in time")
}

pub(crate) fn direct(p: &PeerPath) -> bool {
    matches!(p, PeerPath::Direct(_))
}

pub(crate) fn relayed(p: &PeerPath) -> bool {
    matches!(p, PeerPath::Relayed { .. })
}
