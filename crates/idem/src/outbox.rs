//! `idem outbox`: what an operator needs to see and unstick in an application's outbox: keys
//! waiting, failing or parked, with their last error; a parked key put back in rotation, or
//! its stuck event given up.

use std::fmt::Write as _;
use std::time::Duration;

use clap::{Args, Subcommand};
use idem_stream::outbox::{KeyState, OutboxStats, PendingEvent};
use idem_stream::postgres::Outbox;
use idem_stream::sqlite::Outbox as SqliteOutbox;

use crate::secrets::{redact, scrub};

#[derive(Debug, Args)]
pub struct OutboxArgs {
    /// The application's database, where the outbox tables live: PostgreSQL, or
    /// `sqlite://PATH`
    #[arg(long, env = "IDEM_RELAY_DATABASE", value_name = "URL", global = true)]
    pub database: Option<String>,
    /// Print JSON instead of a table
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: OutboxCommand,
}

#[derive(Debug, Subcommand)]
pub enum OutboxCommand {
    /// Keys with events waiting, parked ones first, then the longest waiting
    List {
        /// Only parked keys
        #[arg(long)]
        parked: bool,
        /// At most this many
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// One key: its state, last error and waiting events
    Show { topic: String, key: String },
    /// Put a key back in rotation now, its failures forgotten (once the cause is fixed)
    Retry { topic: String, key: String },
    /// Give up on a key's next event (kept, marked discarded, never published) so its later
    /// events flow
    Discard { topic: String, key: String },
}

/// Runs the command: the text to print and whether what it named was found (`false` makes the
/// exit status 1), or an error message.
pub async fn run(args: OutboxArgs) -> Result<(String, bool), String> {
    let url = args.database.ok_or("--database URL (or IDEM_RELAY_DATABASE) is required")?;
    let mut db = Db::open(&url).await?;
    let name = |topic: &str, key: &str| format!("key {key:?} of topic {topic:?}");
    match args.command {
        OutboxCommand::List { parked, limit } => {
            let stats = db.stats().await?;
            let keys = db.keys(parked, limit).await?;
            let text = if args.json {
                let keys: Vec<_> = keys.iter().map(key_json).collect();
                format!("{}\n", serde_json::json!({ "stats": stats_json(&stats), "keys": keys }))
            } else {
                list_table(&stats, &keys)
            };
            Ok((text, true))
        }
        OutboxCommand::Show { topic, key } => match db.key(&topic, &key).await? {
            Some((state, events)) => {
                let text = if args.json {
                    let events: Vec<_> = events.iter().map(event_json).collect();
                    let mut value = key_json(&state);
                    value["events"] = serde_json::Value::Array(events);
                    format!("{value}\n")
                } else {
                    show_text(&state, &events)
                };
                Ok((text, true))
            }
            None => Ok((format!("no {}\n", name(&topic, &key)), false)),
        },
        OutboxCommand::Retry { topic, key } => {
            let found = db.retry(&topic, &key).await?;
            let text = if args.json {
                format!("{}\n", serde_json::json!({ "retried": found, "topic": topic, "key": key }))
            } else if found {
                format!(
                    "{} is back in rotation; the relay tries it on its next round\n",
                    name(&topic, &key)
                )
            } else {
                format!("no {}\n", name(&topic, &key))
            };
            Ok((text, found))
        }
        OutboxCommand::Discard { topic, key } => {
            let discarded = db.discard_next(&topic, &key).await?;
            let text = if args.json {
                format!(
                    "{}\n",
                    serde_json::json!({ "discarded": discarded, "topic": topic, "key": key })
                )
            } else if let Some(id) = discarded {
                format!(
                    "discarded event {id} of {}; it will never be published, and the key's later events flow\n",
                    name(&topic, &key)
                )
            } else {
                format!("{} has no event waiting\n", name(&topic, &key))
            };
            Ok((text, discarded.is_some()))
        }
    }
}

/// The outbox at `url` as the operator page shows it: its totals and up to `limit` keys,
/// parked ones first, then the longest waiting.
pub(crate) async fn overview(url: &str, limit: i64) -> Result<serde_json::Value, String> {
    let db = Db::open(url).await?;
    let stats = db.stats().await?;
    let keys = db.keys(false, limit).await?;
    let keys: Vec<_> = keys.iter().map(key_json).collect();
    Ok(serde_json::json!({ "stats": stats_json(&stats), "keys": keys }))
}

/// Puts a parked key back in rotation, as `idem outbox retry` does: whether it was found.
pub(crate) async fn retry(url: &str, topic: &str, key: &str) -> Result<bool, String> {
    Db::open(url).await?.retry(topic, key).await
}

/// A connection to the PostgreSQL database at `url` (TLS as its sslmode and sslrootcert
/// say), within 10 s; errors name `--database` with any password removed.
pub(crate) async fn connect_postgres(url: &str) -> Result<tokio_postgres::Client, String> {
    let fail = |error: &dyn std::fmt::Display| {
        format!("--database {}: {}", redact(url), scrub(&error.to_string(), url))
    };
    let database = idem_stream::postgres::Database::from_url(url).map_err(|e| fail(&e))?;
    let (client, connection) = tokio::time::timeout(Duration::from_secs(10), database.connect())
        .await
        .map_err(|_| fail(&"no answer within 10s"))?
        .map_err(|e| fail(&idem_core::store_kit::with_causes(&e)))?;
    tokio::spawn(connection);
    Ok(client)
}

/// The application's database: PostgreSQL, or SQLite (`sqlite://PATH`).
enum Db {
    Postgres { client: tokio_postgres::Client, url: String },
    Sqlite { connection: rusqlite::Connection, url: String },
}

impl Db {
    async fn open(url: &str) -> Result<Self, String> {
        if let Some(path) = url.strip_prefix("sqlite://") {
            let fail = |error: &dyn std::fmt::Display| format!("--database {url}: {error}");
            if !std::path::Path::new(path).exists() {
                return Err(fail(&"no such file"));
            }
            let connection = rusqlite::Connection::open_with_flags(
                path,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE,
            )
            .map_err(|e| fail(&e))?;
            connection.busy_timeout(Duration::from_secs(5)).map_err(|e| fail(&e))?;
            return Ok(Self::Sqlite { connection, url: url.to_owned() });
        }
        let client = connect_postgres(url).await?;
        Ok(Self::Postgres { client, url: url.to_owned() })
    }

    fn fail(&self, error: &dyn std::fmt::Display) -> String {
        match self {
            Self::Postgres { url, .. } => {
                format!("--database {}: {}", redact(url), scrub(&error.to_string(), url))
            }
            Self::Sqlite { url, .. } => format!("--database {url}: {error}"),
        }
    }

    async fn stats(&self) -> Result<OutboxStats, String> {
        match self {
            Self::Postgres { client, .. } => Outbox::stats(client).await.map_err(|e| self.fail(&e)),
            Self::Sqlite { connection, .. } => {
                SqliteOutbox::stats(connection).map_err(|e| self.fail(&e))
            }
        }
    }

    async fn keys(&self, parked: bool, limit: i64) -> Result<Vec<KeyState>, String> {
        match self {
            Self::Postgres { client, .. } => {
                Outbox::keys(client, parked, limit).await.map_err(|e| self.fail(&e))
            }
            Self::Sqlite { connection, .. } => {
                SqliteOutbox::keys(connection, parked, limit).map_err(|e| self.fail(&e))
            }
        }
    }

    async fn key(
        &self,
        topic: &str,
        key: &str,
    ) -> Result<Option<(KeyState, Vec<PendingEvent>)>, String> {
        match self {
            Self::Postgres { client, .. } => {
                Outbox::key(client, topic, key, 20).await.map_err(|e| self.fail(&e))
            }
            Self::Sqlite { connection, .. } => {
                SqliteOutbox::key(connection, topic, key, 20).map_err(|e| self.fail(&e))
            }
        }
    }

    async fn retry(&self, topic: &str, key: &str) -> Result<bool, String> {
        match self {
            Self::Postgres { client, .. } => {
                Outbox::retry(client, topic, key).await.map_err(|e| self.fail(&e))
            }
            Self::Sqlite { connection, .. } => {
                SqliteOutbox::retry(connection, topic, key).map_err(|e| self.fail(&e))
            }
        }
    }

    async fn discard_next(&mut self, topic: &str, key: &str) -> Result<Option<i64>, String> {
        let result = match self {
            Self::Postgres { client, .. } => {
                Outbox::discard_next(client, topic, key).await.map_err(|e| e.to_string())
            }
            Self::Sqlite { connection, .. } => {
                SqliteOutbox::discard_next(connection, topic, key).map_err(|e| e.to_string())
            }
        };
        result.map_err(|error| self.fail(&error))
    }
}

pub(crate) fn human(duration: Option<Duration>) -> String {
    match duration {
        Some(duration) if !duration.is_zero() => {
            humantime::format_duration(Duration::from_secs(duration.as_secs().max(1))).to_string()
        }
        _ => "-".into(),
    }
}

fn state(key: &KeyState) -> &'static str {
    if key.parked_for.is_some() {
        "parked"
    } else if key.attempts > 0 {
        "failing"
    } else {
        "pending"
    }
}

fn list_table(stats: &OutboxStats, keys: &[KeyState]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} event(s) waiting on {} key(s), {} parked; the oldest waiting {}",
        stats.pending_events,
        stats.pending_keys,
        stats.parked_keys,
        human(stats.oldest_pending)
    );
    if keys.is_empty() {
        return out;
    }
    let topic_width = keys.iter().map(|k| k.topic.len()).max().unwrap_or(5).clamp(5, 40);
    let key_width = keys.iter().map(|k| k.key.len()).max().unwrap_or(3).clamp(3, 40);
    let _ = writeln!(
        out,
        "{:topic_width$}  {:key_width$}  {:7}  {:>7}  {:>8}  {:>10}  LAST ERROR",
        "TOPIC", "KEY", "STATE", "WAITING", "ATTEMPTS", "OLDEST"
    );
    for key in keys {
        let error: String = key.last_error.as_deref().unwrap_or("-").chars().take(80).collect();
        let _ = writeln!(
            out,
            "{:topic_width$}  {:key_width$}  {:7}  {:>7}  {:>8}  {:>10}  {error}",
            key.topic,
            key.key,
            state(key),
            key.enqueued_seq - key.published_seq,
            key.attempts,
            human(key.next_age),
        );
    }
    out
}

fn show_text(key: &KeyState, events: &[PendingEvent]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "topic        {}", key.topic);
    let _ = writeln!(out, "key          {}", key.key);
    let _ = writeln!(out, "state        {}", state(key));
    let _ = writeln!(out, "published    {} of {}", key.published_seq, key.enqueued_seq);
    let _ = writeln!(out, "attempts     {}", key.attempts);
    if let Some(error) = &key.last_error {
        let _ = writeln!(out, "last error   {error}");
    }
    if key.retry_in.is_some() {
        let _ = writeln!(out, "retry in     {}", human(key.retry_in));
    }
    if key.parked_for.is_some() {
        let _ = writeln!(out, "parked       {} ago", human(key.parked_for));
    }
    for event in events {
        let _ = writeln!(
            out,
            "event        id {} seq {}, waiting {}, {} bytes",
            event.id,
            event.seq,
            human(Some(event.age)),
            event.payload_bytes
        );
    }
    out
}

fn stats_json(stats: &OutboxStats) -> serde_json::Value {
    serde_json::json!({
        "pending_events": stats.pending_events,
        "pending_keys": stats.pending_keys,
        "parked_keys": stats.parked_keys,
        "oldest_pending_ms": stats.oldest_pending.map(|age| age.as_millis() as u64),
    })
}

fn key_json(key: &KeyState) -> serde_json::Value {
    serde_json::json!({
        "topic": key.topic,
        "key": key.key,
        "state": state(key),
        "enqueued_seq": key.enqueued_seq,
        "published_seq": key.published_seq,
        "attempts": key.attempts,
        "last_error": key.last_error,
        "retry_in_ms": key.retry_in.map(|d| d.as_millis() as u64),
        "parked_ms": key.parked_for.map(|d| d.as_millis() as u64),
        "next_id": key.next_id,
        "next_age_ms": key.next_age.map(|d| d.as_millis() as u64),
    })
}

fn event_json(event: &PendingEvent) -> serde_json::Value {
    serde_json::json!({
        "id": event.id,
        "seq": event.seq,
        "age_ms": event.age.as_millis() as u64,
        "payload_bytes": event.payload_bytes,
        "headers": event.headers,
    })
}
