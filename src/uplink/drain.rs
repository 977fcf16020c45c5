//! One connection's delivery bookkeeping: which rows are in flight, acknowledged and waiting
//! for their delete, skipped or waiting for a retry, and where the next fetch resumes.
//!
//! A row is handed out by [`Drain::next_rows`] only if this connection has no other claim on
//! it and it is in its [`Drainer`]'s share (each parallel connection drains its own share of
//! the queue, see [`crate::store::queue::share`]), so no row is ever in flight twice. It leaves the store only through
//! [`Drain::acked`] (the broker's PUBACK) and the delete that follows; a row that was in flight
//! when a connection ends is fetched again by the next one (at least once, never zero times).

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::throttle;
use crate::store::queue::{Batch, Cursor, Drainer, Entry, Queue};
use crate::store::StoreError;

/// Acknowledged rows gathered before their delete is submitted (see `Drain::coalesce_acks`).
const ACK_BATCH: usize = 512;

/// Longest wait before acknowledged rows are deleted while a link is busy.
const ACK_DELAY: Duration = Duration::from_millis(10);

/// What a message in flight stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Tag {
    Row(i64),
    /// The relay's own presence message; not in the store.
    Presence,
}

/// The answer to a submitted delete, after its commit.
type DeleteDone = oneshot::Receiver<Result<(), StoreError>>;

/// In-flight bookkeeping of one connection.
#[derive(Default)]
pub(super) struct Drain {
    /// Requests handed to rumqttc whose packet id is not known yet, in order.
    pub(super) queued: VecDeque<Tag>,
    /// Written publishes waiting for their PUBACK.
    pub(super) by_pkid: HashMap<u16, Tag>,
    /// Store rows queued or written and not yet acknowledged, with their size on the wire.
    pub(super) in_flight: HashMap<i64, usize>,
    /// Rows not to fetch again on this connection (expired meanwhile).
    pub(super) skipped: HashSet<i64>,
    /// Rows whose delivery failed, not to fetch again before the instant.
    pub(super) retry_at: HashMap<i64, Instant>,
    /// Messages (rows and the presence message) written and waiting for their PUBACK, oldest
    /// first, each with its place in the order of writes on this connection.
    pub(super) written: VecDeque<(u64, Tag, Instant)>,
    /// Writes of rows on this connection so far.
    pub(super) writes: u64,
    /// The place of the oldest message written and not answered, and when it is known to have
    /// left the socket (see [`Drain::unanswered_for`]).
    pub(super) front_left: Option<(u64, Instant)>,
    /// The place of the last-written row that the broker answered (see [`Drain::wrote`]).
    pub(super) answered_up_to: Option<u64>,
    /// The bandwidth cap, if one is configured.
    pub(super) throttle: Option<throttle::Throttle>,
    /// Where the next fetch resumes; every deliverable row behind it is excluded above.
    pub(super) cursor: Option<Cursor>,
    /// [`Queue::rewinds`] when `cursor` was last valid.
    pub(super) rewinds: u64,
    /// Rows acknowledged by the central broker whose delete is not submitted yet.
    pub(super) to_ack: Vec<i64>,
    /// Submitted deletes, oldest first, whose commit is not confirmed yet. A fetch reads the
    /// last commit, so their rows stay excluded until then; a failed commit ends the
    /// connection (the rows are then sent again: a duplicate, never a loss).
    pub(super) acks: VecDeque<(Vec<i64>, DeleteDone)>,
    /// The rows of `to_ack` and `acks`.
    pub(super) pending_delete: HashSet<i64>,
    /// When the last delete was submitted.
    pub(super) acks_submitted: Option<Instant>,
    /// The presence message is unacknowledged (it counts against the broker's Receive
    /// Maximum like any QoS 1 PUBLISH).
    pub(super) presence_in_flight: bool,
}

impl Drain {
    /// Up to `want` rows to send next, in delivery order, that this connection may take:
    /// none in flight, acknowledged and waiting for its delete, skipped or waiting for a
    /// retry, and (through `drainer`'s filter) only this connection's share. `rewinds` is
    /// [`Queue::rewinds`]: rows put back under old ids invalidate the cursor.
    pub(super) fn next_rows(
        &mut self,
        drainer: &mut Drainer,
        rewinds: u64,
        want: usize,
    ) -> Result<Batch, StoreError> {
        if rewinds != self.rewinds {
            self.rewinds = rewinds;
            self.cursor = None;
        }
        drainer.next_batch(self.cursor, &|id| self.is_excluded(id), want)
    }

    /// Row `entry` of a batch was dealt with (sent, skipped or refused): the next fetch
    /// resumes after it, unless it was the batch's out-of-order pick (see [`Batch`]).
    pub(super) fn passed(&mut self, entry: &Entry, out_of_order: Option<i64>) {
        if out_of_order != Some(entry.id) {
            self.cursor = Some(Cursor::at(entry));
        }
    }

    /// Row `id` (`size` bytes on the wire) was handed to the link.
    pub(super) fn sent(&mut self, id: i64, size: usize) {
        self.queued.push_back(Tag::Row(id));
        self.in_flight.insert(id, size);
    }

    pub(super) fn rows_in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// QoS 1 publishes awaiting their PUBACK: what MQTT 5's Receive Maximum bounds.
    pub(super) fn publishes_in_flight(&self) -> usize {
        self.in_flight.len() + usize::from(self.presence_in_flight)
    }

    /// The central broker has row `id`: delete it with the next batch of deletes.
    pub(super) fn acked(&mut self, id: i64) {
        self.in_flight.remove(&id);
        self.to_ack.push(id);
        self.pending_delete.insert(id);
    }

    /// Row `id` was written to the socket.
    pub(super) fn wrote(&mut self, id: i64) {
        self.wrote_tag(Tag::Row(id));
    }

    /// The relay's presence message was written to the socket: it waits for its PUBACK under
    /// the same deadline as the rows.
    pub(super) fn wrote_presence(&mut self) {
        self.wrote_tag(Tag::Presence);
    }

    fn wrote_tag(&mut self, tag: Tag) {
        self.written.push_back((self.writes, tag, Instant::now()));
        self.writes += 1;
    }

    /// The broker answered row `id` (acknowledged or refused it).
    pub(super) fn answered(&mut self, id: i64) {
        self.in_flight.remove(&id);
        self.answered_tag(Tag::Row(id));
    }

    /// The broker acknowledged the presence message.
    pub(super) fn answered_presence(&mut self) {
        self.presence_in_flight = false;
        self.answered_tag(Tag::Presence);
    }

    fn answered_tag(&mut self, tag: Tag) {
        // Brokers answer in order, so this is nearly always the front.
        let pos = if self.written.front().is_some_and(|w| w.1 == tag) {
            Some(0)
        } else {
            self.written.iter().position(|w| w.1 == tag)
        };
        if let Some((place, _, _)) = pos.and_then(|p| self.written.remove(p)) {
            self.answered_up_to = self.answered_up_to.max(Some(place));
        }
    }

    /// The oldest row written and not answered, if nothing written after it was answered: the
    /// one a broker that processes in order was working on when it closed the connection. The
    /// presence message is never a suspect (it is not a stored row).
    pub(super) fn close_suspect(&self) -> Option<i64> {
        let (place, id) = self.written.iter().find_map(|&(place, tag, _)| match tag {
            Tag::Row(id) => Some((place, id)),
            Tag::Presence => None,
        })?;
        (self.answered_up_to.map_or(true, |up_to| up_to < place)).then_some(id)
    }

    /// The largest row written and not answered.
    pub(super) fn largest_unacknowledged(&self) -> Option<i64> {
        self.written
            .iter()
            .filter_map(|&(_, tag, _)| match tag {
                Tag::Row(id) => Some(id),
                Tag::Presence => None,
            })
            .max_by_key(|id| self.in_flight.get(id).copied().unwrap_or(0))
    }

    /// How long the oldest message written and not answered (a row or the presence message)
    /// has waited for its answer since it left the socket, as far as the link tells: `sending`
    /// is whether bytes were waiting to leave at the link's last look, `idle_for` how long none
    /// have. A message is known to have left once the link was seen with nothing waiting after
    /// it was written; until then it may still be on its way over a slow stretch, and its wait
    /// does not count.
    pub(super) fn unanswered_for(&mut self, sending: bool, idle_for: Duration) -> Option<Duration> {
        let &(place, _, written) = self.written.front()?;
        let now = Instant::now();
        if self.front_left.map_or(true, |(front, _)| front != place) {
            self.front_left = None;
            if !sending {
                let idle_since = now.checked_sub(idle_for).unwrap_or(written);
                self.front_left = Some((place, written.max(idle_since)));
            }
        }
        self.front_left
            .map(|(_, left)| now.saturating_duration_since(left))
    }

    /// Rows a fetch must not return: in flight, expired meanwhile, waiting for a retry, or
    /// acknowledged with the delete not committed yet.
    pub(super) fn is_excluded(&self, id: i64) -> bool {
        self.in_flight.contains_key(&id)
            || self.pending_delete.contains(&id)
            || self.skipped.contains(&id)
            || self.retry_at.contains_key(&id)
    }

    /// Releases failed rows whose retry time came; true if any did.
    pub(super) fn retry_due(&mut self) -> bool {
        let now = Instant::now();
        let before = self.retry_at.len();
        self.retry_at.retain(|_, at| *at > now);
        let released = self.retry_at.len() != before;
        if released {
            // The released rows are behind the cursor.
            self.cursor = None;
        }
        released
    }

    /// Deletes the acknowledged rows in one store job, without waiting for its commit.
    pub(super) fn submit_acks(&mut self, queue: &Queue) {
        if !self.to_ack.is_empty() {
            let ids = std::mem::take(&mut self.to_ack);
            let done = queue.ack_submit(ids.clone());
            self.acks.push_back((ids, done));
            self.acks_submitted = Some(Instant::now());
        }
    }

    /// [`Drain::submit_acks`], but only once the previous delete committed and either
    /// [`ACK_BATCH`] rows or [`ACK_DELAY`] have gathered (the liveness tick flushes the rest).
    /// Every commit rewrites the pages it touches into the WAL and waits for an fsync, so a
    /// delete per burst of PUBACKs cost the store more than the deletes themselves. A row
    /// acknowledged and not yet deleted stays excluded from fetches; if the relay dies before
    /// the delete commits it is sent again (a duplicate, never a loss).
    pub(super) fn coalesce_acks(&mut self, queue: &Queue) {
        let waited = match self.acks_submitted {
            Some(at) => at.elapsed() >= ACK_DELAY,
            None => true,
        };
        let due = self.to_ack.len() >= ACK_BATCH || waited;
        if self.acks.is_empty() && due {
            self.submit_acks(queue);
        }
    }

    /// At the end of a connection: submits what is left and waits (a bounded time) until every
    /// delete committed. Failures are logged; their rows are then sent again.
    pub(super) async fn finish_acks(&mut self, queue: &Queue) {
        self.submit_acks(queue);
        let waits = self.acks.drain(..).map(|(_, done)| done);
        let all = futures_util::future::join_all(waits);
        match tokio::time::timeout(Duration::from_secs(5), all).await {
            Ok(results) => {
                for r in results {
                    match r {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => log::warn!("uplink: cannot delete acknowledged rows: {e}"),
                        Err(_) => log::warn!(
                            "uplink: cannot delete acknowledged rows: {}",
                            StoreError::Closed
                        ),
                    }
                }
            }
            Err(_) => log::warn!(
                "uplink: deleting acknowledged rows takes over 5 s; they may be sent again"
            ),
        }
        self.pending_delete.clear();
    }

    /// Collects the deletes committed so far; the first failure is the connection's end.
    pub(super) fn settle_acks(&mut self) -> Result<(), StoreError> {
        while let Some((_, front)) = self.acks.front_mut() {
            match front.try_recv() {
                Ok(Ok(())) => {
                    if let Some((ids, _)) = self.acks.pop_front() {
                        for id in ids {
                            self.pending_delete.remove(&id);
                        }
                    }
                }
                Ok(Err(e)) => return Err(e),
                Err(oneshot::error::TryRecvError::Empty) => break,
                Err(oneshot::error::TryRecvError::Closed) => return Err(StoreError::Closed),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod model {
    //! Model-based test of the production drain path: the real store (SQLite in a temp dir),
    //! N connections each with its own [`Drainer`] of its share and its own [`Drain`], driven by random sequences of enqueues (plain and
    //! conflating), fills, acknowledgements, connection losses and crashes, and compared with
    //! a trivially correct model: what was committed and what the broker acknowledged.
    //!
    //! Checked after every step: no row in flight on two connections; no row gone from the
    //! store without its acknowledgement (or its replacement by a newer one of its key);
    //! first deliveries in enqueue order per key. At the end, once everything drained, every
    //! committed row was delivered at least once (or replaced while waiting).

    use std::collections::{BTreeMap, BTreeSet, HashMap};

    use bytes::Bytes;
    use proptest::prelude::*;

    use super::*;
    use crate::clock::Stamp;
    use crate::message::{Message, Properties, QoS};
    use crate::store::queue::{NewEntry, QueueConfig, Shares, WhenFull};
    use crate::store::{Db, DbThread, Synchronous};

    const LANES: usize = 3;
    const TOPICS: u8 = 6;

    #[derive(Debug, Clone)]
    enum Op {
        /// A message on topic `t`; `conflate`: on the conflating route (key = topic).
        Enqueue { topic: u8, conflate: bool },
        /// Connection `lane` fills up to `want`; what it takes is written at once.
        Fill { lane: usize, want: usize },
        /// The broker acknowledges the `n` oldest rows written on `lane`.
        Ack { lane: usize, n: usize },
        /// Every connection's acknowledged rows are deleted.
        Settle,
        /// Connection `lane` ends; its next one starts from scratch.
        Lose { lane: usize },
        /// The relay dies and starts again on the same store.
        Crash,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0..TOPICS, prop::bool::weighted(0.3))
                .prop_map(|(topic, conflate)| Op::Enqueue { topic, conflate }),
            4 => (0..LANES, 1usize..6).prop_map(|(lane, want)| Op::Fill { lane, want }),
            4 => (0..LANES, 1usize..5).prop_map(|(lane, n)| Op::Ack { lane, n }),
            2 => Just(Op::Settle),
            1 => (0..LANES).prop_map(|lane| Op::Lose { lane }),
            1 => Just(Op::Crash),
        ]
    }

    /// One connection: its share of the rows and its bookkeeping.
    struct Lane {
        drainer: Drainer,
        drain: Drain,
    }

    struct Relay {
        queue: Queue,
        db: Db,
        thread: DbThread,
        lanes: Vec<Lane>,
    }

    fn route(conflate: bool) -> &'static str {
        if conflate {
            "state"
        } else {
            "up"
        }
    }

    async fn start(path: &std::path::Path) -> Relay {
        let (db, thread) = Db::open(path, Synchronous::Normal).expect("store");
        let queue = Queue::open_shared(
            db.clone(),
            QueueConfig {
                max_bytes: 1 << 30,
                when_full: WhenFull::RejectNew,
                urgent_reserve: 0,
            },
            Shares::new(LANES, Vec::new()),
        )
        .await
        .expect("queue");
        let lanes = (0..LANES)
            .map(|n| Lane {
                drainer: queue.drainer(n).expect("drainer"),
                drain: Drain::default(),
            })
            .collect();
        Relay {
            queue,
            db,
            thread,
            lanes,
        }
    }

    fn stop(relay: Relay) {
        let Relay {
            queue,
            db,
            thread,
            lanes,
        } = relay;
        // The drainers hold the store too: all must go before its thread can end.
        drop(lanes);
        drop(queue);
        drop(db);
        thread.join();
    }

    /// What the test knows: rows by id with their key and fate.
    #[derive(Default)]
    struct Model {
        /// id -> key (`route/topic`), in enqueue order.
        rows: BTreeMap<i64, String>,
        /// Rows replaced while waiting by a newer one of their key.
        replaced: BTreeSet<i64>,
        /// Rows the broker acknowledged.
        acked: BTreeSet<i64>,
        /// First delivery of each row, in order.
        first: Vec<i64>,
        delivered: BTreeSet<i64>,
    }

    impl Model {
        fn check(&self, relay: &Relay, store: &BTreeSet<i64>) -> Result<(), TestCaseError> {
            // Never in flight twice.
            let mut owner: HashMap<i64, usize> = HashMap::new();
            for (n, lane) in relay.lanes.iter().enumerate() {
                for id in lane.drain.in_flight.keys() {
                    if let Some(other) = owner.insert(*id, n) {
                        return Err(TestCaseError::fail(format!(
                            "row {id} in flight on connections {other} and {n}"
                        )));
                    }
                }
            }
            // Gone only after its acknowledgement (or its replacement).
            for id in self.rows.keys() {
                prop_assert!(
                    store.contains(id) || self.acked.contains(id) || self.replaced.contains(id),
                    "row {id} left the store unacknowledged"
                );
            }
            // First deliveries in enqueue order per key.
            let mut last: HashMap<&str, i64> = HashMap::new();
            for id in &self.first {
                let key = self.rows[id].as_str();
                if let Some(prev) = last.insert(key, *id) {
                    prop_assert!(prev < *id, "key {key}: row {id} delivered after row {prev}");
                }
            }
            Ok(())
        }
    }

    /// The ids in the store.
    async fn stored(queue: &Queue, rows: &BTreeMap<i64, String>) -> BTreeSet<i64> {
        let mut out = BTreeSet::new();
        for id in rows.keys() {
            if queue.is_queued(*id).await.expect("lookup") {
                out.insert(*id);
            }
        }
        out
    }

    fn message(topic: &str, n: usize) -> Message {
        Message {
            topic: topic.to_string(),
            payload: Bytes::from(format!("m{n}")),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Properties::default(),
            accepted: Stamp::now(),
            deadline: None,
        }
    }

    /// Fills connection `n` and writes what it took.
    fn fill(relay: &mut Relay, n: usize, want: usize, model: &mut Model) {
        let rewinds = relay.queue.rewinds();
        let lane = &mut relay.lanes[n];
        let batch = lane
            .drain
            .next_rows(&mut lane.drainer, rewinds, want)
            .expect("fetch");
        for entry in &batch.entries {
            lane.drain.sent(entry.id, 100);
            lane.drain.passed(entry, batch.out_of_order);
            // The link wrote it.
            lane.drain.queued.pop_front();
            lane.drain.wrote(entry.id);
            if model.delivered.insert(entry.id) {
                model.first.push(entry.id);
            }
        }
    }

    async fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("store.db");
        let mut relay = start(&path).await;
        let mut model = Model::default();
        for (i, op) in ops.into_iter().enumerate() {
            match op {
                Op::Enqueue { topic, conflate } => {
                    let topic = format!("trains/T1/up/t{topic}");
                    let key = conflate.then(|| topic.clone());
                    let entry = NewEntry {
                        route: route(conflate).into(),
                        priority: 5,
                        message: message(&topic, i),
                    };
                    let id = relay
                        .queue
                        .enqueue_keyed(entry, key)
                        .await
                        .expect("writer")
                        .expect("commit");
                    if conflate {
                        // The older waiting rows of the key are replaced.
                        let k = format!("{}/{topic}", route(true));
                        let before: Vec<i64> = model
                            .rows
                            .iter()
                            .filter(|(_, rk)| **rk == k)
                            .map(|(id, _)| *id)
                            .collect();
                        let store = stored(&relay.queue, &model.rows).await;
                        for old in before {
                            if !store.contains(&old) && !model.acked.contains(&old) {
                                model.replaced.insert(old);
                            }
                        }
                    }
                    model
                        .rows
                        .insert(id, format!("{}/{topic}", route(conflate)));
                }
                Op::Fill { lane, want } => fill(&mut relay, lane, want, &mut model),
                Op::Ack { lane, n } => {
                    let d = &mut relay.lanes[lane].drain;
                    let ids: Vec<i64> = d
                        .written
                        .iter()
                        .take(n)
                        .filter_map(|w| match w.1 {
                            Tag::Row(id) => Some(id),
                            Tag::Presence => None,
                        })
                        .collect();
                    for id in ids {
                        d.answered(id);
                        d.acked(id);
                        model.acked.insert(id);
                    }
                }
                Op::Settle => {
                    for lane in &mut relay.lanes {
                        lane.drain.finish_acks(&relay.queue).await;
                    }
                }
                Op::Lose { lane } => {
                    let l = &mut relay.lanes[lane];
                    l.drain.finish_acks(&relay.queue).await;
                    l.drain = Drain::default();
                }
                Op::Crash => {
                    // Deletes already submitted may or may not commit: either is allowed.
                    stop(relay);
                    relay = start(&path).await;
                }
            }
            let store = stored(&relay.queue, &model.rows).await;
            model.check(&relay, &store)?;
        }
        // Drain to the end: every committed row is delivered at least once.
        for _ in 0..200 {
            for n in 0..LANES {
                fill(&mut relay, n, 8, &mut model);
                let d = &mut relay.lanes[n].drain;
                let ids: Vec<i64> = d
                    .written
                    .iter()
                    .filter_map(|w| match w.1 {
                        Tag::Row(id) => Some(id),
                        Tag::Presence => None,
                    })
                    .collect();
                for id in ids {
                    d.answered(id);
                    d.acked(id);
                    model.acked.insert(id);
                }
                d.finish_acks(&relay.queue).await;
            }
            if stored(&relay.queue, &model.rows).await.is_empty() {
                break;
            }
        }
        let store = stored(&relay.queue, &model.rows).await;
        model.check(&relay, &store)?;
        prop_assert!(store.is_empty(), "rows never drained: {store:?}");
        for id in model.rows.keys() {
            prop_assert!(
                model.delivered.contains(id) || model.replaced.contains(id),
                "row {id} was never delivered"
            );
        }
        stop(relay);
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        #[test]
        fn drains_at_least_once_in_order_never_twice_at_a_time(
            ops in prop::collection::vec(op(), 1..60)
        ) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(run(ops))?;
        }
    }
}
