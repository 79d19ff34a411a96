//! Milestone 2 on loopback, with a real relay server in this process: two Auto peers that
//! meet only in the relay room (DHT off, direct UDP on) connect through the relay, then the
//! one connection moves to the direct path; the path is visible through `paths()` and
//! `path_events()`, and the data socket's counters show the bytes going direct.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::{Duration, Instant};

use pluresdb_sync_core::Transport;
use pluresdb_sync_core::testkit::fresh_topic;
use pluresdb_sync_transport_auto::AutoTransport;
use pluresdb_sync_transport_auto::testkit::AutoNet;
use pluresdb_sync_transport_hyperswarm::relay_path::{PathInfo, PeerPath};
use tokio::sync::broadcast;

use common::{T, accept, init_tracing, recv};

/// Waits for a path event of `peer` matching `want`.
async fn wait_path(
    events: &mut broadcast::Receiver<PathInfo>,
    peer: &str,
    want: impl Fn(&PeerPath) -> bool,
) -> PathInfo {
    tokio::time::timeout(T, async {
        loop {
            let e = events.recv().await.expect("path events ended");
            if e.peer_id == peer && want(&e.path) {
                return e;
            }
        }
    })
    .await
    .expect("no such path event in time")
}

/// Peers met in the relay room start relayed and are direct (to each other's data socket)
/// shortly after (printed: well under a second on loopback); messages then cross the direct
/// path, the same connection throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_connection_moves_to_the_direct_path() {
    init_tracing();
    let net = AutoNet::start().await.unwrap();
    let mut a: AutoTransport = net.builder().dht(false).build().unwrap();
    let mut b: AutoTransport = net.builder().dht(false).build().unwrap();
    let (mut ea, mut eb) = (a.path_events(), b.path_events());
    let topic = fresh_topic("upgrade");
    let started = Instant::now();
    let (ra, rb) = tokio::join!(a.connect(topic), b.connect(topic));
    let (mut ra, mut rb) = (ra.unwrap(), rb.unwrap());
    let (mut ca, mut cb) = tokio::join!(accept(&mut ra), accept(&mut rb));
    let connected = started.elapsed();
    // First relayed (the way they met), via this relay.
    let first = wait_path(&mut ea, &b.peer_id(), |_| true).await;
    assert_eq!(
        first.path,
        PeerPath::Relayed {
            url: net.relay_url().to_owned()
        }
    );
    assert_eq!(first.topic, topic);
    // Then direct, to the other's data socket.
    let (b_addr, a_addr) = (b.local_addr().unwrap(), a.local_addr().unwrap());
    let da = wait_path(&mut ea, &b.peer_id(), |p| matches!(p, PeerPath::Direct(_))).await;
    let db = wait_path(&mut eb, &a.peer_id(), |p| matches!(p, PeerPath::Direct(_))).await;
    let direct = started.elapsed();
    eprintln!(
        "relay room: connected in {} ms, direct in {} ms",
        connected.as_millis(),
        direct.as_millis()
    );
    assert_eq!(da.path, PeerPath::Direct(b_addr));
    assert_eq!(db.path, PeerPath::Direct(a_addr));
    assert_eq!(a.paths(), vec![da.clone()]);
    assert_eq!(b.paths(), vec![db.clone()]);
    // The same connection carries on, now over UDP.
    let before = (a.path_stats(), b.path_stats());
    let big = vec![9u8; 2_000_000];
    for i in 0..20u32 {
        ca.send(&i.to_be_bytes()).await.unwrap();
        assert_eq!(recv(&mut cb).await.unwrap(), i.to_be_bytes());
    }
    // Larger than the stream window: sent and read at once.
    let (sent, got) = tokio::join!(ca.send(&big), recv(&mut cb));
    sent.unwrap();
    assert_eq!(got.unwrap().len(), big.len());
    let (sent, got) = tokio::join!(cb.send(&big), recv(&mut ca));
    sent.unwrap();
    assert_eq!(got.unwrap().len(), big.len());
    let after = (a.path_stats(), b.path_stats());
    for (then, now) in [(before.0, after.0), (before.1, after.1)] {
        let direct_out = now.upgraded_out_bytes - then.upgraded_out_bytes;
        let direct_in = now.upgraded_in_bytes - then.upgraded_in_bytes;
        assert!(
            direct_out >= 2_000_000 && direct_in > 0,
            "bytes went direct: {then:?} -> {now:?}"
        );
        // Hardly anything crossed the relay meanwhile (packets in flight at the switch).
        assert!(
            now.relayed_out - then.relayed_out < 50,
            "{then:?} -> {now:?}"
        );
    }
    a.disconnect().await.unwrap();
    b.disconnect().await.unwrap();
    net.stop().await.unwrap();
}

/// With direct UDP off nothing is probed or switched: the connection stays relayed, and
/// `paths()` says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_direct_udp_the_connection_stays_relayed() {
    let net = AutoNet::start().await.unwrap();
    let mut a = net.relayed_only().build().unwrap();
    let mut b = net.relayed_only().build().unwrap();
    let topic = fresh_topic("no-upgrade");
    let (ra, rb) = tokio::join!(a.connect(topic), b.connect(topic));
    let (mut ra, mut rb) = (ra.unwrap(), rb.unwrap());
    let (mut ca, mut cb) = tokio::join!(accept(&mut ra), accept(&mut rb));
    for i in 0..50u32 {
        ca.send(&i.to_be_bytes()).await.unwrap();
        assert_eq!(recv(&mut cb).await.unwrap(), i.to_be_bytes());
    }
    let relayed = PeerPath::Relayed {
        url: net.relay_url().to_owned(),
    };
    assert_eq!(
        a.paths().into_iter().map(|p| p.path).collect::<Vec<_>>(),
        vec![relayed.clone()]
    );
    assert_eq!(
        b.paths().into_iter().map(|p| p.path).collect::<Vec<_>>(),
        vec![relayed]
    );
    let s = a.path_stats();
    assert_eq!((s.upgraded_out, s.upgraded_in), (0, 0), "{s:?}");
    a.disconnect().await.unwrap();
    b.disconnect().await.unwrap();
    net.stop().await.unwrap();
}

/// A connection that went direct does not notice the relay going away: the relay restarts
/// (every relay route is lost), and the same connection carries on over UDP; the peers,
/// back in the room, dial each other through the new routes and keep the one connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_connection_survives_a_relay_restart() {
    init_tracing();
    let mut net = AutoNet::start().await.unwrap();
    let mut a: AutoTransport = net.builder().dht(false).build().unwrap();
    let mut b: AutoTransport = net.builder().dht(false).build().unwrap();
    let (mut ea, mut eb) = (a.path_events(), b.path_events());
    let topic = fresh_topic("upgrade-restart");
    let (ra, rb) = tokio::join!(a.connect(topic), b.connect(topic));
    let (mut ra, mut rb) = (ra.unwrap(), rb.unwrap());
    let (mut ca, mut cb) = tokio::join!(accept(&mut ra), accept(&mut rb));
    wait_path(&mut ea, &b.peer_id(), |p| matches!(p, PeerPath::Direct(_))).await;
    wait_path(&mut eb, &a.peer_id(), |p| matches!(p, PeerPath::Direct(_))).await;
    net.restart_relay().await.unwrap();
    // Every relay route is gone (milestone 1 closed relay-made connections then); this one
    // carries on.
    for i in 0..200u32 {
        ca.send(&i.to_be_bytes()).await.unwrap();
        assert_eq!(recv(&mut cb).await.unwrap(), i.to_be_bytes());
        cb.send(&i.to_be_bytes()).await.unwrap();
        assert_eq!(recv(&mut ca).await.unwrap(), i.to_be_bytes());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // No second connection was handed out: the relay-made duplicates were refused.
    assert!(ra.try_recv().is_err() && rb.try_recv().is_err());
    assert!(
        matches!(
            a.paths()[..],
            [PathInfo {
                path: PeerPath::Direct(_),
                ..
            }]
        ),
        "{:?}",
        a.paths()
    );
    a.disconnect().await.unwrap();
    b.disconnect().await.unwrap();
    net.stop().await.unwrap();
}
