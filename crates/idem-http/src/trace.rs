//! The span each request gets (`idem.request`, exported through OpenTelemetry when the
//! process installs a layer for it; see `idem_trace`), and what is recorded on it: method,
//! path, status, the key's hash and the request's outcome.
//!
//! The outcome is recorded once per request, where it is decided, on the current span: the
//! request's future runs in it, and so does the task a claimed call goes on in.

use http::{Request, Response};
use idem_core::{Begin, Error, RecordKey};
use tracing::Span;

/// The span of one request: a server span, a child of the client's trace when its headers
/// carry a `traceparent`.
pub(crate) fn request_span<B>(request: &Request<B>) -> Span {
    let span = tracing::info_span!(
        target: idem_trace::TARGET,
        "idem.request",
        otel.kind = "server",
        http.request.method = request.method().as_str(),
        url.path = request.uri().path(),
        http.response.status_code = tracing::field::Empty,
        idem.outcome = tracing::field::Empty,
        idem.key_hash = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    idem_trace::set_parent_from_http(&span, request.headers());
    span
}

/// Records the status the client got (a server error marks the span as failed).
pub(crate) fn record_response<B>(span: &Span, response: &Response<B>) {
    let status = response.status();
    // As a signed integer: `tracing-opentelemetry` exports unsigned ones as text.
    span.record("http.response.status_code", i64::from(status.as_u16()));
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
}

/// What became of the request: `run`, `replay`, `conflict`, `mismatch`, `unknown`,
/// `pass-through` or `rejected`.
pub(crate) fn outcome(outcome: &'static str) {
    Span::current().record("idem.outcome", outcome);
}

/// The record's digest (scope and key hashed together, as stores name it): it tells requests
/// of one key apart without showing the key or the caller.
pub(crate) fn key_hash(key: &RecordKey) {
    let span = Span::current();
    if span.is_disabled() {
        return;
    }
    let hash: String = key.digest().iter().map(|byte| format!("{byte:02x}")).collect();
    span.record("idem.key_hash", hash.as_str());
}

/// The outcome the engine's answer decides. A claim's outcome is recorded when its call ends
/// (`run`, or `unknown`); a store failure that fails open is recorded as it passes through.
pub(crate) fn begun(begun: &Result<Begin, Error>, fail_open: bool) {
    let decided = match begun {
        Ok(Begin::Run(_)) => return,
        Ok(Begin::Replay(_)) => "replay",
        Ok(Begin::Mismatch) => "mismatch",
        Ok(Begin::InFlight { .. }) => "conflict",
        Err(error) if fail_open && error.is_unavailable() => return,
        Err(_) => "rejected",
    };
    outcome(decided);
}
