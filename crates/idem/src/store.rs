//! Opening a store from its URL.

use std::sync::Arc;

use idem_core::{MemoryStore, Store};
use idem_sqlite::SqliteStore;

/// `memory://` or `sqlite://PATH[?options]`.
pub fn open(url: &str) -> Result<Arc<dyn Store>, String> {
    let scheme = url.split_once("://").map(|(scheme, _)| scheme);
    match scheme {
        Some("memory") => Ok(Arc::new(MemoryStore::new())),
        Some("sqlite") => SqliteStore::from_url(url)
            .map(|store| Arc::new(store) as Arc<dyn Store>)
            .map_err(|error| format!("--store {url}: {error}")),
        Some(other @ ("postgres" | "postgresql" | "redis")) => Err(format!(
            "--store {url}: the {other} store is not part of this build yet; use sqlite:// or memory://"
        )),
        _ => Err(format!("--store {url:?}: expected memory:// or sqlite://PATH")),
    }
}
