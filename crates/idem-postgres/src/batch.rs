//! Group commit: claims and completions from concurrent requests share statements, and so
//! transactions and WAL flushes.
//!
//! Each kind has a bounded queue and a few writers. A writer takes what is waiting (up to
//! [`MAX_BATCH`] operations) and runs it as one statement over arrays, which PostgreSQL
//! commits once. Nothing waits on purpose: while one batch is on its way, the next gathers,
//! so batches grow with the load and a lone request goes at once. A second job on a key
//! already in the batch, or a payload too large for it, is sent on its own at once; so is
//! every job of a batch the database refuses. A job whose caller gave up (its operation
//! timeout) is dropped before its statement is sent, never run late.
//!
//! Per key, the statements keep the single-key ones' conditions:
//! - a batched claim inserts only keys with no row it can see (so it never waits on the row
//!   lock of a record being completed or renewed), with `ON CONFLICT DO NOTHING` for a row
//!   that appears meanwhile; a key with a row is decided by `idem_core::decide` on the row as
//!   the statement read it, and a takeover (an expired record or lease) or a row that
//!   appeared goes through the single-key `idem_claim`;
//! - a batched completion changes a row only where it is in flight under the caller's token.
//!
//! Rows are locked in key order within a batch, so two batches never wait on each other in a
//! cycle.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use deadpool_postgres::Pool;
use idem_core::{Decision, Error, Fingerprint, RecordKey, Result, Timestamp, decide};
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::{CHANGES_CHANNEL, read_record, to_sql, token_to_sql, unavailable};

/// The most operations one statement carries.
pub(crate) const MAX_BATCH: usize = 256;
/// The most payload bytes one completion statement carries (a larger payload goes alone).
const MAX_BATCH_BYTES: usize = 4 << 20;
/// Operations waiting for a writer, per kind; past it callers wait to enqueue (bounded by
/// their operation timeout).
const QUEUE: usize = 4 * MAX_BATCH;

/// A claim as the batch carries it.
pub(crate) struct ClaimJob {
    pub key: RecordKey,
    pub fingerprint: Fingerprint,
    pub token: i64,
    pub now: Timestamp,
    pub lease_expires_at: Timestamp,
    pub expires_at: Timestamp,
}

/// What a batched claim came to: decided, or to be decided by the single-key claim (a
/// takeover, a row that appeared while the statement ran, or a batch the database refused).
pub(crate) enum Claimed {
    Decided(Decision),
    Single,
    /// The key's row is damaged: this claim fails, the rest of its batch goes on.
    Corrupt(Error),
}

pub(crate) struct CompleteJob {
    pub key: RecordKey,
    pub token: i64,
    pub payload: Bytes,
    pub expires_at: Timestamp,
}

/// One kind of batched operation.
pub(crate) trait Batched: Send + Sync + Sized + 'static {
    type Out: Send + 'static;
    fn key(&self) -> &RecordKey;
    fn bytes(&self) -> usize {
        0
    }
    /// The answer that sends a job on its own, with its single-key statement.
    fn alone() -> Self::Out;
    /// Runs `jobs` (distinct keys, in key order) as one statement; one result per job.
    fn run(
        client: &deadpool_postgres::Object,
        jobs: &[Self],
    ) -> impl Future<Output = Result<Vec<Self::Out>>> + Send;
}

struct Job<B: Batched> {
    op: B,
    /// When its caller stops waiting: a job past it is never sent.
    deadline: Instant,
    reply: oneshot::Sender<Result<B::Out>>,
}

impl<B: Batched> Job<B> {
    fn wanted(&self) -> bool {
        !self.reply.is_closed() && Instant::now() < self.deadline
    }
}

/// The queue of one kind of operation and its writers.
pub(crate) struct Batcher<B: Batched> {
    sender: mpsc::Sender<Job<B>>,
    op_timeout: Duration,
}

impl<B: Batched> Clone for Batcher<B> {
    fn clone(&self) -> Self {
        Self { sender: self.sender.clone(), op_timeout: self.op_timeout }
    }
}

impl<B: Batched> Batcher<B> {
    /// Starts `writers` writers on `pool`; they stop when the last `Batcher` clone is dropped.
    pub(crate) fn start(pool: Pool, writers: usize, op_timeout: Duration) -> Self {
        let (sender, receiver) = mpsc::channel(QUEUE);
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..writers.max(1) {
            tokio::spawn(write(Arc::clone(&receiver), pool.clone()));
        }
        Self { sender, op_timeout }
    }

    /// Queues `op` and waits for its batch's answer. The caller bounds the wait; the job
    /// carries the same bound, so a caller that gave up is never run.
    pub(crate) async fn submit(&self, op: B, deadline: Instant) -> Result<B::Out> {
        let (reply, answer) = oneshot::channel();
        self.sender
            .send(Job { op, deadline, reply })
            .await
            .map_err(|_| Error::unavailable("the PostgreSQL batch writers have stopped"))?;
        answer
            .await
            .map_err(|_| Error::unavailable("the PostgreSQL batch writer stopped mid-batch"))?
    }

    pub(crate) fn op_timeout(&self) -> Duration {
        self.op_timeout
    }
}

/// One writer: takes what waits, runs it as one statement, answers each caller.
async fn write<B: Batched>(receiver: Arc<Mutex<mpsc::Receiver<Job<B>>>>, pool: Pool) {
    loop {
        let mut batch: Vec<Job<B>> = Vec::new();
        let mut keys: HashSet<RecordKey> = HashSet::new();
        let mut bytes = 0;
        // A job on a key already in the batch, or too large for it, goes alone at once (in
        // its caller's task): a hot key's retries are read in parallel, as without batching.
        let mut add = |job: Job<B>, batch: &mut Vec<Job<B>>| {
            let size = job.op.bytes();
            let fits = batch.is_empty() || bytes + size <= MAX_BATCH_BYTES;
            if fits && !keys.contains(job.op.key()) {
                keys.insert(job.op.key().clone());
                bytes += size;
                batch.push(job);
            } else {
                let _ = job.reply.send(Ok(B::alone()));
            }
        };
        {
            let mut receiver = receiver.lock().await;
            match receiver.recv().await {
                Some(job) => add(job, &mut batch),
                None => return,
            }
            while batch.len() < MAX_BATCH {
                match receiver.try_recv() {
                    Ok(job) => add(job, &mut batch),
                    Err(_) => break,
                }
            }
        }
        let Some(deadline) = batch.iter().map(|job| job.deadline).max() else { continue };
        let Some(limit) = deadline.checked_duration_since(Instant::now()) else {
            continue;
        };
        let client = match idem_core::store_kit::bounded(limit, "PostgreSQL", async {
            pool.get().await.map_err(unavailable)
        })
        .await
        {
            Ok(client) => client,
            Err(error) => {
                answer_all(batch.into_iter().map(|job| job.reply).collect(), &error);
                continue;
            }
        };
        // Checked now that the statement can go: a caller that gave up meanwhile (waiting for
        // the connection included) is not run at all.
        batch.retain(Job::wanted);
        let Some(deadline) = batch.iter().map(|job| job.deadline).max() else { continue };
        // Rows are locked in this order, the same in every batch of every process.
        batch.sort_by(|a, b| {
            let (a, b) = (a.op.key(), b.op.key());
            (a.scope.as_str(), a.key.as_str()).cmp(&(b.scope.as_str(), b.key.as_str()))
        });
        let (ops, replies): (Vec<B>, Vec<_>) =
            batch.into_iter().map(|job| (job.op, job.reply)).unzip();
        let limit = deadline.saturating_duration_since(Instant::now());
        let ran = idem_core::store_kit::bounded(limit, "PostgreSQL", B::run(&client, &ops)).await;
        drop(client);
        match ran {
            Ok(results) if results.len() == replies.len() => {
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(Ok(result));
                }
            }
            Ok(results) => {
                let text = format!("a batch of {} got {} answers", replies.len(), results.len());
                answer_all(replies, &Error::Corrupt(text));
            }
            Err(error) => answer_all(replies, &error),
        }
    }
}

/// Sends `error` to every caller of a failed batch.
fn answer_all<T>(replies: Vec<oneshot::Sender<Result<T>>>, error: &Error) {
    for reply in replies {
        let _ = reply.send(Err(match error {
            Error::Corrupt(text) => Error::Corrupt(text.clone()),
            Error::Unavailable(source) => Error::unavailable(source.to_string()),
            other => Error::unavailable(other.to_string()),
        }));
    }
}

const CLAIM_MANY: &str = "
    WITH input AS (
        SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::int8[], $5::int8[],
                             $6::int8[], $7::int8[]) WITH ORDINALITY
            AS i(scope, key, fingerprint, token, now, lease_expires_at, expires_at, ord)
    ), inserted AS (
        INSERT INTO idem_records AS r
            (scope, key, fingerprint, state, token, lease_expires_at, payload, created_at, expires_at)
        SELECT scope, key, fingerprint, 0, token, lease_expires_at, NULL, now, expires_at
        FROM input
        WHERE NOT EXISTS (SELECT 1 FROM idem_records e
                          WHERE e.scope = input.scope AND e.key = input.key)
        ORDER BY ord
        ON CONFLICT (scope, key) DO NOTHING
        RETURNING r.scope, r.key
    )
    SELECT i.ord, n.key IS NOT NULL,
           e.fingerprint, e.state, e.token, e.lease_expires_at, e.payload, e.created_at,
           e.expires_at
    FROM input i
    LEFT JOIN inserted n ON n.scope = i.scope AND n.key = i.key
    LEFT JOIN idem_records e ON e.scope = i.scope AND e.key = i.key
    ORDER BY i.ord";

impl Batched for ClaimJob {
    type Out = Claimed;

    fn key(&self) -> &RecordKey {
        &self.key
    }

    fn alone() -> Claimed {
        Claimed::Single
    }

    async fn run(client: &deadpool_postgres::Object, jobs: &[Self]) -> Result<Vec<Claimed>> {
        let scopes: Vec<&str> = jobs.iter().map(|job| job.key.scope.as_str()).collect();
        let keys: Vec<&str> = jobs.iter().map(|job| job.key.key.as_str()).collect();
        let fingerprints: Vec<&[u8]> =
            jobs.iter().map(|job| &job.fingerprint.as_bytes()[..]).collect();
        let tokens: Vec<i64> = jobs.iter().map(|job| job.token).collect();
        let nows: Vec<i64> = jobs.iter().map(|job| to_sql(job.now)).collect();
        let leases: Vec<i64> = jobs.iter().map(|job| to_sql(job.lease_expires_at)).collect();
        let expiries: Vec<i64> = jobs.iter().map(|job| to_sql(job.expires_at)).collect();
        let statement = client.prepare_cached(CLAIM_MANY).await.map_err(unavailable)?;
        let rows = client
            .query(&statement, &[&scopes, &keys, &fingerprints, &tokens, &nows, &leases, &expiries])
            .await;
        let rows = match rows {
            Ok(rows) => rows,
            // The database refused the statement, which then changed nothing: each claim goes
            // alone, so one key's trouble stays its own, and a database that takes no writes
            // (a standby, read-only) still answers replays through the reading claim.
            Err(error) if error.as_db_error().is_some() => {
                return Ok(jobs.iter().map(|_| Claimed::Single).collect());
            }
            Err(error) => return Err(unavailable(error)),
        };
        let corrupt = |error: tokio_postgres::Error| Error::Corrupt(error.to_string());
        let mut claimed = Vec::with_capacity(jobs.len());
        for (index, row) in rows.iter().enumerate() {
            let ord: i64 = row.try_get(0).map_err(corrupt)?;
            if ord != index as i64 + 1 {
                return Err(Error::Corrupt(format!("batch answer {ord} out of place")));
            }
            let job = &jobs[index];
            if row.try_get::<_, bool>(1).map_err(corrupt)? {
                claimed.push(Claimed::Decided(Decision::Acquire));
                continue;
            }
            // Not inserted: a row was there. Decide on it as it was read; a takeover, or a row
            // the statement's snapshot could not see, goes to the single-key claim.
            if row.try_get::<_, Option<Vec<u8>>>(2).map_err(corrupt)?.is_none() {
                claimed.push(Claimed::Single);
                continue;
            }
            claimed.push(match read_record(row, 2) {
                Ok(existing) => match decide(Some(&existing), &job.fingerprint, job.now) {
                    Decision::Acquire => Claimed::Single,
                    decision => Claimed::Decided(decision),
                },
                // One damaged row fails its own claim, not the batch.
                Err(error) => Claimed::Corrupt(error),
            });
        }
        Ok(claimed)
    }
}

/// `$6` are the change ids, announced for watched rows.
fn complete_many() -> String {
    format!(
        "WITH input AS (
             SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::bytea[], $5::int8[],
                                  $6::text[]) WITH ORDINALITY
                 AS i(scope, key, token, payload, expires_at, change_id, ord)
         ), changed AS (
             UPDATE idem_records r
             SET state = 1, payload = i.payload, token = NULL, lease_expires_at = NULL,
                 expires_at = i.expires_at
             FROM input i
             WHERE r.scope = i.scope AND r.key = i.key AND r.state = 0 AND r.token = i.token
             RETURNING i.ord, r.watched, i.change_id
         )
         SELECT ord, CASE WHEN watched THEN pg_notify('{CHANGES_CHANNEL}', change_id) IS NULL END
         FROM changed"
    )
}

impl Batched for CompleteJob {
    /// Whether the caller's token owned the record (and it is now completed); `None`: to be
    /// done on its own.
    type Out = Option<bool>;

    fn key(&self) -> &RecordKey {
        &self.key
    }

    fn bytes(&self) -> usize {
        self.payload.len()
    }

    fn alone() -> Option<bool> {
        None
    }

    async fn run(client: &deadpool_postgres::Object, jobs: &[Self]) -> Result<Vec<Option<bool>>> {
        let scopes: Vec<&str> = jobs.iter().map(|job| job.key.scope.as_str()).collect();
        let keys: Vec<&str> = jobs.iter().map(|job| job.key.key.as_str()).collect();
        let tokens: Vec<i64> = jobs.iter().map(|job| job.token).collect();
        let payloads: Vec<&[u8]> = jobs.iter().map(|job| &job.payload[..]).collect();
        let expiries: Vec<i64> = jobs.iter().map(|job| to_sql(job.expires_at)).collect();
        let change_ids: Vec<String> =
            jobs.iter().map(|job| job.key.change_id().to_string()).collect();
        let statement = client.prepare_cached(&complete_many()).await.map_err(unavailable)?;
        let rows = client
            .query(&statement, &[&scopes, &keys, &tokens, &payloads, &expiries, &change_ids])
            .await;
        let rows = match rows {
            Ok(rows) => rows,
            // Refused by the database, so nothing changed: each completion goes alone.
            Err(error) if error.as_db_error().is_some() => return Ok(vec![None; jobs.len()]),
            Err(error) => return Err(unavailable(error)),
        };
        let mut owned = vec![Some(false); jobs.len()];
        for row in rows {
            let ord: i64 = row.try_get(0).map_err(|error| Error::Corrupt(error.to_string()))?;
            match owned.get_mut((ord - 1) as usize) {
                Some(slot) => *slot = Some(true),
                None => return Err(Error::Corrupt(format!("batch answer {ord} out of range"))),
            }
        }
        Ok(owned)
    }
}

pub(crate) fn claim_job(request: &idem_core::ClaimRequest<'_>) -> ClaimJob {
    ClaimJob {
        key: request.key.clone(),
        fingerprint: *request.fingerprint,
        token: token_to_sql(request.token),
        now: request.now,
        lease_expires_at: request.lease_expires_at,
        expires_at: request.expires_at,
    }
}
