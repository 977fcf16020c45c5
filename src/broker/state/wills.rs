//! Wills: published through the ingest hook like the client's own messages, after their
//! delay; shutdown waits for their verdicts.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use super::BrokerState;
use crate::broker::codec::WillSpec;
use crate::broker::{BrokerEvent, ClientInfo, Ingest};
use crate::clock::Stamp;
use crate::message::Message;

impl BrokerState {
    /// Publishes a client's will: through the ingest hook (so it reaches the uplink queue like
    /// any other message from that client), then to local subscribers if accepted.
    pub fn fire_will(self: &Arc<Self>, info: ClientInfo, will: WillSpec) {
        let accepted = Stamp::now();
        let msg = Message {
            topic: will.topic.clone(),
            payload: will.payload,
            qos: will.qos,
            retain: will.retain,
            properties: will.properties,
            accepted,
            deadline: will
                .expiry
                .map(|s| accepted.plus(Duration::from_secs(u64::from(s)))),
        };
        log::info!(
            "local broker: publishing the will of '{}' on '{}'",
            info.client_id,
            msg.topic
        );
        let event = BrokerEvent::WillPublished {
            client_id: info.client_id.clone(),
            topic: msg.topic.clone(),
        };
        match self.hooks.ingest(&info, &msg) {
            Ingest::Accept | Ingest::Unrouted => {
                self.publish_from(&info.client_id, msg);
                self.hooks.on_event(event);
            }
            Ingest::Reject(r) => {
                log::warn!(
                    "local broker: will of '{}' refused by ingest: {r:?}",
                    info.client_id
                );
            }
            Ingest::Pending(rx) => {
                let state = Arc::clone(self);
                self.wills_pending.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let verdict = rx.await;
                    state.wills_pending.fetch_sub(1, Ordering::SeqCst);
                    state.wills_done.notify_waiters();
                    if let Ok(Ok(())) = verdict {
                        state.publish_from(&info.client_id, msg);
                        state.hooks.on_event(event);
                    } else {
                        log::warn!(
                            "local broker: will of '{}' refused by ingest",
                            info.client_id
                        );
                    }
                });
            }
        }
    }

    /// Waits until every will handed to the ingest hook has its verdict.
    pub async fn wills_settled(&self) {
        loop {
            let done = self.wills_done.notified();
            if self.wills_pending.load(Ordering::SeqCst) == 0 {
                return;
            }
            done.await;
        }
    }

    /// Starts the will delay of a session whose connection ended abnormally. The will fires
    /// when the delay runs out or when the session ends, whichever is first; a reconnect
    /// cancels it.
    pub(super) fn schedule_will(
        self: &Arc<Self>,
        info: ClientInfo,
        will: WillSpec,
        delay: Duration,
    ) -> oneshot::Sender<()> {
        let (cancel, mut cancelled) = oneshot::channel::<()>();
        let state = Arc::clone(self);
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                r = &mut cancelled => {
                    if r.is_ok() {
                        return;
                    }
                    // The session ended (its sender was dropped): publish now.
                }
            }
            state.fire_will(info, will);
        });
        cancel
    }
}
