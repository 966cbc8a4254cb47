//! `idem relay`: publishes an application's transactional outbox (PostgreSQL) to NATS
//! JetStream, RabbitMQ or Redis Streams. Run as many as you like; they share the work and keep
//! each key in order.

use std::time::Duration;

use clap::Args;
use idem_stream::nats::JetStreamPublisher;
use idem_stream::postgres::{Outbox, Relay, RelayConfig, RunConfig};
use idem_stream::publish::Publisher;
use idem_stream::rabbitmq::RabbitPublisher;
use idem_stream::redis_streams::RedisStreamsPublisher;

use crate::config::parse_duration;
use crate::secrets::{redact, scrub};

#[derive(Debug, Args)]
pub struct RelayArgs {
    /// The application's database, where the outbox tables live: PostgreSQL (libpq URL; add
    /// `options=-c%20search_path%3DNAME` for another schema) or `sqlite://PATH`
    #[arg(long, env = "IDEM_RELAY_DATABASE", value_name = "URL")]
    pub database: String,
    /// The broker, by scheme: `nats://` (JetStream; the streams for the outbox topics must
    /// exist; a cluster as its servers' URLs separated by commas), `amqp://` (RabbitMQ; the topic is the routing key on `--exchange`) or `redis://`
    /// (Redis Streams; the topic is the stream's key)
    #[arg(
        long,
        alias = "nats",
        env = "IDEM_RELAY_BROKER",
        value_name = "URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub broker: String,
    /// RabbitMQ only: the exchange to publish to; the default exchange ("") routes each event
    /// to the queue named by its topic
    #[arg(long, env = "IDEM_RELAY_EXCHANGE", default_value = "")]
    pub exchange: String,
    /// Redis Streams only: the most entries a stream may hold; past it publishing waits for
    /// the slowest consumer group (acknowledged entries are trimmed, never unread ones)
    #[arg(long, env = "IDEM_RELAY_STREAM_MAX_LEN", default_value_t = 1_000_000)]
    pub stream_max_len: usize,
    /// Poll this often even without a NOTIFY
    #[arg(long, env = "IDEM_RELAY_POLL_INTERVAL", value_name = "DURATION", default_value = "1s")]
    pub poll_interval: String,
    /// Keys claimed per round
    #[arg(long, env = "IDEM_RELAY_MAX_KEYS", default_value_t = 64)]
    pub max_keys: i64,
    /// Events per key per round
    #[arg(long, env = "IDEM_RELAY_MAX_EVENTS_PER_KEY", default_value_t = 100)]
    pub max_events_per_key: i64,
    /// A relay stalled this long inside a round loses its keys to the others
    #[arg(long, env = "IDEM_RELAY_STALL_TIMEOUT", value_name = "DURATION", default_value = "30s")]
    pub stall_timeout: String,
    /// A key whose next event fails to publish is tried again after this long, doubling
    /// after each further failure up to --max-retry-backoff; other keys flow on meanwhile
    #[arg(long, env = "IDEM_RELAY_RETRY_BACKOFF", value_name = "DURATION", default_value = "1s")]
    pub retry_backoff: String,
    #[arg(
        long,
        env = "IDEM_RELAY_MAX_RETRY_BACKOFF",
        value_name = "DURATION",
        default_value = "5m"
    )]
    pub max_retry_backoff: String,
    /// Failures in a row after which a key is parked (its events wait, with the last error,
    /// for `idem outbox retry` or `discard`)
    #[arg(long, env = "IDEM_RELAY_MAX_ATTEMPTS", default_value_t = 10)]
    pub max_attempts: i32,
    /// Serve Prometheus /metrics here (pending events, oldest pending age, parked keys,
    /// published and failed counts, and the consumers' dead letters when their
    /// `idem_dead_letters` table is in this database)
    #[arg(long, env = "IDEM_RELAY_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Delete events sent (or discarded) longer ago than this, and key rows idle as long with
    /// no event left, checked every minute in small batches; `0` keeps them for ever
    #[arg(long, env = "IDEM_RELAY_RETENTION", value_name = "DURATION", default_value = "7d")]
    pub retention: String,
    /// Create the outbox tables first if they are missing (and bring them up to date)
    #[arg(long)]
    pub migrate: bool,
}

pub async fn run(args: RelayArgs, shutdown: impl Future<Output = ()>) -> Result<(), String> {
    let poll_interval =
        parse_duration("poll-interval", &args.poll_interval).map_err(|e| e.to_string())?;
    let stall_timeout =
        parse_duration("stall-timeout", &args.stall_timeout).map_err(|e| e.to_string())?;
    if !(1..=10_000).contains(&args.max_keys) || !(1..=10_000).contains(&args.max_events_per_key) {
        return Err("--max-keys and --max-events-per-key must be 1 to 10000".into());
    }
    if stall_timeout < Duration::from_secs(1) {
        return Err("--stall-timeout must be at least 1s".into());
    }
    let retry_backoff =
        parse_duration("retry-backoff", &args.retry_backoff).map_err(|e| e.to_string())?;
    let max_retry_backoff =
        parse_duration("max-retry-backoff", &args.max_retry_backoff).map_err(|e| e.to_string())?;
    if retry_backoff.is_zero() || max_retry_backoff < retry_backoff {
        return Err(
            "--retry-backoff must be above zero and --max-retry-backoff at least as long".into()
        );
    }
    // `0` (in any unit) keeps everything: a zero retention never means "delete at once".
    let retention = match args.retention.trim() {
        "0" => None,
        text => Some(parse_duration("retention", text).map_err(|e| e.to_string())?)
            .filter(|retention| !retention.is_zero()),
    };
    if !(1..=1_000).contains(&args.max_attempts) {
        return Err("--max-attempts must be 1 to 1000".into());
    }
    let config = RelayConfig {
        max_keys: args.max_keys,
        max_events_per_key: args.max_events_per_key,
        stall_timeout,
        retry_backoff,
        max_retry_backoff,
        max_attempts: args.max_attempts,
    };
    if let Some(path) = args.database.strip_prefix("sqlite://") {
        return run_sqlite(
            &args,
            std::path::Path::new(path),
            config,
            poll_interval,
            retention,
            shutdown,
        )
        .await;
    }
    // TLS as the URL's sslmode and sslrootcert say, as the store's connections.
    let database = idem_stream::postgres::Database::from_url(&args.database).map_err(|error| {
        format!(
            "--database {}: {}",
            redact(&args.database),
            scrub(&error.to_string(), &args.database)
        )
    })?;
    let publisher = publisher(&args).await.map_err(|error| {
        format!("--broker {}: {}", redact(&args.broker), scrub(&error.to_string(), &args.broker))
    })?;
    if args.migrate {
        let (mut client, connection) = database.connect().await.map_err(|error| {
            format!(
                "--database {}: {}",
                redact(&args.database),
                scrub(&idem_core::store_kit::with_causes(&error), &args.database)
            )
        })?;
        tokio::spawn(connection);
        Outbox::migrate(&mut client).await.map_err(|error| error.to_string())?;
    }
    let relay = Relay::new(publisher, config);
    if let Some(addr) = args.metrics_listen {
        let database = database.clone();
        serve_metrics(addr, move || {
            let database = database.clone();
            async move { postgres_gauges(&database).await }
        })
        .await?;
    }
    println!("idem relay running: {} -> {}", redact(&args.database), redact(&args.broker));
    relay
        .run(&database, RunConfig { poll_interval, retention, ..RunConfig::default() }, shutdown)
        .await
        .map_err(|error| error.to_string())
}

/// The SQLite relay: `--database sqlite://PATH`.
async fn run_sqlite(
    args: &RelayArgs,
    path: &std::path::Path,
    config: RelayConfig,
    poll_interval: Duration,
    retention: Option<Duration>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    let fail = |error: &dyn std::fmt::Display| format!("--database {}: {error}", args.database);
    if args.migrate {
        let connection = rusqlite::Connection::open(path).map_err(|e| fail(&e))?;
        connection.busy_timeout(Duration::from_secs(5)).map_err(|e| fail(&e))?;
        idem_stream::sqlite::Outbox::migrate(&connection).map_err(|e| fail(&e))?;
    }
    let publisher = publisher(args).await.map_err(|error| {
        format!("--broker {}: {}", redact(&args.broker), scrub(&error.to_string(), &args.broker))
    })?;
    let relay = idem_stream::sqlite::Relay::open(path, publisher, config).map_err(|e| fail(&e))?;
    if let Some(addr) = args.metrics_listen {
        let path = path.to_owned();
        serve_metrics(addr, move || {
            let path = path.clone();
            async move {
                tokio::task::spawn_blocking(move || {
                    let connection = rusqlite::Connection::open(&path).ok()?;
                    let stats = idem_stream::sqlite::Outbox::stats(&connection).ok()?;
                    Some(Gauges {
                        events: stats.pending_events,
                        keys: stats.pending_keys,
                        parked: stats.parked_keys,
                        oldest: stats.oldest_pending,
                        // The SQLite outbox has no dead-letter table.
                        dead_letters: None,
                    })
                })
                .await
                .ok()
                .flatten()
            }
        })
        .await?;
    }
    println!("idem relay running: {} -> {}", args.database, redact(&args.broker));
    relay.run(poll_interval, retention, shutdown).await.map_err(|error| error.to_string())
}

/// The outbox's state, for the gauges.
struct Gauges {
    events: i64,
    keys: i64,
    parked: i64,
    oldest: Option<Duration>,
    /// Rows in `idem_dead_letters` (what consumers buried, see `idem_stream::postgres::
    /// DeadLetters`), where that table is in the relay's database; `None` leaves the gauge
    /// unexported rather than claim an empty table that does not exist.
    dead_letters: Option<i64>,
}

async fn postgres_gauges(database: &idem_stream::postgres::Database) -> Option<Gauges> {
    let (client, connection) = database.connect().await.ok()?;
    tokio::spawn(connection);
    let stats = Outbox::stats(&client).await.ok()?;
    // The inbox's table, when the consumers share this database (found by the search_path,
    // as the consumers find it).
    let exists = "SELECT to_regclass('idem_dead_letters') IS NOT NULL";
    let dead_letters = match client.query_one(exists, &[]).await {
        Ok(row) if row.get::<_, bool>(0) => client
            .query_one("SELECT count(*) FROM idem_dead_letters", &[])
            .await
            .ok()
            .map(|row| row.get::<_, i64>(0)),
        _ => None,
    };
    Some(Gauges {
        events: stats.pending_events,
        keys: stats.pending_keys,
        parked: stats.parked_keys,
        oldest: stats.oldest_pending,
        dead_letters,
    })
}

/// Serves `/metrics` on `addr`, the outbox's state read by `gauges` every 5 s.
async fn serve_metrics<F, Fut>(addr: std::net::SocketAddr, mut gauges: F) -> Result<(), String>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Option<Gauges>> + Send,
{
    let handle = crate::serve::install_metrics().map_err(|error| error.to_string())?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|error| format!("--metrics-listen {addr}: {error}"))?;
    let router = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let handle = handle.clone();
            async move { handle.render() }
        }),
    );
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, router).await {
            tracing::error!(%error, "the metrics listener stopped");
        }
    });
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            match tokio::time::timeout(Duration::from_secs(5), gauges()).await {
                Ok(Some(state)) => {
                    metrics::gauge!("idem_outbox_pending_events").set(state.events as f64);
                    metrics::gauge!("idem_outbox_pending_keys").set(state.keys as f64);
                    metrics::gauge!("idem_outbox_parked_keys").set(state.parked as f64);
                    if let Some(oldest) = state.oldest {
                        metrics::gauge!("idem_outbox_oldest_pending_seconds")
                            .set(oldest.as_secs_f64());
                    } else {
                        metrics::gauge!("idem_outbox_oldest_pending_seconds").set(0.0);
                    }
                    if let Some(dead_letters) = state.dead_letters {
                        metrics::gauge!("idem_dead_letters").set(dead_letters as f64);
                    }
                }
                _ => tracing::debug!("outbox metrics: could not read the outbox"),
            }
        }
    });
    Ok(())
}

/// The publisher for `--broker`, chosen by the URL's scheme.
async fn publisher(args: &RelayArgs) -> Result<Box<dyn Publisher>, String> {
    connect_publisher(&args.broker, &args.exchange, args.stream_max_len, false).await
}

/// A publisher to the broker at `url`, by its scheme. `refuse_duplicates`: a JetStream
/// publish the stream drops as a duplicate fails instead of counting as done (for putting
/// dead letters back; see [`JetStreamPublisher::refusing_duplicates`]).
pub(crate) async fn connect_publisher(
    url: &str,
    exchange: &str,
    stream_max_len: usize,
    refuse_duplicates: bool,
) -> Result<Box<dyn Publisher>, String> {
    let scheme = url.split_once("://").map_or("", |(scheme, _)| scheme);
    match scheme {
        "nats" | "tls" => {
            let client = idem_stream::nats::connect(url).await.map_err(|e| e.to_string())?;
            let publisher = JetStreamPublisher::new(async_nats::jetstream::new(client));
            Ok(Box::new(match refuse_duplicates {
                true => publisher.refusing_duplicates(),
                false => publisher,
            }))
        }
        "amqp" | "amqps" => {
            let publisher = RabbitPublisher::connect(url, exchange).await;
            Ok(Box::new(publisher.map_err(|error| error.to_string())?))
        }
        "redis" | "rediss" => {
            if stream_max_len == 0 {
                return Err("--stream-max-len must be at least 1".into());
            }
            let client = redis::Client::open(url).map_err(|e| e.to_string())?;
            let connection = client.get_connection_manager().await.map_err(|e| e.to_string())?;
            Ok(Box::new(RedisStreamsPublisher::new(connection, stream_max_len)))
        }
        _ => Err("the scheme must be nats://, amqp:// or redis://".into()),
    }
}
