//! The offsets mode against the real brokers and PostgreSQL, on each source with positions
//! (JetStream subjects, Redis streams): 2,000 payments over 10 partitions, some failing once,
//! a few always (dead-lettered). The consumer is killed mid-stream (its runner aborted while
//! handlers are in flight; their transactions commit or not on their own), a new one starts
//! from the recorded positions, and then a third after everything was applied. Every payment
//! is applied once, the balance is the sum, and the state is one row per partition.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use idem_core::conformance::service_url;
use idem_stream::consume::{self, Failure, OrderBy, Received, RunnerConfig, Subscription};
use idem_stream::nats::JetStreamPartitions;
use idem_stream::postgres::{DeadLetters, Offsets};
use idem_stream::redis_streams::RedisStreamsPartitions;
use idem_stream::{Delivery, Error};
use tokio_postgres::NoTls;

const PAYMENTS: usize = 2_000;
const PARTITIONS: usize = 10;

/// Payment `index`: its kind (`ok`, `flaky`: fails once, `poison`: always) and amount.
fn payment(index: usize) -> (&'static str, i64) {
    let kind = if POISON.contains(&index) {
        "poison"
    } else if index % 37 == 0 {
        "flaky"
    } else {
        "ok"
    };
    (kind, index as i64 + 1)
}

const POISON: [usize; 3] = [17, 444, 1999];

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

/// A consumer reading `partitions` from the positions recorded so far, through `start`.
async fn consumer<S, F, Fut>(
    partitions: &[String],
    start: &F,
    pool: deadpool_postgres::Pool,
    failed_once: Arc<Mutex<HashSet<String>>>,
    database: &str,
) -> tokio::task::JoinHandle<consume::RunReport>
where
    S: Subscription + Sync + 'static,
    F: Fn(Vec<(String, u64)>) -> Fut,
    Fut: Future<Output = S>,
{
    let offsets = Offsets::new("ledger").unwrap();
    let client = pool.get().await.unwrap();
    let positions: HashMap<String, u64> = offsets.positions(&**client).await.unwrap();
    drop(client);
    let from = partitions
        .iter()
        .map(|partition| (partition.clone(), positions.get(partition).copied().unwrap_or(0)))
        .collect();
    let subscription = start(from).await;
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

/// Kills a consumer mid-stream, runs a second to the end and a third after it, over the
/// payments already published to `partitions`, and checks every effect; `label` names the
/// source in the printed summary.
async fn kill_restart_and_count<S, F, Fut>(
    label: &str,
    partitions: &[String],
    start: F,
    mut client: tokio_postgres::Client,
    database: &str,
) where
    S: Subscription + Sync + 'static,
    F: Fn(Vec<(String, u64)>) -> Fut,
    Fut: Future<Output = S>,
{
    Offsets::migrate(&mut client).await.unwrap();
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
    let run = |pool: deadpool_postgres::Pool| {
        consumer(partitions, &start, pool, Arc::clone(&failed_once), database)
    };

    // The first consumer, killed mid-stream.
    let first = run(pool.clone()).await;
    let started = Instant::now();
    while applied().await < 600 {
        assert!(started.elapsed() < Duration::from_secs(60), "the first consumer is stuck");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.abort();
    let _ = first.await;
    let at_kill = applied().await;

    // A new one from the recorded positions, until everything is applied or buried.
    let second = run(pool.clone()).await;
    let expected_applied = (PAYMENTS - POISON.len()) as i64;
    let started = Instant::now();
    loop {
        let buried: i64 =
            client.query_one("SELECT count(*) FROM idem_dead_letters", &[]).await.unwrap().get(0);
        if applied().await >= expected_applied && buried >= POISON.len() as i64 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "stuck at {}", applied().await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    second.abort();
    let _ = second.await;
    // A third, after everything: reads nothing again (every position recorded).
    let third = run(pool.clone()).await;
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
    let sum: i64 = (0..PAYMENTS)
        .map(payment)
        .filter(|(kind, _)| *kind != "poison")
        .map(|(_, cents)| cents)
        .sum();
    assert_eq!((total, distinct), (expected_applied, expected_applied), "each payment once");
    assert_eq!(cents, sum, "the balance is the sum");
    let state: i64 =
        client.query_one("SELECT count(*) FROM idem_offsets", &[]).await.unwrap().get(0);
    assert_eq!(state, PARTITIONS as i64, "one row per partition");
    let buried: i64 =
        client.query_one("SELECT count(*) FROM idem_dead_letters", &[]).await.unwrap().get(0);
    assert_eq!(buried, POISON.len() as i64, "each poison payment buried once");
    println!(
        "offsets on {label}: {PAYMENTS} payments over {PARTITIONS} partitions; consumer killed at {at_kill} applied; \
         after restart {total} applied once each, balance {cents}, {buried} dead letters, {state} offset rows"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn offsets_on_jetstream_apply_each_payment_once_through_a_killed_consumer() {
    let Some(nats) = service_url("IDEM_TEST_NATS_URL") else { return };
    let Some((client, database)) = common::ledger_database("idem_offsets_nats").await else {
        return;
    };
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
    let partitions: Vec<String> = (0..PARTITIONS).map(|p| format!("{prefix}.p{p}")).collect();
    for index in 0..PAYMENTS {
        let (kind, cents) = payment(index);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("payment-{index}").as_str());
        let subject = partitions[index % PARTITIONS].clone();
        let payload = Bytes::from(format!("{kind}:{cents}"));
        jetstream.publish_with_headers(subject, headers, payload).await.unwrap().await.unwrap();
    }
    let start = |from: Vec<(String, u64)>| {
        let stream = stream.clone();
        async move { JetStreamPartitions::start(&stream, from).await.unwrap() }
    };
    kill_restart_and_count("JetStream", &partitions, start, client, &database).await;
    let _ = jetstream.delete_stream(&name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn offsets_on_redis_streams_apply_each_payment_once_through_a_killed_consumer() {
    let Some(redis_url) = service_url("IDEM_TEST_REDIS_URL") else { return };
    let Some((client, database)) = common::ledger_database("idem_offsets_redis").await else {
        return;
    };
    let redis = redis::Client::open(redis_url.as_str()).unwrap();
    let mut connection = redis.get_multiplexed_async_connection().await.unwrap();
    let partitions: Vec<String> =
        (0..PARTITIONS).map(|p| format!("idemtest:offsets:{}:p{p}", std::process::id())).collect();
    let _: () = redis::cmd("DEL").arg(&partitions).query_async(&mut connection).await.unwrap();
    for chunk in (0..PAYMENTS).collect::<Vec<_>>().chunks(500) {
        let mut pipeline = redis::pipe();
        for &index in chunk {
            let (kind, cents) = payment(index);
            pipeline
                .cmd("XADD")
                .arg(&partitions[index % PARTITIONS])
                .arg("*")
                .arg("id")
                .arg(format!("payment-{index}"))
                .arg("payload")
                .arg(format!("{kind}:{cents}"));
        }
        let _: Vec<String> = pipeline.query_async(&mut connection).await.unwrap();
    }
    let start = |from: Vec<(String, u64)>| {
        let redis = redis.clone();
        async move { RedisStreamsPartitions::start(&redis, from).await.unwrap() }
    };
    kill_restart_and_count("Redis Streams", &partitions, start, client, &database).await;
    let _: () = redis::cmd("DEL").arg(&partitions).query_async(&mut connection).await.unwrap();
}

/// A stream with a backlog does not crowd out the others in a fetch, and a stream whose next
/// entry id cannot be a position stops there while the others go on; alone, it is an error
/// that says why.
#[tokio::test]
async fn redis_partitions_share_each_fetch_and_an_unreadable_id_stops_only_its_stream() {
    let Some(redis_url) = service_url("IDEM_TEST_REDIS_URL") else { return };
    let redis = redis::Client::open(redis_url.as_str()).unwrap();
    let mut connection = redis.get_multiplexed_async_connection().await.unwrap();
    let name = |what: &str| format!("idemtest:offsets-share:{}:{what}", std::process::id());
    let (busy, quiet, odd) = (name("busy"), name("quiet"), name("odd"));
    let _: () =
        redis::cmd("DEL").arg(&[&busy, &quiet, &odd]).query_async(&mut connection).await.unwrap();
    let mut pipeline = redis::pipe();
    for index in 0..500 {
        pipeline.cmd("XADD").arg(&busy).arg("*").arg("payload").arg(format!("busy {index}"));
    }
    for index in 0..3 {
        pipeline.cmd("XADD").arg(&quiet).arg("*").arg("payload").arg(format!("quiet {index}"));
    }
    // An id a producer chose, with a sequence past 2^20.
    pipeline.cmd("XADD").arg(&odd).arg(format!("1-{}", 1 << 21)).arg("payload").arg("odd");
    let _: Vec<String> = pipeline.query_async(&mut connection).await.unwrap();

    let mut partitions = RedisStreamsPartitions::start(
        &redis,
        [(busy.clone(), 0), (quiet.clone(), 0), (odd.clone(), 0)],
    )
    .await
    .unwrap();
    let wait = Duration::from_millis(200);
    let first = partitions.fetch(8, wait).await.unwrap();
    let from = |batch: &[(Received, ())], stream: &str| {
        batch.iter().filter(|(message, ())| message.subject == stream).count()
    };
    assert!(first.len() <= 8 && from(&first, &busy) > 0, "{}", first.len());
    assert_eq!(from(&first, &quiet), 3, "the quiet stream's entries come in the first fetch");
    assert_eq!(from(&first, &odd), 0);
    // Every busy entry, once each, in order, while the odd stream stays where it is.
    let mut busy_seen: Vec<String> = first
        .iter()
        .filter(|(message, ())| message.subject == busy)
        .map(|(message, ())| String::from_utf8_lossy(&message.payload).into_owned())
        .collect();
    while busy_seen.len() < 500 {
        let batch = partitions.fetch(50, wait).await.unwrap();
        assert!(!batch.is_empty(), "stuck at {}", busy_seen.len());
        assert_eq!(from(&batch, &odd), 0);
        busy_seen.extend(
            batch
                .iter()
                .map(|(message, ())| String::from_utf8_lossy(&message.payload).into_owned()),
        );
    }
    let expected: Vec<String> = (0..500).map(|index| format!("busy {index}")).collect();
    assert_eq!(busy_seen, expected);
    // Only the odd entry is left: an error naming it.
    let error = partitions.fetch(8, wait).await.unwrap_err().to_string();
    assert!(error.contains(&format!("1-{}", 1 << 21)) && error.contains(&odd), "{error}");
    let _: () =
        redis::cmd("DEL").arg(&[&busy, &quiet, &odd]).query_async(&mut connection).await.unwrap();
}

/// In the offsets mode two entries at different positions are two messages, even when their
/// content (and so their derived id) is the same: the runner handles both, fetched together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_entries_at_two_positions_are_both_handled() {
    let Some(redis_url) = service_url("IDEM_TEST_REDIS_URL") else { return };
    let redis = redis::Client::open(redis_url.as_str()).unwrap();
    let mut connection = redis.get_multiplexed_async_connection().await.unwrap();
    let stream = format!("idemtest:offsets-same:{}", std::process::id());
    let _: () = redis::cmd("DEL").arg(&stream).query_async(&mut connection).await.unwrap();
    let mut pipeline = redis::pipe();
    for payload in ["deposit:1", "deposit:100", "deposit:100", "deposit:5"] {
        pipeline.cmd("XADD").arg(&stream).arg("*").arg("payload").arg(payload);
    }
    let _: Vec<String> = pipeline.query_async(&mut connection).await.unwrap();
    let partitions = RedisStreamsPartitions::start(&redis, [(stream.clone(), 0)]).await.unwrap();
    let handled: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let done = Arc::new(tokio::sync::Notify::new());
    let handler = {
        let (handled, done) = (Arc::clone(&handled), Arc::clone(&done));
        move |message: Received| {
            let (handled, done) = (Arc::clone(&handled), Arc::clone(&done));
            async move {
                let mut handled = handled.lock().unwrap();
                let payload = String::from_utf8_lossy(&message.payload).into_owned();
                handled.push((payload, message.position.unwrap()));
                if handled.len() == 4 {
                    done.notify_one();
                }
                Ok::<(), Failure>(())
            }
        }
    };
    struct Unused;
    #[async_trait::async_trait]
    impl consume::DeadLetter for Unused {
        async fn bury(&self, message: &Received, failure: &str) -> idem_stream::Result<()> {
            panic!("{} buried: {failure}", message.id)
        }
    }
    let config = RunnerConfig { order_by: OrderBy::Subject, ..RunnerConfig::default() };
    let shutdown = {
        let done = Arc::clone(&done);
        async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), done.notified()).await;
        }
    };
    let report = consume::run(partitions, handler, Arc::new(Unused), config, shutdown).await;
    let handled = handled.lock().unwrap().clone();
    let payloads: Vec<&str> = handled.iter().map(|(payload, _)| payload.as_str()).collect();
    assert_eq!(payloads, ["deposit:1", "deposit:100", "deposit:100", "deposit:5"], "{report:?}");
    assert_eq!(report.copies, 0);
    let _: () = redis::cmd("DEL").arg(&stream).query_async(&mut connection).await.unwrap();
}

/// A `nats-server -js` of this test's own (it is killed), on `port` with its store in `dir`.
struct PrivateNats(std::process::Child);

impl PrivateNats {
    fn start(port: u16, dir: &std::path::Path) -> Self {
        let child = std::process::Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server (the JetStream restart test runs its own)");
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(15), "nats-server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self(child)
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The offsets mode's JetStream source outlives its server: killed with `kill -9` and started
/// again on the same store, the server comes back without the ordered consumers, and the
/// source must go on from the last position it delivered, each message once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_on_jetstream_go_on_after_the_server_is_killed_and_restarted() {
    // A server of its own; the shared one only says whether NATS tests run here.
    if service_url("IDEM_TEST_NATS_URL").is_none() {
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = std::env::temp_dir().join(format!("idem-nats-restart-{}-{port}", std::process::id()));
    let mut server = PrivateNats::start(port, &dir);
    let url = format!("nats://127.0.0.1:{port}");
    let jetstream = jetstream::new(async_nats::connect(&url).await.unwrap());
    let subjects = ["restart.p0", "restart.p1"];
    let config = stream::Config {
        name: "RESTART".into(),
        subjects: subjects.iter().map(|s| s.to_string()).collect(),
        storage: stream::StorageType::File,
        ..Default::default()
    };
    let stream = jetstream.create_stream(config).await.unwrap();
    // Each message with an id, so one sent again after a lost acknowledgement is stored once.
    let publish = async |from: usize, to: usize| {
        let started = Instant::now();
        for index in from..to {
            let subject = subjects[index % 2];
            loop {
                let sent = async {
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert("Nats-Msg-Id", format!("restart-{index}").as_str());
                    let payload = Bytes::from(index.to_string());
                    jetstream.publish_with_headers(subject, headers, payload).await?.await?;
                    Ok::<_, Box<dyn std::error::Error>>(())
                };
                match sent.await {
                    Ok(()) => break,
                    Err(error) => {
                        assert!(started.elapsed() < Duration::from_secs(60), "publish: {error}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
    };
    publish(0, 100).await;
    let from = subjects.iter().map(|s| (s.to_string(), 0)).collect::<Vec<_>>();
    let mut source = JetStreamPartitions::start(&stream, from).await.unwrap();
    let mut seen: Vec<(String, u64, String)> = Vec::new();
    let read_until = async |source: &mut JetStreamPartitions, seen: &mut Vec<_>, total: usize| {
        let started = Instant::now();
        while seen.len() < total {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "only {} of {total} messages came within 60 s",
                seen.len()
            );
            let fetched = source.fetch(50, Duration::from_millis(200)).await;
            if fetched.is_err() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if let Ok(batch) = fetched {
                for (message, ()) in batch {
                    let payload = String::from_utf8_lossy(&message.payload).into_owned();
                    seen.push((message.subject, message.position.unwrap(), payload));
                }
            }
        }
    };
    read_until(&mut source, &mut seen, 100).await;

    drop(server);
    tokio::time::sleep(Duration::from_millis(500)).await;
    server = PrivateNats::start(port, &dir);
    publish(100, 200).await;
    read_until(&mut source, &mut seen, 200).await;
    // Nothing more: each message once.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let extra = source.fetch(50, Duration::from_millis(500)).await.unwrap_or_default();
    assert!(extra.is_empty(), "delivered again: {} messages", extra.len());

    let payloads: Vec<usize> = seen.iter().map(|(.., payload)| payload.parse().unwrap()).collect();
    let mut sorted = payloads.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..200).collect::<Vec<_>>(), "each message once");
    for subject in subjects {
        let positions: Vec<u64> =
            seen.iter().filter(|(s, ..)| s == subject).map(|(_, position, _)| *position).collect();
        assert!(positions.windows(2).all(|pair| pair[0] < pair[1]), "{subject} in order");
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
