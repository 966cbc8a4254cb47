//! The record state machine.
//!
//! A record is created **in flight** by a claim, holding a lease and a fencing token. Its owner
//! either **completes** it (storing the outcome to replay) or **releases** it (deleting it, so a
//! retry runs again). A record whose lease ran out may be taken over by a retry with the same
//! fingerprint, which gets a fresh token; the stale owner's token then no longer matches, so it
//! can neither complete nor release the newer claim. Every record also carries `expires_at`:
//! past it, the record counts as absent and the sweeper may delete it.
//!
//! [`decide`] is the one place these rules live; every store applies it (or an equivalent
//! atomic statement) inside its own transaction, and the conformance suite checks they agree.
//!
//! ```
//! use idem_core::{decide, Decision, Fingerprint, Timestamp};
//!
//! let fingerprint = Fingerprint::builder().part(b"POST /charges").finish();
//! assert_eq!(decide(None, &fingerprint, Timestamp::from_millis(0)), Decision::Acquire);
//! ```

use bytes::Bytes;

use crate::{Fingerprint, Timestamp};

/// Identifies one claim of a key. A store only lets the holder of the current token complete,
/// release or renew the record; a stale owner is "fenced".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FencingToken(u64);

impl FencingToken {
    /// A fresh token from the operating system's random source: unique per claim in practice,
    /// across restarts and processes, without coordination.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 8];
        // If the OS random source fails, fall back to time and a counter: still unique per
        // process, which is what fencing needs.
        if getrandom::fill(&mut bytes).is_err() {
            use std::sync::atomic::{AtomicU64, Ordering};
            static COUNTER: AtomicU64 = AtomicU64::new(0);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos() as u64;
            bytes = (nanos ^ COUNTER.fetch_add(1, Ordering::Relaxed).rotate_left(48)).to_be_bytes();
        }
        Self(u64::from_be_bytes(bytes))
    }

    pub const fn from_u64(value: u64) -> Self {
        Self(value)
    }

    pub const fn as_u64(self) -> u64 {
        self.0
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordState {
    /// An owner is running the operation.
    InFlight { token: FencingToken, lease_expires_at: Timestamp },
    /// The operation finished; `payload` is what a retry gets back.
    Completed { payload: Bytes },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub fingerprint: Fingerprint,
    pub state: RecordState,
    pub created_at: Timestamp,
    /// Past this instant the record counts as absent and may be swept.
    pub expires_at: Timestamp,
}

impl Record {
    pub fn is_expired(&self, now: Timestamp) -> bool {
        self.expires_at <= now
    }
}

/// What a claim finds, decided from the record already stored (if any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No live record, or an in-flight one whose lease ran out: the caller becomes the owner.
    Acquire,
    /// Completed with the same fingerprint: replay the stored payload.
    Replay(Bytes),
    /// The key was first used with a different payload. Checked before anything else, so it
    /// holds while the first request is still running.
    Mismatch,
    /// Another owner holds a live lease.
    InFlight { lease_expires_at: Timestamp },
}

/// The state machine's transition for a claim.
pub fn decide(existing: Option<&Record>, fingerprint: &Fingerprint, now: Timestamp) -> Decision {
    let Some(record) = existing else {
        return Decision::Acquire;
    };
    if record.is_expired(now) {
        return Decision::Acquire;
    }
    if record.fingerprint != *fingerprint {
        return Decision::Mismatch;
    }
    match &record.state {
        RecordState::Completed { payload } => Decision::Replay(payload.clone()),
        RecordState::InFlight { lease_expires_at, .. } if *lease_expires_at > now => {
            Decision::InFlight { lease_expires_at: *lease_expires_at }
        }
        RecordState::InFlight { .. } => Decision::Acquire,
    }
}

/// Whether `token` still owns `record`: the check behind complete, release and renew.
pub fn is_owner(record: Option<&Record>, token: FencingToken) -> bool {
    matches!(
        record,
        Some(Record { state: RecordState::InFlight { token: current, .. }, .. }) if *current == token
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(s: &str) -> Fingerprint {
        Fingerprint::builder().part(s.as_bytes()).finish()
    }

    fn in_flight(token: u64, lease_ms: u64, expires_ms: u64) -> Record {
        Record {
            fingerprint: fp("a"),
            state: RecordState::InFlight {
                token: FencingToken::from_u64(token),
                lease_expires_at: Timestamp::from_millis(lease_ms),
            },
            created_at: Timestamp::from_millis(0),
            expires_at: Timestamp::from_millis(expires_ms),
        }
    }

    #[test]
    fn transitions_follow_the_contract() {
        let t = Timestamp::from_millis;
        let running = in_flight(7, 1_000, 90_000);
        assert_eq!(decide(None, &fp("a"), t(0)), Decision::Acquire);
        assert_eq!(
            decide(Some(&running), &fp("a"), t(500)),
            Decision::InFlight { lease_expires_at: t(1_000) }
        );
        // The fingerprint is checked first, even while the first request runs.
        assert_eq!(decide(Some(&running), &fp("b"), t(500)), Decision::Mismatch);
        // Lease ran out: the same payload takes over, a different one is still refused.
        assert_eq!(decide(Some(&running), &fp("a"), t(1_000)), Decision::Acquire);
        assert_eq!(decide(Some(&running), &fp("b"), t(1_000)), Decision::Mismatch);
        // Past expiry the record counts as absent, whatever the payload.
        assert_eq!(decide(Some(&running), &fp("b"), t(90_000)), Decision::Acquire);

        let done = Record {
            state: RecordState::Completed { payload: Bytes::from_static(b"ok") },
            ..running.clone()
        };
        assert_eq!(
            decide(Some(&done), &fp("a"), t(5)),
            Decision::Replay(Bytes::from_static(b"ok"))
        );
        assert_eq!(decide(Some(&done), &fp("b"), t(5)), Decision::Mismatch);
        assert_eq!(decide(Some(&done), &fp("a"), t(90_000)), Decision::Acquire);

        assert!(is_owner(Some(&running), FencingToken::from_u64(7)));
        assert!(!is_owner(Some(&running), FencingToken::from_u64(8)));
        assert!(!is_owner(Some(&done), FencingToken::from_u64(7)));
        assert!(!is_owner(None, FencingToken::from_u64(7)));
    }

    #[test]
    fn generated_tokens_differ() {
        let tokens: std::collections::HashSet<u64> =
            (0..1_000).map(|_| FencingToken::generate().as_u64()).collect();
        assert_eq!(tokens.len(), 1_000);
    }
}
