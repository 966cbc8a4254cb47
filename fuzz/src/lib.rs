//! Helpers shared by the fuzz targets: a cursor that splits a fuzz input into fields.
//!
//! Every read is total: past the end, a read yields zero or an empty slice, so a target never
//! has to unwrap anything the fuzzer controls.

/// A cursor over a fuzz input.
#[derive(Debug)]
pub struct Input<'a> {
    rest: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { rest: data }
    }

    /// Up to `len` bytes (fewer at the end of the input).
    pub fn take(&mut self, len: usize) -> &'a [u8] {
        let (head, tail) = self.rest.split_at(len.min(self.rest.len()));
        self.rest = tail;
        head
    }

    pub fn byte(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }

    /// A big-endian u64 (missing bytes count as zero).
    pub fn u64(&mut self) -> u64 {
        let mut bytes = [0u8; 8];
        let taken = self.take(8);
        bytes[..taken.len()].copy_from_slice(taken);
        u64::from_be_bytes(bytes)
    }

    /// A field prefixed by its length in one byte.
    pub fn short(&mut self) -> &'a [u8] {
        let len = self.byte() as usize;
        self.take(len)
    }

    /// A field prefixed by its length in two big-endian bytes.
    pub fn long(&mut self) -> &'a [u8] {
        let len = u16::from_be_bytes([self.byte(), self.byte()]) as usize;
        self.take(len)
    }

    /// Everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        self.take(usize::MAX)
    }

    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }
}

/// A field as text, with invalid UTF-8 replaced (as brokers' clients do with header values).
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Whether two deliveries read as the same message (`Received` has no `PartialEq`).
pub fn same_message(
    a: &idem_stream::consume::Received,
    b: &idem_stream::consume::Received,
) -> bool {
    (&a.id, &a.subject, &a.payload, &a.headers, a.attempt, a.position)
        == (&b.id, &b.subject, &b.payload, &b.headers, b.attempt, b.position)
}

/// Whether `id` is `prefix` and a SHA-256 in lowercase hex: the shape of a content id.
pub fn is_content_id(id: &str, prefix: &str) -> bool {
    id.strip_prefix(prefix).is_some_and(|hex| {
        hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}
