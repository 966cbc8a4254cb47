//! The report: a Markdown table per load shape, the issue's targets checked against the
//! measurements, and an SVG bar chart.

use std::fmt::Write as _;
use std::time::Duration;

use crate::{Config, Scenario};

pub struct Report<'a> {
    pub command: String,
    pub configs: &'a mut Vec<Config>,
    pub concurrency: usize,
    pub duration: Duration,
    pub rounds: usize,
    pub delay: Duration,
    pub hold: usize,
    pub hold_failed: u64,
    pub held_rss_kib: u64,
    pub peak_rss_kib: u64,
    pub nginx_found: bool,
    pub gateways: Vec<(&'static str, u64)>,
    pub messaging: Option<&'a crate::messaging::Results>,
    /// `pgbench` doing a fresh key's two commits directly: requests per second, per round.
    pub floor: Option<Vec<f64>>,
    /// Fresh keys through 1, 2 and 3 gateways on one store, by store.
    pub scaling: Vec<(&'static str, crate::scaling::Scaling)>,
}

/// The median of `values` (0 for none).
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Requests per second at fixed concurrency: the median of the rounds.
fn rps(config: &Config) -> f64 {
    if config.per_round.is_empty() {
        return config.closed.requests() as f64
            / config.closed.elapsed.as_secs_f64().max(f64::EPSILON);
    }
    median(&config.per_round)
}

/// Each round's figure, with `decimals` decimals, as `a / b / c`.
fn rounds(values: &[f64], decimals: usize) -> String {
    values.iter().map(|value| format!("{value:.decimals$}")).collect::<Vec<_>>().join(" / ")
}

fn per_request(total: f64, config: &Config) -> f64 {
    total / (config.closed.requests().max(1) as f64)
}

fn statuses(config: &Config) -> String {
    let mut text: Vec<String> =
        config.closed.statuses.iter().map(|(status, count)| format!("{status}: {count}")).collect();
    if config.closed.replays > 0 {
        text.push(format!("replayed: {}", config.closed.replays));
    }
    if config.closed.errors > 0 {
        text.push(format!("errors: {}", config.closed.errors));
    }
    text.join(", ")
}

impl Report<'_> {
    fn find(&self, scenario: Scenario, store: &str) -> Option<&Config> {
        self.configs
            .iter()
            .find(|config| config.scenario == scenario && config.name.ends_with(store))
    }

    fn machine() -> String {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find(|line| line.starts_with("model name"))
                    .map(|line| line.split(':').nth(1).unwrap_or("").trim().to_owned())
            })
            .unwrap_or_else(|| "unknown CPU".into());
        let cores = std::thread::available_parallelism().map_or(0, usize::from);
        let memory = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| {
                text.lines()
                    .next()
                    .and_then(|line| line.split_whitespace().nth(1))
                    .and_then(|kib| kib.parse::<u64>().ok())
            })
            .map_or("?".into(), |kib| format!("{} GiB", kib / (1024 * 1024)));
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        format!("{cpu}, {cores} cores, {memory} memory, Linux {}", kernel.trim())
    }

    fn date() -> String {
        std::process::Command::new("date")
            .args(["-u", "+%Y-%m-%d %H:%M UTC"])
            .output()
            .ok()
            .and_then(|output| String::from_utf8(output.stdout).ok())
            .map(|text| text.trim().to_owned())
            .unwrap_or_default()
    }

    /// What shows the harness did not work: errors, unexpected statuses, wrong counts. Counts
    /// of store round trips and upstream runs are exact, not timings, so they are checked.
    pub fn harness_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (store, scaling) in &self.scaling {
            if scaling.errors > 0 {
                problems.push(format!("scaling on {store}: {} errors or non-201s", scaling.errors));
            }
        }
        for config in self.configs.iter() {
            let name = &config.name;
            if config.closed.requests() == 0 {
                problems.push(format!("{name}: no request completed"));
            }
            if config.closed.errors > 0 {
                problems.push(format!("{name}: {} transport errors", config.closed.errors));
            }
            let allowed: &[u16] =
                if config.scenario == Scenario::Race { &[201, 409] } else { &[201] };
            if config.closed.statuses.keys().any(|status| !allowed.contains(status)) {
                problems.push(format!("{name}: unexpected statuses ({})", statuses(config)));
            }
            let trips = per_request(config.round_trips, config);
            match config.scenario {
                Scenario::Fresh if (trips - 2.0).abs() > 0.05 => {
                    problems.push(format!(
                        "{name}: {trips:.3} store round trips per request, expected 2"
                    ));
                }
                Scenario::Replay
                    if (trips - 1.0).abs() > 0.05
                        || config.closed.replays != config.closed.requests() =>
                {
                    problems.push(format!(
                        "{name}: {trips:.3} round trips per request and {} replays of {}",
                        config.closed.replays,
                        config.closed.requests()
                    ));
                }
                Scenario::Race if config.upstream_calls > config.keys_used => {
                    problems.push(format!(
                        "{name}: {} upstream runs for {} keys",
                        config.upstream_calls, config.keys_used
                    ));
                }
                _ => {}
            }
        }
        if self.hold_failed > 0 {
            problems.push(format!("{} of {} held connections failed", self.hold_failed, self.hold));
        }
        problems
    }

    pub fn markdown(&mut self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# Benchmarks\n");
        let _ = writeln!(
            out,
            "What idempotency costs, measured side by side in one run. Produced on {} by:\n",
            Self::date()
        );
        let _ = writeln!(
            out,
            "```sh\ncargo build --release -p idem -p idem-bench\n{}\n```\n",
            self.command.replace(
                &std::env::current_exe().map(|path| path.display().to_string()).unwrap_or_default(),
                "target/release/idem-bench",
            )
        );
        let _ = writeln!(
            out,
            "Machine: {}. The upstream (a small hyper server, {:?} of work per request, one thread), the load generator (this binary), the gateway and the stores all share it, so every number includes their competition for two cores; the ratios are the point. Each configuration ran {} alternating rounds of {:?}: every round runs every configuration once, in the same order, so drift hits all alike.\n",
            Self::machine(),
            self.delay,
            self.rounds,
            self.duration
        );
        let _ = writeln!(
            out,
            "Each request is a `POST /orders` with a 46-byte JSON body; the upstream answers `201` with a small JSON body. Latency is measured by the client, per request.\n"
        );

        let direct = rps(&self.configs[0]);
        let _ = writeln!(
            out,
            "## Fixed concurrency: {} keep-alive connections, as fast as they go\n",
            self.concurrency
        );
        let _ = writeln!(
            out,
            "| configuration | req/s (median) | rounds | × direct | p50 ms | p99 ms | p99.9 ms | gateway CPU s / 1k req | store round trips / req | responses |"
        );
        let _ =
            writeln!(out, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |");
        let mut closed_p99 = std::collections::HashMap::new();
        for index in 0..self.configs.len() {
            let config = &mut self.configs[index];
            let row_rps = rps(config);
            let (p50, p99, p999) = (
                config.closed.quantile_ms(0.5),
                config.closed.quantile_ms(0.99),
                config.closed.quantile_ms(0.999),
            );
            closed_p99.insert(config.name.clone(), p99);
            let cpu = if config.pid.is_some() {
                format!("{:.3}", per_request(config.cpu_seconds, config) * 1000.0)
            } else {
                "–".into()
            };
            let trips = if config.admin.is_some() {
                format!("{:.2}", per_request(config.round_trips, config))
            } else {
                "–".into()
            };
            let mut responses = statuses(config);
            if config.scenario == Scenario::Race {
                let _ = write!(
                    responses,
                    "; upstream ran {} times for {} keys",
                    config.upstream_calls, config.keys_used
                );
            }
            let _ = writeln!(
                out,
                "| {} | {row_rps:.0} | {} | {:.2} | {p50:.2} | {p99:.2} | {p999:.2} | {cpu} | {trips} | {responses} |",
                config.name,
                rounds(&config.per_round, 0),
                row_rps / direct
            );
        }
        if let Some(floor) = &self.floor {
            let _ = writeln!(
                out,
                "| pgbench: a fresh key's two commits, directly on PostgreSQL ({} clients) | {:.0} | {} | {:.2} | – | – | – | – | – | – |",
                self.concurrency,
                median(floor),
                rounds(floor, 0),
                median(floor) / direct
            );
        }

        let _ = writeln!(out, "\n## Fixed rate: each configuration at half of its own maximum\n");
        let _ = writeln!(
            out,
            "Latency counts from when each request was due, so queueing shows. Each idempotent row is paired with pass-through at the same rate, run right after it: the last column is the p99 latency idem's idempotency adds.\n"
        );
        let _ = writeln!(
            out,
            "| configuration | req/s offered | p50 ms | p99 ms | p99.9 ms | pass-through p99 ms | p99 added, ms |"
        );
        let _ = writeln!(out, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
        for config in self.configs.iter_mut() {
            let (name, rate) = (config.name.clone(), config.rate);
            let pass_p99 = config.paired.as_mut().map(|paired| paired.quantile_ms(0.99));
            let Some(open) = config.open.as_mut() else { continue };
            let (p50, p99, p999) =
                (open.quantile_ms(0.5), open.quantile_ms(0.99), open.quantile_ms(0.999));
            let (pass, added) = match pass_p99 {
                Some(pass) => (format!("{pass:.2}"), format!("{:+.2}", p99 - pass)),
                None => ("–".into(), "–".into()),
            };
            let _ = writeln!(
                out,
                "| {name} | {rate:.0} | {p50:.2} | {p99:.2} | {p999:.2} | {pass} | {added} |"
            );
        }

        if !self.scaling.is_empty() {
            let _ = writeln!(
                out,
                "\n## Scaling out: gateways sharing one store\n\nFresh keys, {} connections in all, spread over 1, 2 or 3 `idem serve` processes on the same store; median of the rounds (each round's figures in brackets). Every process shares this machine's two cores with the store and the load generator, so this measures what sharing a store costs, not what more hosts would add.\n",
                self.concurrency
            );
            let _ = writeln!(out, "| store | 1 gateway | 2 gateways | 3 gateways | 3 ÷ 1 |");
            let _ = writeln!(out, "| --- | ---: | ---: | ---: | ---: |");
            for (store, scaling) in &self.scaling {
                let medians = scaling.medians();
                let cells: Vec<String> = medians
                    .iter()
                    .zip(&scaling.per_round)
                    .map(|(median, rounds_of)| format!("{median:.0} ({})", rounds(rounds_of, 0)))
                    .collect();
                let ratio = medians.last().zip(medians.first()).map_or(0.0, |(a, b)| a / b);
                let _ = writeln!(out, "| {store} | {} | {ratio:.2} |", cells.join(" | "));
            }
            let _ = writeln!(
                out,
                "\nThe same runs' p99 latency in ms, at full load (every connection sending as fast as it is answered):\n"
            );
            let _ = writeln!(out, "| store | 1 gateway | 2 gateways | 3 gateways |");
            let _ = writeln!(out, "| --- | ---: | ---: | ---: |");
            for (store, scaling) in &self.scaling {
                let cells: Vec<String> = scaling
                    .p99_medians()
                    .iter()
                    .zip(&scaling.p99_per_round)
                    .map(|(median, of)| format!("{median:.2} ({})", rounds(of, 2)))
                    .collect();
                let _ = writeln!(out, "| {store} | {} |", cells.join(" | "));
            }
        }

        let _ = writeln!(out, "\n## Memory\n");
        let _ = writeln!(
            out,
            "With {} keep-alive connections held open on a gateway started for this check (memory store, each connection after one request): RSS {:.1} MiB, peak {:.1} MiB. The gateways above hold every record their runs stored (no TTL passes within the run), which is what their peaks below measure.\n",
            self.hold,
            self.held_rss_kib as f64 / 1024.0,
            self.peak_rss_kib as f64 / 1024.0
        );
        let _ = writeln!(out, "| gateway | peak RSS MiB |\n| --- | ---: |");
        for (name, kib) in &self.gateways {
            let _ = writeln!(out, "| idem on {name} | {:.1} |", *kib as f64 / 1024.0);
        }

        let _ = writeln!(out, "\n## Targets\n");
        let _ = writeln!(out, "| target | measured | met |\n| --- | --- | --- |");
        let ratio = |a: Option<&Config>, b: Option<&Config>| a.zip(b).map(|(a, b)| rps(a) / rps(b));
        // The p99 each fresh-key row adds at half its own maximum rate, by store.
        let mut added_p99 = std::collections::HashMap::new();
        for config in self.configs.iter_mut().filter(|config| config.scenario == Scenario::Fresh) {
            let Some(pass) = config.paired.as_mut().map(|paired| paired.quantile_ms(0.99)) else {
                continue;
            };
            if let Some(open) = config.open.as_mut() {
                let store = config.name.trim_start_matches("idem, fresh key, ").to_owned();
                added_p99.insert(store, open.quantile_ms(0.99) - pass);
            }
        }
        let pass = self.find(Scenario::PassThrough, "(pass-through)");
        let target = |out: &mut String,
                      what: &str,
                      measured: Option<f64>,
                      unit: &str,
                      met: &dyn Fn(f64) -> bool| {
            let _ = match measured {
                Some(value) if value.is_finite() => writeln!(
                    out,
                    "| {what} | {value:.2}{unit} | {} |",
                    if met(value) { "yes" } else { "**no**" }
                ),
                _ => writeln!(out, "| {what} | not measured | – |"),
            };
        };
        let nginx = self.configs.iter().find(|config| config.scenario == Scenario::Nginx);
        target(&mut out, "pass-through ≥ 1.0 × nginx req/s", ratio(pass, nginx), "×", &|r| {
            r >= 1.0
        });
        let p99 = |config: Option<&Config>| config.and_then(|c| closed_p99.get(&c.name).copied());
        target(
            &mut out,
            "pass-through p99 ≤ 1.5 × nginx's",
            p99(pass).zip(p99(nginx)).map(|(a, b)| a / b),
            "×",
            &|r| r <= 1.5,
        );
        for (store, floor) in [("memory", 0.9), ("sqlite", 0.7), ("redis", 0.6), ("postgres", 0.4)]
        {
            target(
                &mut out,
                &format!("fresh key, {store} ≥ {floor} × pass-through"),
                ratio(self.find(Scenario::Fresh, store), pass),
                "×",
                &|r| r >= floor,
            );
        }
        if let Some(floor) = &self.floor {
            target(
                &mut out,
                "fresh key, postgres ≥ 1.2 × the pgbench floor",
                self.find(Scenario::Fresh, "postgres").map(|config| rps(config) / median(floor)),
                "×",
                &|r| r >= 1.2,
            );
        }
        for (store, limit) in [("memory", 1.0), ("sqlite", 2.0), ("redis", 2.0), ("postgres", 2.0)]
        {
            target(
                &mut out,
                &format!("fresh key, {store}: p99 added < {limit} ms at half its maximum rate"),
                added_p99.get(store).copied(),
                " ms",
                &|ms| ms < limit,
            );
        }
        for store in ["memory", "sqlite", "redis", "postgres"] {
            target(
                &mut out,
                &format!("replay, {store} ≥ 1.2 × pass-through"),
                ratio(self.find(Scenario::Replay, store), pass),
                "×",
                &|r| r >= 1.2,
            );
        }
        let trips =
            |config: Option<&Config>| config.map(|config| per_request(config.round_trips, config));
        target(
            &mut out,
            "store round trips per fresh key = 2",
            trips(self.find(Scenario::Fresh, "sqlite")),
            "",
            &|t| (t - 2.0).abs() < 0.05,
        );
        target(
            &mut out,
            "store round trips per replay = 1",
            trips(self.find(Scenario::Replay, "sqlite")),
            "",
            &|t| (t - 1.0).abs() < 0.05,
        );
        target(
            &mut out,
            &format!("gateway RSS < 64 MiB with {} connections", self.hold),
            Some(self.held_rss_kib as f64 / 1024.0),
            " MiB",
            &|m| m < 64.0,
        );
        let inbox_ratio = self.messaging.map(|m| m.inbox_batch.median() / m.plain_batch.median());
        target(
            &mut out,
            "inbox consumer ≥ 0.9 × plain consumer (batches of 100, a transaction per batch)",
            inbox_ratio,
            "×",
            &|r| r >= 0.9,
        );
        if !self.nginx_found {
            let _ = writeln!(
                out,
                "\nnginx was not installed, so the nginx row and its target are missing."
            );
        }
        match self.messaging {
            Some(messaging) => out.push_str(&messaging_section(messaging)),
            None => {
                let _ = writeln!(
                    out,
                    "\nThe messaging rows were not measured: they need both `--postgres` and `--nats`."
                );
            }
        }
        let _ = writeln!(out, "\n![requests per second by configuration](BENCHMARKS.svg)");
        out
    }

    /// A horizontal bar chart of requests per second.
    pub fn svg(&self) -> String {
        let rows: Vec<(String, f64)> =
            self.configs.iter().map(|config| (config.name.clone(), rps(config))).collect();
        let max = rows.iter().map(|(_, value)| *value).fold(1.0, f64::max);
        let (label_width, bar_width, row_height) = (300.0, 420.0, 26.0);
        let height = 50.0 + row_height * rows.len() as f64;
        let mut svg = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"13\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
             <text x=\"10\" y=\"22\" font-size=\"15\" font-weight=\"bold\">Requests per second, {} connections (higher is better)</text>\n",
            self.concurrency,
            w = label_width + bar_width + 90.0
        );
        for (index, (name, value)) in rows.iter().enumerate() {
            let y = 40.0 + index as f64 * row_height;
            let width = bar_width * value / max;
            let color = if name.starts_with("idem") { "#3b7dd8" } else { "#9aa5b1" };
            let _ = writeln!(
                svg,
                "<text x=\"{:.0}\" y=\"{:.0}\" text-anchor=\"end\">{}</text>",
                label_width - 8.0,
                y + 16.0,
                name.replace('&', "&amp;").replace('<', "&lt;")
            );
            let _ = writeln!(
                svg,
                "<rect x=\"{label_width}\" y=\"{y:.0}\" width=\"{width:.1}\" height=\"{:.0}\" fill=\"{color}\"/>",
                row_height - 6.0
            );
            let _ = writeln!(
                svg,
                "<text x=\"{:.1}\" y=\"{:.0}\">{value:.0}</text>",
                label_width + width + 6.0,
                y + 16.0
            );
        }
        svg.push_str("</svg>\n");
        svg
    }
}

pub fn messaging_section(results: &crate::messaging::Results) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n## Messaging: PostgreSQL and NATS JetStream\n\n{} messages per run, {} rounds; each round runs every variant once, alternating which goes first. \
         The consumers apply each payment to one of 1,000 account balances, through the consumer runner at batches of {} (a pool of 32 connections): \
         either each payment in a transaction of its own (`consume::run`; the inbox adds one INSERT to each transaction, sent with the credit by `Inbox::apply`, or awaited before it by `Inbox::record`) or each batch in one transaction \
         (`consume::run_batches`; the inbox adds one INSERT of the batch's ids, `Inbox::record_many`), or through the offsets mode (each payment's transaction advances its partition's position, `Offsets::advance`; one partition per key, read with `JetStreamPartitions`; its ratio is to the first row). The publishers send events over 100 keys, a layer of one event per key at a time; \
         the relay also claims the keys, reads the events and records how far each key got, one row per key per round. Each ratio compares a row with the first row of its kind.\n",
        results.messages,
        results.rounds,
        crate::messaging::BATCH,
    );
    let _ = writeln!(
        out,
        "| variant | msg/s per round | median msg/s | ratio |\n| --- | --- | ---: | ---: |"
    );
    for (row, base) in [
        (&results.plain, &results.plain),
        (&results.inbox, &results.plain),
        (&results.inbox_record, &results.plain),
        (&results.plain_batch, &results.plain_batch),
        (&results.inbox_batch, &results.plain_batch),
        (&results.offsets, &results.plain),
        (&results.direct, &results.direct),
        (&results.relay, &results.direct),
    ] {
        let rounds: Vec<String> = row.per_round.iter().map(|rate| format!("{rate:.0}")).collect();
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {:.2} |",
            row.name,
            rounds.join(" / "),
            row.median(),
            row.median() / base.median()
        );
    }
    out
}
