//! What idempotency costs, measured side by side in one run: the same upstream called
//! directly, through nginx (when installed) and through the `idem` gateway on each store, at
//! fixed concurrency and at a fixed rate, in alternating rounds so that machine drift hits
//! every configuration alike.
//!
//! Run with:
//! `cargo build --release -p idem -p idem-bench && target/release/idem-bench`
//! (writes docs/BENCHMARKS.md), or `--quick` for a smoke run in well under a minute.

mod floor;
mod load;
mod messaging;
mod procs;
mod report;
mod scaling;
mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use load::{Keys, Outcome, Plan};
use procs::{Gateway, Nginx};

#[derive(Debug, Parser)]
#[command(
    name = "idem-bench",
    about = "Side-by-side benchmark of idem against direct calls and nginx"
)]
struct Args {
    /// A smoke run: short rounds, checks the harness works (not the numbers); under a minute
    #[arg(long)]
    quick: bool,
    /// Length of each measured run
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Alternating rounds over all configurations
    #[arg(long)]
    rounds: Option<usize>,
    /// Connections for the fixed-concurrency runs
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Work per request in the upstream, e.g. 0ms or 2ms
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    delay: Duration,
    /// Also measure idem on this PostgreSQL (a schema `idem_bench` is used)
    #[arg(long, env = "IDEM_BENCH_POSTGRES_URL")]
    postgres: Option<String>,
    /// Also measure idem on this Redis (keys prefixed `idem_bench`)
    #[arg(long, env = "IDEM_BENCH_REDIS_URL")]
    redis: Option<String>,
    /// With --postgres: also measure the messaging side (inbox consumer, outbox relay) on
    /// this NATS JetStream
    #[arg(long, env = "IDEM_BENCH_NATS_URL")]
    nats: Option<String>,
    /// Messages per messaging run [default: 20000, 1000 with --quick]
    #[arg(long)]
    messages: Option<usize>,
    /// Only the messaging rows (needs --postgres and --nats), printed, no report written
    #[arg(long)]
    messaging_only: bool,
    /// The idem binary [default: beside this one]
    #[arg(long)]
    idem: Option<PathBuf>,
    /// Where to write the Markdown report [default: docs/BENCHMARKS.md, none with --quick]
    #[arg(long)]
    output: Option<PathBuf>,
    /// Connections held open for the memory check
    #[arg(long)]
    hold: Option<usize>,
}

/// One row of the report: what is measured and what it accumulated.
#[derive(Debug)]
pub struct Config {
    pub name: String,
    pub scenario: Scenario,
    pub target: SocketAddr,
    /// The process whose CPU and memory the row reports, and its admin listener if idem.
    pub pid: Option<u32>,
    pub admin: Option<SocketAddr>,
    /// The key prefix; replays cycle over keys stored under it before the rounds.
    prefix: String,
    pub closed: Outcome,
    /// Requests per second in each round at fixed concurrency.
    pub per_round: Vec<f64>,
    /// At a fixed rate, half of this configuration's own maximum.
    pub open: Option<Outcome>,
    /// Pass-through at that same rate, run right after, for the latency idem adds.
    pub paired: Option<Outcome>,
    pub rate: f64,
    pub cpu_seconds: f64,
    pub round_trips: f64,
    pub upstream_calls: u64,
    pub keys_used: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    Direct,
    Nginx,
    PassThrough,
    Fresh,
    Replay,
    Race,
}

const REPLAY_KEYS: u64 = 1_000;
const RACE_GROUP: u64 = 16;

impl Config {
    fn new(
        name: impl Into<String>,
        scenario: Scenario,
        target: SocketAddr,
        pid: Option<u32>,
        admin: Option<SocketAddr>,
        tag: &str,
        index: usize,
    ) -> Self {
        Self {
            name: name.into(),
            scenario,
            target,
            pid,
            admin,
            prefix: format!("{tag}-c{index}"),
            closed: Outcome::default(),
            per_round: Vec::new(),
            open: None,
            paired: None,
            rate: 0.0,
            cpu_seconds: 0.0,
            round_trips: 0.0,
            upstream_calls: 0,
            keys_used: 0,
        }
    }

    fn keys(&self, round: usize, phase: &str) -> Keys {
        match self.scenario {
            Scenario::Direct | Scenario::Nginx | Scenario::PassThrough => Keys::None,
            Scenario::Fresh => Keys::Fresh(format!("{}-{phase}{round}", self.prefix)),
            Scenario::Replay => Keys::Cycle(self.prefix.clone(), REPLAY_KEYS),
            Scenario::Race => Keys::Race(format!("{}-{phase}{round}", self.prefix), RACE_GROUP),
        }
    }
}

/// `duration` at `rate` requests per second, with enough connections to keep up.
async fn open_loop(
    config: &Config,
    round: usize,
    rate: f64,
    concurrency: usize,
    duration: Duration,
) -> Outcome {
    load::run(Plan {
        target: config.target,
        also: Vec::new(),
        keys: config.keys(round, &format!("r{}-", rate as u64)),
        connections: concurrency * 4,
        duration,
        rate: Some(rate),
        max_requests: None,
    })
    .await
}

fn merge(slot: &mut Option<Outcome>, outcome: Outcome) {
    match slot {
        Some(existing) => existing.merge(outcome),
        None => *slot = Some(outcome),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("idem-bench: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let quick = args.quick;
    let duration = args.duration.unwrap_or(if quick {
        Duration::from_millis(500)
    } else {
        Duration::from_secs(5)
    });
    let rounds = args.rounds.unwrap_or(if quick { 2 } else { 3 }).max(1);
    if args.messaging_only {
        let (Some(postgres), Some(nats)) = (&args.postgres, &args.nats) else {
            return Err("--messaging-only needs --postgres and --nats".into());
        };
        let messages = args.messages.unwrap_or(if quick { 1_000 } else { 20_000 }).max(1);
        let results = messaging::run(postgres, nats, messages, rounds).await?;
        print!("{}", report::messaging_section(&results));
        return Ok(());
    }
    let hold = args.hold.unwrap_or(if quick { 200 } else { 1_000 });
    let idem = match args.idem.clone() {
        Some(path) => path,
        None => std::env::current_exe().map_err(|error| error.to_string())?.with_file_name("idem"),
    };
    if !idem.exists() {
        return Err(format!(
            "no idem binary at {}; build it first (cargo build --release -p idem) or pass --idem PATH",
            idem.display()
        ));
    }
    let scratch = std::env::temp_dir().join(format!("idem-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(|error| error.to_string())?;
    let tag = format!(
        "bench{}x{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis()
    );

    let upstream =
        upstream::Upstream::start(args.delay).map_err(|error| format!("upstream: {error}"))?;
    eprintln!("upstream on {} (work per request: {:?})", upstream.addr, args.delay);

    let mut gateways: Vec<(&'static str, Gateway)> = Vec::new();
    let sqlite = format!("sqlite://{}", scratch.join("idem.db").display());
    let sqlite_normal =
        format!("sqlite://{}?synchronous=normal", scratch.join("idem-normal.db").display());
    let mut stores: Vec<(&'static str, String)> = vec![
        ("memory", "memory://".into()),
        ("sqlite", sqlite),
        ("sqlite, synchronous=normal", sqlite_normal),
    ];
    if let Some(url) = &args.postgres {
        let schemas = ["idem_bench", "idem_bench_single", "idem_bench_scaling"];
        floor::drop_schemas(url, &schemas).await?;
        let separator = if url.contains('?') { '&' } else { '?' };
        stores.push(("postgres", format!("{url}{separator}schema=idem_bench")));
        // Group commit off (it is on by default): one statement per claim and completion.
        stores.push((
            "postgres, batch_writers=0",
            format!("{url}{separator}schema=idem_bench_single&batch_writers=0"),
        ));
    }
    if let Some(url) = &args.redis {
        let separator = if url.contains('?') { '&' } else { '?' };
        stores.push(("redis", format!("{url}{separator}prefix=idem_bench")));
    }
    for (name, url) in &stores {
        gateways.push((name, Gateway::start(&idem, upstream.addr, url)?));
    }
    let nginx = match Nginx::find() {
        Some(path) => Some(Nginx::start(&path, upstream.addr, scratch.join("nginx"))?),
        None => {
            eprintln!(
                "nginx not found: the nginx row is skipped (apt-get install nginx-light to include it)"
            );
            None
        }
    };

    let memory = &gateways[0].1;
    let mut configs = vec![Config::new(
        "direct to the upstream",
        Scenario::Direct,
        upstream.addr,
        None,
        None,
        &tag,
        0,
    )];
    if let Some(nginx) = &nginx {
        configs.push(Config::new(
            "nginx (plain reverse proxy)",
            Scenario::Nginx,
            nginx.addr,
            Some(nginx.pid()),
            None,
            &tag,
            1,
        ));
    }
    configs.push(Config::new(
        "idem, no key (pass-through)",
        Scenario::PassThrough,
        memory.addr,
        Some(memory.pid()),
        Some(memory.admin),
        &tag,
        2,
    ));
    for (index, (name, gateway)) in gateways.iter().enumerate() {
        configs.push(Config::new(
            format!("idem, fresh key, {name}"),
            Scenario::Fresh,
            gateway.addr,
            Some(gateway.pid()),
            Some(gateway.admin),
            &tag,
            10 + index,
        ));
    }
    for (index, (name, gateway)) in
        gateways.iter().enumerate().filter(|(_, (name, _))| !name.contains("synchronous"))
    {
        configs.push(Config::new(
            format!("idem, replay, {name}"),
            Scenario::Replay,
            gateway.addr,
            Some(gateway.pid()),
            Some(gateway.admin),
            &tag,
            20 + index,
        ));
    }
    let (race_store, race_gateway) =
        gateways.iter().find(|(name, _)| *name == "sqlite").expect("sqlite gateway");
    configs.push(Config::new(
        format!("idem, race of {RACE_GROUP} per key, {race_store}"),
        Scenario::Race,
        race_gateway.addr,
        Some(race_gateway.pid()),
        Some(race_gateway.admin),
        &tag,
        30,
    ));

    // Store the keys the replay rows cycle over, and warm every configuration up.
    for config in configs.iter().filter(|config| config.scenario == Scenario::Replay) {
        let stored = load::run(Plan {
            target: config.target,
            also: Vec::new(),
            keys: Keys::Fresh(config.prefix.clone()),
            connections: 16,
            duration: Duration::from_secs(60),
            rate: None,
            max_requests: Some(REPLAY_KEYS),
        })
        .await;
        if stored.requests() != REPLAY_KEYS || stored.errors > 0 {
            return Err(format!("could not store the replay keys for {}: {stored:?}", config.name));
        }
    }
    for config in &configs {
        load::run(Plan {
            target: config.target,
            also: Vec::new(),
            keys: config.keys(0, "warm"),
            connections: args.concurrency,
            duration: duration.min(Duration::from_millis(500)),
            rate: None,
            max_requests: None,
        })
        .await;
    }

    // The floor pgbench sets on the same server, run in each round beside the HTTP rows.
    let floor = match (&args.postgres, floor::find()) {
        (Some(url), Some(pgbench)) => {
            floor::prepare(url).await.map_err(|error| format!("pgbench floor table: {error}"))?;
            Some((pgbench, url.clone()))
        }
        (Some(_), None) => {
            eprintln!("pgbench not found: the PostgreSQL floor row is skipped");
            None
        }
        _ => None,
    };
    let mut floor_rounds = Vec::new();
    eprintln!(
        "fixed concurrency: {} connections, {rounds} rounds of {duration:?} per configuration",
        args.concurrency
    );
    for round in 0..rounds {
        for config in &mut configs {
            let cpu_before = config.pid.map(procs::cpu_seconds).unwrap_or(0.0);
            let trips_before = match config.admin {
                Some(admin) => procs::store_round_trips(admin).await,
                None => 0.0,
            };
            let calls_before = upstream.calls();
            let outcome = load::run(Plan {
                target: config.target,
                also: Vec::new(),
                keys: config.keys(round, "c"),
                connections: args.concurrency,
                duration,
                rate: None,
                max_requests: None,
            })
            .await;
            config.upstream_calls += upstream.calls() - calls_before;
            if config.scenario == Scenario::Race {
                config.keys_used += outcome.indices.div_ceil(RACE_GROUP);
            }
            config.cpu_seconds += config.pid.map(procs::cpu_seconds).unwrap_or(0.0) - cpu_before;
            if let Some(admin) = config.admin {
                config.round_trips += procs::store_round_trips(admin).await - trips_before;
            }
            let round_rps = outcome.requests() as f64 / outcome.elapsed.as_secs_f64();
            eprintln!("  round {}: {:<40} {:>8.0} req/s", round + 1, config.name, round_rps);
            config.per_round.push(round_rps);
            config.closed.merge(outcome);
        }
        if let Some((pgbench, url)) = &floor {
            match floor::run(pgbench, url, &scratch, args.concurrency, duration).await {
                Ok(tps) => {
                    eprintln!("  round {}: {:<40} {tps:>8.0} req/s", round + 1, "pgbench floor");
                    floor_rounds.push(tps);
                }
                Err(error) => return Err(error),
            }
        }
    }

    // Each configuration at half of its own maximum; the idempotent ones each paired with
    // pass-through at the same rate, run right after it, for the latency idem adds.
    let pass_through = configs
        .iter()
        .position(|config| config.scenario == Scenario::PassThrough)
        .expect("a pass-through row");
    for config in configs.iter_mut().filter(|config| config.scenario != Scenario::Race) {
        config.rate =
            (config.closed.requests() as f64 / config.closed.elapsed.as_secs_f64() / 2.0).max(50.0);
    }
    eprintln!("fixed rate: each configuration at half of its own maximum");
    for round in 0..rounds {
        for index in 0..configs.len() {
            if configs[index].scenario == Scenario::Race {
                continue;
            }
            let rate = configs[index].rate;
            let outcome = open_loop(&configs[index], round, rate, args.concurrency, duration).await;
            merge(&mut configs[index].open, outcome);
            if matches!(configs[index].scenario, Scenario::Fresh | Scenario::Replay) {
                let paired =
                    open_loop(&configs[pass_through], round, rate, args.concurrency, duration)
                        .await;
                merge(&mut configs[index].paired, paired);
            }
        }
    }

    // Several gateways on one store: total throughput with 1, 2 and 3 of them.
    let mut scaling = Vec::new();
    for (name, url) in &stores {
        let shared = match *name {
            "postgres" => url.replace("schema=idem_bench", "schema=idem_bench_scaling"),
            "redis" => url.replace("prefix=idem_bench", "prefix=idem_bench_scaling"),
            _ => continue,
        };
        let run = scaling::Plan { idem: &idem, upstream: upstream.addr, store: &shared };
        scaling.push((*name, scaling::run(run, args.concurrency, duration, rounds, &tag).await?));
    }
    // And a Redis Cluster of the run's own (three masters, a replica each), beside one Redis.
    if args.redis.is_some() {
        match idem_core::conformance::RedisCluster::start() {
            Some(cluster) => {
                let shared = cluster.url("prefix=idem_bench_scaling");
                let run = scaling::Plan { idem: &idem, upstream: upstream.addr, store: &shared };
                let measured = scaling::run(run, args.concurrency, duration, rounds, &tag).await?;
                scaling.push(("redis cluster (3 masters)", measured));
            }
            None => eprintln!("redis-server not found: the Redis Cluster scaling row is skipped"),
        }
    }

    // Memory with many keep-alive connections, on a gateway of its own: the others hold every
    // record the runs above stored, which says nothing about connections.
    let fresh = Gateway::start(&idem, upstream.addr, "memory://")?;
    let (held, failed) = load::hold_connections(fresh.addr, hold).await;
    let held_rss_kib = procs::memory_kib(fresh.pid(), "VmRSS:");
    let peak_rss_kib = procs::memory_kib(fresh.pid(), "VmHWM:");
    drop(held);
    drop(fresh);

    let messaging = match (&args.postgres, &args.nats) {
        (Some(postgres), Some(nats)) => {
            let messages = args.messages.unwrap_or(if quick { 1_000 } else { 20_000 }).max(1);
            eprintln!(
                "messaging: {messages} messages per run, batches of {}, {rounds} rounds",
                messaging::BATCH
            );
            Some(messaging::run(postgres, nats, messages, rounds).await)
        }
        _ => {
            eprintln!("messaging skipped: it needs both --postgres and --nats");
            None
        }
    };

    let mut report = report::Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        configs: &mut configs,
        concurrency: args.concurrency,
        duration,
        rounds,
        delay: args.delay,
        hold,
        hold_failed: failed,
        held_rss_kib,
        peak_rss_kib,
        nginx_found: nginx.is_some(),
        gateways: gateways
            .iter()
            .map(|(name, gateway)| (*name, procs::memory_kib(gateway.pid(), "VmHWM:")))
            .collect(),
        messaging: messaging.as_ref().and_then(|result| result.as_ref().ok()),
        floor: (!floor_rounds.is_empty()).then_some(floor_rounds),
        scaling,
    };
    let mut problems = report.harness_problems();
    if let Some(Err(error)) = &messaging {
        problems.push(format!("messaging: {error}"));
    }
    let markdown = report.markdown();
    let svg = report.svg();
    match args.output.clone().or_else(|| (!quick).then(|| PathBuf::from("docs/BENCHMARKS.md"))) {
        Some(path) => {
            let svg_path = path.with_extension("svg");
            std::fs::write(&svg_path, svg)
                .map_err(|error| format!("{}: {error}", svg_path.display()))?;
            std::fs::write(&path, &markdown)
                .map_err(|error| format!("{}: {error}", path.display()))?;
            eprintln!("wrote {} and {}", path.display(), svg_path.display());
        }
        None => print!("{markdown}"),
    }
    if let Some((_, url)) = &floor {
        floor::drop_table(url).await;
    }
    let _ = std::fs::remove_dir_all(&scratch);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("the harness did not work as it should:\n  {}", problems.join("\n  ")))
    }
}
