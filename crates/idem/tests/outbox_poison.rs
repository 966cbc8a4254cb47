//! Outbox events that cannot be published: 100 keys whose events go to a subject no JetStream
//! stream takes ("no responders"), enqueued before 10,000 good events on 100 other keys. The
//! good events flow while the poison keys back off; each poison key is tried exactly
//! `max_attempts` times, then parked with its last error; `idem outbox` lists them, `retry`
//! puts one back once its stream exists (published), `discard` gives up one key's stuck event
//! so its later events flow (the discarded one never reaches the broker).

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use async_trait::async_trait;
use idem_core::conformance::{fresh_postgres_schema, service_url};
use idem_stream::nats::JetStreamPublisher;
use idem_stream::postgres::{Event, Outbox, Relay, RelayConfig};
use idem_stream::publish::{OutboxMessage, PublishError, Publisher};
use tokio_postgres::NoTls;

const POISON_KEYS: usize = 100;
const GOOD_KEYS: usize = 100;
const GOOD_EVENTS: usize = 10_000;
const MAX_ATTEMPTS: i32 = 4;

/// The real JetStream publisher, counting what it is asked to publish per topic.
struct Counting {
    inner: JetStreamPublisher,
    calls: Arc<Mutex<HashMap<String, usize>>>,
}

#[async_trait]
impl Publisher for Counting {
    async fn publish(&self, messages: &[OutboxMessage]) -> Vec<Result<(), PublishError>> {
        {
            let mut calls = self.calls.lock().unwrap();
            for message in messages {
                *calls.entry(message.topic.clone()).or_default() += 1;
            }
        }
        self.inner.publish(messages).await
    }
}

async fn enqueue(client: &mut tokio_postgres::Client, topic: &str, keys: usize, events: usize) {
    for chunk in (0..events).collect::<Vec<_>>().chunks(500) {
        let transaction = client.transaction().await.unwrap();
        for index in chunk {
            let key = format!("k{}", index % keys);
            let payload = format!("event {index}");
            let event = Event { topic, key: &key, payload: payload.as_bytes(), headers: &[] };
            Outbox::enqueue(&transaction, event).await.unwrap();
        }
        transaction.commit().await.unwrap();
    }
}

/// Runs relay rounds as `Relay::run` does (until idle, then a short wait) until `done`.
async fn relay_until<P: Publisher>(
    relay: &Relay<P>,
    client: &mut tokio_postgres::Client,
    within: Duration,
    mut done: impl AsyncFnMut(&tokio_postgres::Client) -> bool,
) -> Duration {
    let started = Instant::now();
    while !done(client).await {
        assert!(started.elapsed() < within, "not done within {within:?}");
        relay.run_until_idle(client, 1_000).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

async fn sent(client: &tokio_postgres::Client, topic: &str) -> i64 {
    // Sent: at or below its key's published sequence (and not discarded).
    let sql = "SELECT count(*) FROM idem_outbox e JOIN idem_outbox_keys k USING (topic, key)
               WHERE e.topic = $1 AND e.seq <= k.published_seq AND e.discarded_at IS NULL";
    client.query_one(sql, &[&topic]).await.unwrap().get(0)
}

/// Creates the JetStream stream `name` taking `subject`.
async fn create_stream(jetstream: &jetstream::Context, name: String, subject: &str) {
    let config = stream::Config { name, subjects: vec![subject.to_owned()], ..Default::default() };
    jetstream.create_stream(config).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_keys_back_off_get_parked_and_never_hold_up_the_others() {
    let Some(nats) = service_url("IDEM_TEST_NATS_URL") else { return };
    let jetstream = jetstream::new(async_nats::connect(&nats).await.unwrap());
    let pid = std::process::id();
    let (good, poison) = (format!("idemtest.good.{pid}"), format!("idemtest.poison.{pid}"));
    for (name, subject) in [("IDEMTEST_GOOD", &good), ("IDEMTEST_POISON", &poison)] {
        let _ = jetstream.delete_stream(format!("{name}_{pid}")).await;
        let _ = subject;
    }
    create_stream(&jetstream, format!("IDEMTEST_GOOD_{pid}"), &good).await;

    // Alone first: the time the good events take with nothing failing, for the comparison.
    let Some(baseline) = fresh_postgres_schema("idem_outbox_baseline").await else { return };
    let (mut client, connection) = tokio_postgres::connect(&baseline, NoTls).await.unwrap();
    tokio::spawn(connection);
    Outbox::migrate(&mut client).await.unwrap();
    enqueue(&mut client, &good, GOOD_KEYS, GOOD_EVENTS).await;
    let config = RelayConfig {
        max_attempts: MAX_ATTEMPTS,
        retry_backoff: Duration::from_millis(300),
        max_retry_backoff: Duration::from_secs(1),
        ..RelayConfig::default()
    };
    let relay = Relay::new(JetStreamPublisher::new(jetstream.clone()), config);
    let all_good =
        async |client: &tokio_postgres::Client| sent(client, &good).await == GOOD_EVENTS as i64;
    let alone = relay_until(&relay, &mut client, Duration::from_secs(120), all_good).await;

    let database = fresh_postgres_schema("idem_outbox_poison").await.unwrap();
    let (mut client, connection) = tokio_postgres::connect(&database, NoTls).await.unwrap();
    tokio::spawn(connection);
    Outbox::migrate(&mut client).await.unwrap();
    // The poison keys first: the oldest rows, at the head of the table.
    enqueue(&mut client, &poison, POISON_KEYS, POISON_KEYS * 2).await;
    enqueue(&mut client, &good, GOOD_KEYS, GOOD_EVENTS).await;
    let calls: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let counting =
        Counting { inner: JetStreamPublisher::new(jetstream.clone()), calls: Arc::clone(&calls) };
    let relay = Relay::new(counting, config);
    let beside_poison = relay_until(&relay, &mut client, Duration::from_secs(120), all_good).await;
    let poison_tries_meanwhile = calls.lock().unwrap().get(&poison).copied().unwrap_or(0);

    // Then until every poison key is parked.
    let parked = async |client: &tokio_postgres::Client| {
        Outbox::stats(client).await.unwrap().parked_keys == POISON_KEYS as i64
    };
    relay_until(&relay, &mut client, Duration::from_secs(60), parked).await;
    // Parked keys are not tried again, however long the relay runs.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    relay.run_until_idle(&mut client, 1_000).await.unwrap();
    let poison_tries = calls.lock().unwrap().get(&poison).copied().unwrap_or(0);
    assert_eq!(
        poison_tries,
        POISON_KEYS * MAX_ATTEMPTS as usize,
        "each poison key tried exactly max_attempts times (its first event only)"
    );
    assert_eq!(sent(&client, &poison).await, 0);
    let stats = Outbox::stats(&client).await.unwrap();
    assert_eq!((stats.pending_events, stats.parked_keys), (POISON_KEYS as i64 * 2, 100));

    // What an operator sees and does.
    let (ok, listed) = common::outbox_cli(&database, &["list", "--parked", "--limit", "1000"]);
    assert!(ok);
    let keys = listed["keys"].as_array().unwrap();
    assert_eq!(keys.len(), POISON_KEYS);
    assert!(keys.iter().all(|key| key["state"] == "parked" && key["attempts"] == MAX_ATTEMPTS));
    let error = keys[0]["last_error"].as_str().unwrap();
    assert!(error.contains("no responders") || error.contains("stream"), "{error}");
    let (ok, shown) = common::outbox_cli(&database, &["show", &poison, "k7"]);
    assert!(ok && shown["events"].as_array().unwrap().len() == 2, "{shown}");

    // The cause fixed for one key: a stream for the poison subject, and `retry`.
    create_stream(&jetstream, format!("IDEMTEST_POISON_{pid}"), &poison).await;
    assert!(common::outbox_cli(&database, &["retry", &poison, "k7"]).0);
    // Another key: its first event given up, its second flows.
    let (ok, discarded) = common::outbox_cli(&database, &["discard", &poison, "k8"]);
    assert!(ok && discarded["discarded"].is_i64(), "{discarded}");
    assert!(common::outbox_cli(&database, &["retry", &poison, "k8"]).0);
    relay_until(&relay, &mut client, Duration::from_secs(30), async |client| {
        sent(client, &poison).await == 3
    })
    .await;
    let (found, _) = common::outbox_cli(&database, &["retry", &poison, "no-such-key"]);
    assert!(!found, "an unknown key is said to be missing (exit status 1)");
    let stream = jetstream.get_stream(format!("IDEMTEST_POISON_{pid}")).await.unwrap();
    let mut on_stream = Vec::new();
    for seq in 1..=3 {
        let message = stream.get_raw_message(seq).await.unwrap();
        on_stream.push(String::from_utf8(message.payload.to_vec()).unwrap());
    }
    on_stream.sort();
    // k7's events are 7 and 107; k8's second is 108 (its first, 8, was discarded).
    assert_eq!(on_stream, ["event 107", "event 108", "event 7"]);

    eprintln!(
        "10,000 good events: {alone:?} alone, {beside_poison:?} beside 100 poison keys ({:.2}x); \
         the poison keys were tried {poison_tries_meanwhile} times meanwhile, {poison_tries} in all",
        beside_poison.as_secs_f64() / alone.as_secs_f64()
    );
    for name in ["GOOD", "POISON"] {
        let _ = jetstream.delete_stream(format!("IDEMTEST_{name}_{pid}")).await;
    }
}

/// A publisher whose broker is down until `up_at`: every message fails as `unreachable` (or,
/// for the control, as an ordinary refusal) until then, and is published for real after.
struct DownUntil {
    inner: JetStreamPublisher,
    up_at: Instant,
    unreachable: bool,
}

#[async_trait]
impl Publisher for DownUntil {
    async fn publish(&self, messages: &[OutboxMessage]) -> Vec<Result<(), PublishError>> {
        if Instant::now() >= self.up_at {
            return self.inner.publish(messages).await;
        }
        let error = || idem_stream::Error::other("connection refused");
        messages
            .iter()
            .map(|message| {
                Err(match self.unreachable {
                    true => PublishError::unreachable(message.id, error()),
                    false => PublishError::new(message.id, error()),
                })
            })
            .collect()
    }
}

/// A broker outage is not the events' fault: however many rounds it lasts, no key is parked,
/// and every event flows once the broker is back. (Counted as failures, the same outage parks
/// every key: the control.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_never_parks_keys() {
    let Some(nats) = service_url("IDEM_TEST_NATS_URL") else { return };
    let jetstream = jetstream::new(async_nats::connect(&nats).await.unwrap());
    let pid = std::process::id();
    let subject = format!("idemtest.outage.{pid}");
    let _ = jetstream.delete_stream(format!("IDEMTEST_OUTAGE_{pid}")).await;
    create_stream(&jetstream, format!("IDEMTEST_OUTAGE_{pid}"), &subject).await;
    let config = RelayConfig {
        max_attempts: 2,
        retry_backoff: Duration::from_millis(100),
        max_retry_backoff: Duration::from_millis(200),
        ..RelayConfig::default()
    };
    for (schema, unreachable) in
        [("idem_outbox_outage", true), ("idem_outbox_outage_control", false)]
    {
        let Some(database) = fresh_postgres_schema(schema).await else { return };
        let (mut client, connection) = tokio_postgres::connect(&database, NoTls).await.unwrap();
        tokio::spawn(connection);
        Outbox::migrate(&mut client).await.unwrap();
        enqueue(&mut client, &subject, 10, 100).await;
        let down = DownUntil {
            inner: JetStreamPublisher::new(jetstream.clone()),
            up_at: Instant::now() + Duration::from_secs(2),
            unreachable,
        };
        let relay = Relay::new(down, config);
        // Through the outage: many rounds, each failing every key.
        let outage = Instant::now();
        while outage.elapsed() < Duration::from_millis(2_200) {
            relay.run_until_idle(&mut client, 1_000).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let parked = Outbox::stats(&client).await.unwrap().parked_keys;
        if unreachable {
            assert_eq!(parked, 0, "an outage parked keys");
            let all = async |client: &tokio_postgres::Client| sent(client, &subject).await >= 100;
            relay_until(&relay, &mut client, Duration::from_secs(30), all).await;
        } else {
            assert_eq!(parked, 10, "the control: failures counted park every key");
        }
    }
    let _ = jetstream.delete_stream(format!("IDEMTEST_OUTAGE_{pid}")).await;
}
