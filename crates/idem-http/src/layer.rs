use std::sync::Arc;

use http::{HeaderName, Method, header};
use idem_core::Engine;
use tokio_util::task::TaskTracker;
use tower::Layer;

use crate::IdempotencyService;

/// What the layer applies to, and its limits.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct IdempotencyConfig {
    /// Methods that get idempotency handling; others pass straight through.
    pub methods: Vec<Method>,
    /// Refuse requests of those methods that carry no key (400), instead of passing them.
    pub require_key: bool,
    /// The header whose value identifies the caller (hashed, never stored raw). `None` puts
    /// every caller in one scope.
    pub scope_header: Option<HeaderName>,
    /// Headers that are part of the fingerprint besides method, path, query and body.
    pub fingerprint_headers: Vec<HeaderName>,
    /// Request bodies over this many bytes get 413 before anything runs.
    pub max_request_body: usize,
    /// Response bodies over this many bytes stream through and are stored without their body.
    pub max_stored_body: usize,
    /// When the store is unreachable, forward the request without idempotency instead of
    /// answering 503.
    pub fail_open: bool,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        Self {
            methods: vec![Method::POST, Method::PATCH],
            require_key: false,
            scope_header: Some(header::AUTHORIZATION),
            fingerprint_headers: Vec::new(),
            max_request_body: 10 * 1024 * 1024,
            max_stored_body: 1024 * 1024,
            fail_open: false,
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

    pub fn scope_header(mut self, header: Option<HeaderName>) -> Self {
        self.scope_header = header;
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
}

/// Gives the wrapped service Idempotency-Key semantics. See the crate docs.
#[derive(Debug, Clone)]
pub struct IdempotencyLayer {
    pub(crate) engine: Engine,
    pub(crate) config: Arc<IdempotencyConfig>,
    pub(crate) tasks: TaskTracker,
}

impl IdempotencyLayer {
    pub fn new(engine: Engine, config: IdempotencyConfig) -> Self {
        Self { engine, config: Arc::new(config), tasks: TaskTracker::new() }
    }

    /// The tasks that finish claimed requests (even after their client left). A server that
    /// shuts down gracefully closes and waits on this so that no outcome is lost.
    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = IdempotencyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdempotencyService {
            inner,
            engine: self.engine.clone(),
            config: Arc::clone(&self.config),
            tasks: self.tasks.clone(),
        }
    }
}
