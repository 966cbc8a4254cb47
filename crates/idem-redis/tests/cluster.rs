//! The Redis store on a real Redis Cluster this test starts: six `redis-server` processes on
//! loopback ports of its own (three masters, a replica each), joined by `redis-cli --cluster
//! create`. The whole conformance suite runs on one cluster, case after case.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idem_core::conformance::{self, skip};
use idem_core::{
    ClaimRequest, Decision, FencingToken, Fingerprint, IdempotencyKey, ListQuery, RecordKey, Scope,
    Store, Timestamp,
};
use idem_redis::RedisStore;

/// Six cluster nodes, killed when dropped.
struct Cluster {
    nodes: Vec<(u16, Child)>,
    dir: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, child) in &mut self.nodes {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A loopback port that is free, and whose cluster bus port (+10000) is free too.
fn free_cluster_port(taken: &[u16]) -> u16 {
    loop {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        if port > 55_000 || taken.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

fn redis_cli(port: u16, args: &[&str]) -> Option<String> {
    let output = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    output.status.success().then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

impl Cluster {
    /// Starts the nodes and joins them; `None` (after a SKIPPED line) without `redis-server`.
    fn start() -> Option<Self> {
        let dir = std::env::temp_dir().join(format!("idem-redis-cluster-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut cluster = Self { nodes: Vec::new(), dir };
        for _ in 0..6 {
            let taken: Vec<u16> = cluster.nodes.iter().map(|(port, _)| *port).collect();
            let port = free_cluster_port(&taken);
            match start_node(port, &cluster.dir.join(port.to_string())) {
                Ok(child) => cluster.nodes.push((port, child)),
                Err(error) if std::env::var("IDEM_REQUIRE_SERVICES").as_deref() == Ok("1") => {
                    panic!("cannot start redis-server: {error}")
                }
                Err(error) => {
                    skip(&format!("cannot start redis-server ({error})"));
                    return None;
                }
            }
        }
        for (port, _) in &cluster.nodes {
            wait_until(Duration::from_secs(10), &format!("node {port} answers"), || {
                redis_cli(*port, &["ping"]).is_some_and(|reply| reply.trim() == "PONG")
            });
        }
        let addresses: Vec<String> =
            cluster.nodes.iter().map(|(port, _)| format!("127.0.0.1:{port}")).collect();
        let mut create = vec!["--cluster", "create"];
        create.extend(addresses.iter().map(String::as_str));
        create.extend(["--cluster-replicas", "1", "--cluster-yes"]);
        let first = cluster.nodes[0].0;
        assert!(redis_cli(first, &create).is_some(), "redis-cli --cluster create failed");
        for (port, _) in &cluster.nodes {
            wait_until(
                Duration::from_secs(30),
                &format!("node {port} sees the cluster ok"),
                || {
                    redis_cli(*port, &["cluster", "info"])
                        .is_some_and(|info| info.contains("cluster_state:ok"))
                },
            );
        }
        Some(cluster)
    }

    /// `redis+cluster://` naming two of the nodes as seeds: the client finds the rest.
    fn url(&self, prefix: &str) -> String {
        let seeds: Vec<String> =
            self.nodes.iter().take(2).map(|(port, _)| format!("127.0.0.1:{port}")).collect();
        format!("redis+cluster://{}?prefix={prefix}", seeds.join(","))
    }
}

fn start_node(port: u16, dir: &Path) -> std::io::Result<Child> {
    std::fs::create_dir_all(dir)?;
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
        .args(["--appendonly", "no", "--daemonize", "no", "--cluster-enabled", "yes"])
        .args(["--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}

fn wait_until(within: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < within, "not within {within:?}: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

async fn store(cluster: &Cluster, prefix: &str) -> RedisStore {
    RedisStore::connect(&cluster.url(prefix)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_conformance_suite_passes_on_a_redis_cluster() {
    let Some(cluster) = Cluster::start() else { return };
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

    // A listing visits every master: records spread over the three are all found.
    let keys = 60;
    let store = case("spread").await;
    spread_records(&store, keys).await;
    let per_master: Vec<usize> = cluster
        .nodes
        .iter()
        .filter(|(port, _)| {
            redis_cli(*port, &["role"]).is_some_and(|role| role.starts_with("master"))
        })
        .map(|(port, _)| {
            let found = redis_cli(*port, &["--scan", "--pattern", "spread:r:*"]).unwrap();
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
