//! Dead letters that survive their database: poison messages keep flowing while the
//! PostgreSQL holding the inbox and the dead-letter table is stopped and started again. Every
//! good payment applies once (the outage is a `Failure::Unavailable`, retried and never
//! counted, so no good payment is buried for it), every poison message is buried once, and a
//! buried message never runs again. (With one connection that never reconnected, no burial
//! succeeded after the restart and each poison message ran again and again; with every failure
//! counted, good payments caught by the outage were buried.)

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use idem_core::conformance::servers::PrivatePostgres;
use idem_core::conformance::service_url;
use idem_stream::consume::{self, Failure, Received, RunnerConfig};
use idem_stream::nats::JetStreamSubscription;
use idem_stream::postgres::{DeadLetters, Inbox};
use tokio_postgres::NoTls;

const MESSAGES: usize = 400;
/// Every this-many-th message always fails.
const POISON_EVERY: usize = 20;
const MAX_ATTEMPTS: u64 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_messages_are_buried_once_across_a_postgres_restart() {
    let Some(nats) = service_url("IDEM_TEST_NATS_URL") else { return };
    let Some(postgres) = PrivatePostgres::start(55_471) else { return };
    let database = postgres.url();
    let observer = common::ledger_at(&database).await;
    drop(observer);

    let jetstream = jetstream::new(async_nats::connect(&nats).await.unwrap());
    let name = "idem_dead_letters_restart";
    let _ = jetstream.delete_stream(name).await;
    let stream = jetstream
        .create_stream(stream::Config {
            name: name.into(),
            subjects: vec![format!("{name}.>")],
            ..Default::default()
        })
        .await
        .unwrap();
    let producer = {
        let jetstream = jetstream.clone();
        tokio::spawn(async move {
            for index in 0..MESSAGES {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Msg-Id", format!("payment-{index}").as_str());
                let kind = if index % POISON_EVERY == 0 { "poison" } else { "ok" };
                let payload = Bytes::from(format!("{kind}:{}", index + 1));
                let subject = format!("{name}.payments");
                jetstream
                    .publish_with_headers(subject, headers, payload)
                    .await
                    .unwrap()
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    let pool = {
        let config: tokio_postgres::Config = database.parse().unwrap();
        let manager = deadpool_postgres::Manager::new(config, NoTls);
        deadpool_postgres::Pool::builder(manager)
            .max_size(8)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(2)))
            .create_timeout(Some(Duration::from_secs(2)))
            .build()
            .unwrap()
    };
    let runs: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let handler = {
        let (pool, inbox, runs) = (pool.clone(), Inbox::new("ledger").unwrap(), Arc::clone(&runs));
        move |message: Received| {
            let (pool, inbox, runs) = (pool.clone(), inbox.clone(), Arc::clone(&runs));
            async move {
                *runs.lock().unwrap().entry(message.id.clone()).or_default() += 1;
                let payload = String::from_utf8_lossy(&message.payload).into_owned();
                let (kind, cents) = payload.split_once(':').ok_or("no kind")?;
                if kind == "poison" {
                    return Err(Failure::rejected("poison: always fails"));
                }
                let cents: i64 = cents.parse().map_err(|_| "bad amount")?;
                // The database being down is not the message's fault: retried, not counted.
                let mut client = pool.get().await.map_err(Failure::unavailable)?;
                common::credit(&mut client, &inbox, &message.id, cents).await?;
                Ok(())
            }
        }
    };
    let dead_letters = Arc::new(DeadLetters::connect(&database, "ledger").unwrap());
    let config = RunnerConfig {
        concurrency: 8,
        max_attempts: MAX_ATTEMPTS,
        backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        fetch_wait: Duration::from_millis(100),
        ..RunnerConfig::default()
    };
    let subscription =
        JetStreamSubscription::durable(&stream, "ledger", Duration::from_secs(2)).await.unwrap();
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let runner =
        tokio::spawn(consume::run(subscription, handler, dead_letters, config, async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        }));

    // Under load, with poison messages being buried: the database goes away and comes back.
    tokio::time::sleep(Duration::from_millis(600)).await;
    postgres.stop("fast");
    tokio::time::sleep(Duration::from_secs(2)).await;
    postgres.start_again();
    producer.await.unwrap();

    let (observer, connection) = tokio_postgres::connect(&database, NoTls).await.unwrap();
    tokio::spawn(connection);
    let poison = MESSAGES.div_ceil(POISON_EVERY);
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
        if applied as usize == MESSAGES - poison && buried as usize == poison {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "stuck at {applied} applied, {buried} buried of {poison}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let runs_when_done = runs.lock().unwrap().clone();
    // Past the redelivery of anything left unsettled: nothing buried runs again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _ = stop.send(true);
    let report = runner.await.unwrap();
    let runs = runs.lock().unwrap().clone();
    assert_eq!(runs, runs_when_done, "a buried message ran again");
    assert!(report.unavailable > 0, "the outage was met: {report:?}");
    assert_eq!(report.dead_lettered as usize, poison, "{report:?}");

    let row = observer
        .query_one(
            "SELECT count(DISTINCT message_id), count(*), (SELECT cents FROM ledger WHERE id = 1) FROM applied",
            &[],
        )
        .await
        .unwrap();
    let (distinct, total, cents): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    let expected: i64 =
        (0..MESSAGES).filter(|index| index % POISON_EVERY != 0).map(|index| index as i64 + 1).sum();
    assert_eq!(
        (distinct, total, cents),
        ((MESSAGES - poison) as i64, (MESSAGES - poison) as i64, expected)
    );
    let rows = observer
        .query("SELECT message_id, attempts, failure FROM idem_dead_letters", &[])
        .await
        .unwrap();
    for row in &rows {
        let (id, attempts, failure): (String, i64, String) = (row.get(0), row.get(1), row.get(2));
        assert!(attempts >= MAX_ATTEMPTS as i64, "{id} buried after {attempts}");
        assert!(failure.contains("poison"), "{failure}");
    }
    let poison_runs: Vec<u64> = (0..MESSAGES)
        .step_by(POISON_EVERY)
        .map(|index| runs.get(&format!("payment-{index}")).copied().unwrap_or(0))
        .collect();
    eprintln!(
        "dead letters across a restart: {report:?}; poison runs {poison_runs:?}; {} buried",
        rows.len()
    );
    jetstream.delete_stream(name).await.unwrap();
}
