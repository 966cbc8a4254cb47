//! A deliberately non-idempotent orders service: every POST /orders creates a new order, so
//! a retried request makes a duplicate. Put `idem serve` in front of it to see the duplicate go.
//!
//! Run with `cargo run -p orders-upstream` (listens on 127.0.0.1:3000, or the address given as
//! the first argument).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

#[derive(Default)]
struct Orders {
    created: AtomicU64,
}

async fn create_order(
    State(orders): State<Arc<Orders>>,
    body: String,
) -> (StatusCode, Json<Value>) {
    let id = orders.created.fetch_add(1, Ordering::SeqCst) + 1;
    (StatusCode::CREATED, Json(json!({ "order_id": id, "request": body })))
}

async fn count(State(orders): State<Arc<Orders>>) -> Json<Value> {
    Json(json!({ "orders_created": orders.created.load(Ordering::SeqCst) }))
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:3000".to_owned());
    let app = Router::new()
        .route("/orders", post(create_order))
        .route("/orders/count", get(count))
        .with_state(Arc::new(Orders::default()));
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("orders-upstream listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await
}
