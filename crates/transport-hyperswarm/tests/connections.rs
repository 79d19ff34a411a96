//! Connection life: loss of a peer mid-transfer, redial when it comes back, the peer bound.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use common::{UdpProxy, free_udp_port, next_conn};
use pluresdb_sync_core::testkit::fresh_topic;
use pluresdb_sync_core::{Connection, Transport};
use pluresdb_sync_transport_hyperswarm::HyperswarmTransport;
use pluresdb_sync_transport_hyperswarm::testkit::LoopbackDht;

/// A transport whose every packet goes through a proxy it announces instead of itself.
async fn behind_proxy(dht: &LoopbackDht) -> (HyperswarmTransport, UdpProxy) {
    let port = free_udp_port();
    let proxy = UdpProxy::start(([127, 0, 0, 1], port).into()).await;
    let t = dht
        .test_builder()
        .bind_addr(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
        .announce_port(proxy.addr.port())
        .build()
        .unwrap();
    (t, proxy)
}

async fn ping(a: &mut Box<dyn Connection>, b: &mut Box<dyn Connection>, msg: &[u8]) {
    a.send(msg).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), b.receive())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.as_deref(), Some(msg));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_peer_ends_receive_then_is_redialled_when_back() {
    common::init_tracing();
    let dht = LoopbackDht::start().await.unwrap();
    let topic = fresh_topic("loss");
    let (mut a, proxy_a) = behind_proxy(&dht).await;
    let (mut b, proxy_b) = behind_proxy(&dht).await;
    let (ra, rb) = tokio::join!(a.connect(topic), b.connect(topic));
    let (mut ra, mut rb) = (ra.unwrap(), rb.unwrap());
    let mut ca = next_conn(&mut ra, Duration::from_secs(30)).await;
    let mut cb = next_conn(&mut rb, Duration::from_secs(30)).await;
    assert_eq!(ca.peer_id(), b.peer_id());
    assert_eq!(cb.peer_id(), a.peer_id());
    ping(&mut ca, &mut cb, b"before").await;
    ping(&mut cb, &mut ca, b"before").await;

    // A streams large messages; mid-transfer both paths go silent.
    let sender = tokio::spawn(async move {
        let big = vec![5u8; 4 * 1024 * 1024];
        loop {
            if let Err(e) = ca.send(&big).await {
                return (ca, e);
            }
        }
    });
    let first = tokio::time::timeout(Duration::from_secs(10), cb.receive())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.map(|m| m.len()), Some(4 * 1024 * 1024));
    proxy_a.set_blackhole(true);
    proxy_b.set_blackhole(true);
    let lost = Instant::now();
    // The receiver drains what already arrived, then sees the end (idle timeout 3 s; the
    // bounds below are hang guards with room for a loaded CI machine, not timings).
    loop {
        match tokio::time::timeout(Duration::from_secs(15), cb.receive())
            .await
            .expect("receive hung after the peer went silent")
        {
            Ok(Some(_)) => continue,
            Ok(None) => break,
            Err(e) => panic!("receive failed instead of ending: {e:#}"),
        }
    }
    let (mut ca, err) = tokio::time::timeout(Duration::from_secs(15), sender)
        .await
        .expect("send hung after the peer went silent")
        .unwrap();
    assert!(err.to_string().contains("closed"), "{err}");
    assert!(
        lost.elapsed() < Duration::from_secs(25),
        "{:?}",
        lost.elapsed()
    );
    assert_eq!(ca.receive().await.unwrap(), None);

    // Back online: rediscovered and redialled (after backoff), one new connection each.
    proxy_a.set_blackhole(false);
    proxy_b.set_blackhole(false);
    let mut ca = next_conn(&mut ra, Duration::from_secs(45)).await;
    let mut cb = next_conn(&mut rb, Duration::from_secs(45)).await;
    ping(&mut ca, &mut cb, b"after").await;
    ping(&mut cb, &mut ca, b"after").await;
    a.disconnect().await.unwrap();
    b.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_peers_bounds_the_connections() {
    common::init_tracing();
    let dht = LoopbackDht::start().await.unwrap();
    let topic = fresh_topic("max-peers");
    let mut small = dht.test_builder().max_peers(1).build().unwrap();
    let mut others: Vec<HyperswarmTransport> = (0..3).map(|_| dht.transport().unwrap()).collect();
    let mut rx = small.connect(topic).await.unwrap();
    let mut other_rx = Vec::new();
    for o in &mut others {
        other_rx.push(o.connect(topic).await.unwrap());
    }
    let mut first = next_conn(&mut rx, Duration::from_secs(30)).await;
    // The others reach each other: 2 connections each, so they are all up and dialling.
    let mut held = Vec::new();
    for r in &mut other_rx {
        for _ in 0..2 {
            held.push(next_conn(r, Duration::from_secs(30)).await);
        }
    }
    assert!(
        tokio::time::timeout(Duration::from_secs(4), rx.recv())
            .await
            .is_err(),
        "a transport with max_peers 1 accepted a second peer"
    );
    // The one connection works.
    first.send(b"still served").await.unwrap();
    small.disconnect().await.unwrap();
    for o in &mut others {
        o.disconnect().await.unwrap();
    }
}

/// User + system CPU time of this process, from /proc (clock ticks of 10 ms).
#[cfg(target_os = "linux")]
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joined_idle_transports_do_not_spin() {
    common::init_tracing();
    let dht = LoopbackDht::start().await.unwrap();
    let topic = fresh_topic("idle");
    let mut a = dht.transport().unwrap();
    let mut b = dht.transport().unwrap();
    let (ra, rb) = tokio::join!(a.connect(topic), b.connect(topic));
    let (mut ra, mut rb) = (ra.unwrap(), rb.unwrap());
    let _ca = next_conn(&mut ra, Duration::from_secs(30)).await;
    let _cb = next_conn(&mut rb, Duration::from_secs(30)).await;
    // Let the first lookups settle, then measure the whole process (the DHT testnet too).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (cpu0, wall0) = (cpu_time(), Instant::now());
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (cpu, wall) = (cpu_time() - cpu0, wall0.elapsed());
    let share = cpu.as_secs_f64() / wall.as_secs_f64();
    eprintln!(
        "idle: {cpu:?} CPU in {wall:?} ({:.2}% of a core)",
        share * 100.0
    );
    assert!(
        share < 0.10,
        "idle transports used {:.1}% of a core",
        share * 100.0
    );
    a.disconnect().await.unwrap();
    b.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_transport_closes_its_connections() {
    common::init_tracing();
    let dht = LoopbackDht::start().await.unwrap();
    let topic = fresh_topic("drop");
    // A long idle timeout, so an end seen within the bound below can only be the close the
    // drop sent, with room for a loaded machine.
    let patient = || {
        dht.test_builder()
            .keep_alive(Duration::from_millis(500), Duration::from_secs(60))
            .build()
            .unwrap()
    };
    let mut a = patient();
    let mut b = patient();
    let (ra, rb) = tokio::join!(a.connect(topic), b.connect(topic));
    let (mut ra, mut rb) = (ra.unwrap(), rb.unwrap());
    let _ca = next_conn(&mut ra, Duration::from_secs(30)).await;
    let mut cb = next_conn(&mut rb, Duration::from_secs(30)).await;
    drop(a);
    // Not the idle timeout: the drop sends CONNECTION_CLOSE right away.
    let started = Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(30), cb.receive())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(end, None);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    // The dropped transport's receiver ended too.
    assert!(
        tokio::time::timeout(Duration::from_secs(5), ra.recv())
            .await
            .unwrap()
            .is_none()
    );
    b.disconnect().await.unwrap();
}
