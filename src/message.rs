//! The application message as it moves through the relay, independent of protocol version.

use bytes::Bytes;

use crate::clock::Stamp;

/// MQTT quality of service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QoS {
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    /// From the wire value; `None` for anything but 0, 1, 2.
    pub fn from_u8(v: u8) -> Option<QoS> {
        match v {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

/// The v5 properties worth carrying end to end.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties {
    pub payload_format_indicator: Option<u8>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<(String, String)>,
}

/// An application message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub properties: Properties,
    /// When the message was accepted by whoever first received it.
    pub accepted: Stamp,
    /// When it expires: from a v5 Message Expiry Interval or a route's TTL; `None` never.
    pub deadline: Option<Stamp>,
}

impl Message {
    /// True if the message has a deadline that `now` has passed.
    pub fn is_expired(&self, now: &Stamp) -> bool {
        self.deadline.is_some_and(|d| d.is_past(now))
    }
}
