//! `pluresdb-sync relay --nats` as real processes on a real nats-server (Debian package
//! `nats-server`): two relay processes share a room; an unreachable NATS fails the start
//! clearly. Without nats-server these tests skip, except with `CI=true`, where they fail.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use pluresdb_sync::{Transport, derive_topic};
use pluresdb_sync_transport_relay::RelayTransport;
use pluresdb_sync_transport_relay::testkit::nats::NatsServer;
use tokio::process::Command;

use common::{T, relay_on_nats};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relay_processes_share_a_room_over_nats() {
    let Some(nats) = NatsServer::start_or_skip().await else {
        return;
    };
    let port = nats.port();
    let (_r1, url1) = relay_on_nats(port).await;
    let (_r2, url2) = relay_on_nats(port).await;
    let topic = derive_topic("cli-nats");
    let mut a = RelayTransport::builder()
        .relay_url(url1)
        .timeout(T)
        .build()
        .unwrap();
    let mut b = RelayTransport::builder()
        .relay_url(url2)
        .timeout(T)
        .build()
        .unwrap();
    let mut a_in = a.connect(topic).await.unwrap();
    let mut b_in = b.connect(topic).await.unwrap();
    let mut ab = tokio::time::timeout(T, a_in.recv()).await.unwrap().unwrap();
    let mut ba = tokio::time::timeout(T, b_in.recv()).await.unwrap().unwrap();
    assert_eq!(ab.peer_id(), b.peer_id());
    ab.send(b"over two relay processes").await.unwrap();
    let got = tokio::time::timeout(T, ba.receive())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got, b"over two relay processes");
    a.disconnect().await.unwrap();
    b.disconnect().await.unwrap();
}

#[tokio::test]
async fn relay_with_unreachable_nats_exits_with_a_clear_error() {
    let port = free_port();
    let out = tokio::time::timeout(
        T,
        Command::new(env!("CARGO_BIN_EXE_pluresdb-sync"))
            .args(["relay", "--listen", "127.0.0.1:0", "--nats"])
            .arg(format!("nats://127.0.0.1:{port}"))
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "cannot connect to NATS at nats://127.0.0.1:{port}"
        )),
        "{err}"
    );
    assert!(!err.contains("cannot listen"), "{err}");
}
