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
use crate::{Error, Result};

/// How errors name this broker.
const REDIS: &str = "Redis";

/// For `map_err`: a Redis error while doing `context`.
fn failed(context: impl Into<String>) -> impl FnOnce(redis::RedisError) -> Error {
    Error::from_broker(REDIS, context)
}

/// Whether a command failed for want of a server that answers (not for what it carried): the
/// link down or cut, no answer in time, or the server still loading its data after a restart.
fn unreachable(error: &redis::RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
        || error.code() == Some("LOADING")
}

/// Publishes outbox events with `XADD`, and trims each stream of what every consumer group has
/// acknowledged, never more.
///
/// A stream is bounded by `max_len` entries: while it holds that many (a consumer group lags
/// that far behind, or none has been created to read it), publishing to it fails, and the
/// relay keeps the events pending in the outbox, rather than trimming entries some group has
/// not read (which `XADD MAXLEN` would do, silently). Trimming (`XTRIM MINID`, up to the oldest
/// entry any group still holds pending, or has not yet been given) runs on publish, at most
/// once a second per stream, in one script, so a group created meanwhile is not cut short.
#[derive(Clone)]
pub struct RedisStreamsPublisher {
    connection: ConnectionManager,
    /// The most entries a stream may hold.
    max_len: usize,
    /// When each stream was last trimmed (bounded: cleared past `MAX_TRACKED` streams).
    trimmed: std::sync::Arc<std::sync::Mutex<HashMap<String, std::time::Instant>>>,
}

impl std::fmt::Debug for RedisStreamsPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStreamsPublisher")
            .field("max_len", &self.max_len)
            .finish_non_exhaustive()
    }
}

/// `XADD` unless the stream already holds `ARGV[1]` entries.
const BOUNDED_XADD: &str = r"
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then
  return redis.error_reply('IDEMFULL')
end
return redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
";

/// Trims the stream `KEYS[1]` below the oldest entry any consumer group still needs: its
/// oldest pending entry, else the entry after its last delivered one. Returns the entries
/// removed (none when the stream has no group).
const TRIM_ACKNOWLEDGED: &str = r"
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function before(a, b)
  local ams, aseq = parse(a)
  local bms, bseq = parse(b)
  return ams < bms or (ams == bms and aseq < bseq)
end
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
if #groups == 0 then return 0 end
local keep = nil
for _, group in ipairs(groups) do
  local info = {}
  for i = 1, #group, 2 do info[group[i]] = group[i + 1] end
  local needed = info['last-delivered-id']
  if tonumber(info['pending']) > 0 then
    needed = redis.call('XPENDING', KEYS[1], info['name'])[2]
  end
  if keep == nil or before(needed, keep) then keep = needed end
end
-- At most ARGV[1] entries a call, so one trim never holds Redis long.
local span = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', tonumber(ARGV[1]))
if #span == tonumber(ARGV[1]) and before(span[#span][1], keep) then keep = span[#span][1] end
return redis.call('XTRIM', KEYS[1], 'MINID', keep)
";

/// Entries one trim removes at most (each trim is one script, which holds Redis meanwhile).
const TRIM_MAX: usize = 100_000;

/// Streams whose last trim is remembered, at most.
const MAX_TRACKED: usize = 10_000;

impl RedisStreamsPublisher {
    pub fn new(connection: ConnectionManager, max_len: usize) -> Self {
        Self { connection, max_len: max_len.max(1), trimmed: Default::default() }
    }

    /// Trims `stream` of what every group has acknowledged, if not done in the last second.
    async fn trim(&self, stream: &str) {
        {
            let mut trimmed = self.trimmed.lock().unwrap_or_else(|poison| poison.into_inner());
            let now = std::time::Instant::now();
            if trimmed
                .get(stream)
                .is_some_and(|at| now.duration_since(*at) < Duration::from_secs(1))
            {
                return;
            }
            if trimmed.len() >= MAX_TRACKED {
                trimmed.clear();
            }
            trimmed.insert(stream.to_owned(), now);
        }
        let mut connection = self.connection.clone();
        let trim = redis::cmd("EVAL")
            .arg(TRIM_ACKNOWLEDGED)
            .arg(1)
            .arg(stream)
            .arg(TRIM_MAX)
            .query_async::<u64>(&mut connection)
            .await;
        match trim {
            Ok(removed) => tracing::debug!(stream, removed, "trimmed acknowledged entries"),
            Err(error) => tracing::warn!(stream, %error, "trimming the stream failed"),
        }
    }
}

#[async_trait]
impl Publisher for RedisStreamsPublisher {
    async fn publish(&self, messages: &[OutboxMessage]) -> Vec<Result<(), PublishError>> {
        let mut topics: Vec<&str> = messages.iter().map(|message| message.topic.as_str()).collect();
        topics.sort_unstable();
        topics.dedup();
        for topic in topics {
            self.trim(topic).await;
        }
        // One pipeline for the layer: one key each, so their relative order does not matter.
        let mut pipeline = redis::pipe();
        for message in messages {
            let mut command = redis::cmd("EVAL");
            command.arg(BOUNDED_XADD).arg(1).arg(&message.topic).arg(self.max_len);
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
        let max_len = self.max_len;
        let refused = |message: &OutboxMessage, error: redis::RedisError| {
            if error.to_string().contains("IDEMFULL") {
                let reason = format!(
                    "stream {} holds {max_len} entries not yet acknowledged by every consumer group (one lags, or none reads it); publishing resumes as they catch up",
                    message.topic
                );
                let error = Error::broker(REDIS, "XADD", reason);
                PublishError { full: true, ..PublishError::new(message.id, error) }
            } else if unreachable(&error) {
                PublishError::unreachable(message.id, failed("XADD")(error))
            } else {
                PublishError::new(message.id, failed("XADD")(error))
            }
        };
        match pipeline.query_async::<Vec<redis::RedisResult<String>>>(&mut connection).await {
            Ok(replies) if replies.len() == messages.len() => messages
                .iter()
                .zip(replies)
                .map(|(message, reply)| reply.map(drop).map_err(|e| refused(message, e)))
                .collect(),
            Ok(replies) => {
                let reason = format!("{} replies to {} XADDs", replies.len(), messages.len());
                messages
                    .iter()
                    .map(|message| {
                        let error = Error::broker(REDIS, "XADD", reason.clone());
                        Err(PublishError::new(message.id, error))
                    })
                    .collect()
            }
            // The whole pipeline failed: the link, not any one entry.
            Err(error) => {
                let reason = error.to_string();
                messages
                    .iter()
                    .map(|message| {
                        let error = Error::broker(REDIS, "XADD", reason.clone());
                        Err(PublishError::unreachable(message.id, error))
                    })
                    .collect()
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
    /// Whether this consumer may hold entries it never received: at its start (a consumer
    /// restarted under its old name), and after a failed call whose effect may have landed
    /// (an `XCLAIM` or `XREADGROUP` applied, its reply lost). Its own pending entries are
    /// then read again first, before newer entries of their keys.
    reread_own: bool,
    /// Where that reading goes on from: its own pending entries after this id.
    reread_from: String,
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
    ) -> Result<Self> {
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(MAX_BLOCK + Duration::from_secs(5)));
        let connection =
            client.get_connection_manager_with_config(config).await.map_err(failed("connect"))?;
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
            Err(error) => return Err(failed(format!("create group {group} on {stream}"))(error)),
        }
        Ok(Self {
            connection,
            stream: stream.to_owned(),
            group: group.to_owned(),
            consumer: consumer.to_owned(),
            claim_idle,
            reread_own: true,
            reread_from: "0".to_owned(),
        })
    }

    fn received(&self, entry: &StreamId, attempt: u64) -> Received {
        received_from(&self.stream, entry, attempt)
    }
}

/// An entry of `stream` as the consumer sees it, by the one message-id rule.
#[doc(hidden)]
pub fn received_from(stream: &str, entry: &StreamId, attempt: u64) -> Received {
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
    let (key, seq) = (text("key"), text("seq"));
    let id = match text("id") {
        // Not the entry id: a producer's retry is a new entry. (Hashed with the relay's two
        // headers, empty when absent, as ids recorded by earlier versions were.)
        id if id.is_empty() => {
            let mut hashed = headers.clone();
            hashed.push((crate::publish::KEY_HEADER.into(), key.clone()));
            hashed.push((crate::publish::SEQ_HEADER.into(), seq.clone()));
            crate::content_id("sha256-", stream, &hashed, &payload)
        }
        id => id,
    };
    // The relay's key and seq, when a relay wrote the entry (another producer's entries have
    // no key, and are then not ordered by one).
    for (header, value) in [(crate::publish::KEY_HEADER, key), (crate::publish::SEQ_HEADER, seq)] {
        if !value.is_empty() {
            headers.push((header.into(), value));
        }
    }
    Received { id, subject: stream.to_owned(), payload, headers, attempt, position: None }
}

#[async_trait]
impl Subscription for RedisStreamsSubscription {
    /// The entry's id in the stream.
    type Token = String;

    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<(Received, String)>> {
        // Any failure below may have taken effect on the server: read our own entries again
        // on the next fetch.
        let reread = self.reread_own;
        self.reread_own = true;
        let mut batch = Vec::new();
        if reread {
            let options =
                StreamReadOptions::default().group(&self.group, &self.consumer).count(max);
            let mut connection = self.connection.clone();
            let reply: Option<StreamReadReply> = match redis::AsyncCommands::xread_options(
                &mut connection,
                &[&self.stream],
                &[&self.reread_from],
                &options,
            )
            .await
            {
                Ok(reply) => reply,
                Err(error) if unreachable(&error) => {
                    return Err(failed("XREADGROUP (own pending entries)")(error));
                }
                // An answer it cannot read (an entry deleted from under the group, say) must
                // not stop this consumer: what it holds comes back through `claim_idle`.
                Err(error) => {
                    tracing::warn!(%error, stream = %self.stream, "cannot read this consumer's own pending entries; they come back once idle");
                    None
                }
            };
            let entries: Vec<StreamId> = reply
                .map(|reply| reply.keys)
                .unwrap_or_default()
                .into_iter()
                .flat_map(|key| key.ids)
                .collect();
            // Delivered before, to this consumer: each a redelivery, counted as Redis counts
            // its deliveries (so a message that crashes the consumer every time still reaches
            // `max_attempts` and is dead-lettered).
            let deliveries = match (entries.first(), entries.last()) {
                (Some(first), Some(last)) => {
                    let pending: redis::RedisResult<StreamPendingCountReply> =
                        redis::cmd("XPENDING")
                            .arg(&self.stream)
                            .arg(&self.group)
                            .arg(&first.id)
                            .arg(&last.id)
                            .arg(entries.len())
                            .arg(&self.consumer)
                            .query_async(&mut connection)
                            .await;
                    pending
                        .map(|pending| {
                            pending
                                .ids
                                .into_iter()
                                .map(|entry| (entry.id, entry.times_delivered as u64))
                                .collect::<HashMap<_, _>>()
                        })
                        .unwrap_or_default()
                }
                _ => HashMap::new(),
            };
            for entry in &entries {
                let attempt = deliveries.get(&entry.id).copied().unwrap_or(2).max(2);
                batch.push((self.received(entry, attempt), entry.id.clone()));
            }
            if batch.len() >= max {
                // More may wait: read on after these next time.
                self.reread_from = batch.last().map(|(_, id)| id.clone()).unwrap_or_default();
                return Ok(batch);
            }
            self.reread_from = "0".to_owned();
        }
        let (fetched, uncertain) = self.fetch_new(max - batch.len(), wait).await?;
        batch.extend(fetched);
        self.reread_own = uncertain;
        Ok(batch)
    }

    async fn settle(&self, token: String, settle: Settle) -> Result<()> {
        self.settle_entry(token, settle).await
    }
}

impl RedisStreamsSubscription {
    /// Entries others abandoned (idle past `claim_idle`), then new ones; and whether a call
    /// failed after some were claimed (the read of new ones may have landed, its reply lost).
    async fn fetch_new(
        &self,
        max: usize,
        wait: Duration,
    ) -> Result<(Vec<(Received, String)>, bool)> {
        let mut uncertain = false;
        let mut connection = self.connection.clone();
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
            .map_err(failed("XPENDING"))?;
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
                claim.query_async(&mut connection).await.map_err(failed("XCLAIM"))?;
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
            let reply: Option<StreamReadReply> = match redis::AsyncCommands::xread_options(
                &mut connection,
                &[&self.stream],
                &[">"],
                &options,
            )
            .await
            {
                Ok(reply) => reply,
                // Entries just claimed are this consumer's now: dropping them would leave
                // them idle for another `claim_idle` while newer entries of their keys pass.
                Err(error) if !batch.is_empty() => {
                    tracing::debug!(%error, "XREADGROUP failed after a claim; handing on what was claimed");
                    uncertain = true;
                    None
                }
                Err(error) => return Err(failed("XREADGROUP")(error)),
            };
            for key in reply.map(|reply| reply.keys).unwrap_or_default() {
                for entry in &key.ids {
                    batch.push((self.received(entry, 1), entry.id.clone()));
                }
            }
        }
        Ok((batch, uncertain))
    }

    async fn settle_entry(&self, token: String, settle: Settle) -> Result<()> {
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
                .map_err(failed("XACK"))
            }
            // Redis has no delayed redelivery: the entry stays pending and is claimed again
            // once idle past `claim_idle`, which is the retry delay here.
            Settle::Retry(_) => Ok(()),
        }
    }
}

/// Bits of a position that hold the entry id's sequence part (the rest hold its milliseconds).
const SEQ_BITS: u32 = 20;

/// An entry id (`<ms>-<seq>`) as an offsets-mode position: `ms << 20 | seq`, so positions
/// order as the ids do. `None` for an id past what that holds: milliseconds beyond 2^43 (the
/// year 2248) or a sequence of 2^20 or more within one millisecond, which only ids a producer
/// chose itself reach (Redis numbers its own from 0 each millisecond).
pub fn position_of(entry_id: &str) -> Option<u64> {
    let (ms, seq) = entry_id.split_once('-')?;
    let (ms, seq): (u64, u64) = (ms.parse().ok()?, seq.parse().ok()?);
    if ms >= 1 << (63 - SEQ_BITS) || seq >= 1 << SEQ_BITS {
        return None;
    }
    Some(ms << SEQ_BITS | seq)
}

/// The entry id a position stands for ([`position_of`]'s inverse).
pub fn entry_id_of(position: u64) -> String {
    format!("{}-{}", position >> SEQ_BITS, position & ((1 << SEQ_BITS) - 1))
}

/// Most streams one [`RedisStreamsPartitions`] reads.
pub const MAX_PARTITIONS: usize = 1_000;

/// The offsets mode's source on Redis: each partition is a stream, read with `XREAD` (no
/// consumer group, nothing to acknowledge) after the position its consumer recorded
/// ([`crate::postgres::Offsets::positions`]); the recorded position is the cursor. After a
/// restart each stream is read again from there, so nothing is skipped and nothing applied is
/// applied again. Each message's position is its entry id ([`position_of`]). Run it with the
/// runner ordered by subject ([`crate::consume::OrderBy::Subject`]), so each stream is handled
/// in order.
///
/// Trimming: nothing here holds entries in the stream. A stream trimmed past a consumer's
/// position (by `XADD MAXLEN`, or `XTRIM` elsewhere) loses those entries for it; the relay's
/// publisher trims only what consumer groups acknowledged, and this reader is not a group.
pub struct RedisStreamsPartitions {
    connection: ConnectionManager,
    streams: Vec<String>,
    /// Per stream, the last entry id handed out (at first, the recorded one).
    cursors: Vec<String>,
}

impl std::fmt::Debug for RedisStreamsPartitions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStreamsPartitions")
            .field("streams", &self.streams)
            .field("cursors", &self.cursors)
            .finish_non_exhaustive()
    }
}

impl RedisStreamsPartitions {
    /// Starts reading each `(stream, after)` partition after position `after` (0: from the
    /// start), on a connection of its own (a blocking `XREAD` holds it for its whole wait).
    pub async fn start(
        client: &redis::Client,
        partitions: impl IntoIterator<Item = (String, u64)>,
    ) -> Result<Self> {
        let (streams, cursors): (Vec<String>, Vec<String>) =
            partitions.into_iter().map(|(stream, after)| (stream, entry_id_of(after))).unzip();
        if streams.is_empty() || streams.len() > MAX_PARTITIONS {
            return Err(Error::Config(format!(
                "{} partitions; read 1 to {MAX_PARTITIONS} streams",
                streams.len()
            )));
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(MAX_BLOCK + Duration::from_secs(5)));
        let connection =
            client.get_connection_manager_with_config(config).await.map_err(failed("connect"))?;
        Ok(Self { connection, streams, cursors })
    }
}

#[async_trait]
impl Subscription for RedisStreamsPartitions {
    /// Nothing to settle: the recorded position is the cursor.
    type Token = ();

    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<(Received, ())>> {
        let max = max.max(1);
        let mut connection = self.connection.clone();
        // `COUNT` is per stream: ask each for its share, so one reply stays near `max`.
        let share = max.div_ceil(self.streams.len()).max(1);
        let options = StreamReadOptions::default()
            .count(share)
            .block(wait.min(MAX_BLOCK).as_millis().max(1) as usize);
        let reply: Option<StreamReadReply> = redis::AsyncCommands::xread_options(
            &mut connection,
            &self.streams,
            &self.cursors,
            &options,
        )
        .await
        .map_err(failed("XREAD"))?;
        let mut per_stream: Vec<(usize, std::collections::VecDeque<StreamId>)> = reply
            .map(|reply| reply.keys)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|key| {
                let index = self.streams.iter().position(|stream| *stream == key.key)?;
                Some((index, key.ids.into()))
            })
            .collect();
        // Take in turns, one entry of each stream at a time, so a stream with a backlog does
        // not crowd the others out; each cursor moves only past what was taken, and the rest
        // is read again next time. A stream whose next entry id cannot be a position stops
        // there (the others go on), with an error when nothing else was read.
        let mut batch = Vec::new();
        let mut unreadable = None;
        while batch.len() < max && per_stream.iter().any(|(_, entries)| !entries.is_empty()) {
            for (index, entries) in &mut per_stream {
                if batch.len() >= max {
                    break;
                }
                let Some(entry) = entries.pop_front() else { continue };
                let stream = &self.streams[*index];
                let Some(position) = position_of(&entry.id) else {
                    entries.clear();
                    unreadable = Some((stream.clone(), entry.id));
                    continue;
                };
                let mut received = received_from(stream, &entry, 1);
                received.position = Some(position);
                self.cursors[*index] = entry.id;
                batch.push((received, ()));
            }
        }
        match unreadable {
            Some((stream, id)) if batch.is_empty() => Err(Error::broker(
                REDIS,
                format!("read stream {stream}"),
                format!(
                    "entry id {id} is past what a position holds (milliseconds below 2^43, a sequence below 2^20); the offsets mode cannot read this stream past it"
                ),
            )),
            Some((stream, id)) => {
                tracing::error!(%stream, %id, "an entry id the offsets mode cannot hold as a position; this stream stops here");
                Ok(batch)
            }
            None => Ok(batch),
        }
    }

    async fn settle(&self, (): (), _settle: Settle) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{entry_id_of, position_of};

    #[test]
    fn positions_order_as_entry_ids_do_and_convert_back() {
        let ids = ["0-0", "0-1", "1-0", "1700000000000-0", "1700000000000-7", "1700000000001-0"];
        let positions: Vec<u64> = ids.iter().map(|id| position_of(id).unwrap()).collect();
        assert!(positions.windows(2).all(|pair| pair[0] < pair[1]), "{positions:?}");
        for (id, position) in ids.iter().zip(&positions) {
            assert_eq!(entry_id_of(*position), *id);
        }
        // What i64 (the offsets table's column) holds.
        assert!(
            position_of(&format!("{}-{}", (1u64 << 43) - 1, (1 << 20) - 1)).unwrap()
                <= i64::MAX as u64
        );
    }

    #[test]
    fn ids_past_what_a_position_holds_are_refused() {
        assert_eq!(position_of(&format!("1-{}", 1 << 20)), None);
        assert_eq!(position_of(&format!("{}-0", 1u64 << 43)), None);
        assert_eq!(position_of("12"), None);
        assert_eq!(position_of("a-1"), None);
    }
}
