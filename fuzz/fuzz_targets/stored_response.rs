//! The stored form of an HTTP response (`StoredResponse::decode` / `encode`).
//!
//! Input starting with `IDM1`: a stored record as read from a store. Checks that `decode`
//! never panics and that what it accepts re-encodes to a record of the same length (nothing
//! dropped or invented, only header order, name case and unknown flag bits normalised) that
//! decodes to the same response, and re-encodes to itself.
//!
//! Any other input describes a response (see `response_from`), which is encoded and must
//! decode to the same response.
#![no_main]

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use idem_fuzz::Input;
use idem_http::StoredResponse;
use libfuzzer_sys::fuzz_target;

/// A response from `status u16 | flags u8 | (name: u8 len, value: u8 len)* until a zero-length
/// name | body`; names and values the `http` crate refuses are skipped.
fn response_from(input: &mut Input<'_>) -> Option<StoredResponse> {
    let status = StatusCode::from_u16(u16::from_be_bytes([input.byte(), input.byte()])).ok()?;
    let flags = input.byte();
    let mut headers = HeaderMap::new();
    loop {
        let name = input.short();
        if name.is_empty() {
            break;
        }
        let value = input.short();
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            headers.append(name, value);
        }
    }
    Some(StoredResponse {
        status,
        headers,
        body: Bytes::copy_from_slice(input.rest()),
        body_omitted: flags & 1 != 0,
        cookies_omitted: flags & 2 != 0,
    })
}

fuzz_target!(|data: &[u8]| {
    if data.starts_with(b"IDM1") {
        let Ok(decoded) = StoredResponse::decode(Bytes::copy_from_slice(data)) else { return };
        let encoded = decoded.encode();
        assert_eq!(encoded.len(), data.len(), "re-encoding changed the length");
        let again = StoredResponse::decode(encoded.clone());
        assert_eq!(again.as_ref(), Ok(&decoded));
        assert_eq!(again.map(|response| response.encode()), Ok(encoded));
    } else if let Some(response) = response_from(&mut Input::new(data)) {
        let encoded = response.encode();
        assert_eq!(StoredResponse::decode(encoded), Ok(response));
    }
});
