//! The MQTT source: one persistent session per worker slot, a shared subscription (or
//! a plain one where one worker serves the pipeline), and acknowledgements sent by
//! the runner only once the sinks committed.
//!
//! A session belongs to its source: the client id holds a digest of the broker and
//! the subscription ([`SessionId`]), so a pipeline whose topic changed starts a new
//! session instead of receiving what its old subscription had queued.
//!
//! The event loop runs in its own task and hands each message to the runner through a
//! bounded channel. What the worker holds unacknowledged is bounded by a count (the
//! session's receive maximum, which an MQTT 5 broker is asked to keep to — and
//! Mosquitto 2.0 exceeds once acknowledgements interleave) and by a byte budget: past
//! either the event loop stops reading and TCP pushes back on the broker. Nothing is
//! dropped.
//!
//! Acknowledgements go out through a task of their own ([`Acker`]): the client sends
//! them through the event loop, and an event loop waiting for the runner to take a
//! message must never wait for the runner to finish acknowledging (a deadlock that
//! stalled a slow sink's stream). A message's share of both bounds is freed when the
//! runner hands its acknowledgement over.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use etlmesh_config::{MqttProtocol, MqttSourceSpec};
use etlmesh_mqtt::Broker;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;

use super::{Delivery, Outcome, Source, fnv1a};
use crate::StreamError;

/// Unacknowledged messages the broker may send (MQTT 5 receive maximum).
pub const RECEIVE_MAXIMUM: u16 = u16::MAX;

/// Bytes of payload held unacknowledged, at most.
pub const HELD_BYTES: usize = 256 << 20;

/// What acknowledging one message needs; dropping it releases its share of the
/// bounds (one message of the count, its KiB of the byte budget).
pub struct Ack {
    packet: AckPacket,
    /// The connection it arrived on: after a reconnect the broker sends it again, so an
    /// acknowledgement on the new connection would acknowledge another message.
    epoch: u64,
    _count: OwnedSemaphorePermit,
    _bytes: OwnedSemaphorePermit,
}

/// What a PUBACK (or PUBREC) names: the packet id, and the QoS the message came with.
#[derive(Clone, Copy)]
struct AckPacket {
    pkid: u16,
    qos: u8,
}

impl AckPacket {
    /// Hands the acknowledgement to the client (for its event loop to send).
    async fn send(self, client: &Client) -> Result<(), String> {
        match client {
            Client::V5(c) => {
                use rumqttc::v5::mqttbytes::QoS;
                let qos = match self.qos {
                    0 => QoS::AtMostOnce,
                    1 => QoS::AtLeastOnce,
                    _ => QoS::ExactlyOnce,
                };
                let mut p = rumqttc::v5::mqttbytes::v5::Publish::new("", qos, Bytes::new(), None);
                p.pkid = self.pkid;
                c.ack(&p).await.map_err(|e| e.to_string())
            }
            Client::V4(c) => {
                use rumqttc::QoS;
                let qos = match self.qos {
                    0 => QoS::AtMostOnce,
                    1 => QoS::AtLeastOnce,
                    _ => QoS::ExactlyOnce,
                };
                let mut p = rumqttc::Publish::new("", qos, Vec::new());
                p.pkid = self.pkid;
                c.ack(&p).await.map_err(|e| e.to_string())
            }
        }
    }
}

/// The client side of the session: acknowledgements and leaving.
#[derive(Clone)]
pub struct Session {
    client: Client,
    epoch: Arc<AtomicU64>,
    filter: String,
    receive_maximum: u16,
    acker: Acker,
}

/// What the acknowledging task is asked.
enum AckJob {
    /// A PUBACK, for a message of the connection numbered `epoch`.
    Ack(u64, AckPacket),
    /// Answers once every acknowledgement before it went to the client.
    Flush(oneshot::Sender<()>),
}

/// The queue of the task that hands PUBACKs to the client, in order, so that the
/// runner never waits on the event loop. Its length stays within what the broker sent
/// beyond its window: the runner hands over at most what the event loop read, and the
/// event loop reads no more than the count bound allows beyond what was handed over.
#[derive(Clone)]
struct Acker(mpsc::UnboundedSender<AckJob>);

impl Acker {
    fn start(client: Client, epoch: Arc<AtomicU64>) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<AckJob>();
        tokio::spawn(async move {
            while let Some(job) = rx.recv().await {
                match job {
                    AckJob::Ack(at, packet) => {
                        // One of an earlier connection: the broker sends it again.
                        if at != epoch.load(Ordering::Acquire) {
                            continue;
                        }
                        if let Err(e) = packet.send(&client).await {
                            // The event loop is gone (the session closed): the broker
                            // sends the message again to the next session.
                            tracing::debug!(error = %e, "cannot hand an acknowledgement to the MQTT client");
                        }
                    }
                    AckJob::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
        });
        Self(tx)
    }
}

#[derive(Clone)]
enum Client {
    V5(rumqttc::v5::AsyncClient),
    V4(rumqttc::AsyncClient),
}

impl Source for Session {
    type Ack = Ack;

    fn window(&self) -> usize {
        self.receive_maximum as usize
    }

    /// PUBACKs, in the order the messages came (a dead-lettered message is finished
    /// too), handed to the acknowledging task; their share of the bounds is free at
    /// once. Those of an earlier connection are skipped: the broker sends them again.
    async fn ack(&self, acks: Vec<(Ack, Outcome)>) -> Result<u64, StreamError> {
        let epoch = self.epoch.load(Ordering::Acquire);
        let mut sent = 0;
        for (a, _) in acks {
            if a.epoch != epoch {
                continue;
            }
            self.acker
                .0
                .send(AckJob::Ack(a.epoch, a.packet))
                .map_err(|_| StreamError::Mqtt("the MQTT session is closed".into()))?;
            sent += 1;
        }
        Ok(sent)
    }

    /// The broker keeps unacknowledged messages in flight for the session: nothing to say.
    async fn hold<'a>(&'a self, _held: Vec<&'a Ack>) {}

    /// In-flight messages that still arrive stay unacknowledged: the broker sends them
    /// again when the session comes back.
    fn stop(&self) {}

    /// Unacknowledged messages stay with the session; the broker sends them again when
    /// the slot comes back.
    async fn release(&self, _unacked: Vec<Ack>) {}

    /// Stops the broker sending to this session (on a graceful stop: the group's other
    /// members take the share).
    async fn leave(&self) {
        let r = match &self.client {
            Client::V5(c) => c
                .unsubscribe(self.filter.clone())
                .await
                .map_err(|e| e.to_string()),
            Client::V4(c) => c
                .unsubscribe(self.filter.clone())
                .await
                .map_err(|e| e.to_string()),
        };
        if let Err(e) = r {
            tracing::debug!(error = %e, "unsubscribe failed");
        }
    }

    /// Closes the connection, after the acknowledgements handed over (for at most
    /// 5 s: what is not acknowledged comes again).
    async fn close(&self) {
        let (done, flushed) = oneshot::channel();
        if self.acker.0.send(AckJob::Flush(done)).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(5), flushed).await;
        }
        let _ = match &self.client {
            Client::V5(c) => c.disconnect().await.map_err(|e| e.to_string()),
            Client::V4(c) => c.disconnect().await.map_err(|e| e.to_string()),
        };
    }
}

/// A received message, before it is numbered.
struct Incoming {
    dup: bool,
    topic: Arc<str>,
    payload: Bytes,
    packet: AckPacket,
}

/// What the event loop reports.
enum Polled {
    Connected {
        session_present: bool,
        /// What an MQTT 5 broker says of itself in its CONNACK.
        limits: Option<BrokerLimits>,
    },
    Message(Box<Incoming>),
    Other,
}

enum Loop {
    V5(Box<rumqttc::v5::EventLoop>),
    V4(Box<rumqttc::EventLoop>),
}

impl Loop {
    async fn poll(&mut self) -> Result<Polled, String> {
        match self {
            Loop::V5(l) => {
                use rumqttc::v5::Event;
                use rumqttc::v5::mqttbytes::v5::Packet;
                match l.poll().await.map_err(|e| e.to_string())? {
                    Event::Incoming(Packet::ConnAck(c)) => Ok(Polled::Connected {
                        session_present: c.session_present,
                        limits: c.properties.map(|p| BrokerLimits {
                            session_expiry: p.session_expiry_interval,
                            receive_maximum: p.receive_max,
                            shared_subscriptions: p.shared_subscription_available != Some(0),
                        }),
                    }),
                    Event::Incoming(Packet::Publish(p)) => {
                        Ok(Polled::Message(Box::new(Incoming {
                            dup: p.dup,
                            topic: Arc::from(String::from_utf8_lossy(&p.topic).as_ref()),
                            payload: p.payload.clone(),
                            packet: AckPacket {
                                pkid: p.pkid,
                                qos: p.qos as u8,
                            },
                        })))
                    }
                    _ => Ok(Polled::Other),
                }
            }
            Loop::V4(l) => {
                use rumqttc::{Event, Packet};
                match l.poll().await.map_err(|e| e.to_string())? {
                    Event::Incoming(Packet::ConnAck(c)) => Ok(Polled::Connected {
                        session_present: c.session_present,
                        limits: None,
                    }),
                    Event::Incoming(Packet::Publish(p)) => {
                        Ok(Polled::Message(Box::new(Incoming {
                            dup: p.dup,
                            topic: Arc::from(p.topic.as_str()),
                            payload: p.payload.clone(),
                            packet: AckPacket {
                                pkid: p.pkid,
                                qos: p.qos as u8,
                            },
                        })))
                    }
                    _ => Ok(Polled::Other),
                }
            }
        }
    }
}

/// What an MQTT 5 broker said of its limits when the session connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BrokerLimits {
    /// The session expiry it grants, when it lowered the one asked for.
    pub session_expiry: Option<u32>,
    /// Unacknowledged messages it accepts from us.
    pub receive_maximum: Option<u16>,
    /// Whether it offers shared subscriptions.
    pub shared_subscriptions: bool,
}

/// Who a worker slot is to the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionId {
    /// `<prefix>-<pipeline>-<worker>-<digest>`: stable across restarts of the slot, so
    /// that its session (and what it had not acknowledged) is found again; new when
    /// the broker or the subscription changes.
    pub client_id: String,
    /// `$share/<group>/<filter>`, or the plain filter where one worker serves the
    /// pipeline (a plain persistent subscription outlives a broker's restart, which a
    /// shared one does not on Mosquitto).
    pub subscription: String,
    /// host:port.
    pub broker: String,
}

impl SessionId {
    /// The session of `worker`'s slot of `pipeline`: `shared` when several workers
    /// may serve it.
    pub fn new(spec: &MqttSourceSpec, pipeline: &str, worker: &str, shared: bool) -> Self {
        let subscription = if shared {
            spec.shared_filter()
        } else {
            spec.filter.clone()
        };
        let broker = Broker::parse(&spec.broker)
            .map(|b| format!("{}://{}", if b.tls { "mqtts" } else { "mqtt" }, b.address()))
            .unwrap_or_else(|_| spec.broker.clone());
        let digest = fnv1a(format!("{broker}\n{subscription}").as_bytes());
        // MQTT 3.1.1 brokers may refuse ids over 23 bytes; most accept more. Keep it readable.
        let client_id = plain_name(&format!(
            "{}-{pipeline}-{worker}-{:08x}",
            spec.client_id, digest as u32
        ));
        Self {
            client_id,
            subscription,
            broker,
        }
    }
}

/// `s` with every character but ASCII letters, digits, `-` and `_` made `_`: safe in a
/// client id and a file name.
pub(crate) fn plain_name(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Removes a session the broker keeps for `client_id`, with its subscriptions and
/// what it queued: connects with a clean start and a session that expires at once.
pub async fn discard_session(spec: &MqttSourceSpec, client_id: &str) -> Result<(), StreamError> {
    let broker = Broker::parse(&spec.broker).map_err(|e| StreamError::Mqtt(e.to_string()))?;
    let transport = broker
        .transport(spec.ca_file.as_deref())
        .map_err(|e| StreamError::Mqtt(e.to_string()))?;
    let (client, mut ev) = match spec.protocol {
        MqttProtocol::V5 => {
            let mut o = broker.options_v5(client_id);
            o.set_clean_start(true)
                .set_session_expiry_interval(Some(0))
                .set_transport(transport);
            let (c, l) = rumqttc::v5::AsyncClient::new(o, 8);
            (Client::V5(c), Loop::V5(Box::new(l)))
        }
        MqttProtocol::V311 => {
            let mut o = broker.options(client_id);
            o.set_clean_session(true).set_transport(transport);
            let (c, l) = rumqttc::AsyncClient::new(o, 8);
            (Client::V4(c), Loop::V4(Box::new(l)))
        }
    };
    connected(&mut ev, &broker.address()).await?;
    let epoch = Arc::<AtomicU64>::default();
    let session = Session {
        acker: Acker::start(client.clone(), epoch.clone()),
        client,
        epoch,
        filter: String::new(),
        receive_maximum: 1,
    };
    session.close().await;
    // Send the DISCONNECT.
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while ev.poll().await.is_ok() {}
    })
    .await;
    Ok(())
}

/// Polls until the broker's CONNACK: whether it kept the session, and its limits.
async fn connected(
    ev: &mut Loop,
    address: &str,
) -> Result<(bool, Option<BrokerLimits>), StreamError> {
    let conn_err = |message: String| StreamError::Connect {
        broker: address.to_string(),
        message,
    };
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ev.poll()).await {
            Ok(Ok(Polled::Connected {
                session_present,
                limits,
            })) => return Ok((session_present, limits)),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(conn_err(e)),
            Err(_) => return Err(conn_err("no answer within 10 s".into())),
        }
    }
}

/// Connects (waiting for the broker's answer, so that a wrong address fails at once),
/// subscribes, and starts the event loop. Messages arrive on the returned channel.
pub async fn start(
    spec: &MqttSourceSpec,
    id: &SessionId,
    receive_maximum: u16,
) -> Result<(Session, mpsc::Receiver<Delivery<Ack>>, JoinHandle<()>), StreamError> {
    // The count bound keeps the channel from filling: the event loop never waits on it.
    let channel = usize::from(receive_maximum);
    let broker = Broker::parse(&spec.broker).map_err(|e| StreamError::Mqtt(e.to_string()))?;
    let transport = broker
        .transport(spec.ca_file.as_deref())
        .map_err(|e| StreamError::Mqtt(e.to_string()))?;
    let address = broker.address();
    let client_id = id.client_id.as_str();
    let filter = id.subscription.clone();
    let expiry = u32::try_from(spec.session_expiry.as_secs()).unwrap_or(u32::MAX);
    let (client, mut ev) = match spec.protocol {
        MqttProtocol::V5 => {
            let mut o = broker.options_v5(client_id);
            o.set_clean_start(false)
                .set_session_expiry_interval(Some(expiry.max(1)))
                .set_receive_maximum(Some(receive_maximum))
                .set_manual_acks(true)
                .set_transport(transport);
            let (c, l) = rumqttc::v5::AsyncClient::new(o, 1024);
            (Client::V5(c), Loop::V5(Box::new(l)))
        }
        MqttProtocol::V311 => {
            let mut o = broker.options(client_id);
            o.set_clean_session(false)
                .set_manual_acks(true)
                .set_transport(transport);
            let (c, l) = rumqttc::AsyncClient::new(o, 1024);
            (Client::V4(c), Loop::V4(Box::new(l)))
        }
    };
    let (session_present, limits) = connected(&mut ev, &address).await?;
    if let Some(l) = limits {
        if !l.shared_subscriptions && filter.starts_with("$share/") {
            return Err(StreamError::Mqtt(format!(
                "the broker at {address} does not offer shared subscriptions; set `scaling: {{ max_replicas: 1 }}` to subscribe without one"
            )));
        }
        if let Some(granted) = l.session_expiry
            && granted < expiry
        {
            tracing::warn!(broker = %address, asked_s = expiry, granted_s = granted, "the broker keeps this worker's session for less than the source's session_expiry: unacknowledged messages are lost when a worker stays away longer");
        }
    }
    let qos = spec.qos;
    subscribe(&client, &filter, qos).await?;
    tracing::info!(broker = %address, subscription = %filter, client_id, session_present, "subscribed");

    let epoch = Arc::new(AtomicU64::new(0));
    let session = Session {
        client: client.clone(),
        epoch: epoch.clone(),
        filter: filter.clone(),
        receive_maximum,
        acker: Acker::start(client.clone(), epoch.clone()),
    };
    let (tx, rx) = mpsc::channel(channel.max(1));
    let count = Arc::new(Semaphore::new(usize::from(receive_maximum.max(1))));
    let budget = Arc::new(Semaphore::new(HELD_BYTES >> 10));
    let task = tokio::spawn(async move {
        let mut seq = 0u64;
        // The first reconnect is at once: while we are away the broker drops what it
        // cannot queue (and a restarted broker what no subscription takes).
        let mut backoff = Duration::ZERO;
        loop {
            match ev.poll().await {
                Ok(Polled::Message(m)) => {
                    backoff = Duration::ZERO;
                    let kib = (m.payload.len() >> 10).clamp(1, HELD_BYTES >> 10) as u32;
                    let Ok(one) = count.clone().acquire_owned().await else {
                        return;
                    };
                    let Ok(bytes) = budget.clone().acquire_many_owned(kib).await else {
                        return;
                    };
                    seq += 1;
                    let d = Delivery {
                        seq,
                        redelivered: m.dup,
                        topic: m.topic,
                        payload: m.payload,
                        meta: super::Meta::default(),
                        ack: Ack {
                            packet: m.packet,
                            epoch: epoch.load(Ordering::Acquire),
                            _count: one,
                            _bytes: bytes,
                        },
                    };
                    if tx.send(d).await.is_err() {
                        return;
                    }
                }
                Ok(Polled::Connected {
                    session_present, ..
                }) => {
                    backoff = Duration::ZERO;
                    epoch.fetch_add(1, Ordering::AcqRel);
                    tracing::info!(broker = %address, session_present, "reconnected to the broker");
                    // Not awaited here: the client's request queue drains only while this
                    // loop polls, and the acknowledgements can fill it (a stall seen after
                    // a broker restart under load).
                    let (client, filter) = (client.clone(), filter.clone());
                    tokio::spawn(async move {
                        if let Err(e) = subscribe(&client, &filter, qos).await {
                            tracing::warn!(error = %e, "cannot subscribe again");
                        }
                    });
                }
                Ok(Polled::Other) => {}
                Err(e) => {
                    if tx.is_closed() {
                        return;
                    }
                    tracing::warn!(broker = %address, error = %e, retry_in_ms = backoff.as_millis() as u64, "MQTT connection lost; reconnecting (unacknowledged messages will come again)");
                    tokio::time::sleep(backoff).await;
                    backoff =
                        (backoff * 2).clamp(Duration::from_millis(50), Duration::from_secs(5));
                }
            }
        }
    });
    Ok((session, rx, task))
}

/// Warns, from a task of its own, when the broker is one that drops what it queues
/// for a session past its defaults (asked on a connection of its own, after the start:
/// a restart does not wait).
pub fn warn_if_broker_drops(spec: &MqttSourceSpec, pipeline: &str) {
    let (spec, pipeline) = (spec.clone(), pipeline.to_string());
    tokio::spawn(async move {
        let version = broker_version(&spec, Duration::from_secs(2)).await;
        if let Some(v) = version.filter(|v| drops_queued(v)) {
            let risk = broker_risks(&v, spec.receive_maximum);
            tracing::warn!(pipeline = %pipeline, error_kind = "broker_drops_queued", "{risk}");
        }
    });
}

/// What the broker says it is (`$SYS/broker/version`, which Mosquitto and others
/// publish retained), asked on a connection of its own; `None` when it does not say
/// within `within`.
pub async fn broker_version(spec: &MqttSourceSpec, within: Duration) -> Option<String> {
    let broker = Broker::parse(&spec.broker).ok()?;
    let transport = broker.transport(spec.ca_file.as_deref()).ok()?;
    let mut o = broker.options(&format!("etlmesh-probe-{}", std::process::id()));
    o.set_clean_session(true).set_transport(transport);
    let (c, mut l) = rumqttc::AsyncClient::new(o, 8);
    let found = tokio::time::timeout(within, async {
        loop {
            match l.poll().await.ok()? {
                rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)) => {
                    c.subscribe("$SYS/broker/version", rumqttc::QoS::AtMostOnce)
                        .await
                        .ok()?;
                }
                rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => {
                    return Some(String::from_utf8_lossy(&p.payload).into_owned());
                }
                _ => {}
            }
        }
    })
    .await
    .ok()
    .flatten();
    let _ = c.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_millis(200), l.poll()).await;
    found
}

/// Whether a broker (by its version string) drops, by default, messages it queues
/// for a session: Mosquitto does, past `max_queued_messages` (1,000) beyond what is in
/// flight for a session that is online, and counting what is in flight for one that
/// is offline.
pub fn drops_queued(version: &str) -> bool {
    version.to_ascii_lowercase().contains("mosquitto")
}

/// What an operator must know about such a broker, for a source that lets it send
/// `receive_maximum` messages unacknowledged.
pub fn broker_risks(version: &str, receive_maximum: u16) -> String {
    format!(
        "the broker is {version}: by default it keeps at most 1,000 messages queued for a session (max_queued_messages) and silently drops the rest — beyond the {receive_maximum} it may have in flight to a worker that is slower than the publishers (a sink down), and, for a worker that died holding more than 1,000 unacknowledged, every message published until it is back. It also forgets shared subscriptions when it restarts (a pipeline with `scaling: {{ max_replicas: 1 }}` subscribes without sharing, which it keeps). Set `max_queued_messages 0` in mosquitto.conf, then say so with `broker_keeps_queued: true` on the source"
    )
}

async fn subscribe(client: &Client, filter: &str, qos: u8) -> Result<(), StreamError> {
    let r = match client {
        Client::V5(c) => {
            let q = if qos == 0 {
                rumqttc::v5::mqttbytes::QoS::AtMostOnce
            } else {
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce
            };
            c.subscribe(filter, q).await.map_err(|e| e.to_string())
        }
        Client::V4(c) => {
            let q = if qos == 0 {
                rumqttc::QoS::AtMostOnce
            } else {
                rumqttc::QoS::AtLeastOnce
            };
            c.subscribe(filter, q).await.map_err(|e| e.to_string())
        }
    };
    r.map_err(|e| StreamError::Mqtt(format!("cannot subscribe to {filter}: {e}")))
}
