//! SUBSCRIBE and UNSUBSCRIBE on a session, with the retained messages a subscription asks
//! for.

use super::writes::Outcome;
use super::{BrokerState, NotOwner};
use crate::broker::persist::Op;
use crate::broker::session::Delivery;
use crate::broker::subscriptions::{is_shared, Subscription};
use crate::clock::Stamp;

impl BrokerState {
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
        let limit = self.config.max_subscriptions;
        let outcome = Outcome::Logged {
            client_id: Some(client_id),
            during: "subscribe",
        };
        let (refused, _) = self.change(outcome, |t, w| {
            let s = t.owned(client_id, conn_id)?;
            let mut refused = vec![false; subs.len()];
            let mut retained = Vec::new();
            for (i, sub) in subs.into_iter().enumerate() {
                if !s.subs.contains(&sub.filter) && s.subs.len() >= limit {
                    refused[i] = true;
                    continue;
                }
                let is_new = s.subs.insert(sub.clone());
                if s.persistent() {
                    w.ops.push(Op::UpsertSub {
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
            for sub in retained {
                let found = t.retained().matching(&sub.filter, &now);
                for m in found {
                    if !self.hooks.may_receive(client_id, &m.topic) {
                        continue;
                    }
                    let d = Delivery {
                        shared: None,
                        qos: m.qos.min(sub.qos),
                        msg: m,
                        retain: true,
                        sub_ids: sub.id.into_iter().collect(),
                        seq: None,
                    };
                    t.enqueue(client_id, d, self.config.max_queued_messages, &mut w.ops);
                }
            }
            Ok(refused)
        });
        refused
    }

    /// Removes `filters` from the session of `client_id`; per filter, the UNSUBACK code
    /// (0x00, or 0x11 no subscription existed).
    pub fn unsubscribe(
        &self,
        client_id: &str,
        conn_id: u64,
        filters: Vec<String>,
    ) -> Result<Vec<u8>, NotOwner> {
        self.change_session(client_id, conn_id, "unsubscribe", |s, ops| {
            let mut codes = Vec::with_capacity(filters.len());
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
            codes
        })
    }
}
