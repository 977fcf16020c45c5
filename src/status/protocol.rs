//! The status socket's wire format: one JSON object per line each way.
//!
//! A request is `{"v":1,"query":"status"}` (or `"clients"`, `"reconnect"`, `"dead_letters"`,
//! `"requeue"`); the answer is
//! `{"v":1,"ok":true,"status":{...}}` or `{"v":1,"ok":false,"error":"..."}`. `v` is the
//! protocol version: a daemon answers a request of another version with an error that names
//! the version it speaks, so an old `trainrelay status` fails clearly against a new daemon.
//! Fields are only ever added within a version, so scripts may ignore unknown ones.

use serde::{Deserialize, Serialize};

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;

/// Largest request line accepted, newline included.
pub const MAX_REQUEST: usize = 4096;

/// What a client asks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub v: u32,
    pub query: Query,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Query {
    /// The whole picture: uplink, store, counters.
    Status,
    /// The connected iPads.
    Clients,
    /// Drop the uplink connection and reconnect now (skipping the backoff wait).
    Reconnect,
    /// The messages the central broker would not take (oldest first, at most 100).
    DeadLetters,
    /// Put every dead letter back into the queue, in its original place.
    Requeue,
}

/// Why a request line is refused; the text is the reply's error message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("protocol version {0} not supported; this daemon speaks version {VERSION}")]
    Version(u64),
    #[error(
        "malformed request ({0}); expected e.g. {{\"v\":{VERSION},\"query\":\"status\"}} with query status, clients, reconnect, dead_letters or requeue"
    )]
    Malformed(String),
}

/// Reads one request line: the request, or the error message for the reply, naming what is
/// wrong (and, for another protocol version, the version this daemon speaks).
pub fn parse_request(text: &str) -> Result<Request, RequestError> {
    let request: Request = match serde_json::from_str(text) {
        Ok(r) => r,
        Err(e) => {
            // Say which version we speak even when the rest is unreadable.
            let v = serde_json::from_str::<serde_json::Value>(text)
                .ok()
                .and_then(|v| v.get("v").and_then(|v| v.as_u64()));
            return Err(match v {
                Some(v) if v != u64::from(VERSION) => RequestError::Version(v),
                _ => RequestError::Malformed(e.to_string()),
            });
        }
    };
    if request.v != VERSION {
        return Err(RequestError::Version(u64::from(request.v)));
    }
    Ok(request)
}

/// The daemon's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub v: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<StatusReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clients: Option<Vec<ClientReport>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letters: Option<Vec<crate::store::queue::dead_letter::DeadLetter>>,
}

impl Response {
    pub fn error(message: impl Into<String>) -> Response {
        Response {
            v: VERSION,
            ok: false,
            error: Some(message.into()),
            status: None,
            clients: None,
            message: None,
            dead_letters: None,
        }
    }

    pub fn ok() -> Response {
        Response {
            v: VERSION,
            ok: true,
            error: None,
            status: None,
            clients: None,
            message: None,
            dead_letters: None,
        }
    }
}

/// Answer to `status`. Times are wall-clock milliseconds since the Unix epoch (`*_ms`) or
/// durations in whole seconds (`*_s`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub version: String,
    pub train_id: String,
    pub pid: u32,
    pub started_ms: i64,
    pub uptime_s: u64,
    pub uplink: UplinkReport,
    pub store: StoreReport,
    pub counters: Counters,
    pub local: LocalReport,
    pub downlink: DownlinkReport,
    /// What entered the uplink queue and how it left, per route, persisted with the rows.
    #[serde(default)]
    pub ledger: LedgerReport,
}

/// The ledger (docs/operations.md): per route `accepted + requeued = delivered + dropped +
/// in_store`, counted in the store's transactions, so it survives restarts and kill -9.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LedgerReport {
    pub routes: Vec<crate::store::queue::ledger::RouteLedger>,
    /// Of the rows in the store, those in flight on an uplink connection now (all routes).
    pub in_flight: u64,
    /// The ledger could not be read in time (the store is busy).
    #[serde(default)]
    pub partial: bool,
}

/// The uplink's state machine.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UplinkReport {
    /// `mqtt://host:port` (never with credentials).
    pub endpoint: String,
    /// `connecting`, `connected`, `backing_off` or `stopped`.
    pub state: String,
    pub since_ms: i64,
    /// How long it has been in `state`.
    pub for_s: u64,
    pub last_error: Option<String>,
    /// When the link last came up or went down (start-up counts as down): while `state` flips
    /// between `connecting` and `backing_off`, this stays put.
    pub link_since_ms: i64,
    /// How long it has been up (or down).
    pub link_for_s: u64,
    /// Successful connects since start.
    pub connects: u64,
    /// Every parallel uplink connection, the first one (presence, downlink) first; the fields
    /// above are the first one's.
    #[serde(default)]
    pub connections: Vec<ConnectionReport>,
}

/// One uplink connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectionReport {
    pub client_id: String,
    /// As `UplinkReport::state`.
    pub state: String,
    pub endpoint: Option<String>,
    pub last_error: Option<String>,
    pub connects: u64,
    /// The current connection's in-flight window: the broker's Receive Maximum within
    /// `uplink.inflight` (0 while down).
    pub window: u64,
    pub in_flight: u64,
    /// The most in flight at once since start: never above the window.
    pub max_in_flight: u64,
    /// Messages this connection delivered since start (its share of the traffic).
    #[serde(default)]
    pub forwarded: u64,
}

/// What waits in the store for the uplink.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoreReport {
    pub depth: u64,
    pub bytes: u64,
    pub max_bytes: u64,
    /// Age of the oldest waiting message.
    pub oldest_age_s: Option<u64>,
    pub routes: Vec<RouteReport>,
    /// The per-route figures could not be read in time (the store is busy); depth and bytes
    /// are then the in-memory totals.
    #[serde(default)]
    pub partial: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RouteReport {
    pub route: String,
    pub depth: u64,
    pub bytes: u64,
    pub oldest_age_s: Option<u64>,
}

/// Message counters since the daemon started.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Counters {
    /// Committed to the store for the uplink.
    pub accepted: u64,
    /// Acknowledged by the central broker.
    pub forwarded: u64,
    /// Deleted from the store after the central broker's acknowledgement.
    pub acked: u64,
    /// Dropped because their TTL / expiry passed before they could be sent.
    pub expired_dropped: u64,
    /// Oldest messages deleted to make room (`when_full = "drop_oldest"`).
    pub full_dropped: u64,
    /// New messages refused because the store was full (`when_full = "reject_new"`).
    pub full_rejected: u64,
    /// Rows that could not be decoded and were deleted.
    pub corrupt_dropped: u64,
    /// Messages in flight when a connection ended and sent again (possible duplicates).
    pub duplicates_resent: u64,
    /// Moved to the dead letters after the central broker refused them repeatedly.
    #[serde(default)]
    pub dead_lettered: u64,
    /// Waiting rows replaced by a newer one of the same key (`conflate = "latest"`).
    #[serde(default)]
    pub conflated: u64,
    /// Outdated messages dropped (routes with a `version`): from iPads, from the centre.
    #[serde(default)]
    pub suppressed_up: u64,
    #[serde(default)]
    pub suppressed_down: u64,
    /// Retained messages from the centre that repeated the local state (the snapshot asked
    /// for on every connect) and were not delivered again.
    #[serde(default)]
    pub unchanged_down: u64,
}

/// The local broker the iPads use.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LocalReport {
    pub listen: String,
    pub clients: u64,
    pub connections: u64,
    pub refused_connections: u64,
    pub protocol_errors: u64,
    /// v5 clients disconnected (0x93) for exceeding our Receive Maximum.
    #[serde(default)]
    pub receive_maximum_exceeded: u64,
    pub messages_in: u64,
    pub messages_out: u64,
    /// Not delivered to an iPad because its session queue was full.
    pub dropped_queue_full: u64,
    /// Not delivered to an iPad because the message expired while queued.
    pub dropped_expired: u64,
    /// Not delivered to an iPad because it exceeds the iPad's Maximum Packet Size.
    pub dropped_too_large: u64,
    pub denied_publish: u64,
    pub denied_subscribe: u64,
}

/// Central -> iPads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DownlinkReport {
    pub delivered: u64,
    /// Arrived already expired and dropped.
    pub expired: u64,
    /// Matched no downlink route.
    pub unrouted: u64,
}

/// One connected iPad.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientReport {
    pub client_id: String,
    pub address: String,
    /// `"5"` or `"3.1.1"`.
    pub protocol: String,
    pub since_ms: i64,
    pub connected_s: u64,
    pub subscriptions: u64,
}
