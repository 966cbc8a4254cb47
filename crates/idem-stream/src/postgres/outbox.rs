//! The transactional outbox: events enqueued in the caller's transaction.

use tokio_postgres::Transaction;
use tokio_postgres::types::Type;

use super::migrate_locked;
use crate::Result;

/// Most bytes in one event's payload.
pub const MAX_PAYLOAD_BYTES: usize = 1024 * 1024;
/// Most headers on one event.
pub const MAX_HEADERS: usize = 64;

/// One event to enqueue.
#[derive(Debug, Clone, Copy)]
pub struct Event<'a> {
    /// Where it goes: the NATS subject, the RabbitMQ routing key, the stream name.
    pub topic: &'a str,
    /// Events with the same key are published in commit order.
    pub key: &'a str,
    pub payload: &'a [u8],
    /// Carried to the broker as message headers: put the trace context here.
    pub headers: &'a [(&'a str, &'a str)],
}

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
                 CREATE INDEX IF NOT EXISTS idem_outbox_keys_pending
                     ON idem_outbox_keys (topic, key) WHERE published_seq < enqueued_seq;
                 CREATE TABLE IF NOT EXISTS idem_outbox (
                     id         bigserial   PRIMARY KEY,
                     topic      text        NOT NULL,
                     key        text        NOT NULL,
                     seq        bigint      NOT NULL,
                     payload    bytea       NOT NULL,
                     headers    text[]      NOT NULL,
                     created_at timestamptz NOT NULL DEFAULT now(),
                     sent_at    timestamptz,
                     UNIQUE (topic, key, seq));",
        )
        .await
    }

    /// Enqueues `event` in the caller's transaction and returns its id. One round trip.
    ///
    /// The event's key row is updated in the same statement, so two transactions enqueueing
    /// for one key serialise on it: sequence numbers follow commit order, and a rolled-back
    /// transaction leaves no gap.
    pub async fn enqueue(transaction: &Transaction<'_>, event: Event<'_>) -> Result<i64> {
        check_event(&event)?;
        let headers: Vec<&str> =
            event.headers.iter().flat_map(|(name, value)| [*name, *value]).collect();
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

fn check_event(event: &Event<'_>) -> Result<()> {
    let name_ok = |text: &str| !text.is_empty() && text.len() <= 255;
    if !name_ok(event.topic)
        || !event.topic.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(crate::Error::InvalidEvent(format!(
            "topic {:?}: 1 to 255 of A-Z a-z 0-9 . _ -",
            event.topic
        )));
    }
    if !name_ok(event.key) {
        return Err(crate::Error::InvalidEvent("the key must be 1 to 255 bytes".into()));
    }
    if event.payload.len() > MAX_PAYLOAD_BYTES {
        return Err(crate::Error::InvalidEvent(format!(
            "payload of {} bytes; at most {MAX_PAYLOAD_BYTES}",
            event.payload.len()
        )));
    }
    if event.headers.len() > MAX_HEADERS {
        return Err(crate::Error::InvalidEvent(format!(
            "{} headers; at most {MAX_HEADERS}",
            event.headers.len()
        )));
    }
    Ok(())
}
