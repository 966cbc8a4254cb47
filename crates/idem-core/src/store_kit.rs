//! What every store writes the same way: a record read back from its stored fields (with the
//! invariants checked), the parameters of a store URL, the bound on a call, and the SQL forms
//! of timestamps and tokens. A new store writes only what is its own.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;

use crate::{Error, FencingToken, Fingerprint, Record, RecordState, Result, Timestamp};

/// `%XX` escapes decoded, as in a URL's query (`/a%20b` is `/a b`); a `%` not followed by two
/// hex digits stays as it is, and bytes that are not UTF-8 are replaced.
pub fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let hex = |at: usize| bytes.get(at).and_then(|b| (*b as char).to_digit(16));
        match (bytes[index], hex(index + 1), hex(index + 2)) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                index += 3;
            }
            (byte, _, _) => {
                out.push(byte);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `error` and its causes, each once: clients such as tokio-postgres say only "db error" or
/// "error performing TLS handshake" at the top and keep why in the error's source.
pub fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The stored code of an in-flight record.
pub const IN_FLIGHT: i16 = 0;
/// The stored code of a completed record.
pub const COMPLETED: i16 = 1;

/// A record's fields as a store keeps them, before the invariants are checked.
#[derive(Debug)]
pub struct StoredFields<'a> {
    pub fingerprint: &'a [u8],
    /// [`IN_FLIGHT`] or [`COMPLETED`]; anything else is damage.
    pub state: i64,
    pub token: Option<FencingToken>,
    pub lease_expires_at: Option<Timestamp>,
    pub payload: Option<Bytes>,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
}

impl StoredFields<'_> {
    /// The record, or [`Error::Corrupt`] if the fields contradict each other: in flight means
    /// a token and a lease and no payload; completed means a payload and neither of the others.
    pub fn into_record(self) -> Result<Record> {
        let fingerprint = Fingerprint::from_stored(self.fingerprint)?;
        let state = match (self.state, self.token, self.lease_expires_at, self.payload) {
            (state, Some(token), Some(lease_expires_at), None) if state == IN_FLIGHT.into() => {
                RecordState::InFlight { token, lease_expires_at }
            }
            (state, None, None, Some(payload)) if state == COMPLETED.into() => {
                RecordState::Completed { payload }
            }
            (state, token, lease, payload) => {
                return Err(Error::Corrupt(format!(
                    "state {state} with token {token:?}, lease {lease:?}, payload present: {}",
                    payload.is_some()
                )));
            }
        };
        Ok(Record { fingerprint, state, created_at: self.created_at, expires_at: self.expires_at })
    }
}

/// A timestamp as SQL's signed 64-bit milliseconds.
pub fn millis_to_sql(timestamp: Timestamp) -> i64 {
    i64::try_from(timestamp.as_millis()).unwrap_or(i64::MAX)
}

/// SQL's signed 64-bit milliseconds as a timestamp (a negative value as the epoch).
pub fn millis_from_sql(millis: i64) -> Timestamp {
    Timestamp::from_millis(u64::try_from(millis).unwrap_or(0))
}

/// A stored record's timestamp read back: a negative value is damage, refused as corrupt
/// (read as the epoch, an `expires_at` would make the record look expired and its key free).
pub fn stored_millis(millis: i64, field: &str) -> Result<Timestamp> {
    u64::try_from(millis)
        .map(Timestamp::from_millis)
        .map_err(|_| Error::Corrupt(format!("{field} is negative: {millis}")))
}

/// A fencing token's bits in SQL's signed 64-bit integer.
pub fn token_to_sql(token: FencingToken) -> i64 {
    token.as_u64() as i64
}

/// The token whose bits SQL's signed 64-bit integer holds.
pub fn token_from_sql(bits: i64) -> FencingToken {
    FencingToken::from_u64(bits as u64)
}

/// A store URL split at its query: the part before `?`, and each `name=value` pair.
pub fn url_parameters(url: &str) -> (&str, Vec<(&str, &str)>) {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let pairs = query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
        .collect();
    (base, pairs)
}

/// `base` with the pairs a store did not take for itself, for the client library to read.
pub fn rejoin_url(base: &str, passed_on: &[(&str, &str)]) -> String {
    if passed_on.is_empty() {
        return base.to_owned();
    }
    let query: Vec<String> =
        passed_on.iter().map(|(name, value)| format!("{name}={value}")).collect();
    format!("{base}?{}", query.join("&"))
}

/// A URL parameter of positive milliseconds (`op_timeout_ms=250`), with a clear error.
pub fn positive_millis(name: &str, value: &str, scheme: &str) -> Result<Duration> {
    value.parse::<u64>().ok().filter(|millis| *millis > 0).map(Duration::from_millis).ok_or_else(
        || {
            Error::Config(format!(
                "{name} must be a positive number of milliseconds (in the {scheme}:// URL), not {value:?}"
            ))
        },
    )
}

/// Bounds a store call: a store that does not answer within `limit` is unavailable, not a
/// hang. `store` names it in the error ("PostgreSQL did not answer within 5s").
pub async fn bounded<T>(
    limit: Duration,
    store: &str,
    call: impl Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(limit, call).await {
        Ok(result) => result,
        Err(_) => Err(Error::unavailable(format!("{store} did not answer within {limit:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(
        state: i64,
        token: Option<u64>,
        lease: Option<u64>,
        payload: Option<&'static [u8]>,
    ) -> StoredFields<'static> {
        StoredFields {
            fingerprint: &[7; 32],
            state,
            token: token.map(FencingToken::from_u64),
            lease_expires_at: lease.map(Timestamp::from_millis),
            payload: payload.map(Bytes::from_static),
            created_at: Timestamp::from_millis(1),
            expires_at: Timestamp::from_millis(2),
        }
    }

    #[test]
    fn fields_that_contradict_their_state_are_corrupt() {
        let in_flight = fields(0, Some(9), Some(5), None).into_record().unwrap();
        assert!(
            matches!(in_flight.state, RecordState::InFlight { token, .. } if token.as_u64() == 9)
        );
        let done = fields(1, None, None, Some(b"r")).into_record().unwrap();
        assert_eq!(done.state, RecordState::Completed { payload: Bytes::from_static(b"r") });
        for damaged in [
            fields(0, Some(9), Some(5), Some(b"r")),
            fields(0, None, Some(5), None),
            fields(1, Some(9), None, Some(b"r")),
            fields(1, None, None, None),
            fields(2, None, None, Some(b"r")),
        ] {
            let error = damaged.into_record().unwrap_err();
            assert!(matches!(error, Error::Corrupt(_)), "{error:?}");
        }
        let short = StoredFields { fingerprint: &[1], ..fields(1, None, None, Some(b"r")) };
        assert!(matches!(short.into_record(), Err(Error::Corrupt(_))));
    }

    #[test]
    fn url_parameters_split_and_rejoin() {
        let (base, pairs) = url_parameters("redis://h:1/2?prefix=a&op_timeout_ms=5&tls&x=y");
        assert_eq!(base, "redis://h:1/2");
        assert_eq!(pairs, [("prefix", "a"), ("op_timeout_ms", "5"), ("tls", ""), ("x", "y")]);
        assert_eq!(rejoin_url(base, &pairs[3..]), "redis://h:1/2?x=y");
        assert_eq!(rejoin_url(base, &[]), "redis://h:1/2");
        assert_eq!(
            positive_millis("op_timeout_ms", "250", "redis").unwrap(),
            Duration::from_millis(250)
        );
        for bad in ["0", "-1", "soon", ""] {
            let error = positive_millis("op_timeout_ms", bad, "redis").unwrap_err().to_string();
            assert!(error.contains("op_timeout_ms must be a positive number"), "{error}");
        }
    }

    #[test]
    fn sql_forms_round_trip() {
        let token = FencingToken::from_u64(u64::MAX - 3);
        assert_eq!(token_from_sql(token_to_sql(token)), token);
        let at = Timestamp::from_millis(1_765_000_000_000);
        assert_eq!(millis_from_sql(millis_to_sql(at)), at);
        assert_eq!(millis_from_sql(-5), Timestamp::from_millis(0));
        assert_eq!(stored_millis(7, "expires_at").unwrap(), Timestamp::from_millis(7));
        let error = stored_millis(-5, "expires_at").unwrap_err();
        assert!(matches!(error, Error::Corrupt(_)), "{error:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_past_its_bound_is_unavailable() {
        let slow = bounded(Duration::from_secs(1), "Redis", async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok(())
        });
        let error = slow.await.unwrap_err();
        assert!(
            error.is_unavailable() && error.to_string().contains("Redis did not answer within 1s")
        );
        assert_eq!(bounded(Duration::from_secs(1), "Redis", async { Ok(3) }).await.unwrap(), 3);
    }
}
