//! The durable store: one SQLite database, one writer thread, group commit.
//!
//! # Contract
//! - Every change to durable state (uplink queue, iPad sessions, retained messages) is a *job*
//!   sent to [`Db::run`]. The writer thread takes the jobs that are waiting, runs them in one
//!   transaction (each inside its own savepoint, unless it is fail-first:
//!   [`Db::submit_fail_first`]), commits once, and only then answers every job. A job whose
//!   caller sees `Ok` is committed; if the commit fails (disk full, I/O error) every job of that
//!   batch gets the error and none of its changes are kept.
//! - Batching is natural: while one batch commits (and fsyncs), the next one gathers, so under
//!   load one fsync covers many messages, and when idle a job waits for nothing. Deletes nobody
//!   waits for ride with the next batch ([`Db::submit_deferred`]; see `writer`).
//! - Reads that need no transaction of their own (the uplink's fetch, statistics) go to a
//!   second, read-only connection on a thread of its own ([`Db::read`]). In WAL mode it sees
//!   the last committed state, so a read never waits behind a commit's fsync or behind the
//!   writer's queue of enqueues, and never sees a change that might still roll back.
//! - The database runs in WAL mode. `synchronous = FULL` (the default) makes a commit durable
//!   against power loss; `NORMAL` survives a crash of the process but a power cut can roll
//!   back the last few batches (which were already acknowledged).
//! - The schema is versioned with `PRAGMA user_version`; [`schema`] holds the migrations from the
//!   first release on. A store written by a newer version is refused, not guessed at.
//! - MQTT v5 properties have one encoding in every table that keeps them ([`props`]).

pub mod props;
pub mod queue;
pub mod schema;
mod writer;

use std::path::{Path, PathBuf};
use std::thread;

use rusqlite::{Connection, OpenFlags};
use serde::Deserialize;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

use self::writer::{Completion, Guard, Job, Urgency, Work};

/// The writer's page cache, in KiB (as a negative `cache_size`; SQLite's default is 2000 KiB):
/// the inner pages of the queue's indexes, which every insert and delete walks.
const PAGE_CACHE_KIB: i64 = -512;

/// The page cache of the reader ([`Db::read`]: statistics, recovery) and of each connection
/// [`Db::open_reader`] opens (one per uplink connection, walking an index forward from where
/// it left off). Every commit of the writer invalidates a reader's cache anyway, so a large
/// one only holds memory: during a drain the readers' caches were most of the heap.
const READER_CACHE_KIB: i64 = -64;

/// Errors of the store.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("store {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("store {path}: cannot create its directory: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("store {path} has schema version {found}, newer than this trainrelay knows ({known}); refusing to touch it")]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("store {path} is corrupt: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("store: {table} row {id} is damaged: {source}")]
    Row {
        table: &'static str,
        id: i64,
        #[source]
        source: rusqlite::Error,
    },
    #[error("store commit failed: {0}")]
    Commit(String),
    #[error("cannot start the store's {thread} thread: {source}")]
    Spawn {
        thread: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("store is full")]
    Full,
    #[error("store is closed")]
    Closed,
}

/// How hard a commit waits for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Synchronous {
    /// Durable against power loss: the WAL is fsynced at every commit.
    #[default]
    Full,
    /// Durable against a crash of the process; a power cut may lose the last commits.
    Normal,
}

/// A write that another module's state needs committed together with a store job's own rows
/// (a route's version next to the message it admits): run inside that job's savepoint.
pub type StoreWrite = Box<dyn FnOnce(&Connection) -> Result<(), StoreError> + Send>;

/// A read runs against the reader connection.
type ReadJob = Box<dyn FnOnce(&Connection) + Send>;

/// Handle to the store's writer thread. Cheap to clone.
#[derive(Clone)]
pub struct Db {
    tx: std::sync::mpsc::Sender<Job>,
    reads: mpsc::UnboundedSender<ReadJob>,
    path: PathBuf,
}

/// Owns the writer and reader threads; [`DbThread::join`] waits until every job sent before it
/// ran.
pub struct DbThread {
    writer: thread::JoinHandle<()>,
    reader: thread::JoinHandle<()>,
}

impl Db {
    /// Opens (creating if needed) the store at `path`, migrates it, and starts the writer.
    pub fn open(path: &Path, sync: Synchronous) -> Result<(Db, DbThread), StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let conn = open_connection(path, sync)?;
        // Opened after the writer's connection has migrated the schema.
        let read_conn = open_reader(path)?;
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let (reads, mut read_rx) = mpsc::unbounded_channel::<ReadJob>();
        let spawn_failed = |thread, source| StoreError::Spawn { thread, source };
        let reader = thread::Builder::new()
            .name("store-reader".into())
            .spawn(move || reader_loop(read_conn, &mut read_rx))
            .map_err(|e| spawn_failed("reader", e))?;
        let writer = thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer::run(conn, rx))
            .map_err(|e| spawn_failed("writer", e))?;
        Ok((
            Db {
                tx,
                reads,
                path: path.to_path_buf(),
            },
            DbThread { writer, reader },
        ))
    }

    /// Runs `f` in the writer's next transaction and answers once that is committed.
    pub async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        self.submit(f).await.map_err(|_| StoreError::Closed)?
    }

    /// Like [`Db::run`] but callable from synchronous code; the answer comes on the returned
    /// channel, which may be dropped if nobody waits for it.
    pub fn submit<T, F>(&self, f: F) -> oneshot::Receiver<Result<T, StoreError>>
    where
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        self.submit_then(f, |result| result)
    }

    /// Like [`Db::submit`], but `then` sees the final outcome (the job's result, or the commit
    /// error) on the writer thread, after the commit and before the next batch begins, and its
    /// value is the answer. Owners of in-memory state derived from the database use it to apply
    /// a change only once it is durable, or to notice that it was rolled back.
    pub fn submit_then<T, U, F, G>(&self, f: F, then: G) -> oneshot::Receiver<Result<U, StoreError>>
    where
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
        G: FnOnce(Result<T, StoreError>) -> Result<U, StoreError> + Send + 'static,
        T: Send + 'static,
        U: Send + 'static,
    {
        self.submit_job(Guard::Savepoint, Urgency::Prompt, f, then, |unanswered| {
            answer_dropped("job", unanswered)
        })
    }

    /// [`Db::submit_then`] whose answer is whatever `then` makes of the outcome, of any type:
    /// the caller's own verdict reaches its waiter straight from the writer thread, with no
    /// task in between to translate it. If the writer is gone the receiver sees a closed
    /// channel.
    pub fn submit_answered<T, V, F, G>(&self, f: F, then: G) -> oneshot::Receiver<V>
    where
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
        G: FnOnce(Result<T, StoreError>) -> V + Send + 'static,
        T: Send + 'static,
        V: Send + 'static,
    {
        self.submit_job(Guard::Savepoint, Urgency::Prompt, f, then, |_| {})
    }

    /// [`Db::submit_answered`] for a job that returns every error of its own (store full, a
    /// refusal) before its first write, so it needs no savepoint: the hot jobs (an enqueue, the
    /// delete of acknowledged rows) then cost the store only their own statements. An SQLite
    /// error after the job's first write fails the job's whole batch.
    pub fn submit_fail_first<T, V, F, G>(&self, f: F, then: G) -> oneshot::Receiver<V>
    where
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
        G: FnOnce(Result<T, StoreError>) -> V + Send + 'static,
        T: Send + 'static,
        V: Send + 'static,
    {
        self.submit_job(Guard::FailFirst, Urgency::Prompt, f, then, |_| {})
    }

    /// [`Db::submit_fail_first`] for a job nobody needs committed soon (the delete of rows the
    /// central broker acknowledged): it rides with the next batch of other jobs, and commits
    /// on its own only if none comes within 25 ms. A durable message then costs one commit,
    /// not one for its insert and one for its delete.
    pub fn submit_deferred<T, V, F, G>(&self, f: F, then: G) -> oneshot::Receiver<V>
    where
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
        G: FnOnce(Result<T, StoreError>) -> V + Send + 'static,
        T: Send + 'static,
        V: Send + 'static,
    {
        self.submit_job(Guard::FailFirst, Urgency::Deferred, f, then, |_| {})
    }

    /// The job of [`Db::submit_answered`]; `unanswered` sees an answer nobody waited for.
    fn submit_job<T, V, F, G>(
        &self,
        guard: Guard,
        urgency: Urgency,
        f: F,
        then: G,
        unanswered: fn(V),
    ) -> oneshot::Receiver<V>
    where
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
        G: FnOnce(Result<T, StoreError>) -> V + Send + 'static,
        T: Send + 'static,
        V: Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let work: Work = Box::new(move |conn| {
            let result = match conn {
                Ok(conn) => f(conn),
                Err(e) => Err(StoreError::Commit(e.to_string())),
            };
            let ok = result.is_ok();
            let done: Completion = Box::new(move |commit_error| {
                let result = match commit_error {
                    Some(e) => Err(StoreError::Commit(e.to_string())),
                    None => result,
                };
                if let Err(v) = reply.send(then(result)) {
                    unanswered(v);
                }
            });
            (ok, done)
        });
        // If the writer is gone the job, and with it the reply sender, is dropped and the
        // caller sees Closed.
        if self.tx.send(Job::new(guard, urgency, work)).is_err() {
            log::debug!(
                "store {}: writer has stopped; job refused",
                self.path.display()
            );
        }
        answer
    }

    /// Another read-only connection, for a task that reads often enough that a hop to the
    /// reader thread would cost more than the read (the uplink's fetch). It sees the last
    /// commit, like [`Db::read`].
    pub fn open_reader(&self) -> Result<Connection, StoreError> {
        open_reader(&self.path)
    }

    /// Runs `f` on the reader connection, which sees every change whose commit was answered
    /// and none that is still pending. Reads do not wait for the writer; `f` must not write
    /// (the connection is `query_only`).
    pub async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: ReadJob = Box::new(move |conn| {
            if let Err(unanswered) = reply.send(f(conn)) {
                answer_dropped("read", unanswered);
            }
        });
        // If the reader is gone the job, and with it the reply sender, is dropped and the
        // caller sees Closed.
        if self.reads.send(job).is_err() {
            log::debug!(
                "store {}: reader has stopped; read refused",
                self.path.display()
            );
        }
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

impl DbThread {
    /// Waits for the writer and the reader to finish. Every [`Db`] handle must be dropped first.
    pub fn join(self) {
        for (name, thread) in [("reader", self.reader), ("writer", self.writer)] {
            if thread.join().is_err() {
                log::error!("store: the {name} thread panicked");
            }
        }
    }
}

/// A job's or read's answer that nobody waits for any more: the caller may drop the receiver
/// ([`Db::submit`]). Nothing is lost but the answer; an error in it is worth a debug line.
fn answer_dropped<T>(what: &str, unanswered: Result<T, StoreError>) {
    if let Err(e) = unanswered {
        log::debug!("store: a {what} failed and nobody waited for its answer: {e}");
    }
}

fn open_connection(path: &Path, sync: Synchronous) -> Result<Connection, StoreError> {
    let open_err = |source| StoreError::Open {
        path: path.to_path_buf(),
        source,
    };
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(open_err)?;
    let corrupt = |e: rusqlite::Error| match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::NotADatabase) | Some(rusqlite::ErrorCode::DatabaseCorrupt) => {
            StoreError::Corrupt {
                path: path.to_path_buf(),
                detail: e.to_string(),
            }
        }
        _ => StoreError::Open {
            path: path.to_path_buf(),
            source: e,
        },
    };
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(open_err)?;
    // `rarray()`: a set of ids bound as one parameter (batched deletes).
    rusqlite::vtab::array::load_module(&conn).map_err(open_err)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(corrupt)?;
    let level = match sync {
        Synchronous::Full => "FULL",
        Synchronous::Normal => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", level)
        .map_err(corrupt)?;
    // The queue is read in index order from its oldest end and the OS page cache holds the
    // rest, so a small page cache costs little and keeps memory flat however deep the backlog.
    conn.pragma_update(None, "cache_size", PAGE_CACHE_KIB)
        .map_err(corrupt)?;
    let check: String = conn
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(corrupt)?;
    if check != "ok" {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: check,
        });
    }
    schema::migrate(&conn, path)?;
    Ok(conn)
}

/// The read-only connection of [`Db::read`]: WAL reads see the last commit without taking the
/// writer's lock.
fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let open_err = |source| StoreError::Open {
        path: path.to_path_buf(),
        source,
    };
    // Read-write flags: a WAL reader still maps and updates the shared-memory index.
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(open_err)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(open_err)?;
    conn.pragma_update(None, "query_only", true)
        .map_err(open_err)?;
    conn.pragma_update(None, "cache_size", READER_CACHE_KIB)
        .map_err(open_err)?;
    Ok(conn)
}

fn reader_loop(conn: Connection, rx: &mut mpsc::UnboundedReceiver<ReadJob>) {
    while let Some(job) = rx.blocking_recv() {
        job(&conn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_commit_and_failed_jobs_roll_back() {
        let dir = tempfile::tempdir().unwrap();
        let (db, thread) = Db::open(&dir.path().join("s.db"), Synchronous::Full).unwrap();
        db.run(|c| {
            c.execute("INSERT INTO meta(key, value) VALUES ('a', '1')", [])?;
            Ok(())
        })
        .await
        .unwrap();
        let failed = db
            .run(|c| {
                c.execute("INSERT INTO meta(key, value) VALUES ('b', '2')", [])?;
                Err::<(), _>(StoreError::Full)
            })
            .await;
        assert!(matches!(failed, Err(StoreError::Full)));
        let keys: Vec<String> = db
            .run(|c| {
                let mut st =
                    c.prepare("SELECT key FROM meta WHERE key IN ('a','b') ORDER BY key")?;
                let rows = st.query_map([], |r| r.get(0))?;
                Ok(rows.collect::<Result<Vec<String>, _>>()?)
            })
            .await
            .unwrap();
        assert_eq!(keys, vec!["a".to_string()]);
        drop(db);
        thread.join();
    }

    /// The keys of `meta` whose name starts with `prefix`.
    async fn meta_keys(db: &Db, prefix: &str) -> Vec<String> {
        let like = format!("{prefix}%");
        db.read(move |c| {
            let mut st = c.prepare("SELECT key FROM meta WHERE key LIKE ?1 ORDER BY key")?;
            let rows = st.query_map([like], |r| r.get(0))?;
            Ok(rows.collect::<Result<Vec<String>, _>>()?)
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn a_fail_first_job_that_fails_before_writing_costs_its_batch_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (db, thread) = Db::open(&dir.path().join("s.db"), Synchronous::Full).unwrap();
        let insert = |key: &'static str| {
            db.submit_fail_first(
                move |c| {
                    c.execute("INSERT INTO meta(key, value) VALUES (?1, '1')", [key])?;
                    Ok(())
                },
                |r| r,
            )
        };
        // Submitted together: the writer likely takes them as one batch.
        let a = insert("t-a");
        let refused = db.submit_fail_first(|_| Err::<(), _>(StoreError::Full), |r| r);
        let b = insert("t-b");
        assert!(matches!(refused.await.unwrap(), Err(StoreError::Full)));
        a.await.unwrap().unwrap();
        b.await.unwrap().unwrap();
        assert_eq!(meta_keys(&db, "t-").await, vec!["t-a", "t-b"]);
        drop(db);
        thread.join();
    }

    #[tokio::test]
    async fn a_fail_first_job_that_fails_after_a_write_leaves_nothing_of_it() {
        let dir = tempfile::tempdir().unwrap();
        let (db, thread) = Db::open(&dir.path().join("s.db"), Synchronous::Full).unwrap();
        let insert = |key: &'static str| {
            db.submit_fail_first(
                move |c| {
                    c.execute("INSERT INTO meta(key, value) VALUES (?1, '1')", [key])?;
                    Ok(())
                },
                |r| r,
            )
        };
        let a = insert("t-a");
        // Writes a row, then fails on a statement of its own: the row must not survive.
        let broken = db.submit_fail_first(
            |c| {
                c.execute("INSERT INTO meta(key, value) VALUES ('t-broken', '1')", [])?;
                c.execute("INSERT INTO no_such_table VALUES (1)", [])?;
                Ok(())
            },
            |r| r,
        );
        let b = insert("t-b");
        assert!(broken.await.unwrap().is_err());
        let (a, b) = (a.await.unwrap(), b.await.unwrap());
        // The others of its batch, if any, were answered with the error and left nothing;
        // whatever was answered Ok is there.
        let mut expected = Vec::new();
        if a.is_ok() {
            expected.push("t-a");
        }
        if b.is_ok() {
            expected.push("t-b");
        }
        assert_eq!(meta_keys(&db, "t-").await, expected);
        // The writer goes on after a spoiled batch.
        insert("t-c").await.unwrap().unwrap();
        assert!(meta_keys(&db, "t-").await.contains(&"t-c".to_string()));
        drop(db);
        thread.join();
    }

    #[test]
    fn garbage_file_is_reported_as_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        std::fs::write(&path, vec![0x42u8; 8192]).unwrap();
        match Db::open(&path, Synchronous::Full) {
            Err(StoreError::Corrupt { path: p, .. }) => assert_eq!(p, path),
            Err(e) => panic!("expected Corrupt, got {e}"),
            Ok(_) => panic!("expected Corrupt, got a store"),
        }
    }
}
