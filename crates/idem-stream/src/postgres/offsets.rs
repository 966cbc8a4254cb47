//! The offsets mode: exactly-once by a high-water mark per partition instead of a row per
//! message. For sources with an ordered position per partition read from that position (see
//! [`crate::nats::JetStreamPartitions`]), the handler records the message's position in its own
//! transaction; a position at or below the recorded one is a duplicate. The state is one row
//! per (consumer, partition), whatever the traffic, with nothing to clean up.
//!
//! It is exactly-once only when each partition is handled in order and read again from its
//! recorded position after a restart: a later message applied before an earlier one would
//! make the earlier one look like a duplicate. The inbox has no such condition.

use std::collections::HashMap;

use tokio_postgres::{GenericClient, Transaction};

use super::migrate_locked;
use crate::{Delivery, Result, check_consumer};

/// One consumer's positions, per partition.
#[derive(Debug, Clone)]
pub struct Offsets {
    consumer: String,
}

impl Offsets {
    pub fn new(consumer: impl Into<String>) -> Result<Self> {
        let consumer = consumer.into();
        check_consumer(&consumer)?;
        Ok(Self { consumer })
    }

    /// Creates the offsets table if it is missing.
    pub async fn migrate(client: &mut tokio_postgres::Client) -> Result<()> {
        migrate_locked(
            client,
            "CREATE TABLE IF NOT EXISTS idem_offsets (
                 consumer   text        NOT NULL,
                 partition  text        NOT NULL,
                 position   bigint      NOT NULL,
                 updated_at timestamptz NOT NULL DEFAULT now(),
                 PRIMARY KEY (consumer, partition));",
        )
        .await
    }

    /// Records `position` for `partition` in the caller's transaction: [`Delivery::First`] if
    /// it is past the recorded one (apply the message's effects in this transaction), else
    /// [`Delivery::Duplicate`]. Two transactions for one partition serialise on its row: the
    /// second waits, then sees the first's position.
    pub async fn advance(
        &self,
        transaction: &Transaction<'_>,
        partition: &str,
        position: u64,
    ) -> Result<Delivery> {
        let position = i64::try_from(position).map_err(|_| {
            crate::Error::InvalidMessageId(format!("position {position} too large"))
        })?;
        // Typed parameters: one round trip, no statement to prepare.
        let advanced = transaction
            .query_typed_opt(
                "INSERT INTO idem_offsets AS o (consumer, partition, position)
                 VALUES ($1, $2, $3)
                 ON CONFLICT (consumer, partition) DO UPDATE
                     SET position = EXCLUDED.position, updated_at = now()
                     WHERE o.position < EXCLUDED.position
                 RETURNING 1",
                &[
                    (&self.consumer, tokio_postgres::types::Type::TEXT),
                    (&partition, tokio_postgres::types::Type::TEXT),
                    (&position, tokio_postgres::types::Type::INT8),
                ],
            )
            .await?;
        Ok(if advanced.is_some() { Delivery::First } else { Delivery::Duplicate })
    }

    /// Every partition's recorded position, to start reading after.
    pub async fn positions(&self, client: &impl GenericClient) -> Result<HashMap<String, u64>> {
        let rows = client
            .query(
                "SELECT partition, position FROM idem_offsets WHERE consumer = $1",
                &[&self.consumer],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| (row.get::<_, String>(0), row.get::<_, i64>(1).max(0) as u64))
            .collect())
    }
}
