//! The two calls the scaler makes to the Kubernetes API — read a scale, merge-patch
//! it — over the hyper and rustls that the mesh already uses, with a bounded time for
//! each request.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use super::config::{ClusterConfig, Credentials};

/// How long one request may take, connection included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// An API server client.
pub(crate) struct ApiClient {
    server: String,
    credentials: Credentials,
    client: Client<etlmesh_tls::MeshConnector, Full<Bytes>>,
}

impl ApiClient {
    pub fn new(config: &ClusterConfig) -> Result<Self, String> {
        let tls = tls_config(config)?;
        let connector = etlmesh_tls::connector_with_config(tls, Duration::from_secs(5));
        Ok(Self {
            server: config.server.clone(),
            credentials: config.credentials.clone(),
            client: Client::builder(TokioExecutor::new()).build(connector),
        })
    }

    /// `GET path`; the answer's JSON, or what the API server said.
    pub async fn get(&self, path: &str) -> Result<serde_json::Value, String> {
        self.call(http::Method::GET, path, None).await
    }

    /// `PATCH path` with a JSON merge patch; the answer's JSON, or what the API server
    /// said (its `Status` message) with the HTTP status.
    pub async fn merge_patch(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        self.call(http::Method::PATCH, path, Some(body)).await
    }

    async fn call(
        &self,
        method: http::Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, String> {
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.server))
            .header(http::header::ACCEPT, "application/json");
        if body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/merge-patch+json");
        }
        match &self.credentials {
            Credentials::Token(t) => {
                req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"))
            }
            Credentials::TokenFile(f) => {
                let t = std::fs::read_to_string(f)
                    .map_err(|e| format!("the token file {}: {e}", f.display()))?;
                req = req.header(http::header::AUTHORIZATION, format!("Bearer {}", t.trim()));
            }
            Credentials::None | Credentials::ClientCertificate { .. } => {}
        }
        let req = req
            .body(Full::new(
                body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string())),
            ))
            .map_err(|e| e.to_string())?;
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| format!("the API server {} does not answer: {e}", self.server))?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>((status, bytes))
        })
        .await
        .map_err(|_| {
            format!(
                "the API server {} took over {REQUEST_TIMEOUT:?}",
                self.server
            )
        })??;
        let (status, bytes) = answer;
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        if status.is_success() {
            return Ok(json);
        }
        let said = json["message"].as_str().map_or_else(
            || String::from_utf8_lossy(&bytes).into_owned(),
            str::to_string,
        );
        Err(format!("{status}: {said}"))
    }
}

fn tls_config(config: &ClusterConfig) -> Result<ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = if config.insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoCheck(provider)))
    } else {
        let mut roots = RootCertStore::empty();
        match &config.ca {
            Some(pem) => {
                for c in CertificateDer::pem_slice_iter(pem) {
                    let c = c.map_err(|e| format!("the cluster's CA certificate: {e}"))?;
                    roots
                        .add(c)
                        .map_err(|e| format!("the cluster's CA certificate: {e}"))?;
                }
            }
            None => {
                for c in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(c);
                }
            }
        }
        builder.with_root_certificates(roots)
    };
    match &config.credentials {
        Credentials::ClientCertificate { cert, key } => {
            let certs = CertificateDer::pem_slice_iter(cert)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("the client certificate: {e}"))?;
            let key =
                PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("the client key: {e}"))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| format!("the client certificate and key: {e}"))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

/// `insecure-skip-tls-verify`: any server certificate is taken (signatures still
/// checked), as kubectl does when the kubeconfig says so.
#[derive(Debug)]
struct NoCheck(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoCheck {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
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
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
