//! The relay's side of the local broker: what is accepted from the iPads goes through the
//! uplink routes into the store, and the iPad is acknowledged only once it is committed.

use std::sync::Arc;

use bytes::Bytes;

use crate::auth::Auth;
use crate::broker::{
    AuthVerdict, BrokerEvent, ClientInfo, ConnectRequest, Hooks, Ingest, Protocol, RejectReason,
};
use crate::clock::Stamp;
use crate::config::Conflate;
use crate::freshness::{Admission, Check, Freshness};
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
    /// Drops outdated messages of routes with a version source.
    freshness: Option<Arc<Freshness>>,
    /// Levels of `{device_prefix}`: `{device_prefix}/{client_id}/...` is private to that client.
    device_prefix: Option<Vec<String>>,
    /// Credentials and ACLs of local clients; `None`: everyone in, no ACL.
    auth: Option<Arc<Auth>>,
}

impl RelayHooks {
    pub fn new(routes: SharedRoutes, queue: Queue, train_id: &str) -> RelayHooks {
        let relay_only = routes.load().down_local_patterns();
        RelayHooks {
            routes,
            queue,
            train_id: train_id.to_string(),
            relay_only,
            freshness: None,
            device_prefix: None,
            auth: None,
        }
    }

    /// Authenticates local clients and applies their ACLs.
    pub fn with_auth(mut self, auth: Arc<Auth>) -> RelayHooks {
        self.auth = Some(auth);
        self
    }

    /// Drops outdated uplink messages (accepted and acknowledged, not queued).
    pub fn with_freshness(mut self, freshness: Arc<Freshness>) -> RelayHooks {
        self.freshness = Some(freshness);
        self
    }

    /// Makes `{prefix}/{client_id}/...` private to the client with that id.
    pub fn with_device_prefix(mut self, prefix: &str) -> RelayHooks {
        self.device_prefix = Some(prefix.split('/').map(str::to_string).collect());
        self
    }

    fn presence(&self, client: &ClientInfo, state: &str) {
        // One level, one-to-one: `a/b` and `a_b` get different presence topics.
        let id = topic::id_level(&client.client_id);
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

type Verdict = tokio::sync::oneshot::Receiver<Result<(), RejectReason>>;

/// Queues `entry`, with the version row of `admission` in the same transaction. The iPad's
/// verdict is made on the store's writer thread right after the commit (which also settles
/// the admitted version), and goes from there straight to the connection that waits for it.
fn enqueue(
    queue: &Queue,
    entry: NewEntry,
    conflate_key: Option<String>,
    admission: Option<Admission>,
) -> Verdict {
    let write = admission.as_ref().map(Admission::write);
    queue.enqueue_answered(entry, conflate_key, write, move |committed| {
        settle(committed, admission)
    })
}

/// The iPad's verdict from the enqueue's outcome; settles the admitted version with it.
fn settle(
    committed: Result<i64, StoreError>,
    admission: Option<Admission>,
) -> Result<(), RejectReason> {
    let answer = match committed {
        Ok(_) => Ok(()),
        Err(StoreError::Full) => Err(RejectReason::QuotaExceeded),
        Err(e) => {
            log::error!("store: cannot accept a message: {e}");
            Err(RejectReason::UnspecifiedError)
        }
    };
    if let Some(admission) = admission {
        admission.settle(answer.is_ok());
    }
    answer
}

/// Whether `filter` names another client's device level literally (`{prefix}/{other}` or
/// `{prefix}/{other}/...`, wildcards after it or not): it could never receive anything.
fn names_other_device(prefix: &[String], filter: &str, own: &str) -> bool {
    let mut levels = filter.split('/');
    for p in prefix {
        if levels.next() != Some(p.as_str()) {
            return false;
        }
    }
    // The device level holds the id encoded by [`topic::id_level`]: id `a/b` owns
    // `{prefix}/a%2Fb`.
    matches!(levels.next(), Some(id) if id != topic::id_level(own) && id != "+" && id != "#")
}

/// Whether `topic` is `{prefix}/{id}/...` for an `id` other than `own`.
fn is_other_device_topic(prefix: &[String], topic_name: &str, own: &str) -> bool {
    let mut levels = topic_name.split('/');
    for p in prefix {
        if levels.next() != Some(p.as_str()) {
            return false;
        }
    }
    matches!(levels.next(), Some(id) if id != topic::id_level(own))
}

impl Hooks for RelayHooks {
    fn authenticate(&self, req: &ConnectRequest<'_>) -> AuthVerdict {
        match &self.auth {
            Some(auth) => {
                auth.authenticate(req.client_id, req.username, req.password, req.cert_identity)
            }
            None => AuthVerdict::Allow,
        }
    }

    /// A filter naming another client's device topics explicitly is refused (it could never
    /// receive anything). Wildcard filters (`down/#`, `down/device/+/x`) are allowed: the
    /// per-delivery check [`Hooks::may_receive`] keeps other clients' device topics out.
    fn may_subscribe(&self, client: &ClientInfo, filter: &str) -> bool {
        let Some(prefix) = &self.device_prefix else {
            return self
                .auth
                .as_ref()
                .map_or(true, |a| a.may_subscribe(client, filter));
        };
        !names_other_device(prefix, filter, &client.client_id)
            && self
                .auth
                .as_ref()
                .map_or(true, |a| a.may_subscribe(client, filter))
    }

    fn may_receive(&self, client_id: &str, topic_name: &str) -> bool {
        match &self.device_prefix {
            Some(prefix) => !is_other_device_topic(prefix, topic_name, client_id),
            None => true,
        }
    }

    /// Downlink routes' local topics are closed to every client, whatever its ACL says.
    fn may_publish(&self, client: &ClientInfo, topic_name: &str) -> bool {
        !self
            .relay_only
            .iter()
            .any(|pattern| topic::matches(pattern, topic_name))
            && self
                .auth
                .as_ref()
                .map_or(true, |a| a.may_publish(client, topic_name))
    }

    fn ingest(&self, _client: &ClientInfo, msg: &Message) -> Ingest {
        let routes = self.routes.load();
        let Some((route, remote_topic)) = routes.up(&msg.topic) else {
            // No uplink route takes it: only local subscribers may; a v5 publisher learns when
            // nobody does (PUBACK 0x10).
            return Ingest::Unrouted;
        };
        let mut admission = None;
        let mut must_wait = false;
        if let Some(freshness) = &self.freshness {
            match freshness.check(route, msg) {
                // Outdated against a committed version: accept and drop; the iPad's resend is
                // answered, the central broker never sees the outdated message.
                Check::Outdated => return Ingest::Accept,
                Check::Fresh(a) => admission = a,
                // Not newer than a version whose commit is pending: the verdict waits for it.
                Check::Wait(_) => must_wait = true,
            }
        }
        let conflate_key = (route.conflate == Conflate::Latest).then(|| route.key_of(msg));
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
        if !must_wait {
            // Submitted here, in arrival order, so the queue keeps the iPad's order.
            return Ingest::Pending(enqueue(&self.queue, entry, conflate_key, admission));
        }
        let (Some(freshness), route, msg) = (self.freshness.clone(), route.clone(), msg.clone())
        else {
            return Ingest::Reject(RejectReason::UnspecifiedError);
        };
        let (verdict, pending) = tokio::sync::oneshot::channel();
        let queue = self.queue.clone();
        tokio::spawn(async move {
            let answer = match freshness.admit_committed(&route, &msg).await {
                None => Ok(()),
                Some(admission) => enqueue(&queue, entry, conflate_key, admission)
                    .await
                    .unwrap_or(Err(RejectReason::UnspecifiedError)),
            };
            if verdict.send(answer).is_err() {
                log::debug!("relay: the publisher left before its message was settled");
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix() -> Vec<String> {
        vec!["down".into(), "device".into()]
    }

    #[test]
    fn device_topics_are_private() {
        let p = prefix();
        assert!(names_other_device(&p, "down/device/ipad2/#", "ipad1"));
        assert!(names_other_device(&p, "down/device/ipad2", "ipad1"));
        assert!(names_other_device(&p, "down/device/ipad2/+/x", "ipad1"));
        assert!(!names_other_device(&p, "down/device/ipad1/#", "ipad1"));
        assert!(!names_other_device(&p, "down/device/+/x", "ipad1"));
        assert!(!names_other_device(&p, "down/#", "ipad1"));
        assert!(!names_other_device(&p, "down/speed", "ipad1"));
        assert!(is_other_device_topic(&p, "down/device/ipad2/msg", "ipad1"));
        assert!(!is_other_device_topic(&p, "down/device/ipad1/msg", "ipad1"));
        assert!(!is_other_device_topic(&p, "down/speed", "ipad1"));
        // Ids that are not one topic level own their encoded level, and nothing else.
        assert!(!names_other_device(&p, "down/device/a%2Fb/#", "a/b"));
        assert!(names_other_device(&p, "down/device/a/#", "a/b"));
        assert!(!is_other_device_topic(&p, "down/device/a%2Fb/x", "a/b"));
        assert!(is_other_device_topic(&p, "down/device/a%2Fb/x", "a"));
        assert!(is_other_device_topic(&p, "down/device/a/b/x", "a/b"));
    }
}
