//! `wait_replicas`, and calls sent again, against the real Redis named by
//! `IDEM_TEST_REDIS_URL`, a server with no replicas: a claim or a completion no replica
//! confirmed must not count, and the same call sent again is answered as done.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use idem_core::conformance::service_url;
use idem_core::{
    ClaimRequest, Decision, Error, FencingToken, Fingerprint, IdempotencyKey, RecordKey, Scope,
    Store, Timestamp,
};
use idem_redis::RedisStore;

/// The store on the test server with `query` added (`None` after a SKIPPED line).
async fn store(query: &str) -> Option<RedisStore> {
    let url = service_url("IDEM_TEST_REDIS_URL")?;
    let separator = if url.contains('?') { '&' } else { '?' };
    Some(
        RedisStore::connect(&format!("{url}{separator}prefix=idem_replicas{query}")).await.unwrap(),
    )
}

/// A fresh key, now, and a claim of it by `token`.
struct Fresh {
    key: RecordKey,
    now: Timestamp,
    fingerprint: Fingerprint,
}

impl Fresh {
    fn new(tag: &str) -> Self {
        let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let name = format!("{tag}{}", since.as_nanos());
        Self {
            key: RecordKey::new(Scope::named("replicas"), IdempotencyKey::new(name).unwrap()),
            now: Timestamp::from_millis(since.as_millis() as u64),
            fingerprint: Fingerprint::from_bytes([3; 32]),
        }
    }

    fn claim(&self, token: FencingToken) -> ClaimRequest<'_> {
        ClaimRequest {
            key: &self.key,
            fingerprint: &self.fingerprint,
            token,
            now: self.now,
            lease_expires_at: self.now.saturating_add(Duration::from_secs(30)),
            expires_at: self.expires(),
        }
    }

    fn expires(&self) -> Timestamp {
        self.now.saturating_add(Duration::from_secs(600))
    }
}

#[tokio::test]
async fn a_claim_no_replica_confirmed_fails_closed() {
    let Some(waited) = store("&wait_replicas=1&wait_timeout_ms=200").await else { return };
    let fresh = Fresh::new("k");
    let error = waited.claim(fresh.claim(FencingToken::generate())).await.unwrap_err();
    assert!(error.is_unavailable(), "{error:?}");
    assert!(error.to_string().contains("0 of 1 replicas"), "{error}");
    // The unconfirmed claim is in flight on the master (the gateway releases it): another
    // claim does not run meanwhile.
    let plain = store("").await.unwrap();
    let retry = plain.claim(fresh.claim(FencingToken::generate())).await.unwrap();
    assert!(matches!(retry, Decision::InFlight { .. }), "{retry:?}");

    // A wait that could outlast the call itself is refused at start.
    let url = service_url("IDEM_TEST_REDIS_URL").unwrap();
    let separator = if url.contains('?') { '&' } else { '?' };
    let long = format!("{url}{separator}wait_replicas=1&wait_timeout_ms=5000&op_timeout_ms=2000");
    let error = RedisStore::connect(&long).await.unwrap_err().to_string();
    assert!(error.contains("must be below op_timeout_ms"), "{error}");
}

/// What redis-rs's cluster client does when a connection drops under a call (a master killed):
/// it sends the call again. The same claim, or the same completion, sent again is answered as
/// done, not as another caller's in-flight record or as fenced.
#[tokio::test]
async fn a_claim_or_a_completion_sent_again_is_answered_as_done() {
    let Some(store) = store("").await else { return };
    let (fresh, token) = (Fresh::new("again"), FencingToken::generate());
    assert_eq!(store.claim(fresh.claim(token)).await.unwrap(), Decision::Acquire);
    let again = store.claim(fresh.claim(token)).await.unwrap();
    assert_eq!(again, Decision::Acquire, "the same claim again");
    let (key, now, expires) = (&fresh.key, fresh.now, fresh.expires());
    let payload = Bytes::from_static(b"paid");
    store.complete(key, token, payload.clone(), now, expires).await.unwrap();
    store.complete(key, token, payload.clone(), now, expires).await.unwrap();
    // Another payload, or another token, is not the same completion.
    let other = store.complete(key, token, Bytes::from_static(b"x"), now, expires).await;
    assert!(matches!(other, Err(Error::Fenced)), "{other:?}");
    let stale = store.complete(key, FencingToken::generate(), payload, now, expires).await;
    assert!(matches!(stale, Err(Error::Fenced)), "{stale:?}");
}

/// A completion no replica confirmed stays unconfirmed when sent again: it is never taken for
/// fenced (after which the gateway would read the master's record and tell the client its
/// outcome was stored, while no replica had it).
#[tokio::test]
async fn a_completion_no_replica_confirmed_stays_unconfirmed_when_sent_again() {
    let Some(plain) = store("").await else { return };
    let waited = store("&wait_replicas=1&wait_timeout_ms=100").await.unwrap();
    let (fresh, token) = (Fresh::new("unconfirmed"), FencingToken::generate());
    assert_eq!(plain.claim(fresh.claim(token)).await.unwrap(), Decision::Acquire);
    for attempt in 1..=3 {
        let payload = Bytes::from_static(b"paid");
        let completed = waited.complete(&fresh.key, token, payload, fresh.now, fresh.expires());
        let error = completed.await.unwrap_err();
        assert!(error.is_unavailable(), "attempt {attempt}: {error:?}");
    }
}
