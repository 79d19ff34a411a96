//! Peer discovery and secure transports for PluresDB replication.
//!
//! This facade re-exports [`pluresdb_sync_core`] (traits, topics, events, configuration),
//! the [`SyncBridge`] that keeps replicas' hubs in sync over a transport, and the transports
//! compiled in by Cargo features, and builds a transport from a [`TransportConfig`] with
//! [`create_transport`] or [`try_create_transport`].
//!
//! | feature | transport | mode |
//! |---|---|---|
//! | `disabled` (default) | [`DisabledTransport`] | [`TransportMode::Disabled`] |
//! | `relay` (default) | [`RelayTransport`] | [`TransportMode::Relay`] |
//! | `hyperswarm` (default) | [`HyperswarmTransport`] | [`TransportMode::Hyperswarm`] |
//! | `auto` (default) | [`AutoTransport`] | [`TransportMode::Auto`] |
//!
//! Asking for a mode whose feature is compiled out is a clear error
//! ([`Error::FeatureNotEnabled`]), never a panic and never a silent fallback.
//!
//! Each transport crate is also re-exported whole, under its feature, as [`relay`],
//! [`hyperswarm`], [`auto`] and [`disabled`]: their errors, settings and wire types are reachable
//! without depending on the crates, e.g. `pluresdb_sync::relay::RelayError` or
//! `pluresdb_sync::hyperswarm::DialFailure`.
//!
//! ```
//! # #[cfg(feature = "disabled")]
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> anyhow::Result<()> {
//! use pluresdb_sync::{derive_topic, try_create_transport, TransportConfig, TransportMode};
//!
//! let config = TransportConfig { mode: TransportMode::Disabled, ..Default::default() };
//! let mut transport = try_create_transport(config)?;
//! let topic = derive_topic("my-app-database");
//! transport.announce(topic).await?;
//! assert!(transport.lookup(topic).await?.is_empty());
//! assert_eq!(transport.name(), "disabled");
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "disabled"))]
//! # fn main() {}
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

pub use pluresdb_sync_core::*;

/// The SyncBridge: a hub's events and the application's messages between the replicas on a
/// topic, over any transport (the `pluresdb-sync-bridge` crate).
pub use pluresdb_sync_bridge as bridge;
pub use pluresdb_sync_bridge::{
    BridgeError, BridgeEvent, BridgeStatus, CutReason, DisconnectReason, Messages, SyncBridge,
    SyncBridgeBuilder,
};

#[cfg(feature = "disabled")]
#[cfg_attr(docsrs, doc(cfg(feature = "disabled")))]
pub use pluresdb_sync_transport_disabled::DisabledTransport;

#[cfg(feature = "hyperswarm")]
#[cfg_attr(docsrs, doc(cfg(feature = "hyperswarm")))]
pub use pluresdb_sync_transport_hyperswarm::{
    HyperswarmError, HyperswarmTransport, HyperswarmTransportBuilder,
};

#[cfg(feature = "relay")]
#[cfg_attr(docsrs, doc(cfg(feature = "relay")))]
pub use pluresdb_sync_transport_relay::{RelayTransport, RelayTransportBuilder};

#[cfg(feature = "auto")]
#[cfg_attr(docsrs, doc(cfg(feature = "auto")))]
pub use pluresdb_sync_transport_auto::{AutoError, AutoTransport, AutoTransportBuilder};

mod factory;
pub use factory::{UnavailableTransport, create_transport, try_create_transport};

/// The relay transport crate ([`pluresdb_sync_transport_relay`]) whole: [`relay::RelayError`],
/// [`relay::protocol`], the flow-control constants and, with its `server` feature, the server.
#[cfg(feature = "relay")]
#[cfg_attr(docsrs, doc(cfg(feature = "relay")))]
pub use pluresdb_sync_transport_relay as relay;

/// The Hyperswarm transport crate ([`pluresdb_sync_transport_hyperswarm`]) whole:
/// [`hyperswarm::HyperswarmError`], [`hyperswarm::DialFailure`], the default settings.
#[cfg(feature = "hyperswarm")]
#[cfg_attr(docsrs, doc(cfg(feature = "hyperswarm")))]
pub use pluresdb_sync_transport_hyperswarm as hyperswarm;

/// The Auto mode crate ([`pluresdb_sync_transport_auto`]) whole: [`auto::AutoError`], the
/// builder, and with its `testkit` feature the in-process relay and DHT.
#[cfg(feature = "auto")]
#[cfg_attr(docsrs, doc(cfg(feature = "auto")))]
pub use pluresdb_sync_transport_auto as auto;

/// The local-only transport crate ([`pluresdb_sync_transport_disabled`]) whole.
#[cfg(feature = "disabled")]
#[cfg_attr(docsrs, doc(cfg(feature = "disabled")))]
pub use pluresdb_sync_transport_disabled as disabled;

/// The README's examples, compiled and run as doctests.
#[cfg(all(doctest, feature = "disabled"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// The workspace README's examples, compiled and run as doctests (its replica example runs
/// over the relay transport).
#[cfg(all(doctest, feature = "disabled", feature = "relay"))]
#[doc = include_str!("../../../README.md")]
pub struct WorkspaceReadmeDoctests;
