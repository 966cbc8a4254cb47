//! Dead letters kept in the application's database.

use crate::{Result, check_consumer};

/// A dead-letter destination in the application's database: a message that failed its last
/// attempt is kept in `idem_dead_letters` with its failure, once per message id, for a person to
/// look at (the table is created by [`Inbox::migrate`]).
///
/// It works over a connection pool, so a database restart costs the burials tried while it is
/// down (the runner keeps those messages in the broker and tries again), never every burial
/// after it. Each burial is bounded by [`DeadLetters::TIMEOUT`].
pub struct DeadLetters {
    pool: deadpool_postgres::Pool,
    consumer: String,
}

impl std::fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetters").field("consumer", &self.consumer).finish_non_exhaustive()
    }
}

impl DeadLetters {
    /// How long one burial may take, waiting for a connection included.
    pub const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

    /// Buries into the database behind `pool` (the application's own pool, or one of its own:
    /// see [`DeadLetters::connect`]).
    pub fn new(pool: deadpool_postgres::Pool, consumer: impl Into<String>) -> Result<Self> {
        let consumer = consumer.into();
        check_consumer(&consumer)?;
        Ok(Self { pool, consumer })
    }

    /// Buries into the database at `url` (a `postgres://` URL or libpq `key=value` string,
    /// with TLS as its `sslmode` and `sslrootcert` say: see [`idem_postgres::tls`]) over a
    /// small pool of its own, which connects when first needed and reconnects after the
    /// database restarts.
    pub fn connect(url: &str, consumer: impl Into<String>) -> Result<Self> {
        let database = super::Database::from_url(url)
            .map_err(|error| crate::Error::Config(error.to_string()))?;
        let manager = deadpool_postgres::Manager::from_config(
            database.config().clone(),
            database.tls(),
            deadpool_postgres::ManagerConfig {
                recycling_method: deadpool_postgres::RecyclingMethod::Fast,
            },
        );
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(2)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(Self::TIMEOUT))
            .create_timeout(Some(Self::TIMEOUT))
            .recycle_timeout(Some(Self::TIMEOUT))
            .build()
            .map_err(|error| {
                crate::Error::Config(format!("cannot build a connection pool: {error}"))
            })?;
        Self::new(pool, consumer)
    }
}

#[async_trait::async_trait]
impl crate::consume::DeadLetter for DeadLetters {
    async fn bury(&self, message: &crate::consume::Received, failure: &str) -> Result<()> {
        let headers: Vec<&str> = message
            .headers
            .iter()
            .flat_map(|(name, value)| [name.as_str(), value.as_str()])
            .collect();
        let bury = async {
            let client = self.pool.get().await?;
            client
            .execute(
                // One dead letter per message: a redelivered copy that fails again is not
                // buried twice.
                "INSERT INTO idem_dead_letters (consumer, message_id, subject, payload, headers, attempts, failure)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (consumer, message_id) DO NOTHING",
                &[
                    &self.consumer,
                    &message.id,
                    &message.subject,
                    &&message.payload[..],
                    &headers,
                    &(message.attempt as i64),
                    &failure,
                ],
            )
            .await
            .map(drop)
            .map_err(crate::Error::from)
        };
        match tokio::time::timeout(Self::TIMEOUT, bury).await {
            Ok(buried) => buried,
            Err(_) => Err(crate::Error::Timeout(Self::TIMEOUT)),
        }
    }
}
