//! Opening a store from its URL.

use std::sync::Arc;

use idem_core::{MemoryStore, Store};
use idem_postgres::PostgresStore;
use idem_redis::RedisStore;
use idem_sqlite::SqliteStore;

/// `memory://`, `sqlite://PATH`, `postgres://...` (or `postgresql://`), `redis://...` (or
/// `rediss://`), `redis+cluster://host:port,host:port...`. Shared stores must be reachable now.
pub async fn open(url: &str) -> Result<Arc<dyn Store>, String> {
    open_with(url, true).await
}

/// Like [`open`], for operator tools: a store's schema is never created or migrated, and a
/// SQLite file that does not exist is not created.
pub async fn open_existing(url: &str) -> Result<Arc<dyn Store>, String> {
    open_with(url, false).await
}

async fn open_with(url: &str, migrating: bool) -> Result<Arc<dyn Store>, String> {
    let scheme = url.split_once("://").map(|(scheme, _)| scheme);
    let opened: Result<Arc<dyn Store>, idem_core::Error> = match scheme {
        Some("memory") => memory(url).map(|store| Arc::new(store) as Arc<dyn Store>),
        Some("sqlite") if migrating => {
            SqliteStore::from_url(url).map(|store| Arc::new(store) as Arc<dyn Store>)
        }
        Some("sqlite") => {
            SqliteStore::from_url_existing(url).map(|store| Arc::new(store) as Arc<dyn Store>)
        }
        Some("postgres" | "postgresql") if migrating => {
            PostgresStore::connect(url).await.map(|store| Arc::new(store) as Arc<dyn Store>)
        }
        Some("postgres" | "postgresql") => PostgresStore::connect_existing(url)
            .await
            .map(|store| Arc::new(store) as Arc<dyn Store>),
        // rediss+cluster:// gets the Redis store's own "not supported yet".
        Some("redis" | "rediss" | "redis+cluster" | "rediss+cluster") => {
            RedisStore::connect(url).await.map(|store| Arc::new(store) as Arc<dyn Store>)
        }
        _ => {
            return Err(format!(
                "--store {:?}: expected memory://, sqlite://PATH, postgres://..., redis://..., rediss://... (TLS) or redis+cluster://...",
                redact(url)
            ));
        }
    };
    opened.map_err(|error| format!("--store {}: {}", redact(url), scrub(&error.to_string(), url)))
}

pub use crate::secrets::{redact, scrub};

/// `memory://` or `memory://?max_bytes=SIZE` (default 1GiB): when full, new keys get 503.
fn memory(url: &str) -> Result<MemoryStore, idem_core::Error> {
    let query = url.split_once('?').map_or("", |(_, query)| query);
    let mut max_bytes = MemoryStore::DEFAULT_MAX_BYTES;
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        match pair.split_once('=') {
            Some(("max_bytes", value)) => {
                max_bytes = crate::config::parse_size("max_bytes", value)
                    .ok()
                    .and_then(|bytes| usize::try_from(bytes).ok())
                    .filter(|bytes| *bytes > 0)
                    .ok_or_else(|| {
                        idem_core::Error::Config(format!(
                            "max_bytes must be a size such as 256MiB, not {value:?} (in the memory:// URL)"
                        ))
                    })?;
            }
            _ => {
                return Err(idem_core::Error::Config(format!(
                    "unknown memory:// URL parameter {pair:?} (known: max_bytes)"
                )));
            }
        }
    }
    Ok(MemoryStore::with_max_bytes(max_bytes))
}
