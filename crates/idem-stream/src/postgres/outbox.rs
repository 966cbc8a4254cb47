//! The transactional outbox: events enqueued in the caller's transaction.

use tokio_postgres::types::Type;
use tokio_postgres::{GenericClient, Transaction};

use super::migrate_locked;
use crate::Result;
use crate::outbox::{Event, KeyState, OutboxStats, PendingEvent, PurgeReport, check_event};

/// The transactional outbox: events enqueued in the caller's transaction leave exactly when it
/// commits (a [`Relay`] publishes them), never if it rolls back.
#[derive(Debug, Clone, Copy, Default)]
pub struct Outbox;

impl Outbox {
    /// Creates the outbox tables if missing; safe to run from several instances at once.
    pub async fn migrate(client: &mut tokio_postgres::Client) -> Result<()> {
        migrate_locked(
            client,
            "CREATE TABLE IF NOT EXISTS idem_outbox_keys (
                     topic         text   NOT NULL,
                     key           text   NOT NULL,
                     enqueued_seq  bigint NOT NULL,
                     published_seq bigint NOT NULL DEFAULT 0,
                     PRIMARY KEY (topic, key));
                 CREATE TABLE IF NOT EXISTS idem_outbox (
                     id         bigserial   PRIMARY KEY,
                     topic      text        NOT NULL,
                     key        text        NOT NULL,
                     seq        bigint      NOT NULL,
                     payload    bytea       NOT NULL,
                     headers    text[]      NOT NULL,
                     created_at timestamptz NOT NULL DEFAULT now(),
                     sent_at    timestamptz,
                     UNIQUE (topic, key, seq));
                 -- Version 2: publish failures per key (backoff, parking), fair rotation,
                 -- discarded events.
                 DO $$ BEGIN
                   IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                                  WHERE table_schema = current_schema()
                                    AND table_name = 'idem_outbox_keys'
                                    AND column_name = 'parked_at') THEN
                     ALTER TABLE idem_outbox_keys
                       ADD COLUMN attempts   integer NOT NULL DEFAULT 0,
                       ADD COLUMN retry_at   timestamptz,
                       ADD COLUMN tried_at   timestamptz,
                       ADD COLUMN last_error text,
                       ADD COLUMN parked_at  timestamptz;
                     ALTER TABLE idem_outbox ADD COLUMN discarded_at timestamptz;
                     DROP INDEX IF EXISTS idem_outbox_keys_pending;
                   END IF;
                 END $$;
                 CREATE INDEX IF NOT EXISTS idem_outbox_keys_due
                     ON idem_outbox_keys (tried_at NULLS FIRST)
                     WHERE published_seq < enqueued_seq AND parked_at IS NULL;
                 CREATE INDEX IF NOT EXISTS idem_outbox_keys_parked
                     ON idem_outbox_keys (parked_at) WHERE parked_at IS NOT NULL;
                 -- Version 3: what was sent is the key's published_seq alone (sent_at is no
                 -- longer written), so this index would hold every event.
                 DROP INDEX IF EXISTS idem_outbox_unsent;",
        )
        .await
    }

    /// How much is waiting: for the relay's metrics and `idem outbox list`.
    pub async fn stats(client: &impl GenericClient) -> Result<OutboxStats> {
        let row = client
            .query_one(
                "SELECT
                   (SELECT coalesce(sum(enqueued_seq - published_seq), 0)::bigint
                      FROM idem_outbox_keys WHERE published_seq < enqueued_seq),
                   (SELECT count(*) FROM idem_outbox_keys WHERE published_seq < enqueued_seq),
                   (SELECT count(*) FROM idem_outbox_keys WHERE parked_at IS NOT NULL),
                   (SELECT extract(epoch FROM clock_timestamp() - min(head.created_at))::float8
                      FROM idem_outbox_keys k
                      CROSS JOIN LATERAL (
                          SELECT created_at FROM idem_outbox e
                          WHERE e.topic = k.topic AND e.key = k.key AND e.seq > k.published_seq
                            AND e.discarded_at IS NULL
                          ORDER BY e.seq LIMIT 1) head
                      WHERE k.published_seq < k.enqueued_seq)",
                &[],
            )
            .await?;
        Ok(OutboxStats {
            pending_events: row.get(0),
            pending_keys: row.get(1),
            parked_keys: row.get(2),
            oldest_pending: row
                .get::<_, Option<f64>>(3)
                .map(|seconds| std::time::Duration::from_secs_f64(seconds.max(0.0))),
        })
    }

    /// Keys with events waiting, parked ones first, then by how long they have waited; or
    /// only the parked ones. At most `limit`.
    pub async fn keys(
        client: &impl GenericClient,
        parked_only: bool,
        limit: i64,
    ) -> Result<Vec<KeyState>> {
        let rows = client
            .query(
                &format!(
                    "{KEY_STATE} WHERE k.published_seq < k.enqueued_seq {}
                     ORDER BY k.parked_at IS NULL, head.created_at NULLS LAST LIMIT $1",
                    if parked_only { "AND k.parked_at IS NOT NULL" } else { "" }
                ),
                &[&limit.clamp(1, 10_000)],
            )
            .await?;
        Ok(rows.iter().map(KeyState::from_row).collect())
    }

    /// One key's state and its waiting events (at most `limit`), oldest first.
    pub async fn key(
        client: &impl GenericClient,
        topic: &str,
        key: &str,
        limit: i64,
    ) -> Result<Option<(KeyState, Vec<PendingEvent>)>> {
        let Some(row) = client
            .query_opt(&format!("{KEY_STATE} WHERE k.topic = $1 AND k.key = $2"), &[&topic, &key])
            .await?
        else {
            return Ok(None);
        };
        let state = KeyState::from_row(&row);
        let events = client
            .query(
                "SELECT id, seq, extract(epoch FROM clock_timestamp() - created_at)::float8,
                        length(payload), headers
                 FROM idem_outbox
                 WHERE topic = $1 AND key = $2 AND seq > $3 AND discarded_at IS NULL
                 ORDER BY seq LIMIT $4",
                &[&topic, &key, &state.published_seq, &limit.clamp(1, 10_000)],
            )
            .await?
            .iter()
            .map(|row| {
                let flat: Vec<String> = row.get(4);
                PendingEvent {
                    id: row.get(0),
                    seq: row.get(1),
                    age: std::time::Duration::from_secs_f64(row.get::<_, f64>(2).max(0.0)),
                    payload_bytes: row.get::<_, i32>(3) as usize,
                    headers: flat
                        .chunks(2)
                        .map(|pair| (pair[0].clone(), pair.get(1).cloned().unwrap_or_default()))
                        .collect(),
                }
            })
            .collect();
        Ok(Some((state, events)))
    }

    /// Deletes events enqueued more than `older_than` ago that were sent (or discarded), in
    /// batches of at most `batch` rows walked in id order (each a short transaction of its
    /// own, so producers are never held up), pausing `pause` between batches and stopping at
    /// the first batch that reaches events newer than that, or after `max_batches`; then the
    /// key rows idle that long with no event left (a key that appears again starts its
    /// sequence afresh). Events still waiting, however old, are kept; an event that waited
    /// longer than `older_than` goes at the first purge after it is sent.
    pub async fn purge_sent(
        client: &impl GenericClient,
        older_than: std::time::Duration,
        batch: i64,
        max_batches: usize,
        pause: std::time::Duration,
    ) -> Result<PurgeReport> {
        let seconds = older_than.as_secs_f64();
        let batch = batch.clamp(1, 100_000);
        let mut report = PurgeReport::default();
        let mut from: i64 = 0;
        for _ in 0..max_batches.max(1) {
            let row = client
                .query_one(
                    "WITH span AS (
                         SELECT id, topic, key, seq, discarded_at, created_at
                         FROM idem_outbox WHERE id >= $1 ORDER BY id LIMIT $3),
                     gone AS (
                         DELETE FROM idem_outbox e
                         USING span JOIN idem_outbox_keys k
                             ON k.topic = span.topic AND k.key = span.key
                         WHERE e.id = span.id
                           AND span.created_at < clock_timestamp() - make_interval(secs => $2)
                           AND (span.seq <= k.published_seq OR span.discarded_at IS NOT NULL)
                         RETURNING e.id)
                     SELECT (SELECT count(*) FROM gone), (SELECT max(id) FROM span),
                            coalesce((SELECT bool_or(created_at >= clock_timestamp()
                                                     - make_interval(secs => $2)) FROM span),
                                     true)",
                    &[&from, &seconds, &batch],
                )
                .await?;
            report.events += row.get::<_, i64>(0) as u64;
            report.batches += 1;
            let (last, reached_recent): (Option<i64>, bool) = (row.get(1), row.get(2));
            match last {
                Some(last) if !reached_recent => from = last + 1,
                _ => break,
            }
            tokio::time::sleep(pause).await;
        }
        for _ in 0..max_batches.max(1) {
            let keys = client
                .execute(
                    "DELETE FROM idem_outbox_keys WHERE (topic, key) IN (
                         SELECT topic, key FROM idem_outbox_keys k
                         WHERE published_seq = enqueued_seq
                           AND coalesce(tried_at, '-infinity')
                               < clock_timestamp() - make_interval(secs => $1)
                           AND NOT EXISTS (SELECT 1 FROM idem_outbox e
                                           WHERE e.topic = k.topic AND e.key = k.key)
                         LIMIT $2 FOR UPDATE SKIP LOCKED)
                     AND published_seq = enqueued_seq",
                    &[&seconds, &batch],
                )
                .await?;
            report.keys += keys;
            if keys < batch as u64 {
                break;
            }
            tokio::time::sleep(pause).await;
        }
        Ok(report)
    }

    /// Puts a key back in the relay's rotation at once, its failures forgotten (after the
    /// cause, a missing stream say, is fixed). `false` if there is no such key.
    pub async fn retry(client: &impl GenericClient, topic: &str, key: &str) -> Result<bool> {
        let changed = client
            .execute(
                "UPDATE idem_outbox_keys
                 SET attempts = 0, retry_at = NULL, parked_at = NULL, last_error = NULL
                 WHERE topic = $1 AND key = $2",
                &[&topic, &key],
            )
            .await?;
        Ok(changed == 1)
    }

    /// Gives up on a key's oldest waiting event (it is kept, marked discarded, and never
    /// published) and puts the key back in rotation, so its later events flow. Returns the
    /// discarded event's id, `None` if the key has nothing waiting. Runs in one transaction,
    /// under the key's relay lock, so a relay publishing the key meanwhile is waited for.
    pub async fn discard_next(
        client: &mut tokio_postgres::Client,
        topic: &str,
        key: &str,
    ) -> Result<Option<i64>> {
        let transaction = client.transaction().await?;
        transaction
            .execute(
                "SELECT pg_advisory_xact_lock(hashtextextended($1 || chr(31) || $2, 0))",
                &[&topic, &key],
            )
            .await?;
        let discarded = transaction
            .query_opt(
                "WITH head AS (
                     SELECT e.id, e.seq FROM idem_outbox_keys k
                     JOIN idem_outbox e ON e.topic = k.topic AND e.key = k.key
                                       AND e.seq = k.published_seq + 1
                     WHERE k.topic = $1 AND k.key = $2 AND k.published_seq < k.enqueued_seq
                     FOR UPDATE OF k),
                 gone AS (
                     UPDATE idem_outbox SET discarded_at = clock_timestamp()
                     FROM head WHERE idem_outbox.id = head.id RETURNING head.id, head.seq)
                 UPDATE idem_outbox_keys k
                 SET published_seq = gone.seq, attempts = 0, retry_at = NULL, parked_at = NULL,
                     last_error = NULL
                 FROM gone WHERE k.topic = $1 AND k.key = $2
                 RETURNING gone.id",
                &[&topic, &key],
            )
            .await?
            .map(|row| row.get(0));
        transaction.commit().await?;
        Ok(discarded)
    }

    /// Enqueues `event` in the caller's transaction and returns its id. One round trip.
    ///
    /// The event's key row is updated in the same statement, so two transactions enqueueing
    /// for one key serialise on it: sequence numbers follow commit order, and a rolled-back
    /// transaction leaves no gap.
    pub async fn enqueue(transaction: &Transaction<'_>, event: Event<'_>) -> Result<i64> {
        check_event(&event)?;
        // Ends when this returns: it spans the insert, and the event carries its context.
        let span = crate::trace::producer_span(&event);
        let context = crate::trace::context_for(&span, &event);
        let headers = crate::trace::flat_headers(&event, &context);
        let row = transaction
            .query_typed(
                "WITH k AS (
                     INSERT INTO idem_outbox_keys AS k (topic, key, enqueued_seq) VALUES ($1, $2, 1)
                     ON CONFLICT (topic, key) DO UPDATE SET enqueued_seq = k.enqueued_seq + 1
                     RETURNING enqueued_seq),
                 wake AS (SELECT pg_notify('idem_outbox', ''))
                 INSERT INTO idem_outbox (topic, key, seq, payload, headers)
                 SELECT $1, $2, k.enqueued_seq, $3, $4 FROM k, wake
                 RETURNING id",
                &[
                    (&event.topic, Type::TEXT),
                    (&event.key, Type::TEXT),
                    (&event.payload, Type::BYTEA),
                    (&headers, Type::TEXT_ARRAY),
                ],
            )
            .await?;
        Ok(row.first().map(|row| row.get(0)).expect("INSERT ... RETURNING gives one row"))
    }
}

const KEY_STATE: &str = "SELECT k.topic, k.key, k.enqueued_seq, k.published_seq, k.attempts,
        k.last_error,
        extract(epoch FROM k.retry_at - clock_timestamp())::float8,
        extract(epoch FROM clock_timestamp() - k.parked_at)::float8,
        head.id, extract(epoch FROM clock_timestamp() - head.created_at)::float8
    FROM idem_outbox_keys k
    LEFT JOIN idem_outbox head
      ON head.topic = k.topic AND head.key = k.key AND head.seq = k.published_seq + 1";

impl KeyState {
    pub(super) fn from_row(row: &tokio_postgres::Row) -> Self {
        let seconds = |index: usize| {
            row.get::<_, Option<f64>>(index)
                .filter(|seconds| *seconds > 0.0)
                .map(std::time::Duration::from_secs_f64)
        };
        Self {
            topic: row.get(0),
            key: row.get(1),
            enqueued_seq: row.get(2),
            published_seq: row.get(3),
            attempts: row.get(4),
            last_error: row.get(5),
            retry_in: seconds(6),
            parked_for: row
                .get::<_, Option<f64>>(7)
                .map(|s| std::time::Duration::from_secs_f64(s.max(0.0))),
            next_id: row.get(8),
            next_age: seconds(9),
        }
    }
}
