//! One bridge and connections whose other end the test holds (in-process pipes): a peer that
//! reconnects, a hostile peer, the limits, and stopping.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::Duration;

use common::pipe::{FeedTransport, PIPE_QUEUE, PipeEnd, pipe};
use common::{T, fresh_topic, next_event, next_report, report_matching};
use pluresdb_sync_bridge::envelope::{self, EnvelopeError};
use pluresdb_sync_bridge::{
    BridgeError, BridgeEvent, CutReason, DisconnectReason, SyncBridge, SyncBridgeBuilder,
};
use pluresdb_sync_core::{CodecError, Connection, SyncBroadcaster, SyncEvent, codec};
use tokio::sync::{broadcast, mpsc};

const P: &str = "peer-p";
const ME: &str = "me";

struct Setup {
    hub: SyncBroadcaster,
    seen: broadcast::Receiver<SyncEvent>,
    bridge: SyncBridge,
    reports: broadcast::Receiver<BridgeEvent>,
    feed: mpsc::Sender<Box<dyn Connection>>,
}

async fn setup(builder: SyncBridgeBuilder) -> Setup {
    let hub = SyncBroadcaster::new(64);
    let seen = hub.subscribe();
    let (transport, feed) = FeedTransport::new();
    let bridge = builder
        .start(Box::new(transport), fresh_topic(), hub.clone())
        .await
        .unwrap();
    let reports = bridge.reports();
    Setup {
        hub,
        seen,
        bridge,
        reports,
        feed,
    }
}

impl Setup {
    /// Feeds a new connection from peer `id`; returns the test's end of it.
    async fn connect(&self, id: &str) -> PipeEnd {
        let (theirs, mine) = pipe(id, ME);
        self.feed.send(Box::new(theirs)).await.unwrap();
        mine
    }
}

fn upsert(id: &str) -> SyncEvent {
    SyncEvent::NodeUpsert { id: id.into() }
}

fn wire(event: &SyncEvent) -> Vec<u8> {
    envelope::encode_event(event).unwrap().unwrap().to_vec()
}

#[tokio::test]
async fn a_reconnecting_peer_replaces_its_connection_without_a_second_peer_connected() {
    let mut s = setup(SyncBridge::builder()).await;
    let mut first = s.connect(P).await;
    assert_eq!(
        next_event(&mut s.seen).await,
        SyncEvent::PeerConnected { peer_id: P.into() }
    );
    s.hub.publish(upsert("e1")).unwrap();
    assert_eq!(first.next(T).await.unwrap(), wire(&upsert("e1")));

    let mut second = s.connect(P).await;
    assert_eq!(
        report_matching(&mut s.reports, |r| matches!(
            r,
            BridgeEvent::ConnectionReplaced { .. }
        ))
        .await,
        BridgeEvent::ConnectionReplaced { peer_id: P.into() }
    );
    // The old connection is closed by the bridge; the new one carries everything after.
    assert_eq!(first.next(T).await, None);
    s.hub.publish(upsert("e2")).unwrap();
    assert_eq!(second.next(T).await.unwrap(), wire(&upsert("e2")));
    second.send(&wire(&upsert("from-p"))).await.unwrap();
    assert_eq!(next_event(&mut s.seen).await, upsert("e1"));
    assert_eq!(next_event(&mut s.seen).await, upsert("e2"));
    assert_eq!(next_event(&mut s.seen).await, upsert("from-p"));
    assert_eq!(s.bridge.peers(), [P]);
    assert_eq!(s.bridge.status().replaced, 1);

    // The peer leaves: PeerDisconnected once, and nothing else ever said it connected twice.
    second.close().await.unwrap();
    assert_eq!(
        next_event(&mut s.seen).await,
        SyncEvent::PeerDisconnected { peer_id: P.into() }
    );
    assert!(s.seen.is_empty());
    assert_eq!(
        report_matching(&mut s.reports, |r| matches!(
            r,
            BridgeEvent::PeerDisconnected { .. }
        ))
        .await,
        BridgeEvent::PeerDisconnected {
            peer_id: P.into(),
            reason: DisconnectReason::Closed
        }
    );
    // Back again after leaving: a new link, announced again.
    let _again = s.connect(P).await;
    assert_eq!(
        next_event(&mut s.seen).await,
        SyncEvent::PeerConnected { peer_id: P.into() }
    );
    s.bridge.stop().await.unwrap();
    assert_eq!(
        next_event(&mut s.seen).await,
        SyncEvent::PeerDisconnected { peer_id: P.into() }
    );
}

#[tokio::test]
async fn bad_frames_are_reported_and_the_link_stays() {
    let mut s = setup(SyncBridge::builder()).await;
    let mut p = s.connect(P).await;
    next_event(&mut s.seen).await;
    let mut forged_peer_event = vec![1, envelope::KIND_EVENT];
    let claim = SyncEvent::PeerConnected {
        peer_id: "someone-else".into(),
    };
    forged_peer_event.extend(codec::encode_event(&claim).unwrap());
    let bad: [(Vec<u8>, EnvelopeError); 5] = [
        (vec![], EnvelopeError::Truncated { len: 0 }),
        (
            vec![2, 1, 0],
            EnvelopeError::UnsupportedVersion {
                found: 2,
                supported: 1,
            },
        ),
        (vec![1, 9, 9], EnvelopeError::UnknownKind(9)),
        (
            vec![1, 1, 1, 7, 0, 0],
            EnvelopeError::Event(CodecError::UnknownTag(7)),
        ),
        (forged_peer_event, EnvelopeError::PeerEvent { event: claim }),
    ];
    for (bytes, _) in &bad {
        p.send(bytes).await.unwrap();
    }
    p.send(&wire(&upsert("fine"))).await.unwrap();
    for (_, error) in bad {
        assert_eq!(
            report_matching(&mut s.reports, |r| matches!(
                r,
                BridgeEvent::BadFrame { .. }
            ))
            .await,
            BridgeEvent::BadFrame {
                peer_id: P.into(),
                error
            }
        );
    }
    // Only the valid event reached the hub; the link is still up.
    assert_eq!(next_event(&mut s.seen).await, upsert("fine"));
    assert_eq!(s.bridge.status().bad_frames, 5);
    s.hub.publish(upsert("still-linked")).unwrap();
    assert_eq!(p.next(T).await.unwrap(), wire(&upsert("still-linked")));
    s.bridge.stop().await.unwrap();
}

#[tokio::test]
async fn messages_before_the_receiver_is_taken_are_dropped_and_reported() {
    let mut s = setup(SyncBridge::builder()).await;
    let mut p = s.connect(P).await;
    next_event(&mut s.seen).await;
    p.send(&envelope::encode_message(b"early").unwrap())
        .await
        .unwrap();
    assert_eq!(
        report_matching(&mut s.reports, |r| matches!(
            r,
            BridgeEvent::MessageDropped { .. }
        ))
        .await,
        BridgeEvent::MessageDropped {
            peer_id: P.into(),
            len: 5
        }
    );
    let mut messages = s.bridge.messages().unwrap();
    assert!(s.bridge.messages().is_none(), "taken once");
    p.send(&envelope::encode_message(b"later").unwrap())
        .await
        .unwrap();
    let (from, bytes) = messages.recv().await.unwrap();
    assert_eq!((from.as_str(), &bytes[..]), (P, &b"later"[..]));
    let st = s.bridge.status();
    assert_eq!((st.messages_dropped, st.messages_received), (1, 1));
    s.bridge.stop().await.unwrap();
    assert!(
        messages.recv().await.is_none(),
        "ends when the bridge stops"
    );
}

/// An application that does not read its messages stops the bridge reading from the peer
/// (backpressure), but events still go out to that peer, and nothing is lost.
#[tokio::test]
async fn a_full_message_queue_holds_back_reading_but_not_sending() {
    let mut s = setup(SyncBridge::builder().message_queue(1)).await;
    let mut messages = s.bridge.messages().unwrap();
    let mut p = s.connect(P).await;
    next_event(&mut s.seen).await;
    // One message in the application's queue (1), one waiting in the link, PIPE_QUEUE in
    // the pipe: the peer's writer then waits on the last.
    let sent = 3 + PIPE_QUEUE;
    let writer = tokio::spawn(async move {
        for i in 0..sent {
            let m = envelope::encode_message(format!("m{i}").as_bytes()).unwrap();
            p.send(&m).await.unwrap();
        }
        p
    });
    for i in 0..PIPE_QUEUE {
        s.hub.publish(upsert(&format!("out{i}"))).unwrap();
    }
    // Events go out while reading is held back.
    let deadline = tokio::time::Instant::now() + T;
    while s.bridge.status().events_sent < PIPE_QUEUE as u64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "events did not go out"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(!writer.is_finished(), "the bridge should not be reading");
    let (_, first) = messages.recv().await.unwrap();
    assert_eq!(&first[..], b"m0");
    let mut p = tokio::time::timeout(T, writer).await.unwrap().unwrap();
    // (Events waiting together travel in one envelope.)
    let mut got = Vec::new();
    while got.len() < PIPE_QUEUE {
        let frame = p.next(T).await.unwrap();
        got.extend_from_slice(envelope::decode(&frame).unwrap().events());
    }
    let want: Vec<SyncEvent> = (0..PIPE_QUEUE)
        .map(|i| upsert(&format!("out{i}")))
        .collect();
    assert_eq!(got, want);
    let mut got = Vec::new();
    while got.len() < sent - 1 {
        let (_, m) = tokio::time::timeout(T, messages.recv())
            .await
            .unwrap()
            .unwrap();
        got.push(String::from_utf8(m.to_vec()).unwrap());
    }
    let want: Vec<String> = (1..sent).map(|i| format!("m{i}")).collect();
    assert_eq!(got, want);
    s.bridge.stop().await.unwrap();
}

#[tokio::test]
async fn send_to_waits_for_room_and_cuts_a_peer_that_has_none() {
    let send_timeout = Duration::from_millis(300);
    let mut s = setup(
        SyncBridge::builder()
            .peer_queue(2)
            .send_timeout(send_timeout),
    )
    .await;
    let mut p = s.connect(P).await;
    next_event(&mut s.seen).await;
    // The pipe holds PIPE_QUEUE, the link holds one in its send, the queue 2.
    for i in 0..PIPE_QUEUE + 3 {
        s.bridge.send_to(P, format!("{i}")).await.unwrap();
    }
    // Full now: send_to waits, and the peer reading makes room in time.
    let (sent, first) = tokio::join!(s.bridge.send_to(P, "late"), async {
        tokio::time::sleep(send_timeout / 3).await;
        p.next(T).await
    });
    sent.unwrap();
    assert_eq!(first.unwrap(), envelope::encode_message(b"0").unwrap());
    // Nobody reads any more: a non-waiting send finds the queue full and cuts the peer.
    let err = loop {
        match s.bridge.try_send_to(P, "more") {
            Ok(()) => tokio::task::yield_now().await,
            Err(e) => break e,
        }
    };
    assert!(
        matches!(&err, BridgeError::PeerTooSlow { peer_id, reason: CutReason::QueueFull { .. } } if peer_id == P),
        "{err:?}"
    );
    assert!(err.to_string().contains("not keeping up"), "{err}");
    assert_eq!(
        next_event(&mut s.seen).await,
        SyncEvent::PeerDisconnected { peer_id: P.into() }
    );
    let report = report_matching(&mut s.reports, |r| {
        matches!(r, BridgeEvent::PeerDisconnected { .. })
    })
    .await;
    assert!(
        matches!(
            report,
            BridgeEvent::PeerDisconnected {
                reason: DisconnectReason::Cut(CutReason::QueueFull { queued: 2, .. }),
                ..
            }
        ),
        "{report:?}"
    );
    assert_eq!(s.bridge.status().peers_cut, 1);
    assert!(matches!(
        s.bridge.send_to(P, "x").await,
        Err(BridgeError::NotConnected { .. })
    ));
    s.bridge.stop().await.unwrap();
}

#[tokio::test]
async fn a_send_that_never_completes_cuts_the_peer() {
    let mut s = setup(SyncBridge::builder().send_timeout(Duration::from_millis(200))).await;
    let _p = s.connect(P).await; // never read
    next_event(&mut s.seen).await;
    // One event per transport message (each sent before the next is published) until the
    // pipe is full; the next send then never completes.
    for i in 0..PIPE_QUEUE as u64 {
        s.hub.publish(upsert(&i.to_string())).unwrap();
        let deadline = tokio::time::Instant::now() + T;
        while s.bridge.status().events_sent <= i {
            assert!(tokio::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    s.hub.publish(upsert("blocked")).unwrap();
    let report = report_matching(&mut s.reports, |r| {
        matches!(r, BridgeEvent::PeerDisconnected { .. })
    })
    .await;
    assert_eq!(
        report,
        BridgeEvent::PeerDisconnected {
            peer_id: P.into(),
            reason: DisconnectReason::Cut(CutReason::SendTimeout { ms: 200 })
        }
    );
    s.bridge.stop().await.unwrap();
}

#[tokio::test]
async fn limits_and_bad_calls_are_clear_errors() {
    let mut s = setup(SyncBridge::builder().max_peers(1)).await;
    let _a = s.connect("a").await;
    assert!(matches!(
        next_report(&mut s.reports).await,
        BridgeEvent::PeerConnected { .. }
    ));
    let mut b = s.connect("b").await;
    assert_eq!(
        next_report(&mut s.reports).await,
        BridgeEvent::PeerRefused {
            peer_id: "b".into(),
            max_peers: 1
        }
    );
    assert_eq!(b.next(T).await, None, "the refused connection is closed");
    assert_eq!(s.bridge.peers(), ["a"]);

    let err = s.bridge.try_send_to("nobody", b"x").unwrap_err();
    assert_eq!(
        err,
        BridgeError::NotConnected {
            peer_id: "nobody".into()
        }
    );
    let huge = vec![0u8; pluresdb_sync_bridge::MAX_BRIDGE_MESSAGE_BYTES + 1];
    assert!(matches!(
        s.bridge.broadcast(&huge).unwrap_err(),
        BridgeError::Envelope(EnvelopeError::MessageTooLarge { .. })
    ));
    // An event whose id the codec cannot carry is reported, and the link stays.
    s.hub
        .publish(upsert(&"x".repeat(codec::MAX_EVENT_ID_BYTES + 1)))
        .unwrap();
    assert!(matches!(
        next_report(&mut s.reports).await,
        BridgeEvent::EventNotSent { .. }
    ));
    assert_eq!(s.bridge.transport_name(), "feed");
    assert!(format!("{:?}", s.bridge).contains("feed"));
    s.bridge.stop().await.unwrap();
}

#[tokio::test]
async fn stop_closes_every_connection_and_announces_every_departure() {
    let mut s = setup(SyncBridge::builder()).await;
    let mut a = s.connect("a").await;
    let mut b = s.connect("b").await;
    next_event(&mut s.seen).await;
    next_event(&mut s.seen).await;
    s.bridge.stop().await.unwrap();
    assert_eq!(a.next(T).await, None);
    assert_eq!(b.next(T).await, None);
    let mut left = vec![next_event(&mut s.seen).await, next_event(&mut s.seen).await];
    left.sort_by_key(|e| format!("{e:?}"));
    assert_eq!(
        left,
        [
            SyncEvent::PeerDisconnected {
                peer_id: "a".into()
            },
            SyncEvent::PeerDisconnected {
                peer_id: "b".into()
            }
        ]
    );
    let report = report_matching(&mut s.reports, |r| {
        matches!(r, BridgeEvent::PeerDisconnected { .. })
    })
    .await;
    assert!(
        matches!(
            report,
            BridgeEvent::PeerDisconnected {
                reason: DisconnectReason::Stopped,
                ..
            }
        ),
        "{report:?}"
    );
    // The feed is gone with the bridge's task.
    assert!(s.feed.is_closed());
}

/// Two bridges on one pipe (a window of PIPE_QUEUE messages each way) publish bursts at
/// each other at once. Each link reads what arrived before every send, so neither ends up
/// waiting in `send` on the other: every event arrives and nobody is cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_bridges_bursting_at_each_other_through_a_small_window_never_deadlock() {
    const BURST: usize = 3000;
    let builder = SyncBridge::builder().send_timeout(Duration::from_secs(5));
    let (ta, feed_a) = FeedTransport::new();
    let (tb, feed_b) = FeedTransport::new();
    let (hub_a, hub_b) = (
        SyncBroadcaster::new(4 * BURST),
        SyncBroadcaster::new(4 * BURST),
    );
    let (mut seen_a, mut seen_b) = (hub_a.subscribe(), hub_b.subscribe());
    let topic = fresh_topic();
    let a = builder
        .clone()
        .start(Box::new(ta), topic, hub_a.clone())
        .await
        .unwrap();
    let b = builder
        .start(Box::new(tb), topic, hub_b.clone())
        .await
        .unwrap();
    let (a_end, b_end) = pipe("b", "a");
    feed_a.send(Box::new(a_end)).await.unwrap();
    feed_b.send(Box::new(b_end)).await.unwrap();
    next_event(&mut seen_a).await;
    next_event(&mut seen_b).await;
    for i in 0..BURST {
        hub_a.publish(upsert(&format!("a{i}"))).unwrap();
        hub_b.publish(upsert(&format!("b{i}"))).unwrap();
    }
    for (seen, me, other) in [(&mut seen_a, "a", "b"), (&mut seen_b, "b", "a")] {
        let (mut mine, mut theirs) = (0, 0);
        while theirs < BURST {
            match next_event(seen).await {
                SyncEvent::NodeUpsert { id } if id == format!("{me}{mine}") => mine += 1,
                SyncEvent::NodeUpsert { id } => {
                    assert_eq!(id, format!("{other}{theirs}"));
                    theirs += 1;
                }
                e => panic!("{e:?}"),
            }
        }
    }
    assert_eq!(a.status().peers_cut + b.status().peers_cut, 0);
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}
