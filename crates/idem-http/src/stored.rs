//! The stored form of an HTTP response: what a replay sends back, byte for byte.
//!
//! A small length-prefixed binary layout (version 1):
//! `"IDM1" | status u16 | flags u8 | header count u16 | (name len u16, name, value len u32,
//! value)* | body len u32 | body`. Decoding checks every length, so a damaged record is
//! reported as corrupt instead of replayed wrong.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

const MAGIC: &[u8; 4] = b"IDM1";
const FLAG_BODY_OMITTED: u8 = 1;
const FLAG_COOKIES_OMITTED: u8 = 2;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The body was larger than the store limit: the status and headers were kept, the body
    /// was not.
    pub body_omitted: bool,
    /// The response set cookies for a caller with no credential: they were not stored, since
    /// any other such caller could replay them.
    pub cookies_omitted: bool,
}

impl StoredResponse {
    pub fn encode(&self) -> Bytes {
        let headers_len: usize =
            self.headers.iter().map(|(name, value)| 6 + name.as_str().len() + value.len()).sum();
        let mut out = BytesMut::with_capacity(4 + 2 + 1 + 2 + headers_len + 4 + self.body.len());
        out.put_slice(MAGIC);
        out.put_u16(self.status.as_u16());
        let mut flags = 0;
        if self.body_omitted {
            flags |= FLAG_BODY_OMITTED;
        }
        if self.cookies_omitted {
            flags |= FLAG_COOKIES_OMITTED;
        }
        out.put_u8(flags);
        let count =
            u16::try_from(self.headers.len()).expect("a response has fewer than 65536 headers");
        out.put_u16(count);
        for (name, value) in &self.headers {
            out.put_u16(name.as_str().len() as u16);
            out.put_slice(name.as_str().as_bytes());
            out.put_u32(value.len() as u32);
            out.put_slice(value.as_bytes());
        }
        out.put_u32(
            u32::try_from(self.body.len()).expect("stored bodies are limited far below 4 GiB"),
        );
        out.put_slice(&self.body);
        out.freeze()
    }

    /// The response as first sent (a replay adds its own headers).
    /// Keeps `Set-Cookie` out of a response stored for a caller with no credential (`scope`
    /// anonymous): every such caller shares the scope, so a stored cookie (a session, say)
    /// would be handed to whoever replays the key.
    pub fn without_cookies_for(mut self, scope: &idem_core::Scope) -> Self {
        if *scope == idem_core::Scope::anonymous()
            && self.headers.contains_key(http::header::SET_COOKIE)
        {
            self.headers.remove(http::header::SET_COOKIE);
            self.cookies_omitted = true;
        }
        self
    }

    pub fn into_response(self) -> http::Response<crate::Body> {
        let mut response = http::Response::new(crate::Body::from(self.body));
        *response.status_mut() = self.status;
        *response.headers_mut() = self.headers;
        response
    }

    /// Whether this is the `502 outcome-unknown` problem a key is held with when nobody knows
    /// whether its request ran: what `idem keys release` may clear.
    pub fn is_outcome_unknown(&self) -> bool {
        self.status == StatusCode::BAD_GATEWAY
            && serde_json::from_slice::<serde_json::Value>(&self.body).is_ok_and(|problem| {
                problem["type"]
                    == format!("urn:idem:problem:{}", crate::ProblemKind::OutcomeUnknown.slug())
            })
    }

    pub fn decode(mut bytes: Bytes) -> Result<Self, String> {
        fn need(bytes: &Bytes, len: usize, what: &str) -> Result<(), String> {
            if bytes.remaining() < len {
                Err(format!("truncated at {what}: need {len} bytes, {} left", bytes.remaining()))
            } else {
                Ok(())
            }
        }
        need(&bytes, 9, "header")?;
        if &bytes[..4] != MAGIC {
            return Err("unknown stored response format".into());
        }
        bytes.advance(4);
        let status = StatusCode::from_u16(bytes.get_u16()).map_err(|error| error.to_string())?;
        let flags = bytes.get_u8();
        let count = bytes.get_u16();
        // A damaged count must not size the map: each header takes at least 6 bytes, and a
        // map past its maximum size panics (found by fuzzing: a count of 65,535).
        let capacity = (count as usize).min(bytes.remaining() / 6);
        let mut headers = HeaderMap::try_with_capacity(capacity)
            .map_err(|_| format!("{count} headers: more than a header map holds"))?;
        for _ in 0..count {
            need(&bytes, 2, "header name length")?;
            let name_len = bytes.get_u16() as usize;
            need(&bytes, name_len, "header name")?;
            let name = HeaderName::from_bytes(&bytes.split_to(name_len))
                .map_err(|error| error.to_string())?;
            need(&bytes, 4, "header value length")?;
            let value_len = bytes.get_u32() as usize;
            need(&bytes, value_len, "header value")?;
            let value = HeaderValue::from_maybe_shared(bytes.split_to(value_len))
                .map_err(|error| error.to_string())?;
            headers
                .try_append(name, value)
                .map_err(|_| format!("{count} headers: more than a header map holds"))?;
        }
        need(&bytes, 4, "body length")?;
        let body_len = bytes.get_u32() as usize;
        need(&bytes, body_len, "body")?;
        let body = bytes.split_to(body_len);
        if bytes.has_remaining() {
            return Err(format!("{} bytes after the body", bytes.remaining()));
        }
        Ok(Self {
            status,
            headers,
            body,
            body_omitted: flags & FLAG_BODY_OMITTED != 0,
            cookies_omitted: flags & FLAG_COOKIES_OMITTED != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by fuzzing: a record whose header count is larger than a header map may hold
    /// panicked in `decode` instead of being refused as damaged.
    #[test]
    fn a_damaged_header_count_is_refused_not_a_panic() {
        let mut record = BytesMut::from(&MAGIC[..]);
        record.put_u16(204);
        record.put_u8(0);
        record.put_u16(u16::MAX);
        assert!(StoredResponse::decode(record.clone().freeze()).is_err());
        // And as many headers as the count says, each the smallest there is: still refused,
        // past what a header map holds.
        for index in 0..u16::MAX {
            let name = format!("x{index}");
            record.put_u16(name.len() as u16);
            record.put_slice(name.as_bytes());
            record.put_u32(0);
        }
        record.put_u32(0);
        assert!(StoredResponse::decode(record.freeze()).is_err());
    }

    #[test]
    fn round_trips_and_detects_damage() {
        let mut headers = HeaderMap::new();
        headers.append("content-type", HeaderValue::from_static("application/json"));
        headers.append("set-cookie", HeaderValue::from_static("a=1"));
        headers.append("set-cookie", HeaderValue::from_static("b=2"));
        let original = StoredResponse {
            status: StatusCode::CREATED,
            headers,
            body: Bytes::from_static(b"{\"id\":1}"),
            body_omitted: false,
            cookies_omitted: true,
        };
        let encoded = original.encode();
        assert_eq!(StoredResponse::decode(encoded.clone()).unwrap(), original);
        for cut in [0, 3, 9, 20, encoded.len() - 1] {
            assert!(StoredResponse::decode(encoded.slice(..cut)).is_err(), "cut at {cut}");
        }
        let mut extended = BytesMut::from(&encoded[..]);
        extended.put_u8(0);
        assert!(StoredResponse::decode(extended.freeze()).is_err());
        assert!(StoredResponse::decode(Bytes::from_static(b"XXXX\0\0\0\0\0")).is_err());
    }
}
