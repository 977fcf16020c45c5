//! What the local broker and the uplink say alike on the MQTT wire: the protocol version, and
//! the conversions between the relay's [`QoS`] and [`Properties`] and rumqttc's v4 (MQTT
//! 3.1.1) and v5 types. The broker's codec and the uplink's wire both use these, so a message
//! keeps the same QoS and properties whichever side reads or writes it.

use rumqttc::mqttbytes as m4;
use rumqttc::v5::mqttbytes::{self as m5, v5};

use crate::message::{Properties, QoS};

/// MQTT protocol version of a connection: an iPad's, or the uplink's (`uplink.protocol`,
/// written `"5"` or `"3.1.1"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub enum Protocol {
    #[serde(rename = "3.1.1")]
    V311,
    #[serde(rename = "5")]
    V5,
}

pub fn qos_from_v4(q: m4::QoS) -> QoS {
    match q {
        m4::QoS::AtMostOnce => QoS::AtMostOnce,
        m4::QoS::AtLeastOnce => QoS::AtLeastOnce,
        m4::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

pub fn qos_from_v5(q: m5::QoS) -> QoS {
    match q {
        m5::QoS::AtMostOnce => QoS::AtMostOnce,
        m5::QoS::AtLeastOnce => QoS::AtLeastOnce,
        m5::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

pub fn qos_to_v4(q: QoS) -> m4::QoS {
    match q {
        QoS::AtMostOnce => m4::QoS::AtMostOnce,
        QoS::AtLeastOnce => m4::QoS::AtLeastOnce,
        QoS::ExactlyOnce => m4::QoS::ExactlyOnce,
    }
}

pub fn qos_to_v5(q: QoS) -> m5::QoS {
    match q {
        QoS::AtMostOnce => m5::QoS::AtMostOnce,
        QoS::AtLeastOnce => m5::QoS::AtLeastOnce,
        QoS::ExactlyOnce => m5::QoS::ExactlyOnce,
    }
}

/// The message properties a v5 PUBLISH carries; the rest of its properties (expiry, topic
/// alias, subscription identifiers) are the caller's to read.
pub fn properties_from_v5(p: v5::PublishProperties) -> Properties {
    Properties {
        payload_format_indicator: p.payload_format_indicator,
        content_type: p.content_type,
        response_topic: p.response_topic,
        correlation_data: p.correlation_data,
        user_properties: p.user_properties,
    }
}

/// The message properties of a v5 will (CONNECT's will properties).
pub fn properties_from_v5_will(p: v5::LastWillProperties) -> Properties {
    Properties {
        payload_format_indicator: p.payload_format_indicator,
        content_type: p.content_type,
        response_topic: p.response_topic,
        correlation_data: p.correlation_data,
        user_properties: p.user_properties,
    }
}

/// v5 PUBLISH properties: the message's, plus what belongs to this one transmission.
pub fn publish_properties(
    p: &Properties,
    message_expiry_interval: Option<u32>,
    topic_alias: Option<u16>,
    subscription_identifiers: Vec<usize>,
) -> v5::PublishProperties {
    v5::PublishProperties {
        payload_format_indicator: p.payload_format_indicator,
        message_expiry_interval,
        topic_alias,
        response_topic: p.response_topic.clone(),
        correlation_data: p.correlation_data.clone(),
        user_properties: p.user_properties.clone(),
        subscription_identifiers,
        content_type: p.content_type.clone(),
    }
}
