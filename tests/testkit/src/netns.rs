//! Fault-injection harness: the central Mosquitto in a network namespace of the test's own,
//! reached from the root namespace (where the relay runs) over veth pairs whose addresses exist
//! only on those pairs, plus a delaying TCP proxy and a steady iPad load.
//!
//! Faults are what the kernel of these machines offers without `sch_netem`: iptables DROP
//! rules inside the central's namespace (a silent blackhole, no RST), `statistic` random loss,
//! and `ip link set down`. The rules match only the relay's listener port, so the test's own
//! control-centre client (on a second port) keeps watching through every fault. Everything is
//! removed by drop guards, even when a test fails: deleting the namespace takes its iptables
//! rules, listeners and the namespace end of every veth with it.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::Publish;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::V5Client;

/// Port of the central's listener the relay uses (faults apply to it).
pub const RELAY_PORT: u16 = 1883;
/// Port of the central's listener the test's control client uses (never faulted).
pub const CONTROL_PORT: u16 = 1884;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// True when the tests can create namespaces; otherwise says why the test is skipped, or fails
/// it under CI ([`crate::require_root_or_skip`]).
pub fn can_fault(test: &str) -> bool {
    crate::require_root_or_skip(test)
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

fn ip(args: &[&str]) {
    run(Command::new("ip").args(args)).unwrap_or_else(|e| panic!("{e}"));
}

/// One veth pair between the root namespace and the central's.
#[derive(Debug, Clone)]
pub struct VethPath {
    pub host_if: String,
    pub ns_if: String,
    pub host_addr: Ipv4Addr,
    pub ns_addr: Ipv4Addr,
}

/// A network namespace of the test's own; deleted on drop with everything in it.
pub struct Netns {
    pub name: String,
    pub paths: Vec<VethPath>,
}

impl Netns {
    pub fn create() -> Netns {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("trl{}x{n}", std::process::id());
        ip(&["netns", "add", &name]);
        let ns = Netns {
            name,
            paths: Vec::new(),
        };
        ns.exec(&["ip", "link", "set", "lo", "up"])
            .unwrap_or_else(|e| panic!("{e}"));
        ns
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> Result<(), String> {
        run(Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args))
    }

    /// Adds a veth pair with a /30 of 10.200.0.0/16 not in use on this machine, chosen from
    /// the process id and a counter so parallel tests do not clash.
    pub fn add_path(&mut self) -> VethPath {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let host_if = format!("tr{pid}x{n}h");
        let ns_if = format!("tr{pid}x{n}n");
        let used = Command::new("ip")
            .args(["-4", "-o", "addr"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let mut slot = (pid.wrapping_mul(64).wrapping_add(n * 7)) % 16384;
        let (host_addr, ns_addr) = loop {
            let base = slot * 4;
            let host = Ipv4Addr::new(10, 200, (base / 256) as u8, (base % 256) as u8 + 1);
            let peer = Ipv4Addr::new(10, 200, (base / 256) as u8, (base % 256) as u8 + 2);
            if !used.contains(&format!("inet {host}/")) && !used.contains(&format!("inet {peer}/"))
            {
                break (host, peer);
            }
            slot = (slot + 1) % 16384;
        };
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ]);
        let path = VethPath {
            host_if,
            ns_if,
            host_addr,
            ns_addr,
        };
        // Record it before anything else can fail, so drop removes it.
        self.paths.push(path.clone());
        ip(&["link", "set", &path.ns_if, "netns", &self.name]);
        ip(&[
            "addr",
            "add",
            &format!("{}/30", path.host_addr),
            "dev",
            &path.host_if,
        ]);
        ip(&["link", "set", &path.host_if, "up"]);
        self.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{}/30", path.ns_addr),
            "dev",
            &path.ns_if,
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        self.exec(&["ip", "link", "set", &path.ns_if, "up"])
            .unwrap_or_else(|e| panic!("{e}"));
        path
    }

    /// An address of the central on the namespace's loopback (10.201.x.y, x.y taken from the
    /// first path's unique /30), reachable from the root namespace over whichever path
    /// [`Netns::route_service`] names: one endpoint URL behind two interfaces.
    pub fn add_service_addr(&self) -> Ipv4Addr {
        let o = self.paths[0].host_addr.octets();
        let svc = Ipv4Addr::new(10, 201, o[2], o[3]);
        self.exec(&["ip", "addr", "add", &format!("{svc}/32"), "dev", "lo"])
            .unwrap_or_else(|e| panic!("{e}"));
        svc
    }

    /// Routes the service address over `path` (replacing any previous route).
    pub fn route_service(&self, svc: Ipv4Addr, path: &VethPath) {
        ip(&[
            "route",
            "replace",
            &format!("{svc}/32"),
            "via",
            &path.ns_addr.to_string(),
            "dev",
            &path.host_if,
        ]);
    }

    /// `ip link set <host side> up|down`: the interface switch.
    pub fn set_link(&self, path: &VethPath, up: bool) {
        ip(&["link", "set", &path.host_if, if up { "up" } else { "down" }]);
    }

    /// Appends iptables rules inside the namespace; `rule` is the match and target after
    /// the chain name, e.g. `["-p", "tcp", "--dport", "1883", "-j", "DROP"]`.
    pub fn iptables(&self, op: &str, chain: &str, rule: &[&str]) {
        let mut args = vec!["iptables", op, chain];
        args.extend_from_slice(rule);
        self.exec(&args).unwrap_or_else(|e| panic!("{e}"));
    }

    /// A silent blackhole for the relay's listener: every packet to and from it dropped.
    pub fn blackhole(&self, on: bool) {
        let op = if on { "-I" } else { "-D" };
        let port = RELAY_PORT.to_string();
        self.iptables(op, "INPUT", &["-p", "tcp", "--dport", &port, "-j", "DROP"]);
        self.iptables(op, "OUTPUT", &["-p", "tcp", "--sport", &port, "-j", "DROP"]);
    }

    /// Random loss of `probability` on the relay's listener, both directions.
    pub fn random_loss(&self, probability: f64) {
        let port = RELAY_PORT.to_string();
        let p = probability.to_string();
        for (chain, dir) in [("INPUT", "--dport"), ("OUTPUT", "--sport")] {
            self.iptables(
                "-A",
                chain,
                &[
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
                ],
            );
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for p in &self.paths {
            let _ = run(Command::new("ip").args(["link", "del", &p.host_if]));
        }
        let _ = run(Command::new("ip").args(["netns", "del", &self.name]));
    }
}

/// Mosquitto as the central broker inside a namespace, listening on [`RELAY_PORT`] and
/// [`CONTROL_PORT`] on every address of the namespace.
pub struct NsCentral {
    pub ns: Netns,
    /// Extra mosquitto.conf lines.
    pub extra_conf: String,
    dir: PathBuf,
    child: Option<Child>,
}

impl NsCentral {
    /// A namespace with `paths` veth pairs and Mosquitto in it.
    pub async fn start(dir: &Path, paths: usize) -> NsCentral {
        NsCentral::start_with(dir, paths, "").await
    }

    /// [`NsCentral::start`] with extra mosquitto.conf lines.
    pub async fn start_with(dir: &Path, paths: usize, extra_conf: &str) -> NsCentral {
        let mut ns = Netns::create();
        for _ in 0..paths {
            ns.add_path();
        }
        let dir = dir.join("central");
        std::fs::create_dir_all(&dir).unwrap();
        let mut c = NsCentral {
            ns,
            extra_conf: extra_conf.to_string(),
            dir,
            child: None,
        };
        c.restart().await;
        c
    }

    /// (Re)starts Mosquitto on the same data directory. It saves its state after every change
    /// so that a SIGKILL of the central broker costs as little as possible of what it already
    /// acknowledged (what it loses is not the relay's to recover).
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "central broker already running");
        let conf = self.dir.join("mosquitto.conf");
        let mut f = std::fs::File::create(&conf).unwrap();
        writeln!(
            f,
            "user root\nlistener {RELAY_PORT}\nlistener {CONTROL_PORT}\nallow_anonymous true\npersistence true\npersistence_location {dir}/\nautosave_interval 1\nautosave_on_changes true\nmax_queued_messages 1000000\nmax_inflight_messages 100\nlog_dest file {dir}/mosquitto.log\n{extra}\n",
            dir = self.dir.display(),
            extra = self.extra_conf
        )
        .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns.name, "mosquitto", "-c"])
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start mosquitto (apt-get install mosquitto)");
        self.child = Some(child);
        let addr = self.ns.paths[0].ns_addr;
        let start = Instant::now();
        loop {
            let ok = tokio::time::timeout(
                Duration::from_secs(1),
                tokio::net::TcpStream::connect((addr, CONTROL_PORT)),
            )
            .await;
            if matches!(ok, Ok(Ok(_))) {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "central broker in {} does not listen",
                self.ns.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The relay's URL over path `i`.
    pub fn url(&self, i: usize) -> String {
        format!("mqtt://{}:{RELAY_PORT}", self.ns.paths[i].ns_addr)
    }

    /// A persistent control-centre client over path `i`.
    pub async fn control(&self, i: usize, id: &str) -> V5Client {
        V5Client::connect_host(
            &self.ns.paths[i].ns_addr.to_string(),
            CONTROL_PORT,
            id,
            false,
        )
        .await
    }
}

impl Drop for NsCentral {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What a control client received for one tag.
#[derive(Debug, Default)]
pub struct Tally {
    /// Unique sequence numbers in first-seen order.
    pub order: Vec<u64>,
    pub duplicates: usize,
}

impl Tally {
    pub fn missing(&self, n: u64) -> Vec<u64> {
        let seen: std::collections::HashSet<u64> = self.order.iter().copied().collect();
        (0..n).filter(|i| !seen.contains(i)).collect()
    }

    pub fn in_order(&self) -> bool {
        self.order.windows(2).all(|w| w[0] < w[1])
    }
}

/// Tallies what a control client receives, per tag, across several waits.
pub struct Collector {
    tags: Vec<String>,
    tallies: Vec<Tally>,
    seen: Vec<std::collections::HashSet<u64>>,
    pub received: usize,
}

impl Collector {
    pub fn new(tags: &[&str]) -> Collector {
        Collector {
            tags: tags.iter().map(|t| t.to_string()).collect(),
            tallies: tags.iter().map(|_| Tally::default()).collect(),
            seen: tags.iter().map(|_| Default::default()).collect(),
            received: 0,
        }
    }

    /// Receives until tag `i` has all of `0..targets[i]`, or `within` passed; returns whether
    /// everything arrived.
    pub async fn until(
        &mut self,
        control: &mut V5Client,
        targets: &[u64],
        within: Duration,
    ) -> bool {
        let deadline = Instant::now() + within;
        loop {
            let complete = self
                .seen
                .iter()
                .zip(targets)
                .all(|(seen, n)| (0..*n).all(|i| seen.contains(&i)));
            if complete {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(Some(p)) = tokio::time::timeout(left, control.messages.recv()).await else {
                return false;
            };
            self.record(&p);
        }
    }

    /// Takes whatever arrives until nothing came for `quiet` (late duplicates).
    pub async fn settle(&mut self, control: &mut V5Client, quiet: Duration) {
        while let Ok(Some(p)) = tokio::time::timeout(quiet, control.messages.recv()).await {
            self.record(&p);
        }
    }

    pub fn tally(&self, i: usize) -> &Tally {
        &self.tallies[i]
    }

    fn record(&mut self, p: &Publish) {
        self.received += 1;
        let text = String::from_utf8_lossy(&p.payload);
        for (i, tag) in self.tags.iter().enumerate() {
            if let Some(seq) = text
                .strip_prefix(&format!("{tag}-"))
                .and_then(|s| s.parse::<u64>().ok())
            {
                if self.seen[i].insert(seq) {
                    self.tallies[i].order.push(seq);
                } else {
                    self.tallies[i].duplicates += 1;
                }
            }
        }
    }
}

/// An iPad publishing `<tag>-<seq>` at a steady rate (batches of `batch` every `every`),
/// each batch waiting for its PUBACKs before the next.
pub struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<u64>,
}

impl Load {
    pub async fn start(port: u16, client_id: &str, topic: &str, tag: &str, batch: u64) -> Load {
        let mut ipad = V5Client::connect(port, client_id, true).await;
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let (topic, tag) = (topic.to_string(), tag.to_string());
        let (s, a) = (stop.clone(), acked.clone());
        let task = tokio::spawn(async move {
            let mut next = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            while !s.load(Ordering::SeqCst) {
                tick.tick().await;
                let batch: Vec<Vec<u8>> = (next..next + batch)
                    .map(|i| format!("{tag}-{i}").into_bytes())
                    .collect();
                next += ipad.publish_acked(&topic, batch, None).await as u64;
                a.store(next, Ordering::SeqCst);
            }
            next
        });
        Load { stop, acked, task }
    }

    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::SeqCst)
    }

    /// Stops after the current batch; returns how many messages were acknowledged (`0..n`).
    pub async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("load did not stop")
            .expect("load task failed")
    }
}

/// Publishes `0..n` as fast as the relay acknowledges them.
pub async fn publish_backlog(port: u16, topic: &str, tag: &str, n: u64) {
    let mut ipad = V5Client::connect(port, &format!("backlog-{tag}"), true).await;
    let mut i = 0;
    while i < n {
        let end = (i + 200).min(n);
        let batch: Vec<Vec<u8>> = (i..end)
            .map(|k| format!("{tag}-{k}").into_bytes())
            .collect();
        ipad.publish_acked(topic, batch, None).await;
        i = end;
    }
}

/// A TCP proxy on 127.0.0.1 that delays every chunk by `base` ± `jitter` (keeping byte
/// order), standing in for a cellular link's latency. Stops on drop.
pub struct DelayProxy {
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl DelayProxy {
    pub async fn start(target: SocketAddr, base: Duration, jitter: Duration) -> DelayProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((inbound, _)) = listener.accept().await {
                conns.spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    tokio::join!(pipe(ri, wo, base, jitter), pipe(ro, wi, base, jitter));
                });
            }
        });
        DelayProxy { port, task }
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    base: Duration,
    jitter: Duration,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 16 * 1024];
        let mut last = tokio::time::Instant::now();
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let j = jitter.as_millis() as i64;
            let delay_ms = (base.as_millis() as i64 + fastrand::i64(-j..=j)).max(0) as u64;
            let due = (tokio::time::Instant::now() + Duration::from_millis(delay_ms)).max(last);
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

/// What every fault test starts from: a temp dir of its own, the central Mosquitto in a
/// network namespace of its own reached over `paths` veth paths, and a control client on the
/// last path (which the tests leave up) subscribed to what the test watches.
pub struct Rig {
    pub dir: tempfile::TempDir,
    pub central: NsCentral,
    pub control: V5Client,
}

impl Rig {
    /// `None` (the test passes as SKIPPED) when this is no root and no CI: see [`can_fault`].
    /// `central_conf`: more lines for the central's mosquitto.conf ("" for none).
    pub async fn start(test: &str, paths: usize, central_conf: &str, watch: &str) -> Option<Rig> {
        if !can_fault(test) {
            return None;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let central = NsCentral::start_with(dir.path(), paths, central_conf).await;
        let control = central.control(paths - 1, "control").await;
        control.subscribe(watch).await;
        Some(Rig {
            dir,
            central,
            control,
        })
    }
}

/// Waits until the relay logs an uplink connect after byte `from` of its log; returns when.
pub async fn connected(relay: &crate::Relay, from: usize) -> Instant {
    wait_log(relay, from, "connected (session", Duration::from_secs(60))
        .await
        .expect("relay did not connect to the central broker")
}

/// Relay config for fault tests: the given keep-alive, a 3 s connect timeout, `uplink_extra`
/// lines in `[uplink]` and `store_extra` in `[store]`; routes `up/#` and `alerts/#` up,
/// `trains/T1/down/#` down.
pub fn fault_config(url: &str, keep_alive: &str, uplink_extra: &str, store_extra: &str) -> String {
    crate::Config::new(url)
        .set("uplink", "keep_alive", &format!("\"{keep_alive}\""))
        .set("uplink", "connect_timeout", "\"3s\"")
        .lines("uplink", uplink_extra)
        .store(store_extra)
        .route("up", "up/#", "trains/T1/up/#")
        .route("up", "alerts/#", "trains/T1/alerts/#")
        .route("down", "down/#", "trains/T1/down/#")
        .build()
}

/// Polls the relay's log until `needle` appears after byte `from`; returns when.
pub async fn wait_log(
    relay: &crate::Relay,
    from: usize,
    needle: &str,
    within: Duration,
) -> Option<Instant> {
    let start = Instant::now();
    while start.elapsed() < within {
        let log = relay.log();
        if log.get(from..).is_some_and(|tail| tail.contains(needle)) {
            return Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// `uplink.connections` of [`fault_config`] (the default).
pub const CONNECTIONS: usize = 4;

/// What each ended uplink connection had written and not seen acknowledged, as the relay logs
/// it ("connection ended with N messages written and not acknowledged"), in order.
pub fn ended_unanswered(log: &str) -> Vec<usize> {
    log.lines()
        .filter_map(|l| l.split("connection ended with ").nth(1))
        .filter_map(|rest| rest.split(' ').next()?.parse().ok())
        .collect()
}

/// The most duplicates the relay may cause, by the claim in docs/guarantees.md: a duplicate is
/// a resend of what a connection had written and not seen acknowledged when it ended, which
/// the relay logs per ended connection. Returns their sum. (A relay killed with SIGKILL logs
/// nothing: tests that kill it add their own allowance.)
pub fn duplicate_bound(log: &str) -> usize {
    ended_unanswered(log).iter().sum()
}

/// Asserts the duplicate claim of docs/guarantees.md for `what`: at most [`duplicate_bound`] plus `extra`
/// (what the test's fault adds beyond the relay's resends, explained by the caller).
pub fn assert_duplicates_bounded(t: &Tally, log: &str, extra: usize, what: &str) {
    let bound = duplicate_bound(log) + extra;
    assert!(
        t.duplicates <= bound,
        "{what}: {} duplicates, more than the connections had unacknowledged when they ended \
         ({:?}) + {extra}",
        t.duplicates,
        ended_unanswered(log)
    );
}
