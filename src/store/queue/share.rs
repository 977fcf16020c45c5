//! Shares: which of the parallel uplink connections carries a row.
//!
//! # Contract
//! - The queue is split into [`Shares::count`] shares, one per uplink connection; every row
//!   belongs to exactly one (column `share`, schema migration 7). A connection fetches its
//!   share through the index `(share, priority, id)`, so it never looks at another share's
//!   rows, and a commit wakes only the connection whose share it touched.
//! - Rows with the same *order key* are always in one share while any of them is in the store,
//!   so they travel on one connection, in order: the key is the topic (MQTT's ordered-topic
//!   rule; also on conflating routes, whatever their conflation key), or the route for a route
//!   with `order = "route"` (FIFO across its topics). The key is stored as a 64-bit hash
//!   (column `order_key`, indexed): two keys that collide merely share a connection.
//! - A key with no row in the store joins the share holding the fewest rows (ties: the lowest
//!   share after the one chosen last), so a live topic does not queue behind another topic's
//!   backlog while a connection is free of it, and a handful of topics spread over every
//!   connection. All earlier rows of such a key have left the store: acknowledged by the
//!   central broker, or (rarely) expired, dropped or dead-lettered; only in that last case can
//!   a row still be in flight on its old connection when the key moves.
//! - The conflation delete of [`super::Queue::enqueue_keyed`] runs after the share is chosen,
//!   so a replaced row that is in flight keeps the key on its connection.
//! - Changing the number of shares or the FIFO routes takes effect at [`super::Queue::open`]:
//!   every waiting row is assigned again, in id order, by the same rule (nothing is in flight
//!   then).

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use rusqlite::{params, Connection, OptionalExtension};

use super::totals::{saturating_sub, Shared};
use super::StoreError;

/// The most shares (`uplink.connections` is at most 16).
pub const MAX_SHARES: usize = 16;

/// `meta` key of the assignment rule the rows' shares were computed with.
const ASSIGNMENT_KEY: &str = "share_assignment";

/// How the queue is split between the uplink connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shares {
    /// 1 to [`MAX_SHARES`].
    pub count: usize,
    /// Uplink routes that keep their order across topics (`order = "route"`), by name.
    pub fifo_routes: Vec<String>,
}

impl Default for Shares {
    fn default() -> Shares {
        Shares {
            count: 1,
            fifo_routes: Vec::new(),
        }
    }
}

impl Shares {
    /// `count` shares (clamped to 1..=[`MAX_SHARES`]); `fifo_routes` keep their order across
    /// topics.
    pub fn new(count: usize, fifo_routes: Vec<String>) -> Shares {
        Shares {
            count: count.clamp(1, MAX_SHARES),
            fifo_routes,
        }
    }

    /// The order key of a row of `route` on `topic` (see the module contract).
    pub fn order_key(&self, route: &str, topic: &str) -> i64 {
        let hash = if self.fifo_routes.iter().any(|r| r == route) {
            stable_hash(&[b"route", route.as_bytes()])
        } else {
            stable_hash(&[b"topic", topic.as_bytes()])
        };
        // Stored as SQLite's signed integer; the bits are what matter.
        hash as i64
    }

    /// What a store must have been assigned with for its `share` columns to be valid now.
    fn signature(&self) -> String {
        let mut fifo = self.fifo_routes.clone();
        fifo.sort();
        format!("v1 {} {}", self.count, fifo.join("\u{1f}"))
    }
}

/// A 64-bit hash stable across runs and builds (the standard library's is randomly keyed):
/// FNV-1a over the parts with a separator, then the 64-bit finaliser of MurmurHash3, so that
/// every input bit reaches every output bit (FNV-1a alone reduced modulo a small count keeps
/// only the low bits of each byte).
pub fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in part.iter().chain(std::iter::once(&0xff)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

impl Shared {
    /// The share of a new row with `order_key`, on the writer thread: the share of the key's
    /// rows in the store, else the least loaded share.
    pub(super) fn share_for(&self, conn: &Connection, order_key: i64) -> Result<u16, StoreError> {
        if self.shares.count == 1 {
            return Ok(0);
        }
        let held: Option<i64> = conn
            .prepare_cached("SELECT share FROM uplink_queue WHERE order_key = ?1 LIMIT 1")?
            .query_row([order_key], |r| r.get(0))
            .optional()?;
        if let Some(share) = held {
            if let Ok(share) = u16::try_from(share) {
                if usize::from(share) < self.shares.count {
                    return Ok(share);
                }
            }
        }
        Ok(self.least_loaded())
    }

    /// The share with the fewest rows; among equals, the first after the last one chosen, so
    /// keys arriving at an empty queue go round the connections.
    fn least_loaded(&self) -> u16 {
        let count = self.shares.count;
        let start = (self.last_pick.load(Ordering::Relaxed) as usize + 1) % count;
        let mut best = start;
        let mut fewest = u64::MAX;
        for i in 0..count {
            let s = (start + i) % count;
            let rows = self.share_rows[s].load(Ordering::Acquire);
            if rows < fewest {
                fewest = rows;
                best = s;
            }
        }
        self.last_pick.store(best as u32, Ordering::Relaxed);
        best as u16
    }

    /// Counts rows added to `share`.
    pub(super) fn share_added(&self, share: u16, rows: u64) {
        if let Some(n) = self.share_rows.get(usize::from(share)) {
            n.fetch_add(rows, Ordering::AcqRel);
        }
    }

    /// Counts rows removed from `share` (never below zero).
    pub(super) fn share_removed(&self, share: u16, rows: u64) {
        if let Some(n) = self.share_rows.get(usize::from(share)) {
            saturating_sub(n, rows);
        }
    }

    /// Re-reads the rows per share from SQL (one aggregate over the share index).
    pub(super) fn load_share_rows(&self, conn: &Connection) -> Result<(), StoreError> {
        let mut counts = [0u64; MAX_SHARES];
        let mut st =
            conn.prepare_cached("SELECT share, COUNT(*) FROM uplink_queue GROUP BY share")?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let (share, n): (i64, i64) = (r.get(0)?, r.get(1)?);
            if let Some(c) = usize::try_from(share).ok().and_then(|s| counts.get_mut(s)) {
                *c = n.max(0) as u64;
            }
        }
        for (slot, n) in self.share_rows.iter().zip(counts) {
            slot.store(n, Ordering::Release);
        }
        Ok(())
    }

    /// Wakes the connection of `share` (or every connection for `None`).
    pub(super) fn notify(&self, share: Option<u16>) {
        match share {
            Some(s) => {
                if let Some(tx) = self.commits.get(usize::from(s)) {
                    tx.send_modify(|n| *n += 1);
                }
            }
            None => {
                for tx in &self.commits {
                    tx.send_modify(|n| *n += 1);
                }
            }
        }
    }
}

/// Removes rows counted per share: `(share, rows)` pairs, as a `GROUP BY share` gives them.
pub(super) fn removed_per_share(shared: &Shared, groups: &[(u16, u64)]) {
    for &(share, rows) in groups {
        shared.share_removed(share, rows);
    }
}

/// At open: when the rows were assigned under another rule (another number of shares or other
/// FIFO routes, or a store from before shares), assigns every row again, in id order, by the
/// rule of the module contract. Runs as one writer job (one transaction); nothing is in flight
/// at open.
pub(super) fn reassign_if_changed(conn: &Connection, shares: &Shares) -> Result<u64, StoreError> {
    let signature = shares.signature();
    let stored: Option<String> = conn
        .query_row(
            "SELECT value FROM meta WHERE key = ?1",
            [ASSIGNMENT_KEY],
            |r| r.get(0),
        )
        .optional()?;
    if stored.as_deref() == Some(signature.as_str()) {
        return Ok(0);
    }
    let mut read = conn.prepare("SELECT id, route, topic FROM uplink_queue ORDER BY id")?;
    let mut update =
        conn.prepare("UPDATE uplink_queue SET share = ?2, order_key = ?3 WHERE id = ?1")?;
    let mut of_key: HashMap<i64, u16> = HashMap::new();
    let mut load = [0u64; MAX_SHARES];
    let mut next = 0usize;
    let mut moved = 0u64;
    let mut rows = read.query([])?;
    while let Some(r) = rows.next()? {
        let id: i64 = r.get(0)?;
        // Damaged text is the scan's to report and delete; any key will do here.
        let route = r.get::<_, String>(1).unwrap_or_default();
        let topic = r.get::<_, String>(2).unwrap_or_default();
        let key = shares.order_key(&route, &topic);
        let share = *of_key.entry(key).or_insert_with(|| {
            let s = (0..shares.count)
                .map(|i| (next + i) % shares.count)
                .min_by_key(|&s| load[s])
                .unwrap_or(0);
            next = (s + 1) % shares.count;
            s as u16
        });
        load[usize::from(share)] += 1;
        update.execute(params![id, share, key])?;
        moved += 1;
    }
    conn.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
        [ASSIGNMENT_KEY, signature.as_str()],
    )?;
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_pinned() {
        // Golden values, computed apart from this code (FNV-1a with a 0xff separator, then
        // MurmurHash3's fmix64): stored rows carry these hashes, so a change of the function
        // must come with a new assignment signature.
        assert_eq!(stable_hash(&[]), 0xefd0_1f60_ba99_2926);
        assert_eq!(stable_hash(&[b"topic", b"up/a"]), 0xcab1_eb28_d534_5b0b);
        assert_eq!(
            stable_hash(&[b"topic", b"trains/T1/up/pos/1"]),
            0xb341_e112_4ad5_5b34
        );
        // The separator keeps the parts apart.
        assert_ne!(stable_hash(&[b"up", b"a/b"]), stable_hash(&[b"up/a", b"b"]));
    }

    #[test]
    fn every_input_bit_reaches_the_low_bits() {
        // FNV-1a alone, reduced modulo 4, depends only on the low two bits of each byte:
        // `up/a`, `up/e`, `up/i` and `up/m` landed together. Mixed, flipping any one bit of the
        // input changes each of the low 8 output bits about half the time.
        let base = b"trains/T1/up/pos/a".to_vec();
        let mut flips = [0u32; 8];
        let mut trials = 0u32;
        for byte in 0..base.len() {
            for bit in 0..8 {
                let mut changed = base.clone();
                changed[byte] ^= 1 << bit;
                let d = stable_hash(&[&base]) ^ stable_hash(&[&changed]);
                for (out, f) in flips.iter_mut().enumerate() {
                    *f += ((d >> out) & 1) as u32;
                }
                trials += 1;
            }
        }
        for (out, f) in flips.iter().enumerate() {
            let share = f64::from(*f) / f64::from(trials);
            assert!((0.35..0.65).contains(&share), "output bit {out}: {share}");
        }
    }

    #[test]
    fn fifo_routes_key_by_route_others_by_topic() {
        let s = Shares::new(4, vec!["events".into()]);
        assert_eq!(s.order_key("events", "a"), s.order_key("events", "b"));
        assert_ne!(s.order_key("up", "a"), s.order_key("up", "b"));
        // The topic decides, not the route: one topic is one key whatever route carried it.
        assert_eq!(s.order_key("up", "a"), s.order_key("state", "a"));
    }
}

#[cfg(test)]
mod queue_tests {
    //! The contract on a real store: shares fetched apart, keys kept together, new keys to the
    //! least loaded share, a changed split assigned again at open.

    use std::collections::{BTreeMap, BTreeSet};

    use super::super::tests::{close, config, msg, new_entry};
    use super::*;
    use crate::clock::Stamp;
    use crate::store::queue::{NewEntry, Queue, QueueConfig, WhenFull};
    use crate::store::{Db, DbThread, Synchronous};

    async fn open(path: &std::path::Path, shares: Shares) -> (Queue, Db, DbThread) {
        let (db, thread) = Db::open(path, Synchronous::Normal).expect("store");
        let config: QueueConfig = config(1 << 30, WhenFull::RejectNew);
        let q = Queue::open_shared(db.clone(), config, shares)
            .await
            .expect("queue");
        (q, db, thread)
    }

    fn entry(route: &str, topic: &str) -> NewEntry {
        new_entry(route, 5, msg(topic, 1, Stamp::now(), None))
    }

    /// Share of every row, by topic.
    async fn shares_by_topic(q: &Queue) -> BTreeMap<String, BTreeSet<usize>> {
        let mut out: BTreeMap<String, BTreeSet<usize>> = BTreeMap::new();
        for share in 0..q.share_count() {
            let mut d = q.drainer(share).expect("drainer");
            let batch = d.next_batch(None, &|_| false, 100_000).expect("fetch");
            for e in batch.entries {
                out.entry(e.message.topic).or_default().insert(share);
            }
        }
        out
    }

    #[tokio::test]
    async fn a_share_without_rows_looks_at_none_of_the_others_backlog() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (q, db, t) = open(&dir.path().join("s.db"), Shares::new(4, vec![])).await;
        // 100,000 rows of one topic: all in one share. Submitted together, committed in
        // batches.
        let pending: Vec<_> = (0..100_000)
            .map(|_| q.enqueue(entry("up", "trains/T1/up/diag")))
            .collect();
        for p in pending {
            p.await.expect("writer").expect("commit");
        }
        let busy = (0..4)
            .find(|&s| {
                let mut d = q.drainer(s).expect("drainer");
                !d.next_batch(None, &|_| false, 1)
                    .expect("fetch")
                    .entries
                    .is_empty()
            })
            .expect("some share holds the rows");
        for share in (0..4).filter(|&s| s != busy) {
            let mut d = q.drainer(share).expect("drainer");
            for _ in 0..10 {
                assert!(d
                    .next_batch(None, &|_| false, 1024)
                    .expect("fetch")
                    .entries
                    .is_empty());
            }
            assert_eq!(d.rows_visited(), 0, "share {share}");
        }
        // The busy share's fetch stops after its batch.
        let mut d = q.drainer(busy).expect("drainer");
        let batch = d.next_batch(None, &|_| false, 1024).expect("fetch");
        assert_eq!(batch.entries.len(), 1024);
        assert!(d.rows_visited() <= 1024, "{}", d.rows_visited());
        drop(d);
        close(q, db, t);
    }

    #[tokio::test]
    async fn realistic_topic_sets_spread_evenly_and_each_topic_stays_in_one_share() {
        let sets: Vec<Vec<String>> = vec![
            ('a'..='h').map(|c| format!("trains/T1/up/{c}")).collect(),
            (1..=16).map(|n| format!("trains/T1/up/pos/{n}")).collect(),
            // The built-in routes' topics and a few of a driver app's.
            [
                "trains/T1/presence/ipad-1",
                "trains/T1/status",
                "trains/T1/status/health",
                "trains/T1/up/ack",
                "trains/T1/up/position",
                "trains/T1/up/diag",
                "trains/T1/up/alarm",
                "trains/T1/up/report",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        ];
        for topics in sets {
            let dir = tempfile::tempdir().expect("temp dir");
            let (q, db, t) = open(&dir.path().join("s.db"), Shares::new(4, vec![])).await;
            // Interleaved, as live traffic comes.
            for round in 0..5 {
                for topic in &topics {
                    q.enqueue(entry("up", topic))
                        .await
                        .expect("writer")
                        .expect("commit");
                    let _ = round;
                }
            }
            let by_topic = shares_by_topic(&q).await;
            let mut keys_per_share = [0usize; 4];
            for (topic, shares) in &by_topic {
                assert_eq!(shares.len(), 1, "{topic} in shares {shares:?}");
                keys_per_share[*shares.iter().next().expect("one")] += 1;
            }
            let (min, max) = (
                keys_per_share.iter().min().copied().unwrap_or(0),
                keys_per_share.iter().max().copied().unwrap_or(0),
            );
            assert!(
                max - min <= 1,
                "{} topics spread as {keys_per_share:?}",
                topics.len()
            );
            close(q, db, t);
        }
    }

    #[tokio::test]
    async fn a_new_topic_joins_the_least_loaded_share_and_a_waiting_topic_stays() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (q, db, t) = open(&dir.path().join("s.db"), Shares::new(4, vec![])).await;
        for _ in 0..50 {
            q.enqueue(entry("up", "up/backlog")).await.unwrap().unwrap();
        }
        let backlog = shares_by_topic(&q).await["up/backlog"].clone();
        // Live topics avoid the backlog's share, and each stays where it started while it
        // has rows waiting, however loaded its share gets.
        for n in 0..6 {
            let topic = format!("up/live/{n}");
            q.enqueue(entry("up", &topic)).await.unwrap().unwrap();
        }
        for _ in 0..20 {
            q.enqueue(entry("up", "up/live/0")).await.unwrap().unwrap();
        }
        let by_topic = shares_by_topic(&q).await;
        for n in 0..6 {
            let s = &by_topic[&format!("up/live/{n}")];
            assert!(
                s.is_disjoint(&backlog),
                "up/live/{n} queues behind the backlog"
            );
        }
        assert_eq!(by_topic["up/live/0"].len(), 1);
        close(q, db, t);
    }

    #[tokio::test]
    async fn conflation_keys_do_not_split_a_topic_and_fifo_routes_stay_whole() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (q, db, t) = open(
            &dir.path().join("s.db"),
            Shares::new(4, vec!["events".into()]),
        )
        .await;
        // One topic, conflated by a user property with many keys: one share.
        for n in 0..12 {
            q.enqueue_keyed(entry("state", "up/doors"), Some(format!("door-{n}")))
                .await
                .unwrap()
                .unwrap();
        }
        // A FIFO route's topics: one share between them.
        for n in 0..12 {
            q.enqueue(entry("events", &format!("up/ev/{n}")))
                .await
                .unwrap()
                .unwrap();
        }
        let by_topic = shares_by_topic(&q).await;
        assert_eq!(by_topic["up/doors"].len(), 1);
        let fifo: BTreeSet<usize> = (0..12)
            .flat_map(|n| by_topic[&format!("up/ev/{n}")].clone())
            .collect();
        assert_eq!(fifo.len(), 1, "{fifo:?}");
        close(q, db, t);
    }

    #[tokio::test]
    async fn a_changed_split_is_assigned_again_at_open_keeping_order_per_topic() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("s.db");
        let (q, db, t) = open(&path, Shares::new(4, vec![])).await;
        let mut order: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        for round in 0..4 {
            for n in 0..8 {
                let topic = format!("up/t{n}");
                let id = q.enqueue(entry("up", &topic)).await.unwrap().unwrap();
                order.entry(topic).or_default().push(id);
                let _ = round;
            }
        }
        close(q, db, t);
        let (q, db, t) = open(&path, Shares::new(2, vec![])).await;
        let mut seen: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        let mut per_share = [0usize; 2];
        for (share, count) in per_share.iter_mut().enumerate() {
            let mut d = q.drainer(share).expect("drainer");
            for e in d.next_batch(None, &|_| false, 1000).expect("fetch").entries {
                seen.entry(e.message.topic).or_default().push(e.id);
                *count += 1;
            }
        }
        // Every row in one of the two shares, each topic whole and in order.
        assert_eq!(seen, order);
        assert_eq!(per_share.iter().sum::<usize>(), 32);
        assert!(per_share.iter().all(|&n| n == 16), "{per_share:?}");
        let by_topic = shares_by_topic(&q).await;
        assert!(by_topic.values().all(|s| s.len() == 1));
        close(q, db, t);
    }
}
