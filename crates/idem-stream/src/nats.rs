//! The NATS JetStream adapter: publishes with `Nats-Msg-Id` set to the outbox id, so a
//! republished event inside the stream's duplicate window is dropped by the server.

use async_nats::HeaderMap;
use async_nats::jetstream::Context;
use async_trait::async_trait;

use crate::publish::{OutboxMessage, PublishError, Publisher};

/// Publishes outbox events to JetStream, on the subject named by the event's topic.
#[derive(Debug, Clone)]
pub struct JetStreamPublisher {
    context: Context,
}

impl JetStreamPublisher {
    pub fn new(context: Context) -> Self {
        Self { context }
    }
}

#[async_trait]
impl Publisher for JetStreamPublisher {
    async fn publish(&self, messages: &[OutboxMessage]) -> Vec<Result<(), PublishError>> {
        // Send every message first, then wait for the acks: one key each, so order within a
        // key is not at stake, and the round trips overlap.
        let mut pending = Vec::with_capacity(messages.len());
        for message in messages {
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", message.message_id().as_str());
            headers.insert("Idem-Key", message.key.as_str());
            headers.insert("Idem-Seq", message.seq.to_string().as_str());
            for (name, value) in &message.headers {
                headers.append(name.as_str(), value.as_str());
            }
            let sent = self
                .context
                .publish_with_headers(message.topic.clone(), headers, message.payload.clone())
                .await;
            pending.push(sent);
        }
        let mut results = Vec::with_capacity(messages.len());
        for (message, sent) in messages.iter().zip(pending) {
            let result = match sent {
                Ok(ack) => ack.await.map(drop).map_err(|error| error.to_string()),
                Err(error) => Err(error.to_string()),
            };
            results.push(result.map_err(|reason| PublishError { id: message.id, reason }));
        }
        results
    }
}
