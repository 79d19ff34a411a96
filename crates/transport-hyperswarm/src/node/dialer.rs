//! The dialer's budget: a fixed pool of dial slots that `connect`'s dials and `lookup`'s
//! identify checks share (waiters queue first come, first served), the dials and checks in
//! flight (never two of a kind for one topic and address), and the guard that gives both
//! back when a dial ends or is aborted. Which candidate to dial is decided elsewhere.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use pluresdb_sync_core::TopicHash;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::wire::Purpose;

/// Most dials and identify checks in flight at once (one pool for `lookup` and `connect`).
/// A dial in progress costs one QUIC connection attempt (a few KiB); a dead DHT entry holds
/// its slot for at most the first-answer timeout (1.5 s). 64 slots get through the ~500
/// entries mainline keeps per info-hash in about 8 such timeouts, so a flood of dead entries
/// does not keep the live ones waiting long, while the memory and packet rate stay small.
pub(crate) const MAX_CONCURRENT_DIALS: usize = 64;

/// What a dial or check is for: a topic and an address.
pub(crate) type DialKey = (TopicHash, SocketAddr);

/// The dials and identify checks in flight.
#[derive(Debug, Default)]
pub(crate) struct Flights {
    /// `Connect` dials (each holds a slot).
    dialing: HashSet<DialKey>,
    /// `lookup`'s identify checks (each holds a slot).
    checking: HashSet<DialKey>,
}

impl Flights {
    /// Whether a `Connect` dial of `key` is in flight.
    pub(crate) fn dialing(&self, key: &DialKey) -> bool {
        self.dialing.contains(key)
    }

    /// Whether an identify check of `key` is in flight.
    pub(crate) fn checking(&self, key: &DialKey) -> bool {
        self.checking.contains(key)
    }

    /// Whether a dial or a check of `key` is in flight.
    pub(crate) fn any(&self, key: &DialKey) -> bool {
        self.dialing(key) || self.checking(key)
    }

    /// How many dials and checks are in flight (tests).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.dialing.len() + self.checking.len()
    }

    fn set_mut(&mut self, purpose: Purpose) -> &mut HashSet<DialKey> {
        match purpose {
            Purpose::Connect => &mut self.dialing,
            Purpose::Identify => &mut self.checking,
        }
    }
}

/// What became of a candidate handed to [`Dialer::begin`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DialStart {
    /// Dialling (or checking) in the background.
    Started,
    /// Not worth it now.
    Skipped,
    /// `lookup` is checking it: worth dialling once the check has verified it.
    BeingChecked,
}

/// The slots and the dials in flight.
#[derive(Debug)]
pub(crate) struct Dialer {
    slots: Arc<Semaphore>,
    flights: Mutex<Flights>,
    /// Woken whenever a dial or check ends (its slot is free, its result stored) or a slot
    /// taken for nothing is given back.
    ended: Notify,
}

impl Dialer {
    /// A dialer with `slots` dial slots.
    pub(crate) fn new(slots: usize) -> Arc<Self> {
        Arc::new(Self {
            slots: Arc::new(Semaphore::new(slots)),
            flights: Mutex::new(Flights::default()),
            ended: Notify::new(),
        })
    }

    /// The dials and checks in flight. Lock order: this lock before the node's state lock.
    pub(crate) fn flights(&self) -> MutexGuard<'_, Flights> {
        self.flights.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A free slot, if there is one and nobody is waiting for it.
    pub(crate) fn try_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }

    /// A slot, waiting in the one first-come-first-served queue until `budget`. (A released
    /// slot goes to the longest waiter before any [`Dialer::try_slot`] sees it, so a side
    /// that only polled for free slots would starve while the other waits.)
    pub(crate) async fn slot_by(
        &self,
        budget: tokio::time::Instant,
    ) -> Option<OwnedSemaphorePermit> {
        let slot = self.slots.clone().acquire_owned();
        tokio::time::timeout_at(budget, slot).await.ok()?.ok()
    }

    /// Starts a dial or check of `key` with `permit` if `admit`, called under the in-flight
    /// lock, says [`DialStart::Started`]; the guard returned then holds the slot and the
    /// in-flight entry. Otherwise the slot is given back at once and waiters are woken.
    pub(crate) fn begin(
        self: &Arc<Self>,
        key: DialKey,
        purpose: Purpose,
        permit: OwnedSemaphorePermit,
        admit: impl FnOnce(&Flights) -> DialStart,
    ) -> (DialStart, Option<InFlight>) {
        let started = {
            let mut flights = self.flights();
            let verdict = admit(&flights);
            if verdict == DialStart::Started {
                flights.set_mut(purpose).insert(key);
            }
            verdict
        };
        if started != DialStart::Started {
            drop(permit);
            self.ended.notify_waiters();
            return (started, None);
        }
        let guard = InFlight {
            dialer: self.clone(),
            key,
            purpose,
            permit: Some(permit),
        };
        (started, Some(guard))
    }

    /// Waits until `done` holds for the dials in flight (looked at again whenever one ends),
    /// or until `budget`.
    pub(crate) async fn wait_until(
        &self,
        budget: tokio::time::Instant,
        done: impl Fn(&Flights) -> bool,
    ) {
        loop {
            // Registered before looking, so no ending dial is missed.
            let ended = self.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if done(&self.flights()) {
                return;
            }
            tokio::select! {
                _ = &mut ended => {}
                _ = tokio::time::sleep_until(budget) => return,
            }
        }
    }

    /// Free slots (tests).
    #[cfg(test)]
    pub(crate) fn free_slots(&self) -> usize {
        self.slots.available_permits()
    }
}

/// A dial or identify check in flight: it holds the dial slot and its in-flight entry.
/// Dropping it (the task finished, or was aborted at shutdown) removes the entry, frees the
/// slot and wakes whoever waits for a dial to end, in that order, so a waiter that wakes
/// finds the slot free and the result (stored before the drop) in the address book.
#[derive(Debug)]
pub(crate) struct InFlight {
    dialer: Arc<Dialer>,
    key: DialKey,
    purpose: Purpose,
    permit: Option<OwnedSemaphorePermit>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.dialer
            .flights()
            .set_mut(self.purpose)
            .remove(&self.key);
        drop(self.permit.take());
        self.dialer.ended.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn key(port: u16) -> DialKey {
        ([7; 32], SocketAddr::from(([10, 0, 0, 1], port)))
    }

    #[tokio::test]
    async fn a_guard_holds_its_slot_and_entry_until_dropped() {
        let d = Dialer::new(2);
        let permit = d.try_slot().unwrap();
        let (started, guard) = d.begin(key(1), Purpose::Connect, permit, |_| DialStart::Started);
        assert_eq!(started, DialStart::Started);
        assert!(guard.is_some());
        assert!(d.flights().dialing(&key(1)) && !d.flights().checking(&key(1)));
        assert_eq!(d.free_slots(), 1);
        // A check of the same key sees the dial.
        let permit = d.try_slot().unwrap();
        let (second, none) = d.begin(key(1), Purpose::Identify, permit, |f| {
            if f.any(&key(1)) {
                DialStart::Skipped
            } else {
                DialStart::Started
            }
        });
        assert_eq!(second, DialStart::Skipped);
        assert!(none.is_none());
        assert_eq!(d.free_slots(), 1, "a declined start gives its slot back");
        drop(guard);
        assert_eq!(d.flights().len(), 0);
        assert_eq!(d.free_slots(), 2);
    }

    #[tokio::test]
    async fn waiters_wake_when_a_dial_ends_and_give_up_at_the_budget() {
        let d = Dialer::new(1);
        let (_, guard) = d.begin(key(1), Purpose::Identify, d.try_slot().unwrap(), |_| {
            DialStart::Started
        });
        assert!(d.try_slot().is_none(), "no free slot");
        let budget = tokio::time::Instant::now() + Duration::from_secs(30);
        let waiter = {
            let d = d.clone();
            tokio::spawn(async move {
                d.wait_until(budget, |f| !f.checking(&key(1))).await;
                d.flights().len()
            })
        };
        let queued = {
            let d = d.clone();
            tokio::spawn(async move { d.slot_by(budget).await.is_some() })
        };
        tokio::task::yield_now().await;
        drop(guard);
        assert_eq!(waiter.await.unwrap(), 0);
        assert!(
            queued.await.unwrap(),
            "the queued waiter got the freed slot"
        );
        // Nothing ends: the wait and the queue give up at the budget.
        let (_, _held) = d.begin(key(2), Purpose::Connect, d.try_slot().unwrap(), |_| {
            DialStart::Started
        });
        let soon = tokio::time::Instant::now() + Duration::from_millis(20);
        d.wait_until(soon, |f| f.len() == 0).await;
        assert!(tokio::time::Instant::now() >= soon);
        assert!(d.slot_by(soon).await.is_none());
    }
}
