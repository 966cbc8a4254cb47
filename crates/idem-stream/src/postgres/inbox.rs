//! The inbox: `idem_inbox (consumer, message_id)` with a primary key.

use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{GenericClient, Transaction};

use super::migrate_locked;
use crate::{Delivery, Result, check_consumer, check_message_id};

/// The inbox of one consumer. Consumers are independent: the same message id is a first
/// delivery for each of them.
#[derive(Debug, Clone)]
pub struct Inbox {
    consumer: String,
}

impl Inbox {
    pub fn new(consumer: impl Into<String>) -> Result<Self> {
        let consumer = consumer.into();
        check_consumer(&consumer)?;
        Ok(Self { consumer })
    }

    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// Creates the inbox table if it is missing (in the current `search_path`); safe to run
    /// from several instances at once.
    pub async fn migrate(client: &mut tokio_postgres::Client) -> Result<()> {
        migrate_locked(
            client,
            "CREATE TABLE IF NOT EXISTS idem_inbox (
                     consumer    text        NOT NULL,
                     message_id  text        NOT NULL,
                     received_at timestamptz NOT NULL DEFAULT now(),
                     PRIMARY KEY (consumer, message_id));
                 CREATE INDEX IF NOT EXISTS idem_inbox_received_at ON idem_inbox (received_at);
                 CREATE TABLE IF NOT EXISTS idem_dead_letters (
                     id         bigserial   PRIMARY KEY,
                     consumer   text        NOT NULL,
                     message_id text        NOT NULL,
                     subject    text        NOT NULL,
                     payload    bytea       NOT NULL,
                     headers    text[]      NOT NULL,
                     attempts   bigint      NOT NULL,
                     failure    text        NOT NULL,
                     buried_at  timestamptz NOT NULL DEFAULT now(),
                     UNIQUE (consumer, message_id));",
        )
        .await
    }

    /// Records `message_id` in the caller's transaction. Apply the message's effects in the
    /// same transaction only on [`Delivery::First`]; commit; then acknowledge to the broker.
    ///
    /// If another transaction is processing the same message right now, this waits for it:
    /// once it commits this is a [`Delivery::Duplicate`]; if it rolls back, a `First`.
    pub async fn record(
        &self,
        transaction: &Transaction<'_>,
        message_id: &str,
    ) -> Result<Delivery> {
        check_message_id(message_id)?;
        // One round trip: the statement goes with its parameter types, no separate prepare.
        let inserted = transaction
            .query_typed(
                "INSERT INTO idem_inbox (consumer, message_id) VALUES ($1, $2)
                 ON CONFLICT DO NOTHING RETURNING 1",
                &[(&self.consumer, Type::TEXT), (&message_id, Type::TEXT)],
            )
            .await?
            .len();
        Ok(if inserted == 1 { Delivery::First } else { Delivery::Duplicate })
    }

    /// Records `message_id` and applies `effects` in the caller's transaction, in one round trip
    /// fewer than [`Inbox::record`]: the inbox INSERT is sent, and `effects`' first statement
    /// behind it, without waiting for its answer (the driver pipelines requests polled
    /// together). PostgreSQL runs them in order, so a duplicate's INSERT fails first and
    /// aborts the transaction: every statement of `effects` then fails, and committing the
    /// transaction rolls it back. Whatever the caller does next, a duplicate applies nothing.
    ///
    /// Returns [`Applied::First`] with `effects`' output (commit when it is a success), or
    /// [`Applied::Duplicate`] (`effects`' output is dropped; roll the transaction back, then
    /// acknowledge; a top-level commit rolls back too, but a savepoint's commit fails).
    /// `effects` must act only through this transaction: anything else it does (an HTTP call,
    /// an email) would happen for a duplicate too; such handlers use [`Inbox::record`] first.
    /// Like `record`, a concurrent transaction recording the same id makes this wait for its
    /// outcome. A duplicate costs the server more than with `record` (a failed statement in
    /// its log, a rolled-back transaction, a dead row): use `apply` where duplicates are the
    /// exception, as redeliveries are.
    pub async fn apply<R>(
        &self,
        transaction: &Transaction<'_>,
        message_id: &str,
        effects: impl Future<Output = R>,
    ) -> Result<Applied<R>> {
        check_message_id(message_id)?;
        // Biased: the INSERT is polled first, so it is on the wire before `effects` sends
        // anything.
        let params: [(&(dyn ToSql + Sync), Type); 2] =
            [(&self.consumer, Type::TEXT), (&message_id, Type::TEXT)];
        let insert = "INSERT INTO idem_inbox (consumer, message_id) VALUES ($1, $2)";
        let (inserted, output) =
            tokio::join!(biased; transaction.execute_typed(insert, &params), effects);
        match inserted {
            Ok(_) => Ok(Applied::First(output)),
            // The inbox's only unique index is its key (whatever a DBA named it): a unique
            // violation on the table is this id, already recorded.
            Err(error)
                if error.code() == Some(&SqlState::UNIQUE_VIOLATION)
                    && error.as_db_error().is_some_and(|db| db.table() == Some("idem_inbox")) =>
            {
                Ok(Applied::Duplicate)
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Records a batch of message ids in the caller's transaction with one statement; returns
    /// one [`Delivery`] per id, in order. Apply the effects of the `First` ones in the same
    /// transaction; commit; then acknowledge the whole batch. An id twice in the batch (a
    /// redelivery arriving with the original) is `First` once and then `Duplicate`.
    ///
    /// Ids are inserted in sorted order, so two batches that overlap wait for each other
    /// instead of deadlocking. At most [`MAX_BATCH`] ids.
    pub async fn record_many(
        &self,
        transaction: &Transaction<'_>,
        message_ids: &[&str],
    ) -> Result<Vec<Delivery>> {
        if message_ids.len() > MAX_BATCH {
            return Err(crate::Error::InvalidMessageId(format!(
                "{} ids in one batch; at most {MAX_BATCH}",
                message_ids.len()
            )));
        }
        for id in message_ids {
            check_message_id(id)?;
        }
        let mut sorted: Vec<&str> = message_ids.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let inserted: std::collections::HashSet<String> = transaction
            .query_typed(
                "INSERT INTO idem_inbox (consumer, message_id)
                 SELECT $1, id FROM unnest($2::text[]) WITH ORDINALITY AS batch(id, n) ORDER BY n
                 ON CONFLICT DO NOTHING RETURNING message_id",
                &[(&self.consumer, Type::TEXT), (&sorted, Type::TEXT_ARRAY)],
            )
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        let mut seen = std::collections::HashSet::with_capacity(message_ids.len());
        Ok(message_ids
            .iter()
            .map(|id| {
                if inserted.contains(*id) && seen.insert(*id) {
                    Delivery::First
                } else {
                    Delivery::Duplicate
                }
            })
            .collect())
    }

    /// Deletes at most `batch` of this consumer's ids received more than `older_than` ago;
    /// returns how many. Keep `older_than` well past the broker's longest redelivery window:
    /// a message redelivered after its id is purged runs again.
    pub async fn purge(
        &self,
        client: &impl GenericClient,
        older_than: Duration,
        batch: i64,
    ) -> Result<u64> {
        let seconds = older_than.as_secs_f64();
        Ok(client
            .execute(
                "DELETE FROM idem_inbox WHERE (consumer, message_id) IN (
                     SELECT consumer, message_id FROM idem_inbox
                     WHERE consumer = $1 AND received_at < now() - make_interval(secs => $2)
                     ORDER BY received_at LIMIT $3 FOR UPDATE SKIP LOCKED)",
                &[&self.consumer, &seconds, &batch],
            )
            .await?)
    }
}

/// What [`Inbox::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a duplicate's transaction is aborted: roll it back"]
pub enum Applied<R> {
    /// The first delivery: the effects ran in the transaction; here is their output.
    First(R),
    /// Already processed by this consumer: the transaction is aborted and applies nothing.
    Duplicate,
}

/// Most ids [`Inbox::record_many`] takes at once.
pub const MAX_BATCH: usize = 10_000;
