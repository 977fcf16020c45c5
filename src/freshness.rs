//! Outdated-message suppression: a route that declares a version source drops every message
//! whose version is not newer than the newest one already seen for the same (route, key).
//!
//! Why: QoS 1 resends after a reconnect and reordering across a tunnel can bring back an older
//! speed restriction after a newer one; a driver must never see it. The check runs where a
//! message enters the relay: at ingest for the uplink (before it is queued) and before inject
//! for the downlink.
//!
//! Rules:
//! - The version is read from a v5 user property (the last one of that name) or a top-level
//!   field of a JSON object payload (number or string). Two versions compare as integers if
//!   both parse as `i64`, else as strings (byte order, so ISO 8601 timestamps in one format
//!   compare correctly).
//! - A message without a readable version passes and changes nothing: a missing property must
//!   not silence a topic.
//! - The newest version per (route, key) is kept in memory and in the store (table
//!   `route_versions`), so suppression holds across restarts. The version row is written by the
//!   same store job as the message it admits ([`Admission::write`], run inside the uplink
//!   enqueue or the local broker's inject), so both commit in one transaction or neither does:
//!   a kill between two commits cannot leave a version stored whose message is not. One row per
//!   key is kept forever; keys are meant to be a bounded set (topics of a state tree, vehicle
//!   ids).
//! - A message is judged outdated only against a *committed* version. A version admitted but
//!   not yet committed is pending: a message not newer than it, but newer than the committed
//!   one, must wait for that commit ([`Check::Wait`], [`Freshness::admit_committed`]); if the
//!   commit fails (store full, refused to the iPad; an I/O error; the central broker will
//!   redeliver) the pending version is forgotten and the waiting message is judged again, so
//!   the retry of a message that could not be stored is not mistaken for a duplicate and an
//!   acknowledged resend is never dropped in favour of a copy that was lost.

use std::cmp::Ordering as CmpOrdering;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection};
use tokio::sync::watch;

use crate::clock::Stamp;
use crate::config::{Direction, VersionSource};
use crate::message::Message;
use crate::route::Route;
use crate::store::{Db, StoreError, StoreWrite};

/// A message's version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Version {
    Int(i64),
    Text(String),
}

impl Version {
    /// Parses stored or received text: an integer if it is one, else the text.
    pub fn parse(text: &str) -> Version {
        match text.trim().parse::<i64>() {
            Ok(n) => Version::Int(n),
            Err(_) => Version::Text(text.to_string()),
        }
    }

    fn text(&self) -> String {
        match self {
            Version::Int(n) => n.to_string(),
            Version::Text(t) => t.clone(),
        }
    }

    /// Integers numerically when both are integers, else the texts bytewise.
    pub fn compare(&self, other: &Version) -> CmpOrdering {
        match (self, other) {
            (Version::Int(a), Version::Int(b)) => a.cmp(b),
            _ => self.text().cmp(&other.text()),
        }
    }
}

/// Reads the version of `msg` as the route declares it; `None` when there is none.
pub fn version_of(source: &VersionSource, msg: &Message) -> Option<Version> {
    match source {
        VersionSource::UserProperty(name) => msg
            .properties
            .user_properties
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| Version::parse(v)),
        VersionSource::JsonField(field) => {
            let value: serde_json::Value = serde_json::from_slice(&msg.payload).ok()?;
            match value.get(field)? {
                serde_json::Value::Number(n) => Some(match n.as_i64() {
                    Some(i) => Version::Int(i),
                    None => Version::Text(n.to_string()),
                }),
                serde_json::Value::String(s) => Some(Version::parse(s)),
                _ => None,
            }
        }
    }
}

/// The answer of [`Freshness::check`].
#[derive(Debug)]
pub enum Check {
    /// Pass it on; `Some` when a version was admitted: write it with the message
    /// ([`Admission::write`]) and report the outcome ([`Admission::settle`]).
    Fresh(Option<Admission>),
    /// Drop it: not newer than the newest committed version of its key (counted).
    Outdated,
    /// Not newer than a version whose commit is still pending: check again once the receiver
    /// changes (or use [`Freshness::admit_committed`]).
    Wait(watch::Receiver<u64>),
}

/// Versions of one (route, key): the committed one and those admitted since, oldest first
/// (each newer than the one before, all newer than the committed one).
#[derive(Debug, Default)]
struct Slot {
    committed: Option<Version>,
    pending: Vec<Version>,
}

impl Slot {
    fn newest(&self) -> Option<&Version> {
        self.pending.last().or(self.committed.as_ref())
    }
}

/// The in-memory state shared by [`Freshness`] and its outstanding [`Admission`]s.
struct State {
    slots: Mutex<HashMap<(String, String), Slot>>,
    /// Bumped whenever a pending version settles; [`Check::Wait`]ers watch it.
    settled: watch::Sender<u64>,
}

impl State {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Slot>> {
        self.slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// An admitted, not yet committed version. Dropped without [`Admission::settle`], it counts
/// as not committed.
pub struct Admission {
    state: Arc<State>,
    route: String,
    key: String,
    version: Version,
    settled: bool,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Admission({} {} {})",
            self.route,
            self.key,
            self.version.text()
        )
    }
}

impl Admission {
    /// The version row's write, to run inside the store job that stores the message, so that
    /// both commit together or not at all.
    pub fn write(&self) -> StoreWrite {
        let (route, key, text) = (self.route.clone(), self.key.clone(), self.version.text());
        let wall = Stamp::now().wall_ms;
        Box::new(move |conn: &Connection| {
            conn.prepare_cached(
                "INSERT INTO route_versions (route, key, version, updated_wall) \
                 VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (route, key) DO UPDATE SET version = ?3, updated_wall = ?4",
            )?
            .execute(params![route, key, text, wall])?;
            Ok(())
        })
    }

    /// Reports whether the job carrying [`Admission::write`] committed: the version becomes
    /// the committed one, or is forgotten (the sender's retry must pass).
    pub fn settle(mut self, committed: bool) {
        self.finish(committed);
    }

    fn finish(&mut self, committed: bool) {
        if self.settled {
            return;
        }
        self.settled = true;
        {
            let mut slots = self.state.lock();
            let slot_key = (
                std::mem::take(&mut self.route),
                std::mem::take(&mut self.key),
            );
            if let Some(slot) = slots.get_mut(&slot_key) {
                if let Some(i) = slot.pending.iter().position(|v| *v == self.version) {
                    slot.pending.remove(i);
                }
                if committed
                    && slot
                        .committed
                        .as_ref()
                        .map_or(true, |c| self.version.compare(c) == CmpOrdering::Greater)
                {
                    slot.committed = Some(self.version.clone());
                }
            }
        }
        self.state.settled.send_modify(|n| *n = n.wrapping_add(1));
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.finish(false);
    }
}

/// The newest version per (route, key), with its durable copy, and the count of suppressed
/// messages. Shared by the ingest hook (uplink) and the downlink.
pub struct Freshness {
    state: Arc<State>,
    suppressed_up: AtomicU64,
    suppressed_down: AtomicU64,
}

impl Freshness {
    /// Loads the versions kept by earlier runs.
    pub async fn load(db: Db) -> Result<Freshness, StoreError> {
        let rows = db
            .run(|conn| {
                let mut st = conn.prepare("SELECT route, key, version FROM route_versions")?;
                let rows = st
                    .query_map([], |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, String>(2)?,
                        ))
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            })
            .await?;
        let slots = rows
            .into_iter()
            .map(|(route, key, v)| {
                let slot = Slot {
                    committed: Some(Version::parse(&v)),
                    pending: Vec::new(),
                };
                ((route, key), slot)
            })
            .collect();
        Ok(Freshness {
            state: Arc::new(State {
                slots: Mutex::new(slots),
                settled: watch::channel(0).0,
            }),
            suppressed_up: AtomicU64::new(0),
            suppressed_down: AtomicU64::new(0),
        })
    }

    /// Judges `msg` (seen on `route`'s source side) against the versions of its key: newer
    /// than all of them → admitted (pending until settled); not newer than the committed one →
    /// outdated (counted); else it must wait for a pending commit.
    pub fn check(&self, route: &Route, msg: &Message) -> Check {
        let Some(source) = &route.version else {
            return Check::Fresh(None);
        };
        let Some(version) = version_of(source, msg) else {
            return Check::Fresh(None);
        };
        let key = route.key_of(msg);
        // Subscribed before the look so that a settle after it wakes the waiter.
        let settled = self.state.settled.subscribe();
        let mut slots = self.state.lock();
        let slot = slots.entry((route.name.clone(), key.clone())).or_default();
        let newer_than = |v: Option<&Version>| {
            v.map_or(true, |seen| version.compare(seen) == CmpOrdering::Greater)
        };
        if newer_than(slot.newest()) {
            slot.pending.push(version.clone());
            return Check::Fresh(Some(Admission {
                state: Arc::clone(&self.state),
                route: route.name.clone(),
                key,
                version,
                settled: false,
            }));
        }
        if !newer_than(slot.committed.as_ref()) {
            let seen = slot
                .committed
                .as_ref()
                .map(Version::text)
                .unwrap_or_default();
            drop(slots);
            match route.direction {
                Direction::Up => &self.suppressed_up,
                Direction::Down => &self.suppressed_down,
            }
            .fetch_add(1, Ordering::Relaxed);
            log::debug!(
                "route {}: dropped outdated message on '{}' (version {} <= {seen})",
                route.name,
                msg.topic,
                version.text(),
            );
            return Check::Outdated;
        }
        Check::Wait(settled)
    }

    /// [`Freshness::check`] that waits out pending commits: `None` when `msg` is outdated
    /// against a committed version, else its admission (if it carries a version).
    pub async fn admit_committed(&self, route: &Route, msg: &Message) -> Option<Option<Admission>> {
        loop {
            match self.check(route, msg) {
                Check::Fresh(admission) => return Some(admission),
                Check::Outdated => return None,
                Check::Wait(mut settled) => {
                    // The sender lives as long as `self`, so this cannot fail; were it to,
                    // checking again still gives the answer once the commit settles.
                    if settled.changed().await.is_err() {
                        log::debug!("freshness: the commit watch closed; checking again");
                    }
                }
            }
        }
    }

    /// Outdated messages dropped at ingest since start (acknowledged to the iPad, not queued).
    pub fn suppressed_up(&self) -> u64 {
        self.suppressed_up.load(Ordering::Relaxed)
    }

    /// Outdated messages from the central broker since start, acknowledged and not injected.
    pub fn suppressed_down(&self) -> u64 {
        self.suppressed_down.load(Ordering::Relaxed)
    }

    /// Messages dropped as outdated since start, both directions.
    #[cfg(test)]
    pub fn suppressed(&self) -> u64 {
        self.suppressed_up.load(Ordering::Relaxed) + self.suppressed_down.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_compare_numerically_else_as_text() {
        assert_eq!(
            Version::parse("9").compare(&Version::parse("10")),
            CmpOrdering::Less
        );
        assert_eq!(
            Version::parse("-3").compare(&Version::parse("2")),
            CmpOrdering::Less
        );
        assert_eq!(
            Version::parse("2026-01-02T00:00:00Z").compare(&Version::parse("2026-01-01T23:59:59Z")),
            CmpOrdering::Greater
        );
        // Mixed: compared as text.
        assert_eq!(
            Version::parse("9").compare(&Version::parse("a")),
            CmpOrdering::Less
        );
    }

    #[test]
    fn reads_json_fields_and_user_properties() {
        let mut m = Message {
            topic: "t".into(),
            payload: bytes::Bytes::from_static(br#"{"ts": 17, "s": "x"}"#),
            qos: crate::message::QoS::AtLeastOnce,
            retain: false,
            properties: Default::default(),
            accepted: Stamp::now(),
            deadline: None,
        };
        let json = |f: &str| VersionSource::JsonField(f.into());
        assert_eq!(version_of(&json("ts"), &m), Some(Version::Int(17)));
        assert_eq!(version_of(&json("s"), &m), Some(Version::Text("x".into())));
        assert_eq!(version_of(&json("nope"), &m), None);
        m.properties.user_properties = vec![("seq".into(), "3".into()), ("seq".into(), "4".into())];
        assert_eq!(
            version_of(&VersionSource::UserProperty("seq".into()), &m),
            Some(Version::Int(4))
        );
        m.payload = bytes::Bytes::from_static(b"not json");
        assert_eq!(version_of(&json("ts"), &m), None);
    }

    fn route_with_version() -> crate::route::Routes {
        let cfg = crate::config::Config::parse(
            "train_id = \"T1\"\n[[route]]\nname = \"r\"\ndirection = \"up\"\nlocal = \"a/#\"\nremote = \"b/#\"\nversion = { user_property = \"seq\" }\n",
            std::path::Path::new("t.toml"),
        )
        .unwrap();
        crate::route::Routes::from_config(&cfg)
    }

    fn m(topic: &str, seq: &str) -> Message {
        Message {
            topic: topic.into(),
            payload: bytes::Bytes::from_static(b"p"),
            qos: crate::message::QoS::AtLeastOnce,
            retain: false,
            properties: crate::message::Properties {
                user_properties: vec![("seq".into(), seq.into())],
                ..Default::default()
            },
            accepted: Stamp::now(),
            deadline: None,
        }
    }

    /// Admits `msg` and commits its version as the message's store job would; false if it is
    /// outdated.
    async fn admit(f: &Freshness, db: &Db, route: &Route, msg: &Message) -> bool {
        match f.check(route, msg) {
            Check::Fresh(Some(a)) => {
                let write = a.write();
                db.run(write).await.unwrap();
                a.settle(true);
                true
            }
            Check::Fresh(None) => true,
            Check::Outdated => false,
            Check::Wait(_) => panic!("nothing is pending in this test"),
        }
    }

    async fn open_queue(db: &Db, max_bytes: u64) -> crate::store::queue::Queue {
        let config = crate::store::queue::QueueConfig {
            max_bytes,
            when_full: crate::store::queue::WhenFull::RejectNew,
            urgent_reserve: 0,
        };
        crate::store::queue::Queue::open(db.clone(), config)
            .await
            .unwrap()
    }

    fn entry(msg: &Message) -> crate::store::queue::NewEntry {
        crate::store::queue::NewEntry {
            route: "r".into(),
            priority: 5,
            message: msg.clone(),
        }
    }

    #[tokio::test]
    async fn newest_versions_survive_a_restart_and_outdated_ones_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let routes = route_with_version();
        let (route, _) = routes.up("a/x").unwrap();
        {
            let (db, thread) = Db::open(&path, crate::store::Synchronous::Normal).unwrap();
            let f = Freshness::load(db.clone()).await.unwrap();
            assert!(admit(&f, &db, route, &m("a/x", "7")).await);
            assert!(admit(&f, &db, route, &m("a/x", "9")).await);
            assert!(
                !admit(&f, &db, route, &m("a/x", "7")).await,
                "a resend of 7 after 9"
            );
            assert!(
                !admit(&f, &db, route, &m("a/x", "9")).await,
                "equal is not newer"
            );
            assert!(admit(&f, &db, route, &m("a/y", "1")).await, "another key");
            assert_eq!(f.suppressed(), 2);
            drop(f);
            drop(db);
            thread.join();
        }
        let (db, thread) = Db::open(&path, crate::store::Synchronous::Normal).unwrap();
        let f = Freshness::load(db.clone()).await.unwrap();
        assert!(!admit(&f, &db, route, &m("a/x", "8")).await, "9 was stored");
        assert!(admit(&f, &db, route, &m("a/x", "10")).await);
        assert_eq!(f.suppressed(), 1);

        // A message that could not be stored is taken back: its retry passes.
        let Check::Fresh(Some(a)) = f.check(route, &m("a/x", "11")) else {
            panic!("11 is fresh");
        };
        a.settle(false);
        assert!(
            admit(&f, &db, route, &m("a/x", "11")).await,
            "the retry of 11 passes"
        );
        // An admission dropped unsettled counts as not committed.
        let Check::Fresh(Some(a)) = f.check(route, &m("a/x", "12")) else {
            panic!("12 is fresh");
        };
        drop(a);
        assert!(admit(&f, &db, route, &m("a/x", "12")).await);
        drop(f);
        drop(db);
        thread.join();
    }

    /// The kill-between-commits window: a version admitted but whose message never committed
    /// (the process died first, or the store refused the row) is not in the store after a
    /// restart, so the iPad's resend passes. Before the version row moved into the message's
    /// own job, `check` committed it on its own, and the resend here was judged outdated.
    #[tokio::test]
    async fn a_version_is_stored_only_with_its_message() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let routes = route_with_version();
        let (route, _) = routes.up("a/x").unwrap();
        {
            let (db, thread) = Db::open(&path, crate::store::Synchronous::Normal).unwrap();
            let f = Freshness::load(db.clone()).await.unwrap();
            let queue = open_queue(&db, 1 << 20).await;
            // Admitted, then killed before the message's job ran.
            let Check::Fresh(Some(lost)) = f.check(route, &m("a/x", "7")) else {
                panic!("7 is fresh");
            };
            // Admitted with a row the store refuses (larger than the whole store).
            let mut big = m("a/y", "3");
            big.payload = bytes::Bytes::from(vec![b'x'; 2 << 20]);
            let Check::Fresh(Some(refused)) = f.check(route, &big) else {
                panic!("3 is fresh");
            };
            let done = queue.enqueue_with(entry(&big), None, Some(refused.write()));
            assert!(matches!(done.await.unwrap(), Err(StoreError::Full)));
            // Stored with its message.
            let Check::Fresh(Some(kept)) = f.check(route, &m("a/z", "5")) else {
                panic!("5 is fresh");
            };
            let done = queue.enqueue_with(entry(&m("a/z", "5")), None, Some(kept.write()));
            done.await.unwrap().unwrap();
            // The process ends: nothing more is written.
            drop((lost, refused, kept));
            drop((f, queue));
            drop(db);
            thread.join();
        }
        let (db, thread) = Db::open(&path, crate::store::Synchronous::Normal).unwrap();
        let f = Freshness::load(db.clone()).await.unwrap();
        assert!(
            admit(&f, &db, route, &m("a/x", "7")).await,
            "the resend of a message that never committed passes"
        );
        assert!(
            admit(&f, &db, route, &m("a/y", "3")).await,
            "the retry of a refused message passes"
        );
        assert!(
            !admit(&f, &db, route, &m("a/z", "5")).await,
            "a committed message's version is kept"
        );
        drop(f);
        drop(db);
        thread.join();
    }

    /// An outdated verdict only against a committed version: a resend compared with a copy
    /// whose commit is pending waits; if that commit fails (store full under `reject_new`) the
    /// resend is admitted, if it succeeds the resend is outdated. Before, the resend was judged
    /// outdated at once, acknowledged, and lost with the failed copy.
    #[tokio::test]
    async fn a_resend_waits_for_the_commit_it_is_compared_with() {
        let dir = tempfile::tempdir().unwrap();
        let (db, thread) =
            Db::open(&dir.path().join("s.db"), crate::store::Synchronous::Normal).unwrap();
        let routes = route_with_version();
        let (route, _) = routes.up("a/x").unwrap();
        let f = Freshness::load(db.clone()).await.unwrap();
        let queue = open_queue(&db, 4096).await;
        let mut big = m("a/x", "5");
        big.payload = bytes::Bytes::from(vec![b'x'; 8192]);
        for (msg, commits) in [(big, false), (m("a/x", "6"), true)] {
            // Hold the writer so the first copy's commit is pending while the resend arrives.
            let (release, held) = std::sync::mpsc::channel::<()>();
            let blocker = db.submit(move |_| {
                let _ = held.recv();
                Ok(())
            });
            let Check::Fresh(Some(first)) = f.check(route, &msg) else {
                panic!("the first copy is fresh");
            };
            let committed = queue.enqueue_with(entry(&msg), None, Some(first.write()));
            let Check::Wait(mut settled) = f.check(route, &msg) else {
                panic!("the resend must wait for the first copy's commit");
            };
            release.send(()).unwrap();
            blocker.await.unwrap().unwrap();
            let outcome = committed.await.unwrap();
            assert_eq!(outcome.is_ok(), commits, "{outcome:?}");
            first.settle(outcome.is_ok());
            settled.changed().await.unwrap();
            let again = f.admit_committed(route, &msg).await;
            if commits {
                assert!(again.is_none(), "a resend of a committed copy is outdated");
            } else {
                assert!(
                    matches!(again, Some(Some(_))),
                    "a resend of a copy that failed to commit is fresh"
                );
            }
        }
        drop((f, queue));
        drop(db);
        thread.join();
    }
}
