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
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;

use crate::{
    Capabilities, ClaimRequest, Decision, Error, FencingToken, ListQuery, Record, RecordKey,
    RecordState, RecordSummary, Result, Store, Timestamp, decide, is_owner,
};

/// Records in a `HashMap` behind a mutex.
///
/// A std `Mutex`, not tokio's: every critical section is a few map operations with no
/// `.await` inside, so a blocking lock is both correct and cheaper.
#[derive(Debug, Default)]
pub struct MemoryStore {
    records: Mutex<HashMap<RecordKey, Record>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many records are held, expired or not.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<RecordKey, Record>> {
        // A panic while holding the lock cannot leave a record half-written (each write is one
        // insert or remove), so a poisoned map is still consistent.
        self.records.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn with_owned_record<T>(
        &self,
        key: &RecordKey,
        token: FencingToken,
        apply: impl FnOnce(&mut HashMap<RecordKey, Record>) -> T,
    ) -> Result<T> {
        let mut records = self.lock();
        if !is_owner(records.get(key), token) {
            return Err(Error::Fenced);
        }
        Ok(apply(&mut records))
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn claim(&self, request: ClaimRequest<'_>) -> Result<Decision> {
        let mut records = self.lock();
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
        })
    }

    async fn release(&self, key: &RecordKey, token: FencingToken) -> Result<()> {
        self.with_owned_record(key, token, |records| {
            records.remove(key);
        })
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
        Ok(self.lock().get(key).cloned())
    }

    async fn delete(&self, key: &RecordKey) -> Result<bool> {
        Ok(self.lock().remove(key).is_some())
    }

    async fn sweep(&self, now: Timestamp, limit: usize) -> Result<usize> {
        let mut records = self.lock();
        let expired: Vec<RecordKey> = records
            .iter()
            .filter(|(_, record)| record.is_expired(now))
            .map(|(key, _)| key.clone())
            .take(limit)
            .collect();
        for key in &expired {
            records.remove(key);
        }
        Ok(expired.len())
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<RecordSummary>> {
        let records = self.lock();
        let mut matching: Vec<RecordSummary> = records
            .iter()
            .map(|(key, record)| RecordSummary::from_record(key.clone(), record))
            .filter(|summary| summary.matches(query))
            .collect();
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
        }
    }
}

#[cfg(test)]
mod tests {
    crate::store_conformance_tests!(async { Some(super::MemoryStore::new()) });
}
