//! The relay's side of the local broker: what is accepted from the iPads goes through the
//! uplink routes into the store, and the iPad is acknowledged only once it is committed.

use bytes::Bytes;

use crate::broker::{BrokerEvent, ClientInfo, Hooks, Ingest, Protocol, RejectReason};
use crate::clock::Stamp;
use crate::message::{Message, Properties, QoS};
use crate::route::SharedRoutes;
use crate::store::queue::{NewEntry, Queue};
use crate::store::StoreError;
use crate::topic;

/// Route name under which iPad presence is queued.
const PRESENCE_ROUTE: &str = "presence";

/// Implements the broker hooks for the relay.
pub struct RelayHooks {
    routes: SharedRoutes,
    queue: Queue,
    train_id: String,
    /// Local topics that only the relay itself publishes to (downlink destinations).
    relay_only: Vec<String>,
}

impl RelayHooks {
    pub fn new(routes: SharedRoutes, queue: Queue, train_id: &str) -> RelayHooks {
        let relay_only = routes.load().down_local_patterns();
        RelayHooks {
            routes,
            queue,
            train_id: train_id.to_string(),
            relay_only,
        }
    }

    fn presence(&self, client: &ClientInfo, state: &str) {
        let id: String = client
            .client_id
            .chars()
            .map(|c| {
                if matches!(c, '/' | '+' | '#' | '\0') {
                    '_'
                } else {
                    c
                }
            })
            .collect();
        let accepted = Stamp::now();
        let payload = serde_json::json!({
            "state": state,
            "protocol": match client.protocol { Protocol::V5 => "5", Protocol::V311 => "3.1.1" },
            "at_ms": accepted.wall_ms,
        });
        let entry = NewEntry {
            route: PRESENCE_ROUTE.into(),
            priority: 5,
            message: Message {
                topic: format!("trains/{}/clients/{id}", self.train_id),
                payload: Bytes::from(payload.to_string()),
                qos: QoS::AtLeastOnce,
                retain: true,
                properties: Properties::default(),
                accepted,
                deadline: None,
            },
        };
        // Fire and forget: presence is best effort and must not hold up the broker.
        drop(self.queue.enqueue(entry));
    }
}

impl Hooks for RelayHooks {
    fn may_publish(&self, _client: &ClientInfo, topic_name: &str) -> bool {
        !self
            .relay_only
            .iter()
            .any(|pattern| topic::matches(pattern, topic_name))
    }

    fn ingest(&self, _client: &ClientInfo, msg: &Message) -> Ingest {
        let routes = self.routes.load();
        let Some((route, remote_topic)) = routes.up(&msg.topic) else {
            return Ingest::Accept;
        };
        let deadline = msg
            .deadline
            .or_else(|| route.ttl.map(|ttl| msg.accepted.plus(ttl)));
        let qos = if route.qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        let entry = NewEntry {
            route: route.name.clone(),
            priority: route.priority,
            message: Message {
                topic: remote_topic,
                payload: msg.payload.clone(),
                qos,
                retain: msg.retain,
                properties: msg.properties.clone(),
                accepted: msg.accepted,
                deadline,
            },
        };
        let committed = self.queue.enqueue(entry);
        let (verdict, pending) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let answer = match committed.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(StoreError::Full)) => Err(RejectReason::QuotaExceeded),
                Ok(Err(e)) => {
                    log::error!("store: cannot accept a message: {e}");
                    Err(RejectReason::UnspecifiedError)
                }
                Err(_) => Err(RejectReason::UnspecifiedError),
            };
            let _ = verdict.send(answer);
        });
        Ingest::Pending(pending)
    }

    fn on_event(&self, event: BrokerEvent) {
        match event {
            BrokerEvent::Connected(client) => {
                log::info!(
                    client_id = client.client_id.as_str();
                    "iPad '{}' connected from {} ({:?})",
                    client.client_id,
                    client.peer,
                    client.protocol
                );
                self.presence(&client, "online");
            }
            BrokerEvent::Disconnected { client, reason } => {
                log::info!(client_id = client.client_id.as_str(); "iPad '{}' disconnected: {reason}", client.client_id);
                self.presence(&client, "offline");
            }
            BrokerEvent::WillPublished { client_id, topic } => {
                log::info!(client_id = client_id.as_str(); "iPad '{client_id}': will published on '{topic}'");
            }
        }
    }
}
