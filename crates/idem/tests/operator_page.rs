//! The operator page at the admin listener's `/`, driven in headless Chromium (Debian's
//! `chromium` and `chromium-driver`) over WebDriver: it loads behind the admin token, shows a
//! call stuck in flight and a key held with an unknown outcome, and releases the held key after
//! a confirmation, after which a retry of that key runs again. Also the API's access rules.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use common::{Gateway, TestClient, Upstream, temp_dir, unique};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

const TOKEN: &str = "test-admin-token-0123456789";

/// A WebDriver session on a chromedriver of the test's own.
struct Browser {
    driver: Child,
    /// Chromium's profile directory, of this test's own: also how its processes are found.
    profile: std::path::PathBuf,
    base: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    async fn start() -> Option<Self> {
        let (driver_bin, chromium) = ("/usr/bin/chromedriver", "/usr/bin/chromium");
        if !std::path::Path::new(driver_bin).exists() || !std::path::Path::new(chromium).exists() {
            idem_core::conformance::skip(
                "operator page: chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)",
            );
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let profile = temp_dir().join("chromium");
        let driver = Command::new(driver_bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let mut browser = Self {
            driver,
            profile: profile.clone(),
            base: format!("http://127.0.0.1:{port}"),
            client: Client::builder(TokioExecutor::new()).build_http(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while browser.call("GET", "/status", None).await.is_none() {
            assert!(Instant::now() < deadline, "chromedriver did not answer within 20 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let capabilities = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1280,1000",
                         format!("--user-data-dir={}", profile.display())],
            },
        }}});
        let session = browser.call("POST", "/session", Some(capabilities)).await.unwrap();
        let id = session["value"]["sessionId"].as_str().expect("a session id").to_owned();
        browser.base = format!("{}/session/{id}", browser.base);
        Some(browser)
    }

    /// One WebDriver command: its JSON answer, or `None` if the driver is not there yet.
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Option<Value> {
        let request = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.map(|b| b.to_string()).unwrap_or_default())))
            .unwrap();
        let response = self.client.request(request).await.ok()?;
        let body = response.into_body().collect().await.ok()?.to_bytes();
        serde_json::from_slice(&body).ok()
    }

    async fn command(&self, method: &str, path: &str, body: Value) -> Value {
        let answer = self.call(method, path, Some(body)).await.expect("chromedriver answered");
        assert!(answer["value"]["error"].is_null(), "{method} {path}: {answer}");
        answer["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.command("POST", "/url", json!({ "url": url })).await;
    }

    /// The first element matching `css`, if any.
    async fn find(&self, css: &str) -> Option<String> {
        let answer = self
            .call("POST", "/element", Some(json!({ "using": "css selector", "value": css })))
            .await?;
        answer["value"][ELEMENT].as_str().map(str::to_owned)
    }

    /// Waits up to `within` for an element matching `css` whose text contains `text`.
    async fn wait_for(&self, css: &str, text: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        let mut last = String::new();
        loop {
            if let Some(element) = self.find(css).await {
                last = self.text(&element).await;
                if last.contains(text) {
                    return element;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no {css:?} with {text:?} within {within:?}; last text {last:?}; page: {}",
                self.text_of("body").await
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn text(&self, element: &str) -> String {
        let answer = self.call("GET", &format!("/element/{element}/text"), None).await;
        answer.and_then(|a| a["value"].as_str().map(str::to_owned)).unwrap_or_default()
    }

    async fn text_of(&self, css: &str) -> String {
        match self.find(css).await {
            Some(element) => self.text(&element).await,
            None => String::new(),
        }
    }

    async fn click(&self, element: &str) {
        self.command("POST", &format!("/element/{element}/click"), json!({})).await;
    }

    async fn screenshot(&self) -> Vec<u8> {
        let answer = self.call("GET", "/screenshot", None).await.expect("a screenshot");
        let data = answer["value"].as_str().expect("base64 PNG");
        base64::engine::general_purpose::STANDARD.decode(data).unwrap()
    }
}

impl Drop for Browser {
    /// Stops chromedriver and the Chromium it started (which a killed chromedriver would leave
    /// running), found by the profile directory that is this test's alone.
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        // No leading dashes: pkill would read the pattern as an option.
        let profile = format!("user-data-dir={}", self.profile.display());
        let _ = Command::new("pkill").args(["-KILL", "-f", &profile]).status();
    }
}

/// An upstream that answers `/slow...` after 15 s and hangs up on anything else once it has
/// read the request (that call's outcome is unknown). Counts the requests it read.
struct SlowOrBreaking {
    addr: std::net::SocketAddr,
    calls: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl SlowOrBreaking {
    async fn start() -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = std::sync::Arc::clone(&calls);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else { continue };
                let calls = std::sync::Arc::clone(&counted);
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    let mut buffer = [0u8; 4096];
                    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(read) => seen.extend_from_slice(&buffer[..read]),
                        }
                    }
                    calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if seen.starts_with(b"POST /slow") {
                        tokio::time::sleep(Duration::from_secs(15)).await;
                        let _ = stream
                            .write_all(b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok")
                            .await;
                    }
                });
            }
        });
        Self { addr, calls, task }
    }

    fn calls(&self) -> u64 {
        self.calls.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for SlowOrBreaking {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An RFC 9457 problem of the admin API with this status.
fn assert_problem_status(reply: &common::Reply, status: u16) {
    assert_eq!(reply.status.as_u16(), status, "{:?}", String::from_utf8_lossy(&reply.body));
    assert_eq!(reply.header("content-type"), Some("application/problem+json"));
    assert_eq!(reply.json()["status"], status);
    assert!(reply.json()["detail"].as_str().is_some_and(|detail| !detail.is_empty()));
}

async fn admin_get(gateway: &Gateway, path: &str, headers: &[(&str, &str)]) -> common::Reply {
    TestClient::new(gateway.admin).send("GET", path, headers, Bytes::new()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_operator_page_shows_a_stuck_key_and_releases_a_held_one() {
    let Some(browser) = Browser::start().await else { return };
    let store = format!("sqlite://{}", temp_dir().join("idem.db").display());
    let upstream = SlowOrBreaking::start().await;
    let bearer = format!("Bearer {TOKEN}");
    let gateway = Gateway::start(
        &format!("http://{}", upstream.addr),
        &store,
        &["--admin-token", TOKEN, "--stuck-after", "1s", "--upstream-timeout", "1s"],
    );
    let client = gateway.client();
    // A call that runs on after its client's 504: in flight, and stuck after a second.
    let stuck_key = unique("stuck");
    let reply =
        client.send("POST", "/slow", &[("idempotency-key", stuck_key.as_str())], "slow").await;
    reply.assert_problem(504, "upstream-timeout");
    // A call whose upstream hung up: held with an unknown outcome.
    let held_key = unique("held");
    client.post(&held_key, "x", &[]).await.assert_problem(502, "outcome-unknown");
    let breaking = &upstream;
    assert_eq!(breaking.calls(), 2);

    // The API: the token is needed (but not for /healthz), actions need the admin header.
    assert_eq!(admin_get(&gateway, "/healthz", &[]).await.status, 200);
    let refused = admin_get(&gateway, "/api/overview", &[]).await;
    assert_eq!(refused.status, 401);
    assert_eq!(refused.header("content-type"), Some("application/problem+json"));
    assert_eq!(admin_get(&gateway, "/metrics", &[]).await.status, 401);
    let wrong = admin_get(&gateway, "/api/overview", &[("authorization", "Bearer nope")]).await;
    assert_eq!(wrong.status, 401);
    let admin = TestClient::new(gateway.admin);
    let forged = admin
        .send(
            "POST",
            "/api/keys/release",
            &[("authorization", &bearer), ("content-type", "application/json")],
            json!({ "scope": "-", "key": held_key }).to_string(),
        )
        .await;
    assert_eq!(forged.status, 403, "an action without x-idem-admin is refused");
    let not_json = admin
        .send(
            "POST",
            "/api/keys/release",
            &[("authorization", &bearer), ("x-idem-admin", "1")],
            "scope=-",
        )
        .await;
    assert_problem_status(&not_json, 415);
    assert_problem_status(
        &admin_get(&gateway, "/nowhere", &[("authorization", &bearer)]).await,
        404,
    );

    // The page, through the token trade: /?token= sets the cookie and sends the browser on.
    let admin_url = format!("http://127.0.0.1:{}", gateway.admin.port());
    browser.goto(&format!("{admin_url}/?token={TOKEN}")).await;
    let held_row = format!("#held-rows tr[data-key={held_key:?}]");
    browser.wait_for(&held_row, "connection-broke", Duration::from_secs(15)).await;
    let stuck_row = format!("#in-flight-rows tr[data-key={stuck_key:?}]");
    browser.wait_for(&stuck_row, "stuck", Duration::from_secs(15)).await;
    browser.wait_for("#store-health", "healthy", Duration::from_secs(10)).await;
    // Rates need two samples of the counters, 5 s apart: then the runs row has figures.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let runs = browser.text_of("#rates-rows tr").await;
        if runs.starts_with("runs") && !runs.contains('–') {
            break;
        }
        assert!(Instant::now() < deadline, "the rates never filled in: {runs:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(!browser.text_of("body").await.contains(TOKEN), "the token is not on the page");
    let cookies = browser.command("GET", "/cookie", json!({})).await;
    assert!(cookies.to_string().contains("idem_admin"), "{cookies}");
    assert!(
        !cookies.to_string().contains(TOKEN),
        "the cookie holds a session value, not the token"
    );

    let shot = browser.screenshot().await;
    assert_eq!(&shot[..8], b"\x89PNG\r\n\x1a\n", "a PNG screenshot");
    let path = std::env::var("IDEM_SCREENSHOT")
        .unwrap_or_else(|_| temp_dir().join("operator-page.png").display().to_string());
    std::fs::write(&path, &shot).unwrap();
    println!("operator page screenshot: {path} ({} bytes)", shot.len());

    // Release, confirmed: the first click only asks.
    let button =
        browser.wait_for(&format!("{held_row} button"), "Release", Duration::from_secs(5)).await;
    browser.click(&button).await;
    assert_eq!(breaking.calls(), 2, "asking to release changes nothing yet");
    let record = admin_get(&gateway, "/api/overview", &[("authorization", &bearer)]).await;
    assert!(record.json()["held"].to_string().contains(&held_key), "still held before confirming");
    let confirm = browser
        .wait_for(&format!("{held_row} button.confirm"), "Confirm", Duration::from_secs(5))
        .await;
    browser.click(&confirm).await;
    browser.wait_for("#message", "released", Duration::from_secs(10)).await;

    // Released for real: the row is gone, and a retry of the key runs again.
    let deadline = Instant::now() + Duration::from_secs(10);
    while browser.find(&held_row).await.is_some() {
        assert!(Instant::now() < deadline, "the released key's row stayed on the page");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    client.post(&held_key, "x", &[]).await.assert_problem(502, "outcome-unknown");
    assert_eq!(breaking.calls(), 3, "after the release, the retry ran again");

    // The gauges alerts watch, sampled every 5 s: the stuck call shows within a sample.
    let deadline = Instant::now() + Duration::from_secs(12);
    loop {
        let page = admin_get(&gateway, "/metrics", &[("authorization", &bearer)]).await;
        let metrics = common::metrics(&String::from_utf8_lossy(&page.body));
        let stuck = metrics.get("idem_keys_stuck").copied().unwrap_or_default();
        let oldest = metrics.get("idem_oldest_in_flight_seconds").copied().unwrap_or_default();
        if stuck >= 1.0 && oldest >= 1.0 {
            assert_eq!(metrics.get("idem_keys_in_flight"), Some(&1.0), "{metrics:?}");
            assert!(metrics.contains_key("idem_keys_outcome_unknown"));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "idem_keys_stuck never counted the stuck call: {metrics:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Without a token the admin listener refuses to bind beyond loopback, and on loopback it
/// answers only requests that name a loopback host (no DNS rebinding from a web page).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_listener_without_a_token_stays_on_loopback() {
    let output = common::exits_within_20s(
        Command::new(common::idem_bin())
            .args(["serve", "--upstream", "http://127.0.0.1:1", "--store", "memory://"])
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "0.0.0.0:0"]),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("--admin-token"), "{stderr}");

    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), "memory://", &[]);
    assert_eq!(admin_get(&gateway, "/api/overview", &[]).await.status, 200);
    let rebound = admin_get(&gateway, "/api/overview", &[("host", "attacker.example")]).await;
    assert_eq!(rebound.status, 403);
    assert_eq!(admin_get(&gateway, "/healthz", &[("host", "attacker.example")]).await.status, 200);
}

/// The dead letters of an application's consumers on the page (`--dead-letters-database`),
/// and requeueing one after a confirmation (`--dead-letters-broker`): it goes back on the
/// broker with its own message id, key and headers, and leaves the dead letters.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_operator_page_requeues_a_dead_letter() {
    use async_nats::jetstream::{self, stream};
    let Some(nats) = idem_core::conformance::service_url("IDEM_TEST_NATS_URL") else { return };
    let Some(database) =
        idem_core::conformance::fresh_postgres_schema("idem_operator_dead_letters").await
    else {
        return;
    };
    let Some(browser) = Browser::start().await else { return };
    let (mut client, connection) =
        tokio_postgres::connect(&database, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    idem_stream::postgres::Inbox::migrate(&mut client).await.unwrap();
    let jetstream = jetstream::new(async_nats::connect(&nats).await.unwrap());
    let pid = std::process::id();
    let (stream_name, subject) =
        (format!("IDEMTEST_PAGE_DL_{pid}"), format!("idemtest.pagedl.{pid}"));
    let _ = jetstream.delete_stream(&stream_name).await;
    let mut stream = jetstream
        .create_stream(stream::Config {
            name: stream_name.clone(),
            subjects: vec![subject.clone()],
            ..Default::default()
        })
        .await
        .unwrap();
    // What a consumer buries after its last attempt (see idem_stream::postgres::DeadLetters).
    let id: i64 = client
        .query_one(
            "INSERT INTO idem_dead_letters (consumer, message_id, subject, payload, headers, attempts, failure)
             VALUES ('billing', 'idem-outbox-4242', $1, 'invoice 7', $2, 5, 'no such customer') RETURNING id",
            // As JetStream delivered it: its Nats-Msg-Id among the headers (the requeue sets
            // its own, once).
            &[
                &subject,
                &vec!["Nats-Msg-Id", "idem-outbox-4242", "Idem-Key", "customer-9", "Idem-Seq", "3", "x-tenant", "acme"],
            ],
        )
        .await
        .unwrap()
        .get(0);

    let store = format!("sqlite://{}", temp_dir().join("idem.db").display());
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(
        &upstream.url(),
        &store,
        &[
            "--admin-token",
            TOKEN,
            "--dead-letters-database",
            &database,
            "--dead-letters-broker",
            &nats,
        ],
    );
    let bearer = format!("Bearer {TOKEN}");
    let listed = admin_get(&gateway, "/api/dead-letters", &[("authorization", &bearer)]).await;
    assert_eq!(listed.status, 200, "{:?}", String::from_utf8_lossy(&listed.body));
    let listed = listed.json();
    assert_eq!(listed["consumers"][0]["consumer"], "billing");
    assert_eq!(listed["consumers"][0]["count"], 1);
    assert_eq!(listed["dead_letters"][0]["message_id"], "idem-outbox-4242");
    assert_eq!(listed["requeue"], true);
    let missing = TestClient::new(gateway.admin)
        .send(
            "POST",
            "/api/dead-letters/requeue",
            &[
                ("authorization", &bearer),
                ("x-idem-admin", "1"),
                ("content-type", "application/json"),
            ],
            json!({ "id": id + 1000 }).to_string(),
        )
        .await;
    assert_problem_status(&missing, 404);

    let admin_url = format!("http://127.0.0.1:{}", gateway.admin.port());
    browser.goto(&format!("{admin_url}/?token={TOKEN}")).await;
    let letter_row = format!("#dead-letters-rows tr[data-id=\"{id}\"]");
    browser.wait_for(&letter_row, "no such customer", Duration::from_secs(15)).await;
    assert!(browser.text_of(&letter_row).await.contains("idem-outbox-4242"));
    let button =
        browser.wait_for(&format!("{letter_row} button"), "Requeue", Duration::from_secs(5)).await;
    browser.click(&button).await;
    assert_eq!(stream.info().await.unwrap().state.messages, 0, "asking publishes nothing yet");
    let confirm = browser
        .wait_for(&format!("{letter_row} button.confirm"), "Confirm", Duration::from_secs(5))
        .await;
    browser.click(&confirm).await;
    browser.wait_for("#message", "is back on", Duration::from_secs(15)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while browser.find(&letter_row).await.is_some() {
        assert!(Instant::now() < deadline, "the requeued dead letter's row stayed on the page");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // On the broker once, as the relay had published it; gone from the dead letters.
    assert_eq!(stream.info().await.unwrap().state.messages, 1);
    let message = stream.get_raw_message(1).await.unwrap();
    assert_eq!(message.subject.as_str(), subject);
    assert_eq!(message.payload.as_ref(), b"invoice 7");
    let headers = message.headers;
    let ids: Vec<_> = headers.get_all("Nats-Msg-Id").map(|v| v.as_str().to_owned()).collect();
    assert_eq!(ids, ["idem-outbox-4242"], "one message id");
    assert_eq!(headers.get("Idem-Key").map(|v| v.as_str()), Some("customer-9"));
    assert_eq!(headers.get("Idem-Seq").map(|v| v.as_str()), Some("3"));
    assert_eq!(headers.get("x-tenant").map(|v| v.as_str()), Some("acme"));
    let left: i64 =
        client.query_one("SELECT count(*) FROM idem_dead_letters", &[]).await.unwrap().get(0);
    assert_eq!(left, 0);
    let _ = jetstream.delete_stream(&stream_name).await;
}
