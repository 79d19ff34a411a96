//! What every connection of one relay server shares: the settings, the room registry, the
//! per-IP limits, the id counter, the counters, the shutdown signal and the NATS bus.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use tokio::sync::watch;

use super::RelayServerConfig;
use super::limits::PerIp;
use super::metrics::Metrics;
use super::nats::Nats;
use super::rooms::Rooms;

#[derive(Debug)]
pub(super) struct Shared {
    pub(super) config: RelayServerConfig,
    pub(super) rooms: Arc<Rooms>,
    pub(super) per_ip: Arc<PerIp>,
    /// The next connection id to assign.
    pub(super) next_id: AtomicU64,
    pub(super) metrics: Arc<Metrics>,
    /// Becomes true when the server shuts down.
    pub(super) shutdown: watch::Receiver<bool>,
    /// The bus to the other relay nodes, with `nats_url`.
    pub(super) nats: Option<Arc<Nats>>,
}

impl Shared {
    pub(super) fn metrics_text(&self) -> String {
        self.metrics.render(
            self.rooms.len(),
            self.rooms.budget().queued(),
            self.nats.as_ref().map(|n| n.metrics.as_ref()),
        )
    }
}
