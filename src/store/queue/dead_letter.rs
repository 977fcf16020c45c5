//! Dead letters: uplink rows the central broker would not take.
//!
//! A message the central broker refuses (a v5 reason code), that exceeds its maximum packet
//! size, or that makes it drop the connection every time it is sent (NATS 2.9 does that for a
//! `.` or a space in a topic) must not hold the queue forever. The uplink records each failed
//! attempt with [`Queue::record_failure`]; at `uplink.max_attempts` the row moves, in one
//! transaction, from `uplink_queue` to `uplink_dead_letters` (schema migration 4). There it is
//! kept and counted but no longer charged against `store.max_bytes`, and it is never sent until
//! an operator re-queues it ([`Queue::requeue_dead_letters`]), which puts it back under its
//! original id: same place in the delivery order, same message id, attempts reset.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use rusqlite::{params, OptionalExtension};
use serde::Serialize;

use super::{Queue, StoreError};
use crate::clock::Stamp;

/// The columns both tables share, in the same order.
/// The conflation key comes along (schema migration 5), so a re-queued row still conflates.
const COLUMNS: &str = "id, route, priority, topic, payload, qos, retain, props, accepted_wall, \
                       accepted_boot, boot_id, deadline_wall, deadline_boot, size, conflate_key";

/// A dead letter as listed for the status socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct DeadLetter {
    /// The original queue row id (what [`Queue::requeue_dead_letters`] takes).
    pub id: i64,
    /// The stable message id the central broker saw in `trainrelay-msg-id`.
    pub msg_id: String,
    pub route: String,
    pub topic: String,
    /// Logical size, as charged in the queue.
    pub size: u64,
    pub attempts: u32,
    /// The last failure.
    pub reason: String,
    /// Wall-clock milliseconds since the epoch when it was given up.
    pub failed_wall_ms: i64,
}

/// What [`Queue::record_failure`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Counted; the row stays queued and will be tried again.
    Counted(u32),
    /// The row reached `max_attempts` and is now a dead letter.
    DeadLettered,
    /// No such row (acknowledged, expired or dead-lettered meanwhile).
    Gone,
}

impl Queue {
    /// Records a failed delivery attempt of row `id`; at `max_attempts` failures moves it to the
    /// dead letters with `reason`.
    pub async fn record_failure(
        &self,
        id: i64,
        reason: String,
        max_attempts: u32,
    ) -> Result<Failure, StoreError> {
        let shared = Arc::clone(&self.shared);
        let after = Arc::clone(&self.shared);
        self.run_then(
            move |conn| {
                shared.sync_totals(conn)?;
                let attempts: Option<i64> = conn
                    .prepare_cached(
                        "UPDATE uplink_queue SET attempts = attempts + 1 WHERE id = ?1 \
                         RETURNING attempts",
                    )?
                    .query_row([id], |r| r.get(0))
                    .optional()?;
                let Some(attempts) = attempts else {
                    return Ok(Failure::Gone);
                };
                if attempts < i64::from(max_attempts) {
                    return Ok(Failure::Counted(
                        u32::try_from(attempts).unwrap_or(u32::MAX),
                    ));
                }
                conn.prepare_cached(&format!(
                    "INSERT OR REPLACE INTO uplink_dead_letters ({COLUMNS}, attempts, reason, \
                     failed_wall) SELECT {COLUMNS}, attempts, ?2, ?3 FROM uplink_queue \
                     WHERE id = ?1"
                ))?
                .execute(params![id, reason, Stamp::now().wall_ms])?;
                let gone = super::delete::delete_ids(
                    conn,
                    &shared,
                    &[id],
                    super::ledger::Entry::DeadLetter,
                )?;
                shared.removed(gone);
                Ok(Failure::DeadLettered)
            },
            move |result| {
                after.settle(&result);
                result
            },
        )
        .await
    }

    /// Up to `limit` dead letters, oldest row first.
    pub async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let epoch = self.shared.epoch.clone();
        self.db
            .run(move |conn| {
                let mut st = conn.prepare_cached(
                    "SELECT id, route, topic, size, attempts, reason, failed_wall \
                     FROM uplink_dead_letters ORDER BY id LIMIT ?1",
                )?;
                let mut rows = st.query([i64::try_from(limit).unwrap_or(i64::MAX)])?;
                let mut letters = Vec::new();
                while let Some(r) = rows.next()? {
                    let id: i64 = r.get(0)?;
                    let letter = (|| {
                        Ok(DeadLetter {
                            id,
                            msg_id: format!("{epoch}-{id}"),
                            route: r.get(1)?,
                            topic: r.get(2)?,
                            size: r.get::<_, i64>(3)?.max(0) as u64,
                            attempts: u32::try_from(r.get::<_, i64>(4)?.max(0)).unwrap_or(u32::MAX),
                            reason: r.get(5)?,
                            failed_wall_ms: r.get(6)?,
                        })
                    })()
                    .map_err(|source| StoreError::Row {
                        table: "uplink_dead_letters",
                        id,
                        source,
                    })?;
                    letters.push(letter);
                }
                Ok(letters)
            })
            .await
    }

    /// How many dead letters the store keeps (the status socket lists them instead).
    #[cfg(test)]
    pub async fn dead_letter_count(&self) -> Result<u64, StoreError> {
        self.db
            .run(|conn| {
                let n: i64 =
                    conn.query_row("SELECT COUNT(*) FROM uplink_dead_letters", [], |r| r.get(0))?;
                Ok(n.max(0) as u64)
            })
            .await
    }

    /// Puts dead letters back in the queue (all of them when `ids` is `None`) under their
    /// original ids with attempts reset, and wakes the uplink. Returns how many moved. A
    /// re-queued row is not refused for `store.max_bytes`: the operator asked for it.
    pub async fn requeue_dead_letters(&self, ids: Option<Vec<i64>>) -> Result<u64, StoreError> {
        let shared = Arc::clone(&self.shared);
        let after = Arc::clone(&self.shared);
        self.run_then(
            move |conn| {
                shared.sync_totals(conn)?;
                let ids: Vec<i64> = match ids {
                    Some(ids) => ids,
                    None => {
                        let mut st =
                            conn.prepare_cached("SELECT id FROM uplink_dead_letters ORDER BY id")?;
                        let rows = st.query_map([], |r| r.get(0))?;
                        rows.collect::<Result<_, _>>()?
                    }
                };
                let mut moved = 0u64;
                let mut bytes = 0u64;
                let mut topic_of = conn
                    .prepare_cached("SELECT route, topic FROM uplink_dead_letters WHERE id = ?1")?;
                let mut copy = conn.prepare_cached(&format!(
                    "INSERT OR IGNORE INTO uplink_queue ({COLUMNS}, attempts, share, order_key) \
                     SELECT {COLUMNS}, 0, ?2, ?3 FROM uplink_dead_letters WHERE id = ?1 \
                     RETURNING size"
                ))?;
                let mut delete =
                    conn.prepare_cached("DELETE FROM uplink_dead_letters WHERE id = ?1")?;
                for id in ids {
                    // Rejoins its key's share (or the least loaded one), like a new row.
                    let Some((route, topic)) = topic_of
                        .query_row([id], |r| {
                            Ok((
                                r.get::<_, String>(0).unwrap_or_default(),
                                r.get::<_, String>(1).unwrap_or_default(),
                            ))
                        })
                        .optional()?
                    else {
                        continue;
                    };
                    let key = shared.shares.order_key(&route, &topic);
                    let share = shared.share_for(conn, key)?;
                    let size: Option<i64> = copy
                        .query_row(params![id, share, key], |r| r.get(0))
                        .optional()?;
                    if let Some(size) = size {
                        super::ledger::add(conn, &route, super::ledger::Entry::Requeued, 1)?;
                        moved += 1;
                        bytes += size.max(0) as u64;
                        shared.share_added(share, 1);
                        delete.execute([id])?;
                    }
                }
                shared.added(moved, bytes);
                Ok(moved)
            },
            move |result| {
                after.settle(&result);
                if matches!(result, Ok(n) if n > 0) {
                    after.rewinds.fetch_add(1, Ordering::AcqRel);
                    // Whatever priorities they had may hold rows now.
                    after.priorities.fetch_or(u16::MAX, Ordering::AcqRel);
                    after.notify(None);
                }
                result
            },
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use super::super::tests::{close, config, open};
    use super::super::{NewEntry, WhenFull};
    use super::*;
    use crate::message::{Message, Properties, QoS};

    fn entry(topic: &str) -> NewEntry {
        let accepted = Stamp::now();
        NewEntry {
            route: "r".into(),
            priority: 5,
            message: Message {
                topic: topic.into(),
                payload: Bytes::from_static(b"p"),
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: Properties::default(),
                accepted,
                deadline: Some(accepted.plus(Duration::from_secs(3600))),
            },
        }
    }

    #[tokio::test]
    async fn failures_move_a_row_aside_and_requeue_brings_it_back_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let (q, db, thread) = open(
            &dir.path().join("s.db"),
            config(1 << 20, WhenFull::RejectNew),
        )
        .await;
        let a = q.enqueue(entry("t/a")).await.unwrap().unwrap();
        let poison = q.enqueue(entry("t/poison")).await.unwrap().unwrap();
        let c = q.enqueue(entry("t/c")).await.unwrap().unwrap();
        let before = q.totals();

        assert_eq!(
            q.record_failure(poison, "refused: NotAuthorized".into(), 3)
                .await
                .unwrap(),
            Failure::Counted(1)
        );
        assert_eq!(
            q.record_failure(poison, "refused: NotAuthorized".into(), 3)
                .await
                .unwrap(),
            Failure::Counted(2)
        );
        assert_eq!(
            q.record_failure(poison, "refused: TopicNameInvalid".into(), 3)
                .await
                .unwrap(),
            Failure::DeadLettered
        );
        assert_eq!(
            q.record_failure(poison, "again".into(), 3).await.unwrap(),
            Failure::Gone
        );
        // The queue behind it flows; the dead letter is kept, counted and listed.
        let batch = q.next_batch(vec![], 10).await.unwrap();
        assert_eq!(batch.iter().map(|e| e.id).collect::<Vec<_>>(), vec![a, c]);
        assert_eq!(q.totals().rows, before.rows - 1);
        assert_eq!(q.dead_letter_count().await.unwrap(), 1);
        let listed = q.dead_letters(10).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].id, poison);
        assert_eq!(listed[0].topic, "t/poison");
        assert_eq!(listed[0].attempts, 3);
        assert_eq!(listed[0].reason, "refused: TopicNameInvalid");
        assert_eq!(listed[0].msg_id, q.msg_id(poison));

        // Re-queued: back in its place, attempts reset, totals restored.
        assert_eq!(q.requeue_dead_letters(None).await.unwrap(), 1);
        assert_eq!(q.requeue_dead_letters(Some(vec![poison])).await.unwrap(), 0);
        assert_eq!(q.dead_letter_count().await.unwrap(), 0);
        assert_eq!(q.totals(), before);
        let batch = q.next_batch(vec![], 10).await.unwrap();
        assert_eq!(
            batch.iter().map(|e| (e.id, e.attempts)).collect::<Vec<_>>(),
            vec![(a, 0), (poison, 0), (c, 0)]
        );
        close(q, db, thread);
    }

    #[tokio::test]
    async fn a_requeued_dead_letter_keeps_its_conflation_key() {
        let dir = tempfile::tempdir().unwrap();
        let (q, db, thread) = open(
            &dir.path().join("s.db"),
            config(1 << 20, WhenFull::RejectNew),
        )
        .await;
        let old = q
            .enqueue_keyed(entry("t/pos"), Some("train-pos".into()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            q.record_failure(old, "refused".into(), 1).await.unwrap(),
            Failure::DeadLettered
        );
        assert_eq!(q.requeue_dead_letters(None).await.unwrap(), 1);
        // A newer value of the same key replaces the re-queued one, as before it failed.
        let new = q
            .enqueue_keyed(entry("t/pos"), Some("train-pos".into()))
            .await
            .unwrap()
            .unwrap();
        let batch = q.next_batch(vec![], 10).await.unwrap();
        assert_eq!(batch.iter().map(|e| e.id).collect::<Vec<_>>(), vec![new]);
        close(q, db, thread);
    }

    #[tokio::test]
    async fn a_damaged_dead_letter_is_an_error_naming_its_row() {
        let dir = tempfile::tempdir().unwrap();
        let (q, db, thread) = open(
            &dir.path().join("s.db"),
            config(1 << 20, WhenFull::RejectNew),
        )
        .await;
        let id = q.enqueue(entry("t/a")).await.unwrap().unwrap();
        q.record_failure(id, "refused".into(), 1).await.unwrap();
        db.run(move |c| {
            c.execute(
                "UPDATE uplink_dead_letters SET route = x'ff' WHERE id = ?1",
                [id],
            )?;
            Ok(())
        })
        .await
        .unwrap();
        match q.dead_letters(10).await {
            Err(StoreError::Row { table, id: row, .. }) => {
                assert_eq!((table, row), ("uplink_dead_letters", id));
            }
            other => panic!("expected a Row error, got {other:?}"),
        }
        close(q, db, thread);
    }
}
