//! Change notifications: how a retry that waits for a key in flight (`Prefer: wait`) learns
//! that the first run finished, without polling the store.
//!
//! A store announces each record it completes, releases or deletes by the record's
//! [`RecordKey::change_id`]. The memory and SQLite stores announce to their own process; the
//! PostgreSQL and Redis stores to every process that shares them (LISTEN/NOTIFY, pub/sub).

use tokio::sync::broadcast;

use crate::RecordKey;

/// Announcements queued per subscriber before the slowest one is told it lagged (and then
/// re-reads the record, as it would after any notification).
const CAPACITY: usize = 1024;

/// A fan-out of record changes. Cheap to clone; clones share subscribers.
#[derive(Debug, Clone)]
pub struct ChangeFeed {
    sender: broadcast::Sender<u64>,
}

impl Default for ChangeFeed {
    fn default() -> Self {
        Self { sender: broadcast::channel(CAPACITY).0 }
    }
}

impl ChangeFeed {
    pub fn new() -> Self {
        Self::default()
    }

    /// Announces that `key`'s record changed. Costs next to nothing when nobody listens.
    pub fn notify(&self, key: &RecordKey) {
        self.notify_id(key.change_id());
    }

    pub fn notify_id(&self, id: u64) {
        if self.sender.receiver_count() > 0 {
            let _ = self.sender.send(id);
        }
    }

    /// Every announcement from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<u64> {
        self.sender.subscribe()
    }
}

/// Who hears a store's change announcements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notifies {
    /// Nobody: waiters poll.
    Nobody,
    /// Subscribers in the process that made the change.
    ThisProcess,
    /// Subscribers in every process sharing the store.
    AllProcesses,
}

/// The state of a store's listening connection (PostgreSQL `LISTEN`, a Redis subscriber),
/// shared by the store and the task that keeps the connection: started once, on the first
/// waiter, and whether it listens right now.
#[derive(Debug)]
pub struct ChangeListener {
    started: std::sync::atomic::AtomicBool,
    listening: tokio::sync::watch::Sender<bool>,
}

impl Default for ChangeListener {
    fn default() -> Self {
        Self { started: false.into(), listening: tokio::sync::watch::Sender::new(false) }
    }
}

impl ChangeListener {
    /// `true` once: the caller starts the connection's task.
    pub fn claim_start(&self) -> bool {
        !self.started.swap(true, std::sync::atomic::Ordering::SeqCst)
    }

    /// Gives the start back (no runtime to start it on): a later waiter tries again.
    pub fn start_failed(&self) {
        self.started.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Called by the connection's task as it starts and stops listening.
    pub fn set_listening(&self, listening: bool) {
        self.listening.send_replace(listening);
    }

    /// Waits up to `within` for the connection to listen; `false` if it does not by then.
    pub async fn ready(&self, within: std::time::Duration) -> bool {
        let mut listening = self.listening.subscribe();
        tokio::time::timeout(within, async { listening.wait_for(|on| *on).await.is_ok() }).await
            == Ok(true)
    }
}
