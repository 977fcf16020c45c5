//! The `cellular` workload: the uplink over a per-packet emulated cellular link
//! (`../shared/tools/cellular-link`, through the test kit's `CellularLink`), against the
//! Mosquitto bridge on the same link.
//!
//! For each variant one link is brought up; central Mosquitto runs inside its namespace (a
//! fresh process per run, `max_inflight_messages` = the Receive Maximum under test, listening
//! on the namespace's address) and the counting receiver connects to it from inside the
//! namespace too, so only the local side's uplink crosses the link. Each run: a plain TCP
//! transfer over the link (a sender here, a receiver in the namespace: the physical ceiling),
//! then fresh local processes, 20 priming messages, and the measured messages published as
//! fast as the local side takes them (so the uplink drains a backlog); figures from the first
//! PUBLISH to the last arrival. CPU per message is the local process's user + system time
//! (`/proc/PID/stat`) over that span, divided by the messages; reconnects are the local side's
//! connects to central (its log) beyond one per client id.
//!
//! Variants: every combination of `BENCH_CELLULAR_TOPICS` (1,16) and
//! `BENCH_CELLULAR_RECEIVE_MAX` (1000,20) with `BENCH_CELLULAR_MSGS` (20000) ×
//! `BENCH_CELLULAR_PAYLOAD` (200 B) on an uncapped link, plus for every rate in
//! `BENCH_CELLULAR_RATES` (0,256; 0 is the uncapped grid) a poor-coverage run:
//! `BENCH_CELLULAR_POOR_MSGS` (4000) × `BENCH_CELLULAR_POOR_PAYLOAD` (256 B) on
//! `BENCH_CELLULAR_POOR_TOPICS` (8) at the first Receive Maximum, the link capped to that
//! many kbit/s. The link: `BENCH_CELLULAR_DELAY` (60 ms), `BENCH_CELLULAR_JITTER` (20 ms),
//! `BENCH_CELLULAR_LOSS` (1 %). Setups: `BENCH_CELLULAR_SETUPS`
//! (trainrelay,trainrelay-1conn,mosquitto-bridge). The ceiling transfer:
//! `BENCH_CELLULAR_CEILING_BYTES` (4 MiB; on a capped link 8 s worth of the rate). A run that
//! sees no new arrival for `BENCH_CELLULAR_STALL_SECS` (120) is cut and reported incomplete.
//! `BENCH_CELLULAR_SS=1` prints `ss -tin` of both ends once half the messages arrived.
//! With `BENCH_QUICK`: 2,000 messages, 16 topics, Receive Maximum 1,000, uncapped only.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use trainrelay_testkit::cellular::{self, CellularLink, LinkParams};

use crate::setup::Setup;
use crate::stats::Results;
use crate::{env, order, Opts, Rig};

/// One measured configuration.
#[derive(Debug, Clone)]
struct Variant {
    label: String,
    msgs: u64,
    payload: usize,
    topics: u64,
    receive_max: u32,
    link: LinkParams,
}

fn list<T: std::str::FromStr>(key: &str, default: &str) -> Vec<T> {
    std::env::var(key)
        .unwrap_or_else(|_| default.to_string())
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse()
                .unwrap_or_else(|_| panic!("{key}: '{s}' is not a valid value"))
        })
        .collect()
}

fn variants(opts: &Opts) -> Vec<Variant> {
    let q = opts.quick;
    let topics: Vec<u64> = list("BENCH_CELLULAR_TOPICS", if q { "16" } else { "1,16" });
    let rms: Vec<u32> = list(
        "BENCH_CELLULAR_RECEIVE_MAX",
        if q { "1000" } else { "1000,20" },
    );
    let rates: Vec<u32> = list("BENCH_CELLULAR_RATES", if q { "0" } else { "0,256" });
    let link = LinkParams {
        delay_ms: env("BENCH_CELLULAR_DELAY", 60),
        jitter_ms: env("BENCH_CELLULAR_JITTER", 20),
        loss_pct: env("BENCH_CELLULAR_LOSS", 1.0),
        rate_kbit: None,
    };
    let payload = env("BENCH_CELLULAR_PAYLOAD", 200usize);
    let mut out = Vec::new();
    for &rate in &rates {
        if rate == 0 {
            for &t in &topics {
                for &rm in &rms {
                    out.push(Variant {
                        label: format!("t{t}-rm{rm}"),
                        msgs: opts.cellular_msgs,
                        payload,
                        topics: t.max(1),
                        receive_max: rm,
                        link,
                    });
                }
            }
        } else {
            let t = env("BENCH_CELLULAR_POOR_TOPICS", 8u64).max(1);
            let rm = rms.first().copied().unwrap_or(1000);
            out.push(Variant {
                label: format!("t{t}-rm{rm}-{rate}k"),
                msgs: env("BENCH_CELLULAR_POOR_MSGS", 4000u64),
                payload: env("BENCH_CELLULAR_POOR_PAYLOAD", 256usize),
                topics: t,
                receive_max: rm,
                link: LinkParams {
                    rate_kbit: Some(rate),
                    ..link
                },
            });
        }
    }
    out
}

/// Bytes of the plain TCP transfer on `link`.
fn ceiling_bytes(link: &LinkParams) -> usize {
    let default = match link.rate_kbit {
        Some(k) => k as usize * 1000 / 8 * 8,
        None => 4 << 20,
    };
    env("BENCH_CELLULAR_CEILING_BYTES", default)
}

/// Connects to central in its log ("New client connected from … as ID (…"), of clients
/// other than the benchmark's own: (connects, distinct client ids).
fn uplink_connects(log: &str) -> (u64, u64) {
    let ids: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split("New client connected from ").nth(1))
        .filter_map(|r| r.split(" as ").nth(1))
        .filter_map(|r| r.split_whitespace().next())
        .filter(|id| !id.starts_with("bench-"))
        .collect();
    let mut distinct = ids.clone();
    distinct.sort_unstable();
    distinct.dedup();
    (ids.len() as u64, distinct.len() as u64)
}

fn sh_out(mut cmd: std::process::Command) -> String {
    cmd.output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|e| format!("{cmd:?}: {e}"))
}

/// `ss -tin` on both ends of the link (the uplink's sockets as each kernel sees them).
fn print_ss(link: &CellularLink) {
    let mut host = std::process::Command::new("ss");
    host.args(["-tin", "dst", &link.addr.to_string()]);
    let mut inside = link.command("ss");
    inside.args(["-tin", "dst", &link.host_addr.to_string()]);
    let (h, i) = tokio::task::block_in_place(|| (sh_out(host), sh_out(inside)));
    println!("    ss -tin dst {} (here):\n{h}", link.addr);
    println!("    ss -tin (inside {}, central's side):\n{i}", link.ns);
}

/// Runs every variant on every setup, `opts.reps` times.
pub async fn run(opts: &Opts, res: &mut Results) {
    if let Some(why) = cellular::missing() {
        assert!(
            !trainrelay_testkit::under_ci(),
            "cellular: {why}; CI is set, so this is a failure, not a skip"
        );
        println!("  SKIPPED cellular: {why}");
        return;
    }
    let setups: Vec<Setup> = list::<String>(
        "BENCH_CELLULAR_SETUPS",
        "trainrelay,trainrelay-1conn,mosquitto-bridge",
    )
    .iter()
    .map(|s| {
        Setup::by_name(s)
            .filter(|s| *s != Setup::Direct)
            .unwrap_or_else(|| panic!("BENCH_CELLULAR_SETUPS: '{s}' is not a local setup"))
    })
    .collect();
    let stall = Duration::from_secs(env("BENCH_CELLULAR_STALL_SECS", 120u64));
    let ss = std::env::var("BENCH_CELLULAR_SS").is_ok_and(|v| v == "1");
    for rep in 0..opts.reps {
        for v in variants(opts) {
            let link = match CellularLink::up(v.link) {
                Ok(l) => Arc::new(l),
                Err(why) => {
                    assert!(
                        !trainrelay_testkit::under_ci(),
                        "cellular: cannot bring the link up: {why}"
                    );
                    println!("  SKIPPED cellular: cannot bring the link up: {why}");
                    return;
                }
            };
            println!(
                "  -- {} (rep {rep}): {} msgs × {} B on {} topic(s), central Receive Maximum {}; \
                 link {} ({}: {} <-> {})",
                v.label,
                v.msgs,
                v.payload,
                v.topics,
                v.receive_max,
                v.link,
                link.ns,
                link.host_addr,
                link.addr
            );
            for setup in order(rep, &setups) {
                one_run(opts, res, &v, setup, &link, rep, stall, ss).await;
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn one_run(
    opts: &Opts,
    res: &mut Results,
    v: &Variant,
    setup: Setup,
    link: &Arc<CellularLink>,
    rep: usize,
    stall: Duration,
    ss: bool,
) {
    let name = setup.name();
    let key = |figure: &str| format!("{}|{figure}", v.label);
    // The physical ceiling, on the same link right before the run.
    let bytes = ceiling_bytes(&v.link);
    let ceiling = match tokio::task::block_in_place(|| link.tcp_transfer(bytes)) {
        Ok(t) => t.bytes_per_s(),
        Err(e) => {
            println!("    {name}: plain TCP transfer failed: {e}");
            f64::NAN
        }
    };
    let rig = Rig::start_cellular(setup, link.clone(), v.receive_max, v.topics, v.payload).await;
    let pid = rig.local.as_ref().map_or(0, |l| l.proc.pid());
    let n = v.msgs;
    let epoch = Instant::now();
    let (sink, progress) = rig
        .spawn_sink(
            "bench-sink",
            false,
            n,
            false,
            Duration::from_secs(24 * 3600),
            epoch,
        )
        .await;
    let abort = sink.abort_handle();
    let cpu0 = cellular::cpu_time(pid).unwrap_or_default();
    let started = Instant::now();
    let work = async {
        rig.publish_seq(
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
        .expect("publish to the local side");
        sink.await.expect("sink task").expect("sink")
    };
    let watch = async {
        let (mut seen, mut since, mut shown) = (0, Instant::now(), !ss);
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = progress.load(Ordering::Relaxed);
            if now != seen {
                (seen, since) = (now, Instant::now());
            }
            if !shown && now >= n / 2 {
                shown = true;
                print_ss(link);
            }
            if since.elapsed() > stall {
                return now;
            }
        }
    };
    let (arrived, duplicates, last) = tokio::select! {
        r = work => (r.unique, r.duplicates as f64, r.last.unwrap_or_else(Instant::now)),
        got = watch => {
            abort.abort();
            println!("    {name}: nothing arrived for {stall:?}; cut at {got} of {n}");
            (got, f64::NAN, Instant::now() - stall)
        }
    };
    let cpu = cellular::cpu_time(pid)
        .unwrap_or_default()
        .saturating_sub(cpu0);
    let secs = (last - started).as_secs_f64().max(1e-6);
    let rate = arrived as f64 / secs;
    res.add("cellular", name, rep, &key("msgs_per_s"), rate);
    res.add(
        "cellular",
        name,
        rep,
        &key("payload_bytes_per_s"),
        rate * v.payload as f64,
    );
    res.add(
        "cellular",
        name,
        rep,
        &key("tcp_ceiling_bytes_per_s"),
        ceiling,
    );
    res.add(
        "cellular",
        name,
        rep,
        &key("share_of_ceiling"),
        rate * v.payload as f64 / ceiling,
    );
    res.add(
        "cellular",
        name,
        rep,
        &key("cpu_us_per_msg"),
        cpu.as_secs_f64() * 1e6 / arrived.max(1) as f64,
    );
    res.add("cellular", name, rep, &key("duplicates"), duplicates);
    res.add("cellular", name, rep, &key("time_s"), secs);
    if arrived < n {
        res.add("cellular", name, rep, &key("arrived"), arrived as f64);
    }
    let (connects, ids) = uplink_connects(&rig.central.log());
    res.add(
        "cellular",
        name,
        rep,
        &key("reconnects"),
        connects.saturating_sub(ids) as f64,
    );
    res.add("cellular", name, rep, &key("connections"), ids as f64);
    if let Some(l) = &rig.local {
        let conns = l.uplink_connections();
        if let Some(most) = conns.iter().map(|c| c.max_in_flight).max() {
            res.add("cellular", name, rep, &key("max_in_flight"), most as f64);
            let window = conns.iter().map(|c| c.window).max().unwrap_or(0);
            res.add("cellular", name, rep, &key("window"), window as f64);
            // How evenly the topics spread: the busiest connection's share over an even one.
            let total: u64 = conns.iter().map(|c| c.forwarded).sum();
            let busiest = conns.iter().map(|c| c.forwarded).max().unwrap_or(0);
            if total > 0 {
                let even = total as f64 / conns.len() as f64;
                res.add(
                    "cellular",
                    name,
                    rep,
                    &key("busiest_share"),
                    busiest as f64 / even,
                );
            }
        }
    }
}

/// The cellular figures by variant and setup (medians over repetitions).
pub fn table(res: &Results) -> String {
    let med = res.medians();
    let mut labels: Vec<String> = Vec::new();
    let mut setups: Vec<String> = Vec::new();
    for ((w, m), by) in &med {
        if w != "cellular" {
            continue;
        }
        let label = m.split('|').next().unwrap_or_default().to_string();
        if !labels.contains(&label) {
            labels.push(label);
        }
        for s in by.keys() {
            if !setups.contains(s) {
                setups.push(s.clone());
            }
        }
    }
    let get = |label: &str, setup: &str, fig: &str| -> Option<f64> {
        med.iter()
            .find(|((w, m), _)| w == "cellular" && *m == format!("{label}|{fig}"))
            .and_then(|(_, by)| by.get(setup).copied())
    };
    let f = |v: Option<f64>, digits: usize| match v {
        Some(v) if v.is_finite() => format!("{v:.digits$}"),
        _ => "–".to_string(),
    };
    let mut out = String::from(
        "| variant | setup | msgs/s | payload kB/s | plain TCP kB/s | share | CPU µs/msg | \
         duplicates | reconnects | max in flight | s |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for label in &labels {
        for s in &setups {
            if get(label, s, "msgs_per_s").is_none() {
                continue;
            }
            let kb = |fig: &str| get(label, s, fig).map(|v| v / 1000.0);
            let mut msgs = f(get(label, s, "msgs_per_s"), 0);
            if let Some(a) = get(label, s, "arrived") {
                msgs += &format!(" (cut at {a:.0})");
            }
            out.push_str(&format!(
                "| {label} | {s} | {msgs} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                f(kb("payload_bytes_per_s"), 1),
                f(kb("tcp_ceiling_bytes_per_s"), 0),
                f(get(label, s, "share_of_ceiling"), 3),
                f(get(label, s, "cpu_us_per_msg"), 0),
                f(get(label, s, "duplicates"), 0),
                f(get(label, s, "reconnects"), 0),
                f(get(label, s, "max_in_flight"), 0),
                f(get(label, s, "time_s"), 1),
            ));
        }
    }
    out
}
