//! TLS with rustls: the client-facing acceptor (with its `tls-server-end-point` hash for SCRAM
//! channel binding) and the server-facing connector for `server_tls_sslmode`. Both are built
//! when the config is loaded, so a reload naming an unreadable key is rejected like any bad value.

use sha2::{Digest, Sha256, Sha384, Sha512};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thiserror::Error;
use tokio_rustls::rustls::client::WebPkiServerVerifier;
use tokio_rustls::rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use tokio_rustls::rustls::crypto::{CryptoProvider, ring};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_rustls::rustls::{self, CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// `client_tls_sslmode`: what the broker accepts from clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientMode {
    /// SSLRequest is answered `N`.
    Disable,
    /// TLS when the client asks for it.
    Allow,
    /// Same as `Allow` on the accepting side (PgBouncer's spelling).
    Prefer,
    /// Plaintext clients are refused after their startup packet.
    Require,
}

/// `server_tls_sslmode`: how the broker connects to PostgreSQL (libpq's meanings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerMode {
    /// Never ask for TLS.
    Disable,
    /// Ask; fall back to plaintext if the server says no. The certificate is not checked.
    Prefer,
    /// TLS or fail. The certificate is not checked.
    Require,
    /// TLS, and the certificate chains to `server_tls_ca_file`.
    VerifyCa,
    /// As `VerifyCa`, and the certificate names the host connected to.
    VerifyFull,
}

impl ClientMode {
    /// Parses the config spelling.
    pub fn parse(s: &str) -> Option<ClientMode> {
        Some(match s {
            "disable" => ClientMode::Disable,
            "allow" => ClientMode::Allow,
            "prefer" => ClientMode::Prefer,
            "require" => ClientMode::Require,
            _ => return None,
        })
    }

    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientMode::Disable => "disable",
            ClientMode::Allow => "allow",
            ClientMode::Prefer => "prefer",
            ClientMode::Require => "require",
        }
    }
}

impl ServerMode {
    /// Parses the config spelling.
    pub fn parse(s: &str) -> Option<ServerMode> {
        Some(match s {
            "disable" => ServerMode::Disable,
            "prefer" => ServerMode::Prefer,
            "require" => ServerMode::Require,
            "verify-ca" => ServerMode::VerifyCa,
            "verify-full" => ServerMode::VerifyFull,
            _ => return None,
        })
    }

    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ServerMode::Disable => "disable",
            ServerMode::Prefer => "prefer",
            ServerMode::Require => "require",
            ServerMode::VerifyCa => "verify-ca",
            ServerMode::VerifyFull => "verify-full",
        }
    }

    /// True if a server answering `N` to SSLRequest must be refused.
    pub fn required(self) -> bool {
        !matches!(self, ServerMode::Disable | ServerMode::Prefer)
    }
}

/// Why TLS material could not be loaded.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A PEM file is missing, unreadable or malformed.
    #[error("cannot read {}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// A PEM file has no certificate.
    #[error("{}: no certificate found", .0.display())]
    NoCertificate(PathBuf),
    /// rustls refused the certificate, key or CA.
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
}

/// The client-facing side: the mode, and the acceptor when TLS is on.
#[derive(Clone)]
pub struct ClientTls {
    /// `client_tls_sslmode`.
    pub mode: ClientMode,
    /// `None` when the mode is `disable`.
    pub acceptor: Option<Acceptor>,
}

/// A loaded certificate and key, ready to accept handshakes.
#[derive(Clone)]
pub struct Acceptor {
    /// The rustls acceptor.
    pub acceptor: TlsAcceptor,
    /// `tls-server-end-point` binding data (RFC 5929), or `None` when the certificate's
    /// signature hash cannot be determined (then SCRAM-SHA-256-PLUS is not offered, as
    /// PostgreSQL does).
    pub end_point: Option<Arc<[u8]>>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls").field("mode", &self.mode).field("loaded", &self.acceptor.is_some()).finish()
    }
}

impl ClientTls {
    /// TLS off.
    pub fn disabled() -> ClientTls {
        ClientTls { mode: ClientMode::Disable, acceptor: None }
    }

    /// Loads the certificate chain and key for `mode` (anything but `disable`).
    pub fn load(mode: ClientMode, cert_file: &Path, key_file: &Path) -> Result<ClientTls, TlsError> {
        let certs = read_certs(cert_file)?;
        let key = PrivateKeyDer::from_pem_file(key_file)
            .map_err(|source| TlsError::Pem { path: key_file.to_owned(), source })?;
        let end_point = certs.first().and_then(|c| end_point_hash(c)).map(Arc::from);
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(ClientTls { mode, acceptor: Some(Acceptor { acceptor: TlsAcceptor::from(Arc::new(config)), end_point }) })
    }
}

/// The server-facing side: the mode and, unless disabled, the connector.
#[derive(Clone)]
pub struct ServerTls {
    /// `server_tls_sslmode`.
    pub mode: ServerMode,
    /// `server_tls_ca_file`, if set.
    pub ca_file: Option<PathBuf>,
    connector: Option<TlsConnector>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").field("mode", &self.mode).field("ca_file", &self.ca_file).finish()
    }
}

/// Two settings are the same if they would connect the same way (the connector is rebuilt on
/// every load, so it is not compared).
impl PartialEq for ServerTls {
    fn eq(&self, other: &ServerTls) -> bool {
        self.mode == other.mode && self.ca_file == other.ca_file
    }
}

impl Eq for ServerTls {}

impl ServerTls {
    /// TLS to servers off.
    pub fn disabled() -> ServerTls {
        ServerTls { mode: ServerMode::Disable, ca_file: None, connector: None }
    }

    /// Builds the connector. `verify-ca` and `verify-full` need `ca_file`; `prefer` and
    /// `require` check nothing, unless a CA is given: then they check the chain as `verify-ca`
    /// does (libpq's rule for a present root certificate).
    pub fn load(mode: ServerMode, ca_file: Option<&Path>) -> Result<ServerTls, TlsError> {
        if mode == ServerMode::Disable {
            return Ok(ServerTls::disabled());
        }
        let builder = ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
        let config = match ca_file {
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for cert in read_certs(path)? {
                    roots.add(cert)?;
                }
                let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
                    .build()
                    .map_err(|e| rustls::Error::General(e.to_string()))?;
                let verifier = Verifier { mode, webpki: Some(webpki) };
                builder.dangerous().with_custom_certificate_verifier(Arc::new(verifier)).with_no_client_auth()
            }
            None => {
                let verifier = Verifier { mode, webpki: None };
                builder.dangerous().with_custom_certificate_verifier(Arc::new(verifier)).with_no_client_auth()
            }
        };
        Ok(ServerTls {
            mode,
            ca_file: ca_file.map(Path::to_owned),
            connector: Some(TlsConnector::from(Arc::new(config))),
        })
    }

    /// The connector, unless TLS is disabled.
    pub fn connector(&self) -> Option<&TlsConnector> {
        self.connector.as_ref()
    }
}

/// The name the server certificate is checked against (an IP address or a DNS name).
pub fn server_name(host: &str) -> Option<ServerName<'static>> {
    ServerName::try_from(host.to_string()).ok()
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|source| TlsError::Pem { path: path.to_owned(), source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_owned()));
    }
    Ok(certs)
}

/// Checks server certificates as libpq's sslmode does: without a CA, `require`/`prefer` accept
/// any certificate (but still check handshake signatures); with one, everything but
/// `verify-full` checks the chain only; `verify-full` checks the chain and the host name.
#[derive(Debug)]
struct Verifier {
    mode: ServerMode,
    webpki: Option<Arc<WebPkiServerVerifier>>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(webpki) = &self.webpki else {
            if matches!(self.mode, ServerMode::VerifyCa | ServerMode::VerifyFull) {
                return Err(rustls::Error::General("server_tls_ca_file is required to verify".into()));
            }
            return Ok(ServerCertVerified::assertion());
        };
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Ok(v) => Ok(v),
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if self.mode != ServerMode::VerifyFull => Ok(ServerCertVerified::assertion()),
            Err(e) => Err(e),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = ring::default_provider().signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = ring::default_provider().signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algs)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        ring::default_provider().signature_verification_algorithms.supported_schemes()
    }
}

/// RFC 5929 `tls-server-end-point`: the certificate hashed with its signature's hash, SHA-256
/// for MD5 and SHA-1. `None` for signatures without a hash (Ed25519) or an unparsable
/// certificate; PostgreSQL and libpq refuse channel binding then too.
pub fn end_point_hash(cert: &[u8]) -> Option<Vec<u8>> {
    const SHA256: &[&[u8]] = &[
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x04], // md5WithRSAEncryption
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x05], // sha1WithRSAEncryption
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b], // sha256WithRSAEncryption
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01],             // ecdsa-with-SHA1
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02],       // ecdsa-with-SHA256
    ];
    const SHA384: &[&[u8]] = &[
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c], // sha384WithRSAEncryption
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03],       // ecdsa-with-SHA384
    ];
    const SHA512: &[&[u8]] = &[
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d], // sha512WithRSAEncryption
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04],       // ecdsa-with-SHA512
    ];
    let oid = signature_oid(cert)?;
    if SHA256.contains(&oid) {
        Some(Sha256::digest(cert).to_vec())
    } else if SHA384.contains(&oid) {
        Some(Sha384::digest(cert).to_vec())
    } else if SHA512.contains(&oid) {
        Some(Sha512::digest(cert).to_vec())
    } else {
        None
    }
}

/// The OID of `Certificate.signatureAlgorithm` (X.509: SEQUENCE { tbs, algorithm, signature }).
fn signature_oid(cert: &[u8]) -> Option<&[u8]> {
    const SEQUENCE: u8 = 0x30;
    const OID: u8 = 0x06;
    let (body, _) = der(cert, SEQUENCE)?;
    let (_tbs, rest) = der(body, SEQUENCE)?;
    let (algorithm, _) = der(rest, SEQUENCE)?;
    let (oid, _) = der(algorithm, OID)?;
    Some(oid)
}

/// One DER element of the expected tag: (contents, what follows).
fn der(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&t, rest) = input.split_first()?;
    if t != tag {
        return None;
    }
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let (bytes, after) = rest.split_at_checked(n)?;
        rest = after;
        bytes.iter().fold(0usize, |acc, &b| (acc << 8) | usize::from(b))
    };
    rest.split_at_checked(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_modes_parse_and_print() {
        for s in ["disable", "allow", "prefer", "require"] {
            assert_eq!(ClientMode::parse(s).map(ClientMode::as_str), Some(s));
        }
        assert_eq!(ClientMode::parse("verify-full"), None);
    }

    #[test]
    fn server_modes_parse_and_print() {
        for s in ["disable", "prefer", "require", "verify-ca", "verify-full"] {
            assert_eq!(ServerMode::parse(s).map(ServerMode::as_str), Some(s));
        }
        assert_eq!(ServerMode::parse("allow"), None);
    }

    #[test]
    fn end_point_of_ecdsa_sha256_certificate_is_its_sha256() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap().self_signed(&key).unwrap();
        let der = cert.der().to_vec();
        assert_eq!(end_point_hash(&der), Some(Sha256::digest(&der).to_vec()));
    }

    #[test]
    fn end_point_of_ecdsa_sha384_certificate_is_its_sha384() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap().self_signed(&key).unwrap();
        let der = cert.der().to_vec();
        assert_eq!(end_point_hash(&der), Some(Sha384::digest(&der).to_vec()));
    }

    #[test]
    fn end_point_of_ed25519_certificate_is_unknown() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap().self_signed(&key).unwrap();
        assert_eq!(end_point_hash(cert.der()), None);
    }

    #[test]
    fn end_point_of_garbage_is_none() {
        for junk in [&[][..], &[0x30], &[0x30, 0x84, 0xff, 0xff, 0xff, 0xff], &[0x30, 0x02, 0x30, 0x05]] {
            assert_eq!(end_point_hash(junk), None);
        }
    }
}
