//! MQTT on the wire, for both versions: the packets a broker reads and writes, decoded
//! and encoded by rumqttc's codec (`mqttbytes::v4` for MQTT 3.1.1, `v5` for MQTT 5)
//! and seen by the rest of the broker as one version-free vocabulary.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

/// The protocol a connection speaks, fixed by its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1.1 (protocol level 4).
    V4,
    /// MQTT 5.
    V5,
}

/// A packet that cannot be read or written; the connection is closed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Bytes that are not MQTT, or a packet larger than allowed.
    #[error("malformed packet: {0}")]
    Malformed(String),
    /// A protocol other than MQTT 3.1.1 or 5.
    #[error("protocol level {0} is not supported; connect with MQTT 3.1.1 or 5")]
    Level(u8),
}

/// A will: published when the client goes away without a DISCONNECT.
#[derive(Debug, Clone)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
}

/// What a CONNECT asks for.
#[derive(Debug, Clone)]
pub struct Connect {
    pub version: Version,
    pub client_id: String,
    /// Start without the state of an earlier session.
    pub clean_start: bool,
    /// Seconds; 0 for none.
    pub keep_alive: u16,
    /// How long the session outlives the connection; `None`: as long as the broker
    /// keeps sessions (MQTT 3.1.1 without clean session).
    pub session_expiry: Option<u32>,
    /// Unacknowledged QoS 1 messages the client takes at once (MQTT 5).
    pub receive_maximum: Option<u16>,
    /// The largest packet the client takes (MQTT 5).
    pub max_packet: Option<u32>,
    pub login: Option<(String, String)>,
    pub will: Option<Will>,
}

/// A PUBLISH, in or out.
#[derive(Debug, Clone)]
pub struct Publish {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub dup: bool,
    pub pkid: u16,
}

/// Packets a client sends.
#[derive(Debug)]
pub enum Inbound {
    Connect(Box<Connect>),
    Publish(Publish),
    PubAck(u16),
    PubRel(u16),
    /// PUBREC or PUBCOMP: answers to QoS 2 messages, which the broker never sends.
    Qos2Answer,
    Subscribe {
        pkid: u16,
        filters: Vec<(String, u8)>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    /// `session_expiry`: MQTT 5 may change it on the way out.
    Disconnect {
        session_expiry: Option<u32>,
    },
    /// Packets only a server sends, or AUTH: a protocol error.
    Unexpected(&'static str),
}

/// Why a CONNECT is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    BadClientId,
    BadLogin,
    Unavailable,
}

/// What the broker grants on CONNACK.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub session_present: bool,
    pub assigned_id: Option<String>,
    pub session_expiry: Option<u32>,
    pub receive_maximum: u16,
    pub max_packet: u32,
    pub keep_alive: Option<u16>,
}

/// Packets the broker sends.
#[derive(Debug)]
pub enum Outbound {
    ConnAck(Result<Accepted, Refusal>),
    Publish(Publish),
    PubAck(u16),
    PubRec(u16),
    PubComp(u16),
    /// `None`: the filter was refused.
    SubAck {
        pkid: u16,
        granted: Vec<Option<u8>>,
    },
    UnsubAck {
        pkid: u16,
        count: usize,
    },
    PingResp,
    /// MQTT 5 only: why the broker closes the connection.
    Disconnect(v5::DisconnectReasonCode),
}

/// The version the complete CONNECT at the start of `buf` asks for; `Ok(None)` until
/// the whole packet is there.
pub fn sniff(buf: &[u8], max_packet: usize) -> Result<Option<Version>, WireError> {
    // A CONNECT's first byte is 0x10: anything else is refused at once, not waited on.
    if buf.first().is_some_and(|b| *b != 0x10) {
        return Err(WireError::Malformed(
            "the first packet is not a CONNECT".into(),
        ));
    }
    match rumqttc::mqttbytes::check(buf.iter(), max_packet) {
        Ok(h) => {
            // The remaining length takes one to four bytes after the first.
            let len_bytes = buf[1..]
                .iter()
                .take(4)
                .take_while(|b| *b & 0x80 != 0)
                .count()
                + 1;
            let body = buf.get(1 + len_bytes..h.frame_length()).unwrap_or_default();
            // Protocol name (2-byte length + "MQTT"), then the level.
            match body.get(..7) {
                Some([0, 4, b'M', b'Q', b'T', b'T', 4]) => Ok(Some(Version::V4)),
                Some([0, 4, b'M', b'Q', b'T', b'T', 5]) => Ok(Some(Version::V5)),
                Some([0, 4, b'M', b'Q', b'T', b'T', level]) => Err(WireError::Level(*level)),
                Some([0, 6, b'M', b'Q', b'I', b's', b'd']) => Err(WireError::Level(3)),
                _ => Err(WireError::Malformed(
                    "the first packet is not a CONNECT".into(),
                )),
            }
        }
        Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
        Err(e) => Err(WireError::Malformed(e.to_string())),
    }
}

fn qos4(q: rumqttc::mqttbytes::QoS) -> u8 {
    q as u8
}

fn qos5(q: rumqttc::v5::mqttbytes::QoS) -> u8 {
    q as u8
}

fn to_qos4(q: u8) -> rumqttc::mqttbytes::QoS {
    rumqttc::mqttbytes::qos(q.min(2)).unwrap_or(rumqttc::mqttbytes::QoS::AtMostOnce)
}

fn to_qos5(q: u8) -> rumqttc::v5::mqttbytes::QoS {
    rumqttc::v5::mqttbytes::qos(q.min(2)).unwrap_or(rumqttc::v5::mqttbytes::QoS::AtMostOnce)
}

/// Takes the next complete packet from `buf`; `Ok(None)` until one is there.
pub fn decode(
    version: Version,
    buf: &mut BytesMut,
    max: u32,
) -> Result<Option<Inbound>, WireError> {
    match version {
        Version::V4 => match v4::Packet::read(buf, max as usize) {
            Ok(p) => Ok(Some(from_v4(p))),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(WireError::Malformed(e.to_string())),
        },
        Version::V5 => match v5::Packet::read(buf, Some(max)) {
            Ok(p) => from_v5(p).map(Some),
            Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(WireError::Malformed(e.to_string())),
        },
    }
}

fn from_v4(p: v4::Packet) -> Inbound {
    match p {
        v4::Packet::Connect(c) => Inbound::Connect(Box::new(Connect {
            version: Version::V4,
            client_id: c.client_id,
            clean_start: c.clean_session,
            keep_alive: c.keep_alive,
            session_expiry: if c.clean_session { Some(0) } else { None },
            receive_maximum: None,
            max_packet: None,
            login: c.login.map(|l| (l.username, l.password)),
            will: c.last_will.map(|w| Will {
                topic: w.topic,
                payload: w.message,
                qos: qos4(w.qos),
                retain: w.retain,
            }),
        })),
        v4::Packet::Publish(p) => Inbound::Publish(Publish {
            topic: p.topic,
            payload: p.payload,
            qos: qos4(p.qos),
            retain: p.retain,
            dup: p.dup,
            pkid: p.pkid,
        }),
        v4::Packet::PubAck(a) => Inbound::PubAck(a.pkid),
        v4::Packet::PubRec(_) | v4::Packet::PubComp(_) => Inbound::Qos2Answer,
        v4::Packet::PubRel(a) => Inbound::PubRel(a.pkid),
        v4::Packet::Subscribe(s) => Inbound::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| (f.path, qos4(f.qos)))
                .collect(),
        },
        v4::Packet::Unsubscribe(u) => Inbound::Unsubscribe {
            pkid: u.pkid,
            filters: u.topics,
        },
        v4::Packet::PingReq => Inbound::PingReq,
        v4::Packet::Disconnect => Inbound::Disconnect {
            session_expiry: None,
        },
        v4::Packet::ConnAck(_) => Inbound::Unexpected("CONNACK"),
        v4::Packet::SubAck(_) => Inbound::Unexpected("SUBACK"),
        v4::Packet::UnsubAck(_) => Inbound::Unexpected("UNSUBACK"),
        v4::Packet::PingResp => Inbound::Unexpected("PINGRESP"),
    }
}

fn utf8(b: Bytes, what: &str) -> Result<String, WireError> {
    String::from_utf8(b.to_vec()).map_err(|_| WireError::Malformed(format!("{what} is not UTF-8")))
}

fn from_v5(p: v5::Packet) -> Result<Inbound, WireError> {
    Ok(match p {
        v5::Packet::Connect(c, will, login) => {
            let props = c.properties.unwrap_or(v5::ConnectProperties {
                session_expiry_interval: None,
                receive_maximum: None,
                max_packet_size: None,
                topic_alias_max: None,
                request_response_info: None,
                request_problem_info: None,
                user_properties: Vec::new(),
                authentication_method: None,
                authentication_data: None,
            });
            if props.authentication_method.is_some() {
                return Ok(Inbound::Unexpected("enhanced authentication"));
            }
            let will = match will {
                Some(w) => Some(Will {
                    topic: utf8(w.topic, "the will's topic")?,
                    payload: w.message,
                    qos: qos5(w.qos),
                    retain: w.retain,
                }),
                None => None,
            };
            Inbound::Connect(Box::new(Connect {
                version: Version::V5,
                client_id: c.client_id,
                clean_start: c.clean_start,
                keep_alive: c.keep_alive,
                session_expiry: Some(props.session_expiry_interval.unwrap_or(0)),
                receive_maximum: props.receive_maximum,
                max_packet: props.max_packet_size,
                login: login.map(|l| (l.username, l.password)),
                will,
            }))
        }
        v5::Packet::Publish(p) => {
            if p.properties
                .as_ref()
                .is_some_and(|x| x.topic_alias.is_some())
            {
                return Ok(Inbound::Unexpected(
                    "a topic alias (the broker grants none)",
                ));
            }
            Inbound::Publish(Publish {
                topic: utf8(p.topic, "the topic")?,
                payload: p.payload,
                qos: qos5(p.qos),
                retain: p.retain,
                dup: p.dup,
                pkid: p.pkid,
            })
        }
        v5::Packet::PubAck(a) => Inbound::PubAck(a.pkid),
        v5::Packet::PubRec(_) | v5::Packet::PubComp(_) => Inbound::Qos2Answer,
        v5::Packet::PubRel(a) => Inbound::PubRel(a.pkid),
        v5::Packet::Subscribe(s) => Inbound::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| (f.path, qos5(f.qos)))
                .collect(),
        },
        v5::Packet::Unsubscribe(u) => Inbound::Unsubscribe {
            pkid: u.pkid,
            filters: u.filters,
        },
        v5::Packet::PingReq(_) => Inbound::PingReq,
        v5::Packet::Disconnect(d) => Inbound::Disconnect {
            session_expiry: d.properties.and_then(|p| p.session_expiry_interval),
        },
        v5::Packet::Auth(_) => Inbound::Unexpected("AUTH"),
        v5::Packet::ConnAck(_) => Inbound::Unexpected("CONNACK"),
        v5::Packet::SubAck(_) => Inbound::Unexpected("SUBACK"),
        v5::Packet::UnsubAck(_) => Inbound::Unexpected("UNSUBACK"),
        v5::Packet::PingResp(_) => Inbound::Unexpected("PINGRESP"),
    })
}

/// Appends `packet` to `buf`.
pub fn encode(version: Version, packet: Outbound, buf: &mut BytesMut) -> Result<(), WireError> {
    let r = match version {
        Version::V4 => to_v4(packet).map(|p| {
            p.write(buf, usize::MAX)
                .map(drop)
                .map_err(|e| WireError::Malformed(e.to_string()))
        }),
        Version::V5 => Some(
            to_v5(packet)
                .write(buf, None)
                .map(drop)
                .map_err(|e| WireError::Malformed(e.to_string())),
        ),
    };
    r.unwrap_or(Ok(()))
}

fn to_v4(packet: Outbound) -> Option<v4::Packet> {
    use v4::ConnectReturnCode as C;
    Some(match packet {
        Outbound::ConnAck(r) => v4::Packet::ConnAck(match r {
            Ok(a) => v4::ConnAck::new(C::Success, a.session_present),
            Err(Refusal::BadClientId) => v4::ConnAck::new(C::BadClientId, false),
            Err(Refusal::BadLogin) => v4::ConnAck::new(C::BadUserNamePassword, false),
            Err(Refusal::Unavailable) => v4::ConnAck::new(C::ServiceUnavailable, false),
        }),
        Outbound::Publish(p) => v4::Packet::Publish(v4::Publish {
            dup: p.dup,
            qos: to_qos4(p.qos),
            retain: p.retain,
            topic: p.topic,
            pkid: p.pkid,
            payload: p.payload,
        }),
        Outbound::PubAck(id) => v4::Packet::PubAck(v4::PubAck::new(id)),
        Outbound::PubRec(id) => v4::Packet::PubRec(v4::PubRec::new(id)),
        Outbound::PubComp(id) => v4::Packet::PubComp(v4::PubComp::new(id)),
        Outbound::SubAck { pkid, granted } => v4::Packet::SubAck(v4::SubAck::new(
            pkid,
            granted
                .into_iter()
                .map(|g| {
                    g.map_or(v4::SubscribeReasonCode::Failure, |q| {
                        v4::SubscribeReasonCode::Success(to_qos4(q))
                    })
                })
                .collect(),
        )),
        Outbound::UnsubAck { pkid, .. } => v4::Packet::UnsubAck(v4::UnsubAck::new(pkid)),
        Outbound::PingResp => v4::Packet::PingResp,
        // MQTT 3.1.1 has no server DISCONNECT: the connection just closes.
        Outbound::Disconnect(_) => return None,
    })
}

fn to_v5(packet: Outbound) -> v5::Packet {
    use v5::ConnectReturnCode as C;
    match packet {
        Outbound::ConnAck(r) => {
            let (code, props, present) = match r {
                Ok(a) => (
                    C::Success,
                    Some(v5::ConnAckProperties {
                        session_expiry_interval: a.session_expiry,
                        receive_max: Some(a.receive_maximum),
                        max_qos: Some(1),
                        retain_available: None,
                        max_packet_size: Some(a.max_packet),
                        assigned_client_identifier: a.assigned_id,
                        topic_alias_max: None,
                        reason_string: None,
                        user_properties: Vec::new(),
                        wildcard_subscription_available: None,
                        subscription_identifiers_available: Some(0),
                        shared_subscription_available: None,
                        server_keep_alive: a.keep_alive,
                        response_information: None,
                        server_reference: None,
                        authentication_method: None,
                        authentication_data: None,
                    }),
                    a.session_present,
                ),
                Err(Refusal::BadClientId) => (C::ClientIdentifierNotValid, None, false),
                Err(Refusal::BadLogin) => (C::BadUserNamePassword, None, false),
                Err(Refusal::Unavailable) => (C::ServerUnavailable, None, false),
            };
            v5::Packet::ConnAck(v5::ConnAck {
                session_present: present,
                code,
                properties: props,
            })
        }
        Outbound::Publish(p) => {
            let mut out = v5::Publish::new(p.topic, to_qos5(p.qos), p.payload, None);
            out.dup = p.dup;
            out.retain = p.retain;
            out.pkid = p.pkid;
            v5::Packet::Publish(out)
        }
        Outbound::PubAck(id) => v5::Packet::PubAck(v5::PubAck::new(id, None)),
        Outbound::PubRec(id) => v5::Packet::PubRec(v5::PubRec::new(id, None)),
        Outbound::PubComp(id) => v5::Packet::PubComp(v5::PubComp::new(id, None)),
        Outbound::SubAck { pkid, granted } => v5::Packet::SubAck(v5::SubAck {
            pkid,
            return_codes: granted
                .into_iter()
                .map(|g| {
                    g.map_or(v5::SubscribeReasonCode::TopicFilterInvalid, |q| {
                        v5::SubscribeReasonCode::Success(to_qos5(q))
                    })
                })
                .collect(),
            properties: None,
        }),
        Outbound::UnsubAck { pkid, count } => v5::Packet::UnsubAck(v5::UnsubAck {
            pkid,
            reasons: vec![v5::UnsubAckReason::Success; count],
            properties: None,
        }),
        Outbound::PingResp => v5::Packet::PingResp(v5::PingResp),
        Outbound::Disconnect(reason) => v5::Packet::Disconnect(v5::Disconnect::new(reason)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect_bytes(level: u8) -> BytesMut {
        let mut b = BytesMut::new();
        match level {
            4 => {
                let mut c = v4::Connect::new("c1");
                c.clean_session = false;
                v4::Packet::Connect(c)
                    .write(&mut b, 1 << 20)
                    .expect("encodes");
            }
            _ => {
                let c = v5::Connect {
                    keep_alive: 10,
                    client_id: "c1".into(),
                    clean_start: true,
                    properties: None,
                };
                v5::Packet::Connect(c, None, None)
                    .write(&mut b, None)
                    .expect("encodes");
            }
        }
        b
    }

    #[test]
    fn the_connect_says_the_version() {
        for (level, want) in [(4, Version::V4), (5, Version::V5)] {
            let mut b = connect_bytes(level);
            assert_eq!(sniff(&b[..3], 1 << 20).expect("fine"), None);
            assert_eq!(sniff(&b, 1 << 20).expect("fine"), Some(want));
            let Some(Inbound::Connect(c)) = decode(want, &mut b, 1 << 20).expect("decodes") else {
                panic!("not a connect")
            };
            assert_eq!(c.client_id, "c1");
            assert_eq!(c.session_expiry, if level == 4 { None } else { Some(0) });
        }
    }

    #[test]
    fn a_publish_round_trips_in_both_versions() {
        for v in [Version::V4, Version::V5] {
            let mut b = BytesMut::new();
            let p = Publish {
                topic: "a/b".into(),
                payload: Bytes::from_static(b"x"),
                qos: 1,
                retain: false,
                dup: true,
                pkid: 7,
            };
            encode(v, Outbound::Publish(p), &mut b).expect("encodes");
            // A server never reads its own PUBLISH, but the codec is symmetric.
            let Some(Inbound::Publish(q)) = decode(v, &mut b, 1 << 20).expect("decodes") else {
                panic!("not a publish")
            };
            assert_eq!(
                (q.topic.as_str(), q.pkid, q.qos, q.dup),
                ("a/b", 7, 1, true)
            );
        }
    }

    #[test]
    fn garbage_and_old_protocols_are_refused() {
        assert!(sniff(&[0x10, 3, 0, 1, b'x'], 1 << 20).is_err());
        assert!(sniff(&[0x30, 2, 0, 0], 1 << 20).is_err());
        assert!(
            sniff(b"GET / HTTP/1.1", 1 << 20).is_err(),
            "refused from its first byte"
        );
        let mut b = BytesMut::from(&[0x10u8, 0xff, 0xff, 0xff, 0x7f][..]);
        assert!(decode(Version::V4, &mut b, 1024).is_err(), "too large");
    }
}
