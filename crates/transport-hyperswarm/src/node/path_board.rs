//! The current path of every connection handed to the application, and a broadcast of
//! changes: what [`crate::HyperswarmTransport::paths`] and
//! [`crate::HyperswarmTransport::path_events`] show. Bounded: one entry per live
//! connection, and a broadcast channel that drops the oldest events for a subscriber that
//! falls behind (it is told how many, as `Lagged`).

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::broadcast;

use crate::relay_path::PathInfo;

/// Events a slow subscriber may fall behind before it loses the oldest.
pub(crate) const PATH_EVENTS: usize = 256;

/// The paths of live connections, by quinn's stable connection id.
#[derive(Debug)]
pub(crate) struct PathBoard {
    current: Mutex<HashMap<usize, PathInfo>>,
    events: broadcast::Sender<PathInfo>,
}

impl Default for PathBoard {
    fn default() -> Self {
        Self {
            current: Mutex::default(),
            events: broadcast::channel(PATH_EVENTS).0,
        }
    }
}

impl PathBoard {
    /// Connection `id` uses `info.path` now; subscribers are told if it changed.
    pub(crate) fn set(&self, id: usize, info: PathInfo) {
        let changed = {
            let mut m = self.current.lock().unwrap_or_else(|e| e.into_inner());
            m.insert(id, info.clone()).as_ref() != Some(&info)
        };
        if changed {
            // No subscriber is not an error.
            let _ = self.events.send(info);
        }
    }

    /// Connection `id` ended.
    pub(crate) fn remove(&self, id: usize) {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    /// Every live connection's path.
    pub(crate) fn snapshot(&self) -> Vec<PathInfo> {
        let m = self.current.lock().unwrap_or_else(|e| e.into_inner());
        m.values().cloned().collect()
    }

    /// A receiver of path events from now on.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<PathInfo> {
        self.events.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay_path::PeerPath;

    fn info(path: PeerPath) -> PathInfo {
        PathInfo {
            peer_id: "ab".into(),
            topic: [1; 32],
            path,
        }
    }

    #[test]
    fn changes_are_broadcast_once_and_ended_connections_leave_the_list() {
        let b = PathBoard::default();
        let mut rx = b.subscribe();
        let relayed = info(PeerPath::Relayed {
            url: "ws://r".into(),
        });
        let direct = info(PeerPath::Direct("10.0.0.2:4000".parse().unwrap()));
        b.set(7, relayed.clone());
        b.set(7, relayed.clone());
        b.set(7, direct.clone());
        assert_eq!(rx.try_recv().unwrap(), relayed);
        assert_eq!(rx.try_recv().unwrap(), direct);
        assert!(rx.try_recv().is_err(), "an unchanged path is not an event");
        assert_eq!(b.snapshot(), vec![direct]);
        b.remove(7);
        assert!(b.snapshot().is_empty());
    }
}
