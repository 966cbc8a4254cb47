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
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::{
    ClaimRequest, Clock, Decision, Error, FencingToken, Fingerprint, RecordKey, Result, Store,
    Timestamp,
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
}

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
        Self { inner: Arc::new(EngineInner { store, clock, config }) }
    }

    pub fn config(&self) -> EngineConfig {
        self.inner.config
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    pub fn now(&self) -> Timestamp {
        self.inner.clock.now()
    }

    /// Claims `key` for a request with `fingerprint`, or says why the caller must not run.
    pub async fn begin(&self, key: RecordKey, fingerprint: Fingerprint) -> Result<Begin> {
        let now = self.now();
        let token = FencingToken::generate();
        let lease_expires_at = now.saturating_add(self.inner.config.lease);
        let request = ClaimRequest {
            key: &key,
            fingerprint: &fingerprint,
            token,
            now,
            lease_expires_at,
            expires_at: lease_expires_at.saturating_add(self.inner.config.ttl),
        };
        let decision = timed("claim", self.inner.store.claim(request)).await?;
        Ok(match decision {
            Decision::Acquire => {
                metrics::counter!("idem_executions_total").increment(1);
                Begin::Run(Claim {
                    engine: self.clone(),
                    key,
                    token,
                    lease_expires_at,
                    finished: false,
                })
            }
            Decision::Replay(payload) => {
                metrics::counter!("idem_replays_total").increment(1);
                Begin::Replay(payload)
            }
            Decision::Mismatch => {
                metrics::counter!("idem_mismatches_total").increment(1);
                Begin::Mismatch
            }
            Decision::InFlight { lease_expires_at } => {
                metrics::counter!("idem_conflicts_total").increment(1);
                Begin::InFlight { retry_after: retry_after(lease_expires_at, now) }
            }
        })
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
    result
}

/// Most attempts to store an outcome while the store is unavailable.
const COMPLETE_ATTEMPTS: u32 = 20;

/// Ownership of a key while its operation runs. Finish it with [`Claim::complete`] or
/// [`Claim::release`]; a claim dropped unfinished (a panic, a cancelled task) is released in
/// the background so a retry can run.
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
            match timed("complete", stored).await {
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

    /// Gives the key up so that a retry runs again.
    pub async fn release(mut self) -> Result<()> {
        self.finished = true;
        timed("release", self.engine.inner.store.release(&self.key, self.token)).await
    }

    /// Extends the lease by a full lease from now.
    pub async fn renew(&mut self) -> Result<()> {
        let engine = &self.engine;
        let now = engine.now();
        let lease_expires_at = now.saturating_add(engine.inner.config.lease);
        let expires_at = lease_expires_at.saturating_add(engine.inner.config.ttl);
        timed(
            "renew",
            engine.inner.store.renew(&self.key, self.token, now, lease_expires_at, expires_at),
        )
        .await?;
        self.lease_expires_at = lease_expires_at;
        Ok(())
    }

    /// Drives `work` to completion, renewing the lease every third of it so that a slow
    /// operation is not mistaken for a dead one. Calls shorter than a third of the lease make
    /// no renewal round trip at all.
    pub async fn keep_alive<F: Future>(&mut self, work: F) -> F::Output {
        let period = self.engine.inner.config.lease / 3;
        let mut work = std::pin::pin!(work);
        let mut renewing = true;
        loop {
            let tick = tokio::time::sleep(period);
            tokio::select! {
                output = &mut work => return output,
                () = tick, if renewing => match self.renew().await {
                    Ok(()) => {}
                    Err(Error::Fenced) => {
                        tracing::warn!(key = %self.key.key, "lease lost to another owner while running; its outcome will not be stored");
                        renewing = false;
                    }
                    Err(error) => {
                        tracing::warn!(key = %self.key.key, %error, "could not renew the lease; will try again");
                    }
                },
            }
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let store = Arc::clone(&self.engine.inner.store);
        let key = self.key.clone();
        let token = self.token;
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    if let Err(error) = store.release(&key, token).await {
                        tracing::warn!(key = %key.key, %error, "could not release an abandoned claim; it frees itself when its lease expires");
                    }
                });
            }
            Err(_) => tracing::warn!(
                key = %key.key,
                "claim dropped outside a runtime; it frees itself when its lease expires"
            ),
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

    /// A store whose first `failures` completions find it unavailable.
    struct Flaky {
        inner: MemoryStore,
        failures: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl Store for Flaky {
        async fn claim(&self, request: crate::ClaimRequest<'_>) -> Result<crate::Decision> {
            self.inner.claim(request).await
        }
        async fn complete(
            &self,
            key: &RecordKey,
            token: FencingToken,
            payload: Bytes,
            now: Timestamp,
            expires_at: Timestamp,
        ) -> Result<()> {
            let left = self.failures.load(Ordering::SeqCst);
            if left > 0 {
                self.failures.store(left - 1, Ordering::SeqCst);
                return Err(Error::unavailable("connection refused"));
            }
            self.inner.complete(key, token, payload, now, expires_at).await
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
            self.inner.renew(key, token, now, lease, expires_at).await
        }
        async fn get(&self, key: &RecordKey) -> Result<Option<crate::Record>> {
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
        fn capabilities(&self) -> crate::Capabilities {
            self.inner.capabilities()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn completion_rides_out_a_brief_store_outage_within_the_lease() {
        let engine = Engine::new(
            Flaky { inner: MemoryStore::new(), failures: AtomicUsize::new(3) },
            crate::SystemClock,
            EngineConfig { lease: Duration::from_secs(30), ttl: Duration::from_secs(3600) },
        );
        let Begin::Run(claim) = engine.begin(key("k"), fp("a")).await.unwrap() else {
            panic!("first begin must run");
        };
        claim.complete(Bytes::from_static(b"paid")).await.unwrap();
        let Begin::Replay(payload) = engine.begin(key("k"), fp("a")).await.unwrap() else {
            panic!("the outcome was stored after the outage");
        };
        assert_eq!(payload, "paid");

        // An outage that outlasts the attempts: the error comes back, nothing is pretended.
        let engine = Engine::new(
            Flaky { inner: MemoryStore::new(), failures: AtomicUsize::new(1_000) },
            crate::SystemClock,
            EngineConfig { lease: Duration::from_secs(30), ttl: Duration::from_secs(3600) },
        );
        let Begin::Run(claim) = engine.begin(key("k"), fp("a")).await.unwrap() else {
            panic!("first begin must run");
        };
        let failed = claim.complete(Bytes::from_static(b"paid")).await;
        assert!(matches!(failed, Err(ref error) if error.is_unavailable()), "{failed:?}");
    }

    #[tokio::test]
    async fn a_dropped_claim_is_released() {
        let clock = ManualClock::new(1_000_000);
        let engine = engine(&clock);
        let Begin::Run(claim) = engine.begin(key("k"), fp("a")).await.unwrap() else {
            panic!("first begin must run");
        };
        drop(claim);
        // The release runs on the runtime; give it a turn.
        for _ in 0..100 {
            if engine.store().get(&key("k")).await.unwrap().is_none() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(engine.store().get(&key("k")).await.unwrap().is_none());
        assert!(matches!(engine.begin(key("k"), fp("a")).await.unwrap(), Begin::Run(_)));
    }
}
