//! The `Store` trait: what every backend (memory, SQLite, PostgreSQL, Redis) provides.
//!
//! A store keeps [`Record`]s and applies the state machine in [`crate::decide`] atomically:
//! between reading what is there and writing the new claim, no other claim on the same key, in
//! this process or another, may slip in. Every store passes the conformance suite in
//! [`crate::conformance`] (feature `conformance`).

use async_trait::async_trait;
use bytes::Bytes;

use crate::{
    Decision, FencingToken, Fingerprint, Notifies, Record, RecordKey, Result, Scope, Timestamp,
};

/// What a store is, beyond what the trait guarantees: for documentation, operators and the
/// conformance suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// A short name: `memory`, `sqlite`, `postgres`, `redis`.
    pub name: &'static str,
    /// Records survive a restart of the process (and of the store server, as configured).
    pub durable: bool,
    /// Several processes may share it.
    pub shared_by_processes: bool,
    /// Several hosts may share it.
    pub shared_by_hosts: bool,
    /// The store deletes expired records itself; `sweep` has nothing to do.
    pub native_expiry: bool,
    /// Who hears of completed, released and deleted records ([`Store::subscribe`]).
    pub notifies: Notifies,
}

/// Which records [`Store::list`] returns.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub scope: Option<Scope>,
    pub state: Option<StateFilter>,
    /// Only records created before this instant (the oldest first).
    pub created_before: Option<Timestamp>,
    /// At most this many; stores also cap it at [`ListQuery::MAX_LIMIT`].
    pub limit: usize,
}

impl ListQuery {
    pub const MAX_LIMIT: usize = 10_000;

    pub fn effective_limit(&self) -> usize {
        self.limit.clamp(1, Self::MAX_LIMIT)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateFilter {
    InFlight,
    Completed,
}

/// One record as [`Store::list`] shows it: everything but the payload itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordSummary {
    pub key: RecordKey,
    pub fingerprint: Fingerprint,
    /// `Some(lease end)` while in flight, `None` once completed.
    pub lease_expires_at: Option<Timestamp>,
    /// The stored payload's size once completed.
    pub payload_len: Option<u64>,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
}

impl RecordSummary {
    pub fn from_record(key: RecordKey, record: &Record) -> Self {
        let (lease_expires_at, payload_len) = match &record.state {
            crate::RecordState::InFlight { lease_expires_at, .. } => {
                (Some(*lease_expires_at), None)
            }
            crate::RecordState::Completed { payload } => (None, Some(payload.len() as u64)),
        };
        Self {
            key,
            fingerprint: record.fingerprint,
            lease_expires_at,
            payload_len,
            created_at: record.created_at,
            expires_at: record.expires_at,
        }
    }

    /// Whether `query`'s filters (not its limit) keep this record.
    pub fn matches(&self, query: &ListQuery) -> bool {
        query.scope.as_ref().is_none_or(|scope| *scope == self.key.scope)
            && query.state.is_none_or(|state| match state {
                StateFilter::InFlight => self.lease_expires_at.is_some(),
                StateFilter::Completed => self.lease_expires_at.is_none(),
            })
            && query.created_before.is_none_or(|before| self.created_at < before)
    }
}

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

    /// Stores the outcome, to be kept until `expires_at`. Fails with [`crate::Error::Fenced`]
    /// unless `token` owns the record.
    async fn complete(
        &self,
        key: &RecordKey,
        token: FencingToken,
        payload: Bytes,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<()>;

    /// Deletes the in-flight record so a retry runs again. Fenced unless `token` owns it.
    async fn release(&self, key: &RecordKey, token: FencingToken) -> Result<()>;

    /// Extends a live lease. Fenced unless `token` owns the record.
    async fn renew(
        &self,
        key: &RecordKey,
        token: FencingToken,
        now: Timestamp,
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

    /// Records matching `query`, the oldest first, for operators (`idem keys list`).
    async fn list(&self, query: &ListQuery) -> Result<Vec<RecordSummary>>;

    /// A cheap round trip that proves the store answers and can take a write (for health
    /// checks, and at start): a read-only database or a full disk fails it, with the reason.
    async fn ping(&self) -> Result<()>;

    /// The store server's own clock (PostgreSQL's `clock_timestamp()`, Redis's `TIME`), which
    /// every process sharing the store can agree on; `None` for a store without one. See
    /// [`crate::StoreClock`].
    async fn server_time(&self) -> Result<Option<Timestamp>> {
        Ok(None)
    }

    fn capabilities(&self) -> Capabilities;

    /// Announcements of records completed, released or deleted from now on, by
    /// [`RecordKey::change_id`]; `None` if the store makes none (waiters then poll). Who
    /// hears them is [`Capabilities::notifies`].
    fn subscribe(&self) -> Option<tokio::sync::broadcast::Receiver<u64>> {
        None
    }

    /// Asks that the next change of the in-flight `key` be announced to every subscribed
    /// process. Stores whose announcements cost something when nobody listens (a PostgreSQL
    /// `NOTIFY`, a Redis `PUBLISH`) announce only records somebody watches; the others have
    /// nothing to do.
    async fn watch(&self, _key: &RecordKey) -> Result<()> {
        Ok(())
    }
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
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<()> {
        (**self).complete(key, token, payload, now, expires_at).await
    }
    async fn release(&self, key: &RecordKey, token: FencingToken) -> Result<()> {
        (**self).release(key, token).await
    }
    async fn renew(
        &self,
        key: &RecordKey,
        token: FencingToken,
        now: Timestamp,
        lease_expires_at: Timestamp,
        expires_at: Timestamp,
    ) -> Result<()> {
        (**self).renew(key, token, now, lease_expires_at, expires_at).await
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
    async fn list(&self, query: &ListQuery) -> Result<Vec<RecordSummary>> {
        (**self).list(query).await
    }
    async fn ping(&self) -> Result<()> {
        (**self).ping().await
    }
    async fn server_time(&self) -> Result<Option<Timestamp>> {
        (**self).server_time().await
    }
    fn capabilities(&self) -> Capabilities {
        (**self).capabilities()
    }
    fn subscribe(&self) -> Option<tokio::sync::broadcast::Receiver<u64>> {
        (**self).subscribe()
    }
    async fn watch(&self, key: &RecordKey) -> Result<()> {
        (**self).watch(key).await
    }
}
