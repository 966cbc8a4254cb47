//! The payments service: `POST /payments {"account": "...", "cents": N}` with an
//! `Idempotency-Key` records the payment, its `payments.created` event (the transactional
//! outbox) and the response a retry gets back, all in one transaction. The idem layer, on the
//! same PostgreSQL, makes client retries safe; storing the response with the payment means a
//! crash between the commit and the answer cannot let a retry pay twice.
//!
//! `PAYMENTS_FAULT=crash-after-commit` makes the service abort right after its commit, before
//! it answers: the fault the tests inject.
//!
//! Run with `cargo run -p payments --bin payments -- --database postgres://... --listen 127.0.0.1:3100`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router};
use clap::Parser;
use idem_core::{Engine, EngineConfig, StoreClock, SystemClock};
use idem_http::{IdempotencyConfig, IdempotencyLayer, InTransaction};
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
    /// The fault hook: abort between the commit and the answer.
    crash_after_commit: bool,
}

async fn create_payment(
    State(app): State<Arc<App>>,
    idem: Option<Extension<InTransaction>>,
    Json(body): Json<Value>,
) -> Response {
    let (Some(account), Some(cents)) = (body["account"].as_str(), body["cents"].as_i64()) else {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({ "error": "account (string) and cents (integer) are required" })),
        )
            .into_response();
    };
    match record(&app, account, cents, idem.as_deref()).await {
        Ok(body) => (StatusCode::CREATED, [(header::CONTENT_TYPE, "application/json")], body)
            .into_response(),
        // A 5xx: nothing committed, the idem layer releases the key, a retry runs again.
        Err(error) => {
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "error": error }))).into_response()
        }
    }
}

/// The payment row, its event and (under the idem layer) the response a retry replays, in
/// one transaction: all or nothing. Returns the response body.
async fn record(
    app: &App,
    account: &str,
    cents: i64,
    idem: Option<&InTransaction>,
) -> Result<String, String> {
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
    if let Some(idem) = idem {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let stored = idem.payload(StatusCode::CREATED, &headers, payload.as_bytes());
        idem_postgres::complete_in(&transaction, &idem.completion(), &stored)
            .await
            .map_err(|e| e.to_string())?;
    }
    transaction.commit().await.map_err(|e| e.to_string())?;
    if app.crash_after_commit {
        eprintln!("PAYMENTS_FAULT=crash-after-commit: aborting after the commit of payment {id}");
        std::process::abort();
    }
    if let Some(idem) = idem {
        idem.committed();
    }
    Ok(payload)
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
    let store: Arc<dyn idem_core::Store> =
        Arc::new(idem_postgres::PostgresStore::connect(&args.database).await?);
    // Leases on the database's clock, whatever this host's clock says.
    let clock = StoreClock::start(Arc::clone(&store), SystemClock).await?;
    let engine = Engine::from_shared(store, Arc::new(clock), EngineConfig::default());
    let app = Router::new()
        .route("/payments", post(create_payment))
        .with_state(Arc::new(App {
            pool,
            topic: args.topic,
            crash_after_commit: std::env::var("PAYMENTS_FAULT").as_deref()
                == Ok("crash-after-commit"),
        }))
        .layer(IdempotencyLayer::new(engine, IdempotencyConfig::default().require_key(true)));
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    println!("payments listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
