//! The consumer runner: takes messages from a broker subscription, runs a handler on each with
//! bounded concurrency, acknowledges only after the handler succeeded (for an inbox handler:
//! after its transaction committed), retries failures with backoff, and hands a message to a
//! dead-letter destination after `max_attempts` failures, with the failure recorded.
//!
//! **Per-key order.** Messages that share an order key (by default the `Idem-Key` header the
//! relay sets; see [`OrderBy`]) are handled one after another in the order they arrived;
//! different keys run in parallel, up to `concurrency` handlers at once. A failed message is
//! retried in place, after its backoff, before anything later of its key runs: a message being
//! retried holds its key's later messages, and only those (the other keys flow on). Messages
//! fetched and not yet settled are bounded by `max_buffered`: should a parked key's later
//! messages fill it, fetching pauses until the key moves on (its retries are bounded by
//! `max_attempts`), rather than handing messages back, which would let the broker redeliver
//! them out of order. Order holds within one runner; several runners on one subscription
//! share keys only as the broker partitions them (see docs/messaging.md).
//!
//! **Two kinds of failure.** A handler fails with [`Failure::Rejected`] when the message
//! cannot be handled (it counts toward `max_attempts`, then the message is dead-lettered), or
//! [`Failure::Unavailable`] when something the handler needs is down (its database): retried
//! with backoff for as long as it lasts, never counted, so an outage dead-letters nothing.
//! A plain `String` error is a rejection; [`crate::Error`] converts by its cause.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, watch};

use async_trait::async_trait;
use bytes::Bytes;

/// A message as the consumer sees it.
#[derive(Debug, Clone)]
pub struct Received {
    /// The event's id (for outbox events, the `Nats-Msg-Id` the relay set): the inbox key.
    pub id: String,
    pub subject: String,
    pub payload: Bytes,
    pub headers: Vec<(String, String)>,
    /// 1 on the first delivery, then counted by the broker.
    pub attempt: u64,
    /// The message's place in its partition, for sources that have one (the JetStream stream
    /// sequence, with [`crate::nats::JetStreamPartitions`]): what the offsets mode records
    /// ([`crate::postgres::Offsets`]).
    pub position: Option<u64>,
}

/// What to tell the broker about one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Done: do not deliver again.
    Ack,
    /// Deliver again after this long.
    Retry(Duration),
}

/// A broker subscription the runner pulls from (a JetStream durable pull consumer, a RabbitMQ
/// queue, a Redis Streams group).
#[async_trait]
pub trait Subscription: Send {
    type Token: Send + 'static;
    /// Up to `max` messages, waiting at most `wait` for the first.
    async fn fetch(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> crate::Result<Vec<(Received, Self::Token)>>;
    async fn settle(&self, token: Self::Token, settle: Settle) -> crate::Result<()>;
}

/// Where a message goes after its last failed attempt.
#[async_trait]
pub trait DeadLetter: Send + Sync {
    async fn bury(&self, message: &Received, failure: &str) -> crate::Result<()>;
}

/// Which messages must be handled in order: those with the same order key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderBy {
    /// The value of this header (case-insensitive name); messages without it are unordered.
    /// The relay sets `Idem-Key` to the outbox event's key.
    Header(&'static str),
    /// The message's subject (JetStream subject, Redis stream, RabbitMQ routing key).
    Subject,
    /// No order: every message on its own.
    None,
}

impl OrderBy {
    /// The default: the `Idem-Key` header the relay sets.
    pub const fn default_key() -> Self {
        Self::Header(crate::publish::KEY_HEADER)
    }

    /// The lane a message joins: its order key, or (unordered) its own id. A message with a
    /// position (the offsets mode) always goes by its partition, whatever the setting: its
    /// partition must be handled in order, or an earlier message would look like a duplicate.
    fn lane(self, message: &Received) -> String {
        if message.position.is_some() {
            return format!("p:{}", message.subject);
        }
        let key = match self {
            Self::Header(name) => message
                .headers
                .iter()
                .find(|(header, _)| header.eq_ignore_ascii_case(name))
                .map(|(_, value)| value.as_str()),
            Self::Subject => Some(message.subject.as_str()),
            Self::None => None,
        };
        match key {
            Some(key) => format!("k:{key}"),
            None => format!("m:{}", message.id),
        }
    }
}

/// Why a handler failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The message cannot be handled (bad data, a rule it breaks): counts toward
    /// `max_attempts`, then dead-lettered.
    Rejected(String),
    /// Something the handler needs is unavailable (its database down, a connection lost): the
    /// message is retried with backoff for as long as that lasts, and never dead-lettered for
    /// it.
    Unavailable(String),
}

impl Failure {
    pub fn rejected(reason: impl std::fmt::Display) -> Self {
        Self::Rejected(reason.to_string())
    }

    pub fn unavailable(reason: impl std::fmt::Display) -> Self {
        Self::Unavailable(reason.to_string())
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Rejected(reason) => f.write_str(reason),
            Self::Unavailable(reason) => write!(f, "unavailable: {reason}"),
        }
    }
}

impl From<String> for Failure {
    fn from(reason: String) -> Self {
        Self::Rejected(reason)
    }
}

impl From<&str> for Failure {
    fn from(reason: &str) -> Self {
        Self::Rejected(reason.to_owned())
    }
}

impl From<crate::Error> for Failure {
    /// Lost connections and a database that is shutting down, starting up, out of resources
    /// or asking for the transaction to be tried again are [`Failure::Unavailable`]; the rest
    /// are rejections.
    fn from(error: crate::Error) -> Self {
        if error.is_unavailable() {
            Self::Unavailable(error.to_string())
        } else {
            Self::Rejected(error.to_string())
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct RunnerConfig {
    /// Handlers running at once (and, for [`run_batches`], the most messages in a batch).
    pub concurrency: usize,
    /// Failed attempts before a message goes to the dead-letter destination.
    pub max_attempts: u64,
    /// The first retry waits this long; each further one twice as long, up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// How long one fetch waits for messages.
    pub fetch_wait: Duration,
    /// Which messages are handled in order.
    pub order_by: OrderBy,
    /// Messages fetched and not yet settled, at most (0: sixteen times `concurrency`, at
    /// least 64).
    pub max_buffered: usize,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            concurrency: 16,
            max_attempts: 5,
            backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            fetch_wait: Duration::from_millis(500),
            order_by: OrderBy::default_key(),
            max_buffered: 0,
        }
    }
}

impl RunnerConfig {
    fn max_buffered(&self) -> usize {
        match self.max_buffered {
            0 => (self.concurrency.max(1) * 16).max(64),
            set => set.max(1),
        }
    }

    fn retry_delay(&self, attempt: u64) -> Duration {
        let doublings = attempt.saturating_sub(1).min(20) as u32;
        self.backoff.saturating_mul(2u32.saturating_pow(doublings)).min(self.max_backoff)
    }
}

/// What a runner did, for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunReport {
    pub handled: u64,
    pub retried: u64,
    pub dead_lettered: u64,
    pub settle_errors: u64,
    /// Fetches that failed (the broker was unreachable) and were retried after a backoff.
    pub fetch_errors: u64,
    /// Handler runs that failed as [`Failure::Unavailable`] and were retried, uncounted.
    pub unavailable: u64,
    /// Messages handed back to the broker unhandled because the runner was stopping.
    pub returned: u64,
    /// Further copies of a message (redelivered, or republished with its id) that arrived
    /// while it waited here, settled with it rather than run again.
    pub copies: u64,
}

/// The handler's verdict on one message.
pub type HandlerResult = Result<(), Failure>;

type Verdict = Result<(), Failure>;
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
/// One message's handler, boxed, as a lane runs it.
type Single = Arc<dyn Fn(Received) -> BoxFuture<Verdict> + Send + Sync>;
/// A whole batch's handler.
type Batch = Arc<dyn Fn(Vec<Received>) -> BoxFuture<Verdict> + Send + Sync>;

/// Runs until `shutdown` resolves, `handler` on each message (see the module's notes on order
/// and failures); messages being handled then are finished and settled, those not started are
/// handed back to the broker. A failed fetch (the broker unreachable) is logged and retried
/// with backoff, not returned. The handler's error is anything that converts into a
/// [`Failure`]: a `String` (a rejection), a [`Failure`], an [`crate::Error`].
pub async fn run<S, H, F, E, D>(
    subscription: S,
    handler: H,
    dead_letter: Arc<D>,
    config: RunnerConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> RunReport
where
    S: Subscription,
    H: Fn(Received) -> F + Send + Sync + 'static,
    F: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: Into<Failure> + 'static,
    D: DeadLetter + ?Sized + 'static,
{
    let single: Single = Arc::new(move |message| {
        // A span per attempt, linked to the producer's (see `crate::trace`).
        let span = crate::trace::consumer_span(&message);
        let work = span.in_scope(|| handler(message));
        let work = async move { work.await.map_err(Into::into) };
        Box::pin(tracing::Instrument::instrument(work, span))
    });
    drive(subscription, single, None, dead_letter, config, shutdown).await
}

/// Like [`run`], but `handler` receives each fetched batch (up to `concurrency` messages, in
/// arrival order) whole, to apply it in one transaction (see
/// [`crate::postgres::Inbox::record_many`]): one commit per batch instead of one per message.
/// If the batch fails, its messages are handled again one at a time, each as a batch of one,
/// in their keys' order, so only the failing ones are retried and, after `max_attempts`,
/// dead-lettered. Messages whose key is still being retried join that key's line instead of
/// the next batch.
pub async fn run_batches<S, H, F, E, D>(
    subscription: S,
    handler: H,
    dead_letter: Arc<D>,
    config: RunnerConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> RunReport
where
    S: Subscription,
    H: Fn(Vec<Received>) -> F + Send + Sync + 'static,
    F: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: Into<Failure> + 'static,
    D: DeadLetter + ?Sized + 'static,
{
    let handler = Arc::new(handler);
    let batch: Batch = {
        let handler = Arc::clone(&handler);
        Arc::new(move |messages| {
            let work = handler(messages);
            Box::pin(async move { work.await.map_err(Into::into) })
        })
    };
    let single: Single = Arc::new(move |message| {
        let work = handler(vec![message]);
        Box::pin(async move { work.await.map_err(Into::into) })
    });
    drive(subscription, single, Some(batch), dead_letter, config, shutdown).await
}

/// How a lane finished with one message.
#[derive(Debug)]
enum Outcome {
    Handled,
    Buried,
    /// The runner is stopping: back to the broker, unhandled (or not yet handled again).
    Returned,
}

/// A lane's report on one message, in its arrival order.
#[derive(Debug)]
struct Done {
    lane: String,
    outcome: Outcome,
    /// Rejections retried, and unavailable failures retried.
    retried: u64,
    unavailable: u64,
}

/// What the lanes share.
struct Lanes<D: ?Sized> {
    single: Single,
    dead_letter: Arc<D>,
    config: RunnerConfig,
    /// Handlers running at once.
    permits: Semaphore,
    stopping: watch::Receiver<bool>,
    done: mpsc::UnboundedSender<Done>,
}

/// One order key's messages, handled one after another by a task of its own.
struct Lane<T> {
    sender: mpsc::UnboundedSender<Received>,
    /// The tokens of the messages sent to the lane and not yet settled, in order.
    tokens: VecDeque<(String, T)>,
}

/// Sleeps for `delay`; `false` if the runner began stopping first.
async fn pause(delay: Duration, stopping: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        () = tokio::time::sleep(delay) => true,
        _ = stopping.wait_for(|stop| *stop) => false,
    }
}

impl<D: DeadLetter + ?Sized + 'static> Lanes<D> {
    /// A lane's task: its messages one by one, in arrival order, until the runner drops the
    /// lane (once every message sent to it is settled).
    async fn run(self: Arc<Self>, lane: String, mut messages: mpsc::UnboundedReceiver<Received>) {
        while let Some(message) = messages.recv().await {
            let done = self.handle(&lane, message).await;
            if self.done.send(done).is_err() {
                return;
            }
        }
    }

    /// One message, retried in place until it is handled, buried, or the runner stops.
    async fn handle(&self, lane: &str, mut message: Received) -> Done {
        let mut stopping = self.stopping.clone();
        let mut done =
            Done { lane: lane.to_owned(), outcome: Outcome::Returned, retried: 0, unavailable: 0 };
        loop {
            if *stopping.borrow() {
                return done;
            }
            let verdict = {
                let Ok(_permit) = self.permits.acquire().await else { return done };
                if *stopping.borrow() {
                    return done;
                }
                let span = tracing::debug_span!(
                    "consume_message",
                    id = %message.id,
                    subject = %message.subject,
                    attempt = message.attempt
                );
                // A handler that panics, even while making its future, fails this attempt
                // only: the lane (and its key's later messages) must go on.
                let single = &self.single;
                let made = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    single(message.clone())
                }));
                match made {
                    Ok(work) => {
                        match tokio::spawn(tracing::Instrument::instrument(work, span)).await {
                            Ok(verdict) => verdict,
                            Err(panic) => {
                                Err(Failure::Rejected(format!("the handler panicked: {panic}")))
                            }
                        }
                    }
                    Err(_) => Err(Failure::Rejected("the handler panicked".into())),
                }
            };
            match verdict {
                Ok(()) => {
                    done.outcome = Outcome::Handled;
                    return done;
                }
                Err(Failure::Unavailable(reason)) => {
                    done.unavailable += 1;
                    let delay = self.config.retry_delay(done.unavailable);
                    tracing::warn!(id = %message.id, %reason, retry_in = ?delay, "handler's dependency unavailable; retrying (not counted as an attempt)");
                    if !pause(delay, &mut stopping).await {
                        return done;
                    }
                }
                Err(Failure::Rejected(reason)) if message.attempt >= self.config.max_attempts => {
                    tracing::warn!(id = %message.id, attempt = message.attempt, %reason, "giving up: dead letter");
                    let mut tries = 0;
                    loop {
                        // On a task of its own: a panicking destination fails this burial only.
                        let bury = {
                            let (dead_letter, message, reason) =
                                (Arc::clone(&self.dead_letter), message.clone(), reason.clone());
                            tokio::spawn(async move { dead_letter.bury(&message, &reason).await })
                        };
                        let buried = match bury.await {
                            Ok(buried) => buried.map_err(|error| error.to_string()),
                            Err(panic) => {
                                Err(format!("the dead-letter destination panicked: {panic}"))
                            }
                        };
                        match buried {
                            Ok(()) => {
                                // For alerts (deploy/prometheus): exported where the
                                // application installs a metrics recorder.
                                metrics::counter!("idem_dead_lettered_total").increment(1);
                                done.outcome = Outcome::Buried;
                                return done;
                            }
                            // Not buried: keep it (in this lane, then in the broker) rather
                            // than lose it, and never run it again meanwhile.
                            Err(error) => {
                                tries += 1;
                                let delay = self.config.retry_delay(tries);
                                tracing::error!(id = %message.id, %error, retry_in = ?delay, "dead-letter destination failed; trying again");
                                if !pause(delay, &mut stopping).await {
                                    return done;
                                }
                            }
                        }
                    }
                }
                Err(Failure::Rejected(reason)) => {
                    let delay = self.config.retry_delay(message.attempt);
                    tracing::debug!(id = %message.id, attempt = message.attempt, %reason, retry_in = ?delay, "handler failed; retrying");
                    done.retried += 1;
                    message.attempt += 1;
                    if !pause(delay, &mut stopping).await {
                        return done;
                    }
                }
            }
        }
    }
}

/// The runner's loop: fetch while there is room, give each message to its key's lane (or, for
/// batches, to the next batch), settle each as its lane reports it done.
async fn drive<S, D>(
    mut subscription: S,
    single: Single,
    batch: Option<Batch>,
    dead_letter: Arc<D>,
    config: RunnerConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> RunReport
where
    S: Subscription,
    D: DeadLetter + ?Sized + 'static,
{
    /// How long a fetch waits while lanes are busy, so that finished messages are settled
    /// soon.
    const BUSY_WAIT: Duration = Duration::from_millis(20);
    let concurrency = config.concurrency.max(1);
    let max_buffered = config.max_buffered();
    let (stop, stopping) = watch::channel(false);
    let (done_sender, mut done) = mpsc::unbounded_channel();
    let shared = Arc::new(Lanes {
        single,
        dead_letter,
        config,
        permits: Semaphore::new(concurrency),
        stopping,
        done: done_sender,
    });
    let mut lanes: HashMap<String, Lane<S::Token>> = HashMap::new();
    // Ids fetched and not yet settled: a redelivery of one (its ack wait ran out while it
    // waited in its lane; RabbitMQ after a reconnect; a republished copy) is not handled twice
    // at once. Its token is kept with the id and settled as the first copy is, so it never
    // holds a broker's delivery slot for ever.
    let mut buffered: Buffered<S::Token> = HashMap::new();
    let mut report = RunReport::default();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut stopped = false;
    let mut failed_fetches = 0;

    loop {
        while let Ok(finished) = done.try_recv() {
            settle_done(&subscription, &mut lanes, &mut buffered, &mut report, finished).await;
        }
        if stopped {
            if lanes.is_empty() {
                return report;
            }
            if let Some(finished) = done.recv().await {
                settle_done(&subscription, &mut lanes, &mut buffered, &mut report, finished).await;
            }
            continue;
        }
        let room = max_buffered.saturating_sub(buffered.len()).min(concurrency);
        if room == 0 {
            tokio::select! {
                () = &mut shutdown => { stopped = true; let _ = stop.send(true); }
                Some(finished) = done.recv() => {
                    settle_done(&subscription, &mut lanes, &mut buffered, &mut report, finished).await;
                }
            }
            continue;
        }
        let wait =
            if lanes.is_empty() { config.fetch_wait } else { config.fetch_wait.min(BUSY_WAIT) };
        let fetched = tokio::select! {
            () = &mut shutdown => { stopped = true; let _ = stop.send(true); continue; }
            fetched = subscription.fetch(room, wait) => fetched,
        };
        let fetched = match fetched {
            Ok(fetched) => {
                failed_fetches = 0;
                fetched
            }
            // A broker outage: wait (doubling, up to `max_backoff`) and try again; the
            // adapters reconnect on the next fetch.
            Err(error) => {
                failed_fetches += 1;
                report.fetch_errors += 1;
                let delay = config.retry_delay(failed_fetches);
                tracing::error!(%error, retry_in = ?delay, "fetching from the broker failed");
                tokio::select! {
                    () = &mut shutdown => { stopped = true; let _ = stop.send(true); }
                    () = tokio::time::sleep(delay) => {}
                }
                continue;
            }
        };
        let mut next_batch = Vec::new();
        for (message, token) in fetched {
            let copy_key = copy_key(&message);
            if let Some(copies) = buffered.get_mut(&copy_key) {
                tracing::debug!(id = %message.id, "redelivered while still waiting here; settled with the first copy");
                copies.push(token);
                report.copies += 1;
                continue;
            }
            buffered.insert(copy_key, Vec::new());
            let lane = config.order_by.lane(&message);
            if batch.is_some() && !lanes.contains_key(&lane) {
                next_batch.push((lane, message, token));
                continue;
            }
            to_lane(&shared, &mut lanes, lane, message, token);
        }
        if let Some(batch) = &batch
            && !next_batch.is_empty()
        {
            let messages: Vec<Received> =
                next_batch.iter().map(|(_, message, _)| message.clone()).collect();
            let count = messages.len();
            let span = tracing::debug_span!("consume_batch", messages = count);
            let work = tracing::Instrument::instrument(batch(messages), span);
            let verdict = match tokio::spawn(work).await {
                Ok(verdict) => verdict,
                Err(panic) => Err(Failure::Rejected(format!("the handler panicked: {panic}"))),
            };
            match verdict {
                Ok(()) => {
                    for (_, message, token) in next_batch {
                        report.handled += 1;
                        let id = copy_key(&message);
                        settle(&subscription, &mut buffered, &id, token, Settle::Ack, &mut report)
                            .await;
                    }
                }
                Err(failure) => {
                    tracing::debug!(count, %failure, "batch failed; handling its messages one by one");
                    for (lane, message, token) in next_batch {
                        to_lane(&shared, &mut lanes, lane, message, token);
                    }
                }
            }
        }
    }
}

/// What makes two fetched messages copies of one: the same id; for a message with a position
/// (the offsets mode), also the same place in its partition. Readers of partitions never hand
/// out a position twice, and two messages at different positions are two messages there, even
/// with the same content (and so the same derived id).
fn copy_key(message: &Received) -> String {
    match message.position {
        None => message.id.clone(),
        Some(position) => format!("{}\u{1f}{}\u{1f}{position}", message.id, message.subject),
    }
}

/// Gives `message` to its lane, starting one if there is none.
fn to_lane<D, T>(
    shared: &Arc<Lanes<D>>,
    lanes: &mut HashMap<String, Lane<T>>,
    key: String,
    message: Received,
    token: T,
) where
    D: DeadLetter + ?Sized + 'static,
{
    let lane = lanes.entry(key.clone()).or_insert_with(|| {
        let (sender, receiver) = mpsc::unbounded_channel();
        tokio::spawn(Arc::clone(shared).run(key, receiver));
        Lane { sender, tokens: VecDeque::new() }
    });
    lane.tokens.push_back((copy_key(&message), token));
    // The lane's task lives until the lane is dropped, so the send cannot fail.
    let _ = lane.sender.send(message);
}

/// Settles the oldest message of a lane, which its task reports done.
async fn settle_done<S: Subscription>(
    subscription: &S,
    lanes: &mut HashMap<String, Lane<S::Token>>,
    buffered: &mut Buffered<S::Token>,
    report: &mut RunReport,
    done: Done,
) {
    let Some(lane) = lanes.get_mut(&done.lane) else { return };
    let Some((id, token)) = lane.tokens.pop_front() else { return };
    if lane.tokens.is_empty() {
        // Dropping the sender ends the lane's task.
        lanes.remove(&done.lane);
    }
    report.retried += done.retried;
    report.unavailable += done.unavailable;
    let settled = match done.outcome {
        Outcome::Handled => {
            report.handled += 1;
            Settle::Ack
        }
        Outcome::Buried => {
            report.dead_lettered += 1;
            Settle::Ack
        }
        Outcome::Returned => {
            report.returned += 1;
            Settle::Retry(Duration::ZERO)
        }
    };
    settle(subscription, buffered, &id, token, settled, report).await;
}

/// Messages fetched and not settled, by id, with the tokens of further copies of each.
type Buffered<T> = HashMap<String, Vec<T>>;

/// Settles a message, and the copies of it that arrived while it waited, the same way.
async fn settle<S: Subscription>(
    subscription: &S,
    buffered: &mut Buffered<S::Token>,
    id: &str,
    token: S::Token,
    settled: Settle,
    report: &mut RunReport,
) {
    let copies = buffered.remove(id).unwrap_or_default();
    for token in std::iter::once(token).chain(copies) {
        if let Err(error) = subscription.settle(token, settled).await {
            // The broker redelivers an unsettled message after its ack wait: at least once.
            tracing::warn!(%id, %error, "could not settle; the broker will redeliver");
            report.settle_errors += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_double_up_to_the_cap() {
        let config = RunnerConfig {
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            ..RunnerConfig::default()
        };
        let delays: Vec<u128> =
            (1..=6).map(|attempt| config.retry_delay(attempt).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(config.retry_delay(u64::MAX), Duration::from_secs(1));
    }
}
