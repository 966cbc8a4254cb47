//! The consumer runner on RabbitMQ when the broker drops its connection mid-stream
//! (`rabbitmqctl close_all_connections`, as on a broker restart or a network cut): the runner
//! backs off, the subscription reconnects, the messages delivered on the lost channel and not
//! acknowledged come back, and every message is handled.

mod common;

use std::collections::HashSet;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use idem_core::conformance::service_url;
use idem_stream::consume::{self, DeadLetter, Received, RunnerConfig, Subscription};
use idem_stream::publish::{OutboxMessage, Publisher};
use idem_stream::rabbitmq::{RabbitPublisher, RabbitSubscription};

const MESSAGES: i64 = 600;

/// One test at a time: `rabbitmqctl close_all_connections` would cut the other's connections.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct NoDeadLetters;

#[async_trait::async_trait]
impl DeadLetter for NoDeadLetters {
    async fn bury(&self, message: &Received, failure: &str) -> idem_stream::Result<()> {
        panic!("nothing fails here, yet {} was buried: {failure}", message.id)
    }
}

/// An empty quorum queue named for `case` and this process, and a connection and channel.
async fn fresh_queue(url: &str, case: &str) -> (String, lapin::Connection, lapin::Channel) {
    let queue = format!("idemtest.consume.rabbit.{case}.{}", std::process::id());
    let (connection, channel) = common::fresh_rabbit_queue(url, &queue).await;
    (queue, connection, channel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runner_rides_out_a_dropped_broker_connection() {
    let Some(url) = service_url("IDEM_TEST_AMQP_URL") else { return };
    let _serial = SERIAL.lock().await;
    let (queue, connection, _channel) = fresh_queue(&url, "drop").await;
    connection.close(200, "done".into()).await.unwrap();
    let publisher = RabbitPublisher::connect(&url, "").await.unwrap();
    let messages: Vec<_> = (1..=MESSAGES)
        .map(|id| OutboxMessage {
            id,
            topic: queue.clone(),
            key: format!("k{}", id % 10),
            seq: id,
            payload: bytes::Bytes::from(id.to_string()),
            headers: Vec::new(),
        })
        .collect();
    for layer in messages.chunks(50) {
        for result in publisher.publish(layer).await {
            result.unwrap();
        }
    }

    let handled: Arc<Mutex<(HashSet<String>, usize)>> = Arc::default();
    let seen = Arc::clone(&handled);
    let handler = move |message: Received| {
        let seen = Arc::clone(&seen);
        async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let mut seen = seen.lock().unwrap();
            seen.0.insert(message.id);
            seen.1 += 1;
            consume::HandlerResult::Ok(())
        }
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let subscription = RabbitSubscription::consume(&url, &queue, 16).await.unwrap();
    let config = RunnerConfig {
        concurrency: 8,
        backoff: Duration::from_millis(100),
        fetch_wait: Duration::from_millis(200),
        ..RunnerConfig::default()
    };
    let runner =
        tokio::spawn(consume::run(subscription, handler, Arc::new(NoDeadLetters), config, async {
            let _ = stopped.await;
        }));

    let started = Instant::now();
    while handled.lock().unwrap().0.len() < MESSAGES as usize / 4 {
        assert!(started.elapsed() < Duration::from_secs(20), "the runner is not consuming");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let closed = Command::new("rabbitmqctl")
        .args(["close_all_connections", "idem test: connection dropped on purpose"])
        .output()
        .expect("run rabbitmqctl");
    let said = String::from_utf8_lossy(&closed.stdout);
    assert!(closed.status.success(), "rabbitmqctl: {}", String::from_utf8_lossy(&closed.stderr));
    // Ours are two: the publisher's and the consumer's.
    let closed_count: usize = said
        .split("Closed ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|count| count.parse().ok())
        .unwrap_or(0);
    assert!(closed_count >= 2, "the consumer's connection was closed: {said}");
    let handled_at_drop = handled.lock().unwrap().0.len();
    assert!(handled_at_drop < MESSAGES as usize, "the connection dropped mid-stream");

    while handled.lock().unwrap().0.len() < MESSAGES as usize {
        let count = handled.lock().unwrap().0.len();
        assert!(started.elapsed() < Duration::from_secs(60), "only {count} of {MESSAGES} handled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.send(()).unwrap();
    let report = runner.await.unwrap();
    let (distinct, runs) = {
        let handled = handled.lock().unwrap();
        (handled.0.len(), handled.1)
    };
    assert_eq!(distinct, MESSAGES as usize, "every message handled");
    println!(
        "RabbitMQ connection dropped after {handled_at_drop} of {MESSAGES} handled: all {distinct} handled \
         ({runs} handler runs, {} redelivered), {} failed fetches, {} failed settles",
        runs - distinct,
        report.fetch_errors,
        report.settle_errors
    );
}

/// Messages another producer published without a `message-id` still get a stable id (from their
/// content), so a redelivery or a republished copy meets the inbox under the same id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_without_a_message_id_gets_one_from_its_content() {
    let Some(url) = service_url("IDEM_TEST_AMQP_URL") else { return };
    let _serial = SERIAL.lock().await;
    let (queue, _connection, channel) = fresh_queue(&url, "noid").await;
    channel.confirm_select(Default::default()).await.unwrap();
    for (payload, message_id) in [("a", None), ("b", None), ("a", None), ("a", Some("given"))] {
        let mut properties = lapin::BasicProperties::default();
        if let Some(id) = message_id {
            properties = properties.with_message_id(id.into());
        }
        let options = Default::default();
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                options,
                payload.as_bytes(),
                properties,
            )
            .await
            .unwrap();
        assert!(confirm.await.unwrap().is_ack());
    }
    let mut subscription = RabbitSubscription::consume(&url, &queue, 16).await.unwrap();
    let mut batch = Vec::new();
    let started = Instant::now();
    while batch.len() < 4 && started.elapsed() < Duration::from_secs(10) {
        batch
            .extend(subscription.fetch(4 - batch.len(), Duration::from_millis(300)).await.unwrap());
    }
    let ids: Vec<&str> = batch.iter().map(|(message, _)| message.id.as_str()).collect();
    assert_eq!(ids.len(), 4);
    assert!(ids[0].starts_with("rabbitmq-sha256-") && ids[1].starts_with("rabbitmq-sha256-"));
    assert_eq!(ids[0], ids[2], "the same content, the same id");
    assert_ne!(ids[0], ids[1], "different content, different ids");
    assert_eq!(ids[3], "given", "a message-id is used as it is");
    for (_, token) in batch {
        subscription.settle(token, idem_stream::consume::Settle::Ack).await.unwrap();
    }
}

/// Records each burial and how many times each message ran.
#[derive(Default)]
struct Burials {
    buried: Mutex<Vec<(String, u64)>>,
}

#[async_trait::async_trait]
impl DeadLetter for Burials {
    async fn bury(&self, message: &Received, _failure: &str) -> idem_stream::Result<()> {
        self.buried.lock().unwrap().push((message.id.clone(), message.attempt));
        Ok(())
    }
}

/// A message that always fails (or whose handler panics before its first await) is
/// dead-lettered after exactly `max_attempts` runs on a classic queue as on a quorum queue,
/// and its key's next message runs after it: the runner counts its own retries (a classic queue only
/// flags a redelivery, so counting on the broker left such messages running for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_is_dead_lettered_after_max_attempts_on_classic_and_quorum_queues() {
    let Some(url) = service_url("IDEM_TEST_AMQP_URL") else { return };
    for classic in [true, false] {
        let queue = format!("idemtest.consume.rabbit.poison{classic}.{}", std::process::id());
        let (connection, channel) = common::fresh_rabbit_queue(&url, &queue).await;
        if classic {
            channel.queue_delete(queue.as_str().into(), Default::default()).await.unwrap();
            channel
                .queue_declare(
                    queue.as_str().into(),
                    lapin::options::QueueDeclareOptions::durable(),
                    Default::default(),
                )
                .await
                .unwrap();
        }
        connection.close(200, "declared".into()).await.unwrap();
        let publisher = RabbitPublisher::connect(&url, "").await.unwrap();
        // 2 fails, 3 panics while making its future (before any await), 4 comes after 3 on
        // the same key.
        let messages: Vec<_> = (1..=4)
            .map(|id| OutboxMessage {
                id,
                topic: queue.clone(),
                key: if id == 4 { "k3".to_owned() } else { format!("k{id}") },
                seq: if id == 4 { 2 } else { 1 },
                payload: bytes::Bytes::from(match id {
                    2 => "poison",
                    3 => "panic",
                    _ => "ok",
                }),
                headers: Vec::new(),
            })
            .collect();
        for result in publisher.publish(&messages).await {
            result.unwrap();
        }
        let runs: Arc<Mutex<std::collections::HashMap<String, u64>>> = Arc::default();
        let handler = {
            let runs = Arc::clone(&runs);
            move |message: Received| {
                let runs = Arc::clone(&runs);
                if &message.payload[..] == b"panic" {
                    *runs.lock().unwrap().entry(message.id.clone()).or_default() += 1;
                    panic!("a handler that panics before its first await");
                }
                async move {
                    *runs.lock().unwrap().entry(message.id.clone()).or_default() += 1;
                    if &message.payload[..] == b"poison" {
                        return Err("poison".to_owned());
                    }
                    Ok(())
                }
            }
        };
        let burials = Arc::new(Burials::default());
        let config = RunnerConfig {
            concurrency: 4,
            max_attempts: 5,
            backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
            fetch_wait: Duration::from_millis(100),
            ..RunnerConfig::default()
        };
        let subscription = RabbitSubscription::consume(&url, &queue, 16).await.unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let runner = tokio::spawn(consume::run(
            subscription,
            handler,
            Arc::clone(&burials),
            config,
            async {
                let _ = stopped.await;
            },
        ));
        let started = Instant::now();
        while burials.buried.lock().unwrap().len() < 2 {
            assert!(started.elapsed() < Duration::from_secs(20), "classic {classic}: never buried");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _ = stop.send(());
        let report = runner.await.unwrap();
        let mut buried = burials.buried.lock().unwrap().clone();
        buried.sort();
        let runs = runs.lock().unwrap().clone();
        let expected = [("idem-outbox-2".to_owned(), 5), ("idem-outbox-3".to_owned(), 5)];
        assert_eq!(buried, expected, "classic {classic}");
        assert_eq!(runs.get("idem-outbox-2"), Some(&5), "classic {classic}: {runs:?}");
        assert_eq!(runs.get("idem-outbox-3"), Some(&5), "classic {classic}: {runs:?}");
        assert_eq!(runs.get("idem-outbox-4"), Some(&1), "k3's next message ran after the panics");
        assert_eq!(report.handled, 2, "classic {classic}: {report:?}");
    }
}

/// A second copy of a message (the same message-id: republished by a relay, or redelivered
/// after a reconnect) arriving while the first still waits in its lane is not run again, and
/// is settled with the first: nothing is left unacknowledged to hold a prefetch slot, and once
/// the runner stops the queue is empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_arriving_while_the_first_waits_is_settled_with_it() {
    let Some(url) = service_url("IDEM_TEST_AMQP_URL") else { return };
    let (queue, connection, channel) = fresh_queue(&url, "copies").await;
    let publisher = RabbitPublisher::connect(&url, "").await.unwrap();
    let message = |id: i64| OutboxMessage {
        id,
        topic: queue.clone(),
        key: "k".into(),
        seq: id,
        payload: bytes::Bytes::from(id.to_string()),
        headers: Vec::new(),
    };
    // 1, then two copies of 2 (same message-id), all on one key: the copies wait behind 1.
    for id in [1, 2, 2] {
        publisher.publish(&[message(id)]).await.remove(0).unwrap();
    }
    let runs: Arc<Mutex<Vec<String>>> = Arc::default();
    let handler = {
        let runs = Arc::clone(&runs);
        move |message: Received| {
            let runs = Arc::clone(&runs);
            async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                runs.lock().unwrap().push(message.id);
                consume::HandlerResult::Ok(())
            }
        }
    };
    let config = RunnerConfig {
        concurrency: 4,
        fetch_wait: Duration::from_millis(50),
        ..RunnerConfig::default()
    };
    let subscription = RabbitSubscription::consume(&url, &queue, 16).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let runner =
        tokio::spawn(consume::run(subscription, handler, Arc::new(NoDeadLetters), config, async {
            let _ = stopped.await;
        }));
    let started = Instant::now();
    while runs.lock().unwrap().len() < 2 {
        assert!(started.elapsed() < Duration::from_secs(10), "not handled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = stop.send(());
    let report = runner.await.unwrap();
    assert_eq!(*runs.lock().unwrap(), ["idem-outbox-1", "idem-outbox-2"], "each id ran once");
    assert_eq!(report.handled, 2, "{report:?}");
    // The runner's channel is closed: anything it left unacknowledged is back in the queue.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let declared = channel
        .queue_declare(
            queue.as_str().into(),
            lapin::options::QueueDeclareOptions { passive: true, ..Default::default() },
            Default::default(),
        )
        .await
        .unwrap();
    assert_eq!(declared.message_count(), 0, "the copy was acknowledged with the first");
    connection.close(200, "done".into()).await.unwrap();
}
