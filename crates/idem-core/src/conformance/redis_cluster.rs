//! A Redis Cluster of a test's own: six `redis-server` processes on free loopback ports (three
//! masters, a replica each), joined by `redis-cli --cluster create`, killed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::skip;

#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<Node>,
    dir: PathBuf,
}

#[derive(Debug)]
struct Node {
    port: u16,
    child: Option<Child>,
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A loopback port that is free, and whose cluster bus port (+10000) is free too. Both lie
/// below Linux's ephemeral range (32768 and up), so that no outgoing connection of the tests
/// takes one while its node is down for a restart.
fn free_cluster_port(taken: &[u16]) -> u16 {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.subsec_nanos())
        ^ std::process::id();
    for attempt in 0..10_000u32 {
        let port = 12_000 + ((seed.wrapping_add(attempt.wrapping_mul(7_919))) % 10_000) as u16;
        let near = taken.iter().any(|other| port.abs_diff(*other) % 10_000 == 0);
        if !near
            && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()
        {
            return port;
        }
    }
    panic!("no free pair of ports for a cluster node below 32768");
}

/// `redis-cli -p port args...`: its output, or `None` if it failed.
pub fn redis_cli(port: u16, args: &[&str]) -> Option<String> {
    let output = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    output.status.success().then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

fn start_node(port: u16, dir: &Path) -> std::io::Result<Child> {
    std::fs::create_dir_all(dir)?;
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
        .args(["--appendonly", "no", "--daemonize", "no", "--cluster-enabled", "yes"])
        .args(["--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000"])
        .args(["--repl-diskless-sync-delay", "0"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}

/// Waits until `done`, at most `within`; panics naming `what` past it.
pub fn wait_until(within: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < within, "not within {within:?}: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl RedisCluster {
    /// Starts the nodes and joins them; `None` (after a SKIPPED line) without `redis-server`,
    /// a failure under `IDEM_REQUIRE_SERVICES=1`.
    pub fn start() -> Option<Self> {
        let dir = std::env::temp_dir().join(format!(
            "idem-redis-cluster-{}-{}",
            std::process::id(),
            free_cluster_port(&[])
        ));
        let mut cluster = Self { nodes: Vec::new(), dir };
        for _ in 0..6 {
            let taken: Vec<u16> = cluster.nodes.iter().map(|node| node.port).collect();
            let port = free_cluster_port(&taken);
            match start_node(port, &cluster.dir.join(port.to_string())) {
                Ok(child) => cluster.nodes.push(Node { port, child: Some(child) }),
                Err(error) if std::env::var("IDEM_REQUIRE_SERVICES").as_deref() == Ok("1") => {
                    panic!("cannot start redis-server: {error}")
                }
                Err(error) => {
                    skip(&format!("cannot start redis-server ({error})"));
                    return None;
                }
            }
        }
        for port in cluster.ports() {
            wait_until(Duration::from_secs(10), &format!("node {port} answers"), || {
                redis_cli(port, &["ping"]).is_some_and(|reply| reply.trim() == "PONG")
            });
        }
        let addresses: Vec<String> =
            cluster.ports().iter().map(|port| format!("127.0.0.1:{port}")).collect();
        let mut create = vec!["--cluster", "create"];
        create.extend(addresses.iter().map(String::as_str));
        create.extend(["--cluster-replicas", "1", "--cluster-yes"]);
        assert!(redis_cli(cluster.nodes[0].port, &create).is_some(), "cluster create failed");
        cluster.wait_ok(Duration::from_secs(30));
        Some(cluster)
    }

    /// The ports of every node started (running or not).
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|node| node.port).collect()
    }

    /// The ports of the running nodes that are masters now.
    pub fn masters(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|node| node.child.is_some())
            .map(|node| node.port)
            .filter(|port| {
                redis_cli(*port, &["role"]).is_some_and(|role| role.starts_with("master"))
            })
            .collect()
    }

    /// Waits until every running node sees the cluster ok and all 16384 slots served, and
    /// every running replica's link to its master is up.
    pub fn wait_ok(&self, within: Duration) {
        for node in self.nodes.iter().filter(|node| node.child.is_some()) {
            let port = node.port;
            wait_until(within, &format!("node {port} sees the cluster ok"), || {
                redis_cli(port, &["cluster", "info"]).is_some_and(|info| {
                    info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384")
                })
            });
            wait_until(within, &format!("node {port} is a master or replicates"), || {
                redis_cli(port, &["info", "replication"]).is_some_and(|info| {
                    info.contains("role:master") || info.contains("master_link_status:up")
                })
            });
        }
    }

    /// Kills the node on `port` with SIGKILL.
    pub fn kill9(&mut self, port: u16) {
        let node = self.nodes.iter_mut().find(|node| node.port == port).expect("a node's port");
        if let Some(mut child) = node.child.take() {
            child.kill().expect("kill -9 the node");
            child.wait().expect("reap the node");
        }
    }

    /// Starts the node on `port` again, on its own directory (it rejoins as it was told).
    pub fn restart(&mut self, port: u16) {
        let dir = self.dir.join(port.to_string());
        let node = self.nodes.iter_mut().find(|node| node.port == port).expect("a node's port");
        assert!(node.child.is_none(), "node {port} is running");
        node.child = Some(start_node(port, &dir).expect("restart redis-server"));
        wait_until(Duration::from_secs(10), &format!("node {port} answers again"), || {
            redis_cli(port, &["ping"]).is_some_and(|reply| reply.trim() == "PONG")
        });
    }

    /// `redis+cluster://` naming two nodes as seeds (the client finds the rest), with `query`.
    pub fn url(&self, query: &str) -> String {
        let seeds: Vec<String> =
            self.nodes.iter().take(2).map(|node| format!("127.0.0.1:{}", node.port)).collect();
        format!("redis+cluster://{}?{query}", seeds.join(","))
    }
}
