//! Towards the client: the session's queued messages move into the in-flight window (bounded
//! by the client's Receive Maximum, 32 for 3.1.1) and are written with topic aliases where the
//! client allows them; a resumed session first gets again what it had not acknowledged.

use std::time::Duration;

use super::{Conn, ConnectionEnd};
use crate::broker::codec::{self, OutPublish, Outbound};
use crate::broker::session::{Inflight, OutState};
use crate::broker::state::NotSent;
use crate::clock::{self, Stamp};
use crate::message::QoS;

/// QoS 0 messages written per wake-up before giving other work a turn.
const FLUSH_BATCH: usize = 256;

impl Conn {
    /// After a session resumes, sends again what the client has not acknowledged.
    pub(super) async fn resend_inflight(&mut self) -> Result<(), ConnectionEnd> {
        let now = Stamp::now();
        let in_flight = self.state.in_flight(&self.info.client_id, self.conn_id);
        let packets: Vec<Outbound> = self
            .owns(in_flight, "resending in-flight messages")?
            .iter()
            .map(|f| match f.state {
                OutState::Pubcomp => Outbound::PubRel { pkid: f.pkid },
                _ => Outbound::Publish(out_publish(f, true, &now)),
            })
            .collect();
        for p in packets {
            self.queue(p);
        }
        self.write_out().await
    }

    /// Moves messages from the session queue into the in-flight window and writes them.
    pub(super) async fn flush_queue(&mut self) -> Result<(), ConnectionEnd> {
        let now = Stamp::now();
        let protocol = self.protocol;
        let out_max = self.out_max;
        let out_alias_max = self.out_alias_max;
        let out_aliases = &mut self.out_aliases;
        let wbuf = &mut self.wbuf;
        let sent = self
            .state
            .send_queued(&self.info.client_id, self.conn_id, FLUSH_BATCH, |f| {
                let mut publish = out_publish(f, false, &now);
                // Topic alias: a known topic is sent as its alias alone; a new one gets the
                // next free alias, remembered once the packet is encoded.
                let mut new_alias = None;
                if let Some(&a) = out_aliases.get(&publish.topic) {
                    publish.topic_alias = Some(a);
                    publish.topic.clear();
                } else if let Ok(n) = u16::try_from(out_aliases.len() + 1) {
                    if n <= out_alias_max {
                        publish.topic_alias = Some(n);
                        new_alias = Some((publish.topic.clone(), n));
                    }
                }
                let packet = Outbound::Publish(publish);
                match codec::encode(&packet, protocol, wbuf, out_max) {
                    Ok(()) => {
                        if let Some((t, n)) = new_alias {
                            out_aliases.insert(t, n);
                        }
                        Ok(())
                    }
                    Err(e) => Err(NotSent(format!(
                        "{e} (client maximum packet size {out_max})"
                    ))),
                }
            });
        self.owns(sent, "sending queued messages")?;
        self.write_out().await
    }
}

fn out_publish(f: &Inflight, dup: bool, now: &Stamp) -> OutPublish {
    let m = &f.delivery.msg;
    OutPublish {
        dup: dup && f.delivery.qos != QoS::AtMostOnce,
        qos: f.delivery.qos,
        retain: f.delivery.retain,
        topic: m.topic.clone(),
        pkid: f.pkid,
        payload: m.payload.clone(),
        properties: m.properties.clone(),
        expiry: m
            .deadline
            .map(|d| clock::expiry_secs(d.remaining(now).unwrap_or(Duration::ZERO))),
        sub_ids: f.delivery.sub_ids.clone(),
        topic_alias: None,
    }
}
