//! The broker's state and its one owner: sessions, retained messages, counters.
//!
//! [`BrokerState`] is shared by every connection task, but its tables sit behind a private
//! lock and only its methods touch them. Each method is one operation of the broker (attach a
//! connection, subscribe, route a message, take an acknowledgement, detach, expire...): it
//! makes the state change and submits the store writes that go with it. An operation on a
//! session names the connection that makes it (`conn_id`, numbered at CONNECT) and is
//! refused with [`NotOwner`] once another connection holds the session. Critical sections are
//! short and never span an `.await`; the only hook called with the lock held is
//! `may_receive`, so any other hook may call back into [`super::BrokerHandle`]. Store writes
//! are submitted while the lock is held, which keeps the rows in the order of the state
//! changes without waiting for the disk inside the lock. A write whose outcome nobody awaits
//! is watched: if it fails, the log names the client and what the store is now missing.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{oneshot, Notify};

use super::codec::WillSpec;
use super::limits::Admission;
use super::persist::{self, Op};
use super::retained::{Retained, RetainedWrite};
use super::session::{ConnLink, Delivery, Inflight, OutState, Session};
use super::subscriptions::{is_shared, Subscription};
use super::{BrokerConfig, BrokerEvent, BrokerStats, ClientInfo, ClientSummary, Hooks, Ingest};
use crate::clock::Stamp;
use crate::message::{Message, QoS};
use crate::store::{Db, StoreError, StoreWrite};

mod tables;

use self::tables::Tables;

/// The outcome of a store write that the caller waits for.
pub type Commit = oneshot::Receiver<Result<(), StoreError>>;

/// A connection that asks to own a session ([`BrokerState::attach`]).
pub struct Attach {
    /// The live connection; its `info.client_id` names the session.
    pub link: ConnLink,
    /// CONNECT's Clean Start (3.1.1: Clean Session): any old session is discarded.
    pub clean_start: bool,
    /// Session Expiry Interval, already capped.
    pub expiry_secs: u32,
    pub will: Option<WillSpec>,
}

/// Why an outgoing message left the in-flight window unsent: [`BrokerState::send_queued`].
pub struct NotSent(pub String);

/// The connection named in a session operation no longer holds the session (another
/// connection took it over, or it ended): the operation changed nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotOwner;

/// The broker's state: configuration, the hooks, the admission limits, and the session tables
/// that only its methods change.
pub struct BrokerState {
    config: BrokerConfig,
    db: Db,
    hooks: Arc<dyn Hooks>,
    tables: Mutex<Tables>,
    /// The tables' retained messages, for settling changes as the store commits them.
    retained: Arc<Mutex<Retained>>,
    admission: Admission,
    /// Set once shutdown begins: no new connections, `inject` refused.
    closed: AtomicBool,
    /// Wills handed to the ingest hook whose verdict is still awaited; shutdown waits for
    /// them, so the wills of clients closed at shutdown reach the store (and the uplink).
    wills_pending: AtomicUsize,
    wills_done: Notify,
}

impl BrokerState {
    /// Builds the state from what the store holds, and settles in the store what expired
    /// while the daemon was stopped.
    pub async fn load(
        config: BrokerConfig,
        db: Db,
        hooks: Arc<dyn Hooks>,
    ) -> Result<BrokerState, StoreError> {
        let loaded = db.run(persist::load).await?;
        let (state, ops) = BrokerState::from_loaded(config, db, hooks, loaded);
        if let Some(commit) = state.submit(ops) {
            commit.await.map_err(|_| StoreError::Closed)??;
        }
        Ok(state)
    }

    fn from_loaded(
        config: BrokerConfig,
        db: Db,
        hooks: Arc<dyn Hooks>,
        loaded: persist::Loaded,
    ) -> (BrokerState, Vec<Op>) {
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
        let retained = Arc::new(Mutex::new(retained));
        let tables = Tables {
            sessions,
            retained: Arc::clone(&retained),
            stats: BrokerStats::default(),
            share_turn: HashMap::new(),
            next_conn_id: 0,
            next_seq: loaded.max_seq,
        };
        (
            BrokerState {
                config,
                db,
                hooks,
                tables: Mutex::new(tables),
                retained,
                admission: Admission::default(),
                closed: AtomicBool::new(false),
                wills_pending: AtomicUsize::new(0),
                wills_done: Notify::new(),
            },
            ops,
        )
    }

    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    pub fn hooks(&self) -> &Arc<dyn Hooks> {
        &self.hooks
    }

    pub fn admission(&self) -> &Admission {
        &self.admission
    }

    /// The lock. A panic while it was held cannot leave the tables half-written in a way that
    /// matters more than stopping the broker would, so poisoning is ignored.
    fn lock(&self) -> MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends `ops` to the store; called with the lock held to keep rows in state order.
    fn submit(&self, ops: Vec<Op>) -> Option<Commit> {
        self.store(Writes::new(ops), None)
    }

    /// Sends `ops` to the store without waiting; a failure is logged with `client_id` (the
    /// client whose action made the change, if any), `during` and what the rows were. Called
    /// with the lock held to keep rows in state order.
    fn persist(&self, ops: Vec<Op>, client_id: Option<&str>, during: &'static str) {
        drop(self.store(Writes::new(ops), Some((client_id, during))));
    }

    /// Sends the writes of one state change to the store, in one job; called with the lock
    /// held to keep rows in state order. Once the outcome is known, on the store's writer
    /// thread, a retained change is settled with it, and a failure is logged when `blame`
    /// names who made the change (`client_id`, if any) and `during` what; otherwise the
    /// caller awaits the commit. `None` if there is nothing to write.
    fn store(&self, w: Writes, blame: Option<(Option<&str>, &'static str)>) -> Option<Commit> {
        let Writes {
            ops,
            also,
            retained,
        } = w;
        if ops.is_empty() && also.is_none() {
            return None;
        }
        let ops = Arc::new(ops);
        let written = Arc::clone(&ops);
        let blame = blame.map(|(c, during)| (c.map(str::to_string), during));
        let settle = retained.map(|r| (Arc::clone(&self.retained), r));
        Some(self.db.submit_then(
            move |conn| {
                if let Some(also) = also {
                    also(conn)?;
                }
                persist::apply(conn, &written)
            },
            move |result| {
                if let Some((retained, write)) = settle {
                    let mut retained = retained.lock().unwrap_or_else(|p| p.into_inner());
                    retained.settle(&write, result.is_ok());
                }
                if let (Err(e), Some((client, during))) = (&result, blame) {
                    let by = client
                        .map(|c| format!(" of client '{c}'"))
                        .unwrap_or_default();
                    log::error!(
                        "local broker: store write{by} failed ({during}): {e}; not stored, so a restart would not see: {}",
                        describe(&ops)
                    );
                }
                result
            },
        ))
    }

    /// Changes counters.
    pub fn count(&self, f: impl FnOnce(&mut BrokerStats)) {
        f(&mut self.lock().stats);
    }

    pub fn stats(&self) -> BrokerStats {
        self.lock().stats.clone()
    }

    /// Marks the broker as shutting down: no new connections, `inject` refused.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Waits until every store write submitted so far is committed.
    pub async fn flush(&self) -> Result<(), StoreError> {
        // An empty job: its commit means every earlier write is on disk.
        self.db.run(|_| Ok(())).await
    }

    /// Connected clients, sorted by client id.
    pub fn clients(&self) -> Vec<ClientSummary> {
        let t = self.lock();
        let mut out: Vec<ClientSummary> = t
            .sessions
            .values()
            .filter_map(|s| {
                s.conn.as_ref().map(|c| ClientSummary {
                    client_id: s.client_id.clone(),
                    peer: c.info.peer,
                    protocol: c.info.protocol,
                    connected_since_ms: c.connected_since_ms,
                    subscriptions: s.subs.len(),
                })
            })
            .collect();
        out.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        out
    }

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

    /// Numbers a connection in the order its CONNECT arrived.
    pub fn new_conn_id(&self) -> u64 {
        let mut t = self.lock();
        t.next_conn_id += 1;
        t.next_conn_id
    }

    /// Whether a connection holds the session of `client_id`.
    pub fn is_connected(&self, client_id: &str) -> bool {
        self.lock()
            .sessions
            .get(client_id)
            .is_some_and(|s| s.conn.is_some())
    }

    /// Gives the session of `a.link.info.client_id` to connection `a.link.conn_id`, creating or
    /// (Clean Start) replacing it, and closes the connection that held it; that one's will is
    /// published if due. `None` if a connection whose CONNECT came later already holds the
    /// session: it wins. Otherwise whether a session was present.
    pub fn attach(self: &Arc<Self>, a: Attach) -> Option<bool> {
        let Attach {
            link,
            clean_start,
            expiry_secs: expiry,
            will,
        } = a;
        let info = link.info.clone();
        let client_id = info.client_id.clone();
        let conn_id = link.conn_id;
        let mut old_will = None;
        let existed = {
            let mut t = self.lock();
            let newer_attached = t
                .sessions
                .get(&client_id)
                .and_then(|s| s.conn.as_ref())
                .is_some_and(|held| held.conn_id > conn_id);
            if newer_attached {
                t.stats.refused_connections += 1;
                return None;
            }
            let mut ops = Vec::new();
            let mut existed = false;
            if let Some(s) = t.sessions.get_mut(&client_id) {
                existed = true;
                if let Some(old) = s.conn.take() {
                    // The old connection ends without DISCONNECT: its will is due unless a
                    // will delay is running into a session that continues (MQTT 5 §3.1.3.2.2).
                    if let Some(w) = s.will.take() {
                        if w.delay == 0 || clean_start {
                            old_will = Some((old.info.clone(), w));
                        }
                    }
                    log::info!(
                        "local broker: '{client_id}' connected again from {}; closing its old connection",
                        info.peer
                    );
                    let _ = old.kick.send(0x8E);
                }
                if let Some(cancel) = s.will_cancel.take() {
                    let _ = cancel.send(());
                }
            }
            if existed && clean_start {
                t.remove_session(&client_id, &mut ops);
                existed = false;
            }
            let s = t
                .sessions
                .entry(client_id.clone())
                .or_insert_with(|| Session::new(client_id.clone(), expiry));
            let was_persistent = existed && s.persistent();
            s.expiry_secs = expiry;
            if s.persistent() {
                ops.push(Op::UpsertSession {
                    client_id: client_id.clone(),
                    expiry_secs: expiry,
                });
                if !was_persistent {
                    for sub in s.subs.iter() {
                        ops.push(Op::UpsertSub {
                            client_id: client_id.clone(),
                            sub: sub.clone(),
                        });
                    }
                }
            } else if was_persistent {
                ops.push(Op::DeleteSession {
                    client_id: client_id.clone(),
                });
                s.queue.iter_mut().for_each(|d| d.seq = None);
                s.inflight.iter_mut().for_each(|f| f.delivery.seq = None);
            }
            s.will = will;
            s.expires_at = None;
            s.conn = Some(link);
            t.stats.connections += 1;
            self.persist(ops, Some(&client_id), "connect");
            existed
        };
        if let Some((old_info, w)) = old_will {
            self.fire_will(old_info, w);
        }
        Some(existed)
    }

    /// Whether QoS 2 packet `pkid` of `client_id` was already PUBREC'd and awaits PUBREL.
    pub fn is_awaiting_release(
        &self,
        client_id: &str,
        conn_id: u64,
        pkid: u16,
    ) -> Result<bool, NotOwner> {
        let mut t = self.lock();
        Ok(t.owned(client_id, conn_id)?.incoming_qos2.contains(&pkid))
    }

    /// Records that QoS 2 packet `pkid` of `client_id` is PUBREC'd, until its PUBREL.
    pub fn await_release(&self, client_id: &str, conn_id: u64, pkid: u16) -> Result<(), NotOwner> {
        let mut t = self.lock();
        let s = t.owned(client_id, conn_id)?;
        let mut ops = Vec::new();
        if s.incoming_qos2.insert(pkid) && s.persistent() {
            ops.push(Op::InsertIncoming {
                client_id: client_id.to_string(),
                pkid,
            });
        }
        self.persist(ops, Some(client_id), "PUBREC of a QoS 2 message");
        Ok(())
    }

    /// PUBREL of QoS 2 packet `pkid` from `client_id`; false if it was not awaited.
    pub fn release(&self, client_id: &str, conn_id: u64, pkid: u16) -> Result<bool, NotOwner> {
        let mut t = self.lock();
        let s = t.owned(client_id, conn_id)?;
        let mut ops = Vec::new();
        let found = s.incoming_qos2.remove(&pkid);
        if found && s.persistent() {
            ops.push(Op::DeleteIncoming {
                client_id: client_id.to_string(),
                pkid,
            });
        }
        self.persist(ops, Some(client_id), "PUBREL of a QoS 2 message");
        Ok(found)
    }

    /// The client acknowledged our message `pkid` with the packet `expected` stands for
    /// (PUBACK, PUBCOMP): it leaves the in-flight window.
    pub fn acknowledged(
        &self,
        client_id: &str,
        conn_id: u64,
        pkid: u16,
        expected: OutState,
    ) -> Result<(), NotOwner> {
        let mut t = self.lock();
        let s = t.owned(client_id, conn_id)?;
        let mut ops = Vec::new();
        if let Some(pos) = s
            .inflight
            .iter()
            .position(|f| f.pkid == pkid && f.state == expected)
        {
            if let Some(f) = s.inflight.remove(pos) {
                ops.extend(f.delivery.seq.map(|seq| Op::DeleteMsg { seq }));
            }
            s.conn.iter().for_each(|c| c.notify.notify_one());
        }
        self.persist(
            ops,
            Some(client_id),
            "acknowledgement of a delivered message",
        );
        Ok(())
    }

    /// PUBREC of our QoS 2 message `pkid`; `failed`: with a failure reason code, which ends
    /// the message. True if PUBREL is to be sent.
    pub fn received(
        &self,
        client_id: &str,
        conn_id: u64,
        pkid: u16,
        failed: bool,
    ) -> Result<bool, NotOwner> {
        let mut release = true;
        let mut t = self.lock();
        let s = t.owned(client_id, conn_id)?;
        let mut ops = Vec::new();
        if let Some(pos) = s
            .inflight
            .iter()
            .position(|f| f.pkid == pkid && f.state == OutState::Pubrec)
        {
            if failed {
                if let Some(f) = s.inflight.remove(pos) {
                    ops.extend(f.delivery.seq.map(|seq| Op::DeleteMsg { seq }));
                }
                release = false;
            } else if let Some(f) = s.inflight.get_mut(pos) {
                f.state = OutState::Pubcomp;
                ops.extend(f.delivery.seq.map(|seq| Op::ReleaseMsg { seq }));
            }
        }
        self.persist(ops, Some(client_id), "PUBREC of a delivered message");
        Ok(release)
    }

    /// Stores `subs` in the session of `client_id` and queues the retained messages they
    /// ask for. Returns, per subscription, whether it was refused because the session holds
    /// `max_subscriptions` already.
    pub fn subscribe(
        &self,
        client_id: &str,
        conn_id: u64,
        subs: Vec<Subscription>,
    ) -> Result<Vec<bool>, NotOwner> {
        let now = Stamp::now();
        let mut refused = vec![false; subs.len()];
        let mut t = self.lock();
        let mut ops = Vec::new();
        let mut retained = Vec::new();
        let limit = self.config.max_subscriptions;
        {
            let s = t.owned(client_id, conn_id)?;
            for (i, sub) in subs.into_iter().enumerate() {
                if !s.subs.contains(&sub.filter) && s.subs.len() >= limit {
                    refused[i] = true;
                    continue;
                }
                let is_new = s.subs.insert(sub.clone());
                if s.persistent() {
                    ops.push(Op::UpsertSub {
                        client_id: client_id.to_string(),
                        sub: sub.clone(),
                    });
                }
                // No retained messages on a shared subscription (MQTT 5 §4.8.2).
                if !is_shared(&sub.filter)
                    && (sub.retain_handling == 0 || (sub.retain_handling == 1 && is_new))
                {
                    retained.push(sub);
                }
            }
        }
        let mut deliveries = Vec::new();
        for sub in retained {
            let found = t.retained().matching(&sub.filter, &now);
            for m in found {
                if !self.hooks.may_receive(client_id, &m.topic) {
                    continue;
                }
                deliveries.push(Delivery {
                    shared: None,
                    qos: m.qos.min(sub.qos),
                    msg: m,
                    retain: true,
                    sub_ids: sub.id.into_iter().collect(),
                    seq: None,
                });
            }
        }
        for d in deliveries {
            t.enqueue(client_id, d, self.config.max_queued_messages, &mut ops);
        }
        self.persist(ops, Some(client_id), "subscribe");
        Ok(refused)
    }

    /// Removes `filters` from the session of `client_id`; per filter, the UNSUBACK code
    /// (0x00, or 0x11 no subscription existed).
    pub fn unsubscribe(
        &self,
        client_id: &str,
        conn_id: u64,
        filters: Vec<String>,
    ) -> Result<Vec<u8>, NotOwner> {
        let mut codes = Vec::with_capacity(filters.len());
        let mut t = self.lock();
        let s = t.owned(client_id, conn_id)?;
        let mut ops = Vec::new();
        for f in filters {
            if s.subs.remove(&f) {
                codes.push(0);
                if s.persistent() {
                    ops.push(Op::DeleteSub {
                        client_id: client_id.to_string(),
                        filter: f,
                    });
                }
            } else {
                codes.push(0x11);
            }
        }
        self.persist(ops, Some(client_id), "unsubscribe");
        Ok(codes)
    }

    /// Sets the Session Expiry Interval a v5 DISCONNECT asks for, capped by
    /// `max_session_expiry`.
    pub fn set_expiry(&self, client_id: &str, conn_id: u64, secs: u32) -> Result<(), NotOwner> {
        let max = u32::try_from(self.config.max_session_expiry.as_secs()).unwrap_or(u32::MAX);
        let e = secs.min(max);
        let mut t = self.lock();
        let s = t.owned(client_id, conn_id)?;
        let mut ops = Vec::new();
        let was = s.persistent();
        s.expiry_secs = e;
        if s.persistent() {
            ops.push(Op::UpsertSession {
                client_id: client_id.to_string(),
                expiry_secs: e,
            });
        } else if was {
            ops.push(Op::DeleteSession {
                client_id: client_id.to_string(),
            });
        }
        self.persist(ops, Some(client_id), "session expiry set by DISCONNECT");
        Ok(())
    }

    /// What a resumed session has in flight towards `client_id`, to send again; expired
    /// messages not yet PUBREC'd are dropped first.
    pub fn in_flight(&self, client_id: &str, conn_id: u64) -> Result<Vec<Inflight>, NotOwner> {
        let now = Stamp::now();
        let mut t = self.lock();
        let s = t.owned(client_id, conn_id)?;
        let mut ops = Vec::new();
        let mut expired = 0;
        s.inflight.retain(|f| {
            if f.state != OutState::Pubcomp && f.delivery.msg.is_expired(&now) {
                expired += 1;
                ops.extend(f.delivery.seq.map(|seq| Op::DeleteMsg { seq }));
                false
            } else {
                true
            }
        });
        let out = s.inflight.iter().cloned().collect();
        t.stats.dropped_expired += expired;
        self.persist(ops, Some(client_id), "expiry of in-flight messages");
        Ok(out)
    }

    /// Moves messages from the queue of `client_id` into its in-flight window, as far as the
    /// window allows and at most `batch` of them (then the connection is woken again), and
    /// hands each to `send`. A message `send` refuses ([`NotSent`]) is dropped and counted as
    /// too large.
    pub fn send_queued(
        &self,
        client_id: &str,
        conn_id: u64,
        batch: usize,
        mut send: impl FnMut(&Inflight) -> Result<(), NotSent>,
    ) -> Result<(), NotOwner> {
        let now = Stamp::now();
        let mut guard = self.lock();
        let t = &mut *guard;
        let mut ops = Vec::new();
        let s = t.sessions.get_mut(client_id).ok_or(NotOwner)?;
        let link = s
            .conn
            .as_ref()
            .filter(|c| c.conn_id == conn_id)
            .ok_or(NotOwner)?;
        let window = link.out_window;
        let notify = Arc::clone(&link.notify);
        let mut sent = 0usize;
        while let Some(front_qos) = s.queue.front().map(|d| d.qos) {
            if front_qos != QoS::AtMostOnce && s.inflight.len() >= window {
                break;
            }
            if sent >= batch {
                notify.notify_one();
                break;
            }
            let Some(d) = s.queue.pop_front() else {
                break;
            };
            if d.msg.is_expired(&now) {
                t.stats.dropped_expired += 1;
                ops.extend(d.seq.map(|seq| Op::DeleteMsg { seq }));
                continue;
            }
            let pkid = if d.qos == QoS::AtMostOnce {
                0
            } else {
                match s.next_pkid() {
                    Some(id) => id,
                    None => {
                        s.queue.push_front(d);
                        break;
                    }
                }
            };
            let f = Inflight {
                pkid,
                state: if d.qos == QoS::ExactlyOnce {
                    OutState::Pubrec
                } else {
                    OutState::Puback
                },
                delivery: d,
            };
            match send(&f) {
                Ok(()) => {
                    sent += 1;
                    t.stats.messages_out += 1;
                    if f.delivery.qos != QoS::AtMostOnce {
                        s.inflight.push_back(f);
                    }
                }
                Err(NotSent(why)) => {
                    log::warn!(
                        "local broker: message on '{}' not sent to '{client_id}': {why}",
                        f.delivery.msg.topic,
                    );
                    t.stats.dropped_too_large += 1;
                    ops.extend(f.delivery.seq.map(|seq| Op::DeleteMsg { seq }));
                }
            }
        }
        self.persist(ops, Some(client_id), "sending queued messages");
        Ok(())
    }

    /// Detaches connection `conn_id` of `info.client_id` from its session, if it still holds
    /// it: messages of shared subscriptions it left unacknowledged go to another member, the
    /// session starts its expiry (or ends, with expiry 0), and the will is scheduled after its
    /// delay when `publish_will`. Returns a will to publish now (no delay, or `shutting_down`).
    pub fn detach(
        self: &Arc<Self>,
        info: &ClientInfo,
        conn_id: u64,
        publish_will: bool,
        shutting_down: bool,
    ) -> Option<WillSpec> {
        let mut fire_now = None;
        let mut t = self.lock();
        let mut ops = Vec::new();
        let cid = info.client_id.as_str();
        let mine = t
            .sessions
            .get(cid)
            .and_then(|s| s.conn.as_ref())
            .is_some_and(|c| c.conn_id == conn_id);
        if mine {
            // Unacknowledged messages of shared subscriptions go to another member.
            t.reassign_shared(
                self.hooks.as_ref(),
                cid,
                self.config.max_queued_messages,
                &mut ops,
            );
            let mut remove = false;
            if let Some(s) = t.sessions.get_mut(cid) {
                s.conn = None;
                let will = s.will.take();
                if s.expiry_secs == 0 {
                    remove = true;
                } else {
                    s.expires_at =
                        Some(Stamp::now().plus(Duration::from_secs(u64::from(s.expiry_secs))));
                    if s.persistent() {
                        ops.push(Op::SessionDisconnected {
                            client_id: cid.to_string(),
                            wall_ms: Stamp::now().wall_ms,
                        });
                    }
                }
                if let Some(w) = will.filter(|_| publish_will) {
                    let delay = w.delay.min(s.expiry_secs);
                    if delay == 0 || shutting_down {
                        fire_now = Some(w);
                    } else {
                        s.will_cancel = Some(self.schedule_will(
                            info.clone(),
                            w,
                            Duration::from_secs(u64::from(delay)),
                        ));
                    }
                }
            }
            if remove {
                t.remove_session(cid, &mut ops);
            }
        }
        self.persist(ops, Some(cid), "disconnect");
        fire_now
    }

    /// Routes `msg` to every matching session and applies its retain flag, as the relay
    /// itself (no publisher). Returns the commit of the durable part, for the caller to await.
    pub fn publish(&self, msg: Message) -> Option<Commit> {
        let msg = Arc::new(msg);
        let mut t = self.lock();
        let mut ops = Vec::new();
        let (_, retained) = t.route(
            self.hooks.as_ref(),
            self.config.max_queued_messages,
            &msg,
            None,
            &mut ops,
        );
        let w = Writes {
            ops,
            also: None,
            retained,
        };
        self.store(w, None)
    }

    /// [`BrokerState::publish`] whose durable part also runs `also`, in the same store job,
    /// and is always submitted (so the caller learns when `also` is committed).
    pub fn publish_with(&self, msg: Message, also: StoreWrite) -> Commit {
        let msg = Arc::new(msg);
        let mut t = self.lock();
        let mut ops = Vec::new();
        let (_, retained) = t.route(
            self.hooks.as_ref(),
            self.config.max_queued_messages,
            &msg,
            None,
            &mut ops,
        );
        let w = Writes {
            ops,
            also: Some(also),
            retained,
        };
        // With `also` there is always a job.
        self.store(w, None).unwrap_or_else(|| {
            let (done, commit) = oneshot::channel();
            let _ = done.send(Ok(()));
            commit
        })
    }

    /// Counts and routes a message from client `publisher` (No Local applies). Returns how
    /// many sessions it was queued for.
    pub fn publish_from(&self, publisher: &str, msg: Message) -> usize {
        let msg = Arc::new(msg);
        let mut t = self.lock();
        t.stats.messages_in += 1;
        let mut ops = Vec::new();
        let (reached, retained) = t.route(
            self.hooks.as_ref(),
            self.config.max_queued_messages,
            &msg,
            Some(publisher),
            &mut ops,
        );
        let w = Writes {
            ops,
            also: None,
            retained,
        };
        drop(self.store(w, Some((Some(publisher), "routing a message it published"))));
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
                self.publish_from(&info.client_id, msg);
                self.hooks.on_event(event);
            }
            Ingest::Reject(r) => {
                log::warn!(
                    "local broker: will of '{}' refused by ingest: {r:?}",
                    info.client_id
                );
            }
            Ingest::Pending(rx) => {
                let state = Arc::clone(self);
                self.wills_pending.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let verdict = rx.await;
                    state.wills_pending.fetch_sub(1, Ordering::SeqCst);
                    state.wills_done.notify_waiters();
                    if let Ok(Ok(())) = verdict {
                        state.publish_from(&info.client_id, msg);
                        state.hooks.on_event(event);
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
    fn schedule_will(
        self: &Arc<Self>,
        info: ClientInfo,
        will: WillSpec,
        delay: Duration,
    ) -> oneshot::Sender<()> {
        let (cancel, mut cancelled) = oneshot::channel::<()>();
        let state = Arc::clone(self);
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
            state.fire_will(info, will);
        });
        cancel
    }

    /// Ends expired sessions and drops expired retained and queued messages.
    pub fn sweep(&self) {
        let now = Stamp::now();
        let mut t = self.lock();
        let mut ops = Vec::new();
        let expired: Vec<String> = t
            .sessions
            .values()
            .filter(|s| s.conn.is_none() && s.expires_at.is_some_and(|e| e.is_past(&now)))
            .map(|s| s.client_id.clone())
            .collect();
        for cid in expired {
            log::info!("local broker: session '{cid}' expired");
            t.remove_session(&cid, &mut ops);
        }
        let expired_retained = t.retained().remove_expired(&now);
        for topic in expired_retained {
            ops.push(Op::DeleteRetained { topic });
        }
        let mut dropped = 0u64;
        for s in t.sessions.values_mut() {
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
        t.stats.dropped_expired += dropped;
        self.persist(ops, None, "expiry sweep");
    }
}

/// The store writes of one state change, submitted in one job by [`BrokerState::store`].
struct Writes {
    ops: Vec<Op>,
    /// Another module's write, committed in the same job before `ops`.
    also: Option<StoreWrite>,
    /// The retained change `ops` write, settled with their outcome.
    retained: Option<RetainedWrite>,
}

impl Writes {
    fn new(ops: Vec<Op>) -> Writes {
        Writes {
            ops,
            also: None,
            retained: None,
        }
    }
}

/// What a batch of store writes held, for the log when it failed: each kind of row with its
/// count, naming the clients and topics.
fn describe(ops: &[Op]) -> String {
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for op in ops {
        let kind = match op {
            Op::UpsertSession { client_id, .. } => format!("session of '{client_id}'"),
            Op::SessionDisconnected { client_id, .. } => {
                format!("disconnect time of session '{client_id}'")
            }
            Op::DeleteSession { client_id } => format!("end of session '{client_id}'"),
            Op::UpsertSub { client_id, .. } => format!("subscription of '{client_id}'"),
            Op::DeleteSub { client_id, .. } => format!("unsubscription of '{client_id}'"),
            Op::InsertMsg { client_id, .. } => format!("queued message for '{client_id}'"),
            Op::DeleteMsg { .. } => "removal of a delivered or dropped message".to_string(),
            Op::ReleaseMsg { .. } => "PUBREC of a delivered QoS 2 message".to_string(),
            Op::InsertIncoming { client_id, .. } => {
                format!("QoS 2 packet id awaiting PUBREL from '{client_id}'")
            }
            Op::DeleteIncoming { client_id, .. } => {
                format!("PUBREL of a QoS 2 packet id from '{client_id}'")
            }
            Op::UpsertRetained(m) => format!("retained message on '{}'", m.topic),
            Op::DeleteRetained { topic } => format!("removal of the retained message on '{topic}'"),
        };
        *kinds.entry(kind).or_default() += 1;
    }
    kinds
        .into_iter()
        .map(|(k, n)| if n == 1 { k } else { format!("{n} × {k}") })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod describe_tests {
    use super::*;

    #[test]
    fn a_failed_write_is_described_by_kind_count_and_client() {
        let ops = vec![
            Op::UpsertSession {
                client_id: "ipad-1".into(),
                expiry_secs: 60,
            },
            Op::InsertIncoming {
                client_id: "ipad-1".into(),
                pkid: 7,
            },
            Op::DeleteMsg { seq: 1 },
            Op::DeleteMsg { seq: 2 },
            Op::DeleteRetained {
                topic: "cab/door".into(),
            },
        ];
        assert_eq!(
            describe(&ops),
            "QoS 2 packet id awaiting PUBREL from 'ipad-1', 2 × removal of a delivered or \
             dropped message, removal of the retained message on 'cab/door', session of 'ipad-1'"
        );
    }
}
