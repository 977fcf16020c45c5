//! Fleet simulation: N relays, each its own process with its own store, a small steady load
//! each (`FLEET_RATE` msgs/s of 200 bytes from one iPad), against a central broker on
//! loopback: one Mosquitto, or (`FLEET_CENTRAL=nats`) a three-node NATS cluster with
//! JetStream and the MQTT listener on each node, the relays on `protocol = "3.1.1"` with
//! `endpoints` listing the three nodes. A receiver with a persistent session counts what
//! arrives per train.
//!
//! ```sh
//! cargo bench --bench fleet                      # 20 relays; FLEET_RELAYS=100 for more
//! FLEET_CENTRAL=nats cargo bench --bench fleet   # against the NATS cluster
//! ```
//!
//! Phases, in one run: steady state (central CPU and memory per train, relay RSS per train);
//! central restarted (Mosquitto: SIGTERM and start again; NATS: kill -9 of the node every
//! relay is connected to, which stays down: time until every relay is connected again and
//! everything acknowledged so far has arrived, and the reconnect rate the central side saw,
//! from the relays' logs); a fleet-wide tunnel (every central process SIGSTOPped for
//! `FLEET_TUNNEL_SECS`, every relay's link goes silent, then SIGCONT: the same times); then
//! the iPads stop and everything acknowledged must arrive. Reported: duplicates per 1,000 and
//! messages acknowledged to an iPad and never delivered (must be 0).
//!
//! Environment: `FLEET_RELAYS` (20), `FLEET_RATE` (5), `FLEET_STEADY_SECS` (20),
//! `FLEET_TUNNEL_SECS` (60), `FLEET_CONNECTIONS` (4: each relay's `uplink.connections`),
//! `FLEET_CENTRAL` (`mosquitto` or `nats`), `TRAINRELAY_BIN` (the binary under test).

#[allow(dead_code)] // shared with the relay benchmark, which uses all of it
#[path = "relay/setup.rs"]
mod setup;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use setup::{free_port, relay_binary, wait_for_port, Central, Proc};

fn env<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One train: its relay process and what its iPad had acknowledged.
struct Train {
    id: String,
    port: u16,
    status: PathBuf,
    log: PathBuf,
    proc: Proc,
    /// PUBACKs the iPad got: messages `0..acked` are the relay's to deliver.
    acked: Arc<AtomicU64>,
    stop: tokio::sync::watch::Sender<bool>,
}

async fn start_train(dir: &Path, n: usize, uplink: &str, connections: u64) -> Train {
    let id = format!("F{n:04}");
    let dir = dir.join(&id);
    std::fs::create_dir_all(&dir).expect("relay dir");
    let port = free_port();
    let conf = dir.join("trainrelay.toml");
    std::fs::write(
        &conf,
        format!(
            r#"train_id = "{id}"

[local]
listen = "127.0.0.1:{port}"

[uplink]
{uplink}
keep_alive = "5s"
backoff_min = "500ms"
backoff_max = "10s"
connections = {connections}

[store]
path = "{dir}/store.db"

[status]
socket = "{dir}/status.sock"
detail_interval = "0s"

[[route]]
direction = "up"
local = "up/#"
remote = "trains/{{train_id}}/up/#"
"#,
            dir = dir.display()
        ),
    )
    .expect("config");
    let mut cmd = std::process::Command::new(relay_binary());
    cmd.arg("run")
        .arg("--config")
        .arg(&conf)
        // Connects are logged (info) for the reconnect rate; the rest only when it goes wrong.
        .env("RUST_LOG", "warn,trainrelay::uplink=info");
    let log = dir.join("log");
    let proc = Proc::spawn(&format!("relay {id}"), cmd, &log);
    wait_for_port(port, Duration::from_secs(30)).await;
    let (stop, _) = tokio::sync::watch::channel(false);
    Train {
        id,
        port,
        status: dir.join("status.sock"),
        log,
        proc,
        acked: Arc::new(AtomicU64::new(0)),
        stop,
    }
}

/// The cab iPad: QoS 1 messages `{train}-{seq}` at `rate`, counting PUBACKs, until stopped.
fn start_ipad(train: &Train, rate: f64) {
    let mut opts = MqttOptions::new(format!("ipad-{}", train.id), "127.0.0.1", train.port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let acked = Arc::clone(&train.acked);
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    acked.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    let id = train.id.clone();
    let mut stop = train.stop.subscribe();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        let mut payload = vec![b' '; 200];
        for seq in 0u64.. {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            let head = format!("{id}-{seq}");
            payload[..head.len()].copy_from_slice(head.as_bytes());
            payload[head.len()] = b'|';
            if client
                .publish("up/pos", QoS::AtLeastOnce, false, payload.clone())
                .await
                .is_err()
            {
                return;
            }
        }
    });
}

/// What the control centre received: sequence numbers per train, and duplicates.
#[derive(Default)]
struct Received {
    seen: HashMap<String, HashSet<u64>>,
    duplicates: u64,
    /// Duplicates that carried DUP: the central broker redelivering from the receiver's own
    /// session, not a second copy sent by a relay.
    flagged: u64,
    total: u64,
}

impl Received {
    /// Counts one message `{train}-{seq}|...`.
    fn record(got: &Mutex<Received>, payload: &[u8], dup: bool) {
        let text = String::from_utf8_lossy(payload);
        let Some((head, _)) = text.split_once('|') else {
            return;
        };
        let Some((train, seq)) = head.rsplit_once('-') else {
            return;
        };
        let Ok(seq) = seq.parse::<u64>() else {
            return;
        };
        let mut r = got.lock().unwrap_or_else(|e| e.into_inner());
        r.total += 1;
        if !r.seen.entry(train.to_string()).or_default().insert(seq) {
            r.duplicates += 1;
            r.flagged += u64::from(dup);
        }
    }
}

/// The control centre's receiver on MQTT 3.1.1 (NATS speaks no MQTT 5).
fn start_receiver_v4(central_port: u16) -> Arc<Mutex<Received>> {
    let got = Arc::new(Mutex::new(Received::default()));
    let mut opts = rumqttc::MqttOptions::new("fleet-control", "127.0.0.1", central_port);
    opts.set_keep_alive(Duration::from_secs(10))
        .set_clean_session(false);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 1000);
    let g = Arc::clone(&got);
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Incoming::ConnAck(_))) => {
                    let _ = client
                        .subscribe("trains/+/up/#", rumqttc::QoS::AtLeastOnce)
                        .await;
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Incoming::Publish(p))) => {
                    Received::record(&g, &p.payload, p.dup);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    got
}

fn start_receiver(central_port: u16) -> Arc<Mutex<Received>> {
    let got = Arc::new(Mutex::new(Received::default()));
    let mut opts = MqttOptions::new("fleet-control", "127.0.0.1", central_port);
    opts.set_keep_alive(Duration::from_secs(10))
        .set_clean_start(false)
        .set_session_expiry_interval(Some(3600));
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    let g = Arc::clone(&got);
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client.subscribe("trains/+/up/#", QoS::AtLeastOnce).await;
                }
                Ok(Event::Incoming(Packet::Publish(p))) => Received::record(&g, &p.payload, p.dup),
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    got
}

/// Messages acknowledged to an iPad and not (yet) received.
fn missing(trains: &[Train], got: &Mutex<Received>) -> u64 {
    let r = got.lock().unwrap_or_else(|e| e.into_inner());
    trains
        .iter()
        .map(|t| {
            let acked = t.acked.load(Ordering::Relaxed);
            let seen = r.seen.get(&t.id);
            (0..acked)
                .filter(|s| !seen.is_some_and(|set| set.contains(s)))
                .count() as u64
        })
        .sum()
}

/// How many relays report their first uplink connection up.
fn connected(trains: &[Train]) -> usize {
    use std::io::{BufRead, BufReader, Write};
    trains
        .iter()
        .filter(|t| {
            let ask = || -> std::io::Result<bool> {
                let mut s = std::os::unix::net::UnixStream::connect(&t.status)?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                s.write_all(b"{\"v\":1,\"query\":\"status\"}\n")?;
                let mut line = String::new();
                BufReader::new(&s).read_line(&mut line)?;
                Ok(line.contains("\"state\":\"connected\"")
                    || line.contains("\"state\":\"draining\""))
            };
            ask().unwrap_or(false)
        })
        .count()
}

/// Seconds until every relay is connected and nothing acknowledged is missing (at most
/// `within`); with the count of relays connected and messages missing at the end.
async fn recovery(trains: &[Train], got: &Mutex<Received>, within: Duration) -> (f64, f64, u64) {
    let start = Instant::now();
    let mut all_connected = None;
    loop {
        let up = connected(trains);
        if up == trains.len() && all_connected.is_none() {
            all_connected = Some(start.elapsed().as_secs_f64());
        }
        let lost = missing(trains, got);
        if let (Some(c), 0) = (all_connected, lost) {
            return (c, start.elapsed().as_secs_f64(), 0);
        }
        if start.elapsed() > within {
            return (all_connected.unwrap_or(f64::NAN), f64::NAN, lost);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Three NATS nodes (Debian's `nats-server`), each with JetStream and an MQTT listener, on
/// their own ports and store directories.
struct NatsCluster {
    /// MQTT port of each node.
    mqtt: Vec<u16>,
    confs: Vec<PathBuf>,
    dir: PathBuf,
    procs: Vec<Option<Proc>>,
}

impl NatsCluster {
    async fn start(dir: &Path) -> NatsCluster {
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let route_list = routes
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(", ");
        let dir = dir.join("nats");
        let mut cluster = NatsCluster {
            mqtt: Vec::new(),
            confs: Vec::new(),
            dir: dir.clone(),
            procs: Vec::new(),
        };
        for (i, route) in routes.iter().enumerate() {
            let node = dir.join(format!("n{}", i + 1));
            std::fs::create_dir_all(node.join("js")).expect("NATS dir");
            let (client, mqtt) = (free_port(), free_port());
            let conf = node.join("nats.conf");
            std::fs::write(
                &conf,
                format!(
                    "server_name: n{n}\nlisten: 127.0.0.1:{client}\n\
                     jetstream {{\n  store_dir: \"{js}\"\n}}\n\
                     mqtt {{\n  listen: 127.0.0.1:{mqtt}\n}}\n\
                     cluster {{\n  name: fleet\n  listen: 127.0.0.1:{route}\n  \
                     routes: [{route_list}]\n}}\n",
                    n = i + 1,
                    js = node.join("js").display()
                ),
            )
            .expect("NATS config");
            cluster.mqtt.push(mqtt);
            cluster.confs.push(conf);
            cluster.procs.push(None);
        }
        for i in 0..3 {
            cluster.spawn(i);
        }
        for i in 0..3 {
            cluster.wait_ready(i).await;
        }
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let mut cmd = std::process::Command::new("nats-server");
        cmd.arg("-c").arg(&self.confs[i]);
        // NATS may write stray files (consumer metadata) into its working directory.
        if let Some(node) = self.confs[i].parent() {
            cmd.current_dir(node);
        }
        let log = self.dir.join(format!("n{}.log", i + 1));
        self.procs[i] = Some(Proc::spawn(&format!("nats n{}", i + 1), cmd, &log));
    }

    /// Waits until node `i` answers an MQTT CONNECT with a persistent session (JetStream up).
    async fn wait_ready(&self, i: usize) {
        let port = self.mqtt[i];
        wait_for_port(port, Duration::from_secs(30)).await;
        let start = Instant::now();
        loop {
            let mut opts = rumqttc::MqttOptions::new(format!("ready-{i}"), "127.0.0.1", port);
            opts.set_clean_session(false);
            let (_client, mut eventloop) = rumqttc::AsyncClient::new(opts, 10);
            let connack = tokio::time::timeout(Duration::from_secs(5), eventloop.poll()).await;
            if let Ok(Ok(rumqttc::Event::Incoming(rumqttc::Incoming::ConnAck(a)))) = connack {
                if a.code == rumqttc::ConnectReturnCode::Success {
                    return;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "NATS n{} serves no MQTT session",
                i + 1
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// The central side of the simulation.
enum CentralSide {
    Mosquitto(Central),
    Nats(NatsCluster),
}

impl CentralSide {
    /// The `[uplink]` lines naming it.
    fn uplink_config(&self) -> String {
        match self {
            CentralSide::Mosquitto(c) => format!("url = \"mqtt://127.0.0.1:{}\"", c.port),
            CentralSide::Nats(n) => {
                let urls: Vec<String> = n
                    .mqtt
                    .iter()
                    .map(|p| format!("\"mqtt://127.0.0.1:{p}\""))
                    .collect();
                format!("endpoints = [{}]\nprotocol = \"3.1.1\"", urls.join(", "))
            }
        }
    }

    /// The receiver, on the node that is never killed.
    fn start_receiver(&self) -> Arc<Mutex<Received>> {
        match self {
            CentralSide::Mosquitto(c) => start_receiver(c.port),
            CentralSide::Nats(n) => start_receiver_v4(n.mqtt[2]),
        }
    }

    fn pids(&self) -> Vec<u32> {
        match self {
            CentralSide::Mosquitto(c) => vec![c.pid()],
            CentralSide::Nats(n) => n.procs.iter().flatten().map(Proc::pid).collect(),
        }
    }

    /// RSS of every central process, MiB.
    fn memory_mib(&self) -> f64 {
        let kib: u64 = match self {
            CentralSide::Mosquitto(c) => c.memory_kib().0,
            CentralSide::Nats(n) => n.procs.iter().flatten().map(|p| p.memory_kib().0).sum(),
        };
        kib as f64 / 1024.0
    }

    fn signal_all(&self, signal: nix::sys::signal::Signal) {
        for pid in self.pids() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
        }
    }
}

/// Uplink connects logged by the relays at or after `since`: how many, the most in one
/// second, the seconds from `since` to the last one, and why connections ended (the relays
/// log a reason when it differs from the connection's previous one), most frequent first.
fn reconnects(
    trains: &[Train],
    since: std::time::SystemTime,
) -> (usize, usize, f64, Vec<(String, usize)>) {
    let mut per_second: HashMap<u64, usize> = HashMap::new();
    let mut reasons: HashMap<String, usize> = HashMap::new();
    let mut last = 0.0f64;
    let from = since
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    for t in trains {
        let log = std::fs::read_to_string(&t.log).unwrap_or_default();
        for line in log.lines() {
            let connect = line.contains(": connected (session present");
            let lost = line.contains("; retrying");
            if !connect && !lost {
                continue;
            }
            // "[2026-12-07T00:34:11Z INFO  trainrelay::uplink] ..."
            let Some(stamp) = line.strip_prefix('[').and_then(|l| l.split(' ').next()) else {
                continue;
            };
            let Ok(at) = humantime::parse_rfc3339(stamp) else {
                continue;
            };
            let at = at
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            if at < from {
                continue;
            }
            if connect {
                *per_second.entry(at).or_default() += 1;
                last = last.max((at - from) as f64);
            } else {
                // "... uplink trainrelay-F0001-2 mqtt://127.0.0.1:1234: <reason>; retrying"
                let reason = line
                    .split_once("mqtt://")
                    .and_then(|(_, rest)| rest.split_once(": "))
                    .map_or("?", |(_, r)| r.trim_end_matches("; retrying"));
                let reason: String = reason.chars().take(60).collect();
                *reasons.entry(reason).or_default() += 1;
            }
        }
    }
    let total = per_second.values().sum();
    let peak = per_second.values().copied().max().unwrap_or(0);
    let mut reasons: Vec<(String, usize)> = reasons.into_iter().collect();
    reasons.sort_by_key(|r| std::cmp::Reverse(r.1));
    reasons.truncate(3);
    (total, peak, last, reasons)
}

/// CPU seconds (user + system) of `pid` so far.
fn cpu_secs(pid: u32) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = text.rsplit_once(')').map_or("", |(_, rest)| rest);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 of stat (utime, stime) are 11 and 12 after the command name.
    (ticks(11) + ticks(12)) / 100.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let relays: usize = env("FLEET_RELAYS", 20);
    let rate: f64 = env("FLEET_RATE", 5.0);
    let steady = Duration::from_secs(env("FLEET_STEADY_SECS", 20));
    let tunnel = Duration::from_secs(env("FLEET_TUNNEL_SECS", 60));
    let connections: u64 = env("FLEET_CONNECTIONS", 4);
    let nats = std::env::var("FLEET_CENTRAL").is_ok_and(|v| v == "nats");
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(base).expect("target tmp dir");
    let dir = tempfile::Builder::new()
        .prefix("fleet-bench-")
        .tempdir_in(base)
        .expect("temp dir");
    let mut central = if nats {
        CentralSide::Nats(NatsCluster::start(dir.path()).await)
    } else {
        let mut c = Central::new(dir.path());
        c.start().await;
        CentralSide::Mosquitto(c)
    };
    let name = match central {
        CentralSide::Mosquitto(_) => "one Mosquitto",
        CentralSide::Nats(_) => "a three-node NATS cluster",
    };
    println!(
        "fleet: {relays} relays × {rate} msgs/s, {connections} uplink connections each, against {name}"
    );
    let got = central.start_receiver();
    let uplink = central.uplink_config();
    let mut trains = Vec::with_capacity(relays);
    for n in 0..relays {
        trains.push(start_train(dir.path(), n, &uplink, connections).await);
    }
    let (c, _, _) = recovery(&trains, &got, Duration::from_secs(60)).await;
    println!("  all {relays} relays connected {c:.1} s after the last started");
    for t in &trains {
        start_ipad(t, rate);
    }

    // Steady state.
    let central_cpu = |c: &CentralSide| c.pids().into_iter().map(cpu_secs).sum::<f64>();
    let (cpu0, t0) = (central_cpu(&central), Instant::now());
    tokio::time::sleep(steady).await;
    let cpu = (central_cpu(&central) - cpu0) / t0.elapsed().as_secs_f64();
    let rss: Vec<u64> = trains.iter().map(|t| t.proc.memory_kib().0).collect();
    let relay_rss = rss.iter().sum::<u64>() as f64 / rss.len() as f64 / 1024.0;
    let central_rss = central.memory_mib();
    println!(
        "  steady: central {:.1} % of a core ({:.3} % per train), {central_rss:.1} MiB; relay RSS {relay_rss:.1} MiB per train; {} missing",
        cpu * 100.0,
        cpu * 100.0 / relays as f64,
        missing(&trains, &got)
    );

    // Central restarted (Mosquitto) or its first node killed for good (NATS: every relay is
    // on the first endpoint, so the whole fleet fails over at once).
    let since = std::time::SystemTime::now();
    let what = match &mut central {
        CentralSide::Mosquitto(c) => {
            c.stop();
            c.start().await;
            "central restarted"
        }
        CentralSide::Nats(n) => {
            n.procs[0] = None;
            "kill -9 of the node every relay was on"
        }
    };
    let (c, all, lost) = recovery(&trains, &got, Duration::from_secs(180)).await;
    let (total, peak, spread, why) = reconnects(&trains, since);
    println!("  {what}: all relays connected after {c:.1} s, everything acknowledged delivered after {all:.1} s ({lost} missing); {total} connects over {spread:.0} s, at most {peak} in one second; connections ended: {why:?}");

    // A fleet-wide tunnel: the central side goes silent (no RST), then comes back.
    central.signal_all(nix::sys::signal::Signal::SIGSTOP);
    tokio::time::sleep(tunnel).await;
    let since = std::time::SystemTime::now();
    central.signal_all(nix::sys::signal::Signal::SIGCONT);
    let (c, all, lost) = recovery(&trains, &got, Duration::from_secs(300)).await;
    let (total, peak, spread, why) = reconnects(&trains, since);
    println!(
        "  {}-s tunnel for the whole fleet: all relays connected after {c:.1} s, backlog delivered after {all:.1} s ({lost} missing); {total} connects over {spread:.0} s, at most {peak} in one second; connections ended: {why:?}",
        tunnel.as_secs()
    );

    // The iPads stop; everything acknowledged must arrive.
    for t in &trains {
        let _ = t.stop.send(true);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (_, _, lost) = recovery(&trains, &got, Duration::from_secs(120)).await;
    let acked: u64 = trains.iter().map(|t| t.acked.load(Ordering::Relaxed)).sum();
    let r = got.lock().unwrap_or_else(|e| e.into_inner());
    println!(
        "  end: {acked} acknowledged to iPads, {} received, {lost} acknowledged and never delivered, {:.2} duplicates per 1,000 ({} of {} flagged DUP: the central's redelivery to the receiver)",
        r.total,
        r.duplicates as f64 * 1000.0 / r.total.max(1) as f64,
        r.flagged,
        r.duplicates
    );
}
