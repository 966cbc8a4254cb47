//! The PostgreSQL side of exactly-once messaging: the [inbox](Inbox) (a consumer's record of
//! what it processed, in the handler's transaction), the transactional [outbox](Outbox) and
//! its [relay](Relay), and [dead letters](DeadLetters).

mod dead_letters;
mod inbox;
mod offsets;
mod outbox;
mod relay;

/// Where to connect, with TLS as the URL's `sslmode` and `sslrootcert` say (libpq's
/// meanings, with rustls): the same connector as idem's PostgreSQL store.
pub use idem_postgres::tls::Database;

pub use crate::outbox::{
    Event, KeyState, MAX_HEADERS, MAX_PAYLOAD_BYTES, OutboxStats, PendingEvent, PurgeReport,
    RelayConfig, RoundReport,
};
pub use dead_letters::{Buried, BuriedCount, DeadLetters, Requeued};
pub use inbox::{Applied, Inbox, MAX_BATCH};
pub use offsets::Offsets;
pub use outbox::Outbox;
pub use relay::{Relay, RunConfig};

use crate::Result;

/// An arbitrary constant: the advisory lock that serialises creating the tables.
const MIGRATION_LOCK: i64 = 0x6964_656d_696e_6278;

/// Runs `ddl` in one transaction under the migration lock, so instances starting at once do
/// not race to create the same tables.
async fn migrate_locked(client: &mut tokio_postgres::Client, ddl: &str) -> Result<()> {
    let transaction = client.transaction().await?;
    transaction.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
    transaction.batch_execute(ddl).await?;
    transaction.commit().await?;
    Ok(())
}
