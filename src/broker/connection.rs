//! One task per client connection: CONNECT, then a loop over the socket, the session's queue,
//! the ingest verdicts and the keep-alive timer.
//!
//! # Inbound PUBLISH pipeline
//! Every inbound PUBLISH that passes validation and `may_publish` goes to the ingest hook at
//! once, in arrival order, and joins a FIFO of pending verdicts. The connection keeps reading
//! while verdicts are outstanding; whenever the verdict at the head of the FIFO is known, the
//! message is delivered to local subscribers and acknowledged, so deliveries and acks keep the
//! arrival order.
//!
//! # Backpressure instead of disconnects
//! The FIFO (plus QoS 2 messages awaiting PUBREL) is bounded by our Receive Maximum. When it
//! is full, the connection stops decoding PUBLISHes: they stay in the read buffer, and once
//! that holds [`HELD_READ_AHEAD`] bytes the socket is not read at all, so TCP slows the client
//! down. Decoding resumes, in order, as verdicts free the window. This serves MQTT 3.1.1
//! clients (which know no Receive Maximum) and v5 clients that ignore ours (paho-mqtt for
//! Python does) alike; a v5 client that exceeds it is counted (`receive_maximum_exceeded`),
//! not disconnected with 0x93, which the spec allows but does not require: a disconnected
//! client would only resend its whole window. While held back, the packets that cannot wait
//! behind the held PUBLISHes (PUBACK, PUBREC, PUBREL, PUBCOMP, PINGREQ) are still taken out
//! of the buffer and served, so the client's acknowledgements of our messages, the PUBRELs
//! that free the window, and its pings do not starve. A held-back connection has no
//! keep-alive deadline (we are the ones not reading); the timer restarts when the window has
//! room again.
//!
//! # Session takeover
//! A connection's id is taken when its CONNECT arrives, before authentication, which may take
//! long (argon2) and finish in any order. Under the state's lock a connection takes a session
//! over only if no connection with a later CONNECT already holds it, and only if its own client
//! has not closed the socket meanwhile: an iPad on flaky Wi-Fi that gave up on a CONNECT and
//! reconnected at once must not lose its new connection to the abandoned one.
//!
//! # Refusing a PUBLISH in 3.1.1
//! MQTT 3.1.1 has no negative PUBACK. When the ingest hook refuses a QoS 1/2 message from a
//! 3.1.1 client, the broker withholds the acknowledgement and closes the connection: the client
//! keeps the message in its session and sends it again after reconnecting, by which time the
//! relay may have room for it. An ACL denial (`may_publish` false) is different: it will not
//! change on retry, so the message is acknowledged and dropped (and counted), as 3.1.1 §4.1
//! allows.
//!
//! # Dead clients
//! Keep-alive is measured only from what the client sends; our own writes never reset it, so a
//! client that vanished while we were sending it messages is still detected after 1.5 × its
//! keep-alive. Every write has a timeout, so a client that stops reading cannot hold the task.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;

use super::codec::{self, ConnectPacket, DecodeError, InPublish, Inbound, OutPublish, Outbound};
use super::session::{ConnLink, Inflight, OutState};
use super::state::{Attach, BrokerState, NotSent};
use super::subscriptions::Subscription;
use super::{AuthVerdict, BrokerEvent, ClientInfo, ConnectRequest, Ingest, Protocol, RejectReason};
use crate::clock::{self, Stamp};
use crate::message::{Message, QoS};
use crate::shutdown::Shutdown;
use crate::topic;

/// Client topic aliases we accept (advertised in CONNACK).
pub const TOPIC_ALIAS_MAX: u16 = 16;
/// A write that takes longer than this means the client stopped reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Outgoing window for 3.1.1 clients, which cannot announce one.
const V311_WINDOW: usize = 32;
/// How long a normal DISCONNECT waits for the verdicts of messages sent just before it.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a closing connection waits for the peer to take our last packet.
const LINGER: Duration = Duration::from_secs(1);
/// QoS 0 messages written per wake-up before giving other work a turn.
const FLUSH_BATCH: usize = 256;
/// While the inbound window is full, the socket is read only as long as the read buffer holds
/// less than this: enough to find the acknowledgements and pings behind held PUBLISHes,
/// little enough that TCP pushes back on the client.
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

enum Verdict {
    Ready(Result<(), RejectReason>),
    Waiting(oneshot::Receiver<Result<(), RejectReason>>),
}

struct PendingIn {
    pkid: u16,
    qos: QoS,
    msg: Message,
    verdict: Verdict,
    acl_denied: bool,
    /// The ingest hook keeps no copy ([`Ingest::Unrouted`]).
    unrouted: bool,
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
    conn.finish(end);
    linger(&mut conn.reader, &mut conn.writer).await;
}

/// Runs the authentication hook on the blocking pool (password hashing is slow on purpose),
/// at most `AUTH_SLOTS` at a time.
async fn authenticate(
    state: &Arc<BrokerState>,
    client_id: &str,
    c: &ConnectPacket,
    cert_identity: Option<String>,
    peer: SocketAddr,
) -> AuthVerdict {
    let Ok(_slot) = Arc::clone(&state.admission().auth_slots)
        .acquire_owned()
        .await
    else {
        return AuthVerdict::NotAuthorized;
    };
    let hooks = Arc::clone(state.hooks());
    let client_id = client_id.to_string();
    let username = c.username.clone();
    let password = c.password.clone();
    let protocol = c.protocol;
    tokio::task::spawn_blocking(move || {
        hooks.authenticate(&ConnectRequest {
            client_id: &client_id,
            username: username.as_deref(),
            password: password.as_deref(),
            cert_identity: cert_identity.as_deref(),
            peer,
            protocol,
        })
    })
    .await
    .unwrap_or(AuthVerdict::NotAuthorized)
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

#[derive(Debug)]
enum PreError {
    Closed,
    Decode(DecodeError, Option<Protocol>),
}

impl std::fmt::Display for PreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PreError::Closed => write!(f, "connection closed before CONNECT"),
            PreError::Decode(e, _) => write!(f, "{e}"),
        }
    }
}

struct PreConnect {
    reader: Reader,
    writer: Writer,
    rbuf: BytesMut,
    cert_identity: Option<String>,
}

impl PreConnect {
    async fn read_connect(&mut self, max: u32) -> Result<ConnectPacket, PreError> {
        loop {
            match codec::connect_level(&self.rbuf, max) {
                Ok(Some(level)) => {
                    let protocol = if level == 5 {
                        Protocol::V5
                    } else {
                        Protocol::V311
                    };
                    match codec::decode_connect(&mut self.rbuf, protocol, max) {
                        Ok(Some(c)) => return Ok(c),
                        Ok(None) => {}
                        Err(e) => return Err(PreError::Decode(e, Some(protocol))),
                    }
                }
                Ok(None) => {}
                Err(e) => return Err(PreError::Decode(e, None)),
            }
            match self.reader.read_buf(&mut self.rbuf).await {
                Ok(0) | Err(_) => return Err(PreError::Closed),
                Ok(_) => {}
            }
        }
    }

    async fn write_raw(&mut self, bytes: &[u8]) {
        let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
            self.writer.write_all(bytes).await?;
            self.writer.flush().await
        })
        .await;
        linger(&mut self.reader, &mut self.writer).await;
    }

    /// Answers a CONNECT we could not accept, where the protocol allows an answer.
    async fn refuse_bytes(&mut self, e: &PreError) {
        match e {
            PreError::Decode(DecodeError::UnsupportedProtocol { level }, _) => {
                if *level < 5 {
                    // 3.1.1 §3.2.2.3: 0x01 unacceptable protocol level.
                    self.write_raw(&[0x20, 0x02, 0x00, 0x01]).await;
                } else {
                    // MQTT 5 §3.1.2.2: 0x84 unsupported protocol version.
                    self.write_raw(&[0x20, 0x03, 0x00, 0x84, 0x00]).await;
                }
            }
            PreError::Decode(d, Some(Protocol::V5)) => {
                let code = d.reason_code();
                self.write_raw(&[0x20, 0x03, 0x00, code, 0x00]).await;
            }
            _ => {}
        }
    }

    async fn connack_refusal(&mut self, protocol: Protocol, code: u8) {
        let mut buf = BytesMut::new();
        let p = Outbound::ConnAck {
            session_present: false,
            code,
            props: Box::new(None),
        };
        if codec::encode(&p, protocol, &mut buf, u32::MAX).is_ok() {
            self.write_raw(&buf).await;
        }
    }
}

/// Whether the client already closed the socket (EOF or error) while its CONNECT waited; bytes
/// that arrived meanwhile are kept in `rbuf`. Polls the socket once, never waits.
async fn closed_meanwhile(reader: &mut Reader, rbuf: &mut BytesMut) -> bool {
    matches!(
        tokio::time::timeout(Duration::ZERO, reader.read_buf(rbuf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
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
    pending: VecDeque<PendingIn>,
    aliases: HashMap<u16, String>,
    notify: Arc<Notify>,
    kick_rx: mpsc::UnboundedReceiver<u8>,
    /// Session Expiry Interval from CONNECT: 0 may not be raised by DISCONNECT.
    connect_expiry: u32,
    /// `max_publish_rate`, if set.
    bucket: Option<super::limits::TokenBucket>,
    /// The inbound window was full at the last turn of the loop (no keep-alive deadline).
    held: bool,
    /// This v5 connection was counted in `receive_maximum_exceeded`.
    exceeded_counted: bool,
    /// Topic aliases we gave this client (v5), up to the Topic Alias Maximum of its CONNECT:
    /// the first PUBLISH on a topic carries topic and alias, later ones the alias alone.
    out_aliases: HashMap<String, u16>,
    out_alias_max: u16,
}

impl Conn {
    /// Validates CONNECT, attaches the session, and sends CONNACK. `None` if refused.
    async fn accept(
        mut pre: PreConnect,
        c: ConnectPacket,
        peer: SocketAddr,
        state: Arc<BrokerState>,
    ) -> Option<Conn> {
        let protocol = c.protocol;
        let refuse = |v311: u8, v5: u8| match protocol {
            Protocol::V311 => v311,
            Protocol::V5 => v5,
        };
        let mut client_id = c.client_id.clone();
        let mut assigned = None;
        if client_id.is_empty() {
            if protocol == Protocol::V311 && !c.clean_start {
                log::info!("local broker: {peer}: empty client id with clean session 0; refused");
                state.count(|s| s.refused_connections += 1);
                pre.connack_refusal(protocol, 0x02).await;
                return None;
            }
            client_id = format!("trainrelay-{:016x}", fastrand::u64(..));
            if protocol == Protocol::V5 {
                assigned = Some(client_id.clone());
            }
        }
        if let Some(why) = super::limits::client_id_problem(&client_id) {
            log::info!(
                "local broker: {peer}: client id {:?} {why}; refused",
                client_id.chars().take(80).collect::<String>()
            );
            {
                state.count(|s| {
                    s.refused_connections += 1;
                    s.bad_client_ids += 1;
                });
            }
            pre.connack_refusal(protocol, refuse(0x02, 0x85)).await;
            return None;
        }
        // Connections are numbered in the order their CONNECTs arrived; authentication runs
        // in between, for however long it takes, and must not reorder takeovers.
        let conn_id = state.new_conn_id();
        if let Some(w) = &c.will {
            if let Err(e) = topic::validate_name(&w.topic) {
                log::info!(
                    "local broker: '{client_id}' from {peer}: will topic '{}' {e}",
                    w.topic
                );
                {
                    state.count(|s| {
                        s.refused_connections += 1;
                        s.protocol_errors += 1;
                    });
                }
                if protocol == Protocol::V5 {
                    pre.connack_refusal(protocol, 0x90).await;
                }
                return None;
            }
        }
        if let Some(method) = &c.auth_method {
            log::info!("local broker: '{client_id}' from {peer} asks for authentication method '{method}', which is not offered");
            state.count(|s| s.refused_connections += 1);
            pre.connack_refusal(protocol, 0x8C).await;
            return None;
        }
        let verdict = authenticate(&state, &client_id, &c, pre.cert_identity.clone(), peer).await;
        if verdict == AuthVerdict::Allow {
            state.admission().failures.succeed(peer.ip());
        } else if verdict == AuthVerdict::ClientIdNotAllowed {
            // The password was right: not a guess, so no delay and no failure counted.
            log::info!(
                "local broker: '{client_id}' from {peer}: the client id is not one user {:?} may use (its name, '{{name}}-...', or with any_client_id any id no other device owns); refused",
                c.username.as_deref().or(pre.cert_identity.as_deref()).unwrap_or("")
            );
            state.count(|s| s.bad_client_ids += 1);
        } else {
            // Slow down guessing: the delay grows with each failure from this address. It is
            // spent in this connection's task, so nobody else waits.
            let delay = state.admission().failures.fail(peer.ip());
            state.count(|s| s.auth_failures += 1);
            log::info!(
                "local broker: '{client_id}' from {peer}: authentication failed ({verdict:?}); answering in {delay:?}"
            );
            tokio::time::sleep(delay).await;
        }
        let info = ClientInfo {
            client_id: client_id.clone(),
            // A client without a username is known by its certificate, if any.
            username: c.username.clone().or_else(|| pre.cert_identity.clone()),
            peer,
            protocol,
        };
        let code = match verdict {
            AuthVerdict::Allow => None,
            AuthVerdict::BadCredentials => Some(refuse(0x04, 0x86)),
            AuthVerdict::NotAuthorized => Some(refuse(0x05, 0x87)),
            AuthVerdict::ClientIdNotAllowed => Some(refuse(0x02, 0x85)),
        };
        let code = code.or_else(|| {
            c.will
                .as_ref()
                .filter(|w| !state.hooks().may_publish(&info, &w.topic))
                .map(|_| refuse(0x05, 0x87))
        });
        if let Some(code) = code {
            log::info!("local broker: '{client_id}' from {peer} refused with CONNACK {code:#04x}");
            state.count(|s| s.refused_connections += 1);
            pre.connack_refusal(protocol, code).await;
            return None;
        }

        let max_expiry =
            u32::try_from(state.config().max_session_expiry.as_secs()).unwrap_or(u32::MAX);
        // A 3.1.1 persistent session has no expiry in the protocol; we end it after
        // max_session_expiry so sessions of iPads that never come back do not pile up.
        let expiry = match protocol {
            Protocol::V311 if c.clean_start => 0,
            Protocol::V311 => max_expiry,
            Protocol::V5 => c.session_expiry.min(max_expiry),
        };
        let out_window = match protocol {
            Protocol::V311 => V311_WINDOW,
            Protocol::V5 => usize::from(c.receive_maximum),
        };
        // A client that gave up on this CONNECT (closed the socket before our CONNACK) must
        // not take over a session it would lose again at once, perhaps from its own newer
        // connection.
        if closed_meanwhile(&mut pre.reader, &mut pre.rbuf).await {
            log::info!("local broker: '{client_id}' from {peer} closed the connection before CONNACK; its CONNECT is dropped");
            state.count(|s| s.refused_connections += 1);
            return None;
        }
        let notify = Arc::new(Notify::new());
        let (kick_tx, kick_rx) = mpsc::unbounded_channel();
        let attached = state.attach(Attach {
            link: ConnLink {
                conn_id,
                info: info.clone(),
                notify: Arc::clone(&notify),
                kick: kick_tx,
                connected_since_ms: Stamp::now().wall_ms,
                out_window: out_window.clamp(1, 65535),
            },
            clean_start: c.clean_start,
            expiry_secs: expiry,
            will: c.will.clone(),
        });
        let Some(session_present) = attached else {
            // No CONNACK: the client has a newer connection, which owns the session.
            log::info!("local broker: '{client_id}' from {peer}: a connection with a newer CONNECT for this client id holds the session; closing this one without CONNACK");
            linger(&mut pre.reader, &mut pre.writer).await;
            return None;
        };

        let props =
            (protocol == Protocol::V5).then(|| rumqttc::v5::mqttbytes::v5::ConnAckProperties {
                session_expiry_interval: (expiry != c.session_expiry).then_some(expiry),
                receive_max: Some(state.config().receive_maximum),
                max_qos: None,
                retain_available: None,
                max_packet_size: Some(state.config().max_packet_size),
                assigned_client_identifier: assigned,
                topic_alias_max: Some(TOPIC_ALIAS_MAX),
                reason_string: None,
                user_properties: Vec::new(),
                wildcard_subscription_available: None,
                subscription_identifiers_available: None,
                shared_subscription_available: Some(1),
                server_keep_alive: None,
                response_information: None,
                server_reference: None,
                authentication_method: None,
                authentication_data: None,
            });
        let out_max = c
            .max_packet_size
            .unwrap_or(u32::MAX)
            .min(state.config().max_packet_size.max(1024));
        let mut conn = Conn {
            state: Arc::clone(&state),
            reader: pre.reader,
            writer: pre.writer,
            rbuf: pre.rbuf,
            wbuf: BytesMut::with_capacity(4096),
            protocol,
            info: info.clone(),
            conn_id,
            out_max,
            keep_alive: (c.keep_alive > 0)
                .then(|| Duration::from_millis(u64::from(c.keep_alive) * 1500)),
            last_recv: Instant::now(),
            pending: VecDeque::new(),
            aliases: HashMap::new(),
            notify,
            kick_rx,
            connect_expiry: expiry,
            bucket: (state.config().max_publish_rate > 0)
                .then(|| super::limits::TokenBucket::new(state.config().max_publish_rate)),
            held: false,
            exceeded_counted: false,
            out_aliases: HashMap::new(),
            out_alias_max: if protocol == Protocol::V5 {
                c.topic_alias_max
            } else {
                0
            },
        };
        log::info!(
            "local broker: '{client_id}' connected from {peer} ({protocol:?}, keep-alive {}s, session {})",
            c.keep_alive,
            if session_present { "resumed" } else { "new" }
        );
        conn.queue(Outbound::ConnAck {
            session_present,
            code: 0,
            props: Box::new(props),
        });
        if conn.write_out().await.is_err() {
            conn.finish(ConnectionEnd::Abnormal(
                "CONNACK could not be written".into(),
            ));
            return None;
        }
        state.hooks().on_event(BrokerEvent::Connected(info));
        Some(conn)
    }

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
            // While the window is full we are the ones not reading: no keep-alive deadline,
            // and the timer starts afresh once the window has room.
            let full = self.inbound_full();
            if self.held && !full {
                self.last_recv = Instant::now();
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
                v = head_verdict(&mut self.pending) => Ev::Verdict(v),
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

    /// Resolves known verdicts and decodes what the buffer holds, as long as either frees
    /// room for the other: packets held back while the window was full are decoded as soon
    /// as verdicts make room, without waiting for the socket to wake us.
    async fn process_buffered(&mut self) -> Result<(), ConnectionEnd> {
        loop {
            self.drain_verdicts().await?;
            let before = self.rbuf.len();
            if before == 0 {
                return Ok(());
            }
            self.read_packets().await?;
            if self.rbuf.len() == before {
                return Ok(());
            }
        }
    }

    async fn read_packets(&mut self) -> Result<(), ConnectionEnd> {
        loop {
            // Window full: PUBLISHes wait in the buffer (see the module doc).
            if self.inbound_full() {
                if !self.serve_past_held().await? {
                    return Ok(());
                }
                continue;
            }
            match codec::decode(
                &mut self.rbuf,
                self.protocol,
                self.state.config().max_packet_size,
            ) {
                Ok(Some(p)) => self.handle(p).await?,
                Ok(None) => return Ok(()),
                Err(e) => return Err(self.protocol_error(e.reason_code(), e.to_string()).await),
            }
        }
    }

    /// With the window full: serves the acknowledgements and pings that follow the held
    /// PUBLISHes in the buffer, up to the first packet that must keep its place (SUBSCRIBE,
    /// DISCONNECT, ...). True if one was served (the window may have room again).
    async fn serve_past_held(&mut self) -> Result<bool, ConnectionEnd> {
        let max = self.state.config().max_packet_size;
        let mut off = 0;
        loop {
            let frame = match self
                .rbuf
                .get(off..)
                .map(|rest| codec::peek_frame(rest, max))
            {
                Some(Ok(Some(f))) => f,
                Some(Ok(None)) | None => return Ok(false),
                Some(Err(e)) => {
                    return Err(self.protocol_error(e.reason_code(), e.to_string()).await)
                }
            };
            let (byte1, len) = frame;
            match byte1 >> 4 {
                3 => {
                    if byte1 & 0x06 != 0 && self.protocol == Protocol::V5 && !self.exceeded_counted
                    {
                        self.exceeded_counted = true;
                        self.state.count(|s| s.receive_maximum_exceeded += 1);
                        log::info!(
                            "local broker: '{}' ({}) sends more than our Receive Maximum of {} unacknowledged QoS 1/2 PUBLISHes; holding them back",
                            self.info.client_id,
                            self.info.peer,
                            self.state.config().receive_maximum
                        );
                    }
                    off += len;
                }
                4..=7 | 12 => {
                    let mut tail = self.rbuf.split_off(off);
                    let decoded = codec::decode(&mut tail, self.protocol, max);
                    self.rbuf.unsplit(tail);
                    return match decoded {
                        Ok(Some(p)) => {
                            self.handle(p).await?;
                            Ok(true)
                        }
                        Ok(None) => Ok(false),
                        Err(e) => Err(self.protocol_error(e.reason_code(), e.to_string()).await),
                    };
                }
                _ => return Ok(false),
            }
        }
    }

    /// True when the client has as many QoS 1/2 PUBLISHes unacknowledged as we allow.
    fn inbound_full(&self) -> bool {
        let awaiting_rel = self.state.awaiting_release(&self.info.client_id);
        let in_flight = self
            .pending
            .iter()
            .filter(|q| q.qos != QoS::AtMostOnce)
            .count()
            + awaiting_rel;
        in_flight >= usize::from(self.state.config().receive_maximum)
    }

    async fn handle(&mut self, p: Inbound) -> Result<(), ConnectionEnd> {
        match p {
            Inbound::Publish(p) => self.on_publish(p).await,
            Inbound::PubAck(pkid) => {
                self.state
                    .acknowledged(&self.info.client_id, pkid, OutState::Puback);
                Ok(())
            }
            Inbound::PubRec { pkid, failed } => {
                if self.state.received(&self.info.client_id, pkid, failed) {
                    self.queue(Outbound::PubRel { pkid });
                }
                Ok(())
            }
            Inbound::PubComp(pkid) => {
                self.state
                    .acknowledged(&self.info.client_id, pkid, OutState::Pubcomp);
                Ok(())
            }
            Inbound::PubRel(pkid) => {
                let found = self.state.release(&self.info.client_id, pkid);
                self.queue(Outbound::PubComp {
                    pkid,
                    reason: if found { 0 } else { 0x92 },
                });
                Ok(())
            }
            Inbound::Subscribe {
                pkid,
                filters,
                sub_id,
            } => self.on_subscribe(pkid, filters, sub_id).await,
            Inbound::Unsubscribe { pkid, filters } => {
                let codes = self.state.unsubscribe(&self.info.client_id, filters);
                self.queue(Outbound::UnsubAck { pkid, codes });
                Ok(())
            }
            Inbound::PingReq => {
                self.queue(Outbound::PingResp);
                Ok(())
            }
            Inbound::Disconnect {
                reason,
                session_expiry,
            } => {
                if let Some(e) = session_expiry {
                    if self.connect_expiry == 0 && e != 0 {
                        return Err(self
                            .protocol_error(
                                0x82,
                                "DISCONNECT sets a Session Expiry Interval after CONNECT set 0"
                                    .into(),
                            )
                            .await);
                    }
                    self.state.set_expiry(&self.info.client_id, e);
                }
                // Messages sent before DISCONNECT are still owed their delivery.
                self.settle_pending().await?;
                Err(if reason == 0 {
                    ConnectionEnd::Normal
                } else {
                    ConnectionEnd::ClientWithWill(reason)
                })
            }
            Inbound::Auth => Err(self
                .protocol_error(0x82, "AUTH without an authentication method".into())
                .await),
            Inbound::ServerOnly(what) => Err(self
                .protocol_error(
                    0x82,
                    format!("client sent {what}, which only a server may send"),
                )
                .await),
        }
    }

    async fn on_publish(&mut self, p: InPublish) -> Result<(), ConnectionEnd> {
        if let Some(bucket) = &mut self.bucket {
            if !bucket.take() {
                let rate = self.state.config().max_publish_rate;
                log::warn!(
                    "local broker: '{}' ({}) sent more than {rate} PUBLISH per second; disconnecting",
                    self.info.client_id,
                    self.info.peer
                );
                self.state.count(|s| s.rate_limited += 1);
                self.queue(Outbound::Disconnect { reason: 0x96 });
                let _ = self.write_out().await;
                return Err(ConnectionEnd::Abnormal(format!(
                    "more than {rate} PUBLISH per second"
                )));
            }
        }
        let mut topic_name = p.topic;
        if self.protocol == Protocol::V5 {
            if let Some(alias) = p.topic_alias {
                if alias == 0 || alias > TOPIC_ALIAS_MAX {
                    return Err(self
                        .protocol_error(
                            0x94,
                            format!("topic alias {alias} out of range 1..={TOPIC_ALIAS_MAX}"),
                        )
                        .await);
                }
                if topic_name.is_empty() {
                    match self.aliases.get(&alias) {
                        Some(t) => topic_name = t.clone(),
                        None => {
                            return Err(self
                                .protocol_error(0x82, format!("unknown topic alias {alias}"))
                                .await)
                        }
                    }
                } else {
                    self.aliases.insert(alias, topic_name.clone());
                }
            }
        }
        if let Err(e) = topic::validate_name(&topic_name) {
            return Err(self
                .protocol_error(0x90, format!("PUBLISH topic '{topic_name}' {e}"))
                .await);
        }
        if p.qos == QoS::ExactlyOnce {
            let duplicate = self.state.is_awaiting_release(&self.info.client_id, p.pkid);
            if duplicate {
                // Already accepted and PUBREC'd: acknowledge again, deliver nothing.
                self.queue(Outbound::PubRec {
                    pkid: p.pkid,
                    reason: 0,
                });
                return Ok(());
            }
            if self
                .pending
                .iter()
                .any(|q| q.qos == QoS::ExactlyOnce && q.pkid == p.pkid)
            {
                return Ok(());
            }
        }
        let accepted = Stamp::now();
        let msg = Message {
            topic: topic_name,
            payload: p.payload,
            qos: p.qos,
            retain: p.retain,
            properties: p.properties,
            accepted,
            deadline: p
                .expiry
                .map(|s| accepted.plus(Duration::from_secs(u64::from(s)))),
        };
        let mut unrouted = false;
        let (verdict, acl_denied) = if !self.state.hooks().may_publish(&self.info, &msg.topic) {
            log::info!(
                "local broker: '{}' may not publish to '{}'; dropped",
                self.info.client_id,
                msg.topic
            );
            self.state.count(|s| s.denied_publish += 1);
            (Verdict::Ready(Err(RejectReason::NotAuthorized)), true)
        } else {
            let v = match self.state.hooks().ingest(&self.info, &msg) {
                Ingest::Accept => Verdict::Ready(Ok(())),
                Ingest::Unrouted => {
                    unrouted = true;
                    Verdict::Ready(Ok(()))
                }
                Ingest::Reject(r) => Verdict::Ready(Err(r)),
                Ingest::Pending(rx) => Verdict::Waiting(rx),
            };
            (v, false)
        };
        self.pending.push_back(PendingIn {
            pkid: p.pkid,
            qos: p.qos,
            msg,
            verdict,
            acl_denied,
            unrouted,
        });
        Ok(())
    }

    /// Waits (bounded) for every outstanding verdict and resolves them in order; used when the
    /// client ends the connection normally right after publishing.
    async fn settle_pending(&mut self) -> Result<(), ConnectionEnd> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            self.drain_verdicts().await?;
            if self.pending.is_empty() {
                return Ok(());
            }
            match tokio::time::timeout_at(deadline, head_verdict(&mut self.pending)).await {
                Ok(v) => {
                    if let Some(head) = self.pending.front_mut() {
                        head.verdict = Verdict::Ready(v);
                    }
                }
                Err(_) => {
                    log::warn!(
                        "local broker: '{}' disconnected with {} messages still awaiting the relay's verdict; they are not delivered",
                        self.info.client_id,
                        self.pending.len()
                    );
                    return Ok(());
                }
            }
        }
    }

    /// Resolves verdicts at the head of the FIFO, in order, as far as they are known.
    async fn drain_verdicts(&mut self) -> Result<(), ConnectionEnd> {
        loop {
            let Some(front) = self.pending.front_mut() else {
                return Ok(());
            };
            let result = match &mut front.verdict {
                Verdict::Ready(r) => *r,
                Verdict::Waiting(rx) => match rx.try_recv() {
                    Ok(r) => r,
                    Err(oneshot::error::TryRecvError::Empty) => return Ok(()),
                    Err(oneshot::error::TryRecvError::Closed) => {
                        Err(RejectReason::UnspecifiedError)
                    }
                },
            };
            let Some(p) = self.pending.pop_front() else {
                return Ok(());
            };
            self.resolve(p, result).await?;
        }
    }

    async fn resolve(
        &mut self,
        p: PendingIn,
        result: Result<(), RejectReason>,
    ) -> Result<(), ConnectionEnd> {
        let code = match result {
            Ok(()) => {
                let reached = self.state.publish_from(&self.info.client_id, p.msg);
                if p.unrouted && reached == 0 && self.protocol == Protocol::V5 {
                    0x10
                } else {
                    0
                }
            }
            Err(r) if p.acl_denied && self.protocol == Protocol::V311 => {
                let _ = r;
                0
            }
            Err(r) => {
                if self.protocol == Protocol::V311 && p.qos != QoS::AtMostOnce {
                    log::warn!(
                        "local broker: relay refused a message from 3.1.1 client '{}' ({r:?}); closing without PUBACK so it redelivers",
                        self.info.client_id
                    );
                    return Err(ConnectionEnd::Abnormal(format!(
                        "ingest refused a QoS {} message ({r:?})",
                        p.qos as u8
                    )));
                }
                match r {
                    RejectReason::UnspecifiedError => 0x80,
                    RejectReason::ImplementationSpecificError => 0x83,
                    RejectReason::NotAuthorized => 0x87,
                    RejectReason::QuotaExceeded => 0x97,
                }
            }
        };
        match p.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.queue(Outbound::PubAck {
                pkid: p.pkid,
                reason: code,
            }),
            QoS::ExactlyOnce => {
                if code < 0x80 {
                    self.state.await_release(&self.info.client_id, p.pkid);
                }
                self.queue(Outbound::PubRec {
                    pkid: p.pkid,
                    reason: code,
                });
            }
        }
        Ok(())
    }

    async fn on_subscribe(
        &mut self,
        pkid: u16,
        filters: Vec<codec::SubRequest>,
        sub_id: Option<usize>,
    ) -> Result<(), ConnectionEnd> {
        let v5 = self.protocol == Protocol::V5;
        let mut codes = Vec::with_capacity(filters.len());
        let mut accepted = Vec::new();
        for f in filters {
            // `$share/{group}/{filter}`: the ACL and the validity rules apply to the filter.
            let shared = super::subscriptions::is_shared(&f.filter);
            let inner = match super::subscriptions::shared_parts(&f.filter) {
                Some((_, inner)) => inner,
                None if shared => "",
                None => f.filter.as_str(),
            };
            if let Err(e) = topic::validate_filter(inner) {
                if !v5 {
                    // 3.1.1 §4.8: an invalid filter is a protocol violation.
                    return Err(self
                        .protocol_error(0x8F, format!("invalid topic filter '{}': {e}", f.filter))
                        .await);
                }
                codes.push(0x8F);
                continue;
            }
            if !self.state.hooks().may_subscribe(&self.info, inner) {
                self.state.count(|s| s.denied_subscribe += 1);
                codes.push(if v5 { 0x87 } else { 0x80 });
                continue;
            }
            codes.push(f.qos as u8);
            accepted.push((codes.len() - 1, f));
        }
        let (idx, subs): (Vec<usize>, Vec<Subscription>) = accepted
            .into_iter()
            .map(|(idx, f)| {
                let sub = Subscription {
                    filter: f.filter,
                    qos: f.qos,
                    no_local: f.no_local,
                    retain_as_published: f.retain_as_published,
                    retain_handling: f.retain_handling,
                    id: sub_id,
                };
                (idx, sub)
            })
            .unzip();
        let refused = self.state.subscribe(&self.info.client_id, subs);
        for (idx, refused) in idx.into_iter().zip(refused) {
            if let Some(c) = codes.get_mut(idx).filter(|_| refused) {
                *c = if v5 { 0x97 } else { 0x80 };
            }
        }
        // SUBACK first: the retained messages queued above are written after it.
        self.queue(Outbound::SubAck { pkid, codes });
        self.write_out().await
    }

    /// After a session resumes, sends again what the client has not acknowledged.
    async fn resend_inflight(&mut self) -> Result<(), ConnectionEnd> {
        let now = Stamp::now();
        let packets: Vec<Outbound> = self
            .state
            .in_flight(&self.info.client_id)
            .iter()
            .map(|f| match f.state {
                OutState::Pubcomp => Outbound::PubRel { pkid: f.pkid },
                _ => Outbound::Publish(out_publish(f, true, &now)),
            })
            .collect();
        for p in packets {
            self.queue(p);
        }
        self.write_out().await
    }

    /// Moves messages from the session queue into the in-flight window and writes them.
    async fn flush_queue(&mut self) -> Result<(), ConnectionEnd> {
        let now = Stamp::now();
        let protocol = self.protocol;
        let out_max = self.out_max;
        let out_alias_max = self.out_alias_max;
        let out_aliases = &mut self.out_aliases;
        let wbuf = &mut self.wbuf;
        self.state
            .send_queued(&self.info.client_id, self.conn_id, FLUSH_BATCH, |f| {
                let mut publish = out_publish(f, false, &now);
                // Topic alias: a known topic is sent as its alias alone; a new one gets the
                // next free alias, remembered once the packet is encoded.
                let mut new_alias = None;
                if let Some(&a) = out_aliases.get(&publish.topic) {
                    publish.topic_alias = Some(a);
                    publish.topic.clear();
                } else if let Ok(n) = u16::try_from(out_aliases.len() + 1) {
                    if n <= out_alias_max {
                        publish.topic_alias = Some(n);
                        new_alias = Some((publish.topic.clone(), n));
                    }
                }
                let packet = Outbound::Publish(publish);
                match codec::encode(&packet, protocol, wbuf, out_max) {
                    Ok(()) => {
                        if let Some((t, n)) = new_alias {
                            out_aliases.insert(t, n);
                        }
                        Ok(())
                    }
                    Err(e) => Err(NotSent(format!(
                        "{e} (client maximum packet size {out_max})"
                    ))),
                }
            });
        self.write_out().await
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

fn out_publish(f: &Inflight, dup: bool, now: &Stamp) -> OutPublish {
    let m = &f.delivery.msg;
    OutPublish {
        dup: dup && f.delivery.qos != QoS::AtMostOnce,
        qos: f.delivery.qos,
        retain: f.delivery.retain,
        topic: m.topic.clone(),
        pkid: f.pkid,
        payload: m.payload.clone(),
        properties: m.properties.clone(),
        expiry: m
            .deadline
            .map(|d| clock::expiry_secs(d.remaining(now).unwrap_or(Duration::ZERO))),
        sub_ids: f.delivery.sub_ids.clone(),
        topic_alias: None,
    }
}

async fn head_verdict(pending: &mut VecDeque<PendingIn>) -> Result<(), RejectReason> {
    match pending.front_mut().map(|p| &mut p.verdict) {
        Some(Verdict::Waiting(rx)) => rx.await.unwrap_or(Err(RejectReason::UnspecifiedError)),
        _ => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
