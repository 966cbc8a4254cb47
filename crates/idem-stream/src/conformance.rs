//! The broker adapter conformance suite: what the relay and the consumer runner rely on from an
//! adapter, checked against a real server. A new adapter implements [`Broker`] for its server
//! and runs every case with one macro call in its tests:
//!
//! ```ignore
//! idem_stream::adapter_conformance_tests!(my_broker, MyBroker::connect());
//! ```
//!
//! where `MyBroker::connect()` is a future of `Option<MyBroker>` (`None` skips, as when the
//! server's URL is not set). The cases:
//! - every published message arrives with its id, key, sequence, headers and payload, and a
//!   single consumer sees each key's events in the order they were published;
//! - `publish` answers each message on its own: a refused one fails alone, in its place;
//! - `Retry` brings the message back with its attempt counted;
//! - a consumer that vanishes without settling loses nothing: another one gets its messages;
//! - consumers in one group share the work, an acknowledged message going to one of them only;
//! - a message without a producer id gets one from its content, the same for each copy;
//! - the consumer runner keeps each key's order through failures and redeliveries.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;

use crate::consume::{Received, Settle, Subscription};
use crate::publish::{OutboxMessage, Publisher};

/// Drops the ack of every 7th message on its first delivery: the broker redelivers it (after
/// its ack wait, or once another consumer claims it) although its handler committed.
pub struct DroppingAcks<S> {
    pub inner: S,
    pub dropped: Arc<Mutex<usize>>,
}

impl<S> std::fmt::Debug for DroppingAcks<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DroppingAcks").field("dropped", &self.dropped).finish_non_exhaustive()
    }
}

#[async_trait]
impl<S: Subscription + Sync> Subscription for DroppingAcks<S> {
    type Token = (bool, S::Token);

    async fn fetch(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> crate::Result<Vec<(Received, Self::Token)>> {
        let batch = self.inner.fetch(max, wait).await?;
        Ok(batch
            .into_iter()
            .map(|(message, token)| {
                let drop_ack =
                    message.attempt == 1 && message.id.bytes().map(u64::from).sum::<u64>() % 7 == 0;
                (message, (drop_ack, token))
            })
            .collect())
    }

    async fn settle(&self, (drop_ack, token): Self::Token, settle: Settle) -> crate::Result<()> {
        if drop_ack && settle == Settle::Ack {
            *self.dropped.lock().unwrap_or_else(|poison| poison.into_inner()) += 1;
            return Ok(());
        }
        self.inner.settle(token, settle).await
    }
}

/// One broker under test. Each case gets a fresh, empty topic of its own.
#[async_trait]
pub trait Broker: Send + Sync {
    type Sub: Subscription + Sync + 'static;
    /// Creates an empty topic for `case` (stream, queue, ...), with one consumer group on it.
    async fn topic(&self, case: &str) -> String;
    /// A topic the broker refuses to take a message on.
    async fn refused_topic(&self, case: &str) -> String;
    async fn publisher(&self) -> Arc<dyn Publisher>;
    /// A new consumer in the topic's group.
    async fn subscribe(&self, topic: &str) -> Self::Sub;
    /// How long a message held by a vanished consumer waits before it is delivered again.
    fn redelivery_after(&self) -> Duration;
    /// Whether an ack dropped on purpose comes back as a redelivery while the consumer runs
    /// (not on RabbitMQ, which keeps an unacknowledged message with its channel).
    fn redelivers_unacked(&self) -> bool {
        true
    }
    /// Publishes `payload` to `topic` as another producer would, without a message id.
    async fn publish_without_id(&self, topic: &str, payload: &str);
}

fn message(topic: &str, id: i64, key: &str, seq: i64) -> OutboxMessage {
    OutboxMessage {
        id,
        topic: topic.to_owned(),
        key: key.to_owned(),
        seq,
        payload: Bytes::from(format!("payload of {id}: {}", "x".repeat(id as usize % 50))),
        headers: vec![
            ("traceparent".into(), format!("00-{id:032x}-{seq:016x}-01")),
            ("content-type".into(), "text/plain".into()),
        ],
    }
}

fn header<'a>(received: &'a Received, name: &str) -> Option<&'a str> {
    received.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

/// Publishes `messages` as one layer and asserts every one was confirmed.
async fn publish_all(publisher: &dyn Publisher, messages: &[OutboxMessage]) {
    for result in publisher.publish(messages).await {
        result.unwrap();
    }
}

/// Fetches until `count` messages arrived (settling none) or `within` passed.
async fn fetch_at_least<S: Subscription>(
    subscription: &mut S,
    count: usize,
    within: Duration,
) -> Vec<(Received, S::Token)> {
    let started = Instant::now();
    let mut received = Vec::new();
    while received.len() < count && started.elapsed() < within {
        received.extend(
            subscription.fetch(count - received.len(), Duration::from_millis(300)).await.unwrap(),
        );
    }
    received
}

async fn ack_all<S: Subscription>(subscription: &S, batch: Vec<(Received, S::Token)>) {
    for (_, token) in batch {
        subscription.settle(token, Settle::Ack).await.unwrap();
    }
}

pub async fn delivers_every_message_whole_and_in_key_order<B: Broker>(broker: &B) {
    let topic = broker.topic("whole").await;
    let publisher = broker.publisher().await;
    let (keys, per_key) = (["a", "b", "c"], 10);
    let mut published = HashMap::new();
    for seq in 1..=per_key {
        // One layer: the next event of every key.
        let layer: Vec<_> = keys
            .iter()
            .enumerate()
            .map(|(k, key)| message(&topic, seq * 10 + k as i64, key, seq))
            .collect();
        publish_all(publisher.as_ref(), &layer).await;
        published.extend(layer.into_iter().map(|m| (m.message_id(), m)));
    }

    let mut subscription = broker.subscribe(&topic).await;
    let batch = fetch_at_least(&mut subscription, published.len(), Duration::from_secs(10)).await;
    assert_eq!(batch.len(), published.len(), "every published message arrives");
    let mut last_seq: HashMap<String, i64> = HashMap::new();
    for (received, _) in &batch {
        let sent =
            published.get(&received.id).unwrap_or_else(|| panic!("unknown id {}", received.id));
        assert_eq!(received.payload, sent.payload, "payload of {}", received.id);
        assert_eq!(received.attempt, 1, "a first delivery is attempt 1");
        assert_eq!(header(received, "Idem-Key"), Some(sent.key.as_str()));
        for (name, value) in &sent.headers {
            assert_eq!(header(received, name), Some(value.as_str()), "header {name} travels");
        }
        let seq: i64 = header(received, "Idem-Seq").unwrap().parse().unwrap();
        assert_eq!(seq, sent.seq);
        let previous = last_seq.insert(sent.key.clone(), seq).unwrap_or(0);
        assert_eq!(seq, previous + 1, "key {}'s events in publish order", sent.key);
    }
    let ids: HashSet<_> = batch.iter().map(|(received, _)| received.id.clone()).collect();
    assert_eq!(ids.len(), published.len(), "no message twice");
    ack_all(&subscription, batch).await;
    // Acknowledged messages do not come back, even after the redelivery window.
    tokio::time::sleep(broker.redelivery_after()).await;
    let again = subscription.fetch(10, Duration::from_millis(500)).await.unwrap();
    let again: Vec<_> = again.iter().map(|(received, _)| &received.id).collect();
    assert!(again.is_empty(), "acknowledged messages came back: {again:?}");
}

pub async fn answers_each_message_on_its_own<B: Broker>(broker: &B) {
    let topic = broker.topic("each").await;
    let refused = broker.refused_topic("each").await;
    let publisher = broker.publisher().await;
    let layer =
        [message(&topic, 1, "a", 1), message(&refused, 2, "b", 1), message(&topic, 3, "c", 1)];
    let results = publisher.publish(&layer).await;
    assert_eq!(results.len(), 3, "one result per message");
    assert!(results[0].is_ok() && results[2].is_ok(), "the accepted ones: {results:?}");
    let refusal = results[1].as_ref().expect_err("the refused one fails");
    assert_eq!(refusal.id, 2, "the failure names its message");
    let mut subscription = broker.subscribe(&topic).await;
    let batch = fetch_at_least(&mut subscription, 2, Duration::from_secs(10)).await;
    let mut ids: Vec<_> = batch.iter().map(|(received, _)| received.id.clone()).collect();
    ids.sort();
    assert_eq!(ids, ["idem-outbox-1", "idem-outbox-3"]);
    ack_all(&subscription, batch).await;
}

pub async fn retry_brings_the_message_back_with_its_attempt_counted<B: Broker>(broker: &B) {
    let topic = broker.topic("retry").await;
    publish_all(broker.publisher().await.as_ref(), &[message(&topic, 7, "k", 1)]).await;
    let mut subscription = broker.subscribe(&topic).await;
    for attempt in 1..=3 {
        let mut batch = fetch_at_least(&mut subscription, 1, Duration::from_secs(15)).await;
        assert_eq!(batch.len(), 1, "attempt {attempt} arrives");
        let (received, token) = batch.pop().unwrap();
        assert_eq!((received.id.as_str(), received.attempt), ("idem-outbox-7", attempt));
        let settle =
            if attempt < 3 { Settle::Retry(Duration::from_millis(200)) } else { Settle::Ack };
        subscription.settle(token, settle).await.unwrap();
    }
    tokio::time::sleep(broker.redelivery_after()).await;
    assert!(subscription.fetch(1, Duration::from_millis(500)).await.unwrap().is_empty());
}

pub async fn a_vanished_consumer_loses_nothing<B: Broker>(broker: &B) {
    let topic = broker.topic("vanish").await;
    let messages: Vec<_> = (1..=6).map(|id| message(&topic, id, &format!("k{id}"), 1)).collect();
    publish_all(broker.publisher().await.as_ref(), &messages).await;
    let mut doomed = broker.subscribe(&topic).await;
    let taken = fetch_at_least(&mut doomed, 6, Duration::from_secs(10)).await;
    let taken_ids: HashSet<String> = taken.iter().map(|(r, _)| r.id.clone()).collect();
    assert_eq!(taken_ids.len(), 6);
    // The consumer goes away holding all six, unsettled.
    drop(taken);
    drop(doomed);

    let mut survivor = broker.subscribe(&topic).await;
    let within = broker.redelivery_after() + Duration::from_secs(15);
    let batch = fetch_at_least(&mut survivor, 6, within).await;
    let ids: HashSet<String> = batch.iter().map(|(r, _)| r.id.clone()).collect();
    assert_eq!(ids, taken_ids, "every message the vanished consumer held is delivered again");
    assert!(batch.iter().all(|(r, _)| r.attempt >= 2), "redeliveries count as later attempts");
    ack_all(&survivor, batch).await;
}

pub async fn consumers_in_a_group_share_the_work<B: Broker>(broker: &B) {
    let topic = broker.topic("share").await;
    let messages: Vec<_> = (1..=40).map(|id| message(&topic, id, &format!("k{id}"), 1)).collect();
    let publisher = broker.publisher().await;
    for layer in messages.chunks(8) {
        publish_all(publisher.as_ref(), layer).await;
    }
    let mut consumers = [broker.subscribe(&topic).await, broker.subscribe(&topic).await];
    let mut seen: [Vec<String>; 2] = [Vec::new(), Vec::new()];
    let started = Instant::now();
    while seen[0].len() + seen[1].len() < messages.len()
        && started.elapsed() < Duration::from_secs(15)
    {
        for (consumer, seen) in consumers.iter_mut().zip(seen.iter_mut()) {
            let batch = consumer.fetch(5, Duration::from_millis(200)).await.unwrap();
            seen.extend(batch.iter().map(|(r, _)| r.id.clone()));
            ack_all(consumer, batch).await;
        }
    }
    let all: HashSet<_> = seen.iter().flatten().cloned().collect();
    assert_eq!(all.len(), messages.len(), "every message to some consumer");
    assert_eq!(seen[0].len() + seen[1].len(), messages.len(), "none to both");
    assert!(
        !seen[0].is_empty() && !seen[1].is_empty(),
        "both took a share: {} and {}",
        seen[0].len(),
        seen[1].len()
    );
}

/// What the ordered consumer below saw.
#[derive(Default)]
struct OrderLog {
    /// Each key's last sequence number applied (or buried).
    last: HashMap<String, i64>,
    /// Ids applied or buried, once each.
    done: HashSet<String>,
    runs: HashMap<String, u32>,
    out_of_order: Vec<String>,
    running: usize,
    most_running: usize,
}

impl OrderLog {
    /// Takes a message as applied (or buried) in its key's order, or notes that it was not.
    fn apply(&mut self, received: &Received) {
        let key = header(received, "Idem-Key").unwrap().to_owned();
        let seq: i64 = header(received, "Idem-Seq").unwrap().parse().unwrap();
        if !self.done.insert(received.id.clone()) {
            return; // a duplicate, as an inbox would skip it
        }
        let previous = self.last.insert(key.clone(), seq).unwrap_or(0);
        if seq != previous + 1 {
            self.out_of_order.push(format!("{key}: {seq} after {previous}"));
        }
    }
}

struct OrderedDeadLetters(Arc<std::sync::Mutex<OrderLog>>);

#[async_trait]
impl crate::consume::DeadLetter for OrderedDeadLetters {
    async fn bury(&self, message: &Received, _failure: &str) -> crate::Result<()> {
        self.0.lock().unwrap().apply(message);
        Ok(())
    }
}

/// The consumer runner on this broker: 12 keys of 15 events each, some failing once
/// (rejected), some twice (unavailable), some always (buried after 3 attempts), acks dropped
/// on purpose where the broker then redelivers. Each key's events are applied in their order,
/// each once, different keys at once.
pub async fn the_runner_keeps_each_keys_order_through_failures_and_redeliveries<B: Broker>(
    broker: &B,
) {
    use crate::consume::{self, Failure, RunnerConfig};
    let topic = broker.topic("ordered").await;
    let publisher = broker.publisher().await;
    let (keys, per_key) = (12, 15);
    for seq in 1..=per_key {
        let layer: Vec<_> =
            (0..keys).map(|k| message(&topic, seq * 100 + k, &format!("key-{k}"), seq)).collect();
        publish_all(publisher.as_ref(), &layer).await;
    }
    let total = (keys * per_key) as usize;
    // key-5's 5th event (whose ack DroppingAcks keeps: a dropped one would run it again).
    let poison = |id: i64| id == 505;
    let log: Arc<std::sync::Mutex<OrderLog>> = Arc::default();
    let handler = {
        let log = Arc::clone(&log);
        move |received: Received| {
            let log = Arc::clone(&log);
            async move {
                let id: i64 = received.id.trim_start_matches("idem-outbox-").parse().unwrap();
                let runs = {
                    let mut log = log.lock().unwrap();
                    log.running += 1;
                    log.most_running = log.most_running.max(log.running);
                    let runs = log.runs.entry(received.id.clone()).or_default();
                    *runs += 1;
                    *runs
                };
                tokio::time::sleep(Duration::from_millis(5)).await;
                let verdict = if poison(id) {
                    Err(Failure::rejected("poison"))
                } else if id % 9 == 0 && runs == 1 {
                    Err(Failure::rejected("fails once"))
                } else if id % 11 == 0 && runs <= 2 {
                    Err(Failure::unavailable("database down"))
                } else {
                    log.lock().unwrap().apply(&received);
                    Ok(())
                };
                log.lock().unwrap().running -= 1;
                verdict
            }
        }
    };
    let config = RunnerConfig {
        concurrency: 4,
        max_attempts: 3,
        backoff: Duration::from_millis(30),
        max_backoff: Duration::from_millis(200),
        fetch_wait: Duration::from_millis(100),
        ..RunnerConfig::default()
    };
    let subscription = broker.subscribe(&topic).await;
    let dropped = Arc::new(std::sync::Mutex::new(0));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let dead_letters = Arc::new(OrderedDeadLetters(Arc::clone(&log)));
    let shutdown = async {
        let _ = stopped.await;
    };
    let runner = if broker.redelivers_unacked() {
        let subscription = DroppingAcks { inner: subscription, dropped: Arc::clone(&dropped) };
        tokio::spawn(consume::run(subscription, handler, dead_letters, config, shutdown))
    } else {
        tokio::spawn(consume::run(subscription, handler, dead_letters, config, shutdown))
    };
    let started = Instant::now();
    while log.lock().unwrap().done.len() < total {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "stuck at {} of {total}",
            log.lock().unwrap().done.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Past the redelivery of the dropped acks.
    tokio::time::sleep(broker.redelivery_after() * 2).await;
    let _ = stop.send(());
    let report = runner.await.unwrap();
    let log = log.lock().unwrap();
    assert!(log.out_of_order.is_empty(), "out of order: {:?}", log.out_of_order);
    assert_eq!(log.done.len(), total);
    assert!(log.last.values().all(|last| *last == per_key), "{:?}", log.last);
    let poison_runs = log.runs.iter().filter(|(id, _)| poison(id[12..].parse().unwrap()));
    assert!(poison_runs.clone().all(|(_, runs)| *runs == 3), "buried after 3 attempts");
    assert_eq!(report.dead_lettered, 1, "{report:?}");
    assert!(report.unavailable > 0 && report.retried > 0, "{report:?}");
    assert!(log.most_running > 1 && log.most_running <= 4, "{} at once", log.most_running);
    eprintln!(
        "ordered consumer: {total} events, {} acks dropped, {report:?}, at most {} at once",
        dropped.lock().unwrap(),
        log.most_running
    );
}

/// One message-id rule on every broker: a message its producer gave no id gets one from its
/// content, the same on every copy, so a producer's retry is deduplicated like a redelivery.
pub async fn a_message_without_a_producer_id_gets_one_from_its_content<B: Broker>(broker: &B) {
    let topic = broker.topic("noid").await;
    for payload in ["same", "same", "other"] {
        broker.publish_without_id(&topic, payload).await;
    }
    let mut subscription = broker.subscribe(&topic).await;
    let batch = fetch_at_least(&mut subscription, 3, Duration::from_secs(10)).await;
    let ids: Vec<&str> = batch.iter().map(|(received, _)| received.id.as_str()).collect();
    assert_eq!(ids.len(), 3, "{ids:?}");
    assert!(ids[0].contains("sha256-") && ids[0].len() > 64, "{ids:?}");
    assert_eq!(ids[0], ids[1], "a retried publish of the same content has the same id");
    assert_ne!(ids[0], ids[2], "different content, a different id");
    ack_all(&subscription, batch).await;
}

/// Runs every case of the suite against `$broker` (a future of `Option<impl Broker>`), as a
/// module `$module` of `#[tokio::test]`s.
#[macro_export]
macro_rules! adapter_conformance_tests {
    ($module:ident, $broker:expr) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn delivers_every_message_whole_and_in_key_order() {
                let Some(broker) = $broker.await else { return };
                $crate::conformance::delivers_every_message_whole_and_in_key_order(&broker).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn answers_each_message_on_its_own() {
                let Some(broker) = $broker.await else { return };
                $crate::conformance::answers_each_message_on_its_own(&broker).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn retry_brings_the_message_back_with_its_attempt_counted() {
                let Some(broker) = $broker.await else { return };
                $crate::conformance::retry_brings_the_message_back_with_its_attempt_counted(&broker).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_vanished_consumer_loses_nothing() {
                let Some(broker) = $broker.await else { return };
                $crate::conformance::a_vanished_consumer_loses_nothing(&broker).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_message_without_a_producer_id_gets_one_from_its_content() {
                let Some(broker) = $broker.await else { return };
                $crate::conformance::a_message_without_a_producer_id_gets_one_from_its_content(&broker).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn the_runner_keeps_each_keys_order_through_failures_and_redeliveries() {
                let Some(broker) = $broker.await else { return };
                $crate::conformance::the_runner_keeps_each_keys_order_through_failures_and_redeliveries(&broker)
                    .await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn consumers_in_a_group_share_the_work() {
                let Some(broker) = $broker.await else { return };
                $crate::conformance::consumers_in_a_group_share_the_work(&broker).await;
            }
        }
    };
}
