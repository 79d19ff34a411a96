//! Scenarios every transport must pass through a SyncBridge, and the helpers they share.
//! Each test binary runs them over one transport (memory, relay, hyperswarm).
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

pub mod pipe;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use pluresdb_sync_bridge::{
    BridgeEvent, CutReason, DisconnectReason, Messages, SyncBridge, SyncBridgeBuilder,
};
use pluresdb_sync_core::testkit::TransportFactory;
use pluresdb_sync_core::{SyncBroadcaster, SyncEvent, TopicHash, Transport};
use tokio::sync::broadcast;

/// How long any one wait may take before the test fails: only a guard against hangs.
pub const T: Duration = Duration::from_secs(60);

/// A topic no other test uses.
pub fn fresh_topic() -> TopicHash {
    pluresdb_sync_core::testkit::fresh_topic("bridge")
}

/// One replica: its hub, what its application sees, and its bridge.
pub struct Replica {
    pub hub: SyncBroadcaster,
    pub seen: broadcast::Receiver<SyncEvent>,
    pub bridge: SyncBridge,
    pub messages: Messages,
    pub reports: broadcast::Receiver<BridgeEvent>,
}

/// Starts one replica per transport on `topic` (hubs of `capacity`).
pub async fn replicas(
    transports: Vec<Box<dyn Transport>>,
    topic: TopicHash,
    capacity: usize,
    builder: SyncBridgeBuilder,
) -> Vec<Replica> {
    let mut out = Vec::new();
    for transport in transports {
        let hub = SyncBroadcaster::new(capacity);
        let seen = hub.subscribe();
        let bridge = builder
            .clone()
            .start(transport, topic, hub.clone())
            .await
            .unwrap();
        let messages = bridge.messages().unwrap();
        let reports = bridge.reports();
        out.push(Replica {
            hub,
            seen,
            bridge,
            messages,
            reports,
        });
    }
    out
}

/// The next event the application of a hub sees.
pub async fn next_event(rx: &mut broadcast::Receiver<SyncEvent>) -> SyncEvent {
    tokio::time::timeout(T, rx.recv())
        .await
        .expect("no event in time")
        .expect("the test's own subscriber lagged or closed")
}

/// The next report of a bridge.
pub async fn next_report(rx: &mut broadcast::Receiver<BridgeEvent>) -> BridgeEvent {
    tokio::time::timeout(T, rx.recv())
        .await
        .expect("no report in time")
        .expect("reports lagged or closed")
}

/// Waits for a report matching `pred`, skipping others.
pub async fn report_matching(
    rx: &mut broadcast::Receiver<BridgeEvent>,
    pred: impl Fn(&BridgeEvent) -> bool,
) -> BridgeEvent {
    loop {
        let r = next_report(rx).await;
        if pred(&r) {
            return r;
        }
    }
}

/// Waits until every replica's hub saw PeerConnected for every other replica (and nothing
/// else); returns each replica's own peer id (the one id the others saw and it did not).
pub async fn wait_for_mesh(replicas: &mut [Replica]) -> Vec<String> {
    let n = replicas.len();
    let mut sets = Vec::new();
    for r in replicas.iter_mut() {
        let mut peers = BTreeSet::new();
        while peers.len() < n - 1 {
            match next_event(&mut r.seen).await {
                SyncEvent::PeerConnected { peer_id } => {
                    assert!(
                        peers.insert(peer_id.clone()),
                        "second PeerConnected {peer_id}"
                    );
                }
                other => panic!("before the mesh formed, the hub saw {other:?}"),
            }
        }
        sets.push(peers);
    }
    let all: BTreeSet<String> = sets.iter().flatten().cloned().collect();
    assert_eq!(all.len(), n, "{sets:?}");
    sets.iter()
        .map(|s| {
            let own: Vec<&String> = all.difference(s).collect();
            assert_eq!(own.len(), 1, "{sets:?}");
            own[0].clone()
        })
        .collect()
}

fn node_id(event: &SyncEvent) -> &str {
    match event {
        SyncEvent::NodeUpsert { id } | SyncEvent::NodeDelete { id } => id,
        other => panic!("expected a node event, got {other:?}"),
    }
}

/// Reads a hub until it has seen, from every sender in `senders`, events up to and including
/// the one with sequence `last` (ids `"{sender}/{seq}"`, in order per sender); any duplicate,
/// reordering or foreign event fails.
async fn read_until(
    seen: &mut broadcast::Receiver<SyncEvent>,
    senders: usize,
    next: &mut HashMap<usize, usize>,
    last: usize,
) {
    while (0..senders).any(|s| next.get(&s).copied().unwrap_or(0) <= last) {
        let event = next_event(seen).await;
        let id = node_id(&event);
        let (sender, seq) = id.split_once('/').unwrap();
        let (sender, seq): (usize, usize) = (sender.parse().unwrap(), seq.parse().unwrap());
        let expected = next.entry(sender).or_insert(0);
        assert_eq!(
            seq, *expected,
            "sender {sender}: got {id} (duplicate or out of order)"
        );
        let kind_ok = if seq.is_multiple_of(2) {
            matches!(event, SyncEvent::NodeUpsert { .. })
        } else {
            matches!(event, SyncEvent::NodeDelete { .. })
        };
        assert!(kind_ok, "{event:?}");
        *expected += 1;
    }
}

fn event(sender: usize, seq: usize) -> SyncEvent {
    let id = format!("{sender}/{seq}");
    if seq.is_multiple_of(2) {
        SyncEvent::NodeUpsert { id }
    } else {
        SyncEvent::NodeDelete { id }
    }
}

/// Three replicas: each hub sees every replica's `burst` events exactly once and in order
/// per sender (its own from its own publish, the others' through the bridges: no echo, no
/// loop, no forwarding), PeerConnected for each other replica; application messages arrive
/// once, in order; when one replica stops, the other two see PeerDisconnected for it and
/// stay linked to each other.
pub async fn three_replicas_sync_exactly_once(factory: &dyn TransportFactory, burst: usize) {
    let topic = fresh_topic();
    let transports = factory.create(3).await.unwrap();
    // Room for every event of the run: this test is about the bridge, not the app's pace.
    let capacity = 4 * burst + 64;
    let mut rs = replicas(transports, topic, capacity, SyncBridge::builder()).await;
    let ids = wait_for_mesh(&mut rs).await;
    for (i, r) in rs.iter().enumerate() {
        let mut expect: Vec<String> = ids.iter().filter(|p| **p != ids[i]).cloned().collect();
        expect.sort();
        assert_eq!(r.bridge.peers(), expect);
    }

    // The burst, interleaved across the three senders.
    for seq in 0..burst {
        for (i, r) in rs.iter().enumerate() {
            r.hub.publish(event(i, seq)).unwrap();
        }
    }
    let mut next: Vec<HashMap<usize, usize>> = vec![HashMap::new(); 3];
    for (r, next) in rs.iter_mut().zip(&mut next) {
        read_until(&mut r.seen, 3, next, burst - 1).await;
    }
    // Each replica then publishes one more event. An echo or a forward of anything it
    // received would have been sent before it, so seeing these last ones from every sender
    // without a duplicate proves there is none.
    for (i, r) in rs.iter().enumerate() {
        r.hub.publish(event(i, burst)).unwrap();
    }
    for (r, next) in rs.iter_mut().zip(&mut next) {
        read_until(&mut r.seen, 3, next, burst).await;
        assert!(r.seen.is_empty(), "events beyond the expected ones");
    }
    for r in &rs {
        let s = r.bridge.status();
        let each_way = 2 * (burst as u64 + 1);
        assert_eq!(
            (
                s.events_sent,
                s.events_received,
                s.peers,
                s.bad_frames,
                s.peers_cut
            ),
            (each_way, each_way, 2, 0, 0),
            "{s:?}"
        );
    }

    // Messages: one broadcast, then one direct message to each peer.
    for (i, r) in rs.iter().enumerate() {
        assert_eq!(r.bridge.broadcast(format!("b{i}")).unwrap(), 2);
        for peer in r.bridge.peers() {
            r.bridge.send_to(&peer, format!("d{i}")).await.unwrap();
        }
    }
    for (i, r) in rs.iter_mut().enumerate() {
        let mut got: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for _ in 0..4 {
            let (from, bytes) = tokio::time::timeout(T, r.messages.recv())
                .await
                .expect("no message in time")
                .unwrap();
            got.entry(from)
                .or_default()
                .push(String::from_utf8(bytes.to_vec()).unwrap());
        }
        for (j, id) in ids.iter().enumerate().filter(|(j, _)| *j != i) {
            assert_eq!(got[id], [format!("b{j}"), format!("d{j}")], "replica {i}");
        }
        assert!(r.messages.try_recv().is_none());
    }

    // Replica 0 leaves.
    let mut rest = rs.split_off(1);
    let mut leaving = rs.pop().unwrap();
    leaving.bridge.stop().await.unwrap();
    let mut gone = BTreeSet::new();
    for _ in 0..2 {
        match next_event(&mut leaving.seen).await {
            SyncEvent::PeerDisconnected { peer_id } => assert!(gone.insert(peer_id)),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(gone, ids[1..].iter().cloned().collect());
    for r in &mut rest {
        assert_eq!(
            next_event(&mut r.seen).await,
            SyncEvent::PeerDisconnected {
                peer_id: ids[0].clone()
            }
        );
        let report = report_matching(&mut r.reports, |e| {
            matches!(e, BridgeEvent::PeerDisconnected { .. })
        })
        .await;
        assert!(
            matches!(&report, BridgeEvent::PeerDisconnected { peer_id, .. } if *peer_id == ids[0]),
            "{report:?}"
        );
    }
    assert_eq!(rest[0].bridge.peers(), [ids[2].clone()]);
    assert_eq!(rest[1].bridge.peers(), [ids[1].clone()]);
    // The two left still sync.
    rest[0].hub.publish(event(1, burst + 1)).unwrap();
    let _own = next_event(&mut rest[0].seen).await;
    assert_eq!(next_event(&mut rest[1].seen).await, event(1, burst + 1));
    for r in rest {
        r.bridge.stop().await.unwrap();
    }
}

/// Bytes per application message in the slow-peer scenario.
const SLOW_MESSAGE: usize = 64 * 1024;
/// Messages each replica broadcasts per round.
const SLOW_ROUND: usize = 16;
/// Rounds after which the slow peer must have been cut (a guard: far more than any
/// transport's window plus the queue).
const SLOW_MAX_ROUNDS: usize = 1000;
/// Rounds run after the cut, to show the other two go on.
const ROUNDS_AFTER_CUT: usize = 8;

/// Two replicas and a peer that joins the topic but never reads: the two broadcast
/// application messages in rounds, each round paced by the other replica's receipt; the
/// slow peer is cut by both (reported, queue full) and the two keep receiving each other's
/// messages complete and in order.
pub async fn a_peer_that_never_reads_is_cut(factory: &dyn TransportFactory) {
    let topic = fresh_topic();
    let mut transports = factory.create(3).await.unwrap();
    let mut slow = transports.pop().unwrap();
    let mut slow_incoming = slow.connect(topic).await.unwrap();
    // Holds its connections open and never reads them.
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some(conn) = slow_incoming.recv().await {
            held.push(conn);
        }
        held.len()
    });
    let builder = SyncBridge::builder().peer_queue_bytes(4 * 1024 * 1024);
    let mut rs = replicas(transports, topic, 1024, builder).await;
    // Each sees two peers: the other replica and the slow one.
    let mut peers = Vec::new();
    for r in &mut rs {
        let mut p = BTreeSet::new();
        while p.len() < 2 {
            if let SyncEvent::PeerConnected { peer_id } = next_event(&mut r.seen).await {
                p.insert(peer_id);
            }
        }
        peers.push(p);
    }
    let common: Vec<&String> = peers[0].intersection(&peers[1]).collect();
    assert_eq!(common.len(), 1, "{peers:?}");
    let slow_id = common[0].clone();

    let chunk = |from: usize, seq: usize| {
        let mut m = vec![from as u8; SLOW_MESSAGE];
        m[..8].copy_from_slice(&(seq as u64).to_be_bytes());
        m
    };
    let mut seq = 0;
    let mut received = [0usize; 2];
    let mut cut = [false; 2];
    let mut rounds_after_cut = 0;
    for _ in 0..SLOW_MAX_ROUNDS {
        for (i, r) in rs.iter().enumerate() {
            for k in 0..SLOW_ROUND {
                let queued = r.bridge.broadcast(chunk(i, seq + k)).unwrap();
                assert!(queued >= 1, "replica {i} lost its healthy peer");
            }
        }
        seq += SLOW_ROUND;
        for (i, r) in rs.iter_mut().enumerate() {
            while received[i] < seq {
                let (_, bytes) = tokio::time::timeout(T, r.messages.recv())
                    .await
                    .expect("the healthy peer's messages stopped")
                    .unwrap();
                let n = u64::from_be_bytes(bytes[..8].try_into().unwrap()) as usize;
                assert_eq!(n, received[i], "replica {i}: message out of order or lost");
                assert_eq!(bytes.len(), SLOW_MESSAGE);
                assert!(bytes[8..].iter().all(|b| *b == (1 - i) as u8));
                received[i] += 1;
            }
            while let Ok(report) = r.reports.try_recv() {
                if let BridgeEvent::PeerDisconnected { peer_id, reason } = report {
                    assert_eq!(peer_id, slow_id, "only the slow peer may be cut");
                    assert!(
                        matches!(reason, DisconnectReason::Cut(CutReason::QueueFull { .. })),
                        "{reason:?}"
                    );
                    cut[i] = true;
                }
            }
        }
        if cut == [true, true] {
            rounds_after_cut += 1;
            if rounds_after_cut > ROUNDS_AFTER_CUT {
                break;
            }
        }
    }
    assert_eq!(cut, [true, true], "the slow peer was never cut");
    // (A transport may bring the slow peer back, e.g. Hyperswarm re-dials it: it is then a
    // new link, cut again once it falls behind.)
    let healthy = [peers[0].iter(), peers[1].iter()]
        .map(|mut p| p.find(|id| **id != slow_id).cloned().unwrap());
    for (i, r) in rs.iter_mut().enumerate() {
        assert!(r.bridge.peers().contains(&healthy[i]), "replica {i}");
        assert!(r.bridge.status().peers_cut >= 1);
        // The hub heard the slow peer leave, and nothing about the other replica.
        let mut left = Vec::new();
        while let Ok(e) = r.seen.try_recv() {
            if let SyncEvent::PeerDisconnected { peer_id } = e {
                left.push(peer_id);
            }
        }
        assert!(!left.is_empty(), "replica {i}");
        assert!(left.iter().all(|p| *p == slow_id), "replica {i}: {left:?}");
    }
    for r in rs {
        r.bridge.stop().await.unwrap();
    }
    slow.disconnect().await.unwrap();
    assert!(holder.await.unwrap() >= 2);
}
