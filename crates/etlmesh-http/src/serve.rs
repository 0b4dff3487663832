//! Serving a router to clients that may be slow or hostile: every connection has
//! [`HEADER_READ_TIMEOUT`] to send a request's headers (a socket that sends nothing
//! is closed, not kept), and at most [`PER_PEER`] connections are open from one
//! address at once (more are closed as they come). Each connection runs in its own
//! task, so none waits on another. On shutdown the server stops accepting and lets
//! the connections finish what they serve.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
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

/// Serves `router` on `listener` until `shutdown` completes, then drains.
pub async fn serve<L>(mut listener: L, router: Router, shutdown: impl Future<Output = ()>)
where
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
        let service = TowerToHyperService::new(
            router
                .clone()
                .map_request(|req: http::Request<Incoming>| req.map(Body::new)),
        );
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
