//! The one storage format of MQTT v5 [`Properties`] in the store.
//!
//! # Contract
//! - Every `props` column of the database holds this encoding: the uplink queue and its dead
//!   letters (`uplink_queue`, `uplink_dead_letters`) and the local broker's persistent session
//!   messages and retained messages (`broker_session_messages`, `broker_retained`; schema
//!   migration 6 converted their former JSON text).
//! - No properties are stored as `NULL`, never as an empty encoding: [`encode`] returns `None`
//!   for [`Properties::default`].
//! - [`decode`] is the exact inverse of [`encode`] and is strict: an unknown version or flag,
//!   truncation, a length that overflows or exceeds the data, a string that is not UTF-8 and
//!   trailing bytes are all errors, never a panic and never a silently partial result. A
//!   hostile length cannot make it allocate more than the input's size.
//! - The encoded length counts towards the uplink queue's logical size
//!   (`queue::entry_size`), so the encoding must not change without a new version byte and a
//!   migration.
//!
//! # Layout
//! Version byte `1`, a flags byte (which optional fields follow), the payload format indicator
//! byte if present, then content type, response topic and correlation data if present, then
//! the count of user properties and each key and value, in order. Strings and byte strings are
//! a LEB128 length followed by the bytes.

use bytes::Bytes;
use rusqlite::types::{Type, ValueRef};
use thiserror::Error;

use crate::message::Properties;

/// Version byte of the encoding.
const V1: u8 = 1;
const HAS_FORMAT: u8 = 1;
const HAS_CONTENT_TYPE: u8 = 2;
const HAS_RESPONSE_TOPIC: u8 = 4;
const HAS_CORRELATION: u8 = 8;
const ALL_FLAGS: u8 = HAS_FORMAT | HAS_CONTENT_TYPE | HAS_RESPONSE_TOPIC | HAS_CORRELATION;

/// Why stored properties could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum PropsError {
    #[error("properties are truncated")]
    Truncated,
    #[error("unknown properties encoding version {0}")]
    UnknownVersion(u8),
    #[error("unknown properties flags {0:#04x}")]
    UnknownFlags(u8),
    #[error("a properties length overflows")]
    LengthOverflow,
    #[error("the user property count exceeds the data")]
    CountExceedsData,
    #[error("a properties string is not UTF-8")]
    NotUtf8,
    #[error("trailing bytes after the properties")]
    TrailingBytes,
    #[error("props column is {0}, not a blob")]
    NotABlob(Type),
}

/// Encodes properties for a `props` column; `None` (stored as `NULL`) when there are none.
pub fn encode(p: &Properties) -> Option<Vec<u8>> {
    if *p == Properties::default() {
        return None;
    }
    let mut flags = 0;
    if p.payload_format_indicator.is_some() {
        flags |= HAS_FORMAT;
    }
    if p.content_type.is_some() {
        flags |= HAS_CONTENT_TYPE;
    }
    if p.response_topic.is_some() {
        flags |= HAS_RESPONSE_TOPIC;
    }
    if p.correlation_data.is_some() {
        flags |= HAS_CORRELATION;
    }
    let mut out = vec![V1, flags];
    if let Some(f) = p.payload_format_indicator {
        out.push(f);
    }
    if let Some(s) = &p.content_type {
        put_bytes(&mut out, s.as_bytes());
    }
    if let Some(s) = &p.response_topic {
        put_bytes(&mut out, s.as_bytes());
    }
    if let Some(b) = &p.correlation_data {
        put_bytes(&mut out, b);
    }
    put_len(&mut out, p.user_properties.len());
    for (k, v) in &p.user_properties {
        put_bytes(&mut out, k.as_bytes());
        put_bytes(&mut out, v.as_bytes());
    }
    Some(out)
}

/// Inverse of [`encode`].
pub fn decode(b: &[u8]) -> Result<Properties, PropsError> {
    let mut r = Reader { b };
    let version = r.byte()?;
    if version != V1 {
        return Err(PropsError::UnknownVersion(version));
    }
    let flags = r.byte()?;
    if flags & !ALL_FLAGS != 0 {
        return Err(PropsError::UnknownFlags(flags));
    }
    let mut p = Properties::default();
    if flags & HAS_FORMAT != 0 {
        p.payload_format_indicator = Some(r.byte()?);
    }
    if flags & HAS_CONTENT_TYPE != 0 {
        p.content_type = Some(r.string()?);
    }
    if flags & HAS_RESPONSE_TOPIC != 0 {
        p.response_topic = Some(r.string()?);
    }
    if flags & HAS_CORRELATION != 0 {
        p.correlation_data = Some(Bytes::copy_from_slice(r.bytes()?));
    }
    let n = r.len()?;
    // Each pair takes at least two bytes: a hostile count cannot make us allocate.
    if n > r.b.len() / 2 {
        return Err(PropsError::CountExceedsData);
    }
    p.user_properties.reserve(n);
    for _ in 0..n {
        let k = r.string()?;
        let v = r.string()?;
        p.user_properties.push((k, v));
    }
    if !r.b.is_empty() {
        return Err(PropsError::TrailingBytes);
    }
    Ok(p)
}

/// Decodes a `props` column as read: `NULL` is no properties, a blob is [`decode`]d, anything
/// else is damage.
pub fn from_column(v: ValueRef<'_>) -> Result<Properties, PropsError> {
    match v {
        ValueRef::Null => Ok(Properties::default()),
        ValueRef::Blob(b) => decode(b),
        other => Err(PropsError::NotABlob(other.data_type())),
    }
}

fn put_len(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let low = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(low);
            return;
        }
        out.push(low | 0x80);
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_len(out, b.len());
    out.extend_from_slice(b);
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Result<u8, PropsError> {
        let (&first, rest) = self.b.split_first().ok_or(PropsError::Truncated)?;
        self.b = rest;
        Ok(first)
    }

    fn len(&mut self) -> Result<usize, PropsError> {
        let mut n: usize = 0;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            n |= usize::from(b & 0x7f)
                .checked_shl(shift)
                .ok_or(PropsError::LengthOverflow)?;
            if b & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err(PropsError::LengthOverflow)
    }

    fn bytes(&mut self) -> Result<&'a [u8], PropsError> {
        let n = self.len()?;
        if n > self.b.len() {
            return Err(PropsError::Truncated);
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }

    fn string(&mut self) -> Result<String, PropsError> {
        std::str::from_utf8(self.bytes()?)
            .map(str::to_owned)
            .map_err(|_| PropsError::NotUtf8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> Properties {
        Properties {
            payload_format_indicator: Some(1),
            content_type: Some("application/json".into()),
            response_topic: Some(String::new()),
            correlation_data: Some(Bytes::from_static(&[0, 0, 200, 7])),
            user_properties: vec![
                ("z".into(), "1".into()),
                ("a".into(), "2".into()),
                ("z".into(), "ü".into()),
                (String::new(), "x".repeat(300)),
            ],
        }
    }

    #[test]
    fn round_trips_exactly_and_none_is_null() {
        assert_eq!(encode(&Properties::default()), None);
        let only_users = Properties {
            user_properties: vec![("k".into(), "v".into())],
            ..Properties::default()
        };
        for p in [full(), only_users] {
            let bytes = encode(&p).unwrap();
            assert_eq!(decode(&bytes).unwrap(), p);
            assert_eq!(from_column(ValueRef::Blob(&bytes)).unwrap(), p);
        }
        assert_eq!(from_column(ValueRef::Null).unwrap(), Properties::default());
        assert_eq!(
            from_column(ValueRef::Text(b"{}")),
            Err(PropsError::NotABlob(Type::Text))
        );
    }

    #[test]
    fn damaged_props_are_errors_not_panics() {
        let p = Properties {
            content_type: Some("abc".into()),
            user_properties: vec![("k".into(), "v".into())],
            ..Properties::default()
        };
        let good = encode(&p).unwrap();
        for cut in 0..good.len() {
            assert!(decode(&good[..cut]).is_err());
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(decode(&trailing), Err(PropsError::TrailingBytes));
        assert_eq!(
            decode(&[1, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1]),
            Err(PropsError::LengthOverflow)
        );
        assert_eq!(decode(&[2, 0, 0]), Err(PropsError::UnknownVersion(2)));
        assert_eq!(decode(&[1, 0x10, 0]), Err(PropsError::UnknownFlags(0x10)));
        assert_eq!(decode(&[1, 0, 5]), Err(PropsError::CountExceedsData));
        assert_eq!(decode(&[1, 2, 1, 0xff, 0]), Err(PropsError::NotUtf8));
    }
}
