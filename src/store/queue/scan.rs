//! Reading the queue in delivery order: [`Queue::next_batch`] and the uplink's [`Drainer`].
//!
//! # Contract
//! - Reads only: a scan runs on a read connection and sees the last commit; it never waits for
//!   the writer and never sees a change that may still roll back.
//! - Delivery order is `(priority, id)` within a share, as range scans of the
//!   `(share, priority, id)` index that stop after `limit` entries: memory is bounded by the
//!   batch, never by the backlog, and a [`Drainer`] never looks at another share's rows. Every
//!   `starvation_every`-th fill of a drainer (see [`Queue::set_starvation_every`]) first takes
//!   the oldest deliverable row of the lowest waiting priority and marks it
//!   [`Batch::out_of_order`].
//! - Excluded (in-flight) ids are skipped; with a [`Cursor`] the rows of its priority up to its
//!   id are not even looked at.
//! - Expired and undecodable rows are never returned: the ones met (at most
//!   `MAX_SKIPPED_PER_BATCH` of each per call) are handed to the writer for deletion and
//!   counted there; undecodable ones are logged with their row id.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, Row};

use super::row::decode_row;
use super::totals::Shared;
use super::{Entry, Queue, StoreError, LOWEST_PRIORITY};
use crate::clock::Stamp;

/// The most expired or unreadable rows one [`Queue::next_batch`] call remembers to delete; more
/// are still skipped (never returned) and left to [`Queue::sweep_expired`]. Bounds memory when a
/// long tunnel left a huge expired backlog.
const MAX_SKIPPED_PER_BATCH: usize = 4096;

/// Where [`Drainer::next_batch`] resumes: the delivery-order key of the last row a drainer
/// handled from the ordered part of a [`Batch`].
///
/// A fetch with a cursor does not look at rows of the cursor's priority with ids up to the
/// cursor's; the drainer keeps every deliverable row there excluded (in flight, its delete
/// pending, or waiting for a retry). New rows always get larger ids, and more urgent
/// priorities are scanned from their start, so the only ways a row can appear behind a cursor
/// are a drainer's own retry becoming due and a re-queue ([`Queue::rewinds`]); either drops
/// the cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub priority: u8,
    pub id: i64,
}

impl Cursor {
    /// The cursor just past `entry`.
    pub fn at(entry: &Entry) -> Cursor {
        Cursor {
            priority: entry.priority,
            id: entry.id,
        }
    }
}

/// What [`Drainer::next_batch`] returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    /// In delivery order, except the anti-starvation pick, which comes first.
    pub entries: Vec<Entry>,
    /// The id of the anti-starvation pick, if this fetch made one: it is out of delivery
    /// order, so it must not move a [`Cursor`].
    pub out_of_order: Option<i64>,
}

impl Queue {
    /// Up to `limit` entries in delivery order (priority, then id), skipping ids in `exclude`
    /// (those in flight). Expired rows found on the way are deleted and counted instead of
    /// returned.
    ///
    /// Reads the last committed state on the store's reader connection, so a fetch never waits
    /// behind the writer's commits. A row whose delete was submitted ([`Queue::ack_submit`]) but
    /// not yet committed is still returned: the caller excludes it until the commit is answered.
    pub async fn next_batch(
        &self,
        exclude: Vec<i64>,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        self.next_batch_at(exclude, limit, Stamp::now()).await
    }

    /// [`Queue::next_batch`] with an explicit "now" (for tests and simulations).
    pub async fn next_batch_at(
        &self,
        exclude: Vec<i64>,
        limit: usize,
        now: Stamp,
    ) -> Result<Vec<Entry>, StoreError> {
        let shared = Arc::clone(&self.shared);
        let (entries, found) = self
            .db
            .read(move |conn| {
                let exclude: HashSet<i64> = exclude.into_iter().collect();
                let fill = match limit {
                    0 => 0,
                    _ => shared.fills.fetch_add(1, Ordering::AcqRel) + 1,
                };
                let mut all = Vec::new();
                let mut found = Found::default();
                let mut visited = 0;
                for share in 0..shared.shares.count as u16 {
                    let (batch, f) = scan(
                        conn,
                        &shared,
                        Scope {
                            share,
                            cursor: None,
                            fill,
                        },
                        &|id| exclude.contains(&id),
                        limit,
                        &now,
                        &mut visited,
                    )?;
                    all.extend(batch.entries);
                    found.expired.extend(f.expired);
                    found.bad.extend(f.bad);
                }
                // One share's rows come in delivery order; several are merged (used with one
                // share outside tests).
                if shared.shares.count > 1 {
                    all.sort_by_key(|e| (e.priority, e.id));
                    all.truncate(limit);
                }
                Ok((all, found))
            })
            .await?;
        if !found.is_empty() {
            self.delete_found(found).await?;
        }
        Ok(entries)
    }

    /// How many times rows were put back under their old ids (re-queued dead letters): a
    /// [`Cursor`] taken before a change of this number may skip them.
    pub fn rewinds(&self) -> u64 {
        self.shared.rewinds.load(Ordering::Acquire)
    }

    /// A fetcher for the one task that drains `share`; see [`Drainer`].
    pub fn drainer(&self, share: usize) -> Result<Drainer, StoreError> {
        Ok(Drainer {
            conn: self.db.open_reader()?,
            queue: self.clone(),
            share: u16::try_from(share).unwrap_or(u16::MAX),
            fills: 0,
            visited: 0,
        })
    }

    /// Sets the anti-starvation rule of [`Queue::next_batch`] and of every [`Drainer`]: every
    /// `every`-th call (with a non-zero limit) since [`Queue::open`] (since its creation, for a
    /// drainer), the first entry returned is the oldest deliverable
    /// row of the *lowest* waiting priority (highest number), then the batch goes on in normal
    /// order. So a priority-9 backlog still moves at one row per `every` fills while priority
    /// 0 traffic keeps coming. 0 turns the rule off (strict priority order).
    pub fn set_starvation_every(&self, every: u32) {
        self.shared.starvation_every.store(every, Ordering::Release);
    }
}

/// The columns [`visit`] and [`decode_row`] read, in order.
const COLUMNS: &str = "id, COALESCE((boot_id = :cur_boot AND deadline_boot <= :now_boot) OR \
                       (boot_id != :cur_boot AND deadline_wall <= :now_wall), 0), route, \
                       priority, topic, payload, qos, retain, props, accepted_wall, \
                       accepted_boot, boot_id, deadline_wall, deadline_boot, attempts, \
                       conflate_key";

/// Rows a fetch found expired or unreadable, to be deleted by the writer.
#[derive(Debug, Default)]
pub(super) struct Found {
    pub(super) expired: Vec<i64>,
    pub(super) bad: Vec<i64>,
}

impl Found {
    pub(super) fn is_empty(&self) -> bool {
        self.expired.is_empty() && self.bad.is_empty()
    }
}

/// Fetches for the one task that drains a share of the queue (one uplink connection), on a
/// read connection of its own.
///
/// A fetch runs on the caller's thread: it reads a few dozen rows through an index (tens of
/// microseconds), where a hop to a store thread and back costs more than the read itself and
/// would be paid at every refill of the in-flight window. It sees the last commit and never
/// waits for the writer.
pub struct Drainer {
    conn: Connection,
    queue: Queue,
    /// The share it drains (see [`super::share`]).
    share: u16,
    /// Fetches with a non-zero limit so far (for the anti-starvation pick).
    fills: u64,
    /// Rows looked at by all fetches so far.
    visited: u64,
}

impl Drainer {
    /// How many rows this drainer's fetches have looked at in all: a drainer whose share is
    /// empty looks at none, however long the other shares' backlogs.
    pub fn rows_visited(&self) -> u64 {
        self.visited
    }

    /// [`Queue::next_batch`] resuming after `cursor`: rows in `cursor`'s priority at or below
    /// its id are not looked at, so the drainer does not step over its own in-flight rows at
    /// every refill. Correct as long as every deliverable row there is excluded (see
    /// [`Cursor`]); `None` scans from the start. Expired and unreadable rows met on the way
    /// are handed to the writer for deletion without waiting for it.
    pub fn next_batch(
        &mut self,
        cursor: Option<Cursor>,
        exclude: &dyn Fn(i64) -> bool,
        limit: usize,
    ) -> Result<Batch, StoreError> {
        let now = Stamp::now();
        if limit > 0 {
            self.fills += 1;
        }
        let scope = Scope {
            share: self.share,
            cursor,
            fill: self.fills,
        };
        let (batch, found) = scan(
            &self.conn,
            &self.queue.shared,
            scope,
            exclude,
            limit,
            &now,
            &mut self.visited,
        )?;
        if !found.is_empty() {
            // Until the delete commits these rows are met (and skipped) again; the answer
            // only updates counters.
            drop(self.queue.submit_delete_found(found));
        }
        Ok(batch)
    }
}

/// Which rows one [`scan`] reads.
struct Scope {
    share: u16,
    /// Where the drainer resumes, if it has a cursor.
    cursor: Option<Cursor>,
    /// The number of this fetch (for the anti-starvation pick).
    fill: u64,
}

/// The fetch of [`Queue::next_batch`] and [`Drainer::next_batch`] on a read connection, within
/// one share; adds the rows it looked at to `visited`.
fn scan(
    conn: &Connection,
    shared: &Shared,
    scope: Scope,
    exclude: &dyn Fn(i64) -> bool,
    limit: usize,
    now: &Stamp,
    visited: &mut u64,
) -> Result<(Batch, Found), StoreError> {
    let Scope {
        share,
        cursor,
        fill,
    } = scope;
    let mut out = Vec::with_capacity(limit.min(1024));
    let mut found = Found::default();
    let mut out_of_order = None;
    // Rows the anti-starvation pick already looked at; the main scan skips them.
    let mut seen: HashSet<i64> = HashSet::new();
    if limit > 0 {
        let every = u64::from(shared.starvation_every.load(Ordering::Acquire));
        if every > 0 && fill % every == 0 {
            let mut st = conn.prepare_cached(&SCAN_SQL.oldest_of_priority)?;
            'levels: for priority in (0..=LOWEST_PRIORITY).rev() {
                if !shared.any_in(priority..=priority) {
                    continue;
                }
                let mut rows = st.query(params![
                    now.boot_id,
                    now.boot_ms,
                    now.wall_ms,
                    i64::from(share),
                    i64::from(priority)
                ])?;
                while let Some(row) = rows.next()? {
                    *visited += 1;
                    match visit(row, exclude, &shared.epoch, &mut found)? {
                        Visit::Skip => {}
                        Visit::Gone(id) => {
                            seen.insert(id);
                        }
                        Visit::Take(entry) => {
                            seen.insert(entry.id);
                            out_of_order = Some(entry.id);
                            out.push(*entry);
                            break 'levels;
                        }
                    }
                }
            }
        }
    }
    // Delivery order, as index range scans: with a cursor, the more urgent priorities from
    // their start, the cursor's priority after its id, then the less urgent priorities.
    let sql = &*SCAN_SQL;
    let mut scans: Vec<(&str, [i64; 2])> = Vec::with_capacity(3);
    match cursor {
        None => scans.push((&sql.all, [0, 0])),
        Some(c) => {
            let p = i64::from(c.priority);
            if c.priority > 0 && shared.any_in(0..=c.priority - 1) {
                scans.push((&sql.more_urgent, [p, 0]));
            }
            scans.push((&sql.after, [p, c.id]));
            if c.priority < LOWEST_PRIORITY && shared.any_in(c.priority + 1..=LOWEST_PRIORITY) {
                scans.push((&sql.less_urgent, [p, 0]));
            }
        }
    }
    'scans: for (sql, [p, id]) in scans {
        if out.len() >= limit {
            break;
        }
        let mut st = conn.prepare_cached(sql)?;
        // Numbered parameters in a fixed order; each statement has only the first few.
        for (i, value) in [
            now.boot_id,
            now.boot_ms,
            now.wall_ms,
            i64::from(share),
            p,
            id,
        ]
        .into_iter()
        .enumerate()
        .take(st.parameter_count())
        {
            st.raw_bind_parameter(i + 1, value)?;
        }
        let mut rows = st.raw_query();
        while let Some(row) = rows.next()? {
            *visited += 1;
            let id: i64 = row.get(0)?;
            if seen.contains(&id) {
                continue;
            }
            if let Visit::Take(entry) = visit(row, exclude, &shared.epoch, &mut found)? {
                out.push(*entry);
                if out.len() >= limit {
                    break 'scans;
                }
            }
        }
    }
    let batch = Batch {
        entries: out,
        out_of_order,
    };
    Ok((batch, found))
}

/// The statements of [`scan`], built once.
struct ScanSql {
    /// Share ?4, in delivery order.
    all: String,
    /// Share ?4, priorities below ?5 (more urgent), in delivery order.
    more_urgent: String,
    /// Share ?4, priority ?5 after id ?6.
    after: String,
    /// Share ?4, priorities above ?5 (less urgent), in delivery order.
    less_urgent: String,
    /// Share ?4, priority ?5, oldest first (the anti-starvation pick).
    oldest_of_priority: String,
}

static SCAN_SQL: std::sync::LazyLock<ScanSql> = std::sync::LazyLock::new(|| {
    // `scan` binds by position: ?1 ?2 ?3 the clock (as named in COLUMNS), ?4 the share, ?5
    // the cursor's priority, ?6 its id.
    let columns = COLUMNS
        .replace(":cur_boot", "?1")
        .replace(":now_boot", "?2")
        .replace(":now_wall", "?3");
    let select = format!("SELECT {columns} FROM uplink_queue");
    ScanSql {
        all: format!("{select} WHERE share = ?4 ORDER BY priority, id"),
        more_urgent: format!("{select} WHERE share = ?4 AND priority < ?5 ORDER BY priority, id"),
        after: format!("{select} WHERE share = ?4 AND priority = ?5 AND id > ?6 ORDER BY id"),
        less_urgent: format!("{select} WHERE share = ?4 AND priority > ?5 ORDER BY priority, id"),
        oldest_of_priority: format!("{select} WHERE share = ?4 AND priority = ?5 ORDER BY id"),
    }
});

/// What [`Queue::next_batch`] does with one scanned row.
enum Visit {
    /// Excluded (in flight), or unreadable/expired beyond what one call remembers.
    Skip,
    /// Expired or unreadable: remembered for deletion.
    Gone(i64),
    Take(Box<Entry>),
}

/// Sorts one row of a [`COLUMNS`] scan: excluded, expired or unreadable (remembered in
/// `found`; unreadable ones are logged) or deliverable.
fn visit(
    row: &Row<'_>,
    exclude: &dyn Fn(i64) -> bool,
    epoch: &str,
    found: &mut Found,
) -> Result<Visit, StoreError> {
    let id: i64 = row.get(0)?;
    if exclude(id) {
        return Ok(Visit::Skip);
    }
    if !matches!(row.get_ref(1)?, ValueRef::Integer(0)) {
        if found.expired.len() < MAX_SKIPPED_PER_BATCH {
            found.expired.push(id);
            return Ok(Visit::Gone(id));
        }
        return Ok(Visit::Skip);
    }
    match decode_row(row, epoch) {
        Ok(entry) => Ok(Visit::Take(Box::new(entry))),
        Err(why) => {
            log::error!("store: uplink_queue row {id} cannot be decoded ({why}); deleting it");
            if found.bad.len() < MAX_SKIPPED_PER_BATCH {
                found.bad.push(id);
                return Ok(Visit::Gone(id));
            }
            Ok(Visit::Skip)
        }
    }
}
