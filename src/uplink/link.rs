//! One connection to the central broker, with the protocol version hidden.
//!
//! A connection task owns the socket: it encodes every request waiting into one batch (one
//! system call for a whole refill of the in-flight window, where a write per PUBLISH would cap
//! the drain rate), writes while it goes on reading whatever arrives (so PUBACKs and PINGRESPs
//! are read during a long write on a slow stretch), assigns packet ids, pings every
//! keep-alive, watches what the broker's TCP acknowledged of our bytes (see [`Link::silent_for`]),
//! and reports normalised [`LinkEvent`]s on a channel. The uplink sends requests with non-blocking
//! calls. A `Link` lives for one connection only: on any error it is dropped (which aborts the
//! task and closes the socket) and a fresh one is made, so no client-side state — in
//! particular no replay of unacknowledged publishes — outlives a connection. The store is the
//! only source of truth.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::error::LinkError;
use super::transport::{self, Io, LinkOptions};
pub use super::wire::OutPublish;
use super::wire::{self, ConnectSpec, Incoming};
use crate::message::{Message, QoS};

/// What happened on the connection.
#[derive(Debug)]
pub enum LinkEvent {
    /// CONNACK accepted.
    Connected {
        session_present: bool,
        receive_maximum: Option<u16>,
        max_packet_size: Option<u32>,
    },
    /// A publish was written with this packet id (0 for QoS 0), in request order.
    Sent { pkid: u16 },
    /// The broker acknowledged a publish; `refused` carries the v5 reason if it did not take it.
    Acked { pkid: u16, refused: Option<String> },
    /// A message from the central broker; acknowledge it with [`Link::ack`] once handled.
    Message {
        message: Box<Message>,
        token: AckToken,
    },
    /// Any other packet from the broker (proof the link is alive).
    Other,
}

/// What [`Link::ack`] needs to acknowledge a received message.
#[derive(Debug)]
pub enum AckToken {
    /// QoS 0: nothing to acknowledge.
    None,
    Pkid(u16),
}

/// What the uplink asks of the connection task.
enum Request {
    Publish(Box<OutPublish>),
    Subscribe(Vec<(String, u8)>),
    Ack(u16),
    Disconnect,
}

/// Most requests encoded in one go.
const MAX_WRITE_BATCH: usize = 1024;

/// Requests are taken only while less than this is encoded and not yet written: a PINGREQ or
/// a PUBACK waits behind at most about this much (and the kernel's `TCP_NOTSENT_LOWAT`).
const MAX_WRITE_BYTES: usize = 64 * 1024;

/// How often the connection task reads its socket's meter (see [`SendMeter`]).
const METER_TICK: Duration = Duration::from_millis(200);

/// Events travel in batches: everything one socket read or one write produced, so the uplink
/// handles a burst of PUBACKs together and refills the window once.
type EventTx = mpsc::Sender<Vec<Result<LinkEvent, LinkError>>>;

/// One live connection attempt.
pub struct Link {
    requests: mpsc::Sender<Request>,
    events: mpsc::Receiver<Vec<Result<LinkEvent, LinkError>>>,
    /// The rest of the batch received last.
    pending: std::collections::VecDeque<Result<LinkEvent, LinkError>>,
    task: JoinHandle<()>,
    health: Arc<Health>,
}

/// Signs of life of a connection, kept by its task, read by the uplink.
struct Health {
    start: Instant,
    /// Milliseconds after `start` of the last sign of life (see [`Link::silent_for`]).
    progress_ms: AtomicU64,
    /// Milliseconds after `start` when bytes were last seen waiting to leave.
    busy_ms: AtomicU64,
    /// Bytes were waiting to leave at the last look.
    sending: AtomicBool,
}

impl Health {
    fn new() -> Health {
        Health {
            start: Instant::now(),
            progress_ms: AtomicU64::new(0),
            busy_ms: AtomicU64::new(0),
            sending: AtomicBool::new(false),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn progress(&self) {
        self.progress_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// What the last look found: bytes waiting to leave or not.
    fn looked(&self, sending: bool) {
        if sending {
            self.busy_ms.store(self.now_ms(), Ordering::Relaxed);
        }
        self.sending.store(sending, Ordering::Relaxed);
    }

    fn since(&self, at: &AtomicU64) -> Duration {
        Duration::from_millis(self.now_ms().saturating_sub(at.load(Ordering::Relaxed)))
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Link {
    /// Starts connecting; the first event is `Connected` or an error.
    pub fn start(o: &LinkOptions) -> Link {
        // Publishes beyond the in-flight window are never made; the rest is room for the
        // PUBACKs of a burst of downlink messages while a write is under way.
        let (requests, rx) = mpsc::channel(usize::from(o.inflight) + 1024);
        let (tx, events) = mpsc::channel(64);
        let options = o.clone();
        let health = Arc::new(Health::new());
        let watched = Arc::clone(&health);
        let task = tokio::spawn(async move {
            if let Err(e) = connection(options, rx, &tx, &watched).await {
                if let Err(unsent) = tx.send(vec![Err(e)]).await {
                    // The link was dropped: nobody waits for the reason any more.
                    log::debug!(
                        "uplink: connection ended after its link was dropped: {:?}",
                        unsent.0
                    );
                }
            }
        });
        Link {
            requests,
            events,
            pending: std::collections::VecDeque::new(),
            task,
            health,
        }
    }

    /// How long the link has shown no sign of life: no bytes from the broker, and none of
    /// ours acknowledged by its TCP. A live link answers the PINGREQ sent every keep-alive,
    /// and a slow one keeps acknowledging the bytes of a long write.
    pub fn silent_for(&self) -> Duration {
        self.health.since(&self.health.progress_ms)
    }

    /// How long nothing has waited to leave: neither encoded requests nor bytes in the
    /// socket's send queue. A PUBLISH the broker has not answered is only overdue once it
    /// left; until then it may still be on its way over a slow stretch.
    pub fn idle_for(&self) -> Duration {
        self.health.since(&self.health.busy_ms)
    }

    /// Whether bytes were waiting to leave at the connection task's last look (every
    /// [`METER_TICK`]).
    pub fn sending(&self) -> bool {
        self.health.sending.load(Ordering::Relaxed)
    }

    /// The next event; `Err` ends the connection.
    pub async fn next_event(&mut self) -> Result<LinkEvent, LinkError> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return item;
            }
            match self.events.recv().await {
                Some(batch) => self.pending.extend(batch),
                None => return Err(LinkError::Local("connection task ended")),
            }
        }
    }

    /// An event that is already waiting, if any; `Some(Err)` ends the connection.
    pub fn try_next_event(&mut self) -> Option<Result<LinkEvent, LinkError>> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some(item);
            }
            match self.events.try_recv() {
                Ok(batch) => self.pending.extend(batch),
                Err(mpsc::error::TryRecvError::Empty) => return None,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    return Some(Err(LinkError::Local("connection task ended")))
                }
            }
        }
    }

    fn request(&self, r: Request) -> Result<(), LinkError> {
        self.requests.try_send(r).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => LinkError::Local("request queue full"),
            mpsc::error::TrySendError::Closed(_) => LinkError::Local("connection task ended"),
        })
    }

    /// Queues a publish without waiting. `Err` means it was not queued. Properties travel on
    /// MQTT 5 only.
    pub fn publish(&self, p: OutPublish) -> Result<(), LinkError> {
        self.request(Request::Publish(Box::new(p)))
    }

    /// Acknowledges a received message.
    pub fn ack(&self, token: AckToken) -> Result<(), LinkError> {
        match token {
            AckToken::None => Ok(()),
            AckToken::Pkid(pkid) => self.request(Request::Ack(pkid)),
        }
    }

    /// Subscribes to the downlink filters, asking for the retained messages every time (see
    /// [`wire::subscribe`]).
    pub fn subscribe(&self, filters: &[(String, u8)]) -> Result<(), LinkError> {
        if filters.is_empty() {
            return Ok(());
        }
        self.request(Request::Subscribe(filters.to_vec()))
    }

    /// Asks for a clean DISCONNECT.
    pub fn disconnect(&self) {
        if let Err(e) = self.request(Request::Disconnect) {
            log::debug!("uplink: cannot ask for a clean DISCONNECT: {e}");
        }
    }
}

/// Packet ids in use (publishes and subscribes awaiting their acknowledgement).
#[derive(Default)]
struct PacketIds {
    last: u16,
    used: HashSet<u16>,
}

impl PacketIds {
    fn take(&mut self) -> Result<u16, LinkError> {
        if self.used.len() >= usize::from(u16::MAX) {
            return Err(LinkError::Local("no free packet id"));
        }
        loop {
            self.last = self.last.checked_add(1).unwrap_or(1);
            if self.used.insert(self.last) {
                return Ok(self.last);
            }
        }
    }

    fn release(&mut self, pkid: u16) {
        self.used.remove(&pkid);
    }
}

fn ended() -> LinkError {
    LinkError::Local("link dropped")
}

/// The connection task: connect, then write batches of requests, read packets and ping,
/// until an error (returned) or the [`Link`] is dropped.
async fn connection(
    o: LinkOptions,
    mut requests: mpsc::Receiver<Request>,
    events: &EventTx,
    health: &Health,
) -> Result<(), LinkError> {
    let protocol = o.protocol;
    let (mut stream, meter) = transport::open(&o).await?;
    let mut out = BytesMut::with_capacity(16 * 1024);
    let mut inbuf = BytesMut::with_capacity(16 * 1024);
    wire::connect(
        protocol,
        &ConnectSpec {
            client_id: &o.client_id,
            keep_alive: o.keep_alive,
            session_expiry: o.session_expiry,
            max_packet_size: o.max_packet_size,
            credentials: o.credentials.as_ref(),
            will: o.will.as_ref(),
        },
        &mut out,
    )?;
    write(&mut stream, &mut out).await?;
    let connack = loop {
        if let Some(p) =
            wire::decode(protocol, &mut inbuf, o.max_packet_size).map_err(LinkError::Protocol)?
        {
            break p;
        }
        read(&mut stream, &mut inbuf).await?;
    };
    match connack {
        Incoming::ConnAck {
            refused: Some(why), ..
        } => return Err(LinkError::Refused(why)),
        Incoming::ConnAck {
            session_present,
            receive_maximum,
            max_packet_size,
            ..
        } => events
            .send(vec![Ok(LinkEvent::Connected {
                session_present,
                receive_maximum,
                max_packet_size,
            })])
            .await
            .map_err(|_| ended())?,
        other => {
            return Err(LinkError::Protocol(format!(
                "expected CONNACK, got {other:?}"
            )))
        }
    }

    let mut ids = PacketIds::default();
    // Like any MQTT client: a PINGREQ every keep-alive, so a live broker always answers
    // within that time (the uplink's dead-link test counts on it).
    let keep_alive = o.keep_alive.max(Duration::from_secs(1));
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + keep_alive, keep_alive);
    let mut metering = tokio::time::interval(METER_TICK);
    metering.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut acked_before = 0u64;
    // Reading and writing go on side by side: PUBACKs and PINGRESPs are read while a large
    // batch, or one large message on a slow stretch, is still being written.
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut flush = false;
    let mut closing = false;
    health.progress();
    loop {
        // Everything that arrived, as one batch; on an error, what came before it first.
        let mut batch = Vec::new();
        let mut failed = None;
        loop {
            match wire::decode(protocol, &mut inbuf, o.max_packet_size)
                .map_err(LinkError::Protocol)
                .and_then(|p| p.map(|p| incoming(p, &mut ids)).transpose())
            {
                Ok(Some(event)) => batch.push(Ok(event)),
                Ok(None) => break,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if !batch.is_empty() {
            events.send(batch).await.map_err(|_| ended())?;
        }
        if let Some(e) = failed {
            return Err(e);
        }
        if closing && out.is_empty() && !flush {
            if let Err(e) = wr.shutdown().await {
                log::debug!("uplink: closing the stream after DISCONNECT: {e}");
            }
            return Ok(());
        }
        tokio::select! {
            r = rd.read_buf(&mut inbuf) => match r {
                Ok(0) => return Err(LinkError::Closed),
                Ok(_) => health.progress(),
                Err(e) => return Err(LinkError::io(e)),
            },
            w = push(&mut wr, &out), if !out.is_empty() || flush => {
                match w.map_err(LinkError::io)? {
                    Some(n) => {
                        let _ = out.split_to(n);
                        flush = out.is_empty();
                    }
                    None => flush = false,
                }
            }
            req = requests.recv(), if !closing && out.len() < MAX_WRITE_BYTES => {
                let Some(first) = req else {
                    return Ok(());
                };
                // Every request already waiting, up to one batch, encoded together: one write
                // for a whole refill of the window.
                let mut sent = Vec::new();
                let mut next = Some(first);
                let mut count = 0;
                while let Some(req) = next.take() {
                    match req {
                        Request::Publish(p) => {
                            let pkid = if p.qos == QoS::AtMostOnce { 0 } else { ids.take()? };
                            wire::publish(protocol, pkid, &p, &mut out);
                            sent.push(Ok(LinkEvent::Sent { pkid }));
                        }
                        Request::Subscribe(filters) => {
                            wire::subscribe(protocol, ids.take()?, &filters, &mut out);
                        }
                        Request::Ack(pkid) => wire::puback(protocol, pkid, &mut out),
                        Request::Disconnect => {
                            wire::disconnect(protocol, &mut out);
                            closing = true;
                            break;
                        }
                    }
                    count += 1;
                    if count < MAX_WRITE_BATCH && out.len() < MAX_WRITE_BYTES {
                        next = requests.try_recv().ok();
                    }
                }
                if !sent.is_empty() {
                    events.send(sent).await.map_err(|_| ended())?;
                }
            }
            _ = ping.tick() => wire::pingreq(protocol, &mut out),
            _ = metering.tick() => {
                // Bytes the broker's TCP acknowledged prove the link alive as much as a packet
                // from the broker does; bytes still waiting to leave put off the PUBACK
                // deadline (see `Link::idle_for`).
                let queued = match meter.read() {
                    Some((written, queued)) => {
                        let acked = written - queued;
                        if acked > acked_before {
                            acked_before = acked;
                            health.progress();
                        }
                        queued
                    }
                    None => 0,
                };
                health.looked(queued > 0 || !out.is_empty());
            }
        }
    }
}

/// One step of getting `out` onto the wire: writes what the socket takes (`Some(bytes)`), or
/// once all is written flushes what a TLS or WebSocket layer still holds (`None`). Either
/// may be cancelled and called again.
async fn push<W: AsyncWrite + Unpin>(wr: &mut W, out: &[u8]) -> std::io::Result<Option<usize>> {
    if out.is_empty() {
        wr.flush().await.map(|()| None)
    } else {
        wr.write(out).await.map(Some)
    }
}

/// Writes and flushes `out`, leaving it empty.
async fn write(stream: &mut Box<dyn Io>, out: &mut BytesMut) -> Result<(), LinkError> {
    stream.write_all(out).await.map_err(LinkError::io)?;
    stream.flush().await.map_err(LinkError::io)?;
    out.clear();
    Ok(())
}

/// Reads what arrived into `inbuf`; the end of the stream is an error.
async fn read(stream: &mut Box<dyn Io>, inbuf: &mut BytesMut) -> Result<(), LinkError> {
    match stream.read_buf(inbuf).await {
        Ok(0) => Err(LinkError::Closed),
        Ok(_) => Ok(()),
        Err(e) => Err(LinkError::io(e)),
    }
}

/// Turns a packet from the broker into an event; a packet that ends the connection is an
/// error.
fn incoming(packet: Incoming, ids: &mut PacketIds) -> Result<LinkEvent, LinkError> {
    Ok(match packet {
        Incoming::PubAck { pkid, refused } => {
            ids.release(pkid);
            LinkEvent::Acked { pkid, refused }
        }
        Incoming::SubAck { pkid } => {
            ids.release(pkid);
            LinkEvent::Other
        }
        Incoming::PingResp => LinkEvent::Other,
        Incoming::Publish { pkid, message } => {
            let token = match message.qos {
                QoS::AtMostOnce => AckToken::None,
                QoS::AtLeastOnce => AckToken::Pkid(pkid),
                QoS::ExactlyOnce => {
                    return Err(LinkError::Protocol(
                        "the broker sent a QoS 2 message; none was subscribed".into(),
                    ))
                }
            };
            LinkEvent::Message { message, token }
        }
        Incoming::Disconnect { code, name } => return Err(LinkError::Disconnected { code, name }),
        Incoming::ConnAck { .. } => {
            return Err(LinkError::Protocol(
                "unexpected second CONNACK from the broker".into(),
            ))
        }
        Incoming::Unexpected(name) => {
            return Err(LinkError::Protocol(format!(
                "unexpected {name} from the broker"
            )))
        }
    })
}
