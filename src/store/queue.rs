//! The durable uplink queue: messages accepted from the cab iPads wait here, in SQLite, until
//! the central broker has acknowledged them.
//!
//! # Contract
//!
//! - **Committed means kept.** [`Queue::enqueue`] answers `Ok(id)` only after the row is
//!   committed (group commit on the store's writer thread, see [`crate::store`]). With
//!   `synchronous = FULL` that survives a power cut; with `NORMAL` it survives a crash of the
//!   process, and a power cut may roll back the last few batches.
//! - **Deleted only on purpose.** A row leaves the queue for exactly one of these reasons, each
//!   counted in [`CounterSnapshot`]: acknowledged by the central broker ([`Queue::ack`],
//!   `acked`), dropped to make room under [`WhenFull::DropOldest`] (`dropped_full`), expired
//!   (`expired`), unreadable (`corrupt`, logged as an error), or replaced by a newer entry of
//!   the same route and conflation key ([`Queue::enqueue_keyed`], `conflated`). Nothing else
//!   deletes rows, so a message that is never acknowledged is retried until it expires, is
//!   pushed out or is superseded.
//! - **Delivery order** is `(priority, id)`: priority 0 first, then 1, ... 9; within a priority,
//!   the order of acceptance. Ids come from an `AUTOINCREMENT` key, so they grow strictly with
//!   the order of submission to [`Queue::enqueue`] and are never reused, even after the newest
//!   row was deleted or the daemon restarted. One exception keeps low priorities from starving:
//!   every `starvation_every`-th [`Queue::next_batch`] call (see
//!   [`Queue::set_starvation_every`]) starts with the oldest deliverable row of the lowest
//!   waiting priority; within a priority, order is always the order of acceptance.
//! - **Stable message id.** Every entry has `msg_id = "{epoch}-{id}"`, where `epoch` is a random
//!   value drawn once per store file and kept in `meta`. It stays the same across restarts, so
//!   the far side can detect a resend after a reconnect or a crash as a duplicate, and it changes
//!   when the store file is replaced, so a fresh store's ids do not collide with the old ones.
//! - **Bounded size.** `max_bytes` bounds the *logical* queued bytes: the sum over rows of
//!   [`entry_size`] = topic + payload + encoded properties + [`ROW_OVERHEAD`]. The SQLite file
//!   is somewhat larger (page slack, indexes, the WAL, free pages after deletes); size the
//!   partition with that margin. A single entry larger than `max_bytes` is refused with
//!   [`StoreError::Full`] under either policy. When an entry does not fit, `RejectNew` refuses
//!   it (`rejected_full`, nothing stored), `DropOldest` deletes the oldest rows by id — whatever
//!   their priority, and even if they are in flight — until it fits.
//! - **Exact totals.** Row count and byte total are kept in memory (atomics), loaded by
//!   [`Queue::open`] with one SQL aggregate, and changed only by the rows a statement really
//!   inserted or deleted (`DELETE ... RETURNING size`, or a count in the same transaction).
//!   They are updated on the writer thread as each job runs, so the next job of the same batch
//!   sees them; if a batch fails to commit they are re-read from SQL before the next job.
//!   Counters (`accepted`, `acked`, ...) are only advanced once the change is committed.
//! - **Bounded memory.** Nothing loads the whole queue: [`Queue::next_batch`] steps a cursor
//!   over the `(priority, id)` index and stops after `limit` entries, sweeping and stats run as
//!   SQL aggregates/deletes. Memory is bounded by the batch, never by the backlog.
//! - **Never panics on disk data.** Every column is checked when a row is read; a row that
//!   cannot be decoded (bad UTF-8, unknown QoS, damaged properties, half a deadline) is deleted,
//!   counted as `corrupt` and logged, and the scan goes on.
//!
//! # Expiry
//!
//! A message's deadline is fixed when it is accepted (see [`crate::clock`]). Each row keeps the
//! deadline as both boot-clock and wall-clock milliseconds plus the boot it was accepted in, and
//! the expiry test is [`Stamp::is_past`] written in SQL:
//!
//! ```sql
//! (boot_id = :cur_boot AND deadline_boot <= :now_boot) OR
//! (boot_id != :cur_boot AND deadline_wall <= :now_wall)
//! ```
//!
//! Within a boot the monotonic boot clock decides, so a wall clock corrected by NTP or GNSS
//! neither expires the buffer nor keeps it forever; after a reboot the wall clock decides.
//! `NULL` deadlines never expire. Expired rows are never returned by [`Queue::next_batch`]: the
//! ones it meets while scanning (excluded, in-flight ids are left alone) are deleted and
//! counted, and [`Queue::sweep_expired`] deletes all
//! of them so they stop holding space. A row in flight may expire and be swept; its later ack is
//! then ignored like any ack of an unknown id.
//!
//! # Layout
//!
//! Table `uplink_queue` (schema migration 1): `id` (AUTOINCREMENT key), `route`, `priority`,
//! `topic`, `payload` (BLOB), `qos`, `retain`, `props` (BLOB, `NULL` when there are none; a small
//! versioned binary encoding, see [`encode_props`]), `accepted_wall`, `accepted_boot`, `boot_id`,
//! `deadline_wall`, `deadline_boot` (both `NULL` for "never"), `size` (the row's
//! [`entry_size`], so totals can be kept without re-encoding), `attempts` (failed deliveries).
//! Indexes: `(priority, id)` for delivery order; `(boot_id, deadline_boot)` and
//! `(deadline_wall)`, partial on non-`NULL` deadlines, so the sweep's expiry test is two index
//! range scans rather than a table scan. Table `meta` holds the key `uplink_epoch`.
//! Migration 3 adds `conflate_key` (`NULL`: never conflated) with an index on
//! `(route, conflate_key)`, partial on non-`NULL` keys, so replacing a key's waiting row is an
//! index lookup.

use std::collections::HashSet;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use rusqlite::types::{Value, ValueRef};
use rusqlite::{named_params, params, Connection, OptionalExtension, Row};
use serde::Deserialize;
use tokio::sync::{oneshot, watch};

pub mod dead_letter;

use super::{Db, StoreError, StoreWrite};
use crate::clock::Stamp;
use crate::message::{Message, Properties, QoS};

/// Bytes charged per row on top of topic, payload and properties: the fixed columns (about a
/// dozen integers), SQLite's record header, the `(priority, id)` index entry, and a short route
/// name. An allowance, not a measurement: `max_bytes` bounds logical bytes, not the file size.
pub const ROW_OVERHEAD: u64 = 96;

/// The most expired or unreadable rows one [`Queue::next_batch`] call remembers to delete; more
/// are still skipped (never returned) and left to [`Queue::sweep_expired`]. Bounds memory when a
/// long tunnel left a huge expired backlog.
const MAX_SKIPPED_PER_BATCH: usize = 4096;

/// `meta` key of the store's identity used in message ids.
const EPOCH_KEY: &str = "uplink_epoch";

/// Highest (least urgent) priority; larger values are stored as this.
pub const LOWEST_PRIORITY: u8 = 9;

/// What to do with a new entry that does not fit in `max_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Delete the oldest entries (lowest ids) until the new one fits.
    #[default]
    DropOldest,
    /// Refuse the new entry.
    RejectNew,
}

/// Limits of the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueConfig {
    /// Upper bound of the sum of [`entry_size`] over all queued rows.
    pub max_bytes: u64,
    pub when_full: WhenFull,
}

/// A message accepted for the uplink, already mapped to its remote topic by its route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEntry {
    /// Name of the route that accepted it (for stats).
    pub route: String,
    /// 0 is sent first, 9 last; values above 9 are stored as 9.
    pub priority: u8,
    pub message: Message,
}

/// A queued message, as read back for delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Row id: what [`Queue::ack`] and [`Queue::record_failure`] take.
    pub id: i64,
    /// `"{epoch}-{id}"`, stable across restarts of the same store.
    pub msg_id: String,
    pub route: String,
    pub priority: u8,
    pub message: Message,
    /// Failed delivery attempts recorded so far.
    pub attempts: u32,
}

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

/// Row count and logical bytes of the queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub rows: u64,
    pub bytes: u64,
}

/// Counters since [`Queue::open`]; they only grow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// Entries committed by [`Queue::enqueue`].
    pub accepted: u64,
    /// Rows deleted to make room under [`WhenFull::DropOldest`].
    pub dropped_full: u64,
    /// Entries refused because the queue was full (or the entry alone exceeds `max_bytes`).
    pub rejected_full: u64,
    /// Rows deleted because their deadline passed.
    pub expired: u64,
    /// Rows deleted by [`Queue::ack`].
    pub acked: u64,
    /// Rows deleted because they could not be decoded.
    pub corrupt: u64,
    /// Waiting rows replaced by a newer entry of the same conflation key.
    pub conflated: u64,
}

/// Depth of one route's part of the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteStats {
    pub route: String,
    pub depth: u64,
    pub bytes: u64,
    /// When the oldest waiting entry of this route was accepted.
    pub oldest_accepted: Option<Stamp>,
}

/// Depth of the queue, in total and per route (sorted by route name).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub depth: u64,
    pub bytes: u64,
    pub oldest_accepted: Option<Stamp>,
    pub routes: Vec<RouteStats>,
}

/// State shared by all clones of a [`Queue`].
struct Shared {
    config: QueueConfig,
    epoch: String,
    /// Totals as of the last job run on the writer thread (see the module contract).
    rows: AtomicU64,
    bytes: AtomicU64,
    /// Set when a commit failed: the totals may include rolled-back changes.
    resync: AtomicBool,
    accepted: AtomicU64,
    dropped_full: AtomicU64,
    rejected_full: AtomicU64,
    expired: AtomicU64,
    acked: AtomicU64,
    corrupt: AtomicU64,
    conflated: AtomicU64,
    /// Anti-starvation rule of [`Queue::next_batch`]: every this many calls, 0 = off.
    starvation_every: AtomicU32,
    /// Calls of [`Queue::next_batch`] with a non-zero limit since open.
    fills: AtomicU64,
    /// Times rows were put back under their old ids (see [`Queue::rewinds`]).
    rewinds: AtomicU64,
    /// Bit `p` set: priority `p` may have rows. Set before an insert, never cleared while
    /// open, so a fetch skips the index ranges of priorities never used (most trains use one
    /// or two).
    priorities: AtomicU16,
    /// Bumped after every commit that added rows; each drain task watches it.
    commits: watch::Sender<u64>,
}

impl Shared {
    /// Runs first in every job on the writer thread: re-reads the totals if a commit failed.
    fn sync_totals(&self, conn: &Connection) -> Result<(), StoreError> {
        if self.resync.swap(false, Ordering::AcqRel) {
            match load_totals(conn) {
                Ok(t) => {
                    self.rows.store(t.rows, Ordering::Release);
                    self.bytes.store(t.bytes, Ordering::Release);
                }
                Err(e) => {
                    self.resync.store(true, Ordering::Release);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Marks priority `p` as possibly holding rows (see `priorities`).
    fn may_have(&self, p: u8) {
        self.priorities
            .fetch_or(1 << p.min(LOWEST_PRIORITY), Ordering::AcqRel);
    }

    /// Whether any priority in `range` may hold rows.
    fn any_in(&self, range: std::ops::RangeInclusive<u8>) -> bool {
        let mask = self.priorities.load(Ordering::Acquire);
        range.into_iter().any(|p| mask & (1 << p) != 0)
    }

    fn added(&self, rows: u64, bytes: u64) {
        self.rows.fetch_add(rows, Ordering::AcqRel);
        self.bytes.fetch_add(bytes, Ordering::AcqRel);
    }

    fn removed(&self, t: Totals) {
        // Saturating: a total never wraps below zero, whatever a resync raced with.
        let sub = |a: &AtomicU64, n: u64| {
            let mut current = a.load(Ordering::Acquire);
            while let Err(actual) = a.compare_exchange_weak(
                current,
                current.saturating_sub(n),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                current = actual;
            }
        };
        sub(&self.rows, t.rows);
        sub(&self.bytes, t.bytes);
    }

    /// Second half of every job, after its commit: a failed commit means the totals are stale.
    fn settle<T>(&self, result: &Result<T, StoreError>) {
        if matches!(result, Err(StoreError::Commit(_))) {
            self.resync.store(true, Ordering::Release);
        }
    }
}

/// Handle to the uplink queue. Cheap to clone; clones share totals and counters.
#[derive(Clone)]
pub struct Queue {
    db: Db,
    shared: Arc<Shared>,
}

impl Queue {
    /// Loads totals (rows, bytes) and the store's identity (a random epoch kept in `meta`, drawn
    /// on first use), used in message ids.
    pub async fn open(db: Db, config: QueueConfig) -> Result<Queue, StoreError> {
        let (epoch, totals, priorities) = db
            .run(|conn| {
                let epoch = load_or_create_epoch(conn)?;
                Ok((epoch, load_totals(conn)?, load_priorities(conn)?))
            })
            .await?;
        if totals.bytes > config.max_bytes {
            log::warn!(
                "uplink queue holds {} bytes, more than max_bytes {}; {}",
                totals.bytes,
                config.max_bytes,
                match config.when_full {
                    WhenFull::DropOldest => "the oldest entries go as new ones arrive",
                    WhenFull::RejectNew => "new entries are refused until it drains",
                }
            );
        }
        Ok(Queue {
            db,
            shared: Arc::new(Shared {
                config,
                epoch,
                rows: AtomicU64::new(totals.rows),
                bytes: AtomicU64::new(totals.bytes),
                resync: AtomicBool::new(false),
                accepted: AtomicU64::new(0),
                dropped_full: AtomicU64::new(0),
                rejected_full: AtomicU64::new(0),
                expired: AtomicU64::new(0),
                acked: AtomicU64::new(0),
                corrupt: AtomicU64::new(0),
                conflated: AtomicU64::new(0),
                starvation_every: AtomicU32::new(0),
                fills: AtomicU64::new(0),
                rewinds: AtomicU64::new(0),
                priorities: AtomicU16::new(priorities),
                commits: watch::channel(0).0,
            }),
        })
    }

    /// The store's identity, the first part of every `msg_id`.
    pub fn epoch(&self) -> &str {
        &self.shared.epoch
    }

    /// The stable id of row `id`.
    pub fn msg_id(&self, id: i64) -> String {
        format!("{}-{id}", self.shared.epoch)
    }

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
        let shared = Arc::clone(&self.shared);
        let after = Arc::clone(&self.shared);
        let props = encode_props(&e.message.properties);
        let size = size_of_parts(&e.message, props.as_deref());
        let priority = e.priority.min(LOWEST_PRIORITY);
        self.db.submit_then(
            move |conn| {
                if let Some(also) = also {
                    also(conn)?;
                }
                shared.sync_totals(conn)?;
                let QueueConfig {
                    max_bytes,
                    when_full,
                } = shared.config;
                if size > max_bytes {
                    return Err(StoreError::Full);
                }
                let mut replaced = Totals::default();
                if let Some(key) = &conflate_key {
                    let mut older = conn.prepare_cached(
                        "DELETE FROM uplink_queue WHERE route = ?1 AND conflate_key = ?2 \
                         RETURNING size",
                    )?;
                    let mut rows = older.query(params![e.route, key])?;
                    while let Some(r) = rows.next()? {
                        replaced.rows += 1;
                        replaced.bytes += size_value(r.get_ref(0)?);
                    }
                }
                let mut dropped = Totals::default();
                // Totals change only once the job cannot fail any more (it may roll back).
                let current = shared
                    .bytes
                    .load(Ordering::Acquire)
                    .saturating_sub(replaced.bytes);
                if current.saturating_add(size) > max_bytes {
                    if when_full == WhenFull::RejectNew {
                        return Err(StoreError::Full);
                    }
                    let mut oldest = conn.prepare_cached(
                        "DELETE FROM uplink_queue WHERE id = (SELECT MIN(id) FROM uplink_queue) \
                         RETURNING size",
                    )?;
                    while current.saturating_sub(dropped.bytes).saturating_add(size) > max_bytes {
                        let gone: Option<u64> = oldest
                            .query_row([], |r| Ok(size_value(r.get_ref(0)?)))
                            .optional()?;
                        match gone {
                            Some(bytes) => {
                                dropped.rows += 1;
                                dropped.bytes += bytes;
                            }
                            None => {
                                // Empty, yet the totals said otherwise: trust the table.
                                shared.resync.store(true, Ordering::Release);
                                break;
                            }
                        }
                    }
                }
                shared.may_have(priority);
                let m = &e.message;
                let (deadline_wall, deadline_boot) = deadline_columns(m);
                conn.prepare_cached(
                    "INSERT INTO uplink_queue (route, priority, topic, payload, qos, retain, \
                     props, accepted_wall, accepted_boot, boot_id, deadline_wall, deadline_boot, \
                     size, conflate_key) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
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
                ])?;
                let id = conn.last_insert_rowid();
                shared.removed(dropped);
                shared.removed(replaced);
                shared.added(1, size);
                Ok((id, dropped.rows, replaced.rows))
            },
            move |result| {
                after.settle(&result);
                match result {
                    Ok((id, dropped, replaced)) => {
                        after.accepted.fetch_add(1, Ordering::Relaxed);
                        after.conflated.fetch_add(replaced, Ordering::Relaxed);
                        after.dropped_full.fetch_add(dropped, Ordering::Relaxed);
                        if dropped > 0 {
                            log::debug!("uplink queue full: dropped the {dropped} oldest entries");
                        }
                        after.commits.send_modify(|n| *n += 1);
                        Ok(id)
                    }
                    Err(StoreError::Full) => {
                        after.rejected_full.fetch_add(1, Ordering::Relaxed);
                        Err(StoreError::Full)
                    }
                    Err(e) => Err(e),
                }
            },
        )
    }

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
        let (batch, found) = self
            .db
            .read(move |conn| {
                let exclude: HashSet<i64> = exclude.into_iter().collect();
                scan(
                    conn,
                    &shared,
                    None,
                    &|id| exclude.contains(&id),
                    None,
                    limit,
                    &now,
                )
            })
            .await?;
        if !found.is_empty() {
            self.delete_found(found).await?;
        }
        Ok(batch.entries)
    }

    /// How many times rows were put back under their old ids (re-queued dead letters): a
    /// [`Cursor`] taken before a change of this number may skip them.
    pub fn rewinds(&self) -> u64 {
        self.shared.rewinds.load(Ordering::Acquire)
    }

    /// A fetcher for the one task that drains the queue; see [`Drainer`].
    pub fn drainer(&self) -> Result<Drainer, StoreError> {
        Ok(Drainer {
            conn: self.db.open_reader()?,
            queue: self.clone(),
            filter: None,
        })
    }

    /// Deletes the expired and unreadable rows a fetch met, and counts what was really deleted.
    async fn delete_found(&self, found: Found) -> Result<(), StoreError> {
        self.submit_delete_found(found)
            .await
            .map_err(|_| StoreError::Closed)?
    }

    fn submit_delete_found(&self, found: Found) -> oneshot::Receiver<Result<(), StoreError>> {
        let shared = Arc::clone(&self.shared);
        let after = Arc::clone(&self.shared);
        self.db.submit_then(
            move |conn| {
                shared.sync_totals(conn)?;
                let expired = delete_ids(conn, &found.expired)?;
                let bad = delete_ids(conn, &found.bad)?;
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

    /// Sets the anti-starvation rule of [`Queue::next_batch`]: every `every`-th call (with a
    /// non-zero limit) since [`Queue::open`], the first entry returned is the oldest deliverable
    /// row of the *lowest* waiting priority (highest number), then the batch goes on in normal
    /// order. So a priority-9 backlog still moves at one row per `every` fills while priority
    /// 0 traffic keeps coming. 0 turns the rule off (strict priority order).
    pub fn set_starvation_every(&self, every: u32) {
        self.shared.starvation_every.store(every, Ordering::Release);
    }

    /// Deletes acknowledged rows; ids that are gone already are ignored.
    pub async fn ack(&self, ids: Vec<i64>) -> Result<(), StoreError> {
        self.ack_submit(ids).await.map_err(|_| StoreError::Closed)?
    }

    /// [`Queue::ack`] without waiting for the commit; the answer comes after it. Until then
    /// [`Queue::next_batch`] may still return the rows, so the caller keeps them excluded.
    /// The uplink uses it so that draining does not stop for one commit per PUBACK.
    pub fn ack_submit(&self, ids: Vec<i64>) -> oneshot::Receiver<Result<(), StoreError>> {
        let shared = Arc::clone(&self.shared);
        let after = Arc::clone(&self.shared);
        self.db.submit_then(
            move |conn| {
                shared.sync_totals(conn)?;
                let gone = delete_ids(conn, &ids)?;
                shared.removed(gone);
                Ok(gone.rows)
            },
            move |result| {
                after.settle(&result);
                after.acked.fetch_add(result?, Ordering::Relaxed);
                Ok(())
            },
        )
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
                let (rows, bytes): (i64, i64) = conn
                    .prepare_cached(&format!(
                        "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM uplink_queue WHERE {EXPIRED}"
                    ))?
                    .query_row(args, |r| Ok((r.get(0)?, r.get(1)?)))?;
                let mut deleted = 0;
                if rows > 0 {
                    deleted = conn
                        .prepare_cached(&format!("DELETE FROM uplink_queue WHERE {EXPIRED}"))?
                        .execute(args)?;
                    if deleted as i64 != rows {
                        // Cannot happen within one transaction; if it does, trust the table.
                        shared.resync.store(true, Ordering::Release);
                    }
                }
                let gone = Totals {
                    rows: deleted as u64,
                    bytes: bytes.max(0) as u64,
                };
                shared.removed(gone);
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

    /// Depth, bytes and oldest accepted stamp, per route and in total. Aggregates in SQL; the
    /// cost grows with the backlog, so call it for status, not per message.
    pub async fn stats(&self) -> Result<QueueStats, StoreError> {
        self.db
            .read(|conn| {
                let mut per_route = Vec::new();
                {
                    let mut st = conn.prepare_cached(
                        "SELECT route, COUNT(*), COALESCE(SUM(size), 0), MIN(id) \
                         FROM uplink_queue GROUP BY route ORDER BY route",
                    )?;
                    let mut rows = st.query([])?;
                    while let Some(r) = rows.next()? {
                        let route = text_lossy(r.get_ref(0)?);
                        let depth: i64 = r.get(1)?;
                        let bytes: i64 = r.get(2)?;
                        let oldest: i64 = r.get(3)?;
                        per_route.push((route, depth, bytes, oldest));
                    }
                }
                let mut accepted_of = conn.prepare_cached(
                    "SELECT accepted_wall, accepted_boot, boot_id FROM uplink_queue WHERE id = ?1",
                )?;
                let mut stats = QueueStats::default();
                let mut oldest_id = None;
                for (route, depth, bytes, oldest) in per_route {
                    let stamp = accepted_of
                        .query_row([oldest], |r| {
                            Ok(match (r.get_ref(0)?, r.get_ref(1)?, r.get_ref(2)?) {
                                (
                                    ValueRef::Integer(wall_ms),
                                    ValueRef::Integer(boot_ms),
                                    ValueRef::Integer(boot_id),
                                ) => Some(Stamp {
                                    wall_ms,
                                    boot_ms,
                                    boot_id,
                                }),
                                _ => None,
                            })
                        })
                        .optional()?
                        .flatten();
                    stats.depth += depth.max(0) as u64;
                    stats.bytes += bytes.max(0) as u64;
                    if !matches!(oldest_id, Some(o) if o <= oldest) {
                        oldest_id = Some(oldest);
                        stats.oldest_accepted = stamp;
                    }
                    stats.routes.push(RouteStats {
                        route,
                        depth: depth.max(0) as u64,
                        bytes: bytes.max(0) as u64,
                        oldest_accepted: stamp,
                    });
                }
                Ok(stats)
            })
            .await
    }

    /// Rows and logical bytes queued, from memory.
    pub fn totals(&self) -> Totals {
        Totals {
            rows: self.shared.rows.load(Ordering::Acquire),
            bytes: self.shared.bytes.load(Ordering::Acquire),
        }
    }

    /// Monotonic counters since [`Queue::open`].
    pub fn counters(&self) -> CounterSnapshot {
        let s = &self.shared;
        CounterSnapshot {
            accepted: s.accepted.load(Ordering::Relaxed),
            dropped_full: s.dropped_full.load(Ordering::Relaxed),
            rejected_full: s.rejected_full.load(Ordering::Relaxed),
            expired: s.expired.load(Ordering::Relaxed),
            acked: s.acked.load(Ordering::Relaxed),
            corrupt: s.corrupt.load(Ordering::Relaxed),
            conflated: s.conflated.load(Ordering::Relaxed),
        }
    }

    /// Tells of commits that added rows: `changed()` resolves once there was one since the
    /// receiver last looked, so a commit between two waits is not lost. Every task that drains
    /// the queue (one per uplink connection) has a receiver of its own.
    pub fn commits(&self) -> watch::Receiver<u64> {
        self.shared.commits.subscribe()
    }

    /// Whether row `id` is still queued (not yet acknowledged, expired or dropped). A primary
    /// key lookup, cheap at any depth: lets a producer keep at most one row of its own pending.
    pub async fn is_queued(&self, id: i64) -> Result<bool, StoreError> {
        self.db
            .read(move |conn| {
                Ok(conn
                    .prepare_cached("SELECT 1 FROM uplink_queue WHERE id = ?1")?
                    .query_row([id], |_| Ok(()))
                    .optional()?
                    .is_some())
            })
            .await
    }

    async fn run_then<T, U, F, G>(&self, f: F, then: G) -> Result<U, StoreError>
    where
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
        G: FnOnce(Result<T, StoreError>) -> Result<U, StoreError> + Send + 'static,
        T: Send + 'static,
        U: Send + 'static,
    {
        self.db
            .submit_then(f, then)
            .await
            .map_err(|_| StoreError::Closed)?
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
struct Found {
    expired: Vec<i64>,
    bad: Vec<i64>,
}

impl Found {
    fn is_empty(&self) -> bool {
        self.expired.is_empty() && self.bad.is_empty()
    }
}

/// Fetches for the one task that drains the queue, on a read connection of its own.
///
/// A fetch runs on the caller's thread: it reads a few dozen rows through an index (tens of
/// microseconds), where a hop to a store thread and back costs more than the read itself and
/// would be paid at every refill of the in-flight window. It sees the last commit and never
/// waits for the writer.
pub struct Drainer {
    conn: Connection,
    queue: Queue,
    /// Which rows this drainer takes (route, topic, conflation key): one of several parallel
    /// uplink connections takes only its share. `None`: every row.
    filter: Option<RowFilter>,
}

/// Decides from a row's route, topic and conflation key whether a drainer takes it.
pub type TakesRow = dyn Fn(&str, &str, Option<&str>) -> bool + Send + Sync;

/// A [`Drainer`]'s share of the rows.
pub type RowFilter = Box<TakesRow>;

impl Drainer {
    /// Takes only the rows `filter` accepts (the others are neither returned nor looked at
    /// further: their own drainer deals with them).
    pub fn with_filter(mut self, filter: RowFilter) -> Drainer {
        self.filter = Some(filter);
        self
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
        let filter = self.filter.as_deref();
        let (batch, found) = scan(
            &self.conn,
            &self.queue.shared,
            cursor,
            exclude,
            filter,
            limit,
            &now,
        )?;
        if !found.is_empty() {
            // Until the delete commits these rows are met (and skipped) again; the answer
            // only updates counters.
            drop(self.queue.submit_delete_found(found));
        }
        Ok(batch)
    }
}

/// The fetch of [`Queue::next_batch`] and [`Drainer::next_batch`] on a read connection.
fn scan(
    conn: &Connection,
    shared: &Shared,
    cursor: Option<Cursor>,
    exclude: &dyn Fn(i64) -> bool,
    filter: Option<&TakesRow>,
    limit: usize,
    now: &Stamp,
) -> Result<(Batch, Found), StoreError> {
    let mut out = Vec::with_capacity(limit.min(1024));
    let mut found = Found::default();
    let mut out_of_order = None;
    // Rows the anti-starvation pick already looked at; the main scan skips them.
    let mut seen: HashSet<i64> = HashSet::new();
    if limit > 0 {
        let fill = shared.fills.fetch_add(1, Ordering::AcqRel) + 1;
        let every = u64::from(shared.starvation_every.load(Ordering::Acquire));
        if every > 0 && fill % every == 0 {
            let mut st = conn.prepare_cached(&SCAN_SQL.oldest_of_priority)?;
            'levels: for priority in (0..=LOWEST_PRIORITY).rev() {
                let mut rows = st.query(params![
                    now.boot_id,
                    now.boot_ms,
                    now.wall_ms,
                    i64::from(priority)
                ])?;
                while let Some(row) = rows.next()? {
                    match visit(row, exclude, filter, &shared.epoch, &mut found)? {
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
        for (i, value) in [now.boot_id, now.boot_ms, now.wall_ms, p, id]
            .into_iter()
            .enumerate()
            .take(st.parameter_count())
        {
            st.raw_bind_parameter(i + 1, value)?;
        }
        let mut rows = st.raw_query();
        while let Some(row) = rows.next()? {
            let id: i64 = row.get(0)?;
            if seen.contains(&id) {
                continue;
            }
            if let Visit::Take(entry) = visit(row, exclude, filter, &shared.epoch, &mut found)? {
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
    /// Everything, in delivery order.
    all: String,
    /// Priorities below ?4 (more urgent), in delivery order.
    more_urgent: String,
    /// Priority ?4 after id ?5.
    after: String,
    /// Priorities above ?4 (less urgent), in delivery order.
    less_urgent: String,
    /// Priority ?4, oldest first (the anti-starvation pick).
    oldest_of_priority: String,
}

static SCAN_SQL: std::sync::LazyLock<ScanSql> = std::sync::LazyLock::new(|| {
    // `scan` binds by position: ?1 ?2 ?3 the clock (as named in COLUMNS), ?4 the cursor's
    // priority, ?5 its id.
    let columns = COLUMNS
        .replace(":cur_boot", "?1")
        .replace(":now_boot", "?2")
        .replace(":now_wall", "?3");
    let select = format!("SELECT {columns} FROM uplink_queue");
    ScanSql {
        all: format!("{select} ORDER BY priority, id"),
        more_urgent: format!("{select} WHERE priority < ?4 ORDER BY priority, id"),
        after: format!("{select} WHERE priority = ?4 AND id > ?5 ORDER BY id"),
        less_urgent: format!("{select} WHERE priority > ?4 ORDER BY priority, id"),
        oldest_of_priority: format!("{select} WHERE priority = ?4 ORDER BY id"),
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
    filter: Option<&TakesRow>,
    epoch: &str,
    found: &mut Found,
) -> Result<Visit, StoreError> {
    let id: i64 = row.get(0)?;
    if exclude(id) {
        return Ok(Visit::Skip);
    }
    if let Some(takes) = filter {
        // Borrowed from the row, no copy: most rows of a shared queue are another
        // drainer's.
        let text = |i: usize| match row.get_ref(i) {
            Ok(ValueRef::Text(t)) => std::str::from_utf8(t).ok(),
            _ => None,
        };
        let (route, topic) = (text(2).unwrap_or(""), text(4).unwrap_or(""));
        if !takes(route, topic, text(15)) {
            return Ok(Visit::Skip);
        }
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
            log::error!("uplink queue: row {id} cannot be decoded ({why}); deleting it");
            if found.bad.len() < MAX_SKIPPED_PER_BATCH {
                found.bad.push(id);
                return Ok(Visit::Gone(id));
            }
            Ok(Visit::Skip)
        }
    }
}

/// The expiry test of the module doc, with named parameters `:cur_boot`, `:now_boot`,
/// `:now_wall`. `NULL` (never expires) when the row has no deadline.
const EXPIRED: &str = "((boot_id = :cur_boot AND deadline_boot <= :now_boot) OR \
                       (boot_id != :cur_boot AND deadline_wall <= :now_wall))";

/// The logical size of a message in the queue, as charged against `max_bytes`: topic + payload
/// + encoded properties + [`ROW_OVERHEAD`].
pub fn entry_size(message: &Message) -> u64 {
    size_of_parts(message, encode_props(&message.properties).as_deref())
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

fn load_totals(conn: &Connection) -> Result<Totals, StoreError> {
    let (rows, bytes): (i64, i64) = conn.query_row(
        "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM uplink_queue",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    Ok(Totals {
        rows: rows.max(0) as u64,
        bytes: bytes.max(0) as u64,
    })
}

/// The priorities that hold rows: one index seek each.
fn load_priorities(conn: &Connection) -> Result<u16, StoreError> {
    let mut st = conn.prepare("SELECT 1 FROM uplink_queue WHERE priority = ?1 LIMIT 1")?;
    let mut mask = 0u16;
    for p in 0..=LOWEST_PRIORITY {
        if st.exists([p])? {
            mask |= 1 << p;
        }
    }
    Ok(mask)
}

fn load_or_create_epoch(conn: &Connection) -> Result<String, StoreError> {
    // Outer `None`: no epoch yet; inner `None`: a value that is not usable text.
    let stored: Option<Option<String>> = conn
        .query_row("SELECT value FROM meta WHERE key = ?1", [EPOCH_KEY], |r| {
            Ok(match r.get_ref(0)? {
                ValueRef::Text(t) => std::str::from_utf8(t)
                    .ok()
                    .filter(|e| !e.is_empty() && e.bytes().all(|b| b.is_ascii_alphanumeric()))
                    .map(str::to_owned),
                _ => None,
            })
        })
        .optional()?;
    match stored {
        Some(Some(epoch)) => return Ok(epoch),
        Some(None) => log::error!(
            "uplink queue: the stored epoch is unreadable; drawing a new one, so ids of queued \
             messages change and the central side may not recognise their resends"
        ),
        None => {}
    }
    let epoch = format!("{:016x}", fastrand::u64(..));
    conn.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
        [EPOCH_KEY, epoch.as_str()],
    )?;
    Ok(epoch)
}

/// Deletes the rows with these ids; returns what was really deleted. Two statements for the
/// whole set (an id array bound as a table), counted before the delete in the same
/// transaction.
fn delete_ids(conn: &Connection, ids: &[i64]) -> Result<Totals, StoreError> {
    if ids.is_empty() {
        return Ok(Totals::default());
    }
    let array = Rc::new(ids.iter().copied().map(Value::from).collect::<Vec<Value>>());
    let (rows, bytes): (i64, u64) = conn
        .prepare_cached(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM uplink_queue WHERE id IN rarray(?1)",
        )?
        .query_row([&array], |r| Ok((r.get(0)?, size_value(r.get_ref(1)?))))?;
    if rows > 0 {
        conn.prepare_cached("DELETE FROM uplink_queue WHERE id IN rarray(?1)")?
            .execute([&array])?;
    }
    Ok(Totals {
        rows: rows.max(0) as u64,
        bytes,
    })
}

/// The `size` column; the same reading as `SUM(size)` for the integers this module writes.
fn size_value(v: ValueRef<'_>) -> u64 {
    match v {
        ValueRef::Integer(n) => n.max(0) as u64,
        ValueRef::Real(f) if f > 0.0 => f as u64,
        _ => 0,
    }
}

fn text_lossy(v: ValueRef<'_>) -> String {
    match v {
        ValueRef::Text(t) | ValueRef::Blob(t) => String::from_utf8_lossy(t).into_owned(),
        ValueRef::Integer(n) => n.to_string(),
        ValueRef::Real(f) => f.to_string(),
        ValueRef::Null => String::new(),
    }
}

/// Reads one row of the `next_batch` query (columns 2.. after `id` and the expiry flag).
fn decode_row(row: &Row<'_>, epoch: &str) -> Result<Entry, String> {
    let col = |i: usize| row.get_ref(i).map_err(|e| e.to_string());
    let int = |i: usize, name: &str| match col(i)? {
        ValueRef::Integer(n) => Ok(n),
        other => Err(format!("{name} is {:?}, not an integer", other.data_type())),
    };
    let text = |i: usize, name: &str| match col(i)? {
        ValueRef::Text(t) => std::str::from_utf8(t)
            .map(str::to_owned)
            .map_err(|_| format!("{name} is not UTF-8")),
        other => Err(format!("{name} is {:?}, not text", other.data_type())),
    };
    let id = int(0, "id")?;
    let route = text(2, "route")?;
    let priority = u8::try_from(int(3, "priority")?).map_err(|_| "priority out of range")?;
    let topic = text(4, "topic")?;
    let payload = match col(5)? {
        ValueRef::Blob(b) | ValueRef::Text(b) => Bytes::copy_from_slice(b),
        other => return Err(format!("payload is {:?}", other.data_type())),
    };
    let qos = u8::try_from(int(6, "qos")?)
        .ok()
        .and_then(QoS::from_u8)
        .ok_or("qos out of range")?;
    let retain = match int(7, "retain")? {
        0 => false,
        1 => true,
        _ => return Err("retain is not 0 or 1".into()),
    };
    let properties = match col(8)? {
        ValueRef::Null => Properties::default(),
        ValueRef::Blob(b) => decode_props(b)?,
        other => return Err(format!("props is {:?}", other.data_type())),
    };
    let boot_id = int(11, "boot_id")?;
    let accepted = Stamp {
        wall_ms: int(9, "accepted_wall")?,
        boot_ms: int(10, "accepted_boot")?,
        boot_id,
    };
    let deadline = match (col(12)?, col(13)?) {
        (ValueRef::Null, ValueRef::Null) => None,
        (ValueRef::Integer(wall_ms), ValueRef::Integer(boot_ms)) => Some(Stamp {
            wall_ms,
            boot_ms,
            boot_id,
        }),
        _ => return Err("deadline columns are damaged".into()),
    };
    let attempts = u32::try_from(int(14, "attempts")?.max(0)).unwrap_or(u32::MAX);
    Ok(Entry {
        id,
        msg_id: format!("{epoch}-{id}"),
        route,
        priority,
        message: Message {
            topic,
            payload,
            qos,
            retain,
            properties,
            accepted,
            deadline,
        },
        attempts,
    })
}

/// Version byte of the properties encoding.
const PROPS_V1: u8 = 1;
const HAS_FORMAT: u8 = 1;
const HAS_CONTENT_TYPE: u8 = 2;
const HAS_RESPONSE_TOPIC: u8 = 4;
const HAS_CORRELATION: u8 = 8;

/// Encodes properties for the `props` column; `None` (stored as `NULL`) when there are none.
///
/// Layout: version byte `1`, a flags byte (which optional fields follow), the payload format
/// indicator byte if present, then content type, response topic and correlation data if present,
/// then the count of user properties and each key and value, in order. Strings and byte strings
/// are a LEB128 length followed by the bytes. Decoding rejects unknown versions and flags,
/// truncation and trailing bytes.
pub fn encode_props(p: &Properties) -> Option<Vec<u8>> {
    if *p == Properties::default() {
        return None;
    }
    let mut flags = 0;
    if p.payload_format_indicator.is_some() {
        flags |= HAS_FORMAT;
    }
    if p.content_type.is_some() {
        flags |= HAS_CONTENT_TYPE;
    }
    if p.response_topic.is_some() {
        flags |= HAS_RESPONSE_TOPIC;
    }
    if p.correlation_data.is_some() {
        flags |= HAS_CORRELATION;
    }
    let mut out = vec![PROPS_V1, flags];
    if let Some(f) = p.payload_format_indicator {
        out.push(f);
    }
    if let Some(s) = &p.content_type {
        put_bytes(&mut out, s.as_bytes());
    }
    if let Some(s) = &p.response_topic {
        put_bytes(&mut out, s.as_bytes());
    }
    if let Some(b) = &p.correlation_data {
        put_bytes(&mut out, b);
    }
    put_len(&mut out, p.user_properties.len());
    for (k, v) in &p.user_properties {
        put_bytes(&mut out, k.as_bytes());
        put_bytes(&mut out, v.as_bytes());
    }
    Some(out)
}

/// Inverse of [`encode_props`].
pub fn decode_props(b: &[u8]) -> Result<Properties, String> {
    let mut r = Reader { b };
    if r.byte()? != PROPS_V1 {
        return Err("props: unknown encoding version".into());
    }
    let flags = r.byte()?;
    if flags & !(HAS_FORMAT | HAS_CONTENT_TYPE | HAS_RESPONSE_TOPIC | HAS_CORRELATION) != 0 {
        return Err("props: unknown flags".into());
    }
    let mut p = Properties::default();
    if flags & HAS_FORMAT != 0 {
        p.payload_format_indicator = Some(r.byte()?);
    }
    if flags & HAS_CONTENT_TYPE != 0 {
        p.content_type = Some(r.string()?);
    }
    if flags & HAS_RESPONSE_TOPIC != 0 {
        p.response_topic = Some(r.string()?);
    }
    if flags & HAS_CORRELATION != 0 {
        p.correlation_data = Some(Bytes::copy_from_slice(r.bytes()?));
    }
    let n = r.len()?;
    // Each pair takes at least two bytes: a hostile count cannot make us allocate.
    if n > r.b.len() / 2 {
        return Err("props: user property count exceeds the data".into());
    }
    p.user_properties.reserve(n);
    for _ in 0..n {
        let k = r.string()?;
        let v = r.string()?;
        p.user_properties.push((k, v));
    }
    if !r.b.is_empty() {
        return Err("props: trailing bytes".into());
    }
    Ok(p)
}

fn put_len(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let low = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(low);
            return;
        }
        out.push(low | 0x80);
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_len(out, b.len());
    out.extend_from_slice(b);
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Result<u8, String> {
        let (&first, rest) = self.b.split_first().ok_or("props: truncated")?;
        self.b = rest;
        Ok(first)
    }

    fn len(&mut self) -> Result<usize, String> {
        let mut n: usize = 0;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            n |= usize::from(b & 0x7f)
                .checked_shl(shift)
                .ok_or("props: length overflows")?;
            if b & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err("props: length overflows".into())
    }

    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.len()?;
        if n > self.b.len() {
            return Err("props: truncated".into());
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }

    fn string(&mut self) -> Result<String, String> {
        std::str::from_utf8(self.bytes()?)
            .map(str::to_owned)
            .map_err(|_| "props: string is not UTF-8".into())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::*;
    use crate::store::{DbThread, Synchronous};

    const BOOT: i64 = 42;

    fn at(ms: i64) -> Stamp {
        Stamp {
            wall_ms: 1_700_000_000_000 + ms,
            boot_ms: 10_000 + ms,
            boot_id: BOOT,
        }
    }

    fn msg(topic: &str, payload_len: usize, accepted: Stamp, ttl_ms: Option<u64>) -> Message {
        Message {
            topic: topic.to_string(),
            payload: Bytes::from(vec![b'x'; payload_len]),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Properties::default(),
            accepted,
            deadline: ttl_ms.map(|t| accepted.plus(Duration::from_millis(t))),
        }
    }

    fn new_entry(route: &str, priority: u8, message: Message) -> NewEntry {
        NewEntry {
            route: route.to_string(),
            priority,
            message,
        }
    }

    fn config(max_bytes: u64, when_full: WhenFull) -> QueueConfig {
        QueueConfig {
            max_bytes,
            when_full,
        }
    }

    async fn open(path: &Path, config: QueueConfig) -> (Queue, Db, DbThread) {
        let (db, thread) = Db::open(path, Synchronous::Normal).unwrap();
        let q = Queue::open(db.clone(), config).await.unwrap();
        (q, db, thread)
    }

    fn close(q: Queue, db: Db, thread: DbThread) {
        drop(q);
        drop(db);
        thread.join();
    }

    async fn put(q: &Queue, priority: u8, m: Message) -> Result<i64, StoreError> {
        q.enqueue(new_entry("r", priority, m)).await.unwrap()
    }

    fn ids(batch: &[Entry]) -> Vec<i64> {
        batch.iter().map(|e| e.id).collect()
    }

    #[tokio::test]
    async fn delivery_order_is_priority_then_id_and_msg_ids_use_the_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let (q, db, t) = open(
            &dir.path().join("s.db"),
            config(1 << 20, WhenFull::RejectNew),
        )
        .await;
        let mut got = Vec::new();
        for p in [5u8, 1, 5, 0, 1, 12] {
            got.push(put(&q, p, msg("t", 10, at(0), None)).await.unwrap());
        }
        assert_eq!(got, vec![1, 2, 3, 4, 5, 6]);
        let batch = q.next_batch_at(vec![], 100, at(1)).await.unwrap();
        assert_eq!(ids(&batch), vec![4, 2, 5, 1, 3, 6]);
        assert_eq!(batch[5].priority, LOWEST_PRIORITY);
        assert_eq!(batch[0].msg_id, format!("{}-4", q.epoch()));
        assert_eq!(q.epoch().len(), 16);
        let limited = q.next_batch_at(vec![], 2, at(1)).await.unwrap();
        assert_eq!(ids(&limited), vec![4, 2]);
        assert!(q.next_batch_at(vec![], 0, at(1)).await.unwrap().is_empty());
        close(q, db, t);
    }

    #[tokio::test]
    async fn drainer_resumes_after_its_cursor_and_still_sees_more_urgent_rows() {
        let dir = tempfile::tempdir().unwrap();
        let (q, db, t) = open(
            &dir.path().join("s.db"),
            config(1 << 20, WhenFull::RejectNew),
        )
        .await;
        for _ in 0..5 {
            put(&q, 5, msg("t", 1, at(0), None)).await.unwrap();
        }
        let mut d = q.drainer().unwrap();
        let none = |_| false;
        let first = d.next_batch(None, &none, 2).unwrap();
        assert_eq!(ids(&first.entries), vec![1, 2]);
        let cursor = Cursor::at(&first.entries[1]);
        // Rows behind the cursor are not even looked at (the drainer excludes them anyway).
        let rest = d.next_batch(Some(cursor), &none, 10).unwrap();
        assert_eq!(ids(&rest.entries), vec![3, 4, 5]);
        let cursor = Cursor::at(&rest.entries[2]);
        // New rows of a more and a less urgent priority, and an acknowledged one whose delete
        // is committed: all seen from the same cursor, in delivery order.
        put(&q, 9, msg("t", 1, at(0), None)).await.unwrap();
        put(&q, 0, msg("t", 1, at(0), None)).await.unwrap();
        put(&q, 5, msg("t", 1, at(0), None)).await.unwrap();
        let more = d.next_batch(Some(cursor), &none, 10).unwrap();
        assert_eq!(ids(&more.entries), vec![7, 8, 6]);
        // A fetch sees the last commit only: an ack still pending returns the row.
        let pending = q.ack_submit(vec![7]);
        let excluded = |id| id == 7;
        let again = d.next_batch(Some(cursor), &excluded, 10).unwrap();
        assert_eq!(ids(&again.entries), vec![8, 6]);
        pending.await.unwrap().unwrap();
        let after = d.next_batch(Some(cursor), &none, 10).unwrap();
        assert_eq!(ids(&after.entries), vec![8, 6]);
        drop(d);
        close(q, db, t);
    }

    #[tokio::test]
    async fn drainer_deletes_expired_rows_it_meets() {
        let dir = tempfile::tempdir().unwrap();
        let (q, db, t) = open(
            &dir.path().join("s.db"),
            config(1 << 20, WhenFull::RejectNew),
        )
        .await;
        let now = Stamp::now();
        put(&q, 3, msg("t", 1, now, Some(1))).await.unwrap();
        put(&q, 3, msg("t", 1, now, None)).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let mut d = q.drainer().unwrap();
        let batch = d.next_batch(None, &|_| false, 10).unwrap();
        assert_eq!(ids(&batch.entries), vec![2]);
        // The delete goes to the writer without waiting; a job behind it sees it done.
        q.ack(vec![]).await.unwrap();
        assert_eq!(q.counters().expired, 1);
        assert_eq!(q.totals().rows, 1);
        drop(d);
        close(q, db, t);
    }

    #[tokio::test]
    async fn exclude_skips_in_flight_ids() {
        let dir = tempfile::tempdir().unwrap();
        let (q, db, t) = open(
            &dir.path().join("s.db"),
            config(1 << 20, WhenFull::RejectNew),
        )
        .await;
        for _ in 0..5 {
            put(&q, 3, msg("t", 1, at(0), None)).await.unwrap();
        }
        let batch = q.next_batch_at(vec![1, 3, 99], 2, at(0)).await.unwrap();
        assert_eq!(ids(&batch), vec![2, 4]);
        let batch = q
            .next_batch_at(vec![1, 2, 3, 4, 5], 10, at(0))
            .await
            .unwrap();
        assert!(batch.is_empty());
        close(q, db, t);
    }

    #[tokio::test]
    async fn next_batch_deletes_expired_rows_on_its_way_only() {
        let dir = tempfile::tempdir().unwrap();
        let (q, db, t) = open(
            &dir.path().join("s.db"),
            config(1 << 20, WhenFull::RejectNew),
        )
        .await;
        put(&q, 0, msg("t", 1, at(0), Some(100))).await.unwrap(); // 1 expires at 100
        put(&q, 0, msg("t", 1, at(0), None)).await.unwrap(); // 2
        put(&q, 1, msg("t", 1, at(0), Some(100))).await.unwrap(); // 3 expired, after the limit
        put(&q, 0, msg("t", 1, at(0), Some(1000))).await.unwrap(); // 4 still valid
        let size = entry_size(&msg("t", 1, at(0), None));
        // Exactly at the deadline counts as expired, as Stamp::is_past says.
        let batch = q.next_batch_at(vec![], 2, at(100)).await.unwrap();
        assert_eq!(ids(&batch), vec![2, 4]);
        assert_eq!(q.counters().expired, 1);
        assert_eq!(
            q.totals(),
            Totals {
                rows: 3,
                bytes: 3 * size
            }
        );
        // Row 3 was beyond the limit: still there until a scan reaches it.
        let batch = q.next_batch_at(vec![2], 10, at(100)).await.unwrap();
        assert_eq!(ids(&batch), vec![4]);
        assert_eq!(q.counters().expired, 2);
        assert_eq!(
            q.totals(),
            Totals {
                rows: 2,
                bytes: 2 * size
            }
        );
        // Excluded (in flight) rows are left alone even when expired.
        let batch = q.next_batch_at(vec![4], 10, at(5000)).await.unwrap();
        assert_eq!(ids(&batch), vec![2]);
        assert_eq!(q.counters().expired, 2);
        close(q, db, t);
    }

    #[tokio::test]
    async fn sweep_uses_boot_clock_within_a_boot_and_wall_clock_across() {
        let dir = tempfile::tempdir().unwrap();
        let (q, db, t) = open(
            &dir.path().join("s.db"),
            config(1 << 20, WhenFull::RejectNew),
        )
        .await;
        put(&q, 0, msg("t", 1, at(0), Some(1000))).await.unwrap();
        put(&q, 0, msg("t", 1, at(0), Some(10_000))).await.unwrap();
        put(&q, 0, msg("t", 1, at(0), None)).await.unwrap();
        // Wall clock jumped a day ahead, boot clock moved 500 ms: nothing expires.
        let jumped = Stamp {
            wall_ms: at(0).wall_ms + 86_400_000,
            ..at(500)
        };
        assert_eq!(q.sweep_expired_at(jumped).await.unwrap(), 0);
        assert_eq!(q.sweep_expired_at(at(1000)).await.unwrap(), 1);
        // After a reboot the boot clock restarts; the wall clock decides.
        let rebooted = Stamp {
            wall_ms: at(9_999).wall_ms,
            boot_ms: 5,
            boot_id: BOOT + 1,
        };
        assert_eq!(q.sweep_expired_at(rebooted).await.unwrap(), 0);
        let later = Stamp {
            wall_ms: at(10_000).wall_ms,
            ..rebooted
        };
        assert_eq!(q.sweep_expired_at(later).await.unwrap(), 1);
        assert_eq!(q.counters().expired, 2);
        assert_eq!(q.totals().rows, 1);
        assert_eq!(
            ids(&q.next_batch_at(vec![], 9, later).await.unwrap()),
            vec![3]
        );
        close(q, db, t);
    }

    #[tokio::test]
    async fn sweep_is_answered_from_the_deadline_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let (q, db, t) = open(
            &dir.path().join("s.db"),
            config(1 << 20, WhenFull::RejectNew),
        )
        .await;
        let plan: Vec<String> = db
            .run(|c| {
                let mut st = c.prepare(&format!(
                    "EXPLAIN QUERY PLAN DELETE FROM uplink_queue WHERE {EXPIRED}"
                ))?;
                let rows = st.query_map(
                    named_params! { ":cur_boot": 1, ":now_boot": 2, ":now_wall": 3 },
                    |r| r.get::<_, String>(3),
                )?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .await
            .unwrap();
        let plan = plan.join("\n");
        assert!(plan.contains("uplink_queue_deadline_boot"), "{plan}");
        assert!(plan.contains("uplink_queue_deadline_wall"), "{plan}");
        close(q, db, t);
    }

    #[tokio::test]
    async fn reject_new_refuses_and_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        let size = entry_size(&msg("t", 100, at(0), None));
        let (q, db, t) = open(
            &dir.path().join("s.db"),
            config(3 * size, WhenFull::RejectNew),
        )
        .await;
        for _ in 0..3 {
            put(&q, 0, msg("t", 100, at(0), None)).await.unwrap();
        }
        assert!(matches!(
            put(&q, 0, msg("t", 100, at(0), None)).await,
            Err(StoreError::Full)
        ));
        assert!(matches!(
            put(&q, 0, msg("t", 1, at(0), None)).await,
            Err(StoreError::Full)
        ));
        let c = q.counters();
        assert_eq!((c.accepted, c.rejected_full, c.dropped_full), (3, 2, 0));
        assert_eq!(
            q.totals(),
            Totals {
                rows: 3,
                bytes: 3 * size
            }
        );
        q.ack(vec![1]).await.unwrap();
        // The freed id is not reused.
        assert_eq!(put(&q, 0, msg("t", 100, at(0), None)).await.unwrap(), 4);
        close(q, db, t);
    }

    #[tokio::test]
    async fn drop_oldest_deletes_by_id_until_it_fits() {
        let dir = tempfile::tempdir().unwrap();
        let small = entry_size(&msg("t", 100, at(0), None));
        let big = entry_size(&msg("t", 250, at(0), None));
        let (q, db, t) = open(
            &dir.path().join("s.db"),
            config(4 * small, WhenFull::DropOldest),
        )
        .await;
        put(&q, 9, msg("t", 100, at(0), None)).await.unwrap(); // 1, oldest but low priority
        for _ in 0..3 {
            put(&q, 0, msg("t", 100, at(0), None)).await.unwrap(); // 2..4
        }
        // 250 bytes of payload need 2.5 small rows of room, plus the overhead: rows 1 and 2 go.
        assert!(big <= 2 * small);
        assert_eq!(put(&q, 0, msg("t", 250, at(0), None)).await.unwrap(), 5);
        let c = q.counters();
        assert_eq!((c.accepted, c.dropped_full, c.rejected_full), (5, 2, 0));
        assert_eq!(
            q.totals(),
            Totals {
                rows: 3,
                bytes: 2 * small + big
            }
        );
        assert_eq!(
            ids(&q.next_batch_at(vec![], 9, at(0)).await.unwrap()),
            vec![3, 4, 5]
        );
        close(q, db, t);
    }

    #[tokio::test]
    async fn oversize_entry_is_refused_under_both_policies() {
        for policy in [WhenFull::DropOldest, WhenFull::RejectNew] {
            let dir = tempfile::tempdir().unwrap();
            let m = msg("t", 1000, at(0), None);
            let (q, db, t) =
                open(&dir.path().join("s.db"), config(entry_size(&m) - 1, policy)).await;
            put(&q, 0, msg("t", 1, at(0), None)).await.unwrap();
            assert!(matches!(put(&q, 0, m).await, Err(StoreError::Full)));
            let c = q.counters();
            assert_eq!((c.accepted, c.rejected_full, c.dropped_full), (1, 1, 0));
            assert_eq!(q.totals().rows, 1);
            close(q, db, t);
        }
    }

    #[tokio::test]
    async fn ack_ignores_unknown_and_repeated_ids_and_attempts_count() {
        let dir = tempfile::tempdir().unwrap();
        let (q, db, t) = open(
            &dir.path().join("s.db"),
            config(1 << 20, WhenFull::RejectNew),
        )
        .await;
        let size = entry_size(&msg("t", 5, at(0), None));
        put(&q, 0, msg("t", 5, at(0), None)).await.unwrap();
        put(&q, 0, msg("t", 5, at(0), None)).await.unwrap();
        for id in [2, 2, 77] {
            q.record_failure(id, "refused".into(), u32::MAX)
                .await
                .unwrap();
        }
        q.ack(vec![1, 1, 77, -3]).await.unwrap();
        q.ack(vec![1]).await.unwrap();
        assert_eq!(q.counters().acked, 1);
        assert_eq!(
            q.totals(),
            Totals {
                rows: 1,
                bytes: size
            }
        );
        let batch = q.next_batch_at(vec![], 9, at(0)).await.unwrap();
        assert_eq!((batch[0].id, batch[0].attempts), (2, 2));
        close(q, db, t);
    }

    #[tokio::test]
    async fn queue_resumes_after_reopening_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let cfg = config(1 << 20, WhenFull::DropOldest);
        let (q, db, t) = open(&path, cfg).await;
        for i in 0..4 {
            put(&q, 0, msg("t", 10 * i, at(0), None)).await.unwrap();
        }
        q.ack(vec![4]).await.unwrap();
        let epoch = q.epoch().to_string();
        let before = q.next_batch_at(vec![], 9, at(0)).await.unwrap();
        let totals = q.totals();
        close(q, db, t);

        let (q, db, t) = open(&path, cfg).await;
        assert_eq!(q.epoch(), epoch);
        assert_eq!(q.totals(), totals);
        assert_eq!(q.counters(), CounterSnapshot::default());
        let after = q.next_batch_at(vec![], 9, at(0)).await.unwrap();
        assert_eq!(after, before);
        assert_eq!(after[0].msg_id, format!("{epoch}-1"));
        // AUTOINCREMENT: the acked last id is not handed out again.
        assert_eq!(put(&q, 0, msg("t", 1, at(0), None)).await.unwrap(), 5);
        let stats = q.stats().await.unwrap();
        assert_eq!((stats.depth, stats.bytes), (4, q.totals().bytes));
        close(q, db, t);
    }

    #[tokio::test]
    async fn properties_and_message_fields_round_trip_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let (q, db, t) = open(
            &dir.path().join("s.db"),
            config(1 << 20, WhenFull::RejectNew),
        )
        .await;
        let mut m = msg("trains/T1/up/é", 0, at(7), Some(60_000));
        m.qos = QoS::AtMostOnce;
        m.retain = true;
        m.payload = Bytes::from_static(&[0, 255, 1, 254]);
        m.properties = Properties {
            payload_format_indicator: Some(1),
            content_type: Some("application/json".into()),
            response_topic: Some(String::new()),
            correlation_data: Some(Bytes::from_static(&[0, 0, 200, 7])),
            user_properties: vec![
                ("z".into(), "1".into()),
                ("a".into(), "2".into()),
                ("z".into(), "ü".into()),
                (String::new(), "x".repeat(300)),
            ],
        };
        let only_users = Properties {
            user_properties: vec![("k".into(), "v".into())],
            ..Properties::default()
        };
        put(&q, 2, m.clone()).await.unwrap();
        let mut m2 = msg("t", 3, at(0), None);
        m2.properties = only_users.clone();
        put(&q, 3, m2.clone()).await.unwrap();
        let batch = q.next_batch_at(vec![], 9, at(8)).await.unwrap();
        assert_eq!(batch[0].message, m);
        assert_eq!(batch[0].route, "r");
        assert_eq!(batch[1].message, m2);
        assert_eq!(encode_props(&Properties::default()), None);
        for p in [m.properties.clone(), only_users] {
            assert_eq!(decode_props(&encode_props(&p).unwrap()).unwrap(), p);
        }
        close(q, db, t);
    }

    #[test]
    fn when_full_reads_snake_case() {
        let parse = |s: &str| serde_json::from_str::<WhenFull>(s);
        assert_eq!(parse("\"drop_oldest\"").unwrap(), WhenFull::DropOldest);
        assert_eq!(parse("\"reject_new\"").unwrap(), WhenFull::RejectNew);
        assert!(parse("\"RejectNew\"").is_err());
    }

    #[test]
    fn damaged_props_are_errors_not_panics() {
        let p = Properties {
            content_type: Some("abc".into()),
            user_properties: vec![("k".into(), "v".into())],
            ..Properties::default()
        };
        let good = encode_props(&p).unwrap();
        for cut in 0..good.len() {
            assert!(decode_props(&good[..cut]).is_err());
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(decode_props(&trailing).is_err());
        assert!(decode_props(&[
            1, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1
        ])
        .is_err());
        assert!(decode_props(&[2, 0, 0]).is_err());
        assert!(decode_props(&[1, 0x10, 0]).is_err());
    }

    #[tokio::test]
    async fn undecodable_rows_are_deleted_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let (q, db, t) = open(
            &dir.path().join("s.db"),
            config(1 << 20, WhenFull::RejectNew),
        )
        .await;
        for _ in 0..4 {
            put(&q, 0, msg("t", 1, at(0), None)).await.unwrap();
        }
        db.run(|c| {
            c.execute("UPDATE uplink_queue SET props = x'09' WHERE id = 1", [])?;
            c.execute("UPDATE uplink_queue SET qos = 7 WHERE id = 2", [])?;
            c.execute("UPDATE uplink_queue SET topic = x'ff' WHERE id = 3", [])?;
            Ok(())
        })
        .await
        .unwrap();
        let batch = q.next_batch_at(vec![], 9, at(0)).await.unwrap();
        assert_eq!(ids(&batch), vec![4]);
        assert_eq!(q.counters().corrupt, 3);
        assert_eq!(q.totals().rows, 1);
        assert_eq!(q.stats().await.unwrap().depth, 1);
        close(q, db, t);
    }

    #[tokio::test]
    async fn stats_per_route_and_notification_on_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (q, db, t) = open(
            &dir.path().join("s.db"),
            config(1 << 20, WhenFull::RejectNew),
        )
        .await;
        assert_eq!(q.stats().await.unwrap(), QueueStats::default());
        let mut commits = q.commits();
        let (a, b) = (msg("t", 1, at(5), None), msg("t", 2, at(3), None));
        q.enqueue(new_entry("b", 0, b.clone()))
            .await
            .unwrap()
            .unwrap();
        q.enqueue(new_entry("a", 0, a.clone()))
            .await
            .unwrap()
            .unwrap();
        q.enqueue(new_entry("a", 0, msg("t", 9, at(9), None)))
            .await
            .unwrap()
            .unwrap();
        // A commit with nobody waiting is seen by the next wait.
        tokio::time::timeout(Duration::from_secs(5), commits.changed())
            .await
            .unwrap()
            .unwrap();
        let s = q.stats().await.unwrap();
        assert_eq!((s.depth, s.bytes), (3, q.totals().bytes));
        assert_eq!(s.oldest_accepted, Some(at(3)));
        assert_eq!(s.routes.len(), 2);
        assert_eq!((s.routes[0].route.as_str(), s.routes[0].depth), ("a", 2));
        assert_eq!(s.routes[0].oldest_accepted, Some(at(5)));
        assert_eq!(s.routes[1].bytes, entry_size(&b));
        close(q, db, t);
    }

    #[tokio::test]
    async fn concurrent_enqueues_keep_submission_order() {
        let dir = tempfile::tempdir().unwrap();
        let (q, db, t) = open(
            &dir.path().join("s.db"),
            config(1 << 20, WhenFull::RejectNew),
        )
        .await;
        let receivers: Vec<_> = (0..300)
            .map(|i| q.enqueue(new_entry("r", 0, msg(&format!("t/{i}"), 1, at(0), None))))
            .collect();
        for (i, r) in receivers.into_iter().enumerate() {
            assert_eq!(r.await.unwrap().unwrap(), i as i64 + 1);
        }
        let batch = q.next_batch_at(vec![], 1000, at(0)).await.unwrap();
        assert!(batch
            .iter()
            .enumerate()
            .all(|(i, e)| e.message.topic == format!("t/{i}")));
        close(q, db, t);
    }

    #[tokio::test]
    async fn conflation_keeps_only_the_newest_row_per_route_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let (q, db, thread) = open(
            &dir.path().join("s.db"),
            config(1 << 20, WhenFull::RejectNew),
        )
        .await;
        let keyed = |route: &str, topic: &str, key: &str| {
            q.enqueue_keyed(
                new_entry(route, 5, msg(topic, 10, at(0), None)),
                Some(key.into()),
            )
        };
        let a1 = keyed("pos", "a", "a").await.unwrap().unwrap();
        let b1 = keyed("pos", "b", "b").await.unwrap().unwrap();
        let other = keyed("other", "a", "a").await.unwrap().unwrap();
        let plain = put(&q, 5, msg("a", 10, at(0), None)).await.unwrap();
        // a1 is in flight when its successor arrives: it is replaced all the same.
        let batch = q.next_batch_at(vec![], 1, at(1)).await.unwrap();
        assert_eq!(ids(&batch), vec![a1]);
        let a2 = keyed("pos", "a", "a").await.unwrap().unwrap();
        let a3 = keyed("pos", "a", "a").await.unwrap().unwrap();
        let rest = q.next_batch_at(vec![], 100, at(2)).await.unwrap();
        assert_eq!(ids(&rest), vec![b1, other, plain, a3]);
        assert!(!ids(&rest).contains(&a2));
        assert_eq!(q.counters().conflated, 2);
        assert_eq!(q.totals().rows, 4);
        // The late ack of the replaced in-flight row is ignored.
        q.ack(vec![a1]).await.unwrap();
        assert_eq!(q.counters().acked, 0);
        assert_eq!(q.totals().rows, 4);
        close(q, db, thread);
    }

    #[tokio::test]
    async fn every_nth_fill_starts_with_the_lowest_waiting_priority() {
        let dir = tempfile::tempdir().unwrap();
        let (q, db, thread) = open(
            &dir.path().join("s.db"),
            config(1 << 20, WhenFull::RejectNew),
        )
        .await;
        q.set_starvation_every(3);
        let low: Vec<i64> = {
            let mut v = Vec::new();
            for _ in 0..3 {
                v.push(put(&q, 9, msg("low", 1, at(0), None)).await.unwrap());
            }
            v
        };
        let mid = put(&q, 7, msg("mid", 1, at(0), None)).await.unwrap();
        let high: Vec<i64> = {
            let mut v = Vec::new();
            for _ in 0..6 {
                v.push(put(&q, 0, msg("high", 1, at(0), None)).await.unwrap());
            }
            v
        };
        let mut sent = Vec::new();
        for fill in 1..=3 {
            let batch = q.next_batch_at(sent.clone(), 2, at(fill)).await.unwrap();
            sent.extend(ids(&batch));
        }
        // Fills 1 and 2 are strict priority; fill 3 starts with the oldest priority-9 row.
        assert_eq!(
            sent,
            vec![high[0], high[1], high[2], high[3], low[0], high[4]]
        );
        assert!(!sent.contains(&mid));
        close(q, db, thread);
    }
}
