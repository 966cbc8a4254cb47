//! TLS to PostgreSQL with rustls (ring), following libpq's `sslmode` and `sslrootcert`.
//!
//! ```no_run
//! # async fn open() -> Result<(), Box<dyn std::error::Error>> {
//! use idem_postgres::tls::Database;
//!
//! let database = Database::from_url(
//!     "postgres://idem@db.internal/app?sslmode=verify-full&sslrootcert=/etc/idem/pg-ca.pem",
//! )?;
//! let (client, connection) = database.connect().await?;
//! tokio::spawn(connection);
//! client.batch_execute("SELECT 1").await?;
//! # Ok(()) }
//! ```
//!
//! | `sslmode` | encrypted | certificate chain checked | host name checked |
//! | --- | --- | --- | --- |
//! | not given | no (as before TLS support; libpq would `prefer`) | | |
//! | `disable` | no | | |
//! | `prefer` | if the server offers it | no | no |
//! | `require` | yes, or the connection fails | only if `sslrootcert` is given (as libpq) | no |
//! | `verify-ca` | yes | yes | no |
//! | `verify-full` | yes | yes | yes |
//!
//! The chain is checked against `sslrootcert=PATH` (PEM, one or more CA certificates), or,
//! without it (or with `sslrootcert=system`), against the system's CA certificates (libpq
//! would read `~/.postgresql/root.crt` instead). A refused certificate fails the connection
//! with a message that says why (not signed by a trusted CA, not valid for the host name,
//! expired); the URL's password never appears in it.
//!
//! SCRAM channel binding (`SCRAM-SHA-256-PLUS`) is not offered: password authentication uses
//! plain `SCRAM-SHA-256`, inside the verified TLS session.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};

use idem_core::{Error, Result, store_kit};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

/// The largest `sslrootcert` file read (a bundle of every public CA is about 250 KiB).
const MAX_ROOT_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// What a connection checks of the server's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// Nothing: the session is encrypted, but anyone in the middle can answer
    /// (`sslmode=prefer`, or `require` without `sslrootcert`).
    Nothing,
    /// The chain up to a trusted CA, not the host name (`verify-ca`, or `require` with
    /// `sslrootcert`).
    Chain,
    /// The chain and the host name (`verify-full`).
    ChainAndName,
}

/// A database to connect to: the connection settings and the TLS they ask for. Cheap to
/// clone; usable as a deadpool-postgres manager's TLS (see [`Database::tls`]).
#[derive(Clone)]
pub struct Database {
    config: tokio_postgres::Config,
    tls: MakeRustls,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The config holds the password: only what says where and how.
        f.debug_struct("Database")
            .field("host", &self.config.get_hosts())
            .field("port", &self.config.get_ports())
            .field("dbname", &self.config.get_dbname())
            .field("ssl_mode", &self.config.get_ssl_mode())
            .field("verify", &self.tls.verify)
            .finish()
    }
}

impl Database {
    /// Parses a `postgres://` (or `postgresql://`) URL with libpq's `sslmode` and
    /// `sslrootcert` parameters (see the [module docs](self)), or a libpq `key=value` string
    /// (whose `sslmode` can only be `disable`, `prefer` or `require`, without verification).
    pub fn from_url(url: &str) -> Result<Self> {
        let (config, tls) = split_url(url)?;
        let config = tokio_postgres::Config::from_str(&config)
            .map_err(|error| Error::Config(format!("invalid postgres:// URL: {error}")))?;
        Self::with_tls(config, tls)
    }

    /// `config` with the TLS `parameters` (sslmode, sslrootcert) taken out of its URL.
    pub(crate) fn with_tls(
        mut config: tokio_postgres::Config,
        parameters: TlsParameters,
    ) -> Result<Self> {
        // A chain checked against the system's CAs, but no name: any certificate a public CA
        // issued for any host would pass. Refused, as libpq 16 refuses it.
        let system_roots = parameters.root.as_deref().is_none_or(|root| root == "system");
        if system_roots
            && (parameters.mode.as_deref() == Some("verify-ca")
                || (parameters.mode.as_deref() == Some("require") && parameters.root.is_some()))
        {
            return Err(Error::Config(
                "sslmode=verify-ca (or require with sslrootcert) checks the certificate's chain but not its host name, so with the system's CAs any publicly issued certificate would pass: give sslrootcert=/path/to/your-ca.pem, or use sslmode=verify-full".into(),
            ));
        }
        let (mode, verify) = match parameters.mode.as_deref() {
            // A root certificate without a mode: verify fully (libpq does for
            // sslrootcert=system; never silently ignore a CA the operator gave).
            None if parameters.root.is_some() => (SslMode::Require, Verify::ChainAndName),
            // Not given: no TLS, as before idem supported it (the server's own settings, e.g.
            // a `hostssl` line, can still demand it).
            None | Some("disable") => (SslMode::Disable, Verify::Nothing),
            Some("prefer") => (SslMode::Prefer, Verify::Nothing),
            Some("require") if parameters.root.is_some() => (SslMode::Require, Verify::Chain),
            Some("require") => (SslMode::Require, Verify::Nothing),
            Some("verify-ca") => (SslMode::Require, Verify::Chain),
            Some("verify-full") => (SslMode::Require, Verify::ChainAndName),
            Some("allow") => {
                return Err(Error::Config(
                    "sslmode=allow is not supported; use disable, prefer, require, verify-ca or verify-full (in the postgres:// URL)".into(),
                ));
            }
            Some(other) => {
                return Err(Error::Config(format!(
                    "sslmode must be disable, prefer, require, verify-ca or verify-full, not {other:?} (in the postgres:// URL)"
                )));
            }
        };
        config.ssl_mode(mode);
        let tls = MakeRustls::new(verify, parameters.root.as_deref())?;
        Ok(Self { config, tls })
    }

    pub(crate) fn from_parts(config: tokio_postgres::Config, tls: MakeRustls) -> Self {
        Self { config, tls }
    }

    /// The connection settings (TLS aside).
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    /// The TLS connector, for a connection pool (`deadpool_postgres::Manager::from_config`).
    pub fn tls(&self) -> MakeRustls {
        self.tls.clone()
    }

    /// Opens one connection; drive (spawn) the returned connection for the client to work.
    pub async fn connect(
        &self,
    ) -> std::result::Result<
        (
            tokio_postgres::Client,
            tokio_postgres::Connection<
                tokio_postgres::Socket,
                RustlsStream<tokio_postgres::Socket>,
            >,
        ),
        tokio_postgres::Error,
    > {
        self.config.connect(self.tls.clone()).await
    }
}

/// A plain [`tokio_postgres::Config`] as before: `sslmode=require` in it encrypts without
/// verifying (libpq's meaning), `prefer` (its default, also when the URL gave none) and
/// `disable` connect without TLS. Use [`Database::from_url`] for `verify-ca`/`verify-full`.
impl From<&tokio_postgres::Config> for Database {
    fn from(config: &tokio_postgres::Config) -> Self {
        let mode = match config.get_ssl_mode() {
            SslMode::Require => SslMode::Require,
            _ => SslMode::Disable,
        };
        let mut config = config.clone();
        config.ssl_mode(mode);
        Self { config, tls: MakeRustls::unverified() }
    }
}

impl From<&Database> for Database {
    fn from(database: &Database) -> Self {
        database.clone()
    }
}

/// The TLS parameters of a URL, taken out before the rest goes to tokio-postgres (which knows
/// no `verify-*` mode and no `sslrootcert`).
#[derive(Debug, Default, Clone)]
pub(crate) struct TlsParameters {
    pub mode: Option<String>,
    pub root: Option<String>,
}

impl TlsParameters {
    /// Takes `sslmode` and `sslrootcert` from a URL's `pairs`; true if the pair was one.
    pub(crate) fn take(&mut self, name: &str, value: &str) -> bool {
        match name {
            "sslmode" => self.mode = Some(store_kit::percent_decode(value)),
            "sslrootcert" => self.root = Some(store_kit::percent_decode(value)),
            _ => return false,
        }
        true
    }
}

/// A URL without its TLS parameters, and those parameters. A `key=value` string goes through
/// whole (tokio-postgres reads its `sslmode`).
fn split_url(url: &str) -> Result<(String, TlsParameters)> {
    let mut parameters = TlsParameters::default();
    if !url.contains("://") {
        let (config, mode) = match tokio_postgres::Config::from_str(url) {
            Ok(config) => (url.to_owned(), config.get_ssl_mode()),
            Err(error) => return Err(Error::Config(format!("invalid postgres:// URL: {error}"))),
        };
        if mode == SslMode::Require {
            parameters.mode = Some("require".into());
        }
        return Ok((config, parameters));
    }
    let (base, pairs) = store_kit::url_parameters(url);
    let passed_on: Vec<(&str, &str)> =
        pairs.into_iter().filter(|(name, value)| !parameters.take(name, value)).collect();
    Ok((store_kit::rejoin_url(base, &passed_on), parameters))
}

/// The ring provider, whatever else the process enabled.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// CA certificates from a PEM file, or the system's (`None` or `"system"`).
fn roots(path: Option<&str>) -> Result<RootCertStore> {
    let mut store = RootCertStore::empty();
    match path {
        None | Some("system") => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found.errors.first().map(|e| format!(": {e}")).unwrap_or_default();
                return Err(Error::Config(format!(
                    "no system CA certificates found{why}; give sslrootcert=PATH (in the postgres:// URL)"
                )));
            }
        }
        Some(path) => {
            let pem = read_bounded(path).map_err(|error| {
                Error::Config(format!("cannot read sslrootcert={path}: {error}"))
            })?;
            for certificate in CertificateDer::pem_slice_iter(&pem) {
                let certificate = certificate.map_err(|error| {
                    Error::Config(format!("sslrootcert={path} is not PEM certificates: {error}"))
                })?;
                store.add(certificate).map_err(|error| {
                    Error::Config(format!("sslrootcert={path}: a certificate is unusable: {error}"))
                })?;
            }
            if store.is_empty() {
                return Err(Error::Config(format!(
                    "sslrootcert={path} holds no certificate (expected PEM: -----BEGIN CERTIFICATE-----)"
                )));
            }
        }
    }
    Ok(store)
}

/// A file's bytes, refused past [`MAX_ROOT_FILE_BYTES`].
pub(crate) fn read_bounded(path: &str) -> io::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?.take(MAX_ROOT_FILE_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_ROOT_FILE_BYTES {
        return Err(io::Error::other(format!("larger than {MAX_ROOT_FILE_BYTES} bytes")));
    }
    Ok(bytes)
}

/// A [`MakeTlsConnect`] over rustls: what tokio-postgres (and deadpool-postgres) call with the
/// host name of each connection.
#[derive(Clone)]
pub struct MakeRustls {
    config: Arc<rustls::ClientConfig>,
    verify: Verify,
    /// Where the trusted CAs come from, for error messages.
    roots: Arc<str>,
}

impl std::fmt::Debug for MakeRustls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MakeRustls")
            .field("verify", &self.verify)
            .field("roots", &self.roots)
            .finish()
    }
}

impl MakeRustls {
    fn new(verify: Verify, root: Option<&str>) -> Result<Self> {
        if verify == Verify::Nothing {
            return Ok(Self::unverified());
        }
        let provider = provider();
        let webpki =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots(root)?), provider.clone())
                .build()
                .map_err(|error| Error::Config(format!("cannot verify certificates: {error}")))?;
        let verifier: Arc<dyn ServerCertVerifier> = match verify {
            Verify::ChainAndName => webpki,
            _ => Arc::new(ChainOnly(webpki)),
        };
        let config = client_config(provider, verifier);
        let roots = match root {
            None | Some("system") => "the system's CA certificates".to_owned(),
            Some(path) => format!("sslrootcert={path}"),
        };
        Ok(Self { config, verify, roots: roots.into() })
    }

    fn unverified() -> Self {
        let provider = provider();
        let verifier = Arc::new(Unverified(provider.clone()));
        Self {
            config: client_config(provider, verifier),
            verify: Verify::Nothing,
            roots: "nothing (no verification)".into(),
        }
    }

    /// What this connector checks.
    pub fn verify(&self) -> Verify {
        self.verify
    }
}

fn client_config(
    provider: Arc<CryptoProvider>,
    verifier: Arc<dyn ServerCertVerifier>,
) -> Arc<rustls::ClientConfig> {
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Arc::new(config)
}

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> io::Result<RustlsConnect> {
        // Called for every connection, even one that will not use TLS (sslmode=disable, a
        // Unix socket with no host name): the name is checked only when a handshake starts.
        Ok(RustlsConnect { tls: self.clone(), domain: domain.to_owned() })
    }
}

/// One connection's TLS handshake.
#[derive(Debug)]
pub struct RustlsConnect {
    tls: MakeRustls,
    domain: String,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let name = ServerName::try_from(self.domain.clone()).map_err(|_| {
                io::Error::other(format!("{:?} is not a host name TLS can check", self.domain))
            })?;
            let connector = tokio_rustls::TlsConnector::from(Arc::clone(&self.tls.config));
            match connector.connect(name, stream).await {
                Ok(stream) => Ok(RustlsStream(Box::new(stream))),
                Err(error) => Err(explain(error, &self.tls, &self.domain)),
            }
        })
    }
}

/// A handshake failure, said in words a person can act on.
fn explain(error: io::Error, tls: &MakeRustls, domain: &str) -> io::Error {
    let Some(rustls_error) =
        error.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return io::Error::other(format!("the TLS handshake failed: {error}"));
    };
    let message = match rustls_error {
        rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => format!(
            "the server's certificate is not signed by a trusted CA (trusted: {}): {rustls_error}",
            tls.roots
        ),
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => format!(
            "the server's certificate is not valid for the host name {domain:?} (sslmode=verify-full checks it; verify-ca does not): {rustls_error}"
        ),
        rustls::Error::InvalidCertificate(_) => {
            format!("the server's certificate was refused: {rustls_error}")
        }
        other => format!("the TLS handshake failed: {other}"),
    };
    io::Error::new(error.kind(), message)
}

/// A TLS session to the server.
pub struct RustlsStream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S> std::fmt::Debug for RustlsStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RustlsStream")
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        // tls-server-end-point hashes the certificate with its own signature's hash; without
        // reading that out of the certificate, offering none is the safe answer.
        ChannelBinding::none()
    }
}

/// `verify-ca`: the chain must lead to a trusted CA; the name in it is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        // webpki checks the chain (and its validity dates) before the name: a name error
        // means the chain passed.
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer`, and `require` without `sslrootcert`: any certificate is accepted (libpq's
/// meaning); the handshake's signatures are still checked, so the session is the server's.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_are_taken_out_of_the_url() {
        let (rest, parameters) = split_url(
            "postgres://u:p@h/db?sslmode=verify-full&application_name=x&sslrootcert=/a%20b/ca.pem",
        )
        .unwrap();
        assert_eq!(rest, "postgres://u:p@h/db?application_name=x");
        assert_eq!(parameters.mode.as_deref(), Some("verify-full"));
        assert_eq!(parameters.root.as_deref(), Some("/a b/ca.pem"));

        let plain = Database::from_url("postgres://u@h/db").unwrap();
        assert_eq!(plain.config().get_ssl_mode(), SslMode::Disable);
        let require = Database::from_url("postgres://u@h/db?sslmode=require").unwrap();
        assert_eq!(require.config().get_ssl_mode(), SslMode::Require);
        assert_eq!(require.tls().verify(), Verify::Nothing);
        let keyword = Database::from_url("host=h user=u sslmode=require").unwrap();
        assert_eq!(keyword.tls().verify(), Verify::Nothing);
        assert_eq!(keyword.config().get_ssl_mode(), SslMode::Require);

        for (url, expected) in [
            ("postgres://h/db?sslmode=sometimes", "sslmode must be"),
            ("postgres://h/db?sslmode=allow", "sslmode=allow is not supported"),
            (
                "postgres://h/db?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem",
                "cannot read sslrootcert=/nonexistent/ca.pem",
            ),
            ("postgres://h/db?sslmode=require&sslrootcert=/dev/null", "holds no certificate"),
        ] {
            let error = Database::from_url(url).unwrap_err().to_string();
            assert!(error.contains(expected), "{url}: {error}");
        }
    }
}
