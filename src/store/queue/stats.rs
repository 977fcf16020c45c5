//! Status reads of the queue: depth, bytes and oldest entry per route ([`Queue::stats`]) and
//! whether one row is still queued ([`Queue::is_queued`]).
//!
//! # Contract
//! - Reads only, on the store's reader connection: they see the last commit and never wait for
//!   the writer.
//! - [`Queue::stats`] aggregates in SQL (its cost grows with the backlog, so it is for status,
//!   not per message); [`Queue::is_queued`] is one primary-key lookup.
//! - Damaged columns never fail a status read: a route name is read lossily, a damaged
//!   acceptance stamp is reported as unknown.

use rusqlite::types::ValueRef;
use rusqlite::OptionalExtension;

use super::{Queue, StoreError};
use crate::clock::Stamp;

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

impl Queue {
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

    /// Depth and bytes from the in-memory totals and the oldest waiting row's acceptance (the
    /// lowest id): a cost that does not grow with the backlog, unlike [`Queue::stats`], for
    /// what is produced on every link change (the health document).
    pub async fn summary(&self) -> Result<QueueStats, StoreError> {
        let totals = self.totals();
        let oldest_accepted = self
            .db
            .read(|conn| {
                Ok(conn
                    .prepare_cached(
                        "SELECT accepted_wall, accepted_boot, boot_id FROM uplink_queue \
                         ORDER BY id LIMIT 1",
                    )?
                    .query_row([], |r| {
                        Ok(Stamp {
                            wall_ms: r.get(0)?,
                            boot_ms: r.get(1)?,
                            boot_id: r.get(2)?,
                        })
                    })
                    .optional()?)
            })
            .await?;
        Ok(QueueStats {
            depth: totals.rows,
            bytes: totals.bytes,
            oldest_accepted,
            routes: Vec::new(),
        })
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
}

pub(super) fn text_lossy(v: ValueRef<'_>) -> String {
    match v {
        ValueRef::Text(t) | ValueRef::Blob(t) => String::from_utf8_lossy(t).into_owned(),
        ValueRef::Integer(n) => n.to_string(),
        ValueRef::Real(f) => f.to_string(),
        ValueRef::Null => String::new(),
    }
}
