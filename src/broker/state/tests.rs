//! `BrokerState` driven directly, on a real store in a temp dir.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, Notify};

use super::*;
use crate::broker::session::OutState;
use crate::broker::subscriptions::Subscription;
use crate::broker::{ClientInfo, Protocol};
use crate::clock::Stamp;
use crate::message::{Message, QoS};
use crate::store::{DbThread, StoreWrite, Synchronous};

struct NoHooks;
impl Hooks for NoHooks {}

/// A broker state on the store in `dir`, as loaded at start-up.
pub(super) async fn open(dir: &std::path::Path) -> (Arc<BrokerState>, DbThread) {
    let (db, thread) = Db::open(&dir.join("store.db"), Synchronous::Normal).expect("store");
    let state = BrokerState::load(BrokerConfig::default(), db, Arc::new(NoHooks))
        .await
        .expect("load");
    (Arc::new(state), thread)
}

/// Stops `state` once its writes are committed, as a crash after the last commit would.
pub(super) async fn close(state: Arc<BrokerState>, thread: DbThread) {
    state.flush().await.expect("flush");
    drop(state);
    tokio::task::spawn_blocking(move || thread.join())
        .await
        .expect("join");
}

pub(super) fn link(client_id: &str, conn_id: u64) -> (ConnLink, mpsc::UnboundedReceiver<u8>) {
    let (kick, kicked) = mpsc::unbounded_channel();
    let link = ConnLink {
        conn_id,
        info: ClientInfo {
            client_id: client_id.into(),
            username: None,
            peer: ([127, 0, 0, 1], 1).into(),
            protocol: Protocol::V5,
        },
        notify: Arc::new(Notify::new()),
        kick,
        connected_since_ms: 0,
        out_window: 10,
    };
    (link, kicked)
}

/// Attaches a connection numbered as the broker would; its id and kick receiver.
pub(super) fn connect(
    state: &Arc<BrokerState>,
    client_id: &str,
    clean_start: bool,
    expiry_secs: u32,
) -> (u64, mpsc::UnboundedReceiver<u8>) {
    let conn_id = state.new_conn_id();
    let (link, kicked) = link(client_id, conn_id);
    let attached = state.attach(Attach {
        link,
        clean_start,
        expiry_secs,
        will: None,
    });
    assert!(attached.is_some(), "attach of connection {conn_id} refused");
    (conn_id, kicked)
}

pub(super) fn msg(topic: &str, payload: &str, qos: QoS, retain: bool) -> Message {
    Message {
        topic: topic.into(),
        payload: Bytes::from(payload.to_string()),
        qos,
        retain,
        properties: Default::default(),
        accepted: Stamp::now(),
        deadline: None,
    }
}

pub(super) fn sub(filter: &str, qos: QoS) -> Subscription {
    Subscription {
        filter: filter.into(),
        qos,
        no_local: false,
        retain_as_published: false,
        retain_handling: 0,
        id: None,
    }
}

/// Sends what the session of `client_id` has queued; (pkid, payload) of each message sent.
fn send_all(state: &BrokerState, client_id: &str, conn_id: u64) -> Vec<(u16, String)> {
    let mut sent = Vec::new();
    state
        .send_queued(client_id, conn_id, usize::MAX, |f| {
            let payload = String::from_utf8_lossy(&f.delivery.msg.payload).into_owned();
            sent.push((f.pkid, payload));
            Ok(())
        })
        .expect("owner");
    sent
}

#[tokio::test]
async fn a_taken_over_connection_changes_nothing_in_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let (state, thread) = open(dir.path()).await;
    let (old, mut kicked) = connect(&state, "cab", true, 600);
    state
        .subscribe("cab", old, vec![sub("orders/#", QoS::ExactlyOnce)])
        .unwrap();
    state.await_release("cab", old, 1).unwrap();
    state.publish_from("pub", msg("orders/1", "one", QoS::AtLeastOnce, false));
    state.publish_from("pub", msg("orders/2", "two", QoS::ExactlyOnce, false));
    let sent = send_all(&state, "cab", old);
    assert_eq!(sent, vec![(1, "one".into()), (2, "two".into())]);

    let (new, _kicked) = connect(&state, "cab", false, 600);
    assert_eq!(
        kicked.try_recv().ok(),
        Some(0x8E),
        "the old connection is told"
    );

    // Everything the old connection still does is refused.
    assert_eq!(
        state.subscribe("cab", old, vec![sub("other", QoS::AtLeastOnce)]),
        Err(NotOwner)
    );
    assert_eq!(
        state.unsubscribe("cab", old, vec!["orders/#".into()]),
        Err(NotOwner)
    );
    assert_eq!(state.await_release("cab", old, 9), Err(NotOwner));
    assert_eq!(state.release("cab", old, 1), Err(NotOwner));
    assert_eq!(state.is_awaiting_release("cab", old, 1), Err(NotOwner));
    assert_eq!(
        state.acknowledged("cab", old, 1, OutState::Puback),
        Err(NotOwner)
    );
    assert_eq!(state.received("cab", old, 2, false), Err(NotOwner));
    assert_eq!(state.set_expiry("cab", old, 0), Err(NotOwner));
    assert!(state.in_flight("cab", old).is_err());
    assert!(state.send_queued("cab", old, 10, |_| Ok(())).is_err());
    assert!(state
        .detach(&link("cab", old).0.info, old, true, false)
        .is_none());

    // The new connection has the session as the old one left it.
    assert_eq!(state.is_awaiting_release("cab", new, 1), Ok(true));
    assert_eq!(state.is_awaiting_release("cab", new, 9), Ok(false));
    let states: Vec<(u16, OutState)> = state
        .in_flight("cab", new)
        .unwrap()
        .iter()
        .map(|f| (f.pkid, f.state))
        .collect();
    assert_eq!(states, vec![(1, OutState::Puback), (2, OutState::Pubrec)]);
    assert!(state.is_connected("cab"));
    close(state, thread).await;

    // And so does the store.
    let (state, thread) = open(dir.path()).await;
    {
        let t = state.lock();
        let s = t.sessions.get("cab").expect("session stored");
        assert_eq!(s.expiry_secs, 600);
        assert!(s.subs.contains("orders/#") && !s.subs.contains("other"));
        assert_eq!(s.subs.len(), 1);
        assert!(s.incoming_qos2.contains(&1) && !s.incoming_qos2.contains(&9));
        assert_eq!(s.queue.len(), 2, "both messages are still owed");
    }
    close(state, thread).await;
}

#[tokio::test]
async fn a_taken_over_connection_cannot_touch_a_clean_session_either() {
    let dir = tempfile::tempdir().unwrap();
    let (state, thread) = open(dir.path()).await;
    let (old, _k) = connect(&state, "cab", true, 600);
    state.await_release("cab", old, 7).unwrap();
    let (new, _k2) = connect(&state, "cab", true, 600);
    // The old connection's late QoS 2 PUBLISH is not recorded: the new session's packet
    // id 7 is a new message.
    assert_eq!(state.await_release("cab", old, 7), Err(NotOwner));
    assert_eq!(state.is_awaiting_release("cab", new, 7), Ok(false));
    close(state, thread).await;
}

fn failing_write() -> StoreWrite {
    Box::new(|_| Err(StoreError::Full))
}

/// Payloads a new subscriber to `filter` gets as retained messages.
fn retained_for(state: &Arc<BrokerState>, filter: &str) -> Vec<String> {
    let (conn, _k) = connect(state, "probe", true, 0);
    state
        .subscribe("probe", conn, vec![sub(filter, QoS::AtLeastOnce)])
        .unwrap();
    let got = send_all(state, "probe", conn).into_iter().map(|(_, p)| p);
    let got = got.collect();
    state.detach(&link("probe", conn).0.info, conn, false, false);
    got
}

#[tokio::test]
async fn a_retained_message_whose_commit_fails_is_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let (state, thread) = open(dir.path()).await;
    let speed = |v: &str| msg("down/speed", v, QoS::AtLeastOnce, true);
    state.publish(speed("80")).unwrap().await.unwrap().unwrap();
    assert!(state.repeats_retained("down/speed", &speed("80"), "stamp"));

    let failed = state
        .publish_with(speed("60"), failing_write())
        .await
        .unwrap();
    assert!(failed.is_err());
    // The store still holds 80, and so does memory: the central broker's redelivery of 60
    // is not taken for a repeat, and a new subscriber gets 80.
    assert!(!state.repeats_retained("down/speed", &speed("60"), "stamp"));
    assert!(state.repeats_retained("down/speed", &speed("80"), "stamp"));
    assert_eq!(retained_for(&state, "down/#"), vec!["80".to_string()]);

    // A clearing that fails clears nothing.
    let failed = state
        .publish_with(speed(""), failing_write())
        .await
        .unwrap();
    assert!(failed.is_err());
    assert_eq!(retained_for(&state, "down/#"), vec!["80".to_string()]);

    // Two changes in a row, the newer one failing: the older one is what stays.
    let older = state.publish(speed("70")).unwrap();
    let newer = state.publish_with(speed("50"), failing_write());
    assert!(older.await.unwrap().is_ok());
    assert!(newer.await.unwrap().is_err());
    assert!(state.repeats_retained("down/speed", &speed("70"), "stamp"));
    assert_eq!(retained_for(&state, "down/#"), vec!["70".to_string()]);

    // The redelivery is written, and a restart serves it.
    state.publish(speed("60")).unwrap().await.unwrap().unwrap();
    close(state, thread).await;
    let (state, thread) = open(dir.path()).await;
    assert!(state.repeats_retained("down/speed", &speed("60"), "stamp"));
    assert_eq!(retained_for(&state, "down/#"), vec!["60".to_string()]);
    close(state, thread).await;
}

#[tokio::test]
async fn a_retained_message_is_served_before_its_commit_but_repeats_only_after() {
    let dir = tempfile::tempdir().unwrap();
    let (state, thread) = open(dir.path()).await;
    let m = msg("down/speed", "80", QoS::AtLeastOnce, true);
    // Held back in the store's queue: a job that waits until the test lets it go.
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let blocker = state.db.submit(move |_| {
        let _ = wait.recv();
        Ok(())
    });
    let commit = state.publish(m.clone()).unwrap();
    // A subscription read now gets it (it was routed), but it does not count as stored yet.
    assert_eq!(retained_for(&state, "down/#"), vec!["80".to_string()]);
    assert!(!state.repeats_retained("down/speed", &m, "stamp"));
    go.send(()).unwrap();
    blocker.await.unwrap().unwrap();
    commit.await.unwrap().unwrap();
    assert!(state.repeats_retained("down/speed", &m, "stamp"));
    close(state, thread).await;
}
