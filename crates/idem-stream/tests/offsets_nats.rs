//! The offsets mode against the real JetStream and PostgreSQL: 2,000 payments over 10
//! partitions (subjects), some failing once, a few always (dead-lettered). The consumer is
//! killed mid-stream (its runner aborted while handlers are in flight; their transactions
//! commit or not on their own), a new one starts from the recorded positions, and then a third
//! after everything was applied. Every payment is applied once, the balance is the sum, and the
//! state is one row per partition.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use idem_core::conformance::service_url;
use idem_stream::consume::{self, Failure, OrderBy, Received, RunnerConfig};
use idem_stream::nats::JetStreamPartitions;
use idem_stream::postgres::{DeadLetters, Offsets};
use idem_stream::{Delivery, Error};
use tokio_postgres::NoTls;

const PAYMENTS: usize = 2_000;
const PARTITIONS: usize = 10;

/// Applies a payment in the transaction that advances its partition's position.
async fn apply(
    pool: &deadpool_postgres::Pool,
    offsets: &Offsets,
    message: &Received,
    cents: i64,
) -> Result<(), Failure> {
    let mut client = pool.get().await.map_err(Failure::unavailable)?;
    let transaction = client.transaction().await.map_err(Error::from)?;
    let position = message.position.ok_or("no position")?;
    if offsets.advance(&transaction, &message.subject, position).await? == Delivery::First {
        transaction
            .execute("UPDATE ledger SET cents = cents + $1 WHERE id = 1", &[&cents])
            .await
            .map_err(Error::from)?;
        transaction
            .execute("INSERT INTO applied VALUES ($1)", &[&message.id])
            .await
            .map_err(Error::from)?;
    }
    transaction.commit().await.map_err(Error::from)?;
    Ok(())
}

async fn consumer(
    stream: &stream::Stream,
    prefix: &str,
    pool: deadpool_postgres::Pool,
    failed_once: Arc<Mutex<HashSet<String>>>,
    database: &str,
) -> tokio::task::JoinHandle<consume::RunReport> {
    let offsets = Offsets::new("ledger").unwrap();
    let client = pool.get().await.unwrap();
    let positions = offsets.positions(&**client).await.unwrap();
    drop(client);
    let partitions = (0..PARTITIONS).map(|p| {
        let subject = format!("{prefix}.p{p}");
        let after = positions.get(&subject).copied().unwrap_or(0);
        (subject, after)
    });
    let subscription = JetStreamPartitions::start(stream, partitions).await.unwrap();
    let handler = move |message: Received| {
        let (pool, offsets, failed_once) =
            (pool.clone(), offsets.clone(), Arc::clone(&failed_once));
        async move {
            let text = String::from_utf8_lossy(&message.payload).into_owned();
            let (kind, cents) = text.split_once(':').ok_or("no kind")?;
            let cents: i64 = cents.parse().map_err(|_| "bad amount")?;
            if kind == "poison" {
                return Err(Failure::rejected("account closed"));
            }
            if kind == "flaky" && failed_once.lock().unwrap().insert(message.id.clone()) {
                return Err(Failure::rejected("flaky: fails once"));
            }
            apply(&pool, &offsets, &message, cents).await
        }
    };
    let config = RunnerConfig {
        concurrency: 8,
        max_attempts: 3,
        backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
        fetch_wait: Duration::from_millis(100),
        order_by: OrderBy::Subject,
        ..RunnerConfig::default()
    };
    let dead_letters = Arc::new(DeadLetters::connect(database, "ledger").unwrap());
    tokio::spawn(consume::run(subscription, handler, dead_letters, config, std::future::pending()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn offsets_apply_each_payment_once_through_a_killed_consumer() {
    let Some(nats) = service_url("IDEM_TEST_NATS_URL") else { return };
    let Some((mut client, database)) = common::ledger_database("idem_offsets_nats").await else {
        return;
    };
    Offsets::migrate(&mut client).await.unwrap();
    let jetstream = jetstream::new(async_nats::connect(&nats).await.unwrap());
    let prefix = format!("idemtest.offsets.{}", std::process::id());
    let name = format!("IDEM_OFFSETS_{}", std::process::id());
    let _ = jetstream.delete_stream(&name).await;
    let stream = jetstream
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![format!("{prefix}.>")],
            ..Default::default()
        })
        .await
        .unwrap();
    let poison: HashSet<usize> = [17, 444, 1999].into();
    for index in 0..PAYMENTS {
        let kind = if poison.contains(&index) {
            "poison"
        } else if index % 37 == 0 {
            "flaky"
        } else {
            "ok"
        };
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("payment-{index}").as_str());
        let subject = format!("{prefix}.p{}", index % PARTITIONS);
        let payload = Bytes::from(format!("{kind}:{}", index + 1));
        jetstream.publish_with_headers(subject, headers, payload).await.unwrap().await.unwrap();
    }
    let pool = {
        let config: tokio_postgres::Config = database.parse().unwrap();
        deadpool_postgres::Pool::builder(deadpool_postgres::Manager::new(config, NoTls))
            .max_size(16)
            .build()
            .unwrap()
    };
    let failed_once: Arc<Mutex<HashSet<String>>> = Arc::default();
    let applied = async || -> i64 {
        client.query_one("SELECT count(*) FROM applied", &[]).await.unwrap().get(0)
    };

    // The first consumer, killed mid-stream.
    let first = consumer(&stream, &prefix, pool.clone(), Arc::clone(&failed_once), &database).await;
    let started = Instant::now();
    while applied().await < 600 {
        assert!(started.elapsed() < Duration::from_secs(60), "the first consumer is stuck");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.abort();
    let _ = first.await;
    let at_kill = applied().await;

    // A new one from the recorded positions, until everything is applied or buried.
    let second =
        consumer(&stream, &prefix, pool.clone(), Arc::clone(&failed_once), &database).await;
    let expected_applied = (PAYMENTS - poison.len()) as i64;
    let started = Instant::now();
    loop {
        let buried: i64 =
            client.query_one("SELECT count(*) FROM idem_dead_letters", &[]).await.unwrap().get(0);
        if applied().await >= expected_applied && buried >= poison.len() as i64 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "stuck at {}", applied().await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    second.abort();
    let _ = second.await;
    // A third, after everything: reads nothing again (every position recorded).
    let third = consumer(&stream, &prefix, pool.clone(), Arc::clone(&failed_once), &database).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    third.abort();
    let _ = third.await;

    let row = client
        .query_one(
            "SELECT (SELECT cents FROM ledger WHERE id = 1), count(*), count(DISTINCT message_id)
             FROM applied",
            &[],
        )
        .await
        .unwrap();
    let (cents, total, distinct): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    let sum: i64 =
        (0..PAYMENTS).filter(|index| !poison.contains(index)).map(|index| index as i64 + 1).sum();
    assert_eq!((total, distinct), (expected_applied, expected_applied), "each payment once");
    assert_eq!(cents, sum, "the balance is the sum");
    let state: i64 =
        client.query_one("SELECT count(*) FROM idem_offsets", &[]).await.unwrap().get(0);
    assert_eq!(state, PARTITIONS as i64, "one row per partition");
    println!(
        "offsets: {PAYMENTS} payments over {PARTITIONS} partitions; consumer killed at {at_kill} applied; \
         after restart {total} applied once each, balance {cents}, {} dead letters, {state} offset rows",
        poison.len()
    );
    let _ = jetstream.delete_stream(&name).await;
}
