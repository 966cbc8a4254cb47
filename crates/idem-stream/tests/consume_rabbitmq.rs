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

/// A TCP proxy on a port of its own in front of `broker` (`host:port`) that can cut every
/// connection through it at once, as a broker crash or a network cut does.
struct CuttingProxy {
    port: u16,
    open: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    _accepting: tokio::task::JoinHandle<()>,
}

impl CuttingProxy {
    async fn start(broker: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let connections = Arc::clone(&open);
        let accepting = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let broker = broker.clone();
                let relay = tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(broker).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                connections.lock().unwrap().push(relay.abort_handle());
            }
        });
        Self { port, open, _accepting: accepting }
    }

    /// Closes both ends of every connection through the proxy.
    fn cut(&self) {
        for connection in std::mem::take(&mut *self.open.lock().unwrap()) {
            connection.abort();
        }
    }
}

/// The runner keeps consuming through connections that break while it acknowledges: every
/// message is handled. lapin (4.12) can leave an ack pending for ever when the connection
/// breaks just as it is sent; the runner settles between fetches, so before the ack was bounded
/// it stopped there for good, alive and silent, its queue filling with no consumer (what the
/// chaos rig saw after a RabbitMQ crash: one partition never applied again). Here the link is
/// cut 150 times, each a few milliseconds after the runner is acknowledging again; without the
/// bound the runner stopped for good at the first or second cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runner_survives_connections_cut_while_it_acknowledges() {
    let Some(url) = service_url("IDEM_TEST_AMQP_URL") else { return };
    let _serial = SERIAL.lock().await;
    const TOTAL: i64 = 6_000;
    const CUTS: usize = 150;
    let (queue, connection, _channel) = fresh_queue(&url, "cuts").await;
    connection.close(200, "done".into()).await.unwrap();
    let publisher = RabbitPublisher::connect(&url, "").await.unwrap();
    let messages: Vec<_> = (1..=TOTAL)
        .map(|id| OutboxMessage {
            id,
            topic: queue.clone(),
            key: format!("k{id}"),
            seq: 1,
            payload: bytes::Bytes::from(id.to_string()),
            headers: Vec::new(),
        })
        .collect();
    for layer in messages.chunks(500) {
        for result in publisher.publish(layer).await {
            result.unwrap();
        }
    }

    // amqp://user:password@host:port/vhost: the proxy stands for host:port.
    let (scheme_and_user, rest) = url.rsplit_once('@').expect("a URL with credentials");
    let (broker, vhost) = rest.split_once('/').unwrap_or((rest, ""));
    let broker = if broker.contains(':') { broker.to_owned() } else { format!("{broker}:5672") };
    let proxy = CuttingProxy::start(broker).await;
    let proxied = format!("{scheme_and_user}@127.0.0.1:{}/{vhost}", proxy.port);

    let handled: Arc<Mutex<(HashSet<String>, usize)>> = Arc::default();
    let seen = Arc::clone(&handled);
    let handler = move |message: Received| {
        let seen = Arc::clone(&seen);
        async move {
            let mut seen = seen.lock().unwrap();
            seen.0.insert(message.id);
            seen.1 += 1;
            consume::HandlerResult::Ok(())
        }
    };
    let subscription = RabbitSubscription::consume(&proxied, &queue, 32).await.unwrap();
    let config = RunnerConfig {
        concurrency: 16,
        backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        ..RunnerConfig::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let runner =
        tokio::spawn(consume::run(subscription, handler, Arc::new(NoDeadLetters), config, async {
            let _ = stopped.await;
        }));

    let count = || handled.lock().unwrap().0.len();
    // Waits until `target` messages are handled; fails if none is for 45 s (longer than a
    // bounded ack and a bounded reconnect together).
    let handled_up_to = |target: usize, what: String| {
        let count = &count;
        async move {
            let mut progress = (count(), Instant::now());
            while count() < target {
                tokio::time::sleep(Duration::from_millis(2)).await;
                if count() != progress.0 {
                    progress = (count(), Instant::now());
                }
                assert!(
                    progress.1.elapsed() < Duration::from_secs(45),
                    "the runner stopped {what}: {} of {TOTAL} handled, none for 45 s",
                    progress.0
                );
            }
        }
    };
    let started = Instant::now();
    for cut in 0..CUTS {
        // Once the runner is acknowledging again, a few milliseconds into it.
        let target = (count() + 20).min(TOTAL as usize);
        handled_up_to(target, format!("after {cut} of {CUTS} cuts")).await;
        tokio::time::sleep(Duration::from_millis(cut as u64 % 7)).await;
        proxy.cut();
    }
    let cut_at = count();
    handled_up_to(TOTAL as usize, "after the cuts".to_owned()).await;
    stop.send(()).unwrap();
    let report = runner.await.unwrap();
    let (distinct, runs) = {
        let handled = handled.lock().unwrap();
        (handled.0.len(), handled.1)
    };
    assert_eq!(distinct, TOTAL as usize, "every message handled");
    println!(
        "{CUTS} connection cuts in {:.0} s ({cut_at} handled by the last): all {distinct} handled \
         ({runs} handler runs), {} failed fetches, {} failed settles",
        started.elapsed().as_secs_f64(),
        report.fetch_errors,
        report.settle_errors
    );
}

/// A "broker" that accepts TCP connections and never says a word (one still starting, or a
/// link that died half-way): connecting fails after a bounded wait, for a consumer as for a
/// relay, instead of holding them for ever (lapin has no timeout of its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_never_answers_fails_the_connect_instead_of_hanging() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("amqp://guest:guest@{}/%2f", listener.local_addr().unwrap());
    let _silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((connection, _)) = listener.accept().await {
            held.push(connection);
        }
    });
    let started = Instant::now();
    let (consumer, publisher) = tokio::join!(
        RabbitSubscription::consume(&url, "anything", 16),
        RabbitPublisher::connect(&url, "")
    );
    let waited = started.elapsed();
    let consumer = consumer.expect_err("no consumer on a broker that never answers");
    let publisher = publisher.expect_err("no publisher on a broker that never answers");
    for error in [consumer.to_string(), publisher.to_string()] {
        assert!(error.contains("no answer within"), "{error}");
    }
    assert!(waited < Duration::from_secs(40), "gave up after {waited:?}");
}
