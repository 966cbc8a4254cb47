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
