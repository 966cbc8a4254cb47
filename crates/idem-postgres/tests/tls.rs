//! TLS to PostgreSQL, against clusters of the tests' own: TLS on with a certificate from a CA
//! the test makes, and a `pg_hba.conf` that accepts TCP over TLS only (`hostssl`), so every
//! connection that works here used TLS.

use std::sync::Arc;

use idem_core::Store;
use idem_core::conformance::servers::{PrivatePostgres, TestCertificates, free_port};
use idem_postgres::PostgresStore;
use idem_postgres::tls::Database;

/// `postgres://...` to `server` with `parameters`, under the host name `host` (the TCP
/// connection goes to 127.0.0.1 whatever the name: `hostaddr`).
fn url(server: &PrivatePostgres, host: &str, parameters: &str) -> String {
    format!(
        "postgres://postgres:s3cret-pw@{host}:{}/postgres?hostaddr=127.0.0.1&op_timeout_ms=5000&{parameters}",
        server.port()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_verified_tls_store_passes_the_conformance_suite() {
    let Some(certificates) = TestCertificates::make() else { return };
    let Some(server) = PrivatePostgres::start_tls(free_port(), &certificates) else { return };
    let ca = certificates.ca.display();
    let url = url(&server, "localhost", &format!("sslmode=verify-full&sslrootcert={ca}"));
    let store = PostgresStore::connect(&url).await.expect("verify-full with the right CA");

    // The session is encrypted (the server says so), with the store's own connector.
    let database = Database::from_url(&url.replace("&op_timeout_ms=5000", "")).unwrap();
    let (client, connection) = database.connect().await.unwrap();
    tokio::spawn(connection);
    let row = client
        .query_one("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "the session is not over TLS");
    assert!(row.get::<_, String>(1).starts_with("TLSv1."), "{}", row.get::<_, String>(1));

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

    // Waiters are woken through the LISTEN connection (started by the first subscriber),
    // which must use TLS too.
    let _changes = store.subscribe().expect("the store announces completions");
    let mut listening = false;
    for _ in 0..50 {
        let rows = client
            .query(
                "SELECT 1 FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
                 WHERE a.query ILIKE 'LISTEN%' AND s.ssl",
                &[],
            )
            .await
            .unwrap();
        if !rows.is_empty() {
            listening = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(listening, "no LISTEN connection over TLS after the suite's waits");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sslmode_checks_what_libpq_checks() {
    let Some(certificates) = TestCertificates::make() else { return };
    let Some(server) = PrivatePostgres::start_tls(free_port(), &certificates) else { return };
    let (ca, wrong_ca) = (certificates.ca.display(), certificates.wrong_ca.display());
    let connect = |url: String| async move { PostgresStore::connect(&url).await.map(drop) };

    // require: encrypted, nothing verified (no root certificate at all).
    connect(url(&server, "127.0.0.1", "sslmode=require")).await.expect("require");
    // verify-ca: the chain, not the name: a host name the certificate does not carry passes.
    connect(url(&server, "elsewhere.invalid", &format!("sslmode=verify-ca&sslrootcert={ca}")))
        .await
        .expect("verify-ca ignores the host name");
    // verify-full on the address the certificate names (IP SAN 127.0.0.1).
    connect(url(&server, "127.0.0.1", &format!("sslmode=verify-full&sslrootcert={ca}")))
        .await
        .expect("verify-full on 127.0.0.1");

    let refused = |url: String| async move {
        let error = PostgresStore::connect(&url).await.unwrap_err().to_string();
        assert!(!error.contains("s3cret-pw"), "the password leaked: {error}");
        eprintln!("refused, as it should be: {error}");
        error
    };
    // verify-full: a host name the certificate does not carry fails, and says so.
    let error = refused(url(
        &server,
        "elsewhere.invalid",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    ))
    .await;
    assert!(error.contains("not valid for the host name \"elsewhere.invalid\""), "{error}");
    // A CA that did not sign the server's certificate: refused by verify-full and verify-ca,
    // and by require too once a root certificate is given (as libpq).
    for mode in ["verify-full", "verify-ca", "require"] {
        let parameters = format!("sslmode={mode}&sslrootcert={wrong_ca}");
        let error = refused(url(&server, "localhost", &parameters)).await;
        assert!(error.contains("not signed by a trusted CA"), "{mode}: {error}");
        assert!(error.contains(&format!("sslrootcert={wrong_ca}")), "{mode}: {error}");
    }
    // A root certificate without a mode verifies fully, never ignored: the certificate's own
    // name passes, another fails.
    connect(url(&server, "127.0.0.1", &format!("sslrootcert={ca}")))
        .await
        .expect("sslrootcert alone verifies, over TLS");
    let error = refused(url(&server, "elsewhere.invalid", &format!("sslrootcert={ca}"))).await;
    assert!(error.contains("not valid for the host name"), "{error}");
    // A chain check without the name against the system's CAs would accept any publicly issued
    // certificate: refused before connecting.
    for parameters in [
        "sslmode=verify-ca",
        "sslmode=verify-ca&sslrootcert=system",
        "sslmode=require&sslrootcert=system",
    ] {
        let error = refused(url(&server, "127.0.0.1", parameters)).await;
        assert!(error.contains("but not its host name"), "{parameters}: {error}");
    }
    // Without TLS, the server (hostssl only) refuses: the connections above did use TLS.
    for parameters in ["sslmode=disable", "application_name=no-sslmode"] {
        let error = refused(url(&server, "127.0.0.1", parameters)).await;
        assert!(error.contains("no pg_hba.conf entry"), "{parameters}: {error}");
    }

    // A server without TLS: require fails, saying the server does not support it; prefer
    // falls back to plain.
    drop(server);
    let Some(plain) = PrivatePostgres::start(free_port()) else { return };
    let error = refused(url(&plain, "127.0.0.1", "sslmode=require")).await;
    assert!(error.contains("server does not support TLS"), "{error}");
    connect(url(&plain, "127.0.0.1", "sslmode=prefer")).await.expect("prefer falls back");
}
