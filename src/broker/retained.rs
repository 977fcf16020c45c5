//! Retained messages, one per topic, kept in memory and mirrored in SQLite (see `persist`).
//!
//! Memory follows the store: a retained message (or its clearing) is routed at once, so it is
//! served to a subscription read after it, but it becomes *committed* only when its store
//! write commits ([`Retained::settle`]); if that write fails it is forgotten and the topic
//! serves what the store holds. What is committed is what a restart loads, and what a
//! message must repeat to be found unchanged.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::clock::Stamp;
use crate::message::Message;
use crate::topic;

/// A change of one topic's retained message whose store write is not committed yet.
#[derive(Debug)]
pub struct RetainedWrite {
    topic: String,
    token: u64,
}

/// A submitted change of one topic: its token, and the new message (`None` clears the topic).
type Change = (u64, Option<Arc<Message>>);

#[derive(Debug, Default)]
pub struct Retained {
    /// What the store holds.
    committed: HashMap<String, Arc<Message>>,
    /// Changes submitted to the store and not settled, per topic in submission order.
    pending: HashMap<String, VecDeque<Change>>,
    next_token: u64,
}

impl Retained {
    /// Makes `msg` the retained message of its topic, or clears the topic if its payload is
    /// empty (MQTT §3.3.1.3), until [`Retained::settle`] says whether its store write
    /// committed. Returns true if it is stored (not cleared).
    pub fn apply(&mut self, msg: &Arc<Message>) -> (bool, RetainedWrite) {
        self.next_token += 1;
        let token = self.next_token;
        let value = (!msg.payload.is_empty()).then(|| Arc::clone(msg));
        let stored = value.is_some();
        self.pending
            .entry(msg.topic.clone())
            .or_default()
            .push_back((token, value));
        let write = RetainedWrite {
            topic: msg.topic.clone(),
            token,
        };
        (stored, write)
    }

    /// The outcome of the store write of `w`: committed, the change is what the store holds;
    /// failed, it is forgotten.
    pub fn settle(&mut self, w: &RetainedWrite, committed: bool) {
        let Some(queue) = self.pending.get_mut(&w.topic) else {
            return;
        };
        let Some(pos) = queue.iter().position(|(t, _)| *t == w.token) else {
            return;
        };
        let change = queue
            .remove(pos)
            .and_then(|(_, v)| Some(v).filter(|_| committed));
        if queue.is_empty() {
            self.pending.remove(&w.topic);
        }
        match change {
            Some(Some(m)) => {
                self.committed.insert(w.topic.clone(), m);
            }
            Some(None) => {
                self.committed.remove(&w.topic);
            }
            None => {}
        }
    }

    /// The retained message of `topic` as the store holds it.
    pub fn committed(&self, topic: &str) -> Option<&Arc<Message>> {
        self.committed.get(topic)
    }

    /// The retained message `topic` serves: its newest change, committed or not.
    fn served(&self, topic: &str) -> Option<&Arc<Message>> {
        match self.pending.get(topic).and_then(|q| q.back()) {
            Some((_, v)) => v.as_ref(),
            None => self.committed.get(topic),
        }
    }

    pub fn insert_loaded(&mut self, msg: Message) {
        self.committed.insert(msg.topic.clone(), Arc::new(msg));
    }

    /// Live retained messages matching `filter`.
    pub fn matching(&self, filter: &str, now: &Stamp) -> Vec<Arc<Message>> {
        let topics = self.committed.keys().chain(
            self.pending
                .keys()
                .filter(|t| !self.committed.contains_key(*t)),
        );
        let mut out: Vec<Arc<Message>> = topics
            .filter_map(|t| self.served(t))
            .filter(|m| !m.is_expired(now) && topic::matches(filter, &m.topic))
            .cloned()
            .collect();
        out.sort_by(|a, b| a.topic.cmp(&b.topic));
        out
    }

    /// Removes expired committed messages of topics with no change pending and returns their
    /// topics (for deleting their rows; a pending change writes the row anyway).
    pub fn remove_expired(&mut self, now: &Stamp) -> Vec<String> {
        let gone: Vec<String> = self
            .committed
            .values()
            .filter(|m| m.is_expired(now) && !self.pending.contains_key(&m.topic))
            .map(|m| m.topic.clone())
            .collect();
        for t in &gone {
            self.committed.remove(t);
        }
        gone
    }

    pub fn len(&self) -> usize {
        self.committed.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn m(topic: &str, payload: &str) -> Arc<Message> {
        Arc::new(Message {
            topic: topic.into(),
            payload: Bytes::from(payload.to_string()),
            qos: crate::message::QoS::AtLeastOnce,
            retain: true,
            properties: Default::default(),
            accepted: Stamp::now(),
            deadline: None,
        })
    }

    fn payload(r: &Retained, topic: &str) -> (Option<String>, Option<String>) {
        let text =
            |m: Option<&Arc<Message>>| m.map(|m| String::from_utf8_lossy(&m.payload).into_owned());
        (text(r.served(topic)), text(r.committed(topic)))
    }

    fn some(served: &str, committed: &str) -> (Option<String>, Option<String>) {
        (Some(served.into()), Some(committed.into()))
    }

    #[test]
    fn a_change_is_served_at_once_and_committed_only_with_its_write() {
        let mut r = Retained::default();
        r.insert_loaded((*m("t", "a")).clone());
        let (_, b) = r.apply(&m("t", "b"));
        let (_, c) = r.apply(&m("t", "c"));
        assert_eq!(payload(&r, "t"), some("c", "a"));
        r.settle(&b, true);
        assert_eq!(payload(&r, "t"), some("c", "b"));
        r.settle(&c, false);
        assert_eq!(payload(&r, "t"), some("b", "b"));

        // The newer change fails, the older commits: the older one stays.
        let (_, d) = r.apply(&m("t", "d"));
        let (_, e) = r.apply(&m("t", "e"));
        r.settle(&d, false);
        assert_eq!(payload(&r, "t"), some("e", "b"));
        r.settle(&e, false);
        assert_eq!(payload(&r, "t"), some("b", "b"));

        // A clearing that fails leaves the message.
        let (stored, clear) = r.apply(&m("t", ""));
        assert!(!stored);
        assert_eq!(payload(&r, "t"), (None, Some("b".into())));
        assert!(r.matching("#", &Stamp::now()).is_empty());
        r.settle(&clear, false);
        assert_eq!(r.matching("#", &Stamp::now()).len(), 1);
        let (_, clear) = r.apply(&m("t", ""));
        r.settle(&clear, true);
        assert_eq!(payload(&r, "t"), (None, None));
        assert_eq!(r.len(), 0);
    }
}
