//! TLS on the public listeners (`platform.access.tls`): rustls with ring, served
//! through [`etlmesh_tls::listener::TlsListener`] — HTTP/2 and HTTP/1.1 by ALPN on
//! the HTTP listener, HTTP/2 on the Arrow Flight one ([`flight_incoming`]).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use etlmesh_config::TlsSpec;
use etlmesh_tls::listener::TlsListener;
use futures::Stream;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

/// The server's TLS settings from PEM files, offering `alpn`; the error says which
/// file and why.
pub fn server_config(spec: &TlsSpec, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, String> {
    etlmesh_tls::listener::server_config_from_pem(
        &spec.cert,
        &spec.key,
        alpn,
        "platform.access.tls",
    )
}

/// ALPN of the HTTP listener.
pub const HTTP_ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

/// The Arrow Flight listener's connections once their TLS handshake is done, as
/// tonic's server takes them.
pub fn flight_incoming(
    listener: TcpListener,
    spec: &TlsSpec,
) -> Result<impl Stream<Item = io::Result<FlightConn>> + Send + 'static, String> {
    let config = server_config(spec, &[b"h2"])?;
    let listener = TlsListener::new(listener, config, None).map_err(|e| e.to_string())?;
    Ok(futures::stream::unfold(listener, |mut l| async move {
        let (io, peer) = l.next().await?;
        Some((Ok(FlightConn { io, peer }), l))
    }))
}

/// A TLS connection to the Flight listener.
#[derive(Debug)]
pub struct FlightConn {
    io: TlsStream<TcpStream>,
    peer: SocketAddr,
}

impl Connected for FlightConn {
    type ConnectInfo = SocketAddr;

    fn connect_info(&self) -> SocketAddr {
        self.peer
    }
}

impl AsyncRead for FlightConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for FlightConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
