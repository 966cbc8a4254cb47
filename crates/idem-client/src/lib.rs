//! A retrying HTTP client for APIs behind an idem gateway: every logical call has one effect,
//! even when responses are lost.
//!
//! [`IdempotentRetry`] is a [`reqwest_middleware`] middleware. It puts a fresh
//! `Idempotency-Key` (a UUID v7) on every `POST` and `PATCH` that has none, and retries
//! timeouts, broken connections, `409` (the first attempt still running), `429` and `5xx` with
//! the *same* key, so the gateway runs the call once and replays its stored answer to the
//! retries. It never retries `400`, `422` or another `4xx`, and it stops at once on the
//! gateway's `502 outcome-unknown` with an [`OutcomeUnknown`] error. The key used is on the
//! response, for your logs.
//!
//! ```no_run
//! use std::time::Duration;
//! use idem_client::{IdempotentCall, IdempotentRetry};
//! use reqwest_middleware::ClientBuilder;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Each attempt is bounded by the client's timeout; the middleware bounds the attempts.
//! let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
//! let client = ClientBuilder::new(http)
//!     .with(
//!         IdempotentRetry::default()
//!             .max_attempts(5)
//!             .base_delay(Duration::from_millis(100))
//!             .max_delay(Duration::from_secs(5)),
//!     )
//!     .build();
//!
//! let response = client
//!     .post("http://127.0.0.1:8080/orders")
//!     .header("content-type", "application/json")
//!     .body(r#"{"sku":"A1","qty":1}"#)
//!     .send()
//!     .await;
//! match response {
//!     Ok(response) => {
//!         let call = response.extensions().get::<IdempotentCall>().unwrap();
//!         println!("{} with key {:?} after {} attempt(s)", response.status(), call.key(), call.attempts());
//!     }
//!     Err(error) => match idem_client::outcome_unknown(&error) {
//!         // It may have run: check by hand before anything else, never retry with a new key.
//!         Some(unknown) => eprintln!("outcome unknown for key {}", unknown.key),
//!         None => eprintln!("failed: {error}"),
//!     },
//! }
//! # Ok(()) }
//! ```
//!
//! To keep one key across process restarts (a job that may be run again tomorrow), make it
//! yourself with [`new_key`], store it with the work, and set the `Idempotency-Key` header:
//! the middleware keeps a key the caller set.
//!
//! The retry discipline, and why: `docs/client.md` in the repository.
//!
//! Features: `rustls` turns on reqwest's rustls TLS for `https://` endpoints. It is off by
//! default because an application that depends on reqwest already chooses its TLS there (Cargo
//! unifies the features, and this crate uses the application's reqwest).

#![forbid(unsafe_code)]

mod backoff;
mod error;
mod retry;

pub use error::{OutcomeUnknown, outcome_unknown};
pub use retry::{
    IDEMPOTENCY_KEY, IdempotentCall, IdempotentRetry, MAX_ATTEMPTS_LIMIT, MAX_PREFER_WAIT, new_key,
};

/// The backoff arithmetic, for those who want the same schedule elsewhere.
pub mod schedule {
    pub use crate::backoff::{ceiling, full_jitter, parse_retry_after};
}
