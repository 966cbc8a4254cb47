//! Several gateway processes on one shared store (PostgreSQL, Redis), and that store failing
//! under them: stopped, killed, restarted, its connections cut. Each test counts the
//! upstream's calls per key: nothing may run twice, and nothing stored may be lost.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    Cutter, Gateway, PrivateRedis, Upstream, calls_per_key, temp_dir, unique, wait_healthy,
};
use idem_core::conformance::service_url;

fn postgres_url() -> Option<String> {
    let url = service_url("IDEM_TEST_POSTGRES_URL")?;
    let separator = if url.contains('?') { '&' } else { '?' };
    Some(format!("{url}{separator}schema=idem_gateway_tests"))
}

fn redis_url() -> Option<String> {
    let url = service_url("IDEM_TEST_REDIS_URL")?;
    let separator = if url.contains('?') { '&' } else { '?' };
    Some(format!("{url}{separator}prefix=idem_gateway_tests"))
}

/// Three gateways on `store`; 30 identical requests spread over them; then a retry on each.
async fn three_gateways_race_once(store: &str) {
    let upstream = Upstream::start().await;
    let gateways: Vec<Gateway> =
        (0..3).map(|_| Gateway::start(&upstream.url(), store, &[])).collect();
    for round in 0..3 {
        let key = unique(&format!("multi-{round}"));
        let racers: Vec<_> = (0..30)
            .map(|i| {
                let client = gateways[i % 3].client();
                let key = key.clone();
                tokio::spawn(async move {
                    client.post(&key, "same", &[("x-test-delay-ms", "300")]).await
                })
            })
            .collect();
        let mut bodies = Vec::new();
        for racer in racers {
            let reply = racer.await.unwrap();
            match reply.status.as_u16() {
                201 => bodies.push(reply.body),
                409 => reply.assert_problem(409, "request-in-flight"),
                other => panic!("unexpected status {other}"),
            }
        }
        assert_eq!(upstream.calls(), round + 1, "30 requests on 3 gateways ran once");
        assert!(bodies.windows(2).all(|pair| pair[0] == pair[1]), "every 201 is the one response");
        for gateway in &gateways {
            let replay = gateway.client().post(&key, "same", &[]).await;
            assert!(replay.is_replay(), "a retry on any instance replays");
            assert_eq!(replay.body, bodies[0]);
        }
    }
    assert_eq!(upstream.calls(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_gateways_on_one_postgres_run_a_race_once() {
    let Some(store) = postgres_url() else { return };
    three_gateways_race_once(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_gateways_on_one_redis_run_a_race_once() {
    let Some(store) = redis_url() else { return };
    three_gateways_race_once(&store).await;
}

/// Sends `count` requests with fresh keys, each followed by its retry; returns the statuses.
async fn traffic(gateway: &Gateway, prefix: &str, count: usize) -> Vec<(String, u16, u16)> {
    let client = gateway.client();
    let mut outcomes = Vec::new();
    for _ in 0..count {
        let key = unique(prefix);
        let first = client.post(&key, "x", &[]).await.status.as_u16();
        let retry = client.post(&key, "x", &[]).await.status.as_u16();
        outcomes.push((key, first, retry));
    }
    outcomes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cut_postgres_connections_fail_closed_and_recover() {
    let Some(store) = postgres_url() else { return };
    let target: SocketAddr = postgres_addr(&store);
    let cutter = Cutter::start(target).await;
    let through_cutter = store.replacen(&target.to_string(), &cutter.addr.to_string(), 1).replacen(
        "localhost:",
        "127.0.0.1:",
        1,
    );
    let through_cutter = format!("{through_cutter}&op_timeout_ms=1000");
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), &through_cutter, &[]);
    let prefix = unique("pg-outage");

    let before = traffic(&gateway, &prefix, 10).await;
    assert!(before.iter().all(|(_, first, retry)| (*first, *retry) == (201, 201)));

    cutter.cut();
    let during = traffic(&gateway, &prefix, 5).await;
    for (_, first, retry) in &during {
        assert_eq!((*first, *retry), (503, 503), "fail closed while the store is cut off");
    }
    assert_eq!(upstream.calls(), 10, "nothing was forwarded during the outage");

    cutter.restore();
    wait_healthy(&gateway, Duration::from_secs(15)).await;
    let after = traffic(&gateway, &prefix, 10).await;
    assert!(after.iter().all(|(_, first, retry)| (*first, *retry) == (201, 201)));
    // Nothing stored was lost: every outcome from before the outage still replays.
    let client = gateway.client();
    for (key, ..) in &before {
        assert!(client.post(key, "x", &[]).await.is_replay(), "{key} replays after recovery");
    }
    // The refused requests run now, once.
    for (key, ..) in &during {
        assert_eq!(client.post(key, "x", &[]).await.status, 201);
    }
    let counts = calls_per_key(&upstream, &prefix);
    assert_eq!(counts.len(), 25);
    assert!(counts.values().all(|calls| *calls == 1), "no key ran twice: {counts:?}");
}

fn postgres_addr(url: &str) -> SocketAddr {
    let authority = url.split("://").nth(1).unwrap().split(['/', '?']).next().unwrap();
    let host_port = authority.rsplit('@').next().unwrap();
    let host_port =
        if host_port.contains(':') { host_port.to_owned() } else { format!("{host_port}:5432") };
    host_port
        .replacen("localhost", "127.0.0.1", 1)
        .parse()
        .expect("IDEM_TEST_POSTGRES_URL names host:port")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_and_restarted_redis_fails_closed_and_loses_nothing() {
    if service_url("IDEM_TEST_REDIS_URL").is_none() {
        return;
    }
    let dir = temp_dir();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let Some(redis) = PrivateRedis::start(port, &dir) else { return };
    let upstream = Upstream::start().await;
    let store = format!("redis://127.0.0.1:{port}/?op_timeout_ms=500");
    let gateway = Gateway::start(&upstream.url(), &store, &[]);
    let prefix = unique("redis-outage");

    // Traffic runs on while the server is killed and restarted underneath it, until told to
    // stop once Redis is back. Each background request: its key, its answer, and when it was
    // sent and answered.
    type Sent = (String, u16, Instant, Instant);
    let (stop_background, background_stopped) = tokio::sync::watch::channel(false);
    let sent: Arc<Mutex<Vec<Sent>>> = Arc::default();
    let background = {
        let client = gateway.client();
        let (prefix, sent) = (prefix.clone(), Arc::clone(&sent));
        tokio::spawn(async move {
            for i in 0..3_000 {
                if *background_stopped.borrow() {
                    break;
                }
                let key = format!("{prefix}-bg-{i}");
                let at = Instant::now();
                let status = client.post(&key, "x", &[]).await.status.as_u16();
                sent.lock().unwrap().push((key, status, at, Instant::now()));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let before = traffic(&gateway, &prefix, 10).await;
    assert!(before.iter().all(|(_, first, retry)| (*first, *retry) == (201, 201)));

    redis.kill9();
    let killed = Instant::now();
    let during = traffic(&gateway, &prefix, 3).await;
    for (_, first, retry) in &during {
        assert_eq!((*first, *retry), (503, 503), "fail closed while Redis is down");
    }
    // Down long enough for the background traffic (a request every 20 ms) to meet it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let calls_during_outage = upstream.calls();
    let _redis = PrivateRedis::start(port, &dir).expect("restart redis-server");
    let restarted = Instant::now();
    wait_healthy(&gateway, Duration::from_secs(15)).await;

    let client = gateway.client();
    for (key, ..) in &before {
        let replay = client.post(key, "x", &[]).await;
        assert!(replay.is_replay(), "{key}: stored before the crash, replayed after the restart");
    }
    for (key, ..) in &during {
        assert_eq!(
            client.post(key, "x", &[]).await.status,
            201,
            "refused during the outage, runs now"
        );
    }
    stop_background.send(true).unwrap();
    background.await.unwrap();
    let background = sent.lock().unwrap().clone();
    // A request in flight when Redis died may be held until it is back (the gateway keeps
    // trying to store the outcome of what ran); answered 503 or held, it met the outage.
    assert!(
        background.iter().any(|(_, _, at, answered)| *at < restarted && *answered > killed),
        "no background request met the outage"
    );
    let statuses: Vec<u16> = background.iter().map(|(_, status, ..)| *status).collect();
    assert!(statuses.iter().all(|status| [201, 503].contains(status)), "{statuses:?}");
    assert!(upstream.calls() >= calls_during_outage);
    let counts = calls_per_key(&upstream, &prefix);
    assert!(counts.values().all(|calls| *calls == 1), "no key ran twice: {counts:?}");
    // Every background request that got a 201 is stored: its retry replays.
    for (key, status, ..) in background.iter().filter(|(_, status, ..)| *status == 201) {
        assert!(client.post(key, "x", &[]).await.is_replay(), "{key} (first answered {status})");
    }
    assert!(calls_per_key(&upstream, &prefix).values().all(|calls| *calls == 1));
}

/// A PostgreSQL store that fails over to something read-only (here: the database switched to
/// read-only transactions and every connection cut, as a promotion gone wrong or a standby
/// behind the address looks): `/healthz` turns 503 with PostgreSQL's reason, keyed requests
/// are refused without running, a new gateway refuses to start, and all of it heals when the
/// database takes writes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_postgres_is_unhealthy_refused_at_start_and_heals() {
    let Some(url) = service_url("IDEM_TEST_POSTGRES_URL") else { return };
    let (admin, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let database = "idem_readonly_test";
    for statement in [
        format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"),
        format!("CREATE DATABASE {database}"),
    ] {
        admin.batch_execute(&statement).await.unwrap();
    }
    let (base, query) = url.split_once('?').map_or((url.as_str(), None), |(b, q)| (b, Some(q)));
    let (server, _) = base.rsplit_once('/').expect("a database in the URL");
    let store = match query {
        Some(query) => format!("{server}/{database}?{query}"),
        None => format!("{server}/{database}"),
    };
    let read_only = |on: bool| {
        let setting = if on { "SET default_transaction_read_only = on" } else { "RESET ALL" };
        format!(
            "ALTER DATABASE {database} {setting};
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE datname = '{database}' AND pid <> pg_backend_pid();"
        )
    };

    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), &store, &[]);
    let health = common::TestClient::new(gateway.admin);
    assert_eq!(gateway.client().post("before", "x", &[]).await.status, 201);

    admin.batch_execute(&read_only(true)).await.unwrap();
    let started = std::time::Instant::now();
    let reason = loop {
        let (status, reason) = health.get_text("/healthz").await;
        // The cut connections may be what the first probes meet; then the reconnected pool
        // meets the read-only database.
        if status == 503 && reason.contains("read-only transaction") {
            break reason;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "not yet told: {status} {reason}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(reason.contains("cannot take a write"), "{reason}");
    gateway.client().post("during", "x", &[]).await.assert_problem(503, "store-unavailable");
    assert!(gateway.client().post("before", "x", &[]).await.is_replay(), "reads still replay");
    let second_start = std::process::Command::new(common::idem_bin())
        .args(["serve", "--upstream", &upstream.url(), "--store", &store])
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&second_start.stderr);
    assert!(!second_start.status.success(), "{stderr}");
    assert!(stderr.contains("cannot take a write"), "{stderr}");

    admin.batch_execute(&read_only(false)).await.unwrap();
    wait_healthy(&gateway, Duration::from_secs(20)).await;
    // pg_terminate_backend only signals: a pooled connection opened while the database was
    // read-only can outlive the call by a moment and refuse one more claim (seen once in CI
    // on a loaded machine). Such a refusal must still be a 503 that ran nothing.
    let started = std::time::Instant::now();
    loop {
        let reply = gateway.client().post("during", "x", &[]).await;
        if reply.status == 201 {
            break;
        }
        reply.assert_problem(503, "store-unavailable");
        assert!(started.elapsed() < Duration::from_secs(10), "healthy, yet keys still refused");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(upstream.calls(), 2, "nothing ran while the store could not record it");
    drop(gateway);
    admin.batch_execute(&format!("DROP DATABASE {database} WITH (FORCE)")).await.unwrap();
}
