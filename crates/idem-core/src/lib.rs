//! The core of idem: what makes an operation safe to retry, with no I/O of its own.
//!
//! - [`IdempotencyKey`], [`Scope`] and [`Fingerprint`] say which request is which.
//! - [`Record`] and [`decide`] are the record state machine (in flight, completed, expired).
//! - [`Store`] is what a backend provides; [`MemoryStore`] is the in-process one.
//! - [`Engine`] runs an operation once per key, on any store, with an injected [`Clock`].
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use bytes::Bytes;
//! use idem_core::*;
//!
//! let engine = Engine::new(MemoryStore::new(), SystemClock, EngineConfig::default());
//! let key = RecordKey::new(Scope::named("jobs"), IdempotencyKey::new("nightly-2026-11-22").unwrap());
//! let fingerprint = Fingerprint::builder().part(b"nightly report").finish();
//! let outcome = engine
//!     .run(&key, fingerprint, || async { Ok::<_, std::io::Error>(Bytes::from("report sent")) })
//!     .await
//!     .unwrap();
//! assert!(matches!(outcome, Outcome::Executed(_)));
//! # });
//! ```

mod changes;
mod clock;
#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
mod engine;
mod error;
mod fingerprint;
mod key;
mod memory;
mod record;
mod store;
pub mod store_kit;

pub use changes::{ChangeFeed, ChangeListener, Notifies};
pub use clock::{Clock, ClockDebug, ManualClock, StoreClock, SystemClock, Timestamp};
pub use engine::{Begin, Claim, Completion, Engine, EngineConfig, Outcome};
pub use error::{BoxError, Error, Result};
pub use fingerprint::{Fingerprint, FingerprintBuilder};
pub use key::{IdempotencyKey, KeyError, MAX_KEY_LEN, RecordKey, Scope};
pub use memory::MemoryStore;
pub use record::{Decision, FencingToken, Record, RecordState, decide, is_owner};
pub use store::{Capabilities, ClaimRequest, ListQuery, RecordSummary, StateFilter, Store};
