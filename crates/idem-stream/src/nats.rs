//! The NATS JetStream adapter: publishes with `Nats-Msg-Id` set to the outbox id, so a
//! republished event inside the stream's duplicate window is dropped by the server.

use async_nats::HeaderMap;
use async_nats::jetstream::Context;
use async_trait::async_trait;

use crate::publish::{OutboxMessage, PublishError, Publisher};

/// How errors name this broker.
const NATS: &str = "NATS";

/// Connects to a NATS server, or to a cluster given as a comma-separated list of its servers
/// (`nats://a:4222,nats://b:4222`): the client connects to one of them and moves to another
/// when that one goes away.
pub async fn connect(servers: &str) -> crate::Result<async_nats::Client> {
    let servers: Vec<&str> =
        servers.split(',').map(str::trim).filter(|server| !server.is_empty()).collect();
    async_nats::connect(servers).await.map_err(crate::Error::from_broker(NATS, "connect"))
}

/// Whether a publish failed for want of a server that answers, not for what it carried.
fn unreachable(kind: async_nats::jetstream::context::PublishErrorKind) -> bool {
    use async_nats::jetstream::context::PublishErrorKind;
    matches!(kind, PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe)
}

/// Publishes outbox events to JetStream, on the subject named by the event's topic.
#[derive(Debug, Clone)]
pub struct JetStreamPublisher {
    context: Context,
    refuse_duplicates: bool,
}

impl JetStreamPublisher {
    pub fn new(context: Context) -> Self {
        Self { context, refuse_duplicates: false }
    }

    /// Fails a publish that the stream drops as a duplicate (a message with the same
    /// `Nats-Msg-Id` inside its duplicate window), instead of counting it as published: for
    /// putting a dead letter back, where the stream remembering the first copy means the new
    /// one never arrives. (The relay wants the opposite: its republished event is already in.)
    pub fn refusing_duplicates(self) -> Self {
        Self { refuse_duplicates: true, ..self }
    }
}

/// A message's NATS headers, checked: the relay's own and the event's.
fn headers_of(message: &OutboxMessage) -> crate::Result<HeaderMap> {
    use async_nats::header::{HeaderName, HeaderValue};
    let invalid = |what: String| crate::Error::InvalidEvent(what);
    let mut headers = HeaderMap::new();
    let mut add = |name: &str, value: &str| -> crate::Result<()> {
        let name: HeaderName =
            name.parse().map_err(|_| invalid(format!("header name {name:?} cannot go to NATS")))?;
        let value: HeaderValue = value
            .parse()
            .map_err(|_| invalid(format!("the value of header {name} cannot go to NATS")))?;
        headers.append(name, value);
        Ok(())
    };
    add("Nats-Msg-Id", &message.message_id())?;
    add(crate::publish::KEY_HEADER, &message.key)?;
    add(crate::publish::SEQ_HEADER, &message.seq.to_string())?;
    for (name, value) in &message.headers {
        add(name, value)?;
    }
    Ok(headers)
}

#[async_trait]
impl Publisher for JetStreamPublisher {
    async fn publish(&self, messages: &[OutboxMessage]) -> Vec<Result<(), PublishError>> {
        // Send every message first, then wait for the acks: one key each, so order within a
        // key is not at stake, and the round trips overlap.
        let mut pending = Vec::with_capacity(messages.len());
        for message in messages {
            // async-nats panics on a name or value it cannot carry (CR, LF, ':' in a name):
            // such an event fails here, and its key backs off and is parked, instead of
            // taking the relay down on every round.
            let headers = match headers_of(message) {
                Ok(headers) => headers,
                Err(reason) => {
                    pending.push(Err((reason, false)));
                    continue;
                }
            };
            let sent = self
                .context
                .publish_with_headers(message.topic.clone(), headers, message.payload.clone())
                .await
                .map_err(|error| {
                    let unreachable = unreachable(error.kind());
                    (crate::Error::broker(NATS, "publish", error), unreachable)
                });
            pending.push(sent);
        }
        let mut results = Vec::with_capacity(messages.len());
        for (message, sent) in messages.iter().zip(pending) {
            let result = match sent {
                Ok(ack) => match ack.await {
                    Ok(ack) if ack.duplicate && self.refuse_duplicates => {
                        let reason = format!(
                            "stream {} dropped it as a duplicate: it saw this Nats-Msg-Id within its duplicate window (2 minutes unless the stream says otherwise); try again after the window",
                            ack.stream
                        );
                        Err((crate::Error::broker(NATS, "publish", reason), false))
                    }
                    Ok(_) => Ok(()),
                    Err(error) => {
                        let unreachable = unreachable(error.kind());
                        Err((crate::Error::from_broker(NATS, "publish ack")(error), unreachable))
                    }
                },
                Err(error) => Err(error),
            };
            results.push(result.map_err(|(error, unreachable)| match unreachable {
                true => PublishError::unreachable(message.id, error),
                false => PublishError::new(message.id, error),
            }));
        }
        results
    }
}

/// A JetStream durable pull consumer as a [`crate::consume::Subscription`], with explicit acks.
pub struct JetStreamSubscription {
    consumer:
        async_nats::jetstream::consumer::Consumer<async_nats::jetstream::consumer::pull::Config>,
}

impl std::fmt::Debug for JetStreamSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamSubscription").finish_non_exhaustive()
    }
}

impl JetStreamSubscription {
    /// Binds to (or creates) the durable consumer `durable` on `stream`. `ack_wait` is how long
    /// the server waits for an ack before redelivering; keep it above the handler's longest run.
    pub async fn durable(
        stream: &async_nats::jetstream::stream::Stream,
        durable: &str,
        ack_wait: std::time::Duration,
    ) -> crate::Result<Self> {
        let config = async_nats::jetstream::consumer::pull::Config {
            durable_name: Some(durable.to_owned()),
            ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
            ack_wait,
            ..Default::default()
        };
        let consumer = stream
            .get_or_create_consumer(durable, config)
            .await
            .map_err(crate::Error::from_broker(NATS, format!("durable consumer {durable}")))?;
        Ok(Self { consumer })
    }
}

#[async_trait]
impl crate::consume::Subscription for JetStreamSubscription {
    type Token = async_nats::jetstream::Message;

    async fn fetch(
        &mut self,
        max: usize,
        wait: std::time::Duration,
    ) -> crate::Result<Vec<(crate::consume::Received, Self::Token)>> {
        use futures_util::StreamExt;
        let mut batch = self
            .consumer
            .fetch()
            .max_messages(max)
            .expires(wait)
            .messages()
            .await
            .map_err(crate::Error::from_broker(NATS, "fetch"))?;
        let mut received = Vec::new();
        while let Some(message) = batch.next().await {
            let message = message.map_err(crate::Error::from_broker(NATS, "fetch"))?;
            received.push((received_from(&message), message));
        }
        Ok(received)
    }

    async fn settle(
        &self,
        token: Self::Token,
        settle: crate::consume::Settle,
    ) -> crate::Result<()> {
        use async_nats::jetstream::AckKind;
        let kind = match settle {
            crate::consume::Settle::Ack => AckKind::Ack,
            crate::consume::Settle::Retry(delay) => AckKind::Nak(Some(delay)),
        };
        token.ack_with(kind).await.map_err(crate::Error::from_broker(NATS, "ack"))
    }
}

/// A JetStream message as the consumer sees it, by the one message-id rule.
#[doc(hidden)]
pub fn received_from(message: &async_nats::jetstream::Message) -> crate::consume::Received {
    let attempt = message.info().map_or(1, |info| info.delivered.max(1) as u64);
    let headers: Vec<(String, String)> = message
        .headers
        .iter()
        .flat_map(|headers| headers.iter())
        .flat_map(|(name, values)| {
            values.iter().map(move |value| (name.to_string(), value.to_string()))
        })
        .collect();
    let id = headers
        .iter()
        .find(|(name, _)| name == "Nats-Msg-Id")
        .map(|(_, value)| value.clone())
        .unwrap_or_else(|| {
            // Not the stream sequence: a producer's retry is a new sequence.
            crate::content_id("sha256-", &message.subject, &headers, &message.payload)
        });
    crate::consume::Received {
        id,
        subject: message.subject.to_string(),
        payload: message.payload.clone(),
        headers,
        attempt,
        // Only the offsets mode's source reads in order from a position (see
        // `JetStreamPartitions`); a durable consumer's redeliveries are not in stream order.
        position: None,
    }
}

/// One partition's messages; its last item is an error naming the partition when its ordered
/// consumer failed or ended, after which it is made again from the last position handed out.
type PartitionMessages = std::pin::Pin<
    Box<
        dyn futures_util::Stream<Item = Result<async_nats::jetstream::Message, (String, String)>>
            + Send,
    >,
>;

/// How long making one partition's ordered consumer again may take before it is left for the
/// next fetch, and the longest wait between tries.
const REVIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
const REVIVE_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// The offsets mode's source: one ordered consumer per partition (a subject of the stream),
/// each starting at the sequence after the last one its consumer recorded
/// ([`crate::postgres::Offsets::positions`]), read in stream order with no acknowledgements:
/// the recorded position is the cursor. After a restart each partition is read again from its
/// recorded position, so nothing is skipped and nothing applied is applied again (the handler's
/// `Offsets::advance` refuses positions at or below the mark). Run it with the runner ordered
/// by subject ([`crate::consume::OrderBy::Subject`]) so each partition is handled in order.
///
/// An ordered consumer lives in the server's memory: a server that restarts (or a cluster node
/// that held it) forgets it, and async-nats then reports "consumer not found" and reads no
/// more. A partition whose consumer failed or ended is made again here, on the next fetches
/// (backing off up to 5 s while the server is away, each attempt bounded by 5 s), from the last
/// position handed out. (When the server holding the consumer dies but the one the client is
/// connected to lives on, as in a cluster, async-nats notices only when its pull expires or
/// heartbeats stop: up to about 35 s.)
pub struct JetStreamPartitions {
    stream: async_nats::jetstream::stream::Stream,
    /// (In a mutex only to be `Sync`: `fetch` has it alone, through `get_mut`.)
    messages: std::sync::Mutex<futures_util::stream::SelectAll<PartitionMessages>>,
    /// Each partition's last position handed out (at first, its recorded one): what an ordered
    /// consumer delivers again (async-nats recreates a consumer that saw nothing yet from the
    /// stream's start) is dropped here instead of going through the handlers as duplicates.
    last: std::collections::HashMap<String, u64>,
    /// Partitions without a consumer, and when to make each again.
    broken: Vec<Broken>,
    /// Per partition, the wait before its next making: doubles each time its consumer fails or
    /// cannot be made, and is forgotten once a message of it is handed out, so a consumer that
    /// is made but fails at once is not made again in a tight loop.
    backoff: std::collections::HashMap<String, std::time::Duration>,
}

struct Broken {
    subject: String,
    retry_at: tokio::time::Instant,
}

impl std::fmt::Debug for JetStreamPartitions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamPartitions").finish_non_exhaustive()
    }
}

/// An ordered consumer for `subject` reading after stream sequence `after` (0: from the start),
/// as a stream that ends with the partition's error.
async fn partition_messages(
    stream: &async_nats::jetstream::stream::Stream,
    subject: &str,
    after: u64,
) -> crate::Result<PartitionMessages> {
    use async_nats::jetstream::consumer::DeliverPolicy;
    use futures_util::StreamExt;
    let config = async_nats::jetstream::consumer::pull::OrderedConfig {
        filter_subject: subject.to_owned(),
        deliver_policy: if after == 0 {
            DeliverPolicy::All
        } else {
            DeliverPolicy::ByStartSequence { start_sequence: after + 1 }
        },
        ..Default::default()
    };
    let context = format!("ordered consumer for partition {subject}");
    let consumer = stream
        .create_consumer(config)
        .await
        .map_err(crate::Error::from_broker(NATS, context.clone()))?;
    let ordered = consumer.messages().await.map_err(crate::Error::from_broker(NATS, context))?;
    let state = Some((subject.to_owned(), ordered));
    let messages = futures_util::stream::unfold(state, |state| async move {
        let (subject, mut ordered) = state?;
        match ordered.next().await {
            Some(Ok(message)) => Some((Ok(message), Some((subject, ordered)))),
            Some(Err(error)) => Some((Err((subject, error.to_string())), None)),
            None => Some((Err((subject, "the ordered consumer ended".to_owned())), None)),
        }
    });
    Ok(messages.boxed())
}

impl JetStreamPartitions {
    /// Starts reading each `(subject, after)` partition of `stream` after stream sequence
    /// `after` (0: from the start).
    pub async fn start(
        stream: &async_nats::jetstream::stream::Stream,
        partitions: impl IntoIterator<Item = (String, u64)>,
    ) -> crate::Result<Self> {
        let mut messages = futures_util::stream::SelectAll::new();
        let mut last = std::collections::HashMap::new();
        for (subject, after) in partitions {
            messages.push(partition_messages(stream, &subject, after).await?);
            last.insert(subject, after);
        }
        let messages = std::sync::Mutex::new(messages);
        let (broken, backoff) = (Vec::new(), std::collections::HashMap::new());
        Ok(Self { stream: stream.clone(), messages, last, broken, backoff })
    }

    /// Makes again, all at once, the consumers of the broken partitions whose time has come.
    /// Cancelled midway (a caller's timeout), it changes nothing: the results are applied only
    /// once every attempt has ended.
    async fn revive(&mut self) {
        let now = tokio::time::Instant::now();
        let due: Vec<usize> =
            (0..self.broken.len()).filter(|&i| self.broken[i].retry_at <= now).collect();
        let attempts = due.iter().map(|&index| {
            let subject = &self.broken[index].subject;
            let after = self.last.get(subject).copied().unwrap_or(0);
            tokio::time::timeout(REVIVE_TIMEOUT, partition_messages(&self.stream, subject, after))
        });
        let results = futures_util::future::join_all(attempts).await;
        let messages = self.messages.get_mut().unwrap_or_else(|poison| poison.into_inner());
        let mut made = vec![false; self.broken.len()];
        for (index, result) in due.into_iter().zip(results) {
            let broken = &mut self.broken[index];
            let error = match result {
                Ok(Ok(partition)) => {
                    tracing::info!(subject = %broken.subject, "a partition's ordered consumer was made again");
                    messages.push(partition);
                    made[index] = true;
                    continue;
                }
                Ok(Err(error)) => error.to_string(),
                Err(_) => format!("no answer within {REVIVE_TIMEOUT:?}"),
            };
            let wait = next_backoff(&mut self.backoff, &broken.subject);
            tracing::debug!(subject = %broken.subject, %error, ?wait, "a partition's ordered consumer could not be made again yet");
            broken.retry_at = tokio::time::Instant::now() + wait;
        }
        let mut made = made.into_iter();
        self.broken.retain(|_| !made.next().unwrap_or(false));
    }

    /// Records that `subject`'s consumer failed: made again on a later fetch, after the
    /// partition's backoff.
    fn broke(&mut self, subject: String, error: String) {
        tracing::warn!(%subject, %error, "a partition's ordered consumer failed; making it again");
        let retry_at = tokio::time::Instant::now() + next_backoff(&mut self.backoff, &subject);
        self.broken.push(Broken { subject, retry_at });
    }
}

/// `subject`'s wait before its next making (0 the first time), doubled for the time after,
/// between 100 ms and `REVIVE_BACKOFF_MAX`.
fn next_backoff(
    backoff: &mut std::collections::HashMap<String, std::time::Duration>,
    subject: &str,
) -> std::time::Duration {
    let wait = backoff.entry(subject.to_owned()).or_default();
    let now = *wait;
    *wait = (*wait * 2).clamp(std::time::Duration::from_millis(100), REVIVE_BACKOFF_MAX);
    now
}

#[async_trait]
impl crate::consume::Subscription for JetStreamPartitions {
    /// Nothing to settle: the recorded position is the cursor.
    type Token = ();

    async fn fetch(
        &mut self,
        max: usize,
        wait: std::time::Duration,
    ) -> crate::Result<Vec<(crate::consume::Received, ())>> {
        use futures_util::{FutureExt, StreamExt};
        if !self.broken.is_empty() {
            self.revive().await;
        }
        let messages = self.messages.get_mut().unwrap_or_else(|poison| poison.into_inner());
        if messages.is_empty() {
            // Every partition is broken: wait (within `wait`) for the next one due, here rather
            // than in the runner's backoff, which can be far longer.
            let next = self.broken.iter().map(|broken| broken.retry_at).min();
            let deadline = tokio::time::Instant::now() + wait;
            tokio::time::sleep_until(next.map_or(deadline, |next| next.min(deadline))).await;
            if self.broken.is_empty() {
                return Err(crate::Error::broker(NATS, "fetch", "no partition to read"));
            }
            return Ok(Vec::new());
        }
        let (last, backoff) = (&mut self.last, &mut self.backoff);
        let mut batch = Vec::new();
        let mut failed = Vec::new();
        // A message past its partition's last position, or none (a replay).
        let mut take = |message: &async_nats::jetstream::Message| {
            let mut received = received_from(message);
            let position = message.info().map_or(0, |info| info.stream_sequence);
            received.position = Some(position);
            let seen = last.entry(received.subject.clone()).or_insert(0);
            if position <= *seen {
                return None;
            }
            *seen = position;
            backoff.remove(&received.subject);
            Some((received, ()))
        };
        match tokio::time::timeout(wait, messages.next()).await {
            Err(_) | Ok(None) => {}
            Ok(Some(Ok(first))) => {
                batch.extend(take(&first));
                while batch.len() < max {
                    match messages.next().now_or_never() {
                        Some(Some(Ok(message))) => batch.extend(take(&message)),
                        Some(Some(Err(broken))) => failed.push(broken),
                        _ => break,
                    }
                }
            }
            Ok(Some(Err(broken))) => failed.push(broken),
        }
        for (subject, error) in failed {
            self.broke(subject, error);
        }
        Ok(batch)
    }

    async fn settle(&self, (): (), _settle: crate::consume::Settle) -> crate::Result<()> {
        Ok(())
    }
}
