//! The inbox on PostgreSQL: `idem_inbox (consumer, message_id)` with a primary key.

use std::time::Duration;

use tokio_postgres::types::Type;
use tokio_postgres::{GenericClient, Transaction};

use crate::{Delivery, Result, check_consumer, check_message_id};

/// An arbitrary constant: the advisory lock that serialises creating the table.
const MIGRATION_LOCK: i64 = 0x6964_656d_696e_6278;

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
        let transaction = client.transaction().await?;
        transaction.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
        transaction
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS idem_inbox (
                     consumer    text        NOT NULL,
                     message_id  text        NOT NULL,
                     received_at timestamptz NOT NULL DEFAULT now(),
                     PRIMARY KEY (consumer, message_id));
                 CREATE INDEX IF NOT EXISTS idem_inbox_received_at ON idem_inbox (received_at);",
            )
            .await?;
        transaction.commit().await?;
        Ok(())
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
