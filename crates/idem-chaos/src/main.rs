//! `idem-chaos`: gateways, stores and an upstream of the rig's own, broken on a schedule drawn
//! from a seed, under clients that retry as real ones do; then every effect is counted and
//! every guarantee checked. Exits non-zero on any violation, printing the seed.

mod messaging;
mod servers;
mod upstream;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use servers::{Gateway, LEASE, Store, StoreKind};
use upstream::Upstream;

#[derive(Debug, Parser)]
#[command(
    name = "idem-chaos",
    about = "Breaks gateways, stores and the upstream under retrying clients, then counts effects and checks idem's guarantees"
)]
struct Args {
    /// About two minutes: 20 s of traffic and faults per store
    #[arg(long, conflicts_with = "full")]
    quick: bool,
    /// Until --requests requests were sent on each store
    #[arg(long)]
    full: bool,
    /// The seed the faults, the upstream's answers and the clients' choices come from
    /// [default: the time]
    #[arg(long)]
    seed: Option<u64>,
    /// Stores to run the HTTP scenario on, in turn
    #[arg(long, value_enum, value_delimiter = ',', default_value = "postgres,redis,sqlite")]
    stores: Vec<StoreKind>,
    /// Brokers to run the messaging scenario on, in turn
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "nats,nats-cluster,redis,rabbitmq"
    )]
    brokers: Vec<messaging::Broker>,
    /// Skip the messaging scenario (outbox, relays, a broker, consumers through the inbox)
    #[arg(long)]
    no_messaging: bool,
    /// Skip the HTTP scenario
    #[arg(long)]
    no_http: bool,
    /// Seconds of traffic per store [default: 60, 20 with --quick]
    #[arg(long, value_parser = parse_seconds)]
    seconds: Option<Duration>,
    /// Requests per store with --full
    #[arg(long, default_value_t = 1_000_000)]
    requests: u64,
    /// Committed transactions (each with one event) per broker with --full
    #[arg(long, default_value_t = 1_000_000)]
    messages: i64,
    /// Clients sending at once [default: 32, 256 with --full]
    #[arg(long)]
    clients: Option<usize>,
    /// An extra argument for every `idem serve` (repeatable), e.g. --gateway-arg=--unknown-outcome=release
    #[arg(long, allow_hyphen_values = true)]
    gateway_arg: Vec<String>,
    /// Diagnose every messaging run and keep its directory (the processes' logs, the
    /// diagnosis, the broker's data and log), not only a failed one's
    #[arg(long)]
    keep: bool,
    /// The idem binary [default: beside this one]
    #[arg(long)]
    idem: Option<PathBuf>,
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    text.parse::<u64>().map(Duration::from_secs).map_err(|e| format!("{text}: {e}"))
}

/// Sets its flag when dropped: a thread watching it winds down on any return.
#[derive(Debug)]
pub struct StopOnDrop(pub Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A small seedable generator (SplitMix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Callers sharing the gateways: the same key strings are used by each of them.
const SCOPES: u64 = 3;

/// After an execution, by when its gateway has stored the outcome: the slowest answer
/// (3.7 s), a store pause (2 s), and a margin.
const OUTCOME_STORED_WITHIN: Duration = Duration::from_secs(8);

fn report_long_outages(outages: &[(Instant, Instant)]) {
    for (from, to) in outages {
        if *to - *from >= LEASE / 2 {
            eprintln!("idem-chaos: the store was down for {:?}, half a lease or more", *to - *from);
        }
    }
}

fn main() -> ExitCode {
    // The messaging scenario's consumers are this binary: `idem-chaos consume DB NATS N`.
    let raw: Vec<String> = std::env::args().collect();
    if raw.get(1).map(String::as_str) == Some("consume") && raw.len() == 5 {
        let partition = raw[4].parse().unwrap_or(0);
        // The runner's and adapters' warnings go to the scenario's process log.
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_env("IDEM_LOG"))
            .with_ansi(false)
            .with_writer(std::io::stderr)
            .init();
        let runtime = tokio::runtime::Runtime::new().expect("a runtime");
        return match runtime.block_on(messaging::consume(&raw[2], &raw[3], partition)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("idem-chaos consume: {error}");
                ExitCode::FAILURE
            }
        };
    }
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |since| since.as_nanos() as u64)
    });
    let idem = args.idem.clone().unwrap_or_else(|| {
        std::env::current_exe().expect("this binary's path").with_file_name("idem")
    });
    if !idem.exists() {
        eprintln!(
            "idem-chaos: no idem binary at {}; build it (cargo build --release -p idem) or pass --idem PATH",
            idem.display()
        );
        return ExitCode::from(2);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let replay = replay_command(seed);
    println!("idem-chaos: seed {seed}; replay with: {replay}");
    let mut failed = false;
    let stores = if args.no_http { &[][..] } else { &args.stores[..] };
    for (index, kind) in stores.iter().enumerate() {
        let store_seed = seed.wrapping_add(index as u64 * 0x1000_0000);
        match runtime.block_on(scenario(&args, *kind, store_seed, &idem)) {
            Ok(report) => {
                println!("{report}");
                failed |= !report.clean();
            }
            Err(error) => {
                eprintln!("idem-chaos: the {kind:?} scenario could not run: {error}");
                failed = true;
            }
        }
    }
    let brokers = if args.no_messaging { &[][..] } else { &args.brokers[..] };
    for (index, broker) in brokers.iter().enumerate() {
        let size = if args.full {
            messaging::Size::Committed(args.messages)
        } else {
            let seconds = Duration::from_secs(if args.quick { 20 } else { 60 });
            messaging::Size::Seconds(args.seconds.unwrap_or(seconds))
        };
        let broker_seed = seed.wrapping_add(index as u64 * 0x1000_0000);
        match runtime.block_on(messaging::scenario(*broker, size, broker_seed, &idem, args.keep)) {
            Ok(report) => {
                println!("{report}");
                failed |= !report.clean();
            }
            Err(error) => {
                eprintln!(
                    "idem-chaos: the messaging scenario on {broker:?} could not run: {error}"
                );
                failed = true;
            }
        }
    }
    if failed {
        eprintln!("idem-chaos: VIOLATIONS with seed {seed}; replay with: {replay}");
        ExitCode::FAILURE
    } else {
        println!("idem-chaos: every guarantee held (seed {seed})");
        ExitCode::SUCCESS
    }
}

/// This run's command line with its seed: the same faults, answers and choices again.
fn replay_command(seed: u64) -> String {
    let mut words = vec!["idem-chaos".to_owned()];
    let mut given = std::env::args().skip(1);
    while let Some(word) = given.next() {
        if word == "--seed" {
            given.next();
        } else if !word.starts_with("--seed=") {
            words.push(word);
        }
    }
    words.push(format!("--seed {seed}"));
    words.join(" ")
}

/// What one client saw as an operation's outcome: a run's response, or the stored
/// outcome-unknown problem.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Ran { execution: u64 },
    Unknown,
}

#[derive(Debug, Default)]
struct Report {
    store: String,
    seconds: f64,
    operations: u64,
    requests: u64,
    faults: HashMap<&'static str, u64>,
    statuses: HashMap<u16, u64>,
    transport_errors: u64,
    arrivals: u64,
    executions: u64,
    unknown_outcomes: u64,
    duplicates_allowed: u64,
    duplicates_after_long_outage: u64,
    duplicates_other: Vec<String>,
    lost_results: Vec<String>,
    cross_scope: Vec<String>,
    unexpected: Vec<String>,
    stuck: Vec<String>,
}

impl Report {
    fn clean(&self) -> bool {
        self.duplicates_other.is_empty()
            && self.lost_results.is_empty()
            && self.cross_scope.is_empty()
            && self.unexpected.is_empty()
            && self.stuck.is_empty()
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut faults: Vec<_> = self.faults.iter().collect();
        faults.sort();
        let faults: Vec<String> = faults.iter().map(|(k, v)| format!("{v} {k}")).collect();
        let mut statuses: Vec<_> = self.statuses.iter().collect();
        statuses.sort();
        let statuses: Vec<String> = statuses.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        writeln!(f, "\n== {} ({:.0} s)", self.store, self.seconds)?;
        writeln!(f, "| what | count |\n| --- | ---: |")?;
        writeln!(
            f,
            "| operations (logical requests, each retried until it had an outcome) | {} |",
            self.operations
        )?;
        writeln!(f, "| HTTP requests sent | {} |", self.requests)?;
        writeln!(f, "| faults injected | {} |", faults.join(", "))?;
        writeln!(f, "| responses by status | {} |", statuses.join(", "))?;
        writeln!(
            f,
            "| requests that got no response (client timeout, connection refused or cut) | {} |",
            self.transport_errors
        )?;
        writeln!(f, "| requests that reached the upstream (503s included) | {} |", self.arrivals)?;
        writeln!(f, "| executions by the upstream | {} |", self.executions)?;
        writeln!(
            f,
            "| operations whose outcome is held as unknown (upstream broke off) | {} |",
            self.unknown_outcomes
        )?;
        writeln!(
            f,
            "| duplicate executions after the forwarding gateway was killed before storing the outcome (allowed) | {} |",
            self.duplicates_allowed
        )?;
        writeln!(
            f,
            "| duplicate executions around a store outage of half a lease or more (reported apart) | {} |",
            self.duplicates_after_long_outage
        )?;
        let rows = [
            ("duplicate executions, any other cause", &self.duplicates_other),
            ("lost results (a later answer differs from an earlier outcome)", &self.lost_results),
            ("answers carrying another caller's or key's execution", &self.cross_scope),
            ("unexpected answers (422, 400, other)", &self.unexpected),
            ("keys without an outcome after every lease passed", &self.stuck),
        ];
        for (name, list) in rows {
            writeln!(f, "| {name} | {} |", list.len())?;
        }
        for (name, list) in rows {
            for line in list.iter().take(5) {
                writeln!(f, "VIOLATION {name}: {line}")?;
            }
        }
        Ok(())
    }
}

struct Shared {
    gateways: RwLock<Vec<SocketAddr>>,
    report: Mutex<Report>,
    /// Per operation: the outcome its client settled on.
    outcomes: Mutex<HashMap<u64, Outcome>>,
    /// When each gateway process (by its upstream path) was killed.
    kills: Mutex<HashMap<String, Instant>>,
    /// When the store was down (restarting or paused), from and to.
    outages: Mutex<Vec<(Instant, Instant)>>,
    next_op: AtomicU64,
    requests: AtomicU64,
}

impl Shared {
    fn count_status(&self, status: u16) {
        *self.report.lock().unwrap().statuses.entry(status).or_default() += 1;
    }
}

async fn scenario(
    args: &Args,
    kind: StoreKind,
    seed: u64,
    idem: &std::path::Path,
) -> Result<Report, String> {
    let dir = std::env::temp_dir().join(format!("idem-chaos-{}-{kind:?}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let store = Store::start(kind, &dir)?;
    let upstream = Upstream::start(seed).await.map_err(|e| e.to_string())?;
    let url = store.url();
    let log = dir.join("gateways.log");
    let mut gateways = Vec::new();
    let extra = args.gateway_arg.clone();
    // Each gateway process forwards under a path of its own, so the upstream knows which one
    // ran what.
    let base = |index: usize, restart: u32| format!("http://{}/g{index}x{restart}", upstream.addr);
    for index in 0..store.gateways() {
        gateways.push(Gateway::start(idem, &base(index, 0), &url, None, &log, &extra)?);
    }
    let shared = Arc::new(Shared {
        gateways: RwLock::new(gateways.iter().map(|g| g.addr).collect()),
        report: Mutex::new(Report { store: format!("{kind:?}"), ..Report::default() }),
        outcomes: Mutex::new(HashMap::new()),
        kills: Mutex::new(HashMap::new()),
        outages: Mutex::new(Vec::new()),
        next_op: AtomicU64::new(0),
        requests: AtomicU64::new(0),
    });
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    // Should this return early, the fault thread still stops and kills what it holds.
    let _stop_on_return = StopOnDrop(Arc::clone(&stop));

    // Faults, on a thread of their own (they wait on processes).
    let faults = {
        let (shared, stop, upstream, idem, url, log, extra) = (
            Arc::clone(&shared),
            Arc::clone(&stop),
            upstream.clone(),
            idem.to_path_buf(),
            url.clone(),
            log.clone(),
            extra.clone(),
        );
        std::thread::spawn(move || {
            let mut store = store;
            let mut rng = Rng::new(seed ^ 0x6661_756c_7473);
            let mut restarts = vec![0u32; gateways.len()];
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1_000 + rng.below(2_500)));
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let roll = rng.below(100);
                let kind: Option<&'static str> = match roll {
                    0..=39 => {
                        let index = rng.below(gateways.len() as u64) as usize;
                        gateways[index].kill9();
                        let name = format!("g{index}x{}", restarts[index]);
                        shared.kills.lock().unwrap().insert(name, Instant::now());
                        std::thread::sleep(Duration::from_millis(300 + rng.below(1_200)));
                        restarts[index] += 1;
                        let base = format!("http://{}/g{index}x{}", upstream.addr, restarts[index]);
                        let old = gateways[index].addr;
                        // As a supervisor would: again until it starts (a gateway refuses to
                        // start while its store cannot answer, e.g. Redis replaying its AOF).
                        let mut restarted =
                            Gateway::start(&idem, &base, &url, Some(old), &log, &extra);
                        let giving_up = Instant::now() + Duration::from_secs(120);
                        while restarted.is_err() && Instant::now() < giving_up {
                            std::thread::sleep(Duration::from_millis(500));
                            restarted = Gateway::start(&idem, &base, &url, Some(old), &log, &extra)
                                .or_else(|_| {
                                    Gateway::start(&idem, &base, &url, None, &log, &extra)
                                });
                        }
                        match restarted {
                            Ok(gateway) => {
                                shared.gateways.write().unwrap()[index] = gateway.addr;
                                gateways[index] = gateway;
                            }
                            Err(error) => eprintln!("idem-chaos: gateway restart failed: {error}"),
                        }
                        Some("gateway kill -9 and restart")
                    }
                    40..=59 if store.has_server() => {
                        let down = Instant::now();
                        let restarted = store.restart();
                        shared.outages.lock().unwrap().push((down, Instant::now()));
                        match restarted {
                            Ok(()) => Some("store crash and restart"),
                            Err(error) => {
                                eprintln!("idem-chaos: store restart failed: {error}");
                                None
                            }
                        }
                    }
                    60..=79 if store.has_server() => {
                        let pids = store.pids();
                        let down = Instant::now();
                        servers::signal(&pids, "STOP");
                        std::thread::sleep(Duration::from_millis(300 + rng.below(1_700)));
                        servers::signal(&pids, "CONT");
                        shared.outages.lock().unwrap().push((down, Instant::now()));
                        (!pids.is_empty()).then_some("store paused (SIGSTOP, SIGCONT)")
                    }
                    _ => {
                        let stall = Duration::from_millis(500 + rng.below(2_500));
                        upstream.stall_until(Instant::now() + stall);
                        Some("upstream stall")
                    }
                };
                if let Some(kind) = kind {
                    *shared.report.lock().unwrap().faults.entry(kind).or_default() += 1;
                }
            }
            (store, gateways)
        })
    };

    // Clients.
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(5))
        .build_http();
    let seconds = args.seconds.unwrap_or(Duration::from_secs(if args.quick { 20 } else { 60 }));
    let deadline = started + seconds;
    let budget = args.full.then_some(args.requests);
    let clients = args.clients.unwrap_or(if args.full { 256 } else { 32 });
    let mut tasks = Vec::new();
    for index in 0..clients {
        let (shared, client) = (Arc::clone(&shared), client.clone());
        let mut rng = Rng::new(seed ^ (index as u64 + 1).wrapping_mul(0x5851_f42d_4c95_7f2d));
        tasks.push(tokio::spawn(async move {
            loop {
                let done = match budget {
                    Some(budget) => shared.requests.load(Ordering::Relaxed) >= budget,
                    None => Instant::now() >= deadline,
                };
                if done {
                    break;
                }
                let op = shared.next_op.fetch_add(1, Ordering::Relaxed);
                let outcome = operation(&shared, &client, &mut rng, op, 12, false).await;
                if let Some(outcome) = outcome {
                    shared.outcomes.lock().unwrap().insert(op, outcome);
                }
            }
        }));
    }
    for task in tasks {
        task.await.map_err(|e| e.to_string())?;
    }
    stop.store(true, Ordering::SeqCst);
    let (store, gateways) = tokio::task::spawn_blocking(move || faults.join())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|_| "the fault thread panicked".to_owned())?;
    let traffic = started.elapsed();

    // Every operation again, after the faults and after every lease has passed: each must
    // answer what its client settled on (a replay), and one that had no outcome yet must
    // get one now.
    tokio::time::sleep(LEASE + Duration::from_secs(1)).await;
    let operations = shared.next_op.load(Ordering::Relaxed);
    let mut rng = Rng::new(seed ^ 0x7665_7269_6679);
    let verify: Vec<u64> = (0..operations).collect();
    let chunks: Vec<Vec<u64>> = verify.chunks(64).map(<[u64]>::to_vec).collect();
    for chunk in chunks {
        let mut checks = Vec::new();
        for op in chunk {
            let (shared, client) = (Arc::clone(&shared), client.clone());
            let mut rng = Rng::new(rng.next_u64());
            checks.push(tokio::spawn(async move {
                let again = operation(&shared, &client, &mut rng, op, 30, true).await;
                let before = shared.outcomes.lock().unwrap().get(&op).cloned();
                let mut report = shared.report.lock().unwrap();
                match (before, again) {
                    (_, None) => report.stuck.push(format!("operation {op} ({})", describe(op))),
                    (Some(before), Some(again)) if before != again => report.lost_results.push(
                        format!("operation {op} ({}): {before:?}, later {again:?}", describe(op)),
                    ),
                    (_, Some(again)) => {
                        if again == Outcome::Unknown {
                            report.unknown_outcomes += 1;
                        }
                    }
                }
            }));
        }
        for check in checks {
            check.await.map_err(|e| e.to_string())?;
        }
    }

    // Effects: executions per (caller, key).
    let executions = upstream.executions();
    let kills = shared.kills.lock().unwrap().clone();
    let outages = shared.outages.lock().unwrap().clone();
    report_long_outages(&outages);
    // Each settled outcome must be an execution of that operation's own caller and key.
    let owner: HashMap<u64, (&str, &str)> =
        executions.iter().map(|e| (e.id, (e.scope.as_str(), e.key.as_str()))).collect();
    {
        let outcomes = shared.outcomes.lock().unwrap();
        let mut report = shared.report.lock().unwrap();
        for (op, outcome) in outcomes.iter() {
            if let Outcome::Ran { execution } = outcome {
                let (scope, key) = identity(*op);
                if owner.get(execution) != Some(&(scope.as_str(), key.as_str())) {
                    report.cross_scope.push(format!(
                        "operation {op} ({scope}, {key}) settled on execution {execution}, made for {:?}",
                        owner.get(execution)
                    ));
                }
            }
        }
    }
    let mut by_key: HashMap<(String, String), Vec<&upstream::Execution>> = HashMap::new();
    for execution in &executions {
        by_key.entry((execution.scope.clone(), execution.key.clone())).or_default().push(execution);
    }
    let mut report = std::mem::take(&mut *shared.report.lock().unwrap());
    report.seconds = traffic.as_secs_f64();
    report.operations = operations;
    report.requests = shared.requests.load(Ordering::Relaxed);
    report.executions = executions.len() as u64;
    report.arrivals = upstream.arrivals();
    for ((scope, key), runs) in by_key {
        for pair in runs.windows(2) {
            let (first, again) = (pair[0], pair[1]);
            // Allowed: the gateway that forwarded the first run was killed before it could
            // store the outcome (within the slowest answer plus a store pause of the run), and
            // the second came after the kill.
            let killed = kills.get(&first.gateway).filter(|kill| {
                **kill >= first.at
                    && **kill <= first.at + OUTCOME_STORED_WITHIN
                    && **kill < again.at
            });
            // A store down longer than a lease allows while the outcome was being stored lets
            // the key run again: reported apart, the rig's faults are meant to stay shorter.
            let long_outage = outages
                .iter()
                .any(|(from, to)| *to - *from >= LEASE / 2 && *to >= first.at && *from <= again.at);
            if killed.is_some() {
                report.duplicates_allowed += 1;
            } else if long_outage {
                report.duplicates_after_long_outage += 1;
            } else {
                report.duplicates_other.push(format!(
                    "{scope} {key}: executions {} (by gateway {}) and {} (by {}), {:?} apart; the first one's gateway was not killed in between",
                    first.id,
                    first.gateway,
                    again.id,
                    again.gateway,
                    again.at - first.at
                ));
            }
        }
    }
    drop((store, gateways));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(report)
}

/// The caller and key of an operation: the same key strings under each caller.
fn identity(op: u64) -> (String, String) {
    (format!("Bearer caller-{}", op % SCOPES), format!("order-{}", op / SCOPES))
}

fn describe(op: u64) -> String {
    let (scope, key) = identity(op);
    format!("{scope}, {key}")
}

/// Sends one operation until it has an outcome (at most `attempts` requests), retrying as a
/// careful client does: the same key and body, backoff with jitter, `Retry-After` honoured,
/// sometimes `Prefer: wait`. `None` if it never got one.
async fn operation(
    shared: &Shared,
    client: &Client<HttpConnector, Full<Bytes>>,
    rng: &mut Rng,
    op: u64,
    attempts: u32,
    patient: bool,
) -> Option<Outcome> {
    let (scope, key) = identity(op);
    let body = format!("{{\"order\":{}}}", op / SCOPES);
    let mut backoff = Duration::from_millis(100);
    for _ in 0..attempts {
        let gateway = {
            let gateways = shared.gateways.read().unwrap();
            gateways[rng.below(gateways.len() as u64) as usize]
        };
        let timeout = if patient {
            Duration::from_secs(10)
        } else {
            Duration::from_millis(150 + rng.below(2_500))
        };
        let mut request = hyper::Request::post(format!("http://{gateway}/orders"))
            .header("idempotency-key", &key)
            .header("authorization", &scope)
            .header("content-type", "application/json");
        if patient || rng.below(100) < 30 {
            request = request.header("prefer", "wait=3");
        }
        let request = request.body(Full::new(Bytes::from(body.clone()))).expect("a request");
        shared.requests.fetch_add(1, Ordering::Relaxed);
        let sent = tokio::time::timeout(timeout, async {
            let response = client.request(request).await?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await?.to_bytes();
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((parts, body))
        })
        .await;
        let mut wait = backoff;
        match sent {
            Ok(Ok((parts, body))) => {
                let status = parts.status.as_u16();
                shared.count_status(status);
                match status {
                    201 => {
                        let Some((execution, seen)) = upstream::parse_body(&body) else {
                            shared.report.lock().unwrap().unexpected.push(format!(
                                "operation {op}: a 201 that is not the upstream's: {body:?}"
                            ));
                            return None;
                        };
                        if seen != scope {
                            shared.report.lock().unwrap().cross_scope.push(format!(
                                "operation {op} as {scope} got execution {execution} made for {seen}"
                            ));
                        }
                        return Some(Outcome::Ran { execution });
                    }
                    502 if String::from_utf8_lossy(&body).contains("outcome-unknown") => {
                        return Some(Outcome::Unknown);
                    }
                    409 => {
                        let after = parts
                            .headers
                            .get("retry-after")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse::<u64>().ok())
                            .unwrap_or(1);
                        wait = Duration::from_secs(after).min(Duration::from_secs(2));
                    }
                    500 | 502 | 503 | 504 | 408 | 429 => {}
                    _ => {
                        shared.report.lock().unwrap().unexpected.push(format!(
                            "operation {op} ({}): {status} {}",
                            describe(op),
                            String::from_utf8_lossy(&body)
                        ));
                        return None;
                    }
                }
            }
            Ok(Err(_)) | Err(_) => {
                shared.report.lock().unwrap().transport_errors += 1;
            }
        }
        let jitter = Duration::from_millis(rng.below(wait.as_millis() as u64 / 2 + 1));
        tokio::time::sleep(wait + jitter).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
    None
}
