//! An in-process store: for tests and single-process use. Nothing survives a restart.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use std::time::Duration;
//! use idem_core::{Engine, EngineConfig, MemoryStore, SystemClock};
//!
//! let engine = Engine::new(MemoryStore::new(), SystemClock, EngineConfig::default());
//! # let _ = engine;
//! # });
//! ```

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;

use crate::{
    Capabilities, ChangeFeed, ClaimRequest, Decision, Error, FencingToken, ListQuery, Notifies,
    Record, RecordKey, RecordState, RecordSummary, Result, Store, Timestamp, decide, is_owner,
};

/// Maps behind their own locks; a key always lives in the same one.
const SHARDS: usize = 16;

type Shard = HashMap<RecordKey, Record>;

/// Records in 16 `HashMap`s, each behind its own mutex.
///
/// Sharded so that concurrent requests for different keys rarely wait on one lock, and so that
/// a map growing (rehashing all it holds) stalls a sixteenth of the keys for a sixteenth of the
/// time. A std `Mutex`, not tokio's: every critical section is a few map operations with no
/// `.await` inside, so a blocking lock is both correct and cheaper.
#[derive(Debug)]
pub struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    changes: ChangeFeed,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            changes: ChangeFeed::new(),
        }
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many records are held, expired or not.
    pub fn len(&self) -> usize {
        (0..SHARDS).map(|index| lock(&self.shards[index]).len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard(&self, key: &RecordKey) -> MutexGuard<'_, Shard> {
        let index = self.hasher.hash_one(key) as usize % SHARDS;
        lock(&self.shards[index])
    }

    fn with_owned_record<T>(
        &self,
        key: &RecordKey,
        token: FencingToken,
        apply: impl FnOnce(&mut Shard) -> T,
    ) -> Result<T> {
        let mut records = self.shard(key);
        if !is_owner(records.get(key), token) {
            return Err(Error::Fenced);
        }
        Ok(apply(&mut records))
    }
}

fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    // A panic while holding the lock cannot leave a record half-written (each write is one
    // insert or remove), so a poisoned map is still consistent.
    shard.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[async_trait]
impl Store for MemoryStore {
    async fn claim(&self, request: ClaimRequest<'_>) -> Result<Decision> {
        let mut records = self.shard(request.key);
        let decision = decide(records.get(request.key), request.fingerprint, request.now);
        if decision == Decision::Acquire {
            records.insert(
                request.key.clone(),
                Record {
                    fingerprint: *request.fingerprint,
                    state: RecordState::InFlight {
                        token: request.token,
                        lease_expires_at: request.lease_expires_at,
                    },
                    created_at: request.now,
                    expires_at: request.expires_at,
                },
            );
        }
        Ok(decision)
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: FencingToken,
        payload: Bytes,
        _now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<()> {
        self.with_owned_record(key, token, |records| {
            if let Some(record) = records.get_mut(key) {
                record.state = RecordState::Completed { payload };
                record.expires_at = expires_at;
            }
        })?;
        self.changes.notify(key);
        Ok(())
    }

    async fn release(&self, key: &RecordKey, token: FencingToken) -> Result<()> {
        self.with_owned_record(key, token, |records| {
            records.remove(key);
        })?;
        self.changes.notify(key);
        Ok(())
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: FencingToken,
        _now: Timestamp,
        lease_expires_at: Timestamp,
        expires_at: Timestamp,
    ) -> Result<()> {
        self.with_owned_record(key, token, |records| {
            if let Some(record) = records.get_mut(key) {
                record.state = RecordState::InFlight { token, lease_expires_at };
                record.expires_at = expires_at;
            }
        })
    }

    async fn get(&self, key: &RecordKey) -> Result<Option<Record>> {
        Ok(self.shard(key).get(key).cloned())
    }

    async fn delete(&self, key: &RecordKey) -> Result<bool> {
        let deleted = self.shard(key).remove(key).is_some();
        self.changes.notify(key);
        Ok(deleted)
    }

    async fn sweep(&self, now: Timestamp, limit: usize) -> Result<usize> {
        let mut deleted = 0;
        // One shard locked at a time, so a sweep never stops every key at once.
        for shard in self.shards.iter() {
            if deleted >= limit {
                break;
            }
            let mut records = lock(shard);
            let before = records.len();
            let mut budget = limit - deleted;
            records.retain(|_, record| {
                let remove = budget > 0 && record.is_expired(now);
                budget -= usize::from(remove);
                !remove
            });
            deleted += before - records.len();
        }
        Ok(deleted)
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<RecordSummary>> {
        let mut matching: Vec<RecordSummary> = Vec::new();
        for shard in self.shards.iter() {
            let records = lock(shard);
            matching.extend(
                records
                    .iter()
                    .map(|(key, record)| RecordSummary::from_record(key.clone(), record))
                    .filter(|summary| summary.matches(query)),
            );
        }
        matching.sort_by_key(|summary| summary.created_at);
        matching.truncate(query.effective_limit());
        Ok(matching)
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            name: "memory",
            durable: false,
            shared_by_processes: false,
            shared_by_hosts: false,
            native_expiry: false,
            notifies: Notifies::ThisProcess,
        }
    }

    fn subscribe(&self) -> Option<tokio::sync::broadcast::Receiver<u64>> {
        Some(self.changes.subscribe())
    }
}

#[cfg(test)]
mod tests {
    crate::store_conformance_tests!(async { Some(super::MemoryStore::new()) });
}
