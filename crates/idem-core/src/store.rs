//! The `Store` trait: what every backend (memory, SQLite, PostgreSQL, Redis) provides.
//!
//! A store keeps [`Record`]s and applies the state machine in [`crate::decide`] atomically:
//! between reading what is there and writing the new claim, no other claim on the same key, in
//! this process or another, may slip in. Every store passes the conformance suite in
//! [`crate::conformance`] (feature `conformance`).

use async_trait::async_trait;
use bytes::Bytes;

use crate::{Decision, FencingToken, Fingerprint, Record, RecordKey, Result, Timestamp};

/// The parameters of one claim; the engine computes them from its clock and configuration.
#[derive(Debug, Clone, Copy)]
pub struct ClaimRequest<'a> {
    pub key: &'a RecordKey,
    pub fingerprint: &'a Fingerprint,
    /// The token this claimant will hold if it acquires the key.
    pub token: FencingToken,
    pub now: Timestamp,
    pub lease_expires_at: Timestamp,
    /// When an abandoned in-flight record stops counting (lease expiry plus the TTL).
    pub expires_at: Timestamp,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Atomically decides a claim and, on [`Decision::Acquire`], stores the in-flight record
    /// with the request's token.
    async fn claim(&self, request: ClaimRequest<'_>) -> Result<Decision>;

    /// Stores the outcome. Fails with [`crate::Error::Fenced`] unless `token` owns the record.
    async fn complete(
        &self,
        key: &RecordKey,
        token: FencingToken,
        payload: Bytes,
        expires_at: Timestamp,
    ) -> Result<()>;

    /// Deletes the in-flight record so a retry runs again. Fenced unless `token` owns it.
    async fn release(&self, key: &RecordKey, token: FencingToken) -> Result<()>;

    /// Extends a live lease. Fenced unless `token` owns the record.
    async fn renew(
        &self,
        key: &RecordKey,
        token: FencingToken,
        lease_expires_at: Timestamp,
        expires_at: Timestamp,
    ) -> Result<()>;

    /// Reads a record as stored, expired or not (for operators and tests).
    async fn get(&self, key: &RecordKey) -> Result<Option<Record>>;

    /// Deletes a record whatever its state; `true` if there was one.
    async fn delete(&self, key: &RecordKey) -> Result<bool>;

    /// Deletes at most `limit` records whose `expires_at` is at or before `now`; returns how
    /// many it deleted. Bounded so that one call never holds the store for long.
    async fn sweep(&self, now: Timestamp, limit: usize) -> Result<usize>;

    /// A cheap round trip that proves the store answers (for health checks).
    async fn ping(&self) -> Result<()>;
}

#[async_trait]
impl<S: Store + ?Sized> Store for std::sync::Arc<S> {
    async fn claim(&self, request: ClaimRequest<'_>) -> Result<Decision> {
        (**self).claim(request).await
    }
    async fn complete(
        &self,
        key: &RecordKey,
        token: FencingToken,
        payload: Bytes,
        expires_at: Timestamp,
    ) -> Result<()> {
        (**self).complete(key, token, payload, expires_at).await
    }
    async fn release(&self, key: &RecordKey, token: FencingToken) -> Result<()> {
        (**self).release(key, token).await
    }
    async fn renew(
        &self,
        key: &RecordKey,
        token: FencingToken,
        lease_expires_at: Timestamp,
        expires_at: Timestamp,
    ) -> Result<()> {
        (**self).renew(key, token, lease_expires_at, expires_at).await
    }
    async fn get(&self, key: &RecordKey) -> Result<Option<Record>> {
        (**self).get(key).await
    }
    async fn delete(&self, key: &RecordKey) -> Result<bool> {
        (**self).delete(key).await
    }
    async fn sweep(&self, now: Timestamp, limit: usize) -> Result<usize> {
        (**self).sweep(now, limit).await
    }
    async fn ping(&self) -> Result<()> {
        (**self).ping().await
    }
}
