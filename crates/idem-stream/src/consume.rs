//! The consumer runner: takes messages from a broker subscription, runs a handler on each with
//! bounded concurrency, acknowledges only after the handler succeeded (for an inbox handler:
//! after its transaction committed), retries failures with backoff, and hands a message to a
//! dead-letter destination after `max_attempts` failures, with the failure recorded.

use std::sync::Arc;
use std::time::Duration;

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
    ) -> Result<Vec<(Received, Self::Token)>, String>;
    async fn settle(&self, token: Self::Token, settle: Settle) -> Result<(), String>;
}

/// Where a message goes after its last failed attempt.
#[async_trait]
pub trait DeadLetter: Send + Sync {
    async fn bury(&self, message: &Received, failure: &str) -> Result<(), String>;
}

/// The handler's verdict on one message.
pub type HandlerResult = Result<(), String>;

#[derive(Debug, Clone, Copy)]
pub struct RunnerConfig {
    /// Messages handled at once (and fetched per batch).
    pub concurrency: usize,
    /// Failed attempts before a message goes to the dead-letter destination.
    pub max_attempts: u64,
    /// The first retry waits this long; each further one twice as long, up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// How long one fetch waits for messages.
    pub fetch_wait: Duration,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            concurrency: 16,
            max_attempts: 5,
            backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            fetch_wait: Duration::from_millis(500),
        }
    }
}

impl RunnerConfig {
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
}

/// Runs until `shutdown` resolves, `handler` on each message; messages being handled then are
/// finished and settled. A failed fetch (the broker unreachable) is logged and retried with
/// backoff, not returned.
pub async fn run<S, H, F, D>(
    subscription: S,
    handler: H,
    dead_letter: Arc<D>,
    config: RunnerConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<RunReport, String>
where
    S: Subscription,
    H: Fn(Received) -> F + Send + Sync + 'static,
    F: std::future::Future<Output = HandlerResult> + Send + 'static,
    D: DeadLetter + ?Sized + 'static,
{
    let handler = Arc::new(handler);
    let work = move |batch: Vec<Received>| one_by_one(Arc::clone(&handler), batch);
    drive(subscription, work, dead_letter, config, shutdown).await
}

/// Like [`run`], but `handler` receives each fetched batch (up to `concurrency` messages)
/// whole, to apply it in one transaction (see [`crate::postgres::Inbox::record_many`]): one
/// commit per batch instead of one per message. If the batch fails, its messages are handled
/// again one at a time, each as a batch of one, so only the failing ones are retried and,
/// after `max_attempts`, dead-lettered.
pub async fn run_batches<S, H, F, D>(
    subscription: S,
    handler: H,
    dead_letter: Arc<D>,
    config: RunnerConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<RunReport, String>
where
    S: Subscription,
    H: Fn(Vec<Received>) -> F + Send + Sync + 'static,
    F: std::future::Future<Output = HandlerResult> + Send + 'static,
    D: DeadLetter + ?Sized + 'static,
{
    let handler = Arc::new(handler);
    let work = move |batch: Vec<Received>| {
        let handler = Arc::clone(&handler);
        async move {
            let count = batch.len();
            let span = tracing::debug_span!("consume_batch", messages = count);
            // The batch stays here, for settling and for the fallback below.
            let work = tracing::Instrument::instrument(handler(batch.clone()), span);
            let verdict = match tokio::spawn(work).await {
                Ok(verdict) => verdict,
                Err(panic) => Err(format!("the handler panicked: {panic}")),
            };
            match verdict {
                Ok(()) => batch.into_iter().map(|message| (message, Ok(()))).collect(),
                Err(failure) if count == 1 => {
                    batch.into_iter().map(|message| (message, Err(failure.clone()))).collect()
                }
                Err(failure) => {
                    tracing::debug!(count, %failure, "batch failed; handling its messages one by one");
                    let single = move |message: Received| handler(vec![message]);
                    one_by_one(Arc::new(single), batch).await
                }
            }
        }
    };
    drive(subscription, work, dead_letter, config, shutdown).await
}

/// Runs `handler` on every message of `batch` at once; returns each message with its verdict,
/// in order.
async fn one_by_one<H, F>(handler: Arc<H>, batch: Vec<Received>) -> Vec<(Received, HandlerResult)>
where
    H: Fn(Received) -> F + Send + Sync + 'static,
    F: std::future::Future<Output = HandlerResult> + Send + 'static,
{
    let mut running = tokio::task::JoinSet::new();
    let count = batch.len();
    for (index, message) in batch.iter().enumerate() {
        let span = tracing::debug_span!(
            "consume_message",
            id = %message.id,
            subject = %message.subject,
            attempt = message.attempt
        );
        let work = tracing::Instrument::instrument(handler(message.clone()), span);
        running.spawn(async move { (index, work.await) });
    }
    let mut verdicts: Vec<HandlerResult> = vec![Err("the handler panicked".into()); count];
    while let Some(joined) = running.join_next().await {
        match joined {
            Ok((index, verdict)) => verdicts[index] = verdict,
            Err(panic) => {
                tracing::error!(%panic, "a handler panicked; its message will be retried")
            }
        }
    }
    batch.into_iter().zip(verdicts).collect()
}

/// The runner's loop: fetch a batch, let `work` handle its messages (it hands each back with
/// its verdict, in order), settle each.
async fn drive<S, W, WF, D>(
    mut subscription: S,
    work: W,
    dead_letter: Arc<D>,
    config: RunnerConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<RunReport, String>
where
    S: Subscription,
    W: Fn(Vec<Received>) -> WF,
    WF: std::future::Future<Output = Vec<(Received, HandlerResult)>>,
    D: DeadLetter + ?Sized + 'static,
{
    let mut report = RunReport::default();
    let mut shutdown = std::pin::pin!(shutdown);
    let concurrency = config.concurrency.max(1);
    let mut failed_fetches = 0;
    loop {
        let fetched = tokio::select! {
            () = &mut shutdown => return Ok(report),
            fetched = subscription.fetch(concurrency, config.fetch_wait) => fetched,
        };
        let batch = match fetched {
            Ok(batch) => {
                failed_fetches = 0;
                batch
            }
            // A broker outage: wait (doubling, up to `max_backoff`) and try again; the
            // adapters reconnect on the next fetch.
            Err(error) => {
                failed_fetches += 1;
                report.fetch_errors += 1;
                let delay = config.retry_delay(failed_fetches);
                tracing::error!(%error, retry_in = ?delay, "fetching from the broker failed");
                tokio::select! {
                    () = &mut shutdown => return Ok(report),
                    () = tokio::time::sleep(delay) => continue,
                }
            }
        };
        if batch.is_empty() {
            continue;
        }
        // The batch is at most `concurrency` messages, handled at once; the next fetch waits
        // for all of them, which bounds the work in flight.
        let (messages, tokens): (Vec<Received>, Vec<S::Token>) = batch.into_iter().unzip();
        let outcomes = work(messages).await;
        for ((message, verdict), token) in outcomes.into_iter().zip(tokens) {
            let settle = match verdict {
                Ok(()) => {
                    report.handled += 1;
                    Settle::Ack
                }
                Err(failure) if message.attempt >= config.max_attempts => {
                    tracing::warn!(id = %message.id, attempt = message.attempt, %failure, "giving up: dead letter");
                    match dead_letter.bury(&message, &failure).await {
                        Ok(()) => {
                            report.dead_lettered += 1;
                            Settle::Ack
                        }
                        // Not buried: keep it in the broker rather than lose it.
                        Err(error) => {
                            tracing::error!(id = %message.id, %error, "dead-letter destination failed; retrying later");
                            Settle::Retry(config.max_backoff)
                        }
                    }
                }
                Err(failure) => {
                    tracing::debug!(id = %message.id, attempt = message.attempt, %failure, "handler failed; retrying");
                    report.retried += 1;
                    Settle::Retry(config.retry_delay(message.attempt))
                }
            };
            if let Err(error) = subscription.settle(token, settle).await {
                // The broker redelivers an unsettled message after its ack wait: at least once.
                tracing::warn!(id = %message.id, %error, "could not settle; the broker will redeliver");
                report.settle_errors += 1;
            }
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
