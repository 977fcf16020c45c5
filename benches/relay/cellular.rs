//! The cellular link of the `cellular` workload: the central Mosquitto in a network namespace
//! of its own, reached from here over a veth pair, with 1 % random loss on its uplink listener
//! and a delaying TCP proxy in this process in front of that listener.
//!
//! This kernel has no `sch_netem`, so loss is an iptables `statistic` DROP rule inside the
//! namespace, and latency is the proxy: every chunk it reads is forwarded 60 ms ± 20 ms later
//! (uniform), in both directions (RTT about 120 ms), never before the previous chunk of the same
//! direction. Only the uplink listener is faulted; the receiver uses a second listener of the
//! same broker. Names and addresses include the process id; the namespace (with its iptables
//! rules and its end of the veth pair) and the proxy go away when their guards are dropped,
//! also when a measurement panics.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Central's listener for the local side's uplink (behind the proxy, lossy).
pub const UPLINK_PORT: u16 = 1883;
/// Central's listener for the receiver (straight over the veth pair, never faulted).
pub const SINK_PORT: u16 = 1884;
/// Share of the uplink's packets dropped, each direction.
pub const LOSS: f64 = 0.01;
/// One-way delay of the proxy, and its uniform jitter either side.
pub const DELAY: Duration = Duration::from_millis(60);
pub const JITTER: Duration = Duration::from_millis(20);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Why the workload cannot run here, if it cannot.
pub fn unavailable() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("network namespaces and iptables need root".to_string());
    }
    None
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    run(Command::new("ip").args(args))
}

/// A network namespace of the benchmark's own with one veth pair to it; deleted on drop.
pub struct Netns {
    pub name: String,
    host_if: Option<String>,
    /// The namespace's address, reachable from here.
    pub addr: Ipv4Addr,
}

impl Netns {
    /// Creates the namespace, the veth pair (a /30 of 10.202.0.0/16 not in use here) and
    /// the loss rules on [`UPLINK_PORT`].
    pub fn create() -> Result<Netns, String> {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        // Interface names have at most 15 bytes: "trb" + pid (<= 7 digits) + "x" + n + "h".
        let name = format!("trb{pid}x{n}");
        let (host_if, ns_if) = (format!("{name}h"), format!("{name}n"));
        let used = Command::new("ip")
            .args(["-4", "-o", "addr"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let mut slot = (pid.wrapping_mul(64).wrapping_add(n * 7)) % 16384;
        let (host_addr, ns_addr) = loop {
            let base = slot * 4;
            let (hi, lo) = ((base / 256) as u8, (base % 256) as u8);
            let host = Ipv4Addr::new(10, 202, hi, lo + 1);
            let peer = Ipv4Addr::new(10, 202, hi, lo + 2);
            if !used.contains(&format!("inet {host}/")) && !used.contains(&format!("inet {peer}/"))
            {
                break (host, peer);
            }
            slot = (slot + 1) % 16384;
        };
        ip(&["netns", "add", &name])?;
        let mut ns = Netns {
            name,
            host_if: None,
            addr: ns_addr,
        };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ])?;
        // Recorded before anything else can fail, so that drop removes it.
        ns.host_if = Some(host_if.clone());
        ip(&["link", "set", &ns_if, "netns", &ns.name])?;
        ip(&["addr", "add", &format!("{host_addr}/30"), "dev", &host_if])?;
        ip(&["link", "set", &host_if, "up"])?;
        ns.exec(&["ip", "addr", "add", &format!("{ns_addr}/30"), "dev", &ns_if])?;
        ns.exec(&["ip", "link", "set", &ns_if, "up"])?;
        let port = UPLINK_PORT.to_string();
        let p = LOSS.to_string();
        for (chain, dir) in [("INPUT", "--dport"), ("OUTPUT", "--sport")] {
            ns.exec(&[
                "iptables",
                "-A",
                chain,
                "-p",
                "tcp",
                dir,
                &port,
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                &p,
                "-j",
                "DROP",
            ])?;
        }
        Ok(ns)
    }

    /// Runs a command inside the namespace.
    fn exec(&self, args: &[&str]) -> Result<(), String> {
        run(Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting either end of a veth pair deletes both; the namespace takes its iptables
        // rules with it.
        if let Some(host_if) = &self.host_if {
            let _ = ip(&["link", "del", host_if]);
        }
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// A TCP proxy on 127.0.0.1 that forwards to `target` with [`DELAY`] ± [`JITTER`] per chunk
/// and direction, keeping byte order. Stops (with every connection) on drop.
pub struct DelayProxy {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl DelayProxy {
    pub async fn start(target: SocketAddr) -> Result<DelayProxy, String> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .map_err(|e| format!("delay proxy: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("delay proxy: {e}"))?;
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((inbound, _)) = listener.accept().await {
                // Reap finished connections so the set does not grow over reconnects.
                while conns.try_join_next().is_some() {}
                conns.spawn(async move {
                    // Central down: the connection is closed at once, as a refused one.
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    tokio::join!(pipe(ri, wo), pipe(ro, wi));
                });
            }
        });
        Ok(DelayProxy { addr, task })
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One delay from DELAY - JITTER to DELAY + JITTER, uniform.
fn delay() -> Duration {
    let j = JITTER.as_nanos() as u64;
    (DELAY - JITTER) + Duration::from_nanos(fastrand::u64(0..=2 * j))
}

/// Copies one direction: each chunk is due at its arrival plus a delay, but never before the
/// previous chunk (delivery at max(previous due time, arrival + delay)).
async fn pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 16 * 1024];
        let mut last = Instant::now();
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let due = (Instant::now() + delay()).max(last);
            last = due;
            if tx.send((due, buf[..n].to_vec())).is_err() {
                return;
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

/// The link of one measurement: the namespace central runs in and the proxy in front of it.
/// The proxy is declared first, so it stops before the namespace goes.
pub struct Link {
    proxy: DelayProxy,
    _ns: Netns,
}

impl Link {
    pub fn new(ns: Netns, proxy: DelayProxy) -> Link {
        Link { proxy, _ns: ns }
    }

    /// Central's uplink listener as the local side sees it: the proxy.
    pub fn entry(&self) -> SocketAddr {
        self.proxy.addr
    }
}
