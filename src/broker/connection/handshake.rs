//! From accepted socket to attached session: read CONNECT (within `connect_timeout`), check
//! the client id and the will, run the authentication hook, take the session over, and send
//! CONNACK; or refuse with the CONNACK code the protocol version has for the reason.
//!
//! # Session takeover
//! A connection's id is taken when its CONNECT arrives, before authentication, which may take
//! long (argon2) and finish in any order. Under the state's lock a connection takes a session
//! over only if no connection with a later CONNECT already holds it, and only if its own client
//! has not closed the socket meanwhile: an iPad on flaky Wi-Fi that gave up on a CONNECT and
//! reconnected at once must not lose its new connection to the abandoned one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use super::{linger, Conn, ConnectionEnd, Reader, Writer, TOPIC_ALIAS_MAX, WRITE_TIMEOUT};
use crate::broker::codec::{self, ConnectPacket, DecodeError, Outbound};
use crate::broker::limits;
use crate::broker::session::ConnLink;
use crate::broker::state::{Attach, BrokerState};
use crate::broker::{AuthVerdict, BrokerEvent, ClientInfo, ConnectRequest, Protocol};
use crate::clock::Stamp;
use crate::topic;

/// Outgoing window for 3.1.1 clients, which cannot announce one.
const V311_WINDOW: usize = 32;

/// Runs the authentication hook on the blocking pool (password hashing is slow on purpose),
/// at most `AUTH_SLOTS` at a time.
async fn authenticate(
    state: &BrokerState,
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

#[derive(Debug)]
pub(super) enum PreError {
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

pub(super) struct PreConnect {
    pub(super) reader: Reader,
    pub(super) writer: Writer,
    pub(super) rbuf: BytesMut,
    pub(super) cert_identity: Option<String>,
}

impl PreConnect {
    pub(super) async fn read_connect(&mut self, max: u32) -> Result<ConnectPacket, PreError> {
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
    pub(super) async fn refuse_bytes(&mut self, e: &PreError) {
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

    pub(super) async fn connack_refusal(&mut self, protocol: Protocol, code: u8) {
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

/// The CONNACK code for a refusal in the client's protocol version.
fn refusal(protocol: Protocol, v311: u8, v5: u8) -> u8 {
    match protocol {
        Protocol::V311 => v311,
        Protocol::V5 => v5,
    }
}

/// The client id the session goes by, and the one to announce if the broker assigned it
/// (v5); `None` once refused (CONNACK sent).
async fn admit_client_id(
    pre: &mut PreConnect,
    c: &ConnectPacket,
    peer: SocketAddr,
    state: &BrokerState,
) -> Option<(String, Option<String>)> {
    let protocol = c.protocol;
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
    if let Some(why) = limits::client_id_problem(&client_id) {
        log::info!(
            "local broker: {peer}: client id {:?} {why}; refused",
            client_id.chars().take(80).collect::<String>()
        );
        state.count(|s| {
            s.refused_connections += 1;
            s.bad_client_ids += 1;
        });
        pre.connack_refusal(protocol, refusal(protocol, 0x02, 0x85))
            .await;
        return None;
    }
    Some((client_id, assigned))
}

/// Refuses what no login can make acceptable: a will topic that is not a valid topic name,
/// an authentication method the broker does not offer. `None` once refused.
async fn check_connect(
    pre: &mut PreConnect,
    c: &ConnectPacket,
    client_id: &str,
    peer: SocketAddr,
    state: &BrokerState,
) -> Option<()> {
    let protocol = c.protocol;
    if let Some(w) = &c.will {
        if let Err(e) = topic::validate_name(&w.topic) {
            log::info!(
                "local broker: '{client_id}' from {peer}: will topic '{}' {e}",
                w.topic
            );
            state.count(|s| {
                s.refused_connections += 1;
                s.protocol_errors += 1;
            });
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
    Some(())
}

/// Runs the authentication hook (failures slowed down per address) and the will's ACL; the
/// client as the hooks will know it, or `None` once refused.
async fn authorize(
    pre: &mut PreConnect,
    c: &ConnectPacket,
    client_id: &str,
    peer: SocketAddr,
    state: &BrokerState,
) -> Option<ClientInfo> {
    let protocol = c.protocol;
    let verdict = authenticate(state, client_id, c, pre.cert_identity.clone(), peer).await;
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
        client_id: client_id.to_string(),
        // A client without a username is known by its certificate, if any.
        username: c.username.clone().or_else(|| pre.cert_identity.clone()),
        peer,
        protocol,
    };
    let code = match verdict {
        AuthVerdict::Allow => None,
        AuthVerdict::BadCredentials => Some(refusal(protocol, 0x04, 0x86)),
        AuthVerdict::NotAuthorized => Some(refusal(protocol, 0x05, 0x87)),
        AuthVerdict::ClientIdNotAllowed => Some(refusal(protocol, 0x02, 0x85)),
    };
    let code = code.or_else(|| {
        c.will
            .as_ref()
            .filter(|w| !state.hooks().may_publish(&info, &w.topic))
            .map(|_| refusal(protocol, 0x05, 0x87))
    });
    if let Some(code) = code {
        log::info!("local broker: '{client_id}' from {peer} refused with CONNACK {code:#04x}");
        state.count(|s| s.refused_connections += 1);
        pre.connack_refusal(protocol, code).await;
        return None;
    }
    Some(info)
}

/// The session's expiry as granted: a 3.1.1 persistent session has no expiry in the
/// protocol, so it ends after `max_session_expiry` (sessions of iPads that never come back
/// do not pile up); a v5 client's request is capped by it.
fn granted_expiry(c: &ConnectPacket, max_session_expiry: Duration) -> u32 {
    let max = u32::try_from(max_session_expiry.as_secs()).unwrap_or(u32::MAX);
    match c.protocol {
        Protocol::V311 if c.clean_start => 0,
        Protocol::V311 => max,
        Protocol::V5 => c.session_expiry.min(max),
    }
}

/// What the broker tells a v5 client in CONNACK: its limits, the expiry it granted (when not
/// the one asked for) and an assigned client id.
fn connack_properties(
    c: &ConnectPacket,
    expiry: u32,
    assigned: Option<String>,
    state: &BrokerState,
) -> Option<rumqttc::v5::mqttbytes::v5::ConnAckProperties> {
    (c.protocol == Protocol::V5).then(|| rumqttc::v5::mqttbytes::v5::ConnAckProperties {
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
    })
}

impl Conn {
    /// Validates CONNECT, attaches the session, and sends CONNACK. `None` if refused.
    pub(super) async fn accept(
        mut pre: PreConnect,
        c: ConnectPacket,
        peer: SocketAddr,
        state: Arc<BrokerState>,
    ) -> Option<Conn> {
        let protocol = c.protocol;
        let (client_id, assigned) = admit_client_id(&mut pre, &c, peer, &state).await?;
        // Connections are numbered in the order their CONNECTs arrived; authentication runs
        // in between, for however long it takes, and must not reorder takeovers.
        let conn_id = state.new_conn_id();
        check_connect(&mut pre, &c, &client_id, peer, &state).await?;
        let info = authorize(&mut pre, &c, &client_id, peer, &state).await?;
        let expiry = granted_expiry(&c, state.config().max_session_expiry);
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

        let props = connack_properties(&c, expiry, assigned, &state);
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
            pending: Default::default(),
            unreleased: Default::default(),
            aliases: HashMap::new(),
            notify,
            kick_rx,
            connect_expiry: expiry,
            bucket: (state.config().max_publish_rate > 0)
                .then(|| limits::TokenBucket::new(state.config().max_publish_rate)),
            held: false,
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
}
