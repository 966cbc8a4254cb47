//! The Grafana dashboard (`deploy/grafana/idem-dashboard.json`) and the Prometheus alert rules
//! (`deploy/prometheus/idem-alerts.yml`) name only metrics that the real processes export. A
//! rule on a misspelt or renamed metric never fires and a panel on one stays empty, silently:
//! here every metric name in every PromQL expression is looked up in what a real gateway
//! (`idem serve` on its own Redis), a real relay (`idem relay --metrics-listen` on PostgreSQL
//! and NATS JetStream) and a real consumer (`consume::run` burying a poison message into
//! PostgreSQL) export after traffic that makes each counter appear: runs, a replay, a
//! mismatch, a conflict, a client timeout, a rejection, an outcome unknown (the upstream's
//! connection cut mid-call), an unreachable upstream, a store killed under the gateway, an
//! event that cannot be published (parked), and a dead letter.
//!
//! The YAML is read with a real YAML parser (yaml-rust2), not a line scan, so a rule written
//! over several lines (`expr: >-`) is read whole.

mod common;

use common::free_port;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use common::{Cutter, Gateway, PrivateRedis, TestClient, Upstream, idem_bin, temp_dir, unique};
use http::StatusCode;
use idem_core::conformance::{fresh_postgres_schema, service_url};
use idem_stream::consume::{self, Failure, Received, RunnerConfig};
use idem_stream::nats::JetStreamSubscription;
use idem_stream::postgres::{DeadLetters, Event, Inbox, Outbox};
use tokio_postgres::NoTls;
use yaml_rust2::{Yaml, YamlLoader};

const DASHBOARD: &str = include_str!("../../../deploy/grafana/idem-dashboard.json");
const ALERTS: &str = include_str!("../../../deploy/prometheus/idem-alerts.yml");

/// Words of PromQL that are not metric names: aggregation operators, binary operators and
/// modifiers. (Function names are told by the `(` after them.)
const KEYWORDS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
    "atan2",
];

/// Modifiers followed by a list of label names in parentheses, skipped whole.
const LABEL_LISTS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];

/// The metric names a PromQL expression reads: identifiers outside label matchers (`{...}`),
/// ranges (`[...]`), strings, label lists (`by (...)`), Grafana variables (`$x`, `${x}`) and
/// numbers, that are neither a function (followed by `(`) nor a keyword. Names are returned as
/// written: a histogram is read through its `_bucket`, `_sum` and `_count` series, and those
/// are what /metrics shows, so they are looked up as they are.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let skip_string = |mut i: usize| {
        let quote = chars[i];
        i += 1;
        while i < chars.len() && chars[i] != quote {
            i += if chars[i] == '\\' { 2 } else { 1 };
        }
        i + 1
    };
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(i);
        } else if c == '{' || c == '[' {
            let close = if c == '{' { '}' } else { ']' };
            i += 1;
            while i < chars.len() && chars[i] != close {
                i = if chars[i] == '"' || chars[i] == '\'' { skip_string(i) } else { i + 1 };
            }
            i += 1;
        } else if c == '$' {
            i += 1;
            if chars.get(i) == Some(&'{') {
                while i < chars.len() && chars[i] != '}' {
                    i += 1;
                }
                i += 1;
            } else {
                while i < chars.len() && is_word(chars[i]) {
                    i += 1;
                }
            }
        } else if c.is_ascii_digit() || c == '.' {
            // A number or a duration (0.99, 1e3, 15m, 1h30m).
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && is_word(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let called = chars.get(next) == Some(&'(');
            if LABEL_LISTS.contains(&word.as_str()) {
                if called {
                    while i < chars.len() && chars[i] != ')' {
                        i += 1;
                    }
                    i += 1;
                }
            } else if !called && !KEYWORDS.contains(&word.to_ascii_lowercase().as_str()) {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// Every PromQL expression in the dashboard and the rules, with where it is.
fn expressions() -> Vec<(String, String)> {
    let mut found = Vec::new();
    let dashboard: serde_json::Value =
        serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    let templating = dashboard["templating"]["list"].as_array().expect("templating.list");
    assert!(
        templating.iter().any(|t| t["type"] == "datasource" && t["name"] == "datasource"),
        "the dashboard has a `datasource` variable, so it imports on any Prometheus"
    );
    fn panels(list: &serde_json::Value, found: &mut Vec<(String, String)>) {
        for panel in list.as_array().into_iter().flatten() {
            panels(&panel["panels"], found);
            let title = panel["title"].as_str().unwrap_or("?");
            if panel["type"] != "row" {
                assert_eq!(
                    panel["datasource"]["uid"], "${datasource}",
                    "panel {title:?} reads the dashboard's datasource variable"
                );
            }
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str().expect("every target has an expr");
                found.push((format!("dashboard panel {title:?}"), expr.to_owned()));
            }
        }
    }
    panels(&dashboard["panels"], &mut found);
    let panel_count = found.len();
    assert!(panel_count >= 10, "the dashboard's targets were read: {panel_count}");

    let documents = YamlLoader::load_from_str(ALERTS).expect("the rules are YAML");
    let groups = documents[0]["groups"].as_vec().expect("groups: a list");
    for group in groups {
        for rule in group["rules"].as_vec().expect("rules: a list") {
            let name = rule["alert"].as_str().expect("every rule is an alert");
            let expr = rule["expr"].as_str().unwrap_or_else(|| panic!("{name}: expr"));
            // What the brief for these rules asks of each: a duration, a severity, and text
            // that tells the person paged what it means and what to do.
            assert!(!matches!(rule["for"], Yaml::BadValue), "{name}: a `for:` duration");
            let severity = rule["labels"]["severity"].as_str();
            assert!(
                matches!(severity, Some("critical" | "warning")),
                "{name}: severity critical or warning, not {severity:?}"
            );
            for annotation in ["summary", "description"] {
                let text = rule["annotations"][annotation].as_str().unwrap_or_default();
                assert!(text.len() > 20, "{name}: a {annotation} annotation");
            }
            found.push((format!("alert {name}"), expr.to_owned()));
        }
    }
    assert!(found.len() - panel_count >= 8, "the rules' expressions were read");
    found
}

/// The metric names PromQL reads, each with where it is read; `up` (Prometheus's own, per
/// scrape target) left out.
fn referenced_metrics() -> BTreeMap<String, Vec<String>> {
    let mut referenced: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (place, expr) in expressions() {
        let names = metric_names(&expr);
        assert!(!names.is_empty(), "{place}: no metric name found in {expr:?}");
        for name in names.into_iter().filter(|name| name != "up") {
            referenced.entry(name).or_default().push(place.clone());
        }
    }
    referenced
}

/// The series names on a Prometheus text page (`name{labels} value` or `name value`).
fn exported_names(page: &str) -> BTreeSet<String> {
    page.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// The sum of every series of `name` on a parsed page.
fn total(page: &HashMap<String, f64>, name: &str) -> f64 {
    page.iter()
        .filter(|(series, _)| {
            series.strip_prefix(name).is_some_and(|rest| rest.is_empty() || rest.starts_with('{'))
        })
        .map(|(_, value)| value)
        .sum()
}

#[test]
fn metric_names_are_read_from_promql_as_prometheus_reads_them() {
    let cases: &[(&str, &[&str])] = &[
        (
            "histogram_quantile(0.99, sum by (op, le) (rate(idem_store_duration_seconds_bucket{op=~\"claim|complete\"}[5m]))) > 0.25",
            &["idem_store_duration_seconds_bucket"],
        ),
        ("up{job=\"idem\"} == 0", &["up"]),
        ("idem_dead_letters - idem_dead_letters offset 15m > 0", &["idem_dead_letters"]),
        (
            "sum by (reason) (rate(idem_rejected_total[$__rate_interval])) / ignoring(reason) group_left sum(rate(idem_executions_total{a='}'}[${interval}]))",
            &["idem_executions_total", "idem_rejected_total"],
        ),
        (
            "sum without (instance) (increase(idem_dead_lettered_total[1h30m])) and on (job) max(x:recorded:rate5m) > bool 1e3",
            &["idem_dead_lettered_total", "x:recorded:rate5m"],
        ),
    ];
    for (expr, expected) in cases {
        let expected: BTreeSet<String> = expected.iter().map(|s| (*s).to_owned()).collect();
        assert_eq!(metric_names(expr), expected, "{expr}");
    }
}

/// `idem relay` as a child process, killed when dropped.
struct RelayProcess(Child);

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn fetch_metrics(addr: std::net::SocketAddr) -> String {
    let (status, page) = TestClient::new(addr).get_text("/metrics").await;
    assert_eq!(status, StatusCode::OK, "/metrics on {addr}: {page}");
    page
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_metric_the_dashboard_and_alerts_read_is_exported() {
    let referenced = referenced_metrics();
    let Some(nats) = service_url("IDEM_TEST_NATS_URL") else { return };
    if service_url("IDEM_TEST_REDIS_URL").is_none() {
        return;
    }
    let Some(database) = fresh_postgres_schema("idem_observability").await else { return };
    // This process plays the application that runs a consumer and exports its metrics.
    let consumer_metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .expect("the test's metrics recorder");

    // The outbox side: one event consumers reject (buried after its last attempt), one good
    // one, and one for a subject no stream takes (its key is parked after one attempt).
    let (mut client, connection) = tokio_postgres::connect(&database, NoTls).await.unwrap();
    tokio::spawn(connection);
    Outbox::migrate(&mut client).await.unwrap();
    Inbox::migrate(&mut client).await.unwrap();
    let jetstream = jetstream::new(async_nats::connect(&nats).await.unwrap());
    let pid = std::process::id();
    let (stream_name, subject) = (format!("IDEMTEST_OBS_{pid}"), format!("idemtest.obs.{pid}.ok"));
    let _ = jetstream.delete_stream(&stream_name).await;
    let stream = jetstream
        .create_stream(stream::Config {
            name: stream_name.clone(),
            subjects: vec![subject.clone()],
            ..Default::default()
        })
        .await
        .unwrap();
    let nowhere = format!("idemtest.obs.{pid}.nostream");
    let transaction = client.transaction().await.unwrap();
    for (topic, key, payload) in [
        (subject.as_str(), "order-1", "poison"),
        (subject.as_str(), "order-2", "fine"),
        (nowhere.as_str(), "order-3", "lost"),
    ] {
        let event = Event { topic, key, payload: payload.as_bytes(), headers: &[] };
        Outbox::enqueue(&transaction, event).await.unwrap();
    }
    transaction.commit().await.unwrap();

    let relay_metrics: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut relay = RelayProcess(
        Command::new(idem_bin())
            .args(["relay", "--database", &database, "--broker", &nats])
            .args(["--poll-interval", "100ms", "--max-attempts", "1"])
            .args(["--metrics-listen", &relay_metrics.to_string()])
            .env("IDEM_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start idem relay"),
    );
    let mut line = String::new();
    BufReader::new(relay.0.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert!(line.starts_with("idem relay running"), "unexpected first line {line:?}");

    let handler = |message: Received| async move {
        if message.payload.as_ref() == b"poison" {
            return Err(Failure::rejected("poison: always fails"));
        }
        Ok::<(), Failure>(())
    };
    let dead_letters = Arc::new(DeadLetters::connect(&database, "orders").unwrap());
    let config = RunnerConfig {
        max_attempts: 2,
        backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(100),
        fetch_wait: Duration::from_millis(100),
        ..RunnerConfig::default()
    };
    let subscription =
        JetStreamSubscription::durable(&stream, "orders", Duration::from_secs(2)).await.unwrap();
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let consumer =
        tokio::spawn(consume::run(subscription, handler, dead_letters, config, async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        }));

    // The gateway side, on a Redis of its own (killed at the end: store errors), behind a
    // forwarder that cuts the upstream's connections (outcome unknown, then unreachable).
    let dir = temp_dir();
    let redis_port = free_port();
    let Some(redis) = PrivateRedis::start(redis_port, &dir) else { return };
    let upstream = Upstream::start().await;
    let cutter = Cutter::start(upstream.addr).await;
    let gateway = Gateway::start(
        &format!("http://{}", cutter.addr),
        &format!("redis://127.0.0.1:{redis_port}"),
        &["--upstream-timeout", "1s"],
    );
    let client = gateway.client();
    let key = unique("obs");
    assert_eq!(client.post(&key, "a", &[]).await.status, StatusCode::CREATED, "a run");
    assert!(client.post(&key, "a", &[]).await.is_replay(), "a replay");
    client.post(&key, "b", &[]).await.assert_problem(422, "key-mismatch");
    let slow = unique("obs-slow");
    let first = tokio::spawn({
        let (client, slow) = (client.clone(), slow.clone());
        async move { client.post(&slow, "c", &[("x-test-delay-ms", "1500")]).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    client.post(&slow, "c", &[]).await.assert_problem(409, "request-in-flight");
    first.await.unwrap().assert_problem(504, "upstream-timeout");
    client.post("not a valid key", "d", &[]).await.assert_problem(400, "invalid-key");
    let passed = client.send("POST", "/orders", &[], "no key").await;
    assert_eq!(passed.status, StatusCode::CREATED, "a request without a key passes through");

    // Outcome unknown: the upstream has the request when its connection is cut.
    let lost = unique("obs-lost");
    let cut_off = tokio::spawn({
        let (client, lost) = (client.clone(), lost.clone());
        async move { client.post(&lost, "e", &[("x-test-delay-ms", "3000")]).await }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cutter.cut();
    cut_off.await.unwrap().assert_problem(504, "upstream-timeout");
    let started = Instant::now();
    loop {
        let retry = client.post(&lost, "e", &[]).await;
        if retry.status == StatusCode::BAD_GATEWAY {
            retry.assert_problem(502, "outcome-unknown");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "no outcome-unknown: {retry:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Unreachable: nothing listens where the upstream was (once the forwarder's listener is
    // gone; until then it takes connections and drops them, which is not the same failure).
    drop(cutter);
    let started = Instant::now();
    loop {
        let reply = client.post(&unique("obs-unreachable"), "f", &[]).await;
        if reply.status == StatusCode::BAD_GATEWAY
            && reply.json()["type"] == "urn:idem:problem:upstream-unreachable"
        {
            reply.assert_problem(502, "upstream-unreachable");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "still reachable: {reply:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(upstream.calls(), 4, "the run, the slow one, the pass-through, the lost one");

    // The key inventory is read from the store every few seconds: give it the time to see
    // the key held with an unknown outcome before the store goes away.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(15) {
        let page = common::metrics(&fetch_metrics(gateway.admin).await);
        if total(&page, "idem_keys_outcome_unknown") >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    redis.kill9();
    client.post(&unique("obs-store"), "g", &[]).await.assert_problem(503, "store-unavailable");
    let gateway_page = fetch_metrics(gateway.admin).await;

    // The consumer buried the poison message; the relay's gauges (every 5 s) show the dead
    // letter and the parked key.
    let started = Instant::now();
    let relay_page = loop {
        let page = fetch_metrics(relay_metrics).await;
        let parsed = common::metrics(&page);
        if total(&parsed, "idem_dead_letters") == 1.0
            && total(&parsed, "idem_outbox_parked_keys") == 1.0
        {
            break page;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the relay's /metrics never showed 1 dead letter and 1 parked key:\n{page}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let _ = stop.send(true);
    let report = consumer.await.unwrap();
    assert_eq!(report.dead_lettered, 1, "{report:?}");
    assert_eq!(report.handled, 1, "{report:?}");
    let consumer_page = consumer_metrics.render();
    drop(relay);
    let _ = jetstream.delete_stream(&stream_name).await;

    let gateway_values = common::metrics(&gateway_page);
    for (name, at_least) in [
        ("idem_executions_total", 1.0),
        ("idem_replays_total", 1.0),
        ("idem_mismatches_total", 1.0),
        ("idem_conflicts_total", 1.0),
        ("idem_outcome_unknown_total", 1.0),
        ("idem_upstream_unreachable_total", 1.0),
        ("idem_store_errors_total", 1.0),
        ("idem_client_timeouts_total", 2.0),
    ] {
        let value = total(&gateway_values, name);
        assert!(value >= at_least, "{name} = {value}, expected at least {at_least}");
    }
    let consumer_values = common::metrics(&consumer_page);
    assert_eq!(total(&consumer_values, "idem_dead_lettered_total"), 1.0, "{consumer_page}");

    let mut exported = BTreeMap::new();
    for (source, page) in
        [("gateway", &gateway_page), ("relay", &relay_page), ("consumer", &consumer_page)]
    {
        for name in exported_names(page) {
            exported.entry(name).or_insert(source);
        }
    }
    let missing: Vec<String> = referenced
        .iter()
        .filter(|(name, _)| !exported.contains_key(*name))
        .map(|(name, places)| format!("{name} (read by {})", places.join(", ")))
        .collect();
    println!(
        "observability: {} metric names read by the dashboard and the alerts, {} exported by the gateway, relay and consumer",
        referenced.len(),
        exported.len()
    );
    assert!(
        missing.is_empty(),
        "the dashboard or the alerts read metrics that nothing exports:\n  {}\n\ngateway /metrics:\n{gateway_page}\nrelay /metrics:\n{relay_page}",
        missing.join("\n  ")
    );
}
