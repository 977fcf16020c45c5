//! Why a connection to the central broker ended, typed, so that the uplink can tell the
//! network's fault (a reset, a silent tunnel) from a broker that refuses a message.

use std::io;

/// How a link failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Opening the stream (TCP, proxy, TLS, WebSocket) failed.
    #[error("{0}")]
    Connect(String),
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

    /// The peer closed the connection on its own, cleanly or not, without saying why (the
    /// way a broker that cannot take a message behaves: NATS with a `.` in a topic). Only a
    /// repetition of this with the same message at the head is evidence against it.
    pub fn peer_closed(&self) -> bool {
        matches!(
            self,
            LinkError::Closed | LinkError::Reset(_) | LinkError::Disconnected { code: None, .. }
        )
    }
}
