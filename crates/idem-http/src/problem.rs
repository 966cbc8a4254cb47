//! RFC 9457 problem responses: every refusal says what went wrong and what to do.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::Body;

/// Each refusal the layer (and the gateway) can make. The `type` URI of each is
/// `urn:idem:problem:<slug>`, documented in the README.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProblemKind {
    InvalidKey,
    MultipleKeys,
    MissingKey,
    BodyTooLarge,
    UnreadableBody,
    BodyTooSlow,
    HeadersTooLarge,
    KeyMismatch,
    InFlight,
    StoreUnavailable,
    CorruptRecord,
    UpstreamUnreachable,
    UpstreamTimeout,
    OutcomeUnknown,
    Overloaded,
    Internal,
}

impl ProblemKind {
    pub fn status(self) -> StatusCode {
        match self {
            Self::InvalidKey | Self::MultipleKeys | Self::MissingKey | Self::UnreadableBody => {
                StatusCode::BAD_REQUEST
            }
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTooSlow => StatusCode::REQUEST_TIMEOUT,
            Self::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::KeyMismatch => StatusCode::UNPROCESSABLE_ENTITY,
            Self::InFlight => StatusCode::CONFLICT,
            Self::StoreUnavailable | Self::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            Self::CorruptRecord | Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Self::UpstreamUnreachable | Self::OutcomeUnknown => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    pub fn slug(self) -> &'static str {
        match self {
            Self::InvalidKey => "invalid-key",
            Self::MultipleKeys => "multiple-keys",
            Self::MissingKey => "missing-key",
            Self::BodyTooLarge => "body-too-large",
            Self::UnreadableBody => "unreadable-body",
            Self::BodyTooSlow => "body-too-slow",
            Self::HeadersTooLarge => "headers-too-large",
            Self::KeyMismatch => "key-mismatch",
            Self::InFlight => "request-in-flight",
            Self::StoreUnavailable => "store-unavailable",
            Self::CorruptRecord => "corrupt-record",
            Self::UpstreamUnreachable => "upstream-unreachable",
            Self::UpstreamTimeout => "upstream-timeout",
            Self::OutcomeUnknown => "outcome-unknown",
            Self::Overloaded => "overloaded",
            Self::Internal => "internal",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Self::InvalidKey => "Invalid Idempotency-Key",
            Self::MultipleKeys => "More than one Idempotency-Key",
            Self::MissingKey => "Idempotency-Key required",
            Self::BodyTooLarge => "Request body too large",
            Self::UnreadableBody => "Request body could not be read",
            Self::BodyTooSlow => "Request body too slow",
            Self::HeadersTooLarge => "Request header fields too large",
            Self::KeyMismatch => "Idempotency-Key reused with a different request",
            Self::InFlight => "A request with this Idempotency-Key is in progress",
            Self::StoreUnavailable => "Idempotency store unavailable",
            Self::CorruptRecord => "Stored response could not be read",
            Self::UpstreamUnreachable => "Upstream unreachable",
            Self::UpstreamTimeout => "Upstream timed out",
            Self::OutcomeUnknown => "Outcome of the request unknown",
            Self::Overloaded => "Too busy to take the request",
            Self::Internal => "Internal error",
        }
    }
}

pub(crate) const PROBLEM_JSON: &str = "application/problem+json";

/// An `application/problem+json` response.
pub fn problem(kind: ProblemKind, detail: impl Into<String>) -> Response<Body> {
    let mut response = Response::new(full(problem_body(kind, detail)));
    *response.status_mut() = kind.status();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    response
}

/// The JSON body of a problem response.
pub(crate) fn problem_body(kind: ProblemKind, detail: impl Into<String>) -> Bytes {
    let body = serde_json::json!({
        "type": format!("urn:idem:problem:{}", kind.slug()),
        "title": kind.title(),
        "status": kind.status().as_u16(),
        "detail": detail.into(),
    });
    Bytes::from(body.to_string())
}

pub(crate) fn full(bytes: Bytes) -> Body {
    Body::from(bytes)
}

/// The error a request body fails with when its client sends it too slowly (the gateway's
/// body rules); the layer answers it with `408 body-too-slow`.
#[derive(Debug, Clone)]
pub struct BodyTooSlow(pub String);

impl std::fmt::Display for BodyTooSlow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BodyTooSlow {}
