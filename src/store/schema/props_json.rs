//! Migration 6: the broker's properties from JSON text to the store's one binary encoding.
//!
//! # Contract
//! - Every `props` value of `broker_session_messages` and `broker_retained` that is text is
//!   read as the JSON the broker wrote up to schema version 5 and rewritten as
//!   [`crate::store::props::encode`] of the same [`Properties`], or `NULL` when there are none.
//! - The JSON is read exactly as the broker's loader read it before (a frozen copy of it lives
//!   here): a field that is missing or of the wrong kind is absent, and a value that is not
//!   JSON at all stands for no properties. Such a value is logged with its table and row and
//!   becomes `NULL`, which is what the old loader made of it.
//! - `NULL`s and values that are not text are left alone; blobs are already in the new
//!   encoding, and anything else is damage the loader reports.
//! - Rows are rewritten in pages of [`PAGE`] by `rowid`, so memory stays bounded however many
//!   messages the broker kept.

use bytes::Bytes;
use rusqlite::types::ValueRef;
use rusqlite::Connection;

use crate::message::Properties;
use crate::store::props;

/// Rows read per statement.
const PAGE: i64 = 512;

/// The tables whose `props` column held JSON.
const TABLES: [&str; 2] = ["broker_session_messages", "broker_retained"];

/// Rewrites every JSON `props` value of the broker's tables in the binary encoding.
pub(super) fn to_binary(conn: &Connection) -> rusqlite::Result<()> {
    for table in TABLES {
        let mut read = conn.prepare(&format!(
            "SELECT rowid, props FROM {table} WHERE rowid > ?1 AND props IS NOT NULL \
             ORDER BY rowid LIMIT ?2"
        ))?;
        let mut write = conn.prepare(&format!("UPDATE {table} SET props = ?2 WHERE rowid = ?1"))?;
        let mut after = i64::MIN;
        loop {
            // One page read to the end before any row is written: no update under a running
            // statement.
            let mut page: Vec<(i64, Vec<u8>)> = Vec::new();
            let mut last = None;
            let mut rows = read.query([after, PAGE])?;
            while let Some(row) = rows.next()? {
                let rowid: i64 = row.get(0)?;
                last = Some(rowid);
                if let ValueRef::Text(json) = row.get_ref(1)? {
                    page.push((rowid, json.to_vec()));
                }
            }
            let Some(last) = last else { break };
            after = last;
            for (rowid, json) in page {
                let properties = legacy_decode(&json).unwrap_or_else(|| {
                    log::warn!(
                        "store: {table} row {rowid}: props is not JSON; it held no usable \
                         properties and is cleared"
                    );
                    Properties::default()
                });
                write.execute(rusqlite::params![rowid, props::encode(&properties)])?;
            }
        }
    }
    Ok(())
}

/// The broker's JSON properties as its loader read them up to schema version 5; `None` when
/// the text is not JSON (the loader then used no properties).
fn legacy_decode(json: &[u8]) -> Option<Properties> {
    let v = serde_json::from_slice::<serde_json::Value>(json).ok()?;
    Some(Properties {
        payload_format_indicator: v["pfi"].as_u64().and_then(|n| u8::try_from(n).ok()),
        content_type: v["ct"].as_str().map(str::to_string),
        response_topic: v["rt"].as_str().map(str::to_string),
        correlation_data: serde_json::from_value::<Option<Vec<u8>>>(v["cd"].clone())
            .ok()
            .flatten()
            .map(Bytes::from),
        user_properties: serde_json::from_value(v["up"].clone()).unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use rusqlite::params;

    use super::*;
    use crate::store::schema::{Migration, MIGRATIONS};
    use crate::store::{Db, Synchronous};

    /// The broker's encoding up to schema version 5, as it wrote the column.
    fn old_json(p: &Properties) -> Option<String> {
        if *p == Properties::default() {
            return None;
        }
        let v = serde_json::json!({
            "pfi": p.payload_format_indicator,
            "ct": p.content_type,
            "rt": p.response_topic,
            "cd": p.correlation_data.as_ref().map(|b| b.to_vec()),
            "up": p.user_properties,
        });
        Some(v.to_string())
    }

    fn samples() -> Vec<Properties> {
        vec![
            Properties::default(),
            Properties {
                payload_format_indicator: Some(1),
                content_type: Some("application/json".into()),
                response_topic: Some(String::new()),
                correlation_data: Some(Bytes::from_static(&[0, 0, 200, 7, 255])),
                user_properties: vec![
                    ("z".into(), "1".into()),
                    ("a".into(), "2".into()),
                    ("z".into(), "ü \" \\ \n".into()),
                    (String::new(), "x".repeat(300)),
                ],
            },
            Properties {
                payload_format_indicator: Some(0),
                ..Properties::default()
            },
            Properties {
                correlation_data: Some(Bytes::new()),
                ..Properties::default()
            },
            Properties {
                user_properties: vec![("k".into(), "v".into())],
                ..Properties::default()
            },
        ]
    }

    /// A store at schema version 5, created with that version's SQL, holding broker rows with
    /// JSON properties (one per sample, and one of text that is not JSON) and one uplink row.
    fn write_version_5(path: &Path, samples: &[Properties]) {
        let conn = Connection::open(path).unwrap();
        for (i, m) in MIGRATIONS.iter().take(5).enumerate() {
            let Migration::Sql(sql) = m else {
                panic!("migration {} of version 5 is not SQL", i + 1)
            };
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 5).unwrap();
        for (seq, p) in samples.iter().enumerate() {
            conn.execute(
                "INSERT INTO broker_session_messages (seq, client_id, topic, payload, msg_qos, \
                 qos, msg_retain, retain, props, sub_ids, accepted_wall, accepted_boot, boot_id) \
                 VALUES (?1, 'ipad', 't', x'00', 1, 1, 0, 0, ?2, '[]', 1, 2, 3)",
                params![seq as i64 + 1, old_json(p)],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO broker_retained (topic, payload, qos, props, accepted_wall, \
                 accepted_boot, boot_id) VALUES (?1, x'00', 1, ?2, 1, 2, 3)",
                params![format!("r/{seq}"), old_json(p)],
            )
            .unwrap();
        }
        conn.execute(
            "INSERT INTO broker_retained (topic, payload, qos, props, accepted_wall, \
             accepted_boot, boot_id) VALUES ('r/garbage', x'00', 1, '{not json', 1, 2, 3)",
            [],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO uplink_queue (route, priority, topic, payload, qos, retain, props, \
             accepted_wall, accepted_boot, boot_id, size) \
             VALUES ('r', 0, 't', x'00', 1, 0, ?1, 1, 2, 3, 100)",
            [props::encode(&samples[1])],
        )
        .unwrap();
    }

    /// `(key, typeof(props), decoded props)` of every row of `sql`, in key order.
    fn read(conn: &Connection, sql: &str) -> Vec<(String, String, Properties)> {
        let mut st = conn.prepare(sql).unwrap();
        let rows = st
            .query_map([], |r| {
                let props = props::from_column(r.get_ref(2)?).unwrap();
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, props))
            })
            .unwrap();
        rows.collect::<Result<_, _>>().unwrap()
    }

    #[tokio::test]
    async fn migration_6_converts_json_props_to_the_binary_encoding() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let samples = samples();
        write_version_5(&path, &samples);

        let (db, thread) = Db::open(&path, Synchronous::Normal).unwrap();
        let (version, messages, retained, uplink) = db
            .read(|c| {
                let version: i64 = c.query_row("PRAGMA user_version", [], |r| r.get(0))?;
                let messages = read(
                    c,
                    "SELECT CAST(seq AS TEXT), typeof(props), props \
                     FROM broker_session_messages ORDER BY seq",
                );
                let retained = read(
                    c,
                    "SELECT topic, typeof(props), props FROM broker_retained ORDER BY topic",
                );
                let uplink = read(c, "SELECT route, typeof(props), props FROM uplink_queue");
                Ok((version, messages, retained, uplink))
            })
            .await
            .unwrap();
        drop(db);
        thread.join();

        // Migrated through 6 and every later migration.
        assert!(version >= 6, "{version}");
        let expect = |p: &Properties| {
            let kind = if *p == Properties::default() {
                "null"
            } else {
                "blob"
            };
            (kind.to_string(), p.clone())
        };
        let got = |rows: &[(String, String, Properties)]| -> Vec<(String, Properties)> {
            rows.iter()
                .map(|(_, t, p)| (t.clone(), p.clone()))
                .collect()
        };
        let want: Vec<_> = samples.iter().map(expect).collect();
        assert_eq!(got(&messages), want);
        // Retained rows sort by topic: "r/0".."r/4", then "r/garbage", cleared like the old
        // loader read it (no properties).
        let mut want_retained = want.clone();
        want_retained.push(("null".into(), Properties::default()));
        assert_eq!(got(&retained), want_retained);
        assert_eq!(retained[5].0, "r/garbage");
        // The uplink queue was binary already and is untouched.
        assert_eq!(got(&uplink), vec![("blob".into(), samples[1].clone())]);
    }

    #[test]
    fn legacy_reading_matches_the_old_loader() {
        for p in samples() {
            let json = old_json(&p).unwrap_or_else(|| "{}".into());
            assert_eq!(legacy_decode(json.as_bytes()), Some(p));
        }
        // Wrong kinds of fields are absent, as before; text that is not JSON is no properties.
        let odd = br#"{"pfi": 300, "ct": 5, "cd": "x", "up": [["k"]]}"#;
        assert_eq!(legacy_decode(odd), Some(Properties::default()));
        assert_eq!(legacy_decode(b"{not json"), None);
    }
}
