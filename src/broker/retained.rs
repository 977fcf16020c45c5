//! Retained messages, one per topic, kept in memory and mirrored in SQLite (see `persist`).

use std::collections::HashMap;
use std::sync::Arc;

use crate::clock::Stamp;
use crate::message::Message;
use crate::topic;

#[derive(Debug, Default)]
pub struct Retained {
    by_topic: HashMap<String, Arc<Message>>,
}

impl Retained {
    /// Stores `msg` for its topic, or clears the topic if its payload is empty (MQTT §3.3.1.3).
    /// Returns true if it was stored.
    pub fn apply(&mut self, msg: &Arc<Message>) -> bool {
        if msg.payload.is_empty() {
            self.by_topic.remove(&msg.topic);
            false
        } else {
            self.by_topic.insert(msg.topic.clone(), Arc::clone(msg));
            true
        }
    }

    /// The retained message of `topic`, if any.
    pub fn get(&self, topic: &str) -> Option<&Arc<Message>> {
        self.by_topic.get(topic)
    }

    pub fn insert_loaded(&mut self, msg: Message) {
        self.by_topic.insert(msg.topic.clone(), Arc::new(msg));
    }

    /// Live retained messages matching `filter`.
    pub fn matching(&self, filter: &str, now: &Stamp) -> Vec<Arc<Message>> {
        let mut out: Vec<Arc<Message>> = self
            .by_topic
            .values()
            .filter(|m| !m.is_expired(now) && topic::matches(filter, &m.topic))
            .cloned()
            .collect();
        out.sort_by(|a, b| a.topic.cmp(&b.topic));
        out
    }

    /// Removes expired messages and returns their topics (for deleting their rows).
    pub fn remove_expired(&mut self, now: &Stamp) -> Vec<String> {
        let gone: Vec<String> = self
            .by_topic
            .values()
            .filter(|m| m.is_expired(now))
            .map(|m| m.topic.clone())
            .collect();
        for t in &gone {
            self.by_topic.remove(t);
        }
        gone
    }

    pub fn len(&self) -> usize {
        self.by_topic.len()
    }
}
