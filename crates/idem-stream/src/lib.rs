//! Exactly-once message processing on at-least-once brokers.
//!
//! Brokers deliver every message at least once, so a consumer must expect duplicates. The
//! [inbox](postgres::Inbox) makes a handler's effects happen once per message: the message id
//! is recorded in the same database transaction as the handler's writes, a unique constraint
//! detects the duplicate, and the broker is acknowledged only after that transaction commits.
//!
//! ```no_run
//! # async fn handle(client: &mut tokio_postgres::Client, message_id: &str, amount: i64) -> Result<(), Box<dyn std::error::Error>> {
//! use idem_stream::{Delivery, postgres::Inbox};
//!
//! let inbox = Inbox::new("ledger")?;
//! let tx = client.transaction().await?;
//! if inbox.record(&tx, message_id).await? == Delivery::First {
//!     tx.execute("UPDATE balances SET cents = cents + $1 WHERE id = 1", &[&amount]).await?;
//! }
//! tx.commit().await?;
//! // Only now acknowledge the message to the broker.
//! # Ok(()) }
//! ```
//!
//! The transaction is the unit of exactly-once: if the handler fails, the process dies or the
//! connection drops before the commit, neither the id nor the effects are stored, and the
//! redelivered message runs again. Two deliveries of one message processed at once serialise
//! on the unique index: the second waits for the first transaction and then sees a duplicate
//! (or, if the first rolled back, runs).

#[cfg(feature = "conformance")]
pub mod conformance;
pub mod consume;
mod layers;
#[cfg(feature = "nats")]
pub mod nats;
pub mod outbox;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod publish;
#[cfg(feature = "rabbitmq")]
pub mod rabbitmq;
#[cfg(feature = "redis")]
pub mod redis_streams;
#[cfg(feature = "sqlite")]
pub mod sqlite;
mod trace;

/// What [`postgres::Inbox::record`] (or the SQLite one) found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The first delivery to commit: apply the message's effects in this transaction.
    First,
    /// Already processed by this consumer: apply nothing, commit (or roll back) and acknowledge.
    Duplicate,
}

/// The longest message id accepted, in bytes.
pub const MAX_MESSAGE_ID_LEN: usize = 512;
/// The longest consumer name accepted, in bytes.
pub const MAX_CONSUMER_LEN: usize = 200;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("invalid message id: {0}")]
    InvalidMessageId(String),
    #[error("invalid consumer name: {0}")]
    InvalidConsumer(String),
    #[error("invalid event: {0}")]
    InvalidEvent(String),
    #[error("{0}")]
    Config(String),
    #[error("the database connection was lost")]
    Disconnected,
    /// The database did not answer in time.
    #[error("the database did not answer within {0:?}")]
    Timeout(std::time::Duration),
    /// A broker refused or failed an operation: connecting, subscribing, fetching,
    /// acknowledging, publishing. `broker` names it (`NATS`, `RabbitMQ`, `Redis`); `context`
    /// says what was being done.
    #[error("{broker}: {context}: {source}")]
    Broker {
        broker: &'static str,
        context: String,
        #[source]
        source: BoxError,
    },
    /// An error of a user's own [`consume::Subscription`], [`consume::DeadLetter`] or
    /// [`publish::Publisher`].
    #[error(transparent)]
    Other(BoxError),
    #[cfg(feature = "postgres")]
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[cfg(feature = "postgres")]
    #[error("PostgreSQL pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[cfg(feature = "sqlite")]
    #[error("SQLite: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The cause of a [`Error::Broker`]: the broker client's own error, or a sentence.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

impl Error {
    /// A broker error: `broker` failed while doing `context`, because of `source`.
    pub fn broker(
        broker: &'static str,
        context: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        Self::Broker { broker, context: context.into(), source: source.into() }
    }

    /// An error of a user's own subscription, dead-letter destination or publisher.
    pub fn other(source: impl Into<BoxError>) -> Self {
        Self::Other(source.into())
    }

    /// For `map_err`: the broker error `broker` gives while doing `context`.
    pub(crate) fn from_broker<E: Into<BoxError>>(
        broker: &'static str,
        context: impl Into<String>,
    ) -> impl FnOnce(E) -> Self {
        let context = context.into();
        move |source| Self::broker(broker, context, source)
    }

    /// Whether the error says the database is unavailable for now (connection lost or refused,
    /// the server shutting down, starting, out of resources, read-only, or asking for the
    /// transaction to be tried again), rather than that this operation is wrong: a consumer
    /// retries such a message without counting it as a failed attempt
    /// ([`consume::Failure::Unavailable`]).
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Disconnected | Self::Timeout(_) => true,
            #[cfg(feature = "postgres")]
            Self::Postgres(error) => postgres_unavailable(error),
            #[cfg(feature = "postgres")]
            Self::Pool(error) => match error {
                deadpool_postgres::PoolError::Backend(error) => postgres_unavailable(error),
                // No connection in time, or the pool is closed: the database (or the way to
                // it) is busy or gone for now. The rest are the pool's set-up: not a passing
                // state.
                deadpool_postgres::PoolError::Timeout(_) | deadpool_postgres::PoolError::Closed => {
                    true
                }
                _ => false,
            },
            #[cfg(feature = "sqlite")]
            Self::Sqlite(error) => matches!(
                error.sqlite_error_code(),
                Some(
                    rusqlite::ErrorCode::DatabaseBusy
                        | rusqlite::ErrorCode::DatabaseLocked
                        | rusqlite::ErrorCode::DiskFull
                        | rusqlite::ErrorCode::SystemIoFailure
                        | rusqlite::ErrorCode::CannotOpen
                        | rusqlite::ErrorCode::ReadOnly
                )
            ),
            _ => false,
        }
    }
}

#[cfg(feature = "postgres")]
fn postgres_unavailable(error: &tokio_postgres::Error) -> bool {
    if error.is_closed() {
        return true;
    }
    match error.code() {
        // Connection exception, insufficient resources, operator intervention (shutdown,
        // crash, cannot connect now), a read-only transaction (a standby), and serialization
        // failures and deadlocks (try the transaction again).
        Some(code) => {
            let code = code.code();
            ["08", "53", "57P"].iter().any(|class| code.starts_with(class))
                || ["25006", "40001", "40P01"].contains(&code)
        }
        // No server error: unavailable if the cause was I/O (refused, reset, timed out).
        None => std::iter::successors(std::error::Error::source(error), |cause| cause.source())
            .any(|cause| cause.is::<std::io::Error>()),
    }
}

/// The one message-id rule every adapter follows: a message's id is the one its producer gave
/// (the relay's `idem-outbox-N`; JetStream's `Nats-Msg-Id`, RabbitMQ's `message-id`, the
/// Redis entry's `id` field), else one derived from its content: `<prefix><sha256 hex>` of its
/// subject, headers and payload, each part prefixed by its length. A producer that retries
/// without setting an id is then deduplicated by the inbox like any redelivery, and identical
/// messages count as one.
#[doc(hidden)]
pub fn content_id(
    prefix: &str,
    subject: &str,
    headers: &[(String, String)],
    payload: &[u8],
) -> String {
    use sha2::{Digest, Sha256};
    use std::fmt::Write as _;
    let mut hasher = Sha256::new();
    let mut part = |bytes: &[u8]| {
        hasher.update((bytes.len() as u64).to_be_bytes());
        hasher.update(bytes);
    };
    part(subject.as_bytes());
    // In a fixed order: NATS and Redis hand headers over from hash maps, whose order differs
    // from one process to the next, so the same message must not hash differently after a
    // consumer restarts (found by fuzzing).
    let mut sorted: Vec<&(String, String)> = headers.iter().collect();
    sorted.sort();
    for (name, value) in sorted {
        part(name.as_bytes());
        part(value.as_bytes());
    }
    part(payload);
    let mut id = String::with_capacity(prefix.len() + 64);
    id.push_str(prefix);
    for byte in hasher.finalize() {
        let _ = write!(id, "{byte:02x}");
    }
    id
}

fn check_consumer(consumer: &str) -> Result<()> {
    if consumer.is_empty() || consumer.len() > MAX_CONSUMER_LEN {
        return Err(Error::InvalidConsumer(format!(
            "{} bytes; a consumer name is 1 to {MAX_CONSUMER_LEN} bytes",
            consumer.len()
        )));
    }
    Ok(())
}

fn check_message_id(message_id: &str) -> Result<()> {
    if message_id.is_empty() || message_id.len() > MAX_MESSAGE_ID_LEN {
        return Err(Error::InvalidMessageId(format!(
            "{} bytes; a message id is 1 to {MAX_MESSAGE_ID_LEN} bytes",
            message_id.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// Found by fuzzing: NATS and Redis give a message's headers in hash-map order, which
    /// changes between processes; the content id must not.
    #[test]
    fn a_content_id_does_not_depend_on_header_order() {
        let headers = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())).collect()
        };
        let one = super::content_id("p-", "s", &headers(&[("a", "1"), ("b", "2")]), b"x");
        let other = super::content_id("p-", "s", &headers(&[("b", "2"), ("a", "1")]), b"x");
        assert_eq!(one, other);
        // Still the content: a different value is a different message.
        let changed = super::content_id("p-", "s", &headers(&[("a", "1"), ("b", "3")]), b"x");
        assert_ne!(one, changed);
    }
}
