//! TLS to Redis (`rediss://`): redis-rs's rustls support, with the CA a URL names.

use idem_core::{Error, Result};
use redis::TlsCertificates;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// The largest `ca` file read (a bundle of every public CA is about 250 KiB).
const MAX_CA_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// The certificates a `scheme://` URL with `ca` asks for: `None` to use the system's (or no
/// TLS at all), `Some` with the CA file's certificates. Refuses what cannot work.
pub(crate) fn certificates(scheme: &str, ca: Option<&str>) -> Result<Option<TlsCertificates>> {
    if scheme == "rediss+cluster" {
        return Err(Error::Config(
            "rediss+cluster:// (TLS to a Redis Cluster) is not supported yet; use redis+cluster:// on a trusted network, or rediss:// to a single server".into(),
        ));
    }
    if scheme == "rediss" {
        // redis-rs builds its TLS settings with rustls's process-wide provider: make it ring
        // (the one this build carries) unless the application chose one already.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    let Some(path) = ca else { return Ok(None) };
    if scheme != "rediss" {
        return Err(Error::Config(format!(
            "ca={path} applies to TLS connections: use rediss:// instead of {scheme}://"
        )));
    }
    let pem = read_bounded(path)
        .map_err(|error| Error::Config(format!("cannot read ca={path}: {error}")))?;
    let mut count = 0;
    for certificate in CertificateDer::pem_slice_iter(&pem) {
        certificate.map_err(|error| {
            Error::Config(format!("ca={path} is not PEM certificates: {error}"))
        })?;
        count += 1;
    }
    if count == 0 {
        return Err(Error::Config(format!(
            "ca={path} holds no certificate (expected PEM: -----BEGIN CERTIFICATE-----)"
        )));
    }
    Ok(Some(TlsCertificates { client_tls: None, root_cert: Some(pem) }))
}

/// A file's bytes, refused past [`MAX_CA_FILE_BYTES`].
fn read_bounded(path: &str) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?.take(MAX_CA_FILE_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_CA_FILE_BYTES {
        return Err(std::io::Error::other(format!("larger than {MAX_CA_FILE_BYTES} bytes")));
    }
    Ok(bytes)
}

/// A failed `rediss://` connection, said in words a person can act on: which check refused
/// the server's certificate, and which CAs were trusted.
pub(crate) fn explain(error: Error, ca: Option<&str>) -> Error {
    let text = match &error {
        Error::Unavailable(source) => source.to_string(),
        other => other.to_string(),
    };
    let trusted = match ca {
        Some(path) => format!("ca={path}"),
        None => {
            "the system's CA certificates (SSL_CERT_FILE, or ca=PATH in the URL, to change them)"
                .to_owned()
        }
    };
    let why = if text.contains("UnknownIssuer") || text.contains("BadSignature") {
        format!("the server's certificate is not signed by a trusted CA (trusted: {trusted})")
    } else if text.contains("NotValidForName") || text.contains("not valid for name") {
        "the server's certificate is not valid for the host name in the URL".to_owned()
    } else if text.contains("invalid peer certificate") {
        "the server's certificate was refused".to_owned()
    } else if text.contains("InvalidContentType") || text.contains("corrupt message") {
        "the server does not speak TLS on this port (a plain redis:// port?)".to_owned()
    } else {
        return error;
    };
    Error::unavailable(format!("TLS to Redis failed: {why}: {text}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_files_are_checked_before_connecting() {
        let error = |scheme: &str, ca: Option<&str>| {
            certificates(scheme, ca).err().map(|error| error.to_string()).unwrap_or_default()
        };
        assert!(error("rediss+cluster", None).contains("not supported yet"));
        assert!(error("redis", Some("/etc/ca.pem")).contains("use rediss://"));
        assert!(error("rediss", Some("/nonexistent/ca.pem")).contains("cannot read ca="));
        assert!(error("rediss", Some("/dev/null")).contains("holds no certificate"));
        assert!(certificates("rediss", None).unwrap().is_none());
        assert_eq!(idem_core::store_kit::percent_decode("/a%20b/c%2"), "/a b/c%2");
    }
}
