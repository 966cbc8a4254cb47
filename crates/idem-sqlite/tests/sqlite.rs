//! What only the SQLite store promises: durability across reopen, several connections (as
//! several processes have) on one file, and refusal of files it does not understand.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use idem_core::{
    ClaimRequest, Clock, Decision, Error, FencingToken, Fingerprint, IdempotencyKey, RecordKey,
    Scope, Store, SystemClock,
};
use idem_sqlite::{SqliteOptions, SqliteStore};

fn temp_db() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "idem-sqlite-it-{}-{:016x}",
        std::process::id(),
        FencingToken::generate().as_u64()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("idem.db")
}

fn key(name: &str) -> RecordKey {
    RecordKey::new(Scope::named("it"), IdempotencyKey::new(name).unwrap())
}

async fn claim(store: &dyn Store, key: &RecordKey) -> (Decision, FencingToken) {
    let token = FencingToken::generate();
    let now = SystemClock.now();
    let lease = now.saturating_add(Duration::from_secs(30));
    let decision = store
        .claim(ClaimRequest {
            key,
            fingerprint: &Fingerprint::builder().part(b"body").finish(),
            token,
            now,
            lease_expires_at: lease,
            expires_at: lease.saturating_add(Duration::from_secs(3600)),
        })
        .await
        .unwrap();
    (decision, token)
}

#[tokio::test]
async fn completed_and_in_flight_records_survive_a_reopen() {
    let path = temp_db();
    let expires = SystemClock.now().saturating_add(Duration::from_secs(3600));
    let in_flight_token = {
        let store = SqliteStore::open(&path, &SqliteOptions::default()).unwrap();
        let (_, token) = claim(&store, &key("done")).await;
        store
            .complete(
                &key("done"),
                token,
                Bytes::from_static(b"stored"),
                SystemClock.now(),
                expires,
            )
            .await
            .unwrap();
        let (decision, token) = claim(&store, &key("running")).await;
        assert_eq!(decision, Decision::Acquire);
        token
    };
    let reopened = SqliteStore::open(&path, &SqliteOptions::default()).unwrap();
    assert_eq!(
        claim(&reopened, &key("done")).await.0,
        Decision::Replay(Bytes::from_static(b"stored"))
    );
    // The in-flight claim is still held by its (now gone) owner until its lease expires.
    assert!(matches!(claim(&reopened, &key("running")).await.0, Decision::InFlight { .. }));
    reopened
        .complete(
            &key("running"),
            in_flight_token,
            Bytes::from_static(b"late"),
            SystemClock.now(),
            expires,
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn separate_connections_on_one_file_race_with_one_winner() {
    let path = temp_db();
    // Four stores, four connections: what four processes on one host would have.
    let stores: Vec<Arc<SqliteStore>> = (0..4)
        .map(|_| Arc::new(SqliteStore::open(&path, &SqliteOptions::default()).unwrap()))
        .collect();
    for round in 0..10 {
        let key = key(&format!("race-{round}"));
        let tasks: Vec<_> = (0..32)
            .map(|i| {
                let store = Arc::clone(&stores[i % stores.len()]);
                let key = key.clone();
                tokio::spawn(async move { claim(store.as_ref(), &key).await.0 })
            })
            .collect();
        let mut acquired = 0;
        for task in tasks {
            match task.await.unwrap() {
                Decision::Acquire => acquired += 1,
                Decision::InFlight { .. } => {}
                other => panic!("unexpected decision {other:?}"),
            }
        }
        assert_eq!(acquired, 1, "round {round}: exactly one connection may win");
    }
}

#[tokio::test]
async fn a_writer_holding_the_lock_makes_the_store_unavailable_not_wrong() {
    let path = temp_db();
    let options =
        SqliteOptions { busy_timeout: Duration::from_millis(100), ..SqliteOptions::default() };
    let store = SqliteStore::open(&path, &options).unwrap();
    let blocker = rusqlite_connection(&path);
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let token = FencingToken::generate();
    let now = SystemClock.now();
    let result = store
        .claim(ClaimRequest {
            key: &key("blocked"),
            fingerprint: &Fingerprint::builder().part(b"body").finish(),
            token,
            now,
            lease_expires_at: now,
            expires_at: now.saturating_add(Duration::from_secs(60)),
        })
        .await;
    assert!(matches!(result, Err(ref error) if error.is_unavailable()), "got {result:?}");
    blocker.execute_batch("COMMIT").unwrap();
    assert_eq!(claim(&store, &key("blocked")).await.0, Decision::Acquire);
}

#[test]
fn refuses_a_schema_newer_than_it_knows_and_bad_urls() {
    let path = temp_db();
    drop(SqliteStore::open(&path, &SqliteOptions::default()).unwrap());
    rusqlite_connection(&path).pragma_update(None, "user_version", 99).unwrap();
    let error = SqliteStore::open(&path, &SqliteOptions::default()).unwrap_err();
    assert!(matches!(error, Error::Config(ref m) if m.contains("version 99")), "{error}");

    for (url, expected) in [
        ("postgres://x", "not a sqlite:// URL"),
        ("sqlite://", "needs a file path"),
        ("sqlite://x.db?synchronous=sometimes", "synchronous must be full or normal"),
        ("sqlite://x.db?busy_timeout_ms=soon", "busy_timeout_ms"),
        ("sqlite://x.db?cache=shared", "unknown sqlite:// URL parameter"),
    ] {
        let error = SqliteStore::from_url(url).unwrap_err().to_string();
        assert!(error.contains(expected), "{url}: {error}");
    }
}

fn rusqlite_connection(path: &std::path::Path) -> rusqlite::Connection {
    rusqlite::Connection::open(path).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operations_committed_in_groups_are_all_durable() {
    let path = temp_db();
    let store = Arc::new(SqliteStore::open(&path, &SqliteOptions::default()).unwrap());
    // 400 callers at once: the writer groups them into shared transactions.
    let tasks: Vec<_> = (0..400)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let key = key(&format!("group-{i}"));
                let (decision, token) = claim(store.as_ref(), &key).await;
                assert_eq!(decision, Decision::Acquire);
                let now = SystemClock.now();
                let expires = now.saturating_add(Duration::from_secs(3600));
                store
                    .complete(&key, token, Bytes::from(format!("outcome {i}")), now, expires)
                    .await
                    .unwrap();
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    drop(store);
    let reopened = SqliteStore::open(&path, &SqliteOptions::default()).unwrap();
    for i in 0..400 {
        let (decision, _) = claim(&reopened, &key(&format!("group-{i}"))).await;
        assert_eq!(decision, Decision::Replay(Bytes::from(format!("outcome {i}"))), "key {i}");
    }
}
