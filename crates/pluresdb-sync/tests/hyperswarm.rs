//! Hyperswarm mode through the facade: `create_transport` with the default config, bootstrap
//! nodes from `PLURESDB_SYNC_BOOTSTRAP` pointing at a local mainline testnet.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::Ipv4Addr;
use std::time::Duration;

use pluresdb_sync::{
    HyperswarmTransport, TransportConfig, TransportMode, create_transport, derive_topic,
    try_create_transport,
};

#[test]
fn hyperswarm_is_the_default_mode_and_builds_without_network() {
    let config = TransportConfig::default();
    assert_eq!(config.mode, TransportMode::Hyperswarm);
    let t = try_create_transport(config).unwrap();
    assert_eq!(t.name(), "hyperswarm");
    let direct = HyperswarmTransport::builder().build().unwrap();
    assert!(direct.local_addr().is_none());
}

#[test]
fn default_transports_find_each_other_through_the_bootstrap_variable() {
    let testnet = mainline::Testnet::builder(3)
        .bind_address(Ipv4Addr::LOCALHOST)
        .build()
        .unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_two_default_transports",
            "--ignored",
            "--nocapture",
        ])
        .env(
            pluresdb_sync_transport_hyperswarm_env(),
            testnet.bootstrap.join(","),
        )
        // Default transports bind every interface: no LAN discovery, so nothing is
        // multicast off this host.
        .env("PLURESDB_SYNC_LAN_DISCOVERY", "off")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pluresdb_sync_transport_hyperswarm_env() -> &'static str {
    "PLURESDB_SYNC_BOOTSTRAP"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by default_transports_find_each_other_through_the_bootstrap_variable"]
async fn child_two_default_transports() {
    // Only ever run with the variable set: without it the public network would be used.
    let bootstrap = std::env::var(pluresdb_sync_transport_hyperswarm_env())
        .expect("run by the parent test only");
    assert!(bootstrap.contains("127.0.0.1"), "{bootstrap}");
    let topic = derive_topic("facade-hyperswarm-test");
    let mut a = create_transport(TransportConfig::default());
    let mut b = create_transport(TransportConfig::default());
    let (ra, rb) = tokio::join!(a.connect(topic), b.connect(topic));
    let (mut ra, mut rb) = (ra.unwrap(), rb.unwrap());
    let within = Duration::from_secs(60);
    let mut ca = tokio::time::timeout(within, ra.recv())
        .await
        .unwrap()
        .unwrap();
    let mut cb = tokio::time::timeout(within, rb.recv())
        .await
        .unwrap()
        .unwrap();
    ca.send(b"over the facade").await.unwrap();
    let got = tokio::time::timeout(within, cb.receive())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.as_deref(), Some(&b"over the facade"[..]));
    a.disconnect().await.unwrap();
    b.disconnect().await.unwrap();
}
