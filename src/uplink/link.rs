//! One connection to the central broker, over rumqttc, with the protocol version hidden.
//!
//! rumqttc's event loop is polled in a task of its own (its `poll` must not be cancelled
//! half-way, and publishing from the polling task would deadlock); the uplink reads normalised
//! [`LinkEvent`]s from a channel and sends requests with non-blocking calls. A `Link` lives for
//! one connection only: on any error it is dropped (which aborts the polling task and closes
//! the socket) and a fresh one is made, so no rumqttc state — in particular its own replay of
//! unacknowledged publishes — outlives a connection. The store is the only source of truth.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5 as v5b;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::clock::Stamp;
use crate::config::Protocol;
use crate::message::{Message, Properties, QoS};

/// How the bytes travel; for WebSocket, the full `ws(s)://host:port/path` URL.
#[derive(Debug, Clone, Default)]
pub enum LinkTransport {
    #[default]
    Tcp,
    Tls(Arc<rustls::ClientConfig>),
    Ws(String),
    Wss(String, Arc<rustls::ClientConfig>),
}

impl LinkTransport {
    /// rumqttc's broker address (the host, or for WebSocket the URL) and transport.
    fn for_rumqttc(&self, host: &str) -> (String, rumqttc::Transport) {
        use rumqttc::{TlsConfiguration, Transport};
        match self {
            LinkTransport::Tcp => (host.to_string(), Transport::Tcp),
            LinkTransport::Tls(c) => (
                host.to_string(),
                Transport::Tls(TlsConfiguration::Rustls(c.clone())),
            ),
            LinkTransport::Ws(url) => (url.clone(), Transport::Ws),
            LinkTransport::Wss(url, c) => (
                url.clone(),
                Transport::Wss(TlsConfiguration::Rustls(c.clone())),
            ),
        }
    }
}

/// How to reach and greet the central broker.
#[derive(Debug, Clone)]
pub struct LinkOptions {
    pub host: String,
    pub port: u16,
    pub transport: LinkTransport,
    pub client_id: String,
    pub protocol: Protocol,
    pub keep_alive: Duration,
    pub connect_timeout: Duration,
    pub session_expiry: Duration,
    pub inflight: u16,
    pub max_packet_size: u32,
    pub credentials: Option<(String, String)>,
    /// Last Will: topic and payload, retained, QoS 1.
    pub will: Option<(String, Bytes)>,
    /// An HTTP proxy to tunnel through (CONNECT), for networks that only let a proxy out.
    pub proxy: Option<HttpProxy>,
}

/// `http://[user:password@]host:port`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpProxy {
    pub host: String,
    pub port: u16,
    pub credentials: Option<(String, String)>,
}

impl HttpProxy {
    /// Parses `http://[user:password@]host[:port]` (port 3128 by default).
    pub fn parse(url: &str) -> Option<HttpProxy> {
        let rest = url.strip_prefix("http://")?.trim_end_matches('/');
        let (credentials, hostport) = match rest.rsplit_once('@') {
            Some((userinfo, hostport)) => {
                let (user, pass) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                (Some((user.to_string(), pass.to_string())), hostport)
            }
            None => (None, rest),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((host, port)) => (host, port.parse().ok()?),
            None => (hostport, 3128),
        };
        if host.is_empty() || host.contains('/') {
            return None;
        }
        Some(HttpProxy {
            host: host.to_string(),
            port,
            credentials,
        })
    }

    fn for_rumqttc(&self) -> rumqttc::Proxy {
        rumqttc::Proxy {
            ty: rumqttc::ProxyType::Http,
            auth: match &self.credentials {
                Some((username, password)) => rumqttc::ProxyAuth::Basic {
                    username: username.clone(),
                    password: password.clone(),
                },
                None => rumqttc::ProxyAuth::None,
            },
            addr: self.host.clone(),
            port: self.port,
        }
    }
}

/// What happened on the connection.
#[derive(Debug)]
pub enum LinkEvent {
    /// CONNACK accepted.
    Connected {
        session_present: bool,
        receive_maximum: Option<u16>,
        max_packet_size: Option<u32>,
    },
    /// A QoS 1 publish was written with this packet id (0 for QoS 0), in request order.
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
    /// rumqttc held back a publish because of a packet-id collision: request order is lost.
    Collision,
}

impl LinkEvent {
    /// Whether the event is a packet from the broker (as opposed to one of our own writes).
    pub fn is_incoming(&self) -> bool {
        !matches!(self, LinkEvent::Sent { .. } | LinkEvent::Collision)
    }
}

/// What [`Link::ack`] needs to acknowledge a received message.
#[derive(Debug)]
pub enum AckToken {
    None,
    V4(rumqttc::Publish),
    V5(v5b::Publish),
}

enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// Polls a rumqttc event loop (v4 or v5: same shape, different types) in a task of its own,
/// forwarding normalised events until the first error, which ends the connection.
macro_rules! spawn_poller {
    ($eventloop:ident, $tx:ident, $convert:ident) => {
        tokio::spawn(async move {
            loop {
                let item = match $eventloop.poll().await {
                    Ok(ev) => match $convert(ev) {
                        Some(e) => Ok(e),
                        None => continue,
                    },
                    Err(e) => Err(e.to_string()),
                };
                let failed = item.is_err();
                if $tx.send(item).await.is_err() || failed {
                    return;
                }
            }
        })
    };
}

/// One live connection attempt.
pub struct Link {
    client: Client,
    events: mpsc::Receiver<Result<LinkEvent, String>>,
    poller: JoinHandle<()>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.poller.abort();
    }
}

/// An outgoing message, ready for the wire.
pub struct Outgoing<'a> {
    pub topic: &'a str,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub properties: &'a Properties,
    /// Remaining lifetime, forwarded as v5 Message Expiry Interval.
    pub expiry_secs: Option<u32>,
    /// Extra user properties (the relay's message id).
    pub extra_user_properties: Vec<(String, String)>,
}

impl Link {
    /// Starts connecting; the first event is `Connected` or an error.
    pub fn start(o: &LinkOptions) -> Link {
        // Requests beyond the in-flight window are never made, so a small channel suffices.
        let cap = usize::from(o.inflight) + 16;
        let (tx, events) = mpsc::channel(256);
        let (client, poller) = match o.protocol {
            Protocol::V311 => {
                let (addr, transport) = o.transport.for_rumqttc(&o.host);
                let mut opts = rumqttc::MqttOptions::new(&o.client_id, addr, o.port);
                opts.set_transport(transport);
                if let Some(proxy) = &o.proxy {
                    opts.set_proxy(proxy.for_rumqttc());
                }
                opts.set_keep_alive(o.keep_alive)
                    .set_clean_session(false)
                    .set_manual_acks(true)
                    .set_inflight(o.inflight)
                    .set_max_packet_size(o.max_packet_size as usize, o.max_packet_size as usize);
                let mut net = rumqttc::NetworkOptions::new();
                net.set_connection_timeout(o.connect_timeout.as_secs().max(1));
                if let Some((user, pass)) = &o.credentials {
                    opts.set_credentials(user, pass);
                }
                if let Some((topic, payload)) = &o.will {
                    opts.set_last_will(rumqttc::LastWill::new(
                        topic,
                        payload.clone(),
                        rumqttc::QoS::AtLeastOnce,
                        true,
                    ));
                }
                let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, cap);
                eventloop.set_network_options(net);
                let poller = spawn_poller!(eventloop, tx, v4_event);
                (Client::V4(client), poller)
            }
            Protocol::V5 => {
                let (addr, transport) = o.transport.for_rumqttc(&o.host);
                let mut opts = rumqttc::v5::MqttOptions::new(&o.client_id, addr, o.port);
                opts.set_transport(transport);
                if let Some(proxy) = &o.proxy {
                    opts.set_proxy(proxy.for_rumqttc());
                }
                let expiry = u32::try_from(o.session_expiry.as_secs()).unwrap_or(u32::MAX);
                opts.set_keep_alive(o.keep_alive)
                    .set_clean_start(false)
                    .set_session_expiry_interval(Some(expiry))
                    .set_manual_acks(true)
                    .set_outgoing_inflight_upper_limit(o.inflight)
                    .set_max_packet_size(Some(o.max_packet_size))
                    .set_connection_timeout(o.connect_timeout.as_secs().max(1));
                if let Some((user, pass)) = &o.credentials {
                    opts.set_credentials(user, pass);
                }
                if let Some((topic, payload)) = &o.will {
                    opts.set_last_will(v5b::LastWill::new(
                        topic,
                        payload.clone(),
                        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                        true,
                        None,
                    ));
                }
                let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(opts, cap);
                let poller = spawn_poller!(eventloop, tx, v5_event);
                (Client::V5(client), poller)
            }
        };
        Link {
            client,
            events,
            poller,
        }
    }

    /// The next event; `Err` ends the connection.
    pub async fn next_event(&mut self) -> Result<LinkEvent, String> {
        match self.events.recv().await {
            Some(item) => item,
            None => Err("connection task ended".into()),
        }
    }

    /// An event that is already waiting, if any; `Some(Err)` ends the connection.
    pub fn try_next_event(&mut self) -> Option<Result<LinkEvent, String>> {
        match self.events.try_recv() {
            Ok(item) => Some(item),
            Err(mpsc::error::TryRecvError::Empty) => None,
            Err(mpsc::error::TryRecvError::Disconnected) => {
                Some(Err("connection task ended".into()))
            }
        }
    }

    /// Queues a publish without waiting. `Err` means it was not queued.
    pub fn publish(&self, m: Outgoing<'_>) -> Result<(), String> {
        match &self.client {
            Client::V4(c) => c
                .try_publish(m.topic, v4_qos(m.qos), m.retain, m.payload)
                .map_err(|e| e.to_string()),
            Client::V5(c) => {
                let p = m.properties;
                let mut user_properties = p.user_properties.clone();
                user_properties.extend(m.extra_user_properties);
                let props = v5b::PublishProperties {
                    payload_format_indicator: p.payload_format_indicator,
                    message_expiry_interval: m.expiry_secs,
                    topic_alias: None,
                    response_topic: p.response_topic.clone(),
                    correlation_data: p.correlation_data.clone(),
                    user_properties,
                    subscription_identifiers: Vec::new(),
                    content_type: p.content_type.clone(),
                };
                c.try_publish_with_properties(m.topic, v5_qos(m.qos), m.retain, m.payload, props)
                    .map_err(|e| e.to_string())
            }
        }
    }

    /// Acknowledges a received message.
    pub fn ack(&self, token: AckToken) -> Result<(), String> {
        match (&self.client, token) {
            (Client::V4(c), AckToken::V4(p)) => c.try_ack(&p).map_err(|e| e.to_string()),
            (Client::V5(c), AckToken::V5(p)) => c.try_ack(&p).map_err(|e| e.to_string()),
            _ => Ok(()),
        }
    }

    /// Subscribes to the downlink filters. On v5, retained messages are sent only for a
    /// subscription the session did not have, so a reconnect does not replay the state, and
    /// live messages keep their retain flag. (A 3.1.1 broker clears it on live delivery.)
    pub fn subscribe(&self, filters: &[(String, u8)]) -> Result<(), String> {
        if filters.is_empty() {
            return Ok(());
        }
        match &self.client {
            Client::V4(c) => c
                .try_subscribe_many(
                    filters
                        .iter()
                        .map(|(f, q)| rumqttc::SubscribeFilter::new(f.clone(), v4_qos(qos_of(*q)))),
                )
                .map_err(|e| e.to_string()),
            Client::V5(c) => c
                .try_subscribe_many(filters.iter().map(|(f, q)| {
                    let mut filter = v5b::Filter::new(f.clone(), v5_qos(qos_of(*q)));
                    filter.retain_forward_rule = v5b::RetainForwardRule::OnNewSubscribe;
                    // Retain As Published: a live message keeps its retain flag, so the
                    // local broker keeps it as the current state for iPads that come later.
                    filter.preserve_retain = true;
                    filter
                }))
                .map_err(|e| e.to_string()),
        }
    }

    /// Asks for a clean DISCONNECT.
    pub fn disconnect(&self) {
        let _ = match &self.client {
            Client::V4(c) => c.try_disconnect().map_err(|e| e.to_string()),
            Client::V5(c) => c.try_disconnect().map_err(|e| e.to_string()),
        };
    }
}

fn qos_of(q: u8) -> QoS {
    if q == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

fn v4_qos(q: QoS) -> rumqttc::QoS {
    match q {
        QoS::AtMostOnce => rumqttc::QoS::AtMostOnce,
        // QoS 2 is never used upstream.
        _ => rumqttc::QoS::AtLeastOnce,
    }
}

fn v5_qos(q: QoS) -> rumqttc::v5::mqttbytes::QoS {
    match q {
        QoS::AtMostOnce => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        _ => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
    }
}

fn v4_event(ev: rumqttc::Event) -> Option<LinkEvent> {
    use rumqttc::{Event, Incoming, Outgoing as Out};
    Some(match ev {
        // rumqttc reports only a ConnAck that accepted the connection.
        Event::Incoming(Incoming::ConnAck(c)) => LinkEvent::Connected {
            session_present: c.session_present,
            receive_maximum: None,
            max_packet_size: None,
        },
        Event::Incoming(Incoming::PubAck(ack)) => LinkEvent::Acked {
            pkid: ack.pkid,
            refused: None,
        },
        Event::Incoming(Incoming::Publish(p)) => {
            let qos = match p.qos {
                rumqttc::QoS::AtMostOnce => QoS::AtMostOnce,
                rumqttc::QoS::AtLeastOnce => QoS::AtLeastOnce,
                rumqttc::QoS::ExactlyOnce => QoS::ExactlyOnce,
            };
            let topic = p.topic.clone();
            let accepted = Stamp::now();
            let message = Message {
                topic,
                payload: p.payload.clone(),
                qos,
                retain: p.retain,
                properties: Properties::default(),
                accepted,
                deadline: None,
            };
            let token = if qos == QoS::AtMostOnce {
                AckToken::None
            } else {
                AckToken::V4(p)
            };
            LinkEvent::Message {
                message: Box::new(message),
                token,
            }
        }
        Event::Incoming(_) => LinkEvent::Other,
        Event::Outgoing(Out::Publish(pkid)) => LinkEvent::Sent { pkid },
        Event::Outgoing(Out::AwaitAck(_)) => LinkEvent::Collision,
        Event::Outgoing(_) => return None,
    })
}

fn v5_event(ev: rumqttc::v5::Event) -> Option<LinkEvent> {
    use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
    use rumqttc::v5::Event;
    use rumqttc::Outgoing as Out;
    Some(match ev {
        Event::Incoming(Packet::ConnAck(c)) => LinkEvent::Connected {
            session_present: c.session_present,
            receive_maximum: c.properties.as_ref().and_then(|p| p.receive_max),
            max_packet_size: c.properties.as_ref().and_then(|p| p.max_packet_size),
        },
        Event::Incoming(Packet::PubAck(ack)) => LinkEvent::Acked {
            pkid: ack.pkid,
            refused: match ack.reason {
                PubAckReason::Success | PubAckReason::NoMatchingSubscribers => None,
                other => Some(format!("{other:?}")),
            },
        },
        Event::Incoming(Packet::Publish(p)) => {
            let qos = match p.qos {
                rumqttc::v5::mqttbytes::QoS::AtMostOnce => QoS::AtMostOnce,
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce => QoS::AtLeastOnce,
                rumqttc::v5::mqttbytes::QoS::ExactlyOnce => QoS::ExactlyOnce,
            };
            let accepted = Stamp::now();
            let props = p.properties.clone().unwrap_or_default();
            let deadline = props
                .message_expiry_interval
                .map(|s| accepted.plus(Duration::from_secs(u64::from(s))));
            let message = Message {
                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                payload: p.payload.clone(),
                qos,
                retain: p.retain,
                properties: Properties {
                    payload_format_indicator: props.payload_format_indicator,
                    content_type: props.content_type,
                    response_topic: props.response_topic,
                    correlation_data: props.correlation_data,
                    user_properties: props.user_properties,
                },
                accepted,
                deadline,
            };
            let token = if qos == QoS::AtMostOnce {
                AckToken::None
            } else {
                AckToken::V5(p)
            };
            LinkEvent::Message {
                message: Box::new(message),
                token,
            }
        }
        Event::Incoming(_) => LinkEvent::Other,
        Event::Outgoing(Out::Publish(pkid)) => LinkEvent::Sent { pkid },
        Event::Outgoing(Out::AwaitAck(_)) => LinkEvent::Collision,
        Event::Outgoing(_) => return None,
    })
}

#[cfg(test)]
mod proxy_tests {
    use super::HttpProxy;

    #[test]
    fn proxy_urls() {
        assert_eq!(
            HttpProxy::parse("http://proxy:8080"),
            Some(HttpProxy {
                host: "proxy".into(),
                port: 8080,
                credentials: None
            })
        );
        assert_eq!(
            HttpProxy::parse("http://u:p@proxy").map(|p| (p.port, p.credentials)),
            Some((3128, Some(("u".into(), "p".into()))))
        );
        assert_eq!(HttpProxy::parse("socks5://proxy:1080"), None);
        assert_eq!(HttpProxy::parse("http://:1"), None);
        assert_eq!(HttpProxy::parse("http://proxy:x"), None);
    }
}
