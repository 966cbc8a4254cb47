//! The Redis Streams adapter's entry decoding (`idem_stream::redis_streams::received_from`)
//! and entry ids as offsets-mode positions (`position_of`, `entry_id_of`).
//!
//! Input: an `XREADGROUP`/`XREAD` reply in RESP, as it comes off the connection, converted by
//! redis-rs as the adapter converts it. For each entry, checks that nothing panics and:
//! - the id is the entry's `id` field when it has one, else the content id of the stream, the
//!   `h:` headers (sorted) and the relay's key and seq, and the payload (the one message-id
//!   rule, `idem_stream::content_id`);
//! - the headers are the `h:` fields, sorted, then `Idem-Key` and `Idem-Seq` when present;
//! - the same entry with its fields in another order is the same message (a redelivery keeps
//!   its id whatever order the fields arrive in);
//! - an entry id that is a position converts back to that position, within an i64, and
//!   positions order as the ids do.
#![no_main]

use std::collections::HashMap;

use idem_fuzz::{is_content_id, same_message};
use idem_stream::publish::{KEY_HEADER, SEQ_HEADER};
use idem_stream::redis_streams::{entry_id_of, position_of, received_from};
use libfuzzer_sys::fuzz_target;
use redis::Value;
use redis::streams::{StreamId, StreamReadReply};

fn bulk(entry: &StreamId, name: &str) -> Option<Vec<u8>> {
    match entry.map.get(name) {
        Some(Value::BulkString(bytes)) => Some(bytes.clone()),
        _ => None,
    }
}

fn check_entry(stream: &str, entry: &StreamId, previous: Option<&str>) {
    let received = received_from(stream, entry, 3);
    assert_eq!((received.subject.as_str(), received.attempt), (stream, 3));
    assert_eq!(received.position, None);
    assert_eq!(received.payload, bulk(entry, "payload").unwrap_or_default());

    let text = |name| bulk(entry, name).map(|v| idem_fuzz::text(&v)).unwrap_or_default();
    let mut headers: Vec<(String, String)> = entry
        .map
        .iter()
        .filter_map(|(name, value)| match (name.strip_prefix("h:"), value) {
            (Some(name), Value::BulkString(v)) => Some((name.to_owned(), idem_fuzz::text(v))),
            _ => None,
        })
        .collect();
    headers.sort();
    let (key, seq) = (text("key"), text("seq"));
    let id = text("id");
    if id.is_empty() {
        let mut hashed = headers.clone();
        hashed.push((KEY_HEADER.into(), key.clone()));
        hashed.push((SEQ_HEADER.into(), seq.clone()));
        let expected = idem_stream::content_id("sha256-", stream, &hashed, &received.payload);
        assert_eq!(received.id, expected);
        assert!(is_content_id(&received.id, "sha256-"), "{}", received.id);
    } else {
        assert_eq!(received.id, id);
    }
    for (name, value) in [(KEY_HEADER, key), (SEQ_HEADER, seq)] {
        if !value.is_empty() {
            headers.push((name.into(), value));
        }
    }
    assert_eq!(received.headers, headers);

    // The same fields, inserted in reverse order into a map of their own.
    let mut fields: Vec<(&String, &Value)> = entry.map.iter().collect();
    fields.reverse();
    let map: HashMap<String, Value> =
        fields.into_iter().map(|(name, value)| (name.clone(), value.clone())).collect();
    let reordered = StreamId { map, ..entry.clone() };
    assert!(same_message(&received, &received_from(stream, &reordered, 3)));

    if let Some(position) = position_of(&entry.id) {
        assert!(position <= i64::MAX as u64, "{}", entry.id);
        assert_eq!(position_of(&entry_id_of(position)), Some(position), "{}", entry.id);
        if let Some(earlier) = previous.and_then(|id| Some((id, position_of(id)?))) {
            let parts = |id: &str| -> Option<(u64, u64)> {
                let (ms, seq) = id.split_once('-')?;
                Some((ms.parse().ok()?, seq.parse().ok()?))
            };
            assert_eq!(
                parts(earlier.0).cmp(&parts(&entry.id)),
                earlier.1.cmp(&position),
                "{} and {}",
                earlier.0,
                entry.id
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(value) = redis::parse_redis_value(data) else { return };
    let Ok(reply) = redis::from_redis_value::<StreamReadReply>(value) else { return };
    for key in &reply.keys {
        let mut previous: Option<&str> = None;
        for entry in &key.ids {
            check_entry(&key.key, entry, previous);
            previous = Some(&entry.id);
        }
    }
});
