//! `idem keys`: what an operator needs to see and unstick records by hand, in any store.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use idem_core::{
    Clock, IdempotencyKey, ListQuery, Record, RecordKey, RecordState, RecordSummary, Scope,
    StateFilter, SystemClock, Timestamp,
};
use idem_http::StoredResponse;

use crate::config::parse_duration;

#[derive(Debug, Args)]
pub struct KeysArgs {
    /// The store to read: memory://, sqlite://PATH, postgres://..., redis://...
    #[arg(long, env = "IDEM_STORE", default_value = "sqlite://idem.db", global = true)]
    pub store: String,
    /// Print JSON instead of a table
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: KeysCommand,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// List records, the oldest first
    List {
        #[command(flatten)]
        scope: ScopeArgs,
        /// Only records in this state
        #[arg(long, value_enum)]
        state: Option<StateArg>,
        /// Only records created longer ago than this, e.g. 5m
        #[arg(long, value_name = "DURATION")]
        older_than: Option<String>,
        /// At most this many
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Show one record, with the stored response
    Show {
        #[command(flatten)]
        scope: ScopeArgs,
        /// The Idempotency-Key, as the client sent it
        key: String,
    },
    /// Delete one record: the next request with its key runs as new
    Delete {
        #[command(flatten)]
        scope: ScopeArgs,
        key: String,
    },
    /// Release a key held with an unknown outcome (502 outcome-unknown) once you know whether
    /// its request ran: the next request with the key runs again. Refuses any other record
    Release {
        #[command(flatten)]
        scope: ScopeArgs,
        key: String,
    },
}

/// Whose key: the scope as `list` prints it, or the credential (hashed as the gateway does).
#[derive(Debug, Args)]
pub struct ScopeArgs {
    /// The scope as `idem keys list` prints it
    #[arg(long, conflicts_with_all = ["credential", "anonymous"])]
    pub scope: Option<String>,
    /// The caller's credential, e.g. the Authorization value; hashed, never stored
    #[arg(long, conflicts_with = "anonymous")]
    pub credential: Option<String>,
    /// The scope of requests that carried no credential
    #[arg(long)]
    pub anonymous: bool,
}

impl ScopeArgs {
    fn resolve(&self) -> Option<Scope> {
        match (&self.scope, &self.credential, self.anonymous) {
            (Some(scope), _, _) => Some(Scope::named(scope.clone())),
            (_, Some(credential), _) => Some(Scope::from_credential(credential.as_bytes())),
            (_, _, true) => Some(Scope::anonymous()),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum StateArg {
    InFlight,
    Completed,
}

/// Runs the command: the text to print and whether the record was found (`false` makes the
/// exit status 1), or an error message.
pub async fn run(args: KeysArgs) -> Result<(String, bool), String> {
    let store = crate::store::open_existing(&args.store).await?;
    // Ages and leases as the store's clock sees them, as the gateways do.
    let now = idem_core::StoreClock::start(Arc::clone(&store), SystemClock)
        .await
        .map_err(|error| format!("cannot read the store's clock: {error}"))?
        .now();
    match args.command {
        KeysCommand::List { scope, state, older_than, limit } => {
            let created_before = match older_than {
                Some(text) => {
                    let age =
                        parse_duration("older-than", &text).map_err(|error| error.to_string())?;
                    Some(Timestamp::from_millis(
                        now.as_millis().saturating_sub(age.as_millis() as u64),
                    ))
                }
                None => None,
            };
            let query = ListQuery {
                scope: scope.resolve(),
                state: state.map(|state| match state {
                    StateArg::InFlight => StateFilter::InFlight,
                    StateArg::Completed => StateFilter::Completed,
                }),
                created_before,
                limit,
            };
            let records = store.list(&query).await.map_err(|error| error.to_string())?;
            let text = if args.json { list_json(&records, now) } else { list_table(&records, now) };
            Ok((text, true))
        }
        KeysCommand::Show { scope, key } => {
            let key = record_key(&scope, &key)?;
            match store.get(&key).await.map_err(|error| error.to_string())? {
                Some(record) => {
                    let text = if args.json {
                        show_json(&key, &record, now)
                    } else {
                        show_text(&key, &record, now)
                    };
                    Ok((text, true))
                }
                None => Ok((
                    format!("no record for key {:?} in scope {}\n", key.key.as_str(), key.scope),
                    false,
                )),
            }
        }
        KeysCommand::Delete { scope, key } => {
            let key = record_key(&scope, &key)?;
            let deleted = store.delete(&key).await.map_err(|error| error.to_string())?;
            let text = if args.json {
                format!(
                    "{}\n",
                    serde_json::json!({ "deleted": deleted, "scope": key.scope.as_str(), "key": key.key.as_str() })
                )
            } else if deleted {
                format!(
                    "deleted key {:?} in scope {}; its next request runs as new\n",
                    key.key.as_str(),
                    key.scope
                )
            } else {
                format!("no record for key {:?} in scope {}\n", key.key.as_str(), key.scope)
            };
            Ok((text, deleted))
        }
        KeysCommand::Release { scope, key } => {
            let key = record_key(&scope, &key)?;
            release(store.as_ref(), &key, args.json).await
        }
    }
}

/// What [`release_held`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Released {
    Released,
    NotFound,
    /// The record is in flight or holds a real response: left alone.
    NotHeld,
}

/// Deletes `key`'s record only if it holds an unknown outcome, re-checking right before.
pub async fn release_held(
    store: &dyn idem_core::Store,
    key: &RecordKey,
) -> Result<Released, String> {
    let record = store.get(key).await.map_err(|error| error.to_string())?;
    match &record {
        None => Ok(Released::NotFound),
        Some(record) if !holds_unknown_outcome(record) => Ok(Released::NotHeld),
        Some(_) => match store.delete(key).await.map_err(|error| error.to_string())? {
            true => Ok(Released::Released),
            false => Ok(Released::NotFound),
        },
    }
}

/// Whether `record` holds the stored `502 outcome-unknown` of a call whose outcome is unknown.
pub fn holds_unknown_outcome(record: &Record) -> bool {
    match &record.state {
        RecordState::Completed { payload } => {
            StoredResponse::decode(payload.clone()).is_ok_and(|stored| stored.is_outcome_unknown())
        }
        RecordState::InFlight { .. } => false,
    }
}

async fn release(
    store: &dyn idem_core::Store,
    key: &RecordKey,
    json: bool,
) -> Result<(String, bool), String> {
    let name = format!("key {:?} in scope {}", key.key.as_str(), key.scope);
    let (released, text) = match release_held(store, key).await? {
        Released::NotFound => (false, format!("no record for {name}\n")),
        Released::NotHeld => {
            return Err(format!(
                "{name} does not hold an unknown outcome (it is in flight or has a stored response); nothing was released. `idem keys delete` removes any record"
            ));
        }
        Released::Released => (true, format!("released {name}; its next request runs again\n")),
    };
    if json {
        let value = serde_json::json!({ "released": released, "scope": key.scope.as_str(), "key": key.key.as_str() });
        return Ok((format!("{value}\n"), released));
    }
    Ok((text, released))
}

fn record_key(scope: &ScopeArgs, key: &str) -> Result<RecordKey, String> {
    let scope =
        scope.resolve().ok_or("name the key's scope: --scope, --credential or --anonymous")?;
    let key = IdempotencyKey::parse_header(key.as_bytes()).map_err(|error| error.to_string())?;
    Ok(RecordKey::new(scope, key))
}

fn state_name(summary: &RecordSummary) -> &'static str {
    if summary.lease_expires_at.is_some() { "in-flight" } else { "completed" }
}

/// Whole seconds, as `2h 5m 3s`; `-` for zero-or-less.
fn human(duration: Duration) -> String {
    if duration.is_zero() {
        return "-".into();
    }
    humantime::format_duration(Duration::from_secs(duration.as_secs().max(1))).to_string()
}

fn list_table(records: &[RecordSummary], now: Timestamp) -> String {
    if records.is_empty() {
        return "no records\n".into();
    }
    let scope_width = records.iter().map(|r| r.key.scope.as_str().len()).max().unwrap_or(5).max(5);
    let key_width =
        records.iter().map(|r| r.key.key.as_str().len()).max().unwrap_or(3).clamp(3, 48);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:scope_width$}  {:key_width$}  {:9}  {:>10}  {:>12}  {:>10}",
        "SCOPE", "KEY", "STATE", "AGE", "EXPIRES IN", "LEASE LEFT"
    );
    for record in records {
        let lease =
            record.lease_expires_at.map_or("-".into(), |lease| human(lease.duration_since(now)));
        let _ = writeln!(
            out,
            "{:scope_width$}  {:key_width$}  {:9}  {:>10}  {:>12}  {:>10}",
            record.key.scope.as_str(),
            record.key.key.as_str(),
            state_name(record),
            human(now.duration_since(record.created_at)),
            human(record.expires_at.duration_since(now)),
            lease,
        );
    }
    let _ = writeln!(out, "{} record(s)", records.len());
    out
}

fn summary_json(record: &RecordSummary, now: Timestamp) -> serde_json::Value {
    serde_json::json!({
        "scope": record.key.scope.as_str(),
        "key": record.key.key.as_str(),
        "state": state_name(record),
        "fingerprint": record.fingerprint.to_string(),
        "created_at_ms": record.created_at.as_millis(),
        "age_ms": now.duration_since(record.created_at).as_millis() as u64,
        "expires_at_ms": record.expires_at.as_millis(),
        "lease_expires_at_ms": record.lease_expires_at.map(Timestamp::as_millis),
        "payload_bytes": record.payload_len,
    })
}

fn list_json(records: &[RecordSummary], now: Timestamp) -> String {
    let rows = records.iter().map(|record| summary_json(record, now)).collect();
    format!("{}\n", serde_json::Value::Array(rows))
}

fn show_json(key: &RecordKey, record: &Record, now: Timestamp) -> String {
    let mut value = summary_json(&RecordSummary::from_record(key.clone(), record), now);
    if let RecordState::Completed { payload } = &record.state {
        value["response"] = match StoredResponse::decode(payload.clone()) {
            Ok(stored) => serde_json::json!({
                "status": stored.status.as_u16(),
                "headers": stored.headers.iter()
                    .map(|(name, value)| (name.as_str().to_owned(), String::from_utf8_lossy(value.as_bytes()).into_owned()))
                    .collect::<Vec<_>>(),
                "body_bytes": stored.body.len(),
                "body_omitted": stored.body_omitted,
                "body": std::str::from_utf8(&stored.body).ok(),
            }),
            Err(_) => serde_json::Value::Null,
        };
    }
    format!("{value}\n")
}

fn show_text(key: &RecordKey, record: &Record, now: Timestamp) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "scope        {}", key.scope);
    let _ = writeln!(out, "key          {}", key.key);
    let _ = writeln!(out, "fingerprint  {}", record.fingerprint);
    let _ = writeln!(out, "created      {} ago", human(now.duration_since(record.created_at)));
    let _ = writeln!(out, "expires in   {}", human(record.expires_at.duration_since(now)));
    match &record.state {
        RecordState::InFlight { lease_expires_at, .. } => {
            let _ = writeln!(
                out,
                "state        in-flight, lease left {}",
                human(lease_expires_at.duration_since(now))
            );
        }
        RecordState::Completed { payload } => {
            let _ = writeln!(out, "state        completed");
            match StoredResponse::decode(payload.clone()) {
                Ok(stored) => {
                    let _ = writeln!(out, "status       {}", stored.status);
                    for (name, value) in &stored.headers {
                        let _ = writeln!(
                            out,
                            "header       {name}: {}",
                            String::from_utf8_lossy(value.as_bytes())
                        );
                    }
                    if stored.body_omitted {
                        let _ = writeln!(out, "body         omitted (over the stored-body limit)");
                    } else {
                        let _ = writeln!(out, "body         {} bytes", stored.body.len());
                        if let Ok(text) = std::str::from_utf8(&stored.body) {
                            let preview: String = text.chars().take(1024).collect();
                            let _ = writeln!(out, "{preview}");
                        }
                    }
                }
                Err(_) => {
                    let _ = writeln!(
                        out,
                        "payload      {} bytes (not an HTTP response)",
                        payload.len()
                    );
                }
            }
        }
    }
    out
}
