//! Model-based test of [`BrokerState`]: random connects, takeovers, subscriptions (shared
//! included), publishes at QoS 0/1/2, acknowledgements, QoS 2 packet ids from clients,
//! disconnects, operations of taken-over connections and crash-restarts from the store (a real
//! SQLite file in a temp dir), against a plain model of what each session holds, what it is
//! sent and in which order, and what survives a restart. Clients "a" and "b" keep their
//! sessions (expiry 600 s), "c" does not (expiry 0). No retained messages and no expiry here:
//! those have tests of their own.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use proptest::prelude::*;

use super::tests::{close, connect, link, open, sub};
use super::{BrokerState, NotOwner};
use crate::broker::session::OutState;
use crate::broker::subscriptions::shared_parts;
use crate::clock::Stamp;
use crate::message::{Message, QoS};
use crate::store::DbThread;
use crate::topic;

const CLIENTS: [&str; 3] = ["a", "b", "c"];
const TOPICS: [&str; 3] = ["t/a", "t/b", "s/x"];
/// Few enough that sessions often share a filter; two groups, one of them overlapping `#`.
const FILTERS: [&str; 4] = ["t/a", "#", "$share/g/#", "$share/h/t/+"];
/// The window the test's connections announce (`tests::link`).
const WINDOW: usize = 10;

#[derive(Debug, Clone)]
enum Action {
    Connect {
        client: usize,
        clean_start: bool,
    },
    Subscribe {
        client: usize,
        filter: usize,
        qos: u8,
    },
    Unsubscribe {
        client: usize,
        filter: usize,
    },
    Publish {
        topic: usize,
        qos: u8,
    },
    Send {
        client: usize,
    },
    Ack {
        client: usize,
        pick: usize,
    },
    PublishQos2In {
        client: usize,
        pkid: u16,
    },
    Release {
        client: usize,
        pkid: u16,
    },
    Disconnect {
        client: usize,
    },
    Stale {
        client: usize,
    },
    Restart,
}

/// An index into [`FILTERS`], the shared `$share/g/#` twice as often.
fn filter() -> impl Strategy<Value = usize> {
    prop_oneof![3 => 0..FILTERS.len(), 1 => Just(2)]
}

fn action() -> impl Strategy<Value = Action> {
    let client = 0..CLIENTS.len();
    prop_oneof![
        3 => (client.clone(), any::<bool>())
            .prop_map(|(client, clean_start)| Action::Connect { client, clean_start }),
        3 => (client.clone(), filter(), 0u8..3)
            .prop_map(|(client, filter, qos)| Action::Subscribe { client, filter, qos }),
        1 => (client.clone(), filter())
            .prop_map(|(client, filter)| Action::Unsubscribe { client, filter }),
        6 => (0..TOPICS.len(), 0u8..3).prop_map(|(topic, qos)| Action::Publish { topic, qos }),
        5 => client.clone().prop_map(|client| Action::Send { client }),
        5 => (client.clone(), any::<usize>()).prop_map(|(client, pick)| Action::Ack { client, pick }),
        1 => (client.clone(), 1u16..4).prop_map(|(client, pkid)| Action::PublishQos2In { client, pkid }),
        1 => (client.clone(), 1u16..4).prop_map(|(client, pkid)| Action::Release { client, pkid }),
        2 => client.clone().prop_map(|client| Action::Disconnect { client }),
        1 => client.prop_map(|client| Action::Stale { client }),
        2 => Just(Action::Restart),
    ]
}

fn qos(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// A message owed to a session: its number (the payload), QoS, the shared subscription it
/// came through, and its row number if stored.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Owed {
    id: u64,
    qos: QoS,
    shared: Option<String>,
    seq: Option<u64>,
}

#[derive(Debug, Default)]
struct Model {
    sessions: BTreeMap<String, MSession>,
    share_turn: BTreeMap<String, usize>,
    next_seq: u64,
    next_msg: u64,
    /// The QoS each message was published with (a reassigned message is downgraded afresh).
    msg_qos: BTreeMap<u64, QoS>,
}

#[derive(Debug, Default, PartialEq, Eq)]
struct MSession {
    persistent: bool,
    connected: bool,
    subs: BTreeMap<String, QoS>,
    queue: VecDeque<Owed>,
    inflight: Vec<(Owed, OutState)>,
    incoming: BTreeSet<u16>,
}

impl Model {
    fn enqueue(&mut self, cid: &str, mut d: Owed) {
        let Some(s) = self.sessions.get_mut(cid) else {
            return;
        };
        if !s.connected && d.qos == QoS::AtMostOnce {
            return;
        }
        if s.persistent && d.qos != QoS::AtMostOnce && d.seq.is_none() {
            self.next_seq += 1;
            d.seq = Some(self.next_seq);
        }
        s.queue.push_back(d);
    }

    fn next_member(
        &mut self,
        filter: &str,
        exclude: Option<&str>,
        connected_only: bool,
    ) -> Option<(String, QoS)> {
        let mut members: Vec<(String, QoS, bool)> = self
            .sessions
            .iter()
            .filter(|(cid, _)| Some(cid.as_str()) != exclude)
            .filter_map(|(cid, s)| s.subs.get(filter).map(|q| (cid.clone(), *q, s.connected)))
            .collect();
        if members.iter().any(|m| m.2) {
            members.retain(|m| m.2);
        } else if connected_only {
            return None;
        }
        if members.is_empty() {
            return None;
        }
        let turn = self.share_turn.entry(filter.to_string()).or_insert(0);
        let (cid, q, _) = members[*turn % members.len()].clone();
        *turn += 1;
        Some((cid, q))
    }

    fn publish(&mut self, topic_name: &str, q: QoS) -> u64 {
        self.next_msg += 1;
        let id = self.next_msg;
        self.msg_qos.insert(id, q);
        let shares: BTreeSet<String> = self
            .sessions
            .values()
            .flat_map(|s| s.subs.keys())
            .filter(|f| shared_parts(f).is_some_and(|(_, inner)| topic::matches(inner, topic_name)))
            .cloned()
            .collect();
        let targets: Vec<(String, QoS)> = self
            .sessions
            .iter()
            .filter_map(|(cid, s)| {
                s.subs
                    .iter()
                    .filter(|(f, _)| shared_parts(f).is_none() && topic::matches(f, topic_name))
                    .map(|(_, q)| *q)
                    .max()
                    .map(|granted| (cid.clone(), granted))
            })
            .collect();
        for filter in shares {
            if let Some((cid, granted)) = self.next_member(&filter, None, false) {
                let d = Owed {
                    id,
                    qos: q.min(granted),
                    shared: Some(filter),
                    seq: None,
                };
                self.enqueue(&cid, d);
            }
        }
        for (cid, granted) in targets {
            self.enqueue(
                &cid,
                Owed {
                    id,
                    qos: q.min(granted),
                    shared: None,
                    seq: None,
                },
            );
        }
        id
    }

    /// What `send_queued` sends: (message, QoS) in order.
    fn send(&mut self, cid: &str) -> Vec<(u64, QoS)> {
        let mut sent = Vec::new();
        let Some(s) = self.sessions.get_mut(cid) else {
            return sent;
        };
        while let Some(front) = s.queue.front() {
            if front.qos != QoS::AtMostOnce && s.inflight.len() >= WINDOW {
                break;
            }
            let Some(d) = s.queue.pop_front() else {
                break;
            };
            sent.push((d.id, d.qos));
            match d.qos {
                QoS::AtMostOnce => {}
                QoS::AtLeastOnce => s.inflight.push((d, OutState::Puback)),
                QoS::ExactlyOnce => s.inflight.push((d, OutState::Pubrec)),
            }
        }
        sent
    }

    /// A member leaves: §4.8.2 as `Tables::reassign_shared` implements it.
    fn reassign(&mut self, cid: &str) {
        let Some(s) = self.sessions.get_mut(cid) else {
            return;
        };
        let mut taken = Vec::new();
        let inflight = std::mem::take(&mut s.inflight);
        for (d, state) in inflight {
            if d.shared.is_some() && state == OutState::Puback {
                taken.push(d);
            } else {
                s.inflight.push((d, state));
            }
        }
        let queue = std::mem::take(&mut s.queue);
        for d in queue {
            if d.shared.is_some() {
                taken.push(d);
            } else {
                s.queue.push_back(d);
            }
        }
        let mut back = Vec::new();
        for mut d in taken {
            let filter = d.shared.clone().unwrap_or_default();
            match self.next_member(&filter, Some(cid), true) {
                Some((target, granted)) => {
                    d.seq = None;
                    d.qos = self.msg_qos[&d.id].min(granted);
                    self.enqueue(&target, d);
                }
                None => back.push(d),
            }
        }
        if let Some(s) = self.sessions.get_mut(cid) {
            for d in back.into_iter().rev() {
                s.queue.push_front(d);
            }
        }
    }

    /// What a restart from the store keeps.
    fn restart(&mut self) {
        self.share_turn.clear();
        self.sessions.retain(|_, s| s.persistent);
        for s in self.sessions.values_mut() {
            s.connected = false;
            // A stored message the client answered with PUBREC stays in flight, its PUBREL
            // owed (in row order); the rest is queued again in row order.
            let (mut released, rest): (Vec<_>, Vec<_>) = s
                .inflight
                .drain(..)
                .filter(|(d, _)| d.seq.is_some())
                .partition(|(_, state)| *state == OutState::Pubcomp);
            released.sort_by_key(|(d, _)| d.seq);
            let mut stored: Vec<Owed> = rest
                .into_iter()
                .map(|(d, _)| d)
                .chain(s.queue.drain(..))
                .filter(|d| d.seq.is_some())
                .map(|d| Owed { shared: None, ..d })
                .collect();
            stored.sort_by_key(|d| d.seq);
            s.inflight = released
                .into_iter()
                .map(|(d, state)| (Owed { shared: None, ..d }, state))
                .collect();
            s.queue = stored.into();
        }
    }
}

/// The real session of `cid` in the model's terms (rows numbers left out).
fn real_session(state: &BrokerState, cid: &str) -> Option<MSession> {
    let t = state.lock();
    let s = t.sessions.get(cid)?;
    let owed = |d: &crate::broker::session::Delivery| Owed {
        id: String::from_utf8_lossy(&d.msg.payload).parse().unwrap_or(0),
        qos: d.qos,
        shared: d.shared.clone(),
        seq: None,
    };
    Some(MSession {
        persistent: s.persistent(),
        connected: s.conn.is_some(),
        subs: s
            .subs
            .iter()
            .map(|sub| (sub.filter.clone(), sub.qos))
            .collect(),
        queue: s.queue.iter().map(owed).collect(),
        inflight: s
            .inflight
            .iter()
            .map(|f| (owed(&f.delivery), f.state))
            .collect(),
        incoming: s.incoming_qos2.iter().copied().collect(),
    })
}

/// The model's session of `cid` as [`real_session`] shows it.
fn model_session(model: &Model, cid: &str) -> Option<MSession> {
    let s = model.sessions.get(cid)?;
    let strip = |d: &Owed| Owed {
        seq: None,
        ..d.clone()
    };
    Some(MSession {
        persistent: s.persistent,
        connected: s.connected,
        subs: s.subs.clone(),
        queue: s.queue.iter().map(strip).collect(),
        inflight: s.inflight.iter().map(|(d, st)| (strip(d), *st)).collect(),
        incoming: s.incoming.clone(),
    })
}

fn message(topic_name: &str, id: u64, q: QoS) -> Message {
    Message {
        topic: topic_name.into(),
        payload: Bytes::from(id.to_string()),
        qos: q,
        retain: false,
        properties: Default::default(),
        accepted: Stamp::now(),
        deadline: None,
    }
}

/// Every session operation of a connection that no longer holds the session is refused.
fn all_refused(state: &Arc<BrokerState>, cid: &str, conn: u64) {
    let refused = Err(NotOwner);
    assert_eq!(
        state.subscribe(cid, conn, vec![sub("t/a", QoS::AtLeastOnce)]),
        Err(NotOwner)
    );
    assert_eq!(
        state.unsubscribe(cid, conn, vec!["t/a".into()]),
        Err(NotOwner)
    );
    assert_eq!(state.await_release(cid, conn, 1), refused);
    assert_eq!(state.release(cid, conn, 1), Err(NotOwner));
    assert_eq!(state.is_awaiting_release(cid, conn, 1), Err(NotOwner));
    assert_eq!(state.acknowledged(cid, conn, 1, OutState::Puback), refused);
    assert_eq!(state.acknowledged(cid, conn, 1, OutState::Pubcomp), refused);
    assert_eq!(state.received(cid, conn, 1, false), Err(NotOwner));
    assert_eq!(state.set_expiry(cid, conn, 0), refused);
    assert!(state.in_flight(cid, conn).is_err());
    assert!(state
        .send_queued(cid, conn, usize::MAX, |_| Ok(()))
        .is_err());
    assert!(state
        .detach(&link(cid, conn).0.info, conn, true, false)
        .is_none());
}

async fn run(actions: Vec<Action>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut state, mut thread): (Arc<BrokerState>, DbThread) = open(dir.path()).await;
    let mut model = Model::default();
    let mut conns: BTreeMap<&str, u64> = BTreeMap::new();
    let mut stale: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for (step, a) in actions.iter().enumerate() {
        match a.clone() {
            Action::Connect {
                client,
                clean_start,
            } => {
                let cid = CLIENTS[client];
                let persistent = cid != "c";
                let expiry = if persistent { 600 } else { 0 };
                let (conn, _kicked) = connect(&state, cid, clean_start, expiry);
                if let Some(old) = conns.insert(cid, conn) {
                    stale.entry(cid).or_default().push(old);
                }
                if clean_start {
                    model.sessions.remove(cid);
                }
                let s = model.sessions.entry(cid.to_string()).or_default();
                s.persistent = persistent;
                s.connected = true;
            }
            Action::Subscribe {
                client,
                filter,
                qos: q,
            } => {
                let cid = CLIENTS[client];
                let Some(&conn) = conns.get(cid) else {
                    continue;
                };
                let f = FILTERS[filter];
                let refused = state.subscribe(cid, conn, vec![sub(f, qos(q))]);
                assert_eq!(refused, Ok(vec![false]));
                if let Some(s) = model.sessions.get_mut(cid) {
                    s.subs.insert(f.to_string(), qos(q));
                }
            }
            Action::Unsubscribe { client, filter } => {
                let cid = CLIENTS[client];
                let Some(&conn) = conns.get(cid) else {
                    continue;
                };
                let f = FILTERS[filter];
                let codes = state.unsubscribe(cid, conn, vec![f.to_string()]);
                let existed = model
                    .sessions
                    .get_mut(cid)
                    .and_then(|s| s.subs.remove(f))
                    .is_some();
                assert_eq!(codes, Ok(vec![if existed { 0 } else { 0x11 }]));
            }
            Action::Publish { topic, qos: q } => {
                let id = model.publish(TOPICS[topic], qos(q));
                state.publish_from("publisher", message(TOPICS[topic], id, qos(q)));
            }
            Action::Send { client } => {
                let cid = CLIENTS[client];
                let Some(&conn) = conns.get(cid) else {
                    continue;
                };
                let mut sent = Vec::new();
                state
                    .send_queued(cid, conn, usize::MAX, |f| {
                        let id = String::from_utf8_lossy(&f.delivery.msg.payload)
                            .parse()
                            .unwrap_or(0);
                        sent.push((id, f.delivery.qos));
                        Ok(())
                    })
                    .expect("the connection holds its session");
                assert_eq!(sent, model.send(cid), "step {step}: sent to '{cid}'");
            }
            Action::Ack { client, pick } => {
                let cid = CLIENTS[client];
                let Some(&conn) = conns.get(cid) else {
                    continue;
                };
                let Some(s) = model.sessions.get_mut(cid) else {
                    continue;
                };
                if s.inflight.is_empty() {
                    continue;
                }
                let k = pick % s.inflight.len();
                let pkid = state.lock().sessions[cid].inflight[k].pkid;
                match s.inflight[k].1 {
                    OutState::Puback => {
                        state
                            .acknowledged(cid, conn, pkid, OutState::Puback)
                            .expect("owner");
                        s.inflight.remove(k);
                    }
                    OutState::Pubrec => {
                        assert_eq!(state.received(cid, conn, pkid, false), Ok(true));
                        s.inflight[k].1 = OutState::Pubcomp;
                    }
                    OutState::Pubcomp => {
                        state
                            .acknowledged(cid, conn, pkid, OutState::Pubcomp)
                            .expect("owner");
                        s.inflight.remove(k);
                    }
                }
            }
            Action::PublishQos2In { client, pkid } => {
                let cid = CLIENTS[client];
                let Some(&conn) = conns.get(cid) else {
                    continue;
                };
                let Some(s) = model.sessions.get_mut(cid) else {
                    continue;
                };
                assert_eq!(
                    state.is_awaiting_release(cid, conn, pkid),
                    Ok(s.incoming.contains(&pkid))
                );
                state.await_release(cid, conn, pkid).expect("owner");
                s.incoming.insert(pkid);
            }
            Action::Release { client, pkid } => {
                let cid = CLIENTS[client];
                let Some(&conn) = conns.get(cid) else {
                    continue;
                };
                let Some(s) = model.sessions.get_mut(cid) else {
                    continue;
                };
                assert_eq!(state.release(cid, conn, pkid), Ok(s.incoming.remove(&pkid)));
            }
            Action::Disconnect { client } => {
                let cid = CLIENTS[client];
                let Some(conn) = conns.remove(cid) else {
                    continue;
                };
                assert!(state
                    .detach(&link(cid, conn).0.info, conn, false, false)
                    .is_none());
                stale.entry(cid).or_default().push(conn);
                model.reassign(cid);
                if let Some(s) = model.sessions.get_mut(cid) {
                    s.connected = false;
                    if !s.persistent {
                        model.sessions.remove(cid);
                    }
                }
            }
            Action::Stale { client } => {
                let cid = CLIENTS[client];
                for &conn in stale.get(cid).into_iter().flatten() {
                    all_refused(&state, cid, conn);
                }
            }
            Action::Restart => {
                close(state, thread).await;
                (state, thread) = open(dir.path()).await;
                conns.clear();
                stale.clear();
                model.restart();
            }
        }
        for cid in CLIENTS {
            assert_eq!(
                real_session(&state, cid),
                model_session(&model, cid),
                "step {step} ({a:?}): session '{cid}'"
            );
        }
    }
    close(state, thread).await;
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn broker_state_matches_the_model(actions in prop::collection::vec(action(), 1..100)) {
        // Every client starts connected; the actions take it from there.
        let start = (0..CLIENTS.len()).map(|client| Action::Connect { client, clean_start: true });
        let actions = start.chain(actions).collect();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(run(actions));
    }
}
