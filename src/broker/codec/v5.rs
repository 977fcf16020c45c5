//! MQTT 5 packets after CONNECT: rumqttc's v5 codec, and the conversions between its packets
//! and the broker's model, reason codes and properties included. A DISCONNECT from the server
//! is written here by hand (rumqttc miscounts its length).

use bytes::{Bytes, BytesMut};
use rumqttc::v5::mqttbytes::v5;

use super::{
    from_v5_error, malformed, nonzero, DecodeError, EncodeError, InPublish, Inbound, Outbound,
    SubRequest,
};
use crate::mqtt;

/// Reads the complete packet at the start of `buf` (its frame is already checked).
pub(super) fn decode(buf: &mut BytesMut, max_size: u32) -> Result<Inbound, DecodeError> {
    let packet = v5::Packet::read(buf, Some(max_size)).map_err(from_v5_error)?;
    from_v5(packet)
}

/// Writes `packet`; the error is the codec's (a packet over `max_size` among them).
pub(super) fn encode(
    packet: &Outbound,
    buf: &mut BytesMut,
    max_size: u32,
) -> Result<(), EncodeError> {
    if let Outbound::Disconnect { reason } = packet {
        // rumqttc declares a remaining length of 1 but writes 2 bytes for a DISCONNECT with a
        // reason code and no properties; write it here instead.
        buf.extend_from_slice(&[0xE0, 0x02, *reason, 0x00]);
        return Ok(());
    }
    to_v5(packet)
        .write(buf, Some(max_size))
        .map(|_| ())
        .map_err(|e| match e {
            rumqttc::v5::mqttbytes::Error::OutgoingPacketTooLarge { .. } => EncodeError::TooLarge,
            e => EncodeError::Other(e.to_string()),
        })
}

fn from_v5(p: v5::Packet) -> Result<Inbound, DecodeError> {
    Ok(match p {
        v5::Packet::Publish(p) => {
            let topic = String::from_utf8(p.topic.to_vec())
                .map_err(|_| malformed("topic name is not UTF-8"))?;
            let props = p.properties.unwrap_or_default();
            if !props.subscription_identifiers.is_empty() {
                return Err(DecodeError::Protocol(
                    "PUBLISH from a client carries a Subscription Identifier".into(),
                ));
            }
            Inbound::Publish(InPublish {
                qos: mqtt::qos_from_v5(p.qos),
                retain: p.retain,
                topic,
                pkid: p.pkid,
                payload: p.payload,
                expiry: props.message_expiry_interval,
                topic_alias: props.topic_alias,
                properties: mqtt::properties_from_v5(props),
            })
        }
        v5::Packet::PubAck(a) => Inbound::PubAck(nonzero(a.pkid)?),
        v5::Packet::PubRec(a) => Inbound::PubRec {
            pkid: nonzero(a.pkid)?,
            failed: !matches!(
                a.reason,
                v5::PubRecReason::Success | v5::PubRecReason::NoMatchingSubscribers
            ),
        },
        v5::Packet::PubRel(a) => Inbound::PubRel(nonzero(a.pkid)?),
        v5::Packet::PubComp(a) => Inbound::PubComp(nonzero(a.pkid)?),
        v5::Packet::Subscribe(s) => {
            let sub_id = s.properties.and_then(|p| p.id);
            if sub_id == Some(0) {
                return Err(DecodeError::Protocol("Subscription Identifier 0".into()));
            }
            Inbound::Subscribe {
                pkid: nonzero(s.pkid)?,
                filters: s
                    .filters
                    .into_iter()
                    .map(|f| SubRequest {
                        filter: f.path,
                        qos: mqtt::qos_from_v5(f.qos),
                        no_local: f.nolocal,
                        retain_as_published: f.preserve_retain,
                        retain_handling: match f.retain_forward_rule {
                            v5::RetainForwardRule::OnEverySubscribe => 0,
                            v5::RetainForwardRule::OnNewSubscribe => 1,
                            v5::RetainForwardRule::Never => 2,
                        },
                    })
                    .collect(),
                sub_id,
            }
        }
        v5::Packet::Unsubscribe(u) => {
            if u.filters.is_empty() {
                return Err(DecodeError::Protocol(
                    "UNSUBSCRIBE without a topic filter".into(),
                ));
            }
            Inbound::Unsubscribe {
                pkid: nonzero(u.pkid)?,
                filters: u.filters,
            }
        }
        v5::Packet::PingReq(_) => Inbound::PingReq,
        v5::Packet::Disconnect(d) => Inbound::Disconnect {
            reason: d.reason_code as u8,
            session_expiry: d.properties.and_then(|p| p.session_expiry_interval),
        },
        v5::Packet::Auth(_) => Inbound::Auth,
        v5::Packet::Connect(..) => return Err(DecodeError::Protocol("second CONNECT".into())),
        v5::Packet::ConnAck(_) => Inbound::ServerOnly("CONNACK"),
        v5::Packet::SubAck(_) => Inbound::ServerOnly("SUBACK"),
        v5::Packet::UnsubAck(_) => Inbound::ServerOnly("UNSUBACK"),
        v5::Packet::PingResp(_) => Inbound::ServerOnly("PINGRESP"),
    })
}

fn to_v5(p: &Outbound) -> v5::Packet {
    match p {
        Outbound::ConnAck {
            session_present,
            code,
            props,
        } => v5::Packet::ConnAck(v5::ConnAck {
            session_present: *session_present,
            code: connack_code(*code),
            properties: (**props).clone(),
        }),
        Outbound::Publish(p) => {
            let props =
                mqtt::publish_properties(&p.properties, p.expiry, p.topic_alias, p.sub_ids.clone());
            let empty = props == v5::PublishProperties::default();
            v5::Packet::Publish(v5::Publish {
                dup: p.dup,
                qos: mqtt::qos_to_v5(p.qos),
                retain: p.retain,
                topic: Bytes::from(p.topic.clone()),
                pkid: p.pkid,
                payload: p.payload.clone(),
                properties: (!empty).then_some(props),
            })
        }
        Outbound::PubAck { pkid, reason } => v5::Packet::PubAck(v5::PubAck {
            pkid: *pkid,
            reason: match reason {
                0 => v5::PubAckReason::Success,
                0x10 => v5::PubAckReason::NoMatchingSubscribers,
                0x83 => v5::PubAckReason::ImplementationSpecificError,
                0x87 => v5::PubAckReason::NotAuthorized,
                0x90 => v5::PubAckReason::TopicNameInvalid,
                0x91 => v5::PubAckReason::PacketIdentifierInUse,
                0x97 => v5::PubAckReason::QuotaExceeded,
                0x99 => v5::PubAckReason::PayloadFormatInvalid,
                _ => v5::PubAckReason::UnspecifiedError,
            },
            properties: None,
        }),
        Outbound::PubRec { pkid, reason } => v5::Packet::PubRec(v5::PubRec {
            pkid: *pkid,
            reason: match reason {
                0 => v5::PubRecReason::Success,
                0x10 => v5::PubRecReason::NoMatchingSubscribers,
                0x83 => v5::PubRecReason::ImplementationSpecificError,
                0x87 => v5::PubRecReason::NotAuthorized,
                0x90 => v5::PubRecReason::TopicNameInvalid,
                0x91 => v5::PubRecReason::PacketIdentifierInUse,
                0x97 => v5::PubRecReason::QuotaExceeded,
                0x99 => v5::PubRecReason::PayloadFormatInvalid,
                _ => v5::PubRecReason::UnspecifiedError,
            },
            properties: None,
        }),
        Outbound::PubRel { pkid } => v5::Packet::PubRel(v5::PubRel::new(*pkid, None)),
        Outbound::PubComp { pkid, reason } => v5::Packet::PubComp(v5::PubComp {
            pkid: *pkid,
            reason: if *reason == 0 {
                v5::PubCompReason::Success
            } else {
                v5::PubCompReason::PacketIdentifierNotFound
            },
            properties: None,
        }),
        Outbound::SubAck { pkid, codes } => v5::Packet::SubAck(v5::SubAck {
            pkid: *pkid,
            return_codes: codes
                .iter()
                .map(|c| match c {
                    0 => v5::SubscribeReasonCode::Success(rumqttc::v5::mqttbytes::QoS::AtMostOnce),
                    1 => v5::SubscribeReasonCode::Success(rumqttc::v5::mqttbytes::QoS::AtLeastOnce),
                    2 => v5::SubscribeReasonCode::Success(rumqttc::v5::mqttbytes::QoS::ExactlyOnce),
                    0x83 => v5::SubscribeReasonCode::ImplementationSpecific,
                    0x87 => v5::SubscribeReasonCode::NotAuthorized,
                    0x8F => v5::SubscribeReasonCode::TopicFilterInvalid,
                    0x91 => v5::SubscribeReasonCode::PkidInUse,
                    0x97 => v5::SubscribeReasonCode::QuotaExceeded,
                    0x9E => v5::SubscribeReasonCode::SharedSubscriptionsNotSupported,
                    0xA1 => v5::SubscribeReasonCode::SubscriptionIdNotSupported,
                    0xA2 => v5::SubscribeReasonCode::WildcardSubscriptionsNotSupported,
                    _ => v5::SubscribeReasonCode::Unspecified,
                })
                .collect(),
            properties: None,
        }),
        Outbound::UnsubAck { pkid, codes } => v5::Packet::UnsubAck(v5::UnsubAck {
            pkid: *pkid,
            reasons: codes
                .iter()
                .map(|c| match c {
                    0 => v5::UnsubAckReason::Success,
                    0x11 => v5::UnsubAckReason::NoSubscriptionExisted,
                    0x83 => v5::UnsubAckReason::ImplementationSpecificError,
                    0x87 => v5::UnsubAckReason::NotAuthorized,
                    0x8F => v5::UnsubAckReason::TopicFilterInvalid,
                    0x91 => v5::UnsubAckReason::PacketIdentifierInUse,
                    _ => v5::UnsubAckReason::UnspecifiedError,
                })
                .collect(),
            properties: None,
        }),
        Outbound::PingResp => v5::Packet::PingResp(v5::PingResp),
        Outbound::Disconnect { reason } => v5::Packet::Disconnect(v5::Disconnect {
            reason_code: v5::DisconnectReasonCode::try_from(*reason)
                .unwrap_or(v5::DisconnectReasonCode::UnspecifiedError),
            properties: None,
        }),
    }
}

/// Maps a v5 CONNACK reason code to rumqttc's enum, avoiding the 3.1.1-only variants that
/// rumqttc's v5 writer cannot encode.
fn connack_code(code: u8) -> v5::ConnectReturnCode {
    use v5::ConnectReturnCode as C;
    match code {
        0 => C::Success,
        0x81 => C::MalformedPacket,
        0x82 => C::ProtocolError,
        0x83 => C::ImplementationSpecificError,
        0x84 => C::UnsupportedProtocolVersion,
        0x85 => C::ClientIdentifierNotValid,
        0x86 => C::BadUserNamePassword,
        0x87 => C::NotAuthorized,
        0x88 => C::ServerUnavailable,
        0x89 => C::ServerBusy,
        0x8A => C::Banned,
        0x8C => C::BadAuthenticationMethod,
        0x90 => C::TopicNameInvalid,
        0x95 => C::PacketTooLarge,
        0x97 => C::QuotaExceeded,
        0x99 => C::PayloadFormatInvalid,
        0x9A => C::RetainNotSupported,
        0x9B => C::QoSNotSupported,
        _ => C::UnspecifiedError,
    }
}
