//! The downlink: what the central broker sends, mapped onto local topics and handed to the
//! local broker. Expired messages are dropped here, before any iPad can see them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::broker::{BrokerError, BrokerHandle};
use crate::clock::Stamp;
use crate::message::{Message, QoS};
use crate::route::SharedRoutes;

/// Counters of the downlink.
#[derive(Debug, Default)]
pub struct DownlinkCounters {
    pub delivered: AtomicU64,
    pub expired: AtomicU64,
    pub unrouted: AtomicU64,
}

/// Hands messages from the central broker to the local broker.
#[derive(Clone)]
pub struct Downlink {
    routes: SharedRoutes,
    broker: BrokerHandle,
    counters: Arc<DownlinkCounters>,
}

impl Downlink {
    pub fn new(routes: SharedRoutes, broker: BrokerHandle) -> Downlink {
        Downlink {
            routes,
            broker,
            counters: Arc::default(),
        }
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
        if route.qos == 0 {
            msg.qos = QoS::AtMostOnce;
        }
        msg.topic = local_topic;
        self.broker.inject(msg).await?;
        self.counters.delivered.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}
