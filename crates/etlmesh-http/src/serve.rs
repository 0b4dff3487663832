//! Serving a router to clients that may be slow or hostile — the one way every etlmesh
//! process serves HTTP ([`serve`] on a [`Listen`]): plain TCP with Nagle's algorithm
//! off, or TLS with handshakes in tasks of their own ([`etlmesh_tls::listener`]).
//! Every connection has [`HEADER_READ_TIMEOUT`] to send a request's headers (a socket
//! that sends nothing is closed, not kept), and at most [`PER_PEER`] connections are
//! open from one address at once (more are closed as they come). Each connection runs
//! in its own task, so none waits on another. On shutdown the server stops accepting
//! and lets the connections finish what they serve.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::serve::ListenerExt;
use etlmesh_tls::listener::{MeshPeer, TlsListener};
use http::Extensions;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceExt;

/// How long a client has to send a request's headers (HTTP/1; HTTP/2 keeps its own
/// keep-alive).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections open from one address at most.
pub const PER_PEER: usize = 1024;

/// Open connections by peer address.
#[derive(Default)]
struct Peers(Mutex<HashMap<IpAddr, usize>>);

impl Peers {
    fn admit(&self, ip: IpAddr) -> bool {
        let mut m = self.0.lock();
        let n = m.entry(ip).or_insert(0);
        if *n >= PER_PEER {
            return false;
        }
        *n += 1;
        true
    }

    fn leave(&self, ip: IpAddr) {
        let mut m = self.0.lock();
        if let Some(n) = m.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&ip);
            }
        }
    }
}

/// Where a server takes its connections.
pub enum Listen {
    /// Plain TCP.
    Plain(TcpListener),
    /// TLS: handshakes in their own tasks, bounded per peer.
    Tls(TlsListener),
}

impl Listen {
    /// TLS on `listener` with `config`; `mesh` names the role a mesh listener logs
    /// refused handshakes under.
    pub fn tls(
        listener: TcpListener,
        config: Arc<rustls::ServerConfig>,
        mesh: Option<&str>,
    ) -> std::io::Result<Self> {
        TlsListener::new(listener, config, mesh).map(Self::Tls)
    }

    /// `http` or `https`.
    pub fn scheme(&self) -> &'static str {
        match self {
            Self::Plain(_) => "http",
            Self::Tls(_) => "https",
        }
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self {
            Self::Plain(l) => l.local_addr(),
            Self::Tls(l) => axum::serve::Listener::local_addr(l),
        }
    }
}

/// Serves `router` on `listen` until `shutdown` completes, then lets open connections
/// finish. Every request carries `ConnectInfo<SocketAddr>`; over TLS also
/// `ConnectInfo<MeshPeer>` (the certificate the peer showed, if any).
pub async fn serve(listen: Listen, router: Router, shutdown: impl Future<Output = ()>) {
    match listen {
        Listen::Plain(l) => {
            let l = l.tap_io(crate::no_delay);
            serve_on(l, router, shutdown, |_, addr| peer_info(addr, None)).await;
        }
        Listen::Tls(l) => {
            serve_on(l, router, shutdown, |io, addr| {
                peer_info(addr, Some(MeshPeer::of(io, addr)))
            })
            .await;
        }
    }
}

fn peer_info(addr: SocketAddr, mesh: Option<MeshPeer>) -> Extensions {
    let mut e = Extensions::new();
    e.insert(ConnectInfo(addr));
    if let Some(m) = mesh {
        e.insert(ConnectInfo(m));
    }
    e
}

async fn serve_on<L>(
    mut listener: L,
    router: Router,
    shutdown: impl Future<Output = ()>,
    info: impl Fn(&L::Io, SocketAddr) -> Extensions,
) where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    let peers = Arc::new(Peers::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<()>(1);
    loop {
        let (io, peer) = tokio::select! {
            c = listener.accept() => c,
            () = &mut shutdown => break,
        };
        if !peers.admit(peer.ip()) {
            tracing::debug!(%peer, limit = PER_PEER, "too many connections from one address: closed");
            drop(io);
            continue;
        }
        let extensions = info(&io, peer);
        let service = TowerToHyperService::new(router.clone().map_request(
            move |req: http::Request<Incoming>| {
                let mut req = req.map(Body::new);
                req.extensions_mut().extend(extensions.clone());
                req
            },
        ));
        let (peers, mut stop, done) = (peers.clone(), stop_rx.clone(), done_tx.clone());
        tokio::spawn(async move {
            let mut builder = Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            builder.http2().timer(TokioTimer::new());
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
            let mut conn = std::pin::pin!(conn);
            let r = tokio::select! {
                r = conn.as_mut() => r,
                () = async { let _ = stop.wait_for(|s| *s).await; } => {
                    conn.as_mut().graceful_shutdown();
                    conn.as_mut().await
                }
            };
            if let Err(e) = r {
                tracing::trace!(%peer, error = %e, "connection ended");
            }
            peers.leave(peer.ip());
            drop(done);
        });
    }
    let _ = stop_tx.send(true);
    drop(done_tx);
    // Every connection task holds a sender: this returns once they all ended.
    let _ = done_rx.recv().await;
}
