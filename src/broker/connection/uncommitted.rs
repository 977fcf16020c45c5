//! The client's messages that went to the ingest hook and await its verdict (for the relay:
//! the store's commit), in arrival order, with what they occupy in memory.
//!
//! The connection stops taking new PUBLISHes while [`Uncommitted::bytes`] is at
//! `max_uncommitted_bytes` (see [`super::inbound`]): this is the one bound on what a client
//! can make the broker hold before the store has it, for every QoS and both protocol
//! versions. Messages already committed and awaiting only their PUBREL (QoS 2) are not here:
//! they cost a packet id, not a message.

use std::collections::VecDeque;

use tokio::sync::oneshot;

use crate::broker::RejectReason;
use crate::message::{Message, QoS};

pub(super) enum Verdict {
    Ready(Result<(), RejectReason>),
    Waiting(oneshot::Receiver<Result<(), RejectReason>>),
}

pub(super) struct PendingIn {
    pub(super) pkid: u16,
    pub(super) qos: QoS,
    pub(super) msg: Message,
    pub(super) verdict: Verdict,
    pub(super) acl_denied: bool,
    /// The ingest hook keeps no copy ([`crate::broker::Ingest::Unrouted`]).
    pub(super) unrouted: bool,
}

/// The FIFO of messages awaiting their verdict.
#[derive(Default)]
pub(super) struct Uncommitted {
    queue: VecDeque<PendingIn>,
    /// Sum of [`footprint`] over `queue`.
    bytes: usize,
    /// QoS 1 and 2 messages in `queue` (they count towards our Receive Maximum).
    acknowledged_later: usize,
}

impl Uncommitted {
    pub(super) fn push_back(&mut self, p: PendingIn) {
        self.bytes += footprint(&p.msg);
        self.acknowledged_later += usize::from(p.qos != QoS::AtMostOnce);
        self.queue.push_back(p);
    }

    pub(super) fn pop_front(&mut self) -> Option<PendingIn> {
        let p = self.queue.pop_front()?;
        self.bytes -= footprint(&p.msg);
        self.acknowledged_later -= usize::from(p.qos != QoS::AtMostOnce);
        Some(p)
    }

    pub(super) fn front_mut(&mut self) -> Option<&mut PendingIn> {
        self.queue.front_mut()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub(super) fn len(&self) -> usize {
        self.queue.len()
    }

    /// Memory the waiting messages occupy (see [`footprint`]).
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// QoS 1 and 2 messages waiting, not yet acknowledged (PUBACK, PUBREC).
    pub(super) fn unacknowledged(&self) -> usize {
        self.acknowledged_later
    }

    /// Whether a QoS 2 message with this packet id is waiting (a resend before its PUBREC).
    pub(super) fn has_qos2(&self, pkid: u16) -> bool {
        self.queue
            .iter()
            .any(|q| q.qos == QoS::ExactlyOnce && q.pkid == pkid)
    }

    /// The verdict of the message at the head, once it is known; never, while the head's
    /// verdict is already known or nothing waits.
    pub(super) async fn head_verdict(&mut self) -> Result<(), RejectReason> {
        match self.queue.front_mut().map(|p| &mut p.verdict) {
            Some(Verdict::Waiting(rx)) => rx.await.unwrap_or(Err(RejectReason::UnspecifiedError)),
            _ => std::future::pending().await,
        }
    }
}

/// What a waiting message occupies: its topic, payload and properties plus the entry itself.
pub(super) fn footprint(msg: &Message) -> usize {
    let p = &msg.properties;
    std::mem::size_of::<PendingIn>()
        + msg.topic.len()
        + msg.payload.len()
        + p.content_type.as_ref().map_or(0, String::len)
        + p.response_topic.as_ref().map_or(0, String::len)
        + p.correlation_data.as_ref().map_or(0, |c| c.len())
        + p.user_properties
            .iter()
            .map(|(k, v)| k.len() + v.len() + std::mem::size_of::<(String, String)>())
            .sum::<usize>()
}
