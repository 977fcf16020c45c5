//! The wire edge: frames bytes into packets with rumqttc's codecs (v4 for MQTT 3.1.1, v5 for
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

use bytes::{Buf, Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

use super::Protocol;
use crate::message::{Properties, QoS};

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
        props: Box<Option<v5::ConnAckProperties>>,
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

fn malformed(s: impl Into<String>) -> DecodeError {
    DecodeError::Malformed(s.into())
}

/// A fixed header read from raw bytes.
struct Header {
    byte1: u8,
    header_len: usize,
    remaining: usize,
}

/// Reads the fixed header; `Ok(None)` if more bytes are needed.
fn peek_header(buf: &[u8]) -> Result<Option<Header>, DecodeError> {
    let Some(&byte1) = buf.first() else {
        return Ok(None);
    };
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some(Header {
                byte1,
                header_len: 2 + i,
                remaining,
            }));
        }
    }
    Err(malformed("remaining length longer than 4 bytes"))
}

/// The first byte and total length of the complete frame at the start of `buf`; `Ok(None)` if
/// the frame is not complete yet. Lets the connection look past PUBLISHes it holds back.
pub fn peek_frame(buf: &[u8], max_size: u32) -> Result<Option<(u8, usize)>, DecodeError> {
    let Some(h) = peek_header(buf)? else {
        return Ok(None);
    };
    let len = h.header_len.saturating_add(h.remaining);
    if len > max_size as usize {
        return Err(DecodeError::TooLarge(len));
    }
    Ok((buf.len() >= len).then_some((h.byte1, len)))
}

/// Checks the fixed header flags the spec reserves (MQTT 3.1.1 §2.2.2, MQTT 5 §2.1.3).
fn check_flags(byte1: u8, protocol: Protocol) -> Result<(), DecodeError> {
    let kind = byte1 >> 4;
    let flags = byte1 & 0x0f;
    let expected = match kind {
        3 => {
            if (flags >> 1) & 0x3 == 3 {
                return Err(malformed("PUBLISH with QoS 3"));
            }
            if flags & 0x8 != 0 && (flags >> 1) & 0x3 == 0 {
                return Err(malformed("PUBLISH with QoS 0 and DUP set"));
            }
            return Ok(());
        }
        6 | 8 | 10 => 0x2,
        1 | 2 | 4 | 5 | 7 | 9 | 11 | 12 | 13 | 14 => 0,
        15 if protocol == Protocol::V5 => 0,
        _ => return Err(malformed(format!("reserved packet type {kind}"))),
    };
    if flags != expected {
        return Err(malformed(format!(
            "packet type {kind} with reserved flags {flags:#x}"
        )));
    }
    Ok(())
}

/// Reads the protocol level of a CONNECT frame (complete or not). `Ok(None)`: need more bytes.
/// Refuses anything that is not a CONNECT.
pub fn connect_level(buf: &[u8], max_size: u32) -> Result<Option<u8>, DecodeError> {
    let Some(h) = peek_header(buf)? else {
        return Ok(None);
    };
    if h.byte1 != 0x10 {
        return Err(DecodeError::Protocol(format!(
            "first packet must be CONNECT, got type {}",
            h.byte1 >> 4
        )));
    }
    if h.remaining > max_size as usize {
        return Err(DecodeError::TooLarge(h.remaining));
    }
    let body = buf.get(h.header_len..).unwrap_or_default();
    let name_len = match body {
        [a, b, ..] => usize::from(u16::from_be_bytes([*a, *b])),
        _ => return Ok(None),
    };
    let Some(name) = body.get(2..2 + name_len) else {
        return Ok(None);
    };
    let Some(&level) = body.get(2 + name_len) else {
        return Ok(None);
    };
    match (name, level) {
        (b"MQTT", 4) | (b"MQTT", 5) => Ok(Some(level)),
        (b"MQTT", l) | (b"MQIsdp", l) => Err(DecodeError::UnsupportedProtocol { level: l }),
        _ => Err(malformed("CONNECT protocol name is not MQTT")),
    }
}

/// Decodes the CONNECT at the start of `buf` once it is complete.
pub fn decode_connect(
    buf: &mut BytesMut,
    protocol: Protocol,
    max_size: u32,
) -> Result<Option<ConnectPacket>, DecodeError> {
    let Some(h) = peek_header(buf)? else {
        return Ok(None);
    };
    if buf.len() < h.header_len + h.remaining {
        return Ok(None);
    }
    // Protocol name (6 bytes) and level (1) precede the flags.
    let flags = buf.get(h.header_len + 7).copied().unwrap_or(0);
    if flags & 0x01 != 0 {
        return Err(malformed("CONNECT reserved flag is set"));
    }
    if (flags >> 3) & 0x3 == 3 {
        return Err(malformed("will QoS 3"));
    }
    if protocol == Protocol::V311 && flags & 0x40 != 0 && flags & 0x80 == 0 {
        return Err(malformed("password without user name"));
    }
    let password_present = flags & 0x40 != 0;
    let username_present = flags & 0x80 != 0;
    // The password is binary data, but rumqttc decodes it as a UTF-8 string: take it out and
    // put ASCII of the same length in its place before handing the frame to the codec.
    let password = if password_present {
        let frame = buf
            .get_mut(h.header_len..h.header_len + h.remaining)
            .ok_or_else(|| malformed("CONNECT truncated"))?;
        Some(take_password(frame, flags, protocol)?)
    } else {
        None
    };
    match protocol {
        Protocol::V311 => match v4::Packet::read(buf, max_size as usize) {
            Ok(v4::Packet::Connect(c)) => {
                let (username, password) = match c.login {
                    Some(l) => (username_present.then_some(l.username), password.clone()),
                    None => (username_present.then(String::new), password.clone()),
                };
                let will = match c.last_will {
                    Some(w) => Some(WillSpec {
                        topic: w.topic,
                        payload: w.message,
                        qos: qos_from_v4(w.qos),
                        retain: w.retain,
                        delay: 0,
                        expiry: None,
                        properties: Properties::default(),
                    }),
                    None => None,
                };
                Ok(Some(ConnectPacket {
                    protocol,
                    clean_start: c.clean_session,
                    keep_alive: c.keep_alive,
                    client_id: c.client_id,
                    username,
                    password,
                    will,
                    session_expiry: 0,
                    receive_maximum: u16::MAX,
                    max_packet_size: None,
                    topic_alias_max: 0,
                    auth_method: None,
                }))
            }
            Ok(_) => Err(DecodeError::Protocol("expected CONNECT".into())),
            Err(e) => Err(map_codec_error(e.to_string())),
        },
        Protocol::V5 => match v5::Packet::read(buf, Some(max_size)) {
            Ok(v5::Packet::Connect(c, will, login)) => {
                let props = c.properties.unwrap_or_default();
                if props.receive_maximum == Some(0) {
                    return Err(DecodeError::Protocol("Receive Maximum 0".into()));
                }
                if props.max_packet_size == Some(0) {
                    return Err(DecodeError::Protocol("Maximum Packet Size 0".into()));
                }
                let (username, password) = match login {
                    Some(l) => (username_present.then_some(l.username), password.clone()),
                    None => (username_present.then(String::new), password.clone()),
                };
                let will = match will {
                    Some(w) => {
                        let topic = String::from_utf8(w.topic.to_vec())
                            .map_err(|_| malformed("will topic is not UTF-8"))?;
                        let (delay, expiry, properties) = match w.properties {
                            Some(wp) => (
                                wp.delay_interval.unwrap_or(0),
                                wp.message_expiry_interval,
                                Properties {
                                    payload_format_indicator: wp.payload_format_indicator,
                                    content_type: wp.content_type,
                                    response_topic: wp.response_topic,
                                    correlation_data: wp.correlation_data,
                                    user_properties: wp.user_properties,
                                },
                            ),
                            None => (0, None, Properties::default()),
                        };
                        Some(WillSpec {
                            topic,
                            payload: w.message,
                            qos: qos_from_v5(w.qos),
                            retain: w.retain,
                            delay,
                            expiry,
                            properties,
                        })
                    }
                    None => None,
                };
                Ok(Some(ConnectPacket {
                    protocol,
                    clean_start: c.clean_start,
                    keep_alive: c.keep_alive,
                    client_id: c.client_id,
                    username,
                    password,
                    will,
                    session_expiry: props.session_expiry_interval.unwrap_or(0),
                    receive_maximum: props.receive_maximum.unwrap_or(u16::MAX),
                    max_packet_size: props.max_packet_size,
                    topic_alias_max: props.topic_alias_max.unwrap_or(0),
                    auth_method: props.authentication_method,
                }))
            }
            Ok(_) => Err(DecodeError::Protocol("expected CONNECT".into())),
            Err(e) => Err(map_codec_error(e.to_string())),
        },
    }
}

/// Finds the password field of a CONNECT body (variable header and payload), returns its
/// bytes and overwrites them with `x`.
fn take_password(frame: &mut [u8], flags: u8, protocol: Protocol) -> Result<Bytes, DecodeError> {
    let truncated = || malformed("CONNECT truncated");
    let u16_at = |f: &[u8], at: usize| -> Result<usize, DecodeError> {
        match f.get(at..at + 2) {
            Some([a, b]) => Ok(usize::from(u16::from_be_bytes([*a, *b]))),
            _ => Err(truncated()),
        }
    };
    let varint_at = |f: &[u8], at: usize| -> Result<(usize, usize), DecodeError> {
        let mut value = 0usize;
        for i in 0..4 {
            let b = *f.get(at + i).ok_or_else(truncated)?;
            value |= usize::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok((value, i + 1));
            }
        }
        Err(malformed("variable byte integer longer than 4 bytes"))
    };
    // Protocol name (2 + 4), level, flags, keep-alive.
    let mut at = 2 + u16_at(frame, 0)? + 1 + 1 + 2;
    if protocol == Protocol::V5 {
        let (len, used) = varint_at(frame, at)?;
        at += used + len;
    }
    at += 2 + u16_at(frame, at)?; // client id
    if flags & 0x04 != 0 {
        if protocol == Protocol::V5 {
            let (len, used) = varint_at(frame, at)?;
            at += used + len;
        }
        at += 2 + u16_at(frame, at)?; // will topic
        at += 2 + u16_at(frame, at)?; // will payload
    }
    if flags & 0x80 != 0 {
        at += 2 + u16_at(frame, at)?; // user name
    }
    let len = u16_at(frame, at)?;
    let field = frame.get_mut(at + 2..at + 2 + len).ok_or_else(truncated)?;
    let password = Bytes::copy_from_slice(field);
    field.fill(b'x');
    Ok(password)
}

fn map_codec_error(e: String) -> DecodeError {
    if e.contains("not UTF-8") {
        DecodeError::Malformed(format!("string is not valid UTF-8 ({e})"))
    } else if e.contains("Packet id Zero") {
        DecodeError::Malformed("packet identifier 0".into())
    } else if e.contains("atleast one filter") {
        DecodeError::Protocol("SUBSCRIBE/UNSUBSCRIBE without a topic filter".into())
    } else {
        DecodeError::Malformed(e)
    }
}

/// Decodes the next packet after CONNECT; `Ok(None)` if more bytes are needed.
pub fn decode(
    buf: &mut BytesMut,
    protocol: Protocol,
    max_size: u32,
) -> Result<Option<Inbound>, DecodeError> {
    let Some(h) = peek_header(buf)? else {
        return Ok(None);
    };
    if h.remaining.saturating_add(h.header_len) > max_size as usize {
        return Err(DecodeError::TooLarge(h.remaining + h.header_len));
    }
    if buf.len() < h.header_len + h.remaining {
        return Ok(None);
    }
    check_flags(h.byte1, protocol)?;
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
        check_subscribe_options(buf.get(h.header_len..h.header_len + h.remaining), protocol)?;
    }
    if protocol == Protocol::V311 && kind == 14 {
        return Err(malformed("3.1.1 DISCONNECT with a body"));
    }
    match protocol {
        Protocol::V311 => {
            let packet = v4::Packet::read(buf, max_size as usize)
                .map_err(|e| map_codec_error(e.to_string()))?;
            from_v4(packet).map(Some)
        }
        Protocol::V5 => {
            if kind == 15 {
                buf.advance(h.header_len + h.remaining);
                return Ok(Some(Inbound::Auth));
            }
            let packet = v5::Packet::read(buf, Some(max_size))
                .map_err(|e| map_codec_error(e.to_string()))?;
            from_v5(packet).map(Some)
        }
    }
}

fn check_subscribe_options(body: Option<&[u8]>, protocol: Protocol) -> Result<(), DecodeError> {
    let body = body.ok_or_else(|| malformed("SUBSCRIBE truncated"))?;
    let mut rest = body
        .get(2..)
        .ok_or_else(|| malformed("SUBSCRIBE truncated"))?;
    let reserved = match protocol {
        Protocol::V311 => 0xfc,
        Protocol::V5 => 0xc0,
    };
    if protocol == Protocol::V5 {
        // Skip the properties: a variable byte integer length, then that many bytes.
        let mut len = 0usize;
        let mut used = 0usize;
        loop {
            let b = *rest
                .get(used)
                .ok_or_else(|| malformed("SUBSCRIBE truncated"))?;
            len |= usize::from(b & 0x7f) << (7 * used);
            used += 1;
            if b & 0x80 == 0 {
                break;
            }
            if used == 4 {
                return Err(malformed("SUBSCRIBE property length longer than 4 bytes"));
            }
        }
        rest = rest
            .get(used + len..)
            .ok_or_else(|| malformed("SUBSCRIBE properties truncated"))?;
    }
    while !rest.is_empty() {
        let len = match rest {
            [a, b, ..] => usize::from(u16::from_be_bytes([*a, *b])),
            _ => return Err(malformed("SUBSCRIBE truncated")),
        };
        let opts = *rest
            .get(2 + len)
            .ok_or_else(|| malformed("SUBSCRIBE truncated"))?;
        if opts & reserved != 0 {
            return Err(malformed("SUBSCRIBE options with reserved bits set"));
        }
        rest = rest.get(3 + len..).unwrap_or_default();
    }
    Ok(())
}

fn nonzero(pkid: u16) -> Result<u16, DecodeError> {
    if pkid == 0 {
        Err(malformed("packet identifier 0"))
    } else {
        Ok(pkid)
    }
}

fn from_v4(p: v4::Packet) -> Result<Inbound, DecodeError> {
    Ok(match p {
        v4::Packet::Publish(p) => Inbound::Publish(InPublish {
            qos: qos_from_v4(p.qos),
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
                    qos: qos_from_v4(f.qos),
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
                qos: qos_from_v5(p.qos),
                retain: p.retain,
                topic,
                pkid: p.pkid,
                payload: p.payload,
                expiry: props.message_expiry_interval,
                topic_alias: props.topic_alias,
                properties: Properties {
                    payload_format_indicator: props.payload_format_indicator,
                    content_type: props.content_type,
                    response_topic: props.response_topic,
                    correlation_data: props.correlation_data,
                    user_properties: props.user_properties,
                },
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
                        qos: qos_from_v5(f.qos),
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

fn qos_from_v4(q: rumqttc::mqttbytes::QoS) -> QoS {
    match q {
        rumqttc::mqttbytes::QoS::AtMostOnce => QoS::AtMostOnce,
        rumqttc::mqttbytes::QoS::AtLeastOnce => QoS::AtLeastOnce,
        rumqttc::mqttbytes::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn qos_from_v5(q: rumqttc::v5::mqttbytes::QoS) -> QoS {
    match q {
        rumqttc::v5::mqttbytes::QoS::AtMostOnce => QoS::AtMostOnce,
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce => QoS::AtLeastOnce,
        rumqttc::v5::mqttbytes::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn qos_to_v4(q: QoS) -> rumqttc::mqttbytes::QoS {
    match q {
        QoS::AtMostOnce => rumqttc::mqttbytes::QoS::AtMostOnce,
        QoS::AtLeastOnce => rumqttc::mqttbytes::QoS::AtLeastOnce,
        QoS::ExactlyOnce => rumqttc::mqttbytes::QoS::ExactlyOnce,
    }
}

fn qos_to_v5(q: QoS) -> rumqttc::v5::mqttbytes::QoS {
    match q {
        QoS::AtMostOnce => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        QoS::AtLeastOnce => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        QoS::ExactlyOnce => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
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
    let map = |e: String| {
        if e.contains("greater than") {
            EncodeError::TooLarge
        } else {
            EncodeError::Other(e)
        }
    };
    match protocol {
        Protocol::V311 => {
            let Some(p) = to_v4(packet) else {
                return Ok(());
            };
            p.write(buf, max_size as usize)
                .map(|_| ())
                .map_err(|e| map(e.to_string()))
        }
        Protocol::V5 => {
            if let Outbound::Disconnect { reason } = packet {
                // rumqttc declares a remaining length of 1 but writes 2 bytes for a DISCONNECT
                // with a reason code and no properties; write it here instead.
                buf.extend_from_slice(&[0xE0, 0x02, *reason, 0x00]);
                return Ok(());
            }
            let p = to_v5(packet);
            p.write(buf, Some(max_size))
                .map(|_| ())
                .map_err(|e| map(e.to_string()))
        }
    }
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
            qos: qos_to_v4(p.qos),
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
            let props = v5::PublishProperties {
                payload_format_indicator: p.properties.payload_format_indicator,
                message_expiry_interval: p.expiry,
                topic_alias: p.topic_alias,
                response_topic: p.properties.response_topic.clone(),
                correlation_data: p.properties.correlation_data.clone(),
                user_properties: p.properties.user_properties.clone(),
                subscription_identifiers: p.sub_ids.clone(),
                content_type: p.properties.content_type.clone(),
            };
            let empty = props == v5::PublishProperties::default();
            v5::Packet::Publish(v5::Publish {
                dup: p.dup,
                qos: qos_to_v5(p.qos),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn connect_v4(flags: u8) -> BytesMut {
        // CONNECT, "MQTT", level 4, flags, keep-alive 0, client id "c".
        let mut b = BytesMut::from(
            &[
                0x10, 0x0d, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, flags, 0x00, 0x00, 0x00,
                0x01, b'c',
            ][..],
        );
        b.truncate(15);
        b
    }

    #[test]
    fn connect_reserved_flag_and_will_qos_3_are_malformed() {
        let mut ok = connect_v4(0x02);
        assert_eq!(connect_level(&ok, 1024), Ok(Some(4)));
        assert!(decode_connect(&mut ok, Protocol::V311, 1024)
            .unwrap()
            .is_some());
        let mut reserved = connect_v4(0x03);
        assert!(matches!(
            decode_connect(&mut reserved, Protocol::V311, 1024),
            Err(DecodeError::Malformed(_))
        ));
        let mut will_qos3 = connect_v4(0x02 | 0x04 | 0x18);
        assert!(matches!(
            decode_connect(&mut will_qos3, Protocol::V311, 1024),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn truncated_connect_waits_for_more_bytes() {
        let full = connect_v4(0x02);
        for n in 0..full.len() {
            let mut part = BytesMut::from(&full[..n]);
            let level = connect_level(&part, 1024).unwrap();
            if level.is_some() {
                assert!(decode_connect(&mut part, Protocol::V311, 1024)
                    .unwrap()
                    .is_none());
            }
        }
    }

    #[test]
    fn other_protocol_levels_are_reported() {
        let mut b = connect_v4(0x02);
        b[8] = 3;
        assert_eq!(
            connect_level(&b, 1024),
            Err(DecodeError::UnsupportedProtocol { level: 3 })
        );
        assert!(matches!(
            connect_level(&[0x30, 0x00], 1024),
            Err(DecodeError::Protocol(_))
        ));
    }

    #[test]
    fn oversize_declared_length_is_refused_before_the_body_arrives() {
        let mut b = BytesMut::from(&[0x30u8, 0xFF, 0xFF, 0xFF, 0x7F][..]);
        assert!(matches!(
            decode(&mut b, Protocol::V5, 1024 * 1024),
            Err(DecodeError::TooLarge(_))
        ));
        let mut b = BytesMut::from(&[0x30u8, 0xFF, 0xFF, 0xFF, 0xFF, 0x01][..]);
        assert!(matches!(
            decode(&mut b, Protocol::V5, 1024),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn reserved_fixed_header_flags_are_malformed() {
        for bytes in [
            &[0x36u8, 0x03, 0x00, 0x01, b't'][..], // PUBLISH QoS 3
            &[0x38, 0x03, 0x00, 0x01, b't'],       // QoS 0 with DUP
            &[0x80, 0x06, 0x00, 0x01, 0x00, 0x01, b't', 0x00], // SUBSCRIBE flags 0
            &[0xC1, 0x00],                         // PINGREQ flags 1
            &[0x00, 0x00],                         // type 0
        ] {
            let mut b = BytesMut::from(bytes);
            assert!(
                matches!(
                    decode(&mut b, Protocol::V311, 1024),
                    Err(DecodeError::Malformed(_))
                ),
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn empty_v5_disconnect_and_second_connect() {
        let mut b = BytesMut::from(&[0xE0u8, 0x00][..]);
        assert!(matches!(
            decode(&mut b, Protocol::V5, 1024),
            Ok(Some(Inbound::Disconnect { reason: 0, .. }))
        ));
        let mut c = connect_v4(0x02);
        assert!(matches!(
            decode(&mut c, Protocol::V311, 1024),
            Err(DecodeError::Protocol(_))
        ));
    }

    #[test]
    fn packet_id_zero_and_empty_subscribe_are_refused() {
        let mut b = BytesMut::from(&[0x32u8, 0x05, 0x00, 0x01, b't', 0x00, 0x00][..]);
        assert!(decode(&mut b, Protocol::V311, 1024).is_err());
        let mut b = BytesMut::from(&[0x82u8, 0x02, 0x00, 0x01][..]);
        assert!(decode(&mut b, Protocol::V311, 1024).is_err());
        let mut b = BytesMut::from(&[0x82u8, 0x06, 0x00, 0x01, 0x00, 0x01, b't', 0x04][..]);
        assert!(matches!(
            decode(&mut b, Protocol::V311, 1024),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn v5_subscribe_reserved_option_bits_are_malformed() {
        // SUBSCRIBE pkid 1, no properties, filter "t", options 0x40.
        let mut b = BytesMut::from(&[0x82u8, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, b't', 0x40][..]);
        assert!(matches!(
            decode(&mut b, Protocol::V5, 1024),
            Err(DecodeError::Malformed(_))
        ));
        let mut b = BytesMut::from(&[0x82u8, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, b't', 0x2e][..]);
        assert!(matches!(
            decode(&mut b, Protocol::V5, 1024),
            Ok(Some(Inbound::Subscribe { .. }))
        ));
    }

    #[test]
    fn binary_passwords_are_kept_as_bytes() {
        for protocol in [Protocol::V311, Protocol::V5] {
            let mut c = v4::Connect::new("c");
            c.login = Some(v4::Login::new("u", "pw"));
            let mut b = BytesMut::new();
            match protocol {
                Protocol::V311 => {
                    c.write(&mut b).unwrap();
                }
                Protocol::V5 => {
                    let c5 = v5::Connect {
                        keep_alive: 0,
                        client_id: "c".into(),
                        clean_start: true,
                        properties: None,
                    };
                    v5::Packet::Connect(c5, None, Some(v5::Login::new("u", "pw")))
                        .write(&mut b, None)
                        .unwrap();
                }
            }
            // Replace "pw" (the last two bytes) with invalid UTF-8.
            let n = b.len();
            b[n - 2] = 0xff;
            b[n - 1] = 0x00;
            let got = decode_connect(&mut b, protocol, 1024).unwrap().unwrap();
            assert_eq!(got.username.as_deref(), Some("u"));
            assert_eq!(got.password.as_deref(), Some(&[0xff, 0x00][..]));
        }
    }

    #[test]
    fn v5_disconnect_with_reason_is_well_formed() {
        let mut b = BytesMut::new();
        encode(
            &Outbound::Disconnect { reason: 0x8E },
            Protocol::V5,
            &mut b,
            1024,
        )
        .unwrap();
        let p = v5::Packet::read(&mut b, None).unwrap();
        assert!(
            matches!(p, v5::Packet::Disconnect(d) if d.reason_code == v5::DisconnectReasonCode::SessionTakenOver)
        );
        assert!(b.is_empty());
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut seed = 0x1234_5678_u32;
        for _ in 0..200_000 {
            let len = (seed % 120) as usize;
            let mut v = Vec::with_capacity(len);
            for _ in 0..len {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                v.push(seed as u8);
            }
            // Also a well-framed packet of a valid type around the random body, to reach the
            // codec's inner parsers.
            let firsts = [
                0x10u8, 0x30, 0x32, 0x34, 0x3B, 0x40, 0x50, 0x62, 0x70, 0x82, 0xA2, 0xE0, 0xF0,
                0x20, 0x90,
            ];
            let mut framed = vec![firsts[(seed as usize) % firsts.len()], v.len() as u8];
            framed.extend_from_slice(&v);
            for proto in [Protocol::V311, Protocol::V5] {
                let mut b = BytesMut::from(&framed[..]);
                while let Ok(Some(_)) = decode(&mut b, proto, 1024) {}
                let mut b = BytesMut::from(&framed[..]);
                let _ = decode_connect(&mut b, proto, 1024);
                let mut b = BytesMut::from(&v[..]);
                let _ = connect_level(&b, 1024);
                let _ = decode_connect(&mut b, proto, 1024);
                let mut b = BytesMut::from(&v[..]);
                while let Ok(Some(_)) = decode(&mut b, proto, 1024) {}
            }
        }
    }
}
