//! The transactional outbox and its relay against the real PostgreSQL and NATS JetStream named
//! by `IDEM_TEST_POSTGRES_URL` and `IDEM_TEST_NATS_URL`. The stream is read back message by
//! message: counts, per-key order and duplicates are checked on what the broker holds.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_trait::async_trait;
use idem_core::conformance::{fresh_postgres_schema, service_url};
use idem_stream::nats::JetStreamPublisher;
use idem_stream::postgres::{Event, Outbox, Relay, RelayConfig};
use idem_stream::publish::{OutboxMessage, PublishError, Publisher};
use tokio_postgres::{Client, Config, NoTls};

struct Setup {
    client: Client,
    config: Config,
    jetstream: jetstream::Context,
    stream: stream::Stream,
    /// Subjects of this test: `<prefix>.<anything>`.
    prefix: String,
}

/// A fresh schema and a fresh stream of this test's own.
async fn setup(name: &str) -> Option<Setup> {
    let nats = service_url("IDEM_TEST_NATS_URL")?;
    let database = fresh_postgres_schema(&format!("idem_outbox_{name}")).await?;
    let config: Config = database.parse().unwrap();
    let mut client = connect(&config).await;
    Outbox::migrate(&mut client).await.unwrap();

    let jetstream = jetstream::new(async_nats::connect(&nats).await.unwrap());
    let stream_name = format!("IDEM_OUTBOX_{}", name.to_uppercase());
    let _ = jetstream.delete_stream(&stream_name).await;
    let prefix = format!("idemtest.{name}");
    let stream = jetstream
        .create_stream(stream::Config {
            name: stream_name,
            subjects: vec![format!("{prefix}.>")],
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .unwrap();
    Some(Setup { client, config, jetstream, stream, prefix })
}

async fn connect(config: &Config) -> Client {
    let (client, connection) = config.connect(NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

/// Enqueues `per_key` events for each of `keys` keys, one transaction per event, interleaved.
async fn enqueue(client: &mut Client, topic: &str, keys: usize, per_key: usize) {
    for seq in 1..=per_key {
        for key in 0..keys {
            let transaction = client.transaction().await.unwrap();
            let payload = format!("{key}:{seq}");
            let event = Event {
                topic,
                key: &format!("order-{key}"),
                payload: payload.as_bytes(),
                headers: &[(
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                )],
            };
            Outbox::enqueue(&transaction, event).await.unwrap();
            transaction.commit().await.unwrap();
        }
    }
}

/// Every message in the stream, in stream order: (outbox message id, key, seq).
/// Events not yet marked sent.
async fn unsent(client: &Client) -> i64 {
    let sql = "SELECT count(*) FROM idem_outbox e JOIN idem_outbox_keys k USING (topic, key)
               WHERE e.seq > k.published_seq AND e.discarded_at IS NULL";
    client.query_one(sql, &[]).await.unwrap().get(0)
}

async fn read_stream(stream: &mut stream::Stream) -> Vec<(String, String, i64)> {
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut messages = Vec::new();
    for sequence in 1..=last {
        let message = stream.get_raw_message(sequence).await.unwrap();
        let header = |name: &str| message.headers.get(name).map(|value| value.to_string()).unwrap();
        assert_eq!(header("traceparent").len(), 55, "trace context travels in the headers");
        messages.push((
            header("Nats-Msg-Id"),
            header("Idem-Key"),
            header("Idem-Seq").parse().unwrap(),
        ));
    }
    messages
}

/// Each event exactly once on the stream, and each key's events in sequence order.
fn assert_once_and_in_order(messages: &[(String, String, i64)], keys: usize, per_key: usize) {
    assert_eq!(messages.len(), keys * per_key, "every event exactly once on the stream");
    let mut ids: Vec<&String> = messages.iter().map(|(id, _, _)| id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), keys * per_key, "no message id twice");
    let mut last_seq: HashMap<&str, i64> = HashMap::new();
    for (_, key, seq) in messages {
        let previous = last_seq.insert(key, *seq).unwrap_or(0);
        assert_eq!(*seq, previous + 1, "{key}: seq {seq} after {previous}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_leave_exactly_when_their_transaction_commits_in_key_order() {
    let Some(mut setup) = setup("commit").await else { return };
    let topic = format!("{}.orders", setup.prefix);
    // Rolled back: never published.
    let transaction = setup.client.transaction().await.unwrap();
    let event = Event { topic: &topic, key: "order-x", payload: b"never", headers: &[] };
    Outbox::enqueue(&transaction, event).await.unwrap();
    transaction.rollback().await.unwrap();

    enqueue(&mut setup.client, &topic, 5, 40).await;
    let relay =
        Relay::new(JetStreamPublisher::new(setup.jetstream.clone()), RelayConfig::default());
    let published = relay.run_until_idle(&mut setup.client, 100).await.unwrap();
    assert_eq!(published, 200);
    assert_eq!(relay.run_until_idle(&mut setup.client, 100).await.unwrap(), 0, "nothing left");
    let messages = read_stream(&mut setup.stream).await;
    assert_once_and_in_order(&messages, 5, 40);
    let unsent = unsent(&setup.client).await;
    assert_eq!(unsent, 0);
    println!("outbox: 200 events over 5 keys -> 200 on the stream, per-key order held");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relays_running_at_once_publish_each_event_once_in_key_order() {
    let Some(mut setup) = setup("parallel").await else { return };
    let topic = format!("{}.payments", setup.prefix);
    enqueue(&mut setup.client, &topic, 20, 25).await;
    let relays: Vec<_> = (0..3)
        .map(|_| {
            let (config, jetstream) = (setup.config.clone(), setup.jetstream.clone());
            tokio::spawn(async move {
                let mut client = connect(&config).await;
                let small =
                    RelayConfig { max_keys: 4, max_events_per_key: 5, ..RelayConfig::default() };
                Relay::new(JetStreamPublisher::new(jetstream), small)
                    .run_until_idle(&mut client, 1_000)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut published = 0;
    for relay in relays {
        published += relay.await.unwrap();
    }
    assert_eq!(published, 500, "the relays split the work without publishing anything twice");
    let messages = read_stream(&mut setup.stream).await;
    assert_once_and_in_order(&messages, 20, 25);
}

/// Publishes for real, then "dies" (fails the round) after `survive` layers: the events it
/// published stay unmarked, as if the relay was killed between publish and mark-sent.
struct DiesAfterPublishing {
    inner: JetStreamPublisher,
    layers: AtomicUsize,
    survive: usize,
}

#[async_trait]
impl Publisher for DiesAfterPublishing {
    async fn publish(&self, messages: &[OutboxMessage]) -> Vec<Result<(), PublishError>> {
        let results = self.inner.publish(messages).await;
        if self.layers.fetch_add(1, Ordering::SeqCst) + 1 >= self.survive {
            // The publish happened; the process "dies" before it can commit the marks.
            panic!("relay killed after publishing {} messages", messages.len());
        }
        results
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_dies_before_marking_sent_is_absorbed_by_broker_deduplication() {
    let Some(mut setup) = setup("crash").await else { return };
    let topic = format!("{}.ledger", setup.prefix);
    enqueue(&mut setup.client, &topic, 4, 10).await;
    let (config, jetstream) = (setup.config.clone(), setup.jetstream.clone());
    let crashed = tokio::spawn(async move {
        let mut client = connect(&config).await;
        let publisher = DiesAfterPublishing {
            inner: JetStreamPublisher::new(jetstream),
            layers: AtomicUsize::new(0),
            survive: 3,
        };
        Relay::new(publisher, RelayConfig::default()).run_once(&mut client).await
    });
    assert!(crashed.await.is_err(), "the first relay died mid-round");
    let before_recovery = setup.stream.info().await.unwrap().state.messages;
    assert_eq!(before_recovery, 12, "3 layers of 4 keys reached the broker before the crash");
    let unsent = unsent(&setup.client).await;
    assert_eq!(unsent, 40, "nothing was marked: the crash came before the commit");

    // A healthy relay republishes from the start with the same ids; JetStream drops the repeats.
    let relay =
        Relay::new(JetStreamPublisher::new(setup.jetstream.clone()), RelayConfig::default());
    let republished = relay.run_until_idle(&mut setup.client, 100).await.unwrap();
    assert_eq!(republished, 40, "the unmarked events are all published again");
    let messages = read_stream(&mut setup.stream).await;
    assert_once_and_in_order(&messages, 4, 10);
    let dropped = republished - (messages.len() - before_recovery as usize);
    assert_eq!(dropped, 12, "the broker dropped exactly the repeats");
    println!(
        "outbox crash: {before_recovery} published before the crash, {republished} republished after, {} on the stream ({dropped} repeats dropped by Nats-Msg-Id)",
        messages.len()
    );
}

/// An event whose key or headers NATS cannot carry (a CR or LF would split its header block)
/// is refused at enqueue; one already in a table (written by an older version) fails to
/// publish and backs off instead of panicking the relay (noticed while writing the fuzz
/// targets), and the rest of its layer goes out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_nats_cannot_carry_is_refused_and_never_panics_the_relay() {
    let Some(Setup { mut client, jetstream, mut stream, prefix, .. }) = setup("unsendable").await
    else {
        return;
    };
    let topic = format!("{prefix}.events");
    for (key, headers) in [
        ("line\r\nbreak", vec![("traceparent", "x")]),
        ("fine", vec![("bad name", "x")]),
        ("fine", vec![("a:b", "x")]),
        ("fine", vec![("traceparent", "a\nb")]),
    ] {
        let transaction = client.transaction().await.unwrap();
        let event = Event { topic: &topic, key, payload: b"x", headers: &headers };
        let refused = Outbox::enqueue(&transaction, event).await;
        assert!(
            matches!(refused, Err(idem_stream::Error::InvalidEvent(_))),
            "{key:?} {headers:?}: {refused:?}"
        );
    }
    let message = |id: i64, key: &str| OutboxMessage {
        id,
        topic: topic.clone(),
        key: key.into(),
        seq: 1,
        payload: bytes::Bytes::from_static(b"x"),
        headers: vec![("traceparent".into(), format!("00-{:032x}-{:016x}-01", id, id))],
    };
    let layer = [message(1, "split\r\nkey"), message(2, "good")];
    let results = JetStreamPublisher::new(jetstream).publish(&layer).await;
    assert!(results[0].is_err(), "the key NATS cannot carry fails, without a panic");
    assert!(results[1].is_ok(), "{:?}", results[1]);
    let on_stream = read_stream(&mut stream).await;
    assert_eq!(on_stream, [("idem-outbox-2".to_owned(), "good".to_owned(), 1)]);
}
