//! Storing the response inside the handler's own database transaction.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{HeaderMap, StatusCode, header};
use idem_core::{Completion, Engine, FencingToken, RecordKey};

use crate::{StoredResponse, remove_hop_by_hop};

/// Put in a claimed request's extensions by the layer. A handler on PostgreSQL or SQLite uses
/// it to store its response inside its own transaction, so that its business writes and the
/// stored response commit together or not at all: a crash between the two can no longer let
/// a retry run again.
///
/// ```text
/// // In an axum handler taking `Extension(idem): Extension<InTransaction>`, on PostgreSQL:
/// let transaction = client.transaction().await?;
/// transaction.execute("INSERT INTO payments (cents) VALUES (700)", &[]).await?;
/// let body = br#"{"payment_id":1}"#;
/// let payload = idem.payload(StatusCode::CREATED, &HeaderMap::new(), body);
/// idem_postgres::complete_in(&transaction, &idem.completion(), &payload).await?;
/// transaction.commit().await?;
/// idem.committed(); // then return exactly that response
/// ```
///
/// The handler must then return exactly the response it stored. If it never calls
/// [`InTransaction::committed`], the layer stores the response itself, as without it.
#[derive(Debug, Clone)]
pub struct InTransaction {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    engine: Engine,
    key: RecordKey,
    token: FencingToken,
    committed: AtomicBool,
}

impl InTransaction {
    pub(crate) fn new(engine: Engine, key: RecordKey, token: FencingToken) -> Self {
        Self { inner: Arc::new(Inner { engine, key, token, committed: AtomicBool::new(false) }) }
    }

    /// What the store's `complete_in` needs, expiring the TTL from now.
    pub fn completion(&self) -> Completion {
        Completion::new(&self.inner.engine, self.inner.key.clone(), self.inner.token)
    }

    /// The response as the layer would store and replay it.
    pub fn payload(&self, status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Bytes {
        let mut headers = headers.clone();
        remove_hop_by_hop(&mut headers);
        headers.remove(header::CONTENT_LENGTH);
        StoredResponse {
            status,
            headers,
            body: Bytes::copy_from_slice(body),
            body_omitted: false,
            cookies_omitted: false,
        }
        .without_cookies_for(&self.inner.key.scope)
        .encode()
    }

    /// Says the handler's transaction stored the response and committed.
    pub fn committed(&self) {
        self.inner.committed.store(true, Ordering::SeqCst);
    }

    /// Whether the handler said it committed and the store shows the record completed (a
    /// handler that says so before its commit, or after a failed one, is not believed: the
    /// layer then stores the response itself, as without this extension).
    pub(crate) async fn stored_by_handler(&self) -> bool {
        if !self.inner.committed.load(Ordering::SeqCst) {
            return false;
        }
        match self.inner.engine.store().get(&self.inner.key).await {
            Ok(Some(record)) => matches!(record.state, idem_core::RecordState::Completed { .. }),
            Ok(None) => false,
            Err(error) => {
                tracing::warn!(key = %self.inner.key.key, %error, "cannot check the record the handler stored; storing the response as usual");
                false
            }
        }
    }
}
