//! `rediss://` against a `redis-server` of the tests' own that speaks TLS only (`--port 0`),
//! with a certificate from a CA the test makes.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use idem_core::conformance::servers::{TestCertificates, TlsRedis, free_port};
use idem_core::{
    ClaimRequest, Clock, Decision, FencingToken, Fingerprint, IdempotencyKey, RecordKey, Scope,
    Store, SystemClock,
};
use idem_redis::RedisStore;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_verified_tls_store_passes_the_conformance_suite() {
    let Some(certificates) = TestCertificates::make() else { return };
    let Some(server) = TlsRedis::start(free_port(), &certificates) else { return };
    let url = format!(
        "rediss://127.0.0.1:{}/0?ca={}&prefix=idem_tls",
        server.port(),
        certificates.ca.display()
    );
    let store = RedisStore::connect(&url).await.expect("rediss:// with the right CA");

    use idem_core::conformance as suite;
    suite::claim_complete_replay(&store).await;
    suite::mismatch_leaves_the_record_untouched(&store).await;
    suite::in_flight_until_the_lease_expires(&store).await;
    suite::renewal_extends_the_lease(&store).await;
    suite::release_lets_a_retry_run(&store).await;
    suite::a_stale_owner_is_fenced(&store).await;
    suite::expired_records_count_as_absent(&store).await;
    suite::large_payloads_round_trip(&store).await;
    suite::sweeping_is_bounded_and_spares_live_records(&store).await;
    suite::delete_removes_any_record(&store).await;
    suite::listing_filters_and_orders_records(&store).await;
    suite::a_claim_race_has_one_winner(Arc::new(store.clone()) as Arc<dyn Store>).await;

    // The change feed's own (subscriber) connection speaks TLS too: a completion of a
    // watched record reaches a subscriber.
    let mut changes = store.subscribe().expect("the store announces completions");
    let name = format!("watched-over-tls-{:x}", FencingToken::generate().as_u64());
    let key = RecordKey::new(Scope::named("tls"), IdempotencyKey::new(name).unwrap());
    let now = SystemClock.now();
    let token = FencingToken::generate();
    let fingerprint = Fingerprint::builder().part(b"body").finish();
    let lease_expires_at = now.saturating_add(Duration::from_secs(30));
    let claim = ClaimRequest {
        key: &key,
        fingerprint: &fingerprint,
        token,
        now,
        lease_expires_at,
        expires_at: lease_expires_at.saturating_add(Duration::from_secs(60)),
    };
    assert_eq!(store.claim(claim).await.unwrap(), Decision::Acquire);
    store.watch(&key).await.unwrap();
    let announced = async {
        loop {
            // The subscriber connects in the background: complete until it hears one.
            let id = tokio::time::timeout(Duration::from_millis(500), changes.recv());
            if let Ok(Ok(id)) = id.await {
                return id;
            }
        }
    };
    let expires_at = now.saturating_add(Duration::from_secs(60));
    store.complete(&key, token, Bytes::from_static(b"done"), now, expires_at).await.unwrap();
    let id = tokio::time::timeout(Duration::from_secs(10), announced)
        .await
        .expect("the completion is announced over the TLS subscriber connection");
    assert_eq!(id, key.change_id());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_is_refused_with_a_readable_error() {
    let Some(certificates) = TestCertificates::make() else { return };
    let Some(server) = TlsRedis::start(free_port(), &certificates) else { return };
    let port = server.port();
    let refused = |url: String| async move {
        let error = RedisStore::connect(&url).await.map(drop).unwrap_err().to_string();
        assert!(!error.contains("s3cret-pw"), "the password leaked: {error}");
        eprintln!("refused, as it should be: {error}");
        error
    };

    // A CA that did not sign the server's certificate.
    let wrong = certificates.wrong_ca.display();
    let error = refused(format!("rediss://:s3cret-pw@127.0.0.1:{port}/?ca={wrong}")).await;
    assert!(error.contains("not signed by a trusted CA"), "{error}");
    assert!(error.contains(&format!("trusted: ca={wrong}")), "{error}");
    // No ca: the system's CAs, which do not include the test's.
    let error = refused(format!("rediss://:s3cret-pw@127.0.0.1:{port}/")).await;
    assert!(error.contains("not signed by a trusted CA"), "{error}");
    assert!(error.contains("the system's CA certificates"), "{error}");
    // Plain redis:// to the TLS-only port gets no answer it can use.
    let error = refused(format!("redis://127.0.0.1:{port}/?op_timeout_ms=1000")).await;
    assert!(error.contains("unavailable"), "{error}");
    // Bad settings fail before connecting.
    let ca = certificates.ca.display();
    let error = refused(format!("redis://127.0.0.1:{port}/?ca={ca}")).await;
    assert!(error.contains("use rediss://"), "{error}");
    let error = refused(format!("rediss+cluster://127.0.0.1:{port}/")).await;
    assert!(error.contains("not supported yet"), "{error}");

    // And the right CA works, on the same server: what failed above was the trust.
    let url = format!("rediss://127.0.0.1:{port}/?ca={ca}&prefix=idem_tls_right");
    let store = RedisStore::connect(&url).await.expect("the right CA");
    assert!(store.capabilities().shared_by_hosts);
}
