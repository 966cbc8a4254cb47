//! The admin listener: `/healthz` for load balancers, `/metrics` for Prometheus, and the
//! operator page at `/` with its JSON API under `/api/`.
//!
//! The page shows what is stuck and why: the keyed calls this gateway is running (the longest
//! first, stuck ones flagged), keys it held with an unknown outcome (with a release action), the
//! rates of runs, replays, conflicts, mismatches, unknown outcomes and store errors, the store's
//! health and latency, an application's outbox when `--outbox-database` names one, and its
//! consumers' dead letters when `--dead-letters-database` does (with `--dead-letters-broker`,
//! a requeue action). What
//! it shows of keys comes from this process's memory: reading it never scans the store.
//!
//! Access: with `--admin-token` every route but `/healthz` needs `Authorization: Bearer TOKEN`
//! or the cookie the page sets after `/?token=TOKEN`. Without one (allowed on loopback only),
//! requests must name a loopback host, so a web page elsewhere cannot reach the API through DNS
//! rebinding. Actions are POSTs with a JSON body and an `x-idem-admin` header, which a browser
//! never sends cross-site without asking first.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::rejection::JsonRejection;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use idem_core::{Engine, IdempotencyKey, RecordKey, Scope};
use idem_http::{HeldKeys, RunningKeys};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::keys::{Released, holds_unknown_outcome, release_held};

/// How often the store is pinged, held keys checked, calls counted and rates sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// Rates are kept for this long (one sample per `SAMPLE_EVERY`).
const SAMPLES_KEPT: usize = 15 * 60 / 5 + 1;
/// Running calls shown on the page (the longest running first).
const RUNNING_SHOWN: usize = 100;
/// Held keys checked against the store per sample, and the time all of them may take.
const HELD_CHECKED: usize = 100;
const HELD_CHECK_BUDGET: Duration = Duration::from_secs(2);
/// Held keys remembered by this process.
pub const HELD_KEYS_KEPT: usize = 1_000;
const COOKIE: &str = "idem_admin";

/// A secret that never shows in logs or `Debug` output: the token's digest, and the session
/// value a browser's cookie holds instead of the token itself (derived with a secret made
/// for this process, so it is good for this gateway until it restarts, and is never a bearer
/// token).
#[derive(Clone)]
pub struct AdminToken(Arc<([u8; 32], String)>);

impl AdminToken {
    pub fn new(token: &str) -> Self {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).expect("the operating system's random numbers");
        let mut session = Sha256::new();
        session.update(b"idem admin session\0");
        session.update(secret);
        session.update(token.as_bytes());
        let session: String = session.finalize().iter().map(|byte| format!("{byte:02x}")).collect();
        Self(Arc::new((Sha256::digest(token.as_bytes()).into(), session)))
    }

    /// Compared by digest, in time independent of where the texts differ.
    fn accepts(&self, offered: &str) -> bool {
        same(&Sha256::digest(offered.as_bytes()).into(), &self.0.0)
    }

    fn accepts_session(&self, offered: &str) -> bool {
        let want: [u8; 32] = Sha256::digest(self.0.1.as_bytes()).into();
        same(&Sha256::digest(offered.as_bytes()).into(), &want)
    }
}

fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b.iter()).fold(0u8, |diff, (a, b)| diff | (a ^ b)) == 0
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

/// What the admin listener serves from.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub token: Option<AdminToken>,
    pub stuck_after: Duration,
    pub outbox_database: Option<String>,
    /// The consumers' database whose dead letters the page shows, and the broker (and
    /// RabbitMQ exchange) that puts them back.
    pub dead_letters_database: Option<String>,
    pub dead_letters_broker: Option<String>,
    pub dead_letters_exchange: String,
    /// The store's URL with any password removed, for the page.
    pub store_name: String,
}

#[derive(Clone)]
struct AdminState {
    engine: Engine,
    metrics: PrometheusHandle,
    held: HeldKeys,
    running: RunningKeys,
    config: Arc<AdminConfig>,
    watch: Arc<Mutex<Watch>>,
}

/// What the sampler last saw.
#[derive(Default)]
struct Watch {
    health: Option<Health>,
    samples: VecDeque<(Instant, Counts)>,
}

#[derive(Clone)]
struct Health {
    at: SystemTime,
    latency: Duration,
    error: Option<String>,
}

/// The counters the page shows rates of, summed over their labels.
#[derive(Clone, Copy, Default)]
struct Counts([f64; 6]);

const COUNTED: [(&str, &str); 6] = [
    ("runs", "idem_executions_total"),
    ("replays", "idem_replays_total"),
    ("conflicts", "idem_conflicts_total"),
    ("mismatches", "idem_mismatches_total"),
    ("unknown", "idem_outcome_unknown_total"),
    ("store_errors", "idem_store_errors_total"),
];

impl Counts {
    /// Reads the counters from the Prometheus page this process serves.
    fn read(page: &str) -> Self {
        let mut counts = Self::default();
        for line in page.lines().filter(|line| !line.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else { continue };
            let name = series.split('{').next().unwrap_or(series);
            if let Some(slot) = COUNTED.iter().position(|(_, counted)| *counted == name) {
                counts.0[slot] += value.parse::<f64>().unwrap_or(0.0);
            }
        }
        counts
    }
}

/// The admin router, and the task that samples the store and counters for it.
pub fn router(
    engine: Engine,
    metrics: PrometheusHandle,
    (held, running): (HeldKeys, RunningKeys),
    config: AdminConfig,
) -> (Router, impl std::future::Future<Output = ()> + Send) {
    let state = AdminState {
        engine,
        metrics,
        held,
        running,
        config: Arc::new(config),
        watch: Arc::new(Mutex::new(Watch::default())),
    };
    let guarded = Router::new()
        .route("/", get(page))
        .route("/metrics", get(render_metrics))
        .route("/api/overview", get(overview))
        .route("/api/keys/release", post(release_key))
        .route("/api/outbox", get(outbox))
        .route("/api/outbox/retry", post(retry_outbox_key))
        .route("/api/dead-letters", get(dead_letters))
        .route("/api/dead-letters/requeue", post(requeue_dead_letter))
        .layer(middleware::from_fn_with_state(state.clone(), guard));
    let router = Router::new()
        .route("/healthz", get(healthz))
        .merge(guarded)
        .fallback(|| async { problem(StatusCode::NOT_FOUND, "no such page on the admin listener") })
        .with_state(state.clone());
    (router, sample_forever(state))
}

/// Healthy when the store answers, and takes a write, within two seconds.
async fn healthz(State(state): State<AdminState>) -> Response {
    match tokio::time::timeout(Duration::from_secs(2), state.engine.store().ping()).await {
        Ok(Ok(())) => (StatusCode::OK, "ok\n").into_response(),
        Ok(Err(error)) => {
            (StatusCode::SERVICE_UNAVAILABLE, format!("the store cannot take a write: {error}\n"))
                .into_response()
        }
        Err(_) => {
            (StatusCode::SERVICE_UNAVAILABLE, "store did not answer within 2s\n").into_response()
        }
    }
}

async fn render_metrics(State(state): State<AdminState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render()).into_response()
}

/// Lets a request through if it carries the token (or, without one, names a loopback host);
/// `/?token=` trades the token for a cookie.
async fn guard(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    match &state.config.token {
        None => {
            if !names_loopback(headers) {
                return problem(
                    StatusCode::FORBIDDEN,
                    "the admin listener answers only requests addressed to a loopback host (127.0.0.1, [::1], localhost) unless --admin-token is set",
                );
            }
        }
        Some(token) => {
            if request.uri().path() == "/"
                && let Some(offered) = query_param(request.uri().query(), "token")
            {
                if !token.accepts(&offered) {
                    return problem(
                        StatusCode::UNAUTHORIZED,
                        "that admin token is not the one set",
                    );
                }
                // A session value in the cookie, never the token; then out of the address bar.
                // Lax, so that a link from a dashboard or an alert opens the page; actions
                // still need the x-idem-admin header, which no other site can send.
                let cookie = format!("{COOKIE}={}; HttpOnly; SameSite=Lax; Path=/", token.0.1);
                return (
                    StatusCode::SEE_OTHER,
                    [(header::SET_COOKIE, cookie), (header::LOCATION, "./".to_owned())],
                )
                    .into_response();
            }
            let bearer = headers
                .get(header::AUTHORIZATION)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.strip_prefix("Bearer "));
            let session = cookie_value(headers, COOKIE);
            let allowed = bearer.is_some_and(|offered| token.accepts(offered))
                || session.is_some_and(|offered| token.accepts_session(&offered));
            if !allowed {
                let mut response = problem(
                    StatusCode::UNAUTHORIZED,
                    "the admin listener needs its token: `Authorization: Bearer TOKEN`, or open /?token=TOKEN once in a browser",
                );
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    "Bearer realm=\"idem admin\"".parse().unwrap(),
                );
                return response;
            }
        }
    }
    if request.method() == http::Method::POST && !headers.contains_key("x-idem-admin") {
        return problem(
            StatusCode::FORBIDDEN,
            "admin actions need the header `x-idem-admin: 1` (browsers never send it cross-site)",
        );
    }
    next.run(request).await
}

fn names_loopback(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|value| value.to_str().ok()) else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// A query parameter's value, percent-decoded (a token may hold `+`, `/` and `=`, which tools
/// encode).
fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (key == name).then(|| idem_core::store_kit::percent_decode(value))
    })
}

fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .find_map(|pair| {
            let (key, value) = pair.trim().split_once('=')?;
            (key == name).then(|| value.to_owned())
        })
}

/// An RFC 9457 problem for the admin API.
fn problem(status: StatusCode, detail: &str) -> Response {
    let title = status.canonical_reason().unwrap_or("Error");
    let body = serde_json::json!({
        "type": "about:blank",
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
    });
    (status, [(header::CONTENT_TYPE, "application/problem+json")], body.to_string()).into_response()
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; frame-ancestors 'none'",
            ),
        ],
        include_str!("admin_page.html"),
    )
        .into_response()
}

/// Pings the store, reads the keys in flight and samples the counters every few seconds, and
/// publishes the gauges alerts watch: keys in flight, stuck, the oldest one's age, and held
/// unknown outcomes (checked against the store, so a key released elsewhere drops out).
async fn sample_forever(state: AdminState) {
    let mut every = tokio::time::interval(SAMPLE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        sample(&state).await;
    }
}

async fn sample(state: &AdminState) {
    let store = state.engine.store();
    let started = Instant::now();
    let error = match tokio::time::timeout(Duration::from_secs(2), store.ping()).await {
        Ok(Ok(())) => None,
        Ok(Err(error)) => Some(format!("the store cannot take a write: {error}")),
        Err(_) => Some("the store did not answer within 2s".to_owned()),
    };
    let health = Health { at: SystemTime::now(), latency: started.elapsed(), error };

    // The gauges alerts watch, from this process's memory: its calls running now, and the
    // keys it held with an unknown outcome (checked against the store a hundred at a time, so
    // that a key released elsewhere, or expired, drops out).
    let running = state.running.snapshot();
    let stuck = running.iter().filter(|call| call.since.elapsed() >= state.config.stuck_after);
    metrics::gauge!("idem_keys_in_flight").set(running.len() as f64);
    metrics::gauge!("idem_keys_stuck").set(stuck.count() as f64);
    let oldest = running.first().map(|call| call.since.elapsed()).unwrap_or_default();
    metrics::gauge!("idem_oldest_in_flight_seconds").set(oldest.as_secs_f64());
    if health.error.is_none() {
        let check = async {
            for entry in state.held.to_check(HELD_CHECKED) {
                match store.get(&entry.key).await {
                    Ok(Some(record)) if holds_unknown_outcome(&record) => {}
                    Ok(_) => state.held.forget_entry(&entry),
                    Err(_) => break,
                }
            }
        };
        let _ = tokio::time::timeout(HELD_CHECK_BUDGET, check).await;
    }
    metrics::gauge!("idem_keys_outcome_unknown").set(state.held.snapshot().len() as f64);
    let counts = Counts::read(&state.metrics.render());

    let mut watch = state.watch.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    watch.health = Some(health);
    watch.samples.push_back((Instant::now(), counts));
    while watch.samples.len() > SAMPLES_KEPT {
        watch.samples.pop_front();
    }
}

/// Per minute over the last `window` of samples (or as much of it as there is).
fn rates(samples: &VecDeque<(Instant, Counts)>, window: Duration) -> serde_json::Value {
    let Some((last_at, last)) = samples.back() else { return serde_json::Value::Null };
    let Some((first_at, first)) =
        samples.iter().find(|(at, _)| last_at.duration_since(*at) <= window)
    else {
        return serde_json::Value::Null;
    };
    let span = last_at.duration_since(*first_at).as_secs_f64();
    let mut rates = serde_json::Map::new();
    for (slot, (name, _)) in COUNTED.iter().enumerate() {
        let per_minute =
            if span > 0.0 { (last.0[slot] - first.0[slot]) * 60.0 / span } else { 0.0 };
        rates.insert((*name).to_owned(), serde_json::json!((per_minute * 10.0).round() / 10.0));
    }
    rates.insert("over_seconds".to_owned(), serde_json::json!(span.round()));
    serde_json::Value::Object(rates)
}

async fn overview(State(state): State<AdminState>) -> Response {
    let stuck_after = state.config.stuck_after;
    let held: Vec<_> = state
        .held
        .snapshot()
        .into_iter()
        .rev()
        .map(|entry| {
            serde_json::json!({
                "scope": entry.key.scope.as_str(),
                "key": entry.key.key.as_str(),
                "cause": entry.cause,
                "held_for_s": SystemTime::now().duration_since(entry.at).unwrap_or_default().as_secs(),
            })
        })
        .collect();
    let running = state.running.snapshot();
    let stuck = running.iter().filter(|call| call.since.elapsed() >= stuck_after).count();
    let shown: Vec<_> = running
        .iter()
        .take(RUNNING_SHOWN)
        .map(|call| {
            let age = call.since.elapsed();
            serde_json::json!({
                "scope": call.key.scope.as_str(),
                "key": call.key.key.as_str(),
                "age_s": age.as_secs(),
                "stuck": age >= stuck_after,
            })
        })
        .collect();
    let watch = state.watch.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let totals = watch.samples.back().map(|(_, counts)| {
        COUNTED
            .iter()
            .enumerate()
            .map(|(slot, (name, _))| ((*name).to_owned(), serde_json::json!(counts.0[slot])))
            .collect::<serde_json::Map<_, _>>()
    });
    let store = watch.health.as_ref().map(|health| {
        serde_json::json!({
            "healthy": health.error.is_none(),
            "error": health.error,
            "latency_ms": (health.latency.as_secs_f64() * 10_000.0).round() / 10.0,
            "checked_s_ago": SystemTime::now().duration_since(health.at).unwrap_or_default().as_secs(),
        })
    });
    let body = serde_json::json!({
        "store": {
            "name": state.config.store_name,
            "kind": state.engine.store().capabilities().name,
            "check": store,
        },
        "stuck_after_s": stuck_after.as_secs(),
        "running": {
            "count": running.len(),
            "stuck": stuck,
            "keys": shown,
        },
        "held": held,
        "rates_per_minute": {
            "last_minute": rates(&watch.samples, Duration::from_secs(60)),
            "last_5_minutes": rates(&watch.samples, Duration::from_secs(300)),
            "last_15_minutes": rates(&watch.samples, Duration::from_secs(900)),
        },
        "totals": totals,
        "outbox": state.config.outbox_database.is_some(),
        "dead_letters": state.config.dead_letters_database.is_some(),
    });
    Json(body).into_response()
}

/// A body the API cannot read, as a problem: `415` without a JSON content type, else `400`.
fn bad_json(rejection: &JsonRejection) -> Response {
    let status = match rejection.status() {
        StatusCode::UNSUPPORTED_MEDIA_TYPE => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        _ => StatusCode::BAD_REQUEST,
    };
    problem(status, &rejection.body_text())
}

#[derive(Debug, Deserialize)]
struct KeyRef {
    scope: String,
    key: String,
}

/// Releases a key held with an unknown outcome: its next request runs again. Refuses any
/// other record (`409`), as `idem keys release` does.
async fn release_key(
    State(state): State<AdminState>,
    body: Result<Json<KeyRef>, JsonRejection>,
) -> Response {
    let KeyRef { scope, key } = match body {
        Ok(Json(body)) => body,
        Err(rejection) => return bad_json(&rejection),
    };
    // The key as stored (and as /api/overview shows it): already unquoted.
    let key = match IdempotencyKey::new(key) {
        Ok(key) => RecordKey::new(Scope::named(scope), key),
        Err(error) => return problem(StatusCode::BAD_REQUEST, &error.to_string()),
    };
    let name = format!("key {:?} in scope {}", key.key.as_str(), key.scope);
    match release_held(state.engine.store().as_ref(), &key).await {
        Ok(Released::Released) => {
            state.held.forget(&key);
            tracing::warn!(key = %key.key, scope = %key.scope, "released a key held with an unknown outcome (operator page)");
            Json(serde_json::json!({ "released": true, "detail": format!("released {name}; its next request runs again") }))
                .into_response()
        }
        Ok(Released::NotFound) => {
            state.held.forget(&key);
            problem(StatusCode::NOT_FOUND, &format!("no record for {name}"))
        }
        Ok(Released::NotHeld) => problem(
            StatusCode::CONFLICT,
            &format!(
                "{name} does not hold an unknown outcome (it is in flight or has a stored response); nothing was released"
            ),
        ),
        Err(error) => problem(StatusCode::SERVICE_UNAVAILABLE, &format!("the store: {error}")),
    }
}

/// Runs `work` against the outbox database on a thread of its own (SQLite's connection is not
/// shared between tasks), bounded to ten seconds.
async fn on_outbox<T, F>(
    state: &AdminState,
    work: impl FnOnce(String) -> F + Send + 'static,
) -> Result<T, Response>
where
    T: Send + 'static,
    F: std::future::Future<Output = Result<T, String>>,
{
    let Some(url) = state.config.outbox_database.clone() else {
        return Err(problem(
            StatusCode::NOT_FOUND,
            "no outbox: start the gateway with --outbox-database URL to see one here",
        ));
    };
    let runtime = tokio::runtime::Handle::current();
    let task = tokio::task::spawn_blocking(move || {
        runtime.block_on(async move {
            tokio::time::timeout(Duration::from_secs(10), work(url))
                .await
                .unwrap_or_else(|_| Err("the outbox database did not answer within 10s".into()))
        })
    });
    match task.await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(problem(StatusCode::SERVICE_UNAVAILABLE, &error)),
        Err(error) => Err(problem(StatusCode::INTERNAL_SERVER_ERROR, &error.to_string())),
    }
}

async fn outbox(State(state): State<AdminState>) -> Response {
    match on_outbox(&state, |url| async move { crate::outbox::overview(&url, 100).await }).await {
        Ok(value) => Json(value).into_response(),
        Err(response) => response,
    }
}

#[derive(Debug, Deserialize)]
struct OutboxKeyRef {
    topic: String,
    key: String,
}

/// Puts a parked (or backing-off) outbox key back in rotation now, its failures forgotten.
async fn retry_outbox_key(
    State(state): State<AdminState>,
    body: Result<Json<OutboxKeyRef>, JsonRejection>,
) -> Response {
    let OutboxKeyRef { topic, key } = match body {
        Ok(Json(body)) => body,
        Err(rejection) => return bad_json(&rejection),
    };
    let name = format!("key {key:?} of topic {topic:?}");
    let found =
        on_outbox(&state, move |url| async move { crate::outbox::retry(&url, &topic, &key).await })
            .await;
    match found {
        Ok(true) => Json(
            serde_json::json!({ "retried": true, "detail": format!("{name} is back in rotation") }),
        )
        .into_response(),
        Ok(false) => problem(StatusCode::NOT_FOUND, &format!("no waiting events for {name}")),
        Err(response) => response,
    }
}

/// Dead letters shown on the page, the oldest first.
const DEAD_LETTERS_SHOWN: i64 = 100;
/// What one dead-letter call may take, connecting included.
const DEAD_LETTERS_BUDGET: Duration = Duration::from_secs(15);

/// The consumers' database, or the problem to answer when there is none or it fails.
async fn dead_letters_db(state: &AdminState) -> Result<crate::dead_letters::Db, Response> {
    let Some(url) = state.config.dead_letters_database.as_deref() else {
        return Err(problem(
            StatusCode::NOT_FOUND,
            "no dead letters: start the gateway with --dead-letters-database URL to see them here",
        ));
    };
    crate::dead_letters::Db::open(url)
        .await
        .map_err(|error| problem(StatusCode::SERVICE_UNAVAILABLE, &error))
}

/// Dead letters per consumer, and the oldest ones with their failure.
async fn dead_letters(State(state): State<AdminState>) -> Response {
    let read = async {
        let db = dead_letters_db(&state).await?;
        let unavailable = |error: String| problem(StatusCode::SERVICE_UNAVAILABLE, &error);
        let counts = db.counts().await.map_err(unavailable)?;
        let letters = db.list(None, DEAD_LETTERS_SHOWN).await.map_err(unavailable)?;
        let mut body = crate::dead_letters::overview_json(&counts, &letters);
        body["requeue"] = state.config.dead_letters_broker.is_some().into();
        Ok::<_, Response>(Json(body).into_response())
    };
    match tokio::time::timeout(DEAD_LETTERS_BUDGET, read).await {
        Ok(Ok(response) | Err(response)) => response,
        Err(_) => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "the dead letters' database did not answer within 15s",
        ),
    }
}

#[derive(Debug, Deserialize)]
struct DeadLetterRef {
    id: i64,
}

/// Publishes a dead letter again on its broker and removes it, as `idem dead-letters requeue`
/// does: `404` when it is gone, `502` when the broker (or the message itself) refuses, and
/// the dead letter then stays.
async fn requeue_dead_letter(
    State(state): State<AdminState>,
    body: Result<Json<DeadLetterRef>, JsonRejection>,
) -> Response {
    let DeadLetterRef { id } = match body {
        Ok(Json(body)) => body,
        Err(rejection) => return bad_json(&rejection),
    };
    let Some(broker) = state.config.dead_letters_broker.clone() else {
        return problem(
            StatusCode::CONFLICT,
            "no broker to requeue to: start the gateway with --dead-letters-broker URL",
        );
    };
    let requeue = async {
        let mut db = dead_letters_db(&state).await?;
        let publisher =
            crate::dead_letters::publisher(&broker, &state.config.dead_letters_exchange)
                .await
                .map_err(|error| problem(StatusCode::BAD_GATEWAY, &error))?;
        match db.requeue(id, publisher.as_ref()).await {
            Ok(idem_stream::postgres::Requeued::Requeued(letter)) => {
                tracing::warn!(id, message_id = %letter.message_id, subject = %letter.subject, consumer = %letter.consumer, "requeued a dead letter (operator page)");
                Ok(Json(serde_json::json!({
                    "requeued": true,
                    "detail": format!("dead letter {id} (message {}) is back on {}", letter.message_id, letter.subject),
                }))
                .into_response())
            }
            Ok(idem_stream::postgres::Requeued::NotFound) => {
                Err(problem(StatusCode::NOT_FOUND, &format!("no dead letter {id}")))
            }
            Err((database, error)) => Err(problem(
                if database { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::BAD_GATEWAY },
                &format!("dead letter {id} stays: {error}"),
            )),
        }
    };
    match tokio::time::timeout(DEAD_LETTERS_BUDGET, requeue).await {
        Ok(Ok(response) | Err(response)) => response,
        Err(_) => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "requeueing dead letter {id} did not finish within 15s: list the dead letters to see whether it is still there (the broker may have taken it either way)"
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_compared_whole() {
        let token = AdminToken::new("0123456789abcdef-secret");
        assert!(token.accepts("0123456789abcdef-secret"));
        assert!(!token.accepts("0123456789abcdef-secreT"));
        assert!(!token.accepts(""));
        assert_eq!(format!("{token:?}"), "AdminToken(..)");
    }

    #[test]
    fn only_loopback_hosts_pass_without_a_token() {
        let with_host = |host: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::HOST, host.parse().unwrap());
            names_loopback(&headers)
        };
        for host in ["127.0.0.1:9080", "localhost:9080", "[::1]:9080", "LOCALHOST", "127.0.0.2"] {
            assert!(with_host(host), "{host}");
        }
        for host in ["evil.example:9080", "10.0.0.1:9080", "[2001:db8::1]:9080", "localhost.evil"] {
            assert!(!with_host(host), "{host}");
        }
        assert!(!names_loopback(&HeaderMap::new()));
    }

    #[test]
    fn counters_are_summed_over_their_labels() {
        let page = "# TYPE idem_executions_total counter\nidem_executions_total 7\n\
                    idem_outcome_unknown_total{cause=\"a\",policy=\"hold\"} 2\n\
                    idem_outcome_unknown_total{cause=\"b\",policy=\"hold\"} 3\n\
                    idem_executions_totally 100\n";
        let counts = Counts::read(page);
        assert_eq!(counts.0[0], 7.0);
        assert_eq!(counts.0[4], 5.0);
    }
}
