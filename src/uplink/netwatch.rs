//! Network-change watch: reconnect at once when the route to the central broker changes,
//! instead of waiting up to 1.5 × keep-alive for the old path to be declared dead.
//!
//! A train switches between depot WLAN and 5G, and its modem re-attaches with a new address.
//! The kernel announces such changes on the rtnetlink multicast groups (links, addresses and
//! routes, IPv4 and IPv6); a burst of them is debounced, and then the route to the endpoint in
//! use is looked up the cheap way — connecting a UDP socket sends nothing but makes the kernel
//! pick the source address it would use. If that source differs from the one recorded when
//! the connection came up (or the endpoint became unreachable), the connection is on a path
//! that no longer exists: the uplink is asked to reconnect. Unrelated changes (a passenger
//! interface, a test's namespace) leave the source unchanged and cost one lookup.
//!
//! A gateway change that keeps the same source address is not noticed here; keep-alive still
//! covers it.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use nix::sys::socket::{
    bind, recv, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};
use tokio::io::unix::AsyncFd;

use super::endpoint::Endpoint;
use super::status::{LinkState, StatusHandle};

const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV4_ROUTE: u32 = 0x40;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;
const RTMGRP_IPV6_ROUTE: u32 = 0x400;

/// A burst of netlink messages (an interface going down removes addresses and routes one by
/// one) settles within this quiet time before the route is looked up.
pub const DEBOUNCE: Duration = Duration::from_millis(500);

/// A subscription to rtnetlink's link, address and route announcements.
pub struct Watch {
    fd: AsyncFd<OwnedFd>,
}

impl Watch {
    pub fn open() -> io::Result<Watch> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkRoute,
        )?;
        let groups = RTMGRP_LINK
            | RTMGRP_IPV4_IFADDR
            | RTMGRP_IPV4_ROUTE
            | RTMGRP_IPV6_IFADDR
            | RTMGRP_IPV6_ROUTE;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, groups))?;
        // SAFETY: the `OwnedFd` is moved into the `AsyncFd`, which owns it until it is
        // dropped; nothing else closes or replaces the descriptor while it is registered.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)?;
        Ok(Watch { fd })
    }

    /// Resolves after a change, once no further message came for [`DEBOUNCE`].
    pub async fn changed(&self) -> io::Result<()> {
        self.drain_one().await?;
        while let Ok(r) = tokio::time::timeout(DEBOUNCE, self.drain_one()).await {
            r?;
        }
        Ok(())
    }

    /// Waits for readability and reads everything queued. The content is not parsed: any
    /// change is a reason to look the route up again. An overrun (ENOBUFS) is a change too.
    async fn drain_one(&self) -> io::Result<()> {
        let mut buf = [0u8; 8192];
        loop {
            let mut guard = self.fd.readable().await?;
            let mut got = false;
            loop {
                match recv(
                    self.fd.get_ref().as_raw_fd(),
                    &mut buf,
                    MsgFlags::MSG_DONTWAIT,
                ) {
                    Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                    Ok(_) | Err(nix::errno::Errno::ENOBUFS) => got = true,
                    Err(nix::errno::Errno::EAGAIN) => {
                        guard.clear_ready();
                        break;
                    }
                    Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if got {
                return Ok(());
            }
        }
    }
}

/// The source address the kernel would use now to reach `endpoint` (`None`: no route, or
/// the name does not resolve within a few seconds). Resolution runs on tokio's blocking pool.
pub async fn route_source(endpoint: &Endpoint) -> Option<IpAddr> {
    let target = (endpoint.host.clone(), endpoint.port);
    let addr = tokio::time::timeout(Duration::from_secs(3), tokio::net::lookup_host(target))
        .await
        .ok()?
        .ok()?
        .next()?;
    let any: std::net::SocketAddr = if addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = std::net::UdpSocket::bind(any).ok()?;
    socket.connect(addr).ok()?;
    Some(socket.local_addr().ok()?.ip())
}

/// Runs until the task is aborted: on a change that moves the route to the endpoint in use,
/// asks the uplink to reconnect; while it backs off, a change of route to the endpoint it
/// will try next cuts the wait short.
pub async fn watch(status: StatusHandle, endpoints: Vec<Endpoint>) {
    let watch = match Watch::open() {
        Ok(w) => w,
        Err(e) => {
            log::warn!(
                "uplink: cannot watch network changes over netlink ({e}); dead links are \
                 noticed by keep-alive only"
            );
            return;
        }
    };
    let mut last: Option<(String, Option<IpAddr>)> = None;
    loop {
        if let Err(e) = watch.changed().await {
            log::warn!(
                "uplink: netlink watch ended ({e}); dead links are noticed by keep-alive only"
            );
            return;
        }
        let snap = status.snapshot();
        let Some(url) = status.endpoint_url() else {
            continue;
        };
        let Some(endpoint) = endpoints.iter().find(|e| e.url == url) else {
            continue;
        };
        let now = route_source(endpoint).await;
        let before = match snap.state {
            LinkState::Connected | LinkState::Draining => Some(status.route_source()),
            LinkState::BackingOff => last
                .as_ref()
                .filter(|(u, _)| *u == url)
                .map(|(_, src)| *src),
            _ => None,
        };
        if let Some(before) = before {
            if before != now {
                log::info!(
                    "uplink {url}: route changed (source {} -> {}); reconnecting now",
                    show(before),
                    show(now)
                );
                status.reconnect_this();
            }
        }
        last = Some((url, now));
    }
}

fn show(a: Option<IpAddr>) -> String {
    a.map_or_else(|| "none".into(), |a| a.to_string())
}
