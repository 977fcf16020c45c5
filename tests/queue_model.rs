//! Model-based test of the uplink queue: random sequences of actions are applied both to the
//! real [`Queue`] (a real SQLite file in a temp dir) and to a trivially correct in-memory model
//! with the same policy; every answer, the totals and the counters must agree after each step.
//!
//! Time is virtual (stamps are built by the test), so expiry, wall-clock jumps and reboots are
//! exercised deterministically; a reboot also reopens the store, like the daemon restarting.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use bytes::Bytes;
use proptest::prelude::*;
use trainrelay::clock::Stamp;
use trainrelay::message::{Message, Properties, QoS};
use trainrelay::store::queue::{
    entry_size, CounterSnapshot, Entry, NewEntry, Queue, QueueConfig, Totals, WhenFull,
    LOWEST_PRIORITY, URGENT_PRIORITY,
};
use trainrelay::store::{Db, DbThread, StoreError, Synchronous};

#[derive(Debug, Clone)]
enum Action {
    Enqueue {
        priority: u8,
        payload: usize,
        /// Deadline relative to now (negative: already past); `None`: never expires.
        ttl_ms: Option<i64>,
        user_props: u8,
    },
    NextBatch {
        limit: usize,
        exclude_mask: u64,
    },
    Ack {
        mask: u64,
        unknown: bool,
    },
    RecordAttempt {
        mask: u64,
    },
    Sweep,
    Advance(i64),
    WallJump(i64),
    Reopen,
    Reboot {
        wall_jump: i64,
    },
}

/// Times move in steps of this many ms, so deadlines often fall exactly on "now": the
/// boundary case of the expiry test.
const GRID: i64 = 500;

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        8 => (0u8..12, 0usize..400, prop::option::weighted(0.6, (-4i64..10).prop_map(|t| t * GRID)), 0u8..3)
            .prop_map(|(priority, payload, ttl_ms, user_props)| Action::Enqueue {
                priority,
                payload,
                ttl_ms,
                user_props,
            }),
        4 => (0usize..8, any::<u64>())
            .prop_map(|(limit, exclude_mask)| Action::NextBatch { limit, exclude_mask }),
        3 => (any::<u64>(), any::<bool>()).prop_map(|(mask, unknown)| Action::Ack { mask, unknown }),
        1 => any::<u64>().prop_map(|mask| Action::RecordAttempt { mask }),
        1 => Just(Action::Sweep),
        2 => (0i64..6).prop_map(|t| Action::Advance(t * GRID)),
        1 => (-200i64..200).prop_map(|t| Action::WallJump(t * GRID)),
        1 => Just(Action::Reopen),
        1 => (-20i64..20).prop_map(|t| Action::Reboot { wall_jump: t * GRID }),
    ]
}

#[derive(Debug, Clone)]
struct ModelRow {
    priority: u8,
    size: u64,
    message: Message,
    attempts: u32,
}

/// The obviously correct queue: a map by id, scanned in full for every question.
struct Model {
    config: QueueConfig,
    rows: BTreeMap<i64, ModelRow>,
    next_id: i64,
    counters: CounterSnapshot,
    /// The anti-starvation rule: every this many fills (0 = off) ...
    starvation_every: u64,
    /// ... counted since the queue was opened.
    fills: u64,
}

impl Model {
    fn totals(&self) -> Totals {
        Totals {
            rows: self.rows.len() as u64,
            bytes: self.rows.values().map(|r| r.size).sum(),
        }
    }

    fn enqueue(&mut self, priority: u8, message: Message) -> Result<i64, ()> {
        let size = entry_size(&message);
        let urgent = priority <= URGENT_PRIORITY;
        // Non-urgent rows stop short of the reserve, and may drop only non-urgent rows.
        let limit = if urgent {
            self.config.max_bytes
        } else {
            self.config.max_bytes - self.config.urgent_reserve
        };
        let over = |m: &Model, freed: u64| m.totals().bytes - freed + size > limit;
        if size > limit || (over(self, 0) && self.config.when_full == WhenFull::RejectNew) {
            self.counters.rejected_full += 1;
            return Err(());
        }
        // The oldest non-urgent rows, then (for an urgent message) the oldest urgent ones.
        let mut victims = Vec::new();
        let mut freed = 0;
        let passes: &[bool] = if urgent { &[false, true] } else { &[false] };
        'passes: for &urgent_rows in passes {
            for (id, row) in &self.rows {
                if !over(self, freed) {
                    break 'passes;
                }
                if (row.priority <= URGENT_PRIORITY) == urgent_rows {
                    victims.push(*id);
                    freed += row.size;
                }
            }
        }
        if over(self, freed) {
            self.counters.rejected_full += 1;
            return Err(());
        }
        for id in victims {
            self.rows.remove(&id);
            self.counters.dropped_full += 1;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.rows.insert(
            id,
            ModelRow {
                priority: priority.min(LOWEST_PRIORITY),
                size,
                message,
                attempts: 0,
            },
        );
        self.counters.accepted += 1;
        Ok(id)
    }

    fn expired(row: &ModelRow, now: &Stamp) -> bool {
        row.message.deadline.is_some_and(|d| d.is_past(now))
    }

    fn next_batch(&mut self, exclude: &BTreeSet<i64>, limit: usize, now: &Stamp) -> Vec<i64> {
        let mut order: Vec<(u8, i64)> = self.rows.iter().map(|(id, r)| (r.priority, *id)).collect();
        order.sort();
        let mut out = Vec::new();
        let mut gone = Vec::new();
        if limit > 0 {
            self.fills += 1;
            if self.starvation_every > 0 && self.fills % self.starvation_every == 0 {
                // The oldest deliverable row of the lowest waiting priority goes first.
                let mut lowest_first = order.clone();
                lowest_first.sort_by_key(|(p, id)| (std::cmp::Reverse(*p), *id));
                for (_, id) in lowest_first {
                    if exclude.contains(&id) {
                        continue;
                    }
                    if Self::expired(&self.rows[&id], now) {
                        gone.push(id);
                        continue;
                    }
                    out.push(id);
                    break;
                }
            }
        }
        if out.len() < limit {
            for (_, id) in order {
                if exclude.contains(&id) || out.contains(&id) || gone.contains(&id) {
                    continue;
                }
                if Self::expired(&self.rows[&id], now) {
                    gone.push(id);
                    continue;
                }
                out.push(id);
                if out.len() >= limit {
                    break;
                }
            }
        }
        for id in gone {
            self.rows.remove(&id);
            self.counters.expired += 1;
        }
        out
    }

    fn sweep(&mut self, now: &Stamp) -> u64 {
        let before = self.rows.len();
        self.rows.retain(|_, r| !Self::expired(r, now));
        let n = (before - self.rows.len()) as u64;
        self.counters.expired += n;
        n
    }
}

struct Real {
    queue: Queue,
    db: Db,
    thread: DbThread,
}

impl Real {
    async fn open(path: &Path, config: QueueConfig) -> Real {
        let (db, thread) = Db::open(path, Synchronous::Normal).expect("open store");
        let queue = Queue::open(db.clone(), config).await.expect("open queue");
        Real { queue, db, thread }
    }

    fn close(self) {
        drop(self.queue);
        drop(self.db);
        self.thread.join();
    }
}

fn pick(ids: &BTreeSet<i64>, mask: u64) -> Vec<i64> {
    ids.iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << (i % 64)) != 0)
        .map(|(_, id)| *id)
        .collect()
}

fn check_entries(got: &[Entry], want: &[i64], model: &Model, epoch: &str) {
    let got_ids: Vec<i64> = got.iter().map(|e| e.id).collect();
    assert_eq!(got_ids, want, "next_batch ids");
    for e in got {
        let row = &model.rows[&e.id];
        assert_eq!(e.msg_id, format!("{epoch}-{}", e.id));
        assert_eq!(e.priority, row.priority);
        assert_eq!(e.attempts, row.attempts);
        assert_eq!(e.route, "r");
        assert_eq!(e.message, row.message);
    }
}

async fn run(
    actions: Vec<Action>,
    max_bytes: u64,
    urgent_reserve: u64,
    when_full: WhenFull,
    starvation_every: u32,
) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("store.db");
    let config = QueueConfig {
        max_bytes,
        when_full,
        urgent_reserve,
    };
    let mut model = Model {
        config,
        rows: BTreeMap::new(),
        next_id: 1,
        counters: CounterSnapshot::default(),
        starvation_every: u64::from(starvation_every),
        fills: 0,
    };
    let mut real = Real::open(&path, config).await;
    real.queue.set_starvation_every(starvation_every);
    let epoch = real.queue.epoch().to_string();
    let mut now = Stamp {
        wall_ms: 1_700_000_000_000,
        boot_ms: 50_000,
        boot_id: 1,
    };
    let mut in_flight: BTreeSet<i64> = BTreeSet::new();

    for (step, action) in actions.into_iter().enumerate() {
        match action {
            Action::Enqueue {
                priority,
                payload,
                ttl_ms,
                user_props,
            } => {
                let message = Message {
                    topic: format!("trains/T1/up/{step}"),
                    payload: Bytes::from(vec![step as u8; payload]),
                    qos: QoS::AtLeastOnce,
                    retain: step % 5 == 0,
                    properties: Properties {
                        user_properties: (0..user_props)
                            .map(|i| (format!("k{i}"), "v".repeat(step % 7)))
                            .collect(),
                        correlation_data: (user_props == 2).then(|| Bytes::from_static(&[0, 9])),
                        ..Properties::default()
                    },
                    accepted: now,
                    deadline: ttl_ms.map(|t| Stamp {
                        wall_ms: now.wall_ms + t,
                        boot_ms: now.boot_ms + t,
                        boot_id: now.boot_id,
                    }),
                };
                let want = model.enqueue(priority, message.clone());
                let got = real
                    .queue
                    .enqueue(NewEntry {
                        route: "r".into(),
                        priority,
                        message,
                    })
                    .await
                    .expect("answer");
                match (got, want) {
                    (Ok(g), Ok(w)) => assert_eq!(g, w, "step {step}: id"),
                    (Err(StoreError::Full), Err(())) => {}
                    (g, w) => panic!("step {step}: enqueue gave {g:?}, model {w:?}"),
                }
            }
            Action::NextBatch {
                limit,
                exclude_mask,
            } => {
                let exclude = pick(&in_flight, exclude_mask);
                let exclude_set: BTreeSet<i64> = exclude.iter().copied().collect();
                let got = real
                    .queue
                    .next_batch_at(exclude, limit, now)
                    .await
                    .expect("next_batch");
                let want = model.next_batch(&exclude_set, limit, &now);
                check_entries(&got, &want, &model, &epoch);
                in_flight.extend(want);
            }
            Action::Ack { mask, unknown } => {
                let mut ids = pick(&in_flight, mask);
                for id in &ids {
                    in_flight.remove(id);
                }
                if unknown {
                    ids.push(model.next_id + 1000);
                }
                real.queue.ack(ids.clone()).await.expect("ack");
                for id in ids {
                    if model.rows.remove(&id).is_some() {
                        model.counters.acked += 1;
                    }
                }
            }
            Action::RecordAttempt { mask } => {
                let ids = pick(&in_flight, mask);
                // Failures counted without a limit: the row stays queued.
                for id in &ids {
                    real.queue
                        .record_failure(*id, "refused".into(), u32::MAX)
                        .await
                        .expect("record_failure");
                }
                for id in ids {
                    if let Some(r) = model.rows.get_mut(&id) {
                        r.attempts += 1;
                    }
                }
            }
            Action::Sweep => {
                let got = real.queue.sweep_expired_at(now).await.expect("sweep");
                assert_eq!(got, model.sweep(&now), "step {step}: swept");
            }
            Action::Advance(ms) => {
                now.wall_ms += ms;
                now.boot_ms += ms;
            }
            Action::WallJump(ms) => now.wall_ms += ms,
            Action::Reopen | Action::Reboot { .. } => {
                if let Action::Reboot { wall_jump } = action {
                    now = Stamp {
                        wall_ms: now.wall_ms + wall_jump,
                        boot_ms: 3_000,
                        boot_id: now.boot_id + 1,
                    };
                }
                let totals = real.queue.totals();
                real.close();
                real = Real::open(&path, config).await;
                real.queue.set_starvation_every(starvation_every);
                model.fills = 0;
                assert_eq!(real.queue.epoch(), epoch, "epoch survives a restart");
                assert_eq!(real.queue.totals(), totals, "totals survive a restart");
                model.counters = CounterSnapshot::default();
                in_flight.clear();
            }
        }
        assert_eq!(real.queue.totals(), model.totals(), "step {step}: totals");
        assert_eq!(
            real.queue.counters(),
            model.counters,
            "step {step}: counters"
        );
        assert!(model.totals().bytes <= max_bytes, "model over its bound");
    }
    let stats = real.queue.stats().await.expect("stats");
    let totals = model.totals();
    assert_eq!((stats.depth, stats.bytes), (totals.rows, totals.bytes));
    // Everything left comes out in delivery order, with nothing lost.
    let rest = real
        .queue
        .next_batch_at(vec![], usize::MAX, now)
        .await
        .expect("drain");
    let want = model.next_batch(&BTreeSet::new(), usize::MAX, &now);
    check_entries(&rest, &want, &model, &epoch);
    real.close();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn queue_matches_model(
        actions in prop::collection::vec(action(), 1..80),
        max_bytes in 300u64..3_000,
        reserve_pct in prop_oneof![Just(0u64), 1u64..50],
        reject in any::<bool>(),
        starvation_every in 0u32..4,
    ) {
        let when_full = if reject { WhenFull::RejectNew } else { WhenFull::DropOldest };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(run(actions, max_bytes, max_bytes * reserve_pct / 100, when_full, starvation_every));
    }
}
