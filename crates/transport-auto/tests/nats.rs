//! Auto mode across a scaled-out relay: two peers, each given a different relay node of one
//! NATS bus (a REAL nats-server on a free loopback port, two relay servers in this process),
//! connect through the relayed path, whose QUIC packets cross the nodes as DATAGRAMs over
//! NATS.
//!
//! Without `nats-server` (`/usr/sbin/nats-server` on Debian) this test skips, except with
//! `CI=true`, where it fails.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use pluresdb_sync_core::testkit::fresh_topic;
use pluresdb_sync_core::{Connection, Transport};
use pluresdb_sync_transport_auto::AutoTransport;
use pluresdb_sync_transport_hyperswarm::relay_path::PeerAddress;
use pluresdb_sync_transport_hyperswarm::testkit::LoopbackDht;
use pluresdb_sync_transport_relay::server::{RelayServer, RelayServerConfig};
use pluresdb_sync_transport_relay::testkit::nats::NatsServer;
use pluresdb_sync_transport_relay::testkit::relay_with;

use common::{T, accept, init_tracing, recv};

/// A relay node on `nats`.
async fn node(nats: &NatsServer) -> (RelayServer, String) {
    let config = RelayServerConfig::builder()
        .nats_url(Some(nats.url()))
        .build()
        .unwrap();
    relay_with(config).await.unwrap()
}

/// An Auto transport on `relay` only, with the DHT and direct UDP off: every packet crosses
/// the relay.
fn relayed_only(dht: &LoopbackDht, relay: &str) -> AutoTransport {
    AutoTransport::builder()
        .hyperswarm(|_| dht.test_builder())
        .relay_url(relay)
        .no_proxy()
        .bind_addr(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
        .timeout(Duration::from_secs(10))
        .dht(false)
        .direct(false)
        .build()
        .unwrap()
}

/// The value of a metric line of `relay`.
fn metric(relay: &RelayServer, name: &str) -> u64 {
    let text = relay.metrics_text();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

/// Sends `count` numbered messages from `from` and checks `to` receives each exactly once,
/// in order.
async fn in_order(from: &mut Box<dyn Connection>, to: &mut Box<dyn Connection>, count: u32) {
    let send = async {
        for i in 0..count {
            let mut msg = i.to_be_bytes().to_vec();
            msg.resize(4 + (i as usize % 7) * 300, i as u8);
            from.send(&msg).await.unwrap();
        }
    };
    let receive = async {
        for i in 0..count {
            let msg = recv(to).await.expect("the connection ended");
            assert_eq!(msg[..4], i.to_be_bytes(), "message {i} out of order");
            assert_eq!(msg.len(), 4 + (i as usize % 7) * 300);
        }
    };
    tokio::join!(send, receive);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_on_two_relay_nodes_connect_through_the_relayed_path() {
    init_tracing();
    let Some(nats) = NatsServer::start_or_skip().await else {
        return;
    };
    let (n1, url1) = node(&nats).await;
    let (n2, url2) = node(&nats).await;
    let dht = LoopbackDht::start().await.unwrap();
    let mut a = relayed_only(&dht, &url1);
    let mut b = relayed_only(&dht, &url2);
    let topic = fresh_topic("auto-nats");
    let (ra, rb) = tokio::join!(a.connect(topic), b.connect(topic));
    let (mut ra, mut rb) = (ra.unwrap(), rb.unwrap());
    let (mut ca, mut cb) = tokio::join!(accept(&mut ra), accept(&mut rb));
    assert_eq!(ca.peer_id(), b.peer_id());
    assert_eq!(cb.peer_id(), a.peer_id());
    in_order(&mut ca, &mut cb, 2_000).await;
    in_order(&mut cb, &mut ca, 2_000).await;
    // One large message each way, many QUIC packets.
    let big = vec![0x42; 300_000];
    ca.send(&big).await.unwrap();
    assert_eq!(recv(&mut cb).await.as_deref(), Some(&big[..]));
    cb.send(&big).await.unwrap();
    assert_eq!(recv(&mut ca).await.as_deref(), Some(&big[..]));
    for t in [&a, &b] {
        let s = t.path_stats();
        assert!(s.relayed_out > 0 && s.relayed_in > 0, "{s:?}");
        let listed = t.verified_addresses();
        assert!(
            listed
                .iter()
                .all(|(_, at)| matches!(at, PeerAddress::Relayed(_))),
            "{listed:?}"
        );
    }
    let verified = a.verified_addresses().len() + b.verified_addresses().len();
    assert!(
        verified > 0,
        "the dialling side verified its peer's relay route"
    );
    // The packets crossed the nodes over NATS, both ways.
    for n in [&n1, &n2] {
        assert!(metric(n, "pluresdb_relay_nats_datagrams_published_total") > 0);
        assert!(metric(n, "pluresdb_relay_datagrams_forwarded_total") > 0);
    }
    // Exactly one connection each.
    assert!(ra.try_recv().is_err() && rb.try_recv().is_err());
    a.disconnect().await.unwrap();
    assert_eq!(
        tokio::time::timeout(T, cb.receive())
            .await
            .unwrap()
            .unwrap_or(None),
        None,
        "disconnect ends the remote's connection"
    );
    b.disconnect().await.unwrap();
    n1.shutdown().await;
    n2.shutdown().await;
    dht.stop().await.unwrap();
    nats.stop().await;
}
