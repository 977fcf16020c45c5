//! The CONNECT packet, the one packet read before the protocol version is known: its level
//! is read from the raw bytes, its reserved flag and will QoS checked there, and its password
//! (binary data that rumqttc would read as UTF-8) taken out before the codec of that version
//! decodes the rest into a [`ConnectPacket`].

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

use super::frame::peek_header;
use super::{
    from_v4_error, from_v5_error, malformed, ConnectPacket, DecodeError, Protocol, WillSpec,
};
use crate::message::Properties;
use crate::mqtt;

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
                        qos: mqtt::qos_from_v4(w.qos),
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
            Err(e) => Err(from_v4_error(e)),
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
                                mqtt::properties_from_v5_will(wp),
                            ),
                            None => (0, None, Properties::default()),
                        };
                        Some(WillSpec {
                            topic,
                            payload: w.message,
                            qos: mqtt::qos_from_v5(w.qos),
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
            Err(e) => Err(from_v5_error(e)),
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
