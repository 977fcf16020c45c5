//! `[uplink]` of the configuration file: the connection to the central broker, as plain data.
//! [`crate::config`] reads and validates it; the uplink builds its connections from it.

use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;

/// MQTT version spoken to the central broker (`protocol = "5"` or `"3.1.1"`).
pub use crate::mqtt::Protocol;

/// `[uplink]`: the connection to the central broker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UplinkConfig {
    /// `mqtt://host:port`.
    pub url: String,
    /// Client id at the central broker; `{train_id}` is substituted.
    pub client_id: String,
    pub protocol: Protocol,
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long the central broker keeps the relay's session after a disconnect (v5).
    #[serde(with = "humantime_serde")]
    pub session_expiry: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_min: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Parallel MQTT connections to the central broker, each with its own session and window;
    /// the first one carries presence and the downlink.
    pub connections: usize,
    /// Cap on the QoS 1 messages in flight at once. By default the window is the central
    /// broker's Receive Maximum, up to `uplink::DEFAULT_WINDOW` (also the window for a broker
    /// that announces none: MQTT 3.1.1).
    pub inflight: Option<u16>,
    /// Largest packet sent; larger messages are refused when accepted.
    pub max_packet_size: ByteSize,
    pub username: Option<String>,
    /// File holding the password for the central broker (first line).
    pub password_file: Option<PathBuf>,
    /// Topic of the relay's retained presence (`online`/`offline`, the latter as Last Will).
    pub status_topic: String,
    /// HTTP proxy for the uplink, `http://[user:password@]host:port` (CONNECT tunnel).
    pub proxy: Option<String>,
    /// Failed delivery attempts of one message (refused, too large, or the connection dropped
    /// right after it was sent) before it becomes a dead letter.
    /// Bandwidth cap for the uplink (topic + payload bytes per second); none by default.
    #[serde(default)]
    pub max_bytes_per_second: Option<ByteSize>,
    pub max_attempts: u32,
    /// Ordered central-broker endpoints (first preferred); empty means `url` alone. Giving
    /// both is an error.
    pub endpoints: Vec<String>,
    /// While on a fallback endpoint, how often to check whether the first one is back.
    #[serde(with = "humantime_serde")]
    pub probe_primary_every: Duration,
    /// PEM CA certificates trusted for `mqtts://` and `wss://` endpoints.
    pub ca_file: Option<PathBuf>,
    /// Also trust the operating system's root certificates.
    pub system_roots: bool,
    /// PEM client certificate (chain) for mutual TLS; needs `client_key_file`.
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key of `client_cert_file`.
    pub client_key_file: Option<PathBuf>,
}

impl UplinkConfig {
    /// The endpoints in order of preference.
    pub fn endpoint_urls(&self) -> Vec<String> {
        if self.endpoints.is_empty() {
            vec![self.url.clone()]
        } else {
            self.endpoints.clone()
        }
    }
}

impl Default for UplinkConfig {
    fn default() -> Self {
        UplinkConfig {
            url: "mqtt://127.0.0.1:1884".into(),
            client_id: "trainrelay-{train_id}".into(),
            protocol: Protocol::V5,
            keep_alive: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(10),
            session_expiry: Duration::from_secs(24 * 3600),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            connections: 4,
            inflight: None,
            max_packet_size: ByteSize::mib(1),
            username: None,
            password_file: None,
            status_topic: "trains/{train_id}/status".into(),
            proxy: None,
            max_bytes_per_second: None,
            max_attempts: 5,
            endpoints: Vec::new(),
            probe_primary_every: Duration::from_secs(60),
            ca_file: None,
            system_roots: false,
            client_cert_file: None,
            client_key_file: None,
        }
    }
}
