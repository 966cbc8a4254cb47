//! Never a second run when the outcome is unknown: a slow upstream behind a client timeout,
//! an upstream that takes the request and breaks the connection, a call abandoned at the hard
//! cap or at shutdown, claims cut off by a paused store, and retries that wait for the first
//! run (`Prefer: wait`). Each case is caused for real against the `idem` binary, and the
//! upstream's calls per key are counted.

mod common;

use std::time::{Duration, Instant};

use common::{
    BreakingUpstream, Gateway, PrivateRedis, Reply, TestClient, Upstream, calls_per_key, idem_keys,
    sqlite_store, temp_dir, unique,
};
use idem_core::conformance::service_url;

/// Every store the gateway runs on here: SQLite and memory always, PostgreSQL and Redis when
/// their test servers are named (each in a namespace of this file's own).
fn stores() -> Vec<String> {
    let mut stores = vec![sqlite_store(), "memory://".to_owned()];
    if let Some(url) = service_url("IDEM_TEST_POSTGRES_URL") {
        let separator = if url.contains('?') { '&' } else { '?' };
        stores.push(format!("{url}{separator}schema=idem_unknown_outcome_tests"));
    }
    if let Some(url) = service_url("IDEM_TEST_REDIS_URL") {
        let separator = if url.contains('?') { '&' } else { '?' };
        stores.push(format!("{url}{separator}prefix=idem_unknown_outcome_tests"));
    }
    stores
}

fn detail(reply: &Reply) -> String {
    reply.json()["detail"].as_str().unwrap_or_default().to_owned()
}

/// Retries `key` as a client would after each 504 or 409, until it gets something else.
async fn retry_until_settled(
    client: &TestClient,
    key: &str,
    headers: &[(&str, &str)],
) -> (Reply, Vec<u16>) {
    let mut statuses = Vec::new();
    for _ in 0..200 {
        let reply = client.post(key, "x", headers).await;
        statuses.push(reply.status.as_u16());
        match reply.status.as_u16() {
            409 => tokio::time::sleep(Duration::from_millis(100)).await,
            504 => {}
            _ => return (reply, statuses),
        }
    }
    panic!("{key} never settled: {statuses:?}");
}

/// The user's report: an upstream slower than `--upstream-timeout`, and a client retrying the
/// same key after each 504. It ran three to four times; it must run once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_upstream_behind_a_timeout_runs_once_and_its_outcome_replays() {
    for store in stores() {
        let upstream = Upstream::start().await;
        let gateway = Gateway::start(&upstream.url(), &store, &["--upstream-timeout", "1s"]);
        let client = gateway.client();
        let key = unique("slow");
        let slow = [("x-test-delay-ms", "2500")];
        let first = client.post(&key, "x", &slow).await;
        first.assert_problem(504, "upstream-timeout");
        assert!(detail(&first).contains("still running"), "{store}: {}", detail(&first));

        let (outcome, statuses) = retry_until_settled(&client, &key, &slow).await;
        assert_eq!(outcome.status, 201, "{store}: {statuses:?}");
        assert!(outcome.is_replay(), "{store}: the retry gets the first run's response");
        assert!(statuses.contains(&409), "{store}: 409 while it ran: {statuses:?}");
        assert_eq!(outcome.json()["call"], 1, "{store}");
        assert_eq!(calls_per_key(&upstream, &key)[&key], 1, "{store}: {statuses:?}");
        eprintln!("{store}: 1 upstream call for 1 + {} client attempts", statuses.len());
    }
}

/// The upstream reads the request and the connection breaks before any answer: held with a
/// stored `502 outcome-unknown`, replayed to every retry, until an operator releases the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broken_connection_after_sending_holds_the_key_until_released() {
    for store in stores() {
        if store == "memory://" {
            continue; // `idem keys` cannot reach another process's memory.
        }
        let upstream = BreakingUpstream::start().await;
        let gateway = Gateway::start(&upstream.url(), &store, &[]);
        let client = gateway.client();
        let credential = format!("Bearer {}", unique("caller"));
        let auth = [("authorization", credential.as_str())];
        let key = unique("broken");

        let first = client.post(&key, "x", &auth).await;
        first.assert_problem(502, "outcome-unknown");
        assert!(!first.is_replay());
        for _ in 0..3 {
            let retry = client.post(&key, "x", &auth).await;
            retry.assert_problem(502, "outcome-unknown");
            assert!(retry.is_replay(), "{store}: held, never run again");
        }
        assert_eq!(upstream.calls(), 1, "{store}");

        // A stored response that is not an unknown outcome is not released by mistake.
        let metrics = common::metrics(&TestClient::new(gateway.admin).get_text("/metrics").await.1);
        let held = metrics
            .iter()
            .filter(|(name, _)| name.starts_with("idem_outcome_unknown_total"))
            .map(|(_, value)| *value)
            .sum::<f64>();
        assert_eq!(held, 1.0, "{store}: counted in /metrics");

        let (code, out, err) = idem_keys(&store, &["release", "--credential", &credential, &key]);
        assert_eq!(code, 0, "{store}: {out} {err}");
        assert!(out.contains("released"), "{out}");
        let rerun = client.post(&key, "x", &auth).await;
        rerun.assert_problem(502, "outcome-unknown");
        assert!(!rerun.is_replay(), "{store}: after the release the retry runs again");
        assert_eq!(upstream.calls(), 2, "{store}");
    }

    // `release` refuses a key with an ordinary stored response.
    let upstream = Upstream::start().await;
    let store = sqlite_store();
    let gateway = Gateway::start(&upstream.url(), &store, &[]);
    assert_eq!(gateway.client().post("ordinary", "x", &[]).await.status, 201);
    let (code, _, err) = idem_keys(&store, &["release", "--anonymous", "ordinary"]);
    assert_ne!(code, 0);
    assert!(err.contains("does not hold an unknown outcome"), "{err}");
    assert!(gateway.client().post("ordinary", "x", &[]).await.is_replay());
    assert_eq!(upstream.calls(), 1);
}

/// `--unknown-outcome release`: the key is not freed at once, only when its lease expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_release_policy_frees_an_unknown_outcome_only_when_its_lease_expires() {
    let upstream = BreakingUpstream::start().await;
    let gateway = Gateway::start(
        &upstream.url(),
        &sqlite_store(),
        &["--unknown-outcome", "release", "--lease", "2s"],
    );
    let client = gateway.client();
    let sent = Instant::now();
    let first = client.post("broken", "x", &[]).await;
    first.assert_problem(502, "outcome-unknown");
    assert!(detail(&first).contains("lease expires"), "{}", detail(&first));
    let blocked = client.post("broken", "x", &[]).await;
    blocked.assert_problem(409, "request-in-flight");
    assert_eq!(upstream.calls(), 1, "not released at once");
    tokio::time::sleep(
        (sent + Duration::from_millis(2_200)).saturating_duration_since(Instant::now()),
    )
    .await;
    client.post("broken", "x", &[]).await.assert_problem(502, "outcome-unknown");
    assert_eq!(upstream.calls(), 2, "after the lease a retry runs again");
}

/// A call that never answers is abandoned at `--upstream-abandon-after`: held as unknown.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_call_past_the_hard_cap_is_abandoned_and_held() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(
        &upstream.url(),
        &sqlite_store(),
        &["--upstream-timeout", "300ms", "--upstream-abandon-after", "1s"],
    );
    let client = gateway.client();
    let hanging = [("x-test-delay-ms", "30000")];
    client.post("hangs", "x", &hanging).await.assert_problem(504, "upstream-timeout");
    let (held, statuses) = retry_until_settled(&client, "hangs", &hanging).await;
    held.assert_problem(502, "outcome-unknown");
    assert!(detail(&held).contains("abandoned"), "{}", detail(&held));
    assert!(statuses.contains(&409), "{statuses:?}");
    assert!(client.post("hangs", "x", &hanging).await.is_replay());
    assert_eq!(upstream.calls(), 1);
}

/// A call still running when graceful shutdown gives up is settled as unknown, not left to
/// run again after its lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_settles_calls_it_cannot_wait_for_as_unknown() {
    let upstream = Upstream::start().await;
    let store = sqlite_store();
    let flags = ["--shutdown-timeout", "1s", "--upstream-timeout", "500ms", "--lease", "2s"];
    let mut gateway = Gateway::start(&upstream.url(), &store, &flags);
    let client = gateway.client();
    let slow = [("x-test-delay-ms", "20000")];
    client.post("outlives", "x", &slow).await.assert_problem(504, "upstream-timeout");
    assert!(gateway.terminate().success());

    let restarted = Gateway::start(&upstream.url(), &store, &flags);
    // Past the old lease: without the settlement this retry would run the call again.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let retry = restarted.client().post("outlives", "x", &slow).await;
    retry.assert_problem(502, "outcome-unknown");
    assert!(retry.is_replay());
    assert!(detail(&retry).contains("shut down"), "{}", detail(&retry));
    assert_eq!(upstream.calls(), 1);
}

/// `Prefer: wait=N`: a retry of a key in flight waits for the first run and gets its
/// response, on every store; on the shared ones from another gateway process than the one
/// running it. The waiter hears of the outcome: it answers within moments of the first run,
/// where a poll of the shared stores (every 5 s) would have taken seconds more.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_that_prefers_to_wait_gets_the_first_runs_response() {
    for store in stores() {
        let upstream = Upstream::start().await;
        let running = Gateway::start(&upstream.url(), &store, &[]);
        let other =
            (!store.starts_with("memory")).then(|| Gateway::start(&upstream.url(), &store, &[]));
        let waiting = other.as_ref().unwrap_or(&running);
        let key = unique("wait");
        let first = tokio::spawn({
            let client = running.client();
            let key = key.clone();
            async move {
                let reply = client.post(&key, "x", &[("x-test-delay-ms", "1500")]).await;
                (reply, Instant::now())
            }
        });
        while upstream.calls() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let waited = waiting.client().post(&key, "x", &[("prefer", "wait=10")]).await;
        let answered = Instant::now();
        let (first, first_answered) = first.await.unwrap();
        assert_eq!(first.status, 201, "{store}");
        assert_eq!(waited.status, 201, "{store}: {:?}", String::from_utf8_lossy(&waited.body));
        assert!(waited.is_replay(), "{store}");
        assert_eq!(waited.header("preference-applied"), Some("wait=10"), "{store}");
        assert_eq!(waited.body, first.body, "{store}");
        assert_eq!(upstream.calls(), 1, "{store}");
        let behind = answered.saturating_duration_since(first_answered);
        assert!(
            behind < Duration::from_millis(2_500),
            "{store}: the waiter answered {behind:?} after the first run"
        );
        eprintln!("{store}: the waiter answered {behind:?} after the first run");
    }

    // The wait is capped by --max-wait; past it, 409 as without the preference.
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), "memory://", &["--max-wait", "1s"]);
    let client = gateway.client();
    let first = tokio::spawn({
        let client = client.clone();
        async move { client.post("capped", "x", &[("x-test-delay-ms", "3000")]).await }
    });
    while upstream.calls() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let capped = client.post("capped", "x", &[("prefer", "wait=60")]).await;
    capped.assert_problem(409, "request-in-flight");
    assert_eq!(capped.header("preference-applied"), Some("wait=1"));
    assert_eq!(first.await.unwrap().status, 201);
    assert_eq!(upstream.calls(), 1);
}

/// Claims cut off by a paused store: 48 clients send fresh keys while Redis is paused; their
/// claims time out (503), Redis then runs the queued claim scripts, and no key may stay in
/// flight with nobody running it: each retry runs, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claims_cut_off_by_a_paused_store_strand_no_key() {
    if service_url("IDEM_TEST_REDIS_URL").is_none() {
        return;
    }
    let dir = temp_dir();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let Some(_redis) = PrivateRedis::start(port, &dir) else { return };
    let upstream = Upstream::start().await;
    let store = format!("redis://127.0.0.1:{port}/?op_timeout_ms=500");
    let gateway = Gateway::start(&upstream.url(), &store, &["--lease", "30s"]);
    let prefix = unique("paused");
    // Load the claim, completion and release scripts first, so that the claims queued during
    // the pause run as they are (a script Redis does not know yet would fail, not land).
    let client = gateway.client();
    assert_eq!(client.post(&unique("warm"), "x", &[]).await.status, 201);
    assert_eq!(client.post(&unique("warm"), "x", &[("x-test-status", "500")]).await.status, 500);
    // The witness: every command Redis runs, to count the claims that landed after the pause.
    let monitor_log = dir.join("monitor.log");
    let mut monitor = std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string(), "MONITOR"])
        .stdout(std::fs::File::create(&monitor_log).unwrap())
        .spawn()
        .expect("run redis-cli MONITOR");
    tokio::time::sleep(Duration::from_millis(200)).await;

    let paused = std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string(), "CLIENT", "PAUSE", "3000", "ALL"])
        .output()
        .expect("run redis-cli");
    assert!(paused.status.success(), "{paused:?}");
    let pause_ends = Instant::now() + Duration::from_secs(3);
    let clients: Vec<_> = (0..48)
        .map(|i| {
            let client = gateway.client();
            let key = format!("{prefix}-{i}");
            tokio::spawn(async move { (key.clone(), client.post(&key, "x", &[]).await.status) })
        })
        .collect();
    let mut refused = Vec::new();
    for client in clients {
        let (key, status) = client.await.unwrap();
        assert_eq!(status, 503, "{key}: the paused store fails closed");
        refused.push(key);
    }
    assert!(calls_per_key(&upstream, &prefix).is_empty(), "nothing ran during the pause");

    // Within seconds of the pause ending, no claim is left in flight.
    let mut in_flight = usize::MAX;
    for _ in 0..100 {
        if Instant::now() > pause_ends {
            let (code, out, err) = idem_keys(&store, &["list", "--state", "in-flight", "--json"]);
            assert_eq!(code, 0, "{err}");
            in_flight =
                serde_json::from_str::<serde_json::Value>(&out).unwrap().as_array().unwrap().len();
            if in_flight == 0 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(in_flight, 0, "claims stranded in flight after the pause");
    let stranded_for = pause_ends.elapsed();
    monitor.kill().unwrap();
    monitor.wait().unwrap();
    // Each claim script carries its key in its arguments: count the keys whose claim ran.
    let log = std::fs::read_to_string(&monitor_log).unwrap();
    let landed = (0..48).filter(|i| log.contains(&format!("\"{prefix}-{i}\""))).count();
    assert!(landed > 0, "no claim ran after the pause: the test proved nothing");
    for key in &refused {
        let retry = gateway.client().post(key, "x", &[]).await;
        assert_eq!(retry.status, 201, "{key}: the retry runs");
        assert!(!retry.is_replay());
    }
    let counts = calls_per_key(&upstream, &prefix);
    assert_eq!(counts.len(), 48);
    assert!(counts.values().all(|calls| *calls == 1), "{counts:?}");
    eprintln!(
        "48 claims cut off by a 3 s pause, {landed} of them carried out by Redis after it; none in flight {stranded_for:?} after it ended"
    );
}

/// libfaketime (Debian's `faketime` package), preloaded straight into the gateway (not through
/// the `faketime` wrapper, whose child a test could not kill); `None`, after a loud skip (or a
/// failure under `IDEM_REQUIRE_SERVICES=1`), where it is not installed.
fn libfaketime() -> Option<&'static str> {
    const LIBRARY: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
    if std::path::Path::new(LIBRARY).exists() {
        return Some(LIBRARY);
    }
    assert_ne!(
        std::env::var("IDEM_REQUIRE_SERVICES").as_deref(),
        Ok("1"),
        "libfaketime is needed (apt-get install faketime)"
    );
    idem_core::conformance::skip("libfaketime is not installed (apt-get install faketime)");
    None
}

/// Two gateways on one shared store, one of them on a host whose clock runs 10 minutes ahead
/// (libfaketime; 20 times the lease). By its own clock every lease has long expired, so it
/// would take over a live claim and run it a second time; on the store's clock it sees the
/// claim in flight. The same race, from both sides, runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_with_a_skewed_clock_cannot_take_over_a_live_claim() {
    let Some(library) = libfaketime() else { return };
    let shared: Vec<String> = stores()
        .into_iter()
        .filter(|store| !store.starts_with("memory") && !store.starts_with("sqlite"))
        .collect();
    for store in shared {
        let upstream = Upstream::start().await;
        let lease = ["--lease", "30s"];
        let honest = Gateway::start(&upstream.url(), &store, &lease);
        let skewed = Gateway::start_with_env(
            &upstream.url(),
            &store,
            &lease,
            &[("LD_PRELOAD", library), ("FAKETIME", "+10m"), ("FAKETIME_DONT_FAKE_MONOTONIC", "1")],
        );
        for (first, second, name) in
            [(&honest, &skewed, "honest first"), (&skewed, &honest, "skewed first")]
        {
            let key = unique("skew");
            let running = tokio::spawn({
                let client = first.client();
                let key = key.clone();
                async move { client.post(&key, "x", &[("x-test-delay-ms", "1500")]).await }
            });
            while calls_per_key(&upstream, &key).is_empty() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let racing = second.client().post(&key, "x", &[]).await;
            racing.assert_problem(409, "request-in-flight");
            let retry_after: u64 = racing.header("retry-after").unwrap().parse().unwrap();
            assert!((1..=30).contains(&retry_after), "{store} {name}: Retry-After {retry_after}");
            assert_eq!(running.await.unwrap().status, 201, "{store} {name}");
            let replay = second.client().post(&key, "x", &[]).await;
            assert!(replay.is_replay(), "{store} {name}");
            assert_eq!(calls_per_key(&upstream, &key)[&key], 1, "{store} {name}");
        }
    }
}
