//! A connected pair of transports for tests that attack a third party's view of them, and
//! the check that their connection is still served.

use std::time::Duration;

use pluresdb_sync_core::{Connection, Transport};
use pluresdb_sync_transport_hyperswarm::HyperswarmTransport;
use pluresdb_sync_transport_hyperswarm::testkit::LoopbackDht;

use super::next_conn;

/// Two joined transports with their connection to each other.
pub struct Pair {
    pub a: HyperswarmTransport,
    pub b: HyperswarmTransport,
    pub ca: Box<dyn Connection>,
    pub cb: Box<dyn Connection>,
}

pub async fn pair(dht: &LoopbackDht, topic: [u8; 32]) -> Pair {
    let mut a = dht.transport().unwrap();
    let mut b = dht.transport().unwrap();
    let (ra, rb) = tokio::join!(a.connect(topic), b.connect(topic));
    let (mut ra, mut rb) = (ra.unwrap(), rb.unwrap());
    let ca = next_conn(&mut ra, Duration::from_secs(30)).await;
    let cb = next_conn(&mut rb, Duration::from_secs(30)).await;
    // Keep the receivers alive for the test's duration.
    std::mem::forget(ra);
    std::mem::forget(rb);
    Pair { a, b, ca, cb }
}

pub async fn still_served(p: &mut Pair, n: usize) {
    for i in 0..n {
        let msg = format!("message {i}").repeat(100);
        p.ca.send(msg.as_bytes()).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(20), p.cb.receive())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.as_deref(), Some(msg.as_bytes()), "message {i}");
    }
    p.cb.send(b"and back").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(20), p.ca.receive())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.as_deref(), Some(&b"and back"[..]));
}
