//! The downlink: what the central broker sends, mapped onto local topics and handed to the
//! local broker. Expired messages are dropped here, before any iPad can see them, and so are
//! outdated ones (routes with a version source, see [`crate::freshness`]).
//!
//! Every injected message carries the v5 user property [`ACCEPTED_MS_PROPERTY`]: the
//! wall-clock milliseconds since the epoch when the relay received it from the central broker.
//! It stays with the retained copy across relay restarts, so a v5 iPad can tell how old a
//! state is (`now - accepted`), even one served from the store while the uplink is down.
//! MQTT 3.1.1 iPads do not get properties.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::broker::{BrokerError, BrokerHandle};
use crate::clock::Stamp;
use crate::freshness::Freshness;
use crate::message::{Message, QoS};
use crate::route::SharedRoutes;

/// User property added to every downlink message: when the relay received it (wall-clock ms).
pub const ACCEPTED_MS_PROPERTY: &str = "trainrelay-accepted-ms";

/// Counters of the downlink.
#[derive(Debug, Default)]
pub struct DownlinkCounters {
    pub delivered: AtomicU64,
    pub expired: AtomicU64,
    pub unrouted: AtomicU64,
    /// Dropped as outdated by a route's version source.
    pub suppressed: AtomicU64,
    /// Retained messages that repeated the local retained state (the snapshot asked for on
    /// every connect), not delivered again.
    pub unchanged: AtomicU64,
}

/// Hands messages from the central broker to the local broker.
#[derive(Clone)]
pub struct Downlink {
    routes: SharedRoutes,
    broker: BrokerHandle,
    counters: Arc<DownlinkCounters>,
    freshness: Option<Arc<Freshness>>,
}

impl Downlink {
    pub fn new(routes: SharedRoutes, broker: BrokerHandle) -> Downlink {
        Downlink {
            routes,
            broker,
            counters: Arc::default(),
            freshness: None,
        }
    }

    /// Drops outdated messages of routes with a version source.
    pub fn with_freshness(mut self, freshness: Arc<Freshness>) -> Downlink {
        self.freshness = Some(freshness);
        self
    }

    pub fn counters(&self) -> &DownlinkCounters {
        &self.counters
    }

    /// Maps and injects one message. Resolves once the local broker has taken it durably,
    /// so the caller may then acknowledge it to the central broker.
    pub async fn deliver(&self, mut msg: Message) -> Result<(), BrokerError> {
        let routes = self.routes.load();
        let Some((route, local_topic)) = routes.down(&msg.topic) else {
            self.counters.unrouted.fetch_add(1, Ordering::Relaxed);
            log::debug!("downlink: no route for '{}', dropped", msg.topic);
            return Ok(());
        };
        if msg.deadline.is_none() {
            msg.deadline = route.ttl.map(|ttl| msg.accepted.plus(ttl));
        }
        if msg.is_expired(&Stamp::now()) {
            self.counters.expired.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        if route.state {
            // 3.1.1 central brokers clear the flag on live delivery: the route says it is state.
            msg.retain = true;
        }
        if msg.retain
            && self
                .broker
                .repeats_retained(&local_topic, &msg, ACCEPTED_MS_PROPERTY)
        {
            self.counters.unchanged.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let mut admission = None;
        if let Some(freshness) = &self.freshness {
            // Outdated only against a committed version: a redelivery racing the commit of the
            // copy it is compared with waits for that commit.
            match freshness.admit_committed(route, &msg).await {
                None => {
                    self.counters.suppressed.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Some(a) => admission = a,
            }
        }
        if route.qos == 0 {
            msg.qos = QoS::AtMostOnce;
        }
        let props = &mut msg.properties.user_properties;
        props.retain(|(k, _)| k != ACCEPTED_MS_PROPERTY);
        props.push((
            ACCEPTED_MS_PROPERTY.to_string(),
            msg.accepted.wall_ms.to_string(),
        ));
        msg.topic = local_topic;
        // The version row commits in the same transaction as the message's rows, or not at
        // all; not committed, the message is not acknowledged upstream, and the central
        // broker's redelivery must pass.
        let injected = match &admission {
            Some(a) => self.broker.inject_with(msg, a.write()).await,
            None => self.broker.inject(msg).await,
        };
        if let Some(a) = admission {
            a.settle(injected.is_ok());
        }
        injected?;
        self.counters.delivered.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}
