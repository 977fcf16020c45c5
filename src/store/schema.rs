//! Schema migrations. Each entry moves the store from version `index` to `index + 1`; entries
//! are never edited once released, only appended.
//!
//! # Contract
//! - A migration is SQL or, when rows must be rewritten in a way SQL cannot express, a Rust
//!   function; either runs in one `BEGIN IMMEDIATE` transaction together with the bump of
//!   `PRAGMA user_version`, so a store is always at exactly one version, never half migrated.
//! - A failed migration rolls back and the store is refused ([`StoreError::Open`]); a store with
//!   a version newer than this build knows is refused ([`StoreError::TooNew`]).
//! - A Rust migration keeps its own frozen copy of whatever old format it reads
//!   ([`props_json`] for migration 6), so later changes elsewhere cannot alter it.

use std::path::Path;

use rusqlite::Connection;

use super::StoreError;

mod props_json;

/// One step of the schema.
enum Migration {
    Sql(&'static str),
    /// Runs inside the migration's transaction.
    Rust(fn(&Connection) -> rusqlite::Result<()>),
}

use Migration::{Rust, Sql};

/// The migrations, in order. The schema version of a store is the number applied.
const MIGRATIONS: &[Migration] = &[
    // 1: core tables: store identity and the uplink queue.
    Sql(r#"
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    CREATE TABLE uplink_queue (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        route         TEXT    NOT NULL,
        priority      INTEGER NOT NULL,
        topic         TEXT    NOT NULL,
        payload       BLOB    NOT NULL,
        qos           INTEGER NOT NULL,
        retain        INTEGER NOT NULL,
        props         BLOB,
        accepted_wall INTEGER NOT NULL,
        accepted_boot INTEGER NOT NULL,
        boot_id       INTEGER NOT NULL,
        deadline_wall INTEGER,
        deadline_boot INTEGER,
        size          INTEGER NOT NULL,
        attempts      INTEGER NOT NULL DEFAULT 0
    );
    -- Delivery order.
    CREATE INDEX uplink_queue_order ON uplink_queue(priority, id);
    -- The expiry test is an OR of a boot-clock and a wall-clock comparison; with one index
    -- for each side SQLite answers it by a multi-index OR instead of scanning the table.
    CREATE INDEX uplink_queue_deadline_boot ON uplink_queue(boot_id, deadline_boot)
        WHERE deadline_boot IS NOT NULL;
    CREATE INDEX uplink_queue_deadline_wall ON uplink_queue(deadline_wall)
        WHERE deadline_wall IS NOT NULL;
    "#),
    // 2: local broker: persistent iPad sessions, their subscriptions and queued messages, and
    // retained messages.
    Sql(r#"
    CREATE TABLE broker_sessions (
        client_id         TEXT PRIMARY KEY,
        expiry_secs       INTEGER NOT NULL,
        disconnected_wall INTEGER
    );
    CREATE TABLE broker_subscriptions (
        client_id           TEXT    NOT NULL,
        filter              TEXT    NOT NULL,
        qos                 INTEGER NOT NULL,
        no_local            INTEGER NOT NULL,
        retain_as_published INTEGER NOT NULL,
        retain_handling     INTEGER NOT NULL,
        sub_id              INTEGER,
        PRIMARY KEY (client_id, filter)
    );
    CREATE TABLE broker_session_messages (
        seq           INTEGER PRIMARY KEY,
        client_id     TEXT    NOT NULL,
        topic         TEXT    NOT NULL,
        payload       BLOB    NOT NULL,
        msg_qos       INTEGER NOT NULL,
        qos           INTEGER NOT NULL,
        msg_retain    INTEGER NOT NULL,
        retain        INTEGER NOT NULL,
        props         TEXT,
        sub_ids       TEXT    NOT NULL,
        accepted_wall INTEGER NOT NULL,
        accepted_boot INTEGER NOT NULL,
        boot_id       INTEGER NOT NULL,
        deadline_wall INTEGER,
        deadline_boot INTEGER,
        released      INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX broker_session_messages_client ON broker_session_messages(client_id, seq);
    CREATE TABLE broker_incoming_qos2 (
        client_id TEXT    NOT NULL,
        pkid      INTEGER NOT NULL,
        PRIMARY KEY (client_id, pkid)
    );
    CREATE TABLE broker_retained (
        topic         TEXT PRIMARY KEY,
        payload       BLOB    NOT NULL,
        qos           INTEGER NOT NULL,
        props         TEXT,
        accepted_wall INTEGER NOT NULL,
        accepted_boot INTEGER NOT NULL,
        boot_id       INTEGER NOT NULL,
        deadline_wall INTEGER,
        deadline_boot INTEGER
    );
    "#),
    // 3: freshness: the conflation key of a queued row (NULL: never conflated), and the
    // newest version seen per (route, key) for dropping outdated messages across restarts.
    Sql(r#"
    ALTER TABLE uplink_queue ADD COLUMN conflate_key TEXT;
    CREATE INDEX uplink_queue_conflate ON uplink_queue(route, conflate_key)
        WHERE conflate_key IS NOT NULL;
    CREATE TABLE route_versions (
        route        TEXT    NOT NULL,
        key          TEXT    NOT NULL,
        version      TEXT    NOT NULL,
        updated_wall INTEGER NOT NULL,
        PRIMARY KEY (route, key)
    );
    "#),
    // 4: dead letters: uplink rows the central broker would not take after
    // `uplink.max_attempts` tries, kept out of the queue so the rows behind them flow. Same
    // columns as `uplink_queue` (the id is the original row id, so a re-queued row keeps its
    // place and its message id), plus why and when it was given up.
    Sql(r#"
    CREATE TABLE uplink_dead_letters (
        id            INTEGER PRIMARY KEY,
        route         TEXT    NOT NULL,
        priority      INTEGER NOT NULL,
        topic         TEXT    NOT NULL,
        payload       BLOB    NOT NULL,
        qos           INTEGER NOT NULL,
        retain        INTEGER NOT NULL,
        props         BLOB,
        accepted_wall INTEGER NOT NULL,
        accepted_boot INTEGER NOT NULL,
        boot_id       INTEGER NOT NULL,
        deadline_wall INTEGER,
        deadline_boot INTEGER,
        size          INTEGER NOT NULL,
        attempts      INTEGER NOT NULL,
        reason        TEXT    NOT NULL,
        failed_wall   INTEGER NOT NULL
    );
    "#),
    // 5: a dead letter keeps its conflation key, so re-queueing it restores it whole.
    Sql(r#"
    ALTER TABLE uplink_dead_letters ADD COLUMN conflate_key TEXT;
    "#),
    // 6: the broker's properties (`broker_session_messages.props`, `broker_retained.props`) from
    // JSON text to the binary encoding the uplink queue uses (`crate::store::props`), so the
    // store has one format of them. The columns keep their declared TEXT type: SQLite stores a
    // blob as a blob whatever the column's affinity.
    Rust(props_json::to_binary),
    // 7: shares: the uplink connection a queued row travels on, and the hash of its order key
    // (topic, or route for FIFO routes); see `queue::share`. The delivery-order index becomes
    // per share, so a connection's fetch never steps over another connection's rows; the
    // order-key index finds the share of a key's waiting rows. `Queue::open` assigns the
    // existing rows (no assignment signature in `meta` yet).
    Sql(r#"
    ALTER TABLE uplink_queue ADD COLUMN share INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE uplink_queue ADD COLUMN order_key INTEGER NOT NULL DEFAULT 0;
    DROP INDEX uplink_queue_order;
    CREATE INDEX uplink_queue_share_order ON uplink_queue(share, priority, id);
    CREATE INDEX uplink_queue_order_key ON uplink_queue(order_key);
    "#),
    // 8: the ledger (`queue::ledger`): per route, what entered the queue and why it left. Rows
    // already waiting count as accepted, so the ledger adds up from the start.
    Sql(r#"
    CREATE TABLE route_ledger (
        route       TEXT PRIMARY KEY,
        accepted    INTEGER NOT NULL DEFAULT 0,
        requeued    INTEGER NOT NULL DEFAULT 0,
        delivered   INTEGER NOT NULL DEFAULT 0,
        expired     INTEGER NOT NULL DEFAULT 0,
        store_full  INTEGER NOT NULL DEFAULT 0,
        conflated   INTEGER NOT NULL DEFAULT 0,
        dead_letter INTEGER NOT NULL DEFAULT 0,
        corrupt     INTEGER NOT NULL DEFAULT 0
    );
    INSERT INTO route_ledger (route, accepted)
        SELECT route, COUNT(*) FROM uplink_queue GROUP BY route;
    "#),
    // 9: the packet id of the client's PUBREC for a released QoS 2 message, so its PUBREL is
    // sent again after a restart (NULL for rows released before).
    Sql(r#"
    ALTER TABLE broker_session_messages ADD COLUMN released_pkid INTEGER;
    "#),
];

/// The schema version this build writes.
fn current_version() -> i64 {
    MIGRATIONS.len() as i64
}

/// Brings the store at `path` (already open as `conn`) to the current version.
pub fn migrate(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let known = current_version();
    if found > known {
        return Err(StoreError::TooNew {
            path: path.to_path_buf(),
            found,
            known,
        });
    }
    for (i, migration) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let version = i as i64 + 1;
        let applied = match migration {
            Sql(sql) => conn.execute_batch(&format!(
                "BEGIN IMMEDIATE; {sql}; PRAGMA user_version = {version}; COMMIT;"
            )),
            Rust(rewrite) => conn.execute_batch("BEGIN IMMEDIATE").and_then(|()| {
                rewrite(conn)?;
                conn.execute_batch(&format!("PRAGMA user_version = {version}; COMMIT;"))
            }),
        };
        applied.map_err(|source| {
            if !conn.is_autocommit() {
                if let Err(e) = conn.execute_batch("ROLLBACK") {
                    log::error!(
                        "store {}: rollback of migration {version} failed: {e}",
                        path.display()
                    );
                }
            }
            StoreError::Open {
                path: path.to_path_buf(),
                source,
            }
        })?;
        log::info!(
            "store {}: migrated to schema version {version}",
            path.display()
        );
    }
    Ok(())
}
