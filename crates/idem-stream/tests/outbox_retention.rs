//! Retention at 10^6 rows, outbox and inbox. Outbox: a million events sent eight days ago on
//! 10,000 keys, beside recent ones and old ones still waiting. `Outbox::purge_sent` deletes exactly the old sent
//! events and the key rows left with nothing, in bounded batches, while a producer keeps
//! enqueueing: its latency during the cleanup is measured beside its latency before.

use std::time::{Duration, Instant};

use idem_core::conformance::fresh_postgres_schema;
use idem_stream::postgres::{Event, Outbox};
use tokio_postgres::NoTls;

const OLD_SENT: i64 = 1_000_000;
const OLD_KEYS: i64 = 10_000;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Enqueues one event per transaction until `stop` is set, returning each commit's latency.
async fn produce(database: String, stop: tokio::sync::watch::Receiver<bool>) -> Vec<Duration> {
    let (mut client, connection) = tokio_postgres::connect(&database, NoTls).await.unwrap();
    tokio::spawn(connection);
    let mut latencies = Vec::new();
    let mut index = 0;
    while !*stop.borrow() {
        index += 1;
        let started = Instant::now();
        let transaction = client.transaction().await.unwrap();
        let key = format!("live-{}", index % 50);
        let event = Event { topic: "live", key: &key, payload: b"x", headers: &[] };
        Outbox::enqueue(&transaction, event).await.unwrap();
        transaction.commit().await.unwrap();
        latencies.push(started.elapsed());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    latencies.sort();
    latencies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_million_sent_events_are_deleted_in_batches_without_holding_up_producers() {
    let Some(database) = fresh_postgres_schema("idem_outbox_retention").await else { return };
    let (mut client, connection) = tokio_postgres::connect(&database, NoTls).await.unwrap();
    tokio::spawn(connection);
    Outbox::migrate(&mut client).await.unwrap();
    client
        .batch_execute(&format!(
            "INSERT INTO idem_outbox (topic, key, seq, payload, headers, created_at, sent_at)
             SELECT 'old', 'k' || (i % {OLD_KEYS}), i / {OLD_KEYS} + 1, '\\x00', '{{}}',
                    now() - interval '8 days', now() - interval '8 days'
             FROM generate_series(0, {OLD_SENT} - 1) AS i;
             INSERT INTO idem_outbox_keys (topic, key, enqueued_seq, published_seq, tried_at)
             SELECT 'old', 'k' || i, {OLD_SENT} / {OLD_KEYS}, {OLD_SENT} / {OLD_KEYS},
                    now() - interval '8 days'
             FROM generate_series(0, {OLD_KEYS} - 1) AS i;
             -- Old but still waiting: a key parked eight days ago, never to be lost.
             INSERT INTO idem_outbox (topic, key, seq, payload, headers, created_at)
             SELECT 'stuck', 'p', i, '\\x00', '{{}}', now() - interval '8 days'
             FROM generate_series(1, 10) AS i;
             INSERT INTO idem_outbox_keys (topic, key, enqueued_seq, published_seq, parked_at)
             VALUES ('stuck', 'p', 10, 0, now() - interval '8 days');
             -- Sent an hour ago: inside the retention period.
             INSERT INTO idem_outbox (topic, key, seq, payload, headers, created_at, sent_at)
             SELECT 'recent', 'r', i, '\\x00', '{{}}', now() - interval '1 hour',
                    now() - interval '1 hour'
             FROM generate_series(1, 1000) AS i;
             INSERT INTO idem_outbox_keys (topic, key, enqueued_seq, published_seq, tried_at)
             VALUES ('recent', 'r', 1000, 1000, now() - interval '1 hour');
             ANALYZE idem_outbox; ANALYZE idem_outbox_keys;"
        ))
        .await
        .unwrap();

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let before = tokio::spawn(produce(database.clone(), stopped.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.send(true).unwrap();
    let before = before.await.unwrap();

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let during = tokio::spawn(produce(database.clone(), stopped));
    let started = Instant::now();
    let mut total = idem_stream::postgres::PurgeReport::default();
    // As the relay's retention task does: cycles of bounded batches until nothing is left.
    loop {
        let report = Outbox::purge_sent(
            &client,
            Duration::from_secs(7 * 24 * 3600),
            10_000,
            100,
            Duration::from_millis(20),
        )
        .await
        .unwrap();
        total.events += report.events;
        total.keys += report.keys;
        total.batches += report.batches;
        if report.events == 0 && report.keys == 0 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(300), "not done: {total:?}");
    }
    let cleanup = started.elapsed();
    stop.send(true).unwrap();
    let during = during.await.unwrap();

    assert_eq!(total.events, OLD_SENT as u64, "{total:?}");
    assert_eq!(total.keys, OLD_KEYS as u64, "{total:?}");
    let count = |sql: &'static str| {
        let client = &client;
        async move { client.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    assert_eq!(count("SELECT count(*) FROM idem_outbox WHERE topic = 'old'").await, 0);
    assert_eq!(count("SELECT count(*) FROM idem_outbox WHERE topic = 'stuck'").await, 10);
    assert_eq!(count("SELECT count(*) FROM idem_outbox WHERE topic = 'recent'").await, 1000);
    assert_eq!(count("SELECT count(*) FROM idem_outbox_keys WHERE topic <> 'live'").await, 2);
    let live = count("SELECT count(*) FROM idem_outbox WHERE topic = 'live'").await;
    assert_eq!(live as usize, before.len() + during.len(), "every enqueue kept");
    let (p99_before, p99_during) = (percentile(&before, 0.99), percentile(&during, 0.99));
    // Not a speed figure: a cleanup that blocked producers would show as seconds.
    assert!(p99_during < Duration::from_secs(1), "producers held up: p99 {p99_during:?}");
    eprintln!(
        "retention: {} events and {} keys deleted in {} batches, {cleanup:?}; producer commits \
         p50/p99 {:?}/{p99_before:?} before ({} commits), {:?}/{p99_during:?} during ({} commits)",
        total.events,
        total.keys,
        total.batches,
        percentile(&before, 0.5),
        before.len(),
        percentile(&during, 0.5),
        during.len()
    );
}

/// An outbox made by the first version of the tables (no failure columns) is brought up to
/// date by `Outbox::migrate`, its waiting events kept and then published in order, and a
/// second migrate changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_from_the_first_version_is_migrated_with_its_waiting_events() {
    let Some(database) = fresh_postgres_schema("idem_outbox_upgrade").await else { return };
    let (mut client, connection) = tokio_postgres::connect(&database, NoTls).await.unwrap();
    tokio::spawn(connection);
    client
        .batch_execute(
            "CREATE TABLE idem_outbox_keys (
                 topic text NOT NULL, key text NOT NULL, enqueued_seq bigint NOT NULL,
                 published_seq bigint NOT NULL DEFAULT 0, PRIMARY KEY (topic, key));
             CREATE INDEX idem_outbox_keys_pending
                 ON idem_outbox_keys (topic, key) WHERE published_seq < enqueued_seq;
             CREATE TABLE idem_outbox (
                 id bigserial PRIMARY KEY, topic text NOT NULL, key text NOT NULL,
                 seq bigint NOT NULL, payload bytea NOT NULL, headers text[] NOT NULL,
                 created_at timestamptz NOT NULL DEFAULT now(), sent_at timestamptz,
                 UNIQUE (topic, key, seq));",
        )
        .await
        .unwrap();
    for payload in ["first", "second"] {
        let transaction = client.transaction().await.unwrap();
        let event = Event { topic: "t", key: "k", payload: payload.as_bytes(), headers: &[] };
        Outbox::enqueue(&transaction, event).await.unwrap();
        transaction.commit().await.unwrap();
    }
    Outbox::migrate(&mut client).await.unwrap();
    Outbox::migrate(&mut client).await.unwrap();
    let stats = Outbox::stats(&client).await.unwrap();
    assert_eq!((stats.pending_events, stats.pending_keys, stats.parked_keys), (2, 1, 0));
    let keys = Outbox::keys(&client, false, 10).await.unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!((keys[0].attempts, keys[0].published_seq, keys[0].enqueued_seq), (0, 0, 2));
    let old_index = client
        .query_one("SELECT to_regclass('idem_outbox_keys_pending') IS NULL", &[])
        .await
        .unwrap();
    assert!(old_index.get::<_, bool>(0), "the first version's index is replaced");
}

/// Inbox purging at 10^6 rows: a million ids received eight days ago, beside recent ones and
/// another consumer's old ones. `Inbox::purge` in bounded batches deletes exactly this
/// consumer's old ids while the consumer keeps recording new messages; its record latency
/// during the purge is measured beside its latency before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_million_inbox_ids_are_purged_in_batches_while_messages_keep_arriving() {
    use idem_stream::postgres::Inbox;
    let Some(database) = fresh_postgres_schema("idem_inbox_retention").await else { return };
    let (mut client, connection) = tokio_postgres::connect(&database, NoTls).await.unwrap();
    tokio::spawn(connection);
    Inbox::migrate(&mut client).await.unwrap();
    client
        .batch_execute(
            "INSERT INTO idem_inbox (consumer, message_id, received_at)
             SELECT 'ledger', 'old-' || i, now() - interval '8 days'
             FROM generate_series(1, 1000000) AS i;
             INSERT INTO idem_inbox (consumer, message_id, received_at)
             SELECT 'audit', 'old-' || i, now() - interval '8 days'
             FROM generate_series(1, 1000) AS i;
             INSERT INTO idem_inbox (consumer, message_id, received_at)
             SELECT 'ledger', 'recent-' || i, now() - interval '1 hour'
             FROM generate_series(1, 1000) AS i;
             ANALYZE idem_inbox;",
        )
        .await
        .unwrap();
    let inbox = Inbox::new("ledger").unwrap();

    /// Records new message ids, one transaction each, until stopped; each commit's latency.
    async fn record(
        database: String,
        stop: tokio::sync::watch::Receiver<bool>,
        from: usize,
    ) -> Vec<Duration> {
        let (mut client, connection) = tokio_postgres::connect(&database, NoTls).await.unwrap();
        tokio::spawn(connection);
        let inbox = Inbox::new("ledger").unwrap();
        let mut latencies = Vec::new();
        let mut index = from;
        while !*stop.borrow() {
            index += 1;
            let started = Instant::now();
            let transaction = client.transaction().await.unwrap();
            inbox.record(&transaction, &format!("new-{index}")).await.unwrap();
            transaction.commit().await.unwrap();
            latencies.push(started.elapsed());
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        latencies.sort();
        latencies
    }
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let before = tokio::spawn(record(database.clone(), stopped, 0));
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.send(true).unwrap();
    let before = before.await.unwrap();

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let during = tokio::spawn(record(database.clone(), stopped, 1_000_000));
    let started = Instant::now();
    let (mut purged, mut batches) = (0, 0);
    loop {
        let deleted =
            inbox.purge(&client, Duration::from_secs(7 * 24 * 3600), 10_000).await.unwrap();
        purged += deleted;
        batches += 1;
        if deleted == 0 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(300), "not done: {purged}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed();
    stop.send(true).unwrap();
    let during = during.await.unwrap();

    assert_eq!(purged, 1_000_000);
    let count = |sql: &'static str| {
        let client = &client;
        async move { client.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    assert_eq!(
        count(
            "SELECT count(*) FROM idem_inbox WHERE message_id LIKE 'old-%' AND consumer = 'ledger'"
        )
        .await,
        0
    );
    assert_eq!(
        count("SELECT count(*) FROM idem_inbox WHERE consumer = 'audit'").await,
        1000,
        "another consumer's ids are its own"
    );
    assert_eq!(
        count("SELECT count(*) FROM idem_inbox WHERE message_id LIKE 'recent-%'").await,
        1000
    );
    let new = count("SELECT count(*) FROM idem_inbox WHERE message_id LIKE 'new-%'").await;
    assert_eq!(new as usize, before.len() + during.len(), "every recorded id kept");
    let (p99_before, p99_during) = (percentile(&before, 0.99), percentile(&during, 0.99));
    assert!(p99_during < Duration::from_secs(1), "the consumer was held up: p99 {p99_during:?}");
    eprintln!(
        "inbox purge: {purged} ids in {batches} batches, {took:?}; record commits p50/p99 \
         {:?}/{p99_before:?} before ({} commits), {:?}/{p99_during:?} during ({} commits)",
        percentile(&before, 0.5),
        before.len(),
        percentile(&during, 0.5),
        during.len()
    );
}
