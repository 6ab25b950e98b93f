//! Optional TLS termination from PEM files, so an air-gapped lab needs no reverse proxy.
//! rustls with the ring provider (no aws-lc: it needs cmake and a cross C toolchain).

use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why the TLS configuration could not be built; each message names the file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}; check --tls-cert/--tls-key and file permissions")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate; pass the certificate chain (leaf first)")]
    NoCertificate { path: String },
    #[error(
        "{path} holds no PEM private key (PKCS#8, PKCS#1 or SEC1); pass the key matching the certificate"
    )]
    NoKey { path: String },
    #[error("the certificate and key were rejected: {0}")]
    Rejected(rustls::Error),
}

/// Loads the chain and key and builds a server config (TLS 1.2 + 1.3, ALPN `http/1.1`).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = read_certs(cert)?;
    let key = read_key(key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Rejected)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TlsError::Rejected)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Reads every certificate in a PEM file.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file = open(path)?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Read {
            path: path.display().to_string(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.display().to_string(),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let file = open(path)?;
    rustls_pemfile::private_key(&mut BufReader::new(file))
        .map_err(|source| TlsError::Read {
            path: path.display().to_string(),
            source,
        })?
        .ok_or_else(|| TlsError::NoKey {
            path: path.display().to_string(),
        })
}

fn open(path: &Path) -> Result<std::fs::File, TlsError> {
    std::fs::File::open(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}
