//! The ledger service: consumes `payments.created` from JetStream and applies each payment to
//! its account's balance exactly once, through the inbox.
//!
//! Run with `cargo run -p payments --bin ledger -- --database postgres://... --stream PAYMENTS`.

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use idem_stream::Delivery;
use idem_stream::consume::{self, Received, RunnerConfig};
use idem_stream::nats::JetStreamSubscription;
use idem_stream::postgres::{DeadLetters, Inbox};
use serde_json::Value;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, env = "LEDGER_DATABASE")]
    database: String,
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// The JetStream stream holding the payment events
    #[arg(long, default_value = "PAYMENTS")]
    stream: String,
    #[arg(long, default_value = "ledger")]
    durable: String,
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// JetStream redelivers a message not acknowledged within this many seconds
    #[arg(long, default_value_t = 5)]
    ack_wait_secs: u64,
}

async fn apply(
    pool: deadpool_postgres::Pool,
    inbox: Inbox,
    message: Received,
) -> Result<(), String> {
    let event: Value =
        serde_json::from_slice(&message.payload).map_err(|e| format!("not JSON: {e}"))?;
    let (Some(account), Some(cents)) = (event["account"].as_str(), event["cents"].as_i64()) else {
        return Err("the event lacks account or cents".into());
    };
    let mut client = pool.get().await.map_err(|e| e.to_string())?;
    let transaction = client.transaction().await.map_err(|e| e.to_string())?;
    if inbox.record(&transaction, &message.id).await.map_err(|e| e.to_string())? == Delivery::First
    {
        transaction
            .execute(
                "INSERT INTO balances (account, cents) VALUES ($1, $2)
                 ON CONFLICT (account) DO UPDATE SET cents = balances.cents + EXCLUDED.cents",
                &[&account, &cents],
            )
            .await
            .map_err(|e| e.to_string())?;
        transaction
            .execute("INSERT INTO ledger_log (message_id) VALUES ($1)", &[&message.id])
            .await
            .map_err(|e| e.to_string())?;
    }
    transaction.commit().await.map_err(|e| e.to_string())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter("warn").init();
    let config: tokio_postgres::Config = args.database.parse()?;
    let (mut client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Inbox::migrate(&mut client).await?;
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS balances (account text PRIMARY KEY, cents bigint NOT NULL);
             CREATE TABLE IF NOT EXISTS ledger_log (message_id text NOT NULL)",
        )
        .await?;
    let pool = deadpool_postgres::Pool::builder(deadpool_postgres::Manager::new(
        config,
        tokio_postgres::NoTls,
    ))
    .max_size(args.concurrency)
    .build()?;
    let jetstream = async_nats::jetstream::new(async_nats::connect(&args.nats).await?);
    let stream = jetstream.get_stream(&args.stream).await?;
    let subscription = JetStreamSubscription::durable(
        &stream,
        &args.durable,
        Duration::from_secs(args.ack_wait_secs),
    )
    .await?;
    let inbox = Inbox::new("ledger")?;
    let dead_letters = Arc::new(DeadLetters::new(pool.clone(), "ledger")?);
    let handler = move |message: Received| apply(pool.clone(), inbox.clone(), message);
    println!("ledger consuming {} as {}", args.stream, args.durable);
    let config = RunnerConfig { concurrency: args.concurrency, ..RunnerConfig::default() };
    let report =
        consume::run(subscription, handler, dead_letters, config, idem::serve::shutdown_signal())
            .await;
    println!("ledger stopped: {report:?}");
    Ok(())
}
