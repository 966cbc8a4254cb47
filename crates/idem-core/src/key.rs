//! Idempotency keys and the scope that partitions them.
//!
//! ```
//! use idem_core::IdempotencyKey;
//!
//! // A bare token and a structured-field string name the same key.
//! let bare = IdempotencyKey::parse_header(b"order-42").unwrap();
//! let quoted = IdempotencyKey::parse_header(b"\"order-42\"").unwrap();
//! assert_eq!(bare, quoted);
//! assert!(IdempotencyKey::parse_header(b"").is_err());
//! ```

use std::fmt;

use sha2::{Digest, Sha256};

/// The longest key accepted, in characters (after unquoting).
pub const MAX_KEY_LEN: usize = 255;

/// A validated idempotency key: 1 to 255 visible ASCII characters (0x21 to 0x7E).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdempotencyKey(String);

/// Why a key was refused. Each variant reads as a sentence a client can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    #[error("the Idempotency-Key header is empty")]
    Empty,
    #[error("the Idempotency-Key is {len} characters long; at most {MAX_KEY_LEN} are allowed")]
    TooLong { len: usize },
    #[error(
        "the Idempotency-Key contains the byte 0x{byte:02X} at position {position}; only visible ASCII (0x21 to 0x7E) is allowed"
    )]
    InvalidCharacter { byte: u8, position: usize },
    #[error(
        "the Idempotency-Key starts with a quote but is not a well-formed structured-field string"
    )]
    MalformedString,
}

impl IdempotencyKey {
    /// Parses the value of one `Idempotency-Key` header: either a bare token (`abc`) or a
    /// structured-field string (`"abc"`, RFC 8941 section 3.3.3), which name the same key.
    pub fn parse_header(value: &[u8]) -> Result<Self, KeyError> {
        let value = value.trim_ascii();
        if value.is_empty() {
            return Err(KeyError::Empty);
        }
        if value[0] == b'"' {
            Self::validate(unquote(value)?)
        } else {
            Self::validate(value.to_vec())
        }
    }

    /// Validates an already unquoted key, as a library caller holds it.
    pub fn new(key: impl Into<String>) -> Result<Self, KeyError> {
        Self::validate(key.into().into_bytes())
    }

    fn validate(bytes: Vec<u8>) -> Result<Self, KeyError> {
        if bytes.is_empty() {
            return Err(KeyError::Empty);
        }
        if let Some(position) = bytes.iter().position(|b| !(0x21..=0x7E).contains(b)) {
            return Err(KeyError::InvalidCharacter { byte: bytes[position], position });
        }
        if bytes.len() > MAX_KEY_LEN {
            return Err(KeyError::TooLong { len: bytes.len() });
        }
        // Every byte is visible ASCII, so this cannot fail.
        Ok(Self(String::from_utf8(bytes).map_err(|_| KeyError::MalformedString)?))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Undoes structured-field string quoting: `"a\"b"` is `a"b`. Parameters after the string
/// (`"abc";x=1`, RFC 8941 section 3.1.2) are allowed and ignored: they do not name the key.
fn unquote(value: &[u8]) -> Result<Vec<u8>, KeyError> {
    let mut out = Vec::with_capacity(value.len());
    let mut bytes = value.iter().enumerate().skip(1);
    let end = loop {
        match bytes.next() {
            None => return Err(KeyError::MalformedString),
            Some((_, b'\\')) => match bytes.next() {
                Some((_, &escaped @ (b'"' | b'\\'))) => out.push(escaped),
                _ => return Err(KeyError::MalformedString),
            },
            Some((index, b'"')) => break index,
            Some((_, &other)) => out.push(other),
        }
    };
    let parameters = &value[end + 1..];
    if !parameters.is_empty() && !is_parameters(parameters) {
        return Err(KeyError::MalformedString);
    }
    Ok(out)
}

/// `;name` or `;name=value` pairs (RFC 8941 parameters), loosely: names of lowercase letters,
/// digits and `_-.*`, values of visible ASCII other than `;`.
fn is_parameters(text: &[u8]) -> bool {
    text.split(|b| *b == b';').enumerate().all(|(index, parameter)| {
        if index == 0 {
            return parameter.trim_ascii().is_empty();
        }
        let parameter = parameter.trim_ascii();
        let (name, value) = match parameter.iter().position(|b| *b == b'=') {
            Some(at) => (&parameter[..at], Some(&parameter[at + 1..])),
            None => (parameter, None),
        };
        !name.is_empty()
            && name
                .iter()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-.*".contains(b))
            && value.is_none_or(|value| {
                !value.is_empty() && value.iter().all(|b| (0x21..=0x7E).contains(b))
            })
    })
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("IdempotencyKey").field(&self.0).finish()
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Who owns a key. Two callers using the same key string never see each other's records.
///
/// The scope holds a SHA-256 of the caller's credential (by default the `Authorization`
/// header), never the credential itself, so it is safe to store and to log.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scope(String);

impl Scope {
    /// The scope of a caller identified by `credential` (hashed; the raw value is not kept).
    pub fn from_credential(credential: &[u8]) -> Self {
        Self::from_credentials([credential])
    }

    /// The scope of a caller identified by all the values of its credential header, in order;
    /// [`Scope::anonymous`] when there are none. The gateway and `idem keys --credential` both
    /// derive scopes here, so they always agree.
    pub fn from_credentials<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Self {
        let mut hasher = Sha256::new();
        let mut any = false;
        for value in values {
            hasher.update(value);
            hasher.update([0]);
            any = true;
        }
        if any { Self(hex(&hasher.finalize()[..16])) } else { Self::anonymous() }
    }

    /// The scope of requests that carry no credential.
    pub fn anonymous() -> Self {
        Self("-".to_owned())
    }

    /// A scope named by the application (the library case), used as given.
    pub fn named(name: impl Into<String>) -> Self {
        Self(name.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Scope").field(&self.0).finish()
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The identity of one record in a store: the caller's scope and the key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RecordKey {
    pub scope: Scope,
    pub key: IdempotencyKey,
}

impl RecordKey {
    pub fn new(scope: Scope, key: IdempotencyKey) -> Self {
        Self { scope, key }
    }

    /// A stable 128-bit digest of scope and key: how stores name a record without the
    /// caller's raw key, and how change notifications identify it.
    pub fn digest(&self) -> [u8; 16] {
        use sha2::{Digest, Sha256};
        let mut hasher = Sha256::new();
        hasher.update(self.scope.as_str().as_bytes());
        hasher.update([0]);
        hasher.update(self.key.as_str().as_bytes());
        let digest = hasher.finalize();
        let mut out = [0u8; 16];
        out.copy_from_slice(&digest[..16]);
        out
    }

    /// The first 64 bits of [`RecordKey::digest`]: what a change notification carries.
    pub fn change_id(&self) -> u64 {
        let digest = self.digest();
        u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
    }

    /// Rebuilds a key a store kept; a key that no longer validates is a corrupt record.
    pub fn from_stored(scope: String, key: String) -> crate::Result<Self> {
        let key = IdempotencyKey::new(key)
            .map_err(|error| crate::Error::Corrupt(format!("stored key: {error}")))?;
        Ok(Self::new(Scope::named(scope), key))
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 0xF) as usize] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structured_field_parameters_are_accepted_and_ignored() {
        let plain = IdempotencyKey::parse_header(b"\"abc\"").unwrap();
        for value in [&b"\"abc\";x=1"[..], b"\"abc\"; x=1;y", b"\"abc\";level=\"2\""] {
            assert_eq!(IdempotencyKey::parse_header(value).unwrap(), plain, "{value:?}");
        }
        for value in [&b"\"abc\"x"[..], b"\"abc\";", b"\"abc\";X=1", b"\"abc\";x="] {
            assert!(IdempotencyKey::parse_header(value).is_err(), "{value:?}");
        }
    }

    #[test]
    fn bare_and_quoted_forms_name_the_same_key() {
        let bare = IdempotencyKey::parse_header(b"8e03978e-40d5-43e8-bc93-6894a57f9324").unwrap();
        let quoted =
            IdempotencyKey::parse_header(b"\"8e03978e-40d5-43e8-bc93-6894a57f9324\"").unwrap();
        assert_eq!(bare, quoted);
        assert_eq!(bare.as_str(), "8e03978e-40d5-43e8-bc93-6894a57f9324");
        // Escapes inside a string are undone before validation.
        let escaped = IdempotencyKey::parse_header(br#""a\"b\\c""#).unwrap();
        assert_eq!(escaped.as_str(), r#"a"b\c"#);
        assert_eq!(IdempotencyKey::parse_header(br#"a"b\c"#).unwrap(), escaped);
    }

    #[test]
    fn length_is_counted_after_unquoting() {
        let max = "k".repeat(MAX_KEY_LEN);
        assert!(IdempotencyKey::parse_header(max.as_bytes()).is_ok());
        // 255 characters plus two quotes is still 255 characters of key.
        assert!(IdempotencyKey::parse_header(format!("\"{max}\"").as_bytes()).is_ok());
        let long = "k".repeat(MAX_KEY_LEN + 1);
        assert_eq!(
            IdempotencyKey::parse_header(long.as_bytes()),
            Err(KeyError::TooLong { len: 256 })
        );
        assert_eq!(IdempotencyKey::parse_header(b"x").unwrap().as_str(), "x");
    }

    #[test]
    fn refuses_empty_invisible_and_malformed_keys() {
        assert_eq!(IdempotencyKey::parse_header(b""), Err(KeyError::Empty));
        assert_eq!(IdempotencyKey::parse_header(b"   "), Err(KeyError::Empty));
        assert_eq!(IdempotencyKey::parse_header(b"\"\""), Err(KeyError::Empty));
        assert_eq!(
            IdempotencyKey::parse_header(b"a b"),
            Err(KeyError::InvalidCharacter { byte: b' ', position: 1 })
        );
        assert_eq!(
            IdempotencyKey::parse_header("caf\u{e9}".as_bytes()),
            Err(KeyError::InvalidCharacter { byte: 0xC3, position: 3 })
        );
        assert_eq!(
            IdempotencyKey::parse_header(b"\"a b\""),
            Err(KeyError::InvalidCharacter { byte: b' ', position: 1 })
        );
        assert_eq!(IdempotencyKey::parse_header(b"\"abc"), Err(KeyError::MalformedString));
        assert_eq!(IdempotencyKey::parse_header(b"\"a\"b\""), Err(KeyError::MalformedString));
        assert_eq!(IdempotencyKey::parse_header(br#""a\x""#), Err(KeyError::MalformedString));
        assert_eq!(IdempotencyKey::parse_header(b"\""), Err(KeyError::MalformedString));
        assert!(IdempotencyKey::new("tab\there").is_err());
    }

    #[test]
    fn scopes_hash_credentials_and_never_hold_them() {
        let a = Scope::from_credential(b"Bearer secret-a");
        let b = Scope::from_credential(b"Bearer secret-b");
        assert_ne!(a, b);
        assert_eq!(a, Scope::from_credential(b"Bearer secret-a"));
        assert!(!a.as_str().contains("secret"));
        assert_eq!(a.as_str().len(), 32);
        assert_ne!(a, Scope::anonymous());
    }
}
