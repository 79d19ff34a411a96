//! An attacker who can send UDP to a peer's data socket (no topic, no connection of its own)
//! sends path probes by the thousand while a connection is direct: pings and pongs in the
//! probe format with made-up path ids, nonces and tags, from either side, truncated and
//! overlong ones. None of it may move the connection's path, get an answer (no reflection or
//! amplification through the probe responder) or disturb the connection.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::Duration;

use pluresdb_sync_core::Transport;
use pluresdb_sync_core::testkit::fresh_topic;
use pluresdb_sync_transport_auto::AutoTransport;
use pluresdb_sync_transport_auto::testkit::AutoNet;
use pluresdb_sync_transport_hyperswarm::relay_path::{PathInfo, PeerPath};
use tokio::sync::broadcast;

use common::{T, accept, init_tracing, recv};

/// The probe format of docs/architecture.md (Auto mode, "Proof"): magic, kind, side, path
/// id (8), nonce (8), tag (16).
const MAGIC: &[u8] = b"\x00pluresdb-sync/path/v1";
const PROBE_LEN: usize = 22 + 1 + 1 + 8 + 8 + 16;

/// A small deterministic generator (xorshift64*): the attack is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.next() as u8;
        }
    }
}

/// The `i`-th forged datagram: mostly well-formed probes with wrong ids and tags, some
/// malformed ones.
fn forged(rng: &mut Rng, i: usize) -> Vec<u8> {
    let mut p = MAGIC.to_vec();
    p.push(1 + (i % 2) as u8); // ping, pong
    p.push(((i / 2) % 2) as u8); // client, server
    let mut rest = [0u8; 32];
    rng.fill(&mut rest);
    p.extend_from_slice(&rest);
    assert_eq!(p.len(), PROBE_LEN);
    match i % 10 {
        7 => p.truncate(PROBE_LEN - 1 - (i % 5)),
        8 => p.extend_from_slice(&[0; 9]),
        9 => p[MAGIC.len()] = 0xff, // an unknown kind
        _ => {}
    }
    p
}

async fn wait_direct(events: &mut broadcast::Receiver<PathInfo>, peer: &str) -> PathInfo {
    tokio::time::timeout(T, async {
        loop {
            let e = events.recv().await.expect("path events ended");
            if e.peer_id == peer && matches!(e.path, PeerPath::Direct(_)) {
                return e;
            }
        }
    })
    .await
    .expect("the connection did not go direct in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_probes_neither_move_the_path_nor_get_an_answer() {
    init_tracing();
    let net = AutoNet::start().await.unwrap();
    let mut a: AutoTransport = net.builder().dht(false).build().unwrap();
    let mut b: AutoTransport = net.builder().dht(false).build().unwrap();
    let (mut ea, mut eb) = (a.path_events(), b.path_events());
    let topic = fresh_topic("hostile-probes");
    let (ra, rb) = tokio::join!(a.connect(topic), b.connect(topic));
    let (mut ra, mut rb) = (ra.unwrap(), rb.unwrap());
    let (mut ca, mut cb) = tokio::join!(accept(&mut ra), accept(&mut rb));
    let (a_addr, b_addr) = (a.local_addr().unwrap(), b.local_addr().unwrap());
    assert_eq!(
        wait_direct(&mut ea, &b.peer_id()).await.path,
        PeerPath::Direct(b_addr)
    );
    assert_eq!(
        wait_direct(&mut eb, &a.peer_id()).await.path,
        PeerPath::Direct(a_addr)
    );

    // The attack, to both peers, with messages crossing the connection meanwhile.
    let attacker = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    const FORGED: usize = 4_000;
    for i in 0..FORGED {
        let target = if i % 2 == 0 { a_addr } else { b_addr };
        attacker
            .send_to(&forged(&mut rng, i), target)
            .await
            .unwrap();
        if i % 200 == 0 {
            let n = (i as u32).to_be_bytes();
            ca.send(&n).await.unwrap();
            assert_eq!(
                recv(&mut cb).await.unwrap(),
                n,
                "a message in order mid-attack"
            );
            cb.send(&n).await.unwrap();
            assert_eq!(recv(&mut ca).await.unwrap(), n);
        }
    }
    // Both sockets have read everything the attacker sent before these round trips.
    for i in 0..50u32 {
        ca.send(&i.to_be_bytes()).await.unwrap();
        assert_eq!(recv(&mut cb).await.unwrap(), i.to_be_bytes());
        cb.send(&i.to_be_bytes()).await.unwrap();
        assert_eq!(recv(&mut ca).await.unwrap(), i.to_be_bytes());
    }

    // Nothing answered the attacker: not one pong, not one ping to its address.
    let mut buf = [0u8; 2048];
    let answer =
        tokio::time::timeout(Duration::from_millis(500), attacker.recv_from(&mut buf)).await;
    assert!(
        answer.is_err(),
        "a forged probe got an answer: {:?}",
        answer
    );
    // The path never moved: no event since the direct one, and still direct to the peer.
    assert!(
        matches!(ea.try_recv(), Err(broadcast::error::TryRecvError::Empty)),
        "a path event on a's side during the attack"
    );
    assert!(
        matches!(eb.try_recv(), Err(broadcast::error::TryRecvError::Empty)),
        "a path event on b's side during the attack"
    );
    assert_eq!(a.paths().len(), 1);
    assert_eq!(a.paths()[0].path, PeerPath::Direct(b_addr));
    assert_eq!(b.paths()[0].path, PeerPath::Direct(a_addr));
    a.disconnect().await.unwrap();
    b.disconnect().await.unwrap();
    net.stop().await.unwrap();
}
