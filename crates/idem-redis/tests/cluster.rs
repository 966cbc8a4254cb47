//! The Redis store on a real Redis Cluster this test starts: six `redis-server` processes on
//! loopback ports of its own (three masters, a replica each), joined by `redis-cli --cluster
//! create`. The whole conformance suite runs on one cluster, case after case.

use std::sync::Arc;
use std::time::Duration;

use idem_core::conformance::{self, RedisCluster, redis_cli};
use idem_core::{
    ClaimRequest, Decision, FencingToken, Fingerprint, IdempotencyKey, ListQuery, RecordKey, Scope,
    Store, Timestamp,
};
use idem_redis::RedisStore;

async fn store(cluster: &RedisCluster, prefix: &str) -> RedisStore {
    RedisStore::connect(&cluster.url(&format!("prefix={prefix}"))).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_conformance_suite_passes_on_a_redis_cluster() {
    let Some(cluster) = RedisCluster::start() else { return };
    let case = |name: &'static str| {
        println!("conformance on the cluster: {name}");
        store(&cluster, name)
    };
    conformance::claim_complete_replay(&case("replay").await).await;
    conformance::mismatch_leaves_the_record_untouched(&case("mismatch").await).await;
    conformance::in_flight_until_the_lease_expires(&case("lease").await).await;
    conformance::renewal_extends_the_lease(&case("renewal").await).await;
    conformance::release_lets_a_retry_run(&case("release").await).await;
    conformance::a_stale_owner_is_fenced(&case("fenced").await).await;
    conformance::expired_records_count_as_absent(&case("expired").await).await;
    conformance::large_payloads_round_trip(&case("large").await).await;
    conformance::sweeping_is_bounded_and_spares_live_records(&case("sweep").await).await;
    conformance::delete_removes_any_record(&case("delete").await).await;
    conformance::listing_filters_and_orders_records(&case("listing").await).await;
    conformance::a_claim_race_has_one_winner(Arc::new(case("race").await)).await;
    // Claims and completions confirmed by each master's replica (WAIT).
    let waited = RedisStore::connect(&cluster.url("prefix=waited&wait_replicas=1")).await;
    conformance::claim_complete_replay(&waited.unwrap()).await;

    // A listing visits every master: records spread over the three are all found.
    let keys = 60;
    let store = case("spread").await;
    spread_records(&store, keys).await;
    let per_master: Vec<usize> = cluster
        .masters()
        .into_iter()
        .map(|port| {
            let found = redis_cli(port, &["--scan", "--pattern", "spread:r:*"]).unwrap();
            found.lines().filter(|name| name.contains("{")).count()
        })
        .collect();
    assert_eq!(per_master.len(), 3, "three masters: {per_master:?}");
    assert!(per_master.iter().all(|count| *count > 0), "records on every master: {per_master:?}");
    assert_eq!(per_master.iter().sum::<usize>(), keys, "{per_master:?}");
    let listed = store
        .list(&ListQuery { scope: None, state: None, created_before: None, limit: 1000 })
        .await;
    assert_eq!(listed.unwrap().len(), keys, "listed across masters holding {per_master:?}");

    // Waiters hear of completions on every master: the subscriber listens on one seed node,
    // and the cluster carries each announcement to every node.
    let store = case("announced").await;
    let mut changes = store.subscribe().expect("the Redis store announces changes");
    let mut expected = std::collections::BTreeSet::new();
    for index in 0..12 {
        let key = record_key(&format!("w{index}"));
        let token = claim(&store, &key).await;
        store.watch(&key).await.unwrap();
        let now = now();
        let expires = now.saturating_add(Duration::from_secs(600));
        store.complete(&key, token, bytes::Bytes::from_static(b"ok"), now, expires).await.unwrap();
        expected.insert(key.change_id());
    }
    let mut heard = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while heard.len() < expected.len() {
        match tokio::time::timeout_at(deadline, changes.recv()).await {
            Ok(Ok(id)) => {
                heard.insert(id);
            }
            other => panic!("heard {} of {} completions: {other:?}", heard.len(), expected.len()),
        }
    }
    assert_eq!(heard, expected);
}

fn now() -> Timestamp {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    Timestamp::from_millis(since.as_millis() as u64)
}

fn record_key(name: &str) -> RecordKey {
    RecordKey::new(Scope::named("cluster"), IdempotencyKey::new(name).unwrap())
}

/// Claims a fresh key; answers the owner's token.
async fn claim(store: &RedisStore, key: &RecordKey) -> FencingToken {
    let (token, now) = (FencingToken::generate(), now());
    let request = ClaimRequest {
        key,
        fingerprint: &Fingerprint::from_bytes([1; 32]),
        token,
        now,
        lease_expires_at: now.saturating_add(Duration::from_secs(30)),
        expires_at: now.saturating_add(Duration::from_secs(600)),
    };
    assert_eq!(store.claim(request).await.unwrap(), Decision::Acquire);
    token
}

/// Stores `count` completed records.
async fn spread_records(store: &RedisStore, count: usize) {
    for index in 0..count {
        let key = record_key(&format!("k{index}"));
        let token = claim(store, &key).await;
        let now = now();
        let expires = now.saturating_add(Duration::from_secs(600));
        store.complete(&key, token, bytes::Bytes::from_static(b"ok"), now, expires).await.unwrap();
    }
}
