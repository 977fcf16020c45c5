//! MQTT 3.1.1 packets after CONNECT: rumqttc's v4 codec, and the conversions between its
//! packets and the broker's model. 3.1.1 has no properties and no reason codes beyond
//! CONNACK's and SUBACK's; a server DISCONNECT has no form and is not written.

use bytes::BytesMut;
use rumqttc::mqttbytes::v4;

use super::{
    from_v4_error, nonzero, DecodeError, EncodeError, InPublish, Inbound, Outbound, SubRequest,
};
use crate::message::Properties;
use crate::mqtt;

/// Reads the complete packet at the start of `buf` (its frame is already checked).
pub(super) fn decode(buf: &mut BytesMut, max_size: u32) -> Result<Inbound, DecodeError> {
    let packet = v4::Packet::read(buf, max_size as usize).map_err(from_v4_error)?;
    from_v4(packet)
}

/// Writes `packet`; the error is the codec's (a packet over `max_size` among them).
pub(super) fn encode(
    packet: &Outbound,
    buf: &mut BytesMut,
    max_size: u32,
) -> Result<(), EncodeError> {
    let Some(p) = to_v4(packet) else {
        return Ok(());
    };
    p.write(buf, max_size as usize)
        .map(|_| ())
        .map_err(|e| match e {
            rumqttc::mqttbytes::Error::OutgoingPacketTooLarge { .. } => EncodeError::TooLarge,
            e => EncodeError::Other(e.to_string()),
        })
}

fn from_v4(p: v4::Packet) -> Result<Inbound, DecodeError> {
    Ok(match p {
        v4::Packet::Publish(p) => Inbound::Publish(InPublish {
            qos: mqtt::qos_from_v4(p.qos),
            retain: p.retain,
            topic: p.topic,
            pkid: p.pkid,
            payload: p.payload,
            properties: Properties::default(),
            expiry: None,
            topic_alias: None,
        }),
        v4::Packet::PubAck(a) => Inbound::PubAck(nonzero(a.pkid)?),
        v4::Packet::PubRec(a) => Inbound::PubRec {
            pkid: nonzero(a.pkid)?,
            failed: false,
        },
        v4::Packet::PubRel(a) => Inbound::PubRel(nonzero(a.pkid)?),
        v4::Packet::PubComp(a) => Inbound::PubComp(nonzero(a.pkid)?),
        v4::Packet::Subscribe(s) => Inbound::Subscribe {
            pkid: nonzero(s.pkid)?,
            filters: s
                .filters
                .into_iter()
                .map(|f| SubRequest {
                    filter: f.path,
                    qos: mqtt::qos_from_v4(f.qos),
                    no_local: false,
                    retain_as_published: false,
                    retain_handling: 0,
                })
                .collect(),
            sub_id: None,
        },
        v4::Packet::Unsubscribe(u) => {
            if u.topics.is_empty() {
                return Err(DecodeError::Protocol(
                    "UNSUBSCRIBE without a topic filter".into(),
                ));
            }
            Inbound::Unsubscribe {
                pkid: nonzero(u.pkid)?,
                filters: u.topics,
            }
        }
        v4::Packet::PingReq => Inbound::PingReq,
        v4::Packet::Disconnect => Inbound::Disconnect {
            reason: 0,
            session_expiry: None,
        },
        v4::Packet::Connect(_) => return Err(DecodeError::Protocol("second CONNECT".into())),
        v4::Packet::ConnAck(_) => Inbound::ServerOnly("CONNACK"),
        v4::Packet::SubAck(_) => Inbound::ServerOnly("SUBACK"),
        v4::Packet::UnsubAck(_) => Inbound::ServerOnly("UNSUBACK"),
        v4::Packet::PingResp => Inbound::ServerOnly("PINGRESP"),
    })
}

/// `None` for packets 3.1.1 has no form for (DISCONNECT from a server).
fn to_v4(p: &Outbound) -> Option<v4::Packet> {
    Some(match p {
        Outbound::ConnAck {
            session_present,
            code,
            ..
        } => v4::Packet::ConnAck(v4::ConnAck {
            session_present: *session_present,
            code: match code {
                0 => v4::ConnectReturnCode::Success,
                1 => v4::ConnectReturnCode::RefusedProtocolVersion,
                2 => v4::ConnectReturnCode::BadClientId,
                3 => v4::ConnectReturnCode::ServiceUnavailable,
                4 => v4::ConnectReturnCode::BadUserNamePassword,
                _ => v4::ConnectReturnCode::NotAuthorized,
            },
        }),
        Outbound::Publish(p) => v4::Packet::Publish(v4::Publish {
            dup: p.dup,
            qos: mqtt::qos_to_v4(p.qos),
            retain: p.retain,
            topic: p.topic.clone(),
            pkid: p.pkid,
            payload: p.payload.clone(),
        }),
        Outbound::PubAck { pkid, .. } => v4::Packet::PubAck(v4::PubAck::new(*pkid)),
        Outbound::PubRec { pkid, .. } => v4::Packet::PubRec(v4::PubRec::new(*pkid)),
        Outbound::PubRel { pkid } => v4::Packet::PubRel(v4::PubRel::new(*pkid)),
        Outbound::PubComp { pkid, .. } => v4::Packet::PubComp(v4::PubComp::new(*pkid)),
        Outbound::SubAck { pkid, codes } => v4::Packet::SubAck(v4::SubAck::new(
            *pkid,
            codes
                .iter()
                .map(|c| match c {
                    0 => v4::SubscribeReasonCode::Success(rumqttc::mqttbytes::QoS::AtMostOnce),
                    1 => v4::SubscribeReasonCode::Success(rumqttc::mqttbytes::QoS::AtLeastOnce),
                    2 => v4::SubscribeReasonCode::Success(rumqttc::mqttbytes::QoS::ExactlyOnce),
                    _ => v4::SubscribeReasonCode::Failure,
                })
                .collect(),
        )),
        Outbound::UnsubAck { pkid, .. } => v4::Packet::UnsubAck(v4::UnsubAck::new(*pkid)),
        Outbound::PingResp => v4::Packet::PingResp,
        Outbound::Disconnect { .. } => return None,
    })
}
