//! trainrelay against a Mosquitto bridge and against the direct path, side by side.
//!
//! `cargo bench --bench relay` runs every workload on three setups in the same run:
//! (a) `direct`: load generator -> central Mosquitto (the ceiling);
//! (b) `mosquitto-bridge`: load generator -> local Mosquitto with a bridge section -> central;
//! (c) `trainrelay`: load generator -> trainrelay (release build, default durability) -> central.
//! Setups alternate within each repetition (the starting setup rotates) so that the load other
//! users put on a shared machine spreads over all three; medians are reported. Each
//! measurement starts fresh processes on ephemeral loopback ports in a fresh temp dir.
//!
//! The `cellular` workload runs (b), (c) and (c) with `uplink.connections = 1` over a
//! per-packet emulated cellular link (`../shared/tools/cellular-link` through the test kit's
//! `CellularLink`): central Mosquitto and the counting receiver run inside the link's network
//! namespace, so only the local side's uplink crosses the link, and every run also measures a
//! plain TCP transfer over the same link (the physical ceiling) and the local process's CPU
//! time per message. Variants and their environment: see `relay/cellular.rs`. Needs root
//! (skipped otherwise; a failure under `CI`).
//!
//! Environment (all optional):
//! - `BENCH_QUICK=1`: a smoke run for CI (few messages, one repetition, short phases);
//! - `BENCH_REPS` (3), `BENCH_MSGS` (100000), `BENCH_LATENCY_SECS` (20), `BENCH_RATE` (1000),
//!   `BENCH_MEMORY_LEVELS` (10000,100000,1000000), `BENCH_PUBLISHERS` (4), `BENCH_WINDOW` (64),
//!   `BENCH_CELLULAR_MSGS` (20000; 2000 with `BENCH_QUICK`), `BENCH_TOPICS` (16: messages go
//!   round-robin to `up/bench/0..15`, as a train publishes on many topics),
//!   `BENCH_WORKLOADS` (ceiling,throughput,latency,drain,memory,enqueue,cellular),
//!   `BENCH_SETUPS` (direct,mosquitto-bridge,trainrelay),
//!   `BENCH_OUT` (target/bench/results.json), `BENCH_RELAY_BIN` (the trainrelay binary under
//!   test, e.g. another checkout's `target/release/trainrelay`, measured without merging; the
//!   older name `TRAINRELAY_BIN` works too; default: the release build cargo makes for the
//!   benchmark),
//!   `BENCH_KEEP=1` (keep the temp dirs with every process's log and store),
//!   `BENCH_CENTRAL_INFLIGHT` (100: central's `max_inflight_messages`, which it also announces
//!   as its Receive Maximum; the cellular workload sets its own, `BENCH_CELLULAR_RECEIVE_MAX`),
//!   `BENCH_CENTRAL_CONF` (more lines for central's mosquitto.conf, `\n` between them, e.g.
//!   `set_tcp_nodelay true`),
//!   `BENCH_RELAY_CONNECTIONS` (unset: the daemon's default `uplink.connections`),
//!   `BENCH_RELAY_SYNC` (`full`, the default durability, or `normal`: what the fsync costs),
//!   the cellular workload's `BENCH_CELLULAR_*` (see `relay/cellular.rs`).

#[path = "relay/cellular.rs"]
mod cellular;
#[path = "relay/enqueue.rs"]
mod enqueue;
#[path = "relay/setup.rs"]
mod setup;
#[path = "relay/stats.rs"]
mod stats;
#[path = "relay/wire.rs"]
mod wire;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use setup::{Central, Local, Setup, SINK_FILTER};
use stats::Results;
use trainrelay::store::Synchronous;
use trainrelay_testkit::cellular::CellularLink;
use wire::{PubSpec, SinkReport, SinkSpec};

/// What to run, from the environment.
#[derive(Debug, Clone)]
struct Opts {
    quick: bool,
    reps: usize,
    msgs: u64,
    latency_secs: f64,
    rates: Vec<f64>,
    memory_levels: Vec<u64>,
    publishers: u64,
    window: usize,
    cellular_msgs: u64,
    workloads: Vec<String>,
    setups: Vec<Setup>,
    out: PathBuf,
}

/// Topics the publishers spread their messages over (`BENCH_TOPICS`, 16).
fn opts_topics() -> u64 {
    env("BENCH_TOPICS", 16u64).max(1)
}

fn env<T: std::str::FromStr>(key: &str, default: T) -> T {
    match std::env::var(key) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{key}={v}: not a valid value")),
        Err(_) => default,
    }
}

impl Opts {
    fn from_env() -> Opts {
        let quick = std::env::var("BENCH_QUICK").is_ok_and(|v| v != "0" && !v.is_empty());
        let (reps, msgs, secs, levels, cellular_msgs) = if quick {
            (1, 5_000, 3.0, "1000,5000,10000", 2_000)
        } else {
            (3, 100_000, 20.0, "10000,100000,1000000", 20_000)
        };
        let list = |key: &str, default: &str| -> Vec<String> {
            std::env::var(key)
                .unwrap_or_else(|_| default.to_string())
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        };
        Opts {
            quick,
            reps: env("BENCH_REPS", reps),
            msgs: env("BENCH_MSGS", msgs),
            latency_secs: env("BENCH_LATENCY_SECS", secs),
            rates: list("BENCH_RATES", "100,1000")
                .iter()
                .map(|s| {
                    s.parse()
                        .unwrap_or_else(|_| panic!("BENCH_RATES: '{s}' is not a number"))
                })
                .collect(),
            memory_levels: list("BENCH_MEMORY_LEVELS", levels)
                .iter()
                .map(|s| {
                    s.parse()
                        .unwrap_or_else(|_| panic!("BENCH_MEMORY_LEVELS: '{s}' is not a number"))
                })
                .collect(),
            publishers: env("BENCH_PUBLISHERS", 4u64).max(1),
            window: env("BENCH_WINDOW", 64usize).max(1),
            cellular_msgs: env("BENCH_CELLULAR_MSGS", cellular_msgs),
            workloads: list(
                "BENCH_WORKLOADS",
                "ceiling,throughput,latency,drain,memory,enqueue,cellular",
            ),
            setups: list("BENCH_SETUPS", "direct,mosquitto-bridge,trainrelay")
                .iter()
                .map(|s| {
                    Setup::by_name(s).unwrap_or_else(|| panic!("BENCH_SETUPS: unknown setup '{s}'"))
                })
                .collect(),
            out: std::env::var_os("BENCH_OUT")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench/results.json")
                }),
        }
    }

    fn wants(&self, workload: &str) -> bool {
        self.workloads.iter().any(|w| w == workload)
    }
}

/// A fresh temp dir on the project's disk (not a tmpfs: the stores must really fsync); kept
/// for inspection (logs, stores) with `BENCH_KEEP=1`.
fn scratch() -> tempfile::TempDir {
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(base).expect("target tmp dir");
    tempfile::Builder::new()
        .prefix("relay-bench-")
        .disable_cleanup(std::env::var_os("BENCH_KEEP").is_some())
        .tempdir_in(base)
        .expect("temp dir")
}

/// A running setup: the central broker and, for (b) and (c), the local process; for the
/// cellular profile also the link between them. Dropped in this order: processes first, then
/// the link (when this held its last reference).
struct Rig {
    setup: Setup,
    central: Central,
    local: Option<Local>,
    link: Option<Arc<CellularLink>>,
    /// Topics the publishers spread over, and payload bytes per message.
    topics: u64,
    payload: usize,
    _dir: tempfile::TempDir,
}

impl Rig {
    /// Everything on loopback.
    async fn start(setup: Setup) -> Rig {
        let dir = scratch();
        let mut central = Central::new(dir.path());
        central.start().await;
        Rig::finish(setup, central, None, dir).await
    }

    /// Central (with `max_inflight_messages inflight`) inside the namespace of `link`; the
    /// local side reaches it across the link, the receiver from inside the namespace.
    async fn start_cellular(
        setup: Setup,
        link: Arc<CellularLink>,
        inflight: u32,
        topics: u64,
        payload: usize,
    ) -> Rig {
        let dir = scratch();
        let mut central = Central::in_link(dir.path(), &link, 1883, inflight);
        central.start().await;
        let mut rig = Rig::finish(setup, central, Some(link), dir).await;
        rig.topics = topics;
        rig.payload = payload;
        rig
    }

    async fn finish(
        setup: Setup,
        central: Central,
        link: Option<Arc<CellularLink>>,
        dir: tempfile::TempDir,
    ) -> Rig {
        // Central's address as the local side sees it (across the link, if any).
        let upstream = central.uplink_addr();
        let local = match setup {
            Setup::Direct => None,
            Setup::Bridge => Some(setup::start_bridge(dir.path(), upstream).await),
            Setup::Relay => Some(setup::start_relay(dir.path(), upstream, None).await),
            Setup::RelayOne => Some(setup::start_relay(dir.path(), upstream, Some(1)).await),
        };
        if let Some(l) = &local {
            println!("  {}: pid {}, port {}", setup.name(), l.proc.pid(), l.port);
        }
        let rig = Rig {
            setup,
            central,
            local,
            link,
            topics: opts_topics(),
            payload: wire::PAYLOAD,
            _dir: dir,
        };
        rig.prime().await;
        rig
    }

    /// The port the generator publishes to.
    fn entry_port(&self) -> u16 {
        self.local.as_ref().map_or(self.central.port, |l| l.port)
    }

    /// Sends a few messages end to end and waits for them: the path is up and warm.
    async fn prime(&self) {
        let epoch = Instant::now();
        let n = 20;
        let (sink, _) = self
            .spawn_sink(
                "bench-prime",
                false,
                n,
                false,
                Duration::from_secs(60),
                epoch,
            )
            .await;
        self.publish(n, 1, None, false, "bench-prime", epoch)
            .await
            .expect("priming publish");
        let r = sink.await.expect("prime sink").expect("prime sink");
        assert_eq!(
            r.unique,
            n,
            "{}: the path does not deliver",
            self.setup.name()
        );
    }

    /// Starts the receiver at the central broker; returns once it is subscribed (or, for a
    /// persistent session, right away: it connects whenever the broker is there).
    async fn spawn_sink(
        &self,
        id: &str,
        persistent: bool,
        expect: u64,
        record: bool,
        within: Duration,
        epoch: Instant,
    ) -> (
        tokio::task::JoinHandle<std::io::Result<SinkReport>>,
        Arc<AtomicU64>,
    ) {
        let progress = Arc::new(AtomicU64::new(0));
        let (ready, subscribed) = tokio::sync::oneshot::channel();
        // Always straight to central, never through the cellular link (from inside its
        // namespace): only the local side's uplink is measured over it.
        let spec = SinkSpec {
            addr: self.central.addr(),
            client_id: id.to_string(),
            inside: self.link.as_ref().map(|l| l.ns.clone()),
            filter: SINK_FILTER.to_string(),
            persistent,
            expect,
            record,
            deadline: Instant::now() + within,
            progress: progress.clone(),
            ready: Some(ready),
        };
        let task = tokio::spawn(wire::sink(spec, epoch));
        if !persistent {
            let _ = subscribed.await;
        }
        (task, progress)
    }

    async fn publish(
        &self,
        count: u64,
        publishers: u64,
        rate: Option<f64>,
        record: bool,
        id: &str,
        epoch: Instant,
    ) -> std::io::Result<Vec<wire::PubReport>> {
        self.publish_seq(0, count, publishers, 64, rate, record, id, epoch)
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn publish_seq(
        &self,
        first_seq: u64,
        count: u64,
        publishers: u64,
        window: usize,
        rate: Option<f64>,
        record: bool,
        id: &str,
        epoch: Instant,
    ) -> std::io::Result<Vec<wire::PubReport>> {
        let spec = PubSpec {
            port: self.entry_port(),
            client_id: id.to_string(),
            topic: self.setup.topic().to_string(),
            topics: self.topics,
            payload: self.payload,
            first_seq,
            count,
            window,
            rate,
            record,
            progress: Arc::new(AtomicU64::new(0)),
        };
        wire::publish_many(spec, publishers, epoch).await
    }

    /// CPU time (user + system) the local process has used so far; zero for `direct`.
    fn local_cpu(&self) -> Duration {
        self.local
            .as_ref()
            .and_then(|l| trainrelay_testkit::cellular::cpu_time(l.proc.pid()).ok())
            .unwrap_or_default()
    }

    fn local_memory_kib(&self) -> Option<(u64, u64)> {
        self.local.as_ref().map(|l| l.proc.memory_kib())
    }

    /// `n` messages from the publishers to the receiver at central, as fast as the setup
    /// takes them: the receiver's report, when publishing started, and the publishers'.
    async fn run_through(
        &self,
        opts: &Opts,
        n: u64,
    ) -> (SinkReport, Instant, Vec<wire::PubReport>) {
        let epoch = Instant::now();
        let (sink, _) = self
            .spawn_sink("bench-sink", false, n, false, allowance(n), epoch)
            .await;
        let started = Instant::now();
        let pubs = self
            .publish_seq(
                0,
                n,
                opts.publishers,
                opts.window,
                None,
                false,
                "bench-pub",
                epoch,
            )
            .await
            .expect("publish");
        let r = sink.await.expect("sink task").expect("sink");
        let name = self.setup.name();
        assert_eq!(r.unique, n, "{name}: only {} of {n} arrived", r.unique);
        (r, started, pubs)
    }

    /// `n` messages buffered while central is stopped, then central starts: the receiver's
    /// report and when central was started.
    async fn run_drain(&mut self, opts: &Opts, n: u64) -> (SinkReport, Instant) {
        let epoch = Instant::now();
        wire::make_session(self.central.addr(), "bench-drain", SINK_FILTER)
            .await
            .expect("receiver session");
        self.central.stop();
        // Let the local side see the connection go before the backlog arrives.
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.publish_seq(
            0,
            n,
            opts.publishers,
            opts.window,
            None,
            false,
            "bench-pub",
            epoch,
        )
        .await
        .expect("publish while central is down");
        let t0 = self.central.start().await;
        let (sink, _) = self
            .spawn_sink("bench-drain", true, n, false, allowance(n), epoch)
            .await;
        let r = sink.await.expect("sink task").expect("sink");
        let name = self.setup.name();
        assert_eq!(r.unique, n, "{name}: only {} of {n} arrived", r.unique);
        (r, t0)
    }
}

/// The local process's CPU time per message (µs), for the setups that have one.
fn add_cpu(res: &mut Results, workload: &str, setup: Setup, rep: usize, cpu: Duration, n: u64) {
    if setup != Setup::Direct {
        let per_msg = cpu.as_secs_f64() * 1e6 / n.max(1) as f64;
        res.add(workload, setup.name(), rep, "cpu_us_per_msg", per_msg);
    }
}

/// Generous limit for `n` messages to arrive (only to fail a hung run).
fn allowance(n: u64) -> Duration {
    Duration::from_secs(120 + n / 500)
}

/// The setups of repetition `rep`, rotated so each leads in turn.
fn order(rep: usize, setups: &[Setup]) -> Vec<Setup> {
    let mut v = setups.to_vec();
    v.rotate_left(rep % setups.len().max(1));
    v
}

/// The generator alone against one Mosquitto with no subscriber: its ceiling.
async fn ceiling(opts: &Opts, res: &mut Results) {
    for rep in 0..opts.reps {
        let dir = scratch();
        let mut central = Central::new(dir.path());
        central.start().await;
        let rig = Rig {
            setup: Setup::Direct,
            central,
            local: None,
            link: None,
            topics: opts_topics(),
            payload: wire::PAYLOAD,
            _dir: dir,
        };
        let epoch = Instant::now();
        let started = Instant::now();
        rig.publish_seq(
            0,
            opts.msgs,
            opts.publishers,
            opts.window,
            None,
            false,
            "bench-ceiling",
            epoch,
        )
        .await
        .expect("ceiling publish");
        let secs = started.elapsed().as_secs_f64();
        res.add(
            "ceiling",
            "generator",
            rep,
            "publish_msgs_per_s",
            opts.msgs as f64 / secs,
        );
    }
}

/// 100k QoS 1 messages end to end, as fast as the path takes them.
async fn throughput(opts: &Opts, res: &mut Results) {
    let n = opts.msgs;
    for rep in 0..opts.reps {
        for setup in order(rep, &opts.setups) {
            let rig = Rig::start(setup).await;
            let cpu0 = rig.local_cpu();
            let (r, started, pubs) = rig.run_through(opts, n).await;
            let cpu = rig.local_cpu().saturating_sub(cpu0);
            let last = r.last.expect("arrivals");
            let acked = pubs.iter().map(|p| p.elapsed).max().unwrap_or_default();
            res.add(
                "throughput",
                setup.name(),
                rep,
                "end_to_end_msgs_per_s",
                n as f64 / (last - started).as_secs_f64(),
            );
            res.add(
                "throughput",
                setup.name(),
                rep,
                "acked_msgs_per_s",
                n as f64 / acked.as_secs_f64(),
            );
            res.add(
                "throughput",
                setup.name(),
                rep,
                "duplicates",
                r.duplicates as f64,
            );
            add_cpu(res, "throughput", setup, rep, cpu, n);
        }
    }
}

/// Paced publishing at each of `BENCH_RATES`: end-to-end and PUBACK latency, and the local
/// process's CPU per message (what a train's real rates cost).
async fn latency(opts: &Opts, res: &mut Results) {
    for &rate in &opts.rates {
        latency_at(opts, rate, res).await;
    }
}

async fn latency_at(opts: &Opts, rate: f64, res: &mut Results) {
    let n = (rate * opts.latency_secs) as u64;
    // The first 200 ms warm connections and caches; they are left out of the percentiles.
    let warm = (rate * 0.2) as usize;
    let workload = format!("paced_{rate:.0}");
    let workload = workload.as_str();
    for rep in 0..opts.reps {
        for setup in order(rep, &opts.setups) {
            let rig = Rig::start(setup).await;
            let cpu0 = rig.local_cpu();
            let epoch = Instant::now();
            let (sink, _) = rig
                .spawn_sink("bench-sink", false, n, true, allowance(n), epoch)
                .await;
            let pubs = rig
                .publish_seq(0, n, 1, opts.window, Some(rate), true, "bench-pub", epoch)
                .await
                .expect("publish");
            let r = sink.await.expect("sink task").expect("sink");
            let cpu = rig.local_cpu().saturating_sub(cpu0);
            assert_eq!(
                r.unique,
                n,
                "{}: only {} of {n} arrived",
                setup.name(),
                r.unique
            );
            add_cpu(res, workload, setup, rep, cpu, n);
            let mut e2e: Vec<u64> = r.latency_ns.iter().skip(warm).copied().collect();
            e2e.sort_unstable();
            let mut ack: Vec<u64> = pubs[0].ack_latency_ns.iter().skip(warm).copied().collect();
            ack.sort_unstable();
            let name = setup.name();
            res.add(
                workload,
                name,
                rep,
                "e2e_p50_ms",
                stats::percentile_ms(&e2e, 50.0),
            );
            res.add(
                workload,
                name,
                rep,
                "e2e_p99_ms",
                stats::percentile_ms(&e2e, 99.0),
            );
            res.add(
                workload,
                name,
                rep,
                "e2e_max_ms",
                stats::percentile_ms(&e2e, 100.0),
            );
            res.add(
                workload,
                name,
                rep,
                "puback_p50_ms",
                stats::percentile_ms(&ack, 50.0),
            );
            res.add(
                workload,
                name,
                rep,
                "puback_p99_ms",
                stats::percentile_ms(&ack, 99.0),
            );
            res.add(
                workload,
                name,
                rep,
                "puback_max_ms",
                stats::percentile_ms(&ack, 100.0),
            );
        }
    }
}

/// A backlog buffered while central is down, then central starts. For `direct` there is
/// nothing to buffer in: its figure is the same load published straight into a fresh central
/// broker (what the central broker itself can take), the reference the drain is held to.
async fn drain(opts: &Opts, res: &mut Results) {
    let n = opts.msgs;
    for rep in 0..opts.reps {
        for setup in order(rep, &opts.setups) {
            let mut rig = Rig::start(setup).await;
            let cpu0 = rig.local_cpu();
            let (r, t0) = if setup == Setup::Direct {
                let (r, started, _) = rig.run_through(opts, n).await;
                (r, started)
            } else {
                rig.run_drain(opts, n).await
            };
            let (first, last) = (r.first.expect("arrivals"), r.last.expect("arrivals"));
            let name = setup.name();
            res.add(
                "drain",
                name,
                rep,
                "time_to_last_s",
                (last - t0).as_secs_f64(),
            );
            res.add(
                "drain",
                name,
                rep,
                "drain_msgs_per_s",
                n as f64 / (last - first).as_secs_f64().max(1e-6),
            );
            res.add("drain", name, rep, "duplicates", r.duplicates as f64);
            // Buffering and draining together: what the backlog cost the unit in all.
            add_cpu(
                res,
                "drain",
                setup,
                rep,
                rig.local_cpu().saturating_sub(cpu0),
                n,
            );
            if let Some((_, hwm)) = rig.local_memory_kib() {
                res.add("drain", name, rep, "peak_rss_mib", hwm as f64 / 1024.0);
            }
        }
    }
}

/// Idle RSS, then RSS and peak RSS of the local process while the backlog grows with central
/// down. One pass (no repetitions: memory figures are not noisy, and 1M messages take long).
async fn memory(opts: &Opts, res: &mut Results) {
    for setup in opts.setups.iter().copied().filter(|s| *s != Setup::Direct) {
        let mut rig = Rig::start(setup).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let name = setup.name();
        let (idle, _) = rig.local_memory_kib().expect("local process");
        res.add("memory", name, 0, "idle_rss_mib", idle as f64 / 1024.0);
        rig.central.stop();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let epoch = Instant::now();
        let mut buffered = 0;
        for &level in &opts.memory_levels {
            if level <= buffered {
                continue;
            }
            let started = Instant::now();
            rig.publish_seq(
                buffered,
                level - buffered,
                opts.publishers,
                opts.window,
                None,
                false,
                "bench-pub",
                epoch,
            )
            .await
            .expect("publish while central is down");
            let rate = (level - buffered) as f64 / started.elapsed().as_secs_f64();
            buffered = level;
            let (rss, hwm) = rig.local_memory_kib().expect("local process");
            res.add(
                "memory",
                name,
                0,
                &format!("rss_mib_at_{level}"),
                rss as f64 / 1024.0,
            );
            res.add(
                "memory",
                name,
                0,
                &format!("peak_rss_mib_at_{level}"),
                hwm as f64 / 1024.0,
            );
            res.add(
                "memory",
                name,
                0,
                &format!("peak_over_idle_at_{level}"),
                hwm as f64 / idle as f64,
            );
            res.add(
                "memory",
                name,
                0,
                &format!("buffering_msgs_per_s_to_{level}"),
                rate,
            );
        }
    }
}

/// The store alone, and the level it commits at.
async fn enqueue_rate(opts: &Opts, res: &mut Results) {
    let n = opts.msgs as usize;
    for rep in 0..opts.reps {
        for (label, sync) in [("full", Synchronous::Full), ("normal", Synchronous::Normal)] {
            let dir = scratch();
            let rate = enqueue::rate(dir.path(), sync, n, 512).await;
            res.add(
                "enqueue",
                "trainrelay",
                rep,
                &format!("store_commit_msgs_per_s_sync_{label}"),
                rate,
            );
        }
    }
}

fn sh(cmd: &str) -> String {
    std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn machine() -> serde_json::Value {
    json!({
        "date_utc": sh("date -u +%Y-%m-%dT%H:%M:%SZ"),
        "nproc": sh("nproc"),
        "cpu": sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"),
        "memory": sh("free -h | awk '/Mem:/ {print $2\" total, \"$7\" available\"}'"),
        "disk": sh(&format!("df -h {} | awk 'NR==2 {{print $1\" \"$2\" (\"$5\" used)\"}}'", env!("CARGO_TARGET_TMPDIR"))),
        "kernel": sh("uname -r"),
        "mosquitto": sh("mosquitto -h | head -1"),
        "loadavg": sh("cat /proc/loadavg"),
    })
}

/// Setups shown as columns, and the ratios the targets are stated in.
fn table(res: &Results) -> String {
    let cols = ["direct", "mosquitto-bridge", "trainrelay"];
    let mut out = String::new();
    out.push_str(&format!(
        "| workload | figure | {} | {} | {} | (c)/(b) | (c)/(a) |\n|---|---|---:|---:|---:|---:|---:|\n",
        "(a) direct", "(b) bridge", "(c) trainrelay"
    ));
    let fmt = |v: Option<&f64>| match v {
        Some(v) if v.is_finite() && v.abs() >= 100.0 => format!("{v:.0}"),
        Some(v) if v.is_finite() => format!("{v:.2}"),
        _ => "–".to_string(),
    };
    for ((workload, metric), m) in res.medians() {
        if workload == "cellular" {
            continue; // a table of its own, `cellular::table`
        }
        let a = m.get(cols[0]);
        let b = m.get(cols[1]);
        let c = m.get(cols[2]);
        let ratio = |x: Option<&f64>, y: Option<&f64>| match (x, y) {
            (Some(x), Some(y)) if *y != 0.0 && x.is_finite() && y.is_finite() => {
                format!("{:.2}", x / y)
            }
            _ => "–".to_string(),
        };
        let other: Vec<String> = m
            .iter()
            .filter(|(k, _)| !cols.contains(&k.as_str()))
            .map(|(k, v)| format!("{k}: {}", fmt(Some(v))))
            .collect();
        let (a_txt, a_val) = if other.is_empty() {
            (fmt(a), a)
        } else {
            (other.join(", "), None)
        };
        out.push_str(&format!(
            "| {workload} | {metric} | {a_txt} | {} | {} | {} | {} |\n",
            fmt(b),
            fmt(c),
            ratio(c, b),
            ratio(c, a_val)
        ));
    }
    out
}

fn main() {
    let opts = Opts::from_env();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let machine_before = machine();
    println!("relay bench: {opts:?}");
    println!("machine: {machine_before}");
    println!("trainrelay binary: {}", setup::relay_binary().display());
    let started = Instant::now();
    let mut res = Results::default();
    rt.block_on(async {
        if opts.wants("ceiling") {
            println!("== ceiling: the load generator alone against one Mosquitto");
            ceiling(&opts, &mut res).await;
        }
        if opts.wants("throughput") {
            println!(
                "== throughput: {} QoS 1 msgs of {} B end to end",
                opts.msgs,
                wire::PAYLOAD
            );
            throughput(&opts, &mut res).await;
        }
        if opts.wants("latency") {
            println!(
                "== latency: paced at {:?} msgs/s for {} s each",
                opts.rates, opts.latency_secs
            );
            latency(&opts, &mut res).await;
        }
        if opts.wants("drain") {
            println!(
                "== drain: {} msgs buffered while central is down",
                opts.msgs
            );
            drain(&opts, &mut res).await;
        }
        if opts.wants("memory") {
            println!(
                "== memory: idle, and while buffering {:?}",
                opts.memory_levels
            );
            memory(&opts, &mut res).await;
        }
        if opts.wants("enqueue") {
            println!(
                "== enqueue: the store alone, {} msgs, 512 outstanding",
                opts.msgs
            );
            enqueue_rate(&opts, &mut res).await;
        }
        if opts.wants("cellular") {
            println!("== cellular: QoS 1 msgs over a per-packet emulated cellular link");
            cellular::run(&opts, &mut res).await;
        }
    });
    let elapsed = started.elapsed();
    let mut table = table(&res);
    if opts.wants("cellular") {
        table.push_str(&format!("\n{}", cellular::table(&res)));
    }
    let machine_after = machine();
    println!(
        "\nMedians of {} repetition(s), {:.0} s in all:\n\n{table}",
        opts.reps,
        elapsed.as_secs_f64()
    );
    println!(
        "load average before: {}, after: {}",
        machine_before["loadavg"], machine_after["loadavg"]
    );
    let doc = json!({
        "machine": machine_before,
        "loadavg_after": machine_after["loadavg"],
        "options": {
            "quick": opts.quick, "reps": opts.reps, "msgs": opts.msgs, "payload_bytes": wire::PAYLOAD,
            "latency_secs": opts.latency_secs, "rates": opts.rates, "memory_levels": opts.memory_levels,
            "publishers": opts.publishers, "window": opts.window, "cellular_msgs": opts.cellular_msgs,
        },
        "elapsed_s": elapsed.as_secs_f64(),
        "medians": res.medians().into_iter().map(|((w, m), v)| json!({"workload": w, "figure": m, "by_setup": v})).collect::<Vec<_>>(),
        "samples": res.samples.iter().map(|s| json!({"workload": s.workload, "setup": s.setup, "rep": s.rep, "figure": s.metric, "value": s.value})).collect::<Vec<_>>(),
        "table_markdown": table,
    });
    if let Some(dir) = opts.out.parent() {
        std::fs::create_dir_all(dir).expect("output dir");
    }
    std::fs::write(&opts.out, serde_json::to_string_pretty(&doc).expect("json"))
        .unwrap_or_else(|e| panic!("{}: {e}", opts.out.display()));
    println!("results: {}", opts.out.display());
}
