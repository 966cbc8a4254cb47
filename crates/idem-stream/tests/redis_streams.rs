//! The Redis Streams adapter against the real Redis and PostgreSQL: the outbox relay publishes
//! with XADD, events are republished on purpose (Redis Streams keep duplicates), two consumers
//! in one group drop acks so entries are reclaimed, and the inbox keeps every payment at
//! exactly one application.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::DroppingAcks;
use idem_core::conformance::service_url;
use idem_stream::consume::{self, Received, RunnerConfig};
use idem_stream::postgres::{DeadLetters, Event, Inbox, Outbox, Relay, RelayConfig};
use idem_stream::publish::Publisher;
use idem_stream::redis_streams::{RedisStreamsPublisher, RedisStreamsSubscription};
use tokio_postgres::NoTls;

const PAYMENTS: usize = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redelivered_and_republished_entries_apply_once() {
    let Some(redis_url) = service_url("IDEM_TEST_REDIS_URL") else { return };
    let Some((mut client, database)) = common::ledger_database("idem_redis_streams").await else {
        return;
    };

    let redis_client = redis::Client::open(redis_url.as_str()).unwrap();
    let redis = redis_client.get_connection_manager().await.unwrap();
    let stream_key = format!("idemtest.rs.{}", std::process::id());
    let _: () = redis::cmd("DEL").arg(&stream_key).query_async(&mut redis.clone()).await.unwrap();

    for index in 0..PAYMENTS {
        let transaction = client.transaction().await.unwrap();
        let key = format!("acct-{}", index % 10);
        let payload = (index as i64 + 1).to_string();
        let event =
            Event { topic: &stream_key, key: &key, payload: payload.as_bytes(), headers: &[] };
        Outbox::enqueue(&transaction, event).await.unwrap();
        transaction.commit().await.unwrap();
    }
    let publisher = RedisStreamsPublisher::new(redis.clone(), 100_000);
    let relay = Relay::new(publisher.clone(), RelayConfig::default());
    assert_eq!(relay.run_until_idle(&mut client, 100).await.unwrap(), PAYMENTS);

    // Each key's entries are in order on the stream.
    let entries: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(&stream_key)
        .arg("-")
        .arg("+")
        .query_async(&mut redis.clone())
        .await
        .unwrap();
    let mut last_seq: HashMap<String, i64> = HashMap::new();
    for entry in &entries.ids {
        let field = |name: &str| match entry.map.get(name) {
            Some(redis::Value::BulkString(bytes)) => String::from_utf8_lossy(bytes).into_owned(),
            other => panic!("field {name}: {other:?}"),
        };
        let seq: i64 = field("seq").parse().unwrap();
        let previous = last_seq.insert(field("key"), seq).unwrap_or(0);
        assert_eq!(seq, previous + 1, "per-key order on the stream");
    }

    // A relay that died before marking sent republishes: Redis keeps the second copies.
    let rows = client
        .query("SELECT id, key, seq, payload FROM idem_outbox ORDER BY id LIMIT 100", &[])
        .await
        .unwrap();
    let again: Vec<_> = rows
        .iter()
        .map(|row| idem_stream::publish::OutboxMessage {
            id: row.get(0),
            topic: stream_key.clone(),
            key: row.get(1),
            seq: row.get(2),
            payload: bytes::Bytes::from(row.get::<_, Vec<u8>>(3)),
            headers: Vec::new(),
        })
        .collect();
    for message in &again {
        publisher
            .publish(std::slice::from_ref(message))
            .await
            .into_iter()
            .for_each(|result| result.unwrap());
    }
    let length: usize =
        redis::cmd("XLEN").arg(&stream_key).query_async(&mut redis.clone()).await.unwrap();
    assert_eq!(length, PAYMENTS + 100, "Redis Streams keep duplicates: the inbox must absorb them");

    let pool = deadpool_postgres::Pool::builder(deadpool_postgres::Manager::new(
        database.parse().unwrap(),
        NoTls,
    ))
    .max_size(8)
    .build()
    .unwrap();
    let inbox = Inbox::new("ledger").unwrap();
    let dead_letters = Arc::new(DeadLetters::new(pool.clone(), "ledger").unwrap());
    let handler = move |message: Received| {
        let (pool, inbox) = (pool.clone(), inbox.clone());
        async move {
            let cents: i64 =
                String::from_utf8_lossy(&message.payload).parse().map_err(|_| "bad amount")?;
            let mut client = pool.get().await.map_err(|e| e.to_string())?;
            common::credit(&mut client, &inbox, &message.id, cents)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        }
    };
    let config = RunnerConfig {
        concurrency: 8,
        fetch_wait: Duration::from_millis(100),
        ..RunnerConfig::default()
    };
    let dropped = Arc::new(Mutex::new(0));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    // Join (creating the group) before anything watches it.
    let mut subscriptions = Vec::new();
    for name in ["c1", "c2"] {
        let joined = RedisStreamsSubscription::join(
            &redis_client,
            &stream_key,
            "ledger",
            name,
            Duration::from_millis(300),
        );
        subscriptions.push(joined.await.unwrap());
    }
    let consumers: Vec<_> = subscriptions
        .into_iter()
        .map(|inner| {
            let handler = handler.clone();
            let (dead_letters, dropped, mut stopped) =
                (Arc::clone(&dead_letters), Arc::clone(&dropped), stopped.clone());
            tokio::spawn(async move {
                let shutdown = async move {
                    let _ = stopped.wait_for(|stop| *stop).await;
                };
                consume::run(
                    DroppingAcks { inner, dropped },
                    handler,
                    dead_letters,
                    config,
                    shutdown,
                )
                .await
            })
        })
        .collect();

    let started = Instant::now();
    loop {
        let pending: redis::streams::StreamPendingReply = redis::cmd("XPENDING")
            .arg(&stream_key)
            .arg("ledger")
            .query_async(&mut redis.clone())
            .await
            .unwrap();
        let applied: i64 =
            client.query_one("SELECT count(*) FROM applied", &[]).await.unwrap().get(0);
        let read: usize = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&stream_key)
            .query_async::<Vec<HashMap<String, redis::Value>>>(&mut redis.clone())
            .await
            .unwrap()
            .first()
            .and_then(|group| match group.get("entries-read") {
                Some(redis::Value::Int(read)) => Some(*read as usize),
                _ => None,
            })
            .unwrap_or(0);
        if applied as usize == PAYMENTS && pending.count() == 0 && read == PAYMENTS + 100 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "stuck: {applied} applied, {} pending",
            pending.count()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.send(true).unwrap();
    let mut handled = 0;
    for consumer in consumers {
        let report = consumer.await.unwrap();
        // A copy that arrived while its first was still waiting is settled with it.
        handled += report.handled + report.copies;
    }
    let row = client
        .query_one("SELECT (SELECT cents FROM ledger WHERE id = 1), count(*), count(DISTINCT message_id) FROM applied", &[])
        .await
        .unwrap();
    let (cents, applied, distinct): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    let dropped = *dropped.lock().unwrap();
    assert_eq!(
        (applied, distinct),
        (PAYMENTS as i64, PAYMENTS as i64),
        "each payment applied once"
    );
    assert_eq!(cents, (1..=PAYMENTS as i64).sum::<i64>());
    assert!(dropped > 10, "acks were dropped on purpose ({dropped})");
    assert!(
        handled as usize >= PAYMENTS + 100 + dropped,
        "every entry and every reclaimed one was handled (or settled with its first copy)"
    );
    let _: () = redis::cmd("DEL").arg(&stream_key).query_async(&mut redis.clone()).await.unwrap();
    println!(
        "redis streams: {} entries ({PAYMENTS} + 100 republished), {dropped} acks dropped and reclaimed, {handled} handled; \
         {applied} applied once each, balance {cents}, nothing pending",
        PAYMENTS + 100
    );
}

/// Trimming never drops what a consumer group has not read: with one group reading everything
/// and another lagging, the stream stops taking entries at its bound (the publisher says why,
/// the relay would keep the events pending) instead of trimming unread ones; once the slow
/// group catches up, acknowledged entries are trimmed and publishing resumes. Both groups get
/// every event. (`XADD MAXLEN ~` dropped the slow group's unread entries silently.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_group_loses_nothing_to_trimming() {
    use idem_stream::consume::{Settle, Subscription};
    use idem_stream::publish::OutboxMessage;
    let Some(redis_url) = service_url("IDEM_TEST_REDIS_URL") else { return };
    let client = redis::Client::open(redis_url.as_str()).unwrap();
    let redis = client.get_connection_manager().await.unwrap();
    let stream = format!("idemtest.rs.lagging.{}", std::process::id());
    let _: () = redis::cmd("DEL").arg(&stream).query_async(&mut redis.clone()).await.unwrap();
    let join = |group: &'static str| {
        RedisStreamsSubscription::join(&client, &stream, group, "only", Duration::from_secs(30))
    };
    let (mut fast, mut slow) = (join("fast").await.unwrap(), join("slow").await.unwrap());
    let publisher = RedisStreamsPublisher::new(redis.clone(), 100);
    let message = |id: i64| OutboxMessage {
        id,
        topic: stream.clone(),
        key: format!("k{id}"),
        seq: 1,
        payload: bytes::Bytes::from(id.to_string()),
        headers: Vec::new(),
    };
    async fn read_all(subscription: &mut RedisStreamsSubscription, into: &mut Vec<String>) {
        loop {
            let batch = subscription.fetch(50, Duration::from_millis(50)).await.unwrap();
            if batch.is_empty() {
                return;
            }
            for (received, token) in batch {
                into.push(received.id);
                subscription.settle(token, Settle::Ack).await.unwrap();
            }
        }
    }
    let xlen = || {
        let mut redis = redis.clone();
        let stream = stream.clone();
        async move { redis::cmd("XLEN").arg(&stream).query_async::<u64>(&mut redis).await.unwrap() }
    };

    let (mut published, mut refused) = (Vec::new(), Vec::new());
    for id in 1..=150 {
        match publisher.publish(&[message(id)]).await.remove(0) {
            Ok(()) => published.push(id),
            Err(error) => refused.push((id, error.source.to_string())),
        }
    }
    assert_eq!(published.len(), 100, "the bound: {refused:?}");
    assert!(refused[0].1.contains("not yet acknowledged by every consumer group"), "{refused:?}");
    let (mut fast_seen, mut slow_seen) = (Vec::new(), Vec::new());
    read_all(&mut fast, &mut fast_seen).await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert!(publisher.publish(&[message(101)]).await[0].is_err(), "the slow group still lags");
    assert_eq!(xlen().await, 100, "nothing the slow group has not read was trimmed");

    read_all(&mut slow, &mut slow_seen).await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    for id in 101..=150 {
        publisher.publish(&[message(id)]).await.remove(0).unwrap();
    }
    assert!(xlen().await <= 51, "acknowledged entries were trimmed: {}", xlen().await);
    read_all(&mut fast, &mut fast_seen).await;
    read_all(&mut slow, &mut slow_seen).await;
    let expected: Vec<String> = (1..=150).map(|id| format!("idem-outbox-{id}")).collect();
    assert_eq!(fast_seen, expected, "the fast group got every event, in order");
    assert_eq!(slow_seen, expected, "the slow group got every event, in order");
    let _: () = redis::cmd("DEL").arg(&stream).query_async(&mut redis.clone()).await.unwrap();
}

/// The relay facing a Redis stream at its bound (a group lags): the key backs off but is never
/// parked, however long the group lags, and its events flow again once the group catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_stream_holds_the_relay_back_without_parking_the_key() {
    use idem_stream::consume::{Settle, Subscription};
    let Some(redis_url) = service_url("IDEM_TEST_REDIS_URL") else { return };
    let Some((mut client, _)) = common::ledger_database("idem_redis_full").await else { return };
    let redis_client = redis::Client::open(redis_url.as_str()).unwrap();
    let redis = redis_client.get_connection_manager().await.unwrap();
    let stream = format!("idemtest.rs.full.{}", std::process::id());
    let _: () = redis::cmd("DEL").arg(&stream).query_async(&mut redis.clone()).await.unwrap();
    let mut group = RedisStreamsSubscription::join(
        &redis_client,
        &stream,
        "slow",
        "only",
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    for index in 0..20 {
        let transaction = client.transaction().await.unwrap();
        let payload = index.to_string();
        let event = Event { topic: &stream, key: "k", payload: payload.as_bytes(), headers: &[] };
        Outbox::enqueue(&transaction, event).await.unwrap();
        transaction.commit().await.unwrap();
    }
    let config = RelayConfig {
        max_attempts: 2,
        retry_backoff: Duration::from_millis(20),
        max_retry_backoff: Duration::from_millis(50),
        ..RelayConfig::default()
    };
    let relay = Relay::new(RedisStreamsPublisher::new(redis.clone(), 5), config);
    for _ in 0..20 {
        relay.run_until_idle(&mut client, 10).await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let stats = Outbox::stats(&client).await.unwrap();
    assert_eq!((stats.pending_events, stats.parked_keys), (15, 0), "held back, not parked");
    let key = &Outbox::keys(&client, false, 10).await.unwrap()[0];
    assert_eq!(key.attempts, 0, "a full stream is not a failure of the event");
    assert!(key.last_error.as_deref().unwrap_or("").contains("not yet acknowledged"), "{key:?}");

    // The group catches up; trimming (at most once a second) makes room; the rest flows.
    let mut seen = Vec::new();
    let started = std::time::Instant::now();
    while seen.len() < 20 {
        assert!(started.elapsed() < Duration::from_secs(30), "stuck at {}", seen.len());
        for (received, token) in group.fetch(20, Duration::from_millis(50)).await.unwrap() {
            seen.push(String::from_utf8_lossy(&received.payload).into_owned());
            group.settle(token, Settle::Ack).await.unwrap();
        }
        relay.run_until_idle(&mut client, 10).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let expected: Vec<String> = (0..20).map(|index: i32| index.to_string()).collect();
    assert_eq!(seen, expected, "every event, in order");
    let _: () = redis::cmd("DEL").arg(&stream).query_async(&mut redis.clone()).await.unwrap();
}

/// A consumer restarted under its old name (a pod that keeps its name) first gets the entries
/// it held when it died, before newer entries of their keys: it does not wait `claim_idle`
/// for them while the newer ones pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_restarted_under_its_name_gets_what_it_held_first() {
    use idem_stream::consume::Subscription;
    let Some(redis_url) = service_url("IDEM_TEST_REDIS_URL") else { return };
    let client = redis::Client::open(redis_url.as_str()).unwrap();
    let mut redis = client.get_connection_manager().await.unwrap();
    let stream = format!("idemtest.rs.restarted.{}", std::process::id());
    let _: () = redis::cmd("DEL").arg(&stream).query_async(&mut redis).await.unwrap();
    let claim_idle = Duration::from_secs(60);
    let join = || RedisStreamsSubscription::join(&client, &stream, "g", "worker-1", claim_idle);
    let mut first = join().await.unwrap();
    for seq in 1..=2 {
        let _: String = redis::cmd("XADD")
            .arg(&stream)
            .arg("*")
            .arg("Idem-Key")
            .arg("k")
            .arg("Idem-Seq")
            .arg(seq.to_string())
            .arg("payload")
            .arg(format!("event {seq}"))
            .query_async(&mut redis)
            .await
            .unwrap();
    }
    let held = first.fetch(1, Duration::from_millis(100)).await.unwrap();
    assert_eq!(held.len(), 1);
    let held_id = held[0].1.clone();
    // It dies holding seq 1, unacknowledged; it comes back under the same name.
    drop(first);
    let mut again = join().await.unwrap();
    let fetched = again.fetch(1, Duration::from_millis(100)).await.unwrap();
    assert_eq!(fetched.len(), 1);
    assert_eq!(fetched[0].1, held_id, "what it held comes first, not the newer entry");
    assert!(fetched[0].0.attempt >= 2, "and counts as a redelivery");
    // A message that kills its consumer every time is counted up each time, so that it
    // reaches the runner's `max_attempts` and is dead-lettered instead of looping for ever.
    drop(again);
    let mut third = join().await.unwrap();
    let refetched = third.fetch(1, Duration::from_millis(100)).await.unwrap();
    assert_eq!(refetched[0].1, held_id);
    assert!(refetched[0].0.attempt > fetched[0].0.attempt, "{refetched:?} after {fetched:?}");
    let mut again = third;
    let next = again.fetch(1, Duration::from_millis(100)).await.unwrap();
    assert_eq!(next.len(), 1);
    assert_ne!(next[0].1, held_id, "then the newer entry");
    let _: () = redis::cmd("DEL").arg(&stream).query_async(&mut redis).await.unwrap();
}
