//! The relay: publishes pending outbox events, each key in order, several relays at once.

use std::time::Duration;

use super::Database;
use crate::Result;
use crate::outbox::{RelayConfig, RoundReport};
use idem_core::store_kit::with_causes;

/// Publishes pending outbox events. Several relays may run at once, on several hosts.
///
/// A round, in one transaction: claim up to `max_keys` keys with pending events (those tried
/// longest ago first, so every key gets its turn; keys backing off after a failure, and parked
/// keys, are not due) by taking a
/// transaction-scoped advisory lock on each (keys another relay holds are skipped); read each
/// key's pending events in sequence order; publish them in layers (the next event of every key
/// at once, so keys proceed in parallel while each key stays in order), checking between
/// layers that the session is still alive (a relay that lost its session may have lost its
/// keys); record each key's highest published sequence (one row per key, the events
/// themselves untouched) and commit. A relay that dies after publishing and before its commit
/// leaves the keys where they were: the next round republishes the events with the same
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
                     WHERE published_seq < enqueued_seq AND parked_at IS NULL
                       AND (retry_at IS NULL OR retry_at <= clock_timestamp())
                     ORDER BY tried_at NULLS FIRST LIMIT $1) candidates
                 WHERE pg_try_advisory_xact_lock(hashtextextended(topic || chr(31) || key, 0))
                 LIMIT $2",
                &[&(self.config.max_keys * 4), &self.config.max_keys],
            )
            .await?;
        let mut report = RoundReport::default();
        let (topics, names): (Vec<String>, Vec<String>) =
            keys.iter().map(|row| (row.get::<_, String>(0), row.get::<_, String>(1))).unzip();
        // Every claimed key's pending events, read after the locks: a relay that held a key
        // before us has committed by now, and a key it parked or sent into backoff meanwhile
        // (after our candidates were read) is not due any more. Read in parts: the first few
        // events of each key, then, while those are being published, parts twice as large
        // each time, so the publisher never waits for a read it could have overlapped.
        let head = self.config.max_events_per_key.clamp(1, HEAD_EVENTS);
        let from_start = vec![0; topics.len()];
        let first = read_events(&transaction, &topics, &names, &from_start, head).await?;
        let full = full_keys(&first, head);
        let queues = crate::layers::queues_by_key(first);
        report.keys = queues.len();
        // Still ours before each layer? A session ended by the stall timeout (idle that long)
        // has given its locks away. Asked at most every `check_every`, which is shorter than
        // the stall timeout, so a session the timeout ended is always caught before the next
        // layer; a session lost otherwise (the server restarted) publishes for at most that
        // long more: copies, which the broker's deduplication and the inbox absorb.
        let check_every = (self.config.stall_timeout / 4).min(SESSION_CHECK_EVERY);
        let checked = std::sync::Mutex::new(std::time::Instant::now());
        let still_ours = || {
            let due = {
                let mut checked = checked.lock().unwrap_or_else(|poison| poison.into_inner());
                let due = checked.elapsed() >= check_every;
                if due {
                    *checked = std::time::Instant::now();
                }
                due
            };
            let transaction = &transaction;
            async move {
                if due {
                    transaction.query_typed("SELECT 1", &[]).await?;
                }
                Ok::<_, tokio_postgres::Error>(true)
            }
        };
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        let read_on =
            read_the_rest(&transaction, full, head, self.config.max_events_per_key, sender);
        let (published, read) = tokio::join!(
            crate::layers::publish_fed(&self.publisher, queues, Some(receiver), still_ours),
            read_on
        );
        let published = published?;
        read?;
        report.published = published.ids.len();
        report.failed = published.failed;
        let outcomes = published.keys;
        // What was published is recorded by each key's `published_seq` below, not event by
        // event: one row per key per round, whatever the number of events.
        if !outcomes.is_empty() {
            let topics: Vec<&str> = outcomes.iter().map(|o| o.topic.as_str()).collect();
            let keys: Vec<&str> = outcomes.iter().map(|o| o.key.as_str()).collect();
            let seqs: Vec<i64> = outcomes.iter().map(|o| o.published_seq).collect();
            let errors: Vec<Option<&str>> = outcomes.iter().map(|o| o.error.as_deref()).collect();
            let full: Vec<bool> = outcomes.iter().map(|o| o.full).collect();
            let backoff_ms = self.config.retry_backoff.as_millis().max(1) as f64;
            let max_backoff_ms = self.config.max_retry_backoff.as_millis().max(1) as f64;
            // Every claimed key: what it published, when it was tried (for the rotation), and
            // on failure its backoff, or parking after `max_attempts` failures in a row of the
            // same event (a key that moved on starts counting again; a full broker, waiting
            // for a lagging consumer, never counts).
            let parked = transaction
                .query(
                    "WITH n AS (
                         SELECT u.topic, u.key, u.seq, u.error, u.is_full,
                                CASE WHEN u.error IS NULL THEN 0
                                     WHEN u.seq > k.published_seq AND u.is_full THEN 0
                                     WHEN u.seq > k.published_seq THEN 1
                                     WHEN u.is_full THEN k.attempts
                                     ELSE k.attempts + 1 END AS attempts
                         FROM unnest($1::text[], $2::text[], $3::bigint[], $7::text[],
                                     $8::bool[]) AS u(topic, key, seq, error, is_full)
                         JOIN idem_outbox_keys k ON k.topic = u.topic AND k.key = u.key)
                     UPDATE idem_outbox_keys k SET
                         published_seq = greatest(k.published_seq, n.seq),
                         tried_at = clock_timestamp(),
                         attempts = n.attempts,
                         last_error = n.error,
                         retry_at = CASE WHEN n.error IS NULL THEN NULL ELSE clock_timestamp()
                             + least($5 * power(2, least(greatest(n.attempts - 1, 0), 30)), $6)
                               * interval '1 millisecond' END,
                         parked_at = CASE WHEN n.error IS NOT NULL AND NOT n.is_full
                                           AND n.attempts >= $4
                             THEN clock_timestamp() END
                     FROM n
                     WHERE k.topic = n.topic AND k.key = n.key
                     RETURNING k.parked_at IS NOT NULL",
                    &[
                        &topics,
                        &keys,
                        &seqs,
                        &self.config.max_attempts.max(1),
                        &backoff_ms,
                        &max_backoff_ms,
                        &errors,
                        &full,
                    ],
                )
                .await?;
            report.parked = parked.iter().filter(|row| row.get::<_, bool>(0)).count();
            if report.parked > 0 {
                metrics::counter!("idem_outbox_parked_total").increment(report.parked as u64);
                tracing::error!(
                    parked = report.parked,
                    "outbox keys parked after repeated publish failures; see `idem outbox list --parked`"
                );
            }
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
    /// Events sent (or discarded) longer ago than this are deleted, and key rows idle as long
    /// with no event left ([`super::Outbox::purge_sent`]), every `retention_every`, on a
    /// connection of its own; `None` keeps them for ever.
    pub retention: Option<Duration>,
    pub retention_every: Duration,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_secs(1),
            max_rounds_per_wake: 1_000,
            max_backoff: Duration::from_secs(30),
            retention: Some(Duration::from_secs(7 * 24 * 3600)),
            retention_every: Duration::from_secs(60),
        }
    }
}

impl<P: crate::publish::Publisher> Relay<P> {
    /// Runs until `shutdown` resolves: wakes on `NOTIFY idem_outbox` (sent by every enqueue at
    /// commit) or every `poll_interval`, publishes until idle, and reconnects after errors with
    /// a bounded backoff. A round in progress when `shutdown` resolves is finished first.
    ///
    /// `database` is a [`Database`] (from a URL with `sslmode=verify-full&sslrootcert=...`:
    /// TLS as libpq means it, see [`idem_postgres::tls`]) or a plain
    /// `&tokio_postgres::Config` (TLS only with its `sslmode=require`, unverified). Every
    /// connection the relay opens (rounds, `LISTEN`, retention) goes the same way.
    pub async fn run(
        &self,
        database: impl Into<Database>,
        run: RunConfig,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<()> {
        let database: Database = database.into();
        let database = &database;
        let mut shutdown = std::pin::pin!(shutdown);
        let mut backoff = Duration::from_millis(100);
        let _retention = run.retention.map(|older_than| {
            AbortOnDrop(tokio::spawn(retention_forever(
                database.clone(),
                older_than,
                run.retention_every,
            )))
        });
        loop {
            let session = tokio::select! {
                () = &mut shutdown => return Ok(()),
                session = connect_listening(database) => session,
            };
            let Listening { mut client, _listening, wake, listener } = match session {
                Ok(session) => session,
                Err(error) => {
                    let error = with_causes(&error);
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

/// Events per key read before publishing starts; the rest of a round's events are read while
/// these are published.
const HEAD_EVENTS: i64 = 8;

/// Up to `limit` pending events of each claimed key (those still due) after sequence `after`
/// (0: from the first pending one), in key and sequence order.
async fn read_events(
    transaction: &tokio_postgres::Transaction<'_>,
    topics: &[String],
    names: &[String],
    after: &[i64],
    limit: i64,
) -> Result<Vec<crate::publish::OutboxMessage>> {
    let rows = transaction
        .query(
            "SELECT k.topic, k.key, e.id, e.seq, e.payload, e.headers
             FROM unnest($1::text[], $2::text[], $4::bigint[]) AS claimed(topic, key, after)
             JOIN idem_outbox_keys k ON k.topic = claimed.topic AND k.key = claimed.key
                 AND k.parked_at IS NULL
                 AND (k.retry_at IS NULL OR k.retry_at <= clock_timestamp())
             CROSS JOIN LATERAL (
                 SELECT id, seq, payload, headers FROM idem_outbox
                 WHERE topic = k.topic AND key = k.key
                   AND seq > greatest(k.published_seq, claimed.after)
                   AND discarded_at IS NULL
                 ORDER BY seq LIMIT $3) e
             ORDER BY k.topic, k.key, e.seq",
            &[&topics, &names, &limit, &after],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|event| {
            let flat: Vec<String> = event.get(5);
            crate::publish::OutboxMessage {
                topic: event.get(0),
                key: event.get(1),
                id: event.get(2),
                seq: event.get(3),
                payload: bytes::Bytes::from(event.get::<_, Vec<u8>>(4)),
                headers: flat
                    .chunks(2)
                    .map(|pair| (pair[0].clone(), pair.get(1).cloned().unwrap_or_default()))
                    .collect(),
            }
        })
        .collect())
}

/// The keys with `part` events in `events` (sorted by topic, key and seq), each with the seq
/// of its last: the keys that may have more.
fn full_keys(events: &[crate::publish::OutboxMessage], part: i64) -> Vec<(String, String, i64)> {
    events
        .chunk_by(|a, b| a.topic == b.topic && a.key == b.key)
        .filter(|run| run.len() as i64 == part)
        .filter_map(|run| run.last())
        .map(|last| (last.topic.clone(), last.key.clone(), last.seq))
        .collect()
}

/// Reads on after the first `head` events of each key in `full` (with the seq each ended
/// at), in parts twice the last part's size per key, up to `max_per_key` in all, and sends
/// each part as it comes. Only keys whose last part was full are read again; it stops early
/// when the receiver is gone (the round ended).
async fn read_the_rest(
    transaction: &tokio_postgres::Transaction<'_>,
    mut full: Vec<(String, String, i64)>,
    head: i64,
    max_per_key: i64,
    sender: tokio::sync::mpsc::UnboundedSender<Option<Vec<crate::publish::OutboxMessage>>>,
) -> Result<()> {
    let (mut read, mut part) = (head, head);
    while !full.is_empty() && read < max_per_key && !sender.is_closed() {
        part = (part * 2).min(max_per_key - read);
        let topics: Vec<String> = full.iter().map(|(topic, _, _)| topic.clone()).collect();
        let keys: Vec<String> = full.iter().map(|(_, key, _)| key.clone()).collect();
        let after: Vec<i64> = full.iter().map(|(_, _, seq)| *seq).collect();
        let events = match read_events(transaction, &topics, &keys, &after, part).await {
            Ok(events) => events,
            Err(error) => {
                // The publisher stops at once; the round fails with this error.
                let _ = sender.send(None);
                return Err(error);
            }
        };
        read += part;
        full = full_keys(&events, part);
        if sender.send(Some(events)).is_err() {
            break;
        }
    }
    Ok(())
}

/// The longest a relay publishes without asking whether its session (and so its key locks)
/// is still alive.
const SESSION_CHECK_EVERY: Duration = Duration::from_millis(100);

/// Aborts its task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Deletes what the outbox no longer needs every `every`, until aborted.
async fn retention_forever(database: Database, older_than: Duration, every: Duration) {
    let mut tick = tokio::time::interval(every.max(Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let client = match database.connect().await {
            Ok((client, connection)) => {
                tokio::spawn(connection);
                client
            }
            Err(error) => {
                let error = with_causes(&error);
                tracing::debug!(%error, "outbox retention: cannot connect; next time");
                continue;
            }
        };
        let purge =
            super::Outbox::purge_sent(&client, older_than, 10_000, 100, Duration::from_millis(20));
        match purge.await {
            Ok(report) if report.events + report.keys > 0 => {
                tracing::info!(
                    events = report.events,
                    keys = report.keys,
                    "outbox retention deleted sent events and idle keys"
                );
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "outbox retention failed; next time"),
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

async fn connect_listening(database: &Database) -> Result<Listening> {
    let (client, connection) = database.connect().await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "relay connection ended");
        }
    });
    let (listening, mut connection) = database.connect().await?;
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
