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
