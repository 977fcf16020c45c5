//! The local MQTT broker that the cab iPads connect to (MQTT 3.1.1 and 5 on one listener).
//!
//! The rest of the daemon talks to it through a small API:
//! - [`Hooks`]: authentication, authorization, the *ingest hook* whose verdict the broker waits
//!   for before it acknowledges a client's PUBLISH, and connection events;
//! - [`BrokerHandle::inject`]: publish as the relay itself;
//! - [`Broker::run`]: serve until the shutdown signal, then close cleanly.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::sync::oneshot;

use crate::message::Message;
use crate::shutdown::Shutdown;
use crate::store::{Db, StoreError};

/// Limits and settings of the local broker.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// TCP address to listen on.
    pub listen: SocketAddr,
    /// Connections open at once; further ones are refused.
    pub max_connections: usize,
    /// Largest packet accepted from or sent to a client, in bytes.
    pub max_packet_size: u32,
    /// In-flight QoS 1/2 PUBLISHes a client may have towards the broker (v5 Receive Maximum).
    pub receive_maximum: u16,
    /// Messages kept per session for a client that is offline or slow; beyond it the oldest
    /// QoS 0 message, then the oldest message, is dropped and counted.
    pub max_queued_messages: usize,
    /// Subscriptions one client may hold.
    pub max_subscriptions: usize,
    /// Upper bound on a client's requested Session Expiry Interval.
    pub max_session_expiry: Duration,
    /// Time a new connection has to send a complete CONNECT.
    pub connect_timeout: Duration,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            max_connections: 64,
            max_packet_size: 1024 * 1024,
            receive_maximum: 64,
            max_queued_messages: 1000,
            max_subscriptions: 64,
            max_session_expiry: Duration::from_secs(7 * 24 * 3600),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// MQTT protocol version of a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    V311,
    V5,
}

/// Who a connected client is.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub client_id: String,
    pub username: Option<String>,
    pub peer: SocketAddr,
    pub protocol: Protocol,
}

/// What a client presents in CONNECT, for the authentication hook.
#[derive(Debug)]
pub struct ConnectRequest<'a> {
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
    pub peer: SocketAddr,
    pub protocol: Protocol,
}

/// The authentication hook's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthVerdict {
    Allow,
    /// v3.1.1 CONNACK 0x04, v5 0x86.
    BadCredentials,
    /// v3.1.1 CONNACK 0x05, v5 0x87.
    NotAuthorized,
}

/// Why an inbound PUBLISH was refused; mapped to the v5 PUBACK/PUBREC reason code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// 0x80
    UnspecifiedError,
    /// 0x83
    ImplementationSpecificError,
    /// 0x87
    NotAuthorized,
    /// 0x97
    QuotaExceeded,
}

/// The ingest hook's answer for one inbound PUBLISH.
#[derive(Debug)]
pub enum Ingest {
    /// Acknowledge and deliver now.
    Accept,
    /// Refuse now.
    Reject(RejectReason),
    /// The verdict comes later (after a store commit); the broker acknowledges the client only
    /// when it arrives. A dropped sender counts as `UnspecifiedError`.
    Pending(oneshot::Receiver<Result<(), RejectReason>>),
}

/// Connection events, for presence reporting.
#[derive(Debug, Clone)]
pub enum BrokerEvent {
    Connected(ClientInfo),
    Disconnected { client: ClientInfo, reason: String },
    WillPublished { client_id: String, topic: String },
}

/// What the daemon plugs into the broker. Every method has a permissive default.
///
/// The broker calls these from its connection tasks: they must not block.
pub trait Hooks: Send + Sync + 'static {
    fn authenticate(&self, _req: &ConnectRequest<'_>) -> AuthVerdict {
        AuthVerdict::Allow
    }
    fn may_publish(&self, _client: &ClientInfo, _topic: &str) -> bool {
        true
    }
    fn may_subscribe(&self, _client: &ClientInfo, _filter: &str) -> bool {
        true
    }
    /// Called, in arrival order per connection, for every inbound PUBLISH that passed
    /// validation and `may_publish`. `msg.deadline` is set from a v5 Message Expiry Interval.
    fn ingest(&self, _client: &ClientInfo, _msg: &Message) -> Ingest {
        Ingest::Accept
    }
    fn on_event(&self, _event: BrokerEvent) {}
}

/// Errors of the broker API.
#[derive(Debug, Error)]
pub enum BrokerError {
    #[error("local broker: cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("local broker: {0}")]
    Store(#[from] StoreError),
    #[error("local broker: invalid topic '{topic}': {reason}")]
    InvalidTopic { topic: String, reason: String },
    #[error("local broker is shut down")]
    Closed,
}

/// A connected client, for the status socket.
#[derive(Debug, Clone)]
pub struct ClientSummary {
    pub client_id: String,
    pub peer: SocketAddr,
    pub protocol: Protocol,
    /// Wall-clock milliseconds since the epoch when it connected.
    pub connected_since_ms: i64,
    pub subscriptions: usize,
}

/// Counters of the broker, for the status socket.
#[derive(Debug, Clone, Default)]
pub struct BrokerStats {
    pub connections: u64,
    pub refused_connections: u64,
    pub protocol_errors: u64,
    pub messages_in: u64,
    pub messages_out: u64,
    pub dropped_queue_full: u64,
    pub dropped_expired: u64,
    pub denied_publish: u64,
    pub denied_subscribe: u64,
}

#[doc(hidden)]
pub type _HooksObject = Arc<dyn Hooks>;
#[doc(hidden)]
pub type _Unused = (Db, Shutdown, Duration);
