//! The consumer path for real: a JetStream durable pull consumer, the runner, and an inbox
//! handler on PostgreSQL. The broker redelivers (acks dropped on purpose), duplicates are
//! published on purpose, some handlers fail once, some always: every payment is applied exactly
//! once, the balance equals the sum, and the hopeless ones are dead-lettered with their failure.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use common::DroppingAcks;
use idem_core::conformance::service_url;
use idem_stream::consume::{self, Received, RunnerConfig};
use idem_stream::nats::JetStreamSubscription;
use idem_stream::postgres::{DeadLetters, Inbox};
use tokio_postgres::NoTls;

const PAYMENTS: usize = 1_000;
const REPUBLISHED: usize = 300;
const POISON: [usize; 5] = [11, 222, 333, 444, 999];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_payment_applies_once_through_redelivery_duplicates_and_failures() {
    scenario(false).await;
}

/// The same with `run_batches`: each batch in one transaction through `Inbox::record_many`;
/// a batch holding a poison or flaky payment fails whole and is split into single messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batches_apply_each_payment_once_through_redelivery_duplicates_and_failures() {
    scenario(true).await;
}

async fn scenario(batched: bool) {
    let Some(nats) = service_url("IDEM_TEST_NATS_URL") else { return };
    let name = if batched { "batches" } else { "single" };
    let Some((_client, database)) = common::ledger_database(&format!("idem_consume_{name}")).await
    else {
        return;
    };

    // A short duplicate window, so the duplicates published on purpose below reach the stream.
    let jetstream = jetstream::new(async_nats::connect(&nats).await.unwrap());
    let stream_name = format!("IDEM_CONSUME_{}", name.to_uppercase());
    let subject = format!("idemtest.consume.{name}.payments");
    let _ = jetstream.delete_stream(&stream_name).await;
    let stream = jetstream
        .create_stream(stream::Config {
            name: stream_name.clone(),
            subjects: vec![subject.clone()],
            duplicate_window: Duration::from_millis(200),
            ..Default::default()
        })
        .await
        .unwrap();
    let publish = |index: usize| {
        let (jetstream, subject) = (jetstream.clone(), subject.clone());
        async move {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("payment-{index}").as_str());
            let kind = if POISON.contains(&index) {
                "poison"
            } else if index % 50 == 0 {
                "flaky"
            } else {
                "ok"
            };
            let payload = Bytes::from(format!("{kind}:{}", index + 1));
            jetstream.publish_with_headers(subject, headers, payload).await.unwrap().await.unwrap();
        }
    };
    for index in 0..PAYMENTS {
        publish(index).await;
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    for index in 0..REPUBLISHED {
        publish(index * 3).await;
    }
    assert_eq!(
        stream.clone().info().await.unwrap().state.messages as usize,
        PAYMENTS + REPUBLISHED
    );

    let pool = {
        let config: tokio_postgres::Config = database.parse().unwrap();
        let manager = deadpool_postgres::Manager::new(config, NoTls);
        deadpool_postgres::Pool::builder(manager).max_size(8).build().unwrap()
    };
    let inbox = Inbox::new("ledger").unwrap();
    let failed_once = Arc::new(Mutex::new(HashSet::new()));
    let handler = {
        let (pool, inbox, failed_once) = (pool.clone(), inbox.clone(), Arc::clone(&failed_once));
        move |message: Received| {
            let (pool, inbox, failed_once) =
                (pool.clone(), inbox.clone(), Arc::clone(&failed_once));
            async move {
                let cents = amount(&message, &failed_once)?;
                let mut client = pool.get().await.map_err(|e| e.to_string())?;
                common::credit(&mut client, &inbox, &message.id, cents)
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            }
        }
    };

    // The batch handler: one transaction for the whole batch.
    let batch_handler = {
        let (pool, inbox, failed_once) = (pool.clone(), inbox.clone(), Arc::clone(&failed_once));
        move |batch: Vec<Received>| {
            let (pool, inbox, failed_once) =
                (pool.clone(), inbox.clone(), Arc::clone(&failed_once));
            async move {
                let mut credits = Vec::new();
                for message in &batch {
                    credits.push((message.id.as_str(), amount(message, &failed_once)?));
                }
                let mut client = pool.get().await.map_err(|e| e.to_string())?;
                common::credit_many(&mut client, &inbox, &credits)
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            }
        }
    };

    let dead_letters = Arc::new(DeadLetters::connect(&database, "ledger").unwrap());
    let config = RunnerConfig {
        concurrency: 4,
        max_attempts: 3,
        backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
        fetch_wait: Duration::from_millis(200),
        ..RunnerConfig::default()
    };
    let dropped = Arc::new(Mutex::new(0));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    // Two consumer instances on one durable consumer share the messages.
    let runners: Vec<_> = (0..2)
        .map(|_| {
            let subscription = {
                let stream = stream.clone();
                let dropped = Arc::clone(&dropped);
                async move {
                    let inner =
                        JetStreamSubscription::durable(&stream, "ledger", Duration::from_secs(1))
                            .await
                            .unwrap();
                    DroppingAcks { inner, dropped }
                }
            };
            let (handler, dead_letters) = (handler.clone(), Arc::clone(&dead_letters));
            let batch_handler = batch_handler.clone();
            let mut stopped = stopped.clone();
            tokio::spawn(async move {
                let shutdown = async move {
                    let _ = stopped.wait_for(|stop| *stop).await;
                };
                let subscription = subscription.await;
                if batched {
                    let config = RunnerConfig { concurrency: 20, ..config };
                    consume::run_batches(
                        subscription,
                        batch_handler,
                        dead_letters,
                        config,
                        shutdown,
                    )
                    .await
                } else {
                    consume::run(subscription, handler, dead_letters, config, shutdown).await
                }
            })
        })
        .collect();

    let (observer, connection) = tokio_postgres::connect(&database, NoTls).await.unwrap();
    tokio::spawn(connection);
    let started = Instant::now();
    loop {
        let row = observer
            .query_one(
                "SELECT (SELECT count(*) FROM applied), (SELECT count(*) FROM idem_dead_letters)",
                &[],
            )
            .await
            .unwrap();
        let (applied, buried): (i64, i64) = (row.get(0), row.get(1));
        if applied as usize == PAYMENTS - POISON.len() && buried as usize == POISON.len() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "stuck at {applied} applied, {buried} dead letters"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let the redeliveries of dropped acks come back and be absorbed, then stop.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    stop.send(true).unwrap();
    let (mut handled, mut retried) = (0, 0);
    for runner in runners {
        let report = runner.await.unwrap();
        // A copy that arrived while its first was still waiting is settled with it.
        handled += report.handled + report.copies;
        retried += report.retried;
    }

    let row = observer
        .query_one(
            "SELECT (SELECT cents FROM ledger WHERE id = 1), count(*), count(DISTINCT message_id) FROM applied",
            &[],
        )
        .await
        .unwrap();
    let (cents, applied, distinct): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    let expected: i64 =
        (0..PAYMENTS).filter(|index| !POISON.contains(index)).map(|index| index as i64 + 1).sum();
    assert_eq!((applied, distinct), (995, 995), "each payment applied exactly once");
    assert_eq!(cents, expected, "the balance equals the sum of the applied payments");
    let dead = observer
        .query(
            "SELECT message_id, attempts, failure FROM idem_dead_letters ORDER BY message_id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(dead.len(), POISON.len());
    for row in &dead {
        assert_eq!(row.get::<_, i64>(1), 3, "dead-lettered after max_attempts");
        assert!(row.get::<_, String>(2).contains("account closed"), "the failure is recorded");
    }
    let dropped = *dropped.lock().unwrap();
    assert!(dropped > 50, "acks were dropped on purpose ({dropped})");
    assert!(
        handled as usize >= PAYMENTS + REPUBLISHED - POISON.len(),
        "duplicates were handled (as no-ops)"
    );
    println!(
        "consumer ({name}): {} messages on the stream ({REPUBLISHED} published twice on purpose), {dropped} acks dropped, \
         {handled} handled, {retried} retries; applied {applied} once each, balance {cents}, {} dead letters",
        PAYMENTS + REPUBLISHED,
        dead.len()
    );
}

/// A payment's amount, or the failure its kind calls for: `poison` always fails, `flaky` fails
/// on its first attempt.
fn amount(message: &Received, failed_once: &Mutex<HashSet<String>>) -> Result<i64, String> {
    let text = String::from_utf8_lossy(&message.payload);
    let (kind, cents) = text.split_once(':').ok_or("malformed payment")?;
    if kind == "poison" {
        return Err(format!("payment {} cannot be applied: account closed", message.id));
    }
    if kind == "flaky" && failed_once.lock().unwrap().insert(message.id.clone()) {
        return Err("database hiccup".into());
    }
    cents.parse().map_err(|_| "malformed amount".into())
}
