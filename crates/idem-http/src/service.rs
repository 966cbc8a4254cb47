use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body::{Body as HttpBody, Frame};
use http_body_util::BodyExt;
use idem_core::{
    Begin, BoxError, Claim, Engine, Error, Fingerprint, IdempotencyKey, RecordKey, Scope,
};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::{Service, ServiceExt};

use crate::headers::{IDEMPOTENCY_KEY, IDEMPOTENT_REPLAY, IDEMPOTENT_REPLAYED, remove_hop_by_hop};
use crate::problem::{PROBLEM_JSON, ProblemKind, full, problem, problem_body};
use crate::routes::Routes;
use crate::{
    Body, IdempotencyConfig, InTransaction, OutcomeUnknown, ScopeSource, StoredResponse,
    UnknownOutcome,
};

/// The service [`crate::IdempotencyLayer`] produces.
#[derive(Debug, Clone)]
pub struct IdempotencyService<S> {
    pub(crate) inner: S,
    /// The settings and engine by path and method.
    pub(crate) routes: Arc<Routes>,
    pub(crate) tasks: TaskTracker,
    /// Cancelled when the server gives up on the calls still running (shutdown): each then
    /// settles its key as an unknown outcome.
    pub(crate) abandon: CancellationToken,
    /// Keyed requests being handled, their calls included (which go on after a client left).
    pub(crate) running: Arc<tokio::sync::Semaphore>,
    /// Bytes of keyed request bodies held in memory, all requests together.
    pub(crate) buffered: Arc<BufferBudget>,
}

/// A budget of bytes shared by every request body held in memory.
#[derive(Debug)]
pub(crate) struct BufferBudget {
    bytes: Arc<tokio::sync::Semaphore>,
    /// Semaphore permits count at most `u32::MAX` at a time: budgets are kept in KiB.
    total_kib: u32,
}

/// How long a body waits for room in the budget before it is refused.
const BUDGET_WAIT: Duration = Duration::from_secs(1);

impl BufferBudget {
    pub(crate) fn new(bytes: usize) -> Self {
        let total_kib = u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX).max(1);
        Self { bytes: Arc::new(tokio::sync::Semaphore::new(total_kib as usize)), total_kib }
    }

    /// Room for `bytes` more, waiting up to a second; `None` if there is none.
    async fn reserve(&self, bytes: usize) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let kib = u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX).min(self.total_kib);
        let wanted = Arc::clone(&self.bytes).acquire_many_owned(kib);
        tokio::time::timeout(BUDGET_WAIT, wanted).await.ok()?.ok()
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for IdempotencyService<S>
where
    S: Service<Request<Body>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: HttpBody<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: HttpBody<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Each call drives its own clone of the inner service to readiness (`oneshot`), so
        // this service is always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let this = self.clone();
        let span = crate::trace::request_span(&request);
        Box::pin(tracing::Instrument::instrument(
            async move {
                let response = this.handle(request).await;
                if let Ok(response) = &response {
                    crate::trace::record_response(&tracing::Span::current(), response);
                }
                response
            },
            span,
        ))
    }
}

enum Collected {
    /// The whole body, within the limit.
    Complete(Bytes),
    /// Over the limit: what was read so far and the rest of the body, unread.
    Overflow(Bytes, Body),
    Failed(BoxError),
}

impl<S, ResBody> IdempotencyService<S>
where
    S: Service<Request<Body>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: HttpBody<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    async fn handle<ReqBody>(self, request: Request<ReqBody>) -> Result<Response<Body>, S::Error>
    where
        ReqBody: HttpBody<Data = Bytes> + Send + 'static,
        ReqBody::Error: Into<BoxError>,
    {
        let Self { inner, routes, tasks, abandon, running, buffered } = self;
        let (config, engine) = routes.select(request.method(), request.uri().path());
        if !config.methods.contains(request.method()) {
            return pass_through(inner, request.map(Body::new), config).await;
        }
        let key = match parse_key(request.headers()) {
            Ok(Some(key)) => key,
            Ok(None) if config.require_key => {
                return Ok(rejected(
                    ProblemKind::MissingKey,
                    format!(
                        "{} requests to this service need an Idempotency-Key header",
                        request.method()
                    ),
                ));
            }
            Ok(None) => return pass_through(inner, request.map(Body::new), config).await,
            Err(response) => return Ok(response),
        };

        let (parts, body) = request.into_parts();
        // The body's share of the memory budget, held while this request is handled here (a
        // call that goes on after its client left no longer counts).
        let (body, _budget) =
            match read_request_body(&parts, body, config.max_request_body, &buffered).await {
                Ok(body) => body,
                Err(response) => return Ok(response),
            };
        // Bounded: calls go on after their clients left (a timeout, a hang-up), so the number
        // of connections alone does not bound them.
        let Ok(permit) = running.try_acquire_owned() else {
            crate::trace::outcome("rejected");
            metrics::counter!("idem_rejected_total", "reason" => ProblemKind::Overloaded.slug())
                .increment(1);
            let mut response = problem(
                ProblemKind::Overloaded,
                format!(
                    "{} keyed requests are already being handled; nothing was run, retry later",
                    config.max_running
                ),
            );
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(1));
            return Ok(response);
        };
        let record_key = RecordKey::new(scope_of(&parts.headers, config), key);
        crate::trace::key_hash(&record_key);
        let fingerprint = fingerprint_of(&parts, &body, config);
        let wait = preferred_wait(&parts.headers).map(|wait| wait.min(config.max_wait));
        let request = Request::from_parts(parts, full(body));

        // Prefer: wait=N: a key in flight is waited for instead of answered with 409.
        let (begun, waited) = match wait {
            Some(wait) => match engine.begin_waiting(record_key.clone(), fingerprint, wait).await {
                Ok((begun, waited)) => (Ok(begun), waited.then_some(wait)),
                Err(error) => (Err(error), None),
            },
            None => (engine.begin(record_key.clone(), fingerprint).await, None),
        };
        crate::trace::begun(&begun, config.fail_open);
        let response = match begun {
            Ok(Begin::Run(claim)) => {
                tracing::debug!(key = %record_key.key, scope = %record_key.scope, "claimed; running");
                let running = Running { tasks: &tasks, abandon: &abandon, config, permit, engine };
                run_claimed(running, claim, inner, request).await
            }
            Ok(Begin::Replay(payload)) => Ok(replay(payload, &record_key.scope)),
            Ok(Begin::Mismatch) => Ok(problem(
                ProblemKind::KeyMismatch,
                format!(
                    "the Idempotency-Key {:?} was first used with a different request (method, path, query or body); use a new key for a new request",
                    record_key.key.as_str()
                ),
            )),
            Ok(Begin::InFlight { retry_after }) => {
                let seconds = retry_after.as_secs();
                let mut response = problem(
                    ProblemKind::InFlight,
                    format!(
                        "the first request with this key is still running; retry in {seconds} s"
                    ),
                );
                response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
                Ok(response)
            }
            // A full store (never failed open: filling it must not turn deduplication off).
            Err(Error::Full(reason)) => {
                tracing::warn!(%reason, "the store is full; refusing new keys");
                let mut response = problem(
                    ProblemKind::Overloaded,
                    "the idempotency store is full, so the request was not forwarded; retry later",
                );
                response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(1));
                Ok(response)
            }
            // A record the store cannot read back: never forwarded, even failing open, since
            // the operation may already have run under it.
            Err(error) if !error.is_unavailable() => {
                tracing::error!(%error, key = %record_key.key, "the stored record cannot be used");
                Ok(problem(
                    ProblemKind::CorruptRecord,
                    "the stored record for this key could not be read; the request was not run",
                ))
            }
            Err(error) if config.fail_open => {
                tracing::warn!(%error, "store unavailable; forwarding without idempotency (fail open)");
                metrics::counter!("idem_fail_open_total").increment(1);
                pass_through(inner, request, config).await
            }
            Err(error) => {
                tracing::error!(%error, "store unavailable; refusing (fail closed)");
                let mut response = problem(
                    ProblemKind::StoreUnavailable,
                    "the idempotency store cannot be reached, so the request was not forwarded; retry later",
                );
                response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(1));
                Ok(response)
            }
        };
        match (response, waited) {
            (Ok(mut response), Some(wait)) => {
                let applied = format!("wait={}", wait.as_secs());
                if let Ok(value) = HeaderValue::from_str(&applied) {
                    response.headers_mut().append(PREFERENCE_APPLIED.clone(), value);
                }
                Ok(response)
            }
            (response, _) => response,
        }
    }
}

static PREFERENCE_APPLIED: http::HeaderName = http::HeaderName::from_static("preference-applied");

/// The `wait` preference of RFC 7240 (`Prefer: wait=10`, among others, in any `Prefer`
/// header; the first one counts).
fn preferred_wait(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get_all(header::HeaderName::from_static("prefer"))
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|preference| {
            let token = preference.split(';').next()?.trim();
            let (name, value) = token.split_once('=')?;
            if !name.trim().eq_ignore_ascii_case("wait") {
                return None;
            }
            value.trim().trim_matches('"').parse::<u64>().ok().map(Duration::from_secs)
        })
        .next()
}

async fn pass_through<S, ResBody>(
    inner: S,
    request: Request<Body>,
    config: &IdempotencyConfig,
) -> Result<Response<Body>, S::Error>
where
    S: Service<Request<Body>, Response = Response<ResBody>>,
    ResBody: HttpBody<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    metrics::counter!("idem_passthrough_total").increment(1);
    crate::trace::outcome("pass-through");
    let call = inner.oneshot(request);
    let response = match config.response_timeout {
        Some(limit) => match tokio::time::timeout(limit, call).await {
            Ok(response) => response?,
            Err(_) => {
                metrics::counter!("idem_client_timeouts_total", "path" => "pass-through")
                    .increment(1);
                return Ok(problem(
                    ProblemKind::UpstreamTimeout,
                    format!(
                        "the upstream did not answer within {limit:?}; this request carried no Idempotency-Key, so whether it ran is unknown and nothing was stored"
                    ),
                ));
            }
        },
        None => call.await?,
    };
    Ok(response.map(Body::new))
}

/// What a claimed request runs with, besides the request itself.
struct Running<'a> {
    tasks: &'a TaskTracker,
    abandon: &'a CancellationToken,
    config: &'a Arc<IdempotencyConfig>,
    /// Held until the call ends, wherever its client went.
    permit: tokio::sync::OwnedSemaphorePermit,
    engine: &'a Engine,
}

/// Runs the claimed request on a task of its own, so a client that disconnects or times out
/// does not cancel it: the outcome is stored either way and the client's retry replays it.
async fn run_claimed<S, ResBody>(
    running: Running<'_>,
    claim: Claim,
    inner: S,
    request: Request<Body>,
) -> Result<Response<Body>, S::Error>
where
    S: Service<Request<Body>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: HttpBody<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let (sender, receiver) = tokio::sync::oneshot::channel();
    let config = Arc::clone(running.config);
    let abandon = running.abandon.clone();
    let permit = running.permit;
    let mut request = request;
    let in_transaction =
        InTransaction::new(running.engine.clone(), claim.key().clone(), claim.token());
    request.extensions_mut().insert(in_transaction.clone());
    let listed = config.running_keys.as_ref().map(|keys| keys.enter(claim.key().clone()));
    // In the request's span: the call outlives the client's wait, and its outcome is recorded
    // there.
    running.tasks.spawn(tracing::Instrument::in_current_span(async move {
        let response =
            finish_claimed(claim, inner, request, &config, abandon, in_transaction).await;
        drop(listed);
        drop(permit);
        // The client may have gone; the outcome is stored regardless.
        let _ = sender.send(response);
    }));
    let received = match running.config.response_timeout {
        Some(limit) => match tokio::time::timeout(limit, receiver).await {
            Ok(received) => received,
            Err(_) => {
                metrics::counter!("idem_client_timeouts_total", "path" => "claimed").increment(1);
                let mut response = problem(
                    ProblemKind::UpstreamTimeout,
                    format!(
                        "the upstream has not answered within {limit:?}; the request is still running and its outcome will be stored: a retry with the same Idempotency-Key gets 409 while it runs and its response after (send Prefer: wait=N to wait for it)"
                    ),
                );
                response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(1));
                return Ok(response);
            }
        },
        None => receiver.await,
    };
    match received {
        Ok(response) => response,
        Err(_) => Ok(problem(ProblemKind::Internal, "the task running this request stopped")),
    }
}

/// How far a claimed call got.
enum Called<E> {
    /// The inner service failed (not a response): released, as before any response.
    Failed(E),
    /// A response that is not stored (5xx, 408, 409, 425, 429): released.
    NotStored(Response<Body>),
    /// The inner service marked the response [`OutcomeUnknown`].
    Unknown(&'static str),
    /// A response to store, its body collected up to the limit.
    Collected(http::response::Parts, Collected),
    /// The handler stored its response inside its own transaction ([`InTransaction`]).
    StoredByHandler(Response<Body>),
}

async fn finish_claimed<S, ResBody>(
    mut claim: Claim,
    inner: S,
    request: Request<Body>,
    config: &IdempotencyConfig,
    abandon: CancellationToken,
    in_transaction: InTransaction,
) -> Result<Response<Body>, S::Error>
where
    S: Service<Request<Body>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: HttpBody<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    if abandon.is_cancelled() {
        // The server gave up on running calls (shutdown): this one has not started, so
        // nothing was sent and the key is released.
        crate::trace::outcome("rejected");
        release(claim).await;
        return Ok(problem(
            ProblemKind::Overloaded,
            "the gateway is shutting down; nothing was forwarded, retry later",
        ));
    }
    let max_stored_body = config.max_stored_body;
    let call = async move {
        let response = match inner.oneshot(request).await {
            Ok(response) => response,
            Err(error) => return Called::Failed(error),
        };
        if in_transaction.stored_by_handler().await {
            // The handler stored this response in its own transaction, with its writes.
            return Called::StoredByHandler(response.map(Body::new));
        }
        if let Some(OutcomeUnknown(cause)) = response.extensions().get::<OutcomeUnknown>() {
            return Called::Unknown(cause);
        }
        if !is_stored(response.status()) {
            return Called::NotStored(response.map(Body::new));
        }
        let (mut parts, body) = response.into_parts();
        let body = Body::new(body);
        remove_hop_by_hop(&mut parts.headers);
        let declared_len = body.size_hint().exact();
        let collected = if declared_len.is_some_and(|len| len > max_stored_body as u64) {
            Collected::Overflow(Bytes::new(), body)
        } else {
            collect_up_to(body, max_stored_body).await
        };
        Called::Collected(parts, collected)
    };
    // The call goes on after the client stopped waiting, up to the hard cap (or until the
    // server gives up on it at shutdown); its lease is renewed meanwhile.
    let cap = config.abandon_after.unwrap_or(Duration::MAX);
    let called = tokio::select! {
        called = tokio::time::timeout(cap, claim.keep_alive(call)) => called.ok(),
        () = abandon.cancelled() => None,
    };
    let called = match called {
        Some(called) => called,
        None => {
            let cause = if abandon.is_cancelled() { "shutdown" } else { "abandoned" };
            return Ok(settle_unknown(claim, config, cause).await);
        }
    };
    if !matches!(called, Called::Unknown(_) | Called::Collected(_, Collected::Failed(_))) {
        crate::trace::outcome("run");
    }
    match called {
        Called::Failed(error) => {
            release(claim).await;
            Err(error)
        }
        Called::NotStored(response) => {
            release(claim).await;
            Ok(response)
        }
        Called::Unknown(cause) => Ok(settle_unknown(claim, config, cause).await),
        Called::StoredByHandler(response) => {
            claim.completed_elsewhere();
            Ok(response)
        }
        Called::Collected(parts, collected) => {
            let mut stored = StoredResponse {
                status: parts.status,
                headers: parts.headers.clone(),
                body: Bytes::new(),
                body_omitted: false,
                cookies_omitted: false,
            };
            // The stored length is recomputed on replay; a stale Content-Length would lie.
            stored.headers.remove(header::CONTENT_LENGTH);
            match collected {
                Collected::Complete(body) => {
                    stored.body = body.clone();
                    complete(claim, &stored).await;
                    Ok(Response::from_parts(parts, full(body)))
                }
                Collected::Overflow(prefix, rest) => {
                    // Stored (without its body) before the body streams on: the operation
                    // ran, and a retry must replay, not run again, whatever happens to the
                    // rest of the stream.
                    stored.body_omitted = true;
                    complete(claim, &stored).await;
                    Ok(Response::from_parts(parts, prefixed(prefix, rest)))
                }
                Collected::Failed(error) => {
                    // The upstream answered (so it ran) and then its body broke off: what it
                    // did is not known in full.
                    tracing::warn!(%error, "upstream response body broke off");
                    Ok(settle_unknown(claim, config, "body-broke").await)
                }
            }
        }
    }
}

/// Settles a key whose call may or may not have run, by the configured policy: hold it with a
/// stored `502 outcome-unknown` problem (replayed until an operator releases the key or its
/// TTL passes), or leave it in flight until its lease expires. Never released at once.
async fn settle_unknown(claim: Claim, config: &IdempotencyConfig, cause: &str) -> Response<Body> {
    crate::trace::outcome("unknown");
    let policy = config.unknown_outcome;
    metrics::counter!(
        "idem_outcome_unknown_total",
        "cause" => cause.to_owned(),
        "policy" => policy.as_str()
    )
    .increment(1);
    let what = match cause {
        "abandoned" => format!(
            "the upstream did not answer within {:?}, so the call was abandoned",
            config.abandon_after.unwrap_or_default()
        ),
        "shutdown" => "the gateway shut down before the upstream answered".to_owned(),
        "body-broke" => "the upstream's response broke off before its end".to_owned(),
        _ => "the upstream took the request, then the connection broke before a whole response"
            .to_owned(),
    };
    tracing::warn!(
        key = %claim.key().key,
        scope = %claim.key().scope,
        cause,
        policy = policy.as_str(),
        "the outcome of a request is unknown: {what}"
    );
    match policy {
        UnknownOutcome::Hold => {
            let kind = ProblemKind::OutcomeUnknown;
            let body = problem_body(
                kind,
                format!(
                    "{what}: whether the request ran is unknown. This key is held with this answer so that the request never runs twice; check the upstream, then release the key (idem keys release) to let a retry run"
                ),
            );
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
            let stored = StoredResponse {
                status: kind.status(),
                headers,
                body,
                body_omitted: false,
                cookies_omitted: false,
            };
            let key = claim.key().clone();
            complete(claim, &stored).await;
            if let Some(held) = &config.held_keys {
                held.push(key, cause);
            }
            stored.into_response()
        }
        UnknownOutcome::Release => {
            let left = claim.lease_left();
            claim.abandon();
            problem(
                ProblemKind::OutcomeUnknown,
                format!(
                    "{what}: whether the request ran is unknown. The key stays held until its lease expires (in about {} s); a retry after that runs again",
                    left.as_secs().max(1)
                ),
            )
        }
    }
}

/// Which outcomes are stored: completed responses below 500, except those that say "try
/// again" (408, 409, 425, 429).
pub fn is_stored(status: StatusCode) -> bool {
    status.as_u16() < 500 && !matches!(status.as_u16(), 408 | 409 | 425 | 429)
}

async fn complete(claim: Claim, stored: &StoredResponse) {
    let key = claim.key().key.clone();
    let stored = stored.clone().without_cookies_for(&claim.key().scope);
    match claim.complete(stored.encode()).await {
        Ok(()) => {}
        Err(Error::Fenced) => tracing::warn!(
            %key,
            "another owner took this key over after our lease ran out; its record stands"
        ),
        Err(error) => tracing::error!(
            %key, %error,
            "could not store the outcome; a retry after the lease expires will run again"
        ),
    }
}

async fn release(claim: Claim) {
    let key = claim.key().key.clone();
    if let Err(error) = claim.release().await {
        tracing::warn!(%key, %error, "could not release the key; it frees itself when its lease expires");
    }
}

fn replay(payload: Bytes, scope: &Scope) -> Response<Body> {
    // Also at replay: a record stored by an older version may still carry cookies.
    let stored = match StoredResponse::decode(payload) {
        Ok(stored) => stored.without_cookies_for(scope),
        Err(error) => {
            tracing::error!(%error, "stored response is unreadable");
            return problem(
                ProblemKind::CorruptRecord,
                "the stored response for this key could not be read; the request was not run again",
            );
        }
    };
    let omitted: Vec<&str> =
        [(stored.body_omitted, "body-omitted"), (stored.cookies_omitted, "cookies-omitted")]
            .into_iter()
            .filter_map(|(omitted, what)| omitted.then_some(what))
            .collect();
    let mut response = stored.into_response();
    let headers = response.headers_mut();
    headers.insert(IDEMPOTENT_REPLAYED.clone(), HeaderValue::from_static("true"));
    if let Ok(value) = HeaderValue::from_str(&omitted.join(", "))
        && !omitted.is_empty()
    {
        headers.insert(IDEMPOTENT_REPLAY.clone(), value);
    }
    response
}

fn rejected(kind: ProblemKind, detail: String) -> Response<Body> {
    crate::trace::outcome("rejected");
    metrics::counter!("idem_rejected_total", "reason" => kind.slug()).increment(1);
    problem(kind, detail)
}

/// The one key the request carries: `Ok(None)` without one, a 400 for anything malformed.
#[allow(clippy::result_large_err)]
fn parse_key(headers: &HeaderMap) -> Result<Option<IdempotencyKey>, Response<Body>> {
    let mut values = headers.get_all(&IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(rejected(
            ProblemKind::MultipleKeys,
            "the request carries more than one Idempotency-Key header; send exactly one".into(),
        ));
    }
    IdempotencyKey::parse_header(value.as_bytes())
        .map(Some)
        .map_err(|error| rejected(ProblemKind::InvalidKey, error.to_string()))
}

#[allow(clippy::result_large_err)]
async fn read_request_body<B>(
    parts: &Parts,
    body: B,
    limit: usize,
    budget: &BufferBudget,
) -> Result<(Bytes, Option<tokio::sync::OwnedSemaphorePermit>), Response<Body>>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let too_large = || {
        rejected(
            ProblemKind::BodyTooLarge,
            format!("request bodies are limited to {limit} bytes; nothing was run"),
        )
    };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    let mut body = std::pin::pin!(body);
    if declared.is_some_and(|len| len > limit as u64) {
        drain(body.as_mut(), limit).await;
        return Err(too_large());
    }
    let over_budget = || {
        crate::trace::outcome("rejected");
        metrics::counter!("idem_rejected_total", "reason" => "memory-budget").increment(1);
        let mut response = problem(
            ProblemKind::Overloaded,
            "the gateway holds as many request bodies in memory as it may; nothing was run, retry later",
        );
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(1));
        response
    };
    // Room in the memory budget is taken as the body arrives (in growing steps, never past
    // what it declares or the limit), so a client that declares a large body and sends
    // nothing holds no budget.
    let most = declared.map_or(limit, |len| len as usize);
    let mut reserved: Option<tokio::sync::OwnedSemaphorePermit> = None;
    let mut reserved_bytes = 0usize;
    // One allocation, sized from Content-Length when the first bytes arrive (or grown
    // geometrically for a chunked body), however small the pieces the body arrives in: each
    // is copied in and dropped at once.
    let mut buffer = BytesMut::new();
    loop {
        let next = body.as_mut().frame().await.map(|frame| frame.map_err(Into::<BoxError>::into));
        match next {
            None => return Ok((buffer.freeze(), reserved)),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    let needed = buffer.len() + data.len();
                    if needed > limit {
                        drain(body.as_mut(), limit).await;
                        return Err(too_large());
                    }
                    if needed > reserved_bytes {
                        let step = (needed - reserved_bytes)
                            .max(reserved_bytes)
                            .max(64 * 1024)
                            .min(most.max(needed) - reserved_bytes);
                        let Some(more) = budget.reserve(step).await else {
                            drain(body.as_mut(), limit).await;
                            return Err(over_budget());
                        };
                        reserved_bytes += step;
                        match &mut reserved {
                            Some(held) => held.merge(more),
                            None => reserved = Some(more),
                        }
                    }
                    if buffer.capacity() == 0 {
                        buffer.reserve(declared.map_or(8 * 1024, |len| len as usize));
                    }
                    buffer.extend_from_slice(&data);
                }
            }
            Some(Err(error)) => {
                if is_too_slow(error.as_ref()) {
                    return Err(rejected(
                        ProblemKind::BodyTooSlow,
                        format!("{error}; nothing was run, send the body faster or retry later"),
                    ));
                }
                return Err(rejected(
                    ProblemKind::UnreadableBody,
                    format!("the request body could not be read: {error}"),
                ));
            }
        }
    }
}

/// Reads and discards what is left of an oversized body, up to twice the limit (at least
/// 1 MiB, at most 64 MiB) and for at most 10 s, before the 413 is sent: a client that
/// writes its whole body before it reads (Python's urllib) then gets the 413 instead of a
/// connection reset. A body larger still is cut off, as nginx's lingering close does.
async fn drain<B>(mut body: Pin<&mut B>, limit: usize)
where
    B: HttpBody<Data = Bytes>,
{
    let bound = (limit as u64).saturating_mul(2).clamp(1 << 20, 64 << 20);
    let mut discarded = 0u64;
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while discarded <= bound {
            match body.as_mut().frame().await {
                Some(Ok(frame)) => {
                    discarded += frame.data_ref().map_or(0, |data| data.len() as u64);
                }
                _ => return,
            }
        }
    })
    .await;
}

/// Whether `error` (or what caused it) is a body cut off for arriving too slowly.
fn is_too_slow(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(error) = current {
        if error.is::<crate::BodyTooSlow>() {
            return true;
        }
        current = error.source();
    }
    false
}

/// The caller's scope: from the first of the configured sources the request carries;
/// [`Scope::anonymous`] when it carries none.
fn scope_of(headers: &HeaderMap, config: &IdempotencyConfig) -> Scope {
    for source in &config.scope_sources {
        match source {
            ScopeSource::Header(name) => {
                let values: Vec<&[u8]> = headers
                    .get_all(name)
                    .iter()
                    .map(HeaderValue::as_bytes)
                    .filter(|value| !value.is_empty())
                    .collect();
                if !values.is_empty() {
                    return Scope::from_credentials(values);
                }
            }
            ScopeSource::Cookie(cookie) => {
                if let Some(value) = cookie_value(headers, cookie) {
                    let credential = format!("cookie:{cookie}={value}");
                    return Scope::from_credential(credential.as_bytes());
                }
            }
        }
    }
    Scope::anonymous()
}

/// The value of the cookie `name` in the request's `Cookie` headers, if present and not empty
/// (read as bytes: another cookie with non-ASCII bytes does not hide it).
fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .flat_map(|value| value.as_bytes().split(|b| *b == b';'))
        .filter_map(|pair| {
            let pair = pair.trim_ascii();
            let at = pair.iter().position(|b| *b == b'=')?;
            Some((&pair[..at], &pair[at + 1..]))
        })
        .find(|(cookie, value)| *cookie == name.as_bytes() && !value.is_empty())
        .map(|(_, value)| String::from_utf8_lossy(value).into_owned())
}

fn fingerprint_of(parts: &Parts, body: &Bytes, config: &IdempotencyConfig) -> Fingerprint {
    let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let mut builder = Fingerprint::builder()
        .part(parts.method.as_str().as_bytes())
        .part(path_and_query.as_bytes());
    for name in &config.fingerprint_headers {
        // The number of values first, so that a header's absence, an empty value and values
        // that would spell the next header's name can never hash alike.
        let values = parts.headers.get_all(name);
        let count = values.iter().count() as u32;
        builder = builder.part(name.as_str().as_bytes()).part(&count.to_be_bytes());
        for value in values {
            builder = builder.part(value.as_bytes());
        }
    }
    builder.part(body).finish()
}

/// Reads `body` while it stays within `limit` bytes.
async fn collect_up_to(mut body: Body, limit: usize) -> Collected {
    let mut buffer = BytesMut::new();
    loop {
        match body.frame().await {
            None => return Collected::Complete(buffer.freeze()),
            Some(Err(error)) => return Collected::Failed(error),
            Some(Ok(frame)) => {
                // Trailers are not stored; only data frames are part of the replayed body.
                if let Ok(data) = frame.into_data() {
                    buffer.extend_from_slice(&data);
                    if buffer.len() > limit {
                        return Collected::Overflow(buffer.freeze(), body);
                    }
                }
            }
        }
    }
}

/// `prefix` followed by the rest of `body`.
fn prefixed(prefix: Bytes, rest: Body) -> Body {
    Body::new(Prefixed { prefix: Some(prefix).filter(|prefix| !prefix.is_empty()), rest })
}

struct Prefixed {
    prefix: Option<Bytes>,
    rest: Body,
}

impl HttpBody for Prefixed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.prefix.take() {
            Some(prefix) => Poll::Ready(Some(Ok(Frame::data(prefix)))),
            None => Pin::new(&mut self.rest).poll_frame(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_headers_count_their_values() {
        let config = IdempotencyConfig::default().fingerprint_headers([
            http::HeaderName::from_static("x-a"),
            http::HeaderName::from_static("x-b"),
        ]);
        let fingerprint = |headers: &[(&str, &str)]| {
            let mut request = Request::builder().method("POST").uri("/orders");
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            let (parts, ()) = request.body(()).unwrap().into_parts();
            fingerprint_of(&parts, &Bytes::from_static(b"{}"), &config)
        };
        // Without counts these pairs hashed alike: a value equal to the next header's name.
        assert_ne!(fingerprint(&[("x-a", "x-b")]), fingerprint(&[("x-b", "x-b")]));
        assert_ne!(fingerprint(&[]), fingerprint(&[("x-a", "")]));
        assert_ne!(
            fingerprint(&[("x-a", "1"), ("x-a", "2")]),
            fingerprint(&[("x-a", "1"), ("x-b", "2")])
        );
        assert_eq!(fingerprint(&[("x-a", "1")]), fingerprint(&[("x-a", "1")]));
        assert_eq!(
            preferred_wait(&{
                let mut headers = HeaderMap::new();
                headers.append("prefer", HeaderValue::from_static("respond-async, WAIT=7; x=1"));
                headers
            }),
            Some(Duration::from_secs(7))
        );
        assert_eq!(preferred_wait(&HeaderMap::new()), None);
    }
}
