//! The Redis store: atomic claims in server-side Lua scripts, and Redis's own key expiry for
//! the TTL.
//!
//! ```no_run
//! # async fn open() -> Result<(), idem_core::Error> {
//! use idem_redis::RedisStore;
//!
//! let store = RedisStore::connect("redis://cache.internal:6379/0").await?;
//! # let _ = store; Ok(()) }
//! ```
//!
//! # How it stays correct
//! - Each record is **one Redis hash**, so every operation touches one key: a claim, a
//!   completion, a release and a renewal are each one script, which Redis runs atomically.
//! - The key is `<prefix>:r:{<hash of scope and key>}`. The braces make the whole name one
//!   hash tag, so the record maps to one slot in Redis Cluster, and the hash keeps the
//!   caller's raw key (any visible ASCII, braces included) out of the name.
//! - Complete, release and renew only act when the record is in flight under the caller's
//!   fencing token.
//! - Expiry is Redis's own (`PEXPIRE`), set to the record's remaining lifetime at every
//!   write; the scripts also compare the record's stored expiry to the caller's clock, so an
//!   expired record counts as absent even before Redis evicts it.
//!
//! # Durability
//! Redis acknowledges a write once it is in memory. What survives depends on the server:
//! with no persistence (`save ""`, `appendonly no`) a restart loses every record, so keys in
//! flight and completed outcomes are forgotten and retries run again; with `appendonly yes`
//! and `appendfsync everysec`, a crash may lose the last second of records; with
//! `appendfsync always` none. Replication is asynchronous: a failover can lose records the
//! old primary acknowledged. Use PostgreSQL where a lost record (a second run) is not
//! acceptable.
//!
//! # Redis Cluster
//! `redis+cluster://[user:password@]host:port[,host:port...]` names seed nodes; the cluster
//! client finds the rest and follows each slot to its master. Listing scans master by master.
//!
//! # TLS
//! `rediss://host:port` speaks TLS (rustls): the server's certificate must be valid for `host`
//! and signed by a CA the system trusts (the platform's store; `SSL_CERT_FILE` or
//! `SSL_CERT_DIR` replace it), or, with `ca=/path/ca.pem`, by a CA in that PEM file (then only
//! those). A certificate that does not verify fails the connection, saying why; there is no
//! switch that turns verification off. TLS to a Redis Cluster (`rediss+cluster://`) is not
//! supported yet.
//!
//! # URL parameters (besides redis-rs's own)
//! - `prefix` (default `idem`): the first part of every key name.
//! - `op_timeout_ms` (default 2000): the bound on each call; past it the store is unavailable.
//! - `ca` (`rediss://` only): a PEM file of the CAs to trust instead of the system's.
//! - `wait_replicas` (default 0): claims, completions and renewals count only once
//!   this many replicas have them (`WAIT`, sent right behind the script in one pipeline); fewer
//!   within `wait_timeout_ms` (default half of `op_timeout_ms`) fails the call as unavailable.
//!   Shrinks what a failover can lose, at the cost of a round trip to the replicas per write,
//!   and of availability while a master has too few replicas.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use idem_core::{
    Capabilities, ChangeFeed, ChangeListener, ClaimRequest, Decision, Error, FencingToken,
    ListQuery, Notifies, Record, RecordKey, RecordSummary, Result, Store, Timestamp, decide,
    store_kit,
};
use redis::aio::ConnectionManagerConfig;
use redis::{AsyncCommands, Script};
use sha2::{Digest, Sha256};
use store_kit::{COMPLETED, IN_FLIGHT};

mod connection;
mod tls;

use connection::Connection;

/// Most keys one `list` call looks at: listing scans the keyspace, so it is bounded.
const LIST_MAX_SCANNED: usize = 1_000_000;

/// Whether the caller (token in `ARGV[1]`) owns the in-flight record.
macro_rules! owner_check {
    () => {
        "local owns = redis.call('HGET', KEYS[1], 'st') == '0' and redis.call('HGET', KEYS[1], 't') == ARGV[1]\n"
    };
}

/// ARGV: fingerprint, token, now, lease_expires_at, expires_at, ttl_ms, scope, key.
/// Returns `{'1'}` when acquired, else `{'0', f, st, t, l, p, c, e}` of the record found.
/// The takeover condition is idem_core::decide's Acquire.
static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local now = tonumber(ARGV[3])
        local r = redis.call('HMGET', KEYS[1], 'f', 'st', 't', 'l', 'p', 'c', 'e')
        if r[1] and r[2] == '0' and r[3] == ARGV[2] then
            -- This very claim, sent again (the client resends a call whose reply it lost):
            -- still ours. The write lets a WAIT behind it cover the first one.
            redis.call('PEXPIRE', KEYS[1], ARGV[6])
            return {'1'}
        end
        if r[1] then
            local acquirable = tonumber(r[7]) <= now
                or (r[2] == '0' and tonumber(r[4]) <= now and r[1] == ARGV[1])
            if not acquirable then
                return {'0', r[1], r[2], r[3] or '', r[4] or '', r[5] or '', r[6], r[7]}
            end
        end
        redis.call('DEL', KEYS[1])
        redis.call('HSET', KEYS[1], 's', ARGV[7], 'k', ARGV[8], 'f', ARGV[1], 'st', '0',
            't', ARGV[2], 'l', ARGV[4], 'c', ARGV[3], 'e', ARGV[5])
        redis.call('PEXPIRE', KEYS[1], ARGV[6])
        return {'1'}
        ",
    )
});

/// ARGV: token, payload, expires_at, ttl_ms, changes channel, change id. A watched record
/// (field `w`) announces its completion on the channel. The completing token stays in `ct`,
/// so that the same completion sent again is answered as done, not fenced.
static COMPLETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        owner_check!(),
        r"
        if not owns then
            -- This very completion, sent again (its reply was lost, or the client resent it):
            -- done. The write lets a WAIT behind it cover the first one.
            local done = redis.call('HMGET', KEYS[1], 'st', 'ct', 'p')
            if done[1] == '1' and done[2] == ARGV[1] and done[3] == ARGV[2] then
                redis.call('HSET', KEYS[1], 'ct', ARGV[1])
                return 1
            end
            return 0
        end
        local watched = redis.call('HGET', KEYS[1], 'w')
        redis.call('HSET', KEYS[1], 'st', '1', 'p', ARGV[2], 'e', ARGV[3], 'ct', ARGV[1])
        redis.call('HDEL', KEYS[1], 't', 'l', 'w')
        redis.call('PEXPIRE', KEYS[1], ARGV[4])
        if watched then redis.call('PUBLISH', ARGV[5], ARGV[6]) end
        return 1
        "
    ))
});

/// ARGV: token, changes channel, change id.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        owner_check!(),
        r"
        if not owns then return 0 end
        local watched = redis.call('HGET', KEYS[1], 'w')
        redis.call('DEL', KEYS[1])
        if watched then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
        return 1
        "
    ))
});

/// Deletes a record whatever its state, announcing it if watched. ARGV: changes channel,
/// change id.
static DELETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local watched = redis.call('HGET', KEYS[1], 'w')
        local deleted = redis.call('DEL', KEYS[1])
        if watched then redis.call('PUBLISH', ARGV[1], ARGV[2]) end
        return deleted
        ",
    )
});

/// The health write: a hash (so a listing skips it) that expires in a second.
static HEALTH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        redis.call('HSET', KEYS[1], 'h', '1')
        redis.call('PEXPIRE', KEYS[1], 1000)
        return 1
        ",
    )
});

/// Marks an in-flight record watched. ARGV: none.
static WATCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        if redis.call('HGET', KEYS[1], 'st') == '0' then redis.call('HSET', KEYS[1], 'w', '1') end
        return 1
        ",
    )
});

/// ARGV: token, lease_expires_at, expires_at, ttl_ms.
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        owner_check!(),
        r"
        if not owns then return 0 end
        redis.call('HSET', KEYS[1], 'l', ARGV[2], 'e', ARGV[3])
        redis.call('PEXPIRE', KEYS[1], ARGV[4])
        return 1
        "
    ))
});

/// A [`Store`] on Redis.
#[derive(Clone)]
pub struct RedisStore {
    connection: Connection,
    prefix: String,
    op_timeout: Duration,
    /// Replicas that must have a claim or a completion before it counts (`WAIT`), and how
    /// long to wait for them.
    wait_replicas: u32,
    wait_timeout: Duration,
    /// For the subscriber connection, opened when the first waiter subscribes: the server, or
    /// each of a cluster's seed nodes in turn (a cluster publishes on every node).
    subscribers: Vec<redis::Client>,
    changes: ChangeFeed,
    listener: std::sync::Arc<ChangeListener>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("op_timeout", &self.op_timeout)
            .finish_non_exhaustive()
    }
}

fn unavailable(error: redis::RedisError) -> Error {
    Error::unavailable(error)
}

impl RedisStore {
    /// Connects to the server named by a `redis://` (or `rediss://`, `redis+unix://`) URL. The
    /// server must answer now; later outages make calls fail as unavailable, and the
    /// connection is re-established by itself when the server is back.
    pub async fn connect(url: &str) -> Result<Self> {
        let (base, pairs) = store_kit::url_parameters(url);
        let mut passed_on = Vec::new();
        let mut prefix = "idem".to_owned();
        let mut op_timeout = Duration::from_secs(2);
        let mut wait_replicas = 0;
        let mut wait_timeout = None;
        let mut ca = None;
        for (name, value) in pairs {
            match name {
                "ca" => ca = Some(idem_core::store_kit::percent_decode(value)),
                "prefix" => {
                    let valid = !value.is_empty()
                        && value.len() <= 64
                        && value
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                    if !valid {
                        return Err(Error::Config(format!(
                            "prefix must be 1 to 64 of A-Z a-z 0-9 _ - (in the redis:// URL), not {value:?}"
                        )));
                    }
                    prefix = value.to_owned();
                }
                "op_timeout_ms" => op_timeout = store_kit::positive_millis(name, value, "redis")?,
                "wait_replicas" => {
                    wait_replicas =
                        value.parse().ok().filter(|count| *count <= 16).ok_or_else(|| {
                            Error::Config(format!(
                                "wait_replicas must be 0 to 16 (in the redis:// URL), not {value:?}"
                            ))
                        })?;
                }
                "wait_timeout_ms" => {
                    wait_timeout = Some(store_kit::positive_millis(name, value, "redis")?);
                }
                _ => passed_on.push((name, value)),
            }
        }
        let scheme = base.split_once("://").map_or("redis", |(scheme, _)| scheme);
        let invalid = |error: String| Error::Config(format!("invalid {scheme}:// URL: {error}"));
        let certificates = tls::certificates(scheme, ca.as_deref())?;
        let (connection, subscribers) = if scheme == "redis+cluster" {
            let nodes = connection::cluster_nodes(base).map_err(invalid)?;
            let nodes: Vec<String> =
                nodes.iter().map(|node| store_kit::rejoin_url(node, &passed_on)).collect();
            let subscribers = nodes
                .iter()
                .map(|node| redis::Client::open(node.as_str()))
                .collect::<redis::RedisResult<Vec<_>>>()
                .map_err(|error| invalid(error.to_string()))?;
            let client = redis::cluster::ClusterClient::builder(nodes)
                .connection_timeout(op_timeout)
                .response_timeout(op_timeout)
                .retries(2)
                .build()
                .map_err(|error| invalid(error.to_string()))?;
            let connection = bounded_connect(op_timeout, client.get_async_connection()).await?;
            (Connection::Cluster(connection), subscribers)
        } else {
            let rest = store_kit::rejoin_url(base, &passed_on);
            let client = match certificates {
                Some(certificates) => redis::Client::build_with_tls(rest.as_str(), certificates),
                None => redis::Client::open(rest.as_str()),
            }
            .map_err(|error| invalid(error.to_string()))?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(op_timeout))
                .set_response_timeout(Some(op_timeout))
                .set_number_of_retries(1);
            let connect = client.get_connection_manager_with_config(config);
            let connection = bounded_connect(op_timeout, connect).await.map_err(|error| {
                if scheme == "rediss" { tls::explain(error, ca.as_deref()) } else { error }
            })?;
            (Connection::Single(connection), vec![client])
        };
        let listener = std::sync::Arc::default();
        let changes = ChangeFeed::new();
        // The wait is part of the call, so it must end well within the call's bound.
        let wait_timeout = wait_timeout.unwrap_or(op_timeout / 2);
        if wait_replicas > 0 && wait_timeout >= op_timeout {
            return Err(Error::Config(format!(
                "wait_timeout_ms ({}) must be below op_timeout_ms ({}) (in the redis:// URL)",
                wait_timeout.as_millis(),
                op_timeout.as_millis()
            )));
        }
        let store = Self {
            connection,
            prefix,
            op_timeout,
            wait_replicas,
            wait_timeout,
            subscribers,
            changes,
            listener,
        };
        store.ping().await?;
        Ok(store)
    }

    /// The channel completions and releases of watched records are announced on.
    fn changes_channel(&self) -> String {
        format!("{}:changes", self.prefix)
    }

    /// Starts the subscriber connection once: it feeds [`ChangeFeed`] with every announcement
    /// and reconnects (backoff to 5 s) when it is lost. Waiters re-read records every 5 s
    /// anyway, so an announcement lost meanwhile costs a delay, never a wrong answer.
    fn start_listener(&self) {
        use futures_util::StreamExt;
        if !self.listener.claim_start() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.listener.start_failed();
            return;
        };
        let subscribers = self.subscribers.clone();
        let channel = self.changes_channel();
        let feed = self.changes.clone();
        let listener = std::sync::Arc::downgrade(&self.listener);
        runtime.spawn(async move {
            let mut backoff = Duration::from_millis(100);
            for client in subscribers.iter().cycle() {
                let Some(alive) = listener.upgrade() else { return };
                match client.get_async_pubsub().await {
                    Ok(mut pubsub) => match pubsub.subscribe(&channel).await {
                        Ok(()) => {
                            alive.set_listening(true);
                            backoff = Duration::from_millis(100);
                            let mut messages = pubsub.on_message();
                            loop {
                                let next =
                                    tokio::time::timeout(Duration::from_secs(5), messages.next())
                                        .await;
                                // The store gone (checked when quiet too): this task ends.
                                if std::sync::Arc::strong_count(&alive) == 1 {
                                    return;
                                }
                                match next {
                                    Ok(Some(message)) => {
                                        if let Some(id) = message
                                            .get_payload::<String>()
                                            .ok()
                                            .and_then(|id| id.parse::<u64>().ok())
                                        {
                                            feed.notify_id(id);
                                        }
                                    }
                                    Ok(None) => break,
                                    Err(_) => {}
                                }
                            }
                        }
                        Err(error) => tracing::debug!(%error, "cannot subscribe to changes"),
                    },
                    Err(error) => tracing::debug!(%error, "cannot open the subscriber connection"),
                }
                alive.set_listening(false);
                drop(alive);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        });
    }

    /// The Redis key of a record: one hash tag, so one slot in a cluster.
    fn record_key(&self, key: &RecordKey) -> String {
        let mut hasher = Sha256::new();
        hasher.update(key.scope.as_str().as_bytes());
        hasher.update([0]);
        hasher.update(key.key.as_str().as_bytes());
        let digest = hasher.finalize();
        let mut name = String::with_capacity(self.prefix.len() + 37);
        name.push_str(&self.prefix);
        name.push_str(":r:{");
        for byte in &digest[..16] {
            name.push_str(&format!("{byte:02x}"));
        }
        name.push('}');
        name
    }

    async fn bounded<T>(&self, call: impl Future<Output = redis::RedisResult<T>>) -> Result<T> {
        store_kit::bounded(self.op_timeout, "Redis", async { call.await.map_err(unavailable) })
            .await
    }

    /// Runs `script` on the record of `key` with `args`. With `wait_replicas`, a `WAIT` goes
    /// right behind it in one pipeline, so on the same connection to the same server, and the
    /// answer carries how many replicas had the script's writes (else `None`).
    async fn run_script<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        key: &RecordKey,
        args: &[Vec<u8>],
        waited: bool,
    ) -> Result<(T, Option<i64>)> {
        let name = self.record_key(key);
        let mut connection = self.connection.clone();
        if self.wait_replicas == 0 || !waited {
            let mut invocation = script.key(&name);
            for arg in args {
                invocation.arg(arg.as_slice());
            }
            return Ok((self.bounded(invocation.invoke_async(&mut connection)).await?, None));
        }
        let mut pipeline = redis::pipe();
        pipeline.cmd("EVALSHA").arg(script.get_hash()).arg(1).arg(&name);
        for arg in args {
            pipeline.arg(arg.as_slice());
        }
        pipeline
            .cmd("WAIT")
            .arg(self.wait_replicas)
            .arg(self.wait_timeout.as_millis().max(1) as u64);
        let ran = self
            .bounded(async {
                match pipeline.query_async::<(T, i64)>(&mut connection).await {
                    // A server that has not seen the script yet (a new node, a restart).
                    Err(error)
                        if error.kind()
                            == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                    {
                        script.load_async(&mut connection).await?;
                        pipeline.query_async(&mut connection).await
                    }
                    other => other,
                }
            })
            .await?;
        Ok((ran.0, Some(ran.1)))
    }

    /// With `wait_replicas`, fewer replicas than that having a write makes the call fail as
    /// unavailable: a claim then does not run (the gateway releases it), and a completion is
    /// retried by the gateway (the same completion sent again is answered as done, after a
    /// write a new WAIT covers), so that a failover onto a replica that never got the write
    /// cannot make a key run twice.
    fn replicated(&self, acknowledged: Option<i64>) -> Result<()> {
        match acknowledged {
            Some(count) if count < i64::from(self.wait_replicas) => {
                Err(Error::unavailable(format!(
                    "{count} of {} replicas had the write within {:?}",
                    self.wait_replicas, self.wait_timeout
                )))
            }
            _ => Ok(()),
        }
    }

    /// Runs an ownership-checked script: 1 if it acted, 0 if the caller is fenced. `waited`:
    /// with `wait_replicas`, it counts only once the replicas have its write.
    async fn fenced(
        &self,
        script: &Script,
        key: &RecordKey,
        args: &[Vec<u8>],
        waited: bool,
    ) -> Result<()> {
        match self.run_script::<i64>(script, key, args, waited).await? {
            (1, acknowledged) => self.replicated(acknowledged),
            _ => Err(Error::Fenced),
        }
    }
}

/// Waits for a first connection, at most `limit`.
async fn bounded_connect<C>(
    limit: Duration,
    connect: impl Future<Output = redis::RedisResult<C>>,
) -> Result<C> {
    match tokio::time::timeout(limit, connect).await {
        Ok(connection) => connection.map_err(unavailable),
        Err(_) => Err(Error::unavailable(format!("Redis did not answer within {limit:?}"))),
    }
}

/// Milliseconds from `now` until `expires_at`, at least 1 (`PEXPIRE` with 0 deletes at once).
fn ttl_ms(now: Timestamp, expires_at: Timestamp) -> u64 {
    expires_at.duration_since(now).as_millis().max(1) as u64
}

fn text(value: &[u8], field: &str) -> Result<String> {
    String::from_utf8(value.to_vec())
        .map_err(|_| Error::Corrupt(format!("field {field} is not UTF-8")))
}

fn number(value: &[u8], field: &str) -> Result<u64> {
    text(value, field)?
        .parse()
        .map_err(|_| Error::Corrupt(format!("field {field} is not a number")))
}

/// Builds a record from its hash fields (`f st t l p c e`), checking the invariants.
#[doc(hidden)]
pub fn read_record(field: impl Fn(&str) -> Option<Vec<u8>>) -> Result<Record> {
    let required =
        |name: &str| field(name).ok_or_else(|| Error::Corrupt(format!("field {name} is missing")));
    let fingerprint = required("f")?;
    let present = |name: &str| field(name).filter(|value| !value.is_empty());
    let state: i64 = match required("st")?.as_slice() {
        b"0" => IN_FLIGHT.into(),
        b"1" => COMPLETED.into(),
        _ => -1,
    };
    // The claim script sends an absent field as an empty string: an in-flight record's
    // payload field means nothing, a completed one's is its payload even when empty.
    let payload = if state == i64::from(IN_FLIGHT) { None } else { field("p") };
    let token = present("t").map(|token| number(&token, "t")).transpose()?;
    let lease = present("l").map(|lease| number(&lease, "l")).transpose()?;
    store_kit::StoredFields {
        fingerprint: &fingerprint,
        state,
        token: token.map(FencingToken::from_u64),
        lease_expires_at: lease.map(Timestamp::from_millis),
        payload: payload.map(Bytes::from),
        created_at: Timestamp::from_millis(number(&required("c")?, "c")?),
        expires_at: Timestamp::from_millis(number(&required("e")?, "e")?),
    }
    .into_record()
}

/// A listed record from its `HMGET` fields (`s k f st t l c e`) and its payload's length;
/// `None` if it expired between the scan and the read.
fn summarize(values: &[Option<Vec<u8>>], payload_len: u64) -> Result<Option<RecordSummary>> {
    let Some(scope) = values[0].clone() else { return Ok(None) };
    let names = ["s", "k", "f", "st", "t", "l", "c", "e"];
    let field =
        |name: &str| names.iter().position(|n| *n == name).and_then(|index| values[index].clone());
    let key = text(&field("k").unwrap_or_default(), "k")?;
    // The payload itself is not fetched (HSTRLEN gave its size): stand in empty.
    let record = read_record(|name| if name == "p" { Some(Vec::new()) } else { field(name) })?;
    let mut summary =
        RecordSummary::from_record(RecordKey::from_stored(text(&scope, "s")?, key)?, &record);
    if summary.lease_expires_at.is_none() {
        summary.payload_len = Some(payload_len);
    }
    Ok(Some(summary))
}

#[async_trait]
impl Store for RedisStore {
    async fn claim(&self, request: ClaimRequest<'_>) -> Result<Decision> {
        let args = [
            request.fingerprint.as_bytes().to_vec(),
            request.token.as_u64().to_string().into_bytes(),
            request.now.as_millis().to_string().into_bytes(),
            request.lease_expires_at.as_millis().to_string().into_bytes(),
            request.expires_at.as_millis().to_string().into_bytes(),
            ttl_ms(request.now, request.expires_at).to_string().into_bytes(),
            request.key.scope.as_str().as_bytes().to_vec(),
            request.key.key.as_str().as_bytes().to_vec(),
        ];
        let (reply, acknowledged): (Vec<Vec<u8>>, _) =
            self.run_script(&CLAIM, request.key, &args, true).await?;
        match reply.first().map(Vec::as_slice) {
            Some(b"1") => {
                self.replicated(acknowledged)?;
                Ok(Decision::Acquire)
            }
            Some(b"0") if reply.len() == 8 => {
                let names = ["f", "st", "t", "l", "p", "c", "e"];
                let existing = read_record(|name| {
                    names.iter().position(|n| *n == name).map(|index| reply[index + 1].clone())
                })?;
                match decide(Some(&existing), request.fingerprint, request.now) {
                    Decision::Acquire => Err(Error::Corrupt(
                        "the claim script declined a claim the state machine allows".into(),
                    )),
                    decision => Ok(decision),
                }
            }
            _ => Err(Error::Corrupt(format!("unexpected claim reply of {} parts", reply.len()))),
        }
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: FencingToken,
        payload: Bytes,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<()> {
        let args = [
            token.as_u64().to_string().into_bytes(),
            payload.to_vec(),
            expires_at.as_millis().to_string().into_bytes(),
            ttl_ms(now, expires_at).to_string().into_bytes(),
            self.changes_channel().into_bytes(),
            key.change_id().to_string().into_bytes(),
        ];
        self.fenced(&COMPLETE, key, &args, true).await
    }

    async fn release(&self, key: &RecordKey, token: FencingToken) -> Result<()> {
        let args = [
            token.as_u64().to_string().into_bytes(),
            self.changes_channel().into_bytes(),
            key.change_id().to_string().into_bytes(),
        ];
        // Not waited for: a release a failover loses leaves the key in flight until its lease
        // ends, the safe side.
        self.fenced(&RELEASE, key, &args, false).await
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: FencingToken,
        now: Timestamp,
        lease_expires_at: Timestamp,
        expires_at: Timestamp,
    ) -> Result<()> {
        let args = [
            token.as_u64().to_string().into_bytes(),
            lease_expires_at.as_millis().to_string().into_bytes(),
            expires_at.as_millis().to_string().into_bytes(),
            ttl_ms(now, expires_at).to_string().into_bytes(),
        ];
        self.fenced(&RENEW, key, &args, true).await
    }

    async fn get(&self, key: &RecordKey) -> Result<Option<Record>> {
        let mut connection = self.connection.clone();
        let fields: HashMap<String, Vec<u8>> =
            self.bounded(connection.hgetall(self.record_key(key))).await?;
        if fields.is_empty() {
            return Ok(None);
        }
        read_record(|name| fields.get(name).cloned()).map(Some)
    }

    async fn delete(&self, key: &RecordKey) -> Result<bool> {
        let mut invocation = DELETE.key(self.record_key(key));
        invocation.arg(self.changes_channel()).arg(key.change_id().to_string());
        let mut connection = self.connection.clone();
        let deleted: i64 = self.bounded(invocation.invoke_async(&mut connection)).await?;
        Ok(deleted > 0)
    }

    /// Redis expires records itself: nothing to sweep.
    async fn sweep(&self, _now: Timestamp, _limit: usize) -> Result<usize> {
        Ok(0)
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<RecordSummary>> {
        let pattern = format!("{}:r:*", self.prefix);
        let mut connection = self.connection.clone();
        let mut scanned = 0;
        let mut found = Vec::new();
        // A cluster's keys are scanned master by master; each page's fields are read from the
        // node that listed them.
        for node in self.bounded(connection.scan_targets()).await? {
            let node = node.as_ref();
            let mut cursor: u64 = 0;
            loop {
                let mut scan = redis::cmd("SCAN");
                scan.arg(cursor).arg("MATCH").arg(&pattern).arg("COUNT").arg(1000);
                let (next, keys): (u64, Vec<String>) =
                    self.bounded(connection.query_on(node, &scan)).await?;
                scanned += keys.len();
                if !keys.is_empty() {
                    let mut fields = redis::pipe();
                    let mut lengths = redis::pipe();
                    for key in &keys {
                        fields
                            .cmd("HMGET")
                            .arg(key)
                            .arg(&["s", "k", "f", "st", "t", "l", "c", "e"]);
                        lengths.cmd("HSTRLEN").arg(key).arg("p");
                    }
                    let fields: Vec<Vec<Option<Vec<u8>>>> =
                        self.bounded(connection.pipeline_on(node, &fields)).await?;
                    let lengths: Vec<u64> =
                        self.bounded(connection.pipeline_on(node, &lengths)).await?;
                    for (values, payload_len) in fields.into_iter().zip(lengths) {
                        if let Some(summary) = summarize(&values, payload_len)? {
                            if summary.matches(query) {
                                found.push(summary);
                            }
                        }
                    }
                }
                cursor = next;
                if cursor == 0 || scanned >= LIST_MAX_SCANNED {
                    break;
                }
            }
            if scanned >= LIST_MAX_SCANNED {
                break;
            }
        }
        found.sort_by_key(|summary| summary.created_at);
        found.truncate(query.effective_limit());
        Ok(found)
    }

    /// A write of a record-shaped key that expires at once (`<prefix>:r:health`, inside the
    /// key space an ACL grants idem; no record's name, which are hashes in braces): a
    /// read-only replica, or a server out of memory under `noeviction`, fails it.
    async fn ping(&self) -> Result<()> {
        let invocation = HEALTH.key(format!("{}:r:health", self.prefix));
        let mut connection = self.connection.clone();
        self.bounded(invocation.invoke_async::<i64>(&mut connection)).await.map(drop)
    }

    async fn server_time(&self) -> Result<Option<Timestamp>> {
        let mut connection = self.connection.clone();
        let (seconds, micros): (u64, u64) =
            self.bounded(redis::cmd("TIME").query_async(&mut connection)).await?;
        Ok(Some(Timestamp::from_millis(seconds * 1_000 + micros / 1_000)))
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            name: "redis",
            // Depends on the server's persistence settings; see the crate docs.
            durable: false,
            shared_by_processes: true,
            shared_by_hosts: true,
            native_expiry: true,
            notifies: Notifies::AllProcesses,
        }
    }

    fn subscribe(&self) -> Option<tokio::sync::broadcast::Receiver<u64>> {
        let receiver = self.changes.subscribe();
        self.start_listener();
        Some(receiver)
    }

    /// Marks the in-flight record watched, so that its completion or release is announced;
    /// first waits (up to a second) for the subscriber connection, so no announcement from
    /// now on is missed.
    async fn watch(&self, key: &RecordKey) -> Result<()> {
        self.start_listener();
        if !self.listener.ready(Duration::from_secs(1)).await {
            return Err(Error::unavailable("the subscriber connection is not up"));
        }
        let invocation = WATCH.key(self.record_key(key));
        let mut connection = self.connection.clone();
        self.bounded(invocation.invoke_async::<i64>(&mut connection)).await.map(drop)
    }
}
