//! The uplink's state machine as others see it: the status socket and the logs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::{watch, Notify};

use crate::clock::Stamp;
use crate::heartbeat::Heartbeat;

/// Where the uplink is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkState {
    Connecting,
    Connected,
    /// Connected and sending a backlog larger than the in-flight window.
    Draining,
    BackingOff,
    Stopped,
}

/// A snapshot for reporting.
#[derive(Debug, Clone, Serialize)]
pub struct LinkStatus {
    pub state: LinkState,
    /// Wall-clock milliseconds since the epoch when `state` began.
    pub since_ms: i64,
    pub last_error: Option<String>,
    /// The central-broker endpoint (URL) in use or being tried.
    pub endpoint: Option<String>,
    /// Wall-clock milliseconds when the link last came up or went down (start-up counts as
    /// going down): "down since" for a technician, where `since_ms` only tells when the
    /// current retry began.
    pub link_since_ms: i64,
    pub connects: u64,
    pub forwarded: u64,
    /// Rows that were in flight when a connection ended and so are sent again (possible
    /// duplicates at the central broker).
    pub resent: u64,
    /// Messages moved to the dead letters since start (see `Queue::dead_letters`).
    pub dead_lettered: u64,
}

/// One connection's view of its window, for the status report.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionStatus {
    pub client_id: String,
    pub state: LinkState,
    pub endpoint: Option<String>,
    pub last_error: Option<String>,
    pub connects: u64,
    /// The in-flight window of the current connection (0 while none is up).
    pub window: u64,
    /// QoS 1 PUBLISHes written or queued and not yet acknowledged.
    pub in_flight: u64,
    /// The most ever in flight at once on this connection's connections: never above the
    /// window the broker allowed.
    pub max_in_flight: u64,
    /// Messages this connection delivered (its share of the traffic).
    pub forwarded: u64,
}

struct Inner {
    state: LinkState,
    since_ms: i64,
    last_error: Option<String>,
    /// As configured, user info included; reported without it.
    endpoint: Option<String>,
    /// Source address of the route to the endpoint when the connection came up.
    route_source: Option<std::net::IpAddr>,
    link_since_ms: i64,
}

/// What one uplink connection reports.
struct Lane {
    client_id: Mutex<String>,
    inner: Mutex<Inner>,
    connects: AtomicU64,
    window: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    forwarded: AtomicU64,
    reconnect: Notify,
    /// Beaten by the connection's loop; the systemd watchdog stops pinging when it goes stale.
    heartbeat: Heartbeat,
}

impl Lane {
    fn new() -> Lane {
        let now = Stamp::now().wall_ms;
        Lane {
            client_id: Mutex::new(String::new()),
            inner: Mutex::new(Inner {
                state: LinkState::Connecting,
                since_ms: now,
                last_error: None,
                endpoint: None,
                route_source: None,
                link_since_ms: now,
            }),
            connects: AtomicU64::new(0),
            window: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
            reconnect: Notify::new(),
            heartbeat: Heartbeat::new("uplink"),
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What all connections share.
struct Totals {
    forwarded: AtomicU64,
    resent: AtomicU64,
    dead_lettered: AtomicU64,
    /// Every connection's lane, the first one (presence, downlink) first.
    lanes: Mutex<Vec<Arc<Lane>>>,
    /// Bumped on every state change, for those who report changes (sd_notify STATUS=, the
    /// retained health document).
    changes: watch::Sender<u64>,
}

/// One uplink connection's status, with the totals of all of them. Shared, cheap to clone;
/// [`StatusHandle::default`] is the first connection's, [`StatusHandle::another`] adds one.
#[derive(Clone)]
pub struct StatusHandle {
    lane: Arc<Lane>,
    totals: Arc<Totals>,
}

impl Default for StatusHandle {
    fn default() -> Self {
        let lane = Arc::new(Lane::new());
        StatusHandle {
            totals: Arc::new(Totals {
                forwarded: AtomicU64::new(0),
                resent: AtomicU64::new(0),
                dead_lettered: AtomicU64::new(0),
                lanes: Mutex::new(vec![Arc::clone(&lane)]),
                changes: watch::channel(0).0,
            }),
            lane,
        }
    }
}

impl StatusHandle {
    /// The status of one more connection, sharing the totals.
    pub fn another(&self) -> StatusHandle {
        let lane = Arc::new(Lane::new());
        self.lanes().push(Arc::clone(&lane));
        StatusHandle {
            lane,
            totals: Arc::clone(&self.totals),
        }
    }

    fn lanes(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Lane>>> {
        self.totals.lanes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves to `state`; returns true if that is a change (worth logging).
    pub fn set(&self, state: LinkState, error: Option<String>) -> bool {
        let mut inner = self.lane.inner();
        if state == LinkState::Connected {
            self.lane.connects.fetch_add(1, Ordering::Relaxed);
        }
        if error.is_some() {
            inner.last_error = error;
        }
        if inner.state == state {
            return false;
        }
        let now_ms = Stamp::now().wall_ms;
        let up = |s: LinkState| matches!(s, LinkState::Connected | LinkState::Draining);
        if up(inner.state) != up(state) {
            inner.link_since_ms = now_ms;
        }
        if !up(state) {
            self.lane.window.store(0, Ordering::Relaxed);
            self.lane.in_flight.store(0, Ordering::Relaxed);
        }
        inner.state = state;
        inner.since_ms = now_ms;
        drop(inner);
        self.totals.changes.send_modify(|n| *n += 1);
        true
    }

    /// Switches between `Connected` and `Draining` (and nothing else).
    pub fn set_draining(&self, draining: bool) {
        let mut inner = self.lane.inner();
        let next = if draining {
            LinkState::Draining
        } else {
            LinkState::Connected
        };
        if matches!(inner.state, LinkState::Connected | LinkState::Draining) && inner.state != next
        {
            inner.state = next;
            inner.since_ms = Stamp::now().wall_ms;
        }
    }

    /// The client id this connection uses.
    pub fn set_client_id(&self, id: &str) {
        *self
            .lane
            .client_id
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = id.to_string();
    }

    /// The window of the current connection and what is in flight on it.
    pub fn set_window(&self, window: usize, in_flight: usize) {
        let (window, in_flight) = (window as u64, in_flight as u64);
        self.lane.window.store(window, Ordering::Relaxed);
        self.lane.in_flight.store(in_flight, Ordering::Relaxed);
        self.lane
            .max_in_flight
            .fetch_max(in_flight, Ordering::Relaxed);
    }

    /// Records the endpoint in use or being tried.
    pub fn set_endpoint(&self, url: &str) {
        let mut inner = self.lane.inner();
        if inner.endpoint.as_deref() != Some(url) {
            inner.endpoint = Some(url.to_string());
        }
    }

    /// The endpoint in use or being tried, as configured (user info included).
    pub(crate) fn endpoint_url(&self) -> Option<String> {
        self.lane.inner().endpoint.clone()
    }

    /// Records the route the current connection took (see `netwatch`).
    pub(crate) fn set_route_source(&self, source: Option<std::net::IpAddr>) {
        self.lane.inner().route_source = source;
    }

    pub(crate) fn route_source(&self) -> Option<std::net::IpAddr> {
        self.lane.inner().route_source
    }

    /// This connection's state with the totals of all connections.
    pub fn snapshot(&self) -> LinkStatus {
        let inner = self.lane.inner();
        LinkStatus {
            state: inner.state,
            since_ms: inner.since_ms,
            last_error: inner.last_error.clone(),
            // Shown on the status socket and in systemd's STATUS=: never with user info.
            endpoint: inner.endpoint.as_deref().map(super::endpoint::redact_url),
            link_since_ms: inner.link_since_ms,
            connects: self.lane.connects.load(Ordering::Relaxed),
            forwarded: self.totals.forwarded.load(Ordering::Relaxed),
            resent: self.totals.resent.load(Ordering::Relaxed),
            dead_lettered: self.totals.dead_lettered.load(Ordering::Relaxed),
        }
    }

    /// Every connection, the first one (presence, downlink) first.
    pub fn connections(&self) -> Vec<ConnectionStatus> {
        self.lanes()
            .iter()
            .map(|lane| {
                let inner = lane.inner();
                ConnectionStatus {
                    client_id: lane
                        .client_id
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone(),
                    state: inner.state,
                    endpoint: inner.endpoint.as_deref().map(super::endpoint::redact_url),
                    last_error: inner.last_error.clone(),
                    connects: lane.connects.load(Ordering::Relaxed),
                    window: lane.window.load(Ordering::Relaxed),
                    in_flight: lane.in_flight.load(Ordering::Relaxed),
                    max_in_flight: lane.max_in_flight.load(Ordering::Relaxed),
                    forwarded: lane.forwarded.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    pub fn count_forwarded(&self, n: u64) {
        self.lane.forwarded.fetch_add(n, Ordering::Relaxed);
        self.totals.forwarded.fetch_add(n, Ordering::Relaxed);
    }

    pub fn count_resent(&self, n: u64) {
        self.totals.resent.fetch_add(n, Ordering::Relaxed);
    }

    pub fn count_dead_lettered(&self, n: u64) {
        self.totals.dead_lettered.fetch_add(n, Ordering::Relaxed);
    }

    /// Asks every connection to drop its link and reconnect now.
    pub fn request_reconnect(&self) {
        for lane in self.lanes().iter() {
            lane.reconnect.notify_one();
        }
    }

    /// Asks this connection alone to reconnect now (its route changed).
    pub(crate) fn reconnect_this(&self) {
        self.lane.reconnect.notify_one();
    }

    /// Sees every later state change.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.totals.changes.subscribe()
    }

    /// This connection's loop heartbeat.
    pub fn heartbeat(&self) -> &Heartbeat {
        &self.lane.heartbeat
    }

    /// The heartbeats of every connection.
    pub fn heartbeats(&self) -> Vec<Heartbeat> {
        self.lanes().iter().map(|l| l.heartbeat.clone()).collect()
    }

    pub(crate) async fn reconnect_requested(&self) {
        self.lane.reconnect.notified().await;
    }
}
