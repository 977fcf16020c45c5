//! The broker's rows in the store (schema migration 2).
//!
//! Only what must survive a restart of the daemon is written: persistent sessions (expiry > 0)
//! with their subscriptions and QoS 1/2 messages not yet completed, and retained messages.
//! Writes are batched into jobs for the store's writer thread; they are submitted while the
//! broker's state lock is held, so the rows change in the same order as the state.
//!
//! Outgoing in-flight bookkeeping (packet ids) is not stored: after a restart every stored
//! message is sent again (as a new delivery with DUP=0), except that a QoS 2 message the client
//! already acknowledged with PUBREC is remembered (`released`, with the PUBREC's packet id) and
//! not sent again: its PUBREL is, under that packet id, as MQTT asks of a resumed session. Incoming
//! QoS 2 packet ids awaiting PUBREL are stored, so a client's resend after a restart is still
//! recognised as a duplicate.

use std::sync::Arc;

use bytes::Bytes;
use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, OptionalExtension};

use super::session::Delivery;
use super::subscriptions::Subscription;
use crate::clock::Stamp;
use crate::message::{Message, Properties, QoS};
use crate::store::{props, StoreError};

/// One change to the broker's rows.
#[derive(Debug)]
pub enum Op {
    UpsertSession {
        client_id: String,
        expiry_secs: u32,
    },
    SessionDisconnected {
        client_id: String,
        wall_ms: i64,
    },
    DeleteSession {
        client_id: String,
    },
    UpsertSub {
        client_id: String,
        sub: Subscription,
    },
    DeleteSub {
        client_id: String,
        filter: String,
    },
    InsertMsg {
        client_id: String,
        seq: i64,
        delivery: Delivery,
    },
    DeleteMsg {
        seq: i64,
    },
    /// The client answered the QoS 2 message `seq` with PUBREC under packet id `pkid`: the
    /// message is not sent again, its PUBREL is (also after a restart).
    ReleaseMsg {
        seq: i64,
        pkid: u16,
    },
    /// A QoS 2 packet id acknowledged with PUBREC, until PUBREL.
    InsertIncoming {
        client_id: String,
        pkid: u16,
    },
    DeleteIncoming {
        client_id: String,
        pkid: u16,
    },
    UpsertRetained(Arc<Message>),
    DeleteRetained {
        topic: String,
    },
}

/// Applies `ops` in order inside the writer's transaction.
pub fn apply(conn: &Connection, ops: &[Op]) -> Result<(), StoreError> {
    for op in ops {
        match op {
            Op::UpsertSession {
                client_id,
                expiry_secs,
            } => {
                conn.execute(
                    "INSERT INTO broker_sessions(client_id, expiry_secs, disconnected_wall)
                     VALUES (?1, ?2, NULL)
                     ON CONFLICT(client_id) DO UPDATE SET expiry_secs = ?2, disconnected_wall = NULL",
                    params![client_id, expiry_secs],
                )?;
            }
            Op::SessionDisconnected { client_id, wall_ms } => {
                conn.execute(
                    "UPDATE broker_sessions SET disconnected_wall = ?2 WHERE client_id = ?1",
                    params![client_id, wall_ms],
                )?;
            }
            Op::DeleteSession { client_id } => {
                conn.execute(
                    "DELETE FROM broker_sessions WHERE client_id = ?1",
                    params![client_id],
                )?;
                conn.execute(
                    "DELETE FROM broker_subscriptions WHERE client_id = ?1",
                    params![client_id],
                )?;
                conn.execute(
                    "DELETE FROM broker_session_messages WHERE client_id = ?1",
                    params![client_id],
                )?;
                conn.execute(
                    "DELETE FROM broker_incoming_qos2 WHERE client_id = ?1",
                    params![client_id],
                )?;
            }
            Op::UpsertSub { client_id, sub } => {
                conn.execute(
                    "INSERT OR REPLACE INTO broker_subscriptions
                     (client_id, filter, qos, no_local, retain_as_published, retain_handling, sub_id)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![
                        client_id,
                        sub.filter,
                        sub.qos as u8,
                        sub.no_local,
                        sub.retain_as_published,
                        sub.retain_handling,
                        sub.id.map(|i| i as i64)
                    ],
                )?;
            }
            Op::DeleteSub { client_id, filter } => {
                conn.execute(
                    "DELETE FROM broker_subscriptions WHERE client_id = ?1 AND filter = ?2",
                    params![client_id, filter],
                )?;
            }
            Op::InsertMsg {
                client_id,
                seq,
                delivery: d,
            } => {
                let m = &d.msg;
                conn.execute(
                    "INSERT OR REPLACE INTO broker_session_messages
                     (seq, client_id, topic, payload, msg_qos, qos, msg_retain, retain, props, sub_ids,
                      accepted_wall, accepted_boot, boot_id, deadline_wall, deadline_boot)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
                    params![
                        seq,
                        client_id,
                        m.topic,
                        m.payload.as_ref(),
                        m.qos as u8,
                        d.qos as u8,
                        m.retain,
                        d.retain,
                        props::encode(&m.properties),
                        serde_json::to_string(&d.sub_ids).unwrap_or_else(|_| "[]".into()),
                        m.accepted.wall_ms,
                        m.accepted.boot_ms,
                        m.accepted.boot_id,
                        m.deadline.map(|s| s.wall_ms),
                        m.deadline.map(|s| s.boot_ms),
                    ],
                )?;
            }
            Op::DeleteMsg { seq } => {
                conn.execute(
                    "DELETE FROM broker_session_messages WHERE seq = ?1",
                    params![seq],
                )?;
            }
            Op::ReleaseMsg { seq, pkid } => {
                conn.execute(
                    "UPDATE broker_session_messages SET released = 1, released_pkid = ?2 \
                     WHERE seq = ?1",
                    params![seq, pkid],
                )?;
            }
            Op::InsertIncoming { client_id, pkid } => {
                conn.execute(
                    "INSERT OR IGNORE INTO broker_incoming_qos2(client_id, pkid) VALUES (?1, ?2)",
                    params![client_id, pkid],
                )?;
            }
            Op::DeleteIncoming { client_id, pkid } => {
                conn.execute(
                    "DELETE FROM broker_incoming_qos2 WHERE client_id = ?1 AND pkid = ?2",
                    params![client_id, pkid],
                )?;
            }
            Op::UpsertRetained(m) => {
                conn.execute(
                    "INSERT OR REPLACE INTO broker_retained
                     (topic, payload, qos, props, accepted_wall, accepted_boot, boot_id, deadline_wall, deadline_boot)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                    params![
                        m.topic,
                        m.payload.as_ref(),
                        m.qos as u8,
                        props::encode(&m.properties),
                        m.accepted.wall_ms,
                        m.accepted.boot_ms,
                        m.accepted.boot_id,
                        m.deadline.map(|s| s.wall_ms),
                        m.deadline.map(|s| s.boot_ms),
                    ],
                )?;
            }
            Op::DeleteRetained { topic } => {
                conn.execute(
                    "DELETE FROM broker_retained WHERE topic = ?1",
                    params![topic],
                )?;
            }
        }
    }
    Ok(())
}

/// The `props` column of a broker row, in the store's one encoding ([`props`]). Damage is
/// logged with the table and row and read as no properties: the message itself is still
/// delivered.
fn props_of(v: ValueRef<'_>, table: &str, row: &dyn std::fmt::Display) -> Properties {
    props::from_column(v).unwrap_or_else(|e| {
        log::error!("store: {table} row {row}: {e}; loading the message without its properties");
        Properties::default()
    })
}

fn qos_of(n: i64) -> QoS {
    u8::try_from(n)
        .ok()
        .and_then(QoS::from_u8)
        .unwrap_or(QoS::AtLeastOnce)
}

fn stamp(wall: i64, boot: i64, boot_id: i64) -> Stamp {
    Stamp {
        wall_ms: wall,
        boot_ms: boot,
        boot_id,
    }
}

/// A stored session.
#[derive(Debug)]
pub struct LoadedSession {
    pub client_id: String,
    pub expiry_secs: u32,
    pub disconnected_wall: Option<i64>,
    pub subs: Vec<Subscription>,
    /// Queued messages in order, each with the packet id of the client's PUBREC for it, if
    /// it sent one (`Some(None)`: a PUBREC stored before packet ids were kept).
    pub messages: Vec<(Delivery, Option<Option<u16>>)>,
    /// QoS 2 packet ids from the client that await PUBREL.
    pub incoming_qos2: Vec<u16>,
}

/// Everything the broker stored.
#[derive(Debug, Default)]
pub struct Loaded {
    pub sessions: Vec<LoadedSession>,
    pub retained: Vec<Message>,
    pub max_seq: i64,
}

/// Reads the broker's rows at start-up.
pub fn load(conn: &Connection) -> Result<Loaded, StoreError> {
    let mut out = Loaded::default();
    let mut st =
        conn.prepare("SELECT client_id, expiry_secs, disconnected_wall FROM broker_sessions")?;
    let rows = st.query_map([], |r| {
        Ok(LoadedSession {
            client_id: r.get(0)?,
            expiry_secs: u32::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
            disconnected_wall: r.get(2)?,
            subs: Vec::new(),
            messages: Vec::new(),
            incoming_qos2: Vec::new(),
        })
    })?;
    for s in rows {
        out.sessions.push(s?);
    }
    for s in &mut out.sessions {
        let mut st = conn.prepare(
            "SELECT filter, qos, no_local, retain_as_published, retain_handling, sub_id
             FROM broker_subscriptions WHERE client_id = ?1",
        )?;
        let rows = st.query_map(params![s.client_id], |r| {
            Ok(Subscription {
                filter: r.get(0)?,
                qos: qos_of(r.get(1)?),
                no_local: r.get(2)?,
                retain_as_published: r.get(3)?,
                retain_handling: r.get(4)?,
                id: r
                    .get::<_, Option<i64>>(5)?
                    .and_then(|i| usize::try_from(i).ok()),
            })
        })?;
        for sub in rows {
            s.subs.push(sub?);
        }
        let mut st = conn.prepare(
            "SELECT seq, topic, payload, msg_qos, qos, msg_retain, retain, props, sub_ids,
                    accepted_wall, accepted_boot, boot_id, deadline_wall, deadline_boot, released,
                    released_pkid
             FROM broker_session_messages WHERE client_id = ?1 ORDER BY seq",
        )?;
        let rows = st.query_map(params![s.client_id], |r| {
            let boot_id: i64 = r.get(11)?;
            let deadline = match (r.get::<_, Option<i64>>(12)?, r.get::<_, Option<i64>>(13)?) {
                (Some(w), Some(b)) => Some(stamp(w, b, boot_id)),
                _ => None,
            };
            let sub_ids: String = r.get(8)?;
            let msg = Message {
                topic: r.get(1)?,
                payload: Bytes::from(r.get::<_, Vec<u8>>(2)?),
                qos: qos_of(r.get(3)?),
                retain: r.get(5)?,
                properties: props_of(
                    r.get_ref(7)?,
                    "broker_session_messages",
                    &format_args!("seq {}", r.get::<_, i64>(0)?),
                ),
                accepted: stamp(r.get(9)?, r.get(10)?, boot_id),
                deadline,
            };
            Ok((
                Delivery {
                    shared: None,
                    msg: Arc::new(msg),
                    qos: qos_of(r.get(4)?),
                    retain: r.get(6)?,
                    sub_ids: serde_json::from_str(&sub_ids).unwrap_or_default(),
                    seq: Some(r.get(0)?),
                },
                r.get::<_, bool>(14)?.then(|| {
                    r.get::<_, Option<i64>>(15)
                        .ok()
                        .flatten()
                        .and_then(|p| u16::try_from(p).ok())
                        .filter(|p| *p != 0)
                }),
            ))
        })?;
        for m in rows {
            s.messages.push(m?);
        }
        let mut st = conn.prepare("SELECT pkid FROM broker_incoming_qos2 WHERE client_id = ?1")?;
        let rows = st.query_map(params![s.client_id], |r| r.get::<_, u16>(0))?;
        for id in rows {
            s.incoming_qos2.push(id?);
        }
    }
    let mut st = conn.prepare(
        "SELECT topic, payload, qos, props, accepted_wall, accepted_boot, boot_id, deadline_wall, deadline_boot
         FROM broker_retained",
    )?;
    let rows = st.query_map([], |r| {
        let boot_id: i64 = r.get(6)?;
        let topic: String = r.get(0)?;
        let deadline = match (r.get::<_, Option<i64>>(7)?, r.get::<_, Option<i64>>(8)?) {
            (Some(w), Some(b)) => Some(stamp(w, b, boot_id)),
            _ => None,
        };
        let properties = props_of(r.get_ref(3)?, "broker_retained", &format_args!("{topic:?}"));
        Ok(Message {
            topic,
            payload: Bytes::from(r.get::<_, Vec<u8>>(1)?),
            qos: qos_of(r.get(2)?),
            retain: true,
            properties,
            accepted: stamp(r.get(4)?, r.get(5)?, boot_id),
            deadline,
        })
    })?;
    for m in rows {
        out.retained.push(m?);
    }
    out.max_seq = conn
        .query_row("SELECT MAX(seq) FROM broker_session_messages", [], |r| {
            r.get::<_, Option<i64>>(0)
        })
        .optional()?
        .flatten()
        .unwrap_or(0);
    Ok(out)
}
