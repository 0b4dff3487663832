//! One client connection: the CONNECT handshake (version, login, session), then a
//! loop that reads packets, writes what the session may receive, and keeps the
//! keep-alive. Reading and writing never wait for each other, so a client that stops
//! reading cannot stop its acknowledgements from being read.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::v5::mqttbytes::v5::DisconnectReasonCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::Login;
use crate::state::{Attached, Core};
use crate::wire::{self, Accepted, Inbound, Outbound, Publish, Refusal, Version, WireError};

/// How long a client has to send its CONNECT.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Outgoing bytes buffered before the session's queue is left alone.
const OUT_HIGH: usize = 256 << 10;

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
enum End {
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("no CONNECT within {CONNECT_TIMEOUT:?}")]
    Slow,
    #[error("closed by the client")]
    Closed,
    #[error("keep-alive expired")]
    KeepAlive,
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// Serves one client until it leaves, breaks the protocol, or the broker stops.
pub(crate) async fn serve<S>(
    io: S,
    peer: SocketAddr,
    core: Arc<Core>,
    login: Arc<Login>,
    stop: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if let Err(e) = handle(io, peer, &core, &login, stop).await {
        tracing::debug!(%peer, error = %e, "MQTT connection ended");
    }
}

async fn handle<S>(
    io: S,
    peer: SocketAddr,
    core: &Core,
    login: &Login,
    mut stop: watch::Receiver<bool>,
) -> Result<(), End>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut rd, mut wr) = tokio::io::split(io);
    let max = core.max_packet;
    let mut inbuf = BytesMut::with_capacity(4096);
    let version = tokio::time::timeout(CONNECT_TIMEOUT, async {
        loop {
            if let Some(v) = wire::sniff(&inbuf, max as usize)? {
                return Ok::<_, End>(v);
            }
            if rd.read_buf(&mut inbuf).await? == 0 {
                return Err(End::Closed);
            }
        }
    })
    .await
    .map_err(|_| End::Slow)?
    .inspect_err(|e| {
        // Bytes that are not MQTT; a socket closed before its CONNECT (a port probe)
        // is not a refusal.
        if matches!(e, End::Wire(_)) {
            core.metrics.refused("protocol");
        }
    })?;
    let Some(Inbound::Connect(connect)) = wire::decode(version, &mut inbuf, max)? else {
        return Err(End::Protocol("the first packet is not a CONNECT".into()));
    };
    let mut out = BytesMut::with_capacity(4096);
    let attached = match login
        .check(connect.login.as_ref())
        .and_then(|()| core.connect(&connect))
    {
        Ok(a) => a,
        Err(r) => {
            core.metrics.refused(match r {
                Refusal::BadLogin => "login",
                Refusal::BadClientId => "client_id",
                Refusal::Unavailable => "unavailable",
            });
            tracing::info!(%peer, client = %connect.client_id, reason = ?r, "MQTT connection refused");
            wire::encode(version, Outbound::ConnAck(Err(r)), &mut out)?;
            wr.write_all(&out).await?;
            return Ok(());
        }
    };
    tracing::debug!(%peer, client = %attached.client_id, ?version, present = attached.session_present, receive_max = attached.receive_max, "MQTT client connected");
    wire::encode(
        version,
        Outbound::ConnAck(Ok(Accepted {
            session_present: attached.session_present,
            assigned_id: attached.assigned.then(|| attached.client_id.clone()),
            session_expiry: (version == Version::V5)
                .then(|| u32::try_from(attached.expiry.as_secs()).unwrap_or(u32::MAX)),
            receive_maximum: u16::MAX,
            max_packet: max,
            keep_alive: None,
        })),
        &mut out,
    )?;
    let keep_alive = Duration::from_millis(u64::from(connect.keep_alive) * 1500);
    let mut conn = Conn {
        core,
        version,
        attached,
        out,
        graceful: false,
        expiry: None,
    };
    let result = conn
        .run(&mut rd, &mut wr, &mut inbuf, keep_alive, &mut stop)
        .await;
    if matches!(result, Err(End::Wire(_) | End::Protocol(_))) && version == Version::V5 {
        let reason = match &result {
            Err(End::Wire(_)) => DisconnectReasonCode::MalformedPacket,
            _ => DisconnectReasonCode::ProtocolError,
        };
        let mut bye = BytesMut::new();
        if wire::encode(version, Outbound::Disconnect(reason), &mut bye).is_ok() {
            let _ = wr.write_all(&bye).await;
        }
    }
    core.disconnect(
        &conn.attached.client_id,
        conn.attached.conn,
        conn.graceful,
        conn.expiry,
    );
    tracing::debug!(%peer, client = %conn.attached.client_id, graceful = conn.graceful, "MQTT client left");
    result
}

struct Conn<'a> {
    core: &'a Core,
    version: Version,
    attached: Attached,
    out: BytesMut,
    graceful: bool,
    expiry: Option<u32>,
}

impl Conn<'_> {
    async fn run<R, W>(
        &mut self,
        rd: &mut R,
        wr: &mut W,
        inbuf: &mut BytesMut,
        keep_alive: Duration,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), End>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let max = self.core.max_packet;
        let wake = self.attached.wake.clone();
        let mut deadline = Instant::now() + keep_alive;
        let mut batch = Vec::new();
        loop {
            let mut seen = false;
            while let Some(p) = wire::decode(self.version, inbuf, max)? {
                seen = true;
                if !self.inbound(p)? {
                    wr.write_all(&self.out).await?;
                    return Ok(());
                }
            }
            if seen {
                deadline = Instant::now() + keep_alive;
            }
            if self.out.len() < OUT_HIGH {
                batch.clear();
                if self
                    .core
                    .fill(
                        &self.attached.client_id,
                        self.attached.conn,
                        &mut batch,
                        OUT_HIGH,
                    )
                    .is_none()
                {
                    self.graceful = true; // taken over: no will
                    return Ok(());
                }
                for p in batch.drain(..) {
                    wire::encode(self.version, Outbound::Publish(p), &mut self.out)?;
                }
            }
            tokio::select! {
                _ = stop.changed() => {
                    if self.version == Version::V5 {
                        wire::encode(self.version, Outbound::Disconnect(DisconnectReasonCode::ServerShuttingDown), &mut self.out)?;
                    }
                    let _ = tokio::time::timeout(Duration::from_secs(1), wr.write_all(&self.out)).await;
                    self.graceful = true;
                    return Ok(());
                }
                r = rd.read_buf(inbuf), if inbuf.len() <= max as usize + 8 => {
                    if r? == 0 {
                        return Err(End::Closed);
                    }
                }
                r = wr.write_buf(&mut self.out), if !self.out.is_empty() => {
                    r?;
                }
                _ = wake.notified() => {}
                _ = tokio::time::sleep_until(deadline), if !keep_alive.is_zero() => {
                    return Err(End::KeepAlive);
                }
            }
        }
    }

    /// Handles one packet; `false` when the client said goodbye.
    fn inbound(&mut self, p: Inbound) -> Result<bool, End> {
        let client = self.attached.client_id.as_str();
        let v = self.version;
        let reply = match p {
            Inbound::Publish(p) => self.publish(p)?,
            Inbound::PubAck(id) => {
                self.core.acked(client, id);
                None
            }
            Inbound::PubRel(id) => {
                self.core.qos2_released(client, id);
                Some(Outbound::PubComp(id))
            }
            // The broker sends QoS 1 at most: nothing of QoS 2 to acknowledge.
            Inbound::Qos2Answer => None,
            Inbound::Subscribe { pkid, filters } => {
                let granted = self.core.subscribe(client, &filters);
                Some(Outbound::SubAck { pkid, granted })
            }
            Inbound::Unsubscribe { pkid, filters } => {
                let count = self.core.unsubscribe(client, &filters);
                Some(Outbound::UnsubAck { pkid, count })
            }
            Inbound::PingReq => Some(Outbound::PingResp),
            Inbound::Disconnect { session_expiry } => {
                self.graceful = true;
                self.expiry = session_expiry;
                return Ok(false);
            }
            Inbound::Connect(_) => return Err(End::Protocol("a second CONNECT".into())),
            Inbound::Unexpected(what) => {
                return Err(End::Protocol(format!("{what} from a client")));
            }
        };
        if let Some(r) = reply {
            wire::encode(v, r, &mut self.out)?;
        }
        Ok(true)
    }

    fn publish(&mut self, p: Publish) -> Result<Option<Outbound>, End> {
        let client = self.attached.client_id.as_str();
        let (qos, pkid) = (p.qos, p.pkid);
        if qos == 2 {
            if self.core.qos2_received(client, pkid) && !self.core.publish(p) {
                return Err(End::Protocol("PUBLISH to an invalid topic name".into()));
            }
            return Ok(Some(Outbound::PubRec(pkid)));
        }
        if !self.core.publish(p) {
            return Err(End::Protocol("PUBLISH to an invalid topic name".into()));
        }
        Ok((qos == 1).then_some(Outbound::PubAck(pkid)))
    }
}
