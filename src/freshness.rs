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
//!   `route_versions`), so suppression holds across restarts. The row is submitted to the
//!   store's writer before the message itself is queued or injected, so it commits in the same
//!   or an earlier group commit. One row per key is kept forever; keys are meant to be a
//!   bounded set (topics of a state tree, vehicle ids).
//! - The version is recorded when the message is admitted (so a resend racing the first copy's
//!   commit is already dropped); if the message then cannot be stored (store full, refused to
//!   the iPad) or injected (the central broker will redeliver it), the previous version is
//!   restored, so the retry is not mistaken for a duplicate.

use std::cmp::Ordering as CmpOrdering;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use rusqlite::params;

use crate::clock::Stamp;
use crate::config::{Direction, VersionSource};
use crate::message::Message;
use crate::route::Route;
use crate::store::{Db, StoreError};

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
    /// Pass it on; `Some` when a version was recorded (take it back with [`Freshness::undo`]).
    Fresh(Option<Undo>),
    /// Drop it: not newer than the newest seen for its key (counted).
    Outdated,
}

/// What [`Freshness::undo`] needs to take an admitted version back.
#[derive(Debug)]
pub struct Undo {
    route: String,
    key: String,
    version: Version,
    previous: Option<Version>,
}

/// The newest version per (route, key), with its durable copy, and the count of suppressed
/// messages. Shared by the ingest hook (uplink) and the downlink.
pub struct Freshness {
    db: Db,
    newest: Mutex<HashMap<(String, String), Version>>,
    suppressed_up: AtomicU64,
    suppressed_down: AtomicU64,
}

/// What the freshness rules removed since start, for the status report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FreshnessCounters {
    /// Outdated messages dropped at ingest (acknowledged to the iPad, not queued).
    pub suppressed_up: u64,
    /// Outdated messages from the central broker, acknowledged and not injected.
    pub suppressed_down: u64,
    /// Waiting uplink rows replaced by a newer one of the same key.
    pub conflated: u64,
    /// Uplink rows deleted because their deadline passed.
    pub expired_up: u64,
    /// Downlink messages that arrived already expired.
    pub expired_down: u64,
}

impl FreshnessCounters {
    /// Collects the counters from the pieces that own them.
    pub fn collect(
        freshness: &Freshness,
        queue: &crate::store::queue::Queue,
        downlink: &crate::downlink::Downlink,
    ) -> FreshnessCounters {
        let q = queue.counters();
        FreshnessCounters {
            suppressed_up: freshness.suppressed_up.load(Ordering::Relaxed),
            suppressed_down: freshness.suppressed_down.load(Ordering::Relaxed),
            conflated: q.conflated,
            expired_up: q.expired,
            expired_down: downlink.counters().expired.load(Ordering::Relaxed),
        }
    }
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
        let newest = rows
            .into_iter()
            .map(|(route, key, v)| ((route, key), Version::parse(&v)))
            .collect();
        Ok(Freshness {
            db,
            newest: Mutex::new(newest),
            suppressed_up: AtomicU64::new(0),
            suppressed_down: AtomicU64::new(0),
        })
    }

    /// True if `msg` (seen on `route`'s source side) may pass; false if it is outdated (its
    /// version is older than or equal to the newest seen for its key), which is counted. A
    /// passing message's version becomes the newest and is submitted to the store.
    pub fn admit(&self, route: &Route, msg: &Message) -> bool {
        matches!(self.check(route, msg), Check::Fresh(_))
    }

    /// [`Freshness::admit`] that can be taken back: when the message then cannot be stored or
    /// injected, [`Freshness::undo`] restores the previous newest version, so the sender's
    /// retry is not mistaken for a duplicate.
    pub fn check(&self, route: &Route, msg: &Message) -> Check {
        let Some(source) = &route.version else {
            return Check::Fresh(None);
        };
        let Some(version) = version_of(source, msg) else {
            return Check::Fresh(None);
        };
        let key = route.key_of(msg);
        let previous = {
            let mut newest = self.lock();
            let slot = (route.name.clone(), key.clone());
            if let Some(seen) = newest.get(&slot) {
                if version.compare(seen) != CmpOrdering::Greater {
                    match route.direction {
                        Direction::Up => &self.suppressed_up,
                        Direction::Down => &self.suppressed_down,
                    }
                    .fetch_add(1, Ordering::Relaxed);
                    log::debug!(
                        "route {}: dropped outdated message on '{}' (version {} <= {})",
                        route.name,
                        msg.topic,
                        version.text(),
                        seen.text()
                    );
                    return Check::Outdated;
                }
            }
            newest.insert(slot, version.clone())
        };
        self.persist(route.name.clone(), key.clone(), Some(version.text()));
        Check::Fresh(Some(Undo {
            route: route.name.clone(),
            key,
            version,
            previous,
        }))
    }

    /// Restores the version before `undo`'s message, unless a newer one was admitted since.
    pub fn undo(&self, undo: Undo) {
        let Undo {
            route,
            key,
            version,
            previous,
        } = undo;
        {
            let mut newest = self.lock();
            let slot = (route.clone(), key.clone());
            if newest.get(&slot) != Some(&version) {
                return;
            }
            match &previous {
                Some(p) => newest.insert(slot, p.clone()),
                None => newest.remove(&slot),
            };
        }
        self.persist(route, key, previous.map(|p| p.text()));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Version>> {
        self.newest
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Submits the newest version of a key (`None`: forget the key). Fire and forget: the
    /// writer runs jobs in order, so this commits with or before the message's own row.
    fn persist(&self, route: String, key: String, version: Option<String>) {
        let wall = Stamp::now().wall_ms;
        drop(self.db.submit(move |conn| {
            match version {
                Some(text) => conn
                    .prepare_cached(
                        "INSERT INTO route_versions (route, key, version, updated_wall) \
                         VALUES (?1, ?2, ?3, ?4) \
                         ON CONFLICT (route, key) DO UPDATE SET version = ?3, updated_wall = ?4",
                    )?
                    .execute(params![route, key, text, wall])?,
                None => conn
                    .prepare_cached("DELETE FROM route_versions WHERE route = ?1 AND key = ?2")?
                    .execute(params![route, key])?,
            };
            Ok(())
        }));
    }

    /// Messages dropped as outdated since start, both directions.
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

    #[tokio::test]
    async fn newest_versions_survive_a_restart_and_outdated_ones_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let cfg = crate::config::Config::parse(
            "train_id = \"T1\"\n[[route]]\nname = \"r\"\ndirection = \"up\"\nlocal = \"a/#\"\nremote = \"b/#\"\nversion = { user_property = \"seq\" }\n",
            std::path::Path::new("t.toml"),
        )
        .unwrap();
        let routes = crate::route::Routes::from_config(&cfg);
        let (route, _) = routes.up("a/x").unwrap();
        let m = |topic: &str, seq: &str| Message {
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
        };
        {
            let (db, thread) = Db::open(&path, crate::store::Synchronous::Normal).unwrap();
            let f = Freshness::load(db.clone()).await.unwrap();
            assert!(f.admit(route, &m("a/x", "7")));
            assert!(f.admit(route, &m("a/x", "9")));
            assert!(!f.admit(route, &m("a/x", "7")), "a resend of 7 after 9");
            assert!(!f.admit(route, &m("a/x", "9")), "equal is not newer");
            assert!(f.admit(route, &m("a/y", "1")), "another key");
            assert_eq!(f.suppressed(), 2);
            drop(f);
            drop(db);
            thread.join();
        }
        let (db, thread) = Db::open(&path, crate::store::Synchronous::Normal).unwrap();
        let f = Freshness::load(db.clone()).await.unwrap();
        assert!(!f.admit(route, &m("a/x", "8")), "9 was stored");
        assert!(f.admit(route, &m("a/x", "10")));
        assert_eq!(f.suppressed(), 1);

        // A message that could not be stored is taken back: its retry passes.
        let Check::Fresh(Some(undo)) = f.check(route, &m("a/x", "11")) else {
            panic!("11 is fresh");
        };
        f.undo(undo);
        assert!(f.admit(route, &m("a/x", "11")), "the retry of 11 passes");
        // Taking back an older admission after a newer one changes nothing.
        let Check::Fresh(Some(undo)) = f.check(route, &m("a/z", "1")) else {
            panic!("a new key is fresh");
        };
        assert!(f.admit(route, &m("a/z", "2")));
        f.undo(undo);
        assert!(!f.admit(route, &m("a/z", "2")));
        drop(f);
        drop(db);
        thread.join();
    }
}
