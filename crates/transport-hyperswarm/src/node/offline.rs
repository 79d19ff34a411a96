//! No DHT reachable while LAN discovery runs: not an error. `announce` (and so `connect`)
//! then succeed on the LAN, warn once (until the DHT answers again), and keep announcing on
//! the DHT in the background; `lookup` lists what the LAN has. Without LAN discovery the
//! DHT's errors are returned as before.

use std::collections::HashSet;
use std::sync::{Arc, MutexGuard};
use std::time::Duration;

use pluresdb_sync_core::TopicHash;

use super::Node;

/// First wait before announcing on an unreachable DHT again; it doubles up to
/// [`DHT_RETRY_MAX`]. A node that comes online (or whose bootstrap node starts) is on the DHT
/// within seconds, and an offline one sends a few packets a minute.
pub(crate) const DHT_RETRY_FIRST: Duration = Duration::from_secs(5);

/// Longest wait between two announce attempts on an unreachable DHT.
pub(crate) const DHT_RETRY_MAX: Duration = Duration::from_secs(60);

/// What the DHT being unreachable has caused.
#[derive(Debug, Default)]
pub(crate) struct Offline {
    /// Whether the "no DHT" warning was logged (and the DHT not reached since).
    warned: bool,
    /// Topics being announced again in the background.
    retrying: HashSet<TopicHash>,
}

impl Node {
    /// Makes `topic` findable: on the LAN (with LAN discovery) and on the DHT. The DHT's
    /// failure is this call's error only without LAN discovery; with it, it is logged once
    /// and the DHT announcement is retried in the background.
    pub(crate) async fn announce(self: &Arc<Self>, topic: TopicHash) -> anyhow::Result<()> {
        self.lan_advertise(topic);
        match self.announce_dht(topic).await {
            Err(e) if self.lan_on() => {
                self.dht_unreachable(&e);
                self.retry_dht(topic);
                Ok(())
            }
            result => result,
        }
    }

    fn offline(&self) -> Option<MutexGuard<'_, Offline>> {
        self.lan
            .as_ref()
            .map(|l| l.offline.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Logs that the DHT could not be used: a warning the first time, debug after that.
    pub(crate) fn dht_unreachable(&self, e: &anyhow::Error) {
        let first = self
            .offline()
            .is_some_and(|mut o| !std::mem::replace(&mut o.warned, true));
        if first {
            tracing::warn!(error = %e, "the DHT is not reachable; finding peers on the LAN meanwhile and retrying the DHT in the background");
        } else {
            tracing::debug!(error = %e, "the DHT is still not reachable");
        }
    }

    /// Announces `topic` on the DHT again and again in the background until it works.
    pub(super) fn retry_dht(self: &Arc<Self>, topic: TopicHash) {
        let fresh = self.offline().is_some_and(|mut o| o.retrying.insert(topic));
        if !fresh {
            return;
        }
        let node = self.clone();
        self.spawn(async move {
            let mut wait = DHT_RETRY_FIRST;
            loop {
                tokio::time::sleep(wait).await;
                match node.announce_dht(topic).await {
                    Ok(()) => {
                        if let Some(mut o) = node.offline() {
                            o.retrying.remove(&topic);
                            o.warned = false;
                        }
                        tracing::info!("the DHT is reachable again; announced there too");
                        return;
                    }
                    Err(e) => node.dht_unreachable(&e),
                }
                wait = (wait * 2).min(DHT_RETRY_MAX);
            }
        });
    }
}
