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
    Capabilities, ChangeFeed, ClaimRequest, Decision, Error, FencingToken, Fingerprint, ListQuery,
    Notifies, Record, RecordKey, RecordSummary, Result, StateFilter, Store, Timestamp, decide,
    store_kit,
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

const IN_FLIGHT: i64 = store_kit::IN_FLIGHT as i64;
const COMPLETED: i64 = store_kit::COMPLETED as i64;

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
    changes: ChangeFeed,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.path).finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    pub fn open(path: impl AsRef<Path>, options: &SqliteOptions) -> Result<Self> {
        Self::open_with(path.as_ref(), options, true)
    }

    /// Opens a database idem already created, as it is: no file is created and no migration
    /// runs (for operator tools, which must never change the schema under a running gateway).
    pub fn open_existing(path: impl AsRef<Path>, options: &SqliteOptions) -> Result<Self> {
        Self::open_with(path.as_ref(), options, false)
    }

    fn open_with(path: &Path, options: &SqliteOptions, migrating: bool) -> Result<Self> {
        let path = path.to_path_buf();
        let flags = if migrating {
            rusqlite::OpenFlags::default()
        } else {
            rusqlite::OpenFlags::default() - rusqlite::OpenFlags::SQLITE_OPEN_CREATE
        };
        let mut connection = Connection::open_with_flags(&path, flags).map_err(|error| {
            Error::Config(format!("cannot open SQLite database {}: {error}", path.display()))
        })?;
        connection.busy_timeout(options.busy_timeout).map_err(unavailable)?;
        if !migrating {
            // Before anything that could write: a file that is not idem's is left untouched.
            check_schema(&connection)?;
        }
        connection.pragma_update(None, "journal_mode", "WAL").map_err(unavailable)?;
        let synchronous = match options.synchronous {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        };
        connection.pragma_update(None, "synchronous", synchronous).map_err(unavailable)?;
        if migrating {
            migrate(&mut connection)?;
        }
        let (jobs, queue) = tokio::sync::mpsc::channel(QUEUE_DEPTH);
        std::thread::Builder::new()
            .name("idem-sqlite-writer".into())
            .spawn(move || write_in_groups(connection, queue))
            .map_err(|error| {
                Error::Config(format!("cannot start the SQLite writer thread: {error}"))
            })?;
        Ok(Self { jobs, path: Arc::new(path), changes: ChangeFeed::new() })
    }

    /// Opens from a store URL: `sqlite://PATH[?busy_timeout_ms=N&synchronous=full|normal]`.
    /// `sqlite://idem.db` is relative to the working directory, `sqlite:///var/lib/idem.db`
    /// absolute.
    pub fn from_url(url: &str) -> Result<Self> {
        let (path, options) = parse_url(url)?;
        Self::open(path, &options)
    }

    /// [`SqliteStore::from_url`] for a database that must already exist: see
    /// [`SqliteStore::open_existing`].
    pub fn from_url_existing(url: &str) -> Result<Self> {
        let (path, options) = parse_url(url)?;
        Self::open_existing(path, &options)
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

/// The path and options of a `sqlite://` URL.
fn parse_url(url: &str) -> Result<(&str, SqliteOptions)> {
    let rest = url
        .strip_prefix("sqlite://")
        .ok_or_else(|| Error::Config(format!("not a sqlite:// URL: {url}")))?;
    let (path, pairs) = store_kit::url_parameters(rest);
    if path.is_empty() {
        return Err(Error::Config(
            "sqlite:// URL needs a file path, as in sqlite://idem.db".into(),
        ));
    }
    let mut options = SqliteOptions::default();
    for (name, value) in pairs {
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
    Ok((path, options))
}

/// The writer thread: group commit. Ends when every `SqliteStore` clone is gone.
///
/// Each operation of a group runs inside a savepoint of its own: one that fails (a payload
/// over SQLite's limits, a statement error, even a panic) is undone alone and answered with
/// its error, and its neighbours still commit. Only a failed `COMMIT` (or SQLite rolling the
/// whole transaction back itself, as on a full disk) fails the whole group.
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
            let result = run_in_savepoint(&connection, job.work);
            if connection.is_autocommit() {
                // SQLite ended the transaction itself: everything before is undone too.
                failed = Some(match &result {
                    Err(error) => error.to_string(),
                    Ok(_) => "SQLite rolled the transaction back".into(),
                });
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

/// Runs one operation inside `SAVEPOINT op`: kept if it succeeds or changed nothing (fenced,
/// corrupt), undone if it failed with a database error or panicked.
fn run_in_savepoint(connection: &Connection, work: Work) -> Result<Erased> {
    if let Err(error) = connection.execute_batch("SAVEPOINT op") {
        return Err(Error::unavailable(format!("cannot open a savepoint: {error}")));
    }
    let result = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(connection))) {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|text| (*text).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            tracing::error!(%message, "a SQLite store operation panicked; it was undone");
            Err(Error::unavailable(format!("the operation panicked: {message}")))
        }
    };
    if connection.is_autocommit() {
        return result;
    }
    let undo = result.as_ref().is_err_and(Error::is_unavailable);
    let end = if undo { "ROLLBACK TO op; RELEASE op" } else { "RELEASE op" };
    match connection.execute_batch(end) {
        Ok(()) => result,
        Err(error) => Err(Error::unavailable(format!("cannot end the savepoint: {error}"))),
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

/// Refuses a database whose schema is not the one this build writes, without changing it.
fn check_schema(connection: &Connection) -> Result<()> {
    let version: usize = connection
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(unavailable)?;
    match version {
        0 => Err(Error::Config(
            "this file holds no idem records (no idem schema); is it the gateway's --store?".into(),
        )),
        current if current == MIGRATIONS.len() => Ok(()),
        older if older < MIGRATIONS.len() => Err(Error::Config(format!(
            "the database schema is version {older}, older than this idem ({}); start `idem serve` of this version once to migrate it",
            MIGRATIONS.len()
        ))),
        newer => Err(Error::Config(format!(
            "the database schema is version {newer}, newer than this idem knows ({}); upgrade idem",
            MIGRATIONS.len()
        ))),
    }
}

fn unavailable(error: rusqlite::Error) -> Error {
    Error::unavailable(error)
}

use store_kit::{millis_from_sql as from_sql, millis_to_sql as to_sql, token_to_sql};

const SELECT_RECORD: &str =
    "SELECT fingerprint, state, token, lease_expires_at, payload, created_at, expires_at
     FROM idem_records WHERE scope = ?1 AND key = ?2";

/// Reads one row back, checking the invariants the writes keep. A column holding a value of
/// another type (SQLite lets any column hold any) is a corrupt record, not a failed read: the
/// store answered, and what it holds must never be taken for "nothing there".
#[doc(hidden)]
pub fn read_record(row: &rusqlite::Row<'_>) -> rusqlite::Result<Result<Record>> {
    let columns = (|| {
        Ok::<_, rusqlite::Error>((
            row.get::<_, Vec<u8>>(0)?,
            row.get::<_, i64>(1)?,
            row.get::<_, Option<i64>>(2)?,
            row.get::<_, Option<i64>>(3)?,
            row.get::<_, Option<Vec<u8>>>(4)?,
            row.get::<_, i64>(5)?,
            row.get::<_, i64>(6)?,
        ))
    })();
    let (fingerprint, state, token, lease_expires_at, payload, created_at, expires_at) =
        match columns {
            Ok(columns) => columns,
            Err(
                error @ (rusqlite::Error::InvalidColumnType(..)
                | rusqlite::Error::FromSqlConversionFailure(..)
                | rusqlite::Error::IntegralValueOutOfRange(..)),
            ) => return Ok(Err(Error::Corrupt(format!("a column of the wrong type: {error}")))),
            Err(other) => return Err(other),
        };
    Ok((|| {
        store_kit::StoredFields {
            fingerprint: &fingerprint,
            state,
            token: token.map(store_kit::token_from_sql),
            lease_expires_at: lease_expires_at
                .map(|lease| store_kit::stored_millis(lease, "lease"))
                .transpose()?,
            payload: payload.map(Bytes::from),
            created_at: store_kit::stored_millis(created_at, "created_at")?,
            expires_at: store_kit::stored_millis(expires_at, "expires_at")?,
        }
        .into_record()
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

/// Completes an in-flight record owned by a token: payload, expiry, scope, key, token.
const COMPLETE: &str = "UPDATE idem_records
     SET state = 1, payload = ?1, token = NULL, lease_expires_at = NULL, expires_at = ?2
     WHERE scope = ?3 AND key = ?4 AND state = 0 AND token = ?5";

/// Stores a claim's outcome inside the caller's own transaction, on the database file the
/// [`SqliteStore`] uses (the caller's own connection to it): the caller's writes and the
/// stored outcome commit together or not at all. Fails with [`Error::Fenced`] if the claim no
/// longer owns the record: the caller must then roll back.
pub fn complete_in(
    transaction: &rusqlite::Transaction<'_>,
    completion: &idem_core::Completion,
    payload: &[u8],
) -> Result<()> {
    let key = &completion.key;
    fenced(
        transaction,
        COMPLETE,
        params![
            payload,
            to_sql(completion.expires_at),
            key.scope.as_str(),
            key.key.as_str(),
            token_to_sql(completion.token)
        ],
    )
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
        let notified = key.clone();
        let key = key.clone();
        self.with_connection(move |connection| {
            fenced(
                connection,
                COMPLETE,
                params![
                    &payload[..],
                    to_sql(expires_at),
                    key.scope.as_str(),
                    key.key.as_str(),
                    token_to_sql(token)
                ],
            )
        })
        .await?;
        self.changes.notify(&notified);
        Ok(())
    }

    async fn release(&self, key: &RecordKey, token: FencingToken) -> Result<()> {
        let notified = key.clone();
        let key = key.clone();
        self.with_connection(move |connection| {
            fenced(
                connection,
                "DELETE FROM idem_records WHERE scope = ?1 AND key = ?2 AND state = 0 AND token = ?3",
                params![key.scope.as_str(), key.key.as_str(), token_to_sql(token)],
            )
        })
        .await?;
        self.changes.notify(&notified);
        Ok(())
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
        let notified = key.clone();
        let key = key.clone();
        let deleted = self
            .with_connection(move |connection| {
                connection
                    .prepare_cached("DELETE FROM idem_records WHERE scope = ?1 AND key = ?2")
                    .and_then(|mut statement| {
                        statement.execute(params![key.scope.as_str(), key.key.as_str()])
                    })
                    .map(|deleted| deleted > 0)
                    .map_err(unavailable)
            })
            .await?;
        self.changes.notify(&notified);
        Ok(deleted)
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

    /// A write that leaves nothing behind: a row inserted and deleted again in the group's
    /// transaction, so a read-only file or a full disk fails it.
    async fn ping(&self) -> Result<()> {
        self.with_connection(|connection| {
            connection
                .execute_batch(
                    "INSERT OR REPLACE INTO idem_records
                     (scope, key, fingerprint, state, token, lease_expires_at, payload, created_at, expires_at)
                     VALUES (' health', ' health', x'', 1, NULL, NULL, x'', 0, 0);
                     DELETE FROM idem_records WHERE scope = ' health' AND key = ' health';",
                )
                .map_err(unavailable)
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
            notifies: Notifies::ThisProcess,
        }
    }

    fn subscribe(&self) -> Option<tokio::sync::broadcast::Receiver<u64>> {
        Some(self.changes.subscribe())
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

    fn key(name: &str) -> RecordKey {
        RecordKey::new(idem_core::Scope::named("t"), idem_core::IdempotencyKey::new(name).unwrap())
    }

    /// Claims `count` keys at once, so that they share group transactions with whatever else
    /// is queued; answers how many were acquired.
    async fn claim_many(store: &SqliteStore, prefix: &str, count: usize) -> usize {
        let fingerprint = Fingerprint::builder().part(b"x").finish();
        let now = Timestamp::from_millis(1_000);
        let claims = (0..count).map(|i| {
            let store = store.clone();
            let key = key(&format!("{prefix}-{i}"));
            tokio::spawn(async move {
                store
                    .claim(ClaimRequest {
                        key: &key,
                        fingerprint: &fingerprint,
                        token: FencingToken::generate(),
                        now,
                        lease_expires_at: Timestamp::from_millis(60_000),
                        expires_at: Timestamp::from_millis(u64::MAX / 2),
                    })
                    .await
            })
        });
        let mut acquired = 0;
        for claim in claims.collect::<Vec<_>>() {
            if claim.await.unwrap().unwrap() == Decision::Acquire {
                acquired += 1;
            }
        }
        acquired
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_outcome_stored_in_the_callers_transaction_commits_with_its_writes() {
        use idem_core::{Begin, Engine, EngineConfig, SystemClock};
        let path = temp_db("in-transaction");
        let store = SqliteStore::open(&path, &SqliteOptions::default()).unwrap();
        let engine = Engine::new(store, SystemClock, EngineConfig::default());
        let fingerprint = Fingerprint::builder().part(b"pay 700").finish();
        let mut app = Connection::open(&path).unwrap();
        app.busy_timeout(Duration::from_secs(5)).unwrap();
        app.execute_batch("CREATE TABLE payments (key TEXT PRIMARY KEY, cents INTEGER)").unwrap();

        for (name, commit) in [("committed", true), ("rolled-back", false)] {
            let Begin::Run(claim) = engine.begin(key(name), fingerprint).await.unwrap() else {
                panic!("a new key runs");
            };
            let transaction = app.transaction().unwrap();
            transaction.execute("INSERT INTO payments VALUES (?1, 700)", [name]).unwrap();
            complete_in(&transaction, &claim.completion(), b"payment 1").unwrap();
            if commit {
                transaction.commit().unwrap();
                claim.completed_elsewhere();
            } else {
                drop(transaction);
                claim.release().await.unwrap();
            }
        }
        // Committed: the payment and its outcome both; the retry replays.
        let replay = engine.begin(key("committed"), fingerprint).await.unwrap();
        assert!(
            matches!(replay, Begin::Replay(ref payload) if payload == "payment 1"),
            "{replay:?}"
        );
        // Rolled back: neither; the retry runs.
        assert!(matches!(
            engine.begin(key("rolled-back"), fingerprint).await.unwrap(),
            Begin::Run(_)
        ));
        let payments: i64 =
            app.query_row("SELECT count(*) FROM payments", [], |row| row.get(0)).unwrap();
        assert_eq!(payments, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_or_panicking_operation_does_not_undo_its_neighbours() {
        let store = SqliteStore::open(temp_db("neighbours"), &SqliteOptions::default()).unwrap();
        for round in 0..5 {
            // An operation that always fails with a database error, and one that panics,
            // queued among 50 claims: they fail alone, every claim commits.
            let failing = tokio::spawn({
                let store = store.clone();
                async move {
                    store
                        .with_connection(|connection| {
                            connection
                                .execute("INSERT INTO no_such_table VALUES (1)", [])
                                .map_err(unavailable)
                        })
                        .await
                }
            });
            let panicking = tokio::spawn({
                let store = store.clone();
                async move {
                    store
                        .with_connection(|connection| -> Result<()> {
                            connection.execute_batch("DELETE FROM idem_records").unwrap();
                            panic!("a bug in one operation")
                        })
                        .await
                }
            });
            let acquired = claim_many(&store, &format!("round{round}"), 50).await;
            assert!(failing.await.unwrap().is_err());
            assert!(panicking.await.unwrap().is_err());
            assert_eq!(acquired, 50, "round {round}");
        }
        // Nothing the panicking operation deleted stayed deleted, and the writer still works.
        let listed = store.list(&ListQuery { limit: 1_000, ..ListQuery::default() }).await.unwrap();
        assert_eq!(listed.len(), 250);
        assert_eq!(claim_many(&store, "after", 10).await, 10);
    }
}
