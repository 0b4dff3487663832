//! A process's identity in the mesh: its current certificate and key, the trust
//! anchor, and the TLS configurations built on them. Renewal replaces the certificate
//! in place; every later handshake, as server or client, uses the new one.

use parking_lot::RwLock;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::KeyPair;
use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SignatureScheme};

use crate::authority::{Issued, Role};
use crate::verify::MeshServerVerifier;
use crate::{TlsError, provider};

/// Whether a mesh listener requires a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Every peer shows one (workers).
    Required,
    /// Peers may show one; routes decide (the control plane, where joining processes
    /// have none yet).
    Optional,
}

struct Current {
    key: Arc<CertifiedKey>,
    issued: SystemTime,
    not_after: SystemTime,
}

/// A process's certificate, key and trust anchor.
pub struct Identity {
    name: String,
    role: Role,
    hosts: Vec<String>,
    anchor: CertificateDer<'static>,
    current: Arc<RwLock<Current>>,
    client: Arc<ClientConfig>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("name", &self.name)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

fn certified(key: &KeyPair, issued: &Issued) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(issued.chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| TlsError::Certificate(format!("the issued chain: {e}")))?;
    if chain.is_empty() {
        return Err(TlsError::Certificate("the issued chain is empty".into()));
    }
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing = provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| TlsError::Certificate(format!("the key: {e}")))?;
    Ok(Arc::new(CertifiedKey::new(chain, signing)))
}

impl Identity {
    /// An identity from a key and the certificate issued for it.
    pub(crate) fn new(
        name: &str,
        role: Role,
        hosts: &[String],
        key: &KeyPair,
        issued: &Issued,
        anchor: CertificateDer<'static>,
    ) -> Result<Arc<Self>, TlsError> {
        let current = Arc::new(RwLock::new(Current {
            key: certified(key, issued)?,
            issued: SystemTime::now(),
            not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(issued.not_after),
        }));
        let roots = roots(&anchor)?;
        let verifier = MeshServerVerifier::new(roots)
            .map_err(|e| TlsError::Certificate(format!("the trust anchor: {e}")))?;
        let client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Certificate(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(Arc::new(Resolver(current.clone())));
        Ok(Arc::new(Self {
            name: name.to_string(),
            role,
            hosts: hosts.to_vec(),
            anchor,
            current,
            client: Arc::new(client),
        }))
    }

    /// Puts a renewed certificate in place.
    pub fn replace(&self, key: &KeyPair, issued: &Issued) -> Result<(), TlsError> {
        let key = certified(key, issued)?;
        let mut c = self.current.write();
        *c = Current {
            key,
            issued: SystemTime::now(),
            not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(issued.not_after),
        };
        Ok(())
    }

    /// The name in the certificate.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The role in the certificate.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The host names in the certificate besides the mesh's.
    pub fn hosts(&self) -> &[String] {
        &self.hosts
    }

    /// When the current certificate expires.
    pub fn not_after(&self) -> SystemTime {
        self.current.read().not_after
    }

    /// When to renew: at 70 % of the current certificate's life.
    pub fn renew_at(&self) -> SystemTime {
        let c = self.current.read();
        let life = c.not_after.duration_since(c.issued).unwrap_or_default();
        c.issued + life.mul_f64(0.7)
    }

    /// The time left before [`Self::renew_at`] (zero when it has passed).
    pub fn until_renewal(&self) -> Duration {
        self.renew_at()
            .duration_since(SystemTime::now())
            .unwrap_or_default()
    }

    /// The current certificate (the leaf), DER.
    pub fn certificate(&self) -> CertificateDer<'static> {
        self.current
            .read()
            .key
            .cert
            .first()
            .cloned()
            .unwrap_or_else(|| CertificateDer::from(Vec::new()))
    }

    /// The trust anchor (DER).
    pub fn anchor(&self) -> &CertificateDer<'static> {
        &self.anchor
    }

    /// The client side of mesh hops: this certificate shown, the peer's checked
    /// against the anchor. Renewals show through it.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.client.clone()
    }

    /// The server side of a mesh listener (HTTP/2 and HTTP/1.1 by ALPN).
    pub fn server_config(&self, clients: ClientAuth) -> Result<Arc<ServerConfig>, TlsError> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(roots(&self.anchor)?, provider());
        let verifier = match clients {
            ClientAuth::Required => verifier.build(),
            ClientAuth::Optional => verifier.allow_unauthenticated().build(),
        }
        .map_err(|e| TlsError::Certificate(format!("client verifier: {e}")))?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Certificate(e.to_string()))?
            .with_client_cert_verifier(Arc::new(crate::verify::MeshClientVerifier(verifier)))
            .with_cert_resolver(Arc::new(Resolver(self.current.clone())));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

fn roots(anchor: &CertificateDer<'static>) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    roots
        .add(anchor.clone())
        .map_err(|e| TlsError::Certificate(format!("the trust anchor: {e}")))?;
    Ok(Arc::new(roots))
}

/// Hands the identity's current certificate to every handshake.
struct Resolver(Arc<RwLock<Current>>);

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Resolver")
    }
}

impl Resolver {
    fn key(&self) -> Arc<CertifiedKey> {
        self.0.read().key.clone()
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.key())
    }
}

impl ResolvesClientCert for Resolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        let key = self.key();
        key.key.choose_scheme(sigschemes).map(|_| key)
    }

    fn has_certs(&self) -> bool {
        true
    }
}
