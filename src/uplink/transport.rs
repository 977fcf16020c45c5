//! The byte stream to the central broker: TCP (directly or through an HTTP CONNECT proxy),
//! then TLS and/or WebSocket as the endpoint's scheme asks.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::error::ConnectError;
use crate::mqtt::Protocol;
use crate::ws_stream::WsIo;

/// How the bytes travel; for WebSocket, the full `ws(s)://host:port/path` URL.
#[derive(Debug, Clone, Default)]
pub enum LinkTransport {
    #[default]
    Tcp,
    Tls(Arc<rustls::ClientConfig>),
    Ws(String),
    Wss(String, Arc<rustls::ClientConfig>),
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
}

/// Any of the streams below.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Largest HTTP response head accepted from a proxy.
const MAX_PROXY_HEAD: usize = 8 * 1024;

/// Opens the stream `o` describes, ready for CONNECT, with the meter of its TCP socket.
pub async fn open(o: &LinkOptions) -> Result<(Box<dyn Io>, SendMeter), ConnectError> {
    let tcp = match &o.proxy {
        None => TcpStream::connect((o.host.as_str(), o.port))
            .await
            .map_err(ConnectError::Io)?,
        Some(proxy) => through_proxy(proxy, &o.host, o.port).await?,
    };
    tune(&tcp, o.keep_alive);
    let (tcp, meter) = Metered::new(tcp);
    let stream: Box<dyn Io> = match &o.transport {
        LinkTransport::Tcp => Box::new(tcp),
        LinkTransport::Tls(config) => Box::new(tls(config, &o.host, tcp).await?),
        LinkTransport::Ws(url) => Box::new(websocket(url, tcp, o.max_packet_size).await?),
        LinkTransport::Wss(url, config) => {
            let tls = tls(config, &o.host, tcp).await?;
            Box::new(websocket(url, tls, o.max_packet_size).await?)
        }
    };
    Ok((stream, meter))
}

/// Most bytes the kernel holds for the socket that it has not sent yet
/// (`TCP_NOTSENT_LOWAT`). What waits beyond this waits in the connection task, where a
/// PINGREQ or PUBACK is queued behind at most one batch instead of behind megabytes of a
/// send buffer the kernel grew for a fast link: on a 256 kbit/s stretch a full default buffer
/// takes minutes to leave. 64 KiB keep a 2 MB/s link busy across 30 ms of scheduling delay.
const NOTSENT_LOWAT: u32 = 64 * 1024;

/// The TCP socket under whatever layers (TLS, WebSocket) the transport adds, counting the
/// bytes written to it, so that [`SendMeter`] can tell what the peer's TCP acknowledged.
struct Metered {
    tcp: TcpStream,
    written: Arc<AtomicU64>,
}

impl Metered {
    fn new(tcp: TcpStream) -> (Metered, SendMeter) {
        let written = Arc::new(AtomicU64::new(0));
        let meter = SendMeter {
            fd: tcp.as_raw_fd(),
            written: Arc::clone(&written),
        };
        (Metered { tcp, written }, meter)
    }
}

impl AsyncRead for Metered {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Metered {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.tcp).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// What the central broker's TCP has acknowledged of what the connection wrote: proof that the
/// link carries bytes even while no MQTT packet comes back (a large message on a slow
/// stretch), and the bytes still on their way.
///
/// Read only by the connection task that owns the stream: the socket it names is open for as
/// long as that stream lives.
pub struct SendMeter {
    fd: RawFd,
    written: Arc<AtomicU64>,
}

impl SendMeter {
    /// Bytes written to the socket so far, and of those the ones not acknowledged yet by the
    /// peer (sent or not: `TIOCOUTQ`). `None` if the kernel does not say.
    pub fn read(&self) -> Option<(u64, u64)> {
        let mut queued: libc::c_int = 0;
        // SAFETY: TIOCOUTQ writes one int through the pointer, which points to a live local
        // of that type. An fd that is no longer this socket makes the call fail or report
        // another socket's queue, never touch other memory.
        let rc = unsafe { libc::ioctl(self.fd, libc::TIOCOUTQ, &mut queued) };
        let written = self.written.load(Ordering::Relaxed);
        (rc == 0).then(|| (written, (queued.max(0) as u64).min(written)))
    }
}

/// No Nagle delay (the connection task writes whole batches), at most [`NOTSENT_LOWAT`] bytes
/// unsent in the kernel, and the kernel gives up on data unacknowledged for 1.5 × keep-alive,
/// the same deadline the uplink keeps: a tunnel that swallows packets then fails the socket
/// instead of leaving writes queued for minutes.
fn tune(tcp: &TcpStream, keep_alive: Duration) {
    if let Err(e) = tcp.set_nodelay(true) {
        log::debug!("uplink: cannot set TCP_NODELAY: {e}");
    }
    let lowat: libc::c_int = NOTSENT_LOWAT as libc::c_int;
    // SAFETY: the option value is one int read through a pointer to a live local of that type
    // with its exact size; the fd is the open socket `tcp` borrows.
    let rc = unsafe {
        libc::setsockopt(
            tcp.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            std::ptr::addr_of!(lowat).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        log::debug!(
            "uplink: cannot set TCP_NOTSENT_LOWAT: {}",
            io::Error::last_os_error()
        );
    }
    let timeout_ms = u32::try_from((keep_alive + keep_alive / 2).as_millis()).unwrap_or(u32::MAX);
    if let Err(e) =
        nix::sys::socket::setsockopt(tcp, nix::sys::socket::sockopt::TcpUserTimeout, &timeout_ms)
    {
        log::debug!("uplink: cannot set TCP_USER_TIMEOUT: {e}");
    }
}

async fn tls<S: Io>(
    config: &std::sync::Arc<rustls::ClientConfig>,
    host: &str,
    stream: S,
) -> Result<tokio_rustls::client::TlsStream<S>, ConnectError> {
    let name =
        ServerName::try_from(host.to_string()).map_err(|source| ConnectError::ServerName {
            host: host.to_string(),
            source,
        })?;
    tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, stream)
        .await
        .map_err(ConnectError::Tls)
}

async fn websocket<S: Io>(url: &str, stream: S, max_message: u32) -> Result<WsIo<S>, ConnectError> {
    let mut request = url
        .into_client_request()
        .map_err(|e| ConnectError::WebSocketUrl {
            url: url.to_string(),
            source: Box::new(e),
        })?;
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
    let mut config = WebSocketConfig::default();
    config.max_message_size = Some(max_message as usize);
    config.max_frame_size = Some(max_message as usize);
    let (ws, _) = tokio_tungstenite::client_async_with_config(request, stream, Some(config))
        .await
        .map_err(|e| ConnectError::WebSocket(Box::new(e)))?;
    Ok(WsIo::new(ws))
}

/// A tunnel through an HTTP proxy (RFC 9110 CONNECT), Basic credentials if configured.
async fn through_proxy(
    proxy: &HttpProxy,
    host: &str,
    port: u16,
) -> Result<TcpStream, ConnectError> {
    let name = format!("{}:{}", proxy.host, proxy.port);
    let fail = |source: io::Error| ConnectError::ProxyIo {
        proxy: name.clone(),
        source,
    };
    let mut tcp = TcpStream::connect((proxy.host.as_str(), proxy.port))
        .await
        .map_err(fail)?;
    let target = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some((user, password)) = &proxy.credentials {
        let token = base64(format!("{user}:{password}").as_bytes());
        request.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
    }
    request.push_str("\r\n");
    tcp.write_all(request.as_bytes()).await.map_err(fail)?;
    // Byte by byte up to the blank line: nothing of the tunnelled stream may be read here.
    let mut head = Vec::with_capacity(256);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_PROXY_HEAD {
            return Err(ConnectError::ProxyHeadTooLong {
                proxy: name,
                limit: MAX_PROXY_HEAD,
            });
        }
        let byte = tcp.read_u8().await.map_err(fail)?;
        head.push(byte);
    }
    let status = String::from_utf8_lossy(&head);
    let status = status.lines().next().unwrap_or("");
    let code = status.split_whitespace().nth(1);
    if !status.starts_with("HTTP/1.") || code != Some("200") {
        return Err(ConnectError::ProxyRefused {
            proxy: name,
            target,
            status: status.to_string(),
        });
    }
    Ok(tcp)
}

/// Standard base64 with padding (RFC 4648 §4), for the Basic credentials.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{base64, HttpProxy};

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
    }

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
