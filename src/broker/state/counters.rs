//! Counters and the list of connected clients.

use super::BrokerState;
use crate::broker::{BrokerStats, ClientSummary};

impl BrokerState {
    /// Changes counters.
    pub fn count(&self, f: impl FnOnce(&mut BrokerStats)) {
        f(&mut self.lock().stats);
    }

    pub fn stats(&self) -> BrokerStats {
        self.lock().stats.clone()
    }

    /// Connected clients, sorted by client id.
    pub fn clients(&self) -> Vec<ClientSummary> {
        let t = self.lock();
        let mut out: Vec<ClientSummary> = t
            .sessions
            .values()
            .filter_map(|s| {
                s.conn.as_ref().map(|c| ClientSummary {
                    client_id: s.client_id.clone(),
                    peer: c.info.peer,
                    protocol: c.info.protocol,
                    connected_since_ms: c.connected_since_ms,
                    subscriptions: s.subs.len(),
                })
            })
            .collect();
        out.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        out
    }
}
