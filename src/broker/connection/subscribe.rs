//! SUBSCRIBE and UNSUBSCRIBE: each filter is checked (validity, `$share` form, the ACL) here,
//! stored by the session state (which also refuses beyond `max_subscriptions` and queues the
//! retained messages asked for), and answered with SUBACK/UNSUBACK codes of the client's
//! protocol version; SUBACK goes out before those retained messages.

use super::{Conn, ConnectionEnd};
use crate::broker::codec::{self, Outbound};
use crate::broker::subscriptions::{is_shared, shared_parts, Subscription};
use crate::broker::Protocol;
use crate::topic;

impl Conn {
    pub(super) async fn on_subscribe(
        &mut self,
        pkid: u16,
        filters: Vec<codec::SubRequest>,
        sub_id: Option<usize>,
    ) -> Result<(), ConnectionEnd> {
        let v5 = self.protocol == Protocol::V5;
        let mut codes = Vec::with_capacity(filters.len());
        let mut accepted = Vec::new();
        for f in filters {
            // `$share/{group}/{filter}`: the ACL and the validity rules apply to the filter.
            let shared = is_shared(&f.filter);
            let inner = match shared_parts(&f.filter) {
                Some((_, inner)) => inner,
                None if shared => "",
                None => f.filter.as_str(),
            };
            if let Err(e) = topic::validate_filter(inner) {
                if !v5 {
                    // 3.1.1 §4.8: an invalid filter is a protocol violation.
                    return Err(self
                        .protocol_error(0x8F, format!("invalid topic filter '{}': {e}", f.filter))
                        .await);
                }
                codes.push(0x8F);
                continue;
            }
            if !self.state.hooks().may_subscribe(&self.info, inner) {
                self.state.count(|s| s.denied_subscribe += 1);
                codes.push(if v5 { 0x87 } else { 0x80 });
                continue;
            }
            codes.push(f.qos as u8);
            accepted.push((codes.len() - 1, f));
        }
        let (idx, subs): (Vec<usize>, Vec<Subscription>) = accepted
            .into_iter()
            .map(|(idx, f)| {
                let sub = Subscription {
                    filter: f.filter,
                    qos: f.qos,
                    no_local: f.no_local,
                    retain_as_published: f.retain_as_published,
                    retain_handling: f.retain_handling,
                    id: sub_id,
                };
                (idx, sub)
            })
            .unzip();
        let refused = self
            .state
            .subscribe(&self.info.client_id, self.conn_id, subs);
        let refused = self.owns(refused, "SUBSCRIBE")?;
        for (idx, refused) in idx.into_iter().zip(refused) {
            if let Some(c) = codes.get_mut(idx).filter(|_| refused) {
                *c = if v5 { 0x97 } else { 0x80 };
            }
        }
        // SUBACK first: the retained messages queued above are written after it.
        self.queue(Outbound::SubAck { pkid, codes });
        self.write_out().await
    }

    pub(super) fn on_unsubscribe(
        &mut self,
        pkid: u16,
        filters: Vec<String>,
    ) -> Result<(), ConnectionEnd> {
        let codes = self
            .state
            .unsubscribe(&self.info.client_id, self.conn_id, filters);
        let codes = self.owns(codes, "UNSUBSCRIBE")?;
        self.queue(Outbound::UnsubAck { pkid, codes });
        Ok(())
    }
}
