//! The bridge over the in-memory reference transport (core's testkit).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::BTreeSet;

use common::*;
use pluresdb_sync_bridge::{BridgeEvent, CutReason, DisconnectReason, SyncBridge};
use pluresdb_sync_core::SyncEvent;
use pluresdb_sync_core::testkit::TransportFactory;
use pluresdb_sync_core::testkit::memory::MemoryNetwork;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_sync_a_burst_of_10000_events_exactly_once() {
    three_replicas_sync_exactly_once(&MemoryNetwork::new(), 10_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_reads_is_cut_and_the_others_go_on() {
    a_peer_that_never_reads_is_cut(&MemoryNetwork::new()).await;
}

/// Events have no queue but the hub: a peer that falls more than the hub's capacity behind
/// would miss events, so it is cut (reported as lagged), and the healthy peer gets them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_lagging_behind_the_hub_is_cut() {
    let net = MemoryNetwork::new();
    let topic = fresh_topic();
    let mut transports = net.create(3).await.unwrap();
    let mut slow = transports.pop().unwrap();
    let mut incoming = slow.connect(topic).await.unwrap();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some(c) = incoming.recv().await {
            held.push(c);
        }
    });
    const CAPACITY: usize = 64;
    let mut rs = replicas(transports, topic, CAPACITY, SyncBridge::builder()).await;
    for r in &mut rs {
        let mut p = BTreeSet::new();
        while p.len() < 2 {
            if let SyncEvent::PeerConnected { peer_id } = next_event(&mut r.seen).await {
                p.insert(peer_id);
            }
        }
    }
    let (a, b) = rs.split_at_mut(1);
    let (a, b) = (&mut a[0], &mut b[0]);
    let mut next = 0usize;
    let mut cut = None;
    // Rounds of half the capacity, each paced by B's receipt: B never lags; the slow peer
    // (the memory transport buffers 16 messages) falls behind by more than 64 soon, and the
    // link notices while its send waits.
    let deadline = std::time::Instant::now() + T;
    while std::time::Instant::now() < deadline {
        let start = next;
        for k in start..start + CAPACITY / 2 {
            a.hub
                .publish(SyncEvent::NodeUpsert { id: k.to_string() })
                .unwrap();
        }
        // A's own subscriber reads its own events too, so it never lags either.
        for _ in start..start + CAPACITY / 2 {
            next_event(&mut a.seen).await;
        }
        while next < start + CAPACITY / 2 {
            match next_event(&mut b.seen).await {
                SyncEvent::NodeUpsert { id } => {
                    assert_eq!(id, next.to_string());
                    next += 1;
                }
                SyncEvent::PeerDisconnected { .. } => {}
                other => panic!("{other:?}"),
            }
        }
        while let Ok(report) = a.reports.try_recv() {
            if let BridgeEvent::PeerDisconnected { reason, .. } = report {
                cut = Some(reason);
            }
        }
        if cut.is_some() {
            break;
        }
    }
    assert!(
        matches!(
            cut,
            Some(DisconnectReason::Cut(CutReason::Lagged { missed })) if missed > 0
        ),
        "{cut:?}"
    );
    assert_eq!(a.bridge.status().peers_cut, 1);
    assert_eq!(a.bridge.peers().len(), 1);
    for r in rs {
        r.bridge.stop().await.unwrap();
    }
    slow.disconnect().await.unwrap();
    holder.await.unwrap();
}
