//! Decoding one row of a queue scan into an [`Entry`].
//!
//! # Contract
//! - Every column is checked: type, UTF-8, ranges (priority, QoS, retain), the properties
//!   encoding ([`crate::store::props`]) and that the two deadline columns are both set or both
//!   `NULL`. A row on disk is outside input: damage is a [`RowError`] naming the column, never
//!   a panic; the caller logs it with the row id and deletes the row.
//! - The columns are those of the scan's `COLUMNS`, in order: `id`, the expiry flag, then the
//!   row's fields.

use bytes::Bytes;
use rusqlite::types::{Type, ValueRef};
use rusqlite::Row;
use thiserror::Error;

use super::Entry;
use crate::clock::Stamp;
use crate::message::{Message, QoS};
use crate::store::props::{self, PropsError};

/// Why a queue row could not be decoded.
#[derive(Debug, Error)]
pub enum RowError {
    #[error("column {index} cannot be read: {source}")]
    Column {
        index: usize,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{column} is {found}, not {expected}")]
    Type {
        column: &'static str,
        found: Type,
        expected: &'static str,
    },
    #[error("{0} is not UTF-8")]
    NotUtf8(&'static str),
    #[error("{column} {value} is out of range")]
    OutOfRange { column: &'static str, value: i64 },
    #[error("deadline columns are damaged")]
    Deadline,
    #[error(transparent)]
    Props(#[from] PropsError),
}

/// Reads one row of a scan (columns 2.. after `id` and the expiry flag).
pub(super) fn decode_row(row: &Row<'_>, epoch: &str) -> Result<Entry, RowError> {
    let col = |index: usize| {
        row.get_ref(index)
            .map_err(|source| RowError::Column { index, source })
    };
    let int = |i: usize, column: &'static str| match col(i)? {
        ValueRef::Integer(n) => Ok(n),
        other => Err(RowError::Type {
            column,
            found: other.data_type(),
            expected: "an integer",
        }),
    };
    let text = |i: usize, column: &'static str| match col(i)? {
        ValueRef::Text(t) => std::str::from_utf8(t)
            .map(str::to_owned)
            .map_err(|_| RowError::NotUtf8(column)),
        other => Err(RowError::Type {
            column,
            found: other.data_type(),
            expected: "text",
        }),
    };
    let out_of_range = |column: &'static str, value: i64| RowError::OutOfRange { column, value };
    let id = int(0, "id")?;
    let route = text(2, "route")?;
    let priority = int(3, "priority")?;
    let priority = u8::try_from(priority).map_err(|_| out_of_range("priority", priority))?;
    let topic = text(4, "topic")?;
    let payload = match col(5)? {
        ValueRef::Blob(b) | ValueRef::Text(b) => Bytes::copy_from_slice(b),
        other => {
            return Err(RowError::Type {
                column: "payload",
                found: other.data_type(),
                expected: "a blob",
            })
        }
    };
    let qos = int(6, "qos")?;
    let qos = u8::try_from(qos)
        .ok()
        .and_then(QoS::from_u8)
        .ok_or(out_of_range("qos", qos))?;
    let retain = match int(7, "retain")? {
        0 => false,
        1 => true,
        other => return Err(out_of_range("retain", other)),
    };
    let properties = props::from_column(col(8)?)?;
    let boot_id = int(11, "boot_id")?;
    let accepted = Stamp {
        wall_ms: int(9, "accepted_wall")?,
        boot_ms: int(10, "accepted_boot")?,
        boot_id,
    };
    let deadline = match (col(12)?, col(13)?) {
        (ValueRef::Null, ValueRef::Null) => None,
        (ValueRef::Integer(wall_ms), ValueRef::Integer(boot_ms)) => Some(Stamp {
            wall_ms,
            boot_ms,
            boot_id,
        }),
        _ => return Err(RowError::Deadline),
    };
    let attempts = u32::try_from(int(14, "attempts")?.max(0)).unwrap_or(u32::MAX);
    Ok(Entry {
        id,
        msg_id: format!("{epoch}-{id}"),
        route,
        priority,
        message: Message {
            topic,
            payload,
            qos,
            retain,
            properties,
            accepted,
            deadline,
        },
        attempts,
    })
}
