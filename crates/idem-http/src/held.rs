//! What an operator's page shows of this process: the keyed calls it is running now, and the
//! keys it held with an unknown outcome. Both are kept in memory, so reading them costs the
//! store nothing.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use idem_core::RecordKey;

/// Keys held with a stored `502 outcome-unknown`, the newest last, at most `capacity` of them
/// (the oldest forgotten first). Only what this process settled: a key held by another
/// gateway, or before a restart, is not here (`idem keys show` finds any). Cheap to clone.
/// Each key with when it was last checked against the store.
type Entries = VecDeque<(HeldKey, Option<Instant>)>;

#[derive(Debug, Clone)]
pub struct HeldKeys {
    inner: Arc<Mutex<Entries>>,
    capacity: usize,
}

/// One key held with an unknown outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldKey {
    pub key: RecordKey,
    /// How the outcome became unknown: `connection-broke`, `body-broke`, `abandoned`,
    /// `shutdown`.
    pub cause: String,
    pub at: SystemTime,
}

impl HeldKeys {
    pub fn new(capacity: usize) -> Self {
        Self { inner: Arc::default(), capacity: capacity.max(1) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn push(&self, key: RecordKey, cause: &str) {
        let mut held = self.lock();
        held.retain(|(entry, _)| entry.key != key);
        if held.len() == self.capacity {
            held.pop_front();
        }
        held.push_back((HeldKey { key, cause: cause.to_owned(), at: SystemTime::now() }, None));
    }

    /// Forgets `key` (released).
    pub fn forget(&self, key: &RecordKey) {
        self.lock().retain(|(entry, _)| entry.key != *key);
    }

    /// Forgets this entry (found no longer held), but not a later one of the same key: a key
    /// released, run again and held again while it was being checked stays.
    pub fn forget_entry(&self, gone: &HeldKey) {
        self.lock().retain(|(entry, _)| entry != gone);
    }

    /// Up to `count` entries to check against the store, those never or longest ago checked
    /// first; each is marked checked now.
    pub fn to_check(&self, count: usize) -> Vec<HeldKey> {
        let mut held = self.lock();
        let mut order: Vec<usize> = (0..held.len()).collect();
        order.sort_by_key(|index| held[*index].1);
        let now = Instant::now();
        order
            .into_iter()
            .take(count)
            .map(|index| {
                held[index].1 = Some(now);
                held[index].0.clone()
            })
            .collect()
    }

    /// The keys, the oldest first.
    pub fn snapshot(&self) -> Vec<HeldKey> {
        self.lock().iter().map(|(entry, _)| entry.clone()).collect()
    }
}

/// The keyed calls this process is running now (claimed, not yet settled), whether or not
/// their clients still wait. Bounded by the layer's `max_running`. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct RunningKeys {
    inner: Arc<Mutex<HashMap<u64, RunningKey>>>,
    next: Arc<AtomicU64>,
}

/// One keyed call running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningKey {
    pub key: RecordKey,
    pub since: Instant,
}

/// Removes its call from [`RunningKeys`] when dropped: when the call is settled, or its task
/// ends any other way.
#[derive(Debug)]
pub(crate) struct RunningGuard {
    keys: RunningKeys,
    id: u64,
}

impl RunningKeys {
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) fn enter(&self, key: RecordKey) -> RunningGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut running = self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        running.insert(id, RunningKey { key, since: Instant::now() });
        RunningGuard { keys: self.clone(), id }
    }

    /// The calls running now, the longest running first.
    pub fn snapshot(&self) -> Vec<RunningKey> {
        let running = self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut keys: Vec<RunningKey> = running.values().cloned().collect();
        keys.sort_by_key(|key| key.since);
        keys
    }
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        let mut running = self.keys.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        running.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use idem_core::{IdempotencyKey, Scope};

    fn key(name: &str) -> RecordKey {
        RecordKey::new(Scope::anonymous(), IdempotencyKey::parse_header(name.as_bytes()).unwrap())
    }

    #[test]
    fn keeps_the_newest_up_to_its_capacity_once_each() {
        let held = HeldKeys::new(2);
        held.push(key("a"), "connection-broke");
        held.push(key("b"), "abandoned");
        held.push(key("a"), "body-broke");
        held.push(key("c"), "shutdown");
        let names: Vec<_> =
            held.snapshot().iter().map(|entry| entry.key.key.as_str().to_owned()).collect();
        assert_eq!(names, ["a", "c"]);
        held.forget(&key("a"));
        assert_eq!(held.snapshot().len(), 1);
    }

    #[test]
    fn checks_go_round_and_forget_only_the_entry_checked() {
        let held = HeldKeys::new(10);
        for name in ["a", "b", "c"] {
            held.push(key(name), "connection-broke");
        }
        let names = |entries: Vec<HeldKey>| -> Vec<String> {
            entries.iter().map(|entry| entry.key.key.as_str().to_owned()).collect()
        };
        assert_eq!(names(held.to_check(2)), ["a", "b"]);
        assert_eq!(names(held.to_check(2))[0], "c", "the one not yet checked comes first");
        let checked = held.snapshot()[0].clone();
        // Held again meanwhile: a new entry, which forgetting the checked one leaves.
        std::thread::sleep(std::time::Duration::from_millis(2));
        held.push(key("a"), "abandoned");
        held.forget_entry(&checked);
        assert_eq!(names(held.snapshot()), ["b", "c", "a"]);
    }

    #[test]
    fn a_running_call_is_listed_until_its_guard_drops() {
        let running = RunningKeys::new();
        let first = running.enter(key("a"));
        let second = running.enter(key("b"));
        let names: Vec<_> =
            running.snapshot().iter().map(|entry| entry.key.key.as_str().to_owned()).collect();
        assert_eq!(names, ["a", "b"], "the longest running first");
        drop(first);
        assert_eq!(running.snapshot().len(), 1);
        drop(second);
        assert!(running.snapshot().is_empty());
    }
}
