use std::error::Error as StdError;

pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// What can go wrong talking to a store. Outcomes of a claim (replay, mismatch, in flight) are
/// not errors; they are [`crate::Decision`]s.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The caller's token no longer owns the record: its lease ran out and another owner took
    /// over, or the record was deleted. The caller must not assume its outcome was stored.
    #[error("the claim was fenced: another owner holds this key or the record is gone")]
    Fenced,
    /// The store could not be reached or did not answer in time.
    #[error("the store is unavailable: {0}")]
    Unavailable(#[source] BoxError),
    /// The store holds as much as it may (a bounded memory store): no new key is taken until
    /// records expire. Not "unavailable": failing open on it would let anyone who fills the
    /// store turn deduplication off.
    #[error("the store is full: {0}")]
    Full(String),
    /// A stored record could not be read back as written.
    #[error("a stored record is corrupt: {0}")]
    Corrupt(String),
    /// The store was configured with something it cannot use.
    #[error("invalid store configuration: {0}")]
    Config(String),
}

impl Error {
    pub fn unavailable(source: impl Into<BoxError>) -> Self {
        Self::Unavailable(source.into())
    }

    /// The error means "try again later" rather than "this request is wrong".
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
