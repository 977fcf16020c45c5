//! Session lifecycle: connections numbered at CONNECT, attach (create, resume, take over),
//! the expiry a DISCONNECT sets, detach, and the sweep that ends expired sessions.

use std::sync::Arc;
use std::time::Duration;

use super::writes::Outcome;
use super::{Attach, BrokerState, NotOwner};
use crate::broker::codec::WillSpec;
use crate::broker::persist::Op;
use crate::broker::session::Session;
use crate::broker::ClientInfo;
use crate::clock::Stamp;

impl BrokerState {
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
        let outcome = Outcome::Logged {
            client_id: Some(&client_id),
            during: "connect",
        };
        let (existed, _) = self.change(outcome, |t, w| {
            let newer_attached = t
                .sessions
                .get(&client_id)
                .and_then(|s| s.conn.as_ref())
                .is_some_and(|held| held.conn_id > conn_id);
            if newer_attached {
                t.stats.refused_connections += 1;
                return None;
            }
            let ops = &mut w.ops;
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
                t.remove_session(&client_id, ops);
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
            Some(existed)
        });
        let existed = existed?;
        if let Some((old_info, w)) = old_will {
            self.fire_will(old_info, w);
        }
        Some(existed)
    }

    /// Sets the Session Expiry Interval a v5 DISCONNECT asks for, capped by
    /// `max_session_expiry`.
    pub fn set_expiry(&self, client_id: &str, conn_id: u64, secs: u32) -> Result<(), NotOwner> {
        let max = u32::try_from(self.config.max_session_expiry.as_secs()).unwrap_or(u32::MAX);
        let e = secs.min(max);
        let during = "session expiry set by DISCONNECT";
        self.change_session(client_id, conn_id, during, |s, ops| {
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
        })
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
        let cid = info.client_id.as_str();
        let outcome = Outcome::Logged {
            client_id: Some(cid),
            during: "disconnect",
        };
        let (fire_now, _) = self.change(outcome, |t, w| {
            let ops = &mut w.ops;
            let mine = t
                .sessions
                .get(cid)
                .and_then(|s| s.conn.as_ref())
                .is_some_and(|c| c.conn_id == conn_id);
            if !mine {
                return None;
            }
            let mut fire_now = None;
            // Unacknowledged messages of shared subscriptions go to another member.
            t.reassign_shared(
                self.hooks.as_ref(),
                cid,
                self.config.max_queued_messages,
                ops,
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
                t.remove_session(cid, ops);
            }
            fire_now
        });
        fire_now
    }

    /// Ends expired sessions and drops expired retained and queued messages.
    pub fn sweep(&self) {
        let now = Stamp::now();
        let outcome = Outcome::Logged {
            client_id: None,
            during: "expiry sweep",
        };
        self.change(outcome, |t, w| {
            let ops = &mut w.ops;
            let expired: Vec<String> = t
                .sessions
                .values()
                .filter(|s| s.conn.is_none() && s.expires_at.is_some_and(|e| e.is_past(&now)))
                .map(|s| s.client_id.clone())
                .collect();
            for cid in expired {
                log::info!("local broker: session '{cid}' expired");
                t.remove_session(&cid, ops);
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
        });
    }
}
