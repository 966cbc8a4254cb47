use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method, header};
use idem_core::Engine;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::Layer;

use crate::routes::{RouteRule, Routes};
use crate::{HeldKeys, IdempotencyService, RunningKeys};

/// What the layer applies to, and its limits.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct IdempotencyConfig {
    /// Methods that get idempotency handling; others pass straight through.
    pub methods: Vec<Method>,
    /// Refuse requests of those methods that carry no key (400), instead of passing them.
    pub require_key: bool,
    /// Where the caller's identity is read from (hashed, never stored raw): the first source
    /// the request carries wins. Callers that carry none share one anonymous scope, whose
    /// stored responses never keep a `Set-Cookie`. Empty: every caller in one scope.
    pub scope_sources: Vec<ScopeSource>,
    /// Headers that are part of the fingerprint besides method, path, query and body.
    pub fingerprint_headers: Vec<HeaderName>,
    /// Request bodies over this many bytes get 413 before anything runs.
    pub max_request_body: usize,
    /// Response bodies over this many bytes stream through and are stored without their body.
    pub max_stored_body: usize,
    /// When the store is unreachable, forward the request without idempotency instead of
    /// answering 503.
    pub fail_open: bool,
    /// How long a client waits for the response to begin. Past it the client gets `504`; a
    /// claimed call goes on (its outcome is stored for the retry), a call without a key is
    /// dropped. `None`: as long as the call takes.
    pub response_timeout: Option<Duration>,
    /// The hard cap on a claimed call: past it the call is abandoned and its outcome is
    /// unknown (settled by `unknown_outcome`). `None`: no cap.
    pub abandon_after: Option<Duration>,
    /// What a key gets when nobody knows whether its call ran.
    pub unknown_outcome: UnknownOutcome,
    /// The longest `Prefer: wait=N` honoured.
    pub max_wait: Duration,
    /// Most keyed requests handled at once, their calls included (which go on after a client
    /// times out or leaves); more get `503 overloaded` before anything runs.
    pub max_running: usize,
    /// Most bytes of keyed request bodies held in memory at once, all requests together. A
    /// body that would pass it waits up to a second for room, then gets `503 overloaded`.
    pub max_buffered: usize,
    /// Settings by path and method, the first matching rule winning; requests no rule matches
    /// get the settings above.
    pub routes: Vec<RouteRule>,
    /// Where keys held with an unknown outcome are noted, for an operator's page.
    pub held_keys: Option<HeldKeys>,
    /// Where the keyed calls running now are listed, for an operator's page.
    pub running_keys: Option<RunningKeys>,
}

/// Where a caller's identity (the scope its keys live in) is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScopeSource {
    /// All the values of a header: `Authorization`, or `Cookie` as a whole.
    Header(HeaderName),
    /// One cookie of the `Cookie` header, by name: a session cookie, steadier than the whole
    /// header (which changes whenever any cookie does).
    Cookie(String),
}

/// What a key gets when its call's outcome is unknown: the request was sent (all or part of
/// it) and the connection then broke before a whole response, or the call was abandoned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnknownOutcome {
    /// Store a `502 outcome-unknown` problem under the key, replayed to every retry until an
    /// operator releases the key or its TTL passes.
    #[default]
    Hold,
    /// Leave the key in flight until its lease expires; a retry after that runs again.
    Release,
}

impl UnknownOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hold => "hold",
            Self::Release => "release",
        }
    }
}

/// Put in a response's extensions by an inner service (the gateway's proxy) when the request
/// was sent, or part of it, and the connection then broke before a whole response: whether
/// it ran is unknown. The string says how (`connection-broke`), for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutcomeUnknown(pub &'static str);

impl Default for IdempotencyConfig {
    fn default() -> Self {
        Self {
            methods: vec![Method::POST, Method::PATCH],
            require_key: false,
            scope_sources: vec![
                ScopeSource::Header(header::AUTHORIZATION),
                ScopeSource::Header(header::COOKIE),
            ],
            fingerprint_headers: Vec::new(),
            max_request_body: 10 * 1024 * 1024,
            max_stored_body: 1024 * 1024,
            fail_open: false,
            response_timeout: None,
            abandon_after: Some(Duration::from_secs(600)),
            unknown_outcome: UnknownOutcome::Hold,
            max_wait: Duration::from_secs(30),
            max_running: 10_000,
            max_buffered: 1 << 30,
            routes: Vec::new(),
            held_keys: None,
            running_keys: None,
        }
    }
}

impl IdempotencyConfig {
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.methods = methods.into_iter().collect();
        self
    }

    pub fn require_key(mut self, require_key: bool) -> Self {
        self.require_key = require_key;
        self
    }

    /// One header identifies the caller (`None`: every caller in one scope).
    pub fn scope_header(mut self, header: Option<HeaderName>) -> Self {
        self.scope_sources = header.into_iter().map(ScopeSource::Header).collect();
        self
    }

    /// The sources of the caller's identity, the first present winning.
    pub fn scope_sources(mut self, sources: impl IntoIterator<Item = ScopeSource>) -> Self {
        self.scope_sources = sources.into_iter().collect();
        self
    }

    pub fn fingerprint_headers(mut self, headers: impl IntoIterator<Item = HeaderName>) -> Self {
        self.fingerprint_headers = headers.into_iter().collect();
        self
    }

    pub fn max_request_body(mut self, bytes: usize) -> Self {
        self.max_request_body = bytes;
        self
    }

    pub fn max_stored_body(mut self, bytes: usize) -> Self {
        self.max_stored_body = bytes;
        self
    }

    pub fn fail_open(mut self, fail_open: bool) -> Self {
        self.fail_open = fail_open;
        self
    }

    pub fn response_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.response_timeout = timeout;
        self
    }

    pub fn abandon_after(mut self, cap: Option<Duration>) -> Self {
        self.abandon_after = cap;
        self
    }

    pub fn unknown_outcome(mut self, policy: UnknownOutcome) -> Self {
        self.unknown_outcome = policy;
        self
    }

    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = max_wait;
        self
    }

    pub fn max_running(mut self, max_running: usize) -> Self {
        self.max_running = max_running;
        self
    }

    pub fn max_buffered(mut self, bytes: usize) -> Self {
        self.max_buffered = bytes;
        self
    }

    /// Notes each key held with an unknown outcome in `held`.
    pub fn held_keys(mut self, held: HeldKeys) -> Self {
        self.held_keys = Some(held);
        self
    }

    /// Lists each keyed call while it runs in `running`.
    pub fn running_keys(mut self, running: RunningKeys) -> Self {
        self.running_keys = Some(running);
        self
    }

    /// Adds a rule after the ones already given (the first that matches a request wins).
    pub fn route(mut self, rule: RouteRule) -> Self {
        self.routes.push(rule);
        self
    }
}

/// Gives the wrapped service Idempotency-Key semantics. See the crate docs.
#[derive(Debug, Clone)]
pub struct IdempotencyLayer {
    pub(crate) routes: Arc<Routes>,
    pub(crate) tasks: TaskTracker,
    pub(crate) abandon: CancellationToken,
    pub(crate) running: Arc<tokio::sync::Semaphore>,
    pub(crate) buffered: Arc<crate::service::BufferBudget>,
}

impl IdempotencyLayer {
    pub fn new(engine: Engine, config: IdempotencyConfig) -> Self {
        let running = Arc::new(tokio::sync::Semaphore::new(config.max_running));
        let buffered = Arc::new(crate::service::BufferBudget::new(config.max_buffered));
        Self {
            routes: Arc::new(Routes::new(engine, config)),
            tasks: TaskTracker::new(),
            abandon: CancellationToken::new(),
            running,
            buffered,
        }
    }

    /// The tasks that finish claimed requests (even after their client left). A server that
    /// shuts down gracefully closes and waits on this so that no outcome is lost.
    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    /// Gives up on every claimed call still running (a server that cannot wait any longer at
    /// shutdown): each settles its key as an unknown outcome, by `unknown_outcome`, instead
    /// of leaving it to be run again after its lease. Wait on [`IdempotencyLayer::tasks`]
    /// afterwards for them to be stored.
    pub fn abandon_running(&self) {
        self.abandon.cancel();
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = IdempotencyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdempotencyService {
            inner,
            routes: Arc::clone(&self.routes),
            tasks: self.tasks.clone(),
            abandon: self.abandon.clone(),
            running: Arc::clone(&self.running),
            buffered: Arc::clone(&self.buffered),
        }
    }
}
