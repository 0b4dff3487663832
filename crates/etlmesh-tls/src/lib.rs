//! mTLS inside the mesh.
//!
//! The control plane is a certificate authority ([`Authority`]): on first start it
//! creates a trust anchor in its state directory (or loads one given in the pipeline
//! file) and a join token ([`JoinToken`]). Workers and gateways present the token with
//! a certificate signing request and get a short-lived certificate (24 h by default),
//! which they renew at 70 % of its life with the certificate itself. Their key never
//! leaves the process.
//!
//! Every hop — gateway → worker, worker and gateway → control plane — then speaks TLS
//! with certificates on both sides, checked against the mesh's trust anchor: a peer
//! without a certificate from this control plane cannot complete a handshake.
//!
//! A process holds one [`Identity`] (installed once with [`install`]); the clients of
//! the mesh ([`connector`]) and its listeners ([`listener::TlsListener`]) read the
//! current certificate from it at every handshake, so renewal needs no restart.
//!
//! The join token carries the SHA-256 of the trust anchor: a joining process checks the
//! control plane's certificate against it before it sends the token, so one string is
//! all a worker needs to join safely (as with `kubeadm join`). Tokens can also be
//! minted with an expiry and a number of uses ([`grants`]); certificates can be
//! revoked by serial number, and every process of the mesh refuses a revoked peer in
//! its handshakes ([`set_revoked`], fed by the control plane).

mod authority;
mod client;
pub mod grants;
mod identity;
pub mod listener;
mod revoked;
mod token;
mod verify;

use std::sync::{Arc, OnceLock};

pub use authority::{Authority, AuthorityFiles, Issued, Role};
pub use client::{
    CertificateRequest, JoinRequest, JoinResponse, MeshConnector, connector, connector_trusting,
    connector_with_config, join, renew_forever,
};
pub use identity::{ClientAuth, Identity};
pub use revoked::{is_revoked, serial_of, set_revoked};
pub use token::{JoinToken, hex, sha256};

/// Errors of the mesh's TLS.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file of the authority cannot be read or written.
    #[error("mesh CA: {path}: {message}")]
    File {
        /// The file.
        path: String,
        /// Why.
        message: String,
    },
    /// A certificate or key is not what it should be.
    #[error("mesh TLS: {0}")]
    Certificate(String),
    /// The join token is malformed.
    #[error(
        "join token: {0}\n  help: pass the token the control plane wrote in its state directory (mesh/join-token), as --join-token or ETLMESH_JOIN_TOKEN"
    )]
    Token(String),
    /// The control plane refused to issue a certificate.
    #[error("the control plane refused to issue a certificate: {0}")]
    Refused(String),
    /// The control plane could not be reached.
    #[error("cannot reach the control plane to join the mesh: {0}")]
    Unreachable(String),
    /// A file of certificates to trust cannot be used.
    #[error(
        "{path}: {message}\n  help: give the PEM certificate the server presents, or the CA that signed it"
    )]
    Trust {
        /// The file.
        path: String,
        /// Why.
        message: String,
    },
}

/// An error with its sources on one line: a refused TLS handshake shows only in the
/// sources of hyper's "client error (Connect)".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The crypto provider every TLS config of etlmesh uses (ring: the one rustls already
/// builds).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

static INSTALLED: OnceLock<Arc<Identity>> = OnceLock::new();

/// Makes `identity` this process's identity in the mesh: the certificate its clients
/// present and its mesh listeners serve. Once per process; a second call is ignored
/// and returns false.
pub fn install(identity: Arc<Identity>) -> bool {
    INSTALLED.set(identity).is_ok()
}

/// This process's identity in the mesh, when it joined one.
pub fn installed() -> Option<Arc<Identity>> {
    INSTALLED.get().cloned()
}

#[cfg(test)]
mod tests;
