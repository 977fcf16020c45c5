//! The retained health document upstream: `{status_topic}/detail` (by default
//! `trains/{train_id}/status/detail`), so the control centre sees more than online/offline:
//! link state and since when, queue depth, age of the oldest waiting message, version, uptime.
//!
//! It goes through the durable queue like any iPad message (route `status`, priority 0, so it
//! overtakes a backlog), which keeps the uplink's drain code the only sender. The catch is a
//! long outage: a document every interval would pile up stale copies that all get sent on
//! reconnect. So at most one document is pending at a time: the next one is enqueued only once
//! the previous row has left the queue (acknowledged by the central broker, or dropped), which a
//! primary-key lookup ([`Queue::is_queued`]) tells cheaply. After an outage the pending
//! document (written when the link went down) is sent first, and a fresh one follows right
//! behind it. This needs no new queue semantics, at the price of one slightly stale document
//! per outage, which carries its own `at_ms`.

use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;

use super::Sources;
use crate::clock::Stamp;
use crate::message::{Message, Properties, QoS};
use crate::shutdown::Shutdown;
use crate::store::queue::{NewEntry, Queue};
use crate::store::StoreError;

/// Route name of the health document in the queue and in status figures.
pub const ROUTE: &str = "status";
/// How often a wanted document re-checks whether the pending one has left the queue.
const RECHECK: Duration = Duration::from_secs(1);

/// Publishes the health document on link changes and every `interval` (0 = off).
pub struct Detail {
    pub topic: String,
    pub sources: Sources,
    pub interval: watch::Receiver<Duration>,
}

impl Detail {
    pub async fn run(mut self, mut shutdown: Shutdown) {
        let mut changes = self.sources.uplink.changes();
        // A document left pending by an earlier run counts: at priority 0 it heads the
        // delivery order, so the first row tells (unless a route of the config also uses
        // priority 0 and holds older rows; then one extra copy is queued).
        let mut pending: Option<i64> = match self.sources.queue.next_batch(Vec::new(), 1).await {
            Ok(first) => first.into_iter().find(|e| e.route == ROUTE).map(|e| e.id),
            Err(_) => None,
        };
        let mut want = true;
        let mut every = *self.interval.borrow_and_update();
        let mut next = tokio::time::Instant::now() + every;
        loop {
            if every.is_zero() {
                want = false;
            }
            if want {
                if let Some(id) = pending {
                    match self.sources.queue.is_queued(id).await {
                        Ok(true) => {}
                        Ok(false) => pending = None,
                        Err(e) => log::warn!("status detail: cannot check the queue: {e}"),
                    }
                }
                if pending.is_none() {
                    match self.enqueue(&self.sources.queue).await {
                        Ok(id) => pending = Some(id),
                        Err(e) => log::warn!(route = ROUTE; "status detail: not queued: {e}"),
                    }
                    want = false;
                    next = tokio::time::Instant::now() + every;
                }
            }
            let wake_at = if every.is_zero() {
                tokio::time::Instant::now() + Duration::from_secs(3600)
            } else {
                next
            };
            tokio::select! {
                _ = tokio::time::sleep_until(wake_at) => {
                    // Due again one interval from now, whether or not this one can be queued
                    // (a deadline left in the past would wake this loop at once, forever).
                    want = !every.is_zero();
                    next = tokio::time::Instant::now() + every;
                }
                r = changes.changed() => {
                    if r.is_err() { return; }
                    want = true;
                }
                r = self.interval.changed() => {
                    if r.is_err() { return; }
                    every = *self.interval.borrow_and_update();
                    next = tokio::time::Instant::now() + every;
                }
                _ = tokio::time::sleep(RECHECK), if want => {}
                _ = shutdown.recv() => return,
            }
        }
    }

    async fn enqueue(&self, queue: &Queue) -> Result<i64, StoreError> {
        let s = self.sources.summary().await;
        let now = Stamp::now();
        let doc = serde_json::json!({
            "v": 1,
            "train_id": s.train_id,
            "version": s.version,
            "link": s.uplink.state,
            "link_since_ms": s.uplink.link_since_ms,
            "last_error": s.uplink.last_error,
            "queue_depth": s.store.depth,
            "queue_bytes": s.store.bytes,
            "oldest_age_s": s.store.oldest_age_s,
            "clients": s.local.clients,
            "ledger": s.ledger,
            "uptime_s": s.uptime_s,
            "at_ms": now.wall_ms,
        });
        let entry = NewEntry {
            route: ROUTE.into(),
            priority: 0,
            message: Message {
                topic: self.topic.clone(),
                payload: Bytes::from(doc.to_string()),
                qos: QoS::AtLeastOnce,
                retain: true,
                properties: Properties::default(),
                accepted: now,
                deadline: None,
            },
        };
        match queue.enqueue(entry).await {
            Ok(Ok(id)) => Ok(id),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(StoreError::Closed),
        }
    }
}
