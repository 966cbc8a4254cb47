//! A tower [`Layer`](tower::Layer) that gives any axum or hyper service `Idempotency-Key`
//! semantics, following draft-ietf-httpapi-idempotency-key-header.
//!
//! ```
//! use axum::{Router, routing::post};
//! use idem_core::{Engine, EngineConfig, MemoryStore, SystemClock};
//! use idem_http::{IdempotencyConfig, IdempotencyLayer};
//!
//! let engine = Engine::new(MemoryStore::new(), SystemClock, EngineConfig::default());
//! let app: Router = Router::new()
//!     .route("/orders", post(|| async { "order created" }))
//!     .layer(IdempotencyLayer::new(engine, IdempotencyConfig::default().require_key(true)));
//! # let _ = app;
//! ```
//!
//! What a request gets (POST and PATCH by default):
//! - no key: passed through (or `400` with `require_key`); an invalid key, an empty header or
//!   two `Idempotency-Key` headers: `400`;
//! - a body over `max_request_body`: `413`, nothing runs;
//! - first use of a key: the request runs on a task of its own (a client that disconnects,
//!   or gives up at `response_timeout` with a `504`, does not cancel it) and its response is
//!   stored if its status is below 500 and not 408, 409, 425 or 429; otherwise the key is
//!   released so a retry runs again;
//! - a call whose outcome is unknown (the inner service marks its response [`OutcomeUnknown`],
//!   its body breaks off, or it passes `abandon_after`): never released at once; held with a
//!   stored `502 outcome-unknown` (or left in flight until its lease expires), by
//!   [`UnknownOutcome`];
//! - a retry of a key in flight with `Prefer: wait=N`: waits for the first run's outcome, up to
//!   `max_wait`;
//! - same key, same request, completed: the stored response with `Idempotent-Replayed: true`;
//! - same key, different request: `422`; same key while the first still runs: `409` with
//!   `Retry-After`;
//! - store unreachable: `503` (or forwarded without idempotency with `fail_open`).
//!
//! Refusals are RFC 9457 `application/problem+json` responses.

mod body;
mod headers;
mod held;
mod in_transaction;
mod layer;
mod problem;
mod routes;
mod service;
mod stored;
mod trace;

pub use body::Body;
pub use headers::{IDEMPOTENCY_KEY, IDEMPOTENT_REPLAY, IDEMPOTENT_REPLAYED, remove_hop_by_hop};
pub use held::{HeldKey, HeldKeys, RunningKey, RunningKeys};
pub use in_transaction::InTransaction;
pub use layer::{IdempotencyConfig, IdempotencyLayer, OutcomeUnknown, ScopeSource, UnknownOutcome};
pub use problem::{BodyTooSlow, ProblemKind, problem};
pub use routes::{RouteError, RouteMatch, RouteRule};
pub use service::{IdempotencyService, is_stored};
pub use stored::StoredResponse;
