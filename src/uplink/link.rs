//! One connection to the central broker, with the protocol version hidden.
//!
//! A connection task owns the socket: it writes every request waiting in one batch (one
//! system call for a whole refill of the in-flight window, where a write per PUBLISH would cap
//! the drain rate), reads whatever arrived, assigns packet ids, pings every keep-alive, and
//! reports normalised [`LinkEvent`]s on a channel. The uplink sends requests with non-blocking
//! calls. A `Link` lives for one connection only: on any error it is dropped (which aborts the
//! task and closes the socket) and a fresh one is made, so no client-side state — in
//! particular no replay of unacknowledged publishes — outlives a connection. The store is the
//! only source of truth.

use std::collections::HashSet;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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

impl LinkEvent {
    /// Whether the event is a packet from the broker (as opposed to one of our own writes).
    pub fn is_incoming(&self) -> bool {
        !matches!(self, LinkEvent::Sent { .. })
    }
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

/// Most requests written in one go.
const MAX_WRITE_BATCH: usize = 1024;

/// A batch is written once it holds this many bytes.
const MAX_WRITE_BYTES: usize = 256 * 1024;

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
        let task = tokio::spawn(async move {
            if let Err(e) = connection(options, rx, &tx).await {
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
        }
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
) -> Result<(), LinkError> {
    let protocol = o.protocol;
    let mut stream = transport::open(&o).await?;
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
    let mut sent: Vec<u16> = Vec::new();
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
        tokio::select! {
            req = requests.recv() => {
                let Some(first) = req else {
                    return Ok(());
                };
                let mut next = Some(first);
                let mut disconnect = false;
                let mut count = 0;
                while let Some(req) = next.take() {
                    match req {
                        Request::Publish(p) => {
                            let pkid = if p.qos == QoS::AtMostOnce { 0 } else { ids.take()? };
                            wire::publish(protocol, pkid, &p, &mut out);
                            sent.push(pkid);
                        }
                        Request::Subscribe(filters) => {
                            wire::subscribe(protocol, ids.take()?, &filters, &mut out);
                        }
                        Request::Ack(pkid) => wire::puback(protocol, pkid, &mut out),
                        Request::Disconnect => {
                            wire::disconnect(protocol, &mut out);
                            disconnect = true;
                            break;
                        }
                    }
                    count += 1;
                    if count < MAX_WRITE_BATCH && out.len() < MAX_WRITE_BYTES {
                        next = requests.try_recv().ok();
                    }
                }
                write(&mut stream, &mut out).await?;
                if !sent.is_empty() {
                    let batch = sent.drain(..).map(|pkid| Ok(LinkEvent::Sent { pkid })).collect();
                    events.send(batch).await.map_err(|_| ended())?;
                }
                if disconnect {
                    if let Err(e) = stream.shutdown().await {
                        log::debug!("uplink: closing the stream after DISCONNECT: {e}");
                    }
                    return Ok(());
                }
            }
            r = read(&mut stream, &mut inbuf) => r?,
            _ = ping.tick() => {
                wire::pingreq(protocol, &mut out);
                write(&mut stream, &mut out).await?;
            }
        }
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
