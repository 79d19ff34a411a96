//! WebSocket relay transport (placeholder docs, replaced below).
#![cfg_attr(docsrs, feature(doc_cfg))]

mod error;
pub mod protocol;
#[cfg(feature = "server")]
#[cfg_attr(docsrs, doc(cfg(feature = "server")))]
pub mod server;

pub use error::RelayError;
