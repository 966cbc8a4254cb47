//! Every line of the HTTP contract in PRODUCT.md, checked against the real `idem` binary in
//! front of a real upstream on loopback. The upstream counts its calls: that count is the
//! effect count each test asserts.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{Gateway, Upstream, pattern, sqlite_store};
use tokio::io::AsyncWriteExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_replays_the_stored_response_byte_for_byte() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), &sqlite_store(), &[]);
    let client = gateway.client();

    let caller = [("authorization", "Bearer caller-1")];
    let first = client.post("order-1", r#"{"sku":"A1"}"#, &caller).await;
    assert_eq!(first.status, 201);
    assert!(!first.is_replay());
    let retry = client.post("order-1", r#"{"sku":"A1"}"#, &caller).await;
    assert!(retry.is_replay());
    assert_eq!(retry.status, first.status);
    assert_eq!(retry.body, first.body);
    for name in ["content-type", "x-upstream-call", "date"] {
        assert_eq!(retry.headers.get(name), first.headers.get(name), "{name}");
    }
    let cookies = |reply: &common::Reply| {
        reply
            .headers
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(cookies(&retry), vec!["a=1", "b=2"], "repeated headers keep their order");
    // Hop-by-hop headers describe one connection: neither forwarded nor stored.
    assert_eq!(first.header("x-hop"), None);
    assert_eq!(retry.header("x-hop"), None);
    // The quoted structured-field form names the same key.
    let quoted = client.post("\"order-1\"", r#"{"sku":"A1"}"#, &caller).await;
    assert!(quoted.is_replay());
    assert_eq!(quoted.body, first.body);

    assert_eq!(upstream.calls(), 1, "the upstream ran once for three requests");
    let seen = upstream.seen();
    assert_eq!(
        seen[0].idempotency_key.as_deref(),
        Some("order-1"),
        "the key is forwarded upstream"
    );
    assert_eq!(seen[0].body, Bytes::from_static(br#"{"sku":"A1"}"#));
    assert_eq!(seen[0].path, "/orders");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_keys_get_400_and_nothing_runs() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), "memory://", &[]);
    let client = gateway.client();
    let too_long = "k".repeat(256);
    for key in ["", "   ", "a b", "\"unterminated", "\"\"", too_long.as_str()] {
        client.post(key, "{}", &[]).await.assert_problem(400, "invalid-key");
    }
    let two = client
        .send("POST", "/orders", &[("idempotency-key", "a"), ("idempotency-key", "b")], "{}")
        .await;
    two.assert_problem(400, "multiple-keys");
    // A raw non-ASCII byte in the key.
    let raw = raw_request(gateway.addr, b"POST /orders HTTP/1.1\r\nhost: x\r\nidempotency-key: caf\xc3\xa9\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}").await;
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
    assert_eq!(upstream.calls(), 0);

    let longest = "k".repeat(255);
    assert_eq!(client.post(&longest, "{}", &[]).await.status, 201);
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_key_or_of_other_methods_pass_through() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), "memory://", &[]);
    let client = gateway.client();
    for _ in 0..2 {
        assert_eq!(client.send("POST", "/orders", &[], "{}").await.status, 201);
        let get = client.send("GET", "/orders?id=1", &[("idempotency-key", "g")], "").await;
        assert!(!get.is_replay());
    }
    let put = client.send("PUT", "/orders/1", &[("idempotency-key", "p")], "{}").await;
    assert_eq!(put.status, 201);
    assert_eq!(upstream.calls(), 5, "no key, GET and PUT all pass through each time");
    assert_eq!(upstream.seen()[1].path, "/orders?id=1", "path and query are forwarded");

    // --require-key (here from the environment) refuses keyless POSTs; --methods adds PUT.
    let strict = Gateway::start_with_env(
        &upstream.url(),
        "memory://",
        &["--methods", "POST,PUT"],
        &[("IDEM_REQUIRE_KEY", "true")],
    );
    let client = strict.client();
    client.send("POST", "/orders", &[], "{}").await.assert_problem(400, "missing-key");
    client.send("PUT", "/orders/1", &[], "{}").await.assert_problem(400, "missing-key");
    assert_eq!(
        client.send("PATCH", "/orders/1", &[], "{}").await.status,
        201,
        "PATCH is no longer handled"
    );
    let calls = upstream.calls();
    client.send("PUT", "/orders/1", &[("idempotency-key", "p")], "{}").await;
    assert!(client.send("PUT", "/orders/1", &[("idempotency-key", "p")], "{}").await.is_replay());
    assert_eq!(upstream.calls(), calls + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_different_payload_gets_422_and_the_original_still_replays() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), &sqlite_store(), &[]);
    let client = gateway.client();

    // While the first request is still running, a different payload is refused with 422.
    let slow = {
        let client = client.clone();
        tokio::spawn(
            async move { client.post("k", "original", &[("x-test-delay-ms", "800")]).await },
        )
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    client.post("k", "different", &[]).await.assert_problem(422, "key-mismatch");
    let first = slow.await.unwrap();
    assert_eq!(first.status, 201);

    client.post("k", "different", &[]).await.assert_problem(422, "key-mismatch");
    let other_query =
        client.send("POST", "/orders?x=1", &[("idempotency-key", "k")], "original").await;
    other_query.assert_problem(422, "key-mismatch");
    let replay = client.post("k", "original", &[]).await;
    assert!(replay.is_replay());
    assert_eq!(replay.body, first.body);
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_identical_requests_run_the_upstream_once() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), &sqlite_store(), &[]);
    let client = gateway.client();
    let racers: Vec<_> = (0..24)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(
                async move { client.post("race", "same", &[("x-test-delay-ms", "500")]).await },
            )
        })
        .collect();
    let (mut created, mut conflicts) = (0, 0);
    for racer in racers {
        let reply = racer.await.unwrap();
        match reply.status.as_u16() {
            201 => created += 1,
            409 => {
                reply.assert_problem(409, "request-in-flight");
                let retry_after: u64 = reply.header("retry-after").unwrap().parse().unwrap();
                assert!((1..=30).contains(&retry_after), "Retry-After {retry_after}");
                conflicts += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(created + conflicts, 24);
    assert!(created >= 1);
    assert_eq!(upstream.calls(), 1, "24 racing requests ran the upstream once");
    assert!(client.post("race", "same", &[]).await.is_replay());
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_and_try_again_statuses_release_the_key() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), "memory://", &[]);
    let client = gateway.client();
    for status in ["500", "503", "408", "409", "425", "429"] {
        let key = format!("status-{status}");
        let first = client.post(&key, "x", &[("x-test-status", status)]).await;
        assert_eq!(first.status.as_str(), status);
        let retry = client.post(&key, "x", &[("x-test-status", "201")]).await;
        assert_eq!(retry.status, 201, "after {status} the retry runs again");
        assert!(!retry.is_replay());
    }
    assert_eq!(upstream.calls(), 12);
    // A completed 4xx is an outcome like any other: stored and replayed.
    client.post("status-404", "x", &[("x-test-status", "404")]).await;
    let replay = client.post("status-404", "x", &[("x-test-status", "201")]).await;
    assert_eq!(replay.status, 404);
    assert!(replay.is_replay());
    assert_eq!(upstream.calls(), 13);

    // An unreachable upstream: 502, and the key is free again (a second try is not a 409).
    let port = free_port();
    let dead = Gateway::start(&format!("http://127.0.0.1:{port}"), "memory://", &[]);
    dead.client().post("unreachable", "x", &[]).await.assert_problem(502, "upstream-unreachable");
    dead.client().post("unreachable", "x", &[]).await.assert_problem(502, "upstream-unreachable");

    // A slow upstream past --upstream-timeout: 504 to the client, but the call goes on and
    // its outcome is stored: the retry gets 409 while it runs, then the replay.
    let impatient = Gateway::start(
        &upstream.url(),
        "memory://",
        &["--upstream-timeout", "300ms", "--upstream-abandon-after", "1500ms"],
    );
    let client = impatient.client();
    let calls = upstream.calls();
    client
        .post("slow", "x", &[("x-test-delay-ms", "500")])
        .await
        .assert_problem(504, "upstream-timeout");
    client.post("slow", "x", &[]).await.assert_problem(409, "request-in-flight");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let replay = client.post("slow", "x", &[]).await;
    assert_eq!(replay.status, 201);
    assert!(replay.is_replay(), "the retry after a timeout gets the first run's outcome");
    assert_eq!(upstream.calls(), calls + 1);
    // Headers on time, then a body that stalls past the hard cap: the upstream ran, and what
    // it answered is not known whole, so the key is held as an unknown outcome.
    client
        .post("stall", "x", &[("x-test-stall-ms", "4000")])
        .await
        .assert_problem(504, "upstream-timeout");
    tokio::time::sleep(Duration::from_millis(1_700)).await;
    let held = client.post("stall", "x", &[]).await;
    held.assert_problem(502, "outcome-unknown");
    assert!(held.is_replay(), "held, never run again");
    assert_eq!(upstream.calls(), calls + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_gets_the_replay_on_retry() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), &sqlite_store(), &[]);
    // Send the request, then hang up before the (slow) upstream answers.
    let mut stream = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    stream
        .write_all(b"POST /orders HTTP/1.1\r\nhost: x\r\nidempotency-key: lost\r\nx-test-delay-ms: 700\r\ncontent-length: 4\r\n\r\nbody")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(stream);

    let client = gateway.client();
    let mut replay = None;
    for _ in 0..50 {
        let reply = client.post("lost", "body", &[]).await;
        if reply.status == 409 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        replay = Some(reply);
        break;
    }
    let replay = replay.expect("the retry got a replay within 5s");
    assert!(replay.is_replay(), "the lost response is replayed: {:?}", replay.status);
    assert_eq!(replay.status, 201);
    assert_eq!(replay.json()["call"], 1);
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limits() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(
        &upstream.url(),
        &sqlite_store(),
        &["--max-request-body", "1KiB", "--max-stored-body", "64KiB"],
    );
    let client = gateway.client();
    let big = "x".repeat(1025);
    client.post("big-request", &big, &[]).await.assert_problem(413, "body-too-large");
    // Without a Content-Length (chunked), the limit holds while reading.
    let mut request = b"POST /orders HTTP/1.1\r\nhost: x\r\nidempotency-key: chunked\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n".to_vec();
    for _ in 0..2 {
        request.extend_from_slice(b"200\r\n");
        request.extend_from_slice(&[b'x'; 0x200]);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"1\r\nx\r\n0\r\n\r\n");
    let chunked = raw_request(gateway.addr, &request).await;
    assert!(chunked.starts_with("HTTP/1.1 413"), "{chunked}");
    assert_eq!(upstream.calls(), 0, "nothing runs for an oversized request");

    // A 200 KiB response streams through whole, and is stored without its body.
    let size = 200 * 1024;
    let header_value = size.to_string();
    let first = client.post("big-response", "x", &[("x-test-body-bytes", &header_value)]).await;
    assert_eq!(first.status, 201);
    assert_eq!(first.body, Bytes::from(pattern(size)), "the first response is untouched");
    let replay = client.post("big-response", "x", &[("x-test-body-bytes", &header_value)]).await;
    assert!(replay.is_replay());
    assert_eq!(replay.status, 201);
    assert_eq!(replay.header("idempotent-replay"), Some("body-omitted, cookies-omitted"));
    assert_eq!(replay.header("x-upstream-call"), first.header("x-upstream-call"));
    assert!(replay.body.is_empty());
    assert_eq!(replay.header("content-length"), Some("0"));
    assert_eq!(upstream.calls(), 1, "an oversized response never runs a second time");

    // Just under the limit is stored whole.
    let fits = (64 * 1024).to_string();
    let caller = ("authorization", "Bearer fits");
    let first = client.post("fits", "x", &[("x-test-body-bytes", &fits), caller]).await;
    let replay = client.post("fits", "x", &[("x-test-body-bytes", &fits), caller]).await;
    assert!(replay.is_replay());
    assert_eq!(replay.body, first.body);
    assert_eq!(replay.header("idempotent-replay"), None, "nothing omitted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_scoped_by_caller() {
    let upstream = Upstream::start().await;
    let db = common::temp_dir().join("idem.db");
    let gateway = Gateway::start(&upstream.url(), &format!("sqlite://{}", db.display()), &[]);
    let client = gateway.client();
    let alice = client.post("shared-key", "x", &[("authorization", "Bearer alice")]).await;
    let bob = client.post("shared-key", "x", &[("authorization", "Bearer bob")]).await;
    assert!(!bob.is_replay(), "bob never receives alice's response");
    assert_ne!(alice.body, bob.body);
    assert_eq!(upstream.calls(), 2);
    let alice_again = client.post("shared-key", "x", &[("authorization", "Bearer alice")]).await;
    assert!(alice_again.is_replay());
    assert_eq!(alice_again.body, alice.body);
    let anonymous = client.post("shared-key", "x", &[]).await;
    assert!(!anonymous.is_replay());
    assert_eq!(upstream.calls(), 3);

    // The credential never reaches the store: only its hash does.
    let mut stored = std::fs::read(&db).unwrap();
    stored.extend(std::fs::read(db.with_extension("db-wal")).unwrap_or_default());
    assert!(stored.windows(10).any(|w| w == b"shared-key"), "the store file holds the records");
    assert!(!stored.windows(5).any(|w| w == b"alice"), "the raw Authorization value is not stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_expire_after_the_ttl() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), &sqlite_store(), &["--ttl", "1s"]);
    let client = gateway.client();
    client.post("ttl", "x", &[]).await;
    assert!(client.post("ttl", "x", &[]).await.is_replay());
    tokio::time::sleep(Duration::from_millis(1300)).await;
    // Expired: the key is new again, even with a different payload.
    let fresh = client.post("ttl", "y", &[]).await;
    assert_eq!(fresh.status, 201);
    assert!(!fresh.is_replay());
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upstream_keeps_its_lease_and_runs_once() {
    let upstream = Upstream::start().await;
    // A 1 s lease against a 3 s upstream call: only renewal keeps the key.
    let gateway = Gateway::start(&upstream.url(), &sqlite_store(), &["--lease", "1s"]);
    let client = gateway.client();
    let slow = {
        let client = client.clone();
        tokio::spawn(async move { client.post("slow", "x", &[("x-test-delay-ms", "3000")]).await })
    };
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        let duplicate = client.post("slow", "x", &[]).await;
        duplicate.assert_problem(409, "request-in-flight");
        assert_eq!(duplicate.header("retry-after"), Some("1"));
    }
    assert_eq!(slow.await.unwrap().status, 201);
    assert!(client.post("slow", "x", &[]).await.is_replay());
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_listener_serves_health_and_metrics() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), &sqlite_store(), &[]);
    let client = gateway.client();
    client.post("m", "x", &[]).await;
    client.post("m", "x", &[]).await;
    client.post("m", "y", &[]).await;
    client.send("POST", "/orders", &[], "x").await;
    let admin = common::TestClient::new(gateway.admin);
    let (status, body) = admin.get_text("/healthz").await;
    assert_eq!((status.as_u16(), body.as_str()), (200, "ok\n"));
    let (status, text) = admin.get_text("/metrics").await;
    assert_eq!(status, 200);
    let metrics = common::metrics(&text);
    assert_eq!(metrics.get("idem_executions_total"), Some(&1.0), "{text}");
    assert_eq!(metrics.get("idem_replays_total"), Some(&1.0));
    assert_eq!(metrics.get("idem_mismatches_total"), Some(&1.0));
    assert_eq!(metrics.get("idem_passthrough_total"), Some(&1.0));
    assert!(
        metrics.get("idem_store_duration_seconds_count{op=\"claim\"}").is_some_and(|n| *n >= 3.0),
        "{text}"
    );
    assert!(
        metrics
            .get("idem_store_duration_seconds_count{op=\"complete\"}")
            .is_some_and(|n| *n >= 1.0)
    );
    assert!(!text.contains("Bearer"), "no secret is ever exposed");
}

async fn raw_request(addr: std::net::SocketAddr, request: &[u8]) -> String {
    use tokio::io::AsyncReadExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response)).await;
    String::from_utf8_lossy(&response).into_owned()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_headers_join_the_fingerprint_and_a_base_path_is_kept() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(
        &format!("{}/api/v1/", upstream.url()),
        "memory://",
        &["--fingerprint-headers", "content-type", "--scope-header", "x-tenant"],
    );
    let client = gateway.client();
    let json = [("content-type", "application/json"), ("x-tenant", "acme")];
    let first = client.post("fp", "{}", &json).await;
    assert_eq!(first.status, 201);
    assert_eq!(upstream.seen()[0].path, "/api/v1/orders", "the upstream's path prefix is kept");
    // The same body under another content type is a different request.
    let text = [("content-type", "text/plain"), ("x-tenant", "acme")];
    client.post("fp", "{}", &text).await.assert_problem(422, "key-mismatch");
    assert!(client.post("fp", "{}", &json).await.is_replay());
    // Scoped by x-tenant now, not by Authorization.
    let other_tenant = client
        .post("fp", "{}", &[("content-type", "application/json"), ("x-tenant", "globex")])
        .await;
    assert!(!other_tenant.is_replay());
    let same_tenant_new_auth = client
        .post(
            "fp",
            "{}",
            &[
                ("content-type", "application/json"),
                ("x-tenant", "acme"),
                ("authorization", "Bearer z"),
            ],
        )
        .await;
    assert!(same_tenant_new_auth.is_replay());
    assert_eq!(upstream.calls(), 2);
}

/// No caller receives another's stored response or cookies: callers without a credential share
/// one scope, so a response that sets cookies (a login) is stored without them; callers told
/// apart only by a cookie get scopes of their own; with `cookie:NAME`, other cookies may change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_caller_receives_another_callers_cookies_or_response() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), &sqlite_store(), &[]);
    let client = gateway.client();
    let cookies = |reply: &common::Reply| reply.headers.get_all("set-cookie").iter().count();

    // Two anonymous callers, one key: the login-style response's cookies reach the first only.
    let first = client.post("login", "user=a", &[]).await;
    assert_eq!((first.status.as_u16(), cookies(&first)), (201, 2), "the first gets its cookies");
    let other = client.post("login", "user=a", &[]).await;
    assert!(other.is_replay());
    assert_eq!(cookies(&other), 0, "a stored Set-Cookie never reaches another caller");
    assert_eq!(other.header("idempotent-replay"), Some("cookies-omitted"));
    assert_eq!(upstream.calls(), 1);

    // Two users told apart only by their session cookie: one scope each.
    let alice = [("cookie", "sid=alice")];
    let bob = [("cookie", "sid=bob")];
    let for_alice = client.post("cart", "x", &alice).await;
    let for_bob = client.post("cart", "x", &bob).await;
    assert!(!for_bob.is_replay(), "bob never receives alice's response");
    assert_ne!(for_alice.json()["call"], for_bob.json()["call"]);
    let again = client.post("cart", "x", &alice).await;
    assert!(again.is_replay());
    assert_eq!(again.body, for_alice.body);
    assert_eq!(cookies(&again), 2, "a caller with a credential gets its own cookies back");
    assert_eq!(upstream.calls(), 3);

    // --scope-header cookie:sid: the session cookie alone names the caller.
    let by_session =
        Gateway::start(&upstream.url(), &sqlite_store(), &["--scope-header", "cookie:sid"]);
    let client = by_session.client();
    let first = client.post("pay", "x", &[("cookie", "sid=carol; theme=dark")]).await;
    let retry = client.post("pay", "x", &[("cookie", "theme=light; sid=carol")]).await;
    assert!(retry.is_replay(), "another cookie changed, the session did not");
    assert_eq!(retry.body, first.body);
    let stranger = client.post("pay", "x", &[("cookie", "theme=light; sid=dave")]).await;
    assert!(!stranger.is_replay());
    // Another cookie with non-ASCII bytes does not hide the session cookie.
    let accented = client.post("pay", "x", &[("cookie", "name=Andr\u{e9}; sid=carol")]).await;
    assert!(accented.is_replay(), "still carol's scope");
    assert_eq!(upstream.calls(), 5);
}
