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
    /// Roughly how many bytes the records hold, and the most they may.
    used: std::sync::atomic::AtomicUsize,
    max_bytes: usize,
}

/// What a record costs besides its key and payload (map entry, fingerprint, times).
const RECORD_OVERHEAD: usize = 128;

fn record_bytes(key: &RecordKey, record: &Record) -> usize {
    let payload = match &record.state {
        RecordState::Completed { payload } => payload.len(),
        RecordState::InFlight { .. } => 0,
    };
    RECORD_OVERHEAD + key.scope.as_str().len() + key.key.as_str().len() + payload
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::with_max_bytes(Self::DEFAULT_MAX_BYTES)
    }
}

impl MemoryStore {
    /// The default bound on what the records hold: 1 GiB.
    pub const DEFAULT_MAX_BYTES: usize = 1 << 30;

    /// A store whose records hold at most about `max_bytes` (keys, payloads and a fixed cost
    /// per record). When full, a claim of a new key fails as unavailable (the gateway answers
    /// 503) until expired records are swept; completions of claims already made, replays and
    /// everything else go on.
    pub fn with_max_bytes(max_bytes: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            changes: ChangeFeed::new(),
            used: std::sync::atomic::AtomicUsize::new(0),
            max_bytes,
        }
    }
}

impl MemoryStore {
    /// Roughly how many bytes the records hold.
    pub fn bytes(&self) -> usize {
        self.used.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn account(&self, added: usize, removed: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        if added >= removed {
            self.used.fetch_add(added - removed, Relaxed);
        } else {
            self.used.fetch_sub(removed - added, Relaxed);
        }
    }

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
            if self.bytes() >= self.max_bytes {
                return Err(Error::Full(format!(
                    "the memory store holds its {} bytes; new keys are refused until records expire",
                    self.max_bytes
                )));
            }
            let record = Record {
                fingerprint: *request.fingerprint,
                state: RecordState::InFlight {
                    token: request.token,
                    lease_expires_at: request.lease_expires_at,
                },
                created_at: request.now,
                expires_at: request.expires_at,
            };
            let added = record_bytes(request.key, &record);
            let removed = records
                .insert(request.key.clone(), record)
                .map_or(0, |old| record_bytes(request.key, &old));
            self.account(added, removed);
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
        let added = payload.len();
        self.with_owned_record(key, token, |records| {
            if let Some(record) = records.get_mut(key) {
                record.state = RecordState::Completed { payload };
                record.expires_at = expires_at;
            }
        })?;
        self.account(added, 0);
        self.changes.notify(key);
        Ok(())
    }

    async fn release(&self, key: &RecordKey, token: FencingToken) -> Result<()> {
        let removed = self.with_owned_record(key, token, |records| {
            records.remove(key).map_or(0, |old| record_bytes(key, &old))
        })?;
        self.account(0, removed);
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
        let removed = self.shard(key).remove(key);
        let deleted = removed.is_some();
        self.account(0, removed.map_or(0, |old| record_bytes(key, &old)));
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
            let mut freed = 0;
            records.retain(|key, record| {
                let remove = budget > 0 && record.is_expired(now);
                budget -= usize::from(remove);
                if remove {
                    freed += record_bytes(key, record);
                }
                !remove
            });
            deleted += before - records.len();
            self.account(0, freed);
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
    use super::*;
    use crate::{FencingToken, Fingerprint, IdempotencyKey, Scope};

    crate::store_conformance_tests!(async { Some(super::MemoryStore::new()) });

    #[tokio::test]
    async fn a_full_store_refuses_new_keys_and_takes_them_again_once_records_expire() {
        let store = MemoryStore::with_max_bytes(10_000);
        let fingerprint = Fingerprint::builder().part(b"x").finish();
        let claim = |name: String, now: u64| {
            let store = &store;
            async move {
                let key = RecordKey::new(Scope::named("s"), IdempotencyKey::new(name).unwrap());
                let token = FencingToken::generate();
                let decision = store
                    .claim(ClaimRequest {
                        key: &key,
                        fingerprint: &fingerprint,
                        token,
                        now: Timestamp::from_millis(now),
                        lease_expires_at: Timestamp::from_millis(now + 1_000),
                        expires_at: Timestamp::from_millis(now + 60_000),
                    })
                    .await?;
                assert_eq!(decision, Decision::Acquire);
                let payload = Bytes::from(vec![7u8; 3_000]);
                let expires = Timestamp::from_millis(now + 60_000);
                store.complete(&key, token, payload, Timestamp::from_millis(now), expires).await
            }
        };
        let mut stored = 0;
        while claim(format!("k{stored}"), 1_000).await.is_ok() {
            stored += 1;
            assert!(stored < 10, "the bound was never reached");
        }
        let full = claim("one-more".into(), 1_000).await.unwrap_err();
        assert!(matches!(full, Error::Full(_)), "{full}");
        assert_eq!(stored, 4, "10,000 bytes hold 4 records of about 3 KiB");
        // Past their expiry, swept: room again.
        assert_eq!(store.sweep(Timestamp::from_millis(62_000), 100).await.unwrap(), stored);
        assert!(store.bytes() < 200, "{} bytes left", store.bytes());
        claim("after".into(), 62_000).await.unwrap();
    }
}
