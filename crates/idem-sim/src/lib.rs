//! A deterministic simulator for idem's engine and its in-process stores.
//!
//! One seed is one run: simulated gateways (actors) sharing one store and one [`ManualClock`]
//! take steps chosen by a seeded generator: begin a request on one of a few keys (several
//! scopes reuse the same key strings), complete it, release it, crash holding it, renew its
//! lease, let the clock jump (a few seconds, about a lease, about a TTL), sweep expired
//! records, or change how often store calls fail before they reach the store or lose their
//! reply after it applied them. Each step runs to completion on a current-thread runtime with
//! paused time, so on the memory store a seed replays bit for bit.
//!
//! After every step the store's true state (read beneath the injected faults) is compared
//! with what the step may have done, and the run stops at the first violation of:
//! - a claim is granted only when no live record holds the key, and then at most one gateway
//!   holds a live lease on it;
//! - a stored record is never overwritten or removed by an owner that was fenced;
//! - no record changes or vanishes before its time (only its own step, an expiry, or the
//!   background release of a claim whose reply was lost, may change it);
//! - a replay returns exactly the outcome a completed run stored for that key.
//!
//! `Mutant` plants a known defect in the store so that a test can show the checks catch it.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use idem_core::{
    Begin, Capabilities, Claim, ClaimRequest, Decision, Engine, EngineConfig, Error, FencingToken,
    Fingerprint, IdempotencyKey, ListQuery, ManualClock, MemoryStore, Record, RecordKey,
    RecordState, RecordSummary, Scope, Store, Timestamp,
};

/// The lease and TTL of every simulated gateway.
pub const LEASE: Duration = Duration::from_secs(30);
pub const TTL: Duration = Duration::from_secs(300);

/// A small, fast, seedable generator (SplitMix64): the same seed gives the same run.
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

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True `per_mille` times in 1,000.
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1_000) < per_mille
    }
}

/// Which store the gateways share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    Memory,
    /// A file in the temporary directory, `synchronous=normal` (the decisions are the same;
    /// the sync is not what is simulated).
    Sqlite,
}

/// A defect planted in the store, to show the simulator catches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mutant {
    None,
    /// A completion by a fenced owner overwrites the new owner's record.
    CompleteIgnoresToken,
    /// A claim takes over a record whose lease is still live.
    ClaimIgnoresLease,
    /// Sweeping deletes records before they expire.
    SweepIgnoresExpiry,
    /// A replay deletes the record it replayed.
    ReplayForgets,
}

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub steps: usize,
    pub actors: usize,
    /// Distinct key strings; each is used in two scopes.
    pub keys: usize,
    pub store: StoreKind,
    pub mutant: Mutant,
    /// Print every step.
    pub trace: bool,
}

impl SimConfig {
    /// The `idem-sim` command that runs `seed` with this configuration, step by step.
    pub fn replay_command(&self, seed: u64) -> String {
        let name = |value: Option<clap::builder::PossibleValue>| {
            value.map(|v| v.get_name().to_owned()).unwrap_or_default()
        };
        format!(
            "idem-sim --seed {seed} --store {} --mutant {} --steps {} --gateways {} --keys {} --trace",
            name(clap::ValueEnum::to_possible_value(&self.store)),
            name(clap::ValueEnum::to_possible_value(&self.mutant)),
            self.steps,
            self.actors,
            self.keys,
        )
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            steps: 300,
            actors: 4,
            keys: 2,
            store: StoreKind::Memory,
            mutant: Mutant::None,
            trace: false,
        }
    }
}

/// What one run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    pub steps: u64,
    pub runs: u64,
    pub replays: u64,
    pub in_flight: u64,
    pub mismatches: u64,
    pub completed: u64,
    pub fenced: u64,
    pub released: u64,
    pub crashes: u64,
    pub renewals: u64,
    pub late_completions: u64,
    pub clock_jumps: u64,
    pub sweeps: u64,
    pub calls_failed_before: u64,
    pub replies_lost: u64,
    pub store_errors_seen: u64,
}

impl Stats {
    pub fn add(&mut self, other: &Stats) {
        let Stats {
            steps,
            runs,
            replays,
            in_flight,
            mismatches,
            completed,
            fenced,
            released,
            crashes,
            renewals,
            late_completions,
            clock_jumps,
            sweeps,
            calls_failed_before,
            replies_lost,
            store_errors_seen,
        } = other;
        self.steps += steps;
        self.runs += runs;
        self.replays += replays;
        self.in_flight += in_flight;
        self.mismatches += mismatches;
        self.completed += completed;
        self.fenced += fenced;
        self.released += released;
        self.crashes += crashes;
        self.renewals += renewals;
        self.late_completions += late_completions;
        self.clock_jumps += clock_jumps;
        self.sweeps += sweeps;
        self.calls_failed_before += calls_failed_before;
        self.replies_lost += replies_lost;
        self.store_errors_seen += store_errors_seen;
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} steps: {} runs, {} replays, {} in flight, {} mismatches; {} completed ({} late), {} fenced, {} released, {} crashes, {} renewals; {} clock jumps, {} sweeps; faults: {} calls failed before the store, {} replies lost, {} errors seen by gateways",
            self.steps,
            self.runs,
            self.replays,
            self.in_flight,
            self.mismatches,
            self.completed,
            self.late_completions,
            self.fenced,
            self.released,
            self.crashes,
            self.renewals,
            self.clock_jumps,
            self.sweeps,
            self.calls_failed_before,
            self.replies_lost,
            self.store_errors_seen,
        )
    }
}

/// The first invariant a run broke, with the steps that led there.
#[derive(Debug, Clone)]
pub struct Violation {
    pub seed: u64,
    pub step: usize,
    pub what: String,
    /// The last steps, oldest first.
    pub recent: Vec<String>,
    /// The command that replays this run.
    pub replay: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "seed {} broke an invariant at step {}: {}", self.seed, self.step, self.what)?;
        writeln!(f, "the steps before it:")?;
        for line in &self.recent {
            writeln!(f, "  {line}")?;
        }
        write!(f, "replay it with: {}", self.replay)
    }
}

/// How the fault layer treats the next store calls.
#[derive(Debug)]
struct Faults {
    rng: Rng,
    fail_before: u64,
    lose_reply: u64,
    /// Tokens of claims that were applied but whose reply was lost: the engine releases them
    /// in the background, so their records may vanish at any step.
    orphans: HashSet<FencingToken>,
    failed_before: u64,
    lost: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    Before,
    LoseReply,
}

/// The store the engine sees: the real one beneath faults drawn from the seed.
struct Faulty {
    inner: Arc<dyn Store>,
    faults: Mutex<Faults>,
}

impl Faulty {
    fn draw(&self, mutating: bool) -> Fault {
        let mut faults = self.faults.lock().unwrap();
        let (before, lose) = (faults.fail_before, faults.lose_reply);
        if faults.rng.chance(before) {
            faults.failed_before += 1;
            Fault::Before
        } else if mutating && faults.rng.chance(lose) {
            faults.lost += 1;
            Fault::LoseReply
        } else {
            Fault::None
        }
    }

    async fn faulted<T>(
        &self,
        mutating: bool,
        call: impl std::future::Future<Output = idem_core::Result<T>>,
    ) -> idem_core::Result<T> {
        match self.draw(mutating) {
            Fault::None => call.await,
            Fault::Before => Err(Error::unavailable("simulated: the call never reached the store")),
            Fault::LoseReply => {
                let _ = call.await;
                Err(Error::unavailable("simulated: the store applied the call; its reply was lost"))
            }
        }
    }
}

#[async_trait]
impl Store for Faulty {
    async fn claim(&self, request: ClaimRequest<'_>) -> idem_core::Result<Decision> {
        match self.draw(true) {
            Fault::None => self.inner.claim(request).await,
            Fault::Before => Err(Error::unavailable("simulated: the call never reached the store")),
            Fault::LoseReply => {
                if let Ok(Decision::Acquire) = self.inner.claim(request).await {
                    self.faults.lock().unwrap().orphans.insert(request.token);
                }
                Err(Error::unavailable("simulated: the store applied the call; its reply was lost"))
            }
        }
    }
    async fn complete(
        &self,
        key: &RecordKey,
        token: FencingToken,
        payload: Bytes,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> idem_core::Result<()> {
        self.faulted(true, self.inner.complete(key, token, payload, now, expires_at)).await
    }
    async fn release(&self, key: &RecordKey, token: FencingToken) -> idem_core::Result<()> {
        self.faulted(true, self.inner.release(key, token)).await
    }
    async fn renew(
        &self,
        key: &RecordKey,
        token: FencingToken,
        now: Timestamp,
        lease_expires_at: Timestamp,
        expires_at: Timestamp,
    ) -> idem_core::Result<()> {
        self.faulted(true, self.inner.renew(key, token, now, lease_expires_at, expires_at)).await
    }
    async fn get(&self, key: &RecordKey) -> idem_core::Result<Option<Record>> {
        self.faulted(false, self.inner.get(key)).await
    }
    async fn delete(&self, key: &RecordKey) -> idem_core::Result<bool> {
        self.faulted(true, self.inner.delete(key)).await
    }
    async fn sweep(&self, now: Timestamp, limit: usize) -> idem_core::Result<usize> {
        self.faulted(true, self.inner.sweep(now, limit)).await
    }
    async fn list(&self, query: &ListQuery) -> idem_core::Result<Vec<RecordSummary>> {
        self.faulted(false, self.inner.list(query)).await
    }
    async fn ping(&self) -> idem_core::Result<()> {
        self.faulted(false, self.inner.ping()).await
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
}

/// The real store with a planted defect, built from the store's own operations.
struct Mutated {
    inner: Arc<dyn Store>,
    mutant: Mutant,
}

#[async_trait]
impl Store for Mutated {
    async fn claim(&self, request: ClaimRequest<'_>) -> idem_core::Result<Decision> {
        let decision = self.inner.claim(request).await?;
        if self.mutant == Mutant::ReplayForgets && matches!(decision, Decision::Replay(_)) {
            self.inner.delete(request.key).await?;
        }
        if self.mutant == Mutant::ClaimIgnoresLease
            && let Decision::InFlight { .. } = decision
            && let Some(Record { state: RecordState::InFlight { token, .. }, .. }) =
                self.inner.get(request.key).await?
        {
            self.inner.release(request.key, token).await?;
            return self.inner.claim(request).await;
        }
        Ok(decision)
    }
    async fn complete(
        &self,
        key: &RecordKey,
        token: FencingToken,
        payload: Bytes,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> idem_core::Result<()> {
        match self.inner.complete(key, token, payload.clone(), now, expires_at).await {
            Err(Error::Fenced) if self.mutant == Mutant::CompleteIgnoresToken => {
                match self.inner.get(key).await? {
                    Some(Record { state: RecordState::InFlight { token: owner, .. }, .. }) => {
                        self.inner.complete(key, owner, payload, now, expires_at).await
                    }
                    _ => Err(Error::Fenced),
                }
            }
            other => other,
        }
    }
    async fn release(&self, key: &RecordKey, token: FencingToken) -> idem_core::Result<()> {
        self.inner.release(key, token).await
    }
    async fn renew(
        &self,
        key: &RecordKey,
        token: FencingToken,
        now: Timestamp,
        lease_expires_at: Timestamp,
        expires_at: Timestamp,
    ) -> idem_core::Result<()> {
        self.inner.renew(key, token, now, lease_expires_at, expires_at).await
    }
    async fn get(&self, key: &RecordKey) -> idem_core::Result<Option<Record>> {
        self.inner.get(key).await
    }
    async fn delete(&self, key: &RecordKey) -> idem_core::Result<bool> {
        self.inner.delete(key).await
    }
    async fn sweep(&self, now: Timestamp, limit: usize) -> idem_core::Result<usize> {
        if self.mutant == Mutant::SweepIgnoresExpiry {
            // Sweeps as if it were a TTL later.
            return self.inner.sweep(now.saturating_add(TTL), limit).await;
        }
        self.inner.sweep(now, limit).await
    }
    async fn list(&self, query: &ListQuery) -> idem_core::Result<Vec<RecordSummary>> {
        self.inner.list(query).await
    }
    async fn ping(&self) -> idem_core::Result<()> {
        self.inner.ping().await
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
}

/// A gateway's request in progress: it holds the claim and "runs the upstream".
struct Held {
    key: usize,
    variant: u8,
    claim: Claim,
}

/// A SQLite file removed when the run ends.
struct TempFile(std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut path = self.0.clone().into_os_string();
            path.push(suffix);
            let _ = std::fs::remove_file(path);
        }
    }
}

/// One run of `config.steps` steps from `seed`.
pub fn run_seed(seed: u64, config: &SimConfig) -> Result<Stats, Violation> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime");
    let _guard = runtime.enter();
    let mut temp = None;
    let real: Arc<dyn Store> = match config.store {
        StoreKind::Memory => Arc::new(MemoryStore::new()),
        StoreKind::Sqlite => {
            let path =
                std::env::temp_dir().join(format!("idem-sim-{}-{seed}.db", std::process::id()));
            let file = TempFile(path);
            let options = idem_sqlite::SqliteOptions {
                synchronous: idem_sqlite::Synchronous::Normal,
                ..idem_sqlite::SqliteOptions::default()
            };
            let store = idem_sqlite::SqliteStore::open(&file.0, &options).unwrap_or_else(|error| {
                panic!("cannot open the simulation's SQLite file: {error}")
            });
            temp = Some(file);
            Arc::new(store)
        }
    };
    let mut sim = Sim::new(seed, config, real, &runtime);
    let result = sim.run();
    drop(sim);
    drop(runtime);
    drop(temp);
    result
}

struct Sim<'a> {
    seed: u64,
    config: &'a SimConfig,
    runtime: &'a tokio::runtime::Runtime,
    rng: Rng,
    clock: ManualClock,
    real: Arc<dyn Store>,
    faulty: Arc<Faulty>,
    engine: Engine,
    keys: Vec<RecordKey>,
    actors: Vec<Option<Held>>,
    /// Every payload a gateway tried to store, per key: a replay must be one of them.
    produced: Vec<HashSet<Bytes>>,
    stats: Stats,
    recent: std::collections::VecDeque<String>,
    step: usize,
    payloads: u64,
}

type Snapshot = Vec<Option<Record>>;

impl<'a> Sim<'a> {
    fn new(
        seed: u64,
        config: &'a SimConfig,
        real: Arc<dyn Store>,
        runtime: &'a tokio::runtime::Runtime,
    ) -> Self {
        let mut rng = Rng::new(seed);
        let clock = ManualClock::new(1_800_000_000_000);
        let below: Arc<dyn Store> = match config.mutant {
            Mutant::None => Arc::clone(&real),
            mutant => Arc::new(Mutated { inner: Arc::clone(&real), mutant }),
        };
        let faults = Faults {
            rng: Rng::new(rng.next_u64()),
            fail_before: 0,
            lose_reply: 0,
            orphans: HashSet::new(),
            failed_before: 0,
            lost: 0,
        };
        let faulty = Arc::new(Faulty { inner: below, faults: Mutex::new(faults) });
        let engine = Engine::from_shared(
            Arc::clone(&faulty) as Arc<dyn Store>,
            Arc::new(clock.clone()),
            EngineConfig { lease: LEASE, ttl: TTL },
        );
        // Each key string in two scopes: the same string from two callers is two keys.
        let keys: Vec<RecordKey> = (0..config.keys.max(1) * 2)
            .map(|index| {
                let scope = Scope::named(format!("caller-{}", index % 2));
                let key = IdempotencyKey::new(format!("order-{}", index / 2)).expect("a valid key");
                RecordKey::new(scope, key)
            })
            .collect();
        let produced = vec![HashSet::new(); keys.len()];
        Self {
            seed,
            config,
            runtime,
            rng,
            clock,
            real,
            faulty,
            engine,
            actors: (0..config.actors.max(1)).map(|_| None).collect(),
            keys,
            produced,
            stats: Stats::default(),
            recent: std::collections::VecDeque::new(),
            step: 0,
            payloads: 0,
        }
    }

    fn run(&mut self) -> Result<Stats, Violation> {
        for step in 0..self.config.steps {
            self.step = step;
            self.one_step()?;
            self.stats.steps += 1;
        }
        // The run ends with every gateway crashing: nothing to check but that it ends.
        for held in self.actors.iter_mut().filter_map(Option::take) {
            held.claim.abandon();
        }
        let faults = self.faulty.faults.lock().unwrap();
        self.stats.calls_failed_before = faults.failed_before;
        self.stats.replies_lost = faults.lost;
        Ok(self.stats.clone())
    }

    fn now(&self) -> Timestamp {
        idem_core::Clock::now(&self.clock)
    }

    fn snapshot(&self) -> Snapshot {
        let real = &self.real;
        self.runtime.block_on(async {
            let mut all = Vec::with_capacity(self.keys.len());
            for key in &self.keys {
                all.push(real.get(key).await.expect("the real store answers"));
            }
            all
        })
    }

    fn note(&mut self, line: String) {
        if self.config.trace {
            println!("step {:>5} t+{:>6}s  {line}", self.step, self.elapsed_s());
        }
        self.recent.push_back(format!("step {}: {line}", self.step));
        if self.recent.len() > 40 {
            self.recent.pop_front();
        }
    }

    fn elapsed_s(&self) -> u64 {
        (self.now().as_millis() - 1_800_000_000_000) / 1_000
    }

    fn violation(&self, what: String) -> Violation {
        Violation {
            seed: self.seed,
            step: self.step,
            what,
            recent: self.recent.iter().cloned().collect(),
            replay: self.config.replay_command(self.seed),
        }
    }

    fn fingerprint(&self, key: usize, variant: u8) -> Fingerprint {
        Fingerprint::builder().part(format!("{key}/{variant}").as_bytes()).finish()
    }

    fn one_step(&mut self) -> Result<(), Violation> {
        let before = self.snapshot();
        let faults_before = self.fault_count();
        let roll = self.rng.below(100);
        let holding: Vec<usize> =
            (0..self.actors.len()).filter(|&a| self.actors[a].is_some()).collect();
        let idle: Vec<usize> =
            (0..self.actors.len()).filter(|&a| self.actors[a].is_none()).collect();
        let mut touched: Option<usize> = None;
        let mut swept = false;
        match roll {
            0..=34 if !idle.is_empty() => {
                let actor = idle[self.rng.below(idle.len() as u64) as usize];
                let key = self.rng.below(self.keys.len() as u64) as usize;
                let variant = u8::from(self.rng.chance(100));
                touched = Some(key);
                self.begin(actor, key, variant, &before)?;
            }
            35..=74 if !holding.is_empty() => {
                let actor = holding[self.rng.below(holding.len() as u64) as usize];
                let held = self.actors[actor].take().expect("a holding actor");
                touched = Some(held.key);
                match roll {
                    35..=54 => self.complete(actor, held, &before)?,
                    55..=61 => self.release(actor, held, &before)?,
                    62..=66 => {
                        // A crash changes nothing in the store: the key is checked like any
                        // other this step.
                        touched = None;
                        self.note(format!("gateway {actor} crashes holding key {}", held.key));
                        self.stats.crashes += 1;
                        held.claim.abandon();
                    }
                    _ => self.renew(actor, held, &before)?,
                }
            }
            75..=89 => {
                let jump = match self.rng.below(10) {
                    0..=5 => Duration::from_secs(1 + self.rng.below(5)),
                    6..=8 => Duration::from_secs(20 + self.rng.below(21)),
                    _ => Duration::from_secs(200 + self.rng.below(201)),
                };
                self.clock.advance(jump);
                self.stats.clock_jumps += 1;
                // Background work (releases of claims whose reply was lost) gets its turn.
                let pause = Duration::from_millis(self.rng.below(6_000));
                self.runtime.block_on(tokio::time::sleep(pause));
                self.note(format!(
                    "the clock jumps {}s; {}ms pass for background work",
                    jump.as_secs(),
                    pause.as_millis()
                ));
            }
            90..=92 => {
                let now = self.now();
                let result = self.runtime.block_on(self.engine.store().sweep(now, 2));
                self.stats.sweeps += 1;
                swept = true;
                self.note(format!("sweep: {result:?}"));
            }
            _ => {
                let levels = [0, 0, 50, 200];
                let mut faults = self.faulty.faults.lock().unwrap();
                faults.fail_before = levels[self.rng.below(4) as usize];
                faults.lose_reply = levels[self.rng.below(4) as usize];
                let line = format!(
                    "faults now: {}‰ of calls fail before the store, {}‰ of replies lost",
                    faults.fail_before, faults.lose_reply
                );
                drop(faults);
                self.note(line);
            }
        }
        let after = self.snapshot();
        let orphans = self.faulty.faults.lock().unwrap().orphans.clone();
        let now = self.now();
        let faulted = self.fault_count() != faults_before;
        for (index, (was, is)) in before.iter().zip(&after).enumerate() {
            if Some(index) == touched || was == is {
                continue;
            }
            // What may change a record its step did not touch: a background release of a
            // claim whose reply was lost; a sweep of an expired record.
            let orphan_released = is.is_none()
                && matches!(was, Some(Record { state: RecordState::InFlight { token, .. }, .. }) if orphans.contains(token));
            let expired_swept =
                swept && is.is_none() && was.as_ref().is_some_and(|record| record.is_expired(now));
            if !(orphan_released || expired_swept) {
                return Err(self.violation(format!(
                    "key {index} changed without a cause (swept: {swept}, faults this step: {faulted}): {was:?} -> {is:?}"
                )));
            }
        }
        Ok(())
    }

    fn fault_count(&self) -> u64 {
        let faults = self.faulty.faults.lock().unwrap();
        faults.failed_before + faults.lost
    }

    fn begin(
        &mut self,
        actor: usize,
        key: usize,
        variant: u8,
        before: &Snapshot,
    ) -> Result<(), Violation> {
        let now = self.now();
        let fingerprint = self.fingerprint(key, variant);
        let faults_before = self.fault_count();
        let orphans_before = self.faulty.faults.lock().unwrap().orphans.len();
        let begun = self.runtime.block_on(self.engine.begin(self.keys[key].clone(), fingerprint));
        let faulted = self.fault_count() != faults_before;
        let expected = idem_core::decide(before[key].as_ref(), &fingerprint, now);
        // A claim whose reply was lost is released by the engine in the background, which
        // may happen during this step, before this claim is decided.
        let orphan_before = matches!(&before[key], Some(Record { state: RecordState::InFlight { token, .. }, .. })
            if self.faulty.faults.lock().unwrap().orphans.contains(token));
        let could_acquire = expected == Decision::Acquire || orphan_before;
        let after = self.snapshot();
        // Whatever did not run leaves the record as it was (or without the orphan the engine
        // released meanwhile).
        let unchanged = after[key] == before[key] || (orphan_before && after[key].is_none());
        if !matches!(begun, Ok(Begin::Run(_)) | Err(_)) && !unchanged {
            return Err(self.violation(format!(
                "key {key} changed although its begin ran nothing ({begun:?}): {:?} -> {:?}",
                before[key], after[key]
            )));
        }
        match begun {
            Ok(Begin::Run(claim)) => {
                self.note(format!("gateway {actor} begins key {key} (variant {variant}): runs"));
                self.stats.runs += 1;
                if !could_acquire {
                    return Err(self.violation(format!(
                        "gateway {actor} was let run key {key} although the store held {:?} (expected {expected:?})",
                        before[key]
                    )));
                }
                // At most one live owner: no other gateway holds this key with a live lease.
                for (other, held) in self.actors.iter().enumerate() {
                    if let Some(held) = held
                        && held.key == key
                        && held.claim.lease_expires_at() > now
                    {
                        return Err(self.violation(format!(
                            "gateway {actor} runs key {key} while gateway {other} holds it until {:?} (now {now:?})",
                            held.claim.lease_expires_at()
                        )));
                    }
                }
                let owned = matches!(&after[key], Some(Record { state: RecordState::InFlight { token, lease_expires_at }, fingerprint: stored, .. })
                    if *token == claim.token() && *lease_expires_at == claim.lease_expires_at() && *stored == fingerprint);
                if !owned {
                    return Err(self.violation(format!(
                        "gateway {actor} runs key {key} but the store holds {:?}",
                        after[key]
                    )));
                }
                self.actors[actor] = Some(Held { key, variant, claim });
            }
            Ok(Begin::Replay(payload)) => {
                self.note(format!(
                    "gateway {actor} begins key {key} (variant {variant}): replay {payload:?}"
                ));
                self.stats.replays += 1;
                if expected != Decision::Replay(payload.clone()) {
                    return Err(self.violation(format!(
                        "gateway {actor} got the replay {payload:?} for key {key} but the store held {:?}",
                        before[key]
                    )));
                }
                if !self.produced[key].contains(&payload) {
                    return Err(self.violation(format!(
                        "key {key} replayed {payload:?}, which no run of that key stored"
                    )));
                }
            }
            Ok(Begin::Mismatch) => {
                self.note(format!(
                    "gateway {actor} begins key {key} (variant {variant}): mismatch"
                ));
                self.stats.mismatches += 1;
                if expected != Decision::Mismatch {
                    return Err(self.violation(format!(
                        "key {key} answered mismatch to variant {variant} but the store held {:?}",
                        before[key]
                    )));
                }
            }
            Ok(Begin::InFlight { retry_after }) => {
                self.note(format!("gateway {actor} begins key {key} (variant {variant}): in flight, retry after {retry_after:?}"));
                self.stats.in_flight += 1;
                if !matches!(expected, Decision::InFlight { .. }) {
                    return Err(self.violation(format!(
                        "key {key} answered in flight but the store held {:?}",
                        before[key]
                    )));
                }
            }
            Err(error) => {
                self.note(format!("gateway {actor} begins key {key} (variant {variant}): {error}"));
                self.stats.store_errors_seen += 1;
                if !faulted {
                    return Err(
                        self.violation(format!("begin failed with no fault injected: {error}"))
                    );
                }
                // The claim may have landed (reply lost) where it could: then it is an orphan
                // the engine releases in the background (maybe already), else nothing changed.
                let orphans = &self.faulty.faults.lock().unwrap().orphans;
                let landed = orphans.len() > orphans_before && could_acquire;
                let landed_as_orphan = landed
                    && match &after[key] {
                        Some(Record { state: RecordState::InFlight { token, .. }, .. }) => {
                            orphans.contains(token)
                        }
                        Some(_) => false,
                        None => true,
                    };
                if !unchanged && !landed_as_orphan {
                    return Err(self.violation(format!(
                        "a failed begin changed key {key}: {:?} -> {:?}",
                        before[key], after[key]
                    )));
                }
            }
        }
        Ok(())
    }

    fn complete(&mut self, actor: usize, held: Held, before: &Snapshot) -> Result<(), Violation> {
        let key = held.key;
        let now = self.now();
        self.payloads += 1;
        let payload = Bytes::from(format!("outcome-{}-of-gateway-{actor}", self.payloads));
        self.produced[key].insert(payload.clone());
        let token = held.claim.token();
        let late = held.claim.lease_expires_at() <= now;
        let faults_before = self.fault_count();
        let result = self.runtime.block_on(held.claim.complete(payload.clone()));
        let faulted = self.fault_count() != faults_before;
        let after = self.snapshot();
        self.note(format!(
            "gateway {actor} completes key {key}{} with {payload:?}: {result:?}",
            if late { " after its lease" } else { "" }
        ));
        let owned_before = matches!(&before[key], Some(Record { state: RecordState::InFlight { token: owner, .. }, .. }) if *owner == token);
        let stored_ours = matches!(&after[key], Some(Record { state: RecordState::Completed { payload: stored }, fingerprint, expires_at, .. })
            if *stored == payload && *fingerprint == self.fingerprint(key, held.variant) && *expires_at == now.saturating_add(TTL));
        match result {
            Ok(()) => {
                self.stats.completed += 1;
                if late {
                    self.stats.late_completions += 1;
                }
                if !owned_before || !stored_ours {
                    return Err(self.violation(format!(
                        "gateway {actor}'s completion of key {key} succeeded: owned before: {owned_before}; store before {:?}, after {:?}",
                        before[key], after[key]
                    )));
                }
            }
            Err(Error::Fenced) => {
                self.stats.fenced += 1;
                if after[key] != before[key] {
                    return Err(self.violation(format!(
                        "a fenced completion by gateway {actor} changed key {key}: {:?} -> {:?}",
                        before[key], after[key]
                    )));
                }
                if owned_before {
                    return Err(self.violation(format!(
                        "gateway {actor} was fenced on key {key} while it owned it"
                    )));
                }
            }
            Err(error) => {
                self.stats.store_errors_seen += 1;
                if !faulted {
                    return Err(
                        self.violation(format!("complete failed with no fault injected: {error}"))
                    );
                }
                if after[key] != before[key] && !(owned_before && stored_ours) {
                    return Err(self.violation(format!(
                        "a failed completion by gateway {actor} left key {key} as {:?} (before {:?})",
                        after[key], before[key]
                    )));
                }
            }
        }
        Ok(())
    }

    fn release(&mut self, actor: usize, held: Held, before: &Snapshot) -> Result<(), Violation> {
        let key = held.key;
        let token = held.claim.token();
        let faults_before = self.fault_count();
        let result = self.runtime.block_on(held.claim.release());
        let faulted = self.fault_count() != faults_before;
        let after = self.snapshot();
        self.note(format!("gateway {actor} releases key {key}: {result:?}"));
        let owned_before = matches!(&before[key], Some(Record { state: RecordState::InFlight { token: owner, .. }, .. }) if *owner == token);
        match result {
            Ok(()) => {
                self.stats.released += 1;
                if !owned_before || after[key].is_some() {
                    return Err(self.violation(format!(
                        "gateway {actor}'s release of key {key} succeeded: store before {:?}, after {:?}",
                        before[key], after[key]
                    )));
                }
            }
            Err(Error::Fenced) => {
                self.stats.fenced += 1;
                if after[key] != before[key] || owned_before {
                    return Err(self.violation(format!(
                        "a fenced release by gateway {actor} (owner before: {owned_before}) left key {key}: {:?} -> {:?}",
                        before[key], after[key]
                    )));
                }
            }
            Err(error) => {
                self.stats.store_errors_seen += 1;
                let removed_ours = owned_before && after[key].is_none();
                if !faulted || (after[key] != before[key] && !removed_ours) {
                    return Err(self.violation(format!(
                        "a failed release ({error}) by gateway {actor} left key {key}: {:?} -> {:?}",
                        before[key], after[key]
                    )));
                }
            }
        }
        Ok(())
    }

    fn renew(&mut self, actor: usize, mut held: Held, before: &Snapshot) -> Result<(), Violation> {
        let key = held.key;
        let now = self.now();
        let token = held.claim.token();
        let faults_before = self.fault_count();
        let result = self.runtime.block_on(held.claim.renew());
        let faulted = self.fault_count() != faults_before;
        let after = self.snapshot();
        self.note(format!("gateway {actor} renews key {key}: {result:?}"));
        self.stats.renewals += 1;
        let owned_before = matches!(&before[key], Some(Record { state: RecordState::InFlight { token: owner, .. }, .. }) if *owner == token);
        let extended = matches!(&after[key], Some(Record { state: RecordState::InFlight { token: owner, lease_expires_at }, .. })
            if *owner == token && *lease_expires_at == now.saturating_add(LEASE));
        let ok = match &result {
            Ok(()) => owned_before && extended,
            Err(Error::Fenced) => after[key] == before[key] && !owned_before,
            Err(_) => faulted && (after[key] == before[key] || (owned_before && extended)),
        };
        if result.is_err() {
            self.stats.store_errors_seen += u64::from(!matches!(result, Err(Error::Fenced)));
        }
        if !ok {
            return Err(self.violation(format!(
                "gateway {actor}'s renewal of key {key} ({result:?}, owner before: {owned_before}) left {:?} -> {:?}",
                before[key], after[key]
            )));
        }
        // A gateway keeps its request after a failed renewal: it finds out at completion.
        self.actors[actor] = Some(held);
        Ok(())
    }
}
