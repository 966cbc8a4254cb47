//! `wait_replicas` against the real Redis named by `IDEM_TEST_REDIS_URL`, a server with no
//! replicas: a claim no replica confirmed must not count, so the work behind it never runs.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use idem_core::conformance::service_url;
use idem_core::{
    ClaimRequest, Decision, FencingToken, Fingerprint, IdempotencyKey, RecordKey, Scope, Store,
    Timestamp,
};
use idem_redis::RedisStore;

#[tokio::test]
async fn a_claim_no_replica_confirmed_fails_closed() {
    let Some(url) = service_url("IDEM_TEST_REDIS_URL") else { return };
    let separator = if url.contains('?') { '&' } else { '?' };
    let waited =
        format!("{url}{separator}prefix=idem_replicas&wait_replicas=1&wait_timeout_ms=200");
    let store = RedisStore::connect(&waited).await.unwrap();
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let now = Timestamp::from_millis(since.as_millis() as u64);
    let name = format!("k{}", since.as_nanos());
    let key = RecordKey::new(Scope::named("replicas"), IdempotencyKey::new(name).unwrap());
    let fingerprint = Fingerprint::from_bytes([3; 32]);
    let request = |token| ClaimRequest {
        key: &key,
        fingerprint: &fingerprint,
        token,
        now,
        lease_expires_at: now.saturating_add(Duration::from_secs(30)),
        expires_at: now.saturating_add(Duration::from_secs(600)),
    };
    let error = store.claim(request(FencingToken::generate())).await.unwrap_err();
    assert!(error.is_unavailable(), "{error:?}");
    assert!(error.to_string().contains("0 of 1 replicas"), "{error}");
    // The unconfirmed claim stays in flight until its lease ends: a retry does not run.
    let plain = format!("{url}{separator}prefix=idem_replicas");
    let store = RedisStore::connect(&plain).await.unwrap();
    let retry = store.claim(request(FencingToken::generate())).await.unwrap();
    assert!(matches!(retry, Decision::InFlight { .. }), "{retry:?}");

    // A wait that could outlast the call itself is refused at start.
    let long = format!("{url}{separator}wait_replicas=1&wait_timeout_ms=5000&op_timeout_ms=2000");
    let error = RedisStore::connect(&long).await.unwrap_err().to_string();
    assert!(error.contains("must be below op_timeout_ms"), "{error}");
}

fn fresh_key(tag: &str) -> (RecordKey, Timestamp) {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let name = format!("{tag}{}", since.as_nanos());
    let key = RecordKey::new(Scope::named("replicas"), IdempotencyKey::new(name).unwrap());
    (key, Timestamp::from_millis(since.as_millis() as u64))
}

/// What redis-rs's cluster client does when a connection drops under a call (a master killed):
/// it sends the call again. The same claim, or the same completion, sent again is answered as
/// done, not as another caller's in-flight record or as fenced.
#[tokio::test]
async fn a_claim_or_a_completion_sent_again_is_answered_as_done() {
    let Some(url) = service_url("IDEM_TEST_REDIS_URL") else { return };
    let separator = if url.contains('?') { '&' } else { '?' };
    let store =
        RedisStore::connect(&format!("{url}{separator}prefix=idem_replicas")).await.unwrap();
    let (key, now) = fresh_key("again");
    let (token, fingerprint) = (FencingToken::generate(), Fingerprint::from_bytes([4; 32]));
    let request = || ClaimRequest {
        key: &key,
        fingerprint: &fingerprint,
        token,
        now,
        lease_expires_at: now.saturating_add(Duration::from_secs(30)),
        expires_at: now.saturating_add(Duration::from_secs(600)),
    };
    assert_eq!(store.claim(request()).await.unwrap(), Decision::Acquire);
    assert_eq!(store.claim(request()).await.unwrap(), Decision::Acquire, "the same claim again");
    let expires = now.saturating_add(Duration::from_secs(600));
    let payload = bytes::Bytes::from_static(b"paid");
    store.complete(&key, token, payload.clone(), now, expires).await.unwrap();
    store.complete(&key, token, payload.clone(), now, expires).await.unwrap();
    // Another payload, or another token, is not the same completion.
    let other = store.complete(&key, token, bytes::Bytes::from_static(b"x"), now, expires).await;
    assert!(matches!(other, Err(idem_core::Error::Fenced)), "{other:?}");
    let stale = store.complete(&key, FencingToken::generate(), payload, now, expires).await;
    assert!(matches!(stale, Err(idem_core::Error::Fenced)), "{stale:?}");
}

/// A completion no replica confirmed stays unconfirmed when sent again: it is never taken for
/// fenced (after which the gateway would read the master's record and tell the client its
/// outcome was stored, while no replica had it).
#[tokio::test]
async fn a_completion_no_replica_confirmed_stays_unconfirmed_when_sent_again() {
    let Some(url) = service_url("IDEM_TEST_REDIS_URL") else { return };
    let separator = if url.contains('?') { '&' } else { '?' };
    let plain =
        RedisStore::connect(&format!("{url}{separator}prefix=idem_replicas")).await.unwrap();
    let waited =
        format!("{url}{separator}prefix=idem_replicas&wait_replicas=1&wait_timeout_ms=100");
    let waited = RedisStore::connect(&waited).await.unwrap();
    let (key, now) = fresh_key("unconfirmed");
    let (token, fingerprint) = (FencingToken::generate(), Fingerprint::from_bytes([5; 32]));
    let request = ClaimRequest {
        key: &key,
        fingerprint: &fingerprint,
        token,
        now,
        lease_expires_at: now.saturating_add(Duration::from_secs(30)),
        expires_at: now.saturating_add(Duration::from_secs(600)),
    };
    assert_eq!(plain.claim(request).await.unwrap(), Decision::Acquire);
    let expires = now.saturating_add(Duration::from_secs(600));
    for attempt in 1..=3 {
        let payload = bytes::Bytes::from_static(b"paid");
        let error = waited.complete(&key, token, payload, now, expires).await.unwrap_err();
        assert!(error.is_unavailable(), "attempt {attempt}: {error:?}");
    }
}
