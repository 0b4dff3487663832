//! TLS on the public listener (`platform.access.tls`): rustls with ring, HTTP/2 and
//! HTTP/1.1 by ALPN, served through [`etlmesh_tls::listener::TlsListener`].

use std::sync::Arc;

use etlmesh_config::TlsSpec;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The server's TLS settings from PEM files; the error says which file and why.
pub fn server_config(spec: &TlsSpec) -> Result<Arc<ServerConfig>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&spec.cert)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|e| format!("platform.access.tls.cert `{}`: {e}", spec.cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "platform.access.tls.cert `{}` holds no certificate",
            spec.cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&spec.key)
        .map_err(|e| format!("platform.access.tls.key `{}`: {e}", spec.key.display()))?;
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| {
                format!("platform.access.tls: the key does not fit the certificate: {e}")
            })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
