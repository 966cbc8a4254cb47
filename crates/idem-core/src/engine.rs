//! The engine: runs an operation once per key, whatever the number of retries.
//!
//! [`Engine::run`] wraps any async function (a job, a webhook handler): the first call with a
//! key runs it and stores its output; a retry with the same key and fingerprint gets the
//! stored output back without running it; a retry while the first still runs is told to come
//! back later. [`Engine::begin`] is the lower-level form the HTTP layer uses.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use bytes::Bytes;
//! use idem_core::{Engine, EngineConfig, Fingerprint, IdempotencyKey, MemoryStore, Outcome,
//!     RecordKey, Scope, SystemClock};
//!
//! let engine = Engine::new(MemoryStore::new(), SystemClock, EngineConfig::default());
//! let key = RecordKey::new(Scope::named("billing"), IdempotencyKey::new("charge-42").unwrap());
//! let fingerprint = Fingerprint::builder().part(b"charge 42 EUR to card 7").finish();
//!
//! let first = engine.run(&key, fingerprint, || async { Ok::<_, std::io::Error>(Bytes::from("ch_1")) }).await.unwrap();
//! assert!(matches!(first, Outcome::Executed(ref body) if body == "ch_1"));
//!
//! // The retry does not run the closure; it gets the stored output.
//! let retry = engine.run(&key, fingerprint, || async { Ok::<_, std::io::Error>(Bytes::from("ch_2")) }).await.unwrap();
//! assert!(matches!(retry, Outcome::Replayed(ref body) if body == "ch_1"));
//! # });
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::{
    ClaimRequest, Clock, Decision, Error, FencingToken, Fingerprint, Notifies, RecordKey,
    RecordState, Result, Store, Timestamp,
};

/// How long claims and records live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// How long an in-flight claim holds without renewal. A running operation renews it every
    /// third of this; a crashed owner's claim frees itself after it.
    pub lease: Duration,
    /// How long a completed record is kept (and replayed) after it completes.
    pub ttl: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self { lease: Duration::from_secs(30), ttl: Duration::from_secs(24 * 60 * 60) }
    }
}

/// Runs operations once per key. Cheap to clone: clones share the store and clock.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<EngineInner>,
}

struct EngineInner {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    config: EngineConfig,
    /// Bounds the failed claims cleaned up at once (see `release_orphan`).
    cleanups: Arc<tokio::sync::Semaphore>,
}

/// Most releases tried for one failed claim (backoff from 250 ms to 5 s: about a minute).
const ORPHAN_RELEASE_ATTEMPTS: u32 = 16;

/// Most failed claims cleaned up at once; past it, a failed claim that landed anyway frees
/// itself when its lease expires.
const MAX_CLEANUPS: usize = 4096;

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("config", &self.inner.config).finish_non_exhaustive()
    }
}

/// What [`Engine::begin`] found.
#[derive(Debug)]
pub enum Begin {
    /// The caller owns the key: run the operation, then complete or release the claim.
    Run(Claim),
    /// Completed before with the same fingerprint: here is the stored payload.
    Replay(Bytes),
    /// The key was used with a different fingerprint; nothing runs.
    Mismatch,
    /// Another owner is running it; try again after `retry_after`.
    InFlight { retry_after: Duration },
}

/// What [`Engine::run`] did.
#[derive(Debug)]
pub enum Outcome<E> {
    /// The operation ran now and its output was stored.
    Executed(Bytes),
    /// The operation had run before; this is its stored output.
    Replayed(Bytes),
    /// The key was used with a different fingerprint; nothing ran.
    Mismatch,
    /// Another caller is running it; nothing ran.
    InFlight { retry_after: Duration },
    /// The operation ran and failed; the key was released so a retry runs again.
    Failed(E),
}

impl Engine {
    pub fn new(store: impl Store, clock: impl Clock, config: EngineConfig) -> Self {
        Self::from_shared(Arc::new(store), Arc::new(clock), config)
    }

    pub fn from_shared(store: Arc<dyn Store>, clock: Arc<dyn Clock>, config: EngineConfig) -> Self {
        assert!(!config.lease.is_zero(), "the lease must be longer than zero");
        let cleanups = Arc::new(tokio::sync::Semaphore::new(MAX_CLEANUPS));
        Self { inner: Arc::new(EngineInner { store, clock, config, cleanups }) }
    }

    pub fn config(&self) -> EngineConfig {
        self.inner.config
    }

    /// The same store and clock, with records kept `ttl` after they complete (per-route TTLs).
    pub fn with_ttl(&self, ttl: Duration) -> Self {
        let inner = &self.inner;
        Self {
            inner: Arc::new(EngineInner {
                store: Arc::clone(&inner.store),
                clock: Arc::clone(&inner.clock),
                config: EngineConfig { ttl, ..inner.config },
                cleanups: Arc::clone(&inner.cleanups),
            }),
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    pub fn now(&self) -> Timestamp {
        self.inner.clock.now()
    }

    /// Claims `key` for a request with `fingerprint`, or says why the caller must not run.
    ///
    /// The claim is decided on a task of its own, so a caller that goes away meanwhile (a
    /// client hanging up while the store answers) cannot strand the key: a claim won for
    /// nobody is released at once, since nothing ran under it. A claim that failed on this
    /// side (the store did not answer in time) may still land in the store later; its token
    /// is released in the background until its lease would have ended.
    pub async fn begin(&self, key: RecordKey, fingerprint: Fingerprint) -> Result<Begin> {
        let begun = self.begin_uncounted(key, fingerprint).await;
        if let Ok(begun) = &begun {
            count(begun);
        }
        begun
    }

    /// Like [`Engine::begin`], but a key in flight is waited for, up to `wait`: the answer is
    /// the first run's stored outcome, or [`Begin::Run`] if it was released (or its owner's
    /// lease ran out), or [`Begin::InFlight`] if it still runs when `wait` is over. The flag
    /// says whether it waited at all. Waiters hear of the change from the store where it
    /// announces changes, and poll it briefly where it cannot.
    ///
    /// A store error after the key was seen in flight answers [`Begin::InFlight`] (the last
    /// thing known), never an error: a caller that fails open on errors must not run a key it
    /// has just seen running.
    pub async fn begin_waiting(
        &self,
        key: RecordKey,
        fingerprint: Fingerprint,
        wait: Duration,
    ) -> Result<(Begin, bool)> {
        let deadline = tokio::time::Instant::now() + wait;
        let store = &self.inner.store;
        // Subscribed before the first look, so no change between a look and the wait is missed.
        let mut changes = store.subscribe();
        let capabilities = store.capabilities();
        let heard_everywhere = match capabilities.notifies {
            Notifies::AllProcesses => true,
            Notifies::ThisProcess => !capabilities.shared_by_processes,
            Notifies::Nobody => false,
        };
        // A safety re-check even with announcements (one may be lost on a reconnect).
        let short_poll = Duration::from_millis(200);
        let mut poll =
            if heard_everywhere && changes.is_some() { Duration::from_secs(5) } else { short_poll };
        let mut watched = false;
        let mut waited = false;
        loop {
            let begun = match self.begin_uncounted(key.clone(), fingerprint).await {
                Ok(begun) => begun,
                Err(error) if waited || watched => {
                    tracing::warn!(key = %key.key, %error, "the store failed while waiting for a key in flight; answering in flight");
                    let begun = Begin::InFlight { retry_after: Duration::from_secs(1) };
                    count(&begun);
                    return Ok((begun, true));
                }
                Err(error) => return Err(error),
            };
            let Begin::InFlight { retry_after } = begun else {
                count(&begun);
                return Ok((begun, waited));
            };
            let now = tokio::time::Instant::now();
            if now >= deadline {
                count(&begun);
                return Ok((begun, waited));
            }
            if !watched && changes.is_some() {
                watched = true;
                match store.watch(&key).await {
                    // Look again: the first run may have finished before the watch took.
                    Ok(()) => continue,
                    Err(error) => {
                        tracing::debug!(key = %key.key, %error, "cannot watch the key; polling");
                        changes = None;
                        poll = short_poll;
                    }
                }
            }
            let step = (deadline - now).min(retry_after).min(poll);
            if wait_for_change(&mut changes, key.change_id(), step).await {
                // Announced: the record was released and may be claimed anew by another
                // waiter, unwatched; watch it again if it is still in flight.
                watched = false;
            }
            if changes.is_none() {
                poll = short_poll;
            }
            waited = true;
        }
    }

    async fn begin_uncounted(&self, key: RecordKey, fingerprint: Fingerprint) -> Result<Begin> {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let engine = self.clone();
        tokio::spawn(async move {
            let token = FencingToken::generate();
            let now = engine.now();
            let lease_expires_at = now.saturating_add(engine.inner.config.lease);
            let result = engine.claim(&key, fingerprint, token, now, lease_expires_at).await;
            let failed = result.as_ref().is_err_and(Error::is_unavailable);
            // Sent in a guard: a won claim nobody takes out of it (the caller left before or
            // after the send) is released when the guard drops.
            let _ = sender.send(Handoff(Some(result)));
            if failed {
                engine.release_orphan(key, token, lease_expires_at).await;
            }
        });
        match receiver.await {
            Ok(mut handoff) => handoff.0.take().expect("a handoff is taken once"),
            Err(_) => Err(Error::unavailable("the claim task stopped")),
        }
    }

    async fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
        token: FencingToken,
        now: Timestamp,
        lease_expires_at: Timestamp,
    ) -> Result<Begin> {
        let request = ClaimRequest {
            key,
            fingerprint: &fingerprint,
            token,
            now,
            lease_expires_at,
            expires_at: lease_expires_at.saturating_add(self.inner.config.ttl),
        };
        let decision = timed("claim", self.inner.store.claim(request)).await?;
        Ok(match decision {
            Decision::Acquire => Begin::Run(Claim {
                engine: self.clone(),
                key: key.clone(),
                token,
                lease_expires_at,
                finished: false,
            }),
            Decision::Replay(payload) => Begin::Replay(payload),
            Decision::Mismatch => Begin::Mismatch,
            Decision::InFlight { lease_expires_at } => {
                Begin::InFlight { retry_after: retry_after(lease_expires_at, now) }
            }
        })
    }

    /// A claim that failed on this side (the store did not answer in time) may still have
    /// been carried out by the store: Redis runs a queued script after a pause, PostgreSQL
    /// commits a statement whose client gave up. Nothing will run under its token, so the
    /// token is released, tried again with backoff until the lease it asked for would have
    /// ended. Releasing is fenced by the token: it never touches anybody else's record.
    async fn release_orphan(&self, key: RecordKey, token: FencingToken, lease_end: Timestamp) {
        let Ok(_permit) = Arc::clone(&self.inner.cleanups).try_acquire_owned() else {
            tracing::debug!(key = %key.key, "too many failed claims being cleaned up; this one frees itself when its lease expires");
            return;
        };
        let mut backoff = Duration::from_millis(250);
        for attempt in 1..=ORPHAN_RELEASE_ATTEMPTS {
            tokio::time::sleep(backoff).await;
            match self.inner.store.release(&key, token).await {
                Ok(()) => {
                    metrics::counter!("idem_orphan_claims_released_total", "cause" => "store-timeout")
                        .increment(1);
                    tracing::info!(key = %key.key, scope = %key.scope, "a claim that failed on our side had landed in the store; released it (nothing ran)");
                    return;
                }
                // The store answers, and the record is not ours: the claim never landed (or
                // an earlier release whose reply was lost freed it). Past the first seconds,
                // a claim still queued behind it is not worth more round trips.
                Err(Error::Fenced) if attempt >= 3 => return,
                Err(_) => {}
            }
            if self.now().saturating_add(backoff) >= lease_end {
                return;
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Runs `operation` once for `key`: stores its `Ok` output for replay, releases the key on
    /// `Err` so that a retry runs again. The lease is renewed while the operation runs.
    pub async fn run<F, Fut, E>(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
        operation: F,
    ) -> Result<Outcome<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Bytes, E>>,
    {
        let mut claim = match self.begin(key.clone(), fingerprint).await? {
            Begin::Run(claim) => claim,
            Begin::Replay(payload) => return Ok(Outcome::Replayed(payload)),
            Begin::Mismatch => return Ok(Outcome::Mismatch),
            Begin::InFlight { retry_after } => return Ok(Outcome::InFlight { retry_after }),
        };
        match claim.keep_alive(operation()).await {
            Ok(payload) => {
                claim.complete(payload.clone()).await?;
                Ok(Outcome::Executed(payload))
            }
            Err(error) => {
                claim.release().await?;
                Ok(Outcome::Failed(error))
            }
        }
    }

    /// Deletes expired records in batches of `batch` until a batch comes back short or
    /// `max_batches` ran; returns how many were deleted.
    pub async fn sweep_expired(&self, batch: usize, max_batches: usize) -> Result<usize> {
        let mut total = 0;
        for _ in 0..max_batches {
            let deleted = timed("sweep", self.inner.store.sweep(self.now(), batch)).await?;
            total += deleted;
            if deleted < batch {
                break;
            }
        }
        Ok(total)
    }
}

/// What a store's `complete_in` needs to store a claim's outcome inside the caller's own
/// transaction: the record, the token that owns it, and when the outcome expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub key: RecordKey,
    pub token: FencingToken,
    /// The TTL from now, on the engine's clock.
    pub expires_at: Timestamp,
}

impl Completion {
    /// For `token`'s claim of `key`, expiring the engine's TTL from now.
    pub fn new(engine: &Engine, key: RecordKey, token: FencingToken) -> Self {
        let expires_at = engine.now().saturating_add(engine.inner.config.ttl);
        Self { key, token, expires_at }
    }
}

/// A claim's decision on its way to the caller. If the caller is gone (the send failed, or
/// the caller's future was dropped with the decision still in the channel), a won claim is
/// released: nothing ran under it.
struct Handoff(Option<Result<Begin>>);

impl Drop for Handoff {
    fn drop(&mut self) {
        let Some(Ok(Begin::Run(mut claim))) = self.0.take() else { return };
        claim.finished = true;
        metrics::counter!("idem_orphan_claims_released_total", "cause" => "caller-gone")
            .increment(1);
        let (store, key, token) =
            (Arc::clone(&claim.engine.inner.store), claim.key.clone(), claim.token);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                match store.release(&key, token).await {
                    Ok(()) => tracing::info!(key = %key.key, scope = %key.scope, "the caller left while its claim was decided; released the key it won (nothing ran)"),
                    Err(error) => tracing::warn!(key = %key.key, %error, "could not release a claim nobody runs; it frees itself when its lease expires"),
                }
            });
        }
    }
}

fn count(begun: &Begin) {
    let name = match begun {
        Begin::Run(_) => "idem_executions_total",
        Begin::Replay(_) => "idem_replays_total",
        Begin::Mismatch => "idem_mismatches_total",
        Begin::InFlight { .. } => "idem_conflicts_total",
    };
    metrics::counter!(name).increment(1);
}

/// Waits up to `step` for an announcement that the record `id` changed (or for one that may
/// have been missed: a subscriber that lagged behind); `true` if one came.
async fn wait_for_change(
    changes: &mut Option<tokio::sync::broadcast::Receiver<u64>>,
    id: u64,
    step: Duration,
) -> bool {
    use tokio::sync::broadcast::error::RecvError;
    let sleep = tokio::time::sleep(step);
    let Some(receiver) = changes else {
        sleep.await;
        return false;
    };
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            () = &mut sleep => return false,
            received = receiver.recv() => match received {
                Ok(changed) if changed != id => {}
                Ok(_) | Err(RecvError::Lagged(_)) => return true,
                Err(RecvError::Closed) => {
                    *changes = None;
                    return false;
                }
            },
        }
    }
}

/// Whole seconds until the lease ends, at least 1: what a `Retry-After` header says.
fn retry_after(lease_expires_at: Timestamp, now: Timestamp) -> Duration {
    let left_ms = lease_expires_at.duration_since(now).as_millis() as u64;
    Duration::from_secs(left_ms.div_ceil(1000).max(1))
}

/// Times one store call and counts its failures.
async fn timed<T>(operation: &'static str, call: impl Future<Output = Result<T>>) -> Result<T> {
    let started = Instant::now();
    let result = call.await;
    metrics::histogram!("idem_store_duration_seconds", "op" => operation)
        .record(started.elapsed().as_secs_f64());
    if result.as_ref().is_err_and(|error| !matches!(error, Error::Fenced)) {
        metrics::counter!("idem_store_errors_total", "op" => operation).increment(1);
    }
    // Say which operation failed: "the store is unavailable: claim: ...".
    result.map_err(|error| match error {
        Error::Unavailable(source) => Error::unavailable(format!("{operation}: {source}")),
        other => other,
    })
}

/// Most attempts to store an outcome while the store is unavailable.
const COMPLETE_ATTEMPTS: u32 = 20;

/// Ownership of a key while its operation runs. Finish it with [`Claim::complete`],
/// [`Claim::release`] or [`Claim::abandon`]. A claim dropped unfinished (a panic, a cancelled
/// task) is not released, since its operation may have run: the key stays in flight until its
/// lease expires, and only then may a retry run again.
pub struct Claim {
    engine: Engine,
    key: RecordKey,
    token: FencingToken,
    lease_expires_at: Timestamp,
    finished: bool,
}

impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claim")
            .field("key", &self.key)
            .field("token", &self.token)
            .field("lease_expires_at", &self.lease_expires_at)
            .finish()
    }
}

impl Claim {
    pub fn key(&self) -> &RecordKey {
        &self.key
    }

    pub fn token(&self) -> FencingToken {
        self.token
    }

    pub fn lease_expires_at(&self) -> Timestamp {
        self.lease_expires_at
    }

    /// What storing this claim's outcome inside the caller's own database transaction needs
    /// (`idem_postgres::complete_in`, `idem_sqlite::complete_in`): the business writes and the
    /// stored outcome then commit together or not at all, so a crash between them cannot
    /// cause a second run. After the commit, end the claim with [`Claim::completed_elsewhere`];
    /// if the transaction rolled back, [`Claim::release`] it (nothing happened).
    pub fn completion(&self) -> Completion {
        Completion::new(&self.engine, self.key.clone(), self.token)
    }

    /// Ends a claim whose outcome the caller's own transaction stored and committed (see
    /// [`Claim::completion`]).
    pub fn completed_elsewhere(mut self) {
        self.finished = true;
    }

    /// How long the lease holds from now without another renewal.
    pub fn lease_left(&self) -> Duration {
        self.lease_expires_at.duration_since(self.engine.now())
    }

    /// Stores `payload` as the outcome to replay. Fails with [`Error::Fenced`] if the lease was
    /// lost to another owner, in which case the newer owner's record stands.
    ///
    /// An unavailable store is retried (backoff from 50 ms, doubling to 1 s, at most 20 tries)
    /// for as long as the lease holds: the operation has run, and an outcome not stored would
    /// let a retry after the lease run it again. A store back within the lease loses nothing.
    pub async fn complete(mut self, payload: Bytes) -> Result<()> {
        self.finished = true;
        let engine = &self.engine;
        let mut backoff = Duration::from_millis(50);
        for attempt in 1.. {
            let now = engine.now();
            let expires_at = now.saturating_add(engine.inner.config.ttl);
            let stored = engine.inner.store.complete(
                &self.key,
                self.token,
                payload.clone(),
                now,
                expires_at,
            );
            let mut result = timed("complete", stored).await;
            if attempt > 1 && matches!(result, Err(Error::Fenced)) {
                // An earlier attempt whose reply was lost may have committed: the record is
                // then completed with exactly this payload, and it is ours. A read that fails
                // cannot tell, so it is retried like a failed write, never taken for fenced
                // (found by idem-sim: the outcome was stored, the caller was told otherwise).
                result = match timed("read", engine.inner.store.get(&self.key)).await {
                    Ok(Some(record)) if matches!(&record.state, RecordState::Completed { payload: stored } if *stored == payload) => {
                        Ok(())
                    }
                    Ok(_) => Err(Error::Fenced),
                    Err(error) => Err(error),
                };
            }
            match result {
                Err(error)
                    if error.is_unavailable()
                        && attempt < COMPLETE_ATTEMPTS
                        && engine.now().saturating_add(backoff) < self.lease_expires_at =>
                {
                    tracing::warn!(key = %self.key.key, %error, attempt, "could not store the outcome yet; retrying within the lease");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                result => return result,
            }
        }
        unreachable!("the loop returns by its last attempt")
    }

    /// Gives the claim up without storing an outcome or releasing the key: the record stays
    /// in flight, no longer renewed, until its lease expires; then a retry runs again. For an
    /// operation whose outcome is unknown (it may have run), where running it again is
    /// acceptable only after the lease.
    pub fn abandon(mut self) {
        self.finished = true;
        tracing::info!(key = %self.key.key, scope = %self.key.scope, "claim abandoned; the key frees itself when its lease expires");
    }

    /// Gives the key up so that a retry runs again.
    pub async fn release(mut self) -> Result<()> {
        self.finished = true;
        timed("release", self.engine.inner.store.release(&self.key, self.token)).await
    }

    /// Extends the lease by a full lease from now.
    pub async fn renew(&mut self) -> Result<()> {
        self.lease_expires_at =
            renew_lease(self.engine.clone(), self.key.clone(), self.token).await?;
        Ok(())
    }

    /// Drives `work` to completion, renewing the lease every third of it so that a slow
    /// operation is not mistaken for a dead one. Calls shorter than a third of the lease make
    /// no renewal round trip at all. A renewal that fails is tried again after an eighth of
    /// that period, not a whole one: a failed attempt can itself take most of a period (a
    /// paused store answers nothing until the call's bound), and waiting a whole period more
    /// would let the lease run out, and a retry of the key run again, after a store outage
    /// far shorter than the lease.
    pub async fn keep_alive<F: Future>(&mut self, work: F) -> F::Output {
        let period = self.engine.inner.config.lease / 3;
        let retry_after = period / 8;
        let mut work = std::pin::pin!(work);
        let mut renewing = true;
        // The renewal runs beside the work, never instead of it: work that holds a lock the
        // renewal waits for (a handler's transaction on the record's row) keeps going.
        let mut renewal: Option<Pin<Box<dyn Future<Output = Result<Timestamp>> + Send>>> = None;
        let tick = tokio::time::sleep(period);
        tokio::pin!(tick);
        loop {
            tokio::select! {
                output = &mut work => return output,
                () = &mut tick, if renewing && renewal.is_none() => {
                    renewal = Some(Box::pin(renew_lease(self.engine.clone(), self.key.clone(), self.token)));
                }
                renewed = async { renewal.as_mut().expect("guarded").await }, if renewal.is_some() => {
                    renewal = None;
                    let next = if renewed.is_ok() { period } else { retry_after };
                    tick.as_mut().reset(tokio::time::Instant::now() + next);
                    match renewed {
                        Ok(lease_expires_at) => self.lease_expires_at = lease_expires_at,
                        Err(Error::Fenced) => {
                            tracing::warn!(key = %self.key.key, "the record is no longer this claim's (its lease ran out and another owner took it, or the handler completed it in its own transaction); stopped renewing");
                            renewing = false;
                        }
                        Err(error) => {
                            tracing::warn!(key = %self.key.key, %error, "could not renew the lease; will try again");
                        }
                    }
                }
            }
        }
    }
}

/// Extends `token`'s lease of `key` by a full lease from now; answers the new lease end.
async fn renew_lease(engine: Engine, key: RecordKey, token: FencingToken) -> Result<Timestamp> {
    let now = engine.now();
    let lease_expires_at = now.saturating_add(engine.inner.config.lease);
    let expires_at = lease_expires_at.saturating_add(engine.inner.config.ttl);
    timed("renew", engine.inner.store.renew(&key, token, now, lease_expires_at, expires_at))
        .await?;
    Ok(lease_expires_at)
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.finished {
            // Dropped unfinished (a panic, a cancelled task): the operation may have run, so
            // the key is not released; it frees itself when its lease expires.
            tracing::warn!(
                key = %self.key.key,
                scope = %self.key.scope,
                "claim dropped before its outcome was stored; the key frees itself when its lease expires"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::{IdempotencyKey, ManualClock, MemoryStore, Scope, Store};

    fn key(name: &str) -> RecordKey {
        RecordKey::new(Scope::named("test"), IdempotencyKey::new(name).unwrap())
    }

    fn fp(body: &str) -> Fingerprint {
        Fingerprint::builder().part(body.as_bytes()).finish()
    }

    fn engine(clock: &ManualClock) -> Engine {
        Engine::new(
            MemoryStore::new(),
            clock.clone(),
            EngineConfig { lease: Duration::from_secs(30), ttl: Duration::from_secs(3600) },
        )
    }

    #[tokio::test]
    async fn runs_once_and_replays_and_releases_on_failure() {
        let clock = ManualClock::new(1_000_000);
        let engine = engine(&clock);
        let runs = AtomicUsize::new(0);
        let op = |result: Result<&'static str, &'static str>| {
            runs.fetch_add(1, Ordering::SeqCst);
            async move { result.map(Bytes::from) }
        };

        let failed = engine.run(&key("k"), fp("a"), || op(Err("card declined"))).await.unwrap();
        assert!(matches!(failed, Outcome::Failed("card declined")));
        // The failure released the key: the retry runs.
        let ran = engine.run(&key("k"), fp("a"), || op(Ok("charged"))).await.unwrap();
        assert!(matches!(ran, Outcome::Executed(ref b) if b == "charged"));
        let replay = engine.run(&key("k"), fp("a"), || op(Ok("again"))).await.unwrap();
        assert!(matches!(replay, Outcome::Replayed(ref b) if b == "charged"));
        let mismatch = engine.run(&key("k"), fp("b"), || op(Ok("other"))).await.unwrap();
        assert!(matches!(mismatch, Outcome::Mismatch));
        assert_eq!(runs.load(Ordering::SeqCst), 2);

        // After the TTL the key behaves as new.
        clock.advance(Duration::from_secs(3601));
        let fresh = engine.run(&key("k"), fp("b"), || op(Ok("new"))).await.unwrap();
        assert!(matches!(fresh, Outcome::Executed(ref b) if b == "new"));
        assert_eq!(runs.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn retry_after_counts_whole_seconds_left_on_the_lease() {
        let clock = ManualClock::new(1_000_000);
        let engine = engine(&clock);
        let Begin::Run(claim) = engine.begin(key("k"), fp("a")).await.unwrap() else {
            panic!("first begin must run");
        };
        let in_flight = |engine: Engine| async move {
            match engine.begin(key("k"), fp("a")).await.unwrap() {
                Begin::InFlight { retry_after } => retry_after,
                other => panic!("expected in flight, got {other:?}"),
            }
        };
        assert_eq!(in_flight(engine.clone()).await, Duration::from_secs(30));
        clock.advance(Duration::from_millis(29_500));
        assert_eq!(in_flight(engine.clone()).await, Duration::from_secs(1));
        clock.advance(Duration::from_millis(499));
        assert_eq!(in_flight(engine.clone()).await, Duration::from_secs(1));
        claim.complete(Bytes::from_static(b"done")).await.unwrap();
        assert!(matches!(engine.begin(key("k"), fp("a")).await.unwrap(), Begin::Replay(_)));
    }

    #[tokio::test]
    async fn a_stale_owner_cannot_overwrite_the_newer_record() {
        let clock = ManualClock::new(1_000_000);
        let engine = engine(&clock);
        let Begin::Run(stale) = engine.begin(key("k"), fp("a")).await.unwrap() else {
            panic!("first begin must run");
        };
        clock.advance(Duration::from_secs(31));
        let Begin::Run(fresh) = engine.begin(key("k"), fp("a")).await.unwrap() else {
            panic!("an expired lease must be taken over");
        };
        assert_ne!(stale.token(), fresh.token());
        assert!(matches!(stale.complete(Bytes::from_static(b"stale")).await, Err(Error::Fenced)));
        fresh.complete(Bytes::from_static(b"fresh")).await.unwrap();
        let Begin::Replay(payload) = engine.begin(key("k"), fp("a")).await.unwrap() else {
            panic!("completed record must replay");
        };
        assert_eq!(payload, "fresh");
    }

    /// Found by idem-sim (seed 14): the first attempt to store the outcome landed but its reply
    /// was lost, the retry was fenced (the record is completed already), and the read that
    /// checks whose outcome it is failed. The outcome is ours: `complete` must say so (after
    /// reading again), never `Fenced`.
    #[tokio::test(start_paused = true)]
    async fn a_lost_completion_reply_and_a_failed_read_are_not_taken_for_fenced() {
        let store = Stalling::new(true);
        let engine = engine_on(&store);
        let Begin::Run(claim) = engine.begin(key("k"), fp("a")).await.unwrap() else {
            panic!("first begin must run");
        };
        store.lose_complete_replies.store(1, Ordering::SeqCst);
        store.fail_reads.store(1, Ordering::SeqCst);
        let completed = claim.complete(Bytes::from_static(b"ours")).await;
        assert!(completed.is_ok(), "{completed:?}");
        assert_eq!(store.fail_reads.load(Ordering::SeqCst), 0, "the failed read happened");
        let Begin::Replay(payload) = engine.begin(key("k"), fp("a")).await.unwrap() else {
            panic!("the completed record must replay");
        };
        assert_eq!(payload, "ours");
    }

    #[tokio::test(start_paused = true)]
    async fn keep_alive_renews_a_slow_operation_every_third_of_the_lease() {
        let clock = ManualClock::new(1_000_000);
        let engine = engine(&clock);
        let Begin::Run(mut claim) = engine.begin(key("k"), fp("a")).await.unwrap() else {
            panic!("first begin must run");
        };
        let first_lease = claim.lease_expires_at();
        // Move the record's clock with tokio's paused clock, so renewals see time pass.
        let work = async {
            for _ in 0..9 {
                tokio::time::sleep(Duration::from_secs(10)).await;
                clock.advance(Duration::from_secs(10));
            }
            "slow result"
        };
        assert_eq!(claim.keep_alive(work).await, "slow result");
        // 90 s of work against a 30 s lease: the lease was pushed past the work's end.
        assert!(claim.lease_expires_at() > first_lease.saturating_add(Duration::from_secs(60)));
        match engine.begin(key("k"), fp("a")).await.unwrap() {
            Begin::InFlight { .. } => {}
            other => panic!("a renewed claim must still be in flight, got {other:?}"),
        }
        claim.complete(Bytes::from_static(b"ok")).await.unwrap();
    }

    /// Found by idem-chaos on Redis: a renewal that hung on a paused store until its call's
    /// bound, then failed, was tried again only a whole period later, after the lease had
    /// run out; a retry of the key in between ran it a second time.
    #[tokio::test(start_paused = true)]
    async fn a_failed_renewal_is_tried_again_well_before_the_lease_ends() {
        let store = Stalling::new(true);
        store.stall_renewals.store(1, Ordering::SeqCst);
        let clock = ManualClock::new(1_000_000);
        let engine = Engine::from_shared(
            Arc::clone(&store) as Arc<dyn Store>,
            Arc::new(clock.clone()),
            EngineConfig { lease: Duration::from_secs(30), ttl: Duration::from_secs(3600) },
        );
        let Begin::Run(mut claim) = engine.begin(key("k"), fp("a")).await.unwrap() else {
            panic!("first begin must run");
        };
        // 45 s of work against a 30 s lease; the first renewal (at 10 s) hangs until 22 s and
        // fails. A retry of the key arrives at 31 s.
        let work = async {
            let mut retried = None;
            for second in 1..=45 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                clock.advance(Duration::from_secs(1));
                if second == 31 {
                    retried = Some(engine.begin(key("k"), fp("a")).await.unwrap());
                }
            }
            retried
        };
        let retried = claim.keep_alive(work).await;
        assert!(
            matches!(retried, Some(Begin::InFlight { .. })),
            "the retry at 31 s must find the key in flight, not run it: {retried:?}"
        );
        assert_eq!(store.stall_renewals.load(Ordering::SeqCst), 0, "the renewal did hang");
        claim.complete(Bytes::from_static(b"once")).await.unwrap();
    }

    #[tokio::test]
    async fn sweeping_deletes_expired_records_in_bounded_batches() {
        let clock = ManualClock::new(1_000_000);
        let engine = engine(&clock);
        for i in 0..25 {
            let name = format!("old-{i}");
            let outcome = engine
                .run(&key(&name), fp("a"), || async { Ok::<_, ()>(Bytes::from_static(b"x")) })
                .await
                .unwrap();
            assert!(matches!(outcome, Outcome::Executed(_)));
        }
        clock.advance(Duration::from_secs(3601));
        engine.run(&key("live"), fp("a"), || async { Ok::<_, ()>(Bytes::new()) }).await.unwrap();
        // Two batches of 10 at most: 20 deleted, 5 left for the next sweep.
        assert_eq!(engine.sweep_expired(10, 2).await.unwrap(), 20);
        assert_eq!(engine.sweep_expired(10, 100).await.unwrap(), 5);
        assert_eq!(engine.sweep_expired(10, 100).await.unwrap(), 0);
        assert!(engine.store().get(&key("live")).await.unwrap().is_some());
        assert!(engine.store().get(&key("old-0")).await.unwrap().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn completion_rides_out_a_brief_store_outage_within_the_lease() {
        let store = Stalling::new(true);
        store.fail_completes.store(3, Ordering::SeqCst);
        let engine = engine_on(&store);
        let Begin::Run(claim) = engine.begin(key("k"), fp("a")).await.unwrap() else {
            panic!("first begin must run");
        };
        claim.complete(Bytes::from_static(b"paid")).await.unwrap();
        let Begin::Replay(payload) = engine.begin(key("k"), fp("a")).await.unwrap() else {
            panic!("the outcome was stored after the outage");
        };
        assert_eq!(payload, "paid");

        // An outage that outlasts the attempts: the error comes back, nothing is pretended.
        store.fail_completes.store(1_000, Ordering::SeqCst);
        let Begin::Run(claim) = engine.begin(key("k2"), fp("a")).await.unwrap() else {
            panic!("first begin must run");
        };
        let failed = claim.complete(Bytes::from_static(b"paid")).await;
        assert!(matches!(failed, Err(ref error) if error.is_unavailable()), "{failed:?}");
    }

    #[tokio::test]
    async fn a_dropped_claim_holds_its_key_until_the_lease_expires() {
        let clock = ManualClock::new(1_000_000);
        let engine = engine(&clock);
        let Begin::Run(claim) = engine.begin(key("k"), fp("a")).await.unwrap() else {
            panic!("first begin must run");
        };
        // Its operation may have run: a retry must not run it again before the lease ends.
        drop(claim);
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert!(matches!(engine.begin(key("k"), fp("a")).await.unwrap(), Begin::InFlight { .. }));
        clock.advance(Duration::from_secs(31));
        assert!(matches!(engine.begin(key("k"), fp("a")).await.unwrap(), Begin::Run(_)));
    }

    /// A memory store whose claims wait for a permit (a paused store), whose claims and
    /// completions can be told to report failure after they did their work (a reply lost), and
    /// whose completions can be told to fail before doing it (an outage).
    struct Stalling {
        inner: Arc<MemoryStore>,
        gate: tokio::sync::Semaphore,
        lose_claim_replies: std::sync::atomic::AtomicBool,
        lose_complete_replies: AtomicUsize,
        fail_completes: AtomicUsize,
        /// Reads that fail before reaching the store.
        fail_reads: AtomicUsize,
        /// Renewals that hang 12 s (a paused store, until the call's bound) and then fail.
        stall_renewals: AtomicUsize,
        claims_done: AtomicUsize,
        /// The server's clock, this far ahead of the system clock; `None`: no clock.
        clock_ahead_ms: Option<u64>,
    }

    impl Stalling {
        fn new(open: bool) -> Arc<Self> {
            Arc::new(Self {
                inner: Arc::new(MemoryStore::new()),
                gate: tokio::sync::Semaphore::new(if open { 1_000 } else { 0 }),
                lose_claim_replies: false.into(),
                lose_complete_replies: AtomicUsize::new(0),
                fail_completes: AtomicUsize::new(0),
                fail_reads: AtomicUsize::new(0),
                stall_renewals: AtomicUsize::new(0),
                claims_done: AtomicUsize::new(0),
                clock_ahead_ms: None,
            })
        }
    }

    #[async_trait::async_trait]
    impl Store for Stalling {
        async fn claim(&self, request: crate::ClaimRequest<'_>) -> Result<crate::Decision> {
            self.gate.acquire().await.unwrap().forget();
            let decision = self.inner.claim(request).await?;
            self.claims_done.fetch_add(1, Ordering::SeqCst);
            if self.lose_claim_replies.load(Ordering::SeqCst) {
                return Err(Error::unavailable("timed out (but the claim was carried out)"));
            }
            Ok(decision)
        }
        async fn complete(
            &self,
            key: &RecordKey,
            token: FencingToken,
            payload: Bytes,
            now: Timestamp,
            expires_at: Timestamp,
        ) -> Result<()> {
            if self.fail_completes.load(Ordering::SeqCst) > 0 {
                self.fail_completes.fetch_sub(1, Ordering::SeqCst);
                return Err(Error::unavailable("connection refused"));
            }
            self.inner.complete(key, token, payload, now, expires_at).await?;
            if self.lose_complete_replies.load(Ordering::SeqCst) > 0 {
                self.lose_complete_replies.fetch_sub(1, Ordering::SeqCst);
                return Err(Error::unavailable("reply lost (but the completion committed)"));
            }
            Ok(())
        }
        async fn release(&self, key: &RecordKey, token: FencingToken) -> Result<()> {
            self.inner.release(key, token).await
        }
        async fn renew(
            &self,
            key: &RecordKey,
            token: FencingToken,
            now: Timestamp,
            lease: Timestamp,
            expires_at: Timestamp,
        ) -> Result<()> {
            if self.stall_renewals.load(Ordering::SeqCst) > 0 {
                self.stall_renewals.fetch_sub(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(12)).await;
                return Err(Error::unavailable("timed out"));
            }
            self.inner.renew(key, token, now, lease, expires_at).await
        }
        async fn get(&self, key: &RecordKey) -> Result<Option<crate::Record>> {
            if self.fail_reads.load(Ordering::SeqCst) > 0 {
                self.fail_reads.fetch_sub(1, Ordering::SeqCst);
                return Err(Error::unavailable("connection refused"));
            }
            self.inner.get(key).await
        }
        async fn delete(&self, key: &RecordKey) -> Result<bool> {
            self.inner.delete(key).await
        }
        async fn sweep(&self, now: Timestamp, limit: usize) -> Result<usize> {
            self.inner.sweep(now, limit).await
        }
        async fn list(&self, query: &crate::ListQuery) -> Result<Vec<crate::RecordSummary>> {
            self.inner.list(query).await
        }
        async fn ping(&self) -> Result<()> {
            Ok(())
        }
        async fn server_time(&self) -> Result<Option<Timestamp>> {
            use crate::Clock as _;
            Ok(self
                .clock_ahead_ms
                .map(|ahead| Timestamp::from_millis(crate::SystemClock.now().as_millis() + ahead)))
        }
        fn capabilities(&self) -> crate::Capabilities {
            self.inner.capabilities()
        }
        fn subscribe(&self) -> Option<tokio::sync::broadcast::Receiver<u64>> {
            self.inner.subscribe()
        }
    }

    fn engine_on(store: &Arc<Stalling>) -> Engine {
        Engine::from_shared(
            Arc::clone(store) as Arc<dyn Store>,
            Arc::new(crate::SystemClock),
            EngineConfig { lease: Duration::from_secs(30), ttl: Duration::from_secs(3600) },
        )
    }

    #[tokio::test]
    async fn the_store_clock_follows_the_store_and_ignores_steps_of_the_local_clock() {
        let hour = 3_600_000;
        let mut store = Stalling::new(true);
        Arc::get_mut(&mut store).unwrap().clock_ahead_ms = Some(hour);
        let local = ManualClock::new(1_000);
        let clock = crate::StoreClock::start(Arc::clone(&store) as Arc<dyn Store>, local.clone())
            .await
            .unwrap();
        assert!(clock.follows_store());
        let store_now = || crate::SystemClock.now().as_millis() + hour;
        let close = |a: u64, b: u64| a.abs_diff(b) < 200;
        assert!(close(clock.now().as_millis(), store_now()), "the store's time, not the local");
        // The local wall clock is stepped by a day: the store clock does not move with it.
        local.advance(Duration::from_secs(24 * 3600));
        assert!(close(clock.now().as_millis(), store_now()));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(close(clock.now().as_millis(), store_now()), "it counts on between readings");

        // A store without a clock leaves the local clock as it is.
        let plain =
            crate::StoreClock::start(Arc::new(MemoryStore::new()), local.clone()).await.unwrap();
        assert!(!plain.follows_store());
        assert_eq!(plain.now(), local.now());
    }

    #[tokio::test]
    async fn a_caller_that_leaves_while_the_store_decides_strands_no_key() {
        let store = Stalling::new(false);
        let engine = engine_on(&store);
        // The caller gives up (a client hanging up) while the store still holds the claim.
        let gave_up =
            tokio::time::timeout(Duration::from_millis(50), engine.begin(key("k"), fp("a"))).await;
        assert!(gave_up.is_err());
        // The store now carries the claim out, for nobody: it must be released at once.
        store.gate.add_permits(1_000);
        for _ in 0..200 {
            if store.claims_done.load(Ordering::SeqCst) == 1
                && store.inner.get(&key("k")).await.unwrap().is_none()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(store.claims_done.load(Ordering::SeqCst), 1, "the store carried the claim out");
        assert!(
            store.inner.get(&key("k")).await.unwrap().is_none(),
            "the won claim was left behind"
        );
        assert!(matches!(engine.begin(key("k"), fp("a")).await.unwrap(), Begin::Run(_)));
    }

    #[tokio::test]
    async fn a_caller_that_leaves_just_after_the_store_answered_strands_no_key() {
        let store = Stalling::new(true);
        let engine = engine_on(&store);
        let mut begin = Box::pin(engine.begin(key("k"), fp("a")));
        // Poll the caller once (the claim task starts), let the claim task win and hand the
        // claim over, then drop the caller without its ever taking the claim.
        tokio::select! {
            biased;
            () = tokio::task::yield_now() => {}
            _ = &mut begin => panic!("the claim cannot be decided before the task runs"),
        }
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(store.inner.get(&key("k")).await.unwrap().is_some(), "the claim was decided");
        drop(begin);
        for _ in 0..100 {
            if store.inner.get(&key("k")).await.unwrap().is_none() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(
            store.inner.get(&key("k")).await.unwrap().is_none(),
            "the won claim was left behind"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_claim_that_failed_here_but_landed_in_the_store_is_released() {
        let store = Stalling::new(true);
        store.lose_claim_replies.store(true, Ordering::SeqCst);
        let engine = engine_on(&store);
        let failed = engine.begin(key("k"), fp("a")).await;
        assert!(matches!(failed, Err(ref error) if error.is_unavailable()), "{failed:?}");
        store.lose_claim_replies.store(false, Ordering::SeqCst);
        // The claim is in the store under a token nobody holds; the cleanup releases it.
        assert!(store.inner.get(&key("k")).await.unwrap().is_some());
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(store.inner.get(&key("k")).await.unwrap().is_none(), "the orphaned claim stayed");
        assert!(matches!(engine.begin(key("k"), fp("a")).await.unwrap(), Begin::Run(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_completion_retried_after_a_lost_reply_recognises_its_own_record() {
        let store = Stalling::new(true);
        let engine = engine_on(&store);
        let Begin::Run(claim) = engine.begin(key("k"), fp("a")).await.unwrap() else {
            panic!("first begin must run");
        };
        store.lose_complete_replies.store(1, Ordering::SeqCst);
        claim.complete(Bytes::from_static(b"paid")).await.unwrap();
        let Begin::Replay(payload) = engine.begin(key("k"), fp("a")).await.unwrap() else {
            panic!("the outcome must replay");
        };
        assert_eq!(payload, "paid");
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_retry_hears_the_outcome_without_polling() {
        let store = Stalling::new(true);
        let engine = engine_on(&store);
        let Begin::Run(claim) = engine.begin(key("k"), fp("a")).await.unwrap() else {
            panic!("first begin must run");
        };
        let started = tokio::time::Instant::now();
        let waiter = tokio::spawn({
            let engine = engine.clone();
            async move { engine.begin_waiting(key("k"), fp("a"), Duration::from_secs(20)).await }
        });
        tokio::time::sleep(Duration::from_millis(1_300)).await;
        claim.complete(Bytes::from_static(b"done")).await.unwrap();
        let (Begin::Replay(payload), true) = waiter.await.unwrap().unwrap() else {
            panic!("the waiter must wait for and get the stored outcome");
        };
        assert_eq!(payload, "done");
        // Paused time moves only when every task sleeps: a poll would have cost 5 s of it.
        assert!(started.elapsed() < Duration::from_secs(2), "waited {:?}", started.elapsed());

        // A released key: the waiter runs it. A key still running after the wait: in flight.
        let Begin::Run(claim) = engine.begin(key("r"), fp("a")).await.unwrap() else {
            panic!("first begin must run");
        };
        let waiter = tokio::spawn({
            let engine = engine.clone();
            async move { engine.begin_waiting(key("r"), fp("a"), Duration::from_secs(20)).await }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        claim.release().await.unwrap();
        assert!(matches!(waiter.await.unwrap().unwrap(), (Begin::Run(_), true)));
        let Begin::Run(_running) = engine.begin(key("s"), fp("a")).await.unwrap() else {
            panic!("first begin must run");
        };
        let late = engine.begin_waiting(key("s"), fp("a"), Duration::from_secs(2)).await.unwrap();
        assert!(matches!(late, (Begin::InFlight { .. }, true)), "{late:?}");
    }
}
