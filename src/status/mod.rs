//! The maintenance view of the daemon: a local Unix socket that answers `trainrelay status`
//! (and scripts), and a retained health document published upstream for the control centre.
//!
//! - [`protocol`]: the request/response types (newline-delimited JSON, versioned);
//! - [`server`]: the socket (permissions, peer credentials, size/time/concurrency limits);
//! - [`client`]: what the `trainrelay status` command uses, and its human summary;
//! - [`detail`]: the retained `…/status/detail` document.
//!
//! Everything reported is gathered on request from the owners of the state (uplink status
//! handle, queue, broker, downlink); nothing here keeps a second copy. Nothing reported may
//! contain a secret: the uplink endpoint is shown without user info, and no password or
//! payload is ever part of a report.

pub mod client;
pub(crate) mod detail;
pub mod metrics;
pub mod protocol;
pub(crate) mod server;

use std::time::{Duration, Instant};

use crate::broker::{BrokerHandle, Protocol};
use crate::clock::Stamp;
use crate::downlink::Downlink;
use crate::store::queue::Queue;
use crate::uplink::{LinkState, StatusHandle};
use protocol::{
    ClientReport, ConnectionReport, Counters, DownlinkReport, LedgerReport, LocalReport,
    RouteReport, StatusReport, StoreReport, UplinkReport,
};

/// How long a status query waits for the store's per-route figures before answering with the
/// in-memory totals only.
const STATS_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the figures come from.
#[derive(Clone)]
pub(crate) struct Sources {
    pub train_id: String,
    pub endpoint: String,
    pub listen: String,
    pub max_bytes: u64,
    pub started: Instant,
    pub started_ms: i64,
    pub uplink: StatusHandle,
    pub queue: Queue,
    pub broker: BrokerHandle,
    pub downlink: Downlink,
    pub freshness: std::sync::Arc<crate::freshness::Freshness>,
}

impl Sources {
    /// The `status` answer, with the store's figures per route.
    pub async fn status(&self) -> StatusReport {
        self.report(true).await
    }

    /// [`Sources::status`] without the per-route figures of the store, whose cost grows with
    /// the backlog: for the health document, produced on every link change.
    pub async fn summary(&self) -> StatusReport {
        self.report(false).await
    }

    async fn report(&self, per_route: bool) -> StatusReport {
        let now = Stamp::now();
        let link = self.uplink.snapshot();
        let age = |s: Option<Stamp>| s.map(|s| now.since(&s).as_secs());
        let stats = async {
            if per_route {
                self.queue.stats().await
            } else {
                self.queue.summary().await
            }
        };
        let store = match tokio::time::timeout(STATS_TIMEOUT, stats).await {
            Ok(Ok(stats)) => StoreReport {
                depth: stats.depth,
                bytes: stats.bytes,
                max_bytes: self.max_bytes,
                oldest_age_s: age(stats.oldest_accepted),
                routes: stats
                    .routes
                    .into_iter()
                    .map(|r| RouteReport {
                        route: r.route,
                        depth: r.depth,
                        bytes: r.bytes,
                        oldest_age_s: age(r.oldest_accepted),
                    })
                    .collect(),
                partial: false,
            },
            _ => {
                let totals = self.queue.totals();
                StoreReport {
                    depth: totals.rows,
                    bytes: totals.bytes,
                    max_bytes: self.max_bytes,
                    oldest_age_s: None,
                    routes: Vec::new(),
                    partial: true,
                }
            }
        };
        let connections = self.uplink.connections();
        let in_flight = connections.iter().map(|c| c.in_flight).sum();
        let ledger = match tokio::time::timeout(STATS_TIMEOUT, self.queue.ledger()).await {
            Ok(Ok(routes)) => LedgerReport {
                routes,
                in_flight,
                partial: false,
            },
            _ => LedgerReport {
                routes: Vec::new(),
                in_flight,
                partial: true,
            },
        };
        let q = self.queue.counters();
        let b = self.broker.stats();
        let d = self.downlink.counters();
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        StatusReport {
            version: env!("CARGO_PKG_VERSION").into(),
            train_id: self.train_id.clone(),
            pid: std::process::id(),
            started_ms: self.started_ms,
            uptime_s: self.started.elapsed().as_secs(),
            uplink: UplinkReport {
                // The endpoint in use or being tried (one of `endpoints`), the configured
                // one until the uplink first tries one.
                endpoint: link
                    .endpoint
                    .clone()
                    .unwrap_or_else(|| self.endpoint.clone()),
                state: state_name(link.state).into(),
                since_ms: link.since_ms,
                for_s: u64::try_from((now.wall_ms - link.since_ms).max(0) / 1000).unwrap_or(0),
                last_error: link.last_error,
                link_since_ms: link.link_since_ms,
                link_for_s: u64::try_from((now.wall_ms - link.link_since_ms).max(0) / 1000)
                    .unwrap_or(0),
                connects: link.connects,
                connections: connections
                    .into_iter()
                    .map(|c| ConnectionReport {
                        client_id: c.client_id,
                        state: state_name(c.state).into(),
                        endpoint: c.endpoint,
                        last_error: c.last_error,
                        connects: c.connects,
                        window: c.window,
                        in_flight: c.in_flight,
                        max_in_flight: c.max_in_flight,
                        forwarded: c.forwarded,
                    })
                    .collect(),
            },
            store,
            counters: Counters {
                accepted: q.accepted,
                forwarded: link.forwarded,
                acked: q.acked,
                expired_dropped: q.expired,
                full_dropped: q.dropped_full,
                full_rejected: q.rejected_full,
                corrupt_dropped: q.corrupt,
                duplicates_resent: link.resent,
                dead_lettered: link.dead_lettered,
                conflated: q.conflated,
                suppressed_up: self.freshness.suppressed_up(),
                suppressed_down: self.freshness.suppressed_down(),
                unchanged_down: load(&d.unchanged),
            },
            local: LocalReport {
                listen: self.listen.clone(),
                clients: self.broker.clients().len() as u64,
                connections: b.connections,
                refused_connections: b.refused_connections,
                protocol_errors: b.protocol_errors,
                receive_maximum_exceeded: b.receive_maximum_exceeded,
                messages_in: b.messages_in,
                messages_out: b.messages_out,
                dropped_queue_full: b.dropped_queue_full,
                dropped_expired: b.dropped_expired,
                dropped_too_large: b.dropped_too_large,
                denied_publish: b.denied_publish,
                denied_subscribe: b.denied_subscribe,
            },
            downlink: DownlinkReport {
                delivered: load(&d.delivered),
                expired: load(&d.expired),
                unrouted: load(&d.unrouted),
            },
            ledger,
        }
    }

    /// The `clients` answer.
    pub fn clients(&self) -> Vec<ClientReport> {
        let now_ms = Stamp::now().wall_ms;
        self.broker
            .clients()
            .into_iter()
            .map(|c| ClientReport {
                client_id: c.client_id,
                address: c.peer.to_string(),
                protocol: match c.protocol {
                    Protocol::V5 => "5".into(),
                    Protocol::V311 => "3.1.1".into(),
                },
                since_ms: c.connected_since_ms,
                connected_s: u64::try_from((now_ms - c.connected_since_ms).max(0) / 1000)
                    .unwrap_or(0),
                subscriptions: c.subscriptions as u64,
            })
            .collect()
    }
}

/// The wire name of a link state.
pub(crate) fn state_name(state: LinkState) -> &'static str {
    match state {
        LinkState::Connecting => "connecting",
        LinkState::Connected => "connected",
        LinkState::Draining => "draining",
        LinkState::BackingOff => "backing_off",
        LinkState::Stopped => "stopped",
    }
}
