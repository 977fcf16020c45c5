//! Accepts sockets and bounds how many are open at once.
//!
//! The bound counts every open socket, also those that have not sent CONNECT yet, so a burst
//! of idle sockets cannot exhaust file descriptors. Up to `REFUSAL_SLOTS` sockets beyond
//! `max_connections` are kept just long enough to read their CONNECT and answer "server busy"
//! (so a well-behaved client learns why); any further socket is closed at once.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::task::JoinSet;

use super::connection::{self, Io};
use super::state::BrokerState;
use super::{tls, websocket};
use crate::shutdown::Shutdown;

const REFUSAL_SLOTS: usize = 16;

/// Decrements the open-socket counts when a connection task ends, however it ends.
struct SocketGuard(Arc<BrokerState>, Option<std::net::IpAddr>);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let admission = self.0.admission();
        admission.open_sockets.fetch_sub(1, Ordering::SeqCst);
        if let Some(ip) = self.1 {
            admission.addresses.remove(ip);
        }
    }
}

/// How an accepted socket is spoken to.
pub enum Transport {
    Plain,
    /// TLS handshake first, within `connect_timeout`, in the connection's own task.
    Tls(tokio_rustls::TlsAcceptor),
    /// WebSocket upgrade first, likewise.
    WebSocket,
}

/// Starts serving an accepted socket, or closes it if too many are open.
pub fn admit(
    stream: TcpStream,
    peer: SocketAddr,
    transport: Transport,
    state: &Arc<BrokerState>,
    shutdown: &Shutdown,
    tasks: &mut JoinSet<()>,
) {
    let open = state
        .admission()
        .open_sockets
        .fetch_add(1, Ordering::SeqCst)
        + 1;
    let mut guard = SocketGuard(Arc::clone(state), None);
    let per_address = state.config().max_connections_per_address;
    if !state.admission().addresses.try_add(peer.ip(), per_address) {
        log::warn!(
            "local broker: {} already holds {per_address} sockets; closing {peer} at once",
            peer.ip()
        );
        state.count(|s| {
            s.refused_connections += 1;
            s.refused_per_address += 1;
        });
        return;
    }
    guard.1 = Some(peer.ip());
    let max = state.config().max_connections;
    if open > max + REFUSAL_SLOTS {
        // A flood of sockets must not become a flood of log lines.
        static SAID: crate::logging::Throttle =
            crate::logging::Throttle::new(std::time::Duration::from_secs(60));
        if let Some(held) = SAID.allow() {
            log::warn!("local broker: {open} sockets open (limit {max}); closing {peer} at once ({held} more closed since the last report)");
        }
        state.count(|s| s.refused_connections += 1);
        drop(stream);
        drop(guard);
        return;
    }
    let refuse = open > max;
    let state = Arc::clone(state);
    let shutdown = shutdown.clone();
    tasks.spawn(async move {
        let _guard = guard;
        let io = match transport {
            Transport::Plain => Io::tcp(stream),
            Transport::Tls(acceptor) => {
                let _ = stream.set_nodelay(true);
                let timeout = state.config().connect_timeout;
                let mut stop = shutdown.clone();
                let handshake = tokio::select! {
                    r = tokio::time::timeout(timeout, acceptor.accept(stream)) => r,
                    _ = stop.recv() => return,
                };
                match handshake {
                    Ok(Ok(tls)) => {
                        let cn = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .and_then(|c| tls::subject_cn(c));
                        Io::new(tls, cn)
                    }
                    Ok(Err(e)) => {
                        log::info!("local broker: {peer}: TLS handshake failed: {e}");
                        state.count(|s| s.refused_connections += 1);
                        return;
                    }
                    Err(_) => {
                        log::info!(
                            "local broker: {peer}: TLS handshake not finished within {timeout:?}; closing"
                        );
                        state.count(|s| s.refused_connections += 1);
                        return;
                    }
                }
            }
            Transport::WebSocket => {
                let timeout = state.config().connect_timeout;
                let max = state.config().max_packet_size as usize + 16;
                let mut stop = shutdown.clone();
                let upgrade = tokio::select! {
                    r = tokio::time::timeout(timeout, websocket::accept(stream, max)) => r,
                    _ = stop.recv() => return,
                };
                match upgrade {
                    Ok(Ok(ws)) => Io::new(ws, None),
                    Ok(Err(e)) => {
                        log::info!("local broker: {peer}: WebSocket upgrade failed: {e}");
                        state.count(|s| s.refused_connections += 1);
                        return;
                    }
                    Err(_) => {
                        log::info!(
                            "local broker: {peer}: WebSocket upgrade not finished within {timeout:?}; closing"
                        );
                        state.count(|s| s.refused_connections += 1);
                        return;
                    }
                }
            }
        };
        connection::serve(io, peer, state, shutdown, refuse).await;
    });
}
