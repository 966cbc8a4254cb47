//! An axum app whose `POST /payments` is made safe to retry by the idem tower layer: the
//! handler (which would charge a card) runs once per Idempotency-Key, and retries get the
//! stored response.
//!
//! Run with `cargo run -p axum-app`, then:
//!
//! ```text
//! curl -i -X POST -H 'Idempotency-Key: pay-1' -d '{"amount":100}' http://127.0.0.1:3001/payments
//! curl -i -X POST -H 'Idempotency-Key: pay-1' -d '{"amount":100}' http://127.0.0.1:3001/payments
//! ```
//!
//! The second answer carries `idempotent-replayed: true` and the same payment id.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use idem_core::{Engine, EngineConfig, MemoryStore, SystemClock};
use idem_http::{IdempotencyConfig, IdempotencyLayer};
use serde_json::{Value, json};

/// Counts charges: the effect that must happen once per key.
#[derive(Debug, Default)]
pub struct Ledger {
    charges: AtomicU64,
}

impl Ledger {
    pub fn charges(&self) -> u64 {
        self.charges.load(Ordering::SeqCst)
    }
}

async fn charge(State(ledger): State<Arc<Ledger>>, body: String) -> (StatusCode, Json<Value>) {
    let id = ledger.charges.fetch_add(1, Ordering::SeqCst) + 1;
    (StatusCode::CREATED, Json(json!({ "payment_id": format!("pay_{id}"), "request": body })))
}

/// The app: payments need a key; everything else passes through the layer untouched.
pub fn app(ledger: Arc<Ledger>, engine: Engine) -> Router {
    Router::new()
        .route("/payments", post(charge))
        .route("/health", get(|| async { "ok" }))
        .with_state(ledger)
        .layer(IdempotencyLayer::new(engine, IdempotencyConfig::default().require_key(true)))
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let engine = Engine::new(MemoryStore::new(), SystemClock, EngineConfig::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3001").await?;
    println!("axum-app listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app(Arc::default(), engine)).await
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;

    fn payment(key: Option<&str>, body: &'static str) -> Request<Body> {
        let mut request = Request::post("/payments");
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        request.body(Body::from(body)).unwrap()
    }

    #[tokio::test]
    async fn the_layer_makes_an_axum_handler_run_once_per_key() {
        let ledger = Arc::new(Ledger::default());
        let engine = Engine::new(MemoryStore::new(), SystemClock, EngineConfig::default());
        let app = app(Arc::clone(&ledger), engine);

        let first = app.clone().oneshot(payment(Some("pay-1"), r#"{"amount":100}"#)).await.unwrap();
        assert_eq!(first.status(), StatusCode::CREATED);
        let first_body = first.into_body().collect().await.unwrap().to_bytes();

        let retry = app.clone().oneshot(payment(Some("pay-1"), r#"{"amount":100}"#)).await.unwrap();
        assert_eq!(retry.status(), StatusCode::CREATED);
        assert_eq!(retry.headers()["idempotent-replayed"], "true");
        assert_eq!(retry.into_body().collect().await.unwrap().to_bytes(), first_body);

        let other = app.clone().oneshot(payment(Some("pay-1"), r#"{"amount":999}"#)).await.unwrap();
        assert_eq!(other.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let missing = app.clone().oneshot(payment(None, r#"{"amount":100}"#)).await.unwrap();
        assert_eq!(missing.status(), StatusCode::BAD_REQUEST);
        assert_eq!(missing.headers()["content-type"], "application/problem+json");
        let health =
            app.oneshot(Request::get("/health").body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(health.status(), StatusCode::OK);

        assert_eq!(ledger.charges(), 1, "one charge for four requests");
    }
}
