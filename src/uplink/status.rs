//! The uplink's state machine as others see it: the status socket and the logs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::{watch, Notify};

use crate::clock::Stamp;
use crate::watchdog::Heartbeat;

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

struct Inner {
    state: LinkState,
    since_ms: i64,
    last_error: Option<String>,
    endpoint: Option<String>,
    /// Source address of the route to the endpoint when the connection came up.
    route_source: Option<std::net::IpAddr>,
    link_since_ms: i64,
}

/// Shared, cheap to clone.
#[derive(Clone)]
pub struct StatusHandle {
    inner: Arc<Mutex<Inner>>,
    connects: Arc<AtomicU64>,
    forwarded: Arc<AtomicU64>,
    resent: Arc<AtomicU64>,
    dead_lettered: Arc<AtomicU64>,
    reconnect: Arc<Notify>,
    /// Bumped on every state change, for those who report changes (sd_notify STATUS=, the
    /// retained health document).
    changes: Arc<watch::Sender<u64>>,
    /// Beaten by the uplink loop; the systemd watchdog stops pinging when it goes stale.
    heartbeat: Heartbeat,
}

impl Default for StatusHandle {
    fn default() -> Self {
        StatusHandle {
            inner: Arc::new(Mutex::new(Inner {
                state: LinkState::Connecting,
                since_ms: Stamp::now().wall_ms,
                last_error: None,
                endpoint: None,
                route_source: None,
                link_since_ms: Stamp::now().wall_ms,
            })),
            connects: Arc::default(),
            forwarded: Arc::default(),
            resent: Arc::default(),
            dead_lettered: Arc::default(),
            reconnect: Arc::default(),
            changes: Arc::new(watch::channel(0).0),
            heartbeat: Heartbeat::new("uplink"),
        }
    }
}

impl StatusHandle {
    /// Moves to `state`; returns true if that is a change (worth logging).
    pub fn set(&self, state: LinkState, error: Option<String>) -> bool {
        let mut inner = match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if state == LinkState::Connected {
            self.connects.fetch_add(1, Ordering::Relaxed);
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
        inner.state = state;
        inner.since_ms = now_ms;
        drop(inner);
        self.changes.send_modify(|n| *n += 1);
        true
    }

    /// Switches between `Connected` and `Draining` (and nothing else).
    pub fn set_draining(&self, draining: bool) {
        let mut inner = match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
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

    /// Records the endpoint in use or being tried.
    pub fn set_endpoint(&self, url: &str) {
        let mut inner = match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        // Shown on the status socket and in systemd's STATUS=: never with user info.
        let url = crate::status::redact_url(url);
        if inner.endpoint.as_deref() != Some(url.as_str()) {
            inner.endpoint = Some(url);
        }
    }

    /// Records the route the current connection took (see `netwatch`).
    pub(crate) fn set_route_source(&self, source: Option<std::net::IpAddr>) {
        let mut inner = match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        inner.route_source = source;
    }

    pub(crate) fn route_source(&self) -> Option<std::net::IpAddr> {
        match self.inner.lock() {
            Ok(g) => g.route_source,
            Err(poisoned) => poisoned.into_inner().route_source,
        }
    }

    pub fn snapshot(&self) -> LinkStatus {
        let inner = match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        LinkStatus {
            state: inner.state,
            since_ms: inner.since_ms,
            last_error: inner.last_error.clone(),
            endpoint: inner.endpoint.clone(),
            link_since_ms: inner.link_since_ms,
            connects: self.connects.load(Ordering::Relaxed),
            forwarded: self.forwarded.load(Ordering::Relaxed),
            resent: self.resent.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
        }
    }

    pub fn count_forwarded(&self, n: u64) {
        self.forwarded.fetch_add(n, Ordering::Relaxed);
    }

    pub fn count_resent(&self, n: u64) {
        self.resent.fetch_add(n, Ordering::Relaxed);
    }

    pub fn count_dead_lettered(&self, n: u64) {
        self.dead_lettered.fetch_add(n, Ordering::Relaxed);
    }

    /// Asks the uplink to drop the connection and reconnect now.
    pub fn request_reconnect(&self) {
        self.reconnect.notify_one();
    }

    /// Sees every later state change.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The uplink loop's heartbeat.
    pub fn heartbeat(&self) -> &Heartbeat {
        &self.heartbeat
    }

    pub(crate) async fn reconnect_requested(&self) {
        self.reconnect.notified().await;
    }
}
