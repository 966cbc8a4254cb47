//! `idem relay` as a real process against the real PostgreSQL, NATS JetStream and RabbitMQ:
//! killed with SIGKILL between publishing and marking sent, restarted, and what reached the
//! broker checked message by message: on JetStream every event exactly once (its deduplication
//! drops the republished copies); on RabbitMQ, which keeps them, every event exactly once
//! through the inbox; every key in order.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use idem_core::conformance::{fresh_postgres_schema, service_url};
use idem_stream::Delivery;
use idem_stream::consume::{Settle, Subscription};
use idem_stream::postgres::{Event, Inbox, Outbox};
use idem_stream::rabbitmq;
use tokio_postgres::NoTls;

const KEYS: usize = 20;
const PER_KEY: usize = 150;

fn start_relay(database: &str, broker: &str) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(["relay", "--database", database, "--broker", broker, "--poll-interval", "100ms"])
        .args(["--max-events-per-key", "150"])
        .env("IDEM_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start idem relay");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert!(line.starts_with("idem relay running"), "unexpected first line {line:?}");
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_killed_between_publish_and_mark_sent_leaves_each_event_once_on_the_stream() {
    let Some(nats) = service_url("IDEM_TEST_NATS_URL") else { return };
    let Some(database) = fresh_postgres_schema("idem_relay_kill").await else { return };
    let (mut client, connection) = tokio_postgres::connect(&database, NoTls).await.unwrap();
    tokio::spawn(connection);
    Outbox::migrate(&mut client).await.unwrap();

    let jetstream = jetstream::new(async_nats::connect(&nats).await.unwrap());
    let _ = jetstream.delete_stream("IDEM_RELAY_KILL").await;
    let mut stream = jetstream
        .create_stream(stream::Config {
            name: "IDEM_RELAY_KILL".into(),
            subjects: vec!["idemtest.relaykill.>".into()],
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .unwrap();

    enqueue_payments(&mut client, "idemtest.relaykill.payments").await;

    // Kill the relay with SIGKILL while its first round is publishing: with 150 events per key
    // that round covers all 3,000 events (150 layers of 20 keys) and commits their marks only
    // at its end, so the kill lands between publish and mark.
    let mut relay = start_relay(&database, &nats);
    let started = Instant::now();
    loop {
        let stored = stream.info().await.unwrap().state.messages;
        if stored > 0 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "the relay published nothing");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    relay.kill().unwrap();
    relay.wait().unwrap();
    let on_stream_at_kill = stream.info().await.unwrap().state.messages;
    let marked_at_kill = marked_sent(&client).await;
    assert!(
        on_stream_at_kill as i64 > marked_at_kill,
        "the kill landed between publish and mark: {on_stream_at_kill} published, {marked_at_kill} marked"
    );

    // A new relay finishes the work; the republished events carry the same ids.
    finish_and_stop(start_relay(&database, &nats), &client).await;

    let last = stream.info().await.unwrap().state.last_sequence;
    assert_eq!(last as usize, KEYS * PER_KEY, "every event exactly once on the stream");
    let mut last_seq: HashMap<String, u64> = HashMap::new();
    let mut ids = std::collections::HashSet::new();
    for sequence in 1..=last {
        let message = stream.get_raw_message(sequence).await.unwrap();
        let header = |name: &str| message.headers.get(name).unwrap().to_string();
        assert!(ids.insert(header("Nats-Msg-Id")), "a message id appears twice");
        let seq: u64 = header("Idem-Seq").parse().unwrap();
        let previous = last_seq.insert(header("Idem-Key"), seq).unwrap_or(0);
        assert_eq!(seq, previous + 1, "per-key order holds across the crash");
    }
    println!(
        "relay SIGKILL: {on_stream_at_kill} events on the stream and {marked_at_kill} marked sent at the kill; \
         after restart {last} on the stream for {} enqueued, each once, {KEYS} keys in order",
        KEYS * PER_KEY
    );
}

/// 3,000 payments over 20 accounts, committed 100 to a transaction.
async fn enqueue_payments(client: &mut tokio_postgres::Client, topic: &str) {
    for batch in 0..(KEYS * PER_KEY / 100) {
        let transaction = client.transaction().await.unwrap();
        for index in batch * 100..(batch + 1) * 100 {
            let key = format!("account-{}", index % KEYS);
            let payload = format!("payment {index}");
            let event = Event { topic, key: &key, payload: payload.as_bytes(), headers: &[] };
            Outbox::enqueue(&transaction, event).await.unwrap();
        }
        transaction.commit().await.unwrap();
    }
}

async fn marked_sent(client: &tokio_postgres::Client) -> i64 {
    // Sent: at or below its key's published sequence (and not discarded).
    let sql = "SELECT count(*) FROM idem_outbox e JOIN idem_outbox_keys k USING (topic, key)
               WHERE e.seq <= k.published_seq AND e.discarded_at IS NULL";
    client.query_one(sql, &[]).await.unwrap().get(0)
}

/// Waits until `relay` marked every event sent, then stops it with SIGTERM.
async fn finish_and_stop(mut relay: Child, client: &tokio_postgres::Client) {
    let started = Instant::now();
    loop {
        let unsent = (KEYS * PER_KEY) as i64 - marked_sent(client).await;
        if unsent == 0 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{unsent} events still unsent");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = Command::new("kill").args(["-TERM", &relay.id().to_string()]).status().unwrap();
    assert!(status.success());
    assert!(relay.wait().unwrap().success(), "SIGTERM stops the relay cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_killed_mid_round_on_rabbitmq_leaves_each_event_applied_once_through_the_inbox() {
    let Some(amqp) = service_url("IDEM_TEST_AMQP_URL") else { return };
    let Some(database) = fresh_postgres_schema("idem_relay_amqp").await else { return };
    let (mut client, connection) = tokio_postgres::connect(&database, NoTls).await.unwrap();
    tokio::spawn(connection);
    Outbox::migrate(&mut client).await.unwrap();
    Inbox::migrate(&mut client).await.unwrap();
    client
        .batch_execute("CREATE TABLE applied (n bigserial PRIMARY KEY, key text, seq bigint)")
        .await
        .unwrap();

    // The default exchange routes each event to the queue named by its topic.
    let queue = format!("idemtest.relay.amqp.{}", std::process::id());
    let broker = lapin::Connection::connect(&amqp, Default::default()).await.unwrap();
    let channel = broker.create_channel().await.unwrap();
    channel.queue_delete(queue.as_str().into(), Default::default()).await.unwrap();
    rabbitmq::declare_queue(&amqp, &queue, "", "").await.unwrap();
    let depth = || async {
        let passive = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
        let declared = channel.queue_declare(queue.as_str().into(), passive, Default::default());
        declared.await.unwrap().message_count()
    };
    enqueue_payments(&mut client, &queue).await;

    let mut relay = start_relay(&database, &amqp);
    let started = Instant::now();
    while depth().await == 0 {
        assert!(started.elapsed() < Duration::from_secs(20), "the relay published nothing");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    relay.kill().unwrap();
    relay.wait().unwrap();
    let (queued_at_kill, marked_at_kill) = (depth().await, marked_sent(&client).await);
    assert!(
        i64::from(queued_at_kill) > marked_at_kill,
        "the kill landed between publish and mark: {queued_at_kill} queued, {marked_at_kill} marked"
    );
    finish_and_stop(start_relay(&database, &amqp), &client).await;

    // RabbitMQ keeps the republished copies; a consumer applies through the inbox.
    let queued = depth().await as usize;
    let inbox = Inbox::new("ledger").unwrap();
    let mut subscription = rabbitmq::RabbitSubscription::consume(&amqp, &queue, 500).await.unwrap();
    let mut delivered = 0;
    while delivered < queued {
        let batch = subscription.fetch(500, Duration::from_secs(5)).await.unwrap();
        assert!(!batch.is_empty(), "only {delivered} of {queued} delivered");
        for (message, token) in batch {
            let header = |name: &str| {
                let found = message.headers.iter().find(|(n, _)| n == name);
                found.map(|(_, value)| value.clone()).unwrap()
            };
            let seq: i64 = header("Idem-Seq").parse().unwrap();
            let transaction = client.transaction().await.unwrap();
            if inbox.record(&transaction, &message.id).await.unwrap() == Delivery::First {
                let sql = "INSERT INTO applied (key, seq) VALUES ($1, $2)";
                transaction.execute(sql, &[&header("Idem-Key"), &seq]).await.unwrap();
            }
            transaction.commit().await.unwrap();
            subscription.settle(token, Settle::Ack).await.unwrap();
            delivered += 1;
        }
    }
    let total = KEYS * PER_KEY;
    let duplicates = queued - total;
    assert!(duplicates > 0, "the events published before the kill were republished");
    let row = client
        .query_one("SELECT count(*), count(DISTINCT (key, seq)) FROM applied", &[])
        .await
        .unwrap();
    let (applied, distinct): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!((applied, distinct), (total as i64, total as i64), "each event applied once");
    // Applied in commit order per key: the applied rows' order follows the queue's.
    let rows = client.query("SELECT key, seq FROM applied ORDER BY n", &[]).await.unwrap();
    let mut last_seq: HashMap<String, i64> = HashMap::new();
    for row in rows {
        let (key, seq): (String, i64) = (row.get(0), row.get(1));
        let previous = last_seq.insert(key, seq).unwrap_or(0);
        assert_eq!(seq, previous + 1, "per-key order holds across the crash");
    }
    println!(
        "relay SIGKILL on RabbitMQ: {queued_at_kill} queued and {marked_at_kill} marked sent at the kill; \
         after restart {queued} on the queue for {total} enqueued ({duplicates} republished), \
         {applied} applied through the inbox, each once, {KEYS} keys in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_relay_wakes_on_the_commit_notification_not_the_poll() {
    let Some(nats) = service_url("IDEM_TEST_NATS_URL") else { return };
    let Some(database) = fresh_postgres_schema("idem_relay_notify").await else { return };
    let (mut client, connection) = tokio_postgres::connect(&database, NoTls).await.unwrap();
    tokio::spawn(connection);
    Outbox::migrate(&mut client).await.unwrap();
    let jetstream = jetstream::new(async_nats::connect(&nats).await.unwrap());
    let _ = jetstream.delete_stream("IDEM_RELAY_NOTIFY").await;
    let mut stream = jetstream
        .create_stream(stream::Config {
            name: "IDEM_RELAY_NOTIFY".into(),
            subjects: vec!["idemtest.relaynotify.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    // Polling once a minute: only the NOTIFY sent at commit can deliver the event in time.
    let mut relay = Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(["relay", "--database", &database, "--nats", &nats, "--poll-interval", "60s"])
        .env("IDEM_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(relay.stdout.take().unwrap()).read_line(&mut line).unwrap();
    // Let it finish its first (empty) round and go to sleep.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let transaction = client.transaction().await.unwrap();
    let event =
        Event { topic: "idemtest.relaynotify.one", key: "k", payload: b"wake up", headers: &[] };
    Outbox::enqueue(&transaction, event).await.unwrap();
    let committed = Instant::now();
    transaction.commit().await.unwrap();
    while stream.info().await.unwrap().state.messages == 0 {
        assert!(committed.elapsed() < Duration::from_secs(5), "the relay did not wake on NOTIFY");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let latency = committed.elapsed();
    relay.kill().unwrap();
    relay.wait().unwrap();
    println!("relay NOTIFY: published {latency:?} after the commit (poll interval 60s)");
}
