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
//! - **Delivery order** is `(priority, id)` within each share (one share per uplink
//!   connection, see [`share`]): priority 0 first, then 1, ... 9; within a priority, the order
//!   of acceptance. Ids come from an `AUTOINCREMENT` key, so they grow strictly with
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
//!   over the `(share, priority, id)` index and stops after `limit` entries, sweeping and stats run as
//!   SQL aggregates/deletes. Memory is bounded by the batch, never by the backlog.
//! - **Never panics on disk data.** Every column is checked when a row is read; a row that
//!   cannot be decoded (bad UTF-8, unknown QoS, damaged properties, half a deadline) is deleted,
//!   counted as `corrupt` and logged, and the scan goes on.
//!
//! # Expiry
//!
//! A message's deadline is fixed when it is accepted (see [`crate::clock`]). Each row keeps the
//! deadline as both boot-clock and wall-clock milliseconds plus the boot it was accepted in, and
//! the expiry test is [`crate::clock::Stamp::is_past`] written in SQL:
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
//! versioned binary encoding, see [`crate::store::props`]), `accepted_wall`, `accepted_boot`, `boot_id`,
//! `deadline_wall`, `deadline_boot` (both `NULL` for "never"), `size` (the row's
//! [`entry_size`], so totals can be kept without re-encoding), `attempts` (failed deliveries).
//! Indexes: `(priority, id)` for delivery order (per share since migration 7); `(boot_id, deadline_boot)` and
//! `(deadline_wall)`, partial on non-`NULL` deadlines, so the sweep's expiry test is two index
//! range scans rather than a table scan. Table `meta` holds the key `uplink_epoch`.
//! Migration 3 adds `conflate_key` (`NULL`: never conflated) with an index on
//! `(route, conflate_key)`, partial on non-`NULL` keys, so replacing a key's waiting row is an
//! index lookup. Migration 7 adds `share` (the uplink connection that carries the row) and
//! `order_key` (the hash of the topic, or of the route for FIFO routes), replaces the
//! delivery-order index by `(share, priority, id)` and indexes `order_key`; see [`share`].
//!
//! # Files
//!
//! - `mod.rs`: the handle ([`Queue`]), its public types and the store identity (epoch).
//! - `enqueue.rs`: appending, with conflation and the `max_bytes` policy.
//! - `scan.rs`: reading in delivery order ([`Queue::next_batch`], [`Drainer`]).
//! - `row.rs`: decoding one row, checking every column.
//! - `delete.rs`: acknowledgements, expiry and the deletes of rows a scan found unusable.
//! - `totals.rs`: the in-memory totals and counters shared by all clones.
//! - `stats.rs`: aggregates for status (depth per route, oldest entry).
//! - `dead_letter.rs`: rows the central broker would not take.
//! - `share.rs`: which uplink connection carries a row.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64};
use std::sync::Arc;

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OptionalExtension};
use serde::Deserialize;
use tokio::sync::watch;

pub mod dead_letter;
mod delete;
mod enqueue;
pub mod ledger;
mod row;
mod scan;
pub mod share;
mod stats;
#[cfg(test)]
mod tests;
mod totals;

pub use enqueue::{entry_size, ROW_OVERHEAD};
pub use scan::{Batch, Cursor, Drainer};
pub use share::{Shares, MAX_SHARES};
pub use stats::{QueueStats, RouteStats};
pub use totals::{CounterSnapshot, Totals};

use super::{Db, StoreError};
use crate::message::Message;
use totals::{load_priorities, load_totals, Shared};

/// `meta` key of the store's identity used in message ids.
const EPOCH_KEY: &str = "uplink_epoch";

/// Highest (least urgent) priority; larger values are stored as this.
pub const LOWEST_PRIORITY: u8 = 9;

/// Routes with this priority or a more urgent one (0, 1: presence, alarms) may use the store's
/// urgent reserve ([`QueueConfig::urgent_reserve`]).
pub const URGENT_PRIORITY: u8 = 1;

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
    /// Bytes of `max_bytes` only urgent entries (priority ≤ [`URGENT_PRIORITY`]) may fill:
    /// other entries count as full at `max_bytes - urgent_reserve`, and under `DropOldest`
    /// they make room by dropping only non-urgent rows.
    pub urgent_reserve: u64,
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
        Queue::open_shared(db, config, Shares::default()).await
    }

    /// [`Queue::open`] split into `shares`, one per uplink connection (see [`share`]). Rows
    /// assigned under another split are assigned again first.
    pub async fn open_shared(
        db: Db,
        config: QueueConfig,
        shares: Shares,
    ) -> Result<Queue, StoreError> {
        let rule = shares.clone();
        let (epoch, totals, priorities, reassigned) = db
            .run(move |conn| {
                let epoch = load_or_create_epoch(conn)?;
                let reassigned = share::reassign_if_changed(conn, &rule)?;
                Ok((
                    epoch,
                    load_totals(conn)?,
                    load_priorities(conn)?,
                    reassigned,
                ))
            })
            .await?;
        if reassigned > 0 {
            log::info!(
                "uplink queue: {reassigned} waiting messages assigned to {} connection(s)",
                shares.count
            );
        }
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
        let queue = Queue {
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
                commits: (0..shares.count).map(|_| watch::channel(0).0).collect(),
                shares,
                share_rows: (0..MAX_SHARES).map(|_| AtomicU64::new(0)).collect(),
                last_pick: AtomicU32::new(0),
            }),
        };
        let shared = Arc::clone(&queue.shared);
        queue
            .db
            .run(move |conn| shared.load_share_rows(conn))
            .await?;
        Ok(queue)
    }

    /// The store's identity, the first part of every `msg_id`.
    pub fn epoch(&self) -> &str {
        &self.shared.epoch
    }

    /// The stable id of row `id`.
    pub fn msg_id(&self, id: i64) -> String {
        format!("{}-{id}", self.shared.epoch)
    }

    /// Tells of commits that added rows to `share`: `changed()` resolves once there was one
    /// since the receiver last looked, so a commit between two waits is not lost. The task
    /// that drains a share (one per uplink connection) has a receiver of its own; a commit
    /// wakes only the task of the share it touched.
    pub fn commits(&self, share: usize) -> watch::Receiver<u64> {
        match self.shared.commits.get(share) {
            Some(tx) => tx.subscribe(),
            // No such share: a receiver that never changes.
            None => watch::channel(0).1,
        }
    }

    /// How many shares the queue is split into (see [`share`]).
    pub fn share_count(&self) -> usize {
        self.shared.shares.count
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
