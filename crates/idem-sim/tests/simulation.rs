//! The simulator in CI: 10,000 seeds on the memory store, 100 on SQLite, every planted defect
//! caught, and a seed that replays exactly.

use idem_sim::{Mutant, SimConfig, Stats, StoreKind, run_seed};

fn run(seeds: std::ops::Range<u64>, config: &SimConfig) -> Stats {
    let mut total = Stats::default();
    for seed in seeds {
        match run_seed(seed, config) {
            Ok(stats) => total.add(&stats),
            Err(violation) => panic!("{violation}"),
        }
    }
    total
}

#[test]
fn ten_thousand_seeds_on_the_memory_store_break_no_invariant() {
    let total = run(0..10_000, &SimConfig::default());
    println!("memory store, 10,000 seeds: {total}");
    // The runs reached the cases they exist for.
    assert!(total.late_completions > 1_000 && total.fenced > 1_000, "{total}");
    assert!(total.replies_lost > 10_000 && total.crashes > 10_000, "{total}");
}

#[test]
fn a_hundred_seeds_on_the_sqlite_store_break_no_invariant() {
    let config = SimConfig { store: StoreKind::Sqlite, ..SimConfig::default() };
    let total = run(1_000_000..1_000_100, &config);
    println!("SQLite store, 100 seeds: {total}");
    assert!(total.runs > 1_000 && total.replays > 1_000 && total.fenced > 10, "{total}");
}

/// The checks bite: a store with a known defect is caught within a few hundred seeds.
#[test]
fn every_planted_defect_is_caught() {
    for mutant in
        [Mutant::CompleteIgnoresToken, Mutant::ClaimIgnoresLease, Mutant::SweepIgnoresExpiry]
    {
        let config = SimConfig { mutant, ..SimConfig::default() };
        let caught = (0..500).find_map(|seed| run_seed(seed, &config).err());
        let violation = caught.unwrap_or_else(|| panic!("{mutant:?} went unnoticed for 500 seeds"));
        println!(
            "{mutant:?}: caught by seed {} at step {}: {}",
            violation.seed, violation.step, violation.what
        );
    }
}

#[test]
fn a_seed_replays_exactly() {
    let config = SimConfig::default();
    for seed in [7, 14, 4_242] {
        let first = run_seed(seed, &config).unwrap();
        assert_eq!(run_seed(seed, &config).unwrap(), first, "seed {seed}");
    }
}
