//! What every relay does between claiming keys and marking them: publish each key's events in
//! order, all keys at once, a layer at a time, and stop a key at its first failure.

use std::collections::{HashMap, VecDeque};
use std::future::Future;

use crate::publish::{OutboxMessage, Publisher};

/// One claimed key after a round: the highest seq published, and why it stopped, if it did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyOutcome {
    pub topic: String,
    pub key: String,
    pub published_seq: i64,
    pub error: Option<String>,
    /// The error was not the event's: the broker full for now or unreachable
    /// ([`crate::publish::PublishError::full`], [`crate::publish::PublishError::unreachable`]).
    /// It never counts toward parking the key.
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
    queues: Vec<VecDeque<OutboxMessage>>,
    go_on: F,
) -> Result<Published, E>
where
    P: Publisher + ?Sized,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool, E>>,
{
    publish_fed(publisher, queues, None, go_on).await
}

/// [`publish_in_layers`], with more of the same keys' events arriving on `more` while it
/// publishes (each chunk sorted by topic, key and seq, continuing where the last one of its
/// key ended): a chunk is taken in before the next layer, so the publisher never waits for
/// a read while it has something to send. Events of a key that failed this round are dropped;
/// events of keys not in `queues` are ignored. The round ends when every queue is empty and
/// `more` is closed, or at once when `more` sends `None` (its reader failed: the caller ends
/// the round with that error); dropping `more` tells its sender to stop.
pub(crate) async fn publish_fed<P, F, Fut, E>(
    publisher: &P,
    mut queues: Vec<VecDeque<OutboxMessage>>,
    mut more: Option<tokio::sync::mpsc::UnboundedReceiver<Option<Vec<OutboxMessage>>>>,
    mut go_on: F,
) -> Result<Published, E>
where
    P: Publisher + ?Sized,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool, E>>,
{
    queues.retain(|queue| !queue.is_empty());
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
    let index: HashMap<(String, String), usize> = published
        .keys
        .iter()
        .enumerate()
        .map(|(at, outcome)| ((outcome.topic.clone(), outcome.key.clone()), at))
        .collect();
    loop {
        // Take in what has been read meanwhile; wait for it only when nothing else is left.
        while let Some(receiver) = more.as_mut() {
            let chunk = if queues.iter().all(VecDeque::is_empty) {
                receiver.recv().await
            } else {
                match receiver.try_recv() {
                    Ok(chunk) => Some(chunk),
                    Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                    Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => None,
                }
            };
            let chunk = match chunk {
                Some(Some(chunk)) => chunk,
                Some(None) => return Ok(published),
                None => {
                    more = None;
                    break;
                }
            };
            for message in chunk {
                let at = index.get(&(message.topic.clone(), message.key.clone()));
                if let Some(&at) = at.filter(|&&at| published.keys[at].error.is_none()) {
                    queues[at].push_back(message);
                }
            }
        }
        if queues.iter().all(VecDeque::is_empty) || !go_on().await? {
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
                        Some(Err(error)) => {
                            (error.source.to_string(), error.full || error.unreachable)
                        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::PublishError;
    use bytes::Bytes;
    use std::sync::Mutex;

    /// Records what it is given, in order; fails the event whose id is `fail`.
    struct Recording {
        sent: Mutex<Vec<(String, i64)>>,
        fail: i64,
    }

    #[async_trait::async_trait]
    impl Publisher for Recording {
        async fn publish(&self, messages: &[OutboxMessage]) -> Vec<Result<(), PublishError>> {
            messages
                .iter()
                .map(|message| {
                    if message.id == self.fail {
                        return Err(PublishError::new(message.id, crate::Error::other("refused")));
                    }
                    self.sent.lock().unwrap().push((message.key.clone(), message.seq));
                    Ok(())
                })
                .collect()
        }
    }

    fn events(key: &str, seqs: std::ops::RangeInclusive<i64>) -> Vec<OutboxMessage> {
        seqs.map(|seq| OutboxMessage {
            id: i64::from(key.as_bytes()[0]) * 1_000 + seq,
            topic: "t".into(),
            key: key.into(),
            seq,
            payload: Bytes::new(),
            headers: Vec::new(),
        })
        .collect()
    }

    /// Later parts arrive while the first is published: each key goes on in order, a key
    /// that failed drops its later events (they must not overtake the failed one), keys not
    /// in the round are ignored, and the outcome names how far each key got.
    #[tokio::test]
    async fn later_parts_join_their_keys_and_a_failed_key_takes_no_more() {
        // Key "b" fails at seq 3 (in the second part).
        let publisher = Recording { sent: Mutex::default(), fail: i64::from(b'b') * 1_000 + 3 };
        let first = [events("a", 1..=2), events("b", 1..=2)].concat();
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        sender
            .send(Some([events("a", 3..=4), events("b", 3..=4), events("z", 1..=1)].concat()))
            .unwrap();
        // The last part arrives after b failed, so only the filter keeps b's 5 back.
        let reader = async move {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            sender.send(Some([events("a", 5..=5), events("b", 5..=5)].concat())).unwrap();
        };
        let (published, ()) = tokio::join!(
            publish_fed(&publisher, queues_by_key(first), Some(receiver), || async {
                Ok::<_, ()>(true)
            }),
            reader
        );
        let published = published.unwrap();
        let sent = publisher.sent.into_inner().unwrap();
        let of = |key: &str| -> Vec<i64> {
            sent.iter().filter(|(k, _)| k == key).map(|(_, seq)| *seq).collect()
        };
        assert_eq!(of("a"), [1, 2, 3, 4, 5]);
        assert_eq!(of("b"), [1, 2], "nothing of b after its failure");
        assert!(of("z").is_empty(), "a key not claimed this round is not published");
        assert_eq!(published.failed, 1);
        let outcome: Vec<(&str, i64, bool)> = published
            .keys
            .iter()
            .map(|o| (o.key.as_str(), o.published_seq, o.error.is_some()))
            .collect();
        assert_eq!(outcome, [("a", 5, false), ("b", 2, true)]);
    }

    /// The round waits for a part still being read only when nothing else is left, and
    /// ends when the sender is done.
    #[tokio::test]
    async fn a_part_still_being_read_is_waited_for() {
        let publisher = Recording { sent: Mutex::default(), fail: -1 };
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        let reader = async move {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            sender.send(Some(events("a", 2..=3))).unwrap();
        };
        let (published, ()) = tokio::join!(
            publish_fed(&publisher, queues_by_key(events("a", 1..=1)), Some(receiver), || async {
                Ok::<_, ()>(true)
            }),
            reader
        );
        assert_eq!(published.unwrap().keys[0].published_seq, 3);
        assert_eq!(publisher.sent.into_inner().unwrap().len(), 3);
    }
}
