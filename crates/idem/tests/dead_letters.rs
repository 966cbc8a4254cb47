//! `idem dead-letters` against the real PostgreSQL and NATS JetStream: an outbox event that
//! its consumer cannot handle is buried after its attempts; the operator lists it, fails to
//! put it back while the broker is unreachable or still remembers its id (it stays buried
//! each time), fixes the consumer, requeues it, and its effect is applied exactly once, even
//! when the requeued copy arrives twice.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use common::{free_port, idem_bin};
use idem_core::conformance::{fresh_postgres_schema, service_url};
use idem_stream::consume::{self, Failure, Received, RunnerConfig};
use idem_stream::nats::{JetStreamPublisher, JetStreamSubscription};
use idem_stream::postgres::{Applied, DeadLetters, Event, Inbox, Outbox, Relay, RelayConfig};
use idem_stream::publish::Publisher;
use tokio_postgres::NoTls;

/// Runs `idem dead-letters --database DATABASE ARGS...`: exit code, stdout, stderr.
fn dead_letters_cli(database: &str, args: &[&str]) -> (i32, String, String) {
    let output = common::exits_within_20s(
        Command::new(idem_bin()).args(["dead-letters", "--database", database]).args(args),
    );
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

async fn wait_until<F: Future<Output = bool>>(what: &str, within: Duration, check: impl Fn() -> F) {
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The test stream's duplicate window: long enough that the first requeue lands inside it
/// on a loaded machine.
const WINDOW: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_letter_requeued_after_the_fix_is_applied_exactly_once() {
    let Some(nats) = service_url("IDEM_TEST_NATS_URL") else { return };
    let Some(database) = fresh_postgres_schema("idem_dead_letters_cli").await else { return };
    let (mut client, connection) = tokio_postgres::connect(&database, NoTls).await.unwrap();
    tokio::spawn(connection);
    Outbox::migrate(&mut client).await.unwrap();
    Inbox::migrate(&mut client).await.unwrap();
    client
        .batch_execute(
            "CREATE TABLE orders_applied (message_id text NOT NULL, payload text NOT NULL)",
        )
        .await
        .unwrap();

    // A stream that forgets message ids after 15 s (2 minutes by default).
    let jetstream = jetstream::new(async_nats::connect(&nats).await.unwrap());
    let pid = std::process::id();
    let (stream_name, subject) = (format!("IDEMTEST_DL_{pid}"), format!("idemtest.dl.{pid}"));
    let _ = jetstream.delete_stream(&stream_name).await;
    let mut stream = jetstream
        .create_stream(stream::Config {
            name: stream_name.clone(),
            subjects: vec![subject.clone()],
            duplicate_window: WINDOW,
            ..Default::default()
        })
        .await
        .unwrap();

    let transaction = client.transaction().await.unwrap();
    for (key, payload) in [("order-1", "fine-1"), ("order-2", "poison"), ("order-3", "fine-3")] {
        let headers = [("x-tenant", "acme")];
        let event = Event { topic: &subject, key, payload: payload.as_bytes(), headers: &headers };
        Outbox::enqueue(&transaction, event).await.unwrap();
    }
    transaction.commit().await.unwrap();
    let relay = Relay::new(JetStreamPublisher::new(jetstream.clone()), RelayConfig::default());
    assert_eq!(relay.run_until_idle(&mut client, 10).await.unwrap(), 3, "all three published");
    let published_at = Instant::now();

    // The consumer applies each message through the inbox; "poison" fails until it is fixed.
    let fixed = Arc::new(AtomicBool::new(false));
    let pool = {
        let config: tokio_postgres::Config = database.parse().unwrap();
        let manager = deadpool_postgres::Manager::new(config, NoTls);
        deadpool_postgres::Pool::builder(manager).max_size(4).build().unwrap()
    };
    let inbox = Arc::new(Inbox::new("orders").unwrap());
    let handler = {
        let (fixed, pool, inbox) = (Arc::clone(&fixed), pool.clone(), Arc::clone(&inbox));
        move |message: Received| {
            let (fixed, pool, inbox) = (Arc::clone(&fixed), pool.clone(), Arc::clone(&inbox));
            async move {
                let payload = String::from_utf8_lossy(&message.payload).into_owned();
                if payload == "poison" && !fixed.load(Ordering::SeqCst) {
                    return Err(Failure::rejected("cannot parse the order"));
                }
                let mut client =
                    pool.get().await.map_err(|e| Failure::unavailable(e.to_string()))?;
                let transaction =
                    client.transaction().await.map_err(|e| Failure::unavailable(e.to_string()))?;
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] =
                    [&message.id, &payload];
                let effect = transaction.execute(
                    "INSERT INTO orders_applied (message_id, payload) VALUES ($1, $2)",
                    &params,
                );
                match inbox.apply(&transaction, &message.id, effect).await {
                    Ok(Applied::First(Ok(_))) => transaction.commit().await.map(drop),
                    Ok(Applied::First(Err(error))) => Err(error),
                    Ok(Applied::Duplicate) => transaction.rollback().await,
                    Err(error) => return Err(Failure::unavailable(error.to_string())),
                }
                .map_err(|e| Failure::unavailable(e.to_string()))
            }
        }
    };
    let config = RunnerConfig {
        max_attempts: 2,
        backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(100),
        fetch_wait: Duration::from_millis(100),
        ..RunnerConfig::default()
    };
    let subscription =
        JetStreamSubscription::durable(&stream, "orders", Duration::from_secs(5)).await.unwrap();
    let dead_letters = Arc::new(DeadLetters::connect(&database, "orders").unwrap());
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let consumer =
        tokio::spawn(consume::run(subscription, handler, dead_letters, config, async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        }));

    let applied = |payload: &'static str| {
        let client = &client;
        async move {
            let row = client
                .query_one("SELECT count(*) FROM orders_applied WHERE payload = $1", &[&payload])
                .await
                .unwrap();
            row.get::<_, i64>(0)
        }
    };
    let buried = || async { DeadLetters::list(&client, None, 10).await.unwrap() };
    wait_until("the poison message buried", Duration::from_secs(20), || async {
        buried().await.len() == 1
    })
    .await;
    wait_until("the fine ones applied", Duration::from_secs(20), || async {
        applied("fine-1").await == 1 && applied("fine-3").await == 1
    })
    .await;
    let listed = buried().await.remove(0);
    assert_eq!((listed.payload_bytes, listed.payload.len()), (6, 0), "a list leaves payloads out");
    let letter = DeadLetters::get(&client, listed.id).await.unwrap().expect("the listed one");
    assert_eq!(letter.consumer, "orders");
    assert_eq!(letter.subject, subject);
    assert_eq!(letter.payload.as_ref(), b"poison");
    assert!(letter.message_id.starts_with("idem-outbox-"), "{letter:?}");
    assert!(letter.failure.contains("cannot parse the order"), "{letter:?}");
    let id = letter.id.to_string();

    // The operator sees it, with its failure.
    let (code, out, err) = dead_letters_cli(&database, &["list"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("consumer orders: 1 dead letter(s)"), "{out}");
    assert!(out.contains(&letter.message_id) && out.contains("cannot parse the order"), "{out}");
    let (code, out, err) = dead_letters_cli(&database, &["show", &id]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("header       x-tenant: acme") && out.contains("payload      poison"),
        "{out}"
    );

    // A broker that cannot be reached: an error, and the dead letter stays.
    let closed = format!("nats://127.0.0.1:{}", free_port());
    let (code, out, err) = dead_letters_cli(&database, &["requeue", &id, "--broker", &closed]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("--broker nats://127.0.0.1:"), "{err}");
    assert_eq!(buried().await.len(), 1, "the dead letter stays after a failed requeue");

    // Within the stream's duplicate window the copy would be dropped: refused, and it stays.
    // (The window counts from the relay's publish, a few seconds ago.)
    assert!(
        published_at.elapsed() < WINDOW - Duration::from_secs(2),
        "this machine took {:?} to get here, too close to the {WINDOW:?} window for the next step",
        published_at.elapsed()
    );
    let (code, out, err) = dead_letters_cli(&database, &["requeue", &id, "--broker", &nats]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains(&format!("dead letter {id} stays")) && out.contains("duplicate"), "{out}");
    assert_eq!(buried().await.len(), 1, "the dead letter stays after a refused requeue");
    assert_eq!(applied("poison").await, 0);
    tokio::time::sleep(WINDOW).await;

    // Fixed, then requeued: applied once, and the dead letter is gone.
    fixed.store(true, Ordering::SeqCst);
    let (code, out, err) = dead_letters_cli(&database, &["requeue", &id, "--broker", &nats]);
    assert_eq!(code, 0, "{out}{err}");
    let requeued = format!("requeued dead letter {id}: message {}", letter.message_id);
    assert!(out.contains(&requeued), "{out}");
    wait_until("the requeued message applied", Duration::from_secs(20), || async {
        applied("poison").await == 1
    })
    .await;
    assert!(buried().await.is_empty(), "the requeued dead letter was removed");
    let (code, out, _) = dead_letters_cli(&database, &["list"]);
    assert_eq!((code, out.as_str()), (0, "no dead letters\n"));
    let (code, out, _) = dead_letters_cli(&database, &["requeue", &id, "--broker", &nats]);
    assert_eq!((code, out.trim()), (1, format!("no dead letter {id}").as_str()));

    // The requeued copy arriving a second time (a requeue repeated after the database failed
    // to remove it, once the window passed): the inbox takes it once.
    tokio::time::sleep(WINDOW).await;
    let again = letter.to_outbox_message().unwrap();
    let published = JetStreamPublisher::new(jetstream.clone()).publish(&[again]).await;
    assert!(published[0].is_ok(), "{published:?}");
    let on_stream = stream.info().await.unwrap().state.messages;
    assert_eq!(on_stream, 5, "three events, the requeued copy and the repeated one");
    wait_until("the consumer caught up", Duration::from_secs(20), || async {
        let mut consumer =
            stream.get_consumer::<jetstream::consumer::pull::Config>("orders").await.unwrap();
        let info = consumer.info().await.unwrap();
        info.num_pending == 0 && info.num_ack_pending == 0
    })
    .await;
    assert_eq!(applied("poison").await, 1, "a repeated requeue is applied once");
    assert_eq!(applied("fine-1").await + applied("fine-3").await, 2);

    // Through the wrong broker: Redis would make a new stream nobody reads, so a stream
    // without a consumer group is refused, and the dead letter stays.
    if let Some(redis_url) = service_url("IDEM_TEST_REDIS_URL") {
        let lost_subject = format!("idemtest.dl.{pid}.nowhere");
        let id: i64 = client
            .query_one(
                "INSERT INTO idem_dead_letters (consumer, message_id, subject, payload, headers, attempts, failure)
                 VALUES ('orders', 'idem-outbox-999999', $1, 'x', '{Idem-Key,k,Idem-Seq,1}', 2, 'boom') RETURNING id",
                &[&lost_subject],
            )
            .await
            .unwrap()
            .get(0);
        let (code, out, err) =
            dead_letters_cli(&database, &["requeue", &id.to_string(), "--broker", &redis_url]);
        assert_eq!(code, 1, "{out}{err}");
        assert!(
            out.contains("dead letter") && out.contains("stays") && out.contains(&lost_subject),
            "{out}"
        );
        let mut redis = redis::Client::open(redis_url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let exists: i64 =
            redis::cmd("EXISTS").arg(&lost_subject).query_async(&mut redis).await.unwrap();
        assert_eq!(exists, 0, "no stream was made");
        assert_eq!(buried().await.len(), 1, "the dead letter stays");
        let (code, _, _) = dead_letters_cli(&database, &["delete", &id.to_string()]);
        assert_eq!(code, 0);
    }

    // Delete gives a dead letter up: bury one by hand and delete it.
    client
        .execute(
            "INSERT INTO idem_dead_letters (consumer, message_id, subject, payload, headers, attempts, failure)
             VALUES ('orders', 'elsewhere-1', $1, 'x', '{}', 5, 'boom')",
            &[&subject],
        )
        .await
        .unwrap();
    let other = buried().await.remove(0);
    let (code, out, _) =
        dead_letters_cli(&database, &["requeue", &other.id.to_string(), "--broker", &nats]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("an idem relay did not publish it"), "{out}");
    let (code, out, _) = dead_letters_cli(&database, &["delete", &other.id.to_string()]);
    assert_eq!((code, out.contains("deleted dead letter")), (0, true), "{out}");
    assert!(buried().await.is_empty());
    let (code, _, err) = dead_letters_cli(&database, &["list", "--limit", "0"]);
    assert_eq!(code, 2);
    assert!(err.contains("--limit must be 1 to 1000"), "{err}");

    let _ = stop.send(true);
    consumer.await.unwrap();
    let _ = jetstream.delete_stream(&stream_name).await;
}
