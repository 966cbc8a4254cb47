//! The PostgreSQL outbox relay over TLS (`sslmode=verify-full`), against a cluster of the
//! test's own that accepts TCP over TLS only (`hostssl`): the relay's connections (rounds and
//! `LISTEN`) must use TLS to get anything at all.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use idem_core::conformance::servers::{PrivatePostgres, TestCertificates, free_port};
use idem_stream::postgres::{Database, Event, Outbox, Relay, RelayConfig, RunConfig};
use idem_stream::publish::{OutboxMessage, PublishError, Publisher};

/// The application's own publisher: keeps what it is given (the broker is not under test).
#[derive(Default)]
struct Kept(Mutex<Vec<String>>);

#[async_trait]
impl Publisher for Kept {
    async fn publish(&self, messages: &[OutboxMessage]) -> Vec<Result<(), PublishError>> {
        let mut kept = self.0.lock().unwrap();
        messages
            .iter()
            .map(|message| {
                kept.push(String::from_utf8_lossy(&message.payload).into_owned());
                Ok(())
            })
            .collect()
    }
}

async fn enqueue(database: &Database, payloads: &[&str]) {
    let (mut client, connection) = database.connect().await.unwrap();
    tokio::spawn(connection);
    let transaction = client.transaction().await.unwrap();
    for payload in payloads {
        let event =
            Event { topic: "orders", key: "o-1", payload: payload.as_bytes(), headers: &[] };
        Outbox::enqueue(&transaction, event).await.unwrap();
    }
    transaction.commit().await.unwrap();
}

async fn published(kept: &Kept, count: usize) -> Vec<String> {
    for _ in 0..200 {
        let now = kept.0.lock().unwrap().clone();
        if now.len() >= count {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("published {:?}, not {count} events, within 10 s", kept.0.lock().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_publishes_over_verified_tls() {
    let Some(certificates) = TestCertificates::make() else { return };
    let Some(server) = PrivatePostgres::start_tls(free_port(), &certificates) else { return };
    let url = |ca: &std::path::Path| {
        format!(
            "postgres://postgres@localhost:{}/postgres?hostaddr=127.0.0.1&sslmode=verify-full&sslrootcert={}",
            server.port(),
            ca.display()
        )
    };
    // The wrong CA: no connection, and the error says why.
    let untrusted = Database::from_url(&url(&certificates.wrong_ca)).unwrap();
    let error = untrusted.connect().await.map(drop).unwrap_err();
    // tokio-postgres keeps the reason in the error's source.
    let error = format!("{error}: {}", std::error::Error::source(&error).unwrap());
    assert!(error.contains("not signed by a trusted CA"), "{error}");

    let database = Database::from_url(&url(&certificates.ca)).unwrap();
    let (mut client, connection) = database.connect().await.unwrap();
    tokio::spawn(connection);
    Outbox::migrate(&mut client).await.unwrap();
    enqueue(&database, &["first", "second"]).await;

    let kept = Arc::new(Kept::default());
    let relay = Relay::new(Arc::clone(&kept), RelayConfig::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    // A long poll interval: the third event below arrives by NOTIFY, on the TLS LISTEN
    // connection, not by polling.
    let run = RunConfig {
        poll_interval: Duration::from_secs(60),
        retention: None,
        ..RunConfig::default()
    };
    let running = tokio::spawn({
        let database = database.clone();
        async move { relay.run(&database, run, async { drop(stopped.await) }).await }
    });
    assert_eq!(published(&kept, 2).await, ["first", "second"]);
    // The relay's connections are up, over TLS (the server refuses any other TCP connection).
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) \
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.client_addr IS NOT NULL AND a.pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    let (over_tls, plain): (i64, i64) = (row.get(0), row.get(1));
    assert!(over_tls >= 2, "the relay's two connections over TLS, saw {over_tls}");
    assert_eq!(plain, 0);

    enqueue(&database, &["third"]).await;
    assert_eq!(published(&kept, 3).await, ["first", "second", "third"]);
    stop.send(()).unwrap();
    running.await.unwrap().unwrap();
}
