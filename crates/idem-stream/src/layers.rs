//! What every relay does between claiming keys and marking them: publish each key's events in
//! order, all keys at once, a layer at a time, and stop a key at its first failure.

use std::collections::VecDeque;
use std::future::Future;

use crate::publish::{OutboxMessage, Publisher};

/// One claimed key after a round: the highest seq published, and why it stopped, if it did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyOutcome {
    pub topic: String,
    pub key: String,
    pub published_seq: i64,
    pub error: Option<String>,
    /// The error was the broker being full for now ([`crate::publish::PublishError::full`]).
    pub full: bool,
}

/// What a round published.
#[derive(Debug, Default)]
pub(crate) struct Published {
    pub ids: Vec<i64>,
    /// One per key, in the order the keys were given.
    pub keys: Vec<KeyOutcome>,
    pub failed: usize,
}

impl Published {
    /// Adds what a later part of the same round published (a subset of the same keys, each
    /// continuing where this part left it).
    pub fn merge(&mut self, later: Published) {
        let mut index: std::collections::HashMap<(String, String), usize> = self
            .keys
            .iter()
            .enumerate()
            .map(|(at, outcome)| ((outcome.topic.clone(), outcome.key.clone()), at))
            .collect();
        for outcome in later.keys {
            match index.remove(&(outcome.topic.clone(), outcome.key.clone())) {
                Some(at) => {
                    let mine = &mut self.keys[at];
                    mine.published_seq = mine.published_seq.max(outcome.published_seq);
                    if outcome.error.is_some() {
                        mine.error = outcome.error;
                        mine.full = outcome.full;
                    }
                }
                None => self.keys.push(outcome),
            }
        }
        self.ids.extend(later.ids);
        self.failed += later.failed;
    }
}

/// Groups events (sorted by topic, key and seq) into one queue per key.
pub(crate) fn queues_by_key(events: Vec<OutboxMessage>) -> Vec<VecDeque<OutboxMessage>> {
    let mut queues: Vec<VecDeque<OutboxMessage>> = Vec::new();
    for message in events {
        match queues.last_mut() {
            Some(queue)
                if queue
                    .back()
                    .is_some_and(|last| last.topic == message.topic && last.key == message.key) =>
            {
                queue.push_back(message)
            }
            _ => queues.push(VecDeque::from([message])),
        }
    }
    queues
}

/// Publishes the queues in layers (the next event of every key at once), calling `go_on`
/// before each layer: `Ok(false)` ends the round there (what was published is returned, to be
/// marked), an error ends it with nothing to mark (a relay that lost its claim must stop). A
/// key's first failure stops that key for the round: its later events must not overtake.
pub(crate) async fn publish_in_layers<P, F, Fut, E>(
    publisher: &P,
    mut queues: Vec<VecDeque<OutboxMessage>>,
    mut go_on: F,
) -> Result<Published, E>
where
    P: Publisher + ?Sized,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool, E>>,
{
    let mut published = Published {
        keys: queues
            .iter()
            .filter_map(|queue| queue.front())
            .map(|first| KeyOutcome {
                topic: first.topic.clone(),
                key: first.key.clone(),
                published_seq: 0,
                error: None,
                full: false,
            })
            .collect(),
        ..Published::default()
    };
    queues.retain(|queue| !queue.is_empty());
    while queues.iter().any(|queue| !queue.is_empty()) {
        if !go_on().await? {
            break;
        }
        let layer: Vec<OutboxMessage> =
            queues.iter().filter_map(|queue| queue.front().cloned()).collect();
        let results = publisher.publish(&layer).await;
        let mut results = results.into_iter();
        for (index, queue) in queues.iter_mut().enumerate() {
            let Some(message) = queue.front() else { continue };
            match results.next() {
                Some(Ok(())) => {
                    published.ids.push(message.id);
                    published.keys[index].published_seq = message.seq;
                    queue.pop_front();
                }
                failure => {
                    let (reason, full) = match failure {
                        Some(Err(error)) => (error.source.to_string(), error.full),
                        _ => ("the publisher gave no result for this event".to_owned(), false),
                    };
                    published.keys[index].full = full;
                    tracing::warn!(%reason, id = message.id, topic = %message.topic, key = %message.key, "publish failed; the key backs off");
                    metrics::counter!("idem_outbox_publish_failures_total").increment(1);
                    published.failed += 1;
                    published.keys[index].error = Some(reason.chars().take(1_000).collect());
                    queue.clear();
                }
            }
        }
    }
    metrics::counter!("idem_outbox_published_total").increment(published.ids.len() as u64);
    Ok(published)
}
