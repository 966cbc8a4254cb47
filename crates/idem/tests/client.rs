//! `idem-client` against the real gateway: every logical call has one effect at the upstream,
//! through responses dropped on the wire, client timeouts, a first attempt still running, and
//! failing upstreams; refusals (`400`, `422`) are sent once; `502 outcome-unknown` stops at once.
//! Failures are real (a proxy that cuts connections after the request went through, slow and
//! failing upstreams, an upstream that breaks its connections), and the upstream counts runs.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::response::Response;
use common::{BreakingUpstream, Gateway, Upstream, calls_per_key, sqlite_store, unique};
use idem_client::{IdempotentCall, IdempotentRetry, outcome_unknown};
use reqwest::Method;
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};

/// A reqwest client that opens a connection per request (no idle pool), so the proxy's
/// connection count is the number of requests sent.
fn http_client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder().timeout(timeout).pool_max_idle_per_host(0).build().unwrap()
}

fn client(retry: IdempotentRetry, timeout: Duration) -> ClientWithMiddleware {
    ClientBuilder::new(http_client(timeout)).with(retry).build()
}

/// Fast backoff, so tests that are not about the delays do not wait for them.
fn quick() -> IdempotentRetry {
    IdempotentRetry::default()
        .base_delay(Duration::from_millis(5))
        .max_delay(Duration::from_millis(50))
        .max_retry_after(Duration::from_millis(250))
}

fn call_of(response: &reqwest::Response) -> IdempotentCall {
    response.extensions().get::<IdempotentCall>().cloned().expect("the middleware's extension")
}

fn is_replay(response: &reqwest::Response) -> bool {
    response.headers().get("idempotent-replayed").is_some_and(|value| value == "true")
}

/// A TCP proxy between the client and the gateway that counts connections (one request each,
/// see [`http_client`]) and, for a share of them, forwards the whole request but cuts the
/// connection at the first byte of the answer: the gateway ran the request, the client never
/// hears of it.
struct Proxy {
    addr: SocketAddr,
    connections: Arc<AtomicU64>,
    dropped: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(target: SocketAddr, drop_percent: u64) -> Self {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicU64::new(0));
        let dropped = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn({
            let connections = Arc::clone(&connections);
            let dropped = Arc::clone(&dropped);
            async move {
                loop {
                    let Ok((inbound, _)) = listener.accept().await else { continue };
                    connections.fetch_add(1, Ordering::SeqCst);
                    let cut = idem_core::FencingToken::generate().as_u64() % 100 < drop_percent;
                    let dropped = Arc::clone(&dropped);
                    tokio::spawn(async move {
                        let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                            return;
                        };
                        let (mut client_read, mut client_write) = inbound.into_split();
                        let (mut gateway_read, mut gateway_write) = outbound.into_split();
                        let upload = tokio::spawn(async move {
                            let _ = tokio::io::copy(&mut client_read, &mut gateway_write).await;
                            client_read
                        });
                        if cut {
                            // The gateway answers only after it has read the whole request.
                            let mut first = [0u8; 1];
                            if matches!(gateway_read.read(&mut first).await, Ok(1)) {
                                dropped.fetch_add(1, Ordering::SeqCst);
                            }
                            upload.abort();
                            return;
                        }
                        let _ = tokio::io::copy(&mut gateway_read, &mut client_write).await;
                        upload.abort();
                    });
                }
            }
        });
        Self { addr, connections, dropped, task }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An upstream that fails the first `x-fail-times` calls of each `x-call` id with
/// `x-fail-status` (default 503, with `Retry-After: x-retry-after` when given), then creates:
/// it counts calls and effects (successful creations) per call id.
#[derive(Clone, Default)]
struct Flaky {
    calls: Arc<Mutex<HashMap<String, u32>>>,
    effects: Arc<Mutex<HashMap<String, u32>>>,
    keys: Arc<Mutex<HashMap<String, Vec<Option<String>>>>>,
}

struct FlakyUpstream {
    addr: SocketAddr,
    state: Flaky,
    task: tokio::task::JoinHandle<()>,
}

impl FlakyUpstream {
    async fn start() -> Self {
        let state = Flaky::default();
        let app = axum::Router::new().fallback(flaky).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { addr, state, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn calls(&self, id: &str) -> u32 {
        self.state.calls.lock().unwrap().get(id).copied().unwrap_or(0)
    }

    fn effects(&self, id: &str) -> u32 {
        self.state.effects.lock().unwrap().get(id).copied().unwrap_or(0)
    }

    /// The Idempotency-Key of each call of `id`, in order.
    fn keys(&self, id: &str) -> Vec<Option<String>> {
        self.state.keys.lock().unwrap().get(id).cloned().unwrap_or_default()
    }
}

impl Drop for FlakyUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn flaky(State(state): State<Flaky>, request: Request) -> Response {
    let header = |name: &str| {
        request.headers().get(name).and_then(|value| value.to_str().ok()).map(str::to_owned)
    };
    let id = header("x-call").expect("x-call");
    let fail_times: u32 = header("x-fail-times").map_or(0, |n| n.parse().unwrap());
    let fail_status: u16 = header("x-fail-status").map_or(503, |s| s.parse().unwrap());
    let call = {
        let mut calls = state.calls.lock().unwrap();
        let count = calls.entry(id.clone()).or_insert(0);
        *count += 1;
        *count
    };
    state.keys.lock().unwrap().entry(id.clone()).or_default().push(header("idempotency-key"));
    let mut response = Response::builder();
    if call <= fail_times {
        if let Some(seconds) = header("x-retry-after") {
            response = response.header("retry-after", seconds);
        }
        return response.status(fail_status).body(format!("failure {call}").into()).unwrap();
    }
    *state.effects.lock().unwrap().entry(id.clone()).or_insert(0) += 1;
    response.status(201).body(format!("created {id} on call {call}").into()).unwrap()
}

/// The product's reason to exist, from the client's side: responses lost on the wire (the
/// proxy cuts 30% of connections after the gateway has the request) and the middleware
/// retrying under the same key. 100 logical calls, each gets a 201 in the end, and each ran
/// exactly once at the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_call_runs_once_through_dropped_responses() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), &sqlite_store(), &[]);
    let proxy = Proxy::start(gateway.addr, 30).await;
    let client = client(quick().max_attempts(12), Duration::from_secs(10));
    let run = unique("drop");
    let calls = 100;
    let semaphore = Arc::new(tokio::sync::Semaphore::new(10));
    let mut tasks = Vec::new();
    for index in 0..calls {
        let client = client.clone();
        let url = proxy.url("/orders");
        let semaphore = Arc::clone(&semaphore);
        let body = format!("{run}-order-{index}");
        tasks.push(tokio::spawn(async move {
            let _permit = semaphore.acquire().await.unwrap();
            let response = client.post(url).body(body.clone()).send().await.unwrap();
            let call = call_of(&response);
            let status = response.status().as_u16();
            let replay = is_replay(&response);
            let echoed: serde_json::Value =
                serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
            (body, call, status, replay, echoed)
        }));
    }
    let mut keys = HashMap::new();
    let mut retried = 0;
    let mut attempts = 0;
    for task in tasks {
        let (body, call, status, replay, echoed) = task.await.unwrap();
        assert_eq!(status, 201, "{body}: after {} attempt(s)", call.attempts());
        assert_eq!(echoed["body"], body, "the answer belongs to this call");
        // A retried call was cut after the gateway had it: its answer is the stored one.
        assert_eq!(replay, call.attempts() > 1, "{body}: {call:?}");
        retried += u64::from(call.attempts() > 1);
        attempts += u64::from(call.attempts());
        keys.insert(call.key().unwrap().to_owned(), body);
    }
    let dropped = proxy.dropped();
    let seen = calls_per_key(&upstream, "");
    println!(
        "{calls} calls: {attempts} attempts, {dropped} responses dropped, {retried} calls retried; upstream ran {} times",
        upstream.calls()
    );
    assert_eq!(keys.len(), calls, "one key per logical call");
    assert!(dropped >= 10, "the proxy cut too few responses to show anything: {dropped}");
    assert_eq!(attempts, proxy.connections(), "every attempt went through the proxy");
    // Each cut attempt was retried (a retry that met the first still being stored got a 409
    // and was retried once more).
    assert!(attempts >= calls as u64 + dropped, "{attempts} attempts, {dropped} cut");
    assert_eq!(upstream.calls(), calls as u64, "one run per logical call");
    for (key, body) in &keys {
        assert_eq!(seen.get(key), Some(&1), "{body} ran {:?} times", seen.get(key));
    }
}

/// A client timeout shorter than the upstream (the client gives up at 500 ms; the call takes
/// 1.2 s) and a gateway timeout shorter still (`--upstream-timeout 1s` against 1.5 s calls:
/// 504): the call goes on at the gateway, the retries get 409 until its answer is stored, then
/// the replay. Each of 20 calls per case ran once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_call_runs_once_when_the_upstream_is_slower_than_the_timeouts() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), &sqlite_store(), &["--upstream-timeout", "1s"]);
    let cases = [
        ("client-timeout", Duration::from_millis(500), "1200"),
        ("gateway-504", Duration::from_secs(10), "1500"),
    ];
    for (case, timeout, delay) in cases {
        let client = client(quick().max_attempts(20), timeout);
        let run = unique(case);
        let mut tasks = Vec::new();
        for index in 0..20 {
            let client = client.clone();
            let url = format!("http://{}/orders", gateway.addr);
            let body = format!("{run}-{index}");
            tasks.push(tokio::spawn(async move {
                let response = client
                    .post(url)
                    .header("x-test-delay-ms", delay)
                    .body(body.clone())
                    .send()
                    .await
                    .unwrap();
                let call = call_of(&response);
                (body, call, response.status().as_u16(), is_replay(&response))
            }));
        }
        let mut keys = Vec::new();
        for task in tasks {
            let (body, call, status, replay) = task.await.unwrap();
            assert_eq!(status, 201, "{case} {body}: {call:?}");
            assert!(
                replay && call.attempts() >= 2,
                "{case} {body}: the first attempt timed out, the answer is the replay: {call:?}"
            );
            keys.push(call.key().unwrap().to_owned());
        }
        let seen = calls_per_key(&upstream, "");
        for key in &keys {
            assert_eq!(seen.get(key), Some(&1), "{case}: {key} ran {:?} times", seen.get(key));
        }
        println!("{case}: 20 calls, each ran once");
    }
    assert_eq!(upstream.calls(), 40);
}

/// A retry that arrives while the first attempt is still running gets `409` with
/// `Retry-After`; the middleware waits that long (not its own millisecond backoff) and gets
/// the replay. With `prefer_wait`, the retry carries `Prefer: wait=N` and the gateway holds it
/// until the first attempt's answer (`Preference-Applied` says so).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_call_in_flight_is_waited_for_then_replayed() {
    // Retry-After is the lease left: a 2 s lease keeps it at 1 or 2 s.
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), &sqlite_store(), &["--lease", "2s"]);
    let proxy = Proxy::start(gateway.addr, 0).await;
    let key = unique("in-flight");
    let first = tokio::spawn({
        let client = gateway.client();
        let key = key.clone();
        async move { client.post(&key, "one order", &[("x-test-delay-ms", "2500")]).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let retry = IdempotentRetry::default()
        .max_attempts(10)
        .base_delay(Duration::from_millis(1))
        .max_delay(Duration::from_millis(5));
    let started = Instant::now();
    let response = client(retry, Duration::from_secs(10))
        .post(proxy.url("/orders"))
        .header("idempotency-key", &key)
        .body("one order")
        .send()
        .await
        .unwrap();
    let elapsed = started.elapsed();
    let call = call_of(&response);
    assert_eq!(response.status(), 201);
    assert!(is_replay(&response), "the first attempt's answer");
    assert_eq!(call.key(), Some(key.as_str()));
    assert!(call.attempts() >= 2, "it met the first attempt in flight: {call:?}");
    assert_eq!(proxy.connections(), u64::from(call.attempts()));
    // Each 409 said Retry-After: 1 at least; a 5 ms backoff would have been done in no time.
    let waited = Duration::from_secs(u64::from(call.attempts() - 1));
    assert!(elapsed >= waited, "Retry-After not honoured: {elapsed:?} for {call:?}");
    assert_eq!(first.await.unwrap().status, 201);
    assert_eq!(upstream.calls(), 1);
    println!("409 honoured: {} attempts in {elapsed:?}", call.attempts());

    // Prefer: wait. A 30 s lease: its Retry-After (about 30 s) is capped to 50 ms, and the
    // retry's Prefer makes the gateway wait for the answer instead of a second 409.
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), &sqlite_store(), &[]);
    let key = unique("prefer-wait");
    let first = tokio::spawn({
        let client = gateway.client();
        let key = key.clone();
        async move { client.post(&key, "one order", &[("x-test-delay-ms", "1500")]).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let retry =
        quick().max_retry_after(Duration::from_millis(50)).prefer_wait(Duration::from_secs(10));
    let response = client(retry, Duration::from_secs(20))
        .post(format!("http://{}/orders", gateway.addr))
        .header("idempotency-key", &key)
        .body("one order")
        .send()
        .await
        .unwrap();
    let call = call_of(&response);
    assert_eq!(response.status(), 201);
    assert!(is_replay(&response));
    assert_eq!(call.attempts(), 2, "a 409, then one retry that waited");
    assert_eq!(
        response.headers().get("preference-applied").and_then(|v| v.to_str().ok()),
        Some("wait=10")
    );
    assert_eq!(first.await.unwrap().status, 201);
    assert_eq!(upstream.calls(), 1);
}

/// Refusals are sent once: an invalid key (`400`), a key reused with another body (`422`) and
/// the service's own `400` each reached the gateway exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refusals_are_not_retried() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), &sqlite_store(), &[]);
    let proxy = Proxy::start(gateway.addr, 0).await;
    let client = client(quick(), Duration::from_secs(10));
    let url = proxy.url("/orders");

    let response =
        client.post(&url).header("idempotency-key", "not a key").body("x").send().await.unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(call_of(&response).attempts(), 1);
    assert_eq!(proxy.connections(), 1, "400 sent once");
    assert_eq!(upstream.calls(), 0);

    let key = unique("mismatch");
    let response =
        client.post(&url).header("idempotency-key", &key).body("qty=1").send().await.unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(proxy.connections(), 2);
    let response =
        client.post(&url).header("idempotency-key", &key).body("qty=5").send().await.unwrap();
    assert_eq!(response.status(), 422);
    assert_eq!(call_of(&response).attempts(), 1);
    assert_eq!(proxy.connections(), 3, "422 sent once");
    assert_eq!(upstream.calls(), 1);

    let response =
        client.post(&url).header("x-test-status", "400").body("bad").send().await.unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(proxy.connections(), 4, "the service's own 400 sent once");
    assert_eq!(upstream.calls(), 2);
}

/// `503` three times, then `201`: four attempts under one key, one effect; sent again, the
/// call replays. `429` with `Retry-After: 1` waits the second. An upstream that always fails
/// gets `max_attempts` sends, and one that keeps failing within `max_elapsed` is given up in
/// time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failures_are_retried_with_backoff_within_bounds() {
    let upstream = FlakyUpstream::start().await;
    let gateway = Gateway::start(&upstream.url(), &sqlite_store(), &[]);
    let url = format!("http://{}/orders", gateway.addr);

    let client = client(quick().max_attempts(5), Duration::from_secs(10));
    let id = unique("flaky-503");
    let send = || client.post(&url).header("x-call", &id).header("x-fail-times", "3").body("x");
    let response = send().send().await.unwrap();
    let call = call_of(&response);
    assert_eq!(response.status(), 201);
    assert_eq!(call.attempts(), 4, "three 503s, then the 201");
    assert_eq!(upstream.calls(&id), 4);
    assert_eq!(upstream.effects(&id), 1);
    let keys = upstream.keys(&id);
    assert!(keys.iter().all(|key| key.is_some() && *key == keys[0]), "one key: {keys:?}");
    assert_eq!(call.key(), keys[0].as_deref());
    // The same logical call again, with its key: the stored 201.
    let again = send().header("idempotency-key", call.key().unwrap()).send().await.unwrap();
    assert_eq!(again.status(), 201);
    assert!(is_replay(&again));
    assert_eq!((upstream.calls(&id), upstream.effects(&id)), (4, 1));

    // 429 with Retry-After: 1, and a backoff of 5 ms at most otherwise.
    let id = unique("flaky-429");
    let started = Instant::now();
    let response = client
        .post(&url)
        .header("x-call", &id)
        .header("x-fail-times", "1")
        .header("x-fail-status", "429")
        .header("x-retry-after", "1")
        .body("x")
        .send()
        .await
        .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(response.status(), 201);
    assert_eq!(call_of(&response).attempts(), 2);
    assert!(
        elapsed >= Duration::from_millis(240),
        "capped Retry-After (250 ms) honoured: {elapsed:?}"
    );
    let patient =
        self::client(quick().max_retry_after(Duration::from_secs(10)), Duration::from_secs(10));
    let id = unique("flaky-429-1s");
    let started = Instant::now();
    let response = patient
        .post(&url)
        .header("x-call", &id)
        .header("x-fail-times", "1")
        .header("x-fail-status", "429")
        .header("x-retry-after", "1")
        .body("x")
        .send()
        .await
        .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(response.status(), 201);
    assert!(elapsed >= Duration::from_secs(1), "Retry-After: 1 honoured: {elapsed:?}");
    assert_eq!((upstream.calls(&id), upstream.effects(&id)), (2, 1));

    // Always failing: max_attempts sends, then the last 503 as it was.
    let client3 = self::client(quick().max_attempts(3), Duration::from_secs(10));
    let id = unique("always-503");
    let response = client3
        .post(&url)
        .header("x-call", &id)
        .header("x-fail-times", "1000")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(call_of(&response).attempts(), 3);
    assert_eq!(response.text().await.unwrap(), "failure 3", "the last answer, whole");
    assert_eq!((upstream.calls(&id), upstream.effects(&id)), (3, 0));

    // Many attempts allowed, but 400 ms in all: given up by time, well short of 100.
    let bounded = self::client(
        IdempotentRetry::default()
            .max_attempts(100)
            .base_delay(Duration::from_millis(50))
            .max_delay(Duration::from_millis(100))
            .max_elapsed(Duration::from_millis(400)),
        Duration::from_secs(10),
    );
    let id = unique("always-503-timed");
    let started = Instant::now();
    let response = bounded
        .post(&url)
        .header("x-call", &id)
        .header("x-fail-times", "1000")
        .body("x")
        .send()
        .await
        .unwrap();
    let elapsed = started.elapsed();
    let attempts = call_of(&response).attempts();
    assert_eq!(response.status(), 503);
    assert!((2..100).contains(&attempts), "{attempts} attempts");
    assert_eq!(upstream.calls(&id), attempts);
    assert!(elapsed < Duration::from_secs(3), "max_elapsed bounds the call: {elapsed:?}");
    println!("given up by time after {attempts} attempts in {elapsed:?}");

    // A body that cannot be cloned (a stream) is sent once, whatever the answer.
    let id = unique("stream");
    let body = reqwest::Body::wrap(http_body_util::Full::new(bytes::Bytes::from_static(b"x")));
    let response = client
        .post(&url)
        .header("x-call", &id)
        .header("x-fail-times", "1000")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(call_of(&response).attempts(), 1);
    assert_eq!(upstream.calls(&id), 1);
}

/// The gateway's `502 outcome-unknown` (the upstream took the request and broke the
/// connection) ends the call at once with an `OutcomeUnknown` error, no retries spent, and
/// again (replayed) when the same key is sent later; the upstream ran once. A `502` from an
/// unreachable upstream (nothing ran) is retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unknown_outcome_stops_at_once_and_an_unreachable_upstream_is_retried() {
    let breaking = BreakingUpstream::start().await;
    let gateway = Gateway::start(&breaking.url(), &sqlite_store(), &[]);
    let proxy = Proxy::start(gateway.addr, 0).await;
    let client = client(quick().max_attempts(5), Duration::from_secs(10));
    let error = client.post(proxy.url("/payments")).body("pay 10").send().await.unwrap_err();
    let unknown = outcome_unknown(&error).unwrap_or_else(|| panic!("not OutcomeUnknown: {error}"));
    assert_eq!(unknown.attempts, 1);
    assert!(!unknown.replayed);
    assert!(uuid::Uuid::parse_str(&unknown.key).is_ok(), "{}", unknown.key);
    assert!(!unknown.detail.is_empty());
    assert!(error.to_string().contains(&unknown.key), "{error}");
    assert_eq!(proxy.connections(), 1, "no retry spent");
    assert_eq!(breaking.calls(), 1);
    // The same call again under its key: the held answer, still no second run.
    let key = unknown.key.clone();
    let error = client
        .post(proxy.url("/payments"))
        .header("idempotency-key", &key)
        .body("pay 10")
        .send()
        .await
        .unwrap_err();
    let unknown = outcome_unknown(&error).expect("OutcomeUnknown");
    assert!(unknown.replayed);
    assert_eq!(unknown.key, key);
    assert_eq!(proxy.connections(), 2);
    assert_eq!(breaking.calls(), 1);

    // Nothing listens here: the gateway answers 502 upstream-unreachable, and nothing ran.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let gateway = Gateway::start(&dead, &sqlite_store(), &[]);
    let proxy = Proxy::start(gateway.addr, 0).await;
    let response = self::client(quick().max_attempts(3), Duration::from_secs(10))
        .post(proxy.url("/payments"))
        .body("pay 10")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    assert_eq!(call_of(&response).attempts(), 3);
    assert_eq!(proxy.connections(), 3);
    let problem: serde_json::Value =
        serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(problem["type"], "urn:idem:problem:upstream-unreachable", "the body, whole");
}

/// The caller's key is kept; a request without one gets a UUID v7, reused on its retries and
/// shown on the response; `GET` gets neither a key nor a retry, unless retrying it is asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_are_kept_or_made_and_get_is_left_alone() {
    let upstream = FlakyUpstream::start().await;
    let gateway = Gateway::start(&upstream.url(), &sqlite_store(), &[]);
    let url = format!("http://{}/orders", gateway.addr);
    let client = client(quick(), Duration::from_secs(10));

    let id = unique("own-key");
    let own = unique("caller-key");
    let response = client
        .post(&url)
        .header("idempotency-key", &own)
        .header("x-call", &id)
        .header("x-fail-times", "1")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(call_of(&response).key(), Some(own.as_str()));
    assert_eq!(upstream.keys(&id), [Some(own.clone()), Some(own.clone())]);

    let id = unique("made-key");
    let response = client
        .patch(&url)
        .header("x-call", &id)
        .header("x-fail-times", "2")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let call = call_of(&response);
    let key = call.key().unwrap().to_owned();
    let uuid = uuid::Uuid::parse_str(&key).unwrap();
    assert_eq!(uuid.get_version_num(), 7, "{key}");
    assert_eq!(upstream.keys(&id), vec![Some(key.clone()); 3], "the same key on every retry");

    // GET: no key, no retry, no extension (the middleware stays out of it).
    let id = unique("get");
    let response =
        client.get(&url).header("x-call", &id).header("x-fail-times", "1").send().await.unwrap();
    assert_eq!(response.status(), 503);
    assert!(response.extensions().get::<IdempotentCall>().is_none());
    assert_eq!(upstream.keys(&id), [None]);

    // Asked to: GET is retried, still without a key.
    let retrying = self::client(quick().retry_unkeyed([Method::GET]), Duration::from_secs(10));
    let id = unique("get-retried");
    let response =
        retrying.get(&url).header("x-call", &id).header("x-fail-times", "1").send().await.unwrap();
    assert_eq!(response.status(), 201);
    let call = call_of(&response);
    assert_eq!((call.key(), call.attempts()), (None, 2));
    assert_eq!(upstream.keys(&id), [None, None]);
}
