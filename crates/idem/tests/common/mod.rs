//! Test harness: a counting upstream on loopback, the real `idem` binary as a child process,
//! and a small HTTP client.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body as AxumBody, to_bytes};
use axum::extract::{Request, State};
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// What the upstream saw of one call.
#[derive(Debug, Clone)]
pub struct SeenCall {
    pub method: String,
    pub path: String,
    pub idempotency_key: Option<String>,
    pub body: Bytes,
}

#[derive(Default)]
struct UpstreamState {
    calls: AtomicU64,
    seen: Mutex<Vec<SeenCall>>,
}

/// An HTTP service that counts its calls. Each request steers the response with headers:
/// `x-test-delay-ms` (wait first), `x-test-status` (status code), `x-test-body-bytes` (send a
/// body of that many bytes instead of the JSON echo).
pub struct Upstream {
    pub addr: SocketAddr,
    state: Arc<UpstreamState>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub async fn start() -> Self {
        let state = Arc::new(UpstreamState::default());
        let app = axum::Router::new().fallback(handle).with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { addr, state, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many requests reached the upstream: the effect count.
    pub fn calls(&self) -> u64 {
        self.state.calls.load(Ordering::SeqCst)
    }

    pub fn seen(&self) -> Vec<SeenCall> {
        self.state.seen.lock().unwrap().clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(State(state): State<Arc<UpstreamState>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = to_bytes(body, usize::MAX).await.unwrap();
    let header =
        |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let call = state.calls.fetch_add(1, Ordering::SeqCst) + 1;
    state.seen.lock().unwrap().push(SeenCall {
        method: parts.method.to_string(),
        path: parts.uri.path_and_query().map(|pq| pq.to_string()).unwrap_or_default(),
        idempotency_key: header("idempotency-key"),
        body: body.clone(),
    });
    if let Some(delay) = header("x-test-delay-ms") {
        tokio::time::sleep(Duration::from_millis(delay.parse().unwrap())).await;
    }
    let status = header("x-test-status").map_or(201, |s| s.parse().unwrap());
    let response_body = match header("x-test-body-bytes") {
        Some(len) => Bytes::from(pattern(len.parse().unwrap())),
        None if header("x-test-stall-ms").is_some() => {
            let stall = Duration::from_millis(header("x-test-stall-ms").unwrap().parse().unwrap());
            return Response::builder()
                .status(status)
                .body(AxumBody::new(Stalling {
                    parts: vec![
                        Bytes::from_static(b"after the stall"),
                        Bytes::from_static(b"before the stall "),
                    ],
                    sleep: Box::pin(tokio::time::sleep(stall)),
                }))
                .unwrap();
        }
        None => Bytes::from(
            serde_json::json!({
                "call": call,
                "path": parts.uri.path_and_query().map(|pq| pq.to_string()),
                "body": String::from_utf8_lossy(&body),
            })
            .to_string(),
        ),
    };
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-upstream-call", call.to_string())
        .header("set-cookie", "a=1")
        .header("set-cookie", "b=2")
        .header("connection", "x-hop")
        .header("x-hop", "per-connection")
        .body(AxumBody::from(response_body))
        .unwrap()
}

/// A body that sends its first part at once and the second only after a stall.
struct Stalling {
    /// Parts still to send, last first.
    parts: Vec<Bytes>,
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl http_body::Body for Stalling {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        use std::future::Future;
        if self.parts.len() == 1 && self.sleep.as_mut().poll(cx).is_pending() {
            return std::task::Poll::Pending;
        }
        std::task::Poll::Ready(self.parts.pop().map(|part| Ok(http_body::Frame::data(part))))
    }
}

/// A body that is not one repeated byte, so truncation would show.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// The `idem` binary, running as a child process.
pub struct Gateway {
    child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
}

impl Gateway {
    /// Starts `idem serve` on free loopback ports and waits for its readiness line.
    pub fn start(upstream: &str, store: &str, extra: &[&str]) -> Self {
        Self::start_with_env(upstream, store, extra, &[])
    }

    pub fn start_with_env(
        upstream: &str,
        store: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let mut command = Command::new(idem_bin());
        command.args(["serve", "--upstream", upstream, "--store", store]);
        // Free ports, unless the caller names its own (a gateway restarted behind a balancer).
        if !extra.iter().any(|arg| *arg == "--listen" || arg.starts_with("--listen=")) {
            command.args(["--listen", "127.0.0.1:0"]);
        }
        command
            .args(["--admin-listen", "127.0.0.1:0"])
            .args(extra)
            .env("IDEM_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = command.spawn().expect("start the idem binary");
        let stdout = child.stdout.take().unwrap();
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = sender.send(line);
            }
            // Keep draining so the child never blocks on a full pipe.
            for _ in lines {}
        });
        let line = match receiver.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!("idem did not report readiness within 30s (exit: {:?})", child.try_wait());
            }
        };
        // "idem listening on http://A (admin http://B) -> upstream"
        let addr = between(&line, "listening on http://", " ").parse().unwrap();
        let admin = between(&line, "(admin http://", ")").parse().unwrap();
        Self { child, addr, admin }
    }

    pub fn client(&self) -> TestClient {
        TestClient::new(self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no cleanup of any kind runs.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then waits for the process to exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let status =
            Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(status.success(), "kill -TERM failed");
        for _ in 0..600 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("idem did not exit within 30s of SIGTERM");
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn between<'a>(text: &'a str, start: &str, end: &str) -> &'a str {
    let from =
        text.find(start).unwrap_or_else(|| panic!("{start:?} not in {text:?}")) + start.len();
    let rest = &text[from..];
    &rest[..rest.find(end).unwrap_or(rest.len())]
}

/// A fresh directory for a test's database files.
/// The `idem` binary the tests drive: `IDEM_TEST_BIN` when set (`scripts/test.sh` sets it to
/// the release build, what users run), else the debug build cargo made for these tests.
pub fn idem_bin() -> PathBuf {
    match std::env::var_os("IDEM_TEST_BIN") {
        Some(path) if !path.is_empty() => {
            let path = PathBuf::from(path);
            assert!(path.exists(), "IDEM_TEST_BIN={} does not exist", path.display());
            path
        }
        _ => PathBuf::from(env!("CARGO_BIN_EXE_idem")),
    }
}

pub fn temp_dir() -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let dir = std::env::temp_dir().join(format!(
        "idem-it-{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A SQLite store URL in a fresh directory.
pub fn sqlite_store() -> String {
    format!("sqlite://{}", temp_dir().join("idem.db").display())
}

#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| {
            panic!("not JSON ({}): {:?}", self.status, String::from_utf8_lossy(&self.body))
        })
    }

    pub fn is_replay(&self) -> bool {
        self.header("idempotent-replayed") == Some("true")
    }

    /// Asserts an RFC 9457 problem response of `status` whose type ends in `slug`.
    pub fn assert_problem(&self, status: u16, slug: &str) {
        assert_eq!(self.status.as_u16(), status, "body: {:?}", String::from_utf8_lossy(&self.body));
        assert_eq!(self.header("content-type"), Some("application/problem+json"));
        let problem = self.json();
        assert_eq!(problem["type"], format!("urn:idem:problem:{slug}"), "{problem}");
        assert_eq!(problem["status"], status);
        assert!(problem["title"].as_str().is_some_and(|t| !t.is_empty()), "{problem}");
        assert!(problem["detail"].as_str().is_some_and(|d| !d.is_empty()), "{problem}");
    }
}

#[derive(Clone)]
pub struct TestClient {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
}

impl TestClient {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
            base: format!("http://{addr}"),
        }
    }

    pub async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Reply {
        let mut request = http::Request::builder()
            .method(Method::from_bytes(method.as_bytes()).unwrap())
            .uri(format!("{}{path}", self.base));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response =
            self.client.request(request.body(Full::new(body.into())).unwrap()).await.unwrap();
        let (parts, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        Reply { status: parts.status, headers: parts.headers, body }
    }

    /// POST with an Idempotency-Key and any extra headers.
    pub async fn post(&self, key: &str, body: &str, headers: &[(&str, &str)]) -> Reply {
        let mut all = vec![("idempotency-key", key)];
        all.extend_from_slice(headers);
        self.send("POST", "/orders", &all, body.to_owned()).await
    }

    pub async fn get_text(&self, path: &str) -> (StatusCode, String) {
        let reply = self.send("GET", path, &[], Bytes::new()).await;
        (reply.status, String::from_utf8_lossy(&reply.body).into_owned())
    }
}

/// Parses a Prometheus text page into `name{labels}` -> value.
pub fn metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// A random suffix, so that keys in a shared store never collide across runs.
pub fn unique(name: &str) -> String {
    format!("{name}-{:016x}", idem_core::FencingToken::generate().as_u64())
}

/// A TCP forwarder between a client and a server that a test can cut: every open connection
/// is dropped and new ones are refused until it is restored. A real network failure, without
/// touching the server other tests may share.
pub struct Cutter {
    pub addr: SocketAddr,
    cut: Arc<std::sync::atomic::AtomicBool>,
    connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Cutter {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let task = tokio::spawn({
            let cut = Arc::clone(&cut);
            let connections = Arc::clone(&connections);
            async move {
                loop {
                    let Ok((mut inbound, _)) = listener.accept().await else { continue };
                    if cut.load(Ordering::SeqCst) {
                        drop(inbound);
                        continue;
                    }
                    let forward = tokio::spawn(async move {
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    connections.lock().unwrap().push(forward.abort_handle());
                }
            }
        });
        Self { addr, cut, connections, task }
    }

    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Cutter {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

/// Calls per idempotency key the upstream saw, for keys with the given prefix.
pub fn calls_per_key(upstream: &Upstream, prefix: &str) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for call in upstream.seen() {
        if let Some(key) = call.idempotency_key.filter(|key| key.starts_with(prefix)) {
            *counts.entry(key).or_insert(0) += 1;
        }
    }
    counts
}

/// Waits until the gateway's /healthz answers 200 (its store is reachable again).
pub async fn wait_healthy(gateway: &Gateway, within: Duration) {
    let admin = TestClient::new(gateway.admin);
    let started = std::time::Instant::now();
    loop {
        let (status, body) = admin.get_text("/healthz").await;
        if status == StatusCode::OK {
            return;
        }
        assert!(
            started.elapsed() < within,
            "the gateway did not become healthy within {within:?}; /healthz said {status}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A Redis server of this test's own, persisting every write (AOF, fsync always) in `dir`.
pub struct PrivateRedis {
    child: Child,
}

impl PrivateRedis {
    pub fn start(port: u16, dir: &std::path::Path) -> Option<Self> {
        let spawned = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "yes", "--appendfsync", "always", "--daemonize", "no"])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(error) if std::env::var("IDEM_REQUIRE_SERVICES").as_deref() == Ok("1") => {
                panic!("cannot start redis-server: {error}")
            }
            Err(error) => {
                idem_core::conformance::skip(&format!("cannot start redis-server ({error})"));
                return None;
            }
        };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(Self { child });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("redis-server did not listen on {port}");
    }

    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An upstream that reads each request whole, counts it, then closes the connection without
/// answering: the request reached it (and may have run), and its response is lost.
pub struct BreakingUpstream {
    pub addr: SocketAddr,
    calls: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl BreakingUpstream {
    pub async fn start() -> Self {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn({
            let calls = Arc::clone(&calls);
            async move {
                loop {
                    let Ok((mut stream, _)) = listener.accept().await else { continue };
                    let calls = Arc::clone(&calls);
                    tokio::spawn(async move {
                        let mut seen = Vec::new();
                        let mut buffer = [0u8; 4096];
                        loop {
                            let Ok(read) = stream.read(&mut buffer).await else { return };
                            if read == 0 {
                                return;
                            }
                            seen.extend_from_slice(&buffer[..read]);
                            if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                                let head = String::from_utf8_lossy(&seen[..end]).to_lowercase();
                                let length = head
                                    .lines()
                                    .find_map(|line| line.strip_prefix("content-length:"))
                                    .map_or(0, |value| value.trim().parse().unwrap_or(0));
                                if seen.len() >= end + 4 + length {
                                    break;
                                }
                            }
                        }
                        calls.fetch_add(1, Ordering::SeqCst);
                        drop(stream);
                    });
                }
            }
        });
        Self { addr, calls, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Drop for BreakingUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs a command that is expected to exit by itself (`idem serve` refusing a setting), and
/// kills it and fails the test if it is still running after 20 s: a gateway that wrongly
/// started would otherwise hang the test instead of failing it.
pub fn exits_within_20s(command: &mut Command) -> std::process::Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the command");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!(
                "still running after 20 s (it should have refused to start): {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// A free loopback port (bound, then released for a server to take).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Runs `idem keys --store STORE ARGS...`: exit code, stdout, stderr.
pub fn idem_keys(store: &str, args: &[&str]) -> (i32, String, String) {
    let output = Command::new(idem_bin())
        .args(["keys", "--store", store])
        .args(args)
        .output()
        .expect("run idem keys");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Runs `idem outbox --database DATABASE --json ARGS...`: whether it exited 0, and its JSON.
pub fn outbox_cli(database: &str, args: &[&str]) -> (bool, serde_json::Value) {
    let output = Command::new(idem_bin())
        .args(["outbox", "--database", database, "--json"])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    let value = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("{args:?}: {text} {}", String::from_utf8_lossy(&output.stderr)));
    (output.status.success(), value)
}
