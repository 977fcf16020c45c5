//! Appending to the queue: [`Queue::enqueue`] and its variants.
//!
//! # Contract
//! - One job on the store's writer thread per entry: the optional companion write, the
//!   conflation delete, the `max_bytes` policy (refuse, or delete the oldest rows by id) and
//!   the insert commit together or not at all; the answer comes after the commit.
//! - Every refusal (too large, full under `RejectNew`) is decided before the job's first write,
//!   so it runs without a savepoint ([`crate::store::Db::submit_fail_first`]).
//! - Ids grow with the order of submission (`AUTOINCREMENT`), never reused.
//! - The in-memory totals change only once the job can no longer fail, by the rows the
//!   statements delete (read in the same transaction) and insert; counters only after the
//!   commit.
//! - A row's logical size is [`entry_size`]: topic + payload + encoded properties +
//!   [`ROW_OVERHEAD`], stored in its `size` column so totals never re-encode.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use rusqlite::{params, Connection};
use tokio::sync::oneshot;

use super::delete::delete_ids;
use super::ledger;
use super::share::removed_per_share;
use super::totals::{share_value, size_value};
use super::{
    NewEntry, Queue, QueueConfig, StoreError, Totals, WhenFull, LOWEST_PRIORITY, URGENT_PRIORITY,
};
use crate::message::Message;
use crate::store::{props, StoreWrite};

/// Bytes charged per row on top of topic, payload and properties: the fixed columns (about a
/// dozen integers), SQLite's record header, the `(priority, id)` index entry, and a short route
/// name. An allowance, not a measurement: `max_bytes` bounds logical bytes, not the file size.
pub const ROW_OVERHEAD: u64 = 96;

impl Queue {
    /// Appends in submission order; the answer comes after the commit. Full + `RejectNew` →
    /// `Err(StoreError::Full)` and nothing stored; full + `DropOldest` → the oldest rows (by id)
    /// are deleted until it fits, each counted as `dropped_full`. A single entry larger than
    /// `max_bytes` is refused with `Full` under both policies.
    ///
    /// Synchronous so the broker's ingest hook can call it; the receiver may be dropped.
    pub fn enqueue(&self, e: NewEntry) -> oneshot::Receiver<Result<i64, StoreError>> {
        self.enqueue_keyed(e, None)
    }

    /// [`Queue::enqueue`] with conflation: with `Some(key)`, every waiting row of the same
    /// route and key is deleted in the same transaction as the insert (counted as
    /// `conflated`), so only the newest survives. A deleted row may be in flight: its ack is
    /// then ignored like any ack of a missing id, and the central broker may get both.
    pub fn enqueue_keyed(
        &self,
        e: NewEntry,
        conflate_key: Option<String>,
    ) -> oneshot::Receiver<Result<i64, StoreError>> {
        self.enqueue_with(e, conflate_key, None)
    }

    /// [`Queue::enqueue_keyed`] that also runs `also` in the same job: it commits with the row
    /// or, if the row is refused (full) or the commit fails, not at all.
    pub fn enqueue_with(
        &self,
        e: NewEntry,
        conflate_key: Option<String>,
        also: Option<StoreWrite>,
    ) -> oneshot::Receiver<Result<i64, StoreError>> {
        self.enqueue_answered(e, conflate_key, also, |outcome| outcome)
    }

    /// [`Queue::enqueue_with`] whose answer is `verdict` of the outcome, made on the writer
    /// thread right after the commit: the broker gets its PUBACK verdict from the commit
    /// itself, with no task per message to translate it.
    pub fn enqueue_answered<V: Send + 'static>(
        &self,
        e: NewEntry,
        conflate_key: Option<String>,
        also: Option<StoreWrite>,
        verdict: impl FnOnce(Result<i64, StoreError>) -> V + Send + 'static,
    ) -> oneshot::Receiver<V> {
        let shared = Arc::clone(&self.shared);
        let after = Arc::clone(&self.shared);
        let props = props::encode(&e.message.properties);
        let size = size_of_parts(&e.message, props.as_deref());
        let priority = e.priority.min(LOWEST_PRIORITY);
        let order_key = self.shared.shares.order_key(&e.route, &e.message.topic);
        self.db.submit_fail_first(
            move |conn| {
                // Every refusal is decided before the first write (the job has no savepoint,
                // see `Db::submit_fail_first`).
                shared.sync_totals(conn)?;
                let QueueConfig {
                    max_bytes,
                    when_full,
                    urgent_reserve,
                } = shared.config;
                // Normal rows stop short of the reserve; urgent ones may use it.
                let urgent = priority <= URGENT_PRIORITY;
                let limit = if urgent {
                    max_bytes
                } else {
                    max_bytes.saturating_sub(urgent_reserve)
                };
                if size > limit {
                    return Err(StoreError::Full);
                }
                // Before the conflation delete: a replaced row in flight keeps its key on its
                // connection (see `share`).
                let share = shared.share_for(conn, order_key)?;
                let mut replaced = Totals::default();
                let mut replaced_ids: Vec<i64> = Vec::new();
                let mut gone_from: Vec<(u16, u64)> = Vec::new();
                if let Some(key) = &conflate_key {
                    let mut older = conn.prepare_cached(
                        "SELECT id, size, share FROM uplink_queue \
                         WHERE route = ?1 AND conflate_key = ?2",
                    )?;
                    let mut rows = older.query(params![e.route, key])?;
                    while let Some(r) = rows.next()? {
                        replaced_ids.push(r.get(0)?);
                        replaced.rows += 1;
                        replaced.bytes += size_value(r.get_ref(1)?);
                        gone_from.push((share_value(r.get_ref(2)?), 1));
                    }
                }
                // Totals change only once the job cannot fail any more (it may roll back).
                let current = shared
                    .bytes
                    .load(Ordering::Acquire)
                    .saturating_sub(replaced.bytes);
                let need = current.saturating_add(size).saturating_sub(limit);
                if need > 0 && when_full == WhenFull::RejectNew {
                    return Err(StoreError::Full);
                }
                let victims = if need > 0 {
                    match make_room(conn, need, urgent, &replaced_ids)? {
                        Some(victims) => victims,
                        // Only urgent rows could make room, and this message may not drop them.
                        None if !urgent => return Err(StoreError::Full),
                        None => {
                            // Fewer bytes in the table than the totals say: trust the table.
                            shared.resync.store(true, Ordering::Release);
                            Vec::new()
                        }
                    }
                } else {
                    Vec::new()
                };
                // Writes from here on; only an SQLite error can still fail the job.
                if replaced.rows > 0 {
                    conn.prepare_cached(
                        "DELETE FROM uplink_queue WHERE route = ?1 AND conflate_key = ?2",
                    )?
                    .execute(params![e.route, conflate_key])?;
                    ledger::add(conn, &e.route, ledger::Entry::Conflated, replaced.rows)?;
                }
                let dropped = delete_ids(conn, &shared, &victims, ledger::Entry::StoreFull)?;
                if let Some(also) = also {
                    also(conn)?;
                }
                shared.may_have(priority);
                let m = &e.message;
                let (deadline_wall, deadline_boot) = deadline_columns(m);
                conn.prepare_cached(
                    "INSERT INTO uplink_queue (route, priority, topic, payload, qos, retain, \
                     props, accepted_wall, accepted_boot, boot_id, deadline_wall, deadline_boot, \
                     size, conflate_key, share, order_key) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, \
                     ?16)",
                )?
                .execute(params![
                    e.route,
                    priority,
                    m.topic,
                    &m.payload[..],
                    m.qos as u8,
                    m.retain,
                    props,
                    m.accepted.wall_ms,
                    m.accepted.boot_ms,
                    m.accepted.boot_id,
                    deadline_wall,
                    deadline_boot,
                    i64::try_from(size).unwrap_or(i64::MAX),
                    conflate_key,
                    share,
                    order_key,
                ])?;
                let id = conn.last_insert_rowid();
                ledger::add(conn, &e.route, ledger::Entry::Accepted, 1)?;
                shared.removed(dropped);
                shared.removed(replaced);
                removed_per_share(&shared, &gone_from);
                shared.added(1, size);
                shared.share_added(share, 1);
                Ok((id, dropped.rows, replaced.rows, share))
            },
            move |result| {
                after.settle(&result);
                verdict(match result {
                    Ok((id, dropped, replaced, share)) => {
                        after.accepted.fetch_add(1, Ordering::Relaxed);
                        after.conflated.fetch_add(replaced, Ordering::Relaxed);
                        after.dropped_full.fetch_add(dropped, Ordering::Relaxed);
                        if dropped > 0 {
                            log::debug!("uplink queue full: dropped the {dropped} oldest entries");
                        }
                        after.notify(Some(share));
                        Ok(id)
                    }
                    Err(StoreError::Full) => {
                        after.rejected_full.fetch_add(1, Ordering::Relaxed);
                        Err(StoreError::Full)
                    }
                    Err(e) => Err(e),
                })
            },
        )
    }
}

/// The oldest rows whose deletion frees `need` bytes, chosen before anything is written (the
/// job is fail-first): normal rows (priority above [`URGENT_PRIORITY`]) first, then, only for
/// an urgent message, urgent rows; `skip` are rows the job deletes anyway. `None`: those rows
/// do not hold enough.
fn make_room(
    conn: &Connection,
    need: u64,
    urgent: bool,
    skip: &[i64],
) -> Result<Option<Vec<i64>>, StoreError> {
    const NORMAL_OLDEST: &str = "SELECT id, size FROM uplink_queue WHERE priority > ?1 ORDER BY id";
    const URGENT_OLDEST: &str =
        "SELECT id, size FROM uplink_queue WHERE priority <= ?1 ORDER BY id";
    let passes: &[&str] = if urgent {
        &[NORMAL_OLDEST, URGENT_OLDEST]
    } else {
        &[NORMAL_OLDEST]
    };
    let mut victims = Vec::new();
    let mut freed = 0u64;
    for sql in passes {
        let mut st = conn.prepare_cached(sql)?;
        let mut rows = st.query([URGENT_PRIORITY])?;
        while let Some(r) = rows.next()? {
            let id: i64 = r.get(0)?;
            if skip.contains(&id) {
                continue;
            }
            victims.push(id);
            freed += size_value(r.get_ref(1)?);
            if freed >= need {
                return Ok(Some(victims));
            }
        }
    }
    Ok(None)
}

/// The logical size of a message in the queue, as charged against `max_bytes`: topic + payload
/// + encoded properties + [`ROW_OVERHEAD`].
pub fn entry_size(message: &Message) -> u64 {
    size_of_parts(message, props::encode(&message.properties).as_deref())
}

fn size_of_parts(message: &Message, props: Option<&[u8]>) -> u64 {
    (message.topic.len() + message.payload.len() + props.map_or(0, <[u8]>::len)) as u64
        + ROW_OVERHEAD
}

/// Deadline columns, in the boot the message was accepted in. A deadline stamped in another
/// boot than the acceptance (not produced by this relay) is rebased by the wall clock.
fn deadline_columns(m: &Message) -> (Option<i64>, Option<i64>) {
    match m.deadline {
        None => (None, None),
        Some(d) if d.boot_id == m.accepted.boot_id => (Some(d.wall_ms), Some(d.boot_ms)),
        Some(d) => {
            let ahead = d.wall_ms.saturating_sub(m.accepted.wall_ms);
            (
                Some(d.wall_ms),
                Some(m.accepted.boot_ms.saturating_add(ahead)),
            )
        }
    }
}
