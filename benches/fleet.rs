//! Fleet simulation: N relays, each its own process with its own store, a small steady load
//! each (`FLEET_RATE` msgs/s of 200 bytes from one iPad), against one central Mosquitto on
//! loopback; a receiver with a persistent session counts what arrives per train.
//!
//! ```sh
//! cargo bench --bench fleet                      # 20 relays; FLEET_RELAYS=100 for more
//! ```
//!
//! Phases, in one run: steady state (central CPU and memory per train, relay RSS per train);
//! central restarted (SIGTERM and start again: time until every relay is connected again and
//! everything acknowledged so far has arrived); a fleet-wide tunnel (central SIGSTOPped for
//! `FLEET_TUNNEL_SECS`, every relay's link goes silent, then SIGCONT: the same times); then
//! the iPads stop and everything acknowledged must arrive. Reported: duplicates per 1,000 and
//! messages acknowledged to an iPad and never delivered (must be 0).
//!
//! Environment: `FLEET_RELAYS` (20), `FLEET_RATE` (5), `FLEET_STEADY_SECS` (20),
//! `FLEET_TUNNEL_SECS` (60), `FLEET_CONNECTIONS` (4: each relay's `uplink.connections`),
//! `TRAINRELAY_BIN` (the binary under test).

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
    proc: Proc,
    /// PUBACKs the iPad got: messages `0..acked` are the relay's to deliver.
    acked: Arc<AtomicU64>,
    stop: tokio::sync::watch::Sender<bool>,
}

async fn start_train(dir: &Path, n: usize, central_port: u16, connections: u64) -> Train {
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
url = "mqtt://127.0.0.1:{central_port}"
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
        .env("RUST_LOG", "warn");
    let proc = Proc::spawn(&format!("relay {id}"), cmd, &dir.join("log"));
    wait_for_port(port, Duration::from_secs(30)).await;
    let (stop, _) = tokio::sync::watch::channel(false);
    Train {
        id,
        port,
        status: dir.join("status.sock"),
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
    total: u64,
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
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let text = String::from_utf8_lossy(&p.payload);
                    let Some((head, _)) = text.split_once('|') else {
                        continue;
                    };
                    let Some((train, seq)) = head.rsplit_once('-') else {
                        continue;
                    };
                    let Ok(seq) = seq.parse::<u64>() else {
                        continue;
                    };
                    let mut r = g.lock().unwrap_or_else(|e| e.into_inner());
                    r.total += 1;
                    if !r.seen.entry(train.to_string()).or_default().insert(seq) {
                        r.duplicates += 1;
                    }
                }
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
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(base).expect("target tmp dir");
    let dir = tempfile::Builder::new()
        .prefix("fleet-bench-")
        .tempdir_in(base)
        .expect("temp dir");
    println!("fleet: {relays} relays × {rate} msgs/s, {connections} uplink connections each");

    let mut central = Central::new(dir.path());
    central.start().await;
    let got = start_receiver(central.port);
    let mut trains = Vec::with_capacity(relays);
    for n in 0..relays {
        trains.push(start_train(dir.path(), n, central.port, connections).await);
    }
    let (c, _, _) = recovery(&trains, &got, Duration::from_secs(60)).await;
    println!("  all {relays} relays connected {c:.1} s after the last started");
    for t in &trains {
        start_ipad(t, rate);
    }

    // Steady state.
    let (cpu0, t0) = (cpu_secs(central.pid()), Instant::now());
    tokio::time::sleep(steady).await;
    let cpu = (cpu_secs(central.pid()) - cpu0) / t0.elapsed().as_secs_f64();
    let rss: Vec<u64> = trains.iter().map(|t| t.proc.memory_kib().0).collect();
    let relay_rss = rss.iter().sum::<u64>() as f64 / rss.len() as f64 / 1024.0;
    let central_rss = central.memory_kib().0 as f64 / 1024.0;
    println!(
        "  steady: central {:.1} % of a core ({:.3} % per train), {central_rss:.1} MiB; relay RSS {relay_rss:.1} MiB per train; {} missing",
        cpu * 100.0,
        cpu * 100.0 / relays as f64,
        missing(&trains, &got)
    );

    // Central restarted.
    central.stop();
    central.start().await;
    let (c, all, lost) = recovery(&trains, &got, Duration::from_secs(180)).await;
    println!("  central restarted: all relays connected after {c:.1} s, everything acknowledged delivered after {all:.1} s ({lost} missing)");

    // A fleet-wide tunnel: the central broker goes silent (no RST), then comes back.
    let pid = nix::unistd::Pid::from_raw(central.pid() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP);
    tokio::time::sleep(tunnel).await;
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
    let (c, all, lost) = recovery(&trains, &got, Duration::from_secs(300)).await;
    println!(
        "  {}-s tunnel for the whole fleet: all relays connected after {c:.1} s, backlog delivered after {all:.1} s ({lost} missing)",
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
        "  end: {acked} acknowledged to iPads, {} received, {lost} acknowledged and never delivered, {:.2} duplicates per 1,000",
        r.total,
        r.duplicates as f64 * 1000.0 / r.total.max(1) as f64
    );
}
