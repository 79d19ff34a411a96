//! The facade: building transports from configuration, and the errors when it cannot.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use pluresdb_sync::{
    Error, TransportConfig, TransportMode, create_transport, derive_topic, try_create_transport,
};

fn mode(mode: TransportMode) -> TransportConfig {
    TransportConfig {
        mode,
        ..Default::default()
    }
}

#[cfg(feature = "disabled")]
#[tokio::test]
async fn disabled_mode_builds_a_disabled_transport() {
    let mut t = create_transport(mode(TransportMode::Disabled));
    assert_eq!(t.name(), "disabled");
    let topic = derive_topic("db");
    t.announce(topic).await.unwrap();
    assert!(t.lookup(topic).await.unwrap().is_empty());
    assert!(t.connect(topic).await.unwrap().recv().await.is_none());
    t.disconnect().await.unwrap();
    assert_eq!(
        try_create_transport(mode(TransportMode::Disabled))
            .unwrap()
            .name(),
        "disabled"
    );
}

#[tokio::test]
async fn invalid_config_is_an_error_not_a_panic() {
    let bad = TransportConfig {
        mode: TransportMode::Relay,
        relay_url: Some("http://relay.example.com".into()),
        ..Default::default()
    };
    let err = try_create_transport(bad.clone()).err().unwrap();
    assert!(matches!(
        err.downcast_ref::<Error>(),
        Some(Error::InvalidRelayUrl { .. })
    ));
    assert!(
        err.to_string().contains("http://relay.example.com"),
        "{err}"
    );

    // The infallible factory reports the same error on every call.
    let mut t = create_transport(bad);
    assert_eq!(t.name(), "unavailable");
    let topic = derive_topic("db");
    let err = t.announce(topic).await.unwrap_err();
    assert!(matches!(
        err.downcast_ref::<Error>(),
        Some(Error::InvalidRelayUrl { .. })
    ));
    assert!(t.lookup(topic).await.is_err());
    assert!(t.connect(topic).await.is_err());
    t.disconnect().await.unwrap();

    let zero = TransportConfig {
        timeout_ms: 0,
        ..mode(TransportMode::Disabled)
    };
    let err = try_create_transport(zero).err().unwrap();
    assert_eq!(err.downcast_ref::<Error>(), Some(&Error::ZeroTimeout));
}

/// Modes whose crates are not compiled in say which feature to enable.
#[tokio::test]
async fn missing_features_are_named() {
    // Empty with every feature on; scripts/test runs this test under every feature combination.
    #[allow(unused_mut)]
    let mut cases: Vec<(TransportConfig, &str)> = Vec::new();
    #[cfg(not(feature = "disabled"))]
    cases.push((mode(TransportMode::Disabled), "disabled"));
    #[cfg(not(feature = "hyperswarm"))]
    cases.push((mode(TransportMode::Hyperswarm), "hyperswarm"));
    #[cfg(not(feature = "relay"))]
    cases.push((
        TransportConfig {
            mode: TransportMode::Relay,
            relay_url: Some("wss://relay.example.com".into()),
            ..Default::default()
        },
        "relay",
    ));
    #[cfg(not(feature = "auto"))]
    cases.push((
        TransportConfig {
            mode: TransportMode::Auto,
            relay_url: Some("wss://relay.example.com".into()),
            ..Default::default()
        },
        "auto",
    ));
    for (config, feature) in cases {
        let err = try_create_transport(config.clone()).err().unwrap();
        assert_eq!(
            err.downcast_ref::<Error>(),
            Some(&Error::FeatureNotEnabled {
                mode: feature,
                feature
            }),
        );
        assert!(
            err.to_string().contains(&format!("{feature:?} feature")),
            "{err}"
        );
        let mut t = create_transport(config);
        let err = t.announce(derive_topic("x")).await.unwrap_err();
        assert!(err.to_string().contains(feature), "{err}");
    }
}

/// `create_transport` in relay mode reaches a real relay and connects two peers.
#[cfg(feature = "relay")]
#[tokio::test]
async fn relay_mode_through_the_factory() {
    use pluresdb_sync_transport_relay::server::{RelayServer, RelayServerConfig};
    let server = RelayServer::bind("127.0.0.1:0".parse().unwrap(), RelayServerConfig::default())
        .await
        .unwrap();
    let config = TransportConfig {
        mode: TransportMode::Relay,
        relay_url: Some(format!("ws://{}/relay", server.local_addr())),
        ..Default::default()
    };
    let mut a = create_transport(config.clone());
    let mut b = try_create_transport(config).unwrap();
    assert_eq!(a.name(), "relay");
    let topic = derive_topic("facade-relay-test");
    let mut a_rx = a.connect(topic).await.unwrap();
    let mut b_rx = b.connect(topic).await.unwrap();
    let wait = std::time::Duration::from_secs(30);
    let mut ca = tokio::time::timeout(wait, a_rx.recv())
        .await
        .unwrap()
        .unwrap();
    let mut cb = tokio::time::timeout(wait, b_rx.recv())
        .await
        .unwrap()
        .unwrap();
    ca.send(b"via the facade").await.unwrap();
    assert_eq!(
        tokio::time::timeout(wait, cb.receive())
            .await
            .unwrap()
            .unwrap()
            .unwrap(),
        b"via the facade"
    );
    a.disconnect().await.unwrap();
    b.disconnect().await.unwrap();
    server.shutdown().await;
}

/// Each transport crate is reachable whole through the facade, its typed errors included.
#[cfg(feature = "relay")]
#[test]
fn the_relay_crate_is_reexported_whole() {
    use pluresdb_sync::relay::{RelayError, RelayTransport, protocol};
    let err = RelayTransport::builder().build().err().unwrap();
    assert_eq!(err, RelayError::NoRelayUrl);
    assert_eq!(protocol::SUBPROTOCOL, "pluresdb-relay.v1");
}

#[cfg(feature = "hyperswarm")]
#[test]
fn the_hyperswarm_crate_is_reexported_whole() {
    use pluresdb_sync::hyperswarm::{DialFailure, HyperswarmError, HyperswarmTransport};
    let err = HyperswarmTransport::builder()
        .bootstrap(["no-port"])
        .build()
        .unwrap_err();
    assert!(
        matches!(&err, HyperswarmError::InvalidBootstrap { text, .. } if text == "no-port"),
        "{err}"
    );
    let t = HyperswarmTransport::builder().build().unwrap();
    let failures: Vec<DialFailure> = t.dial_failures();
    assert!(failures.is_empty());
}

#[cfg(feature = "disabled")]
#[test]
fn the_disabled_crate_is_reexported_whole() {
    use pluresdb_sync::Transport;
    let t = pluresdb_sync::disabled::DisabledTransport::new();
    assert_eq!(t.name(), "disabled");
}

/// `create_transport` in auto mode: a real relay in this process, the DHT bootstrap nodes
/// pointing at nothing (no DHT node answers), so the two peers meet in the relay room alone
/// and connect through the relay.
#[cfg(feature = "auto")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_mode_through_the_factory() {
    use pluresdb_sync_transport_relay::server::{RelayServer, RelayServerConfig};
    let server = RelayServer::bind("127.0.0.1:0".parse().unwrap(), RelayServerConfig::default())
        .await
        .unwrap();
    let url = format!("ws://{}/relay", server.local_addr());
    // Without PLURESDB_SYNC_BOOTSTRAP the public DHT would be used: the test builds the same
    // transport the factory does, with a private (silent) bootstrap node instead.
    let config = TransportConfig {
        mode: TransportMode::Auto,
        relay_url: Some(url.clone()),
        ..Default::default()
    };
    assert_eq!(
        try_create_transport(TransportConfig {
            relay_url: None,
            ..config.clone()
        })
        .err()
        .unwrap()
        .downcast_ref::<Error>(),
        Some(&Error::MissingRelayUrl)
    );
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let build = || {
        pluresdb_sync::AutoTransportBuilder::from_config(&config)
            .unwrap()
            .bootstrap([silent.local_addr().unwrap().to_string()])
            .bind_addr("127.0.0.1:0".parse().unwrap())
            .build()
            .unwrap()
    };
    let (mut a, mut b) = (build(), build());
    assert_eq!(pluresdb_sync::Transport::name(&a), "auto");
    let topic = derive_topic("facade-auto-test");
    use pluresdb_sync::Transport;
    let mut a_rx = a.connect(topic).await.unwrap();
    let mut b_rx = b.connect(topic).await.unwrap();
    let wait = std::time::Duration::from_secs(30);
    let mut ca = tokio::time::timeout(wait, a_rx.recv())
        .await
        .unwrap()
        .unwrap();
    let mut cb = tokio::time::timeout(wait, b_rx.recv())
        .await
        .unwrap()
        .unwrap();
    ca.send(b"via auto").await.unwrap();
    assert_eq!(
        tokio::time::timeout(wait, cb.receive())
            .await
            .unwrap()
            .unwrap()
            .unwrap(),
        b"via auto"
    );
    a.disconnect().await.unwrap();
    b.disconnect().await.unwrap();
    server.shutdown().await;
}

#[cfg(feature = "auto")]
#[test]
fn the_auto_crate_is_reexported_whole() {
    use pluresdb_sync::auto::{AutoError, AutoTransport};
    assert_eq!(
        AutoTransport::builder().build().unwrap_err(),
        AutoError::NoRelayUrl
    );
    let t = pluresdb_sync::create_transport(TransportConfig {
        mode: TransportMode::Auto,
        relay_url: Some("ws://127.0.0.1:9/relay".into()),
        ..Default::default()
    });
    assert_eq!(t.name(), "auto");
}
