//! The transport conformance kit: checks of the contract every [`Transport`] must keep.
//!
//! A transport crate implements [`TransportFactory`] (how to make transports that can reach
//! each other: a shared relay server, a local DHT testnet, ...) and runs the kit from its
//! integration tests:
//!
//! ```
//! use pluresdb_sync_core::testkit::{ConformanceKit, memory::MemoryNetwork};
//!
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> anyhow::Result<()> {
//! let kit = ConformanceKit::new(MemoryNetwork::new());
//! kit.message_boundaries().await?;
//! kit.ordering().await?;
//! # Ok(())
//! # }
//! ```
//!
//! Each check makes fresh transports on a fresh random topic, so checks may run in parallel.
//! Every wait has a timeout ([`ConformanceKit::with_timeout`]); a failure is an error naming
//! the check, the step and the values seen.
//!
//! The parts: `kit` (the runner and its timed waits), `checks` (the checks themselves), `mesh`
//! (connected transports the checks run on), [`memory`] (the in-memory reference transport).

mod checks;
mod kit;
pub mod memory;
mod mesh;

use std::time::Duration;

use async_trait::async_trait;

use crate::{MAX_MESSAGE_BYTES, TopicHash, Transport, derive_topic};

pub use kit::ConformanceKit;

/// Makes transports that can find and reach each other.
#[async_trait]
pub trait TransportFactory: Send + Sync {
    /// Builds `n` new, independent transports (each with its own identity) that can reach each
    /// other. The factory owns whatever they share (a relay server, a DHT testnet).
    async fn create(&self, n: usize) -> anyhow::Result<Vec<Box<dyn Transport>>>;
}

#[async_trait]
impl TransportFactory for memory::MemoryNetwork {
    async fn create(&self, n: usize) -> anyhow::Result<Vec<Box<dyn Transport>>> {
        (0..n)
            .map(|_| Ok(Box::new(self.transport()?) as Box<dyn Transport>))
            .collect()
    }
}

/// The default per-step timeout: generous, because a loaded 2-core CI machine is slow.
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// The sizes every transport must carry whole: empty, tiny, a typical frame, the maximum.
pub const BOUNDARY_SIZES: [usize; 4] = [0, 1, 64 * 1024, MAX_MESSAGE_BYTES];

/// How many back-to-back messages the ordering check sends.
pub const ORDERING_MESSAGES: usize = 10_000;

/// A topic no other test uses.
pub fn fresh_topic(label: &str) -> TopicHash {
    let mut nonce = [0u8; 16];
    // Falls back to the clock if the OS RNG fails; uniqueness is all that matters here.
    if getrandom::fill(&mut nonce).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        nonce = t.to_le_bytes();
    }
    derive_topic(&format!(
        "pluresdb-sync-testkit/{label}/{}",
        hex::encode(nonce)
    ))
}

/// `len` bytes of a pattern that differs per `seed` and per position.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_differ() {
        assert_ne!(pattern(64, 1), pattern(64, 2));
        assert_eq!(pattern(64, 1), pattern(64, 1));
        assert!(pattern(0, 3).is_empty());
    }
}
