//! The transactional outbox on SQLite, for services on idem's embedded default: events enqueued
//! in the caller's SQLite transaction, and a relay that publishes them, each key in commit
//! order. The contract is PostgreSQL's ([`crate::postgres::Outbox`], [`crate::postgres::Relay`]),
//! with two differences that SQLite imposes: a relay claims keys with a lease written in the
//! database (SQLite has no advisory locks; several relay processes on one file share keys by
//! it, and a relay whose lease ran out cannot mark what another relay took over), and it wakes
//! by polling (SQLite has no `NOTIFY`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};

use crate::outbox::{
    Event, KeyState, OutboxStats, PendingEvent, RelayConfig, RoundReport, check_event,
};
use crate::publish::{OutboxMessage, Publisher};
use crate::{Error, Result};

fn now_millis() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_millis() as i64)
}

/// The transactional outbox on SQLite.
#[derive(Debug, Clone, Copy, Default)]
pub struct Outbox;

impl Outbox {
    /// Creates the outbox tables if they are missing.
    pub fn migrate(connection: &Connection) -> Result<()> {
        connection.execute_batch(
            "CREATE TABLE IF NOT EXISTS idem_outbox_keys (
                 topic          TEXT    NOT NULL,
                 key            TEXT    NOT NULL,
                 enqueued_seq   INTEGER NOT NULL,
                 published_seq  INTEGER NOT NULL DEFAULT 0,
                 attempts       INTEGER NOT NULL DEFAULT 0,
                 retry_at_ms    INTEGER,
                 tried_at_ms    INTEGER,
                 last_error     TEXT,
                 parked_at_ms   INTEGER,
                 claimed_until_ms INTEGER,
                 claim_token    INTEGER,
                 PRIMARY KEY (topic, key));
             CREATE INDEX IF NOT EXISTS idem_outbox_keys_due
                 ON idem_outbox_keys (tried_at_ms)
                 WHERE published_seq < enqueued_seq AND parked_at_ms IS NULL;
             CREATE TABLE IF NOT EXISTS idem_outbox (
                 id              INTEGER PRIMARY KEY AUTOINCREMENT,
                 topic           TEXT    NOT NULL,
                 key             TEXT    NOT NULL,
                 seq             INTEGER NOT NULL,
                 payload         BLOB    NOT NULL,
                 headers         TEXT    NOT NULL,
                 created_at_ms   INTEGER NOT NULL,
                 sent_at_ms      INTEGER,
                 discarded_at_ms INTEGER,
                 UNIQUE (topic, key, seq));",
        )?;
        Ok(())
    }

    /// Enqueues `event` in the caller's transaction and returns its id. Begin the transaction
    /// with [`TransactionBehavior::Immediate`] (as for any SQLite transaction that writes after
    /// reading): SQLite serialises writers, so same-key events are numbered in commit order.
    pub fn enqueue(transaction: &Transaction<'_>, event: Event<'_>) -> Result<i64> {
        check_event(&event)?;
        let seq: i64 = transaction
            .prepare_cached(
                "INSERT INTO idem_outbox_keys (topic, key, enqueued_seq) VALUES (?1, ?2, 1)
                 ON CONFLICT (topic, key) DO UPDATE SET enqueued_seq = enqueued_seq + 1
                 RETURNING enqueued_seq",
            )?
            .query_row(params![event.topic, event.key], |row| row.get(0))?;
        let span = crate::trace::producer_span(&event);
        let context = crate::trace::context_for(&span, &event);
        let headers = headers_json(&crate::trace::flat_headers(&event, &context));
        let id = transaction
            .prepare_cached(
                "INSERT INTO idem_outbox (topic, key, seq, payload, headers, created_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) RETURNING id",
            )?
            .query_row(
                params![event.topic, event.key, seq, event.payload, headers, now_millis()],
                |row| row.get(0),
            )?;
        Ok(id)
    }

    /// Deletes at most `batch` events sent (or discarded) more than `older_than` ago, then at
    /// most `batch` key rows idle as long with no event left; returns how many of each.
    pub fn purge_sent(
        connection: &Connection,
        older_than: Duration,
        batch: i64,
    ) -> Result<(usize, usize)> {
        let cutoff = now_millis() - older_than.as_millis() as i64;
        let events = connection.execute(
            "DELETE FROM idem_outbox WHERE id IN (
                 SELECT id FROM idem_outbox
                 WHERE coalesce(sent_at_ms, discarded_at_ms) < ?1 ORDER BY id LIMIT ?2)",
            params![cutoff, batch],
        )?;
        let keys = connection.execute(
            "DELETE FROM idem_outbox_keys WHERE rowid IN (
                 SELECT k.rowid FROM idem_outbox_keys k
                 WHERE k.published_seq = k.enqueued_seq AND coalesce(k.tried_at_ms, 0) < ?1
                   AND NOT EXISTS (SELECT 1 FROM idem_outbox e
                                   WHERE e.topic = k.topic AND e.key = k.key)
                 LIMIT ?2)",
            params![cutoff, batch],
        )?;
        Ok((events, keys))
    }

    /// How much is waiting; see [`crate::postgres::Outbox::stats`].
    pub fn stats(connection: &Connection) -> Result<OutboxStats> {
        let now = now_millis();
        Ok(connection.query_row(
            "SELECT coalesce(sum(enqueued_seq - published_seq), 0),
                    count(*) FILTER (WHERE published_seq < enqueued_seq),
                    count(*) FILTER (WHERE parked_at_ms IS NOT NULL),
                    (SELECT ?1 - created_at_ms FROM idem_outbox
                      WHERE sent_at_ms IS NULL AND discarded_at_ms IS NULL ORDER BY id LIMIT 1)
             FROM idem_outbox_keys",
            [now],
            |row| {
                Ok(OutboxStats {
                    pending_events: row.get(0)?,
                    pending_keys: row.get(1)?,
                    parked_keys: row.get(2)?,
                    oldest_pending: row.get::<_, Option<i64>>(3)?.map(millis),
                })
            },
        )?)
    }

    /// Keys with events waiting (or only parked ones); see [`crate::postgres::Outbox::keys`].
    pub fn keys(connection: &Connection, parked_only: bool, limit: i64) -> Result<Vec<KeyState>> {
        let sql = format!(
            "{KEY_STATE} WHERE k.published_seq < k.enqueued_seq {}
             ORDER BY k.parked_at_ms IS NULL, head.created_at_ms LIMIT ?2",
            if parked_only { "AND k.parked_at_ms IS NOT NULL" } else { "" }
        );
        let mut statement = connection.prepare(&sql)?;
        let rows = statement.query_map(params![now_millis(), limit.clamp(1, 10_000)], key_state)?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    /// One key and its waiting events; see [`crate::postgres::Outbox::key`].
    pub fn key(
        connection: &Connection,
        topic: &str,
        key: &str,
        limit: i64,
    ) -> Result<Option<(KeyState, Vec<PendingEvent>)>> {
        let now = now_millis();
        let Some(state) = connection
            .query_row(
                &format!("{KEY_STATE} WHERE k.topic = ?2 AND k.key = ?3"),
                params![now, topic, key],
                key_state,
            )
            .optional()?
        else {
            return Ok(None);
        };
        let mut statement = connection.prepare(
            "SELECT id, seq, ?1 - created_at_ms, length(payload), headers FROM idem_outbox
             WHERE topic = ?2 AND key = ?3 AND seq > ?4 AND discarded_at_ms IS NULL
             ORDER BY seq LIMIT ?5",
        )?;
        let events = statement
            .query_map(
                params![now, topic, key, state.published_seq, limit.clamp(1, 10_000)],
                |row| {
                    Ok(PendingEvent {
                        id: row.get(0)?,
                        seq: row.get(1)?,
                        age: millis(row.get(2)?),
                        payload_bytes: row.get::<_, i64>(3)? as usize,
                        headers: parse_headers(&row.get::<_, String>(4)?),
                    })
                },
            )?
            .collect::<std::result::Result<_, _>>()?;
        Ok(Some((state, events)))
    }

    /// Puts a key back in rotation at once; see [`crate::postgres::Outbox::retry`].
    pub fn retry(connection: &Connection, topic: &str, key: &str) -> Result<bool> {
        Ok(connection.execute(
            "UPDATE idem_outbox_keys
             SET attempts = 0, retry_at_ms = NULL, parked_at_ms = NULL, last_error = NULL
             WHERE topic = ?1 AND key = ?2",
            params![topic, key],
        )? == 1)
    }

    /// Gives up on a key's next event; see [`crate::postgres::Outbox::discard_next`]. Refused
    /// while a relay holds the key's lease (it may be publishing that event): a parked key is
    /// never claimed, so discarding a parked key always goes through.
    pub fn discard_next(
        connection: &mut Connection,
        topic: &str,
        key: &str,
    ) -> Result<Option<i64>> {
        let now = now_millis();
        let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let head: Option<(i64, i64)> = transaction
            .query_row(
                "SELECT e.id, e.seq FROM idem_outbox_keys k
                 JOIN idem_outbox e ON e.topic = k.topic AND e.key = k.key
                                   AND e.seq = k.published_seq + 1
                 WHERE k.topic = ?1 AND k.key = ?2 AND k.published_seq < k.enqueued_seq",
                params![topic, key],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        let Some((id, seq)) = head else { return Ok(None) };
        // A relay holding the key may be publishing this very event: wait for its round to end
        // (the lease) rather than pull the key from under it.
        let claimed: Option<i64> = transaction
            .query_row(
                "SELECT claimed_until_ms FROM idem_outbox_keys
                 WHERE topic = ?1 AND key = ?2 AND claimed_until_ms > ?3",
                params![topic, key, now],
                |row| row.get(0),
            )
            .optional()?;
        if let Some(until) = claimed {
            return Err(Error::Config(format!(
                "a relay is publishing this key right now (its lease ends in {} ms); try again then",
                until - now
            )));
        }
        transaction.execute(
            "UPDATE idem_outbox SET discarded_at_ms = ?2 WHERE id = ?1",
            params![id, now],
        )?;
        transaction.execute(
            "UPDATE idem_outbox_keys
             SET published_seq = ?3, attempts = 0, retry_at_ms = NULL, parked_at_ms = NULL,
                 last_error = NULL
             WHERE topic = ?1 AND key = ?2",
            params![topic, key, seq],
        )?;
        transaction.commit()?;
        Ok(Some(id))
    }
}

fn millis(ms: i64) -> Duration {
    Duration::from_millis(ms.max(0) as u64)
}

const KEY_STATE: &str = "SELECT k.topic, k.key, k.enqueued_seq, k.published_seq, k.attempts,
        k.last_error, k.retry_at_ms - ?1, ?1 - k.parked_at_ms, head.id, ?1 - head.created_at_ms
    FROM idem_outbox_keys k
    LEFT JOIN idem_outbox head
      ON head.topic = k.topic AND head.key = k.key AND head.seq = k.published_seq + 1";

fn key_state(row: &rusqlite::Row<'_>) -> rusqlite::Result<KeyState> {
    let positive = |ms: Option<i64>| ms.filter(|ms| *ms > 0).map(millis);
    Ok(KeyState {
        topic: row.get(0)?,
        key: row.get(1)?,
        enqueued_seq: row.get(2)?,
        published_seq: row.get(3)?,
        attempts: row.get(4)?,
        last_error: row.get(5)?,
        retry_in: positive(row.get(6)?),
        parked_for: row.get::<_, Option<i64>>(7)?.map(millis),
        next_id: row.get(8)?,
        next_age: positive(row.get(9)?),
    })
}

/// Headers as a JSON array of strings, name and value in turn (readable in the `sqlite3`
/// shell).
fn headers_json(flat: &[&str]) -> String {
    serde_json::Value::from(flat.to_vec()).to_string()
}

fn parse_headers(json: &str) -> Vec<(String, String)> {
    let flat: Vec<String> = serde_json::from_str(json).unwrap_or_default();
    flat.chunks(2).map(|pair| (pair[0].clone(), pair.get(1).cloned().unwrap_or_default())).collect()
}

/// Publishes pending outbox events from a SQLite database. Several relays (processes on the
/// file's host) may run at once: a round claims up to `max_keys` due keys (least recently
/// tried first, not parked, not backing off, not claimed by a live lease) by writing a lease of
/// `stall_timeout` and a token on each, in one short write transaction; publishes their events
/// in layers outside any transaction, stopping once half the lease has passed; and marks what
/// it published in a second short transaction, only on keys still carrying its token.
pub struct Relay<P> {
    publisher: P,
    config: RelayConfig,
    connection: Arc<Mutex<Connection>>,
}

impl<P> std::fmt::Debug for Relay<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").field("config", &self.config).finish_non_exhaustive()
    }
}

/// The claimed keys of a round, and the token that proves the claim.
struct Claim {
    token: i64,
    events: Vec<OutboxMessage>,
    /// After this, the lease may be gone: publish no further layer.
    publish_until: Instant,
}

impl<P: Publisher> Relay<P> {
    /// A relay on the database file at `path` (its own connection; a 5 s busy timeout).
    pub fn open(path: &std::path::Path, publisher: P, config: RelayConfig) -> Result<Self> {
        let connection = Connection::open(path)?;
        connection.busy_timeout(Duration::from_secs(5))?;
        Ok(Self { publisher, config, connection: Arc::new(Mutex::new(connection)) })
    }

    /// Runs `work` on the relay's connection, off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let connection = Arc::clone(&self.connection);
        tokio::task::spawn_blocking(move || {
            let mut connection = connection.lock().unwrap_or_else(|poison| poison.into_inner());
            work(&mut connection)
        })
        .await
        .map_err(|error| Error::Config(format!("the SQLite task failed: {error}")))?
    }

    /// One round; see the type's docs.
    pub async fn run_once(&self) -> Result<RoundReport> {
        let config = self.config;
        let token = i64::from_ne_bytes(rand_token());
        let claim = self.blocking(move |connection| claim(connection, &config, token)).await?;
        let mut report = RoundReport::default();
        if claim.events.is_empty() {
            return Ok(report);
        }
        let queues = crate::layers::queues_by_key(claim.events);
        report.keys = queues.len();
        // Past half the lease, no further layer: what was published is marked, the rest waits
        // for the next round (the lease still covers the marking).
        let publish_until = claim.publish_until;
        let published = crate::layers::publish_in_layers(&self.publisher, queues, || async move {
            Ok::<_, Error>(Instant::now() < publish_until)
        })
        .await?;
        report.published = published.ids.len();
        report.failed = published.failed;
        let claim_token = claim.token;
        report.parked = self
            .blocking(move |connection| mark(connection, &config, claim_token, &published))
            .await?;
        Ok(report)
    }

    /// Rounds until one finds nothing to publish (at most `max_rounds`); the total published.
    pub async fn run_until_idle(&self, max_rounds: usize) -> Result<usize> {
        let mut total = 0;
        for _ in 0..max_rounds {
            let report = self.run_once().await?;
            total += report.published;
            if report.keys == 0 {
                break;
            }
        }
        Ok(total)
    }

    /// Runs until `shutdown` resolves: publishes until idle every `poll_interval`, deletes
    /// events sent longer ago than `retention` (if set) every minute, and backs off after
    /// errors (a locked or unreadable database). A round in progress is finished first.
    pub async fn run(
        &self,
        poll_interval: Duration,
        retention: Option<Duration>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<()> {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut backoff = Duration::from_millis(100);
        let mut last_purge = Instant::now();
        loop {
            match self.run_until_idle(1_000).await {
                Ok(_) => backoff = Duration::from_millis(100),
                Err(error) => {
                    tracing::warn!(%error, ?backoff, "relay round failed; retrying");
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
            if let Some(older_than) = retention
                && last_purge.elapsed() >= Duration::from_secs(60)
            {
                last_purge = Instant::now();
                for _ in 0..100 {
                    let purged =
                        self.blocking(move |c| Outbox::purge_sent(c, older_than, 10_000)).await;
                    match purged {
                        Ok((0, 0)) => break,
                        Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                        Err(error) => {
                            tracing::warn!(%error, "outbox retention failed; next time");
                            break;
                        }
                    }
                }
            }
            tokio::select! {
                () = &mut shutdown => return Ok(()),
                () = tokio::time::sleep(poll_interval.max(backoff)) => {}
            }
        }
    }
}

fn rand_token() -> [u8; 8] {
    // Unique enough to tell one round's claim from another's: time and a counter.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let count = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_nanos());
    ((nanos as u64) ^ (u64::from(std::process::id()) << 40) ^ count.rotate_left(17)).to_ne_bytes()
}

/// Claims due keys and reads their events, in one write transaction.
fn claim(connection: &mut Connection, config: &RelayConfig, token: i64) -> Result<Claim> {
    // Measured before the write lock is waited for: the round's own deadline is never later
    // than the lease written below.
    let started = Instant::now();
    let lease = config.stall_timeout.as_millis() as i64;
    let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let now = now_millis();
    let keys: Vec<(String, String, i64)> = {
        let mut statement = transaction.prepare_cached(
            "SELECT topic, key, published_seq FROM idem_outbox_keys
             WHERE published_seq < enqueued_seq AND parked_at_ms IS NULL
               AND (retry_at_ms IS NULL OR retry_at_ms <= ?1)
               AND (claimed_until_ms IS NULL OR claimed_until_ms <= ?1)
             ORDER BY tried_at_ms NULLS FIRST LIMIT ?2",
        )?;
        let rows = statement.query_map(params![now, config.max_keys], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })?;
        rows.collect::<std::result::Result<_, _>>()?
    };
    let mut events = Vec::new();
    for (topic, key, published_seq) in &keys {
        transaction
            .prepare_cached(
                "UPDATE idem_outbox_keys SET claimed_until_ms = ?3, claim_token = ?4
                 WHERE topic = ?1 AND key = ?2",
            )?
            .execute(params![topic, key, now + lease, token])?;
        let mut statement = transaction.prepare_cached(
            "SELECT id, seq, payload, headers FROM idem_outbox
             WHERE topic = ?1 AND key = ?2 AND seq > ?3 AND discarded_at_ms IS NULL
             ORDER BY seq LIMIT ?4",
        )?;
        let rows = statement.query_map(
            params![topic, key, published_seq, config.max_events_per_key],
            |row| {
                Ok(OutboxMessage {
                    id: row.get(0)?,
                    topic: topic.clone(),
                    key: key.clone(),
                    seq: row.get(1)?,
                    payload: bytes::Bytes::from(row.get::<_, Vec<u8>>(2)?),
                    headers: parse_headers(&row.get::<_, String>(3)?),
                })
            },
        )?;
        for row in rows {
            events.push(row?);
        }
    }
    transaction.commit()?;
    Ok(Claim { token, events, publish_until: started + config.stall_timeout / 2 })
}

/// Marks a round's outcome on the keys still carrying its token; returns the keys parked.
fn mark(
    connection: &mut Connection,
    config: &RelayConfig,
    token: i64,
    published: &crate::layers::Published,
) -> Result<usize> {
    let now = now_millis();
    let backoff = config.retry_backoff.as_millis().max(1) as i64;
    let max_backoff = config.max_retry_backoff.as_millis().max(1) as i64;
    let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut parked = 0;
    for outcome in &published.keys {
        let changed = transaction
            .prepare_cached(
                // As PostgreSQL's relay: failures in a row of the same event count (a key
                // that moved on starts again; a full broker never counts).
                "UPDATE idem_outbox_keys SET
                     published_seq = max(published_seq, ?3),
                     tried_at_ms = ?5,
                     attempts = CASE WHEN ?4 IS NULL THEN 0
                                     WHEN ?3 > published_seq AND ?10 THEN 0
                                     WHEN ?3 > published_seq THEN 1
                                     WHEN ?10 THEN attempts
                                     ELSE attempts + 1 END,
                     last_error = ?4,
                     retry_at_ms = CASE WHEN ?4 IS NULL THEN NULL
                         ELSE ?5 + min(?6 * (1 << min(max(CASE WHEN ?3 > published_seq THEN 0
                                                              WHEN ?10 THEN attempts - 1
                                                              ELSE attempts END, 0), 30)), ?7) END,
                     parked_at_ms = CASE WHEN ?4 IS NOT NULL AND NOT ?10
                                          AND (CASE WHEN ?3 > published_seq THEN 1
                                                    ELSE attempts + 1 END) >= ?8
                                    THEN ?5 END,
                     claimed_until_ms = NULL, claim_token = NULL
                 WHERE topic = ?1 AND key = ?2 AND claim_token = ?9
                 RETURNING parked_at_ms IS NOT NULL",
            )?
            .query_row(
                params![
                    outcome.topic,
                    outcome.key,
                    outcome.published_seq,
                    outcome.error,
                    now,
                    backoff,
                    max_backoff,
                    config.max_attempts.max(1),
                    token,
                    outcome.full
                ],
                |row| row.get::<_, bool>(0),
            )
            .optional()?;
        match changed {
            // Lost the claim (the lease ran out and another relay took the key): mark nothing
            // of it; the other relay republishes with the same ids.
            None => continue,
            Some(true) => parked += 1,
            Some(false) => {}
        }
        transaction
            .prepare_cached(
                "UPDATE idem_outbox SET sent_at_ms = ?4
                 WHERE topic = ?1 AND key = ?2 AND seq <= ?3 AND sent_at_ms IS NULL
                   AND discarded_at_ms IS NULL",
            )?
            .execute(params![outcome.topic, outcome.key, outcome.published_seq, now])?;
    }
    transaction.commit()?;
    if parked > 0 {
        metrics::counter!("idem_outbox_parked_total").increment(parked as u64);
        tracing::error!(parked, "outbox keys parked after repeated publish failures");
    }
    Ok(parked)
}
