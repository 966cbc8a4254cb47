//! Scaling out: 1, 2 and 3 gateways on one shared store, fresh keys, the same total number of
//! connections spread over them. On this machine every gateway shares the same two cores
//! with the store and the load, so this shows what sharing one store costs, not what more
//! hosts would add.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::load::{self, Keys, Plan as LoadPlan};
use crate::procs::Gateway;
use crate::report::median;

pub struct Plan<'a> {
    pub idem: &'a Path,
    pub upstream: SocketAddr,
    pub store: &'a str,
}

/// Requests per second and p99 latency (ms) with `n` gateways (index `n - 1`), per round.
#[derive(Debug)]
pub struct Scaling {
    pub per_round: Vec<Vec<f64>>,
    pub p99_per_round: Vec<Vec<f64>>,
    pub errors: u64,
}

impl Scaling {
    pub fn medians(&self) -> Vec<f64> {
        self.per_round.iter().map(|rounds| median(rounds)).collect()
    }

    pub fn p99_medians(&self) -> Vec<f64> {
        self.p99_per_round.iter().map(|rounds| median(rounds)).collect()
    }
}

pub const GATEWAYS: usize = 3;

pub async fn run(
    plan: Plan<'_>,
    connections: usize,
    duration: Duration,
    rounds: usize,
    tag: &str,
) -> Result<Scaling, String> {
    let mut gateways = Vec::new();
    for _ in 0..GATEWAYS {
        gateways.push(Gateway::start(plan.idem, plan.upstream, plan.store)?);
    }
    let addrs: Vec<SocketAddr> = gateways.iter().map(|gateway| gateway.addr).collect();
    let mut scaling = Scaling {
        per_round: vec![Vec::new(); GATEWAYS],
        p99_per_round: vec![Vec::new(); GATEWAYS],
        errors: 0,
    };
    for round in 0..rounds {
        for count in 1..=GATEWAYS {
            let mut outcome = load::run(LoadPlan {
                target: addrs[0],
                also: addrs[1..count].to_vec(),
                keys: Keys::Fresh(format!("{tag}-scale{count}-{round}")),
                connections,
                duration,
                rate: None,
                max_requests: None,
            })
            .await;
            let rps = outcome.requests() as f64 / outcome.elapsed.as_secs_f64();
            let p99 = outcome.quantile_ms(0.99);
            eprintln!(
                "  round {}: {count} gateway(s) on one store: {rps:>8.0} req/s, p99 {p99:.2} ms",
                round + 1
            );
            scaling.errors += outcome.errors;
            scaling.errors +=
                outcome.statuses.iter().filter(|(s, _)| **s != 201).map(|(_, n)| n).sum::<u64>();
            scaling.per_round[count - 1].push(rps);
            scaling.p99_per_round[count - 1].push(p99);
        }
    }
    Ok(scaling)
}
