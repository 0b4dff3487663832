//! TLS listeners for axum: handshakes run in their own tasks (at most 256 at once,
//! 10 s each), so that a slow or hostile peer never holds up the next connection.
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
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

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
        let handshakes = Arc::new(Semaphore::new(256));
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
                let Ok(permit) = handshakes.clone().acquire_owned().await else {
                    return;
                };
                let (acceptor, ready) = (acceptor.clone(), tx.clone());
                let (mesh, counter) = (mesh.clone(), counter.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
                    {
                        Ok(Ok(tls)) => {
                            let _ = ready.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => {
                            counter.fetch_add(1, Ordering::Relaxed);
                            match &mesh {
                                Some(m) => {
                                    tracing::warn!(%peer, listener = %m, error = %e, "refused a peer: TLS handshake failed (no certificate from this mesh?)")
                                }
                                None => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                            }
                        }
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
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

/// Who is on the other end of a mesh connection: its address, and whether it showed a
/// certificate of the mesh (checked in the handshake; absent where the listener lets
/// peers without one in, as the control plane does for joining).
#[derive(Debug, Clone)]
pub struct MeshPeer {
    /// The peer's address.
    pub addr: SocketAddr,
    /// It showed a certificate signed by the mesh's anchor.
    pub verified: bool,
}

impl Connected<IncomingStream<'_, TlsListener>> for MeshPeer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        let (_, conn) = stream.io().get_ref();
        Self {
            addr: *stream.remote_addr(),
            verified: conn.peer_certificates().is_some_and(|c| !c.is_empty()),
        }
    }
}
