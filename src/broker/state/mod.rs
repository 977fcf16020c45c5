//! The broker's state and its one owner: sessions, retained messages, counters.
//!
//! [`BrokerState`] is shared by every connection task, but its tables sit behind a private
//! lock and only its methods touch them. Each method is one operation of the broker (attach a
//! connection, subscribe, route a message, take an acknowledgement, detach, expire...): it
//! makes the state change and submits the store writes that go with it, always through
//! `BrokerState::change` in [`writes`] (lock → change → persist). An operation on a session
//! names the connection that makes it (`conn_id`, numbered at CONNECT) and is refused with
//! [`NotOwner`] once another connection holds the session. Critical sections are short and
//! never span an `.await`; the only hook called with the lock held is `may_receive`, so any
//! other hook may call back into [`super::BrokerHandle`].
//!
//! The operations by role: [`recovery`] (start-up from the store), [`lifecycle`] (attach,
//! detach, expiry), [`inbound`] (the client's QoS 2 packet ids), [`outbound`] (the in-flight
//! window towards the client), [`subscriptions`], [`routing`] (and retained messages),
//! [`wills`], [`counters`]; [`tables`] holds what the lock guards and the steps several
//! operations share.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{oneshot, Notify};

use super::codec::WillSpec;
use super::limits::Admission;
use super::retained::Retained;
use super::session::ConnLink;
use super::{BrokerConfig, Hooks};
use crate::store::{Db, StoreError};

mod counters;
mod inbound;
mod lifecycle;
mod outbound;
mod recovery;
mod routing;
mod subscriptions;
mod tables;
mod wills;
mod writes;

use self::tables::Tables;

/// The outcome of a store write that the caller waits for.
pub type Commit = oneshot::Receiver<Result<(), StoreError>>;

/// A connection that asks to own a session ([`BrokerState::attach`]).
pub struct Attach {
    /// The live connection; its `info.client_id` names the session.
    pub link: ConnLink,
    /// CONNECT's Clean Start (3.1.1: Clean Session): any old session is discarded.
    pub clean_start: bool,
    /// Session Expiry Interval, already capped.
    pub expiry_secs: u32,
    pub will: Option<WillSpec>,
}

/// Why an outgoing message left the in-flight window unsent: [`BrokerState::send_queued`].
pub struct NotSent(pub String);

/// The connection named in a session operation no longer holds the session (another
/// connection took it over, or it ended): the operation changed nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotOwner;

/// The broker's state: configuration, the hooks, the admission limits, and the session tables
/// that only its methods change.
pub struct BrokerState {
    config: BrokerConfig,
    db: Db,
    hooks: Arc<dyn Hooks>,
    tables: Mutex<Tables>,
    /// The tables' retained messages, for settling changes as the store commits them.
    retained: Arc<Mutex<Retained>>,
    admission: Admission,
    /// Set once shutdown begins: no new connections, `inject` refused.
    closed: AtomicBool,
    /// Wills handed to the ingest hook whose verdict is still awaited; shutdown waits for
    /// them, so the wills of clients closed at shutdown reach the store (and the uplink).
    wills_pending: AtomicUsize,
    wills_done: Notify,
}

impl BrokerState {
    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    pub fn hooks(&self) -> &Arc<dyn Hooks> {
        &self.hooks
    }

    pub fn admission(&self) -> &Admission {
        &self.admission
    }

    /// The lock. A panic while it was held cannot leave the tables half-written in a way that
    /// matters more than stopping the broker would, so poisoning is ignored.
    fn lock(&self) -> MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the broker as shutting down: no new connections, `inject` refused.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Waits until every store write submitted so far is committed.
    pub async fn flush(&self) -> Result<(), StoreError> {
        // An empty job: its commit means every earlier write is on disk.
        self.db.run(|_| Ok(())).await
    }
}

#[cfg(test)]
mod model;
#[cfg(test)]
mod tests;
