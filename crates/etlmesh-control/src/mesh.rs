//! The control plane's side of mTLS in the mesh.
//!
//! With a mesh ([`MeshOptions`]) it is the certificate authority ([`etlmesh_tls::Authority`])
//! and serves two listeners: the **mesh listener** (TLS; a client certificate is asked
//! for) where workers and gateways join (`POST /v1/mesh/join`, with the join token),
//! renew (`POST /v1/mesh/renew`, with their certificate) and speak the worker protocol
//! — everything there but joining needs a certificate from this mesh; and the **admin
//! listener** (plain HTTP, for people: the admin API, `/ui`, `/metrics`), which then
//! refuses the worker protocol.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Json, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use etlmesh_http::json_response;
use etlmesh_tls::listener::MeshPeer;
use etlmesh_tls::{Authority, CertificateRequest, JoinRequest, JoinResponse};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::api::ControlState;
use crate::refusal::Refusal;

/// How the control plane runs the mesh's mTLS.
#[derive(Debug, Clone)]
pub struct MeshOptions {
    /// Where the mesh listener listens.
    pub listen: SocketAddr,
    /// Where the trust anchor and the join token are kept.
    pub dir: PathBuf,
    /// A trust anchor given in the pipeline file.
    pub ca: Option<etlmesh_tls::AuthorityFiles>,
    /// How long issued certificates live.
    pub certificate_lifetime: Duration,
    /// DNS names certificates may carry end with one of these.
    pub host_suffixes: Vec<String>,
}

impl MeshOptions {
    /// A mesh listening on `listen`, kept in `<state_dir>/mesh`, with the file's settings.
    pub fn new(
        listen: SocketAddr,
        state_dir: &std::path::Path,
        spec: &etlmesh_config::MeshSpec,
    ) -> Self {
        Self {
            listen,
            dir: state_dir.join("mesh"),
            ca: spec.ca.as_ref().map(|t| etlmesh_tls::AuthorityFiles {
                cert: t.cert.clone(),
                key: t.key.clone(),
            }),
            certificate_lifetime: spec.certificate_lifetime,
            host_suffixes: spec.host_suffixes.clone(),
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct IssueLabels {
    kind: &'static str,
    outcome: &'static str,
}

/// The authority and what it counts.
pub(crate) struct Mesh {
    pub authority: Arc<Authority>,
    issued: Family<IssueLabels, Counter>,
}

impl Mesh {
    pub(crate) fn new(
        authority: Arc<Authority>,
        registry: &etlmesh_telemetry::metrics::SharedRegistry,
        refused: Arc<std::sync::atomic::AtomicU64>,
    ) -> Self {
        let issued = Family::<IssueLabels, Counter>::default();
        let mut r = registry.lock();
        r.register(
            "mesh_certificates",
            "Certificate requests to the mesh's authority, by kind (join, renew) and outcome",
            issued.clone(),
        );
        r.register_collector(Box::new(RefusedCollector(refused)));
        Self { authority, issued }
    }

    fn count(&self, kind: &'static str, outcome: &'static str) {
        self.issued
            .get_or_create(&IssueLabels { kind, outcome })
            .inc();
    }
}

/// `etlmesh_mesh_handshakes_refused_total`: TLS handshakes the mesh listener refused.
#[derive(Debug)]
struct RefusedCollector(Arc<std::sync::atomic::AtomicU64>);

impl prometheus_client::collector::Collector for RefusedCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        let c = prometheus_client::metrics::counter::ConstCounter::new(
            self.0.load(std::sync::atomic::Ordering::Relaxed),
        );
        let e = encoder.encode_descriptor(
            "mesh_handshakes_refused",
            "TLS handshakes the control plane's mesh listener refused (no valid certificate, wrong anchor)",
            None,
            c.metric_type(),
        )?;
        c.encode(e)
    }
}

fn mesh_of(st: &ControlState) -> Option<&Mesh> {
    st.mesh.as_deref()
}

fn issue_response(
    mesh: &Mesh,
    kind: &'static str,
    req: &CertificateRequest,
    peer: SocketAddr,
) -> Response {
    let (name, role) = (req.name.as_str(), req.role);
    match mesh.authority.issue(&req.csr, name, role, &req.hosts) {
        Ok(issued) => {
            mesh.count(kind, "issued");
            tracing::info!(%peer, name, role = role.as_str(), not_after = issued.not_after, serial = %issued.serial, "mesh certificate issued ({kind})");
            json_response(&JoinResponse {
                certificate: issued.chain_pem,
                anchor: mesh.authority.anchor_pem().to_string(),
                not_after: issued.not_after,
            })
        }
        Err(e) => {
            mesh.count(kind, "invalid");
            Refusal::BadCertificateRequest(e).into_response()
        }
    }
}

/// `POST /v1/mesh/join`: a certificate for the holder of the join token.
pub(crate) async fn join(
    State(st): State<Arc<ControlState>>,
    ConnectInfo(peer): ConnectInfo<MeshPeer>,
    Json(req): Json<JoinRequest>,
) -> Response {
    let Some(mesh) = mesh_of(&st) else {
        return no_mesh();
    };
    match mesh.authority.accept_join(&req.token) {
        Ok(token) => {
            let c = &req.certificate;
            tracing::info!(peer = %peer.addr, name = %c.name, role = c.role.as_str(), token, "joining the mesh");
        }
        Err(refusal) => {
            mesh.count("join", "refused");
            let c = &req.certificate;
            tracing::warn!(peer = %peer.addr, name = %c.name, role = c.role.as_str(), reason = %refusal, "refused to join the mesh");
            return Refusal::BadJoinToken(refusal.to_string()).into_response();
        }
    }
    issue_response(mesh, "join", &req.certificate, peer.addr)
}

/// `POST /v1/mesh/renew`: a new certificate for a member (the guard checked its
/// current one), for the identity that certificate carries — never another name, role
/// or host — unless it is revoked.
pub(crate) async fn renew(
    State(st): State<Arc<ControlState>>,
    ConnectInfo(peer): ConnectInfo<MeshPeer>,
    Json(req): Json<CertificateRequest>,
) -> Response {
    let Some(mesh) = mesh_of(&st) else {
        return no_mesh();
    };
    let Some(who) = peer.identity.clone() else {
        mesh.count("renew", "refused");
        return Refusal::NoMeshCertificate(
            "renewing takes the certificate to renew: present it in the TLS handshake",
        )
        .into_response();
    };
    if mesh.authority.revoked().contains(&who.serial) {
        mesh.count("renew", "refused");
        tracing::warn!(peer = %peer.addr, name = %who.name, serial = %who.serial, "refused to renew a revoked certificate");
        return Refusal::RenewRevoked(who.serial).into_response();
    }
    if req.name != who.name || req.role != who.role || req.hosts != who.hosts {
        mesh.count("renew", "refused");
        tracing::warn!(peer = %peer.addr, name = %who.name, asked = %req.name, "refused a renewal for another identity than the certificate presented");
        return Refusal::IdentityMismatch {
            name: who.name,
            role: who.role.as_str(),
            hosts: who.hosts,
        }
        .into_response();
    }
    let same = CertificateRequest {
        name: who.name,
        role: who.role,
        hosts: who.hosts,
        csr: req.csr,
    };
    issue_response(mesh, "renew", &same, peer.addr)
}

fn no_mesh() -> Response {
    Refusal::NoMesh.into_response()
}

/// Requests of the worker protocol (processes of the mesh, not people): registering,
/// heartbeats, the endpoint watch, log shipping, gateways' reports, certificates, and
/// changes to batch jobs (which gateways pass on, their tokens checked).
fn mesh_request(method: &http::Method, path: &str) -> bool {
    [
        "/v1/workers",
        "/v1/endpoints/",
        "/v1/logs/",
        "/v1/gateways/",
        "/v1/pools/",
        "/v1/mesh/",
    ]
    .iter()
    .any(|p| path.starts_with(p))
        || (path.starts_with("/api/v1/jobs") && method != http::Method::GET)
}

/// Reads what a refused request sent (64 KiB at most): an answer while the client
/// still sends makes some HTTP/2 clients drop the answer with the stream.
async fn drain(req: Request) {
    let _ = axum::body::to_bytes(req.into_body(), 64 << 10).await;
}

/// On the mesh listener: only a member (a certificate of this mesh, checked in the
/// handshake) gets past, except to join.
pub(crate) async fn members_only(req: Request, next: Next) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<MeshPeer>>()
        .map(|c| c.0.clone());
    let path = req.uri().path().to_string();
    let open = path == "/v1/mesh/join" || path == "/healthz";
    let revoked = peer
        .as_ref()
        .and_then(|p| p.identity.as_ref())
        .is_some_and(|i| etlmesh_tls::is_revoked(&i.serial));
    match peer {
        Some(p) if revoked => {
            tracing::warn!(peer = %p.addr, %path, "refused: the certificate is revoked");
            drain(req).await;
            Refusal::Revoked.into_response()
        }
        Some(p) if p.verified || open => next.run(req).await,
        _ => {
            tracing::warn!(peer = ?peer.map(|p| p.addr), %path, "refused: no certificate from this mesh");
            drain(req).await;
            Refusal::NoMeshCertificate(
                "this listener serves members of the mesh only: join first (POST /v1/mesh/join with the join token)",
            )
            .into_response()
        }
    }
}

/// On the admin listener of a control plane with a mesh: the worker protocol is
/// refused (it is served on the mesh listener, with mTLS).
pub(crate) async fn admin_only(req: Request, next: Next) -> Response {
    if mesh_request(req.method(), req.uri().path()) {
        drain(req).await;
        return Refusal::MeshListenerOnly.into_response();
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::mesh_request;
    use http::Method;

    #[test]
    fn the_worker_protocol_is_told_apart_from_the_admin_api() {
        for (m, p) in [
            (Method::POST, "/v1/workers"),
            (Method::PUT, "/v1/workers/w1/heartbeat"),
            (Method::DELETE, "/v1/workers/w1"),
            (Method::GET, "/v1/endpoints/watch"),
            (Method::POST, "/v1/logs/w1"),
            (Method::PUT, "/v1/gateways/g/load"),
            (Method::POST, "/v1/pools/p/activate"),
            (Method::POST, "/v1/mesh/join"),
            (Method::POST, "/api/v1/jobs"),
            (Method::DELETE, "/api/v1/jobs/7"),
        ] {
            assert!(mesh_request(&m, p), "{m} {p}");
        }
        for (m, p) in [
            (Method::GET, "/api/v1/workers"),
            (Method::GET, "/api/v1/jobs"),
            (Method::GET, "/api/v1/logs"),
            (Method::GET, "/ui"),
            (Method::GET, "/metrics"),
            (Method::GET, "/healthz"),
        ] {
            assert!(!mesh_request(&m, p), "{m} {p}");
        }
    }
}
