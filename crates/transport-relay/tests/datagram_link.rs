//! The datagram link (relay protocol v2) against a real relay server on loopback: membership,
//! datagrams both ways (single and batched), the relay restarting, closing.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use pluresdb_sync_transport_relay::server::{RelayServer, RelayServerConfig};
use pluresdb_sync_transport_relay::testkit::{WAIT, relay};
use pluresdb_sync_transport_relay::{
    Datagram, DatagramLink, LinkEvent, LinkReceivers, RelayTransportBuilder, datagrams_of,
};

const ROOM: [u8; 32] = [0x42; 32];

fn link(url: &str) -> (DatagramLink, LinkReceivers) {
    RelayTransportBuilder::default()
        .relay_url(url)
        .no_proxy()
        .build_datagram_link()
        .unwrap()
}

async fn event(rx: &mut LinkReceivers) -> LinkEvent {
    tokio::time::timeout(WAIT, rx.events.recv())
        .await
        .expect("no link event in time")
        .expect("the event receiver ended")
}

async fn datagram(rx: &mut LinkReceivers) -> Datagram {
    tokio::time::timeout(WAIT, rx.datagrams.recv())
        .await
        .expect("no datagram in time")
        .expect("the datagram receiver ended")
}

/// Waits for the `Connected` and `Joined` of a new socket (what the old socket still
/// reported before is skipped): its number, our id, the members.
async fn joined(rx: &mut LinkReceivers) -> (u64, u64, Vec<u64>) {
    let (link, me) = loop {
        match event(rx).await {
            LinkEvent::Connected { link, me, .. } => break (link, me),
            LinkEvent::MemberLeft { .. } | LinkEvent::Disconnected { .. } => {}
            other => panic!("expected Connected, got {other:?}"),
        }
    };
    match event(rx).await {
        LinkEvent::Joined {
            link: l,
            room,
            members,
        } => {
            assert_eq!((l, room), (link, ROOM));
            (link, me, members)
        }
        other => panic!("expected Joined, got {other:?}"),
    }
}

#[tokio::test]
async fn members_meet_and_exchange_single_and_batched_datagrams() {
    let (server, url) = relay().await.unwrap();
    let (a, mut a_rx) = link(&url);
    let (b, mut b_rx) = link(&url);
    a.join(ROOM);
    let (a_link, a_id, members) = joined(&mut a_rx).await;
    assert!(members.is_empty());
    b.join(ROOM);
    let (b_link, b_id, members) = joined(&mut b_rx).await;
    assert_eq!(members, vec![a_id]);
    assert_eq!(
        event(&mut a_rx).await,
        LinkEvent::MemberJoined {
            link: a_link,
            room: ROOM,
            member: b_id
        }
    );
    assert!(b.send(b_link, ROOM, a_id, 0, b"one datagram"));
    let d = datagram(&mut a_rx).await;
    assert_eq!((d.link, d.room, d.from, d.segment), (a_link, ROOM, b_id, 0));
    assert_eq!(&d.payload[..], b"one datagram");
    // A GSO-style batch of 100 datagrams of 1200 bytes (the last shorter) crosses in as few
    // frames as the 64 KiB frame limit allows, and splits back into the same datagrams.
    let sent: Vec<Vec<u8>> = (0..100u8)
        .map(|i| vec![i; if i == 99 { 300 } else { 1200 }])
        .collect();
    let batch: Vec<u8> = sent.concat();
    assert!(a.send(a_link, ROOM, b_id, 1200, &batch));
    let mut got: Vec<Vec<u8>> = Vec::new();
    let mut frames = 0;
    while got.len() < sent.len() {
        let d = datagram(&mut b_rx).await;
        assert_eq!(d.from, a_id);
        frames += 1;
        got.extend(datagrams_of(d.segment, &d.payload).map(<[u8]>::to_vec));
    }
    assert_eq!(got, sent);
    assert_eq!(frames, 2, "54 datagrams of 1200 bytes fit one 64 KiB frame");
    assert_eq!(a.stats().sent, 2);
    assert_eq!(b.stats().received, 2);
    // A send on a socket number that is not (or no longer) the link's is dropped.
    assert!(!a.send(a_link + 1, ROOM, b_id, 0, b"stale"));
    assert_eq!(a.stats().send_dropped, 1);
    // Closing one side: the other sees it leave.
    b.close();
    assert_eq!(
        event(&mut a_rx).await,
        LinkEvent::MemberLeft {
            link: a_link,
            room: ROOM,
            member: b_id
        }
    );
    assert!(
        tokio::time::timeout(WAIT, b_rx.events.recv())
            .await
            .unwrap()
            .is_some_and(|e| matches!(e, LinkEvent::Disconnected { .. }))
    );
    server.shutdown().await;
}

/// quinn hands the socket at most 10 packets per transmit: batches queued one after another
/// for the same member are joined into frames up to the 64 KiB limit (full-size runs only),
/// and the receiver splits out exactly the datagrams sent, in order.
#[tokio::test]
async fn queued_batches_to_one_member_are_joined_into_larger_frames() {
    let (server, url) = relay().await.unwrap();
    let (a, mut a_rx) = link(&url);
    let (b, mut b_rx) = link(&url);
    a.join(ROOM);
    let (a_link, a_id, _) = joined(&mut a_rx).await;
    b.join(ROOM);
    let (_, b_id, _) = joined(&mut b_rx).await;
    assert!(matches!(
        event(&mut a_rx).await,
        LinkEvent::MemberJoined { .. }
    ));
    // Nine batches, sent without yielding (so all are queued before the writer runs): eight
    // of 10 x 1200 bytes, the last of 5 x 1200 and one of 500.
    let mut sent: Vec<Vec<u8>> = Vec::new();
    for batch in 0..9u8 {
        let lens: Vec<usize> = if batch == 8 {
            vec![1200, 1200, 1200, 1200, 1200, 500]
        } else {
            vec![1200; 10]
        };
        let datagrams: Vec<Vec<u8>> = lens
            .iter()
            .enumerate()
            .map(|(i, &len)| vec![batch.wrapping_mul(16).wrapping_add(i as u8); len])
            .collect();
        assert!(a.send(a_link, ROOM, b_id, 1200, &datagrams.concat()));
        sent.extend(datagrams);
    }
    assert_eq!(a.stats().sent, 9);
    let mut got: Vec<Vec<u8>> = Vec::new();
    let mut frames = 0;
    while got.len() < sent.len() {
        let d = datagram(&mut b_rx).await;
        assert_eq!((d.from, d.segment), (a_id, 1200));
        assert!(d.payload.len() <= 65_536 - 43);
        frames += 1;
        got.extend(datagrams_of(d.segment, &d.payload).map(<[u8]>::to_vec));
    }
    assert_eq!(got, sent);
    assert_eq!(
        frames, 2,
        "five batches of 12,000 bytes fit a 64 KiB frame, then the rest"
    );
    server.shutdown().await;
}

/// The relay restarts: each link reports the socket gone, redials with backoff, joins the
/// room again on a new socket (a new number, new connection ids) and datagrams flow again.
#[tokio::test]
async fn links_rejoin_a_restarted_relay() {
    let (server, url) = relay().await.unwrap();
    let addr = server.local_addr();
    let (a, mut a_rx) = link(&url);
    let (b, mut b_rx) = link(&url);
    a.join(ROOM);
    let (a_link, ..) = joined(&mut a_rx).await;
    b.join(ROOM);
    joined(&mut b_rx).await;
    assert!(matches!(
        event(&mut a_rx).await,
        LinkEvent::MemberJoined { .. }
    ));
    server.shutdown().await;
    // (b's socket may end first: a then sees b leave before its own socket goes.)
    loop {
        match event(&mut a_rx).await {
            LinkEvent::Disconnected { link, .. } => break assert_eq!(link, a_link),
            LinkEvent::MemberLeft { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    let _restarted = RelayServer::bind(addr, RelayServerConfig::default())
        .await
        .unwrap();
    let (a_link2, _, a_members) = joined(&mut a_rx).await;
    assert!(a_link2 > a_link);
    let (_, b_id2, _) = joined(&mut b_rx).await;
    // a sees b in the room: listed when it joined, or joining after it.
    let mut b_seen = a_members.contains(&b_id2);
    while !b_seen {
        b_seen = matches!(
            event(&mut a_rx).await,
            LinkEvent::MemberJoined { member, .. } if member == b_id2
        );
    }
    let b_new = b_id2;
    assert!(a.send(a_link2, ROOM, b_new, 0, b"after the restart"));
    let d = datagram(&mut b_rx).await;
    assert_eq!(&d.payload[..], b"after the restart");
    assert!(
        a.recent_errors()
            .iter()
            .any(|e| e.to_string().contains("relay")),
        "{:?}",
        a.recent_errors()
    );
}
