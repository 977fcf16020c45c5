//! Durable enqueue rate of the store alone: many enqueues outstanding at once (as many iPads
//! publishing together), committed messages per second, on a fresh file on the real disk.
//! Alone: `BENCH_WORKLOADS=enqueue BENCH_SETUPS=trainrelay cargo bench --bench relay`.

use std::collections::VecDeque;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use trainrelay::clock::Stamp;
use trainrelay::message::{Message, Properties, QoS};
use trainrelay::store::queue::{NewEntry, Queue, QueueConfig, WhenFull};
use trainrelay::store::{Db, StoreError, Synchronous};

type Answer = tokio::sync::oneshot::Receiver<Result<i64, StoreError>>;

/// Committed messages per second for `messages` 200-byte enqueues with `window` outstanding.
pub async fn rate(dir: &Path, sync: Synchronous, messages: usize, window: usize) -> f64 {
    let (db, thread) = Db::open(&dir.join("enqueue.db"), sync).expect("store");
    let queue = Queue::open(
        db.clone(),
        QueueConfig {
            max_bytes: 1 << 32,
            when_full: WhenFull::RejectNew,
            urgent_reserve: 0,
        },
    )
    .await
    .expect("queue");
    let payload = Bytes::from(vec![0x5a; super::wire::PAYLOAD]);
    let now = Stamp::now();
    let started = Instant::now();
    let mut pending: VecDeque<Answer> = VecDeque::with_capacity(window);
    for i in 0..messages {
        if pending.len() >= window {
            let answer = pending.pop_front().expect("pending");
            answer.await.expect("answer").expect("enqueue");
        }
        pending.push_back(queue.enqueue(NewEntry {
            route: "up".into(),
            priority: 5,
            message: Message {
                topic: format!("trains/T1/up/cab/{}", i % 16),
                payload: payload.clone(),
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: Properties::default(),
                accepted: now,
                deadline: Some(now.plus(Duration::from_secs(600))),
            },
        }));
    }
    for answer in pending {
        answer.await.expect("answer").expect("enqueue");
    }
    let elapsed = started.elapsed();
    drop(queue);
    drop(db);
    thread.join();
    messages as f64 / elapsed.as_secs_f64()
}
