//! What a relay publishes, and the trait a broker adapter implements.

use async_trait::async_trait;
use bytes::Bytes;

/// The header carrying an outbox event's key, which the consumer runner orders by.
pub const KEY_HEADER: &str = "Idem-Key";
/// The header carrying an event's place among its key's events (1, 2, ...).
pub const SEQ_HEADER: &str = "Idem-Seq";

/// One outbox event on its way to the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxMessage {
    /// The outbox row's id: unique and stable across republishing.
    pub id: i64,
    pub topic: String,
    /// Events with the same key are published in commit order.
    pub key: String,
    /// The event's place among its key's events (1, 2, ...), in commit order.
    pub seq: i64,
    pub payload: Bytes,
    /// The caller's headers (trace context travels here), as enqueued.
    pub headers: Vec<(String, String)>,
}

impl OutboxMessage {
    /// The broker's deduplication id: the same every time this event is published.
    pub fn message_id(&self) -> String {
        format!("idem-outbox-{}", self.id)
    }
}

/// Why a message was not published.
#[derive(Debug, thiserror::Error)]
#[error("publishing outbox event {id} failed: {source}")]
pub struct PublishError {
    pub id: i64,
    /// What went wrong (usually [`crate::Error::Broker`]): kept as the key's last error.
    pub source: crate::Error,
    /// The broker is full for now (a Redis stream at its bound, waiting for a lagging
    /// consumer group): the key backs off but this never counts toward parking it.
    pub full: bool,
    /// The broker could not be reached, or the link to it broke before it answered: not the
    /// event's fault. The key is tried again after the first backoff step, and this never
    /// counts toward parking it: an outage of the broker must not park every key.
    pub unreachable: bool,
}

impl PublishError {
    pub fn new(id: i64, source: crate::Error) -> Self {
        Self { id, source, full: false, unreachable: false }
    }

    /// The broker could not be reached for this message (see [`PublishError::unreachable`]).
    pub fn unreachable(id: i64, source: crate::Error) -> Self {
        Self { unreachable: true, ..Self::new(id, source) }
    }
}

/// A broker adapter. `publish` receives at most one message per key and may publish them
/// concurrently; it returns one result per message, in order, each `Ok` only once the broker
/// has durably accepted the message (JetStream's ack, RabbitMQ's publisher confirm).
#[async_trait]
pub trait Publisher: Send + Sync {
    async fn publish(&self, messages: &[OutboxMessage]) -> Vec<Result<(), PublishError>>;
}

#[async_trait]
impl<P: Publisher + ?Sized> Publisher for Box<P> {
    async fn publish(&self, messages: &[OutboxMessage]) -> Vec<Result<(), PublishError>> {
        (**self).publish(messages).await
    }
}

#[async_trait]
impl<P: Publisher + ?Sized> Publisher for std::sync::Arc<P> {
    async fn publish(&self, messages: &[OutboxMessage]) -> Vec<Result<(), PublishError>> {
        (**self).publish(messages).await
    }
}
