//! `idem-sim`: runs the deterministic simulator over a range of seeds, or replays one.

use std::process::ExitCode;

use clap::Parser;
use idem_sim::{Mutant, SimConfig, Stats, StoreKind, run_seed};

#[derive(Debug, Parser)]
#[command(
    name = "idem-sim",
    about = "Seeded simulation of idem's engine on a store: gateways, clock jumps, crashes, lost replies and late completions, with invariants checked after every step"
)]
struct Args {
    /// How many seeds to run, from --first
    #[arg(long, default_value_t = 10_000)]
    seeds: u64,
    /// The first seed
    #[arg(long, default_value_t = 0)]
    first: u64,
    /// Run this one seed only (with --trace, print every step)
    #[arg(long)]
    seed: Option<u64>,
    /// Steps per seed
    #[arg(long, default_value_t = 300)]
    steps: usize,
    /// Simulated gateways sharing the store
    #[arg(long, default_value_t = 4)]
    gateways: usize,
    /// Distinct key strings (each used by two callers)
    #[arg(long, default_value_t = 2)]
    keys: usize,
    #[arg(long, value_enum, default_value = "memory")]
    store: StoreKind,
    /// Plant a known defect in the store, to see the checks catch it
    #[arg(long, value_enum, default_value = "none")]
    mutant: Mutant,
    /// Print every step
    #[arg(long)]
    trace: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = SimConfig {
        steps: args.steps,
        actors: args.gateways,
        keys: args.keys,
        store: args.store,
        mutant: args.mutant,
        trace: args.trace,
    };
    let seeds = match args.seed {
        Some(seed) => seed..seed + 1,
        None => args.first..args.first.saturating_add(args.seeds),
    };
    let started = std::time::Instant::now();
    let mut total = Stats::default();
    let mut ran = 0u64;
    for seed in seeds {
        match run_seed(seed, &config) {
            Ok(stats) => total.add(&stats),
            Err(violation) => {
                eprintln!("{violation}");
                eprintln!("{ran} seeds passed before it");
                return ExitCode::FAILURE;
            }
        }
        ran += 1;
    }
    println!(
        "{ran} seeds on the {:?} store, no invariant broken, in {:.1}s\n{total}",
        config.store,
        started.elapsed().as_secs_f64()
    );
    ExitCode::SUCCESS
}
