//! The store's writer thread: gathers the waiting jobs into one transaction, commits once, and
//! only then answers them (the contract is in [`super`]).
//!
//! # Gathering a batch
//! - A batch starts with the first job that needs a prompt commit and takes every job already
//!   waiting. Under load the next batch gathers while this one commits, so one fsync covers
//!   many messages.
//! - No linger: a prompt job never waits for company. Measured at a steady 1,000 msgs/s on
//!   the development machine, waiting up to 1 ms saved 5 % of the CPU per message and added
//!   1 ms to every PUBACK (docs/benchmarks.md): not worth it.
//! - **Deferred jobs** (the deletes of acknowledged rows: nobody waits for them, a crash before
//!   they commit only sends the rows again) never start a batch of their own while others
//!   come: they ride with the next one, and commit alone only after [`DEFER_MAX`].
//! - A job runs inside a savepoint unless it is fail-first ([`Guard`]).

use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::StoreError;

/// Largest number of prompt jobs gathered into one transaction.
const MAX_BATCH: usize = 1024;

/// Longest time a deferred job waits for a batch to ride with. At 40 msgs/s or more from the
/// iPads a delete always finds one; the bound is what a kill -9 can cost in resends: the rows
/// acknowledged in the last 25 ms.
pub(super) const DEFER_MAX: Duration = Duration::from_millis(25);

/// Called with the commit's error, if any, once the batch is settled.
pub(super) type Completion = Box<dyn FnOnce(Option<&StoreError>) + Send>;

/// A job's work against the open transaction, or told why there is none.
pub(super) type Work =
    Box<dyn FnOnce(Result<&Connection, &StoreError>) -> (bool, Completion) + Send>;

/// How the writer keeps a failing job from leaving half its changes in the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Guard {
    /// The job runs inside a savepoint and is rolled back to it if it fails. The savepoint
    /// copies every page the job touches (SQLite's sub-journal): for a one-row insert, more
    /// than the insert itself.
    Savepoint,
    /// The job returns its own errors before its first write ([`super::Db::submit_fail_first`]):
    /// a failure that changed no row needs no rollback. One that did (an SQLite error between
    /// two statements) rolls back the whole batch, and every job of it gets the error.
    FailFirst,
}

/// When a job wants its commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Urgency {
    /// As soon as possible (someone waits for the answer).
    Prompt,
    /// With the next batch, or after [`DEFER_MAX`] ([`super::Db::submit_deferred`]).
    Deferred,
}

/// A unit of the writer's batch.
pub(super) struct Job {
    guard: Guard,
    urgency: Urgency,
    submitted: Instant,
    work: Work,
}

impl Job {
    pub(super) fn new(guard: Guard, urgency: Urgency, work: Work) -> Job {
        Job {
            guard,
            urgency,
            submitted: Instant::now(),
            work,
        }
    }
}

/// The writer thread's loop: batches until every sender is gone, then a checkpoint.
pub(super) fn run(conn: Connection, rx: Receiver<Job>) {
    let mut gather = Gather::default();
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    while gather.next_batch(&rx, &mut batch) {
        commit(&conn, &mut batch);
    }
    // All handles dropped: checkpoint so the next start opens a compact database.
    if let Err(e) = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)") {
        log::warn!(
            "store {}: checkpoint at close failed ({e}); the next start replays the WAL",
            conn.path().unwrap_or("?")
        );
    }
}

/// The gathering policy of the module doc.
#[derive(Default)]
struct Gather {
    /// Deferred jobs waiting for a batch, oldest first.
    deferred: Vec<Job>,
}

impl Gather {
    /// Fills `batch` with the next transaction's jobs; `false` once the channel is closed and
    /// nothing is left.
    fn next_batch(&mut self, rx: &Receiver<Job>, batch: &mut Vec<Job>) -> bool {
        let mut prompt = 0;
        // A prompt job starts the batch, or the oldest deferred one runs out of patience.
        loop {
            let received = match self.deferred.first() {
                None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                Some(oldest) => {
                    let due = oldest.submitted + DEFER_MAX;
                    rx.recv_timeout(due.saturating_duration_since(Instant::now()))
                }
            };
            match received {
                Ok(job) => {
                    if self.take(job, batch) {
                        prompt += 1;
                        break;
                    }
                    if self.deferred.len() >= MAX_BATCH {
                        break;
                    }
                }
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    batch.append(&mut self.deferred);
                    return !batch.is_empty();
                }
            }
        }
        // Whatever waits already.
        while prompt < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => prompt += usize::from(self.take(job, batch)),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        // Deferred jobs ride along, first: they were submitted first.
        batch.splice(0..0, self.deferred.drain(..));
        true
    }

    /// Puts `job` in `batch` (prompt: `true`) or with the deferred ones (`false`).
    fn take(&mut self, job: Job, batch: &mut Vec<Job>) -> bool {
        if job.urgency == Urgency::Deferred {
            self.deferred.push(job);
            return false;
        }
        batch.push(job);
        true
    }
}

/// Runs `batch` in one transaction and answers every job after the commit (or its failure).
fn commit(conn: &Connection, batch: &mut Vec<Job>) {
    let mut completions = Vec::with_capacity(batch.len());
    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
        let err = StoreError::Commit(e.to_string());
        for job in batch.drain(..) {
            let (_, done) = (job.work)(Err(&err));
            done(Some(&err));
        }
        return;
    }
    // Cached statements: parsing these anew for every job cost more than most jobs.
    let step = |sql: &str| {
        if let Err(e) = conn.prepare_cached(sql).and_then(|mut st| st.execute([])) {
            log::error!("store {}: {sql} failed: {e}", conn.path().unwrap_or("?"));
        }
    };
    // Set when a fail-first job failed after a write: the batch cannot commit.
    let mut spoiled: Option<StoreError> = None;
    for job in batch.drain(..) {
        if let Some(err) = &spoiled {
            let (_, done) = (job.work)(Err(err));
            completions.push(done);
            continue;
        }
        let done = match job.guard {
            Guard::Savepoint => {
                step("SAVEPOINT job");
                let (ok, done) = (job.work)(Ok(conn));
                if !ok {
                    step("ROLLBACK TO job");
                }
                step("RELEASE job");
                done
            }
            Guard::FailFirst => {
                let before = conn.total_changes();
                let (ok, done) = (job.work)(Ok(conn));
                if !ok && conn.total_changes() != before {
                    spoiled = Some(StoreError::Commit(
                        "a job failed after its first write; its batch is rolled back".into(),
                    ));
                }
                done
            }
        };
        completions.push(done);
    }
    let path = conn.path().unwrap_or("?");
    if let Some(err) = spoiled {
        log::error!("store {path}: {err}");
        if let Err(e) = conn.execute_batch("ROLLBACK") {
            log::error!("store {path}: rollback of the spoiled batch failed: {e}");
        }
        completions.into_iter().for_each(|done| done(Some(&err)));
        return;
    }
    match conn.execute_batch("COMMIT") {
        Ok(()) => completions.into_iter().for_each(|done| done(None)),
        Err(e) => {
            log::error!("store {path}: commit failed: {e}");
            if let Err(e) = conn.execute_batch("ROLLBACK") {
                log::error!("store {path}: rollback after the failed commit failed: {e}");
            }
            let err = StoreError::Commit(e.to_string());
            completions.into_iter().for_each(|done| done(Some(&err)));
        }
    }
}

#[cfg(test)]
mod tests {
    use rusqlite::Connection;

    use crate::store::{Db, StoreError, Synchronous};

    /// A job inserting `key` into `meta`.
    fn insert(key: &'static str) -> impl FnOnce(&Connection) -> Result<(), StoreError> {
        move |c| {
            c.execute("INSERT INTO meta(key, value) VALUES (?1, '1')", [key])?;
            Ok(())
        }
    }

    /// Rows of `meta` with `key`, as the reader sees them.
    async fn count(db: &Db, key: &'static str) -> i64 {
        db.read(move |c| {
            Ok(
                c.query_row("SELECT COUNT(*) FROM meta WHERE key = ?1", [key], |r| {
                    r.get(0)
                })?,
            )
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn a_deferred_job_rides_with_the_next_prompt_one() {
        let dir = tempfile::tempdir().unwrap();
        let (db, thread) = Db::open(&dir.path().join("s.db"), Synchronous::Full).unwrap();
        let mut deferred = db.submit_deferred(insert("t-deferred"), |r| r);
        // Waits up to 25 ms for company; the prompt job comes at once.
        let prompt = db.submit_fail_first(insert("t-prompt"), |r| r);
        prompt.await.unwrap().unwrap();
        // Answered in the same batch, before the prompt job (alone it would wait 25 ms).
        assert!(matches!(deferred.try_recv(), Ok(Ok(()))));
        drop(db);
        thread.join();
    }

    #[tokio::test]
    async fn a_deferred_job_alone_still_commits() {
        let dir = tempfile::tempdir().unwrap();
        let (db, thread) = Db::open(&dir.path().join("s.db"), Synchronous::Full).unwrap();
        let answer = db.submit_deferred(insert("t-alone"), |r| r);
        answer.await.unwrap().unwrap();
        assert_eq!(count(&db, "t-alone").await, 1);
        drop(db);
        thread.join();
    }

    #[tokio::test]
    async fn closing_the_store_commits_the_deferred_jobs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let (db, thread) = Db::open(&path, Synchronous::Full).unwrap();
        let answer = db.submit_deferred(insert("t-last"), |r| r);
        drop(db);
        thread.join();
        answer.await.unwrap().unwrap();
        let (db, thread) = Db::open(&path, Synchronous::Full).unwrap();
        assert_eq!(count(&db, "t-last").await, 1);
        drop(db);
        thread.join();
    }
}
