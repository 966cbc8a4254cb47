//! `Idempotency-Key` header parsing, and the two ways a store reads a key back.
//!
//! Input: the raw header value. Checks:
//! - `IdempotencyKey::parse_header` never panics;
//! - a key it accepts is 1 to 255 visible ASCII characters, and re-serialised as a
//!   structured-field string (and as a bare token where that is unambiguous, and with
//!   surrounding whitespace) parses back to the same key;
//! - a header value that is not a quoted string means the same as `IdempotencyKey::new` on it;
//! - `RecordKey::from_stored` accepts exactly what `IdempotencyKey::new` does, keeping the
//!   scope; `Fingerprint::from_stored` accepts exactly 32 bytes, unchanged.
#![no_main]

use idem_core::{Fingerprint, IdempotencyKey, MAX_KEY_LEN, RecordKey};
use libfuzzer_sys::fuzz_target;

/// The key as an RFC 8941 string: quotes around it, `"` and `\` escaped.
fn quoted(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 2);
    out.push('"');
    for c in key.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

fuzz_target!(|data: &[u8]| {
    let parsed = IdempotencyKey::parse_header(data);
    if let Ok(key) = &parsed {
        let text = key.as_str();
        assert!((1..=MAX_KEY_LEN).contains(&text.len()), "{key:?}");
        assert!(text.bytes().all(|b| (0x21..=0x7E).contains(&b)), "{key:?}");
        // What a store keeps is the unquoted key: it validates as is.
        assert_eq!(IdempotencyKey::new(text).as_ref(), Ok(key));
        let again = IdempotencyKey::parse_header(quoted(text).as_bytes());
        assert_eq!(again.as_ref(), Ok(key), "quoted form of {key:?}");
        if !text.starts_with('"') {
            assert_eq!(IdempotencyKey::parse_header(text.as_bytes()).as_ref(), Ok(key));
        }
        let padded = format!(" \t{}\t ", quoted(text));
        assert_eq!(IdempotencyKey::parse_header(padded.as_bytes()).as_ref(), Ok(key));
    }

    // A bare token is validated as a library caller's key would be.
    let trimmed = data.trim_ascii();
    if trimmed.first() != Some(&b'"') {
        if let Ok(bare) = std::str::from_utf8(trimmed) {
            assert_eq!(parsed, IdempotencyKey::new(bare), "{bare:?}");
        }
    }

    // Reading back what a store kept: any UTF-8 text may be in the column.
    if let Ok(stored) = std::str::from_utf8(data) {
        let (scope, key) = stored.split_once('\0').unwrap_or(("scope", stored));
        match (RecordKey::from_stored(scope.to_owned(), key.to_owned()), IdempotencyKey::new(key)) {
            (Ok(record), Ok(expected)) => {
                assert_eq!(record.key, expected);
                assert_eq!(record.scope.as_str(), scope);
            }
            (Err(_), Err(_)) => {}
            (record, expected) => panic!("from_stored {record:?} but new {expected:?}"),
        }
    }
    match Fingerprint::from_stored(data) {
        Ok(fingerprint) => assert_eq!(&fingerprint.as_bytes()[..], data),
        Err(_) => assert_ne!(data.len(), 32),
    }
});
