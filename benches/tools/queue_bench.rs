//! Durable enqueue rate of the uplink queue with group commit.
//!
//! `cargo run --release --example queue_bench -- [messages] [window]`
//!
//! For `synchronous = FULL` and `NORMAL`, enqueues `messages` (default 50 000) messages with
//! 200-byte payloads, keeping `window` (default 512) enqueues outstanding at once, as many
//! iPads publishing together would, and reports committed messages per second. The store is a
//! fresh file in a temp dir under the current directory (on the real disk, not a tmpfs).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use trainrelay::clock::Stamp;
use trainrelay::message::{Message, Properties, QoS};
use trainrelay::store::queue::{NewEntry, Queue, QueueConfig, WhenFull};
use trainrelay::store::{Db, StoreError, Synchronous};

type Answer = tokio::sync::oneshot::Receiver<Result<i64, StoreError>>;

fn main() {
    let mut args = std::env::args().skip(1);
    let messages: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(50_000);
    let window: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(512);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    for sync in [Synchronous::Full, Synchronous::Normal] {
        let rate = rt.block_on(run(sync, messages, window));
        println!(
            "synchronous={sync:?}: {messages} msgs, 200-byte payloads, window {window}: {rate:.0} msgs/s"
        );
    }
}

async fn run(sync: Synchronous, messages: usize, window: usize) -> f64 {
    let dir = tempfile::tempdir_in(".").expect("temp dir");
    let (db, thread) = Db::open(&dir.path().join("bench.db"), sync).expect("store");
    let queue = Queue::open(
        db.clone(),
        QueueConfig {
            max_bytes: 1 << 30,
            when_full: WhenFull::RejectNew,
        },
    )
    .await
    .expect("queue");
    let payload = Bytes::from(vec![0x5a; 200]);
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
            priority: (i % 3) as u8,
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
    assert_eq!(queue.totals().rows, messages as u64);
    drop(queue);
    drop(db);
    thread.join();
    messages as f64 / elapsed.as_secs_f64()
}
