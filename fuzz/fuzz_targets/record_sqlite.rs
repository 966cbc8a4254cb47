//! The SQLite store's row decoding (`idem_sqlite::read_record`).
//!
//! Input: the seven columns of a row (`fingerprint, state, token, lease_expires_at, payload,
//! created_at, expires_at`), each a tag byte and a value: 0 NULL, 1 INTEGER (8 bytes), 2 REAL
//! (8 bytes), 3 TEXT and 4 BLOB (2-byte length, then the bytes). SQLite keeps any type in any
//! column, so a damaged file can hold all of these. The row is selected from bound parameters
//! and decoded as the store decodes its own rows.
//!
//! Checks that decoding never panics; that a row it refuses (a column of the wrong SQL type
//! included) is refused as `Error::Corrupt`, never any other error, so that failing open can
//! never run a damaged record's key again; and that a record it accepts, written back as the
//! store writes it, decodes to the same record.
#![no_main]

use std::cell::RefCell;

use idem_core::{Error, Record, RecordState};
use idem_fuzz::Input;
use libfuzzer_sys::fuzz_target;
use rusqlite::types::Value;
use rusqlite::{Connection, params_from_iter};

const SELECT: &str = "SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7";

thread_local! {
    static CONNECTION: RefCell<Connection> =
        RefCell::new(Connection::open_in_memory().expect("an in-memory database"));
}

fn value(input: &mut Input<'_>) -> Value {
    match input.byte() % 5 {
        0 => Value::Null,
        1 => Value::Integer(input.u64() as i64),
        2 => Value::Real(f64::from_bits(input.u64())),
        3 => Value::Text(idem_fuzz::text(input.long())),
        _ => Value::Blob(input.long().to_vec()),
    }
}

fn decode(connection: &Connection, row: &[Value]) -> rusqlite::Result<idem_core::Result<Record>> {
    let mut statement = connection.prepare_cached(SELECT).expect("the statement prepares");
    statement.query_row(params_from_iter(row), idem_sqlite::read_record)
}

/// The row the store writes for `record` (its `to_sql` and `token_to_sql`).
fn row_of(record: &Record) -> Vec<Value> {
    let millis =
        |t: idem_core::Timestamp| Value::Integer(i64::try_from(t.as_millis()).unwrap_or(i64::MAX));
    let (state, token, lease, payload) = match &record.state {
        RecordState::InFlight { token, lease_expires_at } => {
            (0, Value::Integer(token.as_u64() as i64), millis(*lease_expires_at), Value::Null)
        }
        RecordState::Completed { payload } => {
            (1, Value::Null, Value::Null, Value::Blob(payload.to_vec()))
        }
    };
    vec![
        Value::Blob(record.fingerprint.as_bytes().to_vec()),
        Value::Integer(state),
        token,
        lease,
        payload,
        millis(record.created_at),
        millis(record.expires_at),
    ]
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let row: Vec<Value> = (0..7).map(|_| value(&mut input)).collect();
    CONNECTION.with_borrow(|connection| match decode(connection, &row) {
        Ok(Ok(record)) => {
            let again = decode(connection, &row_of(&record));
            assert_eq!(again.ok().and_then(Result::ok).as_ref(), Some(&record), "row {row:?}");
        }
        Ok(Err(Error::Corrupt(_))) => {}
        Ok(Err(other)) => panic!("row {row:?} gave {other:?}, not Corrupt"),
        Err(other) => panic!("row {row:?} gave the SQLite error {other:?}"),
    });
});
