//! The MQTT source: one persistent session per worker slot, a shared subscription, and
//! acknowledgements sent by the runner only once the sinks committed.
//!
//! The event loop runs in its own task and hands each message to the runner through a
//! bounded channel. What the worker holds unacknowledged is bounded twice: by the
//! session's receive maximum (MQTT 5; the broker sends no more until some are
//! acknowledged) and by a byte budget — past it the event loop stops reading and TCP
//! pushes back on the broker. Nothing is dropped.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use etlmesh_config::{MqttProtocol, MqttSourceSpec};
use etlmesh_mqtt::Broker;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinHandle;

use crate::StreamError;

/// Unacknowledged messages the broker may send (MQTT 5 receive maximum).
pub const RECEIVE_MAXIMUM: u16 = u16::MAX;

/// Bytes of payload held unacknowledged, at most.
pub const HELD_BYTES: usize = 256 << 20;

/// A message, with what acknowledging it needs.
pub struct Delivery {
    /// Order of arrival.
    pub seq: u64,
    /// The topic it was published to.
    pub topic: Arc<str>,
    /// Its payload.
    pub payload: Bytes,
    /// What acknowledging it needs.
    pub ack: Ack,
}

/// What acknowledging one message needs; dropping it releases its share of the byte
/// budget.
pub struct Ack {
    packet: AckPacket,
    /// The connection it arrived on: after a reconnect the broker sends it again, so an
    /// acknowledgement on the new connection would acknowledge another message.
    epoch: u64,
    _budget: OwnedSemaphorePermit,
}

enum AckPacket {
    V5(rumqttc::v5::mqttbytes::v5::Publish),
    V4(rumqttc::Publish),
}

/// The client side of the session: acknowledgements and leaving.
#[derive(Clone)]
pub struct Session {
    client: Client,
    epoch: Arc<AtomicU64>,
    filter: String,
}

#[derive(Clone)]
enum Client {
    V5(rumqttc::v5::AsyncClient),
    V4(rumqttc::AsyncClient),
}

impl Session {
    /// Acknowledges messages, in the order they came. Those of an earlier connection
    /// are skipped (the broker sends them again). Returns how many were sent.
    pub async fn ack(&self, acks: impl IntoIterator<Item = Ack>) -> Result<u64, StreamError> {
        let epoch = self.epoch.load(Ordering::Acquire);
        let mut sent = 0;
        for a in acks {
            if a.epoch != epoch {
                continue;
            }
            let r = match (&self.client, &a.packet) {
                (Client::V5(c), AckPacket::V5(p)) => c.ack(p).await.map_err(|e| e.to_string()),
                (Client::V4(c), AckPacket::V4(p)) => c.ack(p).await.map_err(|e| e.to_string()),
                _ => Ok(()),
            };
            r.map_err(|e| StreamError::Mqtt(format!("cannot acknowledge: {e}")))?;
            sent += 1;
        }
        Ok(sent)
    }

    /// Stops the broker sending to this session (on a graceful stop: the group's other
    /// members take the share).
    pub async fn leave(&self) {
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

    /// Closes the connection.
    pub async fn disconnect(&self) {
        let _ = match &self.client {
            Client::V5(c) => c.disconnect().await.map_err(|e| e.to_string()),
            Client::V4(c) => c.disconnect().await.map_err(|e| e.to_string()),
        };
    }
}

/// A received message, before it is numbered.
struct Incoming {
    topic: Arc<str>,
    payload: Bytes,
    packet: AckPacket,
}

/// What the event loop reports.
enum Polled {
    Connected { session_present: bool },
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
                    }),
                    Event::Incoming(Packet::Publish(p)) => {
                        Ok(Polled::Message(Box::new(Incoming {
                            topic: Arc::from(String::from_utf8_lossy(&p.topic).as_ref()),
                            payload: p.payload.clone(),
                            packet: AckPacket::V5(rumqttc::v5::mqttbytes::v5::Publish {
                                payload: Bytes::new(),
                                ..p
                            }),
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
                    }),
                    Event::Incoming(Packet::Publish(p)) => {
                        Ok(Polled::Message(Box::new(Incoming {
                            topic: Arc::from(p.topic.as_str()),
                            payload: p.payload.clone(),
                            packet: AckPacket::V4(rumqttc::Publish {
                                payload: Bytes::new(),
                                ..p
                            }),
                        })))
                    }
                    _ => Ok(Polled::Other),
                }
            }
        }
    }
}

/// The client id of a worker slot: stable across restarts of the slot, so that its
/// session (and what it had not acknowledged) is found again.
pub fn client_id(spec: &MqttSourceSpec, pipeline: &str, worker: &str) -> String {
    let id = format!("{}-{pipeline}-{worker}", spec.client_id);
    // MQTT 3.1.1 brokers may refuse ids over 23 bytes; most accept more. Keep it readable.
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Connects (waiting for the broker's answer, so that a wrong address fails at once),
/// subscribes, and starts the event loop. Messages arrive on the returned channel.
pub async fn start(
    spec: &MqttSourceSpec,
    client_id: &str,
    channel: usize,
) -> Result<(Session, mpsc::Receiver<Delivery>, JoinHandle<()>), StreamError> {
    let broker = Broker::parse(&spec.broker).map_err(|e| StreamError::Mqtt(e.to_string()))?;
    let transport = broker
        .transport(spec.ca_file.as_deref())
        .map_err(|e| StreamError::Mqtt(e.to_string()))?;
    let address = broker.address();
    let filter = spec.shared_filter();
    let expiry = u32::try_from(spec.session_expiry.as_secs()).unwrap_or(u32::MAX);
    let (client, mut ev) = match spec.protocol {
        MqttProtocol::V5 => {
            let mut o = broker.options_v5(client_id);
            o.set_clean_start(false)
                .set_session_expiry_interval(Some(expiry.max(1)))
                .set_receive_maximum(Some(RECEIVE_MAXIMUM))
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
    let conn_err = |message: String| StreamError::Connect {
        broker: address.clone(),
        message,
    };
    let session_present = loop {
        match tokio::time::timeout(Duration::from_secs(10), ev.poll()).await {
            Ok(Ok(Polled::Connected { session_present })) => break session_present,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(conn_err(e)),
            Err(_) => return Err(conn_err("no answer within 10 s".into())),
        }
    };
    let qos = spec.qos;
    subscribe(&client, &filter, qos).await?;
    tracing::info!(broker = %address, filter = %filter, client_id, session_present, "subscribed");

    let epoch = Arc::new(AtomicU64::new(0));
    let session = Session {
        client: client.clone(),
        epoch: epoch.clone(),
        filter: filter.clone(),
    };
    let (tx, rx) = mpsc::channel(channel.max(1));
    let budget = Arc::new(Semaphore::new(HELD_BYTES >> 10));
    let task = tokio::spawn(async move {
        let mut seq = 0u64;
        let mut backoff = Duration::from_millis(200);
        loop {
            match ev.poll().await {
                Ok(Polled::Message(m)) => {
                    backoff = Duration::from_millis(200);
                    let kib = (m.payload.len() >> 10).clamp(1, HELD_BYTES >> 10) as u32;
                    let Ok(permit) = budget.clone().acquire_many_owned(kib).await else {
                        return;
                    };
                    seq += 1;
                    let d = Delivery {
                        seq,
                        topic: m.topic,
                        payload: m.payload,
                        ack: Ack {
                            packet: m.packet,
                            epoch: epoch.load(Ordering::Acquire),
                            _budget: permit,
                        },
                    };
                    if tx.send(d).await.is_err() {
                        return;
                    }
                }
                Ok(Polled::Connected { session_present }) => {
                    epoch.fetch_add(1, Ordering::AcqRel);
                    tracing::info!(broker = %address, session_present, "reconnected to the broker");
                    if let Err(e) = subscribe(&client, &filter, qos).await {
                        tracing::warn!(error = %e, "cannot subscribe again");
                    }
                }
                Ok(Polled::Other) => {}
                Err(e) => {
                    if tx.is_closed() {
                        return;
                    }
                    tracing::warn!(broker = %address, error = %e, retry_in_ms = backoff.as_millis() as u64, "MQTT connection lost; reconnecting (unacknowledged messages will come again)");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    });
    Ok((session, rx, task))
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

/// A delivery received outside any session (tests, fuzzing): it holds its own
/// budget and is never acknowledged to a broker.
pub fn detached_delivery(seq: u64, topic: &str, payload: &[u8]) -> Delivery {
    let budget = Arc::new(Semaphore::new(1));
    let permit = budget.try_acquire_owned().expect("one permit");
    Delivery {
        seq,
        topic: Arc::from(topic),
        payload: Bytes::copy_from_slice(payload),
        ack: Ack {
            packet: AckPacket::V4(rumqttc::Publish::new(
                topic,
                rumqttc::QoS::AtLeastOnce,
                Vec::<u8>::new(),
            )),
            epoch: 0,
            _budget: permit,
        },
    }
}
