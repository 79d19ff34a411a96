//! Loading the relay's TLS certificate and key from PEM files (for `wss://`).

use std::path::Path;
use std::sync::Arc;

/// A rustls server configuration (ring, TLS 1.2 and 1.3) from PEM files: a certificate chain
/// and its private key (PKCS#8, PKCS#1 or SEC1).
pub fn tls_config_from_pem(
    cert_path: &Path,
    key_path: &Path,
) -> Result<Arc<rustls::ServerConfig>, crate::RelayError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |name: &'static str, path: &Path, reason: String| crate::RelayError::InvalidSetting {
        name,
        value: path.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| bad("tls_cert", cert_path, e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad("tls_cert", cert_path, e.to_string()))?;
    if certs.is_empty() {
        return Err(bad(
            "tls_cert",
            cert_path,
            "no certificate in the file".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|e| bad("tls_key", key_path, e.to_string()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| bad("tls_cert", cert_path, e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| bad("tls_key", key_path, e.to_string()))?;
    Ok(Arc::new(config))
}
