//! The broker's shared state and the one path every message takes to its subscribers.
//!
//! All state that more than one connection touches (sessions, retained messages, counters) sits
//! behind one `std::sync::Mutex`. Critical sections are short and never span an `.await`; hooks
//! are never called with the lock held, so a hook may call back into [`super::BrokerHandle`].
//! Store writes are *submitted* while the lock is held, which keeps the rows in the order of the
//! state changes without waiting for the disk inside the lock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;

use super::codec::WillSpec;
use super::persist::{self, Op};
use super::retained::Retained;
use super::session::{Delivery, Session};
use super::subscriptions::{shared_parts, Subscription};
use super::{BrokerConfig, BrokerEvent, BrokerStats, ClientInfo, Hooks, Ingest};
use crate::clock::Stamp;
use crate::message::{Message, QoS};
use crate::store::{Db, StoreError, StoreWrite};
use crate::topic;

pub type Commit = oneshot::Receiver<Result<(), StoreError>>;

pub struct State {
    pub sessions: HashMap<String, Session>,
    pub retained: Retained,
    pub stats: BrokerStats,
    /// Round-robin position per shared subscription (`$share/{group}/{filter}`).
    share_turn: HashMap<String, usize>,
    next_conn_id: u64,
    next_seq: i64,
}

impl State {
    pub fn new_conn_id(&mut self) -> u64 {
        self.next_conn_id += 1;
        self.next_conn_id
    }

    /// Queues a delivery for one session, persisting it if the session is persistent.
    pub fn enqueue(&mut self, client_id: &str, mut d: Delivery, limit: usize, ops: &mut Vec<Op>) {
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
    pub fn next_share_member(
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

    /// Hands the unacknowledged messages a leaving member got through shared subscriptions
    /// to another connected member of the same group (MQTT 5 §4.8.2); with no other member
    /// connected they stay with the session. QoS 2 messages already PUBREC'd stay: the
    /// member has them.
    pub fn reassign_shared(
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
        let mut keep_inflight = std::collections::VecDeque::new();
        for f in s.inflight.drain(..) {
            if f.delivery.shared.is_some() && f.state != super::session::OutState::Pubcomp {
                taken.push(f.delivery);
            } else {
                keep_inflight.push_back(f);
            }
        }
        s.inflight = keep_inflight;
        let mut keep_queue = std::collections::VecDeque::new();
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
    pub fn remove_session(&mut self, client_id: &str, ops: &mut Vec<Op>) -> Option<Session> {
        let s = self.sessions.remove(client_id)?;
        if s.persistent() {
            ops.push(Op::DeleteSession {
                client_id: client_id.to_string(),
            });
        }
        Some(s)
    }
}

/// `authenticate` calls running at once.
const AUTH_SLOTS: usize = 2;

pub struct Shared {
    pub config: BrokerConfig,
    pub db: Db,
    pub hooks: Arc<dyn Hooks>,
    state: Mutex<State>,
    /// Sockets open, including those that have not sent CONNECT yet.
    pub open_sockets: AtomicUsize,
    /// Set once shutdown begins: no new connections, `inject` refused.
    pub closed: AtomicBool,
    /// Open sockets per source address (`max_connections_per_address`).
    pub addresses: super::limits::AddressCounts,
    /// Authentication failures per source address, for delaying refusals.
    pub failures: super::limits::FailureThrottle,
    /// Bounds concurrent `authenticate` calls: password hashing is slow and memory-hungry on
    /// purpose, so a burst of logins must not occupy every thread or megabytes each.
    pub auth_slots: Arc<tokio::sync::Semaphore>,
    /// Wills handed to the ingest hook whose verdict is still awaited; shutdown waits for
    /// them, so the wills of clients closed at shutdown reach the store (and the uplink).
    wills_pending: AtomicUsize,
    wills_done: tokio::sync::Notify,
}

impl Shared {
    /// Builds the state from what the store holds.
    pub fn new(
        config: BrokerConfig,
        db: Db,
        hooks: Arc<dyn Hooks>,
        loaded: persist::Loaded,
    ) -> (Shared, Vec<Op>) {
        let now = Stamp::now();
        let mut ops = Vec::new();
        let mut sessions = HashMap::new();
        for ls in loaded.sessions {
            let expiry_ms = i64::from(ls.expiry_secs) * 1000;
            let gone_ms = ls
                .disconnected_wall
                .map(|w| (now.wall_ms - w).max(0))
                .unwrap_or(0);
            let left = expiry_ms - gone_ms;
            if left <= 0 {
                log::info!(
                    "local broker: session '{}' expired while stopped",
                    ls.client_id
                );
                ops.push(Op::DeleteSession {
                    client_id: ls.client_id,
                });
                continue;
            }
            let mut s = Session::new(ls.client_id.clone(), ls.expiry_secs);
            for sub in ls.subs {
                s.subs.insert(sub);
            }
            for (d, released) in ls.messages {
                if released || d.msg.is_expired(&now) {
                    if let Some(seq) = d.seq {
                        ops.push(Op::DeleteMsg { seq });
                    }
                    continue;
                }
                s.queue.push_back(d);
            }
            s.incoming_qos2.extend(ls.incoming_qos2);
            s.expires_at = Some(now.plus(Duration::from_millis(left as u64)));
            ops.push(Op::SessionDisconnected {
                client_id: ls.client_id.clone(),
                wall_ms: ls.disconnected_wall.unwrap_or(now.wall_ms),
            });
            sessions.insert(ls.client_id, s);
        }
        let mut retained = Retained::default();
        for m in loaded.retained {
            if m.is_expired(&now) {
                ops.push(Op::DeleteRetained { topic: m.topic });
            } else {
                retained.insert_loaded(m);
            }
        }
        log::info!(
            "local broker: loaded {} persistent sessions and {} retained messages",
            sessions.len(),
            retained.len()
        );
        let state = State {
            sessions,
            retained,
            stats: BrokerStats::default(),
            share_turn: HashMap::new(),
            next_conn_id: 0,
            next_seq: loaded.max_seq,
        };
        (
            Shared {
                config,
                db,
                hooks,
                state: Mutex::new(state),
                open_sockets: AtomicUsize::new(0),
                closed: AtomicBool::new(false),
                addresses: Default::default(),
                failures: Default::default(),
                auth_slots: Arc::new(tokio::sync::Semaphore::new(AUTH_SLOTS)),
                wills_pending: AtomicUsize::new(0),
                wills_done: tokio::sync::Notify::new(),
            },
            ops,
        )
    }

    /// The state lock. A panic while it was held cannot leave it half-written in a way that
    /// matters more than stopping the broker would, so poisoning is ignored.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends `ops` to the store; call with the lock held to keep rows in state order.
    pub fn submit(&self, ops: Vec<Op>) -> Option<Commit> {
        if ops.is_empty() {
            return None;
        }
        Some(self.db.submit(move |conn| persist::apply(conn, &ops)))
    }

    /// Routes `msg` to every matching session and applies its retain flag. `publisher`: the
    /// client id of the sender, for No Local. Returns the commit of the durable part.
    pub fn publish(&self, msg: Message, publisher: Option<&str>) -> Option<Commit> {
        self.publish_reaching(msg, publisher).0
    }

    /// [`Shared::publish`] whose durable part also runs `also`, in the same store job, and is
    /// always submitted (so the caller learns when `also` is committed).
    pub fn publish_with(&self, msg: Message, also: StoreWrite) -> Commit {
        let msg = Arc::new(msg);
        let mut st = self.lock();
        let mut ops = Vec::new();
        self.route_locked(&mut st, &msg, None, &mut ops);
        self.db.submit(move |conn| {
            also(conn)?;
            persist::apply(conn, &ops)
        })
    }

    /// [`Shared::publish`] that also tells how many sessions the message was queued for.
    pub fn publish_reaching(
        &self,
        msg: Message,
        publisher: Option<&str>,
    ) -> (Option<Commit>, usize) {
        let msg = Arc::new(msg);
        let mut st = self.lock();
        let mut ops = Vec::new();
        let reached = self.route_locked(&mut st, &msg, publisher, &mut ops);
        (self.submit(ops), reached)
    }

    fn route_locked(
        &self,
        st: &mut State,
        msg: &Arc<Message>,
        publisher: Option<&str>,
        ops: &mut Vec<Op>,
    ) -> usize {
        if msg.retain {
            if st.retained.apply(msg) {
                ops.push(Op::UpsertRetained(Arc::clone(msg)));
            } else {
                ops.push(Op::DeleteRetained {
                    topic: msg.topic.clone(),
                });
            }
        }
        let mut targets = Vec::new();
        let mut shares = std::collections::BTreeSet::new();
        for (cid, s) in &st.sessions {
            for sub in s.subs.iter() {
                if shared_parts(&sub.filter).is_some_and(|(_, f)| topic::matches(f, &msg.topic)) {
                    shares.insert(sub.filter.clone());
                }
            }
            let own = publisher == Some(cid.as_str());
            if !self.hooks.may_receive(cid, &msg.topic) {
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
                st.next_share_member(self.hooks.as_ref(), &filter, &msg.topic, None, false)
            {
                let d = Delivery {
                    msg: Arc::clone(msg),
                    qos: msg.qos.min(sub.qos),
                    retain: msg.retain && sub.retain_as_published,
                    sub_ids: sub.id.into_iter().collect(),
                    seq: None,
                    shared: Some(filter),
                };
                st.enqueue(&cid, d, self.config.max_queued_messages, ops);
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
            st.enqueue(&cid, d, self.config.max_queued_messages, ops);
        }
        reached
    }

    /// Publishes a client's will: through the ingest hook (so it reaches the uplink queue like
    /// any other message from that client), then to local subscribers if accepted.
    pub fn fire_will(self: &Arc<Self>, info: ClientInfo, will: WillSpec) {
        let accepted = Stamp::now();
        let msg = Message {
            topic: will.topic.clone(),
            payload: will.payload,
            qos: will.qos,
            retain: will.retain,
            properties: will.properties,
            accepted,
            deadline: will
                .expiry
                .map(|s| accepted.plus(Duration::from_secs(u64::from(s)))),
        };
        log::info!(
            "local broker: publishing the will of '{}' on '{}'",
            info.client_id,
            msg.topic
        );
        let event = BrokerEvent::WillPublished {
            client_id: info.client_id.clone(),
            topic: msg.topic.clone(),
        };
        match self.hooks.ingest(&info, &msg) {
            Ingest::Accept | Ingest::Unrouted => {
                self.lock().stats.messages_in += 1;
                let _ = self.publish(msg, Some(&info.client_id));
                self.hooks.on_event(event);
            }
            Ingest::Reject(r) => {
                log::warn!(
                    "local broker: will of '{}' refused by ingest: {r:?}",
                    info.client_id
                );
            }
            Ingest::Pending(rx) => {
                let shared = Arc::clone(self);
                self.wills_pending.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let verdict = rx.await;
                    shared.wills_pending.fetch_sub(1, Ordering::SeqCst);
                    shared.wills_done.notify_waiters();
                    if let Ok(Ok(())) = verdict {
                        shared.lock().stats.messages_in += 1;
                        let _ = shared.publish(msg, Some(&info.client_id));
                        shared.hooks.on_event(event);
                    } else {
                        log::warn!(
                            "local broker: will of '{}' refused by ingest",
                            info.client_id
                        );
                    }
                });
            }
        }
    }

    /// Waits until every will handed to the ingest hook has its verdict.
    pub async fn wills_settled(&self) {
        loop {
            let done = self.wills_done.notified();
            if self.wills_pending.load(Ordering::SeqCst) == 0 {
                return;
            }
            done.await;
        }
    }

    /// Starts the will delay of a session whose connection ended abnormally. The will fires
    /// when the delay runs out or when the session ends, whichever is first; a reconnect
    /// cancels it.
    pub fn schedule_will(
        self: &Arc<Self>,
        info: ClientInfo,
        will: WillSpec,
        delay: Duration,
    ) -> oneshot::Sender<()> {
        let (cancel, mut cancelled) = oneshot::channel::<()>();
        let shared = Arc::clone(self);
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                r = &mut cancelled => {
                    if r.is_ok() {
                        return;
                    }
                    // The session ended (its sender was dropped): publish now.
                }
            }
            shared.fire_will(info, will);
        });
        cancel
    }

    /// Ends expired sessions and drops expired retained and queued messages.
    pub fn sweep(&self) {
        let now = Stamp::now();
        let mut st = self.lock();
        let mut ops = Vec::new();
        let expired: Vec<String> = st
            .sessions
            .values()
            .filter(|s| s.conn.is_none() && s.expires_at.is_some_and(|e| e.is_past(&now)))
            .map(|s| s.client_id.clone())
            .collect();
        for cid in expired {
            log::info!("local broker: session '{cid}' expired");
            st.remove_session(&cid, &mut ops);
        }
        for topic in st.retained.remove_expired(&now) {
            ops.push(Op::DeleteRetained { topic });
        }
        let mut dropped = 0u64;
        for s in st.sessions.values_mut() {
            if s.conn.is_some() {
                continue;
            }
            s.queue.retain(|d| {
                if d.msg.is_expired(&now) {
                    dropped += 1;
                    if let Some(seq) = d.seq {
                        ops.push(Op::DeleteMsg { seq });
                    }
                    false
                } else {
                    true
                }
            });
        }
        st.stats.dropped_expired += dropped;
        let _ = self.submit(ops);
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}
