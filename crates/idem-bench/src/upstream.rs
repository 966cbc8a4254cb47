//! The upstream every configuration calls: a small hyper server with a fixed amount of work
//! per request (none, or a delay), on a runtime of its own so the load generator's scheduling
//! does not distort it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

#[derive(Debug, Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    calls: Arc<AtomicU64>,
}

impl Upstream {
    /// Starts on a free loopback port with one worker thread.
    pub fn start(delay: Duration) -> std::io::Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("bench-upstream")
            .enable_all()
            .build()?;
        let calls = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&calls);
        std::thread::Builder::new().name("bench-upstream".into()).spawn(move || {
            runtime.block_on(async move {
                let listener =
                    tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
                loop {
                    let Ok((stream, _)) = listener.accept().await else { continue };
                    let _ = stream.set_nodelay(true);
                    let counter = Arc::clone(&counter);
                    tokio::spawn(async move {
                        let service = service_fn(move |request: Request<Incoming>| {
                            let counter = Arc::clone(&counter);
                            async move {
                                let body = request
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                if !delay.is_zero() {
                                    tokio::time::sleep(delay).await;
                                }
                                let call = counter.fetch_add(1, Ordering::Relaxed) + 1;
                                let reply =
                                    format!("{{\"order_id\":{call},\"bytes\":{}}}", body.len());
                                let mut response = Response::new(Full::new(Bytes::from(reply)));
                                *response.status_mut() = StatusCode::CREATED;
                                response
                                    .headers_mut()
                                    .insert("content-type", "application/json".parse().unwrap());
                                Ok::<_, Infallible>(response)
                            }
                        });
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
        })?;
        Ok(Self { addr, calls })
    }

    /// Requests that reached the upstream: the effect count.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }
}
