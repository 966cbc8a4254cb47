//! The guarantee rows that need a process to die, restart or share a store: each causes the
//! failure for real (SIGKILL, SIGTERM, a second process, a locked database) and counts the
//! upstream's effects.

mod common;

use std::time::{Duration, Instant};

use common::{Gateway, Upstream, temp_dir};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_request_holds_the_key_until_the_lease_expires() {
    let upstream = Upstream::start().await;
    let store = format!("sqlite://{}", temp_dir().join("idem.db").display());
    let lease = ["--lease", "3s"];
    let mut gateway = Gateway::start(&upstream.url(), &store, &lease);
    let client = gateway.client();
    let request =
        tokio::spawn(
            async move { client.post("crash", "x", &[("x-test-delay-ms", "5000")]).await },
        );
    // Wait until the upstream has the call, then kill the gateway with no chance to clean up.
    let started = Instant::now();
    while upstream.calls() == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the request never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let claimed_at = Instant::now();
    gateway.kill9();
    request.abort();

    let restarted = Gateway::start(&upstream.url(), &store, &lease);
    let client = restarted.client();
    let blocked = client.post("crash", "x", &[]).await;
    blocked.assert_problem(409, "request-in-flight");
    let retry_after: u64 = blocked.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=3).contains(&retry_after), "Retry-After {retry_after}");
    assert_eq!(upstream.calls(), 1, "nothing runs while the dead owner's lease holds");

    // After the lease, a retry runs again: at most once by idem alone, and the key went
    // upstream both times so an upstream that honours it can deduplicate.
    let lease_end = claimed_at + Duration::from_millis(3_100);
    tokio::time::sleep(lease_end.saturating_duration_since(Instant::now())).await;
    let fresh = client.post("crash", "x", &[]).await;
    assert_eq!(fresh.status, 201, "{:?}", String::from_utf8_lossy(&fresh.body));
    assert!(!fresh.is_replay());
    assert_eq!(upstream.calls(), 2);
    assert!(upstream.seen().iter().all(|call| call.idempotency_key.as_deref() == Some("crash")));
    assert!(client.post("crash", "x", &[]).await.is_replay());
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_response_survives_a_restart() {
    let upstream = Upstream::start().await;
    let store = format!("sqlite://{}", temp_dir().join("idem.db").display());
    let mut gateway = Gateway::start(&upstream.url(), &store, &[]);
    let first = gateway.client().post("durable", "x", &[]).await;
    assert_eq!(first.status, 201);
    // SIGKILL right after the response: the record was committed before the client got it.
    gateway.kill9();
    let restarted = Gateway::start(&upstream.url(), &store, &[]);
    let replay = restarted.client().post("durable", "x", &[]).await;
    assert!(replay.is_replay());
    assert_eq!(replay.body, first.body);
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateway_processes_on_one_sqlite_file_run_a_race_once() {
    let upstream = Upstream::start().await;
    let store = format!("sqlite://{}", temp_dir().join("shared.db").display());
    let gateways = [
        Gateway::start(&upstream.url(), &store, &[]),
        Gateway::start(&upstream.url(), &store, &[]),
    ];
    for round in 0..3 {
        let key = format!("cross-process-{round}");
        let racers: Vec<_> = (0..24)
            .map(|i| {
                let client = gateways[i % 2].client();
                let key = key.clone();
                tokio::spawn(async move {
                    client.post(&key, "same", &[("x-test-delay-ms", "300")]).await
                })
            })
            .collect();
        for racer in racers {
            let status = racer.await.unwrap().status.as_u16();
            assert!(status == 201 || status == 409, "status {status}");
        }
        assert_eq!(
            upstream.calls(),
            round + 1,
            "round {round}: 24 requests over 2 processes ran once"
        );
        for gateway in &gateways {
            assert!(
                gateway.client().post(&key, "same", &[]).await.is_replay(),
                "either process replays"
            );
        }
    }
    assert_eq!(upstream.calls(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish_and_store() {
    let upstream = Upstream::start().await;
    let store = format!("sqlite://{}", temp_dir().join("idem.db").display());
    let mut gateway = Gateway::start(&upstream.url(), &store, &[]);
    let client = gateway.client();
    let request =
        tokio::spawn(
            async move { client.post("draining", "x", &[("x-test-delay-ms", "1000")]).await },
        );
    while upstream.calls() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = tokio::task::spawn_blocking(move || {
        let status = gateway.terminate();
        (status, gateway)
    });
    let reply = request.await.unwrap();
    assert_eq!(reply.status, 201, "the in-flight request finished during shutdown");
    let (status, _gateway) = status.await.unwrap();
    assert!(status.success(), "idem exits 0 after a graceful shutdown: {status:?}");

    let restarted = Gateway::start(&upstream.url(), &store, &[]);
    let replay = restarted.client().post("draining", "x", &[]).await;
    assert!(replay.is_replay(), "the outcome was stored before exit");
    assert_eq!(replay.body, reply.body);
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unavailable_store_fails_closed_by_default_and_open_when_configured() {
    let upstream = Upstream::start().await;
    let db = temp_dir().join("idem.db");
    let store = format!("sqlite://{}?busy_timeout_ms=200", db.display());
    let closed = Gateway::start(&upstream.url(), &store, &[]);
    let open = Gateway::start(&upstream.url(), &store, &["--fail-open"]);
    // Another process's writer holds the database: for idem, the store is unreachable.
    let blocker = rusqlite::Connection::open(&db).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();

    let refused = closed.client().post("outage", "x", &[]).await;
    refused.assert_problem(503, "store-unavailable");
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(upstream.calls(), 0, "fail closed: nothing is forwarded");
    let forwarded = open.client().post("outage-open", "x", &[]).await;
    assert_eq!(forwarded.status, 201, "fail open: forwarded without idempotency");
    assert_eq!(upstream.calls(), 1);

    // The store comes back: the gateway recovers by itself, and nothing stored was lost.
    blocker.execute_batch("COMMIT").unwrap();
    let recovered = closed.client().post("outage", "x", &[]).await;
    assert_eq!(recovered.status, 201);
    assert!(closed.client().post("outage", "x", &[]).await.is_replay());
    assert!(
        open.client().post("outage", "x", &[]).await.is_replay(),
        "the other process sees the record"
    );
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_record_is_refused_and_never_run_again() {
    let upstream = Upstream::start().await;
    let db = temp_dir().join("idem.db");
    let store = format!("sqlite://{}", db.display());
    // Failing open must not turn a damaged record into a second run.
    let gateway = Gateway::start(&upstream.url(), &store, &["--fail-open"]);
    let client = gateway.client();
    assert_eq!(client.post("bad-payload", "x", &[]).await.status, 201);
    assert_eq!(client.post("bad-state", "x", &[]).await.status, 201);
    assert_eq!(client.post("bad-type", "x", &[]).await.status, 201);
    let damage = rusqlite::Connection::open(&db).unwrap();
    // A stored response that no longer decodes...
    damage
        .execute("UPDATE idem_records SET payload = x'00010203' WHERE key = 'bad-payload'", [])
        .unwrap();
    // ...and a row whose fields contradict its state.
    damage.execute("UPDATE idem_records SET token = 7 WHERE key = 'bad-state'", []).unwrap();
    // ...and a column holding a value of the wrong type (SQLite lets any column hold any
    // type): a damaged record, not an unavailable store, which failing open would run again.
    damage
        .execute("UPDATE idem_records SET expires_at = 'soon' WHERE key = 'bad-type'", [])
        .unwrap();

    client.post("bad-payload", "x", &[]).await.assert_problem(500, "corrupt-record");
    client.post("bad-state", "x", &[]).await.assert_problem(500, "corrupt-record");
    client.post("bad-type", "x", &[]).await.assert_problem(500, "corrupt-record");
    assert_eq!(upstream.calls(), 3, "nothing ran again");
    // Other keys are unaffected.
    assert_eq!(client.post("healthy", "x", &[]).await.status, 201);
    assert!(client.post("healthy", "x", &[]).await.is_replay());
}
