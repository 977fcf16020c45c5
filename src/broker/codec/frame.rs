//! Frame level, on raw bytes before any codec sees them: the fixed header (remaining length,
//! reserved flag bits, QoS 3, reserved packet types), the size limit, and the reserved bits of
//! SUBSCRIBE options that rumqttc ignores. Nothing here consumes bytes.

use super::{malformed, DecodeError, Protocol};

/// A fixed header read from raw bytes.
pub(super) struct Header {
    pub byte1: u8,
    pub header_len: usize,
    pub remaining: usize,
}

/// Reads the fixed header; `Ok(None)` if more bytes are needed.
pub(super) fn peek_header(buf: &[u8]) -> Result<Option<Header>, DecodeError> {
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
pub(super) fn check_flags(byte1: u8, protocol: Protocol) -> Result<(), DecodeError> {
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

/// Checks the reserved bits of each SUBSCRIBE entry's options byte in the raw `body`.
pub(super) fn check_subscribe_options(
    body: Option<&[u8]>,
    protocol: Protocol,
) -> Result<(), DecodeError> {
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
