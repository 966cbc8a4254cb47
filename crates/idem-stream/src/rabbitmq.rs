//! The RabbitMQ adapter (AMQP 0-9-1, through lapin): publishes with publisher confirms, as
//! persistent and mandatory messages whose `message-id` is the outbox id; consumes with manual
//! acks and a prefetch limit.
//!
//! RabbitMQ does not deduplicate: a republished event is a second message, which the
//! consumer's inbox absorbs by its `message-id`. Use quorum queues ([`declare_queue`] declares
//! one): they survive a broker restart and count deliveries (`x-delivery-count`). A handler
//! that fails is retried and dead-lettered by the runner's own count on either kind of queue;
//! the broker's count matters when a message comes back after its consumer died, and a classic
//! queue only flags such a redelivery (counted as attempt 2, and warned about once), so a
//! message that kills its consumer every time is dead-lettered only on a quorum queue.
//!
//! A message published without a `message-id` (by another producer) gets an id derived from
//! its routing key, headers and payload, stable across redeliveries: identical messages then
//! count as one, as in content-based deduplication.
//!
//! Both sides connect lazily and reconnect after the connection or channel is lost; a message
//! delivered on a lost channel and not yet acknowledged goes back to its queue. Every wait on
//! the broker is bounded (lapin has no timeouts of its own): opening a connection, an ack, a
//! publish and its confirm. One that runs out counts as a lost connection, which is closed and
//! opened again, so a relay or a consumer can never hang silently on a broker that went away.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use tokio::sync::Mutex;

use crate::consume::{Received, Settle, Subscription};
use crate::publish::{OutboxMessage, PublishError, Publisher};
use crate::{Error, Result};

/// The most messages a consumer may hold unacknowledged, whatever its prefetch asks.
pub const MAX_PREFETCH: u16 = 10_000;

/// How errors name this broker.
const RABBITMQ: &str = "RabbitMQ";

/// The longest opening a connection, its channel and (for a consumer) the consumer may take.
/// A broker that accepts the TCP connection and then never answers (still starting, overloaded,
/// a link that died half-way) would otherwise hold the caller for ever. RabbitMQ itself gives
/// up on a handshake after 10 s.
const OPEN_TIMEOUT: Duration = Duration::from_secs(20);

/// The longest an ack or nack may take to be handed to a connection that still looks alive
/// (RabbitMQ does not answer it); past this the connection is taken as lost: closed, and
/// opened again by the next fetch, and RabbitMQ redelivers what it held. See [`settled`].
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a settle under way checks whether its channel has ended.
const SETTLE_CHECK_EVERY: Duration = Duration::from_millis(50);

/// The longest a batch of publishes waits for RabbitMQ's confirms. A confirm that never comes
/// would hold the relay's round, and with it its keys, for ever; past this the messages still
/// unconfirmed fail as unreachable (published again after a backoff, the copies absorbed by the
/// consumers' inbox) and the connection is opened again. Well below the relay's default
/// `--stall-timeout` (30 s), which ends a round's database session idle that long: the round
/// must outlive the wait to record the backoff.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// `step` of the RabbitMQ link that got no answer within `limit`.
fn no_answer(step: impl Into<String>, limit: Duration) -> Error {
    Error::broker(RABBITMQ, step, format!("no answer within {limit:?}"))
}

/// Closes `connection` in the background, within [`OPEN_TIMEOUT`]: one given up as lost may
/// still be open, holding deliveries that RabbitMQ redelivers only once it is closed.
fn close_in_background(connection: Connection) {
    tokio::spawn(async move {
        let close = connection.close(200, "reconnecting".into());
        let _ = tokio::time::timeout(OPEN_TIMEOUT, close).await;
    });
}

/// For `map_err`: a RabbitMQ error while doing `context`.
fn failed(context: impl Into<String>) -> impl FnOnce(lapin::Error) -> Error {
    Error::from_broker(RABBITMQ, context)
}

/// Whether a publish failed for want of a broker that answers: the link down or cut, or no
/// heartbeat. Not when the broker itself closed the channel or connection with a reply code
/// (a message it refused, say): that counts against the message, as any refusal does.
fn unreachable(error: &lapin::Error) -> bool {
    use lapin::ErrorKind;
    matches!(
        error.kind(),
        ErrorKind::IOError(_)
            | ErrorKind::RuntimeShutdownError(_)
            | ErrorKind::InvalidConnectionState(_)
            | ErrorKind::MissingHeartbeatError
    )
}

/// A failed publish of message `id`, unreachable or not as `error` says.
fn publish_failed(id: i64, context: &str, error: lapin::Error) -> PublishError {
    if unreachable(&error) {
        PublishError::unreachable(id, failed(context)(error))
    } else {
        PublishError::new(id, failed(context)(error))
    }
}

/// A connection to `uri` named `name` and a channel on it, within [`OPEN_TIMEOUT`].
async fn open_channel(uri: &str, name: &str) -> Result<(Connection, Channel)> {
    let open = async {
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        let connection = Connection::connect(uri, properties).await.map_err(failed("connect"))?;
        let channel = connection.create_channel().await.map_err(failed("open a channel"))?;
        Ok((connection, channel))
    };
    tokio::time::timeout(OPEN_TIMEOUT, open)
        .await
        .map_err(|_| no_answer("connect", OPEN_TIMEOUT))?
}

fn short(text: &str, what: &str) -> Result<ShortString> {
    ShortString::try_new(text).map_err(|error| Error::Config(format!("{what} {text:?}: {error}")))
}

/// Declares a durable quorum queue `queue` and, unless `exchange` is empty (the default
/// exchange routes by queue name), binds it to `exchange` with `routing_key`.
pub async fn declare_queue(
    uri: &str,
    queue: &str,
    exchange: &str,
    routing_key: &str,
) -> Result<()> {
    let (connection, channel) = open_channel(uri, "idem-declare").await?;
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    channel
        .queue_declare(short(queue, "queue")?, QueueDeclareOptions::durable(), arguments)
        .await
        .map_err(failed(format!("declare queue {queue}")))?;
    if !exchange.is_empty() {
        channel
            .queue_bind(
                short(queue, "queue")?,
                short(exchange, "exchange")?,
                short(routing_key, "routing key")?,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(failed(format!("bind queue {queue} to exchange {exchange}")))?;
    }
    connection.close(200, "declared".into()).await.map_err(failed("close"))
}

/// Publishes outbox events to `exchange` with the event's topic as routing key (with the
/// default exchange `""`, the topic is the queue's name). Each message is persistent and
/// mandatory, and counts as published only once RabbitMQ confirmed it; a message no queue
/// takes is returned by the broker and reported as a failure, so the relay keeps it pending
/// instead of marking it sent.
pub struct RabbitPublisher {
    uri: String,
    exchange: ShortString,
    /// The connection and its confirm-mode channel, opened on first use and again after a loss.
    link: Mutex<Option<(Connection, Channel)>>,
    /// Set when confirms did not come in time: the link is closed and opened again.
    lost: AtomicBool,
}

impl std::fmt::Debug for RabbitPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitPublisher").field("exchange", &self.exchange).finish_non_exhaustive()
    }
}

impl RabbitPublisher {
    /// Connects to `uri` (`amqp://user:password@host:5672/%2f`) and checks the link works.
    pub async fn connect(uri: &str, exchange: &str) -> Result<Self> {
        let publisher = Self {
            uri: uri.to_owned(),
            exchange: short(exchange, "exchange")?,
            link: Mutex::new(None),
            lost: AtomicBool::new(false),
        };
        publisher.channel().await?;
        Ok(publisher)
    }

    /// The confirm-mode channel, and its connection's status (to tell a connection RabbitMQ
    /// blocks, under a memory or disk alarm, from one that is lost).
    async fn channel(&self) -> Result<(Channel, lapin::ConnectionStatus)> {
        let mut link = self.link.lock().await;
        let lost = self.lost.swap(false, Ordering::SeqCst);
        if let Some((connection, channel)) = link.as_ref()
            && !lost
            && connection.status().connected()
            && channel.status().connected()
        {
            return Ok((channel.clone(), connection.status().clone()));
        }
        if let Some((connection, _)) = link.take() {
            close_in_background(connection);
        }
        let (connection, channel) = open_channel(&self.uri, "idem-relay").await?;
        let confirms = channel.confirm_select(ConfirmSelectOptions::default());
        tokio::time::timeout(OPEN_TIMEOUT, confirms)
            .await
            .map_err(|_| no_answer("turn publisher confirms on", OPEN_TIMEOUT))?
            .map_err(failed("turn publisher confirms on"))?;
        let status = connection.status().clone();
        *link = Some((connection, channel.clone()));
        Ok((channel, status))
    }

    fn properties(message: &OutboxMessage) -> Result<BasicProperties> {
        let mut headers = FieldTable::default();
        headers.insert(
            crate::publish::KEY_HEADER.into(),
            AMQPValue::LongString(message.key.as_str().into()),
        );
        headers.insert(crate::publish::SEQ_HEADER.into(), AMQPValue::LongLongInt(message.seq));
        for (name, value) in &message.headers {
            headers
                .insert(short(name, "header name")?, AMQPValue::LongString(value.as_str().into()));
        }
        Ok(BasicProperties::default()
            .with_message_id(short(&message.message_id(), "message id")?)
            .with_delivery_mode(2)
            .with_headers(headers))
    }
}

#[async_trait]
impl Publisher for RabbitPublisher {
    async fn publish(&self, messages: &[OutboxMessage]) -> Vec<Result<(), PublishError>> {
        let (channel, status) = match self.channel().await {
            Ok(link) => link,
            Err(error) => {
                // Each message gets the same error (already naming RabbitMQ and the step).
                let reason = error.to_string();
                return messages
                    .iter()
                    .map(|m| Err(PublishError::unreachable(m.id, Error::other(reason.clone()))))
                    .collect();
            }
        };
        // Send every message first, then wait for the confirms: one key each, so order within
        // a key is not at stake, and the round trips overlap. All within one deadline.
        let deadline = tokio::time::Instant::now() + CONFIRM_TIMEOUT;
        // Blocked by RabbitMQ (a memory or disk alarm): back-pressure, not a lost link. The
        // keys back off without counting toward parking, and the connection is kept (a new
        // one would be blocked too, and the old one could not even be closed meanwhile).
        let blocked = |id: i64| PublishError {
            full: true,
            ..PublishError::new(
                id,
                Error::broker(
                    RABBITMQ,
                    "publish",
                    "RabbitMQ blocks publishing on this connection (a memory or disk alarm); it resumes when the alarm clears",
                ),
            )
        };
        let late = |id: i64, step: &str| {
            if status.blocked() {
                return blocked(id);
            }
            self.lost.store(true, Ordering::SeqCst);
            PublishError::unreachable(id, no_answer(step, CONFIRM_TIMEOUT))
        };
        let mut pending = Vec::with_capacity(messages.len());
        for message in messages {
            let sent = match (Self::properties(message), short(&message.topic, "topic")) {
                // Nothing more is queued once the deadline passed (or while blocked): it
                // would only go out later as a copy.
                _ if status.blocked() => Err(blocked(message.id)),
                _ if tokio::time::Instant::now() >= deadline => Err(late(message.id, "publish")),
                (Ok(properties), Ok(routing_key)) => {
                    let publish = channel.basic_publish(
                        self.exchange.clone(),
                        routing_key,
                        BasicPublishOptions { mandatory: true, immediate: false },
                        &message.payload,
                        properties,
                    );
                    match tokio::time::timeout_at(deadline, publish).await {
                        Ok(sent) => {
                            sent.map_err(|error| publish_failed(message.id, "publish", error))
                        }
                        Err(_elapsed) => Err(late(message.id, "publish")),
                    }
                }
                (Err(error), _) | (_, Err(error)) => Err(PublishError::new(message.id, error)),
            };
            pending.push(sent);
        }
        let mut results = Vec::with_capacity(messages.len());
        for (message, sent) in messages.iter().zip(pending) {
            let refused = |reason: String| {
                PublishError::new(message.id, Error::broker(RABBITMQ, "publish", reason))
            };
            let confirmed = match sent {
                Ok(confirm) => match tokio::time::timeout_at(deadline, confirm).await {
                    Ok(Ok(Confirmation::Ack(None))) => Ok(()),
                    Ok(Ok(Confirmation::Ack(Some(returned)))) => Err(refused(format!(
                        "no queue took it (returned: {} {})",
                        returned.reply_code, returned.reply_text
                    ))),
                    Ok(Ok(Confirmation::Nack(_))) => Err(refused("refused (nack)".to_owned())),
                    Ok(Ok(Confirmation::NotRequested)) => {
                        Err(refused("publisher confirms are off on this channel".to_owned()))
                    }
                    // The link broke before the broker answered, or the broker closed the
                    // channel (refusing this message or another of the batch).
                    Ok(Err(error)) => Err(publish_failed(message.id, "publish confirm", error)),
                    Err(_elapsed) => Err(late(message.id, "publish confirm")),
                },
                Err(error) => Err(error),
            };
            results.push(confirmed);
        }
        results
    }
}

/// How an ack or nack ended.
enum Settled {
    Done(lapin::Result<bool>),
    /// Its channel ended with it still under way: the message goes back to the queue.
    ChannelEnded,
    /// Not handed to the connection within [`SETTLE_TIMEOUT`].
    TimedOut,
}

/// Runs `settle`, an ack or nack of `acker`'s message, but gives up on it once the message's
/// channel has ended, or after [`SETTLE_TIMEOUT`]. lapin 4.12 can leave a settle pending for
/// ever when the connection breaks just as it is sent: the command is queued behind the
/// connection's stopped I/O loop, neither run nor failed. The runner settles between fetches,
/// so that one ack would stop it for good, alive and silent, with no consumer left on the queue.
async fn settled(
    acker: &lapin::Acker,
    settle: impl Future<Output = lapin::Result<bool>>,
) -> Settled {
    let watch = async {
        let started = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(SETTLE_CHECK_EVERY).await;
            if acker.poisoned() {
                // lapin fails a settle under way as the channel ends: a moment for that.
                tokio::time::sleep(SETTLE_CHECK_EVERY).await;
                return Settled::ChannelEnded;
            }
            if started.elapsed() >= SETTLE_TIMEOUT {
                return Settled::TimedOut;
            }
        }
    };
    tokio::select! {
        biased;
        done = settle => Settled::Done(done),
        gave_up = watch => gave_up,
    }
}

/// A consumer on one RabbitMQ queue, with manual acks. Several subscriptions on one queue share
/// its messages.
pub struct RabbitSubscription {
    uri: String,
    queue: ShortString,
    prefetch: u16,
    consumer: Option<(Connection, Channel, lapin::Consumer)>,
    /// Set when an ack or nack did not go out in time (see [`SETTLE_TIMEOUT`]): the next fetch
    /// closes the connection and opens another.
    lost: Arc<AtomicBool>,
    /// Whether the operator was told that this is a classic queue (once).
    told_classic: AtomicBool,
}

impl std::fmt::Debug for RabbitSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitSubscription")
            .field("queue", &self.queue)
            .field("prefetch", &self.prefetch)
            .finish_non_exhaustive()
    }
}

impl RabbitSubscription {
    /// Consumes from the existing queue `queue`, holding at most `prefetch` messages
    /// unacknowledged (the runner's concurrency, plus room for messages waiting out a retry
    /// delay). Fails at once if the queue does not exist.
    pub async fn consume(uri: &str, queue: &str, prefetch: u16) -> Result<Self> {
        let mut subscription = Self {
            uri: uri.to_owned(),
            queue: short(queue, "queue")?,
            prefetch: prefetch.clamp(1, MAX_PREFETCH),
            consumer: None,
            lost: Arc::default(),
            told_classic: AtomicBool::new(false),
        };
        subscription.connect().await?;
        Ok(subscription)
    }

    async fn connect(&mut self) -> Result<&mut lapin::Consumer> {
        let lost = self.lost.swap(false, Ordering::SeqCst);
        let usable = !lost
            && self.consumer.as_ref().is_some_and(|(connection, channel, _)| {
                connection.status().connected() && channel.status().connected()
            });
        if !usable {
            if let Some((connection, _, _)) = self.consumer.take() {
                close_in_background(connection);
            }
            let (connection, channel) = open_channel(&self.uri, "idem-consumer").await?;
            let subscribe = async {
                channel
                    .basic_qos(self.prefetch, BasicQosOptions::default())
                    .await
                    .map_err(failed("set the prefetch"))?;
                channel
                    .basic_consume(
                        self.queue.clone(),
                        "".into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(failed(format!("consume from queue {}", self.queue)))
            };
            let consumer =
                tokio::time::timeout(OPEN_TIMEOUT, subscribe).await.map_err(|_| {
                    no_answer(format!("consume from queue {}", self.queue), OPEN_TIMEOUT)
                })??;
            self.consumer = Some((connection, channel, consumer));
        }
        Ok(&mut self.consumer.as_mut().expect("connected above").2)
    }

    /// `received` on a subscription that holds no connection, so that fuzzing can reach it.
    #[doc(hidden)]
    pub fn received_offline(delivery: &lapin::message::Delivery) -> Received {
        let subscription = Self {
            uri: String::new(),
            queue: "offline".into(),
            prefetch: 1,
            consumer: None,
            lost: Arc::default(),
            told_classic: AtomicBool::new(false),
        };
        subscription.received(delivery)
    }

    fn received(&self, delivery: &lapin::message::Delivery) -> Received {
        let properties = &delivery.properties;
        let mut headers = Vec::new();
        let mut delivery_count = None;
        for (name, value) in properties.headers().iter().flat_map(|table| table.inner()) {
            let text = match value {
                AMQPValue::LongString(text) => {
                    String::from_utf8_lossy(text.as_bytes()).into_owned()
                }
                AMQPValue::ShortString(text) => text.as_str().to_owned(),
                AMQPValue::LongLongInt(number) => number.to_string(),
                AMQPValue::LongInt(number) => number.to_string(),
                _ => continue,
            };
            if name.as_str() == "x-delivery-count" {
                delivery_count = text.parse::<u64>().ok();
            } else {
                headers.push((name.as_str().to_owned(), text));
            }
        }
        // Quorum queues count earlier deliveries; a classic queue only flags a redelivery.
        let attempt = match delivery_count {
            Some(count) => count.saturating_add(1),
            None => 1 + u64::from(delivery.redelivered),
        };
        if delivery.redelivered
            && delivery_count.is_none()
            && !self.told_classic.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                queue = %self.queue,
                "a classic queue: RabbitMQ does not count its redeliveries, so a message that \
                 kills its consumer each time is never dead-lettered; use a quorum queue"
            );
        }
        let id = match properties.message_id() {
            Some(id) if !id.as_str().is_empty() => id.as_str().to_owned(),
            // Published without a message-id: the id is derived from the content, which a
            // redelivery repeats, so messages with identical routing key, headers and payload
            // count as one (content-based deduplication).
            // (The prefix keeps the ids inboxes stored before the rule was shared.)
            _ => crate::content_id(
                "rabbitmq-sha256-",
                delivery.routing_key.as_str(),
                &headers,
                &delivery.data,
            ),
        };
        Received {
            id,
            subject: delivery.routing_key.as_str().to_owned(),
            payload: Bytes::from(delivery.data.clone()),
            headers,
            attempt,
            position: None,
        }
    }
}

#[async_trait]
impl Subscription for RabbitSubscription {
    type Token = lapin::Acker;

    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<(Received, Self::Token)>> {
        let consumer = self.connect().await?;
        let mut deliveries = Vec::new();
        // Wait for the first message, then take whatever else has already arrived.
        let first = match tokio::time::timeout(wait, consumer.next()).await {
            Err(_elapsed) => return Ok(Vec::new()),
            Ok(first) => first,
        };
        let mut next = first;
        loop {
            match next {
                Some(Ok(delivery)) => deliveries.push(delivery),
                Some(Err(error)) => {
                    self.consumer = None;
                    if deliveries.is_empty() {
                        return Err(failed("fetch")(error));
                    }
                    break;
                }
                None => {
                    self.consumer = None;
                    if deliveries.is_empty() {
                        return Err(Error::broker(
                            RABBITMQ,
                            "fetch",
                            format!("the consumer on queue {} was cancelled", self.queue),
                        ));
                    }
                    break;
                }
            }
            if deliveries.len() >= max {
                break;
            }
            match self.consumer.as_mut().and_then(|(_, _, consumer)| consumer.next().now_or_never())
            {
                Some(more) => next = more,
                None => break,
            }
        }
        Ok(deliveries
            .into_iter()
            .map(|delivery| (self.received(&delivery), delivery.acker))
            .collect())
    }

    async fn settle(&self, acker: Self::Token, settle: Settle) -> Result<()> {
        if self.lost.load(Ordering::SeqCst) {
            // An earlier settle got stuck on this connection: the next fetch closes it, and
            // RabbitMQ then redelivers this message too. Waiting out each one in turn would
            // take SETTLE_TIMEOUT per message.
            return Err(Error::broker(
                RABBITMQ,
                "ack",
                "the connection is being replaced; the message will be redelivered",
            ));
        }
        match settle {
            Settle::Ack => match settled(&acker, acker.ack(BasicAckOptions::default())).await {
                Settled::Done(Ok(true)) => Ok(()),
                // The channel it came on is gone: RabbitMQ requeues the message.
                Settled::Done(Ok(false)) | Settled::ChannelEnded => Err(Error::broker(
                    RABBITMQ,
                    "ack",
                    "the channel closed before the ack; it will be redelivered",
                )),
                Settled::Done(Err(error)) => Err(failed("ack")(error)),
                Settled::TimedOut => {
                    self.lost.store(true, Ordering::SeqCst);
                    let reason = format!(
                        "not sent within {SETTLE_TIMEOUT:?}; the connection is opened again and \
                         the message will be redelivered"
                    );
                    Err(Error::broker(RABBITMQ, "ack", reason))
                }
            },
            // RabbitMQ has no delayed requeue: hold the message (it counts against the
            // prefetch limit) for the delay, then return it to the queue. Should the
            // connection drop meanwhile, the broker requeues it anyway.
            Settle::Retry(delay) => {
                let lost = Arc::clone(&self.lost);
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let requeue = BasicNackOptions { multiple: false, requeue: true };
                    match settled(&acker, acker.nack(requeue)).await {
                        Settled::Done(Ok(true)) => {}
                        Settled::Done(_) | Settled::ChannelEnded => tracing::debug!(
                            "could not requeue; RabbitMQ requeues it as its channel closed"
                        ),
                        Settled::TimedOut => {
                            lost.store(true, Ordering::SeqCst);
                            tracing::debug!(
                                "the requeue was not sent in time; the connection is opened again"
                            );
                        }
                    }
                });
                Ok(())
            }
        }
    }
}
