//! Rows leaving the queue on purpose: acknowledgements ([`Queue::ack`]), expiry
//! ([`Queue::sweep_expired`]) and the expired or undecodable rows a scan met.
//!
//! # Contract
//! - Each delete is one writer job without a savepoint (it has no refusal of its own, see
//!   [`crate::store::Db::submit_fail_first`]); an acknowledgement's delete is deferred to ride
//!   with the next batch ([`crate::store::Db::submit_deferred`]); what it really deleted (counted in the same transaction)
//!   is subtracted from the totals at once and added to the counters (`acked`, `expired`,
//!   `corrupt`) only after the commit.
//! - Ids that are gone already are ignored, so a late or repeated ack is harmless.
//! - A set of ids is deleted with two statements (the ids bound as one `rarray` parameter),
//!   whatever its size.
//! - The expiry test is [`EXPIRED`], answered from the two deadline indexes.

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use rusqlite::types::Value;
use rusqlite::{named_params, Connection};
use tokio::sync::oneshot;

use super::ledger;
use super::scan::Found;
use super::share::removed_per_share;
use super::stats::text_lossy;
use super::totals::{share_value, size_value, Shared};
use super::{Queue, StoreError, Totals};
use crate::clock::Stamp;

/// The expiry test of the queue's contract (see [`super`], Expiry), with named parameters `:cur_boot`, `:now_boot`,
/// `:now_wall`. `NULL` (never expires) when the row has no deadline.
pub(super) const EXPIRED: &str = "((boot_id = :cur_boot AND deadline_boot <= :now_boot) OR \
                       (boot_id != :cur_boot AND deadline_wall <= :now_wall))";

impl Queue {
    /// Deletes the expired and unreadable rows a fetch met, and counts what was really deleted.
    pub(super) async fn delete_found(&self, found: Found) -> Result<(), StoreError> {
        self.submit_delete_found(found)
            .await
            .map_err(|_| StoreError::Closed)?
    }

    pub(super) fn submit_delete_found(
        &self,
        found: Found,
    ) -> oneshot::Receiver<Result<(), StoreError>> {
        let shared = Arc::clone(&self.shared);
        let after = Arc::clone(&self.shared);
        self.db.submit_fail_first(
            move |conn| {
                shared.sync_totals(conn)?;
                let expired = delete_ids(conn, &shared, &found.expired, ledger::Entry::Expired)?;
                let bad = delete_ids(conn, &shared, &found.bad, ledger::Entry::Corrupt)?;
                shared.removed(expired);
                shared.removed(bad);
                Ok((expired.rows, bad.rows))
            },
            move |result| {
                after.settle(&result);
                let (expired, bad) = result?;
                after.expired.fetch_add(expired, Ordering::Relaxed);
                after.corrupt.fetch_add(bad, Ordering::Relaxed);
                Ok(())
            },
        )
    }

    /// Deletes acknowledged rows; ids that are gone already are ignored.
    pub async fn ack(&self, ids: Vec<i64>) -> Result<(), StoreError> {
        self.delete_acked(ids, false)
            .await
            .map_err(|_| StoreError::Closed)?
    }

    /// [`Queue::ack`] without waiting for the commit; the answer comes after it. Until then
    /// [`Queue::next_batch`] may still return the rows, so the caller keeps them excluded.
    /// The uplink uses it so that draining does not stop for one commit per PUBACK. The delete
    /// is deferred: it rides with the next batch of the store's writer (at most 25 ms later),
    /// so a message's delete costs no fsync of its own.
    pub fn ack_submit(&self, ids: Vec<i64>) -> oneshot::Receiver<Result<(), StoreError>> {
        self.delete_acked(ids, true)
    }

    fn delete_acked(
        &self,
        ids: Vec<i64>,
        deferred: bool,
    ) -> oneshot::Receiver<Result<(), StoreError>> {
        let shared = Arc::clone(&self.shared);
        let after = Arc::clone(&self.shared);
        let job = move |conn: &rusqlite::Connection| {
            shared.sync_totals(conn)?;
            let gone = delete_ids(conn, &shared, &ids, ledger::Entry::Delivered)?;
            shared.removed(gone);
            Ok(gone.rows)
        };
        let then = move |result: Result<u64, StoreError>| {
            after.settle(&result);
            after.acked.fetch_add(result?, Ordering::Relaxed);
            Ok(())
        };
        if deferred {
            self.db.submit_deferred(job, then)
        } else {
            self.db.submit_fail_first(job, then)
        }
    }

    /// Deletes every expired row; returns how many.
    pub async fn sweep_expired(&self) -> Result<u64, StoreError> {
        self.sweep_expired_at(Stamp::now()).await
    }

    /// [`Queue::sweep_expired`] with an explicit "now" (for tests and simulations).
    pub async fn sweep_expired_at(&self, now: Stamp) -> Result<u64, StoreError> {
        let shared = Arc::clone(&self.shared);
        let after = Arc::clone(&self.shared);
        self.run_then(
            move |conn| {
                shared.sync_totals(conn)?;
                let args = named_params! {
                    ":cur_boot": now.boot_id,
                    ":now_boot": now.boot_ms,
                    ":now_wall": now.wall_ms,
                };
                // Counted first and deleted in the same transaction: the same rows.
                let counted =
                    count_per_share(conn, &format!("FROM uplink_queue WHERE {EXPIRED}"), args)?;
                let mut deleted = 0;
                if counted.rows > 0 {
                    deleted = conn
                        .prepare_cached(&format!("DELETE FROM uplink_queue WHERE {EXPIRED}"))?
                        .execute(args)?;
                    if deleted as u64 != counted.rows {
                        // Cannot happen within one transaction; if it does, trust the table.
                        shared.resync.store(true, Ordering::Release);
                    }
                    ledger::add_all(conn, &counted.per_route, ledger::Entry::Expired)?;
                }
                let gone = Totals {
                    rows: deleted as u64,
                    bytes: counted.bytes,
                };
                shared.removed(gone);
                removed_per_share(&shared, &counted.per_share);
                Ok(gone.rows)
            },
            move |result| {
                after.settle(&result);
                let n = result?;
                after.expired.fetch_add(n, Ordering::Relaxed);
                Ok(n)
            },
        )
        .await
    }
}

/// Deletes the rows with these ids, counting them in the ledger as `why`; returns what was
/// really deleted. Two statements for the whole set (an id array bound as a table), counted
/// before the delete in the same transaction.
/// The rows per share are taken off `shared`'s counts at once (they only steer the choice of
/// a share for new keys).
pub(super) fn delete_ids(
    conn: &Connection,
    shared: &Shared,
    ids: &[i64],
    why: ledger::Entry,
) -> Result<Totals, StoreError> {
    if ids.is_empty() {
        return Ok(Totals::default());
    }
    let array = Rc::new(ids.iter().copied().map(Value::from).collect::<Vec<Value>>());
    let counted = count_per_share(conn, "FROM uplink_queue WHERE id IN rarray(?1)", [&array])?;
    if counted.rows > 0 {
        conn.prepare_cached("DELETE FROM uplink_queue WHERE id IN rarray(?1)")?
            .execute([&array])?;
        ledger::add_all(conn, &counted.per_route, why)?;
    }
    removed_per_share(shared, &counted.per_share);
    Ok(Totals {
        rows: counted.rows,
        bytes: counted.bytes,
    })
}

/// What a `SELECT ... GROUP BY share, route` over rows about to go counted.
#[derive(Default)]
struct Counted {
    rows: u64,
    bytes: u64,
    /// `(share, rows)`.
    per_share: Vec<(u16, u64)>,
    /// `(route, rows)`.
    per_route: Vec<(String, u64)>,
}

/// Rows, logical bytes, rows per share and rows per route of `SELECT ... {from_where}`.
fn count_per_share<P: rusqlite::Params>(
    conn: &Connection,
    from_where: &str,
    args: P,
) -> Result<Counted, StoreError> {
    let mut st = conn.prepare_cached(&format!(
        "SELECT share, route, COUNT(*), COALESCE(SUM(size), 0) {from_where} GROUP BY share, route"
    ))?;
    let mut rows = st.query(args)?;
    let mut counted = Counted::default();
    while let Some(r) = rows.next()? {
        let n = r.get::<_, i64>(2)?.max(0) as u64;
        counted.rows += n;
        counted.bytes += size_value(r.get_ref(3)?);
        let share = share_value(r.get_ref(0)?);
        match counted.per_share.iter_mut().find(|(s, _)| *s == share) {
            Some((_, rows)) => *rows += n,
            None => counted.per_share.push((share, n)),
        }
        let route = text_lossy(r.get_ref(1)?);
        match counted.per_route.iter_mut().find(|(r, _)| *r == route) {
            Some((_, rows)) => *rows += n,
            None => counted.per_route.push((route, n)),
        }
    }
    Ok(counted)
}
