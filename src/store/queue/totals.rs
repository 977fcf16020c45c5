//! The queue's in-memory totals and counters, shared by every clone of a [`Queue`].
//!
//! # Contract
//! - Row count and logical bytes are loaded once by [`Queue::open`] ([`load_totals`]) and then
//!   changed only by what a writer job really inserted or deleted, on the writer thread, so the
//!   next job of the same batch sees them.
//! - A failed commit marks them stale ([`Shared::settle`]); the next job re-reads them from SQL
//!   ([`Shared::sync_totals`]) before it does anything else.
//! - Counters only grow, and only after the change they count is committed.
//! - The priority mask only gains bits while open: a bit clear means that priority has no rows.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering};

use rusqlite::types::ValueRef;
use rusqlite::Connection;
use tokio::sync::watch;

use super::share::Shares;
use super::{Queue, QueueConfig, StoreError, LOWEST_PRIORITY};

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
    /// Rows deleted to make room under [`super::WhenFull::DropOldest`].
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

/// State shared by all clones of a [`Queue`].
pub(super) struct Shared {
    pub(super) config: QueueConfig,
    pub(super) epoch: String,
    /// Totals as of the last job run on the writer thread (see the module contract).
    pub(super) rows: AtomicU64,
    pub(super) bytes: AtomicU64,
    /// Set when a commit failed: the totals may include rolled-back changes.
    pub(super) resync: AtomicBool,
    pub(super) accepted: AtomicU64,
    pub(super) dropped_full: AtomicU64,
    pub(super) rejected_full: AtomicU64,
    pub(super) expired: AtomicU64,
    pub(super) acked: AtomicU64,
    pub(super) corrupt: AtomicU64,
    pub(super) conflated: AtomicU64,
    /// Anti-starvation rule of [`Queue::next_batch`]: every this many calls, 0 = off.
    pub(super) starvation_every: AtomicU32,
    /// Calls of [`Queue::next_batch`] with a non-zero limit since open.
    pub(super) fills: AtomicU64,
    /// Times rows were put back under their old ids (see [`Queue::rewinds`]).
    pub(super) rewinds: AtomicU64,
    /// Bit `p` set: priority `p` may have rows. Set before an insert, never cleared while
    /// open, so a fetch skips the index ranges of priorities never used (most trains use one
    /// or two).
    pub(super) priorities: AtomicU16,
    /// Per share (see `share`): bumped after every commit that added rows to it; the drain
    /// task of that share watches it.
    pub(super) commits: Vec<watch::Sender<u64>>,
    /// How the queue is split between the uplink connections.
    pub(super) shares: Shares,
    /// Rows per share, [`MAX_SHARES`] slots; kept like the totals (re-read on a resync).
    pub(super) share_rows: Vec<AtomicU64>,
    /// The share a new key joined last (ties of the least-loaded choice go round).
    pub(super) last_pick: AtomicU32,
}

impl Shared {
    /// Runs first in every job on the writer thread: re-reads the totals if a commit failed.
    pub(super) fn sync_totals(&self, conn: &Connection) -> Result<(), StoreError> {
        if self.resync.swap(false, Ordering::AcqRel) {
            match load_totals(conn) {
                Ok(t) => {
                    self.rows.store(t.rows, Ordering::Release);
                    self.bytes.store(t.bytes, Ordering::Release);
                    if let Err(e) = self.load_share_rows(conn) {
                        self.resync.store(true, Ordering::Release);
                        return Err(e);
                    }
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
    pub(super) fn may_have(&self, p: u8) {
        self.priorities
            .fetch_or(1 << p.min(LOWEST_PRIORITY), Ordering::AcqRel);
    }

    /// Whether any priority in `range` may hold rows.
    pub(super) fn any_in(&self, range: std::ops::RangeInclusive<u8>) -> bool {
        let mask = self.priorities.load(Ordering::Acquire);
        range.into_iter().any(|p| mask & (1 << p) != 0)
    }

    pub(super) fn added(&self, rows: u64, bytes: u64) {
        self.rows.fetch_add(rows, Ordering::AcqRel);
        self.bytes.fetch_add(bytes, Ordering::AcqRel);
    }

    pub(super) fn removed(&self, t: Totals) {
        saturating_sub(&self.rows, t.rows);
        saturating_sub(&self.bytes, t.bytes);
    }

    /// Second half of every job, after its commit: a failed commit means the totals are stale.
    pub(super) fn settle<T>(&self, result: &Result<T, StoreError>) {
        if matches!(result, Err(StoreError::Commit(_))) {
            self.resync.store(true, Ordering::Release);
        }
    }
}

impl Queue {
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
}

pub(super) fn load_totals(conn: &Connection) -> Result<Totals, StoreError> {
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
pub(super) fn load_priorities(conn: &Connection) -> Result<u16, StoreError> {
    let mut st = conn.prepare("SELECT 1 FROM uplink_queue WHERE priority = ?1 LIMIT 1")?;
    let mut mask = 0u16;
    for p in 0..=LOWEST_PRIORITY {
        if st.exists([p])? {
            mask |= 1 << p;
        }
    }
    Ok(mask)
}

/// The `size` column; the same reading as `SUM(size)` for the integers this module writes.
pub(super) fn size_value(v: ValueRef<'_>) -> u64 {
    match v {
        ValueRef::Integer(n) => n.max(0) as u64,
        ValueRef::Real(f) if f > 0.0 => f as u64,
        _ => 0,
    }
}

/// Takes `n` off `a`, never below zero, whatever a resync raced with.
pub(super) fn saturating_sub(a: &AtomicU64, n: u64) {
    // The closure always returns `Some`: the update cannot fail.
    let _ = a.fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
        Some(c.saturating_sub(n))
    });
}

/// The `share` column; anything unreadable counts as share 0 (the scan reports damaged rows).
pub(super) fn share_value(v: ValueRef<'_>) -> u16 {
    match v {
        ValueRef::Integer(n) => u16::try_from(n).unwrap_or(0),
        _ => 0,
    }
}
