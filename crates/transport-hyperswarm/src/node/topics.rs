//! The topics this node joined: each one's DHT info-hash (which an initiator names first) and
//! Noise pre-shared key (which the handshake mixes in from message 1), the application's
//! accept queue once `connect` asked for connections, and the announce and discovery tasks
//! working for it.

use std::collections::HashMap;

use pluresdb_sync_core::topic::{Domain, derive_from_topic};
use pluresdb_sync_core::{Connection, TopicHash};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use crate::wire::INFO_HASH_LEN;

/// Where connections on a topic go: the receiver `connect` returned.
pub(crate) type AcceptQueue = mpsc::Sender<Box<dyn Connection>>;

/// The 20-byte DHT info-hash of a topic (the prefix of a domain-separated hash, so the topic
/// stays private): what `discovery.rs` announces under and an initiator names first.
pub(crate) fn info_hash(topic: &TopicHash) -> [u8; INFO_HASH_LEN] {
    let derived = derive_from_topic(topic, Domain::DhtInfoHash);
    let mut id = [0u8; INFO_HASH_LEN];
    id.copy_from_slice(&derived[..INFO_HASH_LEN]);
    id
}

struct Joined {
    info_hash: [u8; INFO_HASH_LEN],
    psk: [u8; 32],
    accept: Option<AcceptQueue>,
    announcing: Option<AbortHandle>,
    discovering: Option<AbortHandle>,
}

/// A joined topic an initiator's info-hash names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Found {
    /// The topic.
    pub(crate) topic: TopicHash,
    /// Its pre-shared key, for the handshake.
    pub(crate) psk: [u8; 32],
    /// Whether the application takes connections on it.
    pub(crate) accepting: bool,
}

/// The joined topics.
#[derive(Default)]
pub(crate) struct Topics {
    map: HashMap<TopicHash, Joined>,
}

impl Topics {
    /// Joins `topic` (nothing happens when it is joined already).
    pub(crate) fn join(&mut self, topic: TopicHash) {
        self.map.entry(topic).or_insert_with(|| Joined {
            info_hash: info_hash(&topic),
            psk: derive_from_topic(&topic, Domain::NoisePsk),
            accept: None,
            announcing: None,
            discovering: None,
        });
    }

    /// The pre-shared key of a joined topic.
    pub(crate) fn psk(&self, topic: &TopicHash) -> Option<[u8; 32]> {
        self.map.get(topic).map(|t| t.psk)
    }

    /// The application's accept queue on `topic`, if it asked for connections.
    pub(crate) fn accept_queue(&self, topic: &TopicHash) -> Option<AcceptQueue> {
        self.map.get(topic).and_then(|t| t.accept.clone())
    }

    /// Whether the application takes connections on `topic`.
    pub(crate) fn is_accepting(&self, topic: &TopicHash) -> bool {
        self.map.get(topic).is_some_and(|t| t.accept.is_some())
    }

    /// Whether `topic` is being announced.
    pub(crate) fn is_announcing(&self, topic: &TopicHash) -> bool {
        self.map.get(topic).is_some_and(|t| t.announcing.is_some())
    }

    /// Records the task announcing `topic` (stopping an older one).
    pub(crate) fn set_announcing(&mut self, topic: &TopicHash, task: AbortHandle) {
        if let Some(t) = self.map.get_mut(topic)
            && let Some(old) = t.announcing.replace(task)
        {
            old.abort();
        }
    }

    /// Sends connections on `topic` to `queue` from now on, found by the task `discovering`
    /// (which replaces, and stops, an older one).
    pub(crate) fn set_accepting(
        &mut self,
        topic: &TopicHash,
        queue: AcceptQueue,
        discovering: AbortHandle,
    ) {
        if let Some(t) = self.map.get_mut(topic) {
            t.accept = Some(queue);
            if let Some(old) = t.discovering.replace(discovering) {
                old.abort();
            }
        }
    }

    /// Stops announcing `topic` (its task is aborted): a first announcement that failed.
    pub(crate) fn stop_announcing(&mut self, topic: &TopicHash) {
        if let Some(old) = self.map.get_mut(topic).and_then(|t| t.announcing.take()) {
            old.abort();
        }
    }

    /// Stops taking connections on `topic` and announcing it (a `connect` that failed): the
    /// accept queue is dropped, the discovery and announce tasks are aborted; the topic stays
    /// joined.
    pub(crate) fn stop_accepting(&mut self, topic: &TopicHash) {
        self.stop_announcing(topic);
        if let Some(t) = self.map.get_mut(topic) {
            t.accept = None;
            if let Some(old) = t.discovering.take() {
                old.abort();
            }
        }
    }

    /// The joined topic whose info-hash is `info_hash`.
    pub(crate) fn find_by_info_hash(&self, info_hash: &[u8; INFO_HASH_LEN]) -> Option<Found> {
        self.map.iter().find_map(|(topic, t)| {
            (t.info_hash == *info_hash).then_some(Found {
                topic: *topic,
                psk: t.psk,
                accepting: t.accept.is_some(),
            })
        })
    }

    /// Leaves every topic: the accept queues close (their receivers end).
    pub(crate) fn clear(&mut self) {
        self.map.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_info_hash_finds_its_topic_only() {
        let mut topics = Topics::default();
        let (a, b) = ([1u8; 32], [2u8; 32]);
        topics.join(a);
        topics.join(b);
        topics.join(a);
        let psk = derive_from_topic(&a, Domain::NoisePsk);
        assert_eq!(topics.psk(&a), Some(psk));
        let derived = derive_from_topic(&a, Domain::DhtInfoHash);
        assert_eq!(info_hash(&a)[..], derived[..20]);
        assert_ne!(info_hash(&a)[..], a[..20]);
        assert_eq!(
            topics.find_by_info_hash(&info_hash(&a)),
            Some(Found {
                topic: a,
                psk,
                accepting: false
            })
        );
        assert_eq!(
            topics.find_by_info_hash(&info_hash(&b)).map(|f| f.topic),
            Some(b)
        );
        // An unknown topic's info-hash, or the topic's own bytes: nothing.
        assert_eq!(topics.find_by_info_hash(&info_hash(&[3u8; 32])), None);
        assert_eq!(topics.find_by_info_hash(&[1u8; 20]), None);
        assert!(!topics.is_accepting(&a) && !topics.is_announcing(&a));
        topics.clear();
        assert_eq!(topics.psk(&a), None);
    }

    #[tokio::test]
    async fn accepting_replaces_the_discovery_task_and_stopping_closes_the_queue() {
        let mut topics = Topics::default();
        let topic = [1u8; 32];
        topics.join(topic);
        let (tx, mut rx) = mpsc::channel(1);
        let first = tokio::spawn(std::future::pending::<()>());
        topics.set_accepting(&topic, tx.clone(), first.abort_handle());
        assert!(topics.is_accepting(&topic));
        let second = tokio::spawn(std::future::pending::<()>());
        topics.set_accepting(&topic, tx, second.abort_handle());
        assert!(
            first.await.unwrap_err().is_cancelled(),
            "the old task stopped"
        );
        assert!(topics.accept_queue(&topic).is_some());
        let announcing = tokio::spawn(std::future::pending::<()>());
        topics.set_announcing(&topic, announcing.abort_handle());
        assert!(topics.is_announcing(&topic));
        topics.stop_accepting(&topic);
        assert!(
            second.await.unwrap_err().is_cancelled(),
            "discovery stopped"
        );
        assert!(
            announcing.await.unwrap_err().is_cancelled(),
            "announcing stopped"
        );
        assert!(!topics.is_accepting(&topic) && !topics.is_announcing(&topic));
        assert!(topics.psk(&topic).is_some(), "still joined");
        assert!(rx.recv().await.is_none(), "the queue closed");
    }
}
