//! Trace context through the outbox: an event enqueued inside a traced request carries the
//! `traceparent` of a producer span (a child of that request's span) in its headers, which
//! every relay publishes as a message header; the consumer's span for the message links to it.
//! A link, not a parent: a message may be handled long after, and more than once.

use tracing::Span;

use crate::consume::Received;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
use crate::outbox::{Event, MAX_HEADERS};

#[cfg(any(feature = "postgres", feature = "sqlite"))]
/// The span of one enqueue, a child of the caller's current span.
pub(crate) fn producer_span(event: &Event<'_>) -> Span {
    tracing::info_span!(
        target: idem_trace::TARGET,
        "idem.outbox.enqueue",
        otel.kind = "producer",
        messaging.destination.name = event.topic,
    )
}

#[cfg(any(feature = "postgres", feature = "sqlite"))]
/// The trace context to add to the event's headers: the producer span's `traceparent` (and
/// `tracestate`), unless the caller set a `traceparent` of its own (which wins) or the event
/// already has as many headers as it may.
pub(crate) fn context_for(span: &Span, event: &Event<'_>) -> Vec<(&'static str, String)> {
    let has_own =
        event.headers.iter().any(|(name, _)| name.eq_ignore_ascii_case(idem_trace::TRACEPARENT));
    if has_own || event.headers.len() + 2 > MAX_HEADERS {
        return Vec::new();
    }
    idem_trace::context_pairs(span)
}

#[cfg(any(feature = "postgres", feature = "sqlite"))]
/// The event's headers and the trace context, flattened name, value, name, value, ... as
/// both outboxes store them.
pub(crate) fn flat_headers<'a>(
    event: &Event<'a>,
    context: &'a [(&'static str, String)],
) -> Vec<&'a str> {
    event
        .headers
        .iter()
        .map(|(name, value)| (*name, *value))
        .chain(context.iter().map(|(name, value)| (*name, value.as_str())))
        .flat_map(|(name, value)| [name, value])
        .collect()
}

/// The span of one attempt at handling a message: a root span (not a child of whatever span
/// the runner was started in) linked to the producer's span when the message carries its
/// `traceparent`.
pub(crate) fn consumer_span(message: &Received) -> Span {
    let span = tracing::info_span!(
        target: idem_trace::TARGET,
        parent: None,
        "idem.consume",
        otel.kind = "consumer",
        messaging.message.id = message.id.as_str(),
        messaging.destination.name = message.subject.as_str(),
        // Signed: `tracing-opentelemetry` exports unsigned integers as text.
        idem.attempt = i64::try_from(message.attempt).unwrap_or(i64::MAX),
    );
    idem_trace::link_from_pairs(&span, &message.headers);
    span
}
