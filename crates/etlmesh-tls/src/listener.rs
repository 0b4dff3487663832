//! TLS listeners for axum: handshakes run in their own tasks (5 s each), so that a slow
//! or hostile peer never holds up the next connection. Pending handshakes are bounded
//! per peer address ([`PER_PEER`]) and in all ([`PENDING`]); past either bound the
//! oldest pending handshake is dropped, never the newest — so sockets that never send
//! a ClientHello cannot lock a client out, however many there are.
//! Used by the gateway's public listeners (`platform.access.tls`: HTTP, and Arrow
//! Flight through [`TlsListener::next`]) and by every mesh listener, where a failed
//! handshake — a peer without a certificate from the mesh — is logged with the peer's
//! address.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// How long a peer has to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshakes pending from one address at most; a newer one drops the oldest.
pub const PER_PEER: usize = 64;
/// Handshakes pending in all at most; a newer one drops the oldest.
pub const PENDING: usize = 1024;

/// The handshakes in progress, oldest first, in all and by peer address.
#[derive(Default)]
struct Pending {
    next: u64,
    order: std::collections::VecDeque<(u64, std::net::IpAddr)>,
    by_peer: std::collections::HashMap<
        std::net::IpAddr,
        std::collections::VecDeque<(u64, tokio::task::AbortHandle)>,
    >,
}

impl Pending {
    fn next_id(&mut self) -> u64 {
        self.next += 1;
        self.next
    }

    /// Records a handshake, first dropping the oldest of its peer (or of all) when a
    /// bound is reached.
    fn start(&mut self, id: u64, ip: std::net::IpAddr, task: tokio::task::AbortHandle) {
        if self.by_peer.get(&ip).is_some_and(|q| q.len() >= PER_PEER) {
            self.drop_oldest_of(ip);
        } else if self.order.len() >= PENDING
            && let Some(&(_, oldest)) = self.order.front()
        {
            self.drop_oldest_of(oldest);
        }
        self.order.push_back((id, ip));
        self.by_peer.entry(ip).or_default().push_back((id, task));
    }

    fn drop_oldest_of(&mut self, ip: std::net::IpAddr) {
        let Some(q) = self.by_peer.get_mut(&ip) else {
            return;
        };
        if let Some((id, task)) = q.pop_front() {
            task.abort();
            tracing::debug!(peer = %ip, "too many pending TLS handshakes: dropped the oldest");
            self.order.retain(|(i, _)| *i != id);
        }
        if q.is_empty() {
            self.by_peer.remove(&ip);
        }
    }

    fn done(&mut self, id: u64, ip: std::net::IpAddr) {
        if let Some(q) = self.by_peer.get_mut(&ip) {
            q.retain(|(i, _)| *i != id);
            if q.is_empty() {
                self.by_peer.remove(&ip);
            }
        }
        if let Some(at) = self.order.iter().position(|(i, _)| *i == id) {
            self.order.remove(at);
        }
    }
}

/// Accepted connections whose handshake succeeded.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    addr: SocketAddr,
    refused: Arc<AtomicU64>,
}

impl std::fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsListener")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl TlsListener {
    /// Accepts on `listener` and hands over connections once their handshake is done.
    /// `mesh` names the listener in the warning a refused peer causes; `None` (a
    /// public listener) keeps failed handshakes at debug level.
    pub fn new(
        listener: TcpListener,
        config: Arc<ServerConfig>,
        mesh: Option<&str>,
    ) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        let acceptor = TlsAcceptor::from(config);
        let pending = Arc::new(parking_lot::Mutex::new(Pending::default()));
        let refused = Arc::new(AtomicU64::new(0));
        let counter = refused.clone();
        let mesh = mesh.map(str::to_string);
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let (acceptor, ready) = (acceptor.clone(), tx.clone());
                let (mesh, counter, book) = (mesh.clone(), counter.clone(), pending.clone());
                // Held until the handshake is recorded: its task may end at once.
                let mut book_now = pending.lock();
                let id = book_now.next_id();
                let task = tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            book.lock().done(id, peer.ip());
                            let _ = ready.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => {
                            book.lock().done(id, peer.ip());
                            counter.fetch_add(1, Ordering::Relaxed);
                            match &mesh {
                                Some(m) => {
                                    tracing::warn!(%peer, listener = %m, error = %e, "refused a peer: TLS handshake failed (no certificate from this mesh?)")
                                }
                                None => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                            }
                        }
                        Err(_) => {
                            book.lock().done(id, peer.ip());
                            tracing::debug!(%peer, "TLS handshake timed out");
                        }
                    }
                });
                book_now.start(id, peer.ip(), task.abort_handle());
                drop(book_now);
                if tx.is_closed() {
                    return;
                }
            }
        });
        Ok(Self {
            ready,
            addr,
            refused,
        })
    }

    /// Counts failed handshakes, shared with the accepting task.
    pub fn refused(&self) -> Arc<AtomicU64> {
        self.refused.clone()
    }

    /// The next connection whose handshake succeeded (`None` once accepting stopped).
    pub async fn next(&mut self) -> Option<(TlsStream<TcpStream>, SocketAddr)> {
        self.ready.recv().await
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.next().await {
            Some(c) => c,
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

/// Who is on the other end of a mesh connection: its address, and the identity of the
/// certificate of the mesh it showed (checked in the handshake; absent where the
/// listener lets peers without one in, as the control plane does for joining).
#[derive(Debug, Clone)]
pub struct MeshPeer {
    /// The peer's address.
    pub addr: SocketAddr,
    /// It showed a certificate signed by the mesh's anchor.
    pub verified: bool,
    /// What that certificate says, when it could be read.
    pub identity: Option<PeerIdentity>,
}

/// The identity a mesh certificate carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// Its name (the subject's common name).
    pub name: String,
    /// Its role (the subject's organizational unit).
    pub role: crate::Role,
    /// The host names and addresses besides the mesh's own names.
    pub hosts: Vec<String>,
    /// Its serial number, hex.
    pub serial: String,
}

impl PeerIdentity {
    /// Reads a mesh certificate (DER): its common name, organizational unit (the role),
    /// names besides the mesh's, and serial number.
    pub fn of(der: &rustls::pki_types::CertificateDer<'_>) -> Option<Self> {
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
        let subject = cert.subject();
        let name = subject
            .iter_common_name()
            .next()?
            .as_str()
            .ok()?
            .to_string();
        let role = match subject.iter_organizational_unit().next()?.as_str().ok()? {
            "worker" => crate::Role::Worker,
            "gateway" => crate::Role::Gateway,
            "control-plane" => crate::Role::ControlPlane,
            _ => return None,
        };
        let mut hosts = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for n in &san.value.general_names {
                match n {
                    x509_parser::extensions::GeneralName::DNSName(d)
                        if !d.ends_with(crate::authority::MESH_NAME) =>
                    {
                        hosts.push((*d).to_string());
                    }
                    x509_parser::extensions::GeneralName::IPAddress(ip) => {
                        let ip = match ip.len() {
                            4 => <[u8; 4]>::try_from(*ip).ok().map(std::net::IpAddr::from),
                            16 => <[u8; 16]>::try_from(*ip).ok().map(std::net::IpAddr::from),
                            _ => None,
                        };
                        hosts.extend(ip.map(|i| i.to_string()));
                    }
                    _ => {}
                }
            }
        }
        Some(Self {
            name,
            role,
            hosts,
            serial: crate::token::hex(cert.raw_serial()),
        })
    }
}

impl MeshPeer {
    /// The peer of an accepted TLS connection from `addr`.
    pub fn of(io: &TlsStream<TcpStream>, addr: SocketAddr) -> Self {
        let (_, conn) = io.get_ref();
        let leaf = conn.peer_certificates().and_then(|c| c.first());
        Self {
            addr,
            verified: leaf.is_some(),
            identity: leaf.and_then(PeerIdentity::of),
        }
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for MeshPeer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        Self::of(stream.io(), *stream.remote_addr())
    }
}

/// A server's TLS settings from a certificate chain and a key in PEM files, offering
/// `alpn`, without client certificates (a public listener); the error names the
/// setting (`field`, e.g. `platform.access.tls`), the file and why.
pub fn server_config_from_pem(
    cert: &std::path::Path,
    key: &std::path::Path,
    alpn: &[&[u8]],
    field: &str,
) -> Result<Arc<ServerConfig>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|e| format!("{field}.cert `{}`: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{field}.cert `{}` holds no certificate",
            cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("{field}.key `{}`: {e}", key.display()))?;
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| format!("{field}: the key does not fit the certificate: {e}"))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}
