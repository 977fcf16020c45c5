//! One task per client connection: CONNECT, then a loop over the socket, the session's queue,
//! the ingest verdicts and the keep-alive timer.
//!
//! The work is split by role: [`handshake`] reads CONNECT, authenticates and attaches the
//! session; [`inbound`] reads and dispatches the client's packets and holds back PUBLISHes
//! while the store is behind; [`publish`] runs the client's PUBLISHes through the ingest hook
//! in order (Receive Maximum included), [`uncommitted`] keeps them until their verdict; [`subscribe`] serves SUBSCRIBE and UNSUBSCRIBE; [`outbound`] writes the
//! session's messages to the client. This module owns the socket, the loop and the ending.
//!
//! # Dead clients
//! Keep-alive is measured only from what the client sends; our own writes never reset it, so a
//! client that vanished while we were sending it messages is still detected after 1.5 × its
//! keep-alive. Every write has a timeout, so a client that stops reading cannot hold the task.

mod handshake;
mod inbound;
mod outbound;
mod publish;
mod subscribe;
mod uncommitted;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use self::handshake::{PreConnect, PreError};
use self::uncommitted::{Uncommitted, Verdict};
use super::codec::{self, Outbound};
use super::state::{BrokerState, NotOwner};
use super::{BrokerEvent, ClientInfo, Protocol, RejectReason};
use crate::shutdown::Shutdown;

/// Client topic aliases we accept (advertised in CONNACK).
pub const TOPIC_ALIAS_MAX: u16 = 16;
/// A write that takes longer than this means the client stopped reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closing connection waits for the peer to take our last packet.
const LINGER: Duration = Duration::from_secs(1);
/// While the connection is held back (the store is behind), the socket is read only as long as
/// the read buffer holds less than this: enough to find the acknowledgements and pings behind
/// held PUBLISHes, little enough that TCP pushes back on the client.
pub const HELD_READ_AHEAD: usize = 64 * 1024;

/// Why a connection ended.
#[derive(Debug)]
enum ConnectionEnd {
    /// DISCONNECT with reason 0x00: the will is discarded.
    Normal,
    /// DISCONNECT 0x04 (or any other reason from the client): the will is published.
    ClientWithWill(u8),
    /// Closed by the network, a timeout, or an error of the client: the will is published.
    Abnormal(String),
    /// Another connection took the session over.
    TakenOver,
    /// The broker is shutting down: the will is published.
    Shutdown,
}

impl ConnectionEnd {
    fn describe(&self) -> String {
        match self {
            ConnectionEnd::Normal => "normal disconnect".into(),
            ConnectionEnd::ClientWithWill(r) => format!("client disconnected with reason {r:#04x}"),
            ConnectionEnd::Abnormal(s) => s.clone(),
            ConnectionEnd::TakenOver => "session taken over".into(),
            ConnectionEnd::Shutdown => "server shutting down".into(),
        }
    }
}

type Reader = Box<dyn AsyncRead + Send + Unpin>;
type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// A client's byte stream, whatever carries it (TCP, TLS, WebSocket).
pub struct Io {
    reader: Reader,
    writer: Writer,
    /// Subject CN of a verified client certificate (mTLS).
    cert_identity: Option<String>,
}

impl Io {
    pub fn tcp(stream: TcpStream) -> Io {
        let _ = stream.set_nodelay(true);
        let (reader, writer) = stream.into_split();
        Io {
            reader: Box::new(reader),
            writer: Box::new(writer),
            cert_identity: None,
        }
    }

    pub fn new<S: AsyncRead + AsyncWrite + Send + 'static>(
        stream: S,
        cert_identity: Option<String>,
    ) -> Io {
        let (reader, writer) = tokio::io::split(stream);
        Io {
            reader: Box::new(reader),
            writer: Box::new(writer),
            cert_identity,
        }
    }
}

/// Serves one accepted connection to the end. `refuse`: the broker is at max_connections, so
/// the client gets a "server busy" CONNACK once it has sent CONNECT.
pub async fn serve(
    io: Io,
    peer: SocketAddr,
    state: Arc<BrokerState>,
    shutdown: Shutdown,
    refuse: bool,
) {
    let mut pre = PreConnect {
        reader: io.reader,
        writer: io.writer,
        rbuf: BytesMut::with_capacity(1024),
        cert_identity: io.cert_identity,
    };
    let timeout = state.config().connect_timeout;
    let max = state.config().max_packet_size;
    let mut stop = shutdown.clone();
    let read = tokio::select! {
        r = tokio::time::timeout(timeout, pre.read_connect(max)) => r,
        _ = stop.recv() => return,
    };
    let connect = match read {
        Err(_) => {
            log::info!("local broker: {peer} sent no complete CONNECT within {timeout:?}; closing");
            state.count(|s| s.refused_connections += 1);
            return;
        }
        Ok(Err(e)) => {
            log::info!("local broker: {peer}: refused CONNECT: {e}");
            {
                state.count(|s| {
                    s.refused_connections += 1;
                    s.protocol_errors += u64::from(!matches!(e, PreError::Closed));
                });
            }
            pre.refuse_bytes(&e).await;
            return;
        }
        Ok(Ok(c)) => c,
    };
    // At the limit, a client that reconnects while its old connection still holds a slot (an
    // iPad back from a Wi-Fi dropout before its keep-alive ran out) is let in: the takeover
    // frees that slot at once.
    let takeover = refuse && state.is_connected(&connect.client_id);
    if (refuse && !takeover) || state.is_closed() {
        log::warn!(
            "local broker: refusing '{}' from {peer}: at the limit of {} connections",
            connect.client_id,
            state.config().max_connections
        );
        state.count(|s| s.refused_connections += 1);
        let code = match connect.protocol {
            Protocol::V311 => 3,
            Protocol::V5 => 0x89,
        };
        pre.connack_refusal(connect.protocol, code).await;
        return;
    }
    let Some(mut conn) = Conn::accept(pre, connect, peer, state.clone()).await else {
        return;
    };
    let end = conn.run(shutdown).await;
    if matches!(end, ConnectionEnd::TakenOver) {
        // What was queued before the session was found taken over, DISCONNECT 0x8E last.
        let _ = conn.write_out().await;
    }
    conn.finish(end);
    linger(&mut conn.reader, &mut conn.writer).await;
}

/// Closes gracefully: a socket closed with unread input sends RST, and the peer's kernel may
/// then discard our final DISCONNECT or CONNACK before the client reads it. So we half-close
/// and discard input for a short while (bounded in time) before dropping the socket.
async fn linger(reader: &mut Reader, writer: &mut Writer) {
    let _ = tokio::time::timeout(LINGER, writer.shutdown()).await;
    let deadline = Instant::now() + LINGER;
    let mut sink = [0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, reader.read(&mut sink)).await {
        if n == 0 {
            break;
        }
    }
}

struct Conn {
    state: Arc<BrokerState>,
    reader: Reader,
    writer: Writer,
    rbuf: BytesMut,
    wbuf: BytesMut,
    protocol: Protocol,
    info: ClientInfo,
    conn_id: u64,
    /// Largest packet we may send to this client.
    out_max: u32,
    keep_alive: Option<Duration>,
    last_recv: Instant,
    /// The client's messages awaiting their verdict, in order.
    pending: Uncommitted,
    /// QoS 2 packet ids PUBREC'd on this connection and awaiting PUBREL (Receive Maximum).
    unreleased: HashSet<u16>,
    aliases: HashMap<u16, String>,
    notify: Arc<Notify>,
    kick_rx: mpsc::UnboundedReceiver<u8>,
    /// Session Expiry Interval from CONNECT: 0 may not be raised by DISCONNECT.
    connect_expiry: u32,
    /// `max_publish_rate`, if set.
    bucket: Option<super::limits::TokenBucket>,
    /// The connection was held back at the last turn of the loop (no keep-alive deadline).
    held: bool,
    /// Topic aliases we gave this client (v5), up to the Topic Alias Maximum of its CONNECT:
    /// the first PUBLISH on a topic carries topic and alias, later ones the alias alone.
    out_aliases: HashMap<String, u16>,
    out_alias_max: u16,
}

impl Conn {
    fn queue(&mut self, p: Outbound) {
        if let Err(e) = codec::encode(&p, self.protocol, &mut self.wbuf, self.out_max) {
            log::warn!(
                "local broker: cannot encode a packet for '{}': {e}",
                self.info.client_id
            );
        }
    }

    async fn write_out(&mut self) -> Result<(), ConnectionEnd> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        // Flush: TLS and WebSocket streams buffer (a no-op on TCP).
        let writer = &mut self.writer;
        let wbuf = &self.wbuf;
        let write = async {
            writer.write_all(wbuf).await?;
            writer.flush().await
        };
        match tokio::time::timeout(WRITE_TIMEOUT, write).await {
            Ok(Ok(())) => {
                self.wbuf.clear();
                Ok(())
            }
            Ok(Err(e)) => Err(ConnectionEnd::Abnormal(format!("write failed: {e}"))),
            Err(_) => Err(ConnectionEnd::Abnormal(format!(
                "client did not read for {WRITE_TIMEOUT:?}"
            ))),
        }
    }

    /// The outcome of a session operation; refused ([`NotOwner`]) once another connection took
    /// the session over, which ends this connection with nothing changed (and DISCONNECT 0x8E,
    /// written as it ends).
    fn owns<T>(&mut self, r: Result<T, NotOwner>, what: &str) -> Result<T, ConnectionEnd> {
        r.map_err(|NotOwner| {
            log::info!(
                "local broker: '{}' ({}): {what} ignored: the session is held by a newer connection",
                self.info.client_id,
                self.info.peer
            );
            self.queue(Outbound::Disconnect { reason: 0x8E });
            ConnectionEnd::TakenOver
        })
    }

    /// Sends a v5 DISCONNECT (3.1.1 has none) and counts a protocol error.
    async fn protocol_error(&mut self, reason: u8, what: String) -> ConnectionEnd {
        log::warn!(
            "local broker: '{}' ({}): {what}; disconnecting",
            self.info.client_id,
            self.info.peer
        );
        self.state.count(|s| s.protocol_errors += 1);
        self.queue(Outbound::Disconnect { reason });
        let _ = self.write_out().await;
        ConnectionEnd::Abnormal(what)
    }

    async fn run(&mut self, mut shutdown: Shutdown) -> ConnectionEnd {
        if let Err(end) = self.resend_inflight().await {
            return end;
        }
        // Packets that arrived in the same read as CONNECT.
        if let Err(end) = self.process_buffered().await {
            return end;
        }
        loop {
            if let Err(end) = self.flush_queue().await {
                return end;
            }
            // While held back we are the ones not reading: no keep-alive deadline, and the
            // timer starts afresh once the store has caught up. The hold ends by the store's
            // verdicts alone, whatever the client does.
            let full = self.store_behind();
            if self.held && !full {
                self.last_recv = Instant::now();
            }
            if full && !self.held {
                self.state.count(|s| s.held_back += 1);
            }
            self.held = full;
            let deadline = self
                .keep_alive
                .filter(|_| !full)
                .map(|ka| self.last_recv + ka);
            let may_read = !full || self.rbuf.len() < HELD_READ_AHEAD;
            enum Ev {
                Kick(u8),
                Shutdown,
                Read(std::io::Result<usize>),
                Verdict(Result<(), RejectReason>),
                Notified,
                KeepAlive,
            }
            let ev = tokio::select! {
                k = self.kick_rx.recv() => Ev::Kick(k.unwrap_or(0x8E)),
                _ = shutdown.recv() => Ev::Shutdown,
                r = self.reader.read_buf(&mut self.rbuf), if may_read => Ev::Read(r),
                v = self.pending.head_verdict() => Ev::Verdict(v),
                _ = self.notify.notified() => Ev::Notified,
                _ = sleep_until(deadline) => Ev::KeepAlive,
            };
            let step = match ev {
                Ev::Kick(reason) => {
                    self.queue(Outbound::Disconnect { reason });
                    let _ = self.write_out().await;
                    return ConnectionEnd::TakenOver;
                }
                Ev::Shutdown => {
                    self.queue(Outbound::Disconnect { reason: 0x8B });
                    let _ = self.write_out().await;
                    return ConnectionEnd::Shutdown;
                }
                Ev::Read(Ok(0)) => Err(ConnectionEnd::Abnormal(
                    "connection closed by the client".into(),
                )),
                Ev::Read(Err(e)) => Err(ConnectionEnd::Abnormal(format!("read failed: {e}"))),
                Ev::Read(Ok(_)) => {
                    self.last_recv = Instant::now();
                    Ok(())
                }
                Ev::Verdict(v) => {
                    if let Some(head) = self.pending.front_mut() {
                        head.verdict = Verdict::Ready(v);
                    }
                    Ok(())
                }
                Ev::Notified => Ok(()),
                Ev::KeepAlive => {
                    let ka = self.keep_alive.unwrap_or_default();
                    Err(self
                        .protocol_error(
                            0x8D,
                            format!("nothing received for {ka:?} (1.5 × keep-alive)"),
                        )
                        .await)
                }
            };
            let step = match step {
                Ok(()) => self.process_buffered().await,
                Err(e) => Err(e),
            };
            if let Err(end) = step {
                return end;
            }
            if let Err(end) = self.write_out().await {
                return end;
            }
        }
    }

    /// Detaches from the session: schedules or fires the will, starts the session's expiry.
    fn finish(&mut self, end: ConnectionEnd) {
        let reason = end.describe();
        // The server closing the connection publishes the will (MQTT 5 §3.1.2.5), at shutdown
        // too; a will delay cannot run past our own end, so it is published at once then.
        let shutting_down = matches!(end, ConnectionEnd::Shutdown);
        let publish_will = matches!(
            end,
            ConnectionEnd::ClientWithWill(_) | ConnectionEnd::Abnormal(_) | ConnectionEnd::Shutdown
        );
        let fire_now = self
            .state
            .detach(&self.info, self.conn_id, publish_will, shutting_down);
        log::info!(
            "local broker: '{}' ({}) disconnected: {reason}",
            self.info.client_id,
            self.info.peer
        );
        if let Some(w) = fire_now {
            self.state.fire_will(self.info.clone(), w);
        }
        self.state.hooks().on_event(BrokerEvent::Disconnected {
            client: self.info.clone(),
            reason,
        });
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
