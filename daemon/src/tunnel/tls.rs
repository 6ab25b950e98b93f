//! TLS for `wss://`: which server certificates the daemon accepts.
//!
//! rustls with the ring provider (no aws-lc: it needs cmake and a cross C toolchain). The
//! client config is built once at startup and shared by every dial; nothing here reads files
//! after that.
//!
//! Trust, in order of precedence:
//!
//! 1. **`server.pin_sha256`** set: the server is accepted only if the SHA-256 of its leaf
//!    certificate (DER) equals the pin. No CA chain, host name or validity period is checked —
//!    the pin names one exact certificate, so none of those add anything, and a lab with a
//!    self-signed control plane needs no CA at all. The TLS handshake signature is still
//!    verified against that certificate's key, so only the holder of the private key passes
//!    (a copied certificate is useless). Rotating the server certificate means updating the pin
//!    on every daemon first; the pin also outlives the certificate's expiry, deliberately, so an
//!    expired lab certificate does not cut off the fleet.
//! 2. **`server.ca_file`** set: the CAs in that PEM file are trusted *in addition to* the
//!    system roots, so an air-gapped lab's private CA works without replacing the host's trust
//!    store. An operator who wants exactly one server and nothing else pins it (case 1).
//! 3. Otherwise the **system roots**: `$SSL_CERT_FILE` if set, else the first PEM bundle found
//!    at the usual distribution paths (Debian/Ubuntu, Fedora/RHEL, openSUSE, Alpine). Only if
//!    none exists (a minimal container) are the compiled-in Mozilla roots (`webpki-roots`) used,
//!    with a warning: they cannot be updated without a new daemon build.
//!
//! In cases 2 and 3 rustls/webpki verify the chain, the host name (SNI is the URL's host) and
//! the validity period as usual.

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest as _, Sha256};

use crate::config::ServerConfig;

/// PEM bundles of the system trust store, by distribution family.
pub const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt", // Debian, Ubuntu, Arch, Alpine (ca-certificates)
    "/etc/pki/tls/certs/ca-bundle.crt",   // Fedora, RHEL, CentOS
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem", // RHEL 7+
    "/etc/ssl/ca-bundle.pem",             // openSUSE
    "/etc/ssl/cert.pem",                  // Alpine, macOS-style
];

/// Largest PEM bundle read (the Debian bundle is about 220 KB).
const MAX_BUNDLE_BYTES: u64 = 8 << 20;

/// Why a TLS client config could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("cannot read {path}: {source} — check server.ca_file (or $SSL_CERT_FILE)")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} holds no usable CA certificate — it must contain -----BEGIN CERTIFICATE----- blocks"
    )]
    NoCertificates { path: PathBuf },
    #[error("TLS setup failed: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Where the trusted roots came from (logged once at startup).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrustSource {
    /// `server.pin_sha256`: one exact certificate.
    Pin,
    /// `server.ca_file`, added to the system roots.
    CaFile(PathBuf, Box<TrustSource>),
    /// A system bundle (or `$SSL_CERT_FILE`).
    System(PathBuf),
    /// The compiled-in Mozilla roots.
    BuiltIn,
}

impl std::fmt::Display for TrustSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TrustSource::Pin => f.write_str("pinned server certificate (server.pin_sha256)"),
            TrustSource::CaFile(p, system) => {
                write!(f, "CAs in {} (server.ca_file) plus {system}", p.display())
            }
            TrustSource::System(p) => write!(f, "system roots in {}", p.display()),
            TrustSource::BuiltIn => f.write_str("built-in Mozilla roots (no system bundle found)"),
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls client config for `server` (call only for `wss://`).
pub fn client_config(server: &ServerConfig) -> Result<(ClientConfig, TrustSource), TlsSetupError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    if let Some(pin) = server.pin_sha256 {
        let verifier = PinnedCert {
            pin,
            algorithms: provider.signature_verification_algorithms,
        };
        let config = builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        return Ok((config, TrustSource::Pin));
    }
    let (mut roots, mut source) = system_roots()?;
    if let Some(path) = &server.ca_file {
        roots.roots.extend(load_pem_roots(path)?.roots);
        source = TrustSource::CaFile(path.clone(), Box::new(source));
    }
    let config = builder.with_root_certificates(roots).with_no_client_auth();
    Ok((config, source))
}

/// The system roots, or the built-in ones if the host has no bundle.
fn system_roots() -> Result<(RootCertStore, TrustSource), TlsSetupError> {
    if let Some(path) = std::env::var_os("SSL_CERT_FILE").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return Ok((load_pem_roots(&path)?, TrustSource::System(path)));
    }
    for candidate in SYSTEM_BUNDLES {
        let path = Path::new(candidate);
        if path.is_file() {
            if let Ok(roots) = load_pem_roots(path) {
                return Ok((roots, TrustSource::System(path.to_owned())));
            }
        }
    }
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    Ok((roots, TrustSource::BuiltIn))
}

/// Every certificate in a PEM file, as trust anchors.
pub fn load_pem_roots(path: &Path) -> Result<RootCertStore, TlsSetupError> {
    use std::io::Read as _;
    let read_err = |source| TlsSetupError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut reader = BufReader::new(file.take(MAX_BUNDLE_BYTES));
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut reader)
        .collect::<Result<_, _>>()
        .map_err(read_err)?;
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(TlsSetupError::NoCertificates {
            path: path.to_owned(),
        });
    }
    Ok(roots)
}

/// The TLS server name (SNI and name check) for a URL host: a DNS name or an IP literal.
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(host.to_owned())
        .map_err(|_| format!("{host:?} is not a valid TLS server name"))
}

/// SHA-256 of a certificate's DER, as lower-case hex (for messages and pins).
pub fn cert_sha256_hex(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Accepts exactly the certificate whose DER hashes to `pin`; see the module doc.
#[derive(Debug)]
struct PinnedCert {
    pin: [u8; 32],
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        // Not secret: a plain comparison is fine.
        if got == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            tracing::error!(
                got = %cert_sha256_hex(end_entity.as_ref()),
                "the control plane's certificate does not match server.pin_sha256: \
                 if the server certificate was rotated, update the pin; otherwise something \
                 is intercepting the connection"
            );
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(server_name("cp.example.com").is_ok());
        assert!(server_name("127.0.0.1").is_ok());
        assert!(server_name("::1").is_ok());
        assert!(server_name("bad name").is_err());
    }

    #[test]
    fn empty_pem_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        assert!(matches!(
            load_pem_roots(&path),
            Err(TlsSetupError::NoCertificates { .. })
        ));
        assert!(matches!(
            load_pem_roots(&dir.path().join("missing.pem")),
            Err(TlsSetupError::Read { .. })
        ));
    }

    #[test]
    fn hex_digest() {
        assert_eq!(
            cert_sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
