//! Lock → change → persist: every state change submits its store writes in the critical
//! section that made it, so rows keep the order of the changes without waiting for the disk
//! inside the lock. A write whose outcome nobody awaits is watched: if it fails, the log names
//! the client and what the store is now missing.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::tables::Tables;
use super::{BrokerState, Commit, NotOwner};
use crate::broker::persist::{self, Op};
use crate::broker::retained::RetainedWrite;
use crate::broker::session::Session;
use crate::store::StoreWrite;

/// Who waits for a state change's writes.
pub(super) enum Outcome<'a> {
    /// The caller awaits the commit.
    Awaited,
    /// Nobody: a failure is logged, naming the client whose action made the change (if any)
    /// and what it was doing.
    Logged {
        client_id: Option<&'a str>,
        during: &'static str,
    },
}

/// The store writes of one state change, submitted in one job.
#[derive(Default)]
pub(super) struct Writes {
    pub(super) ops: Vec<Op>,
    /// Another module's write, committed in the same job before `ops`.
    pub(super) also: Option<StoreWrite>,
    /// The retained change `ops` write, settled with their outcome.
    pub(super) retained: Option<RetainedWrite>,
}

impl BrokerState {
    /// Lock → change → persist, the one way the state changes: runs `change` on the tables
    /// under the lock and submits the writes it collected in the same critical section, so
    /// rows keep the order of the changes. Returns its value and, if there was anything to
    /// write, the commit.
    pub(super) fn change<T>(
        &self,
        outcome: Outcome<'_>,
        change: impl FnOnce(&mut Tables, &mut Writes) -> T,
    ) -> (T, Option<Commit>) {
        let mut t = self.lock();
        let mut w = Writes::default();
        let value = change(&mut t, &mut w);
        let commit = self.submit(w, outcome);
        drop(t);
        (value, commit)
    }

    /// [`BrokerState::change`] of the session of `client_id` alone, refused ([`NotOwner`],
    /// nothing changed) unless connection `conn_id` holds it; a failed write is logged.
    pub(super) fn change_session<T>(
        &self,
        client_id: &str,
        conn_id: u64,
        during: &'static str,
        change: impl FnOnce(&mut Session, &mut Vec<Op>) -> T,
    ) -> Result<T, NotOwner> {
        let outcome = Outcome::Logged {
            client_id: Some(client_id),
            during,
        };
        let (value, _) = self.change(outcome, |t, w| {
            t.owned(client_id, conn_id).map(|s| change(s, &mut w.ops))
        });
        value
    }

    /// Sends `w` to the store in one job (called with the lock held). Once the outcome is
    /// known, on the store's writer thread, the retained change is settled with it and a
    /// failure nobody awaits is logged with what a restart would miss.
    fn submit(&self, w: Writes, outcome: Outcome<'_>) -> Option<Commit> {
        let Writes {
            ops,
            also,
            retained,
        } = w;
        if ops.is_empty() && also.is_none() {
            return None;
        }
        let ops = Arc::new(ops);
        let written = Arc::clone(&ops);
        let blame = match outcome {
            Outcome::Awaited => None,
            Outcome::Logged { client_id, during } => Some((client_id.map(str::to_string), during)),
        };
        let settle = retained.map(|r| (Arc::clone(&self.retained), r));
        Some(self.db.submit_then(
            move |conn| {
                if let Some(also) = also {
                    also(conn)?;
                }
                persist::apply(conn, &written)
            },
            move |result| {
                if let Some((retained, write)) = settle {
                    let mut retained = retained.lock().unwrap_or_else(|p| p.into_inner());
                    retained.settle(&write, result.is_ok());
                }
                if let (Err(e), Some((client, during))) = (&result, blame) {
                    let by = client
                        .map(|c| format!(" of client '{c}'"))
                        .unwrap_or_default();
                    log::error!(
                        "local broker: store write{by} failed ({during}): {e}; not stored, so a restart would not see: {}",
                        describe(&ops)
                    );
                }
                result
            },
        ))
    }
}

/// What a batch of store writes held, for the log when it failed: each kind of row with its
/// count, naming the clients and topics.
fn describe(ops: &[Op]) -> String {
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for op in ops {
        let kind = match op {
            Op::UpsertSession { client_id, .. } => format!("session of '{client_id}'"),
            Op::SessionDisconnected { client_id, .. } => {
                format!("disconnect time of session '{client_id}'")
            }
            Op::DeleteSession { client_id } => format!("end of session '{client_id}'"),
            Op::UpsertSub { client_id, .. } => format!("subscription of '{client_id}'"),
            Op::DeleteSub { client_id, .. } => format!("unsubscription of '{client_id}'"),
            Op::InsertMsg { client_id, .. } => format!("queued message for '{client_id}'"),
            Op::DeleteMsg { .. } => "removal of a delivered or dropped message".to_string(),
            Op::ReleaseMsg { .. } => "PUBREC of a delivered QoS 2 message".to_string(),
            Op::InsertIncoming { client_id, .. } => {
                format!("QoS 2 packet id awaiting PUBREL from '{client_id}'")
            }
            Op::DeleteIncoming { client_id, .. } => {
                format!("PUBREL of a QoS 2 packet id from '{client_id}'")
            }
            Op::UpsertRetained(m) => format!("retained message on '{}'", m.topic),
            Op::DeleteRetained { topic } => format!("removal of the retained message on '{topic}'"),
        };
        *kinds.entry(kind).or_default() += 1;
    }
    kinds
        .into_iter()
        .map(|(k, n)| if n == 1 { k } else { format!("{n} × {k}") })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_is_described_by_kind_count_and_client() {
        let ops = vec![
            Op::UpsertSession {
                client_id: "ipad-1".into(),
                expiry_secs: 60,
            },
            Op::InsertIncoming {
                client_id: "ipad-1".into(),
                pkid: 7,
            },
            Op::DeleteMsg { seq: 1 },
            Op::DeleteMsg { seq: 2 },
            Op::DeleteRetained {
                topic: "cab/door".into(),
            },
        ];
        assert_eq!(
            describe(&ops),
            "QoS 2 packet id awaiting PUBREL from 'ipad-1', 2 × removal of a delivered or \
             dropped message, removal of the retained message on 'cab/door', session of 'ipad-1'"
        );
    }
}
