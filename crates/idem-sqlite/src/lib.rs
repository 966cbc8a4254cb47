//! The embedded, durable store: one SQLite file, safe to share between several `idem`
//! processes on one host.
//!
//! ```no_run
//! use idem_sqlite::SqliteStore;
//!
//! let store = SqliteStore::from_url("sqlite://idem.db?synchronous=full").unwrap();
//! # let _ = store;
//! ```
//!
//! # How it stays correct
//! - The database runs in WAL mode with a busy timeout, so several processes (each with its
//!   own connection) queue for the write lock instead of failing.
//! - A claim is one `BEGIN IMMEDIATE` transaction: it takes the write lock before reading, so no
//!   other claim on any key, in any process, can interleave between the read and the write.
//! - Complete, release and renew are single statements that match the owner's fencing token.
//! - `synchronous=full` (the default) syncs every commit, so a stored outcome survives power
//!   loss; `synchronous=normal` survives a crash of the process (`kill -9`) but may lose the
//!   last commits on power loss, in exchange for much cheaper commits.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use idem_core::{
    Capabilities, ClaimRequest, Decision, Error, FencingToken, Fingerprint, IdempotencyKey,
    ListQuery, Record, RecordKey, RecordState, RecordSummary, Result, Scope, StateFilter, Store,
    Timestamp, decide,
};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

/// The schema version this build writes. Each entry of [`MIGRATIONS`] moves the file one
/// version up; the version lives in `PRAGMA user_version`.
const MIGRATIONS: &[&str] = &[
    // Version 1.
    "CREATE TABLE IF NOT EXISTS idem_records (
        scope            TEXT    NOT NULL,
        key              TEXT    NOT NULL,
        fingerprint      BLOB    NOT NULL,
        state            INTEGER NOT NULL CHECK (state IN (0, 1)), -- 0 in flight, 1 completed
        token            INTEGER,          -- set while in flight
        lease_expires_at INTEGER,          -- set while in flight
        payload          BLOB,             -- set once completed
        created_at       INTEGER NOT NULL,
        expires_at       INTEGER NOT NULL,
        PRIMARY KEY (scope, key)
    );
    CREATE INDEX IF NOT EXISTS idem_records_expires_at ON idem_records (expires_at);",
];

const IN_FLIGHT: i64 = 0;
const COMPLETED: i64 = 1;

/// How hard each commit is pushed to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Synchronous {
    /// Sync on every commit: survives power loss.
    #[default]
    Full,
    /// Sync at checkpoints only: survives a process crash, may lose the last commits on
    /// power loss.
    Normal,
}

#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// How long to wait for another connection's write lock before failing as unavailable.
    pub busy_timeout: Duration,
    pub synchronous: Synchronous,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self { busy_timeout: Duration::from_secs(5), synchronous: Synchronous::Full }
    }
}

/// A [`Store`] on one SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    // A std Mutex: every use is inside `spawn_blocking`, never across an `.await`, and SQLite
    // serialises writers anyway, so one connection per process loses nothing.
    connection: Arc<Mutex<Connection>>,
    path: PathBuf,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    pub fn open(path: impl AsRef<Path>, options: &SqliteOptions) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let mut connection = Connection::open(&path).map_err(|error| {
            Error::Config(format!("cannot open SQLite database {}: {error}", path.display()))
        })?;
        connection.busy_timeout(options.busy_timeout).map_err(unavailable)?;
        connection.pragma_update(None, "journal_mode", "WAL").map_err(unavailable)?;
        let synchronous = match options.synchronous {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        };
        connection.pragma_update(None, "synchronous", synchronous).map_err(unavailable)?;
        migrate(&mut connection)?;
        Ok(Self { connection: Arc::new(Mutex::new(connection)), path })
    }

    /// Opens from a store URL: `sqlite://PATH[?busy_timeout_ms=N&synchronous=full|normal]`.
    /// `sqlite://idem.db` is relative to the working directory, `sqlite:///var/lib/idem.db`
    /// absolute.
    pub fn from_url(url: &str) -> Result<Self> {
        let rest = url
            .strip_prefix("sqlite://")
            .ok_or_else(|| Error::Config(format!("not a sqlite:// URL: {url}")))?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        if path.is_empty() {
            return Err(Error::Config(
                "sqlite:// URL needs a file path, as in sqlite://idem.db".into(),
            ));
        }
        let mut options = SqliteOptions::default();
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            match name {
                "busy_timeout_ms" => {
                    let millis = value.parse().map_err(|_| {
                        Error::Config(format!(
                            "busy_timeout_ms must be a whole number of milliseconds, not {value:?}"
                        ))
                    })?;
                    options.busy_timeout = Duration::from_millis(millis);
                }
                "synchronous" => {
                    options.synchronous = match value {
                        "full" | "FULL" => Synchronous::Full,
                        "normal" | "NORMAL" => Synchronous::Normal,
                        other => {
                            return Err(Error::Config(format!(
                                "synchronous must be full or normal, not {other:?}"
                            )));
                        }
                    }
                }
                other => {
                    return Err(Error::Config(format!(
                        "unknown sqlite:// URL parameter {other:?} (known: busy_timeout_ms, synchronous)"
                    )));
                }
            }
        }
        Self::open(path, &options)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `work` on the connection on tokio's blocking pool.
    async fn with_connection<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let connection = Arc::clone(&self.connection);
        tokio::task::spawn_blocking(move || {
            // A panic inside `work` rolls its transaction back when the Transaction drops, so
            // a poisoned connection is still consistent.
            let mut connection = connection.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            work(&mut connection)
        })
        .await
        .map_err(|join_error| Error::unavailable(format!("SQLite worker failed: {join_error}")))?
    }
}

fn migrate(connection: &mut Connection) -> Result<()> {
    let transaction = connection
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(unavailable)?;
    let version: usize = transaction
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(unavailable)?;
    if version > MIGRATIONS.len() {
        return Err(Error::Config(format!(
            "the database schema is version {version}, newer than this idem knows ({}); upgrade idem",
            MIGRATIONS.len()
        )));
    }
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(version) {
        transaction.execute_batch(migration).map_err(unavailable)?;
        transaction.pragma_update(None, "user_version", index + 1).map_err(unavailable)?;
    }
    transaction.commit().map_err(unavailable)
}

fn unavailable(error: rusqlite::Error) -> Error {
    Error::unavailable(error)
}

fn to_sql(timestamp: Timestamp) -> i64 {
    i64::try_from(timestamp.as_millis()).unwrap_or(i64::MAX)
}

fn from_sql(millis: i64) -> Timestamp {
    Timestamp::from_millis(u64::try_from(millis).unwrap_or(0))
}

/// The fencing token's bits, stored in SQLite's signed 64-bit integer.
fn token_to_sql(token: FencingToken) -> i64 {
    token.as_u64() as i64
}

const SELECT_RECORD: &str =
    "SELECT fingerprint, state, token, lease_expires_at, payload, created_at, expires_at
     FROM idem_records WHERE scope = ?1 AND key = ?2";

/// Reads one row back, checking the invariants the writes keep.
fn read_record(row: &rusqlite::Row<'_>) -> rusqlite::Result<Result<Record>> {
    let fingerprint: Vec<u8> = row.get(0)?;
    let state: i64 = row.get(1)?;
    let token: Option<i64> = row.get(2)?;
    let lease_expires_at: Option<i64> = row.get(3)?;
    let payload: Option<Vec<u8>> = row.get(4)?;
    let created_at: i64 = row.get(5)?;
    let expires_at: i64 = row.get(6)?;
    Ok((|| {
        let fingerprint = Fingerprint::from_slice(&fingerprint)
            .ok_or_else(|| Error::Corrupt(format!("fingerprint of {} bytes", fingerprint.len())))?;
        let state = match (state, token, lease_expires_at, payload) {
            (IN_FLIGHT, Some(token), Some(lease), None) => RecordState::InFlight {
                token: FencingToken::from_u64(token as u64),
                lease_expires_at: from_sql(lease),
            },
            (COMPLETED, None, None, Some(payload)) => {
                RecordState::Completed { payload: payload.into() }
            }
            (state, token, lease, payload) => {
                return Err(Error::Corrupt(format!(
                    "state {state} with token {token:?}, lease {lease:?}, payload present: {}",
                    payload.is_some()
                )));
            }
        };
        Ok(Record {
            fingerprint,
            state,
            created_at: from_sql(created_at),
            expires_at: from_sql(expires_at),
        })
    })())
}

fn select_record(connection: &Connection, key: &RecordKey) -> Result<Option<Record>> {
    connection
        .prepare_cached(SELECT_RECORD)
        .and_then(|mut statement| {
            statement
                .query_row(params![key.scope.as_str(), key.key.as_str()], read_record)
                .optional()
        })
        .map_err(unavailable)?
        .transpose()
}

/// Runs an UPDATE or DELETE that only matches the owner's in-flight row.
fn fenced(connection: &Connection, sql: &str, params: impl rusqlite::Params) -> Result<()> {
    let changed = connection
        .prepare_cached(sql)
        .and_then(|mut statement| statement.execute(params))
        .map_err(unavailable)?;
    if changed == 1 { Ok(()) } else { Err(Error::Fenced) }
}

#[async_trait]
impl Store for SqliteStore {
    async fn claim(&self, request: ClaimRequest<'_>) -> Result<Decision> {
        let key = request.key.clone();
        let fingerprint = *request.fingerprint;
        let (token, now, lease_expires_at, expires_at) =
            (request.token, request.now, request.lease_expires_at, request.expires_at);
        self.with_connection(move |connection| {
            // IMMEDIATE takes the write lock before the read: no other claim can slip between.
            let transaction = connection
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            let existing = select_record(&transaction, &key)?;
            let decision = decide(existing.as_ref(), &fingerprint, now);
            if decision == Decision::Acquire {
                transaction
                    .prepare_cached(
                        "INSERT OR REPLACE INTO idem_records
                         (scope, key, fingerprint, state, token, lease_expires_at, payload, created_at, expires_at)
                         VALUES (?1, ?2, ?3, 0, ?4, ?5, NULL, ?6, ?7)",
                    )
                    .and_then(|mut statement| {
                        statement.execute(params![
                            key.scope.as_str(),
                            key.key.as_str(),
                            &fingerprint.as_bytes()[..],
                            token_to_sql(token),
                            to_sql(lease_expires_at),
                            to_sql(now),
                            to_sql(expires_at),
                        ])
                    })
                    .map_err(unavailable)?;
                transaction.commit().map_err(unavailable)?;
            }
            // Otherwise the transaction rolls back on drop: nothing was written.
            Ok(decision)
        })
        .await
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: FencingToken,
        payload: Bytes,
        _now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<()> {
        let key = key.clone();
        self.with_connection(move |connection| {
            fenced(
                connection,
                "UPDATE idem_records
                 SET state = 1, payload = ?1, token = NULL, lease_expires_at = NULL, expires_at = ?2
                 WHERE scope = ?3 AND key = ?4 AND state = 0 AND token = ?5",
                params![
                    &payload[..],
                    to_sql(expires_at),
                    key.scope.as_str(),
                    key.key.as_str(),
                    token_to_sql(token)
                ],
            )
        })
        .await
    }

    async fn release(&self, key: &RecordKey, token: FencingToken) -> Result<()> {
        let key = key.clone();
        self.with_connection(move |connection| {
            fenced(
                connection,
                "DELETE FROM idem_records WHERE scope = ?1 AND key = ?2 AND state = 0 AND token = ?3",
                params![key.scope.as_str(), key.key.as_str(), token_to_sql(token)],
            )
        })
        .await
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: FencingToken,
        _now: Timestamp,
        lease_expires_at: Timestamp,
        expires_at: Timestamp,
    ) -> Result<()> {
        let key = key.clone();
        self.with_connection(move |connection| {
            fenced(
                connection,
                "UPDATE idem_records SET lease_expires_at = ?1, expires_at = ?2
                 WHERE scope = ?3 AND key = ?4 AND state = 0 AND token = ?5",
                params![
                    to_sql(lease_expires_at),
                    to_sql(expires_at),
                    key.scope.as_str(),
                    key.key.as_str(),
                    token_to_sql(token)
                ],
            )
        })
        .await
    }

    async fn get(&self, key: &RecordKey) -> Result<Option<Record>> {
        let key = key.clone();
        self.with_connection(move |connection| select_record(connection, &key)).await
    }

    async fn delete(&self, key: &RecordKey) -> Result<bool> {
        let key = key.clone();
        self.with_connection(move |connection| {
            connection
                .prepare_cached("DELETE FROM idem_records WHERE scope = ?1 AND key = ?2")
                .and_then(|mut statement| {
                    statement.execute(params![key.scope.as_str(), key.key.as_str()])
                })
                .map(|deleted| deleted > 0)
                .map_err(unavailable)
        })
        .await
    }

    async fn sweep(&self, now: Timestamp, limit: usize) -> Result<usize> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with_connection(move |connection| {
            // One short transaction per batch, through the expires_at index.
            connection
                .prepare_cached(
                    "DELETE FROM idem_records WHERE rowid IN
                     (SELECT rowid FROM idem_records WHERE expires_at <= ?1 LIMIT ?2)",
                )
                .and_then(|mut statement| statement.execute(params![to_sql(now), limit]))
                .map_err(unavailable)
        })
        .await
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<RecordSummary>> {
        let scope = query.scope.as_ref().map(|scope| scope.as_str().to_owned());
        let state = query.state.map(|state| match state {
            StateFilter::InFlight => IN_FLIGHT,
            StateFilter::Completed => COMPLETED,
        });
        let created_before = query.created_before.map(to_sql);
        let limit = i64::try_from(query.effective_limit()).unwrap_or(i64::MAX);
        self.with_connection(move |connection| {
            let mut statement = connection
                .prepare_cached(
                    "SELECT scope, key, fingerprint, lease_expires_at, length(payload), created_at, expires_at
                     FROM idem_records
                     WHERE (?1 IS NULL OR scope = ?1) AND (?2 IS NULL OR state = ?2)
                       AND (?3 IS NULL OR created_at < ?3)
                     ORDER BY created_at LIMIT ?4",
                )
                .map_err(unavailable)?;
            let rows = statement
                .query_map(params![scope, state, created_before, limit], |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, Vec<u8>>(2)?,
                        row.get::<_, Option<i64>>(3)?,
                        row.get::<_, Option<i64>>(4)?,
                        row.get::<_, i64>(5)?,
                        row.get::<_, i64>(6)?,
                    ))
                })
                .map_err(unavailable)?;
            let mut summaries = Vec::new();
            for row in rows {
                let (scope, key, fingerprint, lease, payload_len, created_at, expires_at) =
                    row.map_err(unavailable)?;
                summaries.push(RecordSummary {
                    key: RecordKey::new(
                        Scope::named(scope),
                        IdempotencyKey::new(key).map_err(|error| Error::Corrupt(error.to_string()))?,
                    ),
                    fingerprint: Fingerprint::from_slice(&fingerprint)
                        .ok_or_else(|| Error::Corrupt("fingerprint is not 32 bytes".into()))?,
                    lease_expires_at: lease.map(from_sql),
                    payload_len: payload_len.map(|len| len as u64),
                    created_at: from_sql(created_at),
                    expires_at: from_sql(expires_at),
                });
            }
            Ok(summaries)
        })
        .await
    }

    async fn ping(&self) -> Result<()> {
        self.with_connection(|connection| {
            connection.query_row("SELECT 1", [], |_| Ok(())).map_err(unavailable)
        })
        .await
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            name: "sqlite",
            durable: true,
            shared_by_processes: true,
            shared_by_hosts: false,
            native_expiry: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh database file in its own directory under the system's temp dir.
    pub(crate) fn temp_db(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "idem-sqlite-test-{}-{:016x}",
            std::process::id(),
            FencingToken::generate().as_u64()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(format!("{name}.db"))
    }

    idem_core::store_conformance_tests!(async {
        Some(SqliteStore::open(temp_db("conformance"), &SqliteOptions::default()).unwrap())
    });
}
