//! How a mesh client checks the server: its chain must lead to the mesh's trust
//! anchor and carry the mesh's name — wherever the server listens (an IP address, a
//! pod, a host name), so no certificate needs to know its address in advance.
//!
//! Before joining, a process has only the anchor's SHA-256 (in the join token): the
//! server's chain must then include a certificate with that digest, used as the anchor.

use std::sync::Arc;

use rustls::DigitallySignedStruct;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{RootCertStore, SignatureScheme};

use crate::authority::MESH_NAME;
use crate::provider;
use crate::token::sha256;

fn mesh_name() -> ServerName<'static> {
    ServerName::try_from(MESH_NAME).unwrap_or_else(|_| unreachable!("a valid DNS name"))
}

/// How a mesh client checks the server's chain.
#[derive(Debug)]
pub(crate) enum MeshServerVerifier {
    /// Against the anchor this process holds.
    Anchored(Arc<WebPkiServerVerifier>),
    /// Against the certificate of the chain whose SHA-256 is this (joining).
    Pinned([u8; 32]),
}

impl MeshServerVerifier {
    /// Against `roots` (the anchor).
    pub(crate) fn new(roots: Arc<RootCertStore>) -> Result<Self, rustls::Error> {
        Ok(Self::Anchored(webpki(roots)?))
    }
}

fn webpki(roots: Arc<RootCertStore>) -> Result<Arc<WebPkiServerVerifier>, rustls::Error> {
    WebPkiServerVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verifier = match self {
            Self::Anchored(v) => v.clone(),
            Self::Pinned(pin) => {
                let Some(anchor) = intermediates.iter().find(|c| sha256(c) == *pin) else {
                    return Err(rustls::Error::General(
                        "the control plane's certificate is not from the trust anchor named in the join token".into(),
                    ));
                };
                let mut roots = RootCertStore::empty();
                roots
                    .add(anchor.clone().into_owned())
                    .map_err(|e| rustls::Error::General(format!("the trust anchor: {e}")))?;
                webpki(Arc::new(roots))?
            }
        };
        let ok = verifier.verify_server_cert(end_entity, intermediates, &mesh_name(), ocsp, now)?;
        crate::revoked::check(end_entity)?;
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// How a mesh listener checks a client: the anchor's chain (webpki), then that its
/// certificate is not revoked.
#[derive(Debug)]
pub(crate) struct MeshClientVerifier(
    pub(crate) Arc<dyn rustls::server::danger::ClientCertVerifier>,
);

impl rustls::server::danger::ClientCertVerifier for MeshClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.0.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.0.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let ok = self.0.verify_client_cert(end_entity, intermediates, now)?;
        crate::revoked::check(end_entity)?;
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}
