//! The payments service: `POST /payments {"account": "...", "cents": N}` with an
//! `Idempotency-Key` records the payment and its `payments.created` event in one transaction
//! (the transactional outbox). The idem layer, on the same PostgreSQL, makes client retries
//! safe.
//!
//! Run with `cargo run -p payments --bin payments -- --database postgres://... --listen 127.0.0.1:3100`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use clap::Parser;
use idem_core::{Engine, EngineConfig, SystemClock};
use idem_http::{IdempotencyConfig, IdempotencyLayer};
use idem_stream::postgres::{Event, Outbox};
use serde_json::{Value, json};

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, env = "PAYMENTS_DATABASE")]
    database: String,
    #[arg(long, default_value = "127.0.0.1:3100")]
    listen: String,
    /// The subject the events go to
    #[arg(long, default_value = "payments.created")]
    topic: String,
}

struct App {
    pool: deadpool_postgres::Pool,
    topic: String,
}

async fn create_payment(
    State(app): State<Arc<App>>,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let (Some(account), Some(cents)) = (body["account"].as_str(), body["cents"].as_i64()) else {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({ "error": "account (string) and cents (integer) are required" })),
        );
    };
    match record(&app, account, cents).await {
        Ok(id) => (
            StatusCode::CREATED,
            Json(json!({ "payment_id": id, "account": account, "cents": cents })),
        ),
        // A 5xx: the idem layer releases the key, so the client's retry runs again.
        Err(error) => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "error": error }))),
    }
}

/// The payment row and its event, in one transaction: both or neither.
async fn record(app: &App, account: &str, cents: i64) -> Result<i64, String> {
    let mut client = app.pool.get().await.map_err(|e| e.to_string())?;
    let transaction = client.transaction().await.map_err(|e| e.to_string())?;
    let id: i64 = transaction
        .query_one(
            "INSERT INTO payments (account, cents) VALUES ($1, $2) RETURNING id",
            &[&account, &cents],
        )
        .await
        .map_err(|e| e.to_string())?
        .get(0);
    let payload = json!({ "payment_id": id, "account": account, "cents": cents }).to_string();
    let event =
        Event { topic: &app.topic, key: account, payload: payload.as_bytes(), headers: &[] };
    Outbox::enqueue(&transaction, event).await.map_err(|e| e.to_string())?;
    transaction.commit().await.map_err(|e| e.to_string())?;
    Ok(id)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter("warn").init();
    let config: tokio_postgres::Config = args.database.parse()?;
    let pool = deadpool_postgres::Pool::builder(deadpool_postgres::Manager::new(
        config.clone(),
        tokio_postgres::NoTls,
    ))
    .max_size(16)
    .build()?;
    {
        let (mut client, connection) = config.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        Outbox::migrate(&mut client).await?;
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS payments (
                     id bigserial PRIMARY KEY, account text NOT NULL, cents bigint NOT NULL,
                     created_at timestamptz NOT NULL DEFAULT now())",
            )
            .await?;
    }
    let store = idem_postgres::PostgresStore::connect(&args.database).await?;
    let engine = Engine::new(store, SystemClock, EngineConfig::default());
    let app = Router::new()
        .route("/payments", post(create_payment))
        .with_state(Arc::new(App { pool, topic: args.topic }))
        .layer(IdempotencyLayer::new(engine, IdempotencyConfig::default().require_key(true)));
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    println!("payments listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
