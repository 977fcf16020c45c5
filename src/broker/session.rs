//! Session state of one client id: what outlives a network connection (MQTT 5 §4.1).
//!
//! The session owns the outgoing queue and the in-flight window towards the client, so that a
//! slow or absent client only ever fills its own bounded queue: routing never waits on a socket.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Notify};

use super::codec::WillSpec;
use super::subscriptions::Subscriptions;
use super::ClientInfo;
use crate::clock::Stamp;
use crate::message::{Message, QoS};

/// A message bound for one session.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub msg: Arc<Message>,
    /// min(publish QoS, granted QoS).
    pub qos: QoS,
    /// Retain flag as sent.
    pub retain: bool,
    pub sub_ids: Vec<usize>,
    /// Row id in `broker_session_messages`, if the delivery is persisted.
    pub seq: Option<i64>,
    /// The shared subscription (`$share/{group}/{filter}`) it was delivered for: if this
    /// member goes away before acknowledging it, another member gets it. Not persisted.
    pub shared: Option<String>,
}

/// Where an outgoing QoS 1/2 message stands: the packet we wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::enum_variant_names)]
pub enum OutState {
    /// QoS 1 sent, waiting for PUBACK.
    Puback,
    /// QoS 2 sent, waiting for PUBREC.
    Pubrec,
    /// PUBREL sent, waiting for PUBCOMP.
    Pubcomp,
}

#[derive(Debug, Clone)]
pub struct Inflight {
    pub pkid: u16,
    pub delivery: Delivery,
    pub state: OutState,
}

/// The live connection currently attached to a session.
#[derive(Debug)]
pub struct ConnLink {
    pub conn_id: u64,
    pub info: ClientInfo,
    /// Woken when the queue gains a message.
    pub notify: Arc<Notify>,
    /// Tells the connection to close with a v5 reason code (0x8E takeover, 0x8B shutdown).
    pub kick: mpsc::UnboundedSender<u8>,
    pub connected_since_ms: i64,
    /// The client's Receive Maximum, capped by ours.
    pub out_window: usize,
}

#[derive(Debug)]
pub struct Session {
    pub client_id: String,
    pub subs: Subscriptions,
    pub queue: VecDeque<Delivery>,
    pub inflight: VecDeque<Inflight>,
    /// QoS 2 packet ids received and acknowledged with PUBREC, not yet released.
    pub incoming_qos2: HashSet<u16>,
    /// Session Expiry Interval in seconds, already capped; 0 ends the session at disconnect.
    pub expiry_secs: u32,
    pub conn: Option<ConnLink>,
    /// When a disconnected session ends.
    pub expires_at: Option<Stamp>,
    pub will: Option<WillSpec>,
    /// Cancels a will whose delay is running.
    pub will_cancel: Option<oneshot::Sender<()>>,
    next_pkid: u16,
}

impl Session {
    pub fn new(client_id: String, expiry_secs: u32) -> Session {
        Session {
            client_id,
            subs: Subscriptions::default(),
            queue: VecDeque::new(),
            inflight: VecDeque::new(),
            incoming_qos2: HashSet::new(),
            expiry_secs,
            conn: None,
            expires_at: None,
            will: None,
            will_cancel: None,
            next_pkid: 0,
        }
    }

    /// Persistent sessions have their subscriptions and QoS 1/2 messages stored in SQLite.
    pub fn persistent(&self) -> bool {
        self.expiry_secs > 0
    }

    /// A packet id not used by any in-flight message.
    pub fn next_pkid(&mut self) -> Option<u16> {
        for _ in 0..u16::MAX {
            self.next_pkid = self.next_pkid.wrapping_add(1);
            if self.next_pkid == 0 {
                self.next_pkid = 1;
            }
            let id = self.next_pkid;
            if !self.inflight.iter().any(|f| f.pkid == id) {
                return Some(id);
            }
        }
        None
    }

    /// Queues `d`, dropping the oldest QoS 0 message, else the oldest message, when the queue is
    /// full. Returns the dropped delivery so its row can be deleted and the drop counted.
    pub fn enqueue(&mut self, d: Delivery, limit: usize) -> Option<Delivery> {
        let mut dropped = None;
        if self.queue.len() >= limit.max(1) {
            let pos = self
                .queue
                .iter()
                .position(|q| q.qos == QoS::AtMostOnce)
                .unwrap_or(0);
            dropped = self.queue.remove(pos);
        }
        self.queue.push_back(d);
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn d(qos: QoS, n: u8) -> Delivery {
        Delivery {
            shared: None,
            msg: Arc::new(Message {
                topic: "t".into(),
                payload: Bytes::from(vec![n]),
                qos,
                retain: false,
                properties: Default::default(),
                accepted: Stamp::now(),
                deadline: None,
            }),
            qos,
            retain: false,
            sub_ids: vec![],
            seq: None,
        }
    }

    #[test]
    fn full_queue_drops_oldest_qos0_first() {
        let mut s = Session::new("c".into(), 0);
        assert!(s.enqueue(d(QoS::AtLeastOnce, 1), 2).is_none());
        assert!(s.enqueue(d(QoS::AtMostOnce, 2), 2).is_none());
        let gone = s.enqueue(d(QoS::AtLeastOnce, 3), 2).unwrap();
        assert_eq!(gone.msg.payload[0], 2);
        let gone = s.enqueue(d(QoS::AtLeastOnce, 4), 2).unwrap();
        assert_eq!(gone.msg.payload[0], 1);
    }

    #[test]
    fn pkids_skip_in_flight_ones_and_zero() {
        let mut s = Session::new("c".into(), 0);
        let a = s.next_pkid().unwrap();
        assert_eq!(a, 1);
        s.inflight.push_back(Inflight {
            pkid: 2,
            delivery: d(QoS::AtLeastOnce, 0),
            state: OutState::Puback,
        });
        assert_eq!(s.next_pkid(), Some(3));
    }
}
