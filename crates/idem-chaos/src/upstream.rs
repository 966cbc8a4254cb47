//! The rig's upstream: it records every execution (the effect idem exists to keep single) and
//! answers fast, slowly (past the gateways' timeout), with a 503 (nothing done), or by
//! breaking off after doing the work (the outcome the gateway cannot know).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};

use crate::Rng;

/// One execution of an operation: the upstream did the work.
#[derive(Debug, Clone)]
pub struct Execution {
    pub scope: String,
    pub key: String,
    pub id: u64,
    pub at: Instant,
    /// Which gateway process forwarded it: each is started with an upstream path prefix of
    /// its own (`/g<index>x<restart>`), which it keeps.
    pub gateway: String,
}

#[derive(Debug, Default)]
struct State {
    executions: Vec<Execution>,
    /// How many times each (scope, key) reached the upstream, whatever it answered.
    arrivals: HashMap<(String, String), u64>,
    stalled_until: Option<Instant>,
    next_id: u64,
    rng: Option<Rng>,
}

#[derive(Debug, Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

/// How the upstream treats one arrival.
#[derive(Debug, Clone, Copy)]
enum Behaviour {
    Fast,
    /// Longer than the gateways' upstream timeout: the client gets a 504, the call goes on.
    Slow(Duration),
    /// Did nothing; says so.
    Unavailable,
    /// Did the work, then closed the connection without answering.
    BreakOff,
}

impl Upstream {
    pub async fn start(seed: u64) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State {
            rng: Some(Rng::new(seed ^ 0x7570_7374_7265_616d)),
            ..State::default()
        }));
        let upstream = Self { addr, state };
        let serving = upstream.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    // Out of descriptors, say: not a reason to spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let upstream = serving.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let upstream = upstream.clone();
                        async move { upstream.handle(request).await }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
        Ok(upstream)
    }

    /// Every request waits until `until` before it is handled (an upstream that stalls).
    pub fn stall_until(&self, until: Instant) {
        self.state.lock().unwrap().stalled_until = Some(until);
    }

    pub fn executions(&self) -> Vec<Execution> {
        self.state.lock().unwrap().executions.clone()
    }

    pub fn arrivals(&self) -> u64 {
        self.state.lock().unwrap().arrivals.values().sum()
    }

    async fn handle(
        &self,
        request: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, std::io::Error> {
        let header = |name: &str| {
            request.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned()
        };
        let (scope, key) = (header("authorization"), header("idempotency-key"));
        let gateway =
            request.uri().path().trim_start_matches('/').split('/').next().unwrap_or("").to_owned();
        // The body is read whole before anything is done, as a real service would.
        let _ = request.into_body().collect().await;
        let (behaviour, stalled_until) = {
            let mut state = self.state.lock().unwrap();
            *state.arrivals.entry((scope.clone(), key.clone())).or_default() += 1;
            let rng = state.rng.as_mut().expect("seeded");
            let behaviour = match rng.below(100) {
                0..=64 => Behaviour::Fast,
                65..=74 => Behaviour::Slow(Duration::from_millis(1_200 + rng.below(2_500))),
                75..=89 => Behaviour::Unavailable,
                _ => Behaviour::BreakOff,
            };
            (behaviour, state.stalled_until)
        };
        if let Some(until) = stalled_until {
            tokio::time::sleep_until(until.into()).await;
        }
        if let Behaviour::Unavailable = behaviour {
            let response = Response::builder()
                .status(StatusCode::SERVICE_UNAVAILABLE)
                .body(Full::new(Bytes::from_static(b"busy, nothing done")))
                .expect("a response");
            return Ok(response);
        }
        // The work is done (and recorded) first; a slow answer is slow after it, so a
        // gateway killed meanwhile leaves work done whose outcome it never stored.
        let id = {
            let mut state = self.state.lock().unwrap();
            state.next_id += 1;
            let id = state.next_id;
            state.executions.push(Execution {
                scope: scope.clone(),
                key: key.clone(),
                id,
                at: Instant::now(),
                gateway,
            });
            id
        };
        if let Behaviour::Slow(pause) = behaviour {
            tokio::time::sleep(pause).await;
        }
        if let Behaviour::BreakOff = behaviour {
            // The work is done; the connection closes with no response.
            return Err(std::io::Error::other("breaking off after the work"));
        }
        let body = format!("execution={id} scope={scope} key={key}");
        let response = Response::builder()
            .status(StatusCode::CREATED)
            .header("content-type", "text/plain")
            .body(Full::new(Bytes::from(body)))
            .expect("a response");
        Ok(response)
    }
}

/// What an upstream body says: (execution, scope), if it is one of ours.
pub fn parse_body(body: &[u8]) -> Option<(u64, String)> {
    let text = std::str::from_utf8(body).ok()?;
    let id = text.strip_prefix("execution=")?.split(' ').next()?.parse().ok()?;
    let scope = text.split(" scope=").nth(1)?.split(" key=").next()?.to_owned();
    Some((id, scope))
}
