//! The client side: HTTP(S) connectors for mesh hops, joining the mesh with a join
//! token, and renewing the certificate before it expires.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, header};
use http_body_util::{BodyExt, Full};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rcgen::{CertificateParams, KeyPair};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::{ClientConfig, RootCertStore};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::authority::{Issued, Role};
use crate::identity::Identity;
use crate::token::{JoinToken, sha256};
use crate::verify::MeshServerVerifier;
use crate::{TlsError, installed, provider};

/// A connector for `http://` and `https://` URLs; HTTPS is mTLS with this process's
/// identity. Its errors are `std::io::Error`s: a boxed error type here trips
/// "`From` is not general enough" in callers' `Send` futures.
#[derive(Clone, Debug)]
pub struct MeshConnector(HttpsConnector<HttpConnector>);

impl tower::Service<http::Uri> for MeshConnector {
    type Response = hyper_rustls::MaybeHttpsStream<hyper_util::rt::TokioIo<tokio::net::TcpStream>>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, std::io::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), std::io::Error>> {
        self.0.poll_ready(cx).map_err(std::io::Error::other)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connecting = self.0.call(uri);
        Box::pin(async move { connecting.await.map_err(std::io::Error::other) })
    }
}

/// Asks for a certificate with the join token (`POST /v1/mesh/join`).
#[derive(Debug, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The token's secret, hex.
    pub token: String,
    /// The certificate asked for.
    #[serde(flatten)]
    pub certificate: CertificateRequest,
}

/// A certificate asked for: the body of `POST /v1/mesh/renew` (over mTLS, with the
/// current certificate), and of a join with its token.
#[derive(Debug, Serialize, Deserialize)]
pub struct CertificateRequest {
    /// The requester's name (a worker's id).
    pub name: String,
    /// What it is.
    pub role: Role,
    /// Host names or addresses to add for tools outside the mesh.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// A PKCS#10 signing request (PEM) for the key the requester keeps.
    pub csr: String,
}

/// A certificate issued.
#[derive(Debug, Serialize, Deserialize)]
pub struct JoinResponse {
    /// The certificate and the anchor, PEM.
    pub certificate: String,
    /// The trust anchor, PEM.
    pub anchor: String,
    /// Expiry, seconds since the epoch.
    pub not_after: u64,
}

fn base_connector(timeout: Duration) -> HttpConnector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(timeout));
    http
}

/// TLS settings of a process outside any mesh: HTTPS reaches nothing it can verify.
fn outside_config() -> Result<ClientConfig, TlsError> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Certificate(e.to_string()))?
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth())
}

/// A connector for mesh hops: `https://` with this process's identity (see
/// [`crate::install`]), `http://` in plain text. `h2_only` offers HTTP/2 alone.
pub fn connector(connect_timeout: Duration, h2_only: bool) -> MeshConnector {
    let config = match installed() {
        Some(id) => (*id.client_config()).clone(),
        None => match outside_config() {
            Ok(c) => c,
            Err(e) => unreachable!("ring supports the default TLS versions: {e}"),
        },
    };
    with_config(config, connect_timeout, h2_only)
}

/// A connector for a server outside the mesh, such as a gateway's public listener
/// with `platform.access.tls`: `https://` verified against the certificates in the
/// PEM file `ca` (no client certificate), `http://` in plain text.
pub fn connector_trusting(ca: &Path, connect_timeout: Duration) -> Result<MeshConnector, TlsError> {
    let trust_error = |message: String| TlsError::Trust {
        path: ca.display().to_string(),
        message,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|e| trust_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(trust_error("holds no certificate".into()));
    }
    let mut roots = RootCertStore::empty();
    for c in certs {
        roots.add(c).map_err(|e| trust_error(e.to_string()))?;
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Certificate(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(with_config(config, connect_timeout, false))
}

/// A connector with the given TLS settings (a server outside the mesh with its own
/// CA, such as the Kubernetes API): `https://` with `config`, `http://` in plain text.
pub fn connector_with_config(config: ClientConfig, connect_timeout: Duration) -> MeshConnector {
    with_config(config, connect_timeout, false)
}

fn with_config(config: ClientConfig, connect_timeout: Duration, h2_only: bool) -> MeshConnector {
    let b = HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_or_http();
    MeshConnector(if h2_only {
        b.enable_http2()
            .wrap_connector(base_connector(connect_timeout))
    } else {
        b.enable_http1()
            .enable_http2()
            .wrap_connector(base_connector(connect_timeout))
    })
}

pub(crate) fn key_and_request() -> Result<(KeyPair, String), TlsError> {
    let key = KeyPair::generate().map_err(|e| TlsError::Certificate(format!("a key: {e}")))?;
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .map_err(|e| TlsError::Certificate(format!("a signing request: {e}")))?;
    Ok((key, csr))
}

enum Failure {
    Transport(String),
    Refused(String),
}

async fn post<T: Serialize, R: DeserializeOwned>(
    connector: MeshConnector,
    url: &str,
    body: &T,
) -> Result<R, Failure> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let body = serde_json::to_vec(body).map_err(|e| Failure::Refused(e.to_string()))?;
    let req = Request::builder()
        .method(Method::POST)
        .uri(url)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| Failure::Refused(format!("{url}: {e}")))?;
    let exchange = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| Failure::Transport(format!("{url}: {}", crate::error_chain(&e))))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| Failure::Transport(format!("{url}: {e}")))?
            .to_bytes();
        if !status.is_success() {
            return Err(Failure::Refused(format!(
                "{url}: {status}: {}",
                String::from_utf8_lossy(&bytes)
            )));
        }
        serde_json::from_slice(&bytes).map_err(|e| Failure::Refused(format!("{url}: {e}")))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .unwrap_or_else(|_| Err(Failure::Transport(format!("{url}: no answer within 10 s"))))
}

fn https_base(control_plane: &str) -> Result<String, TlsError> {
    let base = control_plane.trim_end_matches('/');
    if !base.starts_with("https://") {
        return Err(TlsError::Token(format!(
            "the control plane `{base}` is not an https:// URL; mesh members join over TLS (its mesh address, printed at its start)"
        )));
    }
    Ok(base.to_string())
}

/// Joins the mesh of the control plane at `control_plane` (its `https://` mesh
/// address): shows the token's secret to a server whose chain holds the token's
/// anchor, and gets a certificate for a key made here. Retries an unreachable control
/// plane for `patience`; a refusal is final.
pub async fn join(
    control_plane: &str,
    token: &JoinToken,
    name: &str,
    role: Role,
    hosts: &[String],
    patience: Duration,
) -> Result<Arc<Identity>, TlsError> {
    let url = format!("{}/v1/mesh/join", https_base(control_plane)?);
    let (key, csr) = key_and_request()?;
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Certificate(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(MeshServerVerifier::Pinned(token.anchor())))
        .with_no_client_auth();
    let request = JoinRequest {
        token: token.secret_hex(),
        certificate: CertificateRequest {
            name: name.to_string(),
            role,
            hosts: hosts.to_vec(),
            csr,
        },
    };
    let until = tokio::time::Instant::now() + patience;
    let mut backoff = Duration::from_millis(100);
    let resp: JoinResponse = loop {
        match post(
            with_config(config.clone(), Duration::from_secs(2), false),
            &url,
            &request,
        )
        .await
        {
            Ok(r) => break r,
            Err(Failure::Refused(e)) => return Err(TlsError::Refused(e)),
            Err(Failure::Transport(e)) if tokio::time::Instant::now() + backoff > until => {
                return Err(TlsError::Unreachable(e));
            }
            Err(Failure::Transport(e)) => {
                tracing::debug!(error = %e, "cannot join yet; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    };
    let anchor = CertificateDer::from_pem_slice(resp.anchor.as_bytes())
        .map_err(|e| TlsError::Certificate(format!("the anchor sent: {e}")))?;
    if sha256(anchor.as_ref()) != token.anchor() {
        return Err(TlsError::Refused(
            "the control plane sent an anchor other than the join token's".into(),
        ));
    }
    let issued = Issued {
        chain_pem: resp.certificate,
        not_after: resp.not_after,
        serial: String::new(),
    };
    let identity = Identity::new(name, role, hosts, &key, &issued, anchor)?;
    tracing::info!(
        name,
        role = role.as_str(),
        until = issued.not_after,
        "joined the mesh: certificate issued"
    );
    Ok(identity)
}

async fn renew_once(identity: &Arc<Identity>, base: &str) -> Result<u64, TlsError> {
    let (key, csr) = key_and_request()?;
    let request = CertificateRequest {
        name: identity.name().to_string(),
        role: identity.role(),
        hosts: identity.hosts().to_vec(),
        csr,
    };
    let connector = with_config(
        (*identity.client_config()).clone(),
        Duration::from_secs(2),
        false,
    );
    let resp: JoinResponse = post(connector, &format!("{base}/v1/mesh/renew"), &request)
        .await
        .map_err(|e| match e {
            Failure::Refused(e) => TlsError::Refused(e),
            Failure::Transport(e) => TlsError::Unreachable(e),
        })?;
    identity.replace(
        &key,
        &Issued {
            chain_pem: resp.certificate,
            not_after: resp.not_after,
            serial: String::new(),
        },
    )?;
    Ok(resp.not_after)
}

/// Renews `identity` with the control plane at `control_plane` at 70 % of each
/// certificate's life, retrying failures until the certificate expires (and after,
/// loudly). Runs until aborted.
pub async fn renew_forever(identity: Arc<Identity>, control_plane: String) {
    let base = match https_base(&control_plane) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "mesh certificate renewal cannot start");
            return;
        }
    };
    loop {
        tokio::time::sleep(identity.until_renewal()).await;
        match renew_once(&identity, &base).await {
            Ok(until) => {
                tracing::info!(name = identity.name(), until, "mesh certificate renewed")
            }
            Err(e) => {
                let left = identity
                    .not_after()
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                if left.is_zero() {
                    tracing::error!(name = identity.name(), error = %e, "the mesh certificate has expired and cannot be renewed: new connections will be refused");
                } else {
                    tracing::warn!(name = identity.name(), error = %e, "mesh certificate renewal failed; {left:?} left, retrying");
                }
                tokio::time::sleep(
                    (left / 10).clamp(Duration::from_secs(1), Duration::from_secs(10)),
                )
                .await;
            }
        }
    }
}
