//! Request fingerprints: what makes two requests with one key "the same payload".
//!
//! ```
//! use idem_core::Fingerprint;
//!
//! let a = Fingerprint::builder().part(b"POST").part(b"/orders").part(b"{\"qty\":1}").finish();
//! let b = Fingerprint::builder().part(b"POST").part(b"/orders").part(b"{\"qty\":2}").finish();
//! assert_ne!(a, b);
//! ```

use std::fmt;

use sha2::{Digest, Sha256};

/// A SHA-256 over length-prefixed parts, so `("ab", "c")` and `("a", "bc")` differ.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    pub fn builder() -> FingerprintBuilder {
        FingerprintBuilder(Sha256::new())
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Reads a fingerprint back from storage; `None` if the slice is not 32 bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }

    /// Reads a fingerprint a store kept; anything but 32 bytes is a corrupt record.
    pub fn from_stored(bytes: &[u8]) -> crate::Result<Self> {
        Self::from_slice(bytes)
            .ok_or_else(|| crate::Error::Corrupt(format!("fingerprint of {} bytes", bytes.len())))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::key::hex(&self.0[..8]))
    }
}

/// Feeds the parts of a request into a fingerprint, in a fixed order.
#[derive(Debug, Clone)]
pub struct FingerprintBuilder(Sha256);

impl FingerprintBuilder {
    pub fn part(mut self, bytes: &[u8]) -> Self {
        self.0.update((bytes.len() as u64).to_be_bytes());
        self.0.update(bytes);
        self
    }

    pub fn finish(self) -> Fingerprint {
        Fingerprint(self.0.finalize().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_length_prefixed() {
        let ab_c = Fingerprint::builder().part(b"ab").part(b"c").finish();
        let a_bc = Fingerprint::builder().part(b"a").part(b"bc").finish();
        assert_ne!(ab_c, a_bc);
        let again = Fingerprint::builder().part(b"ab").part(b"c").finish();
        assert_eq!(ab_c, again);
        assert_eq!(Fingerprint::from_slice(ab_c.as_bytes()), Some(ab_c));
        assert_eq!(Fingerprint::from_slice(&[0; 31]), None);
    }
}
