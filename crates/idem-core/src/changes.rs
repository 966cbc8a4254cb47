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
