//! The store conformance suite: one set of checks every [`Store`] must pass.
//!
//! A store crate runs it against its real backend with one macro call in its tests:
//!
//! ```ignore
//! idem_core::store_conformance_tests!(async { MyStore::connect(&url).await.unwrap() });
//! ```
//!
//! Every case uses keys of its own (a random suffix), and every timestamp is far from the
//! others' unless a case needs otherwise, so the cases can run at once against one shared
//! database.

pub mod servers;

mod redis_cluster;

pub use redis_cluster::{RedisCluster, redis_cli, wait_until};

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::{
    ClaimRequest, Decision, Error, FencingToken, Fingerprint, IdempotencyKey, ListQuery, RecordKey,
    RecordState, Scope, StateFilter, Store, SystemClock, Timestamp, clock::Clock,
};

/// The URL of a real server for a test: from the environment variable `variable`, else the
/// standard loopback address of that kind of server if something answers there (PostgreSQL
/// `postgres://postgres@127.0.0.1:5432/test`, Redis `redis://127.0.0.1:6379`, NATS
/// `nats://127.0.0.1:4222`, RabbitMQ `amqp://guest:guest@127.0.0.1:5672/%2f`). When neither,
/// the test says so loudly (see [`skip`]) and skips (returns `None`), unless
/// `IDEM_REQUIRE_SERVICES=1`, under which a missing service fails the test.
pub fn service_url(variable: &str) -> Option<String> {
    if let Ok(url) = std::env::var(variable)
        && !url.is_empty()
    {
        return Some(url);
    }
    let standard = match variable {
        "IDEM_TEST_POSTGRES_URL" => Some(("postgres://postgres@127.0.0.1:5432/test", 5432)),
        "IDEM_TEST_REDIS_URL" => Some(("redis://127.0.0.1:6379", 6379)),
        "IDEM_TEST_NATS_URL" => Some(("nats://127.0.0.1:4222", 4222)),
        "IDEM_TEST_AMQP_URL" => Some(("amqp://guest:guest@127.0.0.1:5672/%2f", 5672)),
        _ => None,
    };
    if let Some((url, port)) = standard {
        let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        if std::net::TcpStream::connect_timeout(&address, Duration::from_millis(300)).is_ok() {
            return Some(url.to_owned());
        }
    }
    if std::env::var("IDEM_REQUIRE_SERVICES").as_deref() == Ok("1") {
        panic!(
            "{variable} is not set, nothing answers at its standard address, and IDEM_REQUIRE_SERVICES=1"
        );
    }
    let tried = standard.map_or(String::new(), |(url, _)| format!(" and nothing answers at {url}"));
    skip(&format!("{variable} is not set{tried}"));
    None
}

/// Says loudly that the calling test skips, and why: on stderr (`SKIPPED: ...`), and, when
/// `IDEM_SKIP_LOG` names a file (as `scripts/test.sh` does), as a line appended to it, so the
/// run's summary can list every skip.
pub fn skip(reason: &str) {
    let test = std::thread::current().name().unwrap_or("a test").to_owned();
    eprintln!("SKIPPED: {test}: {reason}");
    if let Ok(path) = std::env::var("IDEM_SKIP_LOG")
        && !path.is_empty()
    {
        use std::io::Write as _;
        let line = format!("{test}: {reason}\n");
        if let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = file.write_all(line.as_bytes());
        }
    }
}

/// A PostgreSQL URL (from `IDEM_TEST_POSTGRES_URL`) whose connections use the schema
/// `schema`, dropped and created empty now: tests that share the server never see each
/// other's tables. `None`, after a SKIPPED line, when the variable is unset.
#[cfg(feature = "conformance")]
pub async fn fresh_postgres_schema(schema: &str) -> Option<String> {
    assert!(
        schema.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
        "a plain lowercase schema name"
    );
    let url = service_url("IDEM_TEST_POSTGRES_URL")?;
    let (admin, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("IDEM_TEST_POSTGRES_URL accepts connections");
    tokio::spawn(connection);
    admin
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"))
        .await
        .expect("the test schema can be made");
    let separator = if url.contains('?') { '&' } else { '?' };
    Some(format!("{url}{separator}options=-c%20search_path%3D{schema}"))
}

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(3600);

fn unique_key(name: &str) -> RecordKey {
    let suffix = FencingToken::generate().as_u64();
    RecordKey::new(
        Scope::named(format!("conformance-{suffix:016x}")),
        IdempotencyKey::new(format!("{name}-{suffix:016x}")).unwrap(),
    )
}

fn fingerprint(body: &str) -> Fingerprint {
    Fingerprint::builder().part(body.as_bytes()).finish()
}

/// The real time: shared stores may run this suite while other records live in them.
fn now() -> Timestamp {
    SystemClock.now()
}

async fn claim_at(
    store: &dyn Store,
    key: &RecordKey,
    body: &str,
    now: Timestamp,
) -> (Decision, FencingToken) {
    let token = FencingToken::generate();
    let lease_expires_at = now.saturating_add(LEASE);
    let decision = store
        .claim(ClaimRequest {
            key,
            fingerprint: &fingerprint(body),
            token,
            now,
            lease_expires_at,
            expires_at: lease_expires_at.saturating_add(TTL),
        })
        .await
        .expect("claim must succeed against a healthy store");
    (decision, token)
}

pub async fn claim_complete_replay(store: &dyn Store) {
    let key = unique_key("replay");
    let t0 = now();
    let (decision, token) = claim_at(store, &key, "a", t0).await;
    assert_eq!(decision, Decision::Acquire);
    let record = store.get(&key).await.unwrap().expect("claimed record is stored");
    assert_eq!(record.fingerprint, fingerprint("a"));
    assert_eq!(
        record.state,
        RecordState::InFlight { token, lease_expires_at: t0.saturating_add(LEASE) }
    );
    assert_eq!(record.created_at, t0);

    store
        .complete(&key, token, Bytes::from_static(b"the response"), t0, t0.saturating_add(TTL))
        .await
        .unwrap();
    let (again, _) = claim_at(store, &key, "a", t0.saturating_add(Duration::from_secs(1))).await;
    assert_eq!(again, Decision::Replay(Bytes::from_static(b"the response")));
    let record = store.get(&key).await.unwrap().unwrap();
    assert_eq!(record.expires_at, t0.saturating_add(TTL));
    // Completing twice is refused: the record is no longer in flight.
    let twice = store.complete(&key, token, Bytes::from_static(b"other"), t0, t0).await;
    assert!(matches!(twice, Err(Error::Fenced)), "second completion must be fenced: {twice:?}");
    assert_eq!(
        store.get(&key).await.unwrap().unwrap().state,
        RecordState::Completed { payload: Bytes::from_static(b"the response") }
    );
}

pub async fn mismatch_leaves_the_record_untouched(store: &dyn Store) {
    let key = unique_key("mismatch");
    let t0 = now();
    let (_, token) = claim_at(store, &key, "original", t0).await;
    // While the first runs, a different payload is a mismatch, not a conflict.
    let (during, _) = claim_at(store, &key, "different", t0).await;
    assert_eq!(during, Decision::Mismatch);
    store
        .complete(&key, token, Bytes::from_static(b"first"), t0, t0.saturating_add(TTL))
        .await
        .unwrap();
    let before = store.get(&key).await.unwrap();
    let (after, _) = claim_at(store, &key, "different", t0).await;
    assert_eq!(after, Decision::Mismatch);
    assert_eq!(store.get(&key).await.unwrap(), before);
    let (replay, _) = claim_at(store, &key, "original", t0).await;
    assert_eq!(replay, Decision::Replay(Bytes::from_static(b"first")));
}

pub async fn in_flight_until_the_lease_expires(store: &dyn Store) {
    let key = unique_key("lease");
    let t0 = now();
    let (_, first) = claim_at(store, &key, "a", t0).await;
    let (during, _) = claim_at(store, &key, "a", t0.saturating_add(Duration::from_secs(29))).await;
    assert_eq!(during, Decision::InFlight { lease_expires_at: t0.saturating_add(LEASE) });
    let (after, second) = claim_at(store, &key, "a", t0.saturating_add(LEASE)).await;
    assert_eq!(after, Decision::Acquire, "an expired lease is taken over");
    assert_ne!(first, second);
    let record = store.get(&key).await.unwrap().unwrap();
    assert!(matches!(record.state, RecordState::InFlight { token, .. } if token == second));
}

pub async fn renewal_extends_the_lease(store: &dyn Store) {
    let key = unique_key("renew");
    let t0 = now();
    let (_, token) = claim_at(store, &key, "a", t0).await;
    let renewed_until = t0.saturating_add(Duration::from_secs(50));
    store.renew(&key, token, t0, renewed_until, renewed_until.saturating_add(TTL)).await.unwrap();
    let (at_old_expiry, _) = claim_at(store, &key, "a", t0.saturating_add(LEASE)).await;
    assert_eq!(at_old_expiry, Decision::InFlight { lease_expires_at: renewed_until });
    let wrong = store.renew(&key, FencingToken::generate(), t0, renewed_until, renewed_until).await;
    assert!(matches!(wrong, Err(Error::Fenced)), "a stranger's renewal must be fenced: {wrong:?}");
}

pub async fn release_lets_a_retry_run(store: &dyn Store) {
    let key = unique_key("release");
    let t0 = now();
    let (_, token) = claim_at(store, &key, "a", t0).await;
    let stranger = store.release(&key, FencingToken::generate()).await;
    assert!(matches!(stranger, Err(Error::Fenced)), "a stranger's release must be fenced");
    assert!(store.get(&key).await.unwrap().is_some());
    store.release(&key, token).await.unwrap();
    assert_eq!(store.get(&key).await.unwrap(), None);
    let (retry, _) = claim_at(store, &key, "a", t0).await;
    assert_eq!(retry, Decision::Acquire);
}

pub async fn a_stale_owner_is_fenced(store: &dyn Store) {
    let key = unique_key("fence");
    let t0 = now();
    let (_, stale) = claim_at(store, &key, "a", t0).await;
    let later = t0.saturating_add(LEASE).saturating_add(Duration::from_secs(1));
    let (takeover, fresh) = claim_at(store, &key, "a", later).await;
    assert_eq!(takeover, Decision::Acquire);
    let expires = later.saturating_add(TTL);
    for attempt in [
        store.complete(&key, stale, Bytes::from_static(b"stale"), later, expires).await,
        store.renew(&key, stale, later, expires, expires).await,
        store.release(&key, stale).await,
    ] {
        assert!(matches!(attempt, Err(Error::Fenced)), "stale owner must be fenced: {attempt:?}");
    }
    store.complete(&key, fresh, Bytes::from_static(b"fresh"), later, expires).await.unwrap();
    let (replay, _) = claim_at(store, &key, "a", later).await;
    assert_eq!(replay, Decision::Replay(Bytes::from_static(b"fresh")));
}

pub async fn expired_records_count_as_absent(store: &dyn Store) {
    let key = unique_key("ttl");
    let t0 = now();
    let (_, token) = claim_at(store, &key, "a", t0).await;
    let expires_at = t0.saturating_add(Duration::from_secs(10));
    store.complete(&key, token, Bytes::from_static(b"old"), t0, expires_at).await.unwrap();
    let (before, _) = claim_at(store, &key, "b", t0.saturating_add(Duration::from_secs(9))).await;
    assert_eq!(before, Decision::Mismatch);
    // At expiry the key is new again, even for a different payload.
    let (after, token) = claim_at(store, &key, "b", expires_at).await;
    assert_eq!(after, Decision::Acquire);
    store
        .complete(
            &key,
            token,
            Bytes::from_static(b"new"),
            expires_at,
            expires_at.saturating_add(TTL),
        )
        .await
        .unwrap();
    let (replay, _) = claim_at(store, &key, "b", expires_at).await;
    assert_eq!(replay, Decision::Replay(Bytes::from_static(b"new")));
}

pub async fn a_claim_race_has_one_winner(store: Arc<dyn Store>) {
    for round in 0..5 {
        let key = unique_key(&format!("race{round}"));
        let t0 = now();
        let tasks: Vec<_> = (0..48)
            .map(|_| {
                let store = Arc::clone(&store);
                let key = key.clone();
                tokio::spawn(async move { claim_at(store.as_ref(), &key, "same", t0).await })
            })
            .collect();
        let mut winners = Vec::new();
        for task in tasks {
            let (decision, token) = task.await.unwrap();
            match decision {
                Decision::Acquire => winners.push(token),
                Decision::InFlight { .. } => {}
                other => panic!("a racing claim must acquire or see the winner, got {other:?}"),
            }
        }
        assert_eq!(winners.len(), 1, "exactly one of 48 racing claims may win");
        let record = store.get(&key).await.unwrap().unwrap();
        assert!(matches!(record.state, RecordState::InFlight { token, .. } if token == winners[0]));
    }
}

pub async fn large_payloads_round_trip(store: &dyn Store) {
    let key = unique_key("large");
    let t0 = now();
    let (_, token) = claim_at(store, &key, "a", t0).await;
    // 4 MiB that is not one repeated byte, so truncation or reordering would show.
    let payload: Bytes = (0..4 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect::<Vec<u8>>()
        .into();
    store.complete(&key, token, payload.clone(), t0, t0.saturating_add(TTL)).await.unwrap();
    let (replay, _) = claim_at(store, &key, "a", t0).await;
    assert_eq!(replay, Decision::Replay(payload));
    let empty_key = unique_key("empty");
    let (_, token) = claim_at(store, &empty_key, "a", t0).await;
    store.complete(&empty_key, token, Bytes::new(), t0, t0.saturating_add(TTL)).await.unwrap();
    let (replay, _) = claim_at(store, &empty_key, "a", t0).await;
    assert_eq!(replay, Decision::Replay(Bytes::new()));
}

pub async fn sweeping_is_bounded_and_spares_live_records(store: &dyn Store) {
    // Timestamps near the epoch: no other case's records (which use the real time) expire
    // at them, so sweeping here cannot disturb a case running beside this one.
    let base = Timestamp::from_millis(1_000 + FencingToken::generate().as_u64() % 1_000);
    let mut expired = HashSet::new();
    for i in 0..25 {
        let key = unique_key(&format!("sweep{i}"));
        let (_, token) = claim_at(store, &key, "a", base).await;
        store
            .complete(
                &key,
                token,
                Bytes::from_static(b"x"),
                base,
                base.saturating_add(Duration::from_millis(1)),
            )
            .await
            .unwrap();
        expired.insert(key);
    }
    let live = unique_key("live");
    let (_, token) = claim_at(store, &live, "a", now()).await;
    store
        .complete(&live, token, Bytes::from_static(b"keep"), now(), now().saturating_add(TTL))
        .await
        .unwrap();

    let native_expiry = store.capabilities().native_expiry;
    if native_expiry {
        // The store expires records itself (1 ms after completion here); give it the time.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sweep_at = base.saturating_add(Duration::from_secs(1));
    let mut batches = Vec::new();
    loop {
        let deleted = store.sweep(sweep_at, 10).await.unwrap();
        assert!(deleted <= 10, "a sweep batch must respect its limit, deleted {deleted}");
        batches.push(deleted);
        if deleted == 0 || batches.len() > 10 {
            break;
        }
    }
    if !native_expiry {
        assert!(batches.iter().sum::<usize>() >= 25, "every expired record is swept: {batches:?}");
    }
    for key in &expired {
        assert_eq!(store.get(key).await.unwrap(), None);
    }
    assert!(store.get(&live).await.unwrap().is_some(), "a live record must survive a sweep");
}

pub async fn listing_filters_and_orders_records(store: &dyn Store) {
    let suffix = FencingToken::generate().as_u64();
    let scope = Scope::named(format!("list-{suffix:016x}"));
    let key = |name: &str| RecordKey::new(scope.clone(), IdempotencyKey::new(name).unwrap());
    let t0 = now();
    let at = |seconds: u64| t0.saturating_add(Duration::from_secs(seconds));
    let (_, token) = claim_at(store, &key("a"), "a", at(0)).await;
    store.complete(&key("a"), token, Bytes::from_static(b"12345"), at(0), at(3600)).await.unwrap();
    claim_at(store, &key("b"), "b", at(1)).await;
    let (_, token) = claim_at(store, &key("c"), "c", at(2)).await;
    store.complete(&key("c"), token, Bytes::new(), at(2), at(3600)).await.unwrap();

    let list = |state, created_before, limit| {
        let query = ListQuery { scope: Some(scope.clone()), state, created_before, limit };
        async move { store.list(&query).await.unwrap() }
    };
    let names = |found: &[crate::RecordSummary]| {
        found.iter().map(|summary| summary.key.key.as_str().to_owned()).collect::<Vec<_>>()
    };
    let all = list(None, None, 100).await;
    assert_eq!(names(&all), ["a", "b", "c"], "oldest first, this scope only");
    assert_eq!(all[0].payload_len, Some(5));
    assert_eq!(all[0].lease_expires_at, None);
    assert_eq!(all[0].fingerprint, fingerprint("a"));
    assert_eq!(all[0].expires_at, at(3600));
    assert_eq!(all[1].lease_expires_at, Some(at(1).saturating_add(LEASE)));
    assert_eq!(all[1].payload_len, None);
    assert_eq!(all[1].created_at, at(1));
    assert_eq!(all[2].payload_len, Some(0));
    assert_eq!(names(&list(Some(StateFilter::InFlight), None, 100).await), ["b"]);
    assert_eq!(names(&list(Some(StateFilter::Completed), None, 100).await), ["a", "c"]);
    let before = Some(t0.saturating_add(Duration::from_millis(1_500)));
    assert_eq!(names(&list(None, before, 100).await), ["a", "b"]);
    assert_eq!(names(&list(None, None, 2).await), ["a", "b"]);
}

pub async fn delete_removes_any_record(store: &dyn Store) {
    let key = unique_key("delete");
    let (_, _token) = claim_at(store, &key, "a", now()).await;
    assert!(store.delete(&key).await.unwrap());
    assert!(!store.delete(&key).await.unwrap());
    assert_eq!(store.get(&key).await.unwrap(), None);
    let (decision, _) = claim_at(store, &key, "b", now()).await;
    assert_eq!(decision, Decision::Acquire);
    store.ping().await.unwrap();
}

/// Generates one `#[tokio::test]` per conformance case. `$make` is an expression of a future
/// that yields a fresh store (it is evaluated once per case).
#[macro_export]
macro_rules! store_conformance_tests {
    ($make:expr) => {
        $crate::store_conformance_tests!(@cases $make;
            claim_complete_replay,
            mismatch_leaves_the_record_untouched,
            in_flight_until_the_lease_expires,
            renewal_extends_the_lease,
            release_lets_a_retry_run,
            a_stale_owner_is_fenced,
            expired_records_count_as_absent,
            large_payloads_round_trip,
            sweeping_is_bounded_and_spares_live_records,
            delete_removes_any_record,
            listing_filters_and_orders_records,
        );

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn conformance_a_claim_race_has_one_winner() {
            if let Some(store) = $make.await {
                let store: ::std::sync::Arc<dyn $crate::Store> = ::std::sync::Arc::new(store);
                $crate::conformance::a_claim_race_has_one_winner(store).await;
            }
        }
    };
    (@cases $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                if let Some(store) = $make.await {
                    $crate::conformance::$case(&store).await;
                }
            }
        )*
    };
}
