//! The local MQTT broker that the cab iPads connect to (MQTT 3.1.1 and 5 on one listener).
//!
//! The rest of the daemon talks to it through a small API:
//! - [`Hooks`]: authentication, authorization, the *ingest hook* whose verdict the broker waits
//!   for before it acknowledges a client's PUBLISH, and connection events;
//! - [`BrokerHandle::inject`]: publish as the relay itself;
//! - [`Broker::run`]: serve until the shutdown signal, then close cleanly.
//!
//! Inside, one task per connection ([`connection`]) owns the socket and the protocol state of
//! that connection; everything shared (sessions, retained messages, counters) is owned by
//! [`state::BrokerState`], whose methods alone change it; durable state goes to the store through
//! [`persist`] (sessions with an expiry, their subscriptions and QoS 1/2 messages, retained
//! messages), so a restart of the daemon resumes them.

pub(crate) mod codec;
mod connection;
mod limits;
mod listener;
mod persist;
mod retained;
mod runtime;
mod session;
mod state;
mod subscriptions;
pub mod tls;
mod websocket;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinSet;

use crate::message::Message;
use crate::shutdown::Shutdown;
use crate::store::{Db, StoreError, StoreWrite};
use state::BrokerState;

/// Limits and settings of the local broker.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// TCP address to listen on.
    pub listen: SocketAddr,
    /// Connections open at once; further ones are refused.
    pub max_connections: usize,
    /// Largest packet accepted from or sent to a client, in bytes.
    pub max_packet_size: u32,
    /// In-flight QoS 1/2 PUBLISHes a client may have towards the broker (v5 Receive Maximum).
    pub receive_maximum: u16,
    /// Bytes of one connection's messages awaiting the ingest verdict (the store's commit)
    /// beyond which the connection takes no further PUBLISH until verdicts come (backpressure).
    /// At least one message is always taken, whatever its size.
    pub max_uncommitted_bytes: usize,
    /// Messages kept per session for a client that is offline or slow; beyond it the oldest
    /// QoS 0 message, then the oldest message, is dropped and counted.
    pub max_queued_messages: usize,
    /// Subscriptions one client may hold.
    pub max_subscriptions: usize,
    /// Upper bound on a client's requested Session Expiry Interval.
    pub max_session_expiry: Duration,
    /// Time a new connection has to send a complete CONNECT.
    pub connect_timeout: Duration,
    /// Sockets one source address may hold open at once; further ones are closed at once.
    pub max_connections_per_address: usize,
    /// The TLS listener, if any.
    pub tls: Option<tls::TlsSettings>,
    /// Address of the MQTT-over-WebSocket listener, if any.
    pub ws_listen: Option<SocketAddr>,
    /// PUBLISH packets per second one connection may send (burst of the same size); beyond it
    /// the client is disconnected (v5 DISCONNECT 0x96). 0: no limit.
    pub max_publish_rate: u32,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            max_connections: 64,
            max_packet_size: 1024 * 1024,
            receive_maximum: 1024,
            max_uncommitted_bytes: 1024 * 1024,
            max_queued_messages: 1000,
            max_subscriptions: 64,
            max_session_expiry: Duration::from_secs(7 * 24 * 3600),
            connect_timeout: Duration::from_secs(10),
            max_connections_per_address: usize::MAX,
            max_publish_rate: 0,
            tls: None,
            ws_listen: None,
        }
    }
}

/// MQTT protocol version of a client.
pub use crate::mqtt::Protocol;

/// Who a connected client is.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub client_id: String,
    pub username: Option<String>,
    pub peer: SocketAddr,
    pub protocol: Protocol,
}

/// What a client presents in CONNECT, for the authentication hook.
#[derive(Debug)]
pub struct ConnectRequest<'a> {
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
    /// Subject CN of the client certificate the TLS listener verified against
    /// `tls_client_ca` (mTLS); `None` on other listeners or without a certificate.
    pub cert_identity: Option<&'a str>,
    pub peer: SocketAddr,
    pub protocol: Protocol,
}

/// The authentication hook's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthVerdict {
    Allow,
    /// v3.1.1 CONNACK 0x04, v5 0x86.
    BadCredentials,
    /// v3.1.1 CONNACK 0x05, v5 0x87.
    NotAuthorized,
    /// The credentials are right but the client id is not one this device may use (another
    /// device's, or not the device's own name when it may not choose any id). v3.1.1 CONNACK
    /// 0x02, v5 0x85; not a failed password, so it does not slow down later logins.
    ClientIdNotAllowed,
}

/// Why an inbound PUBLISH was refused; mapped to the v5 PUBACK/PUBREC reason code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// 0x80
    UnspecifiedError,
    /// 0x83
    ImplementationSpecificError,
    /// 0x87
    NotAuthorized,
    /// 0x97
    QuotaExceeded,
}

/// The ingest hook's answer for one inbound PUBLISH.
#[derive(Debug)]
pub enum Ingest {
    /// Acknowledge and deliver now.
    Accept,
    /// Acknowledge and deliver now; the hook keeps no copy (no route takes the message). A v5
    /// publisher that no local subscriber takes either gets reason 0x10 (No matching
    /// subscribers), a success code: the publisher learns the message went nowhere.
    Unrouted,
    /// Refuse now.
    Reject(RejectReason),
    /// The verdict comes later (after a store commit); the broker acknowledges the client only
    /// when it arrives. A dropped sender counts as `UnspecifiedError`.
    Pending(oneshot::Receiver<Result<(), RejectReason>>),
}

/// Connection events, for presence reporting.
#[derive(Debug, Clone)]
pub enum BrokerEvent {
    Connected(ClientInfo),
    Disconnected { client: ClientInfo, reason: String },
    WillPublished { client_id: String, topic: String },
}

/// What the daemon plugs into the broker. Every method has a permissive default.
///
/// The broker calls these from its connection tasks: they must not block.
pub trait Hooks: Send + Sync + 'static {
    fn authenticate(&self, _req: &ConnectRequest<'_>) -> AuthVerdict {
        AuthVerdict::Allow
    }
    /// Also asked for the will topic at CONNECT (refused: CONNACK 0x87 / 0x05). A denied
    /// PUBLISH gets v5 PUBACK/PUBREC 0x87; a 3.1.1 client, which cannot be told, gets a normal
    /// acknowledgement and the message is dropped and counted (`denied_publish`).
    fn may_publish(&self, _client: &ClientInfo, _topic: &str) -> bool {
        true
    }
    fn may_subscribe(&self, _client: &ClientInfo, _filter: &str) -> bool {
        true
    }
    /// Per-delivery check, so a wildcard subscription can be allowed while some topics it
    /// covers stay private to one client (live and retained deliveries).
    fn may_receive(&self, _client_id: &str, _topic: &str) -> bool {
        true
    }
    /// Called, in arrival order per connection, for every inbound PUBLISH that passed
    /// validation and `may_publish`, and for a will when it is published.
    /// `msg.deadline` is set from a v5 Message Expiry Interval.
    ///
    /// The broker keeps reading while verdicts are pending and acknowledges in arrival order.
    /// A refusal reaches a v5 client as the PUBACK/PUBREC reason code. MQTT 3.1.1 has no way
    /// to refuse a QoS 1/2 PUBLISH, so the broker withholds the acknowledgement and closes the
    /// connection: the client keeps the message in its session and sends it again after it
    /// reconnects. A refused 3.1.1 QoS 0 message is dropped.
    fn ingest(&self, _client: &ClientInfo, _msg: &Message) -> Ingest {
        Ingest::Accept
    }
    fn on_event(&self, _event: BrokerEvent) {}
}

/// Errors of the broker API.
#[derive(Debug, Error)]
pub enum BrokerError {
    #[error("local broker: cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("local broker: {0}")]
    Store(#[from] StoreError),
    #[error("local broker: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("local broker: invalid topic '{topic}': {reason}")]
    InvalidTopic { topic: String, reason: String },
    #[error("local broker is shut down")]
    Closed,
    #[error("local broker: cannot start its thread and runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("local broker: its thread ended without a result (a panic; see the log)")]
    Stopped,
}

/// A connected client, for the status socket.
#[derive(Debug, Clone)]
pub struct ClientSummary {
    pub client_id: String,
    pub peer: SocketAddr,
    pub protocol: Protocol,
    /// Wall-clock milliseconds since the epoch when it connected.
    pub connected_since_ms: i64,
    pub subscriptions: usize,
}

/// Counters of the broker, for the status socket.
#[derive(Debug, Clone, Default)]
pub struct BrokerStats {
    /// Connections accepted (CONNACK 0) since start.
    pub connections: u64,
    /// Sockets closed before or at CONNECT: refusals, timeouts, limits.
    pub refused_connections: u64,
    /// Clients disconnected for breaking the protocol (malformed packets, limits, ...).
    pub protocol_errors: u64,
    pub messages_in: u64,
    pub messages_out: u64,
    pub dropped_queue_full: u64,
    pub dropped_expired: u64,
    /// PUBLISHes refused by `may_publish`; a 3.1.1 client's are acknowledged and dropped.
    pub denied_publish: u64,
    pub denied_subscribe: u64,
    /// Messages not sent to a client because they exceed its Maximum Packet Size.
    pub dropped_too_large: u64,
    /// CONNECTs refused by `authenticate` (bad credentials or not authorized).
    pub auth_failures: u64,
    /// CONNECTs refused for their client id (control characters, longer than
    /// [`MAX_CLIENT_ID`] bytes).
    pub bad_client_ids: u64,
    /// Sockets closed at once because their address held `max_connections_per_address`.
    pub refused_per_address: u64,
    /// Clients disconnected for exceeding `max_publish_rate`.
    pub rate_limited: u64,
    /// v5 connections disconnected (0x93) for sending more unacknowledged QoS 1/2 PUBLISHes
    /// than our Receive Maximum allows.
    pub receive_maximum_exceeded: u64,
    /// Times a connection stopped taking PUBLISHes because its messages awaiting the store
    /// reached `max_uncommitted_bytes` (backpressure; the store is behind).
    pub held_back: u64,
}

pub use limits::{client_id_problem, valid_device_name, MAX_CLIENT_ID};

/// How often expired sessions and messages are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// How long shutdown waits for connections to say goodbye.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The local broker: a bound listener plus its state, ready to [`Broker::run`].
pub struct Broker {
    listener: TcpListener,
    local_addr: SocketAddr,
    /// The TLS listener and its files.
    tls: Option<(TcpListener, Arc<tls::TlsFiles>)>,
    ws: Option<TcpListener>,
    state: Arc<BrokerState>,
}

/// Cheap handle for the rest of the daemon: inject messages, read status, reload TLS files.
#[derive(Clone)]
pub struct BrokerHandle {
    state: Arc<BrokerState>,
    tls: Option<Arc<tls::TlsFiles>>,
}

impl Broker {
    /// Binds the listener, loads persisted sessions and retained messages from `db`.
    pub async fn bind(
        config: BrokerConfig,
        db: Db,
        hooks: Arc<dyn Hooks>,
    ) -> Result<Broker, BrokerError> {
        let state = BrokerState::load(config.clone(), db, hooks).await?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| BrokerError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let local_addr = listener.local_addr().map_err(|source| BrokerError::Bind {
            addr: config.listen,
            source,
        })?;
        log::info!("local broker: listening on {local_addr}");
        let tls = match &config.tls {
            Some(settings) => {
                let files = Arc::new(tls::TlsFiles::load(settings.clone())?);
                let l = TcpListener::bind(settings.listen).await.map_err(|source| {
                    BrokerError::Bind {
                        addr: settings.listen,
                        source,
                    }
                })?;
                log::info!(
                    "local broker: TLS listening on {}{}",
                    settings.listen,
                    if settings.client_ca.is_some() {
                        " (client certificates accepted)"
                    } else {
                        ""
                    }
                );
                Some((l, files))
            }
            None => None,
        };
        let ws = match config.ws_listen {
            Some(addr) => {
                let l = TcpListener::bind(addr)
                    .await
                    .map_err(|source| BrokerError::Bind { addr, source })?;
                log::info!("local broker: WebSocket listening on {addr}");
                Some(l)
            }
            None => None,
        };
        Ok(Broker {
            listener,
            local_addr,
            tls,
            ws,
            state: Arc::new(state),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn handle(&self) -> BrokerHandle {
        BrokerHandle {
            state: Arc::clone(&self.state),
            tls: self.tls.as_ref().map(|(_, f)| Arc::clone(f)),
        }
    }

    /// Serves until `shutdown` fires; then stops accepting, disconnects clients (v5: DISCONNECT
    /// 0x8B server shutting down), persists state, returns.
    ///
    /// Wills of clients still connected at shutdown are not published: the clients did nothing
    /// wrong, and their persistent sessions resume when the daemon is back.
    ///
    /// The broker runs on a thread and runtime of its own (see [`runtime`]); this future ends
    /// when it has.
    pub async fn run(self, shutdown: Shutdown) -> Result<(), BrokerError> {
        let listeners = Listeners {
            plain: self.listener.into_std(),
            tls: self.tls.map(|(l, files)| (l.into_std(), files)),
            ws: self.ws.map(|l| l.into_std()),
        };
        let (local_addr, state) = (self.local_addr, self.state);
        runtime::on_own_thread(move || async move {
            let bind = |r: std::io::Result<std::net::TcpListener>, addr| {
                r.and_then(TcpListener::from_std)
                    .map_err(|source| BrokerError::Bind { addr, source })
            };
            let config = state.config();
            let tls = match (listeners.tls, &config.tls) {
                (Some((l, files)), Some(t)) => Some((bind(l, t.listen)?, files)),
                _ => None,
            };
            let ws = match (listeners.ws, config.ws_listen) {
                (Some(l), Some(addr)) => Some(bind(l, addr)?),
                _ => None,
            };
            let broker = Broker {
                listener: bind(listeners.plain, local_addr)?,
                local_addr,
                tls,
                ws,
                state,
            };
            broker.serve(shutdown).await
        })
        .await
    }

    /// [`Broker::run`], on the current runtime.
    async fn serve(self, mut shutdown: Shutdown) -> Result<(), BrokerError> {
        let mut tasks = JoinSet::new();
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.recv() => break,
                r = self.listener.accept() => match r {
                    Ok((stream, peer)) => {
                        listener::admit(stream, peer, listener::Transport::Plain, &self.state, &shutdown, &mut tasks);
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: wait instead of spinning,
                        // and say so once a minute, not ten times a second.
                        static SAID: crate::logging::Throttle =
                            crate::logging::Throttle::new(Duration::from_secs(60));
                        if let Some(held) = SAID.allow() {
                            log::warn!("local broker: accept on {} failed: {e} ({held} more failures since the last report)", self.local_addr);
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                r = accept_tls(&self.tls) => match r {
                    Ok((stream, peer, acceptor)) => {
                        listener::admit(stream, peer, listener::Transport::Tls(acceptor), &self.state, &shutdown, &mut tasks);
                    }
                    Err(e) => {
                        log::warn!("local broker: TLS accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                r = accept_ws(&self.ws) => match r {
                    Ok((stream, peer)) => {
                        listener::admit(stream, peer, listener::Transport::WebSocket, &self.state, &shutdown, &mut tasks);
                    }
                    Err(e) => {
                        log::warn!("local broker: WebSocket accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = sweep.tick() => self.state.sweep(),
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        log::info!("local broker: shutting down");
        self.state.close();
        drop(self.listener);
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            log::warn!("local broker: some connections did not close in time; aborting them");
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        // The wills of the clients just closed: their ingest (the relay's store commit) is
        // waited for, so they are kept and relayed like any other will.
        if tokio::time::timeout(SHUTDOWN_GRACE, self.state.wills_settled())
            .await
            .is_err()
        {
            log::warn!("local broker: wills still awaiting the relay's verdict at shutdown; they may be lost");
        }
        self.state.sweep();
        // Every earlier write of the broker on disk.
        self.state.flush().await?;
        Ok(())
    }
}

/// Runs bytes from a client through the packet decoder the way a connection does: CONNECT
/// first, then packets of the negotiated version until the input is used up or refused.
/// For fuzzing (`tests/fuzz`): it must return, never panic, whatever `data` is.
pub fn decode_client_bytes(data: &[u8]) {
    const MAX: u32 = 64 * 1024;
    let mut buf = bytes::BytesMut::from(data);
    let protocol = match codec::connect_level(&buf, MAX) {
        Ok(Some(5)) => Protocol::V5,
        Ok(Some(_)) => Protocol::V311,
        _ => return,
    };
    match codec::decode_connect(&mut buf, protocol, MAX) {
        Ok(Some(_)) => {}
        _ => return,
    }
    while let Ok(Some(_)) = codec::decode(&mut buf, protocol, MAX) {}
    // And the same bytes as packets of either version without a CONNECT in front.
    for protocol in [Protocol::V311, Protocol::V5] {
        let mut buf = bytes::BytesMut::from(data);
        while let Ok(Some(_)) = codec::decode(&mut buf, protocol, MAX) {}
    }
}

/// The listeners, between the runtime that bound them and the broker's own.
struct Listeners {
    plain: std::io::Result<std::net::TcpListener>,
    tls: Option<(std::io::Result<std::net::TcpListener>, Arc<tls::TlsFiles>)>,
    ws: Option<std::io::Result<std::net::TcpListener>>,
}

/// Accepts on the WebSocket listener; never resolves without one.
async fn accept_ws(
    ws: &Option<TcpListener>,
) -> std::io::Result<(tokio::net::TcpStream, SocketAddr)> {
    match ws {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// Accepts on the TLS listener; never resolves without one.
async fn accept_tls(
    tls: &Option<(TcpListener, Arc<tls::TlsFiles>)>,
) -> std::io::Result<(tokio::net::TcpStream, SocketAddr, tokio_rustls::TlsAcceptor)> {
    match tls {
        Some((l, files)) => {
            let (s, peer) = l.accept().await?;
            Ok((s, peer, files.acceptor()))
        }
        None => std::future::pending().await,
    }
}

impl BrokerHandle {
    /// Re-reads the TLS certificate, key and client CA (for SIGHUP); new connections get the
    /// new ones. On error the old ones stay in use. Without a TLS listener, nothing to do.
    pub fn reload_tls(&self) -> Result<(), BrokerError> {
        if let Some(files) = &self.tls {
            files.reload()?;
            log::info!("local broker: TLS certificate and key reloaded");
        }
        Ok(())
    }

    /// Whether the broker can take `msg` from the relay: open, and a valid topic name.
    fn injectable(&self, msg: &Message) -> Result<(), BrokerError> {
        if self.state.is_closed() {
            return Err(BrokerError::Closed);
        }
        crate::topic::validate_name(&msg.topic).map_err(|e| BrokerError::InvalidTopic {
            topic: msg.topic.clone(),
            reason: e.to_string(),
        })
    }

    /// Publish as the relay itself (no ACL, no ingest hook). Routes to subscribers,
    /// stores/clears retained, queues for offline persistent sessions. Resolves once the
    /// durable part (retained row, persistent sessions' queued rows) is committed, so the
    /// caller can then acknowledge upstream.
    pub async fn inject(&self, msg: Message) -> Result<(), BrokerError> {
        self.injectable(&msg)?;
        if let Some(commit) = self.state.publish(msg) {
            commit.await.map_err(|_| StoreError::Closed)??;
        }
        Ok(())
    }

    /// Whether `msg` would change nothing as the retained message of `topic`: the same
    /// payload with the same properties (but the user property `stamp`) is retained there and
    /// lives at least as long. The retained snapshot that the uplink asks for on every connect
    /// mostly repeats what the iPads already have.
    pub fn repeats_retained(&self, topic: &str, msg: &Message, stamp: &str) -> bool {
        self.state.repeats_retained(topic, msg, stamp)
    }

    /// [`BrokerHandle::inject`] that commits `also` in the same transaction as the message's
    /// durable part (the downlink's route version next to the message it admits).
    pub async fn inject_with(&self, msg: Message, also: StoreWrite) -> Result<(), BrokerError> {
        self.injectable(&msg)?;
        self.state
            .publish_with(msg, also)
            .await
            .map_err(|_| StoreError::Closed)??;
        Ok(())
    }

    /// Connected clients.
    pub fn clients(&self) -> Vec<ClientSummary> {
        self.state.clients()
    }

    pub fn stats(&self) -> BrokerStats {
        self.state.stats()
    }
}
