//! The inbox on PostgreSQL: `idem_inbox (consumer, message_id)` with a primary key.

use std::time::Duration;

use tokio_postgres::types::Type;
use tokio_postgres::{GenericClient, Transaction};

use crate::{Delivery, Result, check_consumer, check_message_id};

/// An arbitrary constant: the advisory lock that serialises creating the tables.
const MIGRATION_LOCK: i64 = 0x6964_656d_696e_6278;

/// Runs `ddl` in one transaction under the migration lock, so instances starting at once do
/// not race to create the same tables.
async fn migrate_locked(client: &mut tokio_postgres::Client, ddl: &str) -> Result<()> {
    let transaction = client.transaction().await?;
    transaction.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
    transaction.batch_execute(ddl).await?;
    transaction.commit().await?;
    Ok(())
}

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

/// Most ids [`Inbox::record_many`] takes at once.
pub const MAX_BATCH: usize = 10_000;

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

/// How much one relay round takes on.
#[derive(Debug, Clone, Copy)]
pub struct RelayConfig {
    /// Keys claimed per round.
    pub max_keys: i64,
    /// Events per key per round.
    pub max_events_per_key: i64,
    /// A relay whose session stays idle in its transaction this long (stalled mid-publish)
    /// is disconnected by PostgreSQL, which releases its keys to other relays.
    pub stall_timeout: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self { max_keys: 64, max_events_per_key: 100, stall_timeout: Duration::from_secs(30) }
    }
}

/// What one relay round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoundReport {
    pub keys: usize,
    pub published: usize,
    pub failed: usize,
}

/// Publishes pending outbox events. Several relays may run at once, on several hosts.
///
/// A round, in one transaction: claim up to `max_keys` keys with pending events by taking a
/// transaction-scoped advisory lock on each (keys another relay holds are skipped); read each
/// key's pending events in sequence order; publish them in layers (the next event of every key
/// at once, so keys proceed in parallel while each key stays in order), checking before each
/// layer that the session is still alive (a relay that lost its session may have lost its
/// keys); mark what was published and commit. A relay that dies after publishing and before
/// its commit leaves the events unmarked: the next round republishes them with the same
/// message ids, and the broker's deduplication (and the consumers' inbox) absorbs the repeat.
#[derive(Debug)]
pub struct Relay<P> {
    publisher: P,
    config: RelayConfig,
}

impl<P: crate::publish::Publisher> Relay<P> {
    pub fn new(publisher: P, config: RelayConfig) -> Self {
        Self { publisher, config }
    }

    /// One round; see the type's docs. Traced as the span `relay_round`, with the keys
    /// claimed and the events published and failed.
    pub async fn run_once(&self, client: &mut tokio_postgres::Client) -> Result<RoundReport> {
        use tracing::Instrument;
        let span = tracing::debug_span!(
            "relay_round",
            keys = tracing::field::Empty,
            published = tracing::field::Empty,
            failed = tracing::field::Empty
        );
        let report = self.round(client).instrument(span.clone()).await?;
        span.record("keys", report.keys);
        span.record("published", report.published);
        span.record("failed", report.failed);
        Ok(report)
    }

    async fn round(&self, client: &mut tokio_postgres::Client) -> Result<RoundReport> {
        let transaction = client.transaction().await?;
        let stall_ms = self.config.stall_timeout.as_millis().max(1) as i64;
        transaction
            .batch_execute(&format!("SET LOCAL idle_in_transaction_session_timeout = {stall_ms}"))
            .await?;
        // Candidates first (bounded), then the locks. The inner LIMIT keeps the planner from
        // trying locks on rows it would not return; the outer one stops trying once enough keys
        // are ours, so no key is locked that this round will not publish.
        let keys = transaction
            .query(
                "SELECT topic, key FROM (
                     SELECT topic, key FROM idem_outbox_keys
                     WHERE published_seq < enqueued_seq LIMIT $1) candidates
                 WHERE pg_try_advisory_xact_lock(hashtextextended(topic || chr(31) || key, 0))
                 LIMIT $2",
                &[&(self.config.max_keys * 4), &self.config.max_keys],
            )
            .await?;
        let mut report = RoundReport::default();
        let (topics, names): (Vec<String>, Vec<String>) =
            keys.iter().map(|row| (row.get::<_, String>(0), row.get::<_, String>(1))).unzip();
        // Every claimed key's pending events in one query. Read after the locks: a relay that
        // held a key before us has committed by now.
        let events = transaction
            .query(
                "SELECT k.topic, k.key, e.id, e.seq, e.payload, e.headers
                 FROM unnest($1::text[], $2::text[]) AS claimed(topic, key)
                 JOIN idem_outbox_keys k ON k.topic = claimed.topic AND k.key = claimed.key
                 CROSS JOIN LATERAL (
                     SELECT id, seq, payload, headers FROM idem_outbox
                     WHERE topic = k.topic AND key = k.key AND seq > k.published_seq
                     ORDER BY seq LIMIT $3) e
                 ORDER BY k.topic, k.key, e.seq",
                &[&topics, &names, &self.config.max_events_per_key],
            )
            .await?;
        let mut queues: Vec<std::collections::VecDeque<crate::publish::OutboxMessage>> = Vec::new();
        for event in &events {
            let flat: Vec<String> = event.get(5);
            let message = crate::publish::OutboxMessage {
                topic: event.get(0),
                key: event.get(1),
                id: event.get(2),
                seq: event.get(3),
                payload: bytes::Bytes::from(event.get::<_, Vec<u8>>(4)),
                headers: flat.chunks(2).map(|pair| (pair[0].clone(), pair[1].clone())).collect(),
            };
            match queues.last_mut() {
                Some(queue)
                    if queue.back().is_some_and(|last| {
                        last.topic == message.topic && last.key == message.key
                    }) =>
                {
                    queue.push_back(message)
                }
                _ => queues.push(std::collections::VecDeque::from([message])),
            }
        }
        report.keys = queues.len();

        // (topic, key) -> the highest seq published this round, and every id published.
        let mut published_ids: Vec<i64> = Vec::new();
        let mut published_seqs: Vec<(String, String, i64)> = Vec::new();
        while queues.iter().any(|queue| !queue.is_empty()) {
            // Still ours? A session ended by the stall timeout has given its locks away.
            transaction.query_one("SELECT 1", &[]).await?;
            let layer: Vec<crate::publish::OutboxMessage> =
                queues.iter_mut().filter_map(|queue| queue.front().cloned()).collect();
            let results = self.publisher.publish(&layer).await;
            let mut layer_index = 0;
            for queue in queues.iter_mut() {
                let Some(message) = queue.front() else { continue };
                match &results[layer_index] {
                    Ok(()) => {
                        published_ids.push(message.id);
                        match published_seqs
                            .iter_mut()
                            .find(|(t, k, _)| *t == message.topic && *k == message.key)
                        {
                            Some(entry) => entry.2 = message.seq,
                            None => published_seqs.push((
                                message.topic.clone(),
                                message.key.clone(),
                                message.seq,
                            )),
                        }
                        queue.pop_front();
                    }
                    Err(error) => {
                        // Stop this key for the round: its later events must not overtake.
                        tracing::warn!(%error, "publish failed; the key waits for the next round");
                        report.failed += 1;
                        queue.clear();
                    }
                }
                layer_index += 1;
            }
        }
        report.published = published_ids.len();
        if !published_ids.is_empty() {
            transaction
                .execute(
                    "UPDATE idem_outbox SET sent_at = now() WHERE id = ANY($1)",
                    &[&published_ids],
                )
                .await?;
            let topics: Vec<&str> =
                published_seqs.iter().map(|(topic, _, _)| topic.as_str()).collect();
            let keys: Vec<&str> = published_seqs.iter().map(|(_, key, _)| key.as_str()).collect();
            let seqs: Vec<i64> = published_seqs.iter().map(|(_, _, seq)| *seq).collect();
            transaction
                .execute(
                    "UPDATE idem_outbox_keys k SET published_seq = u.seq
                     FROM unnest($1::text[], $2::text[], $3::bigint[]) AS u(topic, key, seq)
                     WHERE k.topic = u.topic AND k.key = u.key AND k.published_seq < u.seq",
                    &[&topics, &keys, &seqs],
                )
                .await?;
        }
        transaction.commit().await?;
        Ok(report)
    }

    /// Runs rounds until one finds nothing to publish (bounded by `max_rounds`); returns the
    /// total published.
    pub async fn run_until_idle(
        &self,
        client: &mut tokio_postgres::Client,
        max_rounds: usize,
    ) -> Result<usize> {
        let mut total = 0;
        for _ in 0..max_rounds {
            let report = self.run_once(client).await?;
            total += report.published;
            if report.keys == 0 {
                break;
            }
        }
        Ok(total)
    }
}

/// How a long-running relay waits for work.
#[derive(Debug, Clone, Copy)]
pub struct RunConfig {
    /// Poll this often even without a notification (a missed NOTIFY, events enqueued by
    /// something that does not notify).
    pub poll_interval: Duration,
    /// Rounds in a row before waiting again, so one relay cannot spin for ever.
    pub max_rounds_per_wake: usize,
    /// The longest wait before retrying after an error (it doubles from 100 ms up to this).
    pub max_backoff: Duration,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_secs(1),
            max_rounds_per_wake: 1_000,
            max_backoff: Duration::from_secs(30),
        }
    }
}

impl<P: crate::publish::Publisher> Relay<P> {
    /// Runs until `shutdown` resolves: wakes on `NOTIFY idem_outbox` (sent by every enqueue at
    /// commit) or every `poll_interval`, publishes until idle, and reconnects after errors with
    /// a bounded backoff. A round in progress when `shutdown` resolves is finished first.
    pub async fn run(
        &self,
        database: &tokio_postgres::Config,
        run: RunConfig,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<()> {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut backoff = Duration::from_millis(100);
        loop {
            let session = tokio::select! {
                () = &mut shutdown => return Ok(()),
                session = connect_listening(database) => session,
            };
            let Listening { mut client, _listening, wake, listener } = match session {
                Ok(session) => session,
                Err(error) => {
                    tracing::warn!(%error, ?backoff, "relay cannot reach PostgreSQL; retrying");
                    tokio::select! {
                        () = &mut shutdown => return Ok(()),
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(run.max_backoff);
                    continue;
                }
            };
            let outcome = loop {
                // Each pass publishes until a round finds nothing (bounded), then waits.
                match self.run_until_idle(&mut client, run.max_rounds_per_wake).await {
                    Ok(published) => {
                        backoff = Duration::from_millis(100);
                        if published > 0 {
                            tracing::debug!(published, "relay published");
                        }
                    }
                    Err(error) => break Err(error),
                }
                tokio::select! {
                    () = &mut shutdown => break Ok(()),
                    () = wake.notified() => {}
                    () = tokio::time::sleep(run.poll_interval) => {}
                }
                if client.is_closed() {
                    break Err(crate::Error::Disconnected);
                }
            };
            listener.abort();
            match outcome {
                Ok(()) => return Ok(()),
                Err(error) => {
                    tracing::warn!(%error, ?backoff, "relay round failed; reconnecting");
                    tokio::select! {
                        () = &mut shutdown => return Ok(()),
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(run.max_backoff);
                }
            }
        }
    }
}

/// The connections of a running relay: one for the rounds, one that `LISTEN`s. Its
/// notifications (and its end) wake `wake`. Dropping it closes both.
struct Listening {
    client: tokio_postgres::Client,
    _listening: tokio_postgres::Client,
    wake: std::sync::Arc<tokio::sync::Notify>,
    listener: tokio::task::JoinHandle<()>,
}

async fn connect_listening(database: &tokio_postgres::Config) -> Result<Listening> {
    let (client, connection) = database.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "relay connection ended");
        }
    });
    let (listening, mut connection) = database.connect(tokio_postgres::NoTls).await?;
    let wake = std::sync::Arc::new(tokio::sync::Notify::new());
    let notify = std::sync::Arc::clone(&wake);
    // This task drives the listening connection (so LISTEN below can complete) and turns its
    // notifications into wake-ups.
    let listener = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(_))) => notify.notify_one(),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    notify.notify_one();
                    return;
                }
            }
        }
    });
    listening.batch_execute("LISTEN idem_outbox").await?;
    Ok(Listening { client, _listening: listening, wake, listener })
}

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

    /// Buries into the database at `url` (a `postgres://` URL or libpq `key=value` string)
    /// over a small pool of its own, which connects when first needed and reconnects after
    /// the database restarts.
    pub fn connect(url: &str, consumer: impl Into<String>) -> Result<Self> {
        let config: tokio_postgres::Config = url.parse()?;
        let manager = deadpool_postgres::Manager::from_config(
            config,
            tokio_postgres::NoTls,
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
    async fn bury(
        &self,
        message: &crate::consume::Received,
        failure: &str,
    ) -> std::result::Result<(), String> {
        let headers: Vec<&str> = message
            .headers
            .iter()
            .flat_map(|(name, value)| [name.as_str(), value.as_str()])
            .collect();
        let bury = async {
            let client = self.pool.get().await.map_err(|error| error.to_string())?;
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
            .map_err(|error| error.to_string())
        };
        match tokio::time::timeout(Self::TIMEOUT, bury).await {
            Ok(buried) => buried,
            Err(_) => Err(format!("the database did not answer within {:?}", Self::TIMEOUT)),
        }
    }
}
