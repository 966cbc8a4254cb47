//! Time, injected: the engine never reads the system clock directly, so tests can drive it.
//!
//! ```
//! use std::time::Duration;
//! use idem_core::{Clock, ManualClock};
//!
//! let clock = ManualClock::new(1_000);
//! clock.advance(Duration::from_secs(2));
//! assert_eq!(clock.now().as_millis(), 3_000);
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch. Wall-clock time, because records outlive a process and
/// are shared by several processes (and, with shared stores, several hosts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(u64);

impl Timestamp {
    pub const fn from_millis(millis: u64) -> Self {
        Self(millis)
    }

    pub const fn as_millis(self) -> u64 {
        self.0
    }

    pub fn saturating_add(self, duration: Duration) -> Self {
        Self(self.0.saturating_add(duration.as_millis().min(u64::MAX as u128) as u64))
    }

    /// How long from `earlier` until `self`; zero if `self` is not later.
    pub fn duration_since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Timestamp;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        Timestamp(since_epoch.as_millis() as u64)
    }
}

/// A clock that moves only when told to. Clones share one time.
#[derive(Debug, Clone, Default)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    pub fn new(start_millis: u64) -> Self {
        Self(Arc::new(AtomicU64::new(start_millis)))
    }

    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.0.load(Ordering::SeqCst))
    }
}

/// A clock that reads the store's time: the local clock plus the offset to the store's clock,
/// measured at start and every few seconds after. Lease and expiry decisions are then made on
/// the store's clock, so a process whose own clock is off (by seconds or by hours) can neither
/// take over a live claim nor keep a dead one: every process sharing the store agrees on the
/// time to within half a round trip to it.
///
/// Stores without a clock of their own ([`crate::Store::server_time`] answers `None`: memory,
/// SQLite on one host) leave the local clock as it is.
#[derive(Debug, Clone)]
pub struct StoreClock {
    local: Arc<dyn ClockDebug>,
    offset_ms: Arc<std::sync::atomic::AtomicI64>,
}

/// [`Clock`] and `Debug`, for the clock a [`StoreClock`] corrects.
pub trait ClockDebug: Clock + std::fmt::Debug {}
impl<C: Clock + std::fmt::Debug> ClockDebug for C {}

/// How often the offset to the store's clock is measured again.
const RESYNC: Duration = Duration::from_secs(5);

impl StoreClock {
    /// Measures the offset to `store`'s clock now (an unreachable store leaves it at zero, to
    /// be measured again later), then keeps measuring it every 5 s on a task of its own, for
    /// as long as a clone of this clock lives.
    pub async fn start(store: Arc<dyn crate::Store>, local: impl ClockDebug) -> Self {
        let clock = Self { local: Arc::new(local), offset_ms: Arc::default() };
        if clock.sync(store.as_ref()).await {
            let local = Arc::clone(&clock.local);
            let offset = Arc::downgrade(&clock.offset_ms);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(RESYNC).await;
                    let Some(offset_ms) = offset.upgrade() else { return };
                    Self { local: Arc::clone(&local), offset_ms }.sync(store.as_ref()).await;
                }
            });
        }
        clock
    }

    /// The current offset: store time minus local time.
    pub fn offset_ms(&self) -> i64 {
        self.offset_ms.load(Ordering::SeqCst)
    }

    /// Measures the offset once; `false` if the store has no clock.
    async fn sync(&self, store: &dyn crate::Store) -> bool {
        let before = self.local.now();
        let started = std::time::Instant::now();
        let server = match store.server_time().await {
            Ok(Some(server)) => server,
            Ok(None) => return false,
            Err(error) => {
                tracing::debug!(%error, "cannot read the store's clock; keeping the last offset");
                return true;
            }
        };
        // The server read its clock somewhere within the round trip: assume its middle.
        let midpoint = before.as_millis() as i64 + (started.elapsed().as_millis() as i64) / 2;
        let offset = server.as_millis() as i64 - midpoint;
        let previous = self.offset_ms.swap(offset, Ordering::SeqCst);
        if offset.abs() >= 1_000 && (offset - previous).abs() >= 1_000 {
            tracing::warn!(
                offset_ms = offset,
                "this host's clock differs from the store's; leases and expiry follow the store's clock"
            );
        }
        true
    }
}

impl Clock for StoreClock {
    fn now(&self) -> Timestamp {
        let local = self.local.now().as_millis() as i64;
        Timestamp((local + self.offset_ms.load(Ordering::SeqCst)).max(0) as u64)
    }
}
