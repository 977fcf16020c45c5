//! The local broker's wire edge: frames bytes into packets with rumqttc's codecs (v4 for MQTT 3.1.1, v5 for
//! MQTT 5) and converts them to and from one protocol-independent model.
//!
//! rumqttc's codec is written for a client and is lax about what a server must refuse, so every
//! frame is checked here before and after it is handed to the codec:
//! - the fixed header (reserved flag bits, QoS 3, packet type 0/15) and the declared remaining
//!   length are checked on the raw bytes, so an oversize packet is refused before it is buffered;
//! - CONNECT's protocol name, level and reserved flag bit are read from the bytes, because the
//!   codec must be chosen from them;
//! - topic names are checked for UTF-8 and wildcards, packet ids for zero, subscribe lists for
//!   emptiness, and subscription options for reserved bits;
//! - a v5 DISCONNECT with no body is valid but rumqttc refuses it, so it is handled here.
//!
//! [`frame`] reads fixed headers and checks raw bytes, [`connect`] reads the CONNECT (which
//! picks the version), [`v4`] and [`v5`] convert the packets of each version after CONNECT;
//! this module holds the protocol-independent model and the entry points.

mod connect;
mod frame;
#[cfg(test)]
mod tests;
mod v4;
mod v5;

use bytes::{Buf, Bytes, BytesMut};

pub use self::connect::{connect_level, decode_connect};
pub use self::frame::peek_frame;
use crate::message::{Properties, QoS};
pub use crate::mqtt::Protocol;

/// A CONNECT, as the broker needs it.
#[derive(Debug, Clone)]
pub struct ConnectPacket {
    pub protocol: Protocol,
    pub clean_start: bool,
    pub keep_alive: u16,
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<Bytes>,
    pub will: Option<WillSpec>,
    /// v5 Session Expiry Interval (0 when absent, and always for 3.1.1).
    pub session_expiry: u32,
    /// Client's Receive Maximum (65535 when absent).
    pub receive_maximum: u16,
    /// Client's Maximum Packet Size, if it set one.
    pub max_packet_size: Option<u32>,
    /// Topic aliases the client accepts from us (v5 Topic Alias Maximum; 0 when absent).
    pub topic_alias_max: u16,
    /// v5 enhanced authentication requested (which we do not offer).
    pub auth_method: Option<String>,
}

/// The will of a CONNECT.
#[derive(Debug, Clone)]
pub struct WillSpec {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub delay: u32,
    pub expiry: Option<u32>,
    pub properties: Properties,
}

/// An inbound PUBLISH; `topic` may be empty when a topic alias stands for it.
#[derive(Debug, Clone)]
pub struct InPublish {
    pub qos: QoS,
    pub retain: bool,
    pub topic: String,
    pub pkid: u16,
    pub payload: Bytes,
    pub properties: Properties,
    pub expiry: Option<u32>,
    pub topic_alias: Option<u16>,
}

/// One entry of a SUBSCRIBE.
#[derive(Debug, Clone)]
pub struct SubRequest {
    pub filter: String,
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: u8,
}

/// Packets a client may send, after validation.
#[derive(Debug, Clone)]
pub enum Inbound {
    Publish(InPublish),
    PubAck(u16),
    PubRec {
        pkid: u16,
        failed: bool,
    },
    PubRel(u16),
    PubComp(u16),
    Subscribe {
        pkid: u16,
        filters: Vec<SubRequest>,
        sub_id: Option<usize>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    Disconnect {
        reason: u8,
        session_expiry: Option<u32>,
    },
    Auth,
    /// A packet only a server may send (CONNACK, SUBACK, ...): a protocol error from a client.
    ServerOnly(&'static str),
}

/// A PUBLISH to a client.
#[derive(Debug, Clone)]
pub struct OutPublish {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    pub topic: String,
    pub pkid: u16,
    pub payload: Bytes,
    pub properties: Properties,
    pub expiry: Option<u32>,
    pub sub_ids: Vec<usize>,
    /// v5 Topic Alias to send; with an empty `topic`, the alias stands for a topic the client
    /// already knows.
    pub topic_alias: Option<u16>,
}

/// What the broker sends to a client.
#[derive(Debug, Clone)]
pub enum Outbound {
    ConnAck {
        session_present: bool,
        code: u8,
        props: Box<Option<rumqttc::v5::mqttbytes::v5::ConnAckProperties>>,
    },
    Publish(OutPublish),
    PubAck {
        pkid: u16,
        reason: u8,
    },
    PubRec {
        pkid: u16,
        reason: u8,
    },
    PubRel {
        pkid: u16,
    },
    PubComp {
        pkid: u16,
        reason: u8,
    },
    SubAck {
        pkid: u16,
        codes: Vec<u8>,
    },
    UnsubAck {
        pkid: u16,
        codes: Vec<u8>,
    },
    PingResp,
    Disconnect {
        reason: u8,
    },
}

/// Why a frame was refused; each maps to a v5 DISCONNECT / CONNACK reason code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// 0x81
    Malformed(String),
    /// 0x82
    Protocol(String),
    /// 0x95: declared remaining length.
    TooLarge(usize),
    /// CONNECT with a protocol name or level we do not speak.
    UnsupportedProtocol { level: u8 },
}

impl DecodeError {
    /// The v5 reason code for a DISCONNECT caused by this error.
    pub fn reason_code(&self) -> u8 {
        match self {
            DecodeError::Malformed(_) => 0x81,
            DecodeError::Protocol(_) => 0x82,
            DecodeError::TooLarge(_) => 0x95,
            DecodeError::UnsupportedProtocol { .. } => 0x84,
        }
    }
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Malformed(s) => write!(f, "malformed packet: {s}"),
            DecodeError::Protocol(s) => write!(f, "protocol error: {s}"),
            DecodeError::TooLarge(n) => write!(f, "packet of {n} bytes exceeds the maximum"),
            DecodeError::UnsupportedProtocol { level } => {
                write!(f, "unsupported protocol level {level}")
            }
        }
    }
}

pub(super) fn malformed(s: impl Into<String>) -> DecodeError {
    DecodeError::Malformed(s.into())
}

/// What the 3.1.1 codec refused, as the broker reports it.
pub(super) fn from_v4_error(e: rumqttc::mqttbytes::Error) -> DecodeError {
    use rumqttc::mqttbytes::Error as E;
    match e {
        E::TopicNotUtf8 => malformed("string is not valid UTF-8 (topic)"),
        E::PacketIdZero => malformed("packet identifier 0"),
        E::EmptySubscription => no_filter(),
        e => DecodeError::Malformed(e.to_string()),
    }
}

/// What the MQTT 5 codec refused, as the broker reports it.
pub(super) fn from_v5_error(e: rumqttc::v5::mqttbytes::Error) -> DecodeError {
    use rumqttc::v5::mqttbytes::Error as E;
    match e {
        E::TopicNotUtf8 => malformed("string is not valid UTF-8 (topic)"),
        E::PayloadNotUtf8(e) => malformed(format!("string is not valid UTF-8 ({e})")),
        E::PacketIdZero => malformed("packet identifier 0"),
        E::EmptySubscription => no_filter(),
        e => DecodeError::Malformed(e.to_string()),
    }
}

fn no_filter() -> DecodeError {
    DecodeError::Protocol("SUBSCRIBE/UNSUBSCRIBE without a topic filter".into())
}

pub(super) fn nonzero(pkid: u16) -> Result<u16, DecodeError> {
    if pkid == 0 {
        Err(malformed("packet identifier 0"))
    } else {
        Ok(pkid)
    }
}

/// Decodes the next packet after CONNECT; `Ok(None)` if more bytes are needed.
pub fn decode(
    buf: &mut BytesMut,
    protocol: Protocol,
    max_size: u32,
) -> Result<Option<Inbound>, DecodeError> {
    let Some(h) = frame::peek_header(buf)? else {
        return Ok(None);
    };
    if h.remaining.saturating_add(h.header_len) > max_size as usize {
        return Err(DecodeError::TooLarge(h.remaining + h.header_len));
    }
    if buf.len() < h.header_len + h.remaining {
        return Ok(None);
    }
    frame::check_flags(h.byte1, protocol)?;
    let kind = h.byte1 >> 4;
    if kind == 1 {
        return Err(DecodeError::Protocol("second CONNECT".into()));
    }
    // Zero-length bodies rumqttc does not accept for a server's side of the protocol.
    if h.remaining == 0 {
        buf.advance(h.header_len);
        return match kind {
            12 => Ok(Some(Inbound::PingReq)),
            14 => Ok(Some(Inbound::Disconnect {
                reason: 0,
                session_expiry: None,
            })),
            13 => Ok(Some(Inbound::ServerOnly("PINGRESP"))),
            15 => Ok(Some(Inbound::Auth)),
            _ => Err(malformed(format!("packet type {kind} with empty body"))),
        };
    }
    // The options byte of each SUBSCRIBE entry has reserved bits (6 in 3.1.1, 2 in MQTT 5);
    // rumqttc ignores them.
    if kind == 8 {
        frame::check_subscribe_options(
            buf.get(h.header_len..h.header_len + h.remaining),
            protocol,
        )?;
    }
    if protocol == Protocol::V311 && kind == 14 {
        return Err(malformed("3.1.1 DISCONNECT with a body"));
    }
    match protocol {
        Protocol::V311 => v4::decode(buf, max_size).map(Some),
        Protocol::V5 => {
            if kind == 15 {
                buf.advance(h.header_len + h.remaining);
                return Ok(Some(Inbound::Auth));
            }
            v5::decode(buf, max_size).map(Some)
        }
    }
}

/// Why a packet could not be encoded.
#[derive(Debug)]
pub enum EncodeError {
    /// Larger than the client's Maximum Packet Size.
    TooLarge,
    Other(String),
}

impl std::fmt::Display for EncodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EncodeError::TooLarge => {
                write!(f, "packet larger than the client's Maximum Packet Size")
            }
            EncodeError::Other(e) => write!(f, "{e}"),
        }
    }
}

/// Encodes `packet` for a client speaking `protocol`; refuses it if it would exceed `max_size`.
pub fn encode(
    packet: &Outbound,
    protocol: Protocol,
    buf: &mut BytesMut,
    max_size: u32,
) -> Result<(), EncodeError> {
    match protocol {
        Protocol::V311 => v4::encode(packet, buf, max_size),
        Protocol::V5 => v5::encode(packet, buf, max_size),
    }
}
