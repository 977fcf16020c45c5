//! The processes under test: a central Mosquitto, a local Mosquitto bridging to it, and the
//! trainrelay release binary. Each runs on an ephemeral loopback port (central, for the
//! cellular workload, inside the namespace of a cellular link) with its own temp dir and is
//! killed when its guard is dropped, so an aborted benchmark leaves nothing behind.

use std::ffi::OsString;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use trainrelay_testkit::cellular::CellularLink;

/// The three setups compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setup {
    /// Load generator straight into the central broker: the ceiling.
    Direct,
    /// Local Mosquitto with a bridge section -> central.
    Bridge,
    /// trainrelay -> central, with its default `uplink.connections` (or
    /// `BENCH_RELAY_CONNECTIONS`).
    Relay,
    /// trainrelay with `uplink.connections = 1` (the cellular workload's third setup).
    RelayOne,
}

impl Setup {
    /// Any setup by its name.
    #[allow(dead_code)] // the relay benchmark's, not the fleet benchmark's
    pub fn by_name(name: &str) -> Option<Setup> {
        [Setup::Direct, Setup::Bridge, Setup::Relay, Setup::RelayOne]
            .into_iter()
            .find(|s| s.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            Setup::Direct => "direct",
            Setup::Bridge => "mosquitto-bridge",
            Setup::Relay => "trainrelay",
            Setup::RelayOne => "trainrelay-1conn",
        }
    }

    /// Topic the generator publishes to; every setup delivers it as `trains/T1/up/bench`.
    pub fn topic(self) -> &'static str {
        match self {
            Setup::Direct => "trains/T1/up/bench",
            Setup::Bridge | Setup::Relay | Setup::RelayOne => "up/bench",
        }
    }
}

/// Filter the receiver subscribes to at the central broker.
pub const SINK_FILTER: &str = "trains/T1/up/#";

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

/// Waits until something accepts TCP connections on the loopback port.
pub async fn wait_for_port(port: u16, within: Duration) {
    wait_for(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), within).await;
}

/// Waits until something accepts TCP connections at the address.
pub async fn wait_for(addr: SocketAddr, within: Duration) {
    let start = Instant::now();
    while start.elapsed() < within {
        let attempt =
            tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr));
        if matches!(attempt.await, Ok(Ok(_))) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("nothing listens on {addr} after {within:?}");
}

/// A child process killed (SIGKILL) on drop.
pub struct Proc {
    name: String,
    child: Option<Child>,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Proc {
        let log = std::fs::File::create(log).expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            name: name.to_string(),
            child: Some(child),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// (VmRSS, VmHWM) in KiB from /proc/PID/status.
    pub fn memory_kib(&self) -> (u64, u64) {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_else(|e| panic!("{}: cannot read /proc status: {e}", self.name));
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// SIGTERM (Mosquitto then saves its persistence file) and wait.
    pub fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let _ = child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn write(path: &Path, text: &str) {
    let mut f = std::fs::File::create(path).expect("config file");
    f.write_all(text.as_bytes()).expect("config file");
}

/// The central Mosquitto, restartable on the same ports and persistence directory.
pub struct Central {
    /// Where it listens; the receiver connects here.
    pub host: IpAddr,
    pub port: u16,
    /// The listener the local side's uplink uses: `port` itself on loopback, a second
    /// listener when central runs in a network namespace (so faults can apply to it alone).
    pub uplink_port: u16,
    /// `max_inflight_messages`, also the Receive Maximum it announces to MQTT 5 clients
    /// (`BENCH_CENTRAL_INFLIGHT`, 100, unless set otherwise).
    pub inflight: u32,
    /// The words that start a program where it runs (a cellular link's namespace), if not
    /// here.
    exec_prefix: Option<Vec<OsString>>,
    dir: PathBuf,
    proc: Option<Proc>,
}

impl Central {
    /// On an ephemeral loopback port.
    pub fn new(dir: &Path) -> Central {
        let port = free_port();
        Central::build(dir, IpAddr::V4(Ipv4Addr::LOCALHOST), port, port, None)
    }

    /// Inside the namespace of a cellular link, on `port` of the namespace's address (for the
    /// uplink, across the link, and for a receiver inside the namespace alike).
    #[allow(dead_code)] // the relay benchmark's, not the fleet benchmark's
    pub fn in_link(dir: &Path, link: &CellularLink, port: u16, inflight: u32) -> Central {
        let mut c = Central::build(dir, IpAddr::V4(link.addr), port, port, None);
        c.exec_prefix = Some(link.exec_prefix());
        c.inflight = inflight;
        c
    }

    fn build(
        dir: &Path,
        host: IpAddr,
        port: u16,
        uplink_port: u16,
        exec_prefix: Option<Vec<OsString>>,
    ) -> Central {
        let dir = dir.join("central");
        std::fs::create_dir_all(&dir).expect("central dir");
        let inflight = std::env::var("BENCH_CENTRAL_INFLIGHT")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(100);
        Central {
            host,
            port,
            uplink_port,
            inflight,
            exec_prefix,
            dir,
            proc: None,
        }
    }

    /// What it logged so far (its connects: "New client connected from … as ID").
    #[allow(dead_code)] // the relay benchmark's, not the fleet benchmark's
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    /// Its process id (0 while stopped).
    #[allow(dead_code)] // the fleet benchmark's, not the relay benchmark's
    pub fn pid(&self) -> u32 {
        self.proc.as_ref().map_or(0, |p| p.pid())
    }

    /// (VmRSS, VmHWM) in KiB.
    #[allow(dead_code)] // the fleet benchmark's, not the relay benchmark's
    pub fn memory_kib(&self) -> (u64, u64) {
        self.proc.as_ref().map_or((0, 0), |p| p.memory_kib())
    }

    /// The receiver's address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.host, self.port)
    }

    /// The uplink listener's address.
    pub fn uplink_addr(&self) -> SocketAddr {
        SocketAddr::new(self.host, self.uplink_port)
    }

    /// Starts it and waits until it listens; returns when the process was spawned.
    pub async fn start(&mut self) -> Instant {
        let conf = self.dir.join("mosquitto.conf");
        // `user root`: when run as root Mosquitto would otherwise switch to user `mosquitto`
        // and then fail to write its persistence file into a root-owned temp dir.
        let mut listeners = format!("listener {} {}\n", self.port, self.host);
        if self.uplink_port != self.port {
            listeners += &format!("listener {} {}\n", self.uplink_port, self.host);
        }
        // Also the Receive Maximum it announces to MQTT 5 clients (the relay's window).
        let inflight = self.inflight;
        write(
            &conf,
            &format!(
                "user root\n{listeners}allow_anonymous true\npersistence true\n\
                 persistence_location {dir}/\nmax_queued_messages 0\n\
                 max_inflight_messages {inflight}\n{extra}\n",
                dir = self.dir.display(),
                // More lines for central's mosquitto.conf, e.g. `set_tcp_nodelay true`.
                extra = std::env::var("BENCH_CENTRAL_CONF")
                    .unwrap_or_default()
                    .replace("\\n", "\n"),
            ),
        );
        // `cellular-link exec` execs the command in place: the pid is Mosquitto's own.
        let mut cmd = match &self.exec_prefix {
            Some(prefix) => {
                let mut cmd = Command::new(&prefix[0]);
                cmd.args(&prefix[1..]).arg("mosquitto");
                cmd
            }
            None => Command::new("mosquitto"),
        };
        cmd.arg("-c").arg(&conf);
        let spawned = Instant::now();
        self.proc = Some(Proc::spawn("central mosquitto", cmd, &self.dir.join("log")));
        wait_for(self.addr(), Duration::from_secs(20)).await;
        spawned
    }

    /// SIGTERM: a clean stop that keeps the receiver's persistent session and its queue.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.terminate();
        }
    }
}

/// The local side of setups (b) and (c).
pub struct Local {
    pub port: u16,
    pub proc: Proc,
    /// trainrelay's status socket (none for the bridge).
    pub status: Option<PathBuf>,
}

impl Local {
    /// The uplink connections as trainrelay's status socket reports them.
    pub fn uplink_connections(&self) -> Vec<UplinkConn> {
        use std::io::{BufRead, BufReader};
        let Some(path) = &self.status else {
            return Vec::new();
        };
        let ask = || -> std::io::Result<String> {
            let mut s = std::os::unix::net::UnixStream::connect(path)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(b"{\"v\":1,\"query\":\"status\"}\n")?;
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line)?;
            Ok(line)
        };
        let Ok(line) = ask() else {
            return Vec::new();
        };
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        v["status"]["uplink"]["connections"]
            .as_array()
            .map(|list| {
                list.iter()
                    .map(|c| UplinkConn {
                        window: c["window"].as_u64().unwrap_or(0),
                        max_in_flight: c["max_in_flight"].as_u64().unwrap_or(0),
                        forwarded: c["forwarded"].as_u64().unwrap_or(0),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// One uplink connection of trainrelay's status report.
#[derive(Debug, Clone, Copy, Default)]
pub struct UplinkConn {
    pub window: u64,
    pub max_in_flight: u64,
    pub forwarded: u64,
}

/// Local Mosquitto with a bridge section as a team would deploy it: QoS 1 topics, clean
/// session off, persistence on, MQTT v5 towards central, no queue limit (the default of 1000
/// would drop the backlog), and the same in-flight window (256) as trainrelay's uplink.
/// Mosquitto 2.0.11's MQTT v5 bridge holds to that window (or central's Receive Maximum) only
/// while PUBACKs come back at once: with them 120 ms late it had 1,900 of 2,000 QoS 1
/// messages unacknowledged (eclipse-mosquitto/mosquitto#2301), which the `cellular` figures
/// show. `central` is the central broker's address as the local side sees it.
pub async fn start_bridge(dir: &Path, central: SocketAddr) -> Local {
    let dir = dir.join("bridge");
    std::fs::create_dir_all(&dir).expect("bridge dir");
    let port = free_port();
    let conf = dir.join("mosquitto.conf");
    write(
        &conf,
        &format!(
            "user root\nlistener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n\
             persistence_location {dir}/\nmax_queued_messages 0\nmax_inflight_messages 256\n\
             \nconnection central\naddress {central}\n\
             bridge_protocol_version mqttv50\ncleansession false\nclientid bridge-T1\n\
             restart_timeout 1\nnotifications false\ntopic # out 1 up/ trains/T1/up/\n",
            dir = dir.display()
        ),
    );
    let mut cmd = Command::new("mosquitto");
    cmd.arg("-c").arg(&conf);
    let proc = Proc::spawn("bridge mosquitto", cmd, &dir.join("log"));
    wait_for_port(port, Duration::from_secs(20)).await;
    Local {
        port,
        proc,
        status: None,
    }
}

/// trainrelay with its default durability (`synchronous = "full"`, the iPad acknowledged only
/// after commit). Only the store bound is raised (the 1M-message backlog exceeds the default
/// 256 MiB) and reconnect backoff is capped at 1 s like the bridge's `restart_timeout`.
/// `central` is the central broker's address as the local side sees it; `connections` is
/// `uplink.connections` (`None`: the daemon's default, or `BENCH_RELAY_CONNECTIONS`).
pub async fn start_relay(dir: &Path, central: SocketAddr, connections: Option<u64>) -> Local {
    let dir = dir.join("relay");
    std::fs::create_dir_all(&dir).expect("relay dir");
    let port = free_port();
    let conf = dir.join("trainrelay.toml");
    write(
        &conf,
        &format!(
            r#"train_id = "T1"

[local]
listen = "127.0.0.1:{port}"

[uplink]
url = "mqtt://{central}"
backoff_min = "100ms"
backoff_max = "1s"
{connections}
[store]
path = "{dir}/store.db"
max_bytes = "4GiB"
synchronous = "{sync}"

[status]
socket = "{dir}/status.sock"

[[route]]
direction = "up"
local = "up/#"
remote = "trains/T1/up/#"
"#,
            dir = dir.display(),
            sync = std::env::var("BENCH_RELAY_SYNC").unwrap_or_else(|_| "full".into()),
            connections = connections
                .or_else(relay_connections)
                .map(|n| format!("connections = {n}\n"))
                .unwrap_or_default(),
        ),
    );
    let mut cmd = Command::new(relay_binary());
    cmd.arg("run")
        .arg("--config")
        .arg(&conf)
        .env("RUST_LOG", "warn");
    let proc = Proc::spawn("trainrelay", cmd, &dir.join("log"));
    wait_for_port(port, Duration::from_secs(30)).await;
    Local {
        port,
        proc,
        status: Some(dir.join("status.sock")),
    }
}

/// trainrelay's `uplink.connections` from `BENCH_RELAY_CONNECTIONS`; unset: the daemon's
/// default.
pub fn relay_connections() -> Option<u64> {
    std::env::var("BENCH_RELAY_CONNECTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
}

/// The trainrelay binary under test: `BENCH_RELAY_BIN` (e.g. another checkout's build, to
/// measure it without merging; `TRAINRELAY_BIN` is the older name), else the release binary
/// cargo built alongside this benchmark.
pub fn relay_binary() -> PathBuf {
    std::env::var_os("BENCH_RELAY_BIN")
        .or_else(|| std::env::var_os("TRAINRELAY_BIN"))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_trainrelay")))
}
