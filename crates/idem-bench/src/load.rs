//! The load generator: keep-alive HTTP/1.1 connections, closed loop (fixed concurrency) or open
//! loop (fixed rate, latency measured from each request's scheduled time, so a stalled server
//! cannot hide its queueing).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;

/// Which Idempotency-Key each request carries.
#[derive(Debug, Clone)]
pub enum Keys {
    /// No key: pass-through.
    None,
    /// A new key per request.
    Fresh(String),
    /// Cycles over `count` keys named `{prefix}-0` .. (stored beforehand: replays).
    Cycle(String, u64),
    /// `group` consecutive requests share a key: they race.
    Race(String, u64),
}

impl Keys {
    fn key(&self, index: u64) -> Option<String> {
        match self {
            Self::None => None,
            Self::Fresh(prefix) => Some(format!("{prefix}-{index}")),
            Self::Cycle(prefix, count) => Some(format!("{prefix}-{}", index % count)),
            Self::Race(prefix, group) => Some(format!("{prefix}-{}", index / group)),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub target: SocketAddr,
    /// More gateways to spread the connections over, round robin with `target`.
    pub also: Vec<SocketAddr>,
    pub keys: Keys,
    pub connections: usize,
    pub duration: Duration,
    /// Requests per second for an open loop; `None` for a closed loop.
    pub rate: Option<f64>,
    /// Stop after this many requests (for populating keys).
    pub max_requests: Option<u64>,
}

#[derive(Debug, Default, Clone)]
pub struct Outcome {
    pub latencies_us: Vec<u32>,
    pub elapsed: Duration,
    pub statuses: BTreeMap<u16, u64>,
    pub replays: u64,
    pub errors: u64,
    /// The highest request index sent (+1): with `Keys::Race`, bounds the keys used.
    pub indices: u64,
}

impl Outcome {
    pub fn requests(&self) -> u64 {
        self.latencies_us.len() as u64
    }

    pub fn merge(&mut self, other: Outcome) {
        self.latencies_us.extend(other.latencies_us);
        self.elapsed += other.elapsed;
        for (status, count) in other.statuses {
            *self.statuses.entry(status).or_default() += count;
        }
        self.replays += other.replays;
        self.errors += other.errors;
        self.indices = self.indices.max(other.indices);
    }

    /// The latency at quantile `q` (0 to 1), in milliseconds; sorts in place.
    pub fn quantile_ms(&mut self, q: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        self.latencies_us.sort_unstable();
        let index = ((self.latencies_us.len() as f64 - 1.0) * q).round() as usize;
        f64::from(self.latencies_us[index]) / 1000.0
    }
}

const BODY: &[u8] = br#"{"sku":"A1","qty":1,"customer":"c_1234567890"}"#;

async fn connect(target: SocketAddr) -> Option<SendRequest<Full<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(target).await.ok()?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = http1::handshake(TokioIo::new(stream)).await.ok()?;
    tokio::spawn(connection);
    Some(sender)
}

/// One request; `Some((status, replayed))` or `None` on a transport error.
async fn send(
    sender: &mut SendRequest<Full<Bytes>>,
    target: SocketAddr,
    key: Option<&str>,
) -> Option<(u16, bool)> {
    sender.ready().await.ok()?;
    let mut request = Request::post(format!("http://{target}/orders"))
        .header("host", target.to_string())
        .header("content-type", "application/json");
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let request = request.body(Full::new(Bytes::from_static(BODY))).ok()?;
    let response = sender.send_request(request).await.ok()?;
    let status = response.status().as_u16();
    let replayed = response.headers().get("idempotent-replayed").is_some();
    response.into_body().collect().await.ok()?;
    Some((status, replayed))
}

pub async fn run(plan: Plan) -> Outcome {
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + plan.duration;
    let targets: Vec<SocketAddr> =
        std::iter::once(plan.target).chain(plan.also.iter().copied()).collect();
    let workers: Vec<_> = (0..plan.connections)
        .map(|worker| {
            let plan = plan.clone();
            let next = Arc::clone(&next);
            let target = targets[worker % targets.len()];
            tokio::spawn(async move {
                let mut outcome = Outcome::default();
                let mut sender = None;
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    if plan.max_requests.is_some_and(|max| index >= max) {
                        break;
                    }
                    let scheduled = match plan.rate {
                        Some(rate) => started + Duration::from_secs_f64(index as f64 / rate),
                        None => Instant::now(),
                    };
                    if scheduled >= deadline {
                        break;
                    }
                    tokio::time::sleep_until(scheduled.into()).await;
                    if sender.is_none() {
                        sender = connect(target).await;
                    }
                    let Some(connection) = sender.as_mut() else {
                        outcome.errors += 1;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    match send(connection, target, plan.keys.key(index).as_deref()).await {
                        Some((status, replayed)) => {
                            let micros =
                                scheduled.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
                            outcome.latencies_us.push(micros);
                            *outcome.statuses.entry(status).or_default() += 1;
                            outcome.replays += u64::from(replayed);
                            outcome.indices = outcome.indices.max(index + 1);
                        }
                        None => {
                            outcome.errors += 1;
                            sender = None;
                        }
                    }
                }
                outcome
            })
        })
        .collect();
    let mut total = Outcome::default();
    for worker in workers {
        if let Ok(outcome) = worker.await {
            total.merge(outcome);
        }
    }
    total.elapsed = started.elapsed().min(plan.duration.max(started.elapsed()));
    total
}

/// Opens `count` connections, sends one request on each, and holds them open.
pub async fn hold_connections(
    target: SocketAddr,
    count: usize,
) -> (Vec<SendRequest<Full<Bytes>>>, u64) {
    let mut held = Vec::with_capacity(count);
    let mut failed = 0;
    for _ in 0..count {
        match connect(target).await {
            Some(mut sender) => {
                if send(&mut sender, target, None).await.is_none() {
                    failed += 1;
                }
                held.push(sender);
            }
            None => failed += 1,
        }
    }
    (held, failed)
}

/// A plain GET, for the gateway's /metrics.
pub async fn get_text(target: SocketAddr, path: &str) -> Option<String> {
    let mut sender = connect_get(target).await?;
    let request = Request::get(format!("http://{target}{path}"))
        .header("host", target.to_string())
        .body(http_body_util::Empty::<Bytes>::new())
        .ok()?;
    let response = sender.send_request(request).await.ok()?;
    let body = response.into_body().collect().await.ok()?.to_bytes();
    String::from_utf8(body.to_vec()).ok()
}

async fn connect_get(target: SocketAddr) -> Option<SendRequest<http_body_util::Empty<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(target).await.ok()?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream)).await.ok()?;
    tokio::spawn(connection);
    Some(sender)
}
