//! The whole path for real, with failures: clients retry payments against the payments service
//! (idem layer + outbox), two relays publish to JetStream, two ledger consumers apply the
//! payments through the inbox, and midway one relay and one ledger are killed with SIGKILL and
//! replaced. Afterwards: one payment row per key, every payment applied exactly once, the
//! balances sum to the total, each account's events in order on the stream, nothing stuck.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use idem_core::conformance::{fresh_postgres_schema, service_url};
use tokio_postgres::NoTls;

const PAYMENTS: usize = 2_000;
const ACCOUNTS: usize = 25;

/// Starts one of this package's binaries and returns it with its first stdout line.
fn start(binary: &str, args: &[&str]) -> (Child, String) {
    start_with_env(binary, args, &[])
}

fn start_with_env(binary: &str, args: &[&str], env: &[(&str, &str)]) -> (Child, String) {
    let mut child = Command::new(binary)
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|error| panic!("start {binary}: {error}"));
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    (child, line.trim().to_owned())
}

fn kill9(child: &mut Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn payments_apply_exactly_once_through_retries_and_killed_processes() {
    let Some(nats) = service_url("IDEM_TEST_NATS_URL") else { return };
    let Some(database) = fresh_postgres_schema("idem_e2e_payments").await else { return };
    let jetstream = jetstream::new(async_nats::connect(&nats).await.unwrap());
    let _ = jetstream.delete_stream("IDEM_E2E_PAYMENTS").await;
    let mut stream = jetstream
        .create_stream(stream::Config {
            name: "IDEM_E2E_PAYMENTS".into(),
            subjects: vec!["idemtest.e2e.>".into()],
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .unwrap();

    let (payments_bin, relay_bin, ledger_bin) =
        (env!("CARGO_BIN_EXE_payments"), env!("CARGO_BIN_EXE_relay"), env!("CARGO_BIN_EXE_ledger"));
    let (mut payments, line) = start(
        payments_bin,
        &["--database", &database, "--listen", "127.0.0.1:0", "--topic", "idemtest.e2e.payments"],
    );
    let base = line.strip_prefix("payments listening on ").expect("readiness line").to_owned();
    let relay_args = [
        "--database",
        &database,
        "--nats",
        &nats,
        "--poll-interval",
        "200ms",
        "--max-events-per-key",
        "20",
    ];
    let ledger_args = [
        "--database",
        &database,
        "--nats",
        &nats,
        "--stream",
        "IDEM_E2E_PAYMENTS",
        "--concurrency",
        "8",
    ];
    let mut relays = [start(relay_bin, &relay_args).0, start(relay_bin, &relay_args).0];
    let mut ledgers = [start(ledger_bin, &ledger_args).0, start(ledger_bin, &ledger_args).0];

    // 16 clients; every 10th payment is retried with the same key, as after a lost response.
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let next = Arc::new(AtomicUsize::new(0));
    let (retries, replays) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let unavailable = Arc::new(AtomicUsize::new(0));
    let senders: Vec<_> = (0..16)
        .map(|_| {
            let (client, base, next) = (client.clone(), base.clone(), Arc::clone(&next));
            let (retries, replays) = (Arc::clone(&retries), Arc::clone(&replays));
            let unavailable = Arc::clone(&unavailable);
            tokio::spawn(async move {
                loop {
                    let index = next.fetch_add(1, Ordering::SeqCst);
                    if index >= PAYMENTS {
                        return;
                    }
                    let body = format!(
                        "{{\"account\":\"acct-{}\",\"cents\":{}}}",
                        index % ACCOUNTS,
                        index + 1
                    );
                    let attempts = if index % 10 == 0 { 2 } else { 1 };
                    for attempt in 0..attempts {
                        loop {
                            let request = http::Request::post(format!("{base}/payments"))
                                .header("idempotency-key", format!("pay-{index}"))
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(body.clone())))
                                .unwrap();
                            let response = client.request(request).await.unwrap();
                            let (status, replayed) = (
                                response.status(),
                                response.headers().contains_key("idempotent-replayed"),
                            );
                            let answer = response.into_body().collect().await.unwrap().to_bytes();
                            if status == 201 {
                                if attempt > 0 {
                                    retries.fetch_add(1, Ordering::SeqCst);
                                    replays.fetch_add(usize::from(replayed), Ordering::SeqCst);
                                }
                                break;
                            }
                            // A 503 (the store or the database busy for seconds under a loaded
                            // machine; nothing was run or committed) is retried as a client
                            // would; each is printed, and there may be only a few.
                            if status == 503 {
                                eprintln!(
                                    "payments answered 503, retried: {}",
                                    String::from_utf8_lossy(&answer)
                                );
                                let seen = unavailable.fetch_add(1, Ordering::SeqCst) + 1;
                                assert!(
                                    seen <= 20,
                                    "503 {seen} times: {}",
                                    String::from_utf8_lossy(&answer)
                                );
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                continue;
                            }
                            assert_eq!(
                                status,
                                409,
                                "only an in-flight duplicate may be refused: {}",
                                String::from_utf8_lossy(&answer)
                            );
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
            })
        })
        .collect();

    // Midway, SIGKILL one relay and one ledger consumer, and start replacements.
    let (observer, connection) = tokio_postgres::connect(&database, NoTls).await.unwrap();
    tokio::spawn(connection);
    while next.load(Ordering::SeqCst) < PAYMENTS / 3 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    kill9(&mut relays[0]);
    kill9(&mut ledgers[0]);
    let applied_at_kill: i64 = observer
        .query_one("SELECT count(*) FROM ledger_log", &[])
        .await
        .map_or(0, |row| row.get(0));
    relays[0] = start(relay_bin, &relay_args).0;
    ledgers[0] = start(ledger_bin, &ledger_args).0;
    for sender in senders {
        sender.await.unwrap();
    }

    let started = Instant::now();
    loop {
        let applied: i64 =
            observer.query_one("SELECT count(*) FROM ledger_log", &[]).await.unwrap().get(0);
        if applied as usize >= PAYMENTS {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "only {applied} of {PAYMENTS} applied"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Give redeliveries of the killed consumer's unacked messages time to arrive and be absorbed.
    tokio::time::sleep(Duration::from_secs(6)).await;
    for child in relays.iter_mut().chain(ledgers.iter_mut()).chain(std::iter::once(&mut payments)) {
        kill9(child);
    }

    let row = observer
        .query_one(
            "SELECT (SELECT count(*) FROM payments), (SELECT count(*) FROM ledger_log),
                    (SELECT count(DISTINCT message_id) FROM ledger_log), (SELECT sum(cents) FROM balances)::bigint,
                    (SELECT count(*) FROM idem_outbox e JOIN idem_outbox_keys k USING (topic, key)
                      WHERE e.seq > k.published_seq AND e.discarded_at IS NULL), (SELECT count(*) FROM idem_dead_letters)",
            &[],
        )
        .await
        .unwrap();
    let (payments_rows, applied, distinct, total, unsent, dead): (i64, i64, i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4), row.get(5));
    let expected: i64 = (1..=PAYMENTS as i64).sum();
    assert_eq!(payments_rows, PAYMENTS as i64, "one payment per key despite client retries");
    assert_eq!(
        (applied, distinct),
        (PAYMENTS as i64, PAYMENTS as i64),
        "every payment applied exactly once"
    );
    assert_eq!(total, expected, "the balances sum to the total paid");
    assert_eq!((unsent, dead), (0, 0), "nothing stuck in the outbox, nothing dead-lettered");

    let last = stream.info().await.unwrap().state.last_sequence;
    assert_eq!(last as usize, PAYMENTS, "each event once on the stream");
    let mut last_seq: HashMap<String, u64> = HashMap::new();
    for sequence in 1..=last {
        let message = stream.get_raw_message(sequence).await.unwrap();
        let header = |name: &str| message.headers.get(name).unwrap().to_string();
        let seq: u64 = header("Idem-Seq").parse().unwrap();
        let previous = last_seq.insert(header("Idem-Key"), seq).unwrap_or(0);
        assert_eq!(seq, previous + 1, "each account's events in commit order");
    }
    println!(
        "end to end: {PAYMENTS} payments ({} client retries, {} replayed), relay and ledger SIGKILLed at {applied_at_kill} applied; \
         {payments_rows} payment rows, {applied} applied once each, balance total {total}, {last} events on the stream in per-account order",
        retries.load(Ordering::SeqCst),
        replays.load(Ordering::SeqCst)
    );
}

/// The consumer side alone: the ledger SIGKILLed three times while it holds a batch (messages
/// delivered and not acknowledged, some of them committed, some blocked mid-transaction),
/// restarted each time.
/// Afterwards every payment is applied once, and nothing is left pending or unacknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_ledger_killed_mid_batch_applies_every_payment_once() {
    const EVENTS: usize = 6_000;
    let Some(nats) = service_url("IDEM_TEST_NATS_URL") else { return };
    let Some(database) = fresh_postgres_schema("idem_e2e_ledger_kill").await else { return };
    let jetstream = jetstream::new(async_nats::connect(&nats).await.unwrap());
    let _ = jetstream.delete_stream("IDEM_E2E_LEDGER_KILL").await;
    let stream = jetstream
        .create_stream(stream::Config {
            name: "IDEM_E2E_LEDGER_KILL".into(),
            subjects: vec!["idemtest.ledgerkill.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    // The events as the relay publishes them: the message id is the inbox key.
    let mut acks = Vec::with_capacity(500);
    for index in 0..EVENTS {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("idem-outbox-{index}").as_str());
        let body = format!("{{\"account\":\"acct-{}\",\"cents\":{}}}", index % ACCOUNTS, index + 1);
        let subject = "idemtest.ledgerkill.payments";
        acks.push(jetstream.publish_with_headers(subject, headers, body.into()).await.unwrap());
        // The client holds a bounded number of unanswered publishes: collect the acks.
        if acks.len() == 500 || index + 1 == EVENTS {
            for ack in acks.drain(..) {
                ack.await.unwrap();
            }
        }
    }

    let ledger_args = [
        "--database",
        &database,
        "--nats",
        &nats,
        "--stream",
        "IDEM_E2E_LEDGER_KILL",
        "--concurrency",
        "32",
        "--ack-wait-secs",
        "1",
    ];
    // The ledger's tables, made first so each account's balance row exists from the start.
    let (observer, connection) = tokio_postgres::connect(&database, NoTls).await.unwrap();
    tokio::spawn(connection);
    let (mut locker, connection) = tokio_postgres::connect(&database, NoTls).await.unwrap();
    tokio::spawn(connection);
    observer
        .batch_execute(
            "CREATE TABLE balances (account text PRIMARY KEY, cents bigint NOT NULL);
             CREATE TABLE ledger_log (message_id text NOT NULL);
             INSERT INTO balances SELECT 'acct-' || n, 0 FROM generate_series(0, 24) n;",
        )
        .await
        .unwrap();
    let ledger_bin = env!("CARGO_BIN_EXE_ledger");
    let (mut ledger, _) = start(ledger_bin, &ledger_args);
    let applied = || async {
        let sql = "SELECT count(*) FROM ledger_log";
        observer.query_one(sql, &[]).await.map_or(0, |row| row.get::<_, i64>(0)) as usize
    };
    // Three times: lock one account's balance row, so the handlers of that account's payments
    // block inside their transactions while the rest of their batch commits; the runner
    // acknowledges a batch only once all of it is done, so the ledger now holds committed and
    // uncommitted messages, none acknowledged. Kill it there, release the lock, restart it.
    let mut kills = Vec::new();
    for round in 1..=3 {
        while applied().await < EVENTS * round / 4 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let lock = locker.transaction().await.unwrap();
        let sql = "SELECT 1 FROM balances WHERE account = $1 FOR UPDATE";
        lock.execute(sql, &[&format!("acct-{round}")]).await.unwrap();
        let blocked = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'";
        while observer.query_one(blocked, &[]).await.unwrap().get::<_, i64>(0) == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let waiting: i64 = observer.query_one(blocked, &[]).await.unwrap().get(0);
        kill9(&mut ledger);
        lock.rollback().await.unwrap();
        let held = stream.consumer_info("ledger").await.unwrap().num_ack_pending;
        kills.push((applied().await, held, waiting));
        assert!(held > 0, "kill {round} landed mid-batch: the ledger held unacknowledged messages");
        ledger = start(ledger_bin, &ledger_args).0;
    }

    let started = Instant::now();
    while applied().await < EVENTS {
        assert!(started.elapsed() < Duration::from_secs(60), "only {} applied", applied().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Past the ack wait, so any redelivery of the killed ledgers' batches has come and gone.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let info = stream.consumer_info("ledger").await.unwrap();
    kill9(&mut ledger);
    assert_eq!((info.num_pending, info.num_ack_pending), (0, 0), "nothing left on the stream");
    let row = observer
        .query_one(
            "SELECT count(*), count(DISTINCT message_id), (SELECT sum(cents) FROM balances)::bigint,
                    (SELECT count(*) FROM idem_dead_letters) FROM ledger_log",
            &[],
        )
        .await
        .unwrap();
    let (applied, distinct, total, dead): (i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!((applied, distinct), (EVENTS as i64, EVENTS as i64), "each payment applied once");
    assert_eq!(total, (1..=EVENTS as i64).sum::<i64>(), "the balances sum to the total paid");
    assert_eq!(dead, 0, "nothing dead-lettered");
    println!(
        "ledger SIGKILL mid-batch: {EVENTS} events; (applied, held unacknowledged, of which blocked uncommitted) at each kill: {kills:?}; \
         afterwards {applied} applied once each, balance total {total}, {} redeliveries in all",
        info.delivered.consumer_sequence - EVENTS as u64
    );
}

/// The service commits the payment and then dies before it answers (the fault hook aborts the
/// process right after the commit). The response was stored in the same transaction as the
/// payment, so the client's retry against the restarted service replays it: one payment row,
/// though the client never saw an answer. Storing the response after the commit would have
/// left the key in flight, and the retry after the lease would have paid again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_killed_between_its_commit_and_its_answer_replays_on_retry() {
    let Some(database) = fresh_postgres_schema("idem_e2e_crash_after_commit").await else {
        return;
    };
    let payments_bin = env!("CARGO_BIN_EXE_payments");
    let args = ["--database", database.as_str(), "--listen", "127.0.0.1:0"];
    let (mut doomed, line) =
        start_with_env(payments_bin, &args, &[("PAYMENTS_FAULT", "crash-after-commit")]);
    let base = line.strip_prefix("payments listening on ").expect("readiness line").to_owned();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let pay = |base: String| {
        let client = client.clone();
        async move {
            let request = http::Request::post(format!("{base}/payments"))
                .header("idempotency-key", "pay-crash-1")
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(br#"{"account":"acct-crash","cents":700}"#)))
                .unwrap();
            client.request(request).await
        }
    };
    assert!(pay(base).await.is_err(), "the service died before answering");
    let status = doomed.wait().unwrap();
    assert!(!status.success(), "the fault hook aborted the service: {status}");

    let (mut service, line) = start(payments_bin, &args);
    let base = line.strip_prefix("payments listening on ").expect("readiness line").to_owned();
    let response = pay(base).await.expect("the restarted service answers");
    let (status, replayed) =
        (response.status(), response.headers().get("idempotent-replayed").cloned());
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(status, 201, "{body:?}");
    assert_eq!(replayed.as_ref().map(|value| value.as_bytes()), Some(&b"true"[..]));
    let replayed: serde_json::Value = serde_json::from_slice(&body).unwrap();

    let (observer, connection) = tokio_postgres::connect(&database, NoTls).await.unwrap();
    tokio::spawn(connection);
    let rows =
        observer.query("SELECT id FROM payments WHERE account = 'acct-crash'", &[]).await.unwrap();
    assert_eq!(rows.len(), 1, "one payment, though the client never got an answer");
    assert_eq!(replayed["payment_id"], rows[0].get::<_, i64>(0), "the replay names that payment");
    kill9(&mut service);
}
