//! `idem relay --database sqlite://PATH`: the outbox of a service on SQLite, idem's embedded
//! default. Events are enqueued in the service's SQLite transactions (a rolled-back one leaves
//! nothing), some while the relay runs; the relay is SIGKILLed between publishing and marking
//! sent, and restarted; JetStream's stream is then read back message by message: every
//! committed event exactly once, each key in order.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use idem_core::conformance::service_url;
use idem_stream::outbox::Event;
use idem_stream::sqlite::Outbox;
use rusqlite::{Connection, TransactionBehavior};

const KEYS: usize = 20;
const PER_KEY: usize = 150;

fn open(path: &Path) -> Connection {
    let connection = Connection::open(path).unwrap();
    connection.busy_timeout(Duration::from_secs(10)).unwrap();
    connection
}

/// Enqueues events `from..to` (keyed `account-N % KEYS`), 100 to a transaction.
fn enqueue(path: &Path, topic: &str, from: usize, to: usize) {
    let mut connection = open(path);
    for start in (from..to).step_by(100) {
        let transaction =
            connection.transaction_with_behavior(TransactionBehavior::Immediate).unwrap();
        for index in start..(start + 100).min(to) {
            let key = format!("account-{}", index % KEYS);
            let payload = format!("payment {index}");
            let event = Event { topic, key: &key, payload: payload.as_bytes(), headers: &[] };
            Outbox::enqueue(&transaction, event).unwrap();
        }
        transaction.commit().unwrap();
    }
}

fn start_relay(path: &Path, nats: &str) -> Child {
    let mut child = Command::new(common::idem_bin())
        .args(["relay", "--database", &format!("sqlite://{}", path.display())])
        .args(["--broker", nats, "--poll-interval", "100ms", "--max-events-per-key", "150"])
        // A killed relay's keys wait for its lease to run out before another relay takes them.
        .args(["--stall-timeout", "3s"])
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

/// A new SQLite file with the outbox tables (WAL, as a service would run it).
fn outbox_file() -> std::path::PathBuf {
    let path = common::temp_dir().join("app.db");
    let connection = open(&path);
    connection.pragma_update(None, "journal_mode", "WAL").unwrap();
    Outbox::migrate(&connection).unwrap();
    path
}

/// A fresh stream `name` taking `subject`.
async fn fresh_stream(
    jetstream: &jetstream::Context,
    name: &str,
    subject: &str,
    duplicate_window: Duration,
) -> stream::Stream {
    let _ = jetstream.delete_stream(name).await;
    jetstream
        .create_stream(stream::Config {
            name: name.to_owned(),
            subjects: vec![subject.to_owned()],
            duplicate_window,
            ..Default::default()
        })
        .await
        .unwrap()
}

fn marked_sent(path: &Path) -> i64 {
    open(path)
        .query_row("SELECT count(*) FROM idem_outbox WHERE sent_at_ms IS NOT NULL", [], |row| {
            row.get(0)
        })
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sqlite_outbox_publishes_each_committed_event_once_in_key_order_through_a_kill() {
    let Some(nats) = service_url("IDEM_TEST_NATS_URL") else { return };
    let path = outbox_file();
    let jetstream = jetstream::new(async_nats::connect(&nats).await.unwrap());
    let name = format!("IDEM_RELAY_SQLITE_{}", std::process::id());
    let topic = format!("idemtest.relaysqlite.{}", std::process::id());
    let mut stream = fresh_stream(&jetstream, &name, &topic, Duration::from_secs(120)).await;

    // A transaction that rolls back leaves no event behind.
    {
        let mut connection = open(&path);
        let transaction =
            connection.transaction_with_behavior(TransactionBehavior::Immediate).unwrap();
        let event =
            Event { topic: &topic, key: "account-0", payload: b"rolled back", headers: &[] };
        Outbox::enqueue(&transaction, event).unwrap();
        transaction.rollback().unwrap();
    }
    let total = KEYS * PER_KEY;
    enqueue(&path, &topic, 0, total / 2);

    let mut relay = start_relay(&path, &nats);
    // The other half while the relay runs.
    let producer = {
        let (path, topic) = (path.clone(), topic.clone());
        std::thread::spawn(move || enqueue(&path, &topic, total / 2, total))
    };
    let started = Instant::now();
    while stream.info().await.unwrap().state.messages == 0 {
        assert!(started.elapsed() < Duration::from_secs(20), "the relay published nothing");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    relay.kill().unwrap();
    relay.wait().unwrap();
    let on_stream_at_kill = stream.info().await.unwrap().state.messages;
    let marked_at_kill = marked_sent(&path);
    assert!(
        on_stream_at_kill as i64 > marked_at_kill,
        "the kill landed between publish and mark: {on_stream_at_kill} published, {marked_at_kill} marked"
    );
    producer.join().unwrap();

    let mut relay = start_relay(&path, &nats);
    let started = Instant::now();
    while marked_sent(&path) < total as i64 {
        assert!(started.elapsed() < Duration::from_secs(60), "{} sent", marked_sent(&path));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = Command::new("kill").args(["-TERM", &relay.id().to_string()]).status().unwrap();
    assert!(status.success());
    assert!(relay.wait().unwrap().success(), "SIGTERM stops the relay cleanly");

    let last = stream.info().await.unwrap().state.last_sequence;
    assert_eq!(last as usize, total, "every committed event exactly once on the stream");
    let mut last_seq: HashMap<String, u64> = HashMap::new();
    let mut ids = HashSet::new();
    for sequence in 1..=last {
        let message = stream.get_raw_message(sequence).await.unwrap();
        assert_ne!(&message.payload[..], b"rolled back");
        let header = |name: &str| message.headers.get(name).unwrap().to_string();
        assert!(ids.insert(header("Nats-Msg-Id")), "a message id appears twice");
        let seq: u64 = header("Idem-Seq").parse().unwrap();
        let previous = last_seq.insert(header("Idem-Key"), seq).unwrap_or(0);
        assert_eq!(seq, previous + 1, "per-key order holds across the kill");
    }
    println!(
        "sqlite relay SIGKILL: {on_stream_at_kill} on the stream and {marked_at_kill} marked sent at the kill; \
         after restart {last} on the stream for {total} committed, each once, {KEYS} keys in order"
    );
    let _ = jetstream.delete_stream(&name).await;
}

/// The real JetStream publisher, recording every id it is asked to publish.
struct Recording {
    inner: idem_stream::nats::JetStreamPublisher,
    ids: std::sync::Arc<std::sync::Mutex<Vec<i64>>>,
}

#[async_trait::async_trait]
impl idem_stream::publish::Publisher for Recording {
    async fn publish(
        &self,
        messages: &[idem_stream::publish::OutboxMessage],
    ) -> Vec<Result<(), idem_stream::publish::PublishError>> {
        self.ids.lock().unwrap().extend(messages.iter().map(|message| message.id));
        self.inner.publish(messages).await
    }
}

/// Two relays on one SQLite file at once share the keys by their leases: every event is
/// published once (not merely deduplicated by the broker), each key in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_sqlite_relays_at_once_publish_each_event_once() {
    use idem_stream::outbox::RelayConfig;
    let Some(nats) = service_url("IDEM_TEST_NATS_URL") else { return };
    let path = outbox_file();
    let jetstream = jetstream::new(async_nats::connect(&nats).await.unwrap());
    let name = format!("IDEM_RELAY_SQLITE2_{}", std::process::id());
    let topic = format!("idemtest.relaysqlite2.{}", std::process::id());
    let stream = fresh_stream(&jetstream, &name, &topic, Duration::from_secs(120)).await;
    enqueue(&path, &topic, 0, 2_000);
    let ids: std::sync::Arc<std::sync::Mutex<Vec<i64>>> = Default::default();
    let config = RelayConfig { max_keys: 4, max_events_per_key: 10, ..RelayConfig::default() };
    let relays: Vec<_> = (0..2)
        .map(|_| {
            let publisher = Recording {
                inner: idem_stream::nats::JetStreamPublisher::new(jetstream.clone()),
                ids: std::sync::Arc::clone(&ids),
            };
            let relay = idem_stream::sqlite::Relay::open(&path, publisher, config).unwrap();
            tokio::spawn(async move {
                let mut rounds = 0;
                while relay.run_until_idle(1_000).await.unwrap() > 0 || rounds < 3 {
                    rounds += 1;
                }
            })
        })
        .collect();
    for relay in relays {
        relay.await.unwrap();
    }
    assert_eq!(marked_sent(&path), 2_000);
    let ids = ids.lock().unwrap().clone();
    let distinct: HashSet<i64> = ids.iter().copied().collect();
    assert_eq!((ids.len(), distinct.len()), (2_000, 2_000), "each event published once");
    let mut stream = stream;
    assert_eq!(stream.info().await.unwrap().state.messages, 2_000);
    let mut last_seq: HashMap<String, u64> = HashMap::new();
    for sequence in 1..=2_000 {
        let message = stream.get_raw_message(sequence).await.unwrap();
        let header = |name: &str| message.headers.get(name).unwrap().to_string();
        let seq: u64 = header("Idem-Seq").parse().unwrap();
        let previous = last_seq.insert(header("Idem-Key"), seq).unwrap_or(0);
        assert_eq!(seq, previous + 1, "per-key order with two relays");
    }
    let _ = jetstream.delete_stream(&name).await;
}

fn outbox_cli(path: &Path, args: &[&str]) -> (bool, serde_json::Value) {
    common::outbox_cli(&format!("sqlite://{}", path.display()), args)
}

/// A SQLite outbox key the broker refuses (no stream takes its subject) backs off, is parked
/// after `max_attempts`, and is seen and unstuck with `idem outbox` as on PostgreSQL: `discard`
/// gives up its first event, `retry` puts it back once its stream exists, and its later events
/// are published in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_sqlite_outbox_key_is_listed_discarded_and_retried_with_idem_outbox() {
    use idem_stream::outbox::RelayConfig;
    let Some(nats) = service_url("IDEM_TEST_NATS_URL") else { return };
    let path = outbox_file();
    let topic = format!("idemtest.sqliteparked.{}", std::process::id());
    enqueue(&path, &topic, 0, 3 * KEYS); // account-0 gets events 0, 20 and 40
    let jetstream = jetstream::new(async_nats::connect(&nats).await.unwrap());
    let config = RelayConfig {
        max_attempts: 2,
        retry_backoff: Duration::from_millis(20),
        max_retry_backoff: Duration::from_millis(40),
        ..RelayConfig::default()
    };
    let relay = idem_stream::sqlite::Relay::open(
        &path,
        idem_stream::nats::JetStreamPublisher::new(jetstream.clone()),
        config,
    )
    .unwrap();
    let started = Instant::now();
    loop {
        relay.run_until_idle(100).await.unwrap();
        let stats = Outbox::stats(&open(&path)).unwrap();
        if stats.parked_keys == KEYS as i64 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "{stats:?}");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let (ok, listed) = outbox_cli(&path, &["list", "--parked"]);
    assert!(ok);
    assert_eq!(listed["stats"]["parked_keys"], KEYS);
    assert_eq!(listed["stats"]["pending_events"], 3 * KEYS);
    let parked = &listed["keys"][0];
    assert_eq!((parked["state"].as_str(), parked["attempts"].as_i64()), (Some("parked"), Some(2)));
    let (ok, shown) = outbox_cli(&path, &["show", &topic, "account-0"]);
    assert!(ok && shown["events"].as_array().unwrap().len() == 3, "{shown}");

    let name = format!("IDEM_SQLITE_PARKED_{}", std::process::id());
    let mut stream = fresh_stream(&jetstream, &name, &topic, Duration::from_secs(120)).await;
    let (ok, discarded) = outbox_cli(&path, &["discard", &topic, "account-0"]);
    assert!(ok && discarded["discarded"].is_i64(), "{discarded}");
    assert!(outbox_cli(&path, &["retry", &topic, "account-0"]).0);
    assert!(!outbox_cli(&path, &["retry", &topic, "no-such-key"]).0, "unknown keys exit 1");
    relay.run_until_idle(100).await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 2, "only account-0 was retried");
    let payloads: Vec<String> = futures_payloads(&mut stream, 2).await;
    assert_eq!(payloads, ["payment 20", "payment 40"], "its later events, in order");
    let _ = jetstream.delete_stream(&name).await;
}

async fn futures_payloads(stream: &mut jetstream::stream::Stream, count: u64) -> Vec<String> {
    let mut payloads = Vec::new();
    for sequence in 1..=count {
        let message = stream.get_raw_message(sequence).await.unwrap();
        payloads.push(String::from_utf8(message.payload.to_vec()).unwrap());
    }
    payloads
}

/// A publisher that takes its time with each layer (a slow broker).
struct Slow(Recording);

#[async_trait::async_trait]
impl idem_stream::publish::Publisher for Slow {
    async fn publish(
        &self,
        messages: &[idem_stream::publish::OutboxMessage],
    ) -> Vec<Result<(), idem_stream::publish::PublishError>> {
        tokio::time::sleep(Duration::from_millis(60)).await;
        self.0.publish(messages).await
    }
}

/// A SQLite relay round longer than half its lease (a slow broker, a long backlog) stops
/// publishing there and marks what it published; the next rounds go on from it. Every event is
/// published once and the key drains (before, such a round marked nothing and the next one
/// published the same events again, for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_past_half_its_lease_marks_what_it_published() {
    use idem_stream::outbox::RelayConfig;
    let Some(nats) = service_url("IDEM_TEST_NATS_URL") else { return };
    let path = outbox_file();
    let topic = format!("idemtest.sqliteslow.{}", std::process::id());
    let name = format!("IDEM_SQLITE_SLOW_{}", std::process::id());
    let jetstream = jetstream::new(async_nats::connect(&nats).await.unwrap());
    fresh_stream(&jetstream, &name, &topic, Duration::from_secs(120)).await;
    // 200 events on 10 keys: 20 layers of 60 ms, past half of a 1 s lease.
    {
        let mut connection = open(&path);
        let transaction =
            connection.transaction_with_behavior(TransactionBehavior::Immediate).unwrap();
        for index in 0..200 {
            let key = format!("k{}", index % 10);
            let payload = format!("event {index}");
            let event =
                Event { topic: &topic, key: &key, payload: payload.as_bytes(), headers: &[] };
            Outbox::enqueue(&transaction, event).unwrap();
        }
        transaction.commit().unwrap();
    }
    let ids: std::sync::Arc<std::sync::Mutex<Vec<i64>>> = Default::default();
    let publisher = Slow(Recording {
        inner: idem_stream::nats::JetStreamPublisher::new(jetstream.clone()),
        ids: std::sync::Arc::clone(&ids),
    });
    let config = RelayConfig { stall_timeout: Duration::from_secs(1), ..RelayConfig::default() };
    let relay = idem_stream::sqlite::Relay::open(&path, publisher, config).unwrap();
    let first = relay.run_once().await.unwrap();
    assert!(first.published > 0 && first.published < 200, "stopped part way: {first:?}");
    assert_eq!(marked_sent(&path), first.published as i64, "and marked what it published");
    let started = Instant::now();
    while marked_sent(&path) < 200 {
        assert!(started.elapsed() < Duration::from_secs(30), "{} marked", marked_sent(&path));
        relay.run_once().await.unwrap();
    }
    let ids = ids.lock().unwrap().clone();
    let distinct: HashSet<i64> = ids.iter().copied().collect();
    assert_eq!((ids.len(), distinct.len()), (200, 200), "each event published once");

    // An operator's discard waits for a relay that holds the key (its lease still runs).
    let connection = open(&path);
    let enqueue_one = |connection: &mut Connection| {
        let transaction =
            connection.transaction_with_behavior(TransactionBehavior::Immediate).unwrap();
        let event = Event { topic: &topic, key: "k0", payload: b"late", headers: &[] };
        Outbox::enqueue(&transaction, event).unwrap();
        transaction.commit().unwrap();
    };
    let mut connection = connection;
    enqueue_one(&mut connection);
    connection
        .execute(
            "UPDATE idem_outbox_keys SET claimed_until_ms = ?1, claim_token = 7 WHERE key = 'k0'",
            [
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_millis() as i64
                    + 60_000,
            ],
        )
        .unwrap();
    let output = Command::new(common::idem_bin())
        .args(["outbox", "--database", &format!("sqlite://{}", path.display())])
        .args(["discard", &topic, "k0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("a relay is publishing this key right now"), "{stderr}");
    let _ = jetstream.delete_stream(&name).await;
}
