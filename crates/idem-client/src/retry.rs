//! The middleware: a key on every mutating request, and retries under that key.
//!
//! ```no_run
//! use std::time::Duration;
//! use idem_client::IdempotentRetry;
//! use reqwest_middleware::ClientBuilder;
//!
//! # async fn run() -> Result<(), reqwest_middleware::Error> {
//! let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
//! let client = ClientBuilder::new(http)
//!     .with(IdempotentRetry::default().max_attempts(5).max_elapsed(Duration::from_secs(60)))
//!     .build();
//! let response = client.post("http://127.0.0.1:8080/orders").body(r#"{"sku":"A1"}"#).send().await?;
//! # Ok(()) }
//! ```

use std::fmt;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{Extensions, HeaderName, HeaderValue, Method, StatusCode, header};
use reqwest::{Request, Response, ResponseBuilderExt};
use reqwest_middleware::{Middleware, Next, Result};

use crate::OutcomeUnknown;
use crate::backoff::{full_jitter, parse_retry_after, random_unit};

/// The `Idempotency-Key` request header.
pub static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

static PREFER: HeaderName = HeaderName::from_static("prefer");

/// The most attempts a call may be given (`max_attempts` is clamped to it).
pub const MAX_ATTEMPTS_LIMIT: u32 = 100;

/// The longest `Prefer: wait=N` the middleware sends (the gateway caps it again, with its own
/// `--max-wait`).
pub const MAX_PREFER_WAIT: Duration = Duration::from_secs(300);

/// The largest `502` problem body read to tell `outcome-unknown` from a retryable `502`; the
/// gateway's problems are a few hundred bytes.
const MAX_PROBLEM_BYTES: u64 = 64 * 1024;

const OUTCOME_UNKNOWN_TYPE: &str = "urn:idem:problem:outcome-unknown";

/// A fresh idempotency key: a UUID v7 (time-ordered, 74 random bits), as the middleware puts on
/// requests that have none. Make one yourself when the key must outlive the process (store it
/// with the order, and a retry after a restart finds the first attempt's outcome).
pub fn new_key() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// What the middleware did for the call that produced a response, in the response's
/// extensions: `response.extensions().get::<IdempotentCall>()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotentCall {
    key: Option<String>,
    attempts: u32,
}

impl IdempotentCall {
    /// The `Idempotency-Key` the call was sent with (the caller's own, or the one the
    /// middleware made); `None` for a method outside the keyed set.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// How many times the request was sent, the last included (1 when it was not retried).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }
}

/// A [`reqwest_middleware::Middleware`] that makes every logical call have one effect, for
/// APIs behind an idem gateway (or any server that honours `Idempotency-Key` the same way).
///
/// For a method in the keyed set (default `POST`, `PATCH`), it puts a fresh key (UUID v7) in
/// `Idempotency-Key` unless the caller set one, and sends every retry of the call with that
/// same key, so the server runs it at most once and replays its answer to the retries.
///
/// Retried, with the same key: timeouts, connection failures (including a connection that
/// broke before the response: the lost-response case), `409` with `Retry-After` (the first
/// attempt is still running), `429`, and `5xx` except `501`, `505` and the gateway's
/// `502 outcome-unknown`. `Retry-After` (seconds or an HTTP-date) is honoured, up to
/// [`max_retry_after`](Self::max_retry_after); without it the delay is exponential backoff
/// with full jitter. Every other status is returned at once, `400` and `422` above all: the
/// same request would get the same refusal.
///
/// `502 outcome-unknown` becomes an [`OutcomeUnknown`] error at once (see there why).
///
/// Limits: at most [`max_attempts`](Self::max_attempts) sends (default 5) and no retry that
/// would start after [`max_elapsed`](Self::max_elapsed) (default 30 s) from the first send;
/// each attempt is bounded by the reqwest client's own timeout (set one). A request whose
/// body cannot be cloned (a stream) is sent once and never retried. When the attempts run
/// out, the last response (or error) is returned as it was.
///
/// Methods outside the keyed set pass through untouched: no key, no retry, unless named in
/// [`retry_unkeyed`](Self::retry_unkeyed) (for `GET` and other requests that are safe to
/// repeat without a key).
#[derive(Debug, Clone)]
pub struct IdempotentRetry {
    methods: Vec<Method>,
    unkeyed_methods: Vec<Method>,
    max_attempts: u32,
    base_delay: Duration,
    max_delay: Duration,
    max_elapsed: Duration,
    max_retry_after: Duration,
    prefer_wait: Option<Duration>,
}

impl Default for IdempotentRetry {
    fn default() -> Self {
        Self {
            methods: vec![Method::POST, Method::PATCH],
            unkeyed_methods: Vec::new(),
            max_attempts: 5,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
            max_elapsed: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(10),
            prefer_wait: None,
        }
    }
}

impl IdempotentRetry {
    /// The defaults: `POST` and `PATCH` keyed, 5 attempts, backoff from 100 ms up to 5 s, 30 s
    /// in all, `Retry-After` followed up to 10 s.
    pub fn new() -> Self {
        Self::default()
    }

    /// The methods that get a key and are retried (default `POST`, `PATCH`; the gateway's
    /// default set). Match the gateway's `--methods`.
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.methods = methods.into_iter().collect();
        self
    }

    /// Methods outside the keyed set that are retried anyway, without a key (default none).
    /// Only for requests that are safe to repeat on their own, such as `GET`: a retry of
    /// these can run again on the server.
    pub fn retry_unkeyed(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.unkeyed_methods = methods.into_iter().collect();
        self
    }

    /// The most sends of one call, the first included (default 5); clamped to
    /// `1..=`[`MAX_ATTEMPTS_LIMIT`]. `1` turns retrying off and keeps the key.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.clamp(1, MAX_ATTEMPTS_LIMIT);
        self
    }

    /// The backoff's first ceiling (default 100 ms): retry `n` waits a random time up to
    /// `base_delay * 2^(n-1)`, capped by [`max_delay`](Self::max_delay).
    pub fn base_delay(mut self, delay: Duration) -> Self {
        self.base_delay = delay;
        self
    }

    /// The backoff's largest ceiling (default 5 s).
    pub fn max_delay(mut self, delay: Duration) -> Self {
        self.max_delay = delay;
        self
    }

    /// No retry starts later than this after the first send (default 30 s); the last answer
    /// is returned instead.
    pub fn max_elapsed(mut self, elapsed: Duration) -> Self {
        self.max_elapsed = elapsed;
        self
    }

    /// The longest `Retry-After` followed (default 10 s); a longer one waits this long.
    pub fn max_retry_after(mut self, delay: Duration) -> Self {
        self.max_retry_after = delay;
        self
    }

    /// Send `Prefer: wait=N` (whole seconds, rounded up, at most [`MAX_PREFER_WAIT`]) on every
    /// retry of a keyed call: a gateway that finds the first attempt still running waits up to
    /// N seconds for its answer instead of answering `409`. The reqwest client's timeout must
    /// be longer than N. Off by default (`409` then waits out its `Retry-After`).
    pub fn prefer_wait(mut self, wait: Duration) -> Self {
        let seconds = wait.min(MAX_PREFER_WAIT).as_secs_f64().ceil().max(1.0);
        self.prefer_wait = Some(Duration::from_secs(seconds as u64));
        self
    }

    fn wants(&self, method: &Method) -> Option<bool> {
        if self.methods.contains(method) {
            Some(true)
        } else if self.unkeyed_methods.contains(method) {
            Some(false)
        } else {
            None
        }
    }
}

/// Why an attempt is retried (the `reason` of the retry's event).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    Timeout,
    Connect,
    ConnectionBroken,
    Status(StatusCode),
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Timeout => f.write_str("timeout"),
            Self::Connect => f.write_str("connection failed"),
            Self::ConnectionBroken => f.write_str("connection broke before the response"),
            Self::Status(status) if *status == StatusCode::CONFLICT => f.write_str("409 in flight"),
            Self::Status(status) => write!(f, "{}", status.as_u16()),
        }
    }
}

/// What one answer means for the call.
enum Verdict {
    Final(Response),
    Retry {
        reason: Reason,
        retry_after: Option<Duration>,
        response: Response,
    },
    Unknown(OutcomeUnknown),
    /// The body of a `502` could not be read: as a broken connection.
    Broken(reqwest::Error),
}

#[async_trait::async_trait]
impl Middleware for IdempotentRetry {
    async fn handle(
        &self,
        mut request: Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> Result<Response> {
        let Some(keyed) = self.wants(request.method()) else {
            return next.run(request, extensions).await;
        };
        let key = keyed.then(|| ensure_key(&mut request));
        let key_text = key.clone().unwrap_or_default();
        let method = request.method().clone();
        let path = request.url().path().to_owned();
        let started = Instant::now();
        let mut attempt = 1;
        loop {
            let spare = (attempt < self.max_attempts).then(|| request.try_clone()).flatten();
            if attempt == 1 && spare.is_none() && self.max_attempts > 1 {
                tracing::debug!(key = %key_text, %method, %path, "the body is a stream: sent once, never retried");
            }
            let call = IdempotentCall { key: key.clone(), attempts: attempt };
            let (reason, retry_after, last) = match next.clone().run(request, extensions).await {
                Ok(response) => match self.judge(response, &call).await {
                    Verdict::Final(response) => return Ok(with_call(response, call)),
                    Verdict::Unknown(unknown) => {
                        tracing::warn!(key = %key_text, %method, %path, attempt, "outcome unknown (502 outcome-unknown): not retried; the key is held until an operator releases it");
                        return Err(reqwest_middleware::Error::middleware(unknown));
                    }
                    Verdict::Retry { reason, retry_after, response } => {
                        (reason, retry_after, Ok(with_call(response, call)))
                    }
                    Verdict::Broken(error) => (Reason::ConnectionBroken, None, Err(error.into())),
                },
                Err(error) => match transport_failure(&error) {
                    Some(reason) => (reason, None, Err(error)),
                    None => return Err(error),
                },
            };
            let Some(spare) = spare else {
                if attempt > 1 || self.max_attempts == 1 {
                    tracing::warn!(key = %key_text, %method, %path, attempt, %reason, "giving up: no attempts left");
                } else {
                    tracing::warn!(key = %key_text, %method, %path, %reason, "not retried: the body is a stream");
                }
                return last;
            };
            let delay = match retry_after {
                Some(delay) => delay.min(self.max_retry_after),
                None => full_jitter(attempt, self.base_delay, self.max_delay, random_unit()),
            };
            let elapsed = started.elapsed();
            if elapsed + delay > self.max_elapsed {
                tracing::warn!(key = %key_text, %method, %path, attempt, %reason, elapsed_ms = elapsed.as_millis() as u64, delay_ms = delay.as_millis() as u64, "giving up: the retry would start after max_elapsed");
                return last;
            }
            // Hand the connection back before waiting.
            drop(last);
            if matches!(reason, Reason::Status(StatusCode::CONFLICT)) {
                tracing::debug!(key = %key_text, %method, %path, attempt, %reason, delay_ms = delay.as_millis() as u64, "retrying with the same key");
            } else {
                tracing::warn!(key = %key_text, %method, %path, attempt, %reason, delay_ms = delay.as_millis() as u64, "retrying with the same key");
            }
            tokio::time::sleep(delay).await;
            request = spare;
            if let (true, Some(wait)) = (keyed, self.prefer_wait) {
                if !request.headers().contains_key(&PREFER) {
                    let value = HeaderValue::from_str(&format!("wait={}", wait.as_secs()))
                        .expect("digits are a valid header value");
                    request.headers_mut().insert(PREFER.clone(), value);
                }
            }
            attempt += 1;
        }
    }
}

impl IdempotentRetry {
    async fn judge(&self, response: Response, call: &IdempotentCall) -> Verdict {
        let status = response.status();
        let retry_after = || {
            response
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| parse_retry_after(value, SystemTime::now()))
        };
        match status {
            // The gateway's in-flight answer always carries Retry-After; a 409 without one is
            // a conflict of the service's own, which a retry would not change.
            StatusCode::CONFLICT => match retry_after() {
                Some(delay) => Verdict::Retry {
                    reason: Reason::Status(status),
                    retry_after: Some(delay),
                    response,
                },
                None if response.headers().contains_key(header::RETRY_AFTER) => {
                    Verdict::Retry { reason: Reason::Status(status), retry_after: None, response }
                }
                None => Verdict::Final(response),
            },
            StatusCode::TOO_MANY_REQUESTS => {
                let retry_after = retry_after();
                Verdict::Retry { reason: Reason::Status(status), retry_after, response }
            }
            StatusCode::BAD_GATEWAY if may_be_outcome_unknown(&response) => {
                self.judge_bad_gateway(response, call).await
            }
            // Not implemented, HTTP version not supported: the same again gets the same.
            StatusCode::NOT_IMPLEMENTED | StatusCode::HTTP_VERSION_NOT_SUPPORTED => {
                Verdict::Final(response)
            }
            _ if status.is_server_error() => {
                let retry_after = retry_after();
                Verdict::Retry { reason: Reason::Status(status), retry_after, response }
            }
            _ => Verdict::Final(response),
        }
    }

    /// Reads a small `502` problem to tell the gateway's `outcome-unknown` (final) from an
    /// unreachable upstream (retried), and gives back the response whole.
    async fn judge_bad_gateway(&self, response: Response, call: &IdempotentCall) -> Verdict {
        let status = response.status();
        let version = response.version();
        let url = response.url().clone();
        let headers = response.headers().clone();
        let mut response = response;
        let extensions = std::mem::take(response.extensions_mut());
        let body = match response.bytes().await {
            Ok(body) => body,
            Err(error) => return Verdict::Broken(error),
        };
        if let Some(detail) = outcome_unknown_detail(&body) {
            let replayed = headers
                .get("idempotent-replayed")
                .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"true"));
            return Verdict::Unknown(OutcomeUnknown {
                key: call.key.clone().unwrap_or_default(),
                attempts: call.attempts,
                replayed,
                detail,
            });
        }
        let mut rebuilt = http::Response::builder()
            .status(status)
            .version(version)
            .url(url)
            .body(reqwest::Body::from(body))
            .expect("status and version came from a response");
        *rebuilt.headers_mut() = headers;
        rebuilt.extensions_mut().extend(extensions);
        Verdict::Retry {
            reason: Reason::Status(status),
            retry_after: None,
            response: Response::from(rebuilt),
        }
    }
}

/// A `502` that could be the gateway's `outcome-unknown` problem: problem JSON, of a known
/// small length (the gateway's problems are sent whole, with a `Content-Length`).
fn may_be_outcome_unknown(response: &Response) -> bool {
    let problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.trim_start().starts_with("application/problem+json"));
    problem && response.content_length().is_some_and(|length| length <= MAX_PROBLEM_BYTES)
}

/// The `detail` of an `outcome-unknown` problem body; `None` for any other body.
fn outcome_unknown_detail(body: &Bytes) -> Option<String> {
    let problem: serde_json::Value = serde_json::from_slice(body).ok()?;
    (problem["type"] == OUTCOME_UNKNOWN_TYPE)
        .then(|| problem["detail"].as_str().unwrap_or_default().to_owned())
}

/// A transport failure worth a retry under the same key; `None` for errors a retry would
/// repeat (a bad URL, a redirect loop, another middleware's error).
fn transport_failure(error: &reqwest_middleware::Error) -> Option<Reason> {
    let reqwest_middleware::Error::Reqwest(error) = error else { return None };
    if no_tls(error) {
        return None;
    }
    if error.is_timeout() {
        Some(Reason::Timeout)
    } else if error.is_connect() {
        Some(Reason::Connect)
    } else if error.is_request() {
        // Sent (perhaps in part) and the connection broke before a response: the server
        // may have run it; the key makes the retry safe.
        Some(Reason::ConnectionBroken)
    } else {
        None
    }
}

/// An `https://` request through a reqwest built without TLS: reqwest reports it as a
/// connection failure, but every retry would fail the same way.
fn no_tls(error: &reqwest::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = source {
        if error.to_string().contains("scheme is not http") {
            return true;
        }
        source = error.source();
    }
    false
}

/// The request's key: the caller's own if it set one (left as it is, even if the server will
/// refuse it: its `400` says why), else a new one put in.
fn ensure_key(request: &mut Request) -> String {
    if let Some(value) = request.headers().get(&IDEMPOTENCY_KEY) {
        return String::from_utf8_lossy(value.as_bytes()).into_owned();
    }
    let key = new_key();
    let value = HeaderValue::from_str(&key).expect("a UUID is a valid header value");
    request.headers_mut().insert(IDEMPOTENCY_KEY.clone(), value);
    key
}

fn with_call(mut response: Response, call: IdempotentCall) -> Response {
    response.extensions_mut().insert(call);
    response
}
