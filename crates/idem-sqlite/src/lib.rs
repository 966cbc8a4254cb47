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
//! - Operations run on one writer thread per process, in groups: every operation waiting (up
//!   to 256) runs in one `BEGIN IMMEDIATE` transaction, which takes the write lock before any
//!   read, so no claim from another process can slip between a read and a write. Callers are
//!   answered only after the group commits; if any operation meets a database error, the whole
//!   group rolls back and every caller in it is told the store is unavailable. Under load, many
//!   claims share one disk sync (group commit).
//! - Complete, release and renew are single statements that match the owner's fencing token.
//! - `synchronous=full` (the default) syncs every commit, so a stored outcome survives power
//!   loss; `synchronous=normal` survives a crash of the process (`kill -9`) but may lose the
//!   last commits on power loss, in exchange for much cheaper commits.

use std::any::Any;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use idem_core::{
    Capabilities, ClaimRequest, Decision, Error, FencingToken, Fingerprint, ListQuery, Record,
    RecordKey, RecordState, RecordSummary, Result, StateFilter, Store, Timestamp, decide,
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

/// Most operations committed in one transaction.
const MAX_BATCH: usize = 256;
/// Most operations waiting for the writer; callers wait for room beyond it.
const QUEUE_DEPTH: usize = 4096;

/// A job's result, its type erased so that one queue serves every operation.
type Erased = Box<dyn Any + Send>;

/// The work of one operation, run inside a group transaction.
type Work = Box<dyn FnOnce(&Connection) -> Result<Erased> + Send>;

/// An operation for the writer thread.
struct Job {
    work: Work,
    reply: tokio::sync::oneshot::Sender<Result<Erased>>,
}

/// A [`Store`] on one SQLite file.
///
/// One writer thread per store owns the connection and commits operations in groups: it takes
/// every operation waiting (up to 256), runs them in one `BEGIN IMMEDIATE` transaction, commits
/// once, and only then answers each caller. Under load, many claims and completions share one
/// disk sync instead of paying one each; alone, an operation is its own group.
#[derive(Clone)]
pub struct SqliteStore {
    jobs: tokio::sync::mpsc::Sender<Job>,
    path: Arc<PathBuf>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.path).finish_non_exhaustive()
    }
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
        let (jobs, queue) = tokio::sync::mpsc::channel(QUEUE_DEPTH);
        std::thread::Builder::new()
            .name("idem-sqlite-writer".into())
            .spawn(move || write_in_groups(connection, queue))
            .map_err(|error| {
                Error::Config(format!("cannot start the SQLite writer thread: {error}"))
            })?;
        Ok(Self { jobs, path: Arc::new(path) })
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

    /// Runs `work` inside the writer's next group transaction and returns its result once
    /// that transaction has committed.
    async fn with_connection<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = Job {
            work: Box::new(move |connection| {
                work(connection).map(|value| Box::new(value) as Box<dyn Any + Send>)
            }),
            reply,
        };
        self.jobs
            .send(job)
            .await
            .map_err(|_| Error::unavailable("the SQLite writer thread has stopped"))?;
        let value = answer
            .await
            .map_err(|_| Error::unavailable("the SQLite writer thread stopped mid-operation"))??;
        Ok(*value.downcast::<T>().expect("a job's result has the type it was queued with"))
    }
}

/// The writer thread: group commit. Ends when every `SqliteStore` clone is gone.
fn write_in_groups(connection: Connection, mut queue: tokio::sync::mpsc::Receiver<Job>) {
    while let Some(first) = queue.blocking_recv() {
        let mut group = vec![first];
        while group.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        // IMMEDIATE takes the write lock before any read: no claim in another process can
        // slip between a read and a write of this group.
        if let Err(error) = connection.execute_batch("BEGIN IMMEDIATE") {
            let message = format!("cannot begin a transaction: {error}");
            for job in group {
                let _ = job.reply.send(Err(Error::unavailable(message.clone())));
            }
            continue;
        }
        let mut results = Vec::with_capacity(group.len());
        let mut failed: Option<String> = None;
        for job in group {
            if let Some(reason) = &failed {
                results.push((job.reply, Err(Error::unavailable(format!("not run: {reason}")))));
                continue;
            }
            let result = (job.work)(&connection);
            // A database error may have left the transaction half done: the whole group is
            // rolled back. Fenced, corrupt and the like changed nothing and stand alone.
            if let Err(error) = &result
                && error.is_unavailable()
            {
                failed = Some(error.to_string());
            }
            results.push((job.reply, result));
        }
        let committed = match &failed {
            None => connection
                .execute_batch("COMMIT")
                .map_err(|error| format!("commit failed: {error}")),
            Some(reason) => Err(format!("rolled back: {reason}")),
        };
        match committed {
            Ok(()) => {
                for (reply, result) in results {
                    let _ = reply.send(result);
                }
            }
            Err(reason) => {
                if !connection.is_autocommit() {
                    let _ = connection.execute_batch("ROLLBACK");
                }
                for (reply, result) in results {
                    let outcome = match result {
                        Err(error) if error.is_unavailable() => Err(error),
                        _ => Err(Error::unavailable(format!("the group transaction {reason}"))),
                    };
                    let _ = reply.send(outcome);
                }
            }
        }
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
        let fingerprint = Fingerprint::from_stored(&fingerprint)?;
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
            // Inside the writer's group transaction, which holds the write lock.
            let existing = select_record(connection, &key)?;
            let decision = decide(existing.as_ref(), &fingerprint, now);
            if decision == Decision::Acquire {
                connection
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
            }
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
                    key: RecordKey::from_stored(scope, key)?,
                    fingerprint: Fingerprint::from_stored(&fingerprint)?,
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
