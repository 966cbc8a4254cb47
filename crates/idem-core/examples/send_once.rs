//! The library without HTTP: a job that sends a payout must not send it twice when the job is
//! retried (a crashed worker, a redelivered queue message, an operator who runs it again).
//!
//! Run with `cargo run -p idem-core --example send_once`.

use std::sync::atomic::{AtomicU32, Ordering};

use bytes::Bytes;
use idem_core::{
    Engine, EngineConfig, Fingerprint, IdempotencyKey, MemoryStore, Outcome, RecordKey, Scope,
    SystemClock,
};

static PAYOUTS_SENT: AtomicU32 = AtomicU32::new(0);

/// The non-idempotent effect: each call moves money.
async fn send_payout(account: &str, cents: u64) -> Result<Bytes, std::io::Error> {
    let number = PAYOUTS_SENT.fetch_add(1, Ordering::SeqCst) + 1;
    Ok(Bytes::from(format!("payout #{number}: {cents} cents to {account}")))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A durable store (idem_sqlite::SqliteStore) would make this hold across restarts too.
    let engine = Engine::new(MemoryStore::new(), SystemClock, EngineConfig::default());
    let key =
        RecordKey::new(Scope::named("payouts"), IdempotencyKey::new("payout-2026-11-22-acct-7")?);
    // The fingerprint covers what the operation does, so a reused key with other input is caught.
    let fingerprint = Fingerprint::builder().part(b"acct-7").part(&2_500u64.to_be_bytes()).finish();

    for attempt in 1..=3 {
        match engine.run(&key, fingerprint, || send_payout("acct-7", 2_500)).await? {
            Outcome::Executed(receipt) => {
                println!("attempt {attempt}: sent   -> {}", String::from_utf8_lossy(&receipt))
            }
            Outcome::Replayed(receipt) => {
                println!("attempt {attempt}: replay -> {}", String::from_utf8_lossy(&receipt))
            }
            Outcome::InFlight { retry_after } => {
                println!("attempt {attempt}: still running, retry in {retry_after:?}")
            }
            Outcome::Mismatch => println!("attempt {attempt}: key reused with different input"),
            Outcome::Failed(error) => {
                println!("attempt {attempt}: failed ({error}); the key was released")
            }
        }
    }
    let sent = PAYOUTS_SENT.load(Ordering::SeqCst);
    println!("payouts sent: {sent}");
    assert_eq!(sent, 1);
    Ok(())
}
