//! The tables behind [`super::BrokerState`]'s lock (sessions, retained messages, counters)
//! and the operations more than one of its methods shares: queueing a delivery for a session,
//! routing a message to every matching session, the round robin of shared subscriptions,
//! handing a leaving member's shared messages to another member, removing a session. Each
//! appends the store writes it implies to `ops`; the caller submits them under the same lock.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::broker::persist::Op;
use crate::broker::retained::Retained;
use crate::broker::session::{Delivery, OutState, Session};
use crate::broker::subscriptions::{shared_parts, Subscription};
use crate::broker::{BrokerStats, Hooks};

use super::writes::Writes;
use super::NotOwner;
use crate::message::{Message, QoS};
use crate::topic;

/// What the lock guards. Only [`super::BrokerState`]'s methods reach it.
pub(super) struct Tables {
    pub(super) sessions: HashMap<String, Session>,
    /// Shared with the store's writer thread, which settles retained changes as they commit.
    pub(super) retained: Arc<Mutex<Retained>>,
    pub(super) stats: BrokerStats,
    /// Round-robin position per shared subscription (`$share/{group}/{filter}`).
    pub(super) share_turn: HashMap<String, usize>,
    pub(super) next_conn_id: u64,
    pub(super) next_seq: i64,
}

impl Tables {
    /// The retained messages; poisoning is ignored as for the tables' own lock.
    pub(super) fn retained(&self) -> MutexGuard<'_, Retained> {
        self.retained.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The session of `client_id` if connection `conn_id` holds it.
    pub(super) fn owned(
        &mut self,
        client_id: &str,
        conn_id: u64,
    ) -> Result<&mut Session, NotOwner> {
        self.sessions
            .get_mut(client_id)
            .filter(|s| s.conn.as_ref().is_some_and(|c| c.conn_id == conn_id))
            .ok_or(NotOwner)
    }

    /// Queues a delivery for one session, persisting it if the session is persistent.
    pub(super) fn enqueue(
        &mut self,
        client_id: &str,
        mut d: Delivery,
        limit: usize,
        ops: &mut Vec<Op>,
    ) {
        let Some(session) = self.sessions.get_mut(client_id) else {
            return;
        };
        // QoS 0 is not kept for a client that is not there to take it.
        if session.conn.is_none() && d.qos == QoS::AtMostOnce {
            return;
        }
        if session.persistent() && d.qos != QoS::AtMostOnce && d.seq.is_none() {
            self.next_seq += 1;
            d.seq = Some(self.next_seq);
            ops.push(Op::InsertMsg {
                client_id: client_id.to_string(),
                seq: self.next_seq,
                delivery: d.clone(),
            });
        }
        if let Some(gone) = session.enqueue(d, limit) {
            self.stats.dropped_queue_full += 1;
            log::warn!(
                "local broker: queue of client '{client_id}' is full ({limit}); dropped a message on '{}'",
                gone.msg.topic
            );
            if let Some(seq) = gone.seq {
                ops.push(Op::DeleteMsg { seq });
            }
        }
        if let Some(c) = &session.conn {
            c.notify.notify_one();
        }
    }

    /// The next member of shared subscription `filter` to get a message on `topic`, round
    /// robin over the members sorted by client id; connected members first, and a session
    /// that is away only when nobody of the group is connected. `exclude`: a member that is
    /// going away. Returns the member's client id and subscription.
    pub(super) fn next_share_member(
        &mut self,
        hooks: &dyn Hooks,
        filter: &str,
        topic_name: &str,
        exclude: Option<&str>,
        connected_only: bool,
    ) -> Option<(String, Subscription)> {
        let mut members: Vec<(&String, &Subscription, bool)> = self
            .sessions
            .iter()
            .filter(|(cid, _)| Some(cid.as_str()) != exclude)
            .filter_map(|(cid, s)| {
                s.subs
                    .iter()
                    .find(|sub| sub.filter == filter)
                    .map(|sub| (cid, sub, s.conn.is_some()))
            })
            .filter(|(cid, _, _)| hooks.may_receive(cid, topic_name))
            .collect();
        if members.iter().any(|m| m.2) {
            members.retain(|m| m.2);
        } else if connected_only {
            return None;
        }
        if members.is_empty() {
            return None;
        }
        members.sort_by(|a, b| a.0.cmp(b.0));
        let turn = self.share_turn.entry(filter.to_string()).or_insert(0);
        let (cid, sub, _) = members[*turn % members.len()];
        *turn = turn.wrapping_add(1);
        Some((cid.clone(), sub.clone()))
    }

    /// Hands the messages a leaving member got through shared subscriptions and has not
    /// acknowledged to another connected member of the same group (MQTT 5 §4.8.2): those not
    /// sent yet and QoS 1 ones awaiting PUBACK. A QoS 2 message once sent stays with the
    /// member whatever its state ([MQTT-4.8.2-4]: its delivery is completed when the member
    /// reconnects; [MQTT-4.8.2-5]: no other member gets it, also if the session ends). With
    /// no other member connected everything stays with the session.
    pub(super) fn reassign_shared(
        &mut self,
        hooks: &dyn Hooks,
        client_id: &str,
        limit: usize,
        ops: &mut Vec<Op>,
    ) {
        let Some(s) = self.sessions.get_mut(client_id) else {
            return;
        };
        let mut taken = Vec::new();
        let mut keep_inflight = VecDeque::new();
        for f in s.inflight.drain(..) {
            if f.delivery.shared.is_some() && f.state == OutState::Puback {
                taken.push(f.delivery);
            } else {
                keep_inflight.push_back(f);
            }
        }
        s.inflight = keep_inflight;
        let mut keep_queue = VecDeque::new();
        for d in s.queue.drain(..) {
            if d.shared.is_some() {
                taken.push(d);
            } else {
                keep_queue.push_back(d);
            }
        }
        s.queue = keep_queue;
        let mut back = Vec::new();
        for mut d in taken {
            let filter = d.shared.clone().unwrap_or_default();
            match self.next_share_member(hooks, &filter, &d.msg.topic, Some(client_id), true) {
                Some((target, sub)) => {
                    log::info!(
                        "local broker: '{client_id}' left with a message on '{}' of '{filter}' unacknowledged; sending it to '{target}'",
                        d.msg.topic
                    );
                    if let Some(seq) = d.seq.take() {
                        ops.push(Op::DeleteMsg { seq });
                    }
                    d.qos = d.msg.qos.min(sub.qos);
                    self.enqueue(&target, d, limit, ops);
                }
                None => back.push(d),
            }
        }
        if let Some(s) = self.sessions.get_mut(client_id) {
            for d in back.into_iter().rev() {
                s.queue.push_front(d);
            }
        }
    }

    /// Removes a session and its rows.
    pub(super) fn remove_session(&mut self, client_id: &str, ops: &mut Vec<Op>) -> Option<Session> {
        let s = self.sessions.remove(client_id)?;
        if s.persistent() {
            ops.push(Op::DeleteSession {
                client_id: client_id.to_string(),
            });
        }
        Some(s)
    }

    /// Queues `msg` for every matching session and applies its retain flag (a change settled
    /// when `w` commits). Returns how many sessions it was queued for.
    pub(super) fn route(
        &mut self,
        hooks: &dyn Hooks,
        limit: usize,
        msg: &Arc<Message>,
        publisher: Option<&str>,
        w: &mut Writes,
    ) -> usize {
        let ops = &mut w.ops;
        if msg.retain {
            let (stored, write) = self.retained().apply(msg);
            w.retained = Some(write);
            if stored {
                ops.push(Op::UpsertRetained(Arc::clone(msg)));
            } else {
                ops.push(Op::DeleteRetained {
                    topic: msg.topic.clone(),
                });
            }
        }
        let mut targets = Vec::new();
        let mut shares = BTreeSet::new();
        for (cid, s) in &self.sessions {
            for sub in s.subs.iter() {
                if shared_parts(&sub.filter).is_some_and(|(_, f)| topic::matches(f, &msg.topic)) {
                    shares.insert(sub.filter.clone());
                }
            }
            let own = publisher == Some(cid.as_str());
            if !hooks.may_receive(cid, &msg.topic) {
                continue;
            }
            if let Some(m) = s.subs.matching(&msg.topic, own) {
                targets.push((cid.clone(), m));
            }
        }
        let mut reached = targets.len();
        // One member of each shared subscription gets the message.
        for filter in shares {
            if let Some((cid, sub)) =
                self.next_share_member(hooks, &filter, &msg.topic, None, false)
            {
                let d = Delivery {
                    msg: Arc::clone(msg),
                    qos: msg.qos.min(sub.qos),
                    retain: msg.retain && sub.retain_as_published,
                    sub_ids: sub.id.into_iter().collect(),
                    seq: None,
                    shared: Some(filter),
                };
                self.enqueue(&cid, d, limit, ops);
                reached += 1;
            }
        }
        for (cid, m) in targets {
            let d = Delivery {
                shared: None,
                msg: Arc::clone(msg),
                qos: msg.qos.min(m.qos),
                retain: msg.retain && m.retain_as_published,
                sub_ids: m.sub_ids,
                seq: None,
            };
            self.enqueue(&cid, d, limit, ops);
        }
        reached
    }
}
