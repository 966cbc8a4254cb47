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

/// A message a consumer gave up on, as kept in `idem_dead_letters`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Buried {
    /// The row's id: what `requeue` and `delete` name.
    pub id: i64,
    pub consumer: String,
    /// The message's own id (the inbox key).
    pub message_id: String,
    pub subject: String,
    pub payload: bytes::Bytes,
    pub headers: Vec<(String, String)>,
    pub attempts: i64,
    /// Why its last attempt failed ([`DeadLetters::list`] keeps its first 1,000 characters).
    pub failure: String,
    pub buried_at: std::time::SystemTime,
    /// The payload's size (also where [`DeadLetters::list`] leaves `payload` and `headers`
    /// empty, to keep a long list small).
    pub payload_bytes: i64,
}

/// The dead letters of one consumer: how many, and since when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuriedCount {
    pub consumer: String,
    pub count: i64,
    pub oldest: std::time::SystemTime,
}

/// What [`DeadLetters::requeue`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requeued {
    /// Published again, then removed from the dead letters.
    Requeued(Buried),
    /// No dead letter has that id (another operator requeued or deleted it first).
    NotFound,
}

const BURIED_COLUMNS: &str = "id, consumer, message_id, subject, payload, headers, attempts, failure, buried_at, octet_length(payload)::bigint AS payload_bytes";
/// What a list reads: no payload or headers, the failure cut short.
const LISTED_COLUMNS: &str = "id, consumer, message_id, subject, ''::bytea AS payload, '{}'::text[] AS headers, attempts, left(failure, 1000) AS failure, buried_at, octet_length(payload)::bigint AS payload_bytes";

fn buried(row: &tokio_postgres::Row) -> Buried {
    let flat: Vec<String> = row.get("headers");
    let headers = flat.chunks_exact(2).map(|pair| (pair[0].clone(), pair[1].clone())).collect();
    Buried {
        id: row.get("id"),
        consumer: row.get("consumer"),
        message_id: row.get("message_id"),
        subject: row.get("subject"),
        payload: bytes::Bytes::from(row.get::<_, Vec<u8>>("payload")),
        headers,
        attempts: row.get("attempts"),
        failure: row.get("failure"),
        buried_at: row.get("buried_at"),
        payload_bytes: row.get("payload_bytes"),
    }
}

impl Buried {
    /// Whether an idem relay published it (its id is `idem-outbox-N`): what
    /// [`DeadLetters::requeue`] can put back.
    pub fn relay_published(&self) -> bool {
        self.outbox_id().is_some()
    }

    fn outbox_id(&self) -> Option<i64> {
        self.message_id.strip_prefix("idem-outbox-").and_then(|id| id.parse::<i64>().ok())
    }

    /// The outbox event this message was, ready to publish again with its own message id,
    /// key and place in the key. Only a message an idem relay published can go back this way
    /// (its id is `idem-outbox-N` and it carries the `Idem-Key` and `Idem-Seq` headers): the
    /// same id is what lets a consumer's inbox recognise it, should it arrive twice.
    pub fn to_outbox_message(&self) -> Result<crate::publish::OutboxMessage> {
        use crate::publish::{KEY_HEADER, SEQ_HEADER};
        let refuse = |why: &str| {
            crate::Error::InvalidEvent(format!(
                "dead letter {} (message {:?}) cannot be requeued: {why}; publish it again from its producer",
                self.id, self.message_id
            ))
        };
        let outbox_id =
            self.outbox_id().ok_or_else(|| refuse("an idem relay did not publish it"))?;
        let header =
            |name: &str| self.headers.iter().find(|(header, _)| header.eq_ignore_ascii_case(name));
        let key = header(KEY_HEADER).ok_or_else(|| refuse("it has no Idem-Key header"))?.1.clone();
        let seq = header(SEQ_HEADER)
            .and_then(|(_, seq)| seq.parse::<i64>().ok())
            .ok_or_else(|| refuse("it has no Idem-Seq header"))?;
        // The publishers set the message id, key and seq themselves; NATS control headers
        // (`Nats-Expected-…`) would make the broker judge the publish, not carry it.
        let headers = self
            .headers
            .iter()
            .filter(|(name, _)| {
                !name.eq_ignore_ascii_case(KEY_HEADER)
                    && !name.eq_ignore_ascii_case(SEQ_HEADER)
                    && !name.to_ascii_lowercase().starts_with("nats-")
            })
            .cloned()
            .collect();
        Ok(crate::publish::OutboxMessage {
            id: outbox_id,
            topic: self.subject.clone(),
            key,
            seq,
            payload: self.payload.clone(),
            headers,
        })
    }
}

impl DeadLetters {
    /// The most dead letters [`DeadLetters::list`] returns at once.
    pub const MAX_LIST: i64 = 1_000;
    /// How long [`DeadLetters::requeue`] waits for the broker to take the message.
    pub const PUBLISH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

    /// Dead letters per consumer, the most first, for at most 100 consumers (empty when the
    /// table does not exist).
    pub async fn counts(client: &tokio_postgres::Client) -> Result<Vec<BuriedCount>> {
        if !table_exists(client).await? {
            return Ok(Vec::new());
        }
        let rows = client
            .query(
                "SELECT consumer, count(*) AS count, min(buried_at) AS oldest
                 FROM idem_dead_letters GROUP BY consumer ORDER BY count DESC, consumer LIMIT 100",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| BuriedCount {
                consumer: row.get("consumer"),
                count: row.get("count"),
                oldest: row.get("oldest"),
            })
            .collect())
    }

    /// Up to `limit` dead letters (at most [`DeadLetters::MAX_LIST`]), the oldest first, of
    /// one consumer or of all.
    pub async fn list(
        client: &tokio_postgres::Client,
        consumer: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Buried>> {
        if !table_exists(client).await? {
            return Ok(Vec::new());
        }
        let limit = limit.clamp(1, Self::MAX_LIST);
        let rows = client
            .query(
                &format!(
                    "SELECT {LISTED_COLUMNS} FROM idem_dead_letters
                     WHERE $1::text IS NULL OR consumer = $1 ORDER BY id LIMIT $2"
                ),
                &[&consumer, &limit],
            )
            .await?;
        Ok(rows.iter().map(buried).collect())
    }

    /// One dead letter, by its row id.
    pub async fn get(client: &tokio_postgres::Client, id: i64) -> Result<Option<Buried>> {
        if !table_exists(client).await? {
            return Ok(None);
        }
        let query = format!("SELECT {BURIED_COLUMNS} FROM idem_dead_letters WHERE id = $1");
        Ok(client.query_opt(&query, &[&id]).await?.as_ref().map(buried))
    }

    /// Removes a dead letter for good (its message is given up): whether it was there.
    pub async fn delete(client: &tokio_postgres::Client, id: i64) -> Result<bool> {
        if !table_exists(client).await? {
            return Ok(false);
        }
        Ok(client.execute("DELETE FROM idem_dead_letters WHERE id = $1", &[&id]).await? == 1)
    }

    /// Publishes a dead letter again, on its subject with its own message id, key and headers
    /// (see [`Buried::to_outbox_message`]), then removes it; fix what made its consumer fail
    /// first.
    ///
    /// The row is deleted before the publish and the deletion committed after it, so two
    /// operators requeueing it at once publish it once, and a consumer burying the requeued
    /// copy again waits for the commit and keeps its new dead letter. If the broker refuses,
    /// the dead letter stays. If the database fails after the broker took the message, the
    /// dead letter stays too and a second requeue publishes it again: a consumer's inbox
    /// takes it once, by its id, while it still holds that id.
    ///
    /// The message goes to its subject, so every reader of the subject gets it (every
    /// JetStream consumer of the stream, every Redis consumer group, every queue bound on a
    /// RabbitMQ exchange): those that applied it already skip it only by their inbox.
    pub async fn requeue(
        client: &mut tokio_postgres::Client,
        id: i64,
        publisher: &dyn crate::publish::Publisher,
    ) -> Result<Requeued> {
        if !table_exists(client).await? {
            return Ok(Requeued::NotFound);
        }
        // Deleted first, committed only once the broker took the message: meanwhile the
        // deleted row makes a consumer's burial of the new copy (its INSERT ... ON CONFLICT)
        // and a second requeue wait for this transaction; after the commit the burial goes
        // in, after a rollback the dead letter is back as it was.
        let transaction = client.transaction().await?;
        let query =
            format!("DELETE FROM idem_dead_letters WHERE id = $1 RETURNING {BURIED_COLUMNS}");
        let Some(row) = transaction.query_opt(&query, &[&id]).await? else {
            return Ok(Requeued::NotFound);
        };
        let letter = buried(&row);
        let message = letter.to_outbox_message()?;
        let publish = publisher.publish(std::slice::from_ref(&message));
        let published = tokio::time::timeout(Self::PUBLISH_TIMEOUT, publish)
            .await
            .map_err(|_| crate::Error::broker("broker", "publish", "no answer within 10s"))?;
        match published.into_iter().next() {
            Some(Ok(())) => {}
            Some(Err(error)) => return Err(error.source),
            None => return Err(crate::Error::other("the publisher returned no result")),
        }
        transaction.commit().await?;
        Ok(Requeued::Requeued(letter))
    }
}

async fn table_exists(client: &tokio_postgres::Client) -> Result<bool> {
    let row = client.query_one("SELECT to_regclass('idem_dead_letters') IS NOT NULL", &[]).await?;
    Ok(row.get(0))
}
