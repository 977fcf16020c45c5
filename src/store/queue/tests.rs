//! Tests of the queue's contract: order, limits, expiry, totals, counters and damaged rows.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use rusqlite::named_params;

use super::delete::EXPIRED;
use super::*;
use crate::clock::Stamp;
use crate::message::{Properties, QoS};
use crate::store::{DbThread, Synchronous};

const BOOT: i64 = 42;

fn at(ms: i64) -> Stamp {
    Stamp {
        wall_ms: 1_700_000_000_000 + ms,
        boot_ms: 10_000 + ms,
        boot_id: BOOT,
    }
}

pub(super) fn msg(
    topic: &str,
    payload_len: usize,
    accepted: Stamp,
    ttl_ms: Option<u64>,
) -> Message {
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

pub(super) fn new_entry(route: &str, priority: u8, message: Message) -> NewEntry {
    NewEntry {
        route: route.to_string(),
        priority,
        message,
    }
}

pub(super) fn config(max_bytes: u64, when_full: WhenFull) -> QueueConfig {
    QueueConfig {
        max_bytes,
        when_full,
        urgent_reserve: 0,
    }
}

pub(super) async fn open(path: &Path, config: QueueConfig) -> (Queue, Db, DbThread) {
    let (db, thread) = Db::open(path, Synchronous::Normal).unwrap();
    let q = Queue::open(db.clone(), config).await.unwrap();
    (q, db, thread)
}

pub(super) fn close(q: Queue, db: Db, thread: DbThread) {
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
    let mut d = q.drainer(0).unwrap();
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
    let mut d = q.drainer(0).unwrap();
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
        let (q, db, t) = open(&dir.path().join("s.db"), config(entry_size(&m) - 1, policy)).await;
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
    // The summary (no per-route walk) says the same about the whole queue.
    let summary = q.summary().await.unwrap();
    assert_eq!(
        (summary.depth, summary.bytes, summary.oldest_accepted),
        (stats.depth, stats.bytes, stats.oldest_accepted)
    );
    assert!(summary.oldest_accepted.is_some() && summary.routes.is_empty());
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
    close(q, db, t);
}

#[test]
fn when_full_reads_snake_case() {
    let parse = |s: &str| serde_json::from_str::<WhenFull>(s);
    assert_eq!(parse("\"drop_oldest\"").unwrap(), WhenFull::DropOldest);
    assert_eq!(parse("\"reject_new\"").unwrap(), WhenFull::RejectNew);
    assert!(parse("\"RejectNew\"").is_err());
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
    let mut commits = q.commits(0);
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
