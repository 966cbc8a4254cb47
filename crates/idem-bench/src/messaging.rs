//! The messaging side, measured side by side on the real PostgreSQL and NATS JetStream:
//! - a consumer applying payments to account balances, with and without the inbox (the same
//!   handler; the inbox adds one INSERT to its transaction), through the consumer runner at
//!   batches of 100: each message in a transaction of its own (`consume::run`), and each batch
//!   in one transaction (`consume::run_batches`, `Inbox::record_many`); and in the offsets mode
//!   (a position per partition advanced in each message's transaction, read from
//!   `JetStreamPartitions`: one partition per key);
//! - publishing events to JetStream straight from memory (the publisher alone, in the same
//!   layers of one event per key) and through the transactional outbox's relay (claim, read,
//!   publish, mark sent).
//!
//! Each round runs every variant once, alternating which goes first; the report quotes each
//! round and the median.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use idem_stream::Delivery;
use idem_stream::consume::{self, DeadLetter, Received, RunnerConfig};
use idem_stream::nats::{JetStreamPartitions, JetStreamPublisher, JetStreamSubscription};
use idem_stream::postgres::{Applied, Event, Inbox, Offsets, Outbox, Relay, RelayConfig};
use idem_stream::publish::{OutboxMessage, Publisher};
use tokio_postgres::NoTls;

const SCHEMA: &str = "idem_bench_messaging";
const ACCOUNTS: i32 = 1_000;
const KEYS: usize = 100;
pub const BATCH: usize = 100;

/// One measured variant: its throughput in each round.
#[derive(Debug, Default)]
pub struct Row {
    pub name: &'static str,
    pub per_round: Vec<f64>,
}

impl Row {
    pub fn median(&self) -> f64 {
        crate::report::median(&self.per_round)
    }
}

#[derive(Debug)]
pub struct Results {
    pub messages: usize,
    pub rounds: usize,
    /// Plain, inbox: a transaction per message.
    pub plain: Row,
    /// The inbox: `Inbox::apply` (its INSERT pipelined with the effects), and `Inbox::record`
    /// then the effects.
    pub inbox: Row,
    pub inbox_record: Row,
    /// Plain, inbox: a transaction per batch.
    pub plain_batch: Row,
    pub inbox_batch: Row,
    /// A transaction per message, through the offsets mode instead of the inbox.
    pub offsets: Row,
    pub direct: Row,
    pub relay: Row,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Plain,
    Inbox,
    InboxRecord,
    PlainBatch,
    InboxBatch,
    Offsets,
}

impl Variant {
    const ALL: [Variant; 6] = [
        Variant::Plain,
        Variant::Inbox,
        Variant::InboxRecord,
        Variant::PlainBatch,
        Variant::InboxBatch,
        Variant::Offsets,
    ];

    fn name(self) -> &'static str {
        match self {
            Variant::Plain => "plain",
            Variant::Inbox => "inbox",
            Variant::InboxRecord => "inbox-record",
            Variant::PlainBatch => "plain-batch",
            Variant::InboxBatch => "inbox-batch",
            Variant::Offsets => "offsets",
        }
    }

    fn inbox(self) -> bool {
        matches!(self, Variant::Inbox | Variant::InboxRecord | Variant::InboxBatch)
    }

    fn batched(self) -> bool {
        matches!(self, Variant::PlainBatch | Variant::InboxBatch)
    }
}

struct Bench {
    config: tokio_postgres::Config,
    pool: deadpool_postgres::Pool,
    client: tokio_postgres::Client,
    jetstream: jetstream::Context,
}

pub async fn run(
    postgres: &str,
    nats: &str,
    messages: usize,
    rounds: usize,
) -> Result<Results, String> {
    let bench = Bench::connect(postgres, nats).await?;
    let mut results = Results {
        messages,
        rounds,
        plain: Row { name: "consumer, plain handler, a transaction per message", ..Row::default() },
        inbox: Row {
            name: "consumer, same through the inbox, a transaction per message",
            ..Row::default()
        },
        inbox_record: Row {
            name: "consumer, same through the inbox, recorded before the effects",
            ..Row::default()
        },
        plain_batch: Row {
            name: "consumer, plain handler, a transaction per batch",
            ..Row::default()
        },
        inbox_batch: Row {
            name: "consumer, same through the inbox, a transaction per batch",
            ..Row::default()
        },
        offsets: Row {
            name: "consumer, same through the offsets mode, a transaction per message",
            ..Row::default()
        },
        direct: Row { name: "publish straight to JetStream (no outbox)", ..Row::default() },
        relay: Row { name: "relay from the outbox to JetStream", ..Row::default() },
    };
    for round in 0..rounds {
        // A fresh stream per round, consumed whole by every consumer, in alternating order.
        let stream = bench.stream("IDEM_BENCH_CONSUME", "idembench.consume.>").await?;
        bench.publish_payments(round, messages).await?;
        let mut order = Variant::ALL;
        if round % 2 == 1 {
            order.reverse();
        }
        for variant in order {
            let rate = bench.consume(&stream, round, messages, variant).await?;
            let row = match variant {
                Variant::Plain => &mut results.plain,
                Variant::Inbox => &mut results.inbox,
                Variant::InboxRecord => &mut results.inbox_record,
                Variant::PlainBatch => &mut results.plain_batch,
                Variant::InboxBatch => &mut results.inbox_batch,
                Variant::Offsets => &mut results.offsets,
            };
            row.per_round.push(rate);
            eprintln!("  round {}: {:<60} {rate:>8.0} msg/s", round + 1, row.name);
        }
        let order = if round % 2 == 0 { [false, true] } else { [true, false] };
        for through_relay in order {
            let rate = if through_relay {
                bench.relay(messages).await?
            } else {
                bench.direct(messages).await?
            };
            let row = if through_relay { &mut results.relay } else { &mut results.direct };
            row.per_round.push(rate);
            eprintln!("  round {}: {:<60} {rate:>8.0} msg/s", round + 1, row.name);
        }
    }
    let _ = bench.jetstream.delete_stream("IDEM_BENCH_CONSUME").await;
    let _ = bench.jetstream.delete_stream("IDEM_BENCH_PUBLISH").await;
    Ok(results)
}

/// The consumer never fails here; a dead letter would be a harness error.
struct NoDeadLetters;

#[async_trait::async_trait]
impl DeadLetter for NoDeadLetters {
    async fn bury(&self, message: &Received, failure: &str) -> idem_stream::Result<()> {
        let failed = format!("benchmark handler failed on {}: {failure}", message.id);
        Err(idem_stream::Error::other(failed))
    }
}

fn error<E: std::fmt::Display>(context: &str) -> impl Fn(E) -> String + '_ {
    move |error| format!("{context}: {error}")
}

/// The benchmark's handler: credits one account in a transaction of its own, through the inbox
/// or the offsets when there are.
async fn credit(
    pool: deadpool_postgres::Pool,
    dedup: Dedup,
    message: Received,
) -> Result<(), String> {
    let (account, cents) = parse(&message)?;
    let mut client = pool.get().await.map_err(|e| e.to_string())?;
    let transaction = client.transaction().await.map_err(|e| e.to_string())?;
    let sql = "UPDATE bench_accounts SET cents = cents + $1 WHERE id = $2";
    let first = match &dedup {
        Dedup::Apply(inbox) => {
            let credit = async { transaction.execute(sql, &[&cents, &account]).await };
            match inbox.apply(&transaction, &message.id, credit).await {
                Ok(Applied::First(credited)) => credited.map(drop).map_err(|e| e.to_string())?,
                Ok(Applied::Duplicate) => {}
                Err(error) => return Err(error.to_string()),
            }
            false
        }
        Dedup::Record(inbox) => {
            inbox.record(&transaction, &message.id).await.map_err(|e| e.to_string())?
                == Delivery::First
        }
        Dedup::Offsets(offsets) => {
            let position = message.position.ok_or("no position")?;
            offsets
                .advance(&transaction, &message.subject, position)
                .await
                .map_err(|e| e.to_string())?
                == Delivery::First
        }
        Dedup::None => true,
    };
    if first {
        transaction.execute(sql, &[&cents, &account]).await.map_err(|e| e.to_string())?;
    }
    transaction.commit().await.map_err(|e| e.to_string())
}

/// How a handler tells a first delivery from a repeat.
#[derive(Clone)]
enum Dedup {
    None,
    /// `Inbox::apply`: the inbox INSERT pipelined with the credit.
    Apply(Inbox),
    /// `Inbox::record`, then the credit.
    Record(Inbox),
    Offsets(Offsets),
}

/// The batch form of [`credit`]: one transaction for the whole batch, the inbox recording all
/// of its ids with one statement.
async fn credit_batch(
    pool: deadpool_postgres::Pool,
    inbox: Option<Inbox>,
    batch: Vec<Received>,
) -> Result<(), String> {
    let mut credits = Vec::with_capacity(batch.len());
    for message in &batch {
        credits.push(parse(message)?);
    }
    let mut client = pool.get().await.map_err(|e| e.to_string())?;
    let transaction = client.transaction().await.map_err(|e| e.to_string())?;
    let deliveries = match &inbox {
        Some(inbox) => {
            let ids: Vec<&str> = batch.iter().map(|message| message.id.as_str()).collect();
            inbox.record_many(&transaction, &ids).await.map_err(|e| e.to_string())?
        }
        None => vec![Delivery::First; batch.len()],
    };
    let sql = "UPDATE bench_accounts SET cents = cents + $1 WHERE id = $2";
    for ((account, cents), delivery) in credits.iter().zip(deliveries) {
        if delivery == Delivery::First {
            transaction.execute(sql, &[cents, account]).await.map_err(|e| e.to_string())?;
        }
    }
    transaction.commit().await.map_err(|e| e.to_string())
}

/// A payment's account and amount, from its `account:cents` payload.
fn parse(message: &Received) -> Result<(i32, i64), String> {
    let text = String::from_utf8_lossy(&message.payload);
    let (account, cents) = text.split_once(':').ok_or("payload is not account:cents")?;
    let account: i32 = account.parse().map_err(|_| "bad account")?;
    let cents: i64 = cents.parse().map_err(|_| "bad cents")?;
    Ok((account, cents))
}

impl Bench {
    async fn connect(postgres: &str, nats: &str) -> Result<Self, String> {
        let mut config: tokio_postgres::Config = postgres.parse().map_err(error("--postgres"))?;
        let (admin, connection) = config.connect(NoTls).await.map_err(error("--postgres"))?;
        tokio::spawn(connection);
        admin
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {SCHEMA} CASCADE; CREATE SCHEMA {SCHEMA}"
            ))
            .await
            .map_err(error("schema"))?;
        config.options(format!("-c search_path={SCHEMA}"));
        let (mut client, connection) = config.connect(NoTls).await.map_err(error("--postgres"))?;
        tokio::spawn(connection);
        Inbox::migrate(&mut client).await.map_err(error("inbox tables"))?;
        Offsets::migrate(&mut client).await.map_err(error("offsets table"))?;
        Outbox::migrate(&mut client).await.map_err(error("outbox tables"))?;
        client
            .batch_execute(&format!(
                "CREATE TABLE bench_accounts (id int PRIMARY KEY, cents bigint NOT NULL);
                 INSERT INTO bench_accounts SELECT n, 0 FROM generate_series(0, {}) n;",
                ACCOUNTS - 1
            ))
            .await
            .map_err(error("accounts table"))?;
        let manager = deadpool_postgres::Manager::new(config.clone(), NoTls);
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(32)
            .build()
            .map_err(error("pool"))?;
        let nats = async_nats::connect(nats).await.map_err(error("--nats"))?;
        Ok(Self { config, pool, client, jetstream: jetstream::new(nats) })
    }

    async fn stream(&self, name: &str, subjects: &str) -> Result<stream::Stream, String> {
        let _ = self.jetstream.delete_stream(name).await;
        let config = stream::Config {
            name: name.into(),
            subjects: vec![subjects.into()],
            ..Default::default()
        };
        self.jetstream.create_stream(config).await.map_err(error("create stream"))
    }

    /// Payments over `KEYS` keys, each key on a subject of its own (a partition of the
    /// offsets mode; the other consumers read them all the same).
    async fn publish_payments(&self, round: usize, messages: usize) -> Result<(), String> {
        let mut all = events("idembench.consume.payments", messages, round * messages, |index| {
            format!("{}:{}", index as i32 % ACCOUNTS, index + 1)
        });
        for event in &mut all {
            event.topic = format!("idembench.consume.{}", event.key);
        }
        self.publish_layers(&all).await
    }

    /// Publishes `all` a layer of one event per key at a time, as the relay does.
    async fn publish_layers(&self, all: &[OutboxMessage]) -> Result<(), String> {
        let publisher = JetStreamPublisher::new(self.jetstream.clone());
        for layer in all.chunks(KEYS) {
            for result in publisher.publish(layer).await {
                result.map_err(error("publish"))?;
            }
        }
        Ok(())
    }

    /// Consumes the whole stream with a new durable consumer; returns messages per second.
    async fn consume(
        &self,
        stream: &stream::Stream,
        round: usize,
        messages: usize,
        variant: Variant,
    ) -> Result<f64, String> {
        let name = variant.name();
        let consumer = format!("bench-{round}-{name}");
        if variant == Variant::Offsets {
            let partitions = (0..KEYS).map(|key| (format!("idembench.consume.k{key}"), 0));
            let subscription = JetStreamPartitions::start(stream, partitions)
                .await
                .map_err(error("partitions"))?;
            let offsets = Offsets::new(consumer.clone()).map_err(error("offsets"))?;
            let rate =
                self.consume_with(subscription, Dedup::Offsets(offsets), messages, variant).await?;
            let sql = "SELECT count(*) FROM idem_offsets WHERE consumer = $1";
            let row = self.client.query_one(sql, &[&consumer]).await;
            let partitions: i64 = row.map_err(error("offsets count"))?.get(0);
            if partitions != KEYS as i64 {
                return Err(format!("the offsets recorded {partitions} of {KEYS} partitions"));
            }
            return Ok(rate);
        }
        let subscription = JetStreamSubscription::durable(stream, name, Duration::from_secs(60))
            .await
            .map_err(error("consumer"))?;
        let inbox = variant.inbox().then(|| Inbox::new(consumer.clone())).transpose();
        let inbox = inbox.map_err(error("inbox"))?;
        let dedup = match inbox {
            Some(inbox) if variant == Variant::InboxRecord => Dedup::Record(inbox),
            Some(inbox) => Dedup::Apply(inbox),
            None => Dedup::None,
        };
        let rate = self.consume_with(subscription, dedup, messages, variant).await?;
        if variant.inbox() {
            let sql = "SELECT count(*) FROM idem_inbox WHERE consumer = $1";
            let row = self.client.query_one(sql, &[&consumer]).await;
            let recorded: i64 = row.map_err(error("inbox count"))?.get(0);
            if recorded != messages as i64 {
                return Err(format!("the inbox recorded {recorded} of {messages} messages"));
            }
        }
        Ok(rate)
    }

    /// Runs one consumer over `subscription` until `messages` are handled; messages a second.
    async fn consume_with<S: consume::Subscription>(
        &self,
        subscription: S,
        dedup: Dedup,
        messages: usize,
        variant: Variant,
    ) -> Result<f64, String> {
        let name = variant.name();
        let done = Arc::new(AtomicUsize::new(0));
        let finished = Arc::new(tokio::sync::Notify::new());
        // Counts handled messages and ends the run at the last one.
        let count = {
            let (done, finished) = (Arc::clone(&done), Arc::clone(&finished));
            move |handled: usize| {
                if done.fetch_add(handled, Ordering::SeqCst) + handled == messages {
                    finished.notify_one();
                }
            }
        };
        let config = RunnerConfig {
            concurrency: BATCH,
            max_attempts: 1,
            fetch_wait: Duration::from_millis(100),
            // The offsets mode needs each partition in order; the others order by key, which
            // here is the same grouping.
            order_by: if variant == Variant::Offsets {
                consume::OrderBy::Subject
            } else {
                consume::OrderBy::default_key()
            },
            ..RunnerConfig::default()
        };
        let pool = self.pool.clone();
        let shutdown = async { finished.notified().await };
        let dead_letters = Arc::new(NoDeadLetters);
        let started = Instant::now();
        let report = if variant.batched() {
            let inbox = match dedup {
                Dedup::Apply(inbox) | Dedup::Record(inbox) => Some(inbox),
                Dedup::Offsets(_) | Dedup::None => None,
            };
            let handler = move |batch: Vec<Received>| {
                let (pool, inbox, count) = (pool.clone(), inbox.clone(), count.clone());
                async move {
                    let size = batch.len();
                    credit_batch(pool, inbox, batch).await?;
                    count(size);
                    consume::HandlerResult::Ok(())
                }
            };
            consume::run_batches(subscription, handler, dead_letters, config, shutdown).await
        } else {
            let handler = move |message: Received| {
                let (pool, dedup, count) = (pool.clone(), dedup.clone(), count.clone());
                async move {
                    credit(pool, dedup, message).await?;
                    count(1);
                    consume::HandlerResult::Ok(())
                }
            };
            consume::run(subscription, handler, dead_letters, config, shutdown).await
        };
        let elapsed = started.elapsed();
        let handled = done.load(Ordering::SeqCst);
        if handled != messages || report.handled != messages as u64 || report.retried > 0 {
            return Err(format!(
                "the {name} consumer handled {handled} of {messages} messages: {report:?}"
            ));
        }
        Ok(messages as f64 / elapsed.as_secs_f64())
    }

    /// Publishes `messages` events from memory, a layer of one per key at a time.
    async fn direct(&self, messages: usize) -> Result<f64, String> {
        let stream = self.stream("IDEM_BENCH_PUBLISH", "idembench.publish.>").await?;
        let all = events("idembench.publish.events", messages, 0, |index| format!("event {index}"));
        let started = Instant::now();
        self.publish_layers(&all).await?;
        let elapsed = started.elapsed();
        check_stream(stream, messages).await?;
        Ok(messages as f64 / elapsed.as_secs_f64())
    }

    /// Enqueues `messages` events (not timed), then times the relay publishing all of them.
    async fn relay(&self, messages: usize) -> Result<f64, String> {
        let stream = self.stream("IDEM_BENCH_PUBLISH", "idembench.publish.>").await?;
        let (mut client, connection) =
            self.config.connect(NoTls).await.map_err(error("connect"))?;
        tokio::spawn(connection);
        for chunk in (0..messages).collect::<Vec<_>>().chunks(500) {
            let transaction = client.transaction().await.map_err(error("enqueue"))?;
            for &index in chunk {
                let key = format!("k{}", index % KEYS);
                let payload = format!("event {index}");
                let event = Event {
                    topic: "idembench.publish.events",
                    key: &key,
                    payload: payload.as_bytes(),
                    headers: &[],
                };
                Outbox::enqueue(&transaction, event).await.map_err(error("enqueue"))?;
            }
            transaction.commit().await.map_err(error("enqueue"))?;
        }
        let config = RelayConfig { max_keys: KEYS as i64, ..RelayConfig::default() };
        let relay = Relay::new(JetStreamPublisher::new(self.jetstream.clone()), config);
        let started = Instant::now();
        let published = relay.run_until_idle(&mut client, 100_000).await.map_err(error("relay"))?;
        let elapsed = started.elapsed();
        if published != messages {
            return Err(format!("the relay published {published} of {messages} events"));
        }
        check_stream(stream, messages).await?;
        Ok(messages as f64 / elapsed.as_secs_f64())
    }
}

/// `count` events on `topic` over `KEYS` keys, numbered from `first_id`, each key's in order.
fn events(
    topic: &str,
    count: usize,
    first_id: usize,
    payload: impl Fn(usize) -> String,
) -> Vec<OutboxMessage> {
    (0..count)
        .map(|index| OutboxMessage {
            id: (first_id + index) as i64,
            topic: topic.into(),
            key: format!("k{}", index % KEYS),
            seq: (index / KEYS) as i64 + 1,
            payload: payload(index).into(),
            headers: Vec::new(),
        })
        .collect()
}

async fn check_stream(mut stream: stream::Stream, messages: usize) -> Result<(), String> {
    let stored = stream.info().await.map_err(error("stream info"))?.state.messages;
    if stored != messages as u64 {
        return Err(format!("the stream holds {stored} of {messages} events"));
    }
    Ok(())
}
