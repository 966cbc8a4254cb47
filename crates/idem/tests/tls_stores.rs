//! The gateway on a store it reaches over TLS: a `redis-server` of the test's own that speaks
//! TLS only (`rediss://`), with a certificate from a CA the test makes. A retried request is
//! replayed; a server whose certificate the gateway cannot trust stops it at startup, saying
//! why.

mod common;

use std::process::Command;

use common::{Gateway, Upstream, idem_bin, unique};
use idem_core::conformance::servers::{TestCertificates, TlsRedis, free_port};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_on_rediss_replays_a_retried_request() {
    let Some(certificates) = TestCertificates::make() else { return };
    let Some(redis) = TlsRedis::start(free_port(), &certificates) else { return };
    let upstream = Upstream::start().await;
    let ca = certificates.ca.display().to_string();
    let store = format!("rediss://127.0.0.1:{}/?ca={ca}&prefix=idem_tls_gateway", redis.port());
    let gateway = Gateway::start(&upstream.url(), &store, &[]);

    let key = unique("tls");
    let first = gateway.client().post(&key, "charge 5", &[]).await;
    assert_eq!(first.status.as_u16(), 201, "the first request runs");
    assert!(!first.is_replay());
    let retry = gateway.client().post(&key, "charge 5", &[]).await;
    assert!(retry.is_replay(), "the retry is replayed from the store over TLS");
    assert_eq!(retry.body, first.body);
    assert_eq!(upstream.calls(), 1, "the upstream ran once");

    // A second gateway trusts the CA through SSL_CERT_FILE (the system store's override)
    // instead of ca=, and shares the record.
    let store = format!("rediss://127.0.0.1:{}/?prefix=idem_tls_gateway", redis.port());
    let other = Gateway::start_with_env(&upstream.url(), &store, &[], &[("SSL_CERT_FILE", &ca)]);
    let again = other.client().post(&key, "charge 5", &[]).await;
    assert!(again.is_replay(), "the other gateway replays the same record");
    assert_eq!(again.body, first.body);
    assert_eq!(upstream.calls(), 1, "still once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_refuses_a_store_whose_certificate_it_cannot_trust() {
    let Some(certificates) = TestCertificates::make() else { return };
    let Some(redis) = TlsRedis::start(free_port(), &certificates) else { return };
    let wrong = certificates.wrong_ca.display();
    let store = format!("rediss://idem:s3cret-pw@127.0.0.1:{}/?ca={wrong}", redis.port());
    let output = common::exits_within_20s(
        Command::new(idem_bin())
            .args(["serve", "--upstream", "http://127.0.0.1:9", "--store", &store])
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .env("IDEM_LOG", "warn"),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "idem serve started on an untrusted store: {stderr}");
    assert!(stderr.contains("not signed by a trusted CA"), "{stderr}");
    assert!(stderr.contains(&format!("ca={wrong}")), "{stderr}");
    assert!(!stderr.contains("s3cret-pw"), "the password leaked: {stderr}");
    eprintln!("refused, as it should be: {stderr}");
}
