//! The certificate authority of the control plane: its trust anchor (created on first
//! start in the state directory, or given), its join token, and the certificates it
//! issues to workers and gateways.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::TlsError;
use crate::identity::Identity;
use crate::token::JoinToken;

/// The name every mesh certificate carries, and the one clients check: the mesh
/// trusts what its anchor signed, wherever it listens.
pub(crate) const MESH_NAME: &str = "mesh.etlmesh";

/// What a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// The control plane's own listener.
    ControlPlane,
    /// A gateway.
    Gateway,
    /// An ETL worker.
    Worker,
}

impl Role {
    /// As written in certificates and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::ControlPlane => "control-plane",
            Role::Gateway => "gateway",
            Role::Worker => "worker",
        }
    }
}

/// A trust anchor given in the pipeline file (`platform.mesh.ca`).
#[derive(Debug, Clone)]
pub struct AuthorityFiles {
    /// The CA certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, PKCS#8).
    pub key: PathBuf,
}

/// A certificate issued: the chain (leaf then anchor, PEM) and when it expires.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Leaf and anchor, PEM.
    pub chain_pem: String,
    /// Seconds since the epoch.
    pub not_after: u64,
    /// Its serial number, hex: what `etlmesh token revoke` takes.
    pub serial: String,
}

/// The control plane's certificate authority.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    anchor_pem: String,
    anchor_der: CertificateDer<'static>,
    token: JoinToken,
    lifetime: Duration,
    issued: AtomicU64,
    tokens: crate::grants::JoinTokens,
    revocations: crate::grants::Revocations,
    /// The revoked serials, and when their file last changed.
    revoked: parking_lot::Mutex<(
        Option<std::time::SystemTime>,
        Arc<std::collections::HashSet<String>>,
    )>,
    /// DNS names a certificate may carry end with one of these.
    host_suffixes: Vec<String>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

fn file_error(path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|e| file_error(path, e))
}

/// Writes a file only its owner may read.
fn write_private(path: &Path, content: &str) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| file_error(path, e))?;
    f.write_all(content.as_bytes())
        .map_err(|e| file_error(path, e))
}

fn now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn random_serial() -> Result<SerialNumber, TlsError> {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| TlsError::Certificate("no randomness for a serial number".into()))?;
    bytes[0] &= 0x7f; // a positive integer
    Ok(SerialNumber::from_slice(&bytes))
}

fn rcgen_error(what: &str) -> impl Fn(rcgen::Error) -> TlsError + '_ {
    move |e| TlsError::Certificate(format!("{what}: {e}"))
}

impl Authority {
    /// The authority kept in `dir` (`ca.pem`, `ca.key`, `join-token`), created there on
    /// first start — or the anchor `given` in the pipeline file, with its token in
    /// `dir`. Certificates it issues live `lifetime`.
    pub fn open(
        dir: &Path,
        given: Option<&AuthorityFiles>,
        lifetime: Duration,
    ) -> Result<Self, TlsError> {
        std::fs::create_dir_all(dir).map_err(|e| file_error(dir, e))?;
        let (cert_path, key_path) = match given {
            Some(g) => (g.cert.clone(), g.key.clone()),
            None => (dir.join("ca.pem"), dir.join("ca.key")),
        };
        if given.is_none() && !cert_path.exists() {
            Self::create(&cert_path, &key_path)?;
        }
        let key_pem = read(&key_path)?;
        let anchor_pem = read(&cert_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| file_error(&key_path, e))?;
        let anchor_der = CertificateDer::from_pem_slice(anchor_pem.as_bytes())
            .map_err(|e| file_error(&cert_path, e))?;
        let issuer =
            Issuer::from_ca_cert_pem(&anchor_pem, key).map_err(|e| file_error(&cert_path, e))?;
        let token_path = dir.join("join-token");
        let token = match std::fs::read_to_string(&token_path)
            .ok()
            .and_then(|t| t.parse::<JoinToken>().ok())
        {
            Some(t) if t.is_for(&anchor_der) => t,
            _ => {
                let t = JoinToken::generate(&anchor_der)?;
                write_private(&token_path, &format!("{t}\n"))?;
                t
            }
        };
        Ok(Self {
            issuer,
            anchor_pem,
            anchor_der,
            token,
            lifetime,
            issued: AtomicU64::new(0),
            tokens: crate::grants::JoinTokens::in_dir(dir),
            revocations: crate::grants::Revocations::in_dir(dir),
            revoked: parking_lot::Mutex::default(),
            host_suffixes: Vec::new(),
        })
    }

    /// DNS names that certificates may carry besides IP addresses and `localhost`: those
    /// ending with one of `suffixes` (`svc.cluster.local`). None by default.
    pub fn with_host_suffixes(mut self, suffixes: Vec<String>) -> Self {
        self.host_suffixes = suffixes
            .into_iter()
            .map(|s| s.trim_start_matches('.').to_ascii_lowercase())
            .filter(|s| !s.is_empty())
            .collect();
        self
    }

    /// Accepts a join token's secret (hex): the authority's own token, or one minted
    /// (spending one of its uses). The name of the token accepted.
    pub fn accept_join(&self, presented: &str) -> Result<String, crate::grants::Refusal> {
        if self.token.accepts(presented) {
            return Ok("join-token".into());
        }
        self.tokens.spend(presented)
    }

    /// Mints a join token valid for `ttl` and `uses` joins.
    pub fn mint(
        &self,
        name: &str,
        ttl: Duration,
        uses: Option<u32>,
    ) -> Result<JoinToken, TlsError> {
        self.tokens.mint(&self.anchor_der, name, ttl, uses)
    }

    /// Mints a join token for the authority kept in `dir` (or with the anchor
    /// `anchor_pem_path`), from another process: `etlmesh token join`.
    pub fn mint_in(
        dir: &Path,
        anchor: Option<&Path>,
        name: &str,
        ttl: Duration,
        uses: Option<u32>,
    ) -> Result<JoinToken, TlsError> {
        let cert_path = anchor.map_or_else(|| dir.join("ca.pem"), Path::to_path_buf);
        let pem = read(&cert_path)?;
        let der = CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| file_error(&cert_path, e))?;
        crate::grants::JoinTokens::in_dir(dir).mint(&der, name, ttl, uses)
    }

    /// The revoked serials (read again when their file changed).
    pub fn revoked(&self) -> Arc<std::collections::HashSet<String>> {
        let modified = self.revocations.modified();
        let mut cur = self.revoked.lock();
        if cur.0 != modified {
            match self.revocations.serials() {
                Ok(set) => *cur = (modified, Arc::new(set)),
                Err(e) => {
                    tracing::error!(error = %e, "the revocation list cannot be read: keeping the last one")
                }
            }
        }
        cur.1.clone()
    }

    /// A new trust anchor: ECDSA P-256, valid ten years, for signing mesh certificates
    /// only.
    fn create(cert_path: &Path, key_path: &Path) -> Result<(), TlsError> {
        let key = KeyPair::generate().map_err(rcgen_error("a CA key"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "etlmesh mesh trust anchor");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now() - time::Duration::hours(1);
        params.not_after = now() + time::Duration::days(3650);
        params.serial_number = Some(random_serial()?);
        let cert = params.self_signed(&key).map_err(rcgen_error("the CA"))?;
        write_private(key_path, &key.serialize_pem())?;
        std::fs::write(cert_path, cert.pem()).map_err(|e| file_error(cert_path, e))?;
        tracing::info!(path = %cert_path.display(), "created the mesh's trust anchor");
        Ok(())
    }

    /// The join token.
    pub fn token(&self) -> &JoinToken {
        &self.token
    }

    /// The trust anchor, PEM.
    pub fn anchor_pem(&self) -> &str {
        &self.anchor_pem
    }

    /// How long certificates live.
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// Certificates issued since start.
    pub fn issued(&self) -> u64 {
        self.issued.load(Ordering::Relaxed)
    }

    /// Signs the key of `csr_pem` (its signature proves the requester holds the key)
    /// for `name` in `role`; `hosts` (IP addresses or DNS names) are added as names for
    /// tools outside the mesh. The request's own names and extensions are ignored.
    pub fn issue(
        &self,
        csr_pem: &str,
        name: &str,
        role: Role,
        hosts: &[String],
    ) -> Result<Issued, TlsError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| TlsError::Certificate(format!("the signing request: {e}")))?;
        let params = self.leaf_params(name, role, hosts)?;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(rcgen_error("signing"))?;
        self.issued.fetch_add(1, Ordering::Relaxed);
        Ok(Issued {
            chain_pem: format!("{}{}", cert.pem(), self.anchor_pem),
            not_after: params.not_after.unix_timestamp().max(0) as u64,
            serial: crate::revoked::serial_of(cert.der()).unwrap_or_default(),
        })
    }

    /// An identity for this very process (the control plane's listener, a gateway in
    /// the same process): a key made here and signed directly.
    pub fn local_identity(
        &self,
        name: &str,
        role: Role,
        hosts: &[String],
    ) -> Result<Arc<Identity>, TlsError> {
        let key = KeyPair::generate().map_err(rcgen_error("a key"))?;
        let csr = CertificateParams::default()
            .serialize_request(&key)
            .and_then(|r| r.pem())
            .map_err(rcgen_error("a signing request"))?;
        let issued = self.issue(&csr, name, role, hosts)?;
        Identity::new(name, role, hosts, &key, &issued, self.anchor_der.clone())
    }

    /// Renews `identity` in place, directly (for identities of this process).
    pub fn renew_local(&self, identity: &Identity) -> Result<(), TlsError> {
        let key = KeyPair::generate().map_err(rcgen_error("a key"))?;
        let csr = CertificateParams::default()
            .serialize_request(&key)
            .and_then(|r| r.pem())
            .map_err(rcgen_error("a signing request"))?;
        let issued = self.issue(&csr, identity.name(), identity.role(), identity.hosts())?;
        identity.replace(&key, &issued)
    }

    /// A host a certificate may carry: an IP address, `localhost`, or a DNS name under
    /// one of the configured suffixes; never a wildcard.
    fn check_host(&self, host: &str) -> Result<(), TlsError> {
        let h = host.to_ascii_lowercase();
        let ok = if h.contains('*') {
            false
        } else if h.parse::<std::net::IpAddr>().is_ok() || h == "localhost" {
            true
        } else {
            self.host_suffixes
                .iter()
                .any(|s| h == *s || h.ends_with(&format!(".{s}")))
        };
        if ok {
            Ok(())
        } else {
            Err(TlsError::Certificate(format!(
                "host `{host}` may not be in a mesh certificate: give an IP address, or a name under platform.mesh.host_suffixes ({}); never a wildcard",
                if self.host_suffixes.is_empty() {
                    "none set".to_string()
                } else {
                    self.host_suffixes.join(", ")
                }
            )))
        }
    }

    fn leaf_params(
        &self,
        name: &str,
        role: Role,
        hosts: &[String],
    ) -> Result<CertificateParams, TlsError> {
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
        {
            return Err(TlsError::Certificate(format!(
                "`{name}` is not a valid name: up to 64 letters, digits, `-`, `_`, `.` or `:`"
            )));
        }
        if hosts.len() > 16 {
            return Err(TlsError::Certificate(format!(
                "{} host names; at most 16",
                hosts.len()
            )));
        }
        for h in hosts {
            self.check_host(h)?;
        }
        let mut sans = vec![
            MESH_NAME.to_string(),
            format!("{}.{MESH_NAME}", role.as_str()),
        ];
        sans.extend(hosts.iter().cloned());
        let mut params = CertificateParams::new(sans)
            .map_err(|e| TlsError::Certificate(format!("a host name: {e}")))?;
        params.subject_alt_names.dedup_by(|a, b| match (a, b) {
            (SanType::DnsName(x), SanType::DnsName(y)) => x == y,
            _ => false,
        });
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, role.as_str());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        // A little slack for clocks that disagree.
        params.not_before = now() - time::Duration::minutes(5);
        params.not_after = now()
            + time::Duration::try_from(self.lifetime)
                .map_err(|e| TlsError::Certificate(format!("lifetime: {e}")))?;
        params.serial_number = Some(random_serial()?);
        Ok(params)
    }
}

impl Authority {
    /// Renews `identity` (of this process) at 70 % of each certificate's life. Runs
    /// until aborted.
    pub async fn renew_local_forever(self: Arc<Self>, identity: Arc<Identity>) {
        loop {
            tokio::time::sleep(identity.until_renewal()).await;
            match self.renew_local(&identity) {
                Ok(()) => tracing::info!(name = identity.name(), "mesh certificate renewed"),
                Err(e) => {
                    tracing::error!(name = identity.name(), error = %e, "mesh certificate renewal failed; retrying in 10 s");
                    tokio::time::sleep(Duration::from_secs(10)).await;
                }
            }
        }
    }
}
