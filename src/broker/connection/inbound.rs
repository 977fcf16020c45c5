//! Reading the client's packets: decode what the buffer holds and dispatch each packet
//! (PUBLISH to [`super::publish`], (UN)SUBSCRIBE to [`super::subscribe`], acknowledgements of
//! our messages to the session, PINGREQ, DISCONNECT).
//!
//! # Backpressure while the store is behind
//! Every PUBLISH waits in [`super::uncommitted`] for its verdict (for the relay: the store's
//! commit), QoS 0 included. While those waiting messages occupy `max_uncommitted_bytes` or
//! more, the connection stops decoding PUBLISHes: they stay in the read buffer, and once that
//! holds [`super::HELD_READ_AHEAD`] bytes the socket is not read at all, so TCP slows the
//! client down. Decoding resumes, in order, as verdicts come. Only the store ends a hold: a
//! QoS 2 message that awaits its PUBREL is committed already and holds nothing back, so no
//! packet of the client's is needed to go on. This serves MQTT 3.1.1 and v5 clients alike.
//! While held back, the packets that cannot wait behind the held PUBLISHes (PUBACK, PUBREC,
//! PUBREL, PUBCOMP, PINGREQ, SUBSCRIBE, UNSUBSCRIBE) are still taken out of the buffer and
//! served, so the client's acknowledgements of our messages, its PUBRELs and its pings do not
//! starve, and a subscription is in effect for every PUBLISH routed once its SUBSCRIBE was
//! read, from whatever connection (as it is when the client is not held back: a SUBSCRIBE is
//! served at once, while the client's earlier PUBLISHes may still await their verdict). A held-back
//! connection has no keep-alive deadline (we are the ones not reading); the timer restarts
//! when the hold ends.

use super::{Conn, ConnectionEnd};
use crate::broker::codec::{self, Inbound, Outbound};
use crate::broker::session::OutState;

impl Conn {
    /// Resolves known verdicts and decodes what the buffer holds, as long as either frees
    /// room for the other: packets held back while the window was full are decoded as soon
    /// as verdicts make room, without waiting for the socket to wake us.
    pub(super) async fn process_buffered(&mut self) -> Result<(), ConnectionEnd> {
        loop {
            self.drain_verdicts().await?;
            let before = self.rbuf.len();
            if before == 0 {
                return Ok(());
            }
            self.read_packets().await?;
            if self.rbuf.len() == before {
                return Ok(());
            }
        }
    }

    pub(super) async fn read_packets(&mut self) -> Result<(), ConnectionEnd> {
        loop {
            // Store behind: PUBLISHes wait in the buffer (see the module doc).
            if self.store_behind() {
                if !self.serve_past_held().await? {
                    return Ok(());
                }
                continue;
            }
            match codec::decode(
                &mut self.rbuf,
                self.protocol,
                self.state.config().max_packet_size,
            ) {
                Ok(Some(p)) => self.handle(p).await?,
                Ok(None) => return Ok(()),
                Err(e) => return Err(self.protocol_error(e.reason_code(), e.to_string()).await),
            }
        }
    }

    /// While held back: serves the acknowledgements, (UN)SUBSCRIBEs and pings that follow the
    /// held PUBLISHes in the buffer, up to the first packet that must keep its place
    /// (DISCONNECT, AUTH, ...). True if one was served (the hold may have ended).
    pub(super) async fn serve_past_held(&mut self) -> Result<bool, ConnectionEnd> {
        let max = self.state.config().max_packet_size;
        let mut off = 0;
        loop {
            let frame = match self
                .rbuf
                .get(off..)
                .map(|rest| codec::peek_frame(rest, max))
            {
                Some(Ok(Some(f))) => f,
                Some(Ok(None)) | None => return Ok(false),
                Some(Err(e)) => {
                    return Err(self.protocol_error(e.reason_code(), e.to_string()).await)
                }
            };
            let (byte1, len) = frame;
            match byte1 >> 4 {
                3 => off += len,
                4..=8 | 10 | 12 => {
                    let mut tail = self.rbuf.split_off(off);
                    let decoded = codec::decode(&mut tail, self.protocol, max);
                    self.rbuf.unsplit(tail);
                    return match decoded {
                        Ok(Some(p)) => {
                            self.handle(p).await?;
                            Ok(true)
                        }
                        Ok(None) => Ok(false),
                        Err(e) => Err(self.protocol_error(e.reason_code(), e.to_string()).await),
                    };
                }
                _ => return Ok(false),
            }
        }
    }

    /// True while the client's messages awaiting their verdict occupy `max_uncommitted_bytes`
    /// or more: the connection takes no further PUBLISH.
    pub(super) fn store_behind(&self) -> bool {
        !self.pending.is_empty()
            && self.pending.bytes() >= self.state.config().max_uncommitted_bytes
    }

    pub(super) async fn handle(&mut self, p: Inbound) -> Result<(), ConnectionEnd> {
        match p {
            Inbound::Publish(p) => self.on_publish(p).await,
            Inbound::PubAck(pkid) => {
                let acked = self.state.acknowledged(
                    &self.info.client_id,
                    self.conn_id,
                    pkid,
                    OutState::Puback,
                );
                self.owns(acked, "PUBACK")
            }
            Inbound::PubRec { pkid, failed } => {
                let release = self
                    .state
                    .received(&self.info.client_id, self.conn_id, pkid, failed);
                if self.owns(release, "PUBREC")? {
                    self.queue(Outbound::PubRel { pkid });
                }
                Ok(())
            }
            Inbound::PubComp(pkid) => {
                let acked = self.state.acknowledged(
                    &self.info.client_id,
                    self.conn_id,
                    pkid,
                    OutState::Pubcomp,
                );
                self.owns(acked, "PUBCOMP")
            }
            Inbound::PubRel(pkid) => {
                let found = self.state.release(&self.info.client_id, self.conn_id, pkid);
                let found = self.owns(found, "PUBREL")?;
                self.unreleased.remove(&pkid);
                self.queue(Outbound::PubComp {
                    pkid,
                    reason: if found { 0 } else { 0x92 },
                });
                Ok(())
            }
            Inbound::Subscribe {
                pkid,
                filters,
                sub_id,
            } => self.on_subscribe(pkid, filters, sub_id).await,
            Inbound::Unsubscribe { pkid, filters } => self.on_unsubscribe(pkid, filters),
            Inbound::PingReq => {
                self.queue(Outbound::PingResp);
                Ok(())
            }
            Inbound::Disconnect {
                reason,
                session_expiry,
            } => {
                if let Some(e) = session_expiry {
                    if self.connect_expiry == 0 && e != 0 {
                        return Err(self
                            .protocol_error(
                                0x82,
                                "DISCONNECT sets a Session Expiry Interval after CONNECT set 0"
                                    .into(),
                            )
                            .await);
                    }
                    let set = self.state.set_expiry(&self.info.client_id, self.conn_id, e);
                    self.owns(set, "DISCONNECT's Session Expiry Interval")?;
                }
                // Messages sent before DISCONNECT are still owed their delivery.
                self.settle_pending().await?;
                Err(if reason == 0 {
                    ConnectionEnd::Normal
                } else {
                    ConnectionEnd::ClientWithWill(reason)
                })
            }
            Inbound::Auth => Err(self
                .protocol_error(0x82, "AUTH without an authentication method".into())
                .await),
            Inbound::ServerOnly(what) => Err(self
                .protocol_error(
                    0x82,
                    format!("client sent {what}, which only a server may send"),
                )
                .await),
        }
    }
}
