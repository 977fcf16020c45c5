//! Helpers for the freshness tests (state, versions, conflation, priorities, device topics).

use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{Publish, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;

use crate::V5Client;

/// Waits until the relay announced itself `online` at the central broker, i.e. its uplink is
/// connected and subscribed.
pub async fn wait_online(central_port: u16) {
    let mut probe =
        V5Client::connect(central_port, &format!("probe-{}", std::process::id()), true).await;
    probe.subscribe("trains/T1/status").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline {
        let got = probe.collect(1, Duration::from_secs(5)).await;
        if got.iter().any(|p| p.payload.as_ref() == b"online") {
            // The subscription goes out right after the online message.
            tokio::time::sleep(Duration::from_millis(500)).await;
            return;
        }
    }
    panic!("relay did not come online at the central broker within 60 s");
}

/// Publishes one QoS 1 message with optional retain, expiry and user properties.
pub async fn publish(
    client: &V5Client,
    topic: &str,
    payload: &str,
    retain: bool,
    expiry_secs: Option<u32>,
    user_properties: &[(&str, &str)],
) {
    let props = PublishProperties {
        message_expiry_interval: expiry_secs,
        user_properties: user_properties
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..PublishProperties::default()
    };
    client
        .client
        .publish_with_properties(topic, QoS::AtLeastOnce, retain, payload.to_string(), props)
        .await
        .expect("publish");
}

/// The value of a user property of a received message.
pub fn user_property(p: &Publish, name: &str) -> Option<String> {
    p.properties.as_ref().and_then(|props| {
        props
            .user_properties
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    })
}

/// Payload and topic of received messages, as text.
pub fn texts(msgs: &[Publish]) -> Vec<(String, String)> {
    msgs.iter()
        .map(|p| {
            (
                String::from_utf8_lossy(&p.topic).into_owned(),
                String::from_utf8_lossy(&p.payload).into_owned(),
            )
        })
        .collect()
}

/// Wall-clock milliseconds now.
pub fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The last `freshness counters:` line of a relay log.
pub fn counters_line(log: &str) -> String {
    log.lines()
        .rev()
        .find(|l| l.contains("freshness counters:"))
        .unwrap_or("")
        .to_string()
}
