//! The Redis store's record decoding (`idem_redis::read_record`), from the bytes Redis sends.
//!
//! Input: one byte choosing the reply, then a RESP reply as it comes off the connection:
//! - even: the reply to `HGETALL` (what `get` reads), converted as `get` converts it;
//! - odd: the claim script's reply `{'0', f, st, t, l, p, c, e}` (what `claim` reads when it
//!   finds a record), with absent fields sent as empty strings.
//!
//! Checks that nothing panics, that a refused record is `Error::Corrupt`, and that a record it
//! accepts, written back as the store's scripts write it, decodes to the same record in both
//! replies.
#![no_main]

use std::collections::HashMap;

use idem_core::{Error, Record, RecordState};
use libfuzzer_sys::fuzz_target;

/// The claim reply's fields, in order, after its leading `'0'`.
const CLAIM_FIELDS: [&str; 7] = ["f", "st", "t", "l", "p", "c", "e"];

fn from_hash(fields: &HashMap<String, Vec<u8>>) -> idem_core::Result<Record> {
    idem_redis::read_record(|name| fields.get(name).cloned())
}

fn from_claim_reply(reply: &[Vec<u8>]) -> idem_core::Result<Record> {
    idem_redis::read_record(|name| {
        CLAIM_FIELDS.iter().position(|n| *n == name).map(|index| reply[index + 1].clone())
    })
}

/// The hash the scripts leave for `record` (claim: `f st t l c e`; complete: `st p e`, and
/// `t l` deleted).
fn hash_of(record: &Record) -> HashMap<String, Vec<u8>> {
    let number = |n: u64| n.to_string().into_bytes();
    let mut fields = HashMap::from([
        ("f".to_owned(), record.fingerprint.as_bytes().to_vec()),
        ("c".to_owned(), number(record.created_at.as_millis())),
        ("e".to_owned(), number(record.expires_at.as_millis())),
    ]);
    match &record.state {
        RecordState::InFlight { token, lease_expires_at } => {
            fields.insert("st".into(), b"0".to_vec());
            fields.insert("t".into(), number(token.as_u64()));
            fields.insert("l".into(), number(lease_expires_at.as_millis()));
        }
        RecordState::Completed { payload } => {
            fields.insert("st".into(), b"1".to_vec());
            fields.insert("p".into(), payload.to_vec());
        }
    }
    fields
}

fn check(decoded: idem_core::Result<Record>) {
    let record = match decoded {
        Ok(record) => record,
        Err(Error::Corrupt(_)) => return,
        Err(other) => panic!("a stored record gave {other:?}, not Corrupt"),
    };
    let hash = hash_of(&record);
    assert_eq!(from_hash(&hash).ok().as_ref(), Some(&record), "{hash:?}");
    let mut reply = vec![b"0".to_vec()];
    reply.extend(CLAIM_FIELDS.iter().map(|name| hash.get(*name).cloned().unwrap_or_default()));
    assert_eq!(from_claim_reply(&reply).ok().as_ref(), Some(&record), "{reply:?}");
}

fuzz_target!(|data: &[u8]| {
    let Some((&view, resp)) = data.split_first() else { return };
    let Ok(value) = redis::parse_redis_value(resp) else { return };
    if view % 2 == 0 {
        let Ok(fields) = redis::from_redis_value::<HashMap<String, Vec<u8>>>(value) else { return };
        if !fields.is_empty() {
            check(from_hash(&fields));
        }
    } else {
        let Ok(reply) = redis::from_redis_value::<Vec<Vec<u8>>>(value) else { return };
        if reply.len() == 8 && reply[0] == b"0" {
            check(from_claim_reply(&reply));
        }
    }
});
