//! The topics this node joined: each one's Noise pre-shared key (which proves knowledge of
//! the topic in the hello), the application's accept queue once `connect` asked for
//! connections, and the announce and discovery tasks working for it.

use std::collections::HashMap;

use pluresdb_sync_core::topic::{Domain, derive_from_topic};
use pluresdb_sync_core::{Connection, TopicHash};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use crate::noise::{self, Role};
use crate::wire::TAG_LEN;

/// Where connections on a topic go: the receiver `connect` returned.
pub(crate) type AcceptQueue = mpsc::Sender<Box<dyn Connection>>;

struct Joined {
    psk: [u8; 32],
    accept: Option<AcceptQueue>,
    announcing: Option<AbortHandle>,
    discovering: Option<AbortHandle>,
}

/// A topic the initiator's tag names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Found {
    /// The topic.
    pub(crate) topic: TopicHash,
    /// Its pre-shared key, for the responder's tag.
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

    /// The joined topic whose initiator tag for the handshake `hash` is `tag`.
    pub(crate) fn find_by_tag(&self, tag: &[u8; TAG_LEN], hash: &[u8; 32]) -> Option<Found> {
        self.map.iter().find_map(|(topic, t)| {
            let expected = noise::topic_tag(&t.psk, Role::Initiator, hash);
            noise::tags_equal(tag, &expected).then_some(Found {
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
    fn a_tag_finds_its_topic_only() {
        let mut topics = Topics::default();
        let (a, b) = ([1u8; 32], [2u8; 32]);
        topics.join(a);
        topics.join(b);
        topics.join(a);
        let hash = [9u8; 32];
        let psk = derive_from_topic(&a, Domain::NoisePsk);
        assert_eq!(topics.psk(&a), Some(psk));
        let tag = noise::topic_tag(&psk, Role::Initiator, &hash);
        assert_eq!(
            topics.find_by_tag(&tag, &hash),
            Some(Found {
                topic: a,
                psk,
                accepting: false
            })
        );
        // Another handshake, the responder's tag, or an unknown topic: nothing.
        assert_eq!(topics.find_by_tag(&tag, &[8u8; 32]), None);
        let responder = noise::topic_tag(&psk, Role::Responder, &hash);
        assert_eq!(topics.find_by_tag(&responder, &hash), None);
        let unknown = derive_from_topic(&[3u8; 32], Domain::NoisePsk);
        let tag = noise::topic_tag(&unknown, Role::Initiator, &hash);
        assert_eq!(topics.find_by_tag(&tag, &hash), None);
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
