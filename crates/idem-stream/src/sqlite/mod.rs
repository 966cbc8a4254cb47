//! SQLite: the inbox (`idem_inbox (consumer, message_id)` with a primary key) and the
//! transactional [outbox](Outbox) with its [relay](Relay).

mod outbox;

pub use outbox::{Outbox, Relay};

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, Transaction, params};

use crate::{Delivery, Result, check_consumer, check_message_id};

/// The inbox of one consumer; see [`crate::postgres::Inbox`] for the contract, which is the
/// same. SQLite serialises writers, so a concurrent duplicate from another connection waits for
/// the write lock (up to the connection's busy timeout) and then sees the first one's commit.
#[derive(Debug, Clone)]
pub struct Inbox {
    consumer: String,
}

fn now_millis() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_millis() as i64)
}

impl Inbox {
    pub fn new(consumer: impl Into<String>) -> Result<Self> {
        let consumer = consumer.into();
        check_consumer(&consumer)?;
        Ok(Self { consumer })
    }

    /// Creates the inbox table if it is missing.
    pub fn migrate(connection: &Connection) -> Result<()> {
        connection.execute_batch(
            "CREATE TABLE IF NOT EXISTS idem_inbox (
                 consumer       TEXT    NOT NULL,
                 message_id     TEXT    NOT NULL,
                 received_at_ms INTEGER NOT NULL,
                 PRIMARY KEY (consumer, message_id));
             CREATE INDEX IF NOT EXISTS idem_inbox_received_at ON idem_inbox (received_at_ms);",
        )?;
        Ok(())
    }

    /// Records `message_id` in the caller's transaction; see [`crate::postgres::Inbox::record`].
    pub fn record(&self, transaction: &Transaction<'_>, message_id: &str) -> Result<Delivery> {
        check_message_id(message_id)?;
        let inserted = transaction
            .prepare_cached(
                "INSERT OR IGNORE INTO idem_inbox (consumer, message_id, received_at_ms) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![self.consumer, message_id, now_millis()])?;
        Ok(if inserted == 1 { Delivery::First } else { Delivery::Duplicate })
    }

    /// Deletes at most `batch` of this consumer's ids received more than `older_than` ago.
    pub fn purge(
        &self,
        connection: &Connection,
        older_than: Duration,
        batch: i64,
    ) -> Result<usize> {
        let cutoff = now_millis() - older_than.as_millis() as i64;
        Ok(connection.execute(
            "DELETE FROM idem_inbox WHERE rowid IN (
                 SELECT rowid FROM idem_inbox WHERE consumer = ?1 AND received_at_ms < ?2
                 ORDER BY received_at_ms LIMIT ?3)",
            params![self.consumer, cutoff, batch],
        )?)
    }
}
