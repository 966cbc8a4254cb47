//! What every outbox shares, whatever its database: the event, its limits, and how much a
//! relay round takes on.

use std::time::Duration;

use crate::Result;

/// Most bytes in one event's payload.
pub const MAX_PAYLOAD_BYTES: usize = 1024 * 1024;
/// Most headers on one event.
pub const MAX_HEADERS: usize = 64;

/// One event to enqueue.
#[derive(Debug, Clone, Copy)]
pub struct Event<'a> {
    /// Where it goes: the NATS subject, the RabbitMQ routing key, the stream name.
    pub topic: &'a str,
    /// Events with the same key are published in commit order.
    pub key: &'a str,
    pub payload: &'a [u8],
    /// Carried to the broker as message headers: put the trace context here.
    pub headers: &'a [(&'a str, &'a str)],
}

pub(crate) fn check_event(event: &Event<'_>) -> Result<()> {
    let name_ok = |text: &str| !text.is_empty() && text.len() <= 255;
    if !name_ok(event.topic)
        || !event.topic.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(crate::Error::InvalidEvent(format!(
            "topic {:?}: 1 to 255 of A-Z a-z 0-9 . _ -",
            event.topic
        )));
    }
    // The key and the headers travel as broker headers: no control characters (a CR or LF
    // would split a NATS header block), names without spaces or ':'.
    let printable = |text: &str| !text.chars().any(char::is_control);
    if !name_ok(event.key) || !printable(event.key) {
        return Err(crate::Error::InvalidEvent(
            "the key must be 1 to 255 bytes, without control characters".into(),
        ));
    }
    for (name, value) in event.headers {
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
            return Err(crate::Error::InvalidEvent(format!(
                "header name {name:?}: visible ASCII without ':'"
            )));
        }
        if !printable(value) {
            return Err(crate::Error::InvalidEvent(format!(
                "the value of header {name} has a control character"
            )));
        }
    }
    if event.payload.len() > MAX_PAYLOAD_BYTES {
        return Err(crate::Error::InvalidEvent(format!(
            "payload of {} bytes; at most {MAX_PAYLOAD_BYTES}",
            event.payload.len()
        )));
    }
    if event.headers.len() > MAX_HEADERS {
        return Err(crate::Error::InvalidEvent(format!(
            "{} headers; at most {MAX_HEADERS}",
            event.headers.len()
        )));
    }
    Ok(())
}

/// How much one relay round takes on.
#[derive(Debug, Clone, Copy)]
pub struct RelayConfig {
    /// Keys claimed per round.
    pub max_keys: i64,
    /// Events per key per round.
    pub max_events_per_key: i64,
    /// A relay whose session stays idle in its transaction this long (stalled mid-publish)
    /// is disconnected by PostgreSQL, which releases its keys to other relays.
    pub stall_timeout: Duration,
    /// A key whose next event fails to publish waits this long before it is tried again,
    /// twice as long after each further failure, up to `max_retry_backoff`; other keys flow
    /// on meanwhile.
    pub retry_backoff: Duration,
    pub max_retry_backoff: Duration,
    /// Failures in a row after which the key is parked: its event (and, to keep the key's
    /// order, its later events) waits, with its last error, for `idem outbox retry` or
    /// `discard`.
    pub max_attempts: i32,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            max_keys: 64,
            max_events_per_key: 100,
            stall_timeout: Duration::from_secs(30),
            retry_backoff: Duration::from_secs(1),
            max_retry_backoff: Duration::from_secs(300),
            max_attempts: 10,
        }
    }
}

/// What one relay round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoundReport {
    pub keys: usize,
    pub published: usize,
    pub failed: usize,
    /// Keys parked by this round's failures.
    pub parked: usize,
}

/// How much the outbox holds unpublished.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutboxStats {
    pub pending_events: i64,
    pub pending_keys: i64,
    /// Keys whose next event failed to publish `max_attempts` times: nothing of theirs is
    /// published until `idem outbox retry` or `discard`.
    pub parked_keys: i64,
    /// How long the oldest unpublished event has waited.
    pub oldest_pending: Option<std::time::Duration>,
}

/// What `Outbox::purge_sent` deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PurgeReport {
    pub events: u64,
    pub keys: u64,
    pub batches: u64,
}

/// One key of the outbox, as the relay sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyState {
    pub topic: String,
    pub key: String,
    pub enqueued_seq: i64,
    pub published_seq: i64,
    /// Publish failures of its next event in a row.
    pub attempts: i32,
    pub last_error: Option<String>,
    /// Not tried again before this long (backoff), if failing.
    pub retry_in: Option<std::time::Duration>,
    /// Parked this long ago, if parked.
    pub parked_for: Option<std::time::Duration>,
    /// The next event's id, and how long it has waited.
    pub next_id: Option<i64>,
    pub next_age: Option<std::time::Duration>,
}

/// An event waiting to be published.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingEvent {
    pub id: i64,
    pub seq: i64,
    pub age: std::time::Duration,
    pub payload_bytes: usize,
    pub headers: Vec<(String, String)>,
}
