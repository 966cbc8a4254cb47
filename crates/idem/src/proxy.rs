//! The upstream half of the gateway: forwards a request to the protected service.
//!
//! Hop-by-hop headers are dropped both ways; every other header, the `Idempotency-Key`
//! included, goes through, so an upstream that honours the key deduplicates too.
//!
//! Failures are told apart by whether the upstream may have acted:
//! - nothing was sent (the connection was refused or failed to open, or a pooled connection
//!   closed before the request was written): `502 upstream-unreachable`, which the
//!   idempotency layer treats like any 5xx (the key is released and a retry runs again);
//! - the request was sent, all or part of it, and the connection then broke before a whole
//!   response: `502 outcome-unknown`, marked [`OutcomeUnknown`] so that the layer never
//!   releases the key at once.
//!
//! How long the client waits is the layer's business (`--upstream-timeout`); the proxy itself
//! only bounds connecting, and silence in a response body (`--upstream-abandon-after`).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri, header};
use http_body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use idem_core::BoxError;
use idem_http::{Body, OutcomeUnknown, ProblemKind, problem, remove_hop_by_hop};
use tower::Service;

#[derive(Debug, Clone)]
pub struct Proxy {
    client: Client<HttpConnector, Body>,
    scheme: Scheme,
    authority: Authority,
    /// The upstream URL's path without its trailing slash, prefixed to every request path.
    base_path: String,
    /// The longest silence accepted in a response body.
    idle_timeout: Duration,
}

impl Proxy {
    /// `connect_timeout` bounds opening a connection; `idle_timeout` the silence between two
    /// parts of a response body.
    pub fn new(upstream: &Uri, connect_timeout: Duration, idle_timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        let client = Client::builder(TokioExecutor::new())
            // Shorter than most servers' keep-alive (Node, Apache, uvicorn: 5 s), so that a
            // request is rarely written onto a connection its upstream is just closing: that
            // race looks like a request sent and cut off, an unknown outcome.
            .pool_idle_timeout(Duration::from_secs(4))
            .pool_max_idle_per_host(256)
            .build(connector);
        Self {
            client,
            scheme: upstream.scheme().cloned().unwrap_or(Scheme::HTTP),
            authority: upstream.authority().cloned().expect("validated upstream has a host"),
            base_path: upstream.path().trim_end_matches('/').to_owned(),
            idle_timeout,
        }
    }

    fn upstream_uri(&self, uri: &Uri) -> Result<Uri, http::Error> {
        let path_and_query = uri.path_and_query().map_or("/", PathAndQuery::as_str);
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(format!("{}{}", self.base_path, path_and_query))
            .build()
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl Service<Request<Body>> for Proxy {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The client pools connections itself and is always ready to take a request.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let (mut parts, body) = request.into_parts();
        let uri = match self.upstream_uri(&parts.uri) {
            Ok(uri) => uri,
            Err(error) => {
                let response = problem(
                    ProblemKind::Internal,
                    format!("cannot build the upstream URL: {error}"),
                );
                return Box::pin(async move { Ok(response) });
            }
        };
        parts.uri = uri;
        remove_hop_by_hop(&mut parts.headers);
        // The client sets Host from the upstream URL, as a reverse proxy should.
        parts.headers.remove(header::HOST);
        // The upstream continues the trace from the gateway's request span (when traces are
        // exported; otherwise the client's own `traceparent` passes through untouched).
        idem_trace::inject_http(&tracing::Span::current(), &mut parts.headers);
        let forwarded = self.client.request(Request::from_parts(parts, body));
        let timeout = self.idle_timeout;
        Box::pin(async move {
            let response = match forwarded.await {
                Ok(response) => response,
                Err(error) if caused_by_slow_body(&error) => {
                    // The client's own body stalled while it streamed through (a request
                    // without a key): its fault, not the upstream's.
                    return Ok(problem(
                        ProblemKind::BodyTooSlow,
                        "the request body arrived too slowly and was cut off; it carried no Idempotency-Key, so whether the upstream acted on part of it is unknown",
                    ));
                }
                Err(error) if nothing_sent(&error) => {
                    tracing::warn!(error = %error_chain(&error), "upstream unreachable; nothing was sent");
                    metrics::counter!("idem_upstream_unreachable_total").increment(1);
                    return Ok(problem(
                        ProblemKind::UpstreamUnreachable,
                        "the upstream could not be reached and nothing was sent to it; a retry runs again",
                    ));
                }
                Err(error) => {
                    tracing::warn!(error = %error_chain(&error), "the upstream connection broke after the request was sent");
                    let mut response = problem(
                        ProblemKind::OutcomeUnknown,
                        "the upstream took the request, then the connection broke before a whole response: whether it ran is unknown",
                    );
                    response.extensions_mut().insert(OutcomeUnknown("connection-broke"));
                    return Ok(response);
                }
            };
            let (mut parts, body) = response.into_parts();
            remove_hop_by_hop(&mut parts.headers);
            let body =
                IdleTimeout { inner: body, timeout, sleep: Box::pin(tokio::time::sleep(timeout)) };
            Ok(Response::from_parts(parts, Body::new(body)))
        })
    }
}

/// Whether the request failed because its own body was cut off for arriving too slowly.
fn caused_by_slow_body(error: &hyper_util::client::legacy::Error) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if cause.is::<idem_http::BodyTooSlow>() {
            return true;
        }
        source = cause.source();
    }
    false
}

/// Whether the upstream cannot have seen any of the request: the connection never opened, or
/// the client gave the request back unwritten (hyper's "canceled": a pooled connection that
/// closed before the request was written; the client retries those itself on a fresh
/// connection when it can). Anything else may have reached the upstream.
fn nothing_sent(error: &hyper_util::client::legacy::Error) -> bool {
    if error.is_connect() {
        return true;
    }
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(hyper_error) = cause.downcast_ref::<hyper::Error>() {
            return hyper_error.is_canceled();
        }
        source = cause.source();
    }
    false
}

/// Fails the body if the upstream sends nothing for `timeout`: a stalled upstream would
/// otherwise hold its key in flight (with the lease renewed) for as long as the gateway runs.
struct IdleTimeout<B> {
    inner: B,
    timeout: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl<B> http_body::Body for IdleTimeout<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let deadline = tokio::time::Instant::now() + self.timeout;
                self.sleep.as_mut().reset(deadline);
                Poll::Ready(frame.map(|frame| frame.map_err(Into::into)))
            }
            Poll::Pending => match self.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(format!(
                    "the upstream sent no part of its response body for {:?}",
                    self.timeout
                )
                .into()))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
