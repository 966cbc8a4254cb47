//! One Redis server or a Redis Cluster, behind one connection type.

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, FromRedisValue, Pipeline, RedisFuture, RedisResult, Value};

/// A node of a cluster, as `CLUSTER NODES` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Node {
    pub host: String,
    pub port: u16,
}

impl Node {
    fn route(&self) -> SingleNodeRoutingInfo {
        SingleNodeRoutingInfo::ByAddress { host: self.host.clone(), port: self.port }
    }
}

/// The store's connection: to one server (re-established by itself), or to a cluster (which
/// follows slots to their masters, and so failovers, by itself). Commands on one key go where
/// the key lives either way.
#[derive(Clone)]
pub(crate) enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(connection) => connection.req_packed_command(cmd),
            Self::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(connection) => connection.req_packed_commands(pipeline, offset, count),
            Self::Cluster(connection) => connection.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(connection) => connection.get_db(),
            Self::Cluster(connection) => connection.get_db(),
        }
    }
}

impl Connection {
    /// The nodes a keyspace scan must visit: the server itself (`None`), or every cluster
    /// master that holds slots (a failed master that still holds slots included, so that a
    /// listing fails rather than silently leaves its keys out).
    pub(crate) async fn scan_targets(&mut self) -> RedisResult<Vec<Option<Node>>> {
        let Self::Cluster(connection) = self else { return Ok(vec![None]) };
        let reply = connection
            .route_command(
                redis::cmd("CLUSTER").arg("NODES").clone(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
            )
            .await?;
        let text: String = redis::from_redis_value(reply)?;
        let masters = masters_with_slots(&text).map_err(|line| {
            redis::RedisError::from(std::io::Error::other(format!(
                "a master holding slots has no address the listing can reach ({line}): its keys would be missed"
            )))
        })?;
        Ok(masters.into_iter().map(Some).collect())
    }

    /// Runs `cmd` on `node` (a cluster's) or where the command routes itself.
    pub(crate) async fn query_on<T: FromRedisValue>(
        &mut self,
        node: Option<&Node>,
        cmd: &Cmd,
    ) -> RedisResult<T> {
        match (self, node) {
            (Self::Cluster(connection), Some(node)) => {
                let reply = connection
                    .route_command(cmd.clone(), RoutingInfo::SingleNode(node.route()))
                    .await?;
                Ok(redis::from_redis_value(reply)?)
            }
            (connection, _) => cmd.query_async(connection).await,
        }
    }

    /// Runs `pipeline` on `node` (a cluster's; every key in it must live there) or where it
    /// routes itself.
    pub(crate) async fn pipeline_on<T: FromRedisValue>(
        &mut self,
        node: Option<&Node>,
        pipeline: &Pipeline,
    ) -> RedisResult<T> {
        match (self, node) {
            (Self::Cluster(connection), Some(node)) => {
                let replies = connection
                    .route_pipeline(pipeline.clone(), 0, pipeline.len(), node.route())
                    .await?;
                Ok(redis::from_redis_value(Value::Array(replies))?)
            }
            (connection, _) => pipeline.query_async(connection).await,
        }
    }
}

/// The masters that hold slots, from `CLUSTER NODES` (`<id> <ip:port@cport[,hostname]>
/// <flags> <master> <ping> <pong> <epoch> <link> <slot> ...`); `Err` with the line of one
/// that has no usable address (`noaddr`), whose keys a scan would miss.
fn masters_with_slots(text: &str) -> Result<Vec<Node>, String> {
    let mut masters = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 9 || !fields[2].split(',').any(|flag| flag == "master") {
            continue;
        }
        let address = fields[1].split(['@', ',']).next().unwrap_or_default();
        let node = address.rsplit_once(':').and_then(|(host, port)| {
            let port: u16 = port.parse().ok().filter(|port| *port > 0)?;
            (!host.is_empty()).then(|| Node { host: host.to_owned(), port })
        });
        masters.push(node.ok_or_else(|| line.to_owned())?);
    }
    masters.sort_by(|a, b| (&a.host, a.port).cmp(&(&b.host, b.port)));
    masters.dedup();
    Ok(masters)
}

/// The node URLs of a `redis+cluster://[user[:password]@]host:port[,host:port...][/]` base
/// (its query already split off): `redis://[user[:password]@]host:port` each.
pub(crate) fn cluster_nodes(base: &str) -> Result<Vec<String>, String> {
    let rest = base.strip_prefix("redis+cluster://").ok_or("not a redis+cluster:// URL")?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    if !path.is_empty() && path != "0" {
        return Err(format!("a cluster has only database 0, not {path:?}"));
    }
    let (credentials, hosts) = match authority.rsplit_once('@') {
        Some((credentials, hosts)) => (format!("{credentials}@"), hosts),
        None => (String::new(), authority),
    };
    let nodes: Vec<String> = hosts
        .split(',')
        .filter(|host| !host.is_empty())
        .map(|host| format!("redis://{credentials}{host}"))
        .collect();
    if nodes.is_empty() {
        return Err("a redis+cluster:// URL names at least one node, as in redis+cluster://10.0.0.1:7000,10.0.0.2:7000".into());
    }
    Ok(nodes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_urls_name_every_seed_node() {
        assert_eq!(
            cluster_nodes("redis+cluster://a:7000,b:7001").unwrap(),
            ["redis://a:7000", "redis://b:7001"]
        );
        assert_eq!(
            cluster_nodes("redis+cluster://u:p%40ss@a:7000,b:7001/").unwrap(),
            ["redis://u:p%40ss@a:7000", "redis://u:p%40ss@b:7001"]
        );
        assert!(cluster_nodes("redis+cluster://a:7000/3").unwrap_err().contains("database 0"));
        assert!(cluster_nodes("redis+cluster://").unwrap_err().contains("at least one node"));
    }

    #[test]
    fn a_scan_visits_the_masters_that_hold_slots() {
        let nodes = "\
07c3 127.0.0.1:30004@40004 slave e7d1 0 1 1 connected
67ed 127.0.0.1:30002@40002 master - 0 1 2 connected 5461-10922
292f 127.0.0.1:30003@40003,host3 master,fail - 0 1 3 connected 10923-16383
824f 127.0.0.1:30006@40006 master,fail - 0 1 6 disconnected
e7d1 127.0.0.1:30001@40001 myself,master - 0 0 1 connected 0-5460
";
        let ports: Vec<u16> =
            masters_with_slots(nodes).unwrap().iter().map(|node| node.port).collect();
        assert_eq!(ports, [30001, 30002, 30003]);
        // A master that holds slots but has no address fails the scan, not silently.
        let unreachable = "67ed :0@0 master,noaddr - 0 1 2 connected 5461-10922\n";
        assert!(masters_with_slots(unreachable).unwrap_err().contains("noaddr"));
    }
}
