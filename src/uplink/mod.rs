//! The uplink: the relay's connections to the central broker.
//!
//! `uplink.connections` parallel connections drain the store to the central broker, each its
//! share of the queue (see [`crate::store::queue::share`]: one topic, or one FIFO route, is
//! carried by one connection at a time, in order); the first also hands what the central broker sends to the
//! downlink. The rules each keeps:
//! - a row leaves the store only when the central broker acknowledged it (v5: with a success
//!   reason code); everything not acknowledged when a connection ends is sent again, oldest
//!   first, on the next one (so it may arrive twice, never zero times);
//! - an expired row is never sent, and a forwarded message carries its remaining expiry;
//! - at most its window of messages is unacknowledged at once: the broker's Receive Maximum,
//!   capped by `uplink.inflight` or [`DEFAULT_WINDOW`]; draining starts the moment a
//!   connection is up;
//! - a link is declared dead when for 1.5 × keep-alive nothing at all arrived from the broker
//!   and its TCP acknowledged none of our bytes (the link pings every keep-alive, so a live
//!   link always answers within that time, and a slow one acknowledges the bytes of a long
//!   write as they go), not when TCP gives up minutes later; a PUBLISH left unanswered for
//!   three keep-alives after it left the socket, on a live link, ends the connection too;
//! - a message is blamed for a failure only on evidence (see `Lane::blame`);
//! - reconnects back off exponentially with full jitter, reset after a stable connection.

pub mod config;
mod drain;
pub mod endpoint;
mod error;
pub mod link;
pub mod netwatch;
mod status;
mod throttle;
pub mod tls;
pub(crate) mod transport;
mod wire;

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::clock::{self, Stamp};
use crate::downlink::Downlink;
use crate::message::{Properties, QoS};
use crate::shutdown::Shutdown;
use crate::store::queue::dead_letter::Failure;
use crate::store::queue::{Drainer, Entry, Queue};
use config::UplinkConfig;
use drain::{Drain, Tag};
use endpoint::Endpoint;
pub use error::LinkError;
use error::UplinkError;
use link::{Link, LinkEvent, OutPublish};
pub use status::{LinkState, StatusHandle};
use transport::{LinkOptions, LinkTransport};

/// How often the uplink checks that the link is alive (and beats its watchdog heartbeat).
const LIVENESS_TICK: Duration = Duration::from_millis(200);

/// A connection that lasted this long resets the backoff.
const STABLE_AFTER: Duration = Duration::from_secs(30);

/// The in-flight window when the central broker announces no Receive Maximum (MQTT 3.1.1, or
/// a v5 broker that leaves it at 65,535) and `uplink.inflight` sets none: enough for a cellular
/// bandwidth-delay product (20 Mbit/s × 130 ms ≈ 325 kB ≈ 1,200 messages of 260 bytes on the
/// wire), while the messages in flight, held in memory and resent after a link loss, stay
/// bounded.
pub const DEFAULT_WINDOW: u16 = 1024;

/// Most link events handled in one go before the acknowledged rows are deleted and the window
/// refilled (bounds how long other branches of the loop wait).
const MAX_BURST: usize = 256;

/// The uplink: `uplink.connections` parallel connections to the central broker, each
/// draining its share of the store.
pub struct Uplink {
    lanes: Vec<Lane>,
}

/// One connection to the central broker, reconnecting until shutdown: its own client id,
/// persistent session, window, dead-link detection and backoff. The first one also carries
/// the relay's presence and the downlink subscription.
struct Lane {
    options: LinkOptions,
    /// In order of preference; never empty.
    endpoints: Vec<Endpoint>,
    config: UplinkConfig,
    queue: Queue,
    downlink: Downlink,
    /// Empty but on the first connection.
    down_filters: Vec<(String, u8)>,
    status: StatusHandle,
    /// The share of the queue this connection drains (the queue is split into
    /// `uplink.connections` shares).
    share: usize,
    /// The first connection: presence and downlink.
    first: bool,
    /// How its log lines name it: `uplink`, or `uplink {client_id}` when there are several.
    label: String,
}

/// The relay's retained presence message (`online`, or `offline` when it leaves).
fn presence(topic: &str, state: &'static str) -> OutPublish {
    OutPublish {
        topic: topic.to_string(),
        payload: Bytes::from_static(state.as_bytes()),
        qos: QoS::AtLeastOnce,
        retain: true,
        properties: Properties::default(),
        expiry_secs: None,
    }
}

/// How [`Lane::connect_and_drain`] ended: through the link (the evidence [`Lane::blame`]
/// weighs), before a connection was up, or otherwise.
enum Ended {
    Link(LinkError),
    NotConnected(End),
    Other(End),
}

/// Why a connection ended.
enum End {
    Shutdown,
    Failed(UplinkError),
    /// The primary endpoint is reachable again: go back to it now.
    PrimaryBack,
}

impl Uplink {
    /// The connections of `config`, one per share of `queue` (opened with
    /// `uplink.connections` shares); `status` becomes the first one's, the others' are added
    /// to it (so their heartbeats and states are reported).
    pub fn new(
        config: &UplinkConfig,
        credentials: Option<(String, String)>,
        queue: Queue,
        downlink: Downlink,
        down_filters: Vec<(String, u8)>,
        status: StatusHandle,
    ) -> Uplink {
        let count = queue.share_count().max(1);
        let first = Lane::new(config, credentials, queue, downlink, down_filters, status);
        let mut lanes = Vec::with_capacity(count);
        for n in 1..count {
            let mut lane = Lane {
                options: first.options.clone(),
                endpoints: first.endpoints.clone(),
                config: first.config.clone(),
                queue: first.queue.clone(),
                downlink: first.downlink.clone(),
                down_filters: Vec::new(),
                status: first.status.another(),
                share: n,
                first: false,
                label: String::new(),
            };
            // Its own session: `{client_id}-{n}`; no will (presence is the first one's).
            lane.options.client_id = format!("{}-{n}", first.options.client_id);
            lane.options.will = None;
            lane.label = format!("uplink {}", lane.options.client_id);
            lane.status.set_client_id(&lane.options.client_id);
            lanes.push(lane);
        }
        let mut first = first;
        first.status.set_client_id(&first.options.client_id);
        if count > 1 {
            first.label = format!("uplink {}", first.options.client_id);
        }
        lanes.insert(0, first);
        Uplink { lanes }
    }

    /// Runs every connection until shutdown.
    pub async fn run(self, shutdown: Shutdown) {
        let tasks: Vec<_> = self
            .lanes
            .into_iter()
            .map(|lane| tokio::spawn(lane.run(shutdown.clone())))
            .collect();
        for t in tasks {
            if let Err(e) = t.await {
                log::error!("uplink: a connection task ended abnormally: {e}");
            }
        }
    }
}

impl Lane {
    fn new(
        config: &UplinkConfig,
        credentials: Option<(String, String)>,
        queue: Queue,
        downlink: Downlink,
        down_filters: Vec<(String, u8)>,
        status: StatusHandle,
    ) -> Lane {
        let mut endpoints: Vec<Endpoint> = config
            .endpoint_urls()
            .iter()
            .filter_map(|u| Endpoint::parse(u).ok())
            .collect();
        if endpoints.is_empty() {
            // Config validation rejects this; keep the built-in default rather than panic.
            endpoints.extend(Endpoint::parse("mqtt://127.0.0.1:1884").ok());
        }
        let options = LinkOptions {
            host: endpoints[0].host.clone(),
            port: endpoints[0].port,
            transport: LinkTransport::Tcp,
            client_id: config.client_id.clone(),
            protocol: config.protocol,
            keep_alive: config.keep_alive,
            session_expiry: config.session_expiry,
            inflight: config.inflight.unwrap_or(DEFAULT_WINDOW),
            max_packet_size: u32::try_from(config.max_packet_size.as_u64()).unwrap_or(u32::MAX),
            credentials,
            will: Some((config.status_topic.clone(), Bytes::from_static(b"offline"))),
            proxy: config
                .proxy
                .as_deref()
                .and_then(transport::HttpProxy::parse),
        };
        Lane {
            options,
            endpoints,
            config: config.clone(),
            queue,
            downlink,
            down_filters,
            status,
            share: 0,
            first: true,
            label: "uplink".into(),
        }
    }

    /// Connects, drains and reconnects until shutdown.
    pub async fn run(self, mut shutdown: Shutdown) {
        let mut failures: u32 = 0;
        // The oldest unacknowledged row when the last connection was closed by the peer.
        let mut close_head: Option<i64> = None;
        let mut last_reason: Option<String> = None;
        let mut current = 0usize;
        let mut commits = self.queue.commits(self.share);
        let watcher = tokio::spawn(netwatch::watch(self.status.clone(), self.endpoints.clone()));
        loop {
            if shutdown.is_shutdown() {
                break;
            }
            let endpoint = &self.endpoints[current];
            self.status.set_endpoint(&endpoint.url);
            self.status.set(LinkState::Connecting, None);
            let connect_wait = self.config.connect_timeout + Duration::from_secs(1);
            self.status.heartbeat().expect_within(connect_wait);
            let started = Instant::now();
            let mut drain = Drain::default();
            let end = self
                .connection(
                    endpoint,
                    current > 0,
                    &mut shutdown,
                    &mut close_head,
                    &mut drain,
                    &mut commits,
                )
                .await;
            // What the next connection sends again and the central broker may already have:
            // the bound on duplicates in docs/guarantees.md.
            let unanswered = drain.written.len();
            if unanswered > 0 && !matches!(end, End::Shutdown) {
                log::info!(
                    "{}: connection ended with {unanswered} messages written and not acknowledged",
                    self.label
                );
            }
            // Rows the central broker acknowledged are deleted before the next connection
            // fetches, so they are not sent twice.
            drain.finish_acks(&self.queue).await;
            let reason = match end {
                End::Shutdown => break,
                End::PrimaryBack => {
                    log::info!(
                        "{}: primary {} is reachable again; switching back from {}",
                        self.label,
                        self.endpoints[0].url,
                        endpoint.url
                    );
                    current = 0;
                    failures = 0;
                    continue;
                }
                End::Failed(reason) => reason.to_string(),
            };
            failures = failures_after(failures, started.elapsed());
            let url = endpoint.url.clone();
            // Fail over in order: the next endpoint is tried after the backoff.
            current = (current + 1) % self.endpoints.len();
            let delay = backoff(self.config.backoff_min, self.config.backoff_max, failures);
            failures = failures.saturating_add(1);
            self.status.set(LinkState::BackingOff, Some(reason.clone()));
            // Say a new failure once; repeat a persisting one only now and then, so a long
            // outage does not flood the journal.
            if last_reason.as_deref() != Some(reason.as_str()) {
                log::warn!(endpoint = url.as_str(); "{} {url}: {reason}; retrying", self.label);
                last_reason = Some(reason);
            } else if failures % 100 == 0 {
                log::warn!(
                    endpoint = url.as_str();
                    "{} {url}: still failing after {failures} attempts: {reason}",
                    self.label
                );
            }
            self.status.heartbeat().expect_within(delay);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.status.reconnect_requested() => {}
                _ = shutdown.recv() => break,
            }
        }
        watcher.abort();
        self.status.set(LinkState::Stopped, None);
    }

    async fn connection(
        &self,
        endpoint: &Endpoint,
        on_fallback: bool,
        shutdown: &mut Shutdown,
        close_head: &mut Option<i64>,
        drain: &mut Drain,
        commits: &mut tokio::sync::watch::Receiver<u64>,
    ) -> End {
        let end = self
            .connect_and_drain(endpoint, on_fallback, shutdown, drain, commits)
            .await;
        match end {
            Ended::Link(e) => {
                // Rows the central broker acknowledged before the end are deleted all the
                // same, so they are not sent again.
                drain.submit_acks(&self.queue);
                self.lost(drain);
                *close_head = self.blame(drain, &e, close_head.take()).await;
                End::Failed(UplinkError::Lost(e))
            }
            Ended::Other(end) => {
                *close_head = None;
                end
            }
            Ended::NotConnected(end) => end,
        }
    }

    async fn connect_and_drain(
        &self,
        endpoint: &Endpoint,
        on_fallback: bool,
        shutdown: &mut Shutdown,
        drain: &mut Drain,
        commits: &mut tokio::sync::watch::Receiver<u64>,
    ) -> Ended {
        // A reconnect asked for while no connection was up (the netlink watch racing a state
        // change) is void now: clear it, or it would cut this connection short.
        if tokio::time::timeout(Duration::ZERO, self.status.reconnect_requested())
            .await
            .is_ok()
        {
            log::debug!(
                "{}: dropped a reconnect request from before the connection",
                self.label
            );
        }
        let mut options = self.options.clone();
        options.host = endpoint.host.clone();
        options.port = endpoint.port;
        options.transport = match self.transport(endpoint) {
            Ok(t) => t,
            Err(e) => return Ended::NotConnected(End::Failed(e)),
        };
        let mut link = Link::start(&options);
        let connect_deadline = self.config.connect_timeout + Duration::from_secs(1);
        let connected = tokio::select! {
            ev = tokio::time::timeout(connect_deadline, link.next_event()) => ev,
            _ = shutdown.recv() => return Ended::Other(End::Shutdown),
        };
        let (session_present, receive_maximum, broker_max_packet) = match connected {
            Ok(Ok(LinkEvent::Connected {
                session_present,
                receive_maximum,
                max_packet_size,
            })) => (session_present, receive_maximum, max_packet_size),
            Ok(Ok(other)) => {
                return Ended::NotConnected(End::Failed(UplinkError::NoConnack(format!(
                    "{other:?}"
                ))))
            }
            Ok(Err(e)) => return Ended::NotConnected(End::Failed(UplinkError::Connect(e))),
            Err(_) => return Ended::NotConnected(End::Failed(UplinkError::ConnectTimeout)),
        };
        let window = usize::from(window_for(receive_maximum, self.config.inflight));
        let max_packet = broker_max_packet
            .unwrap_or(u32::MAX)
            .min(self.options.max_packet_size) as usize;
        // Before the state says connected, so the netlink watch compares with this route.
        self.status
            .set_route_source(netwatch::route_source(endpoint).await);
        self.status.set(LinkState::Connected, None);
        log::info!(
            endpoint = endpoint.url.as_str();
            "{} {}: connected (session present: {session_present}, window {window}{})",
            self.label,
            endpoint.url,
            match receive_maximum {
                Some(rm) => format!(", broker's Receive Maximum {rm}"),
                None => String::new(),
            }
        );
        // On every connect, with the session there or not: the subscription asks for the
        // retained snapshot (Retain Handling 0), because the central broker may have dropped
        // what it queued for this session while the link was down (Mosquitto keeps 1,000
        // messages by default), or hold no session for a relay on a fresh store at all.
        // What is not newer than the local state is dropped on the way in (unchanged retained
        // messages, and the version rules of the routes that have them).
        if let Err(e) = link.subscribe(&self.down_filters) {
            return Ended::Other(End::Failed(UplinkError::Subscribe(e)));
        }

        let mut drainer = match self.queue.drainer(self.share) {
            Ok(d) => d,
            Err(e) => return Ended::Other(End::Failed(UplinkError::OpenStore(e))),
        };
        drain.throttle =
            throttle::Throttle::new(self.config.max_bytes_per_second.map(|b| b.as_u64()));
        if self.first {
            if let Err(e) = link.publish(presence(&self.config.status_topic, "online")) {
                return Ended::Other(End::Failed(UplinkError::Presence(e)));
            }
            drain.queued.push_back(Tag::Presence);
            drain.presence_in_flight = true;
        }

        let keep_alive = self.config.keep_alive;
        // Checked on the liveness tick, so the threshold leaves one tick of room: a link that
        // dies right after a packet arrived is declared dead within 1.5 x keep-alive.
        let dead_after = (keep_alive + keep_alive / 2).saturating_sub(LIVENESS_TICK * 2);
        // A live link whose broker never answers a PUBLISH it took: NATS does that when its
        // JetStream write times out during a leader change, with no error and the connection
        // up. Only a new connection gets the message sent again.
        let answer_within = ack_deadline(keep_alive);
        let mut liveness = tokio::time::interval(LIVENESS_TICK);
        let probe_every = self.config.probe_primary_every;
        let mut probe =
            tokio::time::interval_at(tokio::time::Instant::now() + probe_every, probe_every);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut probing: Option<tokio::task::JoinHandle<bool>> = None;
        let mut more = true;
        loop {
            if let Err(e) = drain.settle_acks() {
                self.lost(drain);
                return Ended::Other(End::Failed(UplinkError::DeleteAcked(e)));
            }
            self.status.set_window(window, drain.publishes_in_flight());
            if more && drain.publishes_in_flight() < window {
                match self
                    .fill(&link, &mut drainer, drain, window, max_packet)
                    .await
                {
                    Ok(filled_all) => more = filled_all,
                    Err(e) => return Ended::Other(End::Failed(e)),
                }
            }
            tokio::select! {
                ev = link.next_event() => {
                    // Take every event already waiting too, so that one delete and one fetch
                    // cover a burst of PUBACKs instead of a commit each.
                    let mut ev = ev;
                    let mut handled = 0;
                    loop {
                        match ev {
                            Ok(ev) => {
                                if let Err(e) = self.on_event(&link, drain, ev, &mut more).await {
                                    drain.submit_acks(&self.queue);
                                    self.lost(drain);
                                    return Ended::Other(End::Failed(e));
                                }
                            }
                            Err(e) => return Ended::Link(e),
                        }
                        // Stop before taking another event, never after: an event taken
                        // from the link and not handled is lost (a downlink message never
                        // delivered, a PUBACK never matched).
                        handled += 1;
                        if handled == MAX_BURST {
                            break;
                        }
                        match link.try_next_event() {
                            Some(next) => ev = next,
                            None => break,
                        }
                    }
                    drain.coalesce_acks(&self.queue);
                }
                Ok(()) = commits.changed() => more = true,
                _ = liveness.tick() => {
                    drain.submit_acks(&self.queue);
                    crate::heartbeat::beat_or_hang(self.status.heartbeat()).await;
                    if drain.retry_due() {
                        more = true;
                    }
                    // Bytes from the broker, or ours acknowledged by its TCP, prove the link
                    // alive; our own writes do not (they succeed into a dead link until the
                    // socket buffer fills).
                    let silent = link.silent_for();
                    if silent > dead_after {
                        self.lost(drain);
                        return Ended::Other(End::Failed(UplinkError::Dead {
                            silent_s: silent.as_secs_f64(),
                            keep_alive_s: keep_alive.as_secs(),
                        }));
                    }
                    // Counted from when the message left: behind a long write on a slow
                    // stretch it is still on its way.
                    let unanswered = drain
                        .unanswered_for(link.sending(), link.idle_for())
                        .filter(|w| *w > answer_within);
                    if let Some(waited) = unanswered {
                        self.lost(drain);
                        return Ended::Other(End::Failed(UplinkError::Unanswered {
                            waited_s: waited.as_secs_f64(),
                        }));
                    }
                }
                _ = self.status.reconnect_requested() => {
                    self.lost(drain);
                    return Ended::Other(End::Failed(UplinkError::ReconnectRequested));
                }
                _ = probe.tick(), if on_fallback && probing.is_none() => {
                    // In a task of its own: a blackholed primary takes the whole connect
                    // timeout to fail, and this connection keeps draining meanwhile.
                    let primary = self.endpoints[0].clone();
                    let within = self.config.connect_timeout;
                    probing = Some(tokio::spawn(async move { primary.reachable(within).await }));
                }
                healthy = async { probing.as_mut().expect("guarded by is_some").await },
                    if probing.is_some() =>
                {
                    probing = None;
                    if matches!(healthy, Ok(true)) {
                        drain.submit_acks(&self.queue);
                        self.lost(drain);
                        // A clean DISCONNECT: the session stays and the will is not sent.
                        link.disconnect();
                        let _ =
                            tokio::time::timeout(Duration::from_millis(300), link.next_event())
                                .await;
                        return Ended::Other(End::PrimaryBack);
                    }
                }
                _ = shutdown.recv() => {
                    drain.submit_acks(&self.queue);
                    self.goodbye(&mut link).await;
                    return Ended::Other(End::Shutdown);
                }
            }
        }
    }

    /// Sends rows from the store until the window is full. Returns whether the store may
    /// hold more rows that were not fetched.
    async fn fill(
        &self,
        link: &Link,
        drainer: &mut Drainer,
        drain: &mut Drain,
        window: usize,
        max_packet: usize,
    ) -> Result<bool, UplinkError> {
        if let Some(t) = drain.throttle.as_mut() {
            if !t.ready(Instant::now()) {
                // Over the bandwidth cap: the liveness tick tries again.
                return Ok(true);
            }
        }
        let want = window.saturating_sub(drain.publishes_in_flight());
        let batch = drain
            .next_rows(drainer, self.queue.rewinds(), want)
            .map_err(UplinkError::FetchRows)?;
        let out_of_order = batch.out_of_order;
        let batch = batch.entries;
        let got = batch.len();
        let now = Stamp::now();
        for entry in batch {
            if drain
                .throttle
                .as_mut()
                .is_some_and(|t| !t.ready(Instant::now()))
            {
                return Ok(true);
            }
            match self.send(link, &entry, &now, max_packet) {
                Send::Sent(size) => {
                    drain.sent(entry.id, size);
                    if let Some(t) = drain.throttle.as_mut() {
                        t.take(entry.message.topic.len() + entry.message.payload.len());
                    }
                }
                Send::Skip => {
                    drain.skipped.insert(entry.id);
                }
                Send::Refused(reason) => {
                    self.failed(drain, entry.id, format!("cannot be sent: {reason}"))
                        .await;
                }
                Send::Busy => return Ok(true),
            }
            drain.passed(&entry, out_of_order);
        }
        // A full batch means a backlog: say so, so nobody mistakes a long drain for a hang.
        self.status.set_draining(got == want);
        Ok(got == want)
    }

    fn send(&self, link: &Link, entry: &Entry, now: &Stamp, max_packet: usize) -> Send {
        let m = &entry.message;
        let expiry_secs = match m.deadline {
            None => None,
            Some(deadline) => match deadline.remaining(now) {
                Some(left) => Some(clock::expiry_secs(left)),
                // Expired since it was fetched: leave it to the sweeper.
                None => return Send::Skip,
            },
        };
        let mut properties = m.properties.clone();
        properties
            .user_properties
            .push(("trainrelay-msg-id".into(), entry.msg_id.clone()));
        let out = OutPublish {
            topic: m.topic.clone(),
            payload: m.payload.clone(),
            qos: m.qos,
            retain: m.retain,
            properties,
            expiry_secs,
        };
        // The whole packet as it goes on the wire, properties included: a broker that gets
        // more than its Maximum Packet Size disconnects (0x95), and the message would be sent
        // again on every connection.
        let size = wire::publish_size(self.options.protocol, &out);
        if size > max_packet {
            return Send::Refused(format!(
                "its {size}-byte packet exceeds the central broker's maximum packet size \
                 {max_packet}"
            ));
        }
        match link.publish(out) {
            Ok(()) => Send::Sent(size),
            Err(_) => Send::Busy,
        }
    }

    async fn on_event(
        &self,
        link: &Link,
        drain: &mut Drain,
        ev: LinkEvent,
        more: &mut bool,
    ) -> Result<(), UplinkError> {
        match ev {
            LinkEvent::Sent { pkid } => {
                let Some(tag) = drain.queued.pop_front() else {
                    return Err(UplinkError::UnrequestedSend(pkid));
                };
                if pkid == 0 {
                    // QoS 0: done once written.
                    if let Tag::Row(id) = tag {
                        drain.acked(id);
                        *more = true;
                    }
                } else {
                    match tag {
                        Tag::Row(id) => drain.wrote(id),
                        Tag::Presence => drain.wrote_presence(),
                    }
                    drain.by_pkid.insert(pkid, tag);
                }
            }
            LinkEvent::Acked { pkid, refused } => {
                let Some(tag) = drain.by_pkid.remove(&pkid) else {
                    return Ok(());
                };
                if tag == Tag::Presence {
                    drain.answered_presence();
                }
                if let Tag::Row(id) = tag {
                    drain.answered(id);
                    match refused {
                        None => {
                            drain.acked(id);
                            self.status.count_forwarded(1);
                        }
                        Some(reason) => {
                            self.failed(
                                drain,
                                id,
                                format!("refused by the central broker: {reason}"),
                            )
                            .await;
                        }
                    }
                    *more = true;
                }
            }
            LinkEvent::Message { message, token } => {
                self.downlink
                    .deliver(*message)
                    .await
                    .map_err(UplinkError::Downlink)?;
                link.ack(token).map_err(UplinkError::Ack)?;
            }
            LinkEvent::Connected { .. } | LinkEvent::Other => {}
        }
        Ok(())
    }

    /// The transport for `endpoint`; TLS settings are read at every connect, so a renewed
    /// certificate is picked up without a restart.
    fn transport(&self, endpoint: &Endpoint) -> Result<LinkTransport, UplinkError> {
        use endpoint::Scheme;
        let tls = || tls::client_config(&self.config).map_err(UplinkError::TlsSetup);
        let host = if endpoint.host.contains(':') {
            format!("[{}]", endpoint.host)
        } else {
            endpoint.host.clone()
        };
        Ok(match endpoint.scheme {
            Scheme::Mqtt => LinkTransport::Tcp,
            Scheme::Mqtts => LinkTransport::Tls(tls()?),
            Scheme::Ws => {
                LinkTransport::Ws(format!("ws://{host}:{}{}", endpoint.port, endpoint.path))
            }
            Scheme::Wss => LinkTransport::Wss(
                format!("wss://{host}:{}{}", endpoint.port, endpoint.path),
                tls()?,
            ),
        })
    }

    /// A delivery of row `id` failed: count it, and retry it later on this connection, or,
    /// at `uplink.max_attempts`, move it to the dead letters so the queue behind it flows.
    async fn failed(&self, drain: &mut Drain, id: i64, reason: String) {
        let msg_id = self.queue.msg_id(id);
        let max = self.config.max_attempts;
        match self.queue.record_failure(id, reason.clone(), max).await {
            Ok(Failure::DeadLettered) => {
                self.status.count_dead_lettered(1);
                log::error!(
                    "uplink: message {msg_id} moved to the dead letters after {max} attempts: \
                     {reason}"
                );
            }
            Ok(Failure::Counted(n)) => {
                log::warn!("uplink: message {msg_id} {reason} (attempt {n} of {max})");
                let delay = backoff(self.config.backoff_min, self.config.backoff_max, n);
                drain.retry_at.insert(id, Instant::now() + delay);
            }
            Ok(Failure::Gone) => {}
            Err(e) => {
                log::warn!("uplink: message {msg_id} {reason}; cannot record it: {e}");
                drain.skipped.insert(id);
            }
        }
    }

    /// Weighs how a link ended against the messages it carried. Returns the row to remember
    /// as the head of this close, for the next connection's end to compare with.
    ///
    /// A message is blamed (counts a failed attempt, see [`Lane::failed`]) only on evidence:
    /// - a DISCONNECT with reason 0x95 (packet too large): the largest message written and not
    ///   acknowledged (the size check before sending keeps this from happening unless the
    ///   broker takes less than it announced);
    /// - the broker closing the connection without a reason on two consecutive connections
    ///   while the same row was the oldest unacknowledged one and nothing written after it was
    ///   acknowledged: a broker that cannot take a message and processes in order (NATS 2.9
    ///   with a `.` in a topic) does exactly that on every resend.
    ///
    /// A single close or reset is the network's: carrier NATs, firewalls, load balancers and a
    /// gracefully restarting central broker all do it to healthy messages. Timeouts (tunnels,
    /// interface switches) never count.
    async fn blame(&self, drain: &Drain, error: &LinkError, previous: Option<i64>) -> Option<i64> {
        if let LinkError::Disconnected {
            code: Some(error::PACKET_TOO_LARGE),
            ..
        } = error
        {
            if let Some(id) = drain.largest_unacknowledged() {
                let reason = format!("was refused by the central broker ({error})");
                self.failed(&mut Drain::default(), id, reason).await;
            }
            return None;
        }
        if !error.peer_closed() {
            return None;
        }
        let head = drain.close_suspect()?;
        if previous == Some(head) {
            let reason = format!(
                "was the oldest unacknowledged message when the broker closed the connection, \
                 twice in a row ({error})"
            );
            self.failed(&mut Drain::default(), head, reason).await;
        }
        Some(head)
    }

    fn lost(&self, drain: &Drain) {
        let n = drain.rows_in_flight() as u64;
        if n > 0 {
            self.status.count_resent(n);
        }
    }

    /// Clean end: tell the central broker we are going (retained `offline`), then DISCONNECT.
    async fn goodbye(&self, link: &mut Link) {
        if self.first
            && link
                .publish(presence(&self.config.status_topic, "offline"))
                .is_ok()
        {
            let acked = tokio::time::timeout(Duration::from_secs(1), async {
                while let Ok(ev) = link.next_event().await {
                    if matches!(ev, LinkEvent::Acked { .. }) {
                        break;
                    }
                }
            })
            .await;
            if acked.is_err() {
                log::debug!(
                    "{}: the offline presence was not acknowledged within 1s",
                    self.label
                );
            }
        }
        link.disconnect();
        // Gives the connection task a moment to write the DISCONNECT; whatever comes back
        // (the broker closing, or nothing) ends the link either way.
        if tokio::time::timeout(Duration::from_millis(300), link.next_event())
            .await
            .is_err()
        {
            log::debug!(
                "{}: the broker did not close within 300ms of DISCONNECT",
                self.label
            );
        }
    }
}

enum Send {
    /// Handed to the link; the packet's size on the wire.
    Sent(usize),
    /// Expired in the meantime; not sent.
    Skip,
    /// Can never be sent as it is.
    Refused(String),
    /// The request channel is full; try again later.
    Busy,
}

/// The in-flight window of a connection: the broker's Receive Maximum, capped by
/// `uplink.inflight` if set, else by [`DEFAULT_WINDOW`] (which is also the window when the
/// broker announces none: MQTT 3.1.1).
fn window_for(receive_maximum: Option<u16>, cap: Option<u16>) -> u16 {
    let cap = cap.unwrap_or(DEFAULT_WINDOW);
    receive_maximum.unwrap_or(cap).min(cap).max(1)
}

/// The failure count the next backoff starts from after a connection that lasted `lasted`: a
/// connection that held for [`STABLE_AFTER`] was a success, so the backoff starts again from
/// `backoff_min` instead of growing from every earlier failure.
fn failures_after(failures: u32, lasted: Duration) -> u32 {
    if lasted >= STABLE_AFTER {
        0
    } else {
        failures
    }
}

/// How long a written PUBLISH may wait for its PUBACK on a live link: three keep-alives
/// (45 s by default), far beyond any broker's processing time and any queueing behind a window
/// of large messages on a slow link.
fn ack_deadline(keep_alive: Duration) -> Duration {
    keep_alive * 3
}

/// Exponential backoff with full jitter: uniform in [min, min(max, min × 2^(failures + 1))].
/// Even the first retry is jittered (over [min, 2 × min]): when a central node dies, every
/// connection of the fleet on it loses its link in the same instant, and a fixed first delay
/// would bring them all back in the same instant too.
fn backoff(min: Duration, max: Duration, failures: u32) -> Duration {
    let doublings = failures.saturating_add(1).min(20);
    let cap = min
        .saturating_mul(1u32.checked_shl(doublings).unwrap_or(u32::MAX))
        .min(max);
    let span = cap.saturating_sub(min).as_millis() as u64;
    min + Duration::from_millis(fastrand::u64(0..=span))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_follows_the_broker_within_the_cap() {
        // Mosquitto's default, EMQX's, HiveMQ's: the broker's word.
        assert_eq!(window_for(Some(20), None), 20);
        assert_eq!(window_for(Some(32), None), 32);
        assert_eq!(window_for(Some(10), Some(256)), 10);
        // The cap, set or built in, bounds a generous broker.
        assert_eq!(window_for(Some(1000), Some(256)), 256);
        assert_eq!(window_for(Some(u16::MAX), None), DEFAULT_WINDOW);
        // 3.1.1: no Receive Maximum.
        assert_eq!(window_for(None, None), DEFAULT_WINDOW);
        assert_eq!(window_for(None, Some(64)), 64);
    }

    #[test]
    fn only_the_head_of_an_unanswered_run_is_suspect() {
        let mut d = Drain::default();
        for id in [10, 11, 12] {
            d.in_flight.insert(id, 100 + id as usize);
            d.wrote(id);
        }
        assert_eq!(d.close_suspect(), Some(10));
        assert_eq!(d.largest_unacknowledged(), Some(12));
        // The broker answered a message written after 10: it got past 10, so 10 did not
        // make it close the connection.
        d.answered(11);
        assert_eq!(d.close_suspect(), None);
        // 12 is the oldest unanswered now, with nothing written after it answered.
        d.answered(10);
        assert_eq!(d.close_suspect(), Some(12));
        d.in_flight.insert(13, 1);
        d.wrote(13);
        assert_eq!(d.close_suspect(), Some(12));
    }

    #[test]
    fn the_answer_deadline_counts_from_when_a_message_left_the_socket() {
        let mut d = Drain::default();
        d.in_flight.insert(7, 100);
        d.wrote(7);
        // Still leaving (a long write on a slow stretch): its wait does not count yet.
        assert_eq!(d.unanswered_for(true, Duration::ZERO), None);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(d.unanswered_for(true, Duration::ZERO), None);
        // The socket has been idle for 10 ms: it left at the latest then.
        let waited = d
            .unanswered_for(false, Duration::from_millis(10))
            .expect("known to have left");
        assert!(waited >= Duration::from_millis(10), "{waited:?}");
        assert!(waited < Duration::from_millis(30), "{waited:?}");
        // Once known, bytes of later writes waiting to leave do not reset it.
        let later = d.unanswered_for(true, Duration::ZERO).expect("still known");
        assert!(later >= waited);
        // The next message takes its own measure.
        d.answered(7);
        d.in_flight.insert(8, 100);
        d.wrote(8);
        assert_eq!(d.unanswered_for(true, Duration::ZERO), None);
    }

    #[test]
    fn the_presence_message_waits_under_the_same_deadline_and_is_never_blamed() {
        let mut d = Drain {
            presence_in_flight: true,
            ..Drain::default()
        };
        d.wrote_presence();
        d.in_flight.insert(3, 100);
        d.wrote(3);
        // The presence message is the oldest unanswered one: its wait counts.
        let waited = d
            .unanswered_for(false, Duration::ZERO)
            .expect("presence left the socket");
        assert!(waited < Duration::from_secs(1));
        // A broker that closes the connection never blames presence (not a stored row): the
        // suspect is the oldest row.
        assert_eq!(d.close_suspect(), Some(3));
        assert_eq!(d.largest_unacknowledged(), Some(3));
        // Once presence is answered, the row behind it is measured.
        d.answered_presence();
        assert!(!d.presence_in_flight);
        assert_eq!(d.written.len(), 1);
        assert_eq!(d.close_suspect(), Some(3));
    }

    #[test]
    fn a_connection_that_lasted_30s_resets_the_backoff() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(60));
        // A link that keeps failing quickly keeps its count: the backoff keeps growing.
        assert_eq!(failures_after(12, Duration::ZERO), 12);
        assert_eq!(
            failures_after(12, STABLE_AFTER - Duration::from_millis(1)),
            12
        );
        // One that held for 30 s starts again from `backoff_min`.
        assert_eq!(STABLE_AFTER, Duration::from_secs(30));
        assert_eq!(failures_after(12, STABLE_AFTER), 0);
        assert_eq!(failures_after(12, Duration::from_secs(3600)), 0);
        for _ in 0..100 {
            let first = backoff(min, max, failures_after(12, STABLE_AFTER));
            assert!(first >= min && first <= min * 2, "{first:?}");
        }
        // Without the reset, 12 failures would allow waits up to `backoff_max`.
        assert!((0..1000).any(|_| backoff(min, max, 12) > Duration::from_secs(1)));
    }

    #[test]
    fn backoff_stays_in_bounds() {
        let (min, max) = (Duration::from_millis(500), Duration::from_secs(30));
        for failures in 0..40 {
            let d = backoff(min, max, failures);
            assert!(d >= min && d <= max, "{d:?}");
        }
        assert!(backoff(min, max, 0) <= Duration::from_secs(1));
    }

    #[test]
    fn even_the_first_retry_is_spread() {
        let (min, max) = (Duration::from_millis(500), Duration::from_secs(30));
        let firsts: Vec<Duration> = (0..1000).map(|_| backoff(min, max, 0)).collect();
        assert!(firsts.iter().all(|d| *d >= min && *d <= min * 2));
        // 1,000 draws from [0.5 s, 1 s] land in both halves.
        assert!(firsts.iter().any(|d| *d < Duration::from_millis(700)));
        assert!(firsts.iter().any(|d| *d > Duration::from_millis(800)));
    }
}
