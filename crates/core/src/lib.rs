//! The core of [pluresdb-sync]: the [`Transport`] and [`Connection`] traits every transport
//! implements, topics ([`derive_topic`]), sync events ([`SyncBroadcaster`]), configuration
//! ([`TransportConfig`]), peer identity ([`Identity`]), typed errors and the event codec.
//!
//! Most applications use the `pluresdb-sync` facade crate, which re-exports all of this and
//! builds transports from a [`TransportConfig`]. Transport authors depend on this crate alone,
//! and check their work with the conformance kit behind the `testkit` feature.
//!
//! ```
//! use pluresdb_sync_core::{derive_topic, SyncBroadcaster, SyncEvent, TransportConfig};
//!
//! let topic = derive_topic("my-app-database");
//! assert_eq!(topic.len(), 32);
//!
//! let hub = SyncBroadcaster::default();
//! let mut rx = hub.subscribe();
//! hub.publish(SyncEvent::PeerConnected { peer_id: "peer-123".into() }).unwrap();
//! assert_eq!(rx.try_recv().unwrap(), SyncEvent::PeerConnected { peer_id: "peer-123".into() });
//!
//! TransportConfig::default().validate().unwrap();
//! ```
//!
//! [pluresdb-sync]: https://github.com/plures/pluresdb-sync
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod codec;
pub mod config;
pub mod error;
pub mod event;
pub mod identity;
pub mod peer;
pub mod topic;
pub mod transport;

#[cfg(feature = "testkit")]
#[cfg_attr(docsrs, doc(cfg(feature = "testkit")))]
pub mod testkit;

pub use config::{TransportConfig, TransportMode};
pub use error::{CodecError, Error};
pub use event::{SyncBroadcaster, SyncEvent};
pub use identity::Identity;
pub use peer::{PeerId, PeerInfo};
pub use topic::{TopicHash, derive_topic};
pub use transport::{Connection, MAX_MESSAGE_BYTES, Transport};
