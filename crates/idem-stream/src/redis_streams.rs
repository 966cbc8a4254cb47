//! The Redis Streams adapter: `XADD` to publish; a consumer group (`XREADGROUP`, `XACK`) to
//! consume, reclaiming entries another consumer took and never acknowledged (`XPENDING` +
//! `XCLAIM`) once they have been idle for `claim_idle`.
//!
//! Redis Streams do not deduplicate: a republished event is a second entry. The consumer's
//! inbox absorbs it, keyed by the event id carried in the entry's `id` field.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::ConnectionManager;
use redis::streams::{StreamId, StreamPendingCountReply, StreamReadOptions, StreamReadReply};

use crate::consume::{Received, Settle, Subscription};
use crate::publish::{OutboxMessage, PublishError, Publisher};

/// Publishes outbox events with `XADD <topic> MAXLEN ~ <max_len> *`.
#[derive(Clone)]
pub struct RedisStreamsPublisher {
    connection: ConnectionManager,
    /// Keeps each stream at about this many entries (`MAXLEN ~`), so it cannot grow forever.
    max_len: usize,
}

impl std::fmt::Debug for RedisStreamsPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStreamsPublisher")
            .field("max_len", &self.max_len)
            .finish_non_exhaustive()
    }
}

impl RedisStreamsPublisher {
    pub fn new(connection: ConnectionManager, max_len: usize) -> Self {
        Self { connection, max_len }
    }
}

#[async_trait]
impl Publisher for RedisStreamsPublisher {
    async fn publish(&self, messages: &[OutboxMessage]) -> Vec<Result<(), PublishError>> {
        // One pipeline for the layer: one key each, so their relative order does not matter.
        let mut pipeline = redis::pipe();
        for message in messages {
            let mut command = redis::cmd("XADD");
            command.arg(&message.topic).arg("MAXLEN").arg("~").arg(self.max_len).arg("*");
            command.arg("id").arg(message.message_id()).arg("key").arg(&message.key);
            command.arg("seq").arg(message.seq).arg("payload").arg(&message.payload[..]);
            for (name, value) in &message.headers {
                command.arg(format!("h:{name}")).arg(value);
            }
            pipeline.add_command(command);
        }
        // Each entry's own result: one refused XADD (a key of the wrong type, say) fails only
        // its own message.
        pipeline.ignore_errors();
        let mut connection = self.connection.clone();
        let failed =
            |message: &OutboxMessage, reason: String| PublishError { id: message.id, reason };
        match pipeline.query_async::<Vec<redis::RedisResult<String>>>(&mut connection).await {
            Ok(replies) if replies.len() == messages.len() => messages
                .iter()
                .zip(replies)
                .map(|(message, reply)| reply.map(drop).map_err(|e| failed(message, e.to_string())))
                .collect(),
            Ok(replies) => {
                let reason = format!("{} replies to {} XADDs", replies.len(), messages.len());
                messages.iter().map(|message| Err(failed(message, reason.clone()))).collect()
            }
            Err(error) => {
                messages.iter().map(|message| Err(failed(message, error.to_string()))).collect()
            }
        }
    }
}

/// The longest a fetch blocks in `XREADGROUP`; a longer wait returns empty after this long.
pub const MAX_BLOCK: Duration = Duration::from_secs(30);

/// One consumer in a Redis Streams consumer group.
#[derive(Clone)]
pub struct RedisStreamsSubscription {
    connection: ConnectionManager,
    stream: String,
    group: String,
    consumer: String,
    /// An entry delivered to some consumer and not acknowledged for this long is taken over.
    claim_idle: Duration,
}

impl std::fmt::Debug for RedisStreamsSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStreamsSubscription")
            .field("stream", &self.stream)
            .field("group", &self.group)
            .field("consumer", &self.consumer)
            .finish_non_exhaustive()
    }
}

impl RedisStreamsSubscription {
    /// Joins (creating if needed, from the stream's start) the group `group` as `consumer`.
    ///
    /// The subscription opens a connection of its own: a blocking `XREADGROUP` holds its
    /// connection for the whole wait, which must neither stall other commands nor trip the
    /// client's response timeout.
    pub async fn join(
        client: &redis::Client,
        stream: &str,
        group: &str,
        consumer: &str,
        claim_idle: Duration,
    ) -> Result<Self, String> {
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(MAX_BLOCK + Duration::from_secs(5)));
        let connection = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(|error| error.to_string())?;
        let mut connection_for_setup = connection.clone();
        let created: redis::RedisResult<String> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(stream)
            .arg(group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut connection_for_setup)
            .await;
        match created {
            Ok(_) => {}
            Err(error) if error.code() == Some("BUSYGROUP") => {}
            Err(error) => return Err(error.to_string()),
        }
        Ok(Self {
            connection,
            stream: stream.to_owned(),
            group: group.to_owned(),
            consumer: consumer.to_owned(),
            claim_idle,
        })
    }

    fn received(&self, entry: &StreamId, attempt: u64) -> Received {
        let text = |name: &str| match entry.map.get(name) {
            Some(redis::Value::BulkString(bytes)) => String::from_utf8_lossy(bytes).into_owned(),
            _ => String::new(),
        };
        let payload = match entry.map.get("payload") {
            Some(redis::Value::BulkString(bytes)) => Bytes::from(bytes.clone()),
            _ => Bytes::new(),
        };
        let mut headers: Vec<(String, String)> = entry
            .map
            .iter()
            .filter_map(|(name, value)| match (name.strip_prefix("h:"), value) {
                (Some(name), redis::Value::BulkString(bytes)) => {
                    Some((name.to_owned(), String::from_utf8_lossy(bytes).into_owned()))
                }
                _ => None,
            })
            .collect();
        headers.sort();
        headers.push(("Idem-Key".into(), text("key")));
        headers.push(("Idem-Seq".into(), text("seq")));
        let id = match text("id") {
            // Not the entry id: a producer's retry is a new entry.
            id if id.is_empty() => crate::content_id("sha256-", &self.stream, &headers, &payload),
            id => id,
        };
        Received { id, subject: self.stream.clone(), payload, headers, attempt }
    }
}

#[async_trait]
impl Subscription for RedisStreamsSubscription {
    /// The entry's id in the stream.
    type Token = String;

    async fn fetch(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<(Received, String)>, String> {
        let mut connection = self.connection.clone();
        let error = |error: redis::RedisError| error.to_string();
        // First, entries others took and abandoned (idle past claim_idle), with their counts.
        let pending: StreamPendingCountReply = redis::cmd("XPENDING")
            .arg(&self.stream)
            .arg(&self.group)
            .arg("IDLE")
            .arg(self.claim_idle.as_millis() as u64)
            .arg("-")
            .arg("+")
            .arg(max)
            .query_async(&mut connection)
            .await
            .map_err(error)?;
        let mut batch = Vec::new();
        if !pending.ids.is_empty() {
            let deliveries: HashMap<String, u64> = pending
                .ids
                .iter()
                .map(|entry| (entry.id.clone(), entry.times_delivered as u64))
                .collect();
            let mut claim = redis::cmd("XCLAIM");
            claim
                .arg(&self.stream)
                .arg(&self.group)
                .arg(&self.consumer)
                .arg(self.claim_idle.as_millis() as u64);
            for entry in &pending.ids {
                claim.arg(&entry.id);
            }
            let claimed: redis::streams::StreamClaimReply =
                claim.query_async(&mut connection).await.map_err(error)?;
            for entry in &claimed.ids {
                // XCLAIM counted this delivery too.
                let attempt = deliveries.get(&entry.id).copied().unwrap_or(1) + 1;
                batch.push((self.received(entry, attempt), entry.id.clone()));
            }
        }
        if batch.len() < max {
            let options = StreamReadOptions::default()
                .group(&self.group, &self.consumer)
                .count(max - batch.len())
                .block(wait.min(MAX_BLOCK).as_millis().max(1) as usize);
            let reply: Option<StreamReadReply> = redis::AsyncCommands::xread_options(
                &mut connection,
                &[&self.stream],
                &[">"],
                &options,
            )
            .await
            .map_err(error)?;
            for key in reply.map(|reply| reply.keys).unwrap_or_default() {
                for entry in &key.ids {
                    batch.push((self.received(entry, 1), entry.id.clone()));
                }
            }
        }
        Ok(batch)
    }

    async fn settle(&self, token: String, settle: Settle) -> Result<(), String> {
        match settle {
            Settle::Ack => {
                let mut connection = self.connection.clone();
                redis::AsyncCommands::xack::<_, _, _, u64>(
                    &mut connection,
                    &self.stream,
                    &self.group,
                    &[token],
                )
                .await
                .map(drop)
                .map_err(|error| error.to_string())
            }
            // Redis has no delayed redelivery: the entry stays pending and is claimed again
            // once idle past `claim_idle`, which is the retry delay here.
            Settle::Retry(_) => Ok(()),
        }
    }
}
