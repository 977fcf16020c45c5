//! The client's PUBLISHes: topic aliases, the rate limit, QoS 2 duplicates, `may_publish`,
//! then the ingest hook; acknowledgement and delivery once the verdict is known.
//!
//! # Inbound PUBLISH pipeline
//! Every inbound PUBLISH that passes validation and `may_publish` goes to the ingest hook at
//! once, in arrival order, and joins a FIFO of pending verdicts. The connection keeps reading
//! while verdicts are outstanding; whenever the verdict at the head of the FIFO is known, the
//! message is delivered to local subscribers and acknowledged, so deliveries and acks keep the
//! arrival order.
//!
//! # Refusing a PUBLISH in 3.1.1
//! MQTT 3.1.1 has no negative PUBACK. When the ingest hook refuses a QoS 1/2 message from a
//! 3.1.1 client, the broker withholds the acknowledgement and closes the connection: the client
//! keeps the message in its session and sends it again after reconnecting, by which time the
//! relay may have room for it. An ACL denial (`may_publish` false) is different: it will not
//! change on retry, so the message is acknowledged and dropped (and counted), as 3.1.1 §4.1
//! allows.

use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::uncommitted::{PendingIn, Verdict};
use super::{Conn, ConnectionEnd, TOPIC_ALIAS_MAX};
use crate::broker::codec::{InPublish, Outbound};
use crate::broker::{Ingest, Protocol, RejectReason};
use crate::clock::Stamp;
use crate::message::{Message, QoS};
use crate::topic;

/// How long a normal DISCONNECT waits for the verdicts of messages sent just before it.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

impl Conn {
    pub(super) async fn on_publish(&mut self, p: InPublish) -> Result<(), ConnectionEnd> {
        if let Some(bucket) = &mut self.bucket {
            if !bucket.take() {
                let rate = self.state.config().max_publish_rate;
                log::warn!(
                    "local broker: '{}' ({}) sent more than {rate} PUBLISH per second; disconnecting",
                    self.info.client_id,
                    self.info.peer
                );
                self.state.count(|s| s.rate_limited += 1);
                self.queue(Outbound::Disconnect { reason: 0x96 });
                let _ = self.write_out().await;
                return Err(ConnectionEnd::Abnormal(format!(
                    "more than {rate} PUBLISH per second"
                )));
            }
        }
        let mut topic_name = p.topic;
        if self.protocol == Protocol::V5 {
            if let Some(alias) = p.topic_alias {
                if alias == 0 || alias > TOPIC_ALIAS_MAX {
                    return Err(self
                        .protocol_error(
                            0x94,
                            format!("topic alias {alias} out of range 1..={TOPIC_ALIAS_MAX}"),
                        )
                        .await);
                }
                if topic_name.is_empty() {
                    match self.aliases.get(&alias) {
                        Some(t) => topic_name = t.clone(),
                        None => {
                            return Err(self
                                .protocol_error(0x82, format!("unknown topic alias {alias}"))
                                .await)
                        }
                    }
                } else {
                    self.aliases.insert(alias, topic_name.clone());
                }
            }
        }
        if let Err(e) = topic::validate_name(&topic_name) {
            return Err(self
                .protocol_error(0x90, format!("PUBLISH topic '{topic_name}' {e}"))
                .await);
        }
        if p.qos == QoS::ExactlyOnce {
            let duplicate =
                self.state
                    .is_awaiting_release(&self.info.client_id, self.conn_id, p.pkid);
            if self.owns(duplicate, "QoS 2 PUBLISH")? {
                // Already accepted and PUBREC'd: acknowledge again, deliver nothing.
                self.queue(Outbound::PubRec {
                    pkid: p.pkid,
                    reason: 0,
                });
                return Ok(());
            }
            if self.pending.has_qos2(p.pkid) {
                return Ok(());
            }
        }
        if p.qos != QoS::AtMostOnce {
            self.check_receive_maximum().await?;
        }
        let accepted = Stamp::now();
        let msg = Message {
            topic: topic_name,
            payload: p.payload,
            qos: p.qos,
            retain: p.retain,
            properties: p.properties,
            accepted,
            deadline: p
                .expiry
                .map(|s| accepted.plus(Duration::from_secs(u64::from(s)))),
        };
        let mut unrouted = false;
        let (verdict, acl_denied) = if !self.state.hooks().may_publish(&self.info, &msg.topic) {
            log::info!(
                "local broker: '{}' may not publish to '{}'; dropped",
                self.info.client_id,
                msg.topic
            );
            self.state.count(|s| s.denied_publish += 1);
            (Verdict::Ready(Err(RejectReason::NotAuthorized)), true)
        } else {
            let v = match self.state.hooks().ingest(&self.info, &msg) {
                Ingest::Accept => Verdict::Ready(Ok(())),
                Ingest::Unrouted => {
                    unrouted = true;
                    Verdict::Ready(Ok(()))
                }
                Ingest::Reject(r) => Verdict::Ready(Err(r)),
                Ingest::Pending(rx) => Verdict::Waiting(rx),
            };
            (v, false)
        };
        self.pending.push_back(PendingIn {
            pkid: p.pkid,
            qos: p.qos,
            msg,
            verdict,
            acl_denied,
            unrouted,
        });
        Ok(())
    }

    /// A new QoS 1/2 PUBLISH from a v5 client: refused with DISCONNECT 0x93 when the client
    /// already has as many unacknowledged as our Receive Maximum allows (MQTT 5 §3.3.4, §4.9).
    /// Unacknowledged: awaiting their verdict, or PUBREC'd on this connection and awaiting
    /// PUBREL (the client counts them until our PUBCOMP; its quota starts afresh with each
    /// connection, so those of an earlier one do not count). We count at decoding, later than
    /// the client sent: a client within the limit is never refused. 3.1.1 knows no such limit.
    async fn check_receive_maximum(&mut self) -> Result<(), ConnectionEnd> {
        if self.protocol != Protocol::V5 {
            return Ok(());
        }
        let limit = self.state.config().receive_maximum;
        let outstanding = self.pending.unacknowledged() + self.unreleased.len();
        if outstanding < usize::from(limit) {
            return Ok(());
        }
        self.state.count(|s| s.receive_maximum_exceeded += 1);
        Err(self
            .protocol_error(
                0x93,
                format!(
                    "QoS 1/2 PUBLISH beyond our Receive Maximum of {limit} ({outstanding} unacknowledged already)"
                ),
            )
            .await)
    }

    /// Waits (bounded) for every outstanding verdict and resolves them in order; used when the
    /// client ends the connection normally right after publishing.
    pub(super) async fn settle_pending(&mut self) -> Result<(), ConnectionEnd> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            self.drain_verdicts().await?;
            if self.pending.is_empty() {
                return Ok(());
            }
            match tokio::time::timeout_at(deadline, self.pending.head_verdict()).await {
                Ok(v) => {
                    if let Some(head) = self.pending.front_mut() {
                        head.verdict = Verdict::Ready(v);
                    }
                }
                Err(_) => {
                    log::warn!(
                        "local broker: '{}' disconnected with {} messages still awaiting the relay's verdict; they are not delivered",
                        self.info.client_id,
                        self.pending.len()
                    );
                    return Ok(());
                }
            }
        }
    }

    /// Resolves verdicts at the head of the FIFO, in order, as far as they are known.
    pub(super) async fn drain_verdicts(&mut self) -> Result<(), ConnectionEnd> {
        loop {
            let Some(front) = self.pending.front_mut() else {
                return Ok(());
            };
            let result = match &mut front.verdict {
                Verdict::Ready(r) => *r,
                Verdict::Waiting(rx) => match rx.try_recv() {
                    Ok(r) => r,
                    Err(oneshot::error::TryRecvError::Empty) => return Ok(()),
                    Err(oneshot::error::TryRecvError::Closed) => {
                        Err(RejectReason::UnspecifiedError)
                    }
                },
            };
            let Some(p) = self.pending.pop_front() else {
                return Ok(());
            };
            self.resolve(p, result).await?;
        }
    }

    async fn resolve(
        &mut self,
        p: PendingIn,
        result: Result<(), RejectReason>,
    ) -> Result<(), ConnectionEnd> {
        // QoS 2: the packet id is recorded before the message goes anywhere (MQTT 5 §4.3.3
        // method B), and only while this connection holds the session: a connection taken
        // over meanwhile routes nothing, and the client's resend on its new connection is
        // the one delivered.
        let acknowledged = result.is_ok() || (p.acl_denied && self.protocol == Protocol::V311);
        if p.qos == QoS::ExactlyOnce && acknowledged {
            let recorded = self
                .state
                .await_release(&self.info.client_id, self.conn_id, p.pkid);
            self.owns(recorded, "QoS 2 PUBLISH")?;
            self.unreleased.insert(p.pkid);
        }
        let code = match result {
            Ok(()) => {
                let reached = self.state.publish_from(&self.info.client_id, p.msg);
                if p.unrouted && reached == 0 && self.protocol == Protocol::V5 {
                    0x10
                } else {
                    0
                }
            }
            Err(r) if p.acl_denied && self.protocol == Protocol::V311 => {
                let _ = r;
                0
            }
            Err(r) => {
                if self.protocol == Protocol::V311 && p.qos != QoS::AtMostOnce {
                    log::warn!(
                        "local broker: relay refused a message from 3.1.1 client '{}' ({r:?}); closing without PUBACK so it redelivers",
                        self.info.client_id
                    );
                    return Err(ConnectionEnd::Abnormal(format!(
                        "ingest refused a QoS {} message ({r:?})",
                        p.qos as u8
                    )));
                }
                match r {
                    RejectReason::UnspecifiedError => 0x80,
                    RejectReason::ImplementationSpecificError => 0x83,
                    RejectReason::NotAuthorized => 0x87,
                    RejectReason::QuotaExceeded => 0x97,
                }
            }
        };
        match p.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.queue(Outbound::PubAck {
                pkid: p.pkid,
                reason: code,
            }),
            QoS::ExactlyOnce => {
                self.queue(Outbound::PubRec {
                    pkid: p.pkid,
                    reason: code,
                });
            }
        }
        Ok(())
    }
}
