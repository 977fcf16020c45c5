//! The uplink's side of the MQTT wire: the packets a client sends, encoded, and the packets a
//! broker sends, decoded, for MQTT 3.1.1 and 5 over rumqttc's codecs (`mqttbytes`).

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::{self as m4, v4};
use rumqttc::v5::mqttbytes::{self as m5, v5};

use super::error::LinkError;
use crate::clock::Stamp;
use crate::message::{Message, Properties, QoS};
use crate::mqtt::{self, Protocol};

/// What CONNECT carries.
pub struct ConnectSpec<'a> {
    pub client_id: &'a str,
    pub keep_alive: Duration,
    pub session_expiry: Duration,
    pub max_packet_size: u32,
    pub credentials: Option<&'a (String, String)>,
    /// Retained, QoS 1.
    pub will: Option<&'a (String, Bytes)>,
}

/// A PUBLISH to send, owned (it travels to the connection task).
#[derive(Debug)]
pub struct OutPublish {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub properties: Properties,
    /// v5 Message Expiry Interval.
    pub expiry_secs: Option<u32>,
}

/// A packet from the broker.
#[derive(Debug)]
pub enum Incoming {
    ConnAck {
        session_present: bool,
        /// `None`: accepted; otherwise the refusal.
        refused: Option<String>,
        receive_maximum: Option<u16>,
        max_packet_size: Option<u32>,
    },
    PubAck {
        pkid: u16,
        refused: Option<String>,
    },
    Publish {
        pkid: u16,
        message: Box<Message>,
    },
    SubAck {
        pkid: u16,
    },
    PingResp,
    /// The broker ends the connection (v5 says why: `code`).
    Disconnect {
        code: Option<u8>,
        name: String,
    },
    /// A packet a client does not expect; named for the error.
    Unexpected(&'static str),
}

// QoS 2 is never used upstream: it goes out as QoS 1.
fn v4_qos(q: QoS) -> m4::QoS {
    mqtt::qos_to_v4(q.min(QoS::AtLeastOnce))
}

fn v5_qos(q: QoS) -> m5::QoS {
    mqtt::qos_to_v5(q.min(QoS::AtLeastOnce))
}

fn secs_u16(d: Duration) -> u16 {
    u16::try_from(d.as_secs()).unwrap_or(u16::MAX)
}

/// CONNECT with a kept session (clean session / clean start off) and a retained QoS 1 will.
/// Fails only for what the codec cannot encode (a client id, will or login over 64 KiB).
pub fn connect(
    protocol: Protocol,
    c: &ConnectSpec<'_>,
    out: &mut BytesMut,
) -> Result<(), LinkError> {
    match protocol {
        Protocol::V311 => {
            let mut p = v4::Connect::new(c.client_id);
            p.keep_alive = secs_u16(c.keep_alive);
            p.clean_session = false;
            if let Some((user, pass)) = c.credentials {
                p.set_login(user, pass);
            }
            p.last_will = c.will.map(|(topic, payload)| {
                v4::LastWill::new(topic, payload.to_vec(), m4::QoS::AtLeastOnce, true)
            });
            p.write(out)
                .map(drop)
                .map_err(|e| LinkError::Protocol(format!("CONNECT: {e}")))
        }
        Protocol::V5 => {
            let props = v5::ConnectProperties {
                session_expiry_interval: Some(
                    u32::try_from(c.session_expiry.as_secs()).unwrap_or(u32::MAX),
                ),
                max_packet_size: Some(c.max_packet_size),
                ..v5::ConnectProperties::new()
            };
            let p = v5::Connect {
                keep_alive: secs_u16(c.keep_alive),
                client_id: c.client_id.to_string(),
                clean_start: false,
                properties: Some(props),
            };
            let will = c.will.map(|(topic, payload)| {
                v5::LastWill::new(topic, payload.clone(), m5::QoS::AtLeastOnce, true, None)
            });
            let login = c
                .credentials
                .map(|(user, pass)| v5::Login::new(user.as_str(), pass.as_str()));
            v5::Packet::Connect(p, will, login)
                .write(out, None)
                .map(drop)
                .map_err(|e| LinkError::Protocol(format!("CONNECT: {e}")))
        }
    }
}

fn v4_publish(pkid: u16, m: &OutPublish) -> v4::Publish {
    let mut p = v4::Publish::from_bytes(&m.topic, v4_qos(m.qos), m.payload.clone());
    p.retain = m.retain;
    p.pkid = if m.qos == QoS::AtMostOnce { 0 } else { pkid };
    p
}

fn v5_publish(pkid: u16, m: &OutPublish) -> v5::Publish {
    let props = mqtt::publish_properties(&m.properties, m.expiry_secs, None, Vec::new());
    let mut publish = v5::Publish::new(
        m.topic.as_str(),
        v5_qos(m.qos),
        m.payload.clone(),
        Some(props),
    );
    publish.retain = m.retain;
    publish.pkid = if m.qos == QoS::AtMostOnce { 0 } else { pkid };
    publish
}

/// PUBLISH with packet id `pkid` (ignored for QoS 0).
pub fn publish(protocol: Protocol, pkid: u16, m: &OutPublish, out: &mut BytesMut) {
    // Encoding into a growable buffer does not fail; size limits are checked by the uplink
    // with [`publish_size`] before a message is handed to the link.
    let _ = match protocol {
        Protocol::V311 => v4_publish(pkid, m).write(out).is_ok(),
        Protocol::V5 => v5::Packet::Publish(v5_publish(pkid, m))
            .write(out, None)
            .is_ok(),
    };
}

/// The size of `m` on the wire as [`publish`] encodes it, fixed header and properties
/// included: what a broker's Maximum Packet Size is compared with.
pub fn publish_size(protocol: Protocol, m: &OutPublish) -> usize {
    match protocol {
        Protocol::V311 => v4_publish(1, m).size(),
        Protocol::V5 => v5_publish(1, m).size(),
    }
}

/// PUBACK for a received QoS 1 message.
pub fn puback(protocol: Protocol, pkid: u16, out: &mut BytesMut) {
    let _ = match protocol {
        Protocol::V311 => v4::PubAck::new(pkid).write(out).is_ok(),
        Protocol::V5 => v5::Packet::PubAck(v5::PubAck::new(pkid, None))
            .write(out, None)
            .is_ok(),
    };
}

/// SUBSCRIBE to `filters` (QoS 0 or 1). Retained messages are sent on every subscribe, also
/// for a subscription the session already had (v5 Retain Handling 0; a 3.1.1 broker always
/// does), so every connect brings the current state; on v5 live messages keep their retain
/// flag (Retain As Published). A 3.1.1 broker clears it on live delivery.
pub fn subscribe(protocol: Protocol, pkid: u16, filters: &[(String, u8)], out: &mut BytesMut) {
    let qos_of = |q: u8| {
        if q == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        }
    };
    let _ = match protocol {
        Protocol::V311 => {
            let mut s = v4::Subscribe::new_many(
                filters
                    .iter()
                    .map(|(f, q)| v4::SubscribeFilter::new(f.clone(), v4_qos(qos_of(*q)))),
            );
            s.pkid = pkid;
            s.write(out).is_ok()
        }
        Protocol::V5 => {
            let mut s = v5::Subscribe::new_many(
                filters.iter().map(|(f, q)| {
                    let mut filter = v5::Filter::new(f.clone(), v5_qos(qos_of(*q)));
                    filter.retain_forward_rule = v5::RetainForwardRule::OnEverySubscribe;
                    filter.preserve_retain = true;
                    filter
                }),
                None,
            );
            s.pkid = pkid;
            v5::Packet::Subscribe(s).write(out, None).is_ok()
        }
    };
}

pub fn pingreq(protocol: Protocol, out: &mut BytesMut) {
    let _ = match protocol {
        Protocol::V311 => v4::PingReq.write(out).is_ok(),
        Protocol::V5 => v5::Packet::PingReq(v5::PingReq).write(out, None).is_ok(),
    };
}

/// A normal DISCONNECT: the session stays and the will is not sent.
pub fn disconnect(protocol: Protocol, out: &mut BytesMut) {
    let _ = match protocol {
        Protocol::V311 => v4::Disconnect.write(out).is_ok(),
        Protocol::V5 => v5::Packet::Disconnect(v5::Disconnect::new(
            v5::DisconnectReasonCode::NormalDisconnection,
        ))
        .write(out, None)
        .is_ok(),
    };
}

/// The next complete packet in `buf` (consumed), `Ok(None)` if more bytes are needed.
pub fn decode(
    protocol: Protocol,
    buf: &mut BytesMut,
    max_size: u32,
) -> Result<Option<Incoming>, String> {
    match protocol {
        Protocol::V311 => match v4::Packet::read(buf, max_size as usize) {
            Ok(p) => Ok(Some(from_v4(p))),
            Err(m4::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(format!("malformed packet from the broker: {e:?}")),
        },
        Protocol::V5 => match v5::Packet::read(buf, Some(max_size)) {
            Ok(p) => Ok(Some(from_v5(p))),
            Err(m5::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(format!("malformed packet from the broker: {e:?}")),
        },
    }
}

fn from_v4(p: v4::Packet) -> Incoming {
    match p {
        v4::Packet::ConnAck(c) => Incoming::ConnAck {
            session_present: c.session_present,
            refused: (c.code != v4::ConnectReturnCode::Success)
                .then(|| format!("connection refused: {:?}", c.code)),
            receive_maximum: None,
            max_packet_size: None,
        },
        v4::Packet::PubAck(a) => Incoming::PubAck {
            pkid: a.pkid,
            refused: None,
        },
        v4::Packet::Publish(p) => {
            let qos = mqtt::qos_from_v4(p.qos);
            Incoming::Publish {
                pkid: p.pkid,
                message: Box::new(Message {
                    topic: p.topic,
                    payload: p.payload,
                    qos,
                    retain: p.retain,
                    properties: Properties::default(),
                    accepted: Stamp::now(),
                    deadline: None,
                }),
            }
        }
        v4::Packet::SubAck(s) => Incoming::SubAck { pkid: s.pkid },
        v4::Packet::PingResp => Incoming::PingResp,
        v4::Packet::Disconnect => Incoming::Disconnect {
            code: None,
            name: "DISCONNECT".into(),
        },
        v4::Packet::Connect(_) => Incoming::Unexpected("CONNECT"),
        v4::Packet::PubRec(_) => Incoming::Unexpected("PUBREC"),
        v4::Packet::PubRel(_) => Incoming::Unexpected("PUBREL"),
        v4::Packet::PubComp(_) => Incoming::Unexpected("PUBCOMP"),
        v4::Packet::Subscribe(_) => Incoming::Unexpected("SUBSCRIBE"),
        v4::Packet::Unsubscribe(_) => Incoming::Unexpected("UNSUBSCRIBE"),
        v4::Packet::UnsubAck(_) => Incoming::Unexpected("UNSUBACK"),
        v4::Packet::PingReq => Incoming::Unexpected("PINGREQ"),
    }
}

fn from_v5(p: v5::Packet) -> Incoming {
    match p {
        v5::Packet::ConnAck(c) => Incoming::ConnAck {
            session_present: c.session_present,
            refused: (c.code != v5::ConnectReturnCode::Success)
                .then(|| format!("connection refused: {:?}", c.code)),
            receive_maximum: c.properties.as_ref().and_then(|p| p.receive_max),
            max_packet_size: c.properties.as_ref().and_then(|p| p.max_packet_size),
        },
        v5::Packet::PubAck(a) => Incoming::PubAck {
            pkid: a.pkid,
            refused: match a.reason {
                v5::PubAckReason::Success | v5::PubAckReason::NoMatchingSubscribers => None,
                other => Some(format!("{other:?}")),
            },
        },
        v5::Packet::Publish(p) => {
            let qos = mqtt::qos_from_v5(p.qos);
            let accepted = Stamp::now();
            let props = p.properties.unwrap_or_default();
            let deadline = props
                .message_expiry_interval
                .map(|s| accepted.plus(Duration::from_secs(u64::from(s))));
            Incoming::Publish {
                pkid: p.pkid,
                message: Box::new(Message {
                    topic: String::from_utf8_lossy(&p.topic).into_owned(),
                    payload: p.payload,
                    qos,
                    retain: p.retain,
                    properties: mqtt::properties_from_v5(props),
                    accepted,
                    deadline,
                }),
            }
        }
        v5::Packet::SubAck(s) => Incoming::SubAck { pkid: s.pkid },
        v5::Packet::PingResp(_) => Incoming::PingResp,
        v5::Packet::Disconnect(d) => Incoming::Disconnect {
            code: Some(d.reason_code as u8),
            name: format!("{:?} ({:#04x})", d.reason_code, d.reason_code as u8),
        },
        v5::Packet::Auth(_) => Incoming::Unexpected("AUTH"),
        v5::Packet::Connect(..) => Incoming::Unexpected("CONNECT"),
        v5::Packet::PubRec(_) => Incoming::Unexpected("PUBREC"),
        v5::Packet::PubRel(_) => Incoming::Unexpected("PUBREL"),
        v5::Packet::PubComp(_) => Incoming::Unexpected("PUBCOMP"),
        v5::Packet::Subscribe(_) => Incoming::Unexpected("SUBSCRIBE"),
        v5::Packet::Unsubscribe(_) => Incoming::Unexpected("UNSUBSCRIBE"),
        v5::Packet::UnsubAck(_) => Incoming::Unexpected("UNSUBACK"),
        v5::Packet::PingReq(_) => Incoming::Unexpected("PINGREQ"),
    }
}

#[cfg(test)]
mod tests {
    //! Round trips against the local broker's codec, which checks what a server must refuse:
    //! what the uplink sends is what a strict broker reads, and what a broker sends is what
    //! the uplink reads.
    use super::*;
    use crate::broker::codec::{self, Inbound, Outbound};

    const BOTH: [Protocol; 2] = [Protocol::V311, Protocol::V5];

    #[test]
    fn connect_keeps_the_session_and_carries_will_and_credentials() {
        let credentials = ("relay".to_string(), "secret".to_string());
        let will = (
            "trains/T1/status".to_string(),
            Bytes::from_static(b"offline"),
        );
        for protocol in BOTH {
            let mut buf = BytesMut::new();
            let spec = ConnectSpec {
                client_id: "trainrelay-T1",
                keep_alive: Duration::from_secs(15),
                session_expiry: Duration::from_secs(86_400),
                max_packet_size: 1 << 20,
                credentials: Some(&credentials),
                will: Some(&will),
            };
            connect(protocol, &spec, &mut buf).unwrap();
            let c = codec::decode_connect(&mut buf, protocol, 1 << 20)
                .unwrap()
                .expect("a whole CONNECT");
            assert_eq!(c.client_id, "trainrelay-T1");
            assert!(!c.clean_start);
            assert_eq!(c.keep_alive, 15);
            assert_eq!(c.username.as_deref(), Some("relay"));
            assert_eq!(c.password.as_deref(), Some(&b"secret"[..]));
            let w = c.will.expect("will");
            assert_eq!(
                (w.topic.as_str(), &w.payload[..]),
                ("trains/T1/status", &b"offline"[..])
            );
            assert!(w.retain);
            assert_eq!(w.qos, QoS::AtLeastOnce);
            if protocol == Protocol::V5 {
                assert_eq!(c.session_expiry, 86_400);
                assert_eq!(c.max_packet_size, Some(1 << 20));
            }
        }
    }

    #[test]
    fn publish_carries_remaining_expiry_and_user_properties_on_v5() {
        for protocol in BOTH {
            let m = OutPublish {
                topic: "trains/T1/up/x".into(),
                payload: Bytes::from_static(b"hello"),
                qos: QoS::AtLeastOnce,
                retain: true,
                properties: Properties {
                    user_properties: vec![("trainrelay-msg-id".into(), "e-7".into())],
                    ..Properties::default()
                },
                expiry_secs: Some(42),
            };
            let mut buf = BytesMut::new();
            publish(protocol, 9, &m, &mut buf);
            // Half a packet is not a packet yet.
            let mut half = BytesMut::from(&buf[..buf.len() / 2]);
            assert!(codec::decode(&mut half, protocol, 1 << 20)
                .unwrap()
                .is_none());
            let Some(Inbound::Publish(p)) = codec::decode(&mut buf, protocol, 1 << 20).unwrap()
            else {
                panic!("expected a PUBLISH");
            };
            assert_eq!(
                (p.topic.as_str(), &p.payload[..]),
                ("trains/T1/up/x", &b"hello"[..])
            );
            assert_eq!((p.pkid, p.qos, p.retain), (9, QoS::AtLeastOnce, true));
            if protocol == Protocol::V5 {
                assert_eq!(p.expiry, Some(42));
                assert_eq!(
                    p.properties.user_properties,
                    vec![("trainrelay-msg-id".to_string(), "e-7".to_string())]
                );
            } else {
                assert_eq!(p.expiry, None);
            }
        }
    }

    #[test]
    fn publish_size_is_the_encoded_size_with_properties() {
        for protocol in BOTH {
            let m = OutPublish {
                topic: "trains/T1/up/x".into(),
                payload: Bytes::from(vec![7u8; 300]),
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: Properties {
                    user_properties: vec![("trainrelay-msg-id".into(), "e-7".into())],
                    content_type: Some("application/json".into()),
                    ..Properties::default()
                },
                expiry_secs: Some(42),
            };
            let mut buf = BytesMut::new();
            publish(protocol, 9, &m, &mut buf);
            assert_eq!(publish_size(protocol, &m), buf.len(), "{protocol:?}");
        }
    }

    #[test]
    fn acks_from_the_broker_say_whether_it_took_the_message() {
        for protocol in BOTH {
            let mut buf = BytesMut::new();
            for (pkid, reason) in [(1, 0x00), (2, 0x10), (3, 0x97)] {
                let ack = Outbound::PubAck { pkid, reason };
                codec::encode(&ack, protocol, &mut buf, 1 << 20).unwrap();
            }
            let mut got = Vec::new();
            while let Some(p) = decode(protocol, &mut buf, 1 << 20).unwrap() {
                let Incoming::PubAck { pkid, refused } = p else {
                    panic!("expected PUBACK, got {p:?}");
                };
                got.push((pkid, refused.is_some()));
            }
            // 0x10 (no matching subscribers) is a success; 3.1.1 has no reason codes.
            let refused_3 = protocol == Protocol::V5;
            assert_eq!(got, vec![(1, false), (2, false), (3, refused_3)]);
        }
    }

    #[test]
    fn garbage_from_the_broker_is_an_error_not_a_panic() {
        for protocol in BOTH {
            let mut buf = BytesMut::from(&[0xF0u8, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F][..]);
            assert!(decode(protocol, &mut buf, 1 << 20).is_err());
        }
    }
}
