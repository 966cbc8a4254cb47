//! The PostgreSQL store: several gateways (or application instances) on several hosts share
//! one database, and exactly one of them runs each keyed operation.
//!
//! ```no_run
//! # async fn open() -> Result<(), idem_core::Error> {
//! use idem_postgres::PostgresStore;
//!
//! let store = PostgresStore::connect("postgres://idem@db.internal/app?pool_max_size=32").await?;
//! # let _ = store; Ok(()) }
//! ```
//!
//! # How it stays correct
//! - A claim is **one round trip**: the `idem_claim` function reads the row and, only if the
//!   state machine allows it, takes it over with `INSERT ... ON CONFLICT DO UPDATE ... WHERE`.
//!   Racing claims serialise on the row (or on the unique index for a new key); the loser sees
//!   the winner's row. A replay is a plain read: no write, no lock.
//! - Complete, release and renew are single statements that match the owner's fencing token.
//! - Group commit: concurrent claims and completions share one statement over arrays of keys
//!   (see the `batch` module), with the same per-key conditions; a takeover still goes
//!   through `idem_claim`.
//! - Sweeping deletes at most a batch of expired rows per statement, skipping rows another
//!   transaction holds (`FOR UPDATE SKIP LOCKED`), so it never blocks claims for long.
//! - The schema is created and migrated by idem itself, under an advisory lock so that several
//!   instances starting at once migrate once. A database migrated by a newer idem is refused.
//! - Every call is bounded by `op_timeout_ms` (default 5000): a database that stops answering
//!   makes the store unavailable (the gateway fails closed), and the pool reconnects by itself
//!   when the database is back.
//!
//! # URL parameters (besides libpq's own, e.g. `connect_timeout`, `application_name`)
//! - `pool_max_size` (default 16): connections per process.
//! - `op_timeout_ms` (default 5000): the bound on each store call, waiting for a connection
//!   included.
//! - `schema`: keep idem's tables in this schema (created if missing) instead of the default
//!   `search_path`.
//! - `batch_writers` (default 1; 0 turns it off): group commit. Claims and completions from
//!   concurrent requests share statements (one over arrays of keys) and so commits and WAL
//!   flushes; this many batches of each kind are on their way at once, each writer on a
//!   connection of its own (so a process opens up to `pool_max_size + 2 × batch_writers`).
//! - `sslmode` (`disable`, `prefer`, `require`, `verify-ca`, `verify-full`) and
//!   `sslrootcert=PATH`: TLS as libpq means them, with rustls (see the [`tls`] module). Without
//!   `sslmode` no TLS is used.

mod batch;
pub mod tls;

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use idem_core::{
    Capabilities, ChangeFeed, ChangeListener, ClaimRequest, Decision, Error, FencingToken,
    Fingerprint, ListQuery, Notifies, Record, RecordKey, RecordSummary, Result, StateFilter, Store,
    Timestamp, decide, store_kit,
};
use tokio_postgres::types::ToSql;

/// Each migration moves the schema one version up; versions are recorded in
/// `idem_schema_migrations`.
const MIGRATIONS: &[&str] = &[
    // Version 1: the records table and the claim function.
    r#"
    CREATE TABLE idem_records (
        scope            text     NOT NULL,
        key              text     NOT NULL,
        fingerprint      bytea    NOT NULL,
        state            smallint NOT NULL,
        token            bigint,
        lease_expires_at bigint,
        payload          bytea,
        created_at       bigint   NOT NULL,
        expires_at       bigint   NOT NULL,
        PRIMARY KEY (scope, key),
        CONSTRAINT idem_records_state CHECK (
            (state = 0 AND token IS NOT NULL AND lease_expires_at IS NOT NULL AND payload IS NULL)
         OR (state = 1 AND token IS NULL AND lease_expires_at IS NULL AND payload IS NOT NULL))
    );
    CREATE INDEX idem_records_expires_at ON idem_records (expires_at);

    -- Decides a claim in one round trip. Returns the row the decision was made on, and
    -- whether this call acquired it. The takeover condition is idem_core::decide's Acquire.
    CREATE FUNCTION idem_claim(
        p_scope text, p_key text, p_fingerprint bytea, p_token bigint,
        p_now bigint, p_lease_expires_at bigint, p_expires_at bigint)
    RETURNS TABLE (acquired boolean, fingerprint bytea, state smallint, token bigint,
                   lease_expires_at bigint, payload bytea, created_at bigint, expires_at bigint)
    LANGUAGE plpgsql AS $$
    #variable_conflict use_column
    DECLARE
        existing record;
    BEGIN
        -- Each statement of a volatile function sees what committed before it, so a row a
        -- racing claim wrote is seen by the next read. Bounded: a key cannot flip forever.
        FOR attempt IN 1..10 LOOP
            SELECT r.fingerprint, r.state, r.token, r.lease_expires_at, r.payload,
                   r.created_at, r.expires_at
              INTO existing
              FROM idem_records r WHERE r.scope = p_scope AND r.key = p_key;
            IF FOUND AND NOT (existing.expires_at <= p_now
                    OR (existing.state = 0 AND existing.lease_expires_at <= p_now
                        AND existing.fingerprint = p_fingerprint)) THEN
                RETURN QUERY SELECT false, existing.fingerprint, existing.state, existing.token,
                    existing.lease_expires_at, existing.payload, existing.created_at,
                    existing.expires_at;
                RETURN;
            END IF;
            INSERT INTO idem_records AS r
                (scope, key, fingerprint, state, token, lease_expires_at, payload, created_at, expires_at)
            VALUES (p_scope, p_key, p_fingerprint, 0, p_token, p_lease_expires_at, NULL, p_now, p_expires_at)
            ON CONFLICT (scope, key) DO UPDATE SET
                fingerprint = EXCLUDED.fingerprint, state = 0, token = EXCLUDED.token,
                lease_expires_at = EXCLUDED.lease_expires_at, payload = NULL,
                created_at = EXCLUDED.created_at, expires_at = EXCLUDED.expires_at
            WHERE r.expires_at <= p_now
               OR (r.state = 0 AND r.lease_expires_at <= p_now AND r.fingerprint = p_fingerprint);
            IF FOUND THEN
                RETURN QUERY SELECT true, p_fingerprint, 0::smallint, p_token, p_lease_expires_at,
                    NULL::bytea, p_now, p_expires_at;
                RETURN;
            END IF;
            -- A racing claim changed the row between our read and our write: read it again.
        END LOOP;
        RAISE EXCEPTION 'idem_claim: no stable answer after 10 attempts for key %', p_key;
    END $$;
    "#,
    // Version 2: a record somebody waits for (`Prefer: wait`) announces its completion or
    // release with NOTIFY; the others cost nothing extra.
    r#"
    ALTER TABLE idem_records ADD COLUMN watched boolean NOT NULL DEFAULT false;
    "#,
];

/// The channel completions and releases of watched records are announced on; the payload is
/// the record's `RecordKey::change_id`.
const CHANGES_CHANNEL: &str = "idem_changes";

/// Completes an in-flight record owned by a token. `$2` payload, `$3` expiry, `$4` scope,
/// `$5` key, `$6` token (`$1` is the change id, for [`notifying`]).
const COMPLETE: &str = "UPDATE idem_records
     SET state = 1, payload = $2, token = NULL, lease_expires_at = NULL, expires_at = $3
     WHERE scope = $4 AND key = $5 AND state = 0 AND token = $6
     RETURNING watched";

/// `sql` (a data-modifying statement `RETURNING watched`) wrapped so that it answers how many
/// rows it changed and announces the change (`$1`, the change id) if somebody watches. The
/// announcement is delivered when the transaction commits, never before.
fn notifying(sql: &str) -> String {
    format!(
        "WITH changed AS ({sql})
         SELECT count(*), bool_or(CASE WHEN watched THEN pg_notify('{CHANGES_CHANNEL}', $1) IS NULL END)
         FROM changed"
    )
}

/// Stores a claim's outcome inside the caller's own transaction, on the database the
/// [`PostgresStore`] uses: the caller's writes and the stored outcome commit together or not
/// at all. The statement names `idem_records` unqualified: the transaction's `search_path`
/// must find idem's table (with the store's `schema` parameter, connect the application with
/// `options=-c search_path=<schema>,public` or the like). Fails with [`Error::Fenced`] if the claim no longer owns the record (its lease ran
/// out and another owner took it over): the caller must then roll back.
///
/// ```no_run
/// # async fn pay(engine: idem_core::Engine, client: &mut tokio_postgres::Client, claim: idem_core::Claim) -> Result<(), Box<dyn std::error::Error>> {
/// let transaction = client.transaction().await?;
/// transaction.execute("INSERT INTO payments (cents) VALUES (700)", &[]).await?;
/// idem_postgres::complete_in(&transaction, &claim.completion(), b"payment 1").await?;
/// transaction.commit().await?;
/// claim.completed_elsewhere();
/// # Ok(()) }
/// ```
pub async fn complete_in(
    transaction: &tokio_postgres::Transaction<'_>,
    completion: &idem_core::Completion,
    payload: &[u8],
) -> Result<()> {
    let key = &completion.key;
    let id = key.change_id().to_string();
    let rows = transaction
        .query(
            &notifying(COMPLETE),
            &[
                &id,
                &payload,
                &to_sql(completion.expires_at),
                &key.scope.as_str(),
                &key.key.as_str(),
                &token_to_sql(completion.token),
            ],
        )
        .await
        .map_err(unavailable)?;
    let changed: i64 = rows
        .first()
        .ok_or_else(|| Error::Corrupt("no count came back".into()))?
        .try_get(0)
        .map_err(|error| Error::Corrupt(error.to_string()))?;
    if changed == 1 { Ok(()) } else { Err(Error::Fenced) }
}

/// An arbitrary constant: the advisory lock that serialises migrations.
const MIGRATION_LOCK: i64 = 0x6964_656d_6d69_6772;

use store_kit::{COMPLETED, IN_FLIGHT};

/// A [`Store`] on PostgreSQL.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    op_timeout: Duration,
    /// For the LISTEN connection, opened when the first waiter subscribes.
    database: std::sync::Arc<tls::Database>,
    changes: ChangeFeed,
    /// Whether the LISTEN connection was started, and whether it listens now.
    listener: std::sync::Arc<ChangeListener>,
    /// Group commit for claims and completions (`None`: each on its own).
    claims: Option<batch::Batcher<batch::ClaimJob>>,
    completions: Option<batch::Batcher<batch::CompleteJob>>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("pool", &self.pool.status())
            .field("op_timeout", &self.op_timeout)
            .finish()
    }
}

/// The URL's idem-specific parameters, split from what tokio-postgres understands.
#[derive(Debug)]
struct Settings {
    config: tokio_postgres::Config,
    tls: tls::MakeRustls,
    pool_max_size: usize,
    op_timeout: Duration,
    schema: Option<String>,
    batch_writers: usize,
}

fn parse_url(url: &str) -> Result<Settings> {
    let config_error =
        |message: String| Error::Config(format!("{message} (in the postgres:// URL)"));
    let (base, pairs) = store_kit::url_parameters(url);
    let mut passed_on = Vec::new();
    let mut pool_max_size = 16;
    let mut op_timeout = Duration::from_secs(5);
    let mut schema = None;
    let mut batch_writers = 1;
    let mut tls_parameters = tls::TlsParameters::default();
    for (name, value) in pairs {
        if tls_parameters.take(name, value) {
            continue;
        }
        match name {
            "pool_max_size" => {
                pool_max_size =
                    value.parse().ok().filter(|size| (1..=1024).contains(size)).ok_or_else(
                        || config_error(format!("pool_max_size must be 1 to 1024, not {value:?}")),
                    )?;
            }
            "op_timeout_ms" => op_timeout = store_kit::positive_millis(name, value, "postgres")?,
            "schema" => {
                let valid = !value.is_empty()
                    && value.len() <= 63
                    && value
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                    && !value.as_bytes()[0].is_ascii_digit();
                if !valid {
                    return Err(config_error(format!(
                        "schema must be a lowercase SQL identifier (a-z, 0-9, _), not {value:?}"
                    )));
                }
                schema = Some(value.to_owned());
            }
            "batch_writers" => {
                batch_writers =
                    value.parse().ok().filter(|writers| *writers <= 64).ok_or_else(|| {
                        config_error(format!("batch_writers must be 0 to 64, not {value:?}"))
                    })?;
            }
            _ => passed_on.push((name, value)),
        }
    }
    let rest = store_kit::rejoin_url(base, &passed_on);
    let mut config = tokio_postgres::Config::from_str(&rest)
        .map_err(|error| Error::Config(format!("invalid postgres:// URL: {error}")))?;
    if let Some(schema) = &schema {
        add_option(&mut config, &format!("-c search_path={schema}"));
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(op_timeout);
    }
    if config.get_application_name().is_none() {
        config.application_name("idem");
    }
    let database = tls::Database::with_tls(config, tls_parameters)?;
    let (config, tls) = (database.config().clone(), database.tls());
    Ok(Settings { config, tls, pool_max_size, op_timeout, schema, batch_writers })
}

/// Appends a server option (`-c name=value`) to those the URL gave.
fn add_option(config: &mut tokio_postgres::Config, option: &str) {
    let options = match config.get_options() {
        Some(given) if !given.trim().is_empty() => format!("{given} {option}"),
        _ => option.to_owned(),
    };
    config.options(options);
}

/// A pool of `size` connections to `config`, every wait bounded by `op_timeout`; `prepare`
/// runs on each new connection.
fn build_pool(
    config: tokio_postgres::Config,
    tls: tls::MakeRustls,
    size: usize,
    op_timeout: Duration,
    prepare: Option<deadpool_postgres::Hook>,
) -> Result<Pool> {
    let manager = Manager::from_config(
        config,
        tls,
        ManagerConfig { recycling_method: RecyclingMethod::Fast },
    );
    let mut builder = Pool::builder(manager);
    if let Some(hook) = prepare {
        builder = builder.post_create(hook);
    }
    builder
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(op_timeout))
        .create_timeout(Some(op_timeout))
        .recycle_timeout(Some(op_timeout))
        .build()
        .map_err(|error| Error::Config(format!("cannot build the connection pool: {error}")))
}

impl PostgresStore {
    /// Connects, creates or migrates the schema, and returns the store. The database must be
    /// reachable now; later outages make calls fail as unavailable until it is back.
    pub async fn connect(url: &str) -> Result<Self> {
        let (store, schema) = Self::pool(url)?;
        store.migrate(schema.as_deref()).await?;
        Ok(store)
    }

    /// Connects to a database idem already set up, as it is: no schema is created and no
    /// migration runs (for operator tools, which must never change the schema under running
    /// gateways).
    pub async fn connect_existing(url: &str) -> Result<Self> {
        let (store, _) = Self::pool(url)?;
        let corrupt = |error: tokio_postgres::Error| Error::Corrupt(error.to_string());
        let present =
            store.query("SELECT to_regclass('idem_schema_migrations') IS NOT NULL", &[]).await?;
        let present = match present.first() {
            Some(row) => row.try_get::<_, bool>(0).map_err(corrupt)?,
            None => false,
        };
        let version = if present {
            let rows = store
                .query("SELECT coalesce(max(version), -1) FROM idem_schema_migrations", &[])
                .await?;
            match rows.first() {
                Some(row) => row.try_get::<_, i32>(0).map_err(corrupt)?,
                None => -1,
            }
        } else {
            -1
        };
        let known = MIGRATIONS.len() as i32;
        match version {
            -1 => Err(Error::Config(
                "this database holds no idem schema (check the URL and its schema parameter)"
                    .into(),
            )),
            current if current == known => Ok(store),
            older if older < known => Err(Error::Config(format!(
                "the database schema is version {older}, older than this idem ({known}); start `idem serve` of this version once to migrate it"
            ))),
            newer => Err(Error::Config(format!(
                "the database schema is version {newer}, newer than this idem knows ({known}); upgrade idem"
            ))),
        }
    }

    fn pool(url: &str) -> Result<(Self, Option<String>)> {
        let settings = parse_url(url)?;
        let (writers, timeout) = (settings.batch_writers, settings.op_timeout);
        let pool = build_pool(
            settings.config.clone(),
            settings.tls.clone(),
            settings.pool_max_size,
            timeout,
            None,
        )?;
        // The batch writers have connections of their own (one per writer and kind), on which
        // every batched statement is planned for its own arrays and the table as it is now. A
        // plan cached while the table was small (a new deployment) scans the whole table for
        // every batch once it has grown, which made group commit slower by the minute.
        let writers_pool = (writers > 0)
            .then(|| {
                // Set once per connection, after it is made (a startup option would be refused
                // by PgBouncer). A server that does not know the setting (PostgreSQL before
                // 12) keeps its own plan choice: the batches still run.
                let custom_plans = deadpool_postgres::Hook::async_fn(|client, _| {
                    Box::pin(async move {
                        let set = "SET plan_cache_mode = force_custom_plan";
                        if let Err(error) = client.batch_execute(set).await {
                            tracing::debug!(%error, "batch writers keep the server's plan choice");
                        }
                        Ok(())
                    })
                });
                build_pool(
                    settings.config.clone(),
                    settings.tls.clone(),
                    2 * writers,
                    timeout,
                    Some(custom_plans),
                )
            })
            .transpose()?;
        let store = Self {
            claims: writers_pool
                .clone()
                .map(|writers_pool| batch::Batcher::start(writers_pool, writers, timeout)),
            completions: writers_pool
                .map(|writers_pool| batch::Batcher::start(writers_pool, writers, timeout)),
            pool,
            op_timeout: settings.op_timeout,
            database: std::sync::Arc::new(tls::Database::from_parts(settings.config, settings.tls)),
            changes: ChangeFeed::new(),
            listener: std::sync::Arc::default(),
        };
        Ok((store, settings.schema))
    }

    async fn migrate(&self, schema: Option<&str>) -> Result<()> {
        self.bounded(async {
            let mut client = self.pool.get().await.map_err(unavailable)?;
            // A schema already current needs no lock and no DDL: gateways start without queueing
            // on each other, and a database that cannot take a write (a standby) is then told
            // by the write probe, in its own words, rather than by a failed CREATE.
            let exists = client
                .query_one("SELECT to_regclass('idem_schema_migrations') IS NOT NULL", &[])
                .await
                .map_err(unavailable)?;
            if exists.get::<_, bool>(0) {
                let row = client
                    .query_one("SELECT coalesce(max(version), 0) FROM idem_schema_migrations", &[])
                    .await
                    .map_err(unavailable)?;
                if row.get::<_, i32>(0) as usize == MIGRATIONS.len() {
                    return Ok(());
                }
            }
            let transaction = client.transaction().await.map_err(unavailable)?;
            transaction.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(unavailable)?;
            // A migration that must wait for the table (behind a long transaction) gives up
            // instead of queueing every gateway's statements behind its lock.
            transaction.batch_execute("SET LOCAL lock_timeout = '5s'").await.map_err(unavailable)?;
            if let Some(schema) = schema {
                // Validated in parse_url: a plain lowercase identifier.
                transaction
                    .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
                    .await
                    .map_err(unavailable)?;
            }
            transaction
                .batch_execute(
                    "CREATE TABLE IF NOT EXISTS idem_schema_migrations (
                         version integer PRIMARY KEY,
                         applied_at timestamptz NOT NULL DEFAULT now())",
                )
                .await
                .map_err(unavailable)?;
            let row = transaction
                .query_one("SELECT coalesce(max(version), 0) FROM idem_schema_migrations", &[])
                .await
                .map_err(unavailable)?;
            let version = row.get::<_, i32>(0) as usize;
            if version > MIGRATIONS.len() {
                return Err(Error::Config(format!(
                    "the database schema is version {version}, newer than this idem knows ({}); upgrade idem",
                    MIGRATIONS.len()
                )));
            }
            for (index, migration) in MIGRATIONS.iter().enumerate().skip(version) {
                transaction.batch_execute(migration).await.map_err(unavailable)?;
                let applied = (index + 1) as i32;
                transaction
                    .execute("INSERT INTO idem_schema_migrations (version) VALUES ($1)", &[&applied])
                    .await
                    .map_err(unavailable)?;
                tracing::info!(version = applied, "migrated the idem schema");
            }
            transaction.commit().await.map_err(unavailable)
        })
        .await
    }

    /// Bounds a call by the operation timeout: a database that stops answering is unavailable,
    /// not a hang.
    async fn bounded<T>(&self, call: impl Future<Output = Result<T>>) -> Result<T> {
        store_kit::bounded(self.op_timeout, "PostgreSQL", call).await
    }

    /// Runs one statement and returns the rows it changed.
    async fn execute(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        self.bounded(async {
            let client = self.pool.get().await.map_err(unavailable)?;
            let statement = client.prepare_cached(sql).await.map_err(unavailable)?;
            client.execute(&statement, params).await.map_err(unavailable)
        })
        .await
    }

    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>> {
        self.bounded(async {
            let client = self.pool.get().await.map_err(unavailable)?;
            let statement = client.prepare_cached(sql).await.map_err(unavailable)?;
            client.query(&statement, params).await.map_err(unavailable)
        })
        .await
    }

    /// Runs a data-modifying statement `sql` (with `RETURNING watched`) that must change exactly
    /// one row, announcing the change on [`CHANGES_CHANNEL`] if somebody watches the record.
    /// `$1` of the wrapper is the change id; the statement's own parameters follow from `$2`.
    async fn changed_notifying(
        &self,
        sql: &str,
        key: &RecordKey,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64> {
        let wrapped = notifying(sql);
        let id = key.change_id().to_string();
        let mut all: Vec<&(dyn ToSql + Sync)> = vec![&id];
        all.extend_from_slice(params);
        let rows = self.query(&wrapped, &all).await?;
        let row = rows.first().ok_or_else(|| Error::Corrupt("no count came back".into()))?;
        let changed: i64 = row.try_get(0).map_err(|error| Error::Corrupt(error.to_string()))?;
        Ok(changed as u64)
    }

    /// Starts the LISTEN connection once: it feeds [`ChangeFeed`] with every announcement, and
    /// reconnects (backoff to 5 s) when it is lost. Waiters re-read records every 5 s anyway,
    /// so an announcement lost while it reconnects costs a delay, never a wrong answer.
    fn start_listener(&self) {
        if !self.listener.claim_start() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.listener.start_failed();
            return;
        };
        let database = std::sync::Arc::clone(&self.database);
        let feed = self.changes.clone();
        let listener = std::sync::Arc::downgrade(&self.listener);
        runtime.spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let Some(alive) = listener.upgrade() else { return };
                match database.connect().await {
                    Ok((client, mut connection)) => {
                        let statement = format!("LISTEN {CHANGES_CHANNEL}");
                        let listen = client.batch_execute(&statement);
                        let mut listen = std::pin::pin!(listen);
                        let mut listening = false;
                        loop {
                            let mut failed = false;
                            let message = tokio::time::timeout(
                                Duration::from_secs(5),
                                std::future::poll_fn(|cx| {
                                    if !listening
                                        && let std::task::Poll::Ready(result) =
                                            listen.as_mut().poll(cx)
                                    {
                                        listening = true;
                                        match result {
                                            Ok(()) => {
                                                alive.set_listening(true);
                                            }
                                            Err(_) => failed = true,
                                        }
                                    }
                                    connection.poll_message(cx)
                                }),
                            )
                            .await;
                            if failed {
                                tracing::debug!("LISTEN failed; reconnecting");
                                break;
                            }
                            // Quiet for a while: the store may be gone, ending this task.
                            let Ok(message) = message else {
                                if std::sync::Arc::strong_count(&alive) == 1 {
                                    return;
                                }
                                continue;
                            };
                            match message {
                                Some(Ok(tokio_postgres::AsyncMessage::Notification(note))) => {
                                    if let Ok(id) = note.payload().parse::<u64>() {
                                        feed.notify_id(id);
                                    }
                                }
                                Some(Ok(_)) => {}
                                Some(Err(error)) => {
                                    tracing::debug!(%error, "the LISTEN connection failed");
                                    break;
                                }
                                None => break,
                            }
                            if std::sync::Arc::strong_count(&alive) == 1 {
                                return;
                            }
                        }
                        backoff = Duration::from_millis(100);
                    }
                    Err(error) => tracing::debug!(%error, "cannot open the LISTEN connection"),
                }
                alive.set_listening(false);
                drop(alive);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        });
    }

    /// Runs a fenced UPDATE or DELETE: exactly one row changes, or the caller lost the key.
    async fn fenced(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<()> {
        match self.execute(sql, params).await? {
            1 => Ok(()),
            _ => Err(Error::Fenced),
        }
    }
}

/// A database failure as unavailable, with the server's own message (tokio-postgres says only
/// "db error" at the top; the reason is in its source).
fn unavailable(error: impl std::error::Error) -> Error {
    Error::unavailable(store_kit::with_causes(&error))
}

use store_kit::{millis_from_sql as from_sql, millis_to_sql as to_sql, token_to_sql};

/// Reads `fingerprint, state, token, lease_expires_at, payload, created_at, expires_at`
/// starting at column `first`, checking the invariants the writes keep.
fn read_record(row: &tokio_postgres::Row, first: usize) -> Result<Record> {
    let get_error = |error: tokio_postgres::Error| Error::Corrupt(error.to_string());
    let fingerprint: Vec<u8> = row.try_get(first).map_err(get_error)?;
    let state: i16 = row.try_get(first + 1).map_err(get_error)?;
    let token: Option<i64> = row.try_get(first + 2).map_err(get_error)?;
    let lease: Option<i64> = row.try_get(first + 3).map_err(get_error)?;
    let payload: Option<Vec<u8>> = row.try_get(first + 4).map_err(get_error)?;
    store_kit::StoredFields {
        fingerprint: &fingerprint,
        state: state.into(),
        token: token.map(store_kit::token_from_sql),
        lease_expires_at: lease
            .map(|lease| store_kit::stored_millis(lease, "lease"))
            .transpose()?,
        payload: payload.map(Bytes::from),
        created_at: store_kit::stored_millis(
            row.try_get(first + 5).map_err(get_error)?,
            "created_at",
        )?,
        expires_at: store_kit::stored_millis(
            row.try_get(first + 6).map_err(get_error)?,
            "expires_at",
        )?,
    }
    .into_record()
}

const COLUMNS: &str =
    "fingerprint, state, token, lease_expires_at, payload, created_at, expires_at";

impl PostgresStore {
    /// A claim on its own: the `idem_claim` function, which also takes records over.
    async fn claim_single(&self, request: ClaimRequest<'_>) -> Result<Decision> {
        let rows = self
            .query(
                "SELECT acquired, fingerprint, state, token, lease_expires_at, payload, created_at, expires_at
                 FROM idem_claim($1, $2, $3, $4, $5, $6, $7)",
                &[
                    &request.key.scope.as_str(),
                    &request.key.key.as_str(),
                    &&request.fingerprint.as_bytes()[..],
                    &token_to_sql(request.token),
                    &to_sql(request.now),
                    &to_sql(request.lease_expires_at),
                    &to_sql(request.expires_at),
                ],
            )
            .await?;
        let row =
            rows.first().ok_or_else(|| Error::Corrupt("idem_claim returned no row".into()))?;
        let acquired: bool = row.try_get(0).map_err(|error| Error::Corrupt(error.to_string()))?;
        if acquired {
            return Ok(Decision::Acquire);
        }
        let existing = read_record(row, 1)?;
        match decide(Some(&existing), request.fingerprint, request.now) {
            // The function and the state machine disagree: a bug, never a silent double run.
            Decision::Acquire => Err(Error::Corrupt(
                "idem_claim declined a claim the state machine allows; is the schema current?"
                    .into(),
            )),
            decision => Ok(decision),
        }
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn claim(&self, request: ClaimRequest<'_>) -> Result<Decision> {
        let Some(claims) = &self.claims else {
            return self.claim_single(request).await;
        };
        // One bound for the whole call, a fallback to the single-key claim included. The
        // fallback is boxed: the hot path's future stays small, and is moved cheaply.
        let deadline = tokio::time::Instant::now() + claims.op_timeout();
        self.bounded(async {
            match claims.submit(batch::claim_job(&request), deadline).await? {
                batch::Claimed::Decided(decision) => Ok(decision),
                batch::Claimed::Corrupt(error) => Err(error),
                batch::Claimed::Single => Box::pin(self.claim_single(request)).await,
            }
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
        let single = || async {
            let changed = self
                .changed_notifying(
                    COMPLETE,
                    key,
                    &[
                        &&payload[..],
                        &to_sql(expires_at),
                        &key.scope.as_str(),
                        &key.key.as_str(),
                        &token_to_sql(token),
                    ],
                )
                .await?;
            if changed == 1 { Ok(()) } else { Err(Error::Fenced) }
        };
        let Some(completions) = &self.completions else {
            return single().await;
        };
        // One bound for the whole call, a fallback to the single statement included.
        let deadline = tokio::time::Instant::now() + completions.op_timeout();
        let job = batch::CompleteJob {
            key: key.clone(),
            token: token_to_sql(token),
            payload: payload.clone(),
            expires_at,
        };
        self.bounded(async {
            match completions.submit(job, deadline).await? {
                Some(true) => Ok(()),
                Some(false) => Err(Error::Fenced),
                // Boxed, as the claim's fallback: the hot path's future stays small.
                None => Box::pin(single()).await,
            }
        })
        .await
    }

    async fn release(&self, key: &RecordKey, token: FencingToken) -> Result<()> {
        let changed = self
            .changed_notifying(
                "DELETE FROM idem_records WHERE scope = $2 AND key = $3 AND state = 0 AND token = $4
                 RETURNING watched",
                key,
                &[&key.scope.as_str(), &key.key.as_str(), &token_to_sql(token)],
            )
            .await?;
        if changed == 1 { Ok(()) } else { Err(Error::Fenced) }
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: FencingToken,
        _now: Timestamp,
        lease_expires_at: Timestamp,
        expires_at: Timestamp,
    ) -> Result<()> {
        self.fenced(
            "UPDATE idem_records SET lease_expires_at = $1, expires_at = $2
             WHERE scope = $3 AND key = $4 AND state = 0 AND token = $5",
            &[
                &to_sql(lease_expires_at),
                &to_sql(expires_at),
                &key.scope.as_str(),
                &key.key.as_str(),
                &token_to_sql(token),
            ],
        )
        .await
    }

    async fn get(&self, key: &RecordKey) -> Result<Option<Record>> {
        let rows = self
            .query(
                &format!("SELECT {COLUMNS} FROM idem_records WHERE scope = $1 AND key = $2"),
                &[&key.scope.as_str(), &key.key.as_str()],
            )
            .await?;
        rows.first().map(|row| read_record(row, 0)).transpose()
    }

    async fn delete(&self, key: &RecordKey) -> Result<bool> {
        let deleted = self
            .changed_notifying(
                "DELETE FROM idem_records WHERE scope = $2 AND key = $3 RETURNING watched",
                key,
                &[&key.scope.as_str(), &key.key.as_str()],
            )
            .await?;
        Ok(deleted > 0)
    }

    async fn sweep(&self, now: Timestamp, limit: usize) -> Result<usize> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let deleted = self
            .execute(
                "DELETE FROM idem_records WHERE (scope, key) IN (
                     SELECT scope, key FROM idem_records WHERE expires_at <= $1
                     ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
                &[&to_sql(now), &limit],
            )
            .await?;
        Ok(deleted as usize)
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<RecordSummary>> {
        let scope = query.scope.as_ref().map(|scope| scope.as_str().to_owned());
        let state = query.state.map(|state| match state {
            StateFilter::InFlight => IN_FLIGHT,
            StateFilter::Completed => COMPLETED,
        });
        let created_before = query.created_before.map(to_sql);
        let limit = i64::try_from(query.effective_limit()).unwrap_or(i64::MAX);
        let rows = self
            .query(
                "SELECT scope, key, fingerprint, lease_expires_at, octet_length(payload)::bigint,
                        created_at, expires_at
                 FROM idem_records
                 WHERE ($1::text IS NULL OR scope = $1) AND ($2::smallint IS NULL OR state = $2)
                   AND ($3::bigint IS NULL OR created_at < $3)
                 ORDER BY created_at LIMIT $4",
                &[&scope, &state, &created_before, &limit],
            )
            .await?;
        rows.iter()
            .map(|row| {
                let get_error = |error: tokio_postgres::Error| Error::Corrupt(error.to_string());
                let key: String = row.try_get(1).map_err(get_error)?;
                let fingerprint: Vec<u8> = row.try_get(2).map_err(get_error)?;
                Ok(RecordSummary {
                    key: RecordKey::from_stored(row.try_get(0).map_err(get_error)?, key)?,
                    fingerprint: Fingerprint::from_stored(&fingerprint)?,
                    lease_expires_at: row
                        .try_get::<_, Option<i64>>(3)
                        .map_err(get_error)?
                        .map(from_sql),
                    payload_len: row
                        .try_get::<_, Option<i64>>(4)
                        .map_err(get_error)?
                        .map(|len| len as u64),
                    created_at: from_sql(row.try_get(5).map_err(get_error)?),
                    expires_at: from_sql(row.try_get(6).map_err(get_error)?),
                })
            })
            .collect()
    }

    /// A write that leaves nothing behind: a row no key can name (keys have no spaces)
    /// inserted and deleted in one committed transaction, so a standby, read-only
    /// transactions or a disk too full for the log fail it, with the server's reason.
    async fn ping(&self) -> Result<()> {
        self.bounded(async {
            let mut client = self.pool.get().await.map_err(unavailable)?;
            let transaction = client.transaction().await.map_err(unavailable)?;
            transaction
                .batch_execute(
                    "INSERT INTO idem_records
                         (scope, key, fingerprint, state, token, lease_expires_at, payload, created_at, expires_at)
                     VALUES (' health', ' health', '', 1, NULL, NULL, '', 0, 0)
                     ON CONFLICT (scope, key) DO NOTHING;
                     DELETE FROM idem_records WHERE scope = ' health' AND key = ' health';",
                )
                .await
                .map_err(unavailable)?;
            transaction.commit().await.map_err(unavailable)
        })
        .await
    }

    async fn server_time(&self) -> Result<Option<Timestamp>> {
        let rows = self
            .query("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint", &[])
            .await?;
        let row = rows.first().ok_or_else(|| Error::Corrupt("no time from the server".into()))?;
        let millis: i64 = row.try_get(0).map_err(|error| Error::Corrupt(error.to_string()))?;
        Ok(Some(from_sql(millis)))
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            name: "postgres",
            durable: true,
            shared_by_processes: true,
            shared_by_hosts: true,
            native_expiry: false,
            notifies: Notifies::AllProcesses,
        }
    }

    fn subscribe(&self) -> Option<tokio::sync::broadcast::Receiver<u64>> {
        let receiver = self.changes.subscribe();
        self.start_listener();
        Some(receiver)
    }

    /// Marks the in-flight record watched, so that its completion or release is announced;
    /// first waits (up to a second) for the LISTEN connection, so no announcement from now on
    /// is missed.
    async fn watch(&self, key: &RecordKey) -> Result<()> {
        self.start_listener();
        if !self.listener.ready(Duration::from_secs(1)).await {
            return Err(Error::unavailable("the LISTEN connection is not up"));
        }
        self.execute(
            "UPDATE idem_records SET watched = true WHERE scope = $1 AND key = $2 AND state = 0",
            &[&key.scope.as_str(), &key.key.as_str()],
        )
        .await
        .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parameters_are_split_and_checked() {
        let settings =
            parse_url("postgres://u@127.0.0.1:5432/db?pool_max_size=4&op_timeout_ms=250&schema=idem_a&application_name=x")
                .unwrap();
        assert_eq!(settings.pool_max_size, 4);
        assert_eq!(settings.op_timeout, Duration::from_millis(250));
        assert_eq!(settings.schema.as_deref(), Some("idem_a"));
        assert_eq!(settings.config.get_application_name(), Some("x"));
        assert_eq!(settings.config.get_options(), Some("-c search_path=idem_a"));
        assert_eq!(settings.config.get_connect_timeout(), Some(&Duration::from_millis(250)));
        // Options the URL gave are kept beside the schema's.
        let both =
            parse_url("postgres://u@h/db?options=-c%20statement_timeout%3D900&schema=idem_b")
                .unwrap();
        assert_eq!(
            both.config.get_options(),
            Some("-c statement_timeout=900 -c search_path=idem_b")
        );
        for (url, expected) in [
            ("postgres://h/db?pool_max_size=0", "pool_max_size"),
            ("postgres://h/db?op_timeout_ms=soon", "op_timeout_ms"),
            ("postgres://h/db?schema=Robert');DROP", "schema must be"),
            ("postgres://h/db?sslmode=sometimes", "sslmode must be"),
            ("postgres://h/db?sslmode=verify-full&sslrootcert=/nonexistent", "sslrootcert"),
        ] {
            let error = parse_url(url).unwrap_err().to_string();
            assert!(error.contains(expected), "{url}: {error}");
        }
    }
}
