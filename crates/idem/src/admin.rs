//! The admin listener: `/healthz` for load balancers and `/metrics` for Prometheus.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use idem_core::Store;
use metrics_exporter_prometheus::PrometheusHandle;

#[derive(Clone)]
struct AdminState {
    store: Arc<dyn Store>,
    metrics: PrometheusHandle,
}

pub fn router(store: Arc<dyn Store>, metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(render_metrics))
        .with_state(AdminState { store, metrics })
}

/// Healthy when the store answers, and takes a write, within two seconds.
async fn healthz(State(state): State<AdminState>) -> Response {
    match tokio::time::timeout(Duration::from_secs(2), state.store.ping()).await {
        Ok(Ok(())) => (StatusCode::OK, "ok\n").into_response(),
        Ok(Err(error)) => {
            (StatusCode::SERVICE_UNAVAILABLE, format!("the store cannot take a write: {error}\n"))
                .into_response()
        }
        Err(_) => {
            (StatusCode::SERVICE_UNAVAILABLE, "store did not answer within 2s\n").into_response()
        }
    }
}

async fn render_metrics(State(state): State<AdminState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render()).into_response()
}
