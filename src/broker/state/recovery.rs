//! Start-up: the state rebuilt from the store, with what expired while the daemon was
//! stopped settled in the store.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use super::tables::Tables;
use super::writes::Outcome;
use super::BrokerState;
use crate::broker::limits::Admission;
use crate::broker::persist::{self, Op};
use crate::broker::retained::Retained;
use crate::broker::session::{Inflight, OutState, Session};
use crate::broker::{BrokerConfig, BrokerStats, Hooks};
use crate::clock::Stamp;
use crate::store::{Db, StoreError};

impl BrokerState {
    /// Builds the state from what the store holds, and settles in the store what expired
    /// while the daemon was stopped.
    pub async fn load(
        config: BrokerConfig,
        db: Db,
        hooks: Arc<dyn Hooks>,
    ) -> Result<BrokerState, StoreError> {
        let loaded = db.run(persist::load).await?;
        let (state, ops) = BrokerState::from_loaded(config, db, hooks, loaded);
        let (_, commit) = state.change(Outcome::Awaited, |_, w| w.ops = ops);
        if let Some(commit) = commit {
            commit.await.map_err(|_| StoreError::Closed)??;
        }
        Ok(state)
    }

    fn from_loaded(
        config: BrokerConfig,
        db: Db,
        hooks: Arc<dyn Hooks>,
        loaded: persist::Loaded,
    ) -> (BrokerState, Vec<Op>) {
        let now = Stamp::now();
        let mut ops = Vec::new();
        let mut sessions = HashMap::new();
        for ls in loaded.sessions {
            let expiry_ms = i64::from(ls.expiry_secs) * 1000;
            let gone_ms = ls
                .disconnected_wall
                .map(|w| (now.wall_ms - w).max(0))
                .unwrap_or(0);
            let left = expiry_ms - gone_ms;
            if left <= 0 {
                log::info!(
                    "local broker: session '{}' expired while stopped",
                    ls.client_id
                );
                ops.push(Op::DeleteSession {
                    client_id: ls.client_id,
                });
                continue;
            }
            let mut s = Session::new(ls.client_id.clone(), ls.expiry_secs);
            for sub in ls.subs {
                s.subs.insert(sub);
            }
            for (d, released) in ls.messages {
                match released {
                    // PUBREC'd: the client has it; what it still needs is the PUBREL, under
                    // the packet id it answered (expiry no longer applies).
                    Some(Some(pkid)) => s.inflight.push_back(Inflight {
                        pkid,
                        delivery: d,
                        state: OutState::Pubcomp,
                    }),
                    // PUBREC'd in a store that did not keep the packet id, or expired.
                    Some(None) => ops.extend(d.seq.map(|seq| Op::DeleteMsg { seq })),
                    None if d.msg.is_expired(&now) => {
                        ops.extend(d.seq.map(|seq| Op::DeleteMsg { seq }))
                    }
                    None => s.queue.push_back(d),
                }
            }
            s.incoming_qos2.extend(ls.incoming_qos2);
            s.expires_at = Some(now.plus(Duration::from_millis(left as u64)));
            ops.push(Op::SessionDisconnected {
                client_id: ls.client_id.clone(),
                wall_ms: ls.disconnected_wall.unwrap_or(now.wall_ms),
            });
            sessions.insert(ls.client_id, s);
        }
        let mut retained = Retained::default();
        for m in loaded.retained {
            if m.is_expired(&now) {
                ops.push(Op::DeleteRetained { topic: m.topic });
            } else {
                retained.insert_loaded(m);
            }
        }
        log::info!(
            "local broker: loaded {} persistent sessions and {} retained messages",
            sessions.len(),
            retained.len()
        );
        let retained = Arc::new(Mutex::new(retained));
        let tables = Tables {
            sessions,
            retained: Arc::clone(&retained),
            stats: BrokerStats::default(),
            share_turn: HashMap::new(),
            next_conn_id: 0,
            next_seq: loaded.max_seq,
        };
        (
            BrokerState {
                config,
                db,
                hooks,
                tables: Mutex::new(tables),
                retained,
                admission: Admission::default(),
                closed: AtomicBool::new(false),
                wills_pending: AtomicUsize::new(0),
                wills_done: Notify::new(),
            },
            ops,
        )
    }
}
