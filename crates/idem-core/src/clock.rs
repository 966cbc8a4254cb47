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

/// A clock that reads the store's time. Lease and expiry decisions are then made on the
/// store's clock, so a process whose own clock is off (by seconds or by hours), or is stepped
/// while it runs, can neither take over a live claim nor keep a dead one: every process
/// sharing the store agrees on the time, to within half a round trip to it.
///
/// It reads the store's clock ([`crate::Store::server_time`]) at start and every 5 s after,
/// and between readings counts on from the last one with the monotonic clock, which no change
/// of the wall clock moves. Of its readings it keeps the one with the shortest round trip
/// unless that one is more than 30 s old, so a reading delayed by a busy store does not skew it.
///
/// Stores without a clock of their own (memory, SQLite on one host) leave the local clock as
/// it is.
#[derive(Debug, Clone)]
pub struct StoreClock {
    local: Arc<dyn ClockDebug>,
    /// `None` while the store has no clock: the local clock is used.
    reading: Option<Arc<std::sync::Mutex<Reading>>>,
}

/// [`Clock`] and `Debug`, for the clock a [`StoreClock`] falls back on.
pub trait ClockDebug: Clock + std::fmt::Debug {}
impl<C: Clock + std::fmt::Debug> ClockDebug for C {}

/// One reading of the store's clock: its time at a monotonic instant.
#[derive(Debug, Clone, Copy)]
struct Reading {
    at: std::time::Instant,
    store_millis: u64,
    round_trip: Duration,
}

/// How often the store's clock is read again.
const RESYNC: Duration = Duration::from_secs(5);
/// A reading with a longer round trip than the one kept replaces it only past this age.
const KEEP_BEST_FOR: Duration = Duration::from_secs(30);
/// Readings taken at start, the best kept.
const START_READINGS: usize = 3;

impl StoreClock {
    /// Reads `store`'s clock now (three times, keeping the shortest round trip) and then every
    /// 5 s on a task of its own, for as long as a clone of this clock lives. Fails if the
    /// store has a clock and it cannot be read now: deciding leases on the local clock
    /// instead would be the very risk this clock removes.
    pub async fn start(
        store: Arc<dyn crate::Store>,
        local: impl ClockDebug,
    ) -> crate::Result<Self> {
        let mut best: Option<Reading> = None;
        for _ in 0..START_READINGS {
            match read(store.as_ref()).await? {
                None => return Ok(Self { local: Arc::new(local), reading: None }),
                Some(reading) => {
                    if best.is_none_or(|best| reading.round_trip < best.round_trip) {
                        best = Some(reading);
                    }
                }
            }
        }
        let best = best.expect("at least one reading");
        let clock = Self { local: Arc::new(local), reading: Some(Arc::new(best.into())) };
        let offset = best.store_millis as i64 - clock.local.now().as_millis() as i64;
        if offset.abs() >= 1_000 {
            tracing::warn!(
                offset_ms = offset,
                "this host's clock differs from the store's; leases and expiry follow the store's clock"
            );
        }
        let kept = Arc::downgrade(clock.reading.as_ref().expect("set above"));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RESYNC).await;
                let Some(kept) = kept.upgrade() else { return };
                match read(store.as_ref()).await {
                    Ok(Some(fresh)) => {
                        let mut current =
                            kept.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                        if fresh.round_trip <= current.round_trip
                            || current.at.elapsed() >= KEEP_BEST_FOR
                        {
                            *current = fresh;
                        }
                    }
                    Ok(None) => return,
                    Err(error) => {
                        tracing::debug!(%error, "cannot read the store's clock; counting on from the last reading");
                    }
                }
            }
        });
        Ok(clock)
    }

    /// Whether the store's clock is in use (the store has one).
    pub fn follows_store(&self) -> bool {
        self.reading.is_some()
    }
}

/// One reading: the store's time, placed at the middle of the round trip.
async fn read(store: &dyn crate::Store) -> crate::Result<Option<Reading>> {
    let sent = std::time::Instant::now();
    let Some(server) = store.server_time().await? else { return Ok(None) };
    let round_trip = sent.elapsed();
    Ok(Some(Reading { at: sent + round_trip / 2, store_millis: server.as_millis(), round_trip }))
}

impl Clock for StoreClock {
    fn now(&self) -> Timestamp {
        match &self.reading {
            None => self.local.now(),
            Some(reading) => {
                let reading = *reading.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                let elapsed = reading.at.elapsed().as_millis() as u64;
                Timestamp::from_millis(reading.store_millis.saturating_add(elapsed))
            }
        }
    }
}
