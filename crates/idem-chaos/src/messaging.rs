//! The messaging scenario: producers commit business rows with outbox events in one
//! transaction, two `idem relay` processes publish them to a broker of the rig's own (NATS
//! JetStream, Redis Streams or RabbitMQ), and three consumer processes (this binary,
//! `idem-chaos consume`) apply them through the inbox, one partition each. Relays and
//! consumers are killed with `kill -9`, the broker and PostgreSQL crash and restart. Then the
//! database says what was committed and what was applied.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use idem_core::conformance::servers::PrivatePostgres;
use idem_stream::Delivery;
use idem_stream::consume::{self, Failure, OrderBy, Received, RunnerConfig, Subscription};
use idem_stream::nats::{JetStreamPartitions, JetStreamSubscription};
use idem_stream::postgres::{Applied, DeadLetters, Event, Inbox, Offsets, Outbox};
use idem_stream::rabbitmq::RabbitSubscription;
use idem_stream::redis_streams::RedisStreamsSubscription;

use crate::Rng;
use crate::servers::{Rabbit, Redis, free_port, wait_listening};

const PARTITIONS: usize = 3;
/// On JetStream this partition is read in the offsets mode (an ordered consumer from the
/// position recorded with the effects), which keeps each key in order through any crash; the
/// others through durable consumers and the inbox.
const OFFSETS_PARTITION: usize = 2;
const KEYS: i64 = 60;
/// JetStream redelivers (and a Redis Streams consumer claims) what a killed consumer held
/// after this.
const ACK_WAIT: Duration = Duration::from_secs(3);

/// The broker the relays publish to and the consumers read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Broker {
    Nats,
    /// Three clustered `nats-server`s, every stream replicated three times; faults kill a
    /// node, or the node leading a stream, instead of the whole broker.
    NatsCluster,
    Redis,
    Rabbitmq,
}

impl Broker {
    /// The partition read in the offsets mode, on JetStream (`consume` picks it by the URL).
    fn offsets_partition(self) -> Option<usize> {
        matches!(self, Broker::Nats | Broker::NatsCluster).then_some(OFFSETS_PARTITION)
    }

    fn name(self) -> &'static str {
        match self {
            Broker::Nats => "NATS JetStream",
            Broker::NatsCluster => "a 3-node NATS JetStream cluster (streams of 3 replicas)",
            Broker::Redis => "Redis Streams",
            Broker::Rabbitmq => "RabbitMQ (quorum queues)",
        }
    }
}

/// How long producers go on: for a time, or until this many transactions committed.
#[derive(Debug, Clone, Copy)]
pub enum Size {
    Seconds(Duration),
    Committed(i64),
}

/// Partition `partition`'s topic: the NATS subject, the Redis stream's key, the RabbitMQ
/// queue's name.
fn topic(partition: usize) -> String {
    format!("chaos.p{partition}")
}

#[derive(Debug, Default)]
pub struct Report {
    pub broker: &'static str,
    pub seconds: f64,
    pub committed: i64,
    pub rolled_back: i64,
    pub producer_errors: i64,
    pub applied_rows: i64,
    pub faults: HashMap<&'static str, u64>,
    pub never_applied: i64,
    /// (partition, count) of the above, for partitions with any.
    pub never_applied_by_partition: Vec<(i32, i64)>,
    pub applied_twice: i64,
    pub applied_not_committed: i64,
    pub out_of_order_after_consumer_kill: i64,
    pub out_of_order_after_broker_crash: i64,
    pub out_of_order_other: i64,
    /// The partition read in the offsets mode, if any.
    pub offsets_partition: Option<usize>,
    /// Inversions in the partition read in the offsets mode, whatever was killed: none allowed.
    pub out_of_order_offsets_mode: i64,
    pub dead_letters: i64,
    pub parked_keys: i64,
}

impl Report {
    pub fn clean(&self) -> bool {
        self.never_applied == 0
            && self.applied_twice == 0
            && self.applied_not_committed == 0
            && self.out_of_order_other == 0
            && self.out_of_order_offsets_mode == 0
            && self.dead_letters == 0
            && self.parked_keys == 0
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut faults: Vec<_> = self.faults.iter().collect();
        faults.sort();
        let faults: Vec<String> = faults.iter().map(|(k, v)| format!("{v} {k}")).collect();
        writeln!(
            f,
            "\n== messaging: PostgreSQL outbox -> 2 relays -> {} -> 3 consumers through the inbox ({:.0} s)",
            self.broker, self.seconds
        )?;
        writeln!(f, "| what | count |\n| --- | ---: |")?;
        writeln!(f, "| transactions committed with an event | {} |", self.committed)?;
        writeln!(
            f,
            "| transactions rolled back (their events must never arrive) | {} |",
            self.rolled_back
        )?;
        writeln!(
            f,
            "| producer transactions that failed (database restarting) | {} |",
            self.producer_errors
        )?;
        writeln!(f, "| faults injected | {} |", faults.join(", "))?;
        writeln!(f, "| events applied | {} |", self.applied_rows)?;
        writeln!(
            f,
            "| applied out of key order after that partition's consumer was killed (the documented limit of a durable consumer) | {} |",
            self.out_of_order_after_consumer_kill
        )?;
        writeln!(
            f,
            "| applied out of key order after the broker crashed (deliveries lost with it come back after the ack wait: the same limit) | {} |",
            self.out_of_order_after_broker_crash
        )?;
        let by_partition: Vec<String> = self
            .never_applied_by_partition
            .iter()
            .map(|(partition, count)| format!("{count} in partition {partition}"))
            .collect();
        let detail = match by_partition.is_empty() {
            true => String::new(),
            false => format!(" ({})", by_partition.join(", ")),
        };
        writeln!(f, "| committed, never applied | {}{detail} |", self.never_applied)?;
        writeln!(f, "| applied twice | {} |", self.applied_twice)?;
        writeln!(f, "| applied, never committed | {} |", self.applied_not_committed)?;
        writeln!(
            f,
            "| applied out of key order, no consumer killed and no broker crash shortly before | {} |",
            self.out_of_order_other
        )?;
        if let Some(partition) = self.offsets_partition {
            writeln!(
                f,
                "| applied out of key order in partition {partition}, read in the offsets mode (whatever was killed) | {} |",
                self.out_of_order_offsets_mode
            )?;
        }
        writeln!(f, "| dead-lettered | {} |", self.dead_letters)?;
        writeln!(
            f,
            "| outbox keys parked (publishing failed too often in a row) | {} |",
            self.parked_keys
        )?;
        Ok(())
    }
}

fn err<E: std::fmt::Display>(context: &'static str) -> impl Fn(E) -> String {
    move |error| format!("{context}: {error}")
}

/// A `nats-server -js` of the rig's own, with its store in `dir`: alone, or a node of a
/// cluster (`cluster` holds its server name, cluster name and port, and routes).
struct Nats {
    child: Child,
    port: u16,
    dir: std::path::PathBuf,
    cluster: Vec<String>,
}

impl Nats {
    fn start(port: u16, dir: &Path, cluster: Vec<String>) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(err("nats dir"))?;
        let mut child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir)
            .arg("-l")
            .arg(dir.join("server.log"))
            .args(&cluster)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(err("nats-server"))?;
        if let Err(error) = wait_listening(port, Duration::from_secs(15)) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(error);
        }
        Ok(Self { child, port, dir: dir.to_path_buf(), cluster })
    }

    /// `kill -9` and a start on the same data and ports.
    fn restart(&mut self) -> Result<(), String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        *self = Self::start(self.port, &self.dir.clone(), std::mem::take(&mut self.cluster))?;
        Ok(())
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Three `nats-server`s clustered on loopback, each with its own store directory and server
/// name (`n0`, `n1`, `n2`: what a stream's info names as its leader).
struct NatsCluster {
    nodes: Vec<Nats>,
    /// Node losses so far: every other one, the first included, is a stream's leader.
    kills: u64,
}

impl NatsCluster {
    const NODES: usize = 3;

    fn start(dir: &Path) -> Result<Self, String> {
        let ports: Vec<(u16, u16)> = (0..Self::NODES)
            .map(|_| Ok((free_port()?, free_port()?)))
            .collect::<Result<_, String>>()?;
        let routes: Vec<String> =
            ports.iter().map(|(_, cluster)| format!("nats://127.0.0.1:{cluster}")).collect();
        let mut nodes = Vec::new();
        for (index, (port, cluster)) in ports.iter().enumerate() {
            let flags = vec![
                "--server_name".to_owned(),
                format!("n{index}"),
                "--cluster_name".to_owned(),
                "idemchaos".to_owned(),
                "--cluster".to_owned(),
                format!("nats://127.0.0.1:{cluster}"),
                "--routes".to_owned(),
                routes.join(","),
            ];
            nodes.push(Nats::start(*port, &dir.join(format!("n{index}")), flags)?);
        }
        Ok(Self { nodes, kills: 0 })
    }

    /// Every node's client URL, comma-separated: what clients connect with.
    fn url(&self) -> String {
        self.nodes.iter().map(Nats::url).collect::<Vec<_>>().join(",")
    }

    /// The node that leads partition `partition`'s stream, as the cluster says (None while
    /// it has no leader or cannot be asked).
    async fn leader_of(&self, partition: usize) -> Option<usize> {
        let ask = async {
            let client = idem_stream::nats::connect(&self.url()).await.ok()?;
            let jetstream = async_nats::jetstream::new(client);
            let stream = jetstream.get_stream(format!("CHAOS{partition}")).await.ok()?;
            let leader = stream.cached_info().cluster.as_ref()?.leader.clone()?;
            leader.strip_prefix('n')?.parse().ok()
        };
        tokio::time::timeout(Duration::from_secs(5), ask).await.ok().flatten()
    }
}

/// The broker's server, the rig's own.
enum BrokerServer {
    Nats(Nats),
    NatsCluster(NatsCluster),
    Redis(Redis),
    Rabbit(Rabbit),
}

impl BrokerServer {
    fn start(broker: Broker, dir: &Path) -> Result<Self, String> {
        match broker {
            Broker::Nats => Nats::start(free_port()?, &dir.join("nats"), vec![]).map(Self::Nats),
            Broker::NatsCluster => NatsCluster::start(&dir.join("nats")).map(Self::NatsCluster),
            Broker::Redis => Redis::start(&dir.join("redis")).map(Self::Redis),
            Broker::Rabbitmq => Rabbit::start(&dir.join("rabbitmq")).map(Self::Rabbit),
        }
    }

    /// `kill -9` and a start on the same data: the whole broker, or on a cluster one node,
    /// every other time (the first included) the one leading a stream. Says what it killed.
    fn restart(
        &mut self,
        rng: &mut Rng,
        runtime: &tokio::runtime::Handle,
    ) -> Result<&'static str, String> {
        match self {
            Self::NatsCluster(cluster) => {
                cluster.kills += 1;
                let leader = match cluster.kills % 2 {
                    0 => None,
                    _ => runtime.block_on(cluster.leader_of(rng.below(PARTITIONS as u64) as usize)),
                };
                let node = leader.unwrap_or(rng.below(NatsCluster::NODES as u64) as usize);
                cluster.nodes[node].restart()?;
                return Ok(match leader {
                    Some(_) => "NATS stream leader node kill -9 and restart",
                    None => "NATS node kill -9 and restart",
                });
            }
            Self::Nats(nats) => nats.restart(),
            Self::Redis(redis) => redis.restart(),
            Self::Rabbit(rabbit) => rabbit.restart(),
        }?;
        Ok("broker kill -9 and restart")
    }

    fn url(&self) -> String {
        match self {
            Self::Nats(nats) => nats.url(),
            Self::NatsCluster(cluster) => cluster.url(),
            Self::Redis(redis) => redis.url(),
            Self::Rabbit(rabbit) => rabbit.url(),
        }
    }

    /// What the broker holds for each partition and who consumes it, for a diagnosis:
    /// RabbitMQ's queues (ready, unacknowledged, consumers) and consumers, JetStream's streams
    /// and durable consumers, Redis's consumer groups.
    async fn state(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        match self {
            Self::Rabbit(rabbit) => {
                let queues = [
                    "list_queues",
                    "name",
                    "messages_ready",
                    "messages_unacknowledged",
                    "consumers",
                    "state",
                ];
                let consumers = ["list_consumers", "queue_name", "channel_pid", "prefetch_count"];
                let said = tokio::task::block_in_place(|| {
                    format!("{}{}", rabbit.ctl(&queues), rabbit.ctl(&consumers))
                });
                for line in said.lines() {
                    let _ = writeln!(out, "rabbitmq: {line}");
                }
            }
            Self::Nats(_) | Self::NatsCluster(_) => {
                for partition in 0..PARTITIONS {
                    let info = async {
                        let stream = nats_stream(&self.url(), partition).await?;
                        let state = stream.get_info().await.map_err(err("stream info"))?.state;
                        let mut said = format!(
                            "stream {} messages, last sequence {}, {} consumers",
                            state.messages, state.last_sequence, state.consumer_count
                        );
                        if let Ok(consumer) = stream.consumer_info("chaos").await {
                            let _ = write!(
                                said,
                                "; durable consumer: {} pending, {} unacknowledged, {} waiting \
                                 pulls, delivered up to {}, acknowledged up to {}",
                                consumer.num_pending,
                                consumer.num_ack_pending,
                                consumer.num_waiting,
                                consumer.delivered.stream_sequence,
                                consumer.ack_floor.stream_sequence
                            );
                        }
                        Ok::<_, String>(said)
                    };
                    let said = tokio::time::timeout(Duration::from_secs(10), info)
                        .await
                        .unwrap_or_else(|_| Err("no answer within 10 s".to_owned()));
                    let said = said.unwrap_or_else(|error| error);
                    let _ = writeln!(out, "nats partition {partition}: {said}");
                }
            }
            Self::Redis(redis) => {
                let info = async {
                    let client = redis::Client::open(redis.url()).map_err(err("redis"))?;
                    let mut connection = client
                        .get_multiplexed_async_connection()
                        .await
                        .map_err(err("redis connect"))?;
                    let mut said = String::new();
                    for partition in 0..PARTITIONS {
                        let length: usize = redis::cmd("XLEN")
                            .arg(topic(partition))
                            .query_async(&mut connection)
                            .await
                            .map_err(err("XLEN"))?;
                        let groups: redis::streams::StreamInfoGroupsReply = redis::cmd("XINFO")
                            .arg("GROUPS")
                            .arg(topic(partition))
                            .query_async(&mut connection)
                            .await
                            .map_err(err("XINFO GROUPS"))?;
                        for group in groups.groups {
                            let _ = writeln!(
                                said,
                                "redis partition {partition}: {length} entries; group {}: {} \
                                 consumers, {} pending, lag {:?}, last delivered {}",
                                group.name,
                                group.consumers,
                                group.pending,
                                group.lag,
                                group.last_delivered_id
                            );
                        }
                    }
                    Ok::<_, String>(said)
                };
                let said = tokio::time::timeout(Duration::from_secs(10), info)
                    .await
                    .unwrap_or_else(|_| Err("no answer within 10 s".to_owned()));
                out.push_str(&said.unwrap_or_else(|error| format!("redis: {error}\n")));
            }
        }
        out
    }

    /// Makes what the relays publish to: a file-backed stream per partition on JetStream, a
    /// durable quorum queue per partition on RabbitMQ (Redis makes its streams on first use).
    async fn prepare(&self) -> Result<(), String> {
        let url = self.url();
        match self {
            Self::Nats(_) | Self::NatsCluster(_) => {
                let replicas = if matches!(self, Self::NatsCluster(_)) { 3 } else { 1 };
                let jetstream = async_nats::jetstream::new(
                    idem_stream::nats::connect(&url).await.map_err(err("nats connect"))?,
                );
                for partition in 0..PARTITIONS {
                    let config = async_nats::jetstream::stream::Config {
                        name: format!("CHAOS{partition}"),
                        subjects: vec![topic(partition)],
                        storage: async_nats::jetstream::stream::StorageType::File,
                        num_replicas: replicas,
                        ..Default::default()
                    };
                    // A new cluster takes a few seconds to elect its JetStream leader.
                    let started = Instant::now();
                    while let Err(error) = jetstream.create_stream(config.clone()).await {
                        if started.elapsed() > Duration::from_secs(30) {
                            return Err(format!("create stream: {error}"));
                        }
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                }
            }
            Self::Rabbit(_) => {
                for partition in 0..PARTITIONS {
                    let queue = topic(partition);
                    idem_stream::rabbitmq::declare_queue(&url, &queue, "", &queue)
                        .await
                        .map_err(err("declare queue"))?;
                }
            }
            Self::Redis(_) => {}
        }
        Ok(())
    }
}

/// What to look at when committed events were never applied, to tell where they are:
/// still in the outbox (a relay stuck, or the key parked or backing off), published and held
/// by the broker (no consumer taking them), or gone (published, acknowledged and dropped); or
/// whether the rig only stopped waiting too early (they arrive while this looks). With the
/// faults' timeline, when each partition last applied an event, whether each relay and
/// consumer is alive, and the last lines each logged.
async fn diagnose(
    client: &tokio_postgres::Client,
    server: &BrokerServer,
    relays: &mut [Killed],
    consumers: &mut [Killed],
    dir: &Path,
    timeline: &[(SystemTime, SystemTime, String)],
    waited: &str,
) -> String {
    use std::fmt::Write;
    let mut out = String::from("\n== diagnosis (the run's processes and servers still up)\n");
    let _ = writeln!(out, "waiting for the consumers: {waited}");
    for (from, to, what) in timeline {
        let _ = writeln!(out, "fault {} .. {}: {what}", clock(*from), clock(*to));
    }
    let query = |sql: &'static str| async move {
        client.query(sql, &[]).await.map_err(|error| format!("{sql}: {error}"))
    };
    // Per partition: the last event applied, and where each never-applied one is: published
    // (up to its key's published_seq), pending, parked, or without an outbox row.
    let applied = query(
        "SELECT partition, count(*), extract(epoch FROM max(at))::float8 FROM applied
         GROUP BY 1 ORDER BY 1",
    );
    match applied.await {
        Ok(rows) => {
            for row in rows {
                let (partition, count, last): (i32, i64, f64) =
                    (row.get(0), row.get(1), row.get(2));
                let last = SystemTime::UNIX_EPOCH + Duration::from_secs_f64(last);
                let _ = writeln!(
                    out,
                    "partition {partition}: {count} applied, the last at {}",
                    clock(last)
                );
            }
        }
        Err(error) => out.push_str(&format!("{error}\n")),
    }
    let missing = client.query(
        "SELECT (substr(o.key, 2)::int % $1)::int4,
                count(*) FILTER (WHERE e.seq <= k.published_seq),
                count(*) FILTER (WHERE e.seq > k.published_seq AND k.parked_at IS NULL),
                count(*) FILTER (WHERE e.seq > k.published_seq AND k.parked_at IS NOT NULL),
                count(*) FILTER (WHERE e.id IS NULL),
                extract(epoch FROM min(e.created_at))::float8
         FROM orders o
         LEFT JOIN idem_outbox e ON e.key = o.key AND e.payload = convert_to(o.id::text, 'UTF8')
         LEFT JOIN idem_outbox_keys k ON k.topic = e.topic AND k.key = e.key
         WHERE NOT EXISTS (SELECT 1 FROM applied a WHERE a.order_id = o.id)
         GROUP BY 1 ORDER BY 1",
        &[&(PARTITIONS as i32)],
    );
    match missing.await.map_err(|error| format!("never applied: {error}")) {
        Ok(rows) => {
            for row in rows {
                let partition: i32 = row.get(0);
                let counts: [i64; 4] = [row.get(1), row.get(2), row.get(3), row.get(4)];
                let first = row.get::<_, Option<f64>>(5).map_or_else(
                    || "-".to_owned(),
                    |at| clock(SystemTime::UNIX_EPOCH + Duration::from_secs_f64(at)),
                );
                let _ = writeln!(
                    out,
                    "partition {partition}: never applied: {} published, {} pending in the outbox, \
                     {} parked, {} with no outbox row; the first committed at {first}",
                    counts[0], counts[1], counts[2], counts[3]
                );
            }
        }
        Err(error) => out.push_str(&format!("{error}\n")),
    }
    let keys = query(
        "SELECT topic, key, enqueued_seq - published_seq, attempts, parked_at IS NOT NULL,
                coalesce(extract(epoch FROM retry_at - clock_timestamp())::float8, 0),
                coalesce(last_error, '')
         FROM idem_outbox_keys WHERE published_seq < enqueued_seq ORDER BY topic, key LIMIT 10",
    );
    match keys.await {
        Ok(rows) => {
            for row in rows {
                let (topic, key, pending): (String, String, i64) =
                    (row.get(0), row.get(1), row.get(2));
                let (attempts, parked, retry_in): (i32, bool, f64) =
                    (row.get(3), row.get(4), row.get(5));
                let error: String = row.get(6);
                let _ = writeln!(
                    out,
                    "outbox key {topic}/{key}: {pending} pending, {attempts} failed attempts, \
                     parked {parked}, due in {retry_in:.1} s, last error {error:?}"
                );
            }
        }
        Err(error) => out.push_str(&format!("{error}\n")),
    }
    out.push_str(&server.state().await);
    let relays = relays.iter_mut().enumerate().map(|(index, relay)| {
        (format!("relay {index}"), relay, dir.join(format!("relay{index}.log")))
    });
    let consumers = consumers.iter_mut().enumerate().map(|(partition, consumer)| {
        let log = dir.join(format!("consumer-p{partition}.log"));
        (format!("consumer of partition {partition}"), consumer, log)
    });
    for (name, child, log) in relays.chain(consumers) {
        let state = match child.0.try_wait() {
            Ok(None) => "alive".to_owned(),
            Ok(Some(status)) => format!("EXITED ({status})"),
            Err(error) => format!("unknown ({error})"),
        };
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let _ = writeln!(out, "{name} (pid {}): {state}; its last lines:", child.0.id());
        for line in &lines[lines.len().saturating_sub(4)..] {
            let _ = writeln!(out, "    {}", strip_ansi(line));
        }
    }
    let late = query(
        "SELECT count(*) FROM orders o
         WHERE NOT EXISTS (SELECT 1 FROM applied a WHERE a.order_id = o.id)",
    );
    if let Ok(rows) = late.await {
        let _ = writeln!(
            out,
            "still never applied now, after this diagnosis: {} (fewer: the rig stopped waiting \
             too early)",
            rows[0].get::<_, i64>(0)
        );
    }
    out
}

/// `at` as UTC hours, minutes, seconds and milliseconds, as the processes' logs print time.
fn clock(at: SystemTime) -> String {
    let since = at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let seconds = since.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60,
        since.subsec_millis()
    )
}

/// `line` without the terminal colour codes `tracing` writes.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ ... letter
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A child process killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(program: &Path, args: &[String], log: &Path) -> Result<Killed, String> {
    let log =
        std::fs::OpenOptions::new().create(true).append(true).open(log).map_err(err("log"))?;
    let child = Command::new(program)
        .args(args)
        .env("IDEM_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|error| format!("{}: {error}", program.display()))?;
    Ok(Killed(child))
}

/// Runs the scenario. When a guarantee failed, or always with `keep`, prints a diagnosis
/// and keeps the run's directory (the processes' logs, the diagnosis, the broker's data and
/// log).
pub async fn scenario(
    broker: Broker,
    size: Size,
    seed: u64,
    idem: &Path,
    keep: bool,
) -> Result<Report, String> {
    let dir = std::env::temp_dir()
        .join(format!("idem-chaos-{}-messaging-{broker:?}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(err("temp dir"))?;
    let postgres = PrivatePostgres::start(free_port()?)
        .ok_or("no PostgreSQL binaries to make a cluster with")?;
    let database = postgres.url();
    let server = BrokerServer::start(broker, &dir)?;
    let broker_url = server.url();

    let config: tokio_postgres::Config = database.parse().map_err(err("database URL"))?;
    let (mut client, connection) =
        config.connect(tokio_postgres::NoTls).await.map_err(err("connect"))?;
    tokio::spawn(connection);
    Outbox::migrate(&mut client).await.map_err(err("outbox tables"))?;
    Inbox::migrate(&mut client).await.map_err(err("inbox tables"))?;
    Offsets::migrate(&mut client).await.map_err(err("offsets table"))?;
    client
        .batch_execute(
            "CREATE TABLE orders (id bigint PRIMARY KEY, key text NOT NULL);
             CREATE TABLE applied (n bigserial PRIMARY KEY, partition int NOT NULL,
                 key text NOT NULL, seq bigint NOT NULL, order_id bigint NOT NULL,
                 at timestamptz NOT NULL DEFAULT clock_timestamp());",
        )
        .await
        .map_err(err("tables"))?;
    drop(client);
    server.prepare().await?;

    // A log per process (a restarted one appends to its predecessor's).
    let relay_log = |index: usize| dir.join(format!("relay{index}.log"));
    let consumer_log = |partition: usize| dir.join(format!("consumer-p{partition}.log"));
    let relay_args = vec![
        "relay".to_owned(),
        "--database".to_owned(),
        database.clone(),
        "--broker".to_owned(),
        broker_url.clone(),
        "--poll-interval".to_owned(),
        "200ms".to_owned(),
        // A key that failed to publish backs off, doubling up to 5 min by default: after
        // many broker crashes in a row (a RabbitMQ node takes seconds to come back) keys would
        // wait minutes after the last one, and the run would end before them. Capped here so
        // a run ends in minutes; the count of parked keys is reported.
        "--max-retry-backoff".to_owned(),
        "2s".to_owned(),
    ];
    let me = std::env::current_exe().map_err(err("this binary"))?;
    let consumer_args = |partition: usize| {
        vec!["consume".to_owned(), database.clone(), broker_url.clone(), partition.to_string()]
    };
    let mut relays = Vec::new();
    for index in 0..2 {
        relays.push(spawn(idem, &relay_args, &relay_log(index))?);
    }
    let mut consumers = Vec::new();
    for partition in 0..PARTITIONS {
        consumers.push(spawn(&me, &consumer_args(partition), &consumer_log(partition))?);
    }

    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_on_return = crate::StopOnDrop(Arc::clone(&stop));
    // When a partition's consumer was killed, or the broker crashed (true), until it was back.
    type Outage = (usize, SystemTime, SystemTime, bool);
    let kills: Arc<Mutex<Vec<Outage>>> = Arc::default();
    let faults: Arc<Mutex<HashMap<&'static str, u64>>> = Arc::default();
    // Each fault as it happened: when it began, when it was over, what it was.
    let timeline: Arc<Mutex<Vec<(SystemTime, SystemTime, String)>>> = Arc::default();
    let fault_thread = {
        let (stop, kills, faults, timeline, idem, me) = (
            Arc::clone(&stop),
            Arc::clone(&kills),
            Arc::clone(&faults),
            Arc::clone(&timeline),
            idem.to_path_buf(),
            me.clone(),
        );
        let relay_logs: Vec<_> = (0..2).map(relay_log).collect();
        let consumer_logs: Vec<_> = (0..PARTITIONS).map(consumer_log).collect();
        let consumer_args: Vec<Vec<String>> = (0..PARTITIONS).map(consumer_args).collect();
        let relay_args = relay_args.clone();
        let runtime = tokio::runtime::Handle::current();
        std::thread::spawn(move || -> Result<_, String> {
            // However this thread ends (a fault that failed included), the producers stop.
            let _stop_on_exit = crate::StopOnDrop(Arc::clone(&stop));
            let mut server = server;
            let mut rng = Rng::new(seed ^ 0x6d73_6766_6175_6c74);
            let mut broker_up_since = Instant::now();
            // On a cluster, node losses are the point of the run: half the faults, and a node
            // may go again 4 s after the last one came back (the others keep the quorum).
            let cluster = matches!(server, BrokerServer::NatsCluster(_));
            let (relay_to, consumer_to, broker_to) =
                if cluster { (19, 39, 89) } else { (29, 59, 79) };
            let broker_floor = Duration::from_secs(if cluster { 4 } else { 10 });
            let mut broker_min_up = broker_floor;
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1_000 + rng.below(2_000)));
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let pause = Duration::from_millis(200 + rng.below(800));
                let from = SystemTime::now();
                let mut which = String::new();
                let kind = match rng.below(100) {
                    roll if roll <= relay_to => {
                        let index = rng.below(relays.len() as u64) as usize;
                        let _ = relays[index].0.kill();
                        std::thread::sleep(pause);
                        relays[index] = spawn(&idem, &relay_args, &relay_logs[index])?;
                        which = format!(" (relay {index})");
                        "relay kill -9 and restart"
                    }
                    roll if roll <= consumer_to => {
                        let partition = rng.below(PARTITIONS as u64) as usize;
                        let _ = consumers[partition].0.kill();
                        let killed = SystemTime::now();
                        std::thread::sleep(pause);
                        consumers[partition] =
                            spawn(&me, &consumer_args[partition], &consumer_logs[partition])?;
                        let back = SystemTime::now();
                        kills.lock().unwrap().push((partition, killed, back, false));
                        which = format!(" (partition {partition})");
                        "consumer kill -9 and restart"
                    }
                    // The broker stays up at least 10 s (a cluster's nodes 4 s), and at least
                    // twice as long as its last restart took (a RabbitMQ node takes seconds,
                    // more on a loaded machine): crashed more often, it would be down most of
                    // the run.
                    roll if roll <= broker_to && broker_up_since.elapsed() >= broker_min_up => {
                        // Every partition's deliveries in flight may be lost with the broker
                        // (or with the node a consumer is connected to).
                        let crashed = SystemTime::now();
                        let restarting = Instant::now();
                        let kind = server.restart(&mut rng, &runtime)?;
                        broker_min_up = (restarting.elapsed() * 2).max(broker_floor);
                        broker_up_since = Instant::now();
                        let back = SystemTime::now();
                        let all = (0..PARTITIONS).map(|p| (p, crashed, back, true));
                        kills.lock().unwrap().extend(all);
                        kind
                    }
                    roll if roll <= broker_to => continue,
                    _ => {
                        postgres.stop("immediate");
                        std::thread::sleep(pause);
                        postgres.start_again();
                        "PostgreSQL crash and restart"
                    }
                };
                *faults.lock().unwrap().entry(kind).or_default() += 1;
                timeline.lock().unwrap().push((from, SystemTime::now(), format!("{kind}{which}")));
            }
            Ok((server, postgres, relays, consumers))
        })
    };

    // Producers: business row and event in one transaction; one in ten rolled back.
    let next = Arc::new(AtomicI64::new(1));
    let counts = Arc::new(Mutex::new((0i64, 0i64, 0i64)));
    let mut producers = Vec::new();
    for index in 0..8u64 {
        let (config, next, counts) = (config.clone(), Arc::clone(&next), Arc::clone(&counts));
        let stop = Arc::clone(&stop);
        let mut rng = Rng::new(seed ^ (index + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
        producers.push(tokio::spawn(async move {
            let mut client: Option<tokio_postgres::Client> = None;
            loop {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let done = match size {
                    Size::Seconds(seconds) => started.elapsed() >= seconds,
                    Size::Committed(committed) => counts.lock().unwrap().0 >= committed,
                };
                if done {
                    break;
                }
                let Some(connected) = client.as_mut().filter(|c| !c.is_closed()) else {
                    match config.connect(tokio_postgres::NoTls).await {
                        Ok((fresh, connection)) => {
                            tokio::spawn(connection);
                            client = Some(fresh);
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                    continue;
                };
                let id = next.fetch_add(1, Ordering::SeqCst);
                let key_index = rng.below(KEYS as u64) as usize;
                let key = format!("k{key_index}");
                let topic = topic(key_index % PARTITIONS);
                let roll_back = rng.below(10) == 0;
                let produced = async {
                    let transaction = connected.transaction().await?;
                    transaction
                        .execute("INSERT INTO orders (id, key) VALUES ($1, $2)", &[&id, &key])
                        .await?;
                    let payload = id.to_string();
                    let event = Event {
                        topic: &topic,
                        key: &key,
                        payload: payload.as_bytes(),
                        headers: &[],
                    };
                    Outbox::enqueue(&transaction, event)
                        .await
                        .map_err(|e| std::io::Error::other(e.to_string()))?;
                    if roll_back {
                        transaction.rollback().await?;
                    } else {
                        transaction.commit().await?;
                    }
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
                };
                let outcome = produced.await;
                let mut counts = counts.lock().unwrap();
                match outcome {
                    Ok(()) if roll_back => counts.1 += 1,
                    Ok(()) => counts.0 += 1,
                    Err(_) => counts.2 += 1,
                }
            }
        }));
    }
    for producer in producers {
        producer.await.map_err(err("producer"))?;
    }
    stop.store(true, Ordering::SeqCst);
    let (server, postgres, mut relays, mut consumers) =
        tokio::task::spawn_blocking(move || fault_thread.join())
            .await
            .map_err(err("fault thread"))?
            .map_err(|_| "the fault thread panicked".to_owned())??;
    let traffic = started.elapsed();

    // Wait for every committed event to be applied (or for the stream to go quiet).
    let (client, connection) =
        config.connect(tokio_postgres::NoTls).await.map_err(err("connect after"))?;
    tokio::spawn(connection);
    let count = |sql: &'static str| {
        let client = &client;
        async move {
            client.query_one(sql, &[]).await.map(|row| row.get::<_, i64>(0)).map_err(err("count"))
        }
    };
    let quiet_since = Instant::now();
    let mut last = -1;
    let mut last_change = Instant::now();
    let waited = loop {
        let missing = count(
            "SELECT count(*) FROM orders o WHERE NOT EXISTS (SELECT 1 FROM applied a WHERE a.order_id = o.id)",
        )
        .await?;
        if missing == 0 {
            break format!("all applied after {:.0} s", quiet_since.elapsed().as_secs_f64());
        }
        if missing != last {
            last = missing;
            last_change = Instant::now();
        }
        // A minute: an ordered consumer whose cluster node died is noticed by async-nats only
        // when its pull expires (about 35 s).
        if last_change.elapsed() > Duration::from_secs(60)
            || quiet_since.elapsed() > Duration::from_secs(1_800)
        {
            break format!(
                "gave up after {:.0} s with {missing} missing, unchanged for {:.0} s",
                quiet_since.elapsed().as_secs_f64(),
                last_change.elapsed().as_secs_f64()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // A moment more for a late copy, then the verdict.
    tokio::time::sleep(ACK_WAIT + Duration::from_secs(1)).await;
    let (committed, rolled_back, producer_errors) = *counts.lock().unwrap();
    let mut report = Report {
        broker: broker.name(),
        seconds: traffic.as_secs_f64(),
        committed,
        rolled_back,
        producer_errors,
        faults: faults.lock().unwrap().clone(),
        offsets_partition: broker.offsets_partition(),
        ..Report::default()
    };
    report.applied_rows = count("SELECT count(*) FROM applied").await?;
    // Committed, never applied, per partition (a key `k{i}` is partition i % PARTITIONS).
    let by_partition = client
        .query(
            "SELECT (substr(o.key, 2)::int % $1)::int4, count(*) FROM orders o
             WHERE NOT EXISTS (SELECT 1 FROM applied a WHERE a.order_id = o.id) GROUP BY 1 ORDER BY 1",
            &[&(PARTITIONS as i32)],
        )
        .await
        .map_err(err("never applied by partition"))?;
    report.never_applied_by_partition =
        by_partition.iter().map(|row| (row.get(0), row.get(1))).collect();
    report.never_applied = report.never_applied_by_partition.iter().map(|(_, n)| n).sum();
    report.applied_twice = count(
        "SELECT count(*) FROM (SELECT order_id FROM applied GROUP BY order_id HAVING count(*) > 1) twice",
    )
    .await?;
    report.applied_not_committed = count(
        "SELECT count(*) FROM applied a WHERE NOT EXISTS (SELECT 1 FROM orders o WHERE o.id = a.order_id)",
    )
    .await?;
    report.dead_letters = count("SELECT count(*) FROM idem_dead_letters").await?;
    report.parked_keys =
        count("SELECT count(*) FROM idem_outbox_keys WHERE parked_at IS NOT NULL").await?;
    // Key order: each key's seqs, in the order they were applied, must rise.
    let inversions = client
        .query(
            "SELECT partition, extract(epoch FROM at)::float8 FROM (
                 SELECT partition, at, seq, lag(seq) OVER (PARTITION BY key ORDER BY n) AS before
                 FROM applied) ordered
             WHERE before IS NOT NULL AND seq <= before",
            &[],
        )
        .await
        .map_err(err("order"))?;
    let kills = kills.lock().unwrap().clone();
    for row in inversions {
        let (partition, at): (i32, f64) = (row.get(0), row.get(1));
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs_f64(at);
        // A killed consumer's unacknowledged messages come back after the ack wait, possibly
        // after newer ones of the same key: the documented limit. So do messages the broker
        // delivered just before it crashed, whose delivery the consumer never received.
        // From the kill or crash until a few ack waits after the process is back.
        let after = |broker: bool| {
            kills.iter().any(|(killed, from, back, by_broker)| {
                *by_broker == broker
                    && *killed == partition as usize
                    && *from <= at
                    && at.duration_since(*back).unwrap_or_default() < ACK_WAIT * 5
            })
        };
        if report.offsets_partition == Some(partition as usize) {
            report.out_of_order_offsets_mode += 1;
        } else if after(false) {
            report.out_of_order_after_consumer_kill += 1;
        } else if after(true) {
            report.out_of_order_after_broker_crash += 1;
        } else {
            report.out_of_order_other += 1;
        }
    }
    if !report.clean() || keep {
        let timeline = timeline.lock().unwrap().clone();
        let found =
            diagnose(&client, &server, &mut relays, &mut consumers, &dir, &timeline, &waited).await;
        eprintln!("{found}");
        let _ = std::fs::write(dir.join("diagnosis.txt"), &found);
    }
    drop((relays, consumers, server, postgres));
    if report.clean() && !keep {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("idem-chaos: the processes' and the broker's logs are kept in {}", dir.display());
    }
    Ok(report)
}

/// `idem-chaos consume DATABASE BROKER PARTITION`: applies partition PARTITION's events
/// through the inbox, one row in `applied` per first delivery, in the inbox's transaction.
/// The broker is chosen by the URL's scheme: `nats://`, `redis://` or `amqp://`.
pub async fn consume(database: &str, broker: &str, partition: usize) -> Result<(), String> {
    let topic = topic(partition);
    match broker.split_once("://").map_or("", |(scheme, _)| scheme) {
        "nats" if partition == OFFSETS_PARTITION => {
            let offsets = Offsets::new(format!("chaos-p{partition}")).map_err(err("offsets"))?;
            let subscription = retrying(async || {
                let config: tokio_postgres::Config = database.parse().map_err(err("database"))?;
                let (client, connection) =
                    config.connect(tokio_postgres::NoTls).await.map_err(err("connect"))?;
                tokio::spawn(connection);
                let positions = offsets.positions(&client).await.map_err(err("positions"))?;
                let from = positions.get(&topic).copied().unwrap_or(0);
                let stream = nats_stream(broker, partition).await?;
                JetStreamPartitions::start(&stream, [(topic.clone(), from)])
                    .await
                    .map_err(err("ordered consumer"))
            })
            .await?;
            consume_from(subscription, database, partition, Dedupe::Offsets(offsets)).await
        }
        "nats" => {
            let subscription = retrying(async || {
                let stream = nats_stream(broker, partition).await?;
                JetStreamSubscription::durable(&stream, "chaos", ACK_WAIT)
                    .await
                    .map_err(err("consumer"))
            })
            .await?;
            consume_from(subscription, database, partition, inbox(partition)?).await
        }
        "redis" => {
            let client = redis::Client::open(broker).map_err(err("redis URL"))?;
            // A name of its own per process, as a restarted pod gets: what a killed consumer
            // held is claimed once idle past the ack wait.
            let name = format!("c{}", std::process::id());
            let subscription = retrying(async || {
                RedisStreamsSubscription::join(&client, &topic, "chaos", &name, ACK_WAIT)
                    .await
                    .map_err(err("consumer group"))
            })
            .await?;
            consume_from(subscription, database, partition, inbox(partition)?).await
        }
        "amqp" => {
            let subscription = retrying(async || {
                RabbitSubscription::consume(broker, &topic, 32).await.map_err(err("queue"))
            })
            .await?;
            consume_from(subscription, database, partition, inbox(partition)?).await
        }
        other => Err(format!("no broker for the scheme {other:?}")),
    }
}

/// How a consumer tells a first delivery from a copy: by message id in the inbox, or by
/// stream position (the offsets mode).
#[derive(Clone)]
enum Dedupe {
    Inbox(Inbox),
    Offsets(Offsets),
}

fn inbox(partition: usize) -> Result<Dedupe, String> {
    Inbox::new(format!("chaos-p{partition}")).map(Dedupe::Inbox).map_err(err("inbox"))
}

/// Partition `partition`'s stream on the JetStream at `broker` (one server or a cluster).
async fn nats_stream(
    broker: &str,
    partition: usize,
) -> Result<async_nats::jetstream::stream::Stream, String> {
    let client = idem_stream::nats::connect(broker).await.map_err(err("nats"))?;
    let jetstream = async_nats::jetstream::new(client);
    jetstream.get_stream(format!("CHAOS{partition}")).await.map_err(err("stream"))
}

/// `attempt` until it succeeds: started while the broker, a node of a cluster or the database
/// restarts, a consumer may find no leader or no server for a few seconds, and is tried again as a
/// supervisor would restart it (for ever: one that never starts shows as events never applied).
async fn retrying<T>(mut attempt: impl AsyncFnMut() -> Result<T, String>) -> Result<T, String> {
    loop {
        match attempt().await {
            Ok(done) => return Ok(done),
            Err(error) => {
                eprintln!("idem-chaos consume: not started yet: {error}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

async fn consume_from<S: Subscription>(
    subscription: S,
    database: &str,
    partition: usize,
    dedupe: Dedupe,
) -> Result<(), String> {
    let config: tokio_postgres::Config = database.parse().map_err(err("database URL"))?;
    let pool = deadpool_postgres::Pool::builder(deadpool_postgres::Manager::new(
        config,
        tokio_postgres::NoTls,
    ))
    .max_size(16)
    .build()
    .map_err(err("pool"))?;
    let dead_letters = Arc::new(
        DeadLetters::new(pool.clone(), format!("chaos-p{partition}"))
            .map_err(err("dead letters"))?,
    );
    // The offsets mode reads one partition in stream order: handled in that order.
    let order_by = match dedupe {
        Dedupe::Inbox(_) => OrderBy::default_key(),
        Dedupe::Offsets(_) => OrderBy::Subject,
    };
    let handler = move |message: Received| {
        let (pool, dedupe) = (pool.clone(), dedupe.clone());
        async move { apply(pool, dedupe, partition, message).await }
    };
    let config = RunnerConfig { concurrency: 16, order_by, ..RunnerConfig::default() };
    consume::run(subscription, handler, dead_letters, config, std::future::pending()).await;
    Ok(())
}

async fn apply(
    pool: deadpool_postgres::Pool,
    dedupe: Dedupe,
    partition: usize,
    message: Received,
) -> Result<(), Failure> {
    let header = |name: &str| {
        message.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone())
    };
    let key = header("Idem-Key").ok_or_else(|| Failure::rejected("no Idem-Key"))?;
    let seq: i64 = header("Idem-Seq")
        .and_then(|seq| seq.parse().ok())
        .ok_or_else(|| Failure::rejected("no Idem-Seq"))?;
    let order_id: i64 = std::str::from_utf8(&message.payload)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| Failure::rejected("the payload is not an order id"))?;
    let unavailable = |error: tokio_postgres::Error| Failure::Unavailable(error.to_string());
    let mut client = pool.get().await.map_err(|e| Failure::Unavailable(e.to_string()))?;
    let transaction = client.transaction().await.map_err(unavailable)?;
    let partition = partition as i32;
    let record = || async {
        transaction
            .execute(
                "INSERT INTO applied (partition, key, seq, order_id) VALUES ($1, $2, $3, $4)",
                &[&partition, &key, &seq, &order_id],
            )
            .await
    };
    let first = match &dedupe {
        Dedupe::Inbox(inbox) => {
            match inbox.apply(&transaction, &message.id, record()).await.map_err(Failure::from)? {
                Applied::First(result) => result.map(|_| true).map_err(unavailable)?,
                Applied::Duplicate => false,
            }
        }
        Dedupe::Offsets(offsets) => {
            let position =
                message.position.ok_or_else(|| Failure::rejected("no stream position"))?;
            let delivery = offsets.advance(&transaction, &message.subject, position).await;
            match delivery.map_err(Failure::from)? {
                Delivery::First => record().await.map(|_| true).map_err(unavailable)?,
                Delivery::Duplicate => false,
            }
        }
    };
    match first {
        true => transaction.commit().await.map_err(unavailable),
        false => transaction.rollback().await.map_err(unavailable),
    }
}
