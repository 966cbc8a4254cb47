//! `idem serve`: the reverse proxy that gives any HTTP service Idempotency-Key semantics.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use idem_core::{Engine, EngineConfig, StoreClock, SystemClock};
use idem_http::{IdempotencyConfig, IdempotencyLayer, IdempotencyService};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::Layer;

use crate::config::ServeConfig;
use crate::guard::BodyRules;
use crate::proxy::Proxy;

/// Records deleted per sweep batch, and batches per sweep: bounds on how long one sweep holds
/// the store.
const SWEEP_BATCH: usize = 1_000;
const SWEEP_MAX_BATCHES: usize = 100;

/// What one request's header block may hold: refused past these with a `431` problem. The HTTP
/// parser is given room beyond them (`PARSER_MAX_HEADERS`, and hyper's 408 KiB read buffer) so
/// that a client a little over the limit, the usual careless case (cookies piling up), is told
/// why in a problem body; only a block past the parser's own room gets its bare `431`.
pub const MAX_REQUEST_HEADERS: usize = 100;
pub const MAX_REQUEST_HEADER_BYTES: usize = 64 * 1024;
const PARSER_MAX_HEADERS: usize = 4 * MAX_REQUEST_HEADERS;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Store(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("metrics: {0}")]
    Metrics(String),
}

/// Installs the Prometheus recorder once per process.
pub fn install_metrics() -> Result<PrometheusHandle, ServeError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("idem_store_duration_seconds".into()),
            &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0],
        )
        .map_err(|error| ServeError::Metrics(error.to_string()))?
        .install_recorder()
        .map_err(|error| ServeError::Metrics(error.to_string()))?;
    Ok(handle)
}

/// Runs the gateway until `shutdown` resolves, then drains: stops accepting, lets open
/// requests finish and waits for claimed requests to store their outcome (each bounded by
/// `shutdown_timeout`).
pub async fn run(
    config: ServeConfig,
    metrics: PrometheusHandle,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let store = crate::store::open(&config.store).await.map_err(ServeError::Store)?;
    // A store that answers but cannot take a write would fail every keyed request: refuse now.
    store.ping().await.map_err(|error| {
        ServeError::Store(format!(
            "--store {}: the store cannot take a write: {}",
            crate::secrets::redact(&config.store),
            crate::secrets::scrub(&error.to_string(), &config.store)
        ))
    })?;
    // Leases and expiry on the store's clock where it has one, so that gateways whose clocks
    // disagree still agree on when a lease ends.
    let clock = StoreClock::start(Arc::clone(&store), SystemClock)
        .await
        .map_err(|error| ServeError::Store(format!("cannot read the store's clock: {error}")))?;
    let engine = Engine::from_shared(
        Arc::clone(&store),
        Arc::new(clock),
        EngineConfig { lease: config.lease, ttl: config.ttl },
    );
    let rules = config.routes.iter().cloned();
    let held = idem_http::HeldKeys::new(crate::admin::HELD_KEYS_KEPT);
    let running = idem_http::RunningKeys::new();
    let layer = IdempotencyLayer::new(
        engine.clone(),
        rules
            .fold(IdempotencyConfig::default(), IdempotencyConfig::route)
            .methods(config.methods.clone())
            .require_key(config.require_key)
            .scope_sources(config.scope_sources.clone())
            .fingerprint_headers(config.fingerprint_headers.clone())
            .max_request_body(config.max_request_body)
            .max_stored_body(config.max_stored_body)
            .fail_open(config.fail_open)
            .response_timeout(Some(config.upstream_timeout))
            .abandon_after(Some(config.upstream_abandon_after))
            .unknown_outcome(config.unknown_outcome)
            .max_wait(config.max_wait)
            .max_running(config.max_connections)
            .max_buffered(config.max_buffered_bodies)
            .held_keys(held.clone())
            .running_keys(running.clone()),
    );
    let connect_timeout = config.upstream_timeout.min(Duration::from_secs(10));
    let proxy = Proxy::new(&config.upstream, connect_timeout, config.upstream_abandon_after);
    let service = layer.layer(proxy);

    let listener = bind(config.listen).await?;
    let admin_listener = bind(config.admin_listen).await?;
    let listen = listener
        .local_addr()
        .map_err(|source| ServeError::Listen { addr: config.listen, source })?;
    let admin = admin_listener
        .local_addr()
        .map_err(|source| ServeError::Listen { addr: config.admin_listen, source })?;

    let admin_config = crate::admin::AdminConfig {
        token: config.admin_token.as_deref().map(crate::admin::AdminToken::new),
        stuck_after: config.stuck_after,
        outbox_database: config.outbox_database.clone(),
        dead_letters_database: config.dead_letters_database.clone(),
        dead_letters_broker: config.dead_letters_broker.clone(),
        dead_letters_exchange: config.dead_letters_exchange.clone(),
        store_name: crate::store::redact(&config.store).to_string(),
    };
    let (router, sampler) =
        crate::admin::router(engine.clone(), metrics.clone(), (held, running), admin_config);
    drop(store);
    let admin_task = tokio::spawn(async move {
        let upkeep = async {
            // The recorder has no thread of its own here; without upkeep, histograms grow.
            let mut every = tokio::time::interval(Duration::from_secs(5));
            loop {
                every.tick().await;
                metrics.run_upkeep();
            }
        };
        tokio::select! {
            result = axum::serve(admin_listener, router) => if let Err(error) = result {
                tracing::error!(%error, "admin listener stopped");
            },
            () = upkeep => {}
            () = sampler => {}
        }
    });
    let sweeper = tokio::spawn(sweep_forever(engine, config.sweep_interval));

    tracing::info!(%listen, %admin, upstream = %config.upstream, store = %crate::store::redact(&config.store), "idem gateway ready");
    // One line on stdout, for people and for scripts that wait for readiness.
    println!("idem listening on http://{listen} (admin http://{admin}) -> {}", config.upstream);

    let body_rules = BodyRules::new(
        config.request_body_timeout,
        config.request_body_min_rate as u64,
        (config.max_connections / 4).max(1),
    );
    let graceful = GracefulShutdown::new();
    let connections = Arc::new(Semaphore::new(config.max_connections));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
            tracing::warn!(%peer, limit = config.max_connections, "connection limit reached; closing new connection");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(30))
            .max_headers(PARSER_MAX_HEADERS)
            .serve_connection(TokioIo::new(stream), guarded(service.clone(), body_rules.clone()));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
            drop(permit);
        });
    }

    tracing::info!("shutting down: no new connections; finishing open requests");
    drop(listener);
    if tokio::time::timeout(config.shutdown_timeout, graceful.shutdown()).await.is_err() {
        tracing::warn!(timeout = ?config.shutdown_timeout, "open connections did not finish in time");
    }
    let tasks = layer.tasks();
    tasks.close();
    if tokio::time::timeout(config.shutdown_timeout, tasks.wait()).await.is_err() {
        // Calls still running are given up: each key is settled as an unknown outcome (held,
        // or left to its lease), never left to be run again as if nothing had happened.
        tracing::warn!(
            still_running = tasks.len(),
            "claimed requests did not finish in time; settling their keys as unknown outcomes"
        );
        layer.abandon_running();
        if tokio::time::timeout(Duration::from_secs(10), tasks.wait()).await.is_err() {
            tracing::warn!(
                still_running = tasks.len(),
                "could not store every unknown outcome; those keys free themselves when their leases expire"
            );
        }
    }
    sweeper.abort();
    admin_task.abort();
    tracing::info!("stopped");
    Ok(())
}

/// The gateway's service for one connection, every request body read under `rules`.
fn guarded(
    service: IdempotencyService<Proxy>,
    rules: BodyRules,
) -> impl hyper::service::Service<
    http::Request<hyper::body::Incoming>,
    Response = http::Response<idem_http::Body>,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<http::Response<idem_http::Body>, std::convert::Infallible>>
             + Send,
> + Clone {
    hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
        let refusal = headers_too_large(&request);
        let request = request.map(|body| rules.guard(body));
        let service = service.clone();
        async move {
            if let Some(refusal) = refusal {
                return Ok(refusal);
            }
            tower::ServiceExt::oneshot(service, request).await
        }
    })
}

/// A `431` problem for a header block over the gateway's limits; the body is left unread and
/// the connection closed after the answer.
fn headers_too_large<B>(request: &http::Request<B>) -> Option<http::Response<idem_http::Body>> {
    let headers = request.headers();
    let bytes: usize =
        headers.iter().map(|(name, value)| name.as_str().len() + value.len() + 4).sum();
    let detail = if headers.len() > MAX_REQUEST_HEADERS {
        format!("{} header fields; at most {MAX_REQUEST_HEADERS} are taken", headers.len())
    } else if bytes > MAX_REQUEST_HEADER_BYTES {
        format!("{bytes} bytes of header fields; at most {MAX_REQUEST_HEADER_BYTES} are taken")
    } else {
        return None;
    };
    metrics::counter!("idem_rejected_total", "reason" => idem_http::ProblemKind::HeadersTooLarge.slug())
        .increment(1);
    let mut response = idem_http::problem(idem_http::ProblemKind::HeadersTooLarge, detail);
    response
        .headers_mut()
        .insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
    Some(response)
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr).await.map_err(|source| ServeError::Listen { addr, source })
}

async fn sweep_forever(engine: Engine, interval: Duration) {
    let mut every = tokio::time::interval(interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        match engine.sweep_expired(SWEEP_BATCH, SWEEP_MAX_BATCHES).await {
            Ok(0) => {}
            Ok(deleted) => tracing::debug!(deleted, "swept expired records"),
            Err(error) => tracing::warn!(%error, "sweeping expired records failed; will try again"),
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}
