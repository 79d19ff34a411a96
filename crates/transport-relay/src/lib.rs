//! WebSocket relay transport (placeholder docs, replaced below).
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod protocol;
