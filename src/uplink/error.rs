//! Why a connection to the central broker ended, typed, so that the uplink can tell the
//! network's fault (a reset, a silent tunnel) from a broker that refuses a message.

use std::io;

use super::tls::TlsError;
use crate::broker::BrokerError;
use crate::store::StoreError;

/// How a link failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Opening the stream (TCP, proxy, TLS, WebSocket) failed.
    #[error("{0}")]
    Connect(#[from] ConnectError),
    /// The broker answered CONNECT with a refusal.
    #[error("{0}")]
    Refused(String),
    /// The peer closed the stream (FIN).
    #[error("connection closed by peer")]
    Closed,
    /// The peer or something on the path reset the stream (RST): carrier NATs and firewalls
    /// do this on their own, so it says nothing about the message in flight.
    #[error("connection reset: {0}")]
    Reset(io::Error),
    /// The kernel gave up on unacknowledged data (TCP_USER_TIMEOUT).
    #[error("connection timed out: {0}")]
    TimedOut(io::Error),
    /// Any other I/O error.
    #[error("I/O: {0}")]
    Io(io::Error),
    /// The broker ended the connection with a DISCONNECT (`code`: the v5 reason code; 3.1.1
    /// brokers send none).
    #[error("the broker disconnected: {name}")]
    Disconnected { code: Option<u8>, name: String },
    /// The broker sent something a client must not accept.
    #[error("{0}")]
    Protocol(String),
    /// The uplink's side of the link went away (dropped, or its request queue is full).
    #[error("{0}")]
    Local(&'static str),
}

/// Why the stream to the central broker could not be opened, naming the proxy, host or URL
/// that failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The TCP connection to the broker.
    #[error("I/O: {0}")]
    Io(#[source] io::Error),
    /// The TCP connection to the proxy, or the CONNECT exchange over it.
    #[error("proxy {proxy}: {source}")]
    ProxyIo {
        proxy: String,
        #[source]
        source: io::Error,
    },
    #[error("proxy {proxy}: response head longer than {limit} bytes")]
    ProxyHeadTooLong { proxy: String, limit: usize },
    /// The proxy answered CONNECT with something other than 200.
    #[error("proxy {proxy} refused CONNECT {target}: {status}")]
    ProxyRefused {
        proxy: String,
        target: String,
        status: String,
    },
    #[error("TLS: '{host}' is not a valid server name: {source}")]
    ServerName {
        host: String,
        #[source]
        source: rustls::pki_types::InvalidDnsNameError,
    },
    /// The TLS handshake.
    #[error("TLS: {0}")]
    Tls(#[source] io::Error),
    #[error("WebSocket: {url}: {source}")]
    WebSocketUrl {
        url: String,
        #[source]
        source: Box<WsError>,
    },
    /// The WebSocket handshake.
    #[error("WebSocket: {0}")]
    WebSocket(#[source] Box<WsError>),
}

type WsError = tokio_tungstenite::tungstenite::Error;

/// Why the uplink ended a connection, or never had one, as its status and log say it.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("TLS setup: {0}")]
    TlsSetup(#[from] TlsError),
    /// The first thing from the broker was not its CONNACK (the event, as debug output).
    #[error("expected CONNACK, got {0}")]
    NoConnack(String),
    #[error("connect failed: {0}")]
    Connect(#[source] LinkError),
    #[error("connect timed out")]
    ConnectTimeout,
    #[error("connection lost: {0}")]
    Lost(#[source] LinkError),
    #[error("cannot subscribe: {0}")]
    Subscribe(#[source] LinkError),
    #[error("cannot publish presence: {0}")]
    Presence(#[source] LinkError),
    /// Acknowledging a downlink message to the broker.
    #[error("{0}")]
    Ack(#[source] LinkError),
    #[error("cannot read the store: {0}")]
    OpenStore(#[source] StoreError),
    /// Fetching the next rows to send.
    #[error("{0}")]
    FetchRows(#[source] StoreError),
    #[error("cannot delete acknowledged rows: {0}")]
    DeleteAcked(#[source] StoreError),
    /// The link reported a write the uplink never asked for.
    #[error("publish {0} sent that was never requested")]
    UnrequestedSend(u16),
    #[error("downlink: {0}")]
    Downlink(#[source] BrokerError),
    #[error("nothing received for {silent_s:.1}s (keep-alive {keep_alive_s}s): link is dead")]
    Dead { silent_s: f64, keep_alive_s: u64 },
    #[error(
        "the broker has not answered a PUBLISH for {waited_s:.0}s while the link is alive; reconnecting to send it again"
    )]
    Unanswered { waited_s: f64 },
    #[error("reconnect requested")]
    ReconnectRequested,
}

/// v5 DISCONNECT reason: Packet too large.
pub const PACKET_TOO_LARGE: u8 = 0x95;

impl LinkError {
    /// Classifies an I/O error by what it says about the path.
    pub fn io(e: io::Error) -> LinkError {
        match e.kind() {
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => LinkError::Reset(e),
            io::ErrorKind::TimedOut => LinkError::TimedOut(e),
            _ => LinkError::Io(e),
        }
    }

    /// The peer closed the connection on its own, without saying why (the way a broker that
    /// cannot take a message behaves: NATS with a `.` in a topic). Only a repetition of this
    /// with the same message at the head is evidence against it. A reset is not: carrier
    /// NATs and firewalls send them to healthy connections, so it is the network's.
    pub fn peer_closed(&self) -> bool {
        matches!(
            self,
            LinkError::Closed | LinkError::Disconnected { code: None, .. }
        )
    }
}
