//! Inbound QoS 2: the client's packet ids PUBREC'd and awaiting PUBREL.

use super::{BrokerState, NotOwner};
use crate::broker::persist::Op;

impl BrokerState {
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
        self.change_session(client_id, conn_id, "PUBREC of a QoS 2 message", |s, ops| {
            if s.incoming_qos2.insert(pkid) && s.persistent() {
                ops.push(Op::InsertIncoming {
                    client_id: client_id.to_string(),
                    pkid,
                });
            }
        })
    }

    /// PUBREL of QoS 2 packet `pkid` from `client_id`; false if it was not awaited.
    pub fn release(&self, client_id: &str, conn_id: u64, pkid: u16) -> Result<bool, NotOwner> {
        self.change_session(client_id, conn_id, "PUBREL of a QoS 2 message", |s, ops| {
            let found = s.incoming_qos2.remove(&pkid);
            if found && s.persistent() {
                ops.push(Op::DeleteIncoming {
                    client_id: client_id.to_string(),
                    pkid,
                });
            }
            found
        })
    }
}
