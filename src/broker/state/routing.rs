//! Routing: a message to every matching session (one member per shared subscription), its
//! retain flag applied, and whether a retained message would change anything.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use super::writes::Outcome;
use super::{BrokerState, Commit};
use crate::clock::Stamp;
use crate::message::Message;
use crate::store::StoreWrite;

impl BrokerState {
    /// Whether `msg` would change nothing as the retained message of `topic`: the same
    /// payload with the same properties is retained there and lives at least as long. The
    /// user property named `stamp` (the injector's own, different on every copy) is left out
    /// of the comparison. Only a committed retained message counts: a copy whose store write
    /// is pending or failed does not make the next one redundant.
    pub fn repeats_retained(&self, topic: &str, msg: &Message, stamp: &str) -> bool {
        let t = self.lock();
        let retained = t.retained();
        let Some(held) = retained.committed(topic) else {
            return false;
        };
        let now = Stamp::now();
        let lives_as_long = match (held.deadline, msg.deadline) {
            (None, _) => true,
            (Some(_), None) => false,
            // A second of slack: the central broker forwards expiry in whole seconds.
            (Some(h), Some(m)) => {
                h.remaining(&now).unwrap_or_default() + Duration::from_secs(1)
                    >= m.remaining(&now).unwrap_or_default()
            }
        };
        // What an iPad would see: the payload and the properties (the expiry is weighed above).
        let user = |p: &crate::message::Properties| {
            p.user_properties
                .iter()
                .filter(|(k, _)| k != stamp)
                .cloned()
                .collect::<Vec<_>>()
        };
        let (h, m) = (&held.properties, &msg.properties);
        let same_properties = h.payload_format_indicator == m.payload_format_indicator
            && h.content_type == m.content_type
            && h.response_topic == m.response_topic
            && h.correlation_data == m.correlation_data
            && user(h) == user(m);
        held.payload == msg.payload && same_properties && !held.is_expired(&now) && lives_as_long
    }

    /// Routes `msg` to every matching session and applies its retain flag, as the relay
    /// itself (no publisher). Returns the commit of the durable part, for the caller to await.
    pub fn publish(&self, msg: Message) -> Option<Commit> {
        let msg = Arc::new(msg);
        let limit = self.config.max_queued_messages;
        let (_, commit) = self.change(Outcome::Awaited, |t, w| {
            t.route(self.hooks.as_ref(), limit, &msg, None, w)
        });
        commit
    }

    /// [`BrokerState::publish`] whose durable part also runs `also`, in the same store job,
    /// and is always submitted (so the caller learns when `also` is committed).
    pub fn publish_with(&self, msg: Message, also: StoreWrite) -> Commit {
        let msg = Arc::new(msg);
        let limit = self.config.max_queued_messages;
        let (_, commit) = self.change(Outcome::Awaited, |t, w| {
            w.also = Some(also);
            t.route(self.hooks.as_ref(), limit, &msg, None, w)
        });
        // With `also` there is always a job.
        commit.unwrap_or_else(|| {
            let (done, commit) = oneshot::channel();
            let _ = done.send(Ok(()));
            commit
        })
    }

    /// Counts and routes a message from client `publisher` (No Local applies). Returns how
    /// many sessions it was queued for.
    pub fn publish_from(&self, publisher: &str, msg: Message) -> usize {
        let msg = Arc::new(msg);
        let limit = self.config.max_queued_messages;
        let outcome = Outcome::Logged {
            client_id: Some(publisher),
            during: "routing a message it published",
        };
        let (reached, _) = self.change(outcome, |t, w| {
            t.stats.messages_in += 1;
            t.route(self.hooks.as_ref(), limit, &msg, Some(publisher), w)
        });
        reached
    }
}
