//! The outbound window: queued messages move into flight, acknowledgements move them out,
//! a resumed session gets again what was in flight.

use std::sync::Arc;

use super::writes::Outcome;
use super::{BrokerState, NotOwner, NotSent};
use crate::broker::persist::Op;
use crate::broker::session::{Inflight, OutState};
use crate::clock::Stamp;
use crate::message::QoS;

impl BrokerState {
    /// The client acknowledged our message `pkid` with the packet `expected` stands for
    /// (PUBACK, PUBCOMP): it leaves the in-flight window.
    pub fn acknowledged(
        &self,
        client_id: &str,
        conn_id: u64,
        pkid: u16,
        expected: OutState,
    ) -> Result<(), NotOwner> {
        let during = "acknowledgement of a delivered message";
        self.change_session(client_id, conn_id, during, |s, ops| {
            let Some(pos) = s
                .inflight
                .iter()
                .position(|f| f.pkid == pkid && f.state == expected)
            else {
                return;
            };
            if let Some(f) = s.inflight.remove(pos) {
                ops.extend(f.delivery.seq.map(|seq| Op::DeleteMsg { seq }));
            }
            s.conn.iter().for_each(|c| c.notify.notify_one());
        })
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
        let during = "PUBREC of a delivered message";
        self.change_session(client_id, conn_id, during, |s, ops| {
            let Some(pos) = s
                .inflight
                .iter()
                .position(|f| f.pkid == pkid && f.state == OutState::Pubrec)
            else {
                return true;
            };
            if failed {
                if let Some(f) = s.inflight.remove(pos) {
                    ops.extend(f.delivery.seq.map(|seq| Op::DeleteMsg { seq }));
                }
                return false;
            }
            if let Some(f) = s.inflight.get_mut(pos) {
                f.state = OutState::Pubcomp;
                ops.extend(f.delivery.seq.map(|seq| Op::ReleaseMsg { seq, pkid }));
            }
            true
        })
    }

    /// What a resumed session has in flight towards `client_id`, to send again; expired
    /// messages not yet PUBREC'd are dropped first.
    pub fn in_flight(&self, client_id: &str, conn_id: u64) -> Result<Vec<Inflight>, NotOwner> {
        let now = Stamp::now();
        let outcome = Outcome::Logged {
            client_id: Some(client_id),
            during: "expiry of in-flight messages",
        };
        let (out, _) = self.change(outcome, |t, w| {
            let s = t.owned(client_id, conn_id)?;
            let mut expired = 0;
            s.inflight.retain(|f| {
                if f.state != OutState::Pubcomp && f.delivery.msg.is_expired(&now) {
                    expired += 1;
                    w.ops
                        .extend(f.delivery.seq.map(|seq| Op::DeleteMsg { seq }));
                    false
                } else {
                    true
                }
            });
            let out = s.inflight.iter().cloned().collect();
            t.stats.dropped_expired += expired;
            Ok(out)
        });
        out
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
        let outcome = Outcome::Logged {
            client_id: Some(client_id),
            during: "sending queued messages",
        };
        let (sent, _) = self.change(outcome, |t, w| {
            // The fields apart: the session and the counters change together.
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
                    w.ops.extend(d.seq.map(|seq| Op::DeleteMsg { seq }));
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
                        w.ops
                            .extend(f.delivery.seq.map(|seq| Op::DeleteMsg { seq }));
                    }
                }
            }
            Ok(())
        });
        sent
    }
}
