//! The ledger: per route, what came into the uplink queue and every way it left, counted in
//! the same transaction as the rows themselves, so it adds up after a kill -9 as well.
//!
//! # Contract
//! - For every route, at every commit:
//!   `accepted + requeued = delivered + expired + store_full + conflated + dead_letter +
//!   corrupt + in_store`, where `in_store` is the route's rows in `uplink_queue` (waiting or in
//!   flight).
//! - `accepted` counts rows committed to the queue (an outdated message the relay acknowledged
//!   but never queued is a freshness count, not a ledger one); `requeued` counts dead letters
//!   put back. `delivered` is a PUBACK from the central broker (or, for QoS 0 routes, a write).
//! - Counts only grow; the table has one row per route ever seen.

use rusqlite::Connection;

use super::StoreError;

/// Why rows entered or left the queue: the ledger's columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    Accepted,
    Requeued,
    Delivered,
    Expired,
    StoreFull,
    Conflated,
    DeadLetter,
    Corrupt,
}

impl Entry {
    /// The upsert that adds `?2` to route `?1`'s count of this entry (a literal per entry, so
    /// the hot path formats nothing).
    fn upsert(self) -> &'static str {
        macro_rules! upsert {
            ($column:literal) => {
                concat!(
                    "INSERT INTO route_ledger (route, ",
                    $column,
                    ") VALUES (?1, ?2) ON CONFLICT (route) DO UPDATE SET ",
                    $column,
                    " = ",
                    $column,
                    " + ?2"
                )
            };
        }
        match self {
            Entry::Accepted => upsert!("accepted"),
            Entry::Requeued => upsert!("requeued"),
            Entry::Delivered => upsert!("delivered"),
            Entry::Expired => upsert!("expired"),
            Entry::StoreFull => upsert!("store_full"),
            Entry::Conflated => upsert!("conflated"),
            Entry::DeadLetter => upsert!("dead_letter"),
            Entry::Corrupt => upsert!("corrupt"),
        }
    }
}

/// Adds `n` to `route`'s `entry` count, in the caller's transaction.
pub(super) fn add(conn: &Connection, route: &str, entry: Entry, n: u64) -> Result<(), StoreError> {
    if n == 0 {
        return Ok(());
    }
    conn.prepare_cached(entry.upsert())?
        .execute(rusqlite::params![
            route,
            i64::try_from(n).unwrap_or(i64::MAX)
        ])?;
    Ok(())
}

/// Adds each `(route, n)` to its route's `entry` count.
pub(super) fn add_all(
    conn: &Connection,
    per_route: &[(String, u64)],
    entry: Entry,
) -> Result<(), StoreError> {
    for (route, n) in per_route {
        add(conn, route, entry, *n)?;
    }
    Ok(())
}

/// One route's ledger.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RouteLedger {
    pub route: String,
    pub accepted: u64,
    pub requeued: u64,
    pub delivered: u64,
    pub dropped: Dropped,
    /// Rows of the route in the store now (waiting or in flight): what came in less what left.
    pub in_store: u64,
}

/// Rows that left the queue without being delivered, by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Dropped {
    pub expired: u64,
    pub store_full: u64,
    pub conflated: u64,
    pub dead_letter: u64,
    pub corrupt: u64,
}

impl Dropped {
    pub fn total(&self) -> u64 {
        self.expired + self.store_full + self.conflated + self.dead_letter + self.corrupt
    }
}

/// Every route's ledger. `in_store` follows from the counts (the contract above); the tests
/// check it against the table.
pub(super) fn read(conn: &Connection) -> Result<Vec<RouteLedger>, StoreError> {
    let mut st = conn.prepare_cached(
        "SELECT route, accepted, requeued, delivered, expired, store_full, conflated, \
         dead_letter, corrupt FROM route_ledger ORDER BY route",
    )?;
    let mut rows = st.query([])?;
    let mut out = Vec::new();
    let n = |v: i64| v.max(0) as u64;
    while let Some(r) = rows.next()? {
        let mut ledger = RouteLedger {
            route: r.get(0)?,
            accepted: n(r.get(1)?),
            requeued: n(r.get(2)?),
            delivered: n(r.get(3)?),
            dropped: Dropped {
                expired: n(r.get(4)?),
                store_full: n(r.get(5)?),
                conflated: n(r.get(6)?),
                dead_letter: n(r.get(7)?),
                corrupt: n(r.get(8)?),
            },
            in_store: 0,
        };
        ledger.in_store = (ledger.accepted + ledger.requeued)
            .saturating_sub(ledger.delivered + ledger.dropped.total());
        out.push(ledger);
    }
    Ok(out)
}

impl super::Queue {
    /// Every route's ledger, as of the last commit.
    pub async fn ledger(&self) -> Result<Vec<RouteLedger>, StoreError> {
        self.db.read(read).await
    }
}
