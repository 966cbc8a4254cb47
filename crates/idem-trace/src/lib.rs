//! W3C trace context (`traceparent`, `tracestate`) for idem, in one place: read from a
//! request's headers or a message's headers, written into the headers of a request to the
//! upstream or of an outbox event, on [`tracing`] spans bridged to OpenTelemetry by
//! [`tracing_opentelemetry`].
//!
//! Every function here works on a `tracing` span and does nothing (cheaply) when the process
//! has no OpenTelemetry layer installed: no context is read into a span that nobody exports,
//! and none is written out.
//!
//! ```
//! use idem_trace::{TRACEPARENT, inject_http, set_parent_from_http};
//!
//! let mut incoming = http::HeaderMap::new();
//! incoming.insert(TRACEPARENT, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".parse().unwrap());
//! let span = tracing::info_span!(target: idem_trace::TARGET, "idem.request");
//! set_parent_from_http(&span, &incoming);
//! let mut outgoing = http::HeaderMap::new();
//! // Without an OpenTelemetry layer nothing is written: the incoming context passes as is.
//! inject_http(&span, &mut outgoing);
//! assert!(outgoing.get(TRACEPARENT).is_none());
//! ```

use http::{HeaderMap, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The `tracing` target of idem's own spans (the gateway's request span, the outbox's
/// producer span, the consumer's span): what a subscriber filters on to export them, or to
/// keep them out of its logs.
pub const TARGET: &str = "idem_trace";

/// The W3C Trace Context header naming the caller's span.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C Trace Context header carrying vendors' state along with it.
pub const TRACESTATE: &str = "tracestate";

/// The longest `tracestate` carried on (W3C: at most 32 list members; 512 bytes is what the
/// specification asks every implementation to propagate at least).
const MAX_TRACESTATE_BYTES: usize = 512;

/// The span context a request's `traceparent`/`tracestate` headers name, if they name a valid
/// one.
pub fn context_from_http(headers: &HeaderMap) -> Option<SpanContext> {
    valid(TraceContextPropagator::new().extract(&HttpHeaders(headers)))
}

/// The span context a message's headers name (names matched case-insensitively: brokers and
/// clients differ in how they keep a header name's case), if they name a valid one.
pub fn context_from_pairs(headers: &[(String, String)]) -> Option<SpanContext> {
    valid(TraceContextPropagator::new().extract(&Pairs(headers)))
}

/// Makes `span` a child of the span the request's headers name, unless it already has a
/// parent with a trace of its own (an application's span around the layer): a client's
/// `traceparent` continues its trace into the gateway. Call before the span is entered.
pub fn set_parent_from_http(span: &Span, headers: &HeaderMap) {
    if span.is_disabled() || has_trace(&Span::current()) {
        return;
    }
    if let Some(parent) = context_from_http(headers) {
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(parent));
    }
}

/// Links `span` to the span a message's headers name: the producer that enqueued it, which
/// may have ended long before (a link, not a parent: a message is handled later, maybe more
/// than once).
pub fn link_from_pairs(span: &Span, headers: &[(String, String)]) {
    if span.is_disabled() {
        return;
    }
    if let Some(producer) = context_from_pairs(headers) {
        span.add_link(producer);
    }
}

/// Writes `traceparent` (and `tracestate`, if any) naming `span` into `headers`, replacing
/// any already there. Leaves `headers` untouched when `span` is not exported (no
/// OpenTelemetry layer, or the span filtered out): a client's own `traceparent` then passes
/// through unchanged.
pub fn inject_http(span: &Span, headers: &mut HeaderMap) {
    for (name, value) in context_pairs(span) {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    }
}

/// The `traceparent` (and `tracestate`, if any) naming `span`, as header pairs for a message;
/// empty when `span` is not exported.
pub fn context_pairs(span: &Span) -> Vec<(&'static str, String)> {
    if span.is_disabled() {
        return Vec::new();
    }
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return Vec::new();
    }
    let mut out = Collected(Vec::with_capacity(2));
    TraceContextPropagator::new().inject_context(&context, &mut out);
    out.0
}

fn has_trace(span: &Span) -> bool {
    !span.is_disabled() && span.context().span().span_context().is_valid()
}

fn valid(context: opentelemetry::Context) -> Option<SpanContext> {
    let span_context = context.span().span_context().clone();
    span_context.is_valid().then_some(span_context)
}

struct HttpHeaders<'a>(&'a HeaderMap);

impl Extractor for HttpHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        let value = self.0.get(key)?.to_str().ok()?;
        bounded(key, value)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct Pairs<'a>(&'a [(String, String)]);

impl Extractor for Pairs<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        let (_, value) = self.0.iter().find(|(name, _)| name.eq_ignore_ascii_case(key))?;
        bounded(key, value)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name.as_str()).collect()
    }
}

/// A `tracestate` past its bound is dropped (the `traceparent` alone still carries the
/// trace), never parsed.
fn bounded<'a>(key: &str, value: &'a str) -> Option<&'a str> {
    (key != TRACESTATE || value.len() <= MAX_TRACESTATE_BYTES).then_some(value)
}

struct Collected(Vec<(&'static str, String)>);

impl Injector for Collected {
    fn set(&mut self, key: &str, value: String) {
        let name = match key {
            TRACEPARENT => TRACEPARENT,
            TRACESTATE if !value.is_empty() => TRACESTATE,
            _ => return,
        };
        self.0.push((name, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
    use tracing_subscriber::layer::SubscriberExt;

    const CLIENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    /// A client's context continues into the span, and what is written out names the span
    /// itself in the same trace; a message's context becomes a link, not a parent; a garbled
    /// header is ignored, not an error.
    #[test]
    fn contexts_travel_in_and_out_of_spans() {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let mut headers = HeaderMap::new();
            headers.insert(TRACEPARENT, CLIENT.parse().unwrap());
            headers.insert(TRACESTATE, "vendor=abc".parse().unwrap());
            let span = tracing::info_span!(target: TARGET, "server");
            set_parent_from_http(&span, &headers);
            let mut upstream = HeaderMap::new();
            upstream.insert(TRACEPARENT, "garbage".parse().unwrap());
            inject_http(&span, &mut upstream);
            let written = upstream.get(TRACEPARENT).unwrap().to_str().unwrap().to_owned();
            assert!(written.starts_with("00-0af7651916cd43dd8448eb211c80319c-"), "{written}");
            assert_ne!(written, CLIENT, "names the server span, not the client's");
            assert_eq!(upstream.get(TRACESTATE).unwrap(), "vendor=abc");

            let pairs: Vec<(String, String)> = context_pairs(&span)
                .into_iter()
                .map(|(name, value)| (name.to_uppercase(), value))
                .collect();
            let consumer = tracing::info_span!(target: TARGET, "consumer");
            link_from_pairs(&consumer, &pairs);
            drop(consumer);
            drop(span);

            let mut garbled = HeaderMap::new();
            garbled.insert(TRACEPARENT, "00-zz-yy-01".parse().unwrap());
            assert!(context_from_http(&garbled).is_none());
            assert!(context_from_http(&HeaderMap::new()).is_none());
        });
        let spans = exporter.get_finished_spans().unwrap();
        let server = spans.iter().find(|span| span.name == "server").unwrap();
        let consumer = spans.iter().find(|span| span.name == "consumer").unwrap();
        assert_eq!(format!("{:032x}", server.span_context.trace_id()), &CLIENT[3..35]);
        assert_eq!(format!("{:016x}", server.parent_span_id), &CLIENT[36..52]);
        assert_ne!(consumer.span_context.trace_id(), server.span_context.trace_id());
        assert_eq!(consumer.links.links.len(), 1);
        let link = &consumer.links.links[0].span_context;
        assert_eq!(link.trace_id(), server.span_context.trace_id());
        assert_eq!(link.span_id(), server.span_context.span_id());
        assert!(link.is_remote(), "a link read from a message names a remote span");
    }

    /// Without an OpenTelemetry layer nothing is read or written.
    #[test]
    fn without_a_layer_nothing_is_written() {
        let span = tracing::info_span!(target: TARGET, "server");
        let mut headers = HeaderMap::new();
        headers.insert(TRACEPARENT, CLIENT.parse().unwrap());
        set_parent_from_http(&span, &headers);
        inject_http(&span, &mut headers);
        assert_eq!(headers.get(TRACEPARENT).unwrap(), CLIENT);
        assert!(context_pairs(&span).is_empty());
    }
}
