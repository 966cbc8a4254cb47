//! Slow request bodies: a client that trickles its body in holds a connection, a task and a
//! buffer for as long as it keeps sending. Each request body is read under two rules:
//!
//! - a **minimum rate** after a grace period (as Apache's `mod_reqtimeout`): by
//!   `grace + received / min_rate` from its start the body must have arrived so far, so a
//!   client that sends nothing, or sends 1 KiB every 5 s, is cut off; and no pause between two
//!   pieces may last longer than the grace (as nginx's `client_body_timeout`);
//! - a **share of the connections**: a body still arriving after its first second needs one of
//!   the slow-body places (a quarter of `--max-connections`); with none free it is cut off at
//!   once. Slow senders can then never hold the whole connection limit, and ordinary requests
//!   (whose bodies arrive in milliseconds) never need a place.
//!
//! A body cut off fails with [`BodyTooSlow`]; the idempotency layer answers it with `408`.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use idem_core::BoxError;
use idem_http::BodyTooSlow;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// How long a body may take before it needs a slow-body place.
const SLOW_AFTER: Duration = Duration::from_secs(1);

/// The rules every request body is read under; cheap to clone.
#[derive(Debug, Clone)]
pub struct BodyRules {
    grace: Duration,
    min_rate: u64,
    slow_places: Arc<Semaphore>,
}

impl BodyRules {
    /// `grace` before the rate counts, `min_rate` bytes per second after it, and `slow_places`
    /// bodies at once allowed to take longer than a second.
    pub fn new(grace: Duration, min_rate: u64, slow_places: usize) -> Self {
        Self {
            grace,
            min_rate: min_rate.max(1),
            slow_places: Arc::new(Semaphore::new(slow_places)),
        }
    }

    pub fn guard<B>(&self, body: B) -> GuardedBody<B> {
        GuardedBody {
            inner: body,
            rules: self.clone(),
            started: None,
            received: 0,
            last_piece: None,
            place: None,
            sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
        }
    }
}

/// A request body read under [`BodyRules`].
#[derive(Debug)]
pub struct GuardedBody<B> {
    inner: B,
    rules: BodyRules,
    started: Option<Instant>,
    received: u64,
    /// When the last piece of the body arrived.
    last_piece: Option<Instant>,
    place: Option<OwnedSemaphorePermit>,
    sleep: Pin<Box<Sleep>>,
}

impl<B> GuardedBody<B> {
    /// When the body must have arrived as far as it has, at the minimum rate.
    fn rate_deadline(&self, started: Instant) -> Instant {
        let allowed = Duration::from_secs_f64(self.received as f64 / self.rules.min_rate as f64);
        started + self.rules.grace + allowed
    }

    /// Checks the rules at `now`; the instant of the next check if they hold.
    fn check(&mut self, started: Instant, now: Instant) -> Result<Instant, BodyTooSlow> {
        // Silence counts from the last piece that arrived: credit earned by sending early
        // does not buy a long pause.
        let idle_deadline = self.last_piece.unwrap_or(started) + self.rules.grace;
        let deadline = self.rate_deadline(started).min(idle_deadline);
        if now >= deadline {
            return Err(BodyTooSlow(format!(
                "the request body arrived slower than {} bytes/s, or paused for {:?}",
                self.rules.min_rate, self.rules.grace
            )));
        }
        if self.place.is_none() {
            let needs_place = started + SLOW_AFTER;
            if now < needs_place {
                return Ok(needs_place.min(deadline));
            }
            match Arc::clone(&self.rules.slow_places).try_acquire_owned() {
                Ok(place) => self.place = Some(place),
                Err(_) => {
                    return Err(BodyTooSlow(
                        "the request body is arriving slowly and every place for slow bodies is taken".into(),
                    ));
                }
            }
        }
        Ok(deadline)
    }
}

impl<B> Body for GuardedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let now = Instant::now();
        let started = *self.started.get_or_insert(now);
        loop {
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        self.received += data.len() as u64;
                        self.last_piece = Some(Instant::now());
                    }
                    if let Err(error) = self.check(started, Instant::now()) {
                        return Poll::Ready(Some(Err(error.into())));
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error.into()))),
                Poll::Ready(None) => {
                    self.place = None;
                    return Poll::Ready(None);
                }
                Poll::Pending => {}
            }
            let next = match self.check(started, Instant::now()) {
                Ok(next) => next,
                Err(error) => return Poll::Ready(Some(Err(error.into()))),
            };
            self.sleep.as_mut().reset(next);
            if self.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // The check instant passed while we looked: check again.
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
